//! From validated store records to the values the kernel maps hold: the one place the
//! planner (and anything else that writes maps from records) turns a [`Network`] or an
//! [`Endpoint`] into map keys and values. Byte order and padding are the
//! `overlay_common` constructors' business; the choices here are which record field
//! goes where.
use std::net::Ipv4Addr;

use overlay_common::{EndpointKey, EndpointValue, LocalIface, MacAddr, NetworkInfo};

use crate::store::{Endpoint, Network};

impl From<&Network> for NetworkInfo {
    fn from(network: &Network) -> Self {
        NetworkInfo::new(
            network.subnet.network(),
            network.subnet.mask(),
            network.gateway,
            network.mtu,
        )
    }
}

/// Where `endpoint` is looked up: its address within its network's VNI.
pub fn endpoint_key(vni: u32, endpoint: &Endpoint) -> EndpointKey {
    EndpointKey::new(vni, endpoint.ip)
}

/// `endpoint` as a container of this node, behind the host veth `ifindex`.
pub fn local_endpoint(endpoint: &Endpoint, ifindex: u32) -> EndpointValue {
    EndpointValue::local(ifindex, endpoint.mac)
}

/// `endpoint` on another node, reached at that node's current VTEP (not a copy in the
/// endpoint record: see [`Endpoint`]).
pub fn remote_endpoint(endpoint: &Endpoint, node_vtep: Ipv4Addr) -> EndpointValue {
    EndpointValue::remote(node_vtep, endpoint.mac)
}

/// What the container program knows about the veth of a local `endpoint`: its network,
/// its own address and MAC (for anti-spoofing) and the host veth's MAC (the gateway's
/// ARP answer).
pub fn local_iface(vni: u32, endpoint: &Endpoint, host_mac: MacAddr) -> LocalIface {
    LocalIface::new(vni, endpoint.ip, endpoint.mac, host_mac)
}

#[cfg(test)]
mod tests {
    use overlay_common::{ip_from_map, ipv4_from_map};

    use super::*;

    #[test]
    fn network_info_carries_the_subnet_in_network_byte_order() {
        let network = Network {
            name: "n".into(),
            subnet: "10.100.0.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 100, 0, 1),
            vni: 7,
            mtu: 1450,
            egress: Default::default(),
        };
        let info = NetworkInfo::from(&network);
        assert_eq!(ipv4_from_map(info.subnet), [10, 100, 0, 0]);
        assert_eq!(ipv4_from_map(info.netmask), [255, 255, 255, 0]);
        assert_eq!(ip_from_map(info.gateway), network.gateway);
        assert_eq!(info.mtu, 1450);
    }
}
