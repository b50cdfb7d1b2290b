//! A proptest-driven fuzz harness for the on-disk decoders: whatever bytes
//! a disk hands back (random, or a valid frame with bytes flipped, cut or
//! appended), decoding never panics, never reads out of bounds, and never
//! accepts a frame that is not exactly what was written.
//!
//! Runs in CI with `cargo test`; `PROPTEST_CASES=100000 cargo test -p
//! datanode-wal --test fuzz_decoder` searches longer.
#![allow(clippy::unwrap_used)]

use datanode_wal::format::{
    Expected, RecordHeader, SegmentHeader, decode_record, encode_record_header, frame_len, padding_len,
};
use proptest::prelude::*;

fn frame(header: &RecordHeader, payload: &[u8]) -> Vec<u8> {
    let mut bytes = encode_record_header(header, payload).to_vec();
    bytes.extend_from_slice(payload);
    bytes.resize(bytes.len() + padding_len(payload.len()), 0);
    bytes
}

fn header_strategy() -> impl Strategy<Value = (RecordHeader, Vec<u8>)> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
        |(log_id, segment_id, lsn, synced_lsn, payload)| {
            (RecordHeader { len: payload.len() as u32, log_id, segment_id, lsn, synced_lsn }, payload)
        },
    )
}

fn expected_of(header: &RecordHeader) -> Expected {
    Expected { log_id: header.log_id, segment_id: header.segment_id, lsn: Some(header.lsn) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Random bytes: no panic; anything accepted is self-consistent.
    #[test]
    fn random_bytes_never_panic_and_accepted_frames_re_encode(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        log_id in any::<u64>(),
        segment_id in any::<u64>(),
        lsn in proptest::option::of(any::<u64>()),
    ) {
        if let Ok((header, range)) = decode_record(&bytes, Expected { log_id, segment_id, lsn }) {
            prop_assert!(range.end <= bytes.len());
            prop_assert_eq!(&frame(&header, &bytes[range.clone()])[..], &bytes[..frame_len(range.len())]);
        }
        if let Ok(Some(header)) = SegmentHeader::decode(&bytes) {
            prop_assert_eq!(SegmentHeader::decode(&header.encode()).unwrap(), Some(header));
        }
    }

    /// A valid frame decodes to exactly what was encoded.
    #[test]
    fn valid_frames_round_trip((header, payload) in header_strategy(), trailing in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = frame(&header, &payload);
        bytes.extend_from_slice(&trailing);
        let (back, range) = decode_record(&bytes, expected_of(&header)).unwrap();
        prop_assert_eq!(back, header);
        prop_assert_eq!(&bytes[range], &payload[..]);
    }

    /// A valid frame with bytes changed or cut short is refused.
    #[test]
    fn damaged_frames_are_refused(
        (header, payload) in header_strategy(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let good = frame(&header, &payload);
        let mut bytes = good.clone();
        for (at, mask) in flips {
            bytes[at.index(good.len())] ^= mask;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(good.len()));
        }
        if bytes != good[..bytes.len().min(good.len())] || bytes.len() < good.len() {
            prop_assert!(decode_record(&bytes, expected_of(&header)).is_err());
        }
    }

    /// Segment headers: every encoded header decodes; any single changed
    /// byte is refused.
    #[test]
    fn segment_headers_round_trip_and_refuse_damage(
        log_id in any::<u64>(), segment_id in any::<u64>(), first_lsn in any::<u64>(), recycled in any::<bool>(),
        at in 0usize..64, mask in 1u8..=255,
    ) {
        let header = SegmentHeader { log_id, segment_id, first_lsn, recycled };
        let mut bytes = header.encode();
        prop_assert_eq!(SegmentHeader::decode(&bytes).unwrap(), Some(header));
        bytes[at] ^= mask;
        prop_assert!(SegmentHeader::decode(&bytes).is_err() || bytes.iter().all(|b| *b == 0));
    }
}
