//! The real binary over real HTTP: the embedded default, every blob and
//! partition endpoint with its error codes, configuration and exit codes,
//! the admin token, bad input, restarts, and SIGTERM under load (S1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use support::{Daemon, call, error_code};

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

#[test]
fn the_embedded_default_bootstraps_four_healthy_partitions_on_d0() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    let (status, body) = call(ureq::get(&daemon.url("/v1/partitions")), None);
    assert_eq!(status, 200);
    let partitions = json_of(&body);
    let ids: Vec<u64> = partitions.as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    assert!(partitions.as_array().unwrap().iter().all(|p| p["state"] == "healthy" && p["disk"] == "d0"));
    assert!(data.path().join("partitions/1/PARTITION").exists(), "layout <disk>/partitions/<id>/");
    let (status, body) = call(ureq::get(&daemon.url("/v1/partitions?state=faulted")), None);
    assert_eq!((status, json_of(&body)), (200, json!([])));
    assert_eq!(call(ureq::get(&daemon.url("/healthz")), None).0, 200);
    let (_, metrics) = call(ureq::get(&daemon.url("/metrics")), None);
    let metrics = String::from_utf8(metrics).unwrap();
    for name in ["datanode_partition_state{", "datanode_partitions{", "datanode_build_info{", "datanode_disk_state{"] {
        assert!(metrics.contains(name), "missing {name}");
    }
}

#[test]
fn blobs_put_get_range_head_delete_and_list_with_their_error_codes() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[("DATANODE_LIMITS__MAX_BLOB_SIZE", "64KiB")]);
    let blob = |key: &str| daemon.url(&format!("/v1/partitions/2/blobs/{key}"));
    let (status, body) = call(ureq::put(&blob("dir/a.txt")), Some(b"0123456789"));
    assert_eq!(status, 201);
    assert_eq!(json_of(&body)["size"], 10);
    assert_eq!(call(ureq::get(&blob("dir/a.txt")), None), (200, b"0123456789".to_vec()));
    assert_eq!(call(ureq::get(&blob("dir/a.txt")).set("Range", "bytes=2-4"), None), (206, b"234".to_vec()));
    assert_eq!(call(ureq::get(&blob("dir/a.txt")).set("Range", "bytes=-3"), None), (206, b"789".to_vec()));
    let head = ureq::head(&blob("dir/a.txt")).call().unwrap();
    assert_eq!(head.header("content-length"), Some("10"));
    for key in ["dir/b", "dir/c", "other"] {
        assert_eq!(call(ureq::put(&blob(key)), Some(b"x")).0, 201);
    }
    let (status, body) = call(ureq::get(&daemon.url("/v1/partitions/2/blobs?prefix=dir/&limit=2")), None);
    assert_eq!(status, 200);
    assert_eq!(json_of(&body), json!({ "keys": ["dir/a.txt", "dir/b"], "next": "dir/b" }));
    let (_, body) = call(ureq::get(&daemon.url("/v1/partitions/2/blobs?prefix=dir/&after=dir/b")), None);
    assert_eq!(json_of(&body), json!({ "keys": ["dir/c"], "next": null }));
    assert_eq!(call(ureq::delete(&blob("dir/b")), None).0, 204);

    let cases: Vec<(ureq::Request, Option<Vec<u8>>, u16, &str)> = vec![
        (ureq::get(&blob("dir/b")), None, 404, "blob_not_found"),
        (ureq::delete(&blob("dir/b")), None, 404, "blob_not_found"),
        (ureq::get(&daemon.url("/v1/partitions/99/blobs/x")), None, 404, "partition_not_found"),
        (ureq::get(&daemon.url("/v1/partitions/abc/blobs/x")), None, 400, "bad_request"),
        (ureq::get(&blob("dir/a.txt")).set("Range", "bytes=20-30"), None, 416, "bad_range"),
        (ureq::get(&blob("dir/a.txt")).set("Range", "bytes=0-1,4-5"), None, 416, "bad_range"),
        (ureq::put(&blob("big")), Some(vec![7u8; 100 << 10]), 413, "payload_too_large"),
        (ureq::put(&blob(&"k".repeat(1025))), Some(b"x".to_vec()), 400, "bad_request"),
        (ureq::get(&daemon.url("/v1/partitions/2/blobs?limit=many")), None, 400, "bad_request"),
        (ureq::get(&daemon.url("/v1/partitions?state=sleepy")), None, 400, "bad_request"),
        (ureq::get(&daemon.url("/no/such/thing")), None, 404, "not_found"),
    ];
    for (request, body, status, code) in cases {
        let what = format!("{} {}", request.method(), request.url());
        let (got, body) = call(request, body.as_deref());
        assert_eq!((got, error_code(&body)), (status, code.to_string()), "{what}");
    }
    assert_eq!(call(ureq::get(&daemon.url("/healthz")), None).0, 200, "still alive after bad input");
}

#[test]
fn keys_are_arbitrary_bytes_and_malformed_paths_get_json_errors() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    // The key bytes 0xff 0x00 0x2f ("/"), percent-encoded.
    let raw = daemon.url("/v1/partitions/1/blobs/%FF%00%2F");
    assert_eq!(call(ureq::put(&raw), Some(b"binary key")).0, 201);
    assert_eq!(call(ureq::get(&raw), None), (200, b"binary key".to_vec()));
    let (_, body) = call(ureq::get(&daemon.url("/v1/partitions/1/blobs")), None);
    assert_eq!(json_of(&body)["keys"], json!([{ "base64": "/wAv" }]));
    for (request, status, code) in [
        (ureq::get(&daemon.url("/v1/partitions/1/blobs/%ZZ")), 400, "bad_request"),
        (ureq::post(&daemon.url("/v1/partitions/1/blobs/x")), 405, "method_not_allowed"),
        (ureq::get(&daemon.url("/v1/partitions/%FF")), 400, "bad_request"),
    ] {
        let what = format!("{} {}", request.method(), request.url());
        let (got, body) = call(request, None);
        assert_eq!((got, error_code(&body)), (status, code.to_string()), "{what}");
    }
}

#[test]
fn a_body_over_the_default_16mib_limit_gets_the_json_413() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    let (status, body) = call(ureq::put(&daemon.url("/v1/partitions/1/blobs/huge")), Some(&vec![1u8; (16 << 20) + 1]));
    assert_eq!((status, error_code(&body).as_str()), (413, "payload_too_large"));
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/1/blobs/max")), Some(&vec![1u8; 16 << 20])).0, 201);
}

#[test]
fn admin_endpoints_need_the_token_and_reject_bad_bodies() {
    let data = tempfile::tempdir().unwrap();
    let token_file = data.path().join("admin.token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let config = data.path().join("datanode.toml");
    let mut file = std::fs::File::create(&config).unwrap();
    writeln!(file, "[node]\nadmin_token_file = {:?}\nbootstrap_partitions = 1", token_file.to_str().unwrap()).unwrap();
    let daemon = Daemon::start(&data.path().join("d"), &["--config", config.to_str().unwrap()], &[]);
    let create = || ureq::post(&daemon.url("/v1/partitions")).set("Content-Type", "application/json");
    let (status, body) = call(create(), Some(br#"{"id":7,"disk":"d0"}"#));
    assert_eq!((status, error_code(&body).as_str()), (401, "unauthorized"));
    let admin = || create().set("Authorization", "Bearer s3cret");
    assert_eq!(call(admin(), Some(br#"{"id":7,"disk":"d0"}"#)).0, 201);
    for (body, status, code) in [
        (&br#"{"id":7,"disk":"d0"}"#[..], 409, "partition_exists"),
        (br#"{"id":8,"disk":"d0","color":"red"}"#, 400, "bad_request"),
        (br#"{"id":8"#, 400, "bad_request"),
        (br#"{"id":8,"disk":"d9"}"#, 400, "unknown_disk"),
    ] {
        let (got, response) = call(admin(), Some(body));
        assert_eq!((got, error_code(&response).as_str()), (status, code), "{}", String::from_utf8_lossy(body));
    }
    let read_only = |flag: bool| {
        let request = ureq::post(&daemon.url("/v1/partitions/7/read-only")).set("Authorization", "Bearer s3cret");
        let (status, body) = call(request, Some(json!({ "read_only": flag }).to_string().as_bytes()));
        assert_eq!(status, 200);
        json_of(&body)
    };
    assert_eq!(read_only(true)["state"], "read_only");
    let (status, body) = call(ureq::put(&daemon.url("/v1/partitions/7/blobs/k")), Some(b"v"));
    assert_eq!((status, error_code(&body).as_str()), (503, "partition_read_only"));
    read_only(false);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/7/blobs/k")), Some(b"v")).0, 201);

    // A snapshot of 7 is refused by another partition, and restores 7.
    let image = call(ureq::get(&daemon.url("/v1/partitions/7/snapshot")).set("Authorization", "Bearer s3cret"), None);
    assert_eq!(image.0, 200);
    assert_eq!(call(admin(), Some(br#"{"id":8,"disk":"d0"}"#)).0, 201);
    let install = ureq::put(&daemon.url("/v1/partitions/8/snapshot")).set("Authorization", "Bearer s3cret");
    let (status, body) = call(install, Some(&image.1));
    assert_eq!((status, error_code(&body).as_str()), (400, "bad_snapshot"));
    assert_eq!(call(ureq::delete(&daemon.url("/v1/partitions/7/blobs/k")), None).0, 204);
    let install = ureq::put(&daemon.url("/v1/partitions/7/snapshot")).set("Authorization", "Bearer s3cret");
    assert_eq!(call(install, Some(&image.1)).0, 200);
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/7/blobs/k")), None), (200, b"v".to_vec()));
    let damaged = ureq::put(&daemon.url("/v1/partitions/8/snapshot")).set("Authorization", "Bearer s3cret");
    let (status, body) = call(damaged, Some(&image.1[..image.1.len() - 1]));
    assert_eq!((status, error_code(&body).as_str()), (400, "bad_snapshot"));

    let delete = ureq::delete(&daemon.url("/v1/partitions/8")).set("Authorization", "Bearer s3cret");
    assert_eq!(call(delete, None).0, 204);
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/8")), None).0, 404);
}

#[test]
fn configuration_errors_exit_78_usage_errors_2_and_check_config_prints_the_effective_config() {
    let binary = env!("CARGO_BIN_EXE_datanode");
    let dir = tempfile::tempdir().unwrap();
    let open =
        Command::new(binary).args(["--http-addr", "0.0.0.0:7999", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert_eq!(open.status.code(), Some(78), "non-loopback without a token");
    let bad = Command::new(binary).arg("check-config").env("DATANODE_WAL__DURABILITY", "maybe").output().unwrap();
    assert_eq!(bad.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("durability"));
    assert_eq!(Command::new(binary).arg("--no-such-flag").output().unwrap().status.code(), Some(2));
    let version = Command::new(binary).arg("--version").output().unwrap();
    assert!(version.status.success() && String::from_utf8_lossy(&version.stdout).starts_with("datanode 0."));
    let effective =
        Command::new(binary).arg("check-config").env("DATANODE_LIMITS__MAX_BLOB_SIZE", "64KiB").output().unwrap();
    assert!(effective.status.success());
    let text = String::from_utf8(effective.stdout).unwrap();
    assert!(text.contains("max_blob_size = \"64KiB\"") && text.contains("http_addr = \"127.0.0.1:7070\""), "{text}");
}

#[test]
fn garbage_on_the_socket_does_not_disturb_the_node() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    for junk in [
        &b"\x00\x01\x02garbage\r\n\r\n"[..],
        b"PUT /v1/partitions/1/blobs/x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\nshort",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
        let _ = socket.write_all(junk);
        drop(socket);
    }
    assert_eq!(call(ureq::get(&daemon.url("/healthz")), None).0, 200);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/1/blobs/ok")), Some(b"fine")).0, 201);
}

/// S1 (ChubaoFS): shutdown closed the store while writes were still being
/// applied. Here writers run while SIGTERM arrives, cycle after cycle: the
/// exit is clean, and every acknowledged write is there after a restart.
#[test]
fn s1_sigterm_under_load() {
    let data = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(data.path(), &[], &[]);
    let mut acked: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for cycle in 0..5 {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let (url, stop, got) = (daemon.url(""), Arc::clone(&stop), Arc::clone(&got));
                std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(30)).build();
                    for seq in 0.. {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        let key = format!("c{cycle}-w{w}-{seq}");
                        let value = key.repeat(10).into_bytes();
                        let partition = 1 + (seq % 4);
                        let put = agent.put(&format!("{url}/v1/partitions/{partition}/blobs/{key}"));
                        match put.send_bytes(&value) {
                            Ok(response) if response.status() == 201 => got.lock().unwrap().push((key, value)),
                            // 503 shutting_down and closed connections are fine:
                            // those writes were not acknowledged.
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        support::wait_for("acknowledged writes", std::time::Duration::from_secs(60), || {
            got.lock().unwrap().len() >= 50
        });
        let status = daemon.terminate();
        stop.store(true, Ordering::Release);
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(status.code(), Some(0), "cycle {cycle}: clean exit");
        acked.extend(got.lock().unwrap().drain(..));
        daemon.restart();
        for (key, value) in &acked {
            let partition = 1 + key.rsplit('-').next().unwrap().parse::<u64>().unwrap() % 4;
            let (status, body) = call(ureq::get(&daemon.url(&format!("/v1/partitions/{partition}/blobs/{key}"))), None);
            assert_eq!((status, &body), (200, value), "cycle {cycle}: acknowledged {key} lost");
        }
    }
}

/// A stand-in Alertmanager: records the bodies POSTed to it.
fn fake_alertmanager() -> (u16, Arc<Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_ok()
                && let Ok(value) = serde_json::from_slice::<Value>(&body)
            {
                store.lock().unwrap().push(value);
            }
            let _ = reader.into_inner().write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, received)
}

#[test]
fn state_changes_are_pushed_to_alertmanager_and_resolved() {
    let (port, received) = fake_alertmanager();
    let data = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let daemon = Daemon::start(data.path(), &[], &[("DATANODE_ALERTS__ALERTMANAGER_URL", &url)]);
    let read_only = |flag: bool| {
        let request = ureq::post(&daemon.url("/v1/partitions/1/read-only"));
        assert_eq!(call(request, Some(json!({ "read_only": flag }).to_string().as_bytes())).0, 200);
    };
    let pushed = |resolved: bool| {
        received.lock().unwrap().iter().flat_map(|batch| batch.as_array().cloned().unwrap_or_default()).any(|alert| {
            alert["labels"]["alertname"] == "DatanodePartitionReadOnly"
                && alert["labels"]["partition"] == "1"
                && alert["labels"]["disk"] == "d0"
                && alert.get("endsAt").is_some() == resolved
        })
    };
    read_only(true);
    support::wait_for("the firing alert pushed", std::time::Duration::from_secs(60), || pushed(false));
    read_only(false);
    support::wait_for("the resolved alert pushed", std::time::Duration::from_secs(60), || pushed(true));
}

#[test]
fn status_prints_partitions_and_disks_of_a_running_node() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/3/blobs/k")), Some(b"v")).0, 201);
    let output =
        Command::new(env!("CARGO_BIN_EXE_datanode")).args(["status", "--url", &daemon.url("")]).output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("PARTITION") && lines.len() >= 8, "{text}");
    let three: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(&three[..5], ["3", "d0", "healthy", "-", "1"], "{text}");
    assert!(text.contains("\nDISK") && text.lines().any(|l| l.starts_with("d0") && l.contains("healthy")), "{text}");
    let unreachable =
        Command::new(env!("CARGO_BIN_EXE_datanode")).args(["status", "--url", "http://127.0.0.1:1"]).output().unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
}

#[test]
fn systemd_is_told_ready_after_load_and_stopping_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let socket_path = data.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let mut daemon = Daemon::start(&data.path().join("d"), &[], &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    let mut message = [0u8; 64];
    let n = socket.recv(&mut message).unwrap();
    assert_eq!(&message[..n], b"READY=1");
    assert_eq!(daemon.terminate().code(), Some(0));
    let n = socket.recv(&mut message).unwrap();
    assert_eq!(&message[..n], b"STOPPING=1");
}

#[test]
fn bench_puts_and_gets_against_a_node_and_reports_json() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    // `datanode bench` for one second with `args`, as JSON.
    let bench = |args: &[&str]| -> Value {
        let output = Command::new(env!("CARGO_BIN_EXE_datanode"))
            .args(["bench", "--url", &daemon.url(""), "--duration", "1s", "--warmup", "0s", "--json", "--quiet"])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let result = bench(&["--connections", "4", "--partitions", "1-4", "--keys", "20", "--value-size", "1KiB"]);
    for op in ["put", "get"] {
        assert!(result[op]["ops"].as_u64().unwrap() > 0, "{result}");
        assert_eq!(result[op]["errors"], json!({}), "{result}");
        let (p50, p999) = (result[op]["p50_ms"].as_f64().unwrap(), result[op]["p999_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p999, "{result}");
    }
    let (status, _) = call(ureq::get(&daemon.url("/v1/partitions/3/blobs/bench-7")), None);
    assert_eq!(status, 200, "the prefill wrote every key");

    let result = bench(&["--connections", "2", "--partitions", "1", "--rate", "100", "--put-ratio", "1"]);
    assert_eq!(result["rate"], 100.0, "{result}");
    assert!(result["put"]["ops"].as_u64().unwrap() > 0, "{result}");
}
