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

use super::map::{Candidate, ClusterMap, MapCommand, PartitionEntry, ReplicaEntry, place};
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
    /// No such node in the map.
    #[error("no node {0}")]
    NoSuchNode(String),
    /// A drain that could never finish: these partitions' replicas on the
    /// node have no node to go to (every other node that is up, not
    /// draining and has a writable disk holds them already).
    #[error("node {node} cannot be drained: no other node can take the replicas of partition(s) {partitions:?}")]
    NoRoomToDrain {
        /// The node.
        node: String,
        /// The partitions stranded on it.
        partitions: Vec<u64>,
    },
}

/// Repairs under way onto one node at most (each streams a snapshot to it).
pub const MAX_REPAIRS_PER_NODE: usize = 2;
/// Repairs under way onto one disk at most.
pub const MAX_REPAIRS_PER_DISK: usize = 1;

/// When the metadata leader counts a node down and replaces a replica.
#[derive(Debug, Clone, Copy)]
pub struct Detection {
    /// `cluster.node_dead_after`.
    pub dead_after: Duration,
    /// `cluster.repair_after`.
    pub repair_after: Duration,
}

/// A replica as the metadata leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaHealth {
    /// Its node is up and reports it running.
    Healthy,
    /// Its node reports it faulted.
    Faulted,
    /// Its node is down.
    Down,
    /// Its node is up and does not report it (yet): it is being started.
    Loading,
}

impl ReplicaHealth {
    /// As the API and the metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaHealth::Healthy => "healthy",
            ReplicaHealth::Faulted => "faulted",
            ReplicaHealth::Down => "down",
            ReplicaHealth::Loading => "loading",
        }
    }
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
    /// A replica faulted, down or on a draining node this long is replaced.
    repair_after: Duration,
    /// Since when each replica that needs replacing has needed it (this
    /// leader's clock; forgotten when leadership is lost, so that a new
    /// leader waits a whole `repair_after` of its own).
    unfit_since: Mutex<HashMap<(u64, u64), Instant>>,
    /// Why repairs wait, as logged once (see `tell_once`).
    told: Mutex<std::collections::HashSet<(u64, u64, &'static str)>>,
    /// The term this node last confirmed its leadership in: a new term
    /// starts its memory afresh (heartbeats, unfit replicas).
    led_term: Mutex<Option<u64>>,
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
        detection: Detection,
    ) -> anyhow::Result<Arc<MetaGroup>> {
        let Detection { dead_after, repair_after } = detection;
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
            repair_after,
            unfit_since: Mutex::new(HashMap::new()),
            told: Mutex::new(std::collections::HashSet::new()),
            led_term: Mutex::new(None),
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
                // Leading in a new term (for the first time, or again after
                // another led): what this node remembers from before is
                // stale, and it waits whole periods of its own before it
                // counts a node down or replaces a replica.
                let term = self.raft.metrics().borrow_watched().current_term;
                let mut led = self.led_term.lock().unwrap_or_else(PoisonError::into_inner);
                if *led != Some(term) {
                    *led = Some(term);
                    *self.leader_since.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                    self.liveness.lock().unwrap_or_else(PoisonError::into_inner).clear();
                    self.unfit_since.lock().unwrap_or_else(PoisonError::into_inner).clear();
                    self.told.lock().unwrap_or_else(PoisonError::into_inner).clear();
                }
                Ok(())
            }
            Err(error) => {
                *self.leader_since.lock().unwrap_or_else(PoisonError::into_inner) = None;
                *self.led_term.lock().unwrap_or_else(PoisonError::into_inner) = None;
                self.unfit_since.lock().unwrap_or_else(PoisonError::into_inner).clear();
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
            .filter(|node| !map.draining.contains(*node))
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

    /// How `replica` of `partition` is, from the heartbeats in `seen`.
    pub fn health(&self, seen: &HashMap<String, Seen>, partition: u64, replica: &ReplicaEntry) -> ReplicaHealth {
        if !self.is_up(&replica.node) {
            return ReplicaHealth::Down;
        }
        match report_of(seen, partition, replica) {
            Some(report) if report.state == "faulted" => ReplicaHealth::Faulted,
            Some(_) => ReplicaHealth::Healthy,
            None => ReplicaHealth::Loading,
        }
    }

    /// Starts or ends draining `node`.
    pub async fn drain_node(&self, node: &str, draining: bool) -> Result<(), MetaError> {
        self.confirm_leader().await?;
        let _one = self.propose.lock().await;
        let map = self.machine.map();
        if !map.nodes.contains_key(node) {
            return Err(MetaError::NoSuchNode(node.to_string()));
        }
        if draining {
            let stranded = self.stranded_by_drain(&map, node);
            if !stranded.is_empty() {
                return Err(MetaError::NoRoomToDrain { node: node.to_string(), partitions: stranded });
            }
        }
        self.commit(&MapCommand::DrainNode { id: node.to_string(), draining }).await
    }

    /// The partitions with a replica on `node` that a drain of it could
    /// never move: fewer nodes could take one of theirs (up, not
    /// draining, a writable disk, none of theirs yet) than they have
    /// replicas on draining nodes, `node` counted. Three nodes with three
    /// replicas each: every partition; a second drain with room for one
    /// replica only: the partitions both nodes hold.
    fn stranded_by_drain(&self, map: &ClusterMap, node: &str) -> Vec<u64> {
        let takers: Vec<Candidate> =
            self.candidates(map).into_iter().filter(|c| c.node != node && !c.disks.is_empty()).collect();
        let leaving = |r: &ReplicaEntry| r.node == node || map.draining.contains(&r.node);
        map.partitions
            .iter()
            .filter(|(_, entry)| entry.replicas.iter().any(|r| r.node == node))
            .filter(|(_, entry)| {
                let homes = takers.iter().filter(|t| entry.replicas.iter().all(|r| r.node != t.node)).count();
                homes < entry.replicas.iter().filter(|r| leaving(r)).count()
            })
            .map(|(partition, _)| *partition)
            .collect()
    }

    /// One pass of the repairer, on the confirmed leader (a no-op
    /// elsewhere): retires the replicas their groups have let go of, and
    /// replaces those faulted, down or on a draining node for longer than
    /// `repair_after` (draining ones at once), within the limits: never
    /// in a group without a healthy majority, one repair at a time per
    /// group, [`MAX_REPAIRS_PER_NODE`] and [`MAX_REPAIRS_PER_DISK`] onto
    /// one node and disk.
    pub async fn repair_pass(&self) -> Result<(), MetaError> {
        self.confirm_leader().await?;
        let _one = self.propose.lock().await;
        let seen = self.seen();
        for command in self.retirements(&self.machine.map(), &seen) {
            tracing::info!(?command, "repair: a replaced replica left its group");
            self.commit(&command).await?;
            metrics::counter!("datanode_cluster_repairs_total", "outcome" => "done").increment(1);
        }
        let map = self.machine.map();
        let now = Instant::now();
        let mut unfit_since = self.unfit_since.lock().unwrap_or_else(PoisonError::into_inner).clone();
        unfit_since.retain(|(partition, replica_id), _| {
            map.partitions.get(partition).is_some_and(|p| p.replicas.iter().any(|r| r.replica_id == *replica_id))
        });
        let (mut due, mut abandoned) = (Vec::new(), Vec::new());
        for (&partition, entry) in &map.partitions {
            for replica in &entry.replicas {
                let health = self.health(&seen, partition, replica);
                let draining = map.draining.contains(&replica.node);
                let key = (partition, replica.replica_id);
                // `Loading` too, once it lasts: a node that is up and does
                // not run a replica the map gives it (its disk is gone).
                if health == ReplicaHealth::Healthy && !draining {
                    unfit_since.remove(&key);
                    continue;
                }
                let since = *unfit_since.entry(key).or_insert(now);
                let waited = now.duration_since(since) >= self.repair_after;
                if replica.replaces.is_some() {
                    // A replacement that failed before its group took it as
                    // a voter: the repair is abandoned (and tried afresh).
                    // Only on a fresh word of the group's leader, and only
                    // if no membership in its log (committed or not) makes
                    // it a voter; a leader that promotes it meanwhile finds
                    // the repair gone from the map and drops it again.
                    let leader = self.leader_report(&seen, partition);
                    let learner_only = leader.is_some_and(|l| {
                        !l.voters.contains(&replica.replica_id) && !l.effective_voters.contains(&replica.replica_id)
                    });
                    if waited && health != ReplicaHealth::Healthy && learner_only {
                        abandoned.push((partition, replica.replica_id, health));
                    }
                    continue;
                }
                if (waited || draining) && !entry.replicas.iter().any(|r| r.replaces == Some(replica.replica_id)) {
                    due.push((partition, replica.clone(), health));
                }
            }
        }
        *self.unfit_since.lock().unwrap_or_else(PoisonError::into_inner) = unfit_since;
        for (partition, replica_id, health) in abandoned {
            tracing::warn!(
                partition,
                replica = replica_id,
                state = health.name(),
                "repair abandoned: its new replica is not up"
            );
            self.commit(&MapCommand::RetireReplica { partition, replica_id }).await?;
            metrics::counter!("datanode_cluster_repairs_total", "outcome" => "abandoned").increment(1);
        }
        for (partition, old, health) in due {
            // The map as it is now: each commit changes what fits next.
            let map = self.machine.map();
            let Some(entry) = map.partitions.get(&partition) else { continue };
            if entry.replicas.iter().any(|r| r.replaces.is_some()) || !entry.replicas.contains(&old) {
                continue; // one repair at a time per group
            }
            let healthy =
                entry.replicas.iter().filter(|r| self.health(&seen, partition, r) == ReplicaHealth::Healthy).count();
            if healthy < entry.replicas.len() / 2 + 1 {
                self.tell_once(partition, old.replica_id, "repair waits: the group lacks a healthy majority");
                continue;
            }
            let Some((node, disk)) = self.place_replacement(&map, partition, &old, health, &repairs_onto(&map)) else {
                self.tell_once(partition, old.replica_id, "repair waits: no node or disk can take a replica");
                continue;
            };
            tracing::info!(partition, old = old.replica_id, %node, %disk, state = health.name(), "repair: replacing a replica");
            self.commit(&MapCommand::ReplaceReplica { partition, old: old.replica_id, node, disk }).await?;
            metrics::counter!("datanode_cluster_repairs_total", "outcome" => "started").increment(1);
        }
        Ok(())
    }

    /// Logs why a repair waits, once per replica and reason for as long
    /// as this node leads (the repairer asks every second).
    fn tell_once(&self, partition: u64, replica_id: u64, why: &'static str) {
        if self.told.lock().unwrap_or_else(PoisonError::into_inner).insert((partition, replica_id, why)) {
            tracing::warn!(partition, replica = replica_id, "{why}");
        }
    }

    /// The retirements due: a replaced replica that the group's leader no
    /// longer counts as a member while its replacement is a voter, in a
    /// committed membership that is not joint.
    fn retirements(&self, map: &ClusterMap, seen: &HashMap<String, Seen>) -> Vec<MapCommand> {
        let mut commands = Vec::new();
        for (&partition, entry) in &map.partitions {
            let Some(leader) = self.leader_report(seen, partition) else { continue };
            for replica in &entry.replicas {
                let Some(old) = replica.replaces else { continue };
                // `voters` is the leader's committed membership.
                let swapped = !leader.joint
                    && leader.voters.contains(&replica.replica_id)
                    && !leader.voters.contains(&old)
                    && !leader.learners.contains(&old);
                if swapped {
                    commands.push(MapCommand::RetireReplica { partition, replica_id: old });
                }
            }
        }
        commands
    }

    /// The report of `partition`'s leader: the replica reporting itself
    /// leader in the highest term, among nodes that are up.
    fn leader_report(&self, seen: &HashMap<String, Seen>, partition: u64) -> Option<ReplicaReport> {
        seen.values()
            .filter(|s| s.at.elapsed() < self.dead_after)
            .flat_map(|s| s.heartbeat.replicas.iter())
            .filter(|r| r.partition == partition && r.role == "leader")
            .max_by_key(|r| r.term)
            .cloned()
    }

    /// Where `old`'s replacement goes: a node up, not draining, holding no
    /// replica of the partition, with a writable disk (placement's order),
    /// within the repair limits; when no such node fits and `old` is
    /// faulted on a node that is up, another disk of that node.
    fn place_replacement(
        &self,
        map: &ClusterMap,
        partition: u64,
        old: &ReplicaEntry,
        health: ReplicaHealth,
        onto: &RepairsOnto,
    ) -> Option<(String, String)> {
        let holders: Vec<&str> = map.partitions[&partition].replicas.iter().map(|r| r.node.as_str()).collect();
        let within = |node: &str, disk: &str| {
            onto.0.get(node).copied().unwrap_or(0) < MAX_REPAIRS_PER_NODE
                && onto.1.get(&(node.to_string(), disk.to_string())).copied().unwrap_or(0) < MAX_REPAIRS_PER_DISK
        };
        let mut candidates = self.candidates(map);
        for candidate in &mut candidates {
            let node = candidate.node.clone();
            candidate.disks.retain(|(disk, _, _)| within(&node, disk));
        }
        let elsewhere: Vec<Candidate> =
            candidates.iter().filter(|c| !holders.contains(&c.node.as_str())).cloned().collect();
        if let Some(placed) = place(&elsewhere, 1).and_then(|mut p| p.pop()) {
            return Some(placed);
        }
        if health != ReplicaHealth::Faulted || map.draining.contains(&old.node) {
            return None;
        }
        let mut same = candidates.into_iter().find(|c| c.node == old.node)?;
        same.disks.retain(|(disk, _, _)| *disk != old.disk);
        place(&[same], 1).and_then(|mut p| p.pop())
    }
}

/// Repairs under way by target node, and by target `(node, disk)`.
type RepairsOnto = (HashMap<String, usize>, HashMap<(String, String), usize>);

fn repairs_onto(map: &ClusterMap) -> RepairsOnto {
    let mut onto: RepairsOnto = Default::default();
    for replica in map.partitions.values().flat_map(|p| p.replicas.iter()).filter(|r| r.replaces.is_some()) {
        *onto.0.entry(replica.node.clone()).or_insert(0) += 1;
        *onto.1.entry((replica.node.clone(), replica.disk.clone())).or_insert(0) += 1;
    }
    onto
}

/// What `replica`'s node last said of it.
pub fn report_of<'a>(
    seen: &'a HashMap<String, Seen>,
    partition: u64,
    replica: &ReplicaEntry,
) -> Option<&'a ReplicaReport> {
    seen.get(&replica.node)?
        .heartbeat
        .replicas
        .iter()
        .find(|r| r.partition == partition && r.replica_id == replica.replica_id)
}
