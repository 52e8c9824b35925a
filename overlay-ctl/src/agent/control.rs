//! The agent's local control socket (`<state-dir>/agent.sock`) and its client. The CLI
//! uses it for what only the running agent knows or can do on this node: its identity
//! and health (`status`), an immediate reconcile after a container was plumbed (`run`,
//! `attach`, `detach`), moving the underlay (`cluster bind`) and its logs (`agent logs`).
//!
//! The protocol is one JSON request line per connection, answered by one JSON line
//! (`{"Ok": ...}` or `{"Err": "message"}`); `logs` then streams plain text lines.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::agent::apply::ApplyReport;
pub use crate::private::{bind_socket as bind_private, peer_is_trusted, SOCKET_MODE};

/// Where the agent keeps its socket and its session ID unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/overlay";
pub const SOCKET_NAME: &str = "agent.sock";
/// How long a request may take before the CLI gives up on the agent.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no agent is running with state directory {dir} (start one with `overlay-ctl agent`, or pass --state-dir): {source}")]
    NotRunning {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unreadable answer from the agent: {0}")]
    Protocol(String),
    #[error("the agent refused: {0}")]
    Refused(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Re-read the cluster state and apply it now.
    Reconcile,
    /// Move the underlay (and this node's VTEP) to another interface.
    Bind {
        iface: String,
    },
    /// The last `lines` log lines, then (with `follow`) every new one.
    Logs {
        lines: usize,
        follow: bool,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MapUsage {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReconcileStatus {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub ok: bool,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub report: ApplyReport,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConsulStatus {
    /// Consul's `host:port`, or etcd's endpoints (`etcd://a:2379,...`).
    pub addr: String,
    /// The store as a URL `--store` takes (`consul://host:port`, `etcd://a:2379,...`):
    /// what the CLI on this host follows. Empty from agents before `--store`.
    #[serde(default)]
    pub store: String,
    pub prefix: String,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// This node's session, and whether it holds the node key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub registered: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub pid: u32,
    pub iface: String,
    pub ifindex: u32,
    pub vtep: Option<Ipv4Addr>,
    pub xdp_mode: String,
    /// Where VXLAN is decapsulated on the underlay, and why there.
    #[serde(default)]
    pub decap: crate::dataplane::underlay::UnderlaySetup,
    /// Host settings the agent changed (an `--ephemeral` agent puts them back on exit).
    #[serde(default)]
    pub host_changes: Vec<crate::dataplane::underlay::HostChange>,
    pub tc_attach: String,
    /// The VXLAN UDP port this node's data plane uses now (its `CLUSTER` map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_port: Option<u16>,
    pub pin_root: String,
    pub programs: BTreeMap<String, u32>,
    pub maps: Vec<MapUsage>,
    pub consul: ConsulStatus,
    pub last_reconcile: Option<ReconcileStatus>,
    pub members: usize,
    pub local_endpoints: usize,
    pub remote_endpoints: usize,
    /// `network/id` of every local endpoint the data plane forwards for.
    pub attached: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Where Docker's `overlay-net` driver is served, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_plugin: Option<String>,
    /// Store records the agent ignores as invalid (see `agent logs` for which and why).
    #[serde(default)]
    pub rejected_records: usize,
    /// Whether the store is this cluster's: unknown, trusted, missing, foreign, healing
    /// (see [`crate::store::identity`]).
    #[serde(default)]
    pub store_trust: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The underlay's MTU and the networks whose MTU it is too small for.
    #[serde(default)]
    pub mtu: super::mtu::UnderlayMtuStatus,
    /// The egress nftables table: each network's mode, drops of `none` networks.
    #[serde(default)]
    pub egress: crate::agent::egress::EgressStatus,
    /// Whether the agent answers DNS on the gateway addresses (`run`, `attach` and CNI
    /// then give containers the gateway as their resolver).
    #[serde(default)]
    pub dns: bool,
    /// `bpf`, or `none` for a control-plane-only agent (maps in memory).
    #[serde(default)]
    pub dataplane: String,
    /// Entries in this node's endpoint map (kernel or in-memory).
    #[serde(default)]
    pub endpoint_map_entries: usize,
    /// How the agent follows the store: what it read and applied.
    #[serde(default)]
    pub feed: FeedStatus,
}

/// How the agent follows the store (`status --json`'s `feed`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedStatus {
    /// The store index (Consul) or revision (etcd) of the last state this node applied
    /// from its feed (0: none yet).
    pub applied_index: u64,
    /// Full snapshots applied (the first read, and after lost history).
    pub snapshots: u64,
    /// Batches of changed keys applied.
    pub change_batches: u64,
    /// Changed keys in those batches.
    pub changes: u64,
    /// Change batches that took the full path from the agent's copy of the store (a
    /// network, node or config change; a local endpoint).
    pub full_fallbacks: u64,
    /// Periodic checks of the agent's copy against the versions of the followed keys
    /// in the store (etcd; on Consul the whole store is read again instead).
    #[serde(default)]
    pub copy_checks: u64,
    /// Those checks that found a difference (the feed then read the store again).
    #[serde(default)]
    pub copy_differences: u64,
    /// Bytes this agent process read from the store ([`crate::store::Store::bytes_read`]),
    /// as of the last feed event or check of its copy.
    pub store_bytes_read: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReconcileReply {
    pub report: ApplyReport,
    /// `network/id` of every local endpoint the data plane forwards for after it.
    pub attached: Vec<String>,
    /// Whether the state came fresh from Consul (else the last known one was applied).
    pub fresh: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindReply {
    pub iface: String,
    pub ifindex: u32,
    pub vtep: Ipv4Addr,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Reads one request line (server side).
pub async fn read_request(stream: &mut BufReader<UnixStream>) -> Result<Request, String> {
    let mut line = String::new();
    stream
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))
}

/// Writes one answer line (server side).
pub async fn write_reply<T: Serialize>(
    stream: &mut BufReader<UnixStream>,
    reply: Result<T, String>,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&reply).unwrap_or_else(|e| {
        serde_json::to_vec(&Err::<(), _>(format!("cannot encode the answer: {e}")))
            .unwrap_or_default()
    });
    line.push(b'\n');
    stream.get_mut().write_all(&line).await
}

/// The CLI's side of the socket.
#[derive(Clone, Debug)]
pub struct AgentClient {
    state_dir: PathBuf,
}

impl AgentClient {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    async fn send(&self, request: &Request) -> Result<BufReader<UnixStream>, ControlError> {
        let path = socket_path(&self.state_dir);
        let stream =
            UnixStream::connect(&path)
                .await
                .map_err(|source| ControlError::NotRunning {
                    dir: self.state_dir.clone(),
                    source,
                })?;
        let mut stream = BufReader::new(stream);
        let mut line =
            serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
        line.push(b'\n');
        stream
            .get_mut()
            .write_all(&line)
            .await
            .map_err(|source| ControlError::Io { path, source })?;
        Ok(stream)
    }

    /// Reads one `{"Ok": ...}` / `{"Err": "..."}` answer line.
    async fn read_reply<T: DeserializeOwned>(
        &self,
        stream: &mut BufReader<UnixStream>,
    ) -> Result<T, ControlError> {
        let mut line = String::new();
        stream
            .read_line(&mut line)
            .await
            .map_err(|source| ControlError::Io {
                path: socket_path(&self.state_dir),
                source,
            })?;
        let reply: Result<T, String> =
            serde_json::from_str(&line).map_err(|e| ControlError::Protocol(e.to_string()))?;
        reply.map_err(ControlError::Refused)
    }

    async fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ControlError> {
        let work = async {
            let mut stream = self.send(request).await?;
            self.read_reply(&mut stream).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| ControlError::Timeout(REQUEST_TIMEOUT))?
    }

    pub async fn status(&self) -> Result<AgentStatus, ControlError> {
        self.call(&Request::Status).await
    }

    pub async fn reconcile(&self) -> Result<ReconcileReply, ControlError> {
        self.call(&Request::Reconcile).await
    }

    pub async fn bind(&self, iface: &str) -> Result<BindReply, ControlError> {
        self.call(&Request::Bind {
            iface: iface.to_string(),
        })
        .await
    }

    /// Writes the agent's log lines to `out` as they come; returns when the agent has
    /// sent everything (without `follow`) or closes the connection.
    pub async fn logs(
        &self,
        lines: usize,
        follow: bool,
        mut out: impl FnMut(&str),
    ) -> Result<(), ControlError> {
        let mut stream = self.send(&Request::Logs { lines, follow }).await?;
        self.read_reply::<()>(&mut stream).await?;
        let path = socket_path(&self.state_dir);
        let mut line = String::new();
        loop {
            line.clear();
            let n = stream
                .read_line(&mut line)
                .await
                .map_err(|source| ControlError::Io {
                    path: path.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(());
            }
            out(line.trim_end_matches('\n'));
        }
    }
}
