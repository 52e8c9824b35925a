//! XDP on the underlay interface: the VXLAN decapsulation path.
//!
//! Non-VXLAN traffic passes to the host untouched. VXLAN addressed to this node is
//! accepted only from a known cluster VTEP, with the I flag, for a known VNI, and for an
//! endpoint on this node; anything else is dropped and counted. Valid packets lose their
//! outer headers and are redirected into the endpoint's veth.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use overlay_common::{
    proto::{
        ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_IHL_MIN, IPV4_VERSION, UDP_HLEN, VXLAN_FLAG_I,
        VXLAN_HLEN, VXLAN_PORT,
    },
    Counter, EndpointKey,
};

use crate::{
    counters::{count, VNI_UNDERLAY},
    headers::{EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr},
    maps::{underlay_config, ENDPOINTS, NETWORKS, VTEPS},
    packet::ptr_at,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let frame_len = (data_end - data) as u64;
    match classify(data, data_end) {
        Classified::Other => pass_other(frame_len),
        Classified::Malformed => drop(VNI_UNDERLAY, Counter::DropMalformed, frame_len),
        Classified::Vxlan {
            outer_src,
            inner_offset,
            vxlan,
        } => {
            count(VNI_UNDERLAY, Counter::UnderlayVxlan, frame_len);
            decapsulate(ctx, outer_src, inner_offset, vxlan, frame_len)
        }
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
    if unsafe { (*udp).dest } != VXLAN_PORT.to_be() {
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

#[inline(always)]
fn decapsulate(
    ctx: &XdpContext,
    outer_src: u32,
    inner_offset: usize,
    vxlan: VxlanHdr,
    frame_len: u64,
) -> u32 {
    // SAFETY (map lookups): values are plain data owned by the map.
    if unsafe { VTEPS.get(&outer_src) }.is_none() {
        return drop(VNI_UNDERLAY, Counter::DropUnknownVtep, frame_len);
    }
    if vxlan.flags & VXLAN_FLAG_I == 0 {
        return drop(VNI_UNDERLAY, Counter::DropMalformed, frame_len);
    }
    let vni = vxlan.vni();
    if unsafe { NETWORKS.get(&vni) }.is_none() {
        return drop(VNI_UNDERLAY, Counter::DropUnknownVni, frame_len);
    }

    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(inner_eth) = ptr_at::<EthHdr>(data, data_end, inner_offset) else {
        return drop(vni, Counter::DropMalformed, frame_len);
    };
    let inner_eth = unsafe { &mut *inner_eth };
    if inner_eth.ether_type != ETH_P_IP.to_be() {
        return drop(vni, Counter::DropMalformed, frame_len);
    }
    let Some(inner_ip) = ptr_at::<Ipv4Hdr>(data, data_end, inner_offset + ETH_HLEN) else {
        return drop(vni, Counter::DropMalformed, frame_len);
    };
    let key = EndpointKey {
        vni,
        ip: unsafe { (*inner_ip).daddr },
    };
    let endpoint = match unsafe { ENDPOINTS.get(&key) } {
        Some(ep) if ep.is_local() => *ep,
        _ => return drop(vni, Counter::DropNoEndpoint, frame_len),
    };
    // The sender learned this MAC from our ARP answer; a foreign VTEP (e.g. a Linux vxlan
    // device with static entries) might not have, so deliver to the real one.
    inner_eth.dst = endpoint.mac;

    // SAFETY: the helper validates the new head itself; pointers are not reused after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, inner_offset as i32) } != 0 {
        return drop(vni, Counter::DropInternal, frame_len);
    }
    count(vni, Counter::Decapsulated, frame_len - inner_offset as u64);
    // SAFETY: plain helper call.
    unsafe { aya_ebpf::helpers::bpf_redirect(endpoint.ifindex, 0) as u32 }
}

#[inline(always)]
fn pass_other(frame_len: u64) -> u32 {
    count(VNI_UNDERLAY, Counter::UnderlayOther, frame_len);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop(vni: u32, reason: Counter, frame_len: u64) -> u32 {
    count(vni, reason, frame_len);
    crate::counters::log_drop("underlay", vni, reason, frame_len);
    xdp_action::XDP_DROP
}
