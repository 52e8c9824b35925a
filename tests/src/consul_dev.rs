//! A Consul-compatible development server: the subset of Consul's HTTP API that
//! `overlay_ctl::store::consul` uses, with Consul's documented edge semantics, state in memory
//! (as `consul agent -dev` keeps it) or, with a data directory, also on disk so that a
//! restarted server has it all again, as a real Consul server does. It exists because no Consul binary can be
//! installed where the project is built and tested; the client is written against the
//! real API and works unchanged against a real agent.
//!
//! What it implements:
//! - one global raft-like index, incremented on every write;
//! - KV: `GET` (single key, `?recurse`, `?keys` with `?separator`, `?raw`), `PUT` (with
//!   `?flags`, `?cas`, `?acquire`, `?release`), `DELETE` (with `?recurse`, `?cas`);
//!   `X-Consul-Index` on every read; blocking queries with `?index=` and `?wait=`
//!   (default 5 minutes, at most 10);
//! - sessions with TTL (invalidated after twice the TTL without a renew, as Consul may),
//!   `Behavior` `release`/`delete`, lock-delay, create/renew/destroy/info/list;
//! - catalog register/deregister, `service/:name`, `services`, `nodes`;
//! - `/v1/status/leader`, `/v1/status/peers`, `/v1/agent/self`.
//!
//! With `data_dir` the state (KV with all indexes, the global index, sessions, catalog) is
//! written to `DIR/state.json` after every change (temporary file and rename, so a kill
//! never leaves a torn file) and loaded at start. Instants cannot be saved: on load every
//! session's TTL clock restarts (as Consul restarts them on a leader change) and pending
//! lock-delays are dropped.
//!
//! ACLs are not enforced (as in `consul agent -dev` without an ACL config): a token is
//! accepted and ignored. Anything else answers 404 with a text body.
use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, Hasher},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

/// Consul's default `kv_max_value_size`.
pub const MAX_VALUE_SIZE: usize = 512 * 1024;
/// Consul's upper bound for a session TTL.
pub const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
/// Consul's default lock-delay.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// Default and maximum `wait` of a blocking query.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// The address `/v1/status/leader` reports.
const LEADER_ADDR: &str = "127.0.0.1:8300";

#[derive(Clone, Debug)]
pub struct DevConfig {
    /// The smallest session TTL accepted. Consul's own default `session_ttl_min` is 10s;
    /// the dev server defaults to 1s so tests can exercise expiry quickly (like a Consul
    /// configured with `session_ttl_min = "1s"`).
    pub session_ttl_min: Duration,
    pub node_name: String,
    pub datacenter: String,
    /// How often expired sessions are looked for.
    pub reap_interval: Duration,
    /// Keep the state in `state.json` here across restarts (`None`: memory only).
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            session_ttl_min: Duration::from_secs(1),
            node_name: "overlay-consul-dev".to_string(),
            datacenter: "dc1".to_string(),
            reap_interval: Duration::from_millis(50),
            data_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot load the saved state {path}: {message}")]
    Load {
        path: std::path::PathBuf,
        message: String,
    },
}

/// A running dev server; stops when dropped.
pub struct ConsulDev {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl ConsulDev {
    /// Starts a server on `listen` (`127.0.0.1:0` picks a free port) with the default
    /// configuration.
    pub async fn start(listen: &str) -> Result<Self, DevError> {
        Self::start_with(listen, DevConfig::default()).await
    }

    pub async fn start_with(listen: &str, config: DevConfig) -> Result<Self, DevError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| DevError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| DevError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        let shared = Arc::new(Shared::new(config)?);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        let reaper = tokio::spawn(reap_loop(shared.clone()));
        info!(%addr, "consul dev server started");
        Ok(Self {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            tasks: vec![accept, reaper],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for `CONSUL_HTTP_ADDR`.
    pub fn http_addr(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current global index.
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// Stops accepting, closes open connections and waits for the server tasks.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ConsulDev {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: oneshot::Receiver<()>) {
    let handler = move |req| handle(shared.clone(), req);
    overlay_ctl::http::serve(listener, handler, async {
        let _ = shutdown.await;
    })
    .await;
    debug!("consul dev server stopped accepting");
}

async fn reap_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        shared.write(|state| {
            let expired: Vec<String> = state
                .sessions
                .values()
                .filter(|s| s.deadline.is_some_and(|d| d <= now))
                .map(|s| s.id.clone())
                .collect();
            for id in expired {
                info!(session = %id, "session TTL expired; invalidating");
                state.invalidate_session(&id, now);
            }
        });
    }
}

// ---------------------------------------------------------------------------
// State

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    value: Vec<u8>,
    flags: u64,
    create_index: u64,
    modify_index: u64,
    lock_index: u64,
    session: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Behavior {
    Release,
    Delete,
}

impl Behavior {
    fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Session {
    id: String,
    name: String,
    node: String,
    ttl: Option<(String, Duration)>,
    behavior: Behavior,
    lock_delay: Duration,
    create_index: u64,
    /// When the session is invalidated unless renewed (twice the TTL, as Consul does).
    #[serde(skip)]
    deadline: Option<Instant>,
}

impl Session {
    fn json(&self) -> Value {
        json!({
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": self.lock_delay.as_nanos() as u64,
            "Behavior": self.behavior.as_str(),
            "TTL": self.ttl.as_ref().map(|t| t.0.clone()).unwrap_or_default(),
            "NodeChecks": ["serfHealth"],
            "ServiceChecks": Value::Null,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.create_index,
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Service {
    id: String,
    name: String,
    address: String,
    port: u16,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Node {
    address: String,
    services: BTreeMap<String, Service>,
}

#[derive(Serialize, Deserialize)]
struct State {
    index: u64,
    kv: BTreeMap<String, Entry>,
    /// Index at which each deleted key was deleted, so a read of a prefix reports (and a
    /// blocking query wakes on) deletions under it.
    tombstones: BTreeMap<String, u64>,
    /// Keys that cannot be acquired before the given instant.
    #[serde(skip)]
    lock_delays: HashMap<String, Instant>,
    sessions: BTreeMap<String, Session>,
    session_index: u64,
    nodes: BTreeMap<String, Node>,
    catalog_index: u64,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// The index to report for a KV read of `prefix` (`exact`: one key): the highest
    /// ModifyIndex of the matching keys or the last deletion among them, else the
    /// global index (as Consul falls back to the table index).
    fn kv_index(&self, prefix: &str, exact: bool) -> u64 {
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

    fn kv_set(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        session: Option<Option<String>>,
        lock_bump: bool,
    ) {
        let idx = self.bump();
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
        if let Some(session) = session {
            entry.session = session;
        }
        if lock_bump {
            entry.lock_index += 1;
        }
    }

    fn kv_delete(&mut self, key: &str, idx: u64) -> bool {
        if self.kv.remove(key).is_some() {
            self.tombstones.insert(key.to_string(), idx);
            true
        } else {
            false
        }
    }

    /// Destroys a session: its locks are released or its keys deleted (per Behavior)
    /// and the keys it held enter their lock-delay.
    fn invalidate_session(&mut self, id: &str, now: Instant) {
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
                    }
                }
            }
        }
        self.lock_delays.retain(|_, until| *until > now);
    }
}

struct Shared {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    config: DevConfig,
    ids: AtomicU64,
    id_seed: std::collections::hash_map::RandomState,
}

const STATE_FILE: &str = "state.json";

impl Shared {
    fn new(config: DevConfig) -> Result<Self, DevError> {
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
    fn load(path: &std::path::Path) -> Result<State, DevError> {
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
    fn save(&self, state: &State) {
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

    fn fresh_state(config: &DevConfig) -> State {
        let mut state = State {
            index: 0,
            kv: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            lock_delays: HashMap::new(),
            sessions: BTreeMap::new(),
            session_index: 0,
            nodes: BTreeMap::new(),
            catalog_index: 0,
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters for a dev server; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a mutation and wakes blocking queries when it moved the index.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
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
    fn new_uuid(&self) -> String {
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

// ---------------------------------------------------------------------------
// HTTP plumbing

struct Reply {
    status: StatusCode,
    body: Vec<u8>,
    json: bool,
    index: Option<u64>,
}

impl Reply {
    fn json(value: &Value) -> Self {
        Self {
            status: StatusCode::OK,
            body: value.to_string().into_bytes(),
            json: true,
            index: None,
        }
    }

    fn text(status: StatusCode, text: impl Into<String>) -> Self {
        Self {
            status,
            body: text.into().into_bytes(),
            json: false,
            index: None,
        }
    }

    fn with_index(mut self, index: u64) -> Self {
        self.index = Some(index);
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
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
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
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

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, Reply> {
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

fn percent_decode(s: &str) -> String {
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

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Reply::text(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))
                .into_response()
        }
    };
    let reply = route(&shared, &method, &path, &query, body).await;
    debug!(%method, path, status = reply.status.as_u16(), "request");
    reply.into_response()
}

fn method_not_allowed(method: &Method) -> Reply {
    Reply::text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed"),
    )
}

async fn route(
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
    match (path, method) {
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

fn not_found(path: &str) -> Reply {
    Reply::text(StatusCode::NOT_FOUND, format!("Not found: {path}"))
}

/// The parameters of a blocking query: `None` when the read must not block.
fn blocking_params(query: &Query) -> Result<Option<(u64, Duration)>, Reply> {
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
async fn blocking_read(
    shared: &Arc<Shared>,
    query: &Query,
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
    loop {
        changes.borrow_and_update();
        let reply = read(&shared.lock());
        if reply.index.is_some_and(|i| i > min_index) {
            return reply;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            // Timed out (or the server is going away): answer with what is there now.
            _ => return read(&shared.lock()),
        }
    }
}

// ---------------------------------------------------------------------------
// KV

fn entry_json(key: &str, e: &Entry) -> Value {
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

async fn kv_get(shared: &Arc<Shared>, key: &str, query: &Query) -> Reply {
    let recurse = query.has("recurse");
    let keys = query.has("keys");
    let raw = query.has("raw");
    let separator = query.get("separator").unwrap_or("").to_string();
    if !recurse && !keys && key.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let key = key.to_string();
    blocking_read(shared, query, move |state| {
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

fn kv_put(shared: &Arc<Shared>, key: &str, query: &Query, body: Bytes) -> Reply {
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

fn kv_delete(shared: &Arc<Shared>, key: &str, query: &Query) -> Reply {
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

// ---------------------------------------------------------------------------
// Sessions

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct SessionRequest {
    name: String,
    node: String,
    #[serde(rename = "TTL")]
    ttl: String,
    behavior: String,
    lock_delay: Value,
}

fn session_create(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    let req: SessionRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SessionRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return Reply::text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            }
        }
    };
    let behavior = match req.behavior.as_str() {
        "" | "release" => Behavior::Release,
        "delete" => Behavior::Delete,
        other => {
            return Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Invalid Behavior setting '{other}'"),
            )
        }
    };
    let ttl = if req.ttl.is_empty() {
        None
    } else {
        let Some(d) = parse_go_duration(&req.ttl) else {
            return Reply::text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: invalid TTL {:?}", req.ttl),
            );
        };
        if d.is_zero() {
            None
        } else {
            if d < shared.config.session_ttl_min || d > SESSION_TTL_MAX {
                return Reply::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "Invalid Session TTL '{}', must be between [{:?}={:?}]",
                        req.ttl, shared.config.session_ttl_min, SESSION_TTL_MAX
                    ),
                );
            }
            Some((req.ttl.clone(), d))
        }
    };
    // Numbers below 1000 are seconds, larger ones nanoseconds (Consul's FixupLockDelay).
    let lock_delay = match &req.lock_delay {
        Value::Null => DEFAULT_LOCK_DELAY,
        Value::Number(n) => match n.as_u64() {
            Some(n) if n < 1000 => Duration::from_secs(n),
            Some(n) => Duration::from_nanos(n),
            None => {
                return Reply::text(StatusCode::BAD_REQUEST, "Request decode failed: LockDelay")
            }
        },
        Value::String(s) => match parse_go_duration(s) {
            Some(d) => d,
            None => {
                return Reply::text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: invalid LockDelay {s:?}"),
                )
            }
        },
        _ => return Reply::text(StatusCode::BAD_REQUEST, "Request decode failed: LockDelay"),
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

fn session_renew(shared: &Arc<Shared>, id: &str) -> Reply {
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

fn session_destroy(shared: &Arc<Shared>, id: &str) -> Reply {
    if id.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing session");
    }
    shared.write(|state| state.invalidate_session(id, Instant::now()));
    Reply::json(&json!(true))
}

fn session_info(shared: &Arc<Shared>, id: &str) -> Reply {
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

fn session_list(shared: &Arc<Shared>) -> Reply {
    let state = shared.lock();
    let index = state.session_index.max(1);
    let list: Vec<Value> = state.sessions.values().map(Session::json).collect();
    Reply::json(&Value::Array(list)).with_index(index)
}

// ---------------------------------------------------------------------------
// Catalog

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RegisterRequest {
    node: String,
    address: String,
    service: Option<RegisterService>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RegisterService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    address: String,
    port: u16,
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct DeregisterRequest {
    node: String,
    #[serde(rename = "ServiceID")]
    service_id: String,
}

fn catalog_register(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    let req: RegisterRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Reply::text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        }
    };
    if req.node.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing node name");
    }
    if req.address.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing node address");
    }
    if let Some(s) = &req.service {
        if s.service.is_empty() {
            return Reply::text(StatusCode::BAD_REQUEST, "Missing service name");
        }
    }
    shared.write(|state| {
        let idx = state.bump();
        state.catalog_index = idx;
        let node = state.nodes.entry(req.node.clone()).or_insert_with(|| Node {
            address: req.address.clone(),
            services: BTreeMap::new(),
        });
        node.address = req.address.clone();
        if let Some(s) = req.service {
            let id = if s.id.is_empty() {
                s.service.clone()
            } else {
                s.id
            };
            let create_index = node.services.get(&id).map_or(idx, |old| old.create_index);
            node.services.insert(
                id.clone(),
                Service {
                    id,
                    name: s.service,
                    address: s.address,
                    port: s.port,
                    tags: s.tags.unwrap_or_default(),
                    meta: s.meta.unwrap_or_default(),
                    create_index,
                    modify_index: idx,
                },
            );
        }
    });
    Reply::json(&json!(true))
}

fn catalog_deregister(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    let req: DeregisterRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Reply::text(
                StatusCode::BAD_REQUEST,
                format!("Request decode failed: {e}"),
            )
        }
    };
    if req.node.is_empty() {
        return Reply::text(StatusCode::BAD_REQUEST, "Missing node name");
    }
    shared.write(|state| {
        let changed = if req.service_id.is_empty() {
            state.nodes.remove(&req.node).is_some()
        } else {
            state
                .nodes
                .get_mut(&req.node)
                .is_some_and(|n| n.services.remove(&req.service_id).is_some())
        };
        if changed {
            let idx = state.bump();
            state.catalog_index = idx;
        }
    });
    Reply::json(&json!(true))
}

async fn catalog_service(shared: &Arc<Shared>, name: &str, query: &Query) -> Reply {
    let datacenter = shared.config.datacenter.clone();
    blocking_read(shared, query, |state| {
        let mut list = Vec::new();
        for (node_name, node) in &state.nodes {
            for s in node.services.values().filter(|s| s.name == name) {
                list.push(json!({
                    "ID": "",
                    "Node": node_name,
                    "Address": node.address,
                    "Datacenter": datacenter,
                    "TaggedAddresses": Value::Null,
                    "NodeMeta": Value::Null,
                    "ServiceKind": "",
                    "ServiceID": s.id,
                    "ServiceName": s.name,
                    "ServiceTags": s.tags,
                    "ServiceAddress": s.address,
                    "ServicePort": s.port,
                    "ServiceMeta": s.meta,
                    "ServiceEnableTagOverride": false,
                    "CreateIndex": s.create_index,
                    "ModifyIndex": s.modify_index,
                }));
            }
        }
        Reply::json(&Value::Array(list)).with_index(state.catalog_index.max(1))
    })
    .await
}

fn catalog_services(shared: &Arc<Shared>) -> Reply {
    let state = shared.lock();
    let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for node in state.nodes.values() {
        for s in node.services.values() {
            let tags = services.entry(s.name.clone()).or_default();
            for t in &s.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
    }
    Reply::json(&json!(services)).with_index(state.catalog_index.max(1))
}

fn catalog_nodes(shared: &Arc<Shared>) -> Reply {
    let state = shared.lock();
    let list: Vec<Value> = state
        .nodes
        .iter()
        .map(|(name, n)| json!({ "ID": "", "Node": name, "Address": n.address, "Datacenter": shared.config.datacenter }))
        .collect();
    Reply::json(&Value::Array(list)).with_index(state.catalog_index.max(1))
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
