//! The dev server's data: KV entries, sessions, catalog nodes and services, and the
//! state transitions Consul defines on them (the global index, tombstones, what a
//! session's invalidation does to the keys it holds).
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The gossip health check every Consul agent's node has.
pub(super) const SERF_HEALTH: &str = "serfHealth";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) value: Vec<u8>,
    pub(super) flags: u64,
    pub(super) create_index: u64,
    pub(super) modify_index: u64,
    pub(super) lock_index: u64,
    pub(super) session: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Behavior {
    Release,
    Delete,
}

impl Behavior {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Session {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) node: String,
    pub(super) ttl: Option<(String, Duration)>,
    pub(super) behavior: Behavior,
    pub(super) lock_delay: Duration,
    /// The node health checks whose failure invalidates the session (Consul's
    /// default, when the request names none, is the node's `serfHealth`).
    #[serde(default)]
    pub(super) node_checks: Vec<String>,
    pub(super) create_index: u64,
    /// When the session is invalidated unless renewed (twice the TTL, as Consul does).
    #[serde(skip)]
    pub(super) deadline: Option<Instant>,
}

impl Session {
    pub(super) fn json(&self) -> Value {
        json!({
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": self.lock_delay.as_nanos() as u64,
            "Behavior": self.behavior.as_str(),
            "TTL": self.ttl.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
            "NodeChecks": self.node_checks,
            "ServiceChecks": Value::Null,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Service {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) address: String,
    pub(super) port: u16,
    pub(super) tags: Vec<String>,
    pub(super) meta: BTreeMap<String, String>,
    pub(super) create_index: u64,
    pub(super) modify_index: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Node {
    pub(super) address: String,
    pub(super) services: BTreeMap<String, Service>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct State {
    pub(super) index: u64,
    pub(super) kv: BTreeMap<String, Entry>,
    /// Index at which each deleted key was deleted, so a read of a prefix reports (and a
    /// blocking query wakes on) deletions under it.
    pub(super) tombstones: BTreeMap<String, u64>,
    /// Keys that cannot be acquired before the given instant.
    #[serde(skip)]
    pub(super) lock_delays: HashMap<String, Instant>,
    pub(super) sessions: BTreeMap<String, Session>,
    pub(super) session_index: u64,
    pub(super) nodes: BTreeMap<String, Node>,
    pub(super) catalog_index: u64,
    /// The last KV keys written or deleted, with their index: lets a blocking KV read
    /// stay asleep through writes elsewhere (Consul's watches are per radix-tree node,
    /// so a write under `applied/` wakes no query on `nodes/`).
    #[serde(skip)]
    pub(super) recent_keys: std::collections::VecDeque<(u64, String)>,
}

/// How many recent KV changes [`State::recent_keys`] keeps; a blocked read that slept
/// through more is simply answered again.
const RECENT_KEYS: usize = 4096;

/// Whether a KV read is concerned by writes made after an index.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Concern {
    /// No key it reads changed.
    Untouched,
    /// A key it reads changed, or the changes since then are no longer known.
    Maybe,
}

impl State {
    pub(super) fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn note_changed(&mut self, idx: u64, key: &str) {
        if self.recent_keys.len() == RECENT_KEYS {
            self.recent_keys.pop_front();
        }
        self.recent_keys.push_back((idx, key.to_string()));
    }

    /// Whether a KV read of `prefix` (`exact`: one key) answered at global index
    /// `seen` may answer differently now.
    pub(super) fn kv_concern(&self, prefix: &str, exact: bool, seen: u64) -> Concern {
        if self.index == seen {
            return Concern::Untouched;
        }
        // Complete after `seen` only if the oldest change kept is not after it (a
        // transaction's keys share an index, and some of them may have been dropped).
        let oldest = self.recent_keys.front().map_or(u64::MAX, |(i, _)| *i);
        if oldest > seen {
            return Concern::Maybe;
        }
        let touched = (self.recent_keys.iter().rev())
            .take_while(|(i, _)| *i > seen)
            .any(|(_, k)| {
                if exact {
                    k == prefix
                } else {
                    k.starts_with(prefix)
                }
            });
        if touched {
            Concern::Maybe
        } else {
            Concern::Untouched
        }
    }

    /// The index to report for a KV read of `prefix` (`exact`: one key): the highest
    /// ModifyIndex of the matching keys or the last deletion among them, else the
    /// global index (as Consul falls back to the table index).
    pub(super) fn kv_index(&self, prefix: &str, exact: bool) -> u64 {
        if prefix.is_empty() {
            return self.index.max(1);
        }
        let local = if exact {
            let live = self.kv.get(prefix).map_or(0, |e| e.modify_index);
            live.max(self.tombstones.get(prefix).copied().unwrap_or(0))
        } else {
            let live = self
                .kv
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, e)| e.modify_index)
                .max()
                .unwrap_or(0);
            let dead = self
                .tombstones
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, i)| *i)
                .max()
                .unwrap_or(0);
            live.max(dead)
        };
        if local == 0 {
            self.index.max(1)
        } else {
            local
        }
    }

    pub(super) fn kv_set(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: Option<Option<String>>,
        lock_bump: bool,
    ) {
        let idx = self.bump();
        self.kv_set_at(key, value, flags, idx);
        let Some(entry) = self.kv.get_mut(key) else {
            return;
        };
        if let Some(session) = session {
            entry.session = session;
        }
        if lock_bump {
            entry.lock_index += 1;
        }
    }

    /// Sets `key` at index `idx` (a transaction's writes share one), keeping its
    /// session and lock index.
    pub(super) fn kv_set_at(&mut self, key: &str, value: Vec<u8>, flags: u64, idx: u64) {
        let entry = self.kv.entry(key.to_string()).or_insert_with(|| Entry {
            value: Vec::new(),
            flags: 0,
            create_index: idx,
            modify_index: idx,
            lock_index: 0,
            session: None,
        });
        entry.value = value;
        entry.flags = flags;
        entry.modify_index = idx;
        self.note_changed(idx, key);
    }

    pub(super) fn kv_delete(&mut self, key: &str, idx: u64) -> bool {
        if self.kv.remove(key).is_some() {
            self.tombstones.insert(key.to_string(), idx);
            self.note_changed(idx, key);
            true
        } else {
            false
        }
    }

    /// What a gossip flap of `node` (or a restart of its Consul agent) does: its
    /// `serfHealth` check goes critical, which invalidates every session tied to it.
    /// Returns how many sessions were invalidated.
    pub(super) fn serf_flap(&mut self, node: &str, now: Instant) -> usize {
        let tied: Vec<String> = self
            .sessions
            .values()
            .filter(|s| s.node == node && s.node_checks.iter().any(|c| c == SERF_HEALTH))
            .map(|s| s.id.clone())
            .collect();
        for id in &tied {
            self.invalidate_session(id, now);
        }
        tied.len()
    }

    /// Destroys a session: its locks are released or its keys deleted (per Behavior)
    /// and the keys it held enter their lock-delay.
    pub(super) fn invalidate_session(&mut self, id: &str, now: Instant) {
        let Some(session) = self.sessions.remove(id) else {
            return;
        };
        let idx = self.bump();
        self.session_index = idx;
        let held: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, e)| e.session.as_deref() == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        for key in held {
            if !session.lock_delay.is_zero() {
                self.lock_delays
                    .insert(key.clone(), now + session.lock_delay);
            }
            match session.behavior {
                Behavior::Delete => {
                    self.kv_delete(&key, idx);
                }
                Behavior::Release => {
                    if let Some(e) = self.kv.get_mut(&key) {
                        e.session = None;
                        e.modify_index = idx;
                        self.note_changed(idx, &key);
                    }
                }
            }
        }
        self.lock_delays.retain(|_, until| *until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::devserver::{shared::Shared, DevConfig};

    #[test]
    fn a_kv_read_is_concerned_only_by_writes_under_what_it_reads() {
        let mut state = Shared::fresh_state(&DevConfig::default());
        state.kv_set("o/nodes/a", b"1".to_vec(), 0, None, false);
        let seen = state.index;
        state.kv_set("o/applied/a", b"7".to_vec(), 0, None, false);
        assert_eq!(
            state.kv_concern("o/nodes/", false, seen),
            Concern::Untouched
        );
        assert_eq!(
            state.kv_concern("o/nodes/a", true, seen),
            Concern::Untouched
        );
        assert_eq!(state.kv_concern("o/applied/", false, seen), Concern::Maybe);
        let seen = state.index;
        let idx = state.bump();
        state.kv_delete("o/nodes/a", idx);
        assert_eq!(state.kv_concern("o/nodes/", false, seen), Concern::Maybe);
        assert_eq!(state.kv_concern("o/nodes/a", true, seen), Concern::Maybe);
        assert_eq!(
            state.kv_concern("o/nodes/b", true, seen),
            Concern::Untouched
        );
    }

    #[test]
    fn a_kv_read_that_slept_through_more_than_is_kept_is_answered_again() {
        let mut state = Shared::fresh_state(&DevConfig::default());
        let seen = state.index;
        for i in 0..=RECENT_KEYS {
            state.kv_set(&format!("o/applied/{i}"), b"1".to_vec(), 0, None, false);
        }
        assert_eq!(state.kv_concern("o/nodes/", false, seen), Concern::Maybe);
        let seen = state.index;
        state.kv_set("o/applied/x", b"1".to_vec(), 0, None, false);
        assert_eq!(
            state.kv_concern("o/nodes/", false, seen),
            Concern::Untouched
        );
    }
}
