//! `datanode bench`: a load generator for a running node.
//!
//! N keep-alive connections, each a task issuing one request at a time
//! (closed loop): PUT or GET of fixed-size values over a set of partitions,
//! for a duration after a warm-up. Latency is recorded per operation in
//! HDR histograms (microseconds, 3 significant digits); a progress line
//! goes to stderr every second; the result is a table, or JSON with
//! `--json` for scripts (the benchmarks parse it).
//!
//! The HTTP/1.1 client is a small one of its own over tokio's `TcpStream`
//! (answers with a `Content-Length` or chunked): a general client would
//! cost more CPU on the same two cores the node runs on.
//!
//! **Clusters.** `--url` may name several nodes (comma separated); the
//! connections are spread over them. A `307` with the `not_leader` answer
//! is followed: the same request (method, path, body) is sent again to the
//! `Location` (or the body's `leader_url`), and that leader is remembered
//! for the partition, so later requests for it go there directly. A
//! connection failure or a `503 no_leader` from a remembered leader
//! forgets it, and the next request goes to the configured URL again; a
//! connection failure to a configured URL moves the connection on to the
//! next one. The redirects followed are counted in the result.
//!
//! **`--target etcd`** sends the same load to an etcd cluster instead: each
//! PUT is `POST /v3/kv/put` with `{"key":BASE64,"value":BASE64}` on the
//! etcd client URL(s) (its v3 JSON gateway), through the same client, so
//! that the two systems are measured by the same generator.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The node's base URL (http only; `host:port` is taken as http), or
    /// several, comma separated (the nodes of a cluster, the members of an
    /// etcd cluster): the connections are spread over them.
    /// Default: the `http_addr` of the configuration (`--config`).
    #[arg(long)]
    pub url: Option<String>,
    /// What the URLs are: datanode nodes, or etcd members (PUTs through
    /// etcd's v3 JSON gateway, `POST /v3/kv/put`).
    #[arg(long, value_enum, default_value_t = Target::Datanode)]
    pub target: Target,
    /// Concurrent connections, one request in flight each.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Partitions to spread the load over: `1-4` (those of a fresh node) or `1,3,5`.
    #[arg(long, default_value = "1-4", value_parser = parse_ids)]
    pub partitions: Partitions,
    /// Share of requests that are PUTs (the rest are GETs), 0.0..=1.0.
    #[arg(long, default_value_t = 0.5)]
    pub put_ratio: f64,
    /// Value size, e.g. `4KiB`.
    #[arg(long, default_value = "4KiB", value_parser = crate::config::parse_size)]
    pub value_size: u64,
    /// Distinct keys per partition (written once before the run when GETs
    /// are asked for).
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// How long to measure, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Load before measuring, not counted.
    #[arg(long, default_value = "2s", value_parser = crate::config::parse_duration)]
    pub warmup: Duration,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// The run fails (exit 1) when more than this share of the measured
    /// requests failed (non-2xx answers and transport errors), 0.0..=1.0.
    #[arg(long, default_value_t = 0.01)]
    pub max_error_ratio: f64,
    /// Open loop: issue this many requests per second in all (spread over
    /// the connections) whatever the answers' latency, and measure latency
    /// from when each request was due, so a stall shows in full instead
    /// of slowing the load down. Without it, closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
}

/// What `datanode bench` loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The data API of datanode nodes.
    Datanode,
    /// etcd's v3 JSON gateway: PUTs only, the key `p{partition}/bench-{n}`.
    Etcd,
}

/// Partition ids, as `--partitions` gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions(pub Vec<u64>);

fn parse_ids(text: &str) -> Result<Partitions, String> {
    let mut ids = Vec::new();
    for part in text.split(',') {
        let bad = || format!("bad partition list {text:?}: use 1-8 or 1,3,5");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
                if a > b || b - a > 100_000 {
                    return Err(bad());
                }
                ids.extend(a..=b);
            }
            None => ids.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    if ids.is_empty() { Err("no partitions".into()) } else { Ok(Partitions(ids)) }
}

/// One operation kind's results.
#[derive(Debug)]
struct OpStats {
    latency: Histogram<u64>,
    /// Non-2xx answers by status, and transport failures as 0.
    errors: std::collections::BTreeMap<u16, u64>,
    /// The same by status and error code (`404 partition_not_found`,
    /// `connection failed`), for people.
    codes: std::collections::BTreeMap<String, u64>,
}

impl OpStats {
    fn new() -> anyhow::Result<OpStats> {
        Ok(OpStats {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            errors: Default::default(),
            codes: Default::default(),
        })
    }

    fn merge(&mut self, other: &OpStats) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        for (status, n) in &other.errors {
            *self.errors.entry(*status).or_default() += n;
        }
        for (code, n) in &other.codes {
            *self.codes.entry(code.clone()).or_default() += n;
        }
        Ok(())
    }

    fn json(&self, seconds: f64, value_size: u64) -> Value {
        let h = &self.latency;
        let count = h.len();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        json!({
            "ops": count,
            "ops_per_sec": count as f64 / seconds,
            "mib_per_sec": (count * value_size) as f64 / seconds / (1 << 20) as f64,
            "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": h.max() as f64 / 1000.0,
            "errors": self.errors.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "error_codes": self.codes.iter().map(|(c, n)| (c.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Connection {
    stream: BufReader<TcpStream>,
    host: String,
    head: String,
    line: String,
    /// The `Location` of the last answer, if it had one.
    location: Option<String>,
}

impl Connection {
    async fn open(addr: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream: BufReader::new(stream),
            host: addr.to_string(),
            head: String::new(),
            line: String::new(),
            location: None,
        })
    }

    /// Sends one request and reads the whole answer; returns its status.
    async fn request(&mut self, method: &str, path: &str, body: &[u8], sink: &mut Vec<u8>) -> anyhow::Result<u16> {
        self.head.clear();
        let _ = write!(
            self.head,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(self.head.as_bytes()).await?;
        if !body.is_empty() {
            stream.write_all(body).await?;
        }
        let mut status = None;
        let mut length = 0usize;
        let mut chunked = false;
        self.location = None;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                bail!("connection closed");
            }
            let line = self.line.trim_end();
            if line.is_empty() {
                break;
            }
            if status.is_none() {
                status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
            } else if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().context("content-length")?;
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.trim().eq_ignore_ascii_case("chunked");
                } else if name.eq_ignore_ascii_case("location") {
                    self.location = Some(value.trim().to_string());
                }
            }
        }
        if chunked {
            self.read_chunked(sink).await?;
        } else {
            sink.resize(length, 0);
            self.stream.read_exact(sink).await?;
        }
        status.context("no status line")
    }

    /// A chunked body into `sink` (trailers skipped).
    async fn read_chunked(&mut self, sink: &mut Vec<u8>) -> anyhow::Result<()> {
        sink.clear();
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                bail!("connection closed in a chunked body");
            }
            let size = self.line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
            if size == 0 {
                loop {
                    self.line.clear();
                    if self.stream.read_line(&mut self.line).await? == 0 || self.line.trim_end().is_empty() {
                        return Ok(());
                    }
                }
            }
            let start = sink.len();
            sink.resize(start + size, 0);
            self.stream.read_exact(&mut sink[start..]).await?;
            let mut crlf = [0u8; 2];
            self.stream.read_exact(&mut crlf).await?;
        }
    }
}

fn host_of(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    Ok(rest.split('/').next().unwrap_or(rest).to_string())
}

/// The addresses (`host:port`) of the URLs of `--url`, comma separated
/// (`host:port` alone is taken as http).
fn hosts_of(urls: &str) -> anyhow::Result<Vec<String>> {
    let hosts = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| if url.contains("://") { host_of(url) } else { host_of(&format!("http://{url}")) })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if hosts.is_empty() {
        bail!("no URL");
    }
    Ok(hosts)
}

/// The most redirects one request follows.
const MAX_REDIRECTS: usize = 5;

/// Where a `307` sends a request again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Redirect {
    /// The leader's address, `host:port`.
    addr: String,
    /// The path (and query) to send the request to.
    path: String,
}

/// The target of a `307`: its `Location` if that is a usable `http://` URL,
/// else the `leader_url` of a `not_leader` body with the request's own
/// `path`. `None` when neither is usable (never a panic on bad input).
fn parse_redirect(location: Option<&str>, body: &[u8], path: &str) -> Option<Redirect> {
    if let Some((addr, rest)) = location.and_then(split_http_url) {
        let rest = rest.split('#').next().unwrap_or("");
        let path = match rest.chars().next() {
            None => "/".to_string(),
            Some('?') => format!("/{rest}"),
            Some(_) => rest.to_string(),
        };
        return Some(Redirect { addr, path });
    }
    let body: Value = serde_json::from_slice(body).ok()?;
    if body["error"] != "not_leader" {
        return None;
    }
    let (addr, _) = split_http_url(body["leader_url"].as_str()?)?;
    Some(Redirect { addr, path: path.to_string() })
}

/// `http://host[:port][/rest]` -> (`host:port`, `/rest`); the port is 80
/// when absent. `None` for another scheme, user info, an empty host, a bad
/// port, or a character that cannot go into a request line.
fn split_http_url(url: &str) -> Option<(String, &str)> {
    let url = url.trim();
    let scheme = url.get(..7)?;
    if !scheme.eq_ignore_ascii_case("http://") {
        return None;
    }
    let rest = url.get(7..)?;
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let (authority, rest) = match rest.find(['/', '?', '#']) {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let valid_port =
        |port: &str| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok();
    let addr = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        match after {
            "" => format!("[{host}]:80"),
            after => {
                let port = after.strip_prefix(':')?;
                if !valid_port(port) {
                    return None;
                }
                authority.to_string()
            }
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => {
                if host.is_empty() || host.contains(':') || !valid_port(port) {
                    return None;
                }
                authority.to_string()
            }
            None => format!("{authority}:80"),
        }
    };
    Some((addr, rest))
}

/// The leaders learned from redirects, by partition: their addresses.
#[derive(Debug, Default)]
struct Leaders(Mutex<HashMap<u64, String>>);

impl Leaders {
    fn get(&self, partition: u64) -> Option<String> {
        self.0.lock().ok()?.get(&partition).cloned()
    }

    fn remember(&self, partition: u64, addr: &str) {
        if let Ok(mut map) = self.0.lock()
            && map.get(&partition).map(String::as_str) != Some(addr)
        {
            map.insert(partition, addr.to_string());
        }
    }

    /// Forgets `addr` as the leader of `partition` (if it still is).
    fn forget(&self, partition: u64, addr: &str) {
        if let Ok(mut map) = self.0.lock()
            && map.get(&partition).map(String::as_str) == Some(addr)
        {
            map.remove(&partition);
        }
    }
}

/// One closed-loop lane's client: keep-alive connections to the
/// configured addresses and to the leaders it was sent to, one request in
/// flight at a time.
struct Client {
    homes: Arc<Vec<String>>,
    /// The configured address this lane uses now.
    home: usize,
    pool: Vec<(String, Connection)>,
    leaders: Arc<Leaders>,
    /// Redirects followed.
    redirects: u64,
    /// The last request failed to connect (refused, unreachable).
    refused: bool,
}

impl Client {
    fn new(homes: Arc<Vec<String>>, home: usize, leaders: Arc<Leaders>) -> Client {
        let home = home % homes.len().max(1);
        Client { homes, home, pool: Vec::new(), leaders, redirects: 0, refused: false }
    }

    fn home(&self) -> &str {
        &self.homes[self.home]
    }

    /// Opens the connection to the lane's configured address now.
    async fn connect(&mut self) -> anyhow::Result<()> {
        let addr = self.home().to_string();
        self.pool.push((addr.clone(), Connection::open(&addr).await?));
        Ok(())
    }

    /// One request to `addr`, on its pooled connection (opened if need
    /// be; dropped when it fails).
    async fn request_at(
        &mut self,
        addr: &str,
        method: &str,
        path: &str,
        body: &[u8],
        sink: &mut Vec<u8>,
    ) -> anyhow::Result<(u16, Option<String>)> {
        self.refused = false;
        let at = match self.pool.iter().position(|(a, _)| a == addr) {
            Some(at) => at,
            None => {
                let conn = Connection::open(addr).await.inspect_err(|_| self.refused = true)?;
                self.pool.push((addr.to_string(), conn));
                self.pool.len() - 1
            }
        };
        let conn = &mut self.pool[at].1;
        match conn.request(method, path, body, sink).await {
            Ok(status) => Ok((status, if status == 307 { conn.location.take() } else { None })),
            Err(error) => {
                self.pool.swap_remove(at);
                Err(error)
            }
        }
    }

    /// One request for `partition` (`None`: not routed by partition),
    /// following redirects: the final status, or the transport error.
    async fn send(
        &mut self,
        partition: Option<u64>,
        method: &str,
        path: &str,
        body: &[u8],
        sink: &mut Vec<u8>,
    ) -> anyhow::Result<u16> {
        let mut addr = partition.and_then(|p| self.leaders.get(p)).unwrap_or_else(|| self.home().to_string());
        let mut path = std::borrow::Cow::Borrowed(path);
        for hop in 0..=MAX_REDIRECTS {
            match self.request_at(&addr, method, &path, body, sink).await {
                Err(error) => {
                    if let Some(partition) = partition {
                        self.leaders.forget(partition, &addr);
                    }
                    if addr == self.home() {
                        self.home = (self.home + 1) % self.homes.len();
                    }
                    return Err(error);
                }
                Ok((307, location)) if hop < MAX_REDIRECTS => {
                    let Some(redirect) = parse_redirect(location.as_deref(), sink, &path) else { return Ok(307) };
                    if let Some(partition) = partition {
                        self.leaders.remember(partition, &redirect.addr);
                    }
                    self.redirects += 1;
                    addr = redirect.addr;
                    path = std::borrow::Cow::Owned(redirect.path);
                }
                Ok((503, _)) => {
                    if let Some(partition) = partition
                        && error_code(sink).as_deref() == Some("no_leader")
                    {
                        self.leaders.forget(partition, &addr);
                    }
                    return Ok(503);
                }
                Ok((status, _)) => return Ok(status),
            }
        }
        Ok(307)
    }
}

/// The `error` of a JSON error body.
fn error_code(body: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    body["error"].as_str().map(String::from)
}

/// The body of an etcd `POST /v3/kv/put` of `key`, into `out`.
fn etcd_put_body(out: &mut String, key: &str, value_base64: &str) {
    out.clear();
    out.push_str("{\"key\":\"");
    base64::engine::general_purpose::STANDARD.encode_string(key, out);
    out.push_str("\",\"value\":\"");
    out.push_str(value_base64);
    out.push_str("\"}");
}

/// A small fast generator for choosing operations and keys.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

impl BenchArgs {
    /// The node's URL (set by the caller from `--url` or the configuration).
    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or("http://127.0.0.1:7070")
    }
}

/// Runs the benchmark and prints the result. Blocking (its own runtime).
/// Fails when more than `--max-error-ratio` of the requests failed.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.max_error_ratio) {
        bail!("--max-error-ratio must be within 0..=1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(measure(args))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", table(&result));
    }
    let count = |key: &str| -> u64 {
        ["put", "get"]
            .iter()
            .map(|op| match &result[op][key] {
                Value::Object(map) => map.values().filter_map(Value::as_u64).sum::<u64>(),
                other => other.as_u64().unwrap_or(0),
            })
            .sum()
    };
    let failed = count("errors");
    let total = failed + count("ops");
    if total > 0 && failed as f64 / total as f64 > args.max_error_ratio {
        bail!(
            "{failed} of {total} requests failed ({:.1}%), more than --max-error-ratio {}",
            100.0 * failed as f64 / total as f64,
            args.max_error_ratio
        );
    }
    Ok(())
}

async fn measure(args: &BenchArgs) -> anyhow::Result<Value> {
    if !(0.0..=1.0).contains(&args.put_ratio) {
        bail!("--put-ratio must be within 0..=1");
    }
    let etcd = args.target == Target::Etcd;
    if etcd && args.put_ratio < 1.0 {
        bail!("--target etcd: PUTs only (--put-ratio 1)");
    }
    let homes = Arc::new(hosts_of(args.url())?);
    let leaders = Arc::new(Leaders::default());
    let value = Arc::new(vec![b'v'; args.value_size as usize]);
    let value_base64 =
        Arc::new(if etcd { base64::engine::general_purpose::STANDARD.encode(&*value) } else { String::new() });
    let mut redirects = 0;
    if args.put_ratio < 1.0 {
        redirects += prefill(&homes, &leaders, args, &value).await?;
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for connection in 0..args.connections {
        let (homes, leaders, args, value) =
            (Arc::clone(&homes), Arc::clone(&leaders), args.clone(), Arc::clone(&value));
        let value_base64 = Arc::clone(&value_base64);
        let (measuring, stop, done) = (Arc::clone(&measuring), Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut puts = OpStats::new()?;
            let mut gets = OpStats::new()?;
            let mut client = Client::new(homes, connection, leaders);
            client.connect().await?;
            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (connection as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            let mut sink = Vec::new();
            let mut path = String::new();
            let mut key = String::new();
            let mut body = String::new();
            // Open loop: this connection's share of the rate, from a
            // staggered start.
            let interval = args.rate.map(|rate| Duration::from_secs_f64(args.connections as f64 / rate.max(1e-3)));
            let stagger = connection as f64 / args.connections as f64;
            let mut due = interval.map(|every| Instant::now() + every.mul_f64(stagger));
            let mut was_measuring = false;
            let mut warmup_redirects = 0;
            while !stop.load(Ordering::Relaxed) {
                if !was_measuring && measuring.load(Ordering::Relaxed) {
                    // A backlog from the warm-up is not carried into the run.
                    was_measuring = true;
                    warmup_redirects = client.redirects;
                    due = interval.map(|every| Instant::now() + every.mul_f64(stagger));
                }
                if let (Some(at), Some(every)) = (due.as_mut(), interval) {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(*at)).await;
                    *at += every;
                }
                let partition = args.partitions.0[rng.below(args.partitions.0.len() as u64) as usize];
                let put = rng.chance(args.put_ratio);
                // Open loop measures from when the request was due.
                let started = due.zip(interval).map_or_else(Instant::now, |(next, every)| next - every);
                let outcome = if etcd {
                    key.clear();
                    let _ = write!(key, "p{partition}/bench-{}", rng.below(args.keys));
                    etcd_put_body(&mut body, &key, &value_base64);
                    client.send(None, "POST", "/v3/kv/put", body.as_bytes(), &mut sink).await
                } else {
                    path.clear();
                    let _ = write!(path, "/v1/partitions/{partition}/blobs/bench-{}", rng.below(args.keys));
                    if put {
                        client.send(Some(partition), "PUT", &path, &value, &mut sink).await
                    } else {
                        client.send(Some(partition), "GET", &path, &[], &mut sink).await
                    }
                };
                let micros = started.elapsed().as_micros() as u64;
                if outcome.is_err() && client.refused {
                    // Nothing to reach right now (refused): not a busy loop.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                let stats = if put { &mut puts } else { &mut gets };
                match outcome {
                    Ok(status) if (200..300).contains(&status) => {
                        stats.latency.record(micros.max(1))?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(status) => {
                        *stats.errors.entry(status).or_default() += 1;
                        let code = error_code(&sink).unwrap_or_default();
                        *stats.codes.entry(format!("{status} {code}").trim_end().to_string()).or_default() += 1;
                    }
                    Err(_) => {
                        *stats.errors.entry(0).or_default() += 1;
                        *stats.codes.entry("connection failed".into()).or_default() += 1;
                    }
                }
            }
            if !was_measuring {
                warmup_redirects = client.redirects;
            }
            anyhow::Ok((puts, gets, warmup_redirects, client.redirects - warmup_redirects))
        }));
    }
    tokio::time::sleep(args.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut last = (0, Instant::now());
    // On a terminal one line rewritten every second; elsewhere (a log, a
    // pipe) a plain line every 5 seconds.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let every = if terminal { Duration::from_secs(1) } else { Duration::from_secs(5) };
    while started.elapsed() < args.duration {
        let left = args.duration.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(every)).await;
        if !args.quiet {
            let now = done.load(Ordering::Relaxed);
            let rate = (now - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-3);
            let line = format!("{:>4.0}s  {rate:>9.0} ops/s  {now:>10} ops total", started.elapsed().as_secs_f64());
            if terminal {
                eprint!("\r  {line}   ");
            } else {
                eprintln!("  {line}");
            }
            last = (now, Instant::now());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    if !args.quiet && terminal {
        eprintln!();
    }
    let (mut puts, mut gets) = (OpStats::new()?, OpStats::new()?);
    let mut measured_redirects = 0;
    for task in tasks {
        let (p, g, warmup, measured) = task.await??;
        puts.merge(&p)?;
        gets.merge(&g)?;
        redirects += warmup;
        measured_redirects += measured;
    }
    let total = puts.latency.len() + gets.latency.len();
    Ok(json!({
        "url": args.url(),
        "target": if etcd { "etcd" } else { "datanode" },
        "connections": args.connections,
        "partitions": args.partitions.0,
        "put_ratio": args.put_ratio,
        "value_size": args.value_size,
        "rate": args.rate,
        "seconds": seconds,
        "ops_per_sec": total as f64 / seconds,
        "redirects": measured_redirects,
        "redirects_before": redirects,
        "put": puts.json(seconds, args.value_size),
        "get": gets.json(seconds, args.value_size),
    }))
}

/// Writes every key once, so that GETs find them; returns the redirects
/// followed.
async fn prefill(
    homes: &Arc<Vec<String>>,
    leaders: &Arc<Leaders>,
    args: &BenchArgs,
    value: &[u8],
) -> anyhow::Result<u64> {
    let lanes = args.connections.clamp(1, 32);
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (partitions, keys, value) = (args.partitions.0.clone(), args.keys, value.to_vec());
        let mut client = Client::new(Arc::clone(homes), lane, Arc::clone(leaders));
        tasks.push(tokio::spawn(async move {
            client.connect().await?;
            let mut sink = Vec::new();
            for (i, partition) in partitions.iter().enumerate() {
                for key in (0..keys).filter(|k| (k + i as u64) % lanes as u64 == lane as u64) {
                    let path = format!("/v1/partitions/{partition}/blobs/bench-{key}");
                    let status = client.send(Some(*partition), "PUT", &path, &value, &mut sink).await?;
                    if status != 201 {
                        bail!("prefill PUT {path}: {status} {}", String::from_utf8_lossy(&sink));
                    }
                }
            }
            anyhow::Ok(client.redirects)
        }));
    }
    let mut redirects = 0;
    for task in tasks {
        redirects += task.await??;
    }
    Ok(redirects)
}

fn table(result: &Value) -> String {
    let mut out = format!(
        "{} connections, partitions {}, put ratio {}, {} B values, {:.1} s: {:.0} ops/s\n",
        result["connections"],
        result["partitions"],
        result["put_ratio"],
        result["value_size"],
        result["seconds"].as_f64().unwrap_or(0.0),
        result["ops_per_sec"].as_f64().unwrap_or(0.0),
    );
    let _ = writeln!(
        out,
        "{:<4} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}  errors",
        "op", "ops/s", "MiB/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    for op in ["put", "get"] {
        let r = &result[op];
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "{op:<4} {:>10.0} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {}",
            f("ops_per_sec"),
            f("mib_per_sec"),
            f("p50_ms"),
            f("p99_ms"),
            f("p999_ms"),
            f("max_ms"),
            error_text(&r["error_codes"])
        );
    }
    let redirects = result["redirects"].as_u64().unwrap_or(0) + result["redirects_before"].as_u64().unwrap_or(0);
    if redirects > 0 {
        let _ = writeln!(
            out,
            "redirects followed: {} while measuring, {} before",
            result["redirects"], result["redirects_before"]
        );
    }
    out
}

/// `404 partition_not_found x12, connection failed x1`, or `-`.
fn error_text(codes: &Value) -> String {
    let parts: Vec<String> = codes
        .as_object()
        .into_iter()
        .flatten()
        .map(|(code, n)| format!("{code} x{}", n.as_u64().unwrap_or(0)))
        .collect();
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_lists_parse_ranges_and_lists_and_refuse_junk() {
        assert_eq!(parse_ids("1-4").unwrap().0, vec![1, 2, 3, 4]);
        assert_eq!(parse_ids("1,3, 5").unwrap().0, vec![1, 3, 5]);
        assert_eq!(parse_ids("2-3,7").unwrap().0, vec![2, 3, 7]);
        for bad in ["", "x", "4-1", "1-", "0-999999999"] {
            assert!(parse_ids(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn redirects_go_to_the_location_or_else_the_leader_url() {
        let to = |addr: &str, path: &str| Some(Redirect { addr: addr.into(), path: path.into() });
        let path = "/v1/partitions/1/blobs/k";
        assert_eq!(
            parse_redirect(Some("http://127.0.0.1:7071/v1/partitions/1/blobs/k"), b"", path),
            to("127.0.0.1:7071", path)
        );
        assert_eq!(parse_redirect(Some(" HTTP://node-2/x?y=1#frag "), b"", path), to("node-2:80", "/x?y=1"));
        assert_eq!(parse_redirect(Some("http://[::1]:9/p"), b"", path), to("[::1]:9", "/p"));
        assert_eq!(parse_redirect(Some("http://[::1]"), b"", path), to("[::1]:80", "/"));
        assert_eq!(parse_redirect(Some("http://h:1?q"), b"", path), to("h:1", "/?q"));
        let body = br#"{"error":"not_leader","leader":"dn-2","leader_url":"http://127.0.0.1:7072"}"#;
        // No Location, or an unusable one: the body's leader, same path.
        assert_eq!(parse_redirect(None, body, path), to("127.0.0.1:7072", path));
        for bad in [
            "",
            "/relative",
            "https://127.0.0.1:7071/x",
            "http://",
            "http:///x",
            "http://user@h:1/x",
            "http://h:99999/x",
            "http://h:/x",
            "http://h:x/x",
            "http://a:b:c/x",
            "http://[::1/x",
            "http://[zz]:1/x",
            "http://[::1]x/y",
            "http://h:1/a b",
            "http://h:1/a\r\nX: y",
            "ftp://h/x",
            "http:/",
            "h\u{e9}llo://x",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
        ] {
            assert_eq!(parse_redirect(Some(bad), b"", path), None, "{bad:?}");
            assert_eq!(parse_redirect(Some(bad), body, path), to("127.0.0.1:7072", path), "{bad:?}");
        }
        // Neither: no redirect.
        for body in [
            &b""[..],
            b"not json",
            br#"{"error":"no_leader"}"#,
            br#"{"error":"not_leader"}"#,
            br#"{"error":"not_leader","leader_url":7}"#,
            br#"{"error":"not_leader","leader_url":"https://h:1"}"#,
            br#"[1,2]"#,
        ] {
            assert_eq!(parse_redirect(None, body, path), None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_remembered_leader_is_forgotten_only_while_it_is_the_one() {
        let leaders = Leaders::default();
        leaders.remember(1, "a:1");
        leaders.forget(1, "b:1");
        assert_eq!(leaders.get(1).as_deref(), Some("a:1"));
        leaders.remember(1, "b:1");
        assert_eq!(leaders.get(1).as_deref(), Some("b:1"));
        leaders.forget(1, "b:1");
        assert_eq!(leaders.get(1), None);
        assert_eq!(leaders.get(2), None);
    }

    #[test]
    fn url_lists_and_etcd_bodies() {
        assert_eq!(hosts_of("http://a:1, b:2,").unwrap(), vec!["a:1", "b:2"]);
        assert!(hosts_of("").is_err());
        assert!(hosts_of("https://a:1").is_err());
        let mut body = String::new();
        etcd_put_body(&mut body, "p1/bench-7", "dnZ2");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["key"], base64::engine::general_purpose::STANDARD.encode("p1/bench-7"));
        assert_eq!(json["value"], "dnZ2");
    }

    #[test]
    fn the_generator_spreads_choices() {
        let mut rng = XorShift(42);
        let puts = (0..10_000).filter(|_| rng.chance(0.25)).count();
        assert!((2000..3000).contains(&puts), "{puts}");
        assert!((0..1000).all(|_| rng.below(8) < 8));
    }
}
