//! One reconcile run, in stages: read (the cluster state, fresh from the store when asked,
//! narrowed to what this node recorded creating, and the host veths it names), plan
//! ([`reconcile::plan`]), apply ([`apply::apply`]), all under the reconcile lock; then,
//! with the lock released, the follow-up actions the run found (collecting local
//! endpoints whose veth is gone: netlink, namespace and store deletes) and the egress
//! table brought in step with the networks ([`super::egress`]). The run returns
//! a [`ReconcileOutcome`] and publishes it in the agent's status; nothing else learns
//! its result through side effects.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Instant, SystemTime},
};

use tracing::{debug, info, warn};

use super::{
    apply::{self, ApplyReport},
    control::ReconcileStatus,
    gc,
    local_state::LocalEndpoint,
    lock,
    reconcile::{self, ClusterState, HostVeth, LocalNode, Plan},
    status::Forwarding,
    Agent, ReconcilerState,
};
use crate::store::{backend::KvBackend as _, identity, Endpoint};

/// Whether a reconcile run reads the whole store afresh first, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fetch {
    /// No: the last known state is applied.
    No,
    /// Under the reconcile lock, and the read is applied whatever the watch did
    /// meanwhile: for a caller that just wrote to the store and needs the maps to show
    /// it when the run returns (`run`'s request).
    Now,
    /// Before the reconcile lock is taken (the safety net under the feed: at 20,000
    /// endpoints the read and its judgement take hundreds of milliseconds on a busy
    /// host, and the changes the watch applies on their own wait for that lock). What
    /// those changes find meanwhile is kept over the read's state
    /// ([`super::ClusterView`]'s `kept_during_fetch`); a full judgement of the watch's
    /// copy meanwhile drops the read (it may be older).
    Aside,
}

/// What one reconcile run did.
#[derive(Clone, Debug, Default)]
pub(super) struct ReconcileOutcome {
    /// Whether the state came fresh from the store (else the last known one was applied).
    pub fresh: bool,
    pub report: ApplyReport,
    /// What the data plane forwards for after the run (`None`: no cluster state known
    /// yet, the maps were kept as they are).
    pub applied: Option<Forwarding>,
    /// Follow-up actions that failed (each is logged; retried by the next run or pass).
    pub follow_up_failures: usize,
}

/// Work a run found that must not happen under the reconcile lock.
#[derive(Debug)]
enum FollowUp {
    /// A local endpoint whose veth is gone and whose owner will not clean it up.
    Collect {
        record: LocalEndpoint,
        why: &'static str,
    },
}

/// A run's result before its follow-ups.
#[derive(Default)]
struct Pass {
    outcome: ReconcileOutcome,
    follow_ups: Vec<FollowUp>,
}

/// The local endpoints' host veths found on this node, by name and by ifindex.
#[derive(Default)]
struct LocalVeths {
    by_name: BTreeMap<String, HostVeth>,
    names: BTreeMap<u32, String>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Agent {
    /// Applies the cluster state to the maps: after a fresh read of the store when
    /// `fetch` says so (the last known state when it cannot be read), else the last
    /// known state.
    pub(super) async fn reconcile(&self, fetch: Fetch) -> Result<ReconcileOutcome, String> {
        let started = Instant::now();
        let _one_fetch = match fetch {
            Fetch::No => None,
            Fetch::Now | Fetch::Aside => Some(self.fetching.lock().await),
        };
        let aside = match fetch {
            Fetch::Aside => Some(self.fetch_desired(true).await),
            Fetch::No | Fetch::Now => None,
        };
        let pass = {
            let mut state = self.reconciler.lock().await;
            let fetched = match fetch {
                Fetch::No => None,
                Fetch::Now => Some(self.keep_fetched(self.fetch_desired(false).await, false)),
                Fetch::Aside => aside.map(|judged| self.keep_fetched(judged, true)),
            };
            self.reconcile_locked(&mut state, fetched).await
        };
        let result = match pass {
            Ok(Pass {
                mut outcome,
                follow_ups,
            }) => {
                outcome.follow_up_failures = self.run_follow_ups(follow_ups).await;
                // Outside the reconcile lock, like the follow-ups: the maps (and the
                // watch's acknowledgement of them) never wait for `nft`. A fetching run
                // also checks the kernel's copy of the table.
                if self.has_host() {
                    self.sync_egress(fetch != Fetch::No);
                }
                Ok(outcome)
            }
            Err(e) => Err(e),
        };
        self.publish_reconcile(&result, started);
        if let Err(e) = &result {
            warn!(error = %e, "reconcile failed");
        }
        result
    }

    /// The part of a run that holds the reconcile lock: plan and apply, after the fresh
    /// read's state was kept (`fetched`: whether it was, and whether it is new).
    async fn reconcile_locked(
        &self,
        state: &mut ReconcilerState,
        fetched: Option<(bool, bool)>,
    ) -> Result<Pass, String> {
        let (fresh, newer) = fetched.unwrap_or((false, false));
        let pass = self.apply_desired(state).await;
        if newer && pass.is_err() {
            // Not applied after all: nothing for the watch to acknowledge.
            lock(&self.cluster).ack_pending = false;
        }
        let mut pass = pass?;
        pass.outcome.fresh = fresh;
        Ok(pass)
    }

    /// Reads the whole prefix and judges it (`None`: not read, or not to be applied).
    /// `aside`: the read runs outside the reconcile lock, and from here until
    /// [`Agent::keep_fetched`] the changes applied on their own are kept aside too.
    async fn fetch_desired(&self, aside: bool) -> Option<(Arc<ClusterState>, u64)> {
        if aside {
            lock(&self.cluster).kept_during_fetch = Some(Default::default());
        }
        match self.store.kv().list(self.store.prefix()).await {
            Ok(pairs) => {
                self.consul_ok();
                self.check_mirror_identity(identity::find(self.store.prefix(), &pairs));
                let acknowledgements = self.store.keys().applied_all();
                let newest = (pairs.iter())
                    .filter(|p| !p.key.starts_with(&acknowledgements))
                    .map(|p| p.modify_index)
                    .max()
                    .unwrap_or(0);
                self.judge(&pairs).map(|state| (state, newest))
            }
            Err(e) => {
                self.consul_failed("resync", &e);
                None
            }
        }
    }

    /// Keeps a fresh read's judged state as the desired one; for a read taken `aside`,
    /// with what the changes applied on their own found since it started in place, or
    /// not at all when a full judgement of the watch's copy came meanwhile. Returns
    /// whether it was kept, and whether it differs from the last one.
    fn keep_fetched(&self, judged: Option<(Arc<ClusterState>, u64)>, aside: bool) -> (bool, bool) {
        let mut cluster = lock(&self.cluster);
        let during = match aside {
            true => cluster.kept_during_fetch.take(),
            false => Some(Default::default()),
        };
        let (Some((state, newest)), Some(during)) = (judged, during) else {
            return (false, false);
        };
        let newer = cluster.set_desired(state, self.node());
        cluster.kept = during;
        cluster.fresh_read_index = newest;
        // Marked with the state, not after its apply: a watch that reads the same state
        // meanwhile finds it unchanged and must still acknowledge it, once this run
        // (which holds the reconcile lock) has applied it.
        cluster.ack_pending |= newer;
        (true, newer)
    }

    /// A store that came back without its data answers the feed's blocking queries (or
    /// watch) from indexes it has not reached yet only when they time out, so the
    /// watch's copy can keep the old cluster for minutes. Judged beside fresh reads, it
    /// would flip the agent between the two identities. When the cluster id read fresh
    /// (`fresh`) differs from the copy's, the copy is dropped and the feed reads the
    /// store again. Returns whether they differed.
    pub(super) fn check_mirror_identity(&self, fresh: Option<identity::ClusterId>) -> bool {
        let key = identity::cluster_id_key(&self.store);
        let mut mirror = lock(&self.mirror);
        if !mirror.synced() {
            return false;
        }
        let followed = identity::find(self.store.prefix(), mirror.get(&key));
        if fresh == followed {
            return false;
        }
        info!(
            fresh = ?fresh.map(|id| id.incarnation),
            followed = ?followed.map(|id| id.incarnation),
            "the store's identity changed under the watch: following it anew"
        );
        mirror.invalidate();
        drop(mirror);
        self.feed_stale.notify_one();
        true
    }

    /// Reads the one cluster-id key and checks the watch's copy against it (see
    /// [`Agent::check_mirror_identity`]): a store restarted without its data is noticed
    /// within one resync, at the cost of one small read, not a read of the whole store.
    /// Returns whether the store's identity moved (an unreachable store: no).
    pub(super) async fn store_identity_moved(&self) -> bool {
        match self
            .store
            .kv()
            .get(&identity::cluster_id_key(&self.store))
            .await
        {
            Ok(pair) => self.check_mirror_identity(identity::find(self.store.prefix(), &pair)),
            Err(e) => {
                debug!(error = %e, "cannot read the cluster id now");
                false
            }
        }
    }

    /// Read, plan, apply: the stages of one run on the last known state.
    async fn apply_desired(&self, state: &mut ReconcilerState) -> Result<Pass, String> {
        {
            // Changes applied on their own since the last full judgement: their endpoints
            // and nodes take their places in the desired state (no judgement of the whole
            // mirror).
            // In place when no reader holds the state (the usual case), else on a copy.
            let mut cluster = lock(&self.cluster);
            if !cluster.kept.is_empty() {
                if let Some(desired) = cluster.desired.take() {
                    let mut current = Arc::unwrap_or_clone(desired);
                    std::mem::take(&mut cluster.kept).apply_in_place(&mut current);
                    cluster.set_desired(Arc::new(current), self.node());
                }
            }
        }
        let Some(cluster) = self.desired() else {
            // Nothing known yet: keep whatever the maps hold (a restart keeps forwarding).
            return Ok(Pass::default());
        };
        if !std::mem::replace(&mut state.adopted, true) && self.has_host() {
            gc::adopt_unrecorded(&self.handle, self.node(), &self.local, &cluster.endpoints).await;
        }
        let records = self.local_records();
        let cluster = self.narrow_to_local_records(&cluster, &records);
        if let Some(names) = &self.names {
            names.refresh(&cluster, self.node()).await;
        }
        let veths = self.local_veths(&cluster).await?;
        let local = LocalNode {
            name: self.node().to_string(),
            vtep: self.vtep(),
        };
        let plan = reconcile::plan(&cluster, &local, &veths.by_name);
        let (report, attached_now) = self.apply_plan(&plan, &veths.names)?;
        let applied = self.forwarding(&cluster, &plan, &veths, &attached_now);
        if self.has_host() {
            self.check_underlay_mtu(&cluster.networks).await;
        }
        Ok(Pass {
            outcome: ReconcileOutcome {
                report,
                applied: Some(applied),
                ..Default::default()
            },
            follow_ups: follow_ups(&plan, &records),
        })
    }

    /// This node forwards for the endpoints it recorded creating, with the values it
    /// recorded and the veth name generated from them: a store entry naming this node
    /// only says whether it is still wanted, never which interface or address to use.
    /// `state` itself when that changes nothing (the common case: no copy of 20,000
    /// endpoints at every resync, under the reconcile lock).
    fn narrow_to_local_records(
        &self,
        state: &Arc<ClusterState>,
        records: &BTreeMap<(String, String), LocalEndpoint>,
    ) -> Arc<ClusterState> {
        let node = self.node();
        let narrowed = |e: &Endpoint| -> Option<Endpoint> {
            let record = records.get(&(e.network.clone(), e.id.clone()))?;
            if !record.in_use() {
                return None;
            }
            let mut mine = record.endpoint.clone()?;
            mine.node = node.to_string();
            mine.ifname = record.host_ifname();
            Some(mine)
        };
        let unchanged = (state.endpoints.iter())
            .filter(|e| e.node == node)
            .all(|e| narrowed(e).as_ref() == Some(e));
        if unchanged {
            return state.clone();
        }
        let endpoints = (state.endpoints.iter())
            .filter_map(|e| match e.node == node {
                false => Some(e.clone()),
                true => narrowed(e),
            })
            .collect();
        Arc::new(ClusterState {
            networks: state.networks.clone(),
            nodes: state.nodes.clone(),
            endpoints,
            vxlan_port: state.vxlan_port,
        })
    }

    /// The host veths of this node's endpoints (and every interface name, for the next
    /// read's validation).
    async fn local_veths(&self, state: &ClusterState) -> Result<LocalVeths, String> {
        if !self.has_host() {
            return Ok(LocalVeths::default());
        }
        let wanted: BTreeSet<&str> = state
            .local_endpoints(self.node())
            .map(|e| e.ifname.as_str())
            .collect();
        let links = gc::list_links_retrying(&self.handle)
            .await
            .map_err(|e| e.to_string())?;
        lock(&self.cluster).links = links.iter().map(|l| l.name.clone()).collect();
        let mut veths = LocalVeths::default();
        for link in links
            .into_iter()
            .filter(|l| wanted.contains(l.name.as_str()))
        {
            veths.names.insert(link.index, link.name.clone());
            let veth = HostVeth {
                ifindex: link.index,
                mac: link.mac,
            };
            veths.by_name.insert(link.name, veth);
        }
        Ok(veths)
    }

    /// Writes the plan into the maps; returns the report and the veths attached after it.
    fn apply_plan(
        &self,
        plan: &Plan,
        veth_names: &BTreeMap<u32, String>,
    ) -> Result<(ApplyReport, BTreeSet<u32>), String> {
        let mut plane = lock(&self.plane);
        let maps = plane
            .datapath
            .as_mut()
            .ok_or("the agent is stopping")?
            .maps();
        let report =
            apply::apply(maps, &plan.maps, veth_names).map_err(|e| apply::error_chain(&e))?;
        Ok((report, maps.attached_containers()))
    }

    /// What the data plane forwards for after an apply.
    fn forwarding(
        &self,
        state: &ClusterState,
        plan: &Plan,
        veths: &LocalVeths,
        attached_now: &BTreeSet<u32>,
    ) -> Forwarding {
        let local_endpoints = plan.maps.local_ifaces.len();
        Forwarding {
            members: state.nodes.len(),
            local_endpoints,
            remote_endpoints: plan.maps.endpoints.len() - local_endpoints,
            // Only what the data plane really forwards for (an endpoint whose entries
            // did not fit in the maps is not attached).
            attached: state
                .local_endpoints(self.node())
                .filter(|e| {
                    (veths.by_name.get(&e.ifname))
                        .is_some_and(|v| attached_now.contains(&v.ifindex))
                })
                .map(|e| format!("{}/{}", e.network, e.id))
                .collect(),
        }
    }

    /// Runs a pass's follow-ups (the reconcile lock released); returns how many failed.
    async fn run_follow_ups(&self, follow_ups: Vec<FollowUp>) -> usize {
        let mut failed = 0;
        for follow_up in follow_ups {
            match follow_up {
                FollowUp::Collect { record, why } => {
                    if !self.collect_local(&record, why).await {
                        failed += 1;
                    }
                }
            }
        }
        if failed > 0 {
            debug!(failed, "reconcile follow-ups failed; retried next run");
        }
        failed
    }

    /// Counts the run in the metrics and publishes it in the status.
    fn publish_reconcile(&self, result: &Result<ReconcileOutcome, String>, started: Instant) {
        let elapsed = started.elapsed();
        // Entries that could not be written (a full map) fail the run for status and
        // metrics, but not the caller: everything else was applied.
        let partial = result
            .as_ref()
            .ok()
            .and_then(|o| o.report.failure_summary());
        let ok = result.is_ok() && partial.is_none();
        self.metrics.record_reconcile(ok, elapsed);
        if let Ok(outcome) = result {
            self.metrics.record_apply_failures(&outcome.report);
        }
        let last = ReconcileStatus {
            at_unix_ms: unix_ms(SystemTime::now()),
            ok,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            error: result.as_ref().err().cloned().or(partial),
            report: result
                .as_ref()
                .map(|o| o.report.clone())
                .unwrap_or_default(),
        };
        self.status.send_modify(|status| {
            status.last_reconcile = Some(last);
            if let Some(applied) = result.as_ref().ok().and_then(|o| o.applied.clone()) {
                status.forwarding = applied;
            }
        });
    }
}

/// A local endpoint whose veth is gone: a completed `attach` whose container ended is
/// collected now; one whose `run`/`attach` process lives is left to that process, which
/// removes it itself (one owner for every clean-up).
fn follow_ups(plan: &Plan, records: &BTreeMap<(String, String), LocalEndpoint>) -> Vec<FollowUp> {
    plan.missing_veths
        .iter()
        .filter_map(|stale| records.get(&(stale.network.clone(), stale.id.clone())))
        .filter_map(|record| {
            gc::left_over(record, false).map(|why| FollowUp::Collect {
                record: record.clone(),
                why,
            })
        })
        .collect()
}
