//! Compaction: reclaim the space of overwritten and deleted blobs.
//!
//! The partition's log stays a plain LSN-ordered log (appended, purged at
//! the head), so it can later serve as a Raft log unchanged. Live data that
//! compaction keeps goes elsewhere: a compacted store, a log directory
//! `compacted-<gen>/` of its own whose records carry each blob's original
//! LSN. One compaction:
//!
//! 1. reads `covers`, the log's durable LSN, then waits out a grace period
//!    so every put or delete up to `covers` is applied to the index;
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
}

impl Partition {
    /// Compacts the partition (see the module docs). Blocking; puts and
    /// gets continue meanwhile. Only a healthy partition compacts.
    pub fn compact(&self) -> Result<CompactionReport> {
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        let (log, _) = self.writable_log()?;
        let dir = &self.options.dir;
        let manifest = Manifest::read(self.storage.as_ref(), dir).map_err(Error::CompactionFailed)?.unwrap_or_default();
        let bytes_before = self.stored_bytes();
        let covers = log.durable_lsn();
        self.grace.wait();
        let moving: Vec<(Bytes, BlobLoc, Arc<Wal>)> = self.live_up_to(covers)?;

        let generation = manifest.compacted.as_ref().and_then(|c| compacted_generation(&c.name)).unwrap_or(0) + 1;
        let name = format!("compacted-{generation}");
        let _ = self.storage.remove_dir_all(&dir.join(&name));
        let copied = self.copy_into(&name, generation as u32, &moving);
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
        let report =
            CompactionReport { covers, blobs: moving.len() as u64, bytes_before, bytes_after: self.stored_bytes() };
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
    ) -> Result<(Vec<Relocation>, Lsn)> {
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
                    // kind (1) + original LSN (8) + key length (2) + key
                    let value_offset = (11 + key.len()) as u32;
                    relocations.push((key, old, BlobLoc { store: generation, pos, value_offset, lsn: old.lsn }));
                }
                bytes = 0;
            }
        }
        let synced = store.last_lsn();
        store.close().map_err(|e| Error::CompactionFailed(Fault::from_wal(&e)))?;
        Ok((relocations, synced))
    }
}
