//! ICMP "fragmentation needed" (RFC 792 type 3 code 4, with the next-hop MTU of
//! RFC 1191) for a DF packet that would not fit the underlay once encapsulated. The
//! container's stack lowers its path MTU and retransmits smaller.
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use overlay_common::{
    proto::{
        ETH_HLEN, ETH_P_IP, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HLEN, ICMP_QUOTED_PAYLOAD,
        IPPROTO_ICMP, IPV4_DEFAULT_TTL, IPV4_HLEN_MIN, IPV4_IHL_MIN, IPV4_VERSION,
    },
    Counter, LocalIface, NetworkInfo,
};

use crate::{
    counters::count,
    headers::{EthHdr, IcmpHdr, Ipv4Hdr},
    packet::{fold_checksum, ipv4_header_sum, ptr_at},
    verdict::tc::drop,
};

const ICMP_OFFSET: usize = ETH_HLEN + IPV4_HLEN_MIN;
/// Longest ICMP message built here: header + the longest IPv4 header (60) + 8 bytes.
const ICMP_MAX_WORDS: usize = (ICMP_HLEN + 60 + ICMP_QUOTED_PAYLOAD) / 2;

#[inline(always)]
pub fn send_frag_needed(
    ctx: &TcContext,
    iface: &LocalIface,
    network: &NetworkInfo,
    offending: &Ipv4Hdr,
    mtu: u32,
    len: u64,
) -> i32 {
    let slot = network.slot;
    let quoted = offending.header_len() + ICMP_QUOTED_PAYLOAD;
    // Keep only the quoted part of the offending packet, then make room in front of it
    // for the new IPv4 and ICMP headers.
    // SAFETY: plain helper calls on the program's own skb.
    let trimmed = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + quoted) as u32, 0) };
    if trimmed != 0
        || ctx
            .adjust_room((IPV4_HLEN_MIN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
            .is_err()
    {
        return drop(slot, Counter::DropInternal, len);
    }
    let icmp_len = ICMP_HLEN + quoted;
    if write_reply(ctx, iface, network.gateway, mtu, icmp_len).is_none() {
        return drop(slot, Counter::DropInternal, len);
    }
    count(slot, Counter::FragNeededSent, len);
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

#[inline(always)]
fn write_reply(
    ctx: &TcContext,
    iface: &LocalIface,
    gateway: u32,
    mtu: u32,
    icmp_len: usize,
) -> Option<()> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<EthHdr>(data, data_end, 0)?;
    let ip = ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN)?;
    let icmp = ptr_at::<IcmpHdr>(data, data_end, ICMP_OFFSET)?;
    // SAFETY: every pointer was bounds-checked above.
    unsafe {
        *eth = EthHdr {
            dst: iface.mac,
            src: iface.host_mac,
            ether_type: ETH_P_IP.to_be(),
        };
        let mut reply = Ipv4Hdr {
            version_ihl: IPV4_VERSION << 4 | IPV4_IHL_MIN,
            tos: 0,
            tot_len: ((IPV4_HLEN_MIN + icmp_len) as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: IPV4_DEFAULT_TTL,
            protocol: IPPROTO_ICMP,
            check: 0,
            saddr: gateway,
            daddr: iface.ip,
        };
        reply.check = fold_checksum(ipv4_header_sum(&reply));
        *ip = reply;
        *icmp = IcmpHdr {
            icmp_type: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            checksum: 0,
            unused: 0,
            next_hop_mtu: (mtu as u16).to_be(),
        };
        (*icmp).checksum = icmp_checksum(ctx, icmp_len);
    }
    Some(())
}

/// One's-complement checksum of the ICMP message (`icmp_len` is even: the quoted IPv4
/// header is a multiple of 4 bytes and the quoted payload is 8).
#[inline(always)]
fn icmp_checksum(ctx: &TcContext, icmp_len: usize) -> u16 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let mut sum = 0u32;
    let mut word = 0;
    while word < ICMP_MAX_WORDS {
        if word * 2 >= icmp_len {
            break;
        }
        match ptr_at::<u16>(data, data_end, ICMP_OFFSET + word * 2) {
            // SAFETY: bounds-checked by `ptr_at`.
            Some(p) => sum += unsafe { *p } as u32,
            None => break,
        }
        word += 1;
    }
    fold_checksum(sum)
}
