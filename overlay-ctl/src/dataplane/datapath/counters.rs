//! The per-CPU `COUNTERS` array: reading it by (VNI, counter) for metrics and status,
//! and the counter slots the networks' entries point into (see
//! [`overlay_common::counter_index`]).
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use overlay_common::{
    capacity, counter_index, map_names, Counter, CounterValue, NetworkInfo, SLOT_UNDERLAY,
};

use super::{Datapath, DatapathError, Result};

/// The VNI the underlay slot's counters are reported under ("no network known yet").
const VNI_UNDERLAY: u32 = 0;

/// The lowest network slot (the underlay's excluded) not in `taken`: one pass over the
/// taken slots in order, so filling a whole map stays quick.
pub(super) fn free_slot(taken: &BTreeSet<u32>) -> Option<u32> {
    let mut candidate = SLOT_UNDERLAY + 1;
    for slot in taken.range(candidate..) {
        if *slot != candidate {
            break;
        }
        candidate += 1;
    }
    (candidate < capacity::COUNTER_SLOTS).then_some(candidate)
}

/// The networks' counter slots as this process last wrote or read them, so that writing
/// a network costs no read of the whole NETWORKS map (the agent is its only writer).
#[derive(Debug, Default)]
pub(super) struct SlotTable {
    pub by_vni: BTreeMap<u32, u32>,
    pub taken: BTreeSet<u32>,
}

impl SlotTable {
    pub fn assign(&mut self, vni: u32, slot: u32) {
        self.by_vni.insert(vni, slot);
        self.taken.insert(slot);
    }

    pub fn release(&mut self, vni: u32) {
        if let Some(slot) = self.by_vni.remove(&vni) {
            self.taken.remove(&slot);
        }
    }
}

impl Datapath {
    /// Every counter that counted something, summed over CPUs, by (VNI, counter): the
    /// underlay's under VNI 0, each network's under its VNI. A deleted network's counters
    /// go with it.
    pub fn counters(&self) -> Result<BTreeMap<(u32, Counter), CounterValue>> {
        let mut slots = vec![(VNI_UNDERLAY, SLOT_UNDERLAY)];
        slots.extend(self.network_slots()?);
        let name = map_names::COUNTERS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let array: PerCpuArray<&MapData, CounterValue> =
            PerCpuArray::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let mut out = BTreeMap::new();
        for (vni, slot) in slots {
            for counter in Counter::ALL {
                let per_cpu = array
                    .get(&counter_index(slot, counter), 0)
                    .map_err(|source| DatapathError::Map { name, source })?;
                let sum = per_cpu
                    .iter()
                    .fold(CounterValue::default(), |acc, v| CounterValue {
                        packets: acc.packets + v.packets,
                        bytes: acc.bytes + v.bytes,
                    });
                if sum.packets != 0 {
                    out.insert((vni, counter), sum);
                }
            }
        }
        Ok(out)
    }

    /// Each network's counter slot, by VNI.
    pub fn network_slots(&self) -> Result<BTreeMap<u32, u32>> {
        let name = map_names::NETWORKS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let networks: BpfHashMap<&MapData, u32, NetworkInfo> =
            BpfHashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        networks
            .iter()
            .map(|entry| entry.map(|(vni, network)| (vni, network.slot)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// The slot table, read from the NETWORKS map the first time.
    pub(super) fn slots(&mut self) -> Result<&mut SlotTable> {
        if self.slots.is_none() {
            let mut table = SlotTable::default();
            for (vni, slot) in self.network_slots()? {
                table.assign(vni, slot);
            }
            self.slots = Some(table);
        }
        Ok(self.slots.get_or_insert_with(SlotTable::default))
    }

    /// Zeroes every counter of `slot` on every CPU, before a new network counts there.
    pub(super) fn zero_counters(&mut self, slot: u32) -> Result<()> {
        let name = map_names::COUNTERS;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        let mut array: PerCpuArray<&mut MapData, CounterValue> = self.typed_map(name)?;
        for counter in Counter::ALL {
            let zeros = PerCpuValues::try_from(vec![CounterValue::default(); nr_cpus])
                .map_err(DatapathError::Cpus)?;
            array
                .set(counter_index(slot, counter), zeros, 0)
                .map_err(|source| DatapathError::Map { name, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_slot_is_the_lowest_unused_network_slot() {
        assert_eq!(free_slot(&BTreeSet::new()), Some(1));
        assert_eq!(free_slot(&BTreeSet::from([1, 2, 4])), Some(3));
        let all: BTreeSet<u32> = (1..capacity::COUNTER_SLOTS).collect();
        assert_eq!(free_slot(&all), None);
    }
}
