//! `overlay-ctl agent`: the node agent in the foreground, and `agent logs`.
use anyhow::Context as _;

use super::args::{AgentArgs, DockerPluginMode, Global, OnOff};
use crate::{
    agent::control::AgentClient,
    agent::logs::LogBuffer,
    agent::{self, AgentOptions},
    dataplane::forwarding::DataplaneMode,
    runtimes::docker_server::DockerDriverServer,
    store::{backend::StoreBackend, Store, DEFAULT_PREFIX},
};

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cli: &Global, args: &AgentArgs, logs: LogBuffer) -> anyhow::Result<()> {
    let node = match &args.node {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the host name; pass --node")?
            .trim()
            .to_string(),
    };
    crate::store::ipam::validate_name(&node)
        .with_context(|| format!("invalid node name {node:?}"))?;
    if let Some(port) = args.vxlan_port {
        crate::store::settings::check_vxlan_port(port.into()).context("invalid --vxlan-port")?;
    }
    let prefix = cli
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let store = Store::connect(&super::store_config(cli, None)?, &prefix).await?;
    // Consul's session limits; an etcd lease takes any TTL of a second or more.
    if matches!(store.kv(), StoreBackend::Consul(_)) {
        check_session_ttl(args.session_ttl, args.dev_store)?;
    }
    let has_host = args.dataplane == DataplaneMode::Bpf;
    if has_host && args.vtep.is_some() {
        anyhow::bail!(
            "--vtep is for --dataplane none; a node with a data plane takes its VTEP from --iface"
        );
    }
    // A hundred control-plane-only agents on one machine cannot share the default
    // metrics port: they serve metrics only where told.
    let metrics_addr = (args.metrics_addr != "off"
        && (has_host || args.metrics_addr != agent::metrics::DEFAULT_METRICS_ADDR))
        .then(|| args.metrics_addr.clone());
    let docker_plugin = match args.docker_plugin {
        DockerPluginMode::On => true,
        DockerPluginMode::Off => false,
        DockerPluginMode::Auto => args.docker_plugin_dir.is_dir(),
    }
    .then(|| crate::runtimes::docker::socket_path(&args.docker_plugin_dir))
    .filter(|_| has_host);
    let options = AgentOptions {
        node,
        iface: args.iface.clone(),
        pin_root: args.pin_root.clone(),
        state_dir: cli.state_dir.clone(),
        xdp_mode: args.xdp_mode,
        decap: args.decap,
        bootstrap: args.bootstrap,
        bootstrap_vxlan_port: args.vxlan_port,
        ephemeral: args.ephemeral,
        session_ttl: args.session_ttl,
        resync_interval: args.resync_interval,
        watch_wait: agent::DEFAULT_WATCH_WAIT,
        stats_interval: args.stats_interval,
        metrics_addr,
        kernel_log: args.kernel_log,
        gc_interval: args.gc_interval,
        gc_grace: args.gc_grace,
        docker_plugin,
        names: agent::names::NameOptions {
            enabled: args.dns == OnOff::On && has_host,
            upstreams: args.dns_upstreams.clone(),
        },
        dataplane: args.dataplane,
        vtep: args.vtep,
    };
    let companions: Vec<Box<dyn agent::Companion>> = match &options.docker_plugin {
        Some(socket) => vec![Box::new(DockerDriverServer::new(
            socket.clone(),
            options.state_dir.clone(),
        ))],
        None => Vec::new(),
    };
    agent::run(options, store, logs, companions, shutdown_signal())
        .await
        .context("agent failed")
}

/// Refuses a session TTL Consul would refuse (each session creation answered with a
/// 500, retried forever), unless `--dev-store` says the store is a dev server that
/// allows shorter ones. (On etcd the node's session is a lease, which has no such floor.)
fn check_session_ttl(ttl: std::time::Duration, dev_store: bool) -> anyhow::Result<()> {
    use crate::store::devserver::{SESSION_TTL_MAX, SESSION_TTL_MIN};
    if ttl > SESSION_TTL_MAX {
        anyhow::bail!("--session-ttl {ttl:?} is above Consul's maximum of 24h");
    }
    if ttl < SESSION_TTL_MIN && !dev_store {
        anyhow::bail!(
            "--session-ttl {ttl:?} is below Consul's minimum of 10s (session_ttl_min): a \
             Consul server refuses it; add --dev-store only if the store is \
             `overlay-ctl dev-server --session-ttl-min` at or below it"
        );
    }
    Ok(())
}

/// `agent logs`: the agent's recent log lines, then (with `follow`) new ones as they come.
pub async fn logs(cli: &Global, follow: bool, lines: usize) -> anyhow::Result<()> {
    let client = AgentClient::new(&cli.state_dir);
    client
        .logs(lines, follow, |line| println!("{line}"))
        .await?;
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::check_session_ttl;

    #[test]
    fn session_ttls_below_consuls_minimum_need_the_dev_store_flag() {
        assert!(check_session_ttl(Duration::from_secs(10), false).is_ok());
        let refused = check_session_ttl(Duration::from_secs(2), false).unwrap_err();
        assert!(refused.to_string().contains("--dev-store"), "{refused}");
        assert!(check_session_ttl(Duration::from_secs(2), true).is_ok());
        assert!(check_session_ttl(Duration::from_secs(86_401), true).is_err());
    }
}
