//! Cluster mode (`[cluster]`): replicated partitions, each a Raft group
//! (openraft) of replicas on distinct nodes, and the metadata group that
//! holds the cluster map.
//!
//! - [`transport`]: the peer port. One HTTP/2 connection per node pair
//!   carries the Raft traffic of every group and the control messages.
//! - [`map`], [`meta_sm`], [`meta`]: the cluster map, the metadata
//!   group's state machine, and what its leader does (heartbeats,
//!   registration, placement).
//! - [`protocol`]: the control messages (heartbeat and its reply).
//! - [`replica`]: a replica on this node (storage in
//!   `datanode_partition::raft`, its Raft instance, its sticky fault).
//! - [`routes`]: the HTTP side: `/v1/cluster/...`, and the data API of a
//!   replicated partition (served by its leader, 307 elsewhere).
//!
//! This module is the daemon's: the storage adapters live in `partition`,
//! which knows nothing of the network.
//!
//! **How a node learns the map.** Every `heartbeat_interval` it sends the
//! metadata leader a heartbeat (its URLs, disks, replicas' states). The
//! leader answers only once it has confirmed its leadership, with the map
//! when the node's is older; a node takes a map only from such an answer,
//! and only one of a higher epoch than its own. From the map it starts
//! the replicas it should hold and stops (and quarantines) those it should
//! not. A replica directory found at start is started before any map
//! arrives, so a restarted node serves its groups even while the metadata
//! group has no leader.

pub mod map;
pub mod meta;
pub mod meta_sm;
pub mod protocol;
pub mod replica;
pub mod routes;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use datanode_partition::{DiskState, Registry};
use datanode_wal::WalOptions;
use openraft::async_runtime::WatchReceiver;
use openraft::{ServerState, SnapshotPolicy};

use crate::config::{ClusterConfig, Seed};
use map::{ClusterMap, NodeEntry};
use meta::MetaGroup;
use protocol::{DiskReport, Heartbeat, HeartbeatReply, ReplicaReport};
use replica::{Replica, ReplicaSpec, members};
use transport::{
    ClientCredential, ClusterSecret, ControlService, GroupRegistry, METADATA_GROUP, PeerPool, PeerServerOptions,
    PeerTlsSource, PoolOptions, RaftEndpoint, SecretAdmission, SenderCheck, TlsAdmission, WrongNode,
};

/// How peers prove themselves on the peer port, both ways.
#[derive(Debug, Clone, Default)]
pub enum PeerAuth {
    /// Not at all (a loopback or trusted network).
    #[default]
    Open,
    /// The cluster secret (`cluster.secret_file`), on every connection.
    Secret(ClusterSecret),
    /// Mutual TLS with node certificates (`[tls]` with
    /// `client_ca_file`): each connection speaks for one node.
    Tls(Arc<dyn PeerTlsSource>),
}

/// A map as learned from the metadata leader.
#[derive(Debug, Clone, Default)]
pub struct Learned {
    /// The map.
    pub map: Arc<ClusterMap>,
    /// Partition -> leader replica id, as the metadata leader last said.
    pub leaders: BTreeMap<u64, u64>,
}

/// This node's part in the cluster.
pub struct Cluster {
    /// `[cluster]`.
    pub config: ClusterConfig,
    /// `node.id`.
    pub node_id: String,
    seeds: Vec<Seed>,
    pool: PeerPool,
    endpoints: GroupRegistry,
    /// Turns true to drain the peer listener.
    drain: tokio::sync::watch::Sender<bool>,
    /// The metadata group, on a seed.
    pub meta: Option<Arc<MetaGroup>>,
    learned: RwLock<Learned>,
    replicas: RwLock<HashMap<u64, Arc<Replica>>>,
    /// Replica directories found at start that are not started (an older
    /// replica of a partition held here): quarantined once a map shows
    /// they are not this node's.
    leftovers: Mutex<Vec<(u64, u64, String)>>,
    /// Set by `stop`: the heartbeat loop ends before the Raft instances
    /// stop, so no stopped instance is taken for a fault.
    stopping: std::sync::atomic::AtomicBool,
    /// When [`Cluster::refresh`] last asked.
    last_refresh: Mutex<Option<std::time::Instant>>,
    /// The leader each replica here last knew (for
    /// `datanode_raft_leader_changes_total`).
    last_leaders: Mutex<HashMap<u64, Option<u64>>>,
    /// Peer address of the metadata leader, as last learned.
    meta_leader: Mutex<Option<String>>,
    registry: Arc<Registry>,
    raft_config: Arc<openraft::Config>,
    /// Partitions whose membership this node (their leader) is changing.
    steering: Mutex<std::collections::HashSet<u64>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node_id", &self.node_id).finish()
    }
}

/// The Raft configuration of every group of this node.
fn raft_config(config: &ClusterConfig) -> anyhow::Result<Arc<openraft::Config>> {
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let keep = config.snapshot_logs.min(1000);
    let raft = openraft::Config {
        cluster_name: "datanode".into(),
        heartbeat_interval: millis(config.heartbeat_interval),
        // openraft's leader lease (a voter refuses to elect another while
        // it heard its leader within it) is the largest election timeout.
        // With timeouts of 1-2x `election_timeout` a first candidate is
        // mostly refused and a dead leader is replaced after 3-4x of it
        // (BENCHMARKS.md, R2); with 0.5-1x, a leader is still never
        // replaced within `election_timeout` of its last heartbeat, and
        // the next is elected soon after.
        election_timeout_min: millis(config.election_timeout) / 2,
        election_timeout_max: millis(config.election_timeout),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        max_in_snapshot_log_to_keep: keep,
        install_snapshot_timeout: millis(config.election_timeout).max(1000),
        // A restarted leader stands for election like any other node. Its
        // state machine is rebuilt from the snapshot and the log up to the
        // committed index it last stored, which lags (the committed index is
        // not synced on every commit); restored as leader at once, it would
        // serve linearizable reads from that stale state. An election
        // commits a new blank entry first, and reads wait for it.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    Ok(Arc::new(raft.validate()?))
}

impl Cluster {
    /// Joins the cluster: binds the peer port, starts the metadata group
    /// on a seed, starts every replica found on the disks, and the
    /// heartbeat loop. Every peer connection, in and out, proves itself
    /// as `auth` says before any Raft message.
    pub async fn start(
        config: ClusterConfig,
        node_id: String,
        registry: Arc<Registry>,
        auth: PeerAuth,
    ) -> anyhow::Result<Arc<Cluster>> {
        let seeds = config.seed_list()?;
        let raft_config = raft_config(&config)?;
        transport::server::zero_rejected_counters();
        let pool_options = match &auth {
            PeerAuth::Open => PoolOptions::default(),
            PeerAuth::Secret(secret) => PoolOptions {
                credential: Some(ClientCredential { secret: secret.clone(), node_id: node_id.clone() }),
                ..PoolOptions::default()
            },
            PeerAuth::Tls(tls) => PoolOptions { tls: Some(Arc::clone(tls)), ..PoolOptions::default() },
        };
        let pool = PeerPool::new(pool_options);
        let endpoints = GroupRegistry::new();
        let listener = tokio::net::TcpListener::bind(config.peer_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cluster.peer_addr = {}: {e}", config.peer_addr))?;
        let meta = match seeds.iter().position(|seed| seed.node == node_id) {
            Some(index) => {
                let disk = registry.disks().first().ok_or_else(|| anyhow::anyhow!("no disk"))?;
                let dir = disk.path.join("cluster").join("meta");
                let group = MetaGroup::start(
                    &dir,
                    registry.wal_options_for(&disk.name),
                    index as u64 + 1,
                    seeds.clone(),
                    raft_config.clone(),
                    pool.clone(),
                    meta::Detection { dead_after: config.node_dead_after, repair_after: config.repair_after },
                )
                .await?;
                endpoints.register(
                    METADATA_GROUP,
                    group.id,
                    Arc::new(RaftEndpoint::new(group.raft.clone(), group.machine())),
                );
                Some(group)
            }
            None => None,
        };
        let (drain, drained) = tokio::sync::watch::channel(false);
        let cluster = Arc::new(Cluster {
            config,
            node_id,
            seeds,
            pool,
            endpoints: endpoints.clone(),
            drain,
            meta,
            learned: RwLock::new(Learned::default()),
            replicas: RwLock::new(HashMap::new()),
            last_leaders: Mutex::new(HashMap::new()),
            leftovers: Mutex::new(Vec::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            last_refresh: Mutex::new(None),
            meta_leader: Mutex::new(None),
            registry,
            raft_config,
            steering: Mutex::new(std::collections::HashSet::new()),
        });
        let mut options =
            PeerServerOptions { control: Some(Arc::new(Control(Arc::clone(&cluster)))), ..Default::default() };
        match auth {
            PeerAuth::Open => {}
            PeerAuth::Secret(secret) => options.admission = Arc::new(SecretAdmission::new(secret)),
            PeerAuth::Tls(tls) => {
                options.admission = Arc::new(TlsAdmission::new(tls));
                options.senders = Some(Arc::new(Placement(Arc::downgrade(&cluster))));
            }
        }
        tokio::spawn(transport::serve(listener, endpoints, options, drained));
        cluster.start_found_replicas().await;
        let looping = Arc::clone(&cluster);
        tokio::spawn(async move { looping.heartbeat_loop().await });
        if cluster.meta.is_some() {
            for outcome in ["started", "done", "abandoned"] {
                metrics::counter!("datanode_cluster_repairs_total", "outcome" => outcome).increment(0);
            }
            let repairing = Arc::clone(&cluster);
            tokio::spawn(async move { repairing.repair_loop().await });
        }
        Ok(cluster)
    }

    /// The map learned from the metadata leader.
    pub fn learned(&self) -> Learned {
        self.learned.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The learned map alone, without copying the leaders (the peer
    /// listener looks at it for every Raft request on mutual TLS).
    pub fn learned_map(&self) -> Arc<ClusterMap> {
        Arc::clone(&self.learned.read().unwrap_or_else(PoisonError::into_inner).map)
    }

    /// The replica of `partition` on this node.
    pub fn replica(&self, partition: u64) -> Option<Arc<Replica>> {
        self.replicas.read().unwrap_or_else(PoisonError::into_inner).get(&partition).cloned()
    }

    /// Every replica on this node.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        let mut all: Vec<_> = self.replicas.read().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        all.sort_by_key(|r| r.partition);
        all
    }

    /// Whether `partition` is replicated (in the map, or a replica here).
    pub fn is_replicated(&self, partition: u64) -> bool {
        self.replica(partition).is_some() || self.learned_map().partitions.contains_key(&partition)
    }

    fn disk_path(&self, disk: &str) -> Option<PathBuf> {
        self.registry.disks().iter().find(|d| d.name == disk).map(|d| d.path.clone())
    }

    /// Starts the replicas whose directories are on the disks (a restart).
    async fn start_found_replicas(&self) {
        // Per partition, the replica with the highest id: ids only grow,
        // so a lower one is from before a delete and re-create; it is left
        // for the first map to quarantine.
        let mut found: BTreeMap<u64, (u64, String, PathBuf)> = BTreeMap::new();
        for disk in self.registry.disks() {
            let Ok(entries) = std::fs::read_dir(disk.path.join("replicas")) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((partition, replica_id)) =
                    name.split_once('-').and_then(|(p, r)| Some((p.parse::<u64>().ok()?, r.parse::<u64>().ok()?)))
                else {
                    continue;
                };
                let older = match found.get(&partition) {
                    Some((kept, _, _)) if *kept > replica_id => Some((replica_id, disk.name.clone())),
                    Some((kept, kept_disk, _)) => Some((*kept, kept_disk.clone())),
                    None => None,
                };
                if let Some((old_id, old_disk)) = older {
                    tracing::warn!(
                        partition,
                        replica = old_id,
                        "an older replica of a partition held here is not started"
                    );
                    self.leftovers.lock().unwrap_or_else(PoisonError::into_inner).push((partition, old_id, old_disk));
                }
                if found.get(&partition).is_none_or(|(kept, _, _)| *kept < replica_id) {
                    found.insert(partition, (replica_id, disk.name.clone(), disk.path.clone()));
                }
            }
        }
        for (partition, (replica_id, disk, path)) in found {
            self.start_replica(partition, replica_id, &disk, &path, None).await;
        }
    }

    async fn start_replica(
        &self,
        partition: u64,
        replica_id: u64,
        disk: &str,
        path: &Path,
        initial: Option<BTreeMap<u64, openraft::BasicNode>>,
    ) {
        let spec = ReplicaSpec {
            partition,
            replica_id,
            disk: (disk, path),
            initial,
            raft_config: self.raft_config.clone(),
            wal: WalOptions { log_id: partition, ..self.registry.wal_options_for(disk) },
        };
        let replica = Replica::start(spec, self.pool.clone()).await;
        if let Some((raft, machine)) = replica.running() {
            self.endpoints.register(partition, replica_id, Arc::new(RaftEndpoint::new(raft, machine)));
        }
        self.replicas.write().unwrap_or_else(PoisonError::into_inner).insert(partition, replica);
    }

    /// Brings the replicas on this node in line with `map`: starts the
    /// ones it lists here, stops and quarantines the ones it does not.
    async fn reconcile(&self, map: &ClusterMap) {
        // A repair may place a replica on another disk of the node that
        // holds the faulted one it replaces: the newest (highest id) is the
        // one to hold; the older one is stopped and quarantined.
        let mut mine: BTreeMap<u64, map::ReplicaEntry> = BTreeMap::new();
        for (partition, entry) in map.replicas_on(&self.node_id) {
            if mine.get(&partition).is_none_or(|kept| kept.replica_id < entry.replica_id) {
                mine.insert(partition, entry.clone());
            }
        }
        for (partition, entry) in mine {
            match self.replica(partition) {
                Some(held) if held.replica_id == entry.replica_id => continue,
                // The partition was deleted and created again while this
                // node did not hear of it: the old replica goes first.
                Some(held) => self.remove_replica(&held, map.epoch).await,
                None => {}
            }
            let Some(path) = self.disk_path(&entry.disk) else {
                tracing::error!(partition, disk = %entry.disk, "the map places a replica on a disk this node lacks");
                continue;
            };
            let group = &map.partitions[&partition];
            let ids: Vec<u64> = group.replicas.iter().map(|r| r.replica_id).collect();
            let initial = (ids == group.initial).then(|| {
                members(
                    group
                        .replicas
                        .iter()
                        .filter_map(|r| Some((r.replica_id, map.nodes.get(&r.node)?.peer_addr.clone()))),
                )
            });
            self.start_replica(partition, entry.replica_id, &entry.disk, &path, initial).await;
        }
        let stale: Vec<Arc<Replica>> = self
            .replicas()
            .into_iter()
            .filter(|replica| {
                !map.partitions.get(&replica.partition).is_some_and(|p| {
                    p.replicas.iter().any(|r| r.replica_id == replica.replica_id && r.node == self.node_id)
                })
            })
            .collect();
        for replica in stale {
            self.remove_replica(&replica, map.epoch).await;
        }
        let leftovers = std::mem::take(&mut *self.leftovers.lock().unwrap_or_else(PoisonError::into_inner));
        for (partition, replica_id, disk) in leftovers {
            let listed = map
                .partitions
                .get(&partition)
                .is_some_and(|p| p.replicas.iter().any(|r| r.replica_id == replica_id && r.node == self.node_id));
            if listed {
                // Still a member (say, a faulted replica being replaced by
                // another on this node): quarantined once it leaves the map.
                self.leftovers.lock().unwrap_or_else(PoisonError::into_inner).push((partition, replica_id, disk));
                continue;
            }
            if let Some(path) = self.disk_path(&disk) {
                quarantine(
                    &replica::replica_dir(&path, partition, replica_id),
                    &path,
                    partition,
                    replica_id,
                    map.epoch,
                );
            }
        }
    }

    /// Stops a replica the map no longer lists and moves its files to
    /// `<disk>/quarantine/` (never deleted by the node).
    async fn remove_replica(&self, replica: &Arc<Replica>, epoch: u64) {
        self.endpoints.remove(replica.partition, replica.replica_id);
        replica.stop().await;
        self.replicas.write().unwrap_or_else(PoisonError::into_inner).remove(&replica.partition);
        let Some(disk) = self.disk_path(&replica.disk) else { return };
        quarantine(&replica.dir, &disk, replica.partition, replica.replica_id, epoch);
    }

    /// What this node says in its heartbeat.
    fn heartbeat(&self) -> Heartbeat {
        let disks = self
            .registry
            .disk_statuses()
            .into_iter()
            .map(|disk| DiskReport {
                writable: disk.state == DiskState::Healthy && !disk.reasons.iter().any(|r| r == "disk_full"),
                free_bytes: disk.free_bytes.unwrap_or(0),
                name: disk.name,
            })
            .collect();
        let replicas = self.replicas().iter().map(|replica| report(replica)).collect();
        Heartbeat {
            node: self.node_id.clone(),
            entry: NodeEntry {
                advertise_url: self.config.advertise_url.clone(),
                peer_addr: self.config.peer_addr.to_string(),
                disks: self.registry.disks().iter().map(|d| d.name.clone()).collect(),
            },
            disks,
            replicas,
            map_epoch: self.learned_map().epoch,
        }
    }

    /// On a seed: the metadata leader's repairer, a pass every
    /// [`REPAIR_EVERY`] heartbeat intervals.
    async fn repair_loop(self: Arc<Self>) {
        let Some(meta) = self.meta.clone() else { return };
        while !self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(self.config.heartbeat_interval * REPAIR_EVERY).await;
            if meta.leader() != Some(meta.id) {
                continue;
            }
            if let Err(error) = meta.repair_pass().await {
                tracing::debug!(%error, "repair pass");
            }
        }
    }

    /// On the leader of a group: moves its membership toward the map's.
    /// A replica the map adds to replace another is added as a learner
    /// (caught up from this leader: snapshot, then log), then swapped for
    /// the old one among the voters (joint consensus); a learner the map
    /// does not list is removed. One change at a time per group, in a task
    /// of its own; a failed step is tried again on a later heartbeat.
    fn steer_memberships(self: &Arc<Self>, map: &ClusterMap) {
        for replica in self.replicas() {
            let Some((raft, _)) = replica.running() else { continue };
            let metrics = raft.metrics().borrow_watched().clone();
            if metrics.state != ServerState::Leader {
                continue;
            }
            let Some(entry) = map.partitions.get(&replica.partition) else { continue };
            let membership = metrics.membership_config.membership().clone();
            let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
            let learners: std::collections::BTreeSet<u64> = membership.learner_ids().collect();
            let listed = |id: u64| entry.replicas.iter().any(|r| r.replica_id == id);
            // An id the map has handed out and no longer lists is a member
            // to drop; a higher one is newer than this node's map (which
            // may lag): left alone until the map catches up.
            let dropped = |id: &u64| *id < map.next_replica_id && !listed(*id);
            let pending = entry.replicas.iter().find(|r| r.replaces.is_some());
            let old = pending.and_then(|r| r.replaces);
            // The voters the map wants: every replica it lists but the one
            // being replaced, and any this node's map is too old to know.
            let wanted = |candidates: &std::collections::BTreeSet<u64>| -> std::collections::BTreeSet<u64> {
                candidates.iter().copied().filter(|id| Some(*id) != old && !dropped(id)).collect()
            };
            let step = if let Some(new) = pending {
                let old = old.unwrap_or_default();
                let Some(node) = map.nodes.get(&new.node) else { continue };
                if !voters.contains(&new.replica_id) {
                    let mut target = wanted(&voters);
                    target.insert(new.replica_id);
                    Some(MembershipStep::Swap {
                        new: new.replica_id,
                        old,
                        addr: node.peer_addr.clone(),
                        learner: learners.contains(&new.replica_id),
                        voters: target,
                    })
                } else if wanted(&voters) != voters
                    || learners.contains(&old)
                    || membership.get_joint_config().len() > 1
                {
                    Some(MembershipStep::Voters(wanted(&voters)))
                } else {
                    None
                }
            } else if voters.iter().any(dropped) {
                // A replacement given up after the group made it a voter:
                // it leaves the voters (no node runs it any more).
                Some(MembershipStep::Voters(wanted(&voters)))
            } else {
                let strays: std::collections::BTreeSet<u64> = learners.iter().copied().filter(dropped).collect();
                (!strays.is_empty()).then_some(MembershipStep::RemoveLearners(strays))
            };
            if matches!(&step, Some(MembershipStep::Voters(target)) if target.is_empty()) {
                continue;
            }
            let Some(step) = step else { continue };
            if !self.steering.lock().unwrap_or_else(PoisonError::into_inner).insert(replica.partition) {
                continue;
            }
            let cluster = Arc::clone(self);
            let partition = replica.partition;
            tokio::spawn(async move {
                tracing::info!(partition, ?step, "membership change");
                if let Err(error) = step.run(&raft, &cluster, partition).await {
                    tracing::warn!(partition, ?step, %error, "membership change did not complete (tried again later)");
                }
                cluster.steering.lock().unwrap_or_else(PoisonError::into_inner).remove(&partition);
            });
        }
    }

    /// Where heartbeats go: the leader last learned, else the seeds in
    /// turn.
    fn heartbeat_target(&self, round: usize) -> String {
        if let Some(leader) = self.meta_leader.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return leader;
        }
        let seed = &self.seeds[round % self.seeds.len()];
        seed.peer_addr.to_string()
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut round = 0usize;
        let mut beats = 0u64;
        while !self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            beats += 1;
            // Now and then the map held is applied again: a replica that
            // could not start (a disk missing then) gets another chance.
            if beats.is_multiple_of(RECONCILE_EVERY) {
                let map = self.learned_map();
                if map.epoch > 0 {
                    self.reconcile(&map).await;
                }
            }
            for replica in self.replicas() {
                if replica.check_running() {
                    self.endpoints.remove(replica.partition, replica.replica_id);
                }
            }
            let target = self.heartbeat_target(round);
            match self.send_heartbeat(&target).await {
                Ok(Heard::Reply(reply)) => {
                    *self.meta_leader.lock().unwrap_or_else(PoisonError::into_inner) = Some(target);
                    self.learn(reply).await;
                }
                Ok(Heard::NotLeader(leader)) => {
                    let known = leader.is_some();
                    *self.meta_leader.lock().unwrap_or_else(PoisonError::into_inner) = leader;
                    round += 1;
                    if known {
                        continue;
                    }
                }
                Err(error) => {
                    tracing::debug!(%target, %error, "heartbeat failed");
                    *self.meta_leader.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    round += 1;
                }
            }
            self.steer_memberships(&self.learned_map());
            update_metrics(&self);
            update_meta_metrics(&self);
            tokio::time::sleep(self.config.heartbeat_interval).await;
        }
    }

    /// Asks the metadata leader for the map now (one heartbeat), for a
    /// request naming a partition this node has not heard of: it may have
    /// been created a moment ago. Bounded by the heartbeat's budget.
    /// At most one per `heartbeat_interval`, however many such requests
    /// come.
    pub async fn refresh(&self) {
        {
            let mut last = self.last_refresh.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < self.config.heartbeat_interval) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        let target = self.heartbeat_target(0);
        if let Ok(Heard::Reply(reply)) = self.send_heartbeat(&target).await {
            self.learn(reply).await;
        }
    }

    /// Sends this node's heartbeat to `target`.
    async fn send_heartbeat(&self, target: &str) -> Result<Heard, String> {
        let body = serde_json::to_vec(&self.heartbeat()).map_err(|e| e.to_string())?;
        let budget = self.config.election_timeout.max(Duration::from_secs(1));
        let (status, body) = self.pool.control(target, protocol::HEARTBEAT_PATH, body.into(), budget).await?;
        match status {
            200 => serde_json::from_slice(&body).map(Heard::Reply).map_err(|e| format!("heartbeat reply: {e}")),
            421 => serde_json::from_slice::<protocol::NotMetaLeader>(&body)
                .map(|not| Heard::NotLeader(not.leader_addr))
                .map_err(|e| format!("heartbeat refusal: {e}")),
            other => Err(format!("heartbeat to {target}: {other} {}", String::from_utf8_lossy(&body))),
        }
    }

    /// Takes a reply of the metadata leader: the leaders always, the map
    /// only when newer than the one held.
    async fn learn(&self, reply: HeartbeatReply) {
        let newer = {
            let mut learned = self.learned.write().unwrap_or_else(PoisonError::into_inner);
            learned.leaders = reply.leaders;
            match reply.map {
                Some(map) if map.epoch > learned.map.epoch => {
                    learned.map = Arc::new(map);
                    Some(learned.map.clone())
                }
                _ => None,
            }
        };
        if let Some(map) = newer {
            self.reconcile(&map).await;
        }
    }

    /// A heartbeat that arrived on the peer port: 200 and the reply on
    /// the metadata leader, 421 and where the leader is elsewhere, 503
    /// when the group cannot answer.
    async fn on_heartbeat(&self, body: &[u8], peer: Option<&str>) -> Result<(u16, Vec<u8>), WrongNode> {
        let heartbeat: Heartbeat = match serde_json::from_slice(body) {
            Ok(heartbeat) => heartbeat,
            Err(error) => return Ok((400, json_error("bad_request", &format!("heartbeat: {error}")))),
        };
        if let Some(peer) = peer
            && heartbeat.node != peer
        {
            return Err(WrongNode(format!("a heartbeat for node {:?} from node {peer}", heartbeat.node)));
        }
        Ok(self.heartbeat_answer(heartbeat).await)
    }

    async fn heartbeat_answer(&self, heartbeat: Heartbeat) -> (u16, Vec<u8>) {
        let Some(meta) = &self.meta else {
            return (421, serde_json::to_vec(&protocol::NotMetaLeader { leader_addr: None }).unwrap_or_default());
        };
        match meta.heartbeat(heartbeat).await {
            Ok(reply) => (200, serde_json::to_vec(&reply).unwrap_or_default()),
            Err(meta::MetaError::NotLeader(leader)) => {
                let leader_addr = leader.and_then(|id| meta.seed(id)).map(|seed| seed.peer_addr.to_string());
                (421, serde_json::to_vec(&protocol::NotMetaLeader { leader_addr }).unwrap_or_default())
            }
            Err(error) => (503, json_error("no_leader", &error.to_string())),
        }
    }

    /// The node id and advertise URL of the metadata leader, as known here.
    pub fn meta_leader_node(&self) -> Option<(String, Option<String>)> {
        let leader_addr = match &self.meta {
            Some(meta) => meta.leader().and_then(|id| meta.seed(id)).map(|seed| seed.peer_addr.to_string()),
            None => self.meta_leader.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }?;
        let seed = self.seeds.iter().find(|seed| seed.peer_addr.to_string() == leader_addr)?;
        // A hint for a redirect, not served data: a seed's own applied copy
        // of the map may name the leader's URL before this node's learned
        // map does.
        let url = self.learned_map().nodes.get(&seed.node).map(|node| node.advertise_url.clone()).or_else(|| {
            let meta = self.meta.as_ref()?;
            meta.applied_map().nodes.get(&seed.node).map(|node| node.advertise_url.clone())
        });
        Some((seed.node.clone(), url))
    }

    /// Stops every Raft instance and the peer listener (shutdown).
    pub async fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
        self.drain.send_replace(true);
        for replica in self.replicas() {
            replica.stop().await;
        }
        if let Some(meta) = &self.meta {
            let _ = meta.raft.shutdown().await;
        }
    }
}

/// Heartbeats between two passes over the map held (see the loop).
const RECONCILE_EVERY: u64 = 20;
/// Heartbeat intervals between two passes of the repairer.
const REPAIR_EVERY: u32 = 4;
/// How long a group's leader waits for a learner to catch up before it
/// gives the change up (it goes on replicating, and the next heartbeat
/// waits again).
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);

/// One step of a group's leader toward the membership the map shows.
#[derive(Debug)]
enum MembershipStep {
    /// Add `new` as a learner unless it is one, wait until it holds what
    /// was committed, then make `voters` the voters (the old member
    /// leaves).
    Swap { new: u64, old: u64, addr: String, learner: bool, voters: std::collections::BTreeSet<u64> },
    /// Finish a change: these are the voters; any other member leaves.
    Voters(std::collections::BTreeSet<u64>),
    /// Learners the map does not list (a repair abandoned) leave.
    RemoveLearners(std::collections::BTreeSet<u64>),
}

impl MembershipStep {
    async fn run(&self, raft: &replica::ReplicaRaft, cluster: &Cluster, partition: u64) -> Result<(), String> {
        use openraft::ChangeMembers;
        match self {
            MembershipStep::Swap { new, old, addr, learner, voters } => {
                if !learner {
                    raft.add_learner(*new, openraft::BasicNode { addr: addr.clone() }, false)
                        .await
                        .map_err(|e| format!("adding learner {new}: {e}"))?;
                }
                // Promoted only once it holds everything committed when the
                // wait began (a snapshot streamed, then the log): a voter
                // that is still empty would leave the group one failure
                // from losing its majority. openraft's own check (within
                // `replication_lag_threshold` entries) is far looser.
                let target = raft.metrics().borrow_watched().local_committed.map(|id| id.index);
                let deadline = std::time::Instant::now() + CATCH_UP_WAIT;
                loop {
                    let metrics = raft.metrics().borrow_watched().clone();
                    if metrics.state != ServerState::Leader {
                        return Err("no longer the leader".into());
                    }
                    let matched = metrics
                        .replication
                        .as_ref()
                        .and_then(|replication| replication.get(new).cloned().flatten())
                        .map(|log| log.index);
                    if matched.is_some() && matched >= target {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(format!("learner {new} holds {matched:?} of {target:?} after {CATCH_UP_WAIT:?}"));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // The repair may have been given up during the wait.
                let still = cluster.learned_map().partitions.get(&partition).is_some_and(|entry| {
                    entry.replicas.iter().any(|r| r.replica_id == *new && r.replaces == Some(*old))
                });
                if !still {
                    return Err(format!("the repair of {old} by {new} is no longer in the map"));
                }
                raft.change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), false)
                    .await
                    .map_err(|e| format!("voters {voters:?}: {e}"))?;
            }
            MembershipStep::Voters(voters) => {
                raft.change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), false)
                    .await
                    .map_err(|e| format!("voters {voters:?}: {e}"))?;
            }
            MembershipStep::RemoveLearners(learners) => {
                raft.change_membership(ChangeMembers::RemoveNodes(learners.clone()), false)
                    .await
                    .map_err(|e| format!("removing learners {learners:?}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// Moves a replica's directory to `<disk>/quarantine/` (never deleted by
/// the node).
fn quarantine(dir: &Path, disk: &Path, partition: u64, replica_id: u64, epoch: u64) {
    let target = disk.join("quarantine").join(format!("replica-{partition}-{replica_id}-epoch{epoch}"));
    let moved = std::fs::create_dir_all(disk.join("quarantine")).and_then(|()| std::fs::rename(dir, &target));
    match moved {
        Ok(()) => {
            tracing::info!(partition, replica = replica_id, to = %target.display(), "replica not in the map: quarantined")
        }
        Err(error) => tracing::warn!(partition, replica = replica_id, %error, "could not quarantine a replica"),
    }
}

/// What a heartbeat got back.
enum Heard {
    Reply(HeartbeatReply),
    /// Not the leader; where it is, if known.
    NotLeader(Option<String>),
}

fn json_error(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": code, "message": message })).unwrap_or_default()
}

/// The daemon's answers to control messages on the peer port.
#[derive(Debug)]
struct Control(Arc<Cluster>);

impl ControlService for Control {
    fn call(
        &self,
        path: String,
        body: bytes::Bytes,
        node: Option<Arc<str>>,
    ) -> futures_util::future::BoxFuture<'static, Result<(u16, bytes::Bytes), WrongNode>> {
        let cluster = Arc::clone(&self.0);
        Box::pin(async move {
            let (status, body) = match path.as_str() {
                protocol::HEARTBEAT_PATH => cluster.on_heartbeat(&body, node.as_deref()).await?,
                other => (404, json_error("not_found", &format!("no control path {other}"))),
            };
            Ok((status, bytes::Bytes::from(body)))
        })
    }
}

/// Where the replicas of every group are, for the peer listener's check
/// that a node's certificate speaks only for that node's replicas.
#[derive(Debug)]
struct Placement(std::sync::Weak<Cluster>);

impl SenderCheck for Placement {
    fn hosted_on(&self, group: u64, sender: u64, node: &str) -> bool {
        let Some(cluster) = self.0.upgrade() else { return false };
        if group == METADATA_GROUP {
            // The metadata group's members are the seeds, by position.
            let seed = sender.checked_sub(1).and_then(|i| usize::try_from(i).ok()).and_then(|i| cluster.seeds.get(i));
            return seed.is_some_and(|seed| seed.node == node);
        }
        let on = |map: &ClusterMap| {
            map.partitions
                .get(&group)
                .is_some_and(|p| p.replicas.iter().any(|r| r.replica_id == sender && r.node == node))
        };
        // The map learned here, or a seed's own applied copy (which may be
        // ahead of it); a replica neither lists is not taken from anyone.
        on(&cluster.learned_map()) || cluster.meta.as_ref().is_some_and(|meta| on(&meta.applied_map()))
    }
}

/// A replica's state as a heartbeat carries it.
fn report(replica: &Replica) -> ReplicaReport {
    let Some((raft, _)) = replica.running() else {
        return ReplicaReport {
            partition: replica.partition,
            replica_id: replica.replica_id,
            state: "faulted".into(),
            role: "shutdown".into(),
            term: 0,
            leader: None,
            applied_index: None,
            matched: BTreeMap::new(),
            voters: Vec::new(),
            effective_voters: Vec::new(),
            learners: Vec::new(),
            joint: false,
        };
    };
    let metrics = raft.metrics().borrow_watched().clone();
    // The committed membership: the metadata leader retires a replaced
    // replica only once its group can no longer need its vote.
    let membership = metrics.committed_membership_config.membership();
    ReplicaReport {
        effective_voters: metrics.membership_config.membership().voter_ids().collect(),
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        joint: membership.get_joint_config().len() > 1,
        partition: replica.partition,
        replica_id: replica.replica_id,
        state: "healthy".into(),
        role: role_name(metrics.state).into(),
        term: metrics.current_term,
        leader: metrics.current_leader,
        applied_index: metrics.last_applied.map(|id| id.index),
        matched: metrics
            .replication
            .map(|replication| replication.into_iter().map(|(id, log)| (id, log.map(|l| l.index))).collect())
            .unwrap_or_default(),
    }
}

/// The name of a Raft role, as the API and the metrics spell it.
pub fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Learner => "learner",
        ServerState::Candidate => "candidate",
        ServerState::Shutdown => "shutdown",
    }
}

/// `datanode_raft_*` gauges of this node's replicas.
fn update_metrics(cluster: &Cluster) {
    for replica in cluster.replicas() {
        let partition = replica.partition.to_string();
        let running = replica.running();
        let metrics = running.as_ref().map(|(raft, _)| raft.metrics().borrow_watched().clone());
        let role = metrics.as_ref().map_or("shutdown", |m| role_name(m.state));
        let state = if running.is_some() { "healthy" } else { "faulted" };
        for name in ["loading", "healthy", "read_only", "faulted"] {
            metrics::gauge!("datanode_partition_state", "partition" => partition.clone(), "disk" => replica.disk.clone(), "state" => name)
                .set(if name == state { 1.0 } else { 0.0 });
        }
        for name in ["leader", "follower", "learner", "candidate", "shutdown"] {
            metrics::gauge!("datanode_raft_role", "partition" => partition.clone(), "role" => name)
                .set(if name == role { 1.0 } else { 0.0 });
        }
        if let Some(m) = metrics {
            let mut last = cluster.last_leaders.lock().unwrap_or_else(PoisonError::into_inner);
            let known = last.insert(replica.partition, m.current_leader);
            if m.current_leader.is_some() && known.is_some_and(|before| before != m.current_leader) {
                metrics::counter!("datanode_raft_leader_changes_total", "partition" => partition.clone()).increment(1);
            }
            drop(last);
            metrics::gauge!("datanode_raft_term", "partition" => partition.clone()).set(m.current_term as f64);
            metrics::gauge!("datanode_raft_commit_index", "partition" => partition.clone())
                .set(m.local_committed.map_or(0.0, |id| id.index as f64));
            metrics::gauge!("datanode_raft_applied_index", "partition" => partition.clone())
                .set(m.last_applied.map_or(0.0, |id| id.index as f64));
        }
    }
}

/// The metadata leader's view as gauges: replicas by state per partition,
/// nodes up and down, partitions under-replicated. A member that is not
/// the leader shows zeros, so that `max` across the members is the
/// leader's view.
fn update_meta_metrics(cluster: &Cluster) {
    let Some(meta) = &cluster.meta else { return };
    let leading = meta.leader() == Some(meta.id);
    let map = meta.applied_map();
    let seen = meta.seen();
    let (mut up, mut down, mut under) = (0u64, 0u64, 0u64);
    for node in map.nodes.keys() {
        if leading && meta.is_up(node) {
            up += 1;
        } else if leading {
            down += 1;
        }
    }
    for (id, partition) in &map.partitions {
        let mut counts: BTreeMap<&str, u64> =
            ["healthy", "faulted", "down", "learner"].into_iter().map(|s| (s, 0)).collect();
        if leading {
            for replica in &partition.replicas {
                let health = meta.health(&seen, *id, replica);
                let learner = meta::report_of(&seen, *id, replica).is_some_and(|report| report.role == "learner");
                let state = match health {
                    meta::ReplicaHealth::Healthy if learner => "learner",
                    // Being started: counted as the replica it will be.
                    meta::ReplicaHealth::Healthy | meta::ReplicaHealth::Loading => "healthy",
                    other => other.name(),
                };
                *counts.entry(state).or_insert(0) += 1;
            }
            if counts["healthy"] < partition.replicas.len() as u64 {
                under += 1;
            }
        }
        for (state, count) in counts {
            metrics::gauge!("datanode_partition_replicas", "partition" => id.to_string(), "state" => state)
                .set(count as f64);
        }
    }
    metrics::gauge!("datanode_cluster_nodes", "state" => "up").set(up as f64);
    metrics::gauge!("datanode_cluster_nodes", "state" => "down").set(down as f64);
    metrics::gauge!("datanode_partitions_under_replicated").set(under as f64);
    let repairing = map.partitions.values().flat_map(|p| p.replicas.iter()).filter(|r| r.replaces.is_some()).count();
    metrics::gauge!("datanode_cluster_repairs_in_progress").set(if leading { repairing as f64 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_leader_is_not_restored_without_an_election() {
        let config: ClusterConfig = toml::from_str(
            "peer_addr = \"127.0.0.1:7001\"\nadvertise_url = \"http://127.0.0.1:8001\"\n\
             seeds = [\"dn-1@127.0.0.1:7001\"]\n",
        )
        .expect("a [cluster] section");
        let raft = raft_config(&config).expect("valid");
        assert_eq!(raft.enable_leader_restore, Some(false));
    }
}
