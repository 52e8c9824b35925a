//! The stores the scale benchmark runs against, each a child process on loopback with
//! its own temporary directory, killed and removed on drop (also on an error or a
//! panic): the Consul dev server (`overlay-ctl dev-server`, in memory) and one etcd 3.4
//! member (Debian's `etcd`) with its data directory on disk. One member is not a
//! production etcd (no replication round trips); it is the same server code and the
//! same watch protocol the agents would meet.
use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use overlay_ctl::store::{backend::KvBackend as _, config::StoreConfig, etcd::TlsFiles, Store};

/// Debian's etcd-server installs it here (`cargo xtask setup`).
pub const ETCD_BINARY: &str = "/usr/bin/etcd";
/// How long a store may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Which store a measurement runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Consul,
    Etcd,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Consul => "consul",
            Backend::Etcd => "etcd",
        }
    }

    /// How the store is run, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Backend::Consul => "Consul dev server (overlay-ctl dev-server, in memory)",
            Backend::Etcd => "etcd 3.4 (Debian), one member, data dir on disk",
        }
    }
}

/// A running store; killed, and its directory removed, on drop.
pub struct StoreServer {
    pub backend: Backend,
    /// What agents and the CLI take as `--store`.
    pub url: String,
    child: Option<Child>,
    dir: PathBuf,
}

/// A port nobody listens on now (the kernel's choice for an ephemeral bind).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "overlay-scale-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

impl StoreServer {
    /// Starts `backend` and waits until it answers a read; `etcd_no_fsync`: etcd with
    /// `--unsafe-no-fsync` (to tell its disk's latency from the rest).
    pub async fn start(backend: Backend, overlay_ctl: &Path, etcd_no_fsync: bool) -> Result<Self> {
        let dir = temp_dir(backend.name())?;
        let (child, url) = match backend {
            Backend::Consul => start_dev_server(overlay_ctl, &dir),
            Backend::Etcd => start_etcd(&dir, etcd_no_fsync),
        }
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        let server = Self {
            backend,
            url,
            child: Some(child),
            dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// A client of this store, through the product's own store code.
    pub async fn store(&self) -> Result<Store> {
        let config = StoreConfig::parse(&self.url, TlsFiles::default())?;
        Ok(Store::connect(&config, overlay_ctl::store::DEFAULT_PREFIX).await?)
    }

    async fn wait_ready(&self) -> Result<()> {
        let store = self.store().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match store.kv().get("overlay/config/bootstrapped").await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "{} did not answer within {READY_TIMEOUT:?}: {e}; its log: {}",
                        self.backend.name(),
                        self.dir.join("server.log").display()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn log_file(dir: &Path) -> Result<std::fs::File> {
    Ok(std::fs::File::create(dir.join("server.log"))?)
}

/// `overlay-ctl dev-server` on a free loopback port; returns once it printed its ready
/// line.
fn start_dev_server(overlay_ctl: &Path, dir: &Path) -> Result<(Child, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut child = Command::new(overlay_ctl)
        .args(["dev-server", "--listen", &addr])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file(dir)?)
        .spawn()
        .with_context(|| format!("start {} dev-server", overlay_ctl.display()))?;
    let stdout = child.stdout.take().context("dev server stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) if line.contains("listening on") => Ok((child, format!("consul://{addr}"))),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the dev server did not start: {other:?}")
        }
    }
}

/// One etcd member on free loopback ports, its data directory in `dir`.
fn start_etcd(dir: &Path, no_fsync: bool) -> Result<(Child, String)> {
    if !Path::new(ETCD_BINARY).exists() {
        bail!("{ETCD_BINARY} is missing: install Debian's etcd-server (`cargo xtask setup` does), or run with --store consul");
    }
    let client = format!("http://127.0.0.1:{}", free_port()?);
    let peer = format!("http://127.0.0.1:{}", free_port()?);
    let log = log_file(dir)?;
    let mut command = Command::new(ETCD_BINARY);
    if no_fsync {
        command.arg("--unsafe-no-fsync");
    }
    let child = command
        .arg("--name")
        .arg("scale")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("scale={peer}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start etcd")?;
    let url = client.replace("http://", "etcd://");
    Ok((child, url))
}
