//! `overlay-demo`: the SocketPlane walkthrough replayed on three simulated hosts (network
//! namespaces on a veth underlay) with the Consul dev server, narrated step by step, ending
//! with a pass/fail line; when Debian's docker.io is installed, a last act does the same
//! with `docker run` on the agents' `overlay-net` driver. Everything it creates is
//! removed when it ends. Run it through `cargo xtask demo` (as root), which builds it
//! with `overlay-ctl` beside it: the agents, the operator commands and the Consul dev
//! server (`overlay-ctl dev-server`) are that binary.
use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::ExitCode,
    time::{Duration, Instant},
};

use overlay_tests::{
    cluster::{Background, Bins, CliOutput, Node},
    docker::{self, DockerHost},
    harness::wait_until,
    net,
    topology::Underlay,
};

/// Bytes the demo's TCP transfer moves between hosts.
const TRANSFER_BYTES: usize = 1024 * 1024;
const TRANSFER_PORT: &str = "5000";

/// The demo's own TCP ends, run inside containers by `overlay-ctl run`:
/// `overlay-demo tcp-sink PORT` receives one stream and prints its length and digest;
/// `overlay-demo tcp-send IP PORT BYTES` sends a deterministic stream and prints the same.
fn transfer_tool(args: &[String]) -> Option<ExitCode> {
    let digest_line = |verb: &str, len: usize, digest: u64| {
        println!("{verb} {len} bytes, digest {digest:016x}");
        ExitCode::SUCCESS
    };
    match args {
        [mode, port] if mode == "tcp-sink" => {
            let port: u16 = port.parse().ok()?;
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).ok()?;
            let (len, digest) = net::tcp_receive_all(&listener, Duration::from_secs(30));
            Some(digest_line("received", len, digest))
        }
        [mode, ip, port, bytes] if mode == "tcp-send" => {
            let dst = SocketAddrV4::new(ip.parse().ok()?, port.parse().ok()?);
            let data = net::pattern(bytes.parse().ok()?, 11);
            // The sink's command starts a moment after its address is listed.
            let deadline = Instant::now() + Duration::from_secs(10);
            let stream = loop {
                match TcpStream::connect_timeout(&dst.into(), Duration::from_secs(1)) {
                    Ok(stream) => break stream,
                    Err(e) if Instant::now() > deadline => {
                        eprintln!("tcp-send: cannot connect to {dst}: {e}");
                        return Some(ExitCode::FAILURE);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            if let Err(e) = net::send_stream(stream, &data, Duration::from_secs(30)) {
                eprintln!("tcp-send: {e}");
                return Some(ExitCode::FAILURE);
            }
            Some(digest_line("sent", data.len(), net::digest(&data)))
        }
        _ => None,
    }
}

struct Demo {
    checks: usize,
    failed: Vec<String>,
}

impl Demo {
    fn say(&self, text: &str) {
        println!("\n## {text}");
    }

    /// Shows an operator command on `node` and its output.
    fn show(&self, node: &Node, args: &[&str]) -> CliOutput {
        println!("{}$ overlay-ctl {}", node.name, args.join(" "));
        let out = node.cli(args);
        for line in out.stdout.lines().chain(out.stderr.lines()) {
            println!("    {line}");
        }
        out
    }

    fn check(&mut self, what: &str, ok: bool) {
        self.checks += 1;
        if ok {
            println!("   ok: {what}");
        } else {
            println!("   FAILED: {what}");
            self.failed.push(what.to_string());
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() {
        return transfer_tool(&args).unwrap_or_else(|| {
            eprintln!("usage: overlay-demo [tcp-sink PORT | tcp-send IP PORT BYTES]");
            ExitCode::from(2)
        });
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("error: the demo creates network namespaces and loads BPF programs: run it as root (sudo -E cargo xtask demo)");
        return ExitCode::FAILURE;
    }
    let bins = Bins::beside_current_exe();
    if let Err(e) = bins.check() {
        eprintln!("error: {e}; run the demo through `cargo xtask demo`");
        return ExitCode::FAILURE;
    }
    let mut demo = Demo {
        checks: 0,
        failed: Vec::new(),
    };
    println!("# The SocketPlane walkthrough on three simulated hosts");
    println!("Each host is a network namespace with its own eBPF data plane and agent; they");
    println!("share an underlay (a bridge), where a Consul dev server listens at 192.0.2.254.");

    demo.say("Start Consul, bootstrap the first host, join two more");
    println!("node1$ overlay-ctl agent --bootstrap --iface eth0 --docker-plugin");
    println!("node2$ overlay-ctl agent --iface eth0 --docker-plugin");
    println!("node3$ overlay-ctl agent --iface eth0 --docker-plugin");
    let underlay = Underlay::new();
    // The agents also serve Docker's driver (used by the last act when Docker is there).
    let (_consul, nodes) = docker::start_cluster(&bins, &underlay, 3);
    let members = demo.show(&nodes[0], &["cluster", "members"]);
    demo.check(
        "three members, each with its VTEP",
        members.code == 0
            && ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
                .iter()
                .all(|v| members.stdout.contains(v)),
    );
    demo.networks_act(&nodes);
    let (web, db) = demo.containers_act(&nodes);
    demo.ping_act(&nodes);
    demo.transfer_act(&nodes);
    demo.isolation_act(&nodes);
    demo.observe_act(&nodes);
    drop(web);
    drop(db);
    if std::path::Path::new(docker::DOCKERD).exists() {
        docker_act(&mut demo, &nodes);
    } else {
        println!("\n(The Docker act is skipped: Debian's docker.io is not installed.)");
    }
    demo.verdict()
}

/// The walkthrough's acts, in order; each narrates its commands and checks the outcome.
impl Demo {
    /// The default network, and a tenant network every host sees.
    fn networks_act(&mut self, nodes: &[Node]) {
        self.say("The bootstrapped cluster has a default network");
        let list = self.show(&nodes[1], &["network", "list"]);
        self.check(
            "network default 10.1.0.0/16 exists",
            list.stdout.contains("10.1.0.0/16"),
        );

        self.say("Create a network for a tenant");
        let created = self.show(&nodes[0], &["network", "create", "net1", "10.100.0.0/24"]);
        self.check("net1 created", created.code == 0);
        let list = self.show(&nodes[2], &["network", "list"]);
        self.check(
            "every host sees net1",
            list.stdout.contains("10.100.0.0/24"),
        );
    }

    /// Two containers on two hosts with addresses from the network, in order; they run
    /// until the handles are dropped.
    fn containers_act(&mut self, nodes: &[Node]) -> (Background, Background) {
        self.say("Start containers on two hosts");
        println!("node1$ overlay-ctl run -n net1 --name web -- sleep 300 &");
        let web = nodes[0].spawn_run("net1", "web", &["sleep", "300"]);
        let mut listed = String::new();
        let mut wait_listed = |name: &str| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_until(name, Duration::from_secs(20), || {
                    listed = nodes[2].cli(&["endpoint", "list", "-n", "net1"]).stdout;
                    listed.contains(name)
                })
            }))
            .is_ok()
        };
        let web_up = wait_listed("web");
        println!("node2$ overlay-ctl run -n net1 --name db -- sleep 300 &");
        let db = nodes[1].spawn_run("net1", "db", &["sleep", "300"]);
        let ready = web_up && wait_listed("db");
        self.show(&nodes[2], &["endpoint", "list", "-n", "net1"]);
        self.check("both containers are up with addresses from net1", ready);
        let address_of = |name: &str| {
            listed
                .lines()
                .find(|l| l.contains(name))
                .and_then(|l| l.split_whitespace().nth(2))
                .unwrap_or("")
                .to_string()
        };
        self.check(
            "addresses handed out in order (web .2, db .3)",
            address_of("web") == "10.100.0.2" && address_of("db") == "10.100.0.3",
        );
        (web, db)
    }

    /// Pings across hosts, and to the gateway.
    fn ping_act(&mut self, nodes: &[Node]) {
        self.say("Ping across hosts from a container on the third host, and the gateway");
        let ping = self.show(
            &nodes[2],
            &[
                "run",
                "-n",
                "net1",
                "--",
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "10.100.0.2",
            ],
        );
        self.check("a container on node3 reaches web on node1", ping.code == 0);
        let ping = self.show(
            &nodes[1],
            &[
                "run",
                "-n",
                "net1",
                "--",
                "ping",
                "-c",
                "2",
                "-i",
                "0.2",
                "10.100.0.1",
            ],
        );
        self.check("the gateway answers", ping.code == 0);
    }

    /// 1 MiB of TCP from node3 to a container on node1, length and digest compared.
    fn transfer_act(&mut self, nodes: &[Node]) {
        self.say("TCP across hosts: 1 MiB from node3 to a container on node1, checked end to end");
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!(
            "node1$ overlay-ctl run -n net1 --name sink -- overlay-demo tcp-sink {TRANSFER_PORT} &"
        );
        let sink = nodes[0].spawn_run("net1", "sink", &[&exe, "tcp-sink", TRANSFER_PORT]);
        let sink_ip = nodes[0].wait_endpoint("net1", "sink").to_string();
        let bytes = TRANSFER_BYTES.to_string();
        println!(
            "node3$ overlay-ctl run -n net1 -- overlay-demo tcp-send {sink_ip} {TRANSFER_PORT} {bytes}"
        );
        let sent = nodes[2].cli(&[
            "run",
            "-n",
            "net1",
            "--",
            &exe,
            "tcp-send",
            &sink_ip,
            TRANSFER_PORT,
            &bytes,
        ]);
        let received = sink.wait(Duration::from_secs(30));
        println!("    node3: {}", sent.stdout.trim());
        println!("    node1: {}", received.stdout.trim());
        let digest = |out: &str| out.split("digest ").nth(1).map(str::trim).map(String::from);
        self.check(
            "1 MiB of TCP arrived whole: same length and digest on both hosts",
            sent.code == 0
                && received.code == 0
                && received.stdout.contains(&format!("received {bytes} bytes"))
                && digest(&sent.stdout).is_some()
                && digest(&sent.stdout) == digest(&received.stdout),
        );
    }

    /// A second network cannot reach the first.
    fn isolation_act(&mut self, nodes: &[Node]) {
        self.say("Another network cannot reach net1");
        self.show(&nodes[0], &["network", "create", "net2", "10.200.0.0/24"]);
        let isolated = self.show(
            &nodes[2],
            &[
                "run",
                "-n",
                "net2",
                "--",
                "ping",
                "-c",
                "2",
                "-W",
                "1",
                "10.100.0.2",
            ],
        );
        self.check("net2 is isolated from net1", isolated.code != 0);
    }

    /// node1's status and metrics.
    fn observe_act(&mut self, nodes: &[Node]) {
        self.say("What the agent on node1 sees");
        let status = self.show(&nodes[0], &["status"]);
        self.check(
            "node1's agent is healthy",
            status.stdout.contains("reachable"),
        );
        let metrics = nodes[0].metrics();
        let net1_lines: Vec<&str> = metrics
            .as_deref()
            .map(|m| {
                m.lines()
                    .filter(|l| l.starts_with("overlay_packets_total{network=\"net1\""))
                    .collect()
            })
            .unwrap_or_default();
        println!("node1$ curl -s http://127.0.0.1:9465/metrics | grep 'overlay_packets_total{{network=\"net1\"'");
        for line in &net1_lines {
            println!("    {line}");
        }
        let counted = |direction: &str| {
            net1_lines
                .iter()
                .any(|l| l.contains(&format!("direction=\"{direction}\"")) && !l.ends_with(" 0"))
        };
        self.check(
            "node1's metrics count the pings to web: decapsulated requests, encapsulated replies",
            counted("decapsulated") && counted("encapsulated"),
        );
    }

    /// The closing pass/fail line.
    fn verdict(&self) -> ExitCode {
        println!();
        if self.failed.is_empty() {
            println!("demo: PASS ({} checks)", self.checks);
            ExitCode::SUCCESS
        } else {
            println!(
                "demo: FAIL ({} of {} checks failed: {})",
                self.failed.len(),
                self.checks,
                self.failed.join("; ")
            );
            ExitCode::FAILURE
        }
    }
}

/// Shows a `docker` command on `host` (of `node`) and its output.
fn show_docker(node: &Node, host: &DockerHost, args: &[&str]) -> std::process::Output {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        })
        .collect();
    println!("{}$ docker {}", node.name, shown.join(" "));
    let out = host.docker(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines() {
        println!("    {line}");
    }
    out
}

/// The seed's `docker run` story with a real Docker: a network made with Docker's own
/// command on two hosts, a web server on one, a client on the other.
fn docker_act(demo: &mut Demo, nodes: &[Node]) {
    demo.say("With Docker: the overlay-net driver, a real image, containers on two hosts");
    println!("(each host gets its own dockerd; the image is busybox, imported offline)");
    let acted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let hosts: Vec<DockerHost> = nodes[..2].iter().map(DockerHost::start).collect();
        for host in &hosts {
            host.import_image();
        }
        docker_scenes(demo, nodes, &hosts);
    }));
    demo.check("the Docker act ran to its end", acted.is_ok());
}

fn docker_scenes(demo: &mut Demo, nodes: &[Node], hosts: &[DockerHost]) {
    let create = |extra: &[&'static str]| {
        let mut args = vec![
            "network",
            "create",
            "-d",
            docker::DRIVER,
            "--ipam-driver",
            docker::DRIVER,
            "--subnet",
            "10.110.0.0/24",
        ];
        args.extend_from_slice(extra);
        args
    };
    let made = show_docker(
        &nodes[0],
        &hosts[0],
        &create(&["--ipam-opt", "network=dnet", "dnet"]),
    );
    let mapped = show_docker(&nodes[1], &hosts[1], &create(&["dnet"]));
    demo.check(
        "docker network create on node1 makes cluster network dnet; node2's Docker maps to it",
        made.status.success() && mapped.status.success(),
    );
    let web = show_docker(
        &nodes[0],
        &hosts[0],
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--network",
            "dnet",
            docker::IMAGE,
            "sh",
            "-c",
            "echo hello from node1 > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    let listed = demo.show(&nodes[2], &["endpoint", "list", "-n", "dnet"]);
    demo.check(
        "web runs with an address from the cluster IPAM, listed on every host",
        web.status.success() && listed.stdout.contains("10.110.0.2"),
    );
    // httpd may still be starting: the client is retried for a few seconds.
    let client = [
        "run",
        "--rm",
        "--network",
        "dnet",
        docker::IMAGE,
        "sh",
        "-c",
        "ping -c 2 10.110.0.2 && wget -qO- http://10.110.0.2:8080/",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut fetched = show_docker(&nodes[1], &hosts[1], &client);
    while !fetched.status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        fetched = hosts[1].docker(&client);
    }
    demo.check(
        "a container on node2 pings web on node1 and fetches its page",
        fetched.status.success()
            && String::from_utf8_lossy(&fetched.stdout).contains("hello from node1"),
    );
    let removed = [
        show_docker(&nodes[0], &hosts[0], &["rm", "-f", "web"]),
        show_docker(&nodes[1], &hosts[1], &["network", "rm", "dnet"]),
        show_docker(&nodes[0], &hosts[0], &["network", "rm", "dnet"]),
    ];
    let networks = demo.show(&nodes[2], &["network", "list"]);
    demo.check(
        "docker rm -f and docker network rm remove the endpoint and the network",
        removed.iter().all(|o| o.status.success()) && !networks.stdout.contains("dnet"),
    );
}
