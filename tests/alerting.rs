//! Alerting end to end with the real servers from Debian's packages:
//! Prometheus scrapes the node and evaluates the shipped rules
//! (`config/prometheus/alerts.yml`), the node pushes its own alerts, and
//! both reach a real Alertmanager. A real fault (write-back EIO under one
//! partition) makes `DatanodePartitionFaulted` fire with its `partition`
//! and `disk` labels by both routes; `recover` resolves it on both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::disks::{Fs, unavailable};
use support::fuse::{Action, Op, fuse_loop_disk};
use support::{Daemon, config_with_disks, free_port, wait_for};

/// A server process on a loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `program` with `--config.file` (holding `config`),
    /// `<storage_flag>` (a scratch directory), `--web.listen-address` on a
    /// free loopback port, and `extra` flags; waits for `/-/ready`.
    fn start(program: &str, storage_flag: &str, extra: &[&str], config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(program)
            .arg(format!("--config.file={}", dir.path().join("config.yml").display()))
            .arg(format!("{storage_flag}={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let server = Server { child, port, _dir: dir };
        wait_for(&format!("{program} ready"), Duration::from_secs(60), || {
            ureq::get(&server.url("/-/ready")).call().is_ok_and(|r| r.status() == 200)
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn alertmanager() -> Server {
    let config = "route:\n  receiver: default\n  group_wait: 1s\n  group_interval: 1s\nreceivers:\n  - name: default\n";
    Server::start("prometheus-alertmanager", "--storage.path", &["--cluster.listen-address="], config)
}

/// Scrapes the node every second and evaluates the shipped rules; its
/// alerts carry `via="prometheus"` to tell them from the node's own.
fn prometheus(node_port: u16, alertmanager_port: u16) -> Server {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  external_labels:\n    via: prometheus\n\
         rule_files:\n  - {}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{alertmanager_port}']\n\
         scrape_configs:\n  - job_name: datanode\n    static_configs:\n      - targets: ['127.0.0.1:{node_port}']\n",
        rules.display()
    );
    Server::start("prometheus", "--storage.tsdb.path", &[], &config)
}

/// Active `DatanodePartitionFaulted` alerts in Alertmanager for
/// `partition`, by route: (through Prometheus, pushed by the node).
fn faulted_alerts(alertmanager: &Server, partition: u64) -> (Vec<Value>, Vec<Value>) {
    let (_, body) = support::call(ureq::get(&alertmanager.url("/api/v2/alerts?active=true")), None);
    let alerts: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
    alerts
        .into_iter()
        .filter(|a| {
            a["labels"]["alertname"] == "DatanodePartitionFaulted"
                && a["labels"]["partition"] == partition.to_string().as_str()
        })
        .partition(|a| a["labels"]["via"] == "prometheus")
}

#[test]
fn a_partition_fault_alerts_through_prometheus_and_the_node_and_recover_resolves_it() {
    if unavailable(&["prometheus", "prometheus-alertmanager", "fusermount3", "mkfs.ext4", "xfs_io"]).is_some() {
        return;
    }
    let alertmanager = alertmanager();
    let (d0, rules) = fuse_loop_disk(Fs::Ext4);
    let d1 = tempfile::tempdir().unwrap();
    let settings = format!(
        "[health]\nprobe_interval = \"200ms\"\n\n[wal]\nsegment_size = \"8MiB\"\n\n[alerts]\nalertmanager_url = \"{}\"\n",
        alertmanager.url("")
    );
    let node = Daemon::with_config(&config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], &settings), &[]);
    let _release = rules.cleared_on_drop();
    let prometheus = prometheus(node.port, alertmanager.port);
    wait_for("Prometheus scraping the node", Duration::from_secs(60), || {
        let query = prometheus.url("/api/v1/query?query=up%7Bjob%3D%22datanode%22%7D");
        let (_, body) = support::call(ureq::get(&query), None);
        let value: Value = serde_json::from_slice(&body).unwrap_or_default();
        value["data"]["result"][0]["value"][1] == "1"
    });

    // A real fault: the write-back of partition 1's blocks fails.
    let put = |key: &str| support::call(ureq::put(&node.url(&format!("/v1/partitions/1/blobs/{key}"))), Some(b"v")).0;
    assert_eq!(put("before"), 201);
    for range in d0.extents_under(&d0.path().join("partitions/1")) {
        rules.add(Op::Write, range, Action::Fail(libc::EIO));
    }
    wait_for("partition 1 faulted", Duration::from_secs(30), || {
        put("during");
        node.state_of(1) == "faulted"
    });

    let took = wait_for("DatanodePartitionFaulted in Alertmanager by both routes", Duration::from_secs(90), || {
        let (via_prometheus, from_node) = faulted_alerts(&alertmanager, 1);
        !via_prometheus.is_empty() && !from_node.is_empty()
    });
    eprintln!("fault to alert in Alertmanager (both routes): {took:?}");
    let (via_prometheus, from_node) = faulted_alerts(&alertmanager, 1);
    for alert in via_prometheus.iter().chain(&from_node) {
        assert_eq!(alert["labels"]["disk"], "d0", "{alert}");
        assert_eq!(alert["labels"]["severity"], "critical", "{alert}");
    }
    assert_eq!(faulted_alerts(&alertmanager, 2), (vec![], vec![]), "no alert for a healthy partition");

    rules.clear();
    let (status, body) = node.recover(1);
    assert_eq!((status, body["state"].as_str()), (200, Some("healthy")), "{body}");
    let took = wait_for("the alert resolved by both routes", Duration::from_secs(90), || {
        faulted_alerts(&alertmanager, 1) == (vec![], vec![])
    });
    eprintln!("recover to resolved in Alertmanager: {took:?}");
}

/// Like [`prometheus`], but the scrape target carries the documented
/// `instance` label: the node id (docs/API.md, Alerts).
fn prometheus_with_instance(node_port: u16, alertmanager_port: u16, instance: &str) -> Server {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  external_labels:\n    via: prometheus\n\
         rule_files:\n  - {}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{alertmanager_port}']\n\
         scrape_configs:\n  - job_name: datanode\n    static_configs:\n      - targets: ['127.0.0.1:{node_port}']\n\
         \x20       labels:\n          instance: {instance}\n",
        rules.display()
    );
    Server::start("prometheus", "--storage.tsdb.path", &[], &config)
}

/// The labels of the active alerts named `alertname`, by route (through
/// Prometheus, pushed by the node), each without the `via` label that
/// only this test adds to tell the routes apart.
fn labels_by_route(alertmanager: &Server, alertname: &str) -> (Vec<Value>, Vec<Value>) {
    let (_, body) = support::call(ureq::get(&alertmanager.url("/api/v2/alerts?active=true")), None);
    let alerts: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
    let (mut via_prometheus, mut from_node): (Vec<Value>, Vec<Value>) = alerts
        .into_iter()
        .filter(|a| a["labels"]["alertname"] == alertname)
        .partition(|a| a["labels"]["via"] == "prometheus");
    for alert in via_prometheus.iter_mut().chain(from_node.iter_mut()) {
        let mut labels = alert["labels"].clone();
        labels.as_object_mut().unwrap().remove("via");
        *alert = labels;
    }
    let key = |v: &Value| v.to_string();
    via_prometheus.sort_by_key(key);
    from_node.sort_by_key(key);
    (via_prometheus, from_node)
}

/// One condition gives one label set, whichever route it takes, so that
/// Alertmanager dedupes it: a faulted disk (its probe cannot write) and
/// its faulted partitions, by Prometheus's rules and by the node's push.
#[test]
fn both_alert_routes_give_the_same_label_set_for_the_same_condition() {
    let missing = ["prometheus", "prometheus-alertmanager"].into_iter().find(|t| support::disks::which(t).is_none());
    if let Some(tool) = missing {
        assert!(std::env::var("DATANODE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"), "{tool} is required");
        eprintln!("SKIPPED: {tool} is not installed");
        return;
    }
    let alertmanager = alertmanager();
    let d0 = tempfile::tempdir().unwrap();
    let settings = format!(
        "[node]\nid = \"dn-parity\"\n\n[health]\nprobe_interval = \"200ms\"\n\n[alerts]\nalertmanager_url = \"{}\"\n",
        alertmanager.url("")
    );
    let node = Daemon::with_config(&config_with_disks(&[("d0", d0.path())], &settings), &[]);
    let prometheus = prometheus_with_instance(node.port, alertmanager.port, "dn-parity");
    wait_for("Prometheus scraping the node", Duration::from_secs(60), || {
        let query = prometheus.url("/api/v1/query?query=up%7Bjob%3D%22datanode%22%7D");
        let (_, body) = support::call(ureq::get(&query), None);
        let value: Value = serde_json::from_slice(&body).unwrap_or_default();
        value["data"]["result"][0]["value"][1] == "1"
    });
    let probe = d0.path().join(".datanode-probe");
    let _ = std::fs::remove_file(&probe);
    std::fs::create_dir(&probe).unwrap();
    for (alertname, count) in [("DatanodeDiskFaulted", 1), ("DatanodePartitionFaulted", 4)] {
        wait_for(&format!("{alertname} by both routes"), Duration::from_secs(90), || {
            let (via_prometheus, from_node) = labels_by_route(&alertmanager, alertname);
            via_prometheus.len() == count && from_node.len() == count
        });
        let (via_prometheus, from_node) = labels_by_route(&alertmanager, alertname);
        assert_eq!(via_prometheus, from_node, "{alertname}: the same label sets by both routes");
        assert!(from_node.iter().all(|l| l["instance"] == "dn-parity" && l["state"] == "faulted"), "{from_node:?}");
    }
}
