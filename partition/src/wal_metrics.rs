//! Feeds a partition's WAL events into the contract metrics
//! (`datanode_wal_*`). Runs on the log's writer thread: cheap, never
//! blocking.

use std::time::Duration;

use datanode_wal::WalObserver;

/// The metrics of one partition's log.
pub(crate) struct WalMetrics {
    partition: String,
    disk: String,
}

impl WalMetrics {
    pub(crate) fn new(partition: u64, disk: &str) -> WalMetrics {
        WalMetrics { partition: partition.to_string(), disk: disk.to_string() }
    }
}

impl WalObserver for WalMetrics {
    fn batch_written(&self, records: usize, bytes: usize) {
        metrics::counter!("datanode_wal_appends_total", "partition" => self.partition.clone())
            .increment(records as u64);
        metrics::counter!("datanode_wal_append_bytes_total", "partition" => self.partition.clone())
            .increment(bytes as u64);
        metrics::histogram!("datanode_wal_batch_records").record(records as f64);
    }

    fn synced(&self, elapsed: Duration, _ok: bool) {
        metrics::counter!("datanode_wal_syncs_total", "partition" => self.partition.clone()).increment(1);
        metrics::histogram!("datanode_wal_sync_seconds", "disk" => self.disk.clone()).record(elapsed.as_secs_f64());
    }
}
