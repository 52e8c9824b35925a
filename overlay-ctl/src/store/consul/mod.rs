//! A thin typed client for the subset of Consul's HTTP API the control plane uses:
//! the KV store (with check-and-set, locks and blocking queries), sessions, the agent's
//! services and the catalog. It follows the documented API (`/v1/kv`, `/v1/session`,
//! `/v1/agent/service`, `/v1/catalog`, `/v1/status`) exactly, so it works unchanged
//! against a real Consul agent (over http, https or a unix socket) and against the
//! development server ([`crate::store::devserver`]), which is as strict as an agent.
//!
//! Every failure, including Consul being unreachable, is a [`ConsulError`]; nothing in
//! here panics on what the network or the server does. Idempotent calls are retried with
//! bounded exponential backoff on transport errors and 5xx answers ([`RetryPolicy`]);
//! calls that are not idempotent (check-and-set, session creation) are retried only when
//! the connection could not be made at all, i.e. when the request was certainly not sent,
//! or when Consul rate-limited them (429, after its `Retry-After`).
//!
//! Layout: this file holds the client (constructors); [`config`] the address, token and
//! TLS files resolved from flags and Consul's variables; `connector` the TCP, TLS and
//! unix-socket connections; [`error`] the error type and its classification; `transport` the one request helper every call
//! goes through (retries, timeouts, decoding); then one file per API area: `kv`,
//! `session`, `catalog` (with the status probe) and `watch` (blocking-query watches).
//! The KV calls the cluster-state code needs are also what [`ConsulClient`] offers
//! through [`crate::store::backend::KvBackend`].
mod catalog;
pub mod config;
mod connector;
pub mod error;
mod kv;
mod session;
mod transport;
mod txn;
mod watch;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use self::connector::ConsulConnector;

pub use self::{
    catalog::{AgentService, CatalogEntry, CatalogService},
    config::{ConsulAddress, ConsulConfig, ConsulTls, DEFAULT_ADDR, ENV_ADDR, ENV_TOKEN},
    error::{ConsulError, ErrorClass},
    session::{SessionBehavior, SessionInfo},
    transport::{format_duration, RetryPolicy},
    txn::{TxnFailure, TxnOp, TxnOutcome},
    watch::{next_watch_index, KvWatch},
};
pub use crate::store::backend::KvPair;
use crate::store::journal::Journal;

/// The header Consul reads the ACL token from.
pub const TOKEN_HEADER: &str = "X-Consul-Token";
/// The header carrying the index of a blocking-query capable read.
pub const INDEX_HEADER: &str = "X-Consul-Index";
/// Consul caps a blocking query's `wait` at ten minutes.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// The Consul HTTP API client. Cheap to clone (clones share the connection pool).
#[derive(Clone)]
pub struct ConsulClient {
    /// `host:port` (`https://host:port`, `unix:///path`), for messages and `status`.
    addr: String,
    /// What request URIs start with: `http://host:port`, `https://host:port`, or
    /// `http://localhost` for a unix socket (whose connector ignores the host).
    base: String,
    token: Option<String>,
    http: Client<ConsulConnector, Full<Bytes>>,
    retry: RetryPolicy,
    timeout: Duration,
    /// Bytes of answer bodies read since the client was made (shared by its clones).
    bytes_read: Arc<AtomicU64>,
    /// Set for the store's own client: its writes under the journaled sections go
    /// through the change journal ([`crate::store::journal`]).
    journal: Option<Arc<Journal>>,
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

impl ConsulClient {
    /// A client for the agent at `addr` (`host:port`, `http://`, `https://` verified
    /// with the system's CAs, or `unix:///path`), sending `token` (when given) as
    /// `X-Consul-Token`.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, ConsulError> {
        Self::from_config(&ConsulConfig::plain(addr, token)?)
    }

    /// A client as `config` says (address kind, token, TLS files).
    pub fn from_config(config: &ConsulConfig) -> Result<Self, ConsulError> {
        let connector = ConsulConnector::new(&config.address, &config.tls)?;
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let base = match &config.address {
            ConsulAddress::Http(a) => format!("http://{a}"),
            ConsulAddress::Https(a) => format!("https://{a}"),
            ConsulAddress::Unix(_) => "http://localhost".to_string(),
        };
        Ok(Self {
            base,
            addr: config.address.display(),
            token: config.token.clone().filter(|t| !t.is_empty()),
            http,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(10),
            bytes_read: Arc::default(),
            journal: None,
        })
    }

    /// The address from `cli_addr` (the `--consul` flag), else `CONSUL_HTTP_ADDR`, else
    /// [`DEFAULT_ADDR`]; token and TLS files from Consul's variables
    /// ([`ConsulConfig::resolve`]).
    pub fn from_env(cli_addr: Option<&str>) -> Result<Self, ConsulError> {
        let tls = crate::store::etcd::TlsFiles::default();
        Self::from_config(&ConsulConfig::resolve(cli_addr, &tls)?)
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

    /// The agent's address as given (`host:port`, `https://...`, `unix://...`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This client with its writes under `prefix`'s journaled sections recorded in the
    /// change journal ([`crate::store::journal`]), as the store's own writes are.
    pub fn with_journal(mut self, prefix: &str) -> Self {
        self.journal = Some(Arc::new(Journal::new(prefix)));
        self
    }

    /// The journal a write to `key` goes through, if it is journaled.
    fn journal_for(&self, key: &str) -> Option<&Journal> {
        self.journal.as_deref().filter(|j| j.covers(key))
    }

    /// The bytes of every answer body this client (and its clones) read from Consul.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
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
}
