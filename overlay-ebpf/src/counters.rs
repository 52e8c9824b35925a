//! The per-(VNI, reason) packet and byte counters every verdict feeds (the agent sums
//! them over CPUs for its metrics), and the kernel-log line a drop writes when the log
//! is on. Depends on nothing but the maps: the verdicts build on it, not the reverse.
use aya_ebpf::bindings::BPF_NOEXIST;
use overlay_common::{Counter, CounterKey, CounterValue};

use crate::maps::COUNTERS;

/// VNI under which underlay-scope events are counted before a packet's network is known
/// (keeps the counter map bounded whatever VNIs an attacker sends).
pub const VNI_UNDERLAY: u32 = 0;

/// Logs a drop through aya-log (debug level). The agent sets the log level at load time
/// (`--ebpf-log`); when it is off, the verifier removes this path, so it costs nothing.
#[inline(never)]
pub fn log_drop(program: &'static str, vni: u32, reason: Counter, bytes: u64) {
    // aya-log's macros take a context argument they do not use.
    aya_log_ebpf::debug!(
        &(),
        "{}: dropped {} bytes on VNI {}: {}",
        program,
        bytes,
        vni,
        reason.name()
    );
}

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
