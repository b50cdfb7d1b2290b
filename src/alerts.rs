//! Pushing alerts to Alertmanager (v2 API), from a thread of its own.
//!
//! About once a second the thread derives the set of alert conditions from
//! the node's state (faulted or read-only partitions, faulted or degraded
//! disks), pushes new ones as firing, pushes vanished ones as resolved
//! (`endsAt` = now), and re-sends firing ones every minute so Alertmanager
//! keeps them. A failed push is retried with exponential backoff. Nothing
//! here is on the data path: requests never wait for it.
//!
//! An alert's labels are those the shipped Prometheus rules give the same
//! condition (`alertname`, `severity`, `instance`, `job="datanode"`,
//! `partition`, `disk`, `state`), with `instance` the node id; so when
//! Prometheus labels its scrape target `instance = <node id>` (docs/API.md)
//! Alertmanager sees one alert, not two.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use datanode_partition::{DiskState, State};
use serde_json::{Value, json};

use crate::api::rfc3339;
use crate::node::Node;

const POLL: Duration = Duration::from_secs(1);
const RESEND: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Batches kept while Alertmanager cannot be reached.
const MAX_UNSENT: usize = 1000;

/// One alert condition: its labels (the identity) and annotations.
#[derive(Debug, Clone, PartialEq)]
struct Alert {
    labels: BTreeMap<&'static str, String>,
    summary: String,
    since: SystemTime,
}

/// The alert conditions of the node now, keyed by their labels.
fn current(node: &Node, instance: &str) -> BTreeMap<String, Alert> {
    let mut alerts = BTreeMap::new();
    let mut add =
        |name: &'static str, severity: &'static str, extra: Vec<(&'static str, String)>, summary: String, since| {
            let mut labels = BTreeMap::from([
                ("alertname", name.to_string()),
                ("severity", severity.to_string()),
                ("instance", instance.to_string()),
                ("job", "datanode".to_string()),
            ]);
            labels.extend(extra);
            let key = format!("{labels:?}");
            alerts.insert(key, Alert { labels, summary, since });
        };
    for partition in node.registry.partitions() {
        let health = partition.health().snapshot();
        let ids = vec![
            ("partition", partition.id().to_string()),
            ("disk", partition.disk().to_string()),
            ("state", health.state.name().to_string()),
        ];
        match &health.state {
            State::Faulted(fault) => add(
                "DatanodePartitionFaulted",
                "critical",
                ids,
                format!("Partition {} on disk {} is faulted: {}", partition.id(), partition.disk(), fault.message),
                health.since,
            ),
            State::ReadOnly(reasons) => add(
                "DatanodePartitionReadOnly",
                "warning",
                ids,
                format!(
                    "Partition {} on disk {} is read-only ({})",
                    partition.id(),
                    partition.disk(),
                    reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
                ),
                health.since,
            ),
            _ => {}
        }
    }
    // A faulted replica of a replicated partition alerts as a faulted
    // partition does (its group serves on with the others).
    for replica in node.cluster().map(|cluster| cluster.replicas()).unwrap_or_default() {
        if let crate::cluster::replica::ReplicaState::Faulted(reason) = replica.state() {
            let ids = vec![
                ("partition", replica.partition.to_string()),
                ("disk", replica.disk.clone()),
                ("state", "faulted".to_string()),
            ];
            let summary = format!(
                "Replica {} of partition {} on disk {} is faulted: {reason}",
                replica.replica_id, replica.partition, replica.disk
            );
            add("DatanodePartitionFaulted", "critical", ids, summary, replica.since());
        }
    }
    for disk in node.registry.disk_statuses() {
        let since = disk.last_probe.as_ref().map_or_else(SystemTime::now, |p| p.at);
        let summary = format!("Disk {} is {}: {}", disk.name, disk.state.as_str(), disk.reasons.join("; "));
        let labels = vec![("disk", disk.name), ("state", disk.state.as_str().to_string())];
        match disk.state {
            DiskState::Faulted => add("DatanodeDiskFaulted", "critical", labels, summary, since),
            DiskState::Degraded => add("DatanodeDiskDegraded", "warning", labels, summary, since),
            DiskState::Healthy => {}
        }
    }
    alerts
}

fn payload(alerts: &[(&Alert, Option<SystemTime>)]) -> Value {
    Value::Array(
        alerts
            .iter()
            .map(|(alert, ended)| {
                let mut body = json!({
                    "labels": alert.labels,
                    "annotations": { "summary": alert.summary },
                    "startsAt": rfc3339(alert.since),
                });
                if let Some(ended) = ended {
                    body["endsAt"] = rfc3339(*ended).into();
                }
                body
            })
            .collect(),
    )
}

/// Starts the pushing thread. It pushes while `[alerts] alertmanager_url`
/// is set (SIGHUP may set, change or remove it).
pub fn spawn(node: &Arc<Node>) {
    let node = Arc::clone(node);
    let instance = node.config.node.id.clone();
    let spawned = std::thread::Builder::new().name("alerts".into()).spawn(move || {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        let mut firing: BTreeMap<String, Alert> = BTreeMap::new();
        let mut unsent: Vec<Value> = Vec::new();
        let mut last_resend = Instant::now();
        let mut backoff = POLL;
        let mut target = None;
        while !node.draining.load(Ordering::Acquire) {
            let now_target = node.alert_target();
            if now_target != target {
                // A new Alertmanager hears every firing alert anew.
                target = now_target;
                firing.clear();
                unsent.clear();
            }
            let Some(base) = &target else {
                std::thread::sleep(POLL);
                continue;
            };
            let url = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
            let now = current(&node, &instance);
            let mut changes: Vec<(&Alert, Option<SystemTime>)> = Vec::new();
            for (key, alert) in &now {
                if !firing.contains_key(key) {
                    changes.push((alert, None));
                }
            }
            for (key, alert) in &firing {
                if !now.contains_key(key) {
                    changes.push((alert, Some(SystemTime::now())));
                }
            }
            if last_resend.elapsed() >= RESEND {
                changes.extend(now.values().map(|alert| (alert, None)));
                last_resend = Instant::now();
            }
            if !changes.is_empty() {
                unsent.push(payload(&changes));
                if unsent.len() > MAX_UNSENT {
                    // Alertmanager has been unreachable for long; the
                    // periodic re-send carries what is still firing.
                    unsent.remove(0);
                }
            }
            firing = now;
            let mut pause = POLL;
            while let Some(batch) = unsent.first() {
                match agent.post(&url).set("Content-Type", "application/json").send_string(&batch.to_string()) {
                    Ok(_) => {
                        unsent.remove(0);
                        backoff = POLL;
                    }
                    Err(error) => {
                        tracing::warn!(%error, url, retry_in = ?backoff, "alert push failed");
                        pause = backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        break;
                    }
                }
            }
            std::thread::sleep(pause);
        }
    });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the alert pusher");
    }
}
