//! `overlay-ctl agent --dataplane none`: agents without a data plane of their own (the
//! scale benchmark runs a hundred of them) run the same membership, watch, reconcile and
//! acknowledgement code as a real agent, next to one.
use std::{net::Ipv4Addr, time::Duration};

use overlay_ctl::store::{backend::KvBackend as _, Store};
use overlay_tests::{
    bins,
    cluster::{endpoint_records, Bins, DevConsul, Node},
    harness::{require_root, wait_until},
    topology::Underlay,
};

const BINS: Bins = bins!();
const JOIN: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(20);

fn endpoint_map_entries(node: &Node) -> Option<u64> {
    node.status()?["endpoint_map_entries"].as_u64()
}

/// Waits until each of `nodes` holds as many endpoints as `wanted` says, and counts
/// `members` live nodes when given.
fn wait_holding(nodes: &[Node], wanted: &[u64], members: Option<u64>, when: &str) {
    let members_of = |node: &Node| node.status().and_then(|s| s["members"].as_u64());
    for (node, &wanted) in nodes.iter().zip(wanted) {
        wait_until(
            &format!("{} to hold {wanted} endpoints {when}", node.name),
            CONVERGE,
            || {
                endpoint_map_entries(node) == Some(wanted)
                    && members.is_none_or(|m| members_of(node) == Some(m))
            },
        );
    }
}

/// Asserts that between two `feed` statuses the agent neither judged the whole copy
/// nor read the whole store.
fn assert_no_full_path(before: &serde_json::Value, after: &serde_json::Value, what: &str) {
    assert_eq!(
        after["full_fallbacks"], before["full_fallbacks"],
        "{what} took the full path: {before:#} -> {after:#}"
    );
    assert_eq!(
        after["snapshots"], before["snapshots"],
        "{before:#} -> {after:#}"
    );
}

#[test]
fn agents_without_a_data_plane_and_a_real_one_see_each_others_endpoints() {
    require_root();
    let underlay = Underlay::new();
    let consul = DevConsul::start(&BINS, &underlay, None);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node::new(&BINS, &underlay, i, &consul))
        .collect();
    nodes[0].start_agent(&["--bootstrap"]);
    for node in &mut nodes[1..] {
        node.start_control_plane_agent(&[]);
    }
    for node in &nodes {
        node.wait_registered(JOIN);
    }
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();

    // A real container on the real node, and one record-only container on each of the
    // others (which have no host to run one on).
    let web = nodes[0].spawn_run("net1", "web", &["sleep", "60"]);
    nodes[0].wait_endpoint("net1", "web");
    let records: Vec<(String, Vec<u8>)> = nodes[1..]
        .iter()
        .enumerate()
        .flat_map(|(i, node)| {
            let ip = Ipv4Addr::new(10, 100, 0, 50 + i as u8);
            endpoint_records(&format!("sim{i}"), &node.name, ip)
        })
        .collect();
    consul.with_client(|c| async move {
        for (key, value) in records {
            c.put(&key, &value).await.unwrap();
        }
    });

    // The real node forwards for all three; an agent without a data plane holds the
    // endpoints of every other node (its own would need a host to live on).
    wait_holding(&nodes, &[3, 2, 2], None, "at first");
    for node in &nodes[1..] {
        let status = node.status().unwrap();
        assert_eq!(status["dataplane"], "none", "{status:#}");
        assert_eq!(status["members"], 3, "{status:#}");
        assert_eq!(status["programs"], serde_json::json!({}), "{status:#}");
        assert_eq!(status["vtep"], node.vtep.to_string(), "{status:#}");
        let feed = &status["feed"];
        assert!(feed["snapshots"].as_u64() >= Some(1), "{status:#}");
        assert!(feed["applied_index"].as_u64() > Some(0), "{status:#}");
        assert!(feed["store_bytes_read"].as_u64() > Some(0), "{status:#}");
        // Its applied index is what it acknowledged in the store.
        let applied = consul.with_client(|c| {
            let key = format!("overlay/applied/{}", node.name);
            async move { c.get(&key).await.unwrap() }
        });
        assert!(applied.is_some(), "{} never acknowledged", node.name);
    }
    let real = nodes[0].status().unwrap();
    assert_eq!(real["dataplane"], "bpf", "{real:#}");

    // Written as the CLI writes (through the store's journal), a new endpoint of node3
    // and the removal of its other one reach node2 as changes, applied on their own.
    let feed_of = |node: &Node| node.status().unwrap()["feed"].clone();
    let before = feed_of(&nodes[1]);
    let node3 = nodes[2].name.clone();
    let sim9 = endpoint_records("sim9", &node3, Ipv4Addr::new(10, 100, 0, 59));
    let sim1 = endpoint_records("sim1", &node3, Ipv4Addr::new(10, 100, 0, 51));
    consul.with_client(|c| async move {
        let store = Store::new(c, "overlay/");
        for (key, value) in sim9 {
            store.kv().put(&key, &value).await.unwrap();
        }
        for (key, _) in sim1.into_iter().rev() {
            store.kv().delete(&key).await.unwrap();
        }
    });
    // node1: web, sim0, sim9; node2: web, sim9; node3: web, sim0.
    wait_holding(&nodes, &[3, 2, 2], None, "after the changes");
    let after = feed_of(&nodes[1]);
    assert!(
        after["change_batches"].as_u64() > before["change_batches"].as_u64(),
        "{before:#} -> {after:#}"
    );
    assert_no_full_path(&before, &after, "remote endpoint changes");

    // node3 leaves (its agent killed, its key deleted) and joins again: the other agents
    // drop its endpoint (sim9) and take it back, without judging the whole store.
    let before = feed_of(&nodes[1]);
    nodes[2].kill_agent();
    let node3_key = format!("overlay/nodes/{}", nodes[2].name);
    consul.with_client(|c| async move { c.delete(&node3_key).await.unwrap() });
    wait_holding(&nodes[..2], &[2, 1], Some(2), "without node3");
    nodes[2].start_control_plane_agent(&[]);
    nodes[2].wait_registered(JOIN);
    wait_holding(&nodes[..2], &[3, 2], Some(3), "with node3 back");
    let after = feed_of(&nodes[1]);
    assert_no_full_path(&before, &after, "another node leaving and joining");
    drop(web);
}
