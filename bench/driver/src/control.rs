//! The control-plane benchmark of `cargo xtask bench`: how long three agents take to put
//! 1,000 new endpoints into their maps, and how much memory an agent holds then.
//!
//! The endpoints belong to a live remote node that has no agent (a node key held by a
//! session of the benchmark's own), so every one of the three agents must program them
//! all as remote endpoints. They are written as the CLI writes them (each address's IPAM
//! key first, untimed; then the endpoint records, timed), or the agents would reject them. Convergence is measured from the first write to the moment
//! every agent has recorded (`overlay/applied/<node>`) an index at or after the last
//! write; the maps are then checked to hold all of them.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_ctl::{
    store::backend::Record as _,
    store::consul::{ConsulClient, SessionBehavior},
    store::{Endpoint, IpAllocation, NodeInfo},
};

use overlay_tests::{
    cluster::{start_cluster, Bins, Node},
    topology::Underlay,
};

#[derive(Clone, Debug)]
pub struct ControlPlaneResult {
    pub endpoints: usize,
    pub agents: usize,
    /// First write to every agent having applied the last one.
    pub converge: Duration,
    /// How long the writes alone took (part of `converge`).
    pub writes: Duration,
    /// Resident memory of each agent after convergence, in bytes.
    pub agent_rss: Vec<u64>,
}

const GHOST_NODE: &str = "bench-ghost";
const GHOST_VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);

/// VmRSS of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs the measurement once on a fresh cluster of `agents` nodes.
pub fn measure(bins: &Bins, agents: u8, endpoints: usize) -> Result<ControlPlaneResult, String> {
    bins.check()?;
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(bins, &underlay, agents, None, &[]);
    let created = nodes[0].cli(&["network", "create", "bench", "10.128.0.0/16"]);
    if created.code != 0 {
        return Err(format!("network create failed: {}", created.stderr.trim()));
    }
    let node_names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let (writes, converge) = consul.with_client(|client| async move {
        register_ghost(&client).await?;
        let ips: Vec<Ipv4Addr> = (0..endpoints)
            .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 1, 0)) + i as u32))
            .collect();
        // The addresses, allocated as `run` allocates them (agents only accept an
        // endpoint whose address its IPAM key gives it), before the clock starts.
        put_all(
            &client,
            ips.iter().enumerate().map(|(i, ip)| ipam_record(i, *ip)),
        )
        .await?;
        // Let the agents settle on the ghost node before the clock starts.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let started = Instant::now();
        put_all(
            &client,
            ips.iter()
                .enumerate()
                .map(|(i, ip)| endpoint_record(i, *ip)),
        )
        .await?;
        let written = started.elapsed();
        wait_applied(&client, &node_names).await?;
        Ok::<_, String>((written, started.elapsed()))
    })?;
    check_maps(&nodes, endpoints)?;
    let agent_rss = nodes
        .iter()
        .filter_map(|n| n.agent_pid().and_then(rss_bytes))
        .collect();
    Ok(ControlPlaneResult {
        endpoints,
        agents: nodes.len(),
        converge,
        writes,
        agent_rss,
    })
}

/// The remote node the endpoints belong to: live (its key held by a session of ours)
/// but without an agent.
async fn register_ghost(client: &ConsulClient) -> Result<(), String> {
    let session = client
        .session_create(
            GHOST_NODE,
            Duration::from_secs(120),
            SessionBehavior::Delete,
            Duration::ZERO,
        )
        .await
        .map_err(|e| e.to_string())?;
    let ghost = NodeInfo {
        name: GHOST_NODE.into(),
        vtep: GHOST_VTEP,
        iface: "eth0".into(),
        underlay_mtu: None,
    };
    let acquired = client
        .acquire(
            &format!("overlay/nodes/{GHOST_NODE}"),
            &serde_json::to_vec(&ghost).unwrap(),
            &session,
        )
        .await
        .map_err(|e| e.to_string())?;
    if !acquired {
        return Err("cannot register the remote node".to_string());
    }
    Ok(())
}

/// The IPAM key of endpoint `i`, as `run` writes it.
fn ipam_record(i: usize, ip: Ipv4Addr) -> (String, Vec<u8>) {
    let allocation = IpAllocation {
        endpoint: format!("e{i}"),
        node: GHOST_NODE.into(),
    };
    (
        format!("overlay/ipam/bench/{ip}"),
        serde_json::to_vec(&allocation).unwrap(),
    )
}

/// The endpoint record of endpoint `i`, as `run` writes it.
fn endpoint_record(i: usize, ip: Ipv4Addr) -> (String, Vec<u8>) {
    let endpoint = Endpoint {
        id: format!("e{i}"),
        network: "bench".into(),
        ip,
        mac: overlay_ctl::dataplane::endpoint::mac_for(ip),
        node: GHOST_NODE.into(),
        ifname: overlay_ctl::runtimes::container::host_ifname("bench", &format!("e{i}")),
        container: None,
        pid: None,
        netns: None,
    };
    (
        format!("overlay/endpoints/bench/{}", endpoint.id),
        serde_json::to_vec(&endpoint).unwrap(),
    )
}

/// Writes every record, at most 32 in flight (as a busy cluster would see).
async fn put_all(
    client: &ConsulClient,
    records: impl Iterator<Item = (String, Vec<u8>)>,
) -> Result<(), String> {
    use futures_util::StreamExt as _;
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for (key, value) in records {
        let client = client.clone();
        pending.push(async move { client.put(&key, &value).await });
        if pending.len() >= 32 {
            pending.next().await.unwrap().map_err(|e| e.to_string())?;
        }
    }
    while let Some(result) = pending.next().await {
        result.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Waits until every agent has recorded (`overlay/applied/<node>`) an index at or after
/// the last endpoint write.
async fn wait_applied(client: &ConsulClient, node_names: &[String]) -> Result<(), String> {
    let last = client
        .list("overlay/endpoints/bench/")
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|p| p.modify_index)
        .max()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = client
            .list("overlay/applied/")
            .await
            .map_err(|e| e.to_string())?;
        let done = node_names.iter().all(|name| {
            applied.iter().any(|p| {
                p.key.ends_with(&format!("/{name}"))
                    && p.value_str().trim().parse::<u64>().is_ok_and(|i| i >= last)
            })
        });
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the agents did not converge within 60 s".to_string());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Each agent's ENDPOINTS map holds all of them.
fn check_maps(nodes: &[Node], endpoints: usize) -> Result<(), String> {
    for node in nodes {
        let status = node.status().ok_or("an agent stopped answering")?;
        let entries = status["maps"]
            .as_array()
            .and_then(|maps| maps.iter().find(|m| m["name"] == "ENDPOINTS"))
            .and_then(|m| m["entries"].as_u64())
            .unwrap_or(0);
        if entries != endpoints as u64 {
            return Err(format!(
                "{} reported convergence with {entries} of {endpoints} endpoints in its map",
                node.name
            ));
        }
    }
    Ok(())
}
