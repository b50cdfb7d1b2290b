//! The control messages between a node and the metadata leader (JSON on
//! the peer port, beside the Raft traffic): a node's heartbeat carries its
//! URLs, disks and replicas' states; the reply carries the map when the
//! node's is older, and the leaders the replicas reported.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::map::{ClusterMap, NodeEntry};

/// `POST /cluster/heartbeat` on the metadata leader's peer port.
pub const HEARTBEAT_PATH: &str = "/cluster/heartbeat";

/// What a node says of itself, every `heartbeat_interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Its `node.id`.
    pub node: String,
    /// Its URLs and disk names.
    pub entry: NodeEntry,
    /// Its disks now.
    pub disks: Vec<DiskReport>,
    /// Its replicas now.
    pub replicas: Vec<ReplicaReport>,
    /// The epoch of the map it holds.
    pub map_epoch: u64,
}

/// One disk in a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskReport {
    /// Its name.
    pub name: String,
    /// Free bytes.
    pub free_bytes: u64,
    /// Takes new replicas (healthy, not full).
    pub writable: bool,
}

/// One replica in a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// Its partition.
    pub partition: u64,
    /// Its id.
    pub replica_id: u64,
    /// `healthy` or `faulted`.
    pub state: String,
    /// `leader`, `follower`, `learner`, `candidate` or `shutdown`.
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows, by replica id.
    pub leader: Option<u64>,
    /// Its last applied index.
    pub applied_index: Option<u64>,
    /// On a leader: the last index each replica is known to hold.
    pub matched: BTreeMap<u64, Option<u64>>,
    /// The voters of its committed membership.
    #[serde(default)]
    pub voters: Vec<u64>,
    /// The voters of the last membership in its log (committed or not).
    #[serde(default)]
    pub effective_voters: Vec<u64>,
    /// Its learners.
    #[serde(default)]
    pub learners: Vec<u64>,
    /// Whether that membership is a joint one (a change half done).
    #[serde(default)]
    pub joint: bool,
}

/// The metadata leader's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The epoch of the leader's map.
    pub epoch: u64,
    /// The map, when newer than the node's.
    pub map: Option<ClusterMap>,
    /// The leader of each partition (replica id), as reported.
    pub leaders: BTreeMap<u64, u64>,
}

/// The answer of a seed that is not the metadata leader (HTTP 421 on the
/// peer port): where the leader is, when known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotMetaLeader {
    /// The leader's peer address.
    pub leader_addr: Option<String>,
}
