//! Egress on this node: every reconcile brings the `overlay_egress` nftables table
//! ([`crate::dataplane::egress`]) in step with the cluster's networks: one rule per
//! network, masquerading (or, with `--egress none`, dropping and counting) its
//! containers' traffic to destinations outside every overlay subnet.
//!
//! What the agent owns is that one table and nothing else: it is rewritten (in one
//! nf_tables transaction) only when the networks' subnets or modes change, verified
//! against the kernel on the periodic resync (so a table an operator flushed comes
//! back), removed when the last network is deleted and when an `--ephemeral` agent
//! exits. A plain stop leaves it, as it leaves the pinned data plane: containers keep
//! reaching the outside while the agent restarts, and the next agent recognises it.
//!
//! A failure (`nft` missing, a kernel without nf_tables) never fails the reconcile: the
//! overlay itself does not depend on it. It is logged once, shown by `status` and the
//! `overlay_egress_in_step` metric, and retried by every run until it succeeds.
use std::collections::BTreeMap;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{lock, metrics::Family, Agent};
use crate::{
    dataplane::egress::{self, DropCount, EgressMode, EgressNat, EgressRule},
    store::Network,
};

/// What the agent knows of its table between runs (behind its own lock, taken by
/// reconcile runs, `status` and scrapes for the few milliseconds `nft` takes).
#[derive(Debug, Default)]
pub(super) struct EgressState {
    nat: EgressNat,
    /// The rules and overlay subnets last brought into the kernel: a run with the same
    /// ones leaves the kernel alone unless it verifies.
    applied: Option<(Vec<EgressRule>, Vec<Ipv4Network>)>,
    /// Why the last attempt failed (`None`: in step).
    error: Option<String>,
    /// Whether a `none` rule was ever installed: until then there are no drops to read,
    /// and `status` and scrapes need not run `nft`.
    counting: bool,
}

/// Egress as `overlay-ctl status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressStatus {
    /// The nftables table the agent owns (`nft list table ip overlay_egress`).
    pub table: String,
    /// Each network's mode as last installed (empty: no table).
    pub networks: BTreeMap<String, EgressMode>,
    /// Packets of `none` networks dropped on their way out, by network (since the agent
    /// started, including rules replaced since).
    pub dropped: BTreeMap<String, DropCount>,
    /// Why the table is not in step with the networks, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The table's rules for `networks` (every network of the cluster has one on every node),
/// and the overlay subnets none of them may touch.
fn desired(networks: &[Network]) -> (Vec<EgressRule>, Vec<Ipv4Network>) {
    let rules = networks
        .iter()
        .map(|n| EgressRule {
            network: n.name.clone(),
            vni: n.vni,
            subnet: n.subnet,
            mode: n.egress,
        })
        .collect();
    let subnets = networks.iter().map(|n| n.subnet).collect();
    (rules, subnets)
}

/// Runs `f`, which waits for an `nft` subprocess, without stalling the other tasks of a
/// multi-threaded runtime's worker.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Agent {
    /// Brings the egress table in step with the networks of the last cluster state read
    /// (the latest, whichever run calls: runs that finish out of order cannot install
    /// an older state last). Without `verify`, networks equal to those last applied
    /// do not even read the kernel.
    pub(super) fn sync_egress(&self, verify: bool) {
        let mut state = lock(&self.egress);
        // Read under the egress lock, so the last to take it applies the latest.
        let networks = lock(&self.cluster)
            .desired
            .as_ref()
            .map(|cluster| cluster.networks.to_vec());
        let Some(networks) = networks else {
            return; // Nothing known yet: keep the table as it is.
        };
        let wanted = desired(&networks);
        let unchanged = state.error.is_none() && state.applied.as_ref() == Some(&wanted);
        if unchanged && !verify {
            return;
        }
        let result = blocking(|| state.nat.ensure(&wanted.0, &wanted.1));
        match result {
            Ok(applied) => {
                debug!(?applied, rules = wanted.0.len(), "egress table checked");
                if state.error.take().is_some() {
                    info!(table = egress::TABLE, "egress rules in step again");
                }
                state.counting |= wanted.0.iter().any(|r| r.mode == EgressMode::None);
                state.applied = Some(wanted);
            }
            Err(e) => {
                let message = e.to_string();
                if state.error.as_deref() != Some(message.as_str()) {
                    warn!(table = egress::TABLE, error = %message, "cannot install the egress rules; containers may not reach destinations outside the overlay (retried every reconcile)");
                }
                state.error = Some(message);
                state.applied = None;
            }
        }
    }

    /// The egress part of `status` and of a scrape (reads the drop counters from the
    /// kernel).
    pub(super) fn egress_status(&self) -> EgressStatus {
        let state = lock(&self.egress);
        let mut status = EgressStatus {
            table: egress::TABLE.to_string(),
            networks: (state.applied.iter())
                .flat_map(|(rules, _)| rules.iter().map(|r| (r.network.clone(), r.mode)))
                .collect(),
            dropped: BTreeMap::new(),
            error: state.error.clone(),
        };
        if !state.counting {
            return status;
        }
        match blocking(|| state.nat.drops()) {
            Ok(dropped) => status.dropped = dropped,
            Err(e) if status.error.is_none() => status.error = Some(e.to_string()),
            Err(_) => {}
        }
        status
    }

    /// Deletes the table (an `--ephemeral` agent's exit).
    pub(super) fn remove_egress(&self) {
        let mut state = lock(&self.egress);
        match blocking(|| state.nat.remove()) {
            Ok(removed) => {
                state.applied = None;
                if removed {
                    info!(table = egress::TABLE, "egress rules removed");
                }
            }
            Err(e) => {
                warn!(table = egress::TABLE, error = %e, "cannot remove the egress rules")
            }
        }
    }
}

/// `overlay_egress_dropped_packets_total`, `overlay_egress_dropped_bytes_total` (by
/// network) and `overlay_egress_in_step`.
pub(super) fn render_metrics(out: &mut String, status: &EgressStatus) {
    type Pick = fn(&DropCount) -> u64;
    let packets: Pick = |d| d.packets;
    let bytes: Pick = |d| d.bytes;
    for (name, help, pick) in [
        (
            "overlay_egress_dropped_packets_total",
            "Packets of egress-none networks dropped on their way out of the overlay, by network.",
            packets,
        ),
        (
            "overlay_egress_dropped_bytes_total",
            "Bytes of egress-none networks dropped on their way out of the overlay, by network.",
            bytes,
        ),
    ] {
        let mut family = Family::new(out, name, "counter", help);
        for (network, count) in &status.dropped {
            family.sample(name, &[("network", network)], pick(count));
        }
    }
    let name = "overlay_egress_in_step";
    Family::new(
        out,
        name,
        "gauge",
        "1 when the egress nftables table matches the networks, 0 when it could not be installed.",
    )
    .sample(name, &[], u8::from(status.error.is_none()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_network_gets_a_rule_and_every_subnet_is_excluded() {
        let network = |name: &str, subnet: &str, egress| Network {
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            gateway: "10.0.0.1".parse().unwrap(),
            vni: 9,
            mtu: 1450,
            egress,
        };
        let (rules, subnets) = desired(&[
            network("a", "10.1.0.0/24", EgressMode::Masquerade),
            network("b", "10.2.0.0/24", EgressMode::None),
        ]);
        let modes: Vec<_> = rules.iter().map(|r| (r.network.as_str(), r.mode)).collect();
        assert_eq!(
            modes,
            [("a", EgressMode::Masquerade), ("b", EgressMode::None)]
        );
        assert_eq!(subnets.len(), 2);
    }

    #[test]
    fn drops_and_health_are_exported() {
        let mut status = EgressStatus {
            error: Some("nft missing".into()),
            ..Default::default()
        };
        status.dropped.insert(
            "net2".into(),
            DropCount {
                packets: 3,
                bytes: 252,
            },
        );
        let mut out = String::new();
        render_metrics(&mut out, &status);
        assert!(out.contains("overlay_egress_dropped_packets_total{network=\"net2\"} 3\n"));
        assert!(out.contains("overlay_egress_dropped_bytes_total{network=\"net2\"} 252\n"));
        assert!(out.contains("overlay_egress_in_step 0\n"));
    }
}
