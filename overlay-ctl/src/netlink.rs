//! Interface, address and route queries and changes over rtnetlink. Like every netlink
//! socket, the one opened here acts in the network namespace of the thread that opens it.
use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkMessage},
    route::{RouteAddress, RouteAttribute},
};
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
    pub mac: [u8; 6],
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
        mac: [0; 6],
    };
    for attr in &message.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name = name.clone(),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                info.mac.copy_from_slice(bytes)
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
