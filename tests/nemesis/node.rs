//! The node under test: the real binary, on a fixed loopback port across
//! restarts, optionally under a file-size limit (EFBIG) or inside a cgroup
//! (so that firewall rules can match its connections), killed when the
//! guard drops. Unlike `support::Daemon` it reports an exit it did not
//! cause.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Node {
    child: Option<Child>,
    pub port: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
    /// `RLIMIT_FSIZE` for the next start, if any.
    pub fsize_limit: Option<u64>,
    /// A cgroup v2 directory the process joins before it runs (every
    /// socket it opens then belongs to that cgroup).
    pub cgroup: Option<PathBuf>,
    pub log: PathBuf,
}

impl Node {
    /// Writes `toml` to a config file and starts the node on it.
    pub fn start(toml: &str, fsize_limit: Option<u64>) -> Node {
        let port = crate::support::free_port();
        let mut node = Node::unstarted(port, toml);
        node.fsize_limit = fsize_limit;
        node.spawn().unwrap_or_else(|e| panic!("{e}"));
        node
    }

    /// A node on `port` (its configuration may name it), not started yet.
    pub fn unstarted(port: u16, toml: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("datanode.toml");
        std::fs::write(&config, toml).unwrap();
        let log = std::env::temp_dir().join(format!("datanode-nemesis-{port}.stderr"));
        // Appended to across restarts; a log of an earlier run on the port is not this node's.
        let _ = std::fs::remove_file(&log);
        Node { child: None, port, config, _dir: dir, fsize_limit: None, cgroup: None, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Starts the process and waits until it has loaded: `/readyz` 200, or
    /// 503 for any reason but loading (every disk faulted: damage at rest
    /// can do that, and the nemesis then repairs what it can); `Err` when
    /// it exits or has not loaded within two minutes.
    pub fn spawn(&mut self) -> Result<(), String> {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_datanode"));
        command
            .arg("--config")
            .arg(&self.config)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::from(stderr.try_clone().unwrap()))
            .stderr(Stdio::from(stderr));
        if let Some(limit) = self.fsize_limit {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(cgroup) = &self.cgroup {
            let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .map_err(|e| format!("cgroup path: {e}"))?;
            // SAFETY: only open, getpid, write and close (async-signal-safe)
            // on a path and a stack buffer prepared before the fork.
            unsafe {
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let mut digits = [0u8; 20];
                    let mut at = digits.len();
                    let mut pid = libc::getpid() as u32;
                    loop {
                        at -= 1;
                        digits[at] = b'0' + (pid % 10) as u8;
                        pid /= 10;
                        if pid == 0 {
                            break;
                        }
                    }
                    let wrote = libc::write(fd, digits[at..].as_ptr().cast(), digits.len() - at);
                    libc::close(fd);
                    if wrote < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.child = Some(command.spawn().map_err(|e| format!("cannot start datanode: {e}"))?);
        let deadline = Instant::now() + Duration::from_secs(120);
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
        loop {
            match agent.get(&self.url("/readyz")).call() {
                Ok(_) => return Ok(()),
                Err(ureq::Error::Status(503, answer)) => {
                    let body = answer.into_string().unwrap_or_default();
                    if !body.contains("loading") {
                        return Ok(());
                    }
                }
                Err(_) => {}
            }
            if let Some(status) = self.exited() {
                return Err(format!("datanode exited before it was ready: {status}\n{}", self.log_tail()));
            }
            if Instant::now() > deadline {
                return Err("datanode not ready within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM and wait (at most `timeout`, then SIGKILL); the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the process, while it runs.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
