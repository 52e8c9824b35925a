//! The MTU from the underlay: networks created without `--mtu` take the smallest
//! underlay MTU of the cluster's nodes minus VXLAN's 50 bytes, carry frames of that size
//! whole across hosts, and a node that joins with a smaller underlay reports it and
//! answers its containers' too-large packets with ICMP "fragmentation needed". The test
//! sets only the underlay links' MTU (the environment); every other MTU is the agent's.
use std::{
    io::Write as _,
    net::{Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use overlay_ctl::dataplane::netlink;
use overlay_tests::{
    bins,
    cluster::{Background, Bins, CliOutput, DevConsul, Node},
    harness::{require_root, unique_name, wait_until},
    net,
    topology::Underlay,
};

const BINS: Bins = bins!();
const JOIN: Duration = Duration::from_secs(20);
const JUMBO: u32 = 9000;
const SMALL: u32 = 1400;
/// IPv4 + ICMP echo headers: `ping -s N` sends an N + 28 byte packet.
const PING_HEADERS: u32 = 28;

/// Nodes 1..=n on underlay links of the given MTUs, agents running (node 1 bootstraps).
fn start_nodes(underlay: &Underlay, consul: &DevConsul, mtus: &[u32]) -> Vec<Node> {
    let mut nodes: Vec<Node> = (mtus.iter().enumerate())
        .map(|(i, mtu)| Node::with_underlay_mtu(&BINS, underlay, i as u8 + 1, consul, *mtu))
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        node.start_agent(if i == 0 { &["--bootstrap"] } else { &[] });
    }
    for node in &nodes {
        node.wait_registered(JOIN);
    }
    nodes
}

/// A `sleep` container on `node`, with its address once its endpoint is listed.
fn container(node: &Node, network: &str) -> (Background, Ipv4Addr) {
    let name = unique_name("c");
    let run = node.spawn_run(network, &name, &["sleep", "300"]);
    let ip = node.wait_endpoint(network, &name);
    wait_until("the container's namespace", JOIN, || {
        run.open_netns().is_some()
    });
    (run, ip)
}

/// `ping -M do -s SIZE -c 1 DST` in a one-shot container of `network` on `node`.
fn ping_df(node: &Node, network: &str, size: u32, dst: Ipv4Addr) -> CliOutput {
    let (size, dst) = (size.to_string(), dst.to_string());
    node.cli(&[
        "run", "-n", network, "--", "ping", "-M", "do", "-s", &size, "-c", "1", "-W", "5", &dst,
    ])
}

/// The MTU of `eth0` in a container, as the agent's `run` set it.
fn container_mtu(container: &Background) -> u32 {
    container
        .open_netns()
        .unwrap()
        .block_on(|| async {
            let handle = netlink::connect().unwrap();
            netlink::link_by_name(&handle, "eth0").await.unwrap().mtu
        })
        .unwrap()
}

/// The network's MTU and VNI in `network list --json`.
fn network_mtu_and_vni(node: &Node, network: &str) -> (u64, u64) {
    let out = node.cli(&["network", "list", "--json"]).ok();
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let entry = (list.as_array().unwrap().iter())
        .find(|n| n["name"] == network)
        .unwrap_or_else(|| panic!("{network} in {list:#}"));
    (
        entry["mtu"].as_u64().unwrap(),
        entry["vni"].as_u64().unwrap(),
    )
}

/// `Ip ReasmReqds` of the calling thread's namespace: fragments it had to reassemble.
fn reassembly_requests() -> i64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    net::parse_snmp(&snmp)[&("Ip".to_string(), "ReasmReqds".to_string())]
}

/// 64 MiB from `from` to `to` over one TCP connection; asserts it arrived whole and the
/// MSS stayed jumbo-sized, and returns the throughput in Mbit/s.
fn jumbo_tcp_transfer(from: &Background, to: &Background, to_ip: Ipv4Addr) -> f64 {
    let data = net::pattern(64 << 20, 17);
    let to_ns = to.open_netns().unwrap();
    let listener = to_ns.run(|| net::tcp_listen(to_ip, 5301)).unwrap();
    let receiver = std::thread::spawn(move || {
        to_ns
            .run(move || net::tcp_receive_all(&listener, Duration::from_secs(120)))
            .unwrap()
    });
    let (elapsed, mss_before, mss_after) = (from.open_netns().unwrap())
        .run(|| {
            let stream = TcpStream::connect((to_ip, 5301)).unwrap();
            let before = net::tcp_mss(&stream);
            let started = Instant::now();
            let sent = stream.try_clone().unwrap();
            net::send_stream(sent, &data, Duration::from_secs(120)).unwrap();
            (started.elapsed(), before, net::tcp_mss(&stream))
        })
        .unwrap();
    assert_eq!(receiver.join().unwrap(), (data.len(), net::digest(&data)));
    // 8950 - 40 bytes of IPv4 and TCP headers, less the options (timestamps) the
    // connection carries; a path that had shrunk would show ~1400 or less.
    for mss in [mss_before, mss_after] {
        assert!(
            (8800..=8910).contains(&mss),
            "MSS {mss}: not an 8950-byte path"
        );
    }
    (data.len() * 8) as f64 / elapsed.as_secs_f64() / 1e6
}

#[test]
fn a_jumbo_underlay_gives_networks_8950_and_carries_them_whole() {
    require_root();
    let underlay = Underlay::new();
    let consul = DevConsul::start(&BINS, &underlay, None);
    let nodes = start_nodes(&underlay, &consul, &[JUMBO, JUMBO]);

    let created = nodes[0]
        .cli(&["network", "create", "jumbo", "10.120.0.0/24"])
        .ok();
    assert!(
        created.stdout.contains("mtu 8950")
            && created.stdout.contains("smallest underlay MTU")
            && created.stdout.contains("9000 on node node1"),
        "{created:#?}"
    );
    // The network node 1 bootstrapped once it had registered, too.
    assert_eq!(network_mtu_and_vni(&nodes[0], "default").0, 8950);
    assert_eq!(network_mtu_and_vni(&nodes[0], "jumbo").0, 8950);
    let members = nodes[0].cli(&["cluster", "members", "--json"]).ok();
    let members: serde_json::Value = serde_json::from_str(&members.stdout).unwrap();
    for member in members.as_array().unwrap() {
        assert_eq!(member["underlay_mtu"], JUMBO, "{members:#}");
    }

    let (a, _) = container(&nodes[0], "jumbo");
    let (b, b_ip) = container(&nodes[1], "jumbo");
    assert_eq!(container_mtu(&a), 8950);
    assert_eq!(container_mtu(&b), 8950);
    let reassembled_before = b.open_netns().unwrap().run(reassembly_requests).unwrap();

    // The largest packet the network allows crosses hosts whole (DF set)...
    let largest = 8950 - PING_HEADERS;
    let ping = ping_df(&nodes[0], "jumbo", largest, b_ip);
    assert!(
        ping.code == 0
            && ping
                .stdout
                .contains(&format!("{} bytes from {b_ip}", largest + 8)),
        "{ping:#?}"
    );
    // ...and one byte more does not leave the container.
    let too_large = ping_df(&nodes[0], "jumbo", largest + 1, b_ip);
    assert_ne!(too_large.code, 0, "{too_large:#?}");
    assert!(
        format!("{}{}", too_large.stdout, too_large.stderr).contains("mtu=8950"),
        "{too_large:#?}"
    );

    let mbits = jumbo_tcp_transfer(&a, &b, b_ip);
    let _ = writeln!(
        std::io::stderr(),
        "mtu: 64 MiB of TCP across hosts over an 8950-byte overlay MTU (9000-byte underlay): {mbits:.0} Mbit/s"
    );
    let reassembled = b.open_netns().unwrap().run(reassembly_requests).unwrap();
    assert_eq!(
        reassembled, reassembled_before,
        "the receiving container reassembled fragments"
    );
    for node in &nodes {
        let status = node.status().unwrap();
        assert_eq!(status["mtu"]["underlay_mtu"], JUMBO, "{status:#}");
        assert_eq!(status["mtu"]["too_small_for"], serde_json::json!([]));
    }
}

/// The line of `metrics` for `series` (name and labels), as its value.
fn metric(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_node_joining_with_a_small_underlay_is_reported_gets_frag_needed_and_follows_a_raised_mtu() {
    require_root();
    let underlay = Underlay::new();
    let consul = DevConsul::start(&BINS, &underlay, None);
    let nodes = start_nodes(&underlay, &consul, &[JUMBO, JUMBO]);
    nodes[0]
        .cli(&["network", "create", "jumbo", "10.121.0.0/24"])
        .ok();
    let (jumbo_mtu, vni) = network_mtu_and_vni(&nodes[0], "jumbo");
    assert_eq!(jumbo_mtu, 8950);
    let (_far, far_ip) = container(&nodes[1], "jumbo");

    let mut small = Node::with_underlay_mtu(&BINS, &underlay, 3, &consul, SMALL);
    small.start_agent(&[]);
    small.wait_registered(JOIN);
    let reported = |s: &serde_json::Value| {
        (s["mtu"]["too_small_for"].as_array())
            .is_some_and(|l| l.iter().any(|n| n["network"] == "jumbo"))
    };
    wait_until("node3 to report network jumbo", JOIN, || {
        small.status().is_some_and(|s| reported(&s))
    });
    let status = small.status().unwrap();
    assert_eq!(status["mtu"]["underlay_mtu"], SMALL);
    let entry = (status["mtu"]["too_small_for"].as_array().unwrap().iter())
        .find(|n| n["network"] == "jumbo")
        .unwrap();
    assert_eq!(
        (&entry["mtu"], &entry["fits"], &entry["shortfall"]),
        (&8950.into(), &1350.into(), &7600.into()),
        "{status:#}"
    );
    let human = small.cli(&["status"]).ok().stdout;
    assert!(
        human.contains("mtu:         underlay 1400")
            && human.contains("TOO SMALL for network jumbo (MTU 8950")
            && human.contains("above 1350"),
        "{human}"
    );
    let metrics = small.metrics().unwrap();
    let shortfall =
        format!("overlay_network_mtu_shortfall_bytes{{network=\"jumbo\",vni=\"{vni}\"}}");
    assert_eq!(metric(&metrics, &shortfall), Some(7600), "{metrics}");
    assert_eq!(metric(&metrics, "overlay_underlay_mtu"), Some(1400));
    // The jumbo nodes carry every network.
    for node in &nodes {
        assert!(!reported(&node.status().unwrap()));
        let metrics = node.metrics().unwrap();
        assert_eq!(
            metric(&metrics, "overlay_networks_mtu_exceeding_underlay"),
            Some(0)
        );
    }

    // From now on a network gets what node3 carries, and more is refused.
    let later = nodes[0]
        .cli(&["network", "create", "later", "10.122.0.0/24"])
        .ok();
    assert!(
        later.stdout.contains("mtu 1350") && later.stdout.contains("1400 on node node3"),
        "{later:#?}"
    );
    let refused = nodes[0].cli(&["network", "create", "big", "10.123.0.0/24", "--mtu", "1351"]);
    assert_eq!(refused.code, 1, "{refused:#?}");
    assert!(
        refused.stderr.contains("node3") && refused.stderr.contains("--mtu 1350"),
        "{refused:#?}"
    );
    // The reconcile that applied `later` did not repeat the warning.
    wait_until("node3 to apply network later", JOIN, || {
        small.status().is_some_and(|s| {
            (s["maps"].as_array().unwrap().iter())
                .any(|m| m["name"] == "NETWORKS" && m["entries"] == 3)
        })
    });
    let log = small.agent_log();
    assert_eq!(
        log.matches("too small for network jumbo's MTU 8950")
            .count(),
        1,
        "{log}"
    );

    // node3's containers: what fits crosses, what does not gets frag-needed with 1350.
    let fits = ping_df(&small, "jumbo", 1350 - PING_HEADERS, far_ip);
    assert!(
        fits.code == 0 && fits.stdout.contains("1330 bytes from"),
        "{fits:#?}"
    );
    let too_large = ping_df(&small, "jumbo", 1400, far_ip);
    assert!(
        too_large
            .stdout
            .contains("Frag needed and DF set (mtu = 1350)"),
        "{too_large:#?}"
    );
    let sent = format!(
        "overlay_packets_total{{network=\"jumbo\",vni=\"{vni}\",direction=\"frag_needed_sent\"}}"
    );
    assert!(metric(&small.metrics().unwrap(), &sent) >= Some(1));

    // Jumbo frames enabled on node3's link and switch port (the environment): its agent
    // follows at its next reconcile (the store change below makes every agent run one).
    underlay.set_ports_mtu(JUMBO);
    small.ns.block_on(|| async {
        let handle = netlink::connect().unwrap();
        let eth0 = netlink::link_by_name(&handle, "eth0").await.unwrap();
        netlink::set_mtu(&handle, eth0.index, JUMBO).await.unwrap();
    });
    nodes[0]
        .cli(&["network", "create", "after", "10.124.0.0/24"])
        .ok();
    wait_until("node3 to follow its underlay's new MTU", JOIN, || {
        small.status().is_some_and(|s| {
            s["mtu"]["underlay_mtu"] == JUMBO && s["mtu"]["too_small_for"] == serde_json::json!([])
        })
    });
    wait_until("node3's record to carry it", JOIN, || {
        let out = nodes[0].cli(&["cluster", "members", "--json"]);
        serde_json::from_str::<serde_json::Value>(&out.stdout).is_ok_and(|m| {
            (m.as_array().unwrap().iter())
                .any(|n| n["name"] == "node3" && n["underlay_mtu"] == JUMBO)
        })
    });
    assert!(small
        .agent_log()
        .contains("network jumbo's MTU fits this node's underlay now"));
    let whole = ping_df(&small, "jumbo", 8950 - PING_HEADERS, far_ip);
    assert!(
        whole.code == 0 && whole.stdout.contains("8930 bytes from"),
        "{whole:#?}"
    );
}
