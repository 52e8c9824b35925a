//! A thin typed client for the subset of Consul's HTTP API the control plane uses:
//! the KV store (with check-and-set, locks and blocking queries), sessions and the
//! catalog. It follows the documented API (`/v1/kv`, `/v1/session`, `/v1/catalog`,
//! `/v1/status`) exactly, so it works unchanged against a real Consul agent and against
//! the in-memory development server in the `overlay-tests` package.
//!
//! Every failure, including Consul being unreachable, is a [`ConsulError`]; nothing in
//! here panics on what the network or the server does. Idempotent calls are retried with
//! bounded exponential backoff on transport errors and 5xx answers ([`RetryPolicy`]);
//! calls that are not idempotent (check-and-set, session creation) are retried only when
//! the connection could not be made at all, i.e. when the request was certainly not sent.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{header::HeaderValue, Method, Request, StatusCode};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// The address used when neither `--consul` nor `CONSUL_HTTP_ADDR` names one.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8500";
/// Consul's own environment variables, honoured like the `consul` CLI does.
pub const ENV_ADDR: &str = "CONSUL_HTTP_ADDR";
pub const ENV_TOKEN: &str = "CONSUL_HTTP_TOKEN";
/// The header Consul reads the ACL token from.
pub const TOKEN_HEADER: &str = "X-Consul-Token";
/// The header carrying the index of a blocking-query capable read.
pub const INDEX_HEADER: &str = "X-Consul-Index";
/// Consul caps a blocking query's `wait` at ten minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("invalid Consul address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot reach Consul at {addr}: {message}")]
    Transport { addr: String, message: String },
    #[error("Consul at {addr} did not answer {method} {path} within {timeout:?}")]
    Timeout {
        addr: String,
        method: Method,
        path: String,
        timeout: Duration,
    },
    #[error("Consul answered {method} {path} with HTTP {code}: {body}")]
    Status {
        code: u16,
        method: Method,
        path: String,
        body: String,
    },
    #[error("cannot decode Consul's answer to {path}: {message}")]
    Decode { path: String, message: String },
    #[error("Consul refused {op} on key {key:?}")]
    Rejected { op: &'static str, key: String },
}

impl ConsulError {
    /// The HTTP status of a [`ConsulError::Status`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConsulError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for errors that say Consul could not be reached or timed out (as opposed to
    /// Consul answering with an error).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ConsulError::Transport { .. } | ConsulError::Timeout { .. }
        ) || self.status().is_some_and(|c| c >= 500)
    }
}

/// One KV entry as Consul returns it, with the value already base64-decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPair {
    pub key: String,
    pub value: Vec<u8>,
    pub create_index: u64,
    pub modify_index: u64,
    pub lock_index: u64,
    pub flags: u64,
    /// The session holding the lock on this key, if any.
    pub session: Option<String>,
}

impl KvPair {
    /// The value as UTF-8 text (lossy).
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawKvPair {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
    #[serde(default)]
    lock_index: u64,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    session: Option<String>,
}

/// What Consul does to the locks a session holds when the session is invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionBehavior {
    /// Release the locks; the keys stay.
    Release,
    /// Delete the keys the session holds.
    Delete,
}

/// A session as `GET /v1/session/info/:id` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionInfo {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub node: String,
    #[serde(default = "default_behavior")]
    pub behavior: SessionBehavior,
    /// As Consul reports it, e.g. `"15s"`; empty for sessions without a TTL.
    #[serde(default, rename = "TTL")]
    pub ttl: String,
    /// Nanoseconds (Consul reports a Go `time.Duration`).
    #[serde(default)]
    pub lock_delay: u64,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

fn default_behavior() -> SessionBehavior {
    SessionBehavior::Release
}

/// A service to put in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogService {
    #[serde(rename = "ID")]
    pub id: String,
    /// The service name (`Service` in Consul's register body).
    #[serde(rename = "Service")]
    pub name: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
}

/// One instance of a service as `GET /v1/catalog/service/:name` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogEntry {
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    #[serde(default)]
    pub service_address: String,
    #[serde(default)]
    pub service_port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_tags: Vec<String>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Bounded exponential backoff for retried calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first; 1 means no retries.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The pause before retry number `retry` (1-based).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Whether a call may be repeated after an answer was possibly lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Idempotence {
    /// Safe to repeat: retried on transport errors and 5xx.
    Idempotent,
    /// Retried only when no connection could be made (the request was not sent).
    NotIdempotent,
}

struct RawResponse {
    status: StatusCode,
    index: Option<u64>,
    body: Bytes,
}

/// The error for a response whose status the caller does not accept.
fn status_error(method: &Method, path: &str, resp: &RawResponse) -> ConsulError {
    ConsulError::Status {
        code: resp.status.as_u16(),
        method: method.clone(),
        path: path.to_string(),
        body: String::from_utf8_lossy(&resp.body).trim().to_string(),
    }
}

/// The Consul HTTP API client. Cheap to clone (clones share the connection pool).
#[derive(Clone)]
pub struct ConsulClient {
    /// `host:port`, for messages.
    addr: String,
    /// `http://host:port`.
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    retry: RetryPolicy,
    timeout: Duration,
}

impl std::fmt::Debug for ConsulClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulClient")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Normalises `host:port` or `http://host:port` (a trailing `/` is allowed) to `host:port`.
pub fn parse_addr(addr: &str) -> Result<String, ConsulError> {
    let invalid = |reason: &str| ConsulError::InvalidAddress {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = addr.trim();
    let rest = if let Some(rest) = trimmed.strip_prefix("http://") {
        rest
    } else if trimmed.starts_with("https://") {
        return Err(invalid(
            "https is not supported; use an http:// address (e.g. a local agent)",
        ));
    } else if trimmed.contains("://") {
        return Err(invalid("only http:// addresses are supported"));
    } else {
        trimmed
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(invalid("empty address"));
    }
    if rest.contains('/') {
        return Err(invalid("expected host:port without a path"));
    }
    // Split off the port: after the last ':' unless that is inside an IPv6 literal.
    let (host, port) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains(']') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if host.is_empty() || host == "[]" {
        return Err(invalid("missing host"));
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !host_ok {
        return Err(invalid("not a host name or IP address"));
    }
    match port {
        // Consul's CLI defaults the port to 8500 too.
        None => Ok(format!("{host}:8500")),
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => Ok(format!("{host}:{p}")),
            _ => Err(invalid("the port must be a number in 1..=65535")),
        },
    }
}

/// Percent-encodes a key for use in a URL path, keeping `/` separators.
fn encode_path(key: &str) -> String {
    encode(key, true)
}

/// Percent-encodes a query-string value.
fn encode_query(value: &str) -> String {
    encode(value, false)
}

fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Formats a duration the way Consul (Go's `time.ParseDuration`) reads it: whole seconds
/// as `"15s"`, anything else in milliseconds.
pub fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

/// Consul's documented client rules for the index of the next blocking query, given the
/// index the previous query was made with and the one the answer carried:
/// - if the index went backwards (e.g. a server was restored from a snapshot) reset to
///   0, so the next query is a plain read that re-learns the state;
/// - an index below 1 is treated as 1, so a buggy 0 never turns blocking queries into a
///   busy loop.
pub fn next_watch_index(previous: u64, returned: u64) -> u64 {
    let returned = returned.max(1);
    if returned < previous {
        0
    } else {
        returned
    }
}

impl ConsulClient {
    /// A client for the agent at `addr` (`host:port` or `http://host:port`), sending
    /// `token` (when given) as `X-Consul-Token`.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ConsulError> {
        let addr = parse_addr(addr)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            base: format!("http://{addr}"),
            addr,
            token: token.filter(|t| !t.is_empty()),
            http,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(10),
        })
    }

    /// The address from `cli_addr` (the `--consul` flag), else `CONSUL_HTTP_ADDR`, else
    /// [`DEFAULT_ADDR`]; the ACL token from `CONSUL_HTTP_TOKEN`.
    pub fn from_env(cli_addr: Option<&str>) -> Result<Self, ConsulError> {
        let env_addr = std::env::var(ENV_ADDR)
            .ok()
            .filter(|a| !a.trim().is_empty());
        let addr = cli_addr
            .map(str::to_string)
            .or(env_addr)
            .unwrap_or_else(|| DEFAULT_ADDR.to_string());
        let token = std::env::var(ENV_TOKEN).ok();
        Self::new(&addr, token)
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Replaces the timeout of non-blocking calls (blocking queries get their `wait`
    /// plus a margin).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `host:port` of the agent.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        body: &Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<RawResponse, (ConsulError, bool)> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(format!("{}{}", self.base, path));
        if let Some(token) = &self.token {
            match HeaderValue::from_str(token) {
                Ok(v) => builder = builder.header(TOKEN_HEADER, v),
                Err(_) => {
                    return Err((
                        ConsulError::InvalidArgument(format!(
                            "{ENV_TOKEN} contains characters not allowed in an HTTP header"
                        )),
                        false,
                    ))
                }
            }
        }
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
            .map_err(|e| (ConsulError::InvalidArgument(e.to_string()), false))?;
        let timeout_err = || ConsulError::Timeout {
            addr: self.addr.clone(),
            method: method.clone(),
            path: path.to_string(),
            timeout,
        };
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                let connect = e.is_connect();
                let mut message = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    let _ = write!(message, ": {s}");
                    source = s.source();
                }
                (
                    ConsulError::Transport {
                        addr: self.addr.clone(),
                        message,
                    },
                    connect,
                )
            })?;
            let status = response.status();
            let index = response
                .headers()
                .get(INDEX_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| {
                    (
                        ConsulError::Transport {
                            addr: self.addr.clone(),
                            message: format!("reading the answer: {e}"),
                        },
                        false,
                    )
                })?
                .to_bytes();
            Ok(RawResponse {
                status,
                index,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err((timeout_err(), false)),
        }
    }

    /// Sends a request with the retry policy. Answers other than 2xx and 404 are returned
    /// as [`ConsulError::Status`]; 404 is returned to the caller, which decides what it
    /// means.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        idempotence: Idempotence,
        timeout: Duration,
    ) -> Result<RawResponse, ConsulError> {
        let mut attempt = 1;
        loop {
            let err = match self.send_once(&method, path, &body, timeout).await {
                Ok(resp) if resp.status.is_success() || resp.status == StatusCode::NOT_FOUND => {
                    return Ok(resp)
                }
                Ok(resp) => {
                    let retryable =
                        resp.status.is_server_error() && idempotence == Idempotence::Idempotent;
                    let err = status_error(&method, path, &resp);
                    (err, retryable)
                }
                Err((err, connect_failed)) => {
                    let retryable = match err {
                        ConsulError::Transport { .. } | ConsulError::Timeout { .. } => {
                            connect_failed || idempotence == Idempotence::Idempotent
                        }
                        _ => false,
                    };
                    (err, retryable)
                }
            };
            let (err, retryable) = err;
            if !retryable || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let pause = self.retry.backoff(attempt);
            debug!(%method, path, attempt, ?pause, error = %err, "retrying Consul call");
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ConsulError> {
        serde_json::from_slice(body).map_err(|e| ConsulError::Decode {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    fn decode_bool(path: &str, body: &[u8]) -> Result<bool, ConsulError> {
        Self::decode::<bool>(path, body)
    }

    fn decode_pairs(path: &str, body: &[u8]) -> Result<Vec<KvPair>, ConsulError> {
        let raw: Option<Vec<RawKvPair>> = Self::decode(path, body)?;
        raw.unwrap_or_default()
            .into_iter()
            .map(|r| {
                let value = match r.value {
                    None => Vec::new(),
                    Some(v) => base64::engine::general_purpose::STANDARD
                        .decode(v.as_bytes())
                        .map_err(|e| ConsulError::Decode {
                            path: path.to_string(),
                            message: format!("value of {:?} is not base64: {e}", r.key),
                        })?,
                };
                Ok(KvPair {
                    key: r.key,
                    value,
                    create_index: r.create_index,
                    modify_index: r.modify_index,
                    lock_index: r.lock_index,
                    flags: r.flags,
                    session: r.session.filter(|s| !s.is_empty()),
                })
            })
            .collect()
    }

    fn check_key(key: &str) -> Result<String, ConsulError> {
        let key = key.trim_start_matches('/');
        if key.is_empty() {
            return Err(ConsulError::InvalidArgument("empty KV key".to_string()));
        }
        Ok(encode_path(key))
    }

    fn blocking_timeout(&self, wait: Duration) -> Duration {
        // Consul adds up to wait/16 of jitter; leave room for that and the transfer.
        wait + wait / 16 + self.timeout
    }

    fn blocking_query(index: u64, wait: Duration) -> String {
        let wait = wait.min(MAX_WAIT);
        format!("index={index}&wait={}", format_duration(wait))
    }

    // ---- KV ----

    /// `GET /v1/kv/:key`; `None` when the key does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<KvPair>, ConsulError> {
        let path = format!("/v1/kv/{}", Self::check_key(key)?);
        let resp = self
            .call(
                Method::GET,
                &path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Self::decode_pairs(&path, &resp.body)?.into_iter().next())
    }

    /// Blocking `GET /v1/kv/:key?index=&wait=`: returns when the key changed past
    /// `index` or `wait` expired, with the new `X-Consul-Index`.
    pub async fn get_blocking(
        &self,
        key: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<KvPair>, u64), ConsulError> {
        let path = format!(
            "/v1/kv/{}?{}",
            Self::check_key(key)?,
            Self::blocking_query(index, wait)
        );
        let resp = self
            .call(
                Method::GET,
                &path,
                None,
                Idempotence::Idempotent,
                self.blocking_timeout(wait),
            )
            .await?;
        let new_index = Self::index_of(&path, &resp)?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok((None, new_index));
        }
        let pair = Self::decode_pairs(&path, &resp.body)?.into_iter().next();
        Ok((pair, new_index))
    }

    fn index_of(path: &str, resp: &RawResponse) -> Result<u64, ConsulError> {
        resp.index.ok_or_else(|| ConsulError::Decode {
            path: path.to_string(),
            message: format!("answer has no {INDEX_HEADER} header"),
        })
    }

    /// `GET /v1/kv/:prefix?recurse`: every entry under `prefix` (empty when none).
    pub async fn list(&self, prefix: &str) -> Result<Vec<KvPair>, ConsulError> {
        let path = format!(
            "/v1/kv/{}?recurse",
            encode_path(prefix.trim_start_matches('/'))
        );
        let resp = self
            .call(
                Method::GET,
                &path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        Self::decode_pairs(&path, &resp.body)
    }

    /// Blocking `GET /v1/kv/:prefix?recurse&index=&wait=`: returns as soon as anything
    /// under `prefix` changed past `index` (including deletions), or when `wait` expired,
    /// with the entries and the new `X-Consul-Index`. `index` 0 does not block.
    pub async fn list_blocking(
        &self,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<KvPair>, u64), ConsulError> {
        let path = format!(
            "/v1/kv/{}?recurse&{}",
            encode_path(prefix.trim_start_matches('/')),
            Self::blocking_query(index, wait)
        );
        let resp = self
            .call(
                Method::GET,
                &path,
                None,
                Idempotence::Idempotent,
                self.blocking_timeout(wait),
            )
            .await?;
        let new_index = Self::index_of(&path, &resp)?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok((Vec::new(), new_index));
        }
        Ok((Self::decode_pairs(&path, &resp.body)?, new_index))
    }

    /// `GET /v1/kv/:prefix?keys`: the key names under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, ConsulError> {
        self.keys_inner(prefix, None).await
    }

    /// `GET /v1/kv/:prefix?keys&separator=`: key names under `prefix` up to the first
    /// `separator` after it (so `a/b/c` under `a/` with `/` lists `a/b/`).
    pub async fn keys_with_separator(
        &self,
        prefix: &str,
        separator: &str,
    ) -> Result<Vec<String>, ConsulError> {
        self.keys_inner(prefix, Some(separator)).await
    }

    async fn keys_inner(
        &self,
        prefix: &str,
        separator: Option<&str>,
    ) -> Result<Vec<String>, ConsulError> {
        let mut path = format!(
            "/v1/kv/{}?keys",
            encode_path(prefix.trim_start_matches('/'))
        );
        if let Some(sep) = separator {
            let _ = write!(path, "&separator={}", encode_query(sep));
        }
        let resp = self
            .call(
                Method::GET,
                &path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let keys: Option<Vec<String>> = Self::decode(&path, &resp.body)?;
        Ok(keys.unwrap_or_default())
    }

    async fn put_inner(
        &self,
        key: &str,
        query: Option<String>,
        value: &[u8],
        idempotence: Idempotence,
    ) -> Result<bool, ConsulError> {
        let mut path = format!("/v1/kv/{}", Self::check_key(key)?);
        if let Some(q) = query {
            path.push('?');
            path.push_str(&q);
        }
        let resp = self
            .call(
                Method::PUT,
                &path,
                Some(value.to_vec()),
                idempotence,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Err(status_error(&Method::PUT, &path, &resp));
        }
        Self::decode_bool(&path, &resp.body)
    }

    /// `PUT /v1/kv/:key`: sets the value unconditionally.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), ConsulError> {
        if self
            .put_inner(key, None, value, Idempotence::Idempotent)
            .await?
        {
            Ok(())
        } else {
            Err(ConsulError::Rejected {
                op: "put",
                key: key.to_string(),
            })
        }
    }

    /// `PUT /v1/kv/:key?cas=N`: writes only if the key's `ModifyIndex` is `cas_index`;
    /// `cas_index` 0 writes only if the key does not exist. Returns whether it wrote.
    pub async fn put_cas(
        &self,
        key: &str,
        value: &[u8],
        cas_index: u64,
    ) -> Result<bool, ConsulError> {
        self.put_inner(
            key,
            Some(format!("cas={cas_index}")),
            value,
            Idempotence::NotIdempotent,
        )
        .await
    }

    /// `PUT /v1/kv/:key?acquire=session`: takes the lock on `key` for `session` and sets
    /// the value. False when another session holds it or the key is in its lock-delay.
    pub async fn acquire(
        &self,
        key: &str,
        value: &[u8],
        session: &str,
    ) -> Result<bool, ConsulError> {
        // Acquiring again with the same session succeeds, so a retry is harmless.
        self.put_inner(
            key,
            Some(format!("acquire={}", encode_query(session))),
            value,
            Idempotence::Idempotent,
        )
        .await
    }

    /// `PUT /v1/kv/:key?release=session`: gives the lock up and sets the value (Consul
    /// replaces the value with the request body on release too). False when `session`
    /// does not hold the lock.
    pub async fn release(
        &self,
        key: &str,
        value: &[u8],
        session: &str,
    ) -> Result<bool, ConsulError> {
        self.put_inner(
            key,
            Some(format!("release={}", encode_query(session))),
            value,
            Idempotence::Idempotent,
        )
        .await
    }

    async fn delete_inner(
        &self,
        path: String,
        idempotence: Idempotence,
    ) -> Result<bool, ConsulError> {
        let resp = self
            .call(Method::DELETE, &path, None, idempotence, self.timeout)
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Err(status_error(&Method::DELETE, &path, &resp));
        }
        Self::decode_bool(&path, &resp.body)
    }

    /// `DELETE /v1/kv/:key` (deleting a missing key succeeds).
    pub async fn delete(&self, key: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/kv/{}", Self::check_key(key)?);
        self.delete_inner(path, Idempotence::Idempotent).await?;
        Ok(())
    }

    /// `DELETE /v1/kv/:key?cas=N`: deletes only if the key's `ModifyIndex` is `index`.
    pub async fn delete_cas(&self, key: &str, index: u64) -> Result<bool, ConsulError> {
        let path = format!("/v1/kv/{}?cas={index}", Self::check_key(key)?);
        self.delete_inner(path, Idempotence::NotIdempotent).await
    }

    /// `DELETE /v1/kv/:prefix?recurse`: deletes every key under `prefix`. An empty
    /// prefix is refused (it would wipe the whole store).
    pub async fn delete_tree(&self, prefix: &str) -> Result<(), ConsulError> {
        let prefix = prefix.trim_start_matches('/');
        if prefix.is_empty() {
            return Err(ConsulError::InvalidArgument(
                "refusing to delete the whole KV store (empty prefix)".to_string(),
            ));
        }
        let path = format!("/v1/kv/{}?recurse", encode_path(prefix));
        self.delete_inner(path, Idempotence::Idempotent).await?;
        Ok(())
    }

    // ---- sessions ----

    /// `PUT /v1/session/create` with a TTL: returns the session ID. The session must be
    /// renewed within the TTL ([`ConsulClient::session_renew`]); Consul may wait up to
    /// twice the TTL before invalidating it. Real Consul refuses TTLs below its
    /// `session_ttl_min` (10s by default) and above 24h.
    pub async fn session_create(
        &self,
        name: &str,
        ttl: Duration,
        behavior: SessionBehavior,
        lock_delay: Duration,
    ) -> Result<String, ConsulError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Body<'a> {
            name: &'a str,
            #[serde(rename = "TTL")]
            ttl: String,
            behavior: SessionBehavior,
            lock_delay: String,
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        if ttl.is_zero() {
            return Err(ConsulError::InvalidArgument(
                "session TTL must be positive".to_string(),
            ));
        }
        let body = serde_json::to_vec(&Body {
            name,
            ttl: format_duration(ttl),
            behavior,
            lock_delay: format_duration(lock_delay),
        })
        .map_err(|e| ConsulError::InvalidArgument(e.to_string()))?;
        let path = "/v1/session/create";
        let resp = self
            .call(
                Method::PUT,
                path,
                Some(body),
                Idempotence::NotIdempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Err(status_error(&Method::PUT, path, &resp));
        }
        let created: Created = Self::decode(path, &resp.body)?;
        Ok(created.id)
    }

    /// `PUT /v1/session/renew/:id`: false when the session no longer exists (404), in
    /// which case its locks are gone and a new session is needed.
    pub async fn session_renew(&self, id: &str) -> Result<bool, ConsulError> {
        let path = format!("/v1/session/renew/{}", encode_query(id));
        let resp = self
            .call(
                Method::PUT,
                &path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        Ok(resp.status != StatusCode::NOT_FOUND)
    }

    /// `PUT /v1/session/destroy/:id`.
    pub async fn session_destroy(&self, id: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/session/destroy/{}", encode_query(id));
        let resp = self
            .call(
                Method::PUT,
                &path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Err(status_error(&Method::PUT, &path, &resp));
        }
        Ok(())
    }

    /// `GET /v1/session/info/:id`; `None` when no such session exists.
    pub async fn session_info(&self, id: &str) -> Result<Option<SessionInfo>, ConsulError> {
        let path = format!("/v1/session/info/{}", encode_query(id));
        let resp = self
            .call(
                Method::GET,
                &path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let sessions: Option<Vec<SessionInfo>> = Self::decode(&path, &resp.body)?;
        Ok(sessions.unwrap_or_default().into_iter().next())
    }

    // ---- catalog ----

    /// `PUT /v1/catalog/register` of one service on `node` (registering the node at
    /// `address` if needed).
    pub async fn catalog_register(
        &self,
        node: &str,
        address: &str,
        service: &CatalogService,
    ) -> Result<(), ConsulError> {
        #[derive(Serialize)]
        #[serde(rename_all = "PascalCase")]
        struct Body<'a> {
            node: &'a str,
            address: &'a str,
            service: &'a CatalogService,
        }
        let body = serde_json::to_vec(&Body {
            node,
            address,
            service,
        })
        .map_err(|e| ConsulError::InvalidArgument(e.to_string()))?;
        self.catalog_write("/v1/catalog/register", body).await
    }

    /// `PUT /v1/catalog/deregister` of one service of `node`.
    pub async fn catalog_deregister(
        &self,
        node: &str,
        service_id: &str,
    ) -> Result<(), ConsulError> {
        let body = serde_json::json!({ "Node": node, "ServiceID": service_id });
        self.catalog_write("/v1/catalog/deregister", body.to_string().into_bytes())
            .await
    }

    async fn catalog_write(&self, path: &str, body: Vec<u8>) -> Result<(), ConsulError> {
        let resp = self
            .call(
                Method::PUT,
                path,
                Some(body),
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Err(status_error(&Method::PUT, path, &resp));
        }
        Ok(())
    }

    /// `GET /v1/catalog/service/:name`: the registered instances of a service.
    pub async fn catalog_service(&self, name: &str) -> Result<Vec<CatalogEntry>, ConsulError> {
        let path = format!("/v1/catalog/service/{}", encode_query(name));
        let resp = self
            .call(
                Method::GET,
                &path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let entries: Option<Vec<CatalogEntry>> = Self::decode(&path, &resp.body)?;
        Ok(entries.unwrap_or_default())
    }

    // ---- status ----

    /// `GET /v1/status/leader`: the raft leader's address; empty while there is none.
    /// Also the cheapest "is Consul there" probe.
    pub async fn leader(&self) -> Result<String, ConsulError> {
        let path = "/v1/status/leader";
        let resp = self
            .call(
                Method::GET,
                path,
                None,
                Idempotence::Idempotent,
                self.timeout,
            )
            .await?;
        if resp.status == StatusCode::NOT_FOUND {
            return Err(status_error(&Method::GET, path, &resp));
        }
        Self::decode(path, &resp.body)
    }
}

/// Watches a KV prefix with blocking queries, following Consul's client rules: the
/// index goes back to 0 when the server's goes backwards, never drops below 1 after the
/// first answer, and consecutive queries start at least `min_interval` apart (longer
/// after errors, with exponential backoff) so a flapping key cannot make a busy loop.
#[derive(Debug)]
pub struct KvWatch {
    client: ConsulClient,
    prefix: String,
    wait: Duration,
    min_interval: Duration,
    max_error_backoff: Duration,
    index: u64,
    last_start: Option<Instant>,
    consecutive_errors: u32,
}

impl KvWatch {
    pub fn new(client: ConsulClient, prefix: impl Into<String>, wait: Duration) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            wait: wait.min(MAX_WAIT),
            min_interval: Duration::from_millis(100),
            max_error_backoff: Duration::from_secs(30),
            index: 0,
            last_start: None,
            consecutive_errors: 0,
        }
    }

    /// The minimum time between the starts of two consecutive queries.
    pub fn with_min_interval(mut self, min_interval: Duration) -> Self {
        self.min_interval = min_interval;
        self
    }

    /// The index the next query will block on (0: the next query does not block).
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn pause(&self) -> Duration {
        if self.consecutive_errors == 0 {
            return self.min_interval;
        }
        let base = self.min_interval.max(Duration::from_millis(100));
        let factor = 1u32
            .checked_shl(self.consecutive_errors.min(16))
            .unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(self.max_error_backoff)
    }

    /// Runs the next (blocking) query and returns the entries under the prefix with the
    /// index they were read at. The first call returns at once; later ones when something
    /// under the prefix changed or the wait expired (the entries may then be unchanged).
    pub async fn next(&mut self) -> Result<(Vec<KvPair>, u64), ConsulError> {
        if let Some(last) = self.last_start {
            let due = last + self.pause();
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        self.last_start = Some(Instant::now());
        match self
            .client
            .list_blocking(&self.prefix, self.index, self.wait)
            .await
        {
            Ok((pairs, returned)) => {
                self.consecutive_errors = 0;
                let next = next_watch_index(self.index, returned);
                if next == 0 {
                    warn!(prefix = %self.prefix, previous = self.index, returned, "Consul index went backwards; re-reading");
                }
                self.index = next;
                Ok((pairs, returned.max(1)))
            }
            Err(e) => {
                self.consecutive_errors = self.consecutive_errors.saturating_add(1);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_normalise() {
        assert_eq!(parse_addr("127.0.0.1:8500").unwrap(), "127.0.0.1:8500");
        assert_eq!(
            parse_addr("http://10.0.0.1:8501/").unwrap(),
            "10.0.0.1:8501"
        );
        assert_eq!(parse_addr("consul.local").unwrap(), "consul.local:8500");
        assert_eq!(parse_addr("[::1]:8500").unwrap(), "[::1]:8500");
        assert!(parse_addr("https://x:8501").is_err());
        assert!(parse_addr("").is_err());
        assert!(parse_addr("http://x:8500/v1").is_err());
        assert!(parse_addr("x:notaport").is_err());
    }

    #[test]
    fn watch_index_rules() {
        assert_eq!(next_watch_index(0, 0), 1);
        assert_eq!(next_watch_index(0, 7), 7);
        assert_eq!(next_watch_index(7, 7), 7);
        assert_eq!(next_watch_index(7, 9), 9);
        assert_eq!(next_watch_index(9, 3), 0);
        assert_eq!(next_watch_index(1, 0), 1);
        assert_eq!(next_watch_index(5, 0), 0);
    }

    #[test]
    fn durations_format_for_go() {
        assert_eq!(format_duration(Duration::from_secs(15)), "15s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_millis(0)), "0s");
    }

    #[test]
    fn keys_are_percent_encoded() {
        assert_eq!(
            encode_path("overlay/ipam/a b/10.0.0.1"),
            "overlay/ipam/a%20b/10.0.0.1"
        );
        assert_eq!(encode_query("a/b?c"), "a%2Fb%3Fc");
    }

    #[test]
    fn backoff_is_bounded() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(40), p.max_backoff);
    }

    #[test]
    fn kv_json_decodes() {
        let body = br#"[{"Key":"a","Value":"aGk=","CreateIndex":3,"ModifyIndex":4,"LockIndex":1,"Flags":0,"Session":"s1"},{"Key":"b","Value":null,"CreateIndex":5,"ModifyIndex":5,"LockIndex":0,"Flags":2}]"#;
        let pairs = ConsulClient::decode_pairs("/x", body).unwrap();
        assert_eq!(pairs[0].value, b"hi");
        assert_eq!(pairs[0].session.as_deref(), Some("s1"));
        assert_eq!(pairs[1].value, b"");
        assert_eq!(pairs[1].flags, 2);
        assert!(ConsulClient::decode_pairs("/x", br#"[{"Key":"a","Value":"!!"}]"#).is_err());
    }
}
