//! What the agent reports about itself. The control plane's state (store reachability,
//! session, the last reconcile, members and endpoints, rejected records) lives in one
//! [`LiveStatus`], published through one `tokio::sync::watch` channel: the tasks write
//! it, and both `status` ([`AgentStatus`]) and the Prometheus scrape read it, so the two
//! never disagree. Also here: the periodic traffic summary in the log.
use std::{collections::BTreeMap, sync::Arc};

use overlay_common::{Counter, CounterValue};
use tracing::{debug, info, warn};

use super::{
    control::{AgentStatus, ConsulStatus, FeedStatus, MapUsage, ReconcileStatus},
    lock, metrics,
    mtu::UnderlayMtuStatus,
    Agent,
};
use crate::{
    dataplane::datapath,
    dataplane::forwarding::DataPlane,
    store::backend::StoreBackend,
    store::consul::ErrorClass,
    store::records::{RecordKind, RejectReason},
    store::StoreError,
};

/// What the data plane forwards for, as of the last reconcile that applied a state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// Live nodes of the cluster.
    pub members: usize,
    pub local_endpoints: usize,
    pub remote_endpoints: usize,
    /// `network/id` of every local endpoint the data plane forwards for.
    pub attached: Vec<String>,
}

/// The control plane's state, as every task last saw it.
#[derive(Clone, Debug, Default)]
pub struct LiveStatus {
    pub consul_reachable: bool,
    pub consul_error: Option<String>,
    /// The class of `consul_error` (a new class is logged again).
    pub consul_error_class: Option<ErrorClass>,
    /// This node's session, and whether it holds the node key.
    pub session: Option<String>,
    pub registered: bool,
    pub last_reconcile: Option<ReconcileStatus>,
    pub forwarding: Forwarding,
    /// Store records ignored in the last read, in all and by (kind, reason).
    pub rejected_records: usize,
    pub rejected_by_reason: BTreeMap<(RecordKind, RejectReason), u64>,
    /// This node's underlay MTU and the networks it is too small for.
    pub mtu: UnderlayMtuStatus,
    /// What the watch read and applied.
    pub feed: FeedStatus,
}

impl Agent {
    pub(super) fn consul_ok(&self) {
        let mut came_back = false;
        self.status.send_modify(|status| {
            came_back = !status.consul_reachable || status.consul_error_class.is_some();
            status.consul_reachable = true;
            status.consul_error = None;
            status.consul_error_class = None;
        });
        if came_back {
            info!(store = %self.store.describe(), "store reachable and answering");
        }
    }

    /// A failure is logged once when it starts or changes class (and at debug level
    /// while it lasts), under its class's summary: an ACL denial or a rate limit is not
    /// "unreachable". Only an unreachable Consul counts as such in `status`.
    pub(super) fn consul_failed(&self, what: &str, error: &StoreError) {
        let class = error.class();
        let mut started = false;
        self.status.send_modify(|status| {
            started = status.consul_error_class != Some(class);
            status.consul_reachable = class != ErrorClass::Unreachable;
            status.consul_error = Some(error.to_string());
            status.consul_error_class = Some(class);
        });
        let summary = match self.store.kv() {
            StoreBackend::Consul(_) => class.summary().to_string(),
            StoreBackend::Etcd(_) => class.summary().replacen("Consul", "etcd", 1),
        };
        if started {
            warn!(store = %self.store.describe(), error = %error, "{what}: {summary}; the data plane keeps forwarding with the last known state");
        } else {
            debug!(error = %error, "{what}: still {summary}");
        }
        self.metrics.record_consul_error();
    }

    /// The answer to `overlay-ctl status`.
    pub(super) fn status(&self) -> AgentStatus {
        let mut status = self.data_plane_status();
        // Before the status borrow below: reading the drops waits for `nft`.
        status.egress = self.egress_status();
        let identity = lock(&self.identity);
        let live = self.status.borrow();
        status.consul = ConsulStatus {
            addr: match self.store.kv() {
                StoreBackend::Consul(c) => c.addr().to_string(),
                StoreBackend::Etcd(e) => e.endpoints().to_string(),
            },
            store: self.store.describe(),
            prefix: self.store.prefix().to_string(),
            reachable: live.consul_reachable,
            last_error: live.consul_error.clone(),
            session: live.session.clone(),
            registered: live.registered,
        };
        status.last_reconcile = live.last_reconcile.clone();
        status.members = live.forwarding.members;
        status.local_endpoints = live.forwarding.local_endpoints;
        status.remote_endpoints = live.forwarding.remote_endpoints;
        status.attached = live.forwarding.attached.clone();
        status.rejected_records = live.rejected_records;
        status.mtu = live.mtu.clone();
        status.feed = live.feed.clone();
        status.store_trust = identity.trust().name().to_string();
        status.store_detail = identity.detail().map(str::to_string);
        status.cluster_id = identity.cluster().map(|c| c.cluster.clone());
        status
    }

    /// The part of `status` about this node's data plane and options.
    fn data_plane_status(&self) -> AgentStatus {
        let mut plane = lock(&self.plane);
        let (programs, maps) = match plane.datapath.as_mut() {
            Some(datapath) => programs_and_maps(datapath),
            None => Default::default(),
        };
        let vxlan_port = (plane.datapath.as_mut())
            .and_then(|d| d.maps().cluster_config().ok())
            .map(|c| c.vxlan_port());
        let endpoint_map_entries = (maps.iter())
            .find(|m| m.name == overlay_common::map_names::ENDPOINTS)
            .map_or(0, |m| m.entries);
        let underlay = &plane.underlay;
        AgentStatus {
            node: self.node().to_string(),
            pid: std::process::id(),
            iface: underlay.link.name.clone(),
            ifindex: underlay.link.index,
            vtep: Some(underlay.vtep),
            xdp_mode: format!("{:?}", self.options.xdp_mode).to_lowercase(),
            decap: underlay.setup.clone(),
            host_changes: underlay.host_changes.clone(),
            tc_attach: if !self.has_host() {
                "none".into()
            } else if datapath::tcx_supported() {
                "tcx".into()
            } else {
                "clsact (netlink)".into()
            },
            dataplane: self.options.dataplane.as_str().to_string(),
            endpoint_map_entries,
            vxlan_port,
            pin_root: self.options.pin_root.display().to_string(),
            programs,
            maps,
            metrics_addr: self.options.metrics_addr.clone(),
            docker_plugin: (self.options.docker_plugin.as_ref()).map(|p| p.display().to_string()),
            dns: self.names.is_some(),
            ..Default::default()
        }
    }

    /// One Prometheus scrape: counters summed over CPUs right now.
    pub(super) fn render_metrics(&self) -> Result<String, String> {
        let networks: BTreeMap<u32, String> = lock(&self.cluster)
            .desired
            .as_ref()
            .map(|state| {
                state
                    .networks
                    .iter()
                    .map(|n| (n.vni, n.name.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let (counters, occupancy) = {
            let mut plane = lock(&self.plane);
            let plane = plane.datapath.as_mut().ok_or("the agent is stopping")?;
            let counters = match plane.bpf() {
                Some(datapath) => datapath.counters().map_err(|e| e.to_string())?,
                None => BTreeMap::new(),
            };
            let occupancy = plane.maps().map_occupancy();
            (counters, occupancy.map_err(|e| e.to_string())?)
        };
        let store_state = lock(&self.identity).trust().name();
        let egress = self.egress_status();
        let live = self.status.borrow().clone();
        let mut text = metrics::render(&metrics::Scrape {
            counters: &counters,
            networks: &networks,
            occupancy: &occupancy,
            control: &self.metrics,
            status: &live,
            store_state,
            egress: &egress,
        });
        if let Some(names) = &self.names {
            text.push_str(&names.render_metrics());
        }
        Ok(text)
    }

    /// Summarises traffic in the log when counters moved.
    pub(super) async fn stats_loop(self: Arc<Self>) {
        let mut last: BTreeMap<(u32, Counter), CounterValue> = BTreeMap::new();
        let mut ticker = tokio::time::interval(self.options.stats_interval);
        loop {
            ticker.tick().await;
            let now = match (lock(&self.plane).datapath.as_ref())
                .and_then(DataPlane::bpf_ref)
                .map(|d| d.counters())
            {
                Some(Ok(now)) => now,
                Some(Err(e)) => {
                    warn!(error = %e, "cannot read counters");
                    continue;
                }
                None => return,
            };
            log_traffic(&last, &now);
            last = now;
        }
    }
}

fn programs_and_maps(plane: &mut DataPlane) -> (BTreeMap<String, u32>, Vec<MapUsage>) {
    let programs = (plane.bpf_ref().map(|d| d.program_ids()))
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let maps = (plane.maps().map_occupancy())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, entries, capacity)| MapUsage {
            name: name.to_string(),
            entries,
            capacity,
        })
        .collect();
    (programs, maps)
}

/// Logs what moved between two counter readings (each counter at debug level, the
/// totals at info level when there are any).
fn log_traffic(
    last: &BTreeMap<(u32, Counter), CounterValue>,
    now: &BTreeMap<(u32, Counter), CounterValue>,
) {
    let (mut forwarded, mut dropped) = (0u64, 0u64);
    for (key, value) in now {
        let before = last.get(key).copied().unwrap_or_default();
        let delta = value.packets.saturating_sub(before.packets);
        if delta > 0 {
            debug!(
                vni = key.0,
                counter = key.1.name(),
                packets = value.packets,
                bytes = value.bytes,
                "counter"
            );
        }
        if key.1.is_drop() {
            dropped += delta;
        } else {
            forwarded += delta;
        }
    }
    if forwarded + dropped > 0 && !last.is_empty() {
        info!(
            forwarded,
            dropped, "traffic since the last report (packets)"
        );
    }
}
