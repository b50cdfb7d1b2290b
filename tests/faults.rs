//! The fault matrix (DESIGN.md section 7) on the real binary, with real
//! kernel faults: loop-mounted XFS and ext4 shut down under load, full
//! tmpfs, FUSE-served images that fail or stall writes, syncs and reads of
//! chosen byte ranges, `kill -9` and power cuts. Each test is named after
//! what it proves; `docs/FAULTS.md` maps the matrix to them.
//!
//! These need root and the tools named in each test; without them a test
//! prints SKIPPED (and fails under `DATANODE_REQUIRE_KERNEL_TESTS=1`, as CI
//! runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::disks::{Fs, LoopDisk, SmallTmpfs, unavailable};
use support::load::{Load, assert_all_readable};
use support::{Daemon, config_with_disks, wait_for};

/// Probes often, so faults show up within a second or two; small segments,
/// so the 300 MiB test disks hold several partitions' logs.
const FAST_PROBES: &str = "[health]\nprobe_interval = \"200ms\"\n\n[wal]\nsegment_size = \"8MiB\"\n";

/// Two disks, writers on both, one disk's filesystem shut down (CubeFS's
/// S2: one partition's EIO took the whole process down).
#[test]
fn s2_disk_death_is_contained() {
    if unavailable(Fs::Xfs.tools()).is_some() {
        return;
    }
    let mut d0 = LoopDisk::new(Fs::Xfs);
    let d1 = LoopDisk::new(Fs::Xfs);
    let toml = config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], FAST_PROBES);
    let mut node = Daemon::with_config(&toml, &[]);
    // The default bootstrap puts partitions 1 and 3 on d0, 2 and 4 on d1.
    let (dead, alive) = ([1, 3], [2, 4]);
    let load = Load::start(&node.url(""), &[1, 2, 3, 4], 2, 4096, "s2");
    wait_for("writes on every partition", Duration::from_secs(30), || load.acked() >= 200);

    d0.shutdown(true);
    let took = wait_for("d0's partitions and d0 faulted", Duration::from_secs(30), || {
        dead.iter().all(|&p| node.state_of(p) == "faulted") && node.disk_state("d0") == "faulted"
    });
    eprintln!("disk death to faulted: {took:?}");
    std::thread::sleep(Duration::from_millis(500)); // the others keep writing meanwhile
    let outcome = load.stop();

    for p in alive {
        assert_eq!(outcome.failed_on(p), 0, "partition {p} on the healthy disk saw failures: {:?}", outcome.failures);
        assert!(outcome.acked_on(p) > 0);
        assert_eq!(node.state_of(p), "healthy");
    }
    assert_eq!(node.disk_state("d1"), "healthy");
    assert_eq!(support::call(ureq::get(&node.url("/healthz")), None).0, 200);
    assert_eq!(support::call(ureq::get(&node.url("/readyz")), None).0, 200, "one disk still serves");
    let faulted = node.json("/v1/partitions?state=faulted");
    let ids: Vec<u64> = faulted.as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, dead);
    let first = &faulted[0];
    assert!(first["reasons"][0] == "io" || first["reasons"][0] == "disk_faulted", "{first}");
    let errno = node
        .json("/v1/partitions?state=faulted")
        .as_array()
        .unwrap()
        .iter()
        .find_map(|p| p["last_error"]["errno"].as_i64());
    assert_eq!(errno, Some(i64::from(libc::EIO)), "the errno is shown: {faulted}");
    assert_eq!(node.metric("datanode_partition_state", &["partition=\"1\"", "state=\"faulted\""]), Some(1.0));
    assert_eq!(node.metric("datanode_disk_state", &["disk=\"d0\"", "state=\"faulted\""]), Some(1.0));
    assert!(node.metric("datanode_io_errors_total", &["disk=\"d0\"", "errno=\"5\""]).is_some_and(|n| n >= 1.0));
    assert!(node.metric("datanode_partition_faults_total", &["partition=\"1\""]).is_some_and(|n| n >= 1.0));

    // Repair: stop the node, remount the disk, start again. Nothing on d0
    // says faulted (it took no write after it died); the fault journal on
    // d1 does.
    assert_eq!(node.terminate().code(), Some(0), "a clean exit even with a dead disk");
    d0.unmount();
    d0.mount();
    node.restart();
    for p in dead {
        assert_eq!(node.state_of(p), "faulted", "partition {p}: the fault is sticky across remount and restart");
    }
    for p in alive {
        assert_eq!(node.state_of(p), "healthy");
    }
    for p in dead {
        let (status, body) = node.recover(p);
        assert_eq!((status, body["state"].as_str()), (200, Some("healthy")), "recover {p}: {body}");
    }
    assert_all_readable(&node, &outcome.acked, "after recover");
    // And a recover is as sticky as the fault was.
    node.restart();
    for p in [1, 2, 3, 4] {
        assert_eq!(node.state_of(p), "healthy", "partition {p} after recover and restart");
    }
}

/// A full disk: ENOSPC turns its partitions read-only (reads still
/// served), the other disk never notices, and once space returns the
/// partitions are writable again on their own; nothing acknowledged is lost.
#[test]
fn enospc_is_read_only_until_space_returns_and_loses_nothing() {
    if unavailable(&["mount"]).is_some() {
        return;
    }
    let small = SmallTmpfs::new(12 << 20);
    let other = tempfile::tempdir().unwrap();
    let settings = "[health]\nprobe_interval = \"200ms\"\n\n[wal]\nsegment_size = \"1MiB\"\n";
    let toml = config_with_disks(&[("d0", small.path()), ("d1", other.path())], settings);
    let mut node = Daemon::with_config(&toml, &[]);
    let (full, alive) = ([1, 3], [2, 4]);
    let load = Load::start(&node.url(""), &[1, 2, 3, 4], 2, 16 << 10, "full");
    let took = wait_for("d0's partitions read-only", Duration::from_secs(60), || {
        full.iter().all(|&p| node.state_of(p) == "read_only")
    });
    eprintln!("writes until read_only(disk_full): {took:?}");
    std::thread::sleep(Duration::from_millis(300));
    let outcome = load.stop();
    for p in full {
        let partition = node.json(&format!("/v1/partitions/{p}"));
        assert_eq!(partition["reasons"], serde_json::json!(["disk_full"]), "{partition}");
        assert!(outcome.acked_on(p) > 0);
        let refused = outcome.failures.get(&p).cloned().unwrap_or_default();
        assert!(refused.keys().all(|&status| status == 503), "a full disk is 503, never 500: {refused:?}");
    }
    for p in alive {
        assert_eq!(outcome.failed_on(p), 0, "partition {p} on the other disk: {:?}", outcome.failures);
    }
    assert_all_readable(&node, &outcome.acked, "while full");
    assert_eq!(support::call(ureq::put(&node.url("/v1/partitions/1/blobs/more")), Some(b"x")).0, 503);

    small.resize(64 << 20);
    let took = wait_for("d0's partitions healthy again", Duration::from_secs(30), || {
        full.iter().all(|&p| node.state_of(p) == "healthy")
    });
    eprintln!("space back to healthy: {took:?}");
    assert_eq!(support::call(ureq::put(&node.url("/v1/partitions/1/blobs/more")), Some(b"x")).0, 201);
    node.restart();
    assert_all_readable(&node, &outcome.acked, "after restart");
}

/// `kill -9` under load, cycle after cycle: every acknowledged write is
/// there after each restart, and every partition comes back healthy.
#[test]
fn kill_9_under_load_loses_no_acknowledged_write() {
    let data = tempfile::tempdir().unwrap();
    let mut node = Daemon::start(data.path(), &[], &[]);
    let mut acked = Vec::new();
    for cycle in 0..12 {
        let load = Load::start(&node.url(""), &[1, 2, 3, 4], 2, 1024 + cycle * 512, &format!("k{cycle}"));
        wait_for("acknowledged writes", Duration::from_secs(30), || load.acked() >= 40);
        node.kill();
        acked.extend(load.stop().acked);
        node.restart();
        for p in [1, 2, 3, 4] {
            assert_eq!(node.state_of(p), "healthy", "cycle {cycle}: partition {p}");
        }
        assert_all_readable(&node, &acked, &format!("cycle {cycle}"));
    }
    eprintln!("{} acknowledged writes over 12 kill -9 cycles, all read back", acked.len());
}

/// Power cuts: the filesystem shut down without flushing its log (what
/// was not on the journal is gone) and the process killed, then the disk
/// remounted and the node started: every acknowledged write is there.
#[test]
fn power_cuts_lose_no_acknowledged_write() {
    if unavailable(Fs::Xfs.tools()).is_some() {
        return;
    }
    let mut disk = LoopDisk::new(Fs::Xfs);
    let toml = config_with_disks(&[("d0", disk.path())], FAST_PROBES);
    let mut node = Daemon::with_config(&toml, &[]);
    let mut acked = Vec::new();
    for cycle in 0..4 {
        let load = Load::start(&node.url(""), &[1, 2, 3, 4], 2, 4096, &format!("pc{cycle}"));
        wait_for("acknowledged writes", Duration::from_secs(30), || load.acked() >= 100);
        disk.shutdown(false);
        node.kill();
        acked.extend(load.stop().acked);
        disk.unmount();
        disk.mount();
        node.restart();
        for p in [1, 2, 3, 4] {
            assert_eq!(node.state_of(p), "healthy", "cycle {cycle}: partition {p}");
        }
        assert_all_readable(&node, &acked, &format!("power cut {cycle}"));
    }
    eprintln!("{} acknowledged writes over 4 power cuts, all read back", acked.len());
}
