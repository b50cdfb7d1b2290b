//! `datanode partition ...`, `datanode disk list` and `datanode cluster
//! ...`: the admin API from the command line, against a running node (`--url`, or the `http_addr`
//! of `--config`), with the admin token from `--token-file` or the
//! configuration's `node.admin_token_file`. Tables for people, `--json`
//! for scripts (the API's own JSON).
//!
//! Exit codes: 0 done; 1 the node answered with an error (its code and
//! message are printed); 2 usage; 69 the node could not be reached.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::tls::ClientTls;

use serde_json::Value;

use crate::status;

/// The node could not be reached (sysexits `EX_UNAVAILABLE`).
pub const EXIT_UNREACHABLE: u8 = 69;

/// `datanode partition ...`.
#[derive(Debug, clap::Subcommand)]
pub enum PartitionCommand {
    /// List the partitions (optionally those in one state).
    List {
        /// `healthy`, `read_only`, `faulted` or `loading`.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        client: Client,
    },
    /// Show one partition.
    Show {
        id: u64,
        #[command(flatten)]
        client: Client,
    },
    /// Create a partition on a disk.
    Create {
        id: u64,
        /// The disk's name.
        #[arg(long)]
        disk: String,
        #[command(flatten)]
        client: Client,
    },
    /// Reopen a faulted partition: replay and verify its log from disk.
    Recover {
        id: u64,
        #[command(flatten)]
        client: Client,
    },
    /// Compact a partition now (within its disk's copy budget); prints what came back.
    Compact {
        id: u64,
        #[command(flatten)]
        client: Client,
    },
    /// Make a partition read-only (the `operator` reason), or writable again with `--clear`.
    ReadOnly {
        id: u64,
        /// Clear the operator's read-only instead of setting it.
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Delete a partition and its data.
    Delete {
        id: u64,
        /// Required: the data is removed.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Write a checksummed snapshot image of a partition to a file (`-`: stdout).
    Export {
        id: u64,
        /// Where the image goes.
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        client: Client,
    },
    /// Install a snapshot image into a partition (verified, then swapped in atomically).
    Import {
        id: u64,
        /// The image (`-`: stdin).
        #[arg(long, short)]
        input: PathBuf,
        #[command(flatten)]
        client: Client,
    },
}

/// `datanode disk ...`.
#[derive(Debug, clap::Subcommand)]
pub enum DiskCommand {
    /// List the disks.
    List {
        #[command(flatten)]
        client: Client,
    },
}

/// `datanode cluster ...` (a node with `[cluster]`; any node of the
/// cluster will do: the commands follow its redirects to the metadata
/// leader or to a partition's leader).
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// The cluster map: epoch, metadata leader, the nodes and the replicated partitions.
    Status {
        #[command(flatten)]
        client: Client,
    },
    /// Move every replica off a node (and place none there); `--undo` ends the drain.
    Drain {
        /// The node's id, e.g. `dn-2`.
        node: String,
        /// End the drain instead (replicas already moved stay where they are).
        #[arg(long)]
        undo: bool,
        /// Then poll the cluster map every second, printing progress, until
        /// no replica is left on the node; exit 0 then (Ctrl-C stops waiting,
        /// not the drain).
        #[arg(long, conflicts_with = "undo")]
        wait: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Hand a replicated partition's leadership to another of its voters.
    ///
    /// Exits 0 once the new leader leads, and also when the node answers
    /// 202: the transfer was requested but not yet seen to take effect
    /// (check with `datanode cluster status`).
    TransferLeader {
        /// The partition.
        id: u64,
        /// The node to lead it (default: the voter holding the most of the log).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        client: Client,
    },
}

/// How to reach the node.
#[derive(Debug, Clone, clap::Args)]
pub struct Client {
    /// The node's URL (`http://host:port` or `host:port`). Default: the
    /// `http_addr` of the configuration (`--config`).
    #[arg(long)]
    pub url: Option<String>,
    /// File holding the admin bearer token. Default: the configuration's
    /// `node.admin_token_file`, when it can be read.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the node's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Why a command failed, with its exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
    /// The HTTP status of the node's answer, when it answered an error.
    pub status: Option<u16>,
}

impl Failure {
    fn answered(message: String) -> Failure {
        Failure { code: 1, message, status: None }
    }
}

/// How many redirects a cluster command follows.
const MAX_REDIRECTS: usize = 5;

/// A client of one node.
pub struct Node {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// The same, following no redirect by itself (see [`Node::follow`]).
    direct: ureq::Agent,
}

impl Node {
    /// `base` is the node's URL; `token` the admin token, if any; `tls`
    /// what an https:// URL needs.
    pub fn new(base: String, token: Option<String>, tls: &ClientTls) -> Result<Node, Failure> {
        // Recover and install run to completion, however long they take.
        let builder = || ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5));
        let config = |message| Failure { code: crate::EXIT_CONFIG, message, status: None };
        let agent = tls.agent(builder()).map_err(config)?;
        let direct = tls.agent(builder().redirects(0)).map_err(config)?;
        Ok(Node { base, token, agent, direct })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// The answer of a request, or the node's error as a failure.
    fn answer(&self, sent: Result<ureq::Response, ureq::Error>) -> Result<ureq::Response, Failure> {
        answer_from(&self.base, sent)
    }

    fn json(&self, sent: Result<ureq::Response, ureq::Error>) -> Result<Value, Failure> {
        body_json(self.answer(sent)?)
    }

    /// Sends `method path` (with `body` as JSON, if any) and follows the
    /// node's redirects by hand (to the metadata leader or a partition's
    /// leader, at most [`MAX_REDIRECTS`]), each time with the same method,
    /// body and token: an agent keeps neither for a POST or DELETE, nor the
    /// token for any. A redirect from https:// to http:// is refused (it
    /// would send the token in the clear), and so, with a token, is one to
    /// another host than the one asked.
    fn follow(&self, method: &str, path: &str, body: Option<&str>) -> Result<ureq::Response, Failure> {
        let mut url = format!("{}{path}", self.base);
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.direct.request(method, &url);
            if let Some(token) = &self.token {
                request = request.set("Authorization", &format!("Bearer {token}"));
            }
            let sent = match body {
                Some(body) => request.set("Content-Type", "application/json").send_string(body),
                None if method == "GET" || method == "HEAD" => request.call(),
                None => request.send_string(""),
            };
            let response = answer_from(origin(&url), sent)?;
            if !matches!(response.status(), 301 | 302 | 303 | 307 | 308) {
                return Ok(response);
            }
            let status = response.status();
            let Some(location) = response.header("location").map(str::to_string) else {
                return Err(Failure::answered(format!("{url}: a {status} redirect without a Location")));
            };
            let next = resolve(&url, &location);
            if url.starts_with("https://") && !next.starts_with("https://") {
                return Err(Failure::answered(format!("{url}: refusing a redirect from https:// to {next}")));
            }
            if self.token.is_some() && host_of(&next) != host_of(&self.base) {
                // The token goes only where it was meant to: the host the
                // command was pointed at (any of its ports).
                return Err(Failure::answered(format!(
                    "{url} redirects to another host ({next}); the admin token is not sent there: run again with --url {}",
                    origin(&next)
                )));
            }
            url = next;
        }
        Err(Failure::answered(format!("more than {MAX_REDIRECTS} redirects (the last to {url})")))
    }
}

/// `response` as success, or what went wrong as a failure; `base` names
/// the node asked.
fn answer_from(base: &str, sent: Result<ureq::Response, ureq::Error>) -> Result<ureq::Response, Failure> {
    match sent {
        Ok(response) => Ok(response),
        Err(ureq::Error::Status(status, response)) => {
            let body: Value =
                response.into_string().ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
            let code = body["error"].as_str().unwrap_or("error");
            let message = body["message"].as_str().unwrap_or("");
            let hint = match code {
                "no_leader" => " (no leader is known there yet, e.g. during an election: retry)",
                _ => "",
            };
            Err(Failure { code: 1, message: format!("{status} {code}: {message}{hint}"), status: Some(status) })
        }
        Err(error) => {
            Err(Failure { code: EXIT_UNREACHABLE, message: format!("cannot reach {base}: {error}"), status: None })
        }
    }
}

/// The body of a successful answer as JSON (`null` when empty).
fn body_json(response: ureq::Response) -> Result<Value, Failure> {
    let text = response.into_string().map_err(|e| Failure::answered(format!("cannot read the answer: {e}")))?;
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| Failure::answered(format!("the answer is not JSON: {e}")))
}

/// `scheme://host:port` of `url`.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(slash) => &url[..after_scheme + slash],
        None => url,
    }
}

/// The scheme and host of `url`, without its port: `http://10.0.0.1`.
fn host_of(url: &str) -> String {
    let origin = origin(url).to_ascii_lowercase();
    let after_scheme = origin.find("://").map_or(0, |i| i + 3);
    let authority = &origin[after_scheme..];
    let host = match authority.strip_prefix('[') {
        // [v6]:port
        Some(v6) => v6.split(']').next().map_or(authority.to_string(), |h| format!("[{h}]")),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host).to_string(),
    };
    format!("{}{host}", &origin[..after_scheme])
}

/// A redirect's `Location` against the URL that answered it: absolute as
/// it is, `/path` on the same origin.
fn resolve(current: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(current))
    } else {
        let directory = current.rfind('/').filter(|i| *i >= origin(current).len()).map_or(current, |i| &current[..i]);
        format!("{directory}/{location}")
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// Runs a partition command; returns what to print.
pub fn partition(node: &Node, command: &PartitionCommand) -> Result<String, Failure> {
    let json = command_client(command).json;
    let status_of = |value: Value| if json { pretty(&value) } else { status::partition_details(&value) };
    match command {
        PartitionCommand::List { state, .. } => {
            let path = match state {
                Some(state) => format!("/v1/partitions?state={state}"),
                None => "/v1/partitions".into(),
            };
            let list = node.json(node.request("GET", &path).call())?;
            Ok(if json { pretty(&list) } else { status::partitions_table(&list) })
        }
        PartitionCommand::Show { id, .. } => {
            Ok(status_of(node.json(node.request("GET", &format!("/v1/partitions/{id}")).call())?))
        }
        PartitionCommand::Create { id, disk, .. } => {
            let body = serde_json::json!({ "id": id, "disk": disk }).to_string();
            Ok(status_of(node.json(node.request("POST", "/v1/partitions").send_string(&body))?))
        }
        PartitionCommand::Recover { id, .. } => {
            Ok(status_of(node.json(node.request("POST", &format!("/v1/partitions/{id}/recover")).send_string(""))?))
        }
        PartitionCommand::Compact { id, .. } => {
            let report = node.json(node.request("POST", &format!("/v1/partitions/{id}/compact")).send_string(""))?;
            Ok(if json {
                pretty(&report)
            } else {
                format!(
                    "reclaimed {} bytes, copied {} bytes\n",
                    report["reclaimed_bytes"].as_u64().unwrap_or(0),
                    report["copied_bytes"].as_u64().unwrap_or(0)
                )
            })
        }
        PartitionCommand::ReadOnly { id, clear, .. } => {
            let body = serde_json::json!({ "read_only": !clear }).to_string();
            Ok(status_of(
                node.json(node.request("POST", &format!("/v1/partitions/{id}/read-only")).send_string(&body))?,
            ))
        }
        PartitionCommand::Delete { id, yes, .. } => {
            if !yes {
                return Err(Failure {
                    code: 2,
                    message: format!("deleting partition {id} removes its data: add --yes"),
                    status: None,
                });
            }
            node.answer(node.request("DELETE", &format!("/v1/partitions/{id}")).call())?;
            Ok(if json { pretty(&serde_json::json!({ "deleted": id })) } else { format!("partition {id} deleted\n") })
        }
        PartitionCommand::Export { id, output, .. } => {
            let response = node.answer(node.request("GET", &format!("/v1/partitions/{id}/snapshot")).call())?;
            let mut reader = response.into_reader();
            let written = if output.as_os_str() == "-" {
                std::io::copy(&mut reader, &mut std::io::stdout().lock())
            } else {
                std::fs::File::create(output).and_then(|mut file| {
                    let n = std::io::copy(&mut reader, &mut file)?;
                    file.sync_all()?;
                    Ok(n)
                })
            }
            .map_err(|e| Failure::answered(format!("export of partition {id} broke off: {e}")))?;
            if output.as_os_str() == "-" {
                return Ok(String::new());
            }
            Ok(if json {
                pretty(&serde_json::json!({ "partition": id, "bytes": written, "output": output }))
            } else {
                format!("partition {id}: {written} bytes written to {}\n", output.display())
            })
        }
        PartitionCommand::Import { id, input, .. } => {
            let reader: Box<dyn Read + Send> = if input.as_os_str() == "-" {
                Box::new(std::io::stdin())
            } else {
                Box::new(
                    std::fs::File::open(input)
                        .map_err(|e| Failure::answered(format!("cannot open {}: {e}", input.display())))?,
                )
            };
            let sent = node
                .request("PUT", &format!("/v1/partitions/{id}/snapshot"))
                .set("Content-Type", "application/octet-stream")
                .send(reader);
            Ok(status_of(node.json(sent)?))
        }
    }
}

/// Runs a disk command; returns what to print.
pub fn disk(node: &Node, command: &DiskCommand) -> Result<String, Failure> {
    match command {
        DiskCommand::List { client } => {
            let disks = node.json(node.request("GET", "/v1/disks").call())?;
            Ok(if client.json { pretty(&disks) } else { status::disks_table(&disks) })
        }
    }
}

/// Runs a cluster command; returns what to print (`drain --wait` prints
/// its progress as it goes).
pub fn cluster(node: &Node, command: &ClusterCommand) -> Result<String, Failure> {
    let json = cluster_client(command).json;
    match command {
        ClusterCommand::Status { .. } => {
            let map = body_json(node.follow("GET", "/v1/cluster", None)?)?;
            Ok(if json { pretty(&map) } else { status::cluster_tables(&map) })
        }
        ClusterCommand::Drain { node: id, undo, wait, .. } => {
            let method = if *undo { "DELETE" } else { "POST" };
            let path = format!("/v1/cluster/nodes/{}/drain", path_segment(id));
            let answer = body_json(node.follow(method, &path, None)?)?;
            let left = answer["replicas"].as_u64();
            let said = if json {
                pretty(&answer)
            } else if *undo {
                format!("{id}: drain ended; {} replicas on it\n", count_text(left))
            } else {
                format!("{id}: draining; {} replicas left to move\n", count_text(left))
            };
            if !*wait {
                return Ok(said);
            }
            // The answer first, then progress lines (on stderr with --json,
            // so that stdout stays JSON).
            print(&said);
            let progress = |line: String| if json { eprintln!("{line}") } else { print(&format!("{line}\n")) };
            wait_drained(node, id, left, progress)?;
            Ok(if json { String::new() } else { format!("{id}: drained, no replica left on it\n") })
        }
        ClusterCommand::TransferLeader { id, to, .. } => {
            let body = to.as_ref().map(|to| serde_json::json!({ "to": to }).to_string());
            let path = format!("/v1/cluster/partitions/{id}/transfer-leader");
            let response = node.follow("POST", &path, body.as_deref())?;
            let done = response.status() != 202;
            let answer = body_json(response)?;
            if json {
                return Ok(pretty(&answer));
            }
            let (leader, replica) = (status::text(&answer["leader"]), status::text(&answer["replica_id"]));
            Ok(if done {
                format!("partition {id}: the leader is {leader} (replica {replica})\n")
            } else {
                format!(
                    "partition {id}: transfer to {leader} (replica {replica}) requested, not yet seen to take \
                     effect; check with `datanode cluster status`\n"
                )
            })
        }
    }
}

fn count_text(count: Option<u64>) -> String {
    count.map_or_else(|| "?".into(), |n| n.to_string())
}

/// A node id as one path segment (percent-encoded but for unreserved characters).
fn path_segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Polls the cluster map every second until node `id` holds no replica,
/// reporting each change of its count; a 503 (no metadata leader for the
/// moment) is waited out.
fn wait_drained(node: &Node, id: &str, mut last: Option<u64>, progress: impl Fn(String)) -> Result<(), Failure> {
    let mut unavailable = false;
    loop {
        let map = match node.follow("GET", "/v1/cluster", None).and_then(body_json) {
            Ok(map) => {
                unavailable = false;
                map
            }
            Err(failure) if failure.status == Some(503) => {
                if !unavailable {
                    progress(format!("{id}: waiting: {}", failure.message));
                    unavailable = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(failure) => return Err(failure),
        };
        let Some(entry) = map["nodes"].as_array().into_iter().flatten().find(|n| n["id"] == id) else {
            return Err(Failure::answered(format!("{id} is no longer in the cluster map")));
        };
        let left = entry["replicas"].as_u64();
        if left == Some(0) {
            return Ok(());
        }
        if left != last {
            progress(format!("{id}: {} replicas left", count_text(left)));
            last = left;
        }
        if entry["draining"] == false {
            return Err(Failure::answered(format!(
                "{id} is no longer draining (the drain was ended) with {} replicas on it",
                count_text(left)
            )));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The client options of a cluster command.
pub fn cluster_client(command: &ClusterCommand) -> &Client {
    match command {
        ClusterCommand::Status { client }
        | ClusterCommand::Drain { client, .. }
        | ClusterCommand::TransferLeader { client, .. } => client,
    }
}

/// The client options of a partition command.
pub fn command_client(command: &PartitionCommand) -> &Client {
    match command {
        PartitionCommand::List { client, .. }
        | PartitionCommand::Show { client, .. }
        | PartitionCommand::Create { client, .. }
        | PartitionCommand::Recover { client, .. }
        | PartitionCommand::Compact { client, .. }
        | PartitionCommand::ReadOnly { client, .. }
        | PartitionCommand::Delete { client, .. }
        | PartitionCommand::Export { client, .. }
        | PartitionCommand::Import { client, .. } => client,
    }
}

/// Prints `text` to stdout; a closed stdout is not an error worth a panic.
pub fn print(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_url_that_answered_and_ids_stay_one_segment() {
        assert_eq!(origin("http://10.0.0.1:7070/v1/cluster"), "http://10.0.0.1:7070");
        assert_eq!(origin("http://10.0.0.1:7070"), "http://10.0.0.1:7070");
        let here = "http://a:1/v1/cluster/partitions/7/transfer-leader";
        assert_eq!(resolve(here, "http://b:2/v1/x"), "http://b:2/v1/x");
        assert_eq!(resolve(here, "/v1/cluster"), "http://a:1/v1/cluster");
        assert_eq!(resolve(here, "other"), "http://a:1/v1/cluster/partitions/7/other");
        assert_eq!(host_of("http://10.0.0.1:7070/v1/cluster"), "http://10.0.0.1");
        assert_eq!(host_of("HTTP://Node-1:7071"), "http://node-1");
        assert_eq!(host_of("https://[::1]:7070/x"), "https://[::1]");
        assert_ne!(host_of("http://a:1/x"), host_of("http://b:1/x"), "the token does not follow to another host");
        assert_eq!(path_segment("dn-2"), "dn-2");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
