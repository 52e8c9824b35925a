//! HTTP plumbing: replies with Consul's index headers, query parsing, the routing of
//! `/v1/...` paths to the handlers, and blocking queries.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tracing::debug;

use super::{
    catalog::{
        agent_service_deregister, agent_service_register, catalog_deregister, catalog_nodes,
        catalog_register, catalog_service, catalog_services,
    },
    kv::{kv_delete, kv_get, kv_put},
    session::{
        serf_flap, session_create, session_destroy, session_info, session_list, session_renew,
    },
    shared::Shared,
    state::{Concern, State},
    DEFAULT_WAIT, LEADER_ADDR, MAX_WAIT,
};

pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) body: Vec<u8>,
    pub(super) json: bool,
    pub(super) index: Option<u64>,
}

impl Reply {
    pub(super) fn json(value: &Value) -> Self {
        Self {
            status: StatusCode::OK,
            body: value.to_string().into_bytes(),
            json: true,
            index: None,
        }
    }

    pub(super) fn text(status: StatusCode, text: impl Into<String>) -> Self {
        Self {
            status,
            body: text.into().into_bytes(),
            json: false,
            index: None,
        }
    }

    /// A request body as JSON, or the 400 Consul answers when it does not decode.
    pub(super) fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Self> {
        serde_json::from_slice(body).map_err(|e| {
            Self::text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        })
    }

    pub(super) fn with_index(mut self, index: u64) -> Self {
        self.index = Some(index);
        self
    }

    pub(super) fn into_response(self) -> Response<Full<Bytes>> {
        let mut builder = Response::builder().status(self.status).header(
            header::CONTENT_TYPE,
            if self.json {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            },
        );
        if let Some(index) = self.index {
            builder = builder
                .header("X-Consul-Index", index.to_string())
                .header("X-Consul-Knownleader", "true")
                .header("X-Consul-Lastcontact", "0");
        }
        builder
            .body(Full::new(Bytes::from(self.body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

/// Query parameters, percent-decoded; flags like `?recurse` map to "".
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    pub(super) fn parse(q: Option<&str>) -> Self {
        let pairs = q
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(p), String::new()),
            })
            .collect();
        Self(pairs)
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub(super) fn u64(&self, key: &str) -> Result<Option<u64>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Reply::text(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid {key} value: {v:?}"),
                )
            }),
        }
    }
}

pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a Go duration string (`"1s"`, `"1500ms"`, `"1m30s"`); `"0"` is zero.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let number: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        nanos += number * scale;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_nanos(nanos as u64))
}

pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let token = req
        .headers()
        .get("X-Consul-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let token = token.as_deref();
    if let Err(denied) = shared.config.acl.authorize(&method, &path, &query, token) {
        debug!(%method, path, "ACL denied");
        return denied.into_response();
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Reply::text(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
                .into_response()
        }
    };
    if path == "/v1/txn" {
        if let Err(denied) = shared.config.acl.authorize_txn(&body, &query, token) {
            return denied.into_response();
        }
    }
    let reply = route(&shared, &method, &path, &query, body).await;
    debug!(%method, path, status = reply.status.as_u16(), "request");
    reply.into_response()
}

pub(super) fn method_not_allowed(method: &Method) -> Reply {
    Reply::text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed"),
    )
}

pub(super) async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &Query,
    body: Bytes,
) -> Reply {
    if let Some(raw_key) =
        path.strip_prefix("/v1/kv/")
            .or(if path == "/v1/kv" { Some("") } else { None })
    {
        let key = percent_decode(raw_key);
        return match *method {
            Method::GET => kv_get(shared, &key, query).await,
            Method::PUT => kv_put(shared, &key, query, body),
            Method::DELETE => kv_delete(shared, &key, query),
            _ => method_not_allowed(method),
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/session/") {
        let (op, arg) = rest.split_once('/').unwrap_or((rest, ""));
        let arg = percent_decode(arg);
        return match (op, method) {
            ("create", &Method::PUT) => session_create(shared, &body),
            ("renew", &Method::PUT) => session_renew(shared, &arg),
            ("destroy", &Method::PUT) => session_destroy(shared, &arg),
            ("info", &Method::GET) => session_info(shared, &arg),
            ("list", &Method::GET) => session_list(shared),
            ("create" | "renew" | "destroy" | "info" | "list", _) => method_not_allowed(method),
            _ => not_found(path),
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/catalog/") {
        let (op, arg) = rest.split_once('/').unwrap_or((rest, ""));
        let arg = percent_decode(arg);
        return match (op, method) {
            ("register", &Method::PUT) => catalog_register(shared, &body),
            ("deregister", &Method::PUT) => catalog_deregister(shared, &body),
            ("service", &Method::GET) if !arg.is_empty() => {
                catalog_service(shared, &arg, query).await
            }
            ("services", &Method::GET) => catalog_services(shared),
            ("nodes", &Method::GET) => catalog_nodes(shared),
            ("register" | "deregister" | "service" | "services" | "nodes", _) => {
                method_not_allowed(method)
            }
            _ => not_found(path),
        };
    }
    if let Some(id) = path.strip_prefix("/v1/agent/service/deregister/") {
        return match *method {
            Method::PUT => agent_service_deregister(shared, &percent_decode(id)),
            _ => method_not_allowed(method),
        };
    }
    if path == "/v1/txn" {
        return match *method {
            Method::PUT => match super::txn::decode_ops(&body) {
                Ok(ops) => super::txn::txn(shared, ops),
                Err(reply) => reply,
            },
            _ => method_not_allowed(method),
        };
    }
    match (path, method) {
        ("/v1/agent/service/register", &Method::PUT) => agent_service_register(shared, &body),
        ("/v1/dev/serf-flap", &Method::PUT) => serf_flap(shared, query.get("node")),
        ("/v1/status/leader", &Method::GET) => Reply::json(&json!(LEADER_ADDR)),
        ("/v1/status/peers", &Method::GET) => Reply::json(&json!([LEADER_ADDR])),
        ("/v1/agent/self", &Method::GET) => Reply::json(&json!({
            "Config": {
                "Datacenter": shared.config.datacenter,
                "NodeName": shared.config.node_name,
                "Server": true,
                "Version": "1.0.0-overlay-dev",
                "Revision": "dev",
            },
            "Member": {
                "Name": shared.config.node_name,
                "Addr": "127.0.0.1",
                "Port": 8301,
                "Status": 1,
            },
        })),
        _ => not_found(path),
    }
}

pub(super) fn not_found(path: &str) -> Reply {
    Reply::text(StatusCode::NOT_FOUND, format!("Not found: {path}"))
}

/// The parameters of a blocking query: `None` when the read must not block.
pub(super) fn blocking_params(query: &Query) -> Result<Option<(u64, Duration)>, Reply> {
    let index = query.u64("index")?.unwrap_or(0);
    if index == 0 {
        return Ok(None);
    }
    let wait = match query.get("wait") {
        None | Some("") => DEFAULT_WAIT,
        Some(w) => parse_go_duration(w).ok_or_else(|| {
            Reply::text(StatusCode::BAD_REQUEST, format!("Invalid wait time: {w:?}"))
        })?,
    };
    Ok(Some((index, wait.min(MAX_WAIT))))
}

/// Runs `read` until the index it reports exceeds the requested one or the wait expires
/// (then answering with the unchanged index), like Consul's blocking queries.
pub(super) async fn blocking_read(
    shared: &Arc<Shared>,
    query: &Query,
    read: impl Fn(&State) -> Reply,
) -> Reply {
    blocking_read_of(shared, query, |_, _| Concern::Maybe, read).await
}

/// [`blocking_read`] for a read that can tell cheaply whether the writes after a global
/// index concern it (`concern(state, seen)`): it is answered again only then.
pub(super) async fn blocking_read_of(
    shared: &Arc<Shared>,
    query: &Query,
    concern: impl Fn(&State, u64) -> Concern,
    read: impl Fn(&State) -> Reply,
) -> Reply {
    let params = match blocking_params(query) {
        Ok(p) => p,
        Err(reply) => return reply,
    };
    let Some((min_index, wait)) = params else {
        return read(&shared.lock());
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = shared.changes.subscribe();
    // The global index the last answer was made at.
    let mut seen: Option<u64> = None;
    loop {
        changes.borrow_and_update();
        {
            let state = shared.lock();
            let answer = match seen {
                Some(at) => concern(&state, at) == Concern::Maybe,
                None => true,
            };
            if answer {
                let reply = read(&state);
                if reply.index.is_some_and(|i| i > min_index) {
                    return reply;
                }
            }
            seen = Some(state.index);
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out (or the server is going away): answer with what is there now.
            _ => return read(&shared.lock()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_go_duration("1500ms"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("s"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
