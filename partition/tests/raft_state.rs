//! The replica's state machine, the blob store over the Raft log: values
//! read back from the log records they were written in, snapshots that
//! let the log be purged without losing a value, installs that replace
//! the state whole, and crashes and damage that leave the old snapshot or
//! the new one, never a mix.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use datanode_partition::blob;
use datanode_partition::image::ImageReader;
use datanode_partition::raft::{BlobStateMachine, Command, Entry, LogId, LogStore, TypeConfig, open_replica};
use datanode_wal::storage::{SimStorage, StdStorage};
use datanode_wal::{Storage, WalOptions};
use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use openraft::impls::leader_id_adv::LeaderId;
use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::TypeConfigExt;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn wal_options() -> WalOptions {
    WalOptions { segment_size: 4096, prewrite_segments: false, ..WalOptions::new(7) }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn log_id(index: u64) -> LogId {
    LogId::new(LeaderId { term: 1, node_id: 1 }, index)
}

fn open(storage: &SimStorage, dir: &Path) -> (LogStore, BlobStateMachine) {
    open_replica(Arc::new(storage.clone()), dir, wal_options()).unwrap()
}

fn value(key: &str, version: u64) -> Vec<u8> {
    let mut value = format!("{key}={version}:").into_bytes();
    value.resize(150 + (version as usize * 37) % 200, b'x');
    value
}

/// A replica and the model of what it must serve.
struct Replica {
    store: LogStore,
    sm: BlobStateMachine,
    next: u64,
    model: Model,
}

impl Replica {
    fn new(storage: &SimStorage, dir: &Path) -> Replica {
        Replica::on(Arc::new(storage.clone()), dir)
    }

    fn on(storage: Arc<dyn Storage>, dir: &Path) -> Replica {
        let (store, sm) = open_replica(storage, dir, wal_options()).unwrap();
        Replica { store, sm, next: 0, model: Model::new() }
    }

    /// Appends `commands` as entries, then applies them the way openraft
    /// does: read back from the log.
    async fn write(&mut self, commands: Vec<Bytes>) {
        let first = self.next;
        let entries: Vec<Entry> = commands
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| Entry::new(log_id(first + i as u64), EntryPayload::Normal(Command::new(bytes))))
            .collect();
        self.next += entries.len() as u64;
        let (tx, rx) = TypeConfig::oneshot();
        self.store.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        self.apply_log(first..self.next).await.unwrap();
    }

    async fn apply_log(&mut self, range: std::ops::Range<u64>) -> std::io::Result<()> {
        let entries = self.store.get_log_reader().await.try_get_log_entries(range).await?;
        self.sm.apply(futures_util::stream::iter(entries.into_iter().map(|entry| Ok((entry, None))))).await
    }

    async fn put(&mut self, key: &str, version: u64) {
        let value = value(key, version);
        self.model.insert(key.as_bytes().to_vec(), value.clone());
        self.write(vec![blob::encode_put(key.as_bytes(), &value)]).await;
    }

    async fn delete(&mut self, key: &str) {
        self.model.remove(key.as_bytes());
        self.write(vec![blob::encode_delete(key.as_bytes())]).await;
    }

    /// Puts `k0..k<count>` at `version`, in one batch.
    async fn put_many(&mut self, count: usize, version: u64) {
        let mut commands = Vec::new();
        for i in 0..count {
            let (key, value) = (format!("k{i:03}"), value(&format!("k{i:03}"), version));
            commands.push(blob::encode_put(key.as_bytes(), &value));
            self.model.insert(key.into_bytes(), value);
        }
        self.write(commands).await;
    }
}

/// Every key of `model` reads back whole and in part, and nothing else is
/// listed.
fn assert_serves(sm: &BlobStateMachine, model: &Model) {
    for (key, value) in model {
        assert_eq!(sm.get(key, None).unwrap().as_deref(), Some(&value[..]), "key {:?}", Bytes::from(key.clone()));
        assert_eq!(sm.get(key, Some(3..10)).unwrap().as_deref(), Some(&value[3..10]));
        assert_eq!(sm.len_of(key), Some(value.len() as u64));
    }
    let (listed, next) = sm.list(b"", None, usize::MAX);
    assert_eq!(next, None);
    assert_eq!(listed, model.keys().map(|key| Bytes::from(key.clone())).collect::<Vec<_>>());
    let stats = sm.stats();
    assert_eq!(stats.keys, model.len() as u64);
    assert_eq!(stats.live_bytes, model.values().map(|value| value.len() as u64).sum::<u64>());
}

fn image_contents(mut image: impl Read) -> Model {
    let mut reader = ImageReader::new(&mut image, 1 << 20).unwrap();
    let mut model = Model::new();
    while let Some((key, value)) = reader.next_entry().unwrap() {
        model.insert(key, value);
    }
    assert_eq!(reader.partition(), 7);
    model
}

fn image_bytes(mut image: impl Read) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.read_to_end(&mut bytes).unwrap();
    bytes
}

fn names(storage: &SimStorage, dir: &Path) -> Vec<String> {
    let mut names = storage.list_dir(dir).unwrap();
    names.sort();
    names
}

/// A put is indexed where it lies in the log (applying writes no store),
/// reads come from there; after a snapshot and a purge of the log up to
/// it every value still reads, also after a power cut, and a restart
/// reports the snapshot's state and applies the log after it.
#[test]
fn values_survive_a_snapshot_and_a_purge_of_the_log() {
    let rt = runtime();
    let sim = SimStorage::new(1);
    let dir = Path::new("/d0/replicas/1");
    let mut replica = Replica::new(&sim, dir);
    rt.block_on(async {
        replica.put_many(40, 1).await;
        for i in (0..40).step_by(3) {
            replica.put(&format!("k{i:03}"), 2).await;
        }
        replica.delete("k001").await;
        replica.delete("k004").await;
    });
    assert_serves(&replica.sm, &replica.model);
    assert!(!names(&sim, dir).iter().any(|name| name.starts_with("snap.")), "apply writes no store");
    assert_eq!(replica.sm.stats().applied, Some(log_id(replica.next - 1)));

    let snapshot = rt.block_on(async {
        let mut builder = replica.sm.get_snapshot_builder().await;
        builder.build_snapshot().await.unwrap()
    });
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(replica.next - 1)));
    assert_eq!(image_contents(snapshot.snapshot.image_reader()), replica.model);
    rt.block_on(replica.store.purge(log_id(replica.next - 1))).unwrap();
    assert!(replica.store.wal().first_lsn() > 10, "the log's segments are gone");
    assert_serves(&replica.sm, &replica.model);

    // Writes after the snapshot live in the log; a power cut, then a
    // restart from the snapshot, which applies them again.
    let snapshot_last = replica.next - 1;
    rt.block_on(async {
        replica.put("k002", 3).await;
        replica.delete("k003").await;
        replica.put("new", 1).await;
    });
    let image = sim.crash_image();
    let (store, sm) = open(&image, dir);
    let mut reopened = Replica { store, sm, next: replica.next, model: replica.model.clone() };
    let applied = rt.block_on(reopened.sm.applied_state()).unwrap().0;
    assert_eq!(applied, Some(log_id(snapshot_last)));
    rt.block_on(reopened.apply_log(snapshot_last + 1..replica.next)).unwrap();
    assert_serves(&reopened.sm, &reopened.model);
    let current = rt.block_on(reopened.sm.get_current_snapshot()).unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(snapshot_last)));

    // What openraft does at start-up with the current snapshot: cheap,
    // and it changes nothing.
    rt.block_on(reopened.sm.install_snapshot(&current.meta, current.snapshot)).unwrap();
    assert_serves(&reopened.sm, &reopened.model);
    assert_eq!(reopened.sm.stats().applied, Some(log_id(replica.next - 1)));
}

/// A build works on the view taken when its builder was made: writes
/// applied meanwhile are not in the snapshot and are not lost from the
/// state; after the purge they still read.
#[test]
fn a_snapshot_built_while_applies_continue_is_consistent() {
    let rt = runtime();
    let sim = SimStorage::new(2);
    let dir = Path::new("/d0/replicas/2");
    let mut replica = Replica::new(&sim, dir);
    let (view_model, view_last) = rt.block_on(async {
        replica.put_many(30, 1).await;
        (replica.model.clone(), replica.next - 1)
    });
    let mut builder = rt.block_on(replica.sm.get_snapshot_builder());
    rt.block_on(async {
        replica.put("k001", 9).await;
        replica.delete("k002").await;
        replica.put("later", 1).await;
    });
    let snapshot = rt.block_on(builder.build_snapshot()).unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(view_last)));
    assert_eq!(image_contents(snapshot.snapshot.image_reader()), view_model);
    rt.block_on(replica.store.purge(log_id(view_last))).unwrap();
    assert_serves(&replica.sm, &replica.model);

    // A second build while the first one's store is being read elsewhere:
    // the old image still streams whole.
    let old_image = snapshot.snapshot;
    let second = rt.block_on(async { replica.sm.get_snapshot_builder().await.build_snapshot().await.unwrap() });
    assert_eq!(image_contents(second.snapshot.image_reader()), replica.model);
    assert_eq!(image_contents(old_image.image_reader()), view_model);
    assert_eq!(names(&sim, dir).iter().filter(|name| name.starts_with("snap.")).count(), 1, "{:?}", names(&sim, dir));
    assert_serves(&replica.sm, &replica.model);
}

/// Readers on other threads during applies, builds and purges always get
/// a value the key held, never an error.
#[test]
fn reads_run_concurrently_with_apply_build_and_purge() {
    let rt = runtime();
    let sim = SimStorage::new(3);
    let dir = Path::new("/d0/replicas/3");
    let mut replica = Replica::new(&sim, dir);
    rt.block_on(replica.put_many(20, 0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (sm, stop) = (replica.sm.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..20 {
                        let key = format!("k{i:03}");
                        let got = sm.get(key.as_bytes(), None).unwrap().unwrap();
                        assert!(got.starts_with(format!("{key}=").as_bytes()), "{key}");
                        reads += 1;
                    }
                }
                reads
            })
        })
        .collect();
    rt.block_on(async {
        for round in 1..6 {
            replica.put_many(20, round).await;
            let snapshot = replica.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
            replica.store.purge(snapshot.meta.last_log_id.unwrap()).await.unwrap();
        }
    });
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert_serves(&replica.sm, &replica.model);
}

/// An image streamed from one replica, spooled by another and installed
/// there replaces its state whole: keys it does not hold are gone, the
/// applied state is the image's, and it survives a restart.
#[test]
fn install_replaces_the_state_whole() {
    let rt = runtime();
    let sim = SimStorage::new(4);
    let mut leader = Replica::new(&sim, Path::new("/d0/replicas/leader"));
    let follower_dir = Path::new("/d0/replicas/follower");
    let mut follower = Replica::new(&sim, follower_dir);
    rt.block_on(async {
        leader.put_many(25, 1).await;
        leader.delete("k010").await;
        follower.put("only-here", 1).await;
        follower.put("k001", 7).await;
    });
    let snapshot = rt.block_on(async { leader.sm.get_snapshot_builder().await.build_snapshot().await.unwrap() });
    let image = follower.sm.receive_snapshot(snapshot.snapshot.image_reader()).unwrap();
    let spool = image.spool_path().unwrap().to_path_buf();
    assert!(sim.list_dir(follower_dir).unwrap().iter().any(|name| spool.ends_with(name)));
    rt.block_on(follower.sm.install_snapshot(&snapshot.meta, image)).unwrap();
    assert!(sim.open(&spool, false).is_err(), "the spool file is removed");
    assert_serves(&follower.sm, &leader.model);
    assert_eq!(follower.sm.get(b"only-here", None).unwrap(), None);
    assert_eq!(
        rt.block_on(follower.sm.applied_state()).unwrap(),
        (snapshot.meta.last_log_id, snapshot.meta.last_membership.clone())
    );
    let current = rt.block_on(follower.sm.get_current_snapshot()).unwrap().unwrap();
    assert_eq!(current.meta, snapshot.meta);
    assert_eq!(image_bytes(current.snapshot.image_reader()), image_bytes(snapshot.snapshot.image_reader()));

    // What openraft does next: purge the follower's log past its end.
    rt.block_on(follower.store.purge(snapshot.meta.last_log_id.unwrap())).unwrap();
    drop(follower);
    let (_store, sm) = open(&sim.crash_image(), follower_dir);
    assert_serves(&sm, &leader.model);
    assert_eq!(rt.block_on(BlobStateMachine::clone(&sm).applied_state()).unwrap().0, snapshot.meta.last_log_id);
}

/// A damaged image is refused on receipt (and leaves no spool file); one
/// damaged in its spool file is refused by the install, which leaves the
/// old state serving and no store behind; an image of another partition
/// is refused.
#[test]
fn a_corrupted_image_is_refused_and_the_old_state_serves() {
    let rt = runtime();
    let sim = SimStorage::new(5);
    let mut leader = Replica::new(&sim, Path::new("/d0/replicas/leader"));
    let follower_dir = Path::new("/d0/replicas/follower");
    let mut follower = Replica::new(&sim, follower_dir);
    rt.block_on(async {
        leader.put_many(10, 1).await;
        follower.put("mine", 1).await;
        follower.put_many(3, 4).await;
    });
    let snapshot = rt.block_on(async { leader.sm.get_snapshot_builder().await.build_snapshot().await.unwrap() });
    let bytes = image_bytes(snapshot.snapshot.image_reader());
    let before = names(&sim, follower_dir);
    for at in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x20;
        assert!(follower.sm.receive_snapshot(&flipped[..]).is_err(), "a byte flipped at {at}");
        assert!(follower.sm.receive_snapshot(&bytes[..at]).is_err(), "cut at {at}");
    }
    assert_eq!(names(&sim, follower_dir), before, "refused images leave nothing behind");

    let image = follower.sm.receive_snapshot(&bytes[..]).unwrap();
    sim.tamper(image.spool_path().unwrap(), bytes.len() / 2, b"rot").unwrap();
    let refused = rt.block_on(follower.sm.install_snapshot(&snapshot.meta, image)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData, "{refused}");
    assert_serves(&follower.sm, &follower.model);
    assert_eq!(names(&sim, follower_dir), before);

    let other_dir = Path::new("/d0/replicas/other");
    let options = WalOptions { log_id: 8, ..wal_options() };
    let (_other_log, other) = open_replica(Arc::new(sim.clone()), other_dir, options).unwrap();
    assert!(other.receive_snapshot(&bytes[..]).is_err(), "an image of partition 7 into partition 8");

    let (next, model) = (follower.next, follower.model.clone());
    drop(follower);
    let (store, sm) = open(&sim.crash_image(), follower_dir);
    let mut reopened = Replica { store, sm, next, model };
    rt.block_on(reopened.apply_log(0..next)).unwrap();
    assert_serves(&reopened.sm, &reopened.model);
}

/// A power cut at every point of a build, and of an install, leaves the
/// old snapshot or the new one: the replica reopens, reports one of the
/// two applied states, and once it applied the log after it serves what
/// it served before.
#[test]
fn a_crash_during_build_or_install_leaves_the_old_snapshot_or_the_new() {
    let rt = runtime();
    for install in [false, true] {
        let (mut n, mut old_seen, mut new_seen) = (1, 0, 0);
        loop {
            let sim = SimStorage::new(100 + n);
            let dir = Path::new("/d0/replicas/r");
            let mut replica = Replica::new(&sim, dir);
            let mut leader = Replica::new(&sim, Path::new("/d0/replicas/leader"));
            let (old_last, old_model) = rt.block_on(async {
                replica.put_many(12, 1).await;
                let first = replica.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
                replica.store.purge(first.meta.last_log_id.unwrap()).await.unwrap();
                replica.put_many(6, 2).await;
                replica.delete("k000").await;
                // Ahead of the replica, as a leader that sends a snapshot is.
                leader.put_many(30, 5).await;
                leader.put("leader", 1).await;
                (first.meta.last_log_id, replica.model.clone())
            });
            let leader_snapshot =
                rt.block_on(async { leader.sm.get_snapshot_builder().await.build_snapshot().await.unwrap() });
            let received = replica.sm.receive_snapshot(leader_snapshot.snapshot.image_reader()).unwrap();
            sim.crash_before_op(n);
            let new_last = if install {
                rt.block_on(replica.sm.install_snapshot(&leader_snapshot.meta, received)).unwrap();
                leader_snapshot.meta.last_log_id
            } else {
                drop(received);
                let built = rt.block_on(async { replica.sm.get_snapshot_builder().await.build_snapshot().await });
                built.unwrap().meta.last_log_id
            };
            let Some(image) = sim.take_crashed() else { break };
            let (store, sm) = open(&image, dir);
            let mut reopened = Replica { store, sm, next: replica.next, model: Model::new() };
            let applied = rt.block_on(reopened.sm.applied_state()).unwrap().0;
            let stores = names(&image, dir).into_iter().filter(|name| name.starts_with("snap.")).count();
            assert_eq!(stores, 1, "one snapshot store after a crash at op {n}");
            if applied == old_last {
                rt.block_on(reopened.apply_log(old_last.unwrap().index + 1..replica.next)).unwrap();
                assert_serves(&reopened.sm, &old_model);
                old_seen += 1;
            } else {
                new_seen += 1;
                assert_eq!(applied, new_last, "crash at op {n}");
                let expected = if install { leader.model.clone() } else { old_model.clone() };
                assert_serves(&reopened.sm, &expected);
            }
            n += 1;
        }
        let what = if install { "install" } else { "build" };
        assert!(old_seen > 0 && new_seen > 0, "crashes in the {what} left {old_seen} old, {new_seen} new states");
        println!("{what}: {} crash points, {old_seen} left the old snapshot, {new_seen} the new", n - 1);
    }
}

/// A damaged `SNAPSHOT`, a missing snapshot store or a log purged beyond
/// the snapshot is an error naming the file; bad command bytes are an
/// error, not a panic.
#[test]
fn damage_is_an_error_naming_the_file_never_a_reset() {
    let rt = runtime();
    let sim = SimStorage::new(6);
    let dir = Path::new("/d0/replicas/6");
    let mut replica = Replica::new(&sim, dir);
    rt.block_on(async {
        replica.put_many(5, 1).await;
        replica.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        replica.store.purge(log_id(replica.next - 1)).await.unwrap();
    });
    let storage: Arc<dyn Storage> = Arc::new(sim.clone());
    let error_of = |storage: &SimStorage| open_replica(Arc::new(storage.clone()), dir, wal_options()).unwrap_err();

    let damaged = sim.crash_image();
    damaged.tamper(&dir.join("SNAPSHOT"), 7, b"9").unwrap();
    assert!(error_of(&damaged).to_string().contains("SNAPSHOT"), "{}", error_of(&damaged));

    let lost = sim.crash_image();
    let store = names(&lost, dir).into_iter().find(|name| name.starts_with("snap.")).unwrap();
    lost.remove_dir_all(&dir.join(&store)).unwrap();
    assert!(error_of(&lost).to_string().contains(&store), "{}", error_of(&lost));

    let no_snapshot = sim.crash_image();
    no_snapshot.remove_file(&dir.join("SNAPSHOT")).unwrap();
    let error = error_of(&no_snapshot);
    assert!(error.to_string().contains("purged"), "{error}");
    assert_eq!(error.into_io().kind(), std::io::ErrorKind::InvalidData);
    drop(storage);

    // A command that is no blob record, and a put that was not read back
    // from the log.
    rt.block_on(async {
        let junk =
            Entry::new(log_id(replica.next), EntryPayload::Normal(Command::new(Bytes::from_static(b"\x09junk"))));
        let (tx, rx) = TypeConfig::oneshot();
        replica.store.append(vec![junk], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        let error = replica.apply_log(replica.next..replica.next + 1).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
        let unread = Entry::new(log_id(replica.next), EntryPayload::Normal(Command::new(blob::encode_put(b"k", b"v"))));
        let error = replica.sm.apply(futures_util::stream::iter([Ok((unread, None))])).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    });
    assert_serves(&replica.sm, &replica.model);
}

/// A restart the way openraft makes it (`StorageHelper::get_initial_state`):
/// after a clean close the replica loads its snapshot and applies the
/// committed log after it at once, and serves every value.
#[test]
fn a_restart_applies_the_committed_log_after_the_snapshot() {
    let rt = runtime();
    let sim = SimStorage::new(8);
    let dir = Path::new("/d0/replicas/8");
    let mut replica = Replica::new(&sim, dir);
    rt.block_on(async {
        replica.put_many(20, 1).await;
        let snapshot = replica.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        replica.store.purge(snapshot.meta.last_log_id.unwrap()).await.unwrap();
        replica.put_many(8, 2).await;
        replica.delete("k019").await;
        replica.store.save_committed(Some(log_id(replica.next - 1))).await.unwrap();
    });
    let model = replica.model.clone();
    replica.store.close().unwrap();
    let (mut store, mut sm) = open(&sim.crash_image(), dir);
    rt.block_on(openraft::StorageHelper::new(&mut store, &mut sm).with_id(1).get_initial_state()).unwrap();
    assert_eq!(sm.stats().applied, Some(log_id(replica.next - 1)));
    assert_serves(&sm, &model);
}

/// The same on real files: snapshot, purge, more writes, close, reopen.
#[test]
fn snapshot_purge_and_restart_on_real_files() {
    let rt = runtime();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("replica");
    let storage: Arc<dyn Storage> = Arc::new(StdStorage);
    let mut replica = Replica::on(Arc::clone(&storage), &dir);
    rt.block_on(async {
        replica.put_many(50, 1).await;
        replica.put_many(25, 2).await;
        let snapshot = replica.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        replica.store.purge(snapshot.meta.last_log_id.unwrap()).await.unwrap();
        replica.put_many(10, 3).await;
        replica.store.save_committed(Some(log_id(replica.next - 1))).await.unwrap();
    });
    assert_serves(&replica.sm, &replica.model);
    let model = replica.model.clone();
    replica.store.close().unwrap();
    drop(replica.sm);
    let (mut store, mut sm) = open_replica(storage, &dir, wal_options()).unwrap();
    rt.block_on(openraft::StorageHelper::new(&mut store, &mut sm).with_id(1).get_initial_state()).unwrap();
    assert_serves(&sm, &model);
}

/// An I/O error while a snapshot is built or installed fails that call
/// only: the store it was writing is gone, the old snapshot stays current
/// and the replica serves on; the next build works.
#[test]
fn an_io_error_during_build_or_install_leaves_the_old_snapshot_serving() {
    use datanode_wal::IoOp;
    use datanode_wal::storage::Fault;
    let rt = runtime();
    let sim = SimStorage::new(9);
    let dir = Path::new("/d0/replicas/9");
    let mut replica = Replica::new(&sim, dir);
    let mut leader = Replica::new(&sim, Path::new("/d0/replicas/leader"));
    rt.block_on(async {
        replica.put_many(10, 1).await;
        replica.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        replica.put_many(5, 2).await;
        leader.put_many(30, 3).await;
    });
    let before = names(&sim, dir);
    let leader_snapshot = rt.block_on(async { leader.sm.get_snapshot_builder().await.build_snapshot().await.unwrap() });
    for (op, errno) in [(IoOp::Write, libc::EIO), (IoOp::Sync, libc::EIO), (IoOp::Write, libc::ENOSPC)] {
        sim.inject(Fault::new(op, errno).on_path("/d0/replicas/9/snap.").sticky());
        let built = rt.block_on(async { replica.sm.get_snapshot_builder().await.build_snapshot().await });
        assert!(built.is_err(), "{op:?} {errno}");
        let received = replica.sm.receive_snapshot(leader_snapshot.snapshot.image_reader()).unwrap();
        assert!(rt.block_on(replica.sm.install_snapshot(&leader_snapshot.meta, received)).is_err());
        sim.clear_faults();
        assert_eq!(names(&sim, dir), before, "{op:?} {errno}");
        assert_serves(&replica.sm, &replica.model);
    }
    let built = rt.block_on(async { replica.sm.get_snapshot_builder().await.build_snapshot().await }).unwrap();
    assert_eq!(image_contents(built.snapshot.image_reader()), replica.model);
}
