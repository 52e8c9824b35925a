//! ARP answers for the gateway and for every endpoint of the sender's network, so no
//! ARP broadcast ever crosses the overlay.
use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use overlay_common::{
    proto::{ARP_HTYPE_ETHERNET, ARP_OP_REPLY, ARP_OP_REQUEST, ETH_ALEN, ETH_HLEN, ETH_P_IP},
    Counter, EndpointKey, LocalIface, NetworkInfo,
};

use crate::{
    counters::count,
    headers::{ArpHdr, EthHdr},
    maps::ENDPOINTS,
    packet::ptr_at,
    verdict::tc::{drop, pass_to_host},
};

const IPV4_ALEN: u8 = 4;

#[inline(always)]
pub fn handle(ctx: &TcContext, iface: &LocalIface, network: &NetworkInfo, len: u64) -> i32 {
    let slot = network.slot;
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(arp)) = (
        ptr_at::<EthHdr>(data, data_end, 0),
        ptr_at::<ArpHdr>(data, data_end, ETH_HLEN),
    ) else {
        return drop(slot, Counter::DropMalformed, len);
    };
    // SAFETY: both headers were bounds-checked above.
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if arp.htype != ARP_HTYPE_ETHERNET.to_be()
        || arp.ptype != ETH_P_IP.to_be()
        || arp.hlen != ETH_ALEN as u8
        || arp.plen != IPV4_ALEN
    {
        return drop(slot, Counter::DropMalformed, len);
    }
    if arp.op == ARP_OP_REPLY.to_be() {
        // The container answering the host's own ARP (e.g. for gateway replies).
        return pass_to_host(slot, len);
    }
    if arp.op != ARP_OP_REQUEST.to_be() {
        return drop(slot, Counter::DropMalformed, len);
    }
    let sender = u32::from_ne_bytes(arp.spa);
    let target = u32::from_ne_bytes(arp.tpa);
    if arp.sha != iface.mac || (sender != iface.ip && sender != 0) {
        return drop(slot, Counter::DropSpoofed, len);
    }
    if target == iface.ip {
        // Gratuitous ARP or duplicate-address probe for its own address: nobody else
        // may claim it, so there is nothing to answer.
        return pass_to_host(slot, len);
    }
    let answer = if target == network.gateway {
        iface.host_mac
    } else {
        match unsafe {
            ENDPOINTS.get(&EndpointKey {
                vni: iface.vni,
                ip: target,
            })
        } {
            Some(ep) => ep.mac,
            None => return drop(slot, Counter::DropNoEndpoint, len),
        }
    };

    eth.dst = eth.src;
    eth.src = answer;
    arp.op = ARP_OP_REPLY.to_be();
    arp.tha = arp.sha;
    arp.tpa = arp.spa;
    arp.sha = answer;
    arp.spa = target.to_ne_bytes();
    count(slot, Counter::ArpReply, len);
    // Back out of the same veth, to the asking container.
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}
