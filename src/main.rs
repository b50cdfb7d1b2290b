//! The `datanode` binary: CLI, logging, signals, and the serve loop.
//! Exit codes: 0 clean shutdown, 1 fatal runtime error, 2 usage, 78 bad
//! configuration; the admin commands also 1 (the node answered an
//! error) and 69 (the node could not be reached).

mod admin;
mod alerts;
mod api;
mod auth;
mod bench;
mod cluster;
mod config;
mod exposition;
mod logging;
mod node;
mod server;
mod status;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use datanode_partition::Registry;

use crate::auth::DataAuth;
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
    #[command(flatten)]
    client_tls: tls::ClientTls,
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
        /// The node's URL (`http://host:port` or `host:port`). Default: the
        /// `http_addr` of the configuration (`--config`).
        #[arg(long)]
        url: Option<String>,
        /// Print `{"partitions": [...], "disks": [...]}` for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Put a load on a running node and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Administer a running node's partitions.
    #[command(subcommand)]
    Partition(admin::PartitionCommand),
    /// A running node's disks.
    #[command(subcommand)]
    Disk(admin::DiskCommand),
    /// The cluster a running node belongs to: its map, draining a node,
    /// moving a partition's leadership.
    #[command(subcommand)]
    Cluster(admin::ClusterCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `datanode man > /usr/local/share/man/man1/datanode.1`.
    Man,
    /// Mint a signed data token for one partition (`auth.signing_key_file`):
    /// what a control plane hands to a writer.
    Token {
        /// The signing key (default: `auth.signing_key_file` of the configuration).
        #[arg(long)]
        signing_key_file: Option<PathBuf>,
        /// The partition it may write.
        #[arg(long)]
        partition: u64,
        /// How long it is valid, e.g. `10m`, `1h`.
        #[arg(long, default_value = "1h", value_parser = config::parse_duration)]
        ttl: Duration,
    },
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
    /// Log format (overrides `node.log_format`).
    #[arg(long, global = true, value_enum)]
    log_format: Option<logging::LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = cli.serve;
    match cli.command {
        Some(Command::CheckConfig) => match load_config(&args).and_then(|c| preflight(&c, false).map(|_| c)) {
            Ok(config) => {
                for line in config.security_posture() {
                    eprintln!("datanode: security: {line}");
                }
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Some(Command::Token { signing_key_file, partition, ttl }) => {
            let key_file = match signing_key_file {
                Some(file) => file,
                None => match load_config(&args) {
                    Ok(config) => match config.auth.signing_key_file {
                        Some(file) => file,
                        None => {
                            eprintln!(
                                "datanode: no --signing-key-file and no auth.signing_key_file in the configuration"
                            );
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    },
                    Err(code) => return code,
                },
            };
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let Some(expires) = now.checked_add(ttl).filter(|_| !ttl.is_zero()) else {
                eprintln!("datanode: --ttl {}: not a usable validity", config::duration_text(ttl));
                return ExitCode::from(2);
            };
            match auth::read_signing_key(&key_file) {
                Ok(key) => {
                    println!("{}", auth::sign(&key, partition, expires.as_secs()));
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("datanode: {error}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Some(Command::Serve) | None => serve(&args),
        Some(Command::Status { url, json }) => {
            let url = match node_url(url.as_deref(), &args) {
                Ok(url) => url,
                Err(code) => return code,
            };
            match status::render(&url, json, &cli.client_tls) {
                Ok(tables) => {
                    print!("{tables}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("datanode: cannot read the node's status: {error}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Some(Command::Partition(command)) => {
            let client = admin::command_client(&command).clone();
            admin_run(&args, &client, &cli.client_tls, |node| admin::partition(node, &command))
        }
        Some(Command::Disk(command)) => {
            let admin::DiskCommand::List { client } = &command;
            admin_run(&args, client, &cli.client_tls, |node| admin::disk(node, &command))
        }
        Some(Command::Cluster(command)) => {
            let client = admin::cluster_client(&command).clone();
            admin_run(&args, &client, &cli.client_tls, |node| admin::cluster(node, &command))
        }
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "datanode", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(Command::Man) => match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("datanode: cannot write the manual page: {error}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Some(Command::Bench(mut bench_args)) => {
            match node_url(bench_args.url.as_deref(), &args) {
                Ok(url) => bench_args.url = Some(url),
                Err(code) => return code,
            }
            match bench::run(&bench_args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("datanode bench: {error:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}

/// Runs an admin command against the node `client` names, with the admin
/// token of `--token-file` or of the configuration.
fn admin_run(
    args: &ServeArgs,
    client: &admin::Client,
    tls: &tls::ClientTls,
    work: impl FnOnce(&admin::Node) -> Result<String, admin::Failure>,
) -> ExitCode {
    let url = match node_url(client.url.as_deref(), args) {
        Ok(url) => url,
        Err(code) => return code,
    };
    let token_file = match (&client.token_file, &args.config) {
        (Some(file), _) => Some(file.clone()),
        (None, Some(_)) => load_config(args).ok().and_then(|c| c.node.admin_token_file),
        (None, None) => None,
    };
    let token = match token_file.map(|file| std::fs::read_to_string(&file).map_err(|e| (file, e))) {
        None => None,
        Some(Ok(token)) => Some(token.trim().to_string()),
        Some(Err((file, error))) => {
            eprintln!("datanode: cannot read the admin token {}: {error}", file.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match admin::Node::new(url, token, tls).and_then(|node| work(&node)) {
        Ok(text) => {
            admin::print(&text);
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("datanode: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// The URL of the node a client command talks to: `--url` (`http://` is
/// added to a bare `host:port`), else the configuration's `http_addr`
/// (an unspecified address such as 0.0.0.0 as loopback).
fn node_url(url: Option<&str>, args: &ServeArgs) -> Result<String, ExitCode> {
    if let Some(url) = url {
        if url.contains("://") && !url.starts_with("http://") && !url.starts_with("https://") {
            eprintln!("datanode: --url {url:?}: only http:// and https:// URLs");
            return Err(ExitCode::from(2));
        }
        let url = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        return Ok(url.trim_end_matches('/').to_string());
    }
    let config = load_config(args)?;
    let mut addr = config.node.http_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    Ok(format!("{scheme}://{addr}"))
}

fn load_config(args: &ServeArgs) -> Result<Config, ExitCode> {
    let overrides = Overrides { data_dir: args.data_dir.clone(), http_addr: args.http_addr.clone() };
    Config::load(args.config.as_deref(), std::env::vars(), &overrides).map_err(|error| {
        eprintln!("datanode: bad configuration: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// What `serve` starts with, checked before anything is created.
struct Checked {
    admin_token: Option<String>,
    tls: Option<Arc<tls::Tls>>,
    data_auth: Arc<DataAuth>,
    cluster_secret: Option<cluster::transport::ClusterSecret>,
    warnings: Vec<String>,
}

/// [`Config::preflight`], the TLS files and the data tokens, with the
/// warnings on stderr.
fn preflight(config: &Config, create: bool) -> Result<Checked, ExitCode> {
    let refuse = |error: String| {
        eprintln!("datanode: bad configuration: {error}");
        ExitCode::from(EXIT_CONFIG)
    };
    let checked = config.preflight(create).map_err(|e| refuse(e.to_string()))?;
    // With client certificates, a cluster node's certificate is its
    // credential on the peer port too, and must name it.
    let peer_node = config.peer_tls().then_some(config.node.id.as_str());
    let tls =
        config.tls.as_ref().map(|files| tls::Tls::load(files, peer_node)).transpose().map_err(refuse)?.map(Arc::new);
    let data_auth = Arc::new(DataAuth::load(&config.auth).map_err(refuse)?);
    let cluster_secret = config
        .cluster
        .as_ref()
        .and_then(|c| c.secret_file.as_deref())
        .map(|path| {
            cluster::transport::ClusterSecret::load(path).map_err(|error| format!("cluster.secret_file: {error}"))
        })
        .transpose()
        .map_err(refuse)?;
    for warning in &checked.warnings {
        eprintln!("datanode: warning: {warning}");
    }
    Ok(Checked { admin_token: checked.admin_token, tls, data_auth, cluster_secret, warnings: checked.warnings })
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
    let format = args.log_format.unwrap_or_else(|| logging::LogFormat::from_config(&config.node.log_format));
    let disks = config.disk.iter().map(|d| (d.name.clone(), d.path.clone())).collect();
    let logs = logging::init(format, &config.node.log_filter, &config.node.id, disks);
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
    let reload_args = args.clone();
    let reload = move || load_config_quietly(&reload_args);
    let code = match runtime.block_on(run(config, checked, listener, logs, &reload)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_RUNTIME),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "datanode stopped");
            eprintln!("datanode: {error:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    };
    // Dropping the runtime would wait for every blocking thread, and one
    // stuck in a hung read or sync never returns: leave them, the exit
    // ends them. 0 only came from a registry that closed every partition.
    runtime.shutdown_background();
    code
}

/// The configuration as `serve` loaded it, again (for SIGHUP).
fn load_config_quietly(args: &ServeArgs) -> Result<Config, config::ConfigError> {
    let overrides = Overrides { data_dir: args.data_dir.clone(), http_addr: args.http_addr.clone() };
    Config::load(args.config.as_deref(), std::env::vars(), &overrides)
}

/// How often systemd hears that a long load is still going, and by how
/// much each message extends its start timeout.
const EXTEND_EVERY: Duration = Duration::from_secs(3);
const EXTEND_BY: Duration = Duration::from_secs(10);

/// Serves `/healthz`, `/metrics` and a `/readyz` that says "loading" while
/// the partitions load, then the API; serves until SIGTERM/SIGINT (SIGHUP
/// reloads), drains. `Ok(true)` for a clean shutdown within
/// `shutdown_timeout`.
async fn run(
    config: Config,
    checked: Checked,
    listener: std::net::TcpListener,
    logs: logging::Logging,
    reload: &dyn Fn() -> Result<Config, config::ConfigError>,
) -> anyhow::Result<bool> {
    let metrics = exposition::install()?;
    metrics::gauge!("datanode_build_info", "version" => env!("CARGO_PKG_VERSION"), "revision" => env!("DN_BUILD_REVISION"))
        .set(1.0);
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    let mut signals = Signals::new();
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let Checked { admin_token, tls, data_auth, cluster_secret, .. } = checked;
    let peer_auth = match (tls.as_ref().and_then(|tls| tls.peer_certificates()), cluster_secret) {
        (Some(certificates), _) => cluster::PeerAuth::Tls(certificates),
        (None, Some(secret)) => cluster::PeerAuth::Secret(secret),
        (None, None) => cluster::PeerAuth::Open,
    };
    exposition::zero_security_counters(tls.is_some());
    if let Some(tls) = &tls {
        tls.export_expiry();
        let tls = Arc::clone(tls);
        auth::spawn_watch(move || tls.reload(false));
    }
    if data_auth.required() {
        let data_auth = Arc::clone(&data_auth);
        auth::spawn_watch(move || data_auth.reload(false));
    }
    for line in config.security_posture() {
        tracing::info!(posture = %line, "security");
    }
    let options = server::ServeOptions { header_timeout: config.limits.header_timeout, tls: tls.clone() };
    let api = Arc::new(std::sync::OnceLock::new());
    let mut served = tokio::spawn(server::serve(
        listener,
        api::loading_router(Arc::clone(&api), metrics.clone()),
        options,
        drain_rx,
    ));
    tracing::info!(%addr, version = VERSION, "datanode listening; loading partitions");

    let storage = datanode_wal::open_backend(config.wal.io_backend.parse().map_err(anyhow::Error::msg)?)?;
    let (disks, defaults) = (node::disks(&config), node::partition_defaults(&config));
    let bootstrap = config.node.bootstrap_partitions;
    let loading = tokio::task::spawn_blocking(move || -> anyhow::Result<Registry> {
        let registry = Registry::open(storage, disks, defaults);
        node::bootstrap(&registry, bootstrap)?;
        Ok(registry)
    });
    tokio::pin!(loading);
    let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + EXTEND_EVERY, EXTEND_EVERY);
    let mut stop = false;
    let registry = loop {
        tokio::select! {
            loaded = &mut loading => break loaded??,
            _ = extend.tick() => node::sd_notify(&format!("EXTEND_TIMEOUT_USEC={}", EXTEND_BY.as_micros())),
            signal = signals.next() => match signal {
                Signal::Stop => {
                    tracing::info!("stop requested while loading: stopping once the partitions are loaded");
                    stop = true;
                }
                Signal::Reload => tracing::info!("SIGHUP while loading: ignored"),
            },
        }
    };
    let mut running = config.clone();
    let shutdown_timeout = config.node.shutdown_timeout;
    let node = Arc::new(Node::new(config, registry, admin_token, Arc::clone(&data_auth), metrics));
    if let Some(cluster) = node.config.cluster.clone() {
        let joined =
            cluster::Cluster::start(cluster, node.config.node.id.clone(), Arc::clone(&node.registry), peer_auth)
                .await?;
        tracing::info!(peer_addr = %joined.config.peer_addr, seed = joined.meta.is_some(), "joined the cluster");
        node.set_cluster(joined);
    }
    node::spawn_background(&node)?;
    alerts::spawn(&node);
    let _ = api.set(api::router(Arc::clone(&node)));
    node.ready.store(true, Ordering::Release);
    node::sd_notify("READY=1");
    tracing::info!(%addr, version = VERSION, "datanode ready");

    let mut watchdog = node::watchdog_interval().map(tokio::time::interval);
    while !stop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => stop = true,
                Signal::Reload => {
                    reload_config(&node, &logs, &mut running, reload);
                    let (tls, data_auth) = (tls.clone(), Arc::clone(&data_auth));
                    tokio::task::spawn_blocking(move || {
                        if let Some(tls) = tls {
                            tls.reload(true);
                        }
                        data_auth.reload(true);
                    });
                }
            },
            _ = async { if let Some(w) = watchdog.as_mut() { w.tick().await; } else { std::future::pending::<()>().await } } => {
                // Pinged from the serving loop: a runtime that no longer
                // schedules it, or a server task that ended, stops the pings.
                if !served.is_finished() {
                    node::sd_notify("WATCHDOG=1");
                }
            }
        }
    }
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
    // Raft instances stop first: no replica takes entries while the
    // node goes down.
    if let Some(cluster) = node.cluster()
        && tokio::time::timeout_at(deadline, cluster.stop()).await.is_err()
    {
        tracing::warn!("the cluster's raft instances did not stop within shutdown_timeout");
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

/// SIGHUP: reads the configuration again and applies what can change while
/// running (`node.log_filter`, `alerts.alertmanager_url`); a change to any
/// other key is logged as waiting for a restart. A configuration that
/// does not load is refused, and the running one kept.
fn reload_config(
    node: &Node,
    logs: &logging::Logging,
    running: &mut Config,
    reload: &dyn Fn() -> Result<Config, config::ConfigError>,
) {
    let new = match reload() {
        Ok(new) => new,
        Err(error) => {
            tracing::warn!(error = %error, "SIGHUP: the configuration does not load; keeping the running one");
            return;
        }
    };
    let mut applied = Vec::new();
    match logs.set_filter(&new.node.log_filter) {
        Ok(true) => applied.push("node.log_filter"),
        Ok(false) => {}
        Err(error) => tracing::warn!(%error, "SIGHUP: cannot apply node.log_filter"),
    }
    if new.alerts.alertmanager_url != running.alerts.alertmanager_url {
        node.set_alert_target(new.alerts.alertmanager_url.clone());
        applied.push("alerts.alertmanager_url");
    }
    let (mut old_rest, mut new_rest) = (running.clone(), new.clone());
    for config in [&mut old_rest, &mut new_rest] {
        config.node.log_filter.clear();
        config.alerts.alertmanager_url = None;
    }
    let pending = config::changed_keys(&old_rest, &new_rest);
    if !pending.is_empty() {
        tracing::warn!(keys = ?pending, "SIGHUP: these keys changed and take effect at the next restart");
    }
    tracing::info!(applied = ?applied, "SIGHUP: configuration reloaded");
    running.node.log_filter = new.node.log_filter;
    running.alerts.alertmanager_url = new.alerts.alertmanager_url;
}

/// What the process was asked to do by a signal.
enum Signal {
    /// SIGTERM or SIGINT: drain and exit.
    Stop,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// SIGTERM, SIGINT and SIGHUP as a stream; when they cannot be listened
/// for, the node serves until killed.
struct Signals {
    streams: Option<[tokio::signal::unix::Signal; 3]>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let streams = (|| {
            Ok::<_, std::io::Error>([
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::hangup())?,
            ])
        })();
        match streams {
            Ok(streams) => Signals { streams: Some(streams) },
            Err(error) => {
                tracing::error!(%error, "cannot listen for signals; serving until killed");
                Signals { streams: None }
            }
        }
    }

    async fn next(&mut self) -> Signal {
        let Some([term, int, hup]) = &mut self.streams else { return std::future::pending().await };
        tokio::select! {
            _ = term.recv() => Signal::Stop,
            _ = int.recv() => Signal::Stop,
            _ = hup.recv() => Signal::Reload,
        }
    }
}
