//! The partition health state machine: the one place where a partition's
//! state changes.
//!
//! The state is derived from three facts, so it can never disagree with
//! them: whether the partition is still loading, the fault that stopped it
//! (if any), and the set of read-only reasons. Every change of the derived
//! state is logged (ERROR when a partition goes `faulted` or `read_only`,
//! INFO when it comes back), counted, and exported as the one-hot gauge
//! `datanode_partition_state{partition,disk,state}`.
//!
//! | state | serves | entered when | leaves when |
//! |---|---|---|---|
//! | [`State::Loading`] | nothing | the partition is opened | replay ok -> `Healthy` (or `ReadOnly` if a reason is set); replay fails -> `Faulted` |
//! | [`State::Healthy`] | reads, writes | load ok, recover ok, last read-only reason cleared | a fault -> `Faulted`; a reason set -> `ReadOnly` |
//! | [`State::ReadOnly`] | reads | a reason set: disk full, operator, disk degraded, snapshot install | last reason cleared -> `Healthy`; a fault -> `Faulted` |
//! | [`State::Faulted`] | nothing | write/sync error, corruption, read errors past tolerance, dead writer, disk faulted | a successful `recover` -> `Healthy` or `ReadOnly` |
//!
//! A fault is sticky: it is also written to the partition's directory (see
//! `fault_file.rs`) and only a successful recover clears it.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

/// Why a partition refuses writes while still serving reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ReadOnlyReason {
    /// ENOSPC/EDQUOT/EFBIG on a write, or free space under the threshold.
    DiskFull,
    /// An operator asked for it.
    Operator,
    /// The disk's probe syncs are slow.
    DiskDegraded,
    /// A snapshot is being installed.
    SnapshotInstall,
}

impl ReadOnlyReason {
    /// Stable name, as shown over HTTP and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadOnlyReason::DiskFull => "disk_full",
            ReadOnlyReason::Operator => "operator",
            ReadOnlyReason::DiskDegraded => "disk_degraded",
            ReadOnlyReason::SnapshotInstall => "snapshot_install",
        }
    }
}

/// What stopped a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultCause {
    /// A write, sync or metadata operation failed.
    Io,
    /// Bytes on disk fail their checks.
    Corruption,
    /// Reads failed more often than the tolerance.
    ReadErrors,
    /// The log's writer is gone.
    WriterDied,
    /// The whole disk was declared faulted.
    DiskFaulted,
    /// A fault record was found on disk but could not be read.
    Unknown,
}

impl FaultCause {
    /// Stable name, used as the `cause` metric label and on disk.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultCause::Io => "io",
            FaultCause::Corruption => "corruption",
            FaultCause::ReadErrors => "read_errors",
            FaultCause::WriterDied => "writer_died",
            FaultCause::DiskFaulted => "disk_faulted",
            FaultCause::Unknown => "unknown",
        }
    }

    /// The cause named `name` (the inverse of [`FaultCause::as_str`]).
    pub fn parse(name: &str) -> FaultCause {
        [
            FaultCause::Io,
            FaultCause::Corruption,
            FaultCause::ReadErrors,
            FaultCause::WriterDied,
            FaultCause::DiskFaulted,
        ]
        .into_iter()
        .find(|cause| cause.as_str() == name)
        .unwrap_or(FaultCause::Unknown)
    }
}

/// A fault with its context: what failed, how, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The kind of fault.
    pub cause: FaultCause,
    /// The operation that failed (`write`, `sync`, `read`, `open`, ...).
    pub op: String,
    /// The OS error number, when there is one.
    pub errno: Option<i32>,
    /// Human-readable detail.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

impl Fault {
    /// A failed file operation `op`, classified by its errno.
    pub fn io(op: &str, error: &std::io::Error) -> Fault {
        Fault {
            cause: FaultCause::Io,
            op: op.to_string(),
            errno: error.raw_os_error(),
            message: error.to_string(),
            at: SystemTime::now(),
        }
    }

    /// A WAL error, classified by its kind and errno, never by its message.
    pub fn from_wal(error: &datanode_wal::Error) -> Fault {
        let cause = match error {
            datanode_wal::Error::Corruption { .. } => FaultCause::Corruption,
            datanode_wal::Error::Closed => FaultCause::WriterDied,
            _ => FaultCause::Io,
        };
        let op = error.op().map_or("open", |op| op.as_str()).to_string();
        Fault { cause, op, errno: error.errno(), message: error.to_string(), at: SystemTime::now() }
    }

    /// Bytes or metadata that are not what was written, found during `op`.
    pub fn corruption(op: &str, message: impl Into<String>) -> Fault {
        Fault {
            cause: FaultCause::Corruption,
            op: op.to_string(),
            errno: None,
            message: message.into(),
            at: SystemTime::now(),
        }
    }

    /// The partition's disk was declared faulted.
    pub fn disk_faulted(disk: &str) -> Fault {
        Fault {
            cause: FaultCause::DiskFaulted,
            op: "probe".into(),
            errno: None,
            message: format!("disk {disk} is faulted"),
            at: SystemTime::now(),
        }
    }

    /// True for "no space" errnos (ENOSPC, EDQUOT, EFBIG): the disk is
    /// full, not broken.
    pub fn is_disk_full(&self) -> bool {
        self.errno.is_some_and(|errno| matches!(errno, libc::ENOSPC | libc::EDQUOT | libc::EFBIG))
    }
}

/// Where a fault was seen. It decides, in one place, what faulting a
/// partition does besides the state change (see `Partition::fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSource {
    /// An operation of the partition itself failed (a write, sync, read,
    /// open): counted in `datanode_io_errors_total` and recorded in `FAULT`.
    Operation,
    /// The node's fault journal remembered it from before a restart:
    /// recorded in `FAULT` now, not counted again.
    Journal,
    /// Read back from the partition's own `FAULT` record at open: already
    /// recorded and counted.
    Record,
    /// The whole disk was declared faulted: neither counted per partition
    /// nor written to `FAULT` (the disk may not take a write, and a hung one
    /// would hang the caller); the fault journal on the other disks keeps it
    /// sticky.
    Disk,
}

impl FaultSource {
    /// Whether the fault counts as an I/O error of the partition's disk.
    pub fn counts_as_io_error(self) -> bool {
        self == FaultSource::Operation
    }

    /// Whether the fault is written to the partition's `FAULT` file.
    pub fn is_recorded(self) -> bool {
        matches!(self, FaultSource::Operation | FaultSource::Journal)
    }
}

/// The state of a partition, as the outside world sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Replaying its log; serves nothing.
    Loading,
    /// Serves reads and writes.
    Healthy,
    /// Serves reads only, for the reasons given (never empty).
    ReadOnly(BTreeSet<ReadOnlyReason>),
    /// Serves nothing until recovered.
    Faulted(Fault),
}

impl State {
    /// Stable name: `loading`, `healthy`, `read_only` or `faulted`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Loading => "loading",
            State::Healthy => "healthy",
            State::ReadOnly(_) => "read_only",
            State::Faulted(_) => "faulted",
        }
    }
}

/// Every state name, for one-hot gauges.
pub const STATE_NAMES: [&str; 4] = ["loading", "healthy", "read_only", "faulted"];

/// The state and when it began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Current state.
    pub state: State,
    /// When the current state began.
    pub since: SystemTime,
    /// The last error seen, even if it did not change the state.
    pub last_error: Option<Fault>,
}

#[derive(Debug)]
struct Facts {
    loading: bool,
    fault: Option<Fault>,
    reasons: BTreeSet<ReadOnlyReason>,
    since: SystemTime,
    last_error: Option<Fault>,
}

impl Facts {
    fn state(&self) -> State {
        match (&self.fault, self.loading) {
            (Some(fault), _) => State::Faulted(fault.clone()),
            (None, true) => State::Loading,
            (None, false) if self.reasons.is_empty() => State::Healthy,
            (None, false) => State::ReadOnly(self.reasons.clone()),
        }
    }
}

/// A partition's health: the state machine and its reporting.
#[derive(Debug)]
pub struct Health {
    partition: u64,
    disk: String,
    facts: Mutex<Facts>,
}

impl Health {
    /// A partition that starts loading.
    pub fn new(partition: u64, disk: &str) -> Health {
        let health = Health {
            partition,
            disk: disk.to_string(),
            facts: Mutex::new(Facts {
                loading: true,
                fault: None,
                reasons: BTreeSet::new(),
                since: SystemTime::now(),
                last_error: None,
            }),
        };
        health.export(&State::Loading);
        health
    }

    /// The current state, when it began, and the last error.
    pub fn snapshot(&self) -> HealthSnapshot {
        let facts = self.lock();
        HealthSnapshot { state: facts.state(), since: facts.since, last_error: facts.last_error.clone() }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.lock().state()
    }

    /// Loading finished well: `Loading -> Healthy | ReadOnly`.
    pub(crate) fn loaded(&self) {
        self.change("loaded", |facts| facts.loading = false);
    }

    /// `any -> Faulted`. The first fault is kept; a second one while
    /// faulted is only recorded as the last error. Returns whether this
    /// was the first. Only `Partition::fault` calls it.
    pub(crate) fn fault(&self, fault: Fault) -> bool {
        metrics::counter!(
            "datanode_partition_faults_total",
            "partition" => self.partition.to_string(),
            "disk" => self.disk.clone(),
            "cause" => fault.cause.as_str()
        )
        .increment(1);
        let mut first = false;
        self.change("fault", |facts| {
            facts.last_error = Some(fault.clone());
            if facts.fault.is_none() {
                facts.fault = Some(fault);
                first = true;
            }
            facts.loading = false;
        });
        first
    }

    /// The fault that stopped the partition, if it is faulted.
    pub fn fault_cause(&self) -> Option<Fault> {
        self.lock().fault.clone()
    }

    /// Records an error that does not (yet) change the state.
    pub(crate) fn note_error(&self, error: Fault) {
        self.lock().last_error = Some(error);
    }

    /// Sets a read-only reason: `Healthy -> ReadOnly`; no change otherwise.
    pub(crate) fn add_reason(&self, reason: ReadOnlyReason) {
        self.change("read_only", |facts| {
            facts.reasons.insert(reason);
        });
    }

    /// Clears a read-only reason: `ReadOnly -> Healthy` when it was the last.
    pub(crate) fn clear_reason(&self, reason: ReadOnlyReason) {
        self.change("read_only_cleared", |facts| {
            facts.reasons.remove(&reason);
        });
    }

    /// Whether `reason` is set.
    pub fn has_reason(&self, reason: ReadOnlyReason) -> bool {
        self.lock().reasons.contains(&reason)
    }

    /// A recover succeeded: `Faulted -> Healthy | ReadOnly`.
    pub(crate) fn recovered(&self) {
        self.change("recovered", |facts| {
            facts.fault = None;
            facts.loading = false;
        });
    }

    fn lock(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `update`; if the derived state changed, stamps, logs and
    /// exports the transition.
    fn change(&self, event: &'static str, update: impl FnOnce(&mut Facts)) {
        let (before, after) = {
            let mut facts = self.lock();
            let before = facts.state();
            update(&mut facts);
            let after = facts.state();
            if before != after {
                facts.since = SystemTime::now();
            }
            (before, after)
        };
        if before == after {
            return;
        }
        let (partition, disk) = (self.partition, self.disk.as_str());
        match &after {
            State::Faulted(fault) => tracing::error!(
                partition,
                disk,
                event,
                from = before.name(),
                cause = fault.cause.as_str(),
                op = fault.op.as_str(),
                errno = fault.errno,
                error = fault.message.as_str(),
                "partition faulted"
            ),
            // Read-only because someone asked for it (an operator, an
            // install) is no failure: WARN; for a disk's sake, ERROR.
            State::ReadOnly(reasons)
                if reasons.iter().all(|r| matches!(r, ReadOnlyReason::Operator | ReadOnlyReason::SnapshotInstall)) =>
            {
                tracing::warn!(
                    partition,
                    disk,
                    event,
                    from = before.name(),
                    reasons = ?reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                    "partition read-only"
                )
            }
            State::ReadOnly(reasons) => tracing::error!(
                partition,
                disk,
                event,
                from = before.name(),
                reasons = ?reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                "partition read-only"
            ),
            State::Healthy | State::Loading => {
                tracing::info!(
                    partition,
                    disk,
                    event,
                    from = before.name(),
                    to = after.name(),
                    "partition state changed"
                )
            }
        }
        self.export(&after);
    }

    fn export(&self, state: &State) {
        for name in STATE_NAMES {
            metrics::gauge!(
                "datanode_partition_state",
                "partition" => self.partition.to_string(),
                "disk" => self.disk.clone(),
                "state" => name
            )
            .set(if name == state.name() { 1.0 } else { 0.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(cause: FaultCause) -> Fault {
        Fault { cause, op: "sync".into(), errno: Some(5), message: "EIO".into(), at: SystemTime::now() }
    }

    #[test]
    fn every_documented_exit_is_taken_and_nothing_else_moves_the_state() {
        let health = Health::new(1, "d0");
        assert_eq!(health.state(), State::Loading);
        health.add_reason(ReadOnlyReason::Operator);
        assert_eq!(health.state(), State::Loading, "a reason does not end loading");
        health.loaded();
        assert_eq!(health.state(), State::ReadOnly([ReadOnlyReason::Operator].into()));
        health.add_reason(ReadOnlyReason::DiskFull);
        health.clear_reason(ReadOnlyReason::Operator);
        assert_eq!(health.state(), State::ReadOnly([ReadOnlyReason::DiskFull].into()));
        health.clear_reason(ReadOnlyReason::DiskFull);
        assert_eq!(health.state(), State::Healthy);
        health.fault(fault(FaultCause::Io));
        health.fault(fault(FaultCause::Corruption));
        match health.state() {
            State::Faulted(first) => assert_eq!(first.cause, FaultCause::Io, "the first fault is kept"),
            other => panic!("{other:?}"),
        }
        assert_eq!(health.snapshot().last_error.map(|e| e.cause), Some(FaultCause::Corruption));
        health.add_reason(ReadOnlyReason::Operator);
        health.loaded();
        assert_eq!(health.state().name(), "faulted", "only recover leaves faulted");
        health.recovered();
        assert_eq!(health.state(), State::ReadOnly([ReadOnlyReason::Operator].into()));
    }

    #[test]
    fn a_failed_load_goes_straight_to_faulted() {
        let health = Health::new(2, "d0");
        health.fault(fault(FaultCause::Corruption));
        assert_eq!(health.state().name(), "faulted");
        health.recovered();
        assert_eq!(health.state(), State::Healthy);
    }

    #[test]
    fn cause_names_round_trip() {
        for cause in [FaultCause::Io, FaultCause::Corruption, FaultCause::ReadErrors, FaultCause::WriterDied] {
            assert_eq!(FaultCause::parse(cause.as_str()), cause);
        }
        assert_eq!(FaultCause::parse("gibberish"), FaultCause::Unknown);
    }
}
