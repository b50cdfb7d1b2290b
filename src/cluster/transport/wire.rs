//! The peer protocol, one place for its bytes.
//!
//! A request is an HTTP/2 `POST /raft/v1/<group>/<target>/<rpc>` whose
//! `raft-from` header names the sending replica; `<group>` and `<target>`
//! are decimal `u64`s, `<rpc>` one of [`Rpc`]'s names. The body of every
//! RPC but the snapshot is the openraft request encoded with postcard; a
//! `200` answer carries the openraft response the same way
//! (`application/octet-stream`).
//!
//! The snapshot body is a stream: a head (`u32` little endian length, then
//! postcard of `(vote, snapshot meta)`, at most [`MAX_SNAPSHOT_HEAD`] bytes)
//! and then the state machine's snapshot bytes up to the end of the body.
//! A body that ends with an HTTP/2 reset is broken off, never a snapshot.
//!
//! Every refusal is a status with a JSON body `{"error": <code>, "message":
//! <text>}` ([`ErrorBody`]); the codes are [`Refusal`]'s.

use bytes::{BufMut, Bytes, BytesMut};
use openraft::network::RPCTypes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::GroupId;

/// Where every peer path starts.
pub const PATH_PREFIX: &str = "/raft/v1/";
/// The header naming the sending replica (its node id in the group).
pub const SENDER_HEADER: &str = "raft-from";
/// The longest snapshot head accepted (vote and membership).
pub const MAX_SNAPSHOT_HEAD: usize = 1 << 20;
/// Content type of an encoded request or response.
pub const BINARY: &str = "application/octet-stream";

/// HTTP/2 receive window of one stream of a peer connection, on both ends:
/// what a peer may send on it ahead of the reader.
///
/// Fixed and large, never h2's adaptive windows (which start at 64 KiB):
/// many streams answering at once through a small connection window are
/// cut into small DATA frames, and h2 closes a connection (GOAWAY
/// `ENHANCE_YOUR_CALM`, "too_many_data_frames") once the small frames it
/// holds exceed half its window. That closed, under load, the connection
/// every group of a node pair shares.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// HTTP/2 receive window of a whole peer connection, on both ends.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// The RPCs of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `append_entries` (heartbeats too).
    Append,
    /// `vote`.
    Vote,
    /// `pre_vote` (sent only when a group enables pre-vote).
    PreVote,
    /// A full snapshot, streamed.
    Snapshot,
    /// `transfer_leader`.
    TransferLeader,
}

impl Rpc {
    /// Every RPC, for metrics that exist at 0.
    pub const ALL: [Rpc; 5] = [Rpc::Append, Rpc::Vote, Rpc::PreVote, Rpc::Snapshot, Rpc::TransferLeader];

    /// The name in paths and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Append => "append",
            Rpc::Vote => "vote",
            Rpc::PreVote => "pre_vote",
            Rpc::Snapshot => "snapshot",
            Rpc::TransferLeader => "transfer_leader",
        }
    }

    fn from_name(name: &str) -> Option<Rpc> {
        Rpc::ALL.into_iter().find(|rpc| rpc.name() == name)
    }

    /// The kind openraft's `Timeout` error names.
    pub fn openraft_type(self) -> RPCTypes {
        match self {
            Rpc::Append => RPCTypes::AppendEntries,
            Rpc::Vote | Rpc::PreVote => RPCTypes::Vote,
            Rpc::Snapshot => RPCTypes::InstallSnapshot,
            Rpc::TransferLeader => RPCTypes::TransferLeader,
        }
    }
}

/// The path of `rpc` to replica `target` of `group`.
pub fn path(group: GroupId, target: u64, rpc: Rpc) -> String {
    format!("{PATH_PREFIX}{group}/{target}/{}", rpc.name())
}

/// The group, target replica and RPC a path names.
pub fn parse_path(path: &str) -> Result<(GroupId, u64, Rpc), String> {
    let rest = path.strip_prefix(PATH_PREFIX).ok_or_else(|| format!("no peer path: {path:?}"))?;
    let mut parts = rest.split('/');
    let (Some(group), Some(target), Some(rpc), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(format!("a peer path is {PATH_PREFIX}<group>/<target>/<rpc>, not {path:?}"));
    };
    let number = |what: &str, text: &str| text.parse::<u64>().map_err(|_| format!("{what} {text:?} is not a u64"));
    let rpc = Rpc::from_name(rpc).ok_or_else(|| format!("unknown rpc {rpc:?}"))?;
    Ok((number("group", group)?, number("target", target)?, rpc))
}

/// Encodes a request or response.
pub fn encode<T: Serialize>(value: &T) -> Result<Bytes, postcard::Error> {
    postcard::to_allocvec(value).map(Bytes::from)
}

/// Decodes a request or response; bytes left over are an error too.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!("{} bytes after the message", rest.len())),
        Err(error) => Err(error.to_string()),
    }
}

/// The head of a snapshot body: `head` framed by its length.
pub fn snapshot_head<T: Serialize>(head: &T) -> Result<Bytes, postcard::Error> {
    let encoded = postcard::to_allocvec(head)?;
    let mut framed = BytesMut::with_capacity(4 + encoded.len());
    framed.put_u32_le(encoded.len() as u32);
    framed.put_slice(&encoded);
    Ok(framed.freeze())
}

/// Why a peer request is refused; the `error` code of its JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The bytes are not a request of this protocol (400).
    BadRequest,
    /// No such path or method (404).
    NotFound,
    /// This node hosts no replica of the group (404).
    UnknownGroup,
    /// This node hosts the group but not that replica (404).
    UnknownReplica,
    /// The body is larger than the server takes for this RPC (413).
    PayloadTooLarge,
    /// The replica's Raft has stopped (503).
    RaftStopped,
    /// A snapshot could not be received or installed (500).
    SnapshotFailed,
    /// The sender named in the request is not hosted on the node whose
    /// certificate the connection was admitted with (403).
    WrongNode,
}

impl Refusal {
    /// The code in the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::NotFound => "not_found",
            Refusal::UnknownGroup => "unknown_group",
            Refusal::UnknownReplica => "unknown_replica",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::RaftStopped => "raft_stopped",
            Refusal::SnapshotFailed => "snapshot_failed",
            Refusal::WrongNode => "wrong_node",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::NotFound | Refusal::UnknownGroup | Refusal::UnknownReplica => 404,
            Refusal::PayloadTooLarge => 413,
            Refusal::RaftStopped => 503,
            Refusal::SnapshotFailed => 500,
            Refusal::WrongNode => 403,
        }
    }
}

/// The JSON body of a refusal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// A [`Refusal`] code.
    pub error: String,
    /// What was wrong, for a person.
    pub message: String,
}

impl ErrorBody {
    /// The body of `refusal`.
    pub fn new(refusal: Refusal, message: impl Into<String>) -> ErrorBody {
        ErrorBody { error: refusal.code().to_string(), message: message.into() }
    }

    /// As JSON bytes.
    pub fn to_json(&self) -> Bytes {
        // Two strings always serialize.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use datanode_partition::raft::{Command, Entry, LogId, TypeConfig};
    use openraft::EntryPayload;
    use openraft::entry::RaftEntry;
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::raft::AppendEntriesRequest;
    use proptest::prelude::*;

    use super::*;

    fn append(entries: Vec<Vec<u8>>, term: u64) -> AppendEntriesRequest<TypeConfig> {
        let log_id = |index| LogId::new(LeaderId { term, node_id: 2 }, index);
        AppendEntriesRequest {
            vote: openraft::impls::Vote { leader_id: LeaderId { term, node_id: 2 }, committed: true },
            prev_log_id: Some(log_id(3)),
            entries: entries
                .into_iter()
                .enumerate()
                .map(|(i, bytes)| {
                    Entry::new(log_id(4 + i as u64), EntryPayload::Normal(Command::new(Bytes::from(bytes))))
                })
                .collect(),
            leader_commit: Some(log_id(3)),
        }
    }

    proptest! {
        #[test]
        fn any_path_parses_or_is_refused(text in ".{0,80}", group: u64, target: u64) {
            let _ = parse_path(&text);
            let _ = parse_path(&format!("{PATH_PREFIX}{text}"));
            for rpc in Rpc::ALL {
                prop_assert_eq!(parse_path(&path(group, target, rpc)).unwrap(), (group, target, rpc));
            }
        }

        #[test]
        fn an_append_round_trips_and_any_bytes_decode_or_are_refused(
            entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            term: u64,
            junk in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let request = append(entries, term);
            let bytes = encode(&request).unwrap();
            let back: AppendEntriesRequest<TypeConfig> = decode(&bytes).unwrap();
            prop_assert_eq!(format!("{back:?}"), format!("{request:?}"));
            let commands = |r: &AppendEntriesRequest<TypeConfig>| -> Vec<Bytes> {
                r.entries.iter().filter_map(|e| match &e.payload { EntryPayload::Normal(c) => Some(c.bytes().clone()), _ => None }).collect()
            };
            prop_assert_eq!(commands(&back), commands(&request));
            let _ = decode::<AppendEntriesRequest<TypeConfig>>(&junk);
            let mut cut = bytes.to_vec();
            cut.truncate(junk.len() % (bytes.len() + 1));
            if cut.len() < bytes.len() {
                prop_assert!(decode::<AppendEntriesRequest<TypeConfig>>(&cut).is_err());
            }
        }
    }

    #[test]
    fn paths_round_trip_and_anything_else_is_refused() {
        for rpc in Rpc::ALL {
            for (group, target) in [(0, 1), (7, u64::MAX), (super::super::METADATA_GROUP, 3)] {
                assert_eq!(parse_path(&path(group, target, rpc)).unwrap(), (group, target, rpc));
            }
        }
        for bad in [
            "/",
            "/raft/v1/",
            "/raft/v1/1/2",
            "/raft/v1/1/2/append/x",
            "/raft/v1/-1/2/append",
            "/raft/v1/1/2/nope",
            "/raft/v1/18446744073709551616/2/vote",
            "/raft/v2/1/2/vote",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decode_refuses_trailing_and_cut_bytes() {
        let bytes = encode(&(1u64, String::from("abc"))).unwrap();
        assert_eq!(decode::<(u64, String)>(&bytes).unwrap(), (1, "abc".into()));
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(decode::<(u64, String)>(&longer).is_err());
        for cut in 0..bytes.len() {
            assert!(decode::<(u64, String)>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
