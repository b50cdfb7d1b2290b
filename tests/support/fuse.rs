//! A FUSE passthrough for one disk image file, with rules that fail, delay
//! or hang reads, writes and syncs of chosen byte ranges of the image.
//!
//! The image is what a loop device sits on, so a filesystem (XFS, ext4)
//! mounted from it meets these faults the way it meets a failing drive:
//! a failed write is a write-back error the kernel reports at the next
//! fsync (the fsyncgate case), a failed read is a latent sector error, a
//! delay is a slow disk. The file is opened `FOPEN_DIRECT_IO`, so every
//! read and write reaches these rules instead of FUSE's page cache.
//!
//! Requests are answered from the session thread, except delayed and hung
//! ones, which finish on a thread of their own: a hung range holds up the
//! requests for that range, never the others.
#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request,
};

/// Name of the image file inside the mount.
pub const IMAGE: &str = "disk.img";
const ROOT: u64 = 1;
const FILE: u64 = 2;
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
    /// Image byte range; a request matches when it overlaps (syncs always
    /// match their op).
    range: Range<u64>,
    action: Action,
}

/// The rules of one FUSE image, shared with the session.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Arc<Mutex<Vec<Rule>>>,
    next: Arc<Mutex<u64>>,
    /// Requests that met a rule, to check that a fault was really hit.
    hits: Arc<Mutex<u64>>,
}

impl Rules {
    /// Adds a rule; returns its id for [`Rules::remove`].
    pub fn add(&self, op: Op, range: Range<u64>, action: Action) -> u64 {
        let id = {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            *next
        };
        self.rules.lock().unwrap().push(Rule { id, op, range, action });
        id
    }

    /// Every byte of the image.
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

    fn matching(&self, op: Op, range: Range<u64>) -> Option<(u64, Action)> {
        let rules = self.rules.lock().unwrap();
        let rule = rules.iter().find(|r| r.op == op && r.range.start < range.end && range.start < r.range.end)?;
        *self.hits.lock().unwrap() += 1;
        Some((rule.id, rule.action))
    }

    fn present(&self, id: u64) -> bool {
        self.rules.lock().unwrap().iter().any(|rule| rule.id == id)
    }
}

struct Passthrough {
    file: Arc<File>,
    rules: Rules,
}

impl Passthrough {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let meta = self.file.metadata().ok()?;
        let time = UNIX_EPOCH + Duration::from_secs(meta.mtime().max(0) as u64);
        let (kind, perm, size) =
            if ino == ROOT { (FileType::Directory, 0o755, 0) } else { (FileType::RegularFile, 0o644, meta.len()) };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink: if ino == ROOT { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Runs `work` now, or on a thread of its own after the rule's delay
    /// or once a hung rule is gone.
    fn perform(
        &self,
        op: Op,
        range: Range<u64>,
        fail: impl FnOnce(i32) + Send + 'static,
        work: impl FnOnce() + Send + 'static,
    ) {
        match self.rules.matching(op, range) {
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
        match self.attr(FILE) {
            Some(attr) if parent == ROOT && name == IMAGE => reply.entry(&TTL, &attr, 0),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == FILE {
            reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
        } else {
            reply.error(libc::EISDIR);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let offset = offset.max(0) as u64;
        let file = Arc::clone(&self.file);
        let reply = Arc::new(Mutex::new(Some(reply)));
        let on_fail = Arc::clone(&reply);
        self.perform(
            Op::Read,
            offset..offset + u64::from(size),
            move |errno| {
                if let Some(reply) = on_fail.lock().unwrap().take() {
                    reply.error(errno);
                }
            },
            move || {
                let mut buf = vec![0; size as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read_at(&mut buf[filled..], offset + filled as u64) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(error) => {
                            if let Some(reply) = reply.lock().unwrap().take() {
                                reply.error(error.raw_os_error().unwrap_or(libc::EIO));
                            }
                            return;
                        }
                    }
                }
                if let Some(reply) = reply.lock().unwrap().take() {
                    reply.data(&buf[..filled]);
                }
            },
        );
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let offset = offset.max(0) as u64;
        let (file, data) = (Arc::clone(&self.file), data.to_vec());
        let reply = Arc::new(Mutex::new(Some(reply)));
        let on_fail = Arc::clone(&reply);
        self.perform(
            Op::Write,
            offset..offset + data.len() as u64,
            move |errno| {
                if let Some(reply) = on_fail.lock().unwrap().take() {
                    reply.error(errno);
                }
            },
            move || {
                let outcome = file.write_all_at(&data, offset);
                if let Some(reply) = reply.lock().unwrap().take() {
                    match outcome {
                        Ok(()) => reply.written(data.len() as u32),
                        Err(error) => reply.error(error.raw_os_error().unwrap_or(libc::EIO)),
                    }
                }
            },
        );
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let file = Arc::clone(&self.file);
        let reply = Arc::new(Mutex::new(Some(reply)));
        let on_fail = Arc::clone(&reply);
        self.perform(
            Op::Sync,
            Rules::everywhere(),
            move |errno| {
                if let Some(reply) = on_fail.lock().unwrap().take() {
                    reply.error(errno);
                }
            },
            move || {
                let outcome = file.sync_data();
                if let Some(reply) = reply.lock().unwrap().take() {
                    match outcome {
                        Ok(()) => reply.ok(),
                        Err(error) => reply.error(error.raw_os_error().unwrap_or(libc::EIO)),
                    }
                }
            },
        );
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let entries =
            [(ROOT, FileType::Directory, "."), (ROOT, FileType::Directory, ".."), (FILE, FileType::RegularFile, IMAGE)];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted FUSE passthrough of one image file. Unmounted on drop.
pub struct FuseImage {
    session: Option<fuser::BackgroundSession>,
    mount_point: PathBuf,
    pub rules: Rules,
}

impl FuseImage {
    /// Serves `backing` (an existing file) as `<mount_point>/disk.img`.
    pub fn mount(backing: &Path, mount_point: &Path) -> FuseImage {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(backing).unwrap();
        let rules = Rules::default();
        let fs = Passthrough { file: Arc::new(file), rules: rules.clone() };
        let options =
            [MountOption::FSName("datanode-test".into()), MountOption::AllowOther, MountOption::DefaultPermissions];
        let session = fuser::spawn_mount2(fs, mount_point, &options).unwrap();
        let image = mount_point.join(IMAGE);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !image.exists() {
            assert!(Instant::now() < deadline, "FUSE mount did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        FuseImage { session: Some(session), mount_point: mount_point.to_path_buf(), rules }
    }

    pub fn image(&self) -> PathBuf {
        self.mount_point.join(IMAGE)
    }
}

impl Drop for FuseImage {
    fn drop(&mut self) {
        self.rules.clear();
        drop(self.session.take());
    }
}

/// A loop disk whose image file is served through a FUSE passthrough, and
/// the rules that inject faults into it. The FUSE session outlives the
/// filesystem mounted on top of it.
pub fn fuse_loop_disk(fs: super::disks::Fs) -> (super::disks::LoopDisk, Rules) {
    let backing_dir = tempfile::tempdir().unwrap();
    let backing = backing_dir.path().join("backing.img");
    std::fs::File::create(&backing).unwrap().set_len(super::disks::LoopDisk::image_bytes()).unwrap();
    let mount_dir = tempfile::tempdir().unwrap();
    let served = FuseImage::mount(&backing, mount_dir.path());
    let (image, rules) = (served.image(), served.rules.clone());
    // Dropped in order: the FUSE session, then its mount point, then the backing file.
    let keep: Box<dyn std::any::Any> = Box::new((served, mount_dir, backing_dir));
    let disk = super::disks::LoopDisk::on_image(fs, image, tempfile::tempdir().unwrap(), Some(keep));
    (disk, rules)
}
