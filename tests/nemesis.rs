//! The nemesis: seeded, bounded, Jepsen-style runs against the real binary.
//! Many clients issue random puts, gets, deletes, lists, exports, installs,
//! recovers, read-only switches and compactions while the nemesis injects
//! faults and restarts; a checker then holds the recorded history against
//! the node's contract (`nemesis/checker.rs`).
//!
//! One test per fault family, sharing the harness:
//! - `nemesis_fuse_faults_timeouts_and_restarts`: a FUSE-served disk whose
//!   rules fail (EIO), delay (past `request_timeout`) or hang one
//!   partition's writes and syncs; SIGTERM and kill -9; installs under a
//!   small write queue;
//! - `nemesis_power_cuts_on_xfs`: power cuts of a loop-mounted XFS disk
//!   (shutdown without log flush, remount), kill -9, SIGTERM;
//! - `nemesis_disk_full`: EFBIG (the node under a file-size limit) and
//!   ENOSPC (a small tmpfs that grows back);
//! - `nemesis_cluster_kills_pauses_and_partitions`: a cluster of three
//!   nodes (`nemesis/cluster.rs`) with replicated partitions, reached
//!   through any node with redirects followed: kill -9 and restarts of
//!   leaders and followers, SIGSTOP/SIGCONT (stale leaders), a node's peer
//!   port blocked by iptables rules; at the end every key is read through
//!   every node and the replicas are compared.
//!
//! `NEMESIS_SEED` and `NEMESIS_STEPS` reproduce a run; `NEMESIS_SECONDS`
//! runs for that long instead (e.g. 1800 for a long run). A failure prints
//! the seed, the step and the history excerpt of each violation; the whole
//! history is written to the temp directory.
//!
//! These need root (FUSE, loop mounts, tmpfs, iptables and a cgroup v2
//! hierarchy); without it they print SKIPPED (and fail under
//! `DATANODE_REQUIRE_KERNEL_TESTS=1`, as CI runs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "nemesis/checker.rs"]
mod checker;
#[path = "nemesis/cluster.rs"]
mod cluster;
#[path = "nemesis/harness.rs"]
mod harness;
#[path = "nemesis/history.rs"]
mod history;
#[path = "nemesis/node.rs"]
mod node;

use std::cell::RefCell;
use std::time::Duration;

use cluster::{ClusterRun, ClusterSetup, Firewall};
use harness::{Budget, Run, Setup, Stop};
use node::Node;
use support::config_with_disks;
use support::disks::{Fs, LoopDisk, SmallTmpfs, skipped, unavailable};
use support::fuse::{Action, FuseDir, Op, Rules};

const PARTITIONS: [u64; 4] = [1, 2, 3, 4];

/// A FUSE-served disk d0 (partitions 1 and 3) next to a plain disk d1 (2
/// and 4). Faults hit one of d0's partitions: EIO on its writes or syncs,
/// syncs or writes delayed past `request_timeout` (1 s), hung syncs; and
/// SIGTERM, kill -9 under load and at quiescent points. Values up to
/// 100 KB against a 256 KiB write queue, with installs among them.
#[test]
fn nemesis_fuse_faults_timeouts_and_restarts() {
    if unavailable(&["fusermount3"]).is_some() {
        return;
    }
    let budget = Budget::from_env(24);
    let d0 = FuseDir::new();
    let d1 = tempfile::tempdir().unwrap();
    let settings = "[health]\nprobe_interval = \"200ms\"\n\n\
                    [wal]\nsegment_size = \"8MiB\"\nmax_batch_bytes = \"256KiB\"\n\n\
                    [limits]\nrequest_timeout = \"1s\"\nmax_blob_size = \"128KiB\"\n\
                    max_queued_bytes_per_partition = \"256KiB\"\n";
    let toml = config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], settings);
    let setup = Setup {
        name: "nemesis_fuse_faults_timeouts_and_restarts",
        partitions: PARTITIONS.to_vec(),
        keys: 16,
        clients: 12,
        mix: [45, 35, 8, 7],
        sizes: vec![(35, 100_000, 100_000), (65, 64, 4000)],
        admin: Some([25, 25, 15, 8, 8, 5]),
        admin_pause_ms: (150, 500),
        request_timeout: Duration::from_secs(1),
        faults_may_be_lost_on_power_cut: false,
    };
    let rules = d0.rules.clone();
    let mut run = Run::start(setup, budget, Node::start(&toml, None));
    let mut heal = |run: &Run| {
        rules.clear();
        run.note("rules cleared");
    };
    while let Some(step) = run.next_step() {
        let p = *run.rng.pick(&[1u64, 3]);
        let files = format!("partitions/{p}/");
        let action = run.rng.weighted(&[8, 10, 10, 14, 8, 10, 12, 8, 8, 12]);
        let mut restart_after = false;
        match action {
            0 => run.work(Duration::from_millis(800)),
            1 | 2 => {
                let op = if action == 1 { Op::Write } else { Op::Sync };
                rules.add_on(op, &files, Rules::everywhere(), Action::Fail(libc::EIO));
                run.inject(vec![p], &format!("EIO on {op:?} of {files}"));
                run.work_ms(500, 1000);
                heal(&run);
                if run.rng.chance(70) {
                    run.recover_faulted();
                }
                restart_after = run.rng.chance(30);
            }
            3 => {
                // Past request_timeout: writes answer write_outcome_unknown
                // and complete later.
                let delay = Duration::from_millis(2000 + run.rng.below(1000));
                let op = if run.rng.chance(70) { Op::Sync } else { Op::Write };
                rules.add_on(op, &files, Rules::everywhere(), Action::Delay(delay));
                run.note(format!("delay {op:?} of {files} by {delay:?}"));
                run.work_ms(2500, 1500);
                heal(&run);
                restart_after = run.rng.chance(60);
            }
            4 => {
                let delay = Duration::from_millis(200 + run.rng.below(700));
                rules.add_on(Op::Write, &files, Rules::everywhere(), Action::Delay(delay));
                run.note(format!("delay writes of {files} by {delay:?}"));
                run.work(Duration::from_millis(1500));
                heal(&run);
            }
            5 => {
                rules.add_on(Op::Sync, &files, Rules::everywhere(), Action::Hang);
                run.note(format!("hang syncs of {files}"));
                run.work_ms(1500, 1500);
                heal(&run);
                restart_after = run.rng.chance(40);
            }
            6 => {
                // Installs into a partition whose write queue (256 KiB) is
                // full of 100 KB puts; on d1, so that they finish within
                // request_timeout.
                let into = *run.rng.pick(&[2u64, 4]);
                install_under_burst(&mut run, into);
                restart_after = run.rng.chance(30);
            }
            9 => run.restart(Stop::Term, true, &mut heal, &mut || {}, &mut |_| {}),
            7 => {
                run.work_ms(300, 700);
                heal(&run);
                run.restart(Stop::Kill, false, &mut heal, &mut || {}, &mut |_| {});
            }
            _ => run.restart(Stop::Kill, true, &mut heal, &mut || {}, &mut |_| {}),
        }
        if restart_after {
            let how = if run.rng.chance(50) { Stop::Term } else { Stop::Kill };
            run.restart(how, true, &mut heal, &mut || {}, &mut |_| {});
        }
        let _ = step;
    }
    run.finish(&mut heal);
}

/// A burst of 100 KB puts on `into` from most clients, and a few installs
/// into it meanwhile (of images exported from any partition).
fn install_under_burst(run: &mut Run, into: u64) {
    run.burst(into, 100_000);
    run.work_ms(200, 300);
    for _ in 0..5 {
        let from = *run.rng.pick(&PARTITIONS);
        run.export_and_install(from, into);
        run.work_ms(150, 250);
    }
    run.end_burst();
}

/// Removes `dir/CURRENT` (`remove`) or flips a byte in the first record's
/// payload of the live log's first segment, when that record is followed
/// by another; only in a partition whose log is an installed one (`wal-N`).
/// Says what it did.
fn damage_at_rest(dir: &std::path::Path, remove: bool) -> Option<String> {
    let current = std::fs::read_to_string(dir.join("CURRENT")).ok()?;
    let log = current.lines().find_map(|l| l.strip_prefix("log="))?.trim().to_string();
    if log == "wal" {
        return None;
    }
    if remove {
        std::fs::remove_file(dir.join("CURRENT")).ok()?;
        return Some(format!("removed {}/CURRENT (it named {log})", dir.display()));
    }
    let mut segments: Vec<std::path::PathBuf> =
        std::fs::read_dir(dir.join(&log)).ok()?.flatten().map(|e| e.path()).collect();
    segments.sort();
    let segment = segments.into_iter().find(|s| std::fs::metadata(s).is_ok_and(|m| m.len() > 0))?;
    let mut bytes = std::fs::read(&segment).ok()?;
    let len = u32::from_le_bytes(bytes.get(72..76)?.try_into().ok()?) as usize;
    let next = 64 + 48 + len.div_ceil(8) * 8;
    let followed = bytes.get(next..next + 48).is_some_and(|h| h.iter().any(|&b| b != 0));
    if len < 32 || !followed {
        return None;
    }
    bytes[64 + 48 + 10] ^= 0x40;
    let file = std::fs::OpenOptions::new().write(true).open(&segment).ok()?;
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes[64 + 48 + 10..64 + 48 + 11], 64 + 48 + 10).ok()?;
    file.sync_all().ok()?;
    Some(format!("flipped a bit in the first record of {}", segment.display()))
}

/// One loop-mounted XFS disk with every partition: power cuts (the
/// filesystem shut down without flushing its log, the node killed, the
/// disk remounted), under load and at quiescent points; kill -9; SIGTERM;
/// installs under bursts of 100 KB puts against a 256 KiB write queue;
/// damage at rest to an installed partition (its CURRENT removed, a bit
/// flipped mid-log) while the node is down.
#[test]
fn nemesis_power_cuts_on_xfs() {
    if unavailable(Fs::Xfs.tools()).is_some() {
        return;
    }
    let budget = Budget::from_env(14);
    let disk = RefCell::new(LoopDisk::new(Fs::Xfs));
    let settings = "[health]\nprobe_interval = \"200ms\"\n\n\
                    [wal]\nsegment_size = \"8MiB\"\nmax_batch_bytes = \"256KiB\"\n\n\
                    [limits]\nrequest_timeout = \"5s\"\nmax_blob_size = \"128KiB\"\n\
                    max_queued_bytes_per_partition = \"256KiB\"\n";
    let toml = config_with_disks(&[("d0", disk.borrow().path())], settings);
    let setup = Setup {
        name: "nemesis_power_cuts_on_xfs",
        partitions: PARTITIONS.to_vec(),
        keys: 16,
        clients: 12,
        mix: [50, 30, 10, 10],
        sizes: vec![(80, 64, 4096), (20, 4096, 32_768)],
        admin: Some([30, 30, 10, 8, 8, 5]),
        admin_pause_ms: (100, 400),
        request_timeout: Duration::from_secs(5),
        faults_may_be_lost_on_power_cut: true,
    };
    let mut run = Run::start(setup, budget, Node::start(&toml, None));
    // Damage at rest faults a partition for good (recover finds the same
    // damage); enough of them fault the disk. Repaired as an operator
    // would: recover, else install the partition's latest image.
    let mut heal = |run: &Run| run.repair_faulted();
    while let Some(_step) = run.next_step() {
        match run.rng.weighted(&[12, 30, 18, 12, 10, 15, 8]) {
            0 => run.work(Duration::from_millis(1000)),
            6 => {
                // Damage at rest while the node is down, in a partition that
                // had an install: its CURRENT removed, or a bit flipped in
                // its log's first record (a valid record follows).
                let p = *run.rng.pick(&PARTITIONS);
                let remove = run.rng.chance(50);
                let root = disk.borrow().path().join(format!("partitions/{p}"));
                let history = std::sync::Arc::clone(&run.history);
                let step = run.step();
                let mut damage = |_: &mut Node| {
                    if let Some(what) = damage_at_rest(&root, remove) {
                        history.inject(step, vec![p], &what);
                    }
                };
                run.restart(Stop::Term, true, &mut heal, &mut || {}, &mut damage);
            }
            5 => {
                let into = *run.rng.pick(&PARTITIONS);
                install_under_burst(&mut run, into);
            }
            n @ (1 | 2) => {
                run.work_ms(300, 1200);
                run.inject(Vec::new(), "power cut");
                let mut cut = || disk.borrow().shutdown(false);
                let mut remount = |_: &mut Node| {
                    let mut disk = disk.borrow_mut();
                    disk.unmount();
                    disk.mount();
                };
                run.restart(Stop::PowerCut, n == 2, &mut heal, &mut cut, &mut remount);
            }
            3 => {
                run.work_ms(300, 1000);
                run.restart(Stop::Kill, false, &mut heal, &mut || {}, &mut |_| {});
            }
            _ => run.restart(Stop::Term, true, &mut heal, &mut || {}, &mut |_| {}),
        }
    }
    run.finish(&mut heal);
}

/// A full disk, two ways: EFBIG (the node restarted under a 1 MiB file
/// size limit with 8 MiB segments: every log hits it) and ENOSPC (disk d1
/// is a small tmpfs that fills up and is grown back). Many small writers,
/// so that the failing write has batch mates.
#[test]
fn nemesis_disk_full() {
    if unavailable(&["mount"]).is_some() {
        return;
    }
    let budget = Budget::from_env(12);
    let d0 = tempfile::tempdir().unwrap();
    let mut tmpfs_size: u64 = 40 << 20;
    let d1 = SmallTmpfs::new(tmpfs_size);
    let settings = "[health]\nprobe_interval = \"200ms\"\n\n[wal]\nsegment_size = \"8MiB\"\n\n[limits]\nrequest_timeout = \"5s\"\n";
    let toml = config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], settings);
    let setup = Setup {
        name: "nemesis_disk_full",
        partitions: PARTITIONS.to_vec(),
        keys: 24,
        clients: 16,
        mix: [60, 25, 8, 7],
        sizes: vec![(85, 500, 500), (15, 16_384, 65_536)],
        admin: Some([20, 15, 20, 5, 5, 5]),
        admin_pause_ms: (200, 600),
        request_timeout: Duration::from_secs(5),
        faults_may_be_lost_on_power_cut: false,
    };
    const LIMIT: u64 = 1 << 20;
    let mut run = Run::start(setup, budget, Node::start(&toml, Some(LIMIT)));
    run.inject(PARTITIONS.to_vec(), "the node runs under a 1 MiB file size limit (EFBIG)");
    let mut heal = |_: &Run| {};
    while let Some(_step) = run.next_step() {
        match run.rng.weighted(&[40, 25, 20, 15]) {
            0 => run.work_ms(1500, 1500),
            1 => {
                // Restart with or without the file size limit.
                let limit = if run.rng.chance(50) { Some(LIMIT) } else { None };
                let how = if run.rng.chance(50) { Stop::Term } else { Stop::Kill };
                let what = format!(
                    "next start {}",
                    if limit.is_some() { "under a 1 MiB file size limit" } else { "without a file size limit" }
                );
                run.note(what.clone());
                run.inject(PARTITIONS.to_vec(), &what);
                run.restart(how, true, &mut heal, &mut || {}, &mut |node| node.fsize_limit = limit);
            }
            2 => {
                tmpfs_size += 8 << 20;
                d1.resize(tmpfs_size);
                run.note(format!("d1 grown to {} MiB", tmpfs_size >> 20));
                run.work(Duration::from_millis(1000));
            }
            _ => {
                run.work_ms(500, 1000);
                run.restart(Stop::Kill, false, &mut heal, &mut || {}, &mut |_| {});
            }
        }
    }
    run.finish(&mut heal);
}

/// Three nodes, three partitions of three replicas each, fast Raft
/// timings and a snapshot every 50 entries (so that snapshots, purges and
/// snapshot installs to a restarted node happen during the run). Clients
/// send every operation through a random running node and follow its
/// redirects. Faults, one node at a time (a majority always without one):
/// kill -9 of a leader or a follower, restarted after a while or at once;
/// SIGSTOP of a leader or a follower for up to 3 s (a paused leader comes
/// back stale: its late answers must still tell the truth); a node's peer
/// port blocked by netfilter rules (cut off from its peers, still reached
/// by clients), then reconnected.
#[test]
fn nemesis_cluster_kills_pauses_and_partitions() {
    if unavailable(&["iptables"]).is_some() {
        return;
    }
    let firewall = match Firewall::new(3) {
        Ok(firewall) => firewall,
        Err(why) => {
            skipped(Some(why));
            return;
        }
    };
    let budget = Budget::from_env(18);
    let setup = ClusterSetup {
        name: "nemesis_cluster_kills_pauses_and_partitions",
        nodes: 3,
        partitions: vec![1, 2, 3],
        replicas: 3,
        keys: 12,
        clients: 8,
        mix: [50, 32, 10, 8],
        sizes: vec![(90, 64, 2048), (10, 8192, 32_768)],
        // The disk is the machine's: only a truly full one may refuse.
        extra: "snapshot_logs = 50\n\n[limits]\nrequest_timeout = \"2s\"\n\n\
                [health]\ndisk_full_ratio = 0.995\ndisk_resume_ratio = 0.99\n"
            .to_string(),
    };
    let mut run = ClusterRun::start(setup, budget, Some(firewall));
    while let Some(_step) = run.next_step() {
        let action = run.rng.weighted(&[8, 14, 8, 12, 8, 22, 28]);
        let leader = matches!(action, 1 | 3 | 5) || (action == 6 && run.rng.chance(70));
        let Some(i) = run.target(leader) else {
            run.work_ms(500, 500);
            continue;
        };
        match action {
            0 => run.work_ms(800, 800),
            1 | 2 => {
                // kill -9, down for a while: the group goes on without it,
                // and it catches up (by snapshot, often) once restarted.
                run.work_ms(200, 600);
                run.kill(i);
                run.work_ms(1000, 2000);
                run.restart(i);
                run.work_ms(300, 700);
            }
            3 | 4 => {
                run.kill(i);
                run.restart(i);
                run.work_ms(500, 1000);
            }
            5 => {
                run.pause(i);
                run.work_ms(700, 2300);
                run.resume(i);
                run.work_ms(500, 1000);
            }
            _ => {
                let led = run.isolate(i);
                run.work_ms(1500, 2500);
                run.heal(i, &led);
                run.work_ms(500, 1000);
            }
        }
    }
    run.finish();
}
