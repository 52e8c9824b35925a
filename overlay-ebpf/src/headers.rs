//! Wire headers. Multi-byte fields are in network byte order, as on the wire.
use overlay_common::proto::{
    ETH_ALEN, IPV4_FLAG_DF, IPV4_FLAG_MF, IPV4_FRAG_OFFSET_MASK, IPV4_IHL_UNIT,
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; ETH_ALEN],
    pub src: [u8; ETH_ALEN],
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

impl Ipv4Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    #[inline(always)]
    pub fn ihl(&self) -> u8 {
        self.version_ihl & 0x0f
    }

    #[inline(always)]
    pub fn header_len(&self) -> usize {
        self.ihl() as usize * IPV4_IHL_UNIT
    }

    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be(self.frag_off) & (IPV4_FLAG_MF | IPV4_FRAG_OFFSET_MASK) != 0
    }

    #[inline(always)]
    pub fn dont_fragment(&self) -> bool {
        u16::from_be(self.frag_off) & IPV4_FLAG_DF != 0
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

/// RFC 7348: flags(8) reserved(24) VNI(24) reserved(8).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved1: [u8; 3],
    pub vni: [u8; 3],
    pub reserved2: u8,
}

impl VxlanHdr {
    #[inline(always)]
    pub fn vni(&self) -> u32 {
        (self.vni[0] as u32) << 16 | (self.vni[1] as u32) << 8 | self.vni[2] as u32
    }

    #[inline(always)]
    pub fn set_vni(&mut self, vni: u32) {
        self.vni = [(vni >> 16) as u8, (vni >> 8) as u8, vni as u8];
    }
}

/// ARP for Ethernet/IPv4 (RFC 826); addresses as byte arrays because they sit unaligned.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ArpHdr {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op: u16,
    pub sha: [u8; ETH_ALEN],
    pub spa: [u8; 4],
    pub tha: [u8; ETH_ALEN],
    pub tpa: [u8; 4],
}

/// First 8 bytes of an ICMP message ("destination unreachable" layout).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub checksum: u16,
    pub unused: u16,
    pub next_hop_mtu: u16,
}

/// TCP header up to the data-offset byte (all the data plane reads).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdrPrefix {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub doff_reserved: u8,
    pub flags: u8,
}

impl TcpHdrPrefix {
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        (self.doff_reserved >> 4) as usize * 4
    }
}

const _: () = assert!(core::mem::size_of::<EthHdr>() == overlay_common::proto::ETH_HLEN);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == overlay_common::proto::IPV4_HLEN_MIN);
const _: () = assert!(core::mem::size_of::<UdpHdr>() == overlay_common::proto::UDP_HLEN);
const _: () = assert!(core::mem::size_of::<VxlanHdr>() == overlay_common::proto::VXLAN_HLEN);
const _: () = assert!(core::mem::size_of::<ArpHdr>() == overlay_common::proto::ARP_HLEN);
const _: () = assert!(core::mem::size_of::<IcmpHdr>() == overlay_common::proto::ICMP_HLEN);
