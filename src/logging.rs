//! Logs: tracing events as JSON lines (one object per line, for `jq` and
//! log shippers) or human text, on stdout. Every line carries the node id
//! (`"node"` in JSON, `node=ID` first in text); list-valued fields such as
//! `reasons` are JSON arrays; a line about a log directory (`dir`, from the
//! WAL, which knows no partitions) gets the `partition` and `disk` it
//! belongs to. The filter is `RUST_LOG` when set, else
//! `node.log_filter`; SIGHUP reloads the latter.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, text when it is.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

impl LogFormat {
    /// `node.log_format` as a format (validated at load).
    pub fn from_config(text: &str) -> LogFormat {
        match text {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            _ => LogFormat::Auto,
        }
    }
}

/// Changes the filter of the running subscriber.
pub struct Logging {
    filter: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    /// `RUST_LOG` was set: it wins over `node.log_filter`, also on reload.
    pub from_env: bool,
}

impl Logging {
    /// Applies `node.log_filter` (unless `RUST_LOG` is set); `Ok(false)`
    /// when nothing changed.
    pub fn set_filter(&self, directives: &str) -> Result<bool, String> {
        if self.from_env {
            return Ok(false);
        }
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        let current = self.filter.with_current(|f| f.to_string()).unwrap_or_default();
        if current == filter.to_string() {
            return Ok(false);
        }
        self.filter.reload(filter).map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// Installs the global subscriber.
pub fn init(format: LogFormat, filter: &str, node: &str, disks: Vec<(String, PathBuf)>) -> Logging {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let writer = NodeWriter { node: Arc::from(node), json, disks: Arc::new(disks) };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(writer)).try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer)).try_init()
    };
    if let Err(error) = result {
        eprintln!("datanode: cannot set up logging: {error}");
    }
    Logging { filter: handle, from_env }
}

/// Hands each event a writer of its own that adds the node id when the
/// event is complete.
#[derive(Clone)]
struct NodeWriter {
    node: Arc<str>,
    json: bool,
    disks: Arc<Vec<(String, PathBuf)>>,
}

impl<'a> MakeWriter<'a> for NodeWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter { node: Arc::clone(&self.node), json: self.json, disks: Arc::clone(&self.disks), line: Vec::new() }
    }
}

/// One event's line, written to stdout when dropped.
struct EventWriter {
    node: Arc<str>,
    json: bool,
    disks: Arc<Vec<(String, PathBuf)>>,
    line: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let line =
            if self.json { json_line(&self.line, &self.node, &self.disks) } else { text_line(&self.line, &self.node) };
        // A log line that cannot be written (stdout closed) is dropped.
        let _ = std::io::stdout().lock().write_all(&line);
    }
}

fn text_line(line: &[u8], node: &str) -> Vec<u8> {
    let mut out = format!("node={node} ").into_bytes();
    out.extend_from_slice(line);
    out
}

/// The event's JSON with `"node"` added and list-valued fields (written
/// by tracing as their Debug text, e.g. `"[\"disk_full\"]"`) as arrays.
fn json_line(line: &[u8], node: &str, disks: &[(String, PathBuf)]) -> Vec<u8> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(line) else {
        return line.to_vec();
    };
    let mut out = serde_json::Map::new();
    out.insert("node".into(), node.into());
    if let Some(Value::String(dir)) = fields.get("dir")
        && !fields.contains_key("partition")
        && let Some((disk, partition)) = owner(Path::new(dir), disks)
    {
        out.insert("disk".into(), disk.into());
        out.insert("partition".into(), partition.into());
    }
    for (key, value) in fields {
        let value = match value {
            Value::String(text) if text.starts_with('[') && text.ends_with(']') => {
                serde_json::from_str::<Value>(&text).ok().filter(Value::is_array).unwrap_or(Value::String(text))
            }
            other => other,
        };
        out.insert(key, value);
    }
    let mut bytes = Value::Object(out).to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// The disk and partition a path under `<disk>/partitions/<id>/` belongs to.
fn owner(dir: &Path, disks: &[(String, PathBuf)]) -> Option<(String, u64)> {
    disks.iter().find_map(|(name, path)| {
        let rest = dir.strip_prefix(path.join("partitions")).ok()?;
        let id = rest.components().next()?.as_os_str().to_str()?.parse().ok()?;
        Some((name.clone(), id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_get_the_node_and_arrays() {
        let line =
            br#"{"level":"ERROR","message":"partition read-only","reasons":"[\"disk_full\", \"operator\"]","x":"[a"}"#;
        let out: Value = serde_json::from_slice(&json_line(line, "dn-1", &[])).unwrap();
        assert_eq!(out["node"], "dn-1");
        assert_eq!(out["reasons"], serde_json::json!(["disk_full", "operator"]));
        assert_eq!(out["x"], "[a");
        assert_eq!(out["message"], "partition read-only");
        assert_eq!(json_line(b"not json\n", "n", &[]), b"not json\n".to_vec());
        let disks = vec![("d1".to_string(), PathBuf::from("/srv/d1"))];
        let line = br#"{"level":"ERROR","message":"WAL poisoned","dir":"/srv/d1/partitions/7/wal-2"}"#;
        let out: Value = serde_json::from_slice(&json_line(line, "dn-1", &disks)).unwrap();
        assert_eq!((out["disk"].as_str(), out["partition"].as_u64()), (Some("d1"), Some(7)));
    }
}
