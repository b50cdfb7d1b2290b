//! The in-memory index: key -> where its latest value lives.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use datanode_wal::{Lsn, RecordPos, Wal};

use crate::blob::{self, BlobOp};
use crate::state::Fault;

/// Store id of the partition's log; compacted stores use their generation.
pub(crate) const LOG_STORE: u32 = 0;

/// Largest payload read back per `read_from` call during replay.
const REPLAY_CHUNK: usize = 8 << 20;

/// Where a live blob's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlobLoc {
    /// [`LOG_STORE`] or a compacted store's generation.
    pub store: u32,
    /// The record within that store.
    pub pos: RecordPos,
    /// Start of the value within the record payload.
    pub value_offset: u32,
    /// LSN of the put in the partition's log (kept through compaction).
    pub lsn: Lsn,
}

impl BlobLoc {
    pub fn value_len(&self) -> u64 {
        u64::from(self.pos.len.saturating_sub(self.value_offset))
    }

    /// Bytes the record takes in its store.
    pub fn record_bytes(&self) -> u64 {
        datanode_wal::format::frame_len(self.pos.len as usize) as u64
    }
}

/// An index entry. Deletes are remembered (with their LSN) so that a put
/// acknowledged out of order can never resurrect a deleted key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Entry {
    Live(BlobLoc),
    Deleted(Lsn),
}

impl Entry {
    fn lsn(&self) -> Lsn {
        match self {
            Entry::Live(loc) => loc.lsn,
            Entry::Deleted(lsn) => *lsn,
        }
    }
}

/// Keys up to this many bytes live inside the index entry, with no
/// allocation of their own.
const INLINE_KEY: usize = 22;

/// A key as the index holds it: short keys inline (the common case: no
/// heap allocation, no reference count), longer ones in a box. 24 bytes,
/// where a `Bytes` handle is 32 plus its allocation.
#[derive(Clone)]
pub(crate) enum Key {
    Inline { len: u8, bytes: [u8; INLINE_KEY] },
    Boxed(Box<[u8]>),
}

impl Key {
    pub fn new(key: &[u8]) -> Key {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE_KEY => {
                let mut bytes = [0; INLINE_KEY];
                bytes.iter_mut().zip(key).for_each(|(slot, byte)| *slot = *byte);
                Key::Inline { len, bytes }
            }
            _ => Key::Boxed(key.into()),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or(bytes),
            Key::Boxed(bytes) => bytes,
        }
    }

    /// A `Bytes` copy, for callers outside the index.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    // The order of the bytes, as `Borrow<[u8]>` requires.
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", Bytes::copy_from_slice(self.as_bytes()))
    }
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    pub entries: BTreeMap<Key, Entry>,
    pub blobs: u64,
    pub live_bytes: u64,
    /// Bytes the live blobs' records take in their stores (frames: header,
    /// key, value, padding); what compaction would keep.
    pub live_record_bytes: u64,
}

impl Index {
    /// Applies an entry unless a newer one for the key is already there.
    pub fn apply(&mut self, key: &[u8], entry: Entry) {
        if let Some(old) = self.entries.get(key) {
            if old.lsn() >= entry.lsn() {
                return;
            }
            if let Entry::Live(loc) = old {
                self.blobs -= 1;
                self.live_bytes -= loc.value_len();
                self.live_record_bytes -= loc.record_bytes();
            }
        }
        if let Entry::Live(loc) = &entry {
            self.blobs += 1;
            self.live_bytes += loc.value_len();
            self.live_record_bytes += loc.record_bytes();
        }
        self.entries.insert(Key::new(key), entry);
    }

    /// Forgets `key` altogether (no tombstone: for a store whose writes
    /// are applied in order, where no older write can arrive later).
    pub fn remove(&mut self, key: &[u8]) {
        if let Some(Entry::Live(loc)) = self.entries.remove(key) {
            self.blobs -= 1;
            self.live_bytes -= loc.value_len();
            self.live_record_bytes -= loc.record_bytes();
        }
    }

    /// Points `key` at `new` if it still points at `old` (the same value,
    /// moved by compaction). Returns whether it did.
    pub fn relocate(&mut self, key: &[u8], old: BlobLoc, new: BlobLoc) -> bool {
        match self.entries.get_mut(key) {
            Some(Entry::Live(current)) if *current == old => {
                *current = new;
                self.live_record_bytes = self.live_record_bytes - old.record_bytes() + new.record_bytes();
                true
            }
            _ => false,
        }
    }

    /// Up to `limit` live keys starting with `prefix`, in order, after
    /// `after` when given; and the key to continue after when there are
    /// more.
    pub fn list(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> (Vec<Bytes>, Option<Bytes>) {
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let mut keys = Vec::new();
        let live = self
            .entries
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(|(key, _)| key.as_bytes().starts_with(prefix))
            .filter(|(_, entry)| matches!(entry, Entry::Live(_)));
        for (key, _) in live {
            if keys.len() == limit {
                let next = keys.last().cloned();
                return (keys, next);
            }
            keys.push(key.to_bytes());
        }
        (keys, None)
    }

    /// Live entries, in key order.
    pub fn live(&self) -> impl Iterator<Item = (&Key, &BlobLoc)> {
        self.entries.iter().filter_map(|(key, entry)| match entry {
            Entry::Live(loc) => Some((key, loc)),
            Entry::Deleted(_) => None,
        })
    }

    /// Applies every record of `wal` after LSN `skip_through` (0 for all),
    /// as store `store`.
    pub fn replay(&mut self, wal: &Wal, store: u32, skip_through: Lsn) -> Result<(), Fault> {
        let mut lsn = wal.first_lsn().max(skip_through + 1);
        while lsn <= wal.last_lsn() {
            let records = wal.read_from(lsn, REPLAY_CHUNK).map_err(|e| Fault::from_wal(&e))?;
            for record in records {
                // Keys are copied out (`Key::new`): a slice would keep the
                // whole read buffer (the log's bytes) alive with the key.
                match blob::decode(&record.data) {
                    Some(BlobOp::Put { key, value_offset, original_lsn }) => {
                        let lsn = original_lsn.unwrap_or(record.lsn);
                        let loc = BlobLoc { store, pos: record.pos, value_offset: value_offset as u32, lsn };
                        self.apply(&key, Entry::Live(loc));
                    }
                    Some(BlobOp::Delete { key }) => self.apply(&key, Entry::Deleted(record.lsn)),
                    None => {
                        return Err(Fault::corruption(
                            "replay",
                            format!("record at LSN {} is not a blob operation", record.lsn),
                        ));
                    }
                }
                lsn = record.lsn + 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_key_is_no_bigger_than_three_words() {
        assert!(std::mem::size_of::<Key>() <= 24, "{}", std::mem::size_of::<Key>());
    }

    proptest! {
        /// Inline or boxed, a key keeps its bytes and sorts like them.
        #[test]
        fn keys_keep_their_bytes_and_order(a in proptest::collection::vec(any::<u8>(), 0..40), b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let (ka, kb) = (Key::new(&a), Key::new(&b));
            prop_assert_eq!(ka.as_bytes(), &a[..]);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
        }
    }
}
