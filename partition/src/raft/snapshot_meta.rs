//! `SNAPSHOT`: a replica's current snapshot: which snapshot store holds
//! it, what it covers, and the membership as of its last entry. Replaced
//! atomically (temp, sync, rename, directory sync, in `durable.rs`) only
//! after the store it names is synced, so a crash leaves the old snapshot
//! or the new one.
//!
//! ```text
//! store=snap.3           the snapshot store's directory, snap.<generation>
//! synced=120             the store's last LSN, synced before this file
//! last=2,1,100           term, leader node id, index of the last entry
//!                        covered; absent: a snapshot of nothing applied
//! membership_log=2,1,90  log id of the membership entry; absent: none
//! membership=0100...     the membership (the body of a membership entry
//!                        in the log's entry layout), in hex
//! check=1a2b3c4d         CRC-32 of every byte before this line, in hex
//! ```

use std::path::Path;

use bytes::Bytes;
use datanode_wal::{Lsn, Storage};
use openraft::impls::leader_id_adv::LeaderId;

use super::codec::{decode_membership_body, encode_membership_body};
use super::error::StoreError;
use super::meta::numbers;
use super::types::{LogId, TypeConfig};
use crate::durable;

/// The file's name in the replica's directory.
pub(crate) const SNAPSHOT_FILE: &str = "SNAPSHOT";
/// Prefix of the snapshot stores (`snap.<generation>`).
pub(crate) const STORE_DIR_PREFIX: &str = "snap.";
/// Longest file read back; a membership of thousands of nodes fits.
const MAX_SNAPSHOT_FILE_LEN: usize = 1 << 20;

/// openraft's description of a snapshot.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A membership with the log id of the entry that carried it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;

/// The contents of `SNAPSHOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotFile {
    /// Generation of the store, `snap.<generation>`.
    pub generation: u32,
    /// The store's last LSN, synced before the file was written.
    pub synced: Lsn,
    pub meta: SnapshotMeta,
}

/// `snap.<generation>`.
pub(crate) fn store_dir_name(generation: u32) -> String {
    format!("{STORE_DIR_PREFIX}{generation}")
}

/// The generation of a snapshot store's directory name.
pub(crate) fn store_generation(name: &str) -> Option<u32> {
    name.strip_prefix(STORE_DIR_PREFIX)?.parse().ok()
}

impl SnapshotFile {
    fn encode(&self) -> String {
        let id = |id: &LogId| format!("{},{},{}", id.leader_id.term, id.leader_id.node_id, id.index);
        let mut text = format!("store={}\nsynced={}\n", store_dir_name(self.generation), self.synced);
        if let Some(last) = &self.meta.last_log_id {
            text.push_str(&format!("last={}\n", id(last)));
        }
        let membership = &self.meta.last_membership;
        if let Some(log_id) = membership.log_id() {
            text.push_str(&format!("membership_log={}\n", id(log_id)));
        }
        text.push_str(&format!("membership={}\n", hex(&encode_membership_body(membership.membership()))));
        let check = crc32fast::hash(text.as_bytes());
        text.push_str(&format!("check={check:08x}\n"));
        text
    }

    fn decode(text: &str) -> Result<SnapshotFile, String> {
        let (body, check) = text.rsplit_once("check=").ok_or("no check line")?;
        let check = u32::from_str_radix(check.trim_end_matches('\n'), 16).map_err(|_| "check is not hex")?;
        if crc32fast::hash(body.as_bytes()) != check {
            return Err("check does not match the contents".into());
        }
        let log_id = |value: &str| -> Result<LogId, String> {
            let [term, node_id, index] = numbers(value)?;
            Ok(LogId::new(LeaderId { term, node_id }, index))
        };
        let (mut generation, mut synced, mut last, mut membership_log, mut membership) = (None, None, None, None, None);
        for line in body.lines().filter(|line| !line.is_empty()) {
            let (key, value) = line.split_once('=').ok_or_else(|| format!("line without '=': {line:?}"))?;
            match key {
                "store" => generation = Some(store_generation(value).ok_or_else(|| format!("store {value:?}"))?),
                "synced" => synced = Some(value.parse::<Lsn>().map_err(|_| format!("synced {value:?}"))?),
                "last" => last = Some(log_id(value)?),
                "membership_log" => membership_log = Some(log_id(value)?),
                "membership" => {
                    let bytes = unhex(value).ok_or("membership is not hex")?;
                    membership = Some(decode_membership_body(&Bytes::from(bytes))?);
                }
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        let last_membership = StoredMembership::new(membership_log, membership.ok_or("no membership line")?);
        Ok(SnapshotFile {
            generation: generation.ok_or("no store line")?,
            synced: synced.ok_or("no synced line")?,
            meta: SnapshotMeta { last_log_id: last, last_membership },
        })
    }

    /// Reads `dir/SNAPSHOT`; `None` when there is none. Blocking.
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<SnapshotFile>, StoreError> {
        let path = dir.join(SNAPSHOT_FILE);
        let text = durable::read_small_file(storage, &path, MAX_SNAPSHOT_FILE_LEN)
            .map_err(|source| StoreError::Io { op: "read", path: path.clone(), source })?;
        text.map(|text| SnapshotFile::decode(&text).map_err(|detail| StoreError::BadSnapshot { path, detail }))
            .transpose()
    }

    /// Replaces `dir/SNAPSHOT` with this one; durable when it returns.
    /// Blocking.
    pub fn store(&self, storage: &dyn Storage, dir: &Path) -> Result<(), StoreError> {
        durable::replace_file(storage, dir, SNAPSHOT_FILE, self.encode()).map_err(|source| StoreError::Io {
            op: "replace",
            path: dir.join(SNAPSHOT_FILE),
            source,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::BasicNode;

    use super::*;
    use crate::raft::types::Membership;

    #[test]
    fn every_field_round_trips_and_any_damage_is_refused() {
        let nodes = BTreeMap::from([(1, BasicNode::new("a:1")), (2, BasicNode::new("b=2\n"))]);
        let membership = Membership::new(vec![BTreeSet::from([1, 2])], nodes).unwrap();
        let log_id = |term, index| LogId::new(LeaderId { term, node_id: 1 }, index);
        let full = SnapshotFile {
            generation: 3,
            synced: 120,
            meta: SnapshotMeta {
                last_log_id: Some(log_id(2, 100)),
                last_membership: StoredMembership::new(Some(log_id(2, 90)), membership),
            },
        };
        let empty = SnapshotFile { generation: 1, synced: 0, meta: SnapshotMeta::default() };
        for file in [full, empty] {
            let text = file.encode();
            assert_eq!(SnapshotFile::decode(&text).unwrap(), file);
            for cut in 0..text.len() - 1 {
                assert!(SnapshotFile::decode(&text[..cut]).is_err(), "cut at {cut}");
            }
            let mut changed = text.clone().into_bytes();
            changed[8] ^= 1;
            assert!(SnapshotFile::decode(&String::from_utf8_lossy(&changed)).is_err());
        }
    }
}
