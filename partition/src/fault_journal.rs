//! The node's fault journal: which partitions are faulted, kept on every
//! disk, so that a fault stays sticky even when its own disk could not
//! take the record.
//!
//! A partition's `FAULT` file lives on the partition's disk. When that
//! disk is what died (a filesystem shutdown, a pulled cable), the file
//! cannot be written, and after the disk is repaired, remounted and the
//! node restarted, the partition would load as if nothing had happened.
//! The journal closes that hole: `<disk>/.datanode-faults` on *every*
//! disk lists every faulted partition of the node (id, disk, cause, op,
//! errno, time, message), one per line, tab-separated `key=value` fields
//! in the same vocabulary as `FAULT`:
//!
//! ```text
//! partition=7<TAB>disk=d0<TAB>cause=io<TAB>op=sync<TAB>errno=5<TAB>at=1763700000<TAB>message=...
//! ```
//!
//! At open the registry reads the journal of every disk and faults each
//! listed partition that is not faulted already (which also writes its
//! `FAULT` file, now that its disk takes writes). After a successful
//! recover or a delete, the next publish drops it from every journal.
//!
//! Each disk has a writer thread of its own: a disk that hangs holds up
//! only its own copy, never the others or the caller. Publishing only
//! hands the new contents over. A copy that fails is retried every few
//! seconds; the newest contents always win. Known limit: with a single
//! disk that dies, there is nowhere else to write, and a restart after
//! remount finds the partition healthy unless its own `FAULT` file made
//! it to disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use datanode_wal::Storage;

use crate::fault_file;
use crate::layout::DiskDir;
use crate::state::Fault;

/// File name of the journal at the root of each disk.
pub const JOURNAL_FILE: &str = ".datanode-faults";

const RETRY_AFTER: Duration = Duration::from_secs(5);

/// One faulted partition, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// The partition id.
    pub partition: u64,
    /// The disk it lives on.
    pub disk: String,
    /// Its fault.
    pub fault: Fault,
}

/// Encodes entries, sorted by partition, one line each.
pub fn encode(entries: &[JournalEntry]) -> String {
    let mut sorted: Vec<&JournalEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| (a.partition, &a.disk).cmp(&(b.partition, &b.disk)));
    let mut text = String::new();
    for entry in sorted {
        let fields = fault_file::encode(&entry.fault).replace('\t', " ");
        let fields = fields.trim_end().replace('\n', "\t");
        text.push_str(&format!("partition={}\tdisk={}\t{fields}\n", entry.partition, entry.disk));
    }
    text
}

/// Decodes a journal. Lines without a valid partition id and disk name
/// are skipped (they cannot name what they fault) and counted.
pub fn decode(text: &str) -> (Vec<JournalEntry>, usize) {
    let mut entries = Vec::new();
    let mut skipped = 0;
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let field = |name: &str| line.split('\t').find_map(|f| f.strip_prefix(name)?.strip_prefix('='));
        let partition = field("partition").and_then(|p| p.parse().ok());
        let disk = field("disk").filter(|d| !d.is_empty());
        match (partition, disk) {
            (Some(partition), Some(disk)) => entries.push(JournalEntry {
                partition,
                disk: disk.to_string(),
                fault: fault_file::parse(&line.replace('\t', "\n")),
            }),
            _ => skipped += 1,
        }
    }
    (entries, skipped)
}

/// Reads and merges the journals of `disks`. A disk whose journal cannot
/// be read contributes nothing (logged); the first entry for a partition
/// wins.
pub fn read_all(storage: &dyn Storage, disks: &[DiskDir]) -> Vec<JournalEntry> {
    let mut merged: BTreeMap<u64, JournalEntry> = BTreeMap::new();
    for disk in disks {
        let text = match crate::durable::read_small_file(storage, &disk.path.join(JOURNAL_FILE), 16 << 20) {
            Ok(Some(text)) => text,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(disk = disk.name, %error, "cannot read the fault journal");
                continue;
            }
        };
        let (entries, skipped) = decode(&text);
        if skipped > 0 {
            tracing::warn!(disk = disk.name, skipped, "fault journal lines without partition and disk");
        }
        for entry in entries {
            merged.entry(entry.partition).or_insert(entry);
        }
    }
    merged.into_values().collect()
}

#[derive(Debug, Default)]
struct Copy {
    /// Contents not yet written, newest wins.
    pending: Option<String>,
    /// Publications asked for and written, to wait for a flush.
    asked: u64,
    written: u64,
    stopped: bool,
}

#[derive(Debug, Default)]
struct Shared {
    copy: Mutex<Copy>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Copy> {
        self.copy.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes the journal to every disk, each from a thread of its own.
#[derive(Debug)]
pub struct FaultJournal {
    copies: Vec<Arc<Shared>>,
    last: Mutex<Option<String>>,
}

impl FaultJournal {
    /// Starts one writer thread per disk.
    pub fn start(storage: Arc<dyn Storage>, disks: &[DiskDir]) -> FaultJournal {
        let mut copies = Vec::new();
        for disk in disks {
            let shared = Arc::new(Shared::default());
            let (worker, storage, root, name) =
                (Arc::clone(&shared), Arc::clone(&storage), disk.path.clone(), disk.name.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("journal-{name}"))
                .spawn(move || write_copies(&worker, storage.as_ref(), &root, &name));
            match spawned {
                Ok(_) => copies.push(shared),
                Err(error) => tracing::error!(disk = disk.name, %error, "cannot start the fault journal writer"),
            }
        }
        FaultJournal { copies, last: Mutex::new(None) }
    }

    /// Makes `entries` the journal on every disk. Returns at once; writes
    /// only when the contents changed.
    pub fn publish(&self, entries: &[JournalEntry]) {
        let text = encode(entries);
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        for shared in &self.copies {
            let mut copy = shared.lock();
            copy.pending = Some(text.clone());
            copy.asked += 1;
            shared.changed.notify_all();
        }
        *last = Some(text);
    }

    /// Waits up to `timeout` for every disk's copy to be written; returns
    /// whether they all were.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        self.copies.iter().all(|shared| {
            let mut copy = shared.lock();
            while copy.written < copy.asked {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                copy = shared.changed.wait_timeout(copy, left).unwrap_or_else(PoisonError::into_inner).0;
            }
            true
        })
    }
}

impl Drop for FaultJournal {
    fn drop(&mut self) {
        for shared in &self.copies {
            shared.lock().stopped = true;
            shared.changed.notify_all();
        }
    }
}

/// One disk's writer: waits for contents, writes them durably, retries a
/// failed write after a pause unless newer contents arrive first.
fn write_copies(shared: &Shared, storage: &dyn Storage, root: &Path, disk: &str) {
    let mut failing = false;
    loop {
        let (text, asked) = {
            let mut copy = shared.lock();
            while copy.pending.is_none() && !copy.stopped {
                copy = shared.changed.wait(copy).unwrap_or_else(PoisonError::into_inner);
            }
            match copy.pending.take() {
                Some(text) => (text, copy.asked),
                None => return,
            }
        };
        match crate::durable::replace_file(storage, root, JOURNAL_FILE, text.clone()) {
            Ok(()) => {
                if failing {
                    tracing::info!(disk, "fault journal written again");
                }
                failing = false;
                let mut copy = shared.lock();
                copy.written = copy.written.max(asked);
                shared.changed.notify_all();
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(disk, %error, "cannot write the fault journal; retrying");
                }
                failing = true;
                let mut copy = shared.lock();
                copy.pending.get_or_insert(text);
                if !copy.stopped {
                    let _ = shared.changed.wait_timeout(copy, RETRY_AFTER);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::FaultCause;
    use datanode_wal::IoOp;
    use datanode_wal::storage::SimStorage;
    use std::time::UNIX_EPOCH;

    fn entry(partition: u64, disk: &str, message: &str) -> JournalEntry {
        JournalEntry {
            partition,
            disk: disk.into(),
            fault: Fault {
                cause: FaultCause::Io,
                op: "sync".into(),
                errno: Some(5),
                message: message.into(),
                at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            },
        }
    }

    #[test]
    fn entries_round_trip_whatever_the_message() {
        let entries = vec![entry(3, "d1", "tab\there, newline\nthere, key=value"), entry(1, "d0", "")];
        let (back, skipped) = decode(&encode(&entries));
        assert_eq!(skipped, 0);
        let expect = |e: &JournalEntry| (e.partition, e.disk.clone(), e.fault.cause, e.fault.errno, e.fault.at);
        assert_eq!(back.iter().map(expect).collect::<Vec<_>>(), vec![expect(&entries[1]), expect(&entries[0])]);
        assert_eq!(back[1].fault.message, "tab here, newline there, key=value");
    }

    #[test]
    fn lines_that_name_no_partition_are_skipped_not_fatal() {
        let (entries, skipped) = decode("garbage\npartition=x\tdisk=d0\npartition=4\tdisk=d1\tcause=corruption\n\n");
        assert_eq!(skipped, 2);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].fault.cause, FaultCause::Corruption);
    }

    #[test]
    fn every_disk_gets_a_copy_and_a_dead_disk_does_not_hold_up_the_others() {
        let sim = Arc::new(SimStorage::new(7));
        let disks: Vec<DiskDir> =
            ["a", "b", "c"].iter().map(|n| DiskDir { name: n.to_string(), path: format!("/{n}").into() }).collect();
        for disk in &disks {
            sim.create_dir_all(&disk.path).unwrap();
        }
        sim.pause_on(IoOp::Write, "/b/");
        let journal = FaultJournal::start(sim.clone(), &disks);
        journal.publish(&[entry(9, "b", "gone")]);
        assert!(!journal.flush(Duration::from_millis(300)), "the hung disk's copy cannot be written");
        let seen = read_all(sim.as_ref(), &[disks[0].clone(), disks[2].clone()]);
        assert_eq!(seen.iter().map(|e| e.partition).collect::<Vec<_>>(), vec![9]);
        sim.resume(IoOp::Write);
        assert!(journal.flush(Duration::from_secs(5)));
        journal.publish(&[]);
        assert!(journal.flush(Duration::from_secs(5)));
        assert!(read_all(sim.as_ref(), &disks).is_empty());
    }
}
