//! `/v1/kv/`: reads (single key, `?recurse`, `?keys`, `?raw`, blocking), writes with
//! `?cas`, `?acquire` and `?release`, and deletes.
use std::{sync::Arc, time::Instant};

use base64::Engine as _;
use bytes::Bytes;
use hyper::StatusCode;
use serde_json::{json, Value};

use super::{
    http::{blocking_read_of, Query, Reply},
    shared::Shared,
    state::{Entry, State},
    MAX_VALUE_SIZE,
};

pub(super) fn entry_json(key: &str, e: &Entry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": key,
        "Flags": e.flags,
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let Some(s) = &e.session {
        v["Session"] = json!(s);
    }
    v
}

pub(super) async fn kv_get(shared: &Arc<Shared>, key: &str, query: &Query) -> Reply {
    let recurse = query.has("recurse");
    let keys = query.has("keys");
    let raw = query.has("raw");
    let separator = query.get("separator").unwrap_or("").to_string();
    if !recurse && !keys && key.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let key = key.to_string();
    let watched = key.clone();
    let exact = !recurse && !keys;
    let concern = move |state: &State, seen: u64| state.kv_concern(&watched, exact, seen);
    blocking_read_of(shared, query, concern, move |state| {
        if keys {
            let index = state.kv_index(&key, false);
            let mut names: Vec<String> = Vec::new();
            for k in state
                .kv
                .range(key.clone()..)
                .take_while(|(k, _)| k.starts_with(&key))
                .map(|(k, _)| k)
            {
                let name = if separator.is_empty() {
                    k.clone()
                } else {
                    match k[key.len()..].find(&separator) {
                        Some(pos) => k[..key.len() + pos + separator.len()].to_string(),
                        None => k.clone(),
                    }
                };
                if names.last() != Some(&name) {
                    names.push(name);
                }
            }
            if names.is_empty() {
                return Reply::text(StatusCode::NOT_FOUND, "").with_index(index);
            }
            return Reply::json(&json!(names)).with_index(index);
        }
        if recurse {
            let index = state.kv_index(&key, false);
            let entries: Vec<Value> = state
                .kv
                .range(key.clone()..)
                .take_while(|(k, _)| k.starts_with(&key))
                .map(|(k, e)| entry_json(k, e))
                .collect();
            if entries.is_empty() {
                return Reply::text(StatusCode::NOT_FOUND, "").with_index(index);
            }
            return Reply::json(&Value::Array(entries)).with_index(index);
        }
        let index = state.kv_index(&key, true);
        match state.kv.get(&key) {
            None => Reply::text(StatusCode::NOT_FOUND, "").with_index(index),
            Some(e) if raw => Reply {
                status: StatusCode::OK,
                body: e.value.clone(),
                json: false,
                index: Some(index),
            },
            Some(e) => Reply::json(&json!([entry_json(&key, e)])).with_index(index),
        }
    })
    .await
}

pub(super) fn kv_put(shared: &Arc<Shared>, key: &str, query: &Query, body: Bytes) -> Reply {
    if key.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if body.len() > MAX_VALUE_SIZE {
        return Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({} bytes) too large, max size: {MAX_VALUE_SIZE} bytes",
                body.len()
            ),
        );
    }
    let flags = match query.u64("flags") {
        Ok(f) => f.unwrap_or(0),
        Err(r) => return r,
    };
    let cas = match query.u64("cas") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let value = body.to_vec();
    let now = Instant::now();
    let result: Result<bool, Reply> = shared.write(|state| {
        if let Some(session) = query.get("acquire") {
            if !state.sessions.contains_key(session) {
                return Err(Reply::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("invalid session \"{session}\""),
                ));
            }
            if state.lock_delays.get(key).is_some_and(|until| *until > now) {
                return Ok(false);
            }
            let holder = state.kv.get(key).and_then(|e| e.session.clone());
            return Ok(match holder {
                Some(h) if h == session => {
                    state.kv_set(key, value, flags, None, false);
                    true
                }
                Some(_) => false,
                None => {
                    state.kv_set(key, value, flags, Some(Some(session.to_string())), true);
                    true
                }
            });
        }
        if let Some(session) = query.get("release") {
            let holder = state.kv.get(key).and_then(|e| e.session.clone());
            return Ok(if holder.as_deref() == Some(session) {
                state.kv_set(key, value, flags, Some(None), false);
                true
            } else {
                false
            });
        }
        if let Some(cas) = cas {
            let current = state.kv.get(key).map(|e| e.modify_index);
            let matches = match current {
                None => cas == 0,
                Some(m) => cas != 0 && m == cas,
            };
            if !matches {
                return Ok(false);
            }
        }
        state.kv_set(key, value, flags, None, false);
        Ok(true)
    });
    match result {
        Ok(b) => Reply::json(&json!(b)),
        Err(r) => r,
    }
}

pub(super) fn kv_delete(shared: &Arc<Shared>, key: &str, query: &Query) -> Reply {
    let recurse = query.has("recurse");
    if key.is_empty() && !recurse {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = match query.u64("cas") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let done = shared.write(|state| {
        if recurse {
            let doomed: Vec<String> = state
                .kv
                .range(key.to_string()..)
                .take_while(|(k, _)| k.starts_with(key))
                .map(|(k, _)| k.clone())
                .collect();
            if !doomed.is_empty() {
                let idx = state.bump();
                for k in doomed {
                    state.kv_delete(&k, idx);
                }
            }
            return true;
        }
        match (state.kv.get(key).map(|e| e.modify_index), cas) {
            // Like Consul: deleting a key that is not there succeeds, with or without cas.
            (None, _) => true,
            (Some(m), Some(cas)) if m != cas => false,
            (Some(_), _) => {
                let idx = state.bump();
                state.kv_delete(key, idx)
            }
        }
    });
    Reply::json(&json!(done))
}
