//! `datanode partition ...` and `datanode disk list`: the admin API from
//! the command line, against a running node (`--url`, or the `http_addr`
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
}

impl Failure {
    fn answered(message: String) -> Failure {
        Failure { code: 1, message }
    }
}

/// A client of one node.
pub struct Node {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Node {
    /// `base` is the node's URL; `token` the admin token, if any; `tls`
    /// what an https:// URL needs.
    pub fn new(base: String, token: Option<String>, tls: &ClientTls) -> Result<Node, Failure> {
        // Recover and install run to completion, however long they take.
        let agent = tls
            .agent(ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)))
            .map_err(|message| Failure { code: crate::EXIT_CONFIG, message })?;
        Ok(Node { base, token, agent })
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
        match sent {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => {
                let body: Value =
                    response.into_string().ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
                let code = body["error"].as_str().unwrap_or("error");
                let message = body["message"].as_str().unwrap_or("");
                Err(Failure::answered(format!("{status} {code}: {message}")))
            }
            Err(error) => {
                Err(Failure { code: EXIT_UNREACHABLE, message: format!("cannot reach {}: {error}", self.base) })
            }
        }
    }

    fn json(&self, sent: Result<ureq::Response, ureq::Error>) -> Result<Value, Failure> {
        let response = self.answer(sent)?;
        let text = response.into_string().map_err(|e| Failure::answered(format!("cannot read the answer: {e}")))?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| Failure::answered(format!("the answer is not JSON: {e}")))
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
                        .map_err(|e| Failure { code: 1, message: format!("cannot open {}: {e}", input.display()) })?,
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
