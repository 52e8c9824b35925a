//! Following the store: the feed ([`StoreFeed`]) that applies every change as it
//! happens (and acknowledges the index it applied, so `run` can wait until every node
//! forwards for a new endpoint), the periodic full resync, and the judgement of each full
//! read: its records validated for this node ([`records::parse_snapshot`]) and the store
//! checked against the cluster id ([`crate::store::identity`]).
//!
//! The watch keeps a copy of the followed keys ([`Mirror`]): a snapshot replaces it, a
//! batch of changes edits it, and the state to apply is judged from it, so a change never
//! needs the store to be read again.
use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tracing::{debug, info, warn};

use super::{lock, reconcile::ClusterState, Agent};
use crate::{
    store::backend::KvPair,
    store::feed::{FeedEvent, KvChange, StoreFeed},
    store::identity::{self, Judgement},
    store::records,
};

/// The last state this node acknowledged applying, and at which watch index.
#[derive(Default)]
struct Acknowledged {
    index: u64,
    /// The [`super::ClusterView::generation`] acknowledged.
    generation: Option<u64>,
}

/// The watch's copy of every followed key, by key.
#[derive(Default)]
pub(super) struct Mirror {
    pairs: BTreeMap<String, KvPair>,
}

impl Mirror {
    fn replace(&mut self, pairs: Vec<KvPair>) {
        self.pairs = pairs.into_iter().map(|p| (p.key.clone(), p)).collect();
    }

    fn apply(&mut self, changes: Vec<KvChange>) {
        for change in changes {
            match change {
                KvChange::Put(pair) => {
                    self.pairs.insert(pair.key.clone(), pair);
                }
                KvChange::Delete { key } => {
                    self.pairs.remove(&key);
                }
            }
        }
    }

    pub(super) fn pairs(&self) -> impl Iterator<Item = &KvPair> + Clone {
        self.pairs.values()
    }
}

/// The bytes of keys and values an event carried (the feed's own count of what was read).
fn event_bytes(event: &FeedEvent) -> u64 {
    let pair_bytes = |p: &KvPair| (p.key.len() + p.value.len()) as u64;
    match event {
        FeedEvent::Snapshot { pairs, .. } => pairs.iter().map(pair_bytes).sum(),
        FeedEvent::Changes { changes, .. } => changes
            .iter()
            .map(|c| match c {
                KvChange::Put(p) => pair_bytes(p),
                KvChange::Delete { key } => key.len() as u64,
            })
            .sum(),
    }
}

impl Agent {
    /// Follows every change under the prefix through the store's feed.
    pub(super) async fn watch_loop(self: Arc<Self>) {
        let mut feed = StoreFeed::new(
            self.store.kv().clone(),
            self.store.prefix(),
            self.options.watch_wait,
        );
        let mut mirror = Mirror::default();
        let mut acknowledged = Acknowledged::default();
        loop {
            match feed.next().await {
                Ok(event) => {
                    self.consul_ok();
                    let index = event.index();
                    let Some(state) = self.follow(&mut mirror, event) else {
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

    /// Takes one feed event into the mirror; returns the state to apply (`None`: nothing
    /// changed, or the store is not to be applied now).
    fn follow(&self, mirror: &mut Mirror, event: FeedEvent) -> Option<ClusterState> {
        let bytes = event_bytes(&event);
        let counted = |snapshots: u64, changes: u64| {
            self.status.send_modify(|status| {
                let feed = &mut status.feed;
                feed.store_bytes_read += bytes;
                feed.snapshots += snapshots;
                feed.change_batches += u64::from(changes > 0);
                feed.changes += changes;
            })
        };
        match event {
            FeedEvent::Snapshot { pairs, .. } => {
                counted(1, 0);
                mirror.replace(pairs);
            }
            FeedEvent::Changes { changes, .. } => {
                counted(0, changes.len() as u64);
                if changes.is_empty() {
                    return None;
                }
                mirror.apply(changes);
                self.status
                    .send_modify(|status| status.feed.full_fallbacks += 1);
            }
        }
        self.judge(mirror.pairs())
    }

    /// Applies a state the watch read at `index`; returns whether it is now applied (by
    /// this call, or by an earlier reconcile the watch had not acknowledged yet).
    async fn apply_watched(&self, state: ClusterState, index: u64) -> bool {
        let changed = lock(&self.cluster).set_desired(state);
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
        let current = lock(&self.cluster).generation;
        self.status
            .send_modify(|status| status.feed.applied_index = index);
        if index <= acknowledged.index || Some(current) == acknowledged.generation {
            return;
        }
        match self.store.put_applied(self.node(), index).await {
            Ok(()) => {
                acknowledged.index = index;
                acknowledged.generation = Some(current);
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
    pub(super) fn judge<'p>(
        &self,
        pairs: impl IntoIterator<Item = &'p KvPair> + Clone,
    ) -> Option<ClusterState> {
        let prefix = self.store.prefix();
        let read = self.ingest(pairs.clone());
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
    fn ingest<'p>(&self, pairs: impl IntoIterator<Item = &'p KvPair>) -> ClusterState {
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
