//! Control messages on the peer port, beside the Raft traffic: JSON
//! requests under `/cluster/`, served by the daemon's [`ControlService`]
//! (the heartbeat to the metadata leader) over the same one connection
//! per peer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::header::CONTENT_TYPE;

use super::pool::PeerPool;

/// Paths under this prefix are control messages.
pub const CONTROL_PREFIX: &str = "/cluster/";
/// Largest control answer read (a cluster map of many partitions).
const MAX_CONTROL_ANSWER: usize = 64 << 20;

/// A control message that speaks for another node than the one its
/// connection was admitted as (the message says which).
#[derive(Debug)]
pub struct WrongNode(pub String);

/// What serves the control messages that arrive on the peer port.
pub trait ControlService: Send + Sync + std::fmt::Debug + 'static {
    /// Answers `body` sent to `path`: the status and the JSON answer.
    /// `node` is the node the connection was admitted as (its
    /// certificate's), when the admission names one: a message for
    /// another node is refused with [`WrongNode`].
    fn call(
        &self,
        path: String,
        body: Bytes,
        node: Option<Arc<str>>,
    ) -> BoxFuture<'static, Result<(u16, Bytes), WrongNode>>;
}

impl PeerPool {
    /// Posts a control message to the peer at `addr` (on the connection
    /// the Raft traffic uses), within `budget`: its status and body.
    pub async fn control(&self, addr: &str, path: &str, body: Bytes, budget: Duration) -> Result<(u16, Bytes), String> {
        let attempt = async {
            let mut sender = self.sender(addr, budget).await.map_err(|error| error.to_string())?;
            let request = Request::post(format!("http://{addr}{path}"))
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(body).map_err(|never| match never {}).boxed_unsync())
                .map_err(|error| format!("peer address {addr:?}: {error}"))?;
            let response = sender.send_request(request).await.map_err(|error| format!("{path} to {addr}: {error}"))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_CONTROL_ANSWER)
                .collect()
                .await
                .map_err(|error| format!("{path} answer from {addr}: {error}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(budget, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("{path} to {addr}: no answer within {budget:?}")))
    }
}
