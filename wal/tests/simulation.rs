//! Seeded crash and fault simulation on the simulated disk.
//!
//! Each scenario opens a log with random segment size and durability,
//! optionally injects random I/O errors, runs concurrent appenders, takes a
//! crash image at a random moment, recovers it and checks:
//! - every append acknowledged before the crash is recovered, byte for byte
//!   (in `sync` mode; in the other modes, everything up to the durable LSN
//!   seen before the crash);
//! - nothing that was never submitted appears, LSNs are dense from the first;
//! - once an append failed on a write or sync, no later append succeeds and
//!   nothing past the last good sync was acknowledged;
//! - the recovered log accepts appends again.
//!
//! `WAL_SIM_SCENARIOS` (default 10000) sets the count, `WAL_SIM_SEED` the
//! first seed; a failure names its seed, and the same seed replays the same
//! faults and crash choices (thread interleavings may differ).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::payload;
use datanode_wal::storage::{Fault, SimRng, SimStorage};
use datanode_wal::{Durability, Error, IoOp, Storage, Wal, WalOptions};

#[derive(Default)]
struct Outcome {
    /// LSN -> payload of every acknowledged record.
    acked: BTreeMap<u64, Bytes>,
    /// Every record any append attempted.
    submitted: HashSet<Bytes>,
    /// An append failed with an I/O error on write or sync.
    failed: bool,
}

fn run_scenario(seed: u64) {
    let mut rng = SimRng::new(seed ^ 0x5eed);
    let sim = SimStorage::new(seed);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let durability = match rng.below(10) {
        0 => Durability::None,
        1 => Durability::Interval(Duration::from_micros(200)),
        _ => Durability::Sync,
    };
    let options = WalOptions {
        segment_size: 4096 << rng.below(3),
        durability,
        max_batch_bytes: 256 << rng.below(6),
        prewrite_segments: rng.below(2) == 0,
        ..WalOptions::new(seed)
    };
    match rng.below(4) {
        0 => sim.inject_random(
            0.01 + rng.below(5) as f64 / 100.0,
            &[IoOp::Write, IoOp::Sync, IoOp::SyncDir, IoOp::Open],
            &[libc::EIO, libc::ENOSPC, libc::EROFS],
        ),
        1 => {
            let op = [IoOp::Write, IoOp::Sync][rng.below(2) as usize];
            let mut fault = Fault::new(op, libc::EIO).after(rng.below(40));
            if rng.below(2) == 0 {
                fault = fault.short_write();
            }
            sim.inject(fault);
        }
        _ => {}
    }
    let dir = Path::new("/wal");
    let wal = match Wal::open(Arc::clone(&storage), dir, options.clone()) {
        Ok(wal) => Arc::new(wal),
        Err(error) => {
            // Opening an empty directory touches the disk only to sync its
            // parent; an injected error there is fine, anything else is not.
            assert!(error.errno().is_some(), "seed {seed}: open failed oddly: {error}");
            return;
        }
    };

    let writers = 1 + rng.below(4);
    let appends_per_writer = 1 + rng.below(12);
    let crash_after = rng.below(writers * appends_per_writer + 1) as usize;
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let completed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..writers)
        .map(|writer| {
            let (wal, outcome, completed, stop) =
                (Arc::clone(&wal), Arc::clone(&outcome), Arc::clone(&completed), Arc::clone(&stop));
            let sizes: Vec<usize> = (0..appends_per_writer * 3).map(|_| rng.below(700) as usize).collect();
            std::thread::spawn(move || {
                let mut failed = false;
                for seq in 0..appends_per_writer {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let records = (0..1 + (sizes[seq as usize] % 3))
                        .map(|i| payload(writer, seq * 3 + i as u64, sizes[(seq * 3 + i as u64) as usize]))
                        .collect::<Vec<_>>();
                    outcome.lock().unwrap().submitted.extend(records.iter().cloned());
                    let result = wal.append_blocking(records.clone());
                    completed.fetch_add(1, Ordering::AcqRel);
                    match result {
                        Ok(appended) => {
                            assert!(!failed, "seed {seed}: an append succeeded after one failed");
                            let mut outcome = outcome.lock().unwrap();
                            for (pos, data) in appended.positions.iter().zip(records) {
                                outcome.acked.insert(pos.lsn, data);
                            }
                        }
                        Err(error @ (Error::Io { .. } | Error::Poisoned { .. })) => {
                            failed = true;
                            outcome.lock().unwrap().failed = true;
                            assert!(error.errno().is_some(), "seed {seed}: {error}");
                        }
                        Err(Error::Closed) => break,
                        Err(other) => panic!("seed {seed}: unexpected error {other:?}"),
                    }
                }
            })
        })
        .collect();

    while completed.load(Ordering::Acquire) < crash_after {
        std::thread::yield_now();
    }
    // What was acknowledged before the image is taken must be in it.
    let (acked_before, durable_before) = {
        let outcome = outcome.lock().unwrap();
        (outcome.acked.clone(), wal.durable_lsn())
    };
    let image = sim.crash_image();
    stop.store(true, Ordering::Release);
    for thread in threads {
        thread.join().unwrap();
    }
    let outcome = outcome.lock().unwrap();
    if outcome.failed && durability == Durability::Sync {
        let last_acked = outcome.acked.keys().next_back().copied().unwrap_or(0);
        assert!(
            last_acked <= wal.durable_lsn(),
            "seed {seed}: acked LSN {last_acked} beyond the last good sync {}",
            wal.durable_lsn()
        );
    }
    let submitted = outcome.submitted.clone();
    drop(outcome);
    let _ = Arc::try_unwrap(wal).map(Wal::close);

    let image_storage: Arc<dyn Storage> = Arc::new(image);
    let recovered = Wal::open(Arc::clone(&image_storage), dir, options.clone())
        .unwrap_or_else(|error| panic!("seed {seed}: recovery of a crash image failed: {error}"));
    let records = if recovered.last_lsn() >= recovered.first_lsn() {
        recovered.read_from(recovered.first_lsn(), usize::MAX).unwrap()
    } else {
        Vec::new()
    };
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.lsn, recovered.first_lsn() + i as u64, "seed {seed}: LSNs not dense");
        assert!(submitted.contains(&record.data), "seed {seed}: LSN {} holds bytes nobody wrote", record.lsn);
        if let Some(acked) = acked_before.get(&record.lsn) {
            assert_eq!(&record.data, acked, "seed {seed}: LSN {} changed", record.lsn);
        }
    }
    let must_survive = |lsn: u64| durability == Durability::Sync || lsn <= durable_before;
    for (lsn, data) in acked_before.iter().filter(|(lsn, _)| must_survive(**lsn)) {
        let found = records.iter().find(|r| r.lsn == *lsn);
        assert_eq!(found.map(|r| &r.data), Some(data), "seed {seed}: acknowledged LSN {lsn} lost");
    }
    let next = recovered.append_blocking(vec![Bytes::from_static(b"w-after-crash")]).unwrap();
    assert_eq!(next.first_lsn, recovered.last_lsn(), "seed {seed}");
    assert_eq!(next.first_lsn, records.last().map_or(recovered.first_lsn(), |r| r.lsn + 1), "seed {seed}");
    recovered.close().unwrap();
}

fn scenarios(shard: u64, shards: u64) {
    let count: u64 = std::env::var("WAL_SIM_SCENARIOS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let first: u64 = std::env::var("WAL_SIM_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for seed in (first..first + count).filter(|s| s % shards == shard) {
        run_scenario(seed);
    }
}

// Four shards so the harness runs them on all cores.
#[test]
fn crash_and_fault_scenarios_shard_0() {
    scenarios(0, 4);
}
#[test]
fn crash_and_fault_scenarios_shard_1() {
    scenarios(1, 4);
}
#[test]
fn crash_and_fault_scenarios_shard_2() {
    scenarios(2, 4);
}
#[test]
fn crash_and_fault_scenarios_shard_3() {
    scenarios(3, 4);
}
