//! The `datanode` binary.
//!
//! Only `--version` works today: the daemon (config, HTTP API, metrics,
//! shutdown) is not built yet, and `serve` says so instead of pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version" | "-V") => {
            println!("datanode {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        None | Some("serve") => {
            eprintln!("datanode: serving is not implemented yet; only the WAL crate (datanode-wal) exists");
            ExitCode::from(1)
        }
        Some(other) => {
            eprintln!("datanode: unknown argument {other:?}; usage: datanode [serve] | --version");
            ExitCode::from(2)
        }
    }
}
