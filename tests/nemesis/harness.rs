//! The nemesis harness: clients issuing random operations from many
//! connections, an admin client (export, install, recover, read-only,
//! compact), a poller sampling partition states and `/healthz`, and the
//! controller that interleaves faults and restarts, quiesces, settles and
//! reads every key around restarts. Everything lands in the `History`; the
//! `Checker` judges it at the end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::checker::{Checker, Rules};
use super::history::{
    Event, History, Kind, Observed, Rng, SETTLE_CLIENT, Sample, SettleTag, decode_value, encode_value, parse_image,
};
use super::node::Node;

/// Seed, step budget and optional wall-clock budget, from the environment.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub seed: u64,
    pub steps: u64,
    /// `NEMESIS_SECONDS`: keep taking steps (up to `steps`, unbounded when
    /// `NEMESIS_STEPS` is not set) until this much time has passed.
    pub seconds: Option<u64>,
}

impl Budget {
    /// `NEMESIS_SEED` (default: a fixed seed, so CI is reproducible),
    /// `NEMESIS_STEPS` (default `ci_steps`), `NEMESIS_SECONDS`.
    pub fn from_env(ci_steps: u64) -> Budget {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
        let seconds = var("NEMESIS_SECONDS");
        let steps = var("NEMESIS_STEPS").unwrap_or(if seconds.is_some() { 1_000_000 } else { ci_steps });
        Budget { seed: var("NEMESIS_SEED").unwrap_or(20_261_201), steps, seconds }
    }
}

/// What a run looks like.
#[derive(Debug, Clone)]
pub struct Setup {
    pub name: &'static str,
    pub partitions: Vec<u64>,
    pub keys: usize,
    pub clients: usize,
    /// Weights of put, get, delete, list.
    pub mix: [u64; 4],
    /// Value sizes: (weight, min, max).
    pub sizes: Vec<(u64, usize, usize)>,
    /// Weights of export, install, recover, read-only on, read-only off,
    /// compact; `None`: no admin client.
    pub admin: Option<[u64; 6]>,
    /// The admin client's pause between calls, in ms (min, max).
    pub admin_pause_ms: (u64, u64),
    pub request_timeout: Duration,
    pub faults_may_be_lost_on_power_cut: bool,
}

impl Setup {
    pub fn key_names(&self) -> Vec<String> {
        (0..self.keys).map(|i| format!("k{i:02}")).collect()
    }
}

struct Shared {
    history: Arc<History>,
    base: String,
    keys: Vec<String>,
    setup: Setup,
    stop: AtomicBool,
    pause: AtomicBool,
    in_flight: AtomicUsize,
    up: AtomicBool,
    incarnation: AtomicU64,
    step: AtomicU64,
    compact_unsupported: AtomicBool,
    states: Mutex<BTreeMap<u64, String>>,
    /// A write burst: clients put `burst_len`-byte values on this partition
    /// (0: none).
    burst: AtomicU64,
    burst_len: AtomicUsize,
}

/// Status, error code (or transport error) and body of one request.
pub fn request(agent: &ureq::Agent, method: &str, url: &str, body: Option<&[u8]>) -> (u16, String, Vec<u8>) {
    let (status, code, bytes, _) = request_located(agent, method, url, body);
    (status, code, bytes)
}

/// Like [`request`], with the answer's `Location` header.
pub fn request_located(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<&[u8]>,
) -> (u16, String, Vec<u8>, Option<String>) {
    let req = agent.request(method, url);
    let result = match body {
        Some(body) => req.send_bytes(body),
        None => req.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(ureq::Error::Transport(t)) => {
            let code = match t.kind() {
                ureq::ErrorKind::ConnectionFailed => "connection_failed".to_string(),
                kind => format!("transport: {kind}"),
            };
            return (0, code, Vec::new(), None);
        }
    };
    let status = response.status();
    let location = response.header("location").map(str::to_string);
    let mut bytes = Vec::new();
    if std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).is_err() {
        return (0, "transport: the body broke off".into(), Vec::new(), None);
    }
    let code = if status >= 400 {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| "(no JSON error code)".into())
    } else {
        String::new()
    };
    (status, code, bytes, location)
}

/// What a GET of `key` or a list saw, from its answer.
pub fn read_observed(kind: &Kind, status: u16, code: &str, bytes: &[u8], key: Option<&str>) -> Observed {
    match (kind, status) {
        (Kind::Get, 200) => match decode_value(bytes) {
            Ok(id) if Some(id.key.as_str()) == key => Observed::Value(id.write),
            Ok(id) => Observed::Garbage(format!("the value of key {} (w{})", id.key, id.write)),
            Err(why) => Observed::Garbage(why),
        },
        (Kind::Get, 404) if code == "blob_not_found" => Observed::Absent,
        (Kind::List, 200) => {
            let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
            let keys = v["keys"].as_array().cloned().unwrap_or_default();
            Observed::Keys(keys.iter().map(|k| k.as_str().map_or_else(|| k.to_string(), str::to_string)).collect())
        }
        _ => Observed::Nothing,
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(2)).timeout(Duration::from_secs(20)).build()
}

impl Shared {
    fn step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// Runs one operation and records it.
    #[allow(clippy::too_many_arguments)]
    fn op(
        &self,
        agent: &ureq::Agent,
        client: usize,
        kind: Kind,
        partition: u64,
        key: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        settle: SettleTag,
    ) -> (u16, Vec<u8>) {
        let h = &self.history;
        let invoke = h.now();
        let step = self.step();
        let (status, code, bytes) = request(agent, method, &format!("{}{path}", self.base), body);
        let complete = h.now();
        let mut kind = kind;
        let observed = match (&kind, status) {
            (Kind::Get | Kind::List, _) => read_observed(&kind, status, &code, &bytes, key),
            (Kind::Export { .. }, 200) => match parse_image(&bytes) {
                Ok(contents) => {
                    let mut images = h.images.lock().unwrap();
                    images.push((partition, contents.clone(), bytes.clone()));
                    let n = images.len();
                    // Keep the bytes of the last few images, and of each
                    // partition's latest (the repair of a damaged one).
                    for i in 0..n.saturating_sub(6) {
                        let from = images[i].0;
                        if images[i + 1..].iter().any(|(later, _, _)| *later == from) {
                            images[i].2 = Vec::new();
                        }
                    }
                    kind = Kind::Export { image: Some(n - 1) };
                    Observed::Image(contents)
                }
                Err(why) => {
                    h.violation(format!(
                        "step {step}: an export of p{partition} answered 200 with a broken image: {why}"
                    ));
                    Observed::Nothing
                }
            },
            _ => Observed::Nothing,
        };
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
            settle,
            via: String::new(),
        });
        (status, bytes)
    }

    fn get(&self, agent: &ureq::Agent, client: usize, p: u64, key: &str, settle: SettleTag) -> (u16, Vec<u8>) {
        self.op(agent, client, Kind::Get, p, Some(key), "GET", &format!("/v1/partitions/{p}/blobs/{key}"), None, settle)
    }

    fn list(&self, agent: &ureq::Agent, client: usize, p: u64, settle: SettleTag) {
        self.op(
            agent,
            client,
            Kind::List,
            p,
            None,
            "GET",
            &format!("/v1/partitions/{p}/blobs?limit=1000"),
            None,
            settle,
        );
    }

    fn value_len(&self, rng: &mut Rng) -> usize {
        let weights: Vec<u64> = self.setup.sizes.iter().map(|s| s.0).collect();
        let (_, min, max) = self.setup.sizes[rng.weighted(&weights)];
        min + rng.below((max - min + 1) as u64) as usize
    }

    /// Waits while paused; true when the caller may run one operation
    /// (counted in flight until `done`).
    fn may_run(&self) -> bool {
        while !self.stop.load(Ordering::SeqCst) {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if !self.pause.load(Ordering::SeqCst) {
                return true;
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn done(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn client(&self, client: usize, mut rng: Rng) {
        let agent = agent();
        while self.may_run() {
            let burst = self.burst.load(Ordering::Relaxed);
            let p = if burst != 0 && rng.chance(85) { burst } else { *rng.pick(&self.setup.partitions) };
            let key = rng.pick(&self.keys).clone();
            let blob = format!("/v1/partitions/{p}/blobs/{key}");
            let op = if p == burst && rng.chance(85) { 0 } else { rng.weighted(&self.setup.mix) };
            let (status, _) = match op {
                0 => {
                    let write = self.history.write_id();
                    let len =
                        if p == burst { self.burst_len.load(Ordering::Relaxed) } else { self.value_len(&mut rng) };
                    let value = encode_value(write, p, &key, len);
                    self.op(
                        &agent,
                        client,
                        Kind::Put { write, len: value.len() },
                        p,
                        Some(&key),
                        "PUT",
                        &blob,
                        Some(&value),
                        None,
                    )
                }
                1 => self.get(&agent, client, p, &key, None),
                2 => {
                    let write = self.history.write_id();
                    self.op(&agent, client, Kind::Delete { write }, p, Some(&key), "DELETE", &blob, None, None)
                }
                _ => {
                    self.list(&agent, client, p, None);
                    (200, Vec::new())
                }
            };
            self.done();
            if status == 0 {
                // The node is down: do not spin.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Clears the operator's read-only of partition `p`.
    fn clear_read_only(&self, agent: &ureq::Agent, client: usize, p: u64) {
        let path = format!("/v1/partitions/{p}/read-only");
        self.op(agent, client, Kind::ReadOnly(false), p, None, "POST", &path, Some(br#"{"read_only":false}"#), None);
    }

    fn admin(&self, weights: [u64; 6], mut rng: Rng) {
        let agent = agent();
        let client = self.setup.clients;
        let mut read_only: Vec<u64> = Vec::new();
        loop {
            let (lo, hi) = self.setup.admin_pause_ms;
            let pause = Duration::from_millis(lo + rng.below(hi - lo + 1));
            let until = Instant::now() + pause;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !self.may_run() {
                return;
            }
            let mut p = *rng.pick(&self.setup.partitions);
            let base = format!("/v1/partitions/{p}");
            match rng.weighted(&weights) {
                0 => {
                    self.op(
                        &agent,
                        client,
                        Kind::Export { image: None },
                        p,
                        None,
                        "GET",
                        &format!("{base}/snapshot"),
                        None,
                        None,
                    );
                }
                1 => {
                    let image = {
                        let images = self.history.images.lock().unwrap();
                        let usable: Vec<usize> = (0..images.len()).filter(|&i| !images[i].2.is_empty()).collect();
                        usable.get(rng.below(usable.len().max(1) as u64) as usize).map(|&i| (i, images[i].2.clone()))
                    };
                    if let Some((index, bytes)) = image {
                        self.op(
                            &agent,
                            client,
                            Kind::Install { image: index },
                            p,
                            None,
                            "PUT",
                            &format!("{base}/snapshot"),
                            Some(&bytes),
                            None,
                        );
                    }
                }
                2 => {
                    let faulted: Vec<u64> =
                        self.states.lock().unwrap().iter().filter(|(_, s)| *s == "faulted").map(|(p, _)| *p).collect();
                    if !faulted.is_empty() {
                        p = *rng.pick(&faulted);
                    } else if !rng.chance(25) {
                        // Mostly recover what needs it; sometimes a healthy
                        // partition (an operator may).
                        self.done();
                        continue;
                    }
                    let path = format!("/v1/partitions/{p}/recover");
                    self.op(&agent, client, Kind::Recover, p, None, "POST", &path, Some(b""), None);
                }
                3 => {
                    let (status, _) = self.op(
                        &agent,
                        client,
                        Kind::ReadOnly(true),
                        p,
                        None,
                        "POST",
                        &format!("{base}/read-only"),
                        Some(br#"{"read_only":true}"#),
                        None,
                    );
                    if status == 200 {
                        read_only.push(p);
                    }
                }
                4 => {
                    if let Some(p) = read_only.pop() {
                        self.clear_read_only(&agent, client, p);
                    }
                }
                _ => {
                    if !self.compact_unsupported.load(Ordering::Relaxed) {
                        let (status, _) = self.op(
                            &agent,
                            client,
                            Kind::Compact,
                            p,
                            None,
                            "POST",
                            &format!("{base}/compact"),
                            Some(b""),
                            None,
                        );
                        if status == 404 || status == 405 {
                            self.compact_unsupported.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
            self.done();
            // Operator read-only does not outlive a few calls.
            if read_only.len() > 1 || (rng.chance(30) && !read_only.is_empty()) {
                let p = read_only.remove(0);
                if self.may_run() {
                    self.clear_read_only(&agent, client, p);
                    self.done();
                }
            }
        }
    }

    fn poll(&self, node: &Mutex<Node>) {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            let incarnation = self.incarnation.load(Ordering::SeqCst);
            if !self.up.load(Ordering::SeqCst) {
                continue;
            }
            let still_up = || self.up.load(Ordering::SeqCst) && self.incarnation.load(Ordering::SeqCst) == incarnation;
            {
                let mut node = node.lock().unwrap();
                if still_up()
                    && let Some(status) = node.exited()
                {
                    self.history.violation(format!(
                        "step {}: the node exited ({status}) though the nemesis did not stop it\n{}",
                        self.step(),
                        node.log_tail()
                    ));
                    self.up.store(false, Ordering::SeqCst);
                    continue;
                }
            }
            let at = self.history.now();
            let (status, _, body) = request(&agent, "GET", &format!("{}/v1/partitions", self.base), None);
            if status == 200 {
                let list: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let mut states = BTreeMap::new();
                for p in list.as_array().into_iter().flatten() {
                    let (Some(id), Some(state)) = (p["id"].as_u64(), p["state"].as_str()) else { continue };
                    let reasons = p["reasons"].as_array().into_iter().flatten();
                    let reasons = reasons.filter_map(|r| r.as_str().map(str::to_string)).collect();
                    states.insert(id, (state.to_string(), reasons));
                }
                *self.states.lock().unwrap() = states.iter().map(|(p, (s, _))| (*p, s.clone())).collect();
                self.history.samples.lock().unwrap().push(Sample { at, states });
            }
            let (health, code, _) = request(&agent, "GET", &format!("{}/healthz", self.base), None);
            if health != 200 && still_up() {
                self.history.violation(format!(
                    "step {}: /healthz answered {health} {code} while the node was up",
                    self.step()
                ));
            }
        }
    }
}

/// How the node is stopped for a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Term,
    Kill,
    /// Called a power cut in the history; the caller shuts the disk down
    /// without a log flush first and remounts it while the node is down.
    PowerCut,
}

/// A running nemesis.
pub struct Run {
    pub history: Arc<History>,
    pub node: Arc<Mutex<Node>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    pub rng: Rng,
    pub budget: Budget,
    started: Instant,
    round: u64,
    agent: ureq::Agent,
}

impl Run {
    pub fn start(setup: Setup, budget: Budget, node: Node) -> Run {
        let seed = budget.seed ^ super::history::fnv64(setup.name.as_bytes());
        eprintln!(
            "nemesis {}: NEMESIS_SEED={} NEMESIS_STEPS={}{} (run seed {seed:#x}), node log {}",
            setup.name,
            budget.seed,
            budget.steps,
            budget.seconds.map(|s| format!(" NEMESIS_SECONDS={s}")).unwrap_or_default(),
            node.log.display()
        );
        let history = Arc::new(History::new());
        let shared = Arc::new(Shared {
            history: Arc::clone(&history),
            base: node.url(""),
            keys: setup.key_names(),
            setup: setup.clone(),
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            up: AtomicBool::new(true),
            incarnation: AtomicU64::new(1),
            step: AtomicU64::new(0),
            compact_unsupported: AtomicBool::new(false),
            states: Mutex::new(BTreeMap::new()),
            burst: AtomicU64::new(0),
            burst_len: AtomicUsize::new(0),
        });
        let node = Arc::new(Mutex::new(node));
        let mut rng = Rng::new(seed);
        let mut threads = Vec::new();
        for client in 0..setup.clients {
            let (shared, rng) = (Arc::clone(&shared), Rng::new(rng.next_u64()));
            threads.push(std::thread::spawn(move || shared.client(client, rng)));
        }
        if let Some(weights) = setup.admin {
            let (shared, rng) = (Arc::clone(&shared), Rng::new(rng.next_u64()));
            threads.push(std::thread::spawn(move || shared.admin(weights, rng)));
        }
        {
            let (shared, node) = (Arc::clone(&shared), Arc::clone(&node));
            threads.push(std::thread::spawn(move || shared.poll(&node)));
        }
        Run { history, node, shared, threads, rng, budget, started: Instant::now(), round: 0, agent: agent() }
    }

    /// Whether another step fits the budget (and the node is still alive).
    pub fn next_step(&mut self) -> Option<u64> {
        let step = self.shared.step.load(Ordering::Relaxed) + 1;
        let out_of_time = self.budget.seconds.is_some_and(|s| self.started.elapsed() >= Duration::from_secs(s));
        if step > self.budget.steps || out_of_time || self.node_died() {
            return None;
        }
        self.shared.step.store(step, Ordering::Relaxed);
        Some(step)
    }

    pub fn step(&self) -> u64 {
        self.shared.step()
    }

    fn node_died(&self) -> bool {
        self.history.violations.lock().unwrap().iter().any(|v| v.contains("the node exited"))
    }

    pub fn note(&self, what: impl Into<String>) {
        self.history.note(self.step(), what.into());
    }

    pub fn inject(&self, partitions: Vec<u64>, what: &str) {
        self.history.inject(self.step(), partitions, what);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.shared.base)
    }

    /// Lets the clients work for `duration` (the workload, not a wait for
    /// anything).
    pub fn work(&self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until && !self.node_died() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `work` for `base` plus up to `spread` ms, chosen by the seed.
    pub fn work_ms(&mut self, base: u64, spread: u64) {
        let ms = base + self.rng.below(spread + 1);
        self.work(Duration::from_millis(ms));
    }

    /// Stops the clients between operations and waits until none is in
    /// flight.
    pub fn quiesce(&self) {
        self.shared.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "clients still in flight after 90 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
    }

    /// After `quiesce` (and the faults healed): waits until outcomes have
    /// settled: no request in flight, no write queued or being written
    /// inside the node (`wal.queued_bytes` 0 on every partition: a request
    /// that timed out may still be in a slow write), and every partition's
    /// log unchanged for longer than `request_timeout` plus a second.
    pub fn settle(&self) {
        let quiet = self.shared.setup.request_timeout + Duration::from_secs(1);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = None;
        let mut since = Instant::now();
        loop {
            let (status, _, body) = request(&self.agent, "GET", &self.url("/v1/partitions"), None);
            let wal: Vec<String> = if status == 200 {
                let list: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                list.as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{} {} {}", p["id"], p["state"], p["wal"]))
                    .collect()
            } else {
                vec![format!("status {status}")]
            };
            let pending = wal.iter().any(|p| !p.contains("\"queued_bytes\":0"));
            if last.as_ref() != Some(&wal) || pending {
                last = Some(wal);
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
            assert!(Instant::now() < deadline, "the node's logs did not settle within 120 s: {last:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads every key of every partition, and lists them.
    fn settle_reads(&self, after: bool) {
        let tag = Some((self.round, after));
        for &p in &self.shared.setup.partitions {
            for key in &self.shared.keys {
                self.shared.get(&self.agent, SETTLE_CLIENT, p, key, tag);
            }
            self.shared.list(&self.agent, SETTLE_CLIENT, p, tag);
        }
    }

    fn stop_node(&self, node: &mut Node, how: Stop) {
        self.shared.up.store(false, Ordering::SeqCst);
        self.shared.incarnation.fetch_add(1, Ordering::SeqCst);
        match how {
            Stop::Term => {
                let status = node.terminate(Duration::from_secs(60));
                if !status.is_some_and(|s| s.success()) {
                    self.history.violation(format!(
                        "step {}: SIGTERM: the node exited with {status:?}, not 0\n{}",
                        self.step(),
                        node.log_tail()
                    ));
                }
            }
            Stop::Kill | Stop::PowerCut => node.kill(),
        }
    }

    fn start_node(&self, node: &mut Node, how: Stop) {
        if let Err(why) = node.spawn() {
            self.history.violation(format!("step {}: restart failed: {why}", self.step()));
            panic!("nemesis {}: the node did not restart: {why}", self.shared.setup.name);
        }
        let incarnation = self.shared.incarnation.fetch_add(1, Ordering::SeqCst) + 1;
        let kind = match how {
            Stop::Term => "sigterm",
            Stop::Kill => "kill -9",
            Stop::PowerCut => "power cut",
        };
        self.history.restarts.lock().unwrap().push((self.history.now(), incarnation, kind.into()));
        self.shared.up.store(true, Ordering::SeqCst);
    }

    /// A restart. `quiet`: first quiesce, `heal`, settle and read every key,
    /// and read them all again after the restart (before any client runs).
    /// Otherwise under load. `down` runs after `heal` and before the stop
    /// (a power cut shuts the disk down there); `between` while the node is
    /// down (the remount).
    pub fn restart(
        &mut self,
        how: Stop,
        quiet: bool,
        heal: &mut dyn FnMut(&Run),
        down: &mut dyn FnMut(),
        between: &mut dyn FnMut(&mut Node),
    ) {
        if quiet {
            self.quiesce();
            heal(self);
            self.settle();
            self.round += 1;
            self.note(format!("settle round {}: reading every key before {how:?}", self.round));
            self.settle_reads(false);
        }
        self.note(format!("restart: {how:?}{}", if quiet { " (quiescent)" } else { " under load" }));
        let node = Arc::clone(&self.node);
        let mut node = node.lock().unwrap();
        down();
        self.stop_node(&mut node, how);
        between(&mut node);
        self.start_node(&mut node, how);
        drop(node);
        self.note("restarted".to_string());
        if quiet {
            self.settle_reads(true);
            self.resume();
        }
    }

    /// A write burst of `len`-byte puts on `p` (most clients, most of their
    /// operations) until `end_burst`.
    pub fn burst(&self, p: u64, len: usize) {
        self.shared.burst_len.store(len, Ordering::Relaxed);
        self.shared.burst.store(p, Ordering::Relaxed);
        self.note(format!("write burst of {len} B puts on p{p}"));
    }

    pub fn end_burst(&self) {
        self.shared.burst.store(0, Ordering::Relaxed);
        self.note("burst over".to_string());
    }

    /// Exports `from` and installs the image into `into` (the nemesis' own
    /// admin calls, recorded like the clients').
    pub fn export_and_install(&self, from: u64, into: u64) {
        let client = usize::MAX;
        let path = format!("/v1/partitions/{from}/snapshot");
        let (status, _) =
            self.shared.op(&self.agent, client, Kind::Export { image: None }, from, None, "GET", &path, None, None);
        if status != 200 {
            return;
        }
        let (index, bytes) = {
            let images = self.history.images.lock().unwrap();
            (images.len() - 1, images[images.len() - 1].2.clone())
        };
        let path = format!("/v1/partitions/{into}/snapshot");
        self.shared.op(
            &self.agent,
            client,
            Kind::Install { image: index },
            into,
            None,
            "PUT",
            &path,
            Some(&bytes),
            None,
        );
    }

    /// Recovers every faulted partition (the nemesis' heal).
    pub fn recover_faulted(&self) {
        for id in self.faulted() {
            self.recover(id);
        }
    }

    /// The ids of the faulted partitions, as the node lists them.
    fn faulted(&self) -> Vec<u64> {
        let list = self.json("/v1/partitions");
        list.as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"] == "faulted")
            .filter_map(|p| p["id"].as_u64())
            .collect()
    }

    /// Recovers partition `id` (recorded like the clients' calls); its status.
    fn recover(&self, id: u64) -> u16 {
        let path = format!("/v1/partitions/{id}/recover");
        self.shared.op(&self.agent, usize::MAX, Kind::Recover, id, None, "POST", &path, Some(b""), None).0
    }

    /// What an operator does about faulted partitions: recover each; one
    /// that stays faulted (its data is damaged) gets its own latest image
    /// installed. Rounds until none is faulted (a disk faulted by its
    /// partitions recovers once they are repaired) or ten rounds passed.
    pub fn repair_faulted(&self) {
        for _ in 0..10 {
            let faulted = self.faulted();
            if faulted.is_empty() {
                return;
            }
            for p in faulted {
                if self.recover(p) == 200 {
                    continue;
                }
                let latest = {
                    let images = self.history.images.lock().unwrap();
                    images
                        .iter()
                        .enumerate()
                        .rev()
                        .find(|(_, (from, _, _))| *from == p)
                        .map(|(i, (_, _, b))| (i, b.clone()))
                };
                if let Some((index, bytes)) = latest.filter(|(_, b)| !b.is_empty()) {
                    let path = format!("/v1/partitions/{p}/snapshot");
                    self.shared.op(
                        &self.agent,
                        usize::MAX,
                        Kind::Install { image: index },
                        p,
                        None,
                        "PUT",
                        &path,
                        Some(&bytes),
                        None,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let (_, _, body) = request(&self.agent, "GET", &self.url(path), None);
        serde_json::from_slice(&body).unwrap_or_default()
    }

    /// Ends the run: a last quiescent SIGTERM restart round, the clients
    /// stopped, then the checker. Panics with the seed, the step and the
    /// offending history excerpts when the contract was broken.
    pub fn finish(mut self, heal: &mut dyn FnMut(&Run)) {
        if !self.node_died() {
            self.restart(
                Stop::Term,
                true,
                &mut |run| {
                    heal(run);
                    run.recover_faulted();
                },
                &mut || {},
                &mut |_| {},
            );
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
        let setup = &self.shared.setup;
        let rules = Rules {
            partitions: setup.partitions.clone(),
            keys: self.shared.keys.clone(),
            faults_may_be_lost_on_power_cut: setup.faults_may_be_lost_on_power_cut,
            cluster: false,
        };
        let summary = format!("{} steps in {:.1}s", self.step(), self.started.elapsed().as_secs_f64());
        judge(setup.name, &self.budget, &self.history, rules, &summary);
    }
}

/// Holds the history to the contract: runs the checker, prints the summary
/// (`summary` first: steps and time), writes the whole history to the temp
/// directory, and panics with the seed, the step budget and the offending
/// history excerpts when the contract was broken.
pub fn judge(name: &str, budget: &Budget, history: &History, rules: Rules, summary: &str) {
    let events = {
        let mut events = history.events.lock().unwrap().clone();
        events.sort_by_key(|e| (e.invoke, e.id));
        events
    };
    let checker = Checker::new(&events, rules);
    let violations = checker.check(history);
    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    let mut by_answer: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        let op = match e.kind {
            Kind::Put { .. } => "put",
            Kind::Delete { .. } => "delete",
            Kind::Get => "get",
            Kind::List => "list",
            Kind::Export { .. } => "export",
            Kind::Install { .. } => "install",
            Kind::Recover => "recover",
            Kind::ReadOnly(_) => "read-only",
            Kind::Compact => "compact",
            Kind::Nemesis(_) => continue,
        };
        *by_answer.entry(format!("{op} {} {}", e.status, e.code)).or_default() += 1;
    }
    let dump = std::env::temp_dir().join(format!("nemesis-{}-{}.history", name, budget.seed));
    let text: String = events.iter().map(|e| format!("{e}\n")).collect();
    let _ = std::fs::write(&dump, text);
    eprintln!(
        "nemesis {}: {summary}, {} operations ({} restarts, {} faults injected); answers: {by_answer:?}; history in {}",
        name,
        count(&|e| !matches!(e.kind, Kind::Nemesis(_))),
        history.restarts.lock().unwrap().len(),
        history.injections.lock().unwrap().len(),
        dump.display()
    );
    if !violations.is_empty() {
        let mut text = String::from("\nall violations, one line each:\n");
        for v in violations.iter().take(60) {
            let first: String = v.lines().next().unwrap_or_default().chars().take(220).collect();
            text.push_str(&format!("  * {first}\n"));
        }
        // In full: the first of each kind (reads, stability across
        // restarts, states), then the next ones, six in all.
        let kind = |v: &str| {
            if v.contains("changed across the restart") {
                1
            } else if v.contains("went faulted") || v.contains("left faulted") {
                2
            } else {
                0
            }
        };
        let mut full: Vec<&String> = Vec::new();
        for k in 0..3 {
            full.extend(violations.iter().find(|v| kind(v) == k));
        }
        for v in &violations {
            if full.len() >= 6 {
                break;
            }
            if !full.contains(&v) {
                full.push(v);
            }
        }
        text.push_str("\nin full (the first of each kind, then the next ones):\n");
        for v in full {
            text.push_str(&format!("\n--- {v}\n"));
        }
        panic!(
            "nemesis {} FAILED: {} violation(s) of the node's contract; NEMESIS_SEED={} NEMESIS_STEPS={} (reproduce: NEMESIS_SEED={} NEMESIS_STEPS={} cargo test --test nemesis {} -- --nocapture)\n{text}",
            name,
            violations.len(),
            budget.seed,
            budget.steps,
            budget.seed,
            budget.steps,
            name
        );
    }
    eprintln!("nemesis {name}: no violation");
}

impl Drop for Run {
    fn drop(&mut self) {
        // Also on a failed test: stop the clients and the node before the
        // disks' guards unmount.
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.up.store(false, Ordering::SeqCst);
        self.node.lock().unwrap_or_else(std::sync::PoisonError::into_inner).kill();
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
    }
}
