//! Typed reads and updates of every map: the agent's reconcile loop, the CLI and the
//! tests change kernel state only through these. Removing an absent entry succeeds (an
//! idempotent reconcile asks for exactly that).
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError,
    },
    Pod,
};
use overlay_common::{
    ip_from_map, ip_to_map, map_names, ClusterConfig, EndpointKey, EndpointValue, LocalIface,
    NetworkInfo, NextHop, SubnetValue, UnderlayConfig, VtepInfo,
};

use super::{counters, Datapath, DatapathError, Result};

impl Datapath {
    pub fn set_underlay(&mut self, config: &UnderlayConfig) -> Result<()> {
        let name = map_names::UNDERLAY;
        let mut array: Array<&mut MapData, UnderlayConfig> = self.typed_map(name)?;
        array
            .set(0, config, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    pub fn underlay_config(&mut self) -> Result<UnderlayConfig> {
        let name = map_names::UNDERLAY;
        let array: Array<&mut MapData, UnderlayConfig> = self.typed_map(name)?;
        array
            .get(&0, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// The cluster-wide settings the programs read per packet (the VXLAN port).
    pub fn set_cluster_config(&mut self, config: &ClusterConfig) -> Result<()> {
        let name = map_names::CLUSTER;
        let mut array: Array<&mut MapData, ClusterConfig> = self.typed_map(name)?;
        array
            .set(0, config, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// The cluster-wide settings as the programs see them (all zero, i.e. the defaults,
    /// until written).
    pub fn cluster_config(&mut self) -> Result<ClusterConfig> {
        let name = map_names::CLUSTER;
        let array: Array<&mut MapData, ClusterConfig> = self.typed_map(name)?;
        array
            .get(&0, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Writes network `vni`. Its counter slot is this layer's business (the `slot` of
    /// `network` is ignored): a network in the map keeps its slot, a new one gets the
    /// lowest free slot, with its counters zeroed (a deleted network's may be left there).
    pub fn upsert_network(&mut self, vni: u32, network: &NetworkInfo) -> Result<()> {
        let slots = self.slots()?;
        let (slot, new) = match slots.by_vni.get(&vni) {
            Some(slot) => (*slot, false),
            // There is a slot per NETWORKS entry: none is free only when the map is full,
            // and then the write below fails as a full map's does (and says so).
            None => match counters::free_slot(&slots.taken) {
                Some(slot) => (slot, true),
                None => (overlay_common::SLOT_UNDERLAY, false),
            },
        };
        if new {
            self.zero_counters(slot)?;
        }
        self.hash_insert(map_names::NETWORKS, vni, network.with_slot(slot))?;
        if new {
            self.slots()?.assign(vni, slot);
        }
        Ok(())
    }

    pub fn remove_network(&mut self, vni: u32) -> Result<()> {
        self.hash_remove::<u32, NetworkInfo>(map_names::NETWORKS, &vni)?;
        self.slots()?.release(vni);
        Ok(())
    }

    /// The networks as written (the counter slots left out: see [`Self::network_slots`]),
    /// so that they compare equal to what the store says.
    pub fn networks(&mut self) -> Result<BTreeMap<u32, NetworkInfo>> {
        Ok(self
            .hash_entries::<u32, NetworkInfo>(map_names::NETWORKS)?
            .into_iter()
            .map(|(vni, network)| (vni, network.with_slot(overlay_common::SLOT_UNDERLAY)))
            .collect())
    }

    /// The next hop the encap program uses for `vtep` (without one it asks the FIB).
    pub fn upsert_next_hop(&mut self, vtep: Ipv4Addr, next_hop: &NextHop) -> Result<()> {
        self.hash_insert(map_names::NEXTHOPS, ip_to_map(vtep), *next_hop)
    }

    pub fn remove_next_hop(&mut self, vtep: Ipv4Addr) -> Result<()> {
        self.hash_remove::<u32, NextHop>(map_names::NEXTHOPS, &ip_to_map(vtep))
    }

    pub fn next_hops(&mut self) -> Result<BTreeMap<Ipv4Addr, NextHop>> {
        Ok(self
            .hash_entries::<u32, NextHop>(map_names::NEXTHOPS)?
            .into_iter()
            .map(|(k, v)| (ip_from_map(k), v))
            .collect())
    }

    pub fn upsert_endpoint(&mut self, key: EndpointKey, value: &EndpointValue) -> Result<()> {
        self.hash_insert(map_names::ENDPOINTS, key, *value)
    }

    pub fn remove_endpoint(&mut self, key: EndpointKey) -> Result<()> {
        self.hash_remove::<EndpointKey, EndpointValue>(map_names::ENDPOINTS, &key)
    }

    pub fn endpoints(&mut self) -> Result<BTreeMap<EndpointKey, EndpointValue>> {
        self.hash_entries(map_names::ENDPOINTS)
    }

    /// One endpoint entry (`None`: not in the map).
    pub fn endpoint(&mut self, key: EndpointKey) -> Result<Option<EndpointValue>> {
        let name = map_names::ENDPOINTS;
        let map: BpfHashMap<&mut MapData, EndpointKey, EndpointValue> = self.typed_map(name)?;
        match map.get(&key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map { name, source }),
        }
    }

    pub fn upsert_local_iface(&mut self, ifindex: u32, iface: &LocalIface) -> Result<()> {
        self.hash_insert(map_names::LOCAL_IFACES, ifindex, *iface)
    }

    pub fn remove_local_iface(&mut self, ifindex: u32) -> Result<()> {
        self.hash_remove::<u32, LocalIface>(map_names::LOCAL_IFACES, &ifindex)
    }

    pub fn local_ifaces(&mut self) -> Result<BTreeMap<u32, LocalIface>> {
        self.hash_entries(map_names::LOCAL_IFACES)
    }

    pub fn upsert_vtep(&mut self, vtep: Ipv4Addr, info: &VtepInfo) -> Result<()> {
        self.hash_insert(map_names::VTEPS, ip_to_map(vtep), *info)
    }

    pub fn remove_vtep(&mut self, vtep: Ipv4Addr) -> Result<()> {
        self.hash_remove::<u32, VtepInfo>(map_names::VTEPS, &ip_to_map(vtep))
    }

    pub fn vteps(&mut self) -> Result<BTreeMap<Ipv4Addr, VtepInfo>> {
        Ok(self
            .hash_entries::<u32, VtepInfo>(map_names::VTEPS)?
            .into_iter()
            .map(|(k, v)| (ip_from_map(k), v))
            .collect())
    }

    pub fn upsert_subnet(&mut self, subnet: ipnetwork::Ipv4Network, vni: u32) -> Result<()> {
        let name = map_names::SUBNETS;
        let mut trie: LpmTrie<&mut MapData, u32, SubnetValue> = self.typed_map(name)?;
        let key = LpmKey::new(subnet.prefix() as u32, ip_to_map(subnet.network()));
        trie.insert(&key, SubnetValue { vni }, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    pub fn remove_subnet(&mut self, subnet: ipnetwork::Ipv4Network) -> Result<()> {
        let name = map_names::SUBNETS;
        let mut trie: LpmTrie<&mut MapData, u32, SubnetValue> = self.typed_map(name)?;
        let key = LpmKey::new(subnet.prefix() as u32, ip_to_map(subnet.network()));
        ignore_missing(trie.remove(&key)).map_err(|source| DatapathError::Map { name, source })
    }

    pub fn subnets(&mut self) -> Result<BTreeMap<ipnetwork::Ipv4Network, u32>> {
        let name = map_names::SUBNETS;
        let trie: LpmTrie<&mut MapData, u32, SubnetValue> = self.typed_map(name)?;
        let mut out = BTreeMap::new();
        for entry in trie.iter() {
            let (key, value) = entry.map_err(|source| DatapathError::Map { name, source })?;
            let addr = ip_from_map(key.data());
            if let Ok(net) = ipnetwork::Ipv4Network::new(addr, key.prefix_len() as u8) {
                out.insert(net, value.vni);
            }
        }
        Ok(out)
    }

    /// Entries and capacity of every map, for status and metrics.
    pub fn map_occupancy(&mut self) -> Result<Vec<(&'static str, usize, u32)>> {
        use overlay_common::capacity;
        Ok(vec![
            (
                map_names::ENDPOINTS,
                self.endpoints()?.len(),
                capacity::ENDPOINTS,
            ),
            (
                map_names::LOCAL_IFACES,
                self.local_ifaces()?.len(),
                capacity::LOCAL_IFACES,
            ),
            (
                map_names::NETWORKS,
                self.networks()?.len(),
                capacity::NETWORKS,
            ),
            (map_names::SUBNETS, self.subnets()?.len(), capacity::SUBNETS),
            (map_names::VTEPS, self.vteps()?.len(), capacity::VTEPS),
            (
                map_names::NEXTHOPS,
                self.next_hops()?.len(),
                capacity::NEXTHOPS,
            ),
            (
                map_names::COUNTERS,
                self.counters()?.len(),
                capacity::COUNTERS,
            ),
        ])
    }

    pub(super) fn typed_map<'a, M>(&'a mut self, name: &'static str) -> Result<M>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        M::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }

    fn hash_insert<K: Pod, V: Pod>(&mut self, name: &'static str, key: K, value: V) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, K, V> = self.typed_map(name)?;
        map.insert(key, value, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    fn hash_remove<K: Pod, V: Pod>(&mut self, name: &'static str, key: &K) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, K, V> = self.typed_map(name)?;
        ignore_missing(map.remove(key)).map_err(|source| DatapathError::Map { name, source })
    }

    pub(super) fn hash_entries<K: Pod + Ord, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<BTreeMap<K, V>> {
        let map: BpfHashMap<&mut MapData, K, V> = self.typed_map(name)?;
        map.iter()
            .collect::<std::result::Result<BTreeMap<K, V>, MapError>>()
            .map_err(|source| DatapathError::Map { name, source })
    }
}

/// Removing what is not there is what an idempotent reconcile asks for.
fn ignore_missing(result: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
