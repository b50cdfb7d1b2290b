//! `RAFT`: a replica's small durable state beside its log: the vote, the
//! last purged log id, a committed log id, and which log directory holds
//! the Raft log and the LSN its first record takes. Replaced atomically (temp, sync, rename,
//! directory sync, in `durable.rs`), so a crash leaves the old state or the
//! new; whoever changes it returns only after the rename is durable.
//!
//! ```text
//! vote=3,2,1         term, node id, committed (0 or 1); absent: no vote
//! purged=2,1,100     term, leader node id, index; absent: nothing purged
//! committed=2,1,140  a committed log id (not necessarily the last one,
//!                    see `LogStore::save_committed`); absent: none known
//! log=log.4          the live log directory
//! log_start=102      LSN of the first record of that log when it was made
//! ```
//!
//! `log_start` matters for a log with no record yet (a WAL keeps no trace
//! of its first LSN until it holds a record): a log restarted at index N
//! (after a snapshot is installed beyond the local log) is reopened at N.

use std::path::Path;

use datanode_wal::{Lsn, Storage};
use openraft::impls::leader_id_adv::LeaderId;

use super::error::StoreError;
use super::types::{LogId, Vote};
use crate::durable;

/// The file's name in the replica's directory.
pub(crate) const META_FILE: &str = "RAFT";
/// Prefix of the log directories (`log.<generation>`).
pub(crate) const LOG_DIR_PREFIX: &str = "log.";
/// Longest file read back; the real one is far smaller.
const MAX_META_LEN: usize = 4096;

/// The contents of `RAFT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RaftMeta {
    pub vote: Option<Vote>,
    pub purged: Option<LogId>,
    pub committed: Option<LogId>,
    /// Generation of the live log directory, `log.<generation>`.
    pub log_generation: u64,
    pub log_start: Lsn,
}

impl Default for RaftMeta {
    fn default() -> RaftMeta {
        RaftMeta { vote: None, purged: None, committed: None, log_generation: 1, log_start: 1 }
    }
}

impl RaftMeta {
    /// Name of the live log directory.
    pub fn log_dir_name(&self) -> String {
        log_dir_name(self.log_generation)
    }

    fn encode(&self) -> String {
        let mut text = String::new();
        if let Some(vote) = &self.vote {
            let committed = u8::from(vote.committed);
            text.push_str(&format!("vote={},{},{committed}\n", vote.leader_id.term, vote.leader_id.node_id));
        }
        let id = |id: &LogId| format!("{},{},{}", id.leader_id.term, id.leader_id.node_id, id.index);
        if let Some(purged) = &self.purged {
            text.push_str(&format!("purged={}\n", id(purged)));
        }
        if let Some(committed) = &self.committed {
            text.push_str(&format!("committed={}\n", id(committed)));
        }
        text.push_str(&format!("log={}\nlog_start={}\n", self.log_dir_name(), self.log_start));
        text
    }

    fn decode(text: &str) -> Result<RaftMeta, String> {
        let mut vote = None;
        let mut purged = None;
        let mut committed = None;
        let mut log_generation = None;
        let mut log_start = None;
        for line in text.lines().filter(|line| !line.is_empty()) {
            let (key, value) = line.split_once('=').ok_or_else(|| format!("line without '=': {line:?}"))?;
            match key {
                "vote" => {
                    let [term, node_id, committed] = numbers(value)?;
                    let leader_id = LeaderId { term, node_id };
                    vote = Some(match committed {
                        0 => Vote { leader_id, committed: false },
                        1 => Vote { leader_id, committed: true },
                        other => return Err(format!("vote committed flag {other}")),
                    });
                }
                "purged" => {
                    let [term, node_id, index] = numbers(value)?;
                    purged = Some(LogId::new(LeaderId { term, node_id }, index));
                }
                "committed" => {
                    let [term, node_id, index] = numbers(value)?;
                    committed = Some(LogId::new(LeaderId { term, node_id }, index));
                }
                "log" => {
                    let generation = value.strip_prefix(LOG_DIR_PREFIX).and_then(|g| g.parse::<u64>().ok());
                    log_generation = Some(generation.ok_or_else(|| format!("log directory {value:?}"))?);
                }
                "log_start" => log_start = Some(value.parse::<Lsn>().map_err(|_| format!("log_start {value:?}"))?),
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        Ok(RaftMeta {
            vote,
            purged,
            committed,
            log_generation: log_generation.ok_or("no log line")?,
            log_start: log_start.ok_or("no log_start line")?,
        })
    }

    /// Reads `dir/RAFT`; `None` when there is none. Blocking.
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<RaftMeta>, StoreError> {
        let path = dir.join(META_FILE);
        let text = durable::read_small_file(storage, &path, MAX_META_LEN).map_err(|source| StoreError::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        text.map(|text| RaftMeta::decode(&text).map_err(|detail| StoreError::BadMeta { path, detail })).transpose()
    }

    /// Replaces `dir/RAFT` with this state; durable when it returns.
    /// Blocking.
    pub fn store(&self, storage: &dyn Storage, dir: &Path) -> Result<(), StoreError> {
        durable::replace_file(storage, dir, META_FILE, self.encode()).map_err(|source| StoreError::Io {
            op: "replace",
            path: dir.join(META_FILE),
            source,
        })
    }
}

/// `log.<generation>`.
pub(crate) fn log_dir_name(generation: u64) -> String {
    format!("{LOG_DIR_PREFIX}{generation}")
}

pub(crate) fn numbers<const N: usize>(value: &str) -> Result<[u64; N], String> {
    let parsed: Vec<u64> =
        value.split(',').map(|n| n.parse::<u64>()).collect::<Result<_, _>>().map_err(|_| format!("{value:?}"))?;
    parsed.try_into().map_err(|_| format!("{value:?} is not {N} numbers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips_and_damage_is_refused() {
        let meta = RaftMeta {
            vote: Some(Vote { leader_id: LeaderId { term: 3, node_id: 2 }, committed: true }),
            purged: Some(LogId::new(LeaderId { term: 2, node_id: 1 }, 100)),
            committed: Some(LogId::new(LeaderId { term: 3, node_id: 2 }, 140)),
            log_generation: 4,
            log_start: 102,
        };
        assert_eq!(RaftMeta::decode(&meta.encode()).unwrap(), meta);
        assert_eq!(RaftMeta::decode(&RaftMeta::default().encode()).unwrap(), RaftMeta::default());
        for bad in [
            "",
            "vote=1,2\nlog=log.1\nlog_start=1\n",
            "log=wal\nlog_start=1\n",
            "log=log.1\n",
            "x=1\nlog=log.1\nlog_start=1\n",
            "vote=1,2,7\nlog=log.1\nlog_start=1\n",
        ] {
            assert!(RaftMeta::decode(bad).is_err(), "{bad:?}");
        }
    }
}
