//! `overlay-ctl status`: this node's agent (underlay, programs, maps, store, last
//! reconcile) as text or JSON.
use super::args::Global;
use crate::agent::control::AgentStatus;

/// Shows the local agent's status.
pub async fn show(cli: &Global, json: bool) -> anyhow::Result<()> {
    let (_, status) = super::require_agent(&cli.state_dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status);
    }
    Ok(())
}

fn print_status(s: &AgentStatus) {
    print_dataplane(s);
    print_mtu(s);
    print_cluster(s);
    print_reconcile(s);
    print_egress(s);
    print_store_and_services(s);
}

/// The egress table: each network's mode, what `none` networks dropped.
fn print_egress(s: &AgentStatus) {
    let e = &s.egress;
    let modes: Vec<String> = (e.networks.iter())
        .map(|(network, mode)| match e.dropped.get(network) {
            Some(d) => format!("{network} {mode} ({} packets dropped)", d.packets),
            None => format!("{network} {mode}"),
        })
        .collect();
    match (&e.error, modes.is_empty()) {
        (Some(error), _) => println!("egress:      NOT IN STEP: {error}"),
        (None, true) => println!("egress:      no networks, no table"),
        (None, false) => println!("egress:      table ip {}: {}", e.table, modes.join(", ")),
    }
}

/// The node, its underlay, programs, pins and maps.
fn print_dataplane(s: &AgentStatus) {
    println!("node:        {} (agent pid {})", s.node, s.pid);
    println!(
        "underlay:    {} (ifindex {}), VTEP {}",
        s.iface,
        s.ifindex,
        s.vtep.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
    );
    println!(
        "decap:       {} on the underlay ({}); TC via {}",
        s.decap.decap_hook, s.decap.reason, s.tc_attach
    );
    if let Some(port) = s.vxlan_port {
        println!("vxlan:       UDP port {port} (the cluster's, `overlay-ctl cluster config`)");
    }
    for change in &s.host_changes {
        println!(
            "host:        {} changed {} -> {} (put back by an --ephemeral agent's exit)",
            change.setting, change.before, change.after
        );
    }
    for (name, id) in &s.programs {
        println!("             {name}: id {id}");
    }
    println!("pins:        {}", s.pin_root);
    println!("maps:");
    for m in &s.maps {
        println!(
            "             {:<14} {:>7} / {:<7} ({:.1}%)",
            m.name,
            m.entries,
            m.capacity,
            100.0 * m.entries as f64 / f64::from(m.capacity.max(1))
        );
    }
    if let Some(r) = s
        .last_reconcile
        .as_ref()
        .filter(|r| !r.report.missing.is_empty())
    {
        let missing: Vec<String> = r
            .report
            .missing
            .iter()
            .map(|(map, n)| format!("{map} {n}"))
            .collect();
        println!(
            "             MISSING (could not be written): {}",
            missing.join(", ")
        );
    }
}

/// The underlay's MTU, and every network whose MTU it is too small for.
fn print_mtu(s: &AgentStatus) {
    if s.mtu.underlay_mtu == 0 {
        return;
    }
    println!("mtu:         underlay {}", s.mtu.underlay_mtu);
    for n in &s.mtu.too_small_for {
        println!(
            "             TOO SMALL for network {} (MTU {} + {} bytes of VXLAN, {} more than the underlay): \
             containers here get ICMP fragmentation-needed above {}",
            n.network,
            n.mtu,
            overlay_common::VXLAN_OVERHEAD,
            n.shortfall,
            n.fits
        );
    }
}

/// The store, membership and endpoint counts.
fn print_cluster(s: &AgentStatus) {
    let store = if s.consul.store.is_empty() {
        &s.consul.addr
    } else {
        &s.consul.store
    };
    println!(
        "store:       {} prefix {}: {}{}",
        store,
        s.consul.prefix,
        match (s.consul.reachable, s.consul.last_error.is_some()) {
            (false, _) => "UNREACHABLE",
            (true, true) => "reachable, REFUSING",
            (true, false) => "reachable",
        },
        s.consul
            .last_error
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    println!(
        "membership:  {} ({} members)",
        if s.consul.registered {
            "registered"
        } else {
            "not registered"
        },
        s.members
    );
    println!(
        "endpoints:   {} local, {} remote",
        s.local_endpoints, s.remote_endpoints
    );
    if s.rejected_records > 0 {
        println!(
            "store:       {} invalid record(s) ignored (see `overlay-ctl agent logs`)",
            s.rejected_records
        );
    }
}

/// The last reconcile's outcome.
fn print_reconcile(s: &AgentStatus) {
    match &s.last_reconcile {
        Some(r) => {
            let ago = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
                .saturating_sub(r.at_unix_ms);
            println!(
                "reconcile:   {} {:.1}s ago in {:.1} ms (+{} -{} entries, {} attached, {} detached){}",
                if r.ok { "ok" } else { "FAILED" },
                ago as f64 / 1000.0,
                r.duration_ms,
                r.report.upserted,
                r.report.removed,
                r.report.attached,
                r.report.detached,
                r.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
        None => println!("reconcile:   not yet"),
    }
}

/// The store's trust, and the metrics and Docker endpoints the agent serves.
fn print_store_and_services(s: &AgentStatus) {
    if !s.store_trust.is_empty() {
        println!(
            "store:       {}{}{}",
            if matches!(s.store_trust.as_str(), "missing" | "foreign") {
                s.store_trust.to_uppercase()
            } else {
                s.store_trust.clone()
            },
            s.cluster_id
                .as_ref()
                .map(|c| format!(" (cluster {c})"))
                .unwrap_or_default(),
            s.store_detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        );
    }
    if let Some(addr) = &s.metrics_addr {
        println!("metrics:     http://{addr}/metrics");
    }
    if let Some(socket) = &s.docker_plugin {
        println!("docker:      driver overlay-net on {socket}");
    }
}
