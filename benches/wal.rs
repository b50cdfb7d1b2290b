//! WAL benchmarks W1-W5 (described in BENCHMARKS.md), side by side with raft-engine,
//! okaywal and fio on the same disk, in one run, alternating systems within
//! each round; prints medians over the rounds as Markdown tables.
//!
//! ```text
//! cargo bench --bench wal -- [--dir DIR] [--rounds N] [--seconds S] [--only W1,W3]
//! cargo bench --bench wal -- --only SWEEP --json target/wal-sweep.json
//! ```
//!
//! `SWEEP` runs 4 KiB sync appends into one log with 1, 4, 16 and 64
//! writers for the WAL and its peers: throughput against latency, the data
//! of `scripts/charts.py`.
//!
//! `--dir` must be on the disk under test (default `target/bench-data`).
//! `--io-threads N` sets the thread count of the shared engine (W4's
//! `one engine` row, default 16, as `wal.io_threads_per_disk`); `--systems
//! a,b` runs only the systems whose names contain one of the words (for
//! profiling one of them). Each row also shows what the disk under `--dir`
//! did (`/proc/diskstats`, from the system's open to its close): bytes
//! written and write and flush requests per record appended, and the
//! average number of requests in flight; other processes using the same
//! disk count too.
//! fio rows need `fio` on the PATH; W5 drops the page cache when run as root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datanode_wal::{IoBackend, Wal, WalOptions, open_backend};

struct Args {
    dir: PathBuf,
    rounds: usize,
    seconds: f64,
    only: Option<Vec<String>>,
    json: Option<PathBuf>,
    systems: Option<Vec<String>>,
}

/// Threads of the shared engine (`--io-threads`).
static IO_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(16);

fn parse_args() -> Args {
    let mut args = Args {
        dir: PathBuf::from("target/bench-data"),
        rounds: 3,
        seconds: 3.0,
        only: None,
        json: None,
        systems: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--dir" => args.dir = PathBuf::from(it.next().expect("--dir DIR")),
            "--rounds" => args.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--seconds" => args.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            "--only" => args.only = Some(it.next().expect("--only W1,W2").split(',').map(String::from).collect()),
            "--json" => args.json = Some(PathBuf::from(it.next().expect("--json FILE"))),
            "--io-threads" => {
                IO_THREADS.store(it.next().and_then(|v| v.parse().ok()).expect("--io-threads N"), Ordering::Relaxed)
            }
            "--systems" => {
                args.systems = Some(it.next().expect("--systems a,b").split(',').map(String::from).collect())
            }
            "--bench" => {}
            "--help" | "-h" => {
                println!(
                    "usage: cargo bench --bench wal -- [--dir DIR] [--rounds N] [--seconds S] [--only W1,W2,W3,W4,W5] [--io-threads N] [--systems a,b]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Bytes written, write requests, flush requests, average requests in
/// flight, over one run.
type DeviceDelta = (u64, u64, u64, f64);

/// One measured run.
#[derive(Clone, Default)]
struct Sample {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    /// Ack latency of every operation, in microseconds, sorted.
    latencies_us: Vec<u32>,
    records_per_sync: Option<f64>,
    /// What the disk did meanwhile (from open to close): bytes written,
    /// write requests, flush requests, average requests in flight.
    device: Option<DeviceDelta>,
}

impl Sample {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / (1 << 20) as f64
    }
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies_us.len() as f64 * p) as usize).min(self.latencies_us.len() - 1);
        self.latencies_us[index] as f64
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// An append target: `append(thread, data)` returns once durable.
type AppendFn = Arc<dyn Fn(usize, &[u8]) + Send + Sync>;

struct Opened {
    append: AppendFn,
    /// Records per sync, read after the run.
    records_per_sync: Box<dyn Fn() -> Option<f64>>,
    /// Keeps the system alive until the run is over.
    _keep: Box<dyn std::any::Any>,
}

#[derive(Clone, Copy, PartialEq)]
enum System {
    Datanode {
        backend: IoBackend,
        prewrite: bool,
    },
    /// The logs share one engine of 16 I/O threads, as a node's partitions
    /// on one disk do.
    DatanodeShared,
    /// The log writes into a recycled segment (a purged segment's file),
    /// as a log that purges does once its segments roll.
    DatanodeRecycled,
    RaftEngine {
        recycle: bool,
    },
    OkayWal,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Datanode { backend: IoBackend::Uring, .. } => "datanode-wal (io_uring)",
            System::Datanode { prewrite: false, .. } => "datanode-wal (std, fresh space)",
            System::Datanode { .. } => "datanode-wal (std)",
            System::DatanodeShared => "datanode-wal (std, one shared engine)",
            System::DatanodeRecycled => "datanode-wal (std, recycled space)",
            System::RaftEngine { recycle: true } => "raft-engine 0.4 (recycle+prefill)",
            System::RaftEngine { recycle: false } => "raft-engine 0.4",
            System::OkayWal => "okaywal 0.3",
        }
    }

    /// Opens one log of this system in `dir` (fresh), ready for `threads`
    /// appenders.
    fn open(self, dir: &Path, segment_size: u64) -> Opened {
        match self {
            System::Datanode { .. } | System::DatanodeShared | System::DatanodeRecycled => {
                let (backend, prewrite) = match self {
                    System::Datanode { backend, prewrite } => (backend, prewrite),
                    _ => (IoBackend::Std, true),
                };
                let engine = matches!(self, System::DatanodeShared).then(|| {
                    static SHARED: std::sync::OnceLock<datanode_wal::Engine> = std::sync::OnceLock::new();
                    SHARED
                        .get_or_init(|| datanode_wal::Engine::new("bench", IO_THREADS.load(Ordering::Relaxed)))
                        .clone()
                });
                let storage = open_backend(backend).expect("backend");
                let options = WalOptions { segment_size, prewrite_segments: prewrite, engine, ..WalOptions::new(1) };
                let wal = Arc::new(Wal::open(storage, dir, options).expect("open wal"));
                if matches!(self, System::DatanodeRecycled) {
                    into_recycled_segment(&wal);
                }
                // Take the first segment outside the measured time.
                wal.append_blocking(vec![Bytes::from_static(b"warm-up")]).expect("warm-up");
                let start = wal.stats();
                let stats_wal = Arc::clone(&wal);
                let append_wal = Arc::clone(&wal);
                Opened {
                    append: Arc::new(move |_, data| {
                        append_wal.append_blocking(vec![Bytes::copy_from_slice(data)]).expect("append");
                    }),
                    records_per_sync: Box::new(move || {
                        let now = stats_wal.stats();
                        let syncs = now.syncs - start.syncs;
                        (syncs > 0).then(|| (now.records - start.records) as f64 / syncs as f64)
                    }),
                    _keep: Box::new(wal),
                }
            }
            System::RaftEngine { recycle } => {
                let mut config = raft_engine::Config {
                    dir: dir.to_str().unwrap().to_string(),
                    target_file_size: raft_engine::ReadableSize(segment_size),
                    ..Default::default()
                };
                if recycle {
                    config.format_version = raft_engine::Version::V2;
                    config.enable_log_recycle = true;
                    config.prefill_for_recycle = true;
                }
                let engine = Arc::new(raft_engine::Engine::open(config).expect("raft-engine"));
                let writer = Arc::clone(&engine);
                Opened {
                    append: Arc::new(move |thread, data| {
                        let mut batch = raft_engine::LogBatch::default();
                        let key = format!("k{thread}").into_bytes();
                        batch.put(1, key, data.to_vec()).expect("put");
                        writer.write(&mut batch, true).expect("write");
                    }),
                    records_per_sync: Box::new(|| None),
                    _keep: Box::new(engine),
                }
            }
            System::OkayWal => {
                let wal = okaywal::WriteAheadLog::recover(dir, okaywal::LogVoid).expect("okaywal");
                let writer = wal.clone();
                Opened {
                    append: Arc::new(move |_, data| {
                        let mut entry = writer.begin_entry().expect("begin");
                        entry.write_chunk(data).expect("chunk");
                        entry.commit().expect("commit");
                    }),
                    records_per_sync: Box::new(|| None),
                    _keep: Box::new(wal),
                }
            }
        }
    }
}

/// Fills and purges segments (outside the measured time) until the log
/// writes into a recycled file, with a purged segment kept as the next
/// spare.
fn into_recycled_segment(wal: &Wal) {
    let record = Bytes::from(vec![7u8; 1 << 20]);
    while wal.stats().recycled_segments == 0 {
        wal.append_blocking(vec![record.clone()]).expect("fill");
        wal.purge_before_blocking(wal.last_lsn()).expect("purge");
    }
}

/// Runs `threads` appenders of `size`-byte records against each target for
/// `seconds`. `targets[i % targets.len()]` serves thread `i`.
fn drive(targets: &[AppendFn], threads: usize, size: usize, seconds: f64) -> Sample {
    let stop = Arc::new(AtomicBool::new(false));
    let data: Arc<[u8]> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (stop, data, append) =
                (Arc::clone(&stop), Arc::clone(&data), Arc::clone(&targets[thread % targets.len()]));
            std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(1 << 16);
                while !stop.load(Ordering::Relaxed) {
                    let begin = Instant::now();
                    append(thread, &data);
                    latencies.push(begin.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                latencies
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies: Vec<u32> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    Sample { ops, bytes: ops * size as u64, elapsed, latencies_us: latencies, records_per_sync: None, device: None }
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One WAL system, `logs` logs, `threads` appenders spread over them.
fn run_system(system: System, root: &Path, logs: usize, threads: usize, size: usize, seconds: f64) -> Sample {
    let segment_size = if logs > 4 { 8 << 20 } else { 64 << 20 };
    let opened: Vec<Opened> =
        (0..logs).map(|i| system.open(&fresh_dir(root, &format!("log-{i}")), segment_size)).collect();
    if logs > 4 {
        // Let the background pre-writes of many logs settle first.
        std::thread::sleep(Duration::from_secs(2));
    }
    let targets: Vec<AppendFn> = opened.iter().map(|o| Arc::clone(&o.append)).collect();
    let mut sample = drive(&targets, threads, size, seconds);
    sample.records_per_sync = median(opened.iter().filter_map(|o| (o.records_per_sync)()).collect()).into();
    if sample.records_per_sync.is_some_and(f64::is_nan) {
        sample.records_per_sync = None;
    }
    drop(opened);
    let _ = std::fs::remove_dir_all(root);
    sample
}

fn fio_available() -> bool {
    Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// fio sync-write baseline: `jobs` jobs, one file each, `bs` blocks,
/// `fdatasync` after every write. `overwrite` lays the files out first (the
/// same allocation mode as pre-written segments).
fn run_fio(root: &Path, jobs: usize, bs: usize, overwrite: bool, file_size: u64, seconds: f64) -> Sample {
    let dir = fresh_dir(root, "fio");
    let output = Command::new("fio")
        .args([
            "--name=sync-write",
            &format!("--directory={}", dir.display()),
            "--rw=write",
            &format!("--bs={bs}"),
            &format!("--size={file_size}"),
            "--ioengine=sync",
            "--fdatasync=1",
            &format!("--numjobs={jobs}"),
            "--group_reporting",
            &format!("--overwrite={}", u8::from(overwrite)),
            "--time_based",
            &format!("--runtime={}ms", (seconds * 1000.0) as u64),
            "--output-format=json",
        ])
        .output()
        .expect("run fio");
    let _ = std::fs::remove_dir_all(&dir);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("fio json");
    let job = &json["jobs"][0];
    let runtime = Duration::from_millis(job["job_runtime"].as_u64().unwrap_or(1).max(1) / jobs.max(1) as u64);
    let ops = job["write"]["total_ios"].as_u64().unwrap_or(0);
    let bytes = job["write"]["io_bytes"].as_u64().unwrap_or(ops * bs as u64);
    // fio reports write and fdatasync latency separately; an ack here is
    // one write plus one sync, so add the write's mean to the sync's
    // percentiles.
    let write_mean_us = job["write"]["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0;
    let sync = &job["sync"]["lat_ns"]["percentile"];
    let at = |key: &str| (sync[key].as_f64().unwrap_or(f64::NAN) / 1000.0 + write_mean_us) as u32;
    let latencies_us = vec![at("50.000000"), at("99.000000"), at("99.900000")];
    Sample { ops, bytes, elapsed: runtime, latencies_us, records_per_sync: None, device: None }
}

/// A row of a result table: medians over rounds.
struct Row {
    name: String,
    samples: Vec<Sample>,
    fio: bool,
}

impl Row {
    fn ops(&self) -> f64 {
        median(self.samples.iter().map(Sample::ops_per_sec).collect())
    }
    fn print(&self, baseline: Option<(&str, f64)>) {
        let mib = median(self.samples.iter().map(Sample::mib_per_sec).collect());
        let (p50, p99, p999) = if self.fio {
            let pick = |i: usize| median(self.samples.iter().map(|s| s.latencies_us[i] as f64).collect());
            (pick(0), pick(1), pick(2))
        } else {
            let pick = |p: f64| median(self.samples.iter().map(|s| s.percentile(p)).collect());
            (pick(0.5), pick(0.99), pick(0.999))
        };
        let rps = median(self.samples.iter().filter_map(|s| s.records_per_sync).collect());
        let ratio = baseline.map_or(String::new(), |(_, base)| format!("{:.2}x", self.ops() / base));
        let rps = if rps.is_finite() { format!("{rps:.1}") } else { "-".into() };
        let per = |f: &dyn Fn(&Sample, DeviceDelta) -> f64| {
            median(self.samples.iter().filter_map(|s| s.device.map(|d| f(s, d))).collect())
        };
        let amplification = per(&|s, d| d.0 as f64 / s.bytes.max(1) as f64);
        let writes = per(&|s, d| d.1 as f64 / s.ops.max(1) as f64);
        let flushes = per(&|s, d| d.2 as f64 / s.ops.max(1) as f64);
        let queue = per(&|_, d| d.3);
        println!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {} | {amplification:.2} | {writes:.2} | {flushes:.2} | {queue:.1} |",
            self.name,
            self.ops(),
            mib,
            p50,
            p99,
            p999,
            rps,
            ratio
        );
    }
}

fn print_table(title: &str, rows: &[Row], baseline_name: &str) {
    println!("\n### {title}\n");
    println!(
        "| system | ops/s | MiB/s | p50 µs | p99 µs | p99.9 µs | records/sync | vs {baseline_name} | disk bytes / record bytes | disk writes / record | disk flushes / record | disk queue |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let baseline = rows.iter().find(|r| r.name == baseline_name).map(|r| (baseline_name, r.ops()));
    for row in rows {
        row.print(baseline);
    }
}

/// Runs every system once per round, alternating, and collects rows.
fn rounds(args: &Args, systems: &[Runner]) -> Vec<Row> {
    let mut rows: Vec<Row> =
        systems.iter().map(|(name, _, fio)| Row { name: name.clone(), samples: Vec::new(), fio: *fio }).collect();
    let device = device_of(&args.dir);
    for round in 0..args.rounds {
        for (i, (name, run, _)) in systems.iter().enumerate() {
            if args.systems.as_ref().is_some_and(|words| !words.iter().any(|w| name.contains(w.as_str()))) {
                continue;
            }
            let before = device.as_deref().and_then(disk_stats);
            let mut sample = run();
            if let (Some(before), Some(after)) = (before, device.as_deref().and_then(disk_stats)) {
                sample.device = Some(after.since(before));
            }
            eprintln!("  round {round} {name}: {:.0} ops/s, disk: {:?}", sample.ops_per_sec(), sample.device);
            rows[i].samples.push(sample);
        }
    }
    rows.retain(|row| !row.samples.is_empty());
    rows
}

/// The `/proc/diskstats` name of the whole disk holding `dir` (`vda`),
/// found through `/sys/dev/block/MAJOR:MINOR`.
fn device_of(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    // A partition's parent directory is its disk.
    let disk = if link.join("partition").exists() { link.parent()?.to_path_buf() } else { link };
    Some(disk.file_name()?.to_string_lossy().into_owned())
}

/// What a disk has done so far (`/proc/diskstats`).
#[derive(Clone, Copy, Debug)]
struct DiskStats {
    /// Bytes written.
    bytes: u64,
    /// Write requests completed.
    writes: u64,
    /// Flush requests completed (what an `fdatasync` becomes, with a
    /// volatile write cache).
    flushes: u64,
    /// Milliseconds of requests in flight, summed over requests.
    weighted_ms: u64,
    /// When read.
    at: Instant,
}

impl DiskStats {
    /// Bytes, writes and flushes since `before`, and the average number of
    /// requests in flight meanwhile.
    fn since(self, before: DiskStats) -> DeviceDelta {
        let wall_ms = self.at.duration_since(before.at).as_secs_f64() * 1000.0;
        (
            self.bytes.saturating_sub(before.bytes),
            self.writes.saturating_sub(before.writes),
            self.flushes.saturating_sub(before.flushes),
            self.weighted_ms.saturating_sub(before.weighted_ms) as f64 / wall_ms.max(1e-9),
        )
    }
}

/// What `device` has done so far.
fn disk_stats(device: &str) -> Option<DiskStats> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    let line = stats.lines().find(|line| line.split_whitespace().nth(2) == Some(device))?;
    let fields: Vec<u64> = line.split_whitespace().skip(3).map(|f| f.parse().unwrap_or(0)).collect();
    // After the name: reads, merged, sectors, ms; writes, merged, sectors,
    // ms; in flight, ms busy, weighted ms; discards (4 fields); flushes, ms.
    Some(DiskStats {
        bytes: fields.get(6)? * 512,
        writes: *fields.get(4)?,
        flushes: fields.get(15).copied().unwrap_or(0),
        weighted_ms: *fields.get(10)?,
        at: Instant::now(),
    })
}

fn wal_systems(include_fresh: bool) -> Vec<System> {
    let mut systems = vec![System::Datanode { backend: IoBackend::Std, prewrite: true }];
    if open_backend(IoBackend::Uring).is_ok() {
        systems.push(System::Datanode { backend: IoBackend::Uring, prewrite: true });
    }
    if include_fresh {
        systems.push(System::Datanode { backend: IoBackend::Std, prewrite: false });
    }
    systems
}

fn peers() -> Vec<System> {
    vec![System::RaftEngine { recycle: false }, System::RaftEngine { recycle: true }, System::OkayWal]
}

type Runner = (String, Box<dyn Fn() -> Sample>, bool);

fn wal_runner(system: System, root: &Path, logs: usize, threads: usize, size: usize, seconds: f64) -> Runner {
    let root = root.to_path_buf();
    (system.name().to_string(), Box::new(move || run_system(system, &root, logs, threads, size, seconds)), false)
}

fn fio_runner(name: &str, root: &Path, jobs: usize, bs: usize, overwrite: bool, size: u64, seconds: f64) -> Runner {
    let root = root.to_path_buf();
    (name.to_string(), Box::new(move || run_fio(&root, jobs, bs, overwrite, size, seconds)), true)
}

fn w1(args: &Args, fio: bool) {
    let root = args.dir.join("w1");
    let mut runners: Vec<Runner> = wal_systems(true)
        .into_iter()
        .chain([System::DatanodeRecycled])
        .chain(peers())
        .map(|s| wal_runner(s, &root, 1, 1, 4096, args.seconds))
        .collect();
    if fio {
        runners.push(fio_runner("fio sync-write (overwrite)", &root, 1, 4096, true, 256 << 20, args.seconds));
        runners.push(fio_runner("fio sync-write (fresh)", &root, 1, 4096, false, 256 << 20, args.seconds));
    }
    print_table("W1: 1 writer, 4 KiB, sync", &rounds(args, &runners), "raft-engine 0.4");
}

fn w2(args: &Args) {
    let root = args.dir.join("w2");
    for threads in [16, 64] {
        for size in [256, 4096] {
            let runners: Vec<Runner> = wal_systems(false)
                .into_iter()
                .chain(peers())
                .map(|s| wal_runner(s, &root, 1, threads, size, args.seconds))
                .collect();
            let title = format!("W2: {threads} writers, {size} B, one log, sync");
            print_table(&title, &rounds(args, &runners), "raft-engine 0.4");
        }
    }
}

fn w3(args: &Args, fio: bool) {
    let root = args.dir.join("w3");
    for size in [64 << 10, 1 << 20] {
        let mut runners: Vec<Runner> =
            wal_systems(true).into_iter().map(|s| wal_runner(s, &root, 1, 1, size, args.seconds)).collect();
        if fio {
            runners.push(fio_runner("fio sync-write (overwrite)", &root, 1, size, true, 1 << 30, args.seconds));
            runners.push(fio_runner("fio sync-write (fresh)", &root, 1, size, false, 1 << 30, args.seconds));
        }
        let title = format!("W3: 1 writer, {} KiB records, sync", size >> 10);
        print_table(&title, &rounds(args, &runners), "fio sync-write (overwrite)");
    }
}

fn w4(args: &Args, fio: bool) {
    let root = args.dir.join("w4");
    for logs in [4, 16, 64] {
        let mut runners: Vec<Runner> = wal_systems(false)
            .into_iter()
            .chain([System::DatanodeShared])
            .map(|s| wal_runner(s, &root, logs, logs, 4096, args.seconds))
            .collect();
        if fio {
            runners.push(fio_runner("fio, one job per file", &root, logs, 4096, true, 16 << 20, args.seconds));
        }
        let title = format!("W4: {logs} logs, one writer each, 4 KiB, sync");
        print_table(&title, &rounds(args, &runners), "fio, one job per file");
    }
}

fn drop_page_cache() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn w5(args: &Args) {
    let dir = fresh_dir(&args.dir, "w5");
    let total: u64 = 1 << 30;
    let record = 4096;
    {
        let storage = open_backend(IoBackend::Std).unwrap();
        let options = WalOptions { durability: datanode_wal::Durability::None, ..WalOptions::new(5) };
        let wal = Wal::open(storage, &dir, options).unwrap();
        let data = Bytes::from(vec![7u8; record]);
        let batch: Vec<Bytes> = (0..64).map(|_| data.clone()).collect();
        for _ in 0..total / (record as u64 * 64) {
            wal.append_blocking(batch.clone()).unwrap();
        }
        wal.close().unwrap();
    }
    let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    let mut backends = vec![IoBackend::Std];
    if open_backend(IoBackend::Uring).is_ok() {
        backends.push(IoBackend::Uring);
    }
    let mut cold = true;
    let mut recover_times = vec![Vec::new(); backends.len()];
    let mut read_times = Vec::new();
    for round in 0..args.rounds {
        for (i, backend) in backends.iter().enumerate() {
            cold &= drop_page_cache();
            let started = Instant::now();
            let wal = Wal::open(open_backend(*backend).unwrap(), &dir, WalOptions::new(5)).unwrap();
            recover_times[i].push(started.elapsed().as_secs_f64());
            assert!(wal.last_lsn() >= total / record as u64);
            wal.close().unwrap();
        }
        cold &= drop_page_cache();
        let started = Instant::now();
        let mut buffer = vec![0u8; 1 << 20];
        for file in &files {
            use std::io::Read;
            let mut f = std::fs::File::open(file).unwrap();
            while f.read(&mut buffer).unwrap() > 0 {}
        }
        read_times.push(started.elapsed().as_secs_f64());
        eprintln!(
            "  round {round}: recover {:?}s, read {:.3}s",
            recover_times.iter().map(|t| t[round]).collect::<Vec<_>>(),
            read_times[round]
        );
    }
    let mib = bytes as f64 / (1 << 20) as f64;
    let read = median(read_times);
    println!("\n### W5: recovery of {mib:.0} MiB of WAL ({} page cache)\n", if cold { "cold" } else { "warm" });
    println!("| what | seconds | MiB/s | vs sequential read |");
    println!("|---|---|---|---|");
    for (backend, times) in backends.iter().zip(recover_times) {
        let recover = median(times);
        let name = if *backend == IoBackend::Uring { "io_uring" } else { "std" };
        println!(
            "| datanode-wal open, recovery ({name}) | {recover:.3} | {:.0} | {:.2}x |",
            mib / recover,
            recover / read
        );
    }
    println!("| sequential read of the same files (1 MiB reads) | {read:.3} | {:.0} | 1.00x |", mib / read);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.dir).unwrap();
    let wanted = |w: &str| args.only.as_ref().is_none_or(|only| only.iter().any(|o| o == w));
    let fio = fio_available();
    if !fio {
        eprintln!("fio not found: fio rows are left out");
    }
    println!("## WAL benchmarks: {} rounds of {:.1}s, medians, dir {}", args.rounds, args.seconds, args.dir.display());
    if wanted("W1") {
        w1(&args, fio);
    }
    if wanted("W2") {
        w2(&args);
    }
    if wanted("W3") {
        w3(&args, fio);
    }
    if wanted("W4") {
        w4(&args, fio);
    }
    if wanted("W5") {
        w5(&args);
    }
    if args.only.as_ref().is_some_and(|only| only.iter().any(|o| o == "SWEEP")) {
        sweep(&args);
    }
}

/// Throughput against latency: 4 KiB sync appends, one log, more and more
/// writers, for the WAL and its peers.
fn sweep(args: &Args) {
    let root = args.dir.join("sweep");
    let systems = [
        System::Datanode { backend: IoBackend::Std, prewrite: true },
        System::RaftEngine { recycle: false },
        System::OkayWal,
    ];
    let mut points = Vec::new();
    for threads in [1, 4, 16, 64] {
        let runners: Vec<Runner> =
            systems.iter().map(|s| wal_runner(*s, &root, 1, threads, 4096, args.seconds)).collect();
        let rows = rounds(args, &runners);
        print_table(&format!("SWEEP: {threads} writers, 4 KiB, one log, sync"), &rows, "raft-engine 0.4");
        for row in &rows {
            let pick = |p: f64| median(row.samples.iter().map(|s| s.percentile(p)).collect()) / 1000.0;
            points.push(format!(
                "{{\"system\": \"{}\", \"concurrency\": {threads}, \"ops_per_sec\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
                row.name,
                row.ops(),
                pick(0.5),
                pick(0.99)
            ));
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, format!("[\n  {}\n]\n", points.join(",\n  "))).unwrap();
    }
}
