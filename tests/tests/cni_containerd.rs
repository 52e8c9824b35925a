//! containerd 1.6 (Debian's) end to end with the `overlay-cni` plugin: two simulated
//! hosts, each a host network namespace with an agent and its own containerd (own
//! --root, --state and socket) in its own mount namespace, where /etc/cni/net.d (an
//! overlay over /etc) and /opt/cni/bin (a tmpfs) hold that host's conflist and plugins;
//! the machine's real directories are never written. `ctr run --rootfs DIR --cni`
//! starts a busybox container on each host; they ping each other and fetch 1 MB from
//! each other over HTTP (TCP both ways). The conflist chains Debian's portmap and tuning
//! after overlay-cni, so both must accept its result as prevResult. When the containers
//! end, ctr's CNI DEL leaves no endpoint, address or veth behind.
use std::{
    fs::File,
    io::Write,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use overlay_tests::{
    bins,
    cluster::{start_cluster, wait_exit, Bins, Node},
    cni,
    harness::{assert_ok, kill_processes_naming, require_root, unique_name, wait_until},
    net,
    topology::Underlay,
};
use serde_json::{json, Value};

const BINS: Bins = bins!();
const PLUGIN: &str = env!("CARGO_BIN_EXE_overlay-cni-test");
const BUSYBOX: &str = "/bin/busybox";
const DATA_LEN: usize = 1 << 20;

/// One host's containerd: a mount-namespace holder (`unshare --mount` running `sleep`),
/// containerd, and the `ctr run` of each container, all inside the host's network
/// namespace. Drop kills the containers (so ctr runs its CNI DEL), then containerd, then
/// the holder, then any process still naming this host's directory (shims), and removes
/// the directory.
struct Containerd {
    dir: PathBuf,
    netns: PathBuf,
    holder: Child,
    daemon: Option<Child>,
    runs: Vec<(String, Child)>,
}

impl Containerd {
    fn start(node: &Node, conflist: &Value) -> Self {
        let dir = std::env::temp_dir().join(unique_name("ovl-ctrd-"));
        std::fs::create_dir_all(dir.join("fifo")).unwrap();
        std::fs::write(dir.join("10-overlay.conflist"), conflist.to_string()).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        for sub in ["etc-upper", "etc-work"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // This host's /etc/cni/net.d and /opt/cni/bin, in a mount namespace of its own.
        let script = format!(
            "set -e\n\
             mount -t overlay overlay -o lowerdir=/etc,upperdir={d}/etc-upper,workdir={d}/etc-work /etc\n\
             mkdir -p /etc/cni/net.d\n\
             cp {d}/10-overlay.conflist /etc/cni/net.d/\n\
             mount -t tmpfs tmpfs /opt\n\
             mkdir -p /opt/cni/bin\n\
             ln -s {plugin} /opt/cni/bin/overlay-cni\n\
             for p in loopback portmap tuning; do ln -s {debian}/$p /opt/cni/bin/$p; done\n\
             echo ready\n\
             exec sleep 100000\n",
            d = dir.display(),
            plugin = PLUGIN,
            debian = cni::DEBIAN_PLUGIN_DIR,
        );
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut holder = overlay_tests::cluster::spawn_in(node.ns.ns().path(), &mut command);
        let stdout = holder.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        let mut this = Self {
            dir,
            netns: node.ns.ns().path().to_path_buf(),
            holder,
            daemon: None,
            runs: Vec::new(),
        };
        let ready = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        assert_eq!(ready.trim(), "ready", "the mount namespace was not set up");

        let log = File::create(this.dir.join("containerd.log")).unwrap();
        let mut daemon = Command::new("containerd");
        daemon
            .arg("--config")
            .arg(this.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        this.daemon = Some(this.spawn(&mut daemon));
        wait_until("containerd to answer", Duration::from_secs(20), || {
            this.ctr(&["version"]).status.success()
        });
        this
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Spawns `command` in this host's network and mount namespaces.
    fn spawn(&self, command: &mut Command) -> Child {
        let net = File::open(&self.netns).unwrap();
        let mnt = File::open(format!("/proc/{}/ns/mnt", self.holder.id())).unwrap();
        let (net_fd, mnt_fd) = (net.as_raw_fd(), mnt.as_raw_fd());
        // SAFETY: only setns(2) runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(net_fd, libc::CLONE_NEWNET) != 0
                    || libc::setns(mnt_fd, libc::CLONE_NEWNS) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn in the host's namespaces");
        drop((net, mnt));
        child
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command.arg("--address").arg(self.socket()).args(args);
        command
    }

    /// `ctr ARGS`, waited for (at most 60 s).
    fn ctr(&self, args: &[&str]) -> Output {
        let mut command = self.ctr_command(args);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(&mut command);
        if wait_exit(&mut child, Duration::from_secs(60)).is_none() {
            let _ = child.kill();
        }
        child.wait_with_output().unwrap()
    }

    /// A busybox root filesystem for container `id`, with `data` served from /www.
    fn rootfs(&self, id: &str, data: &[u8]) -> PathBuf {
        let root = self.dir.join(format!("rootfs-{id}"));
        for sub in ["bin", "proc", "sys", "dev", "tmp", "www", "etc"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for applet in ["sh", "ping", "httpd", "wget", "cat", "sleep", "ip"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("www/data"), data).unwrap();
        root
    }

    /// `ctr run --rm --rootfs --cni ROOTFS ID CMD...` in the background.
    fn run(&mut self, id: &str, rootfs: &Path, cmd: &[&str]) {
        let log = File::create(self.dir.join(format!("ctr-{id}.log"))).unwrap();
        let fifo = self.dir.join("fifo");
        let rootfs = rootfs.display().to_string();
        let runc_root = self.dir.join("runc");
        let mut args = vec![
            "run",
            "--rm",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--runc-root",
            runc_root.to_str().unwrap(),
        ];
        args.extend(["--rootfs", "--cni", rootfs.as_str(), id]);
        args.extend_from_slice(cmd);
        let mut command = self.ctr_command(&args);
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = self.spawn(&mut command);
        self.runs.push((id.to_string(), child));
    }

    /// `ctr task exec` in container `id`.
    fn exec(&self, id: &str, cmd: &[&str]) -> Output {
        let exec_id = unique_name("x");
        let fifo = self.dir.join("fifo");
        let mut args = vec![
            "task",
            "exec",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--exec-id",
            &exec_id,
            id,
        ];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// Kills every container and waits for its `ctr run` (which then runs CNI DEL).
    /// Returns the `ctr run` logs of those that did not end in time.
    fn stop_containers(&mut self) -> Vec<String> {
        let mut stuck = Vec::new();
        for (id, mut child) in std::mem::take(&mut self.runs) {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", &id]);
            if wait_exit(&mut child, Duration::from_secs(30)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
                stuck.push(self.log(&format!("ctr-{id}.log")));
            }
        }
        stuck
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (id, _) in &self.runs {
                eprintln!(
                    "---- ctr run {id} ----\n{}",
                    self.log(&format!("ctr-{id}.log"))
                );
            }
            let log = self.log("containerd.log");
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("---- containerd ----");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        self.stop_containers();
        if let Some(mut daemon) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if wait_exit(&mut daemon, Duration::from_secs(10)).is_none() {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // Shims outlive a containerd that is gone; they name this directory.
        kill_processes_naming(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The address of the endpoint ctr's CNI ADD registered for container `id`.
fn endpoint_address(node: &Node, id: &str) -> Ipv4Addr {
    let owner = format!("cni:default-{id}:eth0");
    let mut found = None;
    wait_until(
        &format!("the endpoint of container {id}"),
        Duration::from_secs(30),
        || {
            let out = node.cli(&["endpoint", "list", "-n", "net1", "--json"]);
            let list: Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            found = list.as_array().and_then(|l| {
                l.iter()
                    .find(|e| e["container"] == owner.as_str())
                    .and_then(|e| e["ip"].as_str()?.parse().ok())
            });
            found.is_some()
        },
    );
    found.unwrap()
}

fn conflist(node: &Node) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "overlay",
        "plugins": [
            {"type": "overlay-cni", "network": "net1", "stateDir": node.state_dir},
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "321"}},
        ],
    })
}

/// Waits until `ctr task ls` shows container `id` RUNNING: ctr starts the task only after
/// the whole CNI chain ran.
fn wait_running(host: &Containerd, id: &str) {
    wait_until(
        &format!("container {id} running"),
        Duration::from_secs(30),
        || {
            let out = host.ctr(&["task", "ls"]);
            String::from_utf8_lossy(&out.stdout).lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.first() == Some(&id) && fields.last() == Some(&"RUNNING")
            })
        },
    );
}

/// `ctr task exec` repeated until it succeeds or 20 s pass; the last attempt's output.
fn exec_until_ok(host: &Containerd, id: &str, cmd: &[&str]) -> Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = host.exec(id, cmd);
        if out.status.success() || std::time::Instant::now() >= deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn containerd_containers_on_two_hosts_reach_each_other() {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let empty = |node: &Node| cni::Footprint::of(&consul, node);
    let before: Vec<_> = nodes.iter().map(|n| empty(n).veths).collect();

    let mut hosts: Vec<Containerd> = nodes
        .iter()
        .map(|n| Containerd::start(n, &conflist(n)))
        .collect();
    let data: Vec<Vec<u8>> = (0..2).map(|i| net::pattern(DATA_LEN, 7 + i)).collect();
    let ids = ["c1", "c2"];
    let mut rootfs = Vec::new();
    for (i, host) in hosts.iter_mut().enumerate() {
        let root = host.rootfs(ids[i], &data[i]);
        host.run(
            ids[i],
            &root,
            &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
        );
        rootfs.push(root);
    }
    let ips: Vec<Ipv4Addr> = (0..2)
        .map(|i| endpoint_address(&nodes[i], ids[i]))
        .collect();
    assert_ne!(ips[0], ips[1]);
    // The endpoint exists once overlay-cni's ADD is done; the plugins chained after it
    // (tuning's sysctl) have run once ctr started the task.
    for (host, id) in hosts.iter().zip(&ids) {
        wait_running(host, id);
    }

    for (i, host) in hosts.iter().enumerate() {
        let (me, peer) = (ids[i], 1 - i);
        // The container has the plugin's address on eth0, and the chained tuning plugin
        // (which needs a valid prevResult) applied its sysctl.
        let shown = host.exec(me, &["/bin/ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert_ok("ip addr in the container", &shown);
        assert!(
            String::from_utf8_lossy(&shown.stdout).contains(&format!("{}/24", ips[i])),
            "{}",
            String::from_utf8_lossy(&shown.stdout)
        );
        let sysctl = host.exec(me, &["/bin/cat", "/proc/sys/net/core/somaxconn"]);
        assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "321");

        let peer_ip = ips[peer].to_string();
        let ping = exec_until_ok(host, me, &["/bin/ping", "-c", "3", "-W", "2", &peer_ip]);
        assert_ok(&format!("ping {me} -> {peer_ip}"), &ping);
        // The peer's httpd may still be starting: retried until the deadline.
        let url = format!("http://{peer_ip}:8080/data");
        let fetched = exec_until_ok(host, me, &["/bin/wget", "-q", "-O", "/tmp/got", &url]);
        assert_ok(&format!("wget {url} in {me}"), &fetched);
        let got = std::fs::read(rootfs[i].join("tmp/got")).unwrap();
        assert_eq!(got.len(), DATA_LEN, "{me} fetched {} bytes", got.len());
        assert!(got == data[peer], "{me} fetched different bytes");
    }

    // ctr's CNI DEL on the containers' end removes everything the ADD made.
    for (i, host) in hosts.iter_mut().enumerate() {
        let stuck = host.stop_containers();
        assert!(stuck.is_empty(), "ctr run did not end: {stuck:?}");
        assert_eq!(
            cni::host_veths(&nodes[i]),
            before[i],
            "veths left on node{}",
            i + 1
        );
    }
    assert_eq!(consul.kv_snapshot("overlay/endpoints/net1/"), vec![]);
    assert_eq!(consul.kv_snapshot("overlay/ipam/net1/"), vec![]);
    drop(hosts);
    let _ = std::io::stderr().flush();
}
