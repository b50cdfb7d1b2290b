//! One replica on this node: a partition's Raft member, its storage (log
//! and blob state machine, `datanode_partition::raft`) in
//! `<disk>/replicas/<partition>-<replica id>/`, and its fault.
//!
//! A replica whose storage fails stops its Raft instance (openraft stops
//! on a storage error and reports it in `running_state`) and is faulted:
//! a `FAULT` file in its directory keeps it so across restarts (sticky),
//! and its group serves on with the other replicas. Nothing here ever
//! touches another replica or the node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use datanode_partition::raft::{BlobStateMachine, TypeConfig};
use datanode_wal::storage::StdStorage;
use datanode_wal::{Durability, Storage, WalOptions};
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, Raft};

use super::transport::{GroupNetworkFactory, PeerPool};

/// The sticky fault file of a replica.
const FAULT_FILE: &str = "FAULT";

/// A replica's Raft handle.
pub type ReplicaRaft = Raft<TypeConfig, BlobStateMachine>;

/// A replica hosted here.
pub struct Replica {
    /// Its partition (the Raft group).
    pub partition: u64,
    /// Its id in the group.
    pub replica_id: u64,
    /// The disk it lives on.
    pub disk: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Running, or why not.
    state: Mutex<ReplicaState>,
    /// Since when it is in its state (started or faulted).
    since: Mutex<std::time::SystemTime>,
}

/// Where a replica stands.
#[derive(Clone)]
pub enum ReplicaState {
    /// Its Raft instance runs.
    Running {
        /// The instance.
        raft: ReplicaRaft,
        /// Its state machine, for reads.
        machine: BlobStateMachine,
    },
    /// Faulted: storage failed (now or before a restart); its Raft
    /// instance is stopped.
    Faulted(String),
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("partition", &self.partition)
            .field("replica_id", &self.replica_id)
            .field("disk", &self.disk)
            .finish()
    }
}

/// The directory of a replica on a disk.
pub fn replica_dir(disk_path: &Path, partition: u64, replica_id: u64) -> PathBuf {
    disk_path.join("replicas").join(format!("{partition}-{replica_id}"))
}

/// What a replica is started with.
pub struct ReplicaSpec<'a> {
    /// Partition and replica id.
    pub partition: u64,
    /// Its id in the group.
    pub replica_id: u64,
    /// Disk name and path.
    pub disk: (&'a str, &'a Path),
    /// The group's first members (replica id -> peer address), when this
    /// replica is one of them: a fresh one initializes the group with
    /// exactly these.
    pub initial: Option<BTreeMap<u64, BasicNode>>,
    /// Raft timings and policies.
    pub raft_config: Arc<openraft::Config>,
    /// WAL options of its log.
    pub wal: WalOptions,
}

impl Replica {
    /// Opens (or creates) the replica and starts its Raft instance. A
    /// replica whose directory holds `FAULT`, or whose storage cannot be
    /// opened, comes back faulted, never as an error of the node.
    pub async fn start(spec: ReplicaSpec<'_>, pool: PeerPool) -> Arc<Replica> {
        let dir = replica_dir(spec.disk.1, spec.partition, spec.replica_id);
        let replica = |state| {
            Arc::new(Replica {
                partition: spec.partition,
                replica_id: spec.replica_id,
                disk: spec.disk.0.to_string(),
                dir: dir.clone(),
                state: Mutex::new(state),
                since: Mutex::new(std::time::SystemTime::now()),
            })
        };
        if let Ok(reason) = std::fs::read_to_string(dir.join(FAULT_FILE)) {
            return replica(ReplicaState::Faulted(reason.trim().to_string()));
        }
        match Self::open(&spec, &dir, pool).await {
            Ok((raft, machine)) => replica(ReplicaState::Running { raft, machine }),
            Err(reason) => {
                let replica = replica(ReplicaState::Faulted(String::new()));
                replica.fault(reason);
                replica
            }
        }
    }

    async fn open(
        spec: &ReplicaSpec<'_>,
        dir: &Path,
        pool: PeerPool,
    ) -> Result<(ReplicaRaft, BlobStateMachine), String> {
        let storage: Arc<dyn Storage> = Arc::new(StdStorage);
        let options = WalOptions { durability: Durability::Sync, ..spec.wal.clone() };
        let (dir, open_dir) = (dir.to_path_buf(), dir.to_path_buf());
        let (log, machine) =
            tokio::task::spawn_blocking(move || datanode_partition::raft::open_replica(storage, open_dir, options))
                .await
                .map_err(|error| format!("opening the replica: {error}"))?
                .map_err(|error| error.to_string())?;
        let network = GroupNetworkFactory::<BlobStateMachine>::new(pool, spec.partition, spec.replica_id);
        let raft = Raft::new(spec.replica_id, spec.raft_config.clone(), network, log, machine.clone())
            .await
            .map_err(|error| format!("starting raft: {error}"))?;
        if let Some(members) = &spec.initial {
            // Every initial member does this with the same membership:
            // openraft accepts identical initializations (each writes the
            // same first entry; the vote elects one leader) and refuses one
            // on a log already used, which is every start after the first.
            if let Err(error) = raft.initialize(members.clone()).await {
                tracing::debug!(partition = spec.partition, %error, "group already initialized");
            }
        }
        tracing::info!(partition = spec.partition, replica = spec.replica_id, dir = %dir.display(), "replica started");
        Ok((raft, machine))
    }

    /// Running or faulted.
    pub fn state(&self) -> ReplicaState {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Since when it is in its state.
    pub fn since(&self) -> std::time::SystemTime {
        *self.since.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The Raft instance and state machine, unless faulted.
    pub fn running(&self) -> Option<(ReplicaRaft, BlobStateMachine)> {
        match self.state() {
            ReplicaState::Running { raft, machine } => Some((raft, machine)),
            ReplicaState::Faulted(_) => None,
        }
    }

    /// Faults the replica: its Raft instance stops, `FAULT` is written (a
    /// failure to write it is logged; the replica is faulted anyway), and
    /// it stays faulted until its files are replaced.
    pub fn fault(&self, reason: String) {
        let previous = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if matches!(*state, ReplicaState::Faulted(ref r) if !r.is_empty()) {
                return;
            }
            std::mem::replace(&mut *state, ReplicaState::Faulted(reason.clone()))
        };
        *self.since.lock().unwrap_or_else(PoisonError::into_inner) = std::time::SystemTime::now();
        tracing::error!(partition = self.partition, replica = self.replica_id, %reason, "replica faulted");
        metrics::counter!("datanode_partition_faults_total", "partition" => self.partition.to_string(), "cause" => "io_error")
            .increment(1);
        let storage = StdStorage;
        if let Err(error) = datanode_partition::durable::replace_file(&storage, &self.dir, FAULT_FILE, reason) {
            tracing::warn!(partition = self.partition, %error, "could not write the replica's FAULT file");
        }
        if let ReplicaState::Running { raft, .. } = previous {
            tokio::spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }

    /// Faults the replica if its Raft instance stopped by itself (a
    /// storage error inside openraft). Returns whether it is faulted.
    pub fn check_running(&self) -> bool {
        let Some((raft, _)) = self.running() else { return true };
        let metrics = raft.metrics().borrow_watched().clone();
        match &metrics.running_state {
            Ok(()) => false,
            // Stopped on purpose (shutdown, removal): not a fault.
            Err(openraft::errors::Fatal::Stopped) => false,
            Err(fatal) => {
                self.fault(format!("raft stopped: {fatal}"));
                true
            }
        }
    }

    /// Stops the Raft instance (shutdown or removal). Blocking nothing.
    pub async fn stop(&self) {
        if let Some((raft, _)) = self.running()
            && let Err(error) = raft.shutdown().await
        {
            tracing::warn!(partition = self.partition, %error, "replica did not stop cleanly");
        }
    }
}

/// The members of a group as openraft names them: replica id -> the peer
/// address of its node.
pub fn members(replicas: impl IntoIterator<Item = (u64, String)>) -> BTreeMap<u64, BasicNode> {
    replicas.into_iter().map(|(id, addr)| (id, BasicNode { addr })).collect()
}
