//! Pre-writing segments ahead of the writer, as jobs on the log's engine.
//!
//! A sync write into space that was already written (and synced) needs no
//! extent or size metadata in the journal, so its `fdatasync` is about twice
//! as fast as one into fresh space. A job on the engine therefore fills the
//! next segment with zeros, syncs it and renames it into place while the
//! writer fills the current one. If it falls behind, the writer waits for
//! it; if it fails (a full disk), the writer creates the segment itself and
//! writes into fresh space.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::engine::{Engine, Job, Next};
use crate::error::{Error, IoOp, Result};
use crate::recovery::Spare;
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
    busy: bool,
    /// The writer needs the segment being pre-written now: stop and let it
    /// write into fresh space instead of stalling behind the pre-write.
    abort: bool,
    closing: bool,
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
    /// segment left from before, handed out first.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        segment_size: u64,
        prewrite: bool,
        ahead: bool,
        spare: Option<Spare>,
        first_wanted: u64,
        engine: Engine,
    ) -> Preparer {
        let wanted = (prewrite && spare.is_none()).then_some(first_wanted);
        let ahead = ahead && wanted.is_some();
        let shared = Arc::new(Shared {
            storage,
            dir,
            segment_size,
            state: Mutex::new(State { wanted, ready: spare, busy: false, abort: false, closing: false }),
            changed: Condvar::new(),
        });
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
    /// else a fresh file whose name is made durable here. With `wait`, a
    /// pre-write of `id` that is under way is waited for, and one not yet
    /// started is done here; without, it is abandoned (the writer must not
    /// stall behind it). Only once the file is in hand is `id + 1` asked
    /// for, so a failure here never leaves a later segment behind a missing
    /// one.
    pub fn take(&self, id: u64, wait: bool) -> Result<Arc<dyn StorageFile>> {
        let shared = &self.shared;
        let mut state = shared.lock();
        if !wait && state.ready.as_ref().is_none_or(|ready| ready.id != id) {
            state.abort = state.busy;
            state.wanted = None;
        }
        while state.busy {
            state = shared.wait(state);
        }
        if wait && self.prewrite && state.wanted == Some(id) && !state.closing && state.ready.is_none() {
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
        let file = match state.ready.take() {
            Some(spare) if spare.id == id => Some(spare.file),
            other => {
                stale = other;
                None
            }
        };
        state.wanted = None;
        drop(state);
        shared.changed.notify_all();
        if let Some(stale) = stale {
            shared.remove(stale.id)?;
        }
        let file = match file {
            Some(file) => file,
            None => {
                let path = segment::path(&shared.dir, id);
                let file = shared.storage.open(&path, true).map_err(|e| Error::io(IoOp::Open, &path, e))?;
                shared.sync_dir()?;
                file
            }
        };
        if self.prewrite {
            shared.lock().wanted = Some(id + 1);
            self.schedule();
        }
        Ok(file)
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
        // Its file stays on disk (recovery finds it); its handle goes.
        state.ready = None;
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
        if state.closing || state.busy || state.ready.is_some() {
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
