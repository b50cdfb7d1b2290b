//! The cluster nemesis harness: real `datanode` processes on loopback
//! forming a cluster, replicated partitions, clients that send every
//! operation through a random running node and follow its 307 redirects
//! the way a real client would, and the faults a cluster meets: kill -9
//! and restart, SIGSTOP/SIGCONT (a paused leader comes back stale), and a
//! node cut off from its peers by netfilter rules (`Firewall`). Everything
//! lands in the `History`, judged by the same `Checker` as one node's runs
//! (`Rules::cluster`), after reads of every key through every node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::checker::Rules;
use super::harness::{Budget, judge, read_observed, request, request_located};
use super::history::{Event, History, Kind, Observed, Rng, SETTLE_CLIENT, encode_value};
use super::node::Node;
use crate::support::cluster::{distinct_ports, node_config};
use crate::support::disks::which;

/// Redirects a client follows before it gives up (an unknown outcome).
const MAX_REDIRECTS: usize = 5;

/// What a cluster run looks like.
#[derive(Debug, Clone)]
pub struct ClusterSetup {
    pub name: &'static str,
    pub nodes: usize,
    /// Replicated partitions, each with `replicas` replicas.
    pub partitions: Vec<u64>,
    pub replicas: u64,
    pub keys: usize,
    pub clients: usize,
    /// Weights of put, get, delete, list.
    pub mix: [u64; 4],
    /// Value sizes: (weight, min, max).
    pub sizes: Vec<(u64, usize, usize)>,
    /// Appended to every node's `[cluster]` section (after the fast
    /// timings; may open further sections, e.g. `[limits]`).
    pub extra: String,
}

/// What the nemesis did to a node, until it is healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Killed,
    Paused,
    Isolated,
}

/// Netfilter rules that cut one node off from its peers: every packet to
/// or from its peer port, and every packet its own process sends to
/// another node's peer port (matched by the node's cgroup, so that the
/// other nodes' connections to that port stay open). HTTP ports stay
/// open: clients still reach the isolated node.
pub struct Firewall {
    /// The comment on every rule of this run.
    tag: String,
    root: PathBuf,
    cgroups: Vec<PathBuf>,
}

impl Firewall {
    /// One cgroup per node under the cgroup v2 hierarchy; `Err` says why
    /// isolation cannot work here.
    pub fn new(nodes: usize) -> Result<Firewall, String> {
        if which("iptables").is_none() {
            return Err("iptables is not installed".into());
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| format!("/proc/self/mounts: {e}"))?;
        let root = mounts
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (_, path, fs) = (f.next(), f.next()?, f.next()?);
                (fs == "cgroup2").then(|| PathBuf::from(path))
            })
            .ok_or("no cgroup v2 hierarchy is mounted (the rules match a node's sockets by cgroup)")?;
        let tag = format!("datanode-nemesis-{}", std::process::id());
        let mut cgroups = Vec::new();
        for i in 0..nodes {
            let dir = root.join(format!("{tag}-dn{}", i + 1));
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create cgroup {}: {e}", dir.display()))?;
            cgroups.push(dir);
        }
        let firewall = Firewall { tag, root, cgroups };
        // A rule that matches nothing, to learn whether the matches exist.
        let probe = firewall.rules(0, &[1, 2]);
        firewall.iptables("-I", &probe[2])?;
        firewall.heal();
        Ok(firewall)
    }

    pub fn cgroup(&self, node: usize) -> PathBuf {
        self.cgroups[node].clone()
    }

    fn rules(&self, node: usize, peer_ports: &[u16]) -> Vec<Vec<String>> {
        let own = peer_ports[node].to_string();
        let relative = self.cgroups[node].strip_prefix(&self.root).unwrap_or(Path::new("/")).display().to_string();
        let base = |extra: &[&str]| -> Vec<String> {
            let mut rule: Vec<String> = ["OUTPUT", "-o", "lo", "-p", "tcp"].iter().map(|s| s.to_string()).collect();
            rule.extend(extra.iter().map(|s| s.to_string()));
            rule.extend(["-m", "comment", "--comment", &self.tag, "-j", "DROP"].iter().map(|s| s.to_string()));
            rule
        };
        let mut rules = vec![base(&["--dport", &own]), base(&["--sport", &own])];
        for (j, port) in peer_ports.iter().enumerate() {
            if j != node {
                rules.push(base(&["--dport", &port.to_string(), "-m", "cgroup", "--path", &relative]));
            }
        }
        rules
    }

    fn iptables(&self, op: &str, rule: &[String]) -> Result<(), String> {
        let mut args = vec!["-w".to_string(), op.to_string()];
        args.extend(rule.iter().cloned());
        let out = Command::new(which("iptables").unwrap()).args(&args).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Cuts `node` off from its peers.
    pub fn isolate(&self, node: usize, peer_ports: &[u16]) {
        for rule in self.rules(node, peer_ports) {
            self.iptables("-I", &rule).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Removes every rule of this run.
    pub fn heal(&self) {
        let Some(iptables) = which("iptables") else { return };
        let Ok(out) = Command::new(&iptables).args(["-w", "-S", "OUTPUT"]).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&self.tag)) {
            let Some(rest) = line.strip_prefix("-A ") else { continue };
            // `-S` quotes nothing here: the tag has no spaces.
            let mut args = vec!["-w", "-D"];
            args.extend(rest.split_whitespace());
            let _ = Command::new(&iptables).args(&args).output();
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.heal();
        for dir in &self.cgroups {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

struct Shared {
    history: Arc<History>,
    ports: Vec<u16>,
    keys: Vec<String>,
    setup: ClusterSetup,
    stop: AtomicBool,
    /// Bit `i`: node `i` runs (clients pick among these; a paused or
    /// isolated node runs).
    running: AtomicU64,
    step: AtomicU64,
}

fn client_agent() -> ureq::Agent {
    // Longer than any pause, so that a stale leader's late answer is
    // received, not abandoned.
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .build()
}

impl Shared {
    fn node_of_port(&self, url: &str) -> String {
        let port = url.split("://").nth(1).and_then(|r| r.split('/').next()).and_then(|h| h.rsplit(':').next());
        match port.and_then(|p| p.parse::<u16>().ok()).and_then(|p| self.ports.iter().position(|&q| q == p)) {
            Some(i) => format!("dn-{}", i + 1),
            None => format!("?{url}"),
        }
    }

    /// One request through node `via`, redirects followed: the final
    /// answer and the nodes it went through. Too many redirects answer
    /// status 0 (no answer: unknown for a write, a failed read).
    fn follow(
        &self,
        agent: &ureq::Agent,
        via: usize,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> (u16, String, Vec<u8>, String) {
        let mut url = format!("http://127.0.0.1:{}{path}", self.ports[via]);
        let mut route = format!("dn-{}", via + 1);
        for _ in 0..=MAX_REDIRECTS {
            let (status, code, bytes, location) = request_located(agent, method, &url, body);
            match (status, location) {
                (307, Some(location)) => {
                    route.push('>');
                    route.push_str(&self.node_of_port(&location));
                    url = location;
                }
                _ => return (status, code, bytes, route),
            }
        }
        (0, format!("redirect loop: {MAX_REDIRECTS} redirects followed"), Vec::new(), route)
    }

    /// Runs one operation through node `via` and records it.
    #[allow(clippy::too_many_arguments)]
    fn op(
        &self,
        agent: &ureq::Agent,
        client: usize,
        via: usize,
        kind: Kind,
        partition: u64,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> u16 {
        let h = &self.history;
        let invoke = h.now();
        let step = self.step.load(Ordering::Relaxed);
        let (status, code, bytes, route) = self.follow(agent, via, method, path, body);
        let complete = h.now();
        let observed = read_observed(&kind, status, &code, &bytes, key);
        h.push(Event {
            id: 0,
            client,
            step,
            kind,
            partition,
            key: key.map(str::to_string),
            invoke,
            complete,
            status,
            code,
            observed,
            settle: None,
            via: route,
        });
        status
    }

    fn value_len(&self, rng: &mut Rng) -> usize {
        let weights: Vec<u64> = self.setup.sizes.iter().map(|s| s.0).collect();
        let (_, min, max) = self.setup.sizes[rng.weighted(&weights)];
        min + rng.below((max - min + 1) as u64) as usize
    }

    fn client(&self, client: usize, mut rng: Rng) {
        let agent = client_agent();
        while !self.stop.load(Ordering::SeqCst) {
            let running = self.running.load(Ordering::SeqCst);
            let up: Vec<usize> = (0..self.ports.len()).filter(|i| running & (1 << i) != 0).collect();
            if up.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let via = *rng.pick(&up);
            let p = *rng.pick(&self.setup.partitions);
            let key = rng.pick(&self.keys).clone();
            let blob = format!("/v1/partitions/{p}/blobs/{key}");
            let status = match rng.weighted(&self.setup.mix) {
                0 => {
                    let write = self.history.write_id();
                    let value = encode_value(write, p, &key, self.value_len(&mut rng));
                    let kind = Kind::Put { write, len: value.len() };
                    self.op(&agent, client, via, kind, p, Some(&key), "PUT", &blob, Some(&value))
                }
                1 => self.op(&agent, client, via, Kind::Get, p, Some(&key), "GET", &blob, None),
                2 => {
                    let write = self.history.write_id();
                    self.op(&agent, client, via, Kind::Delete { write }, p, Some(&key), "DELETE", &blob, None)
                }
                _ => {
                    let path = format!("/v1/partitions/{p}/blobs?limit=1000");
                    self.op(&agent, client, via, Kind::List, p, None, "GET", &path, None)
                }
            };
            if status == 0 || status == 503 {
                // A node down, or no leader yet: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A running cluster nemesis.
pub struct ClusterRun {
    pub history: Arc<History>,
    pub rng: Rng,
    pub budget: Budget,
    nodes: Vec<Node>,
    pub faults: Vec<Option<Fault>>,
    firewall: Option<Firewall>,
    peer_ports: Vec<u16>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
    /// Faults by kind, for the summary.
    counts: BTreeMap<String, u64>,
    /// Isolations of a leader, and those after which another replica led
    /// at a higher term (the rules did cut it off).
    isolated_leaders: u64,
    isolations_effective: u64,
    _dirs: Vec<tempfile::TempDir>,
}

impl ClusterRun {
    /// Starts `setup.nodes` nodes (each in its cgroup when a firewall is
    /// given), waits for the cluster to form, creates the partitions,
    /// waits for their leaders, and starts the clients.
    pub fn start(setup: ClusterSetup, budget: Budget, firewall: Option<Firewall>) -> ClusterRun {
        let seed = budget.seed ^ super::history::fnv64(setup.name.as_bytes());
        let n = setup.nodes;
        let mut ports = distinct_ports(2 * n);
        let peer_ports = ports.split_off(n);
        let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let toml = node_config(i, &ports, &peer_ports, &[dirs[i].path().join("d0")], &setup.extra);
                let mut node = Node::unstarted(ports[i], &toml);
                node.cgroup = firewall.as_ref().map(|f| f.cgroup(i));
                node
            })
            .collect();
        eprintln!(
            "nemesis {}: NEMESIS_SEED={} NEMESIS_STEPS={}{} (run seed {seed:#x}), {n} nodes, logs {}",
            setup.name,
            budget.seed,
            budget.steps,
            budget.seconds.map(|s| format!(" NEMESIS_SECONDS={s}")).unwrap_or_default(),
            nodes.iter().map(|n| n.log.display().to_string()).collect::<Vec<_>>().join(" ")
        );
        // Started together: the seeds wait for each other.
        nodes = nodes
            .into_iter()
            .map(|mut node| {
                std::thread::spawn(move || {
                    node.spawn().unwrap_or_else(|e| panic!("{e}"));
                    node
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let history = Arc::new(History::new());
        let shared = Arc::new(Shared {
            history: Arc::clone(&history),
            ports: ports.clone(),
            keys: (0..setup.keys).map(|i| format!("k{i:02}")).collect(),
            setup: setup.clone(),
            stop: AtomicBool::new(false),
            running: AtomicU64::new((1 << n) - 1),
            step: AtomicU64::new(0),
        });
        let mut run = ClusterRun {
            history,
            rng: Rng::new(seed),
            budget,
            nodes,
            faults: vec![None; n],
            firewall,
            peer_ports,
            shared,
            threads: Vec::new(),
            started: Instant::now(),
            counts: BTreeMap::new(),
            isolated_leaders: 0,
            isolations_effective: 0,
            _dirs: dirs,
        };
        run.form();
        for client in 0..setup.clients {
            let (shared, rng) = (Arc::clone(&run.shared), Rng::new(run.rng.next_u64()));
            run.threads.push(std::thread::spawn(move || shared.client(client, rng)));
        }
        run.note(format!("{} clients started", setup.clients));
        run
    }

    /// Waits for every node up in the map, creates the partitions and
    /// waits for their leaders.
    fn form(&mut self) {
        let agent = client_agent();
        let n = self.nodes.len();
        let formed = self.wait(Duration::from_secs(60), |run| {
            let (status, _, body, _) = run.shared.follow(&agent, 0, "GET", "/v1/cluster", None);
            let map: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            status == 200
                && map["nodes"].as_array().is_some_and(|ns| ns.len() == n && ns.iter().all(|x| x["state"] == "up"))
        });
        assert!(formed, "the cluster map did not list every node up within 60 s");
        for &p in &self.shared.setup.partitions.clone() {
            let body = serde_json::json!({ "id": p, "replicas": self.shared.setup.replicas }).to_string();
            let mut last = String::new();
            let created = self.wait(Duration::from_secs(60), |run| {
                let (status, code, bytes, _) =
                    run.shared.follow(&agent, 0, "POST", "/v1/cluster/partitions", Some(body.as_bytes()));
                last = format!("{status} {code} {}", String::from_utf8_lossy(&bytes));
                status == 201 || status == 409
            });
            if !created {
                let disks: Vec<String> = (0..n)
                    .map(|i| {
                        let url = format!("http://127.0.0.1:{}/v1/disks", self.shared.ports[i]);
                        String::from_utf8_lossy(&request(&agent, "GET", &url, None).2).into_owned()
                    })
                    .collect();
                panic!("partition {p} was not created within 60 s; the last answer: {last}; disks: {disks:?}");
            }
        }
        for &p in &self.shared.setup.partitions.clone() {
            let led = self.wait(Duration::from_secs(60), |run| run.leader_of(p).is_some());
            assert!(led, "partition {p} had no leader within 60 s");
        }
        self.note("the cluster formed; every partition has a leader".to_string());
    }

    /// Polls `done` until it holds (true) or `timeout` passed (false).
    fn wait(&mut self, timeout: Duration, mut done: impl FnMut(&mut ClusterRun) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Whether another step fits the budget (and no node died on its own).
    pub fn next_step(&mut self) -> Option<u64> {
        let step = self.step() + 1;
        let out_of_time = self.budget.seconds.is_some_and(|s| self.started.elapsed() >= Duration::from_secs(s));
        if step > self.budget.steps || out_of_time || self.node_died() {
            return None;
        }
        self.shared.step.store(step, Ordering::Relaxed);
        Some(step)
    }

    pub fn step(&self) -> u64 {
        self.shared.step.load(Ordering::Relaxed)
    }

    fn node_died(&self) -> bool {
        self.history.violations.lock().unwrap().iter().any(|v| v.contains("exited though the nemesis"))
    }

    pub fn note(&self, what: String) {
        self.history.note(self.step(), what);
    }

    /// A node exit the nemesis did not cause is a violation.
    fn check_exits(&mut self) {
        for i in 0..self.nodes.len() {
            if self.faults[i] == Some(Fault::Killed) {
                continue;
            }
            if let Some(status) = self.nodes[i].exited() {
                self.history.violation(format!(
                    "step {}: dn-{} exited though the nemesis did not stop it ({status})\n{}",
                    self.step(),
                    i + 1,
                    self.nodes[i].log_tail()
                ));
                self.nodes[i].kill();
                self.faults[i] = Some(Fault::Killed);
                self.shared.running.fetch_and(!(1 << i), Ordering::SeqCst);
            }
        }
    }

    /// Lets the clients work for `duration`.
    pub fn work(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until && !self.node_died() {
            std::thread::sleep(Duration::from_millis(50));
            self.check_exits();
        }
    }

    /// `work` for `base` plus up to `spread` ms, chosen by the seed.
    pub fn work_ms(&mut self, base: u64, spread: u64) {
        let ms = base + self.rng.below(spread + 1);
        self.work(Duration::from_millis(ms));
    }

    /// Replica `p`'s raft view on node `i` (`Null` when it does not answer
    /// within a second).
    fn raft_view(&self, i: usize, p: u64) -> serde_json::Value {
        let agent = ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(1)).build();
        let url = format!("http://127.0.0.1:{}/v1/partitions/{p}", self.shared.ports[i]);
        let (status, _, body) = request(&agent, "GET", &url, None);
        if status != 200 {
            return serde_json::Value::Null;
        }
        serde_json::from_slice(&body).unwrap_or_default()
    }

    /// The node whose replica of `p` leads at the highest term, among the
    /// nodes without a fault.
    pub fn leader_of(&self, p: u64) -> Option<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.faults[i].is_none())
            .filter_map(|i| {
                let view = self.raft_view(i, p);
                (view["raft"]["role"] == "leader").then(|| (view["raft"]["term"].as_u64().unwrap_or(0), i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// The partitions node `i` leads.
    fn led_by(&self, i: usize) -> Vec<u64> {
        self.shared.setup.partitions.iter().copied().filter(|&p| self.leader_of(p) == Some(i)).collect()
    }

    /// Nodes that may take a fault now: a majority stays without one.
    fn healthy(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.faults[i].is_none()).collect()
    }

    fn may_fault(&self) -> bool {
        let faulted = self.nodes.len() - self.healthy().len();
        faulted < (self.nodes.len() - 1) / 2
    }

    /// A node to fault: the leader of a random partition (`leader`), else
    /// one leading none if there is one; `None` when a fault now would
    /// take down a majority.
    pub fn target(&mut self, leader: bool) -> Option<usize> {
        if !self.may_fault() {
            return None;
        }
        let healthy = self.healthy();
        if leader {
            let p = *self.rng.pick(&self.shared.setup.partitions);
            if let Some(i) = self.leader_of(p) {
                return Some(i);
            }
        }
        let leaders: Vec<usize> = self.shared.setup.partitions.iter().filter_map(|&p| self.leader_of(p)).collect();
        let followers: Vec<usize> = healthy.iter().copied().filter(|i| !leaders.contains(i)).collect();
        let pool = if !leader && !followers.is_empty() { followers } else { healthy };
        Some(*self.rng.pick(&pool))
    }

    fn fault(&mut self, i: usize, what: &str, fault: Fault) {
        let led = self.led_by(i);
        let role = if led.is_empty() { "leading nothing".to_string() } else { format!("leader of {led:?}") };
        // Every partition may have a replica there.
        let partitions = self.shared.setup.partitions.clone();
        self.history.inject(self.step(), partitions, &format!("{what} dn-{} ({role})", i + 1));
        *self.counts.entry(what.to_string()).or_default() += 1;
        self.faults[i] = Some(fault);
    }

    /// kill -9 of node `i`.
    pub fn kill(&mut self, i: usize) {
        self.fault(i, "kill -9", Fault::Killed);
        self.shared.running.fetch_and(!(1 << i), Ordering::SeqCst);
        self.nodes[i].kill();
    }

    /// Starts killed node `i` again and waits until it has loaded.
    pub fn restart(&mut self, i: usize) {
        self.note(format!("restarting dn-{}", i + 1));
        if let Err(why) = self.nodes[i].spawn() {
            self.history.violation(format!("step {}: dn-{} did not restart: {why}", self.step(), i + 1));
            panic!("nemesis {}: dn-{} did not restart: {why}", self.shared.setup.name, i + 1);
        }
        let incarnation = self.history.restarts.lock().unwrap().len() as u64 + 1;
        self.history.restarts.lock().unwrap().push((self.history.now(), incarnation, "kill -9".into()));
        self.faults[i] = None;
        self.shared.running.fetch_or(1 << i, Ordering::SeqCst);
        self.note(format!("dn-{} restarted", i + 1));
    }

    /// SIGSTOP of node `i`: it answers nothing until `resume`, then
    /// answers what it was asked meanwhile, as the leader it believed to be.
    pub fn pause(&mut self, i: usize) {
        self.fault(i, "SIGSTOP", Fault::Paused);
        self.nodes[i].signal(libc::SIGSTOP);
    }

    pub fn resume(&mut self, i: usize) {
        self.nodes[i].signal(libc::SIGCONT);
        self.faults[i] = None;
        self.note(format!("SIGCONT dn-{}", i + 1));
    }

    /// Cuts node `i` off from its peers (clients still reach it). Returns
    /// the partitions it led and their terms.
    pub fn isolate(&mut self, i: usize) -> Vec<(u64, u64)> {
        let led: Vec<(u64, u64)> = self
            .led_by(i)
            .into_iter()
            .map(|p| (p, self.raft_view(i, p)["raft"]["term"].as_u64().unwrap_or(0)))
            .collect();
        self.fault(i, "peer port blocked", Fault::Isolated);
        if let Some(firewall) = &self.firewall {
            firewall.isolate(i, &self.peer_ports);
        }
        led
    }

    /// Removes the isolation of node `i`; `led` (from `isolate`) counts the
    /// isolation as effective when another node led one of those partitions
    /// at a higher term meanwhile.
    pub fn heal(&mut self, i: usize, led: &[(u64, u64)]) {
        let effective = led.iter().any(|&(p, term)| {
            (0..self.nodes.len()).filter(|&j| j != i && self.faults[j].is_none()).any(|j| {
                let raft = &self.raft_view(j, p)["raft"];
                raft["role"] == "leader" && raft["term"].as_u64().unwrap_or(0) > term
            })
        });
        if !led.is_empty() {
            self.isolated_leaders += 1;
        }
        if effective {
            self.isolations_effective += 1;
        }
        if let Some(firewall) = &self.firewall {
            firewall.heal();
        }
        self.faults[i] = None;
        self.note(format!("dn-{} reconnected{}", i + 1, if effective { " (another node led meanwhile)" } else { "" }));
    }

    /// The lines of node `i`'s log that say a replica faulted (with why) or a task panicked.
    fn logged_faults(&self, i: usize) -> Vec<String> {
        let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        log.lines()
            .filter(|line| line.contains("replica faulted") || line.contains("panicked"))
            .map(|line| format!("dn-{}: {line}", i + 1))
            .collect()
    }

    /// Heals every fault: resumes, reconnects, restarts.
    fn heal_all(&mut self) {
        for i in 0..self.nodes.len() {
            match self.faults[i] {
                Some(Fault::Paused) => self.resume(i),
                Some(Fault::Isolated) => self.heal(i, &[]),
                Some(Fault::Killed) => self.restart(i),
                None => {}
            }
        }
    }

    /// Ends the run: every fault healed, the clients stopped, the groups
    /// given time to converge (every replica applied what its leader
    /// committed), every key read and listed through every node, the
    /// replicas compared; then the checker.
    pub fn finish(mut self) {
        self.heal_all();
        self.work(Duration::from_millis(500));
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
        self.note("clients stopped; waiting for every group to converge".to_string());
        let partitions = self.shared.setup.partitions.clone();
        let mut snapshots = Vec::new();
        for &p in &partitions {
            let mut last = Vec::new();
            let converged = self.wait(Duration::from_secs(60), |run| {
                let Some(leader) = run.leader_of(p) else { return false };
                let commit = run.raft_view(leader, p)["raft"]["commit_index"].as_u64();
                last = (0..run.nodes.len()).map(|i| run.raft_view(i, p)).collect();
                let holders: Vec<&serde_json::Value> = last.iter().filter(|v| !v.is_null()).collect();
                holders.len() as u64 == run.shared.setup.replicas
                    && holders.iter().all(|v| v["raft"]["applied_index"].as_u64() == commit && commit.is_some())
            });
            let views: Vec<String> = last
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_null())
                .map(|(i, v)| {
                    format!("dn-{}: {} {} blobs {} bytes {}", i + 1, v["state"], v["raft"], v["blobs"], v["live_bytes"])
                })
                .collect();
            if !converged {
                let faults: Vec<String> = (0..self.nodes.len()).flat_map(|i| self.logged_faults(i)).collect();
                self.history.violation(format!(
                    "p{p}: the replicas did not converge within 60 s of every fault healed:\n    {}{}",
                    views.join("\n    "),
                    faults.iter().map(|line| format!("\n    logged: {line}")).collect::<String>()
                ));
                continue;
            }
            let holders: Vec<&serde_json::Value> = last.iter().filter(|v| !v.is_null()).collect();
            let contents: Vec<String> = holders.iter().map(|v| format!("{} {}", v["blobs"], v["live_bytes"])).collect();
            if contents.windows(2).any(|w| w[0] != w[1]) || holders.iter().any(|v| v["state"] != "healthy") {
                self.history.violation(format!(
                    "p{p}: the replicas applied the same log but hold different contents (or one is not healthy):\n    {}",
                    views.join("\n    ")
                ));
            }
            let max = |field: &str| holders.iter().filter_map(|v| v["raft"][field].as_u64()).max().unwrap_or(0);
            snapshots.push(format!(
                "p{p} commit {} snapshot {} purged {}",
                max("commit_index"),
                max("snapshot_index"),
                max("purged_index")
            ));
        }
        self.note("reading every key through every node".to_string());
        let agent = client_agent();
        for via in 0..self.nodes.len() {
            for &p in &partitions {
                for key in &self.shared.keys {
                    let path = format!("/v1/partitions/{p}/blobs/{key}");
                    self.shared.op(&agent, SETTLE_CLIENT, via, Kind::Get, p, Some(key), "GET", &path, None);
                }
                let path = format!("/v1/partitions/{p}/blobs?limit=1000");
                self.shared.op(&agent, SETTLE_CLIENT, via, Kind::List, p, None, "GET", &path, None);
            }
        }
        // The final reads must all have answered: each is the check that
        // every acknowledged write survived.
        let failed: Vec<String> = self
            .history
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.client == SETTLE_CLIENT && !matches!(e.observed, Observed::Value(_) | Observed::Absent))
            .filter(|e| !matches!(e.observed, Observed::Keys(_)))
            .map(|e| e.to_string())
            .collect();
        if !failed.is_empty() {
            self.history.violation(format!(
                "{} final reads (every fault healed, the groups converged) did not answer, e.g.:\n    {}",
                failed.len(),
                failed.iter().take(5).cloned().collect::<Vec<_>>().join("\n    ")
            ));
        }
        let setup = &self.shared.setup;
        let rules = Rules {
            partitions: setup.partitions.clone(),
            keys: self.shared.keys.clone(),
            faults_may_be_lost_on_power_cut: false,
            cluster: true,
        };
        let faults: Vec<String> = self.counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let summary = format!(
            "{} nodes, {} steps in {:.1}s; faults: {} (isolated leaders replaced by another: {} of {}); {}",
            self.nodes.len(),
            self.step(),
            self.started.elapsed().as_secs_f64(),
            if faults.is_empty() { "none".to_string() } else { faults.join(", ") },
            self.isolations_effective,
            self.isolated_leaders,
            snapshots.join(", ")
        );
        judge(setup.name, &self.budget, &self.history, rules, &summary);
    }
}

impl Drop for ClusterRun {
    fn drop(&mut self) {
        // Also on a failed test: the clients stopped, every node killed
        // (a paused one too), the rules removed (the firewall's own drop,
        // after the nodes have left its cgroups).
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.running.store(0, Ordering::SeqCst);
        for node in &mut self.nodes {
            node.signal(libc::SIGCONT);
            node.kill();
        }
        if let Some(firewall) = &self.firewall {
            firewall.heal();
        }
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
    }
}
