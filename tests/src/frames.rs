//! Hand-built frames and VXLAN payloads, with the same protocol constants the kernel
//! programs check.
use std::net::Ipv4Addr;

use overlay_common::proto::*;

/// An 8-byte VXLAN header (RFC 7348) with the given flags and VNI.
pub fn vxlan_header(flags: u8, vni: u32) -> [u8; VXLAN_HLEN] {
    let v = vni.to_be_bytes();
    [flags, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// Ethernet header.
/// (MACs as octets or as `MacAddr`.)
pub fn ethernet(dst: impl Into<[u8; 6]>, src: impl Into<[u8; 6]>, ether_type: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN);
    f.extend_from_slice(&dst.into());
    f.extend_from_slice(&src.into());
    f.extend_from_slice(&ether_type.to_be_bytes());
    f
}

/// Internet checksum of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options) with a valid checksum.
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    flags_frag: u16,
) -> Vec<u8> {
    let total = (IPV4_HLEN_MIN + payload_len) as u16;
    let mut h = vec![
        IPV4_VERSION << 4 | IPV4_IHL_MIN,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        (flags_frag >> 8) as u8,
        flags_frag as u8,
        IPV4_DEFAULT_TTL,
        protocol,
        0,
        0,
    ];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

/// A UDP header with a zero checksum.
pub fn udp_header(src_port: u16, dst_port: u16, payload_len: usize) -> Vec<u8> {
    let len = (UDP_HLEN + payload_len) as u16;
    let mut h = Vec::with_capacity(UDP_HLEN);
    h.extend_from_slice(&src_port.to_be_bytes());
    h.extend_from_slice(&dst_port.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h
}

/// Ethernet + IPv4 (DF) + UDP + payload.
#[allow(clippy::too_many_arguments)]
pub fn udp_frame(
    dst_mac: impl Into<[u8; 6]>,
    src_mac: impl Into<[u8; 6]>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = ethernet(dst_mac, src_mac, ETH_P_IP);
    f.extend(ipv4_header(
        src,
        dst,
        IPPROTO_UDP,
        UDP_HLEN + payload.len(),
        IPV4_FLAG_DF,
    ));
    f.extend(udp_header(src_port, dst_port, payload.len()));
    f.extend_from_slice(payload);
    f
}

/// A full inner frame: Ethernet + IPv4 + UDP + payload.
pub fn inner_udp_frame(
    dst_mac: impl Into<[u8; 6]>,
    src_mac: impl Into<[u8; 6]>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: &[u8],
) -> Vec<u8> {
    udp_frame(dst_mac, src_mac, src, dst, 40000, 7, payload)
}

/// The UDP payload of a VXLAN packet: VXLAN header + inner frame.
pub fn vxlan_payload(flags: u8, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = vxlan_header(flags, vni).to_vec();
    p.extend_from_slice(inner);
    p
}

/// A deterministic xorshift64 generator: reproducible "random" frames and data.
pub struct Xorshift(u64);

impl Xorshift {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
