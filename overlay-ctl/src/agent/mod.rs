//! The node agent: loads and pins the data plane, binds it to the underlay, joins the
//! cluster (a node key held by a session it renews) and keeps the maps equal to the
//! cluster state in Consul: a blocking-query watch applies every change as it happens,
//! and a periodic full resync repairs any drift.
//!
//! Nothing here is needed for forwarding: maps and links are pinned, so the data plane
//! keeps running with the last known state while the agent restarts or Consul is away.
//!
//! This file holds the agent's options and its shared state ([`Agent`]); the rest is
//! split by role:
//!
//! | file | what lives there |
//! | --- | --- |
//! | [`lifecycle`] | [`run`]: data plane setup, the tasks it spawns, and the stop |
//! | [`membership`] | the session and node key, the store probe, republishing records |
//! | [`watch`] | the blocking-query watch, the periodic resync, judging each read |
//! | [`reconciler`] | one reconcile run: read, plan, apply, then follow-up actions |
//! | [`reconcile`] | the planner: cluster state -> desired map contents |
//! | [`apply`] | desired map contents -> the maps and attachments ([`apply::ApplyReport`]) |
//! | [`reaping`] | the collection task (the rules are in [`gc`]) |
//! | [`local_state`] | this node's records of what it created |
//! | [`control_server`] | the control-socket handlers (protocol and client: [`control`]) |
//! | [`status`] | the one published [`status::LiveStatus`], `status` and the scrape |
//! | [`metrics`] | Prometheus exposition |
//! | [`mtu`] | this node's underlay MTU against the networks' MTUs (status, log, metrics) |
//! | [`logs`] | the agent's log ring |
//! | [`dns`] | the container-name resolver served on the networks' gateways |
//! | [`egress`] | the egress nftables table kept in step with the networks |
//! | [`names`] | the agent's resolver: started with the agent, refreshed by every reconcile |
//! | [`next_hops`] | the next-hop cache kept in step with the kernel's routes and neighbours |
pub mod apply;
pub mod control;
mod control_server;
mod delta;
pub mod dns;
pub mod egress;
pub mod gc;
mod lifecycle;
pub mod local_state;
pub mod logs;
mod membership;
pub mod metrics;
mod mirror;
pub mod mtu;
pub mod names;
mod next_hops;
mod reaping;
pub mod reconcile;
mod reconciler;
mod rejections;
pub mod status;
mod watch;

use std::{
    collections::BTreeSet,
    io,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use rtnetlink::Handle;
use tokio::sync::{watch as channel, Notify};

pub use lifecycle::{run, Companion};

use crate::{
    agent::{
        egress::EgressState, local_state::LocalState, logs::LogBuffer,
        metrics::ControlPlaneMetrics, metrics::MetricsError, reconcile::ClusterState,
        status::LiveStatus,
    },
    dataplane::datapath::{DatapathError, XdpAttachMode},
    dataplane::forwarding::{DataPlane, DataplaneMode},
    dataplane::netlink::{LinkInfo, NetlinkError},
    dataplane::underlay::{DecapMode, HostChange, UnderlaySetup},
    store::identity::Identity,
    store::Store,
};

/// Consul's own minimum session TTL (`session_ttl_min`).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(60);

/// The log target of the kernel programs' messages (their module path in overlay-ebpf).
pub const KERNEL_LOG_TARGET: &str = "overlay::counters";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("an agent is already running with state directory {0} (stop it, or use another --state-dir and --pin-root)")]
    AlreadyRunning(PathBuf),
    /// A [`Companion`] could not start; its error says which and what to do.
    #[error(transparent)]
    Companion(Box<dyn std::error::Error + Send + Sync>),
    #[error("--dataplane none needs --vtep: the address to register as this node's VTEP")]
    NoVtep,
    #[error("{0} (choose another with --metrics-addr, or `--metrics-addr off`)")]
    Metrics(#[from] MetricsError),
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// This node's name in the cluster.
    pub node: String,
    /// Underlay interface; the default route's when `None`.
    pub iface: Option<String>,
    pub pin_root: PathBuf,
    pub state_dir: PathBuf,
    pub xdp_mode: XdpAttachMode,
    /// Where VXLAN is decapsulated on the underlay (XDP or TC ingress).
    pub decap: DecapMode,
    /// Create the `default` network if the cluster has never been bootstrapped.
    pub bootstrap: bool,
    /// With `bootstrap`: the VXLAN port to store for a new cluster (`None`: the default).
    pub bootstrap_vxlan_port: Option<u16>,
    /// Leave nothing behind on exit: leave the cluster, detach, remove the pins.
    pub ephemeral: bool,
    pub session_ttl: Duration,
    pub resync_interval: Duration,
    pub watch_wait: Duration,
    /// How often data-plane counters are summarised in the log (when they changed).
    pub stats_interval: Duration,
    /// Where Prometheus metrics are served (None: not served).
    pub metrics_addr: Option<String>,
    /// Turn on the kernel programs' aya-log debug messages (every drop and its reason)
    /// and copy them into the agent's log.
    pub kernel_log: bool,
    /// How often left-overs are looked for ([`crate::agent::gc`]).
    pub gc_interval: Duration,
    /// How long a store entry must look left over before it is collected.
    pub gc_grace: Duration,
    /// Where to serve Docker's `overlay-net` driver (None: not served).
    pub docker_plugin: Option<PathBuf>,
    /// The containers' DNS responder on the gateway addresses.
    pub names: names::NameOptions,
    /// The kernel data plane, or none (the control plane only, maps in memory).
    pub dataplane: DataplaneMode,
    /// With `DataplaneMode::None`: the VTEP address to register (there is no underlay
    /// to take it from).
    pub vtep: Option<Ipv4Addr>,
}

/// Where this node meets the underlay.
struct Underlay {
    link: LinkInfo,
    vtep: Ipv4Addr,
    setup: UnderlaySetup,
    /// Host settings this agent changed (put back by an `--ephemeral` agent's exit).
    host_changes: Vec<HostChange>,
}

/// The data plane and the underlay it is bound to: changed together by `bind`.
struct Plane {
    /// `None` once the agent is stopping.
    datapath: Option<DataPlane>,
    underlay: Underlay,
}

/// What the agent last read of the cluster, and what it needs to read the next answer.
#[derive(Default)]
struct ClusterView {
    /// The last cluster state read from Consul (`None` until the first read).
    desired: Option<Arc<ClusterState>>,
    /// A reconcile outside the watch (a `run`'s request, the resync) applied a newer
    /// state than the watch has seen: the watch acknowledges it when it catches up, as
    /// it would have applied it itself.
    ack_pending: bool,
    /// The interface names on this node at the last reconcile (which local endpoints
    /// are real containers, for [`crate::store::records::View::Node`]).
    links: BTreeSet<String>,
    /// The store records rejected now (each is logged once while it lasts).
    rejections: rejections::Rejections,
    /// What the changes applied on their own ([`delta`]) found since `desired` was set:
    /// `desired` with it in place is the full judgement of the mirror.
    kept: delta::Kept,
    /// While the resync's fresh read of the whole store is in flight (outside the
    /// reconcile lock, [`reconciler::Fetch::Aside`]):
    /// what the changes applied on their own found since it started, to be kept over
    /// the read's state. `None` when no read is in flight, or when a full judgement of
    /// the watch's copy replaced `desired` meanwhile (the read may be older: dropped).
    kept_during_fetch: Option<delta::Kept>,
    /// The newest store index among the followed records of the last fresh read of the
    /// whole store that set `desired` (0: none since the watch's last snapshot). The
    /// watch may lag behind such a read (a `run` reads the store right after writing
    /// its endpoint); a batch of changes older than it is taken into the mirror but not
    /// applied, as the read's state already holds it and judging the older copy would
    /// undo what the read applied.
    fresh_read_index: u64,
    /// The networks with an endpoint of this node in `desired` (their names are served).
    local_networks: BTreeSet<String>,
}

impl ClusterView {
    /// Keeps `state` as the desired one; returns whether it differs from the last.
    fn set_desired(&mut self, state: Arc<ClusterState>, node: &str) -> bool {
        self.kept = delta::Kept::default();
        let changed = self.desired.as_deref() != Some(&*state);
        if changed {
            self.local_networks = (state.local_endpoints(node))
                .map(|e| e.network.clone())
                .collect();
            self.desired = Some(state);
        }
        changed
    }
}

/// What only one reconcile run at a time may touch (its lock is the reconcile lock).
#[derive(Default)]
struct ReconcilerState {
    /// Whether endpoints made before local records existed were looked for (once).
    adopted: bool,
}

/// The agent's shared state. Locks are never held across each other's (but `egress`
/// over `cluster`, see there) or across an `await`, except the two async ones:
/// `reconciler` (one reconcile run at a time, never across store writes or deletes) and
/// `collector` (one collection at a time).
struct Agent {
    options: AgentOptions,
    store: Store,
    handle: Handle,
    plane: Mutex<Plane>,
    cluster: Mutex<ClusterView>,
    /// The watch's copy of the followed keys. Taken before `cluster` when both are.
    mirror: Mutex<mirror::Mirror>,
    /// Whether the store is this cluster's ([`crate::store::identity`]).
    identity: Mutex<Identity>,
    /// Everything `status` and the metrics report about the control plane: one place,
    /// published through one channel.
    status: channel::Sender<LiveStatus>,
    /// Counters only (the gauges are read from `status`).
    metrics: ControlPlaneMetrics,
    reconciler: tokio::sync::Mutex<ReconcilerState>,
    /// One fresh read of the whole store at a time (it runs outside `reconciler`).
    fetching: tokio::sync::Mutex<()>,
    /// Keeps two collections of one local record apart (the collection task's and a
    /// reconcile's follow-up).
    collector: tokio::sync::Mutex<()>,
    /// Asks the membership task to write this node's entry again (after `bind`).
    reregister: Notify,
    /// Asks the republish task to write this node's records again (a restored store).
    republish: Notify,
    /// Tells the watch that its copy of the store is older than a fresh read (a store
    /// that came back without its data): the feed reads the store again.
    feed_stale: Notify,
    /// The resync's requests that the watch check its copy against the store.
    feed_check: watch::FeedCheck,
    logs: LogBuffer,
    /// This node's records of the endpoints it created (the only thing it acts on).
    local: LocalState,
    /// The egress nftables table. The one lock held while another is taken: `cluster`'s,
    /// briefly, to read the networks (never the other way round).
    egress: Mutex<EgressState>,
    /// The containers' DNS responder (`None`: `--dns off`).
    names: Option<names::NameService>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    fn node(&self) -> &str {
        &self.options.node
    }

    /// Whether this agent has a host of its own (`--dataplane none` has not: no
    /// programs, underlay, veths, host settings, egress table or DNS listeners).
    fn has_host(&self) -> bool {
        self.options.dataplane == DataplaneMode::Bpf
    }

    fn vtep(&self) -> Ipv4Addr {
        lock(&self.plane).underlay.vtep
    }

    /// The last cluster state read (`None` until the first read).
    fn desired(&self) -> Option<Arc<ClusterState>> {
        lock(&self.cluster).desired.clone()
    }
}
