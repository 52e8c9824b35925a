//! The cluster state in Consul's KV store: networks, VNI and address allocations, nodes
//! and endpoints, under a configurable prefix (default `overlay/`). Values are JSON:
//!
//! | key | value |
//! | --- | --- |
//! | `overlay/networks/<name>` | [`Network`] |
//! | `overlay/vni/<N>` | the network name owning VNI N (created with cas=0) |
//! | `overlay/ipam/<network>/<ip>` | [`IpAllocation`] (created with cas=0) |
//! | `overlay/nodes/<node>` | [`NodeInfo`], held by the node's session |
//! | `overlay/endpoints/<network>/<id>` | [`Endpoint`] |
//! | `overlay/config/bootstrapped` | marker written by [`Store::bootstrap`] |
//! | `overlay/config/cluster-id` | the cluster's identity, see [`crate::store::identity`] |
//! | `overlay/subnets` | [`SubnetClaims`]: every network's subnet, updated with cas=index |
//! | `overlay/applied/<node>` | the KV index whose state the node's maps hold |
//!
//! Exclusivity comes from Consul's check-and-set: a VNI or an address is taken by
//! whoever creates its key first (`?cas=0`), so concurrent creators and allocators on
//! different hosts never get the same one. Every input is validated before the first
//! write, and a multi-key operation that loses a race rolls back what it wrote. Every
//! record read is validated too, by the same rules, in [`crate::store::records`] (anyone who can
//! write the prefix can write anything): reads skip or refuse invalid records.
//!
//! The rest of the store lives beside it: [`consul`] (the Consul HTTP API client),
//! [`records`] (validation of every record read), [`ipam`] (the address allocator's and
//! the CLI's naming rules) and [`identity`] (the cluster id that tells a store that lost
//! its data from the real one).
pub mod consul;
pub mod etcd;
pub mod identity;
pub mod ipam;
pub mod records;
use std::{collections::BTreeSet, net::Ipv4Addr, str::FromStr};

use ipnetwork::Ipv4Network;
use overlay_common::{capacity, map_names};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    store::consul::{ConsulClient, ConsulError, KvPair},
    store::ipam::IpamError,
};

pub const DEFAULT_PREFIX: &str = "overlay/";
/// The network created by [`Store::bootstrap`] (as SocketPlane's default network).
pub const DEFAULT_NETWORK: &str = "default";
pub const DEFAULT_SUBNET: &str = "10.1.0.0/16";
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Invalid(#[from] IpamError),
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

/// A node of the cluster: where its VTEP is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub vtep: Ipv4Addr,
    pub iface: String,
}

/// A container's interface on a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub network: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub node: String,
    pub vtep: Ipv4Addr,
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

/// The cluster state on top of a [`ConsulClient`].
#[derive(Clone, Debug)]
pub struct Store {
    client: ConsulClient,
    prefix: String,
}

impl Store {
    /// `prefix` is normalised to end with `/` (an empty prefix is `overlay/`).
    pub fn new(client: ConsulClient, prefix: &str) -> Self {
        let mut prefix = prefix.trim_matches('/').to_string();
        if prefix.is_empty() {
            prefix = DEFAULT_PREFIX.trim_end_matches('/').to_string();
        }
        prefix.push('/');
        Self { client, prefix }
    }

    pub fn client(&self) -> &ConsulClient {
        &self.client
    }

    /// The key prefix, ending with `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where the networks live (for watches).
    pub fn networks_prefix(&self) -> String {
        format!("{}networks/", self.prefix)
    }

    /// Where the endpoints live (for watches).
    pub fn endpoints_prefix(&self) -> String {
        format!("{}endpoints/", self.prefix)
    }

    /// Where the nodes live (for watches).
    pub fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    fn network_key(&self, name: &str) -> String {
        format!("{}networks/{name}", self.prefix)
    }

    fn vni_prefix(&self) -> String {
        format!("{}vni/", self.prefix)
    }

    pub fn vni_key(&self, vni: u32) -> String {
        format!("{}vni/{vni}", self.prefix)
    }

    fn ipam_prefix(&self, network: &str) -> String {
        format!("{}ipam/{network}/", self.prefix)
    }

    fn ipam_key(&self, network: &str, ip: Ipv4Addr) -> String {
        format!("{}ipam/{network}/{ip}", self.prefix)
    }

    fn node_key(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    fn endpoint_prefix(&self, network: &str) -> String {
        format!("{}endpoints/{network}/", self.prefix)
    }

    fn endpoint_key(&self, network: &str, id: &str) -> String {
        format!("{}endpoints/{network}/{id}", self.prefix)
    }

    fn applied_key(&self, node: &str) -> String {
        format!("{}applied/{node}", self.prefix)
    }

    pub fn bootstrap_key(&self) -> String {
        format!("{}config/bootstrapped", self.prefix)
    }

    /// The one key holding every network's subnet ([`SubnetClaims`]).
    pub fn subnets_key(&self) -> String {
        format!("{}subnets", self.prefix)
    }

    // ---- networks ----

    /// Creates a network. Everything is validated before anything is written; `gateway`
    /// defaults to the first address, `vni` to the lowest free one, `mtu` to
    /// [`ipam::DEFAULT_MTU`]. On a lost race nothing stays written.
    pub async fn create_network(
        &self,
        name: &str,
        cidr: &str,
        gateway: Option<Ipv4Addr>,
        vni: Option<u64>,
        mtu: Option<u32>,
    ) -> Result<Network, StoreError> {
        ipam::validate_name(name)?;
        let subnet = ipam::parse_subnet(cidr)?;
        let gateway = gateway.unwrap_or_else(|| ipam::default_gateway(subnet));
        ipam::validate_gateway(subnet, gateway)?;
        let vni = vni.map(ipam::validate_vni).transpose()?;
        let mtu = mtu.unwrap_or(ipam::DEFAULT_MTU);
        ipam::validate_mtu(mtu)?;

        let existing = self.list_networks().await?;
        if existing.iter().any(|n| n.name == name) {
            return Err(StoreError::NetworkExists(name.to_string()));
        }
        // Every node's NETWORKS and SUBNETS maps hold one entry per network.
        let limit = capacity::NETWORKS.min(capacity::SUBNETS);
        if existing.len() >= limit as usize {
            return Err(StoreError::Capacity {
                what: "the cluster has its maximum number of networks",
                count: existing.len(),
                limit,
                map: map_names::NETWORKS,
            });
        }
        if let Some(other) = existing.iter().find(|n| n.subnet.overlaps(subnet)) {
            return Err(StoreError::SubnetOverlap {
                subnet,
                other: other.name.clone(),
                other_subnet: other.subnet,
            });
        }
        // Refuse a requested VNI that is visibly taken before writing anything (its
        // create-only claim below still decides a race).
        if let Some(vni) = vni {
            if let Some(pair) = self.client.get(&self.vni_key(vni)).await? {
                return Err(StoreError::VniTaken {
                    vni,
                    owner: pair.value_str(),
                });
            }
        }
        // The check that decides: the subnet is added to the claims with check-and-set.
        // Only a claim this call added is rolled back (a concurrent create of the same
        // name may hold it).
        let claimed = self.claim_subnet(name, subnet).await?;
        crate::testhook::pause("subnet-claimed");
        let vni = match self.claim_vni(name, vni).await {
            Ok(vni) => vni,
            Err(e) => {
                if claimed {
                    self.unclaim_subnet(subnet, name).await;
                }
                return Err(e);
            }
        };
        crate::testhook::pause("vni-claimed");
        let network = Network {
            name: name.to_string(),
            subnet,
            gateway,
            vni,
            mtu,
        };
        let created = self
            .client
            .put_cas(&self.network_key(name), &encode(&network), 0)
            .await;
        match created {
            Ok(true) => {
                info!(network = name, %subnet, %gateway, vni, mtu, "network created");
                Ok(network)
            }
            Ok(false) => {
                self.unclaim_vni(vni, name).await;
                if claimed {
                    self.unclaim_subnet(subnet, name).await;
                }
                Err(StoreError::NetworkExists(name.to_string()))
            }
            Err(e) => {
                self.unclaim_vni(vni, name).await;
                if claimed {
                    self.unclaim_subnet(subnet, name).await;
                }
                Err(e.into())
            }
        }
    }

    /// The subnet claims and the modify index to update them with (0: no key yet).
    pub async fn subnet_claims(&self) -> Result<(SubnetClaims, u64), StoreError> {
        match self.client.get(&self.subnets_key()).await? {
            Some(pair) => Ok((decode(&pair)?, pair.modify_index)),
            None => Ok((SubnetClaims::new(), 0)),
        }
    }

    /// Adds `subnet` for `name` to the claims unless a claimed subnet overlaps it: one
    /// check-and-set write on the claims' modify index, re-read and re-checked when a
    /// concurrent writer got there first. Returns whether it was added now (false: it
    /// was already `name`'s).
    pub async fn claim_subnet(&self, name: &str, subnet: Ipv4Network) -> Result<bool, StoreError> {
        loop {
            let (mut claims, index) = self.subnet_claims().await?;
            for (cidr, owner) in &claims {
                let Ok(other_subnet) = cidr.parse::<Ipv4Network>() else {
                    continue;
                };
                if owner == name && other_subnet == subnet {
                    return Ok(false);
                }
                if other_subnet.overlaps(subnet) {
                    return Err(StoreError::SubnetOverlap {
                        subnet,
                        other: owner.clone(),
                        other_subnet,
                    });
                }
            }
            claims.insert(subnet.to_string(), name.to_string());
            if self
                .client
                .put_cas(&self.subnets_key(), &encode(&claims), index)
                .await?
            {
                return Ok(true);
            }
            debug!(%subnet, "subnet claims changed concurrently; checking again");
        }
    }

    /// Removes `subnet` from the claims if it is still `name`'s and no network `name` with
    /// that subnet exists (best effort, logged).
    pub async fn unclaim_subnet(&self, subnet: Ipv4Network, name: &str) {
        let result = async {
            if let Some(pair) = self.client.get(&self.network_key(name)).await? {
                if decode::<Network>(&pair).is_ok_and(|n| n.subnet == subnet) {
                    return Ok(());
                }
            }
            loop {
                let (mut claims, index) = self.subnet_claims().await?;
                if claims.get(&subnet.to_string()).map(String::as_str) != Some(name) {
                    return Ok(());
                }
                claims.remove(&subnet.to_string());
                if self
                    .client
                    .put_cas(&self.subnets_key(), &encode(&claims), index)
                    .await?
                {
                    return Ok::<_, StoreError>(());
                }
            }
        }
        .await;
        if let Err(e) = result {
            warn!(%subnet, network = name, error = %e, "could not remove a subnet claim");
        }
    }

    /// Takes `vni` (or the lowest free one) for `name` with a create-only write.
    async fn claim_vni(&self, name: &str, wanted: Option<u32>) -> Result<u32, StoreError> {
        if let Some(vni) = wanted {
            if self
                .client
                .put_cas(&self.vni_key(vni), name.as_bytes(), 0)
                .await?
            {
                return Ok(vni);
            }
            let owner = self
                .client
                .get(&self.vni_key(vni))
                .await?
                .map(|p| p.value_str())
                .unwrap_or_default();
            return Err(StoreError::VniTaken { vni, owner });
        }
        let prefix = self.vni_prefix();
        let mut taken: BTreeSet<u32> = self
            .client
            .keys(&prefix)
            .await?
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.parse().ok())
            .collect();
        let mut candidate = ipam::MIN_VNI;
        loop {
            while taken.contains(&candidate) {
                candidate = candidate.checked_add(1).ok_or(StoreError::NoFreeVni)?;
            }
            if candidate > ipam::MAX_VNI {
                return Err(StoreError::NoFreeVni);
            }
            if self
                .client
                .put_cas(&self.vni_key(candidate), name.as_bytes(), 0)
                .await?
            {
                return Ok(candidate);
            }
            debug!(vni = candidate, "VNI taken concurrently; trying the next");
            taken.insert(candidate);
        }
    }

    /// Best-effort removal of a VNI claim, only if it is still `name`'s.
    pub async fn unclaim_vni(&self, vni: u32, name: &str) {
        let key = self.vni_key(vni);
        let result = async {
            if let Some(pair) = self.client.get(&key).await? {
                if pair.value == name.as_bytes() {
                    self.client.delete_cas(&key, pair.modify_index).await?;
                }
            }
            Ok::<_, ConsulError>(())
        }
        .await;
        if let Err(e) = result {
            warn!(%key, error = %e, "could not roll back a VNI claim");
        }
    }

    pub async fn get_network(&self, name: &str) -> Result<Option<Network>, StoreError> {
        ipam::validate_name(name)?;
        match self.client.get(&self.network_key(name)).await? {
            Some(pair) => Ok(Some(records::parse_network(&self.prefix, &pair)?)),
            None => Ok(None),
        }
    }

    async fn require_network(&self, name: &str) -> Result<Network, StoreError> {
        self.get_network(name)
            .await?
            .ok_or_else(|| StoreError::NoSuchNetwork(name.to_string()))
    }

    /// All networks whose records are valid, by name (invalid ones are skipped with a
    /// warning; [`Store::snapshot`] says why, with the cross-record rules).
    pub async fn list_networks(&self) -> Result<Vec<Network>, StoreError> {
        let mut networks: Vec<Network> = self
            .client
            .list(&self.networks_prefix())
            .await?
            .iter()
            .filter_map(|p| skip_invalid(records::parse_network(&self.prefix, p)))
            .collect();
        networks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(networks)
    }

    /// Everything under the prefix in one read, parsed at the validation boundary
    /// ([`records::parse_snapshot`]): the valid cluster state and the rejected records.
    pub async fn snapshot(&self) -> Result<records::Snapshot, StoreError> {
        let pairs = self.client.list(&self.prefix).await?;
        Ok(records::parse_snapshot(
            &self.prefix,
            &pairs,
            records::View::Cluster,
        ))
    }

    /// Deletes a network with its VNI claim, address allocations and (with `force`)
    /// endpoints. Refused while endpoints exist unless `force`.
    /// An invalid network record is deleted too, with `force` (its VNI claim stays).
    pub async fn delete_network(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let network = match self.require_network(name).await {
            Ok(network) => Some(network),
            Err(StoreError::Rejected(r)) if force => {
                warn!(key = %r.key, "deleting an invalid network record: {}", r.detail);
                None
            }
            Err(StoreError::Rejected(r)) => {
                return Err(StoreError::InvalidNetworkRecord(r));
            }
            Err(e) => return Err(e),
        };
        // Every endpoint record counts here, valid or not: they all go with the network.
        let endpoints = self.client.keys(&self.endpoint_prefix(name)).await?;
        if !endpoints.is_empty() && !force {
            return Err(StoreError::NetworkInUse {
                name: name.to_string(),
                count: endpoints.len(),
            });
        }
        // The network key first, so no new allocation can start on it.
        self.client.delete(&self.network_key(name)).await?;
        self.client.delete_tree(&self.endpoint_prefix(name)).await?;
        self.client.delete_tree(&self.ipam_prefix(name)).await?;
        if let Some(network) = network {
            self.unclaim_vni(network.vni, name).await;
            self.unclaim_subnet(network.subnet, name).await;
        }
        info!(
            network = name,
            endpoints = endpoints.len(),
            "network deleted"
        );
        Ok(())
    }

    // ---- IPAM ----

    /// Allocates an address on `network` for `endpoint` on `node`: `requested` if it is
    /// valid and free, else the lowest free one. Concurrent allocators (on any host)
    /// never get the same address: each address is taken by a create-only write.
    pub async fn allocate_ip(
        &self,
        network: &str,
        requested: Option<Ipv4Addr>,
        endpoint: &str,
        node: &str,
    ) -> Result<Ipv4Addr, StoreError> {
        check_segment("endpoint id", endpoint)?;
        check_segment("node name", node)?;
        let net = self.require_network(network).await?;
        let value = encode(&IpAllocation {
            endpoint: endpoint.to_string(),
            node: node.to_string(),
        });
        let ip = match requested {
            Some(ip) => {
                ipam::validate_address(net.subnet, net.gateway, ip)?;
                if !self
                    .client
                    .put_cas(&self.ipam_key(network, ip), &value, 0)
                    .await?
                {
                    return Err(StoreError::AddressInUse {
                        network: network.to_string(),
                        ip,
                    });
                }
                ip
            }
            None => {
                let mut taken = self.allocated_set(network).await?;
                loop {
                    let Some(ip) = ipam::next_free(net.subnet, net.gateway, &taken) else {
                        return Err(StoreError::Exhausted {
                            network: network.to_string(),
                            subnet: net.subnet,
                        });
                    };
                    if self
                        .client
                        .put_cas(&self.ipam_key(network, ip), &value, 0)
                        .await?
                    {
                        break ip;
                    }
                    // Someone else took it since we listed; that address is out.
                    taken.insert(ip);
                }
            }
        };
        // The network may have been deleted (and its allocations wiped) meanwhile; do
        // not leave an orphan allocation behind.
        if self.get_network(network).await?.as_ref() != Some(&net) {
            let _ = self.client.delete(&self.ipam_key(network, ip)).await;
            return Err(StoreError::NoSuchNetwork(network.to_string()));
        }
        debug!(network, %ip, endpoint, node, "address allocated");
        Ok(ip)
    }

    async fn allocated_set(&self, network: &str) -> Result<BTreeSet<Ipv4Addr>, StoreError> {
        let prefix = self.ipam_prefix(network);
        Ok(self
            .client
            .keys(&prefix)
            .await?
            .iter()
            .filter_map(|k| Ipv4Addr::from_str(k.strip_prefix(&prefix)?).ok())
            .collect())
    }

    /// Refuses a new endpoint when every node's ENDPOINTS map (which holds every
    /// endpoint of the cluster) would overflow. Counts endpoint keys (one cheap read, and
    /// an endpoint of a node that is away still counts: it comes back with its node).
    /// Not atomic with the creation: concurrent creators can go a few over, which the
    /// agents survive (reconcile reports the entries that did not fit).
    pub async fn check_endpoint_capacity(&self) -> Result<(), StoreError> {
        let count = self.client.keys(&self.endpoints_prefix()).await?.len();
        if count >= capacity::ENDPOINTS as usize {
            return Err(StoreError::Capacity {
                what: "the cluster has its maximum number of endpoints",
                count,
                limit: capacity::ENDPOINTS,
                map: map_names::ENDPOINTS,
            });
        }
        Ok(())
    }

    /// Frees an address (freeing a free address is not an error).
    pub async fn release_ip(&self, network: &str, ip: Ipv4Addr) -> Result<(), StoreError> {
        ipam::validate_name(network)?;
        self.client.delete(&self.ipam_key(network, ip)).await?;
        debug!(network, %ip, "address released");
        Ok(())
    }

    /// The allocated addresses of a network, in address order.
    pub async fn list_allocations(
        &self,
        network: &str,
    ) -> Result<Vec<(Ipv4Addr, IpAllocation)>, StoreError> {
        ipam::validate_name(network)?;
        let prefix = self.ipam_prefix(network);
        let mut out: Vec<(Ipv4Addr, IpAllocation)> = self
            .client
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|pair| skip_invalid(records::parse_allocation(&self.prefix, pair)))
            .map(|((_, ip), allocation)| (ip, allocation))
            .collect();
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    // ---- nodes ----

    /// Registers a node under its session's lock, so the entry disappears when the
    /// session is invalidated (create the session with `SessionBehavior::Delete`).
    pub async fn register_node(&self, session: &str, node: &NodeInfo) -> Result<(), StoreError> {
        check_segment("node name", &node.name)?;
        if self
            .client
            .acquire(&self.node_key(&node.name), &encode(node), session)
            .await?
        {
            info!(node = %node.name, vtep = %node.vtep, "node registered");
            Ok(())
        } else {
            Err(StoreError::NodeHeld(node.name.clone()))
        }
    }

    /// Removes a node's entry (e.g. on an orderly agent shutdown).
    pub async fn deregister_node(&self, name: &str) -> Result<(), StoreError> {
        check_segment("node name", name)?;
        self.client.delete(&self.node_key(name)).await?;
        Ok(())
    }

    /// The live nodes: valid records held by a session (others are skipped; see
    /// [`Store::snapshot`] for why).
    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let mut nodes: Vec<NodeInfo> = self
            .client
            .list(&self.nodes_prefix())
            .await?
            .iter()
            .filter_map(|p| records::parse_node(&self.prefix, p).ok())
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }

    // ---- endpoints ----

    /// Writes (creates or replaces) an endpoint; its network must exist.
    pub async fn put_endpoint(&self, endpoint: &Endpoint) -> Result<(), StoreError> {
        check_segment("endpoint id", &endpoint.id)?;
        check_segment("node name", &endpoint.node)?;
        self.require_network(&endpoint.network).await?;
        self.client
            .put(
                &self.endpoint_key(&endpoint.network, &endpoint.id),
                &encode(endpoint),
            )
            .await?;
        Ok(())
    }

    /// Creates an endpoint; refused (with nothing written) when one with the same ID
    /// exists on its network, also when two callers race for the name.
    pub async fn create_endpoint(&self, endpoint: &Endpoint) -> Result<(), StoreError> {
        check_segment("endpoint id", &endpoint.id)?;
        check_segment("node name", &endpoint.node)?;
        self.require_network(&endpoint.network).await?;
        let key = self.endpoint_key(&endpoint.network, &endpoint.id);
        if self.client.put_cas(&key, &encode(endpoint), 0).await? {
            Ok(())
        } else {
            Err(StoreError::EndpointExists {
                network: endpoint.network.clone(),
                id: endpoint.id.clone(),
            })
        }
    }

    pub async fn get_endpoint(
        &self,
        network: &str,
        id: &str,
    ) -> Result<Option<Endpoint>, StoreError> {
        ipam::validate_name(network)?;
        check_segment("endpoint id", id)?;
        let Some(pair) = self.client.get(&self.endpoint_key(network, id)).await? else {
            return Ok(None);
        };
        // Validated like every record read (`detach` acts on its interface name).
        let net = match self.client.get(&self.network_key(network)).await? {
            Some(p) => Some(records::parse_network(&self.prefix, &p)?),
            None => None,
        };
        Ok(Some(records::parse_endpoint(
            &self.prefix,
            &pair,
            net.as_ref(),
        )?))
    }

    /// The endpoints of one network, or of all networks with `None`, whose records are
    /// valid on their own (invalid ones are skipped with a warning; [`Store::snapshot`]
    /// also checks addresses against their IPAM keys and each other).
    pub async fn list_endpoints(&self, network: Option<&str>) -> Result<Vec<Endpoint>, StoreError> {
        let (prefix, networks) = match network {
            Some(n) => {
                ipam::validate_name(n)?;
                let network = match self.client.get(&self.network_key(n)).await? {
                    Some(pair) => skip_invalid(records::parse_network(&self.prefix, &pair)),
                    None => None,
                };
                (self.endpoint_prefix(n), network.into_iter().collect())
            }
            None => (self.endpoints_prefix(), self.list_networks().await?),
        };
        let by_name: std::collections::BTreeMap<&str, &Network> =
            networks.iter().map(|n| (n.name.as_str(), n)).collect();
        let mut endpoints: Vec<Endpoint> = self
            .client
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|pair| {
                let network = pair
                    .key
                    .strip_prefix(&self.endpoints_prefix())
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|name| by_name.get(name).copied());
                skip_invalid(records::parse_endpoint(&self.prefix, pair, network))
            })
            .collect();
        endpoints.sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
        Ok(endpoints)
    }

    /// Deletes an endpoint (deleting a missing one is not an error).
    pub async fn delete_endpoint(&self, network: &str, id: &str) -> Result<(), StoreError> {
        ipam::validate_name(network)?;
        check_segment("endpoint id", id)?;
        self.client.delete(&self.endpoint_key(network, id)).await?;
        Ok(())
    }

    // ---- convergence ----

    /// Records that `node`'s maps hold the cluster state as of KV index `index`.
    pub async fn put_applied(&self, node: &str, index: u64) -> Result<(), StoreError> {
        check_segment("node name", node)?;
        self.client
            .put(&self.applied_key(node), index.to_string().as_bytes())
            .await?;
        Ok(())
    }

    /// The index each node last reported applied.
    pub async fn applied_indexes(
        &self,
    ) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let prefix = format!("{}applied/", self.prefix);
        Ok(self
            .client
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|p| {
                let node = p.key.strip_prefix(&prefix)?.to_string();
                Some((node, p.value_str().trim().parse().ok()?))
            })
            .collect())
    }

    /// The modify index of an endpoint's entry (for waiting until peers applied it).
    pub async fn endpoint_index(&self, network: &str, id: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .client
            .get(&self.endpoint_key(network, id))
            .await?
            .map(|p| p.modify_index))
    }

    /// Waits until every live node with an agent (a node that has reported an applied
    /// index at least once; a foreign VTEP written by hand never does) other than
    /// `except` reports having applied KV index `index`, up to `timeout`; returns the
    /// nodes that had not.
    pub async fn wait_applied(
        &self,
        index: u64,
        timeout: std::time::Duration,
        except: &str,
    ) -> Result<Vec<String>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = std::time::Duration::from_millis(5);
        loop {
            let applied = self.applied_indexes().await?;
            let behind: Vec<String> = self
                .list_nodes()
                .await?
                .into_iter()
                .map(|n| n.name)
                .filter(|n| n != except)
                .filter(|n| applied.get(n).is_some_and(|i| *i < index))
                .collect();
            if behind.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(behind);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        }
    }

    // ---- bootstrap ----

    /// Creates the `default` network (10.1.0.0/16, gateway 10.1.0.1) and the
    /// bootstrapped marker, once per cluster; later and concurrent calls do nothing.
    /// Returns whether this call bootstrapped.
    pub async fn bootstrap(&self) -> Result<bool, StoreError> {
        let marker = self.bootstrap_key();
        if self.client.get(&marker).await?.is_some() {
            return Ok(false);
        }
        match self
            .create_network(
                DEFAULT_NETWORK,
                DEFAULT_SUBNET,
                Some(DEFAULT_GATEWAY),
                None,
                None,
            )
            .await
        {
            Ok(_) | Err(StoreError::NetworkExists(_)) => {}
            Err(e) => return Err(e),
        }
        let done = self.client.put_cas(&marker, b"true", 0).await?;
        if done {
            info!(prefix = %self.prefix, "cluster state bootstrapped");
        }
        Ok(done)
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
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&n)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name":"web","subnet":"10.100.0.0/24","gateway":"10.100.0.1","vni":42,"mtu":1450})
        );
        let back: Network = serde_json::from_value(v).unwrap();
        assert_eq!(back, n);
    }

    #[test]
    fn endpoint_json_omits_missing_container() {
        let e = Endpoint {
            id: "abc".into(),
            network: "web".into(),
            ip: Ipv4Addr::new(10, 100, 0, 2),
            mac: "02:00:0a:64:00:02".into(),
            node: "n1".into(),
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            ifname: "ov-abc".into(),
            container: None,
            pid: None,
            netns: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&encode(&e)).unwrap();
        assert!(v.get("container").is_none());
        assert_eq!(v["vtep"], "192.0.2.1");
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
            Store::new(c, "overlay/").network_key("a"),
            "overlay/networks/a"
        );
    }
}
