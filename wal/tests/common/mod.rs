//! Helpers shared by the WAL's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

#[path = "../../../tests/support/disks.rs"]
pub mod kernel;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use datanode_wal::storage::{SimStorage, StdStorage, UringStorage};
use datanode_wal::{Storage, Wal, WalOptions};

/// Small segments so tests roll over often.
pub fn small_options(log_id: u64) -> WalOptions {
    WalOptions { segment_size: 4096, ..WalOptions::new(log_id) }
}

/// Small segments, no background pre-writing: every file operation comes
/// from the writer, so a fault aimed at "the next write" hits the writer.
pub fn writer_only_options(log_id: u64) -> WalOptions {
    WalOptions { prewrite_segments: false, ..small_options(log_id) }
}

/// Polls `condition` until it holds, failing the test after 20 seconds.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A payload that names its writer and sequence number, so any record read
/// back can be traced to the append that wrote it.
pub fn payload(writer: u64, seq: u64, len: usize) -> Bytes {
    let mut bytes = format!("w{writer}-s{seq}-").into_bytes();
    bytes.resize(len.max(bytes.len()), (seq % 251) as u8);
    Bytes::from(bytes)
}

/// Every real-disk backend available here, by name.
pub fn disk_backends() -> Vec<(&'static str, Arc<dyn Storage>)> {
    let mut all: Vec<(&'static str, Arc<dyn Storage>)> = vec![("std", Arc::new(StdStorage))];
    match UringStorage::new() {
        Ok(uring) => all.push(("uring", Arc::new(uring))),
        Err(error) => eprintln!("SKIPPED uring backend: {error}"),
    }
    all
}

pub fn sim(seed: u64) -> (SimStorage, Arc<dyn Storage>) {
    let sim = SimStorage::new(seed);
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    (sim, storage)
}

/// Reads the whole log back as payloads.
pub fn read_all(wal: &Wal) -> Vec<Bytes> {
    if wal.last_lsn() < wal.first_lsn() {
        return Vec::new();
    }
    wal.read_from(wal.first_lsn(), usize::MAX).unwrap().into_iter().map(|r| r.data).collect()
}

pub fn open(storage: &Arc<dyn Storage>, dir: &Path, options: WalOptions) -> Wal {
    Wal::open(Arc::clone(storage), dir, options).unwrap()
}
