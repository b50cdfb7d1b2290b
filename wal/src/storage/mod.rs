//! The I/O seam: every file operation of the WAL goes through [`Storage`]
//! and [`StorageFile`], so the same log code runs on
//!
//! - [`StdStorage`]: positional `pwritev`/`pread`/`fdatasync` called by the
//!   WAL's own threads (never by an async runtime's workers);
//! - [`UringStorage`]: a small io_uring per calling thread (the WAL's own
//!   threads); each operation owns its buffers until its completion is
//!   reaped, and a write with its `fdatasync` is one linked submission;
//! - [`SimStorage`]: an in-memory, fault-injecting simulation that tracks what
//!   was synced and builds crash images.
//!
//! All methods block the calling thread. Buffers are passed as [`Bytes`]
//! (reference counted) so an asynchronous backend can keep them alive for as
//! long as the kernel may touch them.

mod sim;
mod std_fs;
mod uring;

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::IoOp;

pub use sim::{Fault, SimRng, SimStorage};

pub use std_fs::StdStorage;
pub use uring::UringStorage;

/// A filesystem: directories, names, and opening files.
pub trait Storage: Send + Sync + std::fmt::Debug + 'static {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries in `dir` (not paths), in no particular order.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading and writing; `create` makes it if missing.
    /// A new name is durable only after [`Storage::sync_dir`].
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Atomically renames `from` to `to`; durable after [`Storage::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file; durable after [`Storage::sync_dir`].
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it (not atomic).
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// `fsync` of a directory: makes creates, renames and removes in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Size and free space of the filesystem holding `path` (`statvfs`).
    fn space(&self, path: &Path) -> io::Result<Space>;
}

/// Size and free space of a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Total size.
    pub total: u64,
    /// Bytes available to this process.
    pub free: u64,
}

/// `statvfs` of the filesystem holding `path`.
pub(crate) fn statvfs_space(path: &Path) -> io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `statvfs` is a plain C struct of integers, for which all
    // zeros is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we own; `c_path` is a valid
    // NUL-terminated string for the duration of the call.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = stat.f_frsize as u64;
    Ok(Space { total: stat.f_blocks as u64 * block, free: stat.f_bavail as u64 * block })
}

/// An open file. Offsets are absolute; there is no cursor.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Writes all of `bufs`, back to back, starting at `offset`. Short writes
    /// are continued until done; an error leaves an unknown prefix written.
    /// Not durable until [`StorageFile::sync_data`] returns.
    fn write_all_at(&self, offset: u64, bufs: &[Bytes]) -> io::Result<()>;
    /// Reads exactly `len` bytes at `offset`; a short read past the end of
    /// the file is `UnexpectedEof`.
    fn read_exact_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Like [`read_exact_at`](StorageFile::read_exact_at), into `buf`
    /// (resized to `len`), reusing its allocation. Recovery reads whole
    /// segments this way: a fresh 64 MiB buffer per segment costs a page
    /// fault per 4 KiB and an unmap, more than the copy itself.
    fn read_exact_into(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        *buf = self.read_exact_at(offset, len)?;
        Ok(())
    }
    /// The `len` bytes at `offset` if the page cache holds them all, read
    /// without ever waiting for the disk; `None` when it would have to
    /// wait, or cannot tell. Lets an async caller serve hot reads in place
    /// and send only the others to a blocking thread (where a hung disk
    /// can stall nothing else). Errors are `None` too: the blocking read
    /// that follows reports them.
    fn read_cached(&self, _offset: u64, _len: usize) -> Option<Vec<u8>> {
        None
    }
    /// `fdatasync`: everything written before is durable when this returns
    /// `Ok`. After an error, nothing written since the last good sync may be
    /// assumed durable, and a second sync proves nothing (fsyncgate).
    fn sync_data(&self) -> io::Result<()>;
    /// [`write_all_at`](StorageFile::write_all_at) then
    /// [`sync_data`](StorageFile::sync_data); a backend may do both in one
    /// round trip. The error says which of the two failed.
    fn write_all_and_sync(&self, offset: u64, bufs: &[Bytes]) -> Result<(), (IoOp, io::Error)> {
        self.write_all_at(offset, bufs).map_err(|e| (IoOp::Write, e))?;
        self.sync_data().map_err(|e| (IoOp::Sync, e))
    }
    /// Drops the file's clean cached pages, so that the next reads come
    /// from the disk. After a failed sync the kernel keeps the failed pages
    /// cached but clean: readable, yet never written again. Recovery calls
    /// this (after a sync) so it reads what is on disk, not what the page
    /// cache still shows.
    fn drop_cache(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn file_len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len`; durable after a sync.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// Which I/O backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// io_uring when `io_uring_setup` works here, std otherwise.
    #[default]
    Auto,
    /// Positional syscalls on the WAL's threads.
    Std,
    /// io_uring rings on the WAL's threads; fails if io_uring is unavailable.
    Uring,
}

impl std::str::FromStr for IoBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoBackend::Auto),
            "std" => Ok(IoBackend::Std),
            "uring" => Ok(IoBackend::Uring),
            other => Err(format!("unknown io backend {other:?} (auto, std, uring)")),
        }
    }
}

/// Builds the real-disk backend named by `backend`.
///
/// `Auto` tries to set up an io_uring and falls back to std when the kernel
/// refuses (old kernel, seccomp, `io_uring_disabled`).
pub fn open_backend(backend: IoBackend) -> io::Result<Arc<dyn Storage>> {
    match backend {
        IoBackend::Std => Ok(Arc::new(StdStorage)),
        IoBackend::Uring => Ok(Arc::new(UringStorage::new()?)),
        IoBackend::Auto => match UringStorage::new() {
            Ok(uring) => Ok(Arc::new(uring)),
            Err(error) => {
                tracing::info!(%error, "io_uring unavailable, using the std backend");
                Ok(Arc::new(StdStorage))
            }
        },
    }
}

/// `posix_fadvise(DONTNEED)` over a whole file.
pub(crate) fn drop_cached_pages(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fadvise on an open descriptor has no memory-safety
    // preconditions; it returns an errno instead of setting errno.
    match unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Drops the first `written` bytes from `pieces[*start..]`, moving `start`
/// past the pieces that are done: how a short vectored write continues.
pub(crate) fn advance(pieces: &mut [&[u8]], start: &mut usize, mut written: usize) {
    while written > 0 && *start < pieces.len() {
        let Some(piece) = pieces.get_mut(*start) else { return };
        if written >= piece.len() {
            written -= piece.len();
            *start += 1;
        } else {
            *piece = piece.get(written..).unwrap_or_default();
            written = 0;
        }
    }
}

/// Total length of a list of buffers.
pub(crate) fn total_len(bufs: &[Bytes]) -> usize {
    bufs.iter().map(Bytes::len).sum()
}

#[cfg(test)]
mod tests {
    //! The contract every backend must honour, run against each of them.
    use super::*;

    pub(crate) fn backends() -> Vec<(&'static str, Arc<dyn Storage>)> {
        let mut all: Vec<(&'static str, Arc<dyn Storage>)> =
            vec![("std", Arc::new(StdStorage)), ("sim", Arc::new(SimStorage::new(1)))];
        match UringStorage::new() {
            Ok(uring) => all.push(("uring", Arc::new(uring))),
            Err(error) => eprintln!("SKIPPED uring backend contract: {error}"),
        }
        all
    }

    #[test]
    fn vectored_write_then_read_back_on_every_backend() {
        for (name, storage) in backends() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let file = storage.open(&path, true).unwrap();
            let bufs = [Bytes::from_static(b"hello "), Bytes::new(), Bytes::from(vec![7u8; 5000])];
            file.write_all_and_sync(10, &bufs).map_err(|(_, e)| e).unwrap();
            assert_eq!(file.file_len().unwrap(), 5016, "{name}");
            let back = file.read_exact_at(10, 5006).unwrap();
            assert_eq!(&back[..6], b"hello ", "{name}");
            assert!(back[6..].iter().all(|b| *b == 7), "{name}");
            assert_eq!(file.read_exact_at(0, 10).unwrap(), vec![0u8; 10], "{name}");
            let eof = file.read_exact_at(5000, 100).unwrap_err();
            assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof, "{name}");
            file.set_len(4).unwrap();
            assert_eq!(file.file_len().unwrap(), 4, "{name}");
        }
    }

    #[test]
    fn names_rename_remove_and_list_on_every_backend() {
        for (name, storage) in backends() {
            let dir = tempfile::tempdir().unwrap();
            let a = dir.path().join("a");
            storage.open(&a, true).unwrap();
            storage.rename(&a, &dir.path().join("b")).unwrap();
            storage.sync_dir(dir.path()).unwrap();
            assert_eq!(storage.list_dir(dir.path()).unwrap(), vec!["b".to_string()], "{name}");
            assert_eq!(storage.open(&a, false).unwrap_err().kind(), io::ErrorKind::NotFound);
            storage.remove_file(&dir.path().join("b")).unwrap();
            assert!(storage.list_dir(dir.path()).unwrap().is_empty(), "{name}");
        }
    }

    #[test]
    fn directories_list_rename_and_remove_on_every_backend() {
        for (name, storage) in backends() {
            let dir = tempfile::tempdir().unwrap();
            let staging = dir.path().join(".staging-7");
            storage.create_dir_all(&staging).unwrap();
            storage.open(&staging.join("meta"), true).unwrap().write_all_at(0, &[Bytes::from_static(b"m")]).unwrap();
            storage.open(&dir.path().join("file"), true).unwrap();
            let mut listed = storage.list_dir(dir.path()).unwrap();
            listed.sort();
            assert_eq!(listed, vec![".staging-7".to_string(), "file".to_string()], "{name}");
            let live = dir.path().join("7");
            storage.rename(&staging, &live).unwrap();
            let meta = storage.open(&live.join("meta"), false).unwrap();
            assert_eq!(meta.read_exact_at(0, 1).unwrap(), b"m", "{name}");
            storage.remove_dir_all(&live).unwrap();
            assert_eq!(storage.list_dir(dir.path()).unwrap(), vec!["file".to_string()], "{name}");
        }
    }

    #[test]
    fn space_reports_a_plausible_filesystem() {
        for (name, storage) in backends() {
            let dir = tempfile::tempdir().unwrap();
            let space = storage.space(dir.path()).unwrap();
            assert!(space.total > 0 && space.free <= space.total, "{name}: {space:?}");
        }
        assert!(StdStorage.space(Path::new("/definitely/not/here")).is_err());
    }

    #[test]
    fn many_iovecs_are_written_in_order() {
        for (name, storage) in backends() {
            let dir = tempfile::tempdir().unwrap();
            let file = storage.open(&dir.path().join("f"), true).unwrap();
            // More pieces than IOV_MAX (1024) forces the backend to split.
            let bufs: Vec<Bytes> = (0..3000u32).map(|i| Bytes::from(i.to_le_bytes().to_vec())).collect();
            file.write_all_at(0, &bufs).unwrap();
            let back = file.read_exact_at(0, 12_000).unwrap();
            for (i, chunk) in back.chunks(4).enumerate() {
                assert_eq!(chunk, (i as u32).to_le_bytes(), "{name} piece {i}");
            }
        }
    }
}
