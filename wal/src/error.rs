//! The crate's one error type.

use std::io;
use std::path::PathBuf;

use crate::Lsn;
use crate::format::FrameError;

/// Result of every fallible WAL call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A kind of file operation: what failed, in errors, logs and metrics, and
/// what an injected fault targets in the simulation
/// ([`crate::storage::Fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IoOp {
    /// Opening or creating a file.
    Open,
    /// Reading file contents.
    Read,
    /// Writing file contents.
    Write,
    /// `fdatasync` of a file.
    Sync,
    /// `fsync` of a directory after a create, rename or remove.
    SyncDir,
    /// Renaming, removing, listing or resizing; in the simulation also a
    /// file's length, dropping its cache and the free space.
    Metadata,
}

impl IoOp {
    /// Stable lower-case name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Open => "open",
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Sync => "sync",
            IoOp::SyncDir => "sync_dir",
            IoOp::Metadata => "metadata",
        }
    }
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in the WAL.
///
/// The split that callers act on:
/// - [`Error::Io`] from an append: the batch was attempted and its outcome is
///   unknown; the WAL is now poisoned.
/// - [`Error::Poisoned`] and [`Error::Closed`]: the call was not attempted.
/// - [`Error::Corruption`]: bytes on disk are not what was written; nothing
///   was truncated or skipped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed. The `source` keeps the OS error, so
    /// [`Error::errno`] classifies it without looking at messages.
    #[error("{op} failed on {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: IoOp,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or sync failed; this WAL refuses all further work
    /// until it is reopened and recovered from disk. The error is rebuilt
    /// from the original errno for every caller.
    #[error("WAL poisoned by an earlier {op} error: {source}")]
    Poisoned {
        /// The operation that failed first.
        op: IoOp,
        /// The first failure's OS error (same errno).
        #[source]
        source: io::Error,
    },
    /// Bytes on disk fail their checks below the durable end of the log.
    #[error("corruption in segment {segment_id} at offset {offset}: {detail}")]
    Corruption {
        /// Segment where the damage was found.
        segment_id: u64,
        /// Byte offset within the segment file.
        offset: u64,
        /// What is wrong.
        detail: Corruption,
    },
    /// The WAL was closed, or its writer thread is gone.
    #[error("WAL is closed")]
    Closed,
    /// A record is larger than the format or the configuration allows.
    #[error("record of {len} bytes exceeds the limit of {max}")]
    RecordTooLarge {
        /// The record's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The LSN is outside the range the log holds.
    #[error("LSN {lsn} is outside the log ({first}..={last})")]
    LsnOutOfRange {
        /// The LSN asked for.
        lsn: Lsn,
        /// The first LSN held.
        first: Lsn,
        /// The last LSN held.
        last: Lsn,
    },
    /// The directory holds a WAL of another log, or an unknown file.
    #[error("{0}")]
    Invalid(String),
}

/// What recovery or a read found wrong with the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// A frame failed to decode where a durable record must be.
    BadRecord(FrameError),
    /// A segment's header is damaged although later data proves it durable.
    BadSegmentHeader(FrameError),
    /// Segments do not follow each other (missing file or LSN gap).
    Gap {
        /// The LSN the segment should start with.
        expected: Lsn,
        /// What it starts with.
        found: Lsn,
    },
    /// The segment's header names another log or segment.
    ForeignSegment,
    /// A segment file between two others is missing.
    MissingSegment,
    /// The directory holds no log (no marker, no segment) although the log
    /// must exist.
    MissingLog,
    /// The log ends before an LSN that was known to be durable.
    LostRecords {
        /// The LSN known durable.
        durable: Lsn,
        /// The last LSN the log still holds.
        last: Lsn,
    },
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corruption::BadRecord(e) => write!(f, "bad record below the durable end ({e})"),
            Corruption::BadSegmentHeader(e) => write!(f, "bad segment header ({e})"),
            Corruption::Gap { expected, found } => {
                write!(f, "LSN gap: expected {expected}, found {found}")
            }
            Corruption::ForeignSegment => f.write_str("segment belongs to another log"),
            Corruption::MissingSegment => f.write_str("segment file missing"),
            Corruption::MissingLog => f.write_str("the log directory is missing or holds no log"),
            Corruption::LostRecords { durable, last } => {
                write!(f, "the log ends at LSN {last}, before LSN {durable}, which was durable")
            }
        }
    }
}

impl Error {
    /// The OS error number behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Poisoned { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The failed operation, for I/O errors.
    pub fn op(&self) -> Option<IoOp> {
        match self {
            Error::Io { op, .. } | Error::Poisoned { op, .. } => Some(*op),
            _ => None,
        }
    }

    /// True for "no space" errors (ENOSPC, EDQUOT, EFBIG): the disk is full,
    /// not broken.
    pub fn is_disk_full(&self) -> bool {
        matches!(self.errno(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG))
    }

    /// True when the failed call was attempted on disk and its outcome is
    /// unknown (a write or sync error on this very call).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, Error::Io { op: IoOp::Write | IoOp::Sync, .. })
    }

    pub(crate) fn io(op: IoOp, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { op, path: path.into(), source }
    }
}
