//! Segment files: names, the in-memory table of live segments, and reading
//! records back from them.
//!
//! A segment's file is fresh (zeros past its records: its first window was
//! written as zeros and the writer extends it with zeros) or recycled: the
//! file of a purged segment, kept under a `.wal.recycled` name and later
//! written into again, with stale records of the lower segment ids it held
//! past the records. Reads cannot tell the difference and need not: they
//! look only where the table says a record of this segment is (never past
//! the end of its records) and verify the record's segment id and LSN, so a
//! stale record is never returned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Corruption, Error, IoOp, Result};
use crate::format::{self, Expected, FrameError, RECORD_HEADER_LEN};
use crate::storage::StorageFile;
use crate::{Lsn, Record, RecordPos};

/// Every this many records a segment remembers an offset, so a read by LSN
/// scans at most this many record headers.
pub(crate) const INDEX_STRIDE: u64 = 32;

/// Reads for `read_from` are issued in chunks of at least this size.
const READ_CHUNK: usize = 64 * 1024;

/// File name of segment `id`: twenty decimal digits, so names sort by id.
pub(crate) fn file_name(id: u64) -> String {
    format!("{id:020}.wal")
}

/// File name of segment `id` while it is being pre-written.
pub(crate) fn prep_file_name(id: u64) -> String {
    format!("{id:020}.wal.prep")
}

/// File name of a recycled spare: the purged segment `id`, kept to become
/// a later segment. Recovery never reads it as part of the log.
pub(crate) fn recycled_file_name(id: u64) -> String {
    format!("{id:020}.wal.recycled")
}

/// What a directory entry is to the WAL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DirEntry {
    Segment(u64),
    Preparing(u64),
    /// A recycled spare that last held segment `id`.
    Recycled(u64),
    /// The file that marks the directory as a log ([`LOG_MARKER`]).
    Marker,
    /// A truncation under way ([`TRUNCATE_MARKER`]), or its staging file.
    Truncating,
    Foreign,
}

/// Zeroed bytes a new segment starts with (including its header's place):
/// an empty log costs no more than this on disk. The writer keeps a window
/// of zeroed space ahead of its tail from there on (`writer.rs`).
pub(crate) const FIRST_WINDOW: u64 = 512 << 10;

/// Written when a log directory is created: a log whose directory lacks
/// both it and any segment is a log that was lost, not a new one.
pub(crate) const LOG_MARKER: &str = "LOG";

/// Written (durably, by a rename) before `truncate_after` changes any
/// byte, removed once it is done: `after=<lsn>`. Recovery that finds it
/// finishes the truncation, so a crash in the middle of one (a tail zeroed
/// halfway, later segments half removed) never looks like damage to
/// records that were synced.
pub(crate) const TRUNCATE_MARKER: &str = "TRUNCATE";
/// Where [`TRUNCATE_MARKER`] is written before its rename.
pub(crate) const TRUNCATE_STAGING: &str = "TRUNCATE.new";

/// The LSN of a truncation marker's contents, if they are one.
pub(crate) fn parse_truncate_marker(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().strip_prefix("after=")?.parse().ok()
}

pub(crate) fn classify(name: &str) -> DirEntry {
    let parse = |digits: &str| {
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
    };
    if let Some(id) = name.strip_suffix(".wal.prep").and_then(parse) {
        DirEntry::Preparing(id)
    } else if let Some(id) = name.strip_suffix(".wal.recycled").and_then(parse) {
        DirEntry::Recycled(id)
    } else if let Some(id) = name.strip_suffix(".wal").and_then(parse) {
        DirEntry::Segment(id)
    } else if name == LOG_MARKER {
        DirEntry::Marker
    } else if name == TRUNCATE_MARKER || name == TRUNCATE_STAGING {
        DirEntry::Truncating
    } else {
        DirEntry::Foreign
    }
}

/// A segment as the readers see it.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    pub id: u64,
    pub path: PathBuf,
    pub file: Arc<dyn StorageFile>,
    pub first_lsn: Lsn,
    /// `first_lsn - 1` while the segment holds no record.
    pub last_lsn: Lsn,
    /// End of the last record: where the next one goes.
    pub end_offset: u64,
    /// Offset of record `first_lsn + i * INDEX_STRIDE` at position `i`.
    pub index: Vec<u64>,
}

impl SegmentMeta {
    pub fn new(id: u64, path: PathBuf, file: Arc<dyn StorageFile>, first_lsn: Lsn) -> SegmentMeta {
        SegmentMeta {
            id,
            path,
            file,
            first_lsn,
            last_lsn: first_lsn - 1,
            end_offset: format::SEGMENT_HEADER_LEN as u64,
            index: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.last_lsn < self.first_lsn
    }

    /// Notes a record written at `offset`; records arrive in LSN order.
    pub fn push(&mut self, lsn: Lsn, offset: u64, frame_len: u64) {
        if (lsn - self.first_lsn).is_multiple_of(INDEX_STRIDE) {
            self.index.push(offset);
        }
        self.last_lsn = lsn;
        self.end_offset = offset + frame_len;
    }

    fn expected(&self, log_id: u64, lsn: Option<Lsn>) -> Expected {
        Expected { log_id, segment_id: self.id, lsn }
    }

    fn corruption(&self, offset: u64, error: FrameError) -> Error {
        Error::Corruption { segment_id: self.id, offset, detail: Corruption::BadRecord(error) }
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.file.read_exact_at(offset, len).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                // The file is shorter than records we acknowledged in it.
                self.corruption(offset, FrameError::Truncated)
            } else {
                Error::io(IoOp::Read, &self.path, source)
            }
        })
    }

    /// Reads and verifies the record at `pos`.
    pub fn read_record(&self, log_id: u64, pos: RecordPos) -> Result<Bytes> {
        let frame = format::frame_len(pos.len as usize);
        self.verify(log_id, pos, self.read(pos.offset, frame)?)
    }

    /// [`Segment::read_record`] if its bytes are all in the page cache
    /// (never waits for the disk); `Ok(None)` otherwise.
    pub fn read_record_cached(&self, log_id: u64, pos: RecordPos) -> Result<Option<Bytes>> {
        let frame = format::frame_len(pos.len as usize);
        match self.file.read_cached(pos.offset, frame) {
            Some(bytes) => self.verify(log_id, pos, bytes).map(Some),
            None => Ok(None),
        }
    }

    fn verify(&self, log_id: u64, pos: RecordPos, bytes: Vec<u8>) -> Result<Bytes> {
        let bytes = Bytes::from(bytes);
        let (_, payload) = format::decode_record(&bytes, self.expected(log_id, Some(pos.lsn)))
            .map_err(|e| self.corruption(pos.offset, e))?;
        Ok(bytes.slice(payload))
    }

    /// Reads records from `lsn` on, stopping after the record that reaches
    /// `max_bytes` of payload (at least one record is returned).
    pub fn read_from(&self, log_id: u64, lsn: Lsn, max_bytes: usize, out: &mut Vec<Record>) -> Result<()> {
        let slot = ((lsn.saturating_sub(self.first_lsn)) / INDEX_STRIDE) as usize;
        let mut offset = *self.index.get(slot).ok_or_else(|| self.corruption(0, FrameError::Truncated))?;
        let mut next = self.first_lsn + slot as u64 * INDEX_STRIDE;
        let mut taken = 0usize;
        let mut window = Window { start: offset, bytes: Bytes::new() };
        while next <= self.last_lsn {
            let head = self.fill(&mut window, offset, RECORD_HEADER_LEN)?;
            let len = format::record_len(&head);
            let frame = self.fill(&mut window, offset, format::frame_len(len))?;
            let (header, payload) = format::decode_record(&frame, self.expected(log_id, Some(next)))
                .map_err(|e| self.corruption(offset, e))?;
            if next >= lsn {
                taken += header.len as usize;
                out.push(Record {
                    lsn: next,
                    data: frame.slice(payload),
                    pos: RecordPos { segment_id: self.id, offset, lsn: next, len: header.len },
                });
                if taken >= max_bytes {
                    return Ok(());
                }
            }
            offset += header.frame_len() as u64;
            next += 1;
        }
        Ok(())
    }

    /// The `len` bytes at `offset`, from `window` or from a fresh read of at
    /// least [`READ_CHUNK`] bytes (never past the end of the records).
    fn fill(&self, window: &mut Window, offset: u64, len: usize) -> Result<Bytes> {
        let covered = offset >= window.start && offset + len as u64 <= window.start + window.bytes.len() as u64;
        if !covered {
            let available = self.end_offset.saturating_sub(offset) as usize;
            if available < len {
                return Err(self.corruption(offset, FrameError::Truncated));
            }
            window.bytes = Bytes::from(self.read(offset, len.max(READ_CHUNK).min(available))?);
            window.start = offset;
        }
        let from = (offset - window.start) as usize;
        Ok(window.bytes.slice(from..from + len))
    }
}

/// Bytes of a segment read ahead, starting at file offset `start`.
struct Window {
    start: u64,
    bytes: Bytes,
}

/// The live segments, by id. Readers take a read lock to find a segment and
/// clone its file handle, then read without holding the lock.
#[derive(Debug, Default)]
pub(crate) struct SegmentTable {
    pub segments: BTreeMap<u64, SegmentMeta>,
}

impl SegmentTable {
    pub fn first_lsn(&self) -> Option<Lsn> {
        self.segments.values().next().map(|s| s.first_lsn)
    }

    /// The segment holding `lsn`, if any.
    pub fn find(&self, lsn: Lsn) -> Option<&SegmentMeta> {
        self.segments.values().rev().find(|s| s.first_lsn <= lsn).filter(|s| lsn <= s.last_lsn)
    }
}

/// Path of segment `id` in `dir`.
pub(crate) fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(file_name(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_not_ours() {
        assert_eq!(classify(&file_name(42)), DirEntry::Segment(42));
        assert_eq!(classify(&prep_file_name(7)), DirEntry::Preparing(7));
        assert_eq!(classify(&recycled_file_name(3)), DirEntry::Recycled(3));
        for foreign in ["42.wal", "0000000000000000004x.wal", "meta.json", "", ".wal"] {
            assert_eq!(classify(foreign), DirEntry::Foreign, "{foreign}");
        }
        assert_eq!(file_name(u64::MAX).len(), 24);
    }
}
