//! Snapshots as byte streams: how the transport reads a state machine's
//! snapshot out and has one built again, without holding it whole.
//!
//! The sender reads the snapshot with [`SnapshotTransfer::open_snapshot`]
//! on a blocking thread and hands chunks to the HTTP/2 request body
//! ([`ChunkBody`]) through a small channel, so at most a few chunks are in
//! memory and a slow receiver slows the reader (flow control). The
//! receiver hands the chunks of the request body to a blocking thread
//! that gives them to [`SnapshotTransfer::receive_snapshot`] as a
//! [`std::io::Read`] ([`SnapshotBody`]), which spools them where the state
//! machine wants them; the `Raft` then installs what it built.
//!
//! A stream ends only with an explicit end mark: a sender that gives up
//! midway, a channel dropped, or an HTTP/2 reset reach the reader as an
//! error, never as a short snapshot.

use std::io::{self, Read};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes};
use datanode_partition::raft::{BlobStateMachine, SnapshotImage, StoreError, TypeConfig};
use http_body::{Frame, SizeHint};
use openraft::storage::RaftStateMachine;
use tokio::sync::mpsc;

/// Chunks buffered between a blocking reader or writer and the connection.
const CHANNEL_CHUNKS: usize = 2;

/// A state machine whose snapshots the transport can stream.
///
/// Both methods run on a blocking thread (they may do file I/O); the
/// readers they get or give are read there too.
pub trait SnapshotTransfer: RaftStateMachine<TypeConfig> + Send + Sync + 'static {
    /// A reader of the bytes of `data`, from the start.
    fn open_snapshot(data: &Self::SnapshotData) -> io::Result<Box<dyn Read + Send>>;

    /// Builds snapshot data from the bytes `body` yields until its end
    /// (an error from `body` means the stream broke off: discard what was
    /// spooled). It must check the bytes whole before it returns: the
    /// `Raft` installs what it returns, and a failed install stops the
    /// group.
    fn receive_snapshot(&self, body: &mut dyn Read) -> io::Result<Self::SnapshotData>;
}

/// A replica's snapshot is a store or a spooled image on disk; it
/// streams in the export image format, and a received one is spooled
/// into the replica's directory and verified whole before it is handed
/// to openraft.
impl SnapshotTransfer for BlobStateMachine {
    fn open_snapshot(data: &SnapshotImage) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(data.image_reader()))
    }

    fn receive_snapshot(&self, body: &mut dyn Read) -> io::Result<SnapshotImage> {
        BlobStateMachine::receive_snapshot(self, body).map_err(StoreError::into_io)
    }
}

/// The metadata group's snapshot is the map as JSON, in memory (it holds
/// no data); a received one must parse before it is handed on.
impl SnapshotTransfer for crate::cluster::meta_sm::MetaStateMachine {
    fn open_snapshot(data: &Bytes) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(io::Cursor::new(data.clone())))
    }

    fn receive_snapshot(&self, body: &mut dyn Read) -> io::Result<Bytes> {
        crate::cluster::meta_sm::MetaStateMachine::read_snapshot(body)
    }
}

/// One step of a snapshot stream.
#[derive(Debug)]
pub enum Piece {
    /// More bytes.
    Bytes(Bytes),
    /// The stream is whole.
    End,
    /// The stream broke off.
    Failed(io::Error),
}

/// Reads `reader` in chunks of `chunk_size` into `pieces`, then the end
/// mark. Blocking; returns when the stream is out or nobody takes it.
pub fn feed(mut reader: Box<dyn Read + Send>, chunk_size: usize, pieces: mpsc::Sender<Piece>) {
    loop {
        let mut chunk = vec![0; chunk_size];
        let mut filled = 0;
        while filled < chunk_size {
            match reader.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    let _ = pieces.blocking_send(Piece::Failed(error));
                    return;
                }
            }
        }
        if filled == 0 {
            let _ = pieces.blocking_send(Piece::End);
            return;
        }
        chunk.truncate(filled);
        if pieces.blocking_send(Piece::Bytes(Bytes::from(chunk))).is_err() {
            return;
        }
    }
}

/// A channel of pieces, for one snapshot stream.
pub fn channel() -> (mpsc::Sender<Piece>, mpsc::Receiver<Piece>) {
    mpsc::channel(CHANNEL_CHUNKS)
}

/// When a stream last moved: a chunk taken by the connection, or its end.
#[derive(Debug)]
pub struct Progress(Mutex<Instant>);

impl Progress {
    /// Progress as of now.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress(Mutex::new(Instant::now())))
    }

    fn touch(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// When the stream last moved.
    pub fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request body of a snapshot: `head`, then the pieces.
#[derive(Debug)]
pub struct ChunkBody {
    head: Option<Bytes>,
    pieces: mpsc::Receiver<Piece>,
    progress: Arc<Progress>,
    ended: bool,
}

impl ChunkBody {
    /// A body of `head` and then what arrives on `pieces`.
    pub fn new(head: Bytes, pieces: mpsc::Receiver<Piece>, progress: Arc<Progress>) -> ChunkBody {
        ChunkBody { head: Some(head), pieces, progress, ended: false }
    }
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(head) = this.head.take() {
            this.progress.touch();
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let piece = std::task::ready!(this.pieces.poll_recv(cx));
        this.progress.touch();
        Poll::Ready(match piece {
            Some(Piece::Bytes(bytes)) => Some(Ok(Frame::data(bytes))),
            Some(Piece::End) => {
                this.ended = true;
                None
            }
            Some(Piece::Failed(error)) => Some(Err(error)),
            None => Some(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the snapshot reader stopped"))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A received snapshot's bytes as a blocking reader (see the module docs).
#[derive(Debug)]
pub struct SnapshotBody {
    pieces: mpsc::Receiver<Piece>,
    current: Bytes,
    ended: bool,
}

impl SnapshotBody {
    /// The reader of what arrives on `pieces`.
    pub fn new(pieces: mpsc::Receiver<Piece>) -> SnapshotBody {
        SnapshotBody { pieces, current: Bytes::new(), ended: false }
    }
}

impl Read for SnapshotBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if self.ended || buf.is_empty() {
                return Ok(0);
            }
            match self.pieces.blocking_recv() {
                Some(Piece::Bytes(bytes)) => self.current = bytes,
                Some(Piece::End) => self.ended = true,
                Some(Piece::Failed(error)) => return Err(error),
                None => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the snapshot stream broke off")),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(pieces: mpsc::Receiver<Piece>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        SnapshotBody::new(pieces).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_stream_arrives_whole_in_chunks_and_a_broken_one_is_an_error() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (tx, mut rx) = mpsc::channel(64);
        feed(Box::new(io::Cursor::new(data.clone())), 1024, tx);
        let mut chunks = Vec::new();
        while let Ok(piece) = rx.try_recv() {
            chunks.push(piece);
        }
        assert_eq!(chunks.len(), 11, "ten chunks and the end mark");
        assert!(matches!(chunks.last(), Some(Piece::End)));
        let (tx, rx) = mpsc::channel(64);
        for piece in chunks {
            tx.try_send(piece).unwrap();
        }
        assert_eq!(read_all(rx).unwrap(), data);

        // No end mark: the sender went away.
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Piece::Bytes(Bytes::from_static(b"abc"))).unwrap();
        drop(tx);
        assert_eq!(read_all(rx).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);

        // The reader failed midway.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk"));
                }
                self.0 -= 1;
                buf[0] = 1;
                Ok(1)
            }
        }
        let (tx, rx) = mpsc::channel(64);
        feed(Box::new(Failing(3)), 2, tx);
        assert_eq!(read_all(rx).unwrap_err().to_string(), "disk");
    }
}
