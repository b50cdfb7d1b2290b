//! Snapshot stores and snapshot images of a replica.
//!
//! A **snapshot store** is a log directory of its own, `snap.<generation>`,
//! written in bulk and synced once: one compacted put per live blob
//! (`blob::encode_compacted_put`, keeping the LSN of the put it copies),
//! in key order, the way compaction writes a partition's compacted store.
//! `SNAPSHOT` names the current one and its last LSN, so damage to it is
//! corruption at the next open, never a torn tail.
//!
//! A **snapshot image** ([`SnapshotImage`], openraft's `SnapshotData`) is
//! either such a store or an image received from another replica and
//! spooled to a file `receive.<n>` in the replica's directory. Either one
//! reads as a byte stream in the export image format (`image.rs`), so the
//! network sends and receives a snapshot without holding it in memory.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use datanode_wal::{Durability, Lsn, Storage, StorageFile, Wal, WalOptions};

use super::error::StoreError;
use crate::blob::{self, BlobOp};
use crate::image::{BadImage, ImageReader, ImageWriter};
use crate::index::{BlobLoc, Index};

/// Prefix of the spool files of received images (`receive.<n>`).
pub(crate) const RECEIVE_PREFIX: &str = "receive.";
/// Bytes of compacted records appended per batch.
const WRITE_BATCH: usize = 4 << 20;
/// Payload bytes read from a store per step.
const READ_BATCH: usize = 1 << 20;
/// Bytes a spool keeps in memory before it writes them out.
const SPOOL_CHUNK: usize = 1 << 20;

/// Options of a snapshot store: written in bulk, synced once at close.
fn store_options(template: &WalOptions, known_durable_lsn: Lsn, create: bool) -> WalOptions {
    WalOptions {
        durability: Durability::None,
        prewrite_segments: false,
        recycled_segments: 0,
        observer: None,
        known_durable_lsn,
        create_if_missing: create,
        first_lsn: 1,
        ..template.clone()
    }
}

/// Opens the snapshot store at `path`, which must exist, every record up
/// to `synced` known durable. Blocking.
pub(crate) fn open_store(
    storage: &Arc<dyn Storage>,
    path: &Path,
    template: &WalOptions,
    synced: Lsn,
) -> Result<Wal, StoreError> {
    Wal::open(Arc::clone(storage), path, store_options(template, synced, false))
        .map_err(|source| StoreError::SnapshotStore { path: path.into(), source })
}

/// Reads every record of the store `wal` (generation `generation`) into a
/// new index. Blocking.
pub(crate) fn load_store(wal: &Wal, generation: u32) -> Result<Index, StoreError> {
    let mut index = Index::default();
    let mut lsn = wal.first_lsn();
    while lsn <= wal.last_lsn() {
        let records = wal
            .read_from(lsn, READ_BATCH)
            .map_err(|source| StoreError::SnapshotStore { path: wal.dir().into(), source })?;
        for record in records {
            let Some(BlobOp::Put { key, value_offset, original_lsn: Some(original) }) = blob::decode(&record.data)
            else {
                let detail = format!("record at LSN {} is not a compacted put", record.lsn);
                return Err(StoreError::BadSnapshot { path: wal.dir().into(), detail });
            };
            let value_offset = value_offset as u32;
            let loc = BlobLoc { store: generation, pos: record.pos, value_offset, lsn: original };
            index.apply(&key, crate::index::Entry::Live(loc));
            lsn = record.lsn + 1;
        }
    }
    Ok(index)
}

/// Writes a new snapshot store, batch by batch; nothing of it counts
/// until [`StoreWriter::finish`] synced it and `SNAPSHOT` names it.
pub(crate) struct StoreWriter {
    wal: Wal,
    generation: u32,
    records: Vec<Bytes>,
    /// Key length and original LSN of each record in `records`.
    pending: Vec<(usize, Lsn)>,
    batch_bytes: usize,
    placed: Vec<BlobLoc>,
}

impl StoreWriter {
    /// Creates the store `path` (generation `generation`), removing what
    /// an earlier attempt left there. Blocking.
    pub fn create(
        storage: &Arc<dyn Storage>,
        path: &Path,
        generation: u32,
        template: &WalOptions,
    ) -> Result<StoreWriter, StoreError> {
        remove_dir(storage.as_ref(), path)?;
        let wal = Wal::open(Arc::clone(storage), path, store_options(template, 0, true))
            .map_err(|source| StoreError::SnapshotStore { path: path.into(), source })?;
        Ok(StoreWriter {
            wal,
            generation,
            records: Vec::new(),
            pending: Vec::new(),
            batch_bytes: 0,
            placed: Vec::new(),
        })
    }

    /// Adds the blob `key` = `value`, first put at log LSN `lsn`.
    pub fn put(&mut self, key: &[u8], lsn: Lsn, value: &[u8]) -> Result<(), StoreError> {
        let record = blob::encode_compacted_put(lsn, key, value);
        self.batch_bytes += record.len();
        self.records.push(record);
        self.pending.push((key.len(), lsn));
        if self.batch_bytes >= WRITE_BATCH { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.records.is_empty() {
            return Ok(());
        }
        let appended = self
            .wal
            .append_blocking(std::mem::take(&mut self.records))
            .map_err(|source| StoreError::SnapshotStore { path: self.wal.dir().into(), source })?;
        for ((key_len, lsn), pos) in self.pending.drain(..).zip(appended.positions) {
            let value_offset = blob::compacted_put_value_offset(key_len) as u32;
            self.placed.push(BlobLoc { store: self.generation, pos, value_offset, lsn });
        }
        self.batch_bytes = 0;
        Ok(())
    }

    /// Writes what is left and closes the store, which syncs it; returns
    /// where each blob went (in the order given) and the last LSN.
    /// Blocking.
    pub fn finish(mut self) -> Result<(Vec<BlobLoc>, Lsn), StoreError> {
        self.flush()?;
        let (path, synced) = (self.wal.dir().to_path_buf(), self.wal.last_lsn());
        self.wal.close().map_err(|source| StoreError::SnapshotStore { path, source })?;
        Ok((self.placed, synced))
    }
}

/// Removes `dir` and everything in it; nothing there is not an error.
pub(crate) fn remove_dir(storage: &dyn Storage, dir: &Path) -> Result<(), StoreError> {
    match storage.remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io { op: "remove_dir", path: dir.into(), source }),
    }
}

/// A replica's snapshot as openraft hands it around: a snapshot store
/// (built or installed by a replica) or an image received from another
/// replica, spooled to a file. Neither is held in memory; see
/// [`SnapshotImage::image_reader`].
pub struct SnapshotImage {
    source: Source,
}

enum Source {
    /// A snapshot store; it stays readable while this handle lives, even
    /// once a newer snapshot replaced it.
    Store { store: Arc<Wal>, partition: u64 },
    /// A verified image in a spool file, removed when the image is dropped
    /// (an install removes it at once).
    Received { storage: Arc<dyn Storage>, path: PathBuf, file: Arc<dyn StorageFile>, len: u64 },
}

impl fmt::Debug for SnapshotImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Store { store, .. } => write!(f, "SnapshotImage(store {})", store.dir().display()),
            Source::Received { path, len, .. } => write!(f, "SnapshotImage({len} bytes in {})", path.display()),
        }
    }
}

impl SnapshotImage {
    pub(crate) fn of_store(store: Arc<Wal>, partition: u64) -> SnapshotImage {
        SnapshotImage { source: Source::Store { store, partition } }
    }

    /// The snapshot store this image reads, if it is one.
    pub(crate) fn store(&self) -> Option<&Arc<Wal>> {
        match &self.source {
            Source::Store { store, .. } => Some(store),
            Source::Received { .. } => None,
        }
    }

    /// The spool file of a received image.
    pub fn spool_path(&self) -> Option<&Path> {
        match &self.source {
            Source::Store { .. } => None,
            Source::Received { path, .. } => Some(path),
        }
    }

    /// The snapshot as a byte stream in the image format (header with the
    /// partition id, one checksummed entry per blob in key order, trailer
    /// with count and checksum), for a network layer to send. Each `read`
    /// blocks on the disk; a store that fails mid-way is an `io::Error`.
    pub fn image_reader(&self) -> ImageStream {
        match &self.source {
            Source::Store { store, partition } => {
                let (writer, header) = ImageWriter::new(*partition);
                let source =
                    StreamSource::Store { store: Arc::clone(store), next_lsn: store.first_lsn(), writer: Some(writer) };
                ImageStream { source, pending: header }
            }
            Source::Received { file, len, .. } => {
                let source = StreamSource::File { file: Arc::clone(file), offset: 0, len: *len };
                ImageStream { source, pending: Bytes::new() }
            }
        }
    }

    /// Verifies an image read from `input` while spooling it to `path`,
    /// synced; an image of another partition is refused, and a refused
    /// image leaves no file. Blocking.
    pub(crate) fn receive(
        storage: &Arc<dyn Storage>,
        path: PathBuf,
        input: impl Read,
        partition: u64,
        max_value: usize,
    ) -> Result<SnapshotImage, StoreError> {
        let io_error = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        let file = storage.open(&path, true).map_err(io_error("create", &path))?;
        let mut spool = Spool { input, file: Arc::clone(&file), buffered: BytesMut::new(), written: 0, failed: None };
        let mut outcome = read_image(&mut spool, partition, max_value, |_, _| Ok(()))
            .and_then(|()| spool.write_out().map_err(io_error("write", &path)))
            .and_then(|()| file.sync_data().map_err(io_error("sync", &path)));
        if let Some(source) = spool.failed.take() {
            // The spool's own write failed; the image was not at fault.
            outcome = Err(StoreError::Io { op: "write", path: path.clone(), source });
        }
        match outcome {
            Ok(()) => {
                let len = spool.written;
                Ok(SnapshotImage { source: Source::Received { storage: Arc::clone(storage), path, file, len } })
            }
            Err(error) => {
                let _ = storage.remove_file(&path);
                Err(error)
            }
        }
    }
}

impl Drop for SnapshotImage {
    fn drop(&mut self) {
        if let Source::Received { storage, path, .. } = &self.source {
            match storage.remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                // Left for the next open, which removes every spool file.
                Err(error) => tracing::warn!(path = %path.display(), %error, "could not remove a snapshot spool"),
            }
        }
    }
}

/// Reads a whole image from `input`, verifying every entry, the trailer,
/// the partition id and that keys come in strictly increasing order (as
/// every image a replica or an export writes has them), and hands each
/// entry to `each`. Blocking.
pub(crate) fn read_image(
    input: impl Read,
    partition: u64,
    max_value: usize,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut reader = ImageReader::new(input, max_value)?;
    let mut previous: Option<Vec<u8>> = None;
    while let Some((key, value)) = reader.next_entry()? {
        if previous.as_ref().is_some_and(|previous| *previous >= key) {
            return Err(BadImage("keys are not in strictly increasing order".into()).into());
        }
        each(&key, &value)?;
        previous = Some(key);
    }
    // Trusted only now: the trailer's checksum covers the header.
    if reader.partition() != partition {
        let detail = format!("the image is of partition {}, not {partition}", reader.partition());
        return Err(BadImage(detail).into());
    }
    Ok(())
}

/// Passes an image through to its reader and writes every byte read into
/// the spool file, in chunks.
struct Spool<R> {
    input: R,
    file: Arc<dyn StorageFile>,
    buffered: BytesMut,
    written: u64,
    /// The first failed write; reading stops at it.
    failed: Option<io::Error>,
}

impl<R> Spool<R> {
    fn write_out(&mut self) -> io::Result<()> {
        if self.buffered.is_empty() {
            return Ok(());
        }
        let chunk = self.buffered.split().freeze();
        self.file.write_all_at(self.written, std::slice::from_ref(&chunk))?;
        self.written += chunk.len() as u64;
        Ok(())
    }
}

impl<R: Read> Read for Spool<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.input.read(buf)?;
        self.buffered.extend_from_slice(buf.get(..read).unwrap_or_default());
        if self.buffered.len() >= SPOOL_CHUNK
            && let Err(error) = self.write_out()
        {
            let stop = io::Error::new(error.kind(), "snapshot spool write failed");
            self.failed = Some(error);
            return Err(stop);
        }
        Ok(read)
    }
}

/// A snapshot as a byte stream in the image format; see
/// [`SnapshotImage::image_reader`].
pub struct ImageStream {
    source: StreamSource,
    /// Bytes produced and not yet read.
    pending: Bytes,
}

enum StreamSource {
    /// Entries made from a store's records, then the trailer.
    Store { store: Arc<Wal>, next_lsn: Lsn, writer: Option<ImageWriter> },
    /// A received image's bytes, as spooled.
    File { file: Arc<dyn StorageFile>, offset: u64, len: u64 },
}

impl fmt::Debug for ImageStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageStream").field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}

impl StreamSource {
    /// The next piece of the image; `None` after the last.
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self {
            StreamSource::Store { store, next_lsn, writer } => {
                let Some(image) = writer.as_mut() else { return Ok(None) };
                if *next_lsn > store.last_lsn() {
                    return Ok(writer.take().map(ImageWriter::trailer));
                }
                let path = store.dir().to_path_buf();
                let records = store
                    .read_from(*next_lsn, READ_BATCH)
                    .map_err(|source| StoreError::SnapshotStore { path: path.clone(), source }.into_io())?;
                if records.is_empty() {
                    let detail = format!("no record at LSN {next_lsn}, below the last");
                    return Err(StoreError::BadSnapshot { path, detail }.into_io());
                }
                let mut chunk = BytesMut::new();
                for record in records {
                    let Some(BlobOp::Put { key, value_offset, original_lsn: Some(_) }) = blob::decode(&record.data)
                    else {
                        let detail = format!("record at LSN {} is not a compacted put", record.lsn);
                        return Err(StoreError::BadSnapshot { path, detail }.into_io());
                    };
                    let value = record.data.get(value_offset..).unwrap_or_default();
                    chunk.extend_from_slice(&image.entry(&key, value));
                    *next_lsn = record.lsn + 1;
                }
                Ok(Some(chunk.freeze()))
            }
            StreamSource::File { file, offset, len } => {
                if *offset >= *len {
                    return Ok(None);
                }
                let take = (*len - *offset).min(READ_BATCH as u64) as usize;
                let bytes = file.read_exact_at(*offset, take)?;
                *offset += take as u64;
                Ok(Some(Bytes::from(bytes)))
            }
        }
    }
}

impl Read for ImageStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pending.is_empty() {
            match self.source.next_chunk()? {
                Some(chunk) => self.pending = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        let chunk = self.pending.split_to(n);
        buf.iter_mut().zip(chunk.iter()).for_each(|(slot, byte)| *slot = *byte);
        Ok(n)
    }
}
