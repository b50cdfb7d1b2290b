//! The replicas this node hosts, as the peer server finds them.
//!
//! The daemon registers each replica of each group it runs
//! ([`GroupRegistry::register`]) and removes it when the replica goes.
//! A replica is a [`GroupEndpoint`]: requests in their encoded form in,
//! encoded answers out, so one registry holds groups of different state
//! machines (the metadata group's and the data partitions'). A
//! [`RaftEndpoint`] is the endpoint of an `openraft::Raft`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use datanode_partition::raft::{TypeConfig, Vote};
use futures_util::future::BoxFuture;
use openraft::Raft;
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};

use super::GroupId;
use super::snapshot::{SnapshotBody, SnapshotTransfer};
use super::wire::{self, Rpc};

/// A snapshot's meta data.
pub type SnapshotMeta = SnapshotMetaOf<TypeConfig>;

/// Why an endpoint did not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The request could not be decoded, or is not one this endpoint takes.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The replica's Raft stopped (shut down, or a fatal storage error).
    #[error("raft stopped: {0}")]
    Stopped(String),
    /// A snapshot could not be received or built.
    #[error("snapshot: {0}")]
    Snapshot(std::io::Error),
}

/// One replica of one group, as the peer server calls it.
pub trait GroupEndpoint: Send + Sync + 'static {
    /// Serves `rpc` (any but [`Rpc::Snapshot`]) on the encoded `request`;
    /// the answer is the encoded response.
    fn call(&self, rpc: Rpc, request: Bytes) -> BoxFuture<'_, Result<Bytes, EndpointError>>;

    /// Receives a snapshot sent under `vote`: spools `body` to the state
    /// machine (on a blocking thread), then installs it; the answer is the
    /// encoded `SnapshotResponse`.
    fn install_snapshot(
        &self,
        vote: Vote,
        meta: SnapshotMeta,
        body: SnapshotBody,
    ) -> BoxFuture<'_, Result<Bytes, EndpointError>>;
}

/// The endpoint of an `openraft::Raft` whose state machine streams its
/// snapshots.
pub struct RaftEndpoint<SM: SnapshotTransfer> {
    raft: Raft<TypeConfig, SM>,
    state_machine: Arc<SM>,
}

impl<SM: SnapshotTransfer> fmt::Debug for RaftEndpoint<SM> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RaftEndpoint").finish_non_exhaustive()
    }
}

impl<SM: SnapshotTransfer> RaftEndpoint<SM> {
    /// The endpoint of `raft`; `state_machine` is a handle on the same
    /// state machine (it receives snapshots: see
    /// [`SnapshotTransfer::receive_snapshot`]).
    pub fn new(raft: Raft<TypeConfig, SM>, state_machine: SM) -> RaftEndpoint<SM> {
        RaftEndpoint { raft, state_machine: Arc::new(state_machine) }
    }
}

fn bad(error: String) -> EndpointError {
    EndpointError::BadRequest(error)
}

fn encoded<T: serde::Serialize>(answer: &T) -> Result<Bytes, EndpointError> {
    wire::encode(answer).map_err(|error| EndpointError::Stopped(format!("cannot encode the answer: {error}")))
}

fn stopped(error: impl fmt::Display) -> EndpointError {
    EndpointError::Stopped(error.to_string())
}

impl<SM: SnapshotTransfer> GroupEndpoint for RaftEndpoint<SM> {
    fn call(&self, rpc: Rpc, request: Bytes) -> BoxFuture<'_, Result<Bytes, EndpointError>> {
        Box::pin(async move {
            match rpc {
                Rpc::Append => {
                    let request = wire::decode(&request).map_err(bad)?;
                    encoded(&self.raft.append_entries(request).await.map_err(stopped)?)
                }
                Rpc::Vote => {
                    let request = wire::decode(&request).map_err(bad)?;
                    encoded(&self.raft.vote(request).await.map_err(stopped)?)
                }
                Rpc::PreVote => {
                    let request = wire::decode(&request).map_err(bad)?;
                    encoded(&self.raft.pre_vote(request).await.map_err(stopped)?)
                }
                Rpc::TransferLeader => {
                    let request = wire::decode(&request).map_err(bad)?;
                    encoded(&self.raft.handle_transfer_leader(request).await.map_err(stopped)?)
                }
                Rpc::Snapshot => Err(bad("a snapshot is a stream, not a call".into())),
            }
        })
    }

    fn install_snapshot(
        &self,
        vote: Vote,
        meta: SnapshotMeta,
        mut body: SnapshotBody,
    ) -> BoxFuture<'_, Result<Bytes, EndpointError>> {
        Box::pin(async move {
            let state_machine = Arc::clone(&self.state_machine);
            let data = tokio::task::spawn_blocking(move || state_machine.receive_snapshot(&mut body))
                .await
                .map_err(|error| EndpointError::Snapshot(std::io::Error::other(error)))?
                .map_err(EndpointError::Snapshot)?;
            let snapshot = SnapshotOf::<TypeConfig, SM::SnapshotData> { meta, snapshot: data };
            encoded(&self.raft.install_full_snapshot(vote, snapshot).await.map_err(stopped)?)
        })
    }
}

/// Why the registry has no endpoint for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// No replica of the group is hosted here.
    Group,
    /// The group is, but not that replica.
    Replica,
}

type Replicas = HashMap<u64, Arc<dyn GroupEndpoint>>;

/// The replicas hosted on this node, by group and replica id. Clones
/// share them.
#[derive(Clone, Default)]
pub struct GroupRegistry {
    groups: Arc<RwLock<HashMap<GroupId, Replicas>>>,
}

impl fmt::Debug for GroupRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("GroupRegistry").field("groups", &groups.len()).finish()
    }
}

impl GroupRegistry {
    /// An empty registry.
    pub fn new() -> GroupRegistry {
        GroupRegistry::default()
    }

    /// Hosts replica `replica` of `group` behind `endpoint`; the endpoint
    /// it replaces, if any.
    pub fn register(
        &self,
        group: GroupId,
        replica: u64,
        endpoint: Arc<dyn GroupEndpoint>,
    ) -> Option<Arc<dyn GroupEndpoint>> {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        groups.entry(group).or_default().insert(replica, endpoint)
    }

    /// Stops routing to replica `replica` of `group`; its endpoint, if it
    /// was hosted. Requests already under way finish.
    pub fn remove(&self, group: GroupId, replica: u64) -> Option<Arc<dyn GroupEndpoint>> {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let replicas = groups.get_mut(&group)?;
        let removed = replicas.remove(&replica);
        if replicas.is_empty() {
            groups.remove(&group);
        }
        removed
    }

    /// The endpoint of replica `replica` of `group`.
    pub fn lookup(&self, group: GroupId, replica: u64) -> Result<Arc<dyn GroupEndpoint>, Missing> {
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        let replicas = groups.get(&group).ok_or(Missing::Group)?;
        replicas.get(&replica).cloned().ok_or(Missing::Replica)
    }
}
