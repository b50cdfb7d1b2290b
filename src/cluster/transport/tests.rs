//! The transport end to end, in one process: three nodes on loopback
//! ports, each with its own pool, registry and peer listener, replicas on
//! real log stores (`/dev/shm` when there is one, so that an `fdatasync`
//! is cheap). Leaders killed and nodes restarted, a follower brought back
//! by a streamed snapshot, fifty groups over one connection per peer,
//! requests that try to break the server, and the cluster-secret
//! handshake against wrong secrets, rogue servers and broken bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datanode_partition::blob;
use datanode_partition::raft::{BlobStateMachine, Command, TypeConfig, open_replica};
use datanode_wal::storage::StdStorage;
use datanode_wal::{Engine, Storage, WalOptions};
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::RPCError;
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::VoteRequest;
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use super::GroupId;
use super::handshake::{ClientCredential, ClusterSecret, SecretAdmission};
use super::network::GroupNetworkFactory;
use super::pool::{PeerBody, PeerPool, PoolOptions};
use super::registry::{GroupRegistry, RaftEndpoint};
use super::server::{PeerAdmission, PeerServerOptions, PeerStats, RejectReason, serve};
use super::snapshot::{self, ChunkBody, Piece, Progress};
use super::wire::{self, ErrorBody};

mod tls;

type TestRaft = Raft<TypeConfig, BlobStateMachine>;

/// The longest any step may take: generous, since a debug build shares
/// two cores with other builds.
const DEADLINE: Duration = Duration::from_secs(60);

fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm).unwrap() } else { tempfile::tempdir().unwrap() }
}

fn config(tune: impl FnOnce(&mut Config)) -> Arc<Config> {
    let mut config =
        Config { heartbeat_interval: 50, election_timeout_min: 300, election_timeout_max: 600, ..Config::default() };
    tune(&mut config);
    Arc::new(config.validate().unwrap())
}

fn pool() -> PeerPool {
    PeerPool::new(PoolOptions {
        connect_timeout: Duration::from_millis(500),
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        snapshot_idle_timeout: Duration::from_secs(5),
        ..PoolOptions::default()
    })
}

/// Polls `done` until it holds or the deadline passes.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Replica {
    raft: TestRaft,
    state: BlobStateMachine,
}

/// One node: its pool, registry, listener and replicas.
struct Node {
    id: u64,
    addr: SocketAddr,
    dir: PathBuf,
    engine: Engine,
    pool: PeerPool,
    registry: GroupRegistry,
    stats: Arc<PeerStats>,
    drain: Option<watch::Sender<bool>>,
    server: Option<tokio::task::JoinHandle<()>>,
    replicas: HashMap<GroupId, Replica>,
}

impl Node {
    async fn bind(id: u64, root: &Path) -> (Node, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = Node {
            id,
            addr: listener.local_addr().unwrap(),
            dir: root.join(format!("node{id}")),
            engine: Engine::new(format!("node{id}"), 4),
            pool: pool(),
            registry: GroupRegistry::new(),
            stats: Arc::default(),
            drain: None,
            server: None,
            replicas: HashMap::new(),
        };
        (node, listener)
    }

    fn serve_on(&mut self, listener: TcpListener, options: PeerServerOptions) {
        let (drain, drained) = watch::channel(false);
        let options = PeerServerOptions { stats: Arc::clone(&self.stats), ..options };
        self.server = Some(tokio::spawn(serve(listener, self.registry.clone(), options, drained)));
        self.drain = Some(drain);
    }

    /// Listens again on its address (after [`Node::kill`]).
    async fn listen_again(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve_on(listener, PeerServerOptions::default());
    }

    /// Opens (or reopens) its replica of `group` and registers it.
    async fn open_replica(&mut self, group: GroupId, config: &Arc<Config>) -> TestRaft {
        let storage: Arc<dyn Storage> = Arc::new(StdStorage);
        let options = WalOptions {
            segment_size: 1 << 20,
            prewrite_segments: false,
            engine: Some(self.engine.clone()),
            ..WalOptions::new(group)
        };
        let (store, state) = open_replica(storage, self.dir.join(format!("group{group}")), options).unwrap();
        let network = GroupNetworkFactory::<BlobStateMachine>::new(self.pool.clone(), group, self.id);
        let raft = Raft::new(self.id, Arc::clone(config), network, store, state.clone()).await.unwrap();
        self.registry.register(group, self.id, Arc::new(RaftEndpoint::new(raft.clone(), state.clone())));
        self.replicas.insert(group, Replica { raft: raft.clone(), state });
        raft
    }

    fn raft(&self, group: GroupId) -> &TestRaft {
        &self.replicas[&group].raft
    }

    /// Stops its listener (draining) and every replica: the node is gone.
    async fn kill(&mut self) {
        if let Some(drain) = self.drain.take() {
            drain.send(true).unwrap();
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(DEADLINE, server).await.expect("the peer server drains").unwrap();
        }
        for (group, replica) in self.replicas.drain() {
            self.registry.remove(group, self.id);
            replica.raft.shutdown().await.unwrap();
        }
    }
}

async fn cluster(count: u64, root: &Path) -> Vec<Node> {
    let mut nodes = Vec::new();
    for id in 1..=count {
        let (mut node, listener) = Node::bind(id, root).await;
        node.serve_on(listener, PeerServerOptions::default());
        nodes.push(node);
    }
    nodes
}

fn members(nodes: &[Node]) -> BTreeMap<u64, BasicNode> {
    nodes.iter().map(|node| (node.id, BasicNode { addr: node.addr.to_string() })).collect()
}

/// The leader all `nodes` (those holding the group) agree on.
async fn leader(nodes: &[&Node], group: GroupId) -> u64 {
    let mut agreed = None;
    until(&format!("a leader of group {group}"), || {
        let views: Vec<_> = nodes.iter().map(|node| node.raft(group).metrics().borrow_watched().clone()).collect();
        let leader = views[0].current_leader;
        let leads = views.iter().any(|m| m.state == ServerState::Leader && Some(m.id) == leader);
        if leader.is_some() && leads && views.iter().all(|m| m.current_leader == leader) {
            agreed = leader;
        }
        agreed.is_some()
    })
    .await;
    agreed.unwrap()
}

/// Every blob the state machine holds, in key order.
fn contents(state: &BlobStateMachine) -> BTreeMap<bytes::Bytes, bytes::Bytes> {
    let (keys, _) = state.list(b"", None, usize::MAX);
    keys.into_iter()
        .map(|key| {
            let value = state.get(&key, None).unwrap().unwrap();
            (key, value)
        })
        .collect()
}

fn put(key: &str, size: usize) -> Command {
    let mut value = format!("{key}=").into_bytes();
    value.resize(size, b'.');
    Command::new(blob::encode_put(key.as_bytes(), &value))
}

/// Writes `keys` to `group` through its leader among `nodes`, all at once
/// (openraft batches them); a write the leader turns away (it lost its
/// lease or its leadership meanwhile) is written again through whoever
/// leads then. The leader that took the last of them.
async fn write(nodes: &[&Node], group: GroupId, keys: impl Iterator<Item = String>, size: usize) -> TestRaft {
    let mut pending: Vec<String> = keys.collect();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let elected = leader(nodes, group).await;
        let raft = nodes.iter().find(|node| node.id == elected).unwrap().raft(group).clone();
        let writes = pending.into_iter().map(|key| {
            let raft = raft.clone();
            async move { raft.client_write(put(&key, size)).await.map(drop).map_err(|error| (key, error)) }
        });
        pending = Vec::new();
        for written in futures_util::future::join_all(writes).await {
            match written {
                Ok(()) => {}
                Err((key, error)) if error.forward_to_leader().is_some() => pending.push(key),
                Err((key, error)) => panic!("write of {key}: {error}"),
            }
        }
        if pending.is_empty() {
            return raft;
        }
        assert!(Instant::now() < deadline, "{} writes never found a leader", pending.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn applied(raft: &TestRaft) -> Option<u64> {
    raft.metrics().borrow_watched().last_applied.map(|id| id.index)
}

/// Waits until every node's replica applied the leader's whole log, and
/// checks that they hold the same blobs. (The metrics, not the state
/// machine, say what was applied: they lag behind a write's answer.)
async fn converged(nodes: &[&Node], group: GroupId, leader: &TestRaft, keys: usize) {
    let target = leader.metrics().borrow_watched().last_log_index;
    until("every replica to apply the leader's log", || nodes.iter().all(|node| applied(node.raft(group)) >= target))
        .await;
    let reference = contents(&nodes[0].replicas[&group].state);
    assert_eq!(reference.len(), keys);
    for node in nodes {
        assert_eq!(contents(&node.replicas[&group].state), reference, "node {} differs", node.id);
    }
}

fn by_id(nodes: &[Node], id: u64) -> usize {
    nodes.iter().position(|node| node.id == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_fail_over_and_catch_up() {
    let root = scratch();
    let config = config(|_| {});
    let mut nodes = cluster(3, root.path()).await;
    for node in &mut nodes {
        node.open_replica(1, &config).await;
    }
    nodes[0].raft(1).initialize(members(&nodes)).await.unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_raft = write(&all, 1, (0..200).map(|i| format!("a{i}")), 200).await;
    converged(&all, 1, &leader_raft, 200).await;
    let first = leader(&all, 1).await;

    // The leader dies: listener and Raft.
    let dead = by_id(&nodes, first);
    nodes[dead].kill().await;
    let alive: Vec<&Node> = nodes.iter().filter(|node| node.id != first).collect();
    let second = leader(&alive, 1).await;
    assert_ne!(second, first);
    let new_leader = write(&alive, 1, (0..50).map(|i| format!("b{i}")), 200).await;
    converged(&alive, 1, &new_leader, 250).await;

    // It comes back on the same address with its log and catches up.
    let restarted = nodes[dead].addr.to_string();
    let opened_before = nodes[by_id(&nodes, second)].pool.connections_opened_to(&restarted).await;
    nodes[dead].listen_again().await;
    nodes[dead].open_replica(1, &config).await;
    let all: Vec<&Node> = nodes.iter().collect();
    let new_leader = write(&all, 1, (0..10).map(|i| format!("c{i}")), 200).await;
    converged(&all, 1, &new_leader, 260).await;
    // One connection to each peer per life of that peer's listener: a
    // dropped one was replaced once, never doubled. (A follower that never
    // stood for election dials nobody.)
    for node in &nodes {
        for peer in nodes.iter().filter(|peer| peer.id != node.id) {
            let lives = if peer.id == first { 2 } else { 1 };
            let opened = node.pool.connections_opened_to(&peer.addr.to_string()).await;
            assert!(opened <= lives, "node {} opened {opened} connections to node {}", node.id, peer.id);
        }
    }
    let opened = nodes[by_id(&nodes, second)].pool.connections_opened_to(&restarted).await;
    assert_eq!(opened, opened_before + 1, "the new leader reconnected to the restarted node once");
    for node in &mut nodes {
        node.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_gets_a_streamed_snapshot() {
    let root = scratch();
    let config = config(|config| {
        config.snapshot_policy = SnapshotPolicy::LogsSinceLast(20);
        config.max_in_snapshot_log_to_keep = 0;
        config.purge_batch_size = 1;
        config.snapshot_max_chunk_size = 4096;
    });
    let mut nodes = cluster(3, root.path()).await;
    for node in &mut nodes {
        node.open_replica(1, &config).await;
    }
    nodes[0].raft(1).initialize(members(&nodes)).await.unwrap();
    let first = leader(&nodes.iter().collect::<Vec<_>>(), 1).await;
    let behind = nodes.iter().position(|node| node.id != first).unwrap();
    nodes[behind].kill().await;
    let alive: Vec<&Node> = nodes.iter().filter(|node| node.id != nodes[behind].id).collect();
    // 150 blobs of 1 KiB: an image of about 40 chunks of 4 KiB.
    let mut leader_raft = nodes[by_id(&nodes, first)].raft(1).clone();
    for round in 0..3 {
        leader_raft = write(&alive, 1, (0..50).map(|i| format!("k{round}.{i}")), 1024).await;
    }
    until("the leader to purge its log", || {
        leader_raft.metrics().borrow_watched().purged.is_some_and(|id| id.index > 100)
    })
    .await;

    nodes[behind].listen_again().await;
    nodes[behind].open_replica(1, &config).await;
    converged(&nodes.iter().collect::<Vec<_>>(), 1, &leader_raft, 150).await;
    assert!(nodes[behind].stats.snapshots() >= 1, "the follower caught up by a snapshot");
    let lagging = nodes[behind].raft(1).metrics().borrow_watched().snapshot;
    assert!(lagging.is_some_and(|id| id.index > 100), "installed snapshot {lagging:?}");
    for node in &mut nodes {
        node.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_groups_share_one_connection_per_peer() {
    let root = scratch();
    // 150 replicas on two cores, in a debug build: slower heartbeats.
    let config = config(|config| {
        config.heartbeat_interval = 100;
        config.election_timeout_min = 1000;
        config.election_timeout_max = 2000;
    });
    let mut nodes = cluster(3, root.path()).await;
    let groups: Vec<GroupId> = (1..=49).chain([super::METADATA_GROUP]).collect();
    for &group in &groups {
        for node in &mut nodes {
            node.open_replica(group, &config).await;
        }
    }
    let all = members(&nodes);
    for (n, &group) in groups.iter().enumerate() {
        nodes[n % 3].raft(group).initialize(all.clone()).await.unwrap();
    }
    let everyone: Vec<&Node> = nodes.iter().collect();
    for &group in &groups {
        let leader_raft = write(&everyone, group, std::iter::once(format!("g{group}")), 100).await;
        converged(&everyone, group, &leader_raft, 1).await;
    }
    for node in &nodes {
        assert_eq!(node.pool.connections_opened(), 2, "node {} dialled each peer once", node.id);
        assert_eq!(node.stats.admitted(), 2, "node {} accepted one connection from each peer", node.id);
    }
    for node in &mut nodes {
        node.kill().await;
    }
}

/// Sends a raw request; the status and body of the answer.
async fn raw(
    pool: &PeerPool,
    addr: SocketAddr,
    method: &str,
    path: &str,
    from: Option<&str>,
    body: PeerBody,
) -> (StatusCode, Bytes) {
    let mut sender = pool.sender(&addr.to_string(), DEADLINE).await.unwrap();
    let mut request = Request::builder().method(method).uri(format!("http://{addr}{path}"));
    if let Some(from) = from {
        request = request.header(wire::SENDER_HEADER, from);
    }
    let response = sender.send_request(request.body(body).unwrap()).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

fn full(bytes: impl Into<Bytes>) -> PeerBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

fn refusal_code(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body).unwrap().error
}

fn vote_request(term: u64) -> VoteRequest<TypeConfig> {
    use openraft::impls::leader_id_adv::LeaderId;
    VoteRequest {
        vote: openraft::impls::Vote { leader_id: LeaderId { term, node_id: 9 }, committed: false },
        last_log_id: None,
        leadership_transfer: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_groups_replicas_and_garbage_are_refused_without_harm() {
    let root = scratch();
    let (mut node, listener) = Node::bind(1, root.path()).await;
    node.serve_on(listener, PeerServerOptions { max_request_bytes: 64 << 10, ..PeerServerOptions::default() });
    let raft = node.open_replica(7, &config(|_| {})).await;
    raft.initialize(members(std::slice::from_ref(&node))).await.unwrap();
    leader(&[&node], 7).await;
    let client = pool();
    let addr = node.addr;
    let vote = wire::encode(&vote_request(1)).unwrap();

    // Method, path, `raft-from`, body; the status and refusal code.
    type Case = (&'static str, String, Option<&'static str>, PeerBody, StatusCode, &'static str);
    let cases: Vec<Case> = vec![
        (
            "POST",
            wire::path(8, 1, wire::Rpc::Vote),
            Some("2"),
            full(vote.clone()),
            StatusCode::NOT_FOUND,
            "unknown_group",
        ),
        (
            "POST",
            wire::path(7, 2, wire::Rpc::Vote),
            Some("2"),
            full(vote.clone()),
            StatusCode::NOT_FOUND,
            "unknown_replica",
        ),
        (
            "POST",
            wire::path(7, 1, wire::Rpc::Append),
            Some("2"),
            full(&b"\xff\xff\xff\xff garbage"[..]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "POST",
            wire::path(7, 1, wire::Rpc::Vote),
            Some("2"),
            full(Bytes::new()),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("POST", wire::path(7, 1, wire::Rpc::Vote), None, full(vote.clone()), StatusCode::BAD_REQUEST, "bad_request"),
        (
            "POST",
            wire::path(7, 1, wire::Rpc::Vote),
            Some("x"),
            full(vote.clone()),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        ("GET", wire::path(7, 1, wire::Rpc::Vote), Some("2"), full(Bytes::new()), StatusCode::NOT_FOUND, "not_found"),
        ("POST", "/raft/v1/7/1/nope".into(), Some("2"), full(vote.clone()), StatusCode::NOT_FOUND, "not_found"),
        ("POST", "/".into(), Some("2"), full(vote.clone()), StatusCode::NOT_FOUND, "not_found"),
        (
            "POST",
            wire::path(7, 1, wire::Rpc::Append),
            Some("2"),
            full(vec![0u8; 65 << 10]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "POST",
            wire::path(7, 1, wire::Rpc::Snapshot),
            Some("2"),
            full(&[0xff; 8][..]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "POST",
            wire::path(7, 1, wire::Rpc::Snapshot),
            Some("2"),
            full(&[4, 0, 0, 0, 1, 2][..]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "POST",
            wire::path(7, 1, wire::Rpc::Snapshot),
            Some("2"),
            full(&[3, 0, 0, 0, 1, 2, 3][..]),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (method, path, from, body, status, code) in cases {
        let (got, body) = raw(&client, addr, method, &path, from, body).await;
        assert_eq!((got, refusal_code(&body).as_str()), (status, code), "{method} {path}");
    }

    // A snapshot whose last entry is beyond the vote it comes with.
    let meta: super::registry::SnapshotMeta = openraft::SnapshotMeta {
        last_log_id: Some(openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId { term: 5, node_id: 9 }, 10)),
        last_membership: Default::default(),
    };
    let head = wire::snapshot_head(&(&vote_request(2).vote, &meta)).unwrap();
    let (got, body) = raw(&client, addr, "POST", &wire::path(7, 1, wire::Rpc::Snapshot), Some("2"), full(head)).await;
    assert_eq!((got, refusal_code(&body).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));

    // A snapshot stream that breaks off midway is refused, never installed.
    let empty = super::registry::SnapshotMeta::default();
    let head = wire::snapshot_head(&(&vote_request(2).vote, &empty)).unwrap();
    let (pieces, receiver) = snapshot::channel();
    pieces.send(Piece::Bytes(Bytes::from_static(&[1, 0, 0, 0]))).await.unwrap();
    pieces.send(Piece::Failed(std::io::Error::other("reader failed"))).await.unwrap();
    let body = ChunkBody::new(head, receiver, Progress::new()).boxed_unsync();
    let mut sender = client.sender(&addr.to_string(), DEADLINE).await.unwrap();
    let request = Request::post(format!("http://{addr}{}", wire::path(7, 1, wire::Rpc::Snapshot)))
        .header(wire::SENDER_HEADER, "2")
        .body(body)
        .unwrap();
    // The client resets the stream; the server may or may not answer first.
    if let Ok(response) = sender.send_request(request).await {
        assert!(!response.status().is_success(), "{}", response.status());
    }
    assert_eq!(node.stats.snapshots(), 0);

    // Not HTTP/2, or not HTTP at all: the connection is closed.
    for junk in [&b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..], &[0u8; 64][..]] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(junk).await.unwrap();
        let mut sink = Vec::new();
        // An end or a reset, whichever the server's close gives: the point
        // is that it closes, and serves on (below).
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut sink)).await.expect("the server closes it");
    }

    // Through openraft's network: refusals and a dead address are
    // unreachable (back off), never a panic.
    let option = RPCOption::new(Duration::from_secs(2));
    let mut factory = GroupNetworkFactory::<BlobStateMachine>::new(client.clone(), 8, 2);
    let mut unknown = factory.new_client(1, &BasicNode { addr: addr.to_string() }).await;
    let refused = unknown.vote(vote_request(1), option.clone()).await.unwrap_err();
    assert!(matches!(&refused, RPCError::Unreachable(_)), "{refused}");
    assert!(refused.to_string().contains("unknown_group"), "{refused}");
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nobody = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut dead = factory.new_client(1, &BasicNode { addr: nobody }).await;
    assert!(matches!(dead.vote(vote_request(1), option.clone()).await, Err(RPCError::Unreachable(_))));
    let again = Instant::now();
    let backing_off = dead.vote(vote_request(1), option.clone()).await.unwrap_err();
    assert!(backing_off.to_string().contains("backing off"), "{backing_off}");
    assert!(again.elapsed() < Duration::from_millis(100));

    // The node serves on: a vote through the network, a write.
    let mut factory = GroupNetworkFactory::<BlobStateMachine>::new(client.clone(), 7, 2);
    let mut good = factory.new_client(1, &BasicNode { addr: addr.to_string() }).await;
    let answer = good.vote(vote_request(1), option).await.unwrap();
    assert!(!answer.is_granted_to(&vote_request(1).vote), "a stale term is not granted");
    write(&[&node], 7, std::iter::once("after".to_string()), 10).await;
    node.kill().await;
}

/// Refuses every connection.
#[derive(Debug)]
struct RefuseAll;

impl PeerAdmission for RefuseAll {
    fn admit(
        &self,
        _stream: tokio::net::TcpStream,
        remote: SocketAddr,
    ) -> futures_util::future::BoxFuture<'static, Result<super::server::Admitted, super::server::AdmissionRefused>>
    {
        Box::pin(async move {
            Err(super::server::AdmissionRefused {
                reason: super::server::RejectReason::BadProof,
                message: format!("{remote} has no credential"),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_reaches_no_group() {
    let root = scratch();
    let (mut node, listener) = Node::bind(1, root.path()).await;
    node.serve_on(listener, PeerServerOptions { admission: Arc::new(RefuseAll), ..PeerServerOptions::default() });
    node.open_replica(3, &config(|_| {})).await;
    let mut factory = GroupNetworkFactory::<BlobStateMachine>::new(pool(), 3, 2);
    let mut client = factory.new_client(1, &BasicNode { addr: node.addr.to_string() }).await;
    let refused = client.vote(vote_request(1), RPCOption::new(Duration::from_secs(2))).await.unwrap_err();
    assert!(matches!(refused, RPCError::Network(_) | RPCError::Unreachable(_)), "{refused}");
    assert!(node.stats.refused() >= 1);
    assert_eq!(node.stats.admitted(), 0);
    assert_eq!(node.raft(3).metrics().borrow_watched().vote.leader_id.term, 0, "the vote never reached the group");
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_the_request_under_way_finish_and_takes_no_new_one() {
    let root = scratch();
    let (mut node, listener) = Node::bind(1, root.path()).await;
    node.serve_on(listener, PeerServerOptions::default());
    let raft = node.open_replica(7, &config(|_| {})).await;
    raft.initialize(members(std::slice::from_ref(&node))).await.unwrap();
    leader(&[&node], 7).await;
    let client = pool();
    let addr = node.addr;

    // A vote whose body arrives in two halves, the drain between them.
    let vote = wire::encode(&vote_request(1)).unwrap();
    let (first, second) = vote.split_at(vote.len() / 2);
    let (pieces, receiver) = snapshot::channel();
    let body = ChunkBody::new(Bytes::copy_from_slice(first), receiver, Progress::new()).boxed_unsync();
    let mut sender = client.sender(&addr.to_string(), DEADLINE).await.unwrap();
    let request = Request::post(format!("http://{addr}{}", wire::path(7, 1, wire::Rpc::Vote)))
        .header(wire::SENDER_HEADER, "2")
        .body(body)
        .unwrap();
    let answer = tokio::spawn(sender.send_request(request));
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.drain.take().unwrap().send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!node.server.as_ref().unwrap().is_finished(), "the server waits for the request under way");
    pieces.send(Piece::Bytes(Bytes::copy_from_slice(second))).await.unwrap();
    pieces.send(Piece::End).await.unwrap();
    let response = tokio::time::timeout(DEADLINE, answer).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let _: openraft::raft::VoteResponse<TypeConfig> = wire::decode(&bytes).unwrap();
    tokio::time::timeout(DEADLINE, node.server.take().unwrap()).await.expect("the server drained").unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_accepts_and_never_answers_costs_one_soft_ttl() {
    // Accepts connections and reads nothing: no HTTP/2 settings, no answer.
    let blackhole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = blackhole.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut streams = Vec::new();
        while let Ok((stream, _)) = blackhole.accept().await {
            streams.push(stream);
        }
    });
    let mut factory = GroupNetworkFactory::<BlobStateMachine>::new(pool(), 1, 2);
    let mut client = factory.new_client(1, &BasicNode { addr }).await;
    let option = RPCOption::new(Duration::from_millis(400));
    let started = Instant::now();
    let failed = client.vote(vote_request(1), option.clone()).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(failed, RPCError::Timeout(_) | RPCError::Unreachable(_)), "{failed}");
    assert!(took >= option.soft_ttl() / 2 && took < option.hard_ttl(), "{took:?}");
    held.abort();
}

/// Answers every call after a pause, with the bytes it was given.
struct SlowEcho(Duration);

impl super::registry::GroupEndpoint for SlowEcho {
    fn call(
        &self,
        _rpc: wire::Rpc,
        request: Bytes,
    ) -> futures_util::future::BoxFuture<'_, Result<Bytes, super::registry::EndpointError>> {
        Box::pin(async move {
            tokio::time::sleep(self.0).await;
            Ok(request)
        })
    }

    fn install_snapshot(
        &self,
        _vote: datanode_partition::raft::Vote,
        _meta: super::registry::SnapshotMeta,
        _body: snapshot::SnapshotBody,
    ) -> futures_util::future::BoxFuture<'_, Result<Bytes, super::registry::EndpointError>> {
        Box::pin(async { Err(super::registry::EndpointError::BadRequest("no snapshots here".into())) })
    }
}

/// RPCs given up while their answer is arriving (openraft drops them at
/// their budget) leave frames arriving for streams the client reset; a
/// long-lived connection must take any number of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_abandoned_requests_do_not_cost_the_connection() {
    let root = scratch();
    let (mut node, listener) = Node::bind(1, root.path()).await;
    node.serve_on(listener, PeerServerOptions::default());
    node.registry.register(5, 1, Arc::new(SlowEcho(Duration::from_millis(1))));
    let client = pool();
    let addr = node.addr.to_string();
    let uri = format!("http://{addr}{}", wire::path(5, 1, wire::Rpc::Vote));
    // Answers larger than a stream's first flow-control window: they are
    // still arriving when the client gives up on them.
    let payload = Bytes::from(vec![7u8; 128 << 10]);
    let send = |sender: &mut hyper::client::conn::http2::SendRequest<PeerBody>, body: Bytes| {
        let request = Request::post(uri.clone()).header(wire::SENDER_HEADER, "2").body(full(body)).unwrap();
        sender.send_request(request)
    };
    // 1250 of them: more than h2's default lifetime limit of 1024 resets.
    for _round in 0..5 {
        let mut sender = client.sender(&addr, DEADLINE).await.unwrap();
        let abandoned: Vec<_> = (0..250).map(|_| tokio::spawn(send(&mut sender, payload.clone()))).collect();
        for request in abandoned {
            // The head arrived; the body is dropped unread.
            let _ = request.await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sender = client.sender(&addr, DEADLINE).await.unwrap();
    let response = send(&mut sender, Bytes::from_static(b"ping")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), Bytes::from_static(b"ping"));
    assert_eq!(client.connections_opened(), 1, "the connection survived the abandoned requests");
    node.kill().await;
}

// The cluster-secret handshake (`handshake.rs`), against real sockets.

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-the-cluster-secret";
const OTHER_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-another-secret";

fn secret(bytes: &[u8]) -> ClusterSecret {
    ClusterSecret::from_contents(bytes).unwrap()
}

fn secret_pool(bytes: &[u8], node_id: &str) -> PeerPool {
    let credential = ClientCredential { secret: secret(bytes), node_id: node_id.to_string() };
    PeerPool::new(PoolOptions { credential: Some(credential), ..pool().options().clone() })
}

fn secret_options(bytes: &[u8]) -> PeerServerOptions {
    PeerServerOptions { admission: Arc::new(SecretAdmission::new(secret(bytes))), ..PeerServerOptions::default() }
}

/// The proof of the documented transcript, computed here independently of
/// `handshake.rs`: CONTEXT || server nonce || client nonce || id length
/// || id || role.
fn documented_proof(secret: &[u8], server_nonce: &[u8], client_nonce: &[u8], id: &[u8], role: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut transcript = b"datanode-peer-v1".to_vec();
    transcript.extend_from_slice(server_nonce);
    transcript.extend_from_slice(client_nonce);
    transcript.push(id.len() as u8);
    transcript.extend_from_slice(id);
    transcript.extend_from_slice(role);
    ring::hmac::sign(&key, &transcript).as_ref().to_vec()
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u16).to_le_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// Connects by hand and reads the server's hello: the stream and the
/// server nonce.
async fn hello(addr: SocketAddr) -> (tokio::net::TcpStream, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(u16::from_le_bytes(head), 36, "a hello is the magic and a nonce");
    let mut body = [0u8; 36];
    stream.read_exact(&mut body).await.unwrap();
    assert_eq!(&body[..4], b"DNP1");
    (stream, body[4..].to_vec())
}

fn client_proof(secret: &[u8], server_nonce: &[u8], client_nonce: &[u8], id: &[u8]) -> Vec<u8> {
    let mut body = client_nonce.to_vec();
    body.push(id.len() as u8);
    body.extend_from_slice(id);
    body.extend_from_slice(&documented_proof(secret, server_nonce, client_nonce, id, b"client"));
    body
}

/// Everything the server sends until it closes the connection.
async fn rest_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    // An end or a reset: either way the server closed it.
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await.expect("the server closes it");
    rest
}

#[test]
fn a_cluster_secret_is_at_least_32_bytes_after_trimming() {
    assert!(ClusterSecret::from_contents(b"  short \n").is_err());
    assert!(ClusterSecret::from_contents(&[b'x'; 31]).is_err());
    let error = ClusterSecret::from_contents(format!("{}\n", "y".repeat(31)).as_bytes()).unwrap_err();
    assert!(!error.contains("yyy"), "the secret is never in a message: {error}");
    assert!(ClusterSecret::from_contents(format!("\n{}\n", "z".repeat(32)).as_bytes()).is_ok());
    assert_eq!(format!("{:?}", secret(SECRET)), "ClusterSecret(..)", "Debug shows no byte of it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_the_secret_replicate_and_a_wrong_secret_reaches_no_group() {
    let root = scratch();
    let config = config(|_| {});
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let (mut node, listener) = Node::bind(id, root.path()).await;
        node.pool = secret_pool(SECRET, &format!("dn-{id}"));
        node.serve_on(listener, secret_options(SECRET));
        nodes.push(node);
    }
    for node in &mut nodes {
        node.open_replica(1, &config).await;
    }
    nodes[0].raft(1).initialize(members(&nodes)).await.unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_raft = write(&all, 1, (0..20).map(|i| format!("a{i}")), 100).await;
    converged(&all, 1, &leader_raft, 20).await;
    // The leader dialled both followers (a follower that never stood for
    // election dials nobody); no peer was refused.
    assert!(nodes.iter().map(|node| node.stats.admitted()).sum::<u64>() >= 2);
    for node in &nodes {
        assert_eq!(node.stats.refused(), 0, "node {} refused no peer", node.id);
    }

    // A vote of a term far ahead from a client with another secret, and
    // from one with none: had either reached the group, its term would be
    // 1000 now.
    let term_before = leader_raft.metrics().borrow_watched().current_term;
    let target = nodes[0].addr.to_string();
    for (client, reason) in
        [(secret_pool(OTHER_SECRET, "dn-9"), RejectReason::BadProof), (pool(), RejectReason::NoHandshake)]
    {
        let mut factory = GroupNetworkFactory::<BlobStateMachine>::new(client, 1, 9);
        let mut rogue = factory.new_client(nodes[0].id, &BasicNode { addr: target.clone() }).await;
        let refused = rogue.vote(vote_request(1000), RPCOption::new(Duration::from_secs(2))).await.unwrap_err();
        assert!(matches!(refused, RPCError::Network(_) | RPCError::Unreachable(_)), "{refused}");
        until(&format!("a refusal for {}", reason.as_str()), || nodes[0].stats.refused_for(reason) >= 1).await;
    }
    for node in &nodes {
        let term = node.raft(1).metrics().borrow_watched().current_term;
        assert!(term < 1000, "node {}: term {term}: the rogue vote reached the group", node.id);
    }
    // The group serves on, its contents only what its leader wrote.
    let leader_raft = write(&all, 1, std::iter::once("after".to_string()), 100).await;
    converged(&all, 1, &leader_raft, 21).await;
    assert!(leader_raft.metrics().borrow_watched().current_term < 1000, "was {term_before}");
    for node in &mut nodes {
        node.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_server_with_another_secret_learns_no_request() {
    // Runs the handshake by the book with its own secret, then records
    // whatever the client sends next.
    let rogue = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = rogue.local_addr().unwrap().to_string();
    let recorded = tokio::spawn(async move {
        let (mut stream, _) = rogue.accept().await.unwrap();
        let server_nonce = [7u8; 32];
        let mut hello = b"DNP1".to_vec();
        hello.extend_from_slice(&server_nonce);
        stream.write_all(&frame(&hello)).await.unwrap();
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.unwrap();
        let mut body = vec![0u8; usize::from(u16::from_le_bytes(head))];
        stream.read_exact(&mut body).await.unwrap();
        let (client_nonce, rest) = body.split_at(32);
        let id = &rest[1..1 + usize::from(rest[0])];
        let proof = documented_proof(OTHER_SECRET, &server_nonce, client_nonce, id, b"server");
        stream.write_all(&frame(&proof)).await.unwrap();
        rest_until_closed(&mut stream).await
    });
    let client = secret_pool(SECRET, "dn-1");
    let failed = client.sender(&addr, DEADLINE).await.unwrap_err();
    assert!(failed.to_string().contains("proof does not match"), "{failed}");
    let after_proof = recorded.await.unwrap();
    assert!(after_proof.is_empty(), "the client sent {} bytes to a server that proved nothing", after_proof.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_transcript_is_admitted_and_broken_handshakes_are_refused_and_counted() {
    let root = scratch();
    let (mut node, listener) = Node::bind(1, root.path()).await;
    node.serve_on(listener, secret_options(SECRET));
    let addr = node.addr;

    // By hand, by the documented transcript: admitted, and the server's
    // proof checks the same way.
    let (mut stream, server_nonce) = hello(addr).await;
    let client_nonce = [3u8; 32];
    let proof = client_proof(SECRET, &server_nonce, &client_nonce, b"dn-2");
    stream.write_all(&frame(&proof)).await.unwrap();
    let mut answer = [0u8; 34];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(u16::from_le_bytes([answer[0], answer[1]]), 32);
    assert_eq!(answer[2..], documented_proof(SECRET, &server_nonce, &client_nonce, b"dn-2", b"server")[..]);
    until("the admission", || node.stats.admitted() == 1).await;
    drop(stream);

    // Each case: what the client sends after the hello, and the reason.
    let wrong = client_proof(OTHER_SECRET, &server_nonce, &client_nonce, b"dn-2");
    let mut bad_id = client_proof(SECRET, &server_nonce, &client_nonce, b"dn-2");
    bad_id[33] = b'/';
    let mut id_too_long = client_proof(SECRET, &server_nonce, &client_nonce, b"dn-2");
    id_too_long[32] = 200;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    type Case = (&'static str, Box<dyn Fn(&[u8]) -> Vec<u8>>, RejectReason);
    let cases: Vec<Case> = vec![
        ("another secret", Box::new(move |_| frame(&wrong)), RejectReason::BadProof),
        ("a proof replayed from another connection", Box::new(move |_| frame(&proof)), RejectReason::BadProof),
        (
            "a proof over the right nonce with a flipped bit",
            Box::new(|nonce| {
                let mut body = client_proof(SECRET, nonce, &[5; 32], b"dn-2");
                let last = body.len() - 1;
                body[last] ^= 1;
                frame(&body)
            }),
            RejectReason::BadProof,
        ),
        ("HTTP/2 at once", Box::new(move |_| preface.clone()), RejectReason::NoHandshake),
        (
            "a frame of 4096 bytes",
            Box::new(|_| [&4096u16.to_le_bytes()[..], &[0u8; 512][..]].concat()),
            RejectReason::Malformed,
        ),
        ("an empty frame", Box::new(|_| frame(b"")), RejectReason::Malformed),
        ("a frame too short for a proof", Box::new(|_| frame(&[1u8; 40])), RejectReason::Malformed),
        ("a node id that is not one", Box::new(move |_| frame(&bad_id)), RejectReason::Malformed),
        ("an id length beyond the frame", Box::new(move |_| frame(&id_too_long)), RejectReason::Malformed),
        (
            "a proof cut short, then the end",
            Box::new(|nonce| frame(&client_proof(SECRET, nonce, &[6; 32], b"dn-2"))[..40].to_vec()),
            RejectReason::Malformed,
        ),
        ("half a length, then the end", Box::new(|_| vec![0x45]), RejectReason::Malformed),
        ("nothing, then the end", Box::new(|_| Vec::new()), RejectReason::Malformed),
    ];
    let mut expected: HashMap<&'static str, u64> = HashMap::new();
    for (what, send, reason) in cases {
        let (mut stream, nonce) = hello(addr).await;
        stream.write_all(&send(&nonce)).await.unwrap();
        stream.shutdown().await.unwrap();
        let answer = rest_until_closed(&mut stream).await;
        assert!(answer.is_empty(), "{what}: the server answered {} bytes", answer.len());
        *expected.entry(reason.as_str()).or_default() += 1;
        until(&format!("{what} counted as {}", reason.as_str()), || {
            node.stats.refused_for(reason) == expected[reason.as_str()]
        })
        .await;
    }
    assert_eq!(node.stats.admitted(), 1, "nothing broken was admitted");

    // The pool, with the secret, is served on.
    let client = secret_pool(SECRET, "dn-2");
    node.registry.register(5, 1, Arc::new(SlowEcho(Duration::ZERO)));
    let (status, body) =
        raw(&client, addr, "POST", &wire::path(5, 1, wire::Rpc::Vote), Some("2"), full(&b"ping"[..])).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ping"[..]));
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_the_hello_is_cut_at_the_deadline() {
    let root = scratch();
    let (mut node, listener) = Node::bind(1, root.path()).await;
    let options = PeerServerOptions { admission_timeout: Duration::from_millis(300), ..secret_options(SECRET) };
    node.serve_on(listener, options);
    let (mut silent, _) = hello(node.addr).await;
    // Half a frame and then silence: the same.
    let (mut stalled, _) = hello(node.addr).await;
    stalled.write_all(&[97]).await.unwrap();
    for stream in [&mut silent, &mut stalled] {
        let answer = rest_until_closed(stream).await;
        assert!(answer.is_empty(), "the server answered {} bytes", answer.len());
    }
    until("two timeouts counted", || node.stats.refused_for(RejectReason::Timeout) == 2).await;
    assert_eq!(node.stats.admitted(), 0);
    node.kill().await;
}

/// Handshakes that stall hold at most `max_admitting` admissions: one
/// more connection is closed at once (`busy`), and a node is admitted
/// again as soon as a stalled one is cut at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_fill_the_admission_slots_and_no_more() {
    let root = scratch();
    let (mut node, listener) = Node::bind(1, root.path()).await;
    let options =
        PeerServerOptions { admission_timeout: Duration::from_secs(2), max_admitting: 2, ..secret_options(SECRET) };
    node.serve_on(listener, options);
    node.registry.register(5, 1, Arc::new(SlowEcho(Duration::ZERO)));
    let (_silent, _) = hello(node.addr).await;
    let (_stalled, _) = hello(node.addr).await;
    // The third: closed without a hello (an admission would send one
    // first), counted busy.
    let mut third = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let answer = rest_until_closed(&mut third).await;
    assert!(answer.is_empty(), "the server answered {} bytes", answer.len());
    assert_eq!(node.stats.refused_for(RejectReason::Busy), 1);
    // Once the stalled two are cut, a node with the secret is admitted.
    until("the stalled handshakes cut", || node.stats.refused_for(RejectReason::Timeout) == 2).await;
    let client = secret_pool(SECRET, "dn-2");
    let (status, _) =
        raw(&client, node.addr, "POST", &wire::path(5, 1, wire::Rpc::Vote), Some("2"), full(Bytes::from_static(b"x")))
            .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(node.stats.admitted(), 1);
    node.kill().await;
}
