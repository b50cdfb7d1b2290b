//! The io_uring backend: one ring, owned by one dedicated thread.
//!
//! Callers hand an operation (with its file and its buffers) to the ring
//! thread over a channel and block on the reply. The operation owns every
//! buffer the kernel may touch (`Bytes` for writes, a `Vec` for reads) and an
//! `Arc` of the file, and is dropped only after its completion is reaped, so
//! the kernel never sees freed memory or a closed descriptor. On shutdown the
//! thread stops taking work and waits for every completion before the ring
//! and the buffers go away.
//!
//! Namespace operations (open, rename, remove, directory fsync) are rare and
//! run as plain syscalls on the caller's thread.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{IoUring, Probe, opcode, types};

use super::{StdStorage, Storage, StorageFile};
use crate::error::IoOp;

const RING_ENTRIES: u32 = 256;
const IOV_MAX: usize = 1024;
const WAKE: u64 = u64::MAX;

/// Files whose data operations run on an io_uring.
#[derive(Debug, Clone)]
pub struct UringStorage {
    ring: Arc<RingHandle>,
}

#[derive(Debug)]
struct RingHandle {
    requests: Mutex<Option<Sender<Request>>>,
    wake: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
enum Op {
    Write { offset: u64, bufs: Vec<Bytes>, piece: usize, skip: usize, then_sync: bool },
    Sync,
    Read { offset: u64, buf: Vec<u8>, filled: usize },
}

#[derive(Debug)]
struct Request {
    file: Arc<File>,
    op: Op,
    reply: SyncSender<Reply>,
}

/// The ring thread's answer: the bytes read, or which step failed and how.
type Reply = Result<Vec<u8>, (IoOp, io::Error)>;

impl UringStorage {
    /// Sets up a ring and its thread. Fails when the kernel has no usable
    /// io_uring (or lacks the opcodes used here).
    pub fn new() -> io::Result<UringStorage> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [opcode::Writev::CODE, opcode::Read::CODE, opcode::Fsync::CODE] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks an opcode"));
            }
        }
        // SAFETY: eventfd has no memory-safety preconditions; the result is
        // checked before it is wrapped.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let (tx, rx) = mpsc::channel();
        let wake_fd = wake.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("wal-uring".into())
            .spawn(move || RingThread::new(ring, rx, wake_fd).run())?;
        Ok(UringStorage {
            ring: Arc::new(RingHandle { requests: Mutex::new(Some(tx)), wake, thread: Mutex::new(Some(thread)) }),
        })
    }
}

impl RingHandle {
    fn call(&self, file: &Arc<File>, op: Op) -> Reply {
        let first_step = match op {
            Op::Write { .. } => IoOp::Write,
            Op::Sync => IoOp::Sync,
            Op::Read { .. } => IoOp::Read,
        };
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
            let sender = requests.as_ref().ok_or_else(|| (first_step, ring_gone()))?;
            sender.send(Request { file: Arc::clone(file), op, reply }).map_err(|_| (first_step, ring_gone()))?;
        }
        self.kick();
        answer.recv().map_err(|_| (first_step, ring_gone()))?
    }

    fn kick(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our eventfd.
        // A failure (counter overflow) still leaves the ring awake.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl Drop for RingHandle {
    fn drop(&mut self) {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner).take();
        self.kick();
        if let Some(thread) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take()
            && thread.join().is_err()
        {
            tracing::error!("io_uring thread panicked");
        }
    }
}

fn ring_gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "io_uring thread is gone")
}

struct InFlight {
    request: Request,
    /// iovecs of the current write submission; they point into
    /// `request.op`'s `Bytes`, which stay put while the op is in flight.
    iovecs: Vec<libc::iovec>,
}

struct RingThread {
    ring: IoUring,
    requests: Receiver<Request>,
    wake_fd: i32,
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    closing: bool,
    in_flight: HashMap<u64, InFlight>,
    backlog: VecDeque<u64>,
    next_key: u64,
}

impl RingThread {
    fn new(ring: IoUring, requests: Receiver<Request>, wake_fd: i32) -> RingThread {
        RingThread {
            ring,
            requests,
            wake_fd,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            closing: false,
            in_flight: HashMap::new(),
            backlog: VecDeque::new(),
            next_key: 0,
        }
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            if self.closing && self.in_flight.is_empty() && !self.wake_armed {
                return;
            }
            if let Err(error) = self.ring.submit_and_wait(1) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The ring itself failed: fail everything rather than hang.
                tracing::error!(%error, "io_uring submit failed");
                self.fail_all(error);
                return;
            }
            let done: Vec<(u64, i32)> = self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
            for (key, result) in done {
                if key == WAKE {
                    self.wake_armed = false;
                    self.take_requests();
                    if !self.closing {
                        self.arm_wake();
                    }
                } else {
                    self.complete(key, result);
                }
            }
            self.flush_backlog();
        }
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(types::Fd(self.wake_fd), self.wake_buf.as_mut_ptr(), 8).build().user_data(WAKE);
        // SAFETY: the buffer is owned by `self` and outlives the ring.
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.wake_armed = true;
        } else {
            // The queue is full of work; its completions will bring us back.
            let _ = self.ring.submit();
            // SAFETY: as above.
            self.wake_armed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
    }

    fn take_requests(&mut self) {
        loop {
            match self.requests.try_recv() {
                Ok(request) => {
                    let key = self.next_key;
                    self.next_key += 1;
                    self.in_flight.insert(key, InFlight { request, iovecs: Vec::new() });
                    self.backlog.push_back(key);
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(key) = self.backlog.pop_front() {
            if !self.submit(key) {
                self.backlog.push_front(key);
                return;
            }
        }
    }

    /// Pushes the next step of operation `key`; false when the queue is full.
    fn submit(&mut self, key: u64) -> bool {
        let Some(flight) = self.in_flight.get_mut(&key) else { return true };
        let fd = types::Fd(flight.request.file.as_raw_fd());
        let entry = match &mut flight.request.op {
            Op::Write { offset, bufs, piece, skip, .. } if *piece < bufs.len() => {
                flight.iovecs = bufs[*piece..]
                    .iter()
                    .take(IOV_MAX)
                    .enumerate()
                    .map(|(i, buf)| {
                        let from = if i == 0 { *skip } else { 0 };
                        libc::iovec { iov_base: buf[from..].as_ptr() as *mut libc::c_void, iov_len: buf.len() - from }
                    })
                    .collect();
                opcode::Writev::new(fd, flight.iovecs.as_ptr(), flight.iovecs.len() as u32).offset(*offset).build()
            }
            Op::Write { .. } | Op::Sync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Op::Read { offset, buf, filled } => {
                let rest = &mut buf[*filled..];
                let len = rest.len().min(u32::MAX as usize) as u32;
                opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(*offset + *filled as u64).build()
            }
        };
        // SAFETY: every pointer in `entry` refers to memory owned by the
        // in-flight operation (its `Bytes`, its read `Vec`, its iovecs) or
        // the file it holds an `Arc` of; the operation stays in
        // `in_flight`, untouched, until this entry's completion is reaped.
        unsafe { self.ring.submission().push(&entry.user_data(key)) }.is_ok()
    }

    fn complete(&mut self, key: u64, result: i32) {
        let Some(flight) = self.in_flight.get_mut(&key) else { return };
        let step = match &flight.request.op {
            Op::Write { bufs, piece, .. } if *piece < bufs.len() => IoOp::Write,
            Op::Write { .. } | Op::Sync => IoOp::Sync,
            Op::Read { .. } => IoOp::Read,
        };
        if result == -libc::EINTR || result == -libc::EAGAIN {
            self.backlog.push_back(key);
            return;
        }
        if result < 0 {
            self.finish(key, Err((step, io::Error::from_raw_os_error(-result))));
            return;
        }
        let advanced = result as usize;
        match &mut flight.request.op {
            Op::Write { offset, bufs, piece, skip, then_sync } if *piece < bufs.len() => {
                if advanced == 0 {
                    let error = io::Error::new(io::ErrorKind::WriteZero, "writev wrote nothing");
                    self.finish(key, Err((step, error)));
                    return;
                }
                *offset += advanced as u64;
                let mut left = advanced;
                while left > 0 && *piece < bufs.len() {
                    let available = bufs[*piece].len() - *skip;
                    if left >= available {
                        left -= available;
                        *piece += 1;
                        *skip = 0;
                    } else {
                        *skip += left;
                        left = 0;
                    }
                }
                while *piece < bufs.len() && bufs[*piece].len() == *skip {
                    *piece += 1;
                    *skip = 0;
                }
                if *piece < bufs.len() || *then_sync {
                    self.backlog.push_back(key);
                } else {
                    self.finish(key, Ok(Vec::new()));
                }
            }
            Op::Write { .. } | Op::Sync => self.finish(key, Ok(Vec::new())),
            Op::Read { buf, filled, .. } => {
                if advanced == 0 {
                    self.finish(key, Err((step, io::Error::from(io::ErrorKind::UnexpectedEof))));
                    return;
                }
                *filled += advanced;
                if *filled == buf.len() {
                    let data = std::mem::take(buf);
                    self.finish(key, Ok(data));
                } else {
                    self.backlog.push_back(key);
                }
            }
        }
    }

    fn finish(&mut self, key: u64, result: Reply) {
        if let Some(flight) = self.in_flight.remove(&key) {
            // The caller may have given up; nothing else to do then.
            let _ = flight.request.reply.send(result);
        }
    }

    /// Only reached when the ring itself cannot submit. Every caller gets
    /// the error; buffers, files and the ring are leaked rather than freed,
    /// because the kernel may still reference them.
    fn fail_all(mut self, error: io::Error) {
        for (_, flight) in self.in_flight.drain() {
            let InFlight { request, iovecs } = flight;
            let Request { file, op, reply } = request;
            let _ = reply.send(Err((IoOp::Write, io::Error::new(error.kind(), error.to_string()))));
            std::mem::forget((file, op, iovecs));
        }
        std::mem::forget(self);
    }
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
        Ok(Arc::new(UringFile { ring: Arc::clone(&self.ring), file: Arc::new(file) }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdStorage.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdStorage.remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdStorage.sync_dir(dir)
    }
}

/// The buffers worth sending: a zero-length iovec would read as a zero-byte write.
fn non_empty(bufs: &[Bytes]) -> Vec<Bytes> {
    bufs.iter().filter(|b| !b.is_empty()).cloned().collect()
}

#[derive(Debug)]
struct UringFile {
    ring: Arc<RingHandle>,
    file: Arc<File>,
}

impl StorageFile for UringFile {
    fn write_all_at(&self, offset: u64, bufs: &[Bytes]) -> io::Result<()> {
        let bufs = non_empty(bufs);
        if bufs.is_empty() {
            return Ok(());
        }
        let op = Op::Write { offset, bufs, piece: 0, skip: 0, then_sync: false };
        self.ring.call(&self.file, op).map(drop).map_err(|(_, e)| e)
    }

    fn write_all_and_sync(&self, offset: u64, bufs: &[Bytes]) -> Result<(), (IoOp, io::Error)> {
        // One round trip to the ring thread: it issues the fdatasync as soon
        // as the last byte is written.
        let op = Op::Write { offset, bufs: non_empty(bufs), piece: 0, skip: 0, then_sync: true };
        self.ring.call(&self.file, op).map(drop)
    }

    fn read_exact_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.ring.call(&self.file, Op::Read { offset, buf: vec![0; len], filled: 0 }).map_err(|(_, e)| e)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.ring.call(&self.file, Op::Sync).map(drop).map_err(|(_, e)| e)
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}
