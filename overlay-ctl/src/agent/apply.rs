//! Applying a plan: makes the data-plane maps and the container attachments equal to
//! [`DesiredMaps`], entry by entry, and reports what changed and what could not
//! ([`ApplyReport`]). Applying is idempotent: running it twice changes nothing the second
//! time, and entries nobody asked for are removed.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use overlay_common::{map_names as names, EndpointKey};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    agent::reconcile::DesiredMaps, dataplane::datapath::DatapathError,
    dataplane::forwarding::ForwardingMaps,
};

/// How many failures an [`ApplyReport`] describes in full.
const MAX_REPORTED_ERRORS: usize = 8;

/// What one apply changed, and what it could not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ApplyReport {
    pub upserted: usize,
    pub removed: usize,
    pub attached: usize,
    pub detached: usize,
    /// Map updates and attachments that failed (each independently of the others).
    #[serde(default)]
    pub failed: usize,
    /// Wanted entries that are not in their map after this run, by map.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub missing: BTreeMap<String, usize>,
    /// The first failures, each with what it was for and the kernel's errno.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        self.upserted + self.removed + self.attached + self.detached > 0
    }

    /// One line about the failures, `None` when there were none.
    pub fn failure_summary(&self) -> Option<String> {
        if self.failed == 0 {
            return None;
        }
        let missing: Vec<String> = self
            .missing
            .iter()
            .map(|(map, n)| format!("{map} {n}"))
            .collect();
        Some(format!(
            "{} map update(s) failed (missing entries: {}); first: {}",
            self.failed,
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            },
            self.errors.first().map(String::as_str).unwrap_or("-")
        ))
    }

    fn fail(&mut self, map: Option<&str>, what: impl fmt::Display, error: &DatapathError) {
        self.failed += 1;
        if let Some(map) = map {
            *self.missing.entry(map.to_string()).or_default() += 1;
        }
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(format!("{what}: {}", error_chain(error)));
        }
    }
}

/// An error with all its sources, so the errno of a failed map update shows (aya's own
/// message stops at "`bpf_map_update_elem` failed").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Removes the entries of `current` that `desired` does not have.
fn remove_stale<K: Ord + Copy + fmt::Debug, V>(
    datapath: &mut dyn ForwardingMaps,
    map: &str,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    report: &mut ApplyReport,
    remove: impl Fn(&mut dyn ForwardingMaps, K) -> Result<(), DatapathError>,
) {
    for key in current.keys() {
        if !desired.contains_key(key) {
            match remove(datapath, *key) {
                Ok(()) => report.removed += 1,
                Err(e) => report.fail(None, format_args!("remove {map} {key:?}"), &e),
            }
        }
    }
}

/// Writes the entries of `desired` that differ from `current`; returns the keys whose
/// write failed (each entry is tried, whatever happened to the others).
fn upsert_changed<K: Ord + Copy + fmt::Debug, V: PartialEq + Copy>(
    datapath: &mut dyn ForwardingMaps,
    map: &str,
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    report: &mut ApplyReport,
    upsert: impl Fn(&mut dyn ForwardingMaps, K, V) -> Result<(), DatapathError>,
) -> BTreeSet<K> {
    let mut failed = BTreeSet::new();
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            match upsert(datapath, *key, *value) {
                Ok(()) => report.upserted += 1,
                Err(e) => {
                    report.fail(Some(map), format_args!("write {map} {key:?}"), &e);
                    failed.insert(*key);
                }
            }
        }
    }
    failed
}

/// Makes the maps and the container attachments equal to `desired`, as far as the maps
/// allow. Removals go first (so replacing entries never needs more room than the maps
/// have), then additions; every entry is applied independently, and what fails is
/// counted in the report with its errno, the rest goes on. Order matters for traffic in
/// flight: a removed endpoint's program is detached before its entries go, and a new
/// veth gets its program only once its entries are in (never when they could not be
/// written). Only reading the maps can fail the whole apply.
pub fn apply(
    datapath: &mut dyn ForwardingMaps,
    desired: &DesiredMaps,
    veth_names: &BTreeMap<u32, String>,
) -> Result<ApplyReport, DatapathError> {
    let mut report = ApplyReport::default();
    let mut attached = detach_unwanted(datapath, desired, &mut report);
    let current = DesiredMaps {
        networks: datapath.networks()?,
        subnets: datapath.subnets()?,
        vteps: datapath.vteps()?,
        endpoints: datapath.endpoints()?,
        local_ifaces: datapath.local_ifaces()?,
        cluster: datapath.cluster_config()?,
    };
    remove_all_stale(datapath, &current, desired, &mut report);
    let failed = upsert_all(datapath, &current, desired, &mut report);
    attach_ready(
        datapath,
        desired,
        veth_names,
        &failed,
        &mut attached,
        &mut report,
    );
    if report.changed() {
        info!(
            upserted = report.upserted,
            removed = report.removed,
            attached = report.attached,
            detached = report.detached,
            "data plane maps updated"
        );
    }
    if let Some(summary) = report.failure_summary() {
        warn!("{summary}");
    }
    Ok(report)
}

/// Detaches from veths that are no longer local endpoints; returns the veths still
/// attached.
fn detach_unwanted(
    datapath: &mut dyn ForwardingMaps,
    desired: &DesiredMaps,
    report: &mut ApplyReport,
) -> BTreeSet<u32> {
    let mut attached: BTreeSet<u32> = datapath.attached_containers();
    let pinned: BTreeSet<u32> = datapath.pinned_container_links().into_iter().collect();
    for ifindex in attached.clone().union(&pinned) {
        if !desired.local_ifaces.contains_key(ifindex) {
            match datapath.detach_container(*ifindex) {
                Ok(()) => {
                    report.detached += 1;
                    attached.remove(ifindex);
                }
                Err(e) => report.fail(None, format_args!("detach ifindex {ifindex}"), &e),
            }
        }
    }
    attached
}

/// Removes what `desired` does not have, dependents first.
fn remove_all_stale(
    datapath: &mut dyn ForwardingMaps,
    current: &DesiredMaps,
    desired: &DesiredMaps,
    report: &mut ApplyReport,
) {
    let (have, want) = (current, desired);
    remove_stale(
        datapath,
        names::ENDPOINTS,
        &have.endpoints,
        &want.endpoints,
        report,
        |d, k| d.remove_endpoint(k),
    );
    remove_stale(
        datapath,
        names::LOCAL_IFACES,
        &have.local_ifaces,
        &want.local_ifaces,
        report,
        |d, k| d.remove_local_iface(k),
    );
    remove_stale(
        datapath,
        names::VTEPS,
        &have.vteps,
        &want.vteps,
        report,
        |d, k| d.remove_vtep(k),
    );
    remove_stale(
        datapath,
        names::SUBNETS,
        &have.subnets,
        &want.subnets,
        report,
        |d, k| d.remove_subnet(k),
    );
    remove_stale(
        datapath,
        names::NETWORKS,
        &have.networks,
        &want.networks,
        report,
        |d, k| d.remove_network(k),
    );
}

/// The writes that failed, for [`attach_ready`].
struct FailedWrites {
    local_ifaces: BTreeSet<u32>,
    endpoints: BTreeSet<EndpointKey>,
}

/// Writes additions and changes, what others depend on first.
fn upsert_all(
    datapath: &mut dyn ForwardingMaps,
    current: &DesiredMaps,
    desired: &DesiredMaps,
    report: &mut ApplyReport,
) -> FailedWrites {
    let (have, want) = (current, desired);
    set_cluster_config(datapath, have, want, report);
    upsert_changed(
        datapath,
        names::NETWORKS,
        &have.networks,
        &want.networks,
        report,
        |d, k, v| d.upsert_network(k, &v),
    );
    upsert_changed(
        datapath,
        names::SUBNETS,
        &have.subnets,
        &want.subnets,
        report,
        |d, k, v| d.upsert_subnet(k, v),
    );
    upsert_changed(
        datapath,
        names::VTEPS,
        &have.vteps,
        &want.vteps,
        report,
        |d, k, v| d.upsert_vtep(k, &v),
    );
    let local_ifaces = upsert_changed(
        datapath,
        names::LOCAL_IFACES,
        &have.local_ifaces,
        &want.local_ifaces,
        report,
        |d, k, v| d.upsert_local_iface(k, &v),
    );
    let endpoints = upsert_changed(
        datapath,
        names::ENDPOINTS,
        &have.endpoints,
        &want.endpoints,
        report,
        |d, k, v| d.upsert_endpoint(k, &v),
    );
    FailedWrites {
        local_ifaces,
        endpoints,
    }
}

/// Writes the cluster-wide settings when they changed: from the next packet on, this
/// node encapsulates to and decapsulates only the new VXLAN port.
fn set_cluster_config(
    datapath: &mut dyn ForwardingMaps,
    current: &DesiredMaps,
    desired: &DesiredMaps,
    report: &mut ApplyReport,
) {
    if current.cluster == desired.cluster {
        return;
    }
    match datapath.set_cluster_config(&desired.cluster) {
        Ok(()) => {
            report.upserted += 1;
            let (before, now) = (current.cluster.vxlan_port(), desired.cluster.vxlan_port());
            // A fresh map's zero already meant the default: only a real change is news.
            if before != now {
                info!(vxlan_port = now, before, "VXLAN port changed");
            }
        }
        Err(e) => report.fail(Some(names::CLUSTER), "write CLUSTER", &e),
    }
}

/// Attaches to new local veths whose entries are in place.
fn attach_ready(
    datapath: &mut dyn ForwardingMaps,
    desired: &DesiredMaps,
    veth_names: &BTreeMap<u32, String>,
    failed: &FailedWrites,
    attached: &mut BTreeSet<u32>,
    report: &mut ApplyReport,
) {
    for (ifindex, iface) in &desired.local_ifaces {
        if attached.contains(ifindex) {
            continue;
        }
        let key = EndpointKey {
            vni: iface.vni,
            ip: iface.ip,
        };
        if failed.local_ifaces.contains(ifindex) || failed.endpoints.contains(&key) {
            continue;
        }
        let Some(name) = veth_names.get(ifindex) else {
            continue;
        };
        match datapath.attach_container(name) {
            Ok(_) => {
                attached.insert(*ifindex);
                report.attached += 1;
            }
            Err(e) => report.fail(None, format_args!("attach {name}"), &e),
        }
    }
}
