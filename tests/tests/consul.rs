//! The Consul client against the in-process dev server: KV check-and-set, listings,
//! blocking queries and the client's index rules, sessions (TTL expiry, lock-delay),
//! the catalog, and the cluster state store and IPAM on top.
use std::{
    collections::BTreeSet,
    future::Future,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_ctl::store::devserver::{ConsulDev, DevConfig};
use overlay_ctl::{
    store::consul::{
        CatalogService, ConsulClient, ConsulError, KvPair, KvWatch, RetryPolicy, SessionBehavior,
    },
    store::ipam::IpamError,
    store::{Endpoint, NodeInfo, Store, StoreError},
};

const DEADLINE: Duration = Duration::from_secs(10);

/// A dev server with Consul's session_ttl_min lowered to 1s, for quick expiry tests.
fn test_config() -> DevConfig {
    DevConfig {
        session_ttl_min: Duration::from_secs(1),
        ..DevConfig::default()
    }
}

async fn dev() -> (ConsulDev, ConsulClient) {
    let server = ConsulDev::start_with("127.0.0.1:0", test_config())
        .await
        .expect("start dev server");
    let client = ConsulClient::new(&server.http_addr(), None).expect("client");
    (server, client)
}

/// Polls `check` until it yields `Some`, failing the test after `deadline`.
async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn snapshot(client: &ConsulClient) -> Vec<KvPair> {
    client.list("").await.expect("snapshot")
}

#[tokio::test]
async fn kv_put_get_and_check_and_set() {
    let (server, c) = dev().await;
    assert_eq!(c.get("a/missing").await.unwrap(), None);

    // cas=0 creates only if absent.
    assert!(c.put_cas("a/k", b"one", 0).await.unwrap());
    assert!(!c.put_cas("a/k", b"two", 0).await.unwrap());
    let k = c.get("a/k").await.unwrap().expect("created");
    assert_eq!(k.value, b"one");
    assert_eq!(k.create_index, k.modify_index);
    assert_eq!(k.lock_index, 0);
    assert_eq!(k.session, None);

    // cas=N only when ModifyIndex == N.
    assert!(!c
        .put_cas("a/k", b"two", k.modify_index + 100)
        .await
        .unwrap());
    assert!(!c.put_cas("a/absent", b"x", 5).await.unwrap());
    assert_eq!(c.get("a/absent").await.unwrap(), None);
    assert!(c.put_cas("a/k", b"two", k.modify_index).await.unwrap());
    let k2 = c.get("a/k").await.unwrap().unwrap();
    assert_eq!(k2.value, b"two");
    assert_eq!(k2.create_index, k.create_index);
    assert!(k2.modify_index > k.modify_index);
    assert_eq!(server.index(), k2.modify_index, "one global index");
    // The old index no longer matches.
    assert!(!c.put_cas("a/k", b"three", k.modify_index).await.unwrap());

    // Plain put overwrites; values are binary-safe; empty values read back empty.
    c.put("a/bin", &[0, 255, 10, 13]).await.unwrap();
    assert_eq!(
        c.get("a/bin").await.unwrap().unwrap().value,
        [0, 255, 10, 13]
    );
    c.put("a/empty", b"").await.unwrap();
    assert_eq!(c.get("a/empty").await.unwrap().unwrap().value, b"");
    // Keys needing escapes survive the round trip.
    c.put("a/with space/x?y", b"v").await.unwrap();
    assert_eq!(
        c.get("a/with space/x?y").await.unwrap().unwrap().key,
        "a/with space/x?y"
    );

    // delete_cas with a stale index refuses, with the current one deletes.
    assert!(!c.delete_cas("a/k", k.modify_index).await.unwrap());
    assert!(c.get("a/k").await.unwrap().is_some());
    assert!(c.delete_cas("a/k", k2.modify_index).await.unwrap());
    assert_eq!(c.get("a/k").await.unwrap(), None);
    // Deleting a missing key is fine.
    c.delete("a/k").await.unwrap();
    // The whole store cannot be deleted by accident.
    assert!(matches!(
        c.delete_tree("").await,
        Err(ConsulError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn kv_recurse_keys_and_delete_tree() {
    let (_server, c) = dev().await;
    assert!(c.list("p/").await.unwrap().is_empty());
    assert!(c.keys("p/").await.unwrap().is_empty());
    for k in ["p/a", "p/b/1", "p/b/2", "p/c/d/e", "q/x", "pp"] {
        c.put(k, k.as_bytes()).await.unwrap();
    }
    let listed: Vec<String> = c
        .list("p/")
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(listed, ["p/a", "p/b/1", "p/b/2", "p/c/d/e"]);
    assert_eq!(
        c.keys("p/").await.unwrap(),
        ["p/a", "p/b/1", "p/b/2", "p/c/d/e"]
    );
    assert_eq!(
        c.keys_with_separator("p/", "/").await.unwrap(),
        ["p/a", "p/b/", "p/c/"]
    );
    // A prefix is a string prefix, not a path: "p" matches "pp" too.
    assert_eq!(c.keys("p").await.unwrap().len(), 5);

    c.delete_tree("p/b/").await.unwrap();
    assert_eq!(c.keys("p/").await.unwrap(), ["p/a", "p/c/d/e"]);
    assert_eq!(c.keys("").await.unwrap(), ["p/a", "p/c/d/e", "pp", "q/x"]);
}

#[tokio::test]
async fn blocking_query_returns_on_change_under_the_prefix() {
    let (_server, c) = dev().await;
    c.put("w/one", b"1").await.unwrap();
    c.put("other/x", b"0").await.unwrap();
    let (pairs, index) = c
        .list_blocking("w/", 0, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(pairs.len(), 1);

    let watcher = {
        let c = c.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let r = c.list_blocking("w/", index, Duration::from_secs(30)).await;
            (r, start.elapsed())
        })
    };
    // A write elsewhere does not wake the watcher...
    c.put("other/x", b"1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !watcher.is_finished(),
        "woke on a change outside the prefix"
    );
    // ...a write under the prefix does, at once.
    c.put("w/two", b"2").await.unwrap();
    let (result, elapsed) = tokio::time::timeout(DEADLINE, watcher)
        .await
        .expect("watcher returned")
        .unwrap();
    let (pairs, new_index) = result.unwrap();
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(new_index > index);
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[1].modify_index, new_index);

    // A deletion under the prefix wakes watchers too, with a higher index.
    let watcher = {
        let c = c.clone();
        tokio::spawn(async move {
            c.list_blocking("w/", new_index, Duration::from_secs(30))
                .await
        })
    };
    c.delete("w/one").await.unwrap();
    let (pairs, after_delete) = tokio::time::timeout(DEADLINE, watcher)
        .await
        .expect("watcher returned")
        .unwrap()
        .unwrap();
    assert!(after_delete > new_index);
    assert_eq!(pairs.len(), 1);

    // Single-key blocking reads work the same way.
    let k = c.get("w/two").await.unwrap().unwrap();
    let watcher = {
        let c = c.clone();
        tokio::spawn(async move {
            c.get_blocking("w/two", k.modify_index, Duration::from_secs(30))
                .await
        })
    };
    c.put("w/two", b"22").await.unwrap();
    let (pair, idx) = tokio::time::timeout(DEADLINE, watcher)
        .await
        .expect("key watcher returned")
        .unwrap()
        .unwrap();
    assert_eq!(pair.unwrap().value, b"22");
    assert!(idx > k.modify_index);
}

#[tokio::test]
async fn blocking_query_times_out_with_the_same_index() {
    let (_server, c) = dev().await;
    c.put("quiet/k", b"v").await.unwrap();
    let (_, index) = c
        .list_blocking("quiet/", 0, Duration::from_secs(1))
        .await
        .unwrap();
    let start = Instant::now();
    let (pairs, again) = c
        .list_blocking("quiet/", index, Duration::from_secs(1))
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(again, index, "index moved without a change");
    assert_eq!(pairs.len(), 1);
    assert!(
        elapsed >= Duration::from_millis(950),
        "returned after {elapsed:?}, before the wait"
    );
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    // A missing prefix answers 404 with an index; the client reads it as empty.
    let (pairs, idx) = c
        .list_blocking("nothing/", 0, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(pairs.is_empty());
    assert!(idx >= 1);
}

#[tokio::test]
async fn watch_resets_when_the_index_goes_backwards() {
    let server = ConsulDev::start("127.0.0.1:0").await.unwrap();
    let addr = server.addr().to_string();
    let c = ConsulClient::new(&addr, None)
        .unwrap()
        .with_retry(RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
        });
    for i in 0..10 {
        c.put(&format!("cfg/{i}"), b"x").await.unwrap();
    }
    let mut watch =
        KvWatch::new(c.clone(), "cfg/", Duration::from_secs(1)).with_min_interval(Duration::ZERO);
    let (pairs, first) = watch.next().await.unwrap();
    assert_eq!(pairs.len(), 10);
    assert_eq!(watch.index(), first);
    assert!(first >= 10);

    // The server is replaced by one with less history (like a restore from an older
    // snapshot): its index is lower than the one we block on.
    server.shutdown().await;
    let server = ConsulDev::start(&addr).await.unwrap();
    c.put("cfg/0", b"y").await.unwrap();
    assert!(server.index() < first);
    let (pairs, returned) = watch.next().await.unwrap();
    assert!(returned < first);
    assert_eq!(watch.index(), 0, "index went backwards: reset to 0");
    assert_eq!(pairs.len(), 1);
    // Index 0 is a plain read: the next call returns at once and re-learns the index.
    let start = Instant::now();
    let (pairs, relearned) = watch.next().await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(900));
    assert_eq!(pairs[0].value, b"y");
    assert_eq!(watch.index(), relearned);
    assert!(relearned >= 1);
}

#[tokio::test]
async fn watch_rate_limits_wakeups() {
    let (_server, c) = dev().await;
    c.put("busy/k", b"0").await.unwrap();
    let min = Duration::from_millis(200);
    let mut watch = KvWatch::new(c.clone(), "busy/", Duration::from_secs(5)).with_min_interval(min);
    watch.next().await.unwrap();
    // A writer changes the key continuously; each wakeup still costs at least `min`.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..2000u32 {
                c.put("busy/k", &i.to_be_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let start = Instant::now();
    for _ in 0..4 {
        watch.next().await.unwrap();
    }
    assert!(
        start.elapsed() >= min * 3,
        "4 wakeups in {:?}",
        start.elapsed()
    );
    writer.abort();
}

#[tokio::test]
async fn outage_is_an_error_not_a_panic() {
    let server = ConsulDev::start("127.0.0.1:0").await.unwrap();
    let addr = server.addr().to_string();
    drop(server);
    let c = ConsulClient::new(&addr, None)
        .unwrap()
        .with_retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        });
    let err = wait_for("the server to be gone", DEADLINE, || async {
        c.get("k").await.err()
    })
    .await;
    assert!(err.is_unavailable(), "{err}");
    assert!(matches!(err, ConsulError::Transport { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr), "{err}");
    assert!(c.put_cas("k", b"v", 0).await.is_err());
    assert!(c.session_renew("x").await.is_err());
}

#[tokio::test]
async fn session_ttl_expiry_deletes_held_keys() {
    let (_server, c) = dev().await;
    let ttl = Duration::from_secs(1);
    let doomed = c
        .session_create("doomed", ttl, SessionBehavior::Delete, Duration::ZERO)
        .await
        .unwrap();
    let kept = c
        .session_create("kept", ttl, SessionBehavior::Delete, Duration::ZERO)
        .await
        .unwrap();
    assert_ne!(doomed, kept);
    let info = c
        .session_info(&doomed)
        .await
        .unwrap()
        .expect("session exists");
    assert_eq!(info.name, "doomed");
    assert_eq!(info.behavior, SessionBehavior::Delete);
    assert_eq!(info.ttl, "1s");

    let start = Instant::now();
    assert!(c.acquire("locks/doomed", b"d", &doomed).await.unwrap());
    assert!(c.acquire("locks/kept", b"k", &kept).await.unwrap());
    let held = c.get("locks/doomed").await.unwrap().unwrap();
    assert_eq!(held.session.as_deref(), Some(doomed.as_str()));
    assert_eq!(held.lock_index, 1);
    // Another session cannot take a held lock; the holder can re-acquire.
    assert!(!c.acquire("locks/doomed", b"x", &kept).await.unwrap());
    assert!(c.acquire("locks/doomed", b"d2", &doomed).await.unwrap());
    assert_eq!(c.get("locks/doomed").await.unwrap().unwrap().lock_index, 1);

    // Renew `kept` while `doomed` runs out.
    let gone = wait_for("the unrenewed session's key to go", DEADLINE, || {
        let c = c.clone();
        let kept = kept.clone();
        async move {
            assert!(c.session_renew(&kept).await.unwrap(), "kept session lost");
            c.get("locks/doomed")
                .await
                .unwrap()
                .is_none()
                .then(Instant::now)
        }
    })
    .await;
    let lived = gone - start;
    assert!(lived >= ttl, "expired after {lived:?}, before the TTL");
    assert!(
        !c.session_renew(&doomed).await.unwrap(),
        "renewed a dead session"
    );
    assert_eq!(c.session_info(&doomed).await.unwrap(), None);
    let k = c
        .get("locks/kept")
        .await
        .unwrap()
        .expect("renewed session keeps its key");
    assert_eq!(k.session.as_deref(), Some(kept.as_str()));

    // Destroying a session with Behavior=delete deletes its keys at once.
    c.session_destroy(&kept).await.unwrap();
    assert_eq!(c.get("locks/kept").await.unwrap(), None);
}

#[tokio::test]
async fn release_behavior_and_explicit_release() {
    let (_server, c) = dev().await;
    let s = c
        .session_create(
            "rel",
            Duration::from_secs(10),
            SessionBehavior::Release,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(c.acquire("r/k", b"v1", &s).await.unwrap());
    // Release by a session that does not hold it fails.
    assert!(!c.release("r/k", b"v1", "not-a-session").await.unwrap());
    assert!(c.release("r/k", b"v2", &s).await.unwrap());
    let k = c.get("r/k").await.unwrap().unwrap();
    assert_eq!(k.session, None);
    assert_eq!(k.value, b"v2");
    // Re-acquire bumps LockIndex; invalidation with Behavior=release keeps the key.
    assert!(c.acquire("r/k", b"v3", &s).await.unwrap());
    assert_eq!(c.get("r/k").await.unwrap().unwrap().lock_index, 2);
    c.session_destroy(&s).await.unwrap();
    let k = c.get("r/k").await.unwrap().expect("kept");
    assert_eq!(k.session, None);
    assert_eq!(k.value, b"v3");
    // Acquiring with a session that does not exist is an error from Consul.
    let err = c.acquire("r/k", b"x", &s).await.unwrap_err();
    assert_eq!(err.status(), Some(500), "{err}");
}

#[tokio::test]
async fn lock_delay_blocks_reacquisition() {
    let (_server, c) = dev().await;
    let delay = Duration::from_secs(1);
    let first = c
        .session_create(
            "first",
            Duration::from_secs(10),
            SessionBehavior::Release,
            delay,
        )
        .await
        .unwrap();
    let second = c
        .session_create(
            "second",
            Duration::from_secs(10),
            SessionBehavior::Release,
            delay,
        )
        .await
        .unwrap();
    assert!(c.acquire("leader", b"first", &first).await.unwrap());
    let invalidated = Instant::now();
    c.session_destroy(&first).await.unwrap();
    assert_eq!(c.get("leader").await.unwrap().unwrap().session, None);
    assert!(
        !c.acquire("leader", b"second", &second).await.unwrap(),
        "acquired during the lock-delay"
    );
    let acquired = wait_for("the lock-delay to pass", DEADLINE, || {
        let c = c.clone();
        let second = second.clone();
        async move {
            c.acquire("leader", b"second", &second)
                .await
                .unwrap()
                .then(Instant::now)
        }
    })
    .await;
    assert!(
        acquired - invalidated >= delay - Duration::from_millis(50),
        "lock-delay lasted only {:?}",
        acquired - invalidated
    );
    let k = c.get("leader").await.unwrap().unwrap();
    assert_eq!(k.session.as_deref(), Some(second.as_str()));
    assert_eq!(k.lock_index, 2);
}

#[tokio::test]
async fn catalog_register_and_deregister() {
    let (_server, c) = dev().await;
    // The server lists itself as the `consul` service, like Consul does.
    assert_eq!(c.catalog_service("consul").await.unwrap().len(), 1);
    assert!(c.catalog_service("overlay").await.unwrap().is_empty());
    let svc = |id: &str, port| CatalogService {
        id: id.to_string(),
        name: "overlay".to_string(),
        address: "192.0.2.1".to_string(),
        port,
        tags: vec!["agent".to_string(), "v1".to_string()],
    };
    c.catalog_register("node-1", "192.0.2.1", &svc("overlay-1", 9100))
        .await
        .unwrap();
    c.catalog_register("node-2", "192.0.2.2", &svc("overlay-2", 9101))
        .await
        .unwrap();
    let mut list = c.catalog_service("overlay").await.unwrap();
    list.sort_by(|a, b| a.node.cmp(&b.node));
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].node, "node-1");
    assert_eq!(list[0].address, "192.0.2.1");
    assert_eq!(list[0].service_id, "overlay-1");
    assert_eq!(list[0].service_port, 9100);
    assert_eq!(list[0].service_tags, ["agent", "v1"]);
    c.catalog_deregister("node-1", "overlay-1").await.unwrap();
    let list = c.catalog_service("overlay").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].node, "node-2");
    assert_eq!(c.leader().await.unwrap(), "127.0.0.1:8300");
}

#[tokio::test]
async fn unknown_endpoints_answer_404() {
    let (server, c) = dev().await;
    // Through the client: a 404 on a PUT is an error, never a silent success.
    let err = c.session_destroy("").await.unwrap_err();
    assert!(err.status().is_some(), "{err}");
    // Raw HTTP for an unknown path.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    s.write_all(b"GET /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("text/plain"), "{answer}");
}

#[tokio::test]
async fn dev_server_binary_starts_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_overlay-cli"))
        .args(["dev-server", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn overlay-ctl dev-server");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("ready line in time")
        .unwrap()
        .expect("a line");
    let addr = line
        .strip_prefix("consul dev server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let c = ConsulClient::new(addr, None).unwrap();
    c.put("x", b"1").await.unwrap();
    assert_eq!(c.get("x").await.unwrap().unwrap().value, b"1");
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

// ---- the cluster state store ----

async fn store() -> (ConsulDev, Store) {
    let (server, c) = dev().await;
    (server, Store::new(c, "overlay/"))
}

#[tokio::test]
async fn networks_create_list_delete() {
    let (_server, store) = store().await;
    assert!(store.list_networks().await.unwrap().is_empty());
    let web = store
        .create_network("web", "10.100.0.0/24", None, Some(100), None)
        .await
        .unwrap();
    assert_eq!(web.gateway, Ipv4Addr::new(10, 100, 0, 1));
    assert_eq!(web.vni, 100);
    assert_eq!(web.mtu, 1450);
    let db = store
        .create_network(
            "db",
            "10.200.0.0/16",
            Some(Ipv4Addr::new(10, 200, 255, 254)),
            None,
            Some(1400),
        )
        .await
        .unwrap();
    assert_eq!(db.vni, 1, "lowest free VNI");
    let names: Vec<String> = store
        .list_networks()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["db", "web"]);
    assert_eq!(store.get_network("web").await.unwrap(), Some(web.clone()));

    // The raw layout, as other tools (and consul kv get) see it.
    let c = store.consul("test").unwrap();
    let raw: serde_json::Value =
        serde_json::from_slice(&c.get("overlay/networks/web").await.unwrap().unwrap().value)
            .unwrap();
    assert_eq!(
        raw,
        serde_json::json!({"name":"web","subnet":"10.100.0.0/24","gateway":"10.100.0.1","vni":100,"mtu":1450,"egress":"masquerade"})
    );
    assert_eq!(
        c.get("overlay/vni/100").await.unwrap().unwrap().value,
        b"web"
    );

    // Deleting is refused while endpoints exist, unless forced.
    let ip = store
        .allocate_ip("web", None, "ep1", "node-1")
        .await
        .unwrap();
    let ep = Endpoint {
        id: "ep1".into(),
        network: "web".into(),
        ip,
        mac: "02:42:0a:64:00:02".parse().unwrap(),
        node: "node-1".into(),
        // The host veth name the CLI gives it (the store rejects any other).
        ifname: overlay_ctl::runtimes::container::host_ifname("web", "ep1"),
        container: Some("c1".into()),
        pid: None,
        netns: None,
    };
    store.put_endpoint(&ep).await.unwrap();
    assert_eq!(
        store.list_endpoints(None).await.unwrap(),
        std::slice::from_ref(&ep)
    );
    assert_eq!(store.get_endpoint("web", "ep1").await.unwrap(), Some(ep));
    let err = store.delete_network("web", false).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NetworkInUse { count: 1, .. }),
        "{err}"
    );
    assert!(store.get_network("web").await.unwrap().is_some());
    store.delete_network("web", true).await.unwrap();
    assert_eq!(store.get_network("web").await.unwrap(), None);
    assert!(c.list("overlay/ipam/web/").await.unwrap().is_empty());
    assert!(c.list("overlay/endpoints/web/").await.unwrap().is_empty());
    assert_eq!(c.get("overlay/vni/100").await.unwrap(), None);
    assert!(matches!(
        store.delete_network("web", false).await,
        Err(StoreError::NoSuchNetwork(_))
    ));
    // The freed VNI and subnet can be used again.
    store
        .create_network("web2", "10.100.0.0/24", None, Some(100), None)
        .await
        .unwrap();
    // Deleting an unused network needs no force.
    store.delete_network("db", false).await.unwrap();
    assert_eq!(c.get("overlay/vni/1").await.unwrap(), None);
}

#[tokio::test]
async fn bad_network_input_leaves_the_store_unchanged() {
    let (_server, store) = store().await;
    store
        .create_network("web", "10.100.0.0/24", None, Some(100), None)
        .await
        .unwrap();
    let before = snapshot(store.consul("test").unwrap()).await;
    let gw = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<Ipv4Addr>,
        Option<u64>,
        Option<u32>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("bad", "10.300.0.0/24", None, None, None, "invalid subnet"),
        ("bad", "10.2.0.0", None, None, None, "invalid subnet"),
        ("bad", "fd00::/64", None, None, None, "invalid subnet"),
        (
            "bad",
            "10.100.1.5/24",
            None,
            None,
            None,
            "10.100.1.5/24 has host bits set; did you mean 10.100.1.0/24?",
        ),
        ("bad", "10.2.0.0/31", None, None, None, "too small"),
        ("bad", "10.2.0.0/32", None, None, None, "too small"),
        ("web", "10.3.0.0/24", None, None, None, "already exists"),
        (
            "bad",
            "10.100.0.128/25",
            None,
            None,
            None,
            "overlaps network \"web\"",
        ),
        ("bad", "10.2.0.0/24", None, Some(0), None, "out of range"),
        (
            "bad",
            "10.2.0.0/24",
            None,
            Some(16_777_216),
            None,
            "out of range",
        ),
        (
            "bad",
            "10.2.0.0/24",
            None,
            Some(100),
            None,
            "VNI 100 is already used by network \"web\"",
        ),
        (
            "bad",
            "10.2.0.0/24",
            gw("10.3.0.1"),
            None,
            None,
            "outside subnet",
        ),
        (
            "bad",
            "10.2.0.0/24",
            gw("10.2.0.0"),
            None,
            None,
            "network address",
        ),
        (
            "bad",
            "10.2.0.0/24",
            gw("10.2.0.255"),
            None,
            None,
            "broadcast address",
        ),
        (
            "bad",
            "10.2.0.0/24",
            None,
            None,
            Some(100),
            "MTU 100 is out of range",
        ),
        (
            "bad/name",
            "10.2.0.0/24",
            None,
            None,
            None,
            "invalid network name",
        ),
        ("", "10.2.0.0/24", None, None, None, "invalid network name"),
    ];
    for (name, cidr, gateway, vni, mtu, want) in cases {
        let err = store
            .create_network(name, cidr, gateway, vni, mtu)
            .await
            .expect_err(&format!(
                "{name} {cidr} {gateway:?} {vni:?} {mtu:?} was accepted"
            ));
        let msg = err.to_string();
        assert!(msg.contains(want), "{msg:?} does not say {want:?}");
        assert!(!msg.contains('\n'), "{msg:?} is not one line");
        assert_eq!(
            snapshot(store.consul("test").unwrap()).await,
            before,
            "{name} {cidr}: the KV store changed"
        );
    }
    let err = store
        .create_network("bad", "10.100.1.5/24", None, None, None)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Invalid(IpamError::HostBitsSet { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creators_leave_no_half_written_state() {
    let (server, store) = store().await;
    // Two creators want the same VNI for different networks: one wins, the other's
    // attempt leaves nothing behind.
    let other = Store::new(
        ConsulClient::new(&server.http_addr(), None).unwrap(),
        "overlay/",
    );
    for round in 0..10u64 {
        let vni = 1000 + round;
        let (name_a, cidr_a) = (format!("a{round}"), format!("10.{round}.1.0/24"));
        let (name_b, cidr_b) = (format!("b{round}"), format!("10.{round}.2.0/24"));
        let (a, b) = tokio::join!(
            store.create_network(&name_a, &cidr_a, None, Some(vni), None),
            other.create_network(&name_b, &cidr_b, None, Some(vni), None),
        );
        assert!(a.is_ok() != b.is_ok(), "round {round}: {a:?} / {b:?}");
        let loser = if a.is_ok() {
            format!("b{round}")
        } else {
            format!("a{round}")
        };
        let err = a.err().or(b.err()).unwrap();
        assert!(matches!(err, StoreError::VniTaken { .. }), "{err}");
        assert_eq!(store.get_network(&loser).await.unwrap(), None);
    }
    // Two creators of one name with different VNIs: one wins, the loser's VNI claim is
    // rolled back.
    for round in 0..10u64 {
        let name = format!("same{round}");
        let cidr = format!("10.{}.0.0/24", 100 + round);
        let (a, b) = tokio::join!(
            store.create_network(&name, &cidr, None, Some(2000 + round), None),
            other.create_network(&name, &cidr, None, Some(3000 + round), None),
        );
        assert!(a.is_ok() != b.is_ok(), "round {round}: {a:?} / {b:?}");
        let winner = a.as_ref().or(b.as_ref()).unwrap().vni as u64;
        let loser = if winner == 2000 + round {
            3000 + round
        } else {
            2000 + round
        };
        let c = store.consul("test").unwrap();
        assert!(c
            .get(&format!("overlay/vni/{winner}"))
            .await
            .unwrap()
            .is_some());
        assert_eq!(
            c.get(&format!("overlay/vni/{loser}")).await.unwrap(),
            None,
            "round {round}: the loser's VNI claim was left behind"
        );
    }
    // Every VNI key belongs to an existing network and vice versa.
    let networks = store.list_networks().await.unwrap();
    let vnis = store
        .consul("test")
        .unwrap()
        .keys("overlay/vni/")
        .await
        .unwrap();
    assert_eq!(networks.len(), 20);
    assert_eq!(vnis.len(), 20);
    // And every network's subnet is claimed, by it (a loser never drops the winner's).
    let (claims, _) = store.subnet_claims().await.unwrap();
    let expected: std::collections::BTreeMap<String, String> = networks
        .iter()
        .map(|n| (n.subnet.to_string(), n.name.clone()))
        .collect();
    assert_eq!(claims, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocators_never_share_an_address() {
    let (server, store) = store().await;
    store
        .create_network("web", "10.100.0.0/24", None, Some(100), None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for node in 0..3 {
        // Separate clients: separate connection pools, like separate hosts.
        let store = Store::new(
            ConsulClient::new(&server.http_addr(), None).unwrap(),
            "overlay/",
        );
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..50 {
                let ip = store
                    .allocate_ip(
                        "web",
                        None,
                        &format!("ep-{node}-{i}"),
                        &format!("node-{node}"),
                    )
                    .await
                    .unwrap();
                got.push(ip);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: BTreeSet<Ipv4Addr> = all.iter().copied().collect();
    assert_eq!(all.len(), 150);
    assert_eq!(distinct.len(), 150, "an address was handed out twice");
    assert!(!distinct.contains(&Ipv4Addr::new(10, 100, 0, 0)));
    assert!(
        !distinct.contains(&Ipv4Addr::new(10, 100, 0, 1)),
        "gateway allocated"
    );
    assert!(!distinct.contains(&Ipv4Addr::new(10, 100, 0, 255)));
    // Lowest-first: exactly .2 ..= .151 are taken.
    let want: BTreeSet<Ipv4Addr> = (2..152).map(|i| Ipv4Addr::new(10, 100, 0, i)).collect();
    assert_eq!(distinct, want);
    let allocations = store.list_allocations("web").await.unwrap();
    assert_eq!(allocations.len(), 150);
    let owner = &allocations[0].1;
    assert!(owner.endpoint.starts_with("ep-") && owner.node.starts_with("node-"));
}

#[tokio::test]
async fn ipam_requested_addresses_release_and_exhaustion() {
    let (_server, store) = store().await;
    store
        .create_network("tiny", "10.9.0.0/29", None, None, None)
        .await
        .unwrap();
    let want = Ipv4Addr::new(10, 9, 0, 5);
    assert_eq!(
        store
            .allocate_ip("tiny", Some(want), "a", "n")
            .await
            .unwrap(),
        want
    );
    let err = store
        .allocate_ip("tiny", Some(want), "b", "n")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AddressInUse { .. }), "{err}");
    for (ip, what) in [
        ("10.9.0.1", "gateway"),
        ("10.9.0.0", "network"),
        ("10.9.0.7", "broadcast"),
        ("10.9.1.2", "outside"),
    ] {
        let err = store
            .allocate_ip("tiny", Some(ip.parse().unwrap()), "b", "n")
            .await
            .unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
    // .2 .3 .4 .6 are left (5 usable minus the requested .5).
    let mut got = Vec::new();
    for i in 0..4 {
        got.push(
            store
                .allocate_ip("tiny", None, &format!("e{i}"), "n")
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        got,
        [[10, 9, 0, 2], [10, 9, 0, 3], [10, 9, 0, 4], [10, 9, 0, 6]].map(Ipv4Addr::from)
    );
    let err = store
        .allocate_ip("tiny", None, "full", "n")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "network \"tiny\" (10.9.0.0/29) has no free addresses left"
    );
    store
        .release_ip("tiny", Ipv4Addr::new(10, 9, 0, 3))
        .await
        .unwrap();
    assert_eq!(
        store.allocate_ip("tiny", None, "again", "n").await.unwrap(),
        Ipv4Addr::new(10, 9, 0, 3)
    );
    let err = store
        .allocate_ip("nonet", None, "x", "n")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSuchNetwork(_)), "{err}");
}

#[tokio::test]
async fn nodes_live_as_long_as_their_session() {
    let (_server, store) = store().await;
    let c = store.consul("test").unwrap();
    let s1 = c
        .session_create(
            "node-1",
            Duration::from_secs(1),
            SessionBehavior::Delete,
            Duration::ZERO,
        )
        .await
        .unwrap();
    let s2 = c
        .session_create(
            "imposter",
            Duration::from_secs(10),
            SessionBehavior::Delete,
            Duration::ZERO,
        )
        .await
        .unwrap();
    let node = NodeInfo {
        name: "node-1".into(),
        vtep: Ipv4Addr::new(192, 0, 2, 1),
        iface: "eth0".into(),
        underlay_mtu: Some(1500),
    };
    store.register_node(&s1, &node).await.unwrap();
    assert_eq!(
        store.list_nodes().await.unwrap(),
        std::slice::from_ref(&node)
    );
    let err = store.register_node(&s2, &node).await.unwrap_err();
    assert!(matches!(err, StoreError::NodeHeld(_)), "{err}");
    // Without renewals the node disappears.
    wait_for("the node to expire", DEADLINE, || async {
        store.list_nodes().await.unwrap().is_empty().then_some(())
    })
    .await;
    // Then another session can register the name.
    store.register_node(&s2, &node).await.unwrap();
    assert_eq!(store.list_nodes().await.unwrap().len(), 1);
}

#[tokio::test]
async fn bootstrap_is_idempotent() {
    let (server, store) = store().await;
    let other = Store::new(
        ConsulClient::new(&server.http_addr(), None).unwrap(),
        "overlay",
    );
    let (a, b) = tokio::join!(store.bootstrap(), other.bootstrap());
    assert!(a.unwrap() ^ b.unwrap(), "exactly one bootstrapped");
    assert!(!store.bootstrap().await.unwrap());
    let networks = store.list_networks().await.unwrap();
    assert_eq!(networks.len(), 1);
    let d = &networks[0];
    assert_eq!(d.name, "default");
    assert_eq!(d.subnet.to_string(), "10.1.0.0/16");
    assert_eq!(d.gateway, Ipv4Addr::new(10, 1, 0, 1));
    assert!(store
        .consul("test")
        .unwrap()
        .get("overlay/config/bootstrapped")
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store
            .consul("test")
            .unwrap()
            .keys("overlay/vni/")
            .await
            .unwrap()
            .len(),
        1
    );
}

/// A data directory removed on drop.
struct DataDir(std::path::PathBuf);

impl DataDir {
    fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("overlay-consul-data-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn dev_with_data(dir: &std::path::Path) -> (ConsulDev, ConsulClient) {
    let config = DevConfig {
        data_dir: Some(dir.to_path_buf()),
        ..test_config()
    };
    let server = ConsulDev::start_with("127.0.0.1:0", config)
        .await
        .expect("start dev server");
    let client = ConsulClient::new(&server.http_addr(), None).expect("client");
    (server, client)
}

#[tokio::test]
async fn a_restarted_server_with_a_data_dir_keeps_its_state() {
    let dir = DataDir::new();
    let (server, c) = dev_with_data(&dir.0).await;
    c.put("plain", b"one").await.unwrap();
    assert!(c.put_cas("created", b"two", 0).await.unwrap());
    let session = c
        .session_create(
            "s",
            Duration::from_secs(1),
            SessionBehavior::Delete,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(c.acquire("held", b"three", &session).await.unwrap());
    let before = snapshot(&c).await;
    let index_before = server.index();
    server.shutdown().await;

    let (server, c) = dev_with_data(&dir.0).await;
    assert_eq!(
        snapshot(&c).await,
        before,
        "keys, values and indexes survive"
    );
    assert!(server.index() >= index_before, "the index never goes back");
    assert!(c.session_info(&session).await.unwrap().is_some());
    // The restored session still expires without renewals (TTL clock restarted)...
    wait_for("the restored session to expire", DEADLINE, || async {
        c.get("held").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(c.session_info(&session).await.unwrap().is_none());
    // ...and a renewed one lives on.
    let kept = c
        .session_create(
            "k",
            Duration::from_secs(1),
            SessionBehavior::Delete,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(c.acquire("kept", b"4", &kept).await.unwrap());
    server.shutdown().await;
    let (_server, c) = dev_with_data(&dir.0).await;
    let renew_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < renew_until {
        assert!(
            c.session_renew(&kept).await.unwrap(),
            "session lost while renewed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(c.get("kept").await.unwrap().is_some());
}

#[tokio::test]
async fn a_corrupt_state_file_is_a_clear_error() {
    let dir = DataDir::new();
    std::fs::write(dir.0.join("state.json"), b"{ not json").unwrap();
    let config = overlay_ctl::store::devserver::DevConfig {
        data_dir: Some(dir.0.clone()),
        ..Default::default()
    };
    let error = ConsulDev::start_with("127.0.0.1:0", config)
        .await
        .err()
        .expect("a corrupt state must not start");
    let message = error.to_string();
    assert!(message.contains("state.json"), "{message}");
}

#[test]
fn the_dev_server_binary_keeps_state_across_a_kill() {
    use std::io::BufRead as _;
    let dir = DataDir::new();
    let start = || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_overlay-cli"))
            .args(["dev-server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir.0)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .expect("ready line ends with the address")
            .to_string();
        (child, addr)
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (mut first, addr) = start();
    runtime.block_on(async {
        let c = ConsulClient::new(&addr, None).unwrap();
        c.put("survivor", b"yes").await.unwrap();
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let (mut second, addr) = start();
    let value = runtime.block_on(async {
        let c = ConsulClient::new(&addr, None).unwrap();
        c.get("survivor").await.unwrap().map(|p| p.value)
    });
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(value.as_deref(), Some(&b"yes"[..]));
}
