//! Docker (Debian's docker.io, dockerd 20.10) on simulated hosts, for the tests and the
//! demo: each host's dockerd has its own --data-root, --exec-root, -H socket and
//! --pidfile, and runs in the host's network namespace and a mount namespace of its own
//! where /run is an overlay (the machine's /run is never written) and
//! /run/docker/plugins a private tmpfs linking to that host's agent's `overlay-net`
//! socket. Images are made offline with `docker import` of busybox-static.
use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub use crate::harness::assert_ok;
use crate::{
    cluster::{wait_exit, Bins, DevConsul, Node},
    harness::{kill_processes_naming, unique_name, wait_until},
    topology::Underlay,
};

const BUSYBOX: &str = "/bin/busybox";
pub const DOCKER: &str = "/usr/bin/docker";
/// Debian's dockerd (docker.io).
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The image every host imports.
pub const IMAGE: &str = "busybox:overlay-test";
pub const DRIVER: &str = "overlay-net";

/// One host's dockerd: a mount-namespace holder (`unshare --mount` running `sleep`) and
/// dockerd inside it and the host's network namespace. Drop stops dockerd (its
/// containers leave the network through the driver), then the holder, then whatever
/// process still names this host's directory (shims), and removes the directory.
pub struct DockerHost {
    dir: PathBuf,
    netns: PathBuf,
    holder: Child,
    daemon: Option<Child>,
}

impl DockerHost {
    pub fn start(node: &Node) -> Self {
        let dir = std::env::temp_dir().join(unique_name("ovl-docker-"));
        for sub in ["run-upper", "run-work", "cli", "rootfs"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let socket = docker_plugin_dir(node).join(format!("{DRIVER}.sock"));
        // /run/docker/plugins: a private tmpfs in this host's own mount namespace (on an
        // overlay of /run, so no directory is made in the machine's /run); the
        // machine's containerd socket is hidden so dockerd starts its own.
        let script = format!(
            "set -e\n\
             mount -t overlay overlay -o lowerdir=/run,upperdir={d}/run-upper,workdir={d}/run-work /run\n\
             rm -rf /run/containerd /run/docker\n\
             mkdir -p /run/docker/plugins\n\
             mount -t tmpfs -o mode=0700 tmpfs /run/docker/plugins\n\
             ln -s {socket} /run/docker/plugins/{DRIVER}.sock\n\
             echo ready\n\
             exec sleep 100000\n",
            d = dir.display(),
            socket = socket.display(),
        );
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut holder = crate::cluster::spawn_in(node.ns.ns().path(), &mut command);
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
        };
        let ready = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        assert_eq!(ready.trim(), "ready", "the mount namespace was not set up");
        this.start_daemon();
        this
    }

    pub fn start_daemon(&mut self) {
        let d = self.dir.display().to_string();
        let log = File::create(self.dir.join("dockerd.log")).unwrap();
        let mut daemon = Command::new(DOCKERD);
        daemon
            .args([
                "--iptables=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver=vfs",
                "--live-restore",
            ])
            .args(["--data-root", &format!("{d}/data")])
            .args(["--exec-root", &format!("{d}/exec")])
            .args(["-H", &format!("unix://{d}/docker.sock")])
            .args(["--pidfile", &format!("{d}/docker.pid")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.daemon = Some(self.spawn(&mut daemon));
        wait_until("dockerd to answer", Duration::from_secs(60), || {
            self.docker(&["version"]).status.success()
        });
    }

    /// SIGTERM to dockerd and waits for it (with --live-restore its containers go on).
    pub fn stop_daemon(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if wait_exit(&mut daemon, Duration::from_secs(30)).is_none() {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
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

    pub fn docker_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(DOCKER);
        command
            .arg("-H")
            .arg(format!("unix://{}/docker.sock", self.dir.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// `docker ARGS` against this host's daemon, waited for (at most 90 s).
    pub fn docker(&self, args: &[&str]) -> Output {
        let mut child = self.docker_command(args).spawn().unwrap();
        if wait_exit(&mut child, Duration::from_secs(90)).is_none() {
            let _ = child.kill();
        }
        child.wait_with_output().unwrap()
    }

    /// `docker ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert_ok(&format!("docker {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker ARGS`, which must fail; its output (stdout and stderr).
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "docker {} should have failed:\n{text}",
            args.join(" ")
        );
        text
    }

    /// The busybox image, made offline: a directory with busybox and its applets.
    pub fn import_image(&self) {
        let root = self.dir.join("rootfs");
        for sub in ["bin", "tmp", "www", "etc"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "ping", "httpd", "wget", "cat", "sleep", "ip", "head", "md5sum", "wc",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut import = self.docker_command(&["import", "-", IMAGE]);
        import.stdin(tar.stdout.take().unwrap());
        let out = import.spawn().unwrap().wait_with_output().unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the image failed");
        assert_ok("docker import", &out);
    }

    /// A container's address on `network`.
    pub fn address(&self, container: &str, network: &str) -> String {
        let format = format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}");
        self.ok(&["inspect", "-f", &format, container])
    }

    /// `docker exec` repeated until it succeeds or 20 s pass; the last attempt's output.
    pub fn exec_until_ok(&self, container: &str, cmd: &[&str]) -> Output {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut args = vec!["exec", container];
        args.extend_from_slice(cmd);
        loop {
            let out = self.docker(&args);
            if out.status.success() || Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for DockerHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("---- dockerd {} ----", self.dir.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        // Containers first (dockerd keeps them running on exit: --live-restore).
        if self.daemon.is_some() {
            let out = self.docker(&["ps", "-aq"]);
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        self.stop_daemon();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        kill_processes_naming(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn assert_contains(text: &str, wanted: &str) {
    assert!(text.contains(wanted), "{wanted:?} not in:\n{text}");
}

/// Where a node's agent serves the driver (linked into its dockerd's plugin directory).
pub fn docker_plugin_dir(node: &Node) -> PathBuf {
    node.state_dir.join("docker-plugins")
}

/// The dev server and `n` agents serving the Docker driver (node 1 bootstraps), joined.
pub fn start_cluster(bins: &Bins, underlay: &Underlay, n: u8) -> (DevConsul, Vec<Node>) {
    let consul = DevConsul::start(bins, underlay, None);
    let mut nodes: Vec<Node> = (1..=n)
        .map(|i| Node::new(bins, underlay, i, &consul))
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        start_agent(node, i == 0);
    }
    for node in &nodes {
        node.wait_registered(Duration::from_secs(20));
    }
    (consul, nodes)
}

/// Starts the node's agent serving the Docker driver.
pub fn start_agent(node: &mut Node, bootstrap: bool) {
    let dir = docker_plugin_dir(node).display().to_string();
    let mut args = vec!["--docker-plugin", "--docker-plugin-dir", &dir];
    if bootstrap {
        args.push("--bootstrap");
    }
    node.start_agent(&args);
}
