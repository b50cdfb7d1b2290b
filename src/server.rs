//! The HTTP/1.1 server: accepts connections, serves each with hyper, and
//! cuts off clients that would hold the node up.
//!
//! - A request head that does not arrive within `header_timeout` (also the
//!   longest an idle keep-alive connection stays open) closes the
//!   connection: hyper's `header_read_timeout`, on tokio's timer.
//! - A request body that delivers no bytes for `header_timeout` breaks off:
//!   its handler sees an error (answered 400 `bad_request`), so a stalled
//!   upload never holds a handler, a partition or the shutdown.
//! - On drain (SIGTERM) the listener closes, every connection is told to
//!   finish (keep-alive off): idle ones close at once, one reading a request
//!   head (a stalled client) is closed, one whose request is being handled
//!   finishes that request and then closes. While draining, a body that
//!   pauses for [`DRAIN_BODY_STALL`] breaks off. [`serve`] returns once every
//!   connection is gone; the caller bounds that wait and drops the rest.
//! - What hyper answers by itself (400 for a request head it cannot parse,
//!   414, 431) gets the JSON error shape: [`JsonProtocolErrors`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tower_service::Service as _;

use crate::tls::Tls;

/// While draining, the longest a request body may pause before it breaks off.
pub const DRAIN_BODY_STALL: Duration = Duration::from_secs(1);

/// While draining, how long a connection with no request in progress gets
/// to flush what it has written before it is closed.
const DRAIN_FLUSH_GRACE: Duration = Duration::from_secs(1);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How connections are served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest wait for a request head (and for a TLS handshake), and
    /// longest pause inside a body.
    pub header_timeout: Duration,
    /// Serve TLS with this configuration; plain HTTP when `None`.
    pub tls: Option<Arc<Tls>>,
}

/// Serves `router` on `listener` until `drain` turns true, then lets the
/// connections finish as described in the module docs and returns when
/// the last one is gone. Dropping the future drops every connection.
pub async fn serve(listener: TcpListener, router: Router, options: ServeOptions, drain: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let mut stop = drain.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // TCP_NODELAY: a response written in more than one segment
                    // must not wait for the client's delayed ACK (Nagle).
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "cannot set TCP_NODELAY");
                    }
                    connections.spawn(connection(stream, router.clone(), options.clone(), drain.clone()));
                }
                Err(error) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
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

/// Resolves once the node drains (or the sender is gone).
async fn draining(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

/// Requests of one connection whose response is not finished yet.
#[derive(Debug)]
struct InFlight {
    count: AtomicUsize,
    /// Signalled when `count` drops to zero.
    idle: Notify,
    /// No request is in progress and every byte of the answers so far has
    /// been flushed: whatever hyper writes now is a response of its own
    /// (to a request head it could not parse), never ours.
    clean: AtomicBool,
}

impl Default for InFlight {
    fn default() -> InFlight {
        InFlight { count: AtomicUsize::new(0), idle: Notify::new(), clean: AtomicBool::new(true) }
    }
}

/// Counts one request in flight until dropped (with its response body).
#[derive(Debug)]
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(in_flight: &Arc<InFlight>) -> InFlightGuard {
        in_flight.clean.store(false, Ordering::Release);
        in_flight.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(in_flight))
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_one();
        }
    }
}

/// Serves one accepted connection: over TLS after a handshake that must
/// finish within `header_timeout` (and is dropped when the node drains),
/// or plain.
async fn connection(stream: TcpStream, router: Router, options: ServeOptions, drain: watch::Receiver<bool>) {
    let Some(tls) = &options.tls else {
        return serve_http(stream, router, options.header_timeout, drain).await;
    };
    let handshake = tokio::time::timeout(options.header_timeout, tls.acceptor().accept(stream));
    let mut stop = drain.clone();
    let failed = |reason: &'static str| {
        metrics::counter!("datanode_tls_handshake_failures_total", "reason" => reason).increment(1);
    };
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                failed("failed");
                tracing::debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => return failed("timeout"),
        },
        () = draining(&mut stop) => return,
    };
    serve_http(stream, router, options.header_timeout, drain).await
}

async fn serve_http<S>(stream: S, router: Router, header_timeout: Duration, mut drain: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let in_flight = Arc::new(InFlight::default());
    let service = {
        let (in_flight, drain) = (Arc::clone(&in_flight), drain.clone());
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let guard = InFlightGuard::new(&in_flight);
            let stall = if *drain.borrow() { DRAIN_BODY_STALL.min(header_timeout) } else { header_timeout };
            let request = request.map(|body| Body::new(StallingBody::new(body, stall, drain.clone())));
            let mut router = router.clone();
            async move {
                let response = router.call(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| GuardedBody { inner: body, _guard: guard }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let io = JsonProtocolErrors { inner: TokioIo::new(stream), in_flight: Arc::clone(&in_flight), replacing: None };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        if draining && in_flight.count.load(Ordering::Acquire) == 0 {
            // Nothing of ours in progress: it is idle or reading a request
            // head that a drain will not wait for. Let it flush, then close.
            let _ = tokio::time::timeout(DRAIN_FLUSH_GRACE, conn.as_mut()).await;
            return;
        }
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = self::draining(&mut drain), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = in_flight.idle.notified(), if draining => {}
        }
    }
}

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
#[error("no bytes of the request body for {0:?}")]
struct BodyStalled(Duration);

/// A request body that breaks off when it delivers nothing for `stall`
/// (shortened to [`DRAIN_BODY_STALL`] once the node drains).
struct StallingBody {
    inner: Incoming,
    stall: Duration,
    /// Armed at the first poll that finds nothing, reset by every frame.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl StallingBody {
    fn new(inner: Incoming, stall: Duration, mut drain: watch::Receiver<bool>) -> StallingBody {
        let drain: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move { draining(&mut drain).await });
        StallingBody { inner, stall, timer: None, drain: Some(drain) }
    }
}

impl http_body::Body for StallingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            // The next pause is timed from this frame.
            this.timer = None;
            return Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)));
        }
        let now = tokio::time::Instant::now();
        if let Some(drain) = &mut this.drain
            && drain.as_mut().poll(cx).is_ready()
        {
            this.drain = None;
            this.stall = this.stall.min(DRAIN_BODY_STALL);
            if let Some(timer) = &mut this.timer {
                let deadline = timer.deadline().min(now + this.stall);
                timer.as_mut().reset(deadline);
            }
        }
        let stall = this.stall;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(now + stall)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(BodyStalled(stall)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted in flight until hyper
/// has taken all of it.
struct GuardedBody {
    inner: Body,
    _guard: InFlightGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's I/O, which replaces the bodiless responses hyper writes
/// by itself for a request head it cannot parse (400, 414, 431) with the
/// same status and the JSON error shape of `api::protocol_error`.
///
/// Such a response is recognised without parsing hyper's output: it is
/// the first write once no request is in flight and every byte of the
/// answers before it has been flushed (`InFlight::clean`), because hyper
/// writes nothing else then. hyper closes the connection after it.
struct JsonProtocolErrors<T> {
    inner: T,
    in_flight: Arc<InFlight>,
    /// The JSON response being written, how much of it is out, and how
    /// many bytes of hyper's own to report written once it is all out.
    replacing: Option<(Vec<u8>, usize, usize)>,
}

impl<T: Write + Unpin> JsonProtocolErrors<T> {
    /// Starts replacing when `bufs` are hyper's own error response.
    fn intercept(&mut self, bufs: &[std::io::IoSlice<'_>]) {
        if self.replacing.is_some() || !self.in_flight.clean.load(Ordering::Acquire) {
            return;
        }
        let first: &[u8] = bufs.iter().map(|b| &**b).find(|b| !b.is_empty()).unwrap_or_default();
        let status = first
            .strip_prefix(b"HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| std::str::from_utf8(code).ok())
            .and_then(|code| code.parse::<u16>().ok());
        let Some(status) = status.and_then(|s| axum::http::StatusCode::from_u16(s).ok()) else { return };
        let body = crate::api::protocol_error(status);
        let mut response = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(&body);
        let reported = bufs.iter().map(|b| b.len()).sum();
        self.replacing = Some((response, 0, reported));
    }

    /// Writes out the replacement; `Ready(n)` reports hyper's `n` bytes
    /// written once all of it is out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some((response, written, reported)) = &mut self.replacing else { return Poll::Ready(Ok(0)) };
        while *written < response.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &response[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        let reported = *reported;
        self.replacing = None;
        Poll::Ready(Ok(reported))
    }
}

impl<T: Read + Unpin> Read for JsonProtocolErrors<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for JsonProtocolErrors<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.intercept(&[std::io::IoSlice::new(buf)]);
        if self.replacing.is_some() {
            return self.poll_replacement(cx);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.intercept(bufs);
        if self.replacing.is_some() {
            return self.poll_replacement(cx);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        // hyper flushes its I/O only once its own buffer is written out.
        if self.in_flight.count.load(Ordering::Acquire) == 0 {
            self.in_flight.clean.store(true, Ordering::Release);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
