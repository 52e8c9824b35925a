//! The VXLAN encapsulation path (RFC 7348): a container packet for a remote endpoint gets
//! outer Ethernet/IPv4/UDP/VXLAN headers and leaves through the underlay towards the
//! endpoint's node.
//!
//! The room is made with `bpf_skb_adjust_room` and the ENCAP flags, which mark the skb
//! as UDP-tunnelled: GSO packets (bulk TCP) stay GSO and are segmented by the kernel
//! with correct outer headers per segment, so encapsulation costs one pass per 64 KiB.
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::{
    proto::{
        ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, IPV4_DEFAULT_TTL, IPV4_FLAG_DF,
        IPV4_HLEN_MIN, IPV4_IHL_MIN, IPV4_VERSION, UDP_HLEN, VXLAN_FLAG_I, VXLAN_HLEN,
        VXLAN_SRC_PORT_MIN, VXLAN_SRC_PORT_RANGE,
    },
    tunnel_mtu, Counter, EndpointValue, LocalIface, NetworkInfo, NextHop, UnderlayConfig,
    VXLAN_OVERHEAD,
};

use crate::{
    counters::count,
    flow_hash::flow_hash,
    headers::{EthHdr, Ipv4Hdr, TcpHdrPrefix, UdpHdr, VxlanHdr},
    icmp,
    maps::{underlay_config, vxlan_port_be, NEXTHOPS},
    packet::{fold_checksum, ipv4_header_sum, ptr_at},
    verdict::tc::drop,
};

const AF_INET: u8 = 2;
/// Bytes inserted after the original Ethernet header: outer IPv4 + UDP + VXLAN + the
/// inner Ethernet header (the original one becomes the outer).
const ENCAP_ROOM: usize = IPV4_HLEN_MIN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const OUTER_IP_OFFSET: usize = ETH_HLEN;
const OUTER_UDP_OFFSET: usize = OUTER_IP_OFFSET + IPV4_HLEN_MIN;
const VXLAN_OFFSET: usize = OUTER_UDP_OFFSET + UDP_HLEN;
const INNER_ETH_OFFSET: usize = VXLAN_OFFSET + VXLAN_HLEN;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header length sits in the top byte.
const ENCAP_L2_LEN_SHIFT: u64 = 56;
/// FIXED_GSO keeps a GSO skb's segment size, which counts inner payload only: without
/// it the kernel takes the outer headers' length off it, and every wire frame of a
/// segmented packet would carry 50 bytes less than the underlay takes. The size fits:
/// [`inner_segment_len`] is checked against the tunnel's MTU before.
const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | (ETH_HLEN as u64) << ENCAP_L2_LEN_SHIFT;

const _: () = assert!(ENCAP_ROOM as u32 == VXLAN_OVERHEAD);

#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    iface: &LocalIface,
    network: &NetworkInfo,
    endpoint: &EndpointValue,
    inner_ip: &Ipv4Hdr,
    len: u64,
) -> i32 {
    let slot = network.slot;
    let Some(underlay) = underlay_config().copied() else {
        return drop(slot, Counter::DropInternal, len);
    };
    if underlay.vtep == 0 {
        return drop(slot, Counter::DropInternal, len);
    }
    let Some(segment_len) = inner_segment_len(ctx, inner_ip) else {
        return drop(slot, Counter::DropMalformed, len);
    };
    // The network's MTU is the contract with every container on it (a receiver's
    // interface has that MTU); this node's underlay may carry less.
    let mtu = tunnel_mtu(network.mtu, underlay.mtu);
    if segment_len > mtu {
        if inner_ip.dont_fragment() {
            return icmp::send_frag_needed(ctx, iface, network, inner_ip, mtu, len);
        }
        return drop(slot, Counter::DropMtuExceeded, len);
    }

    // ECMP entropy for the underlay, stable per flow so a flow's packets stay in order;
    // taken before the headers change.
    let src_port = VXLAN_SRC_PORT_MIN + (flow_hash(ctx, inner_ip) % VXLAN_SRC_PORT_RANGE) as u16;

    if ctx
        .adjust_room(ENCAP_ROOM as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .is_err()
    {
        return drop(slot, Counter::DropInternal, len);
    }
    let new_len = len + ENCAP_ROOM as u64;
    let outer = OuterHeaders {
        underlay: &underlay,
        iface,
        endpoint,
        vni: iface.vni,
        tos: inner_ip.tos,
        src_port,
        frame_len: new_len,
    };
    if write_headers(ctx, &outer).is_none() {
        return drop(slot, Counter::DropInternal, len);
    }
    count(slot, Counter::Encapsulated, len);
    // SAFETY: map values are plain data owned by the map.
    match unsafe { NEXTHOPS.get(&endpoint.vtep) } {
        Some(next_hop) => send_to_next_hop(ctx, next_hop, slot, len),
        None => send_to_vtep(ctx, &underlay, endpoint.vtep, slot, len),
    }
}

/// Length of the largest IPv4 packet this skb will become on the wire: itself, or one
/// segment of it when it is a GSO packet.
#[inline(always)]
fn inner_segment_len(ctx: &TcContext, inner_ip: &Ipv4Hdr) -> Option<u32> {
    // SAFETY: the context pointer is valid for the whole program run.
    let skb = unsafe { &*ctx.skb.skb };
    let ip_len = skb.len.checked_sub(ETH_HLEN as u32)?;
    if skb.gso_size == 0 {
        return Some(ip_len);
    }
    let ip_hlen = inner_ip.header_len();
    let l4_hlen = match inner_ip.protocol {
        IPPROTO_TCP => {
            let tcp = ptr_at::<TcpHdrPrefix>(ctx.data(), ctx.data_end(), ETH_HLEN + ip_hlen)?;
            // SAFETY: bounds-checked by `ptr_at`.
            unsafe { (*tcp).header_len() }
        }
        IPPROTO_UDP => UDP_HLEN,
        _ => 0,
    };
    Some((ip_hlen + l4_hlen) as u32 + skb.gso_size)
}

/// What the outer headers are made of.
struct OuterHeaders<'a> {
    underlay: &'a UnderlayConfig,
    iface: &'a LocalIface,
    endpoint: &'a EndpointValue,
    vni: u32,
    tos: u8,
    src_port: u16,
    /// The frame's length once encapsulated.
    frame_len: u64,
}

#[inline(always)]
fn write_headers(ctx: &TcContext, outer: &OuterHeaders) -> Option<()> {
    let OuterHeaders {
        underlay,
        iface,
        endpoint,
        vni,
        tos,
        src_port,
        frame_len,
    } = *outer;
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let outer_eth = ptr_at::<EthHdr>(data, data_end, 0)?;
    let outer_ip = ptr_at::<Ipv4Hdr>(data, data_end, OUTER_IP_OFFSET)?;
    let udp = ptr_at::<UdpHdr>(data, data_end, OUTER_UDP_OFFSET)?;
    let vxlan = ptr_at::<VxlanHdr>(data, data_end, VXLAN_OFFSET)?;
    let inner_eth = ptr_at::<EthHdr>(data, data_end, INNER_ETH_OFFSET)?;

    // Outer IPv4 and UDP lengths; for a GSO packet the kernel rewrites them per segment,
    // so a saturated value here is harmless.
    let ip_total = saturate_u16(frame_len - ETH_HLEN as u64);
    let udp_len = saturate_u16(frame_len - (ETH_HLEN + IPV4_HLEN_MIN) as u64);

    // SAFETY: every pointer was bounds-checked above; the regions do not overlap.
    unsafe {
        *inner_eth = EthHdr {
            dst: endpoint.mac,
            src: iface.mac,
            ether_type: ETH_P_IP.to_be(),
        };
        let mut vx = VxlanHdr {
            flags: VXLAN_FLAG_I,
            reserved1: [0; 3],
            vni: [0; 3],
            reserved2: 0,
        };
        vx.set_vni(vni);
        *vxlan = vx;
        *udp = UdpHdr {
            source: src_port.to_be(),
            // The cluster's port, read per packet: a change needs no reload.
            dest: vxlan_port_be(),
            len: udp_len.to_be(),
            // Zero: no outer UDP checksum (allowed for IPv4 by RFC 7348); the inner
            // packet carries its own.
            check: 0,
        };
        let mut ip = Ipv4Hdr {
            version_ihl: IPV4_VERSION << 4 | IPV4_IHL_MIN,
            tos,
            tot_len: ip_total.to_be(),
            id: 0,
            frag_off: IPV4_FLAG_DF.to_be(),
            ttl: IPV4_DEFAULT_TTL,
            protocol: IPPROTO_UDP,
            check: 0,
            saddr: underlay.vtep,
            daddr: endpoint.vtep,
        };
        ip.check = fold_checksum(ipv4_header_sum(&ip));
        *outer_ip = ip;
        (*outer_eth).ether_type = ETH_P_IP.to_be();
    }
    Some(())
}

/// Sends the encapsulated packet through the next hop the agent cached for its VTEP.
#[inline(always)]
fn send_to_next_hop(ctx: &TcContext, next_hop: &NextHop, slot: u32, len: u64) -> i32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return drop(slot, Counter::DropInternal, len);
    };
    // SAFETY: bounds-checked above.
    unsafe {
        (*eth).dst = next_hop.dst_mac;
        (*eth).src = next_hop.src_mac;
        bpf_redirect(next_hop.ifindex, 0) as i32
    }
}

/// The fallback for a VTEP without a cached next hop (new, or its neighbour entry just
/// went away): sends the encapsulated packet to `vtep` with the right next-hop MAC: from the FIB and
/// neighbour table when both know it, otherwise through `bpf_redirect_neigh`, which
/// resolves the neighbour (ARP) in the kernel and queues the packet meanwhile.
#[inline(always)]
fn send_to_vtep(ctx: &TcContext, underlay: &UnderlayConfig, vtep: u32, slot: u32, len: u64) -> i32 {
    // SAFETY: all-zero is a valid `bpf_fib_lookup`.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    params.ifindex = underlay.ifindex;
    params.__bindgen_anon_3.ipv4_src = underlay.vtep;
    params.__bindgen_anon_4.ipv4_dst = vtep;
    // tot_len stays 0: the kernel then checks the skb against the egress MTU itself,
    // which understands GSO.
    // SAFETY: `params` is a valid, correctly sized lookup structure.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
            return drop(slot, Counter::DropInternal, len);
        };
        // SAFETY: bounds-checked above.
        unsafe {
            (*eth).dst = params.dmac;
            (*eth).src = params.smac;
            return bpf_redirect(params.ifindex, 0) as i32;
        }
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: a null parameter block asks the kernel to do the route lookup itself.
        return unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 };
    }
    drop(slot, Counter::DropInternal, len)
}

#[inline(always)]
fn saturate_u16(value: u64) -> u16 {
    if value > u16::MAX as u64 {
        u16::MAX
    } else {
        value as u16
    }
}
