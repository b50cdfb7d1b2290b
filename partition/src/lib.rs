//! `datanode-partition`: data partitions over the WAL.
//!
//! A [`Partition`] is a blob store (`put`, `get` with byte ranges,
//! `delete`, `list`) whose data lives in its own write-ahead log: one WAL
//! record per put or delete, so a put is written once. An in-memory index
//! (key -> record position) is rebuilt from the log on open. Each partition
//! has a health state machine ([`state`]) that confines every fault to it.
//!
//! This crate knows nothing of HTTP, JSON or config files.
//!
//! Built so far: the blob store, the state machine, errno classification,
//! sticky fault records and recover, the disk-full path, the registry with
//! its verifier and quarantine, snapshot export and atomic install, disks
//! with their probes, compaction, and the storage of a replica of a
//! replicated partition ([`raft`]): the Raft log store and durable vote
//! over the WAL, and the blob state machine that indexes values in the
//! log's records, with its snapshots.
//!
//! # Threads
//!
//! `put` and `delete` are `async` and never block. `open`, `get`,
//! `recover`, `retry_after_disk_full` and `close` do blocking I/O: from an
//! async runtime, call them on a blocking-capable thread.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

pub mod blob;
mod compaction;
pub mod disk;
pub mod durable;
mod error;
pub mod fault_file;
pub mod fault_journal;
mod grace;
pub mod image;
mod index;
pub mod layout;
mod manifest;
mod partition;
pub mod raft;
pub mod registry;
mod snapshot;
pub mod state;
mod wal_metrics;

pub use compaction::{CompactionPolicy, CompactionReport};
pub use disk::{DiskOptions, DiskState, DiskStatus, ProbeResult};
pub use error::{Error, Result};
pub use layout::DiskDir;
pub use partition::{Partition, PartitionOptions, PartitionStats, PutAck};
pub use registry::{PartitionDefaults, Registry, RegistryError, VerifyReport};
pub use snapshot::Export;
pub use state::{Fault, FaultCause, FaultSource, Health, HealthSnapshot, ReadOnlyReason, State};
