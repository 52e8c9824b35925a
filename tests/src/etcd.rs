//! Real etcd clusters for the tests: three members of Debian's `etcd` (3.4) on
//! loopback, each with free ports and its own data directory, killed and removed on
//! drop. The fault tests use it to kill -9 a member, restart it, find the raft leader,
//! take quorum away and give it back, and wait (with a deadline) until the cluster is
//! healthy again. Optionally the client port speaks TLS with a CA and certificates
//! made by `openssl` at test time. [`EtcdCluster::start_in`] puts the members in a
//! network namespace (the cluster tests' underlay, where agents reach them) on one
//! address; the harness then talks to them from a thread inside that namespace.
use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overlay_ctl::{
    dataplane::netns::NetNs,
    store::etcd::{EtcdClient, EtcdConfig, MemberStatus, TlsFiles},
};

use crate::harness::{assert_ok, kill_processes_naming, unique_name};

/// Debian's etcd-server installs it here (`cargo xtask setup`).
pub const ETCD_BINARY: &str = "/usr/bin/etcd";
/// Raft timings: etcd's defaults (100 ms heartbeat, 1 s election), so failover in the
/// tests takes as long as in a default deployment.
const HEARTBEAT_MS: u32 = 100;
const ELECTION_MS: u32 = 1000;

/// How long a whole cluster (three members started, or restarted, at once) gets to elect
/// a leader: alone it takes about a second. (Two failures at this bound on 2026-12-03
/// were another test's clean-up killing a member, see `kill_processes_naming`.)
pub const WHOLE_CLUSTER_UP: Duration = Duration::from_secs(30);

/// One member: its ports, data directory and process (when running).
pub struct EtcdMember {
    pub name: String,
    /// The address both ports listen on.
    pub host: Ipv4Addr,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdMember {
    /// `host:port` of the client API.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.client_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The member process as the kernel sees it (state and wait channel), for failure
    /// messages: a member that logs nothing may be blocked (disk, lock) or not scheduled.
    pub fn process_state(&self) -> String {
        let Some(child) = &self.child else {
            return "not running".to_string();
        };
        let pid = child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|r| r.split(' ').next());
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        format!("pid {pid}, state {}, wchan {wchan}", state.unwrap_or("?"))
    }

    /// The member's own log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// The server side of TLS: the CA and the certificates made for one cluster.
pub struct TlsMaterial {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A running cluster. Dropping it kills every member and removes its directory.
pub struct EtcdCluster {
    dir: PathBuf,
    members: Vec<EtcdMember>,
    token: String,
    tls: Option<TlsMaterial>,
    /// The namespace the members run in (`None`: the test's own).
    netns: Option<PathBuf>,
}

/// A port nobody listens on now (the kernel's choice for an ephemeral bind).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

impl EtcdCluster {
    /// Starts `size` members (plaintext) and waits until they elected a leader.
    pub async fn start(size: usize) -> Self {
        Self::start_with(size, false).await
    }

    /// Starts `size` members whose client port speaks TLS and requires a client
    /// certificate signed by the cluster's CA.
    pub async fn start_tls(size: usize) -> Self {
        Self::start_with(size, true).await
    }

    /// Starts `size` members (plaintext) inside the namespace at `netns`, listening on
    /// `host` (an address of that namespace), and waits until they elected a leader.
    pub async fn start_in(size: usize, netns: &Path, host: Ipv4Addr) -> Self {
        Self::start_on(size, false, Some(netns.to_path_buf()), host).await
    }

    async fn start_with(size: usize, tls: bool) -> Self {
        Self::start_on(size, tls, None, Ipv4Addr::LOCALHOST).await
    }

    async fn start_on(size: usize, tls: bool, netns: Option<PathBuf>, host: Ipv4Addr) -> Self {
        assert!(
            Path::new(ETCD_BINARY).exists(),
            "{ETCD_BINARY} is missing: run `cargo xtask setup` (Debian's etcd-server)"
        );
        let token = unique_name("overlay-etcd-");
        let dir = std::env::temp_dir().join(&token);
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        let members = (0..size)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                host,
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.join(format!("m{i}.data")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let mut cluster = Self {
            tls: tls.then(|| make_tls_material(&dir)),
            dir,
            members,
            token,
            netns,
        };
        for i in 0..size {
            cluster.start_member(i);
        }
        cluster.wait_healthy(WHOLE_CLUSTER_UP).await;
        cluster
    }

    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    pub fn tls(&self) -> Option<&TlsMaterial> {
        self.tls.as_ref()
    }

    /// The address of every member: `etcd://a,b,c` (or `etcds://`).
    pub fn address(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        let endpoints: Vec<String> = self.members.iter().map(EtcdMember::endpoint).collect();
        format!("{scheme}://{}", endpoints.join(","))
    }

    /// A client configuration for `address` with this cluster's client certificate.
    pub fn config_for(&self, address: &str) -> EtcdConfig {
        let files = self
            .tls
            .as_ref()
            .map_or_else(TlsFiles::default, |t| TlsFiles {
                ca: Some(t.ca.clone()),
                cert: Some(t.client_cert.clone()),
                key: Some(t.client_key.clone()),
            });
        EtcdConfig::new(address, files).expect("the cluster's address parses")
    }

    /// Runs `f` with a client of every member, from a thread inside the members'
    /// namespace when they run in one (the client's connections are made there).
    pub fn with_client<R: Send, Fut: std::future::Future<Output = R>>(
        &self,
        f: impl FnOnce(EtcdClient) -> Fut + Send,
    ) -> R {
        let config = self.config_for(&self.address());
        let run = || async move {
            let client = EtcdClient::connect(config)
                .await
                .expect("connect to the etcd cluster");
            f(client).await
        };
        match &self.netns {
            Some(path) => NetNs::open_path("etcd", path.clone())
                .and_then(|ns| ns.block_on(run))
                .expect("enter the etcd cluster's namespace"),
            None => std::thread::scope(|s| {
                s.spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime")
                        .block_on(run())
                })
                .join()
                .expect("the client thread")
            }),
        }
    }

    /// A client of every member.
    pub async fn client(&self) -> EtcdClient {
        EtcdClient::connect(self.config_for(&self.address()))
            .await
            .expect("connect to the etcd cluster")
    }

    /// A client of member `i` alone.
    pub async fn member_client(&self, i: usize) -> EtcdClient {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        let address = format!("{scheme}://{}", self.members[i].endpoint());
        EtcdClient::connect(self.config_for(&address))
            .await
            .expect("connect to the etcd member")
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.host, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts, on its existing data) member `i`.
    pub fn start_member(&mut self, i: usize) {
        assert!(
            !self.members[i].is_running(),
            "member {i} is already running"
        );
        let initial_cluster = self.initial_cluster();
        let member = &self.members[i];
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{}:{}", member.host, member.client_port);
        let peer_url = format!("http://{}:{}", member.host, member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .expect("open the member's log");
        let mut cmd = Command::new(ETCD_BINARY);
        cmd.arg("--name").arg(&member.name);
        cmd.arg("--data-dir").arg(&member.data_dir);
        cmd.args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ]);
        cmd.args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ]);
        cmd.args([
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            "new",
        ]);
        cmd.args(["--initial-cluster-token", &self.token]);
        cmd.args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()]);
        cmd.args(["--election-timeout", &ELECTION_MS.to_string()]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.server_cert);
            cmd.arg("--key-file").arg(&tls.server_key);
            cmd.arg("--trusted-ca-file").arg(&tls.ca);
            cmd.arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let child = match &self.netns {
            Some(netns) => crate::cluster::spawn_in(netns, &mut cmd),
            None => cmd.spawn().expect("start etcd"),
        };
        self.members[i].child = Some(child);
    }

    /// kill -9 of member `i` (no chance to step down or flush anything).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What member `i` reports, or `None` when it does not answer.
    pub async fn member_status(&self, i: usize) -> Option<MemberStatus> {
        if !self.members[i].is_running() {
            return None;
        }
        let endpoint = self.members[i].endpoint();
        if self.netns.is_some() {
            return self
                .with_client(|client| async move { client.member_status(&endpoint).await.ok() });
        }
        let client = self.member_client(i).await;
        client.member_status(&endpoint).await.ok()
    }

    /// The index of the member that is the raft leader, as the running members see it;
    /// `None` while they do not agree on one.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader_id = None;
        let mut leader_index = None;
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                continue;
            }
            let status = self.member_status(i).await?;
            if status.leader_id == 0 || leader_id.is_some_and(|l| l != status.leader_id) {
                return None;
            }
            leader_id = Some(status.leader_id);
            if status.is_leader() {
                leader_index = Some(i);
            }
        }
        leader_index
    }

    /// Waits until every running member answers and they agree on a leader among them.
    pub async fn wait_healthy(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader().await {
                return leader;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| {
                        format!(
                            "--- {} ({}) ---\n{}",
                            m.name,
                            m.process_state(),
                            m.log_tail()
                        )
                    })
                    .collect();
                panic!(
                    "etcd cluster not healthy after {timeout:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills every member not in `keep` (with 1 of 3 left, quorum is lost); returns the
    /// killed ones.
    pub fn kill_all_but(&mut self, keep: &[usize]) -> Vec<usize> {
        let victims: Vec<usize> = (0..self.members.len())
            .filter(|i| !keep.contains(i))
            .collect();
        for &i in &victims {
            self.kill_member(i);
        }
        victims
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        // A member started by a test that panicked mid-way is caught by its data dir.
        kill_processes_naming(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with
/// Debian's `openssl`.
pub fn make_tls_material(dir: &Path) -> TlsMaterial {
    let path = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert_ok(&format!("openssl {}", args.join(" ")), &out);
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=overlay test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    for (name, usage) in [
        ("server", "serverAuth,clientAuth"),
        ("client", "clientAuth"),
    ] {
        let ext = format!("{name}.ext");
        std::fs::write(
            path(&ext),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"),
        )
        .expect("write the extension file");
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=overlay-{name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }
    TlsMaterial {
        ca: path("ca.pem"),
        server_cert: path("server.pem"),
        server_key: path("server.key"),
        client_cert: path("client.pem"),
        client_key: path("client.key"),
    }
}
