//! What the programs return, in one place: every drop is counted (and logged when the
//! kernel log is on) and every pass is counted, for TC and XDP alike. The packet
//! handlers (`container`, `arp`, `encap`, `icmp`, `underlay`) import their verdicts from
//! here, never from each other.
use overlay_common::Counter;

use crate::counters::{count, log_drop, SLOT_UNDERLAY};

/// Names the hook in kernel-log drop messages.
const CONTAINER: &str = "container";
const UNDERLAY: &str = "underlay";

/// The one drop path under every verdict below: counted under `reason`, then logged.
#[inline(always)]
fn record_drop(hook: &'static str, slot: u32, reason: Counter, len: u64) {
    count(slot, reason, len);
    log_drop(hook, slot, reason, len);
}

/// TC verdicts: container veths, and the underlay in TC decap mode.
pub mod tc {
    use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};

    use super::{count, record_drop, Counter, CONTAINER, SLOT_UNDERLAY, UNDERLAY};

    /// Hands a container's packet to the host stack (gateway traffic, the outside world).
    #[inline(always)]
    pub fn pass_to_host(slot: u32, len: u64) -> i32 {
        count(slot, Counter::PassedToHost, len);
        TC_ACT_OK as i32
    }

    /// Drops a container's packet.
    #[inline(always)]
    pub fn drop(slot: u32, reason: Counter, len: u64) -> i32 {
        record_drop(CONTAINER, slot, reason, len);
        TC_ACT_SHOT as i32
    }

    /// Underlay traffic that is not VXLAN for this node: the host's own business.
    #[inline(always)]
    pub fn underlay_pass(len: u64) -> i32 {
        count(SLOT_UNDERLAY, Counter::UnderlayOther, len);
        TC_ACT_OK as i32
    }

    #[inline(always)]
    pub fn underlay_drop(slot: u32, reason: Counter, len: u64) -> i32 {
        record_drop(UNDERLAY, slot, reason, len);
        TC_ACT_SHOT as i32
    }
}

/// XDP verdicts: the underlay in XDP decap mode.
pub mod xdp {
    use aya_ebpf::bindings::xdp_action;

    use super::{count, record_drop, Counter, SLOT_UNDERLAY, UNDERLAY};

    /// Underlay traffic that is not VXLAN for this node: the host's own business.
    #[inline(always)]
    pub fn underlay_pass(len: u64) -> u32 {
        count(SLOT_UNDERLAY, Counter::UnderlayOther, len);
        xdp_action::XDP_PASS
    }

    #[inline(always)]
    pub fn underlay_drop(slot: u32, reason: Counter, len: u64) -> u32 {
        record_drop(UNDERLAY, slot, reason, len);
        xdp_action::XDP_DROP
    }
}
