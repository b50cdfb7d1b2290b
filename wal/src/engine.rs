//! The threads that carry the logs' I/O: a small pool, one per disk (or
//! one per node), whose size does not grow with the number of logs.
//!
//! A log is an owned object, not a thread: its writer state (files, queue,
//! poison flag, LSNs) belongs to it alone, and when it has work it is
//! scheduled onto its engine, where one worker at a time runs its writer
//! until the queue is empty. Group commit is unchanged: while one batch is
//! being written and synced, new appends queue up, and the next step takes
//! them all.
//!
//! A hung `fdatasync` holds the one worker running that log, and nothing
//! else: when a job is waiting and no worker is idle, the engine starts
//! another (up to its bound), so the other logs carry on. Workers that
//! stay idle for a while exit, down to one.
//!
//! Timers (a sync due under `Durability::Interval`) are kept by the engine
//! and served by an idle worker.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

/// How long a worker beyond the first waits for work before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(2);

/// Work an engine runs: one step of a log (or of its segment preparer).
pub(crate) trait Job: Send + Sync {
    /// Runs until there is nothing left to do right now.
    fn run(&self) -> Next;
    /// Cleared before [`Job::run`], so that work arriving during the run
    /// schedules the job again.
    fn scheduled(&self) -> &AtomicBool;
}

/// What a job wants after a run.
pub(crate) enum Next {
    /// Nothing until it is scheduled again.
    Idle,
    /// To run again as soon as possible (work arrived meanwhile).
    Again,
    /// To run again at this instant (a periodic sync), unless scheduled
    /// sooner.
    At(Instant),
}

/// A pool of I/O threads shared by many logs. Its threads exit once every
/// handle is dropped and the work queued before is done.
pub struct Engine {
    inner: Arc<Inner>,
}

impl Clone for Engine {
    fn clone(&self) -> Engine {
        self.inner.handles.fetch_add(1, Ordering::AcqRel);
        Engine { inner: Arc::clone(&self.inner) }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.inner.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle: workers finish what is queued, then exit.
            let _state = self.inner.lock();
            self.inner.work.notify_all();
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.lock();
        f.debug_struct("Engine")
            .field("name", &self.inner.name)
            .field("workers", &state.workers)
            .field("idle", &state.idle)
            .field("max_workers", &self.inner.max_workers)
            .finish()
    }
}

struct Inner {
    name: String,
    max_workers: usize,
    /// Engine handles alive (workers hold the inner state, not a handle).
    handles: std::sync::atomic::AtomicUsize,
    state: Mutex<State>,
    work: Condvar,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Arc<dyn Job>>,
    timers: BinaryHeap<Reverse<Timer>>,
    workers: usize,
    idle: usize,
    next_timer: u64,
}

struct Timer {
    at: Instant,
    seq: u64,
    job: Weak<dyn Job>,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Timer) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Timer) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Timer) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Engine {
    /// An engine named `name` (its threads are `name-io`) of at most
    /// `max_workers` threads (at least 1). No thread runs until there is
    /// work.
    pub fn new(name: impl Into<String>, max_workers: usize) -> Engine {
        Engine {
            inner: Arc::new(Inner {
                name: name.into(),
                max_workers: max_workers.max(1),
                handles: std::sync::atomic::AtomicUsize::new(1),
                state: Mutex::new(State::default()),
                work: Condvar::new(),
            }),
        }
    }

    /// Threads running now (for tests and metrics).
    pub fn threads(&self) -> usize {
        self.inner.lock().workers
    }

    /// Queues `job` unless it is queued already.
    pub(crate) fn schedule(&self, job: Arc<dyn Job>) {
        Inner::schedule(&self.inner, job);
    }
}

impl Inner {
    fn schedule(this: &Arc<Inner>, job: Arc<dyn Job>) {
        if job.scheduled().swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = this.lock();
        state.ready.push_back(job);
        Inner::wake_or_grow(this, &mut state);
    }

    /// Runs `job` at `at`, unless it is scheduled sooner.
    fn schedule_at(this: &Arc<Inner>, job: &Arc<dyn Job>, at: Instant) {
        let mut state = this.lock();
        state.next_timer += 1;
        let seq = state.next_timer;
        state.timers.push(Reverse(Timer { at, seq, job: Arc::downgrade(job) }));
        Inner::wake_or_grow(this, &mut state);
    }

    /// Wakes the idle workers and starts more while the queue (and a
    /// pending timer) outnumbers them: a worker counts as idle until it has
    /// taken a job, so two jobs scheduled onto one idle worker get a second
    /// one, and a job never waits behind one stuck in a hung sync while the
    /// bound allows another thread.
    fn wake_or_grow(this: &Arc<Inner>, state: &mut State) {
        if state.idle > 0 {
            this.work.notify_all();
        }
        let wanted = state.ready.len() + usize::from(!state.timers.is_empty());
        if wanted > state.idle && state.workers < this.max_workers {
            // Every worker is busy (or stuck in a hung sync): another one
            // carries the rest.
            state.workers += 1;
            let inner = Arc::clone(this);
            let spawned = std::thread::Builder::new().name(format!("{}-io", this.name)).spawn(move || inner.work());
            if let Err(error) = spawned {
                state.workers -= 1;
                tracing::error!(engine = this.name, %error, "cannot start an I/O thread");
            }
        }
    }

    fn work(self: Arc<Inner>) {
        loop {
            let Some(job) = Inner::next_job(&self) else { return };
            job.scheduled().store(false, Ordering::Release);
            match job.run() {
                Next::Idle => {}
                Next::Again => Inner::schedule(&self, job),
                Next::At(at) => Inner::schedule_at(&self, &job, at),
            }
        }
    }

    /// The next job to run, waiting for one; `None` when this worker should
    /// exit: idle for long and not the last, or nothing queued and no
    /// handle left.
    fn next_job(this: &Arc<Inner>) -> Option<Arc<dyn Job>> {
        let mut state = this.lock();
        loop {
            let now = Instant::now();
            while let Some(Reverse(timer)) = state.timers.peek() {
                if timer.at > now {
                    break;
                }
                let due = state.timers.pop().and_then(|Reverse(timer)| timer.job.upgrade());
                if let Some(job) = due
                    && !job.scheduled().swap(true, Ordering::AcqRel)
                {
                    state.ready.push_back(job);
                }
            }
            if let Some(job) = state.ready.pop_front() {
                // More waiting than workers free to take it: this one may be
                // about to block for a long time.
                if !state.ready.is_empty() {
                    Inner::wake_or_grow(this, &mut state);
                }
                return Some(job);
            }
            if this.handles.load(Ordering::Acquire) == 0 {
                state.workers -= 1;
                return None;
            }
            let wait = state.timers.peek().map_or(IDLE_EXIT, |Reverse(t)| t.at.saturating_duration_since(now));
            state.idle += 1;
            let (next, timeout) = this.work.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner);
            state = next;
            state.idle -= 1;
            if timeout.timed_out() && state.ready.is_empty() && state.timers.is_empty() && state.workers > 1 {
                state.workers -= 1;
                return None;
            }
        }
    }
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Counting {
        scheduled: AtomicBool,
        runs: AtomicUsize,
        hold: Mutex<()>,
    }

    impl Job for Counting {
        fn run(&self) -> Next {
            let _held = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
            self.runs.fetch_add(1, Ordering::SeqCst);
            Next::Idle
        }
        fn scheduled(&self) -> &AtomicBool {
            &self.scheduled
        }
    }

    fn job() -> Arc<Counting> {
        Arc::new(Counting { scheduled: AtomicBool::new(false), runs: AtomicUsize::new(0), hold: Mutex::new(()) })
    }

    fn wait_until(mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_stuck_job_holds_one_worker_and_the_others_carry_on() {
        let engine = Engine::new("test", 4);
        let stuck = job();
        let held = stuck.hold.lock().unwrap_or_else(PoisonError::into_inner);
        engine.schedule(stuck.clone());
        let others: Vec<_> = (0..20).map(|_| job()).collect();
        for other in &others {
            engine.schedule(other.clone());
        }
        wait_until(|| others.iter().all(|o| o.runs.load(Ordering::SeqCst) == 1));
        assert!(engine.threads() <= 4, "{}", engine.threads());
        assert_eq!(stuck.runs.load(Ordering::SeqCst), 0);
        drop(held);
        wait_until(|| stuck.runs.load(Ordering::SeqCst) == 1);
    }

    #[test]
    fn two_jobs_scheduled_onto_one_idle_worker_do_not_wait_behind_a_stuck_one() {
        for _ in 0..20 {
            let engine = Engine::new("test", 16);
            let warm = job();
            engine.schedule(warm.clone());
            wait_until(|| warm.runs.load(Ordering::SeqCst) == 1);
            // One worker, idle: two jobs arrive before it wakes, and the
            // first one it takes hangs.
            let (stuck, other) = (job(), job());
            let held = stuck.hold.lock().unwrap_or_else(PoisonError::into_inner);
            engine.schedule(stuck.clone());
            engine.schedule(other.clone());
            wait_until(|| other.runs.load(Ordering::SeqCst) == 1);
            drop(held);
            wait_until(|| stuck.runs.load(Ordering::SeqCst) == 1);
        }
    }

    #[test]
    fn threads_do_not_grow_with_the_number_of_jobs() {
        let engine = Engine::new("test", 3);
        let jobs: Vec<_> = (0..1000).map(|_| job()).collect();
        for round in 1..=3 {
            for job in &jobs {
                engine.schedule(job.clone());
            }
            wait_until(|| jobs.iter().all(|j| j.runs.load(Ordering::SeqCst) == round));
            assert!(engine.threads() <= 3);
        }
    }
}
