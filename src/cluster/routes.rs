//! The HTTP side of cluster mode.
//!
//! **Data API of a replicated partition.** Any node takes any request.
//! The partition's leader serves it: a put or delete is acknowledged once
//! its entry is committed on a majority and applied here; a read first
//! confirms leadership with a read-index round (`ensure_linearizable`),
//! so it sees every write acknowledged before it arrived. Any other node
//! answers `307 Temporary Redirect` to the leader's `advertise_url`, with
//! `{"error":"not_leader","leader":NODE,"leader_url":URL}` and nothing
//! written; 503 `no_leader` when no leader is known.
//!
//! **`/v1/cluster/...`** is served by the metadata leader, and redirected
//! (307, the same body shape) to it from any other node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use datanode_partition::blob;
use datanode_partition::raft::{Command, StoreError};
use openraft::ReadPolicy;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::ClientWriteError;
use serde::Deserialize;
use serde_json::{Value, json};

use super::meta::{MetaError, MetaGroup};
use super::replica::{Replica, ReplicaRaft};
use super::{Cluster, role_name};
use crate::api::{self, ApiError};
use crate::node::Node;

/// Where a request for a replicated partition goes.
enum Route {
    /// The leader is here.
    Here(Arc<Replica>, ReplicaRaft, datanode_partition::raft::BlobStateMachine),
    /// The leader is elsewhere: node id and advertise URL.
    Leader(String, String),
    /// No leader known.
    NoLeader,
}

fn route(cluster: &Cluster, partition: u64) -> Route {
    let learned = cluster.learned();
    let replica = cluster.replica(partition);
    let leader = match replica.as_ref().and_then(|r| r.running().map(|running| (r.clone(), running))) {
        Some((replica, (raft, machine))) => {
            let metrics = raft.metrics().borrow_watched().clone();
            if metrics.state == openraft::ServerState::Leader && metrics.current_leader == Some(replica.replica_id) {
                return Route::Here(replica, raft, machine);
            }
            metrics.current_leader.or_else(|| learned.leaders.get(&partition).copied())
        }
        None => learned.leaders.get(&partition).copied(),
    };
    let Some(leader) = leader else { return Route::NoLeader };
    match learned.map.node_of(partition, leader) {
        Some((node, entry)) if *node != cluster.node_id => Route::Leader(node.clone(), entry.advertise_url.clone()),
        _ => Route::NoLeader,
    }
}

/// `307` to `leader_url` + the request's path and query.
fn redirect(partition: Option<u64>, leader: &str, leader_url: &str, uri: &Uri) -> Response {
    let base = leader_url.trim_end_matches('/');
    let target = format!("{base}{}", uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()));
    let mut body = json!({
        "error": "not_leader",
        "message": format!("this node is not the leader; the leader is {leader} at {base}"),
        "leader": leader,
        "leader_url": base,
    });
    if let Some(partition) = partition {
        body["partition"] = partition.into();
    }
    let mut response = (StatusCode::TEMPORARY_REDIRECT, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&target) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn no_leader(partition: Option<u64>, what: &str) -> ApiError {
    let error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", format!("{what} has no leader known here"));
    match partition {
        Some(partition) => error.on(partition),
        None => error,
    }
}

fn store_error(replica: &Replica, error: StoreError) -> ApiError {
    replica.fault(format!("read failed: {error}"));
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io_error", error.to_string()).on(replica.partition)
}

/// A failed write or read-index round of a leader.
fn raft_error<E>(
    cluster: &Cluster,
    replica: &Replica,
    uri: &Uri,
    error: openraft::errors::RaftError<datanode_partition::raft::TypeConfig, E>,
    writing: bool,
) -> Response
where
    E: std::fmt::Display
        + std::fmt::Debug
        + openraft::TryAsRef<openraft::errors::ForwardToLeader<datanode_partition::raft::TypeConfig>>,
{
    let partition = replica.partition;
    if let openraft::errors::RaftError::Fatal(fatal) = &error {
        // Stopped on purpose (shutdown, removal): no fault.
        if matches!(fatal, openraft::errors::Fatal::Stopped) {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the replica is stopping")
                .on(partition)
                .into_response();
        }
        replica.fault(format!("raft stopped: {fatal}"));
        if writing {
            // The entry may have been appended and sent before the stop.
            return outcome_unknown(partition, &format!("the replica stopped during the write ({fatal})"));
        }
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "partition_faulted", error.to_string())
            .on(partition)
            .into_response();
    }
    if let Some(forward) = error.forward_to_leader()
        && let Some(leader) = forward.leader_id
        && let Some((node, entry)) = cluster.learned_map().node_of(partition, leader)
        && *node != cluster.node_id
    {
        return redirect(Some(partition), node, &entry.advertise_url, uri);
    }
    if error.forward_to_leader().is_some() {
        return no_leader(Some(partition), "the partition").into_response();
    }
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "partition_unavailable", error.to_string())
        .on(partition)
        .into_response()
}

/// `PUT` or `DELETE` of a blob: one entry through the leader.
async fn write(
    node: &Node,
    cluster: &Cluster,
    partition: u64,
    uri: &Uri,
    command: Bytes,
    created: Option<u64>,
) -> Response {
    let (replica, raft, _) = match route(cluster, partition) {
        Route::Here(replica, raft, machine) => (replica, raft, machine),
        Route::Leader(leader, url) => return redirect(Some(partition), &leader, &url, uri),
        Route::NoLeader => return no_leader(Some(partition), "the partition").into_response(),
    };
    let written =
        tokio::time::timeout(node.config.limits.request_timeout, raft.client_write(Command::new(command))).await;
    match written {
        Ok(Ok(response)) => match created {
            Some(size) => {
                let lsn = response.log_id.index + 1;
                (StatusCode::CREATED, Json(json!({ "lsn": lsn, "size": size }))).into_response()
            }
            None => StatusCode::NO_CONTENT.into_response(),
        },
        // Appended, then dropped when this node took another leader's
        // log: it may still commit through that leader.
        Ok(Err(openraft::errors::RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => {
            outcome_unknown(partition, "the entry was appended, then the leader changed")
        }
        Ok(Err(error)) => raft_error(cluster, &replica, uri, error, true),
        Err(_) => outcome_unknown(partition, "the group did not commit within request_timeout"),
    }
}

fn outcome_unknown(partition: u64, why: &str) -> Response {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "write_outcome_unknown",
        format!("{why}; the write may still become durable"),
    )
    .on(partition)
    .into_response()
}

/// `PUT /v1/partitions/{pid}/blobs/{key}` of a replicated partition. An
/// entry larger than a replica's log can take is refused (413) before it
/// is proposed: a log that cannot append an entry stops its group.
pub async fn put_blob(node: &Node, cluster: &Cluster, partition: u64, uri: &Uri, key: &[u8], body: Bytes) -> Response {
    let command = blob::encode_put(key, &body);
    let limit = datanode_wal::format::MAX_RECORD_LEN.min(node.config.limits.max_queued_bytes_per_partition as usize);
    if datanode_partition::raft::ENTRY_OVERHEAD + command.len() > limit {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the entry of this put ({} bytes with its key and headers) is larger than \
                 limits.max_queued_bytes_per_partition = {}",
                datanode_partition::raft::ENTRY_OVERHEAD + command.len(),
                crate::config::size_text(node.config.limits.max_queued_bytes_per_partition)
            ),
        )
        .on(partition)
        .into_response();
    }
    write(node, cluster, partition, uri, command, Some(body.len() as u64)).await
}

/// `DELETE /v1/partitions/{pid}/blobs/{key}` of a replicated partition.
pub async fn delete_blob(node: &Node, cluster: &Cluster, partition: u64, uri: &Uri, key: &[u8]) -> Response {
    write(node, cluster, partition, uri, blob::encode_delete(key), None).await
}

/// The leader's state machine, once a read-index round confirmed that it
/// has applied everything committed before the read arrived; or the
/// answer to give instead.
async fn linearizable(
    node: &Node,
    cluster: &Cluster,
    partition: u64,
    uri: &Uri,
) -> Result<(Arc<Replica>, datanode_partition::raft::BlobStateMachine), Response> {
    let (replica, raft, machine) = match route(cluster, partition) {
        Route::Here(replica, raft, machine) => (replica, raft, machine),
        Route::Leader(leader, url) => return Err(redirect(Some(partition), &leader, &url, uri)),
        Route::NoLeader => return Err(no_leader(Some(partition), "the partition").into_response()),
    };
    match tokio::time::timeout(node.config.limits.request_timeout, raft.ensure_linearizable(ReadPolicy::ReadIndex))
        .await
    {
        Ok(Ok(_)) => Ok((replica, machine)),
        Ok(Err(error)) => Err(raft_error(cluster, &replica, uri, error, false)),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "partition_unavailable",
            "the group did not confirm its leader within request_timeout",
        )
        .on(partition)
        .into_response()),
    }
}

/// `GET`/`HEAD` of a blob of a replicated partition.
pub async fn read_blob(
    node: &Node,
    cluster: &Cluster,
    partition: u64,
    uri: &Uri,
    key: Vec<u8>,
    headers: &HeaderMap,
    head_only: bool,
) -> Response {
    let (replica, machine) = match linearizable(node, cluster, partition, uri).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Some(len) = machine.len_of(&key) else {
        return ApiError::new(StatusCode::NOT_FOUND, "blob_not_found", "no such blob").on(partition).into_response();
    };
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => match value.to_str().ok().and_then(|v| api::parse_range(v, len)) {
            Some(range) => Some(range),
            None => {
                return ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "bad_range",
                    format!("cannot serve that range of {len} bytes"),
                )
                .on(partition)
                .into_response();
            }
        },
    };
    let length = range.as_ref().map_or(len, |r| r.end - r.start);
    let mut response = if head_only {
        let mut response = Response::new(Body::empty());
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        response
    } else {
        let (wanted, reader) = (range.clone(), machine.clone());
        let read = tokio::task::spawn_blocking(move || reader.get(&key, wanted)).await;
        match read {
            Ok(Ok(Some(bytes))) => Response::new(Body::from(bytes)),
            Ok(Ok(None)) => {
                return ApiError::new(StatusCode::NOT_FOUND, "blob_not_found", "no such blob")
                    .on(partition)
                    .into_response();
            }
            Ok(Err(error)) => return store_error(&replica, error).into_response(),
            Err(_) => {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the read's task failed")
                    .on(partition)
                    .into_response();
            }
        }
    };
    *response.status_mut() = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(range) = range
        && let Ok(value) = HeaderValue::from_str(&format!("bytes {}-{}/{len}", range.start, range.end - 1))
    {
        response.headers_mut().insert(header::CONTENT_RANGE, value);
    }
    response
}

/// `GET /v1/partitions/{pid}/blobs?...` of a replicated partition.
pub async fn list_blobs(node: &Node, cluster: &Cluster, partition: u64, uri: &Uri, query: api::ListQuery) -> Response {
    let (_, machine) = match linearizable(node, cluster, partition, uri).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let (keys, next) = machine.list(&query.prefix, query.after.as_deref(), query.limit);
    let keys: Vec<Value> = keys.iter().map(|k| api::key_json(k)).collect();
    Json(json!({ "keys": keys, "next": next.as_deref().map(api::key_json) })).into_response()
}

/// `PartitionStatus` of the replica here, with its `raft` view; a
/// replicated partition not held here redirects to its leader.
pub fn partition_status(cluster: &Cluster, partition: u64, uri: &Uri) -> Response {
    let Some(replica) = cluster.replica(partition) else {
        return match route(cluster, partition) {
            Route::Leader(leader, url) => redirect(Some(partition), &leader, &url, uri),
            _ => no_leader(Some(partition), "the partition").into_response(),
        };
    };
    Json(replica_status(&replica)).into_response()
}

/// A replica as `PartitionStatus` shows it.
pub fn replica_status(replica: &Replica) -> Value {
    match replica.state() {
        super::replica::ReplicaState::Faulted(reason) => json!({
            "id": replica.partition,
            "disk": replica.disk,
            "state": "faulted",
            "reasons": ["io_error"],
            "last_error": { "message": reason },
            "raft": { "replica_id": replica.replica_id, "role": "shutdown" },
        }),
        super::replica::ReplicaState::Running { raft, machine } => {
            let m = raft.metrics().borrow_watched().clone();
            let stats = machine.stats();
            let members: Vec<Value> = m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, node)| {
                    let voter = m.membership_config.membership().voter_ids().any(|v| v == *id);
                    json!({ "replica_id": id, "addr": node.addr, "voter": voter })
                })
                .collect();
            json!({
                "id": replica.partition,
                "disk": replica.disk,
                "state": "healthy",
                "reasons": [],
                "blobs": stats.keys,
                "live_bytes": stats.live_bytes,
                "raft": {
                    "replica_id": replica.replica_id,
                    "role": role_name(m.state),
                    "term": m.current_term,
                    "leader": m.current_leader,
                    "commit_index": m.local_committed.map(|id| id.index),
                    "applied_index": m.last_applied.map(|id| id.index),
                    "snapshot_index": m.snapshot.map(|id| id.index),
                    "purged_index": m.purged.map(|id| id.index),
                    "last_log_index": m.last_log_index,
                    "members": members,
                },
            })
        }
    }
}

/// The metadata leader here, or the 307/503 that sends the caller there.
fn meta_here<'a>(cluster: &'a Cluster, uri: &Uri) -> Result<&'a Arc<MetaGroup>, Box<Response>> {
    if let Some(meta) = &cluster.meta
        && meta.leader() == Some(meta.id)
    {
        return Ok(meta);
    }
    match cluster.meta_leader_node() {
        Some((node, Some(url))) if node != cluster.node_id => Err(Box::new(redirect(None, &node, &url, uri))),
        _ => Err(Box::new(no_leader(None, "the metadata group").into_response())),
    }
}

fn meta_error(cluster: &Cluster, uri: &Uri, error: MetaError) -> Response {
    match error {
        MetaError::NotLeader(_) => match cluster.meta_leader_node() {
            Some((node, Some(url))) if node != cluster.node_id => redirect(None, &node, &url, uri),
            _ => no_leader(None, "the metadata group").into_response(),
        },
        MetaError::Unavailable(message) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", message).into_response()
        }
        MetaError::OutcomeUnknown(message) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "write_outcome_unknown", message).into_response()
        }
        MetaError::Exists(id) => {
            ApiError::new(StatusCode::CONFLICT, "partition_exists", format!("partition {id} exists"))
                .on(id)
                .into_response()
        }
        MetaError::NotFound(id) => ApiError::partition_not_found(id).into_response(),
        MetaError::CannotPlace(message) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cannot_place", message).into_response()
        }
        MetaError::NoSuchNode(id) => {
            ApiError::new(StatusCode::NOT_FOUND, "node_not_found", format!("no node {id} in the cluster map"))
                .into_response()
        }
        error @ MetaError::NoRoomToDrain { .. } => {
            let message = format!("{error}; add a node (or bring one back up) first; nothing was changed");
            ApiError::new(StatusCode::CONFLICT, "no_room_to_drain", message).into_response()
        }
    }
}

/// `ClusterPartition` of `id` from the metadata leader's view.
/// What `ClusterPartition` is built from: the map and the metadata
/// leader's liveness, taken once per answer (not once per partition).
struct View<'a> {
    meta: &'a MetaGroup,
    map: &'a super::map::ClusterMap,
    seen: HashMap<String, super::meta::Seen>,
    leaders: BTreeMap<u64, u64>,
}

impl<'a> View<'a> {
    fn of(meta: &'a MetaGroup, map: &'a super::map::ClusterMap) -> View<'a> {
        View { meta, map, seen: meta.seen(), leaders: meta.leaders() }
    }
}

fn cluster_partition(view: &View<'_>, id: u64) -> Value {
    let (meta, seen) = (view.meta, &view.seen);
    let Some(entry) = view.map.partitions.get(&id) else { return Value::Null };
    let leader = view.leaders.get(&id).copied();
    let leader_report = leader.and_then(|leader| {
        seen.values()
            .flat_map(|s| s.heartbeat.replicas.iter())
            .find(|r| r.partition == id && r.replica_id == leader)
            .cloned()
    });
    let replicas: Vec<Value> = entry
        .replicas
        .iter()
        .map(|replica| {
            let report = super::meta::report_of(seen, id, replica);
            let role = match report.map(|r| r.role.as_str()) {
                Some("leader") => "leader",
                Some("learner") => "learner",
                _ => "follower",
            };
            let matched = leader_report.as_ref().and_then(|l| l.matched.get(&replica.replica_id).copied().flatten());
            let mut value = json!({
                "replica_id": replica.replica_id,
                "node": replica.node,
                "disk": replica.disk,
                "state": meta.health(seen, id, replica).name(),
                "role": role,
                "matched_index": matched,
            });
            if let Some(old) = replica.replaces {
                value["replaces"] = old.into();
            }
            value
        })
        .collect();
    let leader_node = leader.and_then(|l| entry.replicas.iter().find(|r| r.replica_id == l)).map(|r| r.node.clone());
    json!({ "id": id, "epoch": entry.epoch, "leader": leader_node, "replicas": replicas })
}

/// `GET /v1/cluster`.
pub async fn get_cluster(State(node): State<Arc<Node>>, uri: Uri) -> Response {
    let Some(cluster) = node.cluster() else { return not_clustered() };
    let meta = match meta_here(&cluster, &uri) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    let map = match meta.read_map().await {
        Ok(map) => map,
        Err(error) => return meta_error(&cluster, &uri, error),
    };
    let seen = meta.seen();
    let nodes: Vec<Value> = map
        .nodes
        .iter()
        .map(|(id, entry)| {
            let last = seen.get(id);
            json!({
                "id": id,
                "advertise_url": entry.advertise_url,
                "peer_addr": entry.peer_addr,
                "state": if meta.is_up(id) { "up" } else { "down" },
                "draining": map.draining.contains(id),
                "replicas": map.replicas_on(id).count(),
                "last_heartbeat_ms": last.map(|s| s.at.elapsed().as_millis() as u64),
                "disks": last.map(|s| s.heartbeat.disks.iter().map(|d| json!({
                    "name": d.name, "free_bytes": d.free_bytes, "writable": d.writable,
                })).collect::<Vec<_>>()),
            })
        })
        .collect();
    let view = View::of(meta, &map);
    let partitions: Vec<Value> = map.partitions.keys().map(|id| cluster_partition(&view, *id)).collect();
    let meta_leader = meta.seed(meta.id).map(|s| s.node.clone());
    Json(json!({ "epoch": map.epoch, "meta_leader": meta_leader, "nodes": nodes, "partitions": partitions }))
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateClusterPartition {
    id: u64,
    replicas: Option<u64>,
}

/// `POST /v1/cluster/partitions` (admin).
pub async fn create_partition(State(node): State<Arc<Node>>, headers: HeaderMap, uri: Uri, body: Bytes) -> Response {
    if let Err(error) = api::require_admin(&node, &headers) {
        return error.into_response();
    }
    let Some(cluster) = node.cluster() else { return not_clustered() };
    let request: CreateClusterPartition = match api::admin_json(&body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    if request.id == super::transport::METADATA_GROUP {
        return ApiError::bad_request(format!("partition id {} is reserved for the metadata group", request.id))
            .into_response();
    }
    let replicas = request.replicas.unwrap_or(cluster.config.replication_factor);
    if !(1..=7).contains(&replicas) {
        return ApiError::bad_request(format!("replicas = {replicas} is outside 1..=7")).into_response();
    }
    if node.registry.get(request.id).is_some() {
        return ApiError::new(
            StatusCode::CONFLICT,
            "partition_exists",
            format!("partition {} exists on this node unreplicated", request.id),
        )
        .on(request.id)
        .into_response();
    }
    let meta = match meta_here(&cluster, &uri) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    match meta.create_partition(request.id, replicas as usize).await {
        Ok(_) => {
            tracing::info!(partition = request.id, replicas, "replicated partition created");
            let map = meta.read_map().await.unwrap_or_default();
            (StatusCode::CREATED, Json(cluster_partition(&View::of(meta, &map), request.id))).into_response()
        }
        Err(error) => meta_error(&cluster, &uri, error),
    }
}

/// `DELETE /v1/cluster/partitions/{pid}` (admin).
pub async fn delete_partition(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    uri: Uri,
    axum::extract::Path(pid): axum::extract::Path<String>,
) -> Response {
    if let Err(error) = api::require_admin(&node, &headers) {
        return error.into_response();
    }
    let Some(cluster) = node.cluster() else { return not_clustered() };
    let id = match api::partition_id(&pid) {
        Ok(id) => id,
        Err(error) => return error.into_response(),
    };
    let meta = match meta_here(&cluster, &uri) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    match meta.delete_partition(id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => meta_error(&cluster, &uri, error),
    }
}

/// `POST /v1/cluster/nodes/{id}/drain` (admin): every replica on the node
/// is moved to others (repairs at the repairer's pace and limits), and
/// none is placed there. `202` with the replicas still on it; `GET
/// /v1/cluster` shows the count fall to 0. `DELETE` ends the drain.
pub async fn drain_node(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    method: axum::http::Method,
    uri: Uri,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    if let Err(error) = api::require_admin(&node, &headers) {
        return error.into_response();
    }
    let Some(cluster) = node.cluster() else { return not_clustered() };
    let meta = match meta_here(&cluster, &uri) {
        Ok(meta) => meta,
        Err(response) => return *response,
    };
    if !body.is_empty()
        && let Err(error) = api::admin_json::<NoFields>(&body)
    {
        return error.into_response();
    }
    let draining = method == axum::http::Method::POST;
    if let Err(error) = meta.drain_node(&id, draining).await {
        return meta_error(&cluster, &uri, error);
    }
    tracing::info!(node = %id, draining, "drain");
    let map = match meta.read_map().await {
        Ok(map) => map,
        Err(error) => return meta_error(&cluster, &uri, error),
    };
    let status = if draining { StatusCode::ACCEPTED } else { StatusCode::OK };
    (status, Json(json!({ "node": id, "draining": draining, "replicas": map.replicas_on(&id).count() })))
        .into_response()
}

/// A body that may only be `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferLeader {
    /// The node to lead; by default the voter that holds the most of the log.
    to: Option<String>,
}

/// `POST /v1/cluster/partitions/{pid}/transfer-leader` (admin), served by
/// the group's leader (307 to it elsewhere): hands leadership to the
/// replica on node `to` (or the most caught-up other voter). `200` once it
/// leads, `202` when it has not taken over within two election timeouts.
pub async fn transfer_leader(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    uri: Uri,
    axum::extract::Path(pid): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    if let Err(error) = api::require_admin(&node, &headers) {
        return error.into_response();
    }
    let Some(cluster) = node.cluster() else { return not_clustered() };
    let partition = match api::partition_id(&pid) {
        Ok(id) => id,
        Err(error) => return error.into_response(),
    };
    let request: TransferLeader = if body.is_empty() {
        TransferLeader::default()
    } else {
        match api::admin_json(&body) {
            Ok(request) => request,
            Err(error) => return error.into_response(),
        }
    };
    let map = cluster.learned_map();
    let Some(entry) = map.partitions.get(&partition) else {
        return ApiError::partition_not_found(partition).into_response();
    };
    let (replica, raft) = match route(&cluster, partition) {
        Route::Here(replica, raft, _) => (replica, raft),
        Route::Leader(leader, url) => return redirect(Some(partition), &leader, &url, &uri),
        Route::NoLeader => return no_leader(Some(partition), "the partition").into_response(),
    };
    let metrics = raft.metrics().borrow_watched().clone();
    let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
    let target = match &request.to {
        // The newest voting replica on that node, never one being replaced.
        Some(name) => match entry
            .replicas
            .iter()
            .filter(|r| &r.node == name && voters.contains(&r.replica_id))
            .filter(|r| !entry.replicas.iter().any(|other| other.replaces == Some(r.replica_id)))
            .max_by_key(|r| r.replica_id)
        {
            Some(r) => r.replica_id,
            None => {
                return ApiError::bad_request(format!("node {name} holds no voting replica of partition {partition}"))
                    .on(partition)
                    .into_response();
            }
        },
        None => {
            let matched =
                |id: &u64| metrics.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|log| log.index);
            match voters.iter().filter(|v| **v != replica.replica_id).max_by_key(|v| matched(v)) {
                Some(v) => *v,
                None => {
                    return ApiError::new(StatusCode::CONFLICT, "no_other_voter", "the group has no other voter")
                        .on(partition)
                        .into_response();
                }
            }
        }
    };
    let node_of = |id: u64| entry.replicas.iter().find(|r| r.replica_id == id).map(|r| r.node.clone());
    if target == replica.replica_id {
        return Json(json!({ "partition": partition, "leader": node_of(target), "replica_id": target }))
            .into_response();
    }
    if let Err(fatal) = raft.trigger().transfer_leader(target).await {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "partition_unavailable", fatal.to_string())
            .on(partition)
            .into_response();
    }
    let wait = cluster.config.election_timeout * 2;
    let mut watch = raft.metrics();
    let led = tokio::time::timeout(wait, async {
        loop {
            if watch.borrow_watched().current_leader == Some(target) {
                return;
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok();
    let body = json!({ "partition": partition, "leader": node_of(target), "replica_id": target });
    if led { Json(body).into_response() } else { (StatusCode::ACCEPTED, Json(body)).into_response() }
}

fn not_clustered() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "not_clustered", "this node runs without [cluster]").into_response()
}
