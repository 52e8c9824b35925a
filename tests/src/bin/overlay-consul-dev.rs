//! `overlay-consul-dev`: a Consul-compatible development server (the API subset the
//! overlay control plane uses; state in memory, or kept in `--data-dir` across restarts),
//! for machines without Consul.
//!
//! Prints `consul dev server listening on ADDR` on stdout once it accepts connections,
//! logs to stderr (`RUST_LOG` filters), and stops on SIGTERM or SIGINT.
use std::{io::Write as _, time::Duration};

use clap::Parser;
use overlay_tests::consul_dev::{parse_go_duration, ConsulDev, DevConfig};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(version, about = "Consul-compatible in-memory development server")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8500")]
    listen: String,
    /// Smallest session TTL accepted (Consul's own default is 10s).
    #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
    session_ttl_min: Duration,
    /// Node name the server reports and registers itself as.
    #[arg(long, default_value = "overlay-consul-dev")]
    node: String,
    /// Keep the state in DIR/state.json, so a restarted server has it again (as a real
    /// Consul server). Without it the state lives in memory only, as `consul agent -dev`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).ok_or_else(|| format!("invalid duration {s:?} (e.g. 1s, 500ms)"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let config = DevConfig {
        session_ttl_min: args.session_ttl_min,
        node_name: args.node,
        data_dir: args.data_dir,
        ..DevConfig::default()
    };
    let server = ConsulDev::start_with(&args.listen, config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "consul dev server listening on {}", server.addr())?;
        out.flush()?;
    }
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }
    server.shutdown().await;
    Ok(())
}
