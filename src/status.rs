//! `datanode status`: a running node's partitions and disks as tables.

use serde_json::Value;

fn fetch(agent: &ureq::Agent, url: &str) -> Result<Value, String> {
    let response = agent.get(url).call().map_err(|e| format!("{url}: {e}"))?;
    response.into_string().map_err(|e| e.to_string()).and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
}

/// A JSON value as a table cell: a string as it is, `null` as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The elements of a JSON array joined by `separator`, or `-` when none.
fn joined(value: &Value, separator: &str) -> String {
    let parts: Vec<String> = value.as_array().into_iter().flatten().map(text).collect();
    if parts.is_empty() { "-".into() } else { parts.join(separator) }
}

fn human_bytes(value: &Value) -> String {
    let Some(bytes) = value.as_u64() else { return "-".into() };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < units.len() {
        size /= 1024.0;
        unit += 1;
    }
    format!("{size:.1} {}", units[unit])
}

/// A probe's sync time with its precision: `412µs`, `3.27ms`, `1.20s`.
fn seconds_text(seconds: f64) -> String {
    match seconds {
        s if s < 0.001 => format!("{:.0}µs", s * 1e6),
        s if s < 1.0 => format!("{:.2}ms", s * 1e3),
        s => format!("{s:.2}s"),
    }
}

/// A disk's state as people read it: a healthy disk that is full is
/// `healthy, full` (its partitions are read-only; the disk is fine).
fn disk_state_text(disk: &Value) -> String {
    let state = text(&disk["state"]);
    let full = disk["reasons"].as_array().into_iter().flatten().any(|r| r == "disk_full");
    if state == "healthy" && full { "healthy, full".into() } else { state }
}

/// Prints both tables (or, with `json`, `{"partitions", "disks"}`);
/// returns the text or why the node could not be asked.
pub fn render(base: &str, json: bool, tls: &crate::tls::ClientTls) -> Result<String, String> {
    let agent = tls.agent(ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(10)))?;
    let base = base.trim_end_matches('/');
    let partitions = fetch(&agent, &format!("{base}/v1/partitions"))?;
    let disks = fetch(&agent, &format!("{base}/v1/disks"))?;
    if json {
        let both = serde_json::json!({ "partitions": partitions, "disks": disks });
        return serde_json::to_string_pretty(&both).map(|t| t + "\n").map_err(|e| e.to_string());
    }
    let mut out = partitions_table(&partitions);
    out.push('\n');
    out.push_str(&disks_table(&disks));
    Ok(out)
}

/// A `[PartitionStatus]` as a table.
pub fn partitions_table(partitions: &Value) -> String {
    let mut rows = vec![
        ["PARTITION", "DISK", "STATE", "REASONS", "BLOBS", "LAST LSN", "DURABLE", "LAST ERROR"]
            .map(String::from)
            .to_vec(),
    ];
    for p in partitions.as_array().into_iter().flatten() {
        rows.push(vec![
            text(&p["id"]),
            text(&p["disk"]),
            text(&p["state"]),
            joined(&p["reasons"], ","),
            text(&p["blobs"]),
            text(&p["wal"]["last_lsn"]),
            text(&p["wal"]["durable_lsn"]),
            text(&p["last_error"]["message"]),
        ]);
    }
    table(&rows)
}

/// A `[DiskStatus]` as a table.
pub fn disks_table(disks: &Value) -> String {
    let mut rows =
        vec![["DISK", "STATE", "FREE", "TOTAL", "PARTITIONS", "LAST PROBE", "REASONS"].map(String::from).to_vec()];
    for d in disks.as_array().into_iter().flatten() {
        let probe = match (&d["last_probe"]["ok"], &d["last_probe"]["sync_seconds"]) {
            (Value::Bool(true), seconds) => format!("ok {}", seconds_text(seconds.as_f64().unwrap_or(0.0))),
            (Value::Bool(false), _) => "failed".into(),
            _ => "-".into(),
        };
        rows.push(vec![
            text(&d["name"]),
            disk_state_text(d),
            human_bytes(&d["free_bytes"]),
            human_bytes(&d["total_bytes"]),
            joined(&d["partitions"], ","),
            probe,
            joined(&d["reasons"], "; "),
        ]);
    }
    table(&rows)
}

/// How long ago a heartbeat came, from its age in milliseconds.
fn ago_text(ms: &Value) -> String {
    match ms.as_u64() {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms ago"),
        Some(ms) if ms < 120_000 => format!("{:.1}s ago", ms as f64 / 1000.0),
        Some(ms) => format!("{}m ago", ms / 60_000),
    }
}

/// A replica of a `ClusterPartition` as `node/disk:state[:role]`, with
/// `(replaces N)` while it is the new replica of a repair.
fn replica_text(replica: &Value) -> String {
    let mut out = format!("{}/{}:{}", text(&replica["node"]), text(&replica["disk"]), text(&replica["state"]));
    if let Some(role) = replica["role"].as_str() {
        out.push(':');
        out.push_str(role);
    }
    if let Some(old) = replica.get("replaces").filter(|r| !r.is_null()) {
        out.push_str(&format!("(replaces {})", text(old)));
    }
    out
}

/// `GET /v1/cluster` as the epoch and metadata leader, then a table of
/// the nodes and one of the replicated partitions.
pub fn cluster_tables(map: &Value) -> String {
    let mut out = format!("epoch {}, metadata leader {}\n\n", text(&map["epoch"]), text(&map["meta_leader"]));
    let mut nodes = vec![["NODE", "STATE", "DRAINING", "REPLICAS", "LAST HEARTBEAT", "URL"].map(String::from).to_vec()];
    for n in map["nodes"].as_array().into_iter().flatten() {
        nodes.push(vec![
            text(&n["id"]),
            text(&n["state"]),
            if n["draining"] == true { "yes".into() } else { "no".into() },
            text(&n["replicas"]),
            ago_text(&n["last_heartbeat_ms"]),
            text(&n["advertise_url"]),
        ]);
    }
    out.push_str(&table(&nodes));
    out.push('\n');
    let mut partitions = vec![["PARTITION", "EPOCH", "LEADER", "REPAIR", "REPLICAS"].map(String::from).to_vec()];
    for p in map["partitions"].as_array().into_iter().flatten() {
        let replicas: Vec<&Value> = p["replicas"].as_array().into_iter().flatten().collect();
        let repairing = replicas.iter().any(|r| r.get("replaces").is_some_and(|v| !v.is_null()));
        let listed: Vec<String> = replicas.into_iter().map(replica_text).collect();
        partitions.push(vec![
            text(&p["id"]),
            text(&p["epoch"]),
            text(&p["leader"]),
            if repairing { "repairing".into() } else { "-".into() },
            if listed.is_empty() { "-".into() } else { listed.join(" ") },
        ]);
    }
    out.push_str(&table(&partitions));
    out
}

/// One `PartitionStatus` as `key: value` lines.
pub fn partition_details(p: &Value) -> String {
    let mut out = String::new();
    let probe = |key: &str, value: String| format!("{key:<12} {value}\n");
    out.push_str(&probe("partition", text(&p["id"])));
    out.push_str(&probe("disk", text(&p["disk"])));
    out.push_str(&probe("state", text(&p["state"])));
    out.push_str(&probe("reasons", joined(&p["reasons"], ", ")));
    out.push_str(&probe("since", text(&p["since"])));
    let error = &p["last_error"];
    let last_error = if error.is_null() {
        "-".to_string()
    } else {
        format!(
            "{} (op {}, errno {}) at {}",
            text(&error["message"]),
            text(&error["op"]),
            text(&error["errno"]),
            text(&error["at"])
        )
    };
    out.push_str(&probe("last error", last_error));
    let wal = &p["wal"];
    out.push_str(&probe(
        "wal",
        format!(
            "lsn {}..{} (durable {}), {} segments, {}",
            text(&wal["first_lsn"]),
            text(&wal["last_lsn"]),
            text(&wal["durable_lsn"]),
            text(&wal["segments"]),
            human_bytes(&wal["bytes"])
        ),
    ));
    out.push_str(&probe("blobs", format!("{} ({} live)", text(&p["blobs"]), human_bytes(&p["live_bytes"]))));
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_times_keep_their_precision_and_a_full_disk_says_so() {
        assert_eq!(seconds_text(0.000_412), "412µs");
        assert_eq!(seconds_text(0.003_27), "3.27ms");
        assert_eq!(seconds_text(1.2), "1.20s");
        let full = serde_json::json!({"state": "healthy", "reasons": ["disk_full"]});
        assert_eq!(disk_state_text(&full), "healthy, full");
        let slow = serde_json::json!({"state": "degraded", "reasons": ["slow sync: 0.6s"]});
        assert_eq!(disk_state_text(&slow), "degraded");
    }

    #[test]
    fn the_cluster_map_reads_as_tables_with_repairs_marked() {
        let map = serde_json::json!({
            "epoch": 4, "meta_leader": "dn-1",
            "nodes": [
                {"id": "dn-1", "advertise_url": "http://10.0.0.1:7070", "state": "up", "draining": false,
                 "replicas": 2, "last_heartbeat_ms": 120},
                {"id": "dn-2", "advertise_url": "http://10.0.0.2:7070", "state": "down", "draining": true,
                 "replicas": 1, "last_heartbeat_ms": null}
            ],
            "partitions": [{"id": 7, "epoch": 2, "leader": "dn-1", "replicas": [
                {"replica_id": 1, "node": "dn-1", "disk": "d0", "state": "healthy", "role": "leader"},
                {"replica_id": 2, "node": "dn-2", "disk": "d0", "state": "down", "role": null},
                {"replica_id": 5, "node": "dn-1", "disk": "d1", "state": "loading", "role": "learner", "replaces": 2}
            ]}]
        });
        let out = cluster_tables(&map);
        assert!(out.starts_with("epoch 4, metadata leader dn-1\n"), "{out}");
        let line = |start: &str| out.lines().find(|l| l.starts_with(start)).unwrap_or_default().to_string();
        assert!(line("dn-1 ").contains("120ms ago") && line("dn-1 ").contains("http://10.0.0.1:7070"), "{out}");
        assert!(line("dn-2 ").contains("yes") && line("dn-2 ").contains(" - "), "{out}");
        let p = line("7 ");
        assert!(p.contains("repairing"), "{out}");
        assert!(p.contains("dn-1/d0:healthy:leader dn-2/d0:down dn-1/d1:loading:learner(replaces 2)"), "{out}");
    }
}
