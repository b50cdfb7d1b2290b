//! The io_uring backend.
//!
//! Each thread that does file I/O through this backend owns a small ring of
//! its own (created on first use). In the WAL those threads are the writer
//! thread of each log and the threads that read, so the ring lives on a
//! dedicated thread and no operation hops between threads: a write and the
//! `fdatasync` after it go to the kernel linked, in one `io_uring_enter`.
//!
//! An operation owns what the kernel may touch (the `Bytes` of a write, the
//! `Vec` of a read, the iovec array, a reference to the file) and the call
//! does not return until every completion it submitted is reaped; if the
//! ring itself breaks while an operation is in flight, those buffers and the
//! ring are leaked rather than freed under the kernel.
//!
//! Namespace operations (open, rename, remove, directory fsync) are rare and
//! run as plain syscalls.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use io_uring::{IoUring, Probe, opcode, squeue, types};

use super::{Space, StdStorage, Storage, StorageFile, advance, drop_cached_pages, statvfs_space};
use crate::error::IoOp;

const RING_ENTRIES: u32 = 8;
const IOV_MAX: usize = 1024;
const WRITE: u64 = 1;
const SYNC: u64 = 2;
const READ: u64 = 3;

/// Files whose data operations run on per-thread io_urings.
#[derive(Debug, Clone, Copy)]
pub struct UringStorage {
    _private: (),
}

impl UringStorage {
    /// Checks that io_uring works here with the opcodes used (write, read,
    /// fsync, linked); fails when the kernel refuses (old kernel, seccomp,
    /// `io_uring_disabled`).
    pub fn new() -> io::Result<UringStorage> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [opcode::Writev::CODE, opcode::Read::CODE, opcode::Fsync::CODE] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks an opcode"));
            }
        }
        Ok(UringStorage { _private: () })
    }
}

thread_local! {
    /// This thread's ring; `None` until first use, and again after the ring
    /// broke (its memory is then leaked, see `Ring::abandon`).
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's ring, creating it on first use. A
/// [`RingBroken`] answer means operations may still be in flight: the
/// caller must then leak every buffer it handed to them (the ring itself is
/// leaked here), never free memory the kernel could still read or write.
fn with_ring<T>(f: impl FnOnce(&mut IoUring) -> Result<T, RingBroken>) -> Result<T, RingBroken> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // Nothing submitted yet: an error here leaves nothing in flight,
            // but is reported the same way for simplicity.
            *slot = Some(IoUring::new(RING_ENTRIES).map_err(RingBroken)?);
        }
        let Some(ring) = slot.as_mut() else { return Err(RingBroken(io::Error::other("no ring"))) };
        let result = f(ring);
        if result.is_err()
            && let Some(ring) = slot.take()
        {
            std::mem::forget(ring);
        }
        result
    })
}

/// The ring could not submit or wait; operations may still be in flight.
struct RingBroken(io::Error);

/// Pushes `entries` and waits until `count` completions are reaped,
/// returning their `(user_data, result)` pairs. Every pointer in `entries`
/// must stay valid until this returns; it returns only after every
/// submitted entry completed, or with `RingBroken`.
fn submit_and_reap(ring: &mut IoUring, entries: &[squeue::Entry]) -> Result<Vec<(u64, i32)>, RingBroken> {
    for entry in entries {
        // SAFETY: the caller keeps every buffer and descriptor referenced by
        // `entry` alive until all completions are reaped below.
        if unsafe { ring.submission().push(entry) }.is_err() {
            return Err(RingBroken(io::Error::other("io_uring submission queue full")));
        }
    }
    let mut done = Vec::with_capacity(entries.len());
    while done.len() < entries.len() {
        match ring.submit_and_wait(entries.len() - done.len()) {
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(RingBroken(error)),
        }
        done.extend(ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
    }
    Ok(done)
}

impl Storage for UringStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdStorage.create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdStorage.list_dir(dir)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).create(create).open(path)?;
        Ok(Arc::new(UringFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdStorage.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdStorage.remove_file(path)
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdStorage.remove_dir_all(dir)
    }

    fn space(&self, path: &Path) -> io::Result<Space> {
        statvfs_space(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdStorage.sync_dir(dir)
    }
}

#[derive(Debug)]
struct UringFile {
    file: File,
}

impl UringFile {
    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// Writes `bufs` at `offset`, continuing after short writes; with
    /// `sync`, an `fdatasync` linked behind each write submission.
    fn write(&self, mut offset: u64, bufs: &[Bytes], sync: bool) -> Result<(), (IoOp, io::Error)> {
        let mut pieces: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty()).collect();
        let mut start = 0;
        let mut synced = !sync;
        while start < pieces.len() || !synced {
            let iovecs: Vec<libc::iovec> = pieces
                .get(start..)
                .unwrap_or_default()
                .iter()
                .take(IOV_MAX)
                .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() })
                .collect();
            let mut entries = Vec::with_capacity(2);
            if !iovecs.is_empty() {
                let mut write = opcode::Writev::new(self.fd(), iovecs.as_ptr(), iovecs.len() as u32)
                    .offset(offset)
                    .build()
                    .user_data(WRITE);
                if sync {
                    write = write.flags(squeue::Flags::IO_LINK);
                }
                entries.push(write);
            }
            if sync {
                entries.push(opcode::Fsync::new(self.fd()).flags(types::FsyncFlags::DATASYNC).build().user_data(SYNC));
            }
            // `iovecs` and `pieces` (borrowed from `bufs`) outlive the call,
            // which reaps every completion before returning; if it cannot,
            // they are leaked, so the kernel never reads freed memory.
            let done = match with_ring(|ring| submit_and_reap(ring, &entries)) {
                Ok(done) => done,
                Err(RingBroken(error)) => {
                    std::mem::forget(iovecs);
                    bufs.iter().for_each(|buf| std::mem::forget(buf.clone()));
                    return Err((IoOp::Write, error));
                }
            };
            let result_of = |tag| done.iter().find(|(data, _)| *data == tag).map(|(_, result)| *result);
            if let Some(written) = result_of(WRITE) {
                if written < 0 {
                    return Err((IoOp::Write, io::Error::from_raw_os_error(-written)));
                }
                if written == 0 {
                    return Err((IoOp::Write, io::Error::new(io::ErrorKind::WriteZero, "writev wrote nothing")));
                }
                offset += written as u64;
                advance(&mut pieces, &mut start, written as usize);
            }
            match result_of(SYNC) {
                // A short write breaks the link: the sync is cancelled and
                // goes out again behind the rest of the data.
                Some(result) if result == -libc::ECANCELED && start < pieces.len() => {}
                Some(result) if result < 0 => return Err((IoOp::Sync, io::Error::from_raw_os_error(-result))),
                Some(_) => synced = start >= pieces.len(),
                None => {}
            }
        }
        Ok(())
    }
}

impl StorageFile for UringFile {
    fn write_all_at(&self, offset: u64, bufs: &[Bytes]) -> io::Result<()> {
        self.write(offset, bufs, false).map_err(|(_, e)| e)
    }

    fn write_all_and_sync(&self, offset: u64, bufs: &[Bytes]) -> Result<(), (IoOp, io::Error)> {
        self.write(offset, bufs, true)
    }

    fn read_exact_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            let Some(rest) = buf.get_mut(filled..) else { break };
            let chunk = rest.len().min(1 << 30) as u32;
            let entry = opcode::Read::new(self.fd(), rest.as_mut_ptr(), chunk)
                .offset(offset + filled as u64)
                .build()
                .user_data(READ);
            // `buf` outlives the call, which reaps the completion; if it
            // cannot, `buf` is leaked, so the kernel never writes into
            // freed memory.
            let done = match with_ring(|ring| submit_and_reap(ring, &[entry])) {
                Ok(done) => done,
                Err(RingBroken(error)) => {
                    std::mem::forget(buf);
                    return Err(error);
                }
            };
            match done.first().map(|(_, result)| *result) {
                Some(read) if read < 0 => return Err(io::Error::from_raw_os_error(-read)),
                Some(0) | None => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Some(read) => filled += read as usize,
            }
        }
        Ok(buf)
    }

    fn sync_data(&self) -> io::Result<()> {
        let entry = opcode::Fsync::new(self.fd()).flags(types::FsyncFlags::DATASYNC).build().user_data(SYNC);
        // No buffer: nothing to keep alive if the ring breaks.
        let done = with_ring(|ring| submit_and_reap(ring, &[entry])).map_err(|RingBroken(error)| error)?;
        match done.first().map(|(_, result)| *result) {
            Some(result) if result < 0 => Err(io::Error::from_raw_os_error(-result)),
            _ => Ok(()),
        }
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
