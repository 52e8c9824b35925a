//! Joining a container to an overlay network and removing it again, the steps every
//! runtime shares: [`validate`] (everything checked before anything changes),
//! [`join_validated`] (an address from IPAM, the veth pair into the container's network
//! namespace, the endpoint in the cluster state, the local agent told to forward for it
//! at once) and [`leave`]. The lifecycle around them (the local record first, commit or
//! teardown) is [`crate::runtimes::session`]'s.
//!
//! Every step that changes something is undone when a later one fails, so a refused or
//! failed join leaves no address, endpoint or veth behind.
use std::{net::Ipv4Addr, path::PathBuf};

use tracing::{info, warn};

use crate::{
    agent::control::{AgentClient, AgentStatus, ControlError},
    agent::local_state::{LocalEndpoint, LocalState, LocalStateError},
    dataplane::endpoint::{self, EndpointError, EndpointSpec},
    dataplane::netlink::{self, NetlinkError},
    dataplane::netns::NetNs,
    store::consul::ConsulError,
    store::ipam,
    store::{Endpoint, Network, Store, StoreError},
};

/// The interface name a `run` container sees.
pub const CONTAINER_IFNAME: &str = "eth0";
/// The interface name an attached (existing) container gets, next to its own.
pub const ATTACH_IFNAME: &str = "ovl0";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Agent(#[from] ControlError),
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Local(#[from] LocalStateError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network {0:?} does not exist (see `overlay-ctl network list`)")]
    NoSuchNetwork(String),
    #[error("the agent has not attached endpoint {0}; see `overlay-ctl agent logs`")]
    NotAttached(String),
    #[error("no endpoint {id:?} on network {network:?}")]
    NoSuchEndpoint { network: String, id: String },
    #[error(
        "endpoint {id:?} lives on node {node:?}, not on this node ({local:?}): detach it there"
    )]
    WrongNode {
        id: String,
        node: String,
        local: String,
    },
    #[error("agent has no VTEP address yet")]
    NoVtep,
    #[error("the endpoint has no address yet")]
    NoAddress,
    #[error("cannot register service {service:?}")]
    Service {
        service: String,
        #[source]
        source: StoreError,
    },
    #[error("invalid container name {id:?}")]
    InvalidName {
        id: String,
        #[source]
        source: ipam::IpamError,
    },
    #[error("no endpoint on network {network:?} was attached with {netns}")]
    NotAttachedWith { network: String, netns: String },
    #[error("name the endpoint, or pass --netns or --pid")]
    NoTarget,
    #[error("cannot remove the container's endpoint")]
    Teardown(#[source] Box<ContainerError>),
}

pub type Result<T, E = ContainerError> = std::result::Result<T, E>;

/// What every container operation needs: the cluster state, the local agent and this
/// node's own records of the endpoints it created.
pub struct Context {
    pub store: Store,
    pub agent: AgentClient,
    pub status: AgentStatus,
    pub local: LocalState,
}

pub use crate::store::ipam::{host_ifname, run_netns_name};

/// A random endpoint ID for containers started without `--name`.
pub fn random_id() -> String {
    let mut bytes = [0u8; 4];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if read.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes = (nanos ^ std::process::id().rotate_left(16)).to_be_bytes();
    }
    format!(
        "c{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// How to join a container's namespace.
pub struct JoinSpec<'a> {
    pub network: &'a str,
    pub id: &'a str,
    pub ip: Option<Ipv4Addr>,
    pub container_ifname: &'a str,
    /// What the container is (a command, a netns path), recorded in the endpoint.
    pub container: Option<String>,
    /// Joining an existing namespace that may already route elsewhere.
    pub keep_existing_default_route: bool,
    /// The `/run/netns` name of a namespace `run` created (removed with the container).
    pub netns_name: Option<String>,
}

/// An endpoint plumbed and forwarded for by the local data plane.
#[derive(Debug, Clone)]
pub struct Joined {
    pub endpoint: Endpoint,
    pub network: Network,
}

/// Where the container end of a new endpoint's veth goes.
#[derive(Clone, Copy)]
pub enum Target<'a> {
    /// Into this namespace, addressed and routed.
    Netns(&'a NetNs),
    /// Nowhere: it stays in the host's namespace, named [`endpoint::peer_ifname`], for
    /// the runtime to move and address (Docker). With `preallocated`, `spec.ip` is
    /// already held in the cluster IPAM under `spec.id` by this node (Docker's IPAM
    /// driver took it), and releasing it is the runtime's (it is not released on failure).
    Handoff { preallocated: bool },
}

/// Everything a join checks before it changes anything: the names, the network, the
/// requested address, a free endpoint name, this node's VTEP and the maps' capacity.
/// Returns the network to join. Done once per join, by
/// [`crate::runtimes::session::EndpointSession::begin`] before its first write.
pub async fn validate(ctx: &Context, spec: &JoinSpec<'_>) -> Result<Network> {
    ipam::validate_name(spec.id).map_err(StoreError::from)?;
    let network = ctx
        .store
        .get_network(spec.network)
        .await?
        .ok_or_else(|| ContainerError::NoSuchNetwork(spec.network.to_string()))?;
    if let Some(ip) = spec.ip {
        ipam::validate_address(network.subnet, network.gateway, ip).map_err(StoreError::from)?;
    }
    if ctx
        .store
        .get_endpoint(spec.network, spec.id)
        .await?
        .is_some()
    {
        return Err(StoreError::EndpointExists {
            network: spec.network.to_string(),
            id: spec.id.to_string(),
        }
        .into());
    }
    // The VTEP is not recorded with the endpoint (see `store::Endpoint`), but an agent
    // without one is not ready to forward for it.
    ctx.status.vtep.ok_or(ContainerError::NoVtep)?;
    check_capacity(ctx).await?;
    Ok(network)
}

/// Plumbs a container into `network` (checked by [`validate`]): allocates, plumbs,
/// records the endpoint and has the agent attach it. Undoes its steps on failure.
///
/// `record` is this node's local record of the endpoint, created before anything else
/// (see [`crate::runtimes::session`]); every step is written to it before the next one
/// starts, so whatever a kill leaves behind, the agent can find and collect. On failure
/// the record is left to the caller (it is emptied only when the undo completed).
pub async fn join_validated(
    ctx: &Context,
    network: Network,
    target: Target<'_>,
    spec: &JoinSpec<'_>,
    record: &mut LocalEndpoint,
) -> Result<Joined> {
    let preallocated = matches!(target, Target::Handoff { preallocated: true });
    let ip = match (preallocated, spec.ip) {
        (true, Some(ip)) => held_address(ctx, spec, ip).await?,
        _ => {
            ctx.store
                .allocate_ip(spec.network, spec.ip, spec.id, &ctx.status.node)
                .await?
        }
    };
    let mut undo = Undo::new(ctx, spec.network, ip);
    if preallocated {
        undo.ip = None;
    }
    record.ip = Some(ip);
    let result = match ctx.local.update(record) {
        Ok(()) => {
            crate::testhook::pause("allocated");
            plumb_and_publish(ctx, &network, target, spec, record, &mut undo).await
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(endpoint) => {
            undo.disarm();
            info!(network = %spec.network, endpoint = %spec.id, %ip, "endpoint attached");
            Ok(Joined { endpoint, network })
        }
        Err(e) => {
            if undo.run().await {
                record.ip = None;
                record.endpoint = None;
            }
            Err(e)
        }
    }
}

/// The steps of a join after the address (`record.ip`): the veth, the endpoint record
/// (locally first, then in the store) and the agent's attachment. Each step that
/// changed something is noted in `undo`.
async fn plumb_and_publish(
    ctx: &Context,
    network: &Network,
    target: Target<'_>,
    spec: &JoinSpec<'_>,
    record: &mut LocalEndpoint,
    undo: &mut Undo<'_>,
) -> Result<Endpoint> {
    let ip = record.ip.ok_or(ContainerError::NoAddress)?;
    let endpoint_spec = EndpointSpec {
        host_ifname: host_ifname(spec.network, spec.id),
        container_ifname: spec.container_ifname.to_string(),
        ip,
        subnet: network.subnet,
        gateway: network.gateway,
        mac: endpoint::mac_for(ip),
        mtu: network.mtu,
        keep_existing_default_route: spec.keep_existing_default_route,
    };
    let handle = netlink::connect()?;
    let plumbed = match target {
        Target::Netns(netns) => endpoint::plumb(&handle, netns, &endpoint_spec).await?,
        Target::Handoff { .. } => endpoint::plumb_handoff(&handle, &endpoint_spec).await?,
    };
    undo.veth = Some(plumbed.host.index);
    crate::testhook::pause("plumbed");
    let endpoint = Endpoint {
        id: spec.id.to_string(),
        network: spec.network.to_string(),
        ip,
        mac: endpoint_spec.mac,
        node: ctx.status.node.clone(),
        ifname: endpoint_spec.host_ifname.clone(),
        container: spec.container.clone(),
        pid: None,
        netns: spec.netns_name.clone(),
    };
    // Recorded locally first, with its owner: from the store write on, the agent can
    // reap the endpoint (and forwards only for endpoints this node recorded, with the
    // values recorded here).
    record.endpoint = Some(endpoint.clone());
    ctx.local.update(record)?;
    ctx.store.create_endpoint(&endpoint).await?;
    undo.endpoint = Some(spec.id.to_string());
    crate::testhook::pause("endpoint");
    let wanted = format!("{}/{}", spec.network, spec.id);
    let reply = ctx.agent.reconcile().await?;
    if !reply.attached.contains(&wanted) {
        return Err(ContainerError::NotAttached(wanted));
    }
    wait_for_peers(ctx, spec.network, spec.id).await;
    Ok(endpoint)
}

/// Checks that `ip` is held in the cluster IPAM for `spec.id` on this node.
async fn held_address(ctx: &Context, spec: &JoinSpec<'_>, ip: Ipv4Addr) -> Result<Ipv4Addr> {
    let held = ctx
        .store
        .list_allocations(spec.network)
        .await?
        .into_iter()
        .any(|(held, a)| held == ip && a.endpoint == spec.id && a.node == ctx.status.node);
    if held {
        Ok(ip)
    } else {
        Err(StoreError::AddressInUse {
            network: spec.network.to_string(),
            ip,
        }
        .into())
    }
}

/// Refuses an endpoint the maps could not hold: the cluster's endpoints (every node's
/// ENDPOINTS map) and this node's local interfaces (its LOCAL_IFACES map, whose
/// occupancy the agent reports).
async fn check_capacity(ctx: &Context) -> Result<()> {
    use overlay_common::{capacity, map_names};
    ctx.store.check_endpoint_capacity().await?;
    let local = ctx
        .status
        .maps
        .iter()
        .find(|m| m.name == map_names::LOCAL_IFACES)
        .map_or(0, |m| m.entries);
    if local >= capacity::LOCAL_IFACES as usize {
        return Err(StoreError::Capacity {
            what: "this node has its maximum number of local endpoints",
            count: local,
            limit: capacity::LOCAL_IFACES,
            map: map_names::LOCAL_IFACES,
        }
        .into());
    }
    Ok(())
}

/// How long `run` waits for the other nodes to forward for a new container before
/// starting its command anyway (their first packets back would wait for ARP otherwise).
const PEER_CONVERGENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits until every other live node's agent has applied the endpoint's entry (see
/// [`Store::wait_applied`]); this node's agent applied it before the reply that
/// confirmed the attachment. A slow or unreachable peer only costs a warning.
async fn wait_for_peers(ctx: &Context, network: &str, id: &str) {
    let index = match ctx.store.endpoint_index(network, id).await {
        Ok(Some(index)) => index,
        _ => return,
    };
    match ctx
        .store
        .wait_applied(index, PEER_CONVERGENCE_TIMEOUT, &ctx.status.node)
        .await
    {
        Ok(behind) if behind.is_empty() => {}
        Ok(behind) => {
            warn!(nodes = ?behind, "these nodes have not applied the new endpoint yet; traffic from them may be delayed")
        }
        Err(e) => {
            warn!(error = %e, "cannot check whether the other nodes applied the new endpoint")
        }
    }
}

/// Removes an endpoint of this node: its cluster entry, its address, its veth (which
/// takes the container side with it), then has the agent drop it from the maps.
///
/// The veth is found through this node's local record (its name generated from the
/// endpoint's names), never through the store entry's `ifname`: an endpoint this node
/// has no record of loses only its cluster entry and address. The caller removes the
/// local record once everything else is gone.
pub async fn leave(ctx: &Context, endpoint: &Endpoint) -> Result<()> {
    leave_with(ctx, endpoint, true).await
}

/// [`leave`], keeping the endpoint's address allocated unless `release_address`: for a
/// runtime whose IPAM releases it in a call of its own (Docker's `ReleaseAddress`), so
/// nobody can take it before that call comes.
pub async fn leave_with(ctx: &Context, endpoint: &Endpoint, release_address: bool) -> Result<()> {
    if endpoint.node != ctx.status.node {
        return Err(ContainerError::WrongNode {
            id: endpoint.id.clone(),
            node: endpoint.node.clone(),
            local: ctx.status.node.clone(),
        });
    }
    ctx.store
        .delete_endpoint(&endpoint.network, &endpoint.id)
        .await?;
    if release_address {
        ctx.store.release_ip(&endpoint.network, endpoint.ip).await?;
    }
    if let Some(record) = ctx.local.get(&endpoint.network, &endpoint.id) {
        if let Some(ip) = record.ip.filter(|ip| *ip != endpoint.ip) {
            ctx.store.release_ip(&endpoint.network, ip).await?;
        }
        let handle = netlink::connect()?;
        if let Ok(link) = netlink::link_by_name(&handle, &record.host_ifname()).await {
            netlink::delete_link(&handle, link.index).await?;
        }
    }
    if let Err(e) = ctx.agent.reconcile().await {
        // The agent's watch removes it anyway; only the timing is lost.
        warn!(error = %e, "the agent did not reconcile at once");
    }
    info!(network = %endpoint.network, endpoint = %endpoint.id, ip = %endpoint.ip, "endpoint detached");
    Ok(())
}

/// Undoes the steps of a [`join`] that did not complete.
struct Undo<'a> {
    ctx: &'a Context,
    network: String,
    ip: Option<Ipv4Addr>,
    veth: Option<u32>,
    endpoint: Option<String>,
}

impl<'a> Undo<'a> {
    fn new(ctx: &'a Context, network: &str, ip: Ipv4Addr) -> Self {
        Self {
            ctx,
            network: network.to_string(),
            ip: Some(ip),
            veth: None,
            endpoint: None,
        }
    }

    fn disarm(&mut self) {
        self.ip = None;
        self.veth = None;
        self.endpoint = None;
    }

    /// Whether everything was undone (else the local record stays for the agent).
    async fn run(&mut self) -> bool {
        let mut clean = true;
        if let Some(id) = self.endpoint.take() {
            if let Err(e) = self.ctx.store.delete_endpoint(&self.network, &id).await {
                warn!(error = %e, "rollback: cannot remove the endpoint entry; the agent will");
                clean = false;
            }
        }
        if let Some(index) = self.veth.take() {
            if let Ok(handle) = netlink::connect() {
                let _ = netlink::delete_link(&handle, index).await;
            }
        }
        if let Some(ip) = self.ip.take() {
            if let Err(e) = self.ctx.store.release_ip(&self.network, ip).await {
                warn!(error = %e, "rollback: cannot release the address; the agent will");
                clean = false;
            }
        }
        clean
    }
}

/// Where a container's namespace is when joining one: a path, or a process's.
pub fn netns_path(netns: Option<PathBuf>, pid: Option<u32>) -> Option<PathBuf> {
    netns.or_else(|| pid.map(|p| PathBuf::from(format!("/proc/{p}/ns/net"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_fit_and_differ() {
        let a = host_ifname("net1", "web");
        assert!(a.len() <= 15, "{a}");
        assert_eq!(a, host_ifname("net1", "web"));
        assert_ne!(a, host_ifname("net2", "web"));
        assert_ne!(a, host_ifname("net1", "web2"));
    }

    #[test]
    fn random_ids_are_valid_segments() {
        let id = random_id();
        assert_eq!(id.len(), 9);
        assert!(ipam::validate_name(&id).is_ok());
        assert_ne!(random_id(), random_id());
    }
}
