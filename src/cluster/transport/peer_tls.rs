//! Mutual TLS on the peer port: both ends of a peer connection present a
//! node certificate, and each learns which node the other is.
//!
//! A node certificate is issued by the CA of `tls.client_ca_file`, has
//! both the `serverAuth` and `clientAuth` extended key usages, is valid
//! for the IP (or name) of the node's `cluster.peer_addr`, and names its
//! node id in exactly one URI subject alternative name,
//! `datanode://node/<node.id>` ([`NODE_URI_PREFIX`]).
//!
//! - **Server** ([`TlsAdmission`]): the TLS handshake requires a client
//!   certificate of the CA, valid now; the certificate must name one
//!   node. The connection is then admitted *as that node*: the listener
//!   refuses any request on it that speaks for a replica another node
//!   holds (see `server.rs`), so a certificate, stolen or not, speaks
//!   for its own node only. Refusals are counted under `bad_certificate`
//!   (`no_handshake` for a peer that spoke HTTP/2 at once).
//! - **Client** ([`connect`]): the server's certificate must chain to the
//!   same CA, be valid for the address dialled, and name a node.
//!
//! Both ends take their configuration from a [`PeerTlsSource`] per
//! connection, so a certificate reloaded (SIGHUP, or its files changed)
//! serves every connection opened after it. ALPN is `h2` on both sides:
//! a peer address that reaches an HTTP/1.1 listener fails the handshake.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::handshake::valid_node_id;
use super::server::{AdmissionRefused, Admitted, PeerAdmission, RejectReason};

/// The URI subject alternative name that names a node: this, then its id.
pub const NODE_URI_PREFIX: &str = "datanode://node/";
/// The ALPN protocol of the peer port.
pub const PEER_ALPN: &[u8] = b"h2";

/// The current TLS configurations of the peer port, both ends.
pub trait PeerTlsSource: Send + Sync + fmt::Debug + 'static {
    /// For connections accepted: client certificates required.
    fn server_config(&self) -> Arc<rustls::ServerConfig>;
    /// For connections opened: the node's certificate as the client's.
    fn client_config(&self) -> Arc<rustls::ClientConfig>;
}

/// The one node id a certificate (DER) names, from its URI subject
/// alternative names; an error for none, several, or a malformed one.
pub fn certificate_node(der: &[u8]) -> Result<String, String> {
    let (_, certificate) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let names = certificate.subject_alternative_name().map_err(|e| format!("its subject alternative names: {e}"))?;
    let mut nodes = names.iter().flat_map(|names| names.value.general_names.iter()).filter_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix(NODE_URI_PREFIX),
        _ => None,
    });
    match (nodes.next(), nodes.next()) {
        (Some(node), None) if valid_node_id(node.as_bytes()) => Ok(node.to_string()),
        (Some(node), None) => Err(format!("names node {node:?}, which is not a node id")),
        (None, _) => Err(format!("names no node (no {NODE_URI_PREFIX}<node.id> subject alternative name)")),
        (Some(_), Some(_)) => Err("names more than one node".into()),
    }
}

/// The node the far end of `connection` proved to be, from its leaf
/// certificate.
fn peer_node(connection: &rustls::CommonState) -> Result<String, String> {
    let leaf = connection.peer_certificates().and_then(<[_]>::first).ok_or("presented no certificate")?;
    certificate_node(leaf.as_ref())
}

/// Admits peers that present a node certificate (see the module docs).
#[derive(Debug, Clone)]
pub struct TlsAdmission {
    source: Arc<dyn PeerTlsSource>,
}

impl TlsAdmission {
    /// Admission by the certificates of `source`.
    pub fn new(source: Arc<dyn PeerTlsSource>) -> TlsAdmission {
        TlsAdmission { source }
    }
}

impl PeerAdmission for TlsAdmission {
    fn admit(&self, stream: TcpStream, remote: SocketAddr) -> BoxFuture<'static, Result<Admitted, AdmissionRefused>> {
        let acceptor = TlsAcceptor::from(self.source.server_config());
        Box::pin(async move {
            let refuse = |reason, message: String| AdmissionRefused { reason, message };
            // A TLS ClientHello starts 0x16; an HTTP/2 preface "PRI": a peer
            // without TLS, told apart for the counter.
            let mut first = [0u8; 1];
            match stream.peek(&mut first).await {
                Ok(1..) if first[0] == b'P' => {
                    return Err(refuse(RejectReason::NoHandshake, "spoke HTTP/2 without TLS".into()));
                }
                Ok(_) => {}
                Err(error) => return Err(refuse(RejectReason::Malformed, format!("before TLS: {error}"))),
            }
            let stream = acceptor
                .accept(stream)
                .await
                .map_err(|error| refuse(RejectReason::BadCertificate, format!("TLS handshake: {error}")))?;
            let node = peer_node(stream.get_ref().1)
                .map_err(|error| refuse(RejectReason::BadCertificate, format!("client certificate {error}")))?;
            tracing::debug!(%remote, %node, "peer admitted by its node certificate");
            Ok(Admitted { stream: Box::new(stream), node: Some(Arc::from(node)) })
        })
    }
}

/// Opens TLS to the peer at `addr` on `stream`, with this node's
/// certificate; fails unless the server's certificate is valid for `addr`
/// and names a node.
pub async fn connect(stream: TcpStream, addr: &str, source: &dyn PeerTlsSource) -> io::Result<TlsStream<TcpStream>> {
    let host = match addr.parse::<SocketAddr>() {
        Ok(socket) => socket.ip().to_string(),
        Err(_) => addr.rsplit_once(':').map_or(addr, |(host, _)| host).to_string(),
    };
    let name = ServerName::try_from(host)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, format!("peer address {addr:?}: {error}")))?;
    let stream = TlsConnector::from(source.client_config()).connect(name, stream).await?;
    let node = peer_node(stream.get_ref().1)
        .map_err(|error| io::Error::new(io::ErrorKind::PermissionDenied, format!("the peer's certificate {error}")))?;
    tracing::debug!(peer = %addr, %node, "peer proved its node certificate");
    Ok(stream)
}
