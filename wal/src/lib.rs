//! `datanode-wal`: a segmented write-ahead log with group commit, strict
//! failure semantics and crash-tested recovery.
//!
//! One [`Wal`] is one log in one directory, identified by an opaque `log_id`
//! (the layers above use their partition id; this crate gives it no
//! meaning). Appends from any number of tasks or threads are queued and
//! written by the log's writer: everything queued goes out in one vectored
//! write followed by one `fdatasync`, and then every waiter in the batch is
//! answered. A log is an owned object, not a thread: its writer runs on an
//! [`Engine`], a small pool of threads shared by the logs of one disk,
//! whenever it has work. The on-disk format is described in `FORMAT.md`.
//!
//! # Durability contract
//!
//! - [`Durability::Sync`] (the default): [`Wal::append`] returns `Ok` only
//!   after an `fdatasync` covering the records. A new segment's name is made
//!   durable (directory fsync) before any record in it is acknowledged.
//! - [`Durability::Interval`]: `Ok` after the write; a sync follows within
//!   the interval. A crash may lose that window.
//! - [`Durability::None`]: never synced except when a segment is sealed and
//!   at [`Wal::close`]. For tests and benchmarks.
//!
//! # Failure contract
//!
//! The first failed write or sync poisons the log: the failing batch gets
//! [`Error::Io`] (its outcome is unknown), every queued and every later call
//! gets [`Error::Poisoned`], and the sync is never retried. Only reopening
//! the directory, which recovers from what is on disk, makes the log usable
//! again. Recovery truncates a torn tail and reports anything else as
//! [`Error::Corruption`], truncating nothing.
//!
//! # Threads
//!
//! `append`, `sync`, `truncate_after` and `purge_before` are `async` and
//! never block the caller's thread (blocking twins exist for plain threads).
//! [`Wal::open`], the reads and [`Wal::close`] do blocking I/O: from an async
//! runtime call them on a blocking-capable thread.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

mod block_on;
mod engine;
mod error;
pub mod format;
mod prepare;
mod recovery;
mod segment;
pub mod storage;
mod wal;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use engine::Engine;
pub use error::{Corruption, Error, IoOp, Result};
pub use storage::{IoBackend, Space, Storage, StorageFile, open_backend};
pub use wal::{Wal, WalStats};

/// A log sequence number. The first record of a new log has LSN 1; 0 means
/// "nothing".
pub type Lsn = u64;

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After an `fdatasync` covering it.
    #[default]
    Sync,
    /// After the write; synced every interval. May lose the last interval.
    Interval(Duration),
    /// After the write; synced only when a segment is sealed and on close.
    None,
}

/// Options of one log.
#[derive(Clone)]
pub struct WalOptions {
    /// The owning log's id, written into every header and record.
    pub log_id: u64,
    /// Size at which a segment is sealed and the next one started.
    pub segment_size: u64,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// Most payload bytes the writer takes into one write and sync.
    pub max_batch_bytes: usize,
    /// Most payload bytes queued and in flight; appends wait beyond it.
    pub max_queued_bytes: usize,
    /// Pre-write each segment with zeros in the background before use.
    pub prewrite_segments: bool,
    /// How many purged segment files [`Wal::purge_before`] keeps as spares
    /// for later segments to be written into (space already written syncs
    /// faster than fresh space). A log that never purged keeps none; each
    /// costs up to `segment_size` on disk. 0: purged segments are removed.
    pub recycled_segments: usize,
    /// Told about every batch and sync (for metrics).
    pub observer: Option<Arc<dyn WalObserver>>,
    /// Every record up to this LSN is known to be on stable storage: the
    /// caller synced the log and then recorded the fact durably (a manifest
    /// renamed after a [`Wal::close`]). Recovery then treats damage at or
    /// below it, and a log that ends before it, as corruption, never as a
    /// torn tail. 0: nothing known beyond what the records prove.
    pub known_durable_lsn: Lsn,
    /// Create the log if the directory holds none. Off for a log that must
    /// already exist (one a manifest names): then a directory without a
    /// log (neither its `LOG` marker nor a segment) is
    /// [`Corruption::MissingLog`], never silently replaced by an empty log.
    pub create_if_missing: bool,
    /// The LSN the first record of a log that holds no record yet gets (1
    /// unless set): a log that continues another one at a known point,
    /// such as a replicated log restarted after a snapshot. Ignored once
    /// the log holds records (their own LSNs decide); the caller records
    /// it durably itself, because a log with no record keeps no trace of
    /// it. 0 is taken as 1.
    pub first_lsn: Lsn,
    /// The pool of threads that carries this log's I/O, shared with the
    /// other logs on its disk. `None`: a pool of one thread of its own.
    pub engine: Option<Engine>,
}

impl std::fmt::Debug for WalOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalOptions")
            .field("log_id", &self.log_id)
            .field("segment_size", &self.segment_size)
            .field("durability", &self.durability)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("prewrite_segments", &self.prewrite_segments)
            .field("recycled_segments", &self.recycled_segments)
            .field("observer", &self.observer.is_some())
            .field("known_durable_lsn", &self.known_durable_lsn)
            .field("create_if_missing", &self.create_if_missing)
            .field("first_lsn", &self.first_lsn)
            .field("engine", &self.engine)
            .finish()
    }
}

impl WalOptions {
    /// Defaults for log `log_id`: 64 MiB segments, sync durability, 4 MiB
    /// batches, 64 MiB queue, pre-written segments, one recycled spare.
    pub fn new(log_id: u64) -> WalOptions {
        WalOptions {
            log_id,
            segment_size: 64 << 20,
            durability: Durability::Sync,
            max_batch_bytes: 4 << 20,
            max_queued_bytes: 64 << 20,
            prewrite_segments: true,
            recycled_segments: 1,
            observer: None,
            known_durable_lsn: 0,
            create_if_missing: true,
            first_lsn: 1,
            engine: None,
        }
    }
}

/// Receives the writer's events; called on the writer thread, so keep it
/// cheap and never block.
pub trait WalObserver: Send + Sync {
    /// A batch of `records` records and `bytes` payload bytes was written.
    fn batch_written(&self, records: usize, bytes: usize) {
        let _ = (records, bytes);
    }
    /// An `fdatasync` of the log completed (successfully or not) in `elapsed`.
    fn synced(&self, elapsed: Duration, ok: bool) {
        let _ = (elapsed, ok);
    }
}

/// Where a record lives; enough to read it back with one `pread`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordPos {
    /// Segment holding the record.
    pub segment_id: u64,
    /// Offset of the record's header in the segment file.
    pub offset: u64,
    /// The record's LSN (verified on read).
    pub lsn: Lsn,
    /// Payload length.
    pub len: u32,
}

/// A record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its LSN.
    pub lsn: Lsn,
    /// Its payload, verified against the record checksum.
    pub data: Bytes,
    /// Where it lives.
    pub pos: RecordPos,
}

/// The result of an append: the LSNs given to the records, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// LSN of the first record of the batch.
    pub first_lsn: Lsn,
    /// LSN of the last record of the batch.
    pub last_lsn: Lsn,
    /// Position of each record, in the order given.
    pub positions: Vec<RecordPos>,
}
