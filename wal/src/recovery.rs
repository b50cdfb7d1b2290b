//! Opening a log directory: find the durable end, repair a torn tail,
//! refuse corruption.
//!
//! The rule (invariant 3): invalid bytes with nothing durable after them are
//! a torn tail, zeroed and forgotten; invalid bytes that something durable
//! proves were synced are corruption, reported and left untouched. What
//! proves it:
//!
//! - a later record of this segment whose `synced_lsn` (the writer's durable
//!   LSN when it was written) reaches the first LSN that fails to decode;
//! - a later segment with a valid header: a segment is synced whole before
//!   the next one is started;
//! - for a damaged segment header, any valid record of the segment: the
//!   header is synced before the first record is written behind it.
//!
//! A valid record after the bad bytes that does *not* prove them synced
//! belongs to the same unsynced write, whose pages reached the disk out of
//! order; it was never acknowledged and goes with the torn tail.
//!
//! A `TRUNCATE` marker (`after=N`) is a truncation a crash interrupted:
//! recovery finishes it (segments wholly after N removed, the tail after N
//! zeroed) and nothing past N counts as proof, since the old tail may be
//! left whole behind bytes the truncation zeroed first.
//!
//! # Recycled segments
//!
//! A segment written into a recycled file (its header has the `recycled`
//! flag) holds, past its records, stale records of the segments the file
//! held before. Each of those names a lower segment id than this segment
//! (a spare only becomes a segment newer than any it held, see
//! `prepare.rs`), so none of them decodes as a record of this segment,
//! whatever its checksum and LSN; none counts as proof of anything either.
//! So in such a segment only the records of *this* segment past the last
//! valid one are looked at: they are a torn write (zeroed, so none can line
//! up behind a later record and come back), or, proving the bad bytes
//! synced, corruption. The stale bytes are the end of the log: not
//! corruption, and not zeroed. A sealed recycled segment's records are
//! bounded by the next segment's first LSN, which turns damage to its last
//! records into a gap, i.e. corruption.
//!
//! Recycled spares (`.wal.recycled`) are never scanned. The writer gives a
//! spare its new header (synced) before it renames it to a segment name,
//! so a crash leaves either a spare (whatever its header holds, old, torn
//! or new) or a segment with its own durable header and no record yet;
//! never a segment name over another segment's header. A purge renames the
//! spare without touching its bytes, so a power cut that undoes the rename
//! leaves the old segment whole.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::Lsn;
use crate::error::{Corruption, Error, IoOp, Result};
use crate::format::{self, Expected, FrameError, RECORD_ALIGN, SEGMENT_HEADER_LEN, SegmentHeader};
use crate::segment::{self, DirEntry, SegmentMeta};
use crate::storage::{Storage, StorageFile};

/// What [`recover`] found.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Segments holding records (or at least a durable header), in order.
    pub segments: Vec<SegmentMeta>,
    /// A zeroed, unused segment that directly follows the last used one.
    pub spare: Option<Spare>,
    /// Recycled spares (purged segments kept for reuse), oldest first.
    pub recycled: Vec<Recycled>,
    /// The id the next new segment gets.
    pub next_segment_id: u64,
    /// Torn bytes zeroed at the end of the log.
    pub torn_bytes: u64,
}

/// An unused segment file ready to become the active one.
#[derive(Debug)]
pub(crate) struct Spare {
    pub id: u64,
    pub file: Arc<dyn StorageFile>,
}

/// A purged segment's file kept to become a later segment: it still holds
/// its old header and records. Never read as part of the log.
#[derive(Debug)]
pub(crate) struct Recycled {
    /// The segment id the file held last (its name says so); every record
    /// in it carries this id or a lower one.
    pub last_id: u64,
    pub path: std::path::PathBuf,
    pub file: Arc<dyn StorageFile>,
}

/// One segment's bytes, decoded as far as they go.
struct Scan {
    header: std::result::Result<Option<SegmentHeader>, FrameError>,
    meta: SegmentMeta,
    /// Where decoding stopped on bytes that are not all zero, and why.
    stop: Option<(u64, FrameError)>,
    /// Records after `stop` prove the bad bytes were synced: corruption.
    proven_durable: bool,
    /// One past the last non-zero byte at or after the end of the records.
    dirty_end: u64,
}

impl Scan {
    fn header_ok(&self) -> bool {
        matches!(self.header, Ok(Some(_)))
    }
}

/// Recovers the log in `dir`; see the module docs for the rules.
/// `known_durable` is an LSN the caller knows was synced (see
/// [`crate::WalOptions::known_durable_lsn`]): damage at or below it is
/// corruption, whatever the records prove. Up to `keep_recycled` recycled
/// spares are kept (the newest), the others removed.
pub(crate) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    log_id: u64,
    known_durable: Lsn,
    keep_recycled: usize,
) -> Result<Recovered> {
    let names = storage.list_dir(dir).map_err(|e| Error::io(IoOp::Metadata, dir, e))?;
    let mut ids = Vec::new();
    let mut recycled_ids = Vec::new();
    let mut truncating = false;
    for name in names {
        match segment::classify(&name) {
            DirEntry::Segment(id) => ids.push(id),
            DirEntry::Recycled(id) => recycled_ids.push(id),
            DirEntry::Preparing(_) => {
                // A pre-write interrupted by a crash: zeros under a name no
                // reader uses.
                let path = dir.join(&name);
                match storage.remove_file(&path) {
                    // Gone already: its pre-writer cleaned up after itself.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    result => result.map_err(|e| Error::io(IoOp::Metadata, &path, e))?,
                }
            }
            DirEntry::Marker => {}
            DirEntry::Truncating if name == segment::TRUNCATE_MARKER => truncating = true,
            DirEntry::Truncating => {
                // A marker that was never renamed into place: its truncation
                // had not begun.
                let path = dir.join(&name);
                storage.remove_file(&path).map_err(|e| Error::io(IoOp::Metadata, &path, e))?;
            }
            DirEntry::Foreign => tracing::warn!(dir = %dir.display(), name, "ignoring unknown file in WAL directory"),
        }
    }
    // A truncation that a crash interrupted: everything after `limit` goes,
    // whatever state the crash left it in (see `TRUNCATE_MARKER`).
    let marker = dir.join(segment::TRUNCATE_MARKER);
    let limit = match truncating {
        false => None,
        true => {
            let bytes = read_small(storage, &marker)?;
            let lsn = segment::parse_truncate_marker(&bytes)
                .ok_or_else(|| Error::Invalid(format!("{} holds no truncation: {bytes:?}", marker.display())))?;
            tracing::warn!(dir = %dir.display(), after = lsn, "finishing a truncation a crash interrupted");
            Some(lsn)
        }
    };
    ids.sort_unstable();
    recycled_ids.sort_unstable();
    let surplus = recycled_ids.len().saturating_sub(keep_recycled);
    let mut recycled = Vec::new();
    for (rank, id) in recycled_ids.into_iter().enumerate() {
        let path = dir.join(segment::recycled_file_name(id));
        if rank < surplus {
            // Its content is of no use to anyone: the log never reads it.
            storage.remove_file(&path).map_err(|e| Error::io(IoOp::Metadata, &path, e))?;
        } else {
            let file = storage.open(&path, false).map_err(|e| Error::io(IoOp::Open, &path, e))?;
            recycled.push(Recycled { last_id: id, path, file });
        }
    }

    let mut used: Vec<Scan> = Vec::new();
    let mut unused: Vec<Scan> = Vec::new();
    // One read buffer for every segment of the log.
    let mut buf = Vec::new();
    // The first missing id, if any. Unused segments past a gap are
    // leftovers of a failed roll; a used one means a segment was lost.
    let mut gap: Option<u64> = None;
    let mut previous_id: Option<u64> = None;
    for id in ids.iter().copied() {
        if let Some(previous) = previous_id
            && gap.is_none()
            && id != previous + 1
        {
            gap = Some(previous + 1);
        }
        previous_id = Some(id);
        let expected_first = used.last().map(|s| s.meta.last_lsn + 1);
        let scan = scan_segment(storage, dir, log_id, id, expected_first, limit, &mut buf)?;
        // Wholly after the truncation: its removal had not happened yet. But
        // a segment that starts right after the cut and has no used segment
        // before it is the one the truncation keeps (empty): its header is
        // the log's only record of its numbering.
        let keeps_numbering = |first: Lsn| first == limit.map_or(0, |l| l + 1) && used.is_empty();
        if let Some(limit) = limit
            && scan.header_ok()
            && scan.meta.first_lsn > limit
            && !keeps_numbering(scan.meta.first_lsn)
        {
            storage.remove_file(&scan.meta.path).map_err(|e| Error::io(IoOp::Metadata, &scan.meta.path, e))?;
            continue;
        }
        if scan.proven_durable {
            return Err(corruption_at(&scan));
        }
        if let Some(missing) = gap.filter(|_| scan.header_ok()) {
            return Err(Error::Corruption { segment_id: missing, offset: 0, detail: Corruption::MissingSegment });
        }
        if scan.header_ok() {
            if let Some(first_unused) = unused.first() {
                // A durable segment after one without a durable header.
                return Err(corruption_at(first_unused));
            }
            if let Some(previous) = used.last()
                && previous.stop.is_some()
            {
                // Sealed segments are synced whole before the next starts.
                return Err(corruption_at(previous));
            }
            if let Some(expected) = expected_first
                && scan.meta.first_lsn != expected
            {
                return Err(Error::Corruption {
                    segment_id: id,
                    offset: 0,
                    detail: Corruption::Gap { expected, found: scan.meta.first_lsn },
                });
            }
            used.push(scan);
        } else {
            unused.push(scan);
        }
    }

    let last_lsn = used.last().map_or(0, |s| s.meta.last_lsn);
    if last_lsn < known_durable {
        // Records that were durable are gone or damaged: never truncate them.
        return Err(match used.last().filter(|s| s.stop.is_some()).or(unused.first()) {
            Some(scan) if scan.stop.is_some() || scan.header.is_err() => corruption_at(scan),
            _ => Error::Corruption {
                segment_id: used.last().map_or(0, |s| s.meta.id),
                offset: used.last().map_or(0, |s| s.meta.end_offset),
                detail: Corruption::LostRecords { durable: known_durable, last: last_lsn },
            },
        });
    }
    let mut torn_bytes = 0;
    if let Some(last) = used.last_mut()
        && let Some((offset, error)) = last.stop.take()
    {
        tracing::warn!(dir = %dir.display(), segment = last.meta.id, offset, %error, "truncating torn tail");
        torn_bytes += zero_range(last, offset)?;
    }
    if limit.is_some() {
        // The tail after the truncation is zeroed and synced above.
        storage.remove_file(&marker).map_err(|e| Error::io(IoOp::Metadata, &marker, e))?;
    }
    let mut spare = None;
    let next_after_used = used.last().map(|s| s.meta.id + 1);
    for mut scan in unused {
        let is_next = next_after_used.is_none_or(|next| next == scan.meta.id) && spare.is_none();
        if is_next {
            torn_bytes += zero_range(&mut scan, 0)?;
            spare = Some(Spare { id: scan.meta.id, file: scan.meta.file });
        } else {
            // Only one segment is ever prepared ahead; a second unused one
            // is left over from a truncation and holds nothing of the log.
            storage.remove_file(&scan.meta.path).map_err(|e| Error::io(IoOp::Metadata, &scan.meta.path, e))?;
        }
    }
    // Whatever the directory holds now becomes durable before anything is
    // acknowledged on top of it: a spare about to take records (a crash
    // between a pre-write's rename and its directory sync leaves a name a
    // power cut can still undo), files removed above, and what an earlier
    // run changed but failed to sync (a truncation marker's removal, a
    // purge's rename), which a power cut could otherwise still undo under
    // records acknowledged later. One directory sync per open.
    storage.sync_dir(dir).map_err(|e| Error::io(IoOp::SyncDir, dir, e))?;
    let next_segment_id = spare.as_ref().map(|s| s.id).or(next_after_used).or(ids.last().map(|id| id + 1)).unwrap_or(1);
    Ok(Recovered { segments: used.into_iter().map(|s| s.meta).collect(), spare, recycled, next_segment_id, torn_bytes })
}

/// A small file's contents (a marker).
fn read_small(storage: &dyn Storage, path: &Path) -> Result<Vec<u8>> {
    let file = storage.open(path, false).map_err(|e| Error::io(IoOp::Open, path, e))?;
    let len = file.file_len().map_err(|e| Error::io(IoOp::Metadata, path, e))?;
    if len > 4096 {
        return Err(Error::Invalid(format!("{} is {len} bytes, not a marker", path.display())));
    }
    file.read_exact_at(0, len as usize).map_err(|e| Error::io(IoOp::Read, path, e))
}

fn corruption_at(scan: &Scan) -> Error {
    match (&scan.header, scan.stop) {
        (Err(error), _) => {
            Error::Corruption { segment_id: scan.meta.id, offset: 0, detail: Corruption::BadSegmentHeader(*error) }
        }
        (_, Some((offset, error))) => {
            Error::Corruption { segment_id: scan.meta.id, offset, detail: Corruption::BadRecord(error) }
        }
        (_, None) => Error::Corruption {
            segment_id: scan.meta.id,
            offset: scan.meta.end_offset,
            detail: Corruption::BadRecord(FrameError::Truncated),
        },
    }
}

/// Zeroes `[from, dirty_end)` of a segment and syncs it, so no torn or
/// stale record can ever be read as part of the log again.
fn zero_range(scan: &mut Scan, from: u64) -> Result<u64> {
    let from = if scan.header_ok() { from.max(SEGMENT_HEADER_LEN as u64) } else { 0 };
    if scan.dirty_end <= from {
        return Ok(0);
    }
    let len = (scan.dirty_end - from) as usize;
    let path = &scan.meta.path;
    scan.meta
        .file
        .write_all_and_sync(from, &[Bytes::from(vec![0u8; len])])
        .map_err(|(op, e)| Error::io(op, path, e))?;
    scan.dirty_end = from;
    Ok(len as u64)
}

fn scan_segment(
    storage: &dyn Storage,
    dir: &Path,
    log_id: u64,
    id: u64,
    expected_first: Option<Lsn>,
    limit: Option<Lsn>,
    buf: &mut Vec<u8>,
) -> Result<Scan> {
    let path = segment::path(dir, id);
    let file = storage.open(&path, false).map_err(|e| Error::io(IoOp::Open, &path, e))?;
    // Read what is on the disk, not what the page cache shows: flush what
    // is legitimately dirty, then drop the cached pages, which after a
    // failed sync may hold bytes that never reached the disk (fsyncgate).
    file.sync_data().map_err(|e| Error::io(IoOp::Sync, &path, e))?;
    file.drop_cache().map_err(|e| Error::io(IoOp::Read, &path, e))?;
    let len = file.file_len().map_err(|e| Error::io(IoOp::Metadata, &path, e))?;
    let len = usize::try_from(len).map_err(|_| Error::Invalid(format!("{} is too large", path.display())))?;
    file.read_exact_into(0, len, buf).map_err(|e| Error::io(IoOp::Read, &path, e))?;
    let bytes: &[u8] = buf;

    let header = SegmentHeader::decode(bytes);
    if let Ok(Some(h)) = header
        && (h.log_id != log_id || h.segment_id != id)
    {
        return Err(Error::Corruption { segment_id: id, offset: 0, detail: Corruption::ForeignSegment });
    }
    let first_lsn = match header {
        Ok(Some(h)) => h.first_lsn,
        _ => expected_first.unwrap_or(1),
    };
    let mut meta = SegmentMeta::new(id, path, file, first_lsn);
    let mut offset = 0;
    if matches!(header, Ok(Some(_))) {
        offset = SEGMENT_HEADER_LEN;
        loop {
            let expected = Expected { log_id, segment_id: id, lsn: Some(meta.last_lsn + 1) };
            match bytes.get(offset..).map(|rest| format::decode_record(rest, expected)) {
                Some(Ok((record, _))) if limit.is_none_or(|limit| record.lsn <= limit) => {
                    meta.push(record.lsn, offset as u64, record.frame_len() as u64);
                    offset += record.frame_len();
                }
                _ => break,
            }
        }
    }
    // Where the bytes that may belong to this segment end. A fresh segment
    // is zeros past its records (its first window is written as zeros, and
    // the writer extends it with zeros), so any non-zero byte there is
    // torn or damaged. A recycled one is stale records of the lower
    // segment ids it held before, which can never decode as this
    // segment's: only a record of this segment there is torn (written, not
    // acknowledged) and must go; the stale bytes are the end of the log.
    let recycled = matches!(header, Ok(Some(h)) if h.recycled);
    let dirty_end = if recycled {
        own_records_after(bytes, offset, log_id, id).map_or(offset, |own| own.end.max(offset))
    } else {
        bytes.iter().rposition(|b| *b != 0).map_or(0, |last| last + 1).max(offset)
    };
    let mut scan = Scan { header, meta, stop: None, proven_durable: false, dirty_end: dirty_end as u64 };
    if dirty_end > offset {
        let error = match scan.header {
            Err(error) => error,
            _ => bytes
                .get(offset..)
                .map(|rest| format::decode_record(rest, Expected { log_id, segment_id: id, lsn: None }))
                .and_then(|r| r.err())
                .unwrap_or(FrameError::Truncated),
        };
        scan.stop = Some((offset as u64, error));
        let highest_synced = own_records_after(bytes, offset + RECORD_ALIGN, log_id, id).map(|own| own.highest_synced);
        // Past an interrupted truncation's point nothing proves anything:
        // it is all to go.
        let truncated = limit.is_some_and(|limit| scan.meta.last_lsn >= limit);
        scan.proven_durable = match (scan.header_ok(), highest_synced) {
            _ if truncated => false,
            (_, None) => false,
            // The first LSN that failed to decode was synced before a later
            // record was written.
            (true, Some(highest)) => highest > scan.meta.last_lsn,
            // The header is synced before any record is written behind it.
            (false, Some(_)) => true,
        };
    }
    Ok(scan)
}

/// What [`own_records_after`] found.
struct OwnRecords {
    /// The highest `synced_lsn` among them.
    highest_synced: Lsn,
    /// One past the last byte of the last of them.
    end: usize,
}

/// The valid records of this log and segment (any LSN) that start at or
/// after `from`; `None` when there is no such record.
fn own_records_after(bytes: &[u8], from: usize, log_id: u64, id: u64) -> Option<OwnRecords> {
    let expected = Expected { log_id, segment_id: id, lsn: None };
    let last_start = bytes.len().checked_sub(format::RECORD_HEADER_LEN)?;
    (from.next_multiple_of(RECORD_ALIGN)..=last_start)
        .step_by(RECORD_ALIGN)
        .filter(|at| bytes.get(*at..).is_some_and(format::has_record_magic))
        // Stale records of a recycled file are skipped on their ids, before
        // their checksum is computed.
        .filter(|at| bytes.get(*at..).is_some_and(|head| format::record_owner(head) == Some((log_id, id))))
        .filter_map(|at| format::decode_record(bytes.get(at..)?, expected).ok().map(|(record, _)| (at, record)))
        .fold(None, |found: Option<OwnRecords>, (at, record)| {
            let end = at + record.frame_len();
            Some(match found {
                Some(own) => {
                    OwnRecords { highest_synced: own.highest_synced.max(record.synced_lsn), end: own.end.max(end) }
                }
                None => OwnRecords { highest_synced: record.synced_lsn, end },
            })
        })
}
