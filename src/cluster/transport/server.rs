//! The peer listener: HTTP/2 (prior knowledge, no upgrade) on the node's
//! peer address, separate from the client API's listener.
//!
//! - **Admission**: every accepted connection goes through
//!   [`PeerAdmission::admit`] first, within
//!   [`PeerServerOptions::admission_timeout`], which may refuse it or hand
//!   back the stream to serve. A refused connection is closed at once,
//!   before any HTTP/2 byte is read from it, so nothing it sent reaches a
//!   group; it is counted in `datanode_peer_rejected_total{reason}` (see
//!   [`RejectReason`]) and logged (WARN, at most [`REFUSALS_LOGGED`] lines
//!   per [`REFUSAL_LOG_WINDOW`], then a count of those left out).
//!   [`super::handshake::SecretAdmission`] admits peers that prove the
//!   cluster secret; [`super::peer_tls::TlsAdmission`] peers with a node
//!   certificate (mutual TLS), and knows which node each one is;
//!   [`AdmitAll`] admits every connection as it is.
//! - **The sender is the node admitted**: on a connection admitted with a
//!   node's certificate, every Raft request names its sender replica, and
//!   a sender that [`PeerServerOptions::senders`] does not place on that
//!   node is refused 403 `wrong_node` (counted under that reason) before
//!   its body is read; control messages get the node to check theirs.
//!   A stolen certificate speaks for its own node only.
//! - **Checks on arrival**: the path names the group and target replica;
//!   a group not hosted here, or a replica of it that is not, is refused
//!   404 (`unknown_group`, `unknown_replica`) before the body is read.
//!   Bytes that do not decode are 400 `bad_request`; every refusal has
//!   the JSON error shape of [`wire`].
//! - **Bounds**: a non-snapshot body larger than
//!   [`PeerServerOptions::max_request_bytes`] is 413; a body that
//!   delivers nothing for [`PeerServerOptions::body_timeout`] breaks off.
//!   A snapshot body is streamed to the state machine, never held whole.
//! - **Shutdown**: when `drain` turns true the listener closes and every
//!   connection gets a GOAWAY: requests under way finish, no new one
//!   starts. [`serve`] returns once every connection is gone; the caller
//!   bounds that wait.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use datanode_partition::raft::Vote;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::control::{CONTROL_PREFIX, ControlService, WrongNode};
use super::registry::{EndpointError, GroupEndpoint, GroupRegistry, Missing, SnapshotMeta};
use super::snapshot::{self, Piece, SnapshotBody};
use super::wire::{self, ErrorBody, Refusal, Rpc};

/// A byte stream a peer connection is served on.
pub trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> PeerIo for T {}

/// What [`PeerAdmission::admit`] hands back to serve.
pub type PeerStream = Box<dyn PeerIo>;

/// Why a peer connection was refused: the `reason` label of
/// `datanode_peer_rejected_total`, a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// It proved another secret (or none): a proof that does not check.
    BadProof,
    /// It spoke HTTP/2 at once, without the handshake: a node with no
    /// `cluster.secret_file`, or a client that is no node.
    NoHandshake,
    /// Bytes that are not the handshake: a frame too long or too short,
    /// a bad node id, the stream closed or failed inside the handshake.
    Malformed,
    /// Admission did not finish within its deadline (a peer that stalls).
    Timeout,
    /// Mutual TLS failed: no client certificate, one from another CA,
    /// expired, or one that names no node (or several).
    BadCertificate,
    /// A request on an admitted connection spoke for a replica (or node)
    /// that is not the certificate's node. Counted per request.
    WrongNode,
    /// [`PeerServerOptions::max_admitting`] connections were in admission
    /// already (a flood of handshakes that stall): closed at once.
    Busy,
}

impl RejectReason {
    /// Every reason, for the counters that exist at 0.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::BadProof,
        RejectReason::NoHandshake,
        RejectReason::Malformed,
        RejectReason::Timeout,
        RejectReason::BadCertificate,
        RejectReason::WrongNode,
        RejectReason::Busy,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadProof => "bad_proof",
            RejectReason::NoHandshake => "no_handshake",
            RejectReason::Malformed => "malformed",
            RejectReason::Timeout => "timeout",
            RejectReason::BadCertificate => "bad_certificate",
            RejectReason::WrongNode => "wrong_node",
            RejectReason::Busy => "busy",
        }
    }
}

/// A connection [`PeerAdmission::admit`] refused: why, for the metric, and
/// the details, for the log (never a secret).
#[derive(Debug)]
pub struct AdmissionRefused {
    /// The counted reason.
    pub reason: RejectReason,
    /// What happened.
    pub message: String,
}

/// A connection [`PeerAdmission::admit`] let in.
pub struct Admitted {
    /// What to serve HTTP/2 on.
    pub stream: PeerStream,
    /// The node the peer proved to be (its certificate's node id), when
    /// the admission authenticates nodes one by one; `None` when it
    /// admits a cluster (a shared secret) or anyone.
    pub node: Option<Arc<str>>,
}

impl Admitted {
    /// A stream admitted without a node identity.
    pub fn anonymous(stream: impl PeerIo) -> Admitted {
        Admitted { stream: Box::new(stream), node: None }
    }
}

/// Decides, per accepted connection, whether a peer may talk to this
/// node, and what stream to serve it on (a TLS stream once the peer's
/// certificate is checked, say). Bounded by
/// [`PeerServerOptions::admission_timeout`].
pub trait PeerAdmission: Send + Sync + fmt::Debug + 'static {
    /// Admits `stream` from `remote`, or refuses it with a reason.
    fn admit(&self, stream: TcpStream, remote: SocketAddr) -> BoxFuture<'static, Result<Admitted, AdmissionRefused>>;
}

/// Where the replicas are: whether replica `sender` of `group` is hosted
/// on `node`, for the requests of a connection admitted as `node`.
pub trait SenderCheck: Send + Sync + fmt::Debug + 'static {
    /// `true` when `sender` of `group` is on `node`, as this node knows.
    fn hosted_on(&self, group: u64, sender: u64, node: &str) -> bool;
}

/// Admits every connection as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitAll;

impl PeerAdmission for AdmitAll {
    fn admit(&self, stream: TcpStream, _remote: SocketAddr) -> BoxFuture<'static, Result<Admitted, AdmissionRefused>> {
        Box::pin(async move { Ok(Admitted::anonymous(stream)) })
    }
}

/// `datanode_peer_rejected_total{reason}` for every reason at 0.
pub fn zero_rejected_counters() {
    for reason in RejectReason::ALL {
        metrics::counter!("datanode_peer_rejected_total", "reason" => reason.as_str()).increment(0);
    }
}

/// Counts of one peer server, besides its metrics (which a process shares).
#[derive(Debug, Default)]
pub struct PeerStats {
    admitted: AtomicU64,
    refused: AtomicU64,
    /// Refusals by reason, in the order of [`RejectReason::ALL`].
    refused_by: [AtomicU64; RejectReason::ALL.len()],
    snapshots: AtomicU64,
}

impl PeerStats {
    /// Connections admitted since the server started.
    #[cfg(test)]
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Connections refused by admission (or not admitted in time).
    #[cfg(test)]
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections refused for `reason`.
    #[cfg(test)]
    pub fn refused_for(&self, reason: RejectReason) -> u64 {
        let index = RejectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.refused_by[index].load(Ordering::Relaxed)
    }

    /// Snapshots received and installed.
    #[cfg(test)]
    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }
}

/// How the peer server serves.
#[derive(Debug, Clone)]
pub struct PeerServerOptions {
    /// The largest body of a non-snapshot request (an append carries
    /// whole blobs, so this is above the largest blob times the entries
    /// of one append).
    pub max_request_bytes: usize,
    /// A request body that delivers nothing this long breaks off.
    pub body_timeout: Duration,
    /// Longest [`PeerAdmission::admit`] may take.
    pub admission_timeout: Duration,
    /// Connections in admission at once, at most; one more is refused
    /// (`busy`) without a byte read, so stalled handshakes cannot pile up
    /// tasks and sockets (each is held for up to `admission_timeout`).
    /// Admitted connections do not count.
    pub max_admitting: usize,
    /// HTTP/2 streams one connection may have open (every group's
    /// replication and heartbeats to this node share a connection).
    pub max_concurrent_streams: u32,
    /// Who may connect.
    pub admission: Arc<dyn PeerAdmission>,
    /// The counts this server keeps.
    pub stats: Arc<PeerStats>,
    /// Serves the control messages (`/cluster/...`); without it they are
    /// refused as unknown paths.
    pub control: Option<Arc<dyn ControlService>>,
    /// Where replicas are, for connections admitted as a node; without
    /// it, any sender is taken as it is.
    pub senders: Option<Arc<dyn SenderCheck>>,
}

impl Default for PeerServerOptions {
    fn default() -> PeerServerOptions {
        PeerServerOptions {
            max_request_bytes: 256 << 20,
            body_timeout: Duration::from_secs(30),
            admission_timeout: Duration::from_secs(10),
            max_admitting: 256,
            max_concurrent_streams: 4096,
            admission: Arc::new(AdmitAll),
            stats: Arc::default(),
            control: None,
            senders: None,
        }
    }
}

/// Serves the replicas of `registry` to peers on `listener` until `drain`
/// turns true, then lets in-flight requests finish (see the module docs).
/// Dropping the future drops every connection.
pub async fn serve(
    listener: TcpListener,
    registry: GroupRegistry,
    options: PeerServerOptions,
    drain: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let mut stop = drain.clone();
    let admitting = Arc::new(tokio::sync::Semaphore::new(options.max_admitting));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "cannot set TCP_NODELAY");
                    }
                    let Ok(permit) = Arc::clone(&admitting).try_acquire_owned() else {
                        let message = format!("{} connections in admission already", options.max_admitting);
                        refused(&options, remote, AdmissionRefused { reason: RejectReason::Busy, message });
                        continue;
                    };
                    connections.spawn(connection(stream, remote, permit, registry.clone(), options.clone(), drain.clone()));
                }
                Err(error) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(%error, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = draining(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn draining(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    admitting: tokio::sync::OwnedSemaphorePermit,
    registry: GroupRegistry,
    options: PeerServerOptions,
    mut drain: watch::Receiver<bool>,
) {
    let admitted = tokio::time::timeout(options.admission_timeout, options.admission.admit(stream, remote)).await;
    drop(admitting);
    let Admitted { stream, node } = match admitted {
        Ok(Ok(admitted)) => admitted,
        Ok(Err(refusal)) => return refused(&options, remote, refusal),
        Err(_) => {
            let message = format!("not admitted within {:?}", options.admission_timeout);
            return refused(&options, remote, AdmissionRefused { reason: RejectReason::Timeout, message });
        }
    };
    options.stats.admitted.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("datanode_peer_accepts_total", "result" => "admitted").increment(1);
    let gauge = metrics::gauge!("datanode_peer_connections", "direction" => "inbound");
    gauge.increment(1.0);
    let service = {
        let options = options.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let (registry, options, node) = (registry.clone(), options.clone(), node.clone());
            async move { Ok::<_, Infallible>(handle(request, &registry, &options, node).await) }
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // openraft drops an RPC that outlives its budget, which resets its
    // stream; a busy node sees many at once from an admitted peer. h2's
    // guards against floods of resets (20 pending, and a lifetime count of
    // 1024 of its own that never decreases) would close the connection
    // every group shares; a flood is for admission to refuse (see
    // `pool.rs`, the same on the sending side).
    //
    // Fixed, large windows, as on the sending side (see
    // `wire::STREAM_WINDOW`).
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.max_concurrent_streams)
        .max_pending_accept_reset_streams(options.max_concurrent_streams as usize)
        .max_local_error_reset_streams(None)
        .initial_stream_window_size(wire::STREAM_WINDOW)
        .initial_connection_window_size(wire::CONNECTION_WINDOW);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%remote, %error, "peer connection ended with an error");
                }
                break;
            }
            () = draining(&mut drain), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    gauge.decrement(1.0);
}

/// Refusals logged per window; the rest are counted and reported with
/// the next line logged, so a flood of bad connections cannot flood the
/// log (the metric counts every one).
pub const REFUSALS_LOGGED: u32 = 10;
/// See [`REFUSALS_LOGGED`].
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);

struct RefusalLog {
    window_start: Option<Instant>,
    logged: u32,
    left_out: u64,
}

static REFUSAL_LOG: Mutex<RefusalLog> = Mutex::new(RefusalLog { window_start: None, logged: 0, left_out: 0 });

/// The refused connection (dropped by the caller, which closes it) is
/// counted and logged.
fn refused(options: &PeerServerOptions, remote: SocketAddr, refusal: AdmissionRefused) {
    let AdmissionRefused { reason, message } = refusal;
    options.stats.refused.fetch_add(1, Ordering::Relaxed);
    count_refusal(options, reason);
    metrics::counter!("datanode_peer_accepts_total", "result" => "refused").increment(1);
    log_refusal(&remote.to_string(), reason, &message);
}

fn count_refusal(options: &PeerServerOptions, reason: RejectReason) {
    if let Some(index) = RejectReason::ALL.iter().position(|r| *r == reason) {
        options.stats.refused_by[index].fetch_add(1, Ordering::Relaxed);
    }
    metrics::counter!("datanode_peer_rejected_total", "reason" => reason.as_str()).increment(1);
}

/// A WARN line, at most [`REFUSALS_LOGGED`] per [`REFUSAL_LOG_WINDOW`].
fn log_refusal(peer: &str, reason: RejectReason, message: &str) {
    let left_out = {
        let mut log = REFUSAL_LOG.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if log.window_start.is_none_or(|start| now.duration_since(start) >= REFUSAL_LOG_WINDOW) {
            log.window_start = Some(now);
            log.logged = 0;
        }
        if log.logged >= REFUSALS_LOGGED {
            log.left_out += 1;
            return;
        }
        log.logged += 1;
        std::mem::take(&mut log.left_out)
    };
    if left_out > 0 {
        tracing::warn!(%peer, reason = reason.as_str(), %message, left_out, "peer refused (and {left_out} more refusals not logged)");
    } else {
        tracing::warn!(%peer, reason = reason.as_str(), %message, "peer refused");
    }
}

type Answer = Response<Full<Bytes>>;

fn refusal(refusal: Refusal, message: impl Into<String>) -> Answer {
    let mut response = Response::new(Full::new(ErrorBody::new(refusal, message).to_json()));
    *response.status_mut() = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn answer(bytes: Bytes) -> Answer {
    let mut response = Response::new(Full::new(bytes));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(wire::BINARY));
    response
}

fn served(rpc: &'static str, result: &'static str) {
    metrics::counter!("datanode_peer_served_total", "rpc" => rpc, "result" => result).increment(1);
}

async fn handle(
    request: Request<Incoming>,
    registry: &GroupRegistry,
    options: &PeerServerOptions,
    node: Option<Arc<str>>,
) -> Answer {
    let (rpc, response) = route(request, registry, options, node).await;
    let result = match &response {
        Ok(_) => "ok",
        Err((refused, _)) => refused.code(),
    };
    served(rpc.map_or("none", Rpc::name), result);
    response.unwrap_or_else(|(refused, message)| refusal(refused, message))
}

type Refused = (Refusal, String);

async fn route(
    request: Request<Incoming>,
    registry: &GroupRegistry,
    options: &PeerServerOptions,
    node: Option<Arc<str>>,
) -> (Option<Rpc>, Result<Answer, Refused>) {
    if request.uri().path().starts_with(CONTROL_PREFIX)
        && let Some(control) = &options.control
    {
        return (None, control_call(request, control.as_ref(), options, node).await);
    }
    let (group, target, rpc) = match wire::parse_path(request.uri().path()) {
        Ok(address) => address,
        Err(message) => return (None, Err((Refusal::NotFound, message))),
    };
    (Some(rpc), dispatch(request, registry, options, node.as_deref(), group, target, rpc).await)
}

async fn dispatch(
    request: Request<Incoming>,
    registry: &GroupRegistry,
    options: &PeerServerOptions,
    node: Option<&str>,
    group: u64,
    target: u64,
    rpc: Rpc,
) -> Result<Answer, Refused> {
    if request.method() != Method::POST {
        return Err((Refusal::NotFound, format!("{} is not a peer method", request.method())));
    }
    let sender = request
        .headers()
        .get(wire::SENDER_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .ok_or_else(|| (Refusal::BadRequest, format!("no {} header with a replica id", wire::SENDER_HEADER)))?;
    if let (Some(node), Some(senders)) = (node, &options.senders)
        && !senders.hosted_on(group, sender, node)
    {
        return Err(wrong_node(options, node, format!("replica {sender} of group {group} is not on node {node}")));
    }
    let endpoint = registry.lookup(group, target).map_err(|missing| match missing {
        Missing::Group => (Refusal::UnknownGroup, format!("group {group} is not hosted here")),
        Missing::Replica => (Refusal::UnknownReplica, format!("replica {target} of group {group} is not hosted here")),
    })?;
    let body = request.into_body();
    if rpc == Rpc::Snapshot {
        return receive_snapshot(body, endpoint.as_ref(), options, group, target, sender).await;
    }
    let read = Limited::new(body, options.max_request_bytes).collect();
    let bytes = match tokio::time::timeout(options.body_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return Err((Refusal::PayloadTooLarge, format!("more than {} bytes", options.max_request_bytes)));
        }
        Ok(Err(error)) => return Err((Refusal::BadRequest, format!("request body: {error}"))),
        Err(_) => {
            return Err((Refusal::BadRequest, format!("request body not read within {:?}", options.body_timeout)));
        }
    };
    endpoint.call(rpc, bytes).await.map(answer).map_err(|error| endpoint_refusal(error, group, target))
}

/// A control message: its body read within the bounds of any request,
/// then answered by the daemon.
async fn control_call(
    request: Request<Incoming>,
    control: &dyn ControlService,
    options: &PeerServerOptions,
    node: Option<Arc<str>>,
) -> Result<Answer, Refused> {
    if request.method() != Method::POST {
        return Err((Refusal::NotFound, format!("{} is not a peer method", request.method())));
    }
    let path = request.uri().path().to_string();
    let read = Limited::new(request.into_body(), options.max_request_bytes).collect();
    let body = match tokio::time::timeout(options.body_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) => return Err((Refusal::BadRequest, format!("request body: {error}"))),
        Err(_) => {
            return Err((Refusal::BadRequest, format!("request body not read within {:?}", options.body_timeout)));
        }
    };
    let (status, body) = match control.call(path, body, node.clone()).await {
        Ok(answer) => answer,
        Err(WrongNode(message)) => {
            return Err(wrong_node(options, node.as_deref().unwrap_or("an anonymous peer"), message));
        }
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// A request refused for speaking for another node: counted (a request,
/// not a connection), logged like a refused connection, answered 403.
fn wrong_node(options: &PeerServerOptions, node: &str, message: String) -> Refused {
    count_refusal(options, RejectReason::WrongNode);
    log_refusal(node, RejectReason::WrongNode, &message);
    (Refusal::WrongNode, message)
}

fn endpoint_refusal(error: EndpointError, group: u64, target: u64) -> Refused {
    let refused = match &error {
        EndpointError::BadRequest(_) => Refusal::BadRequest,
        EndpointError::Stopped(_) => Refusal::RaftStopped,
        EndpointError::Snapshot(_) => Refusal::SnapshotFailed,
    };
    (refused, format!("replica {target} of group {group}: {error}"))
}

/// Takes the next frame's data of `body` within `timeout`: `None` at its
/// end.
async fn next_data(body: &mut Incoming, timeout: Duration) -> Result<Option<Bytes>, String> {
    loop {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(format!("no bytes for {timeout:?}")),
            Ok(None) => return Ok(None),
            Ok(Some(Err(error))) => return Err(error.to_string()),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads the snapshot head: its length, then that many bytes; what came
/// with them is the start of the data.
async fn read_head(body: &mut Incoming, timeout: Duration) -> Result<(Bytes, Bytes), String> {
    let mut buffered = BytesMut::new();
    let mut wanted: Option<usize> = None;
    loop {
        if wanted.is_none() && buffered.len() >= 4 {
            let len = buffered.get_u32_le() as usize;
            if len > wire::MAX_SNAPSHOT_HEAD {
                return Err(format!("a snapshot head of {len} bytes (at most {})", wire::MAX_SNAPSHOT_HEAD));
            }
            wanted = Some(len);
        }
        if let Some(len) = wanted
            && buffered.len() >= len
        {
            let head = buffered.split_to(len).freeze();
            return Ok((head, buffered.freeze()));
        }
        match next_data(body, timeout).await? {
            Some(data) => buffered.extend_from_slice(&data),
            None => return Err("the body ended inside the snapshot head".into()),
        }
    }
}

/// Hands `first` and then the rest of `body` to `pieces`, then the end
/// mark (or why it broke off).
async fn pump(mut body: Incoming, first: Bytes, pieces: tokio::sync::mpsc::Sender<Piece>, timeout: Duration) {
    if !first.is_empty() && pieces.send(Piece::Bytes(first)).await.is_err() {
        return;
    }
    loop {
        let piece = match next_data(&mut body, timeout).await {
            Ok(Some(data)) => Piece::Bytes(data),
            Ok(None) => Piece::End,
            Err(message) => Piece::Failed(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, message)),
        };
        let last = !matches!(piece, Piece::Bytes(_));
        if pieces.send(piece).await.is_err() || last {
            return;
        }
    }
}

async fn receive_snapshot(
    mut body: Incoming,
    endpoint: &dyn GroupEndpoint,
    options: &PeerServerOptions,
    group: u64,
    target: u64,
    sender: u64,
) -> Result<Answer, Refused> {
    let (head, first) =
        read_head(&mut body, options.body_timeout).await.map_err(|message| (Refusal::BadRequest, message))?;
    let (vote, meta): (Vote, SnapshotMeta) =
        wire::decode(&head).map_err(|error| (Refusal::BadRequest, format!("snapshot head: {error}")))?;
    // openraft stops the group on a snapshot whose last entry is beyond
    // the leadership of the vote it came with: refuse it here.
    if let Some(last) = &meta.last_log_id
        && last.leader_id > vote.leader_id
    {
        return Err((Refusal::BadRequest, format!("snapshot up to {last} is beyond the sender's vote {vote}")));
    }
    tracing::info!(group, target, sender, %meta, "receiving a snapshot");
    let (pieces, receiver) = snapshot::channel();
    let (installed, ()) = tokio::join!(
        endpoint.install_snapshot(vote, meta, SnapshotBody::new(receiver)),
        pump(body, first, pieces, options.body_timeout),
    );
    let installed = installed.map_err(|error| endpoint_refusal(error, group, target))?;
    options.stats.snapshots.fetch_add(1, Ordering::Relaxed);
    Ok(answer(installed))
}
