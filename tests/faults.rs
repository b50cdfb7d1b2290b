//! The fault matrix (docs/FAULTS.md) on the real binary, with real
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

use support::disks::{Fs, LoopDisk, SmallTmpfs, drop_page_cache, unavailable};
use support::fuse::{Action, FuseDir, Op, Rules, fuse_loop_disk};
use support::load::{Load, assert_all_readable};
use support::{Daemon, config_with_disks, wait_for};

/// Probes often, so faults show up within a second or two; small segments,
/// so the 300 MiB test disks hold several partitions' logs.
const FAST_PROBES: &str = "[health]\nprobe_interval = \"200ms\"\n\n[wal]\nsegment_size = \"8MiB\"\n";

/// Two small (320 MiB) XFS disks with four partitions each, on the
/// default 64 MiB segments, writers on every partition, one disk's
/// filesystem shut down (CubeFS's S2: one partition's EIO took the whole
/// process down). The healthy disk must not fill up meanwhile: an empty
/// partition holds a bounded zeroed window, not a whole segment.
#[test]
fn s2_disk_death_is_contained() {
    if unavailable(Fs::Xfs.tools()).is_some() {
        return;
    }
    let mut d0 = LoopDisk::new(Fs::Xfs);
    let d1 = LoopDisk::new(Fs::Xfs);
    let settings = "[node]\nbootstrap_partitions = 8\n\n[health]\nprobe_interval = \"200ms\"\n";
    let toml = config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], settings);
    let mut node = Daemon::with_config(&toml, &[]);
    // The bootstrap alternates disks: odd partitions on d0, even on d1.
    let (dead, alive) = ([1, 3, 5, 7], [2, 4, 6, 8]);
    for p in dead {
        assert_eq!(node.json(&format!("/v1/partitions/{p}"))["disk"], "d0");
    }
    let load = Load::start(&node.url(""), &[1, 2, 3, 4, 5, 6, 7, 8], 2, 4096, "s2");
    wait_for("writes on every partition", Duration::from_secs(30), || load.acked() >= 400);
    // A few seconds of 4 KiB writes on every partition before the death.
    std::thread::sleep(Duration::from_secs(3));

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
    // Whichever saw the death first: a write (cause io, errno 5, counted
    // in datanode_io_errors_total) or the disk probe (cause disk_faulted,
    // the errno in the disk's reasons).
    let partitions = faulted.as_array().unwrap();
    let by_write: Vec<&serde_json::Value> = partitions.iter().filter(|p| p["reasons"][0] == "io").collect();
    for partition in &by_write {
        assert_eq!(partition["last_error"]["errno"], libc::EIO, "the errno is shown: {partition}");
    }
    if by_write.is_empty() {
        let reasons = node.json("/v1/disks").to_string();
        assert!(reasons.contains("os error 5"), "the probe's errno is shown: {reasons}");
    } else {
        assert!(node.metric_sum("datanode_io_errors_total", &["disk=\"d0\"", "errno=\"5\""]) >= 1.0);
    }
    assert!(partitions.iter().all(|p| p["reasons"][0] == "io" || p["reasons"][0] == "disk_faulted"), "{faulted}");
    assert_eq!(node.metric("datanode_partition_state", &["partition=\"1\"", "state=\"faulted\""]), Some(1.0));
    assert_eq!(node.metric("datanode_disk_state", &["disk=\"d0\"", "state=\"faulted\""]), Some(1.0));
    assert!(node.metric_sum("datanode_partition_faults_total", &["partition=\"1\""]) >= 1.0);

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
    for p in 1..=8 {
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

/// Where partition `id`'s files on `disk` lie in the disk's image.
fn partition_extents(disk: &LoopDisk, id: u64) -> Vec<std::ops::Range<u64>> {
    let ranges = disk.extents_under(&disk.path().join(format!("partitions/{id}")));
    assert!(!ranges.is_empty(), "partition {id} has data on {}", disk.path().display());
    ranges
}

/// Settings for tests on a FUSE-served disk d0 next to a plain disk d1.
const FUSE_SETTINGS: &str = "[health]\nprobe_interval = \"200ms\"\nslow_sync = \"150ms\"\n\n[wal]\nsegment_size = \"8MiB\"\n\n[limits]\nrequest_timeout = \"2s\"\n";

fn fuse_node(fs: Fs) -> Option<(LoopDisk, Rules, tempfile::TempDir, Daemon)> {
    let mut tools = fs.tools().to_vec();
    tools.push("fusermount3");
    if unavailable(&tools).is_some() {
        return None;
    }
    let (d0, rules) = fuse_loop_disk(fs);
    let d1 = tempfile::tempdir().unwrap();
    let node = Daemon::with_config(&config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], FUSE_SETTINGS), &[]);
    Some((d0, rules, d1, node))
}

/// The fsyncgate case: the kernel accepts the write into its cache, the
/// write-back to the device fails, and fdatasync reports EIO once. The
/// partition whose blocks failed goes faulted without acknowledging the
/// write; its neighbour on the same disk keeps serving; after a restart
/// it is still faulted, and recover brings back exactly what was
/// acknowledged.
fn write_back_eio_faults_only_the_partition_it_hits(fs: Fs) {
    let Some((d0, rules, _d1, mut node)) = fuse_node(fs) else { return };
    let _release = rules.cleared_on_drop();
    let load = Load::start(&node.url(""), &[1, 2, 3, 4], 2, 4096, "wb");
    wait_for("writes on every partition", Duration::from_secs(30), || load.acked() >= 100);
    for range in partition_extents(&d0, 1) {
        rules.add(Op::Write, range, Action::Fail(libc::EIO));
    }
    let took = wait_for("partition 1 faulted", Duration::from_secs(30), || node.state_of(1) == "faulted");
    eprintln!("{fs:?}: write-back EIO to faulted: {took:?}");
    std::thread::sleep(Duration::from_millis(300));
    let outcome = load.stop();
    assert!(rules.hits() > 0, "the rule was hit");
    let partition = node.json("/v1/partitions/1");
    assert_eq!(partition["last_error"]["errno"], libc::EIO, "{partition}");
    assert_eq!(partition["last_error"]["op"], "sync", "the error surfaced at fdatasync: {partition}");
    let refused = outcome.failures.get(&1).cloned().unwrap_or_default();
    assert!(refused.contains_key(&500), "the batch of the failed sync is write_outcome_unknown: {refused:?}");
    for p in [2, 3, 4] {
        assert_eq!(outcome.failed_on(p), 0, "partition {p}: {:?}", outcome.failures);
        assert_eq!(node.state_of(p), "healthy");
    }
    assert_eq!(node.disk_state("d0"), "healthy", "one partition's blocks, not the disk");

    rules.clear();
    node.restart();
    assert_eq!(node.state_of(1), "faulted", "sticky across a restart");
    let (status, body) = node.recover(1);
    assert_eq!((status, body["state"].as_str()), (200, Some("healthy")), "{body}");
    assert_all_readable(&node, &outcome.acked, "after recover");
    assert_eq!(support::call(ureq::put(&node.url("/v1/partitions/1/blobs/again")), Some(b"x")).0, 201);
}

#[test]
fn write_back_eio_on_ext4_faults_only_the_partition_it_hits() {
    write_back_eio_faults_only_the_partition_it_hits(Fs::Ext4);
}

#[test]
fn write_back_eio_on_xfs_faults_only_the_partition_it_hits() {
    write_back_eio_faults_only_the_partition_it_hits(Fs::Xfs);
}

/// Puts `n` blobs on each partition and returns what was acknowledged. A
/// 503 (nothing written: on a loaded machine a probe of the FUSE disk may
/// be slower than `slow_sync`, making it degraded for a moment) is retried
/// for a while.
fn fill(node: &Daemon, partitions: &[u64], n: usize, tag: &str) -> Vec<support::load::Acked> {
    let mut acked = Vec::new();
    for &partition in partitions {
        for i in 0..n {
            let key = format!("{tag}-{partition}-{i}");
            let value: Vec<u8> = key.bytes().cycle().take(4096 + i).collect();
            let url = node.url(&format!("/v1/partitions/{partition}/blobs/{key}"));
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (status, body) = support::call(ureq::put(&url), Some(&value));
                if status == 503 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
                break;
            }
            acked.push(support::load::Acked { partition, key, value });
        }
    }
    acked
}

/// A latent sector error under one partition's log: reads of it fail,
/// none returns wrong bytes, the partition is faulted past the tolerance
/// (while serving) or at load (after a restart), the node still loads and
/// becomes ready, and the other partitions serve throughout.
#[test]
fn latent_read_errors_fault_only_their_partition_and_never_serve_wrong_bytes() {
    let Some((d0, rules, _d1, mut node)) = fuse_node(Fs::Ext4) else { return };
    let _release = rules.cleared_on_drop();
    let acked = fill(&node, &[1, 2, 3, 4], 40, "latent");
    let bad = partition_extents(&d0, 1);
    for range in &bad {
        rules.add(Op::Read, range.clone(), Action::Fail(libc::EIO));
    }
    assert!(drop_page_cache(), "the test runs as root");
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for put in acked.iter().filter(|a| a.partition == 1) {
        let (status, body) = support::call(ureq::get(&node.url(&format!("/v1/partitions/1/blobs/{}", put.key))), None);
        assert!(status != 200 || body == put.value, "wrong bytes served for {}", put.key);
        *statuses.entry(status).or_default() += 1;
    }
    eprintln!("reads of partition 1 over bad sectors: {statuses:?}");
    assert!(statuses.contains_key(&500), "read errors are 500 io_error: {statuses:?}");
    assert_eq!(node.state_of(1), "faulted", "past the read-error tolerance");
    assert_eq!(node.json("/v1/partitions/1")["reasons"], serde_json::json!(["read_errors"]));
    assert_all_readable(&node, &acked.iter().filter(|a| a.partition != 1).cloned().collect::<Vec<_>>(), "others");

    // Restart with the bad sectors still there: the partition cannot load,
    // the node loads everything else and becomes ready.
    node.restart();
    assert_eq!(node.state_of(1), "faulted");
    for p in [2, 3, 4] {
        assert_eq!(node.state_of(p), "healthy");
    }
    assert_eq!(support::call(ureq::get(&node.url("/readyz")), None).0, 200);
    assert_all_readable(&node, &acked.iter().filter(|a| a.partition != 1).cloned().collect::<Vec<_>>(), "restart");

    // The sectors are readable again (remapped): recover brings it all back.
    rules.clear();
    let (status, body) = node.recover(1);
    assert_eq!((status, body["state"].as_str()), (200, Some("healthy")), "{body}");
    assert_all_readable(&node, &acked, "after recover");
}

/// Bit rot at rest: one flipped byte in the middle of a partition's log.
/// That partition is faulted at load with `corruption` and serves nothing;
/// the node loads and becomes ready; the others are untouched.
#[test]
fn flipped_bytes_at_rest_fault_only_their_partition() {
    let data = tempfile::tempdir().unwrap();
    let mut node = Daemon::start(data.path(), &[], &[]);
    let acked = fill(&node, &[1, 2, 3, 4], 30, "rot");
    assert_eq!(node.terminate().code(), Some(0));
    let segment = std::fs::read_dir(data.path().join("partitions/2/wal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let offset = 64 + 48 + 10; // inside the first record's payload
    bytes[offset] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    node.restart();
    let partition = node.json("/v1/partitions/2");
    assert_eq!(partition["state"], "faulted");
    assert_eq!(partition["reasons"], serde_json::json!(["corruption"]), "{partition}");
    for put in acked.iter().filter(|a| a.partition == 2).take(3) {
        let (status, body) = support::call(ureq::get(&node.url(&format!("/v1/partitions/2/blobs/{}", put.key))), None);
        assert_eq!((status, support::error_code(&body)), (503, "partition_faulted".to_string()));
    }
    assert_eq!(support::call(ureq::get(&node.url("/readyz")), None).0, 200);
    assert_all_readable(&node, &acked.iter().filter(|a| a.partition != 2).cloned().collect::<Vec<_>>(), "others");
    let (status, _) = node.recover(2);
    assert_eq!(status, 409, "recover verifies from disk and refuses corruption");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "nothing on disk was changed");
}

/// A slow disk: its syncs take longer than `slow_sync`, so the disk is
/// degraded and its partitions read-only (reads fine); the other disk is
/// unaffected; when the disk is fast again, so are its partitions.
#[test]
fn a_slow_disk_is_degraded_and_its_partitions_read_only() {
    let Some((_d0, rules, _d1, node)) = fuse_node(Fs::Xfs) else { return };
    let _release = rules.cleared_on_drop();
    let acked = fill(&node, &[1, 2, 3, 4], 5, "slow");
    let slow = rules.add(Op::Sync, Rules::everywhere(), Action::Delay(Duration::from_millis(400)));
    let took = wait_for("d0 degraded", Duration::from_secs(30), || node.disk_state("d0") == "degraded");
    eprintln!("slow syncs to degraded: {took:?}");
    wait_for("d0's partitions read-only", Duration::from_secs(10), || {
        [1, 3].iter().all(|&p| node.state_of(p) == "read_only")
    });
    assert_eq!(node.json("/v1/partitions/1")["reasons"], serde_json::json!(["disk_degraded"]));
    let (status, body) = support::call(ureq::put(&node.url("/v1/partitions/1/blobs/w")), Some(b"x"));
    assert_eq!((status, support::error_code(&body)), (503, "partition_read_only".to_string()));
    assert_all_readable(&node, &acked, "reads while degraded");
    for p in [2, 4] {
        assert_eq!(node.state_of(p), "healthy");
        assert_eq!(support::call(ureq::put(&node.url(&format!("/v1/partitions/{p}/blobs/w"))), Some(b"x")).0, 201);
    }
    rules.remove(slow);
    wait_for("d0 healthy again", Duration::from_secs(30), || {
        node.disk_state("d0") == "healthy" && [1, 3].iter().all(|&p| node.state_of(p) == "healthy")
    });
    assert_eq!(support::call(ureq::put(&node.url("/v1/partitions/1/blobs/w")), Some(b"x")).0, 201);
}

/// A hung fsync in one partition (its files' fsyncs never return): its
/// writes time out as `write_outcome_unknown`, and the partitions next to
/// it, on the same disk and on the other, keep acknowledging writes. The
/// disk is a FUSE passthrough here, so the hang is one partition's files,
/// not the whole device (a stalled block device stalls every partition on
/// it, which is the probe's "hung disk" case).
#[test]
fn a_hung_fsync_times_out_only_its_own_partition() {
    if unavailable(&["fusermount3"]).is_some() {
        return;
    }
    let d0 = FuseDir::new();
    let d1 = tempfile::tempdir().unwrap();
    let node = Daemon::with_config(&config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], FUSE_SETTINGS), &[]);
    let _release = d0.rules.cleared_on_drop();
    fill(&node, &[1, 2, 3, 4], 5, "hang");
    d0.rules.add_on(Op::Sync, "partitions/1/", Rules::everywhere(), Action::Hang);
    let load = Load::start(&node.url(""), &[1, 2, 3, 4], 1, 4096, "hung");
    let took = wait_for("partition 1 writes time out", Duration::from_secs(30), || {
        let (status, body) = support::call(ureq::put(&node.url("/v1/partitions/1/blobs/probe")), Some(b"x"));
        status == 500 && support::error_code(&body) == "write_outcome_unknown"
    });
    eprintln!("hung fsync to timed-out write: {took:?}");
    let before = load.acked();
    std::thread::sleep(Duration::from_secs(3));
    let outcome = load.stop();
    for p in [2, 3, 4] {
        assert_eq!(outcome.failed_on(p), 0, "partition {p}: {:?}", outcome.failures);
    }
    assert!(outcome.acked.len() as u64 > before + 20, "the others kept acknowledging while partition 1 hung");
    assert!(outcome.acked_on(3) > 0, "partition 3 shares the disk and still writes");
    assert_eq!(node.disk_state("d0"), "healthy", "one partition's fsync, not the disk");
    let (status, _) = support::call(ureq::get(&node.url("/v1/partitions/1/blobs/hang-1-0")), None);
    assert_eq!(status, 200, "reads of the hung partition are still served");

    // Once the fsync returns, the partition completes what was queued.
    d0.rules.clear();
    wait_for("partition 1 acknowledges again", Duration::from_secs(30), || {
        support::call(ureq::put(&node.url("/v1/partitions/1/blobs/after")), Some(b"x")).0 == 201
    });
    assert_eq!(node.state_of(1), "healthy");
}
