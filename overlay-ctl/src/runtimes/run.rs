//! `overlay-ctl run`: a command in a new container (a network namespace of its own) on
//! an overlay network, removed when the command exits. [`ContainerRun`] has the three
//! steps: [`start`](ContainerRun::start) (validate, record, namespace, join),
//! [`wait`](ContainerRun::wait) (start the command once recorded, pass signals on) and
//! [`teardown`](ContainerRun::teardown) (service, endpoint, namespace, record last).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitStatus,
};

use tracing::warn;

use super::{
    command::{self, RunSignals},
    container::{self, ContainerError, Context, JoinSpec, Joined, Result, Target},
    session::EndpointSession,
};
use crate::{
    agent::control::AgentStatus,
    agent::dns::{self, forward::SYSTEM_RESOLV_CONF, ContainerDns},
    agent::local_state::{self, Kind},
    dataplane::netns::NetNs,
    store::consul::AgentService,
    store::ipam,
};

/// What to run, and where.
pub struct RunRequest<'a> {
    pub network: &'a str,
    /// The endpoint name (see [`container_id`]).
    pub id: &'a str,
    pub ip: Option<Ipv4Addr>,
    /// The command and its arguments.
    pub command: &'a [String],
}

/// The container's endpoint name: `name`, checked, or a random one.
pub fn container_id(name: Option<&str>) -> Result<String> {
    let id = name
        .map(str::to_string)
        .unwrap_or_else(container::random_id);
    ipam::validate_name(&id).map_err(|source| ContainerError::InvalidName {
        id: id.clone(),
        source,
    })?;
    Ok(id)
}

/// What `--service` needs the store to be.
const SERVICE_NEEDS: &str = "--service (a service in Consul's catalog)";

/// Refuses `--service` before anything is created when the store is not Consul.
pub fn check_service_store(store: &crate::store::Store) -> Result<()> {
    store.consul(SERVICE_NEEDS)?;
    Ok(())
}

/// A running container: its endpoint, namespace and command.
pub struct ContainerRun<'a> {
    session: EndpointSession<'a>,
    netns: NetNs,
    joined: Joined,
    command: Vec<String>,
    /// The catalog service registered for it, if any.
    service_id: Option<String>,
    /// The container's own resolv.conf (`/etc/netns/NETNS/resolv.conf`), when the
    /// agent serves names.
    resolv_conf: Option<PathBuf>,
}

impl<'a> ContainerRun<'a> {
    /// Checks the request, then records the container on this node (before anything
    /// else exists), creates its namespace and joins the network.
    pub async fn start(ctx: &'a Context, request: &RunRequest<'_>) -> Result<Self> {
        let netns_name = local_state::run_netns_name(request.network, request.id);
        let spec = JoinSpec {
            network: request.network,
            id: request.id,
            ip: request.ip,
            container_ifname: container::CONTAINER_IFNAME,
            container: Some(request.command.join(" ")),
            keep_existing_default_route: false,
            netns_name: Some(netns_name.clone()),
        };
        // Refuses bad input before creating anything.
        let mut session = EndpointSession::begin(ctx, &spec, Kind::Run).await?;
        crate::testhook::pause("recorded");
        let netns = match NetNs::create(&netns_name) {
            Ok(netns) => netns,
            Err(source) => {
                session.abandon();
                return Err(ContainerError::Io {
                    what: format!("cannot create network namespace {netns_name}"),
                    source,
                });
            }
        };
        crate::testhook::pause("netns");
        match session.start(Target::Netns(&netns), &spec).await {
            Ok(joined) => Ok(Self {
                resolv_conf: ctx
                    .status
                    .dns
                    .then(|| resolv_conf(&netns_name, &joined))
                    .flatten(),
                session,
                netns,
                joined,
                command: request.command.to_vec(),
                service_id: None,
            }),
            Err(e) => {
                if netns.delete().is_ok() {
                    session.abandon();
                }
                Err(e)
            }
        }
    }

    /// The container's endpoint and network.
    pub fn joined(&self) -> &Joined {
        &self.joined
    }

    /// Registers the container's address as `service` with the local Consul agent (the
    /// seed's Registrator role): it appears in the catalog on that agent's node. On
    /// failure the container is removed. Needs a Consul store (the CLI checks before it
    /// creates the container: [`check_service_store`]).
    pub async fn register_service(mut self, service: &str) -> Result<Self> {
        let ctx = self.session.context();
        let entry = service_for(&ctx.status, &self.joined, service);
        let registered = match ctx.store.consul(SERVICE_NEEDS) {
            Ok(consul) => consul
                .agent_service_register(&entry)
                .await
                .map_err(Into::into),
            Err(e) => Err(e),
        };
        match registered {
            Ok(()) => {
                self.service_id = Some(entry.id);
                Ok(self)
            }
            Err(source) => {
                let left = self.session.leave(&self.joined.endpoint).await;
                self.remove_resolv_conf();
                if left.is_ok() && self.netns.delete().is_ok() {
                    self.session.close();
                }
                Err(ContainerError::Service {
                    service: service.to_string(),
                    source,
                })
            }
        }
    }

    /// Runs the command to its end, passing termination signals on. A signal that came
    /// during set-up means the command never starts.
    pub async fn wait(&mut self, signals: &mut RunSignals) -> Result<ExitStatus> {
        let status = match signals.pending() {
            Some(signal) => Ok(std::os::unix::process::ExitStatusExt::from_raw(
                signal as i32,
            )),
            None => {
                let session = &mut self.session;
                let spawned = command::spawn_recorded(
                    self.netns.path(),
                    self.resolv_conf.as_deref(),
                    &self.command,
                    |pid| {
                        crate::testhook::pause("spawned");
                        session.record_command(pid)
                    },
                );
                match spawned {
                    Ok(child) => {
                        crate::testhook::pause("started");
                        command::wait_passing_signals(child, signals).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        crate::testhook::pause("exited");
        status
    }

    /// Removes the resolv.conf [`Self::start`] wrote; a failure is logged, not fatal (the
    /// container's other resources must still go).
    fn remove_resolv_conf(&self) {
        if self.resolv_conf.is_some() {
            if let Err(e) = dns::remove_netns_resolv_conf(self.netns.name()) {
                warn!(error = %e, "cannot remove the container's resolv.conf");
            }
        }
    }

    /// Removes the container: its service, its endpoint, its namespace, and the record
    /// last, once everything else is gone (the agent leaves a record alone while its
    /// owner lives).
    pub async fn teardown(self) -> Result<()> {
        let ctx = self.session.context();
        if let (Some(service_id), Ok(consul)) = (&self.service_id, ctx.store.consul(SERVICE_NEEDS))
        {
            if let Err(e) = consul.agent_service_deregister(service_id).await {
                warn!(error = %e, "cannot deregister service {service_id}");
            }
        }
        let left = self.session.leave(&self.joined.endpoint).await;
        self.remove_resolv_conf();
        let netns_name = self.netns.name().to_string();
        let deleted = self.netns.delete();
        if left.is_ok() && deleted.is_ok() {
            self.session.close();
        }
        left.map_err(|e| ContainerError::Teardown(Box::new(e)))?;
        deleted.map_err(|source| ContainerError::Io {
            what: format!("cannot delete network namespace {netns_name}"),
            source,
        })
    }
}

/// Writes the container's resolv.conf (its network's gateway as the nameserver, the
/// network as the search domain). Without it (no /etc/resolv.conf on the host to bind it
/// over, or the write failed: both logged) the container keeps the host's resolver.
fn resolv_conf(netns_name: &str, joined: &Joined) -> Option<PathBuf> {
    if !Path::new(SYSTEM_RESOLV_CONF).exists() {
        warn!("no {SYSTEM_RESOLV_CONF} on this host to bind the container's resolver over; overlay names will not resolve in it");
        return None;
    }
    let settings = ContainerDns::new(joined.network.gateway, &joined.network.name);
    dns::write_netns_resolv_conf(netns_name, &settings)
        .inspect_err(|e| warn!(error = %e, "the container keeps the host's resolver"))
        .ok()
}

/// The agent registration of a container's service.
pub fn service_for(status: &AgentStatus, joined: &Joined, service: &str) -> AgentService {
    AgentService {
        id: format!("overlay-{}-{}", joined.endpoint.network, joined.endpoint.id),
        name: service.to_string(),
        address: joined.endpoint.ip.to_string(),
        port: 0,
        tags: vec![
            "overlay".to_string(),
            format!("network={}", joined.endpoint.network),
            format!("node={}", status.node),
        ],
    }
}
