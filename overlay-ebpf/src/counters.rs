//! The per-(network slot, reason) packet and byte counters every verdict feeds (the
//! agent sums them over CPUs for its metrics), and the kernel-log line a drop writes when the log
//! is on. Depends on nothing but the maps: the verdicts build on it, not the reverse.
use overlay_common::{counter_index, Counter};

use crate::maps::COUNTERS;

/// The slot under which underlay-scope events are counted before a packet's network is
/// known (keeps the counters bounded whatever VNIs an attacker sends).
pub use overlay_common::SLOT_UNDERLAY;

/// Logs a drop through aya-log (debug level). The agent sets the log level at load time
/// (`--ebpf-log`); when it is off, the verifier removes this path, so it costs nothing.
#[inline(never)]
pub fn log_drop(program: &'static str, slot: u32, reason: Counter, bytes: u64) {
    // aya-log's macros take a context argument they do not use.
    aya_log_ebpf::debug!(
        &(),
        "{}: dropped {} bytes in network slot {}: {}",
        program,
        bytes,
        slot,
        reason.name()
    );
}

/// Adds one packet of `bytes` to (`slot`, `counter`) on this CPU.
#[inline(always)]
pub fn count(slot: u32, counter: Counter, bytes: u64) {
    // An index past the array (a slot the agent never hands out) finds no entry.
    if let Some(value) = COUNTERS.get_ptr_mut(counter_index(slot, counter)) {
        // SAFETY: this CPU's value of an array element; only this CPU writes it.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += bytes;
        }
    }
}
