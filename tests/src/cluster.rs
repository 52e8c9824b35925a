//! A control-plane cluster for the tests: the Consul dev server on the underlay (an
//! `overlay-ctl dev-server` process in the underlay namespace) and nodes (host namespaces) each running a real
//! `overlay-ctl agent` process, with the CLI run inside the node's namespace the way an
//! operator runs it on a host.
use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overlay_ctl::{dataplane::netns::NetNs, store::consul::ConsulClient};

use crate::{
    harness::{unique_name, wait_until, PinGuard, TestNs},
    topology::Underlay,
};

/// The binary the cluster runs: `overlay-ctl` (agents, operator commands and the Consul
/// dev server, `overlay-ctl dev-server`); build it with [`bins!`] in the test crate.
#[derive(Clone, Copy, Debug)]
pub struct Bins {
    pub cli: &'static str,
}

impl Bins {
    /// `overlay-ctl` next to the running executable (a driver built together with it in
    /// one target directory, e.g. by `cargo xtask demo` or `cargo xtask bench`).
    pub fn beside_current_exe() -> Self {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .unwrap_or_default();
        Self {
            cli: Box::leak(
                dir.join("overlay-ctl")
                    .display()
                    .to_string()
                    .into_boxed_str(),
            ),
        }
    }

    /// A one-line error when the binary is missing.
    pub fn check(&self) -> Result<(), String> {
        if !Path::new(self.cli).exists() {
            return Err(format!(
                "{} is missing (build it: cargo build --release -p overlay-ctl)",
                self.cli
            ));
        }
        Ok(())
    }
}

/// The CLI as cargo built it for the calling integration test (`overlay-cli`, the same
/// code as `overlay-ctl`, built inside the test package so that cargo gives its path).
#[macro_export]
macro_rules! bins {
    () => {
        $crate::cluster::Bins {
            cli: env!("CARGO_BIN_EXE_overlay-cli"),
        }
    };
}

/// Where the dev server listens: the underlay bridge's own address.
pub const CONSUL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
pub const CONSUL_PORT: u16 = 8500;

/// `command`, started inside the network namespace at `netns`.
pub fn spawn_in(netns: &Path, command: &mut Command) -> Child {
    let ns = std::fs::File::open(netns).expect("open namespace");
    let fd = ns.as_raw_fd();
    // SAFETY: only setns(2) runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn process");
    drop(ns);
    child
}

/// Signals `child` unless it was already waited for: the PID of a reaped child may
/// belong to any other process by now (a child that exited but was not reaped keeps its
/// PID until it is).
fn kill(child: &mut Child, signal: nix::sys::signal::Signal) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
    }
}

/// Waits for `child` to exit, up to `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The Consul dev server, a process in the underlay namespace; killed on drop.
pub struct DevConsul {
    child: Option<Child>,
    bin: &'static str,
    netns: PathBuf,
    data_dir: Option<PathBuf>,
    /// More `dev-server` options (e.g. `--acl-token`).
    extra_args: Vec<String>,
}

impl DevConsul {
    /// Starts the server on [`CONSUL_IP`] (which this adds to the bridge), keeping its
    /// state in `data_dir` when given (so a restart keeps it, as a real server does).
    pub fn start(bins: &Bins, underlay: &Underlay, data_dir: Option<&Path>) -> Self {
        Self::start_with_args(bins, underlay, data_dir, &[])
    }

    /// As [`DevConsul::start`], with more `dev-server` options.
    pub fn start_with_args(
        bins: &Bins,
        underlay: &Underlay,
        data_dir: Option<&Path>,
        extra_args: &[&str],
    ) -> Self {
        underlay.add_bridge_address(CONSUL_IP);
        let mut server = Self {
            child: None,
            bin: bins.cli,
            netns: underlay.ns.ns().path().to_path_buf(),
            data_dir: data_dir.map(Path::to_path_buf),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        server.launch();
        server
    }

    pub fn addr(&self) -> String {
        format!("{CONSUL_IP}:{CONSUL_PORT}")
    }

    fn launch(&mut self) {
        let mut command = Command::new(self.bin);
        command
            // Consul's session_ttl_min lowered, as the tests' short TTLs need (their
            // agents say so with --dev-store).
            .args([
                "dev-server",
                "--listen",
                &self.addr(),
                "--session-ttl-min",
                "1s",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(dir) = &self.data_dir {
            command.arg("--data-dir").arg(dir);
        }
        command.args(&self.extra_args);
        let mut child = spawn_in(&self.netns, &mut command);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the dev server did not print its ready line within 10 s");
        assert!(
            line.contains("listening on"),
            "unexpected dev server output: {line:?}"
        );
        self.child = Some(child);
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, nix::sys::signal::Signal::SIGKILL);
            kill(&mut child, nix::sys::signal::Signal::SIGCONT);
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server still accepts connections (the kernel does) but answers
    /// nothing, as a store cut off by the network would. [`DevConsul::resume`] undoes it.
    pub fn freeze(&mut self) {
        if let Some(child) = &mut self.child {
            kill(child, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// SIGCONT after [`DevConsul::freeze`].
    pub fn resume(&mut self) {
        if let Some(child) = &mut self.child {
            kill(child, nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Starts it again on the same address (and data directory).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Runs `f` with a client of this server, from a thread inside the underlay (where
    /// the server is reachable).
    pub fn with_client<R: Send, Fut: std::future::Future<Output = R>>(
        &self,
        f: impl FnOnce(ConsulClient) -> Fut + Send,
    ) -> R {
        let addr = self.addr();
        NetNs::open_path("underlay", self.netns.clone())
            .unwrap()
            .block_on(|| async move {
                // The tests read and write tens of thousands of keys in one request on
                // a loaded, shared machine, where the debug-build server can take
                // longer than the client's default 10 s: this is the harness's own view
                // of the store, not the product's, so it waits longer.
                let client = ConsulClient::new(&addr, None)
                    .unwrap()
                    .with_timeout(Duration::from_secs(60));
                f(client).await
            })
            .expect("enter the underlay namespace")
    }

    /// Simulates a gossip flap (or a restart) of the Consul agent the nodes talk to
    /// (`PUT /v1/dev/serf-flap`): sessions tied to its `serfHealth` check are
    /// invalidated. Returns how many were.
    pub fn serf_flap(&self) -> u64 {
        let addr = self.addr();
        let answer = NetNs::open_path("underlay", self.netns.clone())
            .unwrap()
            .run(move || raw_http(&addr, "PUT", "/v1/dev/serf-flap"))
            .expect("enter the underlay namespace")
            .expect("PUT /v1/dev/serf-flap");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let reply: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("serf-flap answer {answer:?}: {e}"));
        reply["Invalidated"].as_u64().expect("Invalidated count")
    }

    /// Every key under `prefix` with its value and modify index.
    pub fn kv_snapshot(&self, prefix: &str) -> Vec<(String, Vec<u8>, u64)> {
        let prefix = prefix.to_string();
        self.with_client(|client| async move {
            let mut pairs: Vec<_> = client
                .list(&prefix)
                .await
                .expect("list the KV store")
                .into_iter()
                .map(|p| (p.key, p.value, p.modify_index))
                .collect();
            pairs.sort();
            pairs
        })
    }
}

impl Drop for DevConsul {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 exchange without a body (for the dev server's `/v1/dev/` endpoints,
/// which the product's client has no call for); the whole answer as text.
fn raw_http(addr: &str, method: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// What a CLI invocation printed and returned.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics with the whole output unless the command succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }
}

/// A host running an agent.
pub struct Node {
    pub name: String,
    pub vtep: Ipv4Addr,
    /// The underlay interface the agent is started with.
    pub iface: String,
    pub state_dir: PathBuf,
    agent: Option<Child>,
    bins: Bins,
    /// The ACL token the agent and the CLI send (`CONSUL_HTTP_TOKEN`), if any.
    pub token: Option<String>,
    /// The options naming the store (`--consul ADDR` or `--store URL`), given to the
    /// agent and to every CLI command.
    store_args: [String; 2],
    /// Field order: the agent dies first (above), then the pins go, then the namespace.
    pub pins: PinGuard,
    pub ns: TestNs,
}

impl Node {
    /// Host `n` on the underlay (no agent yet).
    pub fn new(bins: &Bins, underlay: &Underlay, n: u8, consul: &DevConsul) -> Self {
        Self::with_underlay_mtu(bins, underlay, n, consul, crate::topology::UNDERLAY_MTU)
    }

    /// [`Node::new`] on an underlay link of MTU `mtu`.
    pub fn with_underlay_mtu(
        bins: &Bins,
        underlay: &Underlay,
        n: u8,
        consul: &DevConsul,
        mtu: u32,
    ) -> Self {
        let store_args = ["--consul".to_string(), consul.addr()];
        Self::on_store(bins, underlay, n, store_args, mtu)
    }

    /// Host `n` on the underlay whose agent and CLI use `--store url` (no agent yet).
    pub fn with_store(bins: &Bins, underlay: &Underlay, n: u8, url: &str) -> Self {
        let store_args = ["--store".to_string(), url.to_string()];
        Self::on_store(bins, underlay, n, store_args, crate::topology::UNDERLAY_MTU)
    }

    fn on_store(
        bins: &Bins,
        underlay: &Underlay,
        n: u8,
        store_args: [String; 2],
        mtu: u32,
    ) -> Self {
        let (ns, _) = underlay.plug_with_mtu("node", n, mtu);
        let state_dir = std::env::temp_dir().join(unique_name("overlay-state-"));
        std::fs::create_dir_all(&state_dir).unwrap();
        Self {
            name: format!("node{n}"),
            vtep: Underlay::host_address(n),
            iface: crate::topology::UNDERLAY_IFNAME.to_string(),
            state_dir,
            agent: None,
            bins: *bins,
            store_args,
            token: None,
            pins: PinGuard::new(),
            ns,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.state_dir.join("agent.log")
    }

    /// Starts `overlay-ctl agent` in this host with `extra` arguments.
    pub fn start_agent(&mut self, extra: &[&str]) {
        let mut args = vec!["--iface", "eth0"];
        args.extend_from_slice(extra);
        self.spawn_agent(&args);
    }

    /// Starts a control-plane-only agent (`agent --dataplane none`) in this host,
    /// registering the host's underlay address as its VTEP.
    pub fn start_control_plane_agent(&mut self, extra: &[&str]) {
        let vtep = self.vtep.to_string();
        let mut args = vec!["--dataplane", "none", "--vtep", &vtep];
        args.extend_from_slice(extra);
        self.spawn_agent(&args);
    }

    fn spawn_agent(&mut self, agent_args: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = Command::new(self.bins.cli);
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.store_args)
            .arg("agent")
            .args(agent_args)
            .arg("--node")
            .arg(&self.name)
            .arg("--pin-root")
            .arg(&self.pins.path)
            .args(["--metrics-addr", "127.0.0.1:9465"])
            // OVERLAY_TEST_AGENT_LOG: a finer filter to chase a failure with.
            .env(
                "RUST_LOG",
                std::env::var("OVERLAY_TEST_AGENT_LOG").unwrap_or_else(|_| {
                    "info,netlink_packet_route=error,netlink_proto=error".into()
                }),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(token) = &self.token {
            command.env("CONSUL_HTTP_TOKEN", token);
        }
        self.agent = Some(spawn_in(self.ns.ns().path(), &mut command));
    }

    /// Waits until the agent answers and holds its node key.
    pub fn wait_registered(&self, timeout: Duration) {
        let what = format!("{} to join the cluster", self.name);
        wait_until(&what, timeout, || {
            self.status()
                .is_some_and(|s| s["consul"]["registered"] == true)
        });
    }

    /// The agent's pid, if it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// `kill -9` of the agent.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            kill(&mut child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the agent to exit; returns its exit status.
    pub fn stop_agent(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.agent.take()?;
        kill(&mut child, nix::sys::signal::Signal::SIGTERM);
        let status = wait_exit(&mut child, Duration::from_secs(10));
        if status.is_none() {
            kill(&mut child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
        status
    }

    fn cli_command(&self, args: &[&str]) -> Command {
        let mut command = self.bare_cli_command();
        command.args(&self.store_args).args(args);
        command
    }

    /// `overlay-ctl --state-dir DIR` with the test's environment, without the store
    /// options (the CLI then follows the local agent's store).
    fn bare_cli_command(&self) -> Command {
        let mut command = Command::new(self.bins.cli);
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env(
                "RUST_LOG",
                "warn,netlink_packet_route=error,netlink_proto=error",
            )
            .stdin(Stdio::null());
        if let Some(token) = &self.token {
            command.env("CONSUL_HTTP_TOKEN", token);
        }
        command
    }

    /// Runs `overlay-ctl ARGS` on this host and waits for it.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_output(self.cli_command(args))
    }

    /// Runs `overlay-ctl ARGS` without the store options the agent got: it follows the
    /// local agent's store, or uses what `ARGS` names.
    pub fn cli_without_store(&self, args: &[&str]) -> CliOutput {
        let mut command = self.bare_cli_command();
        command.args(args);
        self.cli_output(command)
    }

    fn cli_output(&self, mut command: Command) -> CliOutput {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = spawn_in(self.ns.ns().path(), &mut command);
        let output = child.wait_with_output().unwrap();
        CliOutput {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Starts `program args...` inside this host, output discarded; killed on drop.
    pub fn spawn_process(&self, program: &str, args: &[String]) -> ProcessGuard {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ProcessGuard(spawn_in(self.ns.ns().path(), &mut command))
    }

    /// Starts `overlay-ctl run -n NETWORK --name NAME -- CMD...` in the background; the
    /// guard ends it (SIGTERM, so it cleans up) when dropped.
    pub fn spawn_run(&self, network: &str, name: &str, command: &[&str]) -> Background {
        self.spawn_run_with(network, name, &[], command)
    }

    /// [`Node::spawn_run`] with extra `run` options (e.g. `--service S`).
    pub fn spawn_run_with(
        &self,
        network: &str,
        name: &str,
        options: &[&str],
        command: &[&str],
    ) -> Background {
        let mut args = vec!["run", "-n", network, "--name", name];
        args.extend_from_slice(options);
        args.push("--");
        args.extend_from_slice(command);
        let mut cmd = self.cli_command(&args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        Background {
            child: Some(spawn_in(self.ns.ns().path(), &mut cmd)),
            netns: format!("ovl-{network}-{name}"),
        }
    }

    /// [`Node::spawn_run`] with extra environment variables (e.g. the test-only pause
    /// `OVERLAY_TEST_PAUSE=POINT:FILE`, see `overlay_ctl::testhook`).
    pub fn spawn_run_env(
        &self,
        network: &str,
        name: &str,
        env: &[(&str, &str)],
        command: &[&str],
    ) -> Background {
        let mut args = vec!["run", "-n", network, "--name", name, "--"];
        args.extend_from_slice(command);
        let mut cmd = self.cli_command(&args);
        cmd.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Background {
            child: Some(spawn_in(self.ns.ns().path(), &mut cmd)),
            netns: format!("ovl-{network}-{name}"),
        }
    }

    /// Starts `overlay-ctl ARGS` on this host in the background with extra environment
    /// variables; killed on drop.
    pub fn spawn_cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> CliProcess {
        let mut cmd = self.cli_command(args);
        cmd.envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        CliProcess(Some(spawn_in(self.ns.ns().path(), &mut cmd)))
    }

    /// Waits until `endpoint list` shows endpoint `name` on `network`; its address.
    pub fn wait_endpoint(&self, network: &str, name: &str) -> Ipv4Addr {
        let mut ip = None;
        wait_until(
            &format!("endpoint {network}/{name}"),
            Duration::from_secs(15),
            || {
                let out = self.cli(&["endpoint", "list", "-n", network, "--json"]);
                let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
                ip = list.as_array().and_then(|l| {
                    l.iter()
                        .find(|e| e["id"] == name)
                        .and_then(|e| e["ip"].as_str()?.parse().ok())
                });
                ip.is_some()
            },
        );
        ip.unwrap()
    }

    /// `status --json`, or `None` while the agent does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.cli(&["status", "--json"]);
        if out.code != 0 {
            return None;
        }
        serde_json::from_str(&out.stdout).ok()
    }

    /// One scrape of the agent's Prometheus endpoint (127.0.0.1:9465 in this host).
    pub fn metrics(&self) -> Option<String> {
        self.http_get(9465, "/metrics")
    }

    /// `GET path` from 127.0.0.1:`port` inside this host; the body of a 200 answer.
    pub fn http_get(&self, port: u16, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        self.ns.run(|| {
            let mut stream = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(2),
            )
            .ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let request =
                format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            let (head, body) = response.split_once("\r\n\r\n")?;
            head.split_whitespace()
                .nth(1)
                .is_some_and(|code| code == "200")
                .then(|| body.to_string())
        })
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.agent_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- last agent log lines of {} ----", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            // OVERLAY_TEST_KEEP_LOGS=DIR: the whole log, to chase a failure with.
            if let Some(dir) = std::env::var_os("OVERLAY_TEST_KEEP_LOGS") {
                let kept = std::path::Path::new(&dir).join(format!("{}.log", self.name));
                let _ = std::fs::write(&kept, &log);
                eprintln!("whole log kept in {}", kept.display());
            }
        }
        self.kill_agent();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A background CLI command, SIGKILLed on drop if still running.
pub struct CliProcess(Option<Child>);

impl CliProcess {
    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(child) = &mut self.0 {
            kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Waits for it to exit (killing it at `timeout`); its exit code and output.
    pub fn wait(mut self, timeout: Duration) -> CliOutput {
        let mut child = self.0.take().unwrap();
        let status = wait_exit(&mut child, timeout);
        if status.is_none() {
            kill(&mut child, nix::sys::signal::Signal::SIGKILL);
        }
        let output = child.wait_with_output().unwrap();
        CliOutput {
            code: status.and_then(|s| s.code()).unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A helper process (e.g. Prometheus), killed on drop.
pub struct ProcessGuard(Child);

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A background `overlay-ctl run`; ended with SIGTERM on drop (its netns removed if the
/// command could not clean up).
pub struct Background {
    child: Option<Child>,
    /// The container's namespace name (`ovl-NETWORK-NAME`).
    pub netns: String,
}

impl Background {
    /// The container's network namespace, once `run` created it.
    pub fn open_netns(&self) -> Option<NetNs> {
        NetNs::open(&self.netns).ok()
    }

    /// Waits for the command to exit and returns its exit code and output.
    pub fn wait(mut self, timeout: Duration) -> CliOutput {
        let mut child = self.child.take().unwrap();
        let status = wait_exit(&mut child, timeout);
        if status.is_none() {
            kill(&mut child, nix::sys::signal::Signal::SIGKILL);
        }
        let output = child.wait_with_output().unwrap();
        CliOutput {
            code: status.and_then(|s| s.code()).unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Whether the `run` process has exited (its output stays readable by
    /// [`Background::wait`]).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// `kill -9` of the `run` process itself (its command lives on, orphaned).
    pub fn kill_cli(&mut self) {
        if let Some(child) = &mut self.child {
            kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Ends the container with SIGTERM (the CLI passes it on and cleans up).
    pub fn stop(mut self) -> CliOutput {
        if let Some(child) = &mut self.child {
            kill(child, nix::sys::signal::Signal::SIGTERM);
        }
        self.wait(Duration::from_secs(10))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, nix::sys::signal::Signal::SIGTERM);
            if wait_exit(&mut child, Duration::from_secs(5)).is_none() {
                kill(&mut child, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
            }
        }
        if let Ok(ns) = NetNs::open(&self.netns) {
            let _ = ns.delete();
        }
    }
}

/// Starts `overlay-ctl agent logs -f` on `node`; its stdout lines arrive on the channel.
pub fn follow_logs(node: &Node) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut command = node.cli_command(&["agent", "logs", "-f", "-n", "0"]);
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = spawn_in(node.ns.ns().path(), &mut command);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// `n` nodes whose agents use the store at `url` (node 1 bootstraps), all joined.
pub fn start_nodes_on_store(
    bins: &Bins,
    underlay: &Underlay,
    n: u8,
    url: &str,
    agent_args: &[&str],
) -> Vec<Node> {
    let mut nodes: Vec<Node> = (1..=n)
        .map(|i| Node::with_store(bins, underlay, i, url))
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut args = agent_args.to_vec();
        if i == 0 {
            args.push("--bootstrap");
        }
        node.start_agent(&args);
    }
    for node in &nodes {
        node.wait_registered(Duration::from_secs(20));
    }
    nodes
}

/// A dev server and `n` nodes with agents running (node 1 bootstraps), all joined.
pub fn start_cluster(
    bins: &Bins,
    underlay: &Underlay,
    n: u8,
    data_dir: Option<&Path>,
    agent_args: &[&str],
) -> (DevConsul, Vec<Node>) {
    let consul = DevConsul::start(bins, underlay, data_dir);
    let mut nodes: Vec<Node> = (1..=n)
        .map(|i| Node::new(bins, underlay, i, &consul))
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut args = agent_args.to_vec();
        if i == 0 {
            args.push("--bootstrap");
        }
        node.start_agent(&args);
    }
    for node in &nodes {
        node.wait_registered(Duration::from_secs(20));
    }
    (consul, nodes)
}

/// The IPAM and endpoint records of a container `id` of `node` at `ip` on net1, as
/// `run` writes them.
pub fn endpoint_records(id: &str, node: &str, ip: Ipv4Addr) -> [(String, Vec<u8>); 2] {
    let allocation = overlay_ctl::store::IpAllocation {
        endpoint: id.into(),
        node: node.into(),
    };
    let endpoint = overlay_ctl::store::Endpoint {
        id: id.into(),
        network: "net1".into(),
        ip,
        mac: overlay_ctl::dataplane::endpoint::mac_for(ip),
        node: node.into(),
        ifname: overlay_ctl::runtimes::container::host_ifname("net1", id),
        container: None,
        pid: None,
        netns: None,
    };
    [
        (
            format!("overlay/ipam/net1/{ip}"),
            serde_json::to_vec(&allocation).unwrap(),
        ),
        (
            format!("overlay/endpoints/net1/{id}"),
            serde_json::to_vec(&endpoint).unwrap(),
        ),
    ]
}
