//! The record rules against hand-written store contents.
use std::collections::BTreeSet;

use ipnetwork::Ipv4Network;

use super::{snapshot::SubnetSet, *};
use crate::store::{consul::KvPair, ipam};

const P: &str = "overlay/";

fn pair(key: &str, value: &str, create_index: u64, session: Option<&str>) -> KvPair {
    KvPair {
        key: format!("{P}{key}"),
        value: value.as_bytes().to_vec(),
        create_index,
        modify_index: create_index,
        lock_index: 0,
        flags: 0,
        session: session.map(str::to_string),
    }
}

fn network(name: &str, subnet: &str, vni: u32, index: u64) -> Vec<KvPair> {
    let s: Ipv4Network = subnet.parse().unwrap();
    let gw = Ipv4Addr::from(u32::from(s.network()) + 1);
    vec![
        pair(
            &format!("networks/{name}"),
            &format!(
                r#"{{"name":"{name}","subnet":"{subnet}","gateway":"{gw}","vni":{vni},"mtu":1450}}"#
            ),
            index,
            None,
        ),
        pair(&format!("vni/{vni}"), name, index, None),
    ]
}

fn endpoint_json(net: &str, id: &str, ip: &str, node: &str) -> String {
    let ipa: Ipv4Addr = ip.parse().unwrap();
    let o = ipa.octets();
    let mac = overlay_common::MacAddr::new([0x02, 0x42, o[0], o[1], o[2], o[3]]);
    let ifname = ipam::host_ifname(net, id);
    format!(
        r#"{{"id":"{id}","network":"{net}","ip":"{ip}","mac":"{mac}","node":"{node}","vtep":"192.0.2.1","ifname":"{ifname}"}}"#
    )
}

fn endpoint(net: &str, id: &str, ip: &str, node: &str, owned: bool) -> Vec<KvPair> {
    let mut out = vec![pair(
        &format!("endpoints/{net}/{id}"),
        &endpoint_json(net, id, ip, node),
        50,
        None,
    )];
    if owned {
        out.push(pair(
            &format!("ipam/{net}/{ip}"),
            &format!(r#"{{"endpoint":"{id}","node":"{node}"}}"#),
            49,
            None,
        ));
    }
    out
}

fn node(name: &str, vtep: &str, index: u64, session: Option<&str>) -> KvPair {
    pair(
        &format!("nodes/{name}"),
        &format!(r#"{{"name":"{name}","vtep":"{vtep}","iface":"eth0"}}"#),
        index,
        session,
    )
}

fn reasons(s: &Snapshot) -> Vec<(String, RejectReason)> {
    s.rejected
        .iter()
        .map(|r| (r.key.trim_start_matches(P).to_string(), r.reason))
        .collect()
}

#[test]
fn valid_records_pass() {
    let mut pairs = network("net1", "10.100.0.0/24", 2, 10);
    pairs.extend(endpoint("net1", "web", "10.100.0.2", "a", true));
    pairs.push(node("a", "192.0.2.1", 5, Some("s1")));
    let s = parse_snapshot(P, &pairs, View::Cluster);
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(s.state.networks.len(), 1);
    assert_eq!(s.state.nodes.len(), 1);
    assert_eq!(s.state.endpoints.len(), 1);
}

#[test]
fn bad_networks_are_rejected() {
    let mut pairs = network("ok", "10.100.0.0/24", 2, 10);
    pairs.push(pair("networks/junk", "not json", 11, None));
    pairs.extend(network("vni0", "10.101.0.0/24", 0, 12));
    pairs.extend(network("vnibig", "10.102.0.0/24", 1 << 24, 13));
    // Same VNI as "ok": its claim names "ok".
    pairs.push(network("dupvni", "10.103.0.0/24", 2, 14).remove(0));
    // Overlaps "ok", created later.
    pairs.extend(network("overlap", "10.100.0.128/25", 5, 15));
    pairs.push(pair(
        "networks/hostbits",
        r#"{"name":"hostbits","subnet":"10.104.0.1/24","gateway":"10.104.0.2","vni":6,"mtu":1450}"#,
        16,
        None,
    ));
    pairs.push(pair("vni/6", "hostbits", 16, None));
    pairs.extend(network("Bad Name", "10.105.0.0/24", 7, 17));
    pairs.push(pair(
        "networks/other",
        r#"{"name":"renamed","subnet":"10.106.0.0/24","gateway":"10.106.0.1","vni":8,"mtu":1450}"#,
        18,
        None,
    ));
    let s = parse_snapshot(P, &pairs, View::Cluster);
    let names: Vec<_> = s.state.networks.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["ok"]);
    let got = reasons(&s);
    use RejectReason::*;
    for expected in [
        ("networks/junk", Malformed),
        ("networks/vni0", BadVni),
        ("networks/vnibig", BadVni),
        ("networks/dupvni", VniNotOwned),
        ("networks/overlap", SubnetOverlap),
        ("networks/hostbits", BadSubnet),
        ("networks/Bad Name", BadKey),
        ("networks/other", KeyMismatch),
    ] {
        assert!(
            got.contains(&(expected.0.to_string(), expected.1)),
            "{expected:?} not in {got:?}"
        );
    }
    assert_eq!(got.len(), 8, "{got:?}");
}

#[test]
fn a_network_reads_its_egress_mode_and_a_record_without_one_masquerades() {
    let with = |name: &str, subnet: &str, vni: u32, egress: &str| {
        let gw = Ipv4Addr::from(u32::from(subnet.parse::<Ipv4Network>().unwrap().network()) + 1);
        let json = format!(
            r#"{{"name":"{name}","subnet":"{subnet}","gateway":"{gw}","vni":{vni},"mtu":1450,"egress":{egress}}}"#
        );
        vec![
            pair(&format!("networks/{name}"), &json, u64::from(vni), None),
            pair(&format!("vni/{vni}"), name, u64::from(vni), None),
        ]
    };
    let mut pairs = network("old", "10.100.0.0/24", 2, 2);
    pairs.extend(with("closed", "10.101.0.0/24", 3, r#""none""#));
    pairs.extend(with("open", "10.102.0.0/24", 4, r#""masquerade""#));
    pairs.extend(with("typo", "10.103.0.0/24", 5, r#""masq""#));
    pairs.extend(with("number", "10.104.0.0/24", 6, "1"));
    let s = parse_snapshot(P, &pairs, View::Cluster);
    let modes: Vec<_> = (s.state.networks.iter())
        .map(|n| (n.name.as_str(), n.egress))
        .collect();
    use crate::store::EgressMode::{Masquerade, None as Closed};
    assert_eq!(
        modes,
        [
            ("closed", Closed),
            ("old", Masquerade),
            ("open", Masquerade)
        ]
    );
    let got = reasons(&s);
    assert_eq!(
        got,
        vec![
            ("networks/number".to_string(), RejectReason::BadEgress),
            ("networks/typo".to_string(), RejectReason::BadEgress),
        ],
        "{:?}",
        s.rejected
    );
}

#[test]
fn overlap_keeps_the_earlier_network_whatever_the_order() {
    let mut pairs = network("b-later", "10.0.0.0/8", 3, 20);
    pairs.extend(network("a-earlier", "10.1.0.0/16", 2, 10));
    let s = parse_snapshot(P, &pairs, View::Cluster);
    assert_eq!(s.state.networks[0].name, "a-earlier");
    assert_eq!(s.state.networks.len(), 1);
    pairs.reverse();
    let s2 = parse_snapshot(P, &pairs, View::Cluster);
    assert_eq!(s2.state.networks, s.state.networks);
}

#[test]
fn bad_nodes_are_rejected() {
    let pairs = vec![
        node("a", "192.0.2.1", 1, Some("s1")),
        node("nosession", "192.0.2.2", 2, None),
        node("zero", "0.0.0.0", 3, Some("s")),
        node("lo", "127.0.0.1", 4, Some("s")),
        node("mc", "224.0.0.1", 5, Some("s")),
        node("bc", "255.255.255.255", 6, Some("s")),
        node("dup", "192.0.2.1", 7, Some("s")),
        pair("nodes/junk", "{", 8, Some("s")),
    ];
    let s = parse_snapshot(P, &pairs, View::Cluster);
    let names: Vec<_> = s.state.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a"]);
    use RejectReason::*;
    assert_eq!(
        reasons(&s),
        vec![
            ("nodes/bc".to_string(), BadVtep),
            ("nodes/dup".to_string(), DuplicateVtep),
            ("nodes/junk".to_string(), Malformed),
            ("nodes/lo".to_string(), BadVtep),
            ("nodes/mc".to_string(), BadVtep),
            ("nodes/nosession".to_string(), NoSession),
            ("nodes/zero".to_string(), BadVtep),
        ]
    );
    // An agent never lets another node take its VTEP.
    let links = BTreeSet::new();
    let s = parse_snapshot(
        P,
        &[node("b", "192.0.2.9", 1, Some("s"))],
        View::Node {
            name: "a",
            vtep: "192.0.2.9".parse().unwrap(),
            links: &links,
        },
    );
    assert!(s.state.nodes.is_empty());
    assert_eq!(s.rejected[0].reason, RejectReason::DuplicateVtep);
}

#[test]
fn node_underlay_mtu_is_optional_but_checked() {
    let with_mtu = |name: &str, vtep: &str, mtu: &str| {
        pair(
            &format!("nodes/{name}"),
            &format!(r#"{{"name":"{name}","vtep":"{vtep}","iface":"eth0","underlay_mtu":{mtu}}}"#),
            1,
            Some("s"),
        )
    };
    let pairs = vec![
        node("old", "192.0.2.1", 1, Some("s")),
        with_mtu("jumbo", "192.0.2.2", "9000"),
        with_mtu("tiny", "192.0.2.3", "67"),
        with_mtu("huge", "192.0.2.4", "70000"),
        with_mtu("negative", "192.0.2.5", "-1"),
    ];
    let s = parse_snapshot(P, &pairs, View::Cluster);
    let mtus: Vec<_> = (s.state.nodes.iter())
        .map(|n| (n.name.as_str(), n.underlay_mtu))
        .collect();
    assert_eq!(mtus, [("jumbo", Some(9000)), ("old", None)]);
    use RejectReason::*;
    assert_eq!(
        reasons(&s),
        vec![
            ("nodes/huge".to_string(), BadMtu),
            ("nodes/negative".to_string(), Malformed),
            ("nodes/tiny".to_string(), BadMtu),
        ]
    );
}

#[test]
fn bad_endpoints_are_rejected() {
    let mut pairs = network("net1", "10.100.0.0/24", 2, 10);
    pairs.extend(endpoint("net1", "ok", "10.100.0.2", "a", true));
    pairs.extend(endpoint("net1", "outside", "10.200.0.2", "b", true));
    pairs.extend(endpoint("net1", "gw", "10.100.0.1", "b", true));
    pairs.extend(endpoint("net1", "dup", "10.100.0.2", "b", false));
    pairs.extend(endpoint("net1", "unowned", "10.100.0.7", "b", false));
    pairs.extend(endpoint("nonet", "x", "10.100.0.8", "b", true));
    pairs.push(pair("endpoints/net1/junk", "[]", 60, None));
    let mut eth0 = endpoint("net1", "eth0", "10.100.0.9", "a", true);
    eth0[0].value = endpoint_json("net1", "eth0", "10.100.0.9", "a")
        .replace(&ipam::host_ifname("net1", "eth0"), "eth0")
        .into_bytes();
    pairs.extend(eth0);
    let mut netns = endpoint("net1", "ns", "10.100.0.10", "a", true);
    netns[0].value = endpoint_json("net1", "ns", "10.100.0.10", "a")
        .replace("\"id\"", "\"netns\":\"../../tmp/x\",\"id\"")
        .into_bytes();
    pairs.extend(netns);
    let mut mac = endpoint("net1", "mac", "10.100.0.11", "a", true);
    mac[0].value = endpoint_json("net1", "mac", "10.100.0.11", "a")
        .replace("02:42:", "03:42:")
        .into_bytes();
    pairs.extend(mac);
    let mut unreadable = endpoint("net1", "nomac", "10.100.0.12", "a", true);
    unreadable[0].value = endpoint_json("net1", "nomac", "10.100.0.12", "a")
        .replace("02:42:", "02:42:zz:")
        .into_bytes();
    pairs.extend(unreadable);
    let s = parse_snapshot(P, &pairs, View::Cluster);
    let ids: Vec<_> = s.state.endpoints.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["ok"]);
    use RejectReason::*;
    let got = reasons(&s);
    for expected in [
        ("endpoints/net1/outside", BadAddress),
        ("endpoints/net1/gw", BadAddress),
        ("endpoints/net1/dup", DuplicateAddress),
        ("endpoints/net1/unowned", AddressNotOwned),
        ("endpoints/nonet/x", UnknownNetwork),
        ("endpoints/net1/junk", Malformed),
        ("endpoints/net1/eth0", BadIfname),
        ("endpoints/net1/ns", BadNetns),
        ("endpoints/net1/mac", BadMac),
        ("endpoints/net1/nomac", BadMac),
    ] {
        assert!(
            got.contains(&(expected.0.to_string(), expected.1)),
            "{expected:?} not in {got:?}"
        );
    }
}

#[test]
fn a_local_endpoint_is_never_displaced_by_a_remote_one() {
    let mut pairs = network("net1", "10.100.0.0/24", 2, 10);
    pairs.extend(endpoint("net1", "mine", "10.100.0.2", "a", false));
    // The remote one even owns the IPAM key.
    pairs.extend(endpoint("net1", "theirs", "10.100.0.2", "b", true));
    let links = BTreeSet::from([ipam::host_ifname("net1", "mine")]);
    let view = View::Node {
        name: "a",
        vtep: "192.0.2.1".parse().unwrap(),
        links: &links,
    };
    let s = parse_snapshot(P, &pairs, view);
    let ids: Vec<_> = s.state.endpoints.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["mine"]);
    assert_eq!(s.rejected[0].reason, RejectReason::DuplicateAddress);
    // The CLI's view goes by the IPAM key.
    let s = parse_snapshot(P, &pairs, View::Cluster);
    assert_eq!(s.state.endpoints[0].id, "theirs");
    // A record naming this node without a container here does not win either.
    let none = BTreeSet::new();
    let view = View::Node {
        name: "a",
        vtep: "192.0.2.1".parse().unwrap(),
        links: &none,
    };
    let s = parse_snapshot(P, &pairs, view);
    assert_eq!(s.state.endpoints[0].id, "theirs");
}

#[test]
fn subnet_overlaps_both_ways_but_not_neighbours() {
    let mut set = SubnetSet::default();
    set.insert("10.1.0.0/16".parse().unwrap(), "a");
    set.insert("10.3.0.0/24".parse().unwrap(), "b");
    let overlaps = |s: &str| set.overlapping(s.parse().unwrap()).map(str::to_string);
    assert_eq!(overlaps("10.1.2.0/24").as_deref(), Some("a"));
    assert_eq!(overlaps("10.0.0.0/8").as_deref(), Some("a"));
    assert_eq!(overlaps("10.3.0.0/24").as_deref(), Some("b"));
    assert_eq!(overlaps("10.3.0.128/25").as_deref(), Some("b"));
    assert_eq!(overlaps("10.2.0.0/16"), None);
    assert_eq!(overlaps("10.3.1.0/24"), None);
    assert_eq!(overlaps("0.0.0.0/0").as_deref(), Some("a"));
}

#[test]
fn rejections_are_reported_once_while_they_last() {
    let r = |key: &str| Rejection::new(key, RecordKind::Node, RejectReason::NoSession, "x");
    let mut log = RejectionLog::default();
    let first = [r("a"), r("b")];
    assert_eq!(log.fresh(&first).len(), 2);
    assert_eq!(log.fresh(&first).len(), 0);
    assert_eq!(log.fresh(&[r("b")]).len(), 0);
    assert_eq!(log.fresh(&first).len(), 1);
}

#[test]
fn the_vxlan_port_is_read_when_valid_and_rejected_otherwise() {
    let snapshot = |value: &str| {
        let pairs = vec![
            pair("config/bootstrapped", "true", 1, None),
            pair("config/vxlan-port", value, 2, None),
        ];
        parse_snapshot(P, &pairs, View::Cluster)
    };
    let valid = snapshot("8472");
    assert_eq!(valid.state.vxlan_port, Some(8472));
    assert!(valid.rejected.is_empty());
    for (bad, reason) in [
        ("53", RejectReason::BadPort),
        ("65536", RejectReason::BadPort),
        ("\"8472\"", RejectReason::Malformed),
        ("-1", RejectReason::Malformed),
    ] {
        let s = snapshot(bad);
        assert_eq!(s.state.vxlan_port, None, "{bad} must not be used");
        assert_eq!(s.rejected.len(), 1, "{bad}");
        assert_eq!(
            (s.rejected[0].kind, s.rejected[0].reason),
            (RecordKind::Config, reason),
            "{bad}"
        );
    }
    // No key: no port named (the default applies), nothing rejected.
    let none = parse_snapshot(
        P,
        &[pair("config/bootstrapped", "true", 1, None)],
        View::Cluster,
    );
    assert_eq!((none.state.vxlan_port, none.rejected.len()), (None, 0));
}
