//! Applying a batch of changed endpoint and IPAM keys without the full path: the
//! addresses the batch touched are judged again with the record rules
//! ([`records::parse_snapshot`] on those addresses' claimants, their IPAM keys and the
//! networks), and only their ENDPOINTS entries are written. The cost of a change is the
//! change (and the networks), never the cluster's other endpoints.
//!
//! A change to another node's record (a node joining, leaving, re-registering) is
//! applied here too: the node records are judged again (hundreds at most), and only the
//! VTEPs and the entries of endpoints on a node that joined, left or moved are written.
//! When a hundred nodes start at once, every other agent sees a hundred joins: judging
//! the whole cluster for each made a cluster's reboot cost every agent a hundred full
//! judgements, and the load that caused starved the renewals of the nodes already up.
//!
//! What only the full path can judge (a network, config or VNI change, this node's own
//! record, an endpoint this node created, a store that is not trusted, names served for
//! a touched network) is
//! left to it: [`Agent::apply_changes`] then answers [`DeltaOutcome::Full`]. A record
//! naming this node that this node did not create (no local record: a leftover, another
//! tool's write) gets no entry, as in the full plan, and is applied here.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    time::Instant,
};

use overlay_common::EndpointKey;
use tracing::{debug, warn};

use super::{
    lock,
    mirror::{Address, Mirror, Scope, Stored},
    reconcile, Agent,
};
use crate::{
    dataplane::{datapath::DatapathError, forwarding::ForwardingMaps, map_values},
    store::identity::Trust,
    store::records::{self, Rejection, View},
    store::{backend::Record, ClusterState, Endpoint, Network, NodeInfo},
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
    pub fn new(networks: &[Network], nodes: &[NodeInfo]) -> Self {
        Self {
            vni_of: (networks.iter()).map(|n| (n.name.clone(), n.vni)).collect(),
            vtep_of: (nodes.iter()).map(|n| (n.name.clone(), n.vtep)).collect(),
        }
    }
}

/// What the changes applied on their own found since the desired state was last set:
/// `desired` with these in place is the full judgement of the mirror, so a resync plans
/// from it without judging twenty thousand records again ([`Kept::apply_in_place`]).
#[derive(Clone, Debug, Default)]
pub(super) struct Kept {
    /// The endpoints judged valid at every address the changes touched (none: the
    /// address is free now).
    pub endpoints: HashMap<Address, Vec<Endpoint>>,
    /// The live nodes, when a change to node records was judged.
    pub nodes: Option<Vec<NodeInfo>>,
}

impl Kept {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.nodes.is_none()
    }

    /// Keeps, for every touched address, the endpoints judged valid there, over what
    /// earlier batches found there.
    pub fn note_endpoints_at(&mut self, addresses: &BTreeSet<Address>, valid: &[Endpoint]) {
        for address in addresses {
            let at = (valid.iter())
                .filter(|e| e.network == address.0 && e.ip == address.1)
                .cloned()
                .collect();
            self.endpoints.insert(address.clone(), at);
        }
    }

    /// Takes in what a batch found: the endpoints at every address it wrote, and the
    /// nodes when it judged them.
    pub fn take_in(&mut self, batch: &Batch) {
        self.note_endpoints_at(&batch.addresses, &batch.valid);
        if let Some(nodes) = &batch.nodes {
            self.nodes = Some(nodes.clone());
        }
    }

    /// The live nodes now: the last judged, else `state`'s.
    pub fn nodes<'a>(&'a self, state: &'a ClusterState) -> &'a [NodeInfo] {
        self.nodes.as_deref().unwrap_or(&state.nodes)
    }

    /// Whether the endpoints at `endpoint`'s address were judged again (the address is
    /// looked up first, which needs no copy of the network's name).
    fn replaces(&self, ips: &HashSet<Ipv4Addr>, endpoint: &Endpoint) -> bool {
        ips.contains(&endpoint.ip)
            && (self.endpoints).contains_key(&(endpoint.network.clone(), endpoint.ip))
    }

    fn ips(&self) -> HashSet<Ipv4Addr> {
        self.endpoints.keys().map(|(_, ip)| *ip).collect()
    }

    /// The valid endpoints placed on one of `nodes` now (`state` with the kept endpoints
    /// in place).
    fn endpoints_on(&self, state: &ClusterState, nodes: &BTreeSet<&str>) -> Vec<Endpoint> {
        let on = |e: &&Endpoint| nodes.contains(e.node.as_str());
        // Few endpoints are on the nodes: looked up one by one, not through a set of
        // every kept address (building it cost more than the rest of a node's join).
        let mut found: Vec<Endpoint> = (state.endpoints.iter())
            .filter(on)
            .filter(|e| !(self.endpoints).contains_key(&(e.network.clone(), e.ip)))
            .cloned()
            .collect();
        found.extend(self.endpoints.values().flatten().filter(on).cloned());
        found
    }

    /// A copy of `state` with [`Kept::apply_in_place`] done on it.
    #[cfg(test)]
    pub fn applied_to(&self, state: &ClusterState) -> ClusterState {
        let mut state = state.clone();
        self.clone().apply_in_place(&mut state);
        state
    }

    /// Puts the kept endpoints and nodes in place in `state`: it becomes the full
    /// judgement of the records, when it was the judgement before the changes and these
    /// are what [`judge_batch`] found. Endpoint order is the judgement's, by (network,
    /// id). In place, and the kept endpoints are moved, not copied: after a cluster's
    /// endpoints were all written, they are all kept, and a copy would double them at
    /// the agent's peak of memory (and leave the copies' space behind).
    pub fn apply_in_place(self, state: &mut ClusterState) {
        let ips = self.ips();
        state.endpoints.retain(|e| !self.replaces(&ips, e));
        if let Some(nodes) = self.nodes {
            state.nodes = nodes;
        }
        state
            .endpoints
            .extend(self.endpoints.into_values().flatten());
        // One sorted run and a short tail: about linear.
        (state.endpoints).sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
    }
}

/// The node records judged again: all of them, as one VTEP's owner depends on the
/// others (the oldest record keeps it).
#[derive(Debug, Default)]
pub(super) struct NodesJudged {
    pub nodes: Vec<NodeInfo>,
    pub rejected: Vec<Rejection>,
    /// Every node key judged (the records now, and the ones the batch deleted).
    pub keys: BTreeSet<String>,
}

/// Judges every node record of the mirror with the record rules of a full read.
pub(super) fn judge_nodes(
    mirror: &Mirror,
    prefix: &str,
    changed: &BTreeSet<String>,
    view: View<'_>,
) -> NodesJudged {
    let pairs: Vec<&Stored> = mirror.section_pairs("nodes").collect();
    let mut keys: BTreeSet<String> = pairs.iter().map(|p| p.key().to_string()).collect();
    keys.extend(changed.iter().cloned());
    let snapshot = records::parse_snapshot(prefix, pairs, view);
    NodesJudged {
        nodes: snapshot.state.nodes,
        rejected: snapshot.rejected,
        keys,
    }
}

/// The nodes that joined, left, or are reached at another VTEP between `old` and `new`.
fn moved_nodes<'a>(old: &'a [NodeInfo], new: &'a [NodeInfo]) -> BTreeSet<&'a str> {
    let vteps = |nodes: &'a [NodeInfo]| -> BTreeMap<&'a str, Ipv4Addr> {
        nodes.iter().map(|n| (n.name.as_str(), n.vtep)).collect()
    };
    let (old, new) = (vteps(old), vteps(new));
    (old.keys().chain(new.keys()))
        .filter(|name| old.get(*name) != new.get(*name))
        .copied()
        .collect()
}

/// One batch of changes judged: what to write into the maps.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The addresses whose ENDPOINTS entries are rewritten: the touched ones, and every
    /// address of an endpoint on a node that joined, left or moved.
    pub addresses: BTreeSet<Address>,
    /// The valid endpoints at `addresses`.
    pub valid: Vec<Endpoint>,
    pub placement: Placement,
    /// The live nodes, when node records changed (the VTEPs map follows them).
    pub nodes: Option<Vec<NodeInfo>>,
    /// The rejections among `keys`.
    pub rejected: Vec<Rejection>,
    /// Every key judged again (their earlier rejections are replaced).
    pub keys: BTreeSet<String>,
}

/// Judges a batch that [`Mirror::take_changes`] scoped: the touched addresses'
/// claimants ([`judge_scope`]) and, when node records changed, every node record
/// ([`judge_nodes`]). `desired` is the last full judgement and `kept` what the batches
/// since found (bring it up to date with [`Kept::take_in`]).
pub(super) fn judge_batch(
    mirror: &Mirror,
    prefix: &str,
    scope: &Scope,
    view: View<'_>,
    desired: &ClusterState,
    kept: &Kept,
) -> Batch {
    let judged = judge_scope(mirror, prefix, scope, view);
    let mut batch = Batch {
        addresses: scope.addresses.clone(),
        valid: judged.endpoints,
        placement: Placement::default(),
        nodes: None,
        rejected: judged.rejected,
        keys: judged.keys,
    };
    if !scope.nodes.is_empty() {
        let nodes = judge_nodes(mirror, prefix, &scope.nodes, view);
        let moved = moved_nodes(kept.nodes(desired), &nodes.nodes);
        // The touched addresses were judged above.
        let on_moved: Vec<Endpoint> = (kept.endpoints_on(desired, &moved).into_iter())
            .filter(|e| !scope.addresses.contains(&(e.network.clone(), e.ip)))
            .collect();
        batch
            .addresses
            .extend(on_moved.iter().map(|e| (e.network.clone(), e.ip)));
        batch.valid.extend(on_moved);
        batch.rejected.extend(nodes.rejected);
        batch.keys.extend(nodes.keys);
        batch.nodes = Some(nodes.nodes);
    }
    let nodes = batch.nodes.as_deref().unwrap_or(kept.nodes(desired));
    batch.placement = Placement::new(&desired.networks, nodes);
    batch
}

/// What [`write_batch`] changed in the maps.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Written {
    pub upserted: usize,
    pub removed: usize,
    /// Endpoint entries added minus entries removed.
    pub net: isize,
    /// VTEP entries written or removed.
    pub vteps: usize,
}

/// Writes a judged batch: the VTEPs of the live nodes first (a node that joined is
/// known before endpoints point at it), the touched endpoint entries, then the VTEPs of
/// nodes gone. This node's VTEP is always a local one, as in the full plan.
pub(super) fn write_batch(
    maps: &mut dyn ForwardingMaps,
    batch: &Batch,
    node: &str,
    vtep: Ipv4Addr,
) -> Result<Written, DatapathError> {
    let wanted = (batch.nodes.as_deref()).map(|nodes| reconcile::vteps(nodes, vtep));
    let have = match wanted {
        Some(_) => maps.vteps()?,
        None => BTreeMap::new(),
    };
    let mut vteps = 0;
    for (address, info) in wanted.iter().flatten() {
        if have.get(address) != Some(info) {
            maps.upsert_vtep(*address, info)?;
            vteps += 1;
        }
    }
    let mut written =
        write_addresses(maps, &batch.addresses, &batch.valid, &batch.placement, node)?;
    if let Some(wanted) = &wanted {
        for address in have.keys().filter(|a| !wanted.contains_key(*a)) {
            maps.remove_vtep(*address)?;
            vteps += 1;
        }
    }
    written.vteps = vteps;
    Ok(written)
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

impl Agent {
    /// Applies a batch of changes that [`Mirror::take_changes`] found to touch only
    /// endpoint and IPAM keys and other nodes' records; see the module documentation.
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
        let (batch, fresh) = {
            let mirror = lock(&self.mirror);
            let mut cluster = lock(&self.cluster);
            let cluster = &mut *cluster;
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
            let view = View::Node {
                name: self.node(),
                vtep,
                links: &cluster.links,
            };
            let batch = judge_batch(
                &mirror,
                self.store.prefix(),
                scope,
                view,
                desired,
                &cluster.kept,
            );
            // Kept before the maps are written: if that fails, the full path that
            // follows judges the mirror and sets `desired` afresh.
            cluster.kept.take_in(&batch);
            if let Some(during) = cluster.kept_during_fetch.as_mut() {
                during.take_in(&batch);
            }
            let fresh = (cluster.rejections).replace_keys(&batch.keys, batch.rejected.clone());
            (batch, fresh)
        };
        let written = {
            let mut plane = lock(&self.plane);
            let Some(plane) = plane.datapath.as_mut() else {
                return DeltaOutcome::Full;
            };
            write_batch(plane.maps(), &batch, self.node(), vtep)
        };
        self.report_rejections(&fresh);
        match written {
            Ok(written) => {
                self.status.send_modify(|status| {
                    let forwarding = &mut status.forwarding;
                    let remote = &mut forwarding.remote_endpoints;
                    *remote = remote.saturating_add_signed(written.net);
                    if let Some(nodes) = &batch.nodes {
                        forwarding.members = nodes.len();
                    }
                });
                self.metrics.record_reconcile(true, started.elapsed());
                debug!(keys = scope.keys.len(), nodes = scope.nodes.len(), ?written, elapsed = ?started.elapsed(), "changes applied");
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
