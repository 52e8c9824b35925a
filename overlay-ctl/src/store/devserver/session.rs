//! `/v1/session/`: create (TTL, Behavior, LockDelay as Consul parses them), renew,
//! destroy, info and list.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, info};

use super::{
    http::Reply,
    parse_go_duration,
    shared::Shared,
    state::{Behavior, Session, SERF_HEALTH},
    DEFAULT_LOCK_DELAY, SESSION_TTL_MAX,
};

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
pub(super) struct SessionRequest {
    name: String,
    node: String,
    #[serde(rename = "TTL")]
    ttl: String,
    behavior: String,
    lock_delay: Value,
    /// `None` when absent or null: Consul then ties the session to `serfHealth`.
    node_checks: Option<Vec<String>>,
    /// The legacy name of `NodeChecks`.
    checks: Option<Vec<String>>,
}

/// The node checks a session is tied to, as Consul's `fixupEmptySessionChecks` decides:
/// `serfHealth` when the request names no checks at all, else the ones it names (an
/// explicit empty list: none). Every check named must exist on the node.
fn requested_node_checks(req: &SessionRequest) -> Result<Vec<String>, Reply> {
    if req.node_checks.is_none() && req.checks.is_none() {
        return Ok(vec![SERF_HEALTH.to_string()]);
    }
    let mut checks: Vec<String> = Vec::new();
    for check in req.node_checks.iter().chain(req.checks.iter()).flatten() {
        if check != SERF_HEALTH {
            return Err(Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Missing check '{check}' registration"),
            ));
        }
        if !checks.contains(check) {
            checks.push(check.clone());
        }
    }
    Ok(checks)
}

pub(super) fn session_create(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    let req: SessionRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SessionRequest::default()
    } else {
        match Reply::decode(body) {
            Ok(r) => r,
            Err(reply) => return reply,
        }
    };
    let (behavior, ttl, lock_delay, node_checks) = match (
        parse_behavior(&req.behavior),
        parse_ttl(&req.ttl, shared.config.session_ttl_min),
        parse_lock_delay(&req.lock_delay),
        requested_node_checks(&req),
    ) {
        (Ok(behavior), Ok(ttl), Ok(lock_delay), Ok(checks)) => (behavior, ttl, lock_delay, checks),
        (Err(reply), ..) | (_, Err(reply), ..) | (.., Err(reply), _) | (.., Err(reply)) => {
            return reply
        }
    };
    let node = if req.node.is_empty() {
        shared.config.node_name.clone()
    } else {
        req.node.clone()
    };
    let id = shared.new_uuid();
    let result = shared.write(|state| {
        if !state.nodes.contains_key(&node) {
            return Err(Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Missing node registration: {node}"),
            ));
        }
        let idx = state.bump();
        state.session_index = idx;
        state.sessions.insert(
            id.clone(),
            Session {
                id: id.clone(),
                name: req.name.clone(),
                node: node.clone(),
                deadline: ttl.as_ref().map(|(_, d)| Instant::now() + *d * 2),
                ttl: ttl.clone(),
                behavior,
                lock_delay,
                node_checks: node_checks.clone(),
                create_index: idx,
            },
        );
        Ok(())
    });
    match result {
        Ok(()) => {
            debug!(session = %id, name = %req.name, "session created");
            Reply::json(&json!({ "ID": id }))
        }
        Err(r) => r,
    }
}

fn parse_behavior(behavior: &str) -> Result<Behavior, Reply> {
    match behavior {
        "" | "release" => Ok(Behavior::Release),
        "delete" => Ok(Behavior::Delete),
        other => Err(Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Invalid Behavior setting '{other}'"),
        )),
    }
}

/// The session's TTL as given and parsed; `None` for none (empty or zero).
fn parse_ttl(ttl: &str, ttl_min: Duration) -> Result<Option<(String, Duration)>, Reply> {
    if ttl.is_empty() {
        return Ok(None);
    }
    let Some(d) = parse_go_duration(ttl) else {
        return Err(Reply::text(
            StatusCode::BAD_REQUEST,
            format!("Request decode failed: invalid TTL {ttl:?}"),
        ));
    };
    if d.is_zero() {
        return Ok(None);
    }
    if d < ttl_min || d > SESSION_TTL_MAX {
        return Err(Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "Invalid Session TTL '{ttl}', must be between [{}={}]",
                go_duration_string(ttl_min),
                go_duration_string(SESSION_TTL_MAX)
            ),
        ));
    }
    Ok(Some((ttl.to_string(), d)))
}

/// Numbers below 1000 are seconds, larger ones nanoseconds (Consul's FixupLockDelay).
fn parse_lock_delay(lock_delay: &Value) -> Result<Duration, Reply> {
    let malformed = || Reply::text(StatusCode::BAD_REQUEST, "Request decode failed: LockDelay");
    match lock_delay {
        Value::Null => Ok(DEFAULT_LOCK_DELAY),
        Value::Number(n) => match n.as_u64() {
            Some(n) if n < 1000 => Ok(Duration::from_secs(n)),
            Some(n) => Ok(Duration::from_nanos(n)),
            None => Err(malformed()),
        },
        Value::String(s) => parse_go_duration(s).ok_or_else(|| {
            Reply::text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: invalid LockDelay {s:?}"),
            )
        }),
        _ => Err(malformed()),
    }
}

pub(super) fn session_renew(shared: &Arc<Shared>, id: &str) -> Reply {
    let mut state = shared.lock();
    let index = state.session_index.max(1);
    match state.sessions.get_mut(id) {
        None => Reply::text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        )
        .with_index(index),
        Some(s) => {
            if let Some((_, ttl)) = &s.ttl {
                s.deadline = Some(Instant::now() + *ttl * 2);
            }
            Reply::json(&json!([s.json()])).with_index(index)
        }
    }
}

pub(super) fn session_destroy(shared: &Arc<Shared>, id: &str) -> Reply {
    if id.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing session");
    }
    shared.write(|state| state.invalidate_session(id, Instant::now()));
    Reply::json(&json!(true))
}

pub(super) fn session_info(shared: &Arc<Shared>, id: &str) -> Reply {
    let state = shared.lock();
    let index = state.session_index.max(1);
    let list: Vec<Value> = state
        .sessions
        .get(id)
        .map(Session::json)
        .into_iter()
        .collect();
    Reply::json(&Value::Array(list)).with_index(index)
}

pub(super) fn session_list(shared: &Arc<Shared>) -> Reply {
    let state = shared.lock();
    let index = state.session_index.max(1);
    let list: Vec<Value> = state.sessions.values().map(Session::json).collect();
    Reply::json(&Value::Array(list)).with_index(index)
}

/// `PUT /v1/dev/serf-flap?node=NAME` (dev server only): simulates a gossip flap, or a
/// restart of the Consul agent, of `node` (default: the server's own node). Sessions tied
/// to its `serfHealth` are invalidated, as Consul does; answers how many.
pub(super) fn serf_flap(shared: &Arc<Shared>, node: Option<&str>) -> Reply {
    let node = node
        .filter(|n| !n.is_empty())
        .unwrap_or(&shared.config.node_name)
        .to_string();
    let invalidated = shared.write(|state| state.serf_flap(&node, Instant::now()));
    info!(%node, invalidated, "simulated a serfHealth flap");
    Reply::json(&json!({ "Node": node, "Invalidated": invalidated }))
}

/// A duration as Go's `time.Duration.String` writes it (`10s`, `1m30s`, `24h0m0s`,
/// `500ms`), for messages worded exactly as Consul's.
fn go_duration_string(d: Duration) -> String {
    if d.subsec_nanos() != 0 && d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration_string(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration_string(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration_string(Duration::from_secs(86_400)), "24h0m0s");
        assert_eq!(go_duration_string(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn ttls_outside_consuls_limits_are_refused_as_consul_does() {
        let min = Duration::from_secs(10);
        let refused = parse_ttl("5s", min).expect_err("5s refused");
        assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            String::from_utf8_lossy(&refused.body),
            "Invalid Session TTL '5s', must be between [10s=24h0m0s]"
        );
        assert!(parse_ttl("86401s", min).is_err());
        assert_eq!(parse_ttl("10s", min).ok().flatten().map(|t| t.1), Some(min));
        assert!(parse_ttl("1s", Duration::from_secs(1)).is_ok());
    }
}
