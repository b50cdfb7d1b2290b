//! The shipped Grafana dashboard on real data: Debian's Prometheus scrapes
//! a live node that has a faulted disk, a read-only partition and traffic,
//! and every panel's query (with `$instance` substituted) returns at least
//! one series. Tables are instant queries; aggregations keep `instance`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::{Daemon, call, config_with_disks, free_port, wait_for};

fn dashboard() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/grafana/datanode.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every panel's (title, type, queries).
fn panels(dashboard: &Value) -> Vec<(String, String, Vec<Value>)> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            (title, p["type"].as_str().unwrap().to_string(), p["targets"].as_array().cloned().unwrap_or_default())
        })
        .collect()
}

#[test]
fn tables_are_instant_queries_and_aggregations_keep_the_instance() {
    for (title, kind, targets) in panels(&dashboard()) {
        for target in &targets {
            let expr = target["expr"].as_str().unwrap();
            if kind == "table" {
                assert_eq!(target["instant"], true, "{title}: a table shows an instant query");
                assert_eq!(target["format"], "table", "{title}");
            }
            for (at, _) in expr.match_indices("sum by (") {
                let labels = &expr[at + 8..at + 8 + expr[at + 8..].find(')').unwrap()];
                if labels.contains("partition") || labels.contains("disk") {
                    assert!(labels.contains("instance"), "{title}: {expr} merges nodes' partitions or disks");
                }
            }
        }
        let units: Vec<&Value> = targets.iter().map(|t| &t["unit"]).filter(|u| !u.is_null()).collect();
        assert!(units.is_empty(), "{title}: one unit per panel, in fieldConfig");
    }
}

/// The server, its port, and its scratch directory (removed on drop).
struct Prometheus(Child, u16, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus(node_port: u16) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: datanode\n    static_configs:\n      \
         - targets: ['127.0.0.1:{node_port}']\n        labels:\n          instance: dn-dash\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Prometheus(child, port, dir);
    wait_for("Prometheus ready", Duration::from_secs(60), || {
        ureq::get(&format!("http://127.0.0.1:{port}/-/ready")).call().is_ok()
    });
    server
}

/// How many series `expr` returns now.
fn series(prometheus: &Prometheus, expr: &str) -> usize {
    let url = format!("http://127.0.0.1:{}/api/v1/query", prometheus.1);
    let Ok(response) = ureq::get(&url).query("query", expr).call() else { return 0 };
    let body: Value = response.into_string().ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    body["data"]["result"].as_array().map_or(0, Vec::len)
}

#[test]
fn every_panel_returns_data_from_a_real_prometheus() {
    if support::disks::which("prometheus").is_none() {
        assert!(std::env::var("DATANODE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"), "prometheus is required");
        eprintln!("SKIPPED: prometheus is not installed");
        return;
    }
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let settings = "[node]\nid = \"dn-dash\"\n\n[health]\nprobe_interval = \"200ms\"\n";
    let node = Daemon::with_config(&config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], settings), &[]);
    let prometheus = prometheus(node.port);
    // Traffic on every partition, then a read-only one (4, on d1) and a
    // faulted disk (d0: its probe cannot write its canary).
    for partition in 1..=4 {
        for key in 0..20 {
            let url = node.url(&format!("/v1/partitions/{partition}/blobs/k{key}"));
            assert_eq!(call(ureq::put(&url), Some(b"value")).0, 201);
            assert_eq!(call(ureq::get(&url), None).0, 200);
        }
    }
    let read_only = ureq::post(&node.url("/v1/partitions/4/read-only"));
    assert_eq!(call(read_only, Some(br#"{"read_only":true}"#)).0, 200);
    let probe = d0.path().join(".datanode-probe");
    let _ = std::fs::remove_file(&probe);
    std::fs::create_dir(&probe).unwrap();
    wait_for("d0 faulted", Duration::from_secs(30), || node.disk_state("d0") == "faulted");
    let queries: Vec<(String, String)> = panels(&dashboard())
        .into_iter()
        .flat_map(|(title, _, targets)| {
            targets.into_iter().map(move |t| (title.clone(), t["expr"].as_str().unwrap().replace("$instance", ".+")))
        })
        .collect();
    // Rates need two samples in their window: keep the traffic going.
    let mut empty = Vec::new();
    let done = wait_for("every panel's query returning data", Duration::from_secs(120), || {
        for partition in [2, 3] {
            let _ = call(ureq::get(&node.url(&format!("/v1/partitions/{partition}/blobs/k1"))), None);
            let _ = call(ureq::put(&node.url("/v1/partitions/2/blobs/more")), Some(b"v"));
        }
        empty = queries.iter().filter(|(_, expr)| series(&prometheus, expr) == 0).cloned().collect();
        if !empty.is_empty() {
            eprintln!("still empty: {empty:?}");
        }
        empty.is_empty()
    });
    eprintln!("every panel had data after {done:?}");
}
