//! The disk state machine on the simulated disk: slow syncs degrade a
//! disk, a failing or hung probe faults it, many faulted partitions fault
//! it, a full disk makes its partitions read-only until space returns; the
//! other disk never notices. A dead disk's faults stay sticky across a
//! restart through the fault journal on the other disk.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datanode_partition::{
    DiskDir, DiskOptions, DiskState, FaultCause, PartitionDefaults, ReadOnlyReason, Registry, State,
};
use datanode_wal::storage::{Fault, SimStorage};
use datanode_wal::{IoOp, Storage, WalOptions};

fn registry(sim: &SimStorage) -> Registry {
    let registry = open(sim);
    for (id, disk) in [(1, "d0"), (2, "d0"), (3, "d0"), (4, "d1")] {
        registry.create(id, disk).unwrap();
    }
    registry
}

fn open(sim: &SimStorage) -> Registry {
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let disks = ["d0", "d1"].iter().map(|n| DiskDir { name: n.to_string(), path: PathBuf::from(format!("/{n}")) });
    let defaults = PartitionDefaults {
        disk: DiskOptions {
            probe_timeout: Duration::from_secs(2),
            slow_sync: Duration::from_millis(20),
            faulted_partitions: 2,
            ..DiskOptions::default()
        },
        wal: WalOptions { segment_size: 8192, prewrite_segments: false, ..WalOptions::new(0) },
        ..PartitionDefaults::default()
    };
    Registry::open(storage, disks.collect(), defaults)
}

fn state_of(registry: &Registry, id: u64) -> State {
    registry.get(id).unwrap().health().state()
}

fn disk_state(registry: &Registry, name: &str) -> DiskState {
    registry.disk_statuses().into_iter().find(|d| d.name == name).unwrap().state
}

#[test]
fn a_slow_disk_makes_its_partitions_read_only_until_it_is_fast_again() {
    let sim = SimStorage::new(1);
    let registry = registry(&sim);
    sim.delay_on(IoOp::Sync, "/d0/", Duration::from_millis(60));
    registry.check_disks();
    assert_eq!(disk_state(&registry, "d0"), DiskState::Degraded);
    assert_eq!(state_of(&registry, 1), State::ReadOnly([ReadOnlyReason::DiskDegraded].into()));
    assert_eq!(state_of(&registry, 4), State::Healthy, "the other disk's partition");
    assert_eq!(disk_state(&registry, "d1"), DiskState::Healthy);
    sim.delay_on(IoOp::Sync, "/d0/", Duration::ZERO);
    registry.check_disks();
    assert_eq!(disk_state(&registry, "d0"), DiskState::Healthy);
    assert_eq!(state_of(&registry, 1), State::Healthy);
}

#[test]
fn a_failing_probe_faults_the_disk_and_all_its_partitions_only() {
    let sim = SimStorage::new(2);
    let registry = registry(&sim);
    sim.inject(Fault::new(IoOp::Sync, libc::EIO).on_path("/d0/").sticky());
    let statuses = registry.check_disks();
    let d0 = statuses.iter().find(|d| d.name == "d0").unwrap();
    assert_eq!(d0.state, DiskState::Faulted);
    assert!(!d0.last_probe.as_ref().unwrap().ok);
    assert_eq!(d0.partitions, vec![1, 2, 3]);
    for id in [1, 2, 3] {
        match state_of(&registry, id) {
            State::Faulted(fault) => assert_eq!(fault.cause, FaultCause::DiskFaulted),
            other => panic!("partition {id}: {other:?}"),
        }
    }
    assert_eq!(state_of(&registry, 4), State::Healthy);
    assert_eq!(disk_state(&registry, "d1"), DiskState::Healthy);
}

#[test]
fn a_hung_probe_times_out_into_a_faulted_disk() {
    let sim = SimStorage::new(3);
    let registry = registry(&sim);
    sim.pause_on(IoOp::Sync, "/d0/.datanode-probe");
    let statuses = registry.check_disks();
    let d0 = statuses.iter().find(|d| d.name == "d0").unwrap();
    assert_eq!(d0.state, DiskState::Faulted, "{d0:?}");
    // While the first probe still hangs, no second probe thread piles up.
    let again = registry.check_disks();
    assert!(again[0].last_probe.as_ref().unwrap().error.as_deref().unwrap().contains("still hanging"));
    sim.resume(IoOp::Sync);
    assert_eq!(disk_state(&registry, "d1"), DiskState::Healthy);
}

#[test]
fn enough_faulted_partitions_fault_their_disk() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(4);
    let registry = registry(&sim);
    sim.inject(Fault::new(IoOp::Write, libc::EIO).on_path("/d0/partitions/").sticky());
    for id in [1, 2] {
        assert!(rt.block_on(registry.get(id).unwrap().put(b"k", b"v")).is_err());
    }
    registry.check_disks();
    assert_eq!(disk_state(&registry, "d0"), DiskState::Faulted);
    match state_of(&registry, 3) {
        State::Faulted(fault) => assert_eq!(fault.cause, FaultCause::DiskFaulted),
        other => panic!("{other:?}"),
    }
    assert_eq!(state_of(&registry, 4), State::Healthy);
}

/// A disk faulted only because enough of its partitions faulted (its probe
/// works) lets an operator recover them one by one: a recovered partition
/// stays healthy, though the disk stays faulted until few are left.
#[test]
fn partitions_recovered_one_by_one_on_a_disk_faulted_by_their_count_stay_healthy() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(6);
    let registry = registry(&sim);
    sim.inject(Fault::new(IoOp::Write, libc::EIO).on_path("/d0/partitions/").sticky());
    for id in [1, 2, 3] {
        assert!(rt.block_on(registry.get(id).unwrap().put(b"k", b"v")).is_err());
    }
    registry.check_disks();
    assert_eq!(disk_state(&registry, "d0"), DiskState::Faulted);
    sim.clear_faults();
    registry.get(1).unwrap().recover().unwrap();
    registry.check_disks();
    assert_eq!(disk_state(&registry, "d0"), DiskState::Faulted, "two partitions are still faulted");
    assert_eq!(state_of(&registry, 1), State::Healthy, "a recovered partition is not faulted again by the count");
    registry.get(2).unwrap().recover().unwrap();
    registry.check_disks();
    assert_eq!(disk_state(&registry, "d0"), DiskState::Healthy);
    registry.get(3).unwrap().recover().unwrap();
    registry.check_disks();
    for id in [1, 2, 3] {
        assert_eq!(state_of(&registry, id), State::Healthy, "partition {id}");
        rt.block_on(registry.get(id).unwrap().put(b"k", b"v")).unwrap();
    }
}

#[test]
fn a_full_disk_is_read_only_with_hysteresis() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(5);
    let registry = registry(&sim);
    rt.block_on(registry.get(1).unwrap().put(b"k", b"kept")).unwrap();
    sim.set_space(1000, 30); // 97% used
    registry.check_disks();
    assert_eq!(state_of(&registry, 1), State::ReadOnly([ReadOnlyReason::DiskFull].into()));
    assert!(registry.disk_statuses()[0].reasons.contains(&"disk_full".to_string()));
    assert_eq!(&registry.get(1).unwrap().get(b"k", None).unwrap()[..], b"kept");
    // Deletes are taken (so an operator can free space), puts are not.
    rt.block_on(registry.get(1).unwrap().put(b"k3", b"more")).unwrap_err();
    rt.block_on(registry.get(1).unwrap().put(b"k", b"x")).unwrap_err();
    sim.set_space(1000, 30);
    rt.block_on(registry.get(1).unwrap().delete(b"k")).unwrap();
    assert!(matches!(registry.get(1).unwrap().get(b"k", None), Err(datanode_partition::Error::NotFound)));
    rt.block_on(registry.get(1).unwrap().put(b"k", b"kept")).unwrap_err();
    sim.set_space(1000, 70); // 93%: below full, above resume -> stays read-only
    registry.check_disks();
    assert_eq!(state_of(&registry, 1), State::ReadOnly([ReadOnlyReason::DiskFull].into()));
    sim.set_space(1000, 200); // 80%
    registry.check_disks();
    assert_eq!(state_of(&registry, 1), State::Healthy);
    rt.block_on(registry.get(1).unwrap().put(b"k2", b"writable")).unwrap();
}

#[test]
fn a_dead_disks_faults_stay_sticky_across_a_restart_until_recover() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(6);
    let registry = registry(&sim);
    rt.block_on(registry.get(1).unwrap().put(b"acked", b"before the disk died")).unwrap();
    // The filesystem shuts down: every operation on d0 fails from now on.
    for op in [IoOp::Open, IoOp::Write, IoOp::Sync, IoOp::SyncDir, IoOp::Metadata] {
        sim.inject(Fault::new(op, libc::EIO).on_path("/d0/").sticky());
    }
    assert!(rt.block_on(registry.get(1).unwrap().put(b"lost", b"never acknowledged")).is_err());
    registry.check_disks();
    let causes = |registry: &Registry| {
        [1, 2, 3, 4].map(|id| match state_of(registry, id) {
            State::Faulted(fault) => Some(fault.cause),
            _ => None,
        })
    };
    let dead = [Some(FaultCause::Io), Some(FaultCause::DiskFaulted), Some(FaultCause::DiskFaulted), None];
    assert_eq!(causes(&registry), dead);
    registry.close();
    drop(registry);

    // Repaired and remounted: d0 works again and holds no FAULT file, since
    // it took no write after it died; only d1's journal remembers.
    let restarted = sim.crash_image();
    for id in [1, 2, 3] {
        let dir = PathBuf::from(format!("/d0/partitions/{id}"));
        assert_eq!(datanode_partition::fault_file::read(&restarted, &dir).unwrap(), None);
    }
    let registry = open(&restarted);
    assert_eq!(causes(&registry), dead, "sticky across the restart");
    assert_eq!(disk_state(&registry, "d1"), DiskState::Healthy);
    for id in [1, 2, 3] {
        registry.get(id).unwrap().recover().unwrap();
    }
    registry.sync_fault_journal();
    assert_eq!(&registry.get(1).unwrap().get(b"acked", None).unwrap()[..], b"before the disk died");
    registry.close();
    drop(registry);

    let registry = open(&restarted.crash_image());
    assert_eq!(causes(&registry), [None; 4], "a recover is remembered too");
}

#[test]
fn an_unreadable_partition_file_is_served_faulted_never_quarantined() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(8);
    let registry = registry(&sim);
    rt.block_on(registry.get(1).unwrap().put(b"k", b"kept")).unwrap();
    registry.close();
    drop(registry);
    // A latent sector error under partition 1's PARTITION file.
    sim.inject(Fault::new(IoOp::Read, libc::EIO).on_path("/d0/partitions/1/PARTITION").sticky());
    let registry = open(&sim);
    match state_of(&registry, 1) {
        State::Faulted(fault) => assert_eq!((fault.cause, fault.errno), (FaultCause::Io, Some(libc::EIO))),
        other => panic!("{other:?}"),
    }
    assert_eq!(state_of(&registry, 4), State::Healthy);
    assert!(registry.verify_once().quarantined.is_empty(), "an unreadable partition is not an unknown one");
    sim.clear_faults();
    registry.get(1).unwrap().recover().unwrap();
    assert_eq!(&registry.get(1).unwrap().get(b"k", None).unwrap()[..], b"kept");
}

fn process_threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

#[test]
fn partitions_share_their_disks_threads_and_a_hung_fsync_stalls_only_its_own() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let sim = SimStorage::new(11);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let disks = vec![DiskDir { name: "d0".into(), path: PathBuf::from("/d0") }];
    let defaults = PartitionDefaults {
        wal: WalOptions { segment_size: 64 << 10, ..WalOptions::new(0) },
        io_threads_per_disk: 4,
        ..PartitionDefaults::default()
    };
    let before = process_threads();
    let registry = Registry::open(storage, disks, defaults);
    for id in 1..=300 {
        registry.create(id, "d0").unwrap();
    }
    // One partition's fsync hangs; its put waits.
    sim.pause_on(IoOp::Sync, "/d0/partitions/1/");
    let hung = {
        let partition = registry.get(1).unwrap();
        rt.spawn(async move { partition.put(b"k", b"held").await })
    };
    while sim.held() == 0 {
        std::thread::yield_now();
    }
    // Every other partition, on the same disk and the same threads, writes.
    let others: Vec<_> = (2..=300)
        .map(|id| {
            let partition = registry.get(id).unwrap();
            rt.spawn(async move { partition.put(b"k", format!("v{id}").as_bytes()).await })
        })
        .collect();
    for put in others {
        rt.block_on(put).unwrap().unwrap();
    }
    let grown = process_threads().saturating_sub(before);
    // The disk's 4 I/O threads, its fault-journal writer, and slack for the
    // test's own; never one or two per partition.
    assert!(grown <= 12, "300 partitions grew the process by {grown} threads");
    assert!(!hung.is_finished(), "the hung partition's put is still waiting");
    sim.resume(IoOp::Sync);
    rt.block_on(hung).unwrap().unwrap();
    assert_eq!(&registry.get(1).unwrap().get(b"k", None).unwrap()[..], b"held");
    registry.close();
}

#[test]
fn a_full_disk_keeps_serving_reads_while_its_logs_are_reopened() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(12);
    let registry = registry(&sim);
    let partition = registry.get(1).unwrap();
    rt.block_on(partition.put(b"k", b"kept")).unwrap();
    // A write runs out of space: the log is poisoned, the partition read-only.
    sim.inject(Fault::new(IoOp::Write, libc::ENOSPC).on_path("/d0/partitions/1/"));
    assert!(rt.block_on(partition.put(b"k2", b"no room")).is_err());
    assert_eq!(partition.health().state(), State::ReadOnly([ReadOnlyReason::DiskFull].into()));
    // The probe finds the disk full and tries to reopen the log (so deletes
    // could go through), but the disk will not even open its files now.
    sim.set_space(1000, 10);
    sim.inject(Fault::new(IoOp::Open, libc::ENOSPC).on_path("/d0/partitions/1/").sticky());
    registry.check_disks();
    assert_eq!(&partition.get(b"k", None).unwrap()[..], b"kept", "reads are served while full");
    sim.clear_faults();
    sim.set_space(1000, 500);
    registry.check_disks();
    assert_eq!(partition.health().state(), State::Healthy);
    rt.block_on(partition.put(b"k2", b"room again")).unwrap();
    assert_eq!(&partition.get(b"k", None).unwrap()[..], b"kept");
}
