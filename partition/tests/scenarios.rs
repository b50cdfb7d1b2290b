//! Scenario tests named after the bugs this product is built to be immune
//! to: each test's comment names the bug (S0, S4) and the system it hit.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use datanode_partition::{DiskDir, PartitionDefaults, Registry, RegistryError};
use datanode_wal::storage::{SimRng, SimStorage};
use datanode_wal::{Storage, WalOptions};

fn disks() -> Vec<DiskDir> {
    ["d0", "d1"]
        .iter()
        .map(|name| DiskDir { name: name.to_string(), path: PathBuf::from(format!("/{name}")) })
        .collect()
}

fn defaults() -> PartitionDefaults {
    PartitionDefaults {
        wal: WalOptions { segment_size: 8192, prewrite_segments: false, ..WalOptions::new(0) },
        ..PartitionDefaults::default()
    }
}

fn quarantined(storage: &dyn Storage) -> Vec<String> {
    ["/d0/quarantine", "/d1/quarantine"].iter().flat_map(|dir| storage.list_dir(Path::new(dir)).unwrap()).collect()
}

/// S4 (Longhorn): a verify loop deleted a replica that was still being
/// created. Here thousands of creates, puts, reads and deletes interleave
/// with a verifier that runs the whole time; no created partition or its
/// data may ever disappear, and nothing of ours may be quarantined.
#[test]
fn s4_create_delete_churn_vs_verifier() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(4);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let registry = Arc::new(Registry::open(Arc::clone(&storage), disks(), defaults()));
    let stop = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU64::new(0));
    let verifier = {
        let (registry, stop, passes) = (Arc::clone(&registry), Arc::clone(&stop), Arc::clone(&passes));
        std::thread::spawn(move || {
            let mut moved = Vec::new();
            while !stop.load(Ordering::Acquire) {
                moved.extend(registry.verify_once().quarantined);
                passes.fetch_add(1, Ordering::AcqRel);
            }
            moved
        })
    };

    let mut rng = SimRng::new(44);
    let mut expected: BTreeMap<u64, Bytes> = BTreeMap::new();
    for step in 0..3000u64 {
        let id = rng.below(24);
        match rng.below(3) {
            0 => {
                let disk = ["d0", "d1"][rng.below(2) as usize];
                match registry.create(id, disk) {
                    Ok(partition) => {
                        assert!(!expected.contains_key(&id), "step {step}: created {id} twice");
                        let value = Bytes::from(format!("partition {id} step {step}"));
                        rt.block_on(partition.put(b"blob", &value)).unwrap();
                        expected.insert(id, value);
                    }
                    Err(RegistryError::Exists(_)) => assert!(expected.contains_key(&id), "step {step}"),
                    Err(other) => panic!("step {step}: create {id}: {other}"),
                }
            }
            1 => match registry.delete(id) {
                Ok(()) => assert!(expected.remove(&id).is_some(), "step {step}: deleted unknown {id}"),
                Err(RegistryError::NotFound(_)) => assert!(!expected.contains_key(&id), "step {step}"),
                Err(other) => panic!("step {step}: delete {id}: {other}"),
            },
            _ => {}
        }
        // Every partition we created is still there, with its data.
        for (id, value) in &expected {
            let partition = registry.get(*id).unwrap_or_else(|| panic!("step {step}: partition {id} vanished"));
            assert_eq!(&partition.get(b"blob", None).unwrap(), value, "step {step}: partition {id} lost its data");
        }
    }
    stop.store(true, Ordering::Release);
    let moved = verifier.join().unwrap();
    assert!(passes.load(Ordering::Acquire) > 100, "the verifier must really have raced the churn");
    assert!(moved.is_empty(), "the verifier quarantined live partitions: {moved:?}");
    assert!(quarantined(storage.as_ref()).is_empty());

    // After a restart, exactly the expected partitions come back.
    registry.close();
    drop(registry);
    let registry = Registry::open(Arc::clone(&storage), disks(), defaults());
    let ids: Vec<u64> = registry.partitions().iter().map(|p| p.id()).collect();
    assert_eq!(ids, expected.keys().copied().collect::<Vec<_>>());
    for (id, value) in &expected {
        assert_eq!(&registry.get(*id).unwrap().get(b"blob", None).unwrap(), value);
    }
}

#[test]
fn the_verifier_never_moves_a_valid_partition_and_quarantines_the_rest() {
    let sim = SimStorage::new(5);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let registry = Registry::open(Arc::clone(&storage), disks(), defaults());
    registry.create(1, "d0").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // A valid partition that the node did not find at start (moved in by an
    // operator), a stray directory, and a directory whose PARTITION file
    // names another id.
    let moved_in = filled(&sim, 9, "moved", &rt);
    moved_in.close();
    drop(moved_in);
    for (path, bytes) in [
        ("/d0/partitions/9/PARTITION", &b"id=9\n"[..]),
        ("/d0/partitions/lost+found/x", b"junk"),
        ("/d1/partitions/12/PARTITION", b"id=13\n"),
    ] {
        storage.open(Path::new(path), true).unwrap().write_all_at(0, &[Bytes::from_static(bytes)]).unwrap();
    }
    let report = registry.verify_once();
    assert_eq!(report.unadopted, vec![PathBuf::from("/d0/partitions/9")], "{report:?}");
    assert_eq!(report.quarantined.len(), 2, "{report:?}");
    let mut kept = quarantined(storage.as_ref());
    kept.sort();
    assert!(kept[0].starts_with("12.") && kept[1].starts_with("lost+found."), "{kept:?}");
    assert!(registry.get(1).is_some());
    let again = registry.verify_once();
    assert!(again.quarantined.is_empty() && again.unadopted.len() == 1, "{again:?}");
    // Adopted, with its data, at the next start.
    registry.close();
    drop(registry);
    let registry = Registry::open(Arc::clone(&storage), disks(), defaults());
    let adopted = registry.get(9).expect("the moved-in partition is served after a restart");
    assert_eq!(&adopted.get(b"k3", None).unwrap()[..], "moved-3".repeat(40).as_bytes());
    assert!(registry.verify_once().unadopted.is_empty());
}

fn image_of(partition: &datanode_partition::Partition) -> Vec<u8> {
    partition.export().unwrap().map(|piece| piece.unwrap()).flat_map(|b| b.to_vec()).collect()
}

fn filled(sim: &SimStorage, id: u64, tag: &str, rt: &tokio::runtime::Runtime) -> Arc<datanode_partition::Partition> {
    let partition = open_partition(sim, id);
    for i in 0..10 {
        rt.block_on(partition.put(format!("k{i}").as_bytes(), format!("{tag}-{i}").repeat(40).as_bytes())).unwrap();
    }
    partition
}

/// S0 (CubeFS): reads during a Raft snapshot apply hit half-replaced state
/// and crashed. Here readers run while images are installed again and
/// again: every read returns the old or the new value, never an error or
/// a mix; damaged images are refused and change nothing.
#[test]
fn s0_snapshot_install_under_reads() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(6);
    let target = filled(&sim, 1, "old", &rt);
    let image_old = image_of(&target);
    // An image of the same partition, from another copy of it.
    let image_new = image_of(&filled(&SimStorage::new(77), 1, "new", &rt));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (target, stop) = (Arc::clone(&target), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let i = (reads + r) % 10;
                    let value = target.get(format!("k{i}").as_bytes(), None).unwrap();
                    let text = String::from_utf8(value.to_vec()).unwrap();
                    assert!(
                        text == format!("old-{i}").repeat(40) || text == format!("new-{i}").repeat(40),
                        "read a mix or garbage for k{i}: {text:?}"
                    );
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut damaged = image_new.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    for round in 0..20 {
        let image = if round % 2 == 0 { &image_new } else { &image_old };
        target.install(&image[..]).unwrap();
        assert!(matches!(target.install(&damaged[..]), Err(datanode_partition::Error::BadSnapshot(_))));
        assert!(matches!(target.install(&image[..image.len() - 3]), Err(datanode_partition::Error::BadSnapshot(_))));
        assert_eq!(target.health().state(), datanode_partition::State::Healthy);
    }
    stop.store(true, Ordering::Release);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 100, "readers must really have raced the installs ({reads} reads)");
    // The last install was the old image; it is what a restart finds too.
    assert_eq!(&target.get(b"k3", None).unwrap()[..], "old-3".repeat(40).as_bytes());
    target.close();
    let reopened = open_partition(&sim, 1);
    assert_eq!(&reopened.get(b"k3", None).unwrap()[..], "old-3".repeat(40).as_bytes());
    assert_eq!(reopened.stats().blobs, 10);
}

fn open_partition(sim: &SimStorage, id: u64) -> Arc<datanode_partition::Partition> {
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let dir = PathBuf::from(format!("/d0/partitions/{id}"));
    let options = datanode_partition::PartitionOptions {
        wal: defaults().wal,
        ..datanode_partition::PartitionOptions::new(id, "d0", dir)
    };
    Arc::new(datanode_partition::Partition::open(storage, options))
}

#[test]
fn installing_an_image_repairs_a_faulted_partition() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(7);
    // An image of the same partition, from a healthy copy elsewhere.
    let healthy_copy = image_of(&filled(&SimStorage::new(8), 4, "good", &rt));
    let broken = filled(&sim, 4, "bad", &rt);
    sim.inject(datanode_wal::storage::Fault::new(datanode_wal::IoOp::Sync, libc::EIO).on_path("/partitions/4/"));
    assert!(rt.block_on(broken.put(b"x", b"y")).is_err());
    assert_eq!(broken.health().state().name(), "faulted");
    broken.install(&healthy_copy[..]).unwrap();
    assert_eq!(broken.health().state(), datanode_partition::State::Healthy);
    assert_eq!(&broken.get(b"k5", None).unwrap()[..], "good-5".repeat(40).as_bytes());
    broken.close();
    let reopened = open_partition(&sim, 4);
    assert_eq!(reopened.health().state(), datanode_partition::State::Healthy, "the fault record is gone");
    assert_eq!(&reopened.get(b"k5", None).unwrap()[..], "good-5".repeat(40).as_bytes());
}
