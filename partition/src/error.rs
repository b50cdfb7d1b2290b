//! The crate's one error type.

use std::collections::BTreeSet;

use crate::state::{Fault, ReadOnlyReason};

/// Result of every fallible partition call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a partition call can fail with. The daemon maps each variant to one
/// HTTP status; the split that matters to a client is whether the call was
/// attempted ([`Error::WriteOutcomeUnknown`]) or refused before anything
/// was written (everything else).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The partition is still loading its log.
    #[error("partition {0} is loading")]
    Loading(u64),
    /// The partition cannot take the call right now (its log is being
    /// reopened, or it was closed); nothing was attempted.
    #[error("partition {partition} is unavailable: {reason}")]
    Unavailable {
        /// The partition.
        partition: u64,
        /// Why.
        reason: &'static str,
    },
    /// The partition is faulted; nothing was attempted.
    #[error("partition {partition} is faulted: {}", fault.message)]
    Faulted {
        /// The partition.
        partition: u64,
        /// Why.
        fault: Fault,
    },
    /// The partition refuses writes; nothing was attempted.
    #[error("partition {partition} is read-only")]
    ReadOnly {
        /// The partition.
        partition: u64,
        /// Why.
        reasons: BTreeSet<ReadOnlyReason>,
    },
    /// The write was handed to the disk and then failed: it may or may not
    /// be there. It was not acknowledged; the partition is now faulted, or
    /// read-only on a full disk, and once the outcome is settled what the
    /// node serves for the key is what it serves after a restart.
    #[error("write outcome unknown: {0}")]
    WriteOutcomeUnknown(#[source] datanode_wal::Error),
    /// No blob under that key.
    #[error("blob not found")]
    NotFound,
    /// The key or value is not acceptable (empty or long key, large value).
    #[error("{0}")]
    BadRequest(String),
    /// The requested byte range lies outside the blob.
    #[error("range {start}..{end} outside a blob of {len} bytes")]
    BadRange {
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// The blob's length.
        len: u64,
    },
    /// A read failed; the partition may have been faulted by it.
    #[error("read failed: {0}")]
    Read(#[source] datanode_wal::Error),
    /// A snapshot image was refused; the partition is unchanged.
    #[error("{0}")]
    BadSnapshot(String),
    /// Installing a verified image failed on the disk; the partition is
    /// unchanged unless the fault says otherwise.
    #[error("snapshot install failed: {}", .0.message)]
    InstallFailed(Fault),
    /// Compaction failed; the partition is unchanged unless the fault says
    /// otherwise.
    #[error("compaction failed: {}", .0.message)]
    CompactionFailed(Fault),
    /// Recover could not verify the partition; it stays faulted.
    #[error("recover failed: {}", .0.message)]
    RecoverFailed(Fault),
}
