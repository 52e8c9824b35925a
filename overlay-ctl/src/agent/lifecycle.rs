//! The agent's life: [`run`] binds its sockets, loads and attaches the data plane, builds
//! the shared [`Agent`] and spawns its tasks (control socket, membership, watch, resync,
//! stats, collection, republish, probe, and the optional metrics and kernel-log servers)
//! and starts its [`Companion`]s (servers of other roles, e.g. the Docker driver, that
//! live as long as the agent); on shutdown it stops them and either keeps the data plane
//! pinned or, for an `--ephemeral` agent, leaves the cluster and removes everything.
use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{UnixListener, UnixStream},
    sync::{watch as channel, Notify},
    task::JoinSet,
};
use tracing::{info, warn};

use super::{
    control, local_state, lock, metrics, status::LiveStatus, Agent, AgentError, AgentOptions,
    ClusterView, Plane, Underlay, KERNEL_LOG_TARGET,
};
use crate::{
    agent::{local_state::LocalState, logs::LogBuffer, metrics::ControlPlaneMetrics},
    dataplane::datapath::{self, Datapath},
    dataplane::forwarding::{DataPlane, DataplaneMode, MemoryMaps},
    dataplane::netlink,
    dataplane::underlay,
    store::identity::{self, Identity},
    store::Store,
};

/// Where the agent keeps its session ID (reused across restarts).
pub(super) const SESSION_FILE: &str = "session";

type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// A server of another role that lives as long as the agent (the Docker driver is one):
/// started once the agent holds its control socket and data plane (so a second agent
/// that refuses to start never touches it), stopped with the agent's tasks. The agent
/// knows nothing else about it, which keeps the dependency pointing from the runtimes
/// to the agent.
pub trait Companion: Send {
    /// Binds what it serves and spawns its task on `tasks`.
    fn start(
        &mut self,
        tasks: &mut JoinSet<()>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// Removes what `start` created; called after its task stopped.
    fn stop(&mut self);
}

/// Runs the agent (and its `companions`) until `shutdown` completes.
pub async fn run(
    options: AgentOptions,
    store: Store,
    logs: LogBuffer,
    mut companions: Vec<Box<dyn Companion>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let listener = bind_control_socket(&options.state_dir).await?;
    let metrics_listener = match &options.metrics_addr {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let handle = netlink::connect()?;
    let (plane, kernel_logger) = match options.dataplane {
        DataplaneMode::Bpf => attach_data_plane(&handle, &options).await?,
        DataplaneMode::None => (control_plane_only(&options)?, None),
    };
    let mirror = super::mirror::Mirror::new(store.prefix());
    let agent = Arc::new(Agent {
        store,
        handle,
        plane: Mutex::new(plane),
        cluster: Mutex::new(ClusterView::default()),
        mirror: Mutex::new(mirror),
        identity: Mutex::new(Identity::load(
            &options.state_dir,
            (options.session_ttl * 3).max(Duration::from_secs(10)),
        )),
        status: channel::Sender::new(LiveStatus::default()),
        metrics: ControlPlaneMetrics::default(),
        reconciler: Default::default(),
        fetching: Default::default(),
        collector: Default::default(),
        reregister: Notify::new(),
        republish: Notify::new(),
        feed_stale: Notify::new(),
        feed_check: Default::default(),
        logs,
        local: LocalState::new(&options.state_dir),
        egress: Default::default(),
        names: super::names::NameService::new(&options.names),
        options,
    });

    let mut tasks = JoinSet::new();
    agent.spawn_loops(&mut tasks, listener);
    if let Some(logger) = kernel_logger {
        tasks.spawn(forward_kernel_logs(logger));
    }
    if let Some(listener) = metrics_listener {
        let scraped = agent.clone();
        let render: metrics::RenderFn = Arc::new(move || scraped.render_metrics());
        info!(addr = ?listener.local_addr().ok(), "serving Prometheus metrics on /metrics");
        tasks.spawn(metrics::serve(listener, render, std::future::pending()));
    }
    for companion in &mut companions {
        companion.start(&mut tasks).map_err(AgentError::Companion)?;
    }
    info!(store = %agent.store.describe(), prefix = %agent.store.prefix(), "agent running; Ctrl-C to stop");

    shutdown.await;
    tasks.shutdown().await;
    for companion in &mut companions {
        companion.stop();
    }
    agent.stop().await;
    Ok(())
}

/// Finds the underlay, turns forwarding on, loads the programs (and the kernel log
/// reader when asked) and attaches them to the underlay.
async fn attach_data_plane(
    handle: &rtnetlink::Handle,
    options: &AgentOptions,
) -> Result<(Plane, Option<KernelLogger>), AgentError> {
    let link = match &options.iface {
        Some(name) => netlink::link_by_name(handle, name).await?,
        None => {
            info!(
                "identifying the underlay interface from the default route (use --iface to choose)"
            );
            netlink::default_route_link(handle).await?
        }
    };
    let vtep = netlink::first_ipv4(handle, &link).await?;
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
        datapath
            .kernel_logger()
            .inspect_err(|e| warn!(error = %e, "kernel-side logs unavailable"))
            .ok()
    } else {
        None
    };
    let setup = underlay::attach(&mut datapath, &link, vtep, options.decap, options.xdp_mode)?;
    info!(
        programs = ?datapath.program_ids(),
        pins = %options.pin_root.display(),
        "data plane attached and pinned"
    );
    let underlay = Underlay {
        link,
        vtep,
        setup,
        host_changes,
    };
    let plane = Plane {
        datapath: Some(DataPlane::Bpf(datapath)),
        underlay,
    };
    Ok((plane, kernel_logger))
}

/// The name a control-plane-only agent registers as its underlay interface.
const NO_UNDERLAY_IFACE: &str = "none";
/// The underlay MTU a control-plane-only agent registers (Ethernet's).
const NO_UNDERLAY_MTU: u32 = 1500;

/// `--dataplane none`: maps in memory and an underlay that is only the VTEP address to
/// register; nothing on the host is touched.
fn control_plane_only(options: &AgentOptions) -> Result<Plane, AgentError> {
    let vtep = options.vtep.ok_or(AgentError::NoVtep)?;
    info!(node = %options.node, %vtep, "no data plane (--dataplane none): the control plane only, maps in memory");
    let link = netlink::LinkInfo {
        name: NO_UNDERLAY_IFACE.to_string(),
        index: 0,
        mtu: NO_UNDERLAY_MTU,
        mac: Default::default(),
        kind: None,
    };
    let setup = underlay::UnderlaySetup {
        decap_hook: "none".to_string(),
        reason: "--dataplane none".to_string(),
    };
    Ok(Plane {
        datapath: Some(DataPlane::Memory(MemoryMaps::default())),
        underlay: Underlay {
            link,
            vtep,
            setup,
            host_changes: Vec::new(),
        },
    })
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

/// Copies the kernel programs' aya-log records into the agent's log as they arrive.
async fn forward_kernel_logs(logger: KernelLogger) {
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

/// Removes a file the agent made; one that is already gone is fine.
fn remove_file_logged(path: &Path, what: &str) {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            warn!(path = %path.display(), error = %e, "cannot remove {what}")
        }
        _ => {}
    }
}

impl Agent {
    pub(super) fn session_file(&self) -> PathBuf {
        self.options.state_dir.join(SESSION_FILE)
    }

    /// The agent's long-running tasks (each loops until the agent stops).
    fn spawn_loops(self: &Arc<Self>, tasks: &mut JoinSet<()>, control: UnixListener) {
        tasks.spawn(self.clone().control_loop(control));
        tasks.spawn(self.clone().membership_loop());
        tasks.spawn(self.clone().watch_loop());
        tasks.spawn(self.clone().resync_loop());
        if self.has_host() {
            // Traffic counters, this host's left-over containers and the next hops
            // towards the VTEPs: nothing of them without a data plane.
            tasks.spawn(self.clone().stats_loop());
            tasks.spawn(self.clone().gc_loop());
            tasks.spawn(self.clone().next_hop_loop());
        }
        tasks.spawn(self.clone().republish_loop());
        tasks.spawn(self.clone().probe_loop());
    }

    async fn stop(&self) {
        if let Some(names) = &self.names {
            names.shutdown().await;
        }
        let datapath = lock(&self.plane).datapath.take();
        remove_file_logged(
            &control::socket_path(&self.options.state_dir),
            "the control socket",
        );
        if !self.options.ephemeral {
            if let Some(DataPlane::Bpf(datapath)) = datapath {
                datapath.release();
            }
            info!("stopped; the data plane stays attached and pinned (a restart takes over without interrupting traffic)");
            return;
        }
        let session = self.status.borrow().session.clone();
        if let Some(id) = session {
            // Behavior=delete: the node key goes with it, peers drop this node now.
            if let Err(e) = self.store.session_destroy(&id).await {
                warn!(error = %e, "cannot leave the cluster cleanly; peers drop this node when its session TTL expires");
            }
        }
        remove_file_logged(&self.session_file(), "the session file");
        // A node that left may join another cluster next time.
        remove_file_logged(
            &self.options.state_dir.join(identity::CLUSTER_ID_FILE),
            "the cluster id file",
        );
        drop(datapath);
        if !self.has_host() {
            info!("stopped; left the cluster");
            return;
        }
        self.remove_egress();
        underlay::restore(&lock(&self.plane).underlay.host_changes);
        if let Err(e) = datapath::remove_pins(&self.options.pin_root) {
            warn!(error = %e, "cannot remove pins");
        }
        info!("stopped; left the cluster, detached and removed the pins");
    }
}
