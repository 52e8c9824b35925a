//! The store records the agent currently rejects, by key: each (key, reason) is reported
//! once while it lasts (and again if it comes back after going away), whether it was
//! found by a full judgement or by a batch of changes judged on its own.
use std::collections::{BTreeMap, BTreeSet};

use crate::store::records::{RecordKind, RejectReason, Rejection};

#[derive(Debug, Default)]
pub(super) struct Rejections {
    by_key: BTreeMap<String, Vec<Rejection>>,
}

impl Rejections {
    /// Replaces everything with a full judgement's rejections; returns the fresh ones.
    pub fn replace_all(&mut self, current: &[Rejection]) -> Vec<Rejection> {
        let before = std::mem::take(&mut self.by_key);
        self.insert(current.iter().cloned(), &before)
    }

    /// Replaces the rejections of `keys` (judged again) with `current`; returns the
    /// fresh ones.
    pub fn replace_keys(
        &mut self,
        keys: &BTreeSet<String>,
        current: Vec<Rejection>,
    ) -> Vec<Rejection> {
        let before: BTreeMap<String, Vec<Rejection>> = keys
            .iter()
            .filter_map(|k| self.by_key.remove_entry(k))
            .collect();
        self.insert(current, &before)
    }

    fn insert(
        &mut self,
        current: impl IntoIterator<Item = Rejection>,
        before: &BTreeMap<String, Vec<Rejection>>,
    ) -> Vec<Rejection> {
        let mut fresh = Vec::new();
        for rejection in current {
            let seen = (before.get(&rejection.key).into_iter().flatten())
                .any(|r| r.reason == rejection.reason);
            if !seen {
                fresh.push(rejection.clone());
            }
            self.by_key
                .entry(rejection.key.clone())
                .or_default()
                .push(rejection);
        }
        fresh
    }

    pub fn len(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    /// Counted by (kind, reason), for metrics.
    pub fn count(&self) -> BTreeMap<(RecordKind, RejectReason), u64> {
        let mut out = BTreeMap::new();
        for r in self.by_key.values().flatten() {
            *out.entry((r.kind, r.reason)).or_default() += 1;
        }
        out
    }
}
