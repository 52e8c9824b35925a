//! The simulated nodes: `overlay-ctl agent --dataplane none` processes (the agent's own
//! watch and reconcile code, without BPF maps or links), each with its own node name,
//! VTEP and state directory, stopped (SIGTERM, then SIGKILL) and their directory removed
//! on drop. What the benchmark reads from them: their status over the control socket,
//! and their CPU time and resident memory from /proc.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

/// How long a status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);
/// How long stopped agents get to leave the cluster before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One agent process.
pub struct Agent {
    pub node: String,
    pub vtep: Ipv4Addr,
    pub state_dir: PathBuf,
    child: Child,
}

/// Every agent of one measurement.
pub struct Fleet {
    pub agents: Vec<Agent>,
    dir: PathBuf,
}

/// Agent `i`'s VTEP: 198.18.0.0/15 (the benchmarking range), one address per node.
fn vtep_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i as u32)
}

/// The options every simulated agent runs with, beyond its identity and store.
///
/// No metrics listener, DNS responder or Docker plugin (100 of them would fight over
/// ports and sockets), and the store collector effectively off (`--gc-interval 1440m`):
/// it would delete the benchmark's endpoints after its grace period, as they have no
/// container on their node, and its full reads are not the watch being measured.
const AGENT_OPTIONS: &[&str] = &[
    "--dataplane",
    "none",
    "--metrics-addr",
    "off",
    "--dns",
    "off",
    "--docker-plugin",
    "off",
    "--gc-interval",
    "1440m",
];

impl Fleet {
    /// Starts `count` agents on the store at `url`.
    pub fn start(overlay_ctl: &Path, url: &str, count: usize, dir: PathBuf) -> Result<Self> {
        Self::start_named(overlay_ctl, url, "scale", 0, count, dir)
    }

    /// Starts `count` agents named `{prefix}-000`... whose VTEPs follow those of the
    /// first `vteps_taken` agents (so a second fleet joins the first one's cluster).
    pub fn start_named(
        overlay_ctl: &Path,
        url: &str,
        prefix: &str,
        vteps_taken: usize,
        count: usize,
        dir: PathBuf,
    ) -> Result<Self> {
        let mut fleet = Self {
            agents: Vec::with_capacity(count),
            dir,
        };
        for i in 0..count {
            let node = format!("{prefix}-{i:03}");
            let vtep = vtep_of(vteps_taken + i);
            let state_dir = fleet.dir.join(&node);
            std::fs::create_dir_all(&state_dir)?;
            let log = std::fs::File::create(state_dir.join("agent.log"))?;
            let child = Command::new(overlay_ctl)
                .arg("agent")
                .args(AGENT_OPTIONS)
                .args(["--node", &node, "--vtep", &vtep.to_string(), "--store", url])
                .arg("--state-dir")
                .arg(&state_dir)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("start agent {node}"))?;
            fleet.agents.push(Agent {
                node,
                vtep,
                state_dir,
                child,
            });
        }
        Ok(fleet)
    }

    pub fn node_names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.node.clone()).collect()
    }

    /// Fails with the agent's last log lines when one of them exited.
    pub fn check_running(&mut self) -> Result<()> {
        for agent in &mut self.agents {
            if let Some(status) = agent.child.try_wait()? {
                let log =
                    std::fs::read_to_string(agent.state_dir.join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "agent {} exited ({status}); its log ends:\n{}",
                    agent.node,
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    /// Every agent's `status` (as `overlay-ctl status --json` prints it), in order.
    pub async fn statuses(&self) -> Vec<Result<Value>> {
        let requests = self.agents.iter().map(|a| agent_status(&a.state_dir));
        futures_util::future::join_all(requests).await
    }

    /// Every agent's CPU time so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> Vec<f64> {
        self.agents
            .iter()
            .map(|a| cpu_seconds(a.child.id()).unwrap_or(0.0))
            .collect()
    }

    /// Every agent's resident memory, in bytes.
    pub fn rss_bytes(&self) -> Vec<u64> {
        self.agents
            .iter()
            .filter_map(|a| crate::control::rss_bytes(a.child.id()))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in &self.agents {
            let pid = Pid::from_raw(agent.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        for agent in &mut self.agents {
            while Instant::now() < deadline {
                if matches!(agent.child.try_wait(), Ok(Some(_)) | Err(_)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `status` request on the agent's control socket (one JSON line each way).
pub async fn agent_status(state_dir: &Path) -> Result<Value> {
    let path = overlay_ctl::agent::control::socket_path(state_dir);
    let exchange = async {
        let stream = tokio::net::UnixStream::connect(&path).await?;
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(b"{\"op\":\"status\"}\n").await?;
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    };
    let line = tokio::time::timeout(STATUS_TIMEOUT, exchange)
        .await
        .with_context(|| format!("{} did not answer", path.display()))?
        .with_context(|| format!("ask {} for its status", path.display()))?;
    let mut reply: Value = serde_json::from_str(&line).context("unreadable status")?;
    match reply.get_mut("Ok") {
        Some(status) => Ok(status.take()),
        None => bail!("the agent refused: {line}"),
    }
}

/// User + system CPU time of `pid` (fields 14 and 15 of /proc/PID/stat), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / ticks)
}
