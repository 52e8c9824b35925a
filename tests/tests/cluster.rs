//! The control plane end to end: real `overlay-ctl agent` processes in host namespaces,
//! the Consul dev server on the underlay, and the operator CLI, as in the seed post.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_tests::{
    bins,
    cluster::{start_cluster, Background, Bins, DevConsul, Node},
    harness::{require_root, unique_name, wait_until},
    net,
    topology::Underlay,
};

const BINS: Bins = bins!();
const JOIN: Duration = Duration::from_secs(20);

/// Runs `f` inside a background container's namespace once `run` has created it.
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

/// The address a `run` reported on stderr ("... has address X ...").
fn reported_address(stderr: &str) -> Option<Ipv4Addr> {
    let rest = stderr.split("has address ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn seed_walkthrough_end_to_end() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 3, None, &[]);

    // The bootstrapped cluster has SocketPlane's default network.
    let list = nodes[1].cli(&["network", "list"]).ok();
    assert!(
        list.stdout
            .lines()
            .any(|l| l.starts_with("default") && l.contains("10.1.0.0/16")),
        "{}",
        list.stdout
    );

    let created = nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    assert!(created.stdout.contains("net1"), "{}", created.stdout);
    let listed = nodes[2].cli(&["network", "list", "--json"]).ok();
    let networks: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let names: Vec<&str> = networks
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "net1"]);
    let table = nodes[2].cli(&["network", "list"]).ok();
    assert!(table
        .stdout
        .lines()
        .any(|l| l.starts_with("net1") && l.contains("10.100.0.0/24") && l.contains("10.100.0.1")));

    // Containers on two hosts get the first addresses, in order.
    let web_name = unique_name("web");
    let web = nodes[0].spawn_run("net1", &web_name, &["sleep", "600"]);
    let web_ip = nodes[0].wait_endpoint("net1", &web_name);
    let db_name = unique_name("db");
    let db = nodes[1].spawn_run("net1", &db_name, &["sleep", "600"]);
    let db_ip = nodes[0].wait_endpoint("net1", &db_name);
    assert_eq!(web_ip, Ipv4Addr::new(10, 100, 0, 2));
    assert_eq!(db_ip, Ipv4Addr::new(10, 100, 0, 3));

    // Pings both ways across hosts, and to the gateway.
    assert!(in_container(&web, || net::ping_until_reply(
        db_ip,
        Duration::from_secs(10)
    )));
    assert!(in_container(&db, || net::ping_until_reply(
        web_ip,
        Duration::from_secs(10)
    )));
    assert!(in_container(&web, || net::ping_until_reply(
        Ipv4Addr::new(10, 100, 0, 1),
        Duration::from_secs(5)
    )));

    // A third host runs a command the way `socketplane run` did; its output and exit
    // code come through.
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
    assert!(
        pinged.stdout.contains("bytes from 10.100.0.2"),
        "{pinged:#?}"
    );
    assert_eq!(
        reported_address(&pinged.stderr),
        Some(Ipv4Addr::new(10, 100, 0, 4))
    );
    let chosen = nodes[2].cli(&["run", "-n", "net1", "--ip", "10.100.0.50", "--", "true"]);
    assert_eq!(chosen.code, 0, "{chosen:#?}");
    assert_eq!(
        reported_address(&chosen.stderr),
        Some(Ipv4Addr::new(10, 100, 0, 50))
    );
    let code = nodes[2].cli(&["run", "-n", "net1", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code.code, 7, "the command's exit code is run's: {code:#?}");

    // Another network cannot reach net1.
    nodes[0]
        .cli(&["network", "create", "net2", "10.200.0.0/24"])
        .ok();
    let isolated = nodes[2].cli(&[
        "run",
        "-n",
        "net2",
        "--",
        "ping",
        "-c",
        "2",
        "-W",
        "1",
        "10.100.0.2",
    ]);
    assert_ne!(isolated.code, 0, "net2 reached net1: {isolated:#?}");

    // --service registers the container's overlay address in the catalog for its life.
    let api_name = unique_name("api");
    let service = unique_name("svc");
    let api = nodes[2].spawn_run_with(
        "net1",
        &api_name,
        &["--service", &service],
        &["sleep", "600"],
    );
    let api_ip = nodes[2].wait_endpoint("net1", &api_name);
    let catalog = |service: String| {
        consul.with_client(|c| async move { c.catalog_service(&service).await.unwrap() })
    };
    wait_until("service in the catalog", Duration::from_secs(10), || {
        catalog(service.clone())
            .iter()
            .any(|e| e.service_address == api_ip.to_string())
    });
    // Registered through the Consul agent the node talks to (the dev server stands for
    // it): on that agent's node, whose address stays its own (not the VTEP).
    for entry in catalog(service.clone()) {
        assert_eq!(entry.node, "overlay-consul-dev", "{entry:?}");
        assert_eq!(entry.address, "127.0.0.1", "{entry:?}");
    }
    let stopped = api.stop();
    assert_eq!(stopped.code, 143, "sleep ends by SIGTERM: {stopped:#?}");
    assert!(catalog(service.clone()).is_empty(), "service left behind");

    // Members and their VTEPs.
    let members = nodes[0].cli(&["cluster", "members", "--json"]).ok();
    let members: serde_json::Value = serde_json::from_str(&members.stdout).unwrap();
    let vteps: BTreeSet<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["vtep"].as_str().unwrap())
        .collect();
    assert_eq!(
        vteps,
        BTreeSet::from(["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    );

    // A network without endpoints can be deleted; its VNI is free again.
    nodes[1].cli(&["network", "delete", "net2"]).ok();
    let listed = nodes[0].cli(&["network", "list"]).ok();
    assert!(!listed.stdout.contains("net2"), "{}", listed.stdout);
    assert!(
        !consul
            .kv_snapshot("overlay/vni/")
            .iter()
            .any(|(_, value, _)| value == b"net2"),
        "net2's VNI claim is left"
    );

    // When the containers end, everything they held is gone.
    web.stop();
    db.stop();
    let left = nodes[0].cli(&["endpoint", "list", "--json"]).ok();
    assert_eq!(left.stdout.trim(), "[]");
    let inspect = nodes[0].cli(&["network", "inspect", "net1"]).ok();
    let inspect: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(inspect["allocations"], serde_json::json!([]));
    for node in &nodes {
        wait_until("local endpoints gone from the maps", JOIN, || {
            map_entries(node, "ENDPOINTS") == Some(0)
                && map_entries(node, "LOCAL_IFACES") == Some(0)
        });
    }
    assert!(web_ns_gone(&web_name), "run left its namespace behind");
}

fn web_ns_gone(name: &str) -> bool {
    !std::path::Path::new("/run/netns")
        .join(format!("ovl-net1-{name}"))
        .exists()
}

#[test]
fn three_agents_allocating_fifty_addresses_each_at_once_never_share_one() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, nodes) = start_cluster(&BINS, &underlay, 3, None, &[]);
    nodes[0]
        .cli(&["network", "create", "wide", "10.60.0.0/24"])
        .ok();
    const PER_NODE: usize = 50;
    // All 150 containers alive at once: allocations race across the three hosts.
    let runs: Vec<(usize, String, Background)> = std::thread::scope(|scope| {
        let workers: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(n, node)| {
                scope.spawn(move || {
                    (0..PER_NODE)
                        .map(|i| {
                            // Unique per process: other test runs may share the machine.
                            let name = format!("{}-{i}-{}", node.name, std::process::id());
                            let run = node.spawn_run("wide", &name, &["sleep", "300"]);
                            (n, name, run)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let mut seen = BTreeSet::new();
    wait_until("150 endpoints", Duration::from_secs(120), || {
        let out = nodes[0].cli(&["endpoint", "list", "-n", "wide", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        list.as_array().is_some_and(|l| l.len() == 3 * PER_NODE)
    });
    let out = nodes[0]
        .cli(&["endpoint", "list", "-n", "wide", "--json"])
        .ok();
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    for endpoint in list.as_array().unwrap() {
        let ip = endpoint["ip"].as_str().unwrap().to_string();
        assert!(seen.insert(ip.clone()), "address {ip} handed out twice");
    }
    assert_eq!(seen.len(), 3 * PER_NODE);
    // Each host's data plane knows all 150 (its own locally, the others remotely).
    for node in &nodes {
        wait_until("all endpoints in the maps", JOIN, || {
            map_entries(node, "ENDPOINTS") == Some((3 * PER_NODE) as u64)
                && map_entries(node, "LOCAL_IFACES") == Some(PER_NODE as u64)
        });
    }
    drop(runs);
}

#[test]
fn kill_9_and_restart_of_agents_loses_no_packet() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, mut nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let target_name = unique_name("tgt");
    let _target = nodes[1].spawn_run("net1", &target_name, &["sleep", "600"]);
    let target_ip = nodes[1].wait_endpoint("net1", &target_name);
    // Warm up (ARP, both sides' maps), then a measured stream of 400 pings, 20 ms apart.
    let script = format!(
        "until ping -c 1 -W 1 {target_ip} >/dev/null; do sleep 0.1; done; \
         echo warm; ping -i 0.02 -c 400 -W 1 {target_ip}"
    );
    let pinger = nodes[0].spawn_run("net1", &unique_name("png"), &["sh", "-c", &script]);
    nodes[0].wait_endpoint("net1", &pinger.netns["ovl-net1-".len()..]);
    std::thread::sleep(Duration::from_millis(1500));

    let before: Vec<_> = nodes.iter().map(|n| n.status().unwrap()).collect();
    // The receiving side's agent dies, comes back and takes over; then the sender's.
    for node in nodes.iter_mut().rev() {
        node.kill_agent();
        node.start_agent(&[]);
        node.wait_registered(JOIN);
    }
    for (node, before) in nodes.iter().zip(&before) {
        let after = node.status().unwrap();
        assert_eq!(
            after["consul"]["session"], before["consul"]["session"],
            "the restarted agent kept its session (peers never saw it leave)"
        );
        assert_ne!(
            after["programs"]["overlay_underlay_tc"], before["programs"]["overlay_underlay_tc"],
            "the restarted agent's programs took over the links"
        );
        assert_ne!(after["pid"], before["pid"]);
    }
    let out = pinger.wait(Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        out.stdout.contains("400 packets transmitted, 400 received"),
        "packets were lost across the restarts:\n{}",
        out.stdout
    );
}

#[test]
fn a_killed_node_leaves_its_peers_within_the_session_ttl() {
    require_root();
    let underlay = Underlay::new();
    const TTL: Duration = Duration::from_secs(2);
    let (_consul, mut nodes) = start_cluster(
        &BINS,
        &underlay,
        3,
        None,
        &["--session-ttl", "2s", "--dev-store"],
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
    // Consul invalidates a session between TTL and twice the TTL; the dev server at TTL.
    let margin = Duration::from_secs(3);
    for peer in [&nodes[0], &nodes[2]] {
        wait_until("peer drops the dead node", TTL * 2 + margin, || {
            status_number(peer, "/members") == Some(2)
                && status_number(peer, "/remote_endpoints") == Some(0)
                && map_entries(peer, "VTEPS") == Some(2)
        });
    }
    let elapsed = killed_at.elapsed();
    assert!(
        elapsed < TTL + margin,
        "peers took {elapsed:?} to drop a node with a {TTL:?} session TTL"
    );
    let members = nodes[0].cli(&["cluster", "members"]).ok();
    assert!(!members.stdout.contains("node2"), "{}", members.stdout);
}

/// A Consul agent restart or gossip flap fails its node's `serfHealth` check; sessions
/// tied to it would die with their keys. The agents' sessions have no node checks, so
/// nothing happens: node keys stay, peers keep every VTEP.
#[test]
fn a_consul_agent_flap_leaves_the_nodes_in_the_cluster() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    for node in &nodes {
        wait_until("both members with their VTEPs", JOIN, || {
            status_number(node, "/members") == Some(2) && map_entries(node, "VTEPS") == Some(2)
        });
    }
    let before = consul.kv_snapshot("overlay/nodes/");
    assert_eq!(before.len(), 2, "{before:?}");

    let invalidated = consul.serf_flap();
    assert_eq!(invalidated, 0, "agent sessions were tied to serfHealth");
    assert_eq!(
        consul.kv_snapshot("overlay/nodes/"),
        before,
        "the flap touched the node keys"
    );
    for node in &nodes {
        assert_eq!(status_number(node, "/members"), Some(2));
        assert_eq!(map_entries(node, "VTEPS"), Some(2));
    }
}

/// The rights the README lists are enough (agent, `network create`, `run --service`);
/// a token without `key:write` gets Consul's 403, named as such in `status` and the log.
#[test]
fn acl_tokens_with_the_readme_rights_work_and_others_get_a_clear_denial() {
    require_root();
    let underlay = Underlay::new();
    let consul = DevConsul::start_with_args(
        &BINS,
        &underlay,
        None,
        &[
            "--acl-token",
            "overlay=key:write:overlay/,session:write,service:write",
            "--acl-token",
            "weak=key:read:overlay/,session:write",
        ],
    );
    let mut good = Node::new(&BINS, &underlay, 1, &consul);
    good.token = Some("overlay".to_string());
    good.start_agent(&["--bootstrap"]);
    good.wait_registered(JOIN);
    good.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let service = unique_name("svc");
    good.cli(&["run", "-n", "net1", "--service", &service, "--", "true"])
        .ok();

    let mut weak = Node::new(&BINS, &underlay, 2, &consul);
    weak.token = Some("weak".to_string());
    weak.start_agent(&[]);
    wait_until("the weak agent to report the denial", JOIN, || {
        weak.status().is_some_and(|s| {
            s["consul"]["reachable"] == true
                && s["consul"]["registered"] == false
                && s["consul"]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("ACL denied") && e.contains("key:write"))
        })
    });
    let log = weak.agent_log();
    assert!(log.contains("Consul's ACL denies the token"), "{log}");
    assert!(!log.contains("Consul unreachable"), "{log}");
}

#[test]
fn bad_input_is_refused_with_one_line_and_no_change() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 1, None, &[]);
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
    // Settled: `run` recorded its command's pid and the agent acknowledged the newest
    // state, so nothing but a bad command could change the store from here.
    wait_until("the store to settle", Duration::from_secs(15), || {
        let snapshot = consul.kv_snapshot("");
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        let newest = snapshot
            .iter()
            .filter(|(k, _, _)| !k.contains("/applied/"))
            .map(|(_, _, index)| *index)
            .max()
            .unwrap_or(0);
        let acknowledged = snapshot
            .iter()
            .find(|(k, _, _)| k.ends_with("applied/node1"))
            .and_then(|(_, v, _)| text(v).parse::<u64>().ok())
            .unwrap_or(0);
        acknowledged >= newest
    });
    let links_before = link_names(node);
    let netns_before = netns_names("ovl-vetted-");
    let before = consul.kv_snapshot("");

    let cases: &[(&[&str], &str)] = &[
        (&["network", "create", "bad", "10.0.0.1/24"], "host bits"),
        (
            &["network", "create", "bad", "10.0.0.0/33"],
            "invalid subnet",
        ),
        (&["network", "create", "bad", "nonsense"], "invalid subnet"),
        (&["network", "create", "bad", "10.0.0.0/31"], "too small"),
        (
            &["network", "create", "vetted", "10.9.0.0/24"],
            "already exists",
        ),
        (
            &["network", "create", "bad", "10.9.0.0/24", "--vni", "0"],
            "out of range",
        ),
        (
            &[
                "network",
                "create",
                "bad",
                "10.9.0.0/24",
                "--vni",
                "16777216",
            ],
            "out of range",
        ),
        (
            &["network", "create", "bad", "10.9.0.0/24", "--vni", "100"],
            "already used",
        ),
        (
            &[
                "network",
                "create",
                "bad",
                "10.9.0.0/24",
                "--gateway",
                "10.8.0.1",
            ],
            "outside",
        ),
        (
            &["network", "create", "bad name", "10.9.0.0/24"],
            "invalid network name",
        ),
        (&["network", "inspect", "nope"], "does not exist"),
        (&["network", "delete", "nope"], "does not exist"),
        (&["network", "delete", "vetted"], "still has 1 endpoint"),
        (&["run", "-n", "nope", "--", "true"], "does not exist"),
        (
            &["run", "-n", "vetted", "--ip", "10.101.0.5", "--", "true"],
            "outside",
        ),
        (
            &["run", "-n", "vetted", "--ip", "10.100.0.1", "--", "true"],
            "gateway",
        ),
        (
            &["run", "-n", "vetted", "--ip", &taken_ip, "--", "true"],
            "already allocated",
        ),
        (
            &["run", "-n", "vetted", "--name", &taken, "--", "true"],
            "already exists",
        ),
        (&["attach", "-n", "nope", "--pid", "1"], "does not exist"),
        (&["detach", "-n", "vetted", "nobody"], "no endpoint"),
    ];
    for (args, needle) in cases {
        let out = node.cli(args);
        assert_eq!(out.code, 1, "{args:?}: {out:#?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line expected: {out:#?}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: expected {needle:?} in {:?}",
            lines[0]
        );
        assert_eq!(out.stdout, "", "{args:?}");
    }
    // Usage errors are clap's: exit code 2.
    assert_eq!(node.cli(&["network", "create", "only-a-name"]).code, 2);
    assert_eq!(node.cli(&["run", "-n", "vetted"]).code, 2);

    assert_eq!(consul.kv_snapshot(""), before, "the KV store changed");
    assert_eq!(
        link_names(node),
        links_before,
        "an interface was left behind"
    );
    assert_eq!(
        netns_names("ovl-vetted-"),
        netns_before,
        "a namespace was left behind"
    );
}

fn link_names(node: &Node) -> BTreeSet<String> {
    node.ns.block_on(|| async {
        let handle = overlay_ctl::dataplane::netlink::connect().unwrap();
        overlay_ctl::dataplane::netlink::list_links(&handle)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect()
    })
}

/// The container namespaces of one network (tests run in parallel).
fn netns_names(prefix: &str) -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn attach_and_detach_an_existing_namespace() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let peer_name = unique_name("peer");
    let peer = nodes[1].spawn_run("net1", &peer_name, &["sleep", "600"]);
    let peer_ip = nodes[1].wait_endpoint("net1", &peer_name);

    // A namespace made by someone else (a Docker or podman container stands for it).
    let existing = overlay_tests::harness::TestNs::new("ext");
    let path = existing.ns().path().display().to_string();
    let attached = nodes[0]
        .cli(&["attach", "-n", "net1", "--netns", &path, "--name", "ext1"])
        .ok();
    let ext_ip: Ipv4Addr = attached
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("attach prints NAME IP NETWORK/PREFIX: {attached:#?}"));
    assert!(
        attached.stdout.starts_with("ext1 10.100.0."),
        "{attached:#?}"
    );
    assert!(existing.run(|| net::ping_until_reply(peer_ip, Duration::from_secs(10))));
    assert!(in_container(&peer, || net::ping_until_reply(
        ext_ip,
        Duration::from_secs(10)
    )));

    let detached = nodes[0]
        .cli(&["detach", "-n", "net1", "--netns", &path])
        .ok();
    assert!(detached.stdout.contains("ext1"), "{detached:#?}");
    let left = nodes[0]
        .cli(&["endpoint", "list", "-n", "net1", "--json"])
        .ok();
    assert!(!left.stdout.contains("ext1"), "{}", left.stdout);
    assert!(!existing.run(|| net::ping(peer_ip, 1, 56, Duration::from_millis(500))));
}

#[test]
fn status_and_logs_show_what_the_agent_does() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    let node = &nodes[0];
    wait_until("a first reconcile", JOIN, || {
        node.status()
            .is_some_and(|s| s["last_reconcile"]["ok"] == true && s["members"] == 2)
    });
    let status = node.status().unwrap();
    assert_eq!(status["node"], "node1");
    assert_eq!(status["iface"], "eth0");
    assert_eq!(status["vtep"], "192.0.2.1");
    assert_eq!(status["consul"]["reachable"], true);
    for program in ["overlay_underlay", "overlay_container", "overlay_xdp_pass"] {
        let id = status["programs"][program].as_u64().unwrap_or(0);
        assert!(id > 0, "{program} has no id: {status:#}");
    }
    let vteps = status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "VTEPS")
        .unwrap();
    assert_eq!(vteps["entries"], 2);
    assert_eq!(vteps["capacity"], overlay_common::capacity::VTEPS);

    let human = node.cli(&["status"]).ok();
    for needle in [
        "node1",
        "192.0.2.1",
        "VTEPS",
        "reachable",
        "registered (2 members)",
        "decap:       tc ingress",
        "net.ipv4.ip_forward changed 0 -> 1",
    ] {
        assert!(
            human.stdout.contains(needle),
            "{needle:?} in {}",
            human.stdout
        );
    }

    let logs = node.cli(&["agent", "logs"]).ok();
    assert!(
        logs.stdout.contains("joined the cluster"),
        "{}",
        logs.stdout
    );
    assert!(
        logs.stdout.contains(" INFO "),
        "levels are shown: {}",
        logs.stdout
    );

    // -f follows: a change made now shows up as it happens.
    let (mut follower, lines) = overlay_tests::cluster::follow_logs(node);
    node.cli(&["network", "create", "followed", "10.77.0.0/24"])
        .ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            let done = line.contains("data plane maps updated");
            seen.push(line);
            if done {
                break;
            }
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        seen.iter().any(|l| l.contains("data plane maps updated")),
        "agent logs -f showed no map change: {seen:#?}"
    );

    // A stopped agent is reported as such, with exit code 1.
    let mut nodes = nodes;
    nodes[1].stop_agent();
    let missing = nodes[1].cli(&["status"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("no agent is running"),
        "{missing:#?}"
    );
}

/// Whether `iface` in `node` has the underlay's decapsulation program attached, at XDP
/// or TC ingress: the agent holds each attachment as a BPF link pinned under
/// `<pin root>/links/` and named for the interface index (Debian's bpftool 7.1 cannot
/// tell a TCX link's interface).
fn has_decap(node: &Node, iface: &str) -> bool {
    let pin_root = node.status().unwrap()["pin_root"]
        .as_str()
        .unwrap()
        .to_string();
    let name = iface.to_string();
    let Some(ifindex) = node.ns.block_on(|| async move {
        let handle = overlay_ctl::dataplane::netlink::connect().unwrap();
        overlay_ctl::dataplane::netlink::link_by_name(&handle, &name)
            .await
            .ok()
            .map(|l| l.index)
    }) else {
        return false;
    };
    ["xdp", "tcu"].iter().any(|prefix| {
        let pin = std::path::Path::new(&pin_root)
            .join("links")
            .join(format!("{prefix}-{ifindex}"));
        aya::programs::links::PinnedLink::from_pin(&pin).is_ok()
    })
}

/// Two hosts set up by nothing but their agents (`overlay-ctl agent --iface eth0`, the
/// host's offloads and sysctls as they came): 1 MB of TCP each way between containers
/// on the two hosts arrives intact, and neither container drops a segment or datagram
/// for a bad checksum. The veth underlay hands over skbs with checksums still to be
/// done, which XDP decapsulation would lose (issue #11); the agent picks TC ingress.
#[test]
fn tcp_between_hosts_set_up_only_by_agents_is_intact_both_ways() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    for node in &nodes {
        let status = node.status().unwrap();
        assert_eq!(status["decap"]["decap_hook"], "tc ingress", "{status:#}");
    }
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let a = nodes[0].spawn_run("net1", &unique_name("a"), &["sleep", "600"]);
    let b = nodes[1].spawn_run("net1", &unique_name("b"), &["sleep", "600"]);
    let a_ip = nodes[0].wait_endpoint("net1", &a.netns["ovl-net1-".len()..]);
    let b_ip = nodes[1].wait_endpoint("net1", &b.netns["ovl-net1-".len()..]);
    for (from, to, to_ip, port, seed) in [(&a, &b, b_ip, 5101, 1), (&b, &a, a_ip, 5102, 2)] {
        let data = net::pattern(1024 * 1024, seed);
        let listener = in_container(to, || net::tcp_listen(to_ip, port));
        let receiver = std::thread::spawn({
            let ns = to.open_netns().unwrap();
            move || {
                ns.run(move || net::tcp_receive_all(&listener, Duration::from_secs(30)))
                    .unwrap()
            }
        });
        in_container(from, || {
            net::tcp_send_all(to_ip, port, &data, Duration::from_secs(30))
        });
        assert_eq!(
            receiver.join().unwrap(),
            (data.len(), net::digest(&data)),
            "1 MB to {to_ip} arrived with the same length and digest"
        );
    }
    for (container, ip) in [(&a, a_ip), (&b, b_ip)] {
        assert_eq!(
            in_container(container, net::checksum_errors),
            (0, 0),
            "TcpInCsumErrors/UdpInCsumErrors in the container {ip}"
        );
    }
}

#[test]
fn cluster_bind_moves_the_underlay_at_runtime() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    // A second interface on node 1, with an address of another network.
    nodes[0].ns.block_on(|| async {
        use overlay_ctl::dataplane::netlink;
        let handle = netlink::connect().unwrap();
        let (other, peer) = netlink::create_veth(&handle, "eth1", "eth1p")
            .await
            .unwrap();
        netlink::add_address(&handle, other.index, "203.0.113.1".parse().unwrap(), 24)
            .await
            .unwrap();
        netlink::set_up(&handle, peer.index).await.unwrap();
        netlink::set_up(&handle, other.index).await.unwrap();
    });
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let a = nodes[0].spawn_run("net1", &unique_name("a"), &["sleep", "600"]);
    let b = nodes[1].spawn_run("net1", &unique_name("b"), &["sleep", "600"]);
    let b_ip = nodes[0].wait_endpoint("net1", &b.netns["ovl-net1-".len()..]);
    nodes[0].wait_endpoint("net1", &a.netns["ovl-net1-".len()..]);
    assert!(in_container(&a, || net::ping_until_reply(
        b_ip,
        Duration::from_secs(10)
    )));
    assert!(has_decap(&nodes[0], "eth0") && !has_decap(&nodes[0], "eth1"));

    let moved = nodes[0].cli(&["cluster", "bind", "eth1"]).ok();
    assert!(moved.stdout.contains("203.0.113.1"), "{moved:#?}");
    assert!(has_decap(&nodes[0], "eth1") && !has_decap(&nodes[0], "eth0"));
    wait_until("node1's new VTEP at its peer", JOIN, || {
        let out = nodes[1].cli(&["cluster", "members", "--json"]);
        out.stdout.contains("203.0.113.1") && !out.stdout.contains("192.0.2.1")
    });
    let status = nodes[0].status().unwrap();
    assert_eq!(status["iface"], "eth1");
    assert_eq!(status["vtep"], "203.0.113.1");

    // And back, as the seed's fix for a wrong auto-detection: traffic flows again.
    nodes[0].cli(&["cluster", "bind", "eth0"]).ok();
    wait_until("node1's VTEP back at its peer", JOIN, || {
        let out = nodes[1].cli(&["cluster", "members", "--json"]);
        out.stdout.contains("192.0.2.1") && !out.stdout.contains("203.0.113.1")
    });
    assert!(has_decap(&nodes[0], "eth0") && !has_decap(&nodes[0], "eth1"));
    assert!(in_container(&a, || net::ping_until_reply(
        b_ip,
        Duration::from_secs(10)
    )));
    let bad = nodes[0].cli(&["cluster", "bind", "nope0"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("nope0"), "{bad:#?}");
}

#[test]
fn agents_ride_out_a_consul_restart() {
    require_root();
    let underlay = Underlay::new();
    let data_dir = std::env::temp_dir().join(unique_name("consul-data-"));
    std::fs::create_dir_all(&data_dir).unwrap();
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = RemoveDir(data_dir.clone());
    let (mut consul, nodes) = start_cluster(
        &BINS,
        &underlay,
        2,
        Some(&data_dir),
        &[
            "--session-ttl",
            "3s",
            "--dev-store",
            "--resync-interval",
            "1s",
        ],
    );
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let a = nodes[0].spawn_run("net1", &unique_name("a"), &["sleep", "600"]);
    let b = nodes[1].spawn_run("net1", &unique_name("b"), &["sleep", "600"]);
    let a_ip = nodes[0].wait_endpoint("net1", &a.netns["ovl-net1-".len()..]);
    let b_ip = nodes[0].wait_endpoint("net1", &b.netns["ovl-net1-".len()..]);
    assert!(in_container(&a, || net::ping_until_reply(
        b_ip,
        Duration::from_secs(10)
    )));

    consul.kill();
    for node in &nodes {
        wait_until("the agent notices the outage", JOIN, || {
            node.status()
                .is_some_and(|s| s["consul"]["reachable"] == false)
        });
    }
    // The data plane keeps forwarding with the last known state.
    assert!(in_container(&a, || net::ping_until_reply(
        b_ip,
        Duration::from_secs(5)
    )));
    assert!(in_container(&b, || net::ping_until_reply(
        a_ip,
        Duration::from_secs(5)
    )));

    consul.restart();
    for node in &nodes {
        wait_until("the agent is back in the cluster", JOIN, || {
            node.status().is_some_and(|s| {
                s["consul"]["reachable"] == true && s["consul"]["registered"] == true
            })
        });
    }
    // Changes made after the restart reach every data plane.
    nodes[1]
        .cli(&["network", "create", "net2", "10.200.0.0/24"])
        .ok();
    for node in &nodes {
        wait_until("net2 in the maps", JOIN, || {
            map_entries(node, "NETWORKS") == Some(3)
        });
    }
    let after = nodes[1].cli(&["run", "-n", "net2", "--", "true"]);
    assert_eq!(after.code, 0, "{after:#?}");
    assert!(in_container(&a, || net::ping_until_reply(
        b_ip,
        Duration::from_secs(5)
    )));
}

#[test]
fn a_killed_run_leaves_nothing_behind_once_its_command_ends() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 1, None, &["--resync-interval", "1s"]);
    let node = &nodes[0];
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let name = unique_name("orphan");
    /// Ends the orphaned command however the test ends (it outlives its `run`).
    struct Marker(std::path::PathBuf);
    impl Drop for Marker {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, b"");
            std::thread::sleep(Duration::from_millis(300));
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let marker = Marker(std::env::temp_dir().join(unique_name("orphan-go-")));
    // The command ends when the marker file appears.
    let script = format!("while [ ! -e {} ]; do sleep 0.1; done", marker.0.display());
    let mut run = node.spawn_run("net1", &name, &["sh", "-c", &script]);
    let ip = node.wait_endpoint("net1", &name);
    wait_until("the container's process recorded", JOIN, || {
        std::fs::read_to_string(node.state_dir.join(format!("endpoints/net1+{name}.json")))
            .is_ok_and(|record| record.contains("\"command\": {"))
    });
    run.kill_cli();
    // Its command still runs: the container keeps its address and network.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(node.wait_endpoint("net1", &name), ip);
    assert!(run.open_netns().is_some());

    std::fs::write(&marker.0, b"").unwrap();
    wait_until("the agent removes the orphaned container", JOIN, || {
        let out = node.cli(&["endpoint", "list", "-n", "net1", "--json"]);
        out.stdout.trim() == "[]"
    });
    assert!(
        consul.kv_snapshot("overlay/ipam/net1/").is_empty(),
        "address not released"
    );
    wait_until("namespace and maps cleaned", JOIN, || {
        run.open_netns().is_none()
            && map_entries(node, "ENDPOINTS") == Some(0)
            && map_entries(node, "LOCAL_IFACES") == Some(0)
    });
}

#[test]
fn kernel_logs_show_drops_only_when_enabled() {
    require_root();
    let underlay = Underlay::new();
    let consul = overlay_tests::cluster::DevConsul::start(&BINS, &underlay, None);
    let mut nodes: Vec<Node> = (1..=2)
        .map(|n| Node::new(&BINS, &underlay, n, &consul))
        .collect();
    nodes[0].start_agent(&["--bootstrap", "--kernel-log"]);
    nodes[1].start_agent(&[]);
    for node in &nodes {
        node.wait_registered(JOIN);
    }
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    nodes[0]
        .cli(&["network", "create", "net2", "10.200.0.0/24"])
        .ok();
    // Another network's subnet: dropped by the container program as cross_network.
    for node in &nodes {
        let out = node.cli(&[
            "run",
            "-n",
            "net2",
            "--",
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "10.100.0.9",
        ]);
        assert_ne!(out.code, 0, "{out:#?}");
    }
    wait_until("the drop in node1's agent logs", JOIN, || {
        let logs = nodes[0].cli(&["agent", "logs"]).stdout;
        logs.lines()
            .any(|l| l.contains("container: dropped") && l.contains("cross_network"))
    });
    let quiet = nodes[1].cli(&["agent", "logs"]).ok();
    assert!(
        !quiet.stdout.contains(": dropped "),
        "kernel logs appeared without --kernel-log:\n{}",
        quiet.stdout
    );
}

/// `run` waits only for agents that report what they applied, and not for its own node
/// (whose agent confirmed the attachment before): neither the first `run` on a fresh
/// cluster nor a `run` beside a node record that no agent stands behind (a foreign VTEP,
/// which the key layout allows) sits out the peer wait and warns.
#[test]
fn run_waits_only_for_peers_with_agents() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let behind = "have not applied";
    let first = nodes[0].cli(&["run", "-n", "net1", "--", "true"]);
    assert_eq!(first.code, 0, "{first:#?}");
    assert!(!first.stderr.contains(behind), "{first:#?}");

    consul.with_client(|c| async move {
        c.put(
            "overlay/nodes/foreign",
            br#"{"name":"foreign","vtep":"192.0.2.77","iface":"eth0"}"#,
        )
        .await
        .unwrap()
    });
    for node in &nodes {
        let out = node.cli(&["run", "-n", "net1", "--", "true"]);
        assert_eq!(out.code, 0, "{out:#?}");
        assert!(!out.stderr.contains(behind), "{}: {out:#?}", node.name);
    }
}

/// What the agent changes on the host is in `status`, and an `--ephemeral` agent puts
/// it back when it stops.
#[test]
fn an_ephemeral_agent_puts_back_the_host_settings_it_changed() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, mut nodes) = start_cluster(&BINS, &underlay, 1, None, &["--ephemeral"]);
    let forwarding = |node: &Node| {
        node.ns
            .run(|| overlay_ctl::dataplane::netns::read_net_sysctl("ipv4.ip_forward").unwrap())
    };
    assert_eq!(forwarding(&nodes[0]), "1");
    let status = nodes[0].status().unwrap();
    assert_eq!(
        status["host_changes"],
        serde_json::json!([{"setting": "net.ipv4.ip_forward", "before": "0", "after": "1"}]),
        "{status:#}"
    );
    assert!(nodes[0].stop_agent().is_some_and(|s| s.success()));
    assert_eq!(forwarding(&nodes[0]), "0", "put back on exit");
}
