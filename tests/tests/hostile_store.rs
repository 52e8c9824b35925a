//! The store is input, not truth: records written straight into Consul's KV store (as
//! anyone with write access to the prefix can) by someone who does not follow the CLI's
//! rules. Real agents and CLI processes against the dev server, as in `cluster.rs`.
//!
//! Each bad record must leave the agents up and the maps exactly as they were (read from
//! the pinned maps themselves), be counted in `overlay_store_records_rejected`, be logged
//! once, and be left out of the CLI's listings with a warning, while valid records and
//! writes keep working. The capacity cases fill the maps through the store (records
//! written directly, as the CLI would write them) and check that the CLI refuses with the
//! limit and that a full map costs only the entries that do not fit.
use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use overlay_common::capacity;
use overlay_ctl::store::consul::{ConsulClient, SessionBehavior};
use overlay_tests::{
    bins,
    cluster::{start_cluster, Background, Bins, DevConsul, Node},
    harness::{require_root, unique_name, wait_until},
    net,
    pinned::Maps,
    topology::Underlay,
};

const BINS: Bins = bins!();
const CONVERGE: Duration = Duration::from_secs(20);

fn in_container<R: Send>(container: &Background, f: impl FnOnce() -> R + Send) -> R {
    wait_until(
        &format!("container namespace {}", container.netns),
        Duration::from_secs(15),
        || container.open_netns().is_some(),
    );
    container.open_netns().unwrap().run(f).unwrap()
}

fn pings(from: &Background, to: Ipv4Addr) -> bool {
    in_container(from, || net::ping_until_reply(to, Duration::from_secs(10)))
}

/// The value of one sample (`name{labels}`) in the node's metrics, `None` if absent.
fn metric(node: &Node, sample: &str) -> Option<f64> {
    let page = node.metrics()?;
    page.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

fn rejected_sample(kind: &str, reason: &str) -> String {
    format!("overlay_store_records_rejected{{kind=\"{kind}\",reason=\"{reason}\"}}")
}

/// Writes `pairs` (64 at a time).
fn put_all(consul: &DevConsul, pairs: Vec<(String, String)>) {
    use futures_util::StreamExt as _;
    consul.with_client(|c| async move {
        futures_util::stream::iter(pairs)
            .map(|(k, v)| {
                let c = c.clone();
                async move { c.put(&k, v.as_bytes()).await }
            })
            .buffer_unordered(64)
            .for_each(|r| async move { r.expect("put") })
            .await;
    });
}

/// A session of its own (TTL 10 min) holding `key` with `value`, as a node's agent
/// holds its node key.
fn put_held(consul: &DevConsul, key: &str, value: &str) {
    let (key, value) = (key.to_string(), value.to_string());
    consul.with_client(|c: ConsulClient| async move {
        let session = c
            .session_create(
                "hostile",
                Duration::from_secs(600),
                SessionBehavior::Delete,
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert!(c.acquire(&key, value.as_bytes(), &session).await.unwrap());
    });
}

fn network_json(name: &str, subnet: &str, gateway: &str, vni: u64) -> String {
    format!(
        r#"{{"name":"{name}","subnet":"{subnet}","gateway":"{gateway}","vni":{vni},"mtu":1450}}"#
    )
}

/// An endpoint record as `run` writes it (MAC and host veth name derived the CLI's way).
fn endpoint_json(network: &str, id: &str, ip: Ipv4Addr, node: &str, vtep: Ipv4Addr) -> String {
    serde_json::json!({
        "id": id,
        "network": network,
        "ip": ip,
        "mac": overlay_ctl::dataplane::endpoint::mac_for(ip).to_string(),
        "node": node,
        "vtep": vtep,
        "ifname": overlay_ctl::runtimes::container::host_ifname(network, id),
    })
    .to_string()
}

fn allocation_json(id: &str, node: &str) -> String {
    format!(r#"{{"endpoint":"{id}","node":"{node}"}}"#)
}

fn node_json(name: &str, vtep: &str) -> String {
    format!(r#"{{"name":"{name}","vtep":"{vtep}","iface":"eth0"}}"#)
}

fn vni_of(node: &Node, network: &str) -> u32 {
    let out = node.cli(&["network", "list", "--json"]).ok();
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == network)
        .and_then(|n| n["vni"].as_u64())
        .unwrap() as u32
}

/// Lines of the agent's log that report `key` as an invalid record.
fn rejection_log_lines(node: &Node, key: &str) -> usize {
    node.agent_log()
        .lines()
        .filter(|l| {
            l.contains("ignoring an invalid store record") && l.contains(&format!("key={key} "))
        })
        .count()
}

#[test]
fn hostile_records_never_reach_the_maps_and_are_counted_logged_once_and_listed_apart() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let vni = vni_of(&nodes[0], "net1");
    let web_name = unique_name("web");
    let web = nodes[0].spawn_run("net1", &web_name, &["sleep", "300"]);
    let web_ip = nodes[0].wait_endpoint("net1", &web_name);
    let db_name = unique_name("db");
    let db = nodes[1].spawn_run("net1", &db_name, &["sleep", "300"]);
    let db_ip = nodes[0].wait_endpoint("net1", &db_name);
    for node in &nodes {
        wait_until("both endpoints in the maps", CONVERGE, || {
            Maps::read(&node.pins.path).endpoint_ips(vni) == BTreeSet::from([web_ip, db_ip])
        });
    }
    assert!(pings(&web, db_ip), "web cannot reach db before the attack");
    let before: Vec<Maps> = nodes.iter().map(|n| Maps::read(&n.pins.path)).collect();
    let pids: Vec<_> = nodes
        .iter()
        .map(|n| n.status().unwrap()["pid"].clone())
        .collect();

    // Every class of bad record, each with the (kind, reason) it must be rejected for.
    let p = "overlay/";
    let node2_vtep = nodes[1].vtep;
    let outside = Ipv4Addr::new(10, 200, 0, 5);
    let orphan_ip = Ipv4Addr::new(10, 100, 0, 77);
    let vni_big = 1u64 << 24;
    // Records naming node1 as theirs, owning their addresses, that would have node1's
    // agent attach the container program to its underlay (`eth0`) or open and delete a
    // "namespace" that is a file outside /run/netns.
    let canary = std::env::temp_dir().join(unique_name("canary"));
    std::fs::write(&canary, b"still here").unwrap();
    let evil_ip = Ipv4Addr::new(10, 100, 0, 90);
    let evilns_ip = Ipv4Addr::new(10, 100, 0, 91);
    let mut evil = serde_json::from_str::<serde_json::Value>(&endpoint_json(
        "net1",
        "evil",
        evil_ip,
        "node1",
        nodes[0].vtep,
    ))
    .unwrap();
    evil["ifname"] = "eth0".into();
    let mut evilns = serde_json::from_str::<serde_json::Value>(&endpoint_json(
        "net1",
        "evilns",
        evilns_ip,
        "node1",
        nodes[0].vtep,
    ))
    .unwrap();
    evilns["netns"] = format!("../..{}", canary.display()).into();
    let plain: Vec<(String, String)> = vec![
        (
            format!("{p}ipam/net1/{evil_ip}"),
            allocation_json("evil", "node1"),
        ),
        (format!("{p}endpoints/net1/evil"), evil.to_string()),
        (
            format!("{p}ipam/net1/{evilns_ip}"),
            allocation_json("evilns", "node1"),
        ),
        (format!("{p}endpoints/net1/evilns"), evilns.to_string()),
        // A network with net1's VNI (whose vni/N claim names net1).
        (
            format!("{p}networks/dupvni"),
            network_json("dupvni", "10.150.0.0/24", "10.150.0.1", u64::from(vni)),
        ),
        // VNIs 0 and 2^24, each even with a claim of its own.
        (
            format!("{p}networks/vnizero"),
            network_json("vnizero", "10.151.0.0/24", "10.151.0.1", 0),
        ),
        (format!("{p}vni/0"), "vnizero".into()),
        (
            format!("{p}networks/vnihuge"),
            network_json("vnihuge", "10.152.0.0/24", "10.152.0.1", vni_big),
        ),
        (format!("{p}vni/{vni_big}"), "vnihuge".into()),
        (format!("{p}networks/garbage"), "{not json".into()),
        // web's address again, from node2, without the IPAM key (which names web).
        (
            format!("{p}endpoints/net1/dupip"),
            endpoint_json("net1", "dupip", web_ip, "node2", node2_vtep),
        ),
        // An address outside net1's subnet, with an IPAM key for it.
        (
            format!("{p}endpoints/net1/outside"),
            endpoint_json("net1", "outside", outside, "node2", node2_vtep),
        ),
        (
            format!("{p}ipam/net1/{outside}"),
            allocation_json("outside", "node2"),
        ),
        (format!("{p}endpoints/net1/garbage"), "[1, 2".into()),
        // A node record no session holds, and a valid endpoint of it.
        (
            format!("{p}nodes/nosess"),
            node_json("nosess", "192.0.2.88"),
        ),
        (
            format!("{p}endpoints/net1/orphan"),
            endpoint_json(
                "net1",
                "orphan",
                orphan_ip,
                "nosess",
                Ipv4Addr::new(192, 0, 2, 88),
            ),
        ),
        (
            format!("{p}ipam/net1/{orphan_ip}"),
            allocation_json("orphan", "nosess"),
        ),
    ];
    put_all(&consul, plain);
    // Nodes held by sessions, but with VTEPs nobody can be reached at, and one garbled.
    put_held(
        &consul,
        &format!("{p}nodes/zero"),
        &node_json("zero", "0.0.0.0"),
    );
    put_held(
        &consul,
        &format!("{p}nodes/lo"),
        &node_json("lo", "127.0.0.1"),
    );
    put_held(&consul, &format!("{p}nodes/garbage"), "null");
    // A node (held by a session) claiming node1's VTEP, registered after node1.
    put_held(
        &consul,
        &format!("{p}nodes/thief"),
        &node_json("thief", &nodes[0].vtep.to_string()),
    );
    let expected: &[(&str, &str, &str, f64)] = &[
        ("networks/dupvni", "network", "vni_not_owned", 1.0),
        ("networks/vnizero", "network", "bad_vni", 2.0),
        ("networks/vnihuge", "network", "bad_vni", 2.0),
        ("networks/garbage", "network", "malformed", 1.0),
        ("endpoints/net1/dupip", "endpoint", "duplicate_address", 1.0),
        ("endpoints/net1/outside", "endpoint", "bad_address", 1.0),
        ("endpoints/net1/garbage", "endpoint", "malformed", 1.0),
        ("nodes/nosess", "node", "no_session", 1.0),
        ("nodes/zero", "node", "bad_vtep", 2.0),
        ("nodes/lo", "node", "bad_vtep", 2.0),
        ("nodes/garbage", "node", "malformed", 1.0),
        ("nodes/thief", "node", "duplicate_vtep", 1.0),
        ("endpoints/net1/evil", "endpoint", "bad_ifname", 1.0),
        ("endpoints/net1/evilns", "endpoint", "bad_netns", 1.0),
    ];
    // A valid change after the attack: a new container on node2. Once node1 forwards
    // for it, node1 has applied a state that includes every bad record above.
    let late_name = unique_name("late");
    let late = nodes[1].spawn_run("net1", &late_name, &["sleep", "300"]);
    let late_ip = nodes[0].wait_endpoint("net1", &late_name);
    for node in &nodes {
        wait_until("the late endpoint in the maps", CONVERGE, || {
            Maps::read(&node.pins.path)
                .endpoint_ips(vni)
                .contains(&late_ip)
        });
    }

    // The maps hold exactly what they held before, plus the late container.
    for (i, node) in nodes.iter().enumerate() {
        let after = Maps::read(&node.pins.path);
        let mut expected_maps = before[i].clone();
        let late_entry = after.endpoints[&(vni, late_ip)];
        expected_maps.endpoints.insert((vni, late_ip), late_entry);
        if i == 1 {
            assert!(late_entry.is_local());
            let (ifindex, iface) = after
                .local_ifaces
                .iter()
                .find(|(_, v)| overlay_common::ipv4_from_map(v.ip) == late_ip.octets())
                .expect("late's local interface");
            expected_maps.local_ifaces.insert(*ifindex, *iface);
        } else {
            assert!(!late_entry.is_local());
        }
        assert_eq!(
            after, expected_maps,
            "{}: a bad record changed the maps",
            node.name
        );
        // Spelled out: nothing of the bad records, and web is still node1's own.
        assert!(!after.networks.contains_key(&0) && !after.networks.contains_key(&(1 << 24)));
        assert!(!after.subnets.keys().any(|(ip, _)| ip.octets()[1] >= 150));
        for vtep in ["0.0.0.0", "127.0.0.1", "192.0.2.88"] {
            assert!(
                !after.vteps.contains_key(&vtep.parse().unwrap()),
                "VTEP {vtep}"
            );
        }
        let ips = after.endpoint_ips(vni);
        assert!(
            !ips.contains(&outside) && !ips.contains(&orphan_ip),
            "{ips:?}"
        );
        assert_eq!(after.endpoints[&(vni, web_ip)].is_local(), i == 0);
        assert_eq!(
            after.networks[&vni], before[i].networks[&vni],
            "net1 replaced"
        );
    }

    // Every bad record was seen and counted, by kind and reason.
    for node in &nodes {
        wait_until(
            &format!("{}'s rejection metrics", node.name),
            CONVERGE,
            || {
                expected.iter().all(|(_, kind, reason, n)| {
                    metric(node, &rejected_sample(kind, reason)) == Some(*n)
                })
            },
        );
    }

    // The canary file is untouched, and node1's underlay still has no container program
    // (the maps above would show it in LOCAL_IFACES; its membership would go too).
    assert_eq!(std::fs::read(&canary).unwrap(), b"still here");
    let _ = std::fs::remove_file(&canary);
    assert_eq!(nodes[0].status().unwrap()["consul"]["registered"], true);

    // The agents stayed up (the same processes), and traffic flows as before.
    for (node, pid) in nodes.iter().zip(&pids) {
        assert_eq!(
            &node.status().unwrap()["pid"],
            pid,
            "{} restarted",
            node.name
        );
    }
    assert!(pings(&web, db_ip), "web cannot reach db after the attack");
    assert!(pings(&db, web_ip), "db cannot reach web after the attack");
    assert!(pings(&web, late_ip), "web cannot reach the late container");

    // The CLI lists the valid records and warns about the others.
    let warned = |stderr: &str, key: &str| {
        stderr
            .lines()
            .any(|l| l.starts_with("warning: ") && l.contains(&format!("{p}{key}:")))
    };
    let list = nodes[1].cli(&["network", "list", "--json"]).ok();
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&list.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["default", "net1"]);
    for key in [
        "networks/dupvni",
        "networks/vnizero",
        "networks/vnihuge",
        "networks/garbage",
    ] {
        assert!(
            warned(&list.stderr, key),
            "network list does not warn about {key}: {}",
            list.stderr
        );
    }
    let endpoints = nodes[1].cli(&["endpoint", "list", "--json"]).ok();
    let ids: BTreeSet<String> = serde_json::from_str::<serde_json::Value>(&endpoints.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    // The orphan is a valid record (its node is away, not invalid): listed.
    let valid: BTreeSet<String> = [&web_name, &db_name, &late_name, &"orphan".to_string()]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(ids, valid);
    for key in [
        "endpoints/net1/dupip",
        "endpoints/net1/outside",
        "endpoints/net1/garbage",
        "endpoints/net1/evil",
        "endpoints/net1/evilns",
    ] {
        assert!(
            warned(&endpoints.stderr, key),
            "endpoint list does not warn about {key}: {}",
            endpoints.stderr
        );
    }
    let table = nodes[1].cli(&["endpoint", "list"]).ok();
    assert!(
        table.stdout.contains(&web_name) && !table.stdout.contains("dupip"),
        "{}",
        table.stdout
    );
    let inspect = nodes[0].cli(&["network", "inspect", "net1"]).ok();
    let inspect: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(
        inspect["endpoints"].as_array().unwrap().len(),
        4,
        "{inspect:#}"
    );
    let members = nodes[0].cli(&["cluster", "members", "--json"]).ok();
    let member_names: Vec<String> = serde_json::from_str::<serde_json::Value>(&members.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(member_names, ["node1", "node2"]);
    for key in [
        "nodes/nosess",
        "nodes/zero",
        "nodes/lo",
        "nodes/garbage",
        "nodes/thief",
    ] {
        assert!(
            warned(&members.stderr, key),
            "cluster members does not warn about {key}: {}",
            members.stderr
        );
    }
    let status = nodes[0].cli(&["status"]).ok();
    assert!(
        status.stdout.contains("14 invalid record(s) ignored"),
        "{}",
        status.stdout
    );

    // Writes are not blocked by unrelated bad records.
    let runs_before = metric(&nodes[1], "overlay_reconcile_runs_total").unwrap();
    nodes[1]
        .cli(&["network", "create", "net3", "10.103.0.0/24"])
        .ok();
    let short = nodes[1].cli(&["run", "-n", "net3", "--", "true"]);
    assert_eq!(short.code, 0, "{short:#?}");

    // Each bad record was logged once on each node, although the agents read the store
    // again since (node2's `run` alone had its agent re-read it twice).
    assert!(metric(&nodes[1], "overlay_reconcile_runs_total").unwrap() >= runs_before + 2.0);
    for node in &nodes {
        for (key, kind, reason, n) in expected {
            let key = format!("{p}{key}");
            assert_eq!(
                rejection_log_lines(node, &key),
                1,
                "{}: {key} ({kind}/{reason}) logged once:\n{}",
                node.name,
                node.agent_log()
            );
            let total =
                format!("overlay_store_rejections_total{{kind=\"{kind}\",reason=\"{reason}\"}}");
            assert_eq!(metric(node, &total), Some(*n), "{}: {total}", node.name);
        }
    }

    // An invalid network record can be deleted with the CLI, with --force.
    let refused = nodes[0].cli(&["network", "delete", "garbage"]);
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(refused.stderr.contains("--force"), "{refused:#?}");
    nodes[0]
        .cli(&["network", "delete", "garbage", "--force"])
        .ok();

    // Once the bad records are gone, nothing is rejected any more.
    consul.with_client(|c| async move {
        for key in [
            "networks/dupvni",
            "networks/vnizero",
            "networks/vnihuge",
            "endpoints/net1/dupip",
            "endpoints/net1/outside",
            "endpoints/net1/garbage",
            "endpoints/net1/evil",
            "endpoints/net1/evilns",
            "nodes/nosess",
            "nodes/zero",
            "nodes/lo",
            "nodes/garbage",
            "nodes/thief",
        ] {
            c.delete(&format!("overlay/{key}")).await.unwrap();
        }
    });
    wait_until("no rejected records", CONVERGE, || {
        nodes[0]
            .status()
            .is_some_and(|s| s["rejected_records"] == 0)
    });
    drop((web, db, late));
}

/// A remote record with a local container's address, even one that took over the
/// address's IPAM key, never displaces the local container on its node.
#[test]
fn a_remote_record_never_displaces_a_local_container() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let vni = vni_of(&nodes[0], "net1");
    let web_name = unique_name("web");
    let web = nodes[0].spawn_run("net1", &web_name, &["sleep", "300"]);
    let web_ip = nodes[0].wait_endpoint("net1", &web_name);
    wait_until("web in node1's maps", CONVERGE, || {
        Maps::read(&nodes[0].pins.path)
            .endpoints
            .get(&(vni, web_ip))
            .is_some_and(|v| v.is_local())
    });
    let before = Maps::read(&nodes[0].pins.path);
    // A live impostor node with a valid VTEP claims web's address and its IPAM key.
    put_held(
        &consul,
        "overlay/nodes/ghost",
        &node_json("ghost", "192.0.2.99"),
    );
    put_all(
        &consul,
        vec![
            (
                "overlay/endpoints/net1/impostor".into(),
                endpoint_json(
                    "net1",
                    "impostor",
                    web_ip,
                    "ghost",
                    Ipv4Addr::new(192, 0, 2, 99),
                ),
            ),
            (
                format!("overlay/ipam/net1/{web_ip}"),
                allocation_json("impostor", "ghost"),
            ),
        ],
    );
    wait_until("node1 counts the duplicate", CONVERGE, || {
        metric(&nodes[0], &rejected_sample("endpoint", "duplicate_address")) == Some(1.0)
    });
    // The ghost itself is a valid node: its VTEP is the only change.
    wait_until("the ghost's VTEP", CONVERGE, || {
        Maps::read(&nodes[0].pins.path)
            .vteps
            .contains_key(&Ipv4Addr::new(192, 0, 2, 99))
    });
    let after = Maps::read(&nodes[0].pins.path);
    assert_eq!(
        after.endpoints, before.endpoints,
        "web's entry was displaced"
    );
    assert!(after.endpoints[&(vni, web_ip)].is_local());
    assert!(in_container(&web, || net::ping_until_reply(
        Ipv4Addr::new(10, 100, 0, 1),
        Duration::from_secs(5)
    )));
    drop(web);
}

/// Networks up to the maps' capacity: `network create` refuses the next one with the
/// limit; a network written past the CLI is the only thing that does not fit, reported
/// with its errno in `status` and the metrics; traffic and other changes go on; and a
/// removal makes room in the same reconcile (removals go first).
#[test]
fn a_full_networks_map_refuses_cleanly_and_costs_only_what_does_not_fit() {
    require_root();
    let underlay = Underlay::new();
    // No periodic resync during the test: every reconcile is caused by a change.
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &["--resync-interval", "600s"]);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let vni = vni_of(&nodes[0], "net1");
    let web_name = unique_name("web");
    let web = nodes[0].spawn_run("net1", &web_name, &["sleep", "300"]);
    let web_ip = nodes[0].wait_endpoint("net1", &web_name);
    let db_name = unique_name("db");
    let db = nodes[1].spawn_run("net1", &db_name, &["sleep", "300"]);
    let db_ip = nodes[0].wait_endpoint("net1", &db_name);
    assert!(pings(&web, db_ip));

    // Fill up to the limit with networks written as `network create` writes them
    // (a /30 each in 20.0.0.0/8, VNIs from 10,000), leaving one slot... then that one.
    let limit = capacity::NETWORKS as usize;
    let existing = 2; // default and net1
    let subnet = |i: usize| Ipv4Addr::from(0x1400_0000u32 + (i as u32) * 4);
    let fill = |range: std::ops::Range<usize>| {
        let mut pairs = Vec::new();
        for i in range {
            let name = format!("bulk{i}");
            let net = subnet(i);
            let gw = Ipv4Addr::from(u32::from(net) + 1);
            let vni = 10_000 + i as u64;
            pairs.push((format!("overlay/vni/{vni}"), name.clone()));
            pairs.push((
                format!("overlay/networks/{name}"),
                network_json(&name, &format!("{net}/30"), &gw.to_string(), vni),
            ));
        }
        pairs
    };
    put_all(&consul, fill(0..limit - existing));
    for node in &nodes {
        wait_until("a full NETWORKS map", Duration::from_secs(60), || {
            Maps::read(&node.pins.path).networks.len() == limit
        });
    }
    let kv_before = consul.kv_snapshot("overlay/vni/").len();
    let refused = nodes[0].cli(&["network", "create", "one-more", "10.250.0.0/24"]);
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(
        refused.stderr.contains(&limit.to_string()) && refused.stderr.contains("NETWORKS"),
        "the refusal names the limit: {refused:#?}"
    );
    assert_eq!(
        consul.kv_snapshot("overlay/vni/").len(),
        kv_before,
        "a VNI claim was left"
    );
    // At the limit, containers still start and talk on existing networks.
    let full_name = unique_name("full");
    let full = nodes[1].spawn_run("net1", &full_name, &["sleep", "300"]);
    let full_ip = nodes[0].wait_endpoint("net1", &full_name);
    assert!(
        pings(&web, full_ip),
        "a container started at the limit is unreachable"
    );

    // One network more, past the CLI (two writers racing, or a hand-written record).
    let over = limit - existing;
    put_all(&consul, fill(over..over + 1));
    let over_vni = 10_000 + over as u32;
    for node in &nodes {
        wait_until("the overflow reported in status", CONVERGE, || {
            node.status().is_some_and(|s| {
                let r = &s["last_reconcile"];
                r["ok"] == false
                    && r["report"]["missing"]["NETWORKS"] == 1
                    && r["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("NETWORKS") && e.contains("os error"))
            })
        });
        assert_eq!(
            metric(node, "overlay_map_missing_entries{map=\"NETWORKS\"}"),
            Some(1.0)
        );
        assert!(metric(node, "overlay_map_update_failures_total").unwrap() >= 1.0);
        let maps = Maps::read(&node.pins.path);
        assert_eq!(maps.networks.len(), limit);
        assert!(!maps.networks.contains_key(&over_vni));
        assert!(maps.networks.contains_key(&vni));
    }
    // Existing traffic keeps flowing, and unrelated changes are applied.
    assert!(pings(&web, db_ip), "traffic stopped at capacity");
    assert!(pings(&db, web_ip), "traffic stopped at capacity");
    let late_name = unique_name("late");
    let late = nodes[1].spawn_run("net1", &late_name, &["sleep", "300"]);
    let late_ip = nodes[0].wait_endpoint("net1", &late_name);
    assert!(pings(&web, late_ip), "a change at capacity was not applied");
    drop(full);

    // Removing one network makes room for the overflowing one in the same reconcile.
    consul.with_client(|c| async move {
        c.delete("overlay/networks/bulk0").await.unwrap();
    });
    for node in &nodes {
        wait_until("the overflow network applied", CONVERGE, || {
            Maps::read(&node.pins.path).networks.contains_key(&over_vni)
                && node
                    .status()
                    .is_some_and(|s| s["last_reconcile"]["ok"] == true)
        });
        assert_eq!(
            metric(node, "overlay_map_missing_entries{map=\"NETWORKS\"}"),
            Some(0.0)
        );
    }
    drop((web, db, late));
}

/// Endpoints up to the ENDPOINTS map's capacity (65,536 records, written as `run`
/// writes them, of a node that is away so the maps stay small): `run` and `attach` are
/// refused with the limit, and nothing is left behind.
#[test]
fn endpoint_creation_is_refused_at_the_endpoints_map_capacity() {
    require_root();
    let underlay = Underlay::new();
    // Writing 65k records takes long on a loaded machine; the allocations written first
    // have no endpoint until the second batch lands, and the default grace (30 s) would
    // let the agent's gc collect them as left-overs meanwhile.
    let (consul, nodes) = start_cluster(&BINS, &underlay, 1, None, &["--gc-grace", "10m"]);
    let node = &nodes[0];
    // A name of its own: namespaces (/run/netns) are shared with other tests.
    let wide = unique_name("wide");
    node.cli(&["network", "create", &wide, "10.128.0.0/14"])
        .ok();
    let limit = capacity::ENDPOINTS as usize;
    let away_vtep = Ipv4Addr::new(192, 0, 2, 77);
    let (mut allocations, mut endpoints) = (Vec::new(), Vec::new());
    for i in 0..limit {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 1, 0)) + i as u32);
        let id = format!("e{i}");
        allocations.push((
            format!("overlay/ipam/{wide}/{ip}"),
            allocation_json(&id, "away"),
        ));
        endpoints.push((
            format!("overlay/endpoints/{wide}/{id}"),
            endpoint_json(&wide, &id, ip, "away", away_vtep),
        ));
    }
    // In the CLI's order: the address first, then the endpoint.
    put_all(&consul, allocations);
    put_all(&consul, endpoints);
    // Once the agent has applied the last write, it has read all of them: they are
    // valid (nothing rejected) and none is in the maps (their node is away).
    let last = consul
        .kv_snapshot(&format!("overlay/endpoints/{wide}/"))
        .iter()
        .map(|(_, _, index)| *index)
        .max()
        .unwrap();
    wait_until(
        "the agent to apply the last write",
        Duration::from_secs(180),
        || {
            consul
                .kv_snapshot("overlay/applied/node1")
                .first()
                .and_then(|(_, v, _)| String::from_utf8_lossy(v).parse::<u64>().ok())
                .is_some_and(|applied| applied >= last)
        },
    );
    assert_eq!(node.status().unwrap()["rejected_records"], 0);
    assert!(Maps::read(&node.pins.path).endpoints.is_empty());
    let before = consul.kv_snapshot("overlay/ipam/").len();
    let refused = node.cli(&["run", "-n", &wide, "--", "true"]);
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(
        refused.stderr.contains(&limit.to_string()) && refused.stderr.contains("ENDPOINTS"),
        "the refusal names the limit: {refused:#?}"
    );
    assert_eq!(
        consul.kv_snapshot("overlay/ipam/").len(),
        before,
        "an address was left allocated"
    );
    assert!(
        !std::path::Path::new("/run/netns")
            .read_dir()
            .unwrap()
            .any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("ovl-{wide}-"))),
        "run left its namespace"
    );
    // One fewer, and creation works again.
    let first = format!("overlay/endpoints/{wide}/e0");
    consul.with_client(|c| async move {
        c.delete(&first).await.unwrap();
    });
    let ok = node.cli(&["run", "-n", &wide, "--", "true"]);
    assert_eq!(ok.code, 0, "{ok:#?}");
}
