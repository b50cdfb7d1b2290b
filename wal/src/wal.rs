//! The public handle of one log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, TryLockError};

use bytes::Bytes;
use tokio::sync::{Semaphore, oneshot};

use crate::block_on::block_on;
use crate::engine::{Engine, Job, Next};
use crate::error::{Corruption, Error, IoOp, Result};
use crate::format::MAX_RECORD_LEN;
use crate::prepare::Preparer;
use crate::recovery;
use crate::segment::{self, DirEntry, SegmentMeta, SegmentTable};
use crate::storage::Storage;
use crate::writer::{AppendRequest, Counters, Queue, QueueTicket, Request, Settled, Shared, Writer, reply_error};
use crate::{Appended, Lsn, Record, RecordPos, WalOptions};

/// One write-ahead log in one directory. See the crate docs for the
/// durability and failure contracts.
pub struct Wal {
    shared: Arc<Shared>,
    preparer: Arc<Preparer>,
    task: Arc<LogTask>,
    engine: Engine,
    max_record: usize,
}

/// The engine job of one log: its writer, run by one worker at a time.
struct LogTask {
    scheduled: AtomicBool,
    shared: Arc<Shared>,
    writer: Mutex<Writer>,
}

impl Job for LogTask {
    fn run(&self) -> Next {
        let due = match self.writer.try_lock() {
            Ok(mut writer) => run_writer(&mut writer, &self.shared),
            // Another worker runs this log now (or is stuck in its sync):
            // it looks at the queue again when it is done.
            Err(TryLockError::WouldBlock) => return Next::Idle,
            Err(TryLockError::Poisoned(poisoned)) => run_writer(&mut poisoned.into_inner(), &self.shared),
        };
        if self.shared.has_work() { Next::Again } else { due.map_or(Next::Idle, Next::At) }
    }

    fn scheduled(&self) -> &AtomicBool {
        &self.scheduled
    }
}

/// Runs the writer's step; a panic in it (a bug) must not take the worker
/// or the process down: the log is poisoned and closed, so its partition
/// sees a dead writer and faults (invariant 5).
fn run_writer(writer: &mut Writer, shared: &Shared) -> Option<std::time::Instant> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.step())) {
        Ok(due) => due,
        Err(_) => {
            tracing::error!(dir = %shared.dir.display(), "WAL writer panicked: the log is closed");
            writer.abandon();
            None
        }
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.dir)
            .field("log_id", &self.shared.log_id)
            .field("last_lsn", &self.last_lsn())
            .field("durable_lsn", &self.durable_lsn())
            .finish()
    }
}

/// Counters since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Append calls acknowledged.
    pub appends: u64,
    /// Records written.
    pub records: u64,
    /// Payload bytes written.
    pub bytes: u64,
    /// Writes issued (one per group-commit batch).
    pub batches: u64,
    /// `fdatasync` calls issued.
    pub syncs: u64,
    /// Total time spent in those syncs, in nanoseconds.
    pub sync_nanos: u64,
    /// Live segment files.
    pub segments: u64,
    /// Bytes used by records in the live segments (headers included).
    pub log_bytes: u64,
    /// Segments started in a recycled file (a purged segment's) rather
    /// than in a pre-written or fresh one.
    pub recycled_segments: u64,
    /// Recycled spares kept for the next rolls.
    pub recycled_spares: u64,
}

impl Wal {
    /// Opens (creating if needed) the log in `dir` and recovers it.
    ///
    /// Blocking: reads every segment. A torn tail is zeroed and synced; any
    /// corruption is returned as [`Error::Corruption`] with nothing changed.
    pub fn open(storage: Arc<dyn Storage>, dir: impl Into<PathBuf>, options: WalOptions) -> Result<Wal> {
        let dir = dir.into();
        if options.segment_size < 4096 || options.max_batch_bytes == 0 || options.max_queued_bytes == 0 {
            return Err(Error::Invalid("segment_size must be >= 4096 and limits non-zero".into()));
        }
        let names = match storage.list_dir(&dir) {
            Ok(names) => names,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(Error::io(IoOp::Metadata, &dir, error)),
        };
        let marked = names.iter().any(|name| segment::classify(name) == DirEntry::Marker);
        let has_log = marked || names.iter().any(|name| matches!(segment::classify(name), DirEntry::Segment(_)));
        if !has_log && !options.create_if_missing {
            return Err(Error::Corruption { segment_id: 0, offset: 0, detail: Corruption::MissingLog });
        }
        create_dir_durably(storage.as_ref(), &dir)?;
        if !marked {
            // New, or made before the marker existed.
            write_marker(storage.as_ref(), &dir, options.log_id)?;
        }
        let recovered = recovery::recover(
            storage.as_ref(),
            &dir,
            options.log_id,
            options.known_durable_lsn,
            options.recycled_segments,
        )?;
        if recovered.torn_bytes > 0 {
            tracing::warn!(dir = %dir.display(), bytes = recovered.torn_bytes, "zeroed torn tail at open");
        }
        let holds_records = !recovered.segments.is_empty();
        // A log with no segment continues at the caller's `first_lsn`.
        let last_lsn = recovered.segments.last().map_or(options.first_lsn.max(1) - 1, |s| s.last_lsn);
        let mut table = SegmentTable::default();
        for meta in recovered.segments {
            table.segments.insert(meta.id, meta);
        }
        let queue_capacity = options.max_queued_bytes.min(Semaphore::MAX_PERMITS).min(u32::MAX as usize);
        let shared = Arc::new(Shared {
            log_id: options.log_id,
            dir: dir.clone(),
            queue: Mutex::new(Queue::default()),
            exited: Mutex::new(false),
            exit: Condvar::new(),
            space: Arc::new(Semaphore::new(queue_capacity)),
            queue_capacity,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            table: RwLock::new(table),
            last_lsn: AtomicU64::new(last_lsn),
            durable_lsn: AtomicU64::new(last_lsn),
            poisoned: AtomicBool::new(false),
            poison: Mutex::new(None),
            counters: Counters::default(),
        });
        // A log given no engine gets one of its own, of one thread.
        let engine = options.engine.clone().unwrap_or_else(|| Engine::new("wal", 1));
        // A log that holds nothing yet gets its first segment when it is
        // first written: an idle, empty log costs no segment on disk and
        // nothing to read at open.
        let prepare_ahead = options.prewrite_segments && holds_records && last_lsn > 0;
        let preparer = Arc::new(Preparer::start(
            Arc::clone(&storage),
            dir.clone(),
            options.segment_size,
            options.prewrite_segments,
            prepare_ahead,
            recovered.spare,
            recovered.recycled,
            recovered.next_segment_id,
            engine.clone(),
        ));
        let max_record = MAX_RECORD_LEN.min(options.max_queued_bytes);
        let writer =
            Writer::new(Arc::clone(&shared), storage, options, Arc::clone(&preparer), recovered.next_segment_id);
        let task = Arc::new(LogTask {
            scheduled: AtomicBool::new(false),
            shared: Arc::clone(&shared),
            writer: Mutex::new(writer),
        });
        Ok(Wal { shared, preparer, task, engine, max_record })
    }

    /// Appends `records` as one batch; returns their LSNs and positions
    /// once they are as durable as the log's [`crate::Durability`] says.
    ///
    /// Waits for queue space first (backpressure). An empty batch is refused.
    /// Dropping the future after the batch was queued does not take it
    /// back: it is still written (see [`Wal::append_then`]).
    pub async fn append(&self, records: Vec<Bytes>) -> Result<Appended> {
        self.append_inner(records, None).await
    }

    /// [`Wal::append`], and `then` runs with the outcome before the caller
    /// is answered: on the writer thread, in LSN order with the other
    /// appends, whether or not the caller still waits. So whatever must
    /// follow a durable append (an index update) happens even when the
    /// caller gave up, and happens before anyone hears of the append.
    ///
    /// `then` runs exactly once, except when the future is dropped while
    /// still waiting for queue space: then nothing was written and `then`
    /// is dropped uncalled. It must be quick and must not call into this
    /// log (the writer waits for it). An append refused before it was
    /// queued (poisoned, closed, too large) runs `then` on the caller's
    /// thread.
    pub async fn append_then(
        &self,
        records: Vec<Bytes>,
        then: impl FnOnce(&Result<Appended>) + Send + 'static,
    ) -> Result<Appended> {
        self.append_inner(records, Some(Box::new(then))).await
    }

    async fn append_inner(&self, records: Vec<Bytes>, then: Option<Settled>) -> Result<Appended> {
        let refused = |error: Error, then: Option<Settled>| {
            let result = Err(error);
            if let Some(then) = then {
                then(&result);
            }
            result
        };
        if records.is_empty() {
            return refused(Error::Invalid("empty append".into()), then);
        }
        let bytes: usize = records.iter().map(Bytes::len).sum();
        if let Some(len) = records.iter().map(Bytes::len).find(|len| *len > self.max_record) {
            return refused(Error::RecordTooLarge { len, max: self.max_record }, then);
        }
        if let Some(error) = self.shared.poison_error() {
            return refused(error, then);
        }
        // A request larger than the whole queue takes all of it and goes alone.
        let wanted = bytes.clamp(1, self.shared.queue_capacity) as u32;
        let permit = match Arc::clone(&self.shared.space).acquire_many_owned(wanted).await {
            Ok(permit) => permit,
            Err(_) => return refused(Error::Closed, then),
        };
        let (reply, answer) = oneshot::channel();
        let ticket = QueueTicket::new(permit, bytes, Arc::clone(&self.shared.queued_bytes));
        self.submit(Request::Append(AppendRequest { records, bytes, reply, ticket, then }))?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// [`Wal::append`] for plain threads: blocks until acknowledged.
    pub fn append_blocking(&self, records: Vec<Bytes>) -> Result<Appended> {
        block_on(self.append(records))
    }

    /// Makes every record written so far durable (a no-op under
    /// [`crate::Durability::Sync`], where that is always true).
    pub async fn sync(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Sync(reply))?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Removes every record after `lsn` durably (a divergent tail). Later
    /// appends continue at `lsn + 1`.
    pub async fn truncate_after(&self, lsn: Lsn) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::TruncateAfter(lsn, reply))?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Seals the active segment: it is synced and takes no more records, so
    /// the next append starts a new one. Returns the last LSN, durable now:
    /// `purge_before(lsn + 1)` can then remove every segment up to it whole
    /// (compaction uses it, so no covered record stays in an active
    /// segment).
    pub async fn seal(&self) -> Result<Lsn> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Seal(reply))?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Blocking twin of [`Wal::seal`].
    pub fn seal_blocking(&self) -> Result<Lsn> {
        block_on(self.seal())
    }

    /// Removes whole segments whose records are all below `lsn`. Records at
    /// or after `lsn` always stay; some below it may stay too. Returns the
    /// number of segments removed.
    pub async fn purge_before(&self, lsn: Lsn) -> Result<usize> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::PurgeBefore(lsn, reply))?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Blocking twin of [`Wal::sync`].
    pub fn sync_blocking(&self) -> Result<()> {
        block_on(self.sync())
    }

    /// Blocking twin of [`Wal::truncate_after`].
    pub fn truncate_after_blocking(&self, lsn: Lsn) -> Result<()> {
        block_on(self.truncate_after(lsn))
    }

    /// Blocking twin of [`Wal::purge_before`].
    pub fn purge_before_blocking(&self, lsn: Lsn) -> Result<usize> {
        block_on(self.purge_before(lsn))
    }

    fn submit(&self, request: Request) -> Result<()> {
        let mut queue = self.shared.queue();
        if queue.closing {
            drop(queue);
            reply_error(request, Error::Closed);
            return Err(Error::Closed);
        }
        queue.requests.push_back(request);
        drop(queue);
        self.schedule();
        Ok(())
    }

    /// Reads the record at `pos` (as returned by an append), verifying its
    /// checksum, LSN and owner. Blocking: one `pread`. A record the log no
    /// longer holds is [`Error::LsnOutOfRange`], also when it was purged or
    /// truncated while being read (its file may be recycled and written
    /// over meanwhile): only bytes the log still holds are corruption.
    pub fn read(&self, pos: RecordPos) -> Result<Bytes> {
        self.segment_of(pos)?.read_record(self.shared.log_id, pos).map_err(|e| self.unless_gone(pos, e))
    }

    /// [`Wal::read`] when the record's bytes are all in the page cache:
    /// never waits for the disk, so it may run on an async worker.
    /// `Ok(None)`: not cached (or the backend cannot tell); call `read`
    /// from a blocking thread. The bytes are verified exactly as by `read`.
    pub fn read_cached(&self, pos: RecordPos) -> Result<Option<Bytes>> {
        self.segment_of(pos)?.read_record_cached(self.shared.log_id, pos).map_err(|e| self.unless_gone(pos, e))
    }

    /// A record that fails its check because the log let go of it while it
    /// was being read is out of range, not corrupt: its segment was purged
    /// and the file recycled and written over by a later segment, or it was
    /// truncated away. Only what the log still holds can be corrupt.
    fn unless_gone(&self, pos: RecordPos, error: Error) -> Error {
        match error {
            Error::Corruption { .. } => match self.segment_of(pos) {
                Err(gone) => gone,
                Ok(_) => error,
            },
            other => other,
        }
    }

    fn segment_of(&self, pos: RecordPos) -> Result<SegmentMeta> {
        let segment = self.shared.table().segments.get(&pos.segment_id).cloned();
        let last = self.last_lsn();
        segment.filter(|s| pos.lsn >= s.first_lsn && pos.lsn <= s.last_lsn).ok_or_else(|| Error::LsnOutOfRange {
            lsn: pos.lsn,
            first: self.first_lsn(),
            last,
        })
    }

    /// Reads records from `lsn` on, in order, until about `max_bytes` of
    /// payload (always at least one record). Blocking.
    pub fn read_from(&self, lsn: Lsn, max_bytes: usize) -> Result<Vec<Record>> {
        let segments: Vec<_> = {
            let table = self.shared.table();
            table.segments.values().filter(|s| s.last_lsn >= lsn && !s.is_empty()).cloned().collect()
        };
        let (first, last) = (self.first_lsn(), self.last_lsn());
        if lsn < first || lsn > last {
            return Err(Error::LsnOutOfRange { lsn, first, last });
        }
        let mut records = Vec::new();
        for segment in segments {
            let taken: usize = records.iter().map(|r: &Record| r.data.len()).sum();
            if !records.is_empty() && taken >= max_bytes {
                break;
            }
            let from = lsn.max(segment.first_lsn);
            let read = segment.read_from(self.shared.log_id, from, max_bytes.saturating_sub(taken), &mut records);
            if let Err(error) = read {
                let failed = records.last().map_or(from, |r| r.lsn + 1).max(from);
                let pos = RecordPos { segment_id: segment.id, offset: 0, lsn: failed, len: 0 };
                return Err(self.unless_gone(pos, error));
            }
        }
        Ok(records)
    }

    /// The first LSN held (`last_lsn() + 1` when the log is empty).
    pub fn first_lsn(&self) -> Lsn {
        let table = self.shared.table();
        table.segments.values().find(|s| !s.is_empty()).map_or(self.last_lsn() + 1, |s| s.first_lsn)
    }

    /// The last LSN written (0 for a new, empty log).
    pub fn last_lsn(&self) -> Lsn {
        self.shared.last_lsn.load(Ordering::Acquire)
    }

    /// Every record up to this LSN is on stable storage.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// Payload bytes queued or being written, waiting for their answer.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Acquire)
    }

    /// The error that poisoned the log, if one did.
    pub fn poisoned(&self) -> Option<Error> {
        self.shared.poison_error()
    }

    /// The directory of this log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Counters and sizes.
    pub fn stats(&self) -> WalStats {
        let c = &self.shared.counters;
        let table = self.shared.table();
        WalStats {
            appends: c.appends.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            sync_nanos: c.sync_nanos.load(Ordering::Relaxed),
            segments: table.segments.len() as u64,
            log_bytes: table.segments.values().map(|s| s.end_offset).sum(),
            recycled_segments: c.recycled.load(Ordering::Relaxed),
            recycled_spares: self.preparer.recycled_count() as u64,
        }
    }

    /// Closes the log: refuses new calls, lets the writer finish everything
    /// queued, syncs, joins the writer and the preparer, then closes the
    /// files: when it returns none of them is open (the disk may be
    /// unmounted). Blocking. Returns the poisoning error if the log was
    /// poisoned.
    pub fn close(self) -> Result<()> {
        let result = self.stop();
        self.shared.drop_files();
        result
    }

    /// [`Wal::close`] through a shared reference: refuses new calls, drains,
    /// syncs and joins the writer and the preparer. Reads still work
    /// afterwards (the files stay open until the last handle is dropped), so
    /// a log can be stopped while readers hold it, and its directory
    /// reopened without two writers in it. Blocking.
    pub fn stop(&self) -> Result<()> {
        self.shutdown();
        match self.shared.poison_error() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn shutdown(&self) {
        self.shared.queue().closing = true;
        self.schedule();
        self.shared.wait_exited();
        self.shared.space.close();
        self.preparer.close();
    }

    fn schedule(&self) {
        let task: Arc<dyn Job> = Arc::clone(&self.task) as Arc<dyn Job>;
        self.engine.schedule(task);
    }
}

impl Drop for Wal {
    /// Dropping without [`Wal::close`] still drains and syncs, on the
    /// writer thread, without waiting for it.
    fn drop(&mut self) {
        self.shared.queue().closing = true;
        self.schedule();
        self.shared.space.close();
    }
}

/// Writes the `LOG` marker durably (file synced, then the directory).
fn write_marker(storage: &dyn Storage, dir: &Path, log_id: u64) -> Result<()> {
    let path = dir.join(segment::LOG_MARKER);
    let file = storage.open(&path, true).map_err(|e| Error::io(IoOp::Open, &path, e))?;
    file.write_all_and_sync(0, &[Bytes::from(format!("log_id={log_id}\n"))])
        .map_err(|(op, e)| Error::io(op, &path, e))?;
    storage.sync_dir(dir).map_err(|e| Error::io(IoOp::SyncDir, dir, e))
}

fn create_dir_durably(storage: &dyn Storage, dir: &Path) -> Result<()> {
    storage.create_dir_all(dir).map_err(|e| Error::io(IoOp::Metadata, dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        storage.sync_dir(parent).map_err(|e| Error::io(IoOp::SyncDir, parent, e))?;
    }
    Ok(())
}
