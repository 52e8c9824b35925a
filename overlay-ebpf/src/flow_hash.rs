//! The inner flow's hash, which picks the outer UDP source port (RFC 7348 §5: entropy
//! for the underlay's ECMP and RSS, the same for every packet of a flow).
//!
//! Socket traffic arrives with a hash the stack already set (`skb->hash`, e.g. TCP's
//! `sk_txhash`): it is used as is. Only a packet without one (forwarded, injected, or a
//! test run) pays for a hash, and then a cheap one over the inner addresses, protocol and
//! ports rather than `bpf_get_hash_recalc`, whose flow dissector costs about 120 ns.
use aya_ebpf::programs::TcContext;
use overlay_common::proto::{ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP};

use crate::{headers::Ipv4Hdr, packet::ptr_at};

/// Multipliers of MurmurHash3's 32-bit finalizer: every input bit reaches every output
/// bit, which a plain XOR of the fields would not give the port's low bits.
const FMIX_MULTIPLIER_1: u32 = 0x85eb_ca6b;
const FMIX_MULTIPLIER_2: u32 = 0xc2b2_ae35;

/// Source and destination port, as one word (both in network order).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    words: u32,
}

#[inline(always)]
pub fn flow_hash(ctx: &TcContext, inner_ip: &Ipv4Hdr) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let skb_hash = unsafe { (*ctx.skb.skb).hash };
    if skb_hash != 0 {
        return skb_hash;
    }
    inner_tuple_hash(ctx, inner_ip)
}

/// Hash of the inner 5-tuple (3-tuple for other protocols and for fragments, whose
/// later pieces carry no ports).
#[inline(always)]
fn inner_tuple_hash(ctx: &TcContext, ip: &Ipv4Hdr) -> u32 {
    let mut h = ip.saddr ^ ip.daddr.rotate_left(16) ^ ip.protocol as u32;
    let carries_ports =
        (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) && !ip.is_fragment();
    if carries_ports {
        let offset = ETH_HLEN + ip.header_len();
        if let Some(ports) = ptr_at::<Ports>(ctx.data(), ctx.data_end(), offset) {
            // SAFETY: bounds-checked by `ptr_at`.
            h ^= unsafe { (*ports).words };
        }
    }
    finalize(h)
}

#[inline(always)]
fn finalize(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX_MULTIPLIER_1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX_MULTIPLIER_2);
    h ^ (h >> 16)
}
