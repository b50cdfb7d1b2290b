//! Recycled segments: purged segment files that later segments are written
//! into, over the stale records of the segments they held before.
//!
//! The simulation drives one log through appends, purges (which keep
//! recycled spares), rolls into those spares, truncations and syncs, and
//! cuts the power at a random storage operation (so inside a roll, a
//! header rewrite, a rename, a purge or a batch, with unsynced sectors
//! lost, torn or garbage and a random prefix of the unsynced namespace
//! changes kept), sometimes fails an operation instead, then recovers and
//! checks:
//! - recovery never reports corruption after a clean power cut or I/O error;
//! - every acknowledged durable record that was not purged is back, byte
//!   for byte, at its LSN and at its position;
//! - no record is returned that was not written at that LSN in this log's
//!   history (a stale record of a recycled file would be one);
//! - reads past the tail fail, never return stale bytes.
//!
//! `WAL_RECYCLE_ROUNDS` (default 300) sets the number of rounds,
//! `WAL_RECYCLE_SEED` the first seed; a failure names its seed, and
//! `WAL_RECYCLE_TRACE` prints every call of the rounds. Each round
//! is single-threaded; the one thing not reproducible is when the
//! background pre-write runs relative to the caller.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use datanode_wal::format::{self, RecordHeader};
use datanode_wal::storage::{Fault, SimRng, SimStorage};
use datanode_wal::{Corruption, Durability, Error, IoOp, RecordPos, Storage, Wal, WalOptions};

const DIR: &str = "/wal";

fn segment_path(id: u64) -> PathBuf {
    Path::new(DIR).join(format!("{id:020}.wal"))
}

fn names(storage: &dyn Storage) -> Vec<String> {
    let mut names = storage.list_dir(Path::new(DIR)).unwrap();
    names.sort();
    names
}

fn recycled_names(storage: &dyn Storage) -> Vec<String> {
    names(storage).into_iter().filter(|n| n.ends_with(".wal.recycled")).collect()
}

// ---------------------------------------------------------------------------
// The simulation.

/// What the log must hold, as far as the test knows.
#[derive(Default, Clone)]
struct Model {
    /// LSN -> payload of every record of the log's current history that was
    /// written (acknowledged or not).
    timeline: BTreeMap<u64, Bytes>,
    /// Where each record was acknowledged to be.
    positions: BTreeMap<u64, RecordPos>,
    /// Every record up to here was acknowledged durable.
    durable: u64,
    /// Records below this may have been purged.
    purge_floor: u64,
}

/// What a crash (or failure) in the middle of a call may leave.
struct Expect {
    /// The payload each LSN may hold (the call's own records included).
    allowed: BTreeMap<u64, Bytes>,
    /// LSNs that must be back: durable, not purged, not truncated.
    must: std::ops::RangeInclusive<u64>,
    positions: BTreeMap<u64, RecordPos>,
}

enum Call {
    Append(Vec<Bytes>),
    Purge(u64),
    Truncate(u64),
    Sync,
}

impl Model {
    /// Expectations if the power is cut during `call` (or it fails).
    fn expect_during(&self, call: &Call) -> Expect {
        let mut allowed = self.timeline.clone();
        let mut floor = self.purge_floor;
        let mut durable = self.durable;
        match call {
            Call::Append(records) => {
                let last = self.timeline.keys().next_back().copied().unwrap_or(0);
                for (i, data) in records.iter().enumerate() {
                    allowed.insert(last + 1 + i as u64, data.clone());
                }
            }
            Call::Purge(lsn) => floor = floor.max(*lsn),
            Call::Truncate(lsn) => durable = durable.min(*lsn),
            Call::Sync => {}
        }
        Expect { allowed, must: floor.max(1)..=durable, positions: self.positions.clone() }
    }

    fn expect_now(&self) -> Expect {
        self.expect_during(&Call::Sync)
    }
}

/// Opens the crash image and checks it against `expect`; returns the log
/// and the model of what it now holds.
fn recover_and_check(storage: &Arc<dyn Storage>, options: &WalOptions, expect: &Expect, what: &str) -> (Wal, Model) {
    let wal = Wal::open(Arc::clone(storage), DIR, options.clone())
        .unwrap_or_else(|error| panic!("{what}: recovery failed: {error}; files {:?}", names(storage.as_ref())));
    let (first, last) = (wal.first_lsn(), wal.last_lsn());
    let records = if last >= first { wal.read_from(first, usize::MAX).unwrap() } else { Vec::new() };
    let mut model = Model { durable: last, purge_floor: first, ..Model::default() };
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.lsn, first + i as u64, "{what}: LSNs not dense");
        let allowed = expect.allowed.get(&record.lsn);
        assert_eq!(allowed, Some(&record.data), "{what}: LSN {} holds bytes never written there", record.lsn);
        model.timeline.insert(record.lsn, record.data.clone());
        model.positions.insert(record.lsn, record.pos);
    }
    for lsn in expect.must.clone() {
        let data = expect.allowed.get(&lsn).unwrap();
        assert_eq!(model.timeline.get(&lsn), Some(data), "{what}: durable LSN {lsn} lost (log {first}..={last})");
        if let Some(pos) = expect.positions.get(&lsn) {
            assert_eq!(&wal.read(*pos).unwrap(), data, "{what}: LSN {lsn} not at its position");
        }
    }
    // Past the tail there is nothing to read, whatever bytes lie there.
    assert!(matches!(wal.read_from(last + 1, 1), Err(Error::LsnOutOfRange { .. })), "{what}");
    for (lsn, pos) in expect.positions.range(last + 1..) {
        assert!(wal.read(*pos).is_err(), "{what}: LSN {lsn} past the tail was read");
    }
    (wal, model)
}

#[derive(Default)]
struct Tally {
    recycled_rolls: u64,
    crashes: u64,
    failures: u64,
}

fn round(seed: u64, tally: &mut Tally) {
    let mut rng = SimRng::new(seed ^ 0x7ec7_c1ed);
    let durability = if rng.below(4) == 0 { Durability::None } else { Durability::Sync };
    let options = WalOptions {
        segment_size: 4096 << rng.below(2),
        durability,
        max_batch_bytes: 512 << rng.below(4),
        prewrite_segments: rng.below(2) == 0,
        recycled_segments: 1 + rng.below(2) as usize,
        ..WalOptions::new(seed)
    };
    let mut sim = SimStorage::new(seed);
    let mut storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let mut expect = Model::default().expect_now();
    let mut writes = 0u64;
    for life in 0..5 {
        let what = format!("seed {seed} life {life} ({options:?})");
        let (wal, mut model) = recover_and_check(&storage, &options, &expect, &what);
        sim.crash_before_op(1 + rng.below(120));
        let mut cut: Option<(SimStorage, Expect)> = None;
        let faulty = rng.below(6) == 0;
        if faulty {
            let op = [IoOp::Write, IoOp::Sync, IoOp::SyncDir, IoOp::Metadata][rng.below(4) as usize];
            let mut fault = Fault::new(op, libc::EIO).after(rng.below(40));
            if rng.below(2) == 0 {
                fault = fault.short_write();
            }
            sim.inject(fault);
        }
        for _ in 0..40 + rng.below(60) {
            let last = wal.last_lsn();
            let first = wal.first_lsn();
            let call = match rng.below(20) {
                0..=12 => Call::Append(
                    (0..1 + rng.below(3))
                        .map(|_| {
                            writes += 1;
                            payload(seed, writes, rng.below(1500) as usize)
                        })
                        .collect(),
                ),
                13..=16 if last > 0 => Call::Purge(last + 1 - rng.below(last.min(6))),
                17 if last > first => Call::Truncate(last - 1 - rng.below((last - first).min(3))),
                _ => Call::Sync,
            };
            let during = model.expect_during(&call);
            if std::env::var("WAL_RECYCLE_TRACE").is_ok() {
                let name = match &call {
                    Call::Append(r) => {
                        format!("append {}", r.iter().map(|b| b.len().to_string()).collect::<Vec<_>>().join(","))
                    }
                    Call::Purge(l) => format!("purge {l}"),
                    Call::Truncate(l) => format!("truncate {l}"),
                    Call::Sync => "sync".into(),
                };
                eprintln!("life {life} first {first} last {last}: {name}");
            }
            let outcome = match &call {
                Call::Append(records) => wal.append_blocking(records.clone()).map(|appended| {
                    for (pos, data) in appended.positions.iter().zip(records) {
                        model.timeline.insert(pos.lsn, data.clone());
                        model.positions.insert(pos.lsn, *pos);
                    }
                }),
                Call::Purge(lsn) => {
                    wal.purge_before_blocking(*lsn).map(|_| model.purge_floor = model.purge_floor.max(*lsn))
                }
                Call::Truncate(lsn) => wal.truncate_after_blocking(*lsn).map(|()| {
                    model.timeline.retain(|l, _| *l <= *lsn);
                    model.positions.retain(|l, _| *l <= *lsn);
                }),
                Call::Sync => wal.sync_blocking(),
            };
            model.durable = wal.durable_lsn();
            let crashed = sim.take_crashed();
            if let Some(image) = crashed {
                // The power was cut somewhere in this call (or in the
                // pre-write that ran just before it).
                tally.crashes += 1;
                cut = Some((image, during));
                break;
            }
            if let Err(error) = outcome {
                assert!(error.errno().is_some(), "{what}: a failure without an errno: {error}");
                tally.failures += 1;
                sim.clear_faults();
                cut = Some((sim.crash_image(), during));
                break;
            }
            if let Call::Append(_) = call
                && let Some((lsn, pos)) = model.positions.iter().nth(rng.below(model.positions.len() as u64) as usize)
                && *lsn >= wal.first_lsn()
            {
                assert_eq!(&wal.read(*pos).unwrap(), model.timeline.get(lsn).unwrap(), "{what}: read of LSN {lsn}");
            }
        }
        tally.recycled_rolls += wal.stats().recycled_segments;
        let (image, during) = cut.unwrap_or_else(|| (sim.crash_image(), model.expect_now()));
        drop(wal);
        sim.clear_faults();
        expect = during;
        sim = image;
        storage = Arc::new(sim.clone());
    }
    let what = format!("seed {seed} final");
    let (wal, _) = recover_and_check(&storage, &options, &expect, &what);
    wal.append_blocking(vec![Bytes::from_static(b"after")]).unwrap();
    wal.close().unwrap();
}

#[test]
fn recycled_segments_survive_crashes_and_faults_at_any_point() {
    let rounds: u64 = std::env::var("WAL_RECYCLE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let first: u64 = std::env::var("WAL_RECYCLE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut tally = Tally::default();
    for seed in first..first + rounds {
        round(seed, &mut tally);
    }
    // The simulation must have exercised what it is about.
    assert!(tally.recycled_rolls >= rounds, "only {} rolls into recycled segments", tally.recycled_rolls);
    assert!(tally.crashes >= rounds, "only {} power cuts", tally.crashes);
    assert!(tally.failures > 0 || rounds < 50, "no injected failure fired");
    eprintln!(
        "{rounds} rounds: {} rolls into recycled segments, {} power cuts, {} failures",
        tally.recycled_rolls, tally.crashes, tally.failures
    );
}

// ---------------------------------------------------------------------------
// Targeted cases.

fn options(log_id: u64) -> WalOptions {
    WalOptions { recycled_segments: 1, ..small_options(log_id) }
}

/// A log that purged its first segments and rolled into a recycled file:
/// returns it with the payloads of its live records and the id of the
/// recycled segment in use.
fn log_in_a_recycled_segment(storage: &Arc<dyn Storage>, log_id: u64) -> (Wal, BTreeMap<u64, Bytes>, u64) {
    let wal = open(storage, Path::new(DIR), options(log_id));
    let mut written = BTreeMap::new();
    let mut seq = 0;
    // Records in the recycled file are of another size than the stale ones
    // under them, so stale bytes lie right past every record boundary.
    let mut append = |wal: &Wal, written: &mut BTreeMap<u64, Bytes>| {
        seq += 1;
        let size = if wal.stats().recycled_segments == 0 { 300 } else { 330 };
        let data = payload(log_id, seq, size);
        written.insert(wal.append_blocking(vec![data.clone()]).unwrap().first_lsn, data);
    };
    while wal.stats().segments < 4 {
        append(&wal, &mut written);
    }
    assert!(wal.purge_before_blocking(wal.last_lsn()).unwrap() >= 3);
    assert_eq!(recycled_names(storage.as_ref()).len(), 1, "one spare is kept");
    let first = wal.first_lsn();
    written.retain(|lsn, _| *lsn >= first);
    while wal.stats().recycled_segments == 0 {
        append(&wal, &mut written);
    }
    // Two records in the recycled segment, each synced before the next.
    append(&wal, &mut written);
    let active = wal.read_from(wal.last_lsn(), 1).unwrap()[0].pos.segment_id;
    assert!(recycled_names(storage.as_ref()).is_empty());
    (wal, written, active)
}

fn all(wal: &Wal) -> BTreeMap<u64, Bytes> {
    if wal.last_lsn() < wal.first_lsn() {
        return BTreeMap::new();
    }
    wal.read_from(wal.first_lsn(), usize::MAX).unwrap().into_iter().map(|r| (r.lsn, r.data)).collect()
}

/// The end of the records of segment `id` and the file's bytes.
fn tail_of(sim: &SimStorage, wal: &Wal, id: u64) -> (u64, Vec<u8>) {
    let last =
        wal.read_from(wal.first_lsn(), usize::MAX).unwrap().into_iter().filter(|r| r.pos.segment_id == id).last();
    let end = last.map_or(64, |r| r.pos.offset + format::frame_len(r.pos.len as usize) as u64);
    (end, sim.contents(&segment_path(id)).unwrap())
}

#[test]
fn stale_bytes_after_the_tail_are_the_end_of_the_log_not_a_torn_tail() {
    let (sim, storage) = sim(40);
    let (wal, written, active) = log_in_a_recycled_segment(&storage, 40);
    let (tail, before) = tail_of(&sim, &wal, active);
    assert!(before[tail as usize..].iter().any(|b| *b != 0), "a recycled file holds stale bytes past the tail");
    let image_sim = sim.crash_image();
    drop(wal);
    let image: Arc<dyn Storage> = Arc::new(image_sim.clone());
    let reopened = open(&image, Path::new(DIR), options(40));
    assert_eq!(all(&reopened), written);
    // Treated as the end of the log, not zeroed as a torn write: a
    // recycled file is not rewritten at every open.
    let path = segment_path(active);
    let after = image_sim.contents(&path).unwrap();
    assert_eq!(after, before, "recovery rewrote a recycled segment's stale bytes");
    reopened.close().unwrap();
}

#[test]
fn a_sealed_recycled_segment_is_not_corruption() {
    // Stale bytes past the records of a recycled segment that a later
    // segment follows: the later header proves where its records end.
    let (sim, storage) = sim(41);
    let (wal, mut written, active) = log_in_a_recycled_segment(&storage, 41);
    let mut seq = 1000;
    while wal.read_from(wal.last_lsn(), 1).unwrap()[0].pos.segment_id == active {
        seq += 1;
        let data = payload(41, seq, 330);
        written.insert(wal.append_blocking(vec![data.clone()]).unwrap().first_lsn, data);
    }
    wal.close().unwrap();
    let reopened = Wal::open(Arc::clone(&storage), DIR, options(41))
        .unwrap_or_else(|error| panic!("a sealed recycled segment read as corrupt: {error}"));
    assert_eq!(all(&reopened), written);
    drop(sim);
}

#[test]
fn damage_to_a_live_record_of_a_recycled_segment_is_corruption() {
    // A flipped bit in a record that a later, synced record follows: the
    // later record proves it was durable. Nothing is changed.
    let (sim, storage) = sim(42);
    let (wal, _, active) = log_in_a_recycled_segment(&storage, 42);
    let records = wal.read_from(wal.first_lsn(), usize::MAX).unwrap();
    let victim = records.iter().find(|r| r.pos.segment_id == active).unwrap().pos;
    wal.close().unwrap();
    let path = segment_path(active);
    sim.tamper(&path, victim.offset as usize + 60, b"!").unwrap();
    let before = sim.contents(&path).unwrap();
    let error = Wal::open(Arc::clone(&storage), DIR, options(42)).unwrap_err();
    assert!(
        matches!(error, Error::Corruption { segment_id, offset, detail: Corruption::BadRecord(_) }
            if segment_id == active && offset == victim.offset),
        "{error:?}"
    );
    assert_eq!(sim.contents(&path).unwrap(), before, "corruption must never be truncated");
}

#[test]
fn damage_to_the_last_record_of_a_sealed_recycled_segment_is_corruption() {
    // No later record of the segment vouches for it, but the next
    // segment's first LSN does.
    let (sim, storage) = sim(43);
    let (wal, _, active) = log_in_a_recycled_segment(&storage, 43);
    let mut seq = 1000;
    while wal.read_from(wal.last_lsn(), 1).unwrap()[0].pos.segment_id == active {
        seq += 1;
        wal.append_blocking(vec![payload(43, seq, 330)]).unwrap();
    }
    let records = wal.read_from(wal.first_lsn(), usize::MAX).unwrap();
    let victim = records.iter().filter(|r| r.pos.segment_id == active).last().unwrap().pos;
    wal.close().unwrap();
    sim.tamper(&segment_path(active), victim.offset as usize + 50, b"?").unwrap();
    let error = Wal::open(Arc::clone(&storage), DIR, options(43)).unwrap_err();
    assert!(matches!(error, Error::Corruption { .. }), "{error:?}");
}

#[test]
fn an_unacknowledged_record_past_a_torn_one_never_comes_back() {
    // A torn batch in recycled space: its first record damaged, its second
    // whole, stale records of the old segment after both. The second
    // record proves nothing (it was written in the same batch), so it goes
    // with the torn tail; it must be erased, or a later record of the same
    // size at the torn one's place would make it the next record again.
    let (sim, storage) = sim(44);
    let (wal, mut written, active) = log_in_a_recycled_segment(&storage, 44);
    let batch = vec![payload(44, 500, 200), payload(44, 501, 200)];
    let appended = wal.append_blocking(batch).unwrap();
    assert_eq!(appended.positions[1].segment_id, active, "the batch stays in the recycled segment");
    wal.close().unwrap();
    sim.tamper(&segment_path(active), appended.positions[0].offset as usize + 100, b"torn").unwrap();
    let wal = open(&storage, Path::new(DIR), options(44));
    assert_eq!(all(&wal), written, "the torn batch is gone");
    let again = payload(44, 600, 200);
    let lsn = wal.append_blocking(vec![again.clone()]).unwrap().first_lsn;
    assert_eq!(lsn, appended.first_lsn);
    written.insert(lsn, again);
    wal.close().unwrap();
    let wal = open(&storage, Path::new(DIR), options(44));
    assert_eq!(all(&wal), written, "an unacknowledged record came back");
}

#[test]
fn a_stale_record_with_the_next_lsn_is_not_taken_for_a_live_one() {
    // Craft the worst stale record: at the tail, this log's, with the very
    // LSN that comes next and a valid checksum; only its segment id is that
    // of an earlier segment. It is the end of the log. The same record
    // naming the active segment would be live: the segment id is what
    // tells them apart.
    for (segment_delta, live) in [(1u64, false), (0, true)] {
        let (sim, storage) = sim(45);
        let (wal, written, active) = log_in_a_recycled_segment(&storage, 45);
        let (tail, _) = tail_of(&sim, &wal, active);
        let next = wal.last_lsn() + 1;
        wal.close().unwrap();
        let data = b"stale but well formed";
        let header = RecordHeader {
            len: data.len() as u32,
            log_id: 45,
            segment_id: active - segment_delta,
            lsn: next,
            synced_lsn: next - 1,
        };
        let mut frame = format::encode_record_header(&header, data).to_vec();
        frame.extend_from_slice(data);
        frame.resize(header.frame_len(), 0);
        sim.tamper(&segment_path(active), tail as usize, &frame).unwrap();
        let wal = open(&storage, Path::new(DIR), options(45));
        if live {
            assert_eq!(wal.last_lsn(), next, "control: the same record of this segment is live");
        } else {
            assert_eq!(all(&wal), written, "a stale record was taken for a live one");
            let pos = RecordPos { segment_id: active, offset: tail, lsn: next, len: data.len() as u32 };
            assert!(wal.read(pos).is_err(), "a read returned a stale record");
            assert!(matches!(wal.read_from(next, 1), Err(Error::LsnOutOfRange { .. })));
        }
    }
}

#[test]
fn reads_past_the_tail_never_return_stale_records() {
    let (sim, storage) = sim(46);
    let (wal, _, active) = log_in_a_recycled_segment(&storage, 46);
    let last = wal.last_lsn();
    let (tail, bytes) = tail_of(&sim, &wal, active);
    // Every stale record past the tail, asked for by its place.
    let mut stale = 0;
    for at in (tail as usize..bytes.len().saturating_sub(format::RECORD_HEADER_LEN)).step_by(format::RECORD_ALIGN) {
        let head = &bytes[at..at + format::RECORD_HEADER_LEN];
        if head[format::RECORD_MAGIC_OFFSET..][..4] != format::RECORD_MAGIC.to_le_bytes() {
            continue;
        }
        stale += 1;
        let u64_at = |offset: usize| u64::from_le_bytes(head[offset..offset + 8].try_into().unwrap());
        let len = u32::from_le_bytes(head[format::RECORD_LEN_OFFSET..][..4].try_into().unwrap());
        let lsn = u64_at(format::RECORD_LSN_OFFSET);
        let old_segment = u64_at(format::RECORD_SEGMENT_ID_OFFSET);
        for pos in [
            RecordPos { segment_id: active, offset: at as u64, lsn: last, len },
            RecordPos { segment_id: active, offset: at as u64, lsn, len },
            RecordPos { segment_id: old_segment, offset: at as u64, lsn, len },
        ] {
            assert!(wal.read(pos).is_err(), "{pos:?} read a stale record");
        }
    }
    assert!(stale > 0, "the recycled file holds stale records");
    assert!(matches!(wal.read_from(last + 1, usize::MAX), Err(Error::LsnOutOfRange { .. })));
    let from_start = wal.read_from(wal.first_lsn(), usize::MAX).unwrap();
    assert_eq!(from_start.last().unwrap().lsn, last, "a read from the start stops at the tail");
}

#[test]
fn a_power_cut_at_any_step_of_a_roll_into_a_recycled_file_loses_nothing() {
    // Every storage operation of the roll in turn: the header rewrite (torn
    // or lost), its sync, the rename, the directory sync, the first batch
    // and its sync, and the batch after.
    let mut cuts = 0;
    for step in 1..=16 {
        let (sim, storage) = sim(47);
        let wal = open(&storage, Path::new(DIR), WalOptions { prewrite_segments: false, ..options(47) });
        let mut acked = BTreeMap::new();
        let mut seq = 0;
        while wal.stats().segments < 3 {
            seq += 1;
            let data = payload(47, seq, 400);
            acked.insert(wal.append_blocking(vec![data.clone()]).unwrap().first_lsn, data);
        }
        wal.purge_before_blocking(wal.last_lsn()).unwrap();
        assert_eq!(recycled_names(storage.as_ref()).len(), 1);
        acked.retain(|lsn, _| *lsn >= wal.first_lsn());
        sim.crash_before_op(step);
        let mut cut = None;
        // A record too large for the active segment's room: it rolls.
        for size in [3900, 400] {
            seq += 1;
            let data = payload(47, seq, size);
            let lsn = wal.append_blocking(vec![data.clone()]).unwrap().first_lsn;
            if let Some(image) = sim.take_crashed() {
                cut = Some((image, lsn, data));
                break;
            }
            acked.insert(lsn, data);
        }
        assert_eq!(wal.stats().recycled_segments, 1, "the roll took the recycled file");
        let Some((image, in_flight_lsn, in_flight)) = cut else { continue };
        cuts += 1;
        let image: Arc<dyn Storage> = Arc::new(image);
        let reopened = Wal::open(Arc::clone(&image), DIR, options(47))
            .unwrap_or_else(|error| panic!("step {step}: recovery failed: {error}"));
        let back = all(&reopened);
        for (lsn, data) in &acked {
            assert_eq!(back.get(lsn), Some(data), "step {step}: LSN {lsn} lost");
        }
        for (lsn, data) in &back {
            let expected = acked.get(lsn).or((*lsn == in_flight_lsn).then_some(&in_flight));
            assert_eq!(expected, Some(data), "step {step}: LSN {lsn} holds bytes never written there");
        }
        reopened.append_blocking(vec![Bytes::from_static(b"after")]).unwrap();
        reopened.close().unwrap();
        let again = open(&image, Path::new(DIR), options(47));
        assert_eq!(again.last_lsn(), back.keys().next_back().copied().unwrap_or(0) + 1, "step {step}");
    }
    assert!(cuts >= 6, "only {cuts} cuts landed inside the roll");
}

#[test]
fn spares_are_bounded_and_kept_only_by_a_log_that_purged() {
    let (_, storage) = sim(48);
    let dir = Path::new(DIR);
    let two = WalOptions { recycled_segments: 2, ..options(48) };
    let wal = open(&storage, dir, two.clone());
    for i in 0..100 {
        wal.append_blocking(vec![payload(48, i, 300)]).unwrap();
    }
    assert!(wal.stats().segments > 6);
    assert!(recycled_names(storage.as_ref()).is_empty(), "a log that never purged keeps no spare");
    let removed = wal.purge_before_blocking(wal.last_lsn()).unwrap();
    assert!(removed > 4);
    let kept = recycled_names(storage.as_ref());
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(wal.stats().recycled_spares, 2);
    wal.close().unwrap();
    // Fewer allowed at the next open: the surplus goes.
    let wal = open(&storage, dir, WalOptions { recycled_segments: 1, ..options(48) });
    assert_eq!(recycled_names(storage.as_ref()), kept[1..].to_vec(), "the newest spare is kept");
    wal.close().unwrap();
    let none = WalOptions { recycled_segments: 0, ..options(48) };
    let wal = open(&storage, dir, none);
    assert!(recycled_names(storage.as_ref()).is_empty());
    for i in 0..40 {
        wal.append_blocking(vec![payload(48, 100 + i, 300)]).unwrap();
    }
    wal.purge_before_blocking(wal.last_lsn()).unwrap();
    assert!(recycled_names(storage.as_ref()).is_empty(), "recycling off: purged segments are removed");
    assert_eq!(wal.stats().recycled_segments, 0);
}

#[test]
fn a_read_that_races_the_recycling_of_its_segment_is_out_of_range_not_corrupt() {
    // A reader finds its record's segment, then stalls before its pread;
    // meanwhile the segment is purged, its file recycled and written over
    // by a later segment. The bytes it then reads fail their check: the
    // record is gone from the log, which is not corruption.
    let (sim, storage) = sim(49);
    let wal = Arc::new(open(&storage, Path::new(DIR), WalOptions { prewrite_segments: false, ..options(49) }));
    let mut positions = Vec::new();
    let mut seq = 0;
    while wal.stats().segments < 3 {
        seq += 1;
        positions.push(wal.append_blocking(vec![payload(49, seq, 300)]).unwrap().positions[0]);
    }
    // The newest purged segment is the one kept as the spare.
    let first = *positions.iter().find(|pos| pos.segment_id == 2).unwrap();
    sim.pause_on(IoOp::Read, segment_path(first.segment_id).to_string_lossy().into_owned());
    let reader = {
        let wal = Arc::clone(&wal);
        std::thread::spawn(move || wal.read(first))
    };
    wait_until("the read is held", || sim.held() == 1);
    wal.purge_before_blocking(wal.last_lsn()).unwrap();
    while wal.stats().recycled_segments == 0 {
        seq += 1;
        wal.append_blocking(vec![payload(49, seq, 330)]).unwrap();
    }
    // Write the recycled file over the record's place.
    for _ in 0..12 {
        seq += 1;
        wal.append_blocking(vec![payload(49, seq, 330)]).unwrap();
    }
    sim.resume(IoOp::Read);
    let result = reader.join().unwrap();
    assert!(matches!(result, Err(Error::LsnOutOfRange { .. })), "{result:?}");
}
