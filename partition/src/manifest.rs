//! `CURRENT`: which log directory and which compacted store make up the
//! partition. Replacing it (temp file, sync, rename, directory sync) is the
//! one atomic step of a snapshot install and of a compaction.
//!
//! ```text
//! log=wal-2
//! log_synced=50
//! compacted=compacted-3
//! covers=1234
//! compacted_synced=900
//! ```
//!
//! `covers`: every record of the log up to this LSN is folded into the
//! compacted store, so replay skips them. `log_synced` and
//! `compacted_synced`: the last LSN of the log (as an install wrote it) and
//! of the compacted store that were synced before this file was renamed
//! into place; recovery treats damage at or below them as corruption,
//! never as a torn tail (such logs are written in bulk, and their records
//! carry no proof of their own that they were synced).
//!
//! A partition writes its `CURRENT` (naming `wal`) when it is first
//! opened. One without it is new, or its `wal` directory alone (partitions
//! created before the file existed), but only if no other log or compacted
//! directory is there: then the file was lost, and the partition is
//! faulted, never reset to `wal`, so that nothing is removed on a guess
//! (invariant: metadata loss never deletes data). What `CURRENT` names
//! must exist: a log directory that is gone is a fault too, never replaced
//! by an empty log.

use std::path::Path;

use datanode_wal::{Lsn, Storage};

use crate::state::Fault;

/// The file's name in the partition's directory.
pub(crate) const CURRENT_FILE: &str = "CURRENT";

/// The compacted store in use and the log prefix it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompactedRef {
    pub name: String,
    pub covers: Lsn,
    /// Last LSN of the store, synced before `CURRENT` named it.
    pub synced: Lsn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub log: String,
    /// Last LSN of the log known synced when `CURRENT` named it (an
    /// installed image); 0 for a log that was only ever appended to.
    pub log_synced: Lsn,
    pub compacted: Option<CompactedRef>,
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest { log: "wal".into(), log_synced: 0, compacted: None }
    }
}

/// The generation of a log directory name: `wal` is 0, `wal-N` is N.
pub(crate) fn log_generation(name: &str) -> Option<u64> {
    match name {
        "wal" => Some(0),
        _ => generation(name, "wal-"),
    }
}

/// The generation of a compacted store name, `compacted-N`.
pub(crate) fn compacted_generation(name: &str) -> Option<u64> {
    generation(name, "compacted-")
}

fn generation(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

impl Manifest {
    /// Reads `CURRENT` from `dir`. `None`: there is none, and the
    /// partition is its `wal` directory alone. A `CURRENT` that is missing
    /// while other log or compacted directories exist, or that cannot be
    /// read or parsed, is a fault: the partition's metadata is lost, and
    /// nothing may be removed on a guess.
    pub fn read(storage: &dyn Storage, dir: &Path) -> Result<Option<Manifest>, Fault> {
        let read = crate::durable::read_small_file(storage, &dir.join(CURRENT_FILE), 4096);
        let Some(text) = read.map_err(|e| Fault::io("open", &e))? else {
            let names = storage.list_dir(dir).map_err(|e| Fault::io("open", &e))?;
            let mut orphans: Vec<&String> =
                names.iter().filter(|name| *name != "wal" && Manifest::default().supersedes(name)).collect();
            orphans.sort();
            return match orphans.is_empty() {
                true => Ok(None),
                false => Err(Fault::corruption(
                    "open",
                    format!("CURRENT is missing but {orphans:?} exist: the partition's metadata is lost"),
                )),
            };
        };
        Manifest::parse(&text)
            .map(Some)
            .ok_or_else(|| Fault::corruption("open", format!("CURRENT is not a valid manifest: {text:?}")))
    }

    fn parse(text: &str) -> Option<Manifest> {
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('='));
        let lsn = |name: &str| -> Option<Lsn> { field(name).map_or(Some(0), |value| value.parse().ok()) };
        let log = field("log")?.to_string();
        log_generation(&log)?;
        let compacted = match (field("compacted"), field("covers")) {
            (Some(name), Some(covers)) => {
                compacted_generation(name)?;
                Some(CompactedRef {
                    name: name.to_string(),
                    covers: covers.parse().ok()?,
                    synced: lsn("compacted_synced")?,
                })
            }
            (None, None) => None,
            _ => return None,
        };
        Some(Manifest { log, log_synced: lsn("log_synced")?, compacted })
    }

    /// Replaces `CURRENT` atomically and durably.
    pub fn write(&self, storage: &dyn Storage, dir: &Path) -> std::io::Result<()> {
        let mut text = format!("log={}\n", self.log);
        if self.log_synced > 0 {
            text.push_str(&format!("log_synced={}\n", self.log_synced));
        }
        if let Some(compacted) = &self.compacted {
            text.push_str(&format!("compacted={}\ncovers={}\n", compacted.name, compacted.covers));
            if compacted.synced > 0 {
                text.push_str(&format!("compacted_synced={}\n", compacted.synced));
            }
        }
        crate::durable::replace_file(storage, dir, CURRENT_FILE, text)
    }

    /// Whether `name` is a log or compacted directory this manifest does
    /// not use (a leftover of an install or compaction).
    pub fn supersedes(&self, name: &str) -> bool {
        let ours = name == self.log || self.compacted.as_ref().is_some_and(|c| c.name == name);
        !ours && (log_generation(name).is_some() || compacted_generation(name).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datanode_wal::storage::SimStorage;

    #[test]
    fn manifests_round_trip_and_bad_ones_are_refused() {
        let sim = SimStorage::new(1);
        let dir = Path::new("/p");
        assert_eq!(Manifest::read(&sim, dir).unwrap(), None);
        let manifest = Manifest {
            log: "wal-2".into(),
            log_synced: 7,
            compacted: Some(CompactedRef { name: "compacted-3".into(), covers: 99, synced: 40 }),
        };
        manifest.write(&sim, dir).unwrap();
        assert_eq!(Manifest::read(&sim, dir).unwrap(), Some(manifest.clone()));
        assert!(manifest.supersedes("wal") && manifest.supersedes("compacted-2"));
        assert!(!manifest.supersedes("wal-2") && !manifest.supersedes("FAULT"));
        for bad in ["", "log=../etc", "log=wal\ncompacted=compacted-1", "log=wal\ncompacted=x\ncovers=1"] {
            assert_eq!(Manifest::parse(bad), None, "{bad:?}");
        }
    }
}
