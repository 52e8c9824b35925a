//! The one boundary where the KV store's records become trusted values.
//!
//! The store is input, not truth: every CLI user (and, with the dev server, every local
//! user) can write any key under the prefix. Every record the agent or a CLI listing
//! reads goes through here and comes out either as a validated value of
//! [`crate::store`]'s types, checked by the same rules the CLI applies when it writes
//! (names, CIDR, gateway, VNI range and ownership through `vni/N`, MTU, an endpoint's
//! address inside its network's subnet and owned through its `ipam/<network>/<ip>` key,
//! a unicast MAC, unicast VTEPs, the interface and namespace names the CLI generates, a
//! node only while its session holds its key), or as a [`Rejection`] naming the key, a
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
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use ipnetwork::Ipv4Network;
use overlay_common::MacAddr;
use serde::Serialize;

use crate::{
    agent::reconcile::ClusterState,
    runtimes::container,
    store::consul::KvPair,
    store::ipam,
    store::{self, Endpoint, IpAllocation, Network, NodeInfo},
};

/// What kind of record a rejected key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Network,
    Node,
    Endpoint,
    Ipam,
}

impl RecordKind {
    pub const ALL: [RecordKind; 4] = [Self::Network, Self::Node, Self::Endpoint, Self::Ipam];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Node => "node",
            Self::Endpoint => "endpoint",
            Self::Ipam => "ipam",
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

/// A VTEP must be a unicast IPv4 address a packet can be sent to.
pub fn check_vtep(vtep: Ipv4Addr) -> Result<(), &'static str> {
    if vtep.is_unspecified() {
        Err("unspecified address")
    } else if vtep.is_loopback() {
        Err("loopback address")
    } else if vtep.is_multicast() {
        Err("multicast address")
    } else if vtep.is_broadcast() {
        Err("broadcast address")
    } else if u32::from(vtep) >> 28 == 0xf {
        Err("reserved (240.0.0.0/4) address")
    } else if vtep.octets()[0] == 0 {
        Err("address in 0.0.0.0/8")
    } else {
        Ok(())
    }
}

/// A MAC an endpoint can have: unicast, not all zero (that it is six bytes, its type
/// says).
pub fn check_mac(mac: MacAddr) -> Result<(), &'static str> {
    if !mac.is_unicast() {
        Err("multicast MAC")
    } else if mac.is_zero() {
        Err("all-zero MAC")
    } else {
        Ok(())
    }
}

/// An endpoint record that does not decode because of its `mac` text alone is a bad MAC,
/// not a malformed record (the reason labels a metric, and was `bad_mac` before the MAC
/// had a type of its own).
fn unreadable_mac(pair: &KvPair) -> Option<Rejection> {
    #[derive(serde::Deserialize)]
    struct MacText {
        mac: String,
    }
    let text = serde_json::from_slice::<MacText>(&pair.value).ok()?.mac;
    let error = text.parse::<MacAddr>().err()?;
    Some(Rejection::new(
        &pair.key,
        RecordKind::Endpoint,
        RejectReason::BadMac,
        format!("{text:?}: {error}"),
    ))
}

fn decode<T: serde::de::DeserializeOwned>(pair: &KvPair, kind: RecordKind) -> Result<T, Rejection> {
    serde_json::from_slice(&pair.value)
        .map_err(|e| Rejection::new(&pair.key, kind, RejectReason::Malformed, e.to_string()))
}

/// The part of `key` after `prefix` + `section` (e.g. `networks/`).
fn key_rest<'k>(key: &'k str, prefix: &str, section: &str) -> Option<&'k str> {
    key.strip_prefix(prefix)?.strip_prefix(section)
}

/// One `networks/<name>` record, by the rules of `network create` (the VNI's ownership
/// and overlaps with other networks are [`parse_snapshot`]'s).
pub fn parse_network(prefix: &str, pair: &KvPair) -> Result<Network, Rejection> {
    use RejectReason::*;
    let kind = RecordKind::Network;
    let reject = |reason, detail: String| Rejection::new(&pair.key, kind, reason, detail);
    let name = key_rest(&pair.key, prefix, "networks/").unwrap_or(&pair.key);
    ipam::validate_name(name).map_err(|e| reject(BadKey, e.to_string()))?;
    let network: Network = decode(pair, kind)?;
    if network.name != name {
        return Err(reject(
            KeyMismatch,
            format!("the record names network {:?}", network.name),
        ));
    }
    // As `network create` parses it: no host bits, at most a /30.
    ipam::parse_subnet(&network.subnet.to_string())
        .map_err(|e| reject(BadSubnet, e.to_string()))?;
    ipam::validate_gateway(network.subnet, network.gateway)
        .map_err(|e| reject(BadGateway, e.to_string()))?;
    ipam::validate_vni(u64::from(network.vni)).map_err(|e| reject(BadVni, e.to_string()))?;
    ipam::validate_mtu(network.mtu).map_err(|e| reject(BadMtu, e.to_string()))?;
    Ok(network)
}

/// One `nodes/<name>` record: a valid name and VTEP, held by a session.
pub fn parse_node(prefix: &str, pair: &KvPair) -> Result<NodeInfo, Rejection> {
    use RejectReason::*;
    let kind = RecordKind::Node;
    let reject = |reason, detail: String| Rejection::new(&pair.key, kind, reason, detail);
    let name = key_rest(&pair.key, prefix, "nodes/").unwrap_or(&pair.key);
    store::check_segment("node name", name).map_err(|e| reject(BadKey, e.to_string()))?;
    let node: NodeInfo = decode(pair, kind)?;
    if node.name != name {
        return Err(reject(
            KeyMismatch,
            format!("the record names node {:?}", node.name),
        ));
    }
    check_vtep(node.vtep).map_err(|e| reject(BadVtep, format!("VTEP {}: {e}", node.vtep)))?;
    let iface_ok = store::check_segment("interface", &node.iface).is_ok()
        && node.iface.len() <= 15
        && !node.iface.contains(':');
    if !iface_ok {
        return Err(reject(
            BadName,
            format!("invalid interface name {:?}", node.iface),
        ));
    }
    if pair.session.as_deref().is_none_or(str::is_empty) {
        return Err(reject(
            NoSession,
            "not held by a session, so not a live node".to_string(),
        ));
    }
    Ok(node)
}

/// One `endpoints/<network>/<id>` record of `network` (already validated), by the rules
/// of `run`/`attach` (the address's ownership and duplicates are [`parse_snapshot`]'s).
pub fn parse_endpoint(
    prefix: &str,
    pair: &KvPair,
    network: Option<&Network>,
) -> Result<Endpoint, Rejection> {
    use RejectReason::*;
    let kind = RecordKind::Endpoint;
    let reject = |reason, detail: String| Rejection::new(&pair.key, kind, reason, detail);
    let rest = key_rest(&pair.key, prefix, "endpoints/").unwrap_or(&pair.key);
    let Some((net_name, id)) = rest.split_once('/') else {
        return Err(reject(BadKey, "not endpoints/<network>/<id>".to_string()));
    };
    ipam::validate_name(net_name).map_err(|e| reject(BadKey, e.to_string()))?;
    store::check_segment("endpoint id", id).map_err(|e| reject(BadKey, e.to_string()))?;
    let endpoint: Endpoint = decode(pair, kind).map_err(|e| unreadable_mac(pair).unwrap_or(e))?;
    if endpoint.network != net_name || endpoint.id != id {
        return Err(reject(
            KeyMismatch,
            format!(
                "the record names endpoint {:?} of network {:?}",
                endpoint.id, endpoint.network
            ),
        ));
    }
    store::check_segment("node name", &endpoint.node)
        .map_err(|e| reject(BadName, e.to_string()))?;
    let Some(network) = network else {
        return Err(reject(
            UnknownNetwork,
            format!("network {net_name:?} is missing or invalid"),
        ));
    };
    ipam::validate_address(network.subnet, network.gateway, endpoint.ip)
        .map_err(|e| reject(BadAddress, e.to_string()))?;
    check_mac(endpoint.mac)
        .map_err(|e| reject(BadMac, format!("{:?}: {e}", endpoint.mac.to_string())))?;
    let ifname = container::host_ifname(net_name, id);
    if endpoint.ifname != ifname {
        return Err(reject(
            BadIfname,
            format!(
                "interface {:?} is not the one this endpoint gets ({ifname})",
                endpoint.ifname
            ),
        ));
    }
    if let Some(netns) = &endpoint.netns {
        let expected = container::run_netns_name(net_name, id);
        if *netns != expected {
            return Err(reject(
                BadNetns,
                format!("namespace {netns:?} is not the one `run` creates ({expected})"),
            ));
        }
    }
    Ok(endpoint)
}

/// One `ipam/<network>/<ip>` record: ((network, address), allocation).
pub fn parse_allocation(
    prefix: &str,
    pair: &KvPair,
) -> Result<((String, Ipv4Addr), IpAllocation), Rejection> {
    let kind = RecordKind::Ipam;
    let reject = |reason, detail: &str| Rejection::new(&pair.key, kind, reason, detail.to_string());
    let rest = key_rest(&pair.key, prefix, "ipam/").unwrap_or(&pair.key);
    let Some((network, ip)) = rest.split_once('/') else {
        return Err(reject(RejectReason::BadKey, "not ipam/<network>/<ip>"));
    };
    ipam::validate_name(network).map_err(|e| reject(RejectReason::BadKey, &e.to_string()))?;
    let ip = Ipv4Addr::from_str(ip)
        .map_err(|_| reject(RejectReason::BadKey, "key does not end in an IPv4 address"))?;
    let allocation: IpAllocation = decode(pair, kind)?;
    Ok(((network.to_string(), ip), allocation))
}

/// Accepted subnets, for overlap checks in O(log n): a subnet overlaps another iff one
/// contains the other.
#[derive(Default)]
struct SubnetSet {
    /// Network address -> name (accepted subnets never overlap, so starts are unique).
    by_start: BTreeMap<u32, String>,
    /// (network address, prefix length) -> name.
    exact: HashMap<(u32, u8), String>,
}

impl SubnetSet {
    fn overlapping(&self, subnet: Ipv4Network) -> Option<&str> {
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

    fn insert(&mut self, subnet: Ipv4Network, name: &str) {
        let key = (u32::from(subnet.network()), subnet.prefix());
        self.exact.insert(key, name.to_string());
        self.by_start.insert(key.0, name.to_string());
    }
}

/// Parses everything under `prefix` (one recursive read or watch answer) into the valid
/// cluster state and the rejected records. Deterministic: the same pairs give the same
/// result on every node (up to the [`View`]'s own-node preferences).
pub fn parse_snapshot(prefix: &str, pairs: &[KvPair], view: View<'_>) -> Snapshot {
    use RejectReason::*;
    let mut rejected = Vec::new();
    let mut sections: BTreeMap<&str, Vec<&KvPair>> = BTreeMap::new();
    for pair in pairs {
        let Some(rest) = pair.key.strip_prefix(prefix) else {
            continue;
        };
        let section = rest.split('/').next().unwrap_or_default();
        sections.entry(section).or_default().push(pair);
    }
    let section = |name: &str| sections.get(name).cloned().unwrap_or_default();

    // VNI claims: vni -> owner.
    let vni_prefix = format!("{prefix}vni/");
    let claims: BTreeMap<u32, String> = section("vni")
        .iter()
        .filter_map(|p| {
            Some((
                p.key.strip_prefix(&vni_prefix)?.parse().ok()?,
                p.value_str(),
            ))
        })
        .collect();

    // Address allocations.
    let mut allocations = BTreeMap::new();
    for pair in section("ipam") {
        match parse_allocation(prefix, pair) {
            Ok((key, value)) => {
                allocations.insert(key, value);
            }
            Err(r) => rejected.push(r),
        }
    }

    // Networks: per record, then the VNI claim, then overlaps (earlier created wins).
    let mut candidates = Vec::new();
    for pair in section("networks") {
        match parse_network(prefix, pair) {
            Ok(network) => {
                let owner = claims.get(&network.vni);
                if owner.map(String::as_str) != Some(network.name.as_str()) {
                    let detail = match owner {
                        Some(owner) => {
                            format!("VNI {} belongs to network {owner:?}", network.vni)
                        }
                        None => format!(
                            "VNI {} is not claimed (no vni/{} key)",
                            network.vni, network.vni
                        ),
                    };
                    rejected.push(Rejection::new(
                        &pair.key,
                        RecordKind::Network,
                        VniNotOwned,
                        detail,
                    ));
                    continue;
                }
                candidates.push((pair.create_index, network, pair.key.as_str()));
            }
            Err(r) => rejected.push(r),
        }
    }
    candidates.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    let mut subnets = SubnetSet::default();
    let mut networks = Vec::new();
    for (_, network, key) in candidates {
        if let Some(other) = subnets.overlapping(network.subnet) {
            rejected.push(Rejection::new(
                key,
                RecordKind::Network,
                SubnetOverlap,
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
    let by_name: BTreeMap<&str, &Network> = networks.iter().map(|n| (n.name.as_str(), n)).collect();

    // Nodes: per record, then VTEP conflicts (earlier registered wins; never ours).
    let mut candidates = Vec::new();
    for pair in section("nodes") {
        match parse_node(prefix, pair) {
            Ok(node) => candidates.push((pair.create_index, node, pair.key.as_str())),
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
                    DuplicateVtep,
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

    // Endpoints: per record, then one per (network, address).
    let mut groups: BTreeMap<(String, Ipv4Addr), Vec<(Endpoint, &str)>> = BTreeMap::new();
    let endpoint_prefix = format!("{prefix}endpoints/");
    for pair in section("endpoints") {
        let network = pair
            .key
            .strip_prefix(&endpoint_prefix)
            .and_then(|rest| rest.split('/').next())
            .and_then(|name| by_name.get(name).copied());
        match parse_endpoint(prefix, pair, network) {
            Ok(e) => groups
                .entry((e.network.clone(), e.ip))
                .or_default()
                .push((e, pair.key.as_str())),
            Err(r) => rejected.push(r),
        }
    }
    let mut endpoints = Vec::new();
    for ((network, ip), group) in groups {
        let owns = |e: &Endpoint| {
            allocations
                .get(&(network.clone(), ip))
                .is_some_and(|a| a.endpoint == e.id && a.node == e.node)
        };
        // On an agent, a container of its own first (never displaced by a record of
        // another node, even one that took over the IPAM key), then the IPAM key's owner.
        // A record merely naming this node has no say: it would displace a real remote
        // endpoint (and have the agent clean up after a container that never was).
        let winner = group
            .iter()
            .filter(|(e, _)| view.is_present_local(e))
            .min_by_key(|(e, key)| (!owns(e), *key))
            .or_else(|| group.iter().find(|(e, _)| owns(e)))
            .map(|(_, key)| *key);
        for (endpoint, key) in &group {
            if Some(*key) == winner {
                endpoints.push(endpoint.clone());
                continue;
            }
            let (reason, detail) = match winner {
                Some(w) => (
                    DuplicateAddress,
                    format!("address {ip} of network {network:?} is used by {w}"),
                ),
                None => (
                    AddressNotOwned,
                    match allocations.get(&(network.clone(), ip)) {
                        Some(a) => format!(
                            "address {ip} is allocated to endpoint {:?} on node {:?}",
                            a.endpoint, a.node
                        ),
                        None => format!("address {ip} is not allocated (no IPAM key)"),
                    },
                ),
            };
            rejected.push(Rejection::new(key, RecordKind::Endpoint, reason, detail));
        }
    }
    endpoints.sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
    rejected.sort_by(|a, b| (&a.key, a.reason).cmp(&(&b.key, b.reason)));
    Snapshot {
        state: ClusterState {
            networks,
            nodes,
            endpoints,
        },
        allocations,
        rejected,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "overlay/";

    fn pair(key: &str, value: &str, create_index: u64, session: Option<&str>) -> KvPair {
        KvPair {
            key: format!("{P}{key}"),
            value: value.as_bytes().to_vec(),
            create_index,
            modify_index: create_index,
            lock_index: 0,
            flags: 0,
            session: session.map(str::to_string),
        }
    }

    fn network(name: &str, subnet: &str, vni: u32, index: u64) -> Vec<KvPair> {
        let s: Ipv4Network = subnet.parse().unwrap();
        let gw = Ipv4Addr::from(u32::from(s.network()) + 1);
        vec![
            pair(
                &format!("networks/{name}"),
                &format!(
                    r#"{{"name":"{name}","subnet":"{subnet}","gateway":"{gw}","vni":{vni},"mtu":1450}}"#
                ),
                index,
                None,
            ),
            pair(&format!("vni/{vni}"), name, index, None),
        ]
    }

    fn endpoint_json(net: &str, id: &str, ip: &str, node: &str) -> String {
        let ipa: Ipv4Addr = ip.parse().unwrap();
        let mac = crate::dataplane::endpoint::mac_for(ipa);
        let ifname = container::host_ifname(net, id);
        format!(
            r#"{{"id":"{id}","network":"{net}","ip":"{ip}","mac":"{mac}","node":"{node}","vtep":"192.0.2.1","ifname":"{ifname}"}}"#
        )
    }

    fn endpoint(net: &str, id: &str, ip: &str, node: &str, owned: bool) -> Vec<KvPair> {
        let mut out = vec![pair(
            &format!("endpoints/{net}/{id}"),
            &endpoint_json(net, id, ip, node),
            50,
            None,
        )];
        if owned {
            out.push(pair(
                &format!("ipam/{net}/{ip}"),
                &format!(r#"{{"endpoint":"{id}","node":"{node}"}}"#),
                49,
                None,
            ));
        }
        out
    }

    fn node(name: &str, vtep: &str, index: u64, session: Option<&str>) -> KvPair {
        pair(
            &format!("nodes/{name}"),
            &format!(r#"{{"name":"{name}","vtep":"{vtep}","iface":"eth0"}}"#),
            index,
            session,
        )
    }

    fn reasons(s: &Snapshot) -> Vec<(String, RejectReason)> {
        s.rejected
            .iter()
            .map(|r| (r.key.trim_start_matches(P).to_string(), r.reason))
            .collect()
    }

    #[test]
    fn valid_records_pass() {
        let mut pairs = network("net1", "10.100.0.0/24", 2, 10);
        pairs.extend(endpoint("net1", "web", "10.100.0.2", "a", true));
        pairs.push(node("a", "192.0.2.1", 5, Some("s1")));
        let s = parse_snapshot(P, &pairs, View::Cluster);
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        assert_eq!(s.state.networks.len(), 1);
        assert_eq!(s.state.nodes.len(), 1);
        assert_eq!(s.state.endpoints.len(), 1);
    }

    #[test]
    fn bad_networks_are_rejected() {
        let mut pairs = network("ok", "10.100.0.0/24", 2, 10);
        pairs.push(pair("networks/junk", "not json", 11, None));
        pairs.extend(network("vni0", "10.101.0.0/24", 0, 12));
        pairs.extend(network("vnibig", "10.102.0.0/24", 1 << 24, 13));
        // Same VNI as "ok": its claim names "ok".
        pairs.push(network("dupvni", "10.103.0.0/24", 2, 14).remove(0));
        // Overlaps "ok", created later.
        pairs.extend(network("overlap", "10.100.0.128/25", 5, 15));
        pairs.push(pair(
            "networks/hostbits",
            r#"{"name":"hostbits","subnet":"10.104.0.1/24","gateway":"10.104.0.2","vni":6,"mtu":1450}"#,
            16,
            None,
        ));
        pairs.push(pair("vni/6", "hostbits", 16, None));
        pairs.extend(network("Bad Name", "10.105.0.0/24", 7, 17));
        pairs.push(pair(
            "networks/other",
            r#"{"name":"renamed","subnet":"10.106.0.0/24","gateway":"10.106.0.1","vni":8,"mtu":1450}"#,
            18,
            None,
        ));
        let s = parse_snapshot(P, &pairs, View::Cluster);
        let names: Vec<_> = s.state.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["ok"]);
        let got = reasons(&s);
        use RejectReason::*;
        for expected in [
            ("networks/junk", Malformed),
            ("networks/vni0", BadVni),
            ("networks/vnibig", BadVni),
            ("networks/dupvni", VniNotOwned),
            ("networks/overlap", SubnetOverlap),
            ("networks/hostbits", BadSubnet),
            ("networks/Bad Name", BadKey),
            ("networks/other", KeyMismatch),
        ] {
            assert!(
                got.contains(&(expected.0.to_string(), expected.1)),
                "{expected:?} not in {got:?}"
            );
        }
        assert_eq!(got.len(), 8, "{got:?}");
    }

    #[test]
    fn overlap_keeps_the_earlier_network_whatever_the_order() {
        let mut pairs = network("b-later", "10.0.0.0/8", 3, 20);
        pairs.extend(network("a-earlier", "10.1.0.0/16", 2, 10));
        let s = parse_snapshot(P, &pairs, View::Cluster);
        assert_eq!(s.state.networks[0].name, "a-earlier");
        assert_eq!(s.state.networks.len(), 1);
        pairs.reverse();
        let s2 = parse_snapshot(P, &pairs, View::Cluster);
        assert_eq!(s2.state.networks, s.state.networks);
    }

    #[test]
    fn bad_nodes_are_rejected() {
        let pairs = vec![
            node("a", "192.0.2.1", 1, Some("s1")),
            node("nosession", "192.0.2.2", 2, None),
            node("zero", "0.0.0.0", 3, Some("s")),
            node("lo", "127.0.0.1", 4, Some("s")),
            node("mc", "224.0.0.1", 5, Some("s")),
            node("bc", "255.255.255.255", 6, Some("s")),
            node("dup", "192.0.2.1", 7, Some("s")),
            pair("nodes/junk", "{", 8, Some("s")),
        ];
        let s = parse_snapshot(P, &pairs, View::Cluster);
        let names: Vec<_> = s.state.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a"]);
        use RejectReason::*;
        assert_eq!(
            reasons(&s),
            vec![
                ("nodes/bc".to_string(), BadVtep),
                ("nodes/dup".to_string(), DuplicateVtep),
                ("nodes/junk".to_string(), Malformed),
                ("nodes/lo".to_string(), BadVtep),
                ("nodes/mc".to_string(), BadVtep),
                ("nodes/nosession".to_string(), NoSession),
                ("nodes/zero".to_string(), BadVtep),
            ]
        );
        // An agent never lets another node take its VTEP.
        let links = BTreeSet::new();
        let s = parse_snapshot(
            P,
            &[node("b", "192.0.2.9", 1, Some("s"))],
            View::Node {
                name: "a",
                vtep: "192.0.2.9".parse().unwrap(),
                links: &links,
            },
        );
        assert!(s.state.nodes.is_empty());
        assert_eq!(s.rejected[0].reason, RejectReason::DuplicateVtep);
    }

    #[test]
    fn bad_endpoints_are_rejected() {
        let mut pairs = network("net1", "10.100.0.0/24", 2, 10);
        pairs.extend(endpoint("net1", "ok", "10.100.0.2", "a", true));
        pairs.extend(endpoint("net1", "outside", "10.200.0.2", "b", true));
        pairs.extend(endpoint("net1", "gw", "10.100.0.1", "b", true));
        pairs.extend(endpoint("net1", "dup", "10.100.0.2", "b", false));
        pairs.extend(endpoint("net1", "unowned", "10.100.0.7", "b", false));
        pairs.extend(endpoint("nonet", "x", "10.100.0.8", "b", true));
        pairs.push(pair("endpoints/net1/junk", "[]", 60, None));
        let mut eth0 = endpoint("net1", "eth0", "10.100.0.9", "a", true);
        eth0[0].value = endpoint_json("net1", "eth0", "10.100.0.9", "a")
            .replace(&container::host_ifname("net1", "eth0"), "eth0")
            .into_bytes();
        pairs.extend(eth0);
        let mut netns = endpoint("net1", "ns", "10.100.0.10", "a", true);
        netns[0].value = endpoint_json("net1", "ns", "10.100.0.10", "a")
            .replace("\"id\"", "\"netns\":\"../../tmp/x\",\"id\"")
            .into_bytes();
        pairs.extend(netns);
        let mut mac = endpoint("net1", "mac", "10.100.0.11", "a", true);
        mac[0].value = endpoint_json("net1", "mac", "10.100.0.11", "a")
            .replace("02:42:", "03:42:")
            .into_bytes();
        pairs.extend(mac);
        let mut unreadable = endpoint("net1", "nomac", "10.100.0.12", "a", true);
        unreadable[0].value = endpoint_json("net1", "nomac", "10.100.0.12", "a")
            .replace("02:42:", "02:42:zz:")
            .into_bytes();
        pairs.extend(unreadable);
        let s = parse_snapshot(P, &pairs, View::Cluster);
        let ids: Vec<_> = s.state.endpoints.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["ok"]);
        use RejectReason::*;
        let got = reasons(&s);
        for expected in [
            ("endpoints/net1/outside", BadAddress),
            ("endpoints/net1/gw", BadAddress),
            ("endpoints/net1/dup", DuplicateAddress),
            ("endpoints/net1/unowned", AddressNotOwned),
            ("endpoints/nonet/x", UnknownNetwork),
            ("endpoints/net1/junk", Malformed),
            ("endpoints/net1/eth0", BadIfname),
            ("endpoints/net1/ns", BadNetns),
            ("endpoints/net1/mac", BadMac),
            ("endpoints/net1/nomac", BadMac),
        ] {
            assert!(
                got.contains(&(expected.0.to_string(), expected.1)),
                "{expected:?} not in {got:?}"
            );
        }
    }

    #[test]
    fn a_local_endpoint_is_never_displaced_by_a_remote_one() {
        let mut pairs = network("net1", "10.100.0.0/24", 2, 10);
        pairs.extend(endpoint("net1", "mine", "10.100.0.2", "a", false));
        // The remote one even owns the IPAM key.
        pairs.extend(endpoint("net1", "theirs", "10.100.0.2", "b", true));
        let links = BTreeSet::from([container::host_ifname("net1", "mine")]);
        let view = View::Node {
            name: "a",
            vtep: "192.0.2.1".parse().unwrap(),
            links: &links,
        };
        let s = parse_snapshot(P, &pairs, view);
        let ids: Vec<_> = s.state.endpoints.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["mine"]);
        assert_eq!(s.rejected[0].reason, RejectReason::DuplicateAddress);
        // The CLI's view goes by the IPAM key.
        let s = parse_snapshot(P, &pairs, View::Cluster);
        assert_eq!(s.state.endpoints[0].id, "theirs");
        // A record naming this node without a container here does not win either.
        let none = BTreeSet::new();
        let view = View::Node {
            name: "a",
            vtep: "192.0.2.1".parse().unwrap(),
            links: &none,
        };
        let s = parse_snapshot(P, &pairs, view);
        assert_eq!(s.state.endpoints[0].id, "theirs");
    }

    #[test]
    fn subnet_overlaps_both_ways_but_not_neighbours() {
        let mut set = SubnetSet::default();
        set.insert("10.1.0.0/16".parse().unwrap(), "a");
        set.insert("10.3.0.0/24".parse().unwrap(), "b");
        let overlaps = |s: &str| set.overlapping(s.parse().unwrap()).map(str::to_string);
        assert_eq!(overlaps("10.1.2.0/24").as_deref(), Some("a"));
        assert_eq!(overlaps("10.0.0.0/8").as_deref(), Some("a"));
        assert_eq!(overlaps("10.3.0.0/24").as_deref(), Some("b"));
        assert_eq!(overlaps("10.3.0.128/25").as_deref(), Some("b"));
        assert_eq!(overlaps("10.2.0.0/16"), None);
        assert_eq!(overlaps("10.3.1.0/24"), None);
        assert_eq!(overlaps("0.0.0.0/0").as_deref(), Some("a"));
    }

    #[test]
    fn rejections_are_reported_once_while_they_last() {
        let r = |key: &str| Rejection::new(key, RecordKind::Node, RejectReason::NoSession, "x");
        let mut log = RejectionLog::default();
        let first = [r("a"), r("b")];
        assert_eq!(log.fresh(&first).len(), 2);
        assert_eq!(log.fresh(&first).len(), 0);
        assert_eq!(log.fresh(&[r("b")]).len(), 0);
        assert_eq!(log.fresh(&first).len(), 1);
    }
}
