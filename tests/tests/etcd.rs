//! The etcd client's primitives against a real 3-member etcd cluster (Debian's etcd
//! 3.4 on loopback): create-only and compare-and-set transactions, lease-held keys,
//! watches that resume after a reconnect and resync after a compaction, failover
//! between members, quorum loss reported as "unavailable", and TLS.
use std::time::{Duration, Instant};

use overlay_ctl::store::etcd::{
    EtcdClient, EtcdConfig, EtcdError, PrefixWatch, ResyncReason, TlsFiles, WatchEvent, WatchUpdate,
};
use overlay_tests::etcd::EtcdCluster;

const HEALTHY: Duration = Duration::from_secs(30);

/// The next update of `watch`, retrying its errors (a member coming back) until the
/// deadline.
async fn next_update(watch: &mut PrefixWatch, timeout: Duration) -> WatchUpdate {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.next()).await {
            Ok(Ok(update)) => return update,
            Ok(Err(e)) => assert!(Instant::now() < deadline, "watch still failing: {e}"),
            Err(_) => panic!("no watch update within {timeout:?}"),
        }
    }
}

fn changed_keys(update: &WatchUpdate) -> Vec<String> {
    match update {
        WatchUpdate::Changes { events, .. } => events.iter().map(|e| e.key().to_string()).collect(),
        other => panic!("expected changes, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_create_only_and_cas_compares_mod_revision() {
    let cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;

    assert!(client.create("t/vni/42", b"blue").await.unwrap());
    assert!(
        !client.create("t/vni/42", b"red").await.unwrap(),
        "a second create must fail"
    );
    let entry = client.get("t/vni/42").await.unwrap().expect("created");
    assert_eq!(entry.value, b"blue");
    assert_eq!(entry.create_revision, entry.mod_revision);
    assert!(
        !client.put_cas("t/vni/42", b"red", 0).await.unwrap(),
        "cas 0 is create-only"
    );

    let stale = entry.mod_revision;
    assert!(client.put_cas("t/vni/42", b"green", stale).await.unwrap());
    assert!(
        !client.put_cas("t/vni/42", b"red", stale).await.unwrap(),
        "stale revision accepted"
    );
    let entry = client.get("t/vni/42").await.unwrap().unwrap();
    assert_eq!(entry.value, b"green");
    assert_eq!(entry.version, 2);

    assert!(!client.delete_cas("t/vni/42", stale).await.unwrap());
    assert!(client
        .delete_cas("t/vni/42", entry.mod_revision)
        .await
        .unwrap());
    assert_eq!(client.get("t/vni/42").await.unwrap(), None);

    for k in ["t/a/1", "t/a/2", "t/b"] {
        client.put(k, b"x").await.unwrap();
    }
    assert_eq!(client.keys("t/a/").await.unwrap(), ["t/a/1", "t/a/2"]);
    assert!(
        client.delete_tree("").await.is_err(),
        "an empty prefix must be refused"
    );
    assert_eq!(client.delete_tree("t/a/").await.unwrap(), 2);
    assert_eq!(client.list("t/").await.unwrap().entries.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holds_its_key_while_kept_alive_and_drops_it_after() {
    let cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(3);
    let lease = client.lease_grant(ttl).await.unwrap();
    assert!(client
        .acquire("t/nodes/a", b"10.0.0.1", lease)
        .await
        .unwrap());
    assert!(
        client
            .acquire("t/nodes/a", b"10.0.0.2", lease)
            .await
            .unwrap(),
        "the holder updates"
    );
    let other = client.lease_grant(ttl).await.unwrap();
    assert!(
        !client.acquire("t/nodes/a", b"x", other).await.unwrap(),
        "another lease took it"
    );
    client.lease_revoke(other).await.unwrap();
    let info = client
        .lease_info(lease)
        .await
        .unwrap()
        .expect("lease alive");
    assert_eq!(info.keys, ["t/nodes/a"]);

    // Kept alive for three TTLs, the key must stay all along.
    let keeper = client.keep_alive(lease, ttl);
    let until = Instant::now() + ttl * 3;
    while Instant::now() < until {
        let entry = client.get("t/nodes/a").await.unwrap();
        assert_eq!(
            entry.map(|e| e.lease),
            Some(Some(lease)),
            "key lost while kept alive"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!keeper.is_lost());

    // Renewals stop: the key must go within the TTL (plus etcd's expiry check pace).
    drop(keeper);
    let stopped = Instant::now();
    while client.get("t/nodes/a").await.unwrap().is_some() {
        assert!(stopped.elapsed() < ttl * 2, "key outlived its lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "lease-held key gone {:?} after the last renewal stopped",
        stopped.elapsed()
    );
    assert_eq!(client.lease_info(lease).await.unwrap(), None);
    assert!(!client.lease_renew(lease).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_is_reported_lost_and_its_key_goes_at_once() {
    let cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    let lease = client.lease_grant(Duration::from_secs(10)).await.unwrap();
    assert!(client.acquire("t/nodes/b", b"v", lease).await.unwrap());
    let mut keeper = client.keep_alive(lease, Duration::from_secs(3));
    client.lease_revoke(lease).await.unwrap();
    assert_eq!(client.get("t/nodes/b").await.unwrap(), None);
    tokio::time::timeout(Duration::from_secs(10), keeper.lost())
        .await
        .expect("the keep-alive must notice the revoked lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_from_its_revision_after_its_member_dies() {
    let mut cluster = EtcdCluster::start(3).await;
    let writer = cluster.member_client(1).await;
    // The watch talks to member 0 only, so killing it breaks the stream for sure.
    let mut watch = PrefixWatch::new(cluster.member_client(0).await, "t/w/");
    match next_update(&mut watch, HEALTHY).await {
        WatchUpdate::Snapshot { listing, reason } => {
            assert_eq!(reason, ResyncReason::Initial);
            assert!(listing.entries.is_empty());
        }
        other => panic!("expected the initial snapshot, got {other:?}"),
    }
    writer.put("t/w/1", b"a").await.unwrap();
    writer.put("t/other", b"not watched").await.unwrap();
    assert_eq!(
        changed_keys(&next_update(&mut watch, HEALTHY).await),
        ["t/w/1"]
    );

    cluster.kill_member(0);
    let r2 = writer.put("t/w/2", b"b").await.unwrap();
    writer.delete("t/w/1").await.unwrap();
    cluster.start_member(0);
    cluster.wait_healthy(HEALTHY).await;

    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next_update(&mut watch, HEALTHY).await {
            WatchUpdate::Changes { events, .. } => seen.extend(events),
            other => panic!("expected changes after the reconnect, got {other:?}"),
        }
    }
    assert!(watch.reconnects() >= 1, "the stream never broke: {watch:?}");
    assert!(matches!(&seen[0], WatchEvent::Put(e) if e.key == "t/w/2" && e.mod_revision == r2));
    assert!(matches!(&seen[1], WatchEvent::Delete { key, .. } if key == "t/w/1"));
    assert_eq!(seen.len(), 2, "events were repeated or invented: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_resyncs_and_says_so() {
    let cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    let start = client.put("t/c/1", b"a").await.unwrap();
    client.put("t/c/2", b"b").await.unwrap();
    client.delete("t/c/1").await.unwrap();
    let last = client.put("t/c/3", b"c").await.unwrap();
    client.compact(last).await.unwrap();

    let mut watch = PrefixWatch::resume(client.clone(), "t/c/", start);
    match next_update(&mut watch, HEALTHY).await {
        WatchUpdate::Snapshot { listing, reason } => {
            assert!(
                matches!(reason, ResyncReason::Compacted { requested, compacted } if requested == start + 1 && compacted == last),
                "{reason:?}"
            );
            let keys: Vec<&str> = listing.entries.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, ["t/c/2", "t/c/3"]);
            assert!(listing.revision >= last);
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    // After the resync the watch goes on from the snapshot's revision.
    client.put("t/c/4", b"d").await.unwrap();
    assert_eq!(
        changed_keys(&next_update(&mut watch, HEALTHY).await),
        ["t/c/4"]
    );

    // The blocking list over a compacted revision is a plain full read.
    let listing = client
        .list_blocking("t/c/", start, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(listing.entries.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_fails_over_when_a_member_is_killed() {
    let mut cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    // Whichever member the channel uses, one round kills it.
    for victim in 0..3 {
        cluster.kill_member(victim);
        let started = Instant::now();
        for n in 0..20 {
            let key = format!("t/f/{victim}/{n}");
            assert!(client.create(&key, b"x").await.unwrap(), "{key}");
            assert!(client.get(&key).await.unwrap().is_some());
        }
        eprintln!(
            "member {victim} down: 20 creates and reads in {:?}",
            started.elapsed()
        );
        cluster.start_member(victim);
        cluster.wait_healthy(HEALTHY).await;
    }
    assert_eq!(client.keys("t/f/").await.unwrap().len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_writes_go_on() {
    let mut cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    let leader = cluster.wait_healthy(HEALTHY).await;
    cluster.kill_member(leader);
    let started = Instant::now();
    let new_leader = cluster.wait_healthy(HEALTHY).await;
    assert_ne!(new_leader, leader);
    client.put("t/l", b"after").await.unwrap();
    eprintln!(
        "new leader m{new_leader} and a write {:?} after killing m{leader}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_is_one_unavailable_error_and_service_returns_with_quorum() {
    let mut cluster = EtcdCluster::start(3).await;
    let client = cluster.client().await;
    client.put("t/q", b"before").await.unwrap();
    let victims = cluster.kill_all_but(&[0]);

    let started = Instant::now();
    let err = client
        .put("t/q", b"during")
        .await
        .expect_err("a write without quorum");
    let took = started.elapsed();
    let text = err.to_string();
    eprintln!("without quorum, after {took:?}: {text}");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(matches!(err, EtcdError::Unavailable { .. }));
    assert!(
        text.contains("unavailable") && !text.contains('\n'),
        "{text}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?} to report it");
    let err = client
        .create("t/q2", b"x")
        .await
        .expect_err("a create without quorum");
    assert!(err.is_unavailable(), "{err:?}");

    for i in victims {
        cluster.start_member(i);
    }
    cluster.wait_healthy(HEALTHY).await;
    client.put("t/q", b"after").await.unwrap();
    assert_eq!(client.get("t/q").await.unwrap().unwrap().value, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let cluster = EtcdCluster::start_tls(3).await;
    let client = cluster.client().await;
    assert!(client.create("t/tls", b"secret").await.unwrap());
    assert_eq!(client.get("t/tls").await.unwrap().unwrap().value, b"secret");

    // Without a client certificate the members refuse the connection.
    let tls = cluster.tls().expect("TLS cluster");
    let no_cert = TlsFiles {
        ca: Some(tls.ca.clone()),
        ..TlsFiles::default()
    };
    let config = EtcdConfig::new(&cluster.address(), no_cert)
        .unwrap()
        .with_max_attempts(1)
        .with_request_timeout(Duration::from_secs(3));
    let anonymous = EtcdClient::connect(config).await.unwrap();
    assert!(
        anonymous.get("t/tls").await.is_err(),
        "a client without certificate was served"
    );

    // A plaintext client of a TLS cluster fails too.
    let plain = cluster.address().replacen("etcds://", "etcd://", 1);
    let config = EtcdConfig::new(&plain, TlsFiles::default())
        .unwrap()
        .with_max_attempts(1);
    let plain = EtcdClient::connect(config).await.unwrap();
    assert!(plain.get("t/tls").await.is_err());
}

/// A listing bigger than a gRPC message may hold (4 MiB) is read in pages, all at one
/// revision: a cluster of 20,000 endpoints is about 5 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_bigger_than_one_message_is_read_whole_at_one_revision() {
    use futures_util::StreamExt as _;
    let cluster = EtcdCluster::start(1).await;
    let client = cluster.client().await;
    let value = vec![b'x'; 2048];
    // 2,500 keys of 2 KiB: 5 MB, and more than two pages.
    let count = 2500;
    futures_util::stream::iter(0..count)
        .map(|i| {
            let (client, value) = (client.clone(), value.clone());
            async move { client.put(&format!("big/k{i:05}"), &value).await }
        })
        .buffer_unordered(32)
        .for_each(|r| async move {
            r.unwrap();
        })
        .await;
    let written = client.put("other/after", b"1").await.unwrap();
    let listing = client.list("big/").await.unwrap();
    assert_eq!(listing.entries.len(), count);
    let keys: Vec<&str> = listing.entries.iter().map(|e| e.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(keys, sorted, "sorted, each key once");
    assert!(listing.revision >= written);
    assert_eq!(client.keys("big/").await.unwrap().len(), count);
}
