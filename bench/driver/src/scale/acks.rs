//! What the agents acknowledged: every agent records the store index its state holds at
//! `<prefix>applied/<node>`, as the real agent does for `run`. The tracker follows those
//! keys (a blocking query on Consul, a watch on etcd) and keeps the history of the
//! lowest index all agents have acknowledged, with the moment it was seen: a write at
//! index W has reached every agent at the first moment that minimum is >= W.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use overlay_ctl::store::{
    backend::{KvBackend as _, KvPair, Record as _, StoreBackend},
    etcd::{PrefixWatch, WatchEvent, WatchUpdate},
    Store,
};

/// How long one blocking query on the applied keys may wait (Consul).
const BLOCKING_WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct AckState {
    /// The highest index each benchmark agent acknowledged.
    applied: BTreeMap<String, u64>,
    /// (when, the lowest index every agent had acknowledged), rising.
    lowest: Vec<(Instant, u64)>,
    expected: usize,
    errors: u64,
}

impl AckState {
    fn record(&mut self, node: &str, index: u64, now: Instant) {
        let Some(current) = self.applied.get_mut(node) else {
            return;
        };
        *current = (*current).max(index);
        if self.applied.values().filter(|i| **i > 0).count() < self.expected {
            return;
        }
        let lowest = self.applied.values().copied().min().unwrap_or(0);
        if self.lowest.last().is_none_or(|(_, l)| *l < lowest) {
            self.lowest.push((now, lowest));
        }
    }
}

/// Follows the applied keys of `nodes` until dropped.
pub struct AckTracker {
    state: Arc<Mutex<AckState>>,
    task: tokio::task::JoinHandle<()>,
}

impl AckTracker {
    pub fn start(store: &Store, nodes: &[String]) -> Self {
        let state = Arc::new(Mutex::new(AckState {
            applied: nodes.iter().map(|n| (n.clone(), 0)).collect(),
            expected: nodes.len(),
            ..AckState::default()
        }));
        let prefix = format!("{}applied/", store.prefix());
        let follow = state.clone();
        let task = match store.kv().clone() {
            StoreBackend::Consul(_) => {
                tokio::spawn(follow_blocking(store.kv().clone(), prefix, follow))
            }
            StoreBackend::Etcd(client) => tokio::spawn(follow_watch(
                PrefixWatch::new(client, &prefix),
                prefix,
                follow,
            )),
        };
        Self { state, task }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many agents have acknowledged anything yet.
    pub fn agents_seen(&self) -> usize {
        self.lock().applied.values().filter(|i| **i > 0).count()
    }

    /// The lowest index every agent has acknowledged (0 until all have).
    pub fn lowest(&self) -> u64 {
        self.lock().lowest.last().map_or(0, |(_, l)| *l)
    }

    /// The first moment every agent had acknowledged `index` or later.
    pub fn reached(&self, index: u64) -> Option<Instant> {
        let state = self.lock();
        let at = state.lowest.partition_point(|(_, l)| *l < index);
        state.lowest.get(at).map(|(when, _)| *when)
    }

    /// Failed reads of the applied keys so far (retried).
    pub fn errors(&self) -> u64 {
        self.lock().errors
    }

    /// Waits until every agent acknowledged `index`, up to `timeout`; the moment they had.
    pub async fn wait_reached(&self, index: u64, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(when) = self.reached(index) {
                return Some(when);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for AckTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn node_of<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix)
}

fn record_pairs(state: &Mutex<AckState>, prefix: &str, pairs: &[KvPair]) {
    let now = Instant::now();
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    for pair in pairs {
        if let (Some(node), Ok(index)) = (
            node_of(prefix, &pair.key),
            pair.value_str().trim().parse::<u64>(),
        ) {
            state.record(node, index, now);
        }
    }
}

/// Consul: blocking queries on the applied keys.
async fn follow_blocking(backend: StoreBackend, prefix: String, state: Arc<Mutex<AckState>>) {
    let mut index = 0;
    loop {
        match backend.list_blocking(&prefix, index, BLOCKING_WAIT).await {
            Ok((pairs, next)) => {
                record_pairs(&state, &prefix, &pairs);
                // An index that went backwards (a restarted server) starts over.
                index = if next < index { 0 } else { next };
            }
            Err(_) => {
                state.lock().unwrap_or_else(|e| e.into_inner()).errors += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// etcd: a watch on the applied keys.
async fn follow_watch(mut watch: PrefixWatch, prefix: String, state: Arc<Mutex<AckState>>) {
    loop {
        match watch.next().await {
            Ok(WatchUpdate::Snapshot { listing, .. }) => {
                let now = Instant::now();
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                for entry in &listing.entries {
                    if let (Some(node), Ok(index)) = (
                        node_of(&prefix, &entry.key),
                        entry.value_str().trim().parse::<u64>(),
                    ) {
                        state.record(node, index, now);
                    }
                }
            }
            Ok(WatchUpdate::Changes { events, .. }) => {
                let now = Instant::now();
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                for event in &events {
                    if let WatchEvent::Put(entry) = event {
                        if let (Some(node), Ok(index)) = (
                            node_of(&prefix, &entry.key),
                            entry.value_str().trim().parse::<u64>(),
                        ) {
                            state.record(node, index, now);
                        }
                    }
                }
            }
            Err(_) => state.lock().unwrap_or_else(|e| e.into_inner()).errors += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(nodes: &[&str]) -> AckState {
        AckState {
            applied: nodes.iter().map(|n| (n.to_string(), 0)).collect(),
            expected: nodes.len(),
            ..AckState::default()
        }
    }

    #[test]
    fn the_lowest_index_counts_only_once_every_agent_acknowledged() {
        let t0 = Instant::now();
        let mut s = state(&["a", "b"]);
        s.record("a", 10, t0);
        assert!(s.lowest.is_empty(), "b has not acknowledged anything yet");
        s.record("stranger", 50, t0);
        assert!(s.lowest.is_empty(), "a node outside the fleet is ignored");
        let t1 = t0 + Duration::from_millis(5);
        s.record("b", 12, t1);
        assert_eq!(s.lowest, vec![(t1, 10)]);
        // An older acknowledgement arriving late does not lower anything.
        s.record("a", 3, t1);
        let t2 = t1 + Duration::from_millis(5);
        s.record("a", 20, t2);
        assert_eq!(s.lowest, vec![(t1, 10), (t2, 12)]);
    }

    #[test]
    fn a_write_is_reached_when_the_lowest_index_covers_it() {
        let t0 = Instant::now();
        let tracker_state = Arc::new(Mutex::new(state(&["a", "b"])));
        {
            let mut s = tracker_state.lock().unwrap();
            s.record("a", 10, t0);
            s.record("b", 10, t0);
            s.record("a", 30, t0 + Duration::from_millis(1));
            s.record("b", 25, t0 + Duration::from_millis(2));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let tracker = AckTracker {
            state: tracker_state,
            task: runtime.spawn(async {}),
        };
        assert_eq!(tracker.reached(10), Some(t0));
        assert_eq!(tracker.reached(11), Some(t0 + Duration::from_millis(2)));
        assert_eq!(tracker.reached(25), Some(t0 + Duration::from_millis(2)));
        assert_eq!(tracker.reached(26), None);
        assert_eq!(tracker.lowest(), 25);
    }
}
