//! The underlay's receive path: VXLAN decapsulation, at XDP or at TC ingress.
//!
//! Non-VXLAN traffic passes to the host untouched; VXLAN is UDP to the cluster's port
//! (the `CLUSTER` map, read per packet). VXLAN addressed to this node is
//! accepted only from a known cluster VTEP, with the I flag, for a known VNI, and for an
//! endpoint on this node; anything else is dropped and counted. Valid packets lose their
//! outer headers and go straight to the endpoint's container.
//!
//! Two hooks share the classification and validation below:
//! - [`handle_xdp`] for NICs: the earliest point, before an skb exists.
//! - [`handle_tc`] for devices whose native XDP path rebuilds the skb and so loses its
//!   checksum and GSO state (veth: a peer hands over its skbs with checksums left to
//!   "hardware" and 64 KB GSO frames). At TC ingress the skb keeps that state, so TCP
//!   and UDP stay correct with the host's offloads left as they are.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO},
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    proto::{
        ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN_MIN, IPV4_IHL_MIN, IPV4_VERSION, UDP_HLEN,
        VXLAN_FLAG_I, VXLAN_HLEN,
    },
    Counter, EndpointKey, EndpointValue,
};

use crate::{
    counters::{count, SLOT_UNDERLAY},
    headers::{EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr},
    maps::{underlay_config, vxlan_port_be, ENDPOINTS, NETWORKS, VTEPS},
    packet::{make_linear, ptr_at},
    verdict::{tc, xdp},
};

/// Outer Ethernet and a minimal IPv4 header: what TC needs linear to read the IHL.
const OUTER_IPV4_MIN_END: usize = ETH_HLEN + IPV4_HLEN_MIN;
/// From the outer UDP header to the end of a minimal inner IPv4 header: UDP, VXLAN,
/// inner Ethernet and inner IPv4 (8 + 8 + 14 + 20).
const UDP_TO_INNER_IPV4_END: usize = UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN_MIN;

#[inline(always)]
pub fn handle_xdp(ctx: &XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let frame_len = (data_end - data) as u64;
    let (outer_src, inner_offset, vxlan) = match classify(data, data_end) {
        Classified::Other => return xdp::underlay_pass(frame_len),
        Classified::Malformed => {
            return xdp::underlay_drop(SLOT_UNDERLAY, Counter::DropMalformed, frame_len)
        }
        Classified::Vxlan {
            outer_src,
            inner_offset,
            vxlan,
        } => (outer_src, inner_offset, vxlan),
    };
    count(SLOT_UNDERLAY, Counter::UnderlayVxlan, frame_len);
    let dest = match resolve(data, data_end, outer_src, inner_offset, vxlan) {
        Ok(dest) => dest,
        Err((vni, reason)) => return xdp::underlay_drop(vni, reason, frame_len),
    };
    // The sender learned this MAC from our ARP answer; a foreign VTEP (e.g. a Linux vxlan
    // device with static entries) might not have, so deliver to the real one.
    let Some(inner_eth) = ptr_at::<EthHdr>(data, data_end, inner_offset) else {
        return xdp::underlay_drop(dest.slot, Counter::DropMalformed, frame_len);
    };
    // SAFETY: bounds-checked above.
    unsafe { (*inner_eth).dst = dest.endpoint.mac };
    // SAFETY: the helper validates the new head itself; pointers are not reused after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner_offset as i32) } != 0 {
        return xdp::underlay_drop(dest.slot, Counter::DropInternal, frame_len);
    }
    count(
        dest.slot,
        Counter::Decapsulated,
        frame_len - inner_offset as u64,
    );
    // SAFETY: plain helper call; the kernel validates the ifindex.
    unsafe { bpf_redirect(dest.endpoint.ifindex, 0) as u32 }
}

#[inline(always)]
pub fn handle_tc(ctx: &TcContext) -> i32 {
    let frame_len = ctx.len() as u64;
    if !linearize_headers(ctx) {
        return tc::underlay_drop(SLOT_UNDERLAY, Counter::DropMalformed, frame_len);
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (outer_src, inner_offset, vxlan) = match classify(data, data_end) {
        Classified::Other => return tc::underlay_pass(frame_len),
        Classified::Malformed => {
            return tc::underlay_drop(SLOT_UNDERLAY, Counter::DropMalformed, frame_len)
        }
        Classified::Vxlan {
            outer_src,
            inner_offset,
            vxlan,
        } => (outer_src, inner_offset, vxlan),
    };
    count(SLOT_UNDERLAY, Counter::UnderlayVxlan, frame_len);
    let dest = match resolve(data, data_end, outer_src, inner_offset, vxlan) {
        Ok(dest) => dest,
        Err((vni, reason)) => return tc::underlay_drop(vni, reason, frame_len),
    };
    // Outer IPv4, UDP, VXLAN and the inner Ethernet header go (the bytes from the end of
    // the outer Ethernet header to the inner IPv4 header: as many as the inner frame's
    // offset); the outer Ethernet header stays and becomes the inner one below.
    // FIXED_GSO keeps a GSO skb's segment size, which counts payload only and so is the
    // same inside the tunnel.
    let removed = inner_offset;
    if ctx
        .adjust_room(
            -(removed as i32),
            BPF_ADJ_ROOM_MAC,
            BPF_F_ADJ_ROOM_FIXED_GSO as u64,
        )
        .is_err()
    {
        return tc::underlay_drop(dest.slot, Counter::DropInternal, frame_len);
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return tc::underlay_drop(dest.slot, Counter::DropInternal, frame_len);
    };
    // SAFETY: bounds-checked above. The EtherType is already IPv4 (outer and inner).
    unsafe {
        (*eth).dst = dest.endpoint.mac;
        (*eth).src = dest.inner_src_mac;
    }
    count(
        dest.slot,
        Counter::Decapsulated,
        frame_len - inner_offset as u64,
    );
    // SAFETY: plain helper call; the kernel validates the ifindex. The skb enters the
    // container's namespace as if received by its eth0, checksum and GSO state intact.
    unsafe { bpf_redirect_peer(dest.endpoint.ifindex, 0) as i32 }
}

/// Makes linear the headers [`classify`] and [`resolve`] read, and not one byte more,
/// stopping as soon as the frame is not VXLAN. Payload pulled into the head (which is
/// kmalloc'ed once the skb is uncloned) would stop the receiving TCP from coalescing the
/// decapsulated skb with the previous one (`skb_try_coalesce` refuses a locked head that
/// holds data), so every 64 KB GSO skb would sit alone in the socket's receive queue.
/// Headers a local sender built are linear already and cost no pull at all. False only
/// when the kernel cannot pull bytes the frame has.
#[inline(always)]
fn linearize_headers(ctx: &TcContext) -> bool {
    if !make_linear(ctx, OUTER_IPV4_MIN_END) {
        return false;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return true;
    };
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN) else {
        return true;
    };
    // SAFETY: both bounds-checked above.
    let (ether_type, ip) = unsafe { ((*eth).ether_type, &*ip) };
    if ether_type != ETH_P_IP.to_be() || ip.protocol != IPPROTO_UDP || ip.ihl() < IPV4_IHL_MIN {
        return true;
    }
    let udp_offset = ETH_HLEN + ip.header_len();
    if !make_linear(ctx, udp_offset + UDP_HLEN) {
        return false;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    match ptr_at::<UdpHdr>(data, data_end, udp_offset) {
        // SAFETY: bounds-checked by `ptr_at`.
        Some(udp) if unsafe { (*udp).dest } == vxlan_port_be() => {
            make_linear(ctx, udp_offset + UDP_TO_INNER_IPV4_END)
        }
        _ => true,
    }
}

enum Classified {
    /// Not VXLAN for this node: the host's business.
    Other,
    /// Claims to be IPv4/UDP/VXLAN but does not hold together.
    Malformed,
    Vxlan {
        /// Outer source address (network order).
        outer_src: u32,
        /// Offset of the inner Ethernet header.
        inner_offset: usize,
        vxlan: VxlanHdr,
    },
}

#[inline(always)]
fn classify(data: usize, data_end: usize) -> Classified {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return Classified::Malformed;
    };
    // SAFETY: `ptr_at` checked that the header lies inside the frame.
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return Classified::Other;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN) else {
        return Classified::Malformed;
    };
    let ip = unsafe { &*ip };
    if ip.version() != IPV4_VERSION || ip.ihl() < IPV4_IHL_MIN {
        return Classified::Malformed;
    }
    if ip.protocol != IPPROTO_UDP || ip.is_fragment() {
        return Classified::Other;
    }
    let udp_offset = ETH_HLEN + ip.header_len();
    let Some(udp) = ptr_at::<UdpHdr>(data, data_end, udp_offset) else {
        return Classified::Malformed;
    };
    // Only the cluster's current port is VXLAN: after a change, the old port is the
    // host's business like any other UDP.
    if unsafe { (*udp).dest } != vxlan_port_be() {
        return Classified::Other;
    }
    match underlay_config() {
        Some(cfg) if cfg.vtep != 0 && cfg.vtep == ip.daddr => {}
        _ => return Classified::Other,
    }
    let vxlan_offset = udp_offset + UDP_HLEN;
    let Some(vxlan) = ptr_at::<VxlanHdr>(data, data_end, vxlan_offset) else {
        return Classified::Malformed;
    };
    Classified::Vxlan {
        outer_src: ip.saddr,
        inner_offset: vxlan_offset + VXLAN_HLEN,
        vxlan: unsafe { *vxlan },
    }
}

/// Where a valid VXLAN packet goes.
struct Destination {
    /// The network's counter slot.
    slot: u32,
    endpoint: EndpointValue,
    /// The inner frame's source MAC, kept when TC rebuilds the Ethernet header.
    inner_src_mac: [u8; 6],
}

/// Validates a classified VXLAN packet against the maps: known VTEP, the I flag, known
/// VNI, inner IPv4 to an endpoint on this node. Errors carry the counter slot and drop
/// reason.
#[inline(always)]
fn resolve(
    data: usize,
    data_end: usize,
    outer_src: u32,
    inner_offset: usize,
    vxlan: VxlanHdr,
) -> Result<Destination, (u32, Counter)> {
    // SAFETY (map lookups): values are plain data owned by the map.
    if unsafe { VTEPS.get(&outer_src) }.is_none() {
        return Err((SLOT_UNDERLAY, Counter::DropUnknownVtep));
    }
    if vxlan.flags & VXLAN_FLAG_I == 0 {
        return Err((SLOT_UNDERLAY, Counter::DropMalformed));
    }
    let vni = vxlan.vni();
    let Some(network) = (unsafe { NETWORKS.get(&vni) }) else {
        return Err((SLOT_UNDERLAY, Counter::DropUnknownVni));
    };
    let slot = network.slot;
    let Some(inner_eth) = ptr_at::<EthHdr>(data, data_end, inner_offset) else {
        return Err((slot, Counter::DropMalformed));
    };
    // SAFETY: bounds-checked above.
    let inner_eth = unsafe { *inner_eth };
    if inner_eth.ether_type != ETH_P_IP.to_be() {
        return Err((slot, Counter::DropMalformed));
    }
    let Some(inner_ip) = ptr_at::<Ipv4Hdr>(data, data_end, inner_offset + ETH_HLEN) else {
        return Err((slot, Counter::DropMalformed));
    };
    let key = EndpointKey {
        vni,
        // SAFETY: bounds-checked above.
        ip: unsafe { (*inner_ip).daddr },
    };
    match unsafe { ENDPOINTS.get(&key) } {
        Some(ep) if ep.is_local() => Ok(Destination {
            slot,
            endpoint: *ep,
            inner_src_mac: inner_eth.src,
        }),
        _ => Err((slot, Counter::DropNoEndpoint)),
    }
}
