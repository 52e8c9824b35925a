//! Typed reads and updates of every map: the agent's reconcile loop, the CLI and the
//! tests change kernel state only through these. Removing an absent entry succeeds (an
//! idempotent reconcile asks for exactly that).
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap,
    },
    Pod,
};
use overlay_common::{
    ip_from_map, ip_to_map, map_names, ClusterConfig, Counter, CounterKey, CounterValue,
    EndpointKey, EndpointValue, LocalIface, NetworkInfo, SubnetValue, UnderlayConfig, VtepInfo,
};

use super::{Datapath, DatapathError, Result};

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

    pub fn upsert_network(&mut self, vni: u32, network: &NetworkInfo) -> Result<()> {
        self.hash_insert(map_names::NETWORKS, vni, *network)
    }

    pub fn remove_network(&mut self, vni: u32) -> Result<()> {
        self.hash_remove::<u32, NetworkInfo>(map_names::NETWORKS, &vni)
    }

    pub fn networks(&mut self) -> Result<BTreeMap<u32, NetworkInfo>> {
        self.hash_entries(map_names::NETWORKS)
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

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<(u32, Counter), CounterValue>> {
        let name = map_names::COUNTERS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let counters: PerCpuHashMap<&MapData, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let mut out = BTreeMap::new();
        for entry in counters.iter() {
            let (key, per_cpu) = entry.map_err(|source| DatapathError::Map { name, source })?;
            let Some(counter) = Counter::from_u32(key.counter) else {
                continue;
            };
            let sum = per_cpu
                .iter()
                .fold(CounterValue::default(), |acc, v| CounterValue {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                });
            out.insert((key.vni, counter), sum);
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
                map_names::COUNTERS,
                self.counters()?.len(),
                capacity::COUNTERS,
            ),
        ])
    }

    fn typed_map<'a, M>(&'a mut self, name: &'static str) -> Result<M>
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

    fn hash_entries<K: Pod + Ord, V: Pod>(&mut self, name: &'static str) -> Result<BTreeMap<K, V>> {
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
