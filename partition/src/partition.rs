//! One data partition: a blob store whose data lives in its own WAL, an
//! in-memory index rebuilt from the log on open, and its health.
//!
//! Every error is confined here: an I/O error on this partition's log
//! faults this partition (and writes the sticky fault record), a full disk
//! makes it read-only, and nothing propagates as a panic.
//!
//! **Writes settle on the log's writer thread.** A put or delete hands the
//! WAL a closure that runs once its record is settled: it applies the
//! record to the index when it is durable, or turns the failure into this
//! partition's state change. So what the node serves never depends on
//! whether the caller was still waiting (a request that timed out), and
//! the index follows the log's order. The caller's future only maps the
//! outcome to an answer.
//!
//! **Replacing or closing the log fences the writes first** (install,
//! recover, the retry after a full disk, close): new writes are refused
//! as not attempted, and every write already under way is settled before
//! the log is touched, so no write is lost to a log being swapped and no
//! old log position lands in a new index.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use datanode_wal::{Appended, Durability, Lsn, RecordPos, Storage, Wal, WalOptions, WalStats};

use crate::blob::{self, BlobOp};
use crate::error::{Error, Result};
use crate::fault_file;
use crate::grace::Grace;
use crate::index::{BlobLoc, Entry, Index, LOG_STORE};
use crate::manifest::{Manifest, compacted_generation};
use crate::state::{Fault, FaultCause, FaultSource, Health, ReadOnlyReason, State};
use crate::wal_metrics::WalMetrics;

/// How often a read that raced a compaction looks its key up again.
const RELOCATED_READ_RETRIES: usize = 3;

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
    /// Bumped whenever the log is replaced: a write settled on an older log
    /// never touches this index.
    pub generation: u64,
}

impl Inner {
    /// The store holding `loc`.
    pub fn store(&self, loc: &BlobLoc) -> Option<Arc<Wal>> {
        if loc.store == LOG_STORE { self.wal.clone() } else { self.stores.get(&loc.store).cloned() }
    }
}

/// Why writes are held back from the log, and what they are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fence {
    /// A snapshot is being installed: read-only (`snapshot_install`).
    Install,
    /// The log is being reopened from disk (recover, after a full disk).
    Reload,
    /// The partition is closed (shutdown or delete).
    Closed,
}

/// Which writes a partition is asked to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// A put (or anything that adds data): only when healthy.
    Any,
    /// A delete: also when read-only only for a full disk.
    Delete,
}

/// Holds a fence up; lifts it when dropped (a closed partition stays closed).
pub(crate) struct FenceGuard<'a> {
    partition: &'a Partition,
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        let mut intake = self.partition.intake();
        if *intake != Some(Fence::Closed) {
            *intake = None;
        }
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
    /// Payload bytes of writes accepted and not settled yet (queued, or
    /// being written and synced): 0 once every write is settled.
    pub queued_bytes: u64,
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
    /// compaction, recover, reload, close): one at a time.
    pub(crate) maintenance: Mutex<()>,
    /// Puts and deletes are registered here until they are settled, so a
    /// fence or a compaction can wait for every one under way.
    pub(crate) grace: Arc<Grace>,
    /// Set while writes are held back from the log.
    intake: Mutex<Option<Fence>>,
    /// One writer of the `FAULT` file at a time.
    fault_record: Mutex<()>,
    /// Exports streaming right now: compaction leaves what they read in
    /// place until they end.
    pub(crate) exports: Arc<AtomicUsize>,
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
                partition.fault(fault, FaultSource::Record);
            }
            Ok(None) => match partition.load() {
                Ok(()) => partition.health.loaded(),
                Err(fault) => partition.fault(fault, FaultSource::Operation),
            },
            Err(error) => partition.fault(Fault::io("open", &error), FaultSource::Operation),
        }
        partition
    }

    /// A partition that cannot even be identified safely (its `PARTITION`
    /// file is unreadable): registered faulted with `fault`, without
    /// touching its log; `recover` loads it once the disk reads again.
    pub fn open_faulted(storage: Arc<dyn Storage>, options: PartitionOptions, fault: Fault) -> Partition {
        let partition = Partition::unloaded(storage, options);
        partition.fault(fault, FaultSource::Operation);
        partition
    }

    fn unloaded(storage: Arc<dyn Storage>, mut options: PartitionOptions) -> Partition {
        options.wal.log_id = options.id;
        options.wal.observer = Some(Arc::new(WalMetrics::new(options.id, &options.disk)));
        // Counters exist at 0 from the start, so `increase()` sees the first.
        for result in ["ok", "failed", "skipped"] {
            metrics::counter!("datanode_compactions_total", "partition" => options.id.to_string(), "result" => result)
                .increment(0);
        }
        metrics::counter!("datanode_compaction_bytes_total", "disk" => options.disk.clone()).increment(0);
        Partition {
            health: Health::new(options.id, &options.disk),
            options,
            storage,
            inner: RwLock::new(Inner::default()),
            read_errors: AtomicU32::new(0),
            maintenance: Mutex::new(()),
            grace: Arc::new(Grace::default()),
            intake: Mutex::new(None),
            fault_record: Mutex::new(()),
            exports: Arc::new(AtomicUsize::new(0)),
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
    /// directories that the durable `CURRENT` provably superseded.
    ///
    /// What `CURRENT` names must exist: a missing log is a fault, never a
    /// new empty log. Without `CURRENT` the partition is new (its log is
    /// created) or from before the file existed (its `wal` is opened); either
    /// way `CURRENT` is written, so a log lost later is noticed.
    pub(crate) fn load(&self) -> Result<(), Fault> {
        let current = Manifest::read(self.storage.as_ref(), &self.options.dir)?;
        let manifest = current.clone().unwrap_or_default();
        let mut index = Index::default();
        let mut stores = BTreeMap::new();
        let mut covers = 0;
        if let Some(compacted) = &manifest.compacted {
            let generation = compacted_generation(&compacted.name).unwrap_or(1) as u32;
            let store = self.open_store(&compacted.name, compacted.synced, true)?;
            index.replay(&store, generation, 0)?;
            stores.insert(generation, Arc::new(store));
            covers = compacted.covers;
        }
        let wal = self.open_log(&manifest.log, manifest.log_synced, current.is_some())?;
        if current.is_none() {
            manifest.write(self.storage.as_ref(), &self.options.dir).map_err(|e| Fault::io("open", &e))?;
        }
        index.replay(&wal, LOG_STORE, covers)?;
        {
            let mut inner = self.write();
            let generation = inner.generation + 1;
            *inner = Inner { wal: Some(Arc::new(wal)), stores, index, generation };
        }
        self.read_errors.store(0, Ordering::Release);
        // Only a `CURRENT` that was read proves anything superseded.
        if let Some(current) = current {
            self.remove_superseded(&current);
        }
        Ok(())
    }

    /// Opens the log directory `name`, every record up to `synced` known
    /// durable; with `must_exist`, a directory without a log is a fault.
    pub(crate) fn open_log(&self, name: &str, synced: Lsn, must_exist: bool) -> Result<Wal, Fault> {
        let options =
            WalOptions { known_durable_lsn: synced, create_if_missing: !must_exist, ..self.options.wal.clone() };
        Wal::open(Arc::clone(&self.storage), self.options.dir.join(name), options).map_err(|e| Fault::from_wal(&e))
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

    /// Opens the compacted store `name`, every record up to `synced` known
    /// durable; with `must_exist`, a directory without a log is a fault.
    pub(crate) fn open_store(&self, name: &str, synced: Lsn, must_exist: bool) -> Result<Wal, Fault> {
        let options = WalOptions { known_durable_lsn: synced, create_if_missing: !must_exist, ..self.bulk_options() };
        Wal::open(Arc::clone(&self.storage), self.options.dir.join(name), options).map_err(|e| Fault::from_wal(&e))
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

    /// Faults the partition: the one way it happens. What else is done is
    /// decided by `source` (see [`FaultSource`]): an operation's fault is
    /// counted as an I/O error and written to the sticky `FAULT` record
    /// (best effort: the disk may be what failed); only the first fault is
    /// counted and recorded, later ones become the last error.
    ///
    /// Blocking when it records: never call it on an async worker.
    pub(crate) fn fault(&self, fault: Fault, source: FaultSource) {
        let counted = fault.clone();
        let first = self.health.fault(fault);
        if !first {
            return;
        }
        if source.counts_as_io_error() {
            self.count_io_error(&counted);
        }
        if source.is_recorded() {
            self.record_fault();
        }
    }

    /// [`Partition::fault`] for a caller that may be an async worker: the
    /// state changes at once, the `FAULT` record is written by a thread of
    /// its own.
    fn fault_recorded_later(self: &Arc<Self>, fault: Fault) {
        let counted = fault.clone();
        if !self.health.fault(fault) {
            return;
        }
        self.count_io_error(&counted);
        let partition = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("fault-{}", self.options.id))
            .spawn(move || partition.record_fault());
        if let Err(error) = spawned {
            tracing::error!(partition = self.options.id, %error, "cannot start writing the fault record");
        }
    }

    /// Writes the partition's first fault to `FAULT`, one writer at a time,
    /// unless a recover cleared it meanwhile.
    fn record_fault(&self) {
        let _one_writer = self.fault_record.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(fault) = self.health.fault_cause() else { return };
        if let Err(error) = fault_file::write(self.storage.as_ref(), &self.options.dir, &fault) {
            tracing::error!(
                partition = self.options.id,
                disk = self.options.disk,
                errno = error.raw_os_error(),
                %error,
                "cannot persist fault record"
            );
        }
    }

    /// Removes `FAULT` and marks the partition recovered, as one step with
    /// respect to [`Partition::record_fault`].
    pub(crate) fn clear_fault(&self) -> std::io::Result<()> {
        let _one_writer = self.fault_record.lock().unwrap_or_else(PoisonError::into_inner);
        fault_file::clear(self.storage.as_ref(), &self.options.dir)?;
        self.health.recovered();
        Ok(())
    }

    /// An I/O error that does not (yet) fault the partition: counted and
    /// shown as its last error.
    pub(crate) fn note_io_error(&self, fault: Fault) {
        self.count_io_error(&fault);
        self.health.note_error(fault);
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

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn intake(&self) -> MutexGuard<'_, Option<Fence>> {
        self.intake.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds new writes back (they are refused as not attempted) and waits
    /// until every write already under way is settled. Callers hold the
    /// maintenance lock. `None` when the partition is closed.
    pub(crate) fn fence(&self, fence: Fence) -> Option<FenceGuard<'_>> {
        {
            let mut intake = self.intake();
            if *intake == Some(Fence::Closed) {
                return None;
            }
            *intake = Some(fence);
        }
        // Every write checks the fence after registering, so the writes
        // this waits for are all the ones that got past it.
        self.grace.wait();
        Some(FenceGuard { partition: self })
    }

    fn refuse_unless_serving(&self) -> Result<()> {
        match self.health.state() {
            State::Loading => Err(Error::Loading(self.options.id)),
            State::Faulted(fault) => Err(Error::Faulted { partition: self.options.id, fault }),
            State::Healthy | State::ReadOnly(_) => Ok(()),
        }
    }

    /// The log and its generation, if the partition takes writes (it is
    /// healthy and no fence is up).
    pub(crate) fn writable_log(&self) -> Result<(Arc<Wal>, u64)> {
        self.log_for(Write::Any)
    }

    /// The log and its generation, if the partition takes this kind of
    /// write now.
    fn log_for(&self, write: Write) -> Result<(Arc<Wal>, u64)> {
        let id = self.options.id;
        match *self.intake() {
            Some(Fence::Install) => {
                return Err(Error::ReadOnly { partition: id, reasons: [ReadOnlyReason::SnapshotInstall].into() });
            }
            Some(Fence::Reload) => return Err(Error::Unavailable { partition: id, reason: "reopening its log" }),
            Some(Fence::Closed) => return Err(Error::Unavailable { partition: id, reason: "closed" }),
            None => {}
        }
        let writable = |reasons: &std::collections::BTreeSet<ReadOnlyReason>| {
            reasons.is_empty() || (write == Write::Delete && reasons.iter().all(|r| *r == ReadOnlyReason::DiskFull))
        };
        match self.health.state() {
            State::Healthy => self.current_log(),
            State::ReadOnly(reasons) if writable(&reasons) => self.current_log(),
            State::ReadOnly(reasons) => Err(Error::ReadOnly { partition: id, reasons }),
            State::Loading => Err(Error::Loading(id)),
            State::Faulted(fault) => Err(Error::Faulted { partition: id, fault }),
        }
    }

    fn current_log(&self) -> Result<(Arc<Wal>, u64)> {
        let inner = self.read();
        let wal = inner.wal.clone().ok_or(Error::Loading(self.options.id))?;
        Ok((wal, inner.generation))
    }

    /// Stores `value` under `key`; returns once durable.
    ///
    /// Cancel-safe: once the record is queued, dropping the future does
    /// not take it back, and if it becomes durable it is indexed all the
    /// same, so what the node serves afterwards is what it serves after a
    /// restart.
    pub async fn put(self: &Arc<Self>, key: &[u8], value: &[u8]) -> Result<PutAck> {
        blob::check_key(key).map_err(Error::BadRequest)?;
        if value.len() > self.options.max_blob_size {
            return Err(Error::BadRequest(format!(
                "value of {} bytes exceeds {}",
                value.len(),
                self.options.max_blob_size
            )));
        }
        let value_len = value.len();
        let value_offset = blob::put_value_offset(key.len()) as u32;
        let pos = self
            .append(Write::Any, key, blob::encode_put(key, value), move |pos| {
                Entry::Live(BlobLoc { store: LOG_STORE, pos, value_offset, lsn: pos.lsn })
            })
            .await?;
        Ok(PutAck { lsn: pos.lsn, size: value_len as u64 })
    }

    /// Deletes `key` durably. `NotFound` if there is no live blob.
    /// Cancel-safe like [`Partition::put`]. Accepted on a partition that is
    /// read-only only because its disk is full, so that an operator can free
    /// space (a tombstone is small, and the disk keeps headroom under its
    /// full ratio).
    pub async fn delete(self: &Arc<Self>, key: &[u8]) -> Result<Lsn> {
        blob::check_key(key).map_err(Error::BadRequest)?;
        self.log_for(Write::Delete)?;
        if !matches!(self.read().index.entries.get(key), Some(Entry::Live(_))) {
            return Err(Error::NotFound);
        }
        let pos = self.append(Write::Delete, key, blob::encode_delete(key), |pos| Entry::Deleted(pos.lsn)).await?;
        Ok(pos.lsn)
    }

    /// Appends one record for `key`. Once it is settled, on the log's
    /// writer thread, the entry `entry` makes of its position is applied to
    /// the index (if it is durable), or the failure changes the partition's
    /// state; then the caller hears of it.
    async fn append(
        self: &Arc<Self>,
        write: Write,
        key: &[u8],
        record: Bytes,
        entry: impl FnOnce(RecordPos) -> Entry + Send + 'static,
    ) -> Result<RecordPos> {
        let registered = self.grace.enter();
        let (wal, generation) = self.log_for(write)?;
        let partition = Arc::clone(self);
        let key = Bytes::copy_from_slice(key);
        let settled = move |result: &datanode_wal::Result<Appended>| {
            match result {
                Ok(appended) => {
                    if let Some(pos) = appended.positions.first() {
                        partition.apply(generation, &key, entry(*pos));
                    }
                }
                Err(error) => partition.write_failed(error),
            }
            // Settled: a fence or compaction waiting for it may go on.
            drop(registered);
        };
        match wal.append_then(vec![record], settled).await {
            Ok(appended) => appended.positions.first().copied().ok_or(Error::Unavailable {
                partition: self.options.id,
                reason: "the log answered an append without a position",
            }),
            Err(error) => Err(self.write_refusal(error)),
        }
    }

    /// Applies a durable write to the index, unless the log it was written
    /// to has been replaced since.
    fn apply(&self, generation: u64, key: &[u8], entry: Entry) {
        let mut inner = self.write();
        if inner.generation == generation {
            inner.index.apply(key, entry);
        }
    }

    /// What a failed write does to the partition; runs once per write, on
    /// the writer thread (or the caller's, for a write refused before it
    /// was queued).
    fn write_failed(self: &Arc<Self>, error: &datanode_wal::Error) {
        match error {
            datanode_wal::Error::RecordTooLarge { .. } | datanode_wal::Error::Invalid(_) => {}
            error if error.is_disk_full() && !error.outcome_unknown() => {
                // The log discarded the batch durably (or never wrote it):
                // nothing of it is on disk, so read-only tells the truth.
                if !self.health.has_reason(ReadOnlyReason::DiskFull) {
                    self.note_io_error(Fault::from_wal(error));
                }
                self.health.add_reason(ReadOnlyReason::DiskFull);
            }
            datanode_wal::Error::Closed if *self.intake() == Some(Fence::Closed) => {}
            error => {
                let fault = Fault::from_wal(error);
                if error.outcome_unknown() || self.health.fault_cause().is_some() {
                    // On the writer thread, or already recorded: no disk
                    // access on a caller's async worker.
                    self.fault(fault, FaultSource::Operation);
                } else {
                    // Possibly on an async worker, which must not wait for
                    // the disk (invariant 6): the state changes now, the
                    // record is written by a thread of its own.
                    self.fault_recorded_later(fault);
                }
            }
        }
    }

    /// The answer a failed write gets. Its effect on the partition was
    /// made when it settled ([`Partition::write_failed`]). An attempted
    /// write is `WriteOutcomeUnknown` whatever its errno, a full disk
    /// included: its bytes may be on disk. (A batch that failed for lack of
    /// space and that the log then discarded durably was not attempted.)
    fn write_refusal(&self, error: datanode_wal::Error) -> Error {
        let id = self.options.id;
        if let datanode_wal::Error::RecordTooLarge { len, max } = error {
            return Error::BadRequest(format!("record of {len} bytes exceeds {max}"));
        }
        if error.outcome_unknown() {
            return Error::WriteOutcomeUnknown(error);
        }
        if error.is_disk_full() {
            return Error::ReadOnly { partition: id, reasons: [ReadOnlyReason::DiskFull].into() };
        }
        match self.health.state() {
            State::Faulted(fault) => Error::Faulted { partition: id, fault },
            _ => Error::Faulted { partition: id, fault: Fault::from_wal(&error) },
        }
    }

    /// The value under `key`, or the `range` of it. Blocking (one `pread`):
    /// call it from a blocking-capable thread. Never returns bytes that fail
    /// their checksum.
    pub fn get(&self, key: &[u8], range: Option<Range<u64>>) -> Result<Bytes> {
        let mut attempt = 0;
        loop {
            let (wal, loc, range) = self.prepare_get(key, range.clone())?;
            match wal.read(loc.pos) {
                Ok(record) => return self.value_of(key, &loc, &record, range).map_err(|fault| self.bad_value(fault)),
                Err(datanode_wal::Error::LsnOutOfRange { .. })
                    if attempt < RELOCATED_READ_RETRIES && self.moved(key, &loc) =>
                {
                    // Compaction moved the blob and purged where it was.
                    attempt += 1;
                }
                Err(error) => return Err(self.read_failed(error)),
            }
        }
    }

    /// [`Partition::get`] if the value's bytes are all in the page cache:
    /// never waits for the disk, so an async caller may call it in place.
    /// `Ok(None)`: call `get` from a blocking thread, which also does what
    /// an error needs (faulting the partition writes to the disk).
    pub fn get_cached(&self, key: &[u8], range: Option<Range<u64>>) -> Result<Option<Bytes>> {
        let (wal, loc, range) = self.prepare_get(key, range)?;
        match wal.read_cached(loc.pos) {
            Ok(Some(record)) => Ok(self.value_of(key, &loc, &record, range).ok()),
            Ok(None) | Err(_) => Ok(None),
        }
    }

    fn prepare_get(&self, key: &[u8], range: Option<Range<u64>>) -> Result<(Arc<Wal>, BlobLoc, Range<u64>)> {
        blob::check_key(key).map_err(Error::BadRequest)?;
        self.refuse_unless_serving()?;
        let (wal, loc) = self.locate(key)?;
        let len = loc.value_len();
        let range = range.unwrap_or(0..len);
        if range.start > range.end || range.end > len {
            return Err(Error::BadRange { start: range.start, end: range.end, len });
        }
        Ok((wal, loc, range))
    }

    /// Whether `key` now lives somewhere other than `loc` (or nowhere).
    fn moved(&self, key: &[u8], loc: &BlobLoc) -> bool {
        !matches!(self.read().index.entries.get(key), Some(Entry::Live(now)) if now == loc)
    }

    /// The wanted bytes of a record the WAL has read and verified.
    fn value_of(&self, key: &[u8], loc: &BlobLoc, record: &Bytes, range: Range<u64>) -> Result<Bytes, Fault> {
        // The WAL verified the checksum, LSN and owner; check that the
        // record really is this key's put, so an index bug can never serve
        // another key's bytes.
        let not_this_key =
            || Fault::corruption("read", format!("record at LSN {} is not the put of this key", loc.pos.lsn));
        match blob::decode(record) {
            Some(BlobOp::Put { key: stored, value_offset, .. }) if stored == key => {
                let start = value_offset + range.start as usize;
                let end = value_offset + range.end as usize;
                record.get(start..end).map(|_| record.slice(start..end)).ok_or_else(not_this_key)
            }
            _ => Err(not_this_key()),
        }
    }

    fn bad_value(&self, fault: Fault) -> Error {
        self.fault(fault.clone(), FaultSource::Operation);
        Error::Faulted { partition: self.options.id, fault }
    }

    /// The length of the value under `key` (no disk access).
    pub fn len_of(&self, key: &[u8]) -> Result<u64> {
        blob::check_key(key).map_err(Error::BadRequest)?;
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
        let fault = Fault::from_wal(&error);
        if fault.cause == FaultCause::Corruption {
            self.fault(fault, FaultSource::Operation);
            return Error::Read(error);
        }
        if matches!(error, datanode_wal::Error::LsnOutOfRange { .. }) {
            // Not the disk's doing: the index and the log disagree.
            return Error::Read(error);
        }
        let errors = self.read_errors.fetch_add(1, Ordering::AcqRel) + 1;
        if errors > self.options.read_error_tolerance {
            self.fault(Fault { cause: FaultCause::ReadErrors, ..fault }, FaultSource::Operation);
        } else {
            self.note_io_error(fault);
        }
        Error::Read(error)
    }

    /// Up to `limit` live keys starting with `prefix`, after `after`, in
    /// order; the second value is the key to continue after, if more remain.
    pub fn list(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<(Vec<Bytes>, Option<Bytes>)> {
        self.refuse_unless_serving()?;
        Ok(self.read().index.list(prefix, after, limit))
    }

    /// Reopens the log from disk, replays and verifies it; on success the
    /// fault record is removed and the partition serves again. Blocking.
    /// Writes under way are settled first; new ones are refused meanwhile.
    pub fn recover(&self) -> Result<()> {
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(_fenced) = self.fence(Fence::Reload) else {
            return Err(Error::Unavailable { partition: self.options.id, reason: "closed" });
        };
        self.close_wal();
        match self.load() {
            Ok(()) => {
                if let Err(error) = self.clear_fault() {
                    // A fault we cannot clear would come back at restart.
                    let fault = Fault::io("recover", &error);
                    self.close_wal();
                    self.health.note_error(fault.clone());
                    return Err(Error::RecoverFailed(fault));
                }
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
        let Some(_fenced) = self.fence(Fence::Reload) else { return false };
        match self.reload_keeping_reads() {
            Ok(()) => {
                self.health.clear_reason(ReadOnlyReason::DiskFull);
                true
            }
            Err(fault) if fault.is_disk_full() => {
                self.health.note_error(fault);
                false
            }
            Err(fault) => {
                self.fault(fault, FaultSource::Operation);
                false
            }
        }
    }

    /// On a full disk: if a write that ran out of space poisoned the log,
    /// reopens it (the reason stays), so that deletes can free space.
    /// Blocking. Called by the disk's probe.
    pub fn reopen_poisoned_log(&self) {
        let poisoned = self.read().wal.as_ref().is_some_and(|wal| wal.poisoned().is_some());
        if !poisoned || !self.health.has_reason(ReadOnlyReason::DiskFull) {
            return;
        }
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(self.health.state(), State::Faulted(_)) {
            return;
        }
        let Some(_fenced) = self.fence(Fence::Reload) else { return };
        if let Err(fault) = self.reload_keeping_reads() {
            if fault.is_disk_full() {
                self.health.note_error(fault);
            } else {
                self.fault(fault, FaultSource::Operation);
            }
        }
    }

    /// Reopens the log from disk while reads go on from the old one: its
    /// writer is stopped (no two writers in one directory), its files stay
    /// readable, and it is replaced only if the new one loads. A read-only
    /// partition keeps serving reads whether the reopen works or not.
    /// Callers hold the maintenance lock and a fence.
    fn reload_keeping_reads(&self) -> Result<(), Fault> {
        let old: Vec<Arc<Wal>> = {
            let inner = self.read();
            inner.wal.iter().chain(inner.stores.values()).cloned().collect()
        };
        for log in &old {
            if let Err(error) = log.stop() {
                tracing::debug!(partition = self.options.id, %error, "stopping a poisoned WAL");
            }
        }
        self.load()
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
        let (first_lsn, last_lsn, durable_lsn, wal, queued_bytes) = match &inner.wal {
            Some(wal) => (wal.first_lsn(), wal.last_lsn(), wal.durable_lsn(), wal.stats(), wal.queued_bytes() as u64),
            None => (0, 0, 0, WalStats::default(), 0),
        };
        PartitionStats {
            blobs: inner.index.blobs,
            live_bytes: inner.index.live_bytes,
            first_lsn,
            last_lsn,
            durable_lsn,
            wal,
            queued_bytes,
        }
    }

    /// Bytes used by the log and the compacted stores.
    pub fn stored_bytes(&self) -> u64 {
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

    /// Refuses new writes, settles the ones under way, drains and closes
    /// the log (joins its writer). Blocking. The partition stays closed.
    pub fn close(&self) {
        let _one_at_a_time = self.maintenance.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fenced) = self.fence(Fence::Closed) {
            std::mem::forget(fenced);
        }
        self.close_wal();
    }

    /// Stops the log and the compacted stores. Callers hold the
    /// maintenance lock and a fence, so no write is under way.
    pub(crate) fn close_wal(&self) {
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

    /// Swaps in a freshly loaded log and index (an install), retiring the
    /// old ones; returns the old logs, to be stopped by the caller.
    pub(crate) fn replace_contents(&self, wal: Wal, index: Index) -> Vec<Arc<Wal>> {
        let old = {
            let mut inner = self.write();
            let generation = inner.generation + 1;
            std::mem::replace(
                &mut *inner,
                Inner { wal: Some(Arc::new(wal)), stores: BTreeMap::new(), index, generation },
            )
        };
        self.read_errors.store(0, Ordering::Release);
        old.wal.into_iter().chain(old.stores.into_values()).collect()
    }
}
