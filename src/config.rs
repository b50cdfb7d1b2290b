//! The daemon's configuration: TOML, with the precedence
//! embedded defaults < file < `DATANODE_*` environment (`__` nests, e.g.
//! `DATANODE_LIMITS__MAX_BLOB_SIZE=64KiB`) < command-line flags.
//!
//! Every `DATANODE_*` variable is configuration and must name a key
//! (`DATANODE_<SECTION>__<KEY>`); one that names none is refused, naming
//! the variable (and the key it probably meant). The only exceptions are
//! the test harness's variables: `DATANODE_REQUIRE_KERNEL_TESTS` and
//! `DATANODE_TEST_*`.
//!
//! Sizes are written the human way (`"64MiB"`, `"4KiB"`, `"1MB"` or plain
//! bytes: KB, MB, GB, TB are powers of 1000, KiB, MiB, GiB, TiB powers of
//! 1024), durations too (`"30s"`, `"10ms"`, `"5m"`). Unknown keys are
//! errors naming the file, the line and the key.

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a configuration was refused (exit code 78).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The node itself.
    pub node: NodeConfig,
    /// Disks, in order.
    pub disk: Vec<DiskConfig>,
    /// Write-ahead logs.
    pub wal: WalConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Probes and thresholds.
    pub health: HealthConfig,
    /// Compaction by policy.
    pub compaction: CompactionConfig,
    /// Alert delivery.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// TLS on the HTTP listener; plain HTTP when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Who may write.
    pub auth: AuthConfig,
    /// Membership of a cluster; a single node, partitions unreplicated,
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: the node joins a cluster; partitions created through the
/// cluster API are replicated (one Raft group each).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Node-to-node listener (Raft traffic), a port of its own.
    pub peer_addr: SocketAddr,
    /// How clients and peers reach this node's HTTP API (redirects point
    /// here).
    pub advertise_url: String,
    /// The metadata group's first voters, `node_id@host:port` (their peer
    /// addresses), 1 to 5 of them, the same list on every node.
    pub seeds: Vec<String>,
    /// Replicas of a partition unless its creation asks otherwise.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: u64,
    /// Raft heartbeats of a leader.
    #[serde(default = "default_heartbeat_interval", with = "human_duration")]
    pub heartbeat_interval: Duration,
    /// A leader is not replaced within this long of its last heartbeat
    /// (its lease); a follower that heard none for a random time between
    /// half of it and it stands for election.
    #[serde(default = "default_election_timeout", with = "human_duration")]
    pub election_timeout: Duration,
    /// No heartbeat for this long: the node counts as down.
    #[serde(default = "default_node_dead_after", with = "human_duration")]
    pub node_dead_after: Duration,
    /// A replica faulted or on a down node this long is replaced.
    #[serde(default = "default_repair_after", with = "human_duration")]
    pub repair_after: Duration,
    /// A replica builds a snapshot of its state (and may purge its log up
    /// to it) after this many entries since the last one.
    #[serde(default = "default_snapshot_logs")]
    pub snapshot_logs: u64,
    /// File holding the cluster secret (at least 32 bytes, surrounding
    /// whitespace trimmed), the same on every node: every peer connection
    /// proves it in a handshake before any Raft message. Peers are not
    /// authenticated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
}

fn default_snapshot_logs() -> u64 {
    10_000
}

fn default_replication_factor() -> u64 {
    3
}

fn default_heartbeat_interval() -> Duration {
    Duration::from_millis(250)
}

fn default_election_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_node_dead_after() -> Duration {
    Duration::from_secs(10)
}

fn default_repair_after() -> Duration {
    Duration::from_secs(30)
}

/// One entry of `cluster.seeds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// Its `node.id`.
    pub node: String,
    /// Its `cluster.peer_addr`.
    pub peer_addr: SocketAddr,
}

impl ClusterConfig {
    /// The parsed seeds, in order (their position, from 1, is their id in
    /// the metadata group).
    pub fn seed_list(&self) -> Result<Vec<Seed>, ConfigError> {
        self.seeds
            .iter()
            .enumerate()
            .map(|(i, seed)| {
                let key = format!("cluster.seeds[{i}]");
                let (node, addr) = seed
                    .split_once('@')
                    .filter(|(node, _)| !node.is_empty())
                    .ok_or_else(|| ConfigError(format!("{key} = {seed:?} is not node_id@host:port")))?;
                let peer_addr = resolve_addr(&key, addr)?;
                Ok(Seed { node: node.to_string(), peer_addr })
            })
            .collect()
    }
}

/// `[tls]`: the listener serves HTTPS only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The node's certificate chain (PEM, leaf first).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by one of
    /// these CAs (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

/// `[auth]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `off` or `required`: PUT/DELETE of blobs need a bearer token.
    pub data_tokens: String,
    /// Static data tokens, one per line (several valid at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Key of signed data tokens (scoped to a partition and an expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// Signed tokens valid further ahead than this are refused.
    #[serde(with = "human_duration")]
    pub max_token_ttl: Duration,
    /// Serve off loopback although writes need no credential (no data
    /// tokens, no client certificates).
    pub allow_unauthenticated: bool,
    /// A secret file (tokens, keys) other users may read: `warn` or `refuse`.
    pub readable_secret_files: String,
}

/// `[node]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id (logs, the `instance` label of pushed alerts); the host
    /// name when empty, resolved at load.
    #[serde(default)]
    pub id: String,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// File holding the admin bearer token; required off loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// How long a graceful shutdown may take.
    #[serde(with = "human_duration")]
    pub shutdown_timeout: Duration,
    /// Partitions created on first start when none exist.
    pub bootstrap_partitions: u64,
    /// `auto` (JSON lines when stdout is not a terminal, text when it is),
    /// `json` or `text`; `--log-format` overrides it.
    pub log_format: String,
    /// What is logged, as a `RUST_LOG`-style filter (`info`,
    /// `warn,datanode=debug`); `RUST_LOG` overrides it. Reloaded on SIGHUP.
    pub log_filter: String,
}

/// `[[disk]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// `[a-z0-9_-]{1,32}`.
    pub name: String,
    /// Where its partitions live.
    pub path: PathBuf,
}

/// `[wal]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WalConfig {
    /// Segment size.
    #[serde(with = "human_size")]
    pub segment_size: u64,
    /// `sync`, `interval` or `none`.
    pub durability: String,
    /// Sync period under `interval`.
    #[serde(with = "human_duration")]
    pub sync_interval: Duration,
    /// Most bytes per group-commit batch.
    #[serde(with = "human_size")]
    pub max_batch_bytes: u64,
    /// `auto`, `std` or `uring`.
    pub io_backend: String,
    /// Most threads carrying the logs' I/O on one disk, whatever the
    /// number of partitions.
    pub io_threads_per_disk: u64,
    /// Purged segments each log keeps to write into again (0: none).
    pub recycled_segments: u64,
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest blob.
    #[serde(with = "human_size")]
    pub max_blob_size: u64,
    /// Queue bound of each partition's log.
    #[serde(with = "human_size")]
    pub max_queued_bytes_per_partition: u64,
    /// A request that takes longer gets 503.
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// Longest wait for a request head, and longest pause inside a body.
    #[serde(with = "human_duration")]
    pub header_timeout: Duration,
    /// Blocking operations (reads that miss the page cache, admin work)
    /// one disk may have running at once.
    pub max_blocking_per_disk: u64,
}

/// `[health]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// How often disks are probed.
    #[serde(with = "human_duration")]
    pub probe_interval: Duration,
    /// Used/total at which partitions go read-only.
    pub disk_full_ratio: f64,
    /// Used/total at which they may write again.
    pub disk_resume_ratio: f64,
    /// A probe sync slower than this degrades the disk.
    #[serde(with = "human_duration")]
    pub slow_sync: Duration,
    /// How often the verifier runs.
    #[serde(with = "human_duration")]
    pub verify_interval: Duration,
}

/// `[compaction]`: the node compacts partitions by itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompactionConfig {
    /// Compact a partition when garbage / stored bytes reaches this ...
    pub garbage_ratio: f64,
    /// ... and it holds at least this much garbage.
    #[serde(with = "human_size")]
    pub min_garbage: u64,
    /// How often each disk's partitions are looked at.
    #[serde(with = "human_duration")]
    pub check_interval: Duration,
    /// Copy budget per disk, so compaction does not take the disk from
    /// foreground writes.
    #[serde(with = "human_size")]
    pub max_bytes_per_sec: u64,
}

/// `[alerts]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Alertmanager to push alerts to (v2 API); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager_url: Option<String>,
}

/// The embedded default: one disk `d0` at `./data`, loopback, 4 partitions.
pub const DEFAULT_TOML: &str = r#"
[node]
http_addr = "127.0.0.1:7070"
shutdown_timeout = "30s"
bootstrap_partitions = 4
log_format = "auto"
log_filter = "info"

[[disk]]
name = "d0"
path = "./data"

[wal]
segment_size = "64MiB"
durability = "sync"
sync_interval = "10ms"
max_batch_bytes = "4MiB"
io_backend = "std"
io_threads_per_disk = 16
recycled_segments = 0

[limits]
max_blob_size = "16MiB"
max_queued_bytes_per_partition = "64MiB"
request_timeout = "30s"
header_timeout = "10s"
max_blocking_per_disk = 16

[health]
probe_interval = "5s"
disk_full_ratio = 0.95
disk_resume_ratio = 0.90
slow_sync = "500ms"
verify_interval = "60s"

[compaction]
garbage_ratio = 0.5
min_garbage = "64MiB"
check_interval = "1s"
max_bytes_per_sec = "64MiB"

[auth]
data_tokens = "off"
max_token_ttl = "24h"
allow_unauthenticated = false
readable_secret_files = "warn"
"#;

/// Most voters of the metadata group (`cluster.seeds`).
const MAX_SEEDS: usize = 5;
/// Most replicas of one partition.
const MAX_REPLICATION_FACTOR: u64 = 7;
/// Most partitions `node.bootstrap_partitions` may ask for.
const MAX_BOOTSTRAP_PARTITIONS: u64 = 10_000;
/// Most blocking operations one disk may hold (the runtime has 512
/// blocking threads for every disk together).
const MAX_BLOCKING_PER_DISK: u64 = 128;
/// Bounds of `wal.segment_size`.
const MIN_SEGMENT: u64 = 64 << 10;
const MAX_SEGMENT: u64 = 4 << 30;
/// Most bytes a partition's log can queue (its queue counts in `u32`).
const MAX_QUEUE: u64 = 4 << 30;

/// A size within `min..=max`, or an error naming key and value.
fn check_size(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(ConfigError(format!("{key} = \"{}\" is outside {}..={}", size_text(value), size_text(min), size_text(max))))
}

/// Keys without a default (absent unless set), besides those of [`DEFAULT_TOML`].
const OPTIONAL_KEYS: [&str; 18] = [
    "node.id",
    "node.admin_token_file",
    "alerts.alertmanager_url",
    "tls.cert_file",
    "tls.key_file",
    "tls.client_ca_file",
    "auth.token_file",
    "auth.signing_key_file",
    "cluster.peer_addr",
    "cluster.advertise_url",
    "cluster.seeds",
    "cluster.replication_factor",
    "cluster.heartbeat_interval",
    "cluster.election_timeout",
    "cluster.node_dead_after",
    "cluster.repair_after",
    "cluster.snapshot_logs",
    "cluster.secret_file",
];

/// `DATANODE_*` variables that are not configuration: the test harness's.
fn not_configuration(name: &str) -> bool {
    name == "DATANODE_REQUIRE_KERNEL_TESTS" || name.starts_with("DATANODE_TEST_")
}

/// Every key a file or the environment may set, as `section.key`
/// (`disk.name` and `disk.path` for the entries of `[[disk]]`).
fn known_keys() -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = OPTIONAL_KEYS.iter().map(|k| k.to_string()).collect();
    keys.extend(["disk.name".to_string(), "disk.path".to_string()]);
    if let Ok(tree) = DEFAULT_TOML.parse::<toml::Table>() {
        for (section, value) in tree {
            if let toml::Value::Table(table) = value {
                keys.extend(table.keys().map(|key| format!("{section}.{key}")));
            }
        }
    }
    keys
}

/// The first line of `text` that sets `key` (`key = ...`), 1-based.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| line.trim_start().strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')))
        .map(|i| i + 1)
}

/// Refuses a key of `file` that configures nothing, naming file, line and key.
fn check_file_keys(path: &Path, text: &str, table: &toml::Table) -> Result<(), ConfigError> {
    let known = known_keys();
    let unknown = |key: String, leaf: &str| {
        let at = line_of(text, leaf).map_or_else(|| path.display().to_string(), |n| format!("{}:{n}", path.display()));
        ConfigError(format!("{at}: unknown key {key}"))
    };
    for (section, value) in table {
        let entries: Vec<&toml::Table> = match value {
            toml::Value::Table(inner) => vec![inner],
            toml::Value::Array(items) if section == "disk" => items.iter().filter_map(toml::Value::as_table).collect(),
            _ => return Err(unknown(section.clone(), section)),
        };
        if !known.iter().any(|k| k.split('.').next() == Some(section.as_str())) {
            return Err(unknown(format!("[{section}]"), section));
        }
        for entry in entries {
            for key in entry.keys() {
                let full = format!("{section}.{key}");
                if !known.contains(&full) {
                    return Err(unknown(full, key));
                }
            }
        }
    }
    Ok(())
}

/// The key a `DATANODE_*` variable sets, or why it sets none (naming it,
/// and the variable it probably meant).
fn env_key(name: &str) -> Result<Vec<String>, ConfigError> {
    let rest = name.strip_prefix("DATANODE_").unwrap_or(name).to_ascii_lowercase();
    let path: Vec<String> = rest.split("__").map(String::from).collect();
    let known = known_keys();
    if path.len() == 2 && path[0] != "disk" && known.contains(&path.join(".")) {
        return Ok(path);
    }
    let flat = rest.replace("__", "_");
    let meant = known
        .iter()
        .filter(|key| !key.starts_with("disk."))
        .find(|key| key.replace('.', "_") == flat)
        .map(|key| format!(" (did you mean DATANODE_{}?)", key.replacen('.', "__", 1).to_ascii_uppercase()))
        .unwrap_or_default();
    let disk = if path[0] == "disk" || flat.starts_with("disk_") {
        "; disks are set in the file or with --data-dir"
    } else {
        ""
    };
    Err(ConfigError(format!(
        "environment variable {name} names no configuration key{meant}{disk}: configuration variables are \
         DATANODE_<SECTION>__<KEY>, e.g. DATANODE_WAL__SEGMENT_SIZE"
    )))
}

/// `node.http_addr` as an address: `IP:PORT` as written, or `HOST:PORT`
/// resolved (an IPv4 address first), else an error naming key and value.
fn resolve_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let resolved: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| ConfigError(format!("{key} = {text:?} is not IP:PORT or HOST:PORT that resolves: {e}")))?
        .collect();
    resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or(resolved.first())
        .copied()
        .ok_or_else(|| ConfigError(format!("{key} = {text:?} resolves to no address")))
}

/// Flags that override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--data-dir`: the disk list becomes one disk `d0` at this path.
    pub data_dir: Option<PathBuf>,
    /// `--http-addr`.
    pub http_addr: Option<String>,
}

impl Config {
    /// Builds the effective configuration: defaults, then `file` (if
    /// any), then `env` (`DATANODE_*` pairs), then `overrides`.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = DEFAULT_TOML.parse().map_err(|e| ConfigError(format!("embedded default: {e}")))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
            let from_file: toml::Table = text.parse().map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            check_file_keys(path, &text, &from_file)?;
            merge(&mut tree, from_file);
        }
        let mut env: Vec<(String, String)> =
            env.into_iter().filter(|(name, _)| name.starts_with("DATANODE_") && !not_configuration(name)).collect();
        env.sort();
        for (name, value) in env {
            let path = env_key(&name)?;
            set_path(&mut tree, &path, parse_env_value(&value)).map_err(|e| ConfigError(format!("{name}: {e}")))?;
        }
        if let Some(dir) = &overrides.data_dir {
            let mut disk = toml::Table::new();
            disk.insert("name".into(), "d0".into());
            disk.insert("path".into(), dir.to_string_lossy().into_owned().into());
            tree.insert("disk".into(), toml::Value::Array(vec![toml::Value::Table(disk)]));
        }
        if let Some(addr) = &overrides.http_addr {
            set_path(&mut tree, &["node".into(), "http_addr".into()], addr.clone().into())
                .map_err(|e| ConfigError(format!("--http-addr: {e}")))?;
        }
        if let Some(toml::Value::Table(node)) = tree.get_mut("node")
            && let Some(toml::Value::String(addr)) = node.get("http_addr")
        {
            let resolved = resolve_addr("node.http_addr", addr)?;
            node.insert("http_addr".into(), resolved.to_string().into());
        }
        // serde_path_to_error names the key whose value did not parse.
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
            let path = e.path().to_string();
            ConfigError(format!("{path}: {}", e.into_inner().message()))
        })?;
        let mut config = config;
        if config.node.id.is_empty() {
            config.node.id = hostname();
        }
        config.validate()?;
        Ok(config)
    }

    /// Refuses every value that cannot work (a zero or absurd size or
    /// interval, ratios out of order, a batch larger than the queue), naming
    /// the key and the value.
    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        if self.disk.is_empty() {
            return fail("at least one [[disk]] is required".into());
        }
        for (i, disk) in self.disk.iter().enumerate() {
            let valid = (1..=32).contains(&disk.name.len())
                && disk.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
            if !valid {
                return fail(format!("disk[{i}].name = {:?} must match [a-z0-9_-]{{1,32}}", disk.name));
            }
            if disk.path.as_os_str().is_empty() {
                return fail(format!("disk[{i}].path = \"\" names no directory"));
            }
            if self.disk[..i].iter().any(|other| other.name == disk.name || other.path == disk.path) {
                return fail(format!("disk[{i}] ({:?}) repeats a name or path", disk.name));
            }
        }
        if self.node.bootstrap_partitions > MAX_BOOTSTRAP_PARTITIONS {
            return fail(format!(
                "node.bootstrap_partitions = {} is more than {MAX_BOOTSTRAP_PARTITIONS}",
                self.node.bootstrap_partitions
            ));
        }
        if !["auto", "json", "text"].contains(&self.node.log_format.as_str()) {
            return fail(format!("node.log_format = {:?} is not auto, json or text", self.node.log_format));
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.node.log_filter) {
            return fail(format!("node.log_filter = {:?} is not a filter: {error}", self.node.log_filter));
        }
        let id_ok = (1..=64).contains(&self.node.id.len())
            && self.node.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return fail(format!("node.id = {:?} must match [A-Za-z0-9._-]{{1,64}}", self.node.id));
        }
        if !["sync", "interval", "none"].contains(&self.wal.durability.as_str()) {
            return fail(format!("wal.durability = {:?} is not sync, interval or none", self.wal.durability));
        }
        if self.wal.recycled_segments > 8 {
            return fail(format!("wal.recycled_segments = {} is outside 0..=8", self.wal.recycled_segments));
        }
        if !(1..=256).contains(&self.wal.io_threads_per_disk) {
            return fail(format!("wal.io_threads_per_disk = {} is outside 1..=256", self.wal.io_threads_per_disk));
        }
        if self.wal.io_backend.parse::<datanode_wal::IoBackend>().is_err() {
            return fail(format!("wal.io_backend = {:?} is not auto, std or uring", self.wal.io_backend));
        }
        let queue = self.limits.max_queued_bytes_per_partition;
        check_size("limits.max_queued_bytes_per_partition", queue, 1, MAX_QUEUE)?;
        check_size("wal.segment_size", self.wal.segment_size, MIN_SEGMENT, MAX_SEGMENT)?;
        check_size("wal.max_batch_bytes", self.wal.max_batch_bytes, 1, queue)
            .map_err(|e| ConfigError(format!("{} (at most limits.max_queued_bytes_per_partition)", e.0)))?;
        check_size("limits.max_blob_size", self.limits.max_blob_size, 1, queue)
            .map_err(|e| ConfigError(format!("{} (at most limits.max_queued_bytes_per_partition)", e.0)))?;
        if !(1..=MAX_BLOCKING_PER_DISK).contains(&self.limits.max_blocking_per_disk) {
            return fail(format!(
                "limits.max_blocking_per_disk = {} is outside 1..={MAX_BLOCKING_PER_DISK}",
                self.limits.max_blocking_per_disk
            ));
        }
        let hour = Duration::from_secs(3600);
        let day = 24 * hour;
        for (key, value, min, max) in [
            ("node.shutdown_timeout", self.node.shutdown_timeout, Duration::from_millis(100), hour),
            ("wal.sync_interval", self.wal.sync_interval, Duration::from_millis(1), hour),
            ("limits.request_timeout", self.limits.request_timeout, Duration::from_millis(10), hour),
            ("limits.header_timeout", self.limits.header_timeout, Duration::from_millis(100), hour),
            ("health.probe_interval", self.health.probe_interval, Duration::from_millis(10), day),
            ("health.slow_sync", self.health.slow_sync, Duration::from_millis(1), hour),
            ("health.verify_interval", self.health.verify_interval, Duration::from_millis(10), day),
            ("compaction.check_interval", self.compaction.check_interval, Duration::from_millis(10), day),
        ] {
            if !(min..=max).contains(&value) {
                return fail(format!(
                    "{key} = \"{}\" is outside {}..={}",
                    duration_text(value),
                    duration_text(min),
                    duration_text(max)
                ));
            }
        }
        let (full, resume) = (self.health.disk_full_ratio, self.health.disk_resume_ratio);
        if !(0.0 < full && full <= 1.0) {
            return fail(format!("health.disk_full_ratio = {full} is outside 0 < ratio <= 1"));
        }
        if !(0.0 < resume && resume < full) {
            return fail(format!(
                "health.disk_resume_ratio = {resume} must be above 0 and below health.disk_full_ratio = {full}"
            ));
        }
        let ratio = self.compaction.garbage_ratio;
        if !(0.0 < ratio && ratio <= 1.0) {
            return fail(format!("compaction.garbage_ratio = {ratio} is outside 0 < ratio <= 1"));
        }
        check_size("compaction.max_bytes_per_sec", self.compaction.max_bytes_per_sec, 64 << 10, u64::MAX)?;
        if let Some(url) = &self.alerts.alertmanager_url {
            let rest = url.strip_prefix("http://").unwrap_or_default();
            if rest.is_empty() || rest.starts_with('/') {
                return fail(format!("alerts.alertmanager_url = {url:?} is not an http:// URL with a host"));
            }
        }
        if !["off", "required"].contains(&self.auth.data_tokens.as_str()) {
            return fail(format!("auth.data_tokens = {:?} is not off or required", self.auth.data_tokens));
        }
        if self.auth.data_tokens == "required" && self.auth.token_file.is_none() && self.auth.signing_key_file.is_none()
        {
            return fail(
                "auth.data_tokens = \"required\" needs auth.token_file or auth.signing_key_file (or both)".into(),
            );
        }
        if self.auth.data_tokens == "required" && self.node.admin_token_file.is_none() {
            return fail(
                "auth.data_tokens = \"required\" needs node.admin_token_file: else admin calls (delete a \
                 partition, install a snapshot) would be open to anyone who may not even write"
                    .into(),
            );
        }
        if self.auth.max_token_ttl < Duration::from_secs(1) {
            return fail(format!(
                "auth.max_token_ttl = \"{}\" is shorter than 1s",
                duration_text(self.auth.max_token_ttl)
            ));
        }
        if !["warn", "refuse"].contains(&self.auth.readable_secret_files.as_str()) {
            return fail(format!(
                "auth.readable_secret_files = {:?} is not warn or refuse",
                self.auth.readable_secret_files
            ));
        }
        if !self.node.http_addr.ip().is_loopback() {
            if self.node.admin_token_file.is_none() {
                return fail(format!(
                    "node.http_addr = {} is not loopback: node.admin_token_file is required",
                    self.node.http_addr
                ));
            }
            let client_certificates = self.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
            if self.auth.data_tokens != "required" && !client_certificates && !self.auth.allow_unauthenticated {
                return fail(format!(
                    "node.http_addr = {} is not loopback and anyone who reaches it could write: set \
                     auth.data_tokens = \"required\" or tls.client_ca_file, or auth.allow_unauthenticated = true",
                    self.node.http_addr
                ));
            }
        }
        if let Some(cluster) = &self.cluster {
            self.validate_cluster(cluster)?;
        }
        Ok(())
    }

    fn validate_cluster(&self, cluster: &ClusterConfig) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        let seeds = cluster.seed_list()?;
        if !(1..=MAX_SEEDS).contains(&seeds.len()) {
            return fail(format!("cluster.seeds has {} entries: 1 to {MAX_SEEDS} metadata voters", seeds.len()));
        }
        for (i, seed) in seeds.iter().enumerate() {
            if seeds[..i].iter().any(|other| other.node == seed.node || other.peer_addr == seed.peer_addr) {
                return fail(format!("cluster.seeds[{i}] = {:?} repeats a node id or an address", cluster.seeds[i]));
            }
        }
        if let Some(me) = seeds.iter().find(|seed| seed.node == self.node.id)
            && me.peer_addr.port() != cluster.peer_addr.port()
        {
            return fail(format!(
                "cluster.seeds names this node ({}) at {}, but cluster.peer_addr = {}",
                self.node.id, me.peer_addr, cluster.peer_addr
            ));
        }
        if cluster.peer_addr == self.node.http_addr {
            return fail(format!(
                "cluster.peer_addr = {} is node.http_addr too: it needs a port of its own",
                cluster.peer_addr
            ));
        }
        let url_ok = ["http://", "https://"].iter().any(|scheme| {
            cluster
                .advertise_url
                .strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
        });
        if !url_ok {
            return fail(format!(
                "cluster.advertise_url = {:?} is not an http:// or https:// URL",
                cluster.advertise_url
            ));
        }
        if !(1..=MAX_REPLICATION_FACTOR).contains(&cluster.replication_factor) {
            return fail(format!(
                "cluster.replication_factor = {} is outside 1..={MAX_REPLICATION_FACTOR}",
                cluster.replication_factor
            ));
        }
        let at_least = |key: &str, value: Duration, min: Duration| {
            if value < min {
                return Err(ConfigError(format!(
                    "cluster.{key} = \"{}\" is below {}",
                    duration_text(value),
                    duration_text(min)
                )));
            }
            Ok(())
        };
        at_least("heartbeat_interval", cluster.heartbeat_interval, Duration::from_millis(10))?;
        if cluster.election_timeout < cluster.heartbeat_interval * 4 {
            return fail(format!(
                "cluster.election_timeout = \"{}\" must be at least four times cluster.heartbeat_interval = \"{}\"",
                duration_text(cluster.election_timeout),
                duration_text(cluster.heartbeat_interval)
            ));
        }
        if cluster.node_dead_after < cluster.heartbeat_interval * 2 {
            return fail(format!(
                "cluster.node_dead_after = \"{}\" must be at least twice cluster.heartbeat_interval",
                duration_text(cluster.node_dead_after)
            ));
        }
        at_least("repair_after", cluster.repair_after, Duration::from_secs(1))?;
        if cluster.snapshot_logs < 10 {
            return fail(format!("cluster.snapshot_logs = {} is below 10", cluster.snapshot_logs));
        }
        if let Some(path) = &cluster.secret_file
            && path.as_os_str().is_empty()
        {
            return fail("cluster.secret_file = \"\" names no file".into());
        }
        if self.peer_tls() && cluster.secret_file.is_some() {
            return fail(
                "cluster.secret_file and tls.client_ca_file are both set: with client certificates the peer port is \
                 mutual TLS with node certificates, and the secret would not be used; remove cluster.secret_file"
                    .into(),
            );
        }
        // Off loopback, anyone who reaches the peer port could send Raft
        // messages unless peers prove themselves: the cluster secret, or
        // node certificates. ([tls] without client certificates does not
        // cover the peer port.)
        if !cluster.peer_addr.ip().is_loopback()
            && cluster.secret_file.is_none()
            && !self.peer_tls()
            && !self.auth.allow_unauthenticated
        {
            return fail(format!(
                "cluster.peer_addr = {} is not loopback and anyone who reaches it could send Raft messages: set \
                 cluster.secret_file (the same secret on every node) or tls.client_ca_file (mutual TLS with node \
                 certificates), or auth.allow_unauthenticated = true on a network you trust",
                cluster.peer_addr
            ));
        }
        Ok(())
    }

    /// Whether the peer port is mutual TLS: a node of a cluster with
    /// `[tls]` and `tls.client_ca_file`.
    pub fn peer_tls(&self) -> bool {
        self.cluster.is_some() && self.tls.as_ref().is_some_and(|tls| tls.client_ca_file.is_some())
    }

    /// The security posture in one line each, for `check-config` and the
    /// start-up log: TLS, client certificates, admin and data credentials.
    pub fn security_posture(&self) -> Vec<String> {
        let tls = match &self.tls {
            None => "tls: off (plain HTTP)".to_string(),
            Some(tls) => format!(
                "tls: on ({}), client certificates: {}",
                tls.cert_file.display(),
                if tls.client_ca_file.is_some() { "required" } else { "off" }
            ),
        };
        let admin = match &self.node.admin_token_file {
            Some(_) => "admin calls: bearer token required",
            None => "admin calls: open (no node.admin_token_file)",
        };
        let data = match (self.auth.data_tokens.as_str(), &self.auth.token_file, &self.auth.signing_key_file) {
            ("required", Some(_), Some(_)) => "writes: data token required (static or signed)",
            ("required", Some(_), None) => "writes: data token required (static)",
            ("required", None, _) => "writes: data token required (signed)",
            _ if self.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()) => {
                "writes: client certificate required (auth.data_tokens = \"off\")"
            }
            _ => "writes: open (auth.data_tokens = \"off\")",
        };
        let exposure = if self.node.http_addr.ip().is_loopback() { "loopback only" } else { "reachable off this host" };
        let mut posture =
            vec![format!("listener: {} ({exposure})", self.node.http_addr), tls, admin.to_string(), data.to_string()];
        if let Some(cluster) = &self.cluster {
            let exposure =
                if cluster.peer_addr.ip().is_loopback() { "loopback only" } else { "reachable off this host" };
            let peers = match &cluster.secret_file {
                _ if self.peer_tls() => "peers use mutual TLS with node certificates (tls.client_ca_file)",
                Some(_) => "peers prove the cluster secret (cluster.secret_file)",
                None => "peers unauthenticated (no cluster.secret_file or tls.client_ca_file)",
            };
            posture.push(format!("peer port: {} ({exposure}), {peers}", cluster.peer_addr));
        }
        posture
    }

    /// The admin token, if one is configured. A configured but unreadable
    /// or empty token file is an error.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.node.admin_token_file else { return Ok(None) };
        let token = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read admin token {}: {e}", path.display())))?;
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError(format!("admin token file {} is empty", path.display())));
        }
        Ok(Some(token))
    }

    /// What `serve` checks beyond the values, and `check-config` alike:
    /// the admin token file (readable, not empty; a warning when other
    /// users may read it) and every disk path (a directory this process may
    /// write, or one that can be created inside an existing directory: a
    /// disk is never created with its parents, so an unmounted mount point
    /// is not filled instead). A disk that exists but fails (EIO, read-only
    /// after errors) is a warning, not an error: the node starts and faults
    /// its partitions. With `create`, missing disk directories are made.
    pub fn preflight(&self, create: bool) -> Result<Checked, ConfigError> {
        let mut warnings = Vec::new();
        let admin_token = self.admin_token()?;
        let secrets = [
            ("node.admin_token_file", self.node.admin_token_file.as_ref()),
            ("auth.token_file", self.auth.token_file.as_ref().filter(|_| self.auth.data_tokens == "required")),
            (
                "auth.signing_key_file",
                self.auth.signing_key_file.as_ref().filter(|_| self.auth.data_tokens == "required"),
            ),
            ("tls.key_file", self.tls.as_ref().map(|t| &t.key_file)),
            ("cluster.secret_file", self.cluster.as_ref().and_then(|c| c.secret_file.as_ref())),
        ];
        for (key, path) in secrets.into_iter().filter_map(|(key, path)| Some((key, path?))) {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0);
            if mode & 0o077 != 0 {
                let problem = format!(
                    "{key} = {} is readable by other users (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                );
                if self.auth.readable_secret_files == "refuse" {
                    return Err(ConfigError(format!("{problem} (auth.readable_secret_files = \"refuse\")")));
                }
                warnings.push(problem);
            }
        }
        if self.tls.is_none() && !self.node.http_addr.ip().is_loopback() {
            warnings.push(format!(
                "node.http_addr = {} is not loopback and [tls] is not set: tokens and data cross the network in \
                 plain text",
                self.node.http_addr
            ));
        }
        for (i, disk) in self.disk.iter().enumerate() {
            let key = format!("disk[{i}].path = {:?}", disk.path.display().to_string());
            match std::fs::metadata(&disk.path) {
                Ok(meta) if meta.is_dir() => {
                    if let Some(warning) = writable(&key, &disk.path)? {
                        warnings.push(warning);
                    }
                }
                Ok(_) => return Err(ConfigError(format!("{key} is not a directory"))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let parent = match disk.path.parent() {
                        Some(parent) if !parent.as_os_str().is_empty() => parent,
                        _ => Path::new("."),
                    };
                    if !std::fs::metadata(parent).is_ok_and(|m| m.is_dir()) {
                        return Err(ConfigError(format!(
                            "{key} does not exist, nor does {}: a disk directory is created only inside an \
                             existing directory (is the disk mounted?)",
                            parent.display()
                        )));
                    }
                    if let Some(warning) = writable(&key, parent)? {
                        return Err(ConfigError(warning));
                    }
                    if create {
                        std::fs::create_dir(&disk.path)
                            .map_err(|e| ConfigError(format!("{key} cannot be created: {e}")))?;
                    }
                }
                // A disk that fails (EIO, a dead mount) is no configuration
                // error: the node starts and faults only that disk's partitions.
                Err(e) => warnings.push(format!("{key} cannot be read ({e}); its partitions will be faulted")),
            }
        }
        Ok(Checked { admin_token, warnings })
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// This host's name (the default node id), `localhost` when it has none.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    if name.is_empty() { "localhost".into() } else { name.to_string() }
}

/// What [`Config::preflight`] found.
#[derive(Debug)]
pub struct Checked {
    /// The admin token, if one is configured.
    pub admin_token: Option<String>,
    /// Things that work but should not be so.
    pub warnings: Vec<String>,
}

/// Refuses a directory this process may not write into (EACCES, EPERM:
/// configuration); for one that fails otherwise (EROFS after errors, EIO)
/// returns a warning, since a dying disk must cost only its own partitions,
/// never the start of the node.
fn writable(key: &str, dir: &Path) -> Result<Option<String>, ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| ConfigError(format!("{key} contains a NUL byte")))?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the
    // call; access(2) only reads it.
    let result = unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        let message = format!("{key}: cannot write into {}: {error}", dir.display());
        return match error.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => Err(ConfigError(message)),
            _ => Ok(Some(format!("{message}; its partitions will be faulted"))),
        };
    }
    Ok(None)
}

/// The keys (`section.key`, `disk`) whose values differ between `old` and `new`.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let tree =
        |config: &Config| toml::Value::try_from(config).ok().and_then(|v| v.as_table().cloned()).unwrap_or_default();
    let (old, new) = (tree(old), tree(new));
    let mut changed = Vec::new();
    let sections: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for section in sections {
        match (old.get(section), new.get(section)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                changed.extend(keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| format!("{section}.{k}")));
            }
            (a, b) if a != b => changed.push(section.clone()),
            _ => {}
        }
    }
    changed
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(over)) => merge(inner, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn set_path(tree: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else { return Err("empty key".into()) };
    let mut table = tree;
    for part in parents {
        let next = table.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match next {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("{part} is not a section")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// An environment value as TOML: numbers and booleans as such, anything
/// else as a string.
fn parse_env_value(text: &str) -> toml::Value {
    if let Ok(integer) = text.parse::<i64>() {
        return integer.into();
    }
    if let Ok(float) = text.parse::<f64>() {
        return float.into();
    }
    match text {
        "true" => true.into(),
        "false" => false.into(),
        _ => text.into(),
    }
}

/// Parses `"64MiB"`, `"4 KiB"`, `"1GB"`, `"512"` into bytes: KB, MB, GB,
/// TB are powers of 1000 (SI), KiB, MiB, GiB, TiB powers of 1024 (IEC),
/// case-insensitive; a bare `k`, `m`, `g` is refused as ambiguous.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (B; KB, MB, GB, TB = powers of 1000; \
                 KiB, MiB, GiB, TiB = powers of 1024)"
            ));
        }
    };
    number.checked_mul(factor).ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses `"30s"`, `"10ms"`, `"5m"`, `"1h"` into a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration"))?;
    let seconds = |factor: u64| {
        number.checked_mul(factor).map(Duration::from_secs).ok_or_else(|| format!("{text:?} is too long"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => seconds(60),
        "h" => seconds(3600),
        other => Err(format!("unknown duration unit {other:?} in {text:?} (ms, s, m, h)")),
    }
}

/// A size the way the configuration writes it: `"64MiB"`, `"512"`.
pub fn size_text(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 40 && b % (1 << 40) == 0 => format!("{}TiB", b >> 40),
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => b.to_string(),
    }
}

/// A duration the way the configuration writes it: `"30s"`, `"10ms"`.
pub fn duration_text(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) { format!("{}s", millis / 1000) } else { format!("{millis}ms") }
}

mod human_size {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&size_text(*bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
        }
    }
}

mod human_duration {
    use super::*;

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&duration_text(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_embedded_default_is_the_documented_one() {
        let config = Config::load(None, Vec::new(), &Overrides::default()).unwrap();
        assert_eq!(config.node.http_addr.to_string(), "127.0.0.1:7070");
        assert_eq!(config.node.bootstrap_partitions, 4);
        assert_eq!(config.disk, vec![DiskConfig { name: "d0".into(), path: "./data".into() }]);
        assert_eq!(config.wal.segment_size, 64 << 20);
        assert_eq!(config.limits.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn file_then_env_then_flags_win_in_that_order() {
        let dir = std::env::temp_dir().join(format!("datanode-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("datanode.toml");
        std::fs::write(&file, "[limits]\nmax_blob_size = \"1MiB\"\n[wal]\ndurability = \"none\"\n").unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("DATANODE_LIMITS__MAX_BLOB_SIZE", "64KiB"),
                ("DATANODE_NODE__BOOTSTRAP_PARTITIONS", "2"),
                ("OTHER", "x"),
            ]),
            &Overrides { data_dir: Some("/tmp/x".into()), http_addr: Some("127.0.0.1:9".into()) },
        )
        .unwrap();
        assert_eq!(config.limits.max_blob_size, 64 << 10, "env beats file");
        assert_eq!(config.wal.durability, "none", "file beats default");
        assert_eq!(config.node.bootstrap_partitions, 2);
        assert_eq!(config.disk[0].path, PathBuf::from("/tmp/x"));
        assert_eq!(config.node.http_addr.port(), 9);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_configurations_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("DATANODE_WAL__DURABILITY", "sometimes"),
            ("DATANODE_NODE__HTTP_ADDR", "0.0.0.0:7070"),
            ("DATANODE_LIMITS__MAX_BLOB_SIZE", "12 parsecs"),
            ("DATANODE_HEALTH__DISK_RESUME_RATIO", "0.99"),
            ("DATANODE_NODE__SHUTDOWN_TIMEOUT", "soon"),
            ("DATANODE_NODE__NO_SUCH_KEY", "1"),
            ("DATANODE_REVISION", "abc"),
            ("DATANODE_WAL_SEGMENT_SIZE", "8MiB"),
            ("DATANODE_DISK__PATH", "/x"),
        ];
        let unrelated = env(&[("DATANODE_REQUIRE_KERNEL_TESTS", "1"), ("DATANODE_TEST_SEED", "7"), ("OTHER", "x")]);
        assert!(
            Config::load(None, unrelated, &Overrides::default()).is_ok(),
            "the test harness's variables are ignored"
        );
        for (key, value) in cases {
            let error = Config::load(None, env(&[(key, value)]), &Overrides::default()).unwrap_err();
            assert!(!error.0.is_empty(), "{key}={value}");
        }
    }

    #[test]
    fn values_that_cannot_work_are_refused_naming_key_and_value() {
        let cases: &[(&str, &str, &str)] = &[
            ("DATANODE_WAL__MAX_BATCH_BYTES", "0", "wal.max_batch_bytes = \"0\""),
            ("DATANODE_HEALTH__PROBE_INTERVAL", "0s", "health.probe_interval = \"0s\""),
            ("DATANODE_HEALTH__VERIFY_INTERVAL", "0ms", "health.verify_interval = \"0s\""),
            ("DATANODE_WAL__SEGMENT_SIZE", "8KiB", "wal.segment_size = \"8KiB\""),
            ("DATANODE_HEALTH__DISK_FULL_RATIO", "nan", "health.disk_full_ratio = NaN"),
            ("DATANODE_NODE__SHUTDOWN_TIMEOUT", "soon", "node.shutdown_timeout: \"soon\" is not a duration"),
            ("DATANODE_NODE__BOOTSTRAP_PARTITIONS", "-1", "node.bootstrap_partitions: invalid value: integer `-1`"),
            ("DATANODE_NODE__SHUTDOWN_TIMEOUT", "999999999999999999h", "is too long"),
        ];
        for (key, value, expected) in cases {
            let error = Config::load(None, env(&[(key, value)]), &Overrides::default()).unwrap_err();
            assert!(error.0.contains(expected), "{key}={value}: {}", error.0);
        }
        let mut tiny = env(&[("DATANODE_LIMITS__MAX_QUEUED_BYTES_PER_PARTITION", "1MiB")]);
        tiny.push(("DATANODE_LIMITS__MAX_BLOB_SIZE".into(), "1MiB".into()));
        assert!(Config::load(None, tiny.clone(), &Overrides::default()).unwrap_err().0.contains("wal.max_batch_bytes"));
        tiny.push(("DATANODE_WAL__MAX_BATCH_BYTES".into(), "1MiB".into()));
        assert!(Config::load(None, tiny, &Overrides::default()).is_ok(), "a batch as large as the queue works");
    }

    /// Loads `[node] id = "dn-1"` plus `cluster` as the `[cluster]` section.
    fn load_cluster(cluster: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datanode.toml");
        std::fs::write(&path, format!("[node]\nid = \"dn-1\"\n\n[cluster]\n{cluster}")).unwrap();
        Config::load(Some(&path), Vec::new(), &Overrides::default())
    }

    const CLUSTER: &str = "peer_addr = \"127.0.0.1:7170\"\nadvertise_url = \"http://127.0.0.1:7070\"\n\
                           seeds = [\"dn-1@127.0.0.1:7170\", \"dn-2@127.0.0.1:7171\", \"dn-3@127.0.0.1:7172\"]\n";

    #[test]
    fn a_cluster_section_takes_its_defaults_and_round_trips() {
        assert_eq!(Config::load(None, Vec::new(), &Overrides::default()).unwrap().cluster, None, "single node");
        let config = load_cluster(CLUSTER).unwrap();
        let cluster = config.cluster.clone().unwrap();
        assert_eq!(cluster.replication_factor, 3);
        assert_eq!(cluster.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(cluster.election_timeout, Duration::from_secs(1));
        let seeds = cluster.seed_list().unwrap();
        assert_eq!(seeds[1], Seed { node: "dn-2".into(), peer_addr: "127.0.0.1:7171".parse().unwrap() });
        let again: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn cluster_values_that_cannot_work_are_refused_naming_the_key() {
        let seeds = |list: &str| {
            CLUSTER.replace("[\"dn-1@127.0.0.1:7170\", \"dn-2@127.0.0.1:7171\", \"dn-3@127.0.0.1:7172\"]", list)
        };
        let cases = [
            (seeds("[]"), "cluster.seeds has 0 entries"),
            (seeds("[\"127.0.0.1:7170\"]"), "cluster.seeds[0] = \"127.0.0.1:7170\" is not node_id@host:port"),
            (seeds("[\"dn-1@127.0.0.1:7170\", \"dn-1@127.0.0.1:7171\"]"), "repeats a node id"),
            (seeds("[\"dn-1@127.0.0.1:7999\"]"), "cluster.seeds names this node (dn-1) at 127.0.0.1:7999"),
            (
                seeds(
                    "[\"a@1.1.1.1:1\", \"b@1.1.1.1:2\", \"c@1.1.1.1:3\", \"d@1.1.1.1:4\", \"e@1.1.1.1:5\", \"f@1.1.1.1:6\"]",
                ),
                "1 to 5",
            ),
            (CLUSTER.replace("http://127.0.0.1:7070", "127.0.0.1:7070"), "cluster.advertise_url"),
            (CLUSTER.replace("127.0.0.1:7170", "127.0.0.1:7070"), "a port of its own"),
            (format!("{CLUSTER}replication_factor = 0\n"), "cluster.replication_factor = 0"),
            (format!("{CLUSTER}election_timeout = \"300ms\"\n"), "cluster.election_timeout = \"300ms\""),
            (format!("{CLUSTER}heartbeat_interval = \"1ms\"\n"), "cluster.heartbeat_interval = \"1ms\""),
            (format!("{CLUSTER}repair_after = \"0s\"\n"), "cluster.repair_after"),
            (format!("{CLUSTER}secret = \"x\"\n"), "unknown key cluster.secret"),
            (
                CLUSTER.replace("peer_addr = \"127.0.0.1:7170\"", "peer_addr = \"0.0.0.0:7170\""),
                "set cluster.secret_file",
            ),
            (format!("{CLUSTER}secret_file = \"\"\n"), "cluster.secret_file = \"\" names no file"),
        ];
        for (text, expected) in cases {
            let error = load_cluster(&text).unwrap_err();
            assert!(error.0.contains(expected), "{text}: {}", error.0);
        }
    }

    #[test]
    fn an_off_loopback_peer_port_needs_the_cluster_secret_or_an_explicit_opt_out() {
        let off = CLUSTER.replace("peer_addr = \"127.0.0.1:7170\"", "peer_addr = \"0.0.0.0:7170\"");
        let with_secret = load_cluster(&format!("{off}secret_file = \"/etc/datanode/cluster.secret\"\n")).unwrap();
        let cluster = with_secret.cluster.clone().unwrap();
        assert_eq!(cluster.secret_file, Some(PathBuf::from("/etc/datanode/cluster.secret")));
        assert!(with_secret.security_posture().iter().any(|line| line.contains("prove the cluster secret")));
        let again: Config = toml::from_str(&with_secret.to_toml()).unwrap();
        assert_eq!(again, with_secret);
        let open = load_cluster(&format!("{off}[auth]\ndata_tokens = \"off\"\nallow_unauthenticated = true\n"));
        assert!(open.unwrap().security_posture().iter().any(|line| line.contains("peers unauthenticated")));
    }

    #[test]
    fn client_certificates_make_the_peer_port_mutual_tls_in_place_of_the_secret() {
        let off = CLUSTER.replace("peer_addr = \"127.0.0.1:7170\"", "peer_addr = \"0.0.0.0:7170\"");
        let tls = "[tls]\ncert_file = \"/etc/datanode/tls/node.pem\"\nkey_file = \"/etc/datanode/tls/node.key\"\n";
        let mutual = load_cluster(&format!("{off}{tls}client_ca_file = \"/etc/datanode/tls/ca.pem\"\n")).unwrap();
        assert!(mutual.peer_tls());
        assert!(mutual.security_posture().iter().any(|line| line.contains("peers use mutual TLS")), "{mutual:?}");
        // TLS without client certificates does not cover the peer port.
        let error = load_cluster(&format!("{off}{tls}")).unwrap_err().to_string();
        assert!(error.contains("tls.client_ca_file (mutual TLS"), "{error}");
        // One way or the other: the secret would go unused.
        let both = format!(
            "{off}secret_file = \"/etc/datanode/cluster.secret\"\n{tls}client_ca_file = \"/etc/datanode/tls/ca.pem\"\n"
        );
        let error = load_cluster(&both).unwrap_err().to_string();
        assert!(error.contains("cluster.secret_file and tls.client_ca_file are both set"), "{error}");
        // A single node with client certificates has no peer port.
        let single = Config::load(None, Vec::new(), &Overrides::default()).unwrap();
        assert!(!single.peer_tls());
    }

    #[test]
    fn sizes_and_durations_read_the_human_way_and_round_trip() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4 KiB"), Ok(4096));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("2 gb"), Ok(2_000_000_000));
        assert!(parse_size("-1").is_err() && parse_size("1XB").is_err() && parse_size("16m").is_err());
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert!(parse_duration("10").is_err());
        let config = Config::load(None, Vec::new(), &Overrides::default()).unwrap();
        let again: Config = toml::from_str(&config.to_toml()).unwrap();
        assert_eq!(again, config);
    }
}
