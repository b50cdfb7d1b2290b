//! Crash edges of the log's multi-step operations: a truncation to an
//! empty log interrupted by a power cut keeps the numbering; a close with
//! a recycled spare leaves no file open; a directory change whose sync
//! failed (a marker's removal, a purge's rename) is made durable at the
//! next open before anything is acknowledged on top of it; a seal keeps
//! the numbering across reopens and cuts; large and small records mixed
//! survive a power cut anywhere.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use datanode_wal::storage::{Fault, SimStorage};
use datanode_wal::{Durability, IoOp, Storage, Wal, WalOptions};

fn names(storage: &dyn Storage, dir: &str) -> Vec<String> {
    let mut n = storage.list_dir(Path::new(dir)).unwrap_or_default();
    n.sort();
    n
}

/// truncate_after(first_lsn - 1) on a log whose first segment starts past
/// LSN 1 (after seal + purge), interrupted by a power cut anywhere before the
/// marker's removal is durable: recovery removes the target segment "wholly
/// after the truncation" and with it the numbering.
#[test]
fn an_interrupted_truncation_to_an_empty_log_keeps_the_numbering() {
    let mut failures = Vec::new();
    for step in 1..=30 {
        for seed in 0..4u64 {
            let (sim, storage) = sim(100 + seed);
            let opts = WalOptions { prewrite_segments: false, ..small_options(9) };
            let wal = open(&storage, Path::new("/log"), opts.clone());
            for seq in 0..20 {
                wal.append_blocking(vec![payload(9, seq, 300)]).unwrap();
            }
            let sealed = wal.seal_blocking().unwrap();
            assert_eq!(sealed, 20);
            wal.purge_before_blocking(sealed + 1).unwrap();
            assert_eq!((wal.first_lsn(), wal.last_lsn()), (21, 20));
            for seq in 20..25 {
                wal.append_blocking(vec![payload(9, seq, 300)]).unwrap();
            }
            sim.crash_before_op(step);
            wal.truncate_after_blocking(20).unwrap();
            assert_eq!(wal.last_lsn(), 20);
            let Some(image) = sim.take_crashed() else { continue };
            drop(wal);
            let image: Arc<dyn Storage> = Arc::new(image);
            let files = names(image.as_ref(), "/log");
            let wal = Wal::open(Arc::clone(&image), "/log", opts.clone()).unwrap();
            let last = wal.last_lsn();
            let next = wal.append_blocking(vec![payload(9, 999, 10)]).unwrap().first_lsn;
            if !(20..=25).contains(&last) || next != last + 1 {
                failures.push(format!("step {step} seed {seed}: files {files:?}: last_lsn {last}, next append {next}"));
            }
            wal.close().unwrap();
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// close() must leave no file open, also with a recycled spare.
#[test]
fn close_with_a_recycled_spare_leaves_no_file_open() {
    for (name, storage) in disk_backends() {
        for _round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let dir = dir.path().canonicalize().unwrap();
            let wal = open(&storage, &dir, WalOptions { recycled_segments: 1, ..small_options(5) });
            for seq in 0..40 {
                wal.append_blocking(vec![payload(0, seq, 300)]).unwrap();
            }
            wal.purge_before_blocking(wal.last_lsn()).unwrap();
            assert!(wal.stats().recycled_spares >= 1);
            wal.close().unwrap();
            let open: Vec<_> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter(|t| t.starts_with(&dir))
                .collect();
            assert!(open.is_empty(), "{name}: still open after close: {open:?}");
        }
    }
}

/// the marker's removal is not durable (its directory sync fails, or the
/// process dies before it), the log is reopened on the live filesystem,
/// appends are acknowledged, then the power is cut: the marker comes back
/// and recovery truncates the acknowledged records. Relative directory so
/// `create_dir_durably` has no parent to sync (the simulator's `sync_dir`
/// is global).
#[test]
fn a_truncation_marker_whose_removal_was_not_durable_never_takes_later_records() {
    let mut lost = Vec::new();
    for seed in 0..16u64 {
        let (sim, storage) = sim(300 + seed);
        let opts = WalOptions { prewrite_segments: false, ..small_options(3) };
        let wal = open(&storage, Path::new("log"), opts.clone());
        for seq in 0..10 {
            wal.append_blocking(vec![payload(3, seq, 100)]).unwrap();
        }
        // The 3rd directory sync of the truncation: marker, (no segment
        // removal: one segment), marker removal -> 2nd.
        sim.inject(Fault::new(IoOp::SyncDir, libc::EIO).after(1));
        let result = wal.truncate_after_blocking(5);
        assert!(result.is_err(), "the marker removal's sync failed: {result:?}");
        drop(wal);
        sim.clear_faults();
        let wal = open(&storage, Path::new("log"), opts.clone());
        assert_eq!(wal.last_lsn(), 5);
        let mut acked = BTreeMap::new();
        for seq in 100..105 {
            let a = wal.append_blocking(vec![payload(3, seq, 100)]).unwrap();
            acked.insert(a.first_lsn, payload(3, seq, 100));
        }
        drop(wal);
        let image: Arc<dyn Storage> = Arc::new(sim.crash_image());
        let files = names(image.as_ref(), "log");
        let wal = open(&image, Path::new("log"), opts.clone());
        for lsn in acked.keys() {
            if *lsn > wal.last_lsn() {
                lost.push(format!("seed {seed}: acked LSN {lsn} lost (last {}; files {files:?})", wal.last_lsn()));
                break;
            }
        }
    }
    assert!(lost.is_empty(), "{}", lost.join("\n"));
}

/// a purge's rename to a recycled name is not durable (its directory
/// sync fails), the log is reopened on the live filesystem and rolls into
/// the spare; a power cut between the spare's header sync and the rename's
/// directory sync leaves the old segment name over the new header.
#[test]
fn a_purge_rename_that_was_not_durable_is_no_corruption_after_a_roll_into_the_spare() {
    let mut bad = Vec::new();
    for step in 1..=8 {
        for seed in 0..6u64 {
            let (sim, storage) = sim(400 + seed);
            let opts = WalOptions { prewrite_segments: false, recycled_segments: 1, ..small_options(4) };
            let wal = open(&storage, Path::new("log"), opts.clone());
            while wal.stats().segments < 3 {
                wal.append_blocking(vec![payload(4, wal.last_lsn(), 400)]).unwrap();
            }
            sim.inject(Fault::new(IoOp::SyncDir, libc::EIO));
            let r = wal.purge_before_blocking(wal.last_lsn());
            assert!(r.is_err());
            drop(wal);
            sim.clear_faults();
            let wal = open(&storage, Path::new("log"), opts.clone());
            let mut acked = BTreeMap::new();
            sim.crash_before_op(step);
            let mut image = None;
            for size in [3900usize, 400] {
                let data = payload(4, 1000 + size as u64, size);
                let lsn = wal.append_blocking(vec![data.clone()]).unwrap().first_lsn;
                if let Some(i) = sim.take_crashed() {
                    image = Some(i);
                    break;
                }
                acked.insert(lsn, data);
            }
            let Some(image) = image else { continue };
            drop(wal);
            let image: Arc<dyn Storage> = Arc::new(image);
            let files = names(image.as_ref(), "log");
            match Wal::open(Arc::clone(&image), "log", opts.clone()) {
                Err(e) => bad.push(format!("step {step} seed {seed}: recovery failed: {e}; files {files:?}")),
                Ok(w) => {
                    for lsn in acked.keys() {
                        if *lsn > w.last_lsn() {
                            bad.push(format!("step {step} seed {seed}: acked {lsn} lost"));
                        }
                    }
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Seal semantics: empty log, twice, after purge-all, across reopen and
/// power cuts inside the seal's roll.
#[test]
fn a_seal_keeps_the_numbering_across_reopens_and_cuts() {
    for durability in [Durability::Sync, Durability::None] {
        let (_, storage) = sim(7);
        let opts = WalOptions { durability, first_lsn: 100, ..small_options(7) };
        let wal = open(&storage, Path::new("/log"), opts.clone());
        assert_eq!(wal.seal_blocking().unwrap(), 99, "empty log");
        assert_eq!(wal.seal_blocking().unwrap(), 99);
        wal.close().unwrap();
        let wal = open(&storage, Path::new("/log"), WalOptions { first_lsn: 1, ..opts.clone() });
        // No segment: first_lsn option decides.
        assert_eq!(wal.last_lsn(), 0);
        wal.close().unwrap();
    }
    for step in 1..=20 {
        for durability in [Durability::Sync, Durability::None] {
            let (sim, storage) = sim(8 + step);
            let opts = WalOptions { durability, recycled_segments: 1, ..small_options(8) };
            let wal = open(&storage, Path::new("/log"), opts.clone());
            for seq in 0..30 {
                wal.append_blocking(vec![payload(8, seq, 300)]).unwrap();
            }
            wal.seal_blocking().unwrap();
            wal.purge_before_blocking(31).unwrap();
            for seq in 30..33 {
                wal.append_blocking(vec![payload(8, seq, 300)]).unwrap();
            }
            sim.crash_before_op(step);
            let sealed = wal.seal_blocking().unwrap();
            let cut_in_seal = sim.take_crashed();
            assert_eq!(sealed, 33);
            assert_eq!(wal.durable_lsn(), 33);
            assert_eq!(wal.seal_blocking().unwrap(), 33);
            let purged = wal.purge_before_blocking(sealed + 1).unwrap();
            assert!(purged >= 1);
            assert_eq!((wal.first_lsn(), wal.last_lsn()), (34, 33));
            let in_seal = cut_in_seal.is_some();
            let image = cut_in_seal.or_else(|| sim.take_crashed()).unwrap_or_else(|| sim.crash_image());
            drop(wal);
            let image: Arc<dyn Storage> = Arc::new(image);
            let files = names(image.as_ref(), "/log");
            let wal = Wal::open(Arc::clone(&image), "/log", opts.clone())
                .unwrap_or_else(|e| panic!("step {step} {durability:?}: {e} {files:?}"));
            let last = wal.last_lsn();
            let ok = if in_seal && durability == Durability::None { (30..=33).contains(&last) } else { last == 33 };
            assert!(ok, "step {step} {durability:?} in_seal {in_seal}: last {last}, files {files:?}");
            assert_eq!(wal.append_blocking(vec![payload(8, 99, 10)]).unwrap().first_lsn, last + 1);
            wal.close().unwrap();
            let wal = open(&image, Path::new("/log"), opts.clone());
            assert_eq!(wal.last_lsn(), last + 1);
            wal.close().unwrap();
        }
    }
}

/// Large records (>= 64 KiB, no zeros ahead) mixed with small ones, power
/// cut at every op; checks acked records and no stale/foreign bytes.
#[test]
fn large_and_small_records_survive_a_power_cut_anywhere() {
    let mut problems = Vec::new();
    let sizes: [usize; 8] = [70_000, 300, 130_000, 200, 200, 90_000, 64, 100_000];
    for durability in [Durability::Sync, Durability::None] {
        for prewrite in [true, false] {
            for step in 1..=60 {
                let mut sim = SimStorage::new(step * 31 + prewrite as u64);
                let storage: Arc<dyn Storage> = Arc::new(sim.clone());
                let opts = WalOptions {
                    durability,
                    prewrite_segments: prewrite,
                    segment_size: 512 << 10,
                    recycled_segments: 1,
                    ..WalOptions::new(11)
                };
                let wal = open(&storage, Path::new("/log"), opts.clone());
                let mut acked = BTreeMap::new();
                let mut written = BTreeMap::new();
                sim.crash_before_op(step * 3);
                let mut image = None;
                for round in 0..3u64 {
                    for (i, size) in sizes.iter().enumerate() {
                        let data = payload(11, round * 100 + i as u64, *size);
                        let lsn = wal.last_lsn() + 1;
                        written.insert(lsn, data.clone());
                        wal.append_blocking(vec![data.clone()]).unwrap();
                        if image.is_none()
                            && let Some(i) = sim.take_crashed()
                        {
                            image = Some(i);
                        }
                        if image.is_none() && durability == Durability::Sync {
                            acked.insert(lsn, data);
                        }
                    }
                    if round == 1 {
                        wal.seal_blocking().unwrap();
                        wal.purge_before_blocking(wal.last_lsn() + 1).unwrap();
                        if image.is_none() {
                            acked.clear();
                        }
                    }
                }
                let image = image.unwrap_or_else(|| sim.crash_image());
                drop(wal);
                sim = image;
                let storage: Arc<dyn Storage> = Arc::new(sim.clone());
                let what = format!("{durability:?} prewrite {prewrite} step {step}");
                match Wal::open(Arc::clone(&storage), "/log", opts.clone()) {
                    Err(e) => problems.push(format!("{what}: recovery failed: {e}")),
                    Ok(wal) => {
                        for (lsn, data) in &acked {
                            match wal.read_from(*lsn, 0) {
                                Ok(r) if r[0].data == *data => {}
                                other => {
                                    problems.push(format!("{what}: acked {lsn} lost: {:?}", other.map(|r| r.len())));
                                    break;
                                }
                            }
                        }
                        if wal.last_lsn() >= wal.first_lsn() {
                            for r in wal.read_from(wal.first_lsn(), usize::MAX).unwrap() {
                                if written.get(&r.lsn) != Some(&r.data) {
                                    problems.push(format!("{what}: LSN {} holds bytes never written", r.lsn));
                                }
                            }
                        }
                        let next = wal.append_blocking(vec![Bytes::from(vec![7u8; 80_000])]).unwrap().first_lsn;
                        wal.append_blocking(vec![Bytes::from_static(b"x")]).unwrap();
                        wal.close().unwrap();
                        let again = Wal::open(Arc::clone(&storage), "/log", opts.clone());
                        match again {
                            Ok(w) if w.last_lsn() == next + 1 => {}
                            Ok(w) => problems.push(format!("{what}: reopen last {} != {}", w.last_lsn(), next + 1)),
                            Err(e) => problems.push(format!("{what}: second reopen failed: {e}")),
                        }
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
