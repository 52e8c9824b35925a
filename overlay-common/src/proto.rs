//! Protocol constants of the headers the data plane parses and writes (Ethernet, ARP,
//! IPv4, ICMP, UDP, VXLAN per RFC 7348). Shared so that tests build frames with the same
//! numbers the kernel programs check.

pub const ETH_ALEN: usize = 6;
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

pub const ARP_HLEN: usize = 28;
pub const ARP_HTYPE_ETHERNET: u16 = 1;
pub const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;

pub const IPV4_VERSION: u8 = 4;
pub const IPV4_HLEN_MIN: usize = 20;
/// IHL is counted in 32-bit words.
pub const IPV4_IHL_MIN: u8 = 5;
pub const IPV4_IHL_UNIT: usize = 4;
pub const IPV4_FLAG_DF: u16 = 0x4000;
pub const IPV4_FLAG_MF: u16 = 0x2000;
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
pub const IPV4_DEFAULT_TTL: u8 = 64;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const ICMP_HLEN: usize = 8;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// Bytes of the offending datagram beyond its IP header quoted in an ICMP error (RFC 792).
pub const ICMP_QUOTED_PAYLOAD: usize = 8;

pub const UDP_HLEN: usize = 8;
/// IANA-assigned VXLAN port (RFC 7348 section 5): the cluster's port unless its config
/// names another (`ClusterConfig`), and so the programs' default.
pub const VXLAN_PORT: u16 = 4789;
/// The port Linux's `vxlan` driver uses when none is given (from before IANA's
/// assignment), as flannel and Cilium do.
pub const LINUX_VXLAN_PORT: u16 = 8472;
pub const VXLAN_HLEN: usize = 8;
/// The "I" flag: the VNI field is valid.
pub const VXLAN_FLAG_I: u8 = 0x08;
/// RFC 7348 recommends source ports from the dynamic range 49152-65535.
pub const VXLAN_SRC_PORT_MIN: u16 = 49152;
pub const VXLAN_SRC_PORT_RANGE: u32 = 16384;
