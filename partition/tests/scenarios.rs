//! Scenario tests named after the bugs this product is built to be immune
//! to (DESIGN section 1).
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
fn the_verifier_quarantines_what_it_does_not_know_and_deletes_nothing() {
    let sim = SimStorage::new(5);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let registry = Registry::open(Arc::clone(&storage), disks(), defaults());
    registry.create(1, "d0").unwrap();
    // A stray directory, and a partition directory no registry knows.
    for (path, bytes) in [("/d0/partitions/lost+found/x", &b"junk"[..]), ("/d1/partitions/9/PARTITION", b"id=9\n")] {
        storage.open(Path::new(path), true).unwrap().write_all_at(0, &[Bytes::from_static(bytes)]).unwrap();
    }
    let report = registry.verify_once();
    assert_eq!(report.quarantined.len(), 2, "{report:?}");
    let mut kept = quarantined(storage.as_ref());
    kept.sort();
    assert!(kept[0].starts_with("9.") && kept[1].starts_with("lost+found."), "{kept:?}");
    assert_eq!(
        sim.contents(&report.quarantined.iter().find(|p| p.starts_with("/d1")).unwrap().join("PARTITION")).unwrap(),
        b"id=9\n"
    );
    assert!(registry.get(1).is_some());
    assert!(registry.verify_once().quarantined.is_empty(), "a second pass finds nothing new");
}
