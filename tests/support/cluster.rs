//! Clusters of real `datanode` processes on loopback: each node with its
//! own data directory, HTTP port and peer port, the first (up to) three
//! the seeds of the metadata group. A client that follows the 307
//! redirects of the data API the way a real one would, and writers that
//! remember exactly what was acknowledged.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Daemon, wait_for};

/// Raft timings of the test clusters: fast elections, so a test that kills
/// a leader does not wait long for the next.
pub const TIMINGS: &str = "heartbeat_interval = \"100ms\"\nelection_timeout = \"500ms\"\nnode_dead_after = \"2s\"\n";

pub struct TestCluster {
    pub nodes: Vec<Option<Daemon>>,
    /// HTTP ports, by node index (kept while a node is down).
    pub ports: Vec<u16>,
    pub peer_ports: Vec<u16>,
    pub dirs: Vec<tempfile::TempDir>,
    /// Where each node's disks `d0`, `d1`, ... are.
    disks: Vec<Vec<std::path::PathBuf>>,
    extra: String,
    /// HTTPS: each node's `[tls]` section, and the agent that reaches
    /// the nodes (trusting their CA, with a client certificate).
    tls: Option<(Vec<String>, ureq::Agent)>,
}

impl TestCluster {
    /// `count` nodes `dn-1..`, the first `min(count, 3)` of them seeds;
    /// `extra` is appended to every `[cluster]` section.
    pub fn start(count: usize, extra: &str) -> TestCluster {
        TestCluster::start_on(count, extra, &[])
    }

    /// Like [`TestCluster::start`], node `i`'s disk `d0` at `disks[i]`
    /// when given (a loop-mounted filesystem), else in its directory.
    pub fn start_on(count: usize, extra: &str, disks: &[&std::path::Path]) -> TestCluster {
        let layout = (0..count).map(|i| disks.get(i).map(|disk| vec![disk.join("d0")])).collect();
        TestCluster::start_with_disks(count, extra, layout)
    }

    /// Like [`TestCluster::start`], node `i`'s disks `d0`, `d1`, ... at
    /// the paths `disks[i]` gives (a single `d0` in its directory when
    /// `None`).
    pub fn start_with_disks(count: usize, extra: &str, disks: Vec<Option<Vec<std::path::PathBuf>>>) -> TestCluster {
        TestCluster::start_all(count, extra, disks, None)
    }

    /// Like [`TestCluster::start`] serving HTTPS at `localhost`: node
    /// `i` with the `[tls]` section `node_tls[i]`, reached through
    /// `agent` (built with `redirects(0)`).
    pub fn start_tls(count: usize, extra: &str, node_tls: Vec<String>, agent: ureq::Agent) -> TestCluster {
        TestCluster::start_all(count, extra, Vec::new(), Some((node_tls, agent)))
    }

    fn start_all(
        count: usize,
        extra: &str,
        disks: Vec<Option<Vec<std::path::PathBuf>>>,
        tls: Option<(Vec<String>, ureq::Agent)>,
    ) -> TestCluster {
        let mut all = distinct_ports(2 * count);
        let peer_ports = all.split_off(count);
        let ports = all;
        let dirs: Vec<tempfile::TempDir> = (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
        let disks = (0..count)
            .map(|i| disks.get(i).cloned().flatten().unwrap_or_else(|| vec![dirs[i].path().join("d0")]))
            .collect();
        let mut cluster =
            TestCluster { nodes: Vec::new(), ports, peer_ports, dirs, disks, extra: extra.to_string(), tls };
        // Started together: the seeds wait for each other to elect a
        // metadata leader, so none is waited for alone.
        let configs: Vec<String> = (0..count).map(|i| cluster.config(i)).collect();
        let handles: Vec<_> = configs
            .into_iter()
            .zip(cluster.ports.clone())
            .map(|(config, port)| {
                let agent = cluster.tls.as_ref().map(|(_, agent)| agent.clone());
                std::thread::spawn(move || Daemon::on(port, &config, agent))
            })
            .collect();
        cluster.nodes = handles.into_iter().map(|h| Some(h.join().unwrap())).collect();
        cluster
    }

    fn config(&self, i: usize) -> String {
        let config = node_config(i, &self.ports, &self.peer_ports, &self.disks[i], &self.extra);
        match &self.tls {
            None => config,
            Some((node_tls, _)) => format!(
                "{}\n{}\n",
                config.replace(
                    &format!("\"http://127.0.0.1:{}\"", self.ports[i]),
                    &format!("\"https://localhost:{}\"", self.ports[i])
                ),
                node_tls[i]
            ),
        }
    }

    /// A redirect-following client for this cluster's nodes.
    pub fn client(&self) -> Client {
        match &self.tls {
            None => Client::new(),
            Some((_, agent)) => Client::with_agent(agent.clone()),
        }
    }

    pub fn node(&self, i: usize) -> &Daemon {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        match &self.tls {
            None => format!("http://127.0.0.1:{}{path}", self.ports[i]),
            Some(_) => format!("https://localhost:{}{path}", self.ports[i]),
        }
    }

    /// Indexes of the running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).collect()
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.kill();
        }
    }

    /// SIGSTOP: the node freezes (its peers see it cut off), its state
    /// kept.
    pub fn pause(&self, i: usize) {
        let pid = self.node(i).pid().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }

    /// SIGCONT after [`TestCluster::pause`].
    pub fn resume(&self, i: usize) {
        let pid = self.node(i).pid().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let config = self.config(i);
        let agent = self.tls.as_ref().map(|(_, agent)| agent.clone());
        self.nodes[i] = Some(Daemon::on(self.ports[i], &config, agent));
    }

    /// `GET /v1/cluster` from node `i` (following a redirect to the
    /// metadata leader).
    pub fn map(&self, i: usize) -> Value {
        let (status, body) = self.client().send("GET", &self.url(i, "/v1/cluster"), None);
        if status != 200 {
            return Value::Null;
        }
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    }

    /// The node index of the metadata leader, once one answers the map.
    pub fn meta_leader(&self) -> usize {
        let mut leader = None;
        wait_for("a metadata leader", Duration::from_secs(30), || {
            leader = self.running().iter().find_map(|i| self.map(*i)["meta_leader"].as_str().and_then(node_index));
            leader.is_some()
        });
        leader.unwrap()
    }

    /// Waits until some running node answers the map with every node up.
    pub fn wait_formed(&self) {
        wait_for("the cluster map lists every node up", Duration::from_secs(60), || {
            self.running().iter().any(|i| {
                let map = self.map(*i);
                map["nodes"]
                    .as_array()
                    .is_some_and(|nodes| nodes.len() == self.nodes.len() && nodes.iter().all(|n| n["state"] == "up"))
            })
        });
    }

    /// Creates replicated partition `id` through node `via`.
    pub fn create(&self, via: usize, id: u64, replicas: Option<u64>) -> (u16, Value) {
        let body = match replicas {
            Some(r) => serde_json::json!({ "id": id, "replicas": r }),
            None => serde_json::json!({ "id": id }),
        };
        // A 503 (no metadata leader known here yet, or not every node heard
        // from by a leader that just took over) did nothing: retried for up
        // to 20 s, as a client does.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, bytes) =
                self.client().send("POST", &self.url(via, "/v1/cluster/partitions"), Some(body.to_string().as_bytes()));
            if status != 503 || Instant::now() > deadline {
                return (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The partition as the map shows it from any running node.
    pub fn partition(&self, id: u64) -> Value {
        for i in self.running() {
            let map = self.map(i);
            if let Some(p) = map["partitions"].as_array().and_then(|ps| ps.iter().find(|p| p["id"] == id)) {
                return p.clone();
            }
        }
        Value::Null
    }

    /// Waits for a leader of `id` and returns its node index.
    pub fn wait_leader(&self, id: u64) -> usize {
        let mut leader = None;
        wait_for("a leader", Duration::from_secs(60), || {
            leader = self.partition(id)["leader"].as_str().and_then(node_index);
            leader.is_some_and(|i| self.nodes[i].is_some())
        });
        leader.unwrap()
    }
}

/// The configuration of node `i` (`dn-{i+1}`) of a cluster on loopback
/// with these HTTP and peer ports, its disks `d0`, `d1`, ... at `disks`;
/// the first (up to) three nodes are the seeds; `extra` is appended to
/// `[cluster]` (a key of [`TIMINGS`] it sets replaces the one there).
pub fn node_config(i: usize, ports: &[u16], peer_ports: &[u16], disks: &[std::path::PathBuf], extra: &str) -> String {
    let timings: String = TIMINGS
        .lines()
        .filter(|line| {
            line.split_once(" =").is_none_or(|(key, _)| !extra.lines().any(|l| l.starts_with(&format!("{key} ="))))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let seeds: Vec<String> =
        (0..ports.len().min(3)).map(|s| format!("\"dn-{}@127.0.0.1:{}\"", s + 1, peer_ports[s])).collect();
    let disks: String = disks
        .iter()
        .enumerate()
        .map(|(d, path)| format!("[[disk]]\nname = \"d{d}\"\npath = \"{}\"\n\n", path.display()))
        .collect();
    format!(
        "[node]\nid = \"dn-{}\"\nbootstrap_partitions = 0\n\n{disks}\
         [cluster]\npeer_addr = \"127.0.0.1:{}\"\nadvertise_url = \"http://127.0.0.1:{}\"\nseeds = [{}]\n{timings}{extra}",
        i + 1,
        peer_ports[i],
        ports[i],
        seeds.join(", "),
    )
}

/// `count` free ports, all different (held open until all are chosen, so
/// the system cannot hand one out twice).
pub fn distinct_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// `dn-3` -> 2.
pub fn node_index(id: &str) -> Option<usize> {
    id.strip_prefix("dn-")?.parse::<usize>().ok()?.checked_sub(1)
}

/// A client that follows 307 redirects (method and body kept) the way the
/// data API asks: at most `MAX_REDIRECTS`, and it remembers the leader of
/// each partition it learned.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
}

const MAX_REDIRECTS: usize = 5;

impl Client {
    pub fn new() -> Client {
        let agent = ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(10)).build();
        Client { agent }
    }

    /// A client on `agent` (its TLS configuration; built with
    /// `redirects(0)`: this client follows them itself).
    pub fn with_agent(agent: ureq::Agent) -> Client {
        Client { agent }
    }

    /// Status and body; 0 when no HTTP answer came (refused, timed out).
    pub fn send(&self, method: &str, url: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let request = self.agent.request(method, &url);
            let result = match body {
                Some(body) => request.send_bytes(body),
                None => request.call(),
            };
            let response = match result {
                Ok(response) => response,
                Err(ureq::Error::Status(_, response)) => response,
                Err(_) => return (0, Vec::new()),
            };
            let status = response.status();
            if status == 307
                && let Some(location) = response.header("location")
            {
                url = location.to_string();
                continue;
            }
            let mut bytes = Vec::new();
            if std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).is_err() {
                return (0, Vec::new());
            }
            return (status, bytes);
        }
        (0, Vec::new())
    }
}

/// One acknowledged put.
#[derive(Debug, Clone)]
pub struct Acked {
    pub key: String,
    pub value: Vec<u8>,
}

/// Writers of one partition through every node in turn, following
/// redirects, remembering exactly what was acknowledged (201).
pub struct ClusterLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    count: Arc<AtomicU64>,
    threads: Vec<JoinHandle<BTreeMap<u16, u64>>>,
}

impl ClusterLoad {
    pub fn start(ports: &[u16], partition: u64, writers: usize, value_len: usize, tag: &str) -> ClusterLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicU64::new(0));
        let threads = (0..writers)
            .map(|writer| {
                let (stop, acked, count, ports) = (stop.clone(), acked.clone(), count.clone(), ports.to_vec());
                let tag = tag.to_string();
                std::thread::spawn(move || {
                    let client = Client::new();
                    let mut failures = BTreeMap::new();
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let port = ports[(seq as usize + writer) % ports.len()];
                        let key = format!("{tag}-w{writer}-{seq}");
                        let value: Vec<u8> = format!("{key}:").bytes().cycle().take(value_len.max(8)).collect();
                        let url = format!("http://127.0.0.1:{port}/v1/partitions/{partition}/blobs/{key}");
                        let (status, _) = client.send("PUT", &url, Some(&value));
                        if status == 201 {
                            acked.lock().unwrap().push(Acked { key, value });
                            count.fetch_add(1, Ordering::Relaxed);
                        } else {
                            *failures.entry(status).or_insert(0) += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        seq += 1;
                    }
                    failures
                })
            })
            .collect();
        ClusterLoad { stop, acked, count, threads }
    }

    pub fn acked(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until `more` further writes are acknowledged.
    pub fn wait_more(&self, more: u64, timeout: Duration) -> Duration {
        let target = self.acked() + more;
        let started = Instant::now();
        wait_for("acknowledged writes", timeout, || self.acked() >= target);
        started.elapsed()
    }

    /// Stops the writers: what was acknowledged, and the other answers by
    /// status.
    pub fn stop(self) -> (Vec<Acked>, BTreeMap<u16, u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = BTreeMap::new();
        for thread in self.threads {
            for (status, n) in thread.join().unwrap() {
                *failures.entry(status).or_insert(0) += n;
            }
        }
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (acked, failures)
    }
}

/// Every acknowledged write reads back, byte for byte, through node port
/// `port` (redirects followed; a 503, nothing served while an election or
/// a read-index round is under way, is retried for up to 10 s as a client
/// does).
pub fn assert_readable(port: u16, partition: u64, acked: &[Acked], when: &str) {
    let client = Client::new();
    for write in acked {
        let url = format!("http://127.0.0.1:{port}/v1/partitions/{partition}/blobs/{}", write.key);
        let deadline = Instant::now() + Duration::from_secs(10);
        let (status, body) = loop {
            let (status, body) = client.send("GET", &url, None);
            if status != 503 || Instant::now() > deadline {
                break (status, body);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status, 200, "{when}: acknowledged {} not readable via port {port}", write.key);
        assert!(body == write.value, "{when}: {} came back changed via port {port}", write.key);
    }
}
