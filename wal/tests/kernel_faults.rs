//! The WAL on real kernels and real filesystems, failing for real:
//! an XFS filesystem shut down under it, a power cut (shutdown without log
//! flush, then remount and journal replay), and a full tmpfs.
//!
//! Needs root, mkfs.xfs and xfs_io; prints SKIPPED otherwise (CI sets
//! `DATANODE_REQUIRE_KERNEL_TESTS=1`, which turns a skip into a failure).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::kernel::{Fs, LoopDisk, SmallTmpfs, unavailable};
use common::*;
use datanode_wal::{Error, Wal, WalOptions};

fn options() -> WalOptions {
    WalOptions { segment_size: 1 << 20, ..WalOptions::new(42) }
}

#[test]
fn xfs_shutdown_poisons_the_wal_and_acknowledged_records_survive() {
    if unavailable(&["mkfs.xfs", "xfs_io", "mount"]).is_some() {
        return;
    }
    for (name, storage) in disk_backends() {
        let mut disk = LoopDisk::new(Fs::Xfs);
        let dir = disk.path().join("wal");
        let wal = open(&storage, &dir, options());
        let written: Vec<Bytes> = (0..300).map(|i| payload(1, i, 4096)).collect();
        for data in &written {
            wal.append_blocking(vec![data.clone()]).unwrap();
        }
        disk.shutdown(true);
        let error = wal.append_blocking(vec![payload(1, 999, 4096)]).unwrap_err();
        assert!(matches!(error, Error::Io { .. }), "{name}: {error:?}");
        assert!(error.outcome_unknown(), "{name}: a failed write or sync leaves the outcome unknown");
        assert_eq!(error.errno(), Some(libc::EIO), "{name}: {error:?}");
        for _ in 0..3 {
            let later = wal.append_blocking(vec![payload(1, 1000, 10)]).unwrap_err();
            assert!(matches!(later, Error::Poisoned { .. }), "{name}: {later:?}");
            assert_eq!(later.errno(), Some(libc::EIO), "{name}");
        }
        assert_eq!(wal.durable_lsn(), 300, "{name}");
        assert!(wal.close().is_err(), "{name}");

        disk.unmount();
        disk.mount();
        let wal = open(&storage, &dir, options());
        assert_eq!(read_all(&wal), written, "{name}: every acknowledged record survives");
        assert_eq!(wal.append_blocking(vec![payload(1, 2000, 10)]).unwrap().first_lsn, 301, "{name}");
        wal.close().unwrap();
    }
}

#[test]
fn power_cuts_keep_every_acknowledged_record() {
    if unavailable(&["mkfs.xfs", "xfs_io", "mount"]).is_some() {
        return;
    }
    for (name, storage) in disk_backends() {
        let mut disk = LoopDisk::new(Fs::Xfs);
        let dir = disk.path().join("wal");
        let mut acked: BTreeMap<u64, Bytes> = BTreeMap::new();
        for cycle in 0..4u64 {
            let wal = Arc::new(open(&storage, &dir, options()));
            let recovered = read_all(&wal);
            let first = wal.first_lsn();
            for (lsn, data) in &acked {
                assert_eq!(recovered.get((lsn - first) as usize), Some(data), "{name} cycle {cycle}: LSN {lsn} lost");
            }
            let submitted = Arc::new(Mutex::new(HashSet::new()));
            let newly_acked = Arc::new(Mutex::new(BTreeMap::new()));
            let writers: Vec<_> = (0..4u64)
                .map(|w| {
                    let (wal, submitted, newly_acked) =
                        (Arc::clone(&wal), Arc::clone(&submitted), Arc::clone(&newly_acked));
                    std::thread::spawn(move || {
                        for seq in 0.. {
                            let data = payload(cycle * 10 + w, seq, 1000 + (seq as usize * 131) % 3000);
                            submitted.lock().unwrap().insert(data.clone());
                            match wal.append_blocking(vec![data.clone()]) {
                                Ok(appended) => {
                                    newly_acked.lock().unwrap().insert(appended.first_lsn, data);
                                }
                                Err(_) => return,
                            }
                        }
                    })
                })
                .collect();
            wait_until("some appends are acknowledged", || newly_acked.lock().unwrap().len() >= 200);
            disk.shutdown(false);
            for writer in writers {
                writer.join().unwrap();
            }
            acked.extend(newly_acked.lock().unwrap().clone());
            drop(Arc::try_unwrap(wal).map(Wal::close));
            disk.unmount();
            disk.mount();

            let wal = open(&storage, &dir, options());
            let first = wal.first_lsn();
            let records = read_all(&wal);
            for (lsn, data) in &acked {
                assert_eq!(records.get((lsn - first) as usize), Some(data), "{name} cycle {cycle}: LSN {lsn} lost");
            }
            let submitted = submitted.lock().unwrap();
            let acked_values: HashSet<&Bytes> = acked.values().collect();
            for record in &records {
                assert!(
                    submitted.contains(record) || acked_values.contains(record),
                    "{name} cycle {cycle}: recovered bytes nobody wrote"
                );
            }
            // Records recovered beyond the acknowledged ones were written but
            // never acknowledged; they are part of the log from now on.
            for (i, record) in records.iter().enumerate() {
                acked.entry(first + i as u64).or_insert_with(|| record.clone());
            }
            wal.close().unwrap();
        }
    }
}

#[test]
fn full_tmpfs_is_disk_full_and_the_torn_tail_is_truncated() {
    if unavailable(&["mount"]).is_some() {
        return;
    }
    for (name, storage) in disk_backends() {
        let fs = SmallTmpfs::new(1 << 20);
        let filler = fs.path().join("filler");
        std::fs::write(&filler, vec![1u8; 256 << 10]).unwrap();
        let dir = fs.path().join("wal");
        let wal_options = WalOptions { segment_size: 192 << 10, ..WalOptions::new(7) };
        let wal = open(&storage, &dir, wal_options.clone());
        let mut acked = Vec::new();
        let error = loop {
            let data = payload(7, acked.len() as u64, 5000);
            match wal.append_blocking(vec![data.clone()]) {
                Ok(appended) => acked.push((appended.positions[0], data)),
                Err(error) => break error,
            }
            assert!(acked.len() < 1000, "{name}: a 1 MiB tmpfs never filled up");
        };
        assert!(error.is_disk_full(), "{name}: {error:?}");
        assert_eq!(error.errno(), Some(libc::ENOSPC), "{name}");
        let later = wal.append_blocking(vec![payload(7, 9999, 10)]).unwrap_err();
        assert!(matches!(later, Error::Poisoned { .. }) && later.is_disk_full(), "{name}: {later:?}");
        // Close (joins the writer and the pre-writer) before reopening.
        assert!(wal.close().is_err());

        // Reopen while still full: the acknowledged records are all there
        // and the partial record after them is zeroed, not kept.
        let wal = open(&storage, &dir, wal_options.clone());
        let expected: Vec<Bytes> = acked.iter().map(|(_, data)| data.clone()).collect();
        assert_eq!(read_all(&wal), expected, "{name}");
        let (last_pos, _) = acked.last().unwrap();
        let segment = dir.join(format!("{:020}.wal", last_pos.segment_id));
        let bytes = std::fs::read(&segment).unwrap();
        let end = (last_pos.offset as usize + datanode_wal::format::frame_len(last_pos.len as usize)).min(bytes.len());
        assert!(bytes[end..].iter().all(|b| *b == 0), "{name}: torn bytes left after the last record");
        wal.close().unwrap();

        // Space comes back: the log takes appends again.
        std::fs::remove_file(&filler).unwrap();
        let wal = open(&storage, &dir, wal_options);
        let next = wal.append_blocking(vec![Bytes::from_static(b"space is back")]).unwrap();
        assert_eq!(next.first_lsn, acked.len() as u64 + 1, "{name}");
        wal.close().unwrap();
    }
}
