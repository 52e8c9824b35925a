//! The `overlay-ctl` command line: the node agent and the operator commands. It lives
//! in the library so that the integration tests can build the very same CLI into a
//! binary of their own package (cargo only hands tests the binaries of their package).
//!
//! Thin by design: [`args`] holds the clap definitions; one module per command group
//! ([`agent`], [`status`], [`network`], [`containers`], [`cluster`]) parses what clap
//! leaves, calls the library and prints ([`output`] has the shared table and warning
//! formats). The lifecycle of containers is in [`crate::runtimes`], the cluster state's
//! rules in [`crate::store`].
use std::{path::Path, process::ExitCode};

use clap::Parser as _;
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::{
    agent::control::{AgentClient, AgentStatus},
    agent::logs::LogBuffer,
    agent::KERNEL_LOG_TARGET,
    dataplane::forwarding::DataplaneMode,
    store::config::StoreConfig,
    store::etcd::TlsFiles,
    store::{Store, DEFAULT_PREFIX},
};

pub mod agent;
pub mod args;
pub mod cluster;
pub mod containers;
pub mod network;
pub mod output;
pub mod status;

use args::{AgentAction, Cli, ClusterCommand, Command, Global};

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = LogBuffer::default();
    init_tracing(&cli.command, &logs);
    let runtime = match runtime_for(&cli.command) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, logs)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: a control-plane-only agent (`agent --dataplane none`, of which a
/// scale test runs a hundred on one machine) keeps to one worker thread.
fn runtime_for(command: &Command) -> std::io::Result<tokio::runtime::Runtime> {
    let control_plane_only = matches!(
        command,
        Command::Agent { action: None, args } if args.dataplane == DataplaneMode::None
    );
    if control_plane_only {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

/// The agent (and the dev server) log at info to stderr, the agent also into its log
/// ring (for `agent logs`); the CLI commands log warnings only, their results go to
/// stdout.
fn init_tracing(command: &Command, logs: &LogBuffer) {
    use tracing_subscriber::Layer as _;
    let is_agent = matches!(command, Command::Agent { action: None, .. });
    let kernel_log = matches!(command, Command::Agent { action: None, args } if args.kernel_log);
    let default = if is_agent || matches!(command, Command::DevServer(_)) {
        "info,netlink_packet_route=error"
    } else {
        "warn,netlink_packet_route=error"
    };
    let filter = || {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        if kernel_log {
            match format!("{KERNEL_LOG_TARGET}=debug").parse() {
                Ok(directive) => filter.add_directive(directive),
                Err(_) => filter,
            }
        } else {
            filter
        }
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_filter(filter());
    let ring = is_agent.then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(logs.clone())
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(stderr)
        .with(ring)
        .init();
}

/// Runs one command; `run` exits with its container's code, the others with success.
async fn run(cli: Cli, logs: LogBuffer) -> anyhow::Result<ExitCode> {
    let global = &cli.global;
    match cli.command {
        Command::Agent { action: None, args } => agent::run(global, &args, logs).await?,
        Command::Agent {
            action: Some(AgentAction::Logs { follow, lines }),
            ..
        } => agent::logs(global, follow, lines).await?,
        Command::Status { json } => status::show(global, json).await?,
        Command::Network(command) => network::run(global, &command).await?,
        Command::Run {
            network,
            name,
            ip,
            service,
            command,
        } => {
            let request = containers::RunArgs {
                network: &network,
                name: name.as_deref(),
                ip,
                service: service.as_deref(),
                command: &command,
            };
            return containers::run(global, request).await;
        }
        Command::Attach {
            network,
            target,
            name,
            ip,
            ifname,
        } => containers::attach(global, &network, &target, name.as_deref(), ip, &ifname).await?,
        Command::Detach {
            network,
            name,
            target,
        } => containers::detach(global, &network, name.as_deref(), &target).await?,
        Command::Endpoint(args::EndpointCommand::List { network, json }) => {
            containers::list_endpoints(global, network.as_deref(), json).await?
        }
        Command::Cluster(ClusterCommand::Bind { iface }) => cluster::bind(global, &iface).await?,
        Command::Cluster(ClusterCommand::Members { json }) => {
            cluster::members(global, json).await?
        }
        Command::Cluster(ClusterCommand::Config { json }) => cluster::config(global, json).await?,
        Command::Cluster(ClusterCommand::Set(setting)) => cluster::set(global, &setting).await?,
        Command::DevServer(args) => crate::store::devserver::run(args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The TLS files --ca, --cert and --key name.
fn tls_files(cli: &Global) -> TlsFiles {
    TlsFiles {
        ca: cli.ca.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
    }
}

/// Which store: --store, else --consul / $CONSUL_HTTP_ADDR, else the local agent's
/// store (`agent`), else Consul at the default address.
fn store_config(cli: &Global, agent: Option<&AgentStatus>) -> anyhow::Result<StoreConfig> {
    let tls = tls_files(cli);
    if cli.store.is_some() || cli.consul.is_some() {
        return Ok(StoreConfig::select(
            cli.store.as_deref(),
            cli.consul.as_deref(),
            tls,
        )?);
    }
    let Some(status) = agent else {
        return Ok(StoreConfig::select(None, None, tls)?);
    };
    StoreConfig::of_agent(&status.consul.store, &status.consul.addr, tls).map_err(|e| {
        anyhow::anyhow!(
            "cannot follow the local agent's store {}: {e}",
            status.consul.store
        )
    })
}

/// The cluster state: the store [`store_config`] picks, under --prefix, else the local
/// agent's prefix, else the default.
async fn store_for(cli: &Global, agent: Option<&AgentStatus>) -> anyhow::Result<Store> {
    let prefix = cli
        .prefix
        .clone()
        .or_else(|| agent.map(|s| s.consul.prefix.clone()))
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    Ok(Store::connect(&store_config(cli, agent)?, &prefix).await?)
}

/// The local agent's status when one runs (commands that only need Consul use it for
/// the address and prefix).
async fn try_agent(state_dir: &Path) -> Option<AgentStatus> {
    AgentClient::new(state_dir).status().await.ok()
}

/// The local agent, which the command cannot do without.
async fn require_agent(state_dir: &Path) -> anyhow::Result<(AgentClient, AgentStatus)> {
    let client = AgentClient::new(state_dir);
    let status = client.status().await?;
    Ok((client, status))
}
