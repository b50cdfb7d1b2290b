//! The metadata group on a seed node: its Raft instance (log over the WAL
//! in `<first disk>/cluster/meta/`, the [`MetaStateMachine`] beside it),
//! and what its leader does: take heartbeats, register nodes, place and
//! remove partitions, answer the cluster view.
//!
//! Only the leader answers, and only after confirming it still is (a
//! read-index round, `ensure_linearizable`): a node never learns the map
//! from a follower's copy, which may be stale.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datanode_partition::raft::{Command, LogStore, TypeConfig};
use datanode_wal::storage::StdStorage;
use datanode_wal::{Durability, Storage, WalOptions};
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, Raft, ReadPolicy};

use super::map::{Candidate, ClusterMap, MapCommand, PartitionEntry, place};
use super::meta_sm::MetaStateMachine;
use super::protocol::{Heartbeat, HeartbeatReply, ReplicaReport};
use super::transport::{GroupNetworkFactory, METADATA_GROUP, PeerPool};
use crate::config::Seed;

/// The metadata group's Raft handle.
pub type MetaRaft = Raft<TypeConfig, MetaStateMachine>;

/// Why the metadata leader could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// This node is not the leader; the leader's seed index, if known.
    #[error("this node is not the metadata leader")]
    NotLeader(Option<u64>),
    /// The group could not commit or confirm (no quorum, stopped).
    #[error("the metadata group did not answer: {0}")]
    Unavailable(String),
    /// The change was proposed and then not seen committed (leader
    /// change, stop): it may still take effect.
    #[error("the metadata change may or may not have taken effect: {0}")]
    OutcomeUnknown(String),
    /// The partition exists already.
    #[error("partition {0} exists")]
    Exists(u64),
    /// No such partition.
    #[error("no partition {0}")]
    NotFound(u64),
    /// Not enough nodes up to place the replicas.
    #[error("{0}")]
    CannotPlace(String),
}

/// The last heartbeat of a node, as the leader saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When it arrived (leader's clock).
    pub at: Instant,
    /// What it said.
    pub heartbeat: Heartbeat,
}

/// The metadata group as a seed runs it.
pub struct MetaGroup {
    /// The Raft instance.
    pub raft: MetaRaft,
    machine: MetaStateMachine,
    /// This seed's id in the group (its position in `seeds`, from 1).
    pub id: u64,
    seeds: Vec<Seed>,
    /// Heartbeats, by node id (only the leader's is current).
    liveness: Mutex<HashMap<String, Seen>>,
    /// When this node last became leader: nodes not heard from since count
    /// as up until `dead_after` has passed.
    leader_since: Mutex<Option<Instant>>,
    dead_after: Duration,
    /// One proposal at a time, so a check and the change it guards are not
    /// interleaved with another's.
    propose: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for MetaGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaGroup").field("id", &self.id).finish()
    }
}

impl MetaGroup {
    /// Opens the group's storage in `dir` and starts its Raft instance; a
    /// fresh seed initializes the group with every seed as a voter.
    pub async fn start(
        dir: &Path,
        wal: WalOptions,
        id: u64,
        seeds: Vec<Seed>,
        config: Arc<openraft::Config>,
        pool: PeerPool,
        dead_after: Duration,
    ) -> anyhow::Result<Arc<MetaGroup>> {
        let storage: Arc<dyn Storage> = Arc::new(StdStorage);
        let options = WalOptions { log_id: 0, durability: Durability::Sync, create_if_missing: true, ..wal };
        let open_dir = dir.to_path_buf();
        let (log, machine) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let log = LogStore::open(storage, &open_dir, options)?;
            let machine = MetaStateMachine::open(&open_dir)?;
            Ok((log, machine))
        })
        .await??;
        let network = GroupNetworkFactory::<MetaStateMachine>::new(pool, METADATA_GROUP, id);
        let raft = Raft::new(id, config, network, log, machine.clone()).await?;
        let members: BTreeMap<u64, BasicNode> = seeds
            .iter()
            .enumerate()
            .map(|(i, seed)| (i as u64 + 1, BasicNode { addr: seed.peer_addr.to_string() }))
            .collect();
        if let Err(error) = raft.initialize(members).await {
            tracing::debug!(%error, "metadata group already initialized");
        }
        Ok(Arc::new(MetaGroup {
            raft,
            machine,
            id,
            seeds,
            liveness: Mutex::new(HashMap::new()),
            leader_since: Mutex::new(None),
            dead_after,
            propose: tokio::sync::Mutex::new(()),
        }))
    }

    /// The map as applied on this member, leader or not: only for hints
    /// (where the leader is), never served as the map.
    pub fn applied_map(&self) -> Arc<ClusterMap> {
        self.machine.map()
    }

    /// A handle on the state machine (for receiving snapshots).
    pub fn machine(&self) -> MetaStateMachine {
        self.machine.clone()
    }

    /// The current leader's seed id, as this member knows it.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// The seed with this id.
    pub fn seed(&self, id: u64) -> Option<&Seed> {
        self.seeds.get(usize::try_from(id.checked_sub(1)?).ok()?)
    }

    /// This member is the leader and has confirmed it with a quorum.
    async fn confirm_leader(&self) -> Result<(), MetaError> {
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(_) => {
                let mut since = self.leader_since.lock().unwrap_or_else(PoisonError::into_inner);
                since.get_or_insert_with(Instant::now);
                Ok(())
            }
            Err(error) => {
                *self.leader_since.lock().unwrap_or_else(PoisonError::into_inner) = None;
                match error.forward_to_leader() {
                    Some(forward) => Err(MetaError::NotLeader(forward.leader_id)),
                    None => Err(MetaError::Unavailable(error.to_string())),
                }
            }
        }
    }

    async fn commit(&self, command: &MapCommand) -> Result<(), MetaError> {
        let bytes = serde_json::to_vec(command).map_err(|e| MetaError::Unavailable(e.to_string()))?;
        match self.raft.client_write(Command::new(Bytes::from(bytes))).await {
            Ok(_) => Ok(()),
            Err(openraft::errors::RaftError::APIError(openraft::errors::ClientWriteError::ForwardToLeader(
                forward,
            ))) => Err(MetaError::NotLeader(forward.leader_id)),
            // Appended, then dropped by a leader change, or the group
            // stopped meanwhile: it may still commit.
            Err(error) => Err(MetaError::OutcomeUnknown(error.to_string())),
        }
    }

    /// The map as committed and applied on the confirmed leader.
    pub async fn read_map(&self) -> Result<Arc<ClusterMap>, MetaError> {
        self.confirm_leader().await?;
        Ok(self.machine.map())
    }

    /// A node's heartbeat: registers it (or its changed URLs and disks)
    /// and answers the map if the node's is older.
    pub async fn heartbeat(&self, heartbeat: Heartbeat) -> Result<HeartbeatReply, MetaError> {
        self.confirm_leader().await?;
        let node = heartbeat.node.clone();
        let entry = heartbeat.entry.clone();
        let known_epoch = heartbeat.map_epoch;
        self.liveness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.clone(), Seen { at: Instant::now(), heartbeat });
        if self.machine.map().nodes.get(&node) != Some(&entry) {
            let _one = self.propose.lock().await;
            if self.machine.map().nodes.get(&node) != Some(&entry) {
                self.commit(&MapCommand::RegisterNode { id: node.clone(), entry }).await?;
            }
        }
        let map = self.machine.map();
        Ok(HeartbeatReply {
            epoch: map.epoch,
            map: (map.epoch > known_epoch).then(|| (*map).clone()),
            leaders: self.leaders(),
        })
    }

    /// The leader of every partition, as its replicas report: the replica
    /// reporting itself leader in the highest term.
    pub fn leaders(&self) -> BTreeMap<u64, u64> {
        let mut best: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for report in self.fresh_reports() {
            if report.role == "leader" {
                let slot = best.entry(report.partition).or_insert((report.term, report.replica_id));
                if report.term >= slot.0 {
                    *slot = (report.term, report.replica_id);
                }
            }
        }
        best.into_iter().map(|(partition, (_, replica))| (partition, replica)).collect()
    }

    /// Replica reports of nodes that are up.
    fn fresh_reports(&self) -> Vec<ReplicaReport> {
        let liveness = self.liveness.lock().unwrap_or_else(PoisonError::into_inner);
        liveness
            .values()
            .filter(|seen| seen.at.elapsed() < self.dead_after)
            .flat_map(|seen| seen.heartbeat.replicas.clone())
            .collect()
    }

    /// Whether `node` is up: heard from within `node_dead_after`, or not
    /// yet due (this leader took over less than that ago).
    pub fn is_up(&self, node: &str) -> bool {
        let liveness = self.liveness.lock().unwrap_or_else(PoisonError::into_inner);
        match liveness.get(node) {
            Some(seen) => seen.at.elapsed() < self.dead_after,
            None => self
                .leader_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|since| since.elapsed() < self.dead_after),
        }
    }

    /// The last heartbeat of every node.
    pub fn seen(&self) -> HashMap<String, Seen> {
        self.liveness.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Places and commits a new partition of `replicas` replicas.
    pub async fn create_partition(&self, id: u64, replicas: usize) -> Result<PartitionEntry, MetaError> {
        self.confirm_leader().await?;
        let _one = self.propose.lock().await;
        let map = self.machine.map();
        if map.partitions.contains_key(&id) {
            return Err(MetaError::Exists(id));
        }
        // A leader that took over moments ago has not heard every node
        // yet: while a registered node it has not heard is still within
        // `node_dead_after` of the takeover, wait for its heartbeat (a
        // little) rather than refuse.
        let deadline = Instant::now() + self.dead_after.min(Duration::from_secs(3));
        let placement = loop {
            let candidates = self.candidates(&map);
            if let Some(placement) = place(&candidates, replicas) {
                break placement;
            }
            let unheard = map.nodes.keys().any(|node| !self.seen().contains_key(node) && self.is_up(node));
            if !unheard || Instant::now() >= deadline {
                return Err(MetaError::CannotPlace(format!(
                    "{replicas} replicas need {replicas} nodes up with a writable disk; {} are",
                    candidates.iter().filter(|c| !c.disks.is_empty()).count()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.commit(&MapCommand::CreatePartition { id, placement: placement.clone() }).await?;
        let map = self.machine.map();
        let entry = map.partitions.get(&id).cloned().ok_or(MetaError::NotFound(id))?;
        let placed: Vec<(String, String)> = entry.replicas.iter().map(|r| (r.node.clone(), r.disk.clone())).collect();
        if placed != placement {
            // Created meanwhile by a request to an earlier leader.
            return Err(MetaError::Exists(id));
        }
        Ok(entry)
    }

    /// The nodes heard from within `node_dead_after`, with their writable
    /// disks and the replicas the map puts on each.
    fn candidates(&self, map: &ClusterMap) -> Vec<Candidate> {
        let seen = self.seen();
        let mut on_disk: HashMap<(&str, &str), usize> = HashMap::new();
        for partition in map.partitions.values() {
            for replica in &partition.replicas {
                *on_disk.entry((replica.node.as_str(), replica.disk.as_str())).or_insert(0) += 1;
            }
        }
        map.nodes
            .keys()
            .filter_map(|node| {
                let heard = seen.get(node).filter(|s| s.at.elapsed() < self.dead_after)?;
                let disks = heard
                    .heartbeat
                    .disks
                    .iter()
                    .filter(|disk| disk.writable)
                    .map(|disk| {
                        let count = on_disk.get(&(node.as_str(), disk.name.as_str())).copied().unwrap_or(0);
                        (disk.name.clone(), disk.free_bytes, count)
                    })
                    .collect();
                Some(Candidate { node: node.clone(), disks })
            })
            .collect()
    }

    /// Removes a partition from the map (its replicas stop and are
    /// quarantined by their nodes as they learn it).
    pub async fn delete_partition(&self, id: u64) -> Result<(), MetaError> {
        self.confirm_leader().await?;
        let _one = self.propose.lock().await;
        if !self.machine.map().partitions.contains_key(&id) {
            return Err(MetaError::NotFound(id));
        }
        self.commit(&MapCommand::DeletePartition { id }).await
    }
}
