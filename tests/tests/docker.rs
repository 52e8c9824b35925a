//! Docker 20.10 (Debian's docker.io) end to end with the agent's `overlay-net` network
//! and IPAM driver: two simulated hosts, each a host network namespace with an agent
//! and its own dockerd (own --data-root, --exec-root, -H socket and --pidfile) in a
//! mount namespace of its own, where /run is an overlay (the machine's /run is never
//! written) and /run/docker/plugins a private tmpfs holding a link to that host's
//! agent's plugin socket. The image is made offline with `docker import` from a
//! directory holding busybox-static's busybox.
//!
//! One scenario, in order: `docker network create` on both hosts (the first creates the
//! cluster network, the second maps to it by subnet), `docker network inspect`,
//! `docker run --network net1` on both (one with `--ip`), ping and 1 MB over HTTP both
//! ways, a cluster name resolved through `docker run --dns GATEWAY`, `docker restart`, each refusal seen in the `docker` command's own output
//! (overlapping subnet, taken address, exhausted pool, unknown network) leaving nothing
//! behind, and `docker rm -f` plus `docker network rm` leaving no KV key, map entry or
//! veth.
use std::time::{Duration, Instant};

use overlay_tests::{
    bins,
    cluster::{Bins, DevConsul, Node},
    cni,
    docker::{
        assert_contains, assert_ok, docker_plugin_dir, start_agent, DockerHost, DRIVER, IMAGE,
    },
    harness::{require_root, unique_name, wait_until},
    topology::Underlay,
};

const BINS: Bins = bins!();

fn kv_keys(consul: &DevConsul, prefix: &str) -> Vec<String> {
    consul
        .kv_snapshot(prefix)
        .into_iter()
        .map(|(k, _, _)| k)
        .collect()
}

/// The cluster state's keys and values (without the agents' acknowledgements, which
/// follow every change).
fn kv_values(consul: &DevConsul) -> Vec<(String, Vec<u8>)> {
    consul
        .kv_snapshot("overlay/")
        .into_iter()
        .filter(|(k, _, _)| !k.starts_with("overlay/applied/"))
        .map(|(k, v, _)| (k, v))
        .collect()
}

const CREATE: [&str; 6] = ["network", "create", "-d", DRIVER, "--ipam-driver", DRIVER];

/// `docker network create -d overlay-net --ipam-driver overlay-net EXTRA...`.
fn create_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = CREATE.to_vec();
    args.extend_from_slice(extra);
    args
}

/// Starts a container serving 1 MB of random bytes over HTTP on :8080.
fn run_server(host: &DockerHost, name: &str, extra: &[&str]) {
    let mut args = vec!["run", "-d", "--name", name, "--network", "net1"];
    args.extend_from_slice(extra);
    args.extend([
        IMAGE,
        "/bin/sh",
        "-c",
        "head -c 1048576 /dev/urandom > /www/data && exec httpd -f -p 8080 -h /www",
    ]);
    host.ok(&args);
}

/// Ping and a 1 MB HTTP fetch from `from` (on `a`) to `to` (on `b`), bytes compared.
fn check_path(a: &DockerHost, from: &str, b: &DockerHost, to: &str, to_ip: &str) {
    let ping = a.exec_until_ok(from, &["ping", "-c", "3", "-W", "2", to_ip]);
    assert_ok(&format!("ping {from} -> {to} ({to_ip})"), &ping);
    let url = format!("http://{to_ip}:8080/data");
    let fetched = a.exec_until_ok(from, &["wget", "-q", "-O", "/tmp/got", &url]);
    assert_ok(&format!("wget {url} in {from}"), &fetched);
    let got = a.ok(&["exec", from, "md5sum", "/tmp/got"]);
    let served = b.ok(&["exec", to, "md5sum", "/www/data"]);
    let size = a.ok(&["exec", from, "wc", "-c", "/tmp/got"]);
    assert!(size.starts_with("1048576 "), "{from} fetched {size}");
    assert_eq!(
        got.split_whitespace().next(),
        served.split_whitespace().next(),
        "{from} fetched other bytes than {to} serves"
    );
}

#[test]
fn docker_containers_on_two_hosts_reach_each_other() {
    require_root();
    let underlay = Underlay::new();
    let (consul, mut nodes) = overlay_tests::docker::start_cluster(&BINS, &underlay, 2);
    // Each node's maps hold both VTEPs and network "default" once the cluster settled.
    for node in &nodes {
        wait_until(
            "the maps to hold both nodes",
            Duration::from_secs(20),
            || {
                let maps = cni::map_entries(node);
                maps.get("VTEPS") == Some(&2) && maps.get("NETWORKS") == Some(&1)
            },
        );
    }
    let before: Vec<_> = nodes
        .iter()
        .map(|n| cni::Footprint::of(&consul, n))
        .collect();
    for node in &nodes {
        let socket = docker_plugin_dir(node).join(format!("{DRIVER}.sock"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&socket).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", socket.display());
        let status = node.status().expect("agent status");
        assert_eq!(status["docker_plugin"], socket.display().to_string());
        assert_nobody_is_refused(&socket);
    }
    let mut hosts: Vec<DockerHost> = nodes.iter().map(DockerHost::start).collect();
    for host in &hosts {
        host.import_image();
    }

    create_networks(&consul, &hosts);
    check_concurrent_create(&consul, &hosts);
    check_network_refusals(&consul, &hosts);
    let (ip1, ip2) = start_containers(&hosts);
    check_names(&nodes, &hosts);
    check_restarts(&consul, &mut nodes, &mut hosts, &ip1, &ip2);
    check_taken_address(&consul, &nodes, &hosts);

    // A restarted container gets its network back.
    hosts[0].ok(&["restart", "-t", "1", "c1"]);
    let ip1 = hosts[0].address("c1", "net1");
    check_path(&hosts[1], "c2", &hosts[0], "c1", &ip1);

    check_exhausted_pool(&consul, &hosts[0]);
    check_unknown_network(&nodes[1], &hosts[1]);

    // docker rm -f leaves no endpoint, address, veth or map entry (checked before the
    // network goes, which would take its addresses with it).
    hosts[0].ok(&["rm", "-f", "c1"]);
    hosts[1].ok(&["rm", "-f", "c2"]);
    for (node, footprint) in nodes.iter().zip(&before) {
        let now = settled_footprint(&consul, node, &without_network(footprint));
        assert_eq!(now, without_network(footprint), "{} after rm -f", node.name);
    }
    // docker network rm (the mapping host first) removes the cluster network.
    hosts[1].ok(&["network", "rm", "net1"]);
    hosts[0].ok(&["network", "rm", "net1"]);
    for (node, footprint) in nodes.iter().zip(&before) {
        let now = settled_footprint(&consul, node, footprint);
        assert_eq!(&now, footprint, "{} is not as before", node.name);
    }
    assert_eq!(
        kv_keys(&consul, "overlay/networks/"),
        ["overlay/networks/default"]
    );
    assert!(kv_keys(&consul, "overlay/vni/2").is_empty());
    drop(hosts);
}

/// `footprint` with net1 in the maps (a network without endpoints).
fn without_network(footprint: &cni::Footprint) -> cni::Footprint {
    let mut maps = footprint.maps.clone();
    for map in ["NETWORKS", "SUBNETS"] {
        *maps.get_mut(map).unwrap() += 1;
    }
    cni::Footprint {
        kv: footprint.kv.clone(),
        veths: footprint.veths.clone(),
        maps,
    }
}

/// The first host's Docker creates the cluster network; the second maps to it.
fn create_networks(consul: &DevConsul, hosts: &[DockerHost]) {
    hosts[0].ok(&create_args(&[
        "--subnet",
        "10.100.0.0/24",
        "--gateway",
        "10.100.0.1",
        "--ipam-opt",
        "network=net1",
        "net1",
    ]));
    assert_eq!(
        kv_keys(consul, "overlay/networks/"),
        ["overlay/networks/default", "overlay/networks/net1"]
    );
    hosts[1].ok(&create_args(&["--subnet", "10.100.0.0/24", "net1"]));
    assert_eq!(kv_keys(consul, "overlay/networks/").len(), 2);
    // Docker shows the gateway it was given (`--gateway`); without one the cluster's
    // is used all the same (see the containers' gateway).
    let inspect = |host: &DockerHost| {
        host.ok(&[
            "network",
            "inspect",
            "-f",
            "{{.Driver}} {{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}",
            "net1",
        ])
    };
    assert_eq!(inspect(&hosts[0]), "overlay-net 10.100.0.0/24 10.100.0.1");
    assert_eq!(inspect(&hosts[1]), "overlay-net 10.100.0.0/24");
}

/// An unprivileged user (`nobody`) cannot talk to the driver's socket.
fn assert_nobody_is_refused(socket: &std::path::Path) {
    use std::os::unix::process::CommandExt as _;
    const NOBODY: u32 = 65534;
    let mut command = std::process::Command::new(overlay_tests::docker::DOCKER);
    command
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .arg("version")
        .env("DOCKER_CONFIG", "/nonexistent")
        .stdin(std::process::Stdio::null());
    // SAFETY: only setgroups/setgid/setuid run between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("permission denied"),
        "nobody reached {}: {stderr}",
        socket.display()
    );
}

/// Both hosts' Docker creating the same new network at once: both succeed, on one
/// cluster network; removing both removes it.
fn check_concurrent_create(consul: &DevConsul, hosts: &[DockerHost]) {
    let args = create_args(&[
        "--subnet",
        "10.170.0.0/24",
        "--ipam-opt",
        "network=race",
        "race",
    ]);
    let outs: Vec<_> = std::thread::scope(|scope| {
        let running: Vec<_> = hosts
            .iter()
            .map(|host| scope.spawn(|| host.docker(&args)))
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for out in &outs {
        assert_ok("concurrent docker network create", out);
    }
    assert_eq!(kv_keys(consul, "overlay/networks/race").len(), 1);
    for host in hosts {
        host.ok(&["network", "rm", "race"]);
    }
    assert!(kv_keys(consul, "overlay/networks/race").is_empty());
}

/// Refused network creates, each with its reason in docker's output and nothing left.
fn check_network_refusals(consul: &DevConsul, hosts: &[DockerHost]) {
    let kv_before = kv_values(consul);
    // A gateway other than the cluster network's.
    let out = hosts[1].fails(&create_args(&[
        "--subnet",
        "10.100.0.0/24",
        "--gateway",
        "10.100.0.254",
        "net1b",
    ]));
    assert_contains(&out, "has gateway 10.100.0.1 in the cluster");
    // Docker's own IPAM (its addresses would clash across hosts).
    let out = hosts[0].fails(&[
        "network",
        "create",
        "-d",
        DRIVER,
        "--subnet",
        "10.160.0.0/24",
        "noipam",
    ]);
    assert_contains(&out, "add --ipam-driver overlay-net");
    // The gateway refusal for a new subnet: the network its pool request created goes.
    let out = hosts[0].fails(&create_args(&[
        "--subnet",
        "10.150.0.0/24",
        "--gateway",
        "10.150.0.254",
        "--ipam-opt",
        "network=fresh",
        "fresh",
    ]));
    assert_contains(
        &out,
        "network \"fresh\" has gateway 10.150.0.1 in the cluster",
    );
    // An overlapping subnet, with overlay-ctl's reason.
    let out = hosts[1].fails(&create_args(&["--subnet", "10.100.0.0/16", "wide"]));
    assert_contains(
        &out,
        "subnet 10.100.0.0/16 overlaps network \"net1\" (10.100.0.0/24)",
    );
    assert_eq!(kv_values(consul), kv_before);
}

/// c1 on host 1 (an address from the pool) and c2 on host 2 (`--ip`) reach each other.
fn start_containers(hosts: &[DockerHost]) -> (String, String) {
    run_server(&hosts[0], "c1", &[]);
    run_server(&hosts[1], "c2", &["--ip", "10.100.0.50"]);
    let ip1 = hosts[0].address("c1", "net1");
    let ip2 = hosts[1].address("c2", "net1");
    assert_eq!(ip1, "10.100.0.2");
    assert_eq!(ip2, "10.100.0.50");
    for (host, c) in hosts.iter().zip(["c1", "c2"]) {
        let format = "{{.NetworkSettings.Networks.net1.Gateway}}";
        assert_eq!(host.ok(&["inspect", "-f", format, c]), "10.100.0.1");
    }
    let eth0 = hosts[1].ok(&[
        "exec", "c2", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    assert_contains(&eth0, "10.100.0.50/24");
    check_path(&hosts[0], "c1", &hosts[1], "c2", &ip2);
    check_path(&hosts[1], "c2", &hosts[0], "c1", &ip1);
    (ip1, ip2)
}

/// Names through the documented `docker run --dns GATEWAY --dns-search NETWORK`: Docker's
/// embedded resolver forwards what it does not know, from the container's namespace, to
/// the gateway's responder, which knows the cluster's `run` containers on every host.
fn check_names(nodes: &[Node], hosts: &[DockerHost]) {
    let name = unique_name("web");
    let _web = nodes[1].spawn_run("net1", &name, &["sleep", "600"]);
    let ip = nodes[1].wait_endpoint("net1", &name);
    let out = hosts[0].docker(&[
        "run",
        "--rm",
        "--network",
        "net1",
        "--dns",
        "10.100.0.1",
        "--dns-search",
        "net1",
        IMAGE,
        "ping",
        "-c",
        "1",
        "-W",
        "5",
        &name,
    ]);
    assert_ok(&format!("ping {name} from a Docker container"), &out);
    assert_contains(&String::from_utf8_lossy(&out.stdout), &ip.to_string());
}

/// A dockerd restart (--live-restore) and an agent restart: the containers keep their
/// network throughout.
fn check_restarts(
    consul: &DevConsul,
    nodes: &mut [Node],
    hosts: &mut [DockerHost],
    ip1: &str,
    ip2: &str,
) {
    let kv = kv_values(consul);
    hosts[1].stop_daemon();
    let ping = hosts[0].exec_until_ok("c1", &["ping", "-c", "3", "-W", "2", ip2]);
    assert_ok("ping c1 -> c2 while host 2's dockerd is down", &ping);
    hosts[1].start_daemon();
    check_path(&hosts[1], "c2", &hosts[0], "c1", ip1);
    assert_eq!(hosts[1].address("c2", "net1"), ip2);
    assert_eq!(
        kv_values(consul),
        kv,
        "the restart changed the cluster state"
    );

    // The agent's socket goes with it and comes back.
    nodes[0].stop_agent();
    let socket = docker_plugin_dir(&nodes[0]).join(format!("{DRIVER}.sock"));
    assert!(
        !socket.exists(),
        "the agent left {} behind",
        socket.display()
    );
    let ping = hosts[1].exec_until_ok("c2", &["ping", "-c", "3", "-W", "2", ip1]);
    assert_ok("ping c2 -> c1 while host 1's agent is down", &ping);
    start_agent(&mut nodes[0], false);
    nodes[0].wait_registered(Duration::from_secs(20));
    hosts[0].ok(&[
        "run",
        "--rm",
        "--network",
        "net1",
        IMAGE,
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        ip2,
    ]);
}

/// A taken address: refused with overlay-ctl's reason, nothing left behind.
fn check_taken_address(consul: &DevConsul, nodes: &[Node], hosts: &[DockerHost]) {
    let footprints: Vec<_> = nodes
        .iter()
        .map(|n| cni::Footprint::of(consul, n))
        .collect();
    let out = hosts[0].fails(&[
        "run",
        "--rm",
        "--network",
        "net1",
        "--ip",
        "10.100.0.50",
        IMAGE,
        "true",
    ]);
    assert_contains(
        &out,
        "address 10.100.0.50 is already allocated in network \"net1\"",
    );
    for (node, footprint) in nodes.iter().zip(&footprints) {
        assert_eq!(&cni::Footprint::of(consul, node), footprint);
    }
}

/// The node's footprint once it equals `wanted`, or as it is after 10 s (the agents
/// apply a deletion from their watch, a few milliseconds after it is written).
fn settled_footprint(consul: &DevConsul, node: &Node, wanted: &cni::Footprint) -> cni::Footprint {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = cni::Footprint::of(consul, node);
        if &now == wanted || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A /30 has one address for a container: the second is refused.
fn check_exhausted_pool(consul: &DevConsul, host: &DockerHost) {
    host.ok(&create_args(&[
        "--subnet",
        "10.200.0.0/30",
        "--ipam-opt",
        "network=tiny",
        "tiny",
    ]));
    host.ok(&[
        "run",
        "-d",
        "--name",
        "t1",
        "--network",
        "tiny",
        IMAGE,
        "sleep",
        "600",
    ]);
    let out = host.fails(&["run", "--rm", "--network", "tiny", IMAGE, "true"]);
    assert_contains(
        &out,
        "network \"tiny\" (10.200.0.0/30) has no free addresses left",
    );
    host.ok(&["rm", "-f", "t1"]);
    host.ok(&["network", "rm", "tiny"]);
    assert!(kv_keys(consul, "overlay/networks/tiny").is_empty());
    assert!(kv_keys(consul, "overlay/ipam/tiny/").is_empty());
    assert!(kv_keys(consul, "overlay/endpoints/tiny/").is_empty());
}

/// A Docker network whose cluster network was deleted: containers are refused.
fn check_unknown_network(node: &Node, host: &DockerHost) {
    node.cli(&["network", "create", "gone", "10.210.0.0/24"])
        .ok();
    host.ok(&create_args(&["--subnet", "10.210.0.0/24", "gone"]));
    node.cli(&["network", "delete", "gone"]).ok();
    let out = host.fails(&["run", "--rm", "--network", "gone", IMAGE, "true"]);
    assert_contains(&out, "network \"gone\" does not exist");
    host.ok(&["network", "rm", "gone"]);
}
