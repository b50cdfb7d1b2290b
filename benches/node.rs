//! Node-level benchmarks (the workloads are described in BENCHMARKS.md):
//!
//! - **N1**: PUT and GET of 4 KiB values, 64 connections over 8
//!   partitions, against the real binary (`datanode bench`), and the same
//!   load straight on the partition layer in this process (64 threads, the
//!   same WAL backend and options): the cost of the HTTP layer.
//! - **N2**: isolation. 64 connections over partitions 2-8 while 8 more
//!   connections write to partition 1, which is healthy (baseline),
//!   faulted (bit rot found at load), or whose fsync hangs (its disk is a
//!   FUSE passthrough with a hang rule; needs root and fusermount3).
//!   Reported: the 64 connections' throughput and p99 against the
//!   baseline, closed loop (as fast as answered: throughput), then open
//!   loop at `--rate` PUTs/s (default 12,000: p99 at equal load) while
//!   partition 1's connections attempt 1,000 PUTs/s.
//!
//! Only when named with `--only`:
//! - **SWEEP**: 4 KiB PUTs with 1 to 256 connections, throughput against
//!   latency, for `scripts/charts.py`.
//! - **WNODE**: W1-W4 as HTTP PUTs to one node with 64 partitions, and W5
//!   as the time from start to ready of a node holding 1 GiB.
//! - **RSS**: the resident memory of a node holding `--blobs` (default 10
//!   million) blobs of 64 bytes, written straight through the partition
//!   layer, after the real binary has replayed them.
//! - **P1**: what idle partitions cost: `--partitions` (default 1,000 and
//!   10,000) empty partitions on one disk: threads, disk and RSS per
//!   partition, create rate, start to ready.
//! - **C1**: compaction under overwrites. `--keys` (default 10,000) keys
//!   of 4 KiB in one partition, written once, then overwritten by
//!   `--connections` (default 16) closed-loop connections for `--seconds`,
//!   twice per round: with compaction by policy (the default
//!   `[compaction]`, or `--compaction` settings) and with it off (a
//!   `min_garbage` no partition reaches). Sampled every second: disk used
//!   by the data directory (allocated blocks), live bytes, garbage,
//!   compactions, bytes copied. Reported: disk used / live bytes (max and
//!   final), PUT throughput and p50/p99/p99.9 with and without compaction.
//!   The run without compaction is shortened so that it writes at most a
//!   quarter of the disk's free space.
//!
//! - **R1**: replicated PUTs: 4 KiB, 64 connections, one partition with 3
//!   replicas on a 3-node cluster on this machine (one data directory each
//!   under `--dir`, loopback), `datanode bench` given every node's URL
//!   (it follows the redirects to the leader and then sends there), beside
//!   the same load on one single node (an unreplicated partition) and on a
//!   3-member etcd cluster (the `etcd` binary; skipped with a message when
//!   absent) through its v3 JSON gateway (`datanode bench --target etcd`,
//!   the leader's client URL), data under `--dir` too.
//! - **R2**: failover. A 3-node cluster (default Raft timings,
//!   `election_timeout = 1s`) under 8 writers of 4 KiB PUTs through every
//!   node; the leader's node is killed (SIGKILL) and the time from the kill
//!   to the first acknowledged write sent after it is measured, then the
//!   node is restarted and catches up; 20 times. Reported: p50/p99/max.
//!
//! - **R3**: repair. A 4-node cluster with two partitions of 3 replicas:
//!   the first is filled with `--repair-mib` MiB (default 1,024) of 256 KiB
//!   blobs, the second takes a foreground load (8 connections, 4 KiB PUTs
//!   and GETs half and half). A node holding only the first is drained, so
//!   its replica is rebuilt on the one node without it (a snapshot streamed
//!   from the leader, then the log). Reported: the rebuild's MiB/s (live
//!   bytes / time from the drain to the old replica retired) beside a
//!   sequential read of the leader's replica files (`cat > /dev/null`,
//!   same page-cache state), and the foreground p99 during the repair
//!   beside the same load just before it.
//! - **R4**: idle groups. For each count of `--groups` (default 100 and
//!   1,000), a fresh 3-node cluster with that many partitions of 3
//!   replicas (every node holds one of each), no load: once every group
//!   has a leader and 5 s have passed, each node's CPU time over
//!   `--seconds` (`/proc/PID/stat`, user + system) as % of one core, and
//!   its resident memory (`VmRSS`) in all and per replica.
//!
//! ```sh
//! cargo bench --bench node -- --only R1,R2 --rounds 3 --seconds 10
//! cargo bench --bench node -- --only R3 --seconds 10 [--repair-mib 1024]
//! cargo bench --bench node -- --only R4 --seconds 20 [--groups 100,1000]
//! cargo bench --bench node -- [--dir DIR] [--rounds N] [--seconds S] [--only N1,N2,SWEEP,WNODE,RSS,P1,C1,R1,R2] [--backend std|uring|auto] [--blobs N]
//! cargo bench --bench node -- --only C1 --rounds 1 --seconds 600 [--keys N] [--connections N] [--compaction 'check_interval="1s",min_garbage="8MiB"'] [--segment-size 8MiB]
//! ```
//!
//! `--dir` must be on the disk under test (default `target/bench-node`).
//! Results are printed as markdown tables (medians of the rounds) and, with
//! `--json FILE`, written for `benches/charts.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datanode_partition::{DiskDir, PartitionDefaults, Registry};
use datanode_wal::{IoBackend, WalOptions};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use support::Daemon;

struct Args {
    dir: PathBuf,
    rounds: usize,
    seconds: f64,
    only: Option<Vec<String>>,
    backend: String,
    json: Option<PathBuf>,
    blobs: u64,
    /// N2's open-loop rate (PUTs/s over partitions 2-8).
    rate: f64,
    /// P1's partition counts.
    partitions: Vec<u64>,
    /// C1's keys, connections, `[compaction]` settings (`key=value`, comma
    /// separated) and WAL segment size (the node's default when `None`).
    keys: u64,
    connections: usize,
    compaction: Vec<String>,
    segment_size: Option<String>,
    /// R4's group counts.
    groups: Vec<u64>,
    /// R3's replica size, MiB.
    repair_mib: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: PathBuf::from("target/bench-node"),
        rounds: 3,
        seconds: 5.0,
        only: None,
        backend: "std".into(),
        json: None,
        blobs: 10_000_000,
        rate: 12_000.0,
        partitions: vec![1_000, 10_000],
        groups: vec![100, 1_000],
        repair_mib: 1024,
        keys: 10_000,
        connections: 16,
        compaction: Vec::new(),
        segment_size: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--dir" => args.dir = PathBuf::from(it.next().expect("--dir DIR")),
            "--rounds" => args.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--seconds" => args.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            "--only" => args.only = Some(it.next().expect("--only N1,N2").split(',').map(String::from).collect()),
            "--backend" => args.backend = it.next().expect("--backend std|uring|auto"),
            "--json" => args.json = Some(PathBuf::from(it.next().expect("--json FILE"))),
            "--blobs" => args.blobs = it.next().and_then(|v| v.parse().ok()).expect("--blobs N"),
            "--rate" => args.rate = it.next().and_then(|v| v.parse().ok()).expect("--rate PUTS_PER_SEC"),
            "--repair-mib" => args.repair_mib = it.next().expect("--repair-mib N").parse().expect("MiB"),
            "--groups" => {
                args.groups = it.next().expect("--groups N,M").split(',').map(|n| n.parse().expect("a count")).collect()
            }
            "--partitions" => {
                args.partitions = it
                    .next()
                    .expect("--partitions N,M")
                    .split(',')
                    .map(|n| n.parse().expect("--partitions: numbers"))
                    .collect()
            }
            "--keys" => args.keys = it.next().and_then(|v| v.parse().ok()).expect("--keys N"),
            "--connections" => args.connections = it.next().and_then(|v| v.parse().ok()).expect("--connections N"),
            "--compaction" => {
                args.compaction = it.next().expect("--compaction KEY=VALUE,...").split(',').map(String::from).collect()
            }
            "--segment-size" => args.segment_size = Some(it.next().expect("--segment-size SIZE")),
            "--bench" => {}
            other => panic!(
                "unknown argument {other}; usage: cargo bench --bench node -- [--dir DIR] [--rounds N] [--seconds S] [--only N1,N2,SWEEP,WNODE,RSS,P1,C1,R1,R2,R3,R4] [--backend std|uring|auto] [--json FILE] [--blobs N] [--rate N] [--partitions N,M] [--groups N,M] [--repair-mib N] [--keys N] [--connections N] [--compaction K=V,...] [--segment-size SIZE]"
            ),
        }
    }
    args
}

/// N1 and N2 run unless `--only` names others; the longer WNODE, RSS and
/// SWEEP only when named.
fn wanted(args: &Args, id: &str) -> bool {
    match &args.only {
        None => matches!(id, "N1" | "N2"),
        Some(only) => only.iter().any(|o| o == id),
    }
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::canonicalize(dir).unwrap()
}

/// One measured run: ops/s and latency percentiles in ms.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    ops: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    errors: u64,
}

impl Run {
    fn from_bench(result: &Value, op: &str) -> Run {
        let r = &result[op];
        let errors = r["errors"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        Run {
            ops: r["ops_per_sec"].as_f64().unwrap_or(0.0),
            p50: r["p50_ms"].as_f64().unwrap_or(0.0),
            p99: r["p99_ms"].as_f64().unwrap_or(0.0),
            p999: r["p999_ms"].as_f64().unwrap_or(0.0),
            errors,
        }
    }

    fn from_histogram(h: &Histogram<u64>, seconds: f64) -> Run {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Run { ops: h.len() as f64 / seconds, p50: ms(0.5), p99: ms(0.99), p999: ms(0.999), errors: 0 }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn medians(runs: &[Run]) -> Run {
    Run {
        ops: median(runs.iter().map(|r| r.ops).collect()),
        p50: median(runs.iter().map(|r| r.p50).collect()),
        p99: median(runs.iter().map(|r| r.p99).collect()),
        p999: median(runs.iter().map(|r| r.p999).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

const CONNECTIONS: usize = 64;
const VALUE: usize = 4096;
const KEYS: u64 = 1000;

fn node_config(disks: &[(&str, &Path)], backend: &str) -> String {
    support::config_with_disks(
        disks,
        &format!(
            "[node]\nbootstrap_partitions = 0\n\n[wal]\nio_backend = \"{backend}\"\n\n[health]\nprobe_interval = \"1s\"\n\n[limits]\nrequest_timeout = \"2s\"\n"
        ),
    )
}

fn create(node: &Daemon, id: u64, disk: &str) {
    let body = format!("{{\"id\":{id},\"disk\":\"{disk}\"}}");
    let (status, reply) = support::call(ureq::post(&node.url("/v1/partitions")), Some(body.as_bytes()));
    assert_eq!(status, 201, "create {id}: {}", String::from_utf8_lossy(&reply));
}

/// `datanode bench` against `node`; returns its JSON.
fn http_load(node: &Daemon, partitions: &str, connections: usize, put_ratio: f64, seconds: f64) -> std::process::Child {
    spawn(bench_command(node, partitions, connections, put_ratio, VALUE, seconds))
}

/// Open loop: 4 KiB PUTs at a fixed total `rate`, latency measured from
/// when each request was due.
fn http_load_rate(node: &Daemon, partitions: &str, connections: usize, rate: f64, seconds: f64) -> std::process::Child {
    let mut command = bench_command(node, partitions, connections, 1.0, VALUE, seconds);
    command.args(["--rate", &rate.to_string()]);
    spawn(command)
}

fn spawn(mut command: Command) -> std::process::Child {
    command.spawn().expect("datanode bench")
}

fn bench_command(
    node: &Daemon,
    partitions: &str,
    connections: usize,
    put_ratio: f64,
    value: usize,
    seconds: f64,
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_datanode"));
    command
        .args(["bench", "--url", &node.url(""), "--partitions", partitions, "--json", "--quiet"])
        .args(["--connections", &connections.to_string(), "--put-ratio", &put_ratio.to_string()])
        .args(["--value-size", &value.to_string(), "--keys", &KEYS.to_string()])
        .args(["--duration", &format!("{}ms", (seconds * 1000.0) as u64), "--warmup", "1s"])
        .stdout(std::process::Stdio::piped());
    command
}

fn result_of(child: std::process::Child) -> Value {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "datanode bench failed");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// N1 over HTTP: a fresh node with partitions 1-8.
fn n1_http(args: &Args, put: bool) -> Run {
    let disk = fresh_dir(&args.dir, "n1-http");
    let node = Daemon::with_config(&node_config(&[("d0", &disk)], &args.backend), &[]);
    for id in 1..=8 {
        create(&node, id, "d0");
    }
    let result = result_of(http_load(&node, "1-8", CONNECTIONS, if put { 1.0 } else { 0.0 }, args.seconds));
    Run::from_bench(&result, if put { "put" } else { "get" })
}

/// N1 straight on the partition layer: the same 8 partitions, 64 threads.
fn n1_direct(args: &Args, put: bool) -> Run {
    let disk = fresh_dir(&args.dir, "n1-direct");
    let backend: IoBackend = args.backend.parse().unwrap();
    let storage = datanode_wal::open_backend(backend).unwrap();
    let defaults = PartitionDefaults { wal: WalOptions::new(0), ..PartitionDefaults::default() };
    let registry = Arc::new(Registry::open(storage, vec![DiskDir { name: "d0".into(), path: disk }], defaults));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let partitions: Vec<_> = (1..=8).map(|id| registry.create(id, "d0").unwrap()).collect();
    let value = vec![b'v'; VALUE];
    if !put {
        for partition in &partitions {
            for key in 0..KEYS {
                runtime.block_on(partition.put(format!("bench-{key}").as_bytes(), &value)).unwrap();
            }
        }
    }
    let (measuring, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let threads: Vec<_> = (0..CONNECTIONS)
        .map(|t| {
            let (partitions, value, handle) = (partitions.clone(), value.clone(), runtime.handle().clone());
            let (measuring, stop) = (Arc::clone(&measuring), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let partition = &partitions[(x % 8) as usize];
                    let key = format!("bench-{}", (x >> 8) % KEYS);
                    let started = Instant::now();
                    if put {
                        handle.block_on(partition.put(key.as_bytes(), &value)).unwrap();
                    } else {
                        std::hint::black_box(partition.get(key.as_bytes(), None).unwrap());
                    }
                    if measuring.load(Ordering::Relaxed) {
                        h.record((started.elapsed().as_micros() as u64).max(1)).unwrap();
                    }
                }
                h
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for thread in threads {
        all.add(thread.join().unwrap()).unwrap();
    }
    registry.close();
    Run::from_histogram(&all, seconds)
}

fn row(name: &str, run: &Run, base: Option<&Run>) -> String {
    let ratio = base.map_or(String::from("1.00x"), |b| format!("{:.2}x", run.ops / b.ops));
    let p99 = base.map_or(String::from("1.00x"), |b| format!("{:.2}x", run.p99 / b.p99));
    format!(
        "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {ratio} | {p99} | {} |",
        run.ops, run.p50, run.p99, run.p999, run.errors
    )
}

const HEADER: &str = "| run | ops/s | p50 ms | p99 ms | p99.9 ms | throughput vs base | p99 vs base | errors |\n|---|---|---|---|---|---|---|---|";

fn n1(args: &Args, out: &mut Vec<Value>) {
    for put in [true, false] {
        let op = if put { "PUT" } else { "GET" };
        let (mut http, mut direct) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            eprintln!("N1 {op} round {}/{}", round + 1, args.rounds);
            direct.push(n1_direct(args, put));
            http.push(n1_http(args, put));
        }
        let (http, direct) = (medians(&http), medians(&direct));
        println!("\n### N1 {op} 4 KiB, 64 connections, 8 partitions, backend {}\n\n{HEADER}", args.backend);
        println!("{}", row("partition layer, in process", &direct, None));
        println!("{}", row("HTTP, real binary", &http, Some(&direct)));
        out.push(
            json!({"id": "N1", "op": op, "backend": args.backend, "direct": to_json(&direct), "http": to_json(&http)}),
        );
    }
}

fn to_json(run: &Run) -> Value {
    json!({"ops_per_sec": run.ops, "p50_ms": run.p50, "p99_ms": run.p99, "p999_ms": run.p999, "errors": run.errors})
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Trouble {
    None,
    Faulted,
    HungFsync,
}

/// One N2 run: partitions 2-8 on d0 under 64 connections, partition 1 on
/// d1 under 8 connections of its own, in the given trouble.
fn n2_run(args: &Args, trouble: Trouble) -> (Run, Run) {
    let d0 = fresh_dir(&args.dir, "n2-d0");
    let fuse = (trouble == Trouble::HungFsync).then(support::fuse::FuseDir::new);
    let plain = fresh_dir(&args.dir, "n2-d1");
    let d1 = fuse.as_ref().map_or(plain.as_path(), |f| f.path());
    let mut node = Daemon::with_config(&node_config(&[("d0", &d0), ("d1", d1)], &args.backend), &[]);
    create(&node, 1, "d1");
    for id in 2..=8 {
        create(&node, id, "d0");
    }
    match trouble {
        Trouble::None => {}
        Trouble::Faulted => {
            let url = node.url("/v1/partitions/1/blobs/x");
            for _ in 0..100 {
                assert_eq!(support::call(ureq::put(&url), Some(&[7u8; 4096])).0, 201);
            }
            assert_eq!(node.terminate().code(), Some(0));
            let wal = d1.join("partitions/1/wal");
            let segment = std::fs::read_dir(&wal).unwrap().flatten().map(|e| e.path()).min().unwrap();
            let mut bytes = std::fs::read(&segment).unwrap();
            bytes[64 + 48 + 100] ^= 1;
            std::fs::write(&segment, bytes).unwrap();
            node.restart();
            assert_eq!(node.state_of(1), "faulted");
        }
        Trouble::HungFsync => {
            let rules = &fuse.as_ref().unwrap().rules;
            rules.add_on(
                support::fuse::Op::Sync,
                "partitions/1/",
                support::fuse::Rules::everywhere(),
                support::fuse::Action::Hang,
            );
        }
    }
    // Partition 1 has a load of its own during each measurement: as fast as
    // answered next to the closed loop; a fixed 1,000 PUTs/s next to the
    // open loop, so that a healthy partition 1 adds the same modest disk
    // load in every case instead of all it can take.
    let noise = http_load(&node, "1", 8, 1.0, args.seconds);
    let closed = result_of(http_load(&node, "2-8", CONNECTIONS, 1.0, args.seconds));
    let _ = noise.wait_with_output();
    let noise = http_load_rate(&node, "1", 8, 1000.0, args.seconds);
    let open = result_of(http_load_rate(&node, "2-8", CONNECTIONS, args.rate, args.seconds));
    let noise = noise.wait_with_output().unwrap();
    let noise: Value = serde_json::from_slice(&noise.stdout).unwrap_or_default();
    eprintln!("  partition 1 ({trouble:?}): {} puts/s, errors {}", noise["put"]["ops_per_sec"], noise["put"]["errors"]);
    if let Some(fuse) = &fuse {
        fuse.rules.clear();
    }
    drop(node);
    (Run::from_bench(&closed, "put"), Run::from_bench(&open, "put"))
}

fn n2(args: &Args, out: &mut Vec<Value>) {
    let mut troubles = vec![Trouble::None, Trouble::Faulted];
    if support::disks::unavailable(&["fusermount3"]).is_none() {
        troubles.push(Trouble::HungFsync);
    }
    let mut closed: Vec<Vec<Run>> = vec![Vec::new(); troubles.len()];
    let mut open: Vec<Vec<Run>> = vec![Vec::new(); troubles.len()];
    for round in 0..args.rounds {
        for (i, trouble) in troubles.iter().enumerate() {
            eprintln!("N2 {trouble:?} round {}/{}", round + 1, args.rounds);
            let (c, o) = n2_run(args, *trouble);
            closed[i].push(c);
            open[i].push(o);
        }
    }
    for (mode, runs) in [("closed loop (as fast as answered)", &closed), ("open loop", &open)] {
        let medians: Vec<Run> = runs.iter().map(|r| medians(r)).collect();
        let rate = if mode == "open loop" { format!(" at {:.0} PUTs/s", args.rate) } else { String::new() };
        println!(
            "\n### N2 {mode}{rate}: PUT 4 KiB, 64 connections over partitions 2-8, partition 1 under 8 more, backend {}\n\n{HEADER}",
            args.backend
        );
        for (trouble, run) in troubles.iter().zip(&medians) {
            let name = match trouble {
                Trouble::None => "partition 1 healthy (baseline)",
                Trouble::Faulted => "partition 1 faulted",
                Trouble::HungFsync => "partition 1's fsync hangs",
            };
            println!("{}", row(name, run, (*trouble != Trouble::None).then_some(&medians[0])));
            out.push(json!({"id": "N2", "mode": mode, "trouble": format!("{trouble:?}"), "backend": args.backend, "run": to_json(run)}));
        }
    }
}

/// Writes `blobs` blobs of 64 bytes (16-byte keys) over 8 partitions
/// straight through the partition layer, then starts the real binary on
/// that data and reads its resident memory once it is ready.
fn rss(args: &Args, out: &mut Vec<Value>) {
    let disk = fresh_dir(&args.dir, "rss");
    let started = Instant::now();
    fill(&disk, args.blobs * 64, 64);
    eprintln!("RSS: wrote {} blobs in {:.0?}", args.blobs, started.elapsed());
    let started = Instant::now();
    let node = Daemon::start(&disk, &[], &[]);
    let load = started.elapsed();
    let pid = node.pid().unwrap();
    let (rss, hwm) = (proc_status(pid, "VmRSS:") * 1024, proc_status(pid, "VmHWM:") * 1024);
    let blobs =
        node.json("/v1/partitions").as_array().unwrap().iter().map(|p| p["blobs"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(blobs, args.blobs, "every blob is in the index");
    println!("\n### Memory: a node holding {blobs} blobs of 64 bytes (16-byte keys, 8 partitions)\n");
    println!("| blobs | start to ready | RSS | peak RSS | RSS per blob |\n|---|---|---|---|---|");
    println!(
        "| {blobs} | {:.1} s | {:.0} MiB | {:.0} MiB | {:.0} B |",
        load.as_secs_f64(),
        rss as f64 / (1 << 20) as f64,
        hwm as f64 / (1 << 20) as f64,
        rss as f64 / blobs as f64
    );
    out.push(json!({"id": "RSS", "blobs": blobs, "ready_seconds": load.as_secs_f64(), "rss_bytes": rss, "peak_rss_bytes": hwm}));
}

/// A number of `/proc/PID/status` (`Threads:`, `VmRSS:` in KiB, ...).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// A process's thread count and resident memory.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    (proc_status(pid, "Threads:"), proc_status(pid, "VmRSS:") * 1024)
}

/// Bytes allocated on disk under `dir` (blocks, not lengths).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => meta.blocks() * 512 + allocated_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// P1: what idle partitions cost. A node on one disk with `--partitions`
/// (default 1,000 and 10,000) empty partitions: threads of the whole
/// process, disk and RSS per partition (against the same node with none),
/// the create rate over HTTP, and the time from start to ready.
fn p1(args: &Args, out: &mut Vec<Value>) {
    println!("\n### P1: idle partitions on one disk\n");
    println!("| partitions | threads | disk per partition | RSS per partition | creates/s | start to ready |");
    println!("|---|---|---|---|---|---|");
    for &count in &args.partitions {
        let disk = fresh_dir(&args.dir, &format!("p1-{count}"));
        let mut node = Daemon::with_config(&node_config(&[("d0", &disk)], &args.backend), &[]);
        let (_, rss_before) = threads_and_rss(node.pid().unwrap());
        let disk_before = allocated_bytes(&disk);
        let started = Instant::now();
        for id in 1..=count {
            create(&node, id, "d0");
        }
        let creates = count as f64 / started.elapsed().as_secs_f64();
        // Let pre-writes and idle I/O threads settle.
        std::thread::sleep(Duration::from_secs(3));
        let (threads, rss) = threads_and_rss(node.pid().unwrap());
        let disk_per = (allocated_bytes(&disk) - disk_before) as f64 / count as f64;
        let rss_per = rss.saturating_sub(rss_before) as f64 / count as f64;
        let started = Instant::now();
        node.restart();
        let ready = started.elapsed().as_secs_f64();
        let (threads_after_start, _) = threads_and_rss(node.pid().unwrap());
        println!(
            "| {count} | {threads} ({threads_after_start} after a restart) | {:.0} KiB | {:.0} KiB | {creates:.0} | {ready:.1} s |",
            disk_per / 1024.0,
            rss_per / 1024.0
        );
        out.push(
            json!({"id": "P1", "partitions": count, "threads": threads, "threads_after_restart": threads_after_start,
            "disk_bytes_per_partition": disk_per, "rss_bytes_per_partition": rss_per, "creates_per_second": creates,
            "ready_seconds": ready}),
        );
    }
}

/// Throughput against latency of the node: 4 KiB PUTs over 8 partitions
/// with more and more connections, one node for the whole sweep.
fn sweep(args: &Args, out: &mut Vec<Value>) {
    let disk = fresh_dir(&args.dir, "sweep");
    let node = Daemon::with_config(&node_config(&[("d0", &disk)], &args.backend), &[]);
    for id in 1..=8 {
        create(&node, id, "d0");
    }
    println!("\n### SWEEP: node PUT 4 KiB over 8 partitions, backend {}\n\n{HEADER}", args.backend);
    for connections in [1, 4, 16, 64, 256] {
        let runs: Vec<Run> = (0..args.rounds)
            .map(|_| Run::from_bench(&result_of(http_load(&node, "1-8", connections, 1.0, args.seconds)), "put"))
            .collect();
        let run = medians(&runs);
        println!("{}", row(&format!("{connections} connections"), &run, None));
        out.push(json!({"id": "SWEEP", "system": "datanode (HTTP)", "concurrency": connections, "ops_per_sec": run.ops, "p50_ms": run.p50, "p99_ms": run.p99}));
    }
}

/// W1-W4 at node level: the WAL workloads as PUTs over HTTP to one node
/// with 64 partitions (8 MiB segments); W5 as the time from start to ready
/// of a node holding 1 GiB.
fn wnode(args: &Args, out: &mut Vec<Value>) {
    let disk = fresh_dir(&args.dir, "wnode");
    let config =
        node_config(&[("d0", &disk)], &args.backend).replacen("[wal]\n", "[wal]\nsegment_size = \"8MiB\"\n", 1);
    let node = Daemon::with_config(&config, &[]);
    for id in 1..=64 {
        create(&node, id, "d0");
    }
    let cases: [(&str, &str, usize, usize); 8] = [
        ("W1: 1 connection, 1 partition, 4 KiB", "1", 1, 4096),
        ("W2: 16 connections, 1 partition, 4 KiB", "1", 16, 4096),
        ("W2: 64 connections, 1 partition, 4 KiB", "1", 64, 4096),
        ("W3: 1 connection, 1 partition, 64 KiB", "1", 1, 64 << 10),
        ("W3: 1 connection, 1 partition, 1 MiB", "1", 1, 1 << 20),
        ("W4: 4 partitions, 4 connections, 4 KiB", "1-4", 4, 4096),
        ("W4: 16 partitions, 16 connections, 4 KiB", "1-16", 16, 4096),
        ("W4: 64 partitions, 64 connections, 4 KiB", "1-64", 64, 4096),
    ];
    println!("\n### W1-W4 at node level: HTTP PUT, backend {}\n", args.backend);
    println!("| workload | ops/s | MiB/s | p50 ms | p99 ms | p99.9 ms | errors |\n|---|---|---|---|---|---|---|");
    for (name, partitions, connections, size) in cases {
        let runs: Vec<Run> = (0..args.rounds)
            .map(|_| {
                let result = result_of(spawn(bench_command(&node, partitions, connections, 1.0, size, args.seconds)));
                Run::from_bench(&result, "put")
            })
            .collect();
        let run = medians(&runs);
        let mib = run.ops * size as f64 / (1 << 20) as f64;
        println!(
            "| {name} | {:.0} | {mib:.1} | {:.2} | {:.2} | {:.2} | {} |",
            run.ops, run.p50, run.p99, run.p999, run.errors
        );
        out.push(json!({"id": "WNODE", "workload": name, "run": to_json(&run), "mib_per_sec": mib}));
    }
    drop(node);

    // W5: a node holding 1 GiB of 4 KiB blobs, from start to ready.
    let disk = fresh_dir(&args.dir, "w5node");
    let blobs = fill(&disk, 1 << 30, 4096);
    support::disks::drop_page_cache();
    let started = Instant::now();
    let node = Daemon::start(&disk, &[], &[]);
    let ready = started.elapsed().as_secs_f64();
    drop(node);
    println!(
        "\n### W5 at node level: start to ready with {blobs} blobs of 4 KiB (1 GiB) in 8 partitions, cold cache\n"
    );
    println!("| start to ready | MiB/s replayed |\n|---|---|\n| {ready:.2} s | {:.0} |", 1024.0 / ready);
    out.push(json!({"id": "W5NODE", "ready_seconds": ready, "blobs": blobs}));
}

/// Writes `bytes` of `size`-byte blobs over 8 partitions in `disk`,
/// straight through the partition layer; returns how many.
fn fill(disk: &Path, bytes: u64, size: usize) -> u64 {
    let blobs = bytes / size as u64;
    let storage = datanode_wal::open_backend(IoBackend::Std).unwrap();
    let wal = WalOptions { durability: datanode_wal::Durability::None, ..WalOptions::new(0) };
    let registry = Registry::open(
        storage,
        vec![DiskDir { name: "d0".into(), path: disk.to_path_buf() }],
        PartitionDefaults { wal, ..PartitionDefaults::default() },
    );
    let partitions: Vec<_> = (1..=8).map(|id| registry.create(id, "d0").unwrap()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let lanes = 64u64;
    runtime.block_on(async {
        let tasks: Vec<_> = (0..lanes)
            .map(|lane| {
                let partitions = partitions.clone();
                tokio::spawn(async move {
                    let value = vec![b'v'; size];
                    for n in (lane..blobs).step_by(lanes as usize) {
                        let key = format!("blob-{n:011}");
                        partitions[(n % 8) as usize].put(key.as_bytes(), &value).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    registry.close();
    blobs
}

/// The sum of the samples in Prometheus `text` whose line starts with
/// `name{` and contains every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One C1 sample of the node under load.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    seconds: f64,
    /// Blocks allocated under the data directory.
    disk: u64,
    /// `live_bytes` of the partition.
    live: u64,
    /// `wal.bytes` of the partition.
    wal: u64,
    /// `datanode_partition_garbage_bytes`.
    garbage: u64,
    /// `datanode_compactions_total{result="ok"}`.
    compactions: u64,
    /// `datanode_compaction_bytes_total`.
    copied: u64,
    /// `datanode_wal_appends_total` of the partition.
    appends: u64,
}

impl Sample {
    fn ratio(&self) -> f64 {
        self.disk as f64 / self.live.max(1) as f64
    }

    fn to_json(self) -> Value {
        json!({"t": self.seconds, "disk_bytes": self.disk, "live_bytes": self.live, "wal_bytes": self.wal,
            "garbage_bytes": self.garbage, "compactions_ok": self.compactions, "compaction_bytes": self.copied,
            "appends": self.appends})
    }
}

/// What one C1 run measured.
struct C1Run {
    run: Run,
    seconds: f64,
    samples: Vec<Sample>,
}

impl C1Run {
    fn max_ratio(&self) -> f64 {
        self.samples.iter().map(Sample::ratio).fold(0.0, f64::max)
    }

    fn final_ratio(&self) -> f64 {
        self.samples.last().map_or(0.0, Sample::ratio)
    }

    fn last(&self) -> Sample {
        self.samples.last().copied().unwrap_or_default()
    }
}

const C1_PARTITION: u64 = 1;

/// C1's node: one disk, partition 1, compaction by policy on (default or
/// `--compaction` settings) or off.
fn c1_node(args: &Args, disk: &Path, compaction: bool) -> Daemon {
    let mut config = node_config(&[("d0", disk)], &args.backend);
    if let Some(size) = &args.segment_size {
        config = config.replacen("[wal]\n", &format!("[wal]\nsegment_size = \"{size}\"\n"), 1);
    }
    if compaction {
        if !args.compaction.is_empty() {
            config.push_str(&format!("\n[compaction]\n{}\n", args.compaction.join("\n")));
        }
    } else {
        // There is no switch: a partition never holds 1 PiB of garbage.
        config.push_str("\n[compaction]\nmin_garbage = \"1024TiB\"\ncheck_interval = \"24h\"\n");
    }
    let node = Daemon::with_config(&config, &[]);
    create(&node, C1_PARTITION, "d0");
    node
}

fn c1_bench(node: &Daemon, args: &Args, put_ratio: f64, seconds: f64, warmup: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_datanode"));
    command
        .args(["bench", "--url", &node.url(""), "--partitions", &C1_PARTITION.to_string(), "--json", "--quiet"])
        .args(["--connections", &args.connections.to_string(), "--put-ratio", &put_ratio.to_string()])
        .args(["--value-size", &VALUE.to_string(), "--keys", &args.keys.to_string()])
        .args(["--duration", &format!("{}ms", (seconds * 1000.0) as u64), "--warmup", warmup])
        .stdout(std::process::Stdio::piped());
    command
}

fn c1_sample(node: &Daemon, disk: &Path, started: Instant) -> Sample {
    let status = node.json(&format!("/v1/partitions/{C1_PARTITION}"));
    let metrics = node.metrics();
    let partition = format!("partition=\"{C1_PARTITION}\"");
    Sample {
        seconds: started.elapsed().as_secs_f64(),
        disk: allocated_bytes(disk),
        live: status["live_bytes"].as_u64().unwrap_or(0),
        wal: status["wal"]["bytes"].as_u64().unwrap_or(0),
        garbage: metric_sum(&metrics, "datanode_partition_garbage_bytes", &[&partition]) as u64,
        compactions: metric_sum(&metrics, "datanode_compactions_total", &[&partition, "result=\"ok\""]) as u64,
        copied: metric_sum(&metrics, "datanode_compaction_bytes_total", &[]) as u64,
        appends: metric_sum(&metrics, "datanode_wal_appends_total", &[&partition]) as u64,
    }
}

/// Free bytes of the file system holding `dir` (`df`).
fn free_bytes(dir: &Path) -> u64 {
    let output = Command::new("df").args(["--output=avail", "-B1"]).arg(dir).output().expect("df");
    String::from_utf8_lossy(&output.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0)
}

/// One C1 run: a fresh node, the keys written once, then overwritten for
/// `seconds` while the node is sampled every second.
fn c1_run(args: &Args, compaction: bool, seconds: f64) -> C1Run {
    let name = if compaction { "c1-on" } else { "c1-off" };
    let disk = fresh_dir(&args.dir, name);
    let node = c1_node(args, &disk, compaction);
    // GETs make `datanode bench` write every key once first.
    result_of(spawn(c1_bench(&node, args, 0.0, 0.1, "0s")));
    let live = node.json(&format!("/v1/partitions/{C1_PARTITION}"))["live_bytes"].as_u64().unwrap();
    assert_eq!(live, args.keys * VALUE as u64, "every key written once");
    let floor = free_bytes(&disk) / 2;
    let started = Instant::now();
    let mut child = spawn(c1_bench(&node, args, 1.0, seconds, "1s"));
    let mut samples = Vec::new();
    let mut next = started;
    while child.try_wait().unwrap().is_none() {
        let sample = c1_sample(&node, &disk, started);
        if samples.len() % 10 == 0 {
            eprintln!(
                "  C1 {name} t={:.0}s disk {:.0} MiB live {:.0} MiB ({:.2}x) wal {:.0} MiB garbage {:.0} MiB compactions {} copied {:.0} MiB",
                sample.seconds,
                sample.disk as f64 / MIB,
                sample.live as f64 / MIB,
                sample.ratio(),
                sample.wal as f64 / MIB,
                sample.garbage as f64 / MIB,
                sample.compactions,
                sample.copied as f64 / MIB
            );
        }
        samples.push(sample);
        if free_bytes(&disk) < floor {
            let _ = child.kill();
            panic!("C1 {name}: stopped, the disk's free space fell by half");
        }
        next += Duration::from_secs(1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let result = result_of(child);
    drop(node);
    let _ = std::fs::remove_dir_all(&disk);
    C1Run { run: Run::from_bench(&result, "put"), seconds, samples }
}

const MIB: f64 = (1 << 20) as f64;

/// C1: overwrite the same keys with and without compaction by policy.
fn c1(args: &Args, out: &mut Vec<Value>) {
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        eprintln!("C1 compaction on, round {}/{}", round + 1, args.rounds);
        let run = c1_run(args, true, args.seconds);
        // Without compaction every PUT stays on disk: write at most a
        // quarter of the free space (measured on the run with compaction).
        let free = free_bytes(&args.dir);
        let rate = run.run.ops * VALUE as f64 * 1.1;
        let seconds = args.seconds.min(free as f64 / 4.0 / rate.max(1.0)).max(5.0);
        on.push(run);
        eprintln!("C1 compaction off, round {}/{} ({seconds:.0} s)", round + 1, args.rounds);
        off.push(c1_run(args, false, seconds));
    }
    let mine = |runs: &[C1Run]| medians(&runs.iter().map(|r| r.run).collect::<Vec<_>>());
    let (on_run, off_run) = (mine(&on), mine(&off));
    let med = |runs: &[C1Run], f: &dyn Fn(&C1Run) -> f64| median(runs.iter().map(f).collect());
    let settings =
        if args.compaction.is_empty() { "default [compaction]".to_string() } else { args.compaction.join(", ") };
    println!(
        "\n### C1: {} keys of 4 KiB in one partition overwritten by {} connections, {settings}{}, backend {}\n",
        args.keys,
        args.connections,
        args.segment_size.as_ref().map_or(String::new(), |s| format!(", segment_size {s}")),
        args.backend
    );
    println!(
        "| compaction | seconds | PUT ops/s | MiB/s | p50 ms | p99 ms | p99.9 ms | errors | disk/live max | disk/live final | compactions | copied MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, runs, run) in [("by policy", &on, &on_run), ("off", &off, &off_run)] {
        println!(
            "| {name} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {:.2}x | {:.2}x | {:.0} | {:.0} |",
            med(runs, &|r| r.seconds),
            run.ops,
            run.ops * VALUE as f64 / MIB,
            run.p50,
            run.p99,
            run.p999,
            run.errors,
            med(runs, &C1Run::max_ratio),
            med(runs, &C1Run::final_ratio),
            med(runs, &|r| r.last().compactions as f64),
            med(runs, &|r| r.last().copied as f64 / MIB),
        );
    }
    println!(
        "\np99 with compaction / without: {:.2}x; throughput with / without: {:.2}x",
        on_run.p99 / off_run.p99.max(1e-9),
        on_run.ops / off_run.ops.max(1e-9)
    );
    if let Some(first) = on.first() {
        println!("\nRound 1 with compaction, every 10th sample (PUTs/s from the WAL's append counter):\n");
        println!(
            "| t s | disk MiB | live MiB | disk/live | wal MiB | garbage MiB | compactions | copied MiB | PUTs/s |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for pair in first.samples.windows(2).step_by(10) {
            let (a, b) = (pair[0], pair[1]);
            let rate = (b.appends - a.appends) as f64 / (b.seconds - a.seconds).max(1e-3);
            println!(
                "| {:.0} | {:.0} | {:.1} | {:.2}x | {:.0} | {:.0} | {} | {:.0} | {rate:.0} |",
                b.seconds,
                b.disk as f64 / MIB,
                b.live as f64 / MIB,
                b.ratio(),
                b.wal as f64 / MIB,
                b.garbage as f64 / MIB,
                b.compactions,
                b.copied as f64 / MIB
            );
        }
    }
    for (compaction, runs) in [(true, &on), (false, &off)] {
        for run in runs.iter() {
            out.push(json!({"id": "C1", "compaction": compaction, "settings": settings, "seconds": run.seconds,
                "keys": args.keys, "connections": args.connections, "run": to_json(&run.run),
                "max_ratio": run.max_ratio(), "final_ratio": run.final_ratio(),
                "samples": run.samples.iter().map(|s| s.to_json()).collect::<Vec<_>>()}));
        }
    }
}

// ---------------------------------------------------------------------
// R1 and R2: replicated partitions on a 3-node cluster on this machine.

/// The partition R1 and R2 load.
const R_PARTITION: u64 = 1;

/// A cluster of real nodes on loopback, each with its own data directory
/// under `--dir`, all three the seeds of the metadata group, the Raft
/// timings the defaults unless `timings` says otherwise.
struct BenchCluster {
    nodes: Vec<Option<Daemon>>,
    ports: Vec<u16>,
}

impl BenchCluster {
    fn start(args: &Args, name: &str, count: usize, timings: &str) -> BenchCluster {
        let ports: Vec<u16> = (0..count).map(|_| support::free_port()).collect();
        let peers: Vec<u16> = (0..count).map(|_| support::free_port()).collect();
        let seeds: Vec<String> = (0..count).map(|i| format!("\"dn-{}@127.0.0.1:{}\"", i + 1, peers[i])).collect();
        let configs: Vec<String> = (0..count)
            .map(|i| {
                let disk = fresh_dir(&args.dir, &format!("{name}-{}", i + 1));
                format!(
                    "[node]\nid = \"dn-{}\"\nbootstrap_partitions = 0\n\n[wal]\nio_backend = \"{}\"\n\n[limits]\nrequest_timeout = \"2s\"\n\n\
                     [[disk]]\nname = \"d0\"\npath = \"{}\"\n\n[cluster]\npeer_addr = \"127.0.0.1:{}\"\n\
                     advertise_url = \"http://127.0.0.1:{}\"\nseeds = [{}]\n{timings}",
                    i + 1,
                    args.backend,
                    disk.display(),
                    peers[i],
                    ports[i],
                    seeds.join(", ")
                )
            })
            .collect();
        // Started together: the seeds wait for each other.
        let handles: Vec<_> = configs
            .into_iter()
            .zip(ports.clone())
            .map(|(config, port)| std::thread::spawn(move || Daemon::with_config_on(port, &config, &[])))
            .collect();
        let nodes = handles.into_iter().map(|h| Some(h.join().unwrap())).collect();
        let cluster = BenchCluster { nodes, ports };
        let client = support::cluster::Client::new();
        support::wait_for("the cluster map lists every node up", Duration::from_secs(60), || {
            let (status, body) = client.send("GET", &cluster.url(0, "/v1/cluster"), None);
            let map: Value = serde_json::from_slice(&body).unwrap_or_default();
            status == 200
                && map["nodes"]
                    .as_array()
                    .is_some_and(|nodes| nodes.len() == count && nodes.iter().all(|n| n["state"] == "up"))
        });
        cluster
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[i])
    }

    /// Every node's URL, comma separated (`datanode bench --url`).
    fn urls(&self) -> String {
        (0..self.ports.len()).map(|i| self.url(i, "")).collect::<Vec<_>>().join(",")
    }

    /// Creates a partition with `replicas` replicas and waits for its leader.
    fn create(&self, id: u64, replicas: u64) -> usize {
        let body = json!({"id": id, "replicas": replicas}).to_string();
        let (status, reply) =
            support::cluster::Client::new().send("POST", &self.url(0, "/v1/cluster/partitions"), Some(body.as_bytes()));
        assert_eq!(status, 201, "create {id}: {}", String::from_utf8_lossy(&reply));
        self.wait_leader(id, Duration::from_secs(60)).expect("a leader")
    }

    /// The running node whose replica of `id` is the Raft leader.
    fn leader(&self, id: u64) -> Option<usize> {
        (0..self.nodes.len()).find(|i| {
            self.running(*i).is_some_and(|node| {
                node.json(&format!("/v1/partitions/{id}"))["raft"]["role"].as_str() == Some("leader")
            })
        })
    }

    fn wait_leader(&self, id: u64, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(leader) = self.leader(id) {
                return Some(leader);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn raft(&self, i: usize, id: u64) -> Value {
        self.running(i).map_or(Value::Null, |node| node.json(&format!("/v1/partitions/{id}"))["raft"].clone())
    }

    /// Node `i` while its process runs (not killed).
    fn running(&self, i: usize) -> Option<&Daemon> {
        self.nodes[i].as_ref().filter(|node| node.pid().is_some())
    }
}

/// A 3-member etcd cluster on loopback (the `etcd` binary), data under
/// `--dir`; killed when dropped.
struct Etcd {
    members: Vec<std::process::Child>,
    client_urls: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

/// The etcd binary's version line, or `None` when there is none.
fn etcd_version() -> Option<String> {
    let output = Command::new("etcd").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    output.status.success().then(|| text.lines().next().unwrap_or("etcd").to_string())
}

impl Etcd {
    fn start(args: &Args, count: usize) -> Etcd {
        let clients: Vec<u16> = (0..count).map(|_| support::free_port()).collect();
        let peers: Vec<u16> = (0..count).map(|_| support::free_port()).collect();
        let cluster: Vec<String> = (0..count).map(|i| format!("e{}=http://127.0.0.1:{}", i + 1, peers[i])).collect();
        let client_urls: Vec<String> = clients.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        let members = (0..count)
            .map(|i| {
                let dir = fresh_dir(&args.dir, &format!("etcd-{}", i + 1));
                let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
                Command::new("etcd")
                    .args(["--name", &format!("e{}", i + 1), "--data-dir"])
                    .arg(dir.join("data"))
                    .args(["--listen-client-urls", &client_urls[i], "--advertise-client-urls", &client_urls[i]])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", peers[i])])
                    .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", peers[i])])
                    .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", "bench", "--logger", "zap", "--log-level", "warn"])
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start etcd")
            })
            .collect();
        let etcd = Etcd { members, client_urls };
        support::wait_for("etcd elects a leader", Duration::from_secs(60), || etcd.leader().is_some());
        etcd
    }

    /// The client URL of the member that is the leader.
    fn leader(&self) -> Option<String> {
        self.client_urls.iter().find_map(|url| {
            // Not up yet: no answer, no leader.
            let response = ureq::post(&format!("{url}/v3/maintenance/status")).send_bytes(b"{}").ok()?;
            let status_body: Value = serde_json::from_reader(response.into_reader()).ok()?;
            let leader = status_body["leader"].as_str()?;
            (leader != "0" && status_body["header"]["member_id"].as_str() == Some(leader)).then(|| url.clone())
        })
    }
}

/// `datanode bench` of 4 KiB PUTs with 64 connections on partition
/// `R_PARTITION` of `urls` (a node, nodes, or etcd members).
fn r1_load(args: &Args, urls: &str, target: &str) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_datanode"));
    command
        .args(["bench", "--url", urls, "--target", target, "--partitions", &R_PARTITION.to_string()])
        .args(["--json", "--quiet", "--connections", &CONNECTIONS.to_string(), "--put-ratio", "1"])
        .args(["--value-size", &VALUE.to_string(), "--keys", &KEYS.to_string()])
        .args(["--duration", &format!("{}ms", (args.seconds * 1000.0) as u64), "--warmup", "1s"])
        .stdout(std::process::Stdio::piped());
    result_of(spawn(command))
}

/// R1: replicated PUTs on a 3-node cluster, beside the same load on one
/// single node (an unreplicated partition) and on a 3-member etcd.
fn r1(args: &Args, out: &mut Vec<Value>) {
    let etcd = etcd_version();
    if etcd.is_none() {
        eprintln!("R1: no etcd binary on PATH (apt-get install -y etcd-server): etcd skipped");
    }
    let (mut single, mut replicated, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    let mut redirects = Vec::new();
    for round in 0..args.rounds {
        eprintln!("R1 round {}/{}: single node", round + 1, args.rounds);
        {
            let disk = fresh_dir(&args.dir, "r1-single");
            let node = Daemon::with_config(&node_config(&[("d0", &disk)], &args.backend), &[]);
            create(&node, R_PARTITION, "d0");
            single.push(Run::from_bench(&r1_load(args, &node.url(""), "datanode"), "put"));
        }
        eprintln!("R1 round {}/{}: 3-node cluster", round + 1, args.rounds);
        {
            let cluster = BenchCluster::start(args, "r1-node", 3, "");
            let leader = cluster.create(R_PARTITION, 3);
            let result = r1_load(args, &cluster.urls(), "datanode");
            eprintln!(
                "  leader dn-{}, redirects followed {} before measuring, {} while measuring",
                leader + 1,
                result["redirects_before"],
                result["redirects"]
            );
            redirects.push(result["redirects_before"].as_u64().unwrap_or(0));
            replicated.push(Run::from_bench(&result, "put"));
        }
        if etcd.is_some() {
            eprintln!("R1 round {}/{}: 3-member etcd", round + 1, args.rounds);
            let etcd = Etcd::start(args, 3);
            let leader = etcd.leader().expect("an etcd leader");
            peer.push(Run::from_bench(&r1_load(args, &leader, "etcd"), "put"));
        }
    }
    let (single, replicated) = (medians(&single), medians(&replicated));
    println!(
        "\n### R1: PUT 4 KiB, 64 connections, one partition, 3 replicas on 3 nodes on this machine, backend {}\n\n{HEADER}",
        args.backend
    );
    println!("{}", row("single node, unreplicated partition", &single, None));
    println!("{}", row("3-node cluster, 3 replicas (all nodes' URLs)", &replicated, Some(&single)));
    let mut record = json!({"id": "R1", "backend": args.backend, "single": to_json(&single),
        "replicated": to_json(&replicated), "redirects_before_measuring": redirects});
    if let Some(version) = &etcd {
        let peer = medians(&peer);
        println!("{}", row(&format!("{version}, 3 members (leader's URL)"), &peer, Some(&single)));
        println!(
            "\nreplicated / etcd: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
            replicated.ops / peer.ops.max(1e-9),
            replicated.p50 / peer.p50.max(1e-9),
            replicated.p99 / peer.p99.max(1e-9)
        );
        record["etcd"] = to_json(&peer);
        record["etcd_version"] = json!(version);
    }
    out.push(record);
}

/// How many times R2 kills the leader.
const R2_KILLS: usize = 20;

/// R2: failover under a steady PUT load. 8 writers PUT 4 KiB through every
/// node in turn (following redirects); the leader's node is killed with
/// SIGKILL, and the time from the kill to the first acknowledged write sent
/// after it is measured; the node is restarted and catches up; 20 times.
fn r2(args: &Args, out: &mut Vec<Value>) {
    let mut cluster = BenchCluster::start(args, "r2-node", 3, "");
    cluster.create(R_PARTITION, 3);
    let stop = Arc::new(AtomicBool::new(false));
    // (sent, acknowledged) of every acknowledged write.
    let acked: Arc<std::sync::Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let (stop, acked, ports) = (Arc::clone(&stop), Arc::clone(&acked), cluster.ports.clone());
            std::thread::spawn(move || {
                let client = support::cluster::Client::new();
                let value = vec![b'v'; VALUE];
                let mut failures = std::collections::BTreeMap::<u16, u64>::new();
                let mut seq = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let port = ports[(seq + writer) % ports.len()];
                    let url =
                        format!("http://127.0.0.1:{port}/v1/partitions/{R_PARTITION}/blobs/w{writer}-{}", seq % 1000);
                    let sent = Instant::now();
                    let (status, _) = client.send("PUT", &url, Some(&value));
                    if status == 201 {
                        acked.lock().unwrap().push((sent, Instant::now()));
                    } else {
                        *failures.entry(status).or_default() += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    seq += 1;
                }
                failures
            })
        })
        .collect();
    let mut gaps = Vec::new();
    let mut killed_nodes = Vec::new();
    for kill in 0..R2_KILLS {
        // Steady: writes acknowledged for a while before each kill.
        std::thread::sleep(Duration::from_millis(500));
        let leader = cluster.wait_leader(R_PARTITION, Duration::from_secs(30)).expect("a leader before the kill");
        let before = acked.lock().unwrap().len();
        let killed_at = Instant::now();
        cluster.nodes[leader].as_mut().unwrap().kill();
        let first = loop {
            let first = acked.lock().unwrap().iter().filter(|(sent, _)| *sent >= killed_at).map(|(_, at)| *at).min();
            if let Some(first) = first {
                break Some(first);
            }
            if killed_at.elapsed() > Duration::from_secs(60) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let gap = first.map(|at| at.duration_since(killed_at).as_secs_f64());
        let new_leader = cluster.leader(R_PARTITION);
        eprintln!(
            "R2 kill {}/{R2_KILLS}: dn-{} killed ({} writes acknowledged before), first write acknowledged after {}, new leader {}",
            kill + 1,
            leader + 1,
            before,
            gap.map_or("none within 60 s".into(), |g| format!("{:.0} ms", g * 1000.0)),
            new_leader.map_or("?".into(), |l| format!("dn-{}", l + 1))
        );
        gaps.push(gap.unwrap_or(f64::INFINITY));
        killed_nodes.push(leader + 1);
        // Restart and wait until its replica has applied what the leader
        // had committed, so that every kill starts from three healthy
        // replicas.
        cluster.nodes[leader].as_mut().unwrap().restart();
        let commit = new_leader.and_then(|l| cluster.raft(l, R_PARTITION)["commit_index"].as_u64()).unwrap_or(0);
        let caught_up = Instant::now();
        while caught_up.elapsed() < Duration::from_secs(30)
            && cluster.raft(leader, R_PARTITION)["applied_index"].as_u64().is_none_or(|applied| applied < commit)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        acked.lock().unwrap().clear();
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = std::collections::BTreeMap::<u16, u64>::new();
    for writer in writers {
        for (status, n) in writer.join().unwrap() {
            *failures.entry(status).or_default() += n;
        }
    }
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let quantile = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
    let ms = |s: f64| s * 1000.0;
    println!(
        "\n### R2: kill -9 of the leader's node under PUT load (8 writers, 4 KiB, through every node), {R2_KILLS} times, election_timeout 1s (default)\n"
    );
    println!(
        "| kills | p50 ms | p99 ms | max ms | min ms | failed requests by status (0: no answer) |\n|---|---|---|---|---|---|"
    );
    println!(
        "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {failures:?} |",
        gaps.len(),
        ms(quantile(0.5)),
        ms(quantile(0.99)),
        ms(sorted[sorted.len() - 1]),
        ms(sorted[0])
    );
    println!(
        "\nkill to first acknowledged write, ms, in order: {:?}",
        gaps.iter().map(|g| ms(*g).round()).collect::<Vec<_>>()
    );
    out.push(json!({"id": "R2", "kills": gaps.len(), "seconds": gaps, "killed_nodes": killed_nodes,
        "failures": failures.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>()}));
}

/// Bytes of every file under `dir`, read once in order, and the seconds it took.
fn read_tree(dir: &Path) -> (u64, f64) {
    let started = Instant::now();
    let output = Command::new("sh")
        .arg("-c")
        .arg("find \"$0\" -type f -print0 | xargs -0 cat | wc -c")
        .arg(dir)
        .output()
        .expect("find | cat");
    let bytes = String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0);
    (bytes, started.elapsed().as_secs_f64())
}

/// The foreground load of R3 on partition `id` through every node.
fn r3_load(cluster: &BenchCluster, id: u64, seconds: f64) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_datanode"));
    command
        .args(["bench", "--url", &cluster.urls(), "--partitions", &id.to_string(), "--json", "--quiet"])
        .args(["--connections", "8", "--put-ratio", "0.5", "--value-size", &VALUE.to_string()])
        .args(["--keys", &KEYS.to_string(), "--duration", &format!("{}ms", (seconds * 1000.0) as u64)])
        .args(["--warmup", "1s"])
        .stdout(std::process::Stdio::piped());
    spawn(command)
}

/// R3: a replica rebuilt from its group's leader.
fn r3(args: &Args, out: &mut Vec<Value>) {
    let timings = "node_dead_after = \"2s\"\nrepair_after = \"1s\"\n";
    let cluster = BenchCluster::start(args, "r3-node", 4, timings);
    let (big, foreground) = (R_PARTITION, R_PARTITION + 1);
    cluster.create(big, 3);
    cluster.create(foreground, 3);
    let client = support::cluster::Client::new();
    let map = |client: &support::cluster::Client| -> Value {
        let (_, body) = client.send("GET", &cluster.url(0, "/v1/cluster"), None);
        serde_json::from_slice(&body).unwrap_or_default()
    };
    let nodes_of = |map: &Value, id: u64| -> Vec<String> {
        map["partitions"].as_array().and_then(|all| all.iter().find(|p| p["id"] == id)).map_or(Vec::new(), |p| {
            p["replicas"].as_array().unwrap().iter().map(|r| r["node"].as_str().unwrap().to_string()).collect()
        })
    };
    let placed = map(&client);
    let (on_big, on_fore) = (nodes_of(&placed, big), nodes_of(&placed, foreground));
    let Some(victim) = on_big.iter().find(|n| !on_fore.contains(n)).cloned() else {
        eprintln!("R3: every node holding partition {big} also holds {foreground} ({on_big:?}, {on_fore:?}): skipped");
        return;
    };
    // Fill: 256 KiB blobs, 16 writers.
    const BLOB: usize = 256 * 1024;
    let blobs = args.repair_mib * 1024 * 1024 / BLOB as u64;
    let filled = Instant::now();
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let urls: Vec<String> = (0..4).map(|i| cluster.url(i, "")).collect();
            std::thread::spawn(move || {
                let client = support::cluster::Client::new();
                let value = vec![b'r'; BLOB];
                for n in (w..blobs).step_by(16) {
                    let url = format!("{}/v1/partitions/{big}/blobs/b{n}", urls[n as usize % urls.len()]);
                    loop {
                        let (status, _) = client.send("PUT", &url, Some(&value));
                        if status == 201 {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    eprintln!("R3: {} MiB written in {:.1} s", args.repair_mib, filled.elapsed().as_secs_f64());
    let leader = cluster.wait_leader(big, Duration::from_secs(30)).expect("a leader");
    let status = cluster.running(leader).unwrap().json(&format!("/v1/partitions/{big}"));
    let live = status["live_bytes"].as_u64().unwrap_or(0);
    let before = Run::from_bench(&result_of(r3_load(&cluster, foreground, args.seconds)), "put");
    let during_load = r3_load(&cluster, foreground, args.seconds);
    let started = Instant::now();
    let (code, reply) = client.send("POST", &cluster.url(0, &format!("/v1/cluster/nodes/{victim}/drain")), None);
    assert_eq!(code, 202, "drain: {}", String::from_utf8_lossy(&reply));
    support::wait_for("the drained replica is rebuilt elsewhere", Duration::from_secs(1800), || {
        let now = map(&client);
        let replicas = now["partitions"].as_array().and_then(|all| all.iter().find(|p| p["id"] == big)).cloned();
        replicas.is_some_and(|p| {
            let all = p["replicas"].as_array().cloned().unwrap_or_default();
            all.len() == 3 && all.iter().all(|r| r["node"] != victim.as_str() && r["replaces"].is_null())
        })
    });
    let repair_seconds = started.elapsed().as_secs_f64();
    let during = Run::from_bench(&result_of(during_load), "put");
    let replica_id = status["raft"]["replica_id"].as_u64().unwrap_or(0);
    let leader_dir = args.dir.join(format!("r3-node-{}", leader + 1)).join("replicas");
    let leader_dir = std::fs::read_dir(&leader_dir)
        .ok()
        .and_then(|entries| entries.flatten().map(|e| e.path()).find(|p| p.ends_with(format!("{big}-{replica_id}"))))
        .unwrap_or(leader_dir);
    let (read_bytes, read_seconds) = read_tree(&leader_dir);
    let mib = |bytes: u64, seconds: f64| bytes as f64 / 1048576.0 / seconds;
    println!(
        "\n### R3: a replica of {} MiB rebuilt from its leader (drain of its node), 4 nodes on this machine\n",
        live / 1048576
    );
    println!(
        "| rebuild s | rebuild MiB/s | sequential read MiB/s (leader's files) | ratio | foreground PUT p99 ms before / during | ratio |\n|---|---|---|---|---|---|"
    );
    println!(
        "| {repair_seconds:.1} | {:.0} | {:.0} | {:.2}x | {:.1} / {:.1} | {:.2}x |",
        mib(live, repair_seconds),
        mib(read_bytes, read_seconds),
        mib(live, repair_seconds) / mib(read_bytes, read_seconds),
        before.p99,
        during.p99,
        during.p99 / before.p99
    );
    out.push(json!({"id": "R3", "live_bytes": live, "repair_seconds": repair_seconds, "read_bytes": read_bytes,
        "read_seconds": read_seconds, "p99_before_ms": before.p99, "p99_during_ms": during.p99}));
}

/// User + system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Resident memory of process `pid`, bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// R4: idle CPU and memory of nodes holding many idle groups.
fn r4(args: &Args, out: &mut Vec<Value>) {
    println!(
        "\n### R4: idle groups x 3 replicas on 3 nodes, no load, CPU over {:.0} s after every group has a leader\n",
        args.seconds
    );
    println!(
        "| groups | CPU % of one core per node (median, max) | RSS MiB per node (median) | RSS KiB per replica |\n|---|---|---|---|"
    );
    for &groups in &args.groups {
        let cluster = BenchCluster::start(args, &format!("r4-{groups}"), 3, "");
        let client = support::cluster::Client::new();
        let started = Instant::now();
        for id in 1..=groups {
            let body = json!({"id": id, "replicas": 3}).to_string();
            let (status, reply) = client.send("POST", &cluster.url(0, "/v1/cluster/partitions"), Some(body.as_bytes()));
            assert_eq!(status, 201, "create {id}: {}", String::from_utf8_lossy(&reply));
        }
        support::wait_for("every group has a leader", Duration::from_secs(600), || {
            let (status, body) = client.send("GET", &cluster.url(0, "/v1/cluster"), None);
            let map: Value = serde_json::from_slice(&body).unwrap_or_default();
            status == 200
                && map["partitions"]
                    .as_array()
                    .is_some_and(|all| all.len() as u64 == groups && all.iter().all(|p| p["leader"].is_string()))
        });
        eprintln!("R4: {groups} groups created and led after {:.1} s", started.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_secs(5));
        let pids: Vec<u32> = (0..3).map(|i| cluster.running(i).and_then(Daemon::pid).expect("running")).collect();
        let before: Vec<f64> = pids.iter().map(|pid| cpu_seconds(*pid)).collect();
        let at = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(args.seconds));
        let elapsed = at.elapsed().as_secs_f64();
        let cpu: Vec<f64> =
            pids.iter().zip(&before).map(|(pid, before)| (cpu_seconds(*pid) - before) / elapsed * 100.0).collect();
        let rss: Vec<f64> = pids.iter().map(|pid| rss_bytes(*pid) as f64).collect();
        let max_cpu = cpu.iter().copied().fold(0.0, f64::max);
        let rss_median = median(rss.clone());
        println!(
            "| {groups} | {:.1}, {:.1} | {:.0} | {:.0} |",
            median(cpu.clone()),
            max_cpu,
            rss_median / 1048576.0,
            rss_median / groups as f64 / 1024.0
        );
        out.push(json!({"id": "R4", "groups": groups, "cpu_percent": cpu, "rss_bytes": rss, "seconds": elapsed}));
    }
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.dir).unwrap();
    let mut out = Vec::new();
    if wanted(&args, "N1") {
        n1(&args, &mut out);
    }
    if wanted(&args, "N2") {
        n2(&args, &mut out);
    }
    if wanted(&args, "SWEEP") {
        sweep(&args, &mut out);
    }
    if wanted(&args, "WNODE") {
        wnode(&args, &mut out);
    }
    if wanted(&args, "RSS") {
        rss(&args, &mut out);
    }
    if wanted(&args, "R3") {
        r3(&args, &mut out);
    }
    if wanted(&args, "R4") {
        r4(&args, &mut out);
    }
    if args.only.as_ref().is_some_and(|only| only.iter().any(|id| id == "P1")) {
        p1(&args, &mut out);
    }
    if args.only.as_ref().is_some_and(|only| only.iter().any(|id| id == "C1")) {
        c1(&args, &mut out);
    }
    if args.only.as_ref().is_some_and(|only| only.iter().any(|id| id == "R1")) {
        r1(&args, &mut out);
    }
    if args.only.as_ref().is_some_and(|only| only.iter().any(|id| id == "R2")) {
        r2(&args, &mut out);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    }
}
