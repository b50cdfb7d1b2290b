//! The Raft type configuration of a replica, and the one mapping between
//! Raft log indexes and WAL LSNs.

use std::fmt;

use bytes::Bytes;
use datanode_wal::{Lsn, RecordPos};

openraft::declare_raft_types!(
    /// The types of a replicated partition's Raft group: node ids are
    /// `u64`, a node carries its address ([`openraft::BasicNode`]), an
    /// entry's application data is a [`Command`].
    pub TypeConfig:
        D = Command,
        R = (),
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A log id of this configuration (term, leader node, index).
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote of this configuration.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// A log entry of this configuration.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A membership of this configuration.
pub type Membership = openraft::Membership<u64, openraft::BasicNode>;

/// The application data of one Raft entry: the bytes of one blob record
/// (`blob::encode_put` / `blob::encode_delete`), opaque to Raft.
///
/// A command read back from the log also knows where its record is, so
/// that applying a put indexes the value where it already lies instead of
/// writing it again. That position is not part of the command's value: it
/// is never encoded and two commands with the same bytes are equal. On
/// the wire (serde) a command is one byte string (`serialize_bytes`: a
/// binary format writes a length and the bytes, never a list of numbers).
#[derive(Clone)]
pub struct Command {
    bytes: Bytes,
    record: Option<RecordPos>,
}

impl Command {
    /// A command of `bytes` (a blob record), for proposing.
    pub fn new(bytes: Bytes) -> Command {
        Command { bytes, record: None }
    }

    /// The blob record.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Where the entry's WAL record is, when the command was read back
    /// from the log.
    pub(crate) fn record(&self) -> Option<RecordPos> {
        self.record
    }

    pub(crate) fn set_record(&mut self, record: RecordPos) {
        self.record = Some(record);
    }
}

impl PartialEq for Command {
    fn eq(&self, other: &Command) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for Command {}

impl serde::Serialize for Command {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.bytes)
    }
}

impl<'de> serde::Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Command, D::Error> {
        deserializer.deserialize_byte_buf(CommandVisitor)
    }
}

struct CommandVisitor;

impl<'de> serde::de::Visitor<'de> for CommandVisitor {
    type Value = Command;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the bytes of a blob record")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Command, E> {
        Ok(Command::new(Bytes::copy_from_slice(bytes)))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Command, E> {
        Ok(Command::new(Bytes::from(bytes)))
    }

    // Self-describing formats without a byte string type (JSON) give a
    // sequence of numbers.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Command, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(Command::new(Bytes::from(bytes)))
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command({} bytes)", self.bytes.len())
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command of {} bytes", self.bytes.len())
    }
}

/// The WAL LSN of the entry at Raft `index`. openraft numbers its first
/// entry 0 and a WAL's LSN 0 means "nothing", so the two are one apart,
/// everywhere and always: the entry at index `i` is the record at LSN
/// `i + 1`. `None` only for `u64::MAX`, an index no log reaches.
pub fn lsn_of(index: u64) -> Option<Lsn> {
    index.checked_add(1)
}

/// The Raft index of the record at `lsn` (LSNs start at 1).
pub fn index_of(lsn: Lsn) -> u64 {
    lsn.saturating_sub(1)
}
