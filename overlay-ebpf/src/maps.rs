//! The maps the agent fills and the programs read. Pinned by name so that an agent
//! restart finds them again and traffic keeps flowing.
use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, PerCpuArray},
};
use overlay_common::{
    capacity, ClusterConfig, CounterValue, EndpointKey, EndpointValue, LocalIface, NetworkInfo,
    NextHop, SubnetValue, UnderlayConfig, VtepInfo,
};

/// `BPF_F_NO_PREALLOC`: LPM tries require it.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Indexed by `overlay_common::counter_index(slot, counter)`.
#[map]
pub static COUNTERS: PerCpuArray<CounterValue> = PerCpuArray::pinned(capacity::COUNTERS, 0);

#[map]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointValue> = HashMap::pinned(capacity::ENDPOINTS, 0);

/// Keyed by host-side veth ifindex.
#[map]
pub static LOCAL_IFACES: HashMap<u32, LocalIface> = HashMap::pinned(capacity::LOCAL_IFACES, 0);

/// Keyed by VNI.
#[map]
pub static NETWORKS: HashMap<u32, NetworkInfo> = HashMap::pinned(capacity::NETWORKS, 0);

/// Every network's subnet, keyed by (prefix length, network-order address).
#[map]
pub static SUBNETS: LpmTrie<u32, SubnetValue> =
    LpmTrie::pinned(capacity::SUBNETS, BPF_F_NO_PREALLOC);

/// Keyed by node underlay address (network order).
#[map]
pub static VTEPS: HashMap<u32, VtepInfo> = HashMap::pinned(capacity::VTEPS, 0);

/// Keyed by remote VTEP address (network order): the cached next hop towards it.
#[map]
pub static NEXTHOPS: HashMap<u32, NextHop> = HashMap::pinned(capacity::NEXTHOPS, 0);

#[map]
pub static UNDERLAY: Array<UnderlayConfig> = Array::pinned(capacity::UNDERLAY, 0);

/// The cluster-wide settings (one element, zero until the agent writes it).
#[map]
pub static CLUSTER: Array<ClusterConfig> = Array::pinned(capacity::CLUSTER, 0);

/// The VXLAN UDP port in network byte order: the cluster's setting, or the IANA port
/// when none was written (an array element always exists and starts zeroed).
#[inline(always)]
pub fn vxlan_port_be() -> u16 {
    match CLUSTER.get(0) {
        Some(config) => config.vxlan_port_be(),
        None => ClusterConfig::default().vxlan_port_be(),
    }
}

#[inline(always)]
pub fn underlay_config() -> Option<&'static UnderlayConfig> {
    UNDERLAY.get(0)
}
