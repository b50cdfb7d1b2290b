//! The sticky fault record: `FAULT` in the partition's directory.
//!
//! A fault survives a restart because it is written here, durably (temp
//! file, fsync, rename, directory fsync), before anything else is tried.
//! Only a successful recover removes it. The format is plain text, one
//! `key=value` per line, so an operator can read it with `cat`:
//!
//! ```text
//! cause=io
//! op=sync
//! errno=5
//! at=1763700000
//! message=sync failed on ...: Input/output error (os error 5)
//! ```
//!
//! A file that cannot be parsed still means "faulted" (cause `unknown`):
//! a damaged fault record must never clear a fault.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use datanode_wal::Storage;

use crate::state::{Fault, FaultCause};

/// File name of the fault record inside a partition directory.
pub const FAULT_FILE: &str = "FAULT";

/// Writes the fault record durably.
pub fn write(storage: &dyn Storage, dir: &Path, fault: &Fault) -> std::io::Result<()> {
    crate::durable::replace_file(storage, dir, FAULT_FILE, encode(fault))
}

/// The record's text: one `key=value` per line, the message last.
pub(crate) fn encode(fault: &Fault) -> String {
    let at = fault.at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let errno = fault.errno.map(|e| e.to_string()).unwrap_or_default();
    let message = fault.message.replace('\n', " ");
    format!("cause={}\nop={}\nerrno={errno}\nat={at}\nmessage={message}\n", fault.cause.as_str(), fault.op)
}

/// Reads the fault record, if there is one.
pub fn read(storage: &dyn Storage, dir: &Path) -> std::io::Result<Option<Fault>> {
    let text = crate::durable::read_small_file(storage, &dir.join(FAULT_FILE), 64 << 10)?;
    Ok(text.as_deref().map(parse))
}

/// Removes the fault record durably.
pub fn clear(storage: &dyn Storage, dir: &Path) -> std::io::Result<()> {
    match storage.remove_file(&dir.join(FAULT_FILE)) {
        Ok(()) => storage.sync_dir(dir),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// Parses a record; what is missing or damaged gets a safe default.
pub(crate) fn parse(text: &str) -> Fault {
    let field =
        |name: &str| text.lines().find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')));
    Fault {
        cause: field("cause").map_or(FaultCause::Unknown, FaultCause::parse),
        op: field("op").unwrap_or("unknown").to_string(),
        errno: field("errno").and_then(|e| e.parse().ok()),
        message: field("message").unwrap_or("unreadable fault record").to_string(),
        at: UNIX_EPOCH + Duration::from_secs(field("at").and_then(|a| a.parse().ok()).unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datanode_wal::storage::SimStorage;
    use std::time::SystemTime;

    #[test]
    fn a_fault_round_trips_and_clears() {
        let sim = SimStorage::new(1);
        let dir = Path::new("/p/1");
        assert_eq!(read(&sim, dir).unwrap(), None);
        let fault = Fault {
            cause: FaultCause::Io,
            op: "sync".into(),
            errno: Some(5),
            message: "EIO\nsecond line".into(),
            at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        write(&sim, dir, &fault).unwrap();
        let back = read(&sim, dir).unwrap().unwrap();
        assert_eq!(back, Fault { message: "EIO second line".into(), ..fault });
        clear(&sim, dir).unwrap();
        assert_eq!(read(&sim, dir).unwrap(), None);
    }

    #[test]
    fn a_damaged_record_still_means_faulted() {
        let parsed = parse("\u{0}garbage");
        assert_eq!(parsed.cause, FaultCause::Unknown);
        assert_eq!(parsed.errno, None);
    }

    #[test]
    fn the_record_survives_a_crash_once_written() {
        let sim = SimStorage::new(2);
        let dir = Path::new("/p/2");
        let fault = Fault {
            cause: FaultCause::Corruption,
            op: "read".into(),
            errno: None,
            message: "x".into(),
            at: SystemTime::now(),
        };
        write(&sim, dir, &fault).unwrap();
        for _ in 0..20 {
            assert_eq!(read(&sim.crash_image(), dir).unwrap().map(|f| f.cause), Some(FaultCause::Corruption));
        }
    }
}
