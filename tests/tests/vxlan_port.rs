//! The VXLAN UDP port as a cluster-wide setting, end to end: chosen at bootstrap
//! (`agent --bootstrap --vxlan-port`), stored in `overlay/config/vxlan-port`, changed
//! with `overlay-ctl cluster set vxlan-port`, applied by every agent without a reload,
//! shown by `cluster config` and `status`. (What the data plane does with the port, on
//! the wire and against a Linux vxlan device, is tested in `dataplane.rs`.)
use std::time::Duration;

use overlay_tests::{
    bins,
    cluster::{Background, Bins, DevConsul, Node},
    harness::{require_root, unique_name, wait_until},
    net,
    topology::Underlay,
};

const BINS: Bins = bins!();
const JOIN: Duration = Duration::from_secs(20);
const APPLIED: Duration = Duration::from_secs(10);
const PORT_KEY: &str = "overlay/config/vxlan-port";

/// The port a node's data plane uses now, as its `status --json` reports it.
fn applied_port(node: &Node) -> Option<u64> {
    node.status()?["vxlan_port"].as_u64()
}

/// `cluster config --json` as seen from `node`: (port, whether it is the default).
fn cluster_config(node: &Node) -> (u64, bool) {
    let out = node.cli(&["cluster", "config", "--json"]).ok();
    let config: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    (
        config["vxlan_port"].as_u64().unwrap(),
        config["vxlan_port_default"].as_bool().unwrap(),
    )
}

fn wait_applied(nodes: &[Node], port: u64) {
    for node in nodes {
        wait_until(
            &format!("{} on VXLAN port {port}", node.name),
            APPLIED,
            || applied_port(node) == Some(port),
        );
    }
}

/// Runs `f` inside a background container's namespace once `run` has created it.
fn in_container<R: Send>(container: &Background, f: impl FnOnce() -> R + Send) -> R {
    wait_until(
        &format!("container namespace {}", container.netns),
        Duration::from_secs(15),
        || container.open_netns().is_some(),
    );
    container.open_netns().unwrap().run(f).unwrap()
}

/// A dev server and two nodes started with `common` arguments; node 1 bootstraps with
/// `bootstrap_args`.
fn two_nodes(
    underlay: &Underlay,
    bootstrap_args: &[&str],
    common: &[&str],
) -> (DevConsul, Vec<Node>) {
    let consul = DevConsul::start(&BINS, underlay, None);
    let mut nodes: Vec<Node> = (1..=2)
        .map(|n| Node::new(&BINS, underlay, n, &consul))
        .collect();
    let mut first = vec!["--bootstrap"];
    first.extend_from_slice(bootstrap_args);
    first.extend_from_slice(common);
    nodes[0].start_agent(&first);
    nodes[1].start_agent(common);
    for node in &nodes {
        node.wait_registered(JOIN);
    }
    (consul, nodes)
}

/// Two containers on different nodes that ping each other both ways.
fn assert_pings_both_ways(
    a: &Background,
    a_ip: std::net::Ipv4Addr,
    b: &Background,
    b_ip: std::net::Ipv4Addr,
    when: &str,
) {
    let reply = Duration::from_secs(10);
    assert!(
        in_container(a, || net::ping_until_reply(b_ip, reply)),
        "{when}: a -> b"
    );
    assert!(
        in_container(b, || net::ping_until_reply(a_ip, reply)),
        "{when}: b -> a"
    );
}

#[test]
fn the_port_chosen_at_bootstrap_and_changed_later_is_applied_by_every_agent() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = two_nodes(&underlay, &["--vxlan-port", "8472"], &[]);
    assert_eq!(cluster_config(&nodes[1]), (8472, false));
    wait_applied(&nodes, 8472);
    let status = nodes[1].cli(&["status"]).ok();
    assert!(
        status.stdout.contains("vxlan:       UDP port 8472"),
        "{}",
        status.stdout
    );

    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let (a_name, b_name) = (unique_name("a"), unique_name("b"));
    let a = nodes[0].spawn_run("net1", &a_name, &["sleep", "600"]);
    let b = nodes[1].spawn_run("net1", &b_name, &["sleep", "600"]);
    let a_ip = nodes[1].wait_endpoint("net1", &a_name);
    let b_ip = nodes[0].wait_endpoint("net1", &b_name);
    assert_pings_both_ways(&a, a_ip, &b, b_ip, "on 8472");

    // Changed at runtime: every agent follows, traffic goes on without a reload.
    let set = nodes[1].cli(&["cluster", "set", "vxlan-port", "4789"]).ok();
    assert!(set.stdout.contains("8472 -> 4789"), "{}", set.stdout);
    assert_eq!(cluster_config(&nodes[0]), (4789, false));
    wait_applied(&nodes, 4789);
    assert_pings_both_ways(&a, a_ip, &b, b_ip, "after the change to 4789");
    let set = nodes[0].cli(&["cluster", "set", "vxlan-port", "6000"]).ok();
    assert!(set.stdout.contains("4789 -> 6000"), "{}", set.stdout);
    wait_applied(&nodes, 6000);
    assert_pings_both_ways(&a, a_ip, &b, b_ip, "after the change to 6000");

    // Bad input is refused before anything is written.
    for bad in ["53", "40000", "70000"] {
        let refused = nodes[0].cli(&["cluster", "set", "vxlan-port", bad]);
        assert_eq!(refused.code, 1, "{refused:#?}");
        assert!(refused.stderr.contains("1024-32767"), "{refused:#?}");
        assert_eq!(refused.stderr.trim().lines().count(), 1, "{refused:#?}");
    }
    let not_a_number = nodes[0].cli(&["cluster", "set", "vxlan-port", "x"]);
    assert_eq!(not_a_number.code, 2, "{not_a_number:#?}");
    assert_eq!(cluster_config(&nodes[0]), (6000, false));

    // A bad record written past the CLI is rejected by every agent alike: they fall
    // back to the default together, so they keep agreeing on the port.
    consul.with_client(|client| async move { client.put(PORT_KEY, b"53").await.unwrap() });
    wait_applied(&nodes, 4789);
    let shown = nodes[0].cli(&["cluster", "config", "--json"]).ok();
    assert!(shown.stderr.contains("bad_port"), "{shown:#?}");
    assert_eq!(cluster_config(&nodes[0]), (4789, true));
    for node in &nodes {
        wait_until("the bad record counted", APPLIED, || {
            node.status()
                .is_some_and(|s| s["rejected_records"].as_u64() >= Some(1))
        });
    }
    assert_pings_both_ways(&a, a_ip, &b, b_ip, "with an invalid port record");
}

#[test]
fn a_cluster_without_the_setting_keeps_4789_and_a_second_bootstrap_changes_nothing() {
    require_root();
    let underlay = Underlay::new();
    let (consul, mut nodes) = two_nodes(&underlay, &[], &[]);
    // A bootstrap without --vxlan-port stores the default explicitly.
    assert_eq!(cluster_config(&nodes[0]), (4789, false));
    wait_applied(&nodes, 4789);

    // A cluster from before the setting has no key: 4789, as it always had.
    consul.with_client(|client| async move { client.delete(PORT_KEY).await.unwrap() });
    assert_eq!(cluster_config(&nodes[1]), (4789, true));
    let text = nodes[1].cli(&["cluster", "config"]).ok();
    assert!(text.stdout.contains("4789 (default"), "{}", text.stdout);

    // Its first agent restarted with --bootstrap --vxlan-port does not move the
    // cluster behind the operator's back: it says so and keeps 4789.
    nodes[0].stop_agent();
    nodes[0].start_agent(&["--bootstrap", "--vxlan-port", "8472"]);
    nodes[0].wait_registered(JOIN);
    wait_until("the ignored --vxlan-port logged", APPLIED, || {
        nodes[0].agent_log().contains("--vxlan-port is ignored")
    });
    assert_eq!(cluster_config(&nodes[1]), (4789, true));
    wait_applied(&nodes, 4789);

    // --vxlan-port without --bootstrap is a usage error; a bad port is refused.
    let usage = nodes[1].cli(&["agent", "--vxlan-port", "8472"]);
    assert_eq!(usage.code, 2, "{usage:#?}");
    let bad = nodes[1].cli(&["agent", "--bootstrap", "--vxlan-port", "80", "--node", "x"]);
    assert_eq!(bad.code, 1, "{bad:#?}");
    assert!(bad.stderr.contains("1024-32767"), "{bad:#?}");
}

/// A store that lost its data gets the cluster's port back from the agents, and no
/// agent falls back to the default port meanwhile (which would cut the cluster off its
/// Linux vxlan peers).
#[test]
fn a_store_that_lost_its_data_gets_the_port_back_and_no_node_changes_port() {
    require_root();
    let underlay = Underlay::new();
    // A short resync, so that the store's loss is seen within seconds.
    let (mut consul, nodes) = two_nodes(
        &underlay,
        &["--vxlan-port", "8472"],
        &[
            "--session-ttl",
            "3s",
            "--dev-store",
            "--resync-interval",
            "1s",
        ],
    );
    wait_applied(&nodes, 8472);
    for node in &nodes {
        wait_until("the cluster id known", JOIN, || {
            node.status().is_some_and(|s| s["store_trust"] == "trusted")
        });
    }
    let log_offsets: Vec<usize> = nodes.iter().map(|n| n.agent_log().len()).collect();
    // The dev server comes back without its data (no data dir).
    consul.restart();
    wait_until("the port republished", JOIN, || {
        consul
            .kv_snapshot(PORT_KEY)
            .iter()
            .any(|(_, value, _)| value == b"8472")
    });
    for node in &nodes {
        wait_until("registered again", JOIN, || {
            node.status()
                .is_some_and(|s| s["consul"]["registered"] == true)
        });
    }
    for (node, offset) in nodes.iter().zip(log_offsets) {
        assert_eq!(applied_port(node), Some(8472), "{}", node.name);
        // The node that restored the port noticed first; the other within a resync.
        wait_until(
            &format!("{} to notice the store's loss", node.name),
            JOIN,
            || {
                let log = node.agent_log();
                log[offset..].contains("THE STORE HAS LOST THE CLUSTER'S DATA")
                    || log[offset..].contains("the store was restored")
            },
        );
        let log = node.agent_log();
        assert!(
            !log[offset..].contains("VXLAN port changed"),
            "{} changed its port while the store was empty:\n{}",
            node.name,
            &log[offset..]
        );
    }
}
