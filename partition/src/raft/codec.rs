//! The bytes of one Raft entry inside its WAL record. The record's LSN is
//! the entry's index plus one ([`super::types::lsn_of`]); the record
//! repeats the index so that a record read back identifies itself.
//!
//! ```text
//! version  u8    ENTRY_VERSION
//! term     u64   little endian, as every integer below
//! leader   u64   node id of the leader that proposed it
//! index    u64
//! kind     u8    KIND_BLANK | KIND_NORMAL | KIND_MEMBERSHIP
//! body     blank: nothing; normal: the command's bytes (to the end);
//!          membership: u32 config count, per config a u32 voter count
//!          and the voter ids (u64); u32 node count, per node its id
//!          (u64), u32 address length and the address (UTF-8)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, Bytes, BytesMut};
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::{BasicNode, EntryPayload};

use super::types::{Command, Entry, LogId, Membership};

/// Version byte of the entry layout.
const ENTRY_VERSION: u8 = 1;
const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;
/// version + term + leader + index + kind.
pub(crate) const ENTRY_HEADER_LEN: usize = 1 + 8 + 8 + 8 + 1;

/// Encodes `entry` as the payload of its WAL record.
pub(crate) fn encode_entry(entry: &Entry) -> Bytes {
    let mut out = BytesMut::with_capacity(ENTRY_HEADER_LEN + 64);
    out.put_u8(ENTRY_VERSION);
    out.put_u64_le(entry.log_id.leader_id.term);
    out.put_u64_le(entry.log_id.leader_id.node_id);
    out.put_u64_le(entry.log_id.index);
    match &entry.payload {
        EntryPayload::Blank => out.put_u8(KIND_BLANK),
        EntryPayload::Normal(command) => {
            out.put_u8(KIND_NORMAL);
            out.put_slice(command.bytes());
        }
        EntryPayload::Membership(membership) => {
            out.put_u8(KIND_MEMBERSHIP);
            encode_membership(membership, &mut out);
        }
    }
    out.freeze()
}

fn encode_membership(membership: &Membership, out: &mut BytesMut) {
    let configs = membership.get_joint_config();
    out.put_u32_le(configs.len() as u32);
    for config in configs {
        out.put_u32_le(config.len() as u32);
        for id in config {
            out.put_u64_le(*id);
        }
    }
    let nodes: Vec<_> = membership.nodes().collect();
    out.put_u32_le(nodes.len() as u32);
    for (id, node) in nodes {
        out.put_u64_le(*id);
        out.put_u32_le(node.addr.len() as u32);
        out.put_slice(node.addr.as_bytes());
    }
}

/// A membership alone, in the layout of a membership entry's body (for
/// the `SNAPSHOT` file).
pub(crate) fn encode_membership_body(membership: &Membership) -> Bytes {
    let mut out = BytesMut::new();
    encode_membership(membership, &mut out);
    out.freeze()
}

/// Decodes what [`encode_membership_body`] wrote.
pub(crate) fn decode_membership_body(bytes: &Bytes) -> Result<Membership, String> {
    let mut reader = Reader { bytes, at: 0 };
    let membership = decode_membership(&mut reader)?;
    if !reader.is_done() {
        return Err("bytes after the membership".into());
    }
    Ok(membership)
}

/// Decodes a record's payload; `Err` names what is wrong with bytes this
/// layer did not write.
pub(crate) fn decode_entry(record: &Bytes) -> Result<Entry, String> {
    let mut reader = Reader { bytes: record, at: 0 };
    let version = reader.u8()?;
    if version != ENTRY_VERSION {
        return Err(format!("unknown entry version {version}"));
    }
    let term = reader.u64()?;
    let node_id = reader.u64()?;
    let index = reader.u64()?;
    let log_id = LogId::new(LeaderId { term, node_id }, index);
    let payload = match reader.u8()? {
        KIND_BLANK => EntryPayload::Blank,
        KIND_NORMAL => EntryPayload::Normal(Command::new(reader.rest())),
        KIND_MEMBERSHIP => EntryPayload::Membership(decode_membership(&mut reader)?),
        kind => return Err(format!("unknown entry kind {kind}")),
    };
    if !reader.is_done() {
        return Err("bytes after the entry".into());
    }
    Ok(Entry::new(log_id, payload))
}

fn decode_membership(reader: &mut Reader<'_>) -> Result<Membership, String> {
    let config_count = reader.u32()?;
    let mut configs = Vec::new();
    for _ in 0..config_count {
        let voters = reader.u32()?;
        let mut config = BTreeSet::new();
        for _ in 0..voters {
            config.insert(reader.u64()?);
        }
        configs.push(config);
    }
    let node_count = reader.u32()?;
    let mut nodes = BTreeMap::new();
    for _ in 0..node_count {
        let id = reader.u64()?;
        let len = reader.u32()? as usize;
        let addr = String::from_utf8(reader.take(len)?.to_vec()).map_err(|_| "node address is not UTF-8")?;
        nodes.insert(id, BasicNode { addr });
    }
    Membership::new(configs, nodes).map_err(|error| format!("invalid membership: {error}"))
}

/// Reads integers off a record without indexing: every short read is an
/// error, never a panic.
struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(len).ok_or("length overflows")?;
        let taken = self.bytes.get(self.at..end).ok_or("entry is cut short")?;
        self.at = end;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, String> {
        self.take(1)?.first().copied().ok_or_else(|| "entry is cut short".into())
    }

    fn u32(&mut self) -> Result<u32, String> {
        let bytes: [u8; 4] = self.take(4)?.try_into().map_err(|_| "entry is cut short")?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let bytes: [u8; 8] = self.take(8)?.try_into().map_err(|_| "entry is cut short")?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn rest(&mut self) -> Bytes {
        let rest = self.bytes.slice(self.at.min(self.bytes.len())..);
        self.at = self.bytes.len();
        rest
    }

    fn is_done(&self) -> bool {
        self.at == self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entries() -> Vec<Entry> {
        let log_id = |term, node_id, index| LogId::new(LeaderId { term, node_id }, index);
        let voters = BTreeSet::from([1, 2, 3]);
        let nodes = BTreeMap::from([
            (1, BasicNode::new("a:1")),
            (2, BasicNode::new("b:2")),
            (3, BasicNode::new("c:3")),
            (4, BasicNode::new("learner")),
        ]);
        vec![
            Entry::new_blank(log_id(0, 0, 0)),
            Entry::new(log_id(3, 2, 7), EntryPayload::Normal(Command::new(crate::blob::encode_put(b"k", b"value")))),
            Entry::new(log_id(u64::MAX, u64::MAX, u64::MAX - 1), EntryPayload::Normal(Command::new(Bytes::new()))),
            Entry::new(
                log_id(5, 1, 9),
                EntryPayload::Membership(Membership::new(vec![voters.clone(), BTreeSet::from([2, 3])], nodes).unwrap()),
            ),
        ]
    }

    #[test]
    fn every_kind_of_entry_round_trips() {
        for entry in entries() {
            let decoded = decode_entry(&encode_entry(&entry)).unwrap();
            assert_eq!(decoded.log_id, entry.log_id);
            assert_eq!(decoded.payload, entry.payload);
        }
    }

    #[test]
    fn every_cut_of_an_entry_is_refused() {
        for entry in entries() {
            let bytes = encode_entry(&entry);
            // A normal entry's command runs to the end: cutting it inside the
            // command is a shorter command, which the WAL's checksum (not
            // this layout) rules out. Every cut inside the header fails.
            let last_cut = match entry.payload {
                EntryPayload::Normal(_) => ENTRY_HEADER_LEN,
                _ => bytes.len(),
            };
            for cut in 0..last_cut {
                assert!(decode_entry(&bytes.slice(..cut)).is_err(), "cut at {cut} of {:?}", entry.payload);
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_entry(&Bytes::from(bytes));
        }

        #[test]
        fn arbitrary_commands_round_trip(term: u64, node: u64, index: u64, command in proptest::collection::vec(any::<u8>(), 0..300)) {
            let entry = Entry::new(LogId::new(LeaderId { term, node_id: node }, index), EntryPayload::Normal(Command::new(Bytes::from(command))));
            let decoded = decode_entry(&encode_entry(&entry)).unwrap();
            prop_assert_eq!(decoded.log_id, entry.log_id);
            prop_assert_eq!(decoded.payload, entry.payload);
        }
    }
}
