//! Index memory per key: how much resident memory a partition's in-memory
//! index takes, measured as the growth of RSS while a partition replays its
//! log after a restart.
//!
//! ```text
//! cargo bench --bench index_memory -- [--keys N] [--dir DIR]
//! ```
//!
//! Keys are 16 bytes (`key-000000000001`), values 8 bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use datanode_partition::{Partition, PartitionOptions};
use datanode_wal::{Durability, IoBackend, WalOptions, open_backend};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn main() {
    let mut keys: u64 = 1_000_000;
    let mut dir = PathBuf::from("target/bench-data/index-memory");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--keys" => keys = args.next().and_then(|v| v.parse().ok()).expect("--keys N"),
            "--dir" => dir = PathBuf::from(args.next().expect("--dir DIR")),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let options = PartitionOptions {
        wal: WalOptions { durability: Durability::None, ..WalOptions::new(1) },
        ..PartitionOptions::new(1, "d0", dir.clone())
    };
    let storage = open_backend(IoBackend::Std).unwrap();
    {
        let partition = Arc::new(Partition::open(Arc::clone(&storage), options.clone()));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        let writers = 64;
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let partition = Arc::clone(&partition);
                runtime.spawn(async move {
                    for i in (w..keys).step_by(writers as usize) {
                        let key = format!("key-{i:012}");
                        partition.put(key.as_bytes(), &i.to_le_bytes()).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            runtime.block_on(task).unwrap();
        }
        partition.close();
    }
    let before = rss_bytes();
    let partition = Arc::new(Partition::open(storage, options));
    let after = rss_bytes();
    assert_eq!(partition.stats().blobs, keys);
    let grown = after.saturating_sub(before);
    println!("| keys | RSS growth | bytes per key (16-byte keys included) |");
    println!("|---|---|---|");
    println!("| {keys} | {:.1} MiB | {:.0} |", grown as f64 / (1 << 20) as f64, grown as f64 / keys as f64);
    partition.close();
    let _ = std::fs::remove_dir_all(&dir);
}
