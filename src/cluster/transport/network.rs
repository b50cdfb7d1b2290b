//! openraft's network for one group, over the node's shared [`PeerPool`].
//!
//! A [`GroupNetworkFactory`] is a group id, the local replica's id and a
//! handle on the pool: cheap, one per group. The target's address is the
//! `addr` of its `BasicNode` in the membership (the peer address of the
//! node hosting it).
//!
//! **Failures, as openraft needs them to back off and retry:**
//!
//! - no connection (refused, timed out, backing off after a failure) is
//!   [`Unreachable`]: openraft waits before it tries again;
//! - a request that failed on an open connection (reset, connection lost)
//!   is a [`NetworkError`]: openraft retries at once, and that retry
//!   connects again or finds the peer unreachable;
//! - no answer within the RPC's `soft_ttl` is a [`Timeout`];
//! - a refusal by the peer (unknown group or replica, a request it cannot
//!   decode, its Raft stopped) or an answer this node cannot decode is
//!   [`Unreachable`]: retrying at once cannot help, and the refusal's
//!   JSON body is in the message. openraft's `RemoteError` carries an
//!   error type these RPCs do not have (`RPCError<C, Infallible>`), so a
//!   remote failure is never one.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use datanode_partition::raft::{TypeConfig, Vote};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, StatusCode};
use openraft::BasicNode;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::GroupId;
use super::pool::{PeerBody, PeerPool};
use super::snapshot::{self, ChunkBody, Progress, SnapshotTransfer};
use super::wire::{self, ErrorBody, Rpc};

/// The largest answer taken from a peer (answers are small: a vote, a
/// log id).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The network of one group (see the module docs). `SM` is the group's
/// state machine, whose snapshots it streams.
pub struct GroupNetworkFactory<SM> {
    pool: PeerPool,
    group: GroupId,
    local: u64,
    _state_machine: PhantomData<fn() -> SM>,
}

impl<SM> std::fmt::Debug for GroupNetworkFactory<SM> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupNetworkFactory").field("group", &self.group).field("local", &self.local).finish()
    }
}

impl<SM> Clone for GroupNetworkFactory<SM> {
    fn clone(&self) -> Self {
        GroupNetworkFactory {
            pool: self.pool.clone(),
            group: self.group,
            local: self.local,
            _state_machine: PhantomData,
        }
    }
}

impl<SM> GroupNetworkFactory<SM> {
    /// The network of `group` as seen by its replica `local`.
    pub fn new(pool: PeerPool, group: GroupId, local: u64) -> GroupNetworkFactory<SM> {
        GroupNetworkFactory { pool, group, local, _state_machine: PhantomData }
    }
}

impl<SM: SnapshotTransfer> RaftNetworkFactory<TypeConfig> for GroupNetworkFactory<SM> {
    type Network = GroupNetwork<SM>;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GroupNetwork<SM> {
        GroupNetwork {
            pool: self.pool.clone(),
            group: self.group,
            local: self.local,
            target,
            addr: node.addr.clone(),
            _state_machine: PhantomData,
        }
    }
}

/// The client of one target replica of one group.
pub struct GroupNetwork<SM> {
    pool: PeerPool,
    group: GroupId,
    local: u64,
    target: u64,
    addr: String,
    _state_machine: PhantomData<fn() -> SM>,
}

impl<SM> std::fmt::Debug for GroupNetwork<SM> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupNetwork")
            .field("group", &self.group)
            .field("target", &self.target)
            .field("addr", &self.addr)
            .finish()
    }
}

/// How one request failed, before it is put in openraft's terms.
#[derive(Debug)]
enum Failure {
    Unreachable(String),
    Network(String),
    Timeout(Duration),
}

impl Failure {
    fn label(&self) -> &'static str {
        match self {
            Failure::Unreachable(_) => "unreachable",
            Failure::Network(_) => "network",
            Failure::Timeout(_) => "timeout",
        }
    }
}

fn record(rpc: Rpc, result: &'static str) {
    metrics::counter!("datanode_peer_requests_total", "rpc" => rpc.name(), "result" => result).increment(1);
}

impl<SM> GroupNetwork<SM> {
    fn rpc_error(&self, rpc: Rpc, failure: Failure) -> RPCError<TypeConfig> {
        match failure {
            Failure::Unreachable(message) => RPCError::Unreachable(Unreachable::from_string(message)),
            Failure::Network(message) => RPCError::Network(NetworkError::from_string(message)),
            Failure::Timeout(timeout) => {
                RPCError::Timeout(Timeout { action: rpc.openraft_type(), id: self.local, target: self.target, timeout })
            }
        }
    }

    fn request(&self, rpc: Rpc, body: PeerBody) -> Result<Request<PeerBody>, Failure> {
        let uri = format!("http://{}{}", self.addr, wire::path(self.group, self.target, rpc));
        Request::post(uri)
            .header(wire::SENDER_HEADER, HeaderValue::from(self.local))
            .header(CONTENT_TYPE, wire::BINARY)
            .body(body)
            .map_err(|error| Failure::Unreachable(format!("peer address {:?}: {error}", self.addr)))
    }

    /// Sends `request` and reads the answer (no time bound of its own).
    async fn exchange(&self, rpc: Rpc, request: Request<PeerBody>, budget: Duration) -> Result<Bytes, Failure> {
        let mut sender =
            self.pool.sender(&self.addr, budget).await.map_err(|error| Failure::Unreachable(error.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| Failure::Network(format!("{} to {}: {error}", rpc.name(), self.addr)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|error| Failure::Network(format!("{} answer from {}: {error}", rpc.name(), self.addr)))?
            .to_bytes();
        if status == StatusCode::OK {
            return Ok(body);
        }
        let refusal = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(refusal) => format!("{}: {}", refusal.error, refusal.message),
            Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        };
        Err(Failure::Unreachable(format!(
            "{} refused {} to replica {} of group {}: {status} {refusal}",
            self.addr,
            rpc.name(),
            self.target,
            self.group
        )))
    }

    fn answer<Resp: DeserializeOwned>(&self, rpc: Rpc, body: &[u8]) -> Result<Resp, Failure> {
        wire::decode(body).map_err(|error| {
            Failure::Unreachable(format!("undecodable {} answer from {}: {error}", rpc.name(), self.addr))
        })
    }

    /// One request-response RPC within the option's `soft_ttl`.
    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        self.unary_within(rpc, request, option.soft_ttl()).await
    }

    /// One request-response RPC within `budget`.
    async fn unary_within<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        request: &Req,
        budget: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let attempt = async {
            let body = wire::encode(request)
                .map_err(|error| Failure::Unreachable(format!("cannot encode {}: {error}", rpc.name())))?;
            let body = Full::new(body).map_err(|never| match never {}).boxed_unsync();
            let answer = self.exchange(rpc, self.request(rpc, body)?, budget).await?;
            self.answer(rpc, &answer)
        };
        let outcome = tokio::time::timeout(budget, attempt).await.unwrap_or(Err(Failure::Timeout(budget)));
        match outcome {
            Ok(answer) => {
                record(rpc, "ok");
                Ok(answer)
            }
            Err(failure) => {
                record(rpc, failure.label());
                Err(self.rpc_error(rpc, failure))
            }
        }
    }
}

/// Bytes of entries one append request carries at most (beyond its first
/// entry, always sent).
pub const APPEND_BYTES: usize = 4 << 20;
/// The transfer rate an append request's budget allows for its bytes, on
/// top of the RPC's own (a heartbeat's) budget.
const APPEND_BYTES_PER_SEC: f64 = (16 << 20) as f64;

/// How many of `entries` fit in one append request, and their bytes.
fn append_prefix(entries: &[datanode_partition::raft::Entry]) -> (usize, usize) {
    let size = |entry: &datanode_partition::raft::Entry| match &entry.payload {
        openraft::EntryPayload::Normal(command) => command.bytes().len() + 64,
        _ => 256,
    };
    let mut total = 0;
    for (i, entry) in entries.iter().enumerate() {
        let next = total + size(entry);
        if i > 0 && next > APPEND_BYTES {
            return (i, total);
        }
        total = next;
    }
    (entries.len(), total)
}

impl<SM: SnapshotTransfer> GroupNetwork<SM> {
    /// Streams `snapshot` (see [`snapshot`]); broken off when it moves no
    /// chunk, or is not answered once sent, for
    /// `PoolOptions::snapshot_idle_timeout` (at least the option's
    /// `soft_ttl`).
    async fn stream_snapshot(
        &self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SM::SnapshotData>,
        option: &RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, Failure> {
        let options = self.pool.options();
        let idle = options.snapshot_idle_timeout.max(option.soft_ttl());
        let chunk_size = option.snapshot_chunk_size().unwrap_or(options.snapshot_chunk_size).clamp(4096, 16 << 20);
        let head = wire::snapshot_head(&(&vote, &snapshot.meta))
            .map_err(|error| Failure::Unreachable(format!("cannot encode a snapshot head: {error}")))?;
        let (pieces, receiver) = snapshot::channel();
        let progress = Progress::new();
        let data = snapshot.snapshot;
        let reader = tokio::task::spawn_blocking(move || match SM::open_snapshot(&data) {
            Ok(reader) => snapshot::feed(reader, chunk_size, pieces),
            Err(error) => {
                let _ = pieces.blocking_send(snapshot::Piece::Failed(error));
            }
        });
        let body = ChunkBody::new(head, receiver, Arc::clone(&progress)).boxed_unsync();
        let request = self.request(Rpc::Snapshot, body)?;
        let mut exchange = Box::pin(self.exchange(Rpc::Snapshot, request, option.soft_ttl()));
        let tick = (idle / 4).max(Duration::from_millis(10));
        let answer = loop {
            tokio::select! {
                answer = &mut exchange => break answer,
                () = tokio::time::sleep(tick) => {
                    if progress.last().elapsed() > idle {
                        break Err(Failure::Timeout(idle));
                    }
                }
            }
        };
        // Dropping the exchange drops the body, so a reader still at work
        // finds nobody to take its chunks and stops.
        drop(exchange);
        if answer.is_ok() {
            let _ = reader.await;
        }
        self.answer(Rpc::Snapshot, &answer?)
    }
}

impl<SM: SnapshotTransfer> RaftNetworkV2<TypeConfig> for GroupNetwork<SM> {
    type SnapshotData = SM::SnapshotData;

    /// Sends a prefix of the entries of at most [`APPEND_BYTES`] (at least
    /// one entry) and answers `PartialSuccess` when the follower took it
    /// and entries were left out: openraft hands over up to
    /// `max_payload_entries` entries whatever their size, and a follower
    /// far behind on a log of large blobs would otherwise be sent hundreds
    /// of MiB in one request, never answered within a heartbeat's budget
    /// (and above the peer server's request limit), and never catch up.
    /// The budget grows with the bytes sent, at [`APPEND_BYTES_PER_SEC`].
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let (keep, bytes) = append_prefix(&rpc.entries);
        let cut = keep < rpc.entries.len();
        rpc.entries.truncate(keep);
        let last_sent = rpc.entries.last().map(|entry| entry.log_id);
        let budget = option.soft_ttl() + Duration::from_secs_f64(bytes as f64 / APPEND_BYTES_PER_SEC);
        match self.unary_within(Rpc::Append, &rpc, budget).await? {
            AppendEntriesResponse::Success if cut => Ok(AppendEntriesResponse::PartialSuccess(last_sent)),
            answer => Ok(answer),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::Vote, &rpc, &option).await
    }

    // openraft sends it only when a group enables pre-vote; sent for real
    // then (its default answers "granted" without asking).
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::PreVote, &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SM::SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let started = Instant::now();
        let outcome = tokio::select! {
            closed = cancel => {
                record(Rpc::Snapshot, "cancelled");
                return Err(StreamingError::Closed(closed));
            }
            outcome = self.stream_snapshot(vote, snapshot, &option) => outcome,
        };
        match outcome {
            Ok(answer) => {
                record(Rpc::Snapshot, "ok");
                tracing::info!(group = self.group, target = self.target, elapsed = ?started.elapsed(), "snapshot sent");
                Ok(answer)
            }
            Err(failure) => {
                record(Rpc::Snapshot, failure.label());
                tracing::warn!(group = self.group, target = self.target, ?failure, "snapshot not sent");
                Err(match self.rpc_error(Rpc::Snapshot, failure) {
                    RPCError::Unreachable(error) => StreamingError::Unreachable(error),
                    RPCError::Network(error) => StreamingError::Network(error),
                    RPCError::Timeout(error) => StreamingError::Timeout(error),
                    RPCError::RemoteError(remote) => match remote.source {},
                })
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::TransferLeader, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use datanode_partition::raft::{Command, Entry, LogId};
    use openraft::EntryPayload;
    use openraft::impls::leader_id_adv::LeaderId;

    use super::{APPEND_BYTES, append_prefix};

    fn entries(sizes: &[usize]) -> Vec<Entry> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                let log_id = LogId::new(LeaderId { term: 1, node_id: 1 }, i as u64 + 1);
                Entry { log_id, payload: EntryPayload::Normal(Command::new(Bytes::from(vec![0u8; *size]))) }
            })
            .collect()
    }

    #[test]
    fn an_append_carries_a_bounded_prefix_and_always_its_first_entry() {
        assert_eq!(append_prefix(&[]), (0, 0), "a heartbeat");
        assert_eq!(append_prefix(&entries(&[10, 10, 10])).0, 3, "small entries all go");
        let quarter = APPEND_BYTES / 4;
        let (keep, bytes) = append_prefix(&entries(&[quarter; 300]));
        assert!(keep == 3 && bytes <= APPEND_BYTES, "{keep} entries, {bytes} bytes");
        assert_eq!(append_prefix(&entries(&[APPEND_BYTES * 3, 10])).0, 1, "one entry larger than the bound goes alone");
    }
}
