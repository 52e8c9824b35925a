//! The reconcile step: from the cluster state in Consul (networks, live nodes, endpoints)
//! to the exact contents the data-plane maps should have on this node, and the diff that
//! makes them so. Applying is idempotent: running it twice changes nothing the second
//! time, and entries nobody asked for are removed.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use overlay_common::{EndpointKey, EndpointValue, LocalIface, MacAddr, NetworkInfo, VtepInfo};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    dataplane::datapath::{Datapath, DatapathError},
    dataplane::map_values,
    store::consul::KvPair,
    store::records,
    store::{Endpoint, Network, NodeInfo},
};

/// The part of the KV store the data plane follows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub networks: Vec<Network>,
    pub nodes: Vec<NodeInfo>,
    pub endpoints: Vec<Endpoint>,
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

/// A local endpoint's host-side veth as found on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostVeth {
    pub ifindex: u32,
    pub mac: MacAddr,
}

/// Who this node is.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub name: String,
    pub vtep: Ipv4Addr,
}

/// What the maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredMaps {
    pub networks: BTreeMap<u32, NetworkInfo>,
    pub subnets: BTreeMap<Ipv4Network, u32>,
    pub vteps: BTreeMap<Ipv4Addr, VtepInfo>,
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    pub local_ifaces: BTreeMap<u32, LocalIface>,
}

/// Local endpoints whose veth is missing: left to [`DesiredMaps`]'s caller to clean up.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub maps: DesiredMaps,
    pub missing_veths: Vec<Endpoint>,
}

/// Computes the desired maps. Remote endpoints only count while their node is live (its
/// key exists, held by its session), and they are reached at the node's current VTEP;
/// local endpoints need their host veth (`veths`, by interface name).
pub fn plan(state: &ClusterState, local: &LocalNode, veths: &BTreeMap<String, HostVeth>) -> Plan {
    let mut maps = DesiredMaps::default();
    let mut vni_of = BTreeMap::new();
    for network in &state.networks {
        maps.networks
            .insert(network.vni, NetworkInfo::from(network));
        maps.subnets.insert(network.subnet, network.vni);
        vni_of.insert(network.name.as_str(), network.vni);
    }
    let mut node_vtep = BTreeMap::new();
    for node in &state.nodes {
        node_vtep.insert(node.name.as_str(), node.vtep);
        maps.vteps.insert(node.vtep, VtepInfo::remote());
    }
    // This node is always a VTEP, registered or not (Consul may be away).
    maps.vteps.insert(local.vtep, VtepInfo::local());

    let mut missing_veths = Vec::new();
    for endpoint in &state.endpoints {
        let Some(&vni) = vni_of.get(endpoint.network.as_str()) else {
            continue;
        };
        let key = map_values::endpoint_key(vni, endpoint);
        if endpoint.node == local.name {
            let Some(veth) = veths.get(&endpoint.ifname) else {
                missing_veths.push(endpoint.clone());
                continue;
            };
            maps.endpoints
                .insert(key, map_values::local_endpoint(endpoint, veth.ifindex));
            maps.local_ifaces.insert(
                veth.ifindex,
                map_values::local_iface(vni, endpoint, veth.mac),
            );
        } else if let Some(vtep) = node_vtep.get(endpoint.node.as_str()) {
            // A remote record never displaces a local endpoint (the validated state has
            // one endpoint per address; this holds whatever the order).
            if maps.endpoints.get(&key).is_some_and(|v| v.is_local()) {
                continue;
            }
            maps.endpoints
                .insert(key, map_values::remote_endpoint(endpoint, *vtep));
        }
    }
    Plan {
        maps,
        missing_veths,
    }
}

/// How many failures an [`ApplyReport`] describes in full.
const MAX_REPORTED_ERRORS: usize = 8;

/// What one apply changed, and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ApplyReport {
    pub upserted: usize,
    pub removed: usize,
    pub attached: usize,
    pub detached: usize,
    /// Map updates and attachments that failed (each independently of the others).
    #[serde(default)]
    pub failed: usize,
    /// Wanted entries that are not in their map after this run, by map.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub missing: BTreeMap<String, usize>,
    /// The first failures, each with what it was for and the kernel's errno.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        self.upserted + self.removed + self.attached + self.detached > 0
    }

    /// One line about the failures, `None` when there were none.
    pub fn failure_summary(&self) -> Option<String> {
        if self.failed == 0 {
            return None;
        }
        let missing: Vec<String> = self
            .missing
            .iter()
            .map(|(map, n)| format!("{map} {n}"))
            .collect();
        Some(format!(
            "{} map update(s) failed (missing entries: {}); first: {}",
            self.failed,
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            },
            self.errors.first().map(String::as_str).unwrap_or("-")
        ))
    }

    fn fail(&mut self, map: Option<&str>, what: impl fmt::Display, error: &DatapathError) {
        self.failed += 1;
        if let Some(map) = map {
            *self.missing.entry(map.to_string()).or_default() += 1;
        }
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(format!("{what}: {}", error_chain(error)));
        }
    }
}

/// An error with all its sources, so the errno of a failed map update shows (aya's own
/// message stops at "`bpf_map_update_elem` failed").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Removes the entries of `current` that `desired` does not have.
fn remove_stale<K: Ord + Copy + fmt::Debug, V>(
    datapath: &mut Datapath,
    map: &str,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    report: &mut ApplyReport,
    remove: impl Fn(&mut Datapath, K) -> Result<(), DatapathError>,
) {
    for key in current.keys() {
        if !desired.contains_key(key) {
            match remove(datapath, *key) {
                Ok(()) => report.removed += 1,
                Err(e) => report.fail(None, format_args!("remove {map} {key:?}"), &e),
            }
        }
    }
}

/// Writes the entries of `desired` that differ from `current`; returns the keys whose
/// write failed (each entry is tried, whatever happened to the others).
fn upsert_changed<K: Ord + Copy + fmt::Debug, V: PartialEq + Copy>(
    datapath: &mut Datapath,
    map: &str,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    report: &mut ApplyReport,
    upsert: impl Fn(&mut Datapath, K, V) -> Result<(), DatapathError>,
) -> BTreeSet<K> {
    let mut failed = BTreeSet::new();
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            match upsert(datapath, *key, *value) {
                Ok(()) => report.upserted += 1,
                Err(e) => {
                    report.fail(Some(map), format_args!("write {map} {key:?}"), &e);
                    failed.insert(*key);
                }
            }
        }
    }
    failed
}

/// Makes the maps and the container attachments equal to `desired`, as far as the maps
/// allow. Removals go first (so replacing entries never needs more room than the maps
/// have), then additions; every entry is applied independently, and what fails is
/// counted in the report with its errno, the rest goes on. Order matters for traffic in
/// flight: a removed endpoint's program is detached before its entries go, and a new
/// veth gets its program only once its entries are in (never when they could not be
/// written). Only reading the maps can fail the whole apply.
pub fn apply(
    datapath: &mut Datapath,
    desired: &DesiredMaps,
    veth_names: &BTreeMap<u32, String>,
) -> Result<ApplyReport, DatapathError> {
    use overlay_common::map_names as names;
    let mut report = ApplyReport::default();

    // Detach from veths that are no longer local endpoints.
    let wanted: BTreeSet<u32> = desired.local_ifaces.keys().copied().collect();
    let mut attached: BTreeSet<u32> = datapath.attached_containers().collect();
    let pinned: BTreeSet<u32> = datapath.pinned_container_links().into_iter().collect();
    for ifindex in attached.clone().union(&pinned) {
        if !wanted.contains(ifindex) {
            match datapath.detach_container(*ifindex) {
                Ok(()) => {
                    report.detached += 1;
                    attached.remove(ifindex);
                }
                Err(e) => report.fail(None, format_args!("detach ifindex {ifindex}"), &e),
            }
        }
    }

    // Removals, dependents first.
    let endpoints = datapath.endpoints()?;
    remove_stale(
        datapath,
        names::ENDPOINTS,
        &endpoints,
        &desired.endpoints,
        &mut report,
        |d, k| d.remove_endpoint(k),
    );
    let local_ifaces = datapath.local_ifaces()?;
    remove_stale(
        datapath,
        names::LOCAL_IFACES,
        &local_ifaces,
        &desired.local_ifaces,
        &mut report,
        |d, k| d.remove_local_iface(k),
    );
    let vteps = datapath.vteps()?;
    remove_stale(
        datapath,
        names::VTEPS,
        &vteps,
        &desired.vteps,
        &mut report,
        |d, k| d.remove_vtep(k),
    );
    let subnets = datapath.subnets()?;
    remove_stale(
        datapath,
        names::SUBNETS,
        &subnets,
        &desired.subnets,
        &mut report,
        |d, k| d.remove_subnet(k),
    );
    let networks = datapath.networks()?;
    remove_stale(
        datapath,
        names::NETWORKS,
        &networks,
        &desired.networks,
        &mut report,
        |d, k| d.remove_network(k),
    );

    // Additions and changes, what others depend on first.
    upsert_changed(
        datapath,
        names::NETWORKS,
        &networks,
        &desired.networks,
        &mut report,
        |d, k, v| d.upsert_network(k, &v),
    );
    upsert_changed(
        datapath,
        names::SUBNETS,
        &subnets,
        &desired.subnets,
        &mut report,
        |d, k, v| d.upsert_subnet(k, v),
    );
    upsert_changed(
        datapath,
        names::VTEPS,
        &vteps,
        &desired.vteps,
        &mut report,
        |d, k, v| d.upsert_vtep(k, &v),
    );
    let failed_ifaces = upsert_changed(
        datapath,
        names::LOCAL_IFACES,
        &local_ifaces,
        &desired.local_ifaces,
        &mut report,
        |d, k, v| d.upsert_local_iface(k, &v),
    );
    let failed_endpoints = upsert_changed(
        datapath,
        names::ENDPOINTS,
        &endpoints,
        &desired.endpoints,
        &mut report,
        |d, k, v| d.upsert_endpoint(k, &v),
    );

    // Attach to new local veths whose entries are in place.
    for (ifindex, iface) in &desired.local_ifaces {
        if attached.contains(ifindex) {
            continue;
        }
        let key = EndpointKey {
            vni: iface.vni,
            ip: iface.ip,
        };
        if failed_ifaces.contains(ifindex) || failed_endpoints.contains(&key) {
            continue;
        }
        let Some(name) = veth_names.get(ifindex) else {
            continue;
        };
        match datapath.attach_container(name) {
            Ok(_) => {
                attached.insert(*ifindex);
                report.attached += 1;
            }
            Err(e) => report.fail(None, format_args!("attach {name}"), &e),
        }
    }
    if report.changed() {
        info!(
            upserted = report.upserted,
            removed = report.removed,
            attached = report.attached,
            detached = report.detached,
            "data plane maps updated"
        );
    }
    if let Some(summary) = report.failure_summary() {
        warn!("{summary}");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, subnet: &str, vni: u32) -> Network {
        let subnet: Ipv4Network = subnet.parse().unwrap();
        Network {
            name: name.into(),
            subnet,
            gateway: Ipv4Addr::from(u32::from(subnet.network()) + 1),
            vni,
            mtu: 1450,
        }
    }

    fn endpoint(id: &str, network: &str, ip: [u8; 4], node: &str) -> Endpoint {
        let ip = Ipv4Addr::from(ip);
        Endpoint {
            id: id.into(),
            network: network.into(),
            ip,
            mac: crate::dataplane::endpoint::mac_for(ip),
            node: node.into(),
            ifname: format!("ov-{id}"),
            container: None,
            pid: None,
            netns: None,
        }
    }

    fn node(name: &str, last: u8) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            vtep: Ipv4Addr::new(192, 0, 2, last),
            iface: "eth0".into(),
        }
    }

    #[test]
    fn plan_places_local_and_remote_endpoints() {
        let state = ClusterState {
            networks: vec![network("net1", "10.100.0.0/24", 7)],
            nodes: vec![node("a", 1), node("b", 2)],
            endpoints: vec![
                endpoint("one", "net1", [10, 100, 0, 2], "a"),
                endpoint("two", "net1", [10, 100, 0, 3], "b"),
                // A node without a live key: its endpoints are not reachable.
                endpoint("three", "net1", [10, 100, 0, 4], "gone"),
                // An endpoint of a network that no longer exists.
                endpoint("four", "net9", [10, 9, 0, 4], "b"),
            ],
        };
        let local = LocalNode {
            name: "a".into(),
            vtep: Ipv4Addr::new(192, 0, 2, 1),
        };
        let veths = BTreeMap::from([(
            "ov-one".to_string(),
            HostVeth {
                ifindex: 42,
                mac: MacAddr::new([2, 0, 0, 0, 0, 1]),
            },
        )]);
        let plan = plan(&state, &local, &veths);
        assert!(plan.missing_veths.is_empty());
        let maps = plan.maps;
        assert_eq!(maps.networks.len(), 1);
        assert_eq!(maps.networks[&7].mtu, 1450);
        assert_eq!(maps.subnets.len(), 1);
        assert_eq!(maps.vteps.len(), 2);
        assert_eq!(maps.vteps[&local.vtep].flags, VtepInfo::LOCAL);
        assert_eq!(maps.endpoints.len(), 2);
        let one = EndpointKey::new(7, Ipv4Addr::new(10, 100, 0, 2));
        assert!(maps.endpoints[&one].is_local());
        let two = EndpointKey::new(7, Ipv4Addr::new(10, 100, 0, 3));
        assert_eq!(
            maps.endpoints[&two],
            EndpointValue::remote(
                Ipv4Addr::new(192, 0, 2, 2),
                crate::dataplane::endpoint::mac_for(Ipv4Addr::new(10, 100, 0, 3))
            )
        );
        assert_eq!(maps.local_ifaces[&42].vni, 7);
        assert_eq!(maps.local_ifaces[&42].host_mac, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn plan_reports_local_endpoints_without_veth() {
        let state = ClusterState {
            networks: vec![network("net1", "10.100.0.0/24", 7)],
            nodes: vec![node("a", 1)],
            endpoints: vec![endpoint("one", "net1", [10, 100, 0, 2], "a")],
        };
        let local = LocalNode {
            name: "a".into(),
            vtep: Ipv4Addr::new(192, 0, 2, 1),
        };
        let plan = plan(&state, &local, &BTreeMap::new());
        assert_eq!(plan.missing_veths.len(), 1);
        assert!(plan.maps.endpoints.is_empty());
    }

    #[test]
    fn state_decodes_from_pairs_and_skips_corrupt_values() {
        let pair = |key: &str, value: &[u8]| KvPair {
            key: key.into(),
            value: value.to_vec(),
            create_index: 1,
            modify_index: 1,
            lock_index: 0,
            flags: 0,
            session: key.ends_with("/a").then(|| "s1".to_string()),
        };
        let pairs = vec![
            pair(
                "overlay/networks/net1",
                br#"{"name":"net1","subnet":"10.100.0.0/24","gateway":"10.100.0.1","vni":7,"mtu":1450}"#,
            ),
            pair("overlay/vni/7", b"net1"),
            pair("overlay/networks/bad", b"not json"),
            pair(
                "overlay/nodes/a",
                br#"{"name":"a","vtep":"192.0.2.1","iface":"eth0"}"#,
            ),
            // Not held by a session: not a live node.
            pair(
                "overlay/nodes/b",
                br#"{"name":"b","vtep":"192.0.2.2","iface":"eth0"}"#,
            ),
            pair("overlay/ipam/net1/10.100.0.2", b"{}"),
        ];
        let state = ClusterState::from_pairs("overlay/", &pairs);
        assert_eq!(state.networks.len(), 1);
        assert_eq!(state.nodes.len(), 1);
        assert!(state.endpoints.is_empty());
    }
}
