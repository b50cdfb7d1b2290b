//! The WAL's API on every backend: appends, reads, group commit, rollover,
//! truncation, purge, reopen, and the failure contract on the simulator.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use datanode_wal::storage::Fault;
use datanode_wal::{Corruption, Durability, Error, IoOp, Storage, Wal, WalOptions};

#[test]
fn appended_records_read_back_after_reopen_on_every_backend() {
    for (name, storage) in disk_backends() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(&storage, dir.path(), small_options(9));
        let mut expected = Vec::new();
        let mut positions = Vec::new();
        for seq in 0..200 {
            let data = payload(0, seq, (seq as usize * 37) % 700);
            let appended = wal.append_blocking(vec![data.clone()]).unwrap();
            assert_eq!(appended.first_lsn, seq + 1, "{name}");
            assert_eq!(wal.durable_lsn(), seq + 1, "{name}: sync mode acks only durable records");
            positions.push(appended.positions[0]);
            expected.push(data);
        }
        assert!(wal.stats().segments > 10, "{name}: small segments must roll over");
        for (pos, data) in positions.iter().zip(&expected) {
            assert_eq!(&wal.read(*pos).unwrap(), data, "{name}");
        }
        wal.close().unwrap();

        let wal = open(&storage, dir.path(), small_options(9));
        assert_eq!((wal.first_lsn(), wal.last_lsn(), wal.durable_lsn()), (1, 200, 200), "{name}");
        assert_eq!(read_all(&wal), expected, "{name}");
        for (pos, data) in positions.iter().zip(&expected) {
            assert_eq!(&wal.read(*pos).unwrap(), data, "{name}");
        }
        let next = wal.append_blocking(vec![Bytes::from_static(b"after reopen")]).unwrap();
        assert_eq!(next.first_lsn, 201, "{name}");
        wal.close().unwrap();
    }
}

/// Files of `dir` this process holds open.
fn open_files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.starts_with(dir))
        .collect()
}

/// Once `close` returns, none of the log's files is open: the disk can be
/// unmounted at once (a disk is replaced, a partition's directory
/// removed). The writer's engine job may still be dropped later; it must
/// hold no file by then.
#[test]
fn close_leaves_no_file_of_the_log_open() {
    for (name, storage) in disk_backends() {
        for round in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let dir = dir.path().canonicalize().unwrap();
            let wal = open(&storage, &dir, small_options(5));
            for seq in 0..20 {
                wal.append_blocking(vec![payload(0, seq, 300)]).unwrap();
            }
            wal.close().unwrap();
            let open = open_files_under(&dir);
            assert!(open.is_empty(), "{name} round {round}: still open after close: {open:?}");
        }
    }
}

/// A sealed log rolls at once: every segment up to the returned LSN can be
/// purged whole, and the numbering goes on, also after a reopen.
#[test]
fn seal_lets_purge_remove_every_record_up_to_it_and_the_numbering_goes_on() {
    let (_, storage) = sim(3);
    let dir = Path::new("/log");
    let wal = open(&storage, dir, WalOptions { segment_size: 1 << 20, ..small_options(3) });
    for seq in 0..50 {
        wal.append_blocking(vec![payload(0, seq, 200)]).unwrap();
    }
    assert_eq!(wal.stats().segments, 1, "everything is in the active segment");
    let sealed = wal.seal_blocking().unwrap();
    assert_eq!((sealed, wal.durable_lsn()), (50, 50));
    wal.purge_before_blocking(sealed + 1).unwrap();
    assert!(wal.read_from(50, 1 << 20).is_err(), "every record up to the seal is gone");
    assert_eq!(wal.seal_blocking().unwrap(), 50, "sealing an empty segment changes nothing");
    wal.close().unwrap();
    let wal = open(&storage, dir, WalOptions { segment_size: 1 << 20, ..small_options(3) });
    assert_eq!(wal.last_lsn(), 50);
    assert_eq!(wal.append_blocking(vec![payload(0, 50, 200)]).unwrap().first_lsn, 51);
    wal.close().unwrap();
}

#[test]
fn a_batch_gets_consecutive_lsns_and_read_from_respects_max_bytes() {
    let (_, storage) = sim(1);
    let wal = open(&storage, Path::new("/log"), small_options(1));
    let batch: Vec<Bytes> = (0..10).map(|i| payload(1, i, 100)).collect();
    let appended = wal.append_blocking(batch.clone()).unwrap();
    assert_eq!((appended.first_lsn, appended.last_lsn), (1, 10));
    assert_eq!(appended.positions.iter().map(|p| p.lsn).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    let some = wal.read_from(3, 250).unwrap();
    assert_eq!(some.iter().map(|r| r.lsn).collect::<Vec<_>>(), vec![3, 4, 5]);
    assert_eq!(some[0].data, batch[2]);
    let one = wal.read_from(10, 0).unwrap();
    assert_eq!(one.len(), 1, "at least one record is returned");
    assert!(matches!(wal.read_from(11, 10), Err(Error::LsnOutOfRange { lsn: 11, .. })));
    assert!(matches!(wal.append_blocking(vec![]), Err(Error::Invalid(_))));
}

/// A log given a `first_lsn` numbers its first record from it, keeps that
/// numbering across a reopen and a power cut, and ignores the option once
/// it holds records.
#[test]
fn a_new_log_starts_at_its_first_lsn_and_keeps_it() {
    let (sim, storage) = sim(4);
    let options = |first_lsn| WalOptions { first_lsn, ..small_options(4) };
    let wal = open(&storage, Path::new("/log"), options(42));
    assert_eq!((wal.first_lsn(), wal.last_lsn(), wal.durable_lsn()), (42, 41, 41));
    for batch in 0..6 {
        let appended = wal.append_blocking((batch * 5..batch * 5 + 5).map(|i| payload(4, i, 200)).collect()).unwrap();
        assert_eq!((appended.first_lsn, appended.last_lsn), (42 + batch * 5, 46 + batch * 5));
    }
    assert!(wal.stats().segments > 1, "the records span segments");
    drop(wal);

    let storage: Arc<dyn Storage> = Arc::new(sim.crash_image());
    let wal = open(&storage, Path::new("/log"), options(7));
    assert_eq!((wal.first_lsn(), wal.last_lsn()), (42, 71), "the records decide, not the option");
    assert_eq!(wal.read_from(42, 0).unwrap()[0].data, payload(4, 0, 200));
    wal.truncate_after_blocking(41).unwrap();
    assert_eq!((wal.first_lsn(), wal.last_lsn()), (42, 41), "truncated to empty");
    assert_eq!(wal.append_blocking(vec![payload(4, 99, 10)]).unwrap().first_lsn, 42);
    wal.close().unwrap();

    let empty = open(&storage, Path::new("/other"), options(0));
    assert_eq!(empty.append_blocking(vec![payload(4, 0, 10)]).unwrap().first_lsn, 1, "0 is taken as 1");
}

#[test]
fn concurrent_appenders_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let storage = disk_backends().remove(0).1;
    let wal = Arc::new(open(&storage, dir.path(), WalOptions::new(3)));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                for seq in 0..50 {
                    wal.append_blocking(vec![payload(w, seq, 256)]).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let stats = wal.stats();
    assert_eq!(stats.appends, 800);
    assert!(stats.syncs < stats.appends, "group commit must batch: {stats:?}");
    assert_eq!(read_all(&wal).len(), 800);
}

#[test]
fn async_appends_from_a_runtime_never_block_it() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let (_, storage) = sim(2);
    let wal = Arc::new(open(&storage, Path::new("/log"), small_options(2)));
    // One runtime thread drives 64 concurrent appends: only possible if
    // `append` yields while its batch is written.
    let lsns = runtime.block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let wal = Arc::clone(&wal);
                async move { wal.append(vec![payload(i, 0, 64)]).await.unwrap().first_lsn }
            })
            .collect();
        let mut lsns = Vec::new();
        for task in tasks {
            lsns.push(task.await);
        }
        lsns
    });
    let mut sorted = lsns.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=64).collect::<Vec<_>>());
}

#[test]
fn truncate_after_drops_the_tail_durably_and_appends_continue() {
    for (name, storage) in disk_backends() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(&storage, dir.path(), small_options(4));
        let written: Vec<Bytes> = (0..120).map(|i| payload(4, i, 90)).collect();
        for data in &written {
            wal.append_blocking(vec![data.clone()]).unwrap();
        }
        let segments_before = wal.stats().segments;
        wal.truncate_after_blocking(30).unwrap();
        assert_eq!(wal.last_lsn(), 30, "{name}");
        assert!(wal.stats().segments < segments_before, "{name}");
        assert!(matches!(wal.truncate_after_blocking(31), Err(Error::LsnOutOfRange { .. })), "{name}");
        let replacement = wal.append_blocking(vec![Bytes::from_static(b"new 31")]).unwrap();
        assert_eq!(replacement.first_lsn, 31, "{name}");
        wal.close().unwrap();

        let wal = open(&storage, dir.path(), small_options(4));
        let mut expected = written[..30].to_vec();
        expected.push(Bytes::from_static(b"new 31"));
        assert_eq!(read_all(&wal), expected, "{name}");
        wal.truncate_after_blocking(0).unwrap();
        assert_eq!(wal.last_lsn(), 0, "{name}");
        assert!(read_all(&wal).is_empty(), "{name}");
        wal.close().unwrap();
        let wal = open(&storage, dir.path(), small_options(4));
        assert!(read_all(&wal).is_empty(), "{name}");
        assert_eq!(wal.append_blocking(vec![Bytes::from_static(b"x")]).unwrap().first_lsn, 1);
    }
}

#[test]
fn purge_before_removes_only_whole_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let storage = disk_backends().remove(0).1;
    let wal = open(&storage, dir.path(), small_options(5));
    for i in 0..200 {
        wal.append_blocking(vec![payload(5, i, 100)]).unwrap();
    }
    let before = wal.stats().segments;
    let removed = wal.purge_before_blocking(100).unwrap();
    assert!(removed > 0);
    assert_eq!(wal.stats().segments, before - removed as u64);
    let first = wal.first_lsn();
    assert!(first > 1 && first <= 100, "first {first}");
    assert_eq!(wal.read_from(100, 100).unwrap()[0].data, payload(5, 99, 100));
    // Purging everything keeps the active segment and the newest record.
    wal.purge_before_blocking(10_000).unwrap();
    assert_eq!(wal.read_from(200, 1).unwrap()[0].data, payload(5, 199, 100));
    wal.close().unwrap();
    let wal = open(&storage, dir.path(), small_options(5));
    assert_eq!(wal.last_lsn(), 200);
    assert_eq!(wal.read_from(200, 1).unwrap()[0].data, payload(5, 199, 100));
}

#[test]
fn write_error_poisons_and_is_never_retried() {
    let (sim, storage) = sim(6);
    let wal = open(&storage, Path::new("/log"), writer_only_options(6));
    wal.append_blocking(vec![payload(6, 0, 10)]).unwrap();
    sim.inject(Fault::new(IoOp::Write, libc::EIO).on_path(".wal").short_write());
    let error = wal.append_blocking(vec![payload(6, 1, 10)]).unwrap_err();
    assert!(matches!(error, Error::Io { op: IoOp::Write, .. }), "{error:?}");
    assert!(error.outcome_unknown());
    assert_eq!(error.errno(), Some(libc::EIO));
    sim.clear_faults();
    for _ in 0..3 {
        let later = wal.append_blocking(vec![payload(6, 2, 10)]).unwrap_err();
        assert!(matches!(later, Error::Poisoned { op: IoOp::Write, .. }), "{later:?}");
        assert_eq!(later.errno(), Some(libc::EIO));
        assert!(!later.outcome_unknown());
    }
    assert!(wal.sync_blocking().is_err());
    assert!(wal.close().is_err());
    // Reopening recovers from disk: the acknowledged record, nothing else.
    let wal = open(&storage, Path::new("/log"), writer_only_options(6));
    assert_eq!(read_all(&wal), vec![payload(6, 0, 10)]);
}

#[test]
fn sync_error_poisons_with_its_errno_and_fails_everything_queued() {
    let (sim, storage) = sim(7);
    let wal = Arc::new(open(&storage, Path::new("/log"), writer_only_options(7)));
    wal.append_blocking(vec![payload(7, 0, 10)]).unwrap();
    sim.pause(IoOp::Sync);
    sim.inject(Fault::new(IoOp::Sync, libc::EIO));
    let appenders: Vec<_> = (0..8)
        .map(|i| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || wal.append_blocking(vec![payload(7, i + 1, 10)]))
        })
        .collect();
    wait_until("a batch is syncing", || sim.held() == 1);
    wait_until("the rest queue up behind it", || wal.queued_bytes() == 80);
    sim.resume(IoOp::Sync);
    let results: Vec<_> = appenders.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(results.iter().all(Result::is_err), "nothing after a failed sync is acknowledged");
    assert!(results.iter().any(|r| matches!(r, Err(Error::Io { op: IoOp::Sync, .. }))));
    assert!(results.iter().all(|r| r.as_ref().unwrap_err().errno() == Some(libc::EIO)));
    assert_eq!(wal.durable_lsn(), 1);
}

#[test]
fn reopen_zeroes_a_torn_tail_and_stays_usable() {
    let (sim, storage) = sim(8);
    let dir = Path::new("/log");
    let wal = open(&storage, dir, small_options(8));
    wal.append_blocking(vec![payload(8, 0, 100)]).unwrap();
    wal.append_blocking(vec![payload(8, 1, 100)]).unwrap();
    wal.close().unwrap();
    // Tear the second record: keep its header, garble its payload end.
    let seg = dir.join("00000000000000000001.wal");
    let second_payload_end = 64 + 152 + 48 + 99;
    sim.tamper(&seg, second_payload_end, &[0xff]).unwrap();
    let wal = open(&storage, dir, small_options(8));
    assert_eq!(read_all(&wal), vec![payload(8, 0, 100)]);
    let contents = sim.contents(&seg).unwrap();
    assert!(contents[64 + 152..].iter().all(|b| *b == 0), "torn bytes must be zeroed");
    assert_eq!(wal.append_blocking(vec![payload(8, 2, 5)]).unwrap().first_lsn, 2);
}

#[test]
fn damage_before_a_durable_record_is_corruption_and_nothing_is_changed() {
    let (sim, storage) = sim(9);
    let dir = Path::new("/log");
    let wal = open(&storage, dir, small_options(9));
    for i in 0..3 {
        wal.append_blocking(vec![payload(9, i, 100)]).unwrap();
    }
    wal.close().unwrap();
    let seg = dir.join("00000000000000000001.wal");
    sim.tamper(&seg, 64 + 152 + 60, b"rot").unwrap();
    let before = sim.contents(&seg).unwrap();
    let error = Wal::open(Arc::clone(&storage), dir, small_options(9)).unwrap_err();
    assert!(
        matches!(error, Error::Corruption { segment_id: 1, offset: 216, detail: Corruption::BadRecord(_) }),
        "{error:?}"
    );
    assert_eq!(sim.contents(&seg).unwrap(), before, "corruption must never be truncated");
}

#[test]
fn a_record_of_another_log_is_refused() {
    let (sim, storage) = sim(10);
    let dir = Path::new("/log");
    let wal = open(&storage, dir, small_options(10));
    let pos = wal.append_blocking(vec![payload(10, 0, 40)]).unwrap().positions[0];
    wal.append_blocking(vec![payload(10, 1, 40)]).unwrap();
    wal.close().unwrap();
    // Write log 11's version of the same record over log 10's first record.
    let (other_sim, other_storage) = common::sim(11);
    let other = open(&other_storage, dir, small_options(11));
    other.append_blocking(vec![payload(10, 0, 40)]).unwrap();
    other.close().unwrap();
    let seg = dir.join("00000000000000000001.wal");
    let foreign = other_sim.contents(&seg).unwrap();
    sim.tamper(&seg, pos.offset as usize, &foreign[pos.offset as usize..pos.offset as usize + 88]).unwrap();
    let error = Wal::open(Arc::clone(&storage), dir, small_options(10)).unwrap_err();
    assert!(matches!(error, Error::Corruption { detail: Corruption::BadRecord(_), .. }), "{error:?}");
}

#[test]
fn a_read_never_returns_bytes_that_fail_their_checksum() {
    let (sim, storage) = sim(12);
    let dir = Path::new("/log");
    let wal = open(&storage, dir, small_options(12));
    let pos = wal.append_blocking(vec![payload(12, 0, 100)]).unwrap().positions[0];
    sim.tamper(&dir.join("00000000000000000001.wal"), pos.offset as usize + 70, b"X").unwrap();
    assert!(matches!(wal.read(pos), Err(Error::Corruption { .. })));
    sim.inject(Fault::new(IoOp::Read, libc::EIO));
    let error = wal.read(pos).unwrap_err();
    assert!(matches!(error, Error::Io { op: IoOp::Read, .. }) && error.errno() == Some(libc::EIO));
}

#[test]
fn a_missing_middle_segment_is_corruption() {
    let (_, storage) = sim(13);
    let dir = Path::new("/log");
    let wal = open(&storage, dir, small_options(13));
    for i in 0..100 {
        wal.append_blocking(vec![payload(13, i, 100)]).unwrap();
    }
    wal.close().unwrap();
    storage.remove_file(&dir.join("00000000000000000002.wal")).unwrap();
    let error = Wal::open(Arc::clone(&storage), dir, small_options(13)).unwrap_err();
    assert!(matches!(error, Error::Corruption { segment_id: 2, detail: Corruption::MissingSegment, .. }));
}

#[test]
fn interval_durability_syncs_on_its_own() {
    let (_, storage) = sim(14);
    let options =
        WalOptions { durability: Durability::Interval(std::time::Duration::from_millis(5)), ..small_options(14) };
    let wal = open(&storage, Path::new("/log"), options);
    wal.append_blocking(vec![payload(14, 0, 10)]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.durable_lsn() < 1 {
        assert!(std::time::Instant::now() < deadline, "interval sync never happened");
        std::thread::yield_now();
    }
}

#[test]
fn backpressure_bounds_queued_bytes() {
    let (sim, storage) = sim(15);
    let options = WalOptions { max_queued_bytes: 1000, ..writer_only_options(15) };
    let wal = Arc::new(open(&storage, Path::new("/log"), options));
    wal.append_blocking(vec![Bytes::from(vec![1u8; 1000])]).unwrap();
    let too_large = wal.append_blocking(vec![Bytes::from(vec![1u8; 1001])]).unwrap_err();
    assert!(matches!(too_large, Error::RecordTooLarge { len: 1001, max: 1000 }));

    sim.pause(IoOp::Sync);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let appenders: Vec<_> = (0..5)
        .map(|i| {
            let (wal, done) = (Arc::clone(&wal), Arc::clone(&done));
            std::thread::spawn(move || {
                wal.append_blocking(vec![payload(15, i, 400)]).unwrap();
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    // One batch is stuck in its sync, one more fits in the queue, and the
    // other three wait for space instead of piling up in memory.
    wait_until("two appends hold the queue", || wal.queued_bytes() == 800 && sim.held() == 1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(wal.queued_bytes(), 800);
    assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 0);
    sim.resume(IoOp::Sync);
    for a in appenders {
        a.join().unwrap();
    }
    assert_eq!(wal.last_lsn(), 6);
    assert_eq!(wal.queued_bytes(), 0);
}

#[test]
fn an_unused_segment_past_a_gap_is_a_leftover_not_corruption() {
    // A roll that failed after the next segment was already pre-written
    // leaves exactly this: the log, a missing id, then a zeroed segment.
    let (sim, storage) = sim(16);
    let dir = Path::new("/log");
    let wal = open(&storage, dir, writer_only_options(16));
    wal.append_blocking(vec![payload(16, 0, 10)]).unwrap();
    wal.close().unwrap();
    let leftover = dir.join("00000000000000000003.wal");
    storage.open(&leftover, true).unwrap().write_all_at(0, &[Bytes::from(vec![0u8; 4096])]).unwrap();
    let wal = open(&storage, dir, writer_only_options(16));
    assert_eq!(read_all(&wal), vec![payload(16, 0, 10)]);
    assert!(sim.contents(&leftover).is_err(), "the leftover is removed");
    assert_eq!(wal.append_blocking(vec![payload(16, 1, 10)]).unwrap().first_lsn, 2);
}

#[test]
fn after_a_failed_sync_recovery_shows_only_what_is_on_disk() {
    // fsyncgate: the failed record stays readable in the page cache, but it
    // may never reach the disk. Reopening must not present it as durable.
    for seed in 0..64 {
        let (sim, storage) = sim(1000 + seed);
        let dir = Path::new("/log");
        let wal = open(&storage, dir, writer_only_options(17));
        wal.append_blocking(vec![payload(17, 0, 700)]).unwrap();
        sim.inject(Fault::new(IoOp::Sync, libc::EIO));
        wal.append_blocking(vec![payload(17, 1, 3000)]).unwrap_err();
        drop(wal);
        let reopened = open(&storage, dir, writer_only_options(17));
        let shown = read_all(&reopened);
        reopened.close().unwrap();
        let after_power_cut: Arc<dyn datanode_wal::Storage> = Arc::new(sim.crash_image());
        let on_disk = read_all(&open(&after_power_cut, dir, writer_only_options(17)));
        assert_eq!(shown, on_disk, "seed {seed}: recovery showed bytes that are not on disk");
        assert_eq!(shown[0], payload(17, 0, 700), "seed {seed}");
    }
}

/// `read_cached` never waits for the disk: on std it returns records whose
/// pages are cached, verified like `read`, and `None` once the pages are
/// dropped; backends that cannot tell (the simulator) always say `None`.
#[test]
fn read_cached_serves_only_what_the_page_cache_holds() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn datanode_wal::Storage> = Arc::new(datanode_wal::storage::StdStorage);
    let options = WalOptions { segment_size: 1 << 20, ..WalOptions::new(1) };
    let wal = Wal::open(Arc::clone(&storage), dir.path(), options.clone()).unwrap();
    let appended = wal.append_blocking(vec![Bytes::from(vec![7u8; 10_000])]).unwrap();
    let pos = appended.positions[0];
    assert_eq!(wal.read_cached(pos).unwrap(), Some(wal.read(pos).unwrap()));
    wal.close().unwrap();
    // Synced and dropped from the cache: reading it would wait for the disk.
    let wal = Wal::open(Arc::clone(&storage), dir.path(), options.clone()).unwrap();
    let segment = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).min().unwrap();
    let file = storage.open(&segment, false).unwrap();
    file.drop_cache().unwrap();
    assert_eq!(wal.read_cached(pos).unwrap(), None);
    assert_eq!(wal.read(pos).unwrap().len(), 10_000, "the blocking read still works");

    let (_sim, sim_storage) = sim(3);
    let wal = Wal::open(sim_storage, Path::new("/w"), WalOptions::new(1)).unwrap();
    let pos = wal.append_blocking(vec![Bytes::from_static(b"x")]).unwrap().positions[0];
    assert_eq!(wal.read_cached(pos).unwrap(), None);
}

/// Holds one append in its sync so that eight more queue up and go out
/// together in one write, which `fault` then fails; returns their results.
fn fail_a_batch_of_eight(seed: u64, fault: Fault) -> (datanode_wal::storage::SimStorage, Vec<Result<(), Error>>) {
    let (sim, storage) = sim(seed);
    let wal = Arc::new(open(&storage, Path::new("/log"), writer_only_options(seed)));
    wal.append_blocking(vec![payload(seed, 0, 10)]).unwrap();
    sim.pause(IoOp::Sync);
    let first = {
        let wal = Arc::clone(&wal);
        std::thread::spawn(move || wal.append_blocking(vec![payload(seed, 1, 10)]))
    };
    wait_until("the first append is syncing", || sim.held() == 1);
    let batch: Vec<_> = (0..8)
        .map(|i| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || wal.append_blocking(vec![payload(seed, i + 2, 10)]))
        })
        .collect();
    wait_until("eight appends queue up", || wal.queued_bytes() == 90);
    sim.inject(fault);
    sim.resume(IoOp::Sync);
    first.join().unwrap().unwrap();
    let results = batch.into_iter().map(|t| t.join().unwrap().map(|_| ())).collect();
    let later = wal.append_blocking(vec![payload(seed, 99, 10)]).unwrap_err();
    assert!(matches!(later, Error::Poisoned { .. }) && !later.outcome_unknown(), "{later:?}");
    (sim, results)
}

#[test]
fn every_request_of_a_failed_batch_learns_its_outcome_is_unknown() {
    let (_, results) = fail_a_batch_of_eight(21, Fault::new(IoOp::Write, libc::EIO).on_path(".wal").short_write());
    for result in results {
        let error = result.unwrap_err();
        assert!(
            error.outcome_unknown() && error.errno() == Some(libc::EIO),
            "a request written in the failing batch must learn its outcome is unknown, not {error:?}"
        );
    }
}

#[test]
fn a_batch_that_failed_for_lack_of_space_is_durably_discarded() {
    // A file-size limit cuts the write short: part of the batch is in the
    // file. It is zeroed and synced, so the batch is truthfully "not
    // written", now and after any crash.
    let (sim, results) = fail_a_batch_of_eight(25, Fault::new(IoOp::Write, libc::EFBIG).on_path(".wal").short_write());
    for result in results {
        let error = result.unwrap_err();
        assert!(
            matches!(error, Error::Poisoned { .. }) && error.is_disk_full() && !error.outcome_unknown(),
            "a discarded batch is not attempted, not {error:?}"
        );
    }
    for _ in 0..8 {
        let image: Arc<dyn datanode_wal::Storage> = Arc::new(sim.crash_image());
        let reopened = open(&image, Path::new("/log"), writer_only_options(25));
        assert_eq!(read_all(&reopened), vec![payload(25, 0, 10), payload(25, 1, 10)]);
    }
}

#[test]
fn then_runs_for_every_settled_append_even_when_the_caller_gave_up() {
    let (sim, storage) = sim(22);
    let wal = Arc::new(open(&storage, Path::new("/log"), writer_only_options(22)));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    sim.pause(IoOp::Sync);
    let (settled_tx, settled) = std::sync::mpsc::channel();
    let append = wal.append_then(vec![payload(22, 0, 10)], move |result| {
        settled_tx.send(result.as_ref().map(|a| a.first_lsn).map_err(|e| e.to_string())).unwrap();
    });
    let gave_up = runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_millis(50), append).await });
    assert!(gave_up.is_err(), "the append is held in its sync");
    assert!(settled.try_recv().is_err(), "nothing is settled before the sync");
    sim.resume(IoOp::Sync);
    let lsn = settled.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(lsn, Ok(1), "the abandoned append was still written, and `then` saw it");

    // A refused append runs `then` too, with the refusal.
    sim.inject(Fault::new(IoOp::Write, libc::EIO).on_path(".wal"));
    assert!(wal.append_blocking(vec![payload(22, 1, 10)]).is_err());
    let (refused_tx, refused) = std::sync::mpsc::channel();
    let result = runtime.block_on(wal.append_then(vec![payload(22, 2, 10)], move |result| {
        refused_tx.send(result.is_err()).unwrap();
    }));
    assert!(matches!(result, Err(Error::Poisoned { .. })), "{result:?}");
    assert_eq!(refused.try_recv(), Ok(true));
}

#[test]
fn damage_below_a_known_durable_lsn_is_corruption_not_a_torn_tail() {
    // A log written in bulk and synced once at close carries no proof in
    // its records that they were synced; the caller that synced it knows.
    let bulk = |log_id| WalOptions { durability: Durability::None, ..writer_only_options(log_id) };
    for (seed, damage) in [(23u64, "flip"), (24, "zeros")] {
        let (sim, storage) = sim(seed);
        let dir = Path::new("/log");
        let wal = open(&storage, dir, WalOptions { segment_size: 1 << 20, ..bulk(seed) });
        for i in 0..50 {
            wal.append_blocking(vec![payload(seed, i, 100)]).unwrap();
        }
        wal.close().unwrap();
        let seg = dir.join("00000000000000000001.wal");
        let quarter = 64 + 12 * 152 + 60;
        match damage {
            "flip" => sim.tamper(&seg, quarter, &[0x5a]).unwrap(),
            _ => sim.tamper(&seg, quarter - 60, &vec![0u8; 38 * 152]).unwrap(),
        }
        let before = sim.contents(&seg).unwrap();
        let known = WalOptions { known_durable_lsn: 50, segment_size: 1 << 20, ..bulk(seed) };
        let error = Wal::open(Arc::clone(&storage), dir, known).unwrap_err();
        assert!(matches!(error, Error::Corruption { segment_id: 1, .. }), "{damage}: {error:?}");
        assert_eq!(sim.contents(&seg).unwrap(), before, "{damage}: durable records must never be truncated");
    }
}

#[test]
fn a_spare_segment_name_is_made_durable_before_it_takes_records() {
    // The state a crash leaves between a pre-write's rename and its
    // directory sync: zeros under the segment's name, which a power cut can
    // still turn back into the `.prep` name that recovery removes.
    for seed in 0..16u64 {
        let (sim, storage) = sim(100 + seed);
        let dir = Path::new("/log");
        storage.create_dir_all(dir).unwrap();
        let prep = dir.join("00000000000000000001.wal.prep");
        let file = storage.open(&prep, true).unwrap();
        storage.sync_dir(dir).unwrap();
        file.write_all_and_sync(0, &[Bytes::from(vec![0u8; 4096])]).unwrap();
        storage.rename(&prep, &dir.join("00000000000000000001.wal")).unwrap();
        drop(file);
        let wal = open(&storage, dir, writer_only_options(30));
        for i in 0..3 {
            wal.append_blocking(vec![payload(30, i, 100)]).unwrap();
        }
        let image: Arc<dyn datanode_wal::Storage> = Arc::new(sim.crash_image());
        let reopened = open(&image, dir, writer_only_options(30));
        assert_eq!(read_all(&reopened).len(), 3, "seed {seed}: acknowledged records lost with the spare's name");
    }
}

#[test]
fn a_log_keeps_a_bounded_zeroed_window_ahead_not_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn datanode_wal::Storage> = Arc::new(datanode_wal::storage::StdStorage);
    let options = WalOptions { segment_size: 64 << 20, ..WalOptions::new(31) };
    let on_disk =
        |dir: &Path| -> u64 { std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum() };
    let wal = open(&storage, dir.path(), options.clone());
    // An empty log is its marker: its first segment comes with its first
    // record.
    assert!(on_disk(dir.path()) <= 4096, "an empty log costs {} bytes", on_disk(dir.path()));
    wal.append_blocking(vec![payload(31, 0, 10)]).unwrap();
    assert!(on_disk(dir.path()) <= 4 << 20, "a log of one record costs {} bytes", on_disk(dir.path()));
    for i in 1..4000 {
        wal.append_blocking(vec![payload(31, i, 500)]).unwrap();
    }
    let tail = wal.stats().log_bytes;
    let used = on_disk(dir.path());
    assert!(used <= tail + (3 << 20), "{used} bytes on disk for a {tail}-byte log with 64 MiB segments");
    wal.close().unwrap();
    let wal = open(&storage, dir.path(), options);
    assert_eq!(read_all(&wal).len(), 4000);
}

/// A batch of large records writes no zeros ahead of it (they would double
/// the bytes written), and the log reads back whole after it; small records
/// after it get their zeroed window again.
#[test]
fn large_records_are_written_without_zeros_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn datanode_wal::Storage> = Arc::new(datanode_wal::storage::StdStorage);
    let options = WalOptions { segment_size: 64 << 20, ..WalOptions::new(32) };
    let file_bytes =
        |dir: &Path| -> u64 { std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum() };
    let wal = open(&storage, dir.path(), options.clone());
    let large: Vec<Bytes> = (0..8).map(|i| payload(32, i, 1 << 20)).collect();
    for record in &large {
        wal.append_blocking(vec![record.clone()]).unwrap();
    }
    let tail = wal.stats().log_bytes;
    let written = file_bytes(dir.path());
    // The first record's segment starts with its bounded first window.
    assert!(written <= tail + (1 << 20), "{written} bytes in files for a {tail}-byte log of 1 MiB records");
    wal.append_blocking(vec![payload(32, 8, 100)]).unwrap();
    assert!(file_bytes(dir.path()) > wal.stats().log_bytes + (256 << 10), "small records get a zeroed window again");
    wal.close().unwrap();
    let wal = open(&storage, dir.path(), options);
    let back = read_all(&wal);
    assert_eq!(back.len(), 9);
    assert_eq!(&back[..8], &large[..]);
}
