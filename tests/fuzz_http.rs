//! A proptest-driven fuzz harness for the HTTP surface of the real binary:
//! generated requests (methods, partition ids, raw key bytes, query
//! strings, Range headers, JSON bodies, truncated and junk bodies) over
//! raw TCP. Every request gets an answer; nothing is a 5xx; every error is
//! the JSON error shape; the process stays up and healthy.
//!
//! `PROPTEST_CASES=20000 cargo test --test fuzz_http` searches longer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use proptest::prelude::*;
use support::Daemon;

/// Percent-encodes every byte outside the unreserved set.
fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn pid() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u64..6).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("007".to_string()),
        Just("18446744073709551616".to_string()),
        "[a-z%0-9]{0,8}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|k| encode(&k)),
        proptest::collection::vec(any::<u8>(), 1000..1100).prop_map(|k| encode(&k)),
        "[a-z/]{1,20}",
        Just("%".to_string()),
        Just("%zz".to_string()),
        Just("%C0%80".to_string()),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let value = prop_oneof!["[a-z0-9%+=&]{0,12}", (0u64..20000).prop_map(|n| n.to_string()), Just("-5".to_string())];
    proptest::collection::vec(
        (prop_oneof![Just("prefix"), Just("after"), Just("limit"), Just("state"), Just("x")], value),
        0..3,
    )
    .prop_map(|pairs| {
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"))
        }
    })
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        (pid(), key()).prop_map(|(p, k)| format!("/v1/partitions/{p}/blobs/{k}")),
        (pid(), query()).prop_map(|(p, q)| format!("/v1/partitions/{p}/blobs{q}")),
        (pid(), prop_oneof![Just(""), Just("/recover"), Just("/read-only"), Just("/snapshot"), Just("/nope")])
            .prop_map(|(p, s)| format!("/v1/partitions/{p}{s}")),
        query().prop_map(|q| format!("/v1/partitions{q}")),
        prop_oneof![Just("/v1/disks"), Just("/healthz"), Just("/readyz"), Just("/v2"), Just("/")]
            .prop_map(String::from),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let json = prop_oneof![
        (any::<i64>(), "[a-z0-9]{0,6}").prop_map(|(id, disk)| format!("{{\"id\":{id},\"disk\":\"{disk}\"}}")),
        any::<bool>().prop_map(|b| format!("{{\"read_only\":{b}}}")),
        Just("{\"read_only\":\"yes\"}".to_string()),
        Just("{\"id\":1,\"disk\":\"d0\",\"extra\":1}".to_string()),
        Just("{\"id\":".to_string()),
        Just("[]".to_string()),
        Just("null".to_string()),
    ];
    prop_oneof![json.prop_map(String::into_bytes), proptest::collection::vec(any::<u8>(), 0..64), Just(Vec::new())]
}

fn range() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        (0u64..50, 0u64..50).prop_map(|(a, b)| format!("bytes={a}-{b}")),
        (0u64..50).prop_map(|n| format!("bytes=-{n}")),
        (0u64..50).prop_map(|n| format!("bytes={n}-")),
        Just("bytes=1-2,4-5".to_string()),
        Just("bytes=x-y".to_string()),
        Just("lines=1-2".to_string()),
        Just("bytes=99999999999999999999-".to_string()),
    ])
}

fn method() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("GET"), Just("PUT"), Just("POST"), Just("DELETE"), Just("HEAD"), Just("PATCH"), Just("OPTIONS")]
}

/// Sends one request; returns status, headers (lower-case) and body.
fn send(port: u16, method: &str, path: &str, range: Option<&str>, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(range) = range {
        head.push_str(&format!("Range: {range}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, head, response[split + 4..].to_vec())
}

/// One node for all cases (starting one per case would dominate the run);
/// cases may create, delete and fill partitions.
#[test]
fn any_request_gets_a_json_4xx_or_a_success_never_a_5xx() {
    let data = tempfile::tempdir().unwrap();
    let node = Daemon::start(data.path(), &[], &[("DATANODE_LIMITS__MAX_BLOB_SIZE", "1KiB")]);
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(400);
    let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
    let requests = proptest::collection::vec((method(), path(), range(), body()), 1..8);
    let outcome = proptest::test_runner::TestRunner::new(config).run(&requests, |requests| {
        for (method, path, range, body) in requests {
            let (status, head, reply) = send(node.port, method, &path, range.as_deref(), &body);
            prop_assert!(status < 500, "{method} {path} ({range:?}): {status} {}", String::from_utf8_lossy(&reply));
            if status >= 400 && method != "HEAD" {
                prop_assert!(head.contains("content-type: application/json"), "{method} {path}: {head}");
                let value: serde_json::Value = serde_json::from_slice(&reply)
                    .map_err(|e| TestCaseError::fail(format!("{method} {path}: {status} not JSON: {e}")))?;
                prop_assert!(value["error"].is_string() && value["message"].is_string(), "{method} {path}: {value}");
            }
        }
        prop_assert_eq!(send(node.port, "GET", "/healthz", None, b"").0, 200);
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}\nnode log:\n{}", node.log());
    }
}
