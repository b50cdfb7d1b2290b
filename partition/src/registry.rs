//! Which partitions exist and where: create and delete without racing the
//! background verifier (scenario S4).
//!
//! The on-disk layout is in `layout.rs`.
//!
//! The rules:
//! - **Create** registers the id as `Creating` (with a fresh generation)
//!   *before* touching the disk, then makes a staging directory, writes and
//!   syncs the `PARTITION` file, renames the directory into place, syncs the
//!   parent, opens the partition and only then marks it `Active`.
//! - **Delete** unregisters (marks `Deleting`), closes, moves the directory
//!   aside, syncs, and removes it. Only an explicit delete removes data.
//! - **The verifier** compares directory entries with the registry under
//!   the registry lock, so a create or delete cannot slip between its look
//!   and its decision. It skips every entry the registry knows in any state,
//!   and moves what it does not recognise into `quarantine/`; it never
//!   deletes.
//! - **Faults stay sticky** even when a partition's own disk cannot take
//!   its `FAULT` file: every faulted partition is also listed in the fault
//!   journal on every disk, and applied again at open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use datanode_wal::{Engine, Storage, WalOptions};

use crate::compaction::{CompactionPolicy, CompactionReport};
use crate::disk::{Disk, DiskOptions, DiskStatus};
use crate::fault_journal::{self, FaultJournal, JournalEntry};
use crate::layout::{DiskDir, META_FILE};
use crate::partition::{Partition, PartitionOptions};
use crate::state::{Fault, FaultSource, State};

/// Most threads that open partitions at start.
const MAX_OPEN_THREADS: usize = 8;

/// A partition found on a disk at open, its id claimed, not opened yet.
#[derive(Debug)]
struct Claimed {
    id: u64,
    disk: DiskDir,
    /// Its `PARTITION` file could not be read: opened faulted.
    unreadable: Option<std::io::Error>,
}

/// Round-robin over the disks' lists: the first of each disk, then the
/// second of each, and so on.
fn interleave(mut per_disk: Vec<Vec<Claimed>>) -> Vec<Claimed> {
    let mut all = Vec::new();
    for list in &mut per_disk {
        list.reverse();
    }
    while per_disk.iter().any(|list| !list.is_empty()) {
        all.extend(per_disk.iter_mut().filter_map(Vec::pop));
    }
    all
}

/// How long `close` waits for the fault journal's copies.
const JOURNAL_FLUSH_AT_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// Options every partition (and every disk's state machine) is opened with.
#[derive(Debug, Clone)]
pub struct PartitionDefaults {
    /// Thresholds of the disks' probes and states.
    pub disk: DiskOptions,
    /// WAL options (the log id is set per partition).
    pub wal: WalOptions,
    /// Largest value a put may carry.
    pub max_blob_size: usize,
    /// Read errors tolerated before a partition is faulted.
    pub read_error_tolerance: u32,
    /// Most threads carrying the logs' I/O on one disk, however many
    /// partitions it holds.
    pub io_threads_per_disk: usize,
}

/// Default of [`PartitionDefaults::io_threads_per_disk`].
pub const DEFAULT_IO_THREADS_PER_DISK: usize = 16;

impl Default for PartitionDefaults {
    fn default() -> PartitionDefaults {
        let template = PartitionOptions::new(0, "", "");
        PartitionDefaults {
            disk: DiskOptions::default(),
            wal: template.wal,
            max_blob_size: template.max_blob_size,
            read_error_tolerance: template.read_error_tolerance,
            io_threads_per_disk: DEFAULT_IO_THREADS_PER_DISK,
        }
    }
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The id is taken (or being created or deleted).
    #[error("partition {0} already exists")]
    Exists(u64),
    /// No active partition has this id.
    #[error("partition {0} not found")]
    NotFound(u64),
    /// No disk has this name.
    #[error("no disk named {0:?}")]
    UnknownDisk(String),
    /// A file operation failed; nothing was registered or removed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
enum SlotState {
    Creating,
    Active(Arc<Partition>),
    Deleting,
}

#[derive(Debug)]
struct Slot {
    disk: String,
    generation: u64,
    state: SlotState,
}

#[derive(Debug, Default)]
struct Slots {
    by_id: BTreeMap<u64, Slot>,
    next_generation: u64,
}

/// What one verifier pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries moved into quarantine, with their new paths.
    pub quarantined: Vec<PathBuf>,
    /// Partition directories the node does not serve, left in place.
    pub unadopted: Vec<PathBuf>,
    /// Disks whose directory could not be listed.
    pub unreadable_disks: Vec<String>,
}

/// The partitions of a node.
#[derive(Debug)]
pub struct Registry {
    storage: Arc<dyn Storage>,
    disks: Vec<DiskDir>,
    /// One probe and state machine per disk, in the same order.
    disk_health: Vec<Disk>,
    /// Per disk, in the same order: held by create, delete and the
    /// verifier while they change that disk's `partitions/`.
    layout: Vec<Mutex<()>>,
    /// Per disk, in the same order: the threads that carry its logs' I/O.
    engines: Vec<Engine>,
    defaults: PartitionDefaults,
    slots: Mutex<Slots>,
    journal: FaultJournal,
    /// Journal entries read at open whose partition is not here (its disk
    /// did not list); kept in the journal until that id is created anew.
    carried: Mutex<Vec<JournalEntry>>,
}

/// What a name in `partitions/` is.
#[derive(Debug, PartialEq, Eq)]
enum EntryName {
    Partition(u64),
    Staging(u64, u64),
    Deleting(u64, u64),
    Unknown,
}

fn parse_id(text: &str) -> Option<u64> {
    let canonical =
        !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

fn parse_entry(name: &str) -> EntryName {
    let pair = |rest: &str| {
        let (id, generation) = rest.split_once('-')?;
        Some((parse_id(id)?, parse_id(generation)?))
    };
    if let Some(id) = parse_id(name) {
        EntryName::Partition(id)
    } else if let Some((id, generation)) = name.strip_prefix(".staging-").and_then(pair) {
        EntryName::Staging(id, generation)
    } else if let Some((id, generation)) = name.strip_prefix(".deleting-").and_then(pair) {
        EntryName::Deleting(id, generation)
    } else {
        EntryName::Unknown
    }
}

impl Registry {
    /// Opens every partition found on `disks`. Blocking. Leftovers of an
    /// interrupted create go to quarantine; an interrupted delete is
    /// finished. Unknown entries are left for the verifier. Partitions the
    /// fault journal lists stay faulted.
    pub fn open(storage: Arc<dyn Storage>, disks: Vec<DiskDir>, defaults: PartitionDefaults) -> Registry {
        let disk_health =
            disks.iter().map(|dir| Disk::new(dir.clone(), Arc::clone(&storage), defaults.disk.clone())).collect();
        let journal = FaultJournal::start(Arc::clone(&storage), &disks);
        let layout = disks.iter().map(|_| Mutex::new(())).collect();
        let engines =
            disks.iter().map(|dir| Engine::new(format!("disk-{}", dir.name), defaults.io_threads_per_disk)).collect();
        let registry = Registry {
            storage,
            disks,
            disk_health,
            layout,
            engines,
            defaults,
            slots: Mutex::new(Slots::default()),
            journal,
            carried: Mutex::new(Vec::new()),
        };
        let mut found = Vec::new();
        for disk in &registry.disks {
            match registry.claim_disk(disk) {
                Ok(claimed) => found.push(claimed),
                Err(error) => tracing::error!(disk = disk.name, %error, "cannot open the disk's partitions"),
            }
        }
        registry.open_claimed(interleave(found));
        registry.apply_journal();
        registry
    }

    /// Opens (replays) the claimed partitions on a few threads at once, so
    /// that a node with many partitions and disks starts in a fraction of
    /// the time. The list is interleaved by disk, so every disk is read
    /// from the start.
    fn open_claimed(&self, claimed: Vec<Claimed>) {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, MAX_OPEN_THREADS);
        let queue = Mutex::new(claimed.into_iter());
        let work = || {
            loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some(Claimed { id, disk, unreadable }) = next else { return };
                let (storage, options) = (Arc::clone(&self.storage), self.options(id, &disk));
                let partition = Arc::new(match unreadable {
                    None => Partition::open(storage, options),
                    Some(error) => Partition::open_faulted(storage, options, Fault::io("open", &error)),
                });
                if let Some(slot) = self.lock().by_id.get_mut(&id) {
                    slot.state = SlotState::Active(partition);
                }
            }
        };
        std::thread::scope(|scope| {
            for i in 1..threads {
                // If a thread cannot start, the others (and this one) do its share.
                let _ = std::thread::Builder::new().name(format!("open-{i}")).spawn_scoped(scope, work);
            }
            work();
        });
    }

    /// Faults every partition the journal lists that is not faulted yet
    /// (which also writes its own `FAULT` file).
    fn apply_journal(&self) {
        let mut carried = Vec::new();
        for entry in fault_journal::read_all(self.storage.as_ref(), &self.disks) {
            let here = self.lock().by_id.get(&entry.partition).and_then(|slot| match &slot.state {
                SlotState::Active(partition) if slot.disk == entry.disk => Some(Arc::clone(partition)),
                _ => None,
            });
            match here {
                Some(partition) if !matches!(partition.health().state(), State::Faulted(_)) => {
                    tracing::warn!(
                        partition = entry.partition,
                        disk = entry.disk,
                        cause = entry.fault.cause.as_str(),
                        "the fault journal lists this partition: faulted until recover"
                    );
                    partition.fault(entry.fault, FaultSource::Journal);
                }
                Some(_) => {}
                None => carried.push(entry),
            }
        }
        *self.carried.lock().unwrap_or_else(PoisonError::into_inner) = carried;
        self.sync_fault_journal();
    }

    /// Hands the current set of faulted partitions to the fault journal
    /// (written to every disk in the background if it changed). Cheap;
    /// call it after anything that may fault or recover a partition.
    pub fn sync_fault_journal(&self) {
        let mut entries = self.carried.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for (id, slot) in &self.lock().by_id {
            if let SlotState::Active(partition) = &slot.state
                && let State::Faulted(fault) = partition.health().state()
            {
                entries.push(JournalEntry { partition: *id, disk: slot.disk.clone(), fault });
            }
        }
        self.journal.publish(&entries);
    }

    /// Lists a disk's partitions and claims their ids (as `Creating`, so a
    /// second disk with the same id loses), quarantines leftovers of an
    /// interrupted create and finishes an interrupted delete. The claimed
    /// partitions are opened by [`Registry::open_claimed`].
    fn claim_disk(&self, disk: &DiskDir) -> Result<Vec<Claimed>, RegistryError> {
        let dir = disk.partitions_dir();
        self.storage.create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
        self.storage.create_dir_all(&disk.quarantine_dir()).map_err(|e| io("create", &disk.quarantine_dir(), e))?;
        let names = self.storage.list_dir(&dir).map_err(|e| io("list", &dir, e))?;
        let mut claimed = Vec::new();
        for name in names {
            let path = dir.join(&name);
            match parse_entry(&name) {
                EntryName::Partition(id) => {
                    // A `PARTITION` file that cannot be read (EIO) still names a
                    // partition: it is served faulted, never left to the
                    // verifier to quarantine as unknown.
                    let unreadable = match self.read_meta(&path) {
                        Ok(Some(found)) if found == id => None,
                        Ok(_) => continue, // not one of ours: the verifier decides
                        Err(error) => Some(error),
                    };
                    let mut slots = self.lock();
                    if slots.by_id.contains_key(&id) {
                        continue; // the same id on a second disk: left in place, reported by the verifier
                    }
                    let generation = slots.next();
                    slots.by_id.insert(id, Slot { disk: disk.name.clone(), generation, state: SlotState::Creating });
                    claimed.push(Claimed { id, disk: disk.clone(), unreadable });
                }
                EntryName::Staging(..) => {
                    // Never registered, never acknowledged: keep it aside.
                    self.quarantine(disk, &name)?;
                }
                EntryName::Deleting(..) => {
                    self.storage.remove_dir_all(&path).map_err(|e| io("remove", &path, e))?;
                    self.storage.sync_dir(&dir).map_err(|e| io("sync", &dir, e))?;
                }
                EntryName::Unknown => {}
            }
        }
        Ok(claimed)
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn options(&self, id: u64, disk: &DiskDir) -> PartitionOptions {
        let engine = self.disks.iter().position(|d| d.name == disk.name).and_then(|at| self.engines.get(at)).cloned();
        PartitionOptions {
            wal: WalOptions { engine, ..self.defaults.wal.clone() },
            max_blob_size: self.defaults.max_blob_size,
            read_error_tolerance: self.defaults.read_error_tolerance,
            ..PartitionOptions::new(id, disk.name.clone(), disk.partitions_dir().join(id.to_string()))
        }
    }

    /// The layout lock of disk `name` (see [`Registry::verify_once`]).
    fn layout_lock(&self, name: &str) -> Option<MutexGuard<'_, ()>> {
        let at = self.disks.iter().position(|d| d.name == name)?;
        self.layout.get(at).map(|lock| lock.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn disk(&self, name: &str) -> Result<&DiskDir, RegistryError> {
        self.disks.iter().find(|d| d.name == name).ok_or_else(|| RegistryError::UnknownDisk(name.to_string()))
    }

    /// The disks, in configuration order.
    pub fn disks(&self) -> &[DiskDir] {
        &self.disks
    }

    /// The WAL options a log on `disk` is opened with (the disk's I/O
    /// pool, the configured defaults): for logs outside the registry, such
    /// as the Raft logs of replicas.
    pub fn wal_options_for(&self, disk: &str) -> WalOptions {
        let engine = self.disks.iter().position(|d| d.name == disk).and_then(|at| self.engines.get(at)).cloned();
        WalOptions { engine, ..self.defaults.wal.clone() }
    }

    /// The active partition `id`.
    pub fn get(&self, id: u64) -> Option<Arc<Partition>> {
        match self.lock().by_id.get(&id).map(|slot| &slot.state) {
            Some(SlotState::Active(partition)) => Some(Arc::clone(partition)),
            _ => None,
        }
    }

    /// Every active partition, by id.
    pub fn partitions(&self) -> Vec<Arc<Partition>> {
        self.lock()
            .by_id
            .values()
            .filter_map(|slot| match &slot.state {
                SlotState::Active(partition) => Some(Arc::clone(partition)),
                _ => None,
            })
            .collect()
    }

    /// Creates partition `id` on `disk`, durably, then registers it.
    /// Blocking.
    pub fn create(&self, id: u64, disk: &str) -> Result<Arc<Partition>, RegistryError> {
        let disk = self.disk(disk)?;
        let generation = {
            let mut slots = self.lock();
            if slots.by_id.contains_key(&id) {
                return Err(RegistryError::Exists(id));
            }
            let generation = slots.next();
            slots.by_id.insert(id, Slot { disk: disk.name.clone(), generation, state: SlotState::Creating });
            generation
        };
        // A new partition: faults of an earlier one with this id are moot.
        self.carried.lock().unwrap_or_else(PoisonError::into_inner).retain(|entry| entry.partition != id);
        let parent = disk.partitions_dir();
        let staging = parent.join(format!(".staging-{id}-{generation}"));
        let made = {
            let _layout = self.layout_lock(&disk.name);
            self.make_partition_dir(&parent, &staging, id)
        };
        if let Err(error) = made {
            self.lock().by_id.remove(&id);
            let _ = self.storage.remove_dir_all(&staging);
            return Err(error);
        }
        let partition = Arc::new(Partition::open(Arc::clone(&self.storage), self.options(id, disk)));
        if let Some(slot) = self.lock().by_id.get_mut(&id).filter(|slot| slot.generation == generation) {
            slot.state = SlotState::Active(Arc::clone(&partition));
        }
        tracing::info!(partition = id, disk = disk.name, "partition created");
        Ok(partition)
    }

    fn make_partition_dir(&self, parent: &Path, staging: &Path, id: u64) -> Result<(), RegistryError> {
        let storage = self.storage.as_ref();
        storage.create_dir_all(staging).map_err(|e| io("create", staging, e))?;
        let meta = staging.join(META_FILE);
        let file = storage.open(&meta, true).map_err(|e| io("create", &meta, e))?;
        file.write_all_and_sync(0, &[Bytes::from(format!("id={id}\n"))]).map_err(|(_, e)| io("write", &meta, e))?;
        storage.sync_dir(staging).map_err(|e| io("sync", staging, e))?;
        let live = parent.join(id.to_string());
        storage.rename(staging, &live).map_err(|e| io("rename", staging, e))?;
        storage.sync_dir(parent).map_err(|e| io("sync", parent, e))
    }

    /// The id in `dir/PARTITION`: `Ok(None)` when the file is missing or
    /// names no id, `Err` when it cannot be read.
    fn read_meta(&self, dir: &Path) -> std::io::Result<Option<u64>> {
        let text = crate::durable::read_small_file(self.storage.as_ref(), &dir.join(META_FILE), 256)?;
        Ok(text.as_deref().and_then(|text| text.lines().find_map(|line| line.strip_prefix("id="))).and_then(parse_id))
    }

    /// Deletes partition `id`: unregister, close, move aside, remove.
    /// Blocking.
    pub fn delete(&self, id: u64) -> Result<(), RegistryError> {
        let (partition, disk_name, generation) = {
            let mut slots = self.lock();
            let slot = slots.by_id.get_mut(&id).ok_or(RegistryError::NotFound(id))?;
            let SlotState::Active(partition) = &slot.state else { return Err(RegistryError::NotFound(id)) };
            let partition = Arc::clone(partition);
            slot.state = SlotState::Deleting;
            (partition, slot.disk.clone(), slot.generation)
        };
        let disk = self.disk(&disk_name)?.clone();
        partition.close();
        drop(partition);
        let parent = disk.partitions_dir();
        let live = parent.join(id.to_string());
        let aside = parent.join(format!(".deleting-{id}-{generation}"));
        let moved = {
            let _layout = self.layout_lock(&disk.name);
            self.storage
                .rename(&live, &aside)
                .map_err(|e| io("rename", &live, e))
                .and_then(|()| self.storage.sync_dir(&parent).map_err(|e| io("sync", &parent, e)))
        };
        if let Err(error) = moved {
            // Still in place: serve it again rather than lose track of it.
            let reopened = Arc::new(Partition::open(Arc::clone(&self.storage), self.options(id, &disk)));
            if let Some(slot) = self.lock().by_id.get_mut(&id) {
                slot.state = SlotState::Active(reopened);
            }
            return Err(error);
        }
        // A failure here leaves a `.deleting-` directory that the next
        // open finishes removing.
        if let Err(error) = self.storage.remove_dir_all(&aside).and_then(|()| self.storage.sync_dir(&parent)) {
            tracing::warn!(partition = id, %error, "removing a deleted partition's files failed; retried at next start");
        }
        self.lock().by_id.remove(&id);
        self.sync_fault_journal();
        tracing::info!(partition = id, disk = disk.name, "partition deleted");
        Ok(())
    }

    /// One verifier pass over every disk: entries the registry does not
    /// know, in any state, go to quarantine; a directory that holds a valid
    /// partition is never moved (invariant: metadata loss never deletes
    /// data), only reported, and adopted at the next start. Never deletes.
    ///
    /// Decisions are made under the registry lock, so a create or delete
    /// cannot change the answer in between, but the disk I/O (reading a
    /// `PARTITION` file, the rename and its syncs) runs outside it, under
    /// the disk's layout lock, which only create, delete and the verifier
    /// take: requests never wait for a slow or hung disk here.
    pub fn verify_once(&self) -> VerifyReport {
        let mut report = VerifyReport::default();
        for (disk, layout) in self.disks.iter().zip(&self.layout) {
            let _layout = layout.lock().unwrap_or_else(PoisonError::into_inner);
            let names = match self.storage.list_dir(&disk.partitions_dir()) {
                Ok(names) => names,
                Err(_) => {
                    report.unreadable_disks.push(disk.name.clone());
                    continue;
                }
            };
            let mut unadopted = 0;
            for name in names {
                let entry = parse_entry(&name);
                if self.recognised(disk, &entry) {
                    continue;
                }
                if let EntryName::Partition(id) = entry {
                    let path = disk.partitions_dir().join(&name);
                    // A valid partition (or one whose PARTITION file cannot be
                    // read) stays where it is, whoever put it there.
                    if !matches!(self.read_meta(&path), Ok(found) if found != Some(id)) {
                        unadopted += 1;
                        tracing::warn!(
                            disk = disk.name,
                            partition = id,
                            path = %path.display(),
                            "a partition directory the node does not serve: left in place, adopted at the next start \
                             (unless its id is served from another disk)"
                        );
                        report.unadopted.push(path);
                        continue;
                    }
                }
                match self.quarantine(disk, &name) {
                    Ok(path) => report.quarantined.push(path),
                    Err(error) => tracing::error!(disk = disk.name, name, %error, "cannot quarantine"),
                }
            }
            metrics::gauge!("datanode_unadopted_partitions", "disk" => disk.name.clone()).set(f64::from(unadopted));
        }
        report
    }

    /// Whether the registry knows this entry of `disk`'s `partitions/`.
    fn recognised(&self, disk: &DiskDir, entry: &EntryName) -> bool {
        let slots = self.lock();
        let known = |id: u64, generation: Option<u64>, creating: Option<bool>| {
            slots.by_id.get(&id).is_some_and(|slot| {
                slot.disk == disk.name
                    && generation.is_none_or(|g| g == slot.generation)
                    && creating.is_none_or(|c| c == matches!(slot.state, SlotState::Creating))
            })
        };
        match *entry {
            EntryName::Partition(id) => known(id, None, None),
            EntryName::Staging(id, generation) => known(id, Some(generation), Some(true)),
            EntryName::Deleting(id, generation) => {
                known(id, Some(generation), Some(false)) || !slots.by_id.contains_key(&id)
            }
            EntryName::Unknown => false,
        }
    }

    /// Moves `partitions/<name>` to `quarantine/<name>.<nanos>`.
    fn quarantine(&self, disk: &DiskDir, name: &str) -> Result<PathBuf, RegistryError> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let from = disk.partitions_dir().join(name);
        let to = disk.quarantine_dir().join(format!("{name}.{nanos}"));
        self.storage.rename(&from, &to).map_err(|e| io("quarantine", &from, e))?;
        self.storage.sync_dir(&disk.partitions_dir()).map_err(|e| io("sync", &disk.partitions_dir(), e))?;
        self.storage.sync_dir(&disk.quarantine_dir()).map_err(|e| io("sync", &disk.quarantine_dir(), e))?;
        tracing::warn!(disk = disk.name, from = %from.display(), to = %to.display(), "moved an unknown entry to quarantine");
        Ok(to)
    }

    /// Active partitions on disk `name`.
    fn partitions_on(&self, name: &str) -> Vec<Arc<Partition>> {
        self.lock()
            .by_id
            .values()
            .filter(|slot| slot.disk == name)
            .filter_map(|slot| match &slot.state {
                SlotState::Active(partition) => Some(Arc::clone(partition)),
                _ => None,
            })
            .collect()
    }

    /// One round of compaction by policy on disk `name`: every healthy
    /// partition that `policy` finds due is compacted, most garbage first,
    /// one at a time (so the disk's copy budget holds), until `keep_going`
    /// says stop. Blocking. Returns each partition compacted with its
    /// outcome.
    pub fn compact_disk(
        &self,
        name: &str,
        policy: &CompactionPolicy,
        keep_going: impl Fn() -> bool,
    ) -> Vec<(u64, crate::Result<CompactionReport>)> {
        let mut due: Vec<(u64, Arc<Partition>)> = self
            .partitions_on(name)
            .into_iter()
            .filter(|p| p.health().state() == State::Healthy)
            .map(|p| (p.garbage_bytes(), p))
            .filter(|(garbage, p)| policy.is_due(*garbage, p.stored_bytes()))
            .collect();
        due.sort_by_key(|(garbage, _)| std::cmp::Reverse(*garbage));
        let mut done = Vec::new();
        for (garbage, partition) in due {
            if !keep_going() {
                break;
            }
            tracing::info!(partition = partition.id(), disk = name, garbage, "compacting by policy");
            done.push((partition.id(), partition.compact_limited(policy.max_bytes_per_sec)));
        }
        done
    }

    /// Probes every disk once and applies the outcomes to their partitions
    /// (see [`crate::disk`]). Blocking, up to one probe timeout per disk.
    pub fn check_disks(&self) -> Vec<DiskStatus> {
        let statuses = self.disk_health.iter().map(|disk| disk.check(&self.partitions_on(disk.name()))).collect();
        self.sync_fault_journal();
        statuses
    }

    /// Every disk's status, as of its last probe.
    pub fn disk_statuses(&self) -> Vec<DiskStatus> {
        self.disk_health
            .iter()
            .map(|disk| disk.status(self.partitions_on(disk.name()).iter().map(|p| p.id()).collect()))
            .collect()
    }

    /// Closes every partition (drains and syncs their logs), then gives
    /// the fault journal a moment to reach the disks. Blocking.
    pub fn close(&self) {
        for partition in self.partitions() {
            partition.close();
        }
        self.sync_fault_journal();
        if !self.journal.flush(JOURNAL_FLUSH_AT_CLOSE) {
            tracing::warn!("the fault journal did not reach every disk before close");
        }
    }
}

impl Slots {
    fn next(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

fn io(op: &'static str, path: &Path, source: std::io::Error) -> RegistryError {
    RegistryError::Io { op, path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_order_alternates_between_disks() {
        let claim = |id: u64, disk: &str| Claimed {
            id,
            disk: DiskDir { name: disk.into(), path: PathBuf::from(disk) },
            unreadable: None,
        };
        let order = interleave(vec![
            vec![claim(1, "a"), claim(3, "a"), claim(5, "a")],
            vec![claim(2, "b")],
            vec![],
            vec![claim(4, "c"), claim(6, "c")],
        ]);
        assert_eq!(order.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 2, 4, 3, 6, 5]);
    }

    #[test]
    fn entry_names_parse_strictly() {
        assert_eq!(parse_entry("17"), EntryName::Partition(17));
        assert_eq!(parse_entry("0"), EntryName::Partition(0));
        assert_eq!(parse_entry(".staging-17-3"), EntryName::Staging(17, 3));
        assert_eq!(parse_entry(".deleting-17-3"), EntryName::Deleting(17, 3));
        for unknown in ["017", "17a", "", "-1", ".staging-17", ".staging-x-1", "lost+found"] {
            assert_eq!(parse_entry(unknown), EntryName::Unknown, "{unknown}");
        }
    }
}
