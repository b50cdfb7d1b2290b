//! The `datanode` binary: CLI, logging, signals, and the serve loop.
//! Exit codes: 0 clean shutdown, 1 fatal runtime error, 2 usage, 78 bad
//! configuration.

mod alerts;
mod api;
mod bench;
mod config;
mod exposition;
mod node;
mod server;
mod status;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clap::{Args, Parser, Subcommand};
use datanode_partition::Registry;

use crate::config::{Config, Overrides};
use crate::node::{Node, VERSION};

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(name = "datanode", version = VERSION, about = "A storage node daemon")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node (the default).
    Serve,
    /// Check the configuration as `serve` would (also the admin token
    /// file and the disk paths), print the effective configuration and exit.
    CheckConfig,
    /// Print a running node's partitions and disks as tables.
    Status {
        /// The node's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        url: String,
    },
    /// Put a load on a running node and report throughput and latency.
    Bench(bench::BenchArgs),
}

/// Flags that choose the configuration, accepted before or after the
/// subcommand (`datanode --config F serve` = `datanode serve --config F`).
#[derive(Debug, Args, Clone, Default)]
struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Use one disk `d0` at this directory instead of the configured disks.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:7070.
    #[arg(long, global = true)]
    http_addr: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = cli.serve;
    match cli.command {
        Some(Command::CheckConfig) => match load_config(&args).and_then(|c| preflight(&c, false).map(|_| c)) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Some(Command::Serve) | None => serve(&args),
        Some(Command::Status { url }) => match status::render(&url) {
            Ok(tables) => {
                print!("{tables}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("datanode: cannot read the node's status: {error}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Some(Command::Bench(args)) => match bench::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("datanode bench: {error:#}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
    }
}

fn load_config(args: &ServeArgs) -> Result<Config, ExitCode> {
    let overrides = Overrides { data_dir: args.data_dir.clone(), http_addr: args.http_addr.clone() };
    Config::load(args.config.as_deref(), std::env::vars(), &overrides).map_err(|error| {
        eprintln!("datanode: bad configuration: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// [`Config::preflight`], with its warnings on stderr.
fn preflight(config: &Config, create: bool) -> Result<config::Checked, ExitCode> {
    match config.preflight(create) {
        Ok(checked) => {
            for warning in &checked.warnings {
                eprintln!("datanode: warning: {warning}");
            }
            Ok(checked)
        }
        Err(error) => {
            eprintln!("datanode: bad configuration: {error}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    if std::io::stdout().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

fn ignore_signals() {
    // SAFETY: setting the disposition of SIGPIPE and SIGXFSZ to SIG_IGN has
    // no memory-safety preconditions; writes then fail with EPIPE/EFBIG
    // instead of killing the process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match load_config(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let checked = match preflight(&config, true) {
        Ok(checked) => checked,
        Err(code) => return code,
    };
    // The port is taken before anything is created or loaded.
    let listener = match std::net::TcpListener::bind(config.node.http_addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    }) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("datanode: cannot listen on {}: {error}", config.node.http_addr);
            // A port in use may be free at the next try; an address this
            // host does not have, or a port it may not bind, is configuration.
            let code = if error.kind() == std::io::ErrorKind::AddrInUse { EXIT_RUNTIME } else { EXIT_CONFIG };
            return ExitCode::from(code);
        }
    };
    init_logging();
    for warning in &checked.warnings {
        tracing::warn!(warning = %warning, "configuration");
    }
    ignore_signals();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let code = match runtime.block_on(run(config, checked.admin_token, listener)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_RUNTIME),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "datanode stopped");
            ExitCode::from(EXIT_RUNTIME)
        }
    };
    // Dropping the runtime would wait for every blocking thread, and one
    // stuck in a hung read or sync never returns: leave them, the exit
    // ends them. 0 only came from a registry that closed every partition.
    runtime.shutdown_background();
    code
}

/// Loads, serves until SIGTERM/SIGINT, drains. `Ok(true)` for a clean
/// shutdown within `shutdown_timeout`.
async fn run(config: Config, admin_token: Option<String>, listener: std::net::TcpListener) -> anyhow::Result<bool> {
    let metrics = exposition::install()?;
    metrics::gauge!("datanode_build_info", "version" => env!("CARGO_PKG_VERSION"), "revision" => env!("DN_BUILD_REVISION"))
        .set(1.0);
    let storage = datanode_wal::open_backend(config.wal.io_backend.parse().map_err(anyhow::Error::msg)?)?;
    let (disks, defaults) = (node::disks(&config), node::partition_defaults(&config));
    let bootstrap = config.node.bootstrap_partitions;
    let registry = tokio::task::spawn_blocking(move || -> anyhow::Result<Registry> {
        let registry = Registry::open(storage, disks, defaults);
        node::bootstrap(&registry, bootstrap)?;
        Ok(registry)
    })
    .await??;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let shutdown_timeout = config.node.shutdown_timeout;
    let node = Arc::new(Node::new(config, registry, admin_token, metrics));
    node::spawn_background(&node)?;
    alerts::spawn(&node);
    node.ready.store(true, Ordering::Release);
    node::sd_notify("READY=1");
    tracing::info!(addr = %listener.local_addr()?, version = VERSION, "datanode ready");

    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let options = server::ServeOptions { header_timeout: node.config.limits.header_timeout };
    let mut served = tokio::spawn(server::serve(listener, api::router(Arc::clone(&node)), options, drain_rx));
    wait_for_signal().await;
    // From here on everything must finish within the shutdown timeout.
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    tracing::info!("shutting down: draining");
    node.begin_drain();
    node::sd_notify("STOPPING=1");
    drain_tx.send_replace(true);
    // Requests in progress get half of it; connections still open then
    // (a client that does not read its answer) are closed.
    let connections_deadline = tokio::time::Instant::now() + shutdown_timeout / 2;
    if tokio::time::timeout_at(connections_deadline, &mut served).await.is_err() {
        tracing::warn!("closing connections still open after half of shutdown_timeout");
        served.abort();
        let _ = served.await;
    }
    // Close on a thread of its own: a hung sync must not hold the runtime.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let registry = Arc::clone(&node.registry);
    std::thread::Builder::new().name("registry-close".into()).spawn(move || {
        registry.close();
        let _ = closed_tx.send(());
    })?;
    match tokio::time::timeout_at(deadline, closed_rx).await {
        Ok(Ok(())) => {
            tracing::info!("datanode stopped cleanly");
            Ok(true)
        }
        _ => {
            tracing::error!(timeout = ?shutdown_timeout, "shutdown did not finish in time; unacknowledged writes fail");
            Ok(false)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot listen for signals; serving until killed");
            std::future::pending::<()>().await;
        }
    }
}
