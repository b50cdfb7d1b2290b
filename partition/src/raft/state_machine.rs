//! A stand-in state machine: committed blob records applied to an
//! in-memory map, snapshots as a byte image of that map. It is what
//! openraft's storage suite needs beside the log store, and it is honest
//! (every entry applied in order, membership and applied id kept), but it
//! is not the replica's state machine: that is the partition's blob
//! store, which the next step puts behind this trait (apply into the
//! index, snapshots through export/install).
//!
//! Snapshot image (little endian): `u64` blob count, then per blob a `u32`
//! key length, the key, a `u64` value length, the value.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend};

use super::types::{LogId, TypeConfig};
use crate::blob::{self, BlobOp};

type SnapshotMeta = SnapshotMetaOf<TypeConfig>;
type Snapshot = SnapshotOf<TypeConfig, Bytes>;
type StoredMembership = StoredMembershipOf<TypeConfig>;

/// The stand-in state machine (see the module docs). Clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemStateMachine {
    state: Arc<Mutex<MemState>>,
}

#[derive(Debug, Default)]
struct MemState {
    applied: Option<LogId>,
    membership: StoredMembership,
    blobs: BTreeMap<Bytes, Bytes>,
    snapshot: Option<Snapshot>,
}

impl MemStateMachine {
    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value applied under `key`, if any.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.lock().blobs.get(key).cloned()
    }

    /// Every applied blob, in key order.
    pub fn blobs(&self) -> BTreeMap<Bytes, Bytes> {
        self.lock().blobs.clone()
    }

    /// Checks that `image` is a whole snapshot image (see the module
    /// docs), so that a received snapshot is refused before it reaches
    /// `install_snapshot`, whose failure would stop the Raft group.
    pub fn check_image(image: &Bytes) -> Result<(), io::Error> {
        decode_image(image).map(drop)
    }
}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

fn encode_image(blobs: &BTreeMap<Bytes, Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u64_le(blobs.len() as u64);
    for (key, value) in blobs {
        out.put_u32_le(key.len() as u32);
        out.put_slice(key);
        out.put_u64_le(value.len() as u64);
        out.put_slice(value);
    }
    out.freeze()
}

fn decode_image(image: &Bytes) -> Result<BTreeMap<Bytes, Bytes>, io::Error> {
    let mut at = 0usize;
    let mut take = |len: usize| -> Result<Bytes, io::Error> {
        let end = at
            .checked_add(len)
            .filter(|end| *end <= image.len())
            .ok_or_else(|| invalid("snapshot image is cut short".into()))?;
        let taken = image.slice(at..end);
        at = end;
        Ok(taken)
    };
    let number = |bytes: Bytes| -> u64 { bytes.iter().rev().fold(0u64, |n, byte| (n << 8) | u64::from(*byte)) };
    let count = number(take(8)?);
    let mut blobs = BTreeMap::new();
    for _ in 0..count {
        let key_len = usize::try_from(number(take(4)?)).map_err(|_| invalid("key length".into()))?;
        let key = take(key_len)?;
        let value_len = usize::try_from(number(take(8)?)).map_err(|_| invalid("value length".into()))?;
        blobs.insert(key, take(value_len)?);
    }
    if take(1).is_ok() {
        return Err(invalid("bytes after the snapshot image".into()));
    }
    Ok(blobs)
}

impl RaftSnapshotBuilder<TypeConfig> for MemStateMachine {
    type SnapshotData = Bytes;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let mut state = self.lock();
        let meta = SnapshotMeta { last_log_id: state.applied, last_membership: state.membership.clone() };
        let snapshot = Snapshot { meta, snapshot: encode_image(&state.blobs) };
        state.snapshot = Some(snapshot.clone());
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotData = Bytes;
    type SnapshotBuilder = MemStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let state = self.lock();
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            {
                let mut state = self.lock();
                match &entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(command) => match blob::decode(&command.0) {
                        Some(BlobOp::Put { key, value_offset, original_lsn: None }) => {
                            let value =
                                command.0.get(value_offset..).map(|v| command.0.slice_ref(v)).unwrap_or_default();
                            state.blobs.insert(key, value);
                        }
                        Some(BlobOp::Delete { key }) => {
                            state.blobs.remove(&key);
                        }
                        _ => return Err(invalid(format!("entry {} is not a blob put or delete", entry.log_id))),
                    },
                    EntryPayload::Membership(membership) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                    }
                }
                state.applied = Some(entry.log_id);
            }
            if let Some(responder) = responder {
                responder.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> MemStateMachine {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Bytes) -> Result<(), io::Error> {
        let blobs = decode_image(&snapshot)?;
        let mut state = self.lock();
        state.blobs = blobs;
        state.applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.snapshot = Some(Snapshot { meta: meta.clone(), snapshot });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.lock().snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_round_trips_and_a_cut_one_is_refused() {
        let blobs = BTreeMap::from([
            (Bytes::from_static(b"a"), Bytes::from_static(b"1")),
            (Bytes::from_static(b"bb"), Bytes::new()),
        ]);
        let image = encode_image(&blobs);
        assert_eq!(decode_image(&image).unwrap(), blobs);
        for cut in 0..image.len() {
            assert!(decode_image(&image.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut longer = BytesMut::from(&image[..]);
        longer.put_u8(0);
        assert!(decode_image(&longer.freeze()).is_err());
    }
}
