//! Where things live on a disk (operators rely on it):
//!
//! ```text
//! <disk>/partitions/<id>/                  a partition: PARTITION, CURRENT, its logs, FAULT
//! <disk>/partitions/.staging-<id>-<gen>/   a create in progress
//! <disk>/partitions/.deleting-<id>-<gen>/  an operator delete in progress
//! <disk>/quarantine/<name>.<nanos>         what the verifier did not recognise
//! <disk>/.datanode-probe                   the disk probe's canary file
//! <disk>/.datanode-faults                  the node's fault journal (see `fault_journal.rs`)
//! ```
//!
//! Nothing of one partition lives in another's directory, and no two
//! partitions share a file. Names are built here from integers and
//! validated disk names only: no request can name a path.

use std::path::PathBuf;

/// The file that marks a directory as a partition and names it.
pub const META_FILE: &str = "PARTITION";

/// A disk the registry places partitions on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDir {
    /// Its name (`[a-z0-9_-]{1,32}`, validated by the caller).
    pub name: String,
    /// Its mount point or directory.
    pub path: PathBuf,
}

impl DiskDir {
    /// `<disk>/partitions`.
    pub fn partitions_dir(&self) -> PathBuf {
        self.path.join("partitions")
    }

    /// `<disk>/quarantine`.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.path.join("quarantine")
    }

    /// `<disk>/partitions/<id>`.
    pub fn partition_dir(&self, id: u64) -> PathBuf {
        self.partitions_dir().join(id.to_string())
    }
}
