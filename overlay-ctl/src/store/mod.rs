//! The cluster-state interface: what the control plane stores (networks, VNI and
//! address allocations, nodes, endpoints, the applied-index records) and the rules that
//! keep it consistent when several hosts write at once. Start reading here.
//!
//! Exclusivity comes from the store's check-and-set: a VNI or an address is taken by
//! whoever creates its key first (a create-only write), so concurrent creators and
//! allocators on different hosts never get the same one. Every input is validated
//! before the first write, and a multi-key operation that loses a race rolls back what
//! it wrote. Every record read is validated too, by the same rules, in [`records`]
//! (anyone who can write the prefix can write anything): reads skip or refuse invalid
//! records.
//!
//! Layout of this module:
//! - here: the record types ([`Network`], [`Endpoint`], [`NodeInfo`], [`IpAllocation`],
//!   [`SubnetClaims`]), [`StoreError`] and [`Store`], the handle every operation hangs
//!   off;
//! - [`keys`]: the key layout (which key holds what), built and parsed in one place;
//! - the operations, by entity: `networks` (with VNI and subnet claims, and
//!   [`Store::bootstrap`]), `allocations` (the cluster-wide IPAM bookkeeping),
//!   `nodes`, `endpoints`, `applied` (convergence: which index each node applied);
//! - [`ipam`]: the pure address and naming rules; [`mtu`]: a new network's MTU from
//!   the nodes' underlays; [`records`]: validation of every
//!   record read; [`identity`]: the cluster id that tells a store that lost its data
//!   from the real one; [`settings`]: the cluster-wide settings (the VXLAN port);
//! - the backend: [`backend`] names the KV primitives the operations use
//!   ([`backend::KvBackend`]: get, list, keys, put, check-and-set, delete, session-bound
//!   put, blocking list from an index), implemented by [`consul`] (the Consul HTTP
//!   client) and [`etcd`] (the etcd v3 client: leases, transactions, revision watch);
//!   [`backend::StoreBackend`] is the one a [`Store`] runs on, chosen by `--store`
//!   ([`config`]). The operations reach the backend only through [`Store::kv`], which
//!   exposes nothing but those primitives; [`session`] holds node sessions (a Consul
//!   session, an etcd lease). Code outside the store that needs Consul itself (the
//!   catalog) goes through [`Store::consul`], which refuses on etcd;
//! - [`devserver`]: the Consul-compatible development server (`overlay-ctl dev-server`,
//!   as `consul agent -dev`) that `cargo xtask run`, the demo and the tests start.
mod allocations;
mod applied;
pub mod backend;
pub mod config;
pub mod consul;
pub mod devserver;
mod endpoints;
pub mod etcd;
pub mod feed;
pub mod identity;
pub mod ipam;
pub mod journal;
pub mod keys;
pub mod mtu;
mod networks;
mod nodes;
pub mod records;
mod session;
pub mod settings;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_common::MacAddr;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tracing::debug;

pub use self::keys::DEFAULT_PREFIX;
pub use crate::dataplane::egress::EgressMode;
use crate::store::{
    backend::{KvBackend, KvPair, StoreBackend},
    config::StoreConfig,
    consul::{ConsulClient, ConsulError},
    etcd::{EtcdClient, EtcdError},
    ipam::IpamError,
    keys::Keys,
};

pub const DEFAULT_NETWORK: &str = "default";
pub const DEFAULT_SUBNET: &str = "10.1.0.0/16";
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Config(#[from] config::StoreConfigError),
    #[error("{what} needs a Consul store; this cluster's state is in {store}")]
    NeedsConsul { what: &'static str, store: String },
    #[error(transparent)]
    Invalid(#[from] IpamError),
    #[error(transparent)]
    Mtu(#[from] mtu::MtuError),
    #[error("network {0:?} already exists")]
    NetworkExists(String),
    #[error("network {0:?} does not exist")]
    NoSuchNetwork(String),
    #[error("VNI {vni} is already used by network {owner:?}")]
    VniTaken { vni: u32, owner: String },
    #[error("no free VNI left")]
    NoFreeVni,
    #[error("subnet {subnet} overlaps network {other:?} ({other_subnet})")]
    SubnetOverlap {
        subnet: Ipv4Network,
        other: String,
        other_subnet: Ipv4Network,
    },
    #[error(
        "network {name:?} still has {count} endpoint(s); remove them first or force the deletion"
    )]
    NetworkInUse { name: String, count: usize },
    #[error("an endpoint named {id:?} already exists on network {network:?}")]
    EndpointExists { network: String, id: String },
    #[error("address {ip} is already allocated in network {network:?}")]
    AddressInUse { network: String, ip: Ipv4Addr },
    #[error("network {network:?} ({subnet}) has no free addresses left")]
    Exhausted {
        network: String,
        subnet: Ipv4Network,
    },
    #[error("node {0:?} is registered by another live session, or its previous session's lock-delay has not passed yet")]
    NodeHeld(String),
    #[error("invalid {what} {value:?}: {reason}")]
    BadName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("corrupt value at {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("invalid record {0}")]
    Rejected(#[from] records::Rejection),
    #[error(transparent)]
    BadVxlanPort(#[from] settings::BadVxlanPort),
    #[error(
        "network {name:?} changed while it was being updated {attempts} times in a row; try again"
    )]
    UpdateContended { name: String, attempts: u32 },
    #[error("invalid record {0}; --force deletes it")]
    InvalidNetworkRecord(records::Rejection),
    #[error("{what}: {count} of at most {limit} (the data plane's {map} map holds {limit} entries); remove some first")]
    Capacity {
        what: &'static str,
        count: usize,
        limit: u32,
        map: &'static str,
    },
}

/// An overlay network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    #[serde(with = "as_string")]
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub mtu: u32,
    /// What its containers may do towards destinations outside every overlay subnet.
    /// Records written before this field existed read as the default, masquerade.
    #[serde(default)]
    pub egress: EgressMode,
}

/// Who holds an allocated address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpAllocation {
    pub endpoint: String,
    pub node: String,
}

/// The subnets networks hold (CIDR -> network name), all in one key updated with
/// check-and-set on its modify index: two `network create` with overlapping subnets
/// cannot both add theirs, however they interleave.
pub type SubnetClaims = std::collections::BTreeMap<String, String>;

/// A node of the cluster: where its VTEP is, and how large a frame its underlay carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub vtep: Ipv4Addr,
    pub iface: String,
    /// The MTU of `iface`, from which networks created without `--mtu` take theirs
    /// (see [`mtu`]). Absent in records of agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_mtu: Option<u32>,
}

/// A container's interface on a network.
///
/// There is no VTEP here: an endpoint is reached at its node's *current* VTEP (the
/// `nodes/<name>` record, which `cluster bind` keeps up to date), so a copy in every
/// endpoint could only go stale. Records written before this change carry a `vtep` field;
/// it is accepted and ignored (unknown fields are), and no longer written. Whoever needs
/// the address (the planner, `run --service`'s catalog entry) asks the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub network: String,
    pub ip: Ipv4Addr,
    /// Stored as its text, `02:42:0a:64:00:02`.
    pub mac: MacAddr,
    pub node: String,
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The container's process on `node`, for `run` containers: when it is gone the
    /// node's agent removes what the container held (its `run` may have been killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The `/run/netns` name `run` created for the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

mod as_string {
    use std::{fmt::Display, str::FromStr};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Decodes a JSON value read from the store.
pub fn decode<T: DeserializeOwned>(pair: &KvPair) -> Result<T, StoreError> {
    serde_json::from_slice(&pair.value).map_err(|e| StoreError::Corrupt {
        key: pair.key.clone(),
        message: e.to_string(),
    })
}

/// A record that failed validation is skipped, with a warning.
fn skip_invalid<T>(parsed: Result<T, records::Rejection>) -> Option<T> {
    parsed
        .map_err(|r| debug!(key = %r.key, reason = %r.reason, "skipping an invalid record: {}", r.detail))
        .ok()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Node names and endpoint IDs become key segments: no `/`, whitespace or control
/// characters, and not empty.
pub(crate) fn check_segment(what: &'static str, value: &str) -> Result<(), StoreError> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > 256 {
        Some("longer than 256 characters")
    } else if value
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        Some("must not contain '/', spaces or control characters")
    } else if value == "." || value == ".." {
        Some("not a usable name")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::BadName {
            what,
            value: value.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The part of the KV store the data plane follows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub networks: Vec<Network>,
    pub nodes: Vec<NodeInfo>,
    pub endpoints: Vec<Endpoint>,
    /// The cluster's VXLAN port (`None`: the store names none, the default applies).
    pub vxlan_port: Option<u16>,
}

impl ClusterState {
    /// The valid part of everything under the store prefix (one recursive read or watch
    /// answer), as the cluster sees it: see [`records::parse_snapshot`], the one place
    /// where records are validated. Invalid records are left out.
    pub fn from_pairs(prefix: &str, pairs: &[KvPair]) -> Self {
        records::parse_snapshot(prefix, pairs, records::View::Cluster).state
    }

    /// Endpoints placed on `node`.
    pub fn local_endpoints<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Endpoint> {
        self.endpoints.iter().filter(move |e| e.node == node)
    }
}

impl StoreError {
    /// True when the store did not answer (Consul unreachable, etcd without quorum or
    /// every member down), as opposed to answering with a refusal.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Consul(ConsulError::Transport { .. } | ConsulError::Timeout { .. }) => true,
            Self::Etcd(e) => e.is_unavailable(),
            _ => false,
        }
    }

    /// True for errors of the store itself (Consul's or etcd's), as opposed to the
    /// cluster-state rules refusing the request.
    pub fn is_backend(&self) -> bool {
        matches!(self, Self::Consul(_) | Self::Etcd(_))
    }

    /// What kind of failure this is, for logs and `status` (an ACL denial or a rate limit
    /// is not "unreachable"): Consul's own classes, etcd's mapped onto them.
    pub fn class(&self) -> consul::ErrorClass {
        match self {
            Self::Consul(e) => e.class(),
            Self::Etcd(e) if e.is_unavailable() => consul::ErrorClass::Unreachable,
            Self::Config(_) => consul::ErrorClass::Invalid,
            _ => consul::ErrorClass::Refused,
        }
    }
}

/// The store the local agent reports in `status` (kind, endpoints, prefix), for the
/// plugins (Docker, CNI) that follow it; TLS files from the environment (etcdctl's).
pub async fn agent_store(status: &crate::agent::control::AgentStatus) -> Result<Store, StoreError> {
    let config = StoreConfig::of_agent(
        &status.consul.store,
        &status.consul.addr,
        crate::store::etcd::TlsFiles::default(),
    )?;
    Store::connect(&config, &status.consul.prefix).await
}

/// The cluster state on top of a [`StoreBackend`] (Consul or etcd).
#[derive(Clone, Debug)]
pub struct Store {
    backend: StoreBackend,
    keys: Keys,
}

impl Store {
    /// The cluster state in Consul. `prefix` is normalised to end with `/` (an empty
    /// prefix is `overlay/`).
    pub fn new(client: ConsulClient, prefix: &str) -> Self {
        Self::with_backend(StoreBackend::Consul(client), prefix)
    }

    /// The cluster state in etcd.
    pub fn etcd(client: EtcdClient, prefix: &str) -> Self {
        Self::with_backend(StoreBackend::Etcd(client), prefix)
    }

    /// A store on `backend`; on Consul its writes of endpoints and allocations go
    /// through the change journal that lets agents follow them ([`journal`]).
    pub fn with_backend(backend: StoreBackend, prefix: &str) -> Self {
        let keys = Keys::new(prefix);
        let backend = match backend {
            StoreBackend::Consul(client) => {
                StoreBackend::Consul(client.with_journal(keys.prefix()))
            }
            etcd => etcd,
        };
        Self { backend, keys }
    }

    /// Connects to the store `config` names (etcd connections are made lazily: this
    /// succeeds while members are down).
    pub async fn connect(config: &StoreConfig, prefix: &str) -> Result<Self, StoreError> {
        let backend = match config {
            StoreConfig::Consul { addr, tls } => {
                let config = consul::ConsulConfig::resolve(addr.as_deref(), tls)?;
                StoreBackend::Consul(ConsulClient::from_config(&config)?)
            }
            StoreConfig::Etcd(config) => {
                StoreBackend::Etcd(EtcdClient::connect(config.clone()).await?)
            }
        };
        Ok(Self::with_backend(backend, prefix))
    }

    /// The backend: its KV primitives ([`KvBackend`]), its kind and address.
    pub fn kv(&self) -> &StoreBackend {
        &self.backend
    }

    fn backend(&self) -> &StoreBackend {
        &self.backend
    }

    /// The bytes read from the store since this client was made (total, every clone of
    /// the store included): what the feed's economy is measured in.
    pub fn bytes_read(&self) -> u64 {
        self.backend.bytes_read()
    }

    /// The store as a URL (`consul://host:port`, `etcd://a:2379,...`).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The Consul client, for `what` (e.g. "registering a service in the catalog") that
    /// only Consul offers; a clear error on etcd.
    pub fn consul(&self, what: &'static str) -> Result<&ConsulClient, StoreError> {
        match &self.backend {
            StoreBackend::Consul(c) => Ok(c),
            StoreBackend::Etcd(_) => Err(StoreError::NeedsConsul {
                what,
                store: self.describe(),
            }),
        }
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The key prefix, ending with `/`.
    pub fn prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// Where the networks live (for watches).
    pub fn networks_prefix(&self) -> String {
        self.keys.networks()
    }

    /// Where the endpoints live (for watches).
    pub fn endpoints_prefix(&self) -> String {
        self.keys.endpoints()
    }

    /// Where the nodes live (for watches).
    pub fn nodes_prefix(&self) -> String {
        self.keys.nodes()
    }

    pub fn vni_key(&self, vni: u32) -> String {
        self.keys.vni(vni)
    }

    pub fn bootstrap_key(&self) -> String {
        self.keys.bootstrap()
    }

    /// The one key holding every network's subnet ([`SubnetClaims`]).
    pub fn subnets_key(&self) -> String {
        self.keys.subnets()
    }

    /// Everything under the prefix in one read, parsed at the validation boundary
    /// ([`records::parse_snapshot`]): the valid cluster state and the rejected records.
    pub async fn snapshot(&self) -> Result<records::Snapshot, StoreError> {
        let pairs = self.kv().list(self.prefix()).await?;
        Ok(records::parse_snapshot(
            self.prefix(),
            &pairs,
            records::View::Cluster,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_json_layout() {
        let n = Network {
            name: "web".into(),
            subnet: "10.100.0.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 100, 0, 1),
            vni: 42,
            mtu: 1450,
            egress: EgressMode::None,
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&n)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name":"web","subnet":"10.100.0.0/24","gateway":"10.100.0.1","vni":42,"mtu":1450,"egress":"none"})
        );
        let back: Network = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, n);
        // A record written before networks had an egress mode reads as masquerade.
        let mut old = v;
        old.as_object_mut().unwrap().remove("egress");
        let old: Network = serde_json::from_value(old).unwrap();
        assert_eq!(old.egress, EgressMode::Masquerade);
    }

    #[test]
    fn endpoint_json_omits_missing_container() {
        let e = Endpoint {
            id: "abc".into(),
            network: "web".into(),
            ip: Ipv4Addr::new(10, 100, 0, 2),
            mac: "02:00:0a:64:00:02".parse().unwrap(),
            node: "n1".into(),
            ifname: "ov-abc".into(),
            container: None,
            pid: None,
            netns: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&e)).unwrap();
        assert!(v.get("container").is_none());
        assert!(v.get("vtep").is_none());
        assert_eq!(v["mac"], "02:00:0a:64:00:02");
        // A record of an earlier version, with the VTEP it used to carry, still reads.
        let mut old = v.clone();
        old["vtep"] = "192.0.2.1".into();
        assert_eq!(serde_json::from_value::<Endpoint>(old).unwrap(), e);
    }

    #[test]
    fn segments() {
        assert!(check_segment("node name", "node-1").is_ok());
        assert!(check_segment("node name", "").is_err());
        assert!(check_segment("node name", "a/b").is_err());
        assert!(check_segment("node name", "a b").is_err());
        assert!(check_segment("node name", "..").is_err());
    }

    #[test]
    fn prefixes_normalise() {
        let c = ConsulClient::new("127.0.0.1:1", None).unwrap();
        assert_eq!(Store::new(c.clone(), "").prefix(), "overlay/");
        assert_eq!(Store::new(c.clone(), "/x/y").prefix(), "x/y/");
        assert_eq!(
            Store::new(c, "overlay/").keys().network("a"),
            "overlay/networks/a"
        );
    }
}
