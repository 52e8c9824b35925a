//! The forwarding maps as the agent's reconcile writes them: one interface
//! ([`ForwardingMaps`]) over the kernel's BPF maps ([`Datapath`]) and over an in-memory
//! copy ([`MemoryMaps`]) that a control-plane-only agent (`agent --dataplane none`)
//! keeps instead, so that such an agent runs exactly the reconcile and apply code of a
//! real one without a host of its own (the scale benchmark starts a hundred of them).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use overlay_common::{
    capacity, map_names, ClusterConfig, EndpointKey, EndpointValue, LocalIface, NetworkInfo,
    VtepInfo,
};
use serde::Serialize;

use super::datapath::{Datapath, DatapathError};

type Result<T> = std::result::Result<T, DatapathError>;

/// Which data plane an agent drives (`agent --dataplane`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// The eBPF programs and their maps, attached to this host's underlay.
    #[default]
    Bpf,
    /// No data plane: the control plane only (membership, watch, reconcile and
    /// acknowledgements), its maps kept in memory. For scale tests of the control plane.
    None,
}

impl DataplaneMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bpf => "bpf",
            Self::None => "none",
        }
    }
}

/// Reads and writes of the maps the reconcile keeps equal to the cluster state, and the
/// container attachments that go with them. Removing an absent entry succeeds.
pub trait ForwardingMaps {
    fn networks(&mut self) -> Result<BTreeMap<u32, NetworkInfo>>;
    fn upsert_network(&mut self, vni: u32, network: &NetworkInfo) -> Result<()>;
    fn remove_network(&mut self, vni: u32) -> Result<()>;
    fn subnets(&mut self) -> Result<BTreeMap<Ipv4Network, u32>>;
    fn upsert_subnet(&mut self, subnet: Ipv4Network, vni: u32) -> Result<()>;
    fn remove_subnet(&mut self, subnet: Ipv4Network) -> Result<()>;
    fn vteps(&mut self) -> Result<BTreeMap<Ipv4Addr, VtepInfo>>;
    fn upsert_vtep(&mut self, vtep: Ipv4Addr, info: &VtepInfo) -> Result<()>;
    fn remove_vtep(&mut self, vtep: Ipv4Addr) -> Result<()>;
    fn endpoints(&mut self) -> Result<BTreeMap<EndpointKey, EndpointValue>>;
    /// One endpoint entry (`None`: not in the map).
    fn endpoint(&mut self, key: EndpointKey) -> Result<Option<EndpointValue>>;
    fn upsert_endpoint(&mut self, key: EndpointKey, value: &EndpointValue) -> Result<()>;
    fn remove_endpoint(&mut self, key: EndpointKey) -> Result<()>;
    fn local_ifaces(&mut self) -> Result<BTreeMap<u32, LocalIface>>;
    fn upsert_local_iface(&mut self, ifindex: u32, iface: &LocalIface) -> Result<()>;
    fn remove_local_iface(&mut self, ifindex: u32) -> Result<()>;
    fn cluster_config(&mut self) -> Result<ClusterConfig>;
    fn set_cluster_config(&mut self, config: &ClusterConfig) -> Result<()>;
    /// Interfaces the container program is attached to by this handle.
    fn attached_containers(&self) -> BTreeSet<u32>;
    /// Interfaces with a container-program link pinned by this or an earlier agent.
    fn pinned_container_links(&self) -> Vec<u32>;
    fn attach_container(&mut self, host_veth: &str) -> Result<u32>;
    fn detach_container(&mut self, ifindex: u32) -> Result<()>;
    /// Entries and capacity of every map, for status and metrics.
    fn map_occupancy(&mut self) -> Result<Vec<(&'static str, usize, u32)>>;
}

impl ForwardingMaps for Datapath {
    fn networks(&mut self) -> Result<BTreeMap<u32, NetworkInfo>> {
        Datapath::networks(self)
    }
    fn upsert_network(&mut self, vni: u32, network: &NetworkInfo) -> Result<()> {
        Datapath::upsert_network(self, vni, network)
    }
    fn remove_network(&mut self, vni: u32) -> Result<()> {
        Datapath::remove_network(self, vni)
    }
    fn subnets(&mut self) -> Result<BTreeMap<Ipv4Network, u32>> {
        Datapath::subnets(self)
    }
    fn upsert_subnet(&mut self, subnet: Ipv4Network, vni: u32) -> Result<()> {
        Datapath::upsert_subnet(self, subnet, vni)
    }
    fn remove_subnet(&mut self, subnet: Ipv4Network) -> Result<()> {
        Datapath::remove_subnet(self, subnet)
    }
    fn vteps(&mut self) -> Result<BTreeMap<Ipv4Addr, VtepInfo>> {
        Datapath::vteps(self)
    }
    fn upsert_vtep(&mut self, vtep: Ipv4Addr, info: &VtepInfo) -> Result<()> {
        Datapath::upsert_vtep(self, vtep, info)
    }
    fn remove_vtep(&mut self, vtep: Ipv4Addr) -> Result<()> {
        Datapath::remove_vtep(self, vtep)
    }
    fn endpoints(&mut self) -> Result<BTreeMap<EndpointKey, EndpointValue>> {
        Datapath::endpoints(self)
    }
    fn endpoint(&mut self, key: EndpointKey) -> Result<Option<EndpointValue>> {
        Datapath::endpoint(self, key)
    }
    fn upsert_endpoint(&mut self, key: EndpointKey, value: &EndpointValue) -> Result<()> {
        Datapath::upsert_endpoint(self, key, value)
    }
    fn remove_endpoint(&mut self, key: EndpointKey) -> Result<()> {
        Datapath::remove_endpoint(self, key)
    }
    fn local_ifaces(&mut self) -> Result<BTreeMap<u32, LocalIface>> {
        Datapath::local_ifaces(self)
    }
    fn upsert_local_iface(&mut self, ifindex: u32, iface: &LocalIface) -> Result<()> {
        Datapath::upsert_local_iface(self, ifindex, iface)
    }
    fn remove_local_iface(&mut self, ifindex: u32) -> Result<()> {
        Datapath::remove_local_iface(self, ifindex)
    }
    fn cluster_config(&mut self) -> Result<ClusterConfig> {
        Datapath::cluster_config(self)
    }
    fn set_cluster_config(&mut self, config: &ClusterConfig) -> Result<()> {
        Datapath::set_cluster_config(self, config)
    }
    fn attached_containers(&self) -> BTreeSet<u32> {
        Datapath::attached_containers(self).collect()
    }
    fn pinned_container_links(&self) -> Vec<u32> {
        Datapath::pinned_container_links(self)
    }
    fn attach_container(&mut self, host_veth: &str) -> Result<u32> {
        Datapath::attach_container(self, host_veth)
    }
    fn detach_container(&mut self, ifindex: u32) -> Result<()> {
        Datapath::detach_container(self, ifindex)
    }
    fn map_occupancy(&mut self) -> Result<Vec<(&'static str, usize, u32)>> {
        Datapath::map_occupancy(self)
    }
}

/// The maps of an agent without a data plane: plain ordered maps, no capacity limit
/// enforced (the capacities are reported as the kernel's would be), no attachments.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    networks: BTreeMap<u32, NetworkInfo>,
    subnets: BTreeMap<Ipv4Network, u32>,
    vteps: BTreeMap<Ipv4Addr, VtepInfo>,
    endpoints: BTreeMap<EndpointKey, EndpointValue>,
    local_ifaces: BTreeMap<u32, LocalIface>,
    cluster: ClusterConfig,
}

impl ForwardingMaps for MemoryMaps {
    fn networks(&mut self) -> Result<BTreeMap<u32, NetworkInfo>> {
        Ok(self.networks.clone())
    }
    fn upsert_network(&mut self, vni: u32, network: &NetworkInfo) -> Result<()> {
        self.networks.insert(vni, *network);
        Ok(())
    }
    fn remove_network(&mut self, vni: u32) -> Result<()> {
        self.networks.remove(&vni);
        Ok(())
    }
    fn subnets(&mut self) -> Result<BTreeMap<Ipv4Network, u32>> {
        Ok(self.subnets.clone())
    }
    fn upsert_subnet(&mut self, subnet: Ipv4Network, vni: u32) -> Result<()> {
        self.subnets.insert(subnet, vni);
        Ok(())
    }
    fn remove_subnet(&mut self, subnet: Ipv4Network) -> Result<()> {
        self.subnets.remove(&subnet);
        Ok(())
    }
    fn vteps(&mut self) -> Result<BTreeMap<Ipv4Addr, VtepInfo>> {
        Ok(self.vteps.clone())
    }
    fn upsert_vtep(&mut self, vtep: Ipv4Addr, info: &VtepInfo) -> Result<()> {
        self.vteps.insert(vtep, *info);
        Ok(())
    }
    fn remove_vtep(&mut self, vtep: Ipv4Addr) -> Result<()> {
        self.vteps.remove(&vtep);
        Ok(())
    }
    fn endpoints(&mut self) -> Result<BTreeMap<EndpointKey, EndpointValue>> {
        Ok(self.endpoints.clone())
    }
    fn endpoint(&mut self, key: EndpointKey) -> Result<Option<EndpointValue>> {
        Ok(self.endpoints.get(&key).copied())
    }
    fn upsert_endpoint(&mut self, key: EndpointKey, value: &EndpointValue) -> Result<()> {
        self.endpoints.insert(key, *value);
        Ok(())
    }
    fn remove_endpoint(&mut self, key: EndpointKey) -> Result<()> {
        self.endpoints.remove(&key);
        Ok(())
    }
    fn local_ifaces(&mut self) -> Result<BTreeMap<u32, LocalIface>> {
        Ok(self.local_ifaces.clone())
    }
    fn upsert_local_iface(&mut self, ifindex: u32, iface: &LocalIface) -> Result<()> {
        self.local_ifaces.insert(ifindex, *iface);
        Ok(())
    }
    fn remove_local_iface(&mut self, ifindex: u32) -> Result<()> {
        self.local_ifaces.remove(&ifindex);
        Ok(())
    }
    fn cluster_config(&mut self) -> Result<ClusterConfig> {
        Ok(self.cluster)
    }
    fn set_cluster_config(&mut self, config: &ClusterConfig) -> Result<()> {
        self.cluster = *config;
        Ok(())
    }
    fn attached_containers(&self) -> BTreeSet<u32> {
        BTreeSet::new()
    }
    fn pinned_container_links(&self) -> Vec<u32> {
        Vec::new()
    }
    fn attach_container(&mut self, host_veth: &str) -> Result<u32> {
        Err(DatapathError::UnknownInterface(host_veth.to_string()))
    }
    fn detach_container(&mut self, _ifindex: u32) -> Result<()> {
        Ok(())
    }
    fn map_occupancy(&mut self) -> Result<Vec<(&'static str, usize, u32)>> {
        Ok(vec![
            (
                map_names::ENDPOINTS,
                self.endpoints.len(),
                capacity::ENDPOINTS,
            ),
            (
                map_names::LOCAL_IFACES,
                self.local_ifaces.len(),
                capacity::LOCAL_IFACES,
            ),
            (map_names::NETWORKS, self.networks.len(), capacity::NETWORKS),
            (map_names::SUBNETS, self.subnets.len(), capacity::SUBNETS),
            (map_names::VTEPS, self.vteps.len(), capacity::VTEPS),
        ])
    }
}

/// The data plane an agent drives: the kernel's, or the in-memory maps of
/// `--dataplane none`.
#[derive(Debug)]
pub enum DataPlane {
    Bpf(Datapath),
    Memory(MemoryMaps),
}

impl DataPlane {
    /// The maps the reconcile writes.
    pub fn maps(&mut self) -> &mut dyn ForwardingMaps {
        match self {
            Self::Bpf(datapath) => datapath,
            Self::Memory(maps) => maps,
        }
    }

    /// The kernel data plane (`None` without one).
    pub fn bpf(&mut self) -> Option<&mut Datapath> {
        match self {
            Self::Bpf(datapath) => Some(datapath),
            Self::Memory(_) => None,
        }
    }

    pub fn bpf_ref(&self) -> Option<&Datapath> {
        match self {
            Self::Bpf(datapath) => Some(datapath),
            Self::Memory(_) => None,
        }
    }
}
