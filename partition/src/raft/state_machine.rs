//! The replica's state machine: the blob store of a replicated partition,
//! in which a put is written once. Its value stays in the Raft log's WAL
//! record; applying it only indexes it (key -> record position and value
//! offset). Snapshots move the live values out of the log into a snapshot
//! store, so that the log can be purged.
//!
//! - **Apply** takes the committed entries openraft hands it, in order:
//!   a put indexes its record, a delete forgets the key, a membership is
//!   kept, a blank does nothing; each sets the applied log id. Nothing is
//!   written to disk: the log is the durable copy, and a restart applies
//!   it again from the last snapshot.
//! - **Build** copies every live blob of a view taken when the builder was
//!   made (applies go on meanwhile) into a new snapshot store, syncs it,
//!   replaces `SNAPSHOT`, and only then re-points the index entries that
//!   still point where the view saw them (a key changed since keeps its
//!   newer location), and removes the previous store. From then on the
//!   log up to the snapshot's last entry holds no value the index needs.
//! - **Install** verifies a whole image while writing it as a new store,
//!   syncs it, replaces `SNAPSHOT`, then swaps the index whole under one
//!   lock: readers see the old contents or the new, never a mix.
//! - **Open** loads the store `SNAPSHOT` names into the index; the applied
//!   state is the snapshot's, and openraft applies the log after it.
//!
//! Builds and installs run one at a time; reads take `&self` and run
//! concurrently with apply, builds and installs.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::{fmt, io};

use bytes::Bytes;
use datanode_wal::format::MAX_RECORD_LEN;
use datanode_wal::{Storage, Wal, WalOptions};
use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};

use super::codec::ENTRY_HEADER_LEN;
use super::error::StoreError;
use super::log_store::{LogReader, LogStore, blocking};
use super::snapshot::{RECEIVE_PREFIX, SnapshotImage, StoreWriter, load_store, open_store, read_image, remove_dir};
use super::snapshot_meta::{
    SNAPSHOT_FILE, SnapshotFile, SnapshotMeta, StoredMembership, store_dir_name, store_generation,
};
use super::types::{Entry, LogId, TypeConfig, lsn_of};
use crate::blob::{self, BlobOp};
use crate::index::{self, BlobLoc, Index, Key, LOG_STORE};

/// openraft's snapshot of this state machine.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotImage>;

/// Index entries re-pointed per write-lock hold after a build.
const RELOCATE_BATCH: usize = 1024;
/// Reads that find their blob moved by a snapshot (and its old place
/// purged) look it up again this many times.
const MOVED_READ_RETRIES: usize = 3;

/// Opens a replica in `dir`: its log store and its state machine, which
/// reads values from that log. Blocking: recovers the log and loads the
/// current snapshot store into the index.
///
/// `options` are the WAL's (sync durability, see [`LogStore::open`]); the
/// snapshot stores take them with bulk durability. `options.log_id` is
/// the partition id that snapshot images carry. A damaged `SNAPSHOT` or
/// snapshot store, or a log purged beyond the snapshot, is an error that
/// names the file, never a reset.
pub fn open_replica(
    storage: Arc<dyn Storage>,
    dir: impl Into<PathBuf>,
    options: WalOptions,
) -> Result<(LogStore, BlobStateMachine), StoreError> {
    let dir = dir.into();
    let log = LogStore::open(Arc::clone(&storage), dir.clone(), options.clone())?;
    let state_machine = BlobStateMachine::open(storage, dir, options, log.reader())?;
    Ok((log, state_machine))
}

/// The state machine of a replica (see the module docs). Clones share
/// state.
#[derive(Clone)]
pub struct BlobStateMachine {
    shared: Arc<Shared>,
}

struct Shared {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// Template of the snapshot stores' options.
    options: WalOptions,
    /// The partition id images carry.
    partition: u64,
    log: LogReader,
    state: RwLock<State>,
    /// Held by a build or an install from start to end.
    snapshots: Mutex<()>,
    spools: AtomicU64,
}

struct State {
    index: Index,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// Snapshot stores by generation: the current one, and its
    /// predecessor while entries are re-pointed away from it.
    stores: std::collections::BTreeMap<u32, Arc<Wal>>,
    current: Option<SnapshotFile>,
    next_generation: u32,
    /// Counts finished builds and installs: a view older than the last one
    /// may name stores that are gone.
    epoch: u64,
}

/// What [`BlobStateMachine::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Live keys.
    pub keys: u64,
    /// Bytes of their values.
    pub live_bytes: u64,
    /// The last applied log id.
    pub applied: Option<LogId>,
}

impl fmt::Debug for BlobStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.read();
        f.debug_struct("BlobStateMachine")
            .field("dir", &self.shared.dir)
            .field("applied", &state.applied)
            .field("keys", &state.index.blobs)
            .finish_non_exhaustive()
    }
}

impl BlobStateMachine {
    fn open(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        options: WalOptions,
        log: LogReader,
    ) -> Result<BlobStateMachine, StoreError> {
        let current = SnapshotFile::load(storage.as_ref(), &dir)?;
        let covered = current.as_ref().and_then(|file| file.meta.last_log_id).map(|id| id.index);
        if let Some(purged) = log.purged()
            && covered.is_none_or(|covered| covered < purged.index)
        {
            // Purge only below a durable snapshot: values up to the purged
            // entry lived nowhere else.
            let detail = format!("the log is purged to index {}, beyond the snapshot ({covered:?})", purged.index);
            return Err(StoreError::BadSnapshot { path: dir.join(SNAPSHOT_FILE), detail });
        }
        let names =
            storage.list_dir(&dir).map_err(|source| StoreError::Io { op: "list", path: dir.clone(), source })?;
        let live = current.as_ref().map(|file| file.generation);
        let mut newest = live.unwrap_or(0);
        for name in &names {
            if let Some(generation) = store_generation(name) {
                newest = newest.max(generation);
                if Some(generation) != live {
                    // Superseded by `SNAPSHOT`, or never named by it (a
                    // build or install cut short).
                    remove_dir(storage.as_ref(), &dir.join(name))?;
                }
            } else if name.starts_with(RECEIVE_PREFIX) {
                // No image handle outlives the process.
                remove_file(storage.as_ref(), &dir.join(name))?;
            }
        }
        let mut state = State {
            index: Index::default(),
            applied: None,
            membership: StoredMembership::default(),
            stores: Default::default(),
            current: None,
            next_generation: newest.saturating_add(1),
            epoch: 0,
        };
        if let Some(file) = current {
            let store = open_store(&storage, &dir.join(store_dir_name(file.generation)), &options, file.synced)?;
            state.index = load_store(&store, file.generation)?;
            state.applied = file.meta.last_log_id;
            state.membership = file.meta.last_membership.clone();
            state.stores.insert(file.generation, Arc::new(store));
            state.current = Some(file);
        }
        let partition = options.log_id;
        let shared = Shared {
            storage,
            dir,
            options,
            partition,
            log,
            state: RwLock::new(state),
            snapshots: Mutex::new(()),
            spools: AtomicU64::new(0),
        };
        Ok(BlobStateMachine { shared: Arc::new(shared) })
    }

    /// The value under `key`, or its `range`; `None` when the key holds
    /// none. Blocking (one read of the log or the snapshot store, its
    /// checksum verified by the WAL and the key checked again).
    pub fn get(&self, key: &[u8], range: Option<Range<u64>>) -> Result<Option<Bytes>, StoreError> {
        let mut attempt = 0;
        loop {
            let Some((loc, store)) = self.shared.locate(key)? else { return Ok(None) };
            let len = loc.value_len();
            let range = range.clone().unwrap_or(0..len);
            if range.start > range.end || range.end > len {
                return Err(StoreError::BadRange { start: range.start, end: range.end, len });
            }
            match store.read(loc.pos) {
                Ok(record) => {
                    let value = value_in(&record, key, &loc)?;
                    return Ok(Some(value.slice(range.start as usize..range.end as usize)));
                }
                Err(datanode_wal::Error::LsnOutOfRange { .. })
                    if attempt < MOVED_READ_RETRIES && self.shared.moved(key, &loc) =>
                {
                    // A snapshot took the blob and the log was purged.
                    attempt += 1;
                }
                Err(error) => return Err(StoreError::Wal(error)),
            }
        }
    }

    /// The length of the value under `key`, if any (no disk access).
    pub fn len_of(&self, key: &[u8]) -> Option<u64> {
        match self.shared.read().index.entries.get(key) {
            Some(index::Entry::Live(loc)) => Some(loc.value_len()),
            _ => None,
        }
    }

    /// Up to `limit` keys starting with `prefix`, in order, after `after`
    /// when given; and the key to continue after when there are more.
    pub fn list(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> (Vec<Bytes>, Option<Bytes>) {
        self.shared.read().index.list(prefix, after, limit)
    }

    /// Live keys and bytes, and the applied log id.
    pub fn stats(&self) -> ReplicaStats {
        let state = self.shared.read();
        ReplicaStats { keys: state.index.blobs, live_bytes: state.index.live_bytes, applied: state.applied }
    }

    /// Takes a snapshot image sent by another replica: reads it from
    /// `image` into a spool file in the replica's directory, synced,
    /// verifying every entry, the trailer and the partition id on the way.
    /// Blocking. The result goes to `install_snapshot`; dropped instead,
    /// its file is removed.
    pub fn receive_snapshot(&self, image: impl io::Read) -> Result<SnapshotImage, StoreError> {
        let n = self.shared.spools.fetch_add(1, Ordering::Relaxed);
        let path = self.shared.dir.join(format!("{RECEIVE_PREFIX}{n}"));
        SnapshotImage::receive(&self.shared.storage, path, image, self.shared.partition, self.shared.max_value())
    }

    /// The replica's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

/// The bytes of `loc`'s value in `record` (read from its store), once the
/// record is checked to be the put of `key` that the index says it is.
fn value_in(record: &Bytes, key: &[u8], loc: &BlobLoc) -> Result<Bytes, StoreError> {
    // A record of the log is an entry: its blob record follows the header.
    let blob_start = if loc.store == LOG_STORE { ENTRY_HEADER_LEN } else { 0 };
    let bad = || StoreError::BadRecord { lsn: loc.pos.lsn, detail: "is not the put the index names".into() };
    let blob_record = record.get(blob_start..).map(|bytes| record.slice_ref(bytes)).ok_or_else(bad)?;
    match blob::decode(&blob_record) {
        Some(BlobOp::Put { key: stored, value_offset, .. })
            if stored == key && blob_start + value_offset == loc.value_offset as usize =>
        {
            Ok(blob_record.slice(value_offset..))
        }
        _ => Err(bad()),
    }
}

fn remove_file(storage: &dyn Storage, path: &Path) -> Result<(), StoreError> {
    match storage.remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io { op: "remove", path: path.into(), source }),
    }
}

/// The index as a build sees it, taken when the builder is made.
struct View {
    applied: Option<LogId>,
    membership: StoredMembership,
    entries: Vec<(Key, BlobLoc)>,
    stores: std::collections::BTreeMap<u32, Arc<Wal>>,
    epoch: u64,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Largest value an image may carry: what one WAL record can hold.
    fn max_value(&self) -> usize {
        self.options.max_queued_bytes.min(MAX_RECORD_LEN)
    }

    /// Where `key`'s value is, and the store to read it from.
    fn locate(&self, key: &[u8]) -> Result<Option<(BlobLoc, Arc<Wal>)>, StoreError> {
        let state = self.read();
        let Some(index::Entry::Live(loc)) = state.index.entries.get(key) else { return Ok(None) };
        let store = match loc.store {
            LOG_STORE => self.log.wal(),
            generation => Arc::clone(state.stores.get(&generation).ok_or_else(|| StoreError::BadSnapshot {
                path: self.dir.join(store_dir_name(generation)),
                detail: "the index points at a store that is not open".into(),
            })?),
        };
        Ok(Some((*loc, store)))
    }

    /// Whether `key` now lives somewhere other than `loc` (or nowhere).
    fn moved(&self, key: &[u8], loc: &BlobLoc) -> bool {
        !matches!(self.read().index.entries.get(key), Some(index::Entry::Live(now)) if now == loc)
    }

    fn apply(&self, entry: &Entry) -> Result<(), StoreError> {
        let mut state = self.write();
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(command) => {
                let lsn = lsn_of(entry.log_id.index).ok_or_else(|| StoreError::Refused("index overflows".into()))?;
                let bad = |detail: &str| StoreError::BadRecord { lsn, detail: detail.into() };
                match blob::decode(command.bytes()) {
                    Some(BlobOp::Put { key, value_offset, original_lsn: None }) => {
                        // Applied entries come from the log, so the command
                        // knows its record.
                        let pos = command.record().ok_or_else(|| bad("a put that was not read from the log"))?;
                        if pos.lsn != lsn || pos.len as usize != ENTRY_HEADER_LEN + command.bytes().len() {
                            return Err(bad("the put's record is not where its entry is"));
                        }
                        let value_offset = (ENTRY_HEADER_LEN + value_offset) as u32;
                        state
                            .index
                            .apply(&key, index::Entry::Live(BlobLoc { store: LOG_STORE, pos, value_offset, lsn }));
                    }
                    Some(BlobOp::Delete { key }) => state.index.remove(&key),
                    _ => return Err(bad("the command is not a blob put or delete")),
                }
            }
            EntryPayload::Membership(membership) => {
                state.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
            }
        }
        state.applied = Some(entry.log_id);
        Ok(())
    }

    fn view(&self) -> View {
        let state = self.read();
        View {
            applied: state.applied,
            membership: state.membership.clone(),
            entries: state.index.live().map(|(key, loc)| (key.clone(), *loc)).collect(),
            stores: state.stores.clone(),
            epoch: state.epoch,
        }
    }

    fn take_generation(&self) -> u32 {
        let mut state = self.write();
        let generation = state.next_generation;
        state.next_generation = generation.saturating_add(1);
        generation
    }

    fn current_snapshot(&self) -> Option<Snapshot> {
        let state = self.read();
        let file = state.current.as_ref()?;
        let store = state.stores.get(&file.generation)?;
        Some(Snapshot { meta: file.meta.clone(), snapshot: SnapshotImage::of_store(Arc::clone(store), self.partition) })
    }

    /// Builds a snapshot of `view` (see the module docs). Blocking.
    fn build(&self, view: View) -> Result<Snapshot, StoreError> {
        let _one_at_a_time = self.snapshots.lock().unwrap_or_else(PoisonError::into_inner);
        // A build or install finished since the view was taken may have
        // removed stores it names (and let the log be purged): look again.
        let view = if view.epoch == self.read().epoch { view } else { self.view() };
        let generation = self.take_generation();
        let path = self.dir.join(store_dir_name(generation));
        let written = self.copy_view(&view, &path, generation);
        let (placed, synced) = match written {
            Ok(written) => written,
            Err(error) => {
                let _ = remove_dir(self.storage.as_ref(), &path);
                return Err(error);
            }
        };
        let meta = SnapshotMeta { last_log_id: view.applied, last_membership: view.membership.clone() };
        let file = SnapshotFile { generation, synced, meta: meta.clone() };
        file.store(self.storage.as_ref(), &self.dir)?;
        // The replica's snapshot from here on, also after a crash: only now
        // may index entries leave the log for it.
        let store = Arc::new(open_store(&self.storage, &path, &self.options, synced)?);
        {
            let mut state = self.write();
            state.stores.insert(generation, Arc::clone(&store));
            state.current = Some(file);
            state.epoch += 1;
        }
        let moves: Vec<(&(Key, BlobLoc), BlobLoc)> = view.entries.iter().zip(placed).collect();
        for batch in moves.chunks(RELOCATE_BATCH) {
            let mut state = self.write();
            for ((key, old), new) in batch {
                state.index.relocate(key.as_bytes(), *old, *new);
            }
        }
        self.retire_stores_except(generation);
        tracing::info!(dir = %self.dir.display(), last = ?meta.last_log_id, blobs = view.entries.len(), "snapshot built");
        Ok(Snapshot { meta, snapshot: SnapshotImage::of_store(store, self.partition) })
    }

    /// Writes every blob of `view` into the new store at `path`.
    fn copy_view(&self, view: &View, path: &Path, generation: u32) -> Result<(Vec<BlobLoc>, u64), StoreError> {
        let mut writer = StoreWriter::create(&self.storage, path, generation, &self.options)?;
        let log = self.log.wal();
        for (key, loc) in &view.entries {
            let source = match loc.store {
                LOG_STORE => &log,
                generation => view.stores.get(&generation).ok_or_else(|| StoreError::BadSnapshot {
                    path: self.dir.join(store_dir_name(generation)),
                    detail: "the index points at a store that is not open".into(),
                })?,
            };
            let record = source.read(loc.pos).map_err(StoreError::Wal)?;
            writer.put(key.as_bytes(), loc.lsn, &value_in(&record, key.as_bytes(), loc)?)?;
        }
        writer.finish()
    }

    /// Installs `image` as the replica's contents, as of `meta` (see the
    /// module docs). Blocking.
    fn install(&self, meta: &SnapshotMeta, image: SnapshotImage) -> Result<(), StoreError> {
        let _one_at_a_time = self.snapshots.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let state = self.read();
            let current = state.current.as_ref().and_then(|file| state.stores.get(&file.generation));
            if let (Some(current), Some(store)) = (current, image.store())
                && Arc::ptr_eq(current, store)
                && state.applied >= meta.last_log_id
            {
                // The current snapshot (openraft hands it back at start-up):
                // the index already holds it and what was applied after it.
                return Ok(());
            }
        }
        let generation = self.take_generation();
        let path = self.dir.join(store_dir_name(generation));
        let lsn = match meta.last_log_id {
            Some(last) => lsn_of(last.index).ok_or_else(|| StoreError::Refused("index overflows".into()))?,
            None => 0,
        };
        let written = self.write_image(&image, &path, generation, lsn);
        let (keys, placed, synced) = match written {
            Ok(written) => written,
            Err(error) => {
                let _ = remove_dir(self.storage.as_ref(), &path);
                return Err(error);
            }
        };
        let file = SnapshotFile { generation, synced, meta: meta.clone() };
        file.store(self.storage.as_ref(), &self.dir)?;
        // The replica's contents from here on, also after a crash.
        let store = Arc::new(open_store(&self.storage, &path, &self.options, synced)?);
        let mut index = Index::default();
        for (key, loc) in keys.iter().zip(placed) {
            index.apply(key, index::Entry::Live(loc));
        }
        {
            let mut state = self.write();
            state.index = index;
            state.applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.stores.insert(generation, store);
            state.current = Some(file);
            state.epoch += 1;
        }
        self.retire_stores_except(generation);
        drop(image);
        tracing::info!(dir = %self.dir.display(), last = ?meta.last_log_id, blobs = keys.len(), "snapshot installed");
        Ok(())
    }

    /// Verifies `image` while writing it into the new store at `path`, each
    /// blob as first put at `lsn`.
    fn write_image(
        &self,
        image: &SnapshotImage,
        path: &Path,
        generation: u32,
        lsn: u64,
    ) -> Result<(Vec<Bytes>, Vec<BlobLoc>, u64), StoreError> {
        let mut writer = StoreWriter::create(&self.storage, path, generation, &self.options)?;
        let mut keys = Vec::new();
        read_image(image.image_reader(), self.partition, self.max_value(), |key, value| {
            keys.push(Bytes::copy_from_slice(key));
            writer.put(key, lsn, value)
        })?;
        let (placed, synced) = writer.finish()?;
        Ok((keys, placed, synced))
    }

    /// Drops every snapshot store but `keep` and removes their
    /// directories. A reader still holding one reads on (its files stay
    /// open), so this never fails a read.
    fn retire_stores_except(&self, keep: u32) {
        let retired: Vec<Arc<Wal>> = {
            let mut state = self.write();
            let old: Vec<u32> = state.stores.keys().copied().filter(|generation| *generation != keep).collect();
            old.iter().filter_map(|generation| state.stores.remove(generation)).collect()
        };
        for store in retired {
            if let Err(error) = store.stop() {
                tracing::warn!(%error, "a superseded snapshot store was poisoned");
            }
            if let Err(error) = remove_dir(self.storage.as_ref(), store.dir()) {
                // Superseded by the durable `SNAPSHOT`: the next open removes it.
                tracing::warn!(%error, "could not remove a superseded snapshot store");
            }
        }
        if let Err(error) = self.storage.sync_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %error, "could not sync the replica directory");
        }
    }
}

/// Builds a snapshot of the view taken when it was made.
pub struct BlobSnapshotBuilder {
    shared: Arc<Shared>,
    view: Option<View>,
}

impl fmt::Debug for BlobSnapshotBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobSnapshotBuilder").field("applied", &self.view.as_ref().map(|v| v.applied)).finish()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for BlobSnapshotBuilder {
    type SnapshotData = SnapshotImage;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let shared = Arc::clone(&self.shared);
        // A builder used again builds from the state as it is now.
        let view = self.view.take().unwrap_or_else(|| shared.view());
        Ok(blocking(move || shared.build(view)).await?)
    }
}

impl RaftStateMachine<TypeConfig> for BlobStateMachine {
    type SnapshotData = SnapshotImage;
    type SnapshotBuilder = BlobSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let state = self.shared.read();
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            self.shared.apply(&entry)?;
            if let Some(responder) = responder {
                responder.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> BlobSnapshotBuilder {
        BlobSnapshotBuilder { shared: Arc::clone(&self.shared), view: Some(self.shared.view()) }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotImage) -> Result<(), io::Error> {
        let (shared, meta) = (Arc::clone(&self.shared), meta.clone());
        Ok(blocking(move || shared.install(&meta, snapshot)).await?)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.shared.current_snapshot())
    }
}
