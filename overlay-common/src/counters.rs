//! Data-plane counters: per CPU, per (network slot, counter), packets and bytes.
//!
//! The `COUNTERS` map is a per-CPU array: entry [`counter_index`]`(slot, counter)`. A
//! network's slot is a small number the agent assigns when it writes the network
//! ([`crate::NetworkInfo::slot`]); slot [`SLOT_UNDERLAY`] counts what happens before a
//! packet's network is known. An array index costs the programs a few instructions where
//! a hash keyed by (VNI, counter) cost a hash computation and a bucket walk per packet.

/// Every counter the kernel programs keep. A closed set: the metrics exporter labels by
/// [`Counter::name`], so cardinality stays bounded.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// Underlay frames that were VXLAN for this node (any verdict).
    UnderlayVxlan = 0,
    /// Underlay frames that were not VXLAN for this node, passed to the host untouched.
    UnderlayOther = 1,
    /// Container packets encapsulated towards a remote node.
    Encapsulated = 2,
    /// VXLAN packets decapsulated and delivered to a local endpoint.
    Decapsulated = 3,
    /// Container packets delivered to another container on the same node.
    SwitchedLocal = 4,
    /// ARP requests answered by the data plane.
    ArpReply = 5,
    /// Container packets for the gateway or outside the overlay, passed to the host stack.
    PassedToHost = 6,
    /// ICMP "fragmentation needed" messages sent back to a container.
    FragNeededSent = 7,
    DropSpoofed = 8,
    DropUnknownVtep = 9,
    DropUnknownVni = 10,
    DropNoEndpoint = 11,
    DropCrossNetwork = 12,
    DropMtuExceeded = 13,
    DropMalformed = 14,
    /// A packet the data plane could not rewrite (a helper failed); dropped.
    DropInternal = 15,
}

impl Counter {
    /// How many counters there are: the stride of one slot in the `COUNTERS` array.
    pub const COUNT: u32 = 16;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::UnderlayVxlan,
        Counter::UnderlayOther,
        Counter::Encapsulated,
        Counter::Decapsulated,
        Counter::SwitchedLocal,
        Counter::ArpReply,
        Counter::PassedToHost,
        Counter::FragNeededSent,
        Counter::DropSpoofed,
        Counter::DropUnknownVtep,
        Counter::DropUnknownVni,
        Counter::DropNoEndpoint,
        Counter::DropCrossNetwork,
        Counter::DropMtuExceeded,
        Counter::DropMalformed,
        Counter::DropInternal,
    ];

    pub const fn from_u32(value: u32) -> Option<Counter> {
        if (value as usize) < Self::ALL.len() {
            Some(Self::ALL[value as usize])
        } else {
            None
        }
    }

    /// A stable snake_case name (used as a metrics label value and in `status`).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::UnderlayVxlan => "underlay_vxlan",
            Counter::UnderlayOther => "underlay_other",
            Counter::Encapsulated => "encapsulated",
            Counter::Decapsulated => "decapsulated",
            Counter::SwitchedLocal => "switched_local",
            Counter::ArpReply => "arp_reply",
            Counter::PassedToHost => "passed_to_host",
            Counter::FragNeededSent => "frag_needed_sent",
            Counter::DropSpoofed => "spoofed",
            Counter::DropUnknownVtep => "unknown_vtep",
            Counter::DropUnknownVni => "unknown_vni",
            Counter::DropNoEndpoint => "no_endpoint",
            Counter::DropCrossNetwork => "cross_network",
            Counter::DropMtuExceeded => "mtu_exceeded",
            Counter::DropMalformed => "malformed",
            Counter::DropInternal => "internal",
        }
    }

    /// Whether this counter counts dropped packets.
    pub const fn is_drop(self) -> bool {
        (self as u32) >= (Counter::DropSpoofed as u32)
    }
}

/// The counter slot of everything that happens before a packet's network is known
/// (e.g. a malformed underlay frame); networks get slots from 1 on.
pub const SLOT_UNDERLAY: u32 = 0;

/// Index of (`slot`, `counter`) in the `COUNTERS` array.
pub const fn counter_index(slot: u32, counter: Counter) -> u32 {
    slot * Counter::COUNT + counter as u32
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_u32_round_trips_every_counter() {
        for c in Counter::ALL {
            assert_eq!(Counter::from_u32(c as u32), Some(c));
        }
        assert_eq!(Counter::from_u32(Counter::ALL.len() as u32), None);
    }

    #[test]
    fn counter_indexes_of_two_slots_do_not_overlap() {
        let last_of_underlay = counter_index(SLOT_UNDERLAY, Counter::DropInternal);
        assert_eq!(last_of_underlay, Counter::COUNT - 1);
        assert_eq!(counter_index(1, Counter::UnderlayVxlan), Counter::COUNT);
    }

    #[test]
    fn drop_counters_are_exactly_the_drop_reasons() {
        let drops: usize = Counter::ALL.iter().filter(|c| c.is_drop()).count();
        assert_eq!(drops, 8);
        assert!(!Counter::PassedToHost.is_drop());
    }
}
