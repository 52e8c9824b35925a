//! Egress NAT (`overlay_ctl::dataplane::egress`) for real, in network namespaces: two
//! simulated nodes on an underlay, containers plumbed by the agent's own code, and an
//! "outside" host on a separate link of node 1 (a simulated internet host that routes to
//! the underlay but has no route to any overlay subnet). The harness only builds the
//! topology; forwarding is turned on by the agent's code (`Host::new`) and the NAT by the
//! module under test.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::Command,
    thread::JoinHandle,
    time::Duration,
};

use ipnetwork::Ipv4Network;
use overlay_ctl::dataplane::{
    egress::{Applied, EgressMode, EgressNat, EgressRule, TABLE},
    netlink,
};
use overlay_tests::{harness::*, net, topology::*};

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
    link_outside(&hosts[0], &outside);
    let via_node1 = Underlay::host_address(1);
    hosts[1].ns.block_on(|| async {
        let handle = netlink::connect().unwrap();
        netlink::add_route_via(&handle, OUTSIDE_NET, OUTSIDE_PREFIX, via_node1)
            .await
            .unwrap();
    });
    World {
        hosts,
        outside,
        net1,
        net2,
        _underlay: underlay,
    }
}

/// A veth between `node` and `outside`; the outside host routes only the underlay back.
fn link_outside(node: &Host, outside: &TestNs) {
    let (node_end, outside_end) = (unique_name("ex"), unique_name("eo"));
    block_on(async {
        let handle = netlink::connect().unwrap();
        let (a, b) = netlink::create_veth(&handle, &node_end, &outside_end)
            .await
            .unwrap();
        netlink::move_to_netns(&handle, a.index, node.ns.ns().file())
            .await
            .unwrap();
        netlink::move_to_netns(&handle, b.index, outside.ns().file())
            .await
            .unwrap();
    });
    for (ns, name, ip) in [
        (&node.ns, &node_end, NODE1_OUTSIDE),
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
