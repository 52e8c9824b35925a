//! What the programs return, in one place: every drop is counted (and logged when the
//! kernel log is on) and every pass is counted, for TC and XDP alike. The packet
//! handlers (`container`, `arp`, `encap`, `icmp`, `underlay`) import their verdicts from
//! here, never from each other.
use overlay_common::Counter;

use crate::counters::{count, log_drop, VNI_UNDERLAY};

/// Names the hook in kernel-log drop messages.
const CONTAINER: &str = "container";
const UNDERLAY: &str = "underlay";

/// The one drop path under every verdict below: counted under `reason`, then logged.
#[inline(always)]
fn record_drop(hook: &'static str, vni: u32, reason: Counter, len: u64) {
    count(vni, reason, len);
    log_drop(hook, vni, reason, len);
}

/// TC verdicts: container veths, and the underlay in TC decap mode.
pub mod tc {
    use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};

    use super::{count, record_drop, Counter, CONTAINER, UNDERLAY, VNI_UNDERLAY};

    /// Hands a container's packet to the host stack (gateway traffic, the outside world).
    #[inline(always)]
    pub fn pass_to_host(vni: u32, len: u64) -> i32 {
        count(vni, Counter::PassedToHost, len);
        TC_ACT_OK as i32
    }

    /// Drops a container's packet.
    #[inline(always)]
    pub fn drop(vni: u32, reason: Counter, len: u64) -> i32 {
        record_drop(CONTAINER, vni, reason, len);
        TC_ACT_SHOT as i32
    }

    /// Underlay traffic that is not VXLAN for this node: the host's own business.
    #[inline(always)]
    pub fn underlay_pass(len: u64) -> i32 {
        count(VNI_UNDERLAY, Counter::UnderlayOther, len);
        TC_ACT_OK as i32
    }

    #[inline(always)]
    pub fn underlay_drop(vni: u32, reason: Counter, len: u64) -> i32 {
        record_drop(UNDERLAY, vni, reason, len);
        TC_ACT_SHOT as i32
    }
}

/// XDP verdicts: the underlay in XDP decap mode.
pub mod xdp {
    use aya_ebpf::bindings::xdp_action;

    use super::{count, record_drop, Counter, UNDERLAY, VNI_UNDERLAY};

    /// Underlay traffic that is not VXLAN for this node: the host's own business.
    #[inline(always)]
    pub fn underlay_pass(len: u64) -> u32 {
        count(VNI_UNDERLAY, Counter::UnderlayOther, len);
        xdp_action::XDP_PASS
    }

    #[inline(always)]
    pub fn underlay_drop(vni: u32, reason: Counter, len: u64) -> u32 {
        record_drop(UNDERLAY, vni, reason, len);
        xdp_action::XDP_DROP
    }
}
