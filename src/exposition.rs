//! The Prometheus exposition: the recorder with histogram buckets for
//! every distribution (never summaries: histograms aggregate across
//! nodes), HELP text for every family, and the counters that must exist at
//! 0 before their first event so that `increase()` sees it.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Seconds, from 100 µs (an fdatasync on a fast SSD) to 10 s (a hung disk).
const SYNC_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Seconds of a request, from 250 µs (a cached GET) to 30 s (the default timeout).
const REQUEST_BUCKETS: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Records per group-commit batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// Fault causes, as `datanode_partition_faults_total{cause}` names them.
pub const FAULT_CAUSES: [&str; 6] = ["io", "corruption", "read_errors", "writer_died", "disk_faulted", "unknown"];
/// The operations and errnos of `datanode_io_errors_total` that exist at 0
/// on every disk: the operations of the data path and the errnos a failing
/// disk gives (EIO, ENOSPC, EROFS, EDQUOT). Other combinations (rare
/// errnos, `open`, `sync_dir`, `metadata`) appear at their first
/// occurrence; every one of them also faults or counts against a
/// partition, which `datanode_partition_faults_total` shows from 0.
pub const IO_ERROR_OPS: [&str; 3] = ["write", "sync", "read"];
/// See [`IO_ERROR_OPS`].
pub const IO_ERRNOS: [i32; 4] = [libc::EIO, libc::ENOSPC, libc::EROFS, libc::EDQUOT];

/// Installs the global recorder and describes every family.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("datanode_request_seconds".into()), REQUEST_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("datanode_wal_sync_seconds".into()), SYNC_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("datanode_disk_probe_sync_seconds".into()), SYNC_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("datanode_wal_batch_records".into()), BATCH_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(
        "datanode_partition_state",
        "Partition health, one-hot over state (loading, healthy, read_only, faulted)"
    );
    describe_gauge!("datanode_partitions", "Partitions on this node by state");
    describe_counter!("datanode_partition_faults_total", "Faults of a partition by cause");
    describe_counter!("datanode_io_errors_total", "Failed disk operations by disk, operation and errno");
    describe_gauge!("datanode_disk_state", "Disk health, one-hot over state (healthy, degraded, faulted)");
    describe_gauge!("datanode_disk_free_bytes", Unit::Bytes, "Free bytes on the disk's file system");
    describe_gauge!("datanode_disk_total_bytes", Unit::Bytes, "Size of the disk's file system");
    describe_histogram!("datanode_disk_probe_sync_seconds", Unit::Seconds, "Duration of the disk probe's fdatasync");
    describe_counter!("datanode_wal_appends_total", "Records appended to the partition's log");
    describe_counter!("datanode_wal_append_bytes_total", Unit::Bytes, "Bytes appended to the partition's log");
    describe_counter!("datanode_wal_syncs_total", "fdatasync calls of the partition's log");
    describe_histogram!("datanode_wal_sync_seconds", Unit::Seconds, "Duration of a log's fdatasync, by disk");
    describe_histogram!("datanode_wal_batch_records", "Records per group-commit batch");
    describe_counter!("datanode_requests_total", "HTTP requests by operation and status code");
    describe_histogram!("datanode_request_seconds", Unit::Seconds, "HTTP request duration by operation");
    describe_gauge!("datanode_build_info", "Always 1; the version and git revision as labels");
    describe_gauge!(
        "datanode_unadopted_partitions",
        "Directories holding a valid partition that the node does not serve"
    );
    describe_gauge!(
        "datanode_partition_garbage_bytes",
        Unit::Bytes,
        "Bytes of a partition's logs that no live blob needs (overwritten, deleted, tombstones)"
    );
    describe_counter!("datanode_compactions_total", "Compactions of a partition by result (ok, failed, skipped)");
    describe_counter!("datanode_compaction_bytes_total", Unit::Bytes, "Live bytes copied by compaction, by disk");
    describe_counter!(
        "datanode_auth_rejected_total",
        "Requests refused for want of a valid credential, by reason (admin: a missing or wrong admin token)"
    );
    describe_counter!(
        "datanode_tls_handshake_failures_total",
        "TLS handshakes that failed (no or a bad client certificate, not TLS) or timed out, by reason"
    );
    describe_gauge!(
        "datanode_tls_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the certificate the listener serves expires (Unix time)"
    );
    describe_counter!(
        "datanode_credential_reloads_total",
        "Loads of changed credential files (tls, data_tokens), by result (ok, refused)"
    );
    describe_counter!(
        "datanode_peer_requests_total",
        "Raft RPCs sent to peer nodes, by rpc and result (ok, timeout, unreachable, network, cancelled)"
    );
    describe_counter!(
        "datanode_peer_served_total",
        "Raft RPCs served to peer nodes, by rpc and result (ok or a refusal code)"
    );
    describe_gauge!("datanode_peer_connections", "Open connections to (outbound) and from (inbound) peer nodes");
    describe_counter!("datanode_peer_connects_total", "Connection attempts to peer nodes, by result (ok, failed)");
    describe_counter!("datanode_peer_accepts_total", "Connections from peer nodes, by result (admitted, refused)");
    describe_counter!(
        "datanode_peer_rejected_total",
        "Peers refused on the peer port, by reason: connections before any request (bad_proof, no_handshake, \
         malformed, timeout, bad_certificate, busy), requests speaking for another node (wrong_node)"
    );
    describe_gauge!(
        "datanode_raft_role",
        "Raft role of this node's replica of a partition, one-hot (leader, follower, learner, candidate, shutdown)"
    );
    describe_gauge!("datanode_raft_term", "Current Raft term of this node's replica of a partition");
    describe_gauge!("datanode_raft_commit_index", "Last log index this replica knows committed");
    describe_gauge!("datanode_raft_applied_index", "Last log index this replica applied");
    describe_counter!("datanode_raft_leader_changes_total", "Times this replica saw its group's leader change");
    describe_gauge!(
        "datanode_partition_replicas",
        "On the metadata leader: replicas of a partition by state (healthy, faulted, down, learner)"
    );
    describe_gauge!("datanode_cluster_nodes", "On the metadata leader: cluster nodes by state (up, down)");
    describe_gauge!(
        "datanode_partitions_under_replicated",
        "On the metadata leader: partitions with fewer healthy replicas than placed"
    );
    describe_gauge!("datanode_cluster_repairs_in_progress", "On the metadata leader: replicas being replaced now");
    describe_counter!(
        "datanode_cluster_repairs_total",
        "Repairs this node started, finished or abandoned as metadata leader, by outcome"
    );
}

/// `datanode_auth_rejected_total{reason}` for every reason, and the TLS
/// counters when the listener serves TLS.
pub fn zero_security_counters(tls: bool) {
    for reason in crate::auth::Denied::ALL.iter().map(|d| d.as_str()).chain(["admin"]) {
        metrics::counter!("datanode_auth_rejected_total", "reason" => reason).increment(0);
    }
    if tls {
        for reason in ["failed", "timeout"] {
            metrics::counter!("datanode_tls_handshake_failures_total", "reason" => reason).increment(0);
        }
    }
    for credential in ["tls", "data_tokens"].into_iter().filter(|c| tls || *c == "data_tokens") {
        for result in ["ok", "refused"] {
            metrics::counter!("datanode_credential_reloads_total", "credential" => credential, "result" => result)
                .increment(0);
        }
    }
}

/// Creates the counters that must exist at 0 before their first event.
#[derive(Debug, Default)]
pub struct ZeroCounters {
    partitions: Mutex<HashSet<u64>>,
    disks: Mutex<HashSet<String>>,
}

impl ZeroCounters {
    /// `datanode_partition_faults_total{partition,disk,cause}` for every cause.
    pub fn partition(&self, id: u64, disk: &str) {
        if !self.partitions.lock().unwrap_or_else(PoisonError::into_inner).insert(id) {
            return;
        }
        for cause in FAULT_CAUSES {
            metrics::counter!(
                "datanode_partition_faults_total",
                "partition" => id.to_string(),
                "disk" => disk.to_string(),
                "cause" => cause
            )
            .increment(0);
        }
    }

    /// `datanode_io_errors_total{disk,op,errno}` for the common operations and errnos.
    pub fn disk(&self, disk: &str) {
        if !self.disks.lock().unwrap_or_else(PoisonError::into_inner).insert(disk.to_string()) {
            return;
        }
        for op in IO_ERROR_OPS {
            for errno in IO_ERRNOS {
                metrics::counter!(
                    "datanode_io_errors_total",
                    "disk" => disk.to_string(),
                    "op" => op,
                    "errno" => errno.to_string()
                )
                .increment(0);
            }
        }
    }
}

/// The process metrics Prometheus client libraries export (the
/// "process collector"), read from `/proc/self`: CPU seconds, resident and
/// virtual memory, open and maximum file descriptors, threads, start time.
/// Appended to the exposition at every scrape; what cannot be read is left out.
pub fn process_metrics() -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(value) = value {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
    };
    // SAFETY: sysconf has no preconditions; it only returns a value.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let ticks = (ticks > 0).then_some(ticks as f64);
    let cpu = field(14).zip(field(15)).zip(ticks).map(|((user, system), ticks)| (user + system) / ticks);
    family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu);
    let rss = field(24).map(|pages| pages * page.max(0) as f64);
    family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss);
    family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", field(23));
    family("process_threads", "gauge", "Number of OS threads in the process.", field(20));
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("btime ").and_then(|b| b.trim().parse::<f64>().ok())));
    let start = field(22).zip(ticks).zip(boot).map(|((start, ticks), boot)| boot + start / ticks);
    family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start);
    let fds = std::fs::read_dir("/proc/self/fd").ok().map(|entries| entries.count() as f64);
    family("process_open_fds", "gauge", "Number of open file descriptors.", fds);
    let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        limits.lines().find(|l| l.starts_with("Max open files")).and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
    });
    family("process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds);
    out
}
