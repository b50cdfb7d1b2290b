//! What the Raft storage of a replica fails with.

use std::io;
use std::path::PathBuf;

/// A failure of a replica's Raft storage: the log store, its `RAFT` file,
/// the state machine and its snapshots. openraft's storage
/// traits speak `std::io::Error`; [`StoreError::into_io`] wraps this one
/// (kept as the source, so the caller can still tell a WAL failure and its
/// errno from a broken record).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The WAL failed (I/O, poisoned, corruption, closed).
    #[error("raft log: {0}")]
    Wal(#[from] datanode_wal::Error),
    /// A file operation outside the WAL failed (the `RAFT` file, a log
    /// directory).
    #[error("raft storage {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error, with its errno.
        #[source]
        source: io::Error,
    },
    /// The `RAFT` file is unreadable or inconsistent with the log.
    #[error("raft state {}: {detail}", path.display())]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The record at an LSN is not the entry it must be.
    #[error("raft log record at LSN {lsn}: {detail}")]
    BadRecord {
        /// Where.
        lsn: u64,
        /// What is wrong.
        detail: String,
    },
    /// The snapshot store (a log directory of the replica) failed or is
    /// damaged.
    #[error("snapshot store {}: {source}", path.display())]
    SnapshotStore {
        /// The store's directory.
        path: PathBuf,
        /// The WAL's error (I/O with its errno, or corruption).
        #[source]
        source: datanode_wal::Error,
    },
    /// A snapshot store or the `SNAPSHOT` file holds what this layer never
    /// writes, or disagrees with the rest of the replica.
    #[error("snapshot {}: {detail}", path.display())]
    BadSnapshot {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A snapshot image was refused (checksum, count, truncation, another
    /// partition's); nothing was changed.
    #[error("{0}")]
    BadImage(#[from] crate::image::BadImage),
    /// A read asked for bytes outside the value.
    #[error("range {start}..{end} outside a value of {len} bytes")]
    BadRange {
        /// First byte asked for.
        start: u64,
        /// End of the range asked for.
        end: u64,
        /// The value's length.
        len: u64,
    },
    /// A call that would break the log's shape (a hole, a cut below what
    /// was purged); nothing was changed.
    #[error("raft log refused: {0}")]
    Refused(String),
    /// A blocking task could not be run or was lost.
    #[error("raft storage task: {0}")]
    Task(io::Error),
}

impl StoreError {
    /// As the `io::Error` openraft's traits return.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            StoreError::Wal(error) | StoreError::SnapshotStore { source: error, .. } => match error.errno() {
                Some(errno) => io::Error::from_raw_os_error(errno).kind(),
                None if matches!(error, datanode_wal::Error::Corruption { .. }) => io::ErrorKind::InvalidData,
                None => io::ErrorKind::Other,
            },
            StoreError::Io { source, .. } => source.kind(),
            StoreError::BadMeta { .. }
            | StoreError::BadRecord { .. }
            | StoreError::BadSnapshot { .. }
            | StoreError::BadImage(_) => io::ErrorKind::InvalidData,
            StoreError::Refused(_) | StoreError::BadRange { .. } => io::ErrorKind::InvalidInput,
            StoreError::Task(error) => error.kind(),
        };
        io::Error::new(kind, self)
    }
}

impl From<StoreError> for io::Error {
    fn from(error: StoreError) -> io::Error {
        error.into_io()
    }
}
