//! Model-based test: random sequences of put / delete / get / list,
//! compaction, crashes with reopen, injected write and sync errors (EIO,
//! ENOSPC) and recover,
//! checked against a `BTreeMap` model on the simulated disk.
//!
//! The model accepts `read_only` and `faulted` answers, but never a wrong
//! value, a lost acknowledged write, or a key that was never written. A
//! write whose outcome is unknown (or that failed on a full disk after
//! reaching the page cache) may surface later, or not.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use datanode_partition::{Error, Partition, PartitionOptions, ReadOnlyReason, State};
use datanode_wal::storage::{Fault, SimStorage};
use datanode_wal::{IoOp, Storage, WalOptions};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u16, u8),
    Delete(u8),
    Get(u8),
    List,
    Crash,
    FailWrite(bool),
    FailSync,
    Heal,
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..8, 0u16..400, any::<u8>()).prop_map(|(k, len, b)| Op::Put(k, len, b)),
        2 => (0u8..8).prop_map(Op::Delete),
        4 => (0u8..8).prop_map(Op::Get),
        1 => Just(Op::List),
        1 => Just(Op::Crash),
        1 => any::<bool>().prop_map(Op::FailWrite),
        1 => Just(Op::FailSync),
        2 => Just(Op::Heal),
        1 => Just(Op::Compact),
    ]
}

/// What a key may hold: the acknowledged value plus values of writes whose
/// outcome is unknown (`None` = absent).
#[derive(Debug, Clone)]
struct Possible(Vec<Option<Vec<u8>>>);

impl Default for Possible {
    /// A key never written is absent.
    fn default() -> Possible {
        Possible::acked(None)
    }
}

impl Possible {
    fn acked(value: Option<Vec<u8>>) -> Possible {
        Possible(vec![value])
    }
    fn allows(&self, value: &Option<Vec<u8>>) -> bool {
        self.0.contains(value)
    }
}

fn key(k: u8) -> Vec<u8> {
    format!("key-{k}").into_bytes()
}

fn options() -> PartitionOptions {
    PartitionOptions {
        wal: WalOptions { segment_size: 4096, ..WalOptions::new(1) },
        read_error_tolerance: 3,
        ..PartitionOptions::new(1, "d0", PathBuf::from("/d0/partitions/1"))
    }
}

fn open(sim: &SimStorage) -> Arc<Partition> {
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    Arc::new(Partition::open(storage, options()))
}

/// Brings the partition back to serving writes, as an operator would.
fn heal(sim: &SimStorage, partition: &Partition) {
    sim.clear_faults();
    if let State::Faulted(_) = partition.health().state() {
        partition.recover().unwrap_or_else(|e| panic!("recover after injected I/O errors failed: {e}"));
    }
    if partition.health().has_reason(ReadOnlyReason::DiskFull) {
        assert!(partition.retry_after_disk_full(), "disk_full did not clear once space was back");
    }
}

fn check_all(partition: &Partition, model: &mut BTreeMap<u8, Possible>) {
    for k in 0u8..8 {
        let seen = match partition.get(&key(k), None) {
            Ok(bytes) => Some(bytes.to_vec()),
            Err(Error::NotFound) => None,
            Err(error) => panic!("key {k}: unexpected {error:?}"),
        };
        let possible = model.entry(k).or_default();
        assert!(possible.allows(&seen), "key {k}: read {seen:?}, model allows {possible:?}");
        *possible = Possible::acked(seen);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_partition_never_loses_or_invents_data(seed in any::<u64>(), ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut sim = SimStorage::new(seed);
        let mut partition = open(&sim);
        let mut model: BTreeMap<u8, Possible> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Put(k, len, byte) => {
                    let value = vec![byte; len as usize];
                    let was_writable = partition.health().state() == State::Healthy;
                    match rt.block_on(partition.put(&key(k), &value)) {
                        Ok(_) => { model.insert(k, Possible::acked(Some(value))); }
                        Err(Error::WriteOutcomeUnknown(_)) => model.entry(k).or_default().0.push(Some(value)),
                        // A full disk can stop a write after it reached the page cache.
                        Err(Error::ReadOnly { .. }) if was_writable => model.entry(k).or_default().0.push(Some(value)),
                        Err(Error::ReadOnly { .. } | Error::Faulted { .. }) => {}
                        Err(other) => panic!("put: unexpected {other:?}"),
                    }
                }
                Op::Delete(k) => {
                    let was_writable = partition.health().state() == State::Healthy;
                    match rt.block_on(partition.delete(&key(k))) {
                        Ok(_) => { model.insert(k, Possible::acked(None)); }
                        Err(Error::NotFound) => {
                            let possible = model.entry(k).or_default();
                            prop_assert!(possible.allows(&None), "delete said absent, model {possible:?}");
                            *possible = Possible::acked(None);
                        }
                        Err(Error::WriteOutcomeUnknown(_)) => model.entry(k).or_default().0.push(None),
                        Err(Error::ReadOnly { .. }) if was_writable => model.entry(k).or_default().0.push(None),
                        Err(Error::ReadOnly { .. } | Error::Faulted { .. }) => {}
                        Err(other) => panic!("delete: unexpected {other:?}"),
                    }
                }
                Op::Get(k) => match partition.get(&key(k), None) {
                    Ok(bytes) => {
                        let possible = model.entry(k).or_default();
                        prop_assert!(possible.allows(&Some(bytes.to_vec())), "get {k}: wrong bytes, model {possible:?}");
                    }
                    Err(Error::NotFound) => {
                        let possible = model.entry(k).or_default();
                        prop_assert!(possible.allows(&None), "get {k}: missing, model {possible:?}");
                    }
                    Err(Error::Faulted { .. }) => {}
                    Err(other) => panic!("get: unexpected {other:?}"),
                },
                Op::List => {
                    if let Ok((keys, _)) = partition.list(b"key-", None, 100) {
                        for listed in keys {
                            let k: u8 = std::str::from_utf8(&listed[4..]).unwrap().parse().unwrap();
                            let possible = model.entry(k).or_default();
                            prop_assert!(possible.0.iter().any(Option::is_some), "listed {k}, model {possible:?}");
                        }
                    }
                }
                Op::Crash => {
                    let image = sim.crash_image();
                    drop(partition);
                    sim = image;
                    partition = open(&sim);
                    heal(&sim, &partition);
                    prop_assert_eq!(partition.health().state(), State::Healthy);
                    check_all(&partition, &mut model);
                }
                Op::FailWrite(disk_full) => {
                    let errno = if disk_full { libc::ENOSPC } else { libc::EIO };
                    sim.inject(Fault::new(IoOp::Write, errno).on_path("/wal/").short_write());
                }
                Op::FailSync => sim.inject(Fault::new(IoOp::Sync, libc::EIO).on_path("/wal/")),
                Op::Compact => match partition.compact() {
                    // Compaction changes no content: check it.
                    Ok(_) => check_all(&partition, &mut model),
                    Err(Error::ReadOnly { .. } | Error::Faulted { .. }) => {}
                    // An injected fault may hit the compacted store's writes.
                    Err(Error::CompactionFailed(_)) => {}
                    Err(other) => panic!("compact: unexpected {other:?}"),
                },
                Op::Heal => {
                    heal(&sim, &partition);
                    prop_assert_eq!(partition.health().state(), State::Healthy);
                    check_all(&partition, &mut model);
                }
            }
        }
        heal(&sim, &partition);
        check_all(&partition, &mut model);
    }
}
