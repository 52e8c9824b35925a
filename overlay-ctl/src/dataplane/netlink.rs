//! Interface, address and route queries and changes over rtnetlink. Like every netlink
//! socket, the one opened here acts in the network namespace of the thread that opens it.
use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute},
};
use overlay_common::MacAddr;
use rtnetlink::{Handle, IpVersion};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("netlink: {0}")]
    Request(#[from] rtnetlink::Error),
    #[error("network interface {0:?} not found")]
    NoSuchLink(String),
    #[error("interface {0:?} has no IPv4 address")]
    NoIpv4(String),
    #[error("no IPv4 default route: pass the underlay interface explicitly (--iface)")]
    NoDefaultRoute,
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

/// What the data plane needs to know about the underlay interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub mac: MacAddr,
    /// The link kind of a virtual device (`veth`, `bridge`, `vxlan`, ...); `None` for a
    /// device with a driver of its own (a NIC, virtio_net).
    pub kind: Option<String>,
}

/// Opens a netlink connection, driven by a task on the current tokio runtime.
pub fn connect() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

fn link_info(message: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        name: String::new(),
        index: message.header.index,
        mtu: 0,
        mac: MacAddr::default(),
        kind: None,
    };
    for attr in &message.attributes {
        match attr {
            LinkAttribute::LinkInfo(infos) => {
                for link_info in infos {
                    if let NlLinkInfo::Kind(kind) = link_info {
                        info.kind = Some(kind.to_string());
                    }
                }
            }
            LinkAttribute::IfName(name) => info.name = name.clone(),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::Address(bytes) => {
                if let Ok(octets) = <[u8; 6]>::try_from(bytes.as_slice()) {
                    info.mac = MacAddr::new(octets);
                }
            }
            _ => {}
        }
    }
    info
}

pub async fn link_by_name(handle: &Handle, name: &str) -> Result<LinkInfo> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(message)) => Ok(link_info(&message)),
        Ok(None) => Err(NetlinkError::NoSuchLink(name.to_string())),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(NetlinkError::NoSuchLink(name.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn link_by_index(handle: &Handle, index: u32) -> Result<LinkInfo> {
    let mut links = handle.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(Some(message)) => Ok(link_info(&message)),
        Ok(None) => Err(NetlinkError::NoSuchLink(format!("#{index}"))),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(NetlinkError::NoSuchLink(format!("#{index}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Every interface of the namespace (one dump, however many there are).
pub async fn list_links(handle: &Handle) -> Result<Vec<LinkInfo>> {
    let mut links = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(message) = links.try_next().await? {
        out.push(link_info(&message));
    }
    Ok(out)
}

/// The first IPv4 address on the link: the node's VTEP address.
pub async fn first_ipv4(handle: &Handle, link: &LinkInfo) -> Result<Ipv4Addr> {
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute();
    while let Some(message) = addrs.try_next().await? {
        for attr in &message.attributes {
            if let AddressAttribute::Local(std::net::IpAddr::V4(ip))
            | AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr
            {
                return Ok(*ip);
            }
        }
    }
    Err(NetlinkError::NoIpv4(link.name.clone()))
}

/// The interface of the IPv4 default route (the underlay when none is given).
pub async fn default_route_link(handle: &Handle) -> Result<LinkInfo> {
    let mut routes = handle.route().get(IpVersion::V4).execute();
    while let Some(route) = routes.try_next().await? {
        if route.header.destination_prefix_length != 0 {
            continue;
        }
        let is_default = !route.attributes.iter().any(|a| {
            matches!(a, RouteAttribute::Destination(RouteAddress::Inet(ip)) if !ip.is_unspecified())
        });
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        });
        if let (true, Some(index)) = (is_default, oif) {
            return link_by_index(handle, index).await;
        }
    }
    Err(NetlinkError::NoDefaultRoute)
}

// ---- changes ------------------------------------------------------------------------

/// Creates a veth pair `name` <-> `peer` in the current namespace and returns both.
pub async fn create_veth(handle: &Handle, name: &str, peer: &str) -> Result<(LinkInfo, LinkInfo)> {
    handle
        .link()
        .add()
        .veth(name.to_string(), peer.to_string())
        .execute()
        .await?;
    Ok((
        link_by_name(handle, name).await?,
        link_by_name(handle, peer).await?,
    ))
}

pub async fn create_bridge(handle: &Handle, name: &str) -> Result<LinkInfo> {
    handle
        .link()
        .add()
        .bridge(name.to_string())
        .execute()
        .await?;
    link_by_name(handle, name).await
}

pub async fn set_master(handle: &Handle, index: u32, master: u32) -> Result<()> {
    Ok(handle
        .link()
        .set(index)
        .controller(master)
        .execute()
        .await?)
}

pub async fn set_up(handle: &Handle, index: u32) -> Result<()> {
    Ok(handle.link().set(index).up().execute().await?)
}

pub async fn set_mtu(handle: &Handle, index: u32, mtu: u32) -> Result<()> {
    Ok(handle.link().set(index).mtu(mtu).execute().await?)
}

pub async fn set_mac(handle: &Handle, index: u32, mac: MacAddr) -> Result<()> {
    Ok(handle
        .link()
        .set(index)
        .address(mac.octets().to_vec())
        .execute()
        .await?)
}

pub async fn rename(handle: &Handle, index: u32, name: &str) -> Result<()> {
    Ok(handle
        .link()
        .set(index)
        .name(name.to_string())
        .execute()
        .await?)
}

/// Moves a link into the namespace behind `netns` (an open `/run/netns/X` or
/// `/proc/PID/ns/net`).
pub async fn move_to_netns(handle: &Handle, index: u32, netns: &std::fs::File) -> Result<()> {
    use std::os::fd::AsRawFd;
    Ok(handle
        .link()
        .set(index)
        .setns_by_fd(netns.as_raw_fd())
        .execute()
        .await?)
}

/// Deletes a link; one that is already gone is not an error.
pub async fn delete_link(handle: &Handle, index: u32) -> Result<()> {
    match handle.clone().link().del(index).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        other => Ok(other?),
    }
}

pub async fn add_address(handle: &Handle, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    match handle
        .address()
        .add(index, ip.into(), prefix)
        .execute()
        .await
    {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => Ok(other?),
    }
}

/// `ip route add default via GATEWAY` (the gateway must be on a connected subnet).
pub async fn add_default_route(handle: &Handle, gateway: Ipv4Addr) -> Result<()> {
    Ok(handle.route().add().v4().gateway(gateway).execute().await?)
}

/// Whether an error is the kernel's "already exists" (EEXIST).
pub fn is_exists(error: &NetlinkError) -> bool {
    matches!(error, NetlinkError::Request(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST)
}

/// `ip route replace DST/PREFIX dev OIF scope link [src SRC]`.
pub async fn replace_link_route(
    handle: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    oif: u32,
    src: Option<Ipv4Addr>,
) -> Result<()> {
    let mut request = handle
        .route()
        .add()
        .v4()
        .destination_prefix(dst, prefix)
        .output_interface(oif)
        .scope(netlink_packet_route::route::RouteScope::Link)
        .replace();
    if let Some(src) = src {
        request = request.pref_source(src);
    }
    Ok(request.execute().await?)
}

/// `ip route add DST/PREFIX via GATEWAY`.
pub async fn add_route_via(
    handle: &Handle,
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<()> {
    Ok(handle
        .route()
        .add()
        .v4()
        .destination_prefix(dst, prefix)
        .gateway(gateway)
        .execute()
        .await?)
}

/// A permanent neighbour entry (`ip neigh replace IP lladdr MAC dev IFINDEX nud permanent`).
pub async fn add_permanent_neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: MacAddr,
) -> Result<()> {
    Ok(handle
        .neighbours()
        .add(index, ip.into())
        .link_local_address(&mac.octets())
        .state(netlink_packet_route::neighbour::NeighbourState::Permanent)
        .replace()
        .execute()
        .await?)
}

/// A static forwarding entry on a VXLAN device (`bridge fdb append MAC dev VXLAN dst VTEP`).
pub async fn add_vxlan_fdb(
    handle: &Handle,
    vxlan_index: u32,
    mac: MacAddr,
    vtep: Ipv4Addr,
) -> Result<()> {
    use netlink_packet_route::neighbour::{NeighbourFlag, NeighbourState};
    Ok(handle
        .neighbours()
        .add_bridge(vxlan_index, &mac.octets())
        .destination(vtep.into())
        .flags(vec![NeighbourFlag::Own])
        .state(NeighbourState::Permanent)
        .execute()
        .await?)
}

/// A Linux VXLAN device with learning off (`ip link add NAME type vxlan id VNI local
/// LOCAL dstport PORT nolearning`): it sends to and listens on UDP `port`.
pub async fn create_vxlan(
    handle: &Handle,
    name: &str,
    vni: u32,
    local: Ipv4Addr,
    underlay: u32,
    port: u16,
) -> Result<LinkInfo> {
    handle
        .link()
        .add()
        .vxlan(name.to_string(), vni)
        .local(local)
        .link(underlay)
        .port(port)
        .learning(false)
        .execute()
        .await?;
    link_by_name(handle, name).await
}
