//! Plumbing of a local endpoint: the veth pair between a container's network namespace and
//! the host, the container side's address, MTU and default route, and the data-plane
//! entries that make the programs forward for it.
use std::{io, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use overlay_common::{EndpointKey, EndpointValue, LocalIface, MacAddr};
use rtnetlink::Handle;

use crate::{
    dataplane::datapath::{Datapath, DatapathError},
    dataplane::netlink::{self, LinkInfo, NetlinkError},
    dataplane::netns::{self, NetNs},
};

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = EndpointError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EndpointError {
    let what = what.into();
    move |source| EndpointError::Io { what, source }
}

/// The container side of an endpoint.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    /// Host-side veth name (<= 15 bytes).
    pub host_ifname: String,
    /// Interface name inside the container.
    pub container_ifname: String,
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub mac: MacAddr,
    pub mtu: u32,
    /// Keep a default route the namespace already has (joining an existing container)
    /// instead of failing on it; the overlay subnet is reachable through its own route.
    pub keep_existing_default_route: bool,
}

/// A locally plumbed endpoint.
#[derive(Clone, Debug)]
pub struct PlumbedEndpoint {
    pub host: LinkInfo,
}

/// The MAC address an endpoint gets: locally administered, derived from its address the
/// way Docker and SocketPlane did (02:42:a:b:c:d), so it is stable and readable.
pub fn mac_for(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr::new([0x02, 0x42, o[0], o[1], o[2], o[3]])
}

/// Creates the veth pair from the calling thread's namespace (the host's) into
/// `container`, and configures both ends. The host side gets the gateway address (/32)
/// and a /32 route to the container, so traffic for the gateway and the outside world
/// reaches the host stack, which routes it.
pub async fn plumb(
    handle: &Handle,
    container: &NetNs,
    spec: &EndpointSpec,
) -> Result<PlumbedEndpoint> {
    let temp_peer = peer_ifname(&spec.host_ifname);
    let (host, peer) = netlink::create_veth(handle, &spec.host_ifname, &temp_peer).await?;
    let result = configure(handle, container, spec, &host, &peer).await;
    if result.is_err() {
        let _ = netlink::delete_link(handle, host.index).await;
    }
    result.map(|()| PlumbedEndpoint { host })
}

/// The name of a veth's container end while it is still in the host's namespace.
pub fn peer_ifname(host_ifname: &str) -> String {
    format!("{}p", &host_ifname[..host_ifname.len().min(14)])
}

/// Creates the veth pair and configures everything but the container's namespace: the
/// container end (named [`peer_ifname`]) stays in the calling thread's namespace for a
/// runtime to move and address (Docker's remote drivers hand it over in `Join`).
pub async fn plumb_handoff(handle: &Handle, spec: &EndpointSpec) -> Result<PlumbedEndpoint> {
    let temp_peer = peer_ifname(&spec.host_ifname);
    let (host, peer) = netlink::create_veth(handle, &spec.host_ifname, &temp_peer).await?;
    let result = configure_host(handle, spec, &host, &peer).await;
    if result.is_err() {
        let _ = netlink::delete_link(handle, host.index).await;
    }
    result.map(|()| PlumbedEndpoint { host })
}

async fn configure(
    handle: &Handle,
    container: &NetNs,
    spec: &EndpointSpec,
    host: &LinkInfo,
    peer: &LinkInfo,
) -> Result<()> {
    configure_host(handle, spec, host, peer).await?;
    netlink::move_to_netns(handle, peer.index, container.file()).await?;
    configure_container(container, spec, &peer.name)
}

/// The host end (up, MTU, the gateway address, a route to the container) and the
/// container end's link settings (MAC, MTU, GRO), both still in the host's namespace.
async fn configure_host(
    handle: &Handle,
    spec: &EndpointSpec,
    host: &LinkInfo,
    peer: &LinkInfo,
) -> Result<()> {
    // The overlay is IPv4 only; no IPv6 link-local chatter on the host side.
    let _ = netns::write_net_sysctl(&format!("ipv6.conf.{}.disable_ipv6", spec.host_ifname), "1");
    netlink::set_mac(handle, peer.index, spec.mac).await?;
    netlink::set_mtu(handle, peer.index, spec.mtu).await?;
    // Both ends: a veth drops a frame larger than its receiving end's MTU, so a host end
    // left at 1500 would lose a jumbo network's packets from the container.
    netlink::set_mtu(handle, host.index, spec.mtu).await?;
    // XDP_REDIRECT into a veth needs a NAPI context on the receiving end: GRO gives it
    // one (and batches), without a program of ours living in the container.
    set_gro(&peer.name, true).map_err(io_err(format!("enable GRO on {}", peer.name)))?;
    netlink::set_up(handle, host.index).await?;
    netlink::add_address(handle, host.index, spec.gateway, 32).await?;
    netlink::replace_link_route(handle, spec.ip, 32, host.index, Some(spec.gateway)).await?;
    Ok(())
}

/// Inside the container: the interface's name, address, default route, and `lo` up.
fn configure_container(container: &NetNs, spec: &EndpointSpec, temp_name: &str) -> Result<()> {
    let (temp_name, spec) = (temp_name.to_string(), spec.clone());
    container
        .block_on(|| async move {
            let _ = netns::write_net_sysctl("ipv6.conf.all.disable_ipv6", "1");
            let _ = netns::write_net_sysctl("ipv6.conf.default.disable_ipv6", "1");
            let handle = netlink::connect()?;
            let link = netlink::link_by_name(&handle, &temp_name).await?;
            netlink::rename(&handle, link.index, &spec.container_ifname).await?;
            netlink::add_address(&handle, link.index, spec.ip, spec.subnet.prefix()).await?;
            netlink::set_up(&handle, link.index).await?;
            if let Ok(lo) = netlink::link_by_name(&handle, "lo").await {
                netlink::set_up(&handle, lo.index).await?;
            }
            match netlink::add_default_route(&handle, spec.gateway).await {
                Err(e) if spec.keep_existing_default_route && netlink::is_exists(&e) => {}
                other => other?,
            }
            Ok::<(), NetlinkError>(())
        })
        .map_err(io_err("enter the container namespace"))??;
    Ok(())
}

/// Registers a plumbed endpoint with the data plane: attaches the container program to
/// its host-side veth and adds its entries.
pub fn attach(
    datapath: &mut Datapath,
    vni: u32,
    spec: &EndpointSpec,
    plumbed: &PlumbedEndpoint,
) -> Result<()> {
    let ifindex = datapath.attach_container(&plumbed.host.name)?;
    datapath.upsert_local_iface(
        ifindex,
        &LocalIface::new(vni, spec.ip, spec.mac, plumbed.host.mac),
    )?;
    datapath.upsert_endpoint(
        EndpointKey::new(vni, spec.ip),
        &EndpointValue::local(ifindex, spec.mac),
    )?;
    Ok(())
}

/// Removes an endpoint's data-plane entries and detaches from its veth.
pub fn detach(datapath: &mut Datapath, vni: u32, ip: Ipv4Addr, host_ifindex: u32) -> Result<()> {
    datapath.remove_endpoint(EndpointKey::new(vni, ip))?;
    datapath.remove_local_iface(host_ifindex)?;
    datapath.detach_container(host_ifindex)?;
    Ok(())
}

const ETHTOOL_STXCSUM: u32 = 0x0000_0017;
const ETHTOOL_SGRO: u32 = 0x0000_002c;

/// Turns generic receive offload on or off (`ethtool -K IFACE gro on|off`) for an
/// interface of the calling thread's namespace.
pub fn set_gro(ifname: &str, enabled: bool) -> io::Result<()> {
    set_ethtool_value(ifname, ETHTOOL_SGRO, enabled)
}

/// Turns transmit checksum offload on or off (`ethtool -K IFACE tx on|off`).
///
/// On a veth underlay (containers-in-containers, test rigs) packets keep their partial
/// checksum state across the "wire", and XDP_REDIRECT on the receiving node drops that
/// state, so inner checksums must be finished before they leave: a physical NIC always
/// does that; a veth only does it with its offload off.
pub fn set_tx_checksum(ifname: &str, enabled: bool) -> io::Result<()> {
    set_ethtool_value(ifname, ETHTOOL_STXCSUM, enabled)
}

fn set_ethtool_value(ifname: &str, cmd: u32, enabled: bool) -> io::Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut value = EthtoolValue {
        cmd,
        data: enabled as u32,
    };
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        _pad: [0; 16],
    };
    for (dst, src) in request.name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a plain datagram socket used only for this ioctl and closed below; the
    // request points at live, correctly laid out structures.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut request);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}
