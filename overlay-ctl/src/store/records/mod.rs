//! The one boundary where the KV store's records become trusted values.
//!
//! The store is input, not truth: every CLI user (and, with the dev server, every local
//! user) can write any key under the prefix. Every record the agent or a CLI listing
//! reads goes through here and comes out either as a validated value of
//! [`crate::store`]'s types, checked by the same rules the CLI applies when it writes
//! (names, CIDR, gateway, VNI range and ownership through `vni/N`, MTU, egress mode, an endpoint's
//! address inside its network's subnet and owned through its `ipam/<network>/<ip>` key,
//! a unicast MAC, unicast VTEPs, the interface and namespace names the CLI generates, a
//! node only while its session holds its key, the VXLAN port's range), or as a [`Rejection`] naming the key, a
//! [`RecordKind`] and a [`RejectReason`] (closed sets, so they can label metrics).
//!
//! Conflicts are resolved deterministically, the same way on every node:
//! - two networks with overlapping subnets: the earlier created (lower `CreateIndex`,
//!   then the name) wins;
//! - two networks with one VNI: only the one `vni/N` names can be valid;
//! - two endpoints with one address in a network: the one its IPAM key names wins; on an
//!   agent, a local endpoint is never displaced by a remote one;
//! - two nodes with one VTEP: the earlier registered wins; on an agent, no remote node
//!   may claim this node's own VTEP.
//!
//! [`Store`](crate::store::Store)'s single-record reads use [`parse_network`],
//! [`parse_node`] and [`parse_endpoint`] (the per-record rules); whole-state readers (the
//! agent, CLI listings) use [`parse_snapshot`], which adds the cross-record rules.
//!
//! Here: the vocabulary of rejections and views; [`rules`] holds the per-record rules,
//! [`snapshot`] the cross-record ones.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use serde::Serialize;

use crate::{
    store::ClusterState,
    store::{Endpoint, IpAllocation},
};

mod rules;
mod snapshot;
#[cfg(test)]
mod tests;

pub use rules::{
    check_mac, check_vtep, parse_allocation, parse_endpoint, parse_network, parse_node,
    parse_vxlan_port,
};
pub use snapshot::parse_snapshot;

/// What kind of record a rejected key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Network,
    Node,
    Endpoint,
    Ipam,
    /// A cluster-wide setting under `config/` (the VXLAN port).
    Config,
}

impl RecordKind {
    pub const ALL: [RecordKind; 5] = [
        Self::Network,
        Self::Node,
        Self::Endpoint,
        Self::Ipam,
        Self::Config,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Node => "node",
            Self::Endpoint => "endpoint",
            Self::Ipam => "ipam",
            Self::Config => "config",
        }
    }
}

/// Why a record was rejected (a closed set: it labels a metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The value is not the JSON of the record's type.
    Malformed,
    /// The key itself is not a valid name or address.
    BadKey,
    /// A name inside the value differs from the one in the key.
    KeyMismatch,
    BadName,
    BadSubnet,
    BadGateway,
    BadVni,
    BadMtu,
    /// The network's `egress` is not one of the modes (`masquerade`, `none`).
    BadEgress,
    /// The network's `vni/N` claim is missing or names another network.
    VniNotOwned,
    SubnetOverlap,
    /// Outside the subnet, or its network, broadcast or gateway address.
    BadAddress,
    /// The address's IPAM key is missing or names another endpoint or node.
    AddressNotOwned,
    DuplicateAddress,
    /// The endpoint's network is missing or was itself rejected.
    UnknownNetwork,
    BadMac,
    BadVtep,
    DuplicateVtep,
    /// A node key not held by a session is not a live node.
    NoSession,
    BadIfname,
    BadNetns,
    /// A VXLAN port outside the accepted range.
    BadPort,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadKey => "bad_key",
            Self::KeyMismatch => "key_mismatch",
            Self::BadName => "bad_name",
            Self::BadSubnet => "bad_subnet",
            Self::BadGateway => "bad_gateway",
            Self::BadVni => "bad_vni",
            Self::BadMtu => "bad_mtu",
            Self::BadEgress => "bad_egress",
            Self::VniNotOwned => "vni_not_owned",
            Self::SubnetOverlap => "subnet_overlap",
            Self::BadAddress => "bad_address",
            Self::AddressNotOwned => "address_not_owned",
            Self::DuplicateAddress => "duplicate_address",
            Self::UnknownNetwork => "unknown_network",
            Self::BadMac => "bad_mac",
            Self::BadVtep => "bad_vtep",
            Self::DuplicateVtep => "duplicate_vtep",
            Self::NoSession => "no_session",
            Self::BadIfname => "bad_ifname",
            Self::BadNetns => "bad_netns",
            Self::BadPort => "bad_port",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that is not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{key}: {detail} ({}/{})", .kind.as_str(), .reason)]
pub struct Rejection {
    pub key: String,
    pub kind: RecordKind,
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    fn new(key: &str, kind: RecordKind, reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            kind,
            reason,
            detail: detail.into(),
        }
    }
}

/// Whose view the snapshot is parsed for: an agent resolves conflicts in favour of its
/// own endpoints and VTEP; the CLI has no side.
#[derive(Clone, Copy, Debug)]
pub enum View<'a> {
    Cluster,
    Node {
        name: &'a str,
        vtep: Ipv4Addr,
        /// The interfaces that exist on this node (as last seen): a local endpoint whose
        /// veth is here is a real container of this node and is never displaced.
        links: &'a BTreeSet<String>,
    },
}

impl View<'_> {
    /// Whether `endpoint` is a container of this node (its record says so and its
    /// veth exists here).
    fn is_present_local(&self, endpoint: &Endpoint) -> bool {
        match self {
            View::Cluster => false,
            View::Node { name, links, .. } => {
                endpoint.node == *name && links.contains(&endpoint.ifname)
            }
        }
    }
}

/// The valid part of the store and the rejected rest.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub state: ClusterState,
    /// Valid address allocations by (network, address).
    pub allocations: BTreeMap<(String, Ipv4Addr), IpAllocation>,
    /// Sorted by key, then reason.
    pub rejected: Vec<Rejection>,
}

/// Rejections seen before, so that each (key, reason) is reported once while it lasts
/// (and again if it comes back after going away).
#[derive(Debug, Default)]
pub struct RejectionLog {
    seen: BTreeSet<(String, RejectReason)>,
}

impl RejectionLog {
    /// The rejections of `current` not reported yet; forgets the ones that went away.
    pub fn fresh<'a>(&mut self, current: &'a [Rejection]) -> Vec<&'a Rejection> {
        let now: BTreeSet<(String, RejectReason)> =
            current.iter().map(|r| (r.key.clone(), r.reason)).collect();
        let fresh = current
            .iter()
            .filter(|r| !self.seen.contains(&(r.key.clone(), r.reason)))
            .collect();
        self.seen = now;
        fresh
    }
}

/// Rejections counted by (kind, reason), for metrics.
pub fn count(rejected: &[Rejection]) -> BTreeMap<(RecordKind, RejectReason), u64> {
    let mut out = BTreeMap::new();
    for r in rejected {
        *out.entry((r.kind, r.reason)).or_default() += 1;
    }
    out
}
