//! The collection task: every period, local records without a live owner are collected
//! at once, and store entries after the grace period (the latter only while the store is
//! trusted). What counts as left over, and how each kind is removed, is in [`gc`]; this
//! file decides when, and keeps two collections of one record apart (the `collector`
//! lock, also taken by a reconcile's follow-ups). The store pass's memory
//! ([`gc::Sweeper`]) belongs to the task alone.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use tracing::{debug, warn};

use super::{
    gc::{self, Sweeper},
    local_state::LocalEndpoint,
    lock, Agent,
};
use crate::store::identity::Trust;

impl Agent {
    /// Collects what crashed commands and outages left ([`crate::agent::gc`]).
    pub(super) async fn gc_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.options.gc_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweeper = Sweeper::default();
        loop {
            ticker.tick().await;
            self.gc_pass(&mut sweeper).await;
            self.metrics.record_gc_run();
        }
    }

    /// One collection pass (see [`Agent::gc_loop`]).
    async fn gc_pass(&self, sweeper: &mut Sweeper) {
        let records = self.local_records();
        let links: BTreeSet<String> = match gc::list_links_retrying(&self.handle).await {
            Ok(links) => links.into_iter().map(|l| l.name).collect(),
            Err(e) => {
                warn!(error = %e, "gc: cannot list interfaces");
                return;
            }
        };
        for record in records.values() {
            let veth = links.contains(&record.host_ifname());
            if let Some(why) = gc::left_over(record, veth) {
                self.collect_local(record, why).await;
            }
        }
        if !lock(&self.identity).trust().allows_gc() {
            return;
        }
        self.collect_unlisted(sweeper, &records).await;
        self.sweep_store(sweeper).await;
    }

    /// Completed `attach`es whose endpoint entry has been gone from the store for the
    /// grace period.
    async fn collect_unlisted(
        &self,
        sweeper: &mut Sweeper,
        records: &BTreeMap<(String, String), LocalEndpoint>,
    ) {
        let Some(listed) = self.desired().map(|state| {
            state
                .local_endpoints(self.node())
                .map(|e| (e.network.clone(), e.id.clone()))
                .collect::<BTreeSet<_>>()
        }) else {
            // Nothing read from the store yet.
            return;
        };
        let unlisted: Vec<LocalEndpoint> = sweeper
            .unlisted_attachments(
                records.values(),
                &listed,
                Instant::now(),
                self.options.gc_grace,
            )
            .into_iter()
            .cloned()
            .collect();
        for record in &unlisted {
            self.collect_local(record, "its endpoint entry was removed from the store")
                .await;
        }
    }

    /// The store pass ([`gc::Sweeper::sweep`]).
    async fn sweep_store(&self, sweeper: &mut Sweeper) {
        let swept = sweeper
            .sweep(&self.store, self.node(), &self.local, self.options.gc_grace)
            .await;
        match swept {
            Ok(collected) => {
                for kind in collected {
                    self.metrics.record_collected(kind.name());
                }
            }
            Err(e) => debug!(error = %e, "gc: cannot sweep the store now"),
        }
    }

    /// This node's valid local records by (network, id); unreadable ones are logged.
    pub(super) fn local_records(&self) -> BTreeMap<(String, String), LocalEndpoint> {
        let (records, unreadable) = self.local.load_all();
        for e in unreadable {
            debug!(error = %e, "ignoring an unreadable local record");
        }
        records
            .into_iter()
            .map(|r| ((r.network.clone(), r.id.clone()), r))
            .collect()
    }

    /// Collects one left-over local endpoint ([`gc::collect_local`]). Returns false when
    /// it could not (logged; retried next period), true when it is gone or kept on
    /// purpose (a store that is not this cluster's).
    pub(super) async fn collect_local(&self, record: &LocalEndpoint, why: &str) -> bool {
        if lock(&self.identity).trust() == Trust::Foreign {
            // Its entries are in this cluster's store, not in the one answering now.
            debug!(network = %record.network, endpoint = %record.id, "left-over kept until the store is this cluster's again");
            return true;
        }
        let _one_at_a_time = self.collector.lock().await;
        if self.local.get(&record.network, &record.id).is_none() {
            // Collected meanwhile (by a reconcile's follow-up or the previous pass).
            return true;
        }
        let collected = gc::collect_local(
            &self.store,
            &self.handle,
            self.node(),
            &self.local,
            record,
            why,
        )
        .await;
        match collected {
            Ok(()) => {
                self.metrics
                    .record_collected(gc::Kind::LocalEndpoint.name());
                true
            }
            Err(e) => {
                warn!(network = %record.network, endpoint = %record.id, error = %e, "cannot collect a left-over local endpoint yet; retrying next period");
                false
            }
        }
    }
}
