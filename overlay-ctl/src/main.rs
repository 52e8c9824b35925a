//! `overlay-ctl`: the overlay node agent and operator CLI.
use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use overlay_ctl::{
    agent::{self, AgentOptions},
    datapath::{XdpAttachMode, DEFAULT_PIN_ROOT},
};

/// Multi-host container overlay network: VXLAN tunnels built by eBPF/XDP programs, cluster
/// state in Consul.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent in the foreground: load the data plane and attach it to the
    /// underlay interface.
    Agent {
        /// Underlay interface (the one whose IPv4 address is this node's VTEP). Default:
        /// the interface of the IPv4 default route.
        #[arg(long)]
        iface: Option<String>,
        /// bpffs directory for pinned maps.
        #[arg(long, default_value = DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// How the XDP program attaches to the underlay.
        #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
        xdp_mode: XdpAttachMode,
        /// Remove pinned maps on exit (a development run that leaves nothing behind).
        #[arg(long)]
        ephemeral: bool,
        /// Seconds between counter reports in the log.
        #[arg(long, default_value_t = 5)]
        stats_interval: u64,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            iface,
            pin_root,
            xdp_mode,
            ephemeral,
            stats_interval,
        } => {
            let options = AgentOptions {
                iface,
                pin_root,
                xdp_mode,
                ephemeral,
                stats_interval: Duration::from_secs(stats_interval.max(1)),
            };
            agent::run(options, shutdown_signal())
                .await
                .context("agent failed")
        }
    }
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
