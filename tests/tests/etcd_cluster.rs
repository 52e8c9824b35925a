//! The control plane against a real, replicated store: three members of Debian's etcd
//! in the underlay namespace, real `overlay-ctl agent` processes in host namespaces
//! started with `--store etcd://a,b,c`, and the operator CLI, as the dev-server suite
//! (`tests/cluster.rs`) runs against Consul. Then etcd's own faults: the raft leader
//! killed mid-allocation, quorum lost under a ping stream, every member restarted.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_tests::{
    bins,
    cluster::{endpoint_records, start_nodes_on_store, Background, Bins, Node},
    etcd::EtcdCluster,
    harness::{require_root, unique_name, wait_until},
    net,
    topology::Underlay,
};

const BINS: Bins = bins!();
const JOIN: Duration = Duration::from_secs(20);
/// Where the members listen: an address of the underlay bridge (the dev server's is
/// .254), so every host reaches all three.
const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 253);

/// Three etcd members on the underlay, healthy.
fn start_etcd(underlay: &Underlay) -> EtcdCluster {
    underlay.add_bridge_address(ETCD_IP);
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(EtcdCluster::start_in(3, underlay.ns.ns().path(), ETCD_IP))
}

fn wait_healthy(etcd: &EtcdCluster) -> usize {
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(etcd.wait_healthy(overlay_tests::etcd::WHOLE_CLUSTER_UP))
}

fn leader(etcd: &EtcdCluster) -> Option<usize> {
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(etcd.leader())
}

/// Every key under `prefix` with its value and modify revision.
fn kv_snapshot(etcd: &EtcdCluster, prefix: &str) -> Vec<(String, Vec<u8>, i64)> {
    let prefix = prefix.to_string();
    etcd.with_client(|client| async move {
        client
            .list(&prefix)
            .await
            .expect("list etcd")
            .entries
            .into_iter()
            .map(|e| (e.key, e.value, e.mod_revision))
            .collect()
    })
}

fn in_container<R: Send>(container: &Background, f: impl FnOnce() -> R + Send) -> R {
    wait_until(
        &format!("container namespace {}", container.netns),
        Duration::from_secs(15),
        || container.open_netns().is_some(),
    );
    container.open_netns().unwrap().run(f).unwrap()
}

fn status_number(node: &Node, pointer: &str) -> Option<u64> {
    node.status()?.pointer(pointer)?.as_u64()
}

fn map_entries(node: &Node, map: &str) -> Option<u64> {
    let status = node.status()?;
    status["maps"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == map)?["entries"]
        .as_u64()
}

#[test]
fn seed_walkthrough_on_etcd() {
    require_root();
    let underlay = Underlay::new();
    let etcd = start_etcd(&underlay);
    let nodes = start_nodes_on_store(&BINS, &underlay, 3, &etcd.address(), &[]);

    // The agent reports its store; the CLI without --store follows it.
    let status = nodes[1].status().unwrap();
    assert_eq!(status["consul"]["store"], etcd.address(), "{status:#}");
    let list = nodes[1].cli_without_store(&["network", "list"]).ok().stdout;
    assert!(
        list.lines()
            .any(|l| l.starts_with("default") && l.contains("10.1.0.0/16")),
        "{list}"
    );

    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let web_name = unique_name("web");
    let web = nodes[0].spawn_run("net1", &web_name, &["sleep", "600"]);
    let web_ip = nodes[0].wait_endpoint("net1", &web_name);
    let db_name = unique_name("db");
    let db = nodes[1].spawn_run("net1", &db_name, &["sleep", "600"]);
    let db_ip = nodes[0].wait_endpoint("net1", &db_name);
    assert_eq!(web_ip, Ipv4Addr::new(10, 100, 0, 2));
    assert_eq!(db_ip, Ipv4Addr::new(10, 100, 0, 3));
    assert!(in_container(&web, || net::ping_until_reply(
        db_ip,
        Duration::from_secs(10)
    )));
    assert!(in_container(&db, || net::ping_until_reply(
        web_ip,
        Duration::from_secs(10)
    )));

    // A third host's `run` reaches them, its exit code comes through.
    let pinged = nodes[2].cli(&[
        "run",
        "-n",
        "net1",
        "--",
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        "10.100.0.2",
    ]);
    assert_eq!(pinged.code, 0, "{pinged:#?}");

    // The records are etcd's: the node keys are held by leases.
    let nodes_in_etcd = etcd.with_client(|c| async move {
        c.list("overlay/nodes/")
            .await
            .expect("list the nodes")
            .entries
    });
    assert_eq!(nodes_in_etcd.len(), 3);
    assert!(nodes_in_etcd.iter().all(|e| e.lease.is_some()));

    // --service needs Consul's catalog: refused in one line before anything is made.
    let before = kv_snapshot(&etcd, "overlay/endpoints/");
    let service = nodes[2].cli(&["run", "-n", "net1", "--service", "api", "--", "true"]);
    assert_eq!(service.code, 1, "{service:#?}");
    assert_eq!(service.stderr.lines().count(), 1, "{service:#?}");
    assert!(
        service.stderr.contains("needs a Consul store"),
        "{service:#?}"
    );
    assert_eq!(kv_snapshot(&etcd, "overlay/endpoints/"), before);

    let members = nodes[0].cli(&["cluster", "members", "--json"]).ok();
    let members: serde_json::Value = serde_json::from_str(&members.stdout).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 3);

    web.stop();
    db.stop();
    let left = nodes[0].cli(&["endpoint", "list", "--json"]).ok();
    assert_eq!(left.stdout.trim(), "[]");
}

/// Starts `per_node` containers on every node at once on network `wide`; returns them.
/// The tests that start 150 `run`s each take turns: two of them at once (with two etcd
/// clusters and six agents) on a 2-core machine run out of CPU, not out of anything the
/// store does.
static HUNDRED_AND_FIFTY_RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy_test_turn() -> std::sync::MutexGuard<'static, ()> {
    HUNDRED_AND_FIFTY_RUNS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits until network `wide` lists `count` endpoints; a `run` that ended meanwhile
/// (they all run `sleep 300`) fails the test at once with what it printed.
fn wait_for_wide_endpoints(nodes: &[Node], runs: &mut Vec<(String, Background)>, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if wide_endpoints(&nodes[0]).is_some_and(|l| l.len() == count) {
            return;
        }
        if let Some(i) = runs.iter_mut().position(|(_, run)| run.has_exited()) {
            let (name, run) = runs.swap_remove(i);
            panic!("run {name} ended: {:#?}", run.wait(Duration::from_secs(5)));
        }
        assert!(
            Instant::now() < deadline,
            "timed out after 180s waiting for {count} endpoints (have {:?})",
            wide_endpoints(&nodes[0]).map(|l| l.len())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_concurrently(nodes: &[Node], per_node: usize) -> Vec<(String, Background)> {
    std::thread::scope(|scope| {
        let workers: Vec<_> = nodes
            .iter()
            .map(|node| {
                scope.spawn(move || {
                    (0..per_node)
                        .map(|i| {
                            let name = format!("{}-{i}-{}", node.name, std::process::id());
                            let run = node.spawn_run("wide", &name, &["sleep", "300"]);
                            (name, run)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

/// The endpoints of network `wide` (name -> address), as the CLI lists them.
fn wide_endpoints(node: &Node) -> Option<BTreeMap<String, String>> {
    let out = node.cli(&["endpoint", "list", "-n", "wide", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    Some(
        list.as_array()?
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or_default().to_string(),
                    e["ip"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// No address twice among the endpoints, and the IPAM holds exactly their addresses.
fn assert_no_duplicate_nor_leak(etcd: &EtcdCluster, endpoints: &BTreeMap<String, String>) {
    let addresses: BTreeSet<&String> = endpoints.values().collect();
    assert_eq!(
        addresses.len(),
        endpoints.len(),
        "an address was handed out twice"
    );
    let allocated: BTreeSet<String> = kv_snapshot(etcd, "overlay/ipam/wide/")
        .into_iter()
        .filter_map(|(k, _, _)| k.rsplit('/').next().map(str::to_string))
        .collect();
    let held: BTreeSet<String> = addresses.into_iter().cloned().collect();
    assert_eq!(
        allocated, held,
        "the IPAM and the endpoints disagree (a lost or leaked allocation)"
    );
}

#[test]
fn three_agents_allocating_fifty_addresses_each_on_etcd_never_share_one() {
    require_root();
    let _turn = heavy_test_turn();
    let underlay = Underlay::new();
    let etcd = start_etcd(&underlay);
    let nodes = start_nodes_on_store(&BINS, &underlay, 3, &etcd.address(), &[]);
    nodes[0]
        .cli(&["network", "create", "wide", "10.60.0.0/24"])
        .ok();
    const PER_NODE: usize = 50;
    let mut runs = run_concurrently(&nodes, PER_NODE);
    wait_for_wide_endpoints(&nodes, &mut runs, 3 * PER_NODE);
    assert_no_duplicate_nor_leak(&etcd, &wide_endpoints(&nodes[0]).unwrap());
    for node in &nodes {
        wait_until("all endpoints in the maps", JOIN, || {
            map_entries(node, "ENDPOINTS") == Some((3 * PER_NODE) as u64)
                && map_entries(node, "LOCAL_IFACES") == Some(PER_NODE as u64)
        });
    }
    drop(runs);
}

#[test]
fn a_killed_node_leaves_its_peers_within_the_lease_ttl() {
    require_root();
    let underlay = Underlay::new();
    let etcd = start_etcd(&underlay);
    const TTL: Duration = Duration::from_secs(3);
    let mut nodes = start_nodes_on_store(
        &BINS,
        &underlay,
        3,
        &etcd.address(),
        &["--session-ttl", "3s"],
    );
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let name = unique_name("c");
    let _container = nodes[1].spawn_run("net1", &name, &["sleep", "600"]);
    nodes[1].wait_endpoint("net1", &name);
    for peer in [&nodes[0], &nodes[2]] {
        wait_until("peer knows the remote endpoint", JOIN, || {
            status_number(peer, "/remote_endpoints") == Some(1)
                && status_number(peer, "/members") == Some(3)
        });
    }
    let killed_at = Instant::now();
    nodes[1].kill_agent();
    // etcd expires a lease once its TTL passed without a keep-alive (checked by the
    // leader every 500 ms).
    let margin = Duration::from_secs(3);
    for peer in [&nodes[0], &nodes[2]] {
        wait_until("peer drops the dead node", TTL * 2 + margin, || {
            status_number(peer, "/members") == Some(2)
                && status_number(peer, "/remote_endpoints") == Some(0)
                && map_entries(peer, "VTEPS") == Some(2)
        });
    }
    let elapsed = killed_at.elapsed();
    eprintln!("peers dropped the killed node after {elapsed:?} (lease TTL {TTL:?})");
    assert!(
        elapsed < TTL + margin,
        "peers took {elapsed:?} to drop a node with a {TTL:?} lease"
    );
}

/// A pinger on node 0 streaming `count` pings, 20 ms apart, to a target on node 1
/// (after a warm-up); returns (target, pinger). Quiet: a line per reply would fill the
/// pipe nobody reads until the end, and block ping.
fn ping_stream(nodes: &[Node], count: u32) -> (Background, Background) {
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let target_name = unique_name("tgt");
    let target = nodes[1].spawn_run("net1", &target_name, &["sleep", "300"]);
    let target_ip = nodes[1].wait_endpoint("net1", &target_name);
    let script = format!(
        "until ping -c 1 -W 1 {target_ip} >/dev/null; do sleep 0.1; done; \
         echo warm; ping -q -i 0.02 -c {count} -W 1 {target_ip}"
    );
    let pinger = nodes[0].spawn_run("net1", &unique_name("png"), &["sh", "-c", &script]);
    nodes[0].wait_endpoint("net1", &pinger.netns["ovl-net1-".len()..]);
    (target, pinger)
}

fn assert_no_loss(pinger: Background, count: u32, timeout: Duration) {
    let out = pinger.wait(timeout);
    let statistics = out
        .stdout
        .lines()
        .filter(|l| l.contains("packets transmitted"))
        .collect::<Vec<_>>()
        .join("");
    eprintln!("ping: {statistics}");
    assert_eq!(out.code, 0, "{}\n{statistics}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("{count} packets transmitted, {count} received")),
        "packets were lost:\n{}",
        out.stdout
    );
}

#[test]
fn kill_9_and_restart_of_agents_on_etcd_loses_no_packet() {
    require_root();
    let underlay = Underlay::new();
    let etcd = start_etcd(&underlay);
    let mut nodes = start_nodes_on_store(&BINS, &underlay, 2, &etcd.address(), &[]);
    let (_target, pinger) = ping_stream(&nodes, 400);
    std::thread::sleep(Duration::from_millis(1500));
    let before: Vec<_> = nodes.iter().map(|n| n.status().unwrap()).collect();
    for node in nodes.iter_mut().rev() {
        node.kill_agent();
        node.start_agent(&[]);
        node.wait_registered(JOIN);
    }
    for (node, before) in nodes.iter().zip(&before) {
        let after = node.status().unwrap();
        assert_eq!(
            after["consul"]["session"], before["consul"]["session"],
            "the restarted agent kept its lease (peers never saw it leave)"
        );
        assert_ne!(after["pid"], before["pid"]);
    }
    assert_no_loss(pinger, 400, Duration::from_secs(60));
}

#[test]
fn bad_input_on_etcd_is_refused_with_one_line_and_no_change() {
    require_root();
    let underlay = Underlay::new();
    let etcd = start_etcd(&underlay);
    let nodes = start_nodes_on_store(&BINS, &underlay, 1, &etcd.address(), &[]);
    let node = &nodes[0];
    node.cli(&[
        "network",
        "create",
        "vetted",
        "10.100.0.0/24",
        "--vni",
        "100",
    ])
    .ok();
    let taken = unique_name("t");
    let _holder = node.spawn_run("vetted", &taken, &["sleep", "600"]);
    let taken_ip = node.wait_endpoint("vetted", &taken).to_string();
    // Settled: the agent acknowledged the newest state (the revision of every other key).
    wait_until("the store to settle", Duration::from_secs(15), || {
        let snapshot = kv_snapshot(&etcd, "overlay/");
        let newest = snapshot
            .iter()
            .filter(|(k, _, _)| !k.contains("/applied/"))
            .map(|(_, _, rev)| *rev)
            .max()
            .unwrap_or(0);
        let acknowledged = snapshot
            .iter()
            .find(|(k, _, _)| k.ends_with("applied/node1"))
            .and_then(|(_, v, _)| String::from_utf8_lossy(v).parse::<i64>().ok())
            .unwrap_or(0);
        acknowledged >= newest
    });
    let before = kv_snapshot(&etcd, "");
    let cases: &[(&[&str], &str)] = &[
        (&["network", "create", "bad", "10.0.0.1/24"], "host bits"),
        (&["network", "create", "bad", "nonsense"], "invalid subnet"),
        (
            &["network", "create", "vetted", "10.9.0.0/24"],
            "already exists",
        ),
        (
            &["network", "create", "bad", "10.9.0.0/24", "--vni", "100"],
            "already used",
        ),
        (&["network", "create", "bad", "10.100.0.0/25"], "overlaps"),
        (&["network", "delete", "vetted"], "still has 1 endpoint"),
        (&["run", "-n", "nope", "--", "true"], "does not exist"),
        (
            &["run", "-n", "vetted", "--ip", "10.101.0.5", "--", "true"],
            "outside",
        ),
        (
            &["run", "-n", "vetted", "--ip", &taken_ip, "--", "true"],
            "already allocated",
        ),
        (
            &["run", "-n", "vetted", "--name", &taken, "--", "true"],
            "already exists",
        ),
        (&["detach", "-n", "vetted", "nobody"], "no endpoint"),
    ];
    let bad_stores: &[(&[&str], &str)] = &[
        (
            &["--store", "etcd://192.0.2.253:0", "network", "list"],
            "port",
        ),
        (
            &["--store", "zookeeper://192.0.2.253", "network", "list"],
            "unknown scheme",
        ),
        (
            &["--store", "etcds://192.0.2.253:2379", "network", "list"],
            "CA",
        ),
    ];
    let outputs = cases
        .iter()
        .map(|(args, needle)| (*args, *needle, node.cli(args)))
        .chain(
            bad_stores
                .iter()
                .map(|(args, needle)| (*args, *needle, node.cli_without_store(args))),
        );
    for (args, needle, out) in outputs {
        assert_eq!(out.code, 1, "{args:?}: {out:#?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line expected: {out:#?}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: expected {needle:?} in {:?}",
            lines[0]
        );
    }
    assert_eq!(kv_snapshot(&etcd, ""), before, "etcd's keys changed");
}

#[test]
fn the_etcd_leader_killed_during_150_allocations_loses_and_leaks_none() {
    require_root();
    let _turn = heavy_test_turn();
    let underlay = Underlay::new();
    let mut etcd = start_etcd(&underlay);
    let nodes = start_nodes_on_store(&BINS, &underlay, 3, &etcd.address(), &[]);
    nodes[0]
        .cli(&["network", "create", "wide", "10.60.0.0/24"])
        .ok();
    let mut runs = run_concurrently(&nodes, 50);
    // In the middle: a third of the allocations are through.
    wait_until("50 endpoints", Duration::from_secs(120), || {
        wide_endpoints(&nodes[0]).is_some_and(|l| l.len() >= 50)
    });
    let old = leader(&etcd).expect("a leader");
    let killed_at = Instant::now();
    etcd.kill_member(old);
    let new = wait_healthy(&etcd);
    eprintln!(
        "member {old} (leader) killed; member {new} elected within {:?}",
        killed_at.elapsed()
    );
    // Every run settles: alive with its endpoint listed, or exited.
    wait_until("every run to settle", Duration::from_secs(180), || {
        let Some(listed) = wide_endpoints(&nodes[0]) else {
            return false;
        };
        runs.iter_mut()
            .all(|(name, run)| run.has_exited() || listed.contains_key(name.as_str()))
    });
    let listed = wide_endpoints(&nodes[0]).expect("the endpoints");
    let mut failed = 0;
    for (name, mut run) in std::mem::take(&mut runs) {
        if !run.has_exited() {
            assert!(
                listed.contains_key(&name),
                "{name} runs without an endpoint"
            );
            runs.push((name, run));
            continue;
        }
        assert!(
            !listed.contains_key(&name),
            "{name} exited but its endpoint stayed"
        );
        let out = run.wait(Duration::from_secs(5));
        assert_ne!(out.code, 0, "{name} exited early with success: {out:#?}");
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{name}: one clear error expected: {out:#?}"
        );
        failed += 1;
    }
    eprintln!(
        "{} of 150 runs got an address, {failed} failed with a clear error",
        runs.len()
    );
    assert_eq!(runs.len() + failed, 150);
    assert_no_duplicate_nor_leak(&etcd, &listed);
}

#[test]
fn quorum_lost_for_20_s_under_a_ping_stream_loses_no_packet() {
    require_root();
    let underlay = Underlay::new();
    let mut etcd = start_etcd(&underlay);
    let nodes = start_nodes_on_store(&BINS, &underlay, 2, &etcd.address(), &[]);
    // 1500 pings 20 ms apart (30 s, longer on a loaded machine): past the outage and
    // the recovery.
    let (_target, pinger) = ping_stream(&nodes, 1500);
    std::thread::sleep(Duration::from_millis(1500));

    let lost_at = Instant::now();
    let killed = etcd.kill_all_but(&[0]);
    let refused = nodes[0].cli(&["network", "list"]);
    eprintln!("the CLI answered in {:?} without quorum", lost_at.elapsed());
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:#?}");
    assert!(
        refused.stderr.contains("unavailable"),
        "{:?}",
        refused.stderr
    );
    for node in &nodes {
        wait_until("the agent to report the store down", JOIN, || {
            node.status()
                .is_some_and(|s| s["consul"]["reachable"] == false)
        });
    }
    // The outage lasts 20 s, whatever the checks above took.
    std::thread::sleep(Duration::from_secs(20).saturating_sub(lost_at.elapsed()));
    for i in killed {
        etcd.start_member(i);
    }
    let back_at = Instant::now();
    wait_healthy(&etcd);
    for node in &nodes {
        wait_until("the agent to catch up", Duration::from_secs(30), || {
            node.status().is_some_and(|s| {
                s["consul"]["reachable"] == true && s["consul"]["registered"] == true
            })
        });
    }
    eprintln!(
        "agents caught up {:?} after quorum returned",
        back_at.elapsed()
    );
    // And they follow changes again.
    let late = unique_name("late");
    let _late = nodes[1].spawn_run("net1", &late, &["sleep", "60"]);
    nodes[1].wait_endpoint("net1", &late);
    wait_until("node1 forwards for the new endpoint", JOIN, || {
        status_number(&nodes[0], "/remote_endpoints") == Some(2)
    });
    assert_no_loss(pinger, 1500, Duration::from_secs(240));
}

#[test]
fn every_member_restarted_causes_no_re_registration() {
    require_root();
    let underlay = Underlay::new();
    let mut etcd = start_etcd(&underlay);
    let nodes = start_nodes_on_store(&BINS, &underlay, 3, &etcd.address(), &[]);
    let sessions: Vec<_> = nodes
        .iter()
        .map(|n| n.status().unwrap()["consul"]["session"].clone())
        .collect();
    let joins = |node: &Node| node.agent_log().matches("joined the cluster").count();
    let joined_before: Vec<usize> = nodes.iter().map(joins).collect();
    let restarted_at = Instant::now();
    for i in 0..etcd.members().len() {
        etcd.kill_member(i);
    }
    for i in 0..etcd.members().len() {
        etcd.start_member(i);
    }
    wait_healthy(&etcd);
    for node in &nodes {
        wait_until("the agent to see the store again", JOIN, || {
            node.status().is_some_and(|s| {
                s["consul"]["reachable"] == true && s["consul"]["registered"] == true
            })
        });
    }
    eprintln!(
        "agents resumed {:?} after the restart",
        restarted_at.elapsed()
    );
    for ((node, session), joined) in nodes.iter().zip(&sessions).zip(&joined_before) {
        assert_eq!(
            &node.status().unwrap()["consul"]["session"],
            session,
            "{} took a new lease",
            node.name
        );
        assert_eq!(joins(node), *joined, "{} registered again", node.name);
    }
    let members = nodes[0].cli(&["cluster", "members", "--json"]).ok();
    let members: serde_json::Value = serde_json::from_str(&members.stdout).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 3);
}

/// The safety net under the feed, on etcd: every tenth resync the watch checks its copy
/// against the revisions of the keys in the store (no whole re-read while they match),
/// while it goes on applying changes. (What such a read costs: `tests/feed.rs`.)
#[test]
fn agents_on_etcd_check_their_copy_without_reading_the_whole_store_again() {
    require_root();
    let underlay = Underlay::new();
    let etcd = start_etcd(&underlay);
    // A check every 10 resyncs: every 3 s.
    let nodes = start_nodes_on_store(
        &BINS,
        &underlay,
        2,
        &etcd.address(),
        &["--resync-interval", "300ms"],
    );
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/22"])
        .ok();
    let records: Vec<(String, Vec<u8>)> = (0..400u32)
        .flat_map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 10)) + i);
            endpoint_records(&format!("sim{i:03}"), &nodes[1].name, ip)
        })
        .collect();
    etcd.with_client(|client| async move {
        for (key, value) in records {
            client.put(&key, &value).await.unwrap();
        }
    });
    wait_until("node1 to hold the 400 endpoints", JOIN, || {
        status_number(&nodes[0], "/remote_endpoints") == Some(400)
    });
    let feed = |node: &Node| node.status().unwrap()["feed"].clone();
    let number = |feed: &serde_json::Value, field: &str| feed[field].as_u64().unwrap();
    let checks_of = |feed: &serde_json::Value| number(feed, "copy_checks");
    let wait_checks = |after: &serde_json::Value, what: &str| {
        wait_until(what, Duration::from_secs(20), || {
            checks_of(&feed(&nodes[0])) >= checks_of(after) + 2
        })
    };
    let no_difference_nor_reread = |before: &serde_json::Value, after: &serde_json::Value| {
        assert_eq!(number(after, "copy_differences"), 0, "{after:#}");
        assert_eq!(
            number(after, "snapshots"),
            number(before, "snapshots"),
            "the feed read the whole store again: {before:#} -> {after:#}"
        );
    };

    // A quiet store.
    let before = feed(&nodes[0]);
    wait_checks(&before, "two checks of node1's copy");
    let after = feed(&nodes[0]);
    no_difference_nor_reread(&before, &after);

    // Endpoints come and go while the checks read the store: what the watch applies
    // meanwhile is not a difference.
    let before = after;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let churned = std::thread::scope(|scope| {
        let (stop, node, etcd) = (&stop, nodes[1].name.clone(), &etcd);
        let churn = scope.spawn(move || {
            etcd.with_client(move |client| async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ip = Ipv4Addr::new(10, 100, 3, 200);
                    let records = endpoint_records(&format!("churn{n}"), &node, ip);
                    for (key, value) in &records {
                        client.put(key, value).await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    for (key, _) in records.iter().rev() {
                        client.delete(key).await.unwrap();
                    }
                    n += 1;
                }
                n
            })
        });
        wait_checks(&before, "two checks of node1's copy during the churn");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().expect("the churn thread")
    });
    assert!(churned > 10, "only {churned} endpoints came and went");
    no_difference_nor_reread(&before, &feed(&nodes[0]));
}
