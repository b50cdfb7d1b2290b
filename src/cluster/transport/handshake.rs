//! The cluster-secret handshake of the peer port: both ends of a peer
//! connection prove that they hold `cluster.secret_file` before HTTP/2
//! starts, and the secret never crosses the wire.
//!
//! On the raw TCP stream, each message a frame (`u16` little-endian body
//! length, then the body, at most [`MAX_FRAME`] bytes):
//!
//! 1. server -> client, **hello**: [`MAGIC`] and a fresh random 32-byte
//!    server nonce.
//! 2. client -> server, **client proof**: a fresh random 32-byte client
//!    nonce, the client's node id (one length byte, then 1 to 64 bytes of
//!    `[A-Za-z0-9._-]`), and `HMAC-SHA256(secret, transcript("client"))`.
//! 3. server -> client, **server proof**: `HMAC-SHA256(secret,
//!    transcript("server"))`, sent only once the client's proof checked.
//!
//! where `transcript(role)` = [`CONTEXT`] || server nonce || client nonce
//! || node id length (one byte) || node id || role. Both proofs are checked
//! in constant time. The server sends nothing but its nonce before the
//! client proved itself, and the client sends no request before the
//! server proved itself: a peer with another secret learns neither a
//! request nor anything it could replay (each proof covers both nonces,
//! and the role label keeps a client's proof from passing as a server's).
//!
//! A refused connection is closed without an answer. The server's reads
//! are bounded by the frame size and, as a whole, by the admission
//! deadline of the listener; the client's by its connect timeout.
//!
//! **What it does not do.** After the handshake the stream is plain: an
//! attacker who can read and rewrite the traffic between two nodes (on
//! the path, not merely able to reach the port) can read it and inject
//! into an admitted connection. Against such a network, the peer port
//! needs TLS.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;

use futures_util::future::BoxFuture;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::server::{AdmissionRefused, Admitted, PeerAdmission, RejectReason};

/// The protocol and its version, first in every transcript.
pub const CONTEXT: &[u8] = b"datanode-peer-v1";
/// The first bytes of the server's hello.
pub const MAGIC: [u8; 4] = *b"DNP1";
/// Bytes of each nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of each proof (an HMAC-SHA256 tag).
pub const PROOF_BYTES: usize = 32;
/// The largest frame body either side accepts.
pub const MAX_FRAME: usize = 128;
/// The longest node id a client may claim.
pub const MAX_NODE_ID: usize = 64;
/// Shortest cluster secret accepted, in bytes (after trimming).
pub const MIN_SECRET_BYTES: usize = 32;

/// Role labels, last in the transcript.
const CLIENT_ROLE: &[u8] = b"client";
const SERVER_ROLE: &[u8] = b"server";
/// The start of an HTTP/2 client preface (`PRI * HTTP/2.0`), as the two
/// bytes of a frame length: a peer that dialled without the handshake.
const HTTP2_PREFACE_START: [u8; 2] = *b"PR";

/// The cluster secret, as a key. Its bytes are never logged or printed.
#[derive(Clone)]
pub struct ClusterSecret {
    key: hmac::Key,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// The secret a file holds: its contents with surrounding whitespace
    /// trimmed, at least [`MIN_SECRET_BYTES`] of them.
    pub fn from_contents(contents: &[u8]) -> Result<ClusterSecret, String> {
        let secret = contents.trim_ascii();
        if secret.len() < MIN_SECRET_BYTES {
            // The length only, never the bytes.
            return Err(format!(
                "holds {} bytes after trimming, at least {MIN_SECRET_BYTES} are needed \
                 (e.g. head -c 32 /dev/urandom | base64)",
                secret.len()
            ));
        }
        Ok(ClusterSecret { key: hmac::Key::new(hmac::HMAC_SHA256, secret) })
    }

    /// Reads the secret of `path` (a regular file, see
    /// [`crate::auth::read_credential_file`]).
    pub fn load(path: &Path) -> Result<ClusterSecret, String> {
        let contents = crate::auth::read_credential_file(path)?;
        ClusterSecret::from_contents(&contents).map_err(|e| format!("{} {e}", path.display()))
    }

    fn proof(&self, server_nonce: &[u8], client_nonce: &[u8], node_id: &[u8], role: &[u8]) -> hmac::Tag {
        hmac::sign(&self.key, &transcript(server_nonce, client_nonce, node_id, role))
    }

    /// Checks `proof` in constant time.
    fn verify(&self, server_nonce: &[u8], client_nonce: &[u8], node_id: &[u8], role: &[u8], proof: &[u8]) -> bool {
        hmac::verify(&self.key, &transcript(server_nonce, client_nonce, node_id, role), proof).is_ok()
    }
}

fn transcript(server_nonce: &[u8], client_nonce: &[u8], node_id: &[u8], role: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CONTEXT.len() + 2 * NONCE_BYTES + 1 + node_id.len() + role.len());
    bytes.extend_from_slice(CONTEXT);
    bytes.extend_from_slice(server_nonce);
    bytes.extend_from_slice(client_nonce);
    // A node id is at most MAX_NODE_ID bytes: its length fits a byte.
    bytes.push(node_id.len() as u8);
    bytes.extend_from_slice(node_id);
    bytes.extend_from_slice(role);
    bytes
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other side's proof does not check: it holds another secret.
    #[error("the peer's proof does not match this node's cluster secret")]
    BadProof,
    /// The client spoke HTTP/2 at once: it has no cluster secret set.
    #[error("the peer sent HTTP/2 without the handshake (is cluster.secret_file set on it?)")]
    NoHandshake,
    /// Bytes that are not the handshake.
    #[error("not the peer handshake: {0}")]
    Malformed(String),
    /// The stream ended inside the handshake, in the message named.
    #[error("the peer closed the connection in the {0}")]
    Closed(&'static str),
    /// The server closed the connection on this node's proof.
    #[error("the server closed the connection on this node's proof (does it hold another cluster secret?)")]
    Refused,
    /// The stream failed.
    #[error("peer handshake: {0}")]
    Io(#[source] io::Error),
}

impl From<HandshakeError> for io::Error {
    fn from(error: HandshakeError) -> io::Error {
        let kind = match &error {
            HandshakeError::BadProof | HandshakeError::NoHandshake | HandshakeError::Refused => {
                io::ErrorKind::PermissionDenied
            }
            HandshakeError::Malformed(_) => io::ErrorKind::InvalidData,
            HandshakeError::Closed(_) => io::ErrorKind::UnexpectedEof,
            HandshakeError::Io(error) => error.kind(),
        };
        io::Error::new(kind, error)
    }
}

fn nonce() -> Result<[u8; NONCE_BYTES], HandshakeError> {
    let mut nonce = [0u8; NONCE_BYTES];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| HandshakeError::Io(io::Error::other("the system random source failed")))?;
    Ok(nonce)
}

async fn write_frame(stream: &mut (impl AsyncWrite + Unpin), body: &[u8]) -> Result<(), HandshakeError> {
    // Bodies are built here and at most MAX_FRAME bytes.
    let mut frame = Vec::with_capacity(2 + body.len());
    frame.extend_from_slice(&(body.len() as u16).to_le_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame).await.map_err(HandshakeError::Io)?;
    stream.flush().await.map_err(HandshakeError::Io)
}

/// Reads one frame whose body is `expected` bytes long (`what` names it
/// in errors).
async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin),
    expected: std::ops::RangeInclusive<usize>,
    what: &'static str,
) -> Result<Vec<u8>, HandshakeError> {
    let mut head = [0u8; 2];
    read_exact(stream, &mut head, what).await?;
    if head == HTTP2_PREFACE_START {
        return Err(HandshakeError::NoHandshake);
    }
    let len = usize::from(u16::from_le_bytes(head));
    if len == 0 {
        return Err(HandshakeError::Malformed(format!(
            "an empty {what} frame (a peer that answered HTTP/2 at once has no cluster.secret_file set)"
        )));
    }
    if len > MAX_FRAME || !expected.contains(&len) {
        return Err(HandshakeError::Malformed(format!(
            "a {what} of {len} bytes ({}..={} expected)",
            expected.start(),
            expected.end()
        )));
    }
    let mut body = vec![0u8; len];
    read_exact(stream, &mut body, what).await?;
    Ok(body)
}

async fn read_exact(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), HandshakeError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Err(HandshakeError::Closed(what)),
        Err(error) => Err(HandshakeError::Io(error)),
    }
}

pub(super) fn valid_node_id(id: &[u8]) -> bool {
    (1..=MAX_NODE_ID).contains(&id.len()) && id.iter().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
}

/// The client proof's body length for a node id of `id_len` bytes.
const fn client_proof_len(id_len: usize) -> usize {
    NONCE_BYTES + 1 + id_len + PROOF_BYTES
}

/// The server's side: sends the hello, checks the client's proof, answers
/// with its own. The node id the client claimed (authentic only in that
/// it was proved with the cluster secret).
pub async fn accept(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    secret: &ClusterSecret,
) -> Result<String, HandshakeError> {
    let server_nonce = nonce()?;
    let mut hello = Vec::with_capacity(MAGIC.len() + NONCE_BYTES);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&server_nonce);
    write_frame(stream, &hello).await?;
    let body = read_frame(stream, client_proof_len(1)..=client_proof_len(MAX_NODE_ID), "client proof").await?;
    let (client_nonce, rest) = body.split_at(NONCE_BYTES);
    let Some((&id_len, rest)) = rest.split_first() else {
        return Err(HandshakeError::Malformed("a client proof without a node id".into()));
    };
    let id_len = usize::from(id_len);
    if rest.len() != id_len + PROOF_BYTES {
        return Err(HandshakeError::Malformed(format!(
            "a client proof of {} bytes for a node id of {id_len}",
            body.len()
        )));
    }
    let (node_id, proof) = rest.split_at(id_len);
    if !valid_node_id(node_id) {
        return Err(HandshakeError::Malformed("a node id that is not [A-Za-z0-9._-]{1,64}".into()));
    }
    if !secret.verify(&server_nonce, client_nonce, node_id, CLIENT_ROLE, proof) {
        return Err(HandshakeError::BadProof);
    }
    let answer = secret.proof(&server_nonce, client_nonce, node_id, SERVER_ROLE);
    write_frame(stream, answer.as_ref()).await?;
    Ok(String::from_utf8_lossy(node_id).into_owned())
}

/// The client's side, as node `node_id`: answers the hello with its proof
/// and checks the server's before anything else is sent.
pub async fn connect(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    secret: &ClusterSecret,
    node_id: &str,
) -> Result<(), HandshakeError> {
    if !valid_node_id(node_id.as_bytes()) {
        return Err(HandshakeError::Malformed(format!("this node's id {node_id:?} cannot be sent")));
    }
    let hello = read_frame(stream, MAGIC.len() + NONCE_BYTES..=MAGIC.len() + NONCE_BYTES, "server hello").await?;
    let (magic, server_nonce) = hello.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(HandshakeError::Malformed("the server hello does not start with DNP1".into()));
    }
    let client_nonce = nonce()?;
    let id = node_id.as_bytes();
    let mut proof = Vec::with_capacity(client_proof_len(id.len()));
    proof.extend_from_slice(&client_nonce);
    proof.push(id.len() as u8);
    proof.extend_from_slice(id);
    proof.extend_from_slice(secret.proof(server_nonce, &client_nonce, id, CLIENT_ROLE).as_ref());
    write_frame(stream, &proof).await?;
    let answer = read_frame(stream, PROOF_BYTES..=PROOF_BYTES, "server proof").await.map_err(|error| match error {
        // The server closes without a word on a proof it refused (a reset
        // when our bytes were still unread).
        HandshakeError::Closed(_) => HandshakeError::Refused,
        HandshakeError::Io(error) if error.kind() == io::ErrorKind::ConnectionReset => HandshakeError::Refused,
        other => other,
    })?;
    if !secret.verify(server_nonce, &client_nonce, id, SERVER_ROLE, &answer) {
        return Err(HandshakeError::BadProof);
    }
    Ok(())
}

impl HandshakeError {
    /// The counted reason of a server that refused a connection for this.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            HandshakeError::BadProof | HandshakeError::Refused => RejectReason::BadProof,
            HandshakeError::NoHandshake => RejectReason::NoHandshake,
            HandshakeError::Malformed(_) | HandshakeError::Closed(_) | HandshakeError::Io(_) => RejectReason::Malformed,
        }
    }
}

/// Admits the peers that prove the cluster secret ([`accept`]); the
/// listener's admission deadline bounds the whole handshake.
#[derive(Debug, Clone)]
pub struct SecretAdmission {
    secret: ClusterSecret,
}

impl SecretAdmission {
    /// Admission by `secret`.
    pub fn new(secret: ClusterSecret) -> SecretAdmission {
        SecretAdmission { secret }
    }
}

impl PeerAdmission for SecretAdmission {
    fn admit(
        &self,
        mut stream: TcpStream,
        remote: SocketAddr,
    ) -> BoxFuture<'static, Result<Admitted, AdmissionRefused>> {
        let secret = self.secret.clone();
        Box::pin(async move {
            match accept(&mut stream, &secret).await {
                Ok(node) => {
                    tracing::debug!(%remote, %node, "peer proved the cluster secret");
                    // The id is only as good as the secret every node
                    // shares: the connection speaks for the cluster.
                    Ok(Admitted::anonymous(stream))
                }
                Err(error) => Err(AdmissionRefused { reason: error.reject_reason(), message: error.to_string() }),
            }
        })
    }
}

/// What this node proves on every peer connection it opens.
#[derive(Debug, Clone)]
pub struct ClientCredential {
    /// The cluster secret.
    pub secret: ClusterSecret,
    /// This node's `node.id`, claimed in the proof.
    pub node_id: String,
}
