//! The state behind its lock, shared by the request handlers and the session reaper:
//! every write wakes blocking queries and, with a data directory, is saved to disk.
use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
    time::Instant,
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    state::{Node, Service, State},
    DevConfig, DevError,
};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) changes: watch::Sender<u64>,
    pub(super) config: DevConfig,
    pub(super) ids: AtomicU64,
    pub(super) id_seed: std::collections::hash_map::RandomState,
}

pub(super) const STATE_FILE: &str = "state.json";

impl Shared {
    pub(super) fn new(config: DevConfig) -> Result<Self, DevError> {
        let state = match &config.data_dir {
            Some(dir) if dir.join(STATE_FILE).exists() => Self::load(&dir.join(STATE_FILE))?,
            _ => Self::fresh_state(&config),
        };
        let (changes, _) = watch::channel(state.index);
        let shared = Self {
            state: Mutex::new(state),
            changes,
            config,
            ids: AtomicU64::new(0),
            id_seed: std::collections::hash_map::RandomState::new(),
        };
        shared.save(&shared.lock());
        Ok(shared)
    }

    /// Reads a saved state; session TTL clocks restart now.
    pub(super) fn load(path: &std::path::Path) -> Result<State, DevError> {
        let fail = |message: String| DevError::Load {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let mut state: State = serde_json::from_slice(&text).map_err(|e| fail(e.to_string()))?;
        let now = Instant::now();
        for session in state.sessions.values_mut() {
            session.deadline = session.ttl.as_ref().map(|(_, ttl)| now + *ttl * 2);
        }
        info!(path = %path.display(), index = state.index, keys = state.kv.len(), sessions = state.sessions.len(), "state loaded");
        Ok(state)
    }

    /// Writes the state to the data directory, if there is one (temp file + rename).
    pub(super) fn save(&self, state: &State) {
        let Some(dir) = &self.config.data_dir else {
            return;
        };
        let result = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let temp = dir.join(format!("{STATE_FILE}.tmp"));
            std::fs::write(
                &temp,
                serde_json::to_vec(state).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&temp, dir.join(STATE_FILE))
        })();
        if let Err(e) = result {
            warn!(dir = %dir.display(), error = %e, "cannot save the state");
        }
    }

    pub(super) fn fresh_state(config: &DevConfig) -> State {
        let mut state = State {
            index: 0,
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            lock_delays: HashMap::new(),
            sessions: BTreeMap::new(),
            session_index: 0,
            nodes: BTreeMap::new(),
            catalog_index: 0,
            recent_keys: Default::default(),
        };
        // Consul registers its own node and the `consul` service.
        let idx = state.bump();
        state.catalog_index = idx;
        let mut services = BTreeMap::new();
        services.insert(
            "consul".to_string(),
            Service {
                id: "consul".to_string(),
                name: "consul".to_string(),
                address: String::new(),
                port: 8300,
                tags: Vec::new(),
                meta: BTreeMap::new(),
                create_index: idx,
                modify_index: idx,
            },
        );
        state.nodes.insert(
            config.node_name.clone(),
            Node {
                address: "127.0.0.1".to_string(),
                services,
            },
        );
        state
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters for a dev server; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a mutation and wakes blocking queries when it moved the index.
    pub(super) fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (result, before, after) = {
            let mut state = self.lock();
            let before = state.index;
            let result = f(&mut state);
            if state.index != before {
                self.save(&state);
            }
            (result, before, state.index)
        };
        if after != before {
            self.changes.send_replace(after);
        }
        result
    }

    /// A random (v4-style) UUID.
    pub(super) fn new_uuid(&self) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let mut words = [0u64; 2];
        for (i, w) in words.iter_mut().enumerate() {
            let mut h = self.id_seed.build_hasher();
            h.write_u64(n);
            h.write_u64(i as u64);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            *w = h.finish();
        }
        let b: u128 = ((words[0] as u128) << 64 | words[1] as u128) & !(0xf000u128 << 64)
            | (0x4000u128 << 64);
        let b = b & !(0xc000u128 << 48) | (0x8000u128 << 48);
        let hex = format!("{b:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_look_like_uuids() {
        let shared = Shared::new(DevConfig::default()).unwrap();
        let a = shared.new_uuid();
        let b = shared.new_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
