//! The delta path against the full path: after every batch, the endpoint map written
//! change by change equals the one planned from a full judgement of the same records.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Instant,
};

use overlay_common::{EndpointKey, EndpointValue};

use super::*;
use crate::{
    agent::reconcile::{self, LocalNode},
    dataplane::forwarding::MemoryMaps,
    store::{backend::KvPair, feed::KvChange, ipam, records::RejectReason},
};

const P: &str = "overlay/";
const SELF: &str = "a";
const SELF_VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn pair(key: &str, value: &str, session: Option<&str>) -> KvPair {
    KvPair {
        key: format!("{P}{key}"),
        value: value.as_bytes().to_vec(),
        create_index: 1,
        modify_index: 1,
        lock_index: 0,
        flags: 0,
        session: session.map(str::to_string),
    }
}

fn network(name: &str, subnet: &str, vni: u32) -> Vec<KvPair> {
    let s: ipnetwork::Ipv4Network = subnet.parse().unwrap();
    let gw = Ipv4Addr::from(u32::from(s.network()) + 1);
    vec![
        pair(
            &format!("networks/{name}"),
            &format!(
                r#"{{"name":"{name}","subnet":"{subnet}","gateway":"{gw}","vni":{vni},"mtu":1450}}"#
            ),
            None,
        ),
        pair(&format!("vni/{vni}"), name, None),
    ]
}

fn node(name: &str, last: u8) -> KvPair {
    pair(
        &format!("nodes/{name}"),
        &format!(r#"{{"name":"{name}","vtep":"192.0.2.{last}","iface":"eth0"}}"#),
        Some("s"),
    )
}

fn endpoint_record(id: &str, ip: &str, node: &str) -> KvPair {
    let ipa: Ipv4Addr = ip.parse().unwrap();
    let mac = crate::dataplane::endpoint::mac_for(ipa);
    let ifname = ipam::host_ifname("net1", id);
    pair(
        &format!("endpoints/net1/{id}"),
        &format!(
            r#"{{"id":"{id}","network":"net1","ip":"{ip}","mac":"{mac}","node":"{node}","ifname":"{ifname}"}}"#
        ),
        None,
    )
}

fn allocation(id: &str, ip: &str, node: &str) -> KvPair {
    pair(
        &format!("ipam/net1/{ip}"),
        &format!(r#"{{"endpoint":"{id}","node":"{node}"}}"#),
        None,
    )
}

/// An endpoint as `run` writes it: its address first, then its record.
fn endpoint(id: &str, ip: &str, node: &str) -> Vec<KvPair> {
    vec![allocation(id, ip, node), endpoint_record(id, ip, node)]
}

fn puts(pairs: Vec<KvPair>) -> Vec<KvChange> {
    pairs.into_iter().map(KvChange::Put).collect()
}

fn delete(key: &str) -> KvChange {
    KvChange::Delete {
        key: format!("{P}{key}"),
    }
}

fn view(links: &BTreeSet<String>) -> View<'_> {
    View::Node {
        name: SELF,
        vtep: SELF_VTEP,
        links,
    }
}

/// The endpoint map the full path plans for the mirror's records.
fn planned(mirror: &Mirror) -> BTreeMap<EndpointKey, EndpointValue> {
    let links = BTreeSet::new();
    let state = records::parse_snapshot(P, mirror.pairs(), view(&links)).state;
    let local = LocalNode {
        name: SELF.into(),
        vtep: SELF_VTEP,
    };
    reconcile::plan(&state, &local, &BTreeMap::new())
        .maps
        .endpoints
}

/// A cluster of three live nodes (this one, `b` and `c`), network net1 and two remote
/// endpoints, with its maps as the full path leaves them.
fn cluster() -> (Mirror, MemoryMaps, Placement) {
    let mut pairs = network("net1", "10.100.0.0/24", 7);
    pairs.extend([node(SELF, 1), node("b", 2), node("c", 3)]);
    pairs.extend(endpoint("e1", "10.100.0.2", "b"));
    pairs.extend(endpoint("e2", "10.100.0.3", "c"));
    let mut mirror = Mirror::new(P);
    mirror.replace(pairs);
    let mut maps = MemoryMaps::default();
    for (key, value) in planned(&mirror) {
        maps.upsert_endpoint(key, &value).unwrap();
    }
    let links = BTreeSet::new();
    let state = records::parse_snapshot(P, mirror.pairs(), view(&links)).state;
    (mirror, maps, Placement::of(&state))
}

/// Applies one batch on its own; returns what it judged.
fn apply(
    mirror: &mut Mirror,
    maps: &mut MemoryMaps,
    placement: &Placement,
    changes: Vec<KvChange>,
) -> Judged {
    let scope = mirror.take_changes(changes, SELF);
    assert!(!scope.full, "{scope:?}");
    let links = BTreeSet::new();
    let judged = judge_scope(mirror, P, &scope, view(&links));
    write_addresses(maps, &scope.addresses, &judged.endpoints, placement, SELF).unwrap();
    judged
}

fn key(last: u8) -> EndpointKey {
    EndpointKey::new(7, Ipv4Addr::new(10, 100, 0, last))
}

#[test]
fn a_new_endpoint_adds_only_its_entry() {
    let (mut mirror, mut maps, placement) = cluster();
    let judged = apply(
        &mut mirror,
        &mut maps,
        &placement,
        puts(endpoint("e3", "10.100.0.4", "b")),
    );
    assert!(judged.rejected.is_empty(), "{judged:?}");
    let endpoints = maps.endpoints().unwrap();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(
        endpoints[&key(4)],
        EndpointValue::remote(
            Ipv4Addr::new(192, 0, 2, 2),
            crate::dataplane::endpoint::mac_for(Ipv4Addr::new(10, 100, 0, 4))
        )
    );
    assert_eq!(endpoints, planned(&mirror));
}

#[test]
fn a_deleted_endpoint_removes_its_entry() {
    let (mut mirror, mut maps, placement) = cluster();
    let changes = vec![delete("endpoints/net1/e1"), delete("ipam/net1/10.100.0.2")];
    apply(&mut mirror, &mut maps, &placement, changes);
    let endpoints = maps.endpoints().unwrap();
    assert!(!endpoints.contains_key(&key(2)));
    assert!(endpoints.contains_key(&key(3)));
    assert_eq!(endpoints, planned(&mirror));
}

#[test]
fn a_replaced_endpoint_moves_its_entry() {
    let (mut mirror, mut maps, placement) = cluster();
    // e2 moves from .3 on node c to .9 on node b: new address, old address released.
    let mut changes = puts(endpoint("e2", "10.100.0.9", "b"));
    changes.push(delete("ipam/net1/10.100.0.3"));
    apply(&mut mirror, &mut maps, &placement, changes);
    let endpoints = maps.endpoints().unwrap();
    assert!(!endpoints.contains_key(&key(3)));
    assert_eq!(
        endpoints[&key(9)].vtep,
        overlay_common::ip_to_map(Ipv4Addr::new(192, 0, 2, 2))
    );
    assert_eq!(endpoints, planned(&mirror));
}

#[test]
fn an_invalid_changed_record_is_rejected_and_changes_nothing() {
    let (mut mirror, mut maps, placement) = cluster();
    let before = maps.endpoints().unwrap();
    // A second claim on e1's address (its IPAM key names e1), and a malformed record.
    let mut changes = puts(vec![endpoint_record("thief", "10.100.0.2", "c")]);
    changes.push(KvChange::Put(pair("endpoints/net1/junk", "{", None)));
    let judged = apply(&mut mirror, &mut maps, &placement, changes);
    let reasons: BTreeMap<&str, RejectReason> = (judged.rejected.iter())
        .map(|r| (r.key.as_str(), r.reason))
        .collect();
    assert_eq!(
        reasons,
        BTreeMap::from([
            ("overlay/endpoints/net1/junk", RejectReason::Malformed),
            (
                "overlay/endpoints/net1/thief",
                RejectReason::DuplicateAddress
            ),
        ])
    );
    assert_eq!(maps.endpoints().unwrap(), before, "e1 keeps its address");
    assert_eq!(before, planned(&mirror));

    // The thief gone, nothing is rejected at that address any more.
    let judged = apply(
        &mut mirror,
        &mut maps,
        &placement,
        vec![delete("endpoints/net1/thief")],
    );
    assert!(judged.rejected.is_empty(), "{judged:?}");
    assert!(judged.keys.contains("overlay/endpoints/net1/thief"));
}

#[test]
fn an_endpoint_of_an_unknown_network_is_rejected() {
    let (mut mirror, mut maps, placement) = cluster();
    let mut record = endpoint_record("lost", "10.9.0.2", "b");
    record.key = format!("{P}endpoints/net9/lost");
    let judged = apply(&mut mirror, &mut maps, &placement, puts(vec![record]));
    assert_eq!(judged.rejected.len(), 1, "{judged:?}");
    assert_eq!(maps.endpoints().unwrap(), planned(&mirror));
}

#[test]
fn what_only_the_full_path_can_judge_says_so() {
    let cases: Vec<(&str, Vec<KvChange>)> = vec![
        ("a network", puts(network("net2", "10.200.0.0/24", 8))),
        ("a node", vec![delete("nodes/c")]),
        (
            "the vxlan port",
            puts(vec![pair("config/vxlan-port", "8472", None)]),
        ),
    ];
    for (what, changes) in cases {
        let (mut mirror, _, _) = cluster();
        assert!(mirror.take_changes(changes, SELF).full, "{what}");
    }
}

#[test]
fn the_desired_state_kept_by_changes_equals_a_full_judgement() {
    let (mut mirror, mut maps, placement) = cluster();
    let links = BTreeSet::new();
    let judged_in_full =
        |mirror: &Mirror| records::parse_snapshot(P, mirror.pairs(), view(&links)).state;
    let desired = judged_in_full(&mirror);
    let mut changed = HashMap::new();
    let mut thief = puts(vec![endpoint_record("thief", "10.100.0.2", "c")]);
    thief.push(KvChange::Put(pair("endpoints/net1/junk", "{", None)));
    let mut moved = puts(endpoint("e2", "10.100.0.9", "b"));
    moved.push(delete("ipam/net1/10.100.0.3"));
    let batches = vec![
        ("a new endpoint", puts(endpoint("e3", "10.100.0.4", "b"))),
        ("a second claim and a malformed record", thief),
        ("an endpoint moved to another address and node", moved),
        (
            "a deleted endpoint",
            vec![delete("endpoints/net1/e1"), delete("ipam/net1/10.100.0.2")],
        ),
        (
            "the second claim gone",
            vec![delete("endpoints/net1/thief")],
        ),
        (
            "a record naming this node that it did not create",
            puts(endpoint("stray", "10.100.0.7", SELF)),
        ),
        (
            "the first endpoint back",
            puts(endpoint("e1", "10.100.0.2", "c")),
        ),
    ];
    for (what, changes) in batches {
        let scope = mirror.take_changes(changes, SELF);
        assert!(!scope.full, "{what}: {scope:?}");
        let judged = judge_scope(&mirror, P, &scope, view(&links));
        write_addresses(
            &mut maps,
            &scope.addresses,
            &judged.endpoints,
            &placement,
            SELF,
        )
        .unwrap();
        note_endpoints_at(&mut changed, &scope.addresses, &judged.endpoints);
        assert_eq!(
            with_endpoints_at(&desired, &changed),
            judged_in_full(&mirror),
            "after {what}"
        );
    }
}

#[test]
fn an_invalidated_mirror_judges_nothing_until_its_next_snapshot() {
    let (mut mirror, _, _) = cluster();
    mirror.invalidate();
    assert!(!mirror.synced());
    assert_eq!(mirror.pairs().count(), 0);
    // Changes meant for the old copy are dropped: the snapshot that follows covers them.
    let scope = mirror.take_changes(puts(endpoint("e3", "10.100.0.4", "b")), SELF);
    assert!(!scope.full && scope.keys.is_empty() && scope.addresses.is_empty());
    assert_eq!(mirror.pairs().count(), 0);
    let (fresh, _, _) = cluster();
    mirror.replace(fresh.pairs().cloned().collect());
    assert!(mirror.synced());
    assert_eq!(planned(&mirror), planned(&fresh));
}

#[test]
fn acknowledgements_and_other_unjudged_keys_are_not_changes() {
    let (mut mirror, _, _) = cluster();
    let changes = puts(vec![
        pair("applied/b", "42", None),
        pair("journal/head", "7", None),
    ]);
    let scope = mirror.take_changes(changes, SELF);
    assert_eq!(scope, Scope::default());
    assert!(mirror.get("overlay/applied/b").is_none());
    assert!(mirror.get("overlay/journal/head").is_none());
}

/// The cost of one change with 2,000 and with 20,000 endpoint records: run with
/// `--ignored --nocapture` (in a release build) to see it; it must not depend on the
/// cluster's size.
#[test]
#[ignore]
fn cost_per_change_does_not_grow_with_the_cluster() {
    for size in [2_000u32, 20_000] {
        let (mut mirror, mut maps, placement) = cluster();
        let mut pairs = Vec::new();
        for i in 0..size {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + 10 + i);
            pairs.extend(endpoint(&format!("s{i}"), &ip.to_string(), "b"));
        }
        // A /24 holds only 256 addresses: the rest are rejected, which costs the same.
        let _ = apply(&mut mirror, &mut maps, &placement, puts(pairs));
        let rounds = 2_000;
        let started = Instant::now();
        for i in 0..rounds {
            let changes = if i % 2 == 0 {
                puts(endpoint("churn", "10.100.0.250", "c"))
            } else {
                vec![
                    delete("endpoints/net1/churn"),
                    delete("ipam/net1/10.100.0.250"),
                ]
            };
            apply(&mut mirror, &mut maps, &placement, changes);
        }
        let per_change = started.elapsed() / rounds;
        println!("{per_change:?} per change (judge + write) at {size} endpoint records");
    }
}

#[test]
fn records_naming_this_node_are_listed_as_its_own() {
    let (mut mirror, _, _) = cluster();
    let scope = mirror.take_changes(puts(endpoint("mine", "10.100.0.7", SELF)), SELF);
    assert!(!scope.full, "{scope:?}");
    assert_eq!(
        scope.own,
        BTreeSet::from([("net1".to_string(), "mine".to_string())])
    );
    // A remote endpoint's record rewritten to name this node: its old and new records
    // are one (network, id).
    let scope = mirror.take_changes(puts(vec![endpoint_record("e1", "10.100.0.2", SELF)]), SELF);
    assert_eq!(
        scope.own,
        BTreeSet::from([("net1".to_string(), "e1".to_string())])
    );
}

#[test]
fn a_record_naming_this_node_that_it_did_not_create_gets_no_entry() {
    let (mut mirror, mut maps, placement) = cluster();
    apply(
        &mut mirror,
        &mut maps,
        &placement,
        puts(endpoint("stray", "10.100.0.7", SELF)),
    );
    assert_eq!(maps.endpoint(key(7)).unwrap(), None);
    // A remote endpoint whose record now names this node loses its remote entry.
    apply(
        &mut mirror,
        &mut maps,
        &placement,
        puts(vec![endpoint_record("e1", "10.100.0.2", SELF)]),
    );
    assert_eq!(maps.endpoint(key(2)).unwrap(), None);
    assert_eq!(maps.endpoints().unwrap(), planned(&mirror));
}
