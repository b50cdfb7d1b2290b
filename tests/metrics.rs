//! `/metrics` of a live node is what Prometheus needs: every distribution
//! a histogram (aggregatable across nodes), HELP text on every family
//! (`promtool check metrics` clean), and the fault and I/O error
//! counters at 0 from the start so that `increase()` sees the first one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Daemon, call, wait_for};

/// `tool`'s path, or `None` (SKIPPED) when it is not installed; with
/// `DATANODE_REQUIRE_KERNEL_TESTS=1` a missing tool fails instead.
fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = support::disks::which(name);
    if found.is_none() {
        assert!(
            std::env::var("DATANODE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"),
            "{name} is required (scripts/test.sh installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

#[test]
fn metrics_are_histograms_with_help_and_the_counters_exist_at_zero() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[("DATANODE_HEALTH__PROBE_INTERVAL", "100ms")]);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/1/blobs/k")), Some(b"v")).0, 201);
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/1/blobs/k")), None).0, 200);
    wait_for("a disk probe", Duration::from_secs(30), || daemon.metrics().contains("datanode_disk_probe_sync_seconds"));
    let text = daemon.metrics();
    for family in [
        "datanode_request_seconds",
        "datanode_wal_sync_seconds",
        "datanode_wal_batch_records",
        "datanode_disk_probe_sync_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {family} histogram\n")), "{family} is not a histogram:\n{text}");
        assert!(text.contains(&format!("{family}_bucket{{")), "{family} has no buckets:\n{text}");
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split(' ').nth(2).unwrap();
        assert!(text.contains(&format!("# HELP {family} ")), "{family} has no HELP text");
    }
    for partition in 1..=4 {
        for cause in ["io", "corruption", "read_errors", "writer_died", "disk_faulted"] {
            let labels = [format!("partition=\"{partition}\""), format!("cause=\"{cause}\""), "disk=\"d0\"".into()];
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            assert_eq!(daemon.metric("datanode_partition_faults_total", &labels), Some(0.0), "{labels:?}\n{text}");
        }
    }
    for op in ["write", "sync", "read"] {
        for errno in ["5", "28"] {
            let labels = [format!("op=\"{op}\""), format!("errno=\"{errno}\""), "disk=\"d0\"".into()];
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            assert_eq!(daemon.metric("datanode_io_errors_total", &labels), Some(0.0), "{labels:?}\n{text}");
        }
    }
    assert!(daemon.metric("datanode_disk_total_bytes", &["disk=\"d0\""]).is_some_and(|b| b > 0.0), "{text}");
    for family in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds"]
    {
        assert!(text.lines().any(|l| l.starts_with(&format!("{family} "))), "{family} missing:\n{text}");
    }
    // A partition created later has its counters at 0 too.
    let create = ureq::post(&daemon.url("/v1/partitions"));
    assert_eq!(call(create, Some(br#"{"id":9,"disk":"d0"}"#)).0, 201);
    let labels = ["partition=\"9\"", "cause=\"io\""];
    assert_eq!(daemon.metric("datanode_partition_faults_total", &labels), Some(0.0));

    let Some(promtool) = tool("promtool") else { return };
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(daemon.metrics().as_bytes()).unwrap();
    let output = check.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
}
