//! The cluster heals itself: a replica on a dead disk or a dead node is
//! replaced by a new one (a new replica id, caught up from the group's
//! leader, then swapped in for the old one), a drained node is emptied,
//! and a leader moves on request. Real `datanode` processes on loopback,
//! loop-mounted XFS disks where a disk must die. Every acknowledged write
//! must read back from every node afterwards, and a replaced replica
//! never comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::cluster::{Client, ClusterLoad, TestCluster, assert_readable, node_index};
use support::disks::{Fs, LoopDisk, unavailable};
use support::wait_for;

/// Fast failure detection and repair for the tests.
const REPAIR: &str = "node_dead_after = \"2s\"\nrepair_after = \"2s\"\n";

/// The replicas of partition `id` in the map: `(replica id, node index,
/// disk, state, replaces)`.
fn replicas(cluster: &TestCluster, id: u64) -> Vec<(u64, usize, String, String, Option<u64>)> {
    let view = cluster.partition(id);
    view["replicas"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|r| {
                    (
                        r["replica_id"].as_u64().unwrap(),
                        r["node"].as_str().and_then(node_index).unwrap(),
                        r["disk"].as_str().unwrap().to_string(),
                        r["state"].as_str().unwrap().to_string(),
                        r["replaces"].as_u64(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether partition `id` has exactly `count` replicas, all healthy, none
/// of them a repair under way, none of them in `gone`.
fn fully_replicated(cluster: &TestCluster, id: u64, count: usize, gone: &BTreeSet<u64>) -> bool {
    let now = replicas(cluster, id);
    now.len() == count
        && now
            .iter()
            .all(|(rid, _, _, state, replaces)| state == "healthy" && replaces.is_none() && !gone.contains(rid))
}

/// What the replica of `id` on node `i` holds: `(applied index, blobs,
/// live bytes)`, or `None` when it has none running.
fn contents(cluster: &TestCluster, i: usize, id: u64) -> Option<(u64, u64, u64)> {
    let status = cluster.node(i).json(&format!("/v1/partitions/{id}"));
    Some((status["raft"]["applied_index"].as_u64()?, status["blobs"].as_u64()?, status["live_bytes"].as_u64()?))
}

/// Waits until every replica of `id` in the map has applied the same
/// index and holds the same blobs and bytes.
fn wait_converged(cluster: &TestCluster, id: u64) {
    let mut last = Vec::new();
    wait_for("the replicas converge", Duration::from_secs(60), || {
        last = replicas(cluster, id).iter().map(|(_, node, _, _, _)| contents(cluster, *node, id)).collect();
        last.iter().all(Option::is_some) && last.windows(2).all(|w| w[0] == w[1])
    });
}

/// The replica ids node `i` lists in `GET /v1/partitions`.
fn held_replicas(cluster: &TestCluster, i: usize) -> BTreeSet<u64> {
    let listed = cluster.node(i).json("/v1/partitions");
    let all = listed.as_array().unwrap_or_else(|| panic!("GET /v1/partitions is a list: {listed}"));
    all.iter().filter_map(|p| p["raft"]["replica_id"].as_u64()).collect()
}

/// An admin call through node `via`, retried while the answer is 503 (no
/// leader known there yet: nothing done) for up to 20 s, as a client does.
fn admin(method: &str, cluster: &TestCluster, via: usize, path: &str, body: Option<&str>) -> (u16, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, bytes) = Client::new().send(method, &cluster.url(via, path), body.map(str::as_bytes));
        if status != 503 || std::time::Instant::now() > deadline {
            return (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_replica_on_a_dead_disk_is_replaced_on_another_disk_and_nothing_is_lost() {
    if unavailable(Fs::Xfs.tools()).is_some() {
        return;
    }
    // Three nodes with two disks each: with every node holding a replica,
    // the replacement can only go to the other disk of the same node.
    let disks: Vec<Vec<LoopDisk>> = (0..3).map(|_| (0..2).map(|_| LoopDisk::new(Fs::Xfs)).collect()).collect();
    let layout = disks.iter().map(|node| Some(node.iter().map(|d| d.path().join("data")).collect())).collect();
    let cluster = TestCluster::start_with_disks(3, REPAIR, layout);
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 5, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(5);
    let load = ClusterLoad::start(&cluster.ports, 5, 8, 4096, "disk-repair");
    load.wait_more(200, Duration::from_secs(60));
    let before = replicas(&cluster, 5);
    let (old_id, victim, old_disk, _, _) =
        before.iter().find(|(_, node, _, _, _)| *node != leader).cloned().expect("a follower replica");
    let disk_index: usize = old_disk.trim_start_matches('d').parse().unwrap();
    disks[victim][disk_index].shutdown(true);
    wait_for("the follower's replica is replaced", Duration::from_secs(90), || {
        fully_replicated(&cluster, 5, 3, &BTreeSet::from([old_id]))
    });
    load.wait_more(200, Duration::from_secs(60));
    let (acked, failures) = load.stop();
    eprintln!("{} acknowledged, other answers: {failures:?}", acked.len());
    let after = replicas(&cluster, 5);
    let (new_id, node, disk, _, _) = after.iter().find(|(_, node, _, _, _)| *node == victim).cloned().unwrap();
    assert!(new_id > before.iter().map(|r| r.0).max().unwrap(), "a new replica id: {after:?}");
    assert_ne!(disk, old_disk, "the replacement is on the node's other disk: {after:?}");
    assert_eq!(node, victim);
    wait_converged(&cluster, 5);
    for i in 0..3 {
        assert_readable(cluster.ports[i], 5, &acked, &format!("after the repair, via node {i}"));
    }
    // The node forgot the replaced replica (its files, on the dead disk,
    // cannot be moved; the node logs that and deletes nothing).
    let held = held_replicas(&cluster, victim);
    assert!(held.contains(&new_id) && !held.contains(&old_id), "the node holds the new replica, not the old: {held:?}");
}

#[test]
fn a_dead_node_is_replaced_in_every_group_and_never_rejoins_them() {
    let mut cluster = TestCluster::start(4, REPAIR);
    cluster.wait_formed();
    let partitions: Vec<u64> = (11..17).collect();
    for &id in &partitions {
        let (status, created) = cluster.create(0, id, None);
        assert_eq!(status, 201, "{created}");
        cluster.wait_leader(id);
    }
    let load = ClusterLoad::start(&cluster.ports, 11, 8, 4096, "node-repair");
    load.wait_more(200, Duration::from_secs(60));
    // The node with the most replicas dies.
    let mut held = [0usize; 4];
    for &id in &partitions {
        for (_, node, _, _, _) in replicas(&cluster, id) {
            held[node] += 1;
        }
    }
    let victim = (0..4).max_by_key(|i| held[*i]).unwrap();
    let gone: BTreeSet<u64> = partitions
        .iter()
        .flat_map(|id| replicas(&cluster, *id))
        .filter(|(_, node, _, _, _)| *node == victim)
        .map(|(rid, _, _, _, _)| rid)
        .collect();
    cluster.kill(victim);
    wait_for("every partition has three healthy replicas again", Duration::from_secs(120), || {
        partitions.iter().all(|id| fully_replicated(&cluster, *id, 3, &gone))
    });
    load.wait_more(200, Duration::from_secs(60));
    let (acked, failures) = load.stop();
    eprintln!("{} acknowledged, other answers: {failures:?}", acked.len());
    for &id in &partitions {
        assert!(replicas(&cluster, id).iter().all(|(_, node, _, _, _)| *node != victim), "p{id} left the dead node");
        wait_converged(&cluster, id);
    }
    for i in cluster.running() {
        assert_readable(cluster.ports[i], 11, &acked, &format!("after the repair, via node {i}"));
    }
    let done: f64 = cluster
        .running()
        .iter()
        .filter_map(|i| cluster.node(*i).metric("datanode_cluster_repairs_total", &["outcome=\"done\""]))
        .sum();
    assert!(done >= gone.len() as f64, "{done} repairs counted done, {} replicas replaced", gone.len());
    // Back from the dead: it learns the map, stops what it held and moves
    // it to quarantine; the groups do not take it back.
    cluster.restart(victim);
    wait_for("the restarted node holds none of its replaced replicas", Duration::from_secs(60), || {
        held_replicas(&cluster, victim).is_disjoint(&gone)
    });
    let quarantine = cluster.dirs[victim].path().join("d0").join("quarantine");
    let moved = std::fs::read_dir(&quarantine).map(|entries| entries.count()).unwrap_or(0);
    assert_eq!(moved, gone.len(), "every replaced replica is in {}", quarantine.display());
    for &id in &partitions {
        assert!(fully_replicated(&cluster, id, 3, &gone), "p{id}: {:?}", replicas(&cluster, id));
    }
}

#[test]
fn a_drained_node_empties_under_load_and_a_leader_moves_on_request() {
    let cluster = TestCluster::start(4, REPAIR);
    cluster.wait_formed();
    for id in [21, 22] {
        let (status, created) = cluster.create(0, id, None);
        assert_eq!(status, 201, "{created}");
        cluster.wait_leader(id);
    }
    // Transfer: to a named follower, then to whoever is most caught up.
    let leader = cluster.wait_leader(21);
    let target = replicas(&cluster, 21).iter().map(|r| r.1).find(|node| *node != leader).unwrap();
    let body = format!("{{\"to\":\"dn-{}\"}}", target + 1);
    let (status, moved) = admin("POST", &cluster, 0, "/v1/cluster/partitions/21/transfer-leader", Some(&body));
    assert!(status == 200 || status == 202, "{status} {moved}");
    wait_for("the named node leads", Duration::from_secs(30), || cluster.wait_leader(21) == target);
    let (status, bad) =
        admin("POST", &cluster, 0, "/v1/cluster/partitions/21/transfer-leader", Some("{\"to\":\"dn-99\"}"));
    assert_eq!((status, bad["error"].as_str()), (400, Some("bad_request")), "{bad}");

    let load = ClusterLoad::start(&cluster.ports, 22, 8, 4096, "drain");
    load.wait_more(200, Duration::from_secs(60));
    // Drain a node holding replicas of both partitions.
    let on_both = (0..4)
        .find(|i| [21, 22].iter().all(|id| replicas(&cluster, *id).iter().any(|r| r.1 == *i)))
        .expect("with 4 nodes and 3 replicas each, some node holds both");
    let name = format!("dn-{}", on_both + 1);
    let (status, drained) = admin("POST", &cluster, 0, &format!("/v1/cluster/nodes/{name}/drain"), None);
    assert_eq!(status, 202, "{drained}");
    assert_eq!(drained["draining"], true);
    let (status, missing) = admin("POST", &cluster, 0, "/v1/cluster/nodes/dn-99/drain", None);
    assert_eq!((status, missing["error"].as_str()), (404, Some("node_not_found")), "{missing}");
    wait_for("the drained node holds no replica", Duration::from_secs(120), || {
        let map = cluster.map(0);
        map["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().any(|n| n["id"] == name.as_str() && n["replicas"] == 0 && n["draining"] == true)
        }) && [21, 22].iter().all(|id| fully_replicated(&cluster, *id, 3, &BTreeSet::new()))
    });
    load.wait_more(200, Duration::from_secs(60));
    let (acked, failures) = load.stop();
    eprintln!("{} acknowledged, other answers: {failures:?}", acked.len());
    for id in [21, 22] {
        assert!(replicas(&cluster, id).iter().all(|r| r.1 != on_both), "p{id} left {name}");
        wait_converged(&cluster, id);
    }
    for i in 0..4 {
        assert_readable(cluster.ports[i], 22, &acked, &format!("after the drain, via node {i}"));
    }
    // A new partition is not placed on a draining node.
    let (status, created) = cluster.create(0, 23, None);
    assert_eq!(status, 201, "{created}");
    assert!(replicas(&cluster, 23).iter().all(|r| r.1 != on_both), "{created}");
    let (status, undrained) = admin("DELETE", &cluster, 0, &format!("/v1/cluster/nodes/{name}/drain"), None);
    assert_eq!((status, undrained["draining"].as_bool()), (200, Some(false)), "{undrained}");
}

#[test]
fn a_repair_whose_new_replica_dies_is_abandoned_and_done_again() {
    let mut cluster = TestCluster::start(5, REPAIR);
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 41, None);
    assert_eq!(status, 201, "{created}");
    let leader = cluster.wait_leader(41);
    let load = ClusterLoad::start(&cluster.ports, 41, 8, 4096, "abandon");
    load.wait_more(300, Duration::from_secs(60));
    let (acked, _) = load.stop();
    // A follower off the seeds (nodes 0-2) when there is one, so that at
    // most one seed dies and the metadata group keeps its majority.
    let before = replicas(&cluster, 41);
    let followers: Vec<_> = before.iter().filter(|r| r.1 != leader).cloned().collect();
    let (old_id, victim, _, _, _) = followers.iter().find(|r| r.1 >= 3).or(followers.first()).cloned().unwrap();
    cluster.kill(victim);
    let mut repair = None;
    wait_for("a repair in the map", Duration::from_secs(60), || {
        repair = replicas(&cluster, 41).into_iter().find(|r| r.4 == Some(old_id));
        repair.is_some()
    });
    // Its new replica's node freezes at once, then dies.
    let (new_id, new_node, _, _, _) = repair.unwrap();
    cluster.pause(new_node);
    cluster.kill(new_node);
    let gone = BTreeSet::from([old_id, new_id]);
    wait_for("three healthy replicas on the nodes still up", Duration::from_secs(120), || {
        fully_replicated(&cluster, 41, 3, &gone)
    });
    let now = replicas(&cluster, 41);
    assert!(now.iter().all(|r| r.1 != victim && r.1 != new_node), "{now:?}");
    wait_converged(&cluster, 41);
    for i in cluster.running() {
        assert_readable(cluster.ports[i], 41, &acked, &format!("after the repair was done again, via node {i}"));
    }
}

#[test]
fn two_drains_at_once_never_run_two_repairs_in_one_group() {
    let roots: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let layout = roots.iter().map(|r| Some(vec![r.path().join("d0"), r.path().join("d1")])).collect();
    let cluster = TestCluster::start_with_disks(4, REPAIR, layout);
    cluster.wait_formed();
    let (status, created) = cluster.create(0, 51, None);
    assert_eq!(status, 201, "{created}");
    cluster.wait_leader(51);
    let holders: Vec<usize> = replicas(&cluster, 51).iter().map(|r| r.1).collect();
    let free = (0..4).find(|i| !holders.contains(i)).unwrap();
    // Two of the three holders drained at the same moment: only the free
    // node can take a replica, and only one. The drains are taken one at
    // a time: the first is accepted, the second, which could never
    // finish, refused (409) and not recorded.
    let drains: Vec<_> = holders
        .iter()
        .take(2)
        .map(|i| {
            let url = cluster.url(0, &format!("/v1/cluster/nodes/dn-{}/drain", i + 1));
            std::thread::spawn(move || Client::new().send("POST", &url, None).0)
        })
        .collect();
    let mut statuses: Vec<u16> = drains.into_iter().map(|drain| drain.join().unwrap()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409]);
    let nodes = cluster.map(0)["nodes"].as_array().cloned().unwrap_or_default();
    let draining = nodes.iter().filter(|n| n["draining"] == true).count();
    assert_eq!(draining, 1, "only the accepted drain is recorded");
    let mut most = 0;
    let mut last = Vec::new();
    wait_for("one replica moved to the free node", Duration::from_secs(90), || {
        last = replicas(&cluster, 51);
        most = most.max(last.iter().filter(|r| r.4.is_some()).count());
        last.len() == 3 && last.iter().any(|r| r.1 == free && r.3 == "healthy" && r.4.is_none())
    });
    // And it stays so.
    for _ in 0..40 {
        last = replicas(&cluster, 51);
        most = most.max(last.iter().filter(|r| r.4.is_some()).count());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(most <= 1, "{most} repairs at once in one group: {last:?}");
    assert_eq!(last.iter().filter(|r| r.3 == "healthy" && r.4.is_none()).count(), 3, "{last:?}");
    assert_eq!(last.iter().filter(|r| r.1 == free).count(), 1, "one replica per node: {last:?}");
}

/// iptables rules on loopback, removed on drop.
struct Blocked(Vec<u16>);

impl Blocked {
    fn rule(op: &str, port: u16) -> bool {
        std::process::Command::new("iptables")
            .args([
                op,
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ])
            .status()
            .is_ok_and(|s| s.success())
    }
    fn block(&mut self, port: u16) {
        assert!(Blocked::rule("-I", port), "iptables");
        self.0.push(port);
    }
    fn unblock(&mut self, port: u16) {
        Blocked::rule("-D", port);
        self.0.retain(|p| *p != port);
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        for port in self.0.clone() {
            Blocked::rule("-D", port);
        }
    }
}

fn voters(cluster: &TestCluster, i: usize, id: u64) -> BTreeSet<u64> {
    let status = cluster.node(i).json(&format!("/v1/partitions/{id}"));
    status["raft"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["voter"] == true)
        .filter_map(|m| m["replica_id"].as_u64())
        .collect()
}

/// A repair abandoned by the metadata leader while the group's leader is
/// still in its catch-up wait (the new replica's node cut off, then back):
/// the group must never keep a voter the map does not list (its node
/// quarantines it), so that the replicas the map shows are the ones that
/// vote.
#[test]
fn an_abandoned_replacement_never_stays_a_voter() {
    // Root and iptables: skipped without, a failure under
    // DATANODE_REQUIRE_KERNEL_TESTS=1 (as CI runs).
    if unavailable(&["iptables"]).is_some() {
        return;
    }
    let cluster = TestCluster::start(4, REPAIR);
    cluster.wait_formed();
    let meta = cluster.meta_leader();
    assert!(meta < 3);
    // A partition on the seeds 0-2, node 3 free: placed while node 3
    // drains (it holds nothing, so the drain is taken), then undrained.
    let id = 60;
    let (status, drained) = admin("POST", &cluster, meta, "/v1/cluster/nodes/dn-4/drain", None);
    assert_eq!(status, 202, "{drained}");
    let (status, created) = cluster.create(meta, id, None);
    assert_eq!(status, 201, "{created}");
    cluster.wait_leader(id);
    assert!(replicas(&cluster, id).iter().all(|r| r.1 < 3), "{created}");
    let (status, undrained) = admin("DELETE", &cluster, meta, "/v1/cluster/nodes/dn-4/drain", None);
    assert_eq!(status, 200, "{undrained}");
    let body = format!("{{\"to\":\"dn-{}\"}}", meta + 1);
    let (status, moved) =
        admin("POST", &cluster, meta, &format!("/v1/cluster/partitions/{id}/transfer-leader"), Some(&body));
    assert!(status == 200 || status == 202, "{status} {moved}");
    wait_for("the metadata leader's node leads", Duration::from_secs(30), || cluster.wait_leader(id) == meta);
    let load = ClusterLoad::start(&cluster.ports, id, 4, 4096, "phantom");
    load.wait_more(100, Duration::from_secs(60));
    let (_acked, _) = load.stop();
    let before = replicas(&cluster, id);
    let (old_id, victim, _, _, _) = before.iter().find(|r| r.1 != meta).cloned().unwrap();
    let spare = 3;
    let mut net = Blocked(Vec::new());
    // The spare node can be told (its heartbeats go out) but not reached.
    net.block(cluster.peer_ports[spare]);
    let mut cluster = cluster;
    cluster.kill(victim);
    let mut repair = None;
    wait_for("a repair onto the spare node, its replica started", Duration::from_secs(60), || {
        repair = replicas(&cluster, id).into_iter().find(|r| r.4 == Some(old_id));
        repair.as_ref().is_some_and(|r| held_replicas(&cluster, spare).contains(&r.0))
    });
    let (new_id, new_node, _, _, _) = repair.unwrap();
    assert_eq!(new_node, spare);
    eprintln!("repair: {old_id} -> {new_id} on node {spare}; voters {:?}", voters(&cluster, meta, id));
    // The spare node now can no longer heartbeat (nor learn the map).
    net.block(cluster.peer_ports[meta]);
    // Long enough for a repairer that decides blind to give the repair
    // up (node_dead_after + repair_after + a pass): it must not, without
    // a fresh word of the group's leader; and if it does, the group must
    // not keep the replica as a voter.
    std::thread::sleep(Duration::from_secs(8));
    eprintln!("after the cut: map {:?}", replicas(&cluster, id));
    // The group's leader reaches the spare again.
    net.unblock(cluster.peer_ports[spare]);
    let promoted = (0..150).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        voters(&cluster, meta, id).contains(&new_id)
    });
    eprintln!("promoted once reachable: {promoted}; voters {:?}", voters(&cluster, meta, id));
    net.unblock(cluster.peer_ports[meta]);
    let mut last = (BTreeSet::new(), BTreeSet::new());
    wait_for("the group's voters are the replicas the map lists", Duration::from_secs(90), || {
        let map_ids: BTreeSet<u64> = replicas(&cluster, id).iter().map(|r| r.0).collect();
        let group = voters(&cluster, cluster.wait_leader(id), id);
        last = (group.clone(), map_ids.clone());
        !group.is_empty() && group.is_subset(&map_ids)
    });
    eprintln!("settled: group voters {:?}, map {:?}", last.0, last.1);
    // The map shows at least two healthy replicas elsewhere: losing the
    // spare must leave the group writable.
    cluster.kill(spare);
    let load = ClusterLoad::start(&cluster.ports, id, 4, 4096, "after");
    load.wait_more(1, Duration::from_secs(60));
    let (acked, failures) = load.stop();
    eprintln!("with node {spare} down: {} writes acknowledged, other answers {failures:?}", acked.len());
}
