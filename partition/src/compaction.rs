//! Compaction: reclaim the space of overwritten and deleted blobs.
//!
//! The partition's log stays a plain LSN-ordered log (appended, purged at
//! the head), so it can later serve as a Raft log unchanged. Live data that
//! compaction keeps goes elsewhere: a compacted store, a log directory
//! `compacted-<gen>/` of its own whose records carry each blob's original
//! LSN. One compaction:
//!
//! 1. seals the log's active segment (synced, the next append rolls) and
//!    takes its last LSN as `covers`, then waits out a grace period so
//!    every put or delete up to `covers` is applied to the index;
//! 2. copies the live blobs whose latest write is at or below `covers`
//!    (from the log or the previous compacted store) into a new store,
//!    synced;
//! 3. switches `CURRENT` to (log, new store, covers) in one rename;
//! 4. repoints index entries in small batches, each only if its key did not
//!    change meanwhile;
//! 5. drops the previous store and purges log segments at or below `covers`.
//!
//! Puts and gets run throughout. A crash before step 3 leaves the old state
//! and a leftover directory, removed at the next open; after it, the new
//! state is complete on disk (replay reads the store, then the log after
//! `covers`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use datanode_wal::{Lsn, Wal};

use crate::blob;
use crate::error::{Error, Result};
use crate::index::BlobLoc;
use crate::manifest::{CompactedRef, Manifest, compacted_generation};
use crate::partition::Partition;
use crate::state::{Fault, FaultSource};

/// Bytes of compacted records appended per batch.
const COPY_BATCH: usize = 4 << 20;
/// Index entries repointed per write-lock hold.
const RELOCATE_BATCH: usize = 1024;

/// When the node compacts a partition by itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactionPolicy {
    /// Compact when garbage / stored bytes reaches this ...
    pub garbage_ratio: f64,
    /// ... and the partition holds at least this much garbage.
    pub min_garbage: u64,
    /// Copy budget of one disk, in bytes per second (`None`: no limit).
    pub max_bytes_per_sec: Option<u64>,
}

impl CompactionPolicy {
    /// Whether a partition with this much garbage of `stored` bytes is due.
    pub fn is_due(&self, garbage: u64, stored: u64) -> bool {
        stored > 0 && garbage >= self.min_garbage && garbage as f64 / stored as f64 >= self.garbage_ratio
    }
}

/// A key compaction moved: its old and new location.
type Relocation = (Bytes, BlobLoc, BlobLoc);

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// The log LSN up to which everything is now in the compacted store.
    pub covers: Lsn,
    /// Live blobs copied into the new store.
    pub blobs: u64,
    /// Log and store bytes before.
    pub bytes_before: u64,
    /// Log and store bytes after.
    pub bytes_after: u64,
    /// Bytes of live records copied.
    pub copied_bytes: u64,
}

impl CompactionReport {
    /// Disk space given back: bytes before less bytes after.
    pub fn reclaimed_bytes(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

impl Partition {
    /// Compacts the partition (see the module docs) as fast as the disk
    /// allows. Blocking; puts and gets continue meanwhile. Only a healthy
    /// partition compacts.
    pub fn compact(&self) -> Result<CompactionReport> {
        self.compact_limited(None)
    }

    /// Bytes of the log and compacted stores that no live blob needs:
    /// overwritten and deleted blobs, tombstones. What compaction would
    /// give back (roughly: the log's active segment is never purged).
    pub fn garbage_bytes(&self) -> u64 {
        let live = self.read().index.live_record_bytes;
        self.stored_bytes().saturating_sub(live)
    }

    /// [`Partition::compact`], copying at most `max_bytes_per_sec` (so
    /// that it does not take the disk from foreground writes). Counts the
    /// outcome in `datanode_compactions_total{partition,result}` and the
    /// bytes copied in `datanode_compaction_bytes_total{disk}`.
    pub fn compact_limited(&self, max_bytes_per_sec: Option<u64>) -> Result<CompactionReport> {
        let result = self.compact_inner(max_bytes_per_sec);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(Error::ReadOnly { .. } | Error::Faulted { .. } | Error::Loading(_) | Error::Unavailable { .. }) => {
                "skipped"
            }
            Err(_) => "failed",
        };
        metrics::counter!("datanode_compactions_total", "partition" => self.id().to_string(), "result" => outcome)
            .increment(1);
        if let Ok(report) = &result {
            metrics::counter!("datanode_compaction_bytes_total", "disk" => self.disk().to_string())
                .increment(report.copied_bytes);
        }
        result
    }

    fn compact_inner(&self, max_bytes_per_sec: Option<u64>) -> Result<CompactionReport> {
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        let (log, _) = self.writable_log()?;
        let dir = &self.options.dir;
        let manifest = Manifest::read(self.storage.as_ref(), dir).map_err(Error::CompactionFailed)?.unwrap_or_default();
        let bytes_before = self.stored_bytes();
        // Sealed, so that every segment holding a covered record can be
        // purged whole afterwards, also the one the log was writing.
        let covers = match log.seal_blocking() {
            Ok(covers) => covers,
            Err(error) => {
                let fault = Fault::from_wal(&error);
                self.fault(fault.clone(), FaultSource::Operation);
                return Err(Error::CompactionFailed(fault));
            }
        };
        self.grace.wait();
        let moving: Vec<(Bytes, BlobLoc, Arc<Wal>)> = self.live_up_to(covers)?;

        let generation = manifest.compacted.as_ref().and_then(|c| compacted_generation(&c.name)).unwrap_or(0) + 1;
        let name = format!("compacted-{generation}");
        let _ = self.storage.remove_dir_all(&dir.join(&name));
        let copied = self.copy_into(&name, generation as u32, &moving, max_bytes_per_sec);
        let (relocations, synced) = match copied {
            Ok(copied) => copied,
            Err(error) => {
                let _ = self.storage.remove_dir_all(&dir.join(&name));
                return Err(error);
            }
        };
        let next = Manifest {
            log: manifest.log.clone(),
            log_synced: manifest.log_synced,
            compacted: Some(CompactedRef { name: name.clone(), covers, synced }),
        };
        next.write(self.storage.as_ref(), dir).map_err(|e| Error::CompactionFailed(Fault::io("compact", &e)))?;

        // The new store is the partition's from here on; bring it into use.
        let store = match self.open_store(&name, synced, true) {
            Ok(store) => Arc::new(store),
            Err(fault) => {
                self.fault(fault.clone(), FaultSource::Operation);
                return Err(Error::CompactionFailed(fault));
            }
        };
        self.add_store(generation as u32, store);
        for batch in relocations.chunks(RELOCATE_BATCH) {
            self.relocate(batch);
        }
        // An export streaming now may still read the old store and the
        // covered segments: leave them to the next compaction.
        if self.exports.load(Ordering::SeqCst) > 0 {
            tracing::info!(partition = self.options.id, "an export is running: old files are removed next time");
        } else {
            self.retire_stores_except(generation as u32);
            self.remove_superseded(&next);
            if let Err(error) = log.purge_before_blocking(covers + 1) {
                let fault = Fault::from_wal(&error);
                self.fault(fault.clone(), FaultSource::Operation);
                return Err(Error::CompactionFailed(fault));
            }
        }
        let copied_bytes = relocations.iter().map(|(_, _, new)| new.record_bytes()).sum();
        let report = CompactionReport {
            covers,
            blobs: moving.len() as u64,
            bytes_before,
            bytes_after: self.stored_bytes(),
            copied_bytes,
        };
        tracing::info!(partition = self.options.id, ?report, "compacted");
        Ok(report)
    }

    /// Writes every moving blob into store `name` and syncs it; returns
    /// each key with its old and new location, and the store's last LSN.
    fn copy_into(
        &self,
        name: &str,
        generation: u32,
        moving: &[(Bytes, BlobLoc, Arc<Wal>)],
        max_bytes_per_sec: Option<u64>,
    ) -> Result<(Vec<Relocation>, Lsn)> {
        let started = std::time::Instant::now();
        let mut copied = 0u64;
        let store = self.open_store(name, 0, false).map_err(Error::CompactionFailed)?;
        let mut relocations = Vec::with_capacity(moving.len());
        let mut records = Vec::new();
        let mut pending: Vec<(Bytes, BlobLoc)> = Vec::new();
        let mut bytes = 0;
        for (i, (key, loc, source)) in moving.iter().enumerate() {
            let record = source.read(loc.pos).map_err(|e| self.read_failed(e))?;
            let value = record.get(loc.value_offset as usize..).unwrap_or_default();
            let compacted = blob::encode_compacted_put(loc.lsn, key, value);
            bytes += compacted.len();
            records.push(compacted);
            pending.push((key.clone(), *loc));
            if bytes >= COPY_BATCH || i + 1 == moving.len() {
                let appended = store
                    .append_blocking(std::mem::take(&mut records))
                    .map_err(|e| Error::CompactionFailed(Fault::from_wal(&e)))?;
                for ((key, old), pos) in pending.drain(..).zip(appended.positions) {
                    let value_offset = blob::compacted_put_value_offset(key.len()) as u32;
                    relocations.push((key, old, BlobLoc { store: generation, pos, value_offset, lsn: old.lsn }));
                }
                copied += bytes as u64;
                bytes = 0;
                // The copy budget: never ahead of `max_bytes_per_sec`.
                if let Some(rate) = max_bytes_per_sec.filter(|rate| *rate > 0) {
                    let due = std::time::Duration::from_secs_f64(copied as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        let synced = store.last_lsn();
        store.close().map_err(|e| Error::CompactionFailed(Fault::from_wal(&e)))?;
        Ok((relocations, synced))
    }
}
