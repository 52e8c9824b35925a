//! The eBPF VXLAN data plane across simulated hosts: an underlay bridge, hosts as
//! namespaces each running the programs, containers as namespaces plumbed to them.
use std::time::Duration;

use overlay_common::Counter;
use overlay_tests::{harness::*, net, topology::*};

const REPLY: Duration = Duration::from_secs(5);

/// Two networks on three hosts: net1 (VNI 100) with containers on hosts 1 (two) and 2,
/// net2 (VNI 200) with one container on host 3.
struct Scenario {
    hosts: Vec<Host>,
    a1: Container,
    a2: Container,
    b1: Container,
    other: Container,
    _underlay: Underlay,
}

fn scenario() -> Scenario {
    require_root();
    let underlay = Underlay::new();
    let mut hosts = cluster(&underlay, 3);
    let net1 = Network::new(100, "10.100.0.0/24");
    let net2 = Network::new(200, "10.200.0.0/24");
    for host in &mut hosts {
        host.add_network(&net1);
        host.add_network(&net2);
    }
    let a1 = hosts[0].add_container(&net1, net1.address(2));
    let a2 = hosts[0].add_container(&net1, net1.address(3));
    let b1 = hosts[1].add_container(&net1, net1.address(4));
    let other = hosts[2].add_container(&net2, net2.address(2));
    let (v1, v2, v3) = (hosts[0].vtep, hosts[1].vtep, hosts[2].vtep);
    for (i, host) in hosts.iter_mut().enumerate() {
        if i != 0 {
            host.add_remote(&a1, v1);
            host.add_remote(&a2, v1);
        }
        if i != 1 {
            host.add_remote(&b1, v2);
        }
        if i != 2 {
            host.add_remote(&other, v3);
        }
    }
    Scenario {
        hosts,
        a1,
        a2,
        b1,
        other,
        _underlay: underlay,
    }
}

#[test]
fn ping_same_host_cross_host_and_gateway_both_ways() {
    let s = scenario();
    let vni = s.a1.network.vni;
    assert!(
        s.a1.ns.run(|| net::ping_until_reply(s.a2.ip, REPLY)),
        "same-host ping a1 -> a2"
    );
    assert!(
        s.a2.ns.run(|| net::ping_until_reply(s.a1.ip, REPLY)),
        "same-host ping a2 -> a1"
    );
    assert!(
        s.a1.ns.run(|| net::ping_until_reply(s.b1.ip, REPLY)),
        "cross-host ping a1 -> b1"
    );
    assert!(
        s.b1.ns.run(|| net::ping_until_reply(s.a2.ip, REPLY)),
        "cross-host ping b1 -> a2"
    );
    assert!(
        s.a1.ns
            .run(|| net::ping_until_reply(s.a1.network.gateway, REPLY)),
        "ping the gateway"
    );

    let host1 = &s.hosts[0];
    let host2 = &s.hosts[1];
    assert!(host1.packets(vni, Counter::SwitchedLocal) >= 2);
    assert!(
        host1.packets(vni, Counter::ArpReply) >= 3,
        "a1 asked for a2, b1 and the gateway"
    );
    assert!(host1.packets(vni, Counter::Encapsulated) >= 2);
    assert!(host2.packets(vni, Counter::Decapsulated) >= 1);
    assert!(host2.packets(vni, Counter::Encapsulated) >= 2);
    assert!(
        host1.packets(vni, Counter::PassedToHost) >= 1,
        "gateway ping goes to the host"
    );
    let _ = &s.other;
}
