//! `docs/openapi.yaml` against the real router: every operation it lists
//! is routed (never the 404 `not_found` fallback or 405), and a method it
//! does not list on one of its paths is 405. (A unit test in `src/api.rs`
//! checks that its operationIds are exactly the router's operations.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Daemon, call};

/// (method, path) of every operation in the spec.
fn operations() -> Vec<(String, String)> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    let paths = spec.split_once("\npaths:\n").unwrap().1;
    let (mut path, mut found) = (String::new(), Vec::new());
    for line in paths.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = format!("/{p}");
        } else if let Some(m) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':'))
            && ["get", "put", "post", "delete", "head"].contains(&m)
        {
            found.push((m.to_ascii_uppercase(), path.clone()));
        }
    }
    found
}

#[test]
fn every_operation_of_the_spec_is_routed_and_no_other_method_is() {
    let operations = operations();
    assert!(operations.len() >= 17, "{operations:?}");
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[]);
    assert_eq!(call(ureq::put(&daemon.url("/v1/partitions/1/blobs/k")), Some(b"v")).0, 201);
    // Deletes last: they remove what the others look at.
    let mut ordered = operations.clone();
    ordered.sort_by_key(|(method, _)| method == "DELETE");
    for (method, path) in &ordered {
        let url = daemon.url(&path.replace("{pid}", "1").replace("{key}", "k"));
        let body: Option<&[u8]> = match method.as_str() {
            "PUT" | "POST" => Some(b"{}"),
            _ => None,
        };
        let (status, answer) = call(ureq::request(method, &url), body);
        let code = serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from));
        assert!(
            status != 405 && code.as_deref() != Some("not_found"),
            "{method} {path} is in the spec but not routed: {status} {code:?}"
        );
    }
    let paths: std::collections::BTreeSet<&String> = operations.iter().map(|(_, p)| p).collect();
    for path in paths {
        let url = daemon.url(&path.replace("{pid}", "1").replace("{key}", "k"));
        for method in ["GET", "PUT", "POST", "DELETE"] {
            if operations.iter().any(|(m, p)| m == method && p == path) {
                continue;
            }
            let (status, _) = call(ureq::request(method, &url), Some(b""));
            assert_eq!(status, 405, "{method} {path} is not in the spec but answers {status}");
        }
    }
}
