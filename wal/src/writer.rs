//! The writer: group commit, segment rolls, truncation and purge. It runs
//! on an engine worker whenever its log has work (`engine.rs`), one worker
//! at a time.
//!
//! Appends queue up in [`Shared::queue`] while the previous batch is being
//! written and synced; the writer then takes everything queued (up to
//! `max_batch_bytes`), sends it to the kernel as one vectored write, issues
//! one `fdatasync`, and answers every waiter. Batching comes from the sync
//! in flight, never from a deliberate delay.
//!
//! Control requests (sync, truncate, purge) go through the same queue, so
//! they are ordered with the appends around them and never race the writer.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::{Error, IoOp, Result};
use crate::format::{self, RecordHeader, SegmentHeader};
use crate::prepare::Preparer;
use crate::recovery::Recycled;
use crate::segment::{self, SegmentMeta, SegmentTable};
use crate::storage::{Storage, StorageFile};
use crate::{Appended, Durability, Lsn, RecordPos, WalOptions};

static PADDING: [u8; format::RECORD_ALIGN] = [0; format::RECORD_ALIGN];

/// When the zeroed space ahead of the tail falls under this, the next batch
/// extends it.
const ZEROED_LOW_WATER: u64 = 512 << 10;
/// How much a batch extends the zeroed window by.
const ZEROED_CHUNK: usize = 1 << 20;
/// Records at least this large (on average in a batch) gain nothing from
/// zeroed space: their batch writes no zeros, into plain space (the zeros
/// would double the bytes written for what one metadata update saves).
const LARGE_RECORD: u64 = 64 << 10;
static ZEROS: [u8; ZEROED_CHUNK] = [0; ZEROED_CHUNK];

/// What runs on the writer thread once an append is settled; see
/// [`crate::Wal::append_then`].
pub(crate) type Settled = Box<dyn FnOnce(&Result<Appended>) + Send>;

/// One caller's append, waiting in the queue.
pub(crate) struct AppendRequest {
    pub records: Vec<Bytes>,
    pub bytes: usize,
    pub reply: oneshot::Sender<Result<Appended>>,
    /// Queue space held until the request is answered or dropped.
    pub ticket: QueueTicket,
    /// Runs with the outcome before the caller is answered, whether or not
    /// the caller still waits.
    pub then: Option<Settled>,
}

impl AppendRequest {
    /// Runs the request's `then`, gives the queue space back, then answers
    /// the caller, so a caller that got its answer never still counts
    /// against the queue and always sees the effects of `then`.
    fn answer(self, result: Result<Appended>) {
        let AppendRequest { reply, ticket, then, .. } = self;
        if let Some(then) = then {
            then(&result);
        }
        drop(ticket);
        // The caller may have stopped waiting; nothing to do then.
        let _ = reply.send(result);
    }
}

/// Holds an append's share of the queue; gives it back when dropped.
pub(crate) struct QueueTicket {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    queued: Arc<AtomicUsize>,
}

impl QueueTicket {
    pub fn new(permit: OwnedSemaphorePermit, bytes: usize, queued: Arc<AtomicUsize>) -> QueueTicket {
        queued.fetch_add(bytes, Ordering::AcqRel);
        QueueTicket { _permit: permit, bytes, queued }
    }
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

pub(crate) enum Request {
    Append(AppendRequest),
    Sync(oneshot::Sender<Result<()>>),
    TruncateAfter(Lsn, oneshot::Sender<Result<()>>),
    PurgeBefore(Lsn, oneshot::Sender<Result<usize>>),
    Seal(oneshot::Sender<Result<Lsn>>),
}

#[derive(Default)]
pub(crate) struct Queue {
    pub requests: VecDeque<Request>,
    pub closing: bool,
}

/// Counters, updated by the writer, read by anyone.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub appends: AtomicU64,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_nanos: AtomicU64,
    /// Segments started in a recycled file.
    pub recycled: AtomicU64,
}

/// State shared by the [`crate::Wal`] handle and its writer thread.
pub(crate) struct Shared {
    pub log_id: u64,
    pub dir: PathBuf,
    pub queue: Mutex<Queue>,
    /// Set once the writer closed, drained and synced; `exit` is told.
    pub exited: Mutex<bool>,
    pub exit: Condvar,
    pub space: Arc<Semaphore>,
    /// Permits `space` was created with: bytes that may be queued.
    pub queue_capacity: usize,
    /// Payload bytes of appends queued or being written.
    pub queued_bytes: Arc<AtomicUsize>,
    pub table: RwLock<SegmentTable>,
    /// Next LSN to hand out minus one: the last written record.
    pub last_lsn: AtomicU64,
    /// Everything up to here is on stable storage.
    pub durable_lsn: AtomicU64,
    pub poisoned: AtomicBool,
    pub poison: Mutex<Option<(IoOp, i32)>>,
    pub counters: Counters,
}

impl Shared {
    pub fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every segment's handle (after the writer exited, for a close
    /// that consumes the log: nothing reads it any more).
    pub fn drop_files(&self) {
        self.table_mut().segments.clear();
    }

    pub fn table(&self) -> RwLockReadGuard<'_, SegmentTable> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, SegmentTable> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn mark_exited(&self) {
        *self.exited.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.exit.notify_all();
    }

    /// Waits until the writer has exited.
    pub fn wait_exited(&self) {
        let mut exited = self.exited.lock().unwrap_or_else(PoisonError::into_inner);
        while !*exited {
            exited = self.exit.wait(exited).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether anything is queued, or a close is waiting to be served.
    pub fn has_work(&self) -> bool {
        let (queued, closing) = {
            let queue = self.queue();
            (!queue.requests.is_empty(), queue.closing)
        };
        queued || (closing && !*self.exited.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The error every call gets once the log is poisoned.
    pub fn poison_error(&self) -> Option<Error> {
        if !self.poisoned.load(Ordering::Acquire) {
            return None;
        }
        let poison = *self.poison.lock().unwrap_or_else(PoisonError::into_inner);
        poison.map(|(op, errno)| Error::Poisoned { op, source: io::Error::from_raw_os_error(errno) })
    }
}

/// The segment being appended to.
struct Active {
    id: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    /// Where the next byte goes.
    offset: u64,
    /// Whether no record has been written into it yet.
    empty: bool,
    /// The file's bytes (written and allocated) end here: beyond, a write
    /// goes into fresh space.
    zeroed_end: u64,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    storage: Arc<dyn Storage>,
    options: WalOptions,
    preparer: Arc<Preparer>,
    active: Option<Active>,
    next_segment_id: u64,
    /// Writer's view of the durable LSN (it is the only one that moves it).
    durable_lsn: Lsn,
    /// Records written but not yet synced, since when.
    unsynced_since: Option<Instant>,
    /// Closed and drained: nothing more will run.
    exited: bool,
    /// The active segment takes no more records: the next append rolls.
    sealed: bool,
}

/// Why a batch failed, which decides what its requests are told.
enum BatchFailure {
    /// Its bytes were handed to the kernel: outcome unknown.
    Attempted(Error),
    /// Nothing of it was written.
    NotAttempted(Error),
}

enum Work {
    Appends(Vec<AppendRequest>),
    Control(Request),
    SyncDue,
    /// Nothing queued: wait for more, or until the periodic sync is due.
    Wait(Option<Instant>),
    Exit,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        storage: Arc<dyn Storage>,
        options: WalOptions,
        preparer: Arc<Preparer>,
        next_segment_id: u64,
    ) -> Writer {
        let durable_lsn = shared.durable_lsn.load(Ordering::Acquire);
        let active = shared.table().segments.values().next_back().map(|meta| Active {
            id: meta.id,
            path: meta.path.clone(),
            file: Arc::clone(&meta.file),
            offset: meta.end_offset,
            empty: meta.is_empty(),
            zeroed_end: meta.file.file_len().unwrap_or(meta.end_offset),
        });
        Writer {
            shared,
            storage,
            options,
            preparer,
            active,
            next_segment_id,
            durable_lsn,
            unsynced_since: None,
            exited: false,
            sealed: false,
        }
    }

    /// After a panic in [`Writer::step`]: poisons the log, fails what is
    /// queued and marks the writer exited, so no caller waits forever.
    pub fn abandon(&mut self) {
        let _ = self.poison(IoOp::Write, self.shared.dir.clone(), io::Error::from_raw_os_error(libc::EIO));
        let requests: Vec<Request> = self.shared.queue().requests.drain(..).collect();
        for request in requests {
            reply_error(request, Error::Closed);
        }
        self.exit();
    }

    /// Marks the writer exited, its active segment's handle dropped first:
    /// the engine may drop this job later, but no file of the log stays
    /// open because of it.
    fn exit(&mut self) {
        self.active = None;
        self.exited = true;
        self.shared.mark_exited();
    }

    /// One run on an engine worker: serves the queue until it is empty.
    /// Returns when the next periodic sync is due, if one is; after the
    /// log was closed and drained, syncs what is unsynced and marks the
    /// writer exited.
    pub fn step(&mut self) -> Option<Instant> {
        if self.exited {
            return None;
        }
        loop {
            match self.next_work() {
                Work::Appends(batch) => self.write_batch(batch),
                Work::Control(request) => self.control(request),
                Work::SyncDue => {
                    if let Err(error) = self.sync_active() {
                        tracing::error!(dir = %self.shared.dir.display(), %error, "periodic WAL sync failed");
                    }
                }
                Work::Wait(due) => return due,
                Work::Exit => break,
            }
        }
        if self.unsynced_since.is_some()
            && self.shared.poison_error().is_none()
            && let Err(error) = self.sync_active()
        {
            tracing::error!(dir = %self.shared.dir.display(), %error, "final WAL sync failed");
        }
        self.exit();
        None
    }

    /// What to do next, without waiting: a batch of appends (everything
    /// queued, up to `max_batch_bytes`), a control request, a periodic sync
    /// that is due, the exit after a close, or nothing yet.
    fn next_work(&mut self) -> Work {
        let mut queue = self.shared.queue();
        match queue.requests.pop_front() {
            Some(Request::Append(first)) => {
                let mut bytes = first.bytes;
                let mut batch = vec![first];
                while bytes < self.options.max_batch_bytes {
                    match queue.requests.pop_front() {
                        Some(Request::Append(next)) => {
                            bytes += next.bytes;
                            batch.push(next);
                        }
                        Some(other) => {
                            queue.requests.push_front(other);
                            break;
                        }
                        None => break,
                    }
                }
                return Work::Appends(batch);
            }
            Some(control) => return Work::Control(control),
            None => {}
        }
        if queue.closing {
            return Work::Exit;
        }
        match (self.options.durability, self.unsynced_since) {
            (Durability::Interval(every), Some(since)) if Instant::now() >= since + every => Work::SyncDue,
            (Durability::Interval(every), Some(since)) => Work::Wait(Some(since + every)),
            _ => Work::Wait(None),
        }
    }

    fn write_batch(&mut self, batch: Vec<AppendRequest>) {
        if let Some(error) = self.shared.poison_error() {
            return fail_appends(batch, || clone_poison(&error));
        }
        match self.write_records(&batch) {
            Ok(appended) => {
                // In LSN order, so whatever `then` does sees the log's order.
                for (request, result) in batch.into_iter().zip(appended) {
                    request.answer(Ok(result));
                }
            }
            Err(BatchFailure::Attempted(error)) => {
                // Every request of the batch went out in the same write, so
                // each learns that its outcome is unknown: the same op and
                // errno, never "poisoned", which would claim it was not
                // attempted.
                let (op, errno) = (error.op().unwrap_or(IoOp::Write), error.errno().unwrap_or(libc::EIO));
                let path = self.shared.dir.clone();
                let mut first = Some(error);
                fail_appends(batch, || {
                    first.take().unwrap_or_else(|| Error::io(op, path.clone(), io::Error::from_raw_os_error(errno)))
                });
                self.fail_queued();
            }
            Err(BatchFailure::NotAttempted(error)) => {
                // Failed before any byte of the batch was written (a roll to
                // the next segment): not attempted, like everything queued.
                tracing::debug!(dir = %self.shared.dir.display(), %error, "batch not written");
                fail_appends(batch, || self.poisoned_or_closed());
                self.fail_queued();
            }
        }
    }

    fn poisoned_or_closed(&self) -> Error {
        self.shared.poison_error().unwrap_or(Error::Closed)
    }

    /// Writes and (per durability) syncs the batch; one `Appended` per
    /// request, in request order.
    fn write_records(&mut self, batch: &[AppendRequest]) -> Result<Vec<Appended>, BatchFailure> {
        let frame_bytes: u64 =
            batch.iter().flat_map(|r| &r.records).map(|payload| format::frame_len(payload.len()) as u64).sum();
        let record_count: usize = batch.iter().map(|r| r.records.len()).sum();
        let payload_bytes: usize = batch.iter().map(|r| r.bytes).sum();
        self.ensure_room(frame_bytes).map_err(BatchFailure::NotAttempted)?;
        let Some(active) = self.active.as_mut() else { return Err(BatchFailure::NotAttempted(Error::Closed)) };

        let mut pieces = Vec::with_capacity(record_count * 3);
        let write_at = active.offset;
        let mut next_lsn = self.shared.last_lsn.load(Ordering::Acquire) + 1;
        let mut headers = BytesMut::with_capacity(record_count * format::RECORD_HEADER_LEN);
        let mut offset = active.offset;
        let mut appended = Vec::with_capacity(batch.len());
        let mut placed = Vec::with_capacity(record_count);
        for request in batch {
            let first_lsn = next_lsn;
            let mut positions = Vec::with_capacity(request.records.len());
            for payload in &request.records {
                let header = RecordHeader {
                    len: payload.len() as u32,
                    log_id: self.options.log_id,
                    segment_id: active.id,
                    lsn: next_lsn,
                    synced_lsn: self.durable_lsn,
                };
                headers.extend_from_slice(&format::encode_record_header(&header, payload));
                let frame = header.frame_len() as u64;
                positions.push(RecordPos { segment_id: active.id, offset, lsn: next_lsn, len: header.len });
                placed.push((next_lsn, offset, frame));
                offset += frame;
                next_lsn += 1;
            }
            appended.push(Appended { first_lsn, last_lsn: next_lsn - 1, positions });
        }
        let mut headers = headers.freeze();
        for payload in batch.iter().flat_map(|r| &r.records) {
            pieces.push(headers.split_to(format::RECORD_HEADER_LEN));
            if !payload.is_empty() {
                pieces.push(payload.clone());
            }
            let padding = format::padding_len(payload.len());
            if padding > 0 {
                pieces.push(Bytes::from_static(PADDING.get(..padding).unwrap_or_default()));
            }
        }

        // Keep zeroed space ahead of the tail (a sync into space already
        // written needs no extent metadata), a window at a time rather than
        // a whole segment: the zeros go out in this batch's write and are
        // synced with it. Not for a batch of large records.
        let mut zeroed_end = active.zeroed_end.max(offset);
        let large = frame_bytes / (record_count.max(1) as u64) >= LARGE_RECORD;
        if self.options.prewrite_segments
            && !large
            && zeroed_end < self.options.segment_size
            && zeroed_end - offset < ZEROED_LOW_WATER
        {
            let target = (zeroed_end + ZEROED_CHUNK as u64).min(self.options.segment_size);
            let zeros = (target - offset) as usize;
            pieces.push(Bytes::from_static(ZEROS.get(..zeros.min(ZEROED_CHUNK)).unwrap_or_default()));
            zeroed_end = offset + zeros.min(ZEROED_CHUNK) as u64;
        }
        let sync_now = self.options.durability == Durability::Sync;
        let started = Instant::now();
        let result = if sync_now {
            active.file.write_all_and_sync(write_at, &pieces)
        } else {
            active.file.write_all_at(write_at, &pieces).map_err(|e| (IoOp::Write, e))
        };
        if let Err((op, error)) = result {
            if op == IoOp::Sync {
                self.observe_sync(started.elapsed(), false);
            }
            let no_space = op == IoOp::Write && is_no_space(&error);
            let error = self.poison(op, active_path(&self.active), error);
            if no_space && self.discard(write_at, offset - write_at) {
                // Nothing of the batch is there, durably: not attempted.
                return Err(BatchFailure::NotAttempted(error));
            }
            return Err(BatchFailure::Attempted(error));
        }
        if sync_now {
            self.observe_sync(started.elapsed(), true);
        }

        let Some(active) = self.active.as_mut() else { return Err(BatchFailure::NotAttempted(Error::Closed)) };
        active.offset = offset;
        active.empty = false;
        active.zeroed_end = zeroed_end;
        let last_lsn = next_lsn - 1;
        {
            let mut table = self.shared.table_mut();
            if let Some(meta) = table.segments.get_mut(&active.id) {
                for (lsn, at, frame) in placed {
                    meta.push(lsn, at, frame);
                }
            }
        }
        self.shared.last_lsn.store(last_lsn, Ordering::Release);
        if sync_now {
            self.set_durable(last_lsn);
        } else if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        let counters = &self.shared.counters;
        counters.appends.fetch_add(batch.len() as u64, Ordering::Relaxed);
        counters.records.fetch_add(record_count as u64, Ordering::Relaxed);
        counters.bytes.fetch_add(payload_bytes as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.options.observer {
            observer.batch_written(record_count, payload_bytes);
        }
        Ok(appended)
    }

    /// After a write into `[at, at + len)` of the active segment failed for
    /// lack of space (which, unlike a failed sync, loses nothing already
    /// written): zeroes whatever part of it reached the file and syncs, so
    /// that the batch is durably not there and its requests can truthfully
    /// be told so. Overwriting bytes already in the file takes no new space.
    /// `false` if that failed too; the batch's outcome is then unknown.
    fn discard(&self, at: u64, len: u64) -> bool {
        let Some(active) = &self.active else { return false };
        let zeroed = (|| -> io::Result<()> {
            let end = active.file.file_len()?.min(at + len);
            if end > at {
                let written = active.file.read_exact_at(at, (end - at) as usize)?;
                if let Some(last) = written.iter().rposition(|b| *b != 0) {
                    active.file.write_all_at(at, &[Bytes::from(vec![0u8; last + 1])])?;
                }
            }
            active.file.sync_data()
        })();
        match zeroed {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(dir = %self.shared.dir.display(), %error, "cannot discard a batch that failed for lack of space");
                false
            }
        }
    }

    /// Makes sure the active segment can take `frame_bytes` more, rolling to
    /// a new segment when it cannot. An empty segment takes anything, so a
    /// record larger than a segment gets one of its own.
    fn ensure_room(&mut self, frame_bytes: u64) -> Result<()> {
        if let Some(active) = &self.active {
            if active.empty || (!self.sealed && active.offset + frame_bytes <= self.options.segment_size) {
                return Ok(());
            }
            // Sealed segments are durable whole: recovery relies on it.
            self.sync_active()?;
        }
        let id = self.next_segment_id;
        // Waiting for a pre-write is fine before the first record; on a roll
        // the writer would stall every appender behind it.
        let wait = self.active.is_none();
        let taken = self.preparer.take(id, wait).inspect_err(|error| self.poison_from(error))?;
        let file = taken.file;
        let path = segment::path(&self.shared.dir, id);
        let first_lsn = self.shared.last_lsn.load(Ordering::Acquire) + 1;
        // The header is durable before any record is written behind it, so
        // recovery can treat a damaged header in front of a valid record as
        // corruption, never as a torn write.
        let recycled = taken.recycled_from.is_some();
        let header = SegmentHeader { log_id: self.options.log_id, segment_id: id, first_lsn, recycled };
        let started = Instant::now();
        let result = file.write_all_and_sync(0, &[Bytes::copy_from_slice(&header.encode())]);
        if let Err((op, error)) = result {
            if op == IoOp::Sync {
                self.observe_sync(started.elapsed(), false);
            }
            return Err(self.poison(op, path, error));
        }
        self.observe_sync(started.elapsed(), true);
        if let Some(from) = &taken.recycled_from {
            // Only now does the recycled file get the segment's name: under
            // it, a crash at any point finds the new header, durable, never
            // the old one (which names another segment) or a torn one. Until
            // the directory sync a power cut may undo the rename; nothing is
            // written into the segment before it, so nothing acknowledged
            // can go with it.
            self.storage.rename(from, &path).map_err(|e| self.poison(IoOp::Metadata, from.clone(), e))?;
            self.storage
                .sync_dir(&self.shared.dir)
                .map_err(|e| self.poison(IoOp::SyncDir, self.shared.dir.clone(), e))?;
            self.shared.counters.recycled.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.table_mut().segments.insert(id, SegmentMeta::new(id, path.clone(), Arc::clone(&file), first_lsn));
        let zeroed_end = file.file_len().unwrap_or(format::SEGMENT_HEADER_LEN as u64);
        self.active =
            Some(Active { id, path, file, offset: format::SEGMENT_HEADER_LEN as u64, empty: true, zeroed_end });
        self.sealed = false;
        self.next_segment_id = id + 1;
        Ok(())
    }

    /// Syncs the active segment if anything in it is unsynced.
    fn sync_active(&mut self) -> Result<()> {
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        if let Some(error) = self.shared.poison_error() {
            return Err(error);
        }
        let Some(active) = &self.active else { return Ok(()) };
        let started = Instant::now();
        let result = active.file.sync_data();
        self.observe_sync(started.elapsed(), result.is_ok());
        if let Err(error) = result {
            return Err(self.poison(IoOp::Sync, active.path.clone(), error));
        }
        self.unsynced_since = None;
        self.set_durable(self.shared.last_lsn.load(Ordering::Acquire));
        Ok(())
    }

    fn set_durable(&mut self, lsn: Lsn) {
        self.durable_lsn = lsn;
        self.shared.durable_lsn.store(lsn, Ordering::Release);
    }

    fn observe_sync(&self, elapsed: Duration, ok: bool) {
        let counters = &self.shared.counters;
        counters.syncs.fetch_add(1, Ordering::Relaxed);
        counters.sync_nanos.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        if let Some(observer) = &self.options.observer {
            observer.synced(elapsed, ok);
        }
    }

    /// Records the first failure; from now on every call fails.
    fn poison(&self, op: IoOp, path: PathBuf, source: io::Error) -> Error {
        let errno = source.raw_os_error().unwrap_or(libc::EIO);
        {
            let mut poison = self.shared.poison.lock().unwrap_or_else(PoisonError::into_inner);
            if poison.is_none() {
                *poison = Some((op, errno));
            }
        }
        self.shared.poisoned.store(true, Ordering::Release);
        tracing::error!(dir = %self.shared.dir.display(), op = op.as_str(), errno, %source, "WAL poisoned");
        Error::io(op, path, source)
    }

    fn poison_from(&self, error: &Error) {
        if let (Some(op), errno) = (error.op(), error.errno()) {
            let source = io::Error::from_raw_os_error(errno.unwrap_or(libc::EIO));
            let _ = self.poison(op, self.shared.dir.clone(), source);
        }
    }

    /// After a failure, answer everything still queued.
    fn fail_queued(&mut self) {
        let requests: Vec<Request> = self.shared.queue().requests.drain(..).collect();
        for request in requests {
            let error = self.poisoned_or_closed();
            reply_error(request, error);
        }
    }

    fn control(&mut self, request: Request) {
        match request {
            Request::Append(_) => {}
            Request::Sync(reply) => {
                let result = self.shared.poison_error().map_or_else(|| self.sync_active(), Err);
                let _ = reply.send(result);
            }
            Request::TruncateAfter(lsn, reply) => {
                let result = self.shared.poison_error().map_or_else(|| self.truncate_after(lsn), Err);
                let _ = reply.send(result);
            }
            Request::PurgeBefore(lsn, reply) => {
                let result = self.shared.poison_error().map_or_else(|| self.purge_before(lsn), Err);
                let _ = reply.send(result);
            }
            Request::Seal(reply) => {
                let result = self.shared.poison_error().map_or_else(|| self.seal(), Err);
                let _ = reply.send(result);
            }
        }
    }

    /// Syncs the active segment and rolls to a new one (whose header
    /// carries the next LSN, so the log's numbering survives even when
    /// every older segment is purged); returns the last LSN, now durable.
    /// Every segment up to it can then be purged whole. An empty active
    /// segment is kept as it is.
    fn seal(&mut self) -> Result<Lsn> {
        if self.active.as_ref().is_some_and(|active| !active.empty) {
            self.sealed = true;
            self.ensure_room(0)?;
        }
        Ok(self.shared.last_lsn.load(Ordering::Acquire))
    }

    /// Removes every record after `lsn`. Later segments go first (newest
    /// first, so a crash leaves no gap), then the tail of the segment
    /// holding `lsn + 1` is zeroed and synced.
    fn truncate_after(&mut self, lsn: Lsn) -> Result<()> {
        let last = self.shared.last_lsn.load(Ordering::Acquire);
        let (first, target) = {
            let table = self.shared.table();
            let first = table.first_lsn().unwrap_or(last + 1);
            (first, table.find(lsn + 1).cloned())
        };
        if lsn >= last {
            return if lsn == last { Ok(()) } else { Err(Error::LsnOutOfRange { lsn, first, last }) };
        }
        let Some(target) = target.filter(|_| lsn + 1 >= first) else {
            return Err(Error::LsnOutOfRange { lsn, first, last });
        };
        self.preparer.discard().inspect_err(|e| self.poison_from(e))?;
        // From the marker's rename on, a crash anywhere below is finished by
        // recovery: the tail after `lsn` goes, whatever state it is left in.
        self.write_truncate_marker(lsn)?;
        let doomed: Vec<SegmentMeta> =
            self.shared.table().segments.range(target.id + 1..).rev().map(|(_, m)| m.clone()).collect();
        self.remove_segments(&doomed)?;
        let cut = offset_of(&target, self.shared.log_id, lsn + 1)?;
        let zeros = Bytes::from(vec![0u8; (target.end_offset - cut) as usize]);
        target.file.write_all_and_sync(cut, &[zeros]).map_err(|(op, e)| self.poison(op, target.path.clone(), e))?;

        let mut table = self.shared.table_mut();
        table.segments.retain(|id, _| *id <= target.id);
        if let Some(meta) = table.segments.get_mut(&target.id) {
            meta.last_lsn = lsn;
            meta.end_offset = cut;
            let kept = (lsn + 1 - meta.first_lsn).div_ceil(segment::INDEX_STRIDE) as usize;
            meta.index.truncate(kept);
        }
        drop(table);
        self.active = Some(Active {
            id: target.id,
            path: target.path.clone(),
            file: Arc::clone(&target.file),
            offset: cut,
            empty: lsn < target.first_lsn,
            zeroed_end: target.file.file_len().unwrap_or(cut),
        });
        self.next_segment_id = target.id + 1;
        self.sealed = false;
        self.shared.last_lsn.store(lsn, Ordering::Release);
        self.unsynced_since = None;
        self.set_durable(lsn);
        self.remove_truncate_marker()
    }

    /// Writes `TRUNCATE` (`after=<lsn>`) durably: a staging file, synced,
    /// renamed, the directory synced.
    fn write_truncate_marker(&mut self, lsn: Lsn) -> Result<()> {
        let dir = self.shared.dir.clone();
        let staging = dir.join(segment::TRUNCATE_STAGING);
        let file = self.storage.open(&staging, true).map_err(|e| self.poison(IoOp::Open, staging.clone(), e))?;
        file.write_all_and_sync(0, &[Bytes::from(format!("after={lsn}\n"))])
            .map_err(|(op, e)| self.poison(op, staging.clone(), e))?;
        drop(file);
        let marker = dir.join(segment::TRUNCATE_MARKER);
        self.storage.rename(&staging, &marker).map_err(|e| self.poison(IoOp::Metadata, staging, e))?;
        self.storage.sync_dir(&dir).map_err(|e| self.poison(IoOp::SyncDir, dir.clone(), e))
    }

    /// Removes `TRUNCATE` once the truncation is durable; the directory is
    /// synced, so that a later crash cannot bring it back over new records.
    fn remove_truncate_marker(&mut self) -> Result<()> {
        let dir = self.shared.dir.clone();
        let marker = dir.join(segment::TRUNCATE_MARKER);
        self.storage.remove_file(&marker).map_err(|e| self.poison(IoOp::Metadata, marker, e))?;
        self.storage.sync_dir(&dir).map_err(|e| self.poison(IoOp::SyncDir, dir.clone(), e))
    }

    /// Removes whole segments all of whose records are below `lsn`, oldest
    /// first, never the active segment. Returns how many were removed.
    ///
    /// Up to `recycled_segments` spares are kept: the newest of the purged
    /// files are renamed to their recycled names instead of being removed,
    /// their bytes untouched, for later rolls to write into. The renames
    /// and removes go in one oldest-first sequence, then one directory
    /// sync, so a crash at any point leaves the log without a gap: a file
    /// whose rename is undone is its old segment again, whole and valid.
    fn purge_before(&mut self, lsn: Lsn) -> Result<usize> {
        let active_id = self.active.as_ref().map(|a| a.id);
        let doomed: Vec<SegmentMeta> = {
            let mut table = self.shared.table_mut();
            let ids: Vec<u64> = table
                .segments
                .values()
                .take_while(|m| m.last_lsn < lsn && Some(m.id) != active_id)
                .map(|m| m.id)
                .collect();
            ids.iter().filter_map(|id| table.segments.remove(id)).collect()
        };
        let mut room = self.options.recycled_segments.saturating_sub(self.preparer.recycled_count());
        let mut recycle = vec![false; doomed.len()];
        for (meta, keep) in doomed.iter().zip(recycle.iter_mut()).rev() {
            // A file much larger than a segment (one oversized record) would
            // hold more space than a spare is worth.
            if room > 0 && meta.file.file_len().is_ok_and(|len| len <= self.options.segment_size) {
                *keep = true;
                room -= 1;
            }
        }
        let mut kept = Vec::new();
        for (meta, keep) in doomed.iter().zip(recycle) {
            if keep {
                let spare = self.shared.dir.join(segment::recycled_file_name(meta.id));
                self.storage
                    .rename(&meta.path, &spare)
                    .map_err(|e| self.poison(IoOp::Metadata, meta.path.clone(), e))?;
                kept.push(Recycled { last_id: meta.id, path: spare, file: Arc::clone(&meta.file) });
            } else {
                self.storage.remove_file(&meta.path).map_err(|e| self.poison(IoOp::Metadata, meta.path.clone(), e))?;
            }
        }
        if !doomed.is_empty() {
            self.storage
                .sync_dir(&self.shared.dir)
                .map_err(|e| self.poison(IoOp::SyncDir, self.shared.dir.clone(), e))?;
        }
        for spare in kept {
            self.preparer.add_recycled(spare);
        }
        Ok(doomed.len())
    }

    /// Removes segment files in the order given, then syncs the directory.
    fn remove_segments(&self, doomed: &[SegmentMeta]) -> Result<()> {
        for meta in doomed {
            self.storage.remove_file(&meta.path).map_err(|e| self.poison(IoOp::Metadata, meta.path.clone(), e))?;
        }
        if !doomed.is_empty() {
            self.storage
                .sync_dir(&self.shared.dir)
                .map_err(|e| self.poison(IoOp::SyncDir, self.shared.dir.clone(), e))?;
        }
        Ok(())
    }
}

fn is_no_space(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG))
}

fn active_path(active: &Option<Active>) -> PathBuf {
    active.as_ref().map(|a| a.path.clone()).unwrap_or_default()
}

/// Offset of record `lsn` in `meta` (or the end, for the LSN after the last).
fn offset_of(meta: &SegmentMeta, log_id: u64, lsn: Lsn) -> Result<u64> {
    if lsn > meta.last_lsn {
        return Ok(meta.end_offset);
    }
    let mut records = Vec::new();
    meta.read_from(log_id, lsn, 0, &mut records)?;
    records.first().map(|r| r.pos.offset).ok_or(Error::LsnOutOfRange {
        lsn,
        first: meta.first_lsn,
        last: meta.last_lsn,
    })
}

fn clone_poison(error: &Error) -> Error {
    match error {
        Error::Poisoned { op, source } => Error::Poisoned {
            op: *op,
            source: io::Error::from_raw_os_error(source.raw_os_error().unwrap_or(libc::EIO)),
        },
        _ => Error::Closed,
    }
}

fn fail_appends(batch: Vec<AppendRequest>, mut error: impl FnMut() -> Error) {
    for request in batch {
        request.answer(Err(error()));
    }
}

pub(crate) fn reply_error(request: Request, error: Error) {
    match request {
        Request::Append(append) => append.answer(Err(error)),
        Request::Sync(reply) | Request::TruncateAfter(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Request::PurgeBefore(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Request::Seal(reply) => {
            let _ = reply.send(Err(error));
        }
    }
}
