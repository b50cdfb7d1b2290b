//! `CURRENT`: which log directory and which compacted store make up the
//! partition. Replacing it (temp file, sync, rename, directory sync) is the
//! one atomic step of a snapshot install and of a compaction.
//!
//! ```text
//! log=wal-2
//! compacted=compacted-3
//! covers=1234
//! ```
//!
//! `covers`: every record of the log up to this LSN is folded into the
//! compacted store, so replay skips them. Without a `CURRENT` file the
//! partition is its `wal` directory alone.

use std::path::Path;
use std::time::SystemTime;

use datanode_wal::{Lsn, Storage};

use crate::state::{Fault, FaultCause};

const CURRENT_FILE: &str = "CURRENT";

/// The compacted store in use and the log prefix it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompactedRef {
    pub name: String,
    pub covers: Lsn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub log: String,
    pub compacted: Option<CompactedRef>,
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest { log: "wal".into(), compacted: None }
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
    /// Reads `CURRENT` from `dir`; a missing file is the default.
    pub fn read(storage: &dyn Storage, dir: &Path) -> Result<Manifest, Fault> {
        let read = crate::durable::read_small_file(storage, &dir.join(CURRENT_FILE), 4096);
        let Some(text) = read.map_err(|e| crate::partition::io_fault("open", &e))? else {
            return Ok(Manifest::default());
        };
        Manifest::parse(&text).ok_or_else(|| Fault {
            cause: FaultCause::Corruption,
            op: "open".into(),
            errno: None,
            message: format!("CURRENT is not a valid manifest: {text:?}"),
            at: SystemTime::now(),
        })
    }

    fn parse(text: &str) -> Option<Manifest> {
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('='));
        let log = field("log")?.to_string();
        log_generation(&log)?;
        let compacted = match (field("compacted"), field("covers")) {
            (Some(name), Some(covers)) => {
                compacted_generation(name)?;
                Some(CompactedRef { name: name.to_string(), covers: covers.parse().ok()? })
            }
            (None, None) => None,
            _ => return None,
        };
        Some(Manifest { log, compacted })
    }

    /// Replaces `CURRENT` atomically and durably.
    pub fn write(&self, storage: &dyn Storage, dir: &Path) -> std::io::Result<()> {
        let mut text = format!("log={}\n", self.log);
        if let Some(compacted) = &self.compacted {
            text.push_str(&format!("compacted={}\ncovers={}\n", compacted.name, compacted.covers));
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
        assert_eq!(Manifest::read(&sim, dir).unwrap(), Manifest::default());
        let manifest =
            Manifest { log: "wal-2".into(), compacted: Some(CompactedRef { name: "compacted-3".into(), covers: 99 }) };
        manifest.write(&sim, dir).unwrap();
        assert_eq!(Manifest::read(&sim, dir).unwrap(), manifest);
        assert!(manifest.supersedes("wal") && manifest.supersedes("compacted-2"));
        assert!(!manifest.supersedes("wal-2") && !manifest.supersedes("FAULT"));
        for bad in ["", "log=../etc", "log=wal\ncompacted=compacted-1", "log=wal\ncompacted=x\ncovers=1"] {
            assert_eq!(Manifest::parse(bad), None, "{bad:?}");
        }
    }
}
