//! The HTTP API (docs/API.md): routes, JSON bodies, and the one
//! function that maps every error to a status and the JSON error shape
//! `{"error": CODE, "message": TEXT, "partition": ID?, "state": STATE?}`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use datanode_partition::blob::MAX_KEY_LEN;
use datanode_partition::{DiskStatus, Error as PartitionError, Partition, RegistryError, State as PState};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;

use crate::auth::{bearer, constant_time_eq};
use crate::node::Node;

/// An API error: status, code, message and the optional context fields.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    partition: Option<u64>,
    state: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), partition: None, state: None }
    }

    pub(crate) fn on(mut self, partition: u64) -> ApiError {
        self.partition = Some(partition);
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn partition_not_found(id: u64) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "partition_not_found", format!("no partition {id}")).on(id)
    }
}

impl ApiError {
    fn body(&self) -> Value {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(partition) = self.partition {
            body["partition"] = partition.into();
        }
        if let Some(state) = self.state {
            body["state"] = state.into();
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

/// The JSON body for a response hyper gives by itself, before any route
/// sees the request (a request head it cannot parse: 400; a URI or
/// headers too large: 414, 431). Counted as `op="other"`.
pub fn protocol_error(status: StatusCode) -> Vec<u8> {
    let (code, message) = match status {
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request URI is too long"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => ("headers_too_large", "the request headers are too large"),
        _ => ("bad_request", "the request is not valid HTTP/1.1"),
    };
    metrics::counter!("datanode_requests_total", "op" => "other", "code" => status.as_u16().to_string()).increment(1);
    ApiError::new(status, code, message).body().to_string().into_bytes()
}

/// The one mapping from partition errors to HTTP.
fn partition_error(id: u64, error: PartitionError) -> ApiError {
    let (status, code, state) = match &error {
        PartitionError::Loading(_) => (StatusCode::SERVICE_UNAVAILABLE, "partition_unavailable", Some("loading")),
        PartitionError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "partition_unavailable", None),
        PartitionError::Faulted { .. } => (StatusCode::SERVICE_UNAVAILABLE, "partition_faulted", Some("faulted")),
        PartitionError::ReadOnly { .. } => (StatusCode::SERVICE_UNAVAILABLE, "partition_read_only", Some("read_only")),
        PartitionError::WriteOutcomeUnknown(_) => (StatusCode::INTERNAL_SERVER_ERROR, "write_outcome_unknown", None),
        PartitionError::NotFound => (StatusCode::NOT_FOUND, "blob_not_found", None),
        PartitionError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", None),
        PartitionError::BadRange { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "bad_range", None),
        PartitionError::BadSnapshot(_) => (StatusCode::BAD_REQUEST, "bad_snapshot", None),
        PartitionError::RecoverFailed(_) => (StatusCode::CONFLICT, "recover_failed", Some("faulted")),
        PartitionError::Read(_) | PartitionError::InstallFailed(_) | PartitionError::CompactionFailed(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "io_error", None)
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
    };
    ApiError { status, code, message: error.to_string(), partition: Some(id), state }
}

fn registry_error(error: RegistryError) -> ApiError {
    let (status, code, partition) = match &error {
        RegistryError::Exists(id) => (StatusCode::CONFLICT, "partition_exists", Some(*id)),
        RegistryError::NotFound(id) => (StatusCode::NOT_FOUND, "partition_not_found", Some(*id)),
        RegistryError::UnknownDisk(_) => (StatusCode::BAD_REQUEST, "unknown_disk", None),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "io_error", None),
    };
    ApiError { status, code, message: error.to_string(), partition, state: None }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// All routes, with request metrics around them.
pub fn router(node: Arc<Node>) -> Router {
    let limit = node.config.limits.max_blob_size as usize;
    let blobs = Router::new()
        .route("/v1/partitions/{pid}/blobs/{*key}", get(get_blob).put(put_blob).delete(delete_blob).head(head_blob))
        // An empty key: answered 400 by the key check, like any bad key.
        .route("/v1/partitions/{pid}/blobs/", get(get_blob).put(put_blob).delete(delete_blob).head(head_blob))
        // Before the body is read: a client without a credential cannot
        // make the node take in a large upload.
        .route_layer(middleware::from_fn_with_state(Arc::clone(&node), require_writer));
    Router::new()
        .merge(blobs)
        .route("/v1/partitions/{pid}/blobs", get(list_blobs))
        .route("/v1/partitions", get(list_partitions).post(create_partition))
        .route("/v1/partitions/{pid}", get(get_partition).delete(delete_partition))
        .route("/v1/partitions/{pid}/recover", post(recover_partition))
        .route("/v1/partitions/{pid}/read-only", post(set_read_only))
        .route("/v1/partitions/{pid}/compact", post(compact_partition))
        .route("/v1/partitions/{pid}/snapshot", get(export_snapshot).put(install_snapshot))
        .route("/v1/disks", get(list_disks))
        .route("/v1/cluster", get(crate::cluster::routes::get_cluster))
        .route("/v1/cluster/partitions", post(crate::cluster::routes::create_partition))
        .route("/v1/cluster/partitions/{pid}", axum::routing::delete(crate::cluster::routes::delete_partition))
        .route("/v1/cluster/partitions/{pid}/transfer-leader", post(crate::cluster::routes::transfer_leader))
        .route(
            "/v1/cluster/nodes/{id}/drain",
            post(crate::cluster::routes::drain_node).delete(crate::cluster::routes::drain_node),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
        })
        .layer(axum::extract::DefaultBodyLimit::max(limit.max(1 << 20)))
        .layer(middleware::from_fn(observe))
        .with_state(node)
}

/// What the listener serves from the start: while the partitions load,
/// `/healthz` (200), `/metrics`, and 503 `not_ready` ("loading") for
/// `/readyz` and everything else (nothing attempted, safe to retry); once
/// `api` is set, every request goes to it.
pub fn loading_router(
    api: Arc<std::sync::OnceLock<Router>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Router {
    Router::new().fallback(move |request: Request| {
        let (api, metrics) = (Arc::clone(&api), metrics.clone());
        async move {
            if let Some(router) = api.get() {
                let mut router = router.clone();
                return match tower_service::Service::call(&mut router, request).await {
                    Ok(response) => response,
                    Err(infallible) => match infallible {},
                };
            }
            match request.uri().path() {
                "/healthz" => Json(json!({ "status": "ok" })).into_response(),
                "/metrics" => metrics_response(metrics.render()),
                // A request for a partition gets the code every client
                // already retries on: nothing was attempted, the partition
                // is loading.
                path if path.starts_with("/v1/partitions") => {
                    let mut error = ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "partition_unavailable",
                        "the node is loading its partitions; nothing was attempted",
                    );
                    error.state = Some("loading");
                    let id = path.strip_prefix("/v1/partitions/").and_then(|rest| rest.split('/').next());
                    match id.and_then(|id| id.parse().ok()) {
                        Some(id) => error.on(id).into_response(),
                        None => error.into_response(),
                    }
                }
                _ => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "loading").into_response(),
            }
        }
    })
}

fn metrics_response(text: String) -> Response {
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// Counts and times every request: `datanode_requests_total{op,code}`,
/// `datanode_request_seconds{op}`.
async fn observe(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
    let op = operation(request.method(), &route);
    let partition = request
        .uri()
        .path()
        .strip_prefix("/v1/partitions/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|pid| partition_id(pid).ok());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::counter!("datanode_requests_total", "op" => op, "code" => response.status().as_u16().to_string())
        .increment(1);
    metrics::histogram!("datanode_request_seconds", "op" => op).record(started.elapsed().as_secs_f64());
    log_admin(op, partition, response.status(), started.elapsed());
    response
}

/// Every admin call is logged with its outcome: INFO when it changed
/// what it was asked to, WARN when it was refused (401 at WARN too, so a
/// wrong token is seen).
fn log_admin(op: &'static str, partition: Option<u64>, status: StatusCode, took: std::time::Duration) {
    const ADMIN: [&str; 6] =
        ["create_partition", "delete_partition", "recover", "read_only", "export_snapshot", "install_snapshot"];
    if !ADMIN.contains(&op) {
        return;
    }
    let (code, seconds) = (status.as_u16(), took.as_secs_f64());
    if status == StatusCode::UNAUTHORIZED {
        tracing::warn!(op, partition, status = code, "admin call refused: no valid bearer token");
    } else if status.is_success() {
        tracing::info!(op, partition, status = code, seconds, "admin action");
    } else {
        tracing::warn!(op, partition, status = code, seconds, "admin action failed");
    }
}

fn operation(method: &Method, route: &str) -> &'static str {
    match (method.as_str(), route) {
        ("PUT", "/v1/partitions/{pid}/blobs/{*key}" | "/v1/partitions/{pid}/blobs/") => "put_blob",
        ("GET", "/v1/partitions/{pid}/blobs/{*key}" | "/v1/partitions/{pid}/blobs/") => "get_blob",
        ("HEAD", "/v1/partitions/{pid}/blobs/{*key}" | "/v1/partitions/{pid}/blobs/") => "head_blob",
        ("DELETE", "/v1/partitions/{pid}/blobs/{*key}" | "/v1/partitions/{pid}/blobs/") => "delete_blob",
        ("GET", "/v1/partitions/{pid}/blobs") => "list_blobs",
        ("GET", "/v1/partitions") => "list_partitions",
        ("POST", "/v1/partitions") => "create_partition",
        ("GET", "/v1/partitions/{pid}") => "get_partition",
        ("DELETE", "/v1/partitions/{pid}") => "delete_partition",
        ("POST", "/v1/partitions/{pid}/recover") => "recover",
        ("POST", "/v1/partitions/{pid}/read-only") => "read_only",
        ("POST", "/v1/partitions/{pid}/compact") => "compact",
        ("GET", "/v1/partitions/{pid}/snapshot") => "export_snapshot",
        ("PUT", "/v1/partitions/{pid}/snapshot") => "install_snapshot",
        ("GET", "/v1/disks") => "list_disks",
        ("GET", "/healthz") => "healthz",
        ("GET", "/readyz") => "readyz",
        ("GET", "/metrics") => "metrics",
        ("GET", "/v1/cluster") => "get_cluster",
        ("POST", "/v1/cluster/partitions") => "create_cluster_partition",
        ("DELETE", "/v1/cluster/partitions/{pid}") => "delete_cluster_partition",
        ("POST", "/v1/cluster/partitions/{pid}/transfer-leader") => "transfer_cluster_leader",
        ("POST", "/v1/cluster/nodes/{id}/drain") => "drain_cluster_node",
        ("DELETE", "/v1/cluster/nodes/{id}/drain") => "undrain_cluster_node",
        _ => "other",
    }
}

/// The `{pid}` segment of `/v1/partitions/{pid}/...`, taken from the raw
/// path so that no extractor can answer a malformed path in plain text.
struct Pid(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Pid {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Pid, ApiError> {
        let rest = parts.uri.path().strip_prefix("/v1/partitions/").unwrap_or_default();
        Ok(Pid(rest.split('/').next().unwrap_or_default().to_string()))
    }
}

/// The blob key of a request, as raw bytes: the percent-decoded path after
/// `/blobs/`. Keys are arbitrary bytes, so they are not decoded as UTF-8.
fn blob_key(uri: &Uri) -> ApiResult<Vec<u8>> {
    let encoded = uri.path().split_once("/blobs/").map(|(_, key)| key).unwrap_or_default();
    let key = percent_decode(encoded.as_bytes(), false)
        .ok_or_else(|| ApiError::bad_request("bad percent-encoding in the key"))?;
    if !(1..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(ApiError::bad_request(format!("a key is 1..={MAX_KEY_LEN} bytes, not {}", key.len())));
    }
    Ok(key)
}

/// Percent-decodes `bytes` into raw bytes (never as UTF-8); in a query,
/// `+` is a space as in HTML forms. `None` for a bad escape.
fn percent_decode(bytes: &[u8], plus_is_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok())?;
                out.push(u8::from_str_radix(hex, 16).ok().filter(|_| hex.bytes().all(|b| b.is_ascii_hexdigit()))?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Some(out)
}

/// A partition id in a path: canonical decimal only (`7`, not `007` or
/// `+7`), so that one partition has one name.
pub(crate) fn partition_id(raw: &str) -> ApiResult<u64> {
    let id: Option<u64> = raw.bytes().all(|b| b.is_ascii_digit()).then(|| raw.parse().ok()).flatten();
    id.filter(|id| id.to_string() == raw)
        .ok_or_else(|| ApiError::bad_request(format!("partition id {raw:?} is not a canonical decimal number")))
}

/// The cluster and the id, when `raw` names a replicated partition (its
/// requests are served by `cluster::routes`).
fn replicated(node: &Node, raw: &str) -> Option<(Arc<crate::cluster::Cluster>, u64)> {
    let cluster = node.cluster()?;
    let id = partition_id(raw).ok()?;
    cluster.is_replicated(id).then_some((cluster, id))
}

/// The unreplicated partition `raw` names. A replicated one is refused
/// with 409 `replicated_partition`: what reaches here is an admin call on
/// one partition (install, recover, read-only, compact, delete, export),
/// and the state of a replica is its group's to decide.
/// [`replicated`], after asking the metadata leader once when the id is
/// neither a partition here nor one this node knows replicated: one
/// created a moment ago is served, not answered 404.
async fn replicated_now(node: &Node, raw: &str) -> Option<(Arc<crate::cluster::Cluster>, u64)> {
    if let Some(found) = replicated(node, raw) {
        return Some(found);
    }
    let cluster = node.cluster()?;
    let id = partition_id(raw).ok()?;
    if node.registry.get(id).is_some() {
        return None;
    }
    cluster.refresh().await;
    replicated(node, raw)
}

fn partition(node: &Node, raw: &str) -> ApiResult<(u64, Arc<Partition>)> {
    let id = partition_id(raw)?;
    if let Some(cluster) = node.cluster()
        && cluster.is_replicated(id)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "replicated_partition",
            format!(
                "partition {id} is replicated: this call is not made on one replica (only the group's leader \
                 feeds a voter; use /v1/cluster/partitions)"
            ),
        )
        .on(id));
    }
    let partition = node.registry.get(id).ok_or_else(|| ApiError::partition_not_found(id))?;
    Ok((id, partition))
}

pub(crate) fn require_admin(node: &Node, headers: &HeaderMap) -> ApiResult<()> {
    if node.admin_token.is_none() || is_admin(node, headers) {
        return Ok(());
    }
    metrics::counter!("datanode_auth_rejected_total", "reason" => "admin").increment(1);
    Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "admin endpoint: bearer token required"))
}

/// Whether the request carries the admin token (there is one).
fn is_admin(node: &Node, headers: &HeaderMap) -> bool {
    let offered = bearer(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    match (offered, &node.admin_token) {
        (Some(offered), Some(token)) => constant_time_eq(offered.as_bytes(), token.as_bytes()),
        _ => false,
    }
}

/// PUT and DELETE of a blob need a data token (or the admin token) when
/// `auth.data_tokens = "required"`: 401 `unauthorized` otherwise, with
/// nothing attempted. A partition id that is not canonical goes on to the
/// handler's 400.
async fn require_writer(State(node): State<Arc<Node>>, request: Request, next: Next) -> Response {
    if !matches!(*request.method(), Method::PUT | Method::DELETE) || !node.data_auth.required() {
        return next.run(request).await;
    }
    let raw = request.uri().path().strip_prefix("/v1/partitions/").and_then(|rest| rest.split('/').next());
    let Some(id) = raw.and_then(|raw| partition_id(raw).ok()) else { return next.run(request).await };
    if is_admin(&node, request.headers()) {
        return next.run(request).await;
    }
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match node.data_auth.check(id, authorization) {
        Ok(()) => next.run(request).await,
        Err(denied) => {
            metrics::counter!("datanode_auth_rejected_total", "reason" => denied.as_str()).increment(1);
            let mut response =
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", denied.message()).on(id).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            // The body was not read: the connection cannot carry another
            // request, and the client is told so.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

fn refuse_if_draining(node: &Node, id: u64) -> ApiResult<()> {
    if node.draining.load(Ordering::Acquire) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the node is shutting down").on(id));
    }
    Ok(())
}

/// A permit for one blocking operation on `disk`, or 503
/// `partition_unavailable` at once when the disk already holds
/// `max_blocking_per_disk` of them (a slow or hung disk): nothing was
/// attempted, so it is safe to retry, here later or elsewhere.
fn disk_permit(node: &Node, id: Option<u64>, disk: &str) -> ApiResult<OwnedSemaphorePermit> {
    node.disk_permit(disk).ok_or_else(|| {
        let error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "partition_unavailable",
            format!(
                "disk {disk} is busy: {} blocking operations are running on it; nothing was attempted",
                node.config.limits.max_blocking_per_disk
            ),
        );
        match id {
            Some(id) => error.on(id),
            None => error,
        }
    })
}

/// Runs blocking partition work on a blocking thread, holding one of its
/// disk's permits until the work returns (however long after the answer),
/// bounded by the request timeout. For reads: safe to retry.
async fn blocking<T: Send + 'static>(
    node: &Node,
    id: u64,
    disk: &str,
    work: impl FnOnce() -> Result<T, PartitionError> + Send + 'static,
) -> ApiResult<T> {
    let permit = disk_permit(node, Some(id), disk)?;
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    });
    match tokio::time::timeout(node.config.limits.request_timeout, task).await {
        Ok(Ok(result)) => result.map_err(|e| partition_error(id, e)),
        Ok(Err(_)) => {
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request's task failed").on(id))
        }
        Err(_) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the partition did not answer in time")
                .on(id))
        }
    }
}

/// Runs an admin change on a blocking thread to its end, without
/// `request_timeout`: once a change is under way the answer is its real
/// outcome, never a timeout while it goes on to complete. Holds one of
/// the disk's permits (taken before anything starts) while it runs.
async fn to_completion<T: Send + 'static, E: Send + 'static>(
    permit: OwnedSemaphorePermit,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
    error: impl FnOnce(E) -> ApiError,
) -> ApiResult<T> {
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    });
    match task.await {
        Ok(result) => result.map_err(error),
        Err(_) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request's task failed")),
    }
}

/// A request body, or the JSON error for one that is too large (stating
/// `limit`, e.g. "limits.max_blob_size = 16MiB") or broken.
fn body_or_error(body: Result<Bytes, BytesRejection>, limit: &str) -> ApiResult<Bytes> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(limit),
        _ => ApiError::bad_request(format!("the request body broke off: {}", rejection.body_text())),
    })
}

fn too_large(limit: &str) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("the body is larger than {limit}"))
}

/// The limit of a blob, as a 413 states it.
fn blob_limit(node: &Node) -> String {
    format!("limits.max_blob_size = {}", crate::config::size_text(node.config.limits.max_blob_size))
}

/// The limit of an admin call's JSON body (that of a blob, at least
/// 1MiB), as a 413 states it.
fn admin_limit(node: &Node) -> String {
    let limit = node.config.limits.max_blob_size.max(1 << 20);
    format!("the {} a request body may have", crate::config::size_text(limit))
}

async fn put_blob(
    State(node): State<Arc<Node>>,
    Pid(pid): Pid,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    if let Some((cluster, id)) = replicated_now(&node, &pid).await {
        let key = blob_key(&uri)?;
        refuse_if_draining(&node, id)?;
        let body = body_or_error(body, &blob_limit(&node)).map_err(|e| e.on(id))?;
        if body.len() as u64 > node.config.limits.max_blob_size {
            return Err(too_large(&blob_limit(&node)).on(id));
        }
        return Ok(crate::cluster::routes::put_blob(&node, &cluster, id, &uri, &key, body).await);
    }
    let (id, partition) = partition(&node, &pid)?;
    let key = blob_key(&uri)?;
    refuse_if_draining(&node, id)?;
    let body = body_or_error(body, &blob_limit(&node)).map_err(|e| e.on(id))?;
    if body.len() as u64 > node.config.limits.max_blob_size {
        return Err(too_large(&blob_limit(&node)).on(id));
    }
    let put = partition.put(&key, &body);
    let ack = match tokio::time::timeout(node.config.limits.request_timeout, put).await {
        Ok(result) => result.map_err(|e| partition_error(id, e))?,
        Err(_) => return Err(write_timed_out(id)),
    };
    Ok((StatusCode::CREATED, Json(json!({ "lsn": ack.lsn, "size": ack.size }))).into_response())
}

async fn delete_blob(State(node): State<Arc<Node>>, Pid(pid): Pid, uri: Uri) -> ApiResult<Response> {
    if let Some((cluster, id)) = replicated_now(&node, &pid).await {
        let key = blob_key(&uri)?;
        refuse_if_draining(&node, id)?;
        return Ok(crate::cluster::routes::delete_blob(&node, &cluster, id, &uri, &key).await);
    }
    let (id, partition) = partition(&node, &pid)?;
    let key = blob_key(&uri)?;
    refuse_if_draining(&node, id)?;
    match tokio::time::timeout(node.config.limits.request_timeout, partition.delete(&key)).await {
        Ok(result) => result.map(|_| StatusCode::NO_CONTENT.into_response()).map_err(|e| partition_error(id, e)),
        Err(_) => Err(write_timed_out(id)),
    }
}

/// A put or delete that did not finish within `request_timeout` is still
/// queued or being synced: it may yet become durable, so it is not a 503
/// ("not attempted, retry elsewhere") but `write_outcome_unknown`.
fn write_timed_out(id: u64) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "write_outcome_unknown",
        "the partition did not answer within request_timeout; the write may still become durable",
    )
    .on(id)
}

/// `Range: bytes=a-b | a- | -n` against a blob of `len` bytes, as a
/// half-open range. Several ranges are not supported.
pub(crate) fn parse_range(header: &str, len: u64) -> Option<std::ops::Range<u64>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let range = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            len.saturating_sub(n)..len
        }
        (start, "") => start.parse().ok()?..len,
        (start, end) => start.parse().ok()?..end.parse::<u64>().ok()?.checked_add(1)?.min(len),
    };
    (range.start < range.end && range.end <= len).then_some(range)
}

async fn read_blob(node: Arc<Node>, pid: String, uri: Uri, headers: HeaderMap, head_only: bool) -> ApiResult<Response> {
    if let Some((cluster, id)) = replicated_now(&node, &pid).await {
        let key = blob_key(&uri)?;
        return Ok(crate::cluster::routes::read_blob(&node, &cluster, id, &uri, key, &headers, head_only).await);
    }
    let (id, partition) = partition(&node, &pid)?;
    let key = blob_key(&uri)?;
    let len = partition.len_of(&key).map_err(|e| partition_error(id, e))?;
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => {
            let parsed = value.to_str().ok().and_then(|v| parse_range(v, len));
            Some(parsed.ok_or_else(|| {
                ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "bad_range",
                    format!("cannot serve that range of {len} bytes"),
                )
                .on(id)
            })?)
        }
    };
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let mut response = if head_only {
        let length = range.as_ref().map_or(len, |r| r.end - r.start);
        let mut response = Response::new(Body::empty());
        response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        response
    } else {
        // Served in place when the page cache holds it; a read that would
        // wait for the disk goes to a blocking thread, where a hung disk
        // stalls only that request.
        let bytes = match partition.get_cached(&key, range.clone()) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                let (wanted, disk) = (range.clone(), partition.disk().to_string());
                blocking(&node, id, &disk, move || partition.get(&key, wanted)).await?
            }
            Err(error) => return Err(partition_error(id, error)),
        };
        Response::new(Body::from(bytes))
    };
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    response.headers_mut().insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(range) = range {
        let value = format!("bytes {}-{}/{len}", range.start, range.end - 1);
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
    }
    Ok(response)
}

async fn get_blob(State(node): State<Arc<Node>>, Pid(pid): Pid, uri: Uri, headers: HeaderMap) -> ApiResult<Response> {
    read_blob(node, pid, uri, headers, false).await
}

async fn head_blob(State(node): State<Arc<Node>>, Pid(pid): Pid, uri: Uri, headers: HeaderMap) -> ApiResult<Response> {
    read_blob(node, pid, uri, headers, true).await
}

/// Largest `limit` of a listing.
const MAX_LIST_LIMIT: usize = 10_000;

/// `?prefix=&after=&limit=` of a listing. `prefix` and `after` are raw
/// bytes, percent-decoded from the raw query, so that any key (binary or
/// not) can be a prefix or a resume point.
#[derive(Debug, PartialEq)]
pub(crate) struct ListQuery {
    pub prefix: Vec<u8>,
    pub after: Option<Vec<u8>>,
    pub limit: usize,
}

fn list_query(raw: Option<&str>) -> ApiResult<ListQuery> {
    let mut query = ListQuery { prefix: Vec::new(), after: None, limit: 1000 };
    let (mut prefix_seen, mut limit_seen) = (false, false);
    for pair in raw.unwrap_or_default().split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value.as_bytes(), true)
            .ok_or_else(|| ApiError::bad_request(format!("bad percent-encoding in {name:?}")))?;
        let repeated = match name {
            "prefix" => std::mem::replace(&mut prefix_seen, true),
            "after" => query.after.is_some(),
            "limit" => std::mem::replace(&mut limit_seen, true),
            other => return Err(ApiError::bad_request(format!("unknown query parameter {other:?}"))),
        };
        if repeated {
            return Err(ApiError::bad_request(format!("query parameter {name:?} given twice")));
        }
        match name {
            "prefix" => query.prefix = value,
            "after" => query.after = Some(value),
            _ => {
                let text = String::from_utf8_lossy(&value);
                query.limit =
                    text.parse::<usize>().ok().filter(|limit| (1..=MAX_LIST_LIMIT).contains(limit)).ok_or_else(
                        || ApiError::bad_request(format!("limit {text:?} is not in 1..={MAX_LIST_LIMIT}")),
                    )?;
            }
        }
    }
    Ok(query)
}

/// A key as JSON: a string when it is UTF-8, else `{"base64": ...}`.
pub(crate) fn key_json(key: &[u8]) -> Value {
    match std::str::from_utf8(key) {
        Ok(text) => Value::String(text.to_string()),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(key) }),
    }
}

async fn list_blobs(State(node): State<Arc<Node>>, Pid(pid): Pid, uri: Uri) -> ApiResult<Response> {
    let query = list_query(uri.query())?;
    if let Some((cluster, id)) = replicated_now(&node, &pid).await {
        return Ok(crate::cluster::routes::list_blobs(&node, &cluster, id, &uri, query).await);
    }
    let (id, partition) = partition(&node, &pid)?;
    let (keys, next) =
        partition.list(&query.prefix, query.after.as_deref(), query.limit).map_err(|e| partition_error(id, e))?;
    let keys: Vec<Value> = keys.iter().map(|k| key_json(k)).collect();
    Ok(Json(json!({ "keys": keys, "next": next.as_deref().map(key_json) })).into_response())
}

/// RFC 3339 in UTC, from the civil-from-days algorithm (no time zone data needed).
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `PartitionStatus`, as docs/API.md describes it.
pub fn partition_status(partition: &Partition) -> Value {
    let health = partition.health().snapshot();
    let reasons: Vec<&str> = match &health.state {
        PState::ReadOnly(reasons) => reasons.iter().map(|r| r.as_str()).collect(),
        PState::Faulted(fault) => vec![fault.cause.as_str()],
        _ => Vec::new(),
    };
    let stats = partition.stats();
    json!({
        "id": partition.id(),
        "disk": partition.disk(),
        "state": health.state.name(),
        "reasons": reasons,
        "since": rfc3339(health.since),
        "last_error": health.last_error.map(|e| json!({
            "op": e.op, "errno": e.errno, "message": e.message, "at": rfc3339(e.at),
        })),
        "wal": {
            "first_lsn": stats.first_lsn,
            "last_lsn": stats.last_lsn,
            "durable_lsn": stats.durable_lsn,
            "queued_bytes": stats.queued_bytes,
            "segments": stats.wal.segments,
            "bytes": stats.wal.log_bytes,
        },
        "blobs": stats.blobs,
        "live_bytes": stats.live_bytes,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFilter {
    state: Option<String>,
}

async fn list_partitions(
    State(node): State<Arc<Node>>,
    query: Result<Query<StateFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(filter) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if let Some(state) = &filter.state
        && !datanode_partition::state::STATE_NAMES.contains(&state.as_str())
    {
        return Err(ApiError::bad_request(format!("unknown state {state:?}")));
    }
    let statuses: Vec<Value> = node
        .registry
        .partitions()
        .iter()
        .filter(|p| filter.state.as_deref().is_none_or(|s| p.health().state().name() == s))
        .map(|p| partition_status(p))
        .collect();
    let mut statuses = statuses;
    if let Some(cluster) = node.cluster() {
        statuses.extend(
            cluster
                .replicas()
                .iter()
                .map(|replica| crate::cluster::routes::replica_status(replica))
                .filter(|status| filter.state.as_deref().is_none_or(|s| status["state"] == s)),
        );
    }
    Ok(Json(Value::Array(statuses)))
}

async fn get_partition(State(node): State<Arc<Node>>, Pid(pid): Pid, uri: Uri) -> ApiResult<Response> {
    if let Some((cluster, id)) = replicated_now(&node, &pid).await {
        return Ok(crate::cluster::routes::partition_status(&cluster, id, &uri));
    }
    let (_, partition) = partition(&node, &pid)?;
    Ok(Json(partition_status(&partition)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePartition {
    id: u64,
    disk: String,
}

pub(crate) fn admin_json<T: for<'de> Deserialize<'de>>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))
}

async fn create_partition(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    require_admin(&node, &headers)?;
    let request: CreatePartition = admin_json(&body_or_error(body, &admin_limit(&node))?)?;
    let registry = Arc::clone(&node.registry);
    if !node.disk_permits.contains_key(&request.disk) {
        return Err(registry_error(RegistryError::UnknownDisk(request.disk)));
    }
    let permit = disk_permit(&node, Some(request.id), &request.disk)?;
    let (id, disk) = (request.id, request.disk.clone());
    let created = to_completion(permit, move || registry.create(request.id, &request.disk), registry_error).await?;
    tracing::info!(partition = id, disk, "partition created by an admin call");
    Ok((StatusCode::CREATED, Json(partition_status(&created))).into_response())
}

async fn delete_partition(State(node): State<Arc<Node>>, headers: HeaderMap, Pid(pid): Pid) -> ApiResult<StatusCode> {
    require_admin(&node, &headers)?;
    let id = partition_id(&pid)?;
    let (_, partition) = partition(&node, &pid)?;
    let permit = disk_permit(&node, Some(id), partition.disk())?;
    let registry = Arc::clone(&node.registry);
    to_completion(permit, move || registry.delete(id), registry_error).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn recover_partition(State(node): State<Arc<Node>>, headers: HeaderMap, Pid(pid): Pid) -> ApiResult<Json<Value>> {
    require_admin(&node, &headers)?;
    let (id, partition) = partition(&node, &pid)?;
    let permit = disk_permit(&node, Some(id), partition.disk())?;
    let worker = Arc::clone(&partition);
    let recovered = to_completion(permit, move || worker.recover(), |e| partition_error(id, e)).await;
    node.registry.sync_fault_journal();
    recovered?;
    Ok(Json(partition_status(&partition)))
}

/// `POST /v1/partitions/{pid}/compact`: compacts now, within the disk's
/// copy budget; answers what it gave back.
async fn compact_partition(State(node): State<Arc<Node>>, headers: HeaderMap, Pid(pid): Pid) -> ApiResult<Json<Value>> {
    require_admin(&node, &headers)?;
    let (id, partition) = partition(&node, &pid)?;
    let permit = disk_permit(&node, Some(id), partition.disk())?;
    let budget = Some(node.config.compaction.max_bytes_per_sec);
    let report = to_completion(permit, move || partition.compact_limited(budget), |e| partition_error(id, e)).await?;
    Ok(Json(json!({ "reclaimed_bytes": report.reclaimed_bytes(), "copied_bytes": report.copied_bytes })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadOnlyRequest {
    read_only: bool,
}

async fn set_read_only(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Pid(pid): Pid,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    require_admin(&node, &headers)?;
    let request: ReadOnlyRequest = admin_json(&body_or_error(body, &admin_limit(&node))?)?;
    let (_, partition) = partition(&node, &pid)?;
    partition.set_operator_read_only(request.read_only);
    Ok(Json(partition_status(&partition)))
}

async fn export_snapshot(State(node): State<Arc<Node>>, headers: HeaderMap, Pid(pid): Pid) -> ApiResult<Response> {
    require_admin(&node, &headers)?;
    let (id, partition) = partition(&node, &pid)?;
    let permit = disk_permit(&node, Some(id), partition.disk())?;
    // Taking the key list copies the whole index: not on an async worker.
    let export = match tokio::task::spawn_blocking(move || partition.export()).await {
        Ok(result) => result.map_err(|e| partition_error(id, e))?,
        Err(_) => {
            return Err(
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request's task failed").on(id)
            );
        }
    };
    // Each piece needs a blocking read; stream them from a blocking thread.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        for piece in export {
            let item = piece.map_err(|e| std::io::Error::other(e.to_string()));
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let stream = futures_stream(rx);
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(response)
}

/// A channel receiver as a stream of body chunks.
fn futures_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn install_snapshot(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Pid(pid): Pid,
    body: Body,
) -> ApiResult<Json<Value>> {
    require_admin(&node, &headers)?;
    let (id, partition) = partition(&node, &pid)?;
    // The image streams from the connection into the install, which runs
    // on a blocking thread; it is never held in memory whole.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let permit = disk_permit(&node, Some(id), partition.disk())?;
    let worker = Arc::clone(&partition);
    let install = to_completion(
        permit,
        move || worker.install(ChannelReader { rx, current: Bytes::new() }),
        |e| partition_error(id, e),
    );
    let limit = node.snapshot_limit();
    let feed = async move {
        let mut stream = body.into_data_stream();
        let mut total = 0usize;
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            let Ok(chunk) = chunk else {
                return Err(ApiError::bad_request("the request body broke off").on(id));
            };
            total += chunk.len();
            if total > limit {
                let limit = format!("the {} a snapshot image may have", crate::config::size_text(limit as u64));
                return Err(too_large(&limit).on(id));
            }
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        Ok(())
    };
    let (installed, fed) = tokio::join!(install, feed);
    // An install that completed changed the partition: that is the answer,
    // whatever happened to the rest of the body. One that did not changed
    // nothing; if the body broke off, that is why (it saw a truncated
    // image and refused it).
    match (installed, fed) {
        (Ok(()), _) => Ok(Json(partition_status(&partition))),
        (Err(_), Err(body_error)) => Err(body_error),
        (Err(error), Ok(())) => Err(error),
    }
}

/// Chunks arriving on a channel as a blocking `Read`.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

fn disk_json(status: &DiskStatus) -> Value {
    json!({
        "name": status.name,
        "path": status.path,
        "state": status.state.as_str(),
        "reasons": status.reasons,
        "total_bytes": status.total_bytes,
        "free_bytes": status.free_bytes,
        "partitions": status.partitions,
        "last_probe": status.last_probe.as_ref().map(|p| json!({
            "at": rfc3339(p.at), "sync_seconds": p.sync_seconds, "ok": p.ok,
        })),
    })
}

async fn list_disks(State(node): State<Arc<Node>>) -> Json<Value> {
    Json(Value::Array(node.registry.disk_statuses().iter().map(disk_json).collect()))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(node): State<Arc<Node>>) -> ApiResult<Json<Value>> {
    match node.not_ready_reason() {
        None => Ok(Json(json!({ "status": "ready" }))),
        Some(reason) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", reason)),
    }
}

async fn metrics_text(State(node): State<Arc<Node>>) -> Response {
    node.export_gauges();
    let mut text = node.metrics.render();
    text.push_str(&crate::exposition::process_metrics());
    metrics_response(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110_for_single_ranges() {
        assert_eq!(parse_range("bytes=0-4", 10), Some(0..5));
        assert_eq!(parse_range("bytes=5-", 10), Some(5..10));
        assert_eq!(parse_range("bytes=-3", 10), Some(7..10));
        assert_eq!(parse_range("bytes=8-100", 10), Some(8..10));
        for bad in ["bytes=10-", "bytes=5-2", "items=0-1", "bytes=0-1,3-4", "bytes=a-b", "bytes=-0", ""] {
            assert_eq!(parse_range(bad, 10), None, "{bad}");
        }
    }

    #[test]
    fn list_queries_decode_raw_bytes_and_refuse_bad_limits() {
        let parsed = list_query(Some("prefix=%FF%00a+b&after=%FF&limit=10000")).unwrap();
        assert_eq!(parsed, ListQuery { prefix: b"\xff\x00a b".to_vec(), after: Some(vec![0xff]), limit: 10_000 });
        assert_eq!(list_query(None).unwrap(), ListQuery { prefix: Vec::new(), after: None, limit: 1000 });
        assert_eq!(list_query(Some("after=&")).unwrap().after, Some(Vec::new()));
        for bad in ["limit=0", "limit=10001", "limit=+5", "prefix=%f", "prefix=%+f", "x=1", "limit=1&limit=2"] {
            assert!(list_query(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(percent_decode(b"a+%2B", false), Some(b"a++".to_vec()));
    }

    #[test]
    fn partition_ids_are_canonical_decimal() {
        assert_eq!(partition_id("7").ok(), Some(7));
        assert_eq!(partition_id("0").ok(), Some(0));
        for bad in ["007", "00", "+7", "-7", "", "7a", " 7", "18446744073709551616"] {
            assert!(partition_id(bad).is_err(), "{bad:?}");
        }
    }

    /// Every operation `docs/openapi.yaml` lists: (method, path, operationId).
    fn spec_operations() -> Vec<(String, String, String)> {
        let spec = include_str!("../docs/openapi.yaml");
        let paths = spec.split_once("\npaths:\n").map(|(_, rest)| rest).unwrap_or_default();
        let (mut path, mut method, mut found) = (String::new(), String::new(), Vec::new());
        for line in paths.lines() {
            if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
                path = format!("/{p}");
            } else if let Some(m) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':'))
                && ["get", "put", "post", "delete", "head"].contains(&m)
            {
                method = m.to_ascii_uppercase();
            } else if let Some(id) = line.strip_prefix("      operationId: ") {
                found.push((method.clone(), path.clone(), id.trim().to_string()));
            }
        }
        found
    }

    #[test]
    fn the_openapi_spec_lists_every_route_of_the_router_with_its_operation() {
        let operations = spec_operations();
        let all: std::collections::BTreeSet<&str> = [
            "put_blob",
            "get_blob",
            "head_blob",
            "delete_blob",
            "list_blobs",
            "list_partitions",
            "create_partition",
            "get_partition",
            "delete_partition",
            "recover",
            "read_only",
            "compact",
            "export_snapshot",
            "install_snapshot",
            "list_disks",
            "healthz",
            "readyz",
            "metrics",
            "get_cluster",
            "create_cluster_partition",
            "delete_cluster_partition",
            "transfer_cluster_leader",
            "drain_cluster_node",
            "undrain_cluster_node",
        ]
        .into();
        for (method, path, id) in &operations {
            let route = path.replace("{key}", "{*key}");
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(operation(&method, &route), id, "{method} {path}: the spec's operationId is the router's op");
        }
        let listed: std::collections::BTreeSet<&str> = operations.iter().map(|(_, _, id)| id.as_str()).collect();
        assert_eq!(listed, all, "the spec lists every operation of the router, once");
        assert_eq!(operations.len(), all.len());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_763_700_000);
        assert_eq!(rfc3339(at), "2025-11-21T04:40:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
