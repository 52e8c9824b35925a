//! Docker's remote plugin protocol (libnetwork `docs/remote.md` and `docs/ipam.md`):
//! the request and response bodies of the `NetworkDriver` and `IpamDriver` endpoints,
//! and the mapping between Docker's view (pools, endpoint IDs, addresses with a prefix
//! length) and the cluster's (networks, endpoint names, addresses). No I/O here.
//!
//! Every call is an HTTP POST of a JSON body to `/<Interface>.<Method>`; a failure is
//! answered with `{"Err": "..."}`, which the `docker` command prints.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The driver's name (network and IPAM), as in `docker network create -d overlay-net`:
/// not Docker's built-in `overlay`.
pub const DRIVER_NAME: &str = "overlay-net";
/// The content type Docker's plugin client sends and expects.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// The one address space this IPAM driver has: the cluster's.
pub const ADDRESS_SPACE: &str = "overlay";
/// The `--ipam-opt` that names the cluster network a new Docker network creates.
pub const NETWORK_OPTION: &str = "network";
/// What Docker puts in RequestAddress's options when it asks for a gateway.
const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
const GATEWAY_TYPE: &str = "com.docker.network.gateway";
/// The prefix of the container's interface name (`eth0`, `eth1`, ...).
pub const DST_PREFIX: &str = "eth";
/// The prefix of the cluster endpoint names the driver gives Docker's endpoints.
pub const ENDPOINT_PREFIX: &str = "docker-";
/// What the driver records as the endpoint's container (`docker:<EndpointID>`).
pub const CONTAINER_PREFIX: &str = "docker:";

/// An error answered to Docker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrResponse {
    #[serde(rename = "Err")]
    pub err: String,
}

/// The plugin's methods (the request path without its leading `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Activate,
    NetCapabilities,
    CreateNetwork,
    DeleteNetwork,
    CreateEndpoint,
    EndpointOperInfo,
    Join,
    Leave,
    DeleteEndpoint,
    DiscoverNew,
    DiscoverDelete,
    ProgramExternalConnectivity,
    RevokeExternalConnectivity,
    IpamCapabilities,
    DefaultAddressSpaces,
    RequestPool,
    ReleasePool,
    RequestAddress,
    ReleaseAddress,
}

impl Method {
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path.trim_start_matches('/') {
            "Plugin.Activate" => Self::Activate,
            "NetworkDriver.GetCapabilities" => Self::NetCapabilities,
            "NetworkDriver.CreateNetwork" => Self::CreateNetwork,
            "NetworkDriver.DeleteNetwork" => Self::DeleteNetwork,
            "NetworkDriver.CreateEndpoint" => Self::CreateEndpoint,
            "NetworkDriver.EndpointOperInfo" => Self::EndpointOperInfo,
            "NetworkDriver.Join" => Self::Join,
            "NetworkDriver.Leave" => Self::Leave,
            "NetworkDriver.DeleteEndpoint" => Self::DeleteEndpoint,
            "NetworkDriver.DiscoverNew" => Self::DiscoverNew,
            "NetworkDriver.DiscoverDelete" => Self::DiscoverDelete,
            "NetworkDriver.ProgramExternalConnectivity" => Self::ProgramExternalConnectivity,
            "NetworkDriver.RevokeExternalConnectivity" => Self::RevokeExternalConnectivity,
            "IpamDriver.GetCapabilities" => Self::IpamCapabilities,
            "IpamDriver.GetDefaultAddressSpaces" => Self::DefaultAddressSpaces,
            "IpamDriver.RequestPool" => Self::RequestPool,
            "IpamDriver.ReleasePool" => Self::ReleasePool,
            "IpamDriver.RequestAddress" => Self::RequestAddress,
            "IpamDriver.ReleaseAddress" => Self::ReleaseAddress,
            _ => return None,
        })
    }
}

/// The answers that do not depend on the cluster.
pub fn activate() -> Value {
    serde_json::json!({ "Implements": ["NetworkDriver", "IpamDriver"] })
}

/// A local-scope driver (dockerd 20.10 without a cluster store only runs those) whose
/// networks span hosts (`ConnectivityScope` global).
pub fn net_capabilities() -> Value {
    serde_json::json!({ "Scope": "local", "ConnectivityScope": "global" })
}

/// No MAC needed for addresses, and no replay of requests after a daemon restart: the
/// allocations live in the cluster.
pub fn ipam_capabilities() -> Value {
    serde_json::json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })
}

pub fn default_address_spaces() -> Value {
    serde_json::json!({
        "LocalDefaultAddressSpace": ADDRESS_SPACE,
        "GlobalDefaultAddressSpace": ADDRESS_SPACE,
    })
}

pub fn empty() -> Value {
    serde_json::json!({})
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestPoolRequest {
    pub address_space: String,
    pub pool: String,
    pub sub_pool: String,
    pub options: Option<BTreeMap<String, String>>,
    #[serde(rename = "V6")]
    pub v6: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PoolIdRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
    pub options: Option<BTreeMap<String, String>>,
}

impl AddressRequest {
    /// Whether Docker asks for the network's gateway (at `docker network create`).
    pub fn is_gateway(&self) -> bool {
        self.options
            .as_ref()
            .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
            .is_some_and(|t| t == GATEWAY_TYPE)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct IpamData {
    pub address_space: String,
    pub pool: String,
    pub gateway: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateNetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "IPv4Data")]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data")]
    pub ipv6_data: Option<Vec<IpamData>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointInterface {
    pub address: String,
    #[serde(rename = "AddressIPv6")]
    pub address_ipv6: String,
    pub mac_address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub interface: Option<EndpointInterface>,
    pub sandbox_key: String,
}

/// Which cluster network a Docker pool is, and whether this pool request created it
/// (then releasing the pool deletes it when no endpoint is left). Docker stores the
/// pool ID with its network, so this survives agent and daemon restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolId {
    pub network: String,
    pub created: bool,
}

const CREATED_SUFFIX: &str = "+created";

impl PoolId {
    pub fn encode(&self) -> String {
        if self.created {
            format!("{}{CREATED_SUFFIX}", self.network)
        } else {
            self.network.clone()
        }
    }

    pub fn decode(id: &str) -> Result<Self, String> {
        let (network, created) = match id.strip_suffix(CREATED_SUFFIX) {
            Some(network) => (network, true),
            None => (id, false),
        };
        crate::store::ipam::validate_name(network)
            .map_err(|_| format!("unknown address pool {id:?} (not one of this driver's)"))?;
        Ok(Self {
            network: network.to_string(),
            created,
        })
    }
}

/// The name a cluster network created from Docker gets when `--ipam-opt network=NAME`
/// does not give one: the subnet, readable (`docker-10.100.0.0-24`).
pub fn default_network_name(subnet: Ipv4Network) -> String {
    format!("docker-{}-{}", subnet.network(), subnet.prefix())
}

/// The cluster endpoint name of a Docker address: `docker-10.100.0.2`. It is known
/// when the address is requested (before Docker says which endpoint it is for), unique
/// in the network while the address is held, and the IPAM key names it from the start.
pub fn endpoint_name(ip: Ipv4Addr) -> String {
    format!("{ENDPOINT_PREFIX}{ip}")
}

/// The `container` an endpoint record carries for a Docker endpoint.
pub fn container_tag(endpoint_id: &str) -> String {
    format!("{CONTAINER_PREFIX}{endpoint_id}")
}

/// Parses Docker's `10.100.0.2/24` (or a bare address).
pub fn parse_address(text: &str) -> Result<Ipv4Addr, String> {
    let bare = text.split_once('/').map_or(text, |(ip, _)| ip);
    bare.parse()
        .map_err(|_| format!("invalid IPv4 address {text:?}"))
}

/// Docker's form of an address on a subnet: `10.100.0.2/24`.
pub fn with_prefix(ip: Ipv4Addr, subnet: Ipv4Network) -> String {
    format!("{ip}/{}", subnet.prefix())
}

/// The answer to RequestPool: the pool is the cluster network's subnet, and its
/// gateway is the cluster network's (so Docker does not ask for one of its own).
pub fn pool_response(pool: &PoolId, subnet: Ipv4Network, gateway: Ipv4Addr) -> Value {
    serde_json::json!({
        "PoolID": pool.encode(),
        "Pool": subnet.to_string(),
        "Data": { GATEWAY_TYPE: with_prefix(gateway, subnet) },
    })
}

pub fn address_response(ip: Ipv4Addr, subnet: Ipv4Network) -> Value {
    serde_json::json!({ "Address": with_prefix(ip, subnet), "Data": {} })
}

/// The answer to CreateEndpoint: the MAC the overlay derives from the address when
/// Docker did not give one (it must not repeat an address Docker gave).
pub fn create_endpoint_response(mac: Option<&str>) -> Value {
    match mac {
        Some(mac) => serde_json::json!({ "Interface": { "MacAddress": mac } }),
        None => serde_json::json!({ "Interface": {} }),
    }
}

/// The answer to Join: Docker moves `src_name` into the container and names it
/// `eth<N>`; the default route goes through the network's gateway, so Docker does not
/// attach the container to a gateway bridge of its own.
pub fn join_response(src_name: &str, gateway: Ipv4Addr) -> Value {
    serde_json::json!({
        "InterfaceName": { "SrcName": src_name, "DstPrefix": DST_PREFIX },
        "Gateway": gateway.to_string(),
        "DisableGatewayService": true,
    })
}

pub fn oper_info(network: &str, endpoint: &str, ip: Ipv4Addr, mac: &str) -> Value {
    serde_json::json!({ "Value": {
        "network": network, "endpoint": endpoint, "ip": ip.to_string(), "mac": mac,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_from_paths() {
        assert_eq!(
            Method::from_path("/Plugin.Activate"),
            Some(Method::Activate)
        );
        assert_eq!(
            Method::from_path("/IpamDriver.GetCapabilities"),
            Some(Method::IpamCapabilities)
        );
        assert_eq!(
            Method::from_path("/NetworkDriver.GetCapabilities"),
            Some(Method::NetCapabilities)
        );
        assert_eq!(
            Method::from_path("/NetworkDriver.RevokeExternalConnectivity"),
            Some(Method::RevokeExternalConnectivity)
        );
        assert_eq!(Method::from_path("/NetworkDriver.Nope"), None);
        assert_eq!(
            activate()["Implements"],
            serde_json::json!(["NetworkDriver", "IpamDriver"])
        );
        assert_eq!(net_capabilities()["Scope"], "local");
    }

    #[test]
    fn pool_ids_round_trip_and_refuse_foreign_ones() {
        for pool in [
            PoolId {
                network: "net1".into(),
                created: false,
            },
            PoolId {
                network: "net1".into(),
                created: true,
            },
        ] {
            assert_eq!(PoolId::decode(&pool.encode()).unwrap(), pool);
        }
        assert_eq!(PoolId::decode("net1+created").unwrap().network, "net1");
        assert!(PoolId::decode("../x").is_err());
        assert!(PoolId::decode("").is_err());
    }

    #[test]
    fn requests_decode_from_dockers_json() {
        let r: RequestPoolRequest = serde_json::from_str(
            r#"{"AddressSpace":"overlay","Pool":"10.100.0.0/24","SubPool":"","Options":{"network":"net1"},"V6":false}"#,
        )
        .unwrap();
        assert_eq!(r.pool, "10.100.0.0/24");
        assert_eq!(r.options.unwrap()["network"], "net1");
        let a: AddressRequest = serde_json::from_str(
            r#"{"PoolID":"net1","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
        )
        .unwrap();
        assert!(a.is_gateway());
        let a: AddressRequest =
            serde_json::from_str(r#"{"PoolID":"net1","Address":"10.100.0.9","Options":null}"#)
                .unwrap();
        assert!(!a.is_gateway());
        assert_eq!(
            parse_address(&a.address).unwrap(),
            Ipv4Addr::new(10, 100, 0, 9)
        );
        let e: EndpointRequest = serde_json::from_str(
            r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":"10.100.0.2/24","AddressIPv6":"","MacAddress":""},"Options":{}}"#,
        )
        .unwrap();
        assert_eq!(e.interface.unwrap().address, "10.100.0.2/24");
        let c: CreateNetworkRequest = serde_json::from_str(
            r#"{"NetworkID":"n","Options":{},"IPv4Data":[{"AddressSpace":"overlay","Pool":"10.100.0.0/24","Gateway":"10.100.0.1/24"}],"IPv6Data":null}"#,
        )
        .unwrap();
        assert_eq!(c.ipv4_data.unwrap()[0].pool, "10.100.0.0/24");
    }

    #[test]
    fn responses_have_dockers_field_names() {
        let subnet: Ipv4Network = "10.100.0.0/24".parse().unwrap();
        let gw = Ipv4Addr::new(10, 100, 0, 1);
        let pool = PoolId {
            network: "net1".into(),
            created: true,
        };
        let r = pool_response(&pool, subnet, gw);
        assert_eq!(r["PoolID"], "net1+created");
        assert_eq!(r["Pool"], "10.100.0.0/24");
        assert_eq!(r["Data"]["com.docker.network.gateway"], "10.100.0.1/24");
        let a = address_response(Ipv4Addr::new(10, 100, 0, 2), subnet);
        assert_eq!(a["Address"], "10.100.0.2/24");
        let j = join_response("ov0123456789p", gw);
        assert_eq!(j["InterfaceName"]["SrcName"], "ov0123456789p");
        assert_eq!(j["InterfaceName"]["DstPrefix"], "eth");
        assert_eq!(j["Gateway"], "10.100.0.1");
        assert_eq!(
            create_endpoint_response(None),
            serde_json::json!({"Interface": {}})
        );
        assert_eq!(
            create_endpoint_response(Some("02:42:0a:64:00:02"))["Interface"]["MacAddress"],
            "02:42:0a:64:00:02"
        );
        let err = serde_json::to_value(ErrResponse { err: "x".into() }).unwrap();
        assert_eq!(err, serde_json::json!({"Err": "x"}));
    }

    #[test]
    fn names_are_valid_cluster_names() {
        let subnet: Ipv4Network = "10.100.0.0/24".parse().unwrap();
        assert_eq!(default_network_name(subnet), "docker-10.100.0.0-24");
        assert!(crate::store::ipam::validate_name(&default_network_name(subnet)).is_ok());
        let name = endpoint_name(Ipv4Addr::new(10, 100, 0, 2));
        assert_eq!(name, "docker-10.100.0.2");
        assert!(crate::store::ipam::validate_name(&name).is_ok());
        assert_eq!(
            parse_address("10.100.0.2/24").unwrap(),
            Ipv4Addr::new(10, 100, 0, 2)
        );
        assert!(parse_address("fe80::1/64").is_err());
    }
}
