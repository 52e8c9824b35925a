//! Following the store: the feed ([`StoreFeed`]) that applies every change as it
//! happens (and acknowledges the index it applied, so `run` can wait until every node
//! forwards for a new endpoint), the periodic full resync, and the judgement of each full
//! read: its records validated for this node ([`records::parse_snapshot`]) and the store
//! checked against the cluster id ([`crate::store::identity`]).
//!
//! The watch keeps a copy of the followed keys ([`super::mirror::Mirror`]): a snapshot
//! replaces it and is judged in full; a batch of changes edits it and, when it touches
//! only other nodes' endpoints and addresses, is applied on its own
//! ([`super::delta`]); anything else is judged in full from the mirror, so a change
//! never needs the store to be read again. The changes applied on their own also keep
//! the desired state current ([`super::delta::Kept::apply_in_place`]), so the resync
//! compares the maps with it without judging the whole mirror again. Every
//! [`STORE_CHECK_EVERY`]th time it checks the mirror against the store: on etcd, the
//! watch reads the index of every followed key as of the revision it had delivered
//! (keys and revisions only, no values: [`FeedCheck`]), beside the feed, which goes on
//! applying changes, and compares them with the mirror's, leaving out what changed
//! since; it reads the store again only when they differ. On Consul, which cannot be
//! read as of a past index, the whole store is read and judged again.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::{
    sync::{oneshot, Notify},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{delta::DeltaOutcome, lock, reconcile::ClusterState, reconciler::Fetch, Agent};
use crate::{
    store::backend::Record,
    store::feed::{FeedEvent, KvChange, StoreFeed, Versions},
    store::identity::{self, Judgement, Trust},
    store::records,
    store::StoreError,
};

/// Every how many resyncs the mirror is checked against the store (the safety net
/// under the feed: at the default 30 s resync, every 5 minutes); the others plan from
/// the desired state the feed keeps current.
const STORE_CHECK_EVERY: u32 = 10;

/// How long the resync waits for the watch to check its copy before it reads the whole
/// store itself.
const FEED_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The resync's request that the watch check its mirror against the store, and the
/// channel of the answer.
#[derive(Debug, Default)]
pub(super) struct FeedCheck {
    wanted: Notify,
    reply: Mutex<Option<oneshot::Sender<CheckOutcome>>>,
}

/// What a check of the mirror against the store found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CheckOutcome {
    /// The mirror holds every followed key at the store's index.
    Matches,
    /// A key differs: the feed reads the whole store again (its snapshot is judged in
    /// full, as at start).
    Differs,
    /// A snapshot replaced the mirror while the versions were read: it is as fresh as
    /// a check could make it.
    Replaced,
    /// Not checked (Consul, no snapshot yet, the store did not answer).
    Unchecked,
}

/// A check whose read of the versions runs beside the watch, and what the watch notes
/// meanwhile.
#[derive(Debug)]
struct CheckInFlight {
    read: JoinHandle<Result<Versions, StoreError>>,
    /// Keys deleted by the changes applied since the versions' index.
    deleted: BTreeSet<String>,
    /// Whether a snapshot replaced the mirror meanwhile.
    replaced: bool,
}

impl CheckInFlight {
    fn note(&mut self, event: &FeedEvent) {
        match event {
            FeedEvent::Snapshot { .. } => self.replaced = true,
            FeedEvent::Changes { changes, .. } => {
                self.deleted
                    .extend(changes.iter().filter_map(|change| match change {
                        KvChange::Delete { key } => Some(key.clone()),
                        KvChange::Put(_) => None,
                    }))
            }
        }
    }
}

/// How long the acknowledging task waits after a failed write before the next one
/// (doubling while writes keep failing, up to [`ACK_RETRY_PAUSE_MAX`]).
const ACK_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
const ACK_RETRY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the acknowledgement of changes nobody waits for (other nodes joining or
/// leaving) may wait to be merged with the next ones.
const ACK_DEFERRAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What the acknowledging task is told: the newest index applied, and the newest one
/// whose acknowledgement a writer may be waiting for (an endpoint or address change, a
/// full judgement).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AppliedIndex {
    newest: u64,
    awaited: u64,
}

impl AppliedIndex {
    /// Takes in an index applied; returns whether the task has something new to do.
    fn note(&mut self, index: u64, deferrable: bool) -> bool {
        let newer = index > self.newest;
        let awaited = !deferrable && index > self.awaited;
        self.newest = self.newest.max(index);
        if awaited {
            self.awaited = index;
        }
        newer || awaited
    }
}

/// Gives back to the system what a full judgement freed: a whole read's answer, its
/// decoded records and judged copies are transient, and glibc keeps freed pages in its
/// arenas otherwise (an agent's RSS would stay at the peak of its largest read).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns the allocator's own free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A duration in `[0, interval)`, different in every process.
fn random_phase(interval: std::time::Duration) -> std::time::Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let fraction = (hasher.finish() % 1_000_000) as f64 / 1_000_000.0;
    interval.mul_f64(fraction)
}

/// What one feed event asks for.
enum Followed {
    /// Nothing to apply (no change, or a store that is not to be applied now).
    Nothing,
    /// Applied on its own: acknowledge it (`deferrable`: only other nodes' records
    /// changed, which no writer waits for).
    Applied { deferrable: bool },
    /// The state judged in full, to apply.
    State(Arc<ClusterState>),
}

impl Agent {
    /// Follows every change under the prefix through the store's feed.
    pub(super) async fn watch_loop(self: Arc<Self>) {
        let mut feed = StoreFeed::new(
            self.store.kv().clone(),
            self.store.prefix(),
            self.options.watch_wait,
        );
        // The newest index applied, for the acknowledging task (which writes only the
        // newest one when several were applied during one write).
        let (applied_tx, applied_rx) = tokio::sync::watch::channel(AppliedIndex::default());
        tokio::spawn(self.clone().acknowledge_loop(applied_rx));
        // A check of the mirror in flight: its read of the versions runs beside the
        // feed, which goes on applying changes (what they change is left out of the
        // comparison).
        let mut check: Option<CheckInFlight> = None;
        loop {
            let next = tokio::select! {
                next = feed.next() => next,
                () = self.feed_stale.notified() => {
                    feed.reread("a fresh read of the store shows another cluster identity than the feed's copy");
                    continue;
                }
                () = self.feed_check.wanted.notified(), if check.is_none() => {
                    match feed.versions_read().filter(|_| lock(&self.mirror).synced()) {
                        Some(read) => {
                            check = Some(CheckInFlight {
                                read: tokio::spawn(read.read()),
                                deleted: BTreeSet::new(),
                                replaced: false,
                            });
                        }
                        None => self.answer_check(CheckOutcome::Unchecked),
                    }
                    continue;
                }
                read = async {
                    match check.as_mut() {
                        Some(check) => (&mut check.read).await,
                        None => std::future::pending().await,
                    }
                }, if check.is_some() => {
                    if let Some(noted) = check.take() {
                        let outcome = self.compare_mirror(&mut feed, noted, read);
                        self.answer_check(outcome);
                    }
                    continue;
                }
            };
            if let (Some(check), Ok(event)) = (check.as_mut(), &next) {
                check.note(event);
            }
            match next {
                Ok(event) => {
                    self.consul_ok();
                    let index = event.index();
                    let (applied, deferrable) = match self.follow(event).await {
                        Followed::Nothing => continue,
                        Followed::Applied { deferrable } => (true, deferrable),
                        Followed::State(state) => {
                            let applied = self.apply_watched(state, index).await;
                            release_freed_memory();
                            (applied, false)
                        }
                    };
                    if applied {
                        self.status
                            .send_modify(|status| status.feed.applied_index = index);
                        applied_tx.send_if_modified(|applied| applied.note(index, deferrable));
                    }
                }
                Err(e) => self.consul_failed("watch", &e),
            }
        }
    }

    /// Compares the mirror with the store's versions of the followed keys (read as of
    /// the index of the last event delivered when the check began; `noted`: what the
    /// watch applied since); on a difference the feed reads the whole store again.
    fn compare_mirror(
        &self,
        feed: &mut StoreFeed,
        noted: CheckInFlight,
        read: Result<Result<Versions, StoreError>, tokio::task::JoinError>,
    ) -> CheckOutcome {
        let versions = match read {
            _ if noted.replaced => return CheckOutcome::Replaced,
            Ok(Ok(versions)) => versions,
            Ok(Err(e)) => {
                info!(error = %e, "cannot check the watch's copy against the store: reading the whole store instead");
                return CheckOutcome::Unchecked;
            }
            Err(e) => {
                warn!(error = %e, "the check of the watch's copy failed");
                return CheckOutcome::Unchecked;
            }
        };
        let difference = {
            let mirror = lock(&self.mirror);
            if !mirror.synced() {
                return CheckOutcome::Unchecked;
            }
            mirror.first_difference(&versions, &noted.deleted)
        };
        let bytes = self.store.bytes_read();
        self.status.send_modify(|status| {
            status.feed.store_bytes_read = bytes;
            status.feed.copy_checks += 1;
            status.feed.copy_differences += u64::from(difference.is_some());
        });
        match difference {
            None => CheckOutcome::Matches,
            Some(difference) => {
                warn!(%difference, index = versions.index, "the watch's copy of the store differs from the store");
                feed.reread("the watch's copy of the store differs from the store");
                CheckOutcome::Differs
            }
        }
    }

    /// Gives the resync the outcome of its check (when it still waits for it).
    fn answer_check(&self, outcome: CheckOutcome) {
        if let Some(reply) = lock(&self.feed_check.reply).take() {
            let _ = reply.send(outcome);
        }
    }

    /// Asks the watch to check its mirror against the store; returns whether it did
    /// (they matched, or the feed reads the store again as they did not). When it
    /// could not, the caller reads the whole store itself.
    async fn mirror_checked(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        *lock(&self.feed_check.reply) = Some(reply);
        self.feed_check.wanted.notify_one();
        let outcome = tokio::time::timeout(FEED_CHECK_TIMEOUT, answer).await;
        matches!(
            outcome,
            Ok(Ok(CheckOutcome::Matches
                | CheckOutcome::Differs
                | CheckOutcome::Replaced))
        )
    }

    /// Takes one feed event into the mirror, and applies it on its own when it can.
    async fn follow(&self, event: FeedEvent) -> Followed {
        let counted = |snapshots: u64, changes: u64| {
            // Everything this process read from the store (the feed, and the membership's
            // and collector's reads), as the store client counts it.
            let bytes = self.store.bytes_read();
            self.status.send_modify(|status| {
                let feed = &mut status.feed;
                feed.store_bytes_read = bytes;
                feed.snapshots += snapshots;
                feed.change_batches += u64::from(changes > 0);
                feed.changes += changes;
            })
        };
        match event {
            FeedEvent::Snapshot { pairs, .. } => {
                counted(1, 0);
                lock(&self.mirror).replace(pairs);
                // Judged in full from here: no older batch can follow.
                lock(&self.cluster).fresh_read_index = 0;
            }
            FeedEvent::Changes { changes, index } => {
                counted(0, changes.len() as u64);
                let scope = lock(&self.mirror).take_changes(changes, self.node());
                if scope.is_empty() {
                    return Followed::Nothing;
                }
                if index < lock(&self.cluster).fresh_read_index {
                    // Older than a fresh read already applied, which holds these changes.
                    debug!(
                        index,
                        "changes older than the last fresh read: kept, not applied"
                    );
                    return Followed::Nothing;
                }
                if self.apply_changes(&scope).await == DeltaOutcome::Applied {
                    return Followed::Applied {
                        deferrable: scope.keys.is_empty(),
                    };
                }
                self.status
                    .send_modify(|status| status.feed.full_fallbacks += 1);
            }
        }
        match self.judge_mirror() {
            Some(state) => Followed::State(state),
            None => Followed::Nothing,
        }
    }

    /// Judges the mirror in full (`None`: no snapshot yet, or the store is not to be
    /// applied now).
    pub(super) fn judge_mirror(&self) -> Option<Arc<ClusterState>> {
        let mirror = lock(&self.mirror);
        if !mirror.synced() {
            return None;
        }
        self.judge(mirror.pairs())
    }

    /// Applies a state the watch read at `index`; returns whether it is now applied (by
    /// this call, or by an earlier reconcile the watch had not acknowledged yet).
    async fn apply_watched(&self, state: Arc<ClusterState>, index: u64) -> bool {
        let changed = {
            let mut cluster = lock(&self.cluster);
            // A fresh read in flight may predate this judgement: it is dropped.
            cluster.kept_during_fetch = None;
            cluster.set_desired(state, self.node())
        };
        if changed {
            debug!(index, "cluster state changed");
            self.reconcile(Fetch::No).await.is_ok()
        } else {
            // Nothing to change: the maps hold this state once the last reconcile
            // succeeded. A fetching reconcile may have taken it first and still be
            // applying it: wait for it to finish (it holds the reconcile lock). Since
            // `applied/` is outside the feed, acknowledging an unchanged state wakes no
            // one, and a writer waiting for this index (a record the maps do not show, a
            // no-op journal entry) is not left waiting for the next real change.
            let _applied = self.reconciler.lock().await;
            lock(&self.cluster).ack_pending = false;
            self.status
                .borrow()
                .last_reconcile
                .as_ref()
                .is_some_and(|r| r.ok)
        }
    }

    /// Records in the store the newest index this node applied: lets `run` (and
    /// benchmarks) see when every node forwards for a new endpoint. A task of its own,
    /// so the feed never waits on a store write: while one acknowledgement is being
    /// written, the indexes applied meanwhile collapse into the newest, one write for
    /// all of them (with 100 agents, one write per agent per change would be 100 store
    /// writes for every change).
    ///
    /// Changes no writer waits for (only other nodes' records: a node joining or
    /// leaving) are acknowledged within [`ACK_DEFERRAL`], merged with what follows: when
    /// a hundred nodes join at once, each agent writes one acknowledgement, not one per
    /// node (ten thousand store writes from a hundred agents, at the moment the store is
    /// busiest with their first reads).
    async fn acknowledge_loop(
        self: Arc<Self>,
        mut applied: tokio::sync::watch::Receiver<AppliedIndex>,
    ) {
        let mut acknowledged = 0u64;
        let mut retry_pause = ACK_RETRY_PAUSE;
        loop {
            let now = *applied.borrow_and_update();
            if now.newest <= acknowledged {
                if applied.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if now.awaited <= acknowledged {
                let deadline = tokio::time::Instant::now() + ACK_DEFERRAL;
                while applied.borrow_and_update().awaited <= acknowledged {
                    match tokio::time::timeout_at(deadline, applied.changed()).await {
                        Err(_deferred_enough) => break,
                        Ok(Err(_closed)) => return,
                        Ok(Ok(())) => {}
                    }
                }
            }
            let index = applied.borrow_and_update().newest;
            // `applied/` is outside the feed: the write wakes no agent.
            match self.store.put_applied(self.node(), index).await {
                Ok(()) => {
                    acknowledged = index;
                    retry_pause = ACK_RETRY_PAUSE;
                }
                Err(e) => {
                    debug!(error = %e, "cannot record the applied index");
                    // Retried (with the newest index by then); a store that fails is
                    // reported by the feed itself.
                    tokio::time::sleep(retry_pause).await;
                    retry_pause = (retry_pause * 2).min(ACK_RETRY_PAUSE_MAX);
                }
            }
        }
    }

    /// Resync on a timer: compares the maps with the desired state (map drift); every
    /// [`STORE_CHECK_EVERY`]th time checks the watch's mirror against the store
    /// (anything a feed missed), with a fresh read of the whole store when the watch
    /// cannot check it; and reads the whole store every time while it is not trusted
    /// as it is (lost, foreign, healing: an expired healing period).
    pub(super) async fn resync_loop(self: Arc<Self>) {
        let interval = self.options.resync_interval;
        // At a phase of this agent's own, so that agents started together (a cluster's
        // reboot, 100 agents of a benchmark) do not judge their state and re-read the
        // whole store at the same moment. Not at once: the feed's first read is applied
        // as soon as it arrives, and a second read of the whole store beside it would
        // double what a starting agent costs the store and itself.
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + random_phase(interval),
            interval,
        );
        for tick in 0u32.. {
            ticker.tick().await;
            // A store that is not trusted as it is (lost, foreign, healing) is judged
            // from a fresh read every time, as the mirror may predate what was judged.
            let trusted = matches!(
                lock(&self.identity).trust(),
                Trust::Trusted | Trust::Unknown
            );
            // The feed's first read counts as the first: the next one a full period later.
            // The other runs plan from the desired state, which the feed keeps current.
            let check = trusted && (tick + 1) % STORE_CHECK_EVERY == 0;
            let mut from_store = !trusted || (check && !self.mirror_checked().await);
            if !from_store {
                // A store that came back without its data (or another cluster's) is
                // judged now, from a fresh read, not at the next whole re-read.
                from_store = self.store_identity_moved().await;
            }
            // A failed run is logged and counted by `reconcile` itself.
            let fetch = match from_store {
                true => Fetch::Aside,
                false => Fetch::No,
            };
            let _ = self.reconcile(fetch).await;
            release_freed_memory();
        }
    }

    /// Judges one full read of the store against the cluster id ([`crate::store::identity`]):
    /// the state to apply, or `None` to keep the maps as they are.
    pub(super) fn judge<'p, R: Record + 'p>(
        &self,
        pairs: impl IntoIterator<Item = &'p R> + Clone,
    ) -> Option<Arc<ClusterState>> {
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
    fn ingest<'p, R: Record + 'p>(&self, pairs: impl IntoIterator<Item = &'p R>) -> ClusterState {
        let vtep = self.vtep();
        let mut cluster = lock(&self.cluster);
        let view = records::View::Node {
            name: self.node(),
            vtep,
            links: &cluster.links,
        };
        let snapshot = records::parse_snapshot(self.store.prefix(), pairs, view);
        let fresh = cluster.rejections.replace_all(&snapshot.rejected);
        drop(cluster);
        self.report_rejections(&fresh);
        snapshot.state
    }

    /// Logs and counts the rejections found fresh, and publishes the current totals.
    pub(super) fn report_rejections(&self, fresh: &[records::Rejection]) {
        for r in fresh {
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
        let (total, by_reason) = {
            let cluster = lock(&self.cluster);
            (cluster.rejections.len(), cluster.rejections.count())
        };
        self.status.send_modify(|status| {
            status.rejected_records = total;
            status.rejected_by_reason = by_reason;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_phases_fall_inside_the_interval_and_differ() {
        let interval = std::time::Duration::from_secs(30);
        let phases: Vec<_> = (0..20).map(|_| random_phase(interval)).collect();
        assert!(phases.iter().all(|p| *p < interval), "{phases:?}");
        let first = phases[0];
        assert!(phases.iter().any(|p| *p != first), "{phases:?}");
    }

    #[test]
    fn only_awaited_indexes_raise_the_awaited_mark() {
        let mut applied = AppliedIndex::default();
        assert!(applied.note(5, true), "a newer index is news");
        assert_eq!(
            applied,
            AppliedIndex {
                newest: 5,
                awaited: 0
            }
        );
        assert!(applied.note(7, false));
        assert_eq!(
            applied,
            AppliedIndex {
                newest: 7,
                awaited: 7
            }
        );
        assert!(!applied.note(7, true), "nothing new");
        assert!(applied.note(9, true));
        assert_eq!(
            applied,
            AppliedIndex {
                newest: 9,
                awaited: 7
            }
        );
        // An index applied twice, the second time by a path a writer waits for.
        assert!(applied.note(9, false));
        assert_eq!(
            applied,
            AppliedIndex {
                newest: 9,
                awaited: 9
            }
        );
    }
}
