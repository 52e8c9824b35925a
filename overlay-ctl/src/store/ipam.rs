//! IPAM as pure functions: validating network definitions (subnet, gateway, VNI, MTU,
//! names) and choosing addresses. The cluster-wide bookkeeping that makes allocations
//! exclusive lives in [`crate::store`]; nothing here talks to anything.
use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use overlay_common::{VNI_MAX, VXLAN_OVERHEAD};

/// The smallest usable subnet: a /30 (network, broadcast, gateway and one address).
pub const MAX_PREFIX: u8 = 30;
/// Default overlay MTU: a 1500-byte underlay minus the VXLAN encapsulation.
pub const DEFAULT_MTU: u32 = 1500 - VXLAN_OVERHEAD;
/// Accepted overlay MTUs: IPv4's 576-byte minimum datagram up to a 9000-byte jumbo frame.
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9000;
/// Valid VXLAN network identifiers.
pub const MIN_VNI: u32 = 1;
pub const MAX_VNI: u32 = VNI_MAX;
/// Longest network name.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid subnet {0:?}: expected an IPv4 CIDR like 10.100.0.0/24")]
    InvalidCidr(String),
    #[error("{given} has host bits set; did you mean {suggested}?")]
    HostBitsSet {
        given: String,
        suggested: Ipv4Network,
    },
    #[error("subnet {0} is too small: at least 4 addresses (a /30) are needed")]
    SubnetTooSmall(Ipv4Network),
    #[error("gateway {gateway} is outside subnet {subnet}")]
    GatewayOutside {
        gateway: Ipv4Addr,
        subnet: Ipv4Network,
    },
    #[error("gateway {gateway} is the {what} address of {subnet}")]
    GatewayReserved {
        gateway: Ipv4Addr,
        subnet: Ipv4Network,
        what: &'static str,
    },
    #[error("VNI {0} is out of range {MIN_VNI}..={MAX_VNI}")]
    VniOutOfRange(u64),
    #[error("MTU {0} is out of range {MIN_MTU}..={MAX_MTU}")]
    MtuOutOfRange(u32),
    #[error("invalid network name {0:?}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("address {ip} is outside subnet {subnet}")]
    AddressOutside { ip: Ipv4Addr, subnet: Ipv4Network },
    #[error("address {ip} is the {what} address of {subnet} and cannot be allocated")]
    AddressReserved {
        ip: Ipv4Addr,
        subnet: Ipv4Network,
        what: &'static str,
    },
}

/// Parses and validates a subnet given as `a.b.c.d/len`: it must be IPv4, have no host
/// bits set and hold at least 4 addresses.
pub fn parse_subnet(cidr: &str) -> Result<Ipv4Network, IpamError> {
    let cidr = cidr.trim();
    let invalid = || IpamError::InvalidCidr(cidr.to_string());
    let (addr, len) = cidr.split_once('/').ok_or_else(invalid)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || len.len() > 2 {
        return Err(invalid());
    }
    let len: u8 = len.parse().map_err(|_| invalid())?;
    let net = Ipv4Network::new(addr, len).map_err(|_| invalid())?;
    let network = net.network();
    let canonical = Ipv4Network::new(network, len).map_err(|_| invalid())?;
    if network != addr {
        return Err(IpamError::HostBitsSet {
            given: cidr.to_string(),
            suggested: canonical,
        });
    }
    if len > MAX_PREFIX {
        return Err(IpamError::SubnetTooSmall(canonical));
    }
    Ok(canonical)
}

/// The conventional gateway: the first address after the network address.
pub fn default_gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

/// What a reserved address in `subnet` is, if `ip` is one (`network` or `broadcast`).
fn reserved_kind(subnet: Ipv4Network, ip: Ipv4Addr) -> Option<&'static str> {
    if ip == subnet.network() {
        Some("network")
    } else if ip == subnet.broadcast() {
        Some("broadcast")
    } else {
        None
    }
}

/// Checks a gateway: inside the subnet and neither its network nor broadcast address.
pub fn validate_gateway(subnet: Ipv4Network, gateway: Ipv4Addr) -> Result<(), IpamError> {
    if !subnet.contains(gateway) {
        return Err(IpamError::GatewayOutside { gateway, subnet });
    }
    if let Some(what) = reserved_kind(subnet, gateway) {
        return Err(IpamError::GatewayReserved {
            gateway,
            subnet,
            what,
        });
    }
    Ok(())
}

pub fn validate_vni(vni: u64) -> Result<u32, IpamError> {
    if (MIN_VNI as u64..=MAX_VNI as u64).contains(&vni) {
        Ok(vni as u32)
    } else {
        Err(IpamError::VniOutOfRange(vni))
    }
}

pub fn validate_mtu(mtu: u32) -> Result<(), IpamError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(IpamError::MtuOutOfRange(mtu))
    }
}

/// Network names become KV key segments and interface-name parts: 1-64 characters of
/// `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), IpamError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IpamError::InvalidName(name.to_string()))
    }
}

/// Checks that `ip` can be handed to an endpoint: inside the subnet and not its
/// network, broadcast or gateway address. (Whether it is free is the store's business.)
pub fn validate_address(
    subnet: Ipv4Network,
    gateway: Ipv4Addr,
    ip: Ipv4Addr,
) -> Result<(), IpamError> {
    if !subnet.contains(ip) {
        return Err(IpamError::AddressOutside { ip, subnet });
    }
    let what = if ip == gateway {
        Some("gateway")
    } else {
        reserved_kind(subnet, ip)
    };
    match what {
        Some(what) => Err(IpamError::AddressReserved { ip, subnet, what }),
        None => Ok(()),
    }
}

/// The number of addresses that can be handed to endpoints.
pub fn usable_addresses(subnet: Ipv4Network, gateway: Ipv4Addr) -> u64 {
    let size = 1u64 << (32 - u32::from(subnet.prefix()));
    let reserved =
        2 + u64::from(subnet.contains(gateway) && reserved_kind(subnet, gateway).is_none());
    size.saturating_sub(reserved)
}

/// The lowest address of `subnet` that is not the network, broadcast or gateway address
/// and not in `allocated`; `None` when the subnet is full.
pub fn next_free(
    subnet: Ipv4Network,
    gateway: Ipv4Addr,
    allocated: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let first = u32::from(subnet.network()).checked_add(1)?;
    let last = u32::from(subnet.broadcast()).checked_sub(1)?;
    // Walk the allocated addresses in order alongside the candidates, so the cost is
    // proportional to the number of allocations, not the subnet size.
    let mut taken = allocated
        .range(Ipv4Addr::from(first)..=Ipv4Addr::from(last))
        .map(|ip| u32::from(*ip))
        .peekable();
    let gateway = u32::from(gateway);
    let mut candidate = first;
    loop {
        if candidate > last {
            return None;
        }
        while taken.peek().is_some_and(|t| *t < candidate) {
            taken.next();
        }
        if candidate == gateway || taken.peek() == Some(&candidate) {
            candidate = candidate.checked_add(1)?;
            continue;
        }
        return Some(Ipv4Addr::from(candidate));
    }
}

/// The host-side veth name of an endpoint: stable, unique per (network, id), <= 15 bytes.
pub fn host_ifname(network: &str, id: &str) -> String {
    // FNV-1a: no dependency, and stable across versions (the name is in the KV store).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in network.bytes().chain([b'/']).chain(id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ov{:010x}", hash & 0xff_ffff_ffff)
}

/// The `/run/netns` name `run` gives a container's namespace (recorded in its endpoint).
pub fn run_netns_name(network: &str, id: &str) -> String {
    format!("ovl-{network}-{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_parse_and_validate() {
        assert_eq!(parse_subnet("10.100.0.0/24").unwrap(), net("10.100.0.0/24"));
        assert_eq!(parse_subnet(" 10.1.0.0/16 ").unwrap(), net("10.1.0.0/16"));
        assert_eq!(parse_subnet("10.0.0.0/30").unwrap(), net("10.0.0.0/30"));
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0/24",
            "fd00::/64",
            "x/24",
            "10.0.0.0/+8",
            "10.0.0.0/024",
        ] {
            assert!(
                matches!(parse_subnet(bad), Err(IpamError::InvalidCidr(_))),
                "{bad:?} should be an invalid CIDR"
            );
        }
        let err = parse_subnet("10.100.0.5/24").unwrap_err();
        assert_eq!(
            err.to_string(),
            "10.100.0.5/24 has host bits set; did you mean 10.100.0.0/24?"
        );
        assert_eq!(
            parse_subnet("10.0.0.0/31").unwrap_err(),
            IpamError::SubnetTooSmall(net("10.0.0.0/31"))
        );
        assert!(matches!(
            parse_subnet("10.0.0.0/32"),
            Err(IpamError::SubnetTooSmall(_))
        ));
    }

    #[test]
    fn gateways() {
        let s = net("10.100.0.0/24");
        assert_eq!(default_gateway(s), ip("10.100.0.1"));
        assert!(validate_gateway(s, ip("10.100.0.1")).is_ok());
        assert!(validate_gateway(s, ip("10.100.0.254")).is_ok());
        assert!(matches!(
            validate_gateway(s, ip("10.100.1.1")),
            Err(IpamError::GatewayOutside { .. })
        ));
        assert!(matches!(
            validate_gateway(s, ip("10.100.0.0")),
            Err(IpamError::GatewayReserved {
                what: "network",
                ..
            })
        ));
        assert!(matches!(
            validate_gateway(s, ip("10.100.0.255")),
            Err(IpamError::GatewayReserved {
                what: "broadcast",
                ..
            })
        ));
    }

    #[test]
    fn vni_mtu_and_names() {
        assert!(validate_vni(0).is_err());
        assert_eq!(validate_vni(1), Ok(1));
        assert_eq!(validate_vni(16_777_215), Ok(16_777_215));
        assert!(validate_vni(16_777_216).is_err());
        assert!(validate_mtu(DEFAULT_MTU).is_ok());
        assert_eq!(DEFAULT_MTU, 1450);
        assert!(validate_mtu(575).is_err());
        assert!(validate_mtu(9001).is_err());
        for good in ["default", "a", "web-1", "db_2.prod"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in ["", "-x", ".x", "a/b", "a b", "ü", long.as_str()] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn next_free_skips_reserved_and_allocated() {
        let s = net("10.0.0.0/29"); // .0 network, .1 gateway, .2-.6 usable, .7 broadcast
        let gw = ip("10.0.0.1");
        let mut taken = BTreeSet::new();
        assert_eq!(usable_addresses(s, gw), 5);
        let mut got = Vec::new();
        while let Some(a) = next_free(s, gw, &taken) {
            taken.insert(a);
            got.push(a);
        }
        let want: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(got, want);
        // A hole is reused first.
        taken.remove(&ip("10.0.0.4"));
        assert_eq!(next_free(s, gw, &taken), Some(ip("10.0.0.4")));
    }

    #[test]
    fn next_free_with_gateway_elsewhere() {
        let s = net("10.0.0.0/30");
        let gw = ip("10.0.0.2");
        let mut taken = BTreeSet::new();
        assert_eq!(next_free(s, gw, &taken), Some(ip("10.0.0.1")));
        taken.insert(ip("10.0.0.1"));
        assert_eq!(next_free(s, gw, &taken), None);
        // Allocations outside the subnet are ignored.
        let taken: BTreeSet<_> = [ip("10.0.1.1"), ip("9.0.0.1")].into();
        assert_eq!(next_free(s, gw, &taken), Some(ip("10.0.0.1")));
    }

    #[test]
    fn next_free_in_large_subnet_is_fast() {
        let s = net("10.0.0.0/8");
        let gw = default_gateway(s);
        let taken: BTreeSet<Ipv4Addr> = (2..100_002u32)
            .map(|i| Ipv4Addr::from(u32::from(s.network()) + i))
            .collect();
        assert_eq!(
            next_free(s, gw, &taken),
            Some(Ipv4Addr::from(u32::from(s.network()) + 100_002))
        );
        assert_eq!(usable_addresses(s, gw), (1 << 24) - 3);
    }

    #[test]
    fn requested_addresses() {
        let s = net("10.100.0.0/24");
        let gw = ip("10.100.0.1");
        assert!(validate_address(s, gw, ip("10.100.0.7")).is_ok());
        assert!(matches!(
            validate_address(s, gw, ip("10.100.0.1")),
            Err(IpamError::AddressReserved {
                what: "gateway",
                ..
            })
        ));
        assert!(matches!(
            validate_address(s, gw, ip("10.100.0.0")),
            Err(IpamError::AddressReserved {
                what: "network",
                ..
            })
        ));
        assert!(matches!(
            validate_address(s, gw, ip("10.100.0.255")),
            Err(IpamError::AddressReserved {
                what: "broadcast",
                ..
            })
        ));
        assert!(matches!(
            validate_address(s, gw, ip("10.101.0.7")),
            Err(IpamError::AddressOutside { .. })
        ));
    }
}
