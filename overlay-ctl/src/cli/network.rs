//! `overlay-ctl network`: create, update, list, inspect and delete overlay networks.
use anyhow::Context as _;

use super::{
    args::{Global, NetworkCommand},
    output::{print_table, warn_rejected},
};
use crate::store::{records::RecordKind, Store};

/// Runs one `network` command against the cluster state.
pub async fn run(cli: &Global, command: &NetworkCommand) -> anyhow::Result<()> {
    let agent = super::try_agent(&cli.state_dir).await;
    let store = super::store_for(cli, agent.as_ref()).await?;
    match command {
        NetworkCommand::Create {
            name,
            cidr,
            gateway,
            vni,
            mtu,
            egress,
        } => {
            let (n, mtu_choice) = store
                .create_network_explained(name, cidr, *gateway, *vni, *mtu, *egress)
                .await?;
            println!(
                "network {} created: subnet {} gateway {} vni {} mtu {} egress {}",
                n.name, n.subnet, n.gateway, n.vni, n.mtu, n.egress
            );
            println!("mtu {}: {mtu_choice}", n.mtu);
        }
        NetworkCommand::Update { name, egress } => {
            let (n, changed) = store.update_network_egress(name, *egress).await?;
            if changed {
                println!("network {} updated: egress {}", n.name, n.egress);
            } else {
                println!(
                    "network {} unchanged: egress is already {}",
                    n.name, n.egress
                );
            }
        }
        NetworkCommand::List { json } => list(&store, *json).await?,
        NetworkCommand::Inspect { name } => inspect(&store, name).await?,
        NetworkCommand::Delete { name, force } => {
            store.delete_network(name, *force).await?;
            println!("network {name} deleted");
        }
    }
    Ok(())
}

/// `network list`: each network with its endpoint count.
async fn list(store: &Store, json: bool) -> anyhow::Result<()> {
    let snapshot = store.snapshot().await?;
    warn_rejected(store, &snapshot, |kind, _| kind == RecordKind::Network);
    let networks = &snapshot.state.networks;
    let endpoints = &snapshot.state.endpoints;
    let count = |name: &str| endpoints.iter().filter(|e| e.network == name).count();
    if json {
        let list: Vec<_> = networks
            .iter()
            .map(|n| {
                let mut v = serde_json::to_value(n).unwrap_or_default();
                v["endpoints"] = count(&n.name).into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let rows = networks
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.subnet.to_string(),
                    n.gateway.to_string(),
                    n.vni.to_string(),
                    n.mtu.to_string(),
                    n.egress.to_string(),
                    count(&n.name).to_string(),
                ]
            })
            .collect();
        print_table(
            &[
                "NAME",
                "SUBNET",
                "GATEWAY",
                "VNI",
                "MTU",
                "EGRESS",
                "ENDPOINTS",
            ],
            rows,
        );
    }
    Ok(())
}

/// `network inspect NAME`: the network, its address allocations and endpoints (JSON).
async fn inspect(store: &Store, name: &str) -> anyhow::Result<()> {
    crate::store::ipam::validate_name(name)?;
    let snapshot = store.snapshot().await?;
    let of_network = |rest: &str| rest.split('/').nth(1) == Some(name);
    warn_rejected(store, &snapshot, |kind, rest| match kind {
        RecordKind::Network => rest == format!("networks/{name}"),
        RecordKind::Endpoint | RecordKind::Ipam => of_network(rest),
        RecordKind::Node | RecordKind::Config => false,
    });
    let network = snapshot
        .state
        .networks
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("network {name:?} does not exist or its record is invalid"))?;
    let allocations: Vec<_> = snapshot
        .allocations
        .iter()
        .filter(|((net, _), _)| net == name)
        .map(|((_, ip), a)| serde_json::json!({"ip": ip, "endpoint": a.endpoint, "node": a.node}))
        .collect();
    let endpoints: Vec<_> = snapshot
        .state
        .endpoints
        .iter()
        .filter(|e| e.network == name)
        .collect();
    let out = serde_json::json!({
        "network": network,
        "allocations": allocations,
        "endpoints": endpoints,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
