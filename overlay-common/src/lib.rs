//! Map key/value types shared by the kernel programs (`overlay-ebpf`) and the agent
//! (`overlay-ctl`).
//!
//! Every type is `#[repr(C)]`, has no implicit padding (explicit `_pad` fields where the
//! layout needs them) and a compile-time size assertion, because the kernel and user space
//! must agree on every byte. IPv4 addresses are stored in network byte order (`u32` as
//! read from the packet), so the kernel side never byte-swaps them; the user side converts
//! with [`ipv4_to_map`] / [`ipv4_from_map`].
//!
//! User space builds every map value through the constructors here (`EndpointKey::new`,
//! `EndpointValue::local`, `LocalIface::new`, ...), which take typed values
//! ([`Ipv4Addr`], [`MacAddr`]) and fill the padding, so no caller writes a `_pad` field or
//! a byte-order conversion by hand.
#![no_std]

pub mod counters;
pub mod mac;
pub mod proto;

use core::net::Ipv4Addr;

pub use counters::{counter_index, Counter, CounterValue, SLOT_UNDERLAY};
pub use mac::MacAddr;

/// Map names as they appear in the object file and under the pin directory.
pub mod map_names {
    pub const COUNTERS: &str = "COUNTERS";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const LOCAL_IFACES: &str = "LOCAL_IFACES";
    pub const NETWORKS: &str = "NETWORKS";
    pub const SUBNETS: &str = "SUBNETS";
    pub const VTEPS: &str = "VTEPS";
    pub const UNDERLAY: &str = "UNDERLAY";
    pub const CLUSTER: &str = "CLUSTER";
    pub const NEXTHOPS: &str = "NEXTHOPS";
}

/// Program names (the function names in `overlay-ebpf`).
pub mod program_names {
    /// XDP on the underlay interface: classifies, validates and decapsulates VXLAN.
    pub const UNDERLAY_XDP: &str = "overlay_underlay";
    /// TC ingress on the underlay interface: the same decapsulation for devices whose
    /// native XDP path loses the skb's checksum and GSO state (veth).
    pub const UNDERLAY_TC: &str = "overlay_underlay_tc";
    /// TC ingress on each host-side container veth: ARP, anti-spoofing, switching, encap.
    pub const CONTAINER_TC: &str = "overlay_container";
    /// A pass-through XDP program for container-side veths: gives the veth the NAPI
    /// context that `XDP_REDIRECT` into it needs.
    pub const XDP_PASS: &str = "overlay_xdp_pass";
}

/// Map capacities.
pub mod capacity {
    pub const ENDPOINTS: u32 = 65_536;
    pub const LOCAL_IFACES: u32 = 4_096;
    pub const NETWORKS: u32 = 4_096;
    /// Counter slots: one per network and [`crate::SLOT_UNDERLAY`].
    pub const COUNTER_SLOTS: u32 = NETWORKS + 1;
    /// Entries of the per-CPU `COUNTERS` array: every counter of every slot.
    pub const COUNTERS: u32 = COUNTER_SLOTS * crate::Counter::COUNT;
    pub const SUBNETS: u32 = 4_096;
    pub const VTEPS: u32 = 4_096;
    pub const UNDERLAY: u32 = 1;
    pub const CLUSTER: u32 = 1;
    pub const NEXTHOPS: u32 = VTEPS;
}

/// Largest valid VXLAN network identifier (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// VXLAN encapsulation overhead on an IPv4 underlay: outer Ethernet + IPv4 + UDP + VXLAN.
pub const VXLAN_OVERHEAD: u32 = proto::ETH_HLEN as u32
    + proto::IPV4_HLEN_MIN as u32
    + proto::UDP_HLEN as u32
    + proto::VXLAN_HLEN as u32;

/// The largest inner IPv4 packet a container of a network with MTU `network_mtu` may
/// send through a tunnel over an underlay of MTU `underlay_mtu`: the network's MTU, or
/// less when the underlay cannot carry it once encapsulated (a node whose underlay is
/// smaller than the cluster's). The data plane answers anything larger with ICMP
/// "fragmentation needed" carrying this size.
pub const fn tunnel_mtu(network_mtu: u32, underlay_mtu: u32) -> u32 {
    let fits_underlay = underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
    if network_mtu < fits_underlay {
        network_mtu
    } else {
        fits_underlay
    }
}

/// Converts an address to its map representation (network byte order in a `u32`).
pub const fn ipv4_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Converts a map representation back to octets.
pub const fn ipv4_from_map(value: u32) -> [u8; 4] {
    value.to_ne_bytes()
}

/// [`ipv4_to_map`] for an address.
pub const fn ip_to_map(ip: Ipv4Addr) -> u32 {
    ipv4_to_map(ip.octets())
}

/// [`ipv4_from_map`] to an address.
pub const fn ip_from_map(value: u32) -> Ipv4Addr {
    let [a, b, c, d] = ipv4_from_map(value);
    Ipv4Addr::new(a, b, c, d)
}

/// Key of [`map_names::ENDPOINTS`]: an endpoint is identified by its network and address,
/// so two networks may use the same subnet and stay apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub vni: u32,
    /// Network byte order.
    pub ip: u32,
}

impl EndpointKey {
    pub const fn new(vni: u32, ip: Ipv4Addr) -> Self {
        Self {
            vni,
            ip: ip_to_map(ip),
        }
    }
}

/// Where an endpoint lives.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointKind {
    /// On this node, behind the host-side veth `ifindex`.
    Local = 1,
    /// On another node, reached through the VXLAN tunnel to `vtep`.
    Remote = 2,
}

/// Value of [`map_names::ENDPOINTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    /// An [`EndpointKind`] as `u32`.
    pub kind: u32,
    /// Host-side veth of a local endpoint; 0 for remote ones.
    pub ifindex: u32,
    /// Underlay address of the node of a remote endpoint (network byte order); 0 for local.
    pub vtep: u32,
    /// The endpoint's own MAC address (answered to ARP, checked against spoofing).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl EndpointValue {
    /// An endpoint on this node, behind the host-side veth `ifindex`.
    pub const fn local(ifindex: u32, mac: MacAddr) -> Self {
        Self {
            kind: EndpointKind::Local as u32,
            ifindex,
            vtep: 0,
            mac: mac.octets(),
            _pad: [0; 2],
        }
    }

    /// An endpoint on the node whose VTEP is `vtep`.
    pub const fn remote(vtep: Ipv4Addr, mac: MacAddr) -> Self {
        Self {
            kind: EndpointKind::Remote as u32,
            ifindex: 0,
            vtep: ip_to_map(vtep),
            mac: mac.octets(),
            _pad: [0; 2],
        }
    }

    pub const fn is_local(&self) -> bool {
        self.kind == EndpointKind::Local as u32
    }
}

/// Value of [`map_names::LOCAL_IFACES`], keyed by the host-side veth ifindex (`u32`): which
/// endpoint sits behind this veth. The TC program uses it to find the sender's network and
/// to reject spoofed source addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalIface {
    pub vni: u32,
    /// The container's address (network byte order).
    pub ip: u32,
    /// The container's MAC.
    pub mac: [u8; 6],
    /// The host-side veth's MAC: the gateway's ARP answer, so traffic for the gateway and
    /// the world reaches the host stack addressed to it.
    pub host_mac: [u8; 6],
}

impl LocalIface {
    /// The container `ip`/`mac` of network `vni`, behind a host veth whose MAC is
    /// `host_mac`.
    pub const fn new(vni: u32, ip: Ipv4Addr, mac: MacAddr, host_mac: MacAddr) -> Self {
        Self {
            vni,
            ip: ip_to_map(ip),
            mac: mac.octets(),
            host_mac: host_mac.octets(),
        }
    }
}

/// Value of [`map_names::NETWORKS`], keyed by VNI (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkInfo {
    /// Network byte order.
    pub subnet: u32,
    /// Network byte order (e.g. `255.255.255.0` for a /24).
    pub netmask: u32,
    /// Network byte order.
    pub gateway: u32,
    /// The containers' MTU (the cluster's smallest underlay MTU minus
    /// [`VXLAN_OVERHEAD`] by default): no packet larger is tunnelled (see [`tunnel_mtu`]).
    pub mtu: u32,
    /// Where this network's counters sit in the `COUNTERS` array (see
    /// [`counter_index`]): assigned by the agent's map code when it first writes the
    /// network, kept while the network exists, reused after it is deleted. 0 (the
    /// underlay's slot) in values built by [`NetworkInfo::new`].
    pub slot: u32,
}

impl NetworkInfo {
    /// A network of `subnet` (its network address) and `netmask`, with its gateway and
    /// the containers' MTU.
    pub const fn new(subnet: Ipv4Addr, netmask: Ipv4Addr, gateway: Ipv4Addr, mtu: u32) -> Self {
        Self {
            subnet: ip_to_map(subnet),
            netmask: ip_to_map(netmask),
            gateway: ip_to_map(gateway),
            mtu,
            slot: SLOT_UNDERLAY,
        }
    }

    /// The same network with its counters in `slot`.
    pub const fn with_slot(self, slot: u32) -> Self {
        Self { slot, ..self }
    }

    /// Whether `ip` (network byte order) lies in this network's subnet.
    pub const fn contains(&self, ip: u32) -> bool {
        ip & self.netmask == self.subnet
    }
}

/// Key of [`map_names::SUBNETS`], an LPM trie of every network's subnet, used to tell
/// traffic to another network (dropped) from traffic to the outside world (to the host).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetKey {
    pub prefix_len: u32,
    /// Network byte order.
    pub ip: u32,
}

impl SubnetKey {
    pub const fn new(prefix_len: u32, ip: Ipv4Addr) -> Self {
        Self {
            prefix_len,
            ip: ip_to_map(ip),
        }
    }
}

/// Value of [`map_names::SUBNETS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetValue {
    /// A network that owns this subnet (the lowest VNI when several share it).
    pub vni: u32,
}

/// Value of [`map_names::VTEPS`], keyed by a cluster node's underlay address (`u32`,
/// network byte order). Only VXLAN from these sources is accepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtepInfo {
    /// Bit 0: this entry is the local node.
    pub flags: u32,
}

impl VtepInfo {
    pub const LOCAL: u32 = 1;

    /// This node's own VTEP.
    pub const fn local() -> Self {
        Self { flags: Self::LOCAL }
    }

    /// Another cluster node's VTEP.
    pub const fn remote() -> Self {
        Self { flags: 0 }
    }

    pub const fn is_local(&self) -> bool {
        self.flags & Self::LOCAL != 0
    }
}

/// Value of [`map_names::UNDERLAY`] (an array with one element): this node's underlay.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnderlayConfig {
    pub ifindex: u32,
    /// This node's VTEP address (network byte order); 0 until the agent has configured it.
    pub vtep: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl UnderlayConfig {
    /// The underlay interface `ifindex` (MAC `mac`, MTU `mtu`) with this node's `vtep`.
    pub const fn new(ifindex: u32, vtep: Ipv4Addr, mtu: u32, mac: MacAddr) -> Self {
        Self {
            ifindex,
            vtep: ip_to_map(vtep),
            mtu,
            mac: mac.octets(),
            _pad: [0; 2],
        }
    }
}

/// Value of [`map_names::CLUSTER`] (an array with one element): the settings every node
/// of the cluster shares, written by the agent from the cluster's config in the store.
/// The programs read it per packet, so a change needs no reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The VXLAN UDP destination port (network byte order); 0, the value of an entry
    /// nobody wrote, means [`proto::VXLAN_PORT`].
    pub vxlan_port: u16,
    pub _pad: [u8; 2],
}

impl ClusterConfig {
    /// Settings with VXLAN on UDP port `vxlan_port` (host order; 0 for the default).
    pub const fn new(vxlan_port: u16) -> Self {
        Self {
            vxlan_port: vxlan_port.to_be(),
            _pad: [0; 2],
        }
    }

    /// The VXLAN port in network byte order, as packets carry it: what the programs
    /// write and match.
    pub const fn vxlan_port_be(&self) -> u16 {
        if self.vxlan_port == 0 {
            proto::VXLAN_PORT.to_be()
        } else {
            self.vxlan_port
        }
    }

    /// The VXLAN port in host byte order (the default when unset).
    pub const fn vxlan_port(&self) -> u16 {
        u16::from_be(self.vxlan_port_be())
    }
}

/// Value of [`map_names::NEXTHOPS`], keyed by a remote node's VTEP (`u32`, network byte
/// order): how an encapsulated packet for that VTEP leaves this node. The agent keeps it
/// in step with the kernel's routes and neighbours; the encap program falls back to a
/// FIB lookup for a VTEP without an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The interface the route to the VTEP leaves through.
    pub ifindex: u32,
    /// The next hop's MAC: the VTEP's own, or its gateway's.
    pub dst_mac: [u8; 6],
    /// That interface's MAC.
    pub src_mac: [u8; 6],
}

impl NextHop {
    pub const fn new(ifindex: u32, dst_mac: MacAddr, src_mac: MacAddr) -> Self {
        Self {
            ifindex,
            dst_mac: dst_mac.octets(),
            src_mac: src_mac.octets(),
        }
    }
}

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

assert_size!(EndpointKey, 8);
assert_size!(EndpointValue, 20);
assert_size!(LocalIface, 20);
assert_size!(NetworkInfo, 20);
assert_size!(SubnetKey, 8);
assert_size!(SubnetValue, 4);
assert_size!(VtepInfo, 4);
assert_size!(UnderlayConfig, 20);
assert_size!(ClusterConfig, 4);
assert_size!(NextHop, 16);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is `repr(C)`, made only of integers and byte arrays, and has no
    // implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for LocalIface {}
    unsafe impl aya::Pod for NetworkInfo {}
    unsafe impl aya::Pod for SubnetKey {}
    unsafe impl aya::Pod for SubnetValue {}
    unsafe impl aya::Pod for VtepInfo {}
    unsafe impl aya::Pod for UnderlayConfig {}
    unsafe impl aya::Pod for ClusterConfig {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for CounterValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_contains_uses_network_byte_order() {
        let net = NetworkInfo::new(
            Ipv4Addr::new(10, 100, 0, 0),
            Ipv4Addr::new(255, 255, 255, 0),
            Ipv4Addr::new(10, 100, 0, 1),
            1450,
        );
        assert!(net.contains(ipv4_to_map([10, 100, 0, 77])));
        assert!(!net.contains(ipv4_to_map([10, 100, 1, 77])));
        assert_eq!(ipv4_from_map(net.gateway), [10, 100, 0, 1]);
    }

    #[test]
    fn constructors_store_network_byte_order_and_zero_padding() {
        let mac = MacAddr::new([2, 0, 0, 0, 0, 7]);
        let key = EndpointKey::new(5, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(ipv4_from_map(key.ip), [10, 0, 0, 7]);
        let remote = EndpointValue::remote(Ipv4Addr::new(192, 0, 2, 1), mac);
        assert_eq!(ip_from_map(remote.vtep), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!((remote._pad, remote.mac), ([0; 2], mac.octets()));
        assert!(EndpointValue::local(3, mac).is_local());
        assert!(VtepInfo::local().is_local() && !VtepInfo::remote().is_local());
    }

    #[test]
    fn cluster_config_defaults_to_the_iana_port_and_stores_network_order() {
        assert_eq!(ClusterConfig::default().vxlan_port(), proto::VXLAN_PORT);
        assert_eq!(ClusterConfig::new(0), ClusterConfig::default());
        let linux = ClusterConfig::new(proto::LINUX_VXLAN_PORT);
        assert_eq!(linux.vxlan_port(), 8472);
        assert_eq!(linux.vxlan_port_be().to_ne_bytes(), [0x21, 0x18]);
    }

    #[test]
    fn vxlan_overhead_is_fifty_bytes() {
        assert_eq!(VXLAN_OVERHEAD, 50);
    }

    #[test]
    fn tunnel_mtu_is_the_smaller_of_network_and_underlay() {
        // A network that fits the underlay keeps its MTU.
        assert_eq!(tunnel_mtu(1450, 1500), 1450);
        assert_eq!(tunnel_mtu(1400, 9000), 1400);
        // A network made for a jumbo underlay, on a node with a small one.
        assert_eq!(tunnel_mtu(8950, 1400), 1350);
        assert_eq!(tunnel_mtu(8950, 9000), 8950);
        // An underlay smaller than the encapsulation carries nothing.
        assert_eq!(tunnel_mtu(1450, 40), 0);
    }
}
