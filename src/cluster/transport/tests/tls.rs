//! Mutual TLS on the peer port (`peer_tls.rs`), against real sockets,
//! with certificates made here by rcgen and loaded by the daemon's own
//! `crate::tls::Tls`: nodes whose certificates name them replicate; a
//! client with no certificate, another CA's, an expired one, or one that
//! names no node is refused and counted; and a node's certificate speaks
//! for its own replicas only.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    date_time_ymd,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::super::peer_tls::{NODE_URI_PREFIX, PEER_ALPN, PeerTlsSource, TlsAdmission, certificate_node};
use super::super::server::SenderCheck;
use super::*;
use crate::config::TlsConfig;

struct Ca {
    cert: Certificate,
    key: KeyPair,
    dir: tempfile::TempDir,
}

/// A certificate and key as PEM.
struct Issued {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key, dir: tempfile::tempdir().unwrap() }
    }

    /// A certificate for 127.0.0.1 with both usages, naming `nodes`.
    fn issue(&self, nodes: &[&str], expired: bool) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        for node in nodes {
            let uri = format!("{NODE_URI_PREFIX}{node}").try_into().unwrap();
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.distinguished_name.push(DnType::CommonName, nodes.first().copied().unwrap_or("an operator"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// Node `node`'s peer certificates, as the daemon loads them from
    /// `[tls]` files.
    fn node(&self, node: &str) -> Arc<dyn PeerTlsSource> {
        let issued = self.issue(&[node], false);
        let path = |name: &str| self.dir.path().join(format!("{node}.{name}"));
        std::fs::write(path("pem"), &issued.cert).unwrap();
        std::fs::write(path("key"), &issued.key).unwrap();
        std::fs::write(path("ca"), self.cert.pem()).unwrap();
        let files = TlsConfig { cert_file: path("pem"), key_file: path("key"), client_ca_file: Some(path("ca")) };
        let tls = crate::tls::Tls::load(&files, Some(node)).unwrap();
        tls.peer_certificates().unwrap()
    }
}

/// A rogue client's TLS: trusting `ca`, presenting `identity` if given.
fn client_config(ca: &Ca, identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert.pem().as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(issued) => {
            let chain = vec![CertificateDer::from_pem_slice(issued.cert.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    Arc::new(config)
}

/// A vote for `group`/`target` sent as replica `from` over TLS with
/// `config`: the answer's status, or why there was none.
async fn tls_vote(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    group: u64,
    target: u64,
    from: u64,
) -> Result<(StatusCode, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(connection);
    let body = wire::encode(&vote_request(1000)).unwrap();
    let request = Request::post(format!("http://{addr}{}", wire::path(group, target, wire::Rpc::Vote)))
        .header(wire::SENDER_HEADER, from.to_string())
        .body(full(body))
        .unwrap();
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    Ok((status, response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes()))
}

/// Replica `n` of every group is on node `n{n}`.
#[derive(Debug)]
struct ByNumber;

impl SenderCheck for ByNumber {
    fn hosted_on(&self, _group: u64, sender: u64, node: &str) -> bool {
        node == format!("n{sender}")
    }
}

fn tls_options(source: Arc<dyn PeerTlsSource>) -> PeerServerOptions {
    PeerServerOptions {
        admission: Arc::new(TlsAdmission::new(source)),
        senders: Some(Arc::new(ByNumber)),
        ..PeerServerOptions::default()
    }
}

fn tls_pool(source: Arc<dyn PeerTlsSource>) -> PeerPool {
    PeerPool::new(PoolOptions { tls: Some(source), ..pool().options().clone() })
}

#[test]
fn a_certificate_names_exactly_one_node() {
    let ca = Ca::new("cluster CA");
    let der = |issued: &Issued| CertificateDer::from_pem_slice(issued.cert.as_bytes()).unwrap().to_vec();
    assert_eq!(certificate_node(&der(&ca.issue(&["dn-1"], false))).unwrap(), "dn-1");
    let none = certificate_node(&der(&ca.issue(&[], false))).unwrap_err();
    assert!(none.contains("names no node"), "{none}");
    let two = certificate_node(&der(&ca.issue(&["dn-1", "dn-2"], false))).unwrap_err();
    assert!(two.contains("more than one"), "{two}");
    let bad = certificate_node(&der(&ca.issue(&["dn 1/../x"], false))).unwrap_err();
    assert!(bad.contains("not a node id"), "{bad}");
    assert!(certificate_node(b"not DER at all").is_err());
}

#[test]
fn a_node_certificate_that_names_another_node_is_refused_at_load() {
    let ca = Ca::new("cluster CA");
    let issued = ca.issue(&["dn-2"], false);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node.pem"), &issued.cert).unwrap();
    std::fs::write(dir.path().join("node.key"), &issued.key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
    let files = TlsConfig {
        cert_file: dir.path().join("node.pem"),
        key_file: dir.path().join("node.key"),
        client_ca_file: Some(dir.path().join("ca.pem")),
    };
    let error = crate::tls::Tls::load(&files, Some("dn-1")).unwrap_err();
    assert!(error.contains("names node \"dn-2\", but this is node \"dn-1\""), "{error}");
    // Without a cluster (no peer port), the HTTP listener takes it.
    assert!(crate::tls::Tls::load(&files, None).unwrap().peer_certificates().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_certificates_of_the_cluster_ca_replicate_over_mutual_tls() {
    let root = scratch();
    let ca = Ca::new("cluster CA");
    let config = config(|_| {});
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let (mut node, listener) = Node::bind(id, root.path()).await;
        let certificates = ca.node(&format!("n{id}"));
        node.pool = tls_pool(Arc::clone(&certificates));
        node.serve_on(listener, tls_options(certificates));
        nodes.push(node);
    }
    for node in &mut nodes {
        node.open_replica(1, &config).await;
    }
    nodes[0].raft(1).initialize(members(&nodes)).await.unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    let leader = write(&all, 1, (0..20).map(|i| format!("a{i}")), 100).await;
    converged(&all, 1, &leader, 20).await;
    assert!(nodes.iter().map(|node| node.stats.admitted()).sum::<u64>() >= 2);
    for node in &nodes {
        assert_eq!(node.stats.refused(), 0, "node {} refused no peer", node.id);
        assert_eq!(node.stats.refused_for(RejectReason::WrongNode), 0, "node {} refused no request", node.id);
    }
    for node in &mut nodes {
        node.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_node_certificate_of_the_cluster_ca_reach_no_group() {
    let root = scratch();
    let (ca, other_ca) = (Ca::new("cluster CA"), Ca::new("another CA"));
    let (mut node, listener) = Node::bind(1, root.path()).await;
    node.serve_on(listener, tls_options(ca.node("n1")));
    node.open_replica(3, &config(|_| {})).await;
    let rogues = [
        ("no client certificate", client_config(&ca, None), RejectReason::BadCertificate),
        (
            "another CA's certificate",
            client_config(&ca, Some(&other_ca.issue(&["n2"], false))),
            RejectReason::BadCertificate,
        ),
        ("an expired certificate", client_config(&ca, Some(&ca.issue(&["n2"], true))), RejectReason::BadCertificate),
        // An operator's client certificate of the same CA: good for the
        // HTTP API, never for the peer port.
        ("a certificate naming no node", client_config(&ca, Some(&ca.issue(&[], false))), RejectReason::BadCertificate),
        (
            "a certificate naming two nodes",
            client_config(&ca, Some(&ca.issue(&["n2", "n3"], false))),
            RejectReason::BadCertificate,
        ),
    ];
    for (what, config, reason) in rogues {
        let before = node.stats.refused_for(reason);
        let answer = tls_vote(node.addr, config, 3, 1, 2).await;
        assert!(answer.is_err(), "{what}: answered {answer:?}");
        until(&format!("{what} counted"), || node.stats.refused_for(reason) > before).await;
    }
    // HTTP/2 without TLS, and the cluster secret's handshake.
    let plain = GroupNetworkFactory::<BlobStateMachine>::new(pool(), 3, 2)
        .new_client(1, &BasicNode { addr: node.addr.to_string() })
        .await
        .vote(vote_request(1000), RPCOption::new(Duration::from_secs(2)))
        .await;
    assert!(plain.is_err(), "plain HTTP/2 was answered: {plain:?}");
    until("plain HTTP/2 counted", || node.stats.refused_for(RejectReason::NoHandshake) >= 1).await;
    assert_eq!(node.stats.admitted(), 0);
    assert_eq!(node.raft(3).metrics().borrow_watched().vote.leader_id.term, 0, "no vote reached the group");
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_speaks_for_its_own_replicas_only() {
    let root = scratch();
    let ca = Ca::new("cluster CA");
    let (mut node, listener) = Node::bind(1, root.path()).await;
    node.serve_on(listener, tls_options(ca.node("n1")));
    node.open_replica(3, &config(|_| {})).await;
    // Node n3's certificate (stolen, say), sending as replica 2 (on n2):
    // refused before the group sees it, and counted.
    let stolen = client_config(&ca, Some(&ca.issue(&["n3"], false)));
    let (status, body) = tls_vote(node.addr, Arc::clone(&stolen), 3, 1, 2).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(refusal_code(&body), "wrong_node");
    assert_eq!(node.stats.refused_for(RejectReason::WrongNode), 1);
    assert_eq!(node.raft(3).metrics().borrow_watched().vote.leader_id.term, 0, "the vote never reached the group");
    // As its own replica 3 it is a peer like any other: the vote is
    // taken (and decided by Raft).
    let (status, body) = tls_vote(node.addr, stolen, 3, 1, 3).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    until("the vote reached the group", || node.raft(3).metrics().borrow_watched().vote.leader_id.term == 1000).await;
    node.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_refuses_a_server_whose_certificate_names_no_node() {
    let ca = Ca::new("cluster CA");
    // A TLS server of the right CA whose certificate names no node (an
    // HTTP listener's certificate, say).
    let issued = ca.issue(&[], false);
    let chain = vec![CertificateDer::from_pem_slice(issued.cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    server.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sent, mut received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if let Ok(mut stream) = acceptor.accept(stream).await {
                let mut bytes = Vec::new();
                let _ = stream.read_to_end(&mut bytes).await;
                let _ = sent.send(bytes);
            }
        }
    });
    let client = tls_pool(ca.node("n1"));
    let error = client.sender(&addr.to_string(), DEADLINE).await.unwrap_err();
    assert!(error.to_string().contains("names no node"), "{error}");
    // The client sent nothing over the connection (not even the HTTP/2
    // preface) once it saw the certificate.
    let bytes = tokio::time::timeout(DEADLINE, received.recv()).await.unwrap().unwrap_or_default();
    assert!(bytes.is_empty(), "the client sent {} bytes to a server that is no node", bytes.len());
}
