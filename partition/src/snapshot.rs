//! Snapshot export and install: a partition's contents as an image (the
//! format is in `image.rs`), streamed out, or swapped in atomically.
//!
//! **Install** writes the incoming image into a new log directory, beside
//! the live one, and verifies every checksum and the image's partition id;
//! only then does one rename of `CURRENT` switch to it. Before the switch,
//! writes are fenced and every write under way is settled, so none is lost
//! to the swap and no position of the old log lands in the new index.
//! Reads are served from the old contents until the switch and from the
//! new ones after; a refused or failed install leaves the old contents in
//! place. `CURRENT` records the image's last LSN as synced
//! (`log_synced`), so damage to the installed log is corruption at the
//! next open, never a torn tail.
//!
//! **Export** streams the live blobs as of the call. While it streams,
//! compaction leaves the files it reads in place.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};

use bytes::Bytes;
use datanode_wal::{Lsn, Wal};

use crate::blob;
use crate::error::{Error, Result};
use crate::image::{ImageReader, ImageWriter};
use crate::index::{BlobLoc, Index, LOG_STORE};
use crate::manifest::{Manifest, log_generation};
use crate::partition::{Fence, Partition};
use crate::state::{Fault, FaultSource, ReadOnlyReason, State};

/// Bytes of snapshot entries appended per batch while installing.
const INSTALL_BATCH: usize = 4 << 20;

impl Partition {
    /// Streams a consistent image of the live blobs: the blobs as of this
    /// call, whatever is written afterwards. Copies the key list under the
    /// index lock (blocking for large partitions: call it from a
    /// blocking-capable thread); each `next()` does a blocking read.
    pub fn export(&self) -> Result<Export> {
        match self.health().state() {
            State::Loading => return Err(Error::Loading(self.id())),
            State::Faulted(fault) => return Err(Error::Faulted { partition: self.id(), fault }),
            State::Healthy | State::ReadOnly(_) => {}
        }
        // Pinned before the key list is taken, so a compaction that runs
        // meanwhile leaves every position in it readable.
        let pin = ExportPin::new(Arc::clone(&self.exports));
        let inner = self.read();
        let mut entries = Vec::with_capacity(inner.index.blobs as usize);
        for (key, loc) in inner.index.live() {
            let store = inner.store(loc).ok_or(Error::Loading(self.id()))?;
            entries.push((key.to_bytes(), store, *loc));
        }
        drop(inner);
        let (writer, header) = ImageWriter::new(self.id());
        Ok(Export { entries: entries.into_iter(), writer: Some(writer), header: Some(header), _pin: pin })
    }

    /// Replaces the partition's contents with a snapshot image of this
    /// partition, atomically (see the module docs). Blocking. Writes are
    /// refused meanwhile (`read_only(snapshot_install)`). A refused or
    /// failed install leaves the old contents in place. Installing repairs
    /// a faulted partition.
    pub fn install(&self, image: impl Read) -> Result<()> {
        if let State::Loading = self.health().state() {
            return Err(Error::Loading(self.id()));
        }
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        self.health().add_reason(ReadOnlyReason::SnapshotInstall);
        let result = match self.fence(Fence::Install) {
            Some(_fenced) => self.install_image(image),
            None => Err(Error::Unavailable { partition: self.id(), reason: "closed" }),
        };
        self.health().clear_reason(ReadOnlyReason::SnapshotInstall);
        result
    }

    fn install_image(&self, image: impl Read) -> Result<()> {
        let dir = &self.options.dir;
        // Named above every log directory present, so that it collides with
        // none, also when `CURRENT` is lost or unreadable: installing is the
        // repair of lost metadata. What it supersedes is removed only once
        // the new `CURRENT` is durable.
        let names = self.storage.list_dir(dir).map_err(|e| Error::InstallFailed(Fault::io("install", &e)))?;
        let newest = names.iter().filter_map(|name| log_generation(name)).max().unwrap_or(0);
        let next_name = format!("wal-{}", newest + 1);
        let staging = dir.join(&next_name);
        let _ = self.storage.remove_dir_all(&staging);
        let written = self.write_image(&staging, image);
        let last_lsn = match written {
            Ok(last_lsn) => last_lsn,
            Err(error) => {
                let _ = self.storage.remove_dir_all(&staging);
                return Err(error);
            }
        };
        let next = Manifest { log: next_name, log_synced: last_lsn, compacted: None };
        next.write(self.storage.as_ref(), dir).map_err(|e| Error::InstallFailed(Fault::io("install", &e)))?;
        // From here the new image is the partition, also after a crash.
        let opened = self.open_log(&next.log, next.log_synced, true);
        let mut index = Index::default();
        let wal = match opened.and_then(|wal| index.replay(&wal, LOG_STORE, 0).map(|()| wal)) {
            Ok(wal) => wal,
            Err(fault) => {
                self.fault(fault.clone(), FaultSource::Operation);
                return Err(Error::InstallFailed(fault));
            }
        };
        for log in self.replace_contents(wal, index) {
            // Readers of the old contents may still hold it; its threads stop.
            let _ = log.stop();
        }
        self.remove_superseded(&next);
        if let State::Faulted(_) = self.health().state() {
            self.clear_fault().map_err(|e| Error::InstallFailed(Fault::io("install", &e)))?;
        }
        tracing::info!(partition = self.id(), log = next.log, "snapshot installed");
        Ok(())
    }

    /// Writes a verified image of this partition into a fresh log at
    /// `staging`, synced; returns its last LSN.
    fn write_image(&self, staging: &Path, image: impl Read) -> Result<Lsn> {
        let wal = Wal::open(Arc::clone(&self.storage), staging, self.bulk_options())
            .map_err(|e| Error::InstallFailed(Fault::from_wal(&e)))?;
        let mut reader =
            ImageReader::new(image, self.options.max_blob_size).map_err(|e| Error::BadSnapshot(e.to_string()))?;
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        loop {
            let entry = reader.next_entry().map_err(|e| Error::BadSnapshot(e.to_string()))?;
            let done = entry.is_none();
            if let Some((key, value)) = entry {
                let record = blob::encode_put(&key, &value);
                batch_bytes += record.len();
                batch.push(record);
            }
            if (done || batch_bytes >= INSTALL_BATCH) && !batch.is_empty() {
                wal.append_blocking(std::mem::take(&mut batch))
                    .map_err(|e| Error::InstallFailed(Fault::from_wal(&e)))?;
                batch_bytes = 0;
            }
            if done {
                break;
            }
        }
        // Trusted only now: the trailer's checksum covers the header.
        if reader.partition() != self.id() {
            return Err(Error::BadSnapshot(format!(
                "the image is of partition {}, not {}",
                reader.partition(),
                self.id()
            )));
        }
        let last_lsn = wal.last_lsn();
        // Closing syncs everything written.
        wal.close().map_err(|e| Error::InstallFailed(Fault::from_wal(&e)))?;
        Ok(last_lsn)
    }
}

/// Counts an export as running until dropped.
#[derive(Debug)]
struct ExportPin(Arc<AtomicUsize>);

impl ExportPin {
    fn new(exports: Arc<AtomicUsize>) -> ExportPin {
        exports.fetch_add(1, Ordering::SeqCst);
        ExportPin(exports)
    }
}

impl Drop for ExportPin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A snapshot image being streamed; see [`Partition::export`].
#[derive(Debug)]
pub struct Export {
    entries: std::vec::IntoIter<(Bytes, Arc<Wal>, BlobLoc)>,
    writer: Option<ImageWriter>,
    header: Option<Bytes>,
    _pin: ExportPin,
}

impl Iterator for Export {
    type Item = Result<Bytes>;

    /// The next piece of the image: header, one entry each, trailer.
    fn next(&mut self) -> Option<Result<Bytes>> {
        if let Some(header) = self.header.take() {
            return Some(Ok(header));
        }
        let writer = self.writer.as_mut()?;
        match self.entries.next() {
            Some((key, store, loc)) => {
                let record = match store.read(loc.pos) {
                    Ok(record) => record,
                    Err(error) => {
                        self.writer = None;
                        return Some(Err(Error::Read(error)));
                    }
                };
                let value = record.slice(loc.value_offset as usize..);
                Some(Ok(writer.entry(&key, &value)))
            }
            None => self.writer.take().map(|writer| Ok(writer.trailer())),
        }
    }
}
