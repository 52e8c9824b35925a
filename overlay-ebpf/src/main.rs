//! Kernel side of the overlay data plane.
//!
//! - [`underlay`]: the underlay's receive path, at XDP (NICs) or TC ingress (veth and
//!   other devices whose XDP path loses the skb's checksum and GSO state). Classifies
//!   frames, validates VXLAN and decapsulates it straight into the destination container.
//! - [`container`]: TC ingress on every host-side container veth (the container's egress).
//!   Anti-spoofing, ARP answers ([`arp`]), same-host switching, and VXLAN encapsulation
//!   ([`encap`]) with the MTU check and ICMP "fragmentation needed" ([`icmp`]).
//!
//! All state lives in the maps of [`maps`]; every verdict is counted ([`counters`]) and
//! comes from [`verdict`].
#![no_std]
#![no_main]

mod arp;
mod container;
mod counters;
mod encap;
mod flow_hash;
mod headers;
mod icmp;
mod maps;
mod packet;
mod underlay;
mod verdict;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn overlay_underlay(ctx: XdpContext) -> u32 {
    underlay::handle_xdp(&ctx)
}

#[classifier]
pub fn overlay_underlay_tc(ctx: TcContext) -> i32 {
    underlay::handle_tc(&ctx)
}

#[classifier]
pub fn overlay_container(ctx: TcContext) -> i32 {
    container::handle(&ctx)
}

/// Attached to container-side veths so that `XDP_REDIRECT` into them has a NAPI context.
#[xdp]
pub fn overlay_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
