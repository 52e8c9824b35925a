use aya_ebpf::bindings::BPF_NOEXIST;
use overlay_common::{Counter, CounterKey, CounterValue};

use crate::maps::COUNTERS;

/// VNI under which underlay-scope events are counted before a packet's network is known
/// (keeps the counter map bounded whatever VNIs an attacker sends).
pub const VNI_UNDERLAY: u32 = 0;

/// Adds one packet of `bytes` to (`vni`, `counter`) on this CPU.
#[inline(always)]
pub fn count(vni: u32, counter: Counter, bytes: u64) {
    let key = CounterKey {
        vni,
        counter: counter as u32,
    };
    if add(&key, bytes) {
        return;
    }
    let first = CounterValue { packets: 1, bytes };
    // Another CPU may create the entry between our lookup and insert; then add to it.
    if COUNTERS.insert(&key, &first, BPF_NOEXIST as u64).is_err() {
        add(&key, bytes);
    }
}

#[inline(always)]
fn add(key: &CounterKey, bytes: u64) -> bool {
    match COUNTERS.get_ptr_mut(key) {
        Some(value) => {
            // SAFETY: per-CPU value of a live map entry; only this CPU writes it.
            unsafe {
                (*value).packets += 1;
                (*value).bytes += bytes;
            }
            true
        }
        None => false,
    }
}
