//! Compaction on the simulated disk: space comes back, data stays, and
//! puts and gets keep working while it runs.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datanode_partition::{Partition, PartitionOptions};
use datanode_wal::storage::SimStorage;
use datanode_wal::{Storage, WalOptions};

fn open(sim: &SimStorage) -> Arc<Partition> {
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let options = PartitionOptions {
        wal: WalOptions { segment_size: 16 << 10, prewrite_segments: false, ..WalOptions::new(1) },
        ..PartitionOptions::new(1, "d0", PathBuf::from("/d0/partitions/1"))
    };
    Arc::new(Partition::open(storage, options))
}

fn value(key: u32, version: u32) -> Vec<u8> {
    format!("key {key} version {version};").repeat(30).into_bytes()
}

#[test]
fn compaction_reclaims_overwritten_space_and_keeps_every_live_value() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(1);
    let partition = open(&sim);
    let mut latest = BTreeMap::new();
    for round in 0..3u32 {
        for version in 0..20u32 {
            for key in 0..10u32 {
                let v = round * 100 + version;
                rt.block_on(partition.put(&key.to_le_bytes(), &value(key, v))).unwrap();
                latest.insert(key, v);
            }
        }
        rt.block_on(partition.delete(&9u32.to_le_bytes())).unwrap();
        latest.remove(&9);
        let report = partition.compact().unwrap();
        assert!(report.bytes_after * 3 < report.bytes_before, "round {round}: {report:?}");
        assert_eq!(report.blobs, 9);
        for (key, v) in &latest {
            assert_eq!(partition.get(&key.to_le_bytes(), None).unwrap(), value(*key, *v), "round {round}");
        }
        assert!(partition.get(&9u32.to_le_bytes(), None).is_err());
        rt.block_on(partition.put(&9u32.to_le_bytes(), &value(9, 999))).unwrap();
        latest.insert(9, 999);
    }
    partition.close();
    let reopened = open(&sim);
    assert_eq!(reopened.stats().blobs, 10);
    for (key, v) in &latest {
        assert_eq!(reopened.get(&key.to_le_bytes(), None).unwrap(), value(*key, *v));
    }
    let dirs = sim.clone();
    let names = Storage::list_dir(&dirs, std::path::Path::new("/d0/partitions/1")).unwrap();
    assert_eq!(names.iter().filter(|n| n.starts_with("compacted-")).count(), 1, "{names:?}");
}

/// Compaction gives back everything it covers, also what sits in the
/// segment the log was writing: the log is sealed at the cut, so no
/// covered record is kept for being in the active segment.
#[test]
fn compaction_leaves_no_covered_record_in_the_log() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(7);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    // Segments larger than everything written: all of it is in the active one.
    let options = PartitionOptions {
        wal: WalOptions { segment_size: 64 << 20, prewrite_segments: false, ..WalOptions::new(1) },
        ..PartitionOptions::new(1, "d0", PathBuf::from("/d0/partitions/1"))
    };
    let partition = Arc::new(Partition::open(storage, options));
    for version in 0..200u32 {
        rt.block_on(partition.put(b"k", &value(0, version))).unwrap();
    }
    let before = partition.garbage_bytes();
    assert!(before > 100_000, "{before}");
    partition.compact().unwrap();
    let after = partition.garbage_bytes();
    assert!(after <= 4096, "nothing covered stays in the log, only a new segment's header: {after} (was {before})");
    assert_eq!(partition.get(b"k", None).unwrap(), value(0, 199));
    // The log goes on in a new segment.
    rt.block_on(partition.put(b"k", &value(0, 200))).unwrap();
    partition.close();
    let partition = open(&sim);
    assert_eq!(partition.get(b"k", None).unwrap(), value(0, 200));
}

#[test]
fn compaction_under_concurrent_puts_and_gets_loses_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let sim = SimStorage::new(2);
    let partition = Arc::new(open(&sim));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let (partition, stop) = (Arc::clone(&partition), Arc::clone(&stop));
            rt.spawn(async move {
                let mut acked = BTreeMap::new();
                let mut version = 0u32;
                while !stop.load(Ordering::Acquire) {
                    let key = w * 100 + version % 7;
                    partition.put(&key.to_le_bytes(), &value(key, version)).await.unwrap();
                    acked.insert(key, version);
                    version += 1;
                    tokio::task::yield_now().await;
                }
                acked
            })
        })
        .collect();
    let reader = {
        let (partition, stop) = (Arc::clone(&partition), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Acquire) {
                for key in [0u32, 3, 100, 104] {
                    if let Ok(bytes) = partition.get(&key.to_le_bytes(), None) {
                        assert!(bytes.starts_with(format!("key {key} version ").as_bytes()), "garbage for {key}");
                        reads += 1;
                    }
                }
            }
            reads
        })
    };
    // Compact again and again until the writers have clearly written
    // between and during compactions.
    let mut compactions = 0;
    while compactions < 15 || partition.stats().last_lsn < 400 {
        partition.compact().unwrap();
        compactions += 1;
        assert!(compactions < 100_000, "the writers made no progress");
    }
    stop.store(true, Ordering::Release);
    let mut acked = BTreeMap::new();
    for writer in writers {
        acked.extend(rt.block_on(writer).unwrap());
    }
    assert!(reader.join().unwrap() > 0);
    assert!(acked.len() >= 2, "the writers must have run");
    for (key, version) in &acked {
        assert_eq!(partition.get(&key.to_le_bytes(), None).unwrap(), value(*key, *version), "key {key}");
    }
    partition.close();
    let reopened = open(&sim);
    for (key, version) in &acked {
        assert_eq!(reopened.get(&key.to_le_bytes(), None).unwrap(), value(*key, *version), "after reopen, key {key}");
    }
}

#[test]
fn garbage_is_counted_and_compaction_under_a_budget_gives_it_back() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sim = SimStorage::new(3);
    let partition = open(&sim);
    for key in 0..20u32 {
        rt.block_on(partition.put(&key.to_le_bytes(), &value(key, 0))).unwrap();
    }
    let fresh = partition.garbage_bytes();
    for version in 1..6u32 {
        for key in 0..20u32 {
            rt.block_on(partition.put(&key.to_le_bytes(), &value(key, version))).unwrap();
        }
    }
    for key in 0..10u32 {
        rt.block_on(partition.delete(&key.to_le_bytes())).unwrap();
    }
    let garbage = partition.garbage_bytes();
    assert!(
        garbage > fresh + 100 * value(0, 0).len() as u64,
        "overwrites and deletes are garbage: {fresh} -> {garbage}"
    );
    // Under a copy budget (how much it slows the copy is for benchmarks).
    let report = partition.compact_limited(Some(10_000)).unwrap();
    assert!(report.copied_bytes > 0 && report.reclaimed_bytes() > 0, "{report:?}");
    assert!(partition.garbage_bytes() < garbage / 2, "{} after, {garbage} before", partition.garbage_bytes());
    for key in 10..20u32 {
        assert_eq!(&partition.get(&key.to_le_bytes(), None).unwrap()[..], &value(key, 5)[..]);
    }
}
