//! Reads an agent's pinned maps directly (from bpffs, as `bpftool map dump pinned` would),
//! so tests can check exactly which entries the data plane holds, independently of what
//! the agent reports about itself.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use aya::maps::{lpm_trie::LpmTrie, HashMap, Map, MapData};
use overlay_common::{
    ipv4_from_map, map_names, EndpointKey, EndpointValue, LocalIface, NetworkInfo, NextHop,
    SubnetValue, VtepInfo,
};

/// The contents of the maps the control plane writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Maps {
    pub networks: BTreeMap<u32, NetworkInfo>,
    /// (network address, prefix length) -> VNI.
    pub subnets: BTreeMap<(Ipv4Addr, u32), u32>,
    pub vteps: BTreeMap<Ipv4Addr, VtepInfo>,
    /// (VNI, address) -> value.
    pub endpoints: BTreeMap<(u32, Ipv4Addr), EndpointValue>,
    pub local_ifaces: BTreeMap<u32, LocalIface>,
}

fn open(pin_root: &Path, name: &str) -> MapData {
    let path = pin_root.join("maps").join(name);
    MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn hash<K: aya::Pod + Ord, V: aya::Pod>(pin_root: &Path, name: &str) -> BTreeMap<K, V> {
    let map: HashMap<MapData, K, V> =
        HashMap::try_from(Map::HashMap(open(pin_root, name))).expect("a hash map");
    map.iter().map(|r| r.expect("read entry")).collect()
}

/// The next hops cached in `NEXTHOPS` under `pin_root` right now, by VTEP.
pub fn next_hops(pin_root: &Path) -> BTreeMap<Ipv4Addr, NextHop> {
    hash::<u32, NextHop>(pin_root, map_names::NEXTHOPS)
        .into_iter()
        .map(|(vtep, next_hop)| (addr(vtep), next_hop))
        .collect()
}

fn addr(value: u32) -> Ipv4Addr {
    Ipv4Addr::from(ipv4_from_map(value))
}

impl Maps {
    /// Everything in the maps pinned under `pin_root` right now.
    pub fn read(pin_root: &Path) -> Self {
        let trie: LpmTrie<MapData, u32, SubnetValue> =
            LpmTrie::try_from(Map::LpmTrie(open(pin_root, map_names::SUBNETS)))
                .expect("an LPM trie");
        let subnets = trie
            .iter()
            .map(|r| {
                let (key, value) = r.expect("read entry");
                ((addr(key.data()), key.prefix_len()), value.vni)
            })
            .collect();
        Self {
            networks: hash(pin_root, map_names::NETWORKS),
            subnets,
            vteps: hash::<u32, VtepInfo>(pin_root, map_names::VTEPS)
                .into_iter()
                .map(|(k, v)| (addr(k), v))
                .collect(),
            endpoints: hash::<EndpointKey, EndpointValue>(pin_root, map_names::ENDPOINTS)
                .into_iter()
                .map(|(k, v)| ((k.vni, addr(k.ip)), v))
                .collect(),
            local_ifaces: hash(pin_root, map_names::LOCAL_IFACES),
        }
    }

    /// The addresses of `vni` in ENDPOINTS.
    pub fn endpoint_ips(&self, vni: u32) -> BTreeSet<Ipv4Addr> {
        self.endpoints
            .keys()
            .filter(|(v, _)| *v == vni)
            .map(|(_, ip)| *ip)
            .collect()
    }
}
