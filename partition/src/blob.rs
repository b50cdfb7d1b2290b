//! What a partition writes into its log: one WAL record per put or delete.
//!
//! ```text
//! byte 0      kind: 1 = put, 2 = delete, 3 = compacted put
//! bytes 1..9  (compacted put only) the LSN of the original put, u64 LE
//! next 2      key length, u16 little-endian (1..=1024)
//! key         the key bytes
//! value       the rest of the record (puts only)
//! ```
//!
//! Puts and deletes go into the partition's log; compacted puts only into
//! its compacted store, where they keep the LSN they had in the log.
//!
//! The WAL record around it carries the checksum, the partition id and the
//! LSN; this layer adds no second checksum.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest key a blob may have.
pub const MAX_KEY_LEN: usize = 1024;

const PUT: u8 = 1;
const DELETE: u8 = 2;
const COMPACTED_PUT: u8 = 3;

// The layout, field by field; each offset follows from the one before it.
// Nothing outside this file computes them.
const KIND_OFFSET: usize = 0;
const KIND_LEN: usize = size_of::<u8>();
/// Compacted puts only: the original put's LSN follows the kind.
const ORIGINAL_LSN_OFFSET: usize = KIND_OFFSET + KIND_LEN;
const ORIGINAL_LSN_LEN: usize = size_of::<u64>();
const KEY_LEN_LEN: usize = size_of::<u16>();

/// Where the key length of a record of `kind` is.
const fn key_len_offset(kind: u8) -> usize {
    if kind == COMPACTED_PUT { ORIGINAL_LSN_OFFSET + ORIGINAL_LSN_LEN } else { KIND_OFFSET + KIND_LEN }
}

/// Where the key of a record of `kind` starts.
const fn key_offset(kind: u8) -> usize {
    key_len_offset(kind) + KEY_LEN_LEN
}

/// Where the value starts in the record of a put of a `key_len`-byte key.
pub const fn put_value_offset(key_len: usize) -> usize {
    key_offset(PUT) + key_len
}

/// Where the value starts in the record of a compacted put of a
/// `key_len`-byte key.
pub const fn compacted_put_value_offset(key_len: usize) -> usize {
    key_offset(COMPACTED_PUT) + key_len
}

/// A decoded log entry of the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobOp {
    /// `key` now holds the bytes at `value_offset..` of the record.
    Put {
        /// The key.
        key: Bytes,
        /// Where the value starts within the record payload.
        value_offset: usize,
        /// For a compacted put, the LSN of the original put in the log.
        original_lsn: Option<u64>,
    },
    /// `key` is deleted.
    Delete {
        /// The key.
        key: Bytes,
    },
}

/// Why a key is refused.
pub fn check_key(key: &[u8]) -> Result<(), String> {
    match key.len() {
        0 => Err("key is empty".into()),
        len if len > MAX_KEY_LEN => Err(format!("key of {len} bytes exceeds {MAX_KEY_LEN}")),
        _ => Ok(()),
    }
}

/// The record of a put: header, key and value in one buffer.
pub fn encode_put(key: &[u8], value: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(put_value_offset(key.len()) + value.len());
    out.put_u8(PUT);
    out.put_u16_le(key.len() as u16);
    out.put_slice(key);
    out.put_slice(value);
    out.freeze()
}

/// The record of a compacted put: a put that keeps its original LSN.
pub fn encode_compacted_put(original_lsn: u64, key: &[u8], value: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(compacted_put_value_offset(key.len()) + value.len());
    out.put_u8(COMPACTED_PUT);
    out.put_u64_le(original_lsn);
    out.put_u16_le(key.len() as u16);
    out.put_slice(key);
    out.put_slice(value);
    out.freeze()
}

/// The record of a delete.
pub fn encode_delete(key: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(key_offset(DELETE) + key.len());
    out.put_u8(DELETE);
    out.put_u16_le(key.len() as u16);
    out.put_slice(key);
    out.freeze()
}

/// Decodes a record; `None` for bytes this layer never writes.
pub fn decode(record: &Bytes) -> Option<BlobOp> {
    let kind = *record.get(KIND_OFFSET)?;
    let original_lsn = match kind {
        COMPACTED_PUT => {
            let bytes = record.get(ORIGINAL_LSN_OFFSET..ORIGINAL_LSN_OFFSET + ORIGINAL_LSN_LEN)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        }
        _ => None,
    };
    let at = key_len_offset(kind);
    let len = u16::from_le_bytes(record.get(at..at + KEY_LEN_LEN)?.try_into().ok()?) as usize;
    let key_start = key_offset(kind);
    if len == 0 || len > MAX_KEY_LEN || record.len() < key_start + len {
        return None;
    }
    let key = record.slice(key_start..key_start + len);
    let value_offset = key_start + len;
    match kind {
        PUT | COMPACTED_PUT => Some(BlobOp::Put { key, value_offset, original_lsn }),
        DELETE if record.len() == value_offset => Some(BlobOp::Delete { key }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn puts_and_deletes_round_trip(
            key in proptest::collection::vec(any::<u8>(), 1..=MAX_KEY_LEN),
            value in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let put = encode_put(&key, &value);
            match decode(&put) {
                Some(BlobOp::Put { key: k, value_offset, original_lsn: None }) => {
                    prop_assert_eq!(&k[..], &key[..]);
                    prop_assert_eq!(&put[value_offset..], &value[..]);
                    prop_assert_eq!(value_offset, put_value_offset(key.len()));
                }
                other => prop_assert!(false, "{other:?}"),
            }
            let compacted = encode_compacted_put(77, &key, &value);
            match decode(&compacted) {
                Some(BlobOp::Put { key: k, value_offset, original_lsn: Some(77) }) => {
                    prop_assert_eq!(&k[..], &key[..]);
                    prop_assert_eq!(&compacted[value_offset..], &value[..]);
                    prop_assert_eq!(value_offset, compacted_put_value_offset(key.len()));
                }
                other => prop_assert!(false, "{other:?}"),
            }
            prop_assert_eq!(decode(&encode_delete(&key)), Some(BlobOp::Delete { key: Bytes::from(key) }));
        }

        #[test]
        fn junk_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&Bytes::from(junk));
        }
    }

    #[test]
    fn keys_are_one_to_1024_bytes() {
        assert!(check_key(b"").is_err());
        assert!(check_key(&[0u8; 1024]).is_ok());
        assert!(check_key(&[0u8; 1025]).is_err());
    }
}
