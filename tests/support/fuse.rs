//! A FUSE passthrough of a directory, with rules that fail, delay or hang
//! reads, writes and syncs of chosen files and byte ranges.
//!
//! Two uses:
//! - **Under a loop image** ([`fuse_loop_disk`]): the directory holds one
//!   image file that a loop device sits on, so a filesystem (XFS, ext4)
//!   mounted from it meets these faults the way it meets a failing drive:
//!   a failed write is a write-back error the kernel reports at the next
//!   fsync (the fsyncgate case), a failed read is a latent sector error, a
//!   delay is a slow disk. A stalled block is a stalled *device*: every
//!   partition on that filesystem waits behind it.
//! - **As the disk itself** ([`FuseDir`]): the node's files live on the
//!   passthrough, so a rule can hang the fsync of one partition's files
//!   alone (a hung fsync in one partition).
//!
//! Files are opened `FOPEN_DIRECT_IO`, so every read and write reaches the
//! rules instead of FUSE's page cache. Requests are answered from the
//! session thread, except delayed and hung ones, which finish on a thread
//! of their own: a hung file holds up only the requests for it.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// Name of the image file inside an image mount.
pub const IMAGE: &str = "disk.img";
const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);

/// Which requests a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Sync,
}

/// What a matching request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fails with this errno.
    Fail(i32),
    /// Succeeds after this long.
    Delay(Duration),
    /// Waits until the rule is removed, then succeeds.
    Hang,
}

#[derive(Debug, Clone)]
struct Rule {
    id: u64,
    op: Op,
    /// A fragment of the file's path under the mount; `None`: any file.
    path: Option<String>,
    /// Byte range; a request matches when it overlaps (syncs match any).
    range: Range<u64>,
    action: Action,
}

/// The rules of one FUSE mount, shared with its session.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Arc<Mutex<Vec<Rule>>>,
    next: Arc<Mutex<u64>>,
    /// Requests that met a rule, to check that a fault was really hit.
    hits: Arc<Mutex<u64>>,
}

impl Rules {
    /// Adds a rule for every file; returns its id for [`Rules::remove`].
    pub fn add(&self, op: Op, range: Range<u64>, action: Action) -> u64 {
        self.push(op, None, range, action)
    }

    /// Adds a rule for files whose path under the mount contains `path`.
    pub fn add_on(&self, op: Op, path: &str, range: Range<u64>, action: Action) -> u64 {
        self.push(op, Some(path.to_string()), range, action)
    }

    fn push(&self, op: Op, path: Option<String>, range: Range<u64>, action: Action) -> u64 {
        let id = {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            *next
        };
        self.rules.lock().unwrap().push(Rule { id, op, path, range, action });
        id
    }

    /// Every byte of a file.
    pub fn everywhere() -> Range<u64> {
        0..u64::MAX
    }

    pub fn remove(&self, id: u64) {
        self.rules.lock().unwrap().retain(|rule| rule.id != id);
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    pub fn hits(&self) -> u64 {
        *self.hits.lock().unwrap()
    }

    fn matching(&self, op: Op, path: &Path, range: Range<u64>) -> Option<(u64, Action)> {
        let rules = self.rules.lock().unwrap();
        let path = path.to_string_lossy();
        let rule = rules.iter().find(|r| {
            r.op == op
                && r.path.as_deref().is_none_or(|fragment| path.contains(fragment))
                && r.range.start < range.end
                && range.start < r.range.end
        })?;
        *self.hits.lock().unwrap() += 1;
        Some((rule.id, rule.action))
    }

    /// A guard that clears every rule when dropped: declared after the
    /// node under test, it releases hung requests before the node is
    /// killed, also when the test fails.
    pub fn cleared_on_drop(&self) -> ClearOnDrop {
        ClearOnDrop(self.clone())
    }

    fn present(&self, id: u64) -> bool {
        self.rules.lock().unwrap().iter().any(|rule| rule.id == id)
    }
}

/// See [`Rules::cleared_on_drop`].
pub struct ClearOnDrop(Rules);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// A reply that is sent at most once, from whichever thread gets to it.
struct Once<R>(Arc<Mutex<Option<R>>>);

impl<R> Clone for Once<R> {
    fn clone(&self) -> Self {
        Once(Arc::clone(&self.0))
    }
}

impl<R> Once<R> {
    fn new(reply: R) -> Once<R> {
        Once(Arc::new(Mutex::new(Some(reply))))
    }

    /// Sends with `send` unless it was sent already.
    fn send(&self, send: impl FnOnce(R)) {
        if let Some(reply) = self.0.lock().unwrap().take() {
            send(reply);
        }
    }
}

fn errno(error: &std::io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

fn attr(ino: u64, meta: &Metadata) -> FileAttr {
    let time = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    let kind = if meta.is_dir() { FileType::Directory } else { FileType::RegularFile };
    FileAttr {
        ino,
        size: meta.len(),
        blocks: meta.blocks(),
        atime: time(meta.atime()),
        mtime: time(meta.mtime()),
        ctime: time(meta.ctime()),
        crtime: time(meta.ctime()),
        kind,
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Inode numbers for paths under the backing directory.
#[derive(Default)]
struct Inodes {
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next: u64,
}

impl Inodes {
    fn ino(&mut self, path: &Path) -> u64 {
        if let Some(&ino) = self.inos.get(path) {
            return ino;
        }
        self.next = self.next.max(ROOT) + 1;
        self.paths.insert(self.next, path.to_path_buf());
        self.inos.insert(path.to_path_buf(), self.next);
        self.next
    }

    fn forget(&mut self, path: &Path) {
        if let Some(ino) = self.inos.remove(path) {
            self.paths.remove(&ino);
        }
    }

    /// `from` and everything under it now live at `to`.
    fn rename(&mut self, from: &Path, to: &Path) {
        self.forget(to);
        let moved: Vec<(PathBuf, u64)> =
            self.inos.iter().filter(|(path, _)| path.starts_with(from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (old, ino) in moved {
            // `join("")` would append a separator: a renamed file would
            // then be opened as "name/" (ENOTDIR).
            let rest = old.strip_prefix(from).unwrap();
            let new = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
            self.inos.remove(&old);
            self.inos.insert(new.clone(), ino);
            self.paths.insert(ino, new);
        }
    }
}

struct Passthrough {
    backing: PathBuf,
    rules: Rules,
    inodes: Inodes,
    handles: HashMap<u64, (Arc<File>, PathBuf)>,
    next_fh: u64,
}

impl Passthrough {
    fn new(backing: &Path, rules: Rules) -> Passthrough {
        let mut inodes = Inodes::default();
        inodes.paths.insert(ROOT, PathBuf::new());
        inodes.inos.insert(PathBuf::new(), ROOT);
        Passthrough { backing: backing.to_path_buf(), rules, inodes, handles: HashMap::new(), next_fh: 0 }
    }

    fn relative(&self, ino: u64) -> Option<PathBuf> {
        self.inodes.paths.get(&ino).cloned()
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        Some(self.relative(parent)?.join(name))
    }

    fn real(&self, relative: &Path) -> PathBuf {
        self.backing.join(relative)
    }

    fn entry(&mut self, relative: &Path, reply: ReplyEntry) {
        match std::fs::symlink_metadata(self.real(relative)) {
            Ok(meta) => {
                let ino = self.inodes.ino(relative);
                reply.entry(&TTL, &attr(ino, &meta), 0);
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    /// `unlink` and `rmdir`: `remove` the real entry, then forget its inode.
    fn remove(
        &mut self,
        parent: u64,
        name: &OsStr,
        reply: ReplyEmpty,
        remove: impl FnOnce(&Path) -> std::io::Result<()>,
    ) {
        let Some(path) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        match remove(&self.real(&path)) {
            Ok(()) => {
                self.inodes.forget(&path);
                reply.ok();
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn handle(&mut self, file: File, relative: PathBuf) -> u64 {
        self.next_fh += 1;
        self.handles.insert(self.next_fh, (Arc::new(file), relative));
        self.next_fh
    }

    /// Runs `work` now, or on a thread of its own after the rule's delay
    /// or once a hung rule is gone.
    fn perform(
        &self,
        op: Op,
        path: &Path,
        range: Range<u64>,
        fail: impl FnOnce(i32),
        work: impl FnOnce() + Send + 'static,
    ) {
        match self.rules.matching(op, path, range) {
            None => work(),
            Some((_, Action::Fail(errno))) => fail(errno),
            Some((_, Action::Delay(delay))) => {
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    work();
                });
            }
            Some((id, Action::Hang)) => {
                let rules = self.rules.clone();
                std::thread::spawn(move || {
                    while rules.present(id) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    work();
                });
            }
        }
    }
}

impl Filesystem for Passthrough {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Some(path) => self.entry(&path, reply),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let Some(path) = self.relative(ino) else { return reply.error(libc::ENOENT) };
        match std::fs::symlink_metadata(self.real(&path)) {
            Ok(meta) => reply.attr(&TTL, &attr(ino, &meta)),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(path) = self.relative(ino) else { return reply.error(libc::ENOENT) };
        let real = self.real(&path);
        if let Some(size) = size {
            let truncated = std::fs::OpenOptions::new().write(true).open(&real).and_then(|f| f.set_len(size));
            if let Err(error) = truncated {
                return reply.error(errno(&error));
            }
        }
        match std::fs::symlink_metadata(&real) {
            Ok(meta) => reply.attr(&TTL, &attr(ino, &meta)),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let Some(path) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        match std::fs::DirBuilder::new().mode(mode).create(self.real(&path)) {
            Ok(()) => self.entry(&path, reply),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |path| std::fs::remove_file(path));
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |path| std::fs::remove_dir(path));
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname)) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::rename(self.real(&from), self.real(&to)) {
            Ok(()) => {
                self.inodes.rename(&from, &to);
                reply.ok();
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(path) = self.relative(ino) else { return reply.error(libc::ENOENT) };
        let access = flags & libc::O_ACCMODE;
        let opened = std::fs::OpenOptions::new()
            .read(access != libc::O_WRONLY)
            .write(access != libc::O_RDONLY)
            .open(self.real(&path));
        match opened {
            Ok(file) => {
                let fh = self.handle(file, path);
                reply.opened(fh, fuser::consts::FOPEN_DIRECT_IO);
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(path) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(flags & libc::O_TRUNC != 0)
            .mode(mode)
            .open(self.real(&path));
        match opened.and_then(|file| Ok((file.metadata()?, file))) {
            Ok((meta, file)) => {
                let ino = self.inodes.ino(&path);
                let fh = self.handle(file, path);
                reply.created(&TTL, &attr(ino, &meta), 0, fh, fuser::consts::FOPEN_DIRECT_IO);
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some((file, path)) = self.handles.get(&fh).cloned() else { return reply.error(libc::EBADF) };
        let offset = offset.max(0) as u64;
        let reply = Once::new(reply);
        let on_fail = reply.clone();
        self.perform(
            Op::Read,
            &path,
            offset..offset + u64::from(size),
            |errno| on_fail.send(|r| r.error(errno)),
            move || {
                let mut buf = vec![0; size as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read_at(&mut buf[filled..], offset + filled as u64) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(error) => return reply.send(|r| r.error(errno(&error))),
                    }
                }
                reply.send(|r| r.data(&buf[..filled]));
            },
        );
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some((file, path)) = self.handles.get(&fh).cloned() else { return reply.error(libc::EBADF) };
        let (offset, data) = (offset.max(0) as u64, data.to_vec());
        let reply = Once::new(reply);
        let on_fail = reply.clone();
        self.perform(
            Op::Write,
            &path,
            offset..offset + data.len() as u64,
            |errno| on_fail.send(|r| r.error(errno)),
            move || {
                let outcome = file.write_all_at(&data, offset);
                reply.send(|r| match outcome {
                    Ok(()) => r.written(data.len() as u32),
                    Err(error) => r.error(errno(&error)),
                });
            },
        );
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.remove(&fh);
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let Some((file, path)) = self.handles.get(&fh).cloned() else { return reply.error(libc::EBADF) };
        let reply = Once::new(reply);
        let on_fail = reply.clone();
        self.perform(
            Op::Sync,
            &path,
            Rules::everywhere(),
            |errno| on_fail.send(|r| r.error(errno)),
            move || {
                let outcome = file.sync_data();
                reply.send(|r| match outcome {
                    Ok(()) => r.ok(),
                    Err(error) => r.error(errno(&error)),
                });
            },
        );
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let Some(path) = self.relative(ino) else { return reply.error(libc::ENOENT) };
        match File::open(self.real(&path)).and_then(|dir| dir.sync_all()) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let Some(path) = self.relative(ino) else { return reply.error(libc::ENOENT) };
        let listing = match std::fs::read_dir(self.real(&path)) {
            Ok(listing) => listing,
            Err(error) => return reply.error(errno(&error)),
        };
        let mut entries = vec![(ino, FileType::Directory, ".".into()), (ino, FileType::Directory, "..".into())];
        for entry in listing.flatten() {
            let kind =
                if entry.file_type().is_ok_and(|t| t.is_dir()) { FileType::Directory } else { FileType::RegularFile };
            let child = self.inodes.ino(&path.join(entry.file_name()));
            entries.push((child, kind, entry.file_name()));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let Ok(path) = std::ffi::CString::new(self.backing.as_os_str().as_encoded_bytes()) else {
            return reply.error(libc::EINVAL);
        };
        // SAFETY: a plain C struct of integers; all zeros is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs fills the struct we own; the path is NUL-terminated.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return reply.error(errno(&std::io::Error::last_os_error()));
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }
}

/// A mounted FUSE passthrough of a directory. Unmounted on drop.
pub struct FuseDir {
    session: Option<fuser::BackgroundSession>,
    mount_point: PathBuf,
    pub rules: Rules,
    _dirs: Option<(tempfile::TempDir, tempfile::TempDir)>,
}

impl FuseDir {
    /// A fresh scratch directory served through FUSE: a disk for the node
    /// whose files' operations the rules can fail, delay or hang.
    pub fn new() -> FuseDir {
        let (backing, mount) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut dir = FuseDir::mount(backing.path(), mount.path());
        dir._dirs = Some((mount, backing));
        dir
    }

    /// Serves `backing` at `mount_point`.
    pub fn mount(backing: &Path, mount_point: &Path) -> FuseDir {
        let rules = Rules::default();
        let fs = Passthrough::new(backing, rules.clone());
        let options =
            [MountOption::FSName("datanode-test".into()), MountOption::AllowOther, MountOption::DefaultPermissions];
        let session = fuser::spawn_mount2(fs, mount_point, &options).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_fuse_mount(mount_point) {
            assert!(Instant::now() < deadline, "FUSE mount did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        FuseDir { session: Some(session), mount_point: mount_point.to_path_buf(), rules, _dirs: None }
    }

    pub fn path(&self) -> &Path {
        &self.mount_point
    }
}

fn is_fuse_mount(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|line| line.split(' ').nth(1) == Some(&*path.to_string_lossy()) && line.contains("fuse"))
}

impl Drop for FuseDir {
    fn drop(&mut self) {
        // Release anything hung first, or unmounting waits for it.
        self.rules.clear();
        drop(self.session.take());
    }
}

/// A loop disk whose image file is served through a FUSE passthrough, and
/// the rules that inject faults into it. The FUSE session outlives the
/// filesystem mounted on top of it.
pub fn fuse_loop_disk(fs: super::disks::Fs) -> (super::disks::LoopDisk, Rules) {
    let backing_dir = tempfile::tempdir().unwrap();
    let backing = backing_dir.path().join(IMAGE);
    std::fs::File::create(&backing).unwrap().set_len(super::disks::LoopDisk::image_bytes()).unwrap();
    let mount_dir = tempfile::tempdir().unwrap();
    let served = FuseDir::mount(backing_dir.path(), mount_dir.path());
    let (image, rules) = (served.path().join(IMAGE), served.rules.clone());
    // Dropped in order: the FUSE session, then its mount point, then the backing file.
    let keep: Box<dyn std::any::Any> = Box::new((served, mount_dir, backing_dir));
    let disk = super::disks::LoopDisk::on_image(fs, image, tempfile::tempdir().unwrap(), Some(keep));
    (disk, rules)
}
