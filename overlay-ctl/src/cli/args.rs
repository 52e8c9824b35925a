//! The command line's definitions (clap): the global options, every command and its
//! arguments, with the help texts `--help` shows.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent::control::DEFAULT_STATE_DIR,
    dataplane::datapath::{XdpAttachMode, DEFAULT_PIN_ROOT},
    dataplane::egress::EgressMode,
    dataplane::forwarding::DataplaneMode,
    dataplane::underlay::DecapMode,
    runtimes::container,
    store::devserver::DevServerArgs,
};

pub const AFTER_HELP: &str = "\
Getting started (as the SocketPlane walkthrough did):
  overlay-ctl agent --bootstrap --iface eth0      # first node; creates network \"default\"
  overlay-ctl agent --iface eth0                  # every other node
  overlay-ctl network create net1 10.100.0.0/24
  overlay-ctl run -n net1 -- ping 10.100.0.3      # a container on net1

Store: --store URL ($OVERLAY_STORE): consul://host:port (or http://, https://, unix://)
for Consul, etcd://a:2379,b:2379,c:2379 (etcds:// with TLS: --ca, --cert, --key, else
$ETCDCTL_CACERT, $ETCDCTL_CERT, $ETCDCTL_KEY) for etcd; `etcd://` alone takes
$ETCDCTL_ENDPOINTS. Without it: --consul ADDR, else $CONSUL_HTTP_ADDR, else the local
agent's store, else Consul at 127.0.0.1:8500. $CONSUL_HTTP_TOKEN (or the file
$CONSUL_HTTP_TOKEN_FILE names) is sent as the ACL token.

Exit codes: 0 success; 1 the operation failed or was refused (one-line reason on
stderr, nothing changed); 2 bad usage. `run` exits with its command's code.";

/// Multi-host container overlay network: VXLAN tunnels built by eBPF/XDP programs, cluster
/// state (membership, networks, addresses) in Consul.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// The options every command takes: where the cluster state and the local agent are.
#[derive(Args)]
pub struct Global {
    /// Where the cluster state is: consul://host:port, etcd://a:2379,b:2379,c:2379,
    /// etcds://... (TLS) [default: --consul, else the local agent's store, else Consul at
    /// 127.0.0.1:8500].
    #[arg(long, global = true, env = "OVERLAY_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// Consul HTTP address (host:port, http://, https://host:port or unix:///path);
    /// --store consul://... says the same.
    #[arg(long, global = true, env = "CONSUL_HTTP_ADDR")]
    pub consul: Option<String>,
    /// Key prefix of the cluster state in the store [default: overlay/, or the
    /// local agent's].
    #[arg(long, global = true, env = "OVERLAY_PREFIX")]
    pub prefix: Option<String>,
    /// The agent's state directory (its control socket and session).
    #[arg(long, global = true, env = "OVERLAY_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// CA certificate to verify the store's TLS certificate (https://, etcds://).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate for the store's TLS (with --key).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key for the store's TLS (with --cert).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Register the container's address as this service with the local Consul agent
        /// (in the catalog on that agent's node) while the container runs.
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
    /// Cluster membership and the cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a development store in the foreground (as `consul agent -dev` does).
    ///
    /// One in-memory server speaking the part of Consul's HTTP API the overlay uses: for
    /// trying the overlay on one machine, and what `cargo xtask run` starts.
    DevServer(DevServerArgs),
}

#[derive(Subcommand)]
pub enum AgentAction {
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
pub struct AgentArgs {
    /// Underlay interface (its first IPv4 address is this node's VTEP) [default: the
    /// interface of the IPv4 default route].
    #[arg(long)]
    pub iface: Option<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long)]
    pub node: Option<String>,
    /// Create the `default` network (10.1.0.0/16) if the cluster was never bootstrapped.
    #[arg(long)]
    pub bootstrap: bool,
    /// With --bootstrap: the cluster's VXLAN UDP port [default: 4789, IANA's; Linux's
    /// vxlan driver, flannel and Cilium use 8472]. Ignored (with a warning) when the
    /// cluster exists already; change it with `overlay-ctl cluster set vxlan-port`.
    #[arg(long, requires = "bootstrap", value_name = "PORT")]
    pub vxlan_port: Option<u16>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Where VXLAN is decapsulated on the underlay: `auto` uses native XDP on NICs and
    /// TC ingress on veth and other virtual devices (whose XDP path would lose the
    /// checksum and GSO state of what their peer hands over, breaking TCP).
    #[arg(long, value_enum, default_value_t = DecapMode::Auto)]
    pub decap: DecapMode,
    /// How the XDP program attaches to the underlay with `--decap xdp`.
    #[arg(long, value_enum, default_value_t = XdpAttachMode::Auto)]
    pub xdp_mode: XdpAttachMode,
    /// Leave nothing behind on exit (leave the cluster, detach, remove pins). Without
    /// it, a stopped agent leaves the data plane forwarding for its successor.
    #[arg(long)]
    pub ephemeral: bool,
    /// Session TTL: a node whose agent is gone this long (up to twice as long) leaves
    /// the cluster. Consul accepts 10s to 24h; shorter needs --dev-store.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub session_ttl: Duration,
    /// Dev/test only: the store is `overlay-ctl dev-server` started with a lower
    /// `--session-ttl-min`, so --session-ttl may be below Consul's 10s minimum (a real
    /// Consul would answer every session creation with an error).
    #[arg(long)]
    pub dev_store: bool,
    /// Period of the full resync (the watch applies changes as they happen).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// Period of the traffic summary in the log.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// Log every packet the kernel programs drop, with its reason (aya-log debug
    /// messages, shown in the agent's log and `agent logs`). Off: compiled out at load.
    #[arg(long)]
    pub kernel_log: bool,
    /// Serve Prometheus metrics here (`off` to disable). Loopback by default: give an
    /// address of a scraping network explicitly to open it.
    #[arg(long, default_value = crate::agent::metrics::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// How often to look for what crashed commands and store outages left (addresses
    /// without endpoint, VNI and subnet claims without network, containers without owner).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub gc_interval: Duration,
    /// How long a store entry must look left over before it is collected.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub gc_grace: Duration,
    /// Serve Docker's network and IPAM driver `overlay-net` on
    /// `<docker-plugin-dir>/overlay-net.sock`: `auto` (the default) when that directory
    /// exists, `on` (also the bare flag), `off`.
    #[arg(long, value_enum, default_value = "auto", num_args = 0..=1, default_missing_value = "on")]
    pub docker_plugin: DockerPluginMode,
    /// Where Docker looks for plugin sockets.
    #[arg(long, default_value = "/run/docker/plugins")]
    pub docker_plugin_dir: PathBuf,
    /// Answer the containers' DNS queries on each network's gateway address (port 53):
    /// `NAME` and `NAME.NETWORK` of the asking container's network, everything else
    /// forwarded upstream. `off` leaves port 53 alone.
    #[arg(long, value_enum, default_value = "on")]
    pub dns: OnOff,
    /// Forward names outside the overlay to this resolver (repeat for more, tried in
    /// order; `IP` or `IP:PORT`) [default: the nameservers of /etc/resolv.conf].
    #[arg(long = "dns-upstream", value_name = "ADDR", value_parser = parse_resolver_addr)]
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// The data plane to drive: `bpf`, the eBPF programs on this host's underlay; or
    /// `none`, the control plane only (membership, watch, reconcile, acknowledgements)
    /// with its maps in memory, for scale tests of the control plane: it needs --vtep
    /// and a --state-dir of its own, touches nothing on the host, and serves neither DNS,
    /// the Docker driver nor (unless --metrics-addr names an address) metrics.
    #[arg(long, value_enum, default_value_t = DataplaneMode::Bpf)]
    pub dataplane: DataplaneMode,
    /// With `--dataplane none`: the address this node registers as its VTEP.
    #[arg(long, value_name = "IP", required_if_eq("dataplane", "none"))]
    pub vtep: Option<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// A resolver address: `IP:PORT`, or `IP` for port 53.
fn parse_resolver_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, crate::agent::dns::server::DNS_PORT))
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DockerPluginMode {
    Auto,
    On,
    Off,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct NetnsTarget {
    /// The container's network namespace (e.g. /run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// A process in the container (its /proc/PID/ns/net).
    #[arg(long)]
    pub pid: Option<u32>,
}

#[derive(Args)]
#[group(required = false, multiple = false)]
pub struct OptionalNetnsTarget {
    /// Find the endpoint by the namespace it was attached with.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Find the endpoint by the PID it was attached with.
    #[arg(long)]
    pub pid: Option<u32>,
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create a network. The gateway defaults to the first address, the VNI to the lowest
    /// free one, the MTU to the smallest underlay MTU of the cluster's live nodes minus
    /// VXLAN's 50 bytes (9000 -> 8950; 1450 when no node has recorded its underlay).
    Create {
        name: String,
        /// IPv4 subnet, e.g. 10.100.0.0/24 (host bits must be zero).
        cidr: String,
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        /// VXLAN network identifier, 1..16777215.
        #[arg(long)]
        vni: Option<u64>,
        /// The containers' MTU, 576..9000; it must fit every live node's underlay
        /// (MTU + 50 <= the smallest underlay MTU).
        #[arg(long)]
        mtu: Option<u32>,
        /// What containers may do towards destinations outside every overlay subnet:
        /// `masquerade` (leave with their node's address), `none` (dropped and counted).
        #[arg(long, value_enum, default_value_t = EgressMode::Masquerade)]
        egress: EgressMode,
    },
    /// Change a network's settings (today: its egress mode). Every agent applies the
    /// change at its next reconcile; containers keep running.
    Update {
        /// The network to change.
        name: String,
        /// `masquerade`: containers reach the outside with their node's address; `none`:
        /// their packets to the outside are dropped and counted (`status`, metrics).
        #[arg(long, value_enum)]
        egress: EgressMode,
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
pub enum EndpointCommand {
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
pub enum ClusterCommand {
    /// Move this node's underlay (and VTEP) to another interface, at runtime.
    Bind { iface: String },
    /// The nodes of the cluster with their VTEPs.
    Members {
        #[arg(long)]
        json: bool,
    },
    /// The cluster-wide settings (the VXLAN port), as stored.
    Config {
        #[arg(long)]
        json: bool,
    },
    /// Change a cluster-wide setting; every agent applies it on its next reconcile.
    #[command(subcommand)]
    Set(ClusterSetting),
}

#[derive(Subcommand)]
pub enum ClusterSetting {
    /// The VXLAN UDP destination port of every node.
    ///
    /// 4789 is IANA's port (the default), 8472 Linux's own default (flannel, Cilium).
    /// Every agent's data plane switches on its next reconcile, without a reload;
    /// packets in flight while the nodes switch (milliseconds) may be lost. Linux vxlan
    /// devices that talk to the cluster must be recreated with the new port.
    VxlanPort {
        /// A UDP port from 1024 to 32767 (not a well-known service's, not an ephemeral
        /// one: the data plane takes all UDP between nodes to this port).
        #[arg(value_name = "PORT")]
        port: u64,
    },
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
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
