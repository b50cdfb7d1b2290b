//! `datanode bench`: a load generator for a running node.
//!
//! N keep-alive connections, each a task issuing one request at a time
//! (closed loop): PUT or GET of fixed-size values over a set of partitions,
//! for a duration after a warm-up. Latency is recorded per operation in
//! HDR histograms (microseconds, 3 significant digits); a progress line
//! goes to stderr every second; the result is a table, or JSON with
//! `--json` for scripts (the benchmarks parse it).
//!
//! The HTTP/1.1 client is a small one of its own over tokio's `TcpStream`:
//! the node always answers with a `Content-Length`, and a general client
//! would cost more CPU on the same two cores the node runs on.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The node's base URL (http only; `host:port` is taken as http).
    /// Default: the `http_addr` of the configuration (`--config`).
    #[arg(long)]
    pub url: Option<String>,
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
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().context("content-length")?;
            }
        }
        sink.resize(length, 0);
        self.stream.read_exact(sink).await?;
        status.context("no status line")
    }
}

fn host_of(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    Ok(rest.split('/').next().unwrap_or(rest).to_string())
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
    let addr = host_of(args.url())?;
    let value = Arc::new(vec![b'v'; args.value_size as usize]);
    if args.put_ratio < 1.0 {
        prefill(&addr, args, &value).await?;
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for connection in 0..args.connections {
        let (addr, args, value) = (addr.clone(), args.clone(), Arc::clone(&value));
        let (measuring, stop, done) = (Arc::clone(&measuring), Arc::clone(&stop), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut puts = OpStats::new()?;
            let mut gets = OpStats::new()?;
            let mut conn = Connection::open(&addr).await?;
            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (connection as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            let mut sink = Vec::new();
            let mut path = String::new();
            // Open loop: this connection's share of the rate, from a
            // staggered start.
            let interval = args.rate.map(|rate| Duration::from_secs_f64(args.connections as f64 / rate.max(1e-3)));
            let stagger = connection as f64 / args.connections as f64;
            let mut due = interval.map(|every| Instant::now() + every.mul_f64(stagger));
            let mut was_measuring = false;
            while !stop.load(Ordering::Relaxed) {
                if !was_measuring && measuring.load(Ordering::Relaxed) {
                    // A backlog from the warm-up is not carried into the run.
                    was_measuring = true;
                    due = interval.map(|every| Instant::now() + every.mul_f64(stagger));
                }
                if let (Some(at), Some(every)) = (due.as_mut(), interval) {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(*at)).await;
                    *at += every;
                }
                let partition = args.partitions.0[rng.below(args.partitions.0.len() as u64) as usize];
                let put = rng.chance(args.put_ratio);
                path.clear();
                let _ = write!(path, "/v1/partitions/{partition}/blobs/bench-{}", rng.below(args.keys));
                // Open loop measures from when the request was due.
                let started = due.zip(interval).map_or_else(Instant::now, |(next, every)| next - every);
                let outcome = if put {
                    conn.request("PUT", &path, &value, &mut sink).await
                } else {
                    conn.request("GET", &path, &[], &mut sink).await
                };
                let micros = started.elapsed().as_micros() as u64;
                if !measuring.load(Ordering::Relaxed) {
                    if outcome.is_err() {
                        conn = Connection::open(&addr).await?;
                    }
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
                        let code = serde_json::from_slice::<Value>(&sink)
                            .ok()
                            .and_then(|body| body["error"].as_str().map(String::from))
                            .unwrap_or_default();
                        *stats.codes.entry(format!("{status} {code}").trim_end().to_string()).or_default() += 1;
                    }
                    Err(_) => {
                        *stats.errors.entry(0).or_default() += 1;
                        *stats.codes.entry("connection failed".into()).or_default() += 1;
                        conn = Connection::open(&addr).await?;
                    }
                }
            }
            anyhow::Ok((puts, gets))
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
    for task in tasks {
        let (p, g) = task.await??;
        puts.merge(&p)?;
        gets.merge(&g)?;
    }
    let total = puts.latency.len() + gets.latency.len();
    Ok(json!({
        "url": args.url(),
        "connections": args.connections,
        "partitions": args.partitions.0,
        "put_ratio": args.put_ratio,
        "value_size": args.value_size,
        "rate": args.rate,
        "seconds": seconds,
        "ops_per_sec": total as f64 / seconds,
        "put": puts.json(seconds, args.value_size),
        "get": gets.json(seconds, args.value_size),
    }))
}

/// Writes every key once, so that GETs find them.
async fn prefill(addr: &str, args: &BenchArgs, value: &[u8]) -> anyhow::Result<()> {
    let lanes = args.connections.clamp(1, 32);
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (addr, partitions, keys, value) = (addr.to_string(), args.partitions.0.clone(), args.keys, value.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(&addr).await?;
            let mut sink = Vec::new();
            for (i, partition) in partitions.iter().enumerate() {
                for key in (0..keys).filter(|k| (k + i as u64) % lanes as u64 == lane as u64) {
                    let path = format!("/v1/partitions/{partition}/blobs/bench-{key}");
                    let status = conn.request("PUT", &path, &value, &mut sink).await?;
                    if status != 201 {
                        bail!("prefill PUT {path}: {status} {}", String::from_utf8_lossy(&sink));
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
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
    fn the_generator_spreads_choices() {
        let mut rng = XorShift(42);
        let puts = (0..10_000).filter(|_| rng.chance(0.25)).count();
        assert!((2000..3000).contains(&puts), "{puts}");
        assert!((0..1000).all(|_| rng.below(8) < 8));
    }
}
