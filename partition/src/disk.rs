//! Disks: a probe per disk, the disk's state, and what that state does to
//! the partitions on it.
//!
//! A probe writes a 4 KiB canary file (`<disk>/.datanode-probe`), syncs
//! it, reads it back and compares, on a thread of its own, and gives up after
//! `probe_timeout` (a hung disk). It also reads the filesystem's free space.
//!
//! | state | entered when | effect on the disk's partitions | leaves when |
//! |---|---|---|---|
//! | [`DiskState::Healthy`] | probe ok and fast, few partition faults | none | a probe is slow -> `Degraded`; fails -> `Faulted` |
//! | [`DiskState::Degraded`] | the probe's sync took longer than `slow_sync` | `read_only(disk_degraded)` | a fast probe -> `Healthy`; a failure -> `Faulted` |
//! | [`DiskState::Faulted`] | the probe failed or timed out, or `faulted_partitions` of its partitions are faulted | every partition `faulted(disk_faulted)`: on every failed probe; when faulted by the count alone, once on entering (partitions recovered one by one then stay healthy) | probes succeed again and few partitions are faulted; partitions stay faulted until recovered |
//!
//! Free space, separately: at `full_ratio` used, partitions go
//! `read_only(disk_full)`; the reason is lifted only when usage is at or
//! below `resume_ratio` **and** the probe's write and sync succeeded
//! (hysteresis), by reopening each partition's log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use datanode_wal::{Space, Storage};

use crate::layout::DiskDir;
use crate::partition::Partition;
use crate::state::{Fault, FaultCause, FaultSource, ReadOnlyReason, State};

/// Name of the probe's canary file at the root of each disk.
pub const PROBE_FILE: &str = ".datanode-probe";
const PROBE_LEN: usize = 4096;

/// The state of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    /// Probes succeed quickly.
    Healthy,
    /// Probes succeed, slowly: its partitions are read-only.
    Degraded,
    /// Probes fail, or many of its partitions are faulted.
    Faulted,
}

impl DiskState {
    /// Stable name: `healthy`, `degraded`, `faulted`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::Healthy => "healthy",
            DiskState::Degraded => "degraded",
            DiskState::Faulted => "faulted",
        }
    }
}

/// Thresholds of the disk state machine.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// A probe that takes longer fails.
    pub probe_timeout: Duration,
    /// A probe sync slower than this makes the disk degraded.
    pub slow_sync: Duration,
    /// Used/total at or above which partitions go `read_only(disk_full)`.
    pub full_ratio: f64,
    /// Used/total at or below which `disk_full` may be lifted.
    pub resume_ratio: f64,
    /// This many faulted partitions make the disk faulted.
    pub faulted_partitions: usize,
}

impl Default for DiskOptions {
    fn default() -> DiskOptions {
        DiskOptions {
            probe_timeout: Duration::from_secs(10),
            slow_sync: Duration::from_millis(500),
            full_ratio: 0.95,
            resume_ratio: 0.90,
            faulted_partitions: 3,
        }
    }
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// When it ran.
    pub at: SystemTime,
    /// How long its sync took (the timeout, if it hung).
    pub sync_seconds: f64,
    /// Whether write, sync and read-back all succeeded in time.
    pub ok: bool,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// A disk as reported to operators.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskStatus {
    /// Its name.
    pub name: String,
    /// Its path.
    pub path: std::path::PathBuf,
    /// Its state.
    pub state: DiskState,
    /// Why it is not healthy, and whether it is full.
    pub reasons: Vec<String>,
    /// Filesystem size, if known.
    pub total_bytes: Option<u64>,
    /// Free bytes, if known.
    pub free_bytes: Option<u64>,
    /// Ids of the partitions on it.
    pub partitions: Vec<u64>,
    /// The last probe.
    pub last_probe: Option<ProbeResult>,
}

#[derive(Debug)]
struct Facts {
    state: DiskState,
    reasons: Vec<String>,
    full: bool,
    space: Option<Space>,
    last_probe: Option<ProbeResult>,
}

/// One disk's probe and state.
#[derive(Debug)]
pub struct Disk {
    dir: DiskDir,
    storage: Arc<dyn Storage>,
    options: DiskOptions,
    facts: Mutex<Facts>,
    /// A probe thread is still running (the disk hangs); no second one is
    /// started until it returns.
    probing: Arc<AtomicBool>,
}

impl Disk {
    /// A disk that starts healthy, before its first probe.
    pub fn new(dir: DiskDir, storage: Arc<dyn Storage>, options: DiskOptions) -> Disk {
        let disk = Disk {
            dir,
            storage,
            options,
            facts: Mutex::new(Facts {
                state: DiskState::Healthy,
                reasons: Vec::new(),
                full: false,
                space: None,
                last_probe: None,
            }),
            probing: Arc::new(AtomicBool::new(false)),
        };
        disk.export(DiskState::Healthy);
        disk
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.dir.name
    }

    fn lock(&self) -> MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current state.
    pub fn state(&self) -> DiskState {
        self.lock().state
    }

    /// Status for operators; `partitions` are the ids on this disk.
    pub fn status(&self, partitions: Vec<u64>) -> DiskStatus {
        let facts = self.lock();
        let mut reasons = facts.reasons.clone();
        if facts.full {
            reasons.push("disk_full".into());
        }
        DiskStatus {
            name: self.dir.name.clone(),
            path: self.dir.path.clone(),
            state: facts.state,
            reasons,
            total_bytes: facts.space.map(|s| s.total),
            free_bytes: facts.space.map(|s| s.free),
            partitions,
            last_probe: facts.last_probe.clone(),
        }
    }

    /// Probes the disk and applies the outcome to `partitions` (those on
    /// this disk). Blocking, for at most about `probe_timeout`.
    pub fn check(&self, partitions: &[Arc<Partition>]) -> DiskStatus {
        let (probe, space) = self.probe();
        let faulted = partitions
            .iter()
            .filter(|p| matches!(p.health().state(), State::Faulted(f) if f.cause != FaultCause::DiskFaulted))
            .count();
        let mut reasons = Vec::new();
        let state = if !probe.ok {
            reasons.push(format!("probe failed: {}", probe.error.as_deref().unwrap_or("unknown")));
            DiskState::Faulted
        } else if faulted >= self.options.faulted_partitions {
            reasons.push(format!("{faulted} partitions faulted"));
            DiskState::Faulted
        } else if probe.sync_seconds > self.options.slow_sync.as_secs_f64() {
            reasons.push(format!("slow sync: {:.3}s", probe.sync_seconds));
            DiskState::Degraded
        } else {
            DiskState::Healthy
        };
        let used = space.map(|s| if s.total == 0 { 0.0 } else { 1.0 - s.free as f64 / s.total as f64 });
        let (before, full) = {
            let mut facts = self.lock();
            let before = facts.state;
            facts.full = match used {
                Some(used) if used >= self.options.full_ratio => true,
                Some(used) if used <= self.options.resume_ratio && probe.ok => false,
                _ => facts.full,
            };
            facts.state = state;
            facts.reasons = reasons.clone();
            facts.space = space.or(facts.space);
            facts.last_probe = Some(probe.clone());
            (before, facts.full)
        };
        if before != state {
            self.export(state);
            match state {
                DiskState::Healthy => tracing::info!(disk = self.dir.name, "disk healthy"),
                _ => tracing::error!(disk = self.dir.name, state = state.as_str(), ?reasons, "disk not healthy"),
            }
        }
        metrics::histogram!("datanode_disk_probe_sync_seconds", "disk" => self.dir.name.clone())
            .record(probe.sync_seconds);
        if let Some(space) = space {
            metrics::gauge!("datanode_disk_free_bytes", "disk" => self.dir.name.clone()).set(space.free as f64);
        }
        self.apply(state, before, full, probe.ok, partitions);
        self.status(partitions.iter().map(|p| p.id()).collect())
    }

    /// A failing probe faults every partition of the disk, each round: a
    /// partition recovered meanwhile is faulted again, since its disk still
    /// fails. A disk faulted only by the count of its faulted partitions
    /// (its probe works) faults the others once, when it enters the state:
    /// an operator may then recover partitions one by one, and each stays
    /// healthy.
    fn apply(&self, state: DiskState, before: DiskState, full: bool, probe_ok: bool, partitions: &[Arc<Partition>]) {
        for partition in partitions {
            match state {
                DiskState::Faulted => {
                    let entering = before != DiskState::Faulted;
                    if (entering || !probe_ok) && !matches!(partition.health().state(), State::Faulted(_)) {
                        partition.fault(Fault::disk_faulted(&self.dir.name), FaultSource::Disk);
                    }
                }
                DiskState::Degraded => partition.set_reason(ReadOnlyReason::DiskDegraded, true),
                DiskState::Healthy => partition.set_reason(ReadOnlyReason::DiskDegraded, false),
            }
            if full {
                partition.set_reason(ReadOnlyReason::DiskFull, true);
                partition.reopen_poisoned_log();
            } else if probe_ok && partition.health().has_reason(ReadOnlyReason::DiskFull) {
                // A write and sync just worked and usage is low again.
                partition.retry_after_disk_full();
            }
        }
    }

    /// Runs the canary write + sync + read and the free-space query on a
    /// thread of its own, waiting at most `probe_timeout`.
    fn probe(&self) -> (ProbeResult, Option<Space>) {
        let at = SystemTime::now();
        let timeout = self.options.probe_timeout;
        let failed =
            |error: String, seconds: f64| ProbeResult { at, sync_seconds: seconds, ok: false, error: Some(error) };
        if self.probing.swap(true, Ordering::AcqRel) {
            return (failed("previous probe still hanging".into(), timeout.as_secs_f64()), None);
        }
        let (tx, rx) = mpsc::channel();
        let (storage, root, probing) = (Arc::clone(&self.storage), self.dir.path.clone(), Arc::clone(&self.probing));
        let spawned = std::thread::Builder::new().name(format!("probe-{}", self.dir.name)).spawn(move || {
            let outcome = canary(storage.as_ref(), &root);
            let space = storage.space(&root).ok();
            probing.store(false, Ordering::Release);
            let _ = tx.send((outcome, space));
        });
        if let Err(error) = spawned {
            self.probing.store(false, Ordering::Release);
            return (failed(format!("cannot start probe: {error}"), 0.0), None);
        }
        match rx.recv_timeout(timeout) {
            Ok((Ok(sync), space)) => {
                (ProbeResult { at, sync_seconds: sync.as_secs_f64(), ok: true, error: None }, space)
            }
            Ok((Err(error), space)) => (failed(error, 0.0), space),
            Err(_) => (failed(format!("no answer within {timeout:?}"), timeout.as_secs_f64()), None),
        }
    }

    fn export(&self, state: DiskState) {
        for candidate in [DiskState::Healthy, DiskState::Degraded, DiskState::Faulted] {
            metrics::gauge!("datanode_disk_state", "disk" => self.dir.name.clone(), "state" => candidate.as_str())
                .set(if candidate == state { 1.0 } else { 0.0 });
        }
    }
}

/// Writes, syncs and reads back the canary; returns how long the sync took.
fn canary(storage: &dyn Storage, root: &std::path::Path) -> Result<Duration, String> {
    let path = root.join(PROBE_FILE);
    let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let pattern: Vec<u8> = stamp.to_le_bytes().iter().copied().cycle().take(PROBE_LEN).collect();
    let file = storage.open(&path, true).map_err(|e| format!("open: {e}"))?;
    file.write_all_at(0, &[Bytes::from(pattern.clone())]).map_err(|e| format!("write: {e}"))?;
    let started = Instant::now();
    file.sync_data().map_err(|e| format!("sync: {e}"))?;
    let sync = started.elapsed();
    let back = file.read_exact_at(0, PROBE_LEN).map_err(|e| format!("read: {e}"))?;
    if back != pattern {
        return Err("read back different bytes".into());
    }
    Ok(sync)
}
