//! Egress to the outside world, in network namespaces with an "outside" host on a
//! separate link of node 1 (a simulated internet host that routes to the underlay but has
//! no route to any overlay subnet; node 2 reaches it through node 1, as the underlay's
//! routing would have it).
//!
//! - The module (`overlay_ctl::dataplane::egress`) on two simulated nodes with containers
//!   plumbed by the agent's own code: forwarding is turned on by the agent's code
//!   (`Host::new`) and the NAT by the module under test.
//! - End to end (`agent_*` tests): real agents and the operator CLI; the test builds only
//!   the topology, every rule comes from the agents following `network create/update`.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use ipnetwork::Ipv4Network;
use overlay_ctl::dataplane::{
    egress::{Applied, EgressMode, EgressNat, EgressRule, TABLE},
    netlink,
};
use overlay_tests::{
    bins,
    cluster::{start_cluster, Background, Bins, DevConsul, Node},
    harness::*,
    net,
    topology::*,
};

/// The outside host and node 1's address on the outside link (TEST-NET-3, only ever
/// inside this test's namespaces).
const OUTSIDE_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NODE1_OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const OUTSIDE_NET: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);
const OUTSIDE_PREFIX: u8 = 24;
const PORT: u16 = 8080;
const REPLY: Duration = Duration::from_secs(5);
/// How long a blocked container keeps trying before the test calls it blocked.
const BLOCKED: Duration = Duration::from_millis(1500);

struct World {
    hosts: Vec<Host>,
    outside: TestNs,
    net1: Network,
    net2: Network,
    _underlay: Underlay,
}

fn world() -> World {
    require_root();
    let underlay = Underlay::new();
    let mut hosts = cluster(&underlay, 2);
    let net1 = Network::new(100, "10.100.0.0/24");
    let net2 = Network::new(200, "10.200.0.0/24");
    for host in &mut hosts {
        host.add_network(&net1);
        host.add_network(&net2);
    }
    let outside = TestNs::new("out");
    link_outside(&hosts[0].ns, &outside);
    route_outside_via_node1(&hosts[1].ns);
    World {
        hosts,
        outside,
        net1,
        net2,
        _underlay: underlay,
    }
}

/// The underlay's route from another node to the outside network: through node 1.
fn route_outside_via_node1(node: &TestNs) {
    let via_node1 = Underlay::host_address(1);
    node.block_on(|| async {
        let handle = netlink::connect().unwrap();
        netlink::add_route_via(&handle, OUTSIDE_NET, OUTSIDE_PREFIX, via_node1)
            .await
            .unwrap();
    });
}

/// A veth between `node` and `outside`; the outside host routes only the underlay back.
fn link_outside(node: &TestNs, outside: &TestNs) {
    let (node_end, outside_end) = (unique_name("ex"), unique_name("eo"));
    block_on(async {
        let handle = netlink::connect().unwrap();
        let (a, b) = netlink::create_veth(&handle, &node_end, &outside_end)
            .await
            .unwrap();
        netlink::move_to_netns(&handle, a.index, node.ns().file())
            .await
            .unwrap();
        netlink::move_to_netns(&handle, b.index, outside.ns().file())
            .await
            .unwrap();
    });
    for (ns, name, ip) in [
        (node, &node_end, NODE1_OUTSIDE),
        (outside, &outside_end, OUTSIDE_HOST),
    ] {
        ns.block_on(|| async {
            let handle = netlink::connect().unwrap();
            let link = netlink::link_by_name(&handle, name).await.unwrap();
            netlink::add_address(&handle, link.index, ip, OUTSIDE_PREFIX)
                .await
                .unwrap();
            netlink::set_up(&handle, link.index).await.unwrap();
        });
    }
    let underlay = Underlay::host_address(0);
    outside.block_on(|| async {
        let handle = netlink::connect().unwrap();
        netlink::add_route_via(&handle, underlay, UNDERLAY_PREFIX, NODE1_OUTSIDE)
            .await
            .unwrap();
    });
}

impl World {
    fn rules(&self, net1: EgressMode, net2: EgressMode) -> Vec<EgressRule> {
        [("net1", self.net1, net1), ("net2", self.net2, net2)]
            .into_iter()
            .map(|(name, network, mode)| EgressRule {
                network: name.into(),
                vni: network.vni,
                subnet: network.subnet,
                mode,
            })
            .collect()
    }

    fn overlay_subnets(&self) -> Vec<Ipv4Network> {
        vec![self.net1.subnet, self.net2.subnet]
    }

    /// Runs `nat.ensure` inside node `n`'s namespace, as that node's agent would.
    fn ensure(&self, n: usize, nat: &mut EgressNat, rules: &[EgressRule]) -> Applied {
        let subnets = self.overlay_subnets();
        self.hosts[n]
            .ns
            .run(|| nat.ensure(rules, &subnets))
            .expect("egress rules applied")
    }

    /// A TCP service on the outside host that answers each connection with the source
    /// address it saw, `connections` times.
    fn serve_peer_addresses(&self, connections: usize) -> JoinHandle<Vec<Ipv4Addr>> {
        let listener = self
            .outside
            .run(|| TcpListener::bind(SocketAddrV4::new(OUTSIDE_HOST, PORT)))
            .expect("listen on the outside host");
        std::thread::spawn(move || {
            (0..connections)
                .map(|_| {
                    let (mut stream, peer) = listener.accept().expect("accept");
                    let std::net::SocketAddr::V4(peer) = peer else {
                        panic!("IPv4 only")
                    };
                    stream.write_all(peer.ip().to_string().as_bytes()).unwrap();
                    *peer.ip()
                })
                .collect()
        })
    }
}

/// Connects from `container` to the outside service and returns what it answered.
fn source_seen_by_outside(container: &Container, timeout: Duration) -> std::io::Result<String> {
    container.ns.run(|| {
        let target = SocketAddrV4::new(OUTSIDE_HOST, PORT).into();
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        stream.set_read_timeout(Some(REPLY))?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })
}

fn pings_outside(container: &Container, timeout: Duration) -> bool {
    container
        .ns
        .run(|| net::ping_until_reply(OUTSIDE_HOST, timeout))
}

/// `nft` as an operator would run it on node `host` (observation only).
fn nft(host_ns: &TestNs, args: &[&str]) -> String {
    let out = host_ns
        .run(|| Command::new("nft").args(args).output())
        .expect("run nft");
    assert_ok(&format!("nft {args:?}"), &out);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn masquerade_takes_containers_of_two_nodes_out_with_each_nodes_address() {
    let mut w = world();
    let a = w.hosts[0].add_container(&w.net1, w.net1.address(2));
    let b = w.hosts[1].add_container(&w.net1, w.net1.address(3));
    let server = w.serve_peer_addresses(2);
    // TCP, not ping: a ping's conntrack entry would outlive this check un-NATed.
    assert!(
        source_seen_by_outside(&a, BLOCKED).is_err(),
        "without NAT the outside host cannot answer an overlay address"
    );
    let rules = w.rules(EgressMode::Masquerade, EgressMode::None);
    let mut nats = [EgressNat::new(), EgressNat::new()];
    for (n, nat) in nats.iter_mut().enumerate() {
        assert_eq!(w.ensure(n, nat, &rules), Applied::Replaced);
    }
    assert!(pings_outside(&a, REPLY), "ping from node 1's container");
    assert!(pings_outside(&b, REPLY), "ping from node 2's container");
    assert_eq!(
        source_seen_by_outside(&a, REPLY).unwrap(),
        NODE1_OUTSIDE.to_string()
    );
    let node2 = Underlay::host_address(2);
    assert_eq!(
        source_seen_by_outside(&b, REPLY).unwrap(),
        node2.to_string()
    );
    assert_eq!(server.join().unwrap(), [NODE1_OUTSIDE, node2]);

    // The same desired state again: nothing is sent, handles and counters stay.
    let before = nft(&w.hosts[0].ns, &["-a", "list", "table", "ip", TABLE]);
    assert_eq!(w.ensure(0, &mut nats[0], &rules), Applied::Unchanged);
    assert_eq!(
        nft(&w.hosts[0].ns, &["-a", "list", "table", "ip", TABLE]),
        before
    );
    // A restarted agent (a new owner) recognises its predecessor's table.
    assert_eq!(
        w.ensure(0, &mut EgressNat::new(), &rules),
        Applied::Unchanged
    );
    assert_eq!(
        nft(&w.hosts[0].ns, &["-a", "list", "table", "ip", TABLE]),
        before
    );
}

#[test]
fn egress_none_drops_and_counts_until_the_network_is_switched_to_masquerade() {
    let mut w = world();
    let c = w.hosts[0].add_container(&w.net2, w.net2.address(2));
    let mut nat = EgressNat::new();
    w.ensure(
        0,
        &mut nat,
        &w.rules(EgressMode::Masquerade, EgressMode::None),
    );
    let drops = |nat: &EgressNat| {
        let counted = w.hosts[0].ns.run(|| nat.drops()).expect("read the drops");
        counted.get("net2").map(|d| d.packets).unwrap_or(0)
    };
    assert_eq!(drops(&nat), 0);
    // A listener is there: a connect that fails shows the SYN never arrived.
    let _listener = w
        .outside
        .run(|| TcpListener::bind(SocketAddrV4::new(OUTSIDE_HOST, PORT)))
        .unwrap();
    assert!(!pings_outside(&c, BLOCKED), "net2 has egress none");
    let after_ping = drops(&nat);
    assert!(after_ping >= 1, "the blocked pings are counted");
    assert!(source_seen_by_outside(&c, BLOCKED).is_err());
    let after_tcp = drops(&nat);
    assert!(after_tcp > after_ping, "the blocked SYNs are counted too");
    drop(_listener);

    // `network update net2 --egress masquerade`: the rule changes, the count stays.
    let rules = w.rules(EgressMode::Masquerade, EgressMode::Masquerade);
    assert_eq!(w.ensure(0, &mut nat, &rules), Applied::Replaced);
    assert!(pings_outside(&c, REPLY), "net2 reaches the outside now");
    assert_eq!(
        drops(&nat),
        after_tcp,
        "drops of the replaced rule are kept"
    );
}

#[test]
fn removing_the_table_restores_the_hosts_ruleset_and_leaves_other_tables_alone() {
    let mut w = world();
    let a = w.hosts[0].add_container(&w.net1, w.net1.address(2));
    let node = &w.hosts[0].ns;
    let operator_table = "table ip operator_fw {\n chain input {\n  type filter hook input priority 10; policy accept;\n  tcp dport 22 accept\n }\n}\n";
    let out = node
        .run(|| {
            let mut child = Command::new("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(operator_table.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert_ok("add the operator's table", &out);
    let before = nft(node, &["list", "ruleset"]);

    let mut nat = EgressNat::new();
    let rules = w.rules(EgressMode::Masquerade, EgressMode::None);
    w.ensure(0, &mut nat, &rules);
    let with_egress = nft(node, &["list", "ruleset"]);
    assert!(with_egress.contains(&format!("table ip {TABLE}")));
    assert!(with_egress.contains("table ip operator_fw"));
    assert!(pings_outside(&a, REPLY));

    assert!(
        w.hosts[0].ns.run(|| nat.remove()).unwrap(),
        "the table was there"
    );
    assert_eq!(nft(node, &["list", "ruleset"]), before);
    assert!(
        !w.hosts[0].ns.run(|| nat.remove()).unwrap(),
        "nothing left to remove"
    );

    // The last network gone: ensure with no rules removes the table as well.
    w.ensure(0, &mut nat, &rules);
    assert_eq!(w.ensure(0, &mut nat, &[]), Applied::Removed);
    assert_eq!(nft(node, &["list", "ruleset"]), before);
}

// ---- End to end: agents keep the table in step with `network create/update/delete`.

const BINS: Bins = bins!();
const CONVERGE: Duration = Duration::from_secs(15);
const OVERLAY_PORT: u16 = 8081;

/// A TCP service that answers every connection with the source address it saw, until
/// dropped.
struct AddressEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AddressEcho {
    fn start(listener: TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.write_all(peer.ip().to_string().as_bytes());
                    }
                    // Nothing pending: look again shortly (and for the stop flag).
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AddressEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `f` inside a `run` container's namespace once it exists.
fn in_container<R: Send>(container: &Background, f: impl FnOnce() -> R + Send) -> R {
    wait_until(&container.netns, CONVERGE, || {
        container.open_netns().is_some()
    });
    container.open_netns().unwrap().run(f).unwrap()
}

/// What a service at `to` answered a connection from inside `container` with.
fn ask_address(container: &Background, to: SocketAddrV4, timeout: Duration) -> Option<String> {
    in_container(container, || {
        let mut stream = TcpStream::connect_timeout(&to.into(), timeout).ok()?;
        stream.set_read_timeout(Some(REPLY)).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    })
}

fn container_pings(container: &Background, dst: Ipv4Addr, timeout: Duration) -> bool {
    in_container(container, || net::ping_until_reply(dst, timeout))
}

/// Waits until `node`'s agent reports `network`'s egress as `mode` (`None`: no rule).
fn wait_egress(node: &Node, network: &str, mode: Option<&str>) {
    wait_until(
        &format!("{}: egress of {network} = {mode:?}", node.name),
        CONVERGE,
        || {
            node.status().is_some_and(|s| {
                s["egress"]["error"].is_null() && s["egress"]["networks"][network].as_str() == mode
            })
        },
    );
}

fn dropped_packets(node: &Node, network: &str) -> u64 {
    let status = node.status().expect("status");
    status["egress"]["dropped"][network]["packets"]
        .as_u64()
        .unwrap_or(0)
}

/// Two agents, an outside host on node 1's second link, net1 with a container per node.
/// Field order is drop order: the containers end while their agents still run.
struct AgentWorld {
    a: Background,
    b: Background,
    nodes: Vec<Node>,
    outside: TestNs,
    _consul: DevConsul,
    _underlay: Underlay,
}

fn agent_world(create: &[&str]) -> AgentWorld {
    require_root();
    let underlay = Underlay::new();
    let (consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    let outside = TestNs::new("out");
    link_outside(&nodes[0].ns, &outside);
    route_outside_via_node1(&nodes[1].ns);
    let mut args = vec!["network", "create", "net1", "10.100.0.0/24"];
    args.extend_from_slice(create);
    nodes[0].cli(&args).ok();
    let a = nodes[0].spawn_run("net1", &unique_name("a"), &["sleep", "600"]);
    let b = nodes[1].spawn_run("net1", &unique_name("b"), &["sleep", "600"]);
    AgentWorld {
        a,
        b,
        nodes,
        outside,
        _consul: consul,
        _underlay: underlay,
    }
}

#[test]
fn agent_masquerades_both_nodes_containers_and_egress_none_blocks_them() {
    let w = agent_world(&[]);
    let listed = w.nodes[1].cli(&["network", "list"]).ok().stdout;
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("net1") && l.contains("masquerade")),
        "{listed}"
    );
    for node in &w.nodes {
        wait_egress(node, "net1", Some("masquerade"));
    }
    let listener = w
        .outside
        .run(|| TcpListener::bind(SocketAddrV4::new(OUTSIDE_HOST, PORT)))
        .unwrap();
    let _outside_service = AddressEcho::start(listener);
    let outside = SocketAddrV4::new(OUTSIDE_HOST, PORT);
    let node2 = w.nodes[1].vtep;
    for (container, node_address) in [(&w.a, NODE1_OUTSIDE), (&w.b, node2)] {
        assert!(container_pings(container, OUTSIDE_HOST, REPLY));
        assert_eq!(
            ask_address(container, outside, REPLY).as_deref(),
            Some(node_address.to_string().as_str()),
            "the outside host sees the container's node"
        );
    }

    // Overlay to overlay: the peer sees the container's own address, not its node's.
    let a_ip = w.nodes[0].wait_endpoint("net1", &w.a.netns["ovl-net1-".len()..]);
    let b_ip = w.nodes[1].wait_endpoint("net1", &w.b.netns["ovl-net1-".len()..]);
    let listener = in_container(&w.b, || {
        TcpListener::bind(SocketAddrV4::new(b_ip, OVERLAY_PORT))
    })
    .unwrap();
    let _peer_service = AddressEcho::start(listener);
    let peer = SocketAddrV4::new(b_ip, OVERLAY_PORT);
    assert_eq!(ask_address(&w.a, peer, REPLY), Some(a_ip.to_string()));

    // `network update --egress none`: blocked, counted, and the overlay still works.
    let updated = w.nodes[1]
        .cli(&["network", "update", "net1", "--egress", "none"])
        .ok();
    assert!(updated.stdout.contains("egress none"), "{updated:?}");
    for node in &w.nodes {
        wait_egress(node, "net1", Some("none"));
    }
    for (container, node) in [(&w.a, &w.nodes[0]), (&w.b, &w.nodes[1])] {
        assert!(!container_pings(container, OUTSIDE_HOST, BLOCKED));
        assert_eq!(ask_address(container, outside, BLOCKED), None);
        let dropped = dropped_packets(node, "net1");
        assert!(
            dropped >= 2,
            "{}: pings and SYNs counted: {dropped}",
            node.name
        );
        let metrics = node.metrics().expect("scrape");
        let series = "overlay_egress_dropped_packets_total{network=\"net1\"} ";
        let exported =
            (metrics.lines()).find_map(|line| line.strip_prefix(series)?.parse::<u64>().ok());
        assert!(exported >= Some(dropped), "{metrics}");
        let text = node.cli(&["status"]).ok().stdout;
        assert!(
            text.lines()
                .any(|l| l.starts_with("egress:") && l.contains("net1 none (")),
            "{text}"
        );
    }
    assert_eq!(ask_address(&w.a, peer, REPLY), Some(a_ip.to_string()));
    assert!(container_pings(&w.b, a_ip, REPLY));

    // Again: nothing to do, said so; bad input is refused with the usual exit codes.
    let again = w.nodes[0]
        .cli(&["network", "update", "net1", "--egress", "none"])
        .ok();
    assert!(again.stdout.contains("unchanged"), "{again:?}");
    let unknown = w.nodes[0].cli(&["network", "update", "nope", "--egress", "none"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("does not exist"), "{unknown:?}");
    let bad = w.nodes[0].cli(&["network", "update", "net1", "--egress", "nat"]);
    assert_eq!(bad.code, 2, "{bad:?}");

    // And back: the outside is reachable again.
    w.nodes[0]
        .cli(&["network", "update", "net1", "--egress", "masquerade"])
        .ok();
    wait_egress(&w.nodes[0], "net1", Some("masquerade"));
    assert!(container_pings(&w.a, OUTSIDE_HOST, REPLY));
}

#[test]
fn agent_owns_only_its_table_keeps_it_without_rewrites_and_removes_it() {
    let w = agent_world(&["--egress", "none"]);
    let node = &w.nodes[0];
    wait_egress(node, "net1", Some("none"));
    let operator_table = "table ip operator_fw {\n chain input {\n  type filter hook input priority 10; policy accept;\n  tcp dport 22 accept\n }\n}\n";
    let added = node.ns.run(|| {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(operator_table.as_bytes())?;
        drop(stdin);
        child.wait_with_output()
    });
    assert_ok("add the operator's table", &added.unwrap());
    let listing = || nft(&node.ns, &["-a", "list", "table", "ip", TABLE]);
    let before = listing();
    assert!(before.contains("none net1 10.100.0.0/24"), "{before}");
    assert!(
        before.contains("masquerade default 10.1.0.0/16"),
        "{before}"
    );

    // Reconciles that change no network (a new container, a requested reconcile) leave
    // the table as it is: same handles.
    let c = node.spawn_run("net1", &unique_name("c"), &["sleep", "600"]);
    node.wait_endpoint("net1", &c.netns["ovl-net1-".len()..]);
    assert_eq!(listing(), before);

    // The network's rule goes with it; the last network takes the table along.
    drop((c, w.a, w.b));
    for network in ["net1", "default"] {
        node.cli(&["network", "delete", network, "--force"]).ok();
    }
    wait_until("the egress table removed", CONVERGE, || {
        !nft(&node.ns, &["list", "tables"]).contains(TABLE)
    });
    assert!(nft(&node.ns, &["list", "tables"]).contains("operator_fw"));

    // An `--ephemeral` agent removes its table on exit, and nothing else.
    let mut nodes = w.nodes;
    let node = &mut nodes[0];
    node.stop_agent();
    node.start_agent(&["--ephemeral", "--resync-interval", "1s"]);
    node.wait_registered(CONVERGE);
    node.cli(&["network", "create", "net2", "10.102.0.0/24"])
        .ok();
    wait_egress(node, "net2", Some("masquerade"));
    // A table deleted behind the agent's back comes back with the next resync.
    nft(&node.ns, &["delete", "table", "ip", TABLE]);
    wait_until("the egress table restored", CONVERGE, || {
        nft(&node.ns, &["list", "tables"]).contains(TABLE)
    });
    assert!(node.stop_agent().is_some_and(|s| s.success()));
    let tables = nft(&node.ns, &["list", "tables"]);
    assert!(!tables.contains(TABLE), "{tables}");
    assert!(tables.contains("operator_fw"), "{tables}");
}
