//! `overlay-ctl agent`: the node agent in the foreground, and `agent logs`.
use anyhow::Context as _;

use super::args::{AgentArgs, DockerPluginMode, Global, OnOff};
use crate::{
    agent::control::AgentClient,
    agent::logs::LogBuffer,
    agent::{self, AgentOptions},
    store::DEFAULT_PREFIX,
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
    let consul = super::consul_client(cli.consul.as_deref(), None)?;
    let prefix = cli
        .prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let metrics_addr = (args.metrics_addr != "off").then(|| args.metrics_addr.clone());
    let docker_plugin = match args.docker_plugin {
        DockerPluginMode::On => true,
        DockerPluginMode::Off => false,
        DockerPluginMode::Auto => args.docker_plugin_dir.is_dir(),
    }
    .then(|| crate::runtimes::docker::socket_path(&args.docker_plugin_dir));
    let options = AgentOptions {
        node,
        iface: args.iface.clone(),
        pin_root: args.pin_root.clone(),
        state_dir: cli.state_dir.clone(),
        xdp_mode: args.xdp_mode,
        decap: args.decap,
        bootstrap: args.bootstrap,
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
            enabled: args.dns == OnOff::On,
            upstreams: args.dns_upstreams.clone(),
        },
    };
    agent::run(options, consul, &prefix, logs, shutdown_signal())
        .await
        .context("agent failed")
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
