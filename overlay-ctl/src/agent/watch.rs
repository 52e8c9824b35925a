//! Following the store: the blocking-query watch that applies every change as it
//! happens (and acknowledges the index it applied, so `run` can wait until every node
//! forwards for a new endpoint), the periodic full resync, and the judgement of each full
//! read: its records validated for this node ([`records::parse_snapshot`]) and the store
//! checked against the cluster id ([`crate::store::identity`]).
use std::{sync::Arc, time::Instant};

use tracing::{debug, info, warn};

use super::{lock, reconcile::ClusterState, Agent};
use crate::{
    store::backend::KvPair,
    store::consul::KvWatch,
    store::identity::{self, Judgement},
    store::records,
};

/// The last state this node acknowledged applying, and at which watch index.
#[derive(Default)]
struct Acknowledged {
    index: u64,
    state: Option<ClusterState>,
}

impl Agent {
    /// Follows every change under the prefix with blocking queries.
    pub(super) async fn watch_loop(self: Arc<Self>) {
        let mut watch = KvWatch::new(
            self.store.kv().clone(),
            self.store.prefix(),
            self.options.watch_wait,
        );
        let mut acknowledged = Acknowledged::default();
        loop {
            match watch.next().await {
                Ok((pairs, index)) => {
                    self.consul_ok();
                    let Some(state) = self.judge(&pairs) else {
                        continue;
                    };
                    if self.apply_watched(state, index).await {
                        self.acknowledge(index, &mut acknowledged).await;
                    }
                }
                Err(e) => self.consul_failed("watch", &e),
            }
        }
    }

    /// Applies a state the watch read at `index`; returns whether it is now applied (by
    /// this call, or by an earlier reconcile the watch had not acknowledged yet).
    async fn apply_watched(&self, state: ClusterState, index: u64) -> bool {
        let changed = {
            let mut cluster = lock(&self.cluster);
            let changed = cluster.desired.as_ref() != Some(&state);
            if changed {
                cluster.desired = Some(state);
            }
            changed
        };
        if changed {
            debug!(index, "cluster state changed");
            self.reconcile(false).await.is_ok()
        } else {
            // A fetching reconcile may have taken this state first and still be applying
            // it: wait for it to finish (it holds the reconcile lock) before taking its
            // acknowledgement.
            let _applied = self.reconciler.lock().await;
            std::mem::take(&mut lock(&self.cluster).ack_pending)
        }
    }

    /// Records that this node applied the state at `index`: lets `run` (and benchmarks)
    /// see when every node forwards for a new endpoint.
    async fn acknowledge(&self, index: u64, acknowledged: &mut Acknowledged) {
        // An acknowledgement is itself a write under the prefix: one for a state already
        // acknowledged would only cause another.
        let current = self.desired();
        if index <= acknowledged.index || current == acknowledged.state {
            return;
        }
        match self.store.put_applied(self.node(), index).await {
            Ok(()) => {
                acknowledged.index = index;
                acknowledged.state = current;
            }
            Err(e) => debug!(error = %e, "cannot record the applied index"),
        }
    }

    /// Full resync on a timer: catches map drift and anything a watch may have missed.
    pub(super) async fn resync_loop(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.options.resync_interval);
        loop {
            ticker.tick().await;
            // A failed run is logged and counted by `reconcile` itself.
            let _ = self.reconcile(true).await;
        }
    }

    /// Judges one full read of the store against the cluster id ([`crate::store::identity`]):
    /// the state to apply, or `None` to keep the maps as they are.
    pub(super) fn judge(&self, pairs: &[KvPair]) -> Option<ClusterState> {
        let prefix = self.store.prefix();
        let read = self.ingest(pairs);
        let found = identity::find(prefix, pairs);
        let (judgement, actions) = lock(&self.identity).judge(found, read, Instant::now());
        if let Some(id) = actions.restore {
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = identity::restore(&store, &id).await {
                    warn!(error = %e, "cannot restore the cluster id yet");
                }
            });
        }
        if actions.republish {
            self.republish.notify_one();
            self.reregister.notify_one();
        }
        match judgement {
            Judgement::Apply(state) => Some(state),
            Judgement::Hold => None,
        }
    }

    /// Parses a read of the whole prefix at the validation boundary: the valid state for
    /// this node, with every rejected record logged once (while it lasts) and counted.
    fn ingest(&self, pairs: &[KvPair]) -> ClusterState {
        let vtep = self.vtep();
        let mut cluster = lock(&self.cluster);
        let view = records::View::Node {
            name: self.node(),
            vtep,
            links: &cluster.links,
        };
        let snapshot = records::parse_snapshot(self.store.prefix(), pairs, view);
        let fresh = cluster.rejections.fresh(&snapshot.rejected);
        drop(cluster);
        for r in &fresh {
            if r.reason == records::RejectReason::UnknownNetwork {
                // Also what `network delete --force` looks like for a moment (the
                // network's key goes first, then its endpoints).
                info!(key = %r.key, kind = r.kind.as_str(), reason = %r.reason, "ignoring an invalid store record: {}", r.detail);
            } else {
                warn!(key = %r.key, kind = r.kind.as_str(), reason = %r.reason, "ignoring an invalid store record: {}", r.detail);
            }
        }
        self.metrics
            .record_rejections_reported(fresh.iter().map(|r| (r.kind, r.reason)));
        self.status.send_modify(|status| {
            status.rejected_records = snapshot.rejected.len();
            status.rejected_by_reason = records::count(&snapshot.rejected);
        });
        snapshot.state
    }
}
