//! Replicated partitions on clusters of real `datanode` processes on
//! loopback: writes through every node (307 redirects to the leader),
//! the leader killed with SIGKILL under load, a follower far behind, five
//! nodes with two down. Every acknowledged write must read back from every
//! node, and nothing a non-leader refused may appear.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::cluster::{Client, ClusterLoad, TestCluster, assert_readable, node_index};
use support::disks::{Fs, LoopDisk, unavailable};
use support::wait_for;

/// A PUT through node `via`, retried while the answer is 503 `no_leader`
/// (nothing written: an election is under way) for up to 10 s, as a
/// client does.
fn put(client: &Client, cluster: &TestCluster, via: usize, partition: u64, key: &str, value: &[u8]) -> u16 {
    let url = cluster.url(via, &format!("/v1/partitions/{partition}/blobs/{key}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = client.send("PUT", &url, Some(value));
        let no_leader = status == 503 && support::error_code(&body) == "no_leader";
        if !no_leader || std::time::Instant::now() > deadline {
            if status != 201 {
                eprintln!("PUT {key} via node {via}: {status} {}", String::from_utf8_lossy(&body));
            }
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status of replicated partition `id` on node `i` (its replica's
/// `raft` view), or `Null`.
fn raft_view(cluster: &TestCluster, i: usize, id: u64) -> Value {
    cluster.node(i).json(&format!("/v1/partitions/{id}"))["raft"].clone()
}

#[test]
fn a_replicated_partition_survives_its_leader_killed_under_load() {
    let mut cluster = TestCluster::start(3, "");
    cluster.wait_formed();
    let (status, created) = cluster.create(1, 1, None);
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["replicas"].as_array().map(Vec::len), Some(3), "{created}");
    let nodes: Vec<&str> =
        created["replicas"].as_array().unwrap().iter().map(|r| r["node"].as_str().unwrap()).collect();
    let mut distinct = nodes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "replicas on distinct nodes: {created}");
    let leader = cluster.wait_leader(1);

    // Writes through every node: followers redirect to the leader.
    let client = Client::new();
    for via in 0..3 {
        assert_eq!(put(&client, &cluster, via, 1, &format!("first-{via}"), b"v"), 201, "via node {via}");
    }

    let load = ClusterLoad::start(&cluster.ports, 1, 8, 512, "load");
    load.wait_more(200, Duration::from_secs(60));
    cluster.kill(leader);
    // A new leader takes over and writes resume.
    let new_leader = cluster.wait_leader(1);
    assert_ne!(new_leader, leader);
    load.wait_more(200, Duration::from_secs(60));
    let (acked, failures) = load.stop();
    eprintln!("{} acknowledged, other answers: {failures:?}", acked.len());

    for i in cluster.running() {
        assert_readable(cluster.ports[i], 1, &acked, &format!("after the leader was killed, via node {i}"));
    }
    // The killed node rejoins and catches up: its replica applies what the
    // leader committed.
    cluster.restart(leader);
    let commit = raft_view(&cluster, new_leader, 1)["commit_index"].as_u64().unwrap();
    wait_for("the restarted replica catches up", Duration::from_secs(60), || {
        raft_view(&cluster, leader, 1)["applied_index"].as_u64().is_some_and(|applied| applied >= commit)
    });
    assert_readable(cluster.ports[leader], 1, &acked, "via the restarted node");
}

#[test]
fn a_follower_answers_307_with_the_leader_and_writes_nothing() {
    let cluster = TestCluster::start(3, "");
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 5, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(5);
    let follower = (leader + 1) % 3;
    // Until the new leader's first append reaches it, a follower knows no
    // leader (503 no_leader, which the other tests retry).
    wait_for("the follower to know the leader", Duration::from_secs(30), || {
        !raft_view(&cluster, follower, 5)["leader"].is_null()
    });
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let url = cluster.url(follower, "/v1/partitions/5/blobs/refused");
    let response = match agent.put(&url).send_bytes(b"nope") {
        Err(ureq::Error::Status(_, response)) | Ok(response) => response,
        Err(error) => panic!("{error}"),
    };
    assert_eq!(response.status(), 307);
    let location = response.header("location").unwrap().to_string();
    assert_eq!(location, cluster.url(leader, "/v1/partitions/5/blobs/refused"));
    let body: Value = serde_json::from_reader(response.into_reader()).unwrap();
    assert_eq!(body["error"], "not_leader");
    assert_eq!(body["leader"].as_str().and_then(node_index), Some(leader));
    assert_eq!(body["leader_url"], cluster.url(leader, ""));
    assert!(body["message"].is_string());
    // Nothing was written: the key is absent on the leader.
    let (status, _) = Client::new().send("GET", &cluster.url(leader, "/v1/partitions/5/blobs/refused"), None);
    assert_eq!(status, 404);
    // A snapshot install into a voter is refused (only its leader feeds it).
    let (status, body) =
        Client::new().send("PUT", &cluster.url(follower, "/v1/partitions/5/snapshot"), Some(b"image bytes"));
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(support::error_code(&body), "replicated_partition");
    // A partition nobody created: 404 from any node.
    let (status, body) = Client::new().send("GET", &cluster.url(follower, "/v1/partitions/99/blobs/x"), None);
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn a_follower_far_behind_catches_up_by_snapshot() {
    // Snapshots every 200 entries, so that the log the stopped follower
    // needs is purged while it is down.
    let mut cluster = TestCluster::start(3, "snapshot_logs = 200\n");
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 2, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(2);
    let follower = (leader + 1) % 3;
    let follower_had = raft_view(&cluster, follower, 2)["last_log_index"].as_u64().unwrap_or(0);
    cluster.kill(follower);
    let live: Vec<u16> = cluster.running().iter().map(|i| cluster.ports[*i]).collect();
    let load = ClusterLoad::start(&live, 2, 8, 1024, "behind");
    load.wait_more(1500, Duration::from_secs(120));
    let (acked, _) = load.stop();
    let leader = cluster.wait_leader(2);
    let purged = raft_view(&cluster, leader, 2)["purged_index"].as_u64().unwrap_or(0);
    assert!(
        purged > follower_had + 1,
        "the leader purged its log past what the follower holds ({follower_had}): {}",
        raft_view(&cluster, leader, 2)
    );
    cluster.restart(follower);
    let commit = raft_view(&cluster, leader, 2)["commit_index"].as_u64().unwrap();
    wait_for("the far-behind follower catches up", Duration::from_secs(120), || {
        raft_view(&cluster, follower, 2)["applied_index"].as_u64().is_some_and(|applied| applied >= commit)
    });
    // What it lacked is purged everywhere: it caught up by a snapshot.
    // Its state is whole: stop the other follower, so that every read is
    // served by a majority that includes it.
    let other = (0..3).find(|i| *i != leader && *i != follower).unwrap();
    cluster.kill(other);
    assert_readable(cluster.ports[follower], 2, &acked, "with the caught-up follower in the majority");
}

#[test]
fn five_nodes_with_two_killed_still_serve() {
    let mut cluster = TestCluster::start(5, "");
    cluster.wait_formed();
    let (status, created) = cluster.create(4, 3, Some(5));
    assert_eq!(status, 201, "{created}");
    cluster.wait_leader(3);
    let client = Client::new();
    for i in 0..20 {
        assert_eq!(put(&client, &cluster, i % 5, 3, &format!("k{i}"), b"before"), 201);
    }
    // A seed and another node down: the data group keeps three of five,
    // the metadata group two of its three seeds.
    cluster.kill(0);
    cluster.kill(4);
    cluster.wait_leader(3);
    let mut acked = Vec::new();
    for i in 0..20 {
        let key = format!("after{i}");
        assert_eq!(put(&client, &cluster, 1 + i % 3, 3, &key, b"after"), 201, "with two of five down");
        acked.push(support::cluster::Acked { key, value: b"after".to_vec() });
    }
    for i in cluster.running() {
        assert_readable(cluster.ports[i], 3, &acked, "with two of five down");
    }
}

#[test]
fn the_leaders_disk_shut_down_under_load_faults_only_its_replica() {
    if unavailable(Fs::Xfs.tools()).is_some() {
        return;
    }
    let disks: Vec<LoopDisk> = (0..3).map(|_| LoopDisk::new(Fs::Xfs)).collect();
    let paths: Vec<&std::path::Path> = disks.iter().map(LoopDisk::path).collect();
    let cluster = TestCluster::start_on(3, "", &paths);
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 4, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(4);
    let load = ClusterLoad::start(&cluster.ports, 4, 8, 4096, "dead-disk");
    load.wait_more(300, Duration::from_secs(60));
    // The disk under the leader's replica dies (and under that node's share
    // of the metadata group): every later operation on it fails with EIO.
    disks[leader].shutdown(true);
    wait_for("the replica on the dead disk is faulted", Duration::from_secs(30), || {
        cluster.node(leader).json("/v1/partitions/4")["state"] == "faulted"
    });
    wait_for("a leader other than the faulted replica", Duration::from_secs(30), || {
        cluster.partition(4)["leader"].as_str().and_then(node_index).is_some_and(|now| now != leader)
    });
    load.wait_more(300, Duration::from_secs(60));
    let (acked, failures) = load.stop();
    eprintln!("{} acknowledged, other answers: {failures:?}", acked.len());
    // The node lives on; its replica stays faulted, and the others serve
    // every acknowledged write.
    let (status, _) = Client::new().send("GET", &cluster.url(leader, "/healthz"), None);
    assert_eq!(status, 200, "the node with the dead disk still runs");
    wait_for("the faulted replica's gauge (DatanodePartitionFaulted)", Duration::from_secs(10), || {
        cluster.node(leader).metric("datanode_partition_state", &["partition=\"4\"", "state=\"faulted\""]) == Some(1.0)
    });
    for i in (0..3).filter(|i| *i != leader) {
        assert_readable(cluster.ports[i], 4, &acked, &format!("after the leader's disk died, via node {i}"));
    }
    let view = cluster.partition(4);
    let dead =
        view["replicas"].as_array().unwrap().iter().find(|r| r["node"].as_str().and_then(node_index) == Some(leader));
    assert_eq!(dead.map(|r| r["state"].clone()), Some(Value::from("faulted")), "{view}");
}

/// S3: a leader cut off (frozen) while the others elect a new one comes
/// back believing it leads. It must not answer a read with what it had
/// (the newer write is acknowledged elsewhere), nor acknowledge a write
/// that the group does not hold.
#[test]
fn a_stale_leader_back_from_a_pause_serves_nothing_stale() {
    let cluster = TestCluster::start(3, "");
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 6, None);
    assert_eq!(status, 201, "{created}");
    let old = cluster.wait_leader(6);
    let client = Client::new();
    assert_eq!(put(&client, &cluster, old, 6, "k", b"v1"), 201);
    cluster.pause(old);
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let mut new = None;
    wait_for("a new leader among the others", Duration::from_secs(30), || {
        new = others.iter().copied().find(|i| raft_view(&cluster, *i, 6)["role"] == "leader");
        new.is_some()
    });
    let new = new.unwrap();
    assert_eq!(put(&client, &cluster, new, 6, "k", b"v2"), 201);
    cluster.resume(old);
    // Straight away, while it may still think it leads: no redirects
    // followed, so the answer is the old leader's own.
    let agent = ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(10)).build();
    let mut stale_writes = Vec::new();
    for round in 0..20 {
        let (status, body) = support::call(agent.get(&cluster.url(old, "/v1/partitions/6/blobs/k")), None);
        assert!(
            status == 307 || status == 503 || (status == 200 && body == b"v2"),
            "round {round}: the old leader answered {status} {:?}",
            String::from_utf8_lossy(&body)
        );
        let key = format!("late{round}");
        let (status, _) =
            support::call(agent.put(&cluster.url(old, &format!("/v1/partitions/6/blobs/{key}"))), Some(b"x"));
        assert!([201, 307, 503, 500].contains(&status), "round {round}: a write to the old leader answered {status}");
        if status == 201 {
            stale_writes.push(support::cluster::Acked { key, value: b"x".to_vec() });
        }
    }
    // Whatever it acknowledged, the group holds.
    let leader = cluster.wait_leader(6);
    assert_readable(cluster.ports[leader], 6, &stale_writes, "writes the old leader acknowledged");
    let (status, body) = client.send("GET", &cluster.url(old, "/v1/partitions/6/blobs/k"), None);
    assert_eq!((status, body), (200, b"v2".to_vec()));
}

/// A partition is served the moment its creation is answered, through
/// every node (none answers 404 for want of the newest map); the id that
/// names the metadata group on the peer port is refused.
#[test]
fn a_created_partition_is_served_at_once_and_the_reserved_id_is_refused() {
    let cluster = TestCluster::start(3, "");
    cluster.wait_formed();
    let (status, body) = cluster.create(1, u64::MAX, None);
    assert_eq!(status, 400, "{body}");
    let client = Client::new();
    for id in [11, 12, 13] {
        let (status, created) = cluster.create((id as usize) % 3, id, None);
        assert_eq!(status, 201, "{created}");
        for via in 0..3 {
            assert_eq!(
                put(&client, &cluster, via, id, &format!("first-{via}"), b"v"),
                201,
                "partition {id} via node {via}"
            );
        }
    }
    // The metadata group still works.
    assert_eq!(cluster.create(0, 14, None).0, 201);
}

/// A put whose entry is larger than a replica's log takes is refused
/// before it is proposed (413), and no replica is harmed by it.
#[test]
fn an_entry_too_large_for_the_log_is_refused_before_it_reaches_a_replica() {
    let limits = "\n[limits]\nmax_blob_size = \"1MiB\"\nmax_queued_bytes_per_partition = \"1MiB\"\n\n[wal]\nmax_batch_bytes = \"512KiB\"\n";
    let cluster = TestCluster::start(3, limits);
    cluster.wait_formed();
    assert_eq!(cluster.create(0, 8, None).0, 201);
    let client = Client::new();
    assert_eq!(put(&client, &cluster, 0, 8, "small", b"v"), 201);
    let big = vec![7u8; 1 << 20];
    for _ in 0..3 {
        let (status, body) = client.send("PUT", &cluster.url(1, "/v1/partitions/8/blobs/big"), Some(&big));
        assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
        assert_eq!(support::error_code(&body), "payload_too_large");
    }
    for i in 0..3 {
        assert_eq!(cluster.node(i).json("/v1/partitions/8")["state"], "healthy", "node {i}");
    }
    assert_readable(
        cluster.ports[2],
        8,
        &[support::cluster::Acked { key: "small".into(), value: b"v".to_vec() }],
        "after",
    );
}

/// SIGTERM and a restart leave every replica of the node healthy (a
/// replica stopped on purpose is no fault); a partition deleted and
/// created again while a node was frozen: that node quarantines its old
/// replica and runs the new one only.
#[test]
fn restarts_fault_nothing_and_a_recreated_partition_replaces_the_old_replica() {
    // The frozen node must still count as up when the partition is placed
    // again (all three nodes hold a replica).
    let mut cluster = TestCluster::start(3, "node_dead_after = \"60s\"\n");
    cluster.wait_formed();
    for id in 20..26 {
        let (status, created) = cluster.create(0, id, None);
        assert_eq!(status, 201, "{created}");
    }
    let client = Client::new();
    for id in 20..26 {
        assert_eq!(put(&client, &cluster, 0, id, "k", b"v"), 201);
    }
    for round in 0..3 {
        let i = round % 3;
        assert!(cluster.nodes[i].as_mut().unwrap().terminate().success(), "node {i} stops cleanly");
        cluster.restart(i);
        for id in 20..26 {
            assert_eq!(
                cluster.node(i).json(&format!("/v1/partitions/{id}"))["state"],
                "healthy",
                "round {round}: partition {id} on node {i}"
            );
        }
    }
    // Delete and re-create 20 while a node is frozen (not the metadata
    // leader, which the deletion needs).
    // After the restarts the metadata leader may be new: wait until it has
    // heard every node (a node it never heard from is no placement
    // candidate), then freeze one.
    wait_for("the metadata leader hears every node", Duration::from_secs(30), || {
        cluster.map(cluster.meta_leader())["nodes"].as_array().is_some_and(|nodes| {
            nodes.len() == 3 && nodes.iter().all(|n| n["last_heartbeat_ms"].as_u64().is_some_and(|ms| ms < 1000))
        })
    });
    let meta_leader = cluster.meta_leader();
    let frozen = (meta_leader + 1) % 3;
    let old = cluster.node(frozen).json("/v1/partitions/20")["raft"]["replica_id"].as_u64().unwrap();
    cluster.pause(frozen);
    let admin =
        |method: &str, path: &str, body: Option<&[u8]>| client.send(method, &cluster.url(meta_leader, path), body);
    let started = std::time::Instant::now();
    let (status, body) = admin("DELETE", "/v1/cluster/partitions/20", None);
    assert_eq!(
        status,
        204,
        "after {:?}, frozen {frozen}, meta leader {meta_leader}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&body)
    );
    let (status, created) = cluster.create(meta_leader, 20, None);
    assert_eq!(status, 201, "{created}");
    cluster.resume(frozen);
    wait_for("the frozen node runs the new replica", Duration::from_secs(30), || {
        cluster.node(frozen).json("/v1/partitions/20")["raft"]["replica_id"].as_u64().is_some_and(|id| id != old)
    });
    let quarantine = cluster.dirs[frozen].path().join("d0").join("quarantine");
    let moved: Vec<String> = std::fs::read_dir(&quarantine)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(moved.iter().any(|name| name.starts_with(&format!("replica-20-{old}-"))), "{moved:?}");
    let replicas = cluster.dirs[frozen].path().join("d0").join("replicas");
    let held: Vec<String> =
        std::fs::read_dir(&replicas).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(!held.contains(&format!("20-{old}")), "{held:?}");
}

/// The cluster secret of [`a_cluster_with_a_secret_refuses_rogue_peers_and_nodes_with_another`],
/// and another.
const CLUSTER_SECRET: &str = "Q2x1c3RlciBzZWNyZXQgb2YgdGhlIHRlc3QgY2x1c3Rlcg==";
const OTHER_SECRET: &str = "QW5vdGhlciBjbHVzdGVyJ3Mgc2VjcmV0LCBub3QgdGhpcyBvbmU=";

/// The documented handshake proof: HMAC-SHA256(secret, "datanode-peer-v1"
/// || server nonce || client nonce || id length || id || role).
fn peer_proof(secret: &str, server_nonce: &[u8], client_nonce: &[u8], id: &[u8], role: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut transcript = b"datanode-peer-v1".to_vec();
    transcript.extend_from_slice(server_nonce);
    transcript.extend_from_slice(client_nonce);
    transcript.push(id.len() as u8);
    transcript.extend_from_slice(id);
    transcript.extend_from_slice(role);
    ring::hmac::sign(&key, &transcript).as_ref().to_vec()
}

/// A client of the peer port written from the protocol's documentation,
/// not from the node's code: with `secret`, it runs the handshake as node
/// `dn-rogue`; then it sends `body` as an HTTP/2 `POST path` and returns
/// the answer, or what stopped it. With `await_proof` false it does not
/// wait for the server's proof and pushes its request right behind its
/// own (a rogue that hopes the server reads on).
fn peer_request(
    port: u16,
    secret: Option<&str>,
    await_proof: bool,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async move {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        if let Some(secret) = secret {
            let mut hello = [0u8; 38];
            stream.read_exact(&mut hello).await.map_err(|e| format!("hello: {e}"))?;
            assert_eq!(&hello[..6], b"\x24\x00DNP1", "a hello frame");
            let server_nonce = &hello[6..];
            let client_nonce = [0x5a; 32];
            let id = b"dn-rogue";
            let mut proof = client_nonce.to_vec();
            proof.push(id.len() as u8);
            proof.extend_from_slice(id);
            proof.extend_from_slice(&peer_proof(secret, server_nonce, &client_nonce, id, b"client"));
            let mut frame = (proof.len() as u16).to_le_bytes().to_vec();
            frame.extend_from_slice(&proof);
            stream.write_all(&frame).await.map_err(|e| e.to_string())?;
            if await_proof {
                let mut answer = [0u8; 34];
                stream.read_exact(&mut answer).await.map_err(|e| format!("no server proof: {e}"))?;
                let expected = peer_proof(secret, server_nonce, &client_nonce, id, b"server");
                assert_eq!(&answer[2..], &expected[..], "the server's proof checks");
            }
        }
        raft_post(stream, port, 9, path, body).await
    };
    within_30_s(exchange)
}

/// POSTs `body` to `path` over HTTP/2 (prior knowledge) on `stream`, as
/// replica `from`: the answer's status and body.
async fn raft_post(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    port: u16,
    from: u64,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    use http_body_util::BodyExt;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("raft-from", from.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((status, bytes.to_vec()))
}

/// Runs `exchange` on a runtime of its own, bounded at 30 s.
fn within_30_s(
    exchange: impl std::future::Future<Output = Result<(u16, Vec<u8>), String>>,
) -> Result<(u16, Vec<u8>), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), exchange).await.unwrap_or(Err("no answer within 30 s".into()))
    })
}

/// An append of a leader at term 1000 (replica 9) carrying one entry that
/// puts `key`, committed: a follower that took it would jump to term 1000
/// and serve the key.
fn rogue_append(key: &str) -> Vec<u8> {
    use datanode_partition::raft::{Command, Entry, LogId, TypeConfig, Vote};
    use openraft::entry::RaftEntry;
    use openraft::impls::leader_id_adv::LeaderId;
    let leader = LeaderId { term: 1000, node_id: 9 };
    let entry = Entry::new(
        LogId::new(leader, 1),
        openraft::EntryPayload::Normal(Command::new(datanode_partition::blob::encode_put(key.as_bytes(), b"forged"))),
    );
    let request = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote { leader_id: leader, committed: true },
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: Some(LogId::new(leader, 1)),
    };
    postcard::to_allocvec(&request).unwrap()
}

/// A GET through node `via`, retried on 503, or no answer (a redirect to
/// a leader that just died), for up to 20 s as a client does.
fn get(cluster: &TestCluster, via: usize, partition: u64, key: &str) -> (u16, Vec<u8>) {
    get_with(&cluster.client(), cluster, via, partition, key)
}

#[test]
fn a_cluster_with_a_secret_refuses_rogue_peers_and_nodes_with_another() {
    let secrets = tempfile::tempdir().unwrap();
    let write_secret = |name: &str, text: &str| {
        let path = secrets.path().join(name);
        support::certs::write_secret(&path, &format!("{text}\n"));
        path
    };
    let (good, other) = (write_secret("cluster.secret", CLUSTER_SECRET), write_secret("other.secret", OTHER_SECRET));
    let cluster = TestCluster::start(3, &format!("secret_file = \"{}\"\n", good.display()));
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 1, None);
    assert_eq!(status, 201, "{created}");
    cluster.wait_leader(1);
    let client = Client::new();
    for i in 0..10 {
        assert_eq!(put(&client, &cluster, i % 3, 1, &format!("k{i}"), format!("v{i}").as_bytes()), 201);
    }
    let leader = cluster.wait_leader(1);
    let follower = (leader + 1) % 3;
    wait_for("the follower to know the leader", Duration::from_secs(30), || {
        !raft_view(&cluster, follower, 1)["leader"].is_null()
    });
    let view = raft_view(&cluster, follower, 1);
    let replica = view["replica_id"].as_u64().unwrap();
    let rejected = |reason: &str| {
        cluster.node(follower).metric_sum("datanode_peer_rejected_total", &[&format!("reason=\"{reason}\"")])
    };
    let (bad_proof, no_handshake) = (rejected("bad_proof"), rejected("no_handshake"));
    let peer_port = cluster.peer_ports[follower];
    let append_path = format!("/raft/v1/1/{replica}/append");

    // The same client with the right secret is a working peer client: it
    // is admitted and answered (a group not hosted there, 404).
    let (status, body) =
        peer_request(peer_port, Some(CLUSTER_SECRET), true, "/raft/v1/4242/1/vote", Vec::new()).unwrap();
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(support::error_code(&body), "unknown_group");

    // With another secret, pushing the forged append behind its proof; and
    // with no handshake at all: refused, no answer.
    let wrong = peer_request(peer_port, Some(OTHER_SECRET), false, &append_path, rogue_append("forged-1"));
    assert!(wrong.is_err(), "a peer with another secret was answered: {wrong:?}");
    let bare = peer_request(peer_port, None, false, &append_path, rogue_append("forged-2"));
    assert!(bare.is_err(), "a peer without the handshake was answered: {bare:?}");
    wait_for("the refusals counted", Duration::from_secs(10), || {
        rejected("bad_proof") > bad_proof && rejected("no_handshake") > no_handshake
    });

    // Nothing changed: no replica took term 1000, no forged key is served,
    // every write reads back, and the partition takes writes.
    for i in 0..3 {
        let term = raft_view(&cluster, i, 1)["term"].as_u64().unwrap();
        assert!(term < 1000, "node {i} is at term {term}: the forged append reached it");
    }
    for via in 0..3 {
        for key in ["forged-1", "forged-2"] {
            assert_eq!(get(&cluster, via, 1, key).0, 404, "{key} via node {via}");
        }
        for i in 0..10 {
            assert_eq!(get(&cluster, via, 1, &format!("k{i}")), (200, format!("v{i}").into_bytes()), "k{i} via {via}");
        }
    }
    assert_eq!(put(&client, &cluster, follower, 1, "after", b"v"), 201);

    // A fourth node with another secret: its peers refuse it, so it never
    // joins the map, learns none, and serves none of the cluster.
    let seeds_refused_before: f64 =
        (0..3).map(|i| cluster.node(i).metric_sum("datanode_peer_rejected_total", &["reason=\"bad_proof\""])).sum();
    let extra = support::cluster::distinct_ports(2);
    let (ports, peer_ports) =
        ([&cluster.ports[..], &extra[..1]].concat(), [&cluster.peer_ports[..], &extra[1..]].concat());
    let stranger_dir = tempfile::tempdir().unwrap();
    let config = support::cluster::node_config(
        3,
        &ports,
        &peer_ports,
        &[stranger_dir.path().join("d0")],
        &format!("secret_file = \"{}\"\n", other.display()),
    );
    let stranger = support::Daemon::with_config_on(ports[3], &config, &[]);
    wait_for("the seeds to refuse the stranger's heartbeats", Duration::from_secs(30), || {
        let refused: f64 =
            (0..3).map(|i| cluster.node(i).metric_sum("datanode_peer_rejected_total", &["reason=\"bad_proof\""])).sum();
        refused >= seeds_refused_before + 2.0
    });
    assert!(
        stranger.metric_sum("datanode_peer_connects_total", &["result=\"failed\""]) >= 1.0,
        "the stranger's own connects failed"
    );
    let map = cluster.map(cluster.meta_leader());
    let nodes: Vec<&str> = map["nodes"].as_array().unwrap().iter().filter_map(|n| n["id"].as_str()).collect();
    assert!(!nodes.contains(&"dn-4"), "the stranger joined: {nodes:?}");
    let (status, _) = Client::new().send("GET", &stranger.url("/v1/cluster"), None);
    assert_ne!(status, 200, "the stranger has a map");
    let (status, body) = Client::new().send("PUT", &stranger.url("/v1/partitions/1/blobs/stranger"), Some(b"x"));
    assert_ne!(status, 201, "the stranger took a write: {}", String::from_utf8_lossy(&body));
    assert_eq!(get(&cluster, 0, 1, "stranger").0, 404);
}

/// A follower far behind on a log of large blobs catches up by the log
/// (fewer entries than `snapshot_logs`, so no snapshot): openraft hands
/// the network hundreds of entries per append, which must be sent in
/// bounded pieces, or the request never completes within its budget and
/// the follower never catches up.
#[test]
fn a_follower_behind_on_large_blobs_catches_up_by_the_log() {
    let mut cluster = TestCluster::start(3, "");
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 9, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(9);
    let follower = (0..3).find(|i| *i != leader).unwrap();
    cluster.kill(follower);
    // 600 blobs of 256 KiB: 150 MiB, 600 entries behind.
    let client = Client::new();
    let value = vec![7u8; 256 * 1024];
    for n in 0..600 {
        assert_eq!(put(&client, &cluster, leader, 9, &format!("big{n}"), &value), 201);
    }
    let commit = raft_view(&cluster, leader, 9)["commit_index"].as_u64().unwrap();
    cluster.restart(follower);
    wait_for("the follower applies what the leader committed", Duration::from_secs(120), || {
        raft_view(&cluster, follower, 9)["applied_index"].as_u64().is_some_and(|applied| applied >= commit)
    });
    let status = cluster.node(follower).json("/v1/partitions/9");
    assert_eq!(status["blobs"].as_u64(), Some(600), "{status}");
}

/// A client of the peer port over TLS with `client` as its TLS
/// configuration: sends `body` to `path` as replica `from`; the answer, or
/// why there was none.
fn tls_peer_request(
    port: u16,
    client: std::sync::Arc<rustls::ClientConfig>,
    from: u64,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let exchange = async move {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let stream =
            tokio_rustls::TlsConnector::from(client).connect(name, stream).await.map_err(|e| format!("TLS: {e}"))?;
        raft_post(stream, port, from, path, body).await
    };
    within_30_s(exchange)
}

#[test]
fn a_cluster_on_mutual_tls_replicates_and_a_node_certificate_speaks_only_for_its_node() {
    use support::certs::{Ca, client_config};
    let ca = Ca::new("cluster CA");
    let other_ca = Ca::new("another CA");
    let files = tempfile::tempdir().unwrap();
    let ca_file = files.path().join("ca.pem");
    support::certs::write_secret(&ca_file, &ca.pem());
    let node_tls: Vec<String> = (1..=3)
        .map(|n| {
            let (cert, key) = ca.node(&format!("dn-{n}")).write(files.path(), &format!("dn-{n}"));
            format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
                cert.display(),
                key.display(),
                ca_file.display()
            )
        })
        .collect();
    let operator = ca.client("operator", false);
    let agent = ureq::AgentBuilder::new()
        .tls_config(client_config(&[&ca], Some(&operator)))
        .redirects(0)
        .timeout(Duration::from_secs(10))
        .build();
    let mut cluster = TestCluster::start_tls(3, "", node_tls, agent);
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 1, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(1);
    let client = cluster.client();
    for i in 0..10 {
        assert_eq!(put(&client, &cluster, i % 3, 1, &format!("k{i}"), format!("v{i}").as_bytes()), 201);
    }
    for i in 0..3 {
        let posture = cluster.node(i).log();
        assert!(!posture.contains("peer TLS handshake failed"), "node {i}: {posture}");
    }

    // A follower, and the replica id of the leader's replica in the group.
    let follower = (leader + 1) % 3;
    let outsider = (leader + 2) % 3;
    wait_for("the follower to know the leader", Duration::from_secs(30), || {
        !raft_view(&cluster, follower, 1)["leader"].is_null()
    });
    let view = raft_view(&cluster, follower, 1);
    let (target, leader_replica) = (view["replica_id"].as_u64().unwrap(), view["leader"].as_u64().unwrap());
    let rejected = |reason: &str| {
        cluster.node(follower).metric_sum("datanode_peer_rejected_total", &[&format!("reason=\"{reason}\"")])
    };
    let (wrong_node, bad_certificate) = (rejected("wrong_node"), rejected("bad_certificate"));
    let port = cluster.peer_ports[follower];
    let append = format!("/raft/v1/1/{target}/append");

    // The third node's certificate (stolen, say) sending a term-1000 append
    // as the leader's replica: refused 403 wrong_node, counted.
    let stolen = ca.node(&format!("dn-{}", outsider + 1));
    let (status, body) =
        tls_peer_request(port, client_config(&[&ca], Some(&stolen)), leader_replica, &append, rogue_append("forged-1"))
            .unwrap();
    assert_eq!((status, support::error_code(&body)), (403, "wrong_node".to_string()));
    assert_eq!(rejected("wrong_node"), wrong_node + 1.0);
    // The operator's certificate (same CA, no node id), another CA's node
    // certificate, no certificate: refused at the handshake, counted.
    for (what, identity) in [
        ("the operator's certificate", Some(&operator)),
        ("another CA's certificate", Some(&other_ca.node("dn-2"))),
        ("no certificate", None),
    ] {
        let answer =
            tls_peer_request(port, client_config(&[&ca], identity), leader_replica, &append, rogue_append("forged-2"));
        assert!(answer.is_err(), "{what}: answered {answer:?}");
    }
    wait_for("the refusals counted", Duration::from_secs(10), || rejected("bad_certificate") >= bad_certificate + 3.0);

    // Nothing changed: no replica took term 1000, no forged key is served,
    // every write reads back through every node after the leader dies.
    for i in 0..3 {
        let term = raft_view(&cluster, i, 1)["term"].as_u64().unwrap();
        assert!(term < 1000, "node {i} is at term {term}: the forged append reached it");
    }
    cluster.kill(leader);
    for via in [follower, outsider] {
        for key in ["forged-1", "forged-2"] {
            assert_eq!(get_with(&client, &cluster, via, 1, key).0, 404, "{key} via node {via}");
        }
        for i in 0..10 {
            let got = get_with(&client, &cluster, via, 1, &format!("k{i}"));
            assert_eq!(got, (200, format!("v{i}").into_bytes()), "k{i} via {via}");
        }
    }
    assert_eq!(put(&client, &cluster, follower, 1, "after", b"v"), 201);
}

/// [`get`] through `client`.
fn get_with(client: &Client, cluster: &TestCluster, via: usize, partition: u64, key: &str) -> (u16, Vec<u8>) {
    let url = cluster.url(via, &format!("/v1/partitions/{partition}/blobs/{key}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = client.send("GET", &url, None);
        if ![0, 503].contains(&status) || std::time::Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
