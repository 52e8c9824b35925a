//! The node agent: loads and pins the data plane, binds it to the underlay, joins the
//! cluster (a node key held by a session it renews) and keeps the maps equal to the
//! cluster state in Consul: a blocking-query watch applies every change as it happens,
//! and a periodic full resync repairs any drift.
//!
//! Nothing here is needed for forwarding: maps and links are pinned, so the data plane
//! keeps running with the last known state while the agent restarts or Consul is away.
//!
//! Its parts: [`reconcile`] (cluster state -> map contents and the diff), [`local_state`]
//! (this node's records of what it created) and [`gc`] (collecting what crashed commands
//! and outages left), [`control`] (the CLI <-> agent socket), [`metrics`] (Prometheus
//! exposition) and [`logs`] (the agent's log ring).
pub mod control;
pub mod dns;
pub mod gc;
pub mod local_state;
pub mod logs;
pub mod metrics;
pub mod reconcile;
use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use overlay_common::{Counter, CounterValue};
use rtnetlink::Handle;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Notify,
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::{
    agent::control::{
        AgentStatus, BindReply, ConsulStatus, MapUsage, ReconcileReply, ReconcileStatus, Request,
    },
    agent::gc::Sweeper,
    agent::local_state::LocalState,
    agent::logs::LogBuffer,
    agent::metrics::{ControlPlaneMetrics, MetricsError},
    agent::reconcile::{ApplyReport, ClusterState, HostVeth, LocalNode},
    dataplane::datapath::{self, Datapath, DatapathError, XdpAttachMode},
    dataplane::netlink::{self, LinkInfo, NetlinkError},
    dataplane::underlay::{self, DecapMode, HostChange, UnderlaySetup},
    runtimes::docker::{self, DockerPlugin},
    store::consul::{ConsulClient, ConsulError, KvWatch, SessionBehavior},
    store::identity::{self, Identity, Judgement, Trust},
    store::records::{self, RejectionLog},
    store::{NodeInfo, Store, StoreError},
};

/// Consul's own minimum session TTL (`session_ttl_min`).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(60);
const SESSION_FILE: &str = "session";
/// How often, and how patiently, the store is probed for `status`.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

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
    #[error("Docker plugin socket {path}: {source} (or `--docker-plugin off`)")]
    DockerSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
}

/// The log target of the kernel programs' messages (their module path in overlay-ebpf).
pub const KERNEL_LOG_TARGET: &str = "overlay::counters";

struct Underlay {
    link: LinkInfo,
    vtep: Ipv4Addr,
    setup: UnderlaySetup,
    /// Host settings this agent changed (put back by an `--ephemeral` agent's exit).
    host_changes: Vec<HostChange>,
}

#[derive(Default)]
struct Health {
    consul_reachable: bool,
    consul_error: Option<String>,
    session: Option<String>,
    registered: bool,
    last_reconcile: Option<ReconcileStatus>,
    members: usize,
    local_endpoints: usize,
    remote_endpoints: usize,
    attached: Vec<String>,
    rejected_records: usize,
}

struct Agent {
    options: AgentOptions,
    store: Store,
    handle: Handle,
    /// `None` once the agent is stopping.
    datapath: Mutex<Option<Datapath>>,
    underlay: Mutex<Underlay>,
    /// The last cluster state read from Consul (`None` until the first read).
    desired: Mutex<Option<ClusterState>>,
    health: Mutex<Health>,
    reconcile_lock: tokio::sync::Mutex<()>,
    /// A reconcile outside the watch (a `run`'s request, the resync) applied a newer
    /// state than the watch has seen: the watch acknowledges it when it catches up, as
    /// it would have applied it itself.
    ack_pending: AtomicBool,
    /// Asks the membership task to write this node's entry again (after `bind`).
    reregister: Notify,
    logs: LogBuffer,
    metrics: ControlPlaneMetrics,
    /// Store records already reported as rejected (each is logged once while it lasts).
    rejections: Mutex<RejectionLog>,
    /// The interface names on this node at the last reconcile (which local endpoints
    /// are real containers, for [`records::View::Node`]).
    links: Mutex<std::collections::BTreeSet<String>>,
    /// This node's records of the endpoints it created (the only thing it acts on).
    local: LocalState,
    /// Whether the store is this cluster's ([`crate::store::identity`]).
    identity: Mutex<Identity>,
    /// Asks the republish task to write this node's records again (a restored store).
    republish: Notify,
    sweeper: tokio::sync::Mutex<Sweeper>,
    /// Whether endpoints made before local records existed were looked for (once).
    adopted: std::sync::atomic::AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    options: AgentOptions,
    consul: ConsulClient,
    prefix: &str,
    logs: LogBuffer,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let listener = bind_control_socket(&options.state_dir).await?;
    let metrics_listener = match &options.metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let handle = netlink::connect()?;
    let link = match &options.iface {
        Some(name) => netlink::link_by_name(&handle, name).await?,
        None => {
            info!(
                "identifying the underlay interface from the default route (use --iface to choose)"
            );
            netlink::default_route_link(&handle).await?
        }
    };
    let vtep = netlink::first_ipv4(&handle, &link).await?;
    info!(node = %options.node, iface = %link.name, ifindex = link.index, %vtep, mtu = link.mtu, "binding to underlay");

    let host_changes = match underlay::enable_forwarding() {
        Ok(change) => change.into_iter().collect(),
        Err(e) => {
            warn!(error = %e, "cannot turn IPv4 forwarding on; containers cannot reach other nodes");
            Vec::new()
        }
    };
    let mut datapath = Datapath::load_with_kernel_log(&options.pin_root, options.kernel_log)?;
    let kernel_logger = if options.kernel_log {
        match datapath.kernel_logger() {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!(error = %e, "kernel-side logs unavailable");
                None
            }
        }
    } else {
        None
    };
    let setup = underlay::attach(&mut datapath, &link, vtep, options.decap, options.xdp_mode)?;
    info!(
        programs = ?datapath.program_ids(),
        pins = %options.pin_root.display(),
        "data plane attached and pinned"
    );

    let agent = Arc::new(Agent {
        store: Store::new(consul, prefix),
        handle,
        datapath: Mutex::new(Some(datapath)),
        underlay: Mutex::new(Underlay {
            link,
            vtep,
            setup,
            host_changes,
        }),
        desired: Mutex::new(None),
        health: Mutex::new(Health::default()),
        reconcile_lock: tokio::sync::Mutex::new(()),
        ack_pending: AtomicBool::new(false),
        reregister: Notify::new(),
        logs,
        metrics: ControlPlaneMetrics::default(),
        rejections: Mutex::new(RejectionLog::default()),
        links: Mutex::default(),
        local: LocalState::new(&options.state_dir),
        identity: Mutex::new(Identity::load(
            &options.state_dir,
            (options.session_ttl * 3).max(Duration::from_secs(10)),
        )),
        republish: Notify::new(),
        sweeper: tokio::sync::Mutex::new(Sweeper::default()),
        adopted: std::sync::atomic::AtomicBool::new(false),
        options,
    });

    let mut tasks = JoinSet::new();
    tasks.spawn(agent.clone().control_loop(listener));
    tasks.spawn(agent.clone().membership_loop());
    tasks.spawn(agent.clone().watch_loop());
    tasks.spawn(agent.clone().resync_loop());
    tasks.spawn(agent.clone().stats_loop());
    tasks.spawn(agent.clone().gc_loop());
    tasks.spawn(agent.clone().republish_loop());
    tasks.spawn(agent.clone().probe_loop());
    if let Some(logger) = kernel_logger {
        tasks.spawn(forward_kernel_logs(logger));
    }
    if let Some(listener) = metrics_listener {
        let scraped = agent.clone();
        let render: metrics::RenderFn = Arc::new(move || scraped.render_metrics());
        info!(addr = ?listener.local_addr().ok(), "serving Prometheus metrics on /metrics");
        tasks.spawn(metrics::serve(listener, render, std::future::pending()));
    }
    let docker_socket = agent.options.docker_plugin.clone();
    if let Some(path) = &docker_socket {
        let listener = bind_docker_socket(path)?;
        let plugin = Arc::new(DockerPlugin::new(agent.options.state_dir.clone()));
        info!(socket = %path.display(), "serving Docker's network and IPAM driver");
        tasks.spawn(docker::serve(listener, plugin, std::future::pending()));
    }
    info!(consul = %agent.store.client().addr(), prefix = %agent.store.prefix(), "agent running; Ctrl-C to stop");

    shutdown.await;
    tasks.shutdown().await;
    if let Some(path) = &docker_socket {
        let _ = std::fs::remove_file(path);
    }
    agent.stop().await;
    Ok(())
}

/// Creates the state directory and listens on its control socket, refusing to run next to
/// a live agent with the same state directory.
async fn bind_control_socket(state_dir: &Path) -> Result<UnixListener, AgentError> {
    let dir_err = |source| AgentError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    };
    // Only root may read or change what the agent keeps here (0700, not the umask's).
    local_state::ensure_private_dir(state_dir).map_err(dir_err)?;
    let path = control::socket_path(state_dir);
    if UnixStream::connect(&path).await.is_ok() {
        return Err(AgentError::AlreadyRunning(state_dir.to_path_buf()));
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(dir_err(e)),
        _ => {}
    }
    control::bind_private(&path).map_err(dir_err)
}

/// Listens on Docker's plugin socket (mode 0600, set explicitly), replacing a stale one.
fn bind_docker_socket(path: &Path) -> Result<UnixListener, AgentError> {
    let err = |source| AgentError::DockerSocket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    control::bind_private(path).map_err(err)
}

/// Copies the kernel programs' aya-log records into the agent's log as they arrive.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd and moves into the AsyncFd, which
    // deregisters it before the logger (and so the fd) is dropped.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the kernel log ring");
            return;
        }
    };
    info!(
        target = KERNEL_LOG_TARGET,
        "kernel-side debug logs on (every drop is logged)"
    );
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    fn node(&self) -> &str {
        &self.options.node
    }

    fn session_file(&self) -> PathBuf {
        self.options.state_dir.join(SESSION_FILE)
    }

    fn consul_ok(&self) {
        let mut health = lock(&self.health);
        if !health.consul_reachable {
            info!(consul = %self.store.client().addr(), "Consul reachable");
        }
        health.consul_reachable = true;
        health.consul_error = None;
        self.metrics.set_consul_up();
    }

    /// An outage is logged once when it starts (and at debug level while it lasts).
    fn consul_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let mut health = lock(&self.health);
        if health.consul_reachable || health.consul_error.is_none() {
            warn!(consul = %self.store.client().addr(), error = %error, "{what}: Consul unreachable; the data plane keeps forwarding with the last known state");
        } else {
            debug!(error = %error, "{what}: Consul still unreachable");
        }
        health.consul_reachable = false;
        health.consul_error = Some(error.to_string());
        self.metrics.record_consul_error();
    }

    /// One Prometheus scrape: counters summed over CPUs right now.
    fn render_metrics(&self) -> Result<String, String> {
        let networks: BTreeMap<u32, String> = lock(&self.desired)
            .as_ref()
            .map(|state| {
                state
                    .networks
                    .iter()
                    .map(|n| (n.vni, n.name.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let (counters, occupancy) = {
            let mut guard = lock(&self.datapath);
            let datapath = guard.as_mut().ok_or("the agent is stopping")?;
            (
                datapath.counters().map_err(|e| e.to_string())?,
                datapath.map_occupancy().map_err(|e| e.to_string())?,
            )
        };
        Ok(metrics::render(&metrics::Scrape {
            counters: &counters,
            networks: &networks,
            occupancy: &occupancy,
            control: &self.metrics,
        }))
    }

    // ---- reconcile ----

    /// Parses a read of the whole prefix at the validation boundary: the valid state for
    /// this node, with every rejected record logged once (while it lasts) and counted.
    fn ingest(&self, pairs: &[crate::store::consul::KvPair]) -> ClusterState {
        let links = lock(&self.links).clone();
        let view = records::View::Node {
            name: self.node(),
            vtep: lock(&self.underlay).vtep,
            links: &links,
        };
        let snapshot = records::parse_snapshot(self.store.prefix(), pairs, view);
        let fresh = lock(&self.rejections).fresh(&snapshot.rejected);
        for r in &fresh {
            if r.reason == records::RejectReason::UnknownNetwork {
                // Also what `network delete --force` looks like for a moment (the
                // network's key goes first, then its endpoints).
                info!(key = %r.key, kind = r.kind.as_str(), reason = %r.reason, "ignoring an invalid store record: {}", r.detail);
            } else {
                warn!(key = %r.key, kind = r.kind.as_str(), reason = %r.reason, "ignoring an invalid store record: {}", r.detail);
            }
        }
        self.metrics.record_rejections(
            records::count(&snapshot.rejected),
            fresh.iter().map(|r| (r.kind, r.reason)),
        );
        lock(&self.health).rejected_records = snapshot.rejected.len();
        snapshot.state
    }

    /// Applies the cluster state to the maps: a fresh read from Consul when `fetch` (the
    /// last known state when Consul cannot be read), else the last known state.
    async fn reconcile(&self, fetch: bool) -> Result<ReconcileReply, String> {
        let _one_at_a_time = self.reconcile_lock.lock().await;
        let started = Instant::now();
        let mut fresh = false;
        let mut newer = false;
        if fetch {
            match self.store.client().list(self.store.prefix()).await {
                Ok(pairs) => {
                    self.consul_ok();
                    if let Some(state) = self.judge(&pairs) {
                        let mut desired = lock(&self.desired);
                        newer = desired.as_ref() != Some(&state);
                        *desired = Some(state);
                        fresh = true;
                    }
                }
                Err(e) => self.consul_failed("resync", &e),
            }
        }
        let result = self.apply_desired().await;
        if newer && result.is_ok() {
            self.ack_pending.store(true, Ordering::SeqCst);
        }
        let elapsed = started.elapsed();
        // Entries that could not be written (a full map) fail the run for status and
        // metrics, but not the caller: everything else was applied.
        let partial = result.as_ref().ok().and_then(ApplyReport::failure_summary);
        let ok = result.is_ok() && partial.is_none();
        self.metrics.record_reconcile(ok, elapsed);
        if let Ok(report) = &result {
            self.metrics.record_apply_failures(report);
        }
        let mut health = lock(&self.health);
        health.last_reconcile = Some(ReconcileStatus {
            at_unix_ms: unix_ms(SystemTime::now()),
            ok,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            error: result.as_ref().err().cloned().or(partial),
            report: result.as_ref().cloned().unwrap_or_default(),
        });
        match result {
            Ok(report) => Ok(ReconcileReply {
                report,
                attached: health.attached.clone(),
                fresh,
            }),
            Err(e) => {
                warn!(error = %e, "reconcile failed");
                Err(e)
            }
        }
    }

    async fn apply_desired(&self) -> Result<ApplyReport, String> {
        let Some(mut state) = lock(&self.desired).clone() else {
            // Nothing known yet: keep whatever the maps hold (a restart keeps forwarding).
            return Ok(ApplyReport::default());
        };
        let local = LocalNode {
            name: self.node().to_string(),
            vtep: lock(&self.underlay).vtep,
        };
        if !self
            .adopted
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            gc::adopt_unrecorded(&self.handle, self.node(), &self.local, &state.endpoints).await;
        }
        // This node forwards for the endpoints it recorded creating, with the values it
        // recorded and the veth name generated from them: a store entry naming this node
        // only says whether it is still wanted, never which interface or address to use.
        let records = self.local_records();
        let node = self.node().to_string();
        state.endpoints = std::mem::take(&mut state.endpoints)
            .into_iter()
            .filter_map(|e| {
                if e.node != node {
                    return Some(e);
                }
                let record = records.get(&(e.network.clone(), e.id.clone()))?;
                if !record.in_use() {
                    return None;
                }
                let mut mine = record.endpoint.clone()?;
                mine.node = node.clone();
                mine.ifname = record.host_ifname();
                Some(mine)
            })
            .collect();
        let wanted: std::collections::BTreeSet<String> = state
            .local_endpoints(self.node())
            .map(|e| e.ifname.clone())
            .collect();
        let links = gc::list_links_retrying(&self.handle)
            .await
            .map_err(|e| e.to_string())?;
        *lock(&self.links) = links.iter().map(|l| l.name.clone()).collect();
        let mut veths = BTreeMap::new();
        let mut veth_names = BTreeMap::new();
        for link in links.into_iter().filter(|l| wanted.contains(&l.name)) {
            veth_names.insert(link.index, link.name.clone());
            veths.insert(
                link.name,
                HostVeth {
                    ifindex: link.index,
                    mac: link.mac,
                },
            );
        }
        let plan = reconcile::plan(&state, &local, &veths);
        let (report, attached_now) = {
            let mut guard = lock(&self.datapath);
            let datapath = guard.as_mut().ok_or("the agent is stopping")?;
            let report = reconcile::apply(datapath, &plan.maps, &veth_names)
                .map_err(|e| reconcile::error_chain(&e))?;
            let attached: std::collections::BTreeSet<u32> =
                datapath.attached_containers().collect();
            (report, attached)
        };
        {
            let mut health = lock(&self.health);
            health.members = state.nodes.len();
            health.local_endpoints = plan.maps.local_ifaces.len();
            health.remote_endpoints = plan.maps.endpoints.len() - plan.maps.local_ifaces.len();
            self.metrics.set_endpoints_known(
                health.local_endpoints as u64,
                health.remote_endpoints as u64,
            );
            self.metrics.set_members_known(health.members as u64);
            // Only what the data plane really forwards for (an endpoint whose entries
            // did not fit in the maps is not attached).
            health.attached = state
                .local_endpoints(self.node())
                .filter(|e| {
                    veths
                        .get(&e.ifname)
                        .is_some_and(|v| attached_now.contains(&v.ifindex))
                })
                .map(|e| format!("{}/{}", e.network, e.id))
                .collect();
        }
        // A local endpoint whose veth is gone: a completed `attach` whose container ended
        // is collected now; one whose `run`/`attach` process lives is left to that
        // process, which removes it itself (one owner for every clean-up).
        for stale in &plan.missing_veths {
            let Some(record) = records.get(&(stale.network.clone(), stale.id.clone())) else {
                continue;
            };
            if let Some(why) = gc::left_over(record, false) {
                self.collect_local(record, why).await;
            }
        }
        Ok(report)
    }

    /// This node's valid local records by (network, id); unreadable ones are logged.
    fn local_records(&self) -> BTreeMap<(String, String), local_state::LocalEndpoint> {
        let (records, unreadable) = self.local.load_all();
        for e in unreadable {
            debug!(error = %e, "ignoring an unreadable local record");
        }
        records
            .into_iter()
            .map(|r| ((r.network.clone(), r.id.clone()), r))
            .collect()
    }

    async fn collect_local(&self, record: &local_state::LocalEndpoint, why: &str) {
        if lock(&self.identity).trust() == Trust::Foreign {
            // Its entries are in this cluster's store, not in the one answering now.
            debug!(network = %record.network, endpoint = %record.id, "left-over kept until the store is this cluster's again");
            return;
        }
        match gc::collect_local(
            &self.store,
            &self.handle,
            self.node(),
            &self.local,
            record,
            why,
        )
        .await
        {
            Ok(()) => self
                .metrics
                .record_collected(gc::Kind::LocalEndpoint.name()),
            Err(e) => {
                warn!(network = %record.network, endpoint = %record.id, error = %e, "cannot collect a left-over local endpoint yet; retrying next period")
            }
        }
    }

    /// Judges one full read of the store against the cluster id ([`crate::store::identity`]):
    /// the state to apply, or `None` to keep the maps as they are.
    fn judge(&self, pairs: &[crate::store::consul::KvPair]) -> Option<ClusterState> {
        let prefix = self.store.prefix();
        let read = self.ingest(pairs);
        let found = identity::find(prefix, pairs);
        let (judgement, actions, trust) = {
            let mut identity = lock(&self.identity);
            let (judgement, actions) = identity.judge(found, read, Instant::now());
            (judgement, actions, identity.trust())
        };
        self.metrics.set_store_state(trust.name());
        if let Some(id) = actions.restore {
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = identity::restore(&store, &id).await {
                    warn!(error = %e, "cannot restore the cluster id yet");
                }
            });
        }
        if actions.republish {
            self.republish.notify_one();
            self.reregister.notify_one();
        }
        match judgement {
            Judgement::Apply(state) => Some(state),
            Judgement::Hold => None,
        }
    }

    // ---- tasks ----

    /// Follows every change under the prefix with blocking queries.
    async fn watch_loop(self: Arc<Self>) {
        let mut watch = KvWatch::new(
            self.store.client().clone(),
            self.store.prefix(),
            self.options.watch_wait,
        );
        let mut acknowledged = 0;
        let mut acknowledged_state: Option<ClusterState> = None;
        loop {
            match watch.next().await {
                Ok((pairs, index)) => {
                    self.consul_ok();
                    let Some(state) = self.judge(&pairs) else {
                        continue;
                    };
                    let changed = {
                        let mut desired = lock(&self.desired);
                        let changed = desired.as_ref() != Some(&state);
                        if changed {
                            *desired = Some(state);
                        }
                        changed
                    };
                    let applied = if changed {
                        debug!(index, "cluster state changed");
                        self.reconcile(false).await.is_ok()
                    } else {
                        self.ack_pending.swap(false, Ordering::SeqCst)
                    };
                    // An acknowledgement is itself a write under the prefix: one for a
                    // state already acknowledged would only cause another.
                    let current = lock(&self.desired).clone();
                    if applied && index > acknowledged && current != acknowledged_state {
                        // Lets `run` (and benchmarks) see when every node forwards for a
                        // new endpoint.
                        match self.store.put_applied(self.node(), index).await {
                            Ok(()) => {
                                acknowledged = index;
                                acknowledged_state = current;
                            }
                            Err(e) => debug!(error = %e, "cannot record the applied index"),
                        }
                    }
                }
                Err(e) => self.consul_failed("watch", &e),
            }
        }
    }

    /// Collects what crashed commands and outages left ([`crate::agent::gc`]): local records
    /// without a live owner at once, store entries after the grace period, and the latter
    /// only while the store is trusted.
    async fn gc_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.options.gc_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.gc_pass().await;
            self.metrics.record_gc_run();
        }
    }

    /// One collection pass (see [`Agent::gc_loop`]).
    async fn gc_pass(&self) {
        let records = self.local_records();
        let links: std::collections::BTreeSet<String> =
            match gc::list_links_retrying(&self.handle).await {
                Ok(links) => links.into_iter().map(|l| l.name).collect(),
                Err(e) => {
                    warn!(error = %e, "gc: cannot list interfaces");
                    return;
                }
            };
        for record in records.values() {
            let veth = links.contains(&record.host_ifname());
            if let Some(why) = gc::left_over(record, veth) {
                let _one_at_a_time = self.reconcile_lock.lock().await;
                self.collect_local(record, why).await;
            }
        }
        if !lock(&self.identity).trust().allows_gc() {
            return;
        }
        let Some(listed) = lock(&self.desired).as_ref().map(|state| {
            state
                .local_endpoints(self.node())
                .map(|e| (e.network.clone(), e.id.clone()))
                .collect::<std::collections::BTreeSet<_>>()
        }) else {
            // Nothing read from the store yet.
            return;
        };
        let unlisted: Vec<local_state::LocalEndpoint> = self
            .sweeper
            .lock()
            .await
            .unlisted_attachments(
                records.values(),
                &listed,
                Instant::now(),
                self.options.gc_grace,
            )
            .into_iter()
            .cloned()
            .collect();
        for record in &unlisted {
            let _one_at_a_time = self.reconcile_lock.lock().await;
            self.collect_local(record, "its endpoint entry was removed from the store")
                .await;
        }
        let swept = {
            let mut sweeper = self.sweeper.lock().await;
            sweeper
                .sweep(&self.store, self.node(), &self.local, self.options.gc_grace)
                .await
        };
        match swept {
            Ok(collected) => {
                for kind in collected {
                    self.metrics.record_collected(kind.name());
                }
            }
            Err(e) => debug!(error = %e, "gc: cannot sweep the store now"),
        }
    }

    /// Writes this node's records back into a store that was restored after losing them.
    async fn republish_loop(self: Arc<Self>) {
        loop {
            self.republish.notified().await;
            let mut pause = Duration::from_millis(200);
            loop {
                let last = lock(&self.identity).last_trusted().cloned();
                match identity::republish(&self.store, self.node(), &self.local, last.as_ref())
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        warn!(error = %e, "cannot republish this node's records yet");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// Keeps `status` honest within about a second: one quick read of this node's key
    /// (short timeout, no retries) tells whether the store answers and still holds the
    /// key under this node's session.
    async fn probe_loop(self: Arc<Self>) {
        let probe = self
            .store
            .client()
            .clone()
            .with_retry(crate::store::consul::RetryPolicy::none())
            .with_timeout(PROBE_TIMEOUT);
        let key = format!("{}{}", self.store.nodes_prefix(), self.node());
        let mut ticker = tokio::time::interval(PROBE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match probe.get(&key).await {
                Ok(pair) => {
                    self.consul_ok();
                    let mut health = lock(&self.health);
                    let held =
                        pair.is_some_and(|p| p.session.is_some() && p.session == health.session);
                    if health.registered && !held {
                        warn!("this node's key is gone or no longer held by its session: not registered");
                        self.reregister.notify_one();
                    }
                    health.registered = held;
                }
                Err(e) => {
                    self.consul_failed("probe", &e);
                    lock(&self.health).registered = false;
                }
            }
        }
    }

    /// Full resync on a timer: catches map drift and anything a watch may have missed.
    async fn resync_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.options.resync_interval);
        loop {
            ticker.tick().await;
            let _ = self.reconcile(true).await;
        }
    }

    /// Keeps this node in the cluster: a session (reused across agent restarts through
    /// the state directory, so peers never see the node leave), the node key held by it,
    /// and renewals well within the TTL. Lost sessions are replaced; outages retried.
    async fn membership_loop(self: Arc<Self>) {
        let mut session: Option<String> = std::fs::read_to_string(self.session_file())
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let mut registered = false;
        let mut bootstrapped = !self.options.bootstrap;
        let renew_every = (self.options.session_ttl / 3).max(Duration::from_millis(200));
        loop {
            let step = self
                .membership_step(&mut session, &mut registered, &mut bootstrapped)
                .await;
            let step_ok = step.is_ok();
            let pause = match step {
                Ok(()) => renew_every,
                Err(e) => {
                    if let MembershipError::Consul(ref e) = e {
                        self.consul_failed("membership", e);
                    } else {
                        warn!(error = %e, "cannot join the cluster yet");
                    }
                    Duration::from_secs(1).min(renew_every)
                }
            };
            {
                let mut health = lock(&self.health);
                health.session = session.clone();
                // Unknown while the store does not answer: not claimed as registered.
                health.registered = registered && step_ok;
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.reregister.notified() => registered = false,
            }
        }
    }

    async fn membership_step(
        &self,
        session: &mut Option<String>,
        registered: &mut bool,
        bootstrapped: &mut bool,
    ) -> Result<(), MembershipError> {
        let client = self.store.client();
        if let Some(id) = session.clone() {
            if !client.session_renew(&id).await? {
                warn!(session = %id, "session expired (agent or Consul was away longer than its TTL); rejoining");
                *session = None;
                *registered = false;
            }
        }
        if session.is_none() {
            let id = client
                .session_create(
                    &format!("overlay-node:{}", self.node()),
                    self.options.session_ttl,
                    SessionBehavior::Delete,
                    Duration::ZERO,
                )
                .await?;
            if let Err(e) = local_state::write_private_file(&self.session_file(), id.as_bytes()) {
                warn!(error = %e, "cannot save the session ID; a restart will rejoin with a new one");
            }
            *session = Some(id);
            *registered = false;
        }
        self.consul_ok();
        let id = session.clone().unwrap_or_default();
        if *registered {
            // The key may have gone (deleted by hand, a Consul that lost its state).
            let held = self
                .store
                .client()
                .get(&format!("{}{}", self.store.nodes_prefix(), self.node()))
                .await?
                .is_some_and(|pair| pair.session.as_deref() == Some(id.as_str()));
            if !held {
                warn!("this node's key is gone; registering again");
                *registered = false;
            }
        }
        if !*registered && lock(&self.identity).trust() == Trust::Foreign {
            // Never write this node into another cluster's store.
            return Ok(());
        }
        if !*registered {
            let info = {
                let underlay = lock(&self.underlay);
                NodeInfo {
                    name: self.node().to_string(),
                    vtep: underlay.vtep,
                    iface: underlay.link.name.clone(),
                }
            };
            self.store.register_node(&id, &info).await?;
            *registered = true;
            info!(node = %info.name, vtep = %info.vtep, session = %id, "joined the cluster");
        }
        if !*bootstrapped {
            if self.store.bootstrap().await? {
                info!("bootstrapped the cluster: network \"default\" created");
            }
            let known = lock(&self.identity).cluster().cloned();
            identity::ensure_cluster_id(&self.store, known.as_ref()).await?;
            *bootstrapped = true;
        }
        Ok(())
    }

    /// Summarises traffic in the log when counters moved.
    async fn stats_loop(self: Arc<Self>) {
        let mut last: BTreeMap<(u32, Counter), CounterValue> = BTreeMap::new();
        let mut ticker = tokio::time::interval(self.options.stats_interval);
        loop {
            ticker.tick().await;
            let now = match lock(&self.datapath).as_ref().map(|d| d.counters()) {
                Some(Ok(now)) => now,
                Some(Err(e)) => {
                    warn!(error = %e, "cannot read counters");
                    continue;
                }
                None => return,
            };
            let (mut forwarded, mut dropped) = (0u64, 0u64);
            for (key, value) in &now {
                let before = last.get(key).copied().unwrap_or_default();
                let delta = value.packets.saturating_sub(before.packets);
                if delta > 0 {
                    debug!(
                        vni = key.0,
                        counter = key.1.name(),
                        packets = value.packets,
                        bytes = value.bytes,
                        "counter"
                    );
                }
                if key.1.is_drop() {
                    dropped += delta;
                } else {
                    forwarded += delta;
                }
            }
            if forwarded + dropped > 0 && !last.is_empty() {
                info!(
                    forwarded,
                    dropped, "traffic since the last report (packets)"
                );
            }
            last = now;
        }
    }

    // ---- control socket ----

    async fn control_loop(self: Arc<Self>, listener: UnixListener) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let agent = self.clone();
                        connections.spawn(async move { agent.serve_control(stream).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn serve_control(&self, stream: UnixStream) {
        let mut stream = BufReader::new(stream);
        if !control::peer_is_trusted(stream.get_ref()) {
            let refused =
                Err("the control socket is root's (and the agent's user's) only".to_string());
            let _ = control::write_reply::<()>(&mut stream, refused).await;
            return;
        }
        let request = control::read_request(&mut stream).await;
        let _ = match request {
            Err(e) => control::write_reply::<()>(&mut stream, Err(e)).await,
            Ok(Request::Status) => control::write_reply(&mut stream, Ok(self.status())).await,
            Ok(Request::Reconcile) => {
                let reply = self.reconcile(true).await;
                control::write_reply(&mut stream, reply).await
            }
            Ok(Request::Bind { iface }) => {
                let reply = self.bind(&iface).await;
                control::write_reply(&mut stream, reply).await
            }
            Ok(Request::Logs { lines, follow }) => self.stream_logs(stream, lines, follow).await,
        };
    }

    async fn stream_logs(
        &self,
        mut stream: BufReader<UnixStream>,
        lines: usize,
        follow: bool,
    ) -> io::Result<()> {
        control::write_reply(&mut stream, Ok(())).await?;
        let (recent, mut live) = self.logs.follow(lines);
        let out = stream.get_mut();
        for line in recent {
            out.write_all(format!("{line}\n").as_bytes()).await?;
        }
        if !follow {
            return Ok(());
        }
        loop {
            use tokio::sync::broadcast::error::RecvError;
            let line = match live.recv().await {
                Ok(line) => line,
                Err(RecvError::Lagged(n)) => format!("... {n} lines skipped (reader too slow)"),
                Err(RecvError::Closed) => return Ok(()),
            };
            out.write_all(format!("{line}\n").as_bytes()).await?;
        }
    }

    fn status(&self) -> AgentStatus {
        let (iface, ifindex, vtep, decap, host_changes) = {
            let u = lock(&self.underlay);
            (
                u.link.name.clone(),
                u.link.index,
                u.vtep,
                u.setup.clone(),
                u.host_changes.clone(),
            )
        };
        let (programs, maps) = {
            let mut guard = lock(&self.datapath);
            match guard.as_mut() {
                Some(datapath) => (
                    datapath
                        .program_ids()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                    datapath
                        .map_occupancy()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(name, entries, capacity)| MapUsage {
                            name: name.to_string(),
                            entries,
                            capacity,
                        })
                        .collect(),
                ),
                None => Default::default(),
            }
        };
        let identity = lock(&self.identity);
        let health = lock(&self.health);
        AgentStatus {
            node: self.node().to_string(),
            pid: std::process::id(),
            iface,
            ifindex,
            vtep: Some(vtep),
            xdp_mode: format!("{:?}", self.options.xdp_mode).to_lowercase(),
            decap,
            host_changes,
            tc_attach: if datapath::tcx_supported() {
                "tcx".into()
            } else {
                "clsact (netlink)".into()
            },
            pin_root: self.options.pin_root.display().to_string(),
            programs,
            maps,
            consul: ConsulStatus {
                addr: self.store.client().addr().to_string(),
                prefix: self.store.prefix().to_string(),
                reachable: health.consul_reachable,
                last_error: health.consul_error.clone(),
                session: health.session.clone(),
                registered: health.registered,
            },
            last_reconcile: health.last_reconcile.clone(),
            members: health.members,
            local_endpoints: health.local_endpoints,
            remote_endpoints: health.remote_endpoints,
            attached: health.attached.clone(),
            metrics_addr: self.options.metrics_addr.clone(),
            docker_plugin: (self.options.docker_plugin.as_ref()).map(|p| p.display().to_string()),
            rejected_records: health.rejected_records,
            store_trust: identity.trust().name().to_string(),
            store_detail: identity.detail().map(str::to_string),
            cluster_id: identity.cluster().map(|c| c.cluster.clone()),
        }
    }

    /// Moves the underlay to `iface` at runtime: the XDP program, the underlay settings,
    /// this node's VTEP in the maps and in its cluster entry.
    async fn bind(&self, iface: &str) -> Result<BindReply, String> {
        let link = netlink::link_by_name(&self.handle, iface)
            .await
            .map_err(|e| e.to_string())?;
        let vtep = netlink::first_ipv4(&self.handle, &link)
            .await
            .map_err(|e| e.to_string())?;
        let setup = {
            let mut guard = lock(&self.datapath);
            let datapath = guard.as_mut().ok_or("the agent is stopping")?;
            underlay::attach(
                datapath,
                &link,
                vtep,
                self.options.decap,
                self.options.xdp_mode,
            )
            .map_err(|e| e.to_string())?
        };
        let reply = BindReply {
            iface: link.name.clone(),
            ifindex: link.index,
            vtep,
        };
        let old = {
            let mut current = lock(&self.underlay);
            let host_changes = std::mem::take(&mut current.host_changes);
            std::mem::replace(
                &mut *current,
                Underlay {
                    link,
                    vtep,
                    setup,
                    host_changes,
                },
            )
        };
        info!(from = %old.link.name, to = %reply.iface, %vtep, "underlay moved");
        self.reregister.notify_one();
        self.reconcile(false).await?;
        Ok(reply)
    }

    async fn stop(&self) {
        let datapath = lock(&self.datapath).take();
        let _ = std::fs::remove_file(control::socket_path(&self.options.state_dir));
        if !self.options.ephemeral {
            if let Some(datapath) = datapath {
                datapath.release();
            }
            info!("stopped; the data plane stays attached and pinned (a restart takes over without interrupting traffic)");
            return;
        }
        let session = lock(&self.health).session.clone();
        if let Some(id) = session {
            // Behavior=delete: the node key goes with it, peers drop this node now.
            if let Err(e) = self.store.client().session_destroy(&id).await {
                warn!(error = %e, "cannot leave the cluster cleanly; peers drop this node when its session TTL expires");
            }
        }
        let _ = std::fs::remove_file(self.session_file());
        // A node that left may join another cluster next time.
        let _ = std::fs::remove_file(self.options.state_dir.join(identity::CLUSTER_ID_FILE));
        drop(datapath);
        underlay::restore(&lock(&self.underlay).host_changes);
        if let Err(e) = datapath::remove_pins(&self.options.pin_root) {
            warn!(error = %e, "cannot remove pins");
        }
        info!("stopped; left the cluster, detached and removed the pins");
    }
}

#[derive(Debug, thiserror::Error)]
enum MembershipError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for MembershipError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Consul(e) => Self::Consul(e),
            other => Self::Store(other),
        }
    }
}
