//! Regression tests for answers that must tell the truth and data that must
//! never be lost at the edges: installed and compacted logs whose damage
//! must be corruption, a lost `CURRENT`, writes whose caller gave up,
//! installs under write load, and images of another partition.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datanode_partition::{Error, FaultCause, Partition, PartitionOptions, State};
use datanode_wal::storage::SimStorage;
use datanode_wal::{IoOp, Storage, WalOptions};

fn options(id: u64) -> PartitionOptions {
    let dir = PathBuf::from(format!("/d0/partitions/{id}"));
    PartitionOptions {
        wal: WalOptions { segment_size: 1 << 20, prewrite_segments: false, ..WalOptions::new(id) },
        ..PartitionOptions::new(id, "d0", dir)
    }
}

fn open(sim: &SimStorage, id: u64) -> Arc<Partition> {
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    Arc::new(Partition::open(storage, options(id)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap()
}

fn value(key: u32, tag: &str) -> Vec<u8> {
    format!("{tag}-{key}-").repeat(64).into_bytes()
}

/// An image of partition `id` holding `keys` blobs, exported from a copy of
/// it on another disk.
fn image_of(id: u64, keys: u32, tag: &str) -> Vec<u8> {
    let rt = runtime();
    let copy = open(&SimStorage::new(900 + id), id);
    for k in 0..keys {
        rt.block_on(copy.put(format!("k{k:03}").as_bytes(), &value(k, tag))).unwrap();
    }
    copy.export().unwrap().flat_map(|piece| piece.unwrap().to_vec()).collect()
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn first_segment(sim: &SimStorage, dir: &Path) -> PathBuf {
    let names = sim.list_dir(dir).unwrap();
    let name = names.iter().find(|n| n.ends_with(".wal")).unwrap();
    dir.join(name)
}

#[test]
fn a_flipped_bit_in_an_installed_image_is_corruption_never_a_torn_tail() {
    let sim = SimStorage::new(1);
    let p = open(&sim, 1);
    p.install(&image_of(1, 50, "img")[..]).unwrap();
    assert_eq!(p.stats().blobs, 50);
    p.close();
    // A quarter into the installed log.
    let segment = first_segment(&sim, Path::new("/d0/partitions/1/wal-1"));
    let len = sim.contents(&segment).unwrap().iter().rposition(|b| *b != 0).unwrap();
    let at = len / 4;
    let byte = sim.contents(&segment).unwrap()[at];
    sim.tamper(&segment, at, &[byte ^ 0x10]).unwrap();
    let before = sim.contents(&segment).unwrap();
    let p = open(&sim, 1);
    match p.health().state() {
        State::Faulted(fault) => assert_eq!(fault.cause, FaultCause::Corruption, "{fault:?}"),
        other => panic!("a damaged installed image must fault the partition, not load as {other:?}"),
    }
    assert_eq!(sim.contents(&segment).unwrap(), before, "nothing of a durable log is truncated");
}

#[test]
fn a_flipped_bit_in_a_compacted_store_is_corruption_never_a_torn_tail() {
    let rt = runtime();
    let sim = SimStorage::new(2);
    let p = open(&sim, 2);
    for k in 0..40 {
        rt.block_on(p.put(format!("k{k:03}").as_bytes(), &value(k, "a"))).unwrap();
    }
    p.compact().unwrap();
    p.close();
    let segment = first_segment(&sim, Path::new("/d0/partitions/2/compacted-1"));
    let at = sim.contents(&segment).unwrap().iter().rposition(|b| *b != 0).unwrap() / 3;
    let byte = sim.contents(&segment).unwrap()[at];
    sim.tamper(&segment, at, &[byte ^ 0x01]).unwrap();
    let p = open(&sim, 2);
    assert_eq!(p.health().state().name(), "faulted", "a damaged compacted store must fault the partition");
}

#[test]
fn a_lost_current_faults_the_partition_and_removes_nothing() {
    let sim = SimStorage::new(3);
    let p = open(&sim, 3);
    p.install(&image_of(3, 20, "img")[..]).unwrap();
    p.close();
    let dir = Path::new("/d0/partitions/3");
    sim.remove_file(&dir.join("CURRENT")).unwrap();
    let segment = first_segment(&sim, &dir.join("wal-1"));
    let p = open(&sim, 3);
    match p.health().state() {
        State::Faulted(fault) => assert!(fault.message.contains("CURRENT"), "{fault:?}"),
        other => panic!("a partition whose CURRENT is lost must be faulted, not {other:?}"),
    }
    assert!(sim.contents(&segment).is_ok(), "the installed log must not be removed");
    assert!(p.recover().is_err(), "recover cannot guess the lost metadata");
    assert!(sim.contents(&segment).is_ok());
}

/// The operator's repair of lost metadata: installing an image replaces the
/// contents, in a log directory that collides with none left behind, and
/// the partition stays repaired across a restart.
#[test]
fn an_install_repairs_a_partition_whose_current_is_lost() {
    let sim = SimStorage::new(4);
    let p = open(&sim, 3);
    p.install(&image_of(3, 20, "old")[..]).unwrap();
    p.install(&image_of(3, 5, "older")[..]).unwrap();
    p.close();
    sim.remove_file(Path::new("/d0/partitions/3/CURRENT")).unwrap();
    let p = open(&sim, 3);
    assert_eq!(p.health().state().name(), "faulted");
    p.install(&image_of(3, 7, "new")[..]).expect("an install repairs lost metadata");
    assert_eq!(p.health().state(), State::Healthy);
    assert_eq!(p.stats().blobs, 7);
    p.close();
    let p = open(&sim, 3);
    assert_eq!(p.health().state(), State::Healthy, "repaired for good");
    assert_eq!(p.stats().blobs, 7);
    for k in 0..7 {
        assert_eq!(p.get(format!("k{k:03}").as_bytes(), None).unwrap().to_vec(), value(k, "new"));
    }
}

#[test]
fn a_write_whose_caller_gave_up_is_indexed_once_durable() {
    let rt = runtime();
    let sim = SimStorage::new(4);
    let p = open(&sim, 4);
    rt.block_on(p.put(b"k", b"old")).unwrap();
    sim.pause_on(IoOp::Sync, "/partitions/4/");
    let gave_up = rt.block_on(async { tokio::time::timeout(Duration::from_millis(100), p.put(b"k", b"new")).await });
    assert!(gave_up.is_err(), "the put is held in its sync");
    sim.resume(IoOp::Sync);
    wait_until("the abandoned put is served", || p.get(b"k", None).is_ok_and(|v| &v[..] == b"new"));
    p.close();
    let p = open(&sim, 4);
    assert_eq!(&p.get(b"k", None).unwrap()[..], b"new", "served the same after a restart");
}

#[test]
fn an_install_under_write_load_settles_every_write_and_faults_nothing() {
    let rt = runtime();
    let sim = SimStorage::new(5);
    let p = open(&sim, 5);
    let image = image_of(5, 30, "img");
    // Hold the old log's syncs so that puts are queued and in flight when
    // the install starts.
    sim.pause_on(IoOp::Sync, "/partitions/5/wal/");
    let writers: Vec<_> = (0..12u32)
        .map(|w| {
            let p = Arc::clone(&p);
            rt.spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0..5u32 {
                    let key = format!("k{:03}", w * 5 + i);
                    outcomes.push((key.clone(), p.put(key.as_bytes(), &value(w, "load")).await));
                }
                outcomes
            })
        })
        .collect();
    wait_until("puts are in flight", || sim.held() > 0);
    let installer = {
        let p = Arc::clone(&p);
        std::thread::spawn(move || p.install(&image[..]))
    };
    wait_until("the install fences writes", || p.health().state().name() == "read_only");
    // Not synchronisation: an install that does not wait for the writes
    // under way gets this long to swap the log under them, which is what
    // this test must catch. One that waits is blocked until the resume.
    std::thread::sleep(Duration::from_millis(300));
    sim.resume(IoOp::Sync);
    installer.join().unwrap().unwrap();
    for writer in writers {
        for (key, outcome) in rt.block_on(writer).unwrap() {
            match outcome {
                Ok(_) | Err(Error::ReadOnly { .. }) => {}
                Err(other) => panic!("{key}: a write under an install must settle cleanly, got {other:?}"),
            }
        }
    }
    assert_eq!(p.health().state(), State::Healthy);
    // Every key listed reads back, and a new put of any key takes effect.
    let (keys, _) = p.list(b"", None, 1000).unwrap();
    for key in &keys {
        p.get(key, None).unwrap_or_else(|e| panic!("{key:?} is listed but cannot be read: {e:?}"));
    }
    for k in 0..60u32 {
        let key = format!("k{k:03}");
        rt.block_on(p.put(key.as_bytes(), b"after")).unwrap();
        assert_eq!(&p.get(key.as_bytes(), None).unwrap()[..], b"after", "{key}: a later put was ignored");
    }
}

#[test]
fn an_image_of_another_partition_is_refused_and_changes_nothing() {
    let rt = runtime();
    let sim = SimStorage::new(6);
    let p = open(&sim, 6);
    rt.block_on(p.put(b"mine", b"stays")).unwrap();
    let error = p.install(&image_of(7, 5, "other")[..]).unwrap_err();
    assert!(matches!(error, Error::BadSnapshot(ref m) if m.contains("partition 7")), "{error:?}");
    assert_eq!(&p.get(b"mine", None).unwrap()[..], b"stays");
    assert!(matches!(p.get(b"k001", None), Err(Error::NotFound)));
    assert_eq!(p.health().state(), State::Healthy);
}

#[test]
fn a_lost_log_directory_faults_the_partition_and_is_not_recreated() {
    // On a real filesystem: the log directory of a partition that had data
    // is gone (moved away, a bad restore). It must not come back as a new,
    // empty, healthy log.
    let rt = runtime();
    let root = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(datanode_wal::storage::StdStorage);
    let disks = || vec![datanode_partition::DiskDir { name: "d0".into(), path: root.path().to_path_buf() }];
    let defaults = || datanode_partition::PartitionDefaults {
        wal: WalOptions { segment_size: 1 << 20, ..WalOptions::new(0) },
        ..Default::default()
    };
    let registry = datanode_partition::Registry::open(Arc::clone(&storage), disks(), defaults());
    let p = registry.create(3, "d0").unwrap();
    for k in 0..3u32 {
        rt.block_on(p.put(format!("k{k}").as_bytes(), &value(k, "acked"))).unwrap();
    }
    drop(p);
    registry.close();
    drop(registry);
    let wal = root.path().join("partitions/3/wal");
    std::fs::rename(&wal, root.path().join("moved-away")).unwrap();
    let registry = datanode_partition::Registry::open(Arc::clone(&storage), disks(), defaults());
    let p = registry.get(3).unwrap();
    match p.health().state() {
        State::Faulted(fault) => assert_eq!(fault.cause, FaultCause::Corruption, "{fault:?}"),
        other => panic!("a partition whose log is gone must be faulted, not {other:?}"),
    }
    assert!(!wal.exists(), "no empty log is made in its place");
    registry.close();
}
