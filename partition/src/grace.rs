//! A grace period for index updates (the RCU idea, two epochs).
//!
//! A put or delete is acknowledged by the log before it is applied to the
//! index. Compaction must not read the index until every operation whose
//! record it will fold in has been applied. Operations register in the
//! current epoch while they run; [`Grace::wait`] flips the epoch and waits
//! only for the operations registered before the flip, so it finishes
//! even under a steady stream of new ones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

#[derive(Debug, Default)]
pub(crate) struct Grace {
    epoch: AtomicUsize,
    active: [AtomicUsize; 2],
    lock: Mutex<()>,
    drained: Condvar,
}

/// Held by a running operation (it may move to another thread with it);
/// leaves its epoch when dropped.
#[derive(Debug)]
pub(crate) struct Registered {
    grace: Arc<Grace>,
    slot: usize,
}

impl Grace {
    /// Registers a running operation.
    pub fn enter(self: &Arc<Self>) -> Registered {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let slot = epoch & 1;
            self.counter(slot).fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return Registered { grace: Arc::clone(self), slot };
            }
            // The epoch flipped under us: register in the new one.
            self.leave(slot);
        }
    }

    /// The count of operations running in epoch parity `slot`.
    fn counter(&self, slot: usize) -> &AtomicUsize {
        let [even, odd] = &self.active;
        if slot & 1 == 0 { even } else { odd }
    }

    fn leave(&self, slot: usize) {
        if self.counter(slot).fetch_sub(1, Ordering::SeqCst) == 1 {
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.drained.notify_all();
        }
    }

    /// Waits until every operation that was running when this was called
    /// has finished. Callers must not overlap (compaction holds the
    /// partition's maintenance lock).
    pub fn wait(&self) {
        let old = self.epoch.fetch_add(1, Ordering::SeqCst) & 1;
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        while self.counter(old).load(Ordering::SeqCst) != 0 {
            guard = self.drained.wait(guard).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.grace.leave(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn wait_returns_only_after_earlier_operations_finish_and_ignores_later_ones() {
        let grace = Arc::new(Grace::default());
        let (release, held) = mpsc::channel::<()>();
        let (entered, ready) = mpsc::channel::<()>();
        let early = {
            let grace = Arc::clone(&grace);
            std::thread::spawn(move || {
                let _op = grace.enter();
                entered.send(()).unwrap();
                held.recv().unwrap();
            })
        };
        ready.recv().unwrap();
        let (done_tx, done) = mpsc::channel();
        let waiter = {
            let grace = Arc::clone(&grace);
            std::thread::spawn(move || {
                grace.wait();
                done_tx.send(()).unwrap();
            })
        };
        // A later operation, still running, must not hold the wait up...
        while grace.epoch.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        let _late = grace.enter();
        // ...but the earlier one does.
        assert!(done.recv_timeout(Duration::from_millis(50)).is_err(), "wait ignored a running operation");
        release.send(()).unwrap();
        done.recv_timeout(Duration::from_secs(10)).unwrap();
        early.join().unwrap();
        waiter.join().unwrap();
    }
}
