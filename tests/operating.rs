//! What an operator meets on the way in, on the real binary: flags in
//! either position, configuration messages that name the file, key,
//! value or variable, `check-config` refusing what `serve` refuses, and
//! start-up failures that exit 78 with one message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};

fn datanode(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datanode"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn flags_work_before_and_after_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[limits]\nmax_blob_size = \"1MiB\"\n").unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[wal]\ndurability = \"sometimes\"\n").unwrap();
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());
    for args in [["--config", bad, "check-config"], ["check-config", "--config", bad]] {
        let output = datanode(&args, &[]);
        assert_eq!(output.status.code(), Some(78), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("wal.durability"), "{args:?}: {}", stderr(&output));
    }
    for args in [
        ["--config", good, "--http-addr", "127.0.0.1:7507", "check-config"],
        ["check-config", "--config", good, "--http-addr", "127.0.0.1:7507"],
        ["--config", good, "check-config", "--http-addr", "127.0.0.1:7507"],
    ] {
        let output = datanode(&args, &[]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        assert!(text.contains("max_blob_size = \"1MiB\"") && text.contains("127.0.0.1:7507"), "{args:?}: {text}");
    }
}

#[test]
fn configuration_messages_name_the_file_key_value_or_variable() {
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["check-config"];
        all.extend_from_slice(args);
        datanode(&all, env)
    };
    // Sizes: KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024.
    for (value, shown) in [("1MB", "1000000"), ("1MiB", "1MiB"), ("100 KB", "100000"), ("2GiB", "2GiB")] {
        let output = check(&[], &[("DATANODE_WAL__SEGMENT_SIZE", value)]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains(&format!("segment_size = \"{shown}\"")), "{value}: {}{text}", stderr(&output));
    }
    let output = check(&[], &[("DATANODE_LIMITS__MAX_BLOB_SIZE", "16m")]);
    assert_eq!(output.status.code(), Some(78), "an ambiguous unit is refused");
    assert!(stderr(&output).contains("limits.max_blob_size") && stderr(&output).contains("KiB"), "{}", stderr(&output));

    // A host name is resolved; one that does not resolve names key and value.
    let output = check(&["--http-addr", "localhost:7502"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("http_addr = \"127.0.0.1:7502\""));
    let output = check(&["--http-addr", "no-such-host.invalid:7502"], &[]);
    assert_eq!(output.status.code(), Some(78));
    assert!(stderr(&output).contains("node.http_addr = \"no-such-host.invalid:7502\""), "{}", stderr(&output));

    // An unknown key names the file, the line and the key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "[node]\nshutdown_timeout = \"5s\"\nshutdown_timout = \"5s\"\n").unwrap();
    let output = check(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(78));
    let said = stderr(&output);
    assert!(said.contains(&format!("{}:3", file.display())) && said.contains("node.shutdown_timout"), "{said}");

    // An environment variable that configures nothing is named, with the
    // one it probably meant; variables of the test harness are left alone.
    let output = check(&[], &[("DATANODE_WAL_SEGMENT_SIZE", "8MiB")]);
    assert_eq!(output.status.code(), Some(78));
    assert!(stderr(&output).contains("DATANODE_WAL_SEGMENT_SIZE"), "{}", stderr(&output));
    assert!(stderr(&output).contains("DATANODE_WAL__SEGMENT_SIZE"), "{}", stderr(&output));
    let output = check(&[], &[("DATANODE_NODE__NO_SUCH_KEY", "1")]);
    assert_eq!(output.status.code(), Some(78));
    assert!(stderr(&output).contains("DATANODE_NODE__NO_SUCH_KEY"), "{}", stderr(&output));
    assert!(check(&[], &[("DATANODE_REQUIRE_KERNEL_TESTS", "1")]).status.success());
}

#[test]
fn check_config_refuses_what_serve_refuses_with_exit_78_and_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let empty_token = dir.path().join("empty.token");
    std::fs::write(&empty_token, "\n").unwrap();
    let port = support::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let cases: Vec<(String, String)> = vec![
        (
            format!("[node]\nadmin_token_file = \"{}\"\n", dir.path().join("missing.token").display()),
            "missing.token".into(),
        ),
        (format!("[node]\nadmin_token_file = \"{}\"\n", empty_token.display()), "is empty".into()),
        (format!("[[disk]]\nname = \"d0\"\npath = \"{}\"\n", file.display()), "is not a directory".into()),
        (
            format!("[[disk]]\nname = \"d0\"\npath = \"{}\"\n", dir.path().join("no/such/dir").display()),
            "does not exist".into(),
        ),
    ];
    for (toml, expected) in cases {
        let config = dir.path().join("case.toml");
        std::fs::write(&config, &toml).unwrap();
        let config = config.to_str().unwrap();
        for command in ["check-config", "serve"] {
            let output = datanode(&[command, "--config", config, "--http-addr", &addr], &[]);
            let said = stderr(&output);
            assert_eq!(output.status.code(), Some(78), "{command} with {toml}: {said}");
            assert!(said.contains(&expected), "{command} with {toml}: {said}");
            assert_eq!(said.trim().lines().count(), 1, "{command}: one message: {said}");
        }
    }
    assert!(!dir.path().join("no").exists(), "nothing was created for a disk that cannot be");
    // A token file that others can read works, with a warning.
    let token = dir.path().join("open.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let config = dir.path().join("open.toml");
    std::fs::write(&config, format!("[node]\nadmin_token_file = \"{}\"\n", token.display())).unwrap();
    let output = datanode(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("readable by other users"), "{}", stderr(&output));
}

#[test]
fn a_port_in_use_is_found_before_anything_is_created_and_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("d0");
    let output = datanode(&["serve", "--data-dir", dir.to_str().unwrap(), "--http-addr", &addr], &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains(&addr), "names the address: {}", stderr(&output));
    assert!(!dir.join("partitions").exists(), "nothing bootstrapped");
}

/// A running `datanode serve` that the test drives itself (not waiting for
/// ready), killed on drop.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[&str], env: &[(&str, &str)]) -> Started {
    let child = Command::new(env!("CARGO_BIN_EXE_datanode"))
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Started(child)
}

#[test]
fn the_listener_opens_before_the_partitions_load_and_systemd_hears_of_a_long_load() {
    let data = tempfile::tempdir().unwrap();
    let socket_path = data.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(120))).unwrap();
    let heard = std::thread::spawn(move || {
        let mut messages = Vec::new();
        let mut buffer = [0u8; 256];
        while let Ok(n) = socket.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let ready = message == "READY=1";
            messages.push(message);
            if ready {
                break;
            }
        }
        messages
    });
    let port = support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = data.path().join("d0");
    // Creating 2000 partitions takes seconds: long enough to be seen loading.
    let mut node = start(
        &["--data-dir", dir.to_str().unwrap(), "--http-addr", &addr],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("DATANODE_NODE__BOOTSTRAP_PARTITIONS", "2000"),
            ("DATANODE_WAL__SEGMENT_SIZE", "64KiB"),
        ],
    );
    let url = |path: &str| format!("http://{addr}{path}");
    let mut saw_loading = false;
    support::wait_for("ready", std::time::Duration::from_secs(240), || {
        assert!(node.0.try_wait().unwrap().is_none(), "the node exited");
        let Ok(_) = std::net::TcpStream::connect(&addr) else { return false };
        let (status, body) = support::call(ureq::get(&url("/readyz")), None);
        if status == 503 {
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!((body["error"].as_str(), body["message"].as_str()), (Some("not_ready"), Some("loading")));
            if !saw_loading {
                // A write while loading is refused with the code clients
                // retry on: nothing was attempted.
                let (status, body) = support::call(ureq::put(&url("/v1/partitions/1/blobs/k")), Some(b"v"));
                assert_eq!((status, support::error_code(&body).as_str()), (503, "partition_unavailable"));
                let (status, body) = support::call(ureq::get(&url("/v1/disks")), None);
                assert_eq!((status, support::error_code(&body).as_str()), (503, "not_ready"));
                assert_eq!(support::call(ureq::get(&url("/healthz")), None).0, 200);
            }
            saw_loading = true;
        }
        status == 200
    });
    assert!(saw_loading, "/readyz said loading while the partitions loaded");
    let messages = heard.join().unwrap();
    assert_eq!(messages.last().map(String::as_str), Some("READY=1"), "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("EXTEND_TIMEOUT_USEC=")), "{messages:?}");
}

#[test]
fn a_bootstrap_interrupted_by_a_bad_disk_completes_at_the_next_start() {
    let data = tempfile::tempdir().unwrap();
    let (d0, d1) = (data.path().join("d0"), data.path().join("d1"));
    std::fs::create_dir_all(&d0).unwrap();
    std::fs::create_dir_all(&d1).unwrap();
    // d1 cannot take partitions: its partitions/ is a file.
    std::fs::write(d1.join("partitions"), "in the way").unwrap();
    let toml = support::config_with_disks(&[("d0", &d0), ("d1", &d1)], "");
    let config = data.path().join("datanode.toml");
    std::fs::write(&config, &toml).unwrap();
    let addr = format!("127.0.0.1:{}", support::free_port());
    let failed = datanode(&["serve", "--config", config.to_str().unwrap(), "--http-addr", &addr], &[]);
    assert_ne!(failed.status.code(), Some(0));
    std::fs::remove_file(d1.join("partitions")).unwrap();
    let daemon = support::Daemon::with_config(&toml, &[]);
    let ids: Vec<u64> =
        daemon.json("/v1/partitions").as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3, 4], "the bootstrap completed");
}

/// A node started with `args` (and `--http-addr`), its stdout (the log)
/// in a file, `RUST_LOG` unset so that `node.log_filter` decides; waits
/// until it is ready.
struct Logged {
    node: Started,
    addr: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Logged {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let addr = format!("127.0.0.1:{}", support::free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_datanode"))
            .args(["serve", "--http-addr", &addr])
            .args(args)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut logged = Logged { node: Started(child), addr, log, _dir: dir };
        support::wait_for("ready", std::time::Duration::from_secs(60), || {
            assert!(logged.node.0.try_wait().unwrap().is_none(), "exited: {}", logged.text());
            ureq::get(&logged.url("/readyz")).call().is_ok()
        });
        logged
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every line as JSON (each must be one object).
    fn lines(&self) -> Vec<serde_json::Value> {
        self.text().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.node.0.id() as i32, signal) }, 0);
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let mut status = None;
        support::wait_for("exit", std::time::Duration::from_secs(60), || {
            status = self.node.0.try_wait().unwrap();
            status.is_some()
        });
        status.and_then(|s| s.code())
    }
}

#[test]
fn sighup_reloads_what_can_change_and_keeps_serving() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("datanode.toml");
    let disk = data.path().join("d0");
    let write = |filter: &str, timeout: &str| {
        let disks = support::config_with_disks(&[("d0", &disk)], "");
        let text = format!("[node]\nlog_filter = \"{filter}\"\n[limits]\nrequest_timeout = \"{timeout}\"\n{disks}");
        std::fs::write(&config, text).unwrap();
    };
    write("warn", "30s");
    let mut node = Logged::start(&["--config", config.to_str().unwrap(), "--log-format", "json"], &[]);
    assert!(!node.text().contains("\"INFO\""), "the filter is warn: {}", node.text());
    write("info", "5s");
    node.signal(libc::SIGHUP);
    support::wait_for("the reload logged", std::time::Duration::from_secs(30), || {
        node.text().contains("SIGHUP: configuration reloaded")
    });
    let lines = node.lines();
    let pending =
        lines.iter().find(|l| l["message"] == "SIGHUP: these keys changed and take effect at the next restart");
    assert_eq!(pending.map(|l| l["keys"].clone()), Some(serde_json::json!(["limits.request_timeout"])), "{lines:?}");
    // INFO is logged now: the filter was applied.
    assert_eq!(support::call(ureq::put(&node.url("/v1/partitions/1/blobs/k")), Some(b"v")).0, 201);
    assert_eq!(support::call(ureq::post(&node.url("/v1/partitions/1/recover")), Some(b"")).0, 200);
    support::wait_for("an INFO line", std::time::Duration::from_secs(30), || node.text().contains("admin action"));
    // A configuration that does not load is refused, the node keeps going.
    std::fs::write(&config, "[wal]\ndurability = \"sometimes\"\n").unwrap();
    node.signal(libc::SIGHUP);
    support::wait_for("the refusal logged", std::time::Duration::from_secs(30), || {
        node.text().contains("the configuration does not load")
    });
    assert_eq!(support::call(ureq::get(&node.url("/healthz")), None).0, 200);
    node.signal(libc::SIGTERM);
    assert_eq!(node.wait_exit(), Some(0));
}

#[test]
fn logs_are_one_json_object_per_line_with_the_node_id_and_admin_actions() {
    let data = tempfile::tempdir().unwrap();
    let disk = data.path().join("d0");
    let token = data.path().join("admin.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = data.path().join("datanode.toml");
    let disks = support::config_with_disks(&[("d0", &disk)], "[health]\nprobe_interval = \"100ms\"\n");
    let text = format!("[node]\nid = \"dn-test\"\nadmin_token_file = \"{}\"\n{disks}", token.display());
    std::fs::write(&config, text).unwrap();
    let mut node = Logged::start(&["--config", config.to_str().unwrap(), "--log-format", "json"], &[]);
    let admin = |request: ureq::Request| request.set("Authorization", "Bearer s3cret");
    let read_only = |flag: bool| {
        let body = serde_json::json!({ "read_only": flag }).to_string();
        support::call(admin(ureq::post(&node.url("/v1/partitions/1/read-only"))), Some(body.as_bytes())).0
    };
    assert_eq!(read_only(true), 200);
    assert_eq!(read_only(false), 200);
    assert_eq!(support::call(ureq::post(&node.url("/v1/partitions/2/recover")), Some(b"")).0, 401);
    assert_eq!(support::call(admin(ureq::post(&node.url("/v1/partitions/2/recover"))), Some(b"")).0, 200);
    // A real fault, without root: the disk's probe cannot write its canary.
    let probe = disk.join(".datanode-probe");
    let _ = std::fs::remove_file(&probe);
    std::fs::create_dir(&probe).unwrap();
    support::wait_for("partition 3 faulted", std::time::Duration::from_secs(30), || {
        node.text().lines().any(|l| l.contains("\"partition faulted\"") && l.contains("\"partition\":3"))
    });
    node.signal(libc::SIGTERM);
    node.wait_exit();
    let lines = node.lines();
    assert!(lines.iter().all(|l| l["node"] == "dn-test"), "every line has the node id");
    let find = |message: &str, test: &dyn Fn(&serde_json::Value) -> bool| {
        lines.iter().find(|l| l["message"] == message && test(l)).cloned()
    };
    let read_only = find("partition read-only", &|l| l["partition"] == 1).expect("read-only logged");
    assert_eq!(read_only["level"], "WARN", "an operator's read-only is no error: {read_only}");
    assert_eq!(read_only["reasons"], serde_json::json!(["operator"]), "{read_only}");
    for (op, partition) in [("read_only", 1), ("recover", 2)] {
        let line = find("admin action", &|l| l["op"] == op && l["partition"] == partition);
        assert_eq!(line.map(|l| l["level"].clone()), Some("INFO".into()), "{op} logged");
    }
    let refused = find("admin call refused: no valid bearer token", &|l| l["op"] == "recover");
    assert_eq!(refused.map(|l| l["level"].clone()), Some("WARN".into()), "401 logged");
    let fault = find("partition faulted", &|l| l["partition"] == 3).unwrap();
    assert_eq!((fault["level"].as_str(), fault["disk"].as_str()), (Some("ERROR"), Some("d0")), "{fault}");
    assert!(fault["error"].is_string() && fault["cause"] == "disk_faulted", "{fault}");
    let raw = node.text();
    let raw_fault = raw.lines().find(|l| l.contains("\"partition faulted\"")).unwrap();
    assert_eq!(raw_fault.matches("\"message\"").count(), 1, "one message key: {raw_fault}");
}

#[test]
fn text_logs_start_with_the_node_id_and_systemd_gets_watchdog_pings() {
    let data = tempfile::tempdir().unwrap();
    let socket_path = data.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let disk = data.path().join("d0");
    let env = [
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
        ("DATANODE_NODE__ID", "dn-text"),
    ];
    let mut node = Logged::start(&["--data-dir", disk.to_str().unwrap(), "--log-format", "text"], &env);
    let mut pings = 0;
    let mut buffer = [0u8; 256];
    while pings < 3 {
        let n = socket.recv(&mut buffer).expect("a watchdog ping within 60 s");
        if &buffer[..n] == b"WATCHDOG=1" {
            pings += 1;
        }
    }
    node.signal(libc::SIGTERM);
    assert_eq!(node.wait_exit(), Some(0));
    let text = node.text();
    assert!(!text.is_empty() && text.lines().all(|l| l.starts_with("node=dn-text ")), "{text}");
}

#[test]
fn limits_are_checked_and_a_413_states_the_limit() {
    let data = tempfile::tempdir().unwrap();
    let daemon = support::Daemon::start(data.path(), &[], &[("DATANODE_LIMITS__MAX_BLOB_SIZE", "64KiB")]);
    let blob = daemon.url("/v1/partitions/1/blobs/big");
    for size in [(64 << 10) + 1, 2 << 20] {
        let (status, body) = support::call(ureq::put(&blob), Some(&vec![0u8; size]));
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, body["error"].as_str()), (413, Some("payload_too_large")), "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("limits.max_blob_size") && message.contains("64KiB"), "{size}: {message}");
    }
    for limit in ["0", "20000", "-1"] {
        let (status, body) =
            support::call(ureq::get(&daemon.url(&format!("/v1/partitions/1/blobs?limit={limit}"))), None);
        assert_eq!((status, support::error_code(&body).as_str()), (400, "bad_request"), "limit={limit}");
    }
}
