//! The `overlay-cni` plugin: ADD, DEL, CHECK and VERSION of the CNI spec on top of the
//! same lifecycle as `overlay-ctl attach --netns` ([`crate::runtimes::session`]: local
//! record, join, commit; [`session::remove`]): the address comes from the cluster IPAM,
//! the endpoint is recorded in Consul, and the local agent (through its control socket)
//! attaches it to the data plane before ADD answers. CHECK is in
//! [`crate::runtimes::cni_check`].
//!
//! - ADD asks the agent for its status first: when the agent is down (or cannot reach
//!   Consul), nothing is created and the error is code 11 (try again later). Every later
//!   step is undone when one fails ([`container::join_validated`]).
//! - A second ADD for the same (container, interface), or for an interface name the
//!   container already has, fails with code 100 and changes nothing (the spec: "If an
//!   interface of the requested name already exists in the container, the CNI plugin
//!   MUST return with an error").
//! - DEL removes the record, the address and the veth; it succeeds when there is nothing
//!   to remove (never added, namespace gone, network gone). It also frees what an ADD
//!   killed midway left (its veth, an address held under the attachment's name). Without
//!   the agent it removes the veth and succeeds: the agent releases the record and the
//!   address when it sees the veth gone.
//! - CHECK lists every difference from what ADD left (code 101).
//!
//! stdout carries only the result or error JSON; logs go to stderr (and `logFile`).
use std::{io::Read as _, path::PathBuf, process::ExitCode};

use ipnetwork::Ipv4Network;
use serde_json::Value;
use tracing::{info, warn};

use super::cni::{self, code, CniError, Command, Config, Invocation};
use crate::{
    agent::control::{AgentClient, ControlError, DEFAULT_STATE_DIR},
    agent::dns::{cni_dns, ContainerDns},
    agent::local_state::{self, LocalState, LocalStateError},
    dataplane::netlink::{self, NetlinkError},
    dataplane::netns::NetNs,
    runtimes::cni_check::{inspect, ContainerIface},
    runtimes::container::{self, ContainerError, Context, JoinSpec, Joined, Target},
    runtimes::session::{self, EndpointSession},
    store::agent_store,
    store::consul::ConsulError,
    store::StoreError,
};

/// The plugin's entry point: reads the environment and stdin, runs the command, prints
/// the result or the error object on stdout, and returns the exit code.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = cni::input_version(&stdin).unwrap_or_else(|| cni::DEFAULT_VERSION.into());
    let log_file = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("logFile")?.as_str().map(PathBuf::from));
    init_tracing(log_file);
    let outcome = match read {
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            "cannot read the network configuration from stdin",
            e.to_string(),
        )),
        Ok(_) => run(|k| std::env::var(k).ok(), &stdin),
    };
    match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code, "{}: {}", e.msg, e.details);
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (warnings by default, `OVERLAY_CNI_LOG` to change), or to
/// `logFile` (info by default), never to stdout.
fn init_tracing(log_file: Option<PathBuf>) {
    let filter = |default: &str| {
        tracing_subscriber::EnvFilter::try_from_env("OVERLAY_CNI_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "{default},netlink_packet_route=error,netlink_proto=error"
            ))
        })
    };
    let file = log_file.and_then(|path| {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .ok()
    });
    let builder = tracing_subscriber::fmt().with_ansi(false);
    let _ = match file {
        Some(file) => builder
            .with_env_filter(filter("info"))
            .with_writer(std::sync::Mutex::new(file))
            .try_init(),
        None => builder
            .with_env_filter(filter("warn"))
            .with_writer(std::io::stderr)
            .try_init(),
    };
}

/// Runs one invocation: `Some(result)` to print on success.
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let inv = cni::parse_env(env)?;
    if inv.command == Command::Version {
        return Ok(Some(cni::version_result(stdin)));
    }
    let config = cni::parse_config(stdin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "cannot start the async runtime",
                e.to_string(),
            )
        })?;
    runtime.block_on(async {
        match inv.command {
            Command::Add => add(&inv, &config).await.map(Some),
            Command::Del => del(&inv, &config).await.map(|()| None),
            Command::Check => super::cni_check::check(&inv, &config).await.map(|()| None),
            Command::Version => unreachable!("answered above"),
        }
    })
}

fn state_dir(config: &Config) -> PathBuf {
    config
        .conf
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// The local agent's status and the cluster state it uses; code 11 when the agent does
/// not answer or has lost Consul (nothing has been changed at that point).
pub(super) async fn context(config: &Config) -> Result<Context, CniError> {
    let dir = state_dir(config);
    let agent = AgentClient::new(&dir);
    let status = agent.status().await.map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the overlay agent is not reachable",
            format!(
                "{e} (its control socket: {}/agent.sock; set \"stateDir\" in the plugin configuration for another one); nothing was changed",
                dir.display()
            ),
        )
    })?;
    if !status.consul.reachable {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the overlay agent cannot reach its store",
            format!(
                "store at {}: {}; nothing was changed",
                status.consul.addr,
                status.consul.last_error.as_deref().unwrap_or("unreachable")
            ),
        ));
    }
    let store = agent_store(&status).await.map_err(store_error)?;
    Ok(Context {
        store,
        agent,
        status,
        local: LocalState::new(&dir),
    })
}

pub(super) fn local_error(e: LocalStateError) -> CniError {
    CniError::new(
        code::IO_FAILURE,
        "cannot keep this node's record of the attachment",
        e.to_string(),
    )
}

pub(super) fn consul_error(e: ConsulError) -> CniError {
    match e {
        ConsulError::Transport { .. } | ConsulError::Timeout { .. } => CniError::new(
            code::TRY_AGAIN_LATER,
            "Consul is not reachable",
            e.to_string(),
        ),
        _ => CniError::new(code::IO_FAILURE, "Consul request failed", e.to_string()),
    }
}

pub(super) fn store_error(e: StoreError) -> CniError {
    match e {
        StoreError::Consul(e) => consul_error(e),
        e @ StoreError::Etcd(_) if e.is_unavailable() => CniError::new(
            code::TRY_AGAIN_LATER,
            "the store is not reachable",
            e.to_string(),
        ),
        e @ (StoreError::Etcd(_) | StoreError::NeedsConsul { .. }) => {
            CniError::new(code::IO_FAILURE, "store request failed", e.to_string())
        }
        StoreError::NoSuchNetwork(_) => CniError::new(
            code::INVALID_CONFIG,
            "invalid network configuration",
            format!("{e} (see `overlay-ctl network list`)"),
        ),
        StoreError::EndpointExists { .. } => {
            CniError::new(code::ALREADY_ADDED, "already added", e.to_string())
        }
        StoreError::Corrupt { .. } => {
            CniError::new(code::IO_FAILURE, "corrupt cluster state", e.to_string())
        }
        _ => CniError::new(code::REFUSED, "refused by the cluster", e.to_string()),
    }
}

pub(super) fn container_error(e: ContainerError) -> CniError {
    match e {
        ContainerError::Store(e) => store_error(e),
        ContainerError::Consul(e) => consul_error(e),
        ContainerError::Agent(e) => agent_error(e),
        ContainerError::NoSuchNetwork(network) => CniError::new(
            code::INVALID_CONFIG,
            "invalid network configuration",
            format!("network {network:?} does not exist (see `overlay-ctl network list`)"),
        ),
        ContainerError::NoVtep => CniError::new(
            code::TRY_AGAIN_LATER,
            "the overlay agent is not ready",
            e.to_string(),
        ),
        ContainerError::NotAttached(_) => CniError::new(
            code::NOT_ATTACHED,
            "the agent did not attach",
            e.to_string(),
        ),
        ContainerError::WrongNode { .. }
        | ContainerError::NoSuchEndpoint { .. }
        | ContainerError::NotAttachedWith { .. }
        | ContainerError::NoTarget
        | ContainerError::InvalidName { .. } => {
            CniError::new(code::REFUSED, "refused by the cluster", e.to_string())
        }
        ContainerError::Local(e) => local_error(e),
        ContainerError::Endpoint(_)
        | ContainerError::Netlink(_)
        | ContainerError::Io { .. }
        | ContainerError::NoAddress
        | ContainerError::Service { .. }
        | ContainerError::Teardown(_) => CniError::new(
            code::IO_FAILURE,
            "cannot plumb the interface",
            e.to_string(),
        ),
    }
}

pub(super) fn agent_error(e: ControlError) -> CniError {
    match e {
        ControlError::Refused(_) | ControlError::Protocol(_) => CniError::new(
            code::NOT_ATTACHED,
            "the overlay agent did not attach the endpoint",
            e.to_string(),
        ),
        _ => CniError::new(
            code::TRY_AGAIN_LATER,
            "the overlay agent did not answer",
            e.to_string(),
        ),
    }
}

pub(super) fn netlink_error(what: &str) -> impl FnOnce(NetlinkError) -> CniError + '_ {
    move |e| CniError::new(code::IO_FAILURE, what, e.to_string())
}

/// Opens `CNI_NETNS`: code 3 when it does not exist.
pub(super) fn open_netns(inv: &Invocation) -> Result<NetNs, CniError> {
    let path = inv.netns.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "invalid CNI environment variables",
            "CNI_NETNS is not set",
        )
    })?;
    NetNs::open_path(&inv.container_id, path.clone()).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            code::UNKNOWN_CONTAINER
        } else {
            code::IO_FAILURE
        };
        CniError::new(
            code,
            "cannot open the container's network namespace",
            format!("CNI_NETNS={}: {e}", path.display()),
        )
    })
}

/// A second ADD for the same attachment, or for an interface name the container already
/// has, is refused (code 100) and changes nothing.
async fn refuse_second_add(
    ctx: &Context,
    inv: &Invocation,
    network: &str,
    id: &str,
    netns: &NetNs,
) -> Result<(), CniError> {
    if let Some(existing) = ctx
        .store
        .get_endpoint(network, id)
        .await
        .map_err(store_error)?
    {
        return Err(CniError::new(
            code::ALREADY_ADDED,
            "already added",
            format!(
                "container {} interface {} is already on network {network} as endpoint {id} ({}); DEL it first",
                inv.container_id, inv.ifname, existing.ip
            ),
        ));
    }
    if inspect(netns, &inv.ifname)?.is_some() {
        return Err(CniError::new(
            code::ALREADY_ADDED,
            "interface already exists",
            format!(
                "the container already has an interface named {} (CNI_NETNS={})",
                inv.ifname,
                netns.path().display()
            ),
        ));
    }
    Ok(())
}

async fn add(inv: &Invocation, config: &Config) -> Result<Value, CniError> {
    let network = config.network.as_str();
    let netns = open_netns(inv)?;
    let requested = cni::requested_ip(inv, &config.conf)?;
    let ctx = context(config).await?;
    let id = cni::endpoint_id(&inv.container_id, &inv.ifname);
    // Refuse a second ADD before changing anything.
    refuse_second_add(&ctx, inv, network, &id, &netns).await?;
    let sandbox = netns.path().display().to_string();
    let spec = JoinSpec {
        network,
        id: &id,
        ip: requested,
        container_ifname: &inv.ifname,
        container: Some(format!("cni:{}:{}", inv.container_id, inv.ifname)),
        keep_existing_default_route: true,
        netns_name: None,
    };
    // This node's record of the attachment comes first and is owned by this process
    // until ADD completes: a plugin killed midway leaves nothing the agent cannot collect.
    let mut session = EndpointSession::begin(&ctx, &spec, local_state::Kind::Attach)
        .await
        .map_err(container_error)?;
    let joined = match session.start(Target::Netns(&netns), &spec).await {
        Ok(joined) => joined,
        Err(e) => {
            session.abandon();
            return Err(container_error(e));
        }
    };
    let (host, inside) = match describe(&netns, &inv.ifname, &joined).await {
        Ok(found) => found,
        Err(e) => {
            // Nothing half-done stays behind.
            if let Err(undo) = session.teardown(&joined.endpoint).await {
                warn!(error = %undo, "cannot undo the ADD");
            }
            return Err(e);
        }
    };
    // Committed: the attachment lives until DEL (or until its container's veth is gone).
    session.commit().map_err(container_error)?;
    let address = Ipv4Network::new(joined.endpoint.ip, joined.network.subnet.prefix())
        .map_err(|e| CniError::new(code::IO_FAILURE, "bad address", e.to_string()))?;
    info!(
        network,
        container = %inv.container_id,
        ifname = %inv.ifname,
        endpoint = %id,
        ip = %joined.endpoint.ip,
        "ADD: attached"
    );
    // The network's configured `dns` wins; else, when the agent serves names, the
    // gateway's responder (a runtime that writes resolv.conf from the result uses it).
    let served_dns = ctx.status.dns.then(|| {
        let settings = ContainerDns::new(joined.network.gateway, &joined.network.name);
        cni_dns(&settings)
    });
    Ok(cni::add_result(
        &config.conf.cni_version,
        &cni::Attachment {
            host_ifname: host.name,
            host_mac: host.mac.to_string(),
            container_ifname: inv.ifname.clone(),
            container_mac: inside.mac.to_string(),
            mtu: joined.network.mtu,
            sandbox,
            address,
            gateway: joined.network.gateway,
            default_route: inside.default_gateway == Some(joined.network.gateway),
        },
        config.conf.dns.as_ref().or(served_dns.as_ref()),
        config.conf.prev_result.as_ref(),
    ))
}

/// The host and container interfaces ADD created, for its result.
async fn describe(
    netns: &NetNs,
    ifname: &str,
    joined: &Joined,
) -> Result<(netlink::LinkInfo, ContainerIface), CniError> {
    let handle = netlink::connect().map_err(netlink_error("netlink"))?;
    let host = netlink::link_by_name(&handle, &joined.endpoint.ifname)
        .await
        .map_err(netlink_error("cannot read the host-side veth"))?;
    let inside = inspect(netns, ifname)?.ok_or_else(|| {
        CniError::new(
            code::IO_FAILURE,
            "the new interface vanished",
            format!("{ifname} is not in {}", netns.path().display()),
        )
    })?;
    Ok((host, inside))
}

async fn del(inv: &Invocation, config: &Config) -> Result<(), CniError> {
    let network = config.network.as_str();
    let id = cni::endpoint_id(&inv.container_id, &inv.ifname);
    let ctx = match context(config).await {
        Ok(ctx) => ctx,
        Err(e) if e.code == code::TRY_AGAIN_LATER => {
            // DEL is best effort: without the agent (or Consul) remove what is local,
            // the veth; the agent releases the endpoint and its address once it sees the
            // veth gone (at its next reconcile, also right after it starts).
            remove_veth(network, &id).await?;
            warn!(
                network,
                endpoint = %id,
                reason = %e.details,
                "DEL without the agent: removed the veth; the agent releases the endpoint and its address when it is back"
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let mut removed = false;
    match ctx
        .store
        .get_endpoint(network, &id)
        .await
        .map_err(store_error)?
    {
        Some(endpoint) if endpoint.node == ctx.status.node => {
            session::remove(&ctx, &endpoint, true)
                .await
                .map_err(container_error)?;
            info!(network, endpoint = %id, ip = %endpoint.ip, "DEL: detached");
            removed = true;
        }
        Some(endpoint) => warn!(
            network,
            endpoint = %id,
            node = %endpoint.node,
            "DEL: the endpoint belongs to another node; left alone"
        ),
        None => {}
    }
    // What an ADD killed midway may have left: its veth, an address under its name.
    if remove_veth(network, &id).await? {
        info!(network, endpoint = %id, "DEL: removed a left-over veth");
        removed = true;
    }
    let allocations = match ctx.store.list_allocations(network).await {
        Ok(list) => list,
        Err(e) if e.is_backend() => return Err(store_error(e)),
        Err(e) => {
            warn!(error = %e, "DEL: cannot list the network's addresses");
            Vec::new()
        }
    };
    for (ip, holder) in allocations {
        if holder.endpoint == id && holder.node == ctx.status.node {
            ctx.store
                .release_ip(network, ip)
                .await
                .map_err(store_error)?;
            info!(network, endpoint = %id, %ip, "DEL: released a left-over address");
            removed = true;
        }
    }
    if removed {
        if let Err(e) = ctx.agent.reconcile().await {
            warn!(error = %e, "the agent did not reconcile at once");
        }
    }
    Ok(())
}

/// Deletes the attachment's host-side veth (and so the container's end) if it exists.
async fn remove_veth(network: &str, id: &str) -> Result<bool, CniError> {
    let handle = netlink::connect().map_err(netlink_error("netlink"))?;
    let veth = container::host_ifname(network, id);
    match netlink::link_by_name(&handle, &veth).await {
        Ok(link) => {
            netlink::delete_link(&handle, link.index)
                .await
                .map_err(netlink_error("cannot delete the host-side veth"))?;
            Ok(true)
        }
        Err(NetlinkError::NoSuchLink(_)) => Ok(false),
        Err(e) => Err(netlink_error("cannot look up the host-side veth")(e)),
    }
}
