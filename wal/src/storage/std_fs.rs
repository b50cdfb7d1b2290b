//! The std backend: positional syscalls on the calling (WAL-owned) thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::{Space, Storage, StorageFile, advance, drop_cached_pages, statvfs_space};

/// Plain files with `pwritev`, `pread` and `fdatasync`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdStorage;

impl Storage for StdStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            // Names that are not UTF-8 are not ours; callers treat unknown
            // names as foreign, so keep them visible in lossy form.
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).create(create).open(path)?;
        Ok(Arc::new(StdFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(dir)
    }

    fn space(&self, path: &Path) -> io::Result<Space> {
        statvfs_space(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[derive(Debug)]
struct StdFile {
    file: File,
}

/// Most iovecs one `pwritev` accepts (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;

impl StorageFile for StdFile {
    fn write_all_at(&self, offset: u64, bufs: &[Bytes]) -> io::Result<()> {
        write_all_vectored(self.file.as_raw_fd(), offset, bufs)
    }

    fn read_exact_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn read_cached(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
        let offset = libc::off_t::try_from(offset).ok()?;
        // SAFETY: `iov` points into `buf`, valid and writable for `len`
        // bytes for the whole call. RWF_NOWAIT: EAGAIN instead of waiting
        // for the disk.
        let read = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
        (usize::try_from(read).ok()? == len).then_some(buf)
    }

    fn read_exact_into(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.resize(len, 0);
        self.file.read_exact_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn drop_cache(&self) -> io::Result<()> {
        drop_cached_pages(self.file.as_raw_fd())
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

/// `pwritev` until every byte of `bufs` is written at `offset`.
///
/// A short write (signal, quota edge, ENOSPC on the next block) is continued
/// from where it stopped; if the continuation fails, its error is returned.
fn write_all_vectored(fd: i32, mut offset: u64, bufs: &[Bytes]) -> io::Result<()> {
    let mut pieces: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty()).collect();
    let mut start = 0;
    while start < pieces.len() {
        let batch = pieces.get(start..pieces.len().min(start + IOV_MAX)).unwrap_or_default();
        let iovecs: Vec<libc::iovec> = batch
            .iter()
            .map(|piece| libc::iovec { iov_base: piece.as_ptr() as *mut libc::c_void, iov_len: piece.len() })
            .collect();
        let offset_arg = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: every iovec points into a live, immutable slice borrowed
        // from `bufs` for the duration of the call; the kernel only reads them.
        let written = unsafe { libc::pwritev(fd, iovecs.as_ptr(), iovecs.len() as i32, offset_arg) };
        if written < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
        }
        offset += written as u64;
        advance(&mut pieces, &mut start, written as usize);
    }
    Ok(())
}
