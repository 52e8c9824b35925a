//! The three topologies, built side by side with the same shape: an underlay bridge in
//! its own namespace, two hosts (namespaces with one underlay veth `eth0`, plugged by
//! [`Underlay::plug`], offloads as the kernel sets them), and one container per host (a
//! namespace with `eth0`, a veth to its host). The client container is on host 1, the
//! server container on host 2. (c) is set up by the agent's own code (see
//! [`Host::new`]): the bench changes nothing the agent would not, so it measures what
//! users get.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use overlay_ctl::{dataplane::endpoint, dataplane::netlink};

use overlay_tests::{
    harness::{unique_name, TestNs},
    net,
    topology::{cluster, Host, Network, Underlay, UNDERLAY_IFNAME, UNDERLAY_MTU},
};

use crate::report::SetupKind;

/// The VNI of (b) and (c).
pub const VNI: u32 = 100;
/// Container MTU of (b) and (c): the underlay's minus the VXLAN overhead.
pub const OVERLAY_MTU: u32 = UNDERLAY_MTU - overlay_common::VXLAN_OVERHEAD;

/// What every setup shares, in words.
pub fn common_description() -> Vec<String> {
    vec![
            format!(
                "underlay: one bridge (own namespace), each host plugged with a veth `eth0`, MTU {UNDERLAY_MTU}, \
                 offloads as the kernel sets them (the bench changes none)"
            ),
            "bridges (the underlay's, and (b)'s in each host) forward without netfilter \
             (bridge-nf-call-iptables/ip6tables/arptables = 0; the kernel has br_netfilter built \
             in and on by default)"
                .into(),
            "IPv4 forwarding on in the hosts of (a) (set by the bench) and (c) (set by the \
             agent's code); IPv6 off everywhere; GRO enabled on the container end of every \
             container veth"
                .into(),
        ]
}

/// One setup: a client and a server container on two hosts.
pub struct Setup {
    pub kind: SetupKind,
    // Drop order: the hosts (and this project's data plane) first, then the containers,
    // then the underlay.
    hosts: Hosts,
    pub client: TestNs,
    pub server: TestNs,
    pub client_ip: Ipv4Addr,
    pub server_ip: Ipv4Addr,
    _underlay: Underlay,
    /// What was built, in words (and the commands of (b)).
    pub description: String,
}

enum Hosts {
    Plain(#[allow(dead_code)] Vec<TestNs>),
    Overlay(Vec<Host>),
}

impl Setup {
    pub fn build(kind: SetupKind) -> Result<Self> {
        let setup = match kind {
            SetupKind::Routed => routed()?,
            SetupKind::LinuxVxlan => linux_vxlan()?,
            SetupKind::Overlay => overlay()?,
        };
        // Resolve everything (ARP, FDB, the data plane's neighbours) before measuring.
        let dst = setup.server_ip;
        if !setup
            .client
            .run(|| net::ping_until_reply(dst, Duration::from_secs(5)))
        {
            bail!(
                "({}) {}: the client cannot ping the server",
                kind.letter(),
                kind.title()
            );
        }
        Ok(setup)
    }

    /// This project's hosts, for (c).
    pub fn overlay_hosts(&self) -> &[Host] {
        match &self.hosts {
            Hosts::Overlay(h) => h,
            Hosts::Plain(_) => &[],
        }
    }
}

/// Bridges forward without netfilter: the kernel has br_netfilter built in, with
/// `bridge-nf-call-*` on by default in every namespace, which would run every bridged
/// frame through the IP hooks. The underlay bridge stands for a switch, and (b)'s
/// bridge should not pay for a firewall nobody configured.
fn bridge_without_netfilter(ns: &TestNs) -> Result<()> {
    ns.run(|| {
        for family in ["iptables", "ip6tables", "arptables"] {
            match overlay_ctl::dataplane::netns::write_net_sysctl(
                &format!("bridge.bridge-nf-call-{family}"),
                "0",
            ) {
                // Kernels without br_netfilter have no such knob, and nothing to turn off.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        std::io::Result::Ok(())
    })
    .context("turn bridge netfilter off")
}

/// A new underlay (see [`Underlay::new`]) whose bridge skips netfilter.
fn underlay() -> Result<Underlay> {
    let underlay = Underlay::new();
    bridge_without_netfilter(&underlay.ns)?;
    Ok(underlay)
}

/// A veth from `host` into `container`: `eth0` inside with `ip/prefix`, `mac`, `mtu` and
/// GRO on (as [`endpoint::plumb`] does for (c)); returns the host-side name.
fn container_veth(
    host: &TestNs,
    container: &TestNs,
    ip: Ipv4Addr,
    prefix: u8,
    mtu: u32,
) -> Result<String> {
    let host_name = unique_name("bv");
    let peer_name = format!("{host_name}p");
    let mac = endpoint::mac_for(ip);
    let (h, p) = (host_name.clone(), peer_name.clone());
    host.block_on(|| async move {
        let handle = netlink::connect()?;
        let (host_end, peer) = netlink::create_veth(&handle, &h, &p).await?;
        netlink::set_mac(&handle, peer.index, mac).await?;
        netlink::set_mtu(&handle, peer.index, mtu).await?;
        endpoint::set_gro(&p, true)?;
        netlink::move_to_netns(&handle, peer.index, container.ns().file()).await?;
        netlink::set_up(&handle, host_end.index).await?;
        anyhow::Ok(())
    })
    .context("create the container veth")?;
    container
        .block_on(|| async move {
            let handle = netlink::connect()?;
            let link = netlink::link_by_name(&handle, &peer_name).await?;
            netlink::rename(&handle, link.index, "eth0").await?;
            netlink::add_address(&handle, link.index, ip, prefix).await?;
            netlink::set_up(&handle, link.index).await?;
            anyhow::Ok(())
        })
        .context("configure the container side")?;
    Ok(host_name)
}

/// (a): each container in its own /24, the host side of its veth is the gateway, and
/// each host routes the other container's /24 via the other host's underlay address.
fn routed() -> Result<Setup> {
    let underlay = underlay()?;
    let mut hosts = Vec::new();
    let mut containers = Vec::new();
    for n in 1..=2u8 {
        let (host, _) = underlay.plug("bah", n);
        // The hosts route the containers' traffic: that is this baseline's setup.
        host.run(|| overlay_ctl::dataplane::netns::write_net_sysctl("ipv4.ip_forward", "1"))
            .context("turn forwarding on in a routed host")?;
        let container = TestNs::new("bac");
        let subnet = |h: u8| Ipv4Addr::new(10, 1, h, 0);
        let gateway = Ipv4Addr::new(10, 1, n, 1);
        let ip = Ipv4Addr::new(10, 1, n, 2);
        let veth = container_veth(&host, &container, ip, 24, UNDERLAY_MTU)?;
        let other = 3 - n;
        host.block_on(|| async move {
            let handle = netlink::connect()?;
            let link = netlink::link_by_name(&handle, &veth).await?;
            netlink::add_address(&handle, link.index, gateway, 24).await?;
            netlink::add_route_via(&handle, subnet(other), 24, Underlay::host_address(other))
                .await?;
            anyhow::Ok(())
        })?;
        container.block_on(|| async move {
            let handle = netlink::connect()?;
            netlink::add_default_route(&handle, gateway).await?;
            anyhow::Ok(())
        })?;
        hosts.push(host);
        containers.push((container, ip));
    }
    let (server, server_ip) = containers.pop().unwrap();
    let (client, client_ip) = containers.pop().unwrap();
    Ok(Setup {
        kind: SetupKind::Routed,
        hosts: Hosts::Plain(hosts),
        client,
        server,
        client_ip,
        server_ip,
        _underlay: underlay,
        description: format!(
            "no encapsulation: containers 10.1.1.2/24 and 10.1.2.2/24 (MTU {UNDERLAY_MTU}), \
             the host side of each container veth is the gateway, each host routes the other \
             container's /24 via the other host's underlay address"
        ),
    })
}

/// `ip`/`bridge` (iproute2) with `-n NS`.
fn iproute(tool: &str, ns: &TestNs, args: &str) -> Result<String> {
    let output = Command::new(tool)
        .arg("-n")
        .arg(ns.name())
        .args(args.split_whitespace())
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !output.status.success() {
        bail!(
            "{tool} {args}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(format!("{tool} {args}"))
}

/// (b): Docker's classic overlay: in each host a bridge `br0` with the container's veth
/// and a `vxlan0` device (VNI 100, UDP 4789, learning off, ARP proxy on) as ports; for
/// the remote container a static FDB entry (its MAC -> the other host's VTEP) and a
/// permanent neighbour entry on `vxlan0` (answered by the ARP proxy).
fn linux_vxlan() -> Result<Setup> {
    let underlay = underlay()?;
    let net = Network::new(VNI, "10.100.0.0/24");
    let ips = [net.address(2), net.address(3)];
    let mut hosts = Vec::new();
    let mut containers = Vec::new();
    let mut commands = Vec::new();
    for (i, n) in [1u8, 2].into_iter().enumerate() {
        let (host, _) = underlay.plug("bbh", n);
        bridge_without_netfilter(&host)?;
        let vtep = Underlay::host_address(n);
        let (other_vtep, other_ip) = (Underlay::host_address(3 - n), ips[1 - i]);
        let other_mac = endpoint::mac_for(other_ip);
        let mut log = vec![
            iproute("ip", &host, &format!(
                "link add vxlan0 type vxlan id {VNI} local {vtep} dev {UNDERLAY_IFNAME} dstport 4789 nolearning proxy"
            ))?,
            iproute("ip", &host, "link add br0 type bridge")?,
            iproute("ip", &host, "link set vxlan0 master br0")?,
            iproute("ip", &host, "link set vxlan0 up")?,
            iproute("ip", &host, "link set br0 up")?,
            iproute("bridge", &host, &format!("fdb append {other_mac} dev vxlan0 dst {other_vtep}"))?,
            iproute("ip", &host, &format!(
                "neigh add {other_ip} lladdr {other_mac} dev vxlan0 nud permanent"
            ))?,
        ];
        let container = TestNs::new("bbc");
        let veth = container_veth(&host, &container, ips[i], 24, OVERLAY_MTU)?;
        log.push(iproute(
            "ip",
            &host,
            &format!("link set {veth} master br0"),
        )?);
        if i == 0 {
            commands = log;
        }
        hosts.push(host);
        containers.push((container, ips[i]));
    }
    let (server, server_ip) = containers.pop().unwrap();
    let (client, client_ip) = containers.pop().unwrap();
    Ok(Setup {
        kind: SetupKind::LinuxVxlan,
        hosts: Hosts::Plain(hosts),
        client,
        server,
        client_ip,
        server_ip,
        _underlay: underlay,
        description: format!(
            "Docker's classic overlay: per host a bridge with the container veth and a Linux \
             vxlan device as ports, static FDB and permanent neighbour entries (ARP proxy) for \
             the remote container, containers 10.100.0.2/24 and .3/24 (MTU {OVERLAY_MTU}); \
             host 1 ran: `{}`",
            commands.join("`; `")
        ),
    })
}

/// (c): this project's data plane, as the data-plane tests build it.
fn overlay() -> Result<Setup> {
    let underlay = underlay()?;
    let mut hosts = cluster(&underlay, 2);
    let decap_hook = hosts[0].setup.decap_hook.clone();
    let net = Network::new(VNI, "10.100.0.0/24");
    for host in &mut hosts {
        host.add_network(&net);
    }
    let client = hosts[0].add_container(&net, net.address(2));
    let server = hosts[1].add_container(&net, net.address(3));
    let (v1, v2) = (hosts[0].vtep, hosts[1].vtep);
    hosts[0].add_remote(&server, v2);
    hosts[1].add_remote(&client, v1);
    Ok(Setup {
        kind: SetupKind::Overlay,
        hosts: Hosts::Overlay(hosts),
        client_ip: client.ip,
        server_ip: server.ip,
        client: client.ns,
        server: server.ns,
        _underlay: underlay,
        description: format!(
            "this project's eBPF data plane loaded and bound to the underlay by the agent's \
             own code in each host (`--decap auto`: {}), TC on each container's host-side \
             veth, the maps filled as the agent would (network VNI {VNI}, both VTEPs, the remote container), containers \
             10.100.0.2/24 and .3/24 (MTU {OVERLAY_MTU})",
            decap_hook
        ),
    })
}
