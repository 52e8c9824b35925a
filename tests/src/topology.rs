//! A simulated cluster: an underlay bridge (in its own namespace), hosts (namespaces with
//! one underlay veth and their own data plane) and containers (namespaces plumbed to a
//! host by the same library code `overlay-ctl run` uses).
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use overlay_common::{
    ClusterConfig, EndpointKey, EndpointValue, MacAddr, NetworkInfo, VtepInfo, VXLAN_OVERHEAD,
};
use overlay_ctl::{
    dataplane::datapath::{Datapath, XdpAttachMode},
    dataplane::endpoint::{self, EndpointSpec, PlumbedEndpoint},
    dataplane::netlink::{self, LinkInfo},
    dataplane::underlay::{DecapMode, UnderlaySetup},
};

use crate::harness::{block_on, unique_name, PinGuard, TestNs};

pub const UNDERLAY_PREFIX: u8 = 24;
pub const UNDERLAY_MTU: u32 = 1500;
/// Name of every host's underlay interface inside its namespace.
pub const UNDERLAY_IFNAME: &str = "eth0";

/// The underlay network: a bridge that every host's underlay veth plugs into.
pub struct Underlay {
    pub ns: TestNs,
    bridge: LinkInfo,
}

impl Underlay {
    pub fn new() -> Self {
        let ns = TestNs::new("ul");
        let bridge = ns.block_on(|| async {
            let handle = netlink::connect().unwrap();
            let bridge = netlink::create_bridge(&handle, "br0").await.unwrap();
            netlink::set_up(&handle, bridge.index).await.unwrap();
            bridge
        });
        Self { ns, bridge }
    }

    /// Gives the bridge itself an address, for services on the underlay (the Consul
    /// server of the control-plane tests listens there).
    pub fn add_bridge_address(&self, ip: Ipv4Addr) {
        let bridge = self.bridge.index;
        self.ns.block_on(|| async {
            let handle = netlink::connect().unwrap();
            netlink::add_address(&handle, bridge, ip, UNDERLAY_PREFIX)
                .await
                .unwrap();
        });
    }

    /// Address of host number `n` (1-based) on the underlay.
    pub fn host_address(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, n)
    }

    /// A new namespace plugged into the bridge with address `host_address(n)` on `eth0`.
    pub fn plug(&self, prefix: &str, n: u8) -> (TestNs, LinkInfo) {
        self.plug_with_mtu(prefix, n, UNDERLAY_MTU)
    }

    /// [`Underlay::plug`] with a link of MTU `mtu` (both ends of the veth: the host's
    /// `eth0` and its bridge port), as a jumbo-frame or a smaller cloud underlay has.
    pub fn plug_with_mtu(&self, prefix: &str, n: u8, mtu: u32) -> (TestNs, LinkInfo) {
        let ns = TestNs::new(prefix);
        let (outer, inner) = (unique_name("uo"), unique_name("ui"));
        block_on(async {
            let handle = netlink::connect().unwrap();
            let (port, host_end) = netlink::create_veth(&handle, &outer, &inner).await.unwrap();
            netlink::move_to_netns(&handle, port.index, self.ns.ns().file())
                .await
                .unwrap();
            netlink::move_to_netns(&handle, host_end.index, ns.ns().file())
                .await
                .unwrap();
        });
        let bridge = self.bridge.index;
        self.ns.block_on(|| async {
            let handle = netlink::connect().unwrap();
            let port = netlink::link_by_name(&handle, &outer).await.unwrap();
            netlink::set_mtu(&handle, port.index, mtu).await.unwrap();
            netlink::set_master(&handle, port.index, bridge)
                .await
                .unwrap();
            netlink::set_up(&handle, port.index).await.unwrap();
        });
        let link = ns.block_on(|| async {
            let handle = netlink::connect().unwrap();
            let link = netlink::link_by_name(&handle, &inner).await.unwrap();
            netlink::rename(&handle, link.index, UNDERLAY_IFNAME)
                .await
                .unwrap();
            netlink::set_mtu(&handle, link.index, mtu).await.unwrap();
            netlink::add_address(&handle, link.index, Self::host_address(n), UNDERLAY_PREFIX)
                .await
                .unwrap();
            netlink::set_up(&handle, link.index).await.unwrap();
            netlink::link_by_name(&handle, UNDERLAY_IFNAME)
                .await
                .unwrap()
        });
        (ns, link)
    }
}

impl Underlay {
    /// Sets the MTU of every port of the bridge, as enabling jumbo frames on a switch.
    pub fn set_ports_mtu(&self, mtu: u32) {
        let bridge = self.bridge.index;
        self.ns.block_on(|| async {
            let handle = netlink::connect().unwrap();
            for link in netlink::list_links(&handle).await.unwrap() {
                if link.index != bridge && link.name != "lo" {
                    netlink::set_mtu(&handle, link.index, mtu).await.unwrap();
                }
            }
        });
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Self::new()
    }
}

/// A tenant network.
#[derive(Clone, Copy, Debug)]
pub struct Network {
    pub vni: u32,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
}

impl Network {
    pub fn new(vni: u32, subnet: &str) -> Self {
        let subnet: Ipv4Network = subnet.parse().unwrap();
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        Self {
            vni,
            subnet,
            gateway,
        }
    }

    pub fn address(&self, host_part: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + host_part)
    }

    pub fn info(&self) -> NetworkInfo {
        NetworkInfo::new(
            self.subnet.network(),
            self.subnet.mask(),
            self.gateway,
            UNDERLAY_MTU - VXLAN_OVERHEAD,
        )
    }
}

/// A host running this project's data plane. Field order matters for drop: the data
/// plane goes before its pins and its namespace.
pub struct Host {
    pub datapath: Datapath,
    pub pins: PinGuard,
    pub ns: TestNs,
    pub underlay: LinkInfo,
    pub vtep: Ipv4Addr,
    /// The decapsulation hook the agent's code chose, and why.
    pub setup: UnderlaySetup,
}

/// A container: a namespace with one interface `eth0` plumbed to a host.
pub struct Container {
    pub ns: TestNs,
    pub network: Network,
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub host_ifindex: u32,
    /// What attaching it to the data plane takes (see [`Host::reattach`]).
    spec: EndpointSpec,
    plumbed: PlumbedEndpoint,
}

impl Host {
    /// Host number `n` on `underlay`, with the data plane loaded and bound to the
    /// underlay as the agent binds it (`--decap auto`: TC ingress on this veth).
    pub fn new(underlay: &Underlay, n: u8) -> Self {
        Self::with_decap(underlay, n, DecapMode::Auto)
    }

    /// [`Host::new`] with the decapsulation hook chosen by `decap`. The host is set up
    /// by the agent's own code ([`overlay_ctl::dataplane::underlay`]): the harness changes no
    /// offload or sysctl itself.
    pub fn with_decap(underlay: &Underlay, n: u8, decap: DecapMode) -> Self {
        Self::with_underlay_mtu(underlay, n, decap, UNDERLAY_MTU)
    }

    /// [`Host::with_decap`] on an underlay link of MTU `mtu`.
    pub fn with_underlay_mtu(underlay: &Underlay, n: u8, decap: DecapMode, mtu: u32) -> Self {
        let (ns, link) = underlay.plug_with_mtu("host", n, mtu);
        let vtep = Underlay::host_address(n);
        let pins = PinGuard::new();
        let mut datapath = Datapath::load(&pins.path).expect("load data plane");
        let setup = ns
            .run(|| {
                overlay_ctl::dataplane::underlay::enable_forwarding()?;
                overlay_ctl::dataplane::underlay::attach(
                    &mut datapath,
                    &link,
                    vtep,
                    decap,
                    XdpAttachMode::Native,
                )
                .map_err(std::io::Error::other)
            })
            .expect("bind the data plane to the underlay veth");
        Self {
            setup,
            datapath,
            pins,
            ns,
            underlay: link,
            vtep,
        }
    }

    /// Accepts VXLAN from these cluster VTEPs.
    pub fn add_vteps(&mut self, vteps: &[Ipv4Addr]) {
        for vtep in vteps {
            let info = if *vtep == self.vtep {
                VtepInfo::local()
            } else {
                VtepInfo::remote()
            };
            self.datapath.upsert_vtep(*vtep, &info).unwrap();
        }
    }

    /// Encapsulates to and decapsulates only UDP `port` from now on, as an agent does
    /// when the cluster's port changes (the programs read it per packet).
    pub fn set_vxlan_port(&mut self, port: u16) {
        self.datapath
            .set_cluster_config(&ClusterConfig::new(port))
            .unwrap();
    }

    pub fn add_network(&mut self, network: &Network) {
        self.datapath
            .upsert_network(network.vni, &network.info())
            .unwrap();
        self.datapath
            .upsert_subnet(network.subnet, network.vni)
            .unwrap();
    }

    /// Starts a container on this host with address `ip` in `network`.
    pub fn add_container(&mut self, network: &Network, ip: Ipv4Addr) -> Container {
        self.add_container_with_mtu(network, ip, network.info().mtu)
    }

    pub fn add_container_with_mtu(
        &mut self,
        network: &Network,
        ip: Ipv4Addr,
        mtu: u32,
    ) -> Container {
        let ns = TestNs::new("ctr");
        let spec = EndpointSpec {
            host_ifname: unique_name("ov"),
            container_ifname: "eth0".into(),
            ip,
            subnet: network.subnet,
            gateway: network.gateway,
            mac: endpoint::mac_for(ip),
            mtu,
            keep_existing_default_route: false,
        };
        let plumbed = self
            .ns
            .block_on(|| async {
                let handle = netlink::connect().unwrap();
                endpoint::plumb(&handle, ns.ns(), &spec).await
            })
            .expect("plumb container");
        let datapath = &mut self.datapath;
        self.ns
            .run(|| endpoint::attach(datapath, network.vni, &spec, &plumbed))
            .expect("attach container program");
        Container {
            ns,
            network: *network,
            ip,
            mac: spec.mac,
            host_ifindex: plumbed.host.index,
            spec,
            plumbed,
        }
    }

    /// Detaches a container of this host from the data plane and attaches it again, as
    /// the agent does when an endpoint leaves its desired state and comes back.
    pub fn reattach(&mut self, container: &Container) {
        let datapath = &mut self.datapath;
        let vni = container.network.vni;
        self.ns
            .run(|| endpoint::detach(datapath, vni, container.ip, container.host_ifindex))
            .expect("detach container program");
        self.ns
            .run(|| endpoint::attach(datapath, vni, &container.spec, &container.plumbed))
            .expect("attach the container program again");
    }

    /// Tells this host's data plane where a container of another host lives.
    pub fn add_remote(&mut self, container: &Container, vtep: Ipv4Addr) {
        self.add_remote_endpoint(container.network.vni, container.ip, container.mac, vtep);
    }

    pub fn add_remote_endpoint(&mut self, vni: u32, ip: Ipv4Addr, mac: MacAddr, vtep: Ipv4Addr) {
        self.datapath
            .upsert_endpoint(EndpointKey::new(vni, ip), &EndpointValue::remote(vtep, mac))
            .unwrap();
    }

    /// Packets of counter `c` for `vni` on this host.
    pub fn packets(&self, vni: u32, c: overlay_common::Counter) -> u64 {
        self.counter(vni, c).packets
    }

    /// Packets and bytes of counter `c` for `vni` on this host.
    pub fn counter(&self, vni: u32, c: overlay_common::Counter) -> overlay_common::CounterValue {
        self.datapath
            .counters()
            .unwrap()
            .get(&(vni, c))
            .copied()
            .unwrap_or_default()
    }
}

/// A ready cluster: `hosts` hosts that all know each other's VTEPs.
pub fn cluster(underlay: &Underlay, hosts: u8) -> Vec<Host> {
    cluster_with(underlay, hosts, DecapMode::Auto)
}

/// [`cluster`] with the decapsulation hook chosen by `decap` on every host.
pub fn cluster_with(underlay: &Underlay, hosts: u8, decap: DecapMode) -> Vec<Host> {
    let mut all: Vec<Host> = (1..=hosts)
        .map(|n| Host::with_decap(underlay, n, decap))
        .collect();
    let vteps: Vec<Ipv4Addr> = all.iter().map(|h| h.vtep).collect();
    for host in &mut all {
        host.add_vteps(&vteps);
    }
    all
}
