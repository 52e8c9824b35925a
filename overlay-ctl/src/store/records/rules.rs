//! The per-record rules: each record checked by the rules the CLI applies when it
//! writes one (names, CIDR, gateway, VNI range, MTU, address, MAC, VTEP, generated
//! interface and namespace names, a node's session).
use std::{net::Ipv4Addr, str::FromStr};

use overlay_common::MacAddr;

use super::{RecordKind, RejectReason, Rejection};
use crate::{
    store::backend::Record,
    store::{self, Endpoint, IpAllocation, Network, NodeInfo},
    store::{ipam, mtu},
};

/// A VTEP must be a unicast IPv4 address a packet can be sent to.
pub fn check_vtep(vtep: Ipv4Addr) -> Result<(), &'static str> {
    if vtep.is_unspecified() {
        Err("unspecified address")
    } else if vtep.is_loopback() {
        Err("loopback address")
    } else if vtep.is_multicast() {
        Err("multicast address")
    } else if vtep.is_broadcast() {
        Err("broadcast address")
    } else if u32::from(vtep) >> 28 == 0xf {
        Err("reserved (240.0.0.0/4) address")
    } else if vtep.octets()[0] == 0 {
        Err("address in 0.0.0.0/8")
    } else {
        Ok(())
    }
}

/// A MAC an endpoint can have: unicast, not all zero (that it is six bytes, its type
/// says).
pub fn check_mac(mac: MacAddr) -> Result<(), &'static str> {
    if !mac.is_unicast() {
        Err("multicast MAC")
    } else if mac.is_zero() {
        Err("all-zero MAC")
    } else {
        Ok(())
    }
}

/// An endpoint record that does not decode because of its `mac` text alone is a bad MAC,
/// not a malformed record (the reason labels a metric, and was `bad_mac` before the MAC
/// had a type of its own).
fn unreadable_mac(pair: &dyn Record) -> Option<Rejection> {
    #[derive(serde::Deserialize)]
    struct MacText {
        mac: String,
    }
    let text = serde_json::from_slice::<MacText>(pair.value()).ok()?.mac;
    let error = text.parse::<MacAddr>().err()?;
    Some(Rejection::new(
        pair.key(),
        RecordKind::Endpoint,
        RejectReason::BadMac,
        format!("{text:?}: {error}"),
    ))
}

/// The `config/vxlan-port` record, by the rule of `cluster set vxlan-port`.
pub fn parse_vxlan_port(prefix: &str, pair: &dyn Record) -> Result<u16, Rejection> {
    let kind = RecordKind::Config;
    if pair.key() != format!("{prefix}config/vxlan-port") {
        return Err(Rejection::new(
            pair.key(),
            kind,
            RejectReason::BadKey,
            "not the VXLAN port's key",
        ));
    }
    let port: u64 = decode(pair, kind)?;
    store::settings::check_vxlan_port(port)
        .map_err(|e| Rejection::new(pair.key(), kind, RejectReason::BadPort, e.to_string()))
}

/// A network record that does not decode because of its `egress` text alone has a bad
/// egress mode, not a malformed record (an operator's typo names the field).
fn unreadable_egress(pair: &dyn Record) -> Option<Rejection> {
    #[derive(serde::Deserialize)]
    struct EgressText {
        egress: serde_json::Value,
    }
    let text = serde_json::from_slice::<EgressText>(pair.value())
        .ok()?
        .egress;
    let error = serde_json::from_value::<store::EgressMode>(text.clone()).err()?;
    Some(Rejection::new(
        pair.key(),
        RecordKind::Network,
        RejectReason::BadEgress,
        format!("egress {text}: {error} (masquerade or none)"),
    ))
}

fn decode<T: serde::de::DeserializeOwned>(
    pair: &dyn Record,
    kind: RecordKind,
) -> Result<T, Rejection> {
    serde_json::from_slice(pair.value())
        .map_err(|e| Rejection::new(pair.key(), kind, RejectReason::Malformed, e.to_string()))
}

/// The part of `key` after `prefix` + `section` (e.g. `networks/`).
fn key_rest<'k>(key: &'k str, prefix: &str, section: &str) -> Option<&'k str> {
    key.strip_prefix(prefix)?.strip_prefix(section)
}

/// One `networks/<name>` record, by the rules of `network create` (the VNI's ownership
/// and overlaps with other networks are [`parse_snapshot`]'s).
pub fn parse_network(prefix: &str, pair: &dyn Record) -> Result<Network, Rejection> {
    use RejectReason::*;
    let kind = RecordKind::Network;
    let reject = |reason, detail: String| Rejection::new(pair.key(), kind, reason, detail);
    let name = key_rest(pair.key(), prefix, "networks/").unwrap_or(pair.key());
    ipam::validate_name(name).map_err(|e| reject(BadKey, e.to_string()))?;
    let network: Network = decode(pair, kind).map_err(|e| unreadable_egress(pair).unwrap_or(e))?;
    if network.name != name {
        return Err(reject(
            KeyMismatch,
            format!("the record names network {:?}", network.name),
        ));
    }
    // As `network create` parses it: no host bits, at most a /30.
    ipam::parse_subnet(&network.subnet.to_string())
        .map_err(|e| reject(BadSubnet, e.to_string()))?;
    ipam::validate_gateway(network.subnet, network.gateway)
        .map_err(|e| reject(BadGateway, e.to_string()))?;
    ipam::validate_vni(u64::from(network.vni)).map_err(|e| reject(BadVni, e.to_string()))?;
    ipam::validate_mtu(network.mtu).map_err(|e| reject(BadMtu, e.to_string()))?;
    Ok(network)
}

/// One `nodes/<name>` record: a valid name, VTEP and underlay MTU, held by a session.
pub fn parse_node(prefix: &str, pair: &dyn Record) -> Result<NodeInfo, Rejection> {
    use RejectReason::*;
    let kind = RecordKind::Node;
    let reject = |reason, detail: String| Rejection::new(pair.key(), kind, reason, detail);
    let name = key_rest(pair.key(), prefix, "nodes/").unwrap_or(pair.key());
    store::check_segment("node name", name).map_err(|e| reject(BadKey, e.to_string()))?;
    let node: NodeInfo = decode(pair, kind)?;
    if node.name != name {
        return Err(reject(
            KeyMismatch,
            format!("the record names node {:?}", node.name),
        ));
    }
    check_vtep(node.vtep).map_err(|e| reject(BadVtep, format!("VTEP {}: {e}", node.vtep)))?;
    if let Some(underlay_mtu) = node.underlay_mtu {
        mtu::validate_underlay_mtu(underlay_mtu).map_err(|e| reject(BadMtu, e.to_string()))?;
    }
    let iface_ok = store::check_segment("interface", &node.iface).is_ok()
        && node.iface.len() <= 15
        && !node.iface.contains(':');
    if !iface_ok {
        return Err(reject(
            BadName,
            format!("invalid interface name {:?}", node.iface),
        ));
    }
    if pair.session().is_none_or(str::is_empty) {
        return Err(reject(
            NoSession,
            "not held by a session, so not a live node".to_string(),
        ));
    }
    Ok(node)
}

/// One `endpoints/<network>/<id>` record of `network` (already validated), by the rules
/// of `run`/`attach` (the address's ownership and duplicates are [`parse_snapshot`]'s).
pub fn parse_endpoint(
    prefix: &str,
    pair: &dyn Record,
    network: Option<&Network>,
) -> Result<Endpoint, Rejection> {
    use RejectReason::*;
    let kind = RecordKind::Endpoint;
    let reject = |reason, detail: String| Rejection::new(pair.key(), kind, reason, detail);
    let rest = key_rest(pair.key(), prefix, "endpoints/").unwrap_or(pair.key());
    let Some((net_name, id)) = rest.split_once('/') else {
        return Err(reject(BadKey, "not endpoints/<network>/<id>".to_string()));
    };
    ipam::validate_name(net_name).map_err(|e| reject(BadKey, e.to_string()))?;
    store::check_segment("endpoint id", id).map_err(|e| reject(BadKey, e.to_string()))?;
    let endpoint: Endpoint = decode(pair, kind).map_err(|e| unreadable_mac(pair).unwrap_or(e))?;
    if endpoint.network != net_name || endpoint.id != id {
        return Err(reject(
            KeyMismatch,
            format!(
                "the record names endpoint {:?} of network {:?}",
                endpoint.id, endpoint.network
            ),
        ));
    }
    store::check_segment("node name", &endpoint.node)
        .map_err(|e| reject(BadName, e.to_string()))?;
    let Some(network) = network else {
        return Err(reject(
            UnknownNetwork,
            format!("network {net_name:?} is missing or invalid"),
        ));
    };
    ipam::validate_address(network.subnet, network.gateway, endpoint.ip)
        .map_err(|e| reject(BadAddress, e.to_string()))?;
    check_mac(endpoint.mac)
        .map_err(|e| reject(BadMac, format!("{:?}: {e}", endpoint.mac.to_string())))?;
    let ifname = ipam::host_ifname(net_name, id);
    if endpoint.ifname != ifname {
        return Err(reject(
            BadIfname,
            format!(
                "interface {:?} is not the one this endpoint gets ({ifname})",
                endpoint.ifname
            ),
        ));
    }
    if let Some(netns) = &endpoint.netns {
        let expected = ipam::run_netns_name(net_name, id);
        if *netns != expected {
            return Err(reject(
                BadNetns,
                format!("namespace {netns:?} is not the one `run` creates ({expected})"),
            ));
        }
    }
    Ok(endpoint)
}

/// One `ipam/<network>/<ip>` record: ((network, address), allocation).
pub fn parse_allocation(
    prefix: &str,
    pair: &dyn Record,
) -> Result<((String, Ipv4Addr), IpAllocation), Rejection> {
    let kind = RecordKind::Ipam;
    let reject =
        |reason, detail: &str| Rejection::new(pair.key(), kind, reason, detail.to_string());
    let rest = key_rest(pair.key(), prefix, "ipam/").unwrap_or(pair.key());
    let Some((network, ip)) = rest.split_once('/') else {
        return Err(reject(RejectReason::BadKey, "not ipam/<network>/<ip>"));
    };
    ipam::validate_name(network).map_err(|e| reject(RejectReason::BadKey, &e.to_string()))?;
    let ip = Ipv4Addr::from_str(ip)
        .map_err(|_| reject(RejectReason::BadKey, "key does not end in an IPv4 address"))?;
    let allocation: IpAllocation = decode(pair, kind)?;
    Ok(((network.to_string(), ip), allocation))
}
