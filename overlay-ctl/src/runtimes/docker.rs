//! The Docker network and IPAM driver (`overlay-net`), served by the agent on
//! `/run/docker/plugins/overlay-net.sock` (see [`super::docker_protocol`] for the wire
//! format). It works on the same library path as `overlay-ctl attach` and `overlay-cni`:
//! the cluster IPAM and [`crate::runtimes::session`] (this node's local record of every
//! endpoint first, join, commit; [`session::remove`]), so the agent's ownership rules and garbage collection
//! apply to Docker's containers as to the others.
//!
//! How Docker's objects map to the cluster's:
//! - A Docker network is a cluster network, identified by its subnet (cluster subnets
//!   never overlap). `RequestPool` with `--subnet` uses the cluster network of exactly
//!   that subnet, or creates one (named by `--ipam-opt network=NAME`, else
//!   `docker-<net>-<len>`) when none overlaps; so `docker network create` with the same
//!   subnet on every host gives every host's Docker the same network. Releasing the pool
//!   (`docker network rm`) deletes the cluster network only on the host whose Docker
//!   created it, and only when no endpoint is left on it anywhere.
//! - An address is taken from the cluster IPAM by `RequestAddress` (before Docker says
//!   for which endpoint), under the endpoint name `docker-<ip>`; `CreateEndpoint` plumbs
//!   the veth for that address, records the endpoint (`container` = `docker:<EndpointID>`)
//!   and has the agent attach it; `Join` hands the container end to Docker, which moves
//!   it into the container as `eth<N>` and sets the address, MAC and default route.
//! - `DeleteEndpoint` removes the endpoint and the veth; the address stays held until
//!   `ReleaseAddress` (which Docker sends next) frees it, if it is still held under its
//!   `docker-<ip>` name by this node and no endpoint of that name is recorded here. (If
//!   Docker never sends it, the agent's collection frees the address after `--gc-grace`:
//!   this node holds it without a record of its endpoint.)
use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, Request, Response, StatusCode};
use ipnetwork::Ipv4Network;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use super::docker_protocol::{self as proto, Method, PoolId};
use crate::{
    agent::control::AgentClient,
    agent::local_state::{self, LocalEndpoint, LocalState},
    dataplane::endpoint,
    runtimes::container::{self, Context, JoinSpec, Target},
    runtimes::session::{self, EndpointSession},
    store::agent_store,
    store::ipam,
    store::{Network, StoreError},
};

/// Why a request failed; its text is what `docker` prints.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("invalid request body: {0}")]
    BadRequest(String),
    #[error("unknown plugin method {0}")]
    UnknownMethod(String),
    #[error("the overlay agent is not ready: {0}")]
    NotReady(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Container(#[from] container::ContainerError),
    #[error(transparent)]
    Local(#[from] local_state::LocalStateError),
    #[error("{0}")]
    Refused(String),
}

type Result<T, E = DockerError> = std::result::Result<T, E>;

/// The driver: stateless between requests (everything is in the cluster, in this
/// node's local records, and in the pool IDs Docker keeps).
pub struct DockerPlugin {
    /// The agent's state directory (its control socket and local records).
    state_dir: PathBuf,
}

fn decode<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| DockerError::BadRequest(e.to_string()))
}

impl DockerPlugin {
    pub fn new(state_dir: PathBuf) -> Self {
        Self { state_dir }
    }

    /// Answers one call: the JSON response, or the error for `{"Err": ...}`.
    pub async fn handle(&self, path: &str, body: &[u8]) -> Result<Value> {
        let method =
            Method::from_path(path).ok_or_else(|| DockerError::UnknownMethod(path.into()))?;
        Ok(match method {
            Method::Activate => proto::activate(),
            Method::NetCapabilities => proto::net_capabilities(),
            Method::IpamCapabilities => proto::ipam_capabilities(),
            Method::DefaultAddressSpaces => proto::default_address_spaces(),
            Method::RequestPool => self.request_pool(decode(body)?).await?,
            Method::ReleasePool => self.release_pool(decode(body)?).await?,
            Method::RequestAddress => self.request_address(decode(body)?).await?,
            Method::ReleaseAddress => self.release_address(decode(body)?).await?,
            Method::CreateNetwork => self.create_network(decode(body)?).await?,
            Method::CreateEndpoint => self.create_endpoint(decode(body)?).await?,
            Method::Join => self.join(decode(body)?).await?,
            Method::EndpointOperInfo => self.oper_info(decode(body)?).await?,
            Method::DeleteEndpoint => self.delete_endpoint(decode(body)?).await?,
            Method::DeleteNetwork
            | Method::Leave
            | Method::DiscoverNew
            | Method::DiscoverDelete
            | Method::ProgramExternalConnectivity
            | Method::RevokeExternalConnectivity => proto::empty(),
        })
    }

    /// The agent's view and the store, as `overlay-cni` gets them.
    async fn context(&self) -> Result<Context> {
        let agent = AgentClient::new(&self.state_dir);
        let status = agent
            .status()
            .await
            .map_err(|e| DockerError::NotReady(e.to_string()))?;
        if !status.consul.reachable {
            return Err(DockerError::NotReady(format!(
                "the store at {} is not reachable",
                status.consul.addr
            )));
        }
        let store = agent_store(&status)
            .await
            .map_err(|e| DockerError::NotReady(e.to_string()))?;
        Ok(Context {
            store,
            agent,
            status,
            local: LocalState::new(&self.state_dir),
        })
    }

    async fn network(ctx: &Context, name: &str) -> Result<Network> {
        ctx.store
            .get_network(name)
            .await?
            .ok_or_else(|| container::ContainerError::NoSuchNetwork(name.to_string()).into())
    }

    async fn request_pool(&self, req: proto::RequestPoolRequest) -> Result<Value> {
        if req.v6 {
            return Err(DockerError::Refused(
                "the overlay is IPv4 only (leave out --ipv6)".into(),
            ));
        }
        if req.pool.is_empty() {
            return Err(DockerError::Refused(
                "give the network's subnet: docker network create --subnet CIDR (an overlay network with that subnet is used, or created)".into(),
            ));
        }
        let ctx = self.context().await?;
        let subnet = ipam::parse_subnet(&req.pool).map_err(StoreError::from)?;
        let wanted = req
            .options
            .as_ref()
            .and_then(|o| o.get(proto::NETWORK_OPTION))
            .cloned();
        let networks = ctx.store.list_networks().await?;
        if let Some(existing) = networks.iter().find(|n| n.subnet == subnet) {
            if wanted.as_ref().is_some_and(|w| *w != existing.name) {
                return Err(DockerError::Refused(format!(
                    "subnet {subnet} is network {:?}'s, not {:?}",
                    existing.name,
                    wanted.unwrap_or_default()
                )));
            }
            let pool = PoolId {
                network: existing.name.clone(),
                created: false,
            };
            info!(network = %existing.name, %subnet, "docker: pool is an existing network");
            return Ok(proto::pool_response(&pool, subnet, existing.gateway));
        }
        let name = wanted
            .clone()
            .unwrap_or_else(|| proto::default_network_name(subnet));
        let created = match ctx
            .store
            .create_network(&name, &req.pool, None, None, None)
            .await
        {
            Ok(created) => created,
            // Another host's Docker created it a moment ago: use it.
            Err(e @ (StoreError::NetworkExists(_) | StoreError::SubnetOverlap { .. })) => {
                let now = ctx.store.list_networks().await?;
                let Some(existing) = now
                    .into_iter()
                    .find(|n| n.subnet == subnet && n.name == name)
                else {
                    return Err(e.into());
                };
                let pool = PoolId {
                    network: existing.name.clone(),
                    created: false,
                };
                return Ok(proto::pool_response(&pool, subnet, existing.gateway));
            }
            Err(e) => return Err(e.into()),
        };
        let pool = PoolId {
            network: name,
            created: true,
        };
        info!(network = %created.name, %subnet, vni = created.vni, "docker: created the network");
        Ok(proto::pool_response(&pool, created.subnet, created.gateway))
    }

    async fn release_pool(&self, req: proto::PoolIdRequest) -> Result<Value> {
        let pool = PoolId::decode(&req.pool_id).map_err(DockerError::Refused)?;
        if !pool.created {
            return Ok(proto::empty());
        }
        let ctx = self.context().await?;
        match ctx.store.delete_network(&pool.network, false).await {
            Ok(()) => info!(network = %pool.network, "docker: deleted the network"),
            Err(StoreError::NoSuchNetwork(_)) => {}
            Err(StoreError::NetworkInUse { count, .. }) => info!(
                network = %pool.network,
                endpoints = count,
                "docker: the network keeps existing in the cluster (endpoints left)"
            ),
            Err(e) => return Err(e.into()),
        }
        Ok(proto::empty())
    }

    async fn request_address(&self, req: proto::AddressRequest) -> Result<Value> {
        let pool = PoolId::decode(&req.pool_id).map_err(DockerError::Refused)?;
        let ctx = self.context().await?;
        let network = Self::network(&ctx, &pool.network).await?;
        let requested = (!req.address.is_empty())
            .then(|| proto::parse_address(&req.address))
            .transpose()
            .map_err(DockerError::Refused)?;
        if req.is_gateway() {
            return match requested {
                Some(gw) if gw != network.gateway => Err(DockerError::Refused(format!(
                    "network {:?} has gateway {} in the cluster: leave out --gateway or give that one",
                    network.name, network.gateway
                ))),
                _ => Ok(proto::address_response(network.gateway, network.subnet)),
            };
        }
        let node = ctx.status.node.clone();
        let ip = match requested {
            Some(ip) => {
                ctx.store
                    .allocate_ip(&network.name, Some(ip), &proto::endpoint_name(ip), &node)
                    .await?
            }
            None => self.allocate_any(&ctx, &network, &node).await?,
        };
        info!(network = %network.name, %ip, "docker: address allocated");
        Ok(proto::address_response(ip, network.subnet))
    }

    /// The lowest free address, held under the name derived from it.
    async fn allocate_any(&self, ctx: &Context, network: &Network, node: &str) -> Result<Ipv4Addr> {
        let mut taken: std::collections::BTreeSet<Ipv4Addr> = ctx
            .store
            .list_allocations(&network.name)
            .await?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        loop {
            let Some(ip) = ipam::next_free(network.subnet, network.gateway, &taken) else {
                return Err(StoreError::Exhausted {
                    network: network.name.clone(),
                    subnet: network.subnet,
                }
                .into());
            };
            let name = proto::endpoint_name(ip);
            match ctx
                .store
                .allocate_ip(&network.name, Some(ip), &name, node)
                .await
            {
                Ok(ip) => return Ok(ip),
                Err(StoreError::AddressInUse { .. }) => {
                    taken.insert(ip);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn release_address(&self, req: proto::AddressRequest) -> Result<Value> {
        let pool = PoolId::decode(&req.pool_id).map_err(DockerError::Refused)?;
        let ip = proto::parse_address(&req.address).map_err(DockerError::Refused)?;
        let ctx = self.context().await?;
        let Some(network) = ctx.store.get_network(&pool.network).await? else {
            return Ok(proto::empty());
        };
        let name = proto::endpoint_name(ip);
        if ip == network.gateway || ctx.local.get(&network.name, &name).is_some() {
            return Ok(proto::empty());
        }
        let held = ctx
            .store
            .list_allocations(&network.name)
            .await?
            .into_iter()
            .any(|(held, a)| held == ip && a.endpoint == name && a.node == ctx.status.node);
        if held {
            ctx.store.release_ip(&network.name, ip).await?;
            info!(network = %network.name, %ip, "docker: address released");
        }
        Ok(proto::empty())
    }

    async fn create_network(&self, req: proto::CreateNetworkRequest) -> Result<Value> {
        if req.ipv6_data.as_ref().is_some_and(|d| !d.is_empty()) {
            return Err(DockerError::Refused("the overlay is IPv4 only".into()));
        }
        let data = req.ipv4_data.unwrap_or_default();
        let [data] = data.as_slice() else {
            return Err(DockerError::Refused(format!(
                "an overlay network has exactly one subnet (got {})",
                data.len()
            )));
        };
        if data.address_space != proto::ADDRESS_SPACE {
            return Err(DockerError::Refused(format!(
                "addresses must come from the cluster: add --ipam-driver {} --subnet CIDR",
                proto::DRIVER_NAME
            )));
        }
        let ctx = self.context().await?;
        let subnet: Ipv4Network = ipam::parse_subnet(&data.pool).map_err(StoreError::from)?;
        let networks = ctx.store.list_networks().await?;
        let network = networks
            .iter()
            .find(|n| n.subnet == subnet)
            .ok_or_else(|| {
                DockerError::Refused(format!("no overlay network has subnet {subnet}"))
            })?;
        info!(network = %network.name, docker_id = %req.network_id, "docker: network created");
        Ok(proto::empty())
    }

    async fn create_endpoint(&self, req: proto::EndpointRequest) -> Result<Value> {
        let iface = req.interface.unwrap_or_default();
        if iface.address.is_empty() {
            return Err(DockerError::Refused(format!(
                "no IPv4 address for the endpoint: the network needs --ipam-driver {}",
                proto::DRIVER_NAME
            )));
        }
        let ip = proto::parse_address(&iface.address).map_err(DockerError::Refused)?;
        let mac = endpoint::mac_for(ip).to_string();
        if !iface.mac_address.is_empty() && !iface.mac_address.eq_ignore_ascii_case(&mac) {
            return Err(DockerError::Refused(format!(
                "--mac-address is not supported: an overlay endpoint's MAC is derived from its address ({mac})"
            )));
        }
        let ctx = self.context().await?;
        let network = ctx
            .store
            .list_networks()
            .await?
            .into_iter()
            .find(|n| n.subnet.contains(ip))
            .ok_or_else(|| DockerError::Refused(format!("no overlay network holds {ip}")))?;
        let id = proto::endpoint_name(ip);
        let spec = JoinSpec {
            network: &network.name,
            id: &id,
            ip: Some(ip),
            container_ifname: "eth0",
            container: Some(proto::container_tag(&req.endpoint_id)),
            keep_existing_default_route: true,
            netns_name: None,
        };
        let mut session = EndpointSession::begin(&ctx, &spec, local_state::Kind::Attach).await?;
        let target = Target::Handoff { preallocated: true };
        if let Err(e) = session.start(target, &spec).await {
            session.abandon();
            return Err(e.into());
        }
        // Committed: the endpoint lives until DeleteEndpoint (or until its veth is gone).
        session.commit()?;
        info!(network = %network.name, endpoint = %id, %ip, docker_id = %req.endpoint_id, "docker: endpoint attached");
        let answer_mac = iface.mac_address.is_empty().then_some(mac.as_str());
        Ok(proto::create_endpoint_response(answer_mac))
    }

    /// This node's record of a Docker endpoint.
    fn find(&self, endpoint_id: &str) -> Option<LocalEndpoint> {
        let tag = proto::container_tag(endpoint_id);
        let (records, _) = LocalState::new(&self.state_dir).load_all();
        records.into_iter().find(|r| {
            r.endpoint
                .as_ref()
                .is_some_and(|e| e.container.as_deref() == Some(tag.as_str()))
        })
    }

    async fn join(&self, req: proto::EndpointRequest) -> Result<Value> {
        let record = self.find(&req.endpoint_id).ok_or_else(|| {
            DockerError::Refused(format!(
                "endpoint {} was not created on this node",
                req.endpoint_id
            ))
        })?;
        let ctx = self.context().await?;
        let network = Self::network(&ctx, &record.network).await?;
        let src = endpoint::peer_ifname(&record.host_ifname());
        debug!(endpoint = %record.id, %src, sandbox = %req.sandbox_key, "docker: join");
        Ok(proto::join_response(&src, network.gateway))
    }

    async fn oper_info(&self, req: proto::EndpointRequest) -> Result<Value> {
        Ok(match self.find(&req.endpoint_id) {
            Some(LocalEndpoint {
                endpoint: Some(e), ..
            }) => proto::oper_info(&e.network, &e.id, e.ip, &e.mac.to_string()),
            _ => serde_json::json!({ "Value": {} }),
        })
    }

    async fn delete_endpoint(&self, req: proto::EndpointRequest) -> Result<Value> {
        let Some(record) = self.find(&req.endpoint_id) else {
            return Ok(proto::empty());
        };
        let ctx = self.context().await?;
        let endpoint = match ctx.store.get_endpoint(&record.network, &record.id).await? {
            Some(endpoint) => endpoint,
            None => record.endpoint.clone().ok_or_else(|| {
                DockerError::Refused(format!("endpoint {} has no record", record.id))
            })?,
        };
        // The address stays held until Docker's ReleaseAddress, which follows.
        session::remove(&ctx, &endpoint, false).await?;
        info!(network = %record.network, endpoint = %record.id, docker_id = %req.endpoint_id, "docker: endpoint deleted");
        Ok(proto::empty())
    }
}

/// Serves the driver on `listener` until `shutdown` completes; only root (or the
/// agent's own user) is answered, as on the control socket.
pub async fn serve(
    listener: UnixListener,
    plugin: Arc<DockerPlugin>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = move |req: Request<Incoming>| {
        let plugin = plugin.clone();
        async move { answer(&plugin, req).await }
    };
    crate::http::serve_unix(listener, handler, shutdown).await
}

async fn answer(plugin: &DockerPlugin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, error_body(&e.to_string())),
    };
    match plugin.handle(&path, &body).await {
        Ok(value) => {
            debug!(%path, "docker plugin call answered");
            reply(StatusCode::OK, value)
        }
        Err(e) => {
            warn!(%path, error = %e, "docker plugin call refused");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_body(&e.to_string()),
            )
        }
    }
}

fn error_body(message: &str) -> Value {
    serde_json::to_value(proto::ErrResponse {
        err: message.to_string(),
    })
    .unwrap_or_default()
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    if let Ok(value) = proto::CONTENT_TYPE.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Where the driver's socket goes in a plugin directory (`/run/docker/plugins`).
pub fn socket_path(plugin_dir: &std::path::Path) -> PathBuf {
    plugin_dir.join(format!("{}.sock", proto::DRIVER_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver whose agent does not exist: what is answered without the cluster.
    fn plugin() -> DockerPlugin {
        DockerPlugin::new(std::env::temp_dir().join("overlay-docker-no-agent"))
    }

    fn call(path: &str, body: &str) -> Result<Value> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(plugin().handle(path, body.as_bytes()))
    }

    fn refusal(path: &str, body: &str) -> String {
        match call(path, body) {
            Err(e) => e.to_string(),
            Ok(v) => panic!("{path} answered {v} to {body}"),
        }
    }

    #[test]
    fn handshake_answers_without_the_cluster() {
        assert_eq!(
            call("/Plugin.Activate", "").unwrap()["Implements"],
            serde_json::json!(["NetworkDriver", "IpamDriver"])
        );
        assert_eq!(
            call("/NetworkDriver.GetCapabilities", "{}").unwrap()["Scope"],
            "local"
        );
        assert_eq!(
            call("/IpamDriver.GetDefaultAddressSpaces", "{}").unwrap()["LocalDefaultAddressSpace"],
            proto::ADDRESS_SPACE
        );
        for path in [
            "/NetworkDriver.DiscoverNew",
            "/NetworkDriver.Leave",
            "/NetworkDriver.ProgramExternalConnectivity",
            "/NetworkDriver.RevokeExternalConnectivity",
        ] {
            assert_eq!(call(path, "{}").unwrap(), serde_json::json!({}));
        }
        // Releasing a pool this host's Docker did not create touches nothing.
        assert_eq!(
            call("/IpamDriver.ReleasePool", r#"{"PoolID":"net1"}"#).unwrap(),
            serde_json::json!({})
        );
        // Deleting an endpoint this node has no record of is not an error.
        assert!(call("/NetworkDriver.DeleteEndpoint", r#"{"EndpointID":"e"}"#).is_ok());
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_asked() {
        assert!(refusal("/NetworkDriver.Nope", "{}").contains("unknown plugin method"));
        assert!(refusal("/IpamDriver.RequestPool", "{").contains("invalid request body"));
        assert!(refusal("/IpamDriver.RequestPool", r#"{"Pool":""}"#).contains("--subnet"));
        assert!(refusal(
            "/IpamDriver.RequestPool",
            r#"{"Pool":"fd00::/64","V6":true}"#
        )
        .contains("IPv4 only"));
        assert!(refusal("/IpamDriver.ReleasePool", r#"{"PoolID":"../x"}"#)
            .contains("unknown address pool"));
        let default_ipam = r#"{"NetworkID":"n","IPv4Data":[{"AddressSpace":"LocalDefault","Pool":"172.18.0.0/16"}]}"#;
        assert!(refusal("/NetworkDriver.CreateNetwork", default_ipam)
            .contains("--ipam-driver overlay-net"));
        let no_address = r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":""}}"#;
        assert!(refusal("/NetworkDriver.CreateEndpoint", no_address).contains("no IPv4 address"));
        let own_mac = r#"{"EndpointID":"e","Interface":{"Address":"10.100.0.2/24","MacAddress":"02:00:00:00:00:01"}}"#;
        assert!(refusal("/NetworkDriver.CreateEndpoint", own_mac).contains("02:42:0a:64:00:02"));
        assert!(refusal("/NetworkDriver.Join", r#"{"EndpointID":"e"}"#)
            .contains("not created on this node"));
        // Anything that needs the cluster says the agent is not there.
        assert!(
            refusal("/IpamDriver.RequestPool", r#"{"Pool":"10.100.0.0/24"}"#)
                .contains("the overlay agent is not ready")
        );
    }
}
