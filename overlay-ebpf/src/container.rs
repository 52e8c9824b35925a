//! TC ingress on a host-side container veth: everything a container sends.
//!
//! Order of checks: the veth must belong to a known endpoint of a known network (whose
//! counter slot every later verdict counts in), the Ethernet and IPv4
//! source must be that endpoint's own (else spoofed), ARP is answered here, then the
//! destination decides: same network on this node (switched), same network elsewhere
//! (encapsulated), another network (dropped), the gateway or the world (host stack).
use aya_ebpf::{helpers::bpf_redirect_peer, maps::lpm_trie::Key, programs::TcContext};
use overlay_common::{
    proto::{
        ARP_HLEN, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ICMP_QUOTED_PAYLOAD, IPPROTO_TCP, IPV4_IHL_MIN,
        IPV4_VERSION,
    },
    Counter, EndpointKey, LocalIface, NetworkInfo,
};

use crate::{
    arp,
    counters::{count, SLOT_UNDERLAY},
    encap,
    headers::{EthHdr, Ipv4Hdr, TcpHdrPrefix},
    maps::{ENDPOINTS, LOCAL_IFACES, NETWORKS, SUBNETS},
    packet::{make_linear, ptr_at},
    verdict::tc::{drop, pass_to_host},
};

/// Bytes made linear before the EtherType decides: Ethernet and an ARP packet, which
/// also covers Ethernet and a minimal IPv4 header.
const FIRST_HEADERS_LEN: usize = ETH_HLEN + ARP_HLEN;
/// Bytes past the IPv4 header made linear: a TCP header up to its data offset (which a
/// GSO packet's segment size needs), else as much as an ICMP error quotes (the ICMP path
/// itself linearises what it quotes).
const TCP_PREFIX_LEN: usize = core::mem::size_of::<TcpHdrPrefix>();
const OTHER_L4_PREFIX_LEN: usize = ICMP_QUOTED_PAYLOAD;
/// LPM prefix length that matches a single IPv4 address.
const HOST_PREFIX_LEN: u32 = 32;

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let skb = unsafe { &*ctx.skb.skb };
    let len = skb.len as u64;
    // Map keys must live on the stack, not in the context: force a copy.
    // SAFETY: reading a u32 field of the live context.
    let ifindex: u32 = unsafe { core::ptr::read_volatile(&skb.ifindex) };
    let Some(iface) = (unsafe { LOCAL_IFACES.get(&ifindex) }).copied() else {
        // Attached to a veth the agent has not registered (yet): stay out of the way.
        return pass_to_host(SLOT_UNDERLAY, len);
    };
    let Some(network) = (unsafe { NETWORKS.get(&iface.vni) }).copied() else {
        return drop(SLOT_UNDERLAY, Counter::DropUnknownVni, len);
    };
    let slot = network.slot;
    // Headers only, never payload (see `make_linear`): a local socket's TCP segment has
    // its headers linear already and is not pulled at all.
    if !make_linear(ctx, FIRST_HEADERS_LEN) {
        return drop(slot, Counter::DropMalformed, len);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return drop(slot, Counter::DropMalformed, len);
    };
    // SAFETY: `ptr_at` bounds-checked the header.
    let eth = unsafe { *eth };
    if eth.src != iface.mac {
        return drop(slot, Counter::DropSpoofed, len);
    }
    if eth.ether_type == ETH_P_ARP.to_be() {
        arp::handle(ctx, &iface, &network, len)
    } else if eth.ether_type == ETH_P_IP.to_be() {
        ipv4(ctx, &iface, &network, len)
    } else {
        // Not IPv4: the overlay does not carry it; the host may (e.g. IPv6 link-local).
        pass_to_host(slot, len)
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, iface: &LocalIface, network: &NetworkInfo, len: u64) -> i32 {
    let slot = network.slot;
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), ETH_HLEN) else {
        return drop(slot, Counter::DropMalformed, len);
    };
    // SAFETY: bounds-checked above.
    let ip = unsafe { *ip };
    if ip.version() != IPV4_VERSION || ip.ihl() < IPV4_IHL_MIN {
        return drop(slot, Counter::DropMalformed, len);
    }
    if ip.saddr != iface.ip {
        return drop(slot, Counter::DropSpoofed, len);
    }
    let l4_prefix = if ip.protocol == IPPROTO_TCP {
        TCP_PREFIX_LEN
    } else {
        OTHER_L4_PREFIX_LEN
    };
    if !make_linear(ctx, ETH_HLEN + ip.header_len() + l4_prefix) {
        return drop(slot, Counter::DropMalformed, len);
    }
    let dst = ip.daddr;
    if dst == network.gateway {
        return pass_to_host(slot, len);
    }
    if !network.contains(dst) {
        if SUBNETS.get(Key::new(HOST_PREFIX_LEN, dst)).is_some() {
            return drop(slot, Counter::DropCrossNetwork, len);
        }
        return pass_to_host(slot, len);
    }
    let key = EndpointKey {
        vni: iface.vni,
        ip: dst,
    };
    let endpoint = match unsafe { ENDPOINTS.get(&key) } {
        Some(ep) => *ep,
        None => return drop(slot, Counter::DropNoEndpoint, len),
    };
    if endpoint.is_local() {
        switch_local(ctx, slot, endpoint.ifindex, &endpoint.mac, len)
    } else {
        encap::encapsulate(ctx, iface, network, &endpoint, &ip, len)
    }
}

/// Delivers to another container on this node, straight into its namespace.
#[inline(always)]
fn switch_local(ctx: &TcContext, slot: u32, ifindex: u32, mac: &[u8; 6], len: u64) -> i32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return drop(slot, Counter::DropMalformed, len);
    };
    // SAFETY: bounds-checked above.
    unsafe { (*eth).dst = *mac };
    count(slot, Counter::SwitchedLocal, len);
    // SAFETY: plain helper call; the kernel validates the ifindex.
    unsafe { bpf_redirect_peer(ifindex, 0) as i32 }
}
