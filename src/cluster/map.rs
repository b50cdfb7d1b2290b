//! The cluster map: which nodes exist and where every replica of every
//! replicated partition lives. It is the state of the metadata group
//! ([`super::meta`]): changed only by committed [`MapCommand`]s, applied in
//! log order, so every voter holds the same map at the same index.
//!
//! What changes every second (free space, liveness, a replica's role and
//! state) is not in the map: nodes report it in their heartbeats to the
//! metadata leader, which keeps it in memory ([`super::meta::Liveness`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole map. `epoch` counts the changes applied: a node that holds
/// the map of a higher epoch never takes an older one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Changes applied so far.
    pub epoch: u64,
    /// By node id (`node.id`).
    pub nodes: BTreeMap<String, NodeEntry>,
    /// By partition id.
    pub partitions: BTreeMap<u64, PartitionEntry>,
    /// The replica id the next replica gets (ids are never reused).
    pub next_replica_id: u64,
    /// Nodes being drained: every replica on them is moved elsewhere, and
    /// none is placed there.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub draining: std::collections::BTreeSet<String>,
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Its `cluster.advertise_url`.
    pub advertise_url: String,
    /// Its `cluster.peer_addr`, as peers dial it.
    pub peer_addr: String,
    /// Its disks' names.
    pub disks: Vec<String>,
}

/// A replicated partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The map's epoch when this entry last changed.
    pub epoch: u64,
    /// Its replicas, in the order they were placed.
    pub replicas: Vec<ReplicaEntry>,
    /// The replica ids the group was created with: the ones that may
    /// initialize it (with exactly this membership), never a later one.
    pub initial: Vec<u64>,
}

/// One replica: a Raft member of its partition's group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaEntry {
    /// Its id in the group (the Raft node id), unique in the cluster.
    pub replica_id: u64,
    /// The node holding it.
    pub node: String,
    /// The disk it lives on.
    pub disk: String,
    /// While a repair is under way: the replica this one replaces. The
    /// group's leader adds it as a learner, lets it catch up, and swaps it
    /// for the old one among the voters; the old one then leaves the map
    /// ([`MapCommand::RetireReplica`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
}

/// A change to the map, as the metadata group's log carries it (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MapCommand {
    /// A node joined or changed its URLs or disks.
    RegisterNode {
        /// Its id.
        id: String,
        /// What it says of itself.
        entry: NodeEntry,
    },
    /// A new partition with one replica per `(node, disk)`; its replica
    /// ids are handed out when the command is applied. Ignored when the
    /// partition exists.
    CreatePartition {
        /// Partition id.
        id: u64,
        /// Where its replicas go.
        placement: Vec<(String, String)>,
    },
    /// The partition and all its replicas are gone.
    DeletePartition {
        /// Partition id.
        id: u64,
    },
    /// A new replica of `partition` on `(node, disk)`, to replace `old`;
    /// its id is handed out when applied. Ignored when the partition or
    /// `old` is not there, a repair of the partition is under way, or
    /// `node` holds a replica of it (unless it is `old`'s node and `disk`
    /// another of its disks).
    ReplaceReplica {
        /// Partition id.
        partition: u64,
        /// The replica to replace.
        old: u64,
        /// Where the new one goes.
        node: String,
        /// Its disk there.
        disk: String,
    },
    /// The replaced replica left its group: it leaves the map, and its
    /// replacement is an ordinary member.
    RetireReplica {
        /// Partition id.
        partition: u64,
        /// The replica that left.
        replica_id: u64,
    },
    /// Starts (or, with `draining = false`, ends) draining a node.
    DrainNode {
        /// Node id.
        id: String,
        /// Draining or not.
        draining: bool,
    },
}

impl ClusterMap {
    /// Applies one committed command. Deterministic: every voter ends in
    /// the same map. A command that changes nothing (a partition created
    /// twice, one deleted that is not there) leaves the epoch alone.
    pub fn apply(&mut self, command: &MapCommand) {
        let changed = match command {
            MapCommand::RegisterNode { id, entry } => {
                if self.nodes.get(id) == Some(entry) {
                    false
                } else {
                    self.nodes.insert(id.clone(), entry.clone());
                    true
                }
            }
            MapCommand::CreatePartition { id, placement } => {
                // `u64::MAX` names the metadata group on the peer port.
                if self.partitions.contains_key(id) || placement.is_empty() || *id == u64::MAX {
                    false
                } else {
                    let first = self.next_replica_id.max(1);
                    let replicas: Vec<ReplicaEntry> = placement
                        .iter()
                        .zip(first..)
                        .map(|((node, disk), replica_id)| ReplicaEntry {
                            replica_id,
                            node: node.clone(),
                            disk: disk.clone(),
                            replaces: None,
                        })
                        .collect();
                    self.next_replica_id = first + replicas.len() as u64;
                    let initial = replicas.iter().map(|r| r.replica_id).collect();
                    self.partitions.insert(*id, PartitionEntry { epoch: self.epoch + 1, replicas, initial });
                    true
                }
            }
            MapCommand::DeletePartition { id } => self.partitions.remove(id).is_some(),
            MapCommand::ReplaceReplica { partition, old, node, disk } => {
                let replica_id = self.next_replica_id.max(1);
                // One repair at a time per partition, and never a second
                // replica on a node that holds one (but for the node of
                // the replica replaced: another of its disks).
                let fits = |entry: &PartitionEntry| {
                    let replaced = entry.replicas.iter().find(|r| r.replica_id == *old);
                    replaced.is_some_and(|replaced| {
                        !entry.replicas.iter().any(|r| r.replaces.is_some())
                            && (replaced.node == *node && replaced.disk != *disk
                                || !entry.replicas.iter().any(|r| r.node == *node))
                    })
                };
                match self.partitions.get_mut(partition) {
                    Some(entry) if fits(entry) => {
                        entry.replicas.push(ReplicaEntry {
                            replica_id,
                            node: node.clone(),
                            disk: disk.clone(),
                            replaces: Some(*old),
                        });
                        entry.epoch = self.epoch + 1;
                        self.next_replica_id = replica_id + 1;
                        true
                    }
                    _ => false,
                }
            }
            MapCommand::RetireReplica { partition, replica_id } => match self.partitions.get_mut(partition) {
                Some(entry) if entry.replicas.iter().any(|r| r.replica_id == *replica_id) => {
                    entry.replicas.retain(|r| r.replica_id != *replica_id);
                    for replica in &mut entry.replicas {
                        if replica.replaces == Some(*replica_id) {
                            replica.replaces = None;
                        }
                    }
                    entry.epoch = self.epoch + 1;
                    true
                }
                _ => false,
            },
            MapCommand::DrainNode { id, draining } => {
                if !self.nodes.contains_key(id) {
                    false
                } else if *draining {
                    self.draining.insert(id.clone())
                } else {
                    self.draining.remove(id)
                }
            }
        };
        if changed {
            self.epoch += 1;
        }
    }

    /// The replicas a node holds: `(partition, replica)`.
    pub fn replicas_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = (u64, &'a ReplicaEntry)> + 'a {
        self.partitions
            .iter()
            .flat_map(|(id, partition)| partition.replicas.iter().map(move |replica| (*id, replica)))
            .filter(move |(_, replica)| replica.node == node)
    }

    /// The node holding replica `replica_id` of `partition`.
    pub fn node_of(&self, partition: u64, replica_id: u64) -> Option<(&String, &NodeEntry)> {
        let replica = self.partitions.get(&partition)?.replicas.iter().find(|r| r.replica_id == replica_id)?;
        self.nodes.get_key_value(&replica.node)
    }
}

/// What placement knows of a node that is up: its disks with free bytes
/// and the replicas each holds.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Node id.
    pub node: String,
    /// `(disk, free bytes, replicas on it)`; only disks that take data.
    pub disks: Vec<(String, u64, usize)>,
}

/// Picks `count` distinct nodes, and one disk on each: nodes with the
/// fewest replicas first (ties: the most free space, then the id), and on
/// a node the disk with the most free space (ties: the fewest replicas).
/// `None` when fewer than `count` nodes have a disk to take it.
pub fn place(candidates: &[Candidate], count: usize) -> Option<Vec<(String, String)>> {
    let mut ranked: Vec<(usize, u64, &String, &String)> = candidates
        .iter()
        .filter_map(|candidate| {
            let disk = candidate.disks.iter().max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)).then(b.0.cmp(&a.0)))?;
            let replicas = candidate.disks.iter().map(|(_, _, n)| n).sum();
            let free = candidate.disks.iter().map(|(_, free, _)| free).sum();
            Some((replicas, free, &candidate.node, &disk.0))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
    ranked.dedup_by(|a, b| a.2 == b.2);
    if ranked.len() < count {
        return None;
    }
    Some(ranked.into_iter().take(count).map(|(_, _, node, disk)| (node.clone(), disk.clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(url: &str) -> NodeEntry {
        NodeEntry { advertise_url: url.into(), peer_addr: "127.0.0.1:1".into(), disks: vec!["d0".into()] }
    }

    #[test]
    fn commands_apply_deterministically_and_ids_are_never_reused() {
        let mut map = ClusterMap::default();
        map.apply(&MapCommand::RegisterNode { id: "a".into(), entry: node("http://a") });
        map.apply(&MapCommand::RegisterNode { id: "a".into(), entry: node("http://a") });
        assert_eq!(map.epoch, 1, "registering the same node again changes nothing");
        let placement = vec![("a".to_string(), "d0".to_string()), ("b".into(), "d1".into())];
        map.apply(&MapCommand::CreatePartition { id: 7, placement: placement.clone() });
        let ids: Vec<u64> = map.partitions[&7].replicas.iter().map(|r| r.replica_id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(map.partitions[&7].initial, ids);
        map.apply(&MapCommand::CreatePartition { id: 7, placement: vec![("c".into(), "d0".into())] });
        assert_eq!(map.partitions[&7].replicas.len(), 2, "a second create of the same id is ignored");
        map.apply(&MapCommand::DeletePartition { id: 7 });
        map.apply(&MapCommand::CreatePartition { id: 7, placement });
        let ids: Vec<u64> = map.partitions[&7].replicas.iter().map(|r| r.replica_id).collect();
        assert_eq!(ids, vec![3, 4], "a re-created partition gets new replica ids");
        assert_eq!(map.epoch, 4);
        assert_eq!(map.replicas_on("b").map(|(p, r)| (p, r.replica_id)).collect::<Vec<_>>(), vec![(7, 4)]);
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(serde_json::from_str::<ClusterMap>(&json).unwrap(), map);
    }

    #[test]
    fn a_replacement_gets_a_new_id_and_the_old_replica_leaves_only_when_retired() {
        let mut map = ClusterMap::default();
        map.apply(&MapCommand::RegisterNode { id: "a".into(), entry: node("http://a") });
        let placement = vec![("a".to_string(), "d0".to_string()), ("b".into(), "d0".into())];
        map.apply(&MapCommand::CreatePartition { id: 7, placement });
        let replace = |old: u64, node: &str| MapCommand::ReplaceReplica {
            partition: 7,
            old,
            node: node.into(),
            disk: "d1".into(),
        };
        map.apply(&replace(2, "c"));
        let epoch = map.epoch;
        map.apply(&replace(2, "d"));
        map.apply(&replace(1, "d"));
        map.apply(&replace(9, "d"));
        map.apply(&MapCommand::ReplaceReplica { partition: 8, old: 1, node: "d".into(), disk: "d0".into() });
        assert_eq!(map.epoch, epoch, "one repair at a time per partition, of a replica that is there");
        let entry = &map.partitions[&7];
        assert_eq!(entry.replicas.len(), 3, "the old replica stays until retired");
        assert_eq!((entry.replicas[2].replica_id, entry.replicas[2].replaces), (3, Some(2)));
        map.apply(&MapCommand::RetireReplica { partition: 7, replica_id: 2 });
        let ids: Vec<(u64, Option<u64>)> =
            map.partitions[&7].replicas.iter().map(|r| (r.replica_id, r.replaces)).collect();
        assert_eq!(ids, vec![(1, None), (3, None)]);
        let epoch = map.epoch;
        map.apply(&replace(3, "a"));
        map.apply(&MapCommand::ReplaceReplica { partition: 7, old: 1, node: "a".into(), disk: "d0".into() });
        assert_eq!(map.epoch, epoch, "not onto a node holding a replica, nor onto the replaced one's disk");
        map.apply(&MapCommand::ReplaceReplica { partition: 7, old: 1, node: "a".into(), disk: "d1".into() });
        assert_eq!(map.partitions[&7].replicas[2].replica_id, 4, "another disk of the replaced one's node; ids grow");
        map.apply(&MapCommand::DrainNode { id: "a".into(), draining: true });
        map.apply(&MapCommand::DrainNode { id: "zz".into(), draining: true });
        assert_eq!(map.draining.iter().collect::<Vec<_>>(), vec!["a"], "only a registered node drains");
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(serde_json::from_str::<ClusterMap>(&json).unwrap(), map);
        map.apply(&MapCommand::DrainNode { id: "a".into(), draining: false });
        assert!(map.draining.is_empty());
    }

    #[test]
    fn placement_spreads_over_distinct_nodes_and_prefers_space_and_few_replicas() {
        let candidate = |node: &str, disks: &[(&str, u64, usize)]| Candidate {
            node: node.into(),
            disks: disks.iter().map(|(d, free, n)| (d.to_string(), *free, *n)).collect(),
        };
        let nodes = [
            candidate("a", &[("d0", 100, 1), ("d1", 500, 1)]),
            candidate("b", &[("d0", 900, 3)]),
            candidate("c", &[("d0", 10, 0)]),
            candidate("d", &[]),
        ];
        let placed = place(&nodes, 2).unwrap();
        assert_eq!(placed, vec![("c".to_string(), "d0".to_string()), ("a".into(), "d1".into())]);
        assert_eq!(place(&nodes, 3).unwrap().len(), 3);
        assert_eq!(place(&nodes, 4), None, "a node without a disk takes no replica");
    }
}
