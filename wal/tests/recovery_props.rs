//! Property tests of recovery on the simulated disk:
//! - any truncation of a valid log recovers exactly the records before the cut;
//! - any single-byte change before the last record is reported as
//!   corruption, and never truncated away.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use datanode_wal::storage::SimStorage;
use datanode_wal::{Error, RecordPos, Storage, Wal, format};
use proptest::prelude::*;

const DIR: &str = "/log";

/// A closed log of one record per append; returns payloads and positions.
fn write_log(sim: &SimStorage, sizes: &[usize]) -> (Vec<Bytes>, Vec<RecordPos>) {
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let wal = open(&storage, Path::new(DIR), small_options(77));
    let mut payloads = Vec::new();
    let mut positions = Vec::new();
    for (seq, size) in sizes.iter().enumerate() {
        let data = payload(77, seq as u64, *size);
        positions.push(wal.append_blocking(vec![data.clone()]).unwrap().positions[0]);
        payloads.push(data);
    }
    wal.close().unwrap();
    (payloads, positions)
}

fn segment_path(id: u64) -> PathBuf {
    Path::new(DIR).join(format!("{id:020}.wal"))
}

fn segment_ids(storage: &dyn Storage) -> Vec<u64> {
    let mut ids: Vec<u64> = storage
        .list_dir(Path::new(DIR))
        .unwrap()
        .iter()
        .filter_map(|name| name.strip_suffix(".wal")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

fn sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(prop_oneof![0usize..64, 64usize..700, 3000usize..6000], 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn any_truncation_recovers_exactly_the_records_before_the_cut(
        sizes in sizes(),
        segment_pick in any::<prop::sample::Index>(),
        offset_pick in any::<prop::sample::Index>(),
    ) {
        let sim = SimStorage::new(1);
        let storage: Arc<dyn Storage> = Arc::new(sim.clone());
        let (payloads, positions) = write_log(&sim, &sizes);
        let ids = segment_ids(storage.as_ref());
        let cut_segment = ids[segment_pick.index(ids.len())];
        let file = storage.open(&segment_path(cut_segment), false).unwrap();
        let cut = offset_pick.index(file.file_len().unwrap() as usize + 1) as u64;
        for later in ids.iter().filter(|id| **id > cut_segment) {
            storage.remove_file(&segment_path(*later)).unwrap();
        }
        file.set_len(cut).unwrap();

        let kept: Vec<Bytes> = payloads
            .iter()
            .zip(&positions)
            .filter(|(_, pos)| {
                pos.segment_id < cut_segment
                    || (pos.segment_id == cut_segment
                        && pos.offset + format::frame_len(pos.len as usize) as u64 <= cut)
            })
            .map(|(data, _)| data.clone())
            .collect();
        let wal = open(&storage, Path::new(DIR), small_options(77));
        prop_assert_eq!(read_all(&wal), kept.clone());
        let next = wal.append_blocking(vec![Bytes::from_static(b"next")]).unwrap();
        prop_assert_eq!(next.first_lsn, kept.len() as u64 + 1);
        wal.close().unwrap();
        let wal = open(&storage, Path::new(DIR), small_options(77));
        prop_assert_eq!(wal.last_lsn(), kept.len() as u64 + 1);
    }

    #[test]
    fn any_byte_changed_before_the_last_record_is_corruption(
        sizes in proptest::collection::vec(0usize..700, 2..30),
        position_pick in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let sim = SimStorage::new(2);
        let storage: Arc<dyn Storage> = Arc::new(sim.clone());
        let (_, positions) = write_log(&sim, &sizes);
        let last = positions[positions.len() - 1];
        // Every byte of every segment before the last record's, and every
        // byte of the last record's segment in front of that record.
        let mut candidates: Vec<(u64, u64)> = Vec::new();
        for id in segment_ids(storage.as_ref()).into_iter().filter(|id| *id <= last.segment_id) {
            let len = if id == last.segment_id {
                last.offset
            } else {
                storage.open(&segment_path(id), false).unwrap().file_len().unwrap()
            };
            candidates.push((id, len));
        }
        let total: u64 = candidates.iter().map(|(_, len)| len).sum();
        let mut at = position_pick.index(total as usize) as u64;
        let (id, offset) = candidates
            .iter()
            .find_map(|(id, len)| if at < *len { Some((*id, at)) } else { at -= len; None })
            .unwrap();
        let path = segment_path(id);
        let mut bytes = sim.contents(&path).unwrap();
        bytes[offset as usize] ^= xor;
        sim.tamper(&path, offset as usize, &bytes[offset as usize..offset as usize + 1]).unwrap();
        let damaged = snapshot(&sim, storage.as_ref());

        match Wal::open(Arc::clone(&storage), DIR, small_options(77)) {
            Err(Error::Corruption { .. }) => {}
            other => prop_assert!(false, "segment {id} offset {offset}: expected corruption, got {other:?}"),
        }
        prop_assert!(snapshot(&sim, storage.as_ref()) == damaged, "recovery changed a corrupt log");
    }
}

fn snapshot(sim: &SimStorage, storage: &dyn Storage) -> Vec<(u64, Vec<u8>)> {
    segment_ids(storage).into_iter().map(|id| (id, sim.contents(&segment_path(id)).unwrap())).collect()
}
