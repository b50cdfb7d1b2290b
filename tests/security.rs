//! Who gets in, on the real binary: TLS on the listener (plain HTTP and
//! clients without a valid certificate refused, certificates rotated under
//! load without a failed request), data tokens for writes (static tokens
//! rotated without a restart, signed tokens scoped to a partition and an
//! expiry), a node off loopback that anyone could write to refused at
//! start, secrets never printed, and garbage on the TLS port and in
//! tokens answered without harm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::certs::{Ca, agent, write_secret};
use support::{Daemon, call, error_code, wait_for};

/// A node on `dir/data` with `extra` TOML appended.
fn config(dir: &Path, extra: &str) -> String {
    config_with_node(dir, "", extra)
}

/// The same with `node` lines in `[node]`.
fn config_with_node(dir: &Path, node: &str, extra: &str) -> String {
    let data = dir.join("data");
    format!(
        "[[disk]]\nname = \"d0\"\npath = \"{}\"\n\n[node]\nbootstrap_partitions = 2\n{node}\n{extra}",
        data.display()
    )
}

/// `[tls]` with the node's certificate (and a client CA) written into `dir`.
fn tls_section(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> String {
    let (cert, key) = ca.server("node").write(dir, "node");
    let mut text = format!("[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", cert.display(), key.display());
    if let Some(client_ca) = client_ca {
        let path = dir.join("client-ca.pem");
        write_secret(&path, &client_ca.pem());
        text.push_str(&format!("client_ca_file = \"{}\"\n", path.display()));
    }
    text
}

fn put(agent: &ureq::Agent, url: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut request = agent.put(url);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    call(request, Some(b"value"))
}

/// The error of a request that must not get an HTTP answer.
fn refused(agent: &ureq::Agent, url: &str) -> String {
    match agent.get(url).call() {
        Err(ureq::Error::Transport(error)) => error.to_string(),
        Ok(response) => panic!("{url}: answered {}", response.status()),
        Err(ureq::Error::Status(status, _)) => panic!("{url}: answered {status}"),
    }
}

#[test]
fn tls_serves_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("node CA");
    let toml = config(dir.path(), &tls_section(dir.path(), &ca, None));
    let node = Daemon::with_tls_config(&toml, &[], agent(&[&ca], None));
    assert_eq!(put(&node.agent, &node.url("/v1/partitions/1/blobs/k"), None).0, 201);
    assert_eq!(call(node.agent.get(&node.url("/v1/partitions/1/blobs/k")), None), (200, b"value".to_vec()));

    // Plain HTTP to the TLS port gets no HTTP answer, and the node serves on.
    let mut plain = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain.write_all(b"GET /v1/partitions HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP answered: {:?}", String::from_utf8_lossy(&answer));
    // A client that does not trust the node's CA refuses it.
    let stranger = Ca::new("another CA");
    let error = refused(&agent(&[&stranger], None), &node.url("/healthz"));
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert_eq!(call(node.agent.get(&node.url("/healthz")), None).0, 200);
    assert!(node.metric_sum("datanode_tls_handshake_failures_total", &["reason=\"failed\""]) >= 2.0);

    // The client commands reach it with --ca-file, and refuse it without.
    let ca_file = dir.path().join("ca.pem");
    write_secret(&ca_file, &ca.pem());
    let status = cli(&["status", "--url", &node.url(""), "--ca-file", ca_file.to_str().unwrap()]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(String::from_utf8_lossy(&status.stdout).contains("healthy"));
    let untrusted = cli(&["status", "--url", &node.url("")]);
    assert!(!untrusted.status.success());
    assert!(String::from_utf8_lossy(&untrusted.stderr).to_lowercase().contains("certificate"));
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_datanode")).args(args).output().unwrap()
}

#[test]
fn client_certificates_are_required_when_a_client_ca_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, clients) = (Ca::new("node CA"), Ca::new("client CA"));
    let toml = config(dir.path(), &tls_section(dir.path(), &ca, Some(&clients)));
    let good = clients.client("writer", false);
    let node = Daemon::with_tls_config(&toml, &[], agent(&[&ca], Some(&good)));
    assert_eq!(put(&node.agent, &node.url("/v1/partitions/1/blobs/k"), None).0, 201);

    let rogue = Ca::new("rogue CA");
    let cases = [
        ("no certificate", agent(&[&ca], None)),
        ("a certificate of another CA", agent(&[&ca], Some(&rogue.client("writer", false)))),
        ("an expired certificate", agent(&[&ca], Some(&clients.client("writer", true)))),
        ("a server certificate of the node's own CA", agent(&[&ca], Some(&ca.server("node")))),
    ];
    for (what, client) in &cases {
        // TLS 1.3: the refusal may come after the client's handshake ends,
        // so a write is tried: it must not be served.
        match client.put(&node.url("/v1/partitions/1/blobs/rogue")).send_bytes(b"x") {
            Err(ureq::Error::Transport(_)) => {}
            other => panic!("{what}: {:?}", other.map(|r| r.status())),
        }
    }
    assert_eq!(call(node.agent.get(&node.url("/v1/partitions/1/blobs/rogue")), None).0, 404, "no rogue write landed");

    // The admin commands present a client certificate when given one.
    let (cert, key) = good.write(dir.path(), "writer");
    let ca_file = dir.path().join("ca.pem");
    write_secret(&ca_file, &ca.pem());
    let url = node.url("");
    let tls = ["--ca-file", ca_file.to_str().unwrap(), "--client-cert", cert.to_str().unwrap()];
    let list =
        cli(&[&["partition", "list", "--url", &url][..], &tls, &["--client-key", key.to_str().unwrap()]].concat());
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let without = cli(&["partition", "list", "--url", &url, "--ca-file", ca_file.to_str().unwrap()]);
    assert_eq!(
        without.status.code(),
        Some(69),
        "refused in the handshake: {}",
        String::from_utf8_lossy(&without.stderr)
    );
    assert!(node.metric_sum("datanode_tls_handshake_failures_total", &["reason=\"failed\""]) >= cases.len() as f64);
}

/// New certificate files are picked up without a restart, while clients
/// keep connecting: no request fails, and once it is loaded a client
/// that trusts only the new CA gets in.
#[test]
fn a_certificate_rotation_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let toml = config(dir.path(), &tls_section(dir.path(), &old_ca, None));
    let node = Daemon::with_tls_config(&toml, &[], agent(&[&old_ca, &new_ca], None));
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let trusting = support::certs::client_config(&[&old_ca, &new_ca], None);
    let loaders: Vec<_> = (0..3)
        .map(|n| {
            let (stop, served, failed) = (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&failed));
            let trusting = Arc::clone(&trusting);
            let url = node.url(&format!("/v1/partitions/1/blobs/load-{n}"));
            std::thread::spawn(move || {
                let pooled = ureq::AgentBuilder::new().tls_config(Arc::clone(&trusting)).build();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Every third request on a new connection: new handshakes
                    // happen all through the rotation.
                    let client = match i % 3 {
                        0 => ureq::AgentBuilder::new().tls_config(Arc::clone(&trusting)).build(),
                        _ => pooled.clone(),
                    };
                    match client.put(&format!("{url}-{i}")).send_bytes(b"v") {
                        Ok(r) if r.status() == 201 => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        other => failed.lock().unwrap().push(format!("{:?}", other.map(|r| r.status()))),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    wait_for("load", Duration::from_secs(20), || served.load(Ordering::Relaxed) > 50);
    let new_only = agent(&[&new_ca], None);
    refused(&new_only, &node.url("/healthz"));
    // The key first, then the certificate: in between the files do not
    // match, which must be refused and the old pair kept.
    let fresh = new_ca.server("node");
    write_secret(&dir.path().join("node.key"), &fresh.key_pem);
    std::thread::sleep(Duration::from_millis(2500));
    write_secret(&dir.path().join("node.pem"), &fresh.cert_pem);
    let took = wait_for("the new certificate served", Duration::from_secs(20), || {
        new_only.get(&node.url("/healthz")).call().is_ok()
    });
    eprintln!("new certificate served {took:?} after its files were complete");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        loader.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        served.load(Ordering::Relaxed),
        &failed[..failed.len().min(5)]
    );
    assert!(
        node.metric_sum("datanode_credential_reloads_total", &["credential=\"tls\"", "result=\"refused\""]) >= 1.0,
        "the mismatched pair was refused"
    );
    assert!(node.metric_sum("datanode_credential_reloads_total", &["credential=\"tls\"", "result=\"ok\""]) >= 1.0);
    let expiry = node.metric_sum("datanode_tls_certificate_expiry_timestamp_seconds", &[]);
    assert!(expiry > 1.9e9, "the served certificate's expiry is exported: {expiry}");

    // A rotation to an expired certificate would fail every client: refused,
    // and the running one kept.
    let expired = new_ca.expired_server("node");
    write_secret(&dir.path().join("node.key"), &expired.key_pem);
    write_secret(&dir.path().join("node.pem"), &expired.cert_pem);
    let refused = &["credential=\"tls\"", "result=\"refused\""];
    let before = node.metric_sum("datanode_credential_reloads_total", refused);
    wait_for("the expired certificate refused", Duration::from_secs(10), || {
        node.metric_sum("datanode_credential_reloads_total", refused) > before
    });
    assert_eq!(call(new_only.get(&node.url("/healthz")), None).0, 200, "still served with the valid certificate");
}

/// `admin_token_file = ...` for `[node]`, the token written into `dir`
/// (data tokens need an admin token: else admin calls would be open).
fn admin_line(dir: &Path) -> String {
    let admin = dir.join("admin.token");
    write_secret(&admin, "admin-token-0123456789");
    format!("admin_token_file = \"{}\"\n", admin.display())
}

fn tokens_section(dir: &Path, tokens: &[&str], signing_key: Option<&str>) -> String {
    let token_file = dir.join("data.tokens");
    write_secret(&token_file, &format!("# writers\n{}\n", tokens.join("\n")));
    let mut text = format!("[auth]\ndata_tokens = \"required\"\ntoken_file = \"{}\"\n", token_file.display());
    if let Some(key) = signing_key {
        let key_file = dir.join("token.key");
        write_secret(&key_file, key);
        text.push_str(&format!("signing_key_file = \"{}\"\n", key_file.display()));
    }
    text
}

fn unauthorized(answer: (u16, Vec<u8>), what: &str) -> String {
    assert_eq!(answer.0, 401, "{what}: {}", String::from_utf8_lossy(&answer.1));
    assert_eq!(error_code(&answer.1), "unauthorized", "{what}");
    let body: serde_json::Value = serde_json::from_slice(&answer.1).unwrap();
    body["message"].as_str().unwrap().to_string()
}

#[test]
fn static_data_tokens_guard_writes_and_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = ("token-a-0123456789abcdef", "token-b-0123456789abcdef", "token-c-0123456789abcdef");
    let toml = config_with_node(dir.path(), &admin_line(dir.path()), &tokens_section(dir.path(), &[a, b], None));
    let node = Daemon::with_config(&toml, &[]);
    let url = node.url("/v1/partitions/1/blobs/k");
    let agent = ureq::agent();

    let message = unauthorized(put(&agent, &url, None), "no token");
    assert!(message.contains("Bearer"), "{message}");
    unauthorized(put(&agent, &url, Some("token-x-0123456789abcdef")), "an unknown token");
    unauthorized(call(agent.delete(&url), None), "a delete without a token");
    // Refused before the body is read: nothing was written.
    assert_eq!(call(agent.get(&url), None).0, 404);
    assert_eq!(put(&agent, &url, Some(a)).0, 201);
    assert_eq!(put(&agent, &url, Some(b)).0, 201, "several tokens are valid at once");
    let lower = agent.put(&url).set("Authorization", &format!("bearer {a}"));
    assert_eq!(call(lower, Some(b"value")).0, 201, "the scheme is case-insensitive");
    assert_eq!(put(&agent, &url, Some("admin-token-0123456789")).0, 201, "the admin token may write");
    assert_eq!(call(agent.get(&url), None), (200, b"value".to_vec()), "reads need no token");
    let response = agent.put(&url).send_bytes(b"x").unwrap_err();
    let ureq::Error::Status(401, response) = response else { panic!("{response:?}") };
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));

    // Rotation: a out, c in, no restart.
    write_secret(&dir.path().join("data.tokens"), &format!("{b}\n{c}\n"));
    let took = wait_for("the new token file in force", Duration::from_secs(10), || put(&agent, &url, Some(c)).0 == 201);
    eprintln!("token rotation in force after {took:?}");
    unauthorized(put(&agent, &url, Some(a)), "a removed token");
    assert_eq!(put(&agent, &url, Some(b)).0, 201);
    let delete = agent.delete(&url).set("Authorization", &format!("Bearer {b}"));
    assert_eq!(call(delete, None).0, 204);
    // A broken file (a token too short) is refused; the running tokens stay.
    write_secret(&dir.path().join("data.tokens"), "short\n");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(put(&agent, &url, Some(c)).0, 201, "the running tokens stay when the new file is refused");
    let refused = &["credential=\"data_tokens\"", "result=\"refused\""];
    assert_eq!(node.metric_sum("datanode_credential_reloads_total", refused), 1.0, "refused once, not at every look");
    // An emptied file (a rewrite caught half way, or a mistake) would lock
    // every writer out: refused too.
    write_secret(&dir.path().join("data.tokens"), "");
    wait_for("the empty file refused", Duration::from_secs(10), || {
        node.metric_sum("datanode_credential_reloads_total", refused) == 2.0
    });
    assert_eq!(put(&agent, &url, Some(c)).0, 201, "the running tokens stay when the file is emptied");
    assert!(node.metric_sum("datanode_auth_rejected_total", &["reason=\"missing\""]) >= 2.0);
    assert!(node.metric_sum("datanode_auth_rejected_total", &["reason=\"unknown_token\""]) >= 2.0);
}

fn mint(key_file: &Path, partition: u64, ttl: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_datanode"))
        .args(["token", "--signing-key-file"])
        .arg(key_file)
        .args(["--partition", &partition.to_string(), "--ttl", ttl])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn signed_data_tokens_hold_for_their_partition_until_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let section = tokens_section(dir.path(), &[], Some("a signing key of more than 16 bytes\n"));
    let toml = config_with_node(dir.path(), &admin_line(dir.path()), &section);
    let node = Daemon::with_config(&toml, &[]);
    let key_file = dir.path().join("token.key");
    let agent = ureq::agent();
    let (p1, p2) = (node.url("/v1/partitions/1/blobs/k"), node.url("/v1/partitions/2/blobs/k"));

    let token = mint(&key_file, 1, "10m");
    assert!(token.starts_with("dn1.1."), "{token}");
    assert_eq!(put(&agent, &p1, Some(&token)).0, 201);
    let message = unauthorized(put(&agent, &p2, Some(&token)), "another partition");
    assert!(message.contains("another partition"), "{message}");
    let expired = mint(&key_file, 1, "1s");
    std::thread::sleep(Duration::from_millis(2100));
    assert!(unauthorized(put(&agent, &p1, Some(&expired)), "expired").contains("expired"));
    // Longer than auth.max_token_ttl (24h by default): refused.
    let long = mint(&key_file, 1, "48h");
    assert!(unauthorized(put(&agent, &p1, Some(&long)), "too long").contains("max_token_ttl"));
    // A validity the clock cannot hold, or none, is refused by the minter.
    for ttl in ["0s", "18446744073709551615s"] {
        let out = Command::new(env!("CARGO_BIN_EXE_datanode"))
            .args(["token", "--signing-key-file"])
            .arg(&key_file)
            .args(["--partition", "1", "--ttl", ttl])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--ttl {ttl}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Tampered: the claims of partition 2 under partition 1's signature,
    // and a changed signature.
    let (claims, signature) = token.rsplit_once('.').unwrap();
    let forged = format!("{}.{signature}", claims.replacen("dn1.1.", "dn1.2.", 1));
    assert!(unauthorized(put(&agent, &p2, Some(&forged)), "forged claims").contains("signature"));
    let mut flipped = token.clone().into_bytes();
    flipped[token.len() - 2] = if flipped[token.len() - 2] == b'a' { b'b' } else { b'a' };
    unauthorized(put(&agent, &p1, Some(std::str::from_utf8(&flipped).unwrap())), "a changed signature");
    // A token signed with another key.
    let other = dir.path().join("other.key");
    write_secret(&other, "another signing key, also long enough");
    unauthorized(put(&agent, &p1, Some(&mint(&other, 1, "10m"))), "another key");
    assert!(node.metric_sum("datanode_auth_rejected_total", &["reason=\"bad_signature\""]) >= 3.0);
    assert_eq!(node.metric_sum("datanode_auth_rejected_total", &["reason=\"expired\""]), 1.0);
    assert_eq!(node.metric_sum("datanode_auth_rejected_total", &["reason=\"wrong_partition\""]), 1.0);
    assert_eq!(node.metric_sum("datanode_auth_rejected_total", &["reason=\"ttl_too_long\""]), 1.0);
}

fn check_config(toml: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datanode.toml");
    std::fs::write(&path, toml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_datanode")).arg("--config").arg(&path).args(args).output().unwrap()
}

#[test]
fn a_node_anyone_could_write_to_is_refused_off_loopback_and_secrets_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.token");
    write_secret(&admin, "admin-secret-0123456789");
    let off_loopback = format!("[node]\nhttp_addr = \"0.0.0.0:0\"\nadmin_token_file = \"{}\"\n", admin.display());
    let base = format!("[[disk]]\nname = \"d0\"\npath = \"{}\"\n\n", dir.path().join("data").display());
    let open = check_config(&format!("{base}{off_loopback}"), &["check-config"]);
    assert_eq!(open.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert!(stderr.contains("anyone who reaches it could write") && stderr.contains("auth.data_tokens"), "{stderr}");
    let serve = check_config(&format!("{base}{off_loopback}"), &["serve"]);
    assert_eq!(serve.status.code(), Some(78), "serve refuses what check-config refuses");

    // With data tokens it is accepted; the posture is reported, without
    // plain-text TLS warnings going unsaid, and no secret is printed.
    let tokens = tokens_section(dir.path(), &["data-secret-0123456789abcdef"], Some("signing-secret-0123456789"));
    let guarded = check_config(&format!("{base}{off_loopback}\n{tokens}"), &["check-config"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&guarded.stdout), String::from_utf8_lossy(&guarded.stderr));
    assert_eq!(guarded.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("security: tls: off") && stderr.contains("writes: data token required (static or signed)"),
        "{stderr}"
    );
    assert!(stderr.contains("[tls] is not set"), "a plain-text listener off loopback is warned about: {stderr}");
    for secret in ["admin-secret", "data-secret", "signing-secret"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} printed:\n{stdout}\n{stderr}");
    }
    // Explicitly allowed: accepted.
    let allowed =
        check_config(&format!("{base}{off_loopback}\n[auth]\nallow_unauthenticated = true\n"), &["check-config"]);
    assert_eq!(allowed.status.code(), Some(0), "{}", String::from_utf8_lossy(&allowed.stderr));

    // A token file others may read: a warning, or refused when asked.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path().join("data.tokens"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let lax = check_config(&format!("{base}{off_loopback}\n{tokens}"), &["check-config"]);
    assert_eq!(lax.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&lax.stderr).contains("auth.token_file"), "warned");
    let strict =
        format!("{base}{off_loopback}\n{}", tokens.replace("[auth]\n", "[auth]\nreadable_secret_files = \"refuse\"\n"));
    let refused = check_config(&strict, &["check-config"]);
    assert_eq!(refused.status.code(), Some(78), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("readable by other users"));
    // Required tokens with nothing to check them against.
    let empty = check_config(&format!("{base}[auth]\ndata_tokens = \"required\"\n"), &["check-config"]);
    assert_eq!(empty.status.code(), Some(78));
    // Data tokens, but admin calls open (no admin token): refused.
    let open_admin = check_config(&format!("{base}\n{tokens}"), &["check-config"]);
    assert_eq!(open_admin.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&open_admin.stderr).contains("node.admin_token_file"));
    // A key file that is a FIFO would block a read forever: refused.
    let fifo = dir.path().join("fifo.key");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let with_fifo = tokens.replace(dir.path().join("token.key").to_str().unwrap(), fifo.to_str().unwrap());
    let blocked = check_config(&format!("{base}{off_loopback}\n{with_fifo}"), &["check-config"]);
    assert_eq!(blocked.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&blocked.stderr).contains("not a regular file"));
}

#[test]
fn broken_certificate_files_are_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("node CA");
    let section = tls_section(dir.path(), &ca, None);
    write_secret(
        &dir.path().join("node.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    let out = check_config(&config(dir.path(), &section), &["check-config"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.cert_file"), "{}", String::from_utf8_lossy(&out.stderr));
    // A key of another certificate.
    let section = tls_section(dir.path(), &ca, None);
    write_secret(&dir.path().join("node.key"), &ca.server("other").key_pem);
    let out = check_config(&config(dir.path(), &section), &["check-config"]);
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    write_secret(&dir.path().join("node.key"), "");
    let out = check_config(&config(dir.path(), &section), &["serve"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.key_file"));
}

/// Garbage where a TLS handshake should be, huge and random credentials:
/// connections are dropped or answered 4xx with the JSON shape, never a
/// 5xx, and the node serves on.
#[test]
fn garbage_on_the_tls_port_and_in_tokens_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("node CA");
    let tokens = tokens_section(dir.path(), &["token-0123456789abcdef"], Some("signing-key-0123456789abcdef"));
    let extra = format!("{}\n{tokens}", tls_section(dir.path(), &ca, None));
    let toml = config_with_node(dir.path(), &admin_line(dir.path()), &extra);
    let node = Daemon::with_tls_config(&toml, &[], agent(&[&ca], None));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let mut stream = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        // Half of them look like the start of a TLS record.
        let mut bytes: Vec<u8> = (0..(next() % 600)).map(|_| next() as u8).collect();
        if round % 2 == 0 {
            bytes.splice(0..0, [0x16, 0x03, 0x01, (next() % 3) as u8, next() as u8, 0x01]);
        }
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }
    let url = node.url("/v1/partitions/1/blobs/k");
    let alphabet = b"dn1.0123456789-_ABCxyz=+/ \t";
    for _ in 0..300 {
        let len = (next() % 200) as usize;
        let token: String = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char).collect();
        let token = token.trim();
        match node.agent.put(&url).set("Authorization", &format!("Bearer {token}")).send_bytes(b"x") {
            Ok(response) => panic!("{token:?} was accepted: {}", response.status()),
            Err(ureq::Error::Status(status, response)) => {
                assert!((400..500).contains(&status), "{token:?}: {status}");
                let body = response.into_string().unwrap();
                assert!(body.contains("\"error\""), "{token:?}: {body}");
            }
            Err(error) => panic!("{token:?}: {error}"),
        }
    }
    let huge = "x".repeat(200_000);
    match node.agent.put(&url).set("Authorization", &format!("Bearer {huge}")).send_bytes(b"x") {
        Err(ureq::Error::Status(status, response)) => {
            assert!((400..500).contains(&status), "{status}");
            assert!(response.into_string().unwrap().contains("\"error\""));
        }
        Err(ureq::Error::Transport(_)) => {}
        Ok(response) => panic!("a huge token was accepted: {}", response.status()),
    }
    assert_eq!(call(node.agent.get(&node.url("/readyz")), None).0, 200, "the node serves on");
    assert_eq!(put(&node.agent, &url, Some("token-0123456789abcdef")).0, 201);
}

#[test]
fn a_cluster_secret_file_is_checked_at_start_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cluster.secret");
    let cluster = |peer: &str, extra: &str| {
        format!(
            "[node]\nid = \"dn-1\"\n\n[[disk]]\nname = \"d0\"\npath = \"{}\"\n\n[cluster]\npeer_addr = \"{peer}\"\n\
             advertise_url = \"http://127.0.0.1:7070\"\nseeds = [\"dn-1@{peer}\"]\n{extra}",
            dir.path().join("data").display()
        )
    };
    let with_secret = |peer: &str| cluster(peer, &format!("secret_file = \"{}\"\n", secret.display()));

    // Off loopback without a secret: refused, naming the key to set.
    let open = check_config(&cluster("0.0.0.0:7170", ""), &["check-config"]);
    assert_eq!(open.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&open.stderr).contains("set cluster.secret_file"));

    // Too short (after trimming), or missing: refused, naming the key, by
    // serve as by check-config.
    write_secret(&secret, "  short-cluster-secret-31-bytes-x \n");
    for command in ["check-config", "serve"] {
        let short = check_config(&with_secret("127.0.0.1:7170"), &[command]);
        assert_eq!(short.status.code(), Some(78), "{command}");
        let stderr = String::from_utf8_lossy(&short.stderr);
        assert!(stderr.contains("cluster.secret_file") && stderr.contains("at least 32"), "{stderr}");
        assert!(!stderr.contains("short-cluster-secret"), "the secret printed: {stderr}");
    }
    let missing =
        check_config(&cluster("127.0.0.1:7170", "secret_file = \"/nonexistent/cluster.secret\"\n"), &["check-config"]);
    assert_eq!(missing.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cluster.secret_file"));

    // Long enough: accepted off loopback; the posture says so; the secret
    // is printed nowhere.
    write_secret(&secret, "the-cluster-secret-0123456789abcdef0123\n");
    let good = check_config(&with_secret("0.0.0.0:7170"), &["check-config"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&good.stdout), String::from_utf8_lossy(&good.stderr));
    assert_eq!(good.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("peer port: 0.0.0.0:7170 (reachable off this host), peers prove the cluster secret"));
    assert!(!stdout.contains("the-cluster-secret") && !stderr.contains("the-cluster-secret"), "{stdout}\n{stderr}");

    // Readable by others: warned, or refused when asked.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let lax = check_config(&with_secret("127.0.0.1:7170"), &["check-config"]);
    assert_eq!(lax.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&lax.stderr).contains("cluster.secret_file"), "warned");
    let strict = format!("{}\n[auth]\nreadable_secret_files = \"refuse\"\n", with_secret("127.0.0.1:7170"));
    let refused = check_config(&strict, &["check-config"]);
    assert_eq!(refused.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("cluster.secret_file") && stderr.contains("readable by other users"), "{stderr}");
}
