//! The running node: its registry, readiness, background loops, and the
//! shutdown sequence.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use datanode_partition::{DiskDir, DiskOptions, DiskState, PartitionDefaults, Registry};
use datanode_wal::{Durability, WalOptions};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::DataAuth;
use crate::config::Config;

/// Version with the git revision, as `--version` and the build-info metric
/// show it.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("DN_BUILD_REVISION"), ")");

/// How often the set of faulted partitions is handed to the fault journal.
const FAULT_JOURNAL_PERIOD: Duration = Duration::from_millis(200);

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Node {
    /// The effective configuration.
    pub config: Config,
    /// The partitions and disks.
    pub registry: Arc<Registry>,
    /// Bearer token for admin endpoints, if configured.
    pub admin_token: Option<String>,
    /// Who may write blobs.
    pub data_auth: Arc<DataAuth>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Loaded and serving.
    pub ready: AtomicBool,
    /// Shutting down: new writes get 503 `shutting_down`.
    pub draining: AtomicBool,
    /// Per disk name: the blocking operations it may still start.
    pub disk_permits: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Wakes the background threads when the node drains.
    pub drained: (Mutex<()>, Condvar),
    /// Counters created at 0 for every partition and disk seen.
    pub zero_counters: crate::exposition::ZeroCounters,
    /// Where alerts are pushed (`alerts.alertmanager_url`, reloaded on SIGHUP).
    alert_target: RwLock<Option<String>>,
    /// Cluster mode: set once the node has joined (`[cluster]`).
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl Node {
    /// A node serving `registry` under `config`.
    pub fn new(
        config: Config,
        registry: Registry,
        admin_token: Option<String>,
        data_auth: Arc<DataAuth>,
        metrics: PrometheusHandle,
    ) -> Node {
        let permits = config.limits.max_blocking_per_disk as usize;
        let disk_permits =
            config.disk.iter().map(|d| (d.name.clone(), Arc::new(tokio::sync::Semaphore::new(permits)))).collect();
        Node {
            registry: Arc::new(registry),
            admin_token,
            data_auth,
            metrics,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            disk_permits,
            drained: (Mutex::new(()), Condvar::new()),
            zero_counters: Default::default(),
            alert_target: RwLock::new(config.alerts.alertmanager_url.clone()),
            cluster: std::sync::OnceLock::new(),
            config,
        }
    }

    /// A permit to run one blocking operation on `disk`, if it has one
    /// left: a hung disk holds at most `max_blocking_per_disk` threads.
    pub fn disk_permit(&self, disk: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.disk_permits.get(disk).and_then(|permits| Arc::clone(permits).try_acquire_owned().ok())
    }

    /// This node's part in the cluster, in cluster mode.
    pub fn cluster(&self) -> Option<Arc<crate::cluster::Cluster>> {
        self.cluster.get().cloned()
    }

    /// Sets the cluster once joined.
    pub fn set_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The Alertmanager alerts go to now, if any.
    pub fn alert_target(&self) -> Option<String> {
        self.alert_target.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Sends alerts to `target` from now on (none: stop pushing).
    pub fn set_alert_target(&self, target: Option<String>) {
        *self.alert_target.write().unwrap_or_else(PoisonError::into_inner) = target;
    }

    /// Starts the drain: new writes are refused, background loops stop.
    pub fn begin_drain(&self) {
        let _held = self.drained.0.lock().unwrap_or_else(PoisonError::into_inner);
        self.draining.store(true, Ordering::Release);
        self.drained.1.notify_all();
    }

    /// Sleeps until `deadline`; `false` (at once) when the node drains.
    fn sleep_until(&self, deadline: Instant) -> bool {
        let mut held = self.drained.0.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.draining.load(Ordering::Acquire) {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            held = self.drained.1.wait_timeout(held, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Why `/readyz` says no, if it does.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.draining.load(Ordering::Acquire) {
            return Some("shutting down".into());
        }
        if !self.ready.load(Ordering::Acquire) {
            return Some("loading".into());
        }
        let disks = self.registry.disk_statuses();
        if !disks.is_empty() && disks.iter().all(|d| d.state == DiskState::Faulted) {
            return Some("every disk is faulted".into());
        }
        None
    }

    /// Largest snapshot image accepted by `PUT .../snapshot`.
    pub fn snapshot_limit(&self) -> usize {
        1 << 30
    }

    /// Gauges that are counts over partitions (`datanode_partitions{state}`),
    /// each partition's `datanode_partition_garbage_bytes`, disk sizes, and
    /// the counters that exist at 0 for every partition and disk (created
    /// once each).
    pub fn export_gauges(&self) {
        let partitions = self.registry.partitions();
        for partition in &partitions {
            self.zero_counters.partition(partition.id(), partition.disk());
            metrics::gauge!("datanode_partition_garbage_bytes", "partition" => partition.id().to_string())
                .set(partition.garbage_bytes() as f64);
        }
        for disk in &self.config.disk {
            self.zero_counters.disk(&disk.name);
        }
        for disk in self.registry.disk_statuses() {
            if let Some(total) = disk.total_bytes {
                metrics::gauge!("datanode_disk_total_bytes", "disk" => disk.name.clone()).set(total as f64);
            }
        }
        for state in datanode_partition::state::STATE_NAMES {
            let count = partitions.iter().filter(|p| p.health().state().name() == state).count();
            metrics::gauge!("datanode_partitions", "state" => state).set(count as f64);
        }
    }
}

/// Partition and disk options from the configuration.
pub fn partition_defaults(config: &Config) -> PartitionDefaults {
    let durability = match config.wal.durability.as_str() {
        "interval" => Durability::Interval(config.wal.sync_interval),
        "none" => Durability::None,
        _ => Durability::Sync,
    };
    PartitionDefaults {
        disk: DiskOptions {
            probe_timeout: config.health.probe_interval.max(Duration::from_secs(1)),
            slow_sync: config.health.slow_sync,
            full_ratio: config.health.disk_full_ratio,
            resume_ratio: config.health.disk_resume_ratio,
            ..DiskOptions::default()
        },
        wal: WalOptions {
            segment_size: config.wal.segment_size,
            durability,
            max_batch_bytes: config.wal.max_batch_bytes as usize,
            max_queued_bytes: config.limits.max_queued_bytes_per_partition as usize,
            recycled_segments: config.wal.recycled_segments as usize,
            ..WalOptions::new(0)
        },
        max_blob_size: config.limits.max_blob_size as usize,
        io_threads_per_disk: config.wal.io_threads_per_disk as usize,
        read_error_tolerance: 3,
    }
}

/// The configured disks.
pub fn disks(config: &Config) -> Vec<DiskDir> {
    config.disk.iter().map(|d| DiskDir { name: d.name.clone(), path: PathBuf::from(&d.path) }).collect()
}

/// The marker of a bootstrap under way, on the first disk: it holds `n`.
pub const BOOTSTRAP_MARKER: &str = ".datanode-bootstrap";

/// Creates partitions `1..=n` round-robin over the disks, on a node that
/// has none. A bootstrap cut short (a disk that failed half way) leaves
/// its marker on the first disk, so the next start creates the ids it
/// did not get to; once every one exists the marker goes. A node that has
/// partitions and no marker is never bootstrapped again (a partition an
/// operator deleted stays deleted).
pub fn bootstrap(registry: &Registry, n: u64) -> anyhow::Result<()> {
    let names: Vec<String> = registry.disks().iter().map(|d| d.name.clone()).collect();
    let Some(first) = registry.disks().first().map(|d| d.path.join(BOOTSTRAP_MARKER)) else { return Ok(()) };
    let pending = std::fs::read_to_string(&first).ok().and_then(|text| text.trim().parse::<u64>().ok());
    let n = match pending {
        Some(pending) => pending,
        None if n == 0 || !registry.partitions().is_empty() => return Ok(()),
        None => {
            write_durably(&first, n.to_string().as_bytes())
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", first.display()))?;
            n
        }
    };
    let mut created = 0;
    for id in 1..=n {
        if registry.get(id).is_some() {
            continue;
        }
        let disk = &names[(id as usize - 1) % names.len()];
        registry
            .create(id, disk)
            .map_err(|e| anyhow::anyhow!("bootstrap: cannot create partition {id} on disk {disk}: {e}"))?;
        created += 1;
    }
    std::fs::remove_file(&first).map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", first.display()))?;
    tracing::info!(partitions = n, created, resumed = pending.is_some(), "bootstrapped partitions");
    Ok(())
}

/// Writes `bytes` to `path` and syncs the file and its directory.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC`, for this process
/// when `WATCHDOG_PID` is set), halved: pings go out twice per period.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Probes the disks every `probe_interval` and runs the verifier every
/// `verify_interval`, each on a thread of its own (never the blocking pool
/// that requests use, which a hung disk may fill), and keeps the fault
/// journal current, until the node drains.
pub fn spawn_background(node: &Arc<Node>) -> std::io::Result<()> {
    let every = node.config.health.probe_interval;
    spawn_loop(node, "disk-probe", every, Duration::ZERO, |registry| {
        registry.check_disks();
    })?;
    let every = node.config.health.verify_interval;
    spawn_loop(node, "verifier", every, every, |registry| {
        registry.verify_once();
    })?;
    // One compaction thread per disk: a disk's copy budget is spent by one
    // compaction at a time, and a slow disk holds up only its own.
    let policy = datanode_partition::CompactionPolicy {
        garbage_ratio: node.config.compaction.garbage_ratio,
        min_garbage: node.config.compaction.min_garbage,
        max_bytes_per_sec: Some(node.config.compaction.max_bytes_per_sec),
    };
    let every = node.config.compaction.check_interval;
    for disk in node.registry.disks().iter().map(|d| d.name.clone()) {
        let watcher = Arc::clone(node);
        spawn_loop(node, &format!("compact-{disk}"), every, every, move |registry| {
            let outcomes = registry.compact_disk(&disk, &policy, || !watcher.draining.load(Ordering::Acquire));
            for (partition, outcome) in outcomes {
                match outcome {
                    Ok(report) => tracing::info!(
                        partition,
                        disk,
                        reclaimed_bytes = report.reclaimed_bytes(),
                        copied_bytes = report.copied_bytes,
                        "compacted by policy"
                    ),
                    Err(error) => tracing::warn!(partition, disk, %error, "compaction by policy did not run"),
                }
            }
        })?;
    }
    // Faults reach the journal on every disk within this period, not only
    // at the next probe (no I/O here: the journal's writers do that).
    let journal = Arc::clone(node);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FAULT_JOURNAL_PERIOD);
        while !journal.draining.load(Ordering::Acquire) {
            every.tick().await;
            journal.registry.sync_fault_journal();
        }
    });
    Ok(())
}

/// Runs `work` after `first`, then every `every`, on a thread named
/// `name`, until the node drains. A round that overruns is followed by
/// the next one at once, never by a burst.
fn spawn_loop(
    node: &Arc<Node>,
    name: &str,
    every: Duration,
    first: Duration,
    work: impl Fn(&Registry) + Send + 'static,
) -> std::io::Result<()> {
    let node = Arc::clone(node);
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut next = Instant::now() + first;
        while node.sleep_until(next) {
            work(&node.registry);
            next = (next + every).max(Instant::now());
        }
    })?;
    Ok(())
}

/// Tells systemd (`Type=notify`) about the node's state, if it is
/// listening. Best effort: a failure is logged, never fatal.
pub fn sd_notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| -> std::io::Result<usize> {
        let datagram = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = socket.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(state.as_bytes(), &address)
        } else {
            datagram.send_to(state.as_bytes(), std::path::Path::new(&socket))
        }
    })();
    if let Err(error) = sent {
        tracing::warn!(%error, state, "sd_notify failed");
    }
}
