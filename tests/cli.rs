//! The operator's commands against a running node: `datanode status`,
//! `datanode bench`, the admin commands and `datanode cluster` (URL
//! forms, `--config`, `--json`, redirects, exit codes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::Daemon;
use support::cluster::{TestCluster, node_index};

/// Health settings under which the test machine's disk (slow when loaded,
/// nearly full when shared) keeps its partitions writable.
const HEALTHY_WHATEVER_THE_MACHINE: &[(&str, &str)] = &[
    ("DATANODE_HEALTH__SLOW_SYNC", "1h"),
    ("DATANODE_HEALTH__DISK_FULL_RATIO", "1.0"),
    ("DATANODE_HEALTH__DISK_RESUME_RATIO", "0.999"),
];

fn datanode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datanode")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn out(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn err(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn status_finds_the_node_by_url_without_scheme_or_by_config_and_speaks_json() {
    let data = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(data.path(), &[], &[("DATANODE_HEALTH__PROBE_INTERVAL", "100ms")]);
    support::wait_for("a probe", std::time::Duration::from_secs(30), || {
        !daemon.json("/v1/disks")[0]["last_probe"].is_null()
    });
    let addr = format!("127.0.0.1:{}", daemon.port);
    let bare = datanode(&["status", "--url", &addr]);
    assert!(bare.status.success(), "{}", err(&bare));
    assert!(out(&bare).starts_with("PARTITION"), "{}", out(&bare));
    let disk_line = out(&bare).lines().find(|l| l.starts_with("d0")).unwrap().to_string();
    assert!(!disk_line.contains("0.000s") && (disk_line.contains("ms") || disk_line.contains("µs")), "{disk_line}");

    let config = data.path().join("status.toml");
    std::fs::write(
        &config,
        format!("[node]\nhttp_addr = \"{addr}\"\n[[disk]]\nname = \"d0\"\npath = \"{}\"\n", data.path().display()),
    )
    .unwrap();
    let by_config = datanode(&["status", "--config", config.to_str().unwrap()]);
    assert!(by_config.status.success(), "{}", err(&by_config));
    assert_eq!(out(&by_config).lines().count(), out(&bare).lines().count());

    let json = datanode(&["status", "--url", &addr, "--json"]);
    assert!(json.status.success(), "{}", err(&json));
    let value: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["partitions"].as_array().unwrap().len(), 4, "{value}");
    assert_eq!(value["disks"][0]["name"], "d0", "{value}");
}

#[test]
fn bench_defaults_fit_a_fresh_node_and_failed_requests_fail_the_run() {
    let data = tempfile::tempdir().unwrap();
    // A loaded or nearly full test machine must not make the disk slow or
    // full (read-only partitions would fail the prefill): this is about bench.
    let daemon = Daemon::start(data.path(), &[], HEALTHY_WHATEVER_THE_MACHINE);
    let addr = format!("127.0.0.1:{}", daemon.port);
    let quick = ["--duration", "1s", "--warmup", "0s", "--connections", "4", "--keys", "20"];
    let mut args = vec!["bench", "--url", &addr];
    args.extend_from_slice(&quick);
    // The defaults (partitions 1-4) against a fresh node: no errors; the
    // progress is plain lines when stderr is not a terminal.
    let run = datanode(&args);
    assert!(run.status.success(), "{}{}", out(&run), err(&run));
    assert!(!err(&run).contains('\r'), "no carriage returns off a terminal: {:?}", err(&run));
    // Half the partitions do not exist: the run fails, naming the errors.
    args.extend_from_slice(&["--partitions", "1-8", "--put-ratio", "1"]);
    let failing = datanode(&args);
    assert_eq!(failing.status.code(), Some(1), "{}{}", out(&failing), err(&failing));
    assert!(out(&failing).contains("404 partition_not_found"), "{}", out(&failing));
    assert!(err(&failing).contains("--max-error-ratio"), "{}", err(&failing));
    args.extend_from_slice(&["--max-error-ratio", "1"]);
    assert!(datanode(&args).status.success(), "a threshold of 1 tolerates every error");
}

#[test]
fn the_admin_cli_lists_shows_changes_exports_and_imports_with_clear_exit_codes() {
    let data = tempfile::tempdir().unwrap();
    let token = data.path().join("admin.token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let disk = data.path().join("d0");
    let toml = format!(
        "[node]\nadmin_token_file = \"{}\"\n{}",
        token.display(),
        support::config_with_disks(&[("d0", &disk)], "")
    );
    let daemon = Daemon::with_config(&toml, HEALTHY_WHATEVER_THE_MACHINE);
    let addr = format!("127.0.0.1:{}", daemon.port);
    // A configuration naming the node and its token: --config is enough.
    let config = data.path().join("client.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nhttp_addr = \"{addr}\"\nadmin_token_file = \"{}\"\n{}",
            token.display(),
            support::config_with_disks(&[("d0", &disk)], "")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let admin = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(&["--config", config]);
        datanode(&all)
    };
    let list = admin(&["partition", "list"]);
    assert!(list.status.success(), "{}", err(&list));
    assert!(out(&list).starts_with("PARTITION") && out(&list).lines().count() == 5, "{}", out(&list));
    let json: Value = serde_json::from_slice(&admin(&["partition", "list", "--json"]).stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4);
    assert!(out(&admin(&["partition", "show", "2"])).contains("state        healthy"));
    assert_eq!(support::call(ureq::put(&daemon.url("/v1/partitions/2/blobs/k")), Some(b"v")).0, 201);
    for round in 0..50u8 {
        let url = daemon.url("/v1/partitions/3/blobs/overwritten");
        assert_eq!(support::call(ureq::put(&url), Some(&[round; 4096])).0, 201);
    }
    let compacted = admin(&["partition", "compact", "3", "--json"]);
    assert!(compacted.status.success(), "{}", err(&compacted));
    let report: Value = serde_json::from_slice(&compacted.stdout).unwrap();
    assert!(report["copied_bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        support::call(ureq::get(&daemon.url("/v1/partitions/3/blobs/overwritten")), None),
        (200, vec![49; 4096])
    );

    let read_only: Value = serde_json::from_slice(&admin(&["partition", "read-only", "2", "--json"]).stdout).unwrap();
    assert_eq!(read_only["state"], "read_only");
    let cleared = admin(&["partition", "read-only", "2", "--clear"]);
    assert!(out(&cleared).contains("healthy"), "{}", out(&cleared));
    assert!(admin(&["partition", "recover", "2"]).status.success());

    let image = data.path().join("p2.snapshot");
    let export = admin(&["partition", "export", "2", "--output", image.to_str().unwrap()]);
    assert!(export.status.success() && image.metadata().unwrap().len() > 0, "{}", err(&export));
    assert!(admin(&["partition", "create", "9", "--disk", "d0"]).status.success());
    let refused = admin(&["partition", "import", "9", "--input", image.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "another partition's image is refused");
    assert!(err(&refused).contains("400 bad_snapshot"), "{}", err(&refused));
    assert_eq!(support::call(ureq::delete(&daemon.url("/v1/partitions/2/blobs/k")), None).0, 204);
    let import = admin(&["partition", "import", "2", "--input", image.to_str().unwrap()]);
    assert!(import.status.success(), "{}", err(&import));
    assert_eq!(support::call(ureq::get(&daemon.url("/v1/partitions/2/blobs/k")), None), (200, b"v".to_vec()));

    assert_eq!(admin(&["partition", "delete", "9"]).status.code(), Some(2), "delete needs --yes");
    assert!(admin(&["partition", "delete", "9", "--yes"]).status.success());
    let missing = admin(&["partition", "show", "9"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(err(&missing).contains("404 partition_not_found"), "{}", err(&missing));
    let disks = admin(&["disk", "list"]);
    assert!(out(&disks).starts_with("DISK") && out(&disks).contains("d0"), "{}", out(&disks));

    let no_token = datanode(&["partition", "recover", "1", "--url", &addr]);
    assert_eq!(no_token.status.code(), Some(1));
    assert!(err(&no_token).contains("401 unauthorized"), "{}", err(&no_token));
    let with_token = datanode(&["partition", "recover", "1", "--url", &addr, "--token-file", token.to_str().unwrap()]);
    assert!(with_token.status.success(), "{}", err(&with_token));
    let unreachable = datanode(&["partition", "list", "--url", "127.0.0.1:1"]);
    assert_eq!(unreachable.status.code(), Some(69), "{}", err(&unreachable));
}

#[test]
fn completions_and_the_manual_page_come_from_the_command_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let script = datanode(&["completions", shell]);
        assert!(script.status.success(), "{shell}: {}", err(&script));
        for word in ["datanode", "check-config", "partition", "cluster", "transfer-leader", "--config"] {
            assert!(out(&script).contains(word), "{shell} completion lacks {word}");
        }
    }
    let man = datanode(&["man"]);
    assert!(man.status.success(), "{}", err(&man));
    let page = out(&man);
    assert!(page.starts_with(".ie") || page.contains(".TH datanode"), "{}", &page[..page.len().min(300)]);
    for word in ["check\\-config", "partition", "cluster", "\\-\\-config"] {
        assert!(page.contains(word), "the manual page lacks {word}");
    }
}

#[test]
fn the_cluster_commands_show_the_map_follow_redirects_and_name_what_went_wrong() {
    let cluster = TestCluster::start(3, "");
    cluster.wait_formed();
    let url = |i: usize| format!("127.0.0.1:{}", cluster.ports[i]);
    let meta = cluster.meta_leader();
    let not_meta = (meta + 1) % 3;

    // Through a node that is not the metadata leader: the GET is redirected.
    let json = datanode(&["cluster", "status", "--url", &url(not_meta), "--json"]);
    assert!(json.status.success(), "{}", err(&json));
    let map: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(map["nodes"].as_array().unwrap().len(), 3, "{map}");

    let (status, created) = cluster.create(0, 7, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(7);
    let table = datanode(&["cluster", "status", "--url", &url(not_meta)]);
    assert!(table.status.success(), "{}", err(&table));
    let text = out(&table);
    assert!(text.starts_with("epoch ") && text.contains("metadata leader dn-"), "{text}");
    assert!(text.lines().filter(|l| l.starts_with("dn-")).count() == 3, "{text}");
    let row = text.lines().find(|l| l.starts_with("7 ")).unwrap_or_else(|| panic!("no partition 7: {text}"));
    assert!(row.contains(&format!("dn-{}/d0:", leader + 1)), "{row}");

    // A voter that is not the leader, caught up, through a node that does
    // not lead the partition (the POST is redirected to the leader).
    let replicas = cluster.partition(7)["replicas"].as_array().cloned().unwrap_or_default();
    let target = replicas
        .iter()
        .filter_map(|r| r["node"].as_str().and_then(node_index))
        .find(|i| *i != leader)
        .expect("a second replica");
    let via = (0..3).find(|i| *i != leader && *i != target).unwrap_or(target);
    support::wait_for("the target replica is a caught-up follower", std::time::Duration::from_secs(30), || {
        let replicas = cluster.partition(7)["replicas"].as_array().cloned().unwrap_or_default();
        let of = |i: usize| replicas.iter().find(|r| r["node"] == format!("dn-{}", i + 1)).cloned();
        match (of(leader), of(target)) {
            (Some(l), Some(t)) => t["role"] == "follower" && t["matched_index"] == l["matched_index"],
            _ => false,
        }
    });
    let name = format!("dn-{}", target + 1);
    let moved = datanode(&["cluster", "transfer-leader", "7", "--to", &name, "--url", &url(via)]);
    assert!(moved.status.success(), "{}{}", out(&moved), err(&moved));
    assert!(out(&moved).contains(&name), "{}", out(&moved));
    support::wait_for("the new leader in the map", std::time::Duration::from_secs(30), || {
        cluster.partition(7)["leader"] == name.as_str()
    });

    let unknown = datanode(&["cluster", "drain", "dn-9", "--url", &url(not_meta)]);
    assert_eq!(unknown.status.code(), Some(1), "{}", err(&unknown));
    assert!(err(&unknown).contains("node_not_found"), "{}", err(&unknown));
    // A drain that could never finish (three nodes, three replicas: the
    // replicas of dn-3 have nowhere to go) is refused, through a node
    // that redirects it, and changes nothing; undoing a drain is always
    // taken.
    let drain = datanode(&["cluster", "drain", "dn-3", "--url", &url(not_meta)]);
    assert_eq!(drain.status.code(), Some(1), "{}{}", out(&drain), err(&drain));
    assert!(err(&drain).contains("409 no_room_to_drain") && err(&drain).contains('7'), "{}", err(&drain));
    let nodes = cluster.map(not_meta)["nodes"].as_array().cloned().unwrap_or_default();
    assert!(nodes.iter().all(|n| n["draining"] == false), "nothing is draining: {nodes:?}");
    let undo = datanode(&["cluster", "drain", "dn-3", "--undo", "--url", &url(not_meta), "--json"]);
    assert!(undo.status.success(), "{}", err(&undo));
    let ended: Value = serde_json::from_slice(&undo.stdout).unwrap();
    assert_eq!(ended["draining"], false, "{ended}");

    let data = tempfile::tempdir().unwrap();
    let single = Daemon::start(data.path(), &[], &[]);
    let refused = datanode(&["cluster", "status", "--url", &format!("127.0.0.1:{}", single.port)]);
    assert_eq!(refused.status.code(), Some(1), "{}", out(&refused));
    assert!(err(&refused).contains("404 not_clustered"), "{}", err(&refused));
}
