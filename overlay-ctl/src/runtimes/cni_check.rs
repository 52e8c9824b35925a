//! The `overlay-cni` plugin's CHECK (every difference from what ADD left is reported,
//! code 101), and the look into the container's interface that ADD uses too.
use std::net::Ipv4Addr;

use futures_util::TryStreamExt as _;
use ipnetwork::Ipv4Network;
use netlink_packet_route::{
    address::AddressAttribute,
    route::{RouteAddress, RouteAttribute},
};
use rtnetlink::IpVersion;

use super::cni::{self, code, CniError, Config, Invocation};
use super::cni_plugin::{context, netlink_error, open_netns, store_error};
use crate::{
    dataplane::netlink::{self, NetlinkError},
    dataplane::netns::NetNs,
    store::Endpoint,
};

/// An interface inside the container as netlink reports it.
#[derive(Debug)]
pub(super) struct ContainerIface {
    pub mac: overlay_common::MacAddr,
    pub addresses: Vec<Ipv4Network>,
    /// The gateway of the namespace's IPv4 default route, if it has one.
    pub default_gateway: Option<Ipv4Addr>,
}

/// Looks at interface `ifname` inside `netns`: `None` when there is none.
pub(super) fn inspect(netns: &NetNs, ifname: &str) -> Result<Option<ContainerIface>, CniError> {
    let ifname = ifname.to_string();
    netns
        .block_on(|| async move {
            let handle = netlink::connect()?;
            let link = match netlink::link_by_name(&handle, &ifname).await {
                Ok(link) => link,
                Err(NetlinkError::NoSuchLink(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut addresses = Vec::new();
            let mut dump = handle
                .address()
                .get()
                .set_link_index_filter(link.index)
                .execute();
            while let Some(message) = dump.try_next().await? {
                for attr in &message.attributes {
                    if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr {
                        if let Ok(net) = Ipv4Network::new(*ip, message.header.prefix_len) {
                            addresses.push(net);
                        }
                    }
                }
            }
            let mut default_gateway = None;
            let mut routes = handle.route().get(IpVersion::V4).execute();
            while let Some(route) = routes.try_next().await? {
                if route.header.destination_prefix_length != 0
                    || route.header.table != libc::RT_TABLE_MAIN
                {
                    continue;
                }
                default_gateway = route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
                    _ => None,
                });
            }
            Ok(Some(ContainerIface {
                mac: link.mac,
                addresses,
                default_gateway,
            }))
        })
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "cannot enter the container's network namespace",
                e.to_string(),
            )
        })?
        .map_err(netlink_error("cannot read the container's interfaces"))
}

/// CHECK: every difference from what ADD left, as one error (code 101).
pub async fn check(inv: &Invocation, config: &Config) -> Result<(), CniError> {
    let network = config.network.as_str();
    let netns = open_netns(inv)?;
    let ctx = context(config).await?;
    let id = cni::endpoint_id(&inv.container_id, &inv.ifname);
    let sandbox = netns.path().display().to_string();
    let mut problems = Vec::new();

    let endpoint = ctx
        .store
        .get_endpoint(network, &id)
        .await
        .map_err(store_error)?;
    let subnet = ctx
        .store
        .get_network(network)
        .await
        .map_err(store_error)?
        .map(|n| n.subnet);
    match &endpoint {
        None => problems.push(format!(
            "no endpoint record {id} on network {network} in the cluster state"
        )),
        Some(e) if e.node != ctx.status.node => problems.push(format!(
            "endpoint {id} is recorded on node {}, not on this node {}",
            e.node, ctx.status.node
        )),
        Some(_) => {}
    }
    let expected = endpoint
        .as_ref()
        .zip(subnet)
        .and_then(|(e, s)| Ipv4Network::new(e.ip, s.prefix()).ok());
    match inspect(&netns, &inv.ifname)? {
        None => problems.push(format!("interface {} is missing in {sandbox}", inv.ifname)),
        Some(iface) => problems.extend(interface_problems(
            &iface,
            &inv.ifname,
            &sandbox,
            expected,
            endpoint.as_ref(),
            config.conf.prev_result.as_ref(),
        )),
    }
    if let Some(e) = &endpoint {
        let handle = netlink::connect().map_err(netlink_error("netlink"))?;
        if netlink::link_by_name(&handle, &e.ifname).await.is_err() {
            problems.push(format!("host-side veth {} is missing", e.ifname));
        }
        let wanted = format!("{network}/{id}");
        if !ctx.status.attached.contains(&wanted) {
            problems.push(format!(
                "the agent does not forward for {wanted} (see `overlay-ctl agent logs`)"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::DRIFT,
            "the container's network is not as ADD left it",
            problems.join("; "),
        ))
    }
}

/// How the container's interface differs from what ADD left: its address, its MAC, the
/// addresses of `prevResult`.
fn interface_problems(
    iface: &ContainerIface,
    ifname: &str,
    sandbox: &str,
    expected: Option<Ipv4Network>,
    endpoint: Option<&Endpoint>,
    prev_result: Option<&serde_json::Value>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(want) = expected {
        if !iface.addresses.contains(&want) {
            problems.push(format!(
                "interface {} has addresses {:?}, expected {want}",
                ifname,
                iface
                    .addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            ));
        }
    }
    if let Some(e) = &endpoint {
        if iface.mac != e.mac {
            problems.push(format!(
                "interface {} has MAC {}, expected {}",
                ifname, iface.mac, e.mac
            ));
        }
    }
    if let Some(prev) = prev_result {
        for address in cni::prev_addresses(prev, ifname, sandbox) {
            if !iface.addresses.contains(&address) {
                problems.push(format!(
                    "address {address} of prevResult is not on {}",
                    ifname
                ));
            }
            if expected.is_some_and(|want| want != address) {
                problems.push(format!(
                    "prevResult has {address} but the cluster records {}",
                    expected.map(|w| w.to_string()).unwrap_or_default()
                ));
            }
        }
    }
    problems
}
