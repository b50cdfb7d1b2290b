//! Raft storage of a replicated partition (openraft, pinned in
//! `Cargo.toml`): the log store over the partition's WAL, the durable
//! vote beside it, and the state machine, which is the blob store.
//!
//! - [`types`]: the type configuration and the index <-> LSN mapping (the
//!   entry at index `i` is the WAL record at LSN `i + 1`).
//! - `codec`: the bytes of an entry inside its WAL record.
//! - `meta`: the `RAFT` file (vote, purged id, live log directory).
//! - [`LogStore`]: openraft's `RaftLogStorage` over a [`datanode_wal::Wal`],
//!   with the durability contracts stated there.
//! - [`BlobStateMachine`]: openraft's `RaftStateMachine`. A put is
//!   written once per replica: its value stays in the log's record and
//!   applying it only indexes it. Snapshots copy the live values into a
//!   snapshot store, after which the log below them may be purged.
//! - `snapshot_meta`: the `SNAPSHOT` file (the current snapshot store,
//!   its last log id and membership).
//! - `snapshot`: snapshot stores, and [`SnapshotImage`], a snapshot as
//!   openraft hands it around, streamable in the export image format.
//!
//! A replica directory:
//!
//! ```text
//! RAFT            vote, purged log id, live log directory (meta.rs)
//! log.<gen>/      the Raft log: one WAL record per entry
//! SNAPSHOT        the current snapshot (snapshot_meta.rs)
//! snap.<gen>/     the current snapshot store: one compacted put per blob
//! receive.<n>     an image being received, until it is installed
//! ```
//!
//! **Invariants.** Only committed entries are applied (openraft's
//! promise), and applying writes nothing, so the log is the only durable
//! copy of a value until a snapshot takes it. A snapshot store is synced
//! and `SNAPSHOT` names it before any index entry points into it, so the
//! log is purged only below a durable snapshot (checked at open: a log
//! purged beyond the snapshot is refused). A directory `SNAPSHOT` does
//! not name is superseded or never took effect, and is removed at open.
//!
//! Not here yet: the network and the `Raft` instance of a partition.

mod codec;
mod error;
mod log_store;
mod meta;
mod snapshot;
mod snapshot_meta;
mod state_machine;
pub mod types;

pub use error::StoreError;

/// Bytes a Raft entry's WAL record adds to its command (the entry header):
/// a proposer checks `ENTRY_OVERHEAD + command length` against the log's
/// largest record before proposing, since a log that cannot take an entry
/// stops its group.
pub const ENTRY_OVERHEAD: usize = codec::ENTRY_HEADER_LEN;
pub use log_store::{LogReader, LogStore};
pub use snapshot::{ImageStream, SnapshotImage};
pub use snapshot_meta::{SnapshotMeta, StoredMembership};
pub use state_machine::{BlobSnapshotBuilder, BlobStateMachine, ReplicaStats, Snapshot, open_replica};
pub use types::{Command, Entry, LogId, TypeConfig, Vote, index_of, lsn_of};
