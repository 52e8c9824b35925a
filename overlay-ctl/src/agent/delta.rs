//! Applying a batch of changed endpoint and IPAM keys without the full path: the
//! addresses the batch touched are judged again with the record rules
//! ([`records::parse_snapshot`] on those addresses' claimants, their IPAM keys and the
//! networks), and only their ENDPOINTS entries are written. The cost of a change is the
//! change (and the networks), never the cluster's other endpoints.
//!
//! What only the full path can judge (a network, node or config change, an endpoint this
//! node created, a store that is not trusted, names served for a touched network) is
//! left to it: [`Agent::apply_changes`] then answers [`DeltaOutcome::Full`]. A record
//! naming this node that this node did not create (no local record: a leftover, another
//! tool's write) gets no entry, as in the full plan, and is applied here.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Instant,
};

use overlay_common::EndpointKey;
use tracing::{debug, warn};

use super::{
    lock,
    mirror::{Address, Mirror, Scope},
    Agent,
};
use crate::{
    dataplane::{datapath::DatapathError, forwarding::ForwardingMaps, map_values},
    store::identity::Trust,
    store::records::{self, Rejection, View},
    store::{ClusterState, Endpoint},
};

/// What [`Agent::apply_changes`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DeltaOutcome {
    /// Applied: the maps hold the new state.
    Applied,
    /// Not applicable on its own: take the full path.
    Full,
}

/// The touched keys judged again.
#[derive(Debug, Default)]
pub(super) struct Judged {
    /// The valid endpoints at the touched addresses.
    pub endpoints: Vec<Endpoint>,
    /// The rejections among `keys`.
    pub rejected: Vec<Rejection>,
    /// Every key judged again (their earlier rejections are replaced).
    pub keys: BTreeSet<String>,
}

/// Judges the claimants of the touched addresses, their IPAM keys and the changed keys,
/// against the networks, with the record rules of a full read.
pub(super) fn judge_scope(mirror: &Mirror, prefix: &str, scope: &Scope, view: View<'_>) -> Judged {
    let mut keys = scope.keys.clone();
    for address in &scope.addresses {
        keys.extend(mirror.claimants(address).map(str::to_string));
        keys.insert(mirror.allocation_key(address));
    }
    let mut pairs: Vec<_> = mirror
        .section_pairs("networks")
        .chain(mirror.section_pairs("vni"))
        .collect();
    pairs.extend(keys.iter().filter_map(|k| mirror.get(k)));
    let snapshot = records::parse_snapshot(prefix, pairs, view);
    let rejected = (snapshot.rejected.into_iter())
        .filter(|r| keys.contains(&r.key))
        .collect();
    Judged {
        endpoints: snapshot.state.endpoints,
        rejected,
        keys,
    }
}

/// Where remote endpoints go: each network's VNI, each live node's VTEP.
#[derive(Debug, Default)]
pub(super) struct Placement {
    vni_of: BTreeMap<String, u32>,
    vtep_of: BTreeMap<String, Ipv4Addr>,
}

impl Placement {
    pub fn of(state: &ClusterState) -> Self {
        Self {
            vni_of: (state.networks.iter())
                .map(|n| (n.name.clone(), n.vni))
                .collect(),
            vtep_of: (state.nodes.iter())
                .map(|n| (n.name.clone(), n.vtep))
                .collect(),
        }
    }
}

/// What [`write_addresses`] changed in the endpoint map.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Written {
    pub upserted: usize,
    pub removed: usize,
    /// Entries added minus entries removed.
    pub net: isize,
}

/// Makes the ENDPOINTS entries of the touched addresses what the full plan would make
/// them ([`super::reconcile::plan`]): the valid endpoint at its node's VTEP while the
/// node is live, else no entry; a local endpoint's entry is never displaced. A valid
/// endpoint on `node` (this one) that reaches here has no local record (see
/// [`Agent::apply_changes`]): the full path forwards for none of those.
pub(super) fn write_addresses(
    maps: &mut dyn ForwardingMaps,
    addresses: &BTreeSet<Address>,
    valid: &[Endpoint],
    placement: &Placement,
    node: &str,
) -> Result<Written, DatapathError> {
    let mut written = Written::default();
    // A batch can touch thousands of addresses (an agent catching up): one lookup each.
    let valid_at: std::collections::HashMap<(&str, Ipv4Addr), &Endpoint> = (valid.iter())
        .map(|e| ((e.network.as_str(), e.ip), e))
        .collect();
    for (network, ip) in addresses {
        let Some(&vni) = placement.vni_of.get(network) else {
            continue;
        };
        let key = EndpointKey::new(vni, *ip);
        let want = (valid_at.get(&(network.as_str(), *ip)))
            .filter(|e| e.node != node)
            .and_then(|e| {
                let vtep = placement.vtep_of.get(&e.node)?;
                Some(map_values::remote_endpoint(e, *vtep))
            });
        let have = maps.endpoint(key)?;
        if have.is_some_and(|v| v.is_local()) || have == want {
            continue;
        }
        match want {
            Some(value) => {
                maps.upsert_endpoint(key, &value)?;
                written.upserted += 1;
                written.net += isize::from(have.is_none());
            }
            None => {
                maps.remove_endpoint(key)?;
                written.removed += 1;
                written.net -= 1;
            }
        }
    }
    Ok(written)
}

/// Keeps, for every touched address, the endpoints judged valid there (none: the
/// address is free now), over what earlier batches found there.
pub(super) fn note_endpoints_at(
    changed: &mut HashMap<Address, Vec<Endpoint>>,
    addresses: &BTreeSet<Address>,
    valid: &[Endpoint],
) {
    for address in addresses {
        let at = (valid.iter())
            .filter(|e| e.network == address.0 && e.ip == address.1)
            .cloned()
            .collect();
        changed.insert(address.clone(), at);
    }
}

/// `state` with the endpoints at the addresses of `changed` replaced by the ones judged
/// there: the full judgement of the records, when `state` was the judgement before the
/// changes and `changed` what [`judge_scope`] found at every address they touched.
/// Endpoint order is the judgement's, by (network, id).
pub(super) fn with_endpoints_at(
    state: &ClusterState,
    changed: &HashMap<Address, Vec<Endpoint>>,
) -> ClusterState {
    let mut endpoints: Vec<Endpoint> = (state.endpoints.iter())
        .filter(|e| !changed.contains_key(&(e.network.clone(), e.ip)))
        .cloned()
        .collect();
    endpoints.extend(changed.values().flatten().cloned());
    endpoints.sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
    ClusterState {
        networks: state.networks.clone(),
        nodes: state.nodes.clone(),
        endpoints,
        vxlan_port: state.vxlan_port,
    }
}

impl Agent {
    /// Applies a batch of changes that [`Mirror::take_changes`] found to touch only
    /// endpoint and IPAM keys of other nodes; see the module documentation.
    pub(super) async fn apply_changes(&self, scope: &Scope) -> DeltaOutcome {
        if scope.full {
            return DeltaOutcome::Full;
        }
        if !scope.own.is_empty() {
            let records = self.local_records();
            if scope.own.iter().any(|own| records.contains_key(own)) {
                // This node's own container: its entry comes from its local record.
                return DeltaOutcome::Full;
            }
        }
        let _run = self.reconciler.lock().await;
        let started = Instant::now();
        if !matches!(
            lock(&self.identity).trust(),
            Trust::Trusted | Trust::Unknown
        ) {
            return DeltaOutcome::Full;
        }
        let vtep = self.vtep();
        let (judged, placement, fresh) = {
            let mirror = lock(&self.mirror);
            let mut cluster = lock(&self.cluster);
            let Some(desired) = cluster.desired.as_ref() else {
                return DeltaOutcome::Full;
            };
            let serves_touched = self.names.is_some()
                && (scope.addresses.iter()).any(|(n, _)| cluster.local_networks.contains(n));
            if serves_touched {
                // The names of a network with a container here: the resolver's table is
                // rebuilt by the full path.
                return DeltaOutcome::Full;
            }
            let placement = Placement::of(desired);
            let view = View::Node {
                name: self.node(),
                vtep,
                links: &cluster.links,
            };
            let judged = judge_scope(&mirror, self.store.prefix(), scope, view);
            let fresh = (cluster.rejections).replace_keys(&judged.keys, judged.rejected.clone());
            // Kept before the maps are written: if that fails, the full path that follows
            // judges the mirror and sets `desired` afresh.
            note_endpoints_at(
                &mut cluster.endpoints_changed,
                &scope.addresses,
                &judged.endpoints,
            );
            (judged, placement, fresh)
        };
        let written = {
            let mut plane = lock(&self.plane);
            let Some(plane) = plane.datapath.as_mut() else {
                return DeltaOutcome::Full;
            };
            write_addresses(
                plane.maps(),
                &scope.addresses,
                &judged.endpoints,
                &placement,
                self.node(),
            )
        };
        self.report_rejections(&fresh);
        match written {
            Ok(written) => {
                self.status.send_modify(|status| {
                    let remote = &mut status.forwarding.remote_endpoints;
                    *remote = remote.saturating_add_signed(written.net);
                });
                self.metrics.record_reconcile(true, started.elapsed());
                debug!(keys = scope.keys.len(), ?written, elapsed = ?started.elapsed(), "changes applied");
                DeltaOutcome::Applied
            }
            Err(e) => {
                warn!(error = %crate::agent::apply::error_chain(&e), "cannot apply the changes on their own; applying the whole state");
                DeltaOutcome::Full
            }
        }
    }
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
