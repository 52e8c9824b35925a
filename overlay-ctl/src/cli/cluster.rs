//! `overlay-ctl cluster`: `bind` (move this node's underlay), `members`, and the
//! cluster-wide settings (`config`, `set`).
use super::{
    args::{ClusterSetting, Global},
    output::print_table,
    output::warn_rejected,
};
use crate::{
    agent::control::AgentClient,
    store::backend::KvBackend as _,
    store::{records::RecordKind, settings::DEFAULT_VXLAN_PORT, StoreError},
};

/// `cluster bind IFACE`: the local agent moves its underlay and VTEP.
pub async fn bind(cli: &Global, iface: &str) -> anyhow::Result<()> {
    let reply = AgentClient::new(&cli.state_dir).bind(iface).await?;
    println!(
        "underlay is now {} (ifindex {}), VTEP {}",
        reply.iface, reply.ifindex, reply.vtep
    );
    Ok(())
}

/// `cluster members`: the nodes with their VTEPs, underlay MTUs, endpoints and session
/// health.
pub async fn members(cli: &Global, json: bool) -> anyhow::Result<()> {
    let agent = super::try_agent(&cli.state_dir).await;
    let store = super::store_for(cli, agent.as_ref()).await?;
    let snapshot = store.snapshot().await?;
    warn_rejected(&store, &snapshot, |kind, _| kind == RecordKind::Node);
    let nodes = &snapshot.state.nodes;
    let endpoints = &snapshot.state.endpoints;
    let pairs = store.kv().list(&store.nodes_prefix()).await?;
    let session_of = |name: &str| {
        pairs
            .iter()
            .find(|p| p.key.ends_with(&format!("/{name}")))
            .and_then(|p| p.session.clone())
    };
    let endpoints_of = |name: &str| endpoints.iter().filter(|e| e.node == name).count();
    let local = agent.as_ref().map(|a| a.node.as_str());
    if json {
        let list: Vec<_> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "vtep": n.vtep,
                    "iface": n.iface,
                    "underlay_mtu": n.underlay_mtu,
                    "endpoints": endpoints_of(&n.name),
                    "session": session_of(&n.name),
                    "health": if session_of(&n.name).is_some() { "alive" } else { "unheld" },
                    "local": Some(n.name.as_str()) == local,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let rows = nodes
        .iter()
        .map(|n| {
            let marker = if Some(n.name.as_str()) == local {
                " (this node)"
            } else {
                ""
            };
            vec![
                format!("{}{marker}", n.name),
                n.vtep.to_string(),
                n.iface.clone(),
                n.underlay_mtu
                    .map_or_else(|| "-".to_string(), |mtu| mtu.to_string()),
                endpoints_of(&n.name).to_string(),
                match session_of(&n.name) {
                    Some(_) => "alive (session held)".to_string(),
                    None => "unheld".to_string(),
                },
            ]
        })
        .collect();
    print_table(
        &["NODE", "VTEP", "IFACE", "MTU", "ENDPOINTS", "HEALTH"],
        rows,
    );
    Ok(())
}

/// `cluster config`: the cluster-wide settings as stored (and whether each is the
/// default because the store names none).
pub async fn config(cli: &Global, json: bool) -> anyhow::Result<()> {
    let agent = super::try_agent(&cli.state_dir).await;
    let store = super::store_for(cli, agent.as_ref()).await?;
    let stored = match store.vxlan_port().await {
        Err(StoreError::Rejected(rejection)) => {
            eprintln!("warning: ignoring invalid record {rejection}; the agents use the default");
            None
        }
        other => other?,
    };
    let port = stored.unwrap_or(DEFAULT_VXLAN_PORT);
    if json {
        let config =
            serde_json::json!({ "vxlan_port": port, "vxlan_port_default": stored.is_none() });
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    let origin = if stored.is_some() {
        "set"
    } else {
        "default: the store names none"
    };
    println!("vxlan-port  {port} ({origin})");
    Ok(())
}

/// `cluster set SETTING VALUE`.
pub async fn set(cli: &Global, setting: &ClusterSetting) -> anyhow::Result<()> {
    let agent = super::try_agent(&cli.state_dir).await;
    let store = super::store_for(cli, agent.as_ref()).await?;
    match setting {
        ClusterSetting::VxlanPort { port } => {
            let before = store.set_vxlan_port(*port).await?;
            println!(
                "vxlan-port {before} -> {port}: every agent applies it on its next reconcile \
                 (`overlay-ctl status` shows a node's port); change Linux vxlan peers too"
            );
        }
    }
    Ok(())
}
