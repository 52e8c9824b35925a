//! The next hop towards every remote VTEP, as the kernel's routes and neighbours say
//! now, cached in the `NEXTHOPS` map so that the encap program rewrites the outer
//! Ethernet header from one hash lookup instead of a `bpf_fib_lookup` per packet.
//!
//! The map is never ahead of the kernel and never long behind it: the agent resolves
//! every VTEP again whenever a link, neighbour or IPv4 route changes (an rtnetlink
//! event, see [`subscribe`]) and once a second besides, and a VTEP whose next hop is not
//! resolved (no route, no neighbour entry, or one that is incomplete or failed) has no
//! entry, so the program falls back to the FIB and `bpf_redirect_neigh`, which resolve
//! it in the kernel.
use std::{collections::BTreeMap, net::Ipv4Addr};

use futures_util::{Stream, StreamExt, TryStreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{AsyncSocket, SocketAddr};
use overlay_common::NextHop;
use rtnetlink::{
    constants::{RTMGRP_IPV4_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH},
    Handle, IpVersion,
};

use super::{
    datapath::{Datapath, DatapathError},
    netlink::{self, NetlinkError},
};

/// A host route: the lookup is for exactly one address.
const HOST_PREFIX_LEN: u8 = 32;

/// Opens a netlink socket that receives every link, neighbour and IPv4 route change of
/// the calling thread's network namespace (its connection runs as a task on the current
/// runtime).
pub fn subscribe() -> Result<
    impl Stream<Item = (NetlinkMessage<RouteNetlinkMessage>, SocketAddr)> + Unpin,
    NetlinkError,
> {
    let (mut connection, _handle, events) =
        rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    let groups = SocketAddr::new(0, RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE);
    connection
        .socket_mut()
        .socket_mut()
        .bind(&groups)
        .map_err(NetlinkError::Connect)?;
    tokio::spawn(connection);
    Ok(events)
}

/// The next hop towards each of `vteps` that the kernel has resolved now.
pub async fn resolve_all(
    handle: &Handle,
    vteps: impl IntoIterator<Item = Ipv4Addr>,
) -> Result<BTreeMap<Ipv4Addr, NextHop>, NetlinkError> {
    let neighbours = resolved_neighbours(handle).await?;
    let mut link_macs = BTreeMap::new();
    let mut out = BTreeMap::new();
    for vtep in vteps {
        let Some((ifindex, via)) = route_to(handle, vtep).await? else {
            continue;
        };
        let Some(dst_mac) = neighbours.get(&(ifindex, via)) else {
            continue;
        };
        let src_mac = match link_macs.get(&ifindex) {
            Some(mac) => *mac,
            None => {
                let mac = netlink::link_by_index(handle, ifindex).await?.mac;
                *link_macs.entry(ifindex).or_insert(mac)
            }
        };
        out.insert(vtep, NextHop::new(ifindex, (*dst_mac).into(), src_mac));
    }
    Ok(out)
}

/// Makes `NEXTHOPS` hold exactly `desired`; returns how many entries changed.
pub fn apply(
    datapath: &mut Datapath,
    desired: &BTreeMap<Ipv4Addr, NextHop>,
) -> Result<usize, DatapathError> {
    let current = datapath.next_hops()?;
    let mut changed = 0;
    for vtep in current.keys().filter(|v| !desired.contains_key(v)) {
        datapath.remove_next_hop(*vtep)?;
        changed += 1;
    }
    for (vtep, next_hop) in desired {
        if current.get(vtep) != Some(next_hop) {
            datapath.upsert_next_hop(*vtep, next_hop)?;
            changed += 1;
        }
    }
    Ok(changed)
}

/// The interface and the next-hop address (a gateway, or `vtep` itself when on-link) of
/// the kernel's route to `vtep`; `None` without a usable route.
async fn route_to(
    handle: &Handle,
    vtep: Ipv4Addr,
) -> Result<Option<(u32, Ipv4Addr)>, NetlinkError> {
    let mut query = RouteMessage::default();
    query.header.address_family = AddressFamily::Inet;
    query.header.destination_prefix_length = HOST_PREFIX_LEN;
    query
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(vtep)));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(query));
    request.header.flags = NLM_F_REQUEST;
    let mut replies = handle.clone().request(request)?;
    while let Some(reply) = replies.next().await {
        match reply.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                return Ok(next_hop_of(&route, vtep));
            }
            // Unreachable (no route, or a prohibit/blackhole one): nothing to cache.
            NetlinkPayload::Error(_) => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

fn next_hop_of(route: &RouteMessage, vtep: Ipv4Addr) -> Option<(u32, Ipv4Addr)> {
    let mut ifindex = None;
    let mut via = vtep;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            RouteAttribute::Gateway(RouteAddress::Inet(gateway)) => via = *gateway,
            _ => {}
        }
    }
    ifindex.map(|index| (index, via))
}

/// Every IPv4 neighbour entry with a usable link-layer address, by (interface, address).
async fn resolved_neighbours(
    handle: &Handle,
) -> Result<BTreeMap<(u32, Ipv4Addr), [u8; 6]>, NetlinkError> {
    let mut dump = handle
        .neighbours()
        .get()
        .set_family(IpVersion::V4)
        .execute();
    let mut out = BTreeMap::new();
    while let Some(entry) = dump.try_next().await? {
        if let Some((address, mac)) = usable_neighbour(&entry) {
            out.insert((entry.header.ifindex, address), mac);
        }
    }
    Ok(out)
}

/// The address and MAC of a neighbour entry the kernel itself would send to
/// (`NUD_VALID`); `None` for one being resolved, failed, or without a MAC.
fn usable_neighbour(entry: &NeighbourMessage) -> Option<(Ipv4Addr, [u8; 6])> {
    let usable = matches!(
        entry.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    let mut address = None;
    let mut mac = None;
    for attribute in &entry.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => address = Some(*ip),
            NeighbourAttribute::LinkLocalAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok()
            }
            _ => {}
        }
    }
    address.zip(mac)
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::neighbour::NeighbourHeader;

    use super::*;

    fn neighbour(state: NeighbourState, mac: Vec<u8>) -> NeighbourMessage {
        let mut entry = NeighbourMessage::default();
        entry.header = NeighbourHeader {
            ifindex: 2,
            state,
            ..Default::default()
        };
        entry.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(192, 0, 2, 1))),
            NeighbourAttribute::LinkLocalAddress(mac),
        ];
        entry
    }

    #[test]
    fn only_resolved_neighbours_with_a_mac_are_usable() {
        let mac = vec![2, 0, 0, 0, 0, 1];
        let expected = Some((Ipv4Addr::new(192, 0, 2, 1), [2, 0, 0, 0, 0, 1]));
        assert_eq!(
            usable_neighbour(&neighbour(NeighbourState::Reachable, mac.clone())),
            expected
        );
        assert_eq!(
            usable_neighbour(&neighbour(NeighbourState::Stale, mac.clone())),
            expected
        );
        assert_eq!(
            usable_neighbour(&neighbour(NeighbourState::Incomplete, mac.clone())),
            None
        );
        assert_eq!(
            usable_neighbour(&neighbour(NeighbourState::Failed, mac)),
            None
        );
        assert_eq!(
            usable_neighbour(&neighbour(NeighbourState::Reachable, vec![])),
            None
        );
    }

    #[test]
    fn a_gateway_route_goes_via_the_gateway() {
        let vtep = Ipv4Addr::new(198, 51, 100, 7);
        let gateway = Ipv4Addr::new(192, 0, 2, 254);
        let mut route = RouteMessage::default();
        route.attributes = vec![
            RouteAttribute::Oif(3),
            RouteAttribute::Gateway(RouteAddress::Inet(gateway)),
        ];
        assert_eq!(next_hop_of(&route, vtep), Some((3, gateway)));
        route.attributes.remove(1);
        assert_eq!(next_hop_of(&route, vtep), Some((3, vtep)));
        assert_eq!(next_hop_of(&RouteMessage::default(), vtep), None);
    }
}
