//! Compaction on the real binary: the node reclaims the space of
//! overwritten blobs by itself, by policy, while writers keep writing, and
//! loses nothing; an operator can also start one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{Daemon, call, config_with_disks, wait_for};

const POLICY: &str = r#"
[wal]
segment_size = "64KiB"

[compaction]
garbage_ratio = 0.3
min_garbage = "64KiB"
check_interval = "100ms"
max_bytes_per_sec = "64MiB"
"#;

/// Bytes of every file under `dir`: what the partition costs on disk.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn the_node_compacts_by_policy_under_load_and_loses_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::with_config(&config_with_disks(&[("d0", data.path())], POLICY), &[]);
    let url = daemon.url("");
    // Two writers overwrite the same 16 keys of partition 1, 600 times each
    // (about 6 MB in all); each remembers the last value acknowledged per key.
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut acked = BTreeMap::new();
                for round in 0..600u32 {
                    let key = format!("w{w}-k{}", round % 8);
                    let value = format!("{key}-round-{round}-").repeat(200).into_bytes();
                    let (status, _) = call(ureq::put(&format!("{url}/v1/partitions/1/blobs/{key}")), Some(&value));
                    assert_eq!(status, 201, "a healthy partition takes every write while it compacts");
                    acked.insert(key, value);
                }
                acked
            })
        })
        .collect();
    let compacted =
        || daemon.metric("datanode_compactions_total", &["partition=\"1\"", "result=\"ok\""]).unwrap_or(0.0);
    wait_for("the node compacts partition 1 by itself, under load", Duration::from_secs(60), || compacted() >= 2.0);
    let acked: BTreeMap<String, Vec<u8>> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(daemon.metric("datanode_compaction_bytes_total", &["disk=\"d0\""]).unwrap_or(0.0) > 0.0);
    // 16 live values of ~5 KB: the log stays near that, not near the ~10 MB written.
    let partition_dir = data.path().join("partitions/1");
    wait_for("space comes back", Duration::from_secs(30), || dir_bytes(&partition_dir) < 2 << 20);
    for (key, value) in &acked {
        assert_eq!(call(ureq::get(&daemon.url(&format!("/v1/partitions/1/blobs/{key}"))), None), (200, value.clone()));
    }
    daemon.restart();
    for (key, value) in &acked {
        assert_eq!(
            call(ureq::get(&daemon.url(&format!("/v1/partitions/1/blobs/{key}"))), None),
            (200, value.clone()),
            "{key} after a restart"
        );
    }
    assert_eq!(daemon.state_of(1), "healthy");
}

#[test]
fn an_operator_compacts_a_partition_and_hears_what_came_back() {
    let data = tempfile::tempdir().unwrap();
    // A policy that never fires on its own.
    let config = POLICY.replace("garbage_ratio = 0.3", "garbage_ratio = 1.0").replace("\"100ms\"", "\"1h\"");
    let daemon = Daemon::with_config(&config_with_disks(&[("d0", data.path())], &config), &[]);
    for round in 0..200 {
        let value = vec![round as u8; 4096];
        assert_eq!(
            call(ureq::put(&daemon.url(&format!("/v1/partitions/2/blobs/k{}", round % 4))), Some(&value)).0,
            201
        );
    }
    let garbage = daemon.metric("datanode_partition_garbage_bytes", &["partition=\"2\""]).unwrap();
    assert!(garbage > 500_000.0, "200 puts of 4 KiB over 4 keys leave garbage: {garbage}");
    let (status, body) = call(ureq::post(&daemon.url("/v1/partitions/2/compact")), Some(b""));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(answer["reclaimed_bytes"].as_u64().unwrap() > 500_000, "{answer}");
    for k in 0..4u8 {
        let (status, value) = call(ureq::get(&daemon.url(&format!("/v1/partitions/2/blobs/k{k}"))), None);
        assert_eq!(status, 200);
        assert_eq!(value, vec![196 + k; 4096], "k{k} keeps its last value");
    }
    let (status, _) = call(ureq::post(&daemon.url("/v1/partitions/99/compact")), Some(b""));
    assert_eq!(status, 404);
}
