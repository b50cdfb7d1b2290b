//! The metadata group's state machine: the [`ClusterMap`], applied from
//! committed [`MapCommand`]s (JSON in the entry's command bytes).
//!
//! The map is small (nodes and replica placements, no data), so it lives
//! in memory and a snapshot is the whole map as JSON. A snapshot is also
//! the only copy of what the log no longer holds once openraft purges it,
//! so it is written to `MAP` in the group's directory (replaced durably:
//! temp, sync, rename, directory sync) before it is reported built or
//! installed, and loaded back at open.
//!
//! `MAP` (JSON): `{"last_log_id": [term, node, index] | null,
//! "membership": {"log_id": ... | null, "configs": [[ids]], "nodes": {id: addr}},
//! "map": ClusterMap}`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use datanode_partition::raft::types::Membership;
use datanode_partition::raft::{LogId, TypeConfig};
use datanode_wal::storage::StdStorage;
use futures_util::{Stream, TryStreamExt};
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{BasicNode, EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::map::{ClusterMap, MapCommand};

type SnapshotMeta = SnapshotMetaOf<TypeConfig>;
type Snapshot = SnapshotOf<TypeConfig, Bytes>;
type StoredMembership = StoredMembershipOf<TypeConfig>;

/// The file holding the last snapshot.
const MAP_FILE: &str = "MAP";
/// Longest `MAP` read back.
const MAX_MAP_LEN: usize = 64 << 20;

/// The state machine of the metadata group. Clones share state.
#[derive(Clone)]
pub struct MetaStateMachine {
    state: Arc<Mutex<State>>,
    dir: PathBuf,
    /// The applied map, for whoever serves it.
    published: watch::Sender<Arc<ClusterMap>>,
}

impl std::fmt::Debug for MetaStateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStateMachine").field("dir", &self.dir).finish()
    }
}

#[derive(Default)]
struct State {
    applied: Option<LogId>,
    membership: StoredMembership,
    map: ClusterMap,
    /// The last snapshot, as in `MAP`.
    snapshot: Option<Snapshot>,
}

/// `MAP` as stored.
#[derive(Serialize, Deserialize)]
struct MapFile {
    last_log_id: Option<[u64; 3]>,
    membership: MembershipFile,
    map: ClusterMap,
}

#[derive(Serialize, Deserialize)]
struct MembershipFile {
    log_id: Option<[u64; 3]>,
    configs: Vec<BTreeSet<u64>>,
    nodes: BTreeMap<u64, String>,
}

fn log_id_file(log_id: &Option<LogId>) -> Option<[u64; 3]> {
    log_id.map(|id| [id.leader_id.term, id.leader_id.node_id, id.index])
}

fn log_id_of(file: Option<[u64; 3]>) -> Option<LogId> {
    file.map(|[term, node_id, index]| LogId::new(LeaderId { term, node_id }, index))
}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

impl MapFile {
    fn of(meta: &SnapshotMeta, map: &ClusterMap) -> MapFile {
        let membership = meta.last_membership.membership();
        MapFile {
            last_log_id: log_id_file(&meta.last_log_id),
            membership: MembershipFile {
                log_id: log_id_file(meta.last_membership.log_id()),
                configs: membership.get_joint_config().clone(),
                nodes: membership.nodes().map(|(id, node)| (*id, node.addr.clone())).collect(),
            },
            map: map.clone(),
        }
    }

    fn meta(&self) -> Result<SnapshotMeta, io::Error> {
        let nodes: BTreeMap<u64, BasicNode> =
            self.membership.nodes.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
        let membership = Membership::new(self.membership.configs.clone(), nodes)
            .map_err(|error| invalid(format!("membership in {MAP_FILE}: {error}")))?;
        Ok(SnapshotMeta {
            last_log_id: log_id_of(self.last_log_id),
            last_membership: StoredMembership::new(log_id_of(self.membership.log_id), membership),
        })
    }
}

impl MetaStateMachine {
    /// Opens the state machine of the group in `dir`, from its `MAP` if it
    /// has one. Blocking.
    pub fn open(dir: &Path) -> Result<MetaStateMachine, io::Error> {
        let storage = StdStorage;
        let mut state = State::default();
        let path = dir.join(MAP_FILE);
        if let Some(text) = datanode_partition::durable::read_small_file(&storage, &path, MAX_MAP_LEN)? {
            let file: MapFile =
                serde_json::from_str(&text).map_err(|error| invalid(format!("{}: {error}", path.display())))?;
            let meta = file.meta()?;
            let bytes = Bytes::from(text.into_bytes());
            state.applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.map = file.map;
            state.snapshot = Some(Snapshot { meta, snapshot: bytes });
        }
        let (published, _) = watch::channel(Arc::new(state.map.clone()));
        Ok(MetaStateMachine { state: Arc::new(Mutex::new(state)), dir: dir.to_path_buf(), published })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The map as applied here (the leader's answer once it has confirmed
    /// its leadership; see `MetaGroup::read_map`).
    pub fn map(&self) -> Arc<ClusterMap> {
        self.published.borrow().clone()
    }

    /// Reads a snapshot sent by the leader (at most the size of a `MAP`)
    /// and checks that it parses, so that a broken one is refused before
    /// openraft installs it (a failed install stops the group). Blocking.
    pub fn read_snapshot(body: &mut dyn std::io::Read) -> Result<Bytes, io::Error> {
        let mut bytes = Vec::new();
        body.take(MAX_MAP_LEN as u64 + 1).read_to_end(&mut bytes)?;
        if bytes.len() > MAX_MAP_LEN {
            return Err(invalid(format!("a metadata snapshot over {MAX_MAP_LEN} bytes")));
        }
        let file: MapFile =
            serde_json::from_slice(&bytes).map_err(|error| invalid(format!("metadata snapshot: {error}")))?;
        file.meta()?;
        Ok(Bytes::from(bytes))
    }

    /// Writes `MAP` durably. Blocking.
    fn store(&self, file: &MapFile) -> Result<Bytes, io::Error> {
        let text = serde_json::to_string(file).map_err(|error| invalid(error.to_string()))?;
        datanode_partition::durable::replace_file(&StdStorage, &self.dir, MAP_FILE, text.clone())?;
        Ok(Bytes::from(text.into_bytes()))
    }

    async fn store_off_thread(&self, file: MapFile) -> Result<Bytes, io::Error> {
        let machine = self.clone();
        tokio::task::spawn_blocking(move || machine.store(&file))
            .await
            .map_err(|error| io::Error::other(format!("storing {MAP_FILE}: {error}")))?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MetaStateMachine {
    type SnapshotData = Bytes;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, file) = {
            let state = self.lock();
            let meta = SnapshotMeta { last_log_id: state.applied, last_membership: state.membership.clone() };
            let file = MapFile::of(&meta, &state.map);
            (meta, file)
        };
        let bytes = self.store_off_thread(file).await?;
        let snapshot = Snapshot { meta, snapshot: bytes };
        self.lock().snapshot = Some(snapshot.clone());
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for MetaStateMachine {
    type SnapshotData = Bytes;
    type SnapshotBuilder = MetaStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let state = self.lock();
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let map = {
                let mut state = self.lock();
                match &entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(command) => {
                        let command: MapCommand = serde_json::from_slice(command.bytes())
                            .map_err(|error| invalid(format!("metadata entry {}: {error}", entry.log_id)))?;
                        state.map.apply(&command);
                    }
                    EntryPayload::Membership(membership) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                    }
                }
                state.applied = Some(entry.log_id);
                Arc::new(state.map.clone())
            };
            self.published.send_replace(map);
            if let Some(responder) = responder {
                responder.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> MetaStateMachine {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Bytes) -> Result<(), io::Error> {
        let file: MapFile =
            serde_json::from_slice(&snapshot).map_err(|error| invalid(format!("metadata snapshot: {error}")))?;
        let already = self.lock().snapshot.as_ref().is_some_and(|current| current.meta == *meta);
        let bytes = if already {
            snapshot
        } else {
            // Stored under the meta openraft gives, which is what the
            // leader sent beside the bytes.
            self.store_off_thread(MapFile::of(meta, &file.map)).await?
        };
        let map = {
            let mut state = self.lock();
            state.map = file.map;
            state.applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.snapshot = Some(Snapshot { meta: meta.clone(), snapshot: bytes });
            Arc::new(state.map.clone())
        };
        self.published.send_replace(map);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.lock().snapshot.clone())
    }
}
