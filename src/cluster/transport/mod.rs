//! The node-to-node transport of the Raft groups: every group hosted here
//! talks to its replicas on other nodes through this module.
//!
//! - [`wire`]: the peer protocol (HTTP/2 paths, the binary encoding of the
//!   requests and answers, the JSON error shape, the snapshot stream's
//!   head).
//! - [`pool`]: `PeerPool`, one HTTP/2 connection to each peer node, shared
//!   by every group, reconnected with backoff.
//! - [`network`]: `GroupNetworkFactory`, openraft's network of one group
//!   over the shared pool.
//! - [`registry`]: `GroupRegistry`, the replicas hosted here, each behind
//!   a `GroupEndpoint` (a `Raft` of any state machine).
//! - [`snapshot`]: `SnapshotTransfer`, how a state machine's snapshot is
//!   read out as a byte stream and built again from one.
//! - [`server`]: the peer listener (`serve`) and its admission seam
//!   (`PeerAdmission`).
//! - [`handshake`]: the cluster-secret handshake both ends run on a new
//!   connection before HTTP/2 (`SecretAdmission` on the server, the
//!   pool's `ClientCredential` on the client).
//! - [`peer_tls`]: mutual TLS with node certificates (`TlsAdmission` on
//!   the server, the pool's `PoolOptions::tls` on the client), each
//!   connection admitted as the node its certificate names.
//!
//! **One connection per peer.** However many groups a node hosts, it holds
//! one connection to each peer node, on which every request of every group
//! is a stream of its own; two nodes hold two connections between them, one
//! opened by each. A request names its group and target replica, and the
//! receiving node refuses what it does not host.

pub mod control;
pub mod handshake;
pub mod network;
pub mod peer_tls;
pub mod pool;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod wire;

#[cfg(test)]
mod tests;

pub use control::{ControlService, WrongNode};
pub use handshake::{ClientCredential, ClusterSecret, SecretAdmission};
pub use network::GroupNetworkFactory;
pub use peer_tls::{PeerTlsSource, TlsAdmission};
pub use pool::{PeerPool, PoolOptions};
pub use registry::{GroupRegistry, RaftEndpoint};
pub use server::{PeerServerOptions, SenderCheck, serve};

/// The id of a Raft group: a data partition's id, or [`METADATA_GROUP`].
pub type GroupId = u64;

/// The node's metadata group; no data partition takes this id.
pub const METADATA_GROUP: GroupId = u64::MAX;
