//! The edges of the HTTP surface on the real binary: binary keys in
//! listings, key and partition-id validation, configuration that cannot
//! work, slow and broken clients (raw TCP where a real client cannot
//! misbehave enough), shutdown with stalled connections, and admin calls
//! whose answer must match what they did.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use support::{Daemon, call, error_code};

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

/// A raw connection to the node, with a read timeout so that a test fails
/// instead of hanging.
fn connect(daemon: &Daemon) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

/// One response read off a raw connection: status, lower-cased head and
/// body (by `Content-Length`). `None` when the node closed the connection
/// before answering.
fn read_response(stream: &mut TcpStream) -> Option<(u16, String, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) => bytes.push(byte[0]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(error) => panic!("no answer and no close: {error}"),
        }
    }
    let head = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    Some((status, head, body))
}

/// Whether the node closes `stream` (EOF or reset) with nothing more
/// to say, within the stream's read timeout.
fn closed_by_node(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 "),
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Every byte percent-encoded: any key can go into a path or a query.
fn percent(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// A listed key (`"text"` or `{"base64": ...}`) back to its bytes.
fn key_bytes(key: &Value) -> Vec<u8> {
    match key {
        Value::String(text) => text.as_bytes().to_vec(),
        other => base64::engine::general_purpose::STANDARD.decode(other["base64"].as_str().unwrap()).unwrap(),
    }
}

/// Pages through `GET .../blobs?prefix=P&limit=N`, passing each `next`
/// back as `after`; panics if it does not end within `max_pages`.
fn list_all(daemon: &Daemon, partition: u64, prefix: &[u8], limit: usize, max_pages: usize) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    for _ in 0..max_pages {
        let mut url = format!("/v1/partitions/{partition}/blobs?limit={limit}&prefix={}", percent(prefix));
        if let Some(after) = &after {
            url.push_str(&format!("&after={}", percent(after)));
        }
        let (status, body) = call(ureq::get(&daemon.url(&url)), None);
        assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
        let page = json_of(&body);
        keys.extend(page["keys"].as_array().unwrap().iter().map(key_bytes));
        match &page["next"] {
            Value::Null => return keys,
            next => after = Some(key_bytes(next)),
        }
    }
    panic!("listing {prefix:?} did not end within {max_pages} pages; so far {keys:?}");
}

#[test]
fn binary_keys_are_prefixes_and_resume_points_and_paging_ends() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    let stored: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"a+b".to_vec(),
        vec![0xff],
        vec![0xff, 0x01],
        vec![0xff, 0x02],
        vec![0xfe, 0xff],
        b"z".to_vec(),
    ];
    for key in &stored {
        let url = daemon.url(&format!("/v1/partitions/1/blobs/{}", percent(key)));
        assert_eq!(call(ureq::put(&url), Some(b"v")).0, 201, "{key:?}");
    }
    let (status, body) = call(ureq::get(&daemon.url("/v1/partitions/1/blobs?prefix=%FF")), None);
    assert_eq!(status, 200);
    let keys: Vec<Vec<u8>> = json_of(&body)["keys"].as_array().unwrap().iter().map(key_bytes).collect();
    assert_eq!(keys, vec![vec![0xff], vec![0xff, 0x01], vec![0xff, 0x02]], "a binary prefix");
    let (_, body) = call(ureq::get(&daemon.url("/v1/partitions/1/blobs?after=%FF&limit=1")), None);
    assert_eq!(key_bytes(&json_of(&body)["keys"][0]), vec![0xff, 0x01], "a binary resume point");
    let (_, body) = call(ureq::get(&daemon.url("/v1/partitions/1/blobs?prefix=a%2B")), None);
    assert_eq!(json_of(&body)["keys"], serde_json::json!(["a+b"]), "%2B is a plus");

    let mut sorted = stored.clone();
    sorted.sort();
    for limit in [1, 2, 3, 10] {
        let listed = list_all(&daemon, 1, b"", limit, 20);
        assert_eq!(listed, sorted, "limit {limit}: every key once, in order");
        let listed = list_all(&daemon, 1, &[0xff], limit, 20);
        assert_eq!(listed.len(), 3, "limit {limit}");
        assert_eq!(listed.iter().collect::<BTreeSet<_>>().len(), 3);
    }
    // The last key of a page is `next` whatever it looks like.
    let (_, body) = call(ureq::get(&daemon.url("/v1/partitions/1/blobs?prefix=%FF&limit=2")), None);
    assert_eq!(key_bytes(&json_of(&body)["next"]), vec![0xff, 0x01]);

    for bad in ["limit=0", "limit=10001", "limit=-1", "limit=many", "after=%G1", "prefix=%F", "colour=red"] {
        let (status, body) = call(ureq::get(&daemon.url(&format!("/v1/partitions/1/blobs?{bad}"))), None);
        assert_eq!((status, error_code(&body).as_str()), (400, "bad_request"), "{bad}");
    }
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/1/blobs?limit=10000")), None).0, 200);
}

#[test]
fn keys_are_1_to_1024_bytes_on_every_method() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    let long = daemon.url(&format!("/v1/partitions/1/blobs/{}", "k".repeat(2000)));
    let longest = daemon.url(&format!("/v1/partitions/1/blobs/{}", "k".repeat(1024)));
    let empty = daemon.url("/v1/partitions/1/blobs/");
    assert_eq!(call(ureq::put(&longest), Some(b"v")).0, 201, "1024 bytes is a key");
    assert_eq!(call(ureq::get(&longest), None), (200, b"v".to_vec()));
    for url in [&long, &empty] {
        for (request, body) in [(ureq::get(url), None), (ureq::put(url), Some(&b"v"[..])), (ureq::delete(url), None)] {
            let what = format!("{} {}", request.method(), &request.url()[..60.min(request.url().len())]);
            let (status, body) = call(request, body);
            assert_eq!((status, error_code(&body).as_str()), (400, "bad_request"), "{what}");
        }
        let head = match ureq::head(url).call() {
            Ok(response) => response.status(),
            Err(ureq::Error::Status(status, _)) => status,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(head, 400, "HEAD");
    }
}

#[test]
fn partition_ids_in_paths_are_canonical_decimal() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/1/blobs/k")), Some(b"v")).0, 201);
    for path in [
        "/v1/partitions/007",
        "/v1/partitions/01/blobs/k",
        "/v1/partitions/+1/blobs/k",
        "/v1/partitions/001/blobs",
        "/v1/partitions/18446744073709551616",
    ] {
        let (status, body) = call(ureq::get(&daemon.url(path)), None);
        assert_eq!((status, error_code(&body).as_str()), (400, "bad_request"), "{path}");
    }
    let (status, body) = call(ureq::put(&daemon.url("/v1/partitions/01/blobs/k")), Some(b"w"));
    assert_eq!((status, error_code(&body).as_str()), (400, "bad_request"), "PUT to 01");
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/1/blobs/k")), None), (200, b"v".to_vec()));
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/0")), None).0, 404, "0 is canonical, and absent");
}

/// Every value that cannot work is refused at load, by `check-config` and
/// by `serve` alike, with exit 78 and a message naming key and value.
#[test]
fn configuration_that_cannot_work_is_refused_naming_key_and_value() {
    let binary = env!("CARGO_BIN_EXE_datanode");
    let data = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("DATANODE_WAL__MAX_BATCH_BYTES", "0", "wal.max_batch_bytes"),
        ("DATANODE_WAL__MAX_BATCH_BYTES", "128MiB", "wal.max_batch_bytes"),
        ("DATANODE_WAL__SEGMENT_SIZE", "4KiB", "wal.segment_size"),
        ("DATANODE_WAL__SEGMENT_SIZE", "1TiB", "wal.segment_size"),
        ("DATANODE_WAL__SYNC_INTERVAL", "0s", "wal.sync_interval"),
        ("DATANODE_HEALTH__PROBE_INTERVAL", "0s", "health.probe_interval"),
        ("DATANODE_HEALTH__VERIFY_INTERVAL", "0s", "health.verify_interval"),
        ("DATANODE_HEALTH__SLOW_SYNC", "0s", "health.slow_sync"),
        ("DATANODE_HEALTH__PROBE_INTERVAL", "1000000s", "health.probe_interval"),
        ("DATANODE_HEALTH__DISK_FULL_RATIO", "1.5", "health.disk_full_ratio"),
        ("DATANODE_HEALTH__DISK_RESUME_RATIO", "0.97", "health.disk_resume_ratio"),
        ("DATANODE_HEALTH__DISK_RESUME_RATIO", "-0.5", "health.disk_resume_ratio"),
        ("DATANODE_NODE__SHUTDOWN_TIMEOUT", "0s", "node.shutdown_timeout"),
        ("DATANODE_NODE__BOOTSTRAP_PARTITIONS", "100000000", "node.bootstrap_partitions"),
        ("DATANODE_LIMITS__REQUEST_TIMEOUT", "0s", "limits.request_timeout"),
        ("DATANODE_LIMITS__MAX_BLOB_SIZE", "0", "limits.max_blob_size"),
        ("DATANODE_LIMITS__MAX_QUEUED_BYTES_PER_PARTITION", "0", "limits.max_queued_bytes_per_partition"),
        ("DATANODE_LIMITS__MAX_QUEUED_BYTES_PER_PARTITION", "64GiB", "limits.max_queued_bytes_per_partition"),
        ("DATANODE_ALERTS__ALERTMANAGER_URL", "localhost:9093", "alerts.alertmanager_url"),
        // Overflows the duration arithmetic.
        ("DATANODE_NODE__SHUTDOWN_TIMEOUT", "307445734561825861m", "node.shutdown_timeout"),
    ];
    for (variable, value, key) in cases {
        let checked = std::process::Command::new(binary).arg("check-config").env(variable, value).output().unwrap();
        let stderr = String::from_utf8_lossy(&checked.stderr);
        assert_eq!(checked.status.code(), Some(78), "check-config {variable}={value}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains(value), "{variable}={value} names key and value: {stderr}");
        let served = std::process::Command::new(binary)
            .args(["--http-addr", &format!("127.0.0.1:{}", support::free_port()), "--data-dir"])
            .arg(data.path())
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(served.status.code(), Some(78), "serve {variable}={value}");
    }
}

/// A client that sends half a request head, one whose body stalls after
/// the head, and one idle keep-alive connection: on SIGTERM the node closes
/// them all, exits 0 well within `shutdown_timeout`, and what it
/// acknowledged before is there after a restart.
#[test]
fn sigterm_with_stalled_clients_exits_0_promptly_and_keeps_the_data() {
    let data = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(data.path(), &[], &[("DATANODE_NODE__SHUTDOWN_TIMEOUT", "20s")]);
    for i in 0..20 {
        let url = daemon.url(&format!("/v1/partitions/{}/blobs/before-{i}", 1 + i % 4));
        assert_eq!(call(ureq::put(&url), Some(format!("value {i}").as_bytes())).0, 201);
    }
    let mut half_head = connect(&daemon);
    half_head.write_all(b"GET /v1/partitions/1/blobs/before-0 HTTP/1.1\r\nHost: x\r\nAcc").unwrap();
    let mut stalled_body = connect(&daemon);
    stalled_body
        .write_all(
            b"PUT /v1/partitions/1/blobs/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
    // `100 Continue` means the handler is waiting for the body.
    let (status, _, _) = read_response(&mut stalled_body).unwrap();
    assert_eq!(status, 100);
    stalled_body.write_all(b"0123456789").unwrap();
    let mut idle = connect(&daemon);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut idle).unwrap().0, 200);

    let started = Instant::now();
    let status = daemon.terminate();
    let took = started.elapsed();
    eprintln!("SIGTERM to exit with stalled clients: {took:?}");
    assert_eq!(status.code(), Some(0), "clean exit despite stalled clients after {took:?}: {}", daemon.log());
    assert!(took < Duration::from_secs(10), "the drain took {took:?}; stalled clients held it up");
    for stream in [&mut half_head, &mut stalled_body, &mut idle] {
        assert!(closed_by_node(stream), "every connection is closed");
    }
    daemon.restart();
    for i in 0..20 {
        let url = daemon.url(&format!("/v1/partitions/{}/blobs/before-{i}", 1 + i % 4));
        assert_eq!(call(ureq::get(&url), None), (200, format!("value {i}").into_bytes()), "before-{i} is durable");
    }
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/1/blobs/stalled")), None).0, 404, "never acknowledged");
}

/// While serving, a request head that does not arrive within
/// `header_timeout` closes its connection, a body that stalls that long
/// breaks off with a JSON 400, and the node keeps serving everyone else.
#[test]
fn slow_clients_are_cut_off_after_header_timeout() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[("DATANODE_LIMITS__HEADER_TIMEOUT", "1s")]);
    let mut silent = connect(&daemon);
    let mut half_head = connect(&daemon);
    half_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut stalled_body = connect(&daemon);
    stalled_body
        .write_all(b"PUT /v1/partitions/1/blobs/stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .unwrap();
    let started = Instant::now();
    assert!(closed_by_node(&mut silent), "a connection that says nothing is closed");
    assert!(closed_by_node(&mut half_head), "half a head is closed");
    let (status, _, body) = read_response(&mut stalled_body).expect("an answer to the stalled body");
    assert_eq!((status, error_code(&body).as_str()), (400, "bad_request"));
    assert!(String::from_utf8_lossy(&body).contains("broke off"), "{}", String::from_utf8_lossy(&body));
    assert!(started.elapsed() < Duration::from_secs(10), "cut off after {:?}", started.elapsed());
    assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/1/blobs/stalled")), None).0, 404, "nothing written");
    assert_eq!(call(ureq::get(&daemon.url("/healthz")), None).0, 200);
}

/// A body that breaks off (the client stops sending mid-body) is 400
/// `bad_request`, never 413: that is only for a body that is too large.
/// An install whose image broke off changes nothing.
#[test]
fn a_body_that_breaks_off_is_400_and_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/1/blobs/k")), Some(b"old")).0, 201);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/2/blobs/k")), Some(b"new")).0, 201);
    let (status, image) = call(ureq::get(&daemon.url("/v1/partitions/2/snapshot")), None);
    assert_eq!(status, 200);
    for (what, head, body) in [
        ("put", "PUT /v1/partitions/1/blobs/k".to_string(), b"0123456789".to_vec()),
        ("install", "PUT /v1/partitions/1/snapshot".to_string(), image[..image.len() / 2].to_vec()),
    ] {
        let mut stream = connect(&daemon);
        let length = if what == "put" { 100 } else { image.len() };
        write!(stream, "{head} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n").unwrap();
        stream.write_all(&body).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let (status, _, body) = read_response(&mut stream).expect("an answer");
        assert_eq!(
            (status, error_code(&body).as_str()),
            (400, "bad_request"),
            "{what}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(call(ureq::get(&daemon.url("/v1/partitions/1/blobs/k")), None), (200, b"old".to_vec()), "{what}");
    }
}

/// Install and recover are not cut off by `request_timeout` once they
/// change anything: an install whose image arrives slowly (longer than
/// `request_timeout`) answers 200 and the contents are replaced; a
/// recover that takes longer answers 200. What an admin call answers is
/// what it did.
#[test]
fn slow_admin_calls_answer_their_real_outcome() {
    let data = tempfile::tempdir().unwrap();
    // Written with the default request_timeout, so that a slow fsync on a
    // busy machine cannot fail the setup.
    let mut writer = Daemon::start(data.path(), &[], &[]);
    for i in 0..64 {
        let url = writer.url(&format!("/v1/partitions/1/blobs/k{i}"));
        assert_eq!(call(ureq::put(&url), Some(&vec![i as u8; 1024])).0, 201);
    }
    // An image of partition 1 (an image restores only its own partition).
    let (_, image) = call(ureq::get(&writer.url("/v1/partitions/1/snapshot")), None);
    assert_eq!(call(ureq::put(&writer.url("/v1/partitions/1/blobs/k0")), Some(b"old")).0, 201);
    assert_eq!(writer.terminate().code(), Some(0));
    let daemon = Daemon::start(data.path(), &[], &[("DATANODE_LIMITS__REQUEST_TIMEOUT", "1s")]);
    let mut stream = connect(&daemon);
    write!(stream, "PUT /v1/partitions/1/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", image.len())
        .unwrap();
    let started = Instant::now();
    // About 20 KB/s: the upload takes longer than request_timeout.
    for chunk in image.chunks(1024) {
        stream.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _, body) = read_response(&mut stream).expect("an answer");
    assert!(started.elapsed() > Duration::from_secs(1), "the upload outlasted request_timeout");
    let replaced = call(ureq::get(&daemon.url("/v1/partitions/1/blobs/k0")), None) == (200, vec![0u8; 1024]);
    assert!(replaced, "the install completed");
    assert_eq!(status, 200, "so it answers success: {}", String::from_utf8_lossy(&body));
    drop(daemon);

    // A recover (reopen, replay, verify, sync) takes longer than 10 ms.
    let daemon = Daemon::start(data.path(), &[], &[("DATANODE_LIMITS__REQUEST_TIMEOUT", "10ms")]);
    let (status, body) = daemon.recover(1);
    assert_eq!(status, 200, "recover answers its outcome: {body}");
    assert_eq!(body["state"], "healthy");
}

/// The state letter of a process in `/proc/PID/stat` (`Z` once it has
/// exited while a thread of it is still stuck in the kernel), or `None`
/// once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

/// A hung fdatasync (and a read stuck on the same files) at shutdown:
/// past `shutdown_timeout` the process exits 1 whatever is stuck; it does
/// not wait for the stuck threads, and it never exits 0.
#[test]
fn a_hung_sync_at_shutdown_exits_1_after_shutdown_timeout() {
    use support::fuse::{Action, FuseDir, Op, Rules};
    if support::disks::unavailable(&["fusermount3"]).is_some() {
        return;
    }
    let d0 = FuseDir::new();
    let settings =
        "[node]\nshutdown_timeout = \"2s\"\nbootstrap_partitions = 2\n\n[limits]\nrequest_timeout = \"1s\"\n";
    let mut daemon = Daemon::with_config(&support::config_with_disks(&[("d0", d0.path())], settings), &[]);
    let _release = d0.rules.cleared_on_drop();
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/1/blobs/k")), Some(&vec![7u8; 64 << 10])).0, 201);
    support::disks::drop_page_cache();
    d0.rules.add_on(Op::Sync, "partitions/1/", Rules::everywhere(), Action::Hang);
    d0.rules.add_on(Op::Read, "partitions/1/", Rules::everywhere(), Action::Hang);
    // A write stuck in its sync, and a read stuck on a blocking thread.
    let (status, body) = call(ureq::put(&daemon.url("/v1/partitions/1/blobs/w")), Some(b"x"));
    assert_eq!((status, error_code(&body).as_str()), (500, "write_outcome_unknown"));
    let (status, body) = call(ureq::get(&daemon.url("/v1/partitions/1/blobs/k")), None);
    assert_eq!((status, error_code(&body).as_str()), (503, "timeout"), "the read is stuck");

    let pid = daemon.pid().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let took = support::wait_for("the process to exit despite the hung sync", Duration::from_secs(20), || {
        process_state(pid).is_none_or(|state| state == 'Z')
    });
    eprintln!("SIGTERM to exit with a hung sync: {took:?}");
    assert!(took >= Duration::from_secs(2), "not before shutdown_timeout");
    // Released, the stuck threads end and the exit status can be collected.
    d0.rules.clear();
    assert_eq!(daemon.terminate().code(), Some(1), "a shutdown that did not close every partition is not clean");
}

/// Reads stuck on a hung disk hold at most `max_blocking_per_disk`
/// blocking threads: beyond that, that disk's reads answer 503 at once
/// (safe to retry), the other disk's reads are served, and the disks are
/// still probed.
#[test]
fn a_hung_disk_holds_at_most_its_bound_of_blocking_threads() {
    use support::fuse::{Action, FuseDir, Op, Rules};
    if support::disks::unavailable(&["fusermount3"]).is_some() {
        return;
    }
    let d0 = FuseDir::new();
    let d1 = tempfile::tempdir().unwrap();
    let settings =
        "[health]\nprobe_interval = \"200ms\"\n\n[limits]\nrequest_timeout = \"1s\"\nmax_blocking_per_disk = 3\n";
    let daemon =
        Daemon::with_config(&support::config_with_disks(&[("d0", d0.path()), ("d1", d1.path())], settings), &[]);
    let _release = d0.rules.cleared_on_drop();
    // Partitions 1 and 3 live on d0, 2 and 4 on d1.
    for p in 1..=4 {
        for i in 0..5 {
            let url = daemon.url(&format!("/v1/partitions/{p}/blobs/k{i}"));
            assert_eq!(call(ureq::put(&url), Some(&vec![p as u8; 64 << 10])).0, 201);
        }
    }
    support::disks::drop_page_cache();
    d0.rules.add_on(Op::Read, "partitions/", Rules::everywhere(), Action::Hang);
    for i in 0..3 {
        let (status, body) = call(ureq::get(&daemon.url(&format!("/v1/partitions/1/blobs/k{i}"))), None);
        assert_eq!((status, error_code(&body).as_str()), (503, "timeout"), "read {i} is stuck");
    }
    let probed = |disk: &str| -> String {
        let disks = daemon.json("/v1/disks");
        let found = disks.as_array().into_iter().flatten().find(|d| d["name"] == disk).cloned();
        found.map(|d| d["last_probe"]["at"].to_string()).unwrap_or_default()
    };
    let last_probe = probed("d0");
    for p in [1, 3] {
        let started = Instant::now();
        let (status, body) = call(ureq::get(&daemon.url(&format!("/v1/partitions/{p}/blobs/k4"))), None);
        let took = started.elapsed();
        assert_eq!((status, error_code(&body).as_str()), (503, "partition_unavailable"), "partition {p} on d0");
        assert!(took < Duration::from_millis(500), "refused at once, not after request_timeout: {took:?}");
    }
    for p in [2, 4] {
        let (status, body) = call(ureq::get(&daemon.url(&format!("/v1/partitions/{p}/blobs/k4"))), None);
        assert_eq!((status, body), (200, vec![p as u8; 64 << 10]), "partition {p} on d1 is served");
    }
    support::wait_for("d0 probed again", Duration::from_secs(10), || probed("d0") != last_probe);
    d0.rules.clear();
    support::wait_for("d0 reads again", Duration::from_secs(30), || {
        call(ureq::get(&daemon.url("/v1/partitions/3/blobs/k4")), None).0 == 200
    });
}

/// What hyper answers by itself (a request line it cannot parse, headers
/// too large, a URI too long) has the JSON error shape too, also on a
/// keep-alive connection that served a request before.
#[test]
fn protocol_errors_get_the_json_error_shape() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    let huge_header = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20));
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "u".repeat(70_000));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage", b"\x00\x01\x02garbage\r\n\r\n".to_vec(), 400),
        ("bad version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("bad header", b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n".to_vec(), 400),
        ("headers too large", huge_header.into_bytes(), 431),
        ("uri too long", long_uri.into_bytes(), 414),
    ];
    for (what, request, status) in &cases {
        for after_a_request in [false, true] {
            let mut stream = connect(&daemon);
            if after_a_request {
                stream.write_all(b"GET /v1/partitions/1/blobs/nothing HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let (got, _, body) = read_response(&mut stream).unwrap();
                assert_eq!((got, error_code(&body).as_str()), (404, "blob_not_found"));
            }
            let _ = stream.write_all(request);
            let (got, head, body) = read_response(&mut stream).unwrap_or_else(|| panic!("{what}: no answer"));
            assert_eq!(got, *status, "{what} (after a request: {after_a_request})");
            assert!(head.contains("content-type: application/json"), "{what}: {head}");
            let body: Value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| panic!("{what} (after a request: {after_a_request}): not JSON: {head}"));
            assert!(body["error"].is_string() && body["message"].is_string(), "{what}: {body}");
        }
    }
    assert_eq!(call(ureq::get(&daemon.url("/healthz")), None).0, 200);
}
