//! One HTTP/2 connection to each peer node, shared by every group.
//!
//! A peer is known by its address (`host:port` of its peer listener). The
//! first request to it connects; every later request of every group is a
//! stream on that connection. Connecting is serialised per peer, so a
//! thousand groups that find a peer unconnected open one connection, not a
//! thousand. A connection that drops is replaced at the next request; a
//! failed connect makes the peer wait out a backoff (doubling from
//! [`PoolOptions::min_backoff`] to [`PoolOptions::max_backoff`]) during
//! which requests fail at once as unreachable instead of dialling again.
//! HTTP/2 pings find a connection whose peer vanished without a word.
//!
//! With a cluster secret ([`PoolOptions::credential`]) every connection
//! first runs the handshake of `handshake.rs` on the raw stream, within
//! the connect timeout: nothing is sent to a peer that did not prove the
//! same secret, and a refusal counts as a failed connect (backed off).
//! With mutual TLS ([`PoolOptions::tls`]) every connection is TLS with
//! this node's certificate instead (see `peer_tls.rs`).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::handshake::{self, ClientCredential};
use super::peer_tls::{self, PeerTlsSource};
use super::server::PeerStream;
use super::wire;

/// Streams this node reset (an RPC dropped) whose late frames it still
/// recognises and ignores, and for how long.
const RESET_STREAMS_REMEMBERED: usize = 4096;
const RESET_STREAM_MEMORY: Duration = Duration::from_secs(30);

/// The request body of every peer request.
pub type PeerBody = UnsyncBoxBody<Bytes, io::Error>;

/// How the pool connects and keeps connections.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Longest wait for a connection (TCP and the HTTP/2 handshake); an
    /// RPC's own budget bounds it further.
    pub connect_timeout: Duration,
    /// Wait after the first failed connect before the next attempt.
    pub min_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// HTTP/2 ping interval on a connection, busy or idle.
    pub keepalive_interval: Duration,
    /// A ping unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
    /// A snapshot stream that moves no chunk (or, once sent, is not
    /// answered) for this long is broken off.
    pub snapshot_idle_timeout: Duration,
    /// Snapshot chunk size when openraft does not give one.
    pub snapshot_chunk_size: usize,
    /// The cluster secret proved on every connection before HTTP/2
    /// starts (see `handshake.rs`); none: no handshake.
    pub credential: Option<ClientCredential>,
    /// Mutual TLS on every connection (see `peer_tls.rs`), in place of
    /// the secret's handshake.
    pub tls: Option<Arc<dyn PeerTlsSource>>,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            connect_timeout: Duration::from_secs(2),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(10),
            snapshot_idle_timeout: Duration::from_secs(30),
            snapshot_chunk_size: 1 << 20,
            credential: None,
            tls: None,
        }
    }
}

/// Why there is no connection to a peer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The last attempt failed and its backoff has not run out.
    #[error("{addr}: backing off after a failed connect ({left:?} left)")]
    BackingOff {
        /// The peer.
        addr: String,
        /// Until the next attempt.
        left: Duration,
    },
    /// TCP connect or the handshake failed.
    #[error("{addr}: connect: {source}")]
    Failed {
        /// The peer.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Connecting took longer than allowed.
    #[error("{addr}: connect timed out after {after:?}")]
    TimedOut {
        /// The peer.
        addr: String,
        /// The bound.
        after: Duration,
    },
}

/// The connections of this node to its peers. Clones share them.
#[derive(Debug, Clone)]
pub struct PeerPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    options: PoolOptions,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    connects: AtomicU64,
}

#[derive(Debug)]
struct Peer {
    addr: String,
    /// Held while connecting, so that one request connects and the others
    /// wait for it.
    link: tokio::sync::Mutex<Link>,
}

#[derive(Debug, Default)]
struct Link {
    sender: Option<SendRequest<PeerBody>>,
    /// Connections opened to this peer.
    opened: u64,
    failures: u32,
    next_attempt: Option<Instant>,
}

impl PeerPool {
    /// A pool with no connection yet.
    pub fn new(options: PoolOptions) -> PeerPool {
        PeerPool { inner: Arc::new(PoolInner { options, peers: Mutex::default(), connects: AtomicU64::new(0) }) }
    }

    /// The pool's options.
    pub fn options(&self) -> &PoolOptions {
        &self.inner.options
    }

    /// How many connections this pool has opened since it was made.
    #[cfg(test)]
    pub fn connections_opened(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }

    /// How many connections this pool has opened to `addr`.
    #[cfg(test)]
    pub async fn connections_opened_to(&self, addr: &str) -> u64 {
        let peer = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).get(addr).cloned();
        match peer {
            Some(peer) => peer.link.lock().await.opened,
            None => 0,
        }
    }

    fn peer(&self, addr: &str) -> Arc<Peer> {
        let mut peers = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = peers.entry(addr.to_string()).or_insert_with(|| {
            Arc::new(Peer { addr: addr.to_string(), link: tokio::sync::Mutex::new(Link::default()) })
        });
        Arc::clone(peer)
    }

    /// A handle on the connection to `addr`, connecting first if there is
    /// none (within `budget` and [`PoolOptions::connect_timeout`]).
    pub async fn sender(&self, addr: &str, budget: Duration) -> Result<SendRequest<PeerBody>, ConnectError> {
        let peer = self.peer(addr);
        let mut link = peer.link.lock().await;
        if let Some(sender) = &link.sender {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
            link.sender = None;
        }
        let now = Instant::now();
        if let Some(next) = link.next_attempt
            && next > now
        {
            return Err(ConnectError::BackingOff { addr: peer.addr.clone(), left: next - now });
        }
        let options = &self.inner.options;
        let bound = options.connect_timeout.min(budget);
        let connected = match tokio::time::timeout(bound, connect(&peer.addr, options)).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(source)) => Err(ConnectError::Failed { addr: peer.addr.clone(), source }),
            Err(_) => Err(ConnectError::TimedOut { addr: peer.addr.clone(), after: bound }),
        };
        match connected {
            Ok(sender) => {
                metrics::counter!("datanode_peer_connects_total", "result" => "ok").increment(1);
                self.inner.connects.fetch_add(1, Ordering::Relaxed);
                link.opened += 1;
                link.failures = 0;
                link.next_attempt = None;
                link.sender = Some(sender.clone());
                Ok(sender)
            }
            Err(error) => {
                metrics::counter!("datanode_peer_connects_total", "result" => "failed").increment(1);
                link.failures = link.failures.saturating_add(1);
                let doublings = (link.failures - 1).min(16);
                let backoff = options.min_backoff.saturating_mul(1 << doublings).min(options.max_backoff);
                link.next_attempt = Some(Instant::now() + backoff);
                tracing::debug!(peer = %peer.addr, %error, ?backoff, "no connection to peer");
                Err(error)
            }
        }
    }
}

async fn connect(addr: &str, options: &PoolOptions) -> io::Result<SendRequest<PeerBody>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    // Once per failed connect: the backoff bounds how often.
    let stream: PeerStream = if let Some(tls) = &options.tls {
        match peer_tls::connect(stream, addr, tls.as_ref()).await {
            Ok(stream) => Box::new(stream),
            Err(error) => {
                tracing::warn!(peer = %addr, %error, "peer TLS handshake failed");
                return Err(error);
            }
        }
    } else {
        if let Some(credential) = &options.credential
            && let Err(error) = handshake::connect(&mut stream, &credential.secret, &credential.node_id).await
        {
            tracing::warn!(peer = %addr, %error, "peer handshake failed");
            return Err(error.into());
        }
        Box::new(stream)
    };
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    // openraft drops an RPC that outlives its budget, which resets its
    // stream; the peer's answer may still arrive for it. h2 ignores frames
    // of a stream it remembers resetting (at most 10, for 1 s, by
    // default) and resets any other again, counting every such reset
    // against a limit (1024) that never decreases and then closes the
    // connection. A peer connection lives for days and carries the
    // cancellations of every group, so: remember many resets for longer,
    // and no lifetime limit (peers are admitted by the server, see
    // `server::PeerAdmission`; a flood is theirs to refuse). Fixed, large
    // receive windows, not adaptive ones: see `wire::STREAM_WINDOW`.
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(wire::STREAM_WINDOW)
        .initial_connection_window_size(wire::CONNECTION_WINDOW)
        .max_concurrent_reset_streams(RESET_STREAMS_REMEMBERED)
        .reset_stream_duration(RESET_STREAM_MEMORY)
        .max_local_error_reset_streams(None);
    let (sender, connection) = builder.handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
    let peer = addr.to_string();
    tokio::spawn(async move {
        let gauge = metrics::gauge!("datanode_peer_connections", "direction" => "outbound");
        gauge.increment(1.0);
        if let Err(error) = connection.await {
            tracing::debug!(%peer, %error, "peer connection ended with an error");
        }
        gauge.decrement(1.0);
    });
    Ok(sender)
}
