//! Test support for black-box tests of the real `datanode` binary:
//! starting it on a free port (killed when the guard drops, also when the
//! test fails), real disks (`disks`), FUSE-served disks with injected
//! faults (`fuse`), and writers that remember what was acknowledged
//! (`load`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod cluster;
pub mod disks;
pub mod fuse;
pub mod load;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    /// `--data-dir` or `--config`, and their value.
    launch: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    _config: Option<tempfile::TempDir>,
    /// How the test reaches it: plain HTTP on 127.0.0.1, or HTTPS on
    /// `localhost` with the agent's TLS configuration.
    pub agent: ureq::Agent,
    https: bool,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Daemon {
    /// Starts the binary with `--data-dir data --http-addr 127.0.0.1:PORT`
    /// plus `args` and `env`, and waits until it is ready.
    pub fn start(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let launch = vec!["--data-dir".to_string(), data.to_str().unwrap().to_string()];
        Daemon::launch(launch, None, args, env)
    }

    /// Starts the binary with this configuration file's text (disks,
    /// health settings, ...) and `--http-addr 127.0.0.1:PORT`, and waits
    /// until it is ready.
    pub fn with_config(toml: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datanode.toml");
        std::fs::write(&path, toml).unwrap();
        let launch = vec!["--config".to_string(), path.to_str().unwrap().to_string()];
        Daemon::launch(launch, Some(dir), &[], env)
    }

    /// Like [`Daemon::with_config`] on a port chosen beforehand (a cluster
    /// node's configuration names its own URL).
    pub fn with_config_on(port: u16, toml: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datanode.toml");
        std::fs::write(&path, toml).unwrap();
        let launch = vec!["--config".to_string(), path.to_str().unwrap().to_string()];
        let mut daemon = Daemon::unstarted(launch, Some(dir), &[], env);
        daemon.port = port;
        daemon.spawn();
        daemon
    }

    /// Like [`Daemon::with_config`] for a node that serves HTTPS: reached
    /// at `https://localhost:PORT` through `agent` (its TLS configuration
    /// trusts the node's CA, and holds a client certificate if needed).
    pub fn with_tls_config(toml: &str, env: &[(&str, &str)], agent: ureq::Agent) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datanode.toml");
        std::fs::write(&path, toml).unwrap();
        let launch = vec!["--config".to_string(), path.to_str().unwrap().to_string()];
        let mut daemon = Daemon::unstarted(launch, Some(dir), &[], env);
        daemon.agent = agent;
        daemon.https = true;
        daemon.spawn();
        daemon
    }

    /// A cluster node on `port`: HTTPS through `agent` when given, else
    /// plain HTTP.
    pub fn on(port: u16, toml: &str, agent: Option<ureq::Agent>) -> Daemon {
        match agent {
            Some(agent) => Daemon::with_tls_config_on(port, toml, agent),
            None => Daemon::with_config_on(port, toml, &[]),
        }
    }

    /// [`Daemon::with_tls_config`] on a port chosen beforehand (a cluster
    /// node's).
    pub fn with_tls_config_on(port: u16, toml: &str, agent: ureq::Agent) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datanode.toml");
        std::fs::write(&path, toml).unwrap();
        let launch = vec!["--config".to_string(), path.to_str().unwrap().to_string()];
        let mut daemon = Daemon::unstarted(launch, Some(dir), &[], &[]);
        daemon.port = port;
        daemon.agent = agent;
        daemon.https = true;
        daemon.spawn();
        daemon
    }

    fn launch(launch: Vec<String>, config: Option<tempfile::TempDir>, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::unstarted(launch, config, args, env);
        daemon.spawn();
        daemon
    }

    fn unstarted(
        launch: Vec<String>,
        config: Option<tempfile::TempDir>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon {
            child: None,
            port: free_port(),
            launch,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            _config: config,
            agent: ureq::agent(),
            https: false,
        }
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready();
    }

    fn spawn_process(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_datanode"))
            .args(&self.launch)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log_path()).map_or(Stdio::null(), Stdio::from))
            .spawn()
            .expect("start datanode");
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("datanode-test-{}.stderr", self.port))
    }

    /// What the node logged (warnings and errors) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The JSON at `path`, whatever the status.
    pub fn json(&self, path: &str) -> serde_json::Value {
        let (_, body) = call(self.agent.get(&self.url(path)), None);
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
    }

    /// `/metrics` as text.
    pub fn metrics(&self) -> String {
        String::from_utf8(call(self.agent.get(&self.url("/metrics")), None).1).unwrap()
    }

    /// The value of the sample whose line starts with `name{` and contains
    /// every one of `labels` (`key="value"`), if there is one.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        self.metrics()
            .lines()
            .filter(|line| is_sample_of(line, name) && labels.iter().all(|l| line.contains(l)))
            .find_map(|line| line.rsplit(' ').next()?.parse().ok())
    }

    /// The sum of every sample whose line starts with `name{` and contains
    /// every one of `labels` (series that exist at 0 from the start count
    /// too, so the sum is what the labels add up to).
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|line| is_sample_of(line, name) && labels.iter().all(|l| line.contains(l)))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// A partition's state name.
    pub fn state_of(&self, partition: u64) -> String {
        self.json(&format!("/v1/partitions/{partition}"))["state"].as_str().unwrap_or("?").to_string()
    }

    /// A disk's state name.
    pub fn disk_state(&self, disk: &str) -> String {
        let disks = self.json("/v1/disks");
        let found = disks.as_array().into_iter().flatten().find(|d| d["name"] == disk);
        found.and_then(|d| d["state"].as_str()).unwrap_or("?").to_string()
    }

    /// `POST /v1/partitions/{id}/recover`: its status and body.
    pub fn recover(&self, partition: u64) -> (u16, serde_json::Value) {
        let (status, body) = call(ureq::post(&self.url(&format!("/v1/partitions/{partition}/recover"))), Some(b""));
        (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        match self.https {
            true => format!("https://localhost:{}{path}", self.port),
            false => format!("http://127.0.0.1:{}{path}", self.port),
        }
    }

    fn wait_ready(&mut self) {
        // Generous: a node replaying millions of blobs (the RSS benchmark)
        // takes a while; a node that never gets ready still fails.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if self.agent.get(&self.url("/readyz")).call().is_ok_and(|r| r.status() == 200) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                let stderr = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                panic!("datanode exited before it was ready: {status}\n{stderr}");
            }
            assert!(Instant::now() < deadline, "datanode not ready within 300 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether an exposition line is a sample of `name` (with labels or not).
fn is_sample_of(line: &str, name: &str) -> bool {
    line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
}

/// Status and body of a request, whatever the status.
pub fn call(request: ureq::Request, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let result = match body {
        Some(body) => request.send_bytes(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("transport error: {error}"),
    };
    let status = response.status();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    (status, bytes)
}

/// The JSON error code of a response body.
pub fn error_code(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    assert!(value["message"].is_string(), "error bodies carry a message: {value}");
    value["error"].as_str().expect("error code").to_string()
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after
/// `timeout`. Returns how long it took.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// A configuration with these disks (name, path) and extra TOML appended
/// (sections the test needs, e.g. `[health]`).
pub fn config_with_disks(disks: &[(&str, &Path)], extra: &str) -> String {
    let mut toml = String::new();
    for (name, path) in disks {
        toml.push_str(&format!("[[disk]]\nname = \"{name}\"\npath = \"{}\"\n\n", path.display()));
    }
    toml.push_str(extra);
    toml
}
