//! Container names: the per-node DNS responder (issue #17, part 2).
//!
//! The agent keeps a [`DnsDirectory`] (network -> container name -> address) equal to the
//! endpoint records it reconciles, and runs one [`DnsServer`] that listens on each
//! network's gateway address. A query is answered from the network whose gateway address
//! it arrived on, so a container on `net2` cannot resolve `net1`'s names. Names in the
//! overlay zone (`NAME`, `NAME.NETWORK`, and the reverse names of overlay subnets) are
//! answered or refused with NXDOMAIN here; everything else goes to the host's upstream
//! resolvers ([`Upstreams`]).
//!
//! Parts: this file (the name table), [`server`] (listeners and the request handler),
//! [`forward`] (upstream resolvers and forwarding) and [`container`] (what a container's
//! resolver configuration looks like: the `ip netns` resolv.conf and the CNI `dns` field).
pub mod container;
pub mod forward;
pub mod server;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, RwLock},
};

use ipnetwork::Ipv4Network;

pub use container::{cni_dns, remove_netns_resolv_conf, write_netns_resolv_conf, ContainerDns};
pub use forward::Upstreams;
pub use server::{DnsConfig, DnsCounters, DnsCountersSnapshot, DnsServer};

use crate::store::{Endpoint, Network};

/// The TTL of the answers for container names. Short, because a removed container's name
/// must stop resolving within a second even behind a caching stub in the container.
pub const NAME_TTL_SECS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS listener on {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading the upstream resolvers from {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no upstream resolver to forward to")]
    NoUpstream,
    #[error("upstream resolver {upstream}: {source}")]
    Upstream {
        upstream: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream resolver {upstream} did not answer within {timeout_ms} ms")]
    UpstreamTimeout {
        upstream: std::net::SocketAddr,
        timeout_ms: u128,
    },
    #[error("upstream resolver {upstream} sent an unusable answer: {reason}")]
    UpstreamAnswer {
        upstream: std::net::SocketAddr,
        reason: String,
    },
    #[error("encoding a DNS message: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
    #[error("container resolver file {path}: {source}")]
    ContainerFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid netns name {0:?} for a resolv.conf path")]
    NetnsName(String),
}

/// One network's names as the directory holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkNames {
    pub subnet: Option<Ipv4Network>,
    /// Lowercase container name -> address.
    pub names: BTreeMap<String, Ipv4Addr>,
}

impl NetworkNames {
    pub fn new(subnet: Ipv4Network) -> Self {
        Self {
            subnet: Some(subnet),
            names: BTreeMap::new(),
        }
    }

    /// Adds `name` (case-insensitive, as DNS is); a later insert of the same name wins.
    pub fn insert(&mut self, name: &str, address: Ipv4Addr) {
        self.names.insert(name.to_ascii_lowercase(), address);
    }
}

/// What the directory says about one query name, for one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A container name of the asking network.
    Address(Ipv4Addr),
    /// The reverse name of an address of the asking network's container.
    Name(String),
    /// In the overlay zone (a single label, `X.NETWORK` of any network, or the reverse
    /// name of any overlay address) but not a name of the asking network.
    NotFound,
    /// Not the overlay's: for the upstream resolvers.
    Outside,
}

/// The name table shared by the agent (writer) and the DNS server (reader). Cloning shares
/// the table; every update is visible to the next query.
#[derive(Clone, Debug, Default)]
pub struct DnsDirectory {
    networks: Arc<RwLock<BTreeMap<String, NetworkNames>>>,
}

impl DnsDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces one network's names.
    pub fn set_network(&self, network: &str, names: NetworkNames) {
        self.write().insert(network.to_ascii_lowercase(), names);
    }

    pub fn remove_network(&self, network: &str) {
        self.write().remove(&network.to_ascii_lowercase());
    }

    /// Replaces the whole table at once from the store's records: every network, each
    /// endpoint under its name, the endpoint ID (what `run --name` and `attach --name`
    /// give; the record's `container` field only describes the container, a command or a
    /// path). Endpoints of an unknown network, and IDs that are not one DNS label (a dot
    /// would make `a.b` look like `NAME.NETWORK`), are left out.
    pub fn replace_from_records(&self, networks: &[Network], endpoints: &[Endpoint]) {
        self.replace_served(networks, endpoints, |_| true);
    }

    /// [`Self::replace_from_records`] keeping only the names of the networks `served`
    /// accepts (those with a listener: names are only ever answered to their own
    /// network). Every network's name and subnet stays, so `X.OTHER` and other networks'
    /// reverse names are still NXDOMAIN rather than forwarded. A node serving no network
    /// then pays nothing for a cluster's thousands of endpoints at every reconcile.
    pub fn replace_served(
        &self,
        networks: &[Network],
        endpoints: &[Endpoint],
        served: impl Fn(&str) -> bool,
    ) {
        let mut table: BTreeMap<String, NetworkNames> = networks
            .iter()
            .map(|n| (n.name.to_ascii_lowercase(), NetworkNames::new(n.subnet)))
            .collect();
        let wanted: Vec<String> = networks
            .iter()
            .filter(|n| served(&n.name))
            .map(|n| n.name.to_ascii_lowercase())
            .collect();
        if !wanted.is_empty() {
            for endpoint in endpoints {
                let name = endpoint.id.as_str();
                if name.is_empty() || name.contains('.') {
                    continue;
                }
                let network = endpoint.network.to_ascii_lowercase();
                if !wanted.contains(&network) {
                    continue;
                }
                if let Some(entry) = table.get_mut(&network) {
                    entry.insert(name, endpoint.ip);
                }
            }
        }
        *self.write() = table;
    }

    /// The networks the directory knows, lowercase.
    pub fn networks(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Resolves `query_name` (ASCII, with or without the final dot, any case) for a
    /// container of `network`. Forward names only give addresses; see [`Self::resolve_reverse`].
    pub fn resolve(&self, network: &str, query_name: &str) -> Resolution {
        let name = query_name.trim_end_matches('.').to_ascii_lowercase();
        let network = network.to_ascii_lowercase();
        let table = self.read();
        let labels: Vec<&str> = name.split('.').collect();
        let host = match labels.as_slice() {
            [host] => *host,
            [host, net] if table.contains_key(*net) => {
                if *net != network {
                    return Resolution::NotFound;
                }
                *host
            }
            _ => return Resolution::Outside,
        };
        match table.get(&network).and_then(|n| n.names.get(host)) {
            Some(address) => Resolution::Address(*address),
            None => Resolution::NotFound,
        }
    }

    /// Resolves an address of a PTR query for a container of `network`: the container's
    /// `NAME.NETWORK.` when it is on that network; NXDOMAIN for any other overlay address.
    pub fn resolve_reverse(&self, network: &str, address: IpAddr) -> Resolution {
        let IpAddr::V4(address) = address else {
            return Resolution::Outside;
        };
        let network = network.to_ascii_lowercase();
        let table = self.read();
        if let Some(own) = table.get(&network) {
            if let Some((name, _)) = own.names.iter().find(|(_, a)| **a == address) {
                return Resolution::Name(format!("{name}.{network}."));
            }
        }
        let in_overlay = table
            .values()
            .any(|n| n.subnet.is_some_and(|s| s.contains(address)));
        if in_overlay {
            Resolution::NotFound
        } else {
            Resolution::Outside
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, NetworkNames>> {
        // A panic while holding the lock cannot leave a half-written table (every write
        // is one assignment), so a poisoned lock is still safe to use.
        self.networks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, NetworkNames>> {
        self.networks.write().unwrap_or_else(|e| e.into_inner())
    }
}
