//! One data partition: a blob store whose data lives in its own WAL, an
//! in-memory index rebuilt from the log on open, and its health.
//!
//! Every error is confined here: an I/O error on this partition's log
//! faults this partition (and writes the sticky fault record), a full disk
//! makes it read-only, and nothing propagates as a panic.

use std::collections::BTreeMap;
use std::ops::{Bound, Range};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use std::io::Read;

use datanode_wal::{Durability, Lsn, RecordPos, Storage, Wal, WalObserver, WalOptions, WalStats};

use crate::blob::{self, BlobOp};
use crate::error::{Error, Result};
use crate::fault_file;
use crate::grace::Grace;
use crate::index::{BlobLoc, Entry, Index, LOG_STORE};
use crate::manifest::{Manifest, compacted_generation, log_generation};
use crate::snapshot::{ImageReader, ImageWriter};
use crate::state::{Fault, FaultCause, Health, ReadOnlyReason, State};

/// Bytes of snapshot entries appended per batch while installing.
const INSTALL_BATCH: usize = 4 << 20;

/// How a partition is opened.
#[derive(Debug, Clone)]
pub struct PartitionOptions {
    /// The partition id; also the WAL's log id.
    pub id: u64,
    /// Name of the disk it lives on (for logs and metrics).
    pub disk: String,
    /// Its directory, `<disk>/partitions/<id>`.
    pub dir: PathBuf,
    /// Options of its WAL (`log_id` is overwritten with `id`).
    pub wal: WalOptions,
    /// Largest value a put may carry.
    pub max_blob_size: usize,
    /// Read errors tolerated (each answered with an error) before the
    /// partition is faulted.
    pub read_error_tolerance: u32,
}

impl PartitionOptions {
    /// Defaults: 16 MiB blobs, 3 tolerated read errors, default WAL options.
    pub fn new(id: u64, disk: impl Into<String>, dir: impl Into<PathBuf>) -> PartitionOptions {
        PartitionOptions {
            id,
            disk: disk.into(),
            dir: dir.into(),
            wal: WalOptions::new(id),
            max_blob_size: 16 << 20,
            read_error_tolerance: 3,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// The partition's log.
    pub wal: Option<Arc<Wal>>,
    /// Compacted stores by generation (one, or two while compaction moves
    /// index entries from the old to the new).
    pub stores: BTreeMap<u32, Arc<Wal>>,
    pub index: Index,
}

impl Inner {
    /// The store holding `loc`.
    pub fn store(&self, loc: &BlobLoc) -> Option<Arc<Wal>> {
        if loc.store == LOG_STORE { self.wal.clone() } else { self.stores.get(&loc.store).cloned() }
    }
}

/// What a put returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutAck {
    /// The LSN of the put's record.
    pub lsn: Lsn,
    /// The value's size in bytes.
    pub size: u64,
}

/// Sizes and log positions, for status reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// Live blobs.
    pub blobs: u64,
    /// Bytes of live values.
    pub live_bytes: u64,
    /// First LSN in the log.
    pub first_lsn: Lsn,
    /// Last LSN in the log.
    pub last_lsn: Lsn,
    /// Last LSN known durable.
    pub durable_lsn: Lsn,
    /// The WAL's counters and sizes.
    pub wal: WalStats,
}

/// One data partition.
#[derive(Debug)]
pub struct Partition {
    pub(crate) options: PartitionOptions,
    pub(crate) storage: Arc<dyn Storage>,
    health: Health,
    inner: RwLock<Inner>,
    read_errors: AtomicU32,
    /// Held by whatever replaces the log or the compacted store (install,
    /// compaction, recover, disk-full retry): one at a time.
    pub(crate) maintenance: Mutex<()>,
    /// Puts and deletes run registered here, so compaction can wait until
    /// every acknowledged one is in the index.
    pub(crate) grace: Grace,
}

impl Partition {
    /// Opens the partition in `options.dir`. Blocking (replays the log).
    ///
    /// Never fails: a partition that cannot be loaded is returned faulted,
    /// with the reason, so that it is visible and recoverable. A fault
    /// record left on disk keeps it faulted without touching the log.
    pub fn open(storage: Arc<dyn Storage>, options: PartitionOptions) -> Partition {
        let partition = Partition::unloaded(storage, options);
        match fault_file::read(partition.storage.as_ref(), &partition.options.dir) {
            Ok(Some(fault)) => {
                tracing::warn!(partition = partition.options.id, "fault record found: staying faulted until recover");
                partition.health.fault(fault);
            }
            Ok(None) => match partition.load() {
                Ok(()) => partition.health.loaded(),
                Err(fault) => partition.fail(fault),
            },
            Err(error) => partition.fail(io_fault("open", &error)),
        }
        partition
    }

    /// A partition that cannot even be identified safely (its `PARTITION`
    /// file is unreadable): registered faulted with `fault`, without
    /// touching its log; `recover` loads it once the disk reads again.
    pub fn open_faulted(storage: Arc<dyn Storage>, options: PartitionOptions, fault: Fault) -> Partition {
        let partition = Partition::unloaded(storage, options);
        partition.fail(fault);
        partition
    }

    fn unloaded(storage: Arc<dyn Storage>, mut options: PartitionOptions) -> Partition {
        options.wal.log_id = options.id;
        options.wal.observer = Some(Arc::new(WalMetrics::new(options.id, &options.disk)));
        Partition {
            health: Health::new(options.id, &options.disk),
            options,
            storage,
            inner: RwLock::new(Inner::default()),
            read_errors: AtomicU32::new(0),
            maintenance: Mutex::new(()),
            grace: Grace::default(),
        }
    }

    /// The partition id.
    pub fn id(&self) -> u64 {
        self.options.id
    }

    /// The disk it lives on.
    pub fn disk(&self) -> &str {
        &self.options.disk
    }

    /// Its health state machine.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Opens what `CURRENT` names (the compacted store, then the log),
    /// replays both into a fresh index and installs them; then removes
    /// directories a finished install or compaction superseded.
    fn load(&self) -> Result<(), Fault> {
        let manifest = Manifest::read(self.storage.as_ref(), &self.options.dir)?;
        let mut index = Index::default();
        let mut stores = BTreeMap::new();
        let mut covers = 0;
        if let Some(compacted) = &manifest.compacted {
            let generation = compacted_generation(&compacted.name).unwrap_or(1) as u32;
            let store = self.open_store(&compacted.name)?;
            index.replay(&store, generation, 0)?;
            stores.insert(generation, Arc::new(store));
            covers = compacted.covers;
        }
        let wal = Wal::open(Arc::clone(&self.storage), self.options.dir.join(&manifest.log), self.options.wal.clone())
            .map_err(|e| wal_fault(&e))?;
        index.replay(&wal, LOG_STORE, covers)?;
        *self.write() = Inner { wal: Some(Arc::new(wal)), stores, index };
        self.read_errors.store(0, Ordering::Release);
        self.remove_superseded(&manifest);
        Ok(())
    }

    /// Options of the partition's other logs (compacted stores, an
    /// install's staging log): written in bulk and synced once, at close.
    pub(crate) fn bulk_options(&self) -> WalOptions {
        WalOptions {
            durability: Durability::None,
            prewrite_segments: false,
            observer: None,
            ..self.options.wal.clone()
        }
    }

    pub(crate) fn open_store(&self, name: &str) -> Result<Wal, Fault> {
        Wal::open(Arc::clone(&self.storage), self.options.dir.join(name), self.bulk_options())
            .map_err(|e| wal_fault(&e))
    }

    /// Removes log and compacted directories `manifest` does not use.
    pub(crate) fn remove_superseded(&self, manifest: &Manifest) {
        let Ok(names) = self.storage.list_dir(&self.options.dir) else { return };
        for name in names.iter().filter(|name| manifest.supersedes(name)) {
            let path = self.options.dir.join(name);
            if let Err(error) = self.storage.remove_dir_all(&path) {
                tracing::warn!(partition = self.options.id, path = %path.display(), %error, "cannot remove a superseded log");
            }
        }
    }

    /// Streams a consistent image of the live blobs (see [`crate::snapshot`]):
    /// the blobs as of this call, whatever is written afterwards. Each
    /// `next()` does blocking reads.
    pub fn export(&self) -> Result<Export> {
        self.refuse_unless_serving()?;
        let inner = self.read();
        let mut entries = Vec::with_capacity(inner.index.blobs as usize);
        for (key, loc) in inner.index.live() {
            let store = inner.store(loc).ok_or(Error::Loading(self.options.id))?;
            entries.push((key.to_bytes(), store, *loc));
        }
        drop(inner);
        let (writer, header) = ImageWriter::new(self.options.id);
        Ok(Export { entries: entries.into_iter(), writer: Some(writer), header: Some(header) })
    }

    /// Replaces the partition's contents with a snapshot image, atomically.
    /// Blocking. The image is written to a new log directory and every
    /// checksum verified; only then does one rename of `CURRENT` switch to
    /// it. Reads are served from the old contents until the switch and
    /// from the new ones after; writes are refused meanwhile
    /// (`read_only(snapshot_install)`). A refused or failed install leaves
    /// the old contents in place. Installing repairs a faulted partition.
    pub fn install(&self, image: impl Read) -> Result<()> {
        if let State::Loading = self.health.state() {
            return Err(Error::Loading(self.options.id));
        }
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        self.health.add_reason(ReadOnlyReason::SnapshotInstall);
        let result = self.install_image(image);
        self.health.clear_reason(ReadOnlyReason::SnapshotInstall);
        result
    }

    fn install_image(&self, image: impl Read) -> Result<()> {
        let dir = &self.options.dir;
        let current = Manifest::read(self.storage.as_ref(), dir).map_err(Error::InstallFailed)?;
        let next = Manifest { log: format!("wal-{}", log_generation(&current.log).unwrap_or(0) + 1), compacted: None };
        let staging = dir.join(&next.log);
        let _ = self.storage.remove_dir_all(&staging);
        let written = self.write_image(&staging, image);
        if written.is_err() {
            let _ = self.storage.remove_dir_all(&staging);
            return written;
        }
        next.write(self.storage.as_ref(), dir).map_err(|e| Error::InstallFailed(io_fault("install", &e)))?;
        // From here the new image is the partition, also after a crash.
        let opened = Wal::open(Arc::clone(&self.storage), staging, self.options.wal.clone()).map_err(|e| wal_fault(&e));
        let mut index = Index::default();
        let wal = match opened.and_then(|wal| index.replay(&wal, LOG_STORE, 0).map(|()| wal)) {
            Ok(wal) => wal,
            Err(fault) => {
                self.fail(fault.clone());
                return Err(Error::InstallFailed(fault));
            }
        };
        let fresh = Inner { wal: Some(Arc::new(wal)), stores: BTreeMap::new(), index };
        let old = std::mem::replace(&mut *self.write(), fresh);
        for log in old.wal.iter().chain(old.stores.values()) {
            // Readers of the old contents may still hold it; its threads stop.
            let _ = log.stop();
        }
        self.read_errors.store(0, Ordering::Release);
        self.remove_superseded(&next);
        if let State::Faulted(_) = self.health.state() {
            fault_file::clear(self.storage.as_ref(), dir).map_err(|e| Error::InstallFailed(io_fault("install", &e)))?;
            self.health.recovered();
        }
        tracing::info!(partition = self.options.id, log = next.log, "snapshot installed");
        Ok(())
    }

    /// Writes a verified image into a fresh log at `staging`, synced.
    fn write_image(&self, staging: &std::path::Path, image: impl Read) -> Result<()> {
        let wal = Wal::open(Arc::clone(&self.storage), staging, self.bulk_options())
            .map_err(|e| Error::InstallFailed(wal_fault(&e)))?;
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
                wal.append_blocking(std::mem::take(&mut batch)).map_err(|e| Error::InstallFailed(wal_fault(&e)))?;
                batch_bytes = 0;
            }
            if done {
                break;
            }
        }
        // Closing syncs everything written.
        wal.close().map_err(|e| Error::InstallFailed(wal_fault(&e)))
    }

    /// Faults the partition: counts the error, writes the sticky record
    /// (best effort: the disk may be what failed), changes the state.
    pub(crate) fn fail(&self, fault: Fault) {
        self.count_io_error(&fault);
        self.persist_and_fault(fault);
    }

    /// A fault the node's journal remembers from before a restart: written
    /// to `FAULT` now, not counted again as an I/O error.
    pub(crate) fn fault_from_journal(&self, fault: Fault) {
        self.persist_and_fault(fault);
    }

    fn persist_and_fault(&self, fault: Fault) {
        if let Err(error) = fault_file::write(self.storage.as_ref(), &self.options.dir, &fault) {
            tracing::error!(partition = self.options.id, disk = self.options.disk, %error, "cannot persist fault record");
        }
        self.health.fault(fault);
    }

    fn count_io_error(&self, fault: &Fault) {
        if let Some(errno) = fault.errno {
            metrics::counter!(
                "datanode_io_errors_total",
                "disk" => self.options.disk.clone(),
                "op" => fault.op.clone(),
                "errno" => errno.to_string()
            )
            .increment(1);
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse_unless_serving(&self) -> Result<()> {
        match self.health.state() {
            State::Loading => Err(Error::Loading(self.options.id)),
            State::Faulted(fault) => Err(Error::Faulted { partition: self.options.id, fault }),
            State::Healthy | State::ReadOnly(_) => Ok(()),
        }
    }

    /// The log, if the partition takes writes (it is healthy).
    pub(crate) fn refuse_unless_writable(&self) -> Result<Arc<Wal>> {
        match self.health.state() {
            State::Healthy => self.log(),
            State::ReadOnly(reasons) => Err(Error::ReadOnly { partition: self.options.id, reasons }),
            State::Loading => Err(Error::Loading(self.options.id)),
            State::Faulted(fault) => Err(Error::Faulted { partition: self.options.id, fault }),
        }
    }

    /// Stores `value` under `key`; returns once durable.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<PutAck> {
        blob::check_key(key).map_err(Error::BadRequest)?;
        if value.len() > self.options.max_blob_size {
            return Err(Error::BadRequest(format!(
                "value of {} bytes exceeds {}",
                value.len(),
                self.options.max_blob_size
            )));
        }
        let _registered = self.grace.enter();
        let wal = self.refuse_unless_writable()?;
        let appended = self.append(&wal, blob::encode_put(key, value)).await?;
        let pos = appended;
        let value_offset = (pos.len as usize - value.len()) as u32;
        let loc = BlobLoc { store: LOG_STORE, pos, value_offset, lsn: pos.lsn };
        self.write().index.apply(key, Entry::Live(loc));
        Ok(PutAck { lsn: pos.lsn, size: value.len() as u64 })
    }

    /// Deletes `key` durably. `NotFound` if there is no live blob.
    pub async fn delete(&self, key: &[u8]) -> Result<Lsn> {
        blob::check_key(key).map_err(Error::BadRequest)?;
        let _registered = self.grace.enter();
        let wal = self.refuse_unless_writable()?;
        if !matches!(self.read().index.entries.get(key), Some(Entry::Live(_))) {
            return Err(Error::NotFound);
        }
        let pos = self.append(&wal, blob::encode_delete(key)).await?;
        self.write().index.apply(key, Entry::Deleted(pos.lsn));
        Ok(pos.lsn)
    }

    /// Appends one record and turns a WAL failure into this partition's
    /// state change.
    async fn append(&self, wal: &Wal, record: Bytes) -> Result<RecordPos> {
        match wal.append(vec![record]).await {
            Ok(appended) => appended.positions.first().copied().ok_or(Error::NotFound),
            Err(error) if error.is_disk_full() => {
                let fault = wal_fault(&error);
                self.count_io_error(&fault);
                self.health.note_error(fault);
                self.health.add_reason(ReadOnlyReason::DiskFull);
                Err(Error::ReadOnly { partition: self.options.id, reasons: [ReadOnlyReason::DiskFull].into() })
            }
            Err(datanode_wal::Error::RecordTooLarge { len, max }) => {
                Err(Error::BadRequest(format!("record of {len} bytes exceeds {max}")))
            }
            Err(error) => {
                let fault = wal_fault(&error);
                self.fail(fault.clone());
                if error.outcome_unknown() {
                    Err(Error::WriteOutcomeUnknown(error))
                } else {
                    Err(Error::Faulted { partition: self.options.id, fault })
                }
            }
        }
    }

    /// The value under `key`, or the `range` of it. Blocking (one `pread`):
    /// call it from a blocking-capable thread. Never returns bytes that fail
    /// their checksum.
    pub fn get(&self, key: &[u8], range: Option<Range<u64>>) -> Result<Bytes> {
        let (wal, loc, range) = self.prepare_get(key, range)?;
        match wal.read(loc.pos) {
            Ok(record) => self.value_of(key, &loc, &record, range),
            Err(error) => Err(self.read_failed(error)),
        }
    }

    /// [`Partition::get`] if the value's bytes are all in the page cache:
    /// never waits for the disk, so an async caller may call it in place.
    /// `Ok(None)`: call `get` from a blocking thread. Same checks, same
    /// errors.
    pub fn get_cached(&self, key: &[u8], range: Option<Range<u64>>) -> Result<Option<Bytes>> {
        let (wal, loc, range) = self.prepare_get(key, range)?;
        match wal.read_cached(loc.pos) {
            Ok(Some(record)) => self.value_of(key, &loc, &record, range).map(Some),
            Ok(None) => Ok(None),
            Err(error) => Err(self.read_failed(error)),
        }
    }

    fn prepare_get(&self, key: &[u8], range: Option<Range<u64>>) -> Result<(Arc<Wal>, BlobLoc, Range<u64>)> {
        self.refuse_unless_serving()?;
        let (wal, loc) = self.locate(key)?;
        let len = loc.value_len();
        let range = range.unwrap_or(0..len);
        if range.start > range.end || range.end > len {
            return Err(Error::BadRange { start: range.start, end: range.end, len });
        }
        Ok((wal, loc, range))
    }

    /// The wanted bytes of a record the WAL has read and verified.
    fn value_of(&self, key: &[u8], loc: &BlobLoc, record: &Bytes, range: Range<u64>) -> Result<Bytes> {
        // The WAL verified the checksum, LSN and owner; check that the
        // record really is this key's put, so an index bug can never serve
        // another key's bytes.
        match blob::decode(record) {
            Some(BlobOp::Put { key: stored, value_offset, .. }) if stored == key => {
                let start = value_offset + range.start as usize;
                let end = value_offset + range.end as usize;
                record.get(start..end).map(|_| record.slice(start..end)).ok_or(Error::NotFound)
            }
            _ => {
                let fault = Fault {
                    cause: FaultCause::Corruption,
                    op: "read".into(),
                    errno: None,
                    message: format!("record at LSN {} is not the put of this key", loc.pos.lsn),
                    at: SystemTime::now(),
                };
                self.fail(fault.clone());
                Err(Error::Faulted { partition: self.options.id, fault })
            }
        }
    }

    /// The length of the value under `key` (no disk access).
    pub fn len_of(&self, key: &[u8]) -> Result<u64> {
        self.refuse_unless_serving()?;
        Ok(self.locate(key)?.1.value_len())
    }

    fn locate(&self, key: &[u8]) -> Result<(Arc<Wal>, BlobLoc)> {
        let inner = self.read();
        let Some(Entry::Live(loc)) = inner.index.entries.get(key) else { return Err(Error::NotFound) };
        let store = inner.store(loc).ok_or(Error::Loading(self.options.id))?;
        Ok((store, *loc))
    }

    /// Counts a failed read; corruption faults at once, other errors past
    /// the tolerance.
    pub(crate) fn read_failed(&self, error: datanode_wal::Error) -> Error {
        let fault = wal_fault(&error);
        if fault.cause == FaultCause::Corruption {
            self.fail(fault);
            return Error::Read(error);
        }
        let errors = self.read_errors.fetch_add(1, Ordering::AcqRel) + 1;
        if errors > self.options.read_error_tolerance {
            self.fail(Fault { cause: FaultCause::ReadErrors, ..fault });
        } else {
            self.count_io_error(&fault);
            self.health.note_error(fault);
        }
        Error::Read(error)
    }

    /// Up to `limit` live keys starting with `prefix`, after `after`, in
    /// order; the second value is the key to continue after, if more remain.
    pub fn list(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<(Vec<Bytes>, Option<Bytes>)> {
        self.refuse_unless_serving()?;
        let inner = self.read();
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let mut keys = Vec::new();
        let live = inner
            .index
            .entries
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(|(key, _)| key.as_bytes().starts_with(prefix))
            .filter(|(_, entry)| matches!(entry, Entry::Live(_)));
        for (key, _) in live {
            if keys.len() == limit {
                let next = keys.last().cloned();
                return Ok((keys, next));
            }
            keys.push(key.to_bytes());
        }
        Ok((keys, None))
    }

    /// Reopens the log from disk, replays and verifies it; on success the
    /// fault record is removed and the partition serves again. Blocking.
    pub fn recover(&self) -> Result<()> {
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        self.close_wal();
        match self.load() {
            Ok(()) => {
                if let Err(error) = fault_file::clear(self.storage.as_ref(), &self.options.dir) {
                    // A fault we cannot clear would come back at restart.
                    let fault = io_fault("recover", &error);
                    self.close_wal();
                    self.health.note_error(fault.clone());
                    return Err(Error::RecoverFailed(fault));
                }
                self.health.recovered();
                Ok(())
            }
            Err(fault) => {
                self.health.note_error(fault.clone());
                Err(Error::RecoverFailed(fault))
            }
        }
    }

    /// After a full disk: reopens the log (recovery zeroes the torn bytes of
    /// the failed write) and, if that works, lifts `disk_full`. Blocking.
    /// Returns whether writes are allowed again.
    pub fn retry_after_disk_full(&self) -> bool {
        if !self.health.has_reason(ReadOnlyReason::DiskFull) || matches!(self.health.state(), State::Faulted(_)) {
            return false;
        }
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        self.close_wal();
        match self.load() {
            Ok(()) => {
                self.health.clear_reason(ReadOnlyReason::DiskFull);
                true
            }
            Err(fault) if fault.errno.is_some_and(is_disk_full_errno) => {
                self.health.note_error(fault);
                false
            }
            Err(fault) => {
                self.fail(fault);
                false
            }
        }
    }

    /// The disk under this partition was declared faulted: `faulted`, not
    /// written to `FAULT` (the disk may not take a write, and a hung one
    /// would hang the probe); the registry's fault journal on the other
    /// disks keeps it sticky.
    pub(crate) fn fault_from_disk(&self, fault: Fault) {
        self.health.fault(fault);
    }

    /// Sets or clears a read-only reason that comes from the disk.
    pub(crate) fn set_reason(&self, reason: ReadOnlyReason, on: bool) {
        if on {
            self.health.add_reason(reason);
        } else {
            self.health.clear_reason(reason);
        }
    }

    /// Sets or clears the operator's read-only reason.
    pub fn set_operator_read_only(&self, read_only: bool) {
        self.set_reason(ReadOnlyReason::Operator, read_only);
    }

    /// Sizes and log positions.
    pub fn stats(&self) -> PartitionStats {
        let inner = self.read();
        let (first_lsn, last_lsn, durable_lsn, wal) = match &inner.wal {
            Some(wal) => (wal.first_lsn(), wal.last_lsn(), wal.durable_lsn(), wal.stats()),
            None => (0, 0, 0, WalStats::default()),
        };
        PartitionStats {
            blobs: inner.index.blobs,
            live_bytes: inner.index.live_bytes,
            first_lsn,
            last_lsn,
            durable_lsn,
            wal,
        }
    }

    /// The log.
    pub(crate) fn log(&self) -> Result<Arc<Wal>> {
        self.read().wal.clone().ok_or(Error::Loading(self.options.id))
    }

    /// Bytes used by the log and the compacted stores.
    pub(crate) fn stored_bytes(&self) -> u64 {
        let inner = self.read();
        inner.wal.iter().chain(inner.stores.values()).map(|store| store.stats().log_bytes).sum()
    }

    /// Live blobs whose latest write is at or below `covers`, with their
    /// stores, in store order (so a copy reads each store front to back).
    pub(crate) fn live_up_to(&self, covers: Lsn) -> Result<Vec<(Bytes, BlobLoc, Arc<Wal>)>> {
        let inner = self.read();
        let mut moving = Vec::new();
        for (key, loc) in inner.index.live().filter(|(_, loc)| loc.lsn <= covers) {
            let store = inner.store(loc).ok_or(Error::Loading(self.options.id))?;
            moving.push((key.to_bytes(), *loc, store));
        }
        moving.sort_by_key(|(_, loc, _)| (loc.store, loc.pos.segment_id, loc.pos.offset));
        Ok(moving)
    }

    /// Brings compacted store `generation` into use.
    pub(crate) fn add_store(&self, generation: u32, store: Arc<Wal>) {
        self.write().stores.insert(generation, store);
    }

    /// Repoints keys moved by compaction, each only if it did not change.
    pub(crate) fn relocate(&self, moved: &[(Bytes, BlobLoc, BlobLoc)]) {
        let mut inner = self.write();
        for (key, old, new) in moved {
            inner.index.relocate(key, *old, *new);
        }
    }

    /// Drops compacted stores other than `keep` that no entry refers to.
    pub(crate) fn retire_stores_except(&self, keep: u32) {
        let mut inner = self.write();
        let referenced: std::collections::BTreeSet<u32> = inner.index.live().map(|(_, loc)| loc.store).collect();
        inner.stores.retain(|generation, _| *generation == keep || referenced.contains(generation));
    }

    /// Drains and closes the log (joins its writer). Blocking.
    pub fn close(&self) {
        self.close_wal();
    }

    fn close_wal(&self) {
        let (wal, stores) = {
            let mut inner = self.write();
            (inner.wal.take(), std::mem::take(&mut inner.stores))
        };
        // Stopped through the shared handle: a read in flight may still
        // hold it, but no writer may outlive this call, so the directory
        // can be reopened at once.
        for log in wal.iter().chain(stores.values()) {
            if let Err(error) = log.stop() {
                tracing::debug!(partition = self.options.id, %error, "closing a poisoned WAL");
            }
        }
    }
}

/// A snapshot image being streamed; see [`Partition::export`].
#[derive(Debug)]
pub struct Export {
    entries: std::vec::IntoIter<(Bytes, Arc<Wal>, BlobLoc)>,
    writer: Option<ImageWriter>,
    header: Option<Bytes>,
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

fn is_disk_full_errno(errno: i32) -> bool {
    matches!(errno, libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
}

/// Classifies a WAL error by its kind and errno, never by its message.
pub(crate) fn wal_fault(error: &datanode_wal::Error) -> Fault {
    let cause = match error {
        datanode_wal::Error::Corruption { .. } => FaultCause::Corruption,
        datanode_wal::Error::Closed => FaultCause::WriterDied,
        _ => FaultCause::Io,
    };
    let op = error.op().map_or("open", |op| op.as_str()).to_string();
    Fault { cause, op, errno: error.errno(), message: error.to_string(), at: SystemTime::now() }
}

pub(crate) fn io_fault(op: &str, error: &std::io::Error) -> Fault {
    Fault {
        cause: FaultCause::Io,
        op: op.to_string(),
        errno: error.raw_os_error(),
        message: error.to_string(),
        at: SystemTime::now(),
    }
}

/// Feeds the WAL's events into the contract metrics.
struct WalMetrics {
    partition: String,
    disk: String,
}

impl WalMetrics {
    fn new(partition: u64, disk: &str) -> WalMetrics {
        WalMetrics { partition: partition.to_string(), disk: disk.to_string() }
    }
}

impl WalObserver for WalMetrics {
    fn batch_written(&self, records: usize, bytes: usize) {
        metrics::counter!("datanode_wal_appends_total", "partition" => self.partition.clone())
            .increment(records as u64);
        metrics::counter!("datanode_wal_append_bytes_total", "partition" => self.partition.clone())
            .increment(bytes as u64);
        metrics::histogram!("datanode_wal_batch_records").record(records as f64);
    }

    fn synced(&self, elapsed: Duration, _ok: bool) {
        metrics::counter!("datanode_wal_syncs_total", "partition" => self.partition.clone()).increment(1);
        metrics::histogram!("datanode_wal_sync_seconds", "disk" => self.disk.clone()).record(elapsed.as_secs_f64());
    }
}
