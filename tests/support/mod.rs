//! Starting the real `datanode` binary for black-box tests, on a free port
//! and a scratch data directory; the process is killed when the guard drops,
//! also when the test fails.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Option<Child>,
    pub port: u16,
    pub data: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Daemon {
    /// Starts the binary with `--data-dir data --http-addr 127.0.0.1:PORT`
    /// plus `args` and `env`, and waits until it is ready.
    pub fn start(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon {
            child: None,
            port: free_port(),
            data: data.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_datanode"))
            .arg("--data-dir")
            .arg(&self.data)
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
        self.wait_ready();
    }

    fn log_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("datanode-test-{}.stderr", self.port))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ureq::get(&self.url("/readyz")).call().is_ok_and(|r| r.status() == 200) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                let stderr = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                panic!("datanode exited before it was ready: {status}\n{stderr}");
            }
            assert!(Instant::now() < deadline, "datanode not ready within 60 s");
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
