//! The `overlay-ctl` command line: the node agent and the operator commands. It lives
//! in the library so that the integration tests can build the very same CLI into a
//! binary of their own package (cargo only hands tests the binaries of their package).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use crate::{
    agent::control::{AgentClient, AgentStatus, DEFAULT_STATE_DIR},
    agent::local_state::{self, LocalEndpoint, LocalState},
    agent::logs::LogBuffer,
    agent::{self, AgentOptions},
    dataplane::datapath::{XdpAttachMode, DEFAULT_PIN_ROOT},
    dataplane::netns::NetNs,
    dataplane::underlay::DecapMode,
    runtimes::container::{self, Context, JoinSpec},
    store::consul::ConsulClient,
    store::records::RecordKind,
    store::{Store, DEFAULT_PREFIX},
};
use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};

const AFTER_HELP: &str = "\
Getting started (as the SocketPlane walkthrough did):
  overlay-ctl agent --bootstrap --iface eth0      # first node; creates network \"default\"
  overlay-ctl agent --iface eth0                  # every other node
  overlay-ctl network create net1 10.100.0.0/24
  overlay-ctl run -n net1 -- ping 10.100.0.3      # a container on net1

Consul: --consul ADDR, else $CONSUL_HTTP_ADDR, else the local agent's, else 127.0.0.1:8500.
$CONSUL_HTTP_TOKEN is sent as the ACL token.

Exit codes: 0 success; 1 the operation failed or was refused (one-line reason on
stderr, nothing changed); 2 bad usage. `run` exits with its command's code.";

/// Multi-host container overlay network: VXLAN tunnels built by eBPF/XDP programs, cluster
/// state (membership, networks, addresses) in Consul.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = AFTER_HELP)]
struct Cli {
    /// Consul HTTP address (host:port or http://host:port).
    #[arg(long, global = true, env = "CONSUL_HTTP_ADDR")]
    consul: Option<String>,
    /// Key prefix of the cluster state in Consul's KV store [default: overlay/, or the
    /// local agent's].
    #[arg(long, global = true, env = "OVERLAY_PREFIX")]
    prefix: Option<String>,
    /// The agent's state directory (its control socket and session).
    #[arg(long, global = true, env = "OVERLAY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent in the foreground (or read its logs: `agent logs -f`).
    #[command(args_conflicts_with_subcommands = true)]
    Agent {
        #[command(subcommand)]
        action: Option<AgentAction>,
        #[command(flatten)]
        args: AgentArgs,
    },
    /// This node's agent: underlay, programs, maps, Consul, last reconcile.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create, list, inspect and delete overlay networks.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Run a command in a new container on a network; everything is removed when it exits.
    ///
    /// The container is a network namespace with interface eth0 (an address from the
    /// network, its MTU, a default route via the gateway). stdin, stdout and stderr are
    /// passed through, so `overlay-ctl run -n net1 -- sh` is interactive.
    Run {
        /// Network to join.
        #[arg(short = 'n', long)]
        network: String,
        /// Endpoint name (unique on the network) [default: random].
        #[arg(long)]
        name: Option<String>,
        /// Ask for this address (must be free, inside the subnet, not the gateway).
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Register the container's address as this service in Consul's catalog.
        #[arg(long)]
        service: Option<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Join an existing container (a network namespace) to a network; it gets interface
    /// ovl0 and stays attached until `detach`.
    Attach {
        #[arg(short = 'n', long)]
        network: String,
        #[command(flatten)]
        target: NetnsTarget,
        /// Endpoint name [default: derived from the namespace or PID].
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Interface name inside the container.
        #[arg(long, default_value = container::ATTACH_IFNAME)]
        ifname: String,
    },
    /// Remove a container's endpoint (attached ones; `run` cleans up by itself).
    Detach {
        #[arg(short = 'n', long)]
        network: String,
        /// The endpoint name (or use --netns/--pid).
        name: Option<String>,
        #[command(flatten)]
        target: OptionalNetnsTarget,
    },
    /// Endpoints (containers on networks) of the cluster.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand)]
enum AgentAction {
    /// The agent's recent log lines; -f follows them live.
    Logs {
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many past lines to show.
        #[arg(short = 'n', long, default_value_t = 200)]
        lines: usize,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Underlay interface (its first IPv4 address is this node's VTEP) [default: the
    /// interface of the IPv4 default route].
    #[arg(long)]
    iface: Option<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long)]
    node: Option<String>,
    /// Create the `default` network (10.1.0.0/16) if the cluster was never bootstrapped.
    #[arg(long)]
    bootstrap: bool,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Where VXLAN is decapsulated on the underlay: `auto` uses native XDP on NICs and
    /// TC ingress on veth and other virtual devices (whose XDP path would lose the
    /// checksum and GSO state of what their peer hands over, breaking TCP).
    #[arg(long, value_enum, default_value_t = DecapMode::Auto)]
    decap: DecapMode,
    /// How the XDP program attaches to the underlay with `--decap xdp`.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
    xdp_mode: XdpAttachMode,
    /// Leave nothing behind on exit (leave the cluster, detach, remove pins). Without
    /// it, a stopped agent leaves the data plane forwarding for its successor.
    #[arg(long)]
    ephemeral: bool,
    /// Session TTL: a node whose agent is gone this long leaves the cluster. Consul
    /// accepts 10s and more (the dev server from 1s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    session_ttl: Duration,
    /// Period of the full resync (the watch applies changes as they happen).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    resync_interval: Duration,
    /// Period of the traffic summary in the log.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    stats_interval: Duration,
    /// Log every packet the kernel programs drop, with its reason (aya-log debug
    /// messages, shown in the agent's log and `agent logs`). Off: compiled out at load.
    #[arg(long)]
    kernel_log: bool,
    /// Serve Prometheus metrics here (`off` to disable). Loopback by default: give an
    /// address of a scraping network explicitly to open it.
    #[arg(long, default_value = crate::agent::metrics::DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
    /// How often to look for what crashed commands and store outages left (addresses
    /// without endpoint, VNI and subnet claims without network, containers without owner).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    gc_interval: Duration,
    /// How long a store entry must look left over before it is collected.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    gc_grace: Duration,
    /// Serve Docker's network and IPAM driver `overlay-net` on
    /// `<docker-plugin-dir>/overlay-net.sock`: `auto` (the default) when that directory
    /// exists, `on` (also the bare flag), `off`.
    #[arg(long, value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    docker_plugin: DockerPluginMode,
    /// Where Docker looks for plugin sockets.
    #[arg(long, default_value = "/run/docker/plugins")]
    docker_plugin_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DockerPluginMode {
    Auto,
    On,
    Off,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct NetnsTarget {
    /// The container's network namespace (e.g. /run/netns/NAME).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// A process in the container (its /proc/PID/ns/net).
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Args)]
#[group(required = false, multiple = false)]
struct OptionalNetnsTarget {
    /// Find the endpoint by the namespace it was attached with.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Find the endpoint by the PID it was attached with.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a network. The gateway defaults to the first address, the VNI to the lowest
    /// free one, the MTU to 1450 (1500 minus VXLAN's 50 bytes).
    Create {
        name: String,
        /// IPv4 subnet, e.g. 10.100.0.0/24 (host bits must be zero).
        cidr: String,
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        /// VXLAN network identifier, 1..16777215.
        #[arg(long)]
        vni: Option<u64>,
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// List networks.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A network with its address allocations and endpoints (JSON).
    Inspect { name: String },
    /// Delete a network (refused while it has endpoints, unless --force).
    Delete {
        name: String,
        /// Delete its endpoints' entries too (their containers lose the network).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum EndpointCommand {
    /// List endpoints.
    List {
        /// Only this network's.
        #[arg(short = 'n', long)]
        network: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Move this node's underlay (and VTEP) to another interface, at runtime.
    Bind { iface: String },
    /// The nodes of the cluster with their VTEPs.
    Members {
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| text.split_at(i))
        .unwrap_or((text, "s"));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (e.g. 10s, 500ms, 1m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit in {text:?} (ms, s or m)")),
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_agent = matches!(cli.command, Command::Agent { action: None, .. });
    let kernel_log =
        matches!(&cli.command, Command::Agent { action: None, args } if args.kernel_log);
    let logs = LogBuffer::default();
    init_tracing(is_agent, kernel_log, &logs);
    let runtime = match tokio::runtime::Runtime::new() {
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

/// The agent logs at info to stderr and into its log ring (for `agent logs`); the CLI
/// commands log warnings only, their results go to stdout.
fn init_tracing(is_agent: bool, kernel_log: bool, logs: &LogBuffer) {
    use tracing_subscriber::Layer as _;
    let default = if is_agent {
        "info,netlink_packet_route=error"
    } else {
        "warn,netlink_packet_route=error"
    };
    let filter = || {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        if kernel_log {
            match format!("{}=debug", agent::KERNEL_LOG_TARGET).parse() {
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

/// The Consul client: --consul / $CONSUL_HTTP_ADDR, else the local agent's address.
fn consul_client(
    cli_addr: Option<&str>,
    agent: Option<&AgentStatus>,
) -> anyhow::Result<ConsulClient> {
    let addr = cli_addr.or(agent.map(|s| s.consul.addr.as_str()));
    Ok(ConsulClient::from_env(addr)?)
}

fn store_for(cli: &Cli, agent: Option<&AgentStatus>) -> anyhow::Result<Store> {
    let prefix = cli
        .prefix
        .clone()
        .or_else(|| agent.map(|s| s.consul.prefix.clone()))
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    Ok(Store::new(
        consul_client(cli.consul.as_deref(), agent)?,
        &prefix,
    ))
}

/// The local agent's status when one runs (commands that only need Consul use it for
/// the address and prefix).
async fn try_agent(state_dir: &Path) -> Option<AgentStatus> {
    AgentClient::new(state_dir).status().await.ok()
}

async fn require_agent(state_dir: &Path) -> anyhow::Result<(AgentClient, AgentStatus)> {
    let client = AgentClient::new(state_dir);
    let status = client.status().await?;
    Ok((client, status))
}

async fn run(cli: Cli, logs: LogBuffer) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Agent { action: None, args } => {
            run_agent(&cli, args, logs).await?;
        }
        Command::Agent {
            action: Some(AgentAction::Logs { follow, lines }),
            ..
        } => {
            let client = AgentClient::new(&cli.state_dir);
            client
                .logs(*lines, *follow, |line| println!("{line}"))
                .await?;
        }
        Command::Status { json } => {
            let (_, status) = require_agent(&cli.state_dir).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        Command::Network(command) => network(&cli, command).await?,
        Command::Run {
            network,
            name,
            ip,
            service,
            command,
        } => {
            return run_container(
                &cli,
                network,
                name.as_deref(),
                *ip,
                service.as_deref(),
                command,
            )
            .await;
        }
        Command::Attach {
            network,
            target,
            name,
            ip,
            ifname,
        } => {
            let path = container::netns_path(target.netns.clone(), target.pid)
                .context("--netns or --pid is required")?;
            let id = match name {
                Some(n) => n.clone(),
                None => derived_id(target.netns.as_deref(), target.pid),
            };
            let (agent, status) = require_agent(&cli.state_dir).await?;
            let ctx = Context {
                store: store_for(&cli, Some(&status))?,
                agent,
                status,
                local: LocalState::new(&cli.state_dir),
            };
            if ctx.store.get_network(network).await?.is_none() {
                bail!("network {network:?} does not exist (see `overlay-ctl network list`)");
            }
            let netns = NetNs::open_path(&id, path.clone())
                .with_context(|| format!("cannot open network namespace {}", path.display()))?;
            // Recorded before anything is created, owned by this process until done.
            let mut record = LocalEndpoint::new(network, &id, local_state::Kind::Attach)?;
            ctx.local.create(&record)?;
            let joined = container::join(
                &ctx,
                &netns,
                &JoinSpec {
                    network,
                    id: &id,
                    ip: *ip,
                    container_ifname: ifname,
                    container: Some(path.display().to_string()),
                    keep_existing_default_route: true,
                    netns_name: None,
                },
                &mut record,
            )
            .await;
            let joined = match joined {
                Ok(joined) => joined,
                Err(e) => {
                    if record.ip.is_none() && record.endpoint.is_none() {
                        let _ = ctx.local.remove(network, &id);
                    }
                    return Err(e.into());
                }
            };
            // Committed: the endpoint now lives until `detach` (or its container ends).
            record.owner = None;
            ctx.local.update(&record)?;
            println!(
                "{} {} {}/{}",
                joined.endpoint.id,
                joined.endpoint.ip,
                joined.network.name,
                joined.network.subnet.prefix()
            );
        }
        Command::Detach {
            network,
            name,
            target,
        } => {
            let (agent, status) = require_agent(&cli.state_dir).await?;
            let ctx = Context {
                store: store_for(&cli, Some(&status))?,
                agent,
                status,
                local: LocalState::new(&cli.state_dir),
            };
            let endpoint = match (
                name,
                container::netns_path(target.netns.clone(), target.pid),
            ) {
                (Some(id), _) => ctx
                    .store
                    .get_endpoint(network, id)
                    .await?
                    .with_context(|| format!("no endpoint {id:?} on network {network:?}"))?,
                (None, Some(path)) => {
                    let wanted = path.display().to_string();
                    ctx.store
                        .list_endpoints(Some(network))
                        .await?
                        .into_iter()
                        .find(|e| e.container.as_deref() == Some(wanted.as_str()))
                        .with_context(|| {
                            format!("no endpoint on network {network:?} was attached with {wanted}")
                        })?
                }
                (None, None) => bail!("name the endpoint, or pass --netns or --pid"),
            };
            container::leave(&ctx, &endpoint).await?;
            ctx.local.remove(&endpoint.network, &endpoint.id)?;
            println!("{} detached", endpoint.id);
        }
        Command::Endpoint(EndpointCommand::List { network, json }) => {
            let agent = try_agent(&cli.state_dir).await;
            let store = store_for(&cli, agent.as_ref())?;
            if let Some(n) = network {
                crate::store::ipam::validate_name(n)?;
            }
            let snapshot = store.snapshot().await?;
            let in_scope = |net: &str| network.as_deref().is_none_or(|n| n == net);
            warn_rejected(&store, &snapshot, |kind, rest| {
                kind == RecordKind::Endpoint && in_scope(rest.split('/').nth(1).unwrap_or(""))
            });
            let endpoints: Vec<_> = snapshot
                .state
                .endpoints
                .into_iter()
                .filter(|e| in_scope(&e.network))
                .collect();
            if *json {
                println!("{}", serde_json::to_string_pretty(&endpoints)?);
            } else {
                let rows = endpoints
                    .iter()
                    .map(|e| {
                        vec![
                            e.network.clone(),
                            e.id.clone(),
                            e.ip.to_string(),
                            e.mac.to_string(),
                            e.node.clone(),
                            e.container.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(&["NETWORK", "NAME", "IP", "MAC", "NODE", "CONTAINER"], rows);
            }
        }
        Command::Cluster(ClusterCommand::Bind { iface }) => {
            let reply = AgentClient::new(&cli.state_dir).bind(iface).await?;
            println!(
                "underlay is now {} (ifindex {}), VTEP {}",
                reply.iface, reply.ifindex, reply.vtep
            );
        }
        Command::Cluster(ClusterCommand::Members { json }) => {
            let agent = try_agent(&cli.state_dir).await;
            let store = store_for(&cli, agent.as_ref())?;
            members(&store, agent.as_ref(), *json).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn derived_id(netns: Option<&Path>, pid: Option<u32>) -> String {
    match (netns, pid) {
        (Some(path), _) => path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .filter(|n| crate::store::ipam::validate_name(n).is_ok())
            .unwrap_or_else(container::random_id),
        (None, Some(pid)) => format!("pid{pid}"),
        (None, None) => container::random_id(),
    }
}

async fn run_agent(cli: &Cli, args: &AgentArgs, logs: LogBuffer) -> anyhow::Result<()> {
    let node = match &args.node {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("cannot read the host name; pass --node")?
            .trim()
            .to_string(),
    };
    crate::store::ipam::validate_name(&node)
        .with_context(|| format!("invalid node name {node:?}"))?;
    let consul = consul_client(cli.consul.as_deref(), None)?;
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
    };
    agent::run(options, consul, &prefix, logs, shutdown_signal())
        .await
        .context("agent failed")
}

async fn run_container(
    cli: &Cli,
    network: &str,
    name: Option<&str>,
    ip: Option<Ipv4Addr>,
    service: Option<&str>,
    command: &[String],
) -> anyhow::Result<ExitCode> {
    let mut signals = container::RunSignals::install()?;
    let id = name
        .map(str::to_string)
        .unwrap_or_else(container::random_id);
    crate::store::ipam::validate_name(&id)
        .with_context(|| format!("invalid container name {id:?}"))?;
    let (agent, status) = require_agent(&cli.state_dir).await?;
    let ctx = Context {
        store: store_for(cli, Some(&status))?,
        agent,
        status,
        local: LocalState::new(&cli.state_dir),
    };
    // Refuse bad input before creating anything.
    if ctx.store.get_network(network).await?.is_none() {
        bail!("network {network:?} does not exist (see `overlay-ctl network list`)");
    }
    if ctx.store.get_endpoint(network, &id).await?.is_some() {
        return Err(crate::store::StoreError::EndpointExists {
            network: network.to_string(),
            id,
        }
        .into());
    }
    // This node's record of the container comes first: whatever happens to this process
    // from here on, the agent finds what it created and collects it once it is gone.
    let mut record = LocalEndpoint::new(network, &id, local_state::Kind::Run)?;
    ctx.local.create(&record)?;
    crate::testhook::pause("recorded");
    let netns_name = local_state::run_netns_name(network, &id);
    let netns = match NetNs::create(&netns_name) {
        Ok(netns) => netns,
        Err(e) => {
            let _ = ctx.local.remove(network, &id);
            return Err(anyhow::Error::from(e)
                .context(format!("cannot create network namespace {netns_name}")));
        }
    };
    crate::testhook::pause("netns");
    let joined = container::join(
        &ctx,
        &netns,
        &JoinSpec {
            network,
            id: &id,
            ip,
            container_ifname: container::CONTAINER_IFNAME,
            container: Some(command.join(" ")),
            keep_existing_default_route: false,
            netns_name: Some(netns_name.clone()),
        },
        &mut record,
    )
    .await;
    let joined = match joined {
        Ok(j) => j,
        Err(e) => {
            if netns.delete().is_ok() && record.ip.is_none() && record.endpoint.is_none() {
                let _ = ctx.local.remove(network, &id);
            }
            return Err(e.into());
        }
    };
    eprintln!(
        "overlay: container {} on {} has address {} (node {})",
        id, network, joined.endpoint.ip, ctx.status.node
    );
    let mut registered = None;
    if let Some(service) = service {
        let entry = container::service_for(&ctx.status, &joined, service);
        match ctx
            .store
            .client()
            .catalog_register(
                &ctx.status.node,
                &ctx.status.vtep.map(|v| v.to_string()).unwrap_or_default(),
                &entry,
            )
            .await
        {
            Ok(()) => registered = Some(entry.id),
            Err(e) => {
                if container::leave(&ctx, &joined.endpoint).await.is_ok() && netns.delete().is_ok()
                {
                    let _ = ctx.local.remove(network, &id);
                }
                return Err(
                    anyhow::Error::from(e).context(format!("cannot register service {service:?}"))
                );
            }
        }
    }
    let status = match signals.pending() {
        // Told to stop while setting up: the command never starts; clean up.
        Some(signal) => Ok(std::os::unix::process::ExitStatusExt::from_raw(
            signal as i32,
        )),
        None => match container::spawn_in(netns.path(), command) {
            Ok(child) => {
                // Recorded so that a killed `run` leaves the container to its command:
                // the agent collects it once neither runs.
                record.command = child
                    .id()
                    .and_then(|pid| local_state::ProcessId::of(pid).ok());
                if let Err(e) = ctx.local.update(&record) {
                    tracing::warn!(error = %e, "cannot record the container's process");
                }
                crate::testhook::pause("started");
                container::wait_passing_signals(child, &mut signals).await
            }
            Err(e) => Err(e),
        },
    };
    crate::testhook::pause("exited");
    if let Some(service_id) = registered {
        if let Err(e) = ctx
            .store
            .client()
            .catalog_deregister(&ctx.status.node, &service_id)
            .await
        {
            eprintln!("warning: cannot deregister service {service_id}: {e}");
        }
    }
    // This process removes its container itself (the agent leaves a record alone while
    // its owner lives), and the record goes last, once everything else is gone.
    let left = container::leave(&ctx, &joined.endpoint).await;
    let deleted = netns.delete();
    if left.is_ok() && deleted.is_ok() {
        if let Err(e) = ctx.local.remove(network, &id) {
            tracing::warn!(error = %e, "cannot remove the container's local record");
        }
    }
    let status = status?;
    left.context("cannot remove the container's endpoint")?;
    deleted.with_context(|| format!("cannot delete network namespace {netns_name}"))?;
    Ok(ExitCode::from(container::exit_code(status)))
}

async fn network(cli: &Cli, command: &NetworkCommand) -> anyhow::Result<()> {
    let agent = try_agent(&cli.state_dir).await;
    let store = store_for(cli, agent.as_ref())?;
    match command {
        NetworkCommand::Create {
            name,
            cidr,
            gateway,
            vni,
            mtu,
        } => {
            let n = store
                .create_network(name, cidr, *gateway, *vni, *mtu)
                .await?;
            println!(
                "network {} created: subnet {} gateway {} vni {} mtu {}",
                n.name, n.subnet, n.gateway, n.vni, n.mtu
            );
        }
        NetworkCommand::List { json } => {
            let snapshot = store.snapshot().await?;
            warn_rejected(&store, &snapshot, |kind, _| kind == RecordKind::Network);
            let networks = &snapshot.state.networks;
            let endpoints = &snapshot.state.endpoints;
            let count = |name: &str| endpoints.iter().filter(|e| e.network == name).count();
            if *json {
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
                            count(&n.name).to_string(),
                        ]
                    })
                    .collect();
                print_table(
                    &["NAME", "SUBNET", "GATEWAY", "VNI", "MTU", "ENDPOINTS"],
                    rows,
                );
            }
        }
        NetworkCommand::Inspect { name } => {
            crate::store::ipam::validate_name(name)?;
            let snapshot = store.snapshot().await?;
            let of_network = |rest: &str| rest.split('/').nth(1) == Some(name.as_str());
            warn_rejected(&store, &snapshot, |kind, rest| match kind {
                RecordKind::Network => rest == format!("networks/{name}"),
                RecordKind::Endpoint | RecordKind::Ipam => of_network(rest),
                RecordKind::Node => false,
            });
            let network = snapshot
                .state
                .networks
                .iter()
                .find(|n| n.name == *name)
                .with_context(|| {
                    format!("network {name:?} does not exist or its record is invalid")
                })?;
            let allocations: Vec<_> = snapshot
                .allocations
                .iter()
                .filter(|((net, _), _)| net == name)
                .map(
                    |((_, ip), a)| serde_json::json!({"ip": ip, "endpoint": a.endpoint, "node": a.node}),
                )
                .collect();
            let endpoints: Vec<_> = snapshot
                .state
                .endpoints
                .iter()
                .filter(|e| e.network == *name)
                .collect();
            let out = serde_json::json!({
                "network": network,
                "allocations": allocations,
                "endpoints": endpoints,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        NetworkCommand::Delete { name, force } => {
            store.delete_network(name, *force).await?;
            println!("network {name} deleted");
        }
    }
    Ok(())
}

/// Warns on stderr about the rejected records `relevant` selects (by kind and key
/// without the prefix), once each.
fn warn_rejected(
    store: &Store,
    snapshot: &crate::store::records::Snapshot,
    relevant: impl Fn(RecordKind, &str) -> bool,
) {
    for r in &snapshot.rejected {
        let rest = r.key.strip_prefix(store.prefix()).unwrap_or(&r.key);
        if relevant(r.kind, rest) {
            eprintln!(
                "warning: ignoring invalid record {}: {} ({}/{})",
                r.key,
                r.detail,
                r.kind.as_str(),
                r.reason
            );
        }
    }
}

async fn members(store: &Store, agent: Option<&AgentStatus>, json: bool) -> anyhow::Result<()> {
    let snapshot = store.snapshot().await?;
    warn_rejected(store, &snapshot, |kind, _| kind == RecordKind::Node);
    let nodes = &snapshot.state.nodes;
    let endpoints = &snapshot.state.endpoints;
    let pairs = store.client().list(&store.nodes_prefix()).await?;
    let session_of = |name: &str| {
        pairs
            .iter()
            .find(|p| p.key.ends_with(&format!("/{name}")))
            .and_then(|p| p.session.clone())
    };
    let local = agent.map(|a| a.node.as_str());
    if json {
        let list: Vec<_> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "vtep": n.vtep,
                    "iface": n.iface,
                    "endpoints": endpoints.iter().filter(|e| e.node == n.name).count(),
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
                endpoints
                    .iter()
                    .filter(|e| e.node == n.name)
                    .count()
                    .to_string(),
                match session_of(&n.name) {
                    Some(_) => "alive (session held)".to_string(),
                    None => "unheld".to_string(),
                },
            ]
        })
        .collect();
    print_table(&["NODE", "VTEP", "IFACE", "ENDPOINTS", "HEALTH"], rows);
    Ok(())
}

fn print_status(s: &AgentStatus) {
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
    println!(
        "consul:      {} prefix {}: {}{}",
        s.consul.addr,
        s.consul.prefix,
        if s.consul.reachable {
            "reachable"
        } else {
            "UNREACHABLE"
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

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.to_vec()));
    for row in &rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
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
