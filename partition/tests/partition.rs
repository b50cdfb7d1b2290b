//! A partition on the simulated disk: the blob API, reopen, and each fault
//! of the fault matrix that a single partition can meet, plus isolation
//! between partitions.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datanode_partition::{Error, FaultCause, Partition, PartitionOptions, ReadOnlyReason, State};
use datanode_wal::storage::{Fault, SimStorage};
use datanode_wal::{IoOp, Storage, WalOptions};

fn options(id: u64) -> PartitionOptions {
    let dir = PathBuf::from(format!("/d0/partitions/{id}"));
    PartitionOptions {
        wal: WalOptions { segment_size: 8192, prewrite_segments: false, ..WalOptions::new(id) },
        ..PartitionOptions::new(id, "d0", dir)
    }
}

fn open(storage: &SimStorage, id: u64) -> Arc<Partition> {
    let storage: Arc<dyn Storage> = Arc::new(storage.clone());
    Arc::new(Partition::open(storage, options(id)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().unwrap()
}

#[test]
fn blobs_put_get_range_delete_list_and_survive_reopen() {
    let rt = runtime();
    let sim = SimStorage::new(1);
    let p = open(&sim, 1);
    assert_eq!(p.health().state(), State::Healthy);
    for i in 0..50u32 {
        let ack = rt.block_on(p.put(format!("k/{i:03}").as_bytes(), &i.to_le_bytes().repeat(100))).unwrap();
        assert_eq!(ack.size, 400);
    }
    rt.block_on(p.put(b"k/007", b"overwritten")).unwrap();
    rt.block_on(p.delete(b"k/008")).unwrap();
    assert!(matches!(rt.block_on(p.delete(b"k/008")), Err(Error::NotFound)));
    assert_eq!(&p.get(b"k/007", None).unwrap()[..], b"overwritten");
    assert_eq!(&p.get(b"k/007", Some(4..9)).unwrap()[..], b"writt");
    assert!(matches!(p.get(b"k/007", Some(4..99)), Err(Error::BadRange { len: 11, .. })));
    assert!(matches!(p.get(b"k/008", None), Err(Error::NotFound)));
    assert!(matches!(rt.block_on(p.put(b"", b"x")), Err(Error::BadRequest(_))));
    assert!(matches!(rt.block_on(p.put(&[1u8; 1025], b"x")), Err(Error::BadRequest(_))));

    let (page, next) = p.list(b"k/00", None, 5).unwrap();
    let names: Vec<&[u8]> = page.iter().map(|k| &k[..]).collect();
    assert_eq!(names, vec![&b"k/000"[..], b"k/001", b"k/002", b"k/003", b"k/004"]);
    let (rest, end) = p.list(b"k/00", next.as_deref(), 100).unwrap();
    assert_eq!(rest.len(), 4, "k/005..k/009 without the deleted k/008");
    assert_eq!(end, None);
    let stats = p.stats();
    assert_eq!((stats.blobs, stats.last_lsn), (49, 52));
    p.close();

    let p = open(&sim, 1);
    assert_eq!(p.health().state(), State::Healthy);
    assert_eq!(&p.get(b"k/007", None).unwrap()[..], b"overwritten");
    assert!(matches!(p.get(b"k/008", None), Err(Error::NotFound)));
    assert_eq!(&p.get(b"k/049", None).unwrap()[..], &49u32.to_le_bytes().repeat(100)[..]);
    assert_eq!(p.stats().blobs, 49);
}

#[test]
fn sync_eio_faults_the_partition_stickily_until_recover() {
    let rt = runtime();
    let sim = SimStorage::new(2);
    let p = open(&sim, 2);
    rt.block_on(p.put(b"acked", b"before the fault")).unwrap();
    sim.inject(Fault::new(IoOp::Sync, libc::EIO).on_path("/wal/"));
    let error = rt.block_on(p.put(b"lost", b"x")).unwrap_err();
    assert!(matches!(error, Error::WriteOutcomeUnknown(_)), "{error:?}");
    match p.health().state() {
        State::Faulted(fault) => {
            assert_eq!((fault.cause, fault.op.as_str(), fault.errno), (FaultCause::Io, "sync", Some(libc::EIO)));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(rt.block_on(p.put(b"later", b"x")), Err(Error::Faulted { .. })));
    assert!(matches!(p.get(b"acked", None), Err(Error::Faulted { .. })));
    p.close();

    // A restart does not clear the fault.
    let p = open(&sim, 2);
    assert_eq!(p.health().state().name(), "faulted");
    p.recover().unwrap();
    assert_eq!(p.health().state(), State::Healthy);
    assert_eq!(&p.get(b"acked", None).unwrap()[..], b"before the fault");
    rt.block_on(p.put(b"after", b"recover")).unwrap();
    p.close();
    let p = open(&sim, 2);
    assert_eq!(p.health().state(), State::Healthy, "recover removed the fault record");
}

#[test]
fn recover_refuses_a_corrupt_log_and_stays_faulted() {
    let rt = runtime();
    let sim = SimStorage::new(3);
    let p = open(&sim, 3);
    for i in 0..3u8 {
        rt.block_on(p.put(&[b'k', i], &[i; 100])).unwrap();
    }
    p.close();
    let segment = Path::new("/d0/partitions/3/wal/00000000000000000001.wal");
    sim.tamper(segment, 64 + 48 + 10, b"rot").unwrap();
    let p = open(&sim, 3);
    match p.health().state() {
        State::Faulted(fault) => assert_eq!(fault.cause, FaultCause::Corruption),
        other => panic!("{other:?}"),
    }
    assert!(matches!(p.recover(), Err(Error::RecoverFailed(_))));
    assert_eq!(p.health().state().name(), "faulted");
}

#[test]
fn bytes_damaged_at_rest_are_never_served() {
    let rt = runtime();
    let sim = SimStorage::new(4);
    let p = open(&sim, 4);
    rt.block_on(p.put(b"a", &[7u8; 300])).unwrap();
    rt.block_on(p.put(b"b", &[8u8; 300])).unwrap();
    let segment = Path::new("/d0/partitions/4/wal/00000000000000000001.wal");
    sim.tamper(segment, 64 + 48 + 3 + 1 + 100, &[0]).unwrap();
    assert!(matches!(p.get(b"a", None), Err(Error::Read(_))));
    assert_eq!(p.health().state().name(), "faulted");
    assert!(matches!(p.get(b"b", None), Err(Error::Faulted { .. })));
}

#[test]
fn read_eio_faults_only_past_the_tolerance() {
    let rt = runtime();
    let sim = SimStorage::new(5);
    let p = open(&sim, 5);
    rt.block_on(p.put(b"a", b"value")).unwrap();
    sim.inject(Fault::new(IoOp::Read, libc::EIO).sticky());
    for _ in 0..3 {
        assert!(matches!(p.get(b"a", None), Err(Error::Read(_))));
        assert_eq!(p.health().state(), State::Healthy);
    }
    assert!(matches!(p.get(b"a", None), Err(Error::Read(_))));
    match p.health().state() {
        State::Faulted(fault) => assert_eq!((fault.cause, fault.errno), (FaultCause::ReadErrors, Some(libc::EIO))),
        other => panic!("{other:?}"),
    }
}

#[test]
fn enospc_makes_it_read_only_then_writable_again_with_every_ack_kept() {
    let rt = runtime();
    let sim = SimStorage::new(6);
    let p = open(&sim, 6);
    rt.block_on(p.put(b"acked", b"kept")).unwrap();
    sim.inject(Fault::new(IoOp::Write, libc::ENOSPC).on_path("/wal/").short_write());
    let error = rt.block_on(p.put(b"full", &[1u8; 500])).unwrap_err();
    assert!(matches!(&error, Error::ReadOnly { reasons, .. } if reasons.contains(&ReadOnlyReason::DiskFull)));
    assert_eq!(p.health().state(), State::ReadOnly([ReadOnlyReason::DiskFull].into()));
    assert_eq!(&p.get(b"acked", None).unwrap()[..], b"kept", "reads are still served");
    assert!(matches!(rt.block_on(p.put(b"more", b"x")), Err(Error::ReadOnly { .. })));

    sim.clear_faults();
    assert!(p.retry_after_disk_full());
    assert_eq!(p.health().state(), State::Healthy);
    rt.block_on(p.put(b"more", b"x")).unwrap();
    assert_eq!(&p.get(b"acked", None).unwrap()[..], b"kept");
    assert!(matches!(p.get(b"full", None), Err(Error::NotFound)), "the failed put was never acknowledged");
}

#[test]
fn operator_read_only_blocks_writes_not_reads() {
    let rt = runtime();
    let sim = SimStorage::new(7);
    let p = open(&sim, 7);
    rt.block_on(p.put(b"a", b"1")).unwrap();
    p.set_operator_read_only(true);
    assert!(matches!(rt.block_on(p.put(b"b", b"2")), Err(Error::ReadOnly { .. })));
    assert_eq!(&p.get(b"a", None).unwrap()[..], b"1");
    p.set_operator_read_only(false);
    rt.block_on(p.put(b"b", b"2")).unwrap();
}

#[test]
fn a_fault_in_one_partition_changes_nothing_in_another_on_the_same_disk() {
    let rt = runtime();
    let sim = SimStorage::new(8);
    let (sick, well) = (open(&sim, 10), open(&sim, 11));
    sim.inject(Fault::new(IoOp::Write, libc::EIO).on_path("/partitions/10/").sticky());
    assert!(rt.block_on(sick.put(b"k", b"v")).is_err());
    assert_eq!(sick.health().state().name(), "faulted");
    for i in 0..20u8 {
        rt.block_on(well.put(&[i], &[i; 64])).unwrap();
        assert_eq!(&well.get(&[i], None).unwrap()[..], &[i; 64][..]);
    }
    assert_eq!(well.health().state(), State::Healthy);
}

#[test]
fn a_hung_fsync_stalls_only_its_own_partition() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let sim = SimStorage::new(9);
    let hung = Arc::new(open(&sim, 20));
    let well = Arc::new(open(&sim, 21));
    sim.pause_on(IoOp::Sync, "/partitions/20/");
    let stuck = {
        let hung = Arc::clone(&hung);
        rt.spawn(async move { hung.put(b"k", b"waits").await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sim.held() == 0 {
        assert!(std::time::Instant::now() < deadline, "the hung put never reached its sync");
        std::thread::sleep(Duration::from_millis(1));
    }
    // While partition 20's sync hangs, partition 21 completes everything.
    for i in 0..50u8 {
        rt.block_on(well.put(&[i], &[i; 32])).unwrap();
    }
    assert!(!stuck.is_finished(), "the hung partition's put cannot have completed");
    assert_eq!(sim.held(), 1);
    sim.resume(IoOp::Sync);
    rt.block_on(stuck).unwrap().unwrap();
    assert_eq!(&hung.get(b"k", None).unwrap()[..], b"waits");
}

/// `get_cached` serves from the page cache with the same checks as `get`,
/// and defers (`None`) where it cannot tell, as on the simulator.
#[test]
fn get_cached_matches_get_and_defers_when_it_cannot_tell() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let std: Arc<dyn Storage> = Arc::new(datanode_wal::storage::StdStorage);
    let wal = WalOptions { segment_size: 1 << 20, ..WalOptions::new(1) };
    let partition =
        Arc::new(Partition::open(std, PartitionOptions { wal, ..PartitionOptions::new(1, "d0", dir.path()) }));
    rt.block_on(partition.put(b"k", b"0123456789")).unwrap();
    assert_eq!(partition.get_cached(b"k", None).unwrap().as_deref(), Some(&b"0123456789"[..]));
    assert_eq!(partition.get_cached(b"k", Some(2..5)).unwrap().as_deref(), Some(&b"234"[..]));
    assert!(matches!(partition.get_cached(b"missing", None), Err(Error::NotFound)));
    assert!(matches!(partition.get_cached(b"k", Some(5..11)), Err(Error::BadRange { .. })));

    let sim = SimStorage::new(9);
    let partition = open(&sim, 2);
    rt.block_on(partition.put(b"k", b"v")).unwrap();
    assert_eq!(partition.get_cached(b"k", None).unwrap(), None);
    assert_eq!(&partition.get(b"k", None).unwrap()[..], b"v");
}
