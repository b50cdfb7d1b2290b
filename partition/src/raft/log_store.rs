//! The Raft log of a replica, kept in its WAL: one record per entry, the
//! entry at index `i` at LSN `i + 1` ([`lsn_of`]), so an index names a
//! record and nothing is written twice.
//!
//! The durability contracts openraft states are met this way:
//!
//! - `append` hands the batch to the WAL with `append_then`; the flush
//!   callback runs in that closure, on the WAL's writer thread, after the
//!   `fdatasync` that covers the records (the log must use
//!   [`Durability::Sync`], checked at open). `append` returns once the WAL
//!   acknowledged the batch, so its entries are readable by then.
//! - `save_vote` replaces `RAFT` durably (temp, sync, rename, directory
//!   sync) before it returns.
//! - `save_committed` costs no sync: the id goes into `RAFT` with its next
//!   change and at [`LogStore::close`]; after a crash an older committed
//!   id is read back (see the method).
//! - `truncate_after` is `Wal::truncate_after` (later segments removed,
//!   the tail zeroed and synced): durable when it returns.
//! - `purge` records the purged log id in `RAFT` durably first, then
//!   removes the whole segments below it; entries up to the purged id are
//!   never returned, even those still in a segment. A purge beyond the
//!   last entry (a snapshot installed past the local log) starts a new,
//!   empty log directory whose first record gets the next index's LSN, and
//!   names it in `RAFT` in the same atomic replace that records the purge.
//!
//! Every write call takes `&mut self`, so writes are applied in the order
//! openraft issues them; readers ([`LogReader`]) share the live log, and
//! so does the state machine, which reads values from its records. An
//! entry read back carries its record's position in its command.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use datanode_wal::{Durability, Lsn, Record, Storage, Wal, WalOptions};
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::TypeConfigExt;
use openraft::{EntryPayload, OptionalSend};

use super::codec::{decode_entry, encode_entry};
use super::error::StoreError;
use super::meta::{LOG_DIR_PREFIX, RaftMeta, log_dir_name};
use super::types::{Entry, LogId, TypeConfig, Vote, index_of, lsn_of};

/// Payload bytes read from the WAL per step of a range read.
const READ_BATCH_BYTES: usize = 1 << 20;

/// The log store of one replica: its `RAFT` file and its live log
/// directory under one directory.
pub struct LogStore {
    inner: Arc<Inner>,
}

/// A reader of the log, for openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// Template of the options of every log directory opened.
    options: WalOptions,
    live: RwLock<Live>,
}

/// What readers and writers share; swapped whole when a log is restarted.
#[derive(Clone)]
struct Live {
    wal: Arc<Wal>,
    meta: RaftMeta,
    /// The last entry's id, or the purged id when no entry is left.
    last: Option<LogId>,
    /// The last committed id openraft saved; `meta.committed` is the one
    /// `RAFT` holds, written with the file's other changes.
    committed: Option<LogId>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.inner.live();
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .field("meta", &live.meta)
            .field("last", &live.last)
            .finish()
    }
}

impl LogReader {
    /// The live WAL: where the records the state machine indexed are read
    /// back. Replaced when the log is restarted.
    pub(crate) fn wal(&self) -> Arc<Wal> {
        self.inner.live().wal
    }

    /// The last purged log id, as `RAFT` records it.
    pub(crate) fn purged(&self) -> Option<LogId> {
        self.inner.live().meta.purged
    }
}

impl Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").field("dir", &self.inner.dir).finish()
    }
}

impl Inner {
    fn live(&self) -> Live {
        self.live.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn update(&self, change: impl FnOnce(&mut Live)) {
        change(&mut self.live.write().unwrap_or_else(PoisonError::into_inner));
    }

    /// Stores `meta` durably with the last saved committed id, on a
    /// blocking thread.
    async fn store_meta(&self, meta: &RaftMeta) -> Result<(), StoreError> {
        let committed = self.live().committed;
        let meta = RaftMeta { committed, ..meta.clone() };
        let (storage, dir) = (Arc::clone(&self.storage), self.dir.clone());
        blocking(move || meta.store(storage.as_ref(), &dir)).await?;
        self.update(|live| live.meta.committed = committed);
        Ok(())
    }

    /// Replaces the live log by a new, empty one whose first record gets
    /// `first_lsn`, recording `purged` (if given) in the same durable
    /// replace of `RAFT` that names the new log. The old directory is
    /// superseded from that rename on and removed after it.
    async fn restart_log(&self, first_lsn: Lsn, purged: Option<LogId>) -> Result<Live, StoreError> {
        let old = self.live();
        let generation = old.meta.log_generation + 1;
        let mut meta = old.meta.clone();
        meta.log_generation = generation;
        meta.log_start = first_lsn;
        meta.purged = purged.or(meta.purged);
        meta.committed = old.committed;
        let (storage, dir, options) = (Arc::clone(&self.storage), self.dir.clone(), self.options.clone());
        let stored = meta.clone();
        let wal = blocking(move || {
            let log_dir = dir.join(log_dir_name(generation));
            // No `RAFT` ever named this directory (a restart that did not
            // finish): nothing in it is part of the log.
            remove_dir(storage.as_ref(), &log_dir)?;
            let options = WalOptions { first_lsn, create_if_missing: true, known_durable_lsn: 0, ..options };
            let wal = Wal::open(Arc::clone(&storage), &log_dir, options)?;
            stored.store(storage.as_ref(), &dir)?;
            Ok(wal)
        })
        .await?;
        let live = Live { wal: Arc::new(wal), last: meta.purged, committed: meta.committed, meta };
        self.update(|current| *current = live.clone());
        tracing::info!(dir = %self.dir.display(), first_lsn, log = %live.meta.log_dir_name(), "raft log restarted");
        let (storage, dir, old_name) = (Arc::clone(&self.storage), self.dir.clone(), old.meta.log_dir_name());
        let old_wal = old.wal;
        let removed = blocking(move || {
            if let Err(error) = old_wal.stop() {
                tracing::warn!(%error, "superseded raft log was poisoned");
            }
            remove_dir(storage.as_ref(), &dir.join(&old_name))?;
            storage.sync_dir(&dir).map_err(|source| StoreError::Io { op: "sync_dir", path: dir.clone(), source })
        })
        .await;
        if let Err(error) = removed {
            // Superseded by the durable `RAFT`: the next open removes it.
            tracing::warn!(dir = %self.dir.display(), %error, "could not remove a superseded raft log");
        }
        Ok(live)
    }
}

impl LogStore {
    /// Opens the log store in `dir`, creating it when the directory holds
    /// neither `RAFT` nor a log. Blocking: reads `RAFT` and recovers the
    /// live log.
    ///
    /// `options` are those of the WAL (its `durability` must be
    /// [`Durability::Sync`]: the flush callback promises an `fdatasync`).
    /// A log directory without `RAFT` beside it is refused, never reset:
    /// the file that says what is live was lost.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: impl Into<PathBuf>,
        options: WalOptions,
    ) -> Result<LogStore, StoreError> {
        let dir = dir.into();
        if options.durability != Durability::Sync {
            return Err(StoreError::Refused("a raft log needs sync durability".into()));
        }
        storage.create_dir_all(&dir).map_err(|source| StoreError::Io {
            op: "create_dir",
            path: dir.clone(),
            source,
        })?;
        let names =
            storage.list_dir(&dir).map_err(|source| StoreError::Io { op: "list", path: dir.clone(), source })?;
        let log_dirs: Vec<&String> = names.iter().filter(|name| name.starts_with(LOG_DIR_PREFIX)).collect();
        let (meta, fresh) = match RaftMeta::load(storage.as_ref(), &dir)? {
            Some(meta) => (meta, false),
            None if log_dirs.is_empty() => {
                let meta = RaftMeta::default();
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    storage.sync_dir(parent).map_err(|source| StoreError::Io {
                        op: "sync_dir",
                        path: parent.into(),
                        source,
                    })?;
                }
                meta.store(storage.as_ref(), &dir)?;
                (meta, true)
            }
            None => {
                return Err(StoreError::BadMeta {
                    path: dir.join(super::meta::META_FILE),
                    detail: "missing beside a log directory".into(),
                });
            }
        };
        let live_name = meta.log_dir_name();
        let mut removed = false;
        for name in log_dirs.into_iter().filter(|name| **name != live_name) {
            // Older ones are superseded by `RAFT`; newer ones were never
            // named by it (a restart cut short) and hold nothing live.
            tracing::info!(dir = %dir.display(), log = %name, "removing a raft log that RAFT does not name");
            remove_dir(storage.as_ref(), &dir.join(name))?;
            removed = true;
        }
        if removed {
            storage.sync_dir(&dir).map_err(|source| StoreError::Io { op: "sync_dir", path: dir.clone(), source })?;
        }
        let wal_options = WalOptions { first_lsn: meta.log_start, create_if_missing: fresh, ..options.clone() };
        let wal = Wal::open(Arc::clone(&storage), dir.join(&live_name), wal_options)?;
        check_log_against_meta(&wal, &meta, &dir)?;
        let last = read_last(&wal, meta.purged)?;
        let live = Live { wal: Arc::new(wal), committed: meta.committed, meta, last };
        Ok(LogStore { inner: Arc::new(Inner { storage, dir, options, live: RwLock::new(live) }) })
    }

    /// The live WAL, for reading entries by position. Replaced when a
    /// purge goes beyond the last entry; never write to it directly.
    pub fn wal(&self) -> Arc<Wal> {
        self.inner.live().wal
    }

    /// A reader sharing this store's live log.
    pub(crate) fn reader(&self) -> LogReader {
        LogReader { inner: Arc::clone(&self.inner) }
    }

    /// The directory of the store.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops the live log (drains, syncs, joins its writer) and records
    /// the last committed id in `RAFT`, so that a restart applies the
    /// committed log at once. Blocking.
    pub fn close(self) -> Result<(), StoreError> {
        let live = self.inner.live();
        live.wal.stop()?;
        if live.committed != live.meta.committed {
            RaftMeta { committed: live.committed, ..live.meta }.store(self.inner.storage.as_ref(), &self.inner.dir)?;
        }
        Ok(())
    }
}

/// The purged id and the log's records must agree: nothing between them
/// may be missing.
fn check_log_against_meta(wal: &Wal, meta: &RaftMeta, dir: &Path) -> Result<(), StoreError> {
    let bad = |detail: String| StoreError::BadMeta { path: dir.join(super::meta::META_FILE), detail };
    let after_purged = match meta.purged {
        Some(purged) => lsn_of(purged.index).ok_or_else(|| bad("purged index overflows".into()))? + 1,
        None => 1,
    };
    if wal.last_lsn() + 1 < after_purged {
        return Err(bad(format!("the log ends at LSN {} before the purged LSN {}", wal.last_lsn(), after_purged - 1)));
    }
    if wal.first_lsn() <= wal.last_lsn() && wal.first_lsn() > after_purged.max(meta.log_start) {
        return Err(bad(format!(
            "the log starts at LSN {}, records after LSN {} are missing",
            wal.first_lsn(),
            after_purged - 1
        )));
    }
    Ok(())
}

/// The id of the last entry in `wal`, or `purged` when it holds none after
/// it. Blocking: reads one record.
fn read_last(wal: &Wal, purged: Option<LogId>) -> Result<Option<LogId>, StoreError> {
    let (first, last) = (wal.first_lsn(), wal.last_lsn());
    if last < first {
        return Ok(purged);
    }
    let record = wal.read_from(last, 0)?.into_iter().next();
    let record =
        record.ok_or_else(|| StoreError::BadRecord { lsn: last, detail: "the last record is missing".into() })?;
    let entry = decode_record(&record)?;
    Ok(match purged {
        Some(purged) if purged.index >= entry.log_id.index => Some(purged),
        _ => Some(entry.log_id),
    })
}

/// Decodes a record and checks that it is the entry its LSN names. A
/// command learns where its record is (the state machine indexes a put's
/// value there).
fn decode_record(record: &Record) -> Result<Entry, StoreError> {
    let mut entry = decode_entry(&record.data).map_err(|detail| StoreError::BadRecord { lsn: record.lsn, detail })?;
    if entry.log_id.index != index_of(record.lsn) {
        let detail = format!("holds the entry of index {}", entry.log_id.index);
        return Err(StoreError::BadRecord { lsn: record.lsn, detail });
    }
    if let EntryPayload::Normal(command) = &mut entry.payload {
        command.set_record(record.pos);
    }
    Ok(entry)
}

/// Reads entries `start..end` (all present in `wal`). Blocking.
fn read_range(wal: &Wal, start: u64, end: u64) -> Result<Vec<Entry>, StoreError> {
    let mut entries = Vec::new();
    let mut next = start;
    while next < end {
        let lsn = lsn_of(next).ok_or_else(|| StoreError::Refused("index overflows".into()))?;
        let records = wal.read_from(lsn, READ_BATCH_BYTES)?;
        if records.is_empty() {
            return Err(StoreError::BadRecord { lsn, detail: "no record where the log holds one".into() });
        }
        for record in records {
            if index_of(record.lsn) >= end {
                break;
            }
            entries.push(decode_record(&record)?);
            next = index_of(record.lsn) + 1;
        }
    }
    Ok(entries)
}

fn remove_dir(storage: &dyn Storage, dir: &Path) -> Result<(), StoreError> {
    match storage.remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io { op: "remove_dir", path: dir.into(), source }),
    }
}

/// Runs blocking storage work off the async workers (openraft's runtime
/// is tokio's).
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    TypeConfig::spawn_blocking(work).await.map_err(StoreError::Task)?
}

/// A WAL error as the `io::Error` a flush callback carries (the WAL's
/// error is not `Clone`; its errno and text are kept).
fn wal_error_to_io(error: &datanode_wal::Error) -> io::Error {
    let kind = error.errno().map_or(io::ErrorKind::Other, |errno| io::Error::from_raw_os_error(errno).kind());
    io::Error::new(kind, error.to_string())
}

fn first_index<RB: RangeBounds<u64>>(range: &RB) -> u64 {
    match range.start_bound() {
        Bound::Included(index) => *index,
        Bound::Excluded(index) => index.saturating_add(1),
        Bound::Unbounded => 0,
    }
}

fn end_index<RB: RangeBounds<u64>>(range: &RB) -> u64 {
    match range.end_bound() {
        Bound::Included(index) => index.saturating_add(1),
        Bound::Excluded(index) => *index,
        Bound::Unbounded => u64::MAX,
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let live = self.inner.live();
        let wal = live.wal;
        if wal.last_lsn() < wal.first_lsn() {
            return Ok(Vec::new());
        }
        // Entries up to the purged id are gone, even those whose segment
        // is still on disk.
        let after_purged = live.meta.purged.map_or(0, |purged| purged.index + 1);
        let start = first_index(&range).max(after_purged).max(index_of(wal.first_lsn()));
        let end = end_index(&range).min(index_of(wal.last_lsn()) + 1);
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(blocking(move || read_range(&wal, start, end)).await?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.inner.live().meta.vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let live = self.inner.live();
        Ok(LogState { last_purged_log_id: live.meta.purged, last_log_id: live.last })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader { inner: Arc::clone(&self.inner) }
    }

    /// Kept in memory and written to `RAFT` with its next change (a vote,
    /// a purge, a restarted log) and at [`LogStore::close`], never synced
    /// on its own: that would cost a `RAFT` replace (two syncs) per commit,
    /// i.e. per write. After a crash the id read back is an older one,
    /// which is still committed: openraft applies the log up to it at
    /// start-up and learns the rest from the leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.inner.update(|live| live.committed = committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.inner.live().committed)
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut meta = self.inner.live().meta;
        meta.vote = Some(*vote);
        self.inner.store_meta(&meta).await?;
        self.inner.update(|live| live.meta.vote = Some(*vote));
        Ok(())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let (Some(first), Some(last_new)) = (entries.first(), entries.last()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let (first_index, last_id) = (first.log_id.index, last_new.log_id);
        if entries.iter().zip(first_index..).any(|(entry, index)| entry.log_id.index != index) {
            return Err(StoreError::Refused("appended entries are not consecutive".into()).into());
        }
        let first_lsn = lsn_of(first_index).ok_or_else(|| StoreError::Refused("index overflows".into()))?;
        let live = self.inner.live();
        let next = live.last.map_or(0, |last| last.index + 1);
        let holds_entries = live.last.is_some() && live.last != live.meta.purged;
        let wal = if holds_entries {
            if first_index != next {
                let detail = format!("append at index {first_index} where the log continues at {next}");
                return Err(StoreError::Refused(detail).into());
            }
            live.wal
        } else if first_index < next {
            return Err(StoreError::Refused(format!("append at index {first_index}, at or below the purged id")).into());
        } else if live.wal.last_lsn() + 1 == first_lsn {
            live.wal
        } else {
            // An empty log asked to continue at another index: it starts
            // there, so that LSN and index stay one apart.
            self.inner.restart_log(first_lsn, None).await?.wal
        };
        let records: Vec<Bytes> = entries.iter().map(encode_entry).collect();
        // The callback runs on the WAL's writer thread after the fdatasync
        // that covers the batch (sync durability, checked at open), and
        // before anyone else hears of the append.
        let appended = wal
            .append_then(records, move |result| {
                callback.io_completed(result.as_ref().map(|_| ()).map_err(wal_error_to_io));
            })
            .await
            .map_err(StoreError::Wal)?;
        if appended.first_lsn != first_lsn {
            let detail = format!("entry {first_index} was written at LSN {}", appended.first_lsn);
            return Err(StoreError::BadRecord { lsn: appended.first_lsn, detail }.into());
        }
        self.inner.update(|live| live.last = Some(last_id));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let live = self.inner.live();
        let keep = last_log_id.map(|id| id.index);
        let Some(last) = live.last else { return Ok(()) };
        if keep.is_some_and(|keep| keep >= last.index) {
            return Ok(());
        }
        if let Some(purged) = live.meta.purged
            && keep.is_none_or(|keep| keep < purged.index)
        {
            let detail = format!("truncate after {keep:?}, below the purged index {}", purged.index);
            return Err(StoreError::Refused(detail).into());
        }
        let wal = live.wal;
        let keep_lsn = match keep {
            Some(keep) => lsn_of(keep).ok_or_else(|| StoreError::Refused("index overflows".into()))?,
            None => 0,
        };
        // Nothing below the log's first record can be kept or removed.
        let keep_lsn = keep_lsn.max(wal.first_lsn() - 1);
        if keep_lsn < wal.last_lsn() {
            wal.truncate_after(keep_lsn).await.map_err(StoreError::Wal)?;
        }
        let purged = live.meta.purged;
        let reader = Arc::clone(&wal);
        let last = blocking(move || read_last(&reader, purged)).await?;
        self.inner.update(|live| live.last = last);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let live = self.inner.live();
        if live.meta.purged.is_some_and(|purged| purged.index >= log_id.index) {
            return Ok(());
        }
        let lsn = lsn_of(log_id.index).ok_or_else(|| StoreError::Refused("index overflows".into()))?;
        if lsn > live.wal.last_lsn() {
            // Beyond the last entry (a snapshot installed past the local
            // log): the log continues after the purged id.
            self.inner.restart_log(lsn + 1, Some(log_id)).await?;
            return Ok(());
        }
        // Recorded before any segment goes, so no restart finds a log
        // that starts after a purge nothing recorded.
        let mut meta = live.meta;
        meta.purged = Some(log_id);
        self.inner.store_meta(&meta).await?;
        self.inner.update(|current| {
            current.meta.purged = Some(log_id);
            if current.last.is_none_or(|last| last.index <= log_id.index) {
                current.last = Some(log_id);
            }
        });
        let removed = live.wal.purge_before(lsn + 1).await.map_err(StoreError::Wal)?;
        tracing::debug!(dir = %self.inner.dir.display(), purged = %log_id, segments = removed, "raft log purged");
        Ok(())
    }
}
