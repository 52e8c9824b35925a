//! The planner: from the cluster state in Consul (networks, live nodes, endpoints) to the
//! exact contents the data-plane maps should have on this node ([`DesiredMaps`]).
//! Writing them into the maps is [`super::apply`]'s job; running a whole reconcile (read,
//! plan, apply, follow-ups) is [`super::reconciler`]'s.
use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use overlay_common::{
    ClusterConfig, EndpointKey, EndpointValue, LocalIface, MacAddr, NetworkInfo, VtepInfo,
};

use crate::{
    dataplane::map_values,
    store::settings::DEFAULT_VXLAN_PORT,
    store::{Endpoint, NodeInfo},
};

pub use crate::store::ClusterState;

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
    /// The cluster-wide settings (the VXLAN port).
    pub cluster: ClusterConfig,
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
    let mut maps = DesiredMaps {
        cluster: ClusterConfig::new(state.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT)),
        ..Default::default()
    };
    let mut vni_of = BTreeMap::new();
    for network in &state.networks {
        maps.networks
            .insert(network.vni, NetworkInfo::from(network));
        maps.subnets.insert(network.subnet, network.vni);
        vni_of.insert(network.name.as_str(), network.vni);
    }
    let node_vtep: BTreeMap<&str, Ipv4Addr> = (state.nodes.iter())
        .map(|n| (n.name.as_str(), n.vtep))
        .collect();
    maps.vteps = vteps(&state.nodes, local.vtep);

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

/// The VTEPS map for the live `nodes`: each one's VTEP a remote one, and this node's
/// (`local`) always a local one, registered or not (the store may be away).
pub fn vteps(nodes: &[NodeInfo], local: Ipv4Addr) -> BTreeMap<Ipv4Addr, VtepInfo> {
    let mut vteps: BTreeMap<Ipv4Addr, VtepInfo> = (nodes.iter())
        .map(|n| (n.vtep, VtepInfo::remote()))
        .collect();
    vteps.insert(local, VtepInfo::local());
    vteps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{consul::KvPair, Network, NodeInfo};

    fn network(name: &str, subnet: &str, vni: u32) -> Network {
        let subnet: Ipv4Network = subnet.parse().unwrap();
        Network {
            name: name.into(),
            subnet,
            gateway: Ipv4Addr::from(u32::from(subnet.network()) + 1),
            vni,
            mtu: 1450,
            egress: Default::default(),
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
            underlay_mtu: Some(1500),
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
            vxlan_port: Some(8472),
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
        assert_eq!(maps.cluster.vxlan_port(), 8472);
    }

    #[test]
    fn plan_reports_local_endpoints_without_veth() {
        let state = ClusterState {
            networks: vec![network("net1", "10.100.0.0/24", 7)],
            nodes: vec![node("a", 1)],
            endpoints: vec![endpoint("one", "net1", [10, 100, 0, 2], "a")],
            vxlan_port: None,
        };
        let local = LocalNode {
            name: "a".into(),
            vtep: Ipv4Addr::new(192, 0, 2, 1),
        };
        let plan = plan(&state, &local, &BTreeMap::new());
        assert_eq!(plan.missing_veths.len(), 1);
        assert!(plan.maps.endpoints.is_empty());
        // A store that names no port: the default, written explicitly.
        assert_eq!(plan.maps.cluster, ClusterConfig::new(DEFAULT_VXLAN_PORT));
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
