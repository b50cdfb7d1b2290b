//! A deterministic, fault-injecting, in-memory filesystem for tests.
//!
//! It keeps two copies of every file: what a reader sees now (the page
//! cache) and what is on stable storage (updated only by a successful
//! `sync_data`). Namespace changes (create, rename, remove) sit in a journal
//! until `sync_dir`, like on a journaling filesystem. [`SimStorage::crash_image`]
//! builds what a power cut would leave: synced bytes intact, each unsynced
//! 512-byte sector old, new or garbage at random, and a random prefix of the
//! unsynced namespace journal.
//!
//! Faults are injected per operation kind and path, by errno, optionally as
//! short writes, sticky (a dead disk) or at random from the seed. Operations
//! can be paused (a hung fsync) and resumed, or delayed.
//! [`SimStorage::crash_before_op`] cuts the power at a chosen operation
//! (inside a roll, a rename, a batch), keeping the image for the test while
//! the run goes on.

// A test double: its indexing is over its own in-memory state, and a
// panic here fails a test, never a node.
#![allow(clippy::indexing_slicing)]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use super::{Space, Storage, StorageFile, total_len};
use crate::error::IoOp;

const SECTOR: usize = 512;

/// One injected fault: the matching operation fails with `errno`.
#[derive(Debug, Clone)]
pub struct Fault {
    op: IoOp,
    errno: i32,
    path_contains: Option<String>,
    skip: u64,
    short_write: bool,
    sticky: bool,
}

impl Fault {
    /// The next `op` fails with `errno`.
    pub fn new(op: IoOp, errno: i32) -> Fault {
        Fault { op, errno, path_contains: None, skip: 0, short_write: false, sticky: false }
    }
    /// Only operations on paths containing `fragment` match.
    pub fn on_path(mut self, fragment: impl Into<String>) -> Fault {
        self.path_contains = Some(fragment.into());
        self
    }
    /// Let `n` matching operations succeed first.
    pub fn after(mut self, n: u64) -> Fault {
        self.skip = n;
        self
    }
    /// For writes: write a random prefix of the bytes before failing.
    pub fn short_write(mut self) -> Fault {
        self.short_write = true;
        self
    }
    /// Keep failing every matching operation once triggered (a dead disk).
    pub fn sticky(mut self) -> Fault {
        self.sticky = true;
        self
    }
}

/// A simulated filesystem; clones share the same state.
#[derive(Debug, Clone)]
pub struct SimStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    resumed: Condvar,
}

type FileId = u64;

#[derive(Debug, Clone)]
enum NsOp {
    Link(PathBuf, FileId),
    Rename(PathBuf, PathBuf),
    /// A directory rename: every name under the first path moves, at once.
    RenameDir(PathBuf, PathBuf),
    Remove(PathBuf),
}

#[derive(Debug, Default, Clone)]
struct FileData {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Byte range written since the last successful sync.
    dirty: Option<(usize, usize)>,
}

#[derive(Debug)]
struct State {
    rng: SimRng,
    files: HashMap<FileId, FileData>,
    names: BTreeMap<PathBuf, FileId>,
    durable_names: BTreeMap<PathBuf, FileId>,
    journal: Vec<NsOp>,
    next_id: FileId,
    faults: Vec<(Fault, u64, bool)>,
    random: Option<(f64, Vec<IoOp>, Vec<i32>)>,
    /// Paused operation kinds, each for every path or for paths containing
    /// a fragment.
    paused: Vec<(IoOp, Option<String>)>,
    /// Operations currently held by a pause.
    held: usize,
    /// Delayed operation kinds, each for every path or for paths containing
    /// a fragment.
    delays: Vec<(IoOp, Option<String>, Duration)>,
    injected: u64,
    space: Space,
    /// Operations entered so far.
    ops: u64,
    /// Take a crash image as the operation with this number starts.
    crash_at: Option<u64>,
    /// The image taken there.
    crashed: Option<SimStorage>,
}

impl State {
    fn empty(seed: u64) -> State {
        State {
            rng: SimRng::new(seed),
            files: HashMap::new(),
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            journal: Vec::new(),
            next_id: 1,
            faults: Vec::new(),
            random: None,
            paused: Vec::new(),
            held: 0,
            delays: Vec::new(),
            injected: 0,
            space: Space { total: 1 << 40, free: 1 << 40 },
            ops: 0,
            crash_at: None,
            crashed: None,
        }
    }
}

impl SimStorage {
    /// An empty filesystem whose random choices follow `seed`.
    pub fn new(seed: u64) -> SimStorage {
        SimStorage::from_state(State::empty(seed))
    }

    fn from_state(state: State) -> SimStorage {
        SimStorage { inner: Arc::new(Inner { state: Mutex::new(state), resumed: Condvar::new() }) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a fault; faults are matched in the order added.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push((fault, 0, false));
    }

    /// Makes each operation of the kinds in `ops` fail with `probability`,
    /// with an errno picked from `errnos`, decided by the seed.
    pub fn inject_random(&self, probability: f64, ops: &[IoOp], errnos: &[i32]) {
        self.lock().random = Some((probability, ops.to_vec(), errnos.to_vec()));
    }

    /// Removes every fault, random faults included.
    pub fn clear_faults(&self) {
        let mut state = self.lock();
        state.faults.clear();
        state.random = None;
    }

    /// How many faults have fired so far.
    pub fn faults_injected(&self) -> u64 {
        self.lock().injected
    }

    /// Blocks every following operation of kind `op` until [`SimStorage::resume`].
    pub fn pause(&self, op: IoOp) {
        self.lock().paused.push((op, None));
    }

    /// Blocks following operations of kind `op` on paths containing
    /// `fragment` (a hung disk under one partition) until resumed.
    pub fn pause_on(&self, op: IoOp, fragment: impl Into<String>) {
        self.lock().paused.push((op, Some(fragment.into())));
    }

    /// Lets paused operations of kind `op` continue.
    pub fn resume(&self, op: IoOp) {
        self.lock().paused.retain(|(paused, _)| *paused != op);
        self.inner.resumed.notify_all();
    }

    /// Sets what [`Storage::space`] reports (a filling or emptying disk).
    pub fn set_space(&self, total: u64, free: u64) {
        self.lock().space = Space { total, free };
    }

    /// How many operations are blocked by a pause right now.
    pub fn held(&self) -> usize {
        self.lock().held
    }

    /// Sleeps `delay` in every operation of kind `op` (zero removes it).
    pub fn delay(&self, op: IoOp, delay: Duration) {
        self.set_delay(op, None, delay);
    }

    /// Sleeps `delay` in operations of kind `op` on paths containing
    /// `fragment` (a slow disk); zero removes it.
    pub fn delay_on(&self, op: IoOp, fragment: impl Into<String>, delay: Duration) {
        self.set_delay(op, Some(fragment.into()), delay);
    }

    fn set_delay(&self, op: IoOp, fragment: Option<String>, delay: Duration) {
        let mut state = self.lock();
        state.delays.retain(|(o, f, _)| !(*o == op && *f == fragment));
        if !delay.is_zero() {
            state.delays.push((op, fragment, delay));
        }
    }

    /// Overwrites bytes of a file in place, in the page cache and on stable
    /// storage alike: damage at rest (bit rot, a misdirected write).
    pub fn tamper(&self, path: &Path, offset: usize, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        let id = *state.names.get(path).ok_or_else(not_found)?;
        let file = state.files.entry(id).or_default();
        for copy in [&mut file.data, &mut file.durable] {
            if copy.len() < offset + bytes.len() {
                copy.resize(offset + bytes.len(), 0);
            }
            copy[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
        Ok(())
    }

    /// The current contents of a file (page-cache view), for test assertions.
    pub fn contents(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let id = state.names.get(path).ok_or_else(not_found)?;
        Ok(state.files.get(id).map(|f| f.data.clone()).unwrap_or_default())
    }

    /// What a power cut now would leave on disk, as a new filesystem with no
    /// faults. Synced data and synced names survive; everything else survives
    /// in part, not at all, or as garbage, chosen by the seed.
    pub fn crash_image(&self) -> SimStorage {
        image_of(&mut self.lock())
    }

    /// Arranges for a power cut in the middle of what runs next: just
    /// before the `n`-th following operation (1 for the very next) starts,
    /// a [`SimStorage::crash_image`] is taken and kept for
    /// [`SimStorage::take_crashed`]. Operations go on as if nothing
    /// happened. Counting every operation of every thread, it lands at a
    /// reproducible point of a single-threaded run.
    pub fn crash_before_op(&self, n: u64) {
        let mut state = self.lock();
        state.crash_at = Some(state.ops + n.max(1));
        state.crashed = None;
    }

    /// The image [`SimStorage::crash_before_op`] took, once it was taken.
    pub fn take_crashed(&self) -> Option<SimStorage> {
        self.lock().crashed.take()
    }

    /// Waits out pauses and delays, then decides whether `op` on `path`
    /// fails. Returns the errno and whether a write should be short.
    fn enter(&self, op: IoOp, path: &Path) -> (MutexGuard<'_, State>, Option<(i32, bool)>) {
        let path_text = path.to_string_lossy().into_owned();
        let is_paused = |state: &State| {
            state.paused.iter().any(|(paused, fragment)| {
                *paused == op && fragment.as_deref().is_none_or(|frag| path_text.contains(frag))
            })
        };
        let mut state = self.lock();
        state.ops += 1;
        if state.crash_at == Some(state.ops) {
            let image = image_of(&mut state);
            state.crashed = Some(image);
        }
        if is_paused(&state) {
            state.held += 1;
            while is_paused(&state) {
                state = self.inner.resumed.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            state.held -= 1;
        }
        let delay = state
            .delays
            .iter()
            .filter(|(o, fragment, _)| *o == op && fragment.as_deref().is_none_or(|f| path_text.contains(f)))
            .map(|(_, _, delay)| *delay)
            .max();
        if let Some(delay) = delay {
            drop(state);
            std::thread::sleep(delay);
            state = self.lock();
        }
        let mut verdict = None;
        for (fault, seen, fired) in state.faults.iter_mut() {
            let matches = fault.op == op && fault.path_contains.as_deref().is_none_or(|frag| path_text.contains(frag));
            if !matches || (*fired && !fault.sticky) {
                continue;
            }
            *seen += 1;
            if *seen > fault.skip {
                *fired = true;
                verdict = Some((fault.errno, fault.short_write));
                break;
            }
        }
        if verdict.is_none()
            && let Some((probability, ops, errnos)) = state.random.clone()
            && ops.contains(&op)
            && state.rng.chance(probability)
            && !errnos.is_empty()
        {
            let errno = errnos[state.rng.below(errnos.len() as u64) as usize];
            let short = state.rng.chance(0.5);
            verdict = Some((errno, short));
        }
        if verdict.is_some() {
            state.injected += 1;
        }
        (state, verdict)
    }

    fn file_of(state: &mut State, id: FileId) -> &mut FileData {
        state.files.entry(id).or_default()
    }
}

/// What a power cut now would leave of `state`; see [`SimStorage::crash_image`].
fn image_of(state: &mut State) -> SimStorage {
    let seed = state.rng.next_u64();
    let mut rng = SimRng::new(seed);
    let kept_ops = rng.below(state.journal.len() as u64 + 1) as usize;
    let mut names = state.durable_names.clone();
    for op in &state.journal[..kept_ops] {
        apply(&mut names, op);
    }
    let mut files = HashMap::new();
    for id in names.values() {
        if files.contains_key(id) {
            continue;
        }
        let file = state.files.get(id).cloned().unwrap_or_default();
        let image = crashed_contents(&file, &mut rng);
        files.insert(*id, FileData { data: image.clone(), durable: image, dirty: None });
    }
    SimStorage::from_state(State {
        files,
        durable_names: names.clone(),
        names,
        next_id: state.next_id,
        ..State::empty(seed ^ 0x9e37_79b9_7f4a_7c15)
    })
}

fn not_found() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

fn apply(names: &mut BTreeMap<PathBuf, FileId>, op: &NsOp) {
    match op {
        NsOp::Link(path, id) => {
            names.insert(path.clone(), *id);
        }
        NsOp::Rename(from, to) => {
            if let Some(id) = names.remove(from) {
                names.insert(to.clone(), id);
            }
        }
        NsOp::RenameDir(from, to) => {
            let moved: Vec<(PathBuf, FileId)> = names
                .iter()
                .filter_map(|(path, id)| path.strip_prefix(from).ok().map(|rest| (to.join(rest), *id)))
                .collect();
            names.retain(|path, _| !path.starts_with(from));
            names.extend(moved);
        }
        NsOp::Remove(path) => {
            names.remove(path);
        }
    }
}

/// Whether any name lies below `dir` (directories exist only through the
/// files in them).
fn has_entries_below(names: &BTreeMap<PathBuf, FileId>, dir: &Path) -> bool {
    names.keys().any(|path| path != dir && path.starts_with(dir))
}

fn crashed_contents(file: &FileData, rng: &mut SimRng) -> Vec<u8> {
    let Some((lo, hi)) = file.dirty else {
        return file.durable.clone();
    };
    let len =
        if file.data.len() != file.durable.len() && rng.chance(0.5) { file.data.len() } else { file.durable.len() };
    let mut out = file.durable.clone();
    out.resize(len, 0);
    let first_sector = lo / SECTOR;
    let end = hi.min(len);
    let mut sector = first_sector;
    while sector * SECTOR < end {
        // Only bytes written since the last sync can change; synced bytes
        // that share a sector with them stay (devices write sectors atomically).
        let range = (sector * SECTOR).max(lo)..((sector + 1) * SECTOR).min(end);
        match rng.below(8) {
            // Most sectors are either written or not; a few come back as junk.
            0..=3 => {
                let new = file.data.get(range.clone()).unwrap_or_default();
                out[range.start..range.start + new.len()].copy_from_slice(new);
            }
            4..=6 => {}
            _ => {
                for byte in &mut out[range] {
                    *byte = rng.next_u64() as u8;
                }
            }
        }
        sector += 1;
    }
    out
}

impl Storage for SimStorage {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        // Directories are implicit: a file's parent exists once named.
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let (state, fault) = self.enter(IoOp::Metadata, dir);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        // Direct children: files, and directories implied by deeper names.
        let children: std::collections::BTreeSet<String> = state
            .names
            .keys()
            .filter_map(|path| path.strip_prefix(dir).ok())
            .filter_map(|rest| rest.components().next())
            .map(|first| first.as_os_str().to_string_lossy().into_owned())
            .collect();
        Ok(children.into_iter().collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let (mut state, fault) = self.enter(IoOp::Open, path);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let id = match state.names.get(path) {
            Some(id) => *id,
            None if create => {
                let id = state.next_id;
                state.next_id += 1;
                state.files.insert(id, FileData::default());
                state.names.insert(path.to_path_buf(), id);
                state.journal.push(NsOp::Link(path.to_path_buf(), id));
                id
            }
            None => return Err(not_found()),
        };
        Ok(Arc::new(SimFile { storage: self.clone(), id, path: path.to_path_buf() }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (mut state, fault) = self.enter(IoOp::Metadata, from);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let op = if state.names.contains_key(from) {
            NsOp::Rename(from.to_path_buf(), to.to_path_buf())
        } else if has_entries_below(&state.names, from) {
            if has_entries_below(&state.names, to) {
                return Err(io::Error::from_raw_os_error(libc::ENOTEMPTY));
            }
            NsOp::RenameDir(from.to_path_buf(), to.to_path_buf())
        } else {
            return Err(not_found());
        };
        apply(&mut state.names, &op);
        state.journal.push(op);
        Ok(())
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        let (mut state, fault) = self.enter(IoOp::Metadata, dir);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let doomed: Vec<PathBuf> = state.names.keys().filter(|path| path.starts_with(dir)).cloned().collect();
        for path in doomed {
            state.names.remove(&path);
            state.journal.push(NsOp::Remove(path));
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let (mut state, fault) = self.enter(IoOp::Metadata, path);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        state.names.remove(path).ok_or_else(not_found)?;
        state.journal.push(NsOp::Remove(path.to_path_buf()));
        Ok(())
    }

    fn space(&self, path: &Path) -> io::Result<Space> {
        let (state, fault) = self.enter(IoOp::Metadata, path);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(state.space)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let (mut state, fault) = self.enter(IoOp::SyncDir, dir);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        // Journaling filesystems commit namespace changes in order, so a
        // directory fsync makes every earlier change durable.
        let journal = std::mem::take(&mut state.journal);
        for op in &journal {
            apply(&mut state.durable_names, op);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct SimFile {
    storage: SimStorage,
    id: FileId,
    path: PathBuf,
}

impl StorageFile for SimFile {
    fn write_all_at(&self, offset: u64, bufs: &[Bytes]) -> io::Result<()> {
        let (mut state, fault) = self.storage.enter(IoOp::Write, &self.path);
        let total = total_len(bufs);
        let keep = match fault {
            Some((_, true)) => state.rng.below(total as u64 + 1) as usize,
            Some((_, false)) => 0,
            None => total,
        };
        let offset = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file = SimStorage::file_of(&mut state, self.id);
        let mut at = offset;
        let mut left = keep;
        for buf in bufs {
            let piece = &buf[..buf.len().min(left)];
            if file.data.len() < at + piece.len() {
                file.data.resize(at + piece.len(), 0);
            }
            file.data[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
            left -= piece.len();
        }
        if keep > 0 {
            let (lo, hi) = file.dirty.unwrap_or((offset, offset + keep));
            file.dirty = Some((lo.min(offset), hi.max(offset + keep)));
        }
        match fault {
            Some((errno, _)) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn read_exact_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let (mut state, fault) = self.storage.enter(IoOp::Read, &self.path);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let file = SimStorage::file_of(&mut state, self.id);
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        file.data
            .get(start..start.saturating_add(len))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))
    }

    fn sync_data(&self) -> io::Result<()> {
        let (mut state, fault) = self.storage.enter(IoOp::Sync, &self.path);
        if let Some((errno, _)) = fault {
            // fsyncgate, as Linux does it: writeback of the dirty pages was
            // attempted (each sector may or may not have reached the disk),
            // then the pages are marked clean. Reads still see the new
            // bytes; no later sync writes them again.
            let State { files, rng, .. } = &mut *state;
            if let Some(file) = files.get_mut(&self.id) {
                let reached = crashed_contents(file, rng);
                file.durable = reached;
                file.dirty = None;
            }
            return Err(io::Error::from_raw_os_error(errno));
        }
        let file = SimStorage::file_of(&mut state, self.id);
        if let Some((lo, hi)) = file.dirty.take() {
            let new_len = file.data.len();
            file.durable.resize(new_len, 0);
            let hi = hi.min(new_len);
            if lo < hi {
                file.durable[lo..hi].copy_from_slice(&file.data[lo..hi]);
            }
        }
        Ok(())
    }

    fn drop_cache(&self) -> io::Result<()> {
        let (mut state, fault) = self.storage.enter(IoOp::Metadata, &self.path);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        // Clean pages are dropped and re-read from the disk; dirty ones
        // stay.
        // The file keeps its in-memory length.
        let file = SimStorage::file_of(&mut state, self.id);
        let mut fresh = file.durable.clone();
        fresh.resize(file.data.len(), 0);
        if let Some((lo, hi)) = file.dirty {
            let hi = hi.min(file.data.len());
            if lo < hi {
                fresh[lo..hi].copy_from_slice(&file.data[lo..hi]);
            }
        }
        file.data = fresh;
        Ok(())
    }

    fn file_len(&self) -> io::Result<u64> {
        let (mut state, fault) = self.storage.enter(IoOp::Metadata, &self.path);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(SimStorage::file_of(&mut state, self.id).data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let (mut state, fault) = self.storage.enter(IoOp::Metadata, &self.path);
        if let Some((errno, _)) = fault {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let file = SimStorage::file_of(&mut state, self.id);
        let old = file.data.len();
        file.data.resize(len, 0);
        let (lo, hi) = file.dirty.unwrap_or((old.min(len), old.max(len)));
        file.dirty = Some((lo.min(old.min(len)), hi.max(old.max(len))));
        Ok(())
    }
}

/// SplitMix64: a tiny, good-enough deterministic generator, shared by the
/// simulator and the tests that drive it.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator whose sequence follows `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 { 0 } else { self.next_u64() % bound }
    }

    /// True with the given probability.
    pub fn chance(&mut self, probability: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < probability
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(storage: &SimStorage, path: &Path, offset: u64, bytes: &[u8]) -> Arc<dyn StorageFile> {
        let file = storage.open(path, true).unwrap();
        file.write_all_at(offset, &[Bytes::copy_from_slice(bytes)]).unwrap();
        file
    }

    #[test]
    fn synced_bytes_survive_every_crash() {
        for seed in 0..200 {
            let sim = SimStorage::new(seed);
            let path = Path::new("/d/f");
            let file = write(&sim, path, 0, &[1u8; 3000]);
            file.sync_data().unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            file.write_all_at(3000, &[Bytes::from(vec![2u8; 3000])]).unwrap();
            let image = sim.crash_image().contents(path).unwrap();
            assert!(image.len() >= 3000 && image[..3000].iter().all(|b| *b == 1), "seed {seed}");
        }
    }

    #[test]
    fn unsynced_bytes_are_sometimes_lost_and_sometimes_garbage() {
        let (mut lost, mut kept, mut junk) = (false, false, false);
        for seed in 0..200 {
            let sim = SimStorage::new(seed);
            let path = Path::new("/d/f");
            let file = write(&sim, path, 0, &[]);
            file.sync_data().unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            file.write_all_at(0, &[Bytes::from(vec![9u8; 512])]).unwrap();
            let image = sim.crash_image().contents(path).unwrap();
            match image.first() {
                None | Some(0) => lost = true,
                Some(9) if image.iter().all(|b| *b == 9) => kept = true,
                Some(_) => junk = true,
            }
        }
        assert!(lost && kept && junk, "lost {lost} kept {kept} junk {junk}");
    }

    #[test]
    fn unsynced_create_can_vanish_but_synced_one_cannot() {
        let mut vanished = false;
        for seed in 0..100 {
            let sim = SimStorage::new(seed);
            write(&sim, Path::new("/d/a"), 0, b"a").sync_data().unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            write(&sim, Path::new("/d/b"), 0, b"b").sync_data().unwrap();
            let image = sim.crash_image();
            assert_eq!(image.contents(Path::new("/d/a")).unwrap(), b"a");
            vanished |= image.contents(Path::new("/d/b")).is_err();
        }
        assert!(vanished);
    }

    #[test]
    fn after_a_failed_sync_reads_lie_until_the_cache_is_dropped() {
        let mut lied = false;
        for seed in 0..50 {
            let sim = SimStorage::new(seed);
            let path = Path::new("/d/f");
            let file = write(&sim, path, 0, &[1u8; 4096]);
            sim.sync_dir(Path::new("/d")).unwrap();
            sim.inject(Fault::new(IoOp::Sync, libc::EIO));
            assert!(file.sync_data().is_err());
            assert_eq!(file.read_exact_at(0, 4096).unwrap(), vec![1u8; 4096], "the cache shows the new bytes");
            // A second sync "succeeds" without writing them (they are clean).
            file.sync_data().unwrap();
            file.drop_cache().unwrap();
            let on_disk = sim.crash_image().contents(path).unwrap();
            let read = file.read_exact_at(0, on_disk.len()).unwrap_or_default();
            assert_eq!(read, on_disk, "seed {seed}: after dropping the cache, reads show the disk");
            lied |= on_disk != vec![1u8; 4096];
        }
        assert!(lied, "some failed syncs must lose bytes");
    }

    #[test]
    fn a_later_sync_never_writes_what_a_failed_sync_dropped() {
        let sim = SimStorage::new(3);
        let path = Path::new("/d/f");
        let file = write(&sim, path, 0, &[7u8; 2048]);
        sim.sync_dir(Path::new("/d")).unwrap();
        sim.inject(Fault::new(IoOp::Sync, libc::EIO));
        assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        let after_failure = sim.crash_image().contents(path).unwrap();
        file.sync_data().unwrap();
        assert_eq!(sim.crash_image().contents(path).unwrap(), after_failure);
    }

    #[test]
    fn a_power_cut_lands_before_the_chosen_operation() {
        let mut lost = false;
        for seed in 0..50 {
            let sim = SimStorage::new(seed);
            let path = Path::new("/d/f");
            let file = write(&sim, path, 0, &[1u8; 1024]);
            file.sync_data().unwrap();
            sim.sync_dir(Path::new("/d")).unwrap();
            // The write is operation 1, its sync operation 2: the cut comes
            // between them.
            sim.crash_before_op(2);
            file.write_all_at(1024, &[Bytes::from(vec![2u8; 1024])]).unwrap();
            assert!(sim.take_crashed().is_none(), "seed {seed}: taken too early");
            file.sync_data().unwrap();
            let image = sim.take_crashed().unwrap().contents(path).unwrap();
            assert_eq!(&image[..1024], &[1u8; 1024][..], "seed {seed}");
            lost |= image.len() < 2048 || image[1024..] != [2u8; 1024][..];
            assert!(sim.take_crashed().is_none(), "one cut per arming");
        }
        assert!(lost, "bytes unsynced at the cut must sometimes be lost");
    }

    #[test]
    fn faults_match_by_op_path_and_count() {
        let sim = SimStorage::new(4);
        sim.inject(Fault::new(IoOp::Write, libc::EIO).on_path("b").after(1));
        let a = write(&sim, Path::new("/d/a"), 0, b"1");
        a.write_all_at(1, &[Bytes::from_static(b"2")]).unwrap();
        let b = write(&sim, Path::new("/d/b"), 0, b"1");
        let error = b.write_all_at(1, &[Bytes::from_static(b"2")]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EIO));
        b.write_all_at(1, &[Bytes::from_static(b"3")]).unwrap();
        assert_eq!(sim.faults_injected(), 1);
    }

    #[test]
    fn sticky_fault_keeps_failing() {
        let sim = SimStorage::new(5);
        sim.inject(Fault::new(IoOp::Sync, libc::EROFS).sticky());
        let file = write(&sim, Path::new("/d/a"), 0, b"1");
        for _ in 0..3 {
            assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(libc::EROFS));
        }
    }

    #[test]
    fn paused_operation_waits_for_resume() {
        let sim = SimStorage::new(6);
        let file = write(&sim, Path::new("/d/a"), 0, b"1");
        sim.pause(IoOp::Sync);
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || tx.send(file.sync_data().is_ok()).unwrap());
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "sync ran while paused");
        sim.resume(IoOp::Sync);
        assert!(rx.recv().unwrap());
        handle.join().unwrap();
    }
}
