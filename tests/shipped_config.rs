//! The files shipped in `config/` stay in step with the code: the example
//! configuration is accepted as written, and the dashboard and alert rules
//! use only the metric names of the contract.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const CONTRACT_METRICS: &[&str] = &[
    "datanode_partition_state",
    "datanode_partitions",
    "datanode_partition_faults_total",
    "datanode_io_errors_total",
    "datanode_disk_state",
    "datanode_disk_free_bytes",
    "datanode_disk_total_bytes",
    "datanode_disk_probe_sync_seconds",
    "datanode_wal_appends_total",
    "datanode_wal_append_bytes_total",
    "datanode_wal_syncs_total",
    "datanode_wal_sync_seconds",
    "datanode_wal_batch_records",
    "datanode_requests_total",
    "datanode_request_seconds",
    "datanode_build_info",
    "datanode_tls_certificate_expiry_timestamp_seconds",
    "datanode_raft_role",
    "datanode_raft_term",
    "datanode_raft_commit_index",
    "datanode_raft_applied_index",
    "datanode_raft_leader_changes_total",
    "datanode_partition_replicas",
    "datanode_cluster_nodes",
    "datanode_cluster_repairs_in_progress",
    "datanode_cluster_repairs_total",
    "datanode_peer_rejected_total",
    "datanode_partitions_under_replicated",
];

/// Every `datanode_*` name in `text`, with histogram suffixes removed.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("datanode_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .fold(name.clone(), |n, s| n.strip_suffix(s).map_or(n.clone(), String::from));
        names.push(base);
        rest = &rest[at + name.len()..];
    }
    names
}

#[test]
fn the_dashboard_and_alert_rules_use_only_contract_metrics() {
    let dashboard = std::fs::read_to_string("config/grafana/datanode.json").unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let rules = std::fs::read_to_string("config/prometheus/alerts.yml").unwrap();
    for (file, text) in [("dashboard", &dashboard), ("alerts", &rules)] {
        let names = metric_names(text);
        assert!(!names.is_empty());
        for name in names {
            assert!(CONTRACT_METRICS.contains(&name.as_str()), "{file} uses {name}, not a contract metric");
        }
    }
    for alert in [
        "DatanodePartitionFaulted",
        "DatanodePartitionReadOnly",
        "DatanodeDiskFaulted",
        "DatanodeDiskDegraded",
        "DatanodeNotReady",
        "DatanodeTlsCertificateExpiresSoon",
        "DatanodePartitionUnderReplicated",
        "DatanodePartitionNoLeader",
        "DatanodeNodeDown",
        "DatanodeRepairStuck",
        "DatanodePeerRejected",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "missing {alert}");
    }
}

#[test]
fn the_example_configuration_is_accepted_as_written() {
    // check-config checks the disk paths as serve does, so the example's
    // /var/lib/datanode is moved into a scratch directory; nothing else changes.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("datanode")).unwrap();
    let example = std::fs::read_to_string("config/datanode.example.toml").unwrap();
    assert!(example.contains("path = \"/var/lib/datanode/d0\""));
    let moved = example.replace("/var/lib/datanode", &root.path().join("datanode").display().to_string());
    let file = root.path().join("datanode.toml");
    std::fs::write(&file, moved).unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_datanode")).arg("check-config").arg("--config").arg(&file).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let effective = String::from_utf8(output.stdout).unwrap();
    assert!(effective.contains(&format!("path = \"{}/datanode/d0\"", root.path().display())), "{effective}");
    let unmounted = Command::new(env!("CARGO_BIN_EXE_datanode"))
        .args(["check-config", "--config", "config/datanode.example.toml"])
        .output()
        .unwrap();
    if !std::path::Path::new("/var/lib/datanode").is_dir() {
        assert_eq!(unmounted.status.code(), Some(78), "a disk path whose parent is missing is refused");
    }
}

/// Every file under `dir` (recursively), skipping build output and VCS data.
fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if [".git", "target"].iter().any(|skip| name == *skip) {
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn the_repository_carries_its_own_contracts_and_cites_no_outside_design_document() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    files_under(root, &mut files);
    let mut citing = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for (number, line) in text.lines().enumerate() {
            // Spelled in two parts so that this file does not match itself.
            let (section, document) = (["DESIGN", " section"].concat(), ["DESIGN", ".md"].concat());
            if line.contains(&section) || line.contains(&document) {
                citing.push(format!("{}:{}: {line}", file.strip_prefix(root).unwrap_or(&file).display(), number + 1));
            }
        }
    }
    assert!(citing.is_empty(), "cites a design document that is not in the repository:\n{}", citing.join("\n"));
}
