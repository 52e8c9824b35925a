//! `overlay-ctl dev-server`: a Consul-compatible development server, a mode of the
//! binary operators already have (as `consul agent -dev` is one of Consul's). It serves
//! the subset of Consul's HTTP API that [`crate::store::consul`] uses, with Consul's
//! documented edge semantics, state in memory (as `consul agent -dev` keeps it) or, with a
//! data directory, also on disk so that a restarted server has it all again, as a real
//! Consul server does. `cargo xtask run`, the demo, the benchmark and the tests start it;
//! the client is written against the real API and works unchanged against a real agent.
//!
//! What it implements:
//! - one global raft-like index, incremented on every write ([`state`]);
//! - KV ([`kv`]): `GET` (single key, `?recurse`, `?keys` with `?separator`, `?raw`), `PUT`
//!   (with `?flags`, `?cas`, `?acquire`, `?release`), `DELETE` (with `?recurse`, `?cas`);
//!   `X-Consul-Index` on every read; blocking queries with `?index=` and `?wait=`
//!   (default 5 minutes, at most 10; [`http`]);
//! - `PUT /v1/txn` with KV operations ([`txn`]): atomic, one index for all writes, 409
//!   with the failing operation on a failed check;
//! - sessions ([`session`]) with TTL (invalidated after twice the TTL without a renew, as
//!   Consul may), `Behavior` `release`/`delete`, lock-delay,
//!   create/renew/destroy/info/list;
//! - catalog ([`catalog`]) register/deregister, `service/:name`, `services`, `nodes`; a
//!   catalog register onto the server's own node is ignored, as a real agent's
//!   anti-entropy would undo it;
//! - the agent's `service/register` and `service/deregister/:id` (services on the
//!   server's own node, which stands for the local Consul agent);
//! - `/v1/status/leader`, `/v1/status/peers`, `/v1/agent/self`;
//! - dev only: `PUT /v1/dev/serf-flap?node=NAME` simulates a gossip flap or a Consul
//!   agent restart of a node: sessions created without `NodeChecks` are tied to its
//!   `serfHealth` check (as Consul ties them) and are invalidated.
//!
//! With `data_dir` the state (KV with all indexes, the global index, sessions, catalog) is
//! written to `DIR/state.json` after every change (temporary file and rename, so a kill
//! never leaves a torn file) and loaded at start ([`shared`]). Instants cannot be saved:
//! on load every session's TTL clock restarts (as Consul restarts them on a leader change)
//! and pending lock-delays are dropped.
//!
//! ACLs are off unless tokens are given (`--acl-token`, [`acl`]): then every request
//! needs a token with the right its endpoint needs, as a Consul with a default-deny
//! policy answers (403). Anything else answers 404 with a text body.
mod acl;
mod catalog;
mod http;
mod kv;
mod listen;
mod session;
mod shared;
mod state;
mod txn;

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::oneshot,
    task::JoinHandle,
};
use tracing::{debug, info};

pub use self::{acl::AclTokens, http::parse_go_duration, listen::DevTls};
use self::{http::handle, shared::Shared};

/// Consul's default `kv_max_value_size`.
pub const MAX_VALUE_SIZE: usize = 512 * 1024;
/// Consul's default `session_ttl_min`, the smallest session TTL it accepts.
pub const SESSION_TTL_MIN: Duration = Duration::from_secs(10);
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
    /// The smallest session TTL accepted: Consul's own default, 10s, unless lowered (as
    /// a Consul configured with `session_ttl_min = "1s"`) for tests of expiry.
    pub session_ttl_min: Duration,
    pub node_name: String,
    pub datacenter: String,
    /// How often expired sessions are looked for.
    pub reap_interval: Duration,
    /// Keep the state in `state.json` here across restarts (`None`: memory only).
    pub data_dir: Option<std::path::PathBuf>,
    /// ACL tokens; empty: ACLs off (every request allowed, tokens ignored).
    pub acl: AclTokens,
    /// Serve HTTPS with these files (TCP listeners only).
    pub tls: Option<DevTls>,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            session_ttl_min: SESSION_TTL_MIN,
            node_name: "overlay-consul-dev".to_string(),
            datacenter: "dc1".to_string(),
            reap_interval: Duration::from_millis(50),
            data_dir: None,
            acl: AclTokens::default(),
            tls: None,
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
    #[error("TLS: {0}")]
    Tls(String),
}

/// A running dev server; stops when dropped.
pub struct ConsulDev {
    /// The TCP address (unspecified, port 0, for a unix socket).
    addr: SocketAddr,
    /// `http://ADDR`, `https://ADDR` or `unix:///path`.
    url: String,
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

    /// `listen` is `host:port` (HTTPS when `config.tls` is set) or `unix:///path`.
    pub async fn start_with(listen: &str, config: DevConfig) -> Result<Self, DevError> {
        let bind_error = |source| DevError::Bind {
            addr: listen.to_string(),
            source,
        };
        let acceptor = config.tls.as_ref().map(listen::acceptor).transpose()?;
        let shared = Arc::new(Shared::new(config)?);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let stop = async {
            let _ = shutdown_rx.await;
        };
        let (addr, url, accept) = if let Some(path) = listen.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
            let handler = {
                let shared = shared.clone();
                move |req| handle(shared.clone(), req)
            };
            let serve = crate::http::serve_unix(listener, handler, stop);
            let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
            (unspecified, format!("unix://{path}"), tokio::spawn(serve))
        } else {
            let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            match acceptor {
                Some(acceptor) => {
                    let handler = {
                        let shared = shared.clone();
                        move |req| handle(shared.clone(), req)
                    };
                    let serve = crate::http::serve_tls(listener, acceptor, handler, stop);
                    (addr, format!("https://{addr}"), tokio::spawn(serve))
                }
                None => {
                    let serve = accept_loop(listener, shared.clone(), stop);
                    (addr, format!("http://{addr}"), tokio::spawn(serve))
                }
            }
        };
        let reaper = tokio::spawn(reap_loop(shared.clone()));
        info!(%url, "consul dev server started");
        Ok(Self {
            addr,
            url,
            shared,
            shutdown: Some(shutdown_tx),
            tasks: vec![accept, reaper],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` (`https://ADDR`, `unix:///path`), for `CONSUL_HTTP_ADDR`.
    pub fn http_addr(&self) -> String {
        self.url.clone()
    }

    /// The current global index.
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// Simulates a gossip flap (or a Consul agent restart) of `node`, default the
    /// server's own: sessions tied to its `serfHealth` check are invalidated. Returns how
    /// many. Also served as `PUT /v1/dev/serf-flap?node=NAME`.
    pub fn serf_flap(&self, node: Option<&str>) -> usize {
        let node = node.unwrap_or(&self.shared.config.node_name).to_string();
        self.shared
            .write(|state| state.serf_flap(&node, Instant::now()))
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

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = move |req| handle(shared.clone(), req);
    crate::http::serve(listener, handler, shutdown).await;
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

/// The options of `overlay-ctl dev-server`.
#[derive(clap::Args, Debug, Clone)]
pub struct DevServerArgs {
    /// Address to listen on: host:port (port 0 picks a free one) or unix:///path.
    #[arg(long, default_value = "127.0.0.1:8500")]
    pub listen: String,
    /// Smallest session TTL accepted, as Consul's `session_ttl_min` (whose default this
    /// is). Lower it (e.g. 1s) for tests; agents then need `--dev-store` to use it.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    pub session_ttl_min: Duration,
    /// Node name the server reports and registers itself as.
    #[arg(long, default_value = "overlay-consul-dev")]
    pub node: String,
    /// Keep the state in DIR/state.json, so a restarted server has it again (as a real
    /// Consul server). Without it the state lives in memory only, as `consul agent -dev`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Enforce ACLs with this token (repeatable): `TOKEN` may do everything,
    /// `TOKEN=RULE,...` what its rules say, each `KIND:read|write[:PREFIX]` with KIND
    /// key, session, service, node or agent (e.g. `t1=key:write:overlay/,session:write`).
    #[arg(long, value_name = "TOKEN[=RULES]")]
    pub acl_token: Vec<String>,
    /// Serve HTTPS with this certificate (PEM; with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (as Consul's verify_incoming).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).ok_or_else(|| format!("invalid duration {s:?} (e.g. 1s, 500ms)"))
}

/// Runs the dev server until SIGTERM or SIGINT. Prints `consul dev server listening on
/// ADDR` on stdout once it accepts connections (scripts and tests wait for that line).
pub async fn run(args: DevServerArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut acl = AclTokens::default();
    for spec in &args.acl_token {
        acl.add(spec)
            .map_err(|e| anyhow::anyhow!("--acl-token: {e}"))?;
    }
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(DevTls {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        _ => None,
    };
    let config = DevConfig {
        tls,
        acl,
        session_ttl_min: args.session_ttl_min,
        node_name: args.node,
        data_dir: args.data_dir,
        ..DevConfig::default()
    };
    let server = ConsulDev::start_with(&args.listen, config).await?;
    {
        let mut out = std::io::stdout().lock();
        let shown = if server.url.starts_with("http://") {
            server.addr().to_string()
        } else {
            server.http_addr()
        };
        writeln!(out, "consul dev server listening on {shown}")?;
        out.flush()?;
    }
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }
    server.shutdown().await;
    Ok(())
}
