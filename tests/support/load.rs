//! Writers against a running node that remember exactly what was
//! acknowledged (201), and count everything else per partition, so a test
//! can prove "acked => durable" and "the other partitions saw no failure".
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Daemon, call};

/// One acknowledged put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub partition: u64,
    pub key: String,
    pub value: Vec<u8>,
}

/// What the writers saw.
#[derive(Debug, Default)]
pub struct Outcome {
    pub acked: Vec<Acked>,
    /// Per partition: status code (0 = no HTTP answer) -> count, for every
    /// answer but 201.
    pub failures: BTreeMap<u64, BTreeMap<u16, u64>>,
}

impl Outcome {
    /// Failed requests on `partition`.
    pub fn failed_on(&self, partition: u64) -> u64 {
        self.failures.get(&partition).map_or(0, |by_status| by_status.values().sum())
    }

    pub fn acked_on(&self, partition: u64) -> usize {
        self.acked.iter().filter(|a| a.partition == partition).count()
    }
}

/// Writers running in the background: one thread per (partition, writer).
pub struct Load {
    stop: Arc<AtomicBool>,
    outcome: Arc<Mutex<Outcome>>,
    acked: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `writers` writers on each of `partitions`, putting values of
    /// `value_len` bytes under keys `<tag>-p<partition>-w<writer>-<seq>`.
    /// Writers keep going after failures (pausing 10 ms) until stopped.
    pub fn start(base_url: &str, partitions: &[u64], writers: usize, value_len: usize, tag: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let acked = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for &partition in partitions {
            for writer in 0..writers {
                let (stop, outcome, acked) = (Arc::clone(&stop), Arc::clone(&outcome), Arc::clone(&acked));
                let prefix = format!("{base_url}/v1/partitions/{partition}/blobs/{tag}-p{partition}-w{writer}-");
                threads.push(std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        seq += 1;
                        let url = format!("{prefix}{seq}");
                        let key = url.rsplit('/').next().unwrap().to_string();
                        let value: Vec<u8> = key.bytes().cycle().take(value_len.max(1)).collect();
                        let status = match agent.put(&url).send_bytes(&value) {
                            Ok(response) => response.status(),
                            Err(ureq::Error::Status(status, _)) => status,
                            Err(ureq::Error::Transport(_)) => 0,
                        };
                        let mut outcome = outcome.lock().unwrap();
                        if status == 201 {
                            outcome.acked.push(Acked { partition, key, value });
                            acked.fetch_add(1, Ordering::Relaxed);
                        } else {
                            *outcome.failures.entry(partition).or_default().entry(status).or_default() += 1;
                            drop(outcome);
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }));
            }
        }
        Load { stop, outcome, acked, threads }
    }

    /// Acknowledged puts so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops the writers and returns what they saw.
    pub fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::Release);
        for thread in self.threads {
            thread.join().unwrap();
        }
        std::mem::take(&mut *self.outcome.lock().unwrap())
    }
}

/// Reads every acknowledged put back and panics on the first one missing
/// or different.
pub fn assert_all_readable(daemon: &Daemon, acked: &[Acked], when: &str) {
    for put in acked {
        let url = daemon.url(&format!("/v1/partitions/{}/blobs/{}", put.partition, put.key));
        let (status, body) = call(ureq::get(&url), None);
        assert_eq!(status, 200, "{when}: acknowledged {} on partition {} is gone", put.key, put.partition);
        assert!(
            body == put.value,
            "{when}: acknowledged {} on partition {} reads back different bytes",
            put.key,
            put.partition
        );
    }
}
