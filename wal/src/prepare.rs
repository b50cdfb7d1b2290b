//! Handing out the next segment's file: a recycled one, a pre-written one,
//! or a fresh one.
//!
//! A sync write into space that was already written (and synced) needs no
//! extent or size metadata in the journal, so its `fdatasync` is about twice
//! as fast as one into fresh space. So the next segment is, in this order of
//! preference:
//!
//! - one pre-written for it (a job on the engine fills its first window with
//!   zeros, syncs it and renames it into place while the writer fills the
//!   current one), if that is ready;
//! - a recycled spare: a purged segment's file, kept by `purge_before`,
//!   written all through already. The writer gives it its new header, then
//!   its segment name (see `writer.rs` for the order and why);
//! - a pre-write of it, if one is under way and the writer may wait (before
//!   the first record); else a fresh file, written into fresh space.
//!
//! While a recycled spare is on hand nothing is pre-written: it is what the
//! next roll takes.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::engine::{Engine, Job, Next};
use crate::error::{Error, IoOp, Result};
use crate::recovery::{Recycled, Spare};
use crate::segment;
use crate::storage::{Storage, StorageFile};

const ZERO_CHUNK: usize = 4 << 20;

/// Hands out segment files, pre-written when it can. The pre-writes run as
/// jobs on the log's engine, never on a thread of their own.
pub(crate) struct Preparer {
    shared: Arc<Shared>,
    job: Arc<PrepareJob>,
    engine: Engine,
    prewrite: bool,
}

impl std::fmt::Debug for Preparer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preparer").field("dir", &self.shared.dir).field("prewrite", &self.prewrite).finish()
    }
}

#[derive(Debug)]
struct Shared {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    segment_size: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The segment id to prepare next, if any.
    wanted: Option<u64>,
    /// A prepared segment waiting for the writer.
    ready: Option<Spare>,
    /// Recycled spares, oldest first.
    recycled: VecDeque<Recycled>,
    busy: bool,
    /// The writer needs the segment being pre-written now: stop and let it
    /// write into fresh space instead of stalling behind the pre-write.
    abort: bool,
    closing: bool,
}

/// The file [`Preparer::take`] hands out for a new segment.
pub(crate) struct Taken {
    pub file: Arc<dyn StorageFile>,
    /// For a recycled spare: where it lies now. It holds another segment's
    /// header and stale records; the writer gives it the new header, then
    /// renames it to the segment's name.
    pub recycled_from: Option<PathBuf>,
}

/// The engine job that pre-writes the wanted segment.
struct PrepareJob {
    scheduled: AtomicBool,
    shared: Arc<Shared>,
}

impl Job for PrepareJob {
    fn run(&self) -> Next {
        self.shared.prepare_wanted();
        Next::Idle
    }

    fn scheduled(&self) -> &AtomicBool {
        &self.scheduled
    }
}

impl Preparer {
    /// A preparer whose pre-writes (unless `prewrite` is off) run on
    /// `engine`; with `ahead`, segment `first_wanted` is prepared at once,
    /// else only when the writer first asks for it. `spare` is a zeroed
    /// segment left from before, handed out first; `recycled` are the
    /// recycled spares recovery found.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        segment_size: u64,
        prewrite: bool,
        ahead: bool,
        spare: Option<Spare>,
        recycled: Vec<Recycled>,
        first_wanted: u64,
        engine: Engine,
    ) -> Preparer {
        let wanted = (prewrite && spare.is_none() && recycled.is_empty()).then_some(first_wanted);
        let ahead = ahead && wanted.is_some();
        let state =
            State { wanted, ready: spare, recycled: recycled.into(), busy: false, abort: false, closing: false };
        let shared = Arc::new(Shared { storage, dir, segment_size, state: Mutex::new(state), changed: Condvar::new() });
        let job = Arc::new(PrepareJob { scheduled: AtomicBool::new(false), shared: Arc::clone(&shared) });
        let preparer = Preparer { shared, job, engine, prewrite };
        if ahead {
            preparer.schedule();
        }
        preparer
    }

    fn schedule(&self) {
        let job: Arc<dyn Job> = Arc::clone(&self.job) as Arc<dyn Job>;
        self.engine.schedule(job);
    }

    /// The file for segment `id`: the prepared one if the preparer has it,
    /// else a recycled spare, else a fresh file whose name is made durable
    /// here. With `wait`, a pre-write of `id` that is under way is waited
    /// for, and one not yet started is done here (unless a recycled spare
    /// is on hand); without, it is abandoned (the writer must not stall
    /// behind it). Only once the file is in hand is `id + 1` asked for, so
    /// a failure here never leaves a later segment behind a missing one.
    pub fn take(&self, id: u64, wait: bool) -> Result<Taken> {
        let shared = &self.shared;
        let mut state = shared.lock();
        let ready_fits = state.ready.as_ref().is_some_and(|ready| ready.id == id);
        if !ready_fits && (!wait || !state.recycled.is_empty()) {
            state.abort = state.busy;
            state.wanted = None;
        }
        while state.busy {
            state = shared.wait(state);
        }
        if wait
            && self.prewrite
            && state.wanted == Some(id)
            && !state.closing
            && state.ready.is_none()
            && state.recycled.is_empty()
        {
            // Queued but not started: waiting for the job could wait for
            // this very worker. Do it here.
            state.wanted = None;
            state.busy = true;
            drop(state);
            let prepared = shared.prewrite(id);
            state = shared.lock();
            state.busy = false;
            match prepared {
                Ok(file) => state.ready = Some(Spare { id, file }),
                Err(error) => {
                    tracing::warn!(dir = %shared.dir.display(), segment = id, %error, "pre-writing segment failed")
                }
            }
        }
        state.abort = false;
        let mut stale = None;
        let mut taken = match state.ready.take() {
            Some(spare) if spare.id == id => Some(Taken { file: spare.file, recycled_from: None }),
            other => {
                stale = other;
                None
            }
        };
        // A spare may become only a segment newer than every one it held,
        // so that no stale record in it can carry this segment's id. Purged
        // segments are always older than the active one, so this holds by
        // construction; the check keeps it true whatever the directory held.
        let mut unfit = Vec::new();
        while taken.is_none() {
            match state.recycled.pop_front() {
                Some(spare) if spare.last_id < id => {
                    taken = Some(Taken { file: spare.file, recycled_from: Some(spare.path) });
                }
                Some(spare) => unfit.push(spare),
                None => break,
            }
        }
        let prepare_next = self.prewrite && state.recycled.is_empty();
        state.wanted = None;
        drop(state);
        shared.changed.notify_all();
        if let Some(stale) = stale {
            shared.remove(stale.id)?;
        }
        for spare in unfit {
            tracing::warn!(dir = %shared.dir.display(), segment = id, held = spare.last_id, "removing a recycled spare that cannot become this segment");
            shared.storage.remove_file(&spare.path).map_err(|e| Error::io(IoOp::Metadata, &spare.path, e))?;
            shared.sync_dir()?;
        }
        let taken = match taken {
            Some(taken) => taken,
            None => {
                let path = segment::path(&shared.dir, id);
                let file = shared.storage.open(&path, true).map_err(|e| Error::io(IoOp::Open, &path, e))?;
                shared.sync_dir()?;
                Taken { file, recycled_from: None }
            }
        };
        if prepare_next {
            shared.lock().wanted = Some(id + 1);
            self.schedule();
        }
        Ok(taken)
    }

    /// Keeps a purged segment's file (already renamed to its recycled name,
    /// durably) for a later roll. Nothing is pre-written while one is kept.
    pub fn add_recycled(&self, spare: Recycled) {
        let mut state = self.shared.lock();
        state.recycled.push_back(spare);
        state.wanted = None;
    }

    /// How many recycled spares are kept.
    pub fn recycled_count(&self) -> usize {
        self.shared.lock().recycled.len()
    }

    /// Drops whatever is prepared (its id no longer fits, after a
    /// truncation) and prepares nothing until the next [`Preparer::take`].
    pub fn discard(&self) -> Result<()> {
        let shared = &self.shared;
        let mut state = shared.lock();
        state.wanted = None;
        while state.busy {
            state = shared.wait(state);
        }
        let stale = state.ready.take();
        drop(state);
        match stale {
            Some(stale) => shared.remove(stale.id),
            None => Ok(()),
        }
    }

    /// Stops preparing, finishing a pre-write in progress first.
    pub fn close(&self) {
        let mut state = self.shared.lock();
        state.closing = true;
        while state.busy {
            state = self.shared.wait(state);
        }
        // Their files stay on disk (recovery finds them); the handles go.
        state.ready = None;
        state.recycled.clear();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    /// Pre-writes the wanted segment, if one is wanted and none is ready:
    /// one engine job's work.
    fn prepare_wanted(&self) {
        let mut state = self.lock();
        if state.closing || state.busy || state.ready.is_some() || !state.recycled.is_empty() {
            return;
        }
        let Some(id) = state.wanted.take() else { return };
        state.busy = true;
        drop(state);
        let prepared = self.prewrite(id);
        let mut state = self.lock();
        state.busy = false;
        match prepared {
            Ok(file) => state.ready = Some(Spare { id, file }),
            Err(error) if state.abort => {
                tracing::debug!(dir = %self.dir.display(), segment = id, %error, "pre-write abandoned");
            }
            Err(error) => {
                // Not fatal: the writer creates the segment itself.
                tracing::warn!(dir = %self.dir.display(), segment = id, %error, "pre-writing segment failed");
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Writes the first zeroed window of a segment (not the whole segment:
    /// the writer extends the window as the log grows, see `writer.rs`) to
    /// a temporary name, syncs, renames it to the segment's name and syncs
    /// the directory.
    fn prewrite(&self, id: u64) -> Result<Arc<dyn StorageFile>> {
        let temp = self.dir.join(segment::prep_file_name(id));
        let result = (|| {
            let file = self.storage.open(&temp, true).map_err(|e| Error::io(IoOp::Open, &temp, e))?;
            file.set_len(0).map_err(|e| Error::io(IoOp::Metadata, &temp, e))?;
            let zeros = Bytes::from(vec![0u8; ZERO_CHUNK]);
            let mut offset = 0;
            let window = self.segment_size.min(segment::FIRST_WINDOW);
            while offset < window {
                let len = ZERO_CHUNK.min((window - offset) as usize);
                // Synced chunk by chunk: one sync of a whole segment would
                // hold the journal long enough to stall the writer's syncs.
                file.write_all_and_sync(offset, &[zeros.slice(..len)]).map_err(|(op, e)| Error::io(op, &temp, e))?;
                offset += len as u64;
                if self.lock().abort {
                    return Err(Error::Invalid("pre-write abandoned: the writer needed the segment".into()));
                }
            }
            let path = segment::path(&self.dir, id);
            self.storage.rename(&temp, &path).map_err(|e| Error::io(IoOp::Metadata, &temp, e))?;
            self.sync_dir()?;
            Ok(file)
        })();
        if result.is_err() {
            // Give the space back; a leftover is also removed at recovery.
            let _ = self.storage.remove_file(&temp);
        }
        result
    }

    fn remove(&self, id: u64) -> Result<()> {
        let path = segment::path(&self.dir, id);
        self.storage.remove_file(&path).map_err(|e| Error::io(IoOp::Metadata, &path, e))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<()> {
        self.storage.sync_dir(&self.dir).map_err(|e| Error::io(IoOp::SyncDir, &self.dir, e))
    }
}
