//! The agent's feed of the store (`StoreFeed`) on both backends: after the first
//! snapshot an endpoint write arrives as a change carrying only that key, an `applied/`
//! acknowledgement wakes nobody, a write that bypasses the store's own code is not lost,
//! lost history (a compacted etcd revision, a reset Consul index, a lapped journal) gives
//! a snapshot, the bytes a follower reads per change do not grow with the cluster, and
//! on etcd the feed gives the versions of the followed keys as of what it delivered (a
//! follower checks its copy against them).
use std::time::{Duration, Instant};

use overlay_ctl::store::{
    backend::{KvBackend, StoreBackend},
    consul::{ConsulClient, ConsulError, TxnOp, TxnOutcome},
    devserver::{AclTokens, ConsulDev, DevConfig},
    feed::{FeedEvent, KvChange, StoreFeed, Versions},
    journal, Store,
};
use overlay_tests::etcd::EtcdCluster;

const PREFIX: &str = "ov/";
const DEADLINE: Duration = Duration::from_secs(30);
/// The feed's wait: how soon a quiet feed answers with an empty `Changes`.
const QUIET: Duration = Duration::from_millis(700);

/// The next event, retrying the feed's errors (a store coming back) until the deadline.
async fn next_event(feed: &mut StoreFeed) -> FeedEvent {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, feed.next()).await {
            Ok(Ok(event)) => return event,
            Ok(Err(e)) => assert!(Instant::now() < deadline, "feed still failing: {e}"),
            Err(_) => panic!("no feed event within {DEADLINE:?}"),
        }
    }
}

/// Events until one that is not an empty `Changes` (a quiet wait).
async fn next_news(feed: &mut StoreFeed) -> FeedEvent {
    loop {
        match next_event(feed).await {
            FeedEvent::Changes { changes, .. } if changes.is_empty() => continue,
            event => return event,
        }
    }
}

fn snapshot_keys(event: &FeedEvent) -> Vec<String> {
    match event {
        FeedEvent::Snapshot { pairs, .. } => pairs.iter().map(|p| p.key.clone()).collect(),
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

fn changes_of(event: FeedEvent) -> Vec<KvChange> {
    match event {
        FeedEvent::Changes { changes, .. } => changes,
        other => panic!("expected changes, got {other:?}"),
    }
}

fn key(rest: &str) -> String {
    format!("{PREFIX}{rest}")
}

/// The small sections a node's state always has, so that every one is populated.
async fn seed(store: &Store) {
    for (k, v) in [
        ("config/cluster-id", "{}"),
        ("networks/net1", "{\"name\":\"net1\"}"),
        ("vni/2", "net1"),
        ("nodes/n1", "{\"name\":\"n1\"}"),
    ] {
        store.kv().put(&key(k), v.as_bytes()).await.unwrap();
    }
}

/// After the first snapshot: an endpoint put and delete arrive as changes of that key
/// only, and an acknowledgement under `applied/` produces no event.
async fn puts_deletes_and_acknowledgements(store: &Store, feed: &mut StoreFeed) {
    let first = next_event(feed).await;
    let keys = snapshot_keys(&first);
    assert!(keys.contains(&key("networks/net1")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("applied/")), "{keys:?}");

    let web = key("endpoints/net1/web");
    store.kv().put(&web, b"{\"id\":\"web\"}").await.unwrap();
    let changes = changes_of(next_news(feed).await);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        matches!(&changes[0], KvChange::Put(p) if p.key == web && p.value == b"{\"id\":\"web\"}")
    );

    store.put_applied("n1", 42).await.unwrap();
    store.put_applied("n2", 43).await.unwrap();
    match next_event(feed).await {
        FeedEvent::Changes { changes, .. } => {
            assert!(
                changes.is_empty(),
                "an acknowledgement reached the feed: {changes:?}"
            )
        }
        other => panic!("an acknowledgement caused {other:?}"),
    }

    store.kv().delete(&web).await.unwrap();
    let changes = changes_of(next_news(feed).await);
    assert_eq!(changes, [KvChange::Delete { key: web }]);
}

/// Bytes the feed's own client read per endpoint change, over `changes` changes made
/// one at a time with `cluster` endpoints in the store.
async fn bytes_per_change(
    writer: &Store,
    feed_client: StoreBackend,
    cluster: usize,
    changes: usize,
) -> u64 {
    for i in 0..cluster {
        let k = key(&format!("endpoints/net1/seed-{i:05}"));
        writer
            .kv()
            .put(
                &k,
                format!("{{\"id\":\"seed-{i:05}\",\"ip\":\"10.1.0.1\"}}").as_bytes(),
            )
            .await
            .unwrap();
    }
    let mut feed = StoreFeed::new(feed_client.clone(), PREFIX, QUIET);
    let first = next_event(&mut feed).await;
    assert!(snapshot_keys(&first).len() >= cluster);
    let before = feed_client.bytes_read();
    for i in 0..changes {
        let k = key(&format!("endpoints/net1/churn-{i}"));
        writer
            .kv()
            .put(&k, b"{\"id\":\"churn\",\"ip\":\"10.1.0.2\"}")
            .await
            .unwrap();
        loop {
            let changes = changes_of(next_news(&mut feed).await);
            if changes.iter().any(|c| c.key() == k) {
                break;
            }
        }
    }
    (feed_client.bytes_read() - before) / changes as u64
}

// ---- Consul (the dev server) ----

async fn dev() -> (ConsulDev, ConsulClient, Store) {
    let server = ConsulDev::start("127.0.0.1:0").await.expect("dev server");
    let client = ConsulClient::new(&server.http_addr(), None).unwrap();
    let store = Store::new(client.clone(), PREFIX);
    seed(&store).await;
    (server, client, store)
}

/// The journal's head counter, read directly.
async fn journal_head(raw: &ConsulClient) -> u64 {
    journal::parse_head(raw.get(&key("journal/head")).await.unwrap().as_ref())
}

/// A client of its own for the feed, so its bytes are the feed's alone.
fn feed_client(server: &ConsulDev) -> StoreBackend {
    StoreBackend::Consul(ConsulClient::new(&server.http_addr(), None).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_feed_delivers_only_changed_keys_and_ignores_acknowledgements() {
    let (server, _raw, store) = dev().await;
    let mut feed = StoreFeed::new(feed_client(&server), PREFIX, QUIET);
    puts_deletes_and_acknowledgements(&store, &mut feed).await;

    // A small section: a node's record going away (as its session's end deletes it).
    store.kv().delete(&key("nodes/n1")).await.unwrap();
    let changes = changes_of(next_news(&mut feed).await);
    assert_eq!(
        changes,
        [KvChange::Delete {
            key: key("nodes/n1")
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_journal_writes_are_atomic_with_their_records() {
    let (_server, raw, store) = dev().await;
    let web = key("endpoints/net1/web");
    assert!(store.kv().put_cas(&web, b"one", 0).await.unwrap());
    let head = raw
        .get(&key("journal/head"))
        .await
        .unwrap()
        .expect("a head");
    let record = raw.get(&web).await.unwrap().unwrap();
    assert_eq!(head.value, b"1");
    assert_eq!(
        head.modify_index, record.modify_index,
        "one transaction, one index"
    );
    // A failed check writes nothing: no record, no journal entry.
    assert!(!store.kv().put_cas(&web, b"two", 0).await.unwrap());
    assert_eq!(
        raw.get(&key("journal/head")).await.unwrap().unwrap().value,
        b"1"
    );
    assert_eq!(raw.get(&web).await.unwrap().unwrap().value, b"one");
    // Other kinds of keys are not journaled.
    store.kv().put(&key("networks/net2"), b"{}").await.unwrap();
    assert_eq!(
        raw.get(&key("journal/head")).await.unwrap().unwrap().value,
        b"1"
    );
}

/// The journaled writes of one process that wait for their turn go out together: 64
/// endpoint puts at once take far fewer store indexes than writes, each has its journal
/// entry, and a follower gets every put as a change of its own, none lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_journaled_writes_of_one_process_go_out_together() {
    const WRITES: usize = 64;
    let (server, raw, store) = dev().await;
    let mut feed = StoreFeed::new(feed_client(&server), PREFIX, QUIET);
    snapshot_keys(&next_event(&mut feed).await);
    let head_before = journal_head(&raw).await;

    let record = |i: usize| {
        (
            key(&format!("endpoints/net1/e{i}")),
            format!("{{\"id\":\"e{i}\"}}"),
        )
    };
    let writes = (0..WRITES).map(|i| {
        let kv = store.kv().clone();
        async move {
            let (k, v) = record(i);
            kv.put(&k, v.as_bytes()).await
        }
    });
    for result in futures_util::future::join_all(writes).await {
        result.expect("a journaled put");
    }

    let pairs = raw.list(&key("endpoints/net1/")).await.unwrap();
    assert_eq!(pairs.len(), WRITES);
    let indexes: std::collections::BTreeSet<u64> = pairs.iter().map(|p| p.modify_index).collect();
    assert!(
        indexes.len() < WRITES / 4,
        "{WRITES} writes at once took {} store indexes",
        indexes.len()
    );
    assert_eq!(
        journal_head(&raw).await,
        head_before + WRITES as u64,
        "one entry per write"
    );

    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < WRITES {
        for change in changes_of(next_news(&mut feed).await) {
            let KvChange::Put(pair) = change else {
                panic!("not a put: {change:?}");
            };
            assert!(
                seen.insert(pair.key.clone(), pair.value).is_none(),
                "{} twice",
                pair.key
            );
        }
    }
    let expected: std::collections::BTreeMap<_, _> = (0..WRITES)
        .map(|i| {
            let (k, v) = record(i);
            (k, v.into_bytes())
        })
        .collect();
    assert_eq!(seen, expected);
}

/// A write's own check stays its own when it goes out with others: of 16 creations of
/// one key at once, one is written and the others are told no, and the 16 unconditional
/// writes that went with them are all written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_journaled_checks_stay_per_write_in_a_group() {
    const WRITERS: usize = 16;
    let (_server, raw, store) = dev().await;
    let head_before = journal_head(&raw).await;
    let contested = key("endpoints/net1/web");
    let creations = (0..WRITERS).map(|i| {
        let (kv, contested) = (store.kv().clone(), contested.clone());
        async move {
            let value = format!("{i}");
            (
                value.clone(),
                kv.put_cas(&contested, value.as_bytes(), 0).await,
            )
        }
    });
    let puts = (0..WRITERS).map(|i| {
        let kv = store.kv().clone();
        async move { kv.put(&key(&format!("ipam/net1/10.0.0.{i}")), b"x").await }
    });
    let (created, put) = tokio::join!(
        futures_util::future::join_all(creations),
        futures_util::future::join_all(puts)
    );
    let winners: Vec<String> = created
        .into_iter()
        .filter_map(|(value, result)| result.expect("a journaled cas").then_some(value))
        .collect();
    assert_eq!(winners.len(), 1, "creations that succeeded: {winners:?}");
    assert_eq!(
        raw.get(&contested).await.unwrap().unwrap().value,
        winners[0].as_bytes()
    );
    for result in put {
        result.expect("a journaled put");
    }
    assert_eq!(raw.list(&key("ipam/net1/")).await.unwrap().len(), WRITERS);
    assert_eq!(
        journal_head(&raw).await,
        head_before + WRITERS as u64 + 1,
        "an entry for every write made, none for those refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_server_transactions_are_atomic_and_say_which_check_failed() {
    let (_server, c, _store) = dev().await;
    c.put("t/a", b"1").await.unwrap();
    let a = c.get("t/a").await.unwrap().unwrap();
    let set = |key: &str, value: &[u8]| TxnOp::Set {
        key: key.to_string(),
        value: value.to_vec(),
    };
    // A failed check anywhere rolls back every operation.
    let outcome = c
        .txn(&[
            set("t/b", b"2"),
            TxnOp::Cas {
                key: "t/a".into(),
                value: b"x".to_vec(),
                index: a.modify_index + 1,
            },
        ])
        .await
        .unwrap();
    let TxnOutcome::RolledBack(failures) = outcome else {
        panic!("a stale cas applied: {outcome:?}");
    };
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].op_index, 1);
    assert_eq!(
        c.get("t/b").await.unwrap(),
        None,
        "a rolled-back set was applied"
    );
    // Every write of one transaction shares one index; gets see the earlier writes.
    let outcome = c
        .txn(&[
            set("t/b", b"2"),
            TxnOp::Cas {
                key: "t/c".into(),
                value: b"3".to_vec(),
                index: 0,
            },
            TxnOp::DeleteCas {
                key: "t/a".into(),
                index: a.modify_index,
            },
            TxnOp::Get { key: "t/b".into() },
        ])
        .await
        .unwrap();
    let TxnOutcome::Applied(results) = outcome else {
        panic!("expected the transaction to apply: {outcome:?}");
    };
    let b = c.get("t/b").await.unwrap().unwrap();
    let created = c.get("t/c").await.unwrap().unwrap();
    assert_eq!(b.modify_index, created.modify_index);
    assert_eq!(c.get("t/a").await.unwrap(), None);
    assert_eq!(results.last().unwrap().value, b"2");
    // A get of a missing key fails the transaction; a tree delete takes every key below.
    let missing = c.txn(&[TxnOp::Get { key: "t/a".into() }]).await.unwrap();
    assert!(matches!(missing, TxnOutcome::RolledBack(_)), "{missing:?}");
    c.txn(&[TxnOp::DeleteTree {
        prefix: "t/".into(),
    }])
    .await
    .unwrap();
    assert!(c.list("t/").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_server_transactions_need_the_right_on_every_key() {
    let mut acl = AclTokens::default();
    acl.add("narrow=key:write:ov/").unwrap();
    let config = DevConfig {
        acl,
        ..DevConfig::default()
    };
    let server = ConsulDev::start_with("127.0.0.1:0", config).await.unwrap();
    let c = ConsulClient::new(&server.http_addr(), Some("narrow".into())).unwrap();
    let inside = TxnOp::Set {
        key: key("endpoints/n/a"),
        value: b"1".to_vec(),
    };
    let outside = TxnOp::Set {
        key: "elsewhere/x".into(),
        value: b"1".to_vec(),
    };
    c.txn(std::slice::from_ref(&inside)).await.unwrap();
    let denied = c.txn(&[inside, outside]).await.unwrap_err();
    assert!(
        matches!(denied, ConsulError::AclDenied { .. }),
        "{denied:?}"
    );
    assert!(denied.to_string().contains("key:write"), "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_feed_does_not_lose_a_write_that_bypasses_the_journal() {
    let (server, raw, store) = dev().await;
    let mut feed = StoreFeed::new(feed_client(&server), PREFIX, QUIET);
    next_event(&mut feed).await;
    store
        .kv()
        .put(&key("endpoints/net1/web"), b"w")
        .await
        .unwrap();
    next_news(&mut feed).await;

    let evil = key("endpoints/net1/evil");
    raw.put(&evil, b"{\"id\":\"evil\"}").await.unwrap();
    let arrived = match next_news(&mut feed).await {
        FeedEvent::Snapshot { pairs, .. } => pairs.iter().any(|p| p.key == evil),
        FeedEvent::Changes { changes, .. } => changes.iter().any(|c| c.key() == evil),
    };
    assert!(arrived, "the foreign write never reached the feed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_feed_resyncs_when_it_falls_behind_the_journal_or_the_index_resets() {
    let (server, _raw, store) = dev().await;
    let mut feed = StoreFeed::new(feed_client(&server), PREFIX, QUIET);
    next_event(&mut feed).await;
    let writes = journal::SLOTS as usize + 10;
    for i in 0..writes {
        store
            .kv()
            .put(&key(&format!("ipam/net1/{i}")), b"x")
            .await
            .unwrap();
    }
    let keys = snapshot_keys(&next_news(&mut feed).await);
    assert_eq!(keys.iter().filter(|k| k.contains("/ipam/")).count(), writes);

    // A store that lost its state (a dev server restarted without a data directory):
    // every index starts over.
    let addr = server.addr().to_string();
    server.shutdown().await;
    let server = ConsulDev::start(&addr)
        .await
        .expect("restart on the same address");
    let store = Store::new(
        ConsulClient::new(&server.http_addr(), None).unwrap(),
        PREFIX,
    );
    seed(&store).await;
    store
        .kv()
        .put(&key("endpoints/net1/after"), b"a")
        .await
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "no snapshot after the reset");
        if let FeedEvent::Snapshot { pairs, .. } = next_news(&mut feed).await {
            if pairs.iter().any(|p| p.key == key("endpoints/net1/after")) {
                assert!(
                    !pairs.iter().any(|p| p.key.contains("/ipam/")),
                    "stale keys kept"
                );
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_bytes_per_change_do_not_grow_with_the_cluster() {
    let mut per_change = Vec::new();
    for cluster in [200, 2_000] {
        let (server, _raw, store) = dev().await;
        per_change.push(bytes_per_change(&store, feed_client(&server), cluster, 20).await);
    }
    eprintln!("consul: bytes read per change at 200 and 2000 endpoints: {per_change:?}");
    assert!(per_change[1] <= 2 * per_change[0], "{per_change:?}");
    assert!(
        per_change[1] < 8_000,
        "a change costs more than a few entries: {per_change:?}"
    );
}

// ---- etcd ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_feed_delivers_only_changed_keys_and_resyncs_after_compaction() {
    let mut cluster = EtcdCluster::start(3).await;
    let store = Store::etcd(cluster.member_client(1).await, PREFIX);
    seed(&store).await;
    // The feed talks to member 0 only, so killing it breaks its watch for sure.
    let mut feed = StoreFeed::new(
        StoreBackend::Etcd(cluster.member_client(0).await),
        PREFIX,
        QUIET,
    );
    puts_deletes_and_acknowledgements(&store, &mut feed).await;

    cluster.kill_member(0);
    let writer = cluster.member_client(1).await;
    writer
        .put(&key("endpoints/net1/during"), b"d")
        .await
        .unwrap();
    let last = writer.put(&key("endpoints/net1/last"), b"l").await.unwrap();
    writer.compact(last).await.unwrap();
    cluster.start_member(0);
    cluster.wait_healthy(DEADLINE).await;
    let keys = snapshot_keys(&next_news(&mut feed).await);
    assert!(keys.contains(&key("endpoints/net1/during")), "{keys:?}");
    assert!(keys.contains(&key("endpoints/net1/last")), "{keys:?}");

    // A direct write (etcdctl put) is a watch event like any other.
    writer
        .put(&key("endpoints/net1/foreign"), b"f")
        .await
        .unwrap();
    let changes = changes_of(next_news(&mut feed).await);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].key(), key("endpoints/net1/foreign"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_bytes_per_change_do_not_grow_with_the_cluster() {
    let mut per_change = Vec::new();
    for cluster in [200, 2_000] {
        let etcd = EtcdCluster::start(1).await;
        let store = Store::etcd(etcd.client().await, PREFIX);
        seed(&store).await;
        let feed_client = StoreBackend::Etcd(etcd.client().await);
        per_change.push(bytes_per_change(&store, feed_client, cluster, 20).await);
    }
    eprintln!("etcd: bytes read per change at 200 and 2000 endpoints: {per_change:?}");
    assert!(per_change[1] <= 2 * per_change[0], "{per_change:?}");
    assert!(
        per_change[1] < 4_000,
        "a change costs more than a few entries: {per_change:?}"
    );
}

/// After `reread`, the next event is a snapshot of what the store holds now, and the
/// feed follows on from it (what an agent does when a fresh read shows the store is not
/// what its copy was taken from).
async fn reread_starts_over(store: &Store, feed: &mut StoreFeed) {
    let first = next_news(feed).await;
    assert!(snapshot_keys(&first).contains(&key("nodes/n1")));
    store
        .kv()
        .put(&key("endpoints/net1/before"), b"b")
        .await
        .unwrap();
    let keys: Vec<String> = (changes_of(next_news(feed).await).iter())
        .map(|c| c.key().to_string())
        .collect();
    assert_eq!(keys, [key("endpoints/net1/before")]);
    feed.reread("the test says so");
    let keys = snapshot_keys(&next_news(feed).await);
    assert!(keys.contains(&key("endpoints/net1/before")), "{keys:?}");
    assert!(keys.contains(&key("nodes/n1")), "{keys:?}");
    store
        .kv()
        .put(&key("endpoints/net1/after"), b"a")
        .await
        .unwrap();
    let keys: Vec<String> = (changes_of(next_news(feed).await).iter())
        .map(|c| c.key().to_string())
        .collect();
    assert_eq!(keys, [key("endpoints/net1/after")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_feed_reread_starts_over_from_a_snapshot() {
    let (server, _raw, store) = dev().await;
    let mut feed = StoreFeed::new(feed_client(&server), PREFIX, QUIET);
    reread_starts_over(&store, &mut feed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_feed_reread_starts_over_from_a_snapshot() {
    let cluster = EtcdCluster::start(1).await;
    let store = Store::etcd(cluster.member_client(0).await, PREFIX);
    seed(&store).await;
    let mut feed = StoreFeed::new(
        StoreBackend::Etcd(cluster.member_client(0).await),
        PREFIX,
        QUIET,
    );
    reread_starts_over(&store, &mut feed).await;
}

/// The (key, modify index) of every pair, sorted by key.
fn versions_of<'p>(
    pairs: impl IntoIterator<Item = &'p overlay_ctl::store::backend::KvPair>,
) -> Vec<(String, u64)> {
    let mut keys: Vec<(String, u64)> = pairs
        .into_iter()
        .map(|p| (p.key.clone(), p.modify_index))
        .collect();
    keys.sort();
    keys
}

/// On etcd, the versions are those of what the feed delivered, not of what was written
/// since: a follower that applied every delivered event holds exactly them (so a key
/// that differs is one it missed), and acknowledgements are not among them. Read
/// without the values, they cost a fraction of a whole read of the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_feed_versions_are_those_of_the_last_event_delivered() {
    let cluster = EtcdCluster::start(1).await;
    let store = Store::etcd(cluster.member_client(0).await, PREFIX);
    seed(&store).await;
    let feed_client = cluster.member_client(0).await;
    let mut feed = StoreFeed::new(StoreBackend::Etcd(feed_client.clone()), PREFIX, QUIET);
    assert!(feed.versions_read().is_none(), "nothing delivered yet");
    let (mut held, index) = match next_news(&mut feed).await {
        FeedEvent::Snapshot { pairs, index } => (versions_of(&pairs), index),
        other => panic!("expected a snapshot, got {other:?}"),
    };
    let read = feed.versions_read().expect("etcd gives versions");
    assert_eq!(read.index(), index);
    let versions = read.clone().read().await.unwrap();
    assert_eq!(
        versions,
        Versions {
            index,
            keys: held.clone()
        }
    );

    // Written, not delivered yet: not in the versions.
    let web = key("endpoints/net1/web");
    store.kv().put(&web, b"w").await.unwrap();
    store.put_applied("n1", 7).await.unwrap();
    assert_eq!(
        feed.versions_read().unwrap().read().await.unwrap().keys,
        held
    );

    // Delivered: in them, at the index the event carried; a read taken before it,
    // made after it, still gives the versions as of its own index.
    let held_before = held.clone();
    let changes = changes_of(next_news(&mut feed).await);
    for change in &changes {
        match change {
            KvChange::Put(pair) => held.extend(versions_of([pair])),
            KvChange::Delete { key } => held.retain(|(k, _)| k != key),
        }
    }
    held.sort();
    assert_eq!(read.read().await.unwrap().keys, held_before);
    let versions = feed.versions_read().unwrap().read().await.unwrap();
    assert!(versions.keys.iter().any(|(k, _)| *k == web), "{versions:?}");
    assert_eq!(versions.keys, held);
    assert!(!versions.keys.iter().any(|(k, _)| k.contains("applied/")));

    // 400 endpoint records of the usual size: the versions read less than a third of
    // the bytes of the whole records.
    for i in 0..400 {
        let record = format!(
            r#"{{"id":"e{i:03}","network":"net1","ip":"10.1.{}.{}","mac":"02:42:0a:01:00:00","node":"n1","ifname":"ovl-net1-e{i:03}"}}"#,
            i / 200,
            i % 200
        );
        let k = key(&format!("endpoints/net1/e{i:03}"));
        store.kv().put(&k, record.as_bytes()).await.unwrap();
    }
    // Until the feed delivered them all (one batch or several).
    while feed
        .versions_read()
        .unwrap()
        .read()
        .await
        .unwrap()
        .keys
        .len()
        < held.len() + 400
    {
        let _ = next_news(&mut feed).await;
    }
    // The feed's client and its clones share one count; the store is quiet, so the
    // watch reads nothing meanwhile.
    let before = feed_client.bytes_read();
    let versions = feed.versions_read().unwrap().read().await.unwrap();
    let between = feed_client.bytes_read();
    let whole = feed_client.list(PREFIX).await.unwrap();
    let (read_versions, read_whole) = (between - before, feed_client.bytes_read() - between);
    eprintln!("versions: {read_versions} bytes; whole: {read_whole} bytes");
    assert_eq!(
        versions.keys.len(),
        whole.entries.len() - 1,
        "applied/ is left out"
    );
    assert!(
        3 * read_versions < read_whole,
        "{read_versions} bytes of versions, {read_whole} of records"
    );
}

/// Consul cannot be read as of a past index: no versions (its follower re-reads the
/// whole store instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_feed_gives_no_versions() {
    let (server, _raw, _store) = dev().await;
    let mut feed = StoreFeed::new(feed_client(&server), PREFIX, QUIET);
    let _ = next_news(&mut feed).await;
    assert!(feed.versions_read().is_none());
}
