//! The on-disk format: segment headers and record framing.
//!
//! Pure functions over byte slices, no I/O. Every integer is little-endian.
//! `FORMAT.md` at the crate root describes the same layout for operators and
//! for tools written in other languages; keep the two in step.

use crate::Lsn;

/// Bytes 0..8 of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"DNWALSEG";
/// The only segment format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Bytes 0..4 of every record header (`"DNWR"` read as little-endian bytes).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"DNWR");
/// Size of a record header; the payload follows it.
pub const RECORD_HEADER_LEN: usize = RECORD_SYNCED_LSN_OFFSET + U64;
/// Records start at multiples of this, so a scan can step over the log.
pub const RECORD_ALIGN: usize = 8;
/// Largest payload a single record may carry.
pub const MAX_RECORD_LEN: usize = u32::MAX as usize - RECORD_HEADER_LEN - RECORD_ALIGN;
/// Segment header flag: the file is a recycled segment, so the bytes after
/// its last record may be stale records of the earlier segments it held.
pub const SEGMENT_FLAG_RECYCLED: u32 = 1;

const U32: usize = size_of::<u32>();
const U64: usize = size_of::<u64>();

// The segment header, field by field; each offset follows from the one
// before it. Nothing outside this file knows them.
const SEGMENT_MAGIC_OFFSET: usize = 0;
const SEGMENT_VERSION_OFFSET: usize = SEGMENT_MAGIC_OFFSET + SEGMENT_MAGIC.len();
const SEGMENT_HEADER_LEN_OFFSET: usize = SEGMENT_VERSION_OFFSET + U32;
const SEGMENT_LOG_ID_OFFSET: usize = SEGMENT_HEADER_LEN_OFFSET + U32;
const SEGMENT_ID_OFFSET: usize = SEGMENT_LOG_ID_OFFSET + U64;
const SEGMENT_FIRST_LSN_OFFSET: usize = SEGMENT_ID_OFFSET + U64;
const SEGMENT_FLAGS_OFFSET: usize = SEGMENT_FIRST_LSN_OFFSET + U64;
/// Reserved, zero, up to the checksum.
const SEGMENT_RESERVED_OFFSET: usize = SEGMENT_FLAGS_OFFSET + U32;
/// CRC of every header byte before it; the header's last field.
const SEGMENT_CRC_OFFSET: usize = SEGMENT_HEADER_LEN - U32;
const _: () = assert!(SEGMENT_RESERVED_OFFSET + 16 == SEGMENT_CRC_OFFSET);

/// Offset of the magic in a record header.
pub const RECORD_MAGIC_OFFSET: usize = 0;
/// Offset of the CRC (of the header from [`RECORD_CHECKSUMMED_FROM`] on,
/// then the payload).
pub const RECORD_CRC_OFFSET: usize = RECORD_MAGIC_OFFSET + U32;
/// Offset of the payload length; the checksummed part starts here.
pub const RECORD_LEN_OFFSET: usize = RECORD_CRC_OFFSET + U32;
/// Offset of the flags (reserved, zero).
pub const RECORD_FLAGS_OFFSET: usize = RECORD_LEN_OFFSET + U32;
/// Offset of the log id.
pub const RECORD_LOG_ID_OFFSET: usize = RECORD_FLAGS_OFFSET + U32;
/// Offset of the segment id.
pub const RECORD_SEGMENT_ID_OFFSET: usize = RECORD_LOG_ID_OFFSET + U64;
/// Offset of the LSN.
pub const RECORD_LSN_OFFSET: usize = RECORD_SEGMENT_ID_OFFSET + U64;
/// Offset of the `synced_lsn`; the header's last field.
pub const RECORD_SYNCED_LSN_OFFSET: usize = RECORD_LSN_OFFSET + U64;
/// Where the record checksum starts: everything after the CRC itself.
pub const RECORD_CHECKSUMMED_FROM: usize = RECORD_LEN_OFFSET;
const _: () = assert!(RECORD_HEADER_LEN == 48 && SEGMENT_HEADER_LEN.is_multiple_of(RECORD_ALIGN));

/// The header at offset 0 of a segment file.
///
/// Written and synced before any record behind it, so a segment whose
/// header is missing or torn holds no durable record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The owning log (a partition id to the layers above; opaque here).
    pub log_id: u64,
    /// Sequence number of the segment; also its file name.
    pub segment_id: u64,
    /// LSN of the first record in the segment.
    pub first_lsn: Lsn,
    /// The file held earlier segments of this log (it was recycled): past
    /// the records, its bytes are stale records of those segments, whose
    /// segment ids are all lower than this one's, not zeros.
    pub recycled: bool,
}

/// Why bytes did not decode as a segment header or a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than a header, or than the length the header announces.
    Truncated,
    /// The magic number is wrong.
    BadMagic,
    /// A segment written by an unknown format version.
    BadVersion(u32),
    /// The checksum does not match the bytes.
    BadChecksum,
    /// A checksummed record that belongs to another log, segment or position
    /// (a misdirected write or a stale record from an earlier use of the file).
    Misplaced,
    /// The announced length is impossible.
    BadLength,
    /// The alignment padding after the payload is not zero.
    BadPadding,
    /// A segment header sets flags this version does not know.
    BadFlags(u32),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => f.write_str("truncated frame"),
            FrameError::BadMagic => f.write_str("bad magic"),
            FrameError::BadVersion(v) => write!(f, "unknown format version {v}"),
            FrameError::BadChecksum => f.write_str("checksum mismatch"),
            FrameError::Misplaced => f.write_str("record of another log, segment or LSN"),
            FrameError::BadLength => f.write_str("impossible record length"),
            FrameError::BadPadding => f.write_str("non-zero padding"),
            FrameError::BadFlags(flags) => write!(f, "unknown segment flags {flags:#x}"),
        }
    }
}

impl SegmentHeader {
    /// Encodes the header into its fixed 64 bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0u8; SEGMENT_HEADER_LEN];
        out[SEGMENT_MAGIC_OFFSET..SEGMENT_VERSION_OFFSET].copy_from_slice(&SEGMENT_MAGIC);
        put_u32(&mut out, SEGMENT_VERSION_OFFSET, FORMAT_VERSION);
        put_u32(&mut out, SEGMENT_HEADER_LEN_OFFSET, SEGMENT_HEADER_LEN as u32);
        put_u64(&mut out, SEGMENT_LOG_ID_OFFSET, self.log_id);
        put_u64(&mut out, SEGMENT_ID_OFFSET, self.segment_id);
        put_u64(&mut out, SEGMENT_FIRST_LSN_OFFSET, self.first_lsn);
        put_u32(&mut out, SEGMENT_FLAGS_OFFSET, if self.recycled { SEGMENT_FLAG_RECYCLED } else { 0 });
        let crc = crc32fast::hash(&out[..SEGMENT_CRC_OFFSET]);
        put_u32(&mut out, SEGMENT_CRC_OFFSET, crc);
        out
    }

    /// Decodes and verifies a header. `Ok(None)` means the bytes are all
    /// zero: a pre-written segment that was never used.
    pub fn decode(bytes: &[u8]) -> Result<Option<SegmentHeader>, FrameError> {
        let bytes = bytes.get(..SEGMENT_HEADER_LEN).ok_or(FrameError::Truncated)?;
        if bytes.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        if bytes.get(SEGMENT_MAGIC_OFFSET..SEGMENT_VERSION_OFFSET) != Some(&SEGMENT_MAGIC[..]) {
            return Err(FrameError::BadMagic);
        }
        if le_u32(bytes, SEGMENT_CRC_OFFSET) != crc32fast::hash(bytes.get(..SEGMENT_CRC_OFFSET).unwrap_or_default()) {
            return Err(FrameError::BadChecksum);
        }
        let version = le_u32(bytes, SEGMENT_VERSION_OFFSET);
        if version != FORMAT_VERSION {
            return Err(FrameError::BadVersion(version));
        }
        if le_u32(bytes, SEGMENT_HEADER_LEN_OFFSET) as usize != SEGMENT_HEADER_LEN {
            return Err(FrameError::BadLength);
        }
        let flags = le_u32(bytes, SEGMENT_FLAGS_OFFSET);
        if flags & !SEGMENT_FLAG_RECYCLED != 0 {
            return Err(FrameError::BadFlags(flags));
        }
        Ok(Some(SegmentHeader {
            log_id: le_u64(bytes, SEGMENT_LOG_ID_OFFSET),
            segment_id: le_u64(bytes, SEGMENT_ID_OFFSET),
            first_lsn: le_u64(bytes, SEGMENT_FIRST_LSN_OFFSET),
            recycled: flags & SEGMENT_FLAG_RECYCLED != 0,
        }))
    }
}

/// The fixed part in front of every record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload length in bytes.
    pub len: u32,
    /// The owning log.
    pub log_id: u64,
    /// The segment the record was written into.
    pub segment_id: u64,
    /// The record's log sequence number.
    pub lsn: Lsn,
    /// The writer's durable LSN when this record was written: every record
    /// up to it had been synced to stable storage before this one was
    /// submitted. Recovery uses it to tell a torn tail from lost durable data.
    pub synced_lsn: Lsn,
}

impl RecordHeader {
    /// Total bytes the record occupies in the log, padding included.
    pub fn frame_len(&self) -> usize {
        frame_len(self.len as usize)
    }

    /// Encodes the header; `crc` must be [`record_crc`] of the encoded
    /// header tail and the payload, see [`encode_record_header`].
    fn encode_with_crc(&self, crc: u32) -> [u8; RECORD_HEADER_LEN] {
        let mut out = [0u8; RECORD_HEADER_LEN];
        put_u32(&mut out, RECORD_MAGIC_OFFSET, RECORD_MAGIC);
        put_u32(&mut out, RECORD_CRC_OFFSET, crc);
        put_u32(&mut out, RECORD_LEN_OFFSET, self.len);
        // The flags stay zero.
        put_u64(&mut out, RECORD_LOG_ID_OFFSET, self.log_id);
        put_u64(&mut out, RECORD_SEGMENT_ID_OFFSET, self.segment_id);
        put_u64(&mut out, RECORD_LSN_OFFSET, self.lsn);
        put_u64(&mut out, RECORD_SYNCED_LSN_OFFSET, self.synced_lsn);
        out
    }
}

/// Bytes a record with a payload of `payload_len` occupies, padding included.
pub fn frame_len(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len).next_multiple_of(RECORD_ALIGN)
}

/// Zero bytes that follow a payload of `payload_len` to reach alignment.
pub fn padding_len(payload_len: usize) -> usize {
    frame_len(payload_len) - RECORD_HEADER_LEN - payload_len
}

/// Encodes a record header with the checksum over header and payload.
///
/// The payload itself is not copied: the writer sends header, payload and
/// padding to the kernel as separate pieces of one vectored write.
pub fn encode_record_header(header: &RecordHeader, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let unsummed = header.encode_with_crc(0);
    let crc = record_crc(&unsummed[RECORD_CHECKSUMMED_FROM..], payload);
    header.encode_with_crc(crc)
}

fn record_crc(header_tail: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header_tail);
    hasher.update(payload);
    hasher.finalize()
}

/// What a record is expected to be, from its position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The log the segment belongs to.
    pub log_id: u64,
    /// The segment being read.
    pub segment_id: u64,
    /// The LSN the record must carry, or `None` to accept any LSN.
    pub lsn: Option<Lsn>,
}

/// Decodes and verifies the record that starts at `bytes[0]`; `bytes` must
/// hold the whole frame, padding included.
///
/// Returns the header and the payload range within `bytes`. A record whose
/// checksum holds but whose log, segment or LSN differ from `expected` is
/// [`FrameError::Misplaced`]: it is a real record, just not this one.
pub fn decode_record(bytes: &[u8], expected: Expected) -> Result<(RecordHeader, std::ops::Range<usize>), FrameError> {
    let head = bytes.get(..RECORD_HEADER_LEN).ok_or(FrameError::Truncated)?;
    if !has_record_magic(head) {
        return Err(FrameError::BadMagic);
    }
    let len = le_u32(head, RECORD_LEN_OFFSET);
    if len as usize > MAX_RECORD_LEN || le_u32(head, RECORD_FLAGS_OFFSET) != 0 {
        return Err(FrameError::BadLength);
    }
    let payload_range = RECORD_HEADER_LEN..RECORD_HEADER_LEN + len as usize;
    let payload = bytes.get(payload_range.clone()).ok_or(FrameError::Truncated)?;
    let summed = head.get(RECORD_CHECKSUMMED_FROM..).unwrap_or_default();
    if le_u32(head, RECORD_CRC_OFFSET) != record_crc(summed, payload) {
        return Err(FrameError::BadChecksum);
    }
    let header = RecordHeader {
        len,
        log_id: le_u64(head, RECORD_LOG_ID_OFFSET),
        segment_id: le_u64(head, RECORD_SEGMENT_ID_OFFSET),
        lsn: le_u64(head, RECORD_LSN_OFFSET),
        synced_lsn: le_u64(head, RECORD_SYNCED_LSN_OFFSET),
    };
    // Padding is not checksummed; require it to be zero so that no byte of
    // the log can change unnoticed.
    let frame_end = (RECORD_HEADER_LEN + len as usize).next_multiple_of(RECORD_ALIGN);
    let padding = bytes.get(payload_range.end..frame_end).ok_or(FrameError::Truncated)?;
    if padding.iter().any(|b| *b != 0) {
        return Err(FrameError::BadPadding);
    }
    let lsn_ok = expected.lsn.is_none_or(|lsn| lsn == header.lsn);
    if header.log_id != expected.log_id || header.segment_id != expected.segment_id || !lsn_ok {
        return Err(FrameError::Misplaced);
    }
    Ok((header, payload_range))
}

/// The payload length a record header claims (checked by
/// [`decode_record`]), to know how many bytes to read for the whole frame.
pub(crate) fn record_len(head: &[u8]) -> usize {
    le_u32(head, RECORD_LEN_OFFSET) as usize
}

/// Whether `bytes` start with a record's magic: a cheap first test before
/// [`decode_record`].
pub(crate) fn has_record_magic(bytes: &[u8]) -> bool {
    bytes.get(RECORD_MAGIC_OFFSET..RECORD_MAGIC_OFFSET + U32) == Some(&RECORD_MAGIC.to_le_bytes()[..])
}

/// The log id and segment id a record header names, unchecked (`None` for
/// fewer bytes than a header): lets a scan skip another segment's records
/// before computing their checksum.
pub(crate) fn record_owner(head: &[u8]) -> Option<(u64, u64)> {
    let head = head.get(..RECORD_HEADER_LEN)?;
    Some((le_u64(head, RECORD_LOG_ID_OFFSET), le_u64(head, RECORD_SEGMENT_ID_OFFSET)))
}

fn put_u32(out: &mut [u8], at: usize, value: u32) {
    if let Some(place) = out.get_mut(at..at + U32) {
        place.copy_from_slice(&value.to_le_bytes());
    }
}

fn put_u64(out: &mut [u8], at: usize, value: u64) {
    if let Some(place) = out.get_mut(at..at + U64) {
        place.copy_from_slice(&value.to_le_bytes());
    }
}

/// The little-endian `u32` at `at`; callers pass a header whose length was
/// checked, and a short slice reads as zeros (which fails every check).
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(found) = bytes.get(at..at + 4) {
        word.copy_from_slice(found);
    }
    u32::from_le_bytes(word)
}

/// The little-endian `u64` at `at`, like [`le_u32`].
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    if let Some(found) = bytes.get(at..at + 8) {
        word.copy_from_slice(found);
    }
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(header: &RecordHeader, payload: &[u8]) -> Vec<u8> {
        let mut out = encode_record_header(header, payload).to_vec();
        out.extend_from_slice(payload);
        out.resize(header.frame_len(), 0);
        out
    }

    fn expect(h: &RecordHeader) -> Expected {
        Expected { log_id: h.log_id, segment_id: h.segment_id, lsn: Some(h.lsn) }
    }

    #[test]
    fn zeroed_segment_header_is_unused_not_corrupt() {
        assert_eq!(SegmentHeader::decode(&[0u8; 64]), Ok(None));
    }

    #[test]
    fn segment_header_rejects_every_single_bit_flip() {
        for recycled in [false, true] {
            let header = SegmentHeader { log_id: 7, segment_id: 3, first_lsn: 1000, recycled };
            let bytes = header.encode();
            assert_eq!(SegmentHeader::decode(&bytes), Ok(Some(header)));
            for bit in 0..bytes.len() * 8 {
                let mut flipped = bytes;
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(SegmentHeader::decode(&flipped).is_err(), "bit {bit} flip accepted");
            }
        }
    }

    #[test]
    fn record_from_another_log_segment_or_lsn_is_misplaced() {
        let header = RecordHeader { len: 3, log_id: 1, segment_id: 2, lsn: 3, synced_lsn: 2 };
        let bytes = encode(&header, b"abc");
        for wrong in [
            Expected { log_id: 9, ..expect(&header) },
            Expected { segment_id: 9, ..expect(&header) },
            Expected { lsn: Some(9), ..expect(&header) },
        ] {
            assert_eq!(decode_record(&bytes, wrong), Err(FrameError::Misplaced));
        }
    }

    proptest! {
        #[test]
        fn record_round_trips(
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            log_id in any::<u64>(), segment_id in any::<u64>(), lsn in any::<u64>(), synced in any::<u64>(),
        ) {
            let header = RecordHeader { len: payload.len() as u32, log_id, segment_id, lsn, synced_lsn: synced };
            let bytes = encode(&header, &payload);
            prop_assert_eq!(bytes.len() % RECORD_ALIGN, 0);
            let (decoded, range) = decode_record(&bytes, expect(&header)).unwrap();
            prop_assert_eq!(decoded, header);
            prop_assert_eq!(&bytes[range], &payload[..]);
        }

        #[test]
        fn any_change_to_a_record_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 1..300),
            position in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let header = RecordHeader { len: payload.len() as u32, log_id: 5, segment_id: 6, lsn: 7, synced_lsn: 6 };
            let mut bytes = encode(&header, &payload);
            let covered = bytes.len();
            bytes[position.index(covered)] ^= xor;
            prop_assert!(decode_record(&bytes, expect(&header)).is_err());
        }

        #[test]
        fn any_truncation_of_a_record_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            cut in any::<prop::sample::Index>(),
        ) {
            let header = RecordHeader { len: payload.len() as u32, log_id: 5, segment_id: 6, lsn: 7, synced_lsn: 6 };
            let bytes = encode(&header, &payload);
            let keep = cut.index(header.frame_len());
            prop_assert!(decode_record(&bytes[..keep], expect(&header)).is_err());
        }

        #[test]
        fn decoding_junk_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_record(&junk, Expected { log_id: 0, segment_id: 0, lsn: None });
            let _ = SegmentHeader::decode(&junk);
        }
    }
}
