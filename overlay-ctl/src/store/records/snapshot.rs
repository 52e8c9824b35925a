//! The cross-record rules: from everything under the prefix to the valid cluster state
//! (VNI ownership, subnet overlaps, one node per VTEP, one endpoint per address), each
//! conflict resolved the same way on every node.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;

use super::{
    parse_allocation, parse_endpoint, parse_network, parse_node, parse_vxlan_port, RecordKind,
    RejectReason, Rejection, Snapshot, View,
};
use crate::{
    store::backend::Record,
    store::ClusterState,
    store::{Endpoint, IpAllocation, Network, NodeInfo},
};

/// Valid address allocations by (network, address).
type Allocations = BTreeMap<(String, Ipv4Addr), IpAllocation>;

/// Parses everything under `prefix` (one recursive read or watch answer) into the valid
/// cluster state and the rejected records. Deterministic: the same pairs give the same
/// result on every node (up to the [`View`]'s own-node preferences).
pub fn parse_snapshot<'p, R: Record + 'p>(
    prefix: &str,
    pairs: impl IntoIterator<Item = &'p R>,
    view: View<'_>,
) -> Snapshot {
    let mut sections: BTreeMap<&str, Vec<&dyn Record>> = BTreeMap::new();
    for pair in pairs {
        let Some(rest) = pair.key().strip_prefix(prefix) else {
            continue;
        };
        let section = rest.split('/').next().unwrap_or_default();
        sections.entry(section).or_default().push(pair);
    }
    let section = |name: &str| sections.get(name).cloned().unwrap_or_default();
    let mut rejected = Vec::new();
    let allocations = accept_allocations(prefix, &section("ipam"), &mut rejected);
    let claims = vni_claims(prefix, &section("vni"));
    let networks = accept_networks(prefix, &section("networks"), &claims, &mut rejected);
    let nodes = accept_nodes(prefix, &section("nodes"), view, &mut rejected);
    let vxlan_port = accept_vxlan_port(prefix, &section("config"), &mut rejected);
    let endpoints = accept_endpoints(
        prefix,
        &section("endpoints"),
        EndpointContext {
            networks: &networks,
            allocations: &allocations,
            view,
        },
        &mut rejected,
    );
    rejected.sort_by(|a, b| (&a.key, a.reason).cmp(&(&b.key, b.reason)));
    Snapshot {
        state: ClusterState {
            networks,
            nodes,
            endpoints,
            vxlan_port,
        },
        allocations,
        rejected,
    }
}

/// The cluster's VXLAN port, if the store names a valid one (else the default applies,
/// the same on every node, so the nodes keep agreeing on the port).
fn accept_vxlan_port(
    prefix: &str,
    pairs: &[&dyn Record],
    rejected: &mut Vec<Rejection>,
) -> Option<u16> {
    let key = format!("{prefix}config/vxlan-port");
    let pair = *pairs.iter().find(|p| p.key() == key)?;
    parse_vxlan_port(prefix, pair)
        .map_err(|r| rejected.push(r))
        .ok()
}

/// VNI claims: vni -> the network its `vni/N` key names.
fn vni_claims(prefix: &str, pairs: &[&dyn Record]) -> BTreeMap<u32, String> {
    let vni_prefix = format!("{prefix}vni/");
    pairs
        .iter()
        .filter_map(|p| {
            Some((
                p.key().strip_prefix(&vni_prefix)?.parse().ok()?,
                p.value_str(),
            ))
        })
        .collect()
}

fn accept_allocations(
    prefix: &str,
    pairs: &[&dyn Record],
    rejected: &mut Vec<Rejection>,
) -> Allocations {
    let mut allocations = BTreeMap::new();
    for &pair in pairs {
        match parse_allocation(prefix, pair) {
            Ok((key, value)) => {
                allocations.insert(key, value);
            }
            Err(r) => rejected.push(r),
        }
    }
    allocations
}

/// Networks: per record, then the VNI claim, then overlaps (earlier created wins).
fn accept_networks(
    prefix: &str,
    pairs: &[&dyn Record],
    claims: &BTreeMap<u32, String>,
    rejected: &mut Vec<Rejection>,
) -> Vec<Network> {
    let mut candidates = Vec::new();
    for &pair in pairs {
        let network = match parse_network(prefix, pair) {
            Ok(network) => network,
            Err(r) => {
                rejected.push(r);
                continue;
            }
        };
        let owner = claims.get(&network.vni);
        if owner.map(String::as_str) != Some(network.name.as_str()) {
            let detail = match owner {
                Some(owner) => format!("VNI {} belongs to network {owner:?}", network.vni),
                None => format!(
                    "VNI {} is not claimed (no vni/{} key)",
                    network.vni, network.vni
                ),
            };
            rejected.push(Rejection::new(
                pair.key(),
                RecordKind::Network,
                RejectReason::VniNotOwned,
                detail,
            ));
            continue;
        }
        candidates.push((pair.create_index(), network, pair.key()));
    }
    candidates.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    let mut subnets = SubnetSet::default();
    let mut networks = Vec::new();
    for (_, network, key) in candidates {
        if let Some(other) = subnets.overlapping(network.subnet) {
            rejected.push(Rejection::new(
                key,
                RecordKind::Network,
                RejectReason::SubnetOverlap,
                format!(
                    "subnet {} overlaps network {other:?}, created earlier",
                    network.subnet
                ),
            ));
            continue;
        }
        subnets.insert(network.subnet, &network.name);
        networks.push(network);
    }
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    networks
}

/// Nodes: per record, then VTEP conflicts (earlier registered wins; never ours).
fn accept_nodes(
    prefix: &str,
    pairs: &[&dyn Record],
    view: View<'_>,
    rejected: &mut Vec<Rejection>,
) -> Vec<NodeInfo> {
    let mut candidates = Vec::new();
    for &pair in pairs {
        match parse_node(prefix, pair) {
            Ok(node) => candidates.push((pair.create_index(), node, pair.key())),
            Err(r) => rejected.push(r),
        }
    }
    candidates.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    let mut vteps: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    if let View::Node { name, vtep, .. } = view {
        vteps.insert(vtep, name.to_string());
    }
    let mut nodes = Vec::new();
    for (_, node, key) in candidates {
        match vteps.get(&node.vtep) {
            Some(owner) if *owner != node.name => {
                rejected.push(Rejection::new(
                    key,
                    RecordKind::Node,
                    RejectReason::DuplicateVtep,
                    format!("VTEP {} belongs to node {owner:?}", node.vtep),
                ));
                continue;
            }
            _ => {}
        }
        vteps.insert(node.vtep, node.name.clone());
        nodes.push(node);
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes
}

/// What deciding between endpoints needs from the rest of the snapshot.
#[derive(Clone, Copy)]
struct EndpointContext<'a> {
    /// The accepted networks, sorted by name.
    networks: &'a [Network],
    allocations: &'a Allocations,
    view: View<'a>,
}

/// Endpoints: per record, then one per (network, address).
fn accept_endpoints(
    prefix: &str,
    pairs: &[&dyn Record],
    context: EndpointContext<'_>,
    rejected: &mut Vec<Rejection>,
) -> Vec<Endpoint> {
    let by_name: BTreeMap<&str, &Network> = context
        .networks
        .iter()
        .map(|n| (n.name.as_str(), n))
        .collect();
    let mut groups: BTreeMap<(String, Ipv4Addr), Vec<(Endpoint, &str)>> = BTreeMap::new();
    let endpoint_prefix = format!("{prefix}endpoints/");
    for &pair in pairs {
        let network = pair
            .key()
            .strip_prefix(&endpoint_prefix)
            .and_then(|rest| rest.split('/').next())
            .and_then(|name| by_name.get(name).copied());
        match parse_endpoint(prefix, pair, network) {
            Ok(e) => groups
                .entry((e.network.clone(), e.ip))
                .or_default()
                .push((e, pair.key())),
            Err(r) => rejected.push(r),
        }
    }
    // At most one per address: no spare capacity kept with the agent's desired state
    // (a doubled vector of twenty thousand endpoints wastes a third of it).
    let mut endpoints = Vec::with_capacity(groups.len());
    for ((network, ip), group) in groups {
        let winner = address_winner(&network, ip, &group, context);
        for (endpoint, key) in group {
            if Some(key) == winner {
                endpoints.push(endpoint);
            } else {
                rejected.push(losing_endpoint(key, &network, ip, winner, context));
            }
        }
    }
    endpoints.sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
    endpoints
}

/// The key of the endpoint that keeps address `ip` of `network`, if any does. On an
/// agent, a container of its own first (never displaced by a record of another node,
/// even one that took over the IPAM key), then the IPAM key's owner. A record merely
/// naming this node has no say: it would displace a real remote endpoint (and have the
/// agent clean up after a container that never was).
fn address_winner<'k>(
    network: &str,
    ip: Ipv4Addr,
    group: &[(Endpoint, &'k str)],
    context: EndpointContext<'_>,
) -> Option<&'k str> {
    let allocation = context.allocations.get(&(network.to_string(), ip));
    let owns = |e: &Endpoint| allocation.is_some_and(|a| a.endpoint == e.id && a.node == e.node);
    group
        .iter()
        .filter(|(e, _)| context.view.is_present_local(e))
        .min_by_key(|(e, key)| (!owns(e), *key))
        .or_else(|| group.iter().find(|(e, _)| owns(e)))
        .map(|(_, key)| *key)
}

/// Why the endpoint at `key` does not get address `ip` of `network`.
fn losing_endpoint(
    key: &str,
    network: &str,
    ip: Ipv4Addr,
    winner: Option<&str>,
    context: EndpointContext<'_>,
) -> Rejection {
    let (reason, detail) = match winner {
        Some(w) => (
            RejectReason::DuplicateAddress,
            format!("address {ip} of network {network:?} is used by {w}"),
        ),
        None => (
            RejectReason::AddressNotOwned,
            match context.allocations.get(&(network.to_string(), ip)) {
                Some(a) => format!(
                    "address {ip} is allocated to endpoint {:?} on node {:?}",
                    a.endpoint, a.node
                ),
                None => format!("address {ip} is not allocated (no IPAM key)"),
            },
        ),
    };
    Rejection::new(key, RecordKind::Endpoint, reason, detail)
}

/// Accepted subnets, for overlap checks in O(log n): a subnet overlaps another iff one
/// contains the other.
#[derive(Default)]
pub(super) struct SubnetSet {
    /// Network address -> name (accepted subnets never overlap, so starts are unique).
    by_start: BTreeMap<u32, String>,
    /// (network address, prefix length) -> name.
    exact: HashMap<(u32, u8), String>,
}

impl SubnetSet {
    pub(super) fn overlapping(&self, subnet: Ipv4Network) -> Option<&str> {
        // A subnet containing `subnet`: one of its 33 possible supernets.
        let start = u32::from(subnet.network());
        for len in 0..=subnet.prefix() {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let key = (start & mask, len);
            if let Some(name) = self.exact.get(&key) {
                return Some(name);
            }
        }
        // A subnet inside `subnet`: one starting within its range.
        let end = u32::from(subnet.broadcast());
        self.by_start
            .range(start..=end)
            .next()
            .map(|(_, name)| name.as_str())
    }

    pub(super) fn insert(&mut self, subnet: Ipv4Network, name: &str) {
        let key = (u32::from(subnet.network()), subnet.prefix());
        self.exact.insert(key, name.to_string());
        self.by_start.insert(key.0, name.to_string());
    }
}
