//! The delta path against the full path: after every batch, the endpoint and VTEP maps
//! written change by change equal the ones planned from a full judgement of the same
//! records, and so does the desired state kept.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Instant,
};

use overlay_common::{EndpointKey, EndpointValue, VtepInfo};

use super::*;
use crate::{
    agent::reconcile::{self, DesiredMaps, LocalNode},
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

/// What the full path plans for the mirror's records: the endpoint and VTEP maps.
fn planned_maps(mirror: &Mirror) -> DesiredMaps {
    let links = BTreeSet::new();
    let state = records::parse_snapshot(P, mirror.pairs(), view(&links)).state;
    let local = LocalNode {
        name: SELF.into(),
        vtep: SELF_VTEP,
    };
    reconcile::plan(&state, &local, &BTreeMap::new()).maps
}

/// The endpoint map the full path plans for the mirror's records.
fn planned(mirror: &Mirror) -> BTreeMap<EndpointKey, EndpointValue> {
    planned_maps(mirror).endpoints
}

/// A mirror, the maps the delta path writes, and the desired state it keeps.
struct Fixture {
    mirror: Mirror,
    maps: MemoryMaps,
    /// The full judgement the fixture started from.
    desired: ClusterState,
    kept: Kept,
}

impl Fixture {
    /// Applies one batch on its own; returns what it judged.
    fn apply(&mut self, changes: Vec<KvChange>) -> Batch {
        let scope = self.mirror.take_changes(changes, SELF);
        assert!(!scope.full, "{scope:?}");
        let links = BTreeSet::new();
        let batch = judge_batch(
            &self.mirror,
            P,
            &scope,
            view(&links),
            &self.desired,
            &self.kept,
        );
        self.kept.take_in(&batch);
        write_batch(&mut self.maps, &batch, SELF, SELF_VTEP).unwrap();
        batch
    }

    /// The endpoint map written.
    fn endpoints(&mut self) -> BTreeMap<EndpointKey, EndpointValue> {
        self.maps.endpoints().unwrap()
    }

    /// Asserts the maps written change by change are the ones the full path plans, and
    /// the desired state kept is a full judgement of the records.
    fn assert_as_planned(&mut self, after: &str) {
        let planned = planned_maps(&self.mirror);
        assert_eq!(
            self.endpoints(),
            planned.endpoints,
            "endpoints after {after}"
        );
        assert_eq!(
            self.maps.vteps().unwrap(),
            planned.vteps,
            "VTEPs after {after}"
        );
        let links = BTreeSet::new();
        assert_eq!(
            self.kept.applied_to(&self.desired),
            records::parse_snapshot(P, self.mirror.pairs(), view(&links)).state,
            "desired state after {after}"
        );
    }
}

/// A cluster of three live nodes (this one, `b` and `c`), network net1 and two remote
/// endpoints, with its maps as the full path leaves them.
fn cluster() -> Fixture {
    let mut pairs = network("net1", "10.100.0.0/24", 7);
    pairs.extend([node(SELF, 1), node("b", 2), node("c", 3)]);
    pairs.extend(endpoint("e1", "10.100.0.2", "b"));
    pairs.extend(endpoint("e2", "10.100.0.3", "c"));
    let mut mirror = Mirror::new(P);
    mirror.replace(pairs);
    let mut maps = MemoryMaps::default();
    let planned = planned_maps(&mirror);
    for (key, value) in planned.endpoints {
        maps.upsert_endpoint(key, &value).unwrap();
    }
    for (vtep, info) in planned.vteps {
        maps.upsert_vtep(vtep, &info).unwrap();
    }
    let links = BTreeSet::new();
    let desired = records::parse_snapshot(P, mirror.pairs(), view(&links)).state;
    Fixture {
        mirror,
        maps,
        desired,
        kept: Kept::default(),
    }
}

/// Why each record a batch rejected was rejected, by key.
fn reasons(batch: &Batch) -> BTreeMap<&str, RejectReason> {
    (batch.rejected.iter())
        .map(|r| (r.key.as_str(), r.reason))
        .collect()
}

fn key(last: u8) -> EndpointKey {
    EndpointKey::new(7, Ipv4Addr::new(10, 100, 0, last))
}

fn vtep(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, last)
}

#[test]
fn a_new_endpoint_adds_only_its_entry() {
    let mut f = cluster();
    let batch = f.apply(puts(endpoint("e3", "10.100.0.4", "b")));
    assert!(batch.rejected.is_empty(), "{batch:?}");
    let endpoints = f.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(
        endpoints[&key(4)],
        EndpointValue::remote(
            vtep(2),
            crate::dataplane::endpoint::mac_for(Ipv4Addr::new(10, 100, 0, 4))
        )
    );
    f.assert_as_planned("a new endpoint");
}

#[test]
fn a_deleted_endpoint_removes_its_entry() {
    let mut f = cluster();
    f.apply(vec![
        delete("endpoints/net1/e1"),
        delete("ipam/net1/10.100.0.2"),
    ]);
    let endpoints = f.endpoints();
    assert!(!endpoints.contains_key(&key(2)));
    assert!(endpoints.contains_key(&key(3)));
    f.assert_as_planned("a deleted endpoint");
}

#[test]
fn a_replaced_endpoint_moves_its_entry() {
    let mut f = cluster();
    // e2 moves from .3 on node c to .9 on node b: new address, old address released.
    let mut changes = puts(endpoint("e2", "10.100.0.9", "b"));
    changes.push(delete("ipam/net1/10.100.0.3"));
    f.apply(changes);
    let endpoints = f.endpoints();
    assert!(!endpoints.contains_key(&key(3)));
    assert_eq!(endpoints[&key(9)].vtep, overlay_common::ip_to_map(vtep(2)));
    f.assert_as_planned("a moved endpoint");
}

#[test]
fn an_invalid_changed_record_is_rejected_and_changes_nothing() {
    let mut f = cluster();
    let before = f.endpoints();
    // A second claim on e1's address (its IPAM key names e1), and a malformed record.
    let mut changes = puts(vec![endpoint_record("thief", "10.100.0.2", "c")]);
    changes.push(KvChange::Put(pair("endpoints/net1/junk", "{", None)));
    let batch = f.apply(changes);
    assert_eq!(
        reasons(&batch),
        BTreeMap::from([
            ("overlay/endpoints/net1/junk", RejectReason::Malformed),
            (
                "overlay/endpoints/net1/thief",
                RejectReason::DuplicateAddress
            ),
        ])
    );
    assert_eq!(f.endpoints(), before, "e1 keeps its address");
    f.assert_as_planned("a second claim");

    // The thief gone, nothing is rejected at that address any more.
    let batch = f.apply(vec![delete("endpoints/net1/thief")]);
    assert!(batch.rejected.is_empty(), "{batch:?}");
    assert!(batch.keys.contains("overlay/endpoints/net1/thief"));
}

#[test]
fn an_endpoint_of_an_unknown_network_is_rejected() {
    let mut f = cluster();
    let mut record = endpoint_record("lost", "10.9.0.2", "b");
    record.key = format!("{P}endpoints/net9/lost");
    let batch = f.apply(puts(vec![record]));
    assert_eq!(batch.rejected.len(), 1, "{batch:?}");
    f.assert_as_planned("an endpoint of no network");
}

#[test]
fn a_node_that_leaves_takes_its_entries_and_vtep_with_it() {
    let mut f = cluster();
    let batch = f.apply(vec![delete("nodes/c")]);
    assert_eq!(batch.nodes.as_ref().map(Vec::len), Some(2));
    let endpoints = f.endpoints();
    assert!(!endpoints.contains_key(&key(3)), "e2 was on c");
    assert!(endpoints.contains_key(&key(2)), "e1 is on b");
    assert!(!f.maps.vteps().unwrap().contains_key(&vtep(3)));
    f.assert_as_planned("a node left");

    // Back (its session renewed after an outage): its endpoint is reached again.
    f.apply(puts(vec![node("c", 3)]));
    assert_eq!(
        f.endpoints()[&key(3)].vtep,
        overlay_common::ip_to_map(vtep(3))
    );
    f.assert_as_planned("the node came back");
}

#[test]
fn a_node_that_joins_is_a_vtep_and_its_endpoints_follow() {
    let mut f = cluster();
    // An endpoint written before its node's record (the node's registration was slow).
    f.apply(puts(endpoint("early", "10.100.0.5", "d")));
    assert!(!f.endpoints().contains_key(&key(5)), "node d is not live");
    f.assert_as_planned("an endpoint on no live node");
    f.apply(puts(vec![node("d", 4)]));
    assert_eq!(
        f.endpoints()[&key(5)].vtep,
        overlay_common::ip_to_map(vtep(4))
    );
    assert_eq!(f.maps.vteps().unwrap()[&vtep(4)], VtepInfo::remote());
    f.assert_as_planned("node d joined");
}

#[test]
fn a_node_at_a_new_vtep_moves_its_entries_and_a_taken_vtep_is_refused() {
    let mut f = cluster();
    f.apply(puts(vec![node("b", 9)]));
    assert_eq!(
        f.endpoints()[&key(2)].vtep,
        overlay_common::ip_to_map(vtep(9))
    );
    f.assert_as_planned("node b moved");

    // A younger record claiming c's VTEP, and one claiming this node's: both refused.
    let mut thief = node("thief", 3);
    thief.create_index = 5;
    let mut impostor = node("impostor", 1);
    impostor.create_index = 6;
    let batch = f.apply(puts(vec![thief, impostor]));
    assert_eq!(
        reasons(&batch),
        BTreeMap::from([
            ("overlay/nodes/impostor", RejectReason::DuplicateVtep),
            ("overlay/nodes/thief", RejectReason::DuplicateVtep),
        ])
    );
    assert_eq!(f.maps.vteps().unwrap()[&SELF_VTEP], VtepInfo::local());
    f.assert_as_planned("two nodes claiming taken VTEPs");
}

#[test]
fn what_only_the_full_path_can_judge_says_so() {
    let cases: Vec<(&str, Vec<KvChange>)> = vec![
        ("a network", puts(network("net2", "10.200.0.0/24", 8))),
        ("this node's own record", puts(vec![node(SELF, 9)])),
        ("a VNI claim", vec![delete("vni/7")]),
        (
            "the vxlan port",
            puts(vec![pair("config/vxlan-port", "8472", None)]),
        ),
    ];
    for (what, changes) in cases {
        let mut f = cluster();
        assert!(f.mirror.take_changes(changes, SELF).full, "{what}");
    }
}

#[test]
fn the_desired_state_kept_by_changes_equals_a_full_judgement() {
    let mut f = cluster();
    let mut thief = puts(vec![endpoint_record("thief", "10.100.0.2", "c")]);
    thief.push(KvChange::Put(pair("endpoints/net1/junk", "{", None)));
    let mut moved = puts(endpoint("e2", "10.100.0.9", "b"));
    moved.push(delete("ipam/net1/10.100.0.3"));
    let mut joined_with_endpoint = puts(vec![node("d", 4)]);
    joined_with_endpoint.extend(puts(endpoint("e4", "10.100.0.10", "d")));
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
        ("a node left", vec![delete("nodes/c")]),
        ("a node joined with an endpoint", joined_with_endpoint),
        ("a node at a new VTEP", puts(vec![node("b", 9)])),
        ("a node back", puts(vec![node("c", 3)])),
        (
            "an endpoint deleted with its node",
            vec![
                delete("nodes/d"),
                delete("endpoints/net1/e4"),
                delete("ipam/net1/10.100.0.10"),
            ],
        ),
    ];
    for (what, changes) in batches {
        f.apply(changes);
        f.assert_as_planned(what);
    }
}

/// A fresh read of the whole store taken while changes are applied on their own: its
/// state with what the changes found since it started is the full judgement, as is the
/// first desired state with everything kept since.
#[test]
fn a_fresh_read_with_the_changes_since_it_started_equals_a_full_judgement() {
    let mut f = cluster();
    let links = BTreeSet::new();
    f.apply(puts(endpoint("e3", "10.100.0.4", "b")));
    f.apply(vec![delete("nodes/c")]);
    // The read: the records as they are now.
    let read = records::parse_snapshot(P, f.mirror.pairs(), view(&links)).state;
    let mut during = Kept::default();
    let mut moved = puts(endpoint("e2", "10.100.0.9", "b"));
    moved.push(delete("ipam/net1/10.100.0.3"));
    let mut joined = puts(vec![node("d", 4)]);
    joined.extend(puts(endpoint("e4", "10.100.0.10", "d")));
    for changes in [
        moved,
        joined,
        vec![delete("endpoints/net1/e1"), delete("ipam/net1/10.100.0.2")],
        puts(vec![node("c", 3)]),
    ] {
        let batch = f.apply(changes);
        during.take_in(&batch);
    }
    let full = records::parse_snapshot(P, f.mirror.pairs(), view(&links)).state;
    assert_eq!(during.applied_to(&read), full);
    assert_eq!(f.kept.applied_to(&f.desired), full);
    assert_ne!(read, full, "the changes after the read matter");
}

#[test]
fn an_invalidated_mirror_judges_nothing_until_its_next_snapshot() {
    let Fixture { mut mirror, .. } = cluster();
    mirror.invalidate();
    assert!(!mirror.synced());
    assert_eq!(mirror.pairs().count(), 0);
    // Changes meant for the old copy are dropped: the snapshot that follows covers them.
    let scope = mirror.take_changes(puts(endpoint("e3", "10.100.0.4", "b")), SELF);
    assert!(scope.is_empty() && scope.addresses.is_empty());
    assert_eq!(mirror.pairs().count(), 0);
    let fresh = cluster().mirror;
    mirror.replace(fresh.pairs().map(Stored::to_pair).collect());
    assert!(mirror.synced());
    assert_eq!(planned(&mirror), planned(&fresh));
}

#[test]
fn acknowledgements_and_other_unjudged_keys_are_not_changes() {
    let mut mirror = cluster().mirror;
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
        let mut f = cluster();
        let mut pairs = Vec::new();
        for i in 0..size {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + 10 + i);
            pairs.extend(endpoint(&format!("s{i}"), &ip.to_string(), "b"));
        }
        // A /24 holds only 256 addresses: the rest are rejected, which costs the same.
        let _ = f.apply(puts(pairs));
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
            f.apply(changes);
        }
        let per_change = started.elapsed() / rounds;
        let started = Instant::now();
        for i in 0..rounds {
            let changes = if i % 2 == 0 {
                puts(vec![node("joiner", 200)])
            } else {
                vec![delete("nodes/joiner")]
            };
            f.apply(changes);
        }
        let per_node = started.elapsed() / rounds;
        println!(
            "{per_change:?} per endpoint change, {per_node:?} per node join or leave (judge + write) at {size} endpoint records"
        );
    }
}

#[test]
fn records_naming_this_node_are_listed_as_its_own() {
    let mut mirror = cluster().mirror;
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
    let mut f = cluster();
    f.apply(puts(endpoint("stray", "10.100.0.7", SELF)));
    assert_eq!(f.maps.endpoint(key(7)).unwrap(), None);
    // A remote endpoint whose record now names this node loses its remote entry.
    f.apply(puts(vec![endpoint_record("e1", "10.100.0.2", SELF)]));
    assert_eq!(f.maps.endpoint(key(2)).unwrap(), None);
    f.assert_as_planned("records naming this node");
}

/// One network, this node and 100 others, and `endpoints` endpoints spread over the
/// others (the scale benchmark's shape), for the measurements below.
fn large_cluster(endpoints: u32) -> Vec<KvPair> {
    let mut pairs = network("net1", "10.96.0.0/12", 7);
    pairs.push(node(SELF, 1));
    for n in 0..100u32 {
        pairs.push(pair(
            &format!("nodes/n{n}"),
            &format!(
                r#"{{"name":"n{n}","vtep":"198.18.1.{}","iface":"eth0"}}"#,
                n + 1
            ),
            Some("s"),
        ));
    }
    for i in 0..endpoints {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + i);
        pairs.extend(endpoint(
            &format!("s{i:06}"),
            &ip.to_string(),
            &format!("n{}", i % 100),
        ));
    }
    pairs
}

/// What a resync's stages cost at 20,000 endpoints on 100 nodes: run with `--ignored
/// --nocapture` in a release build.
#[test]
#[ignore]
fn resync_stages_at_twenty_thousand_endpoints() {
    let pairs = large_cluster(20_000);
    let mut mirror = Mirror::new(P);
    mirror.replace(pairs);
    let links = BTreeSet::new();
    let time = |what: &str, f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..10 {
            f();
        }
        println!("{what}: {:?}", started.elapsed() / 10);
    };
    let mut desired = ClusterState::default();
    time("judge the mirror", &mut || {
        desired = records::parse_snapshot(P, mirror.pairs(), view(&links)).state;
    });
    assert_eq!(desired.endpoints.len(), 20_000);
    let mut kept = Kept::default();
    let scope = mirror.take_changes(vec![delete("nodes/n7")], SELF);
    let batch = judge_batch(&mirror, P, &scope, view(&links), &desired, &kept);
    kept.take_in(&batch);
    let mut current = ClusterState::default();
    time("kept applied to the desired state", &mut || {
        current = kept.applied_to(&desired);
    });
    time("clone the state", &mut || {
        current = desired.clone();
    });
    let local = LocalNode {
        name: SELF.into(),
        vtep: SELF_VTEP,
    };
    let mut plan = reconcile::Plan::default();
    time("plan", &mut || {
        plan = reconcile::plan(&current, &local, &BTreeMap::new());
    });
    let mut maps = MemoryMaps::default();
    time("apply (the maps already hold it)", &mut || {
        crate::agent::apply::apply(&mut maps, &plan.maps, &BTreeMap::new()).unwrap();
    });
    time("malloc_trim", &mut || unsafe {
        libc::malloc_trim(0);
    });
}

/// The check of the mirror against the store's versions of the followed keys: equal
/// when every judged key is held at the store's index (keys outside the judged
/// sections do not count), else the first key that differs, whichever side lacks it;
/// what the mirror applied after the versions' index (a newer write, a delete) does
/// not count.
#[test]
fn the_mirror_differs_from_the_store_versions_at_the_first_key_that_differs() {
    use crate::store::feed::Versions;
    let mut pairs = network("net1", "10.100.0.0/24", 7);
    pairs.push(node("b", 2));
    pairs.extend(endpoint("e1", "10.100.0.2", "b"));
    for (i, pair) in pairs.iter_mut().enumerate() {
        pair.modify_index = 10 + i as u64;
    }
    let mut mirror = Mirror::new(P);
    mirror.replace(pairs.clone());
    let mut stored: Vec<(String, u64)> = (pairs.iter())
        .map(|p| (p.key.clone(), p.modify_index))
        .chain([
            (format!("{P}journal/head"), 99),
            (format!("{P}zz-other/x"), 98),
        ])
        .collect();
    stored.sort();
    let versions = |keys: &[(String, u64)]| Versions {
        index: 100,
        keys: keys.to_vec(),
    };
    let none = BTreeSet::new();
    assert_eq!(mirror.first_difference(&versions(&stored), &none), None);

    let ipam = format!("{P}ipam/net1/10.100.0.2");
    let at = stored.iter().position(|(k, _)| *k == ipam).unwrap();
    let mut rewritten = stored.clone();
    rewritten[at].1 = 50;
    let difference = mirror
        .first_difference(&versions(&rewritten), &none)
        .unwrap();
    assert_eq!(
        (difference.key.as_str(), difference.held, difference.stored),
        (ipam.as_str(), Some(stored[at].1), Some(50))
    );

    let e9 = format!("{P}endpoints/net1/e9");
    let mut missed_put = stored.clone();
    missed_put.push((e9.clone(), 60));
    missed_put.sort();
    let difference = mirror
        .first_difference(&versions(&missed_put), &none)
        .unwrap();
    assert_eq!(
        (difference.held, difference.stored),
        (None, Some(60)),
        "{difference}"
    );
    // Deleted after the versions' index: not a difference.
    let deleted = BTreeSet::from([e9.clone()]);
    assert_eq!(
        mirror.first_difference(&versions(&missed_put), &deleted),
        None
    );

    let mut missed_delete = stored.clone();
    missed_delete.retain(|(k, _)| *k != ipam);
    let difference = mirror
        .first_difference(&versions(&missed_delete), &none)
        .unwrap();
    assert_eq!(difference.key, ipam);
    assert_eq!(
        (difference.held, difference.stored),
        (Some(stored[at].1), None)
    );
    // The last key too: nothing after it in the store.
    let last = mirror.pairs().last().unwrap().key().to_string();
    let mut missed_last = stored.clone();
    missed_last.retain(|(k, _)| *k != last);
    assert_eq!(
        mirror
            .first_difference(&versions(&missed_last), &none)
            .unwrap()
            .key,
        last
    );

    // Written after the versions' index (a newer index here): rewritten or created,
    // not a difference; the store's older version of a rewritten key neither.
    let mut newer = endpoint_record("e1", "10.100.0.2", "b");
    newer.modify_index = 150;
    let mut created = endpoint_record("e7", "10.100.0.7", "b");
    created.modify_index = 151;
    mirror.take_changes(puts(vec![newer, created]), SELF);
    assert_eq!(mirror.first_difference(&versions(&stored), &none), None);
}

/// What an agent holds per endpoint at 20,000 endpoints, stage by stage (heap bytes in
/// use after each, glibc's count): a measurement to run by hand with `--ignored
/// --nocapture --test-threads 1` (other tests' allocations would count), not a check.
#[test]
#[ignore]
fn memory_per_endpoint_at_twenty_thousand_endpoints() {
    const ENDPOINTS: u32 = 20_000;
    fn in_use() -> i64 {
        // SAFETY: both only read or trim the allocator's own bookkeeping.
        unsafe {
            libc::malloc_trim(0);
            libc::mallinfo2().uordblks as i64
        }
    }
    // Before the records are made: the mirror is what stays of them.
    let mut last = in_use();
    let pairs = large_cluster(ENDPOINTS);
    let mut report = |stage: &str| {
        let now = in_use();
        println!(
            "{stage}: {} B/endpoint",
            (now - last) / i64::from(ENDPOINTS)
        );
        last = now;
    };
    let mut mirror = Mirror::new(P);
    mirror.replace(pairs);
    report("mirror (records and claims)");
    let links = BTreeSet::new();
    let desired = records::parse_snapshot(P, mirror.pairs(), view(&links)).state;
    report("desired state");
    let local = LocalNode {
        name: SELF.into(),
        vtep: SELF_VTEP,
    };
    let plan = reconcile::plan(&desired, &local, &BTreeMap::new());
    report("plan");
    let mut maps = MemoryMaps::default();
    crate::agent::apply::apply(&mut maps, &plan.maps, &BTreeMap::new()).unwrap();
    report("maps (in memory)");
    assert_eq!(desired.endpoints.len(), ENDPOINTS as usize);
}

/// The claims index is kept by address alone, the network being in each claimant's
/// key: the claimants of an address are those of its network only, and a record that
/// is deleted, or rewritten with another address, stops claiming it.
#[test]
fn the_mirror_claimants_of_an_address_are_those_of_its_network_and_follow_changes() {
    let ip = |last: u8| Ipv4Addr::new(10, 100, 0, last);
    let key = |net: &str, id: &str| format!("{P}endpoints/{net}/{id}");
    let in_net2 = pair(
        "endpoints/net2/e3",
        r#"{"id":"e3","network":"net2","ip":"10.100.0.2","mac":"02:42:0a:64:00:02","node":"b","ifname":"x"}"#,
        None,
    );
    let mut mirror = Mirror::new(P);
    mirror.replace(vec![
        endpoint_record("e1", "10.100.0.2", "b"),
        endpoint_record("e2", "10.100.0.2", "c"),
        in_net2,
    ]);
    let claimants = |mirror: &Mirror, net: &str, last: u8| -> Vec<String> {
        let address = (net.to_string(), ip(last));
        mirror.claimants(&address).map(str::to_string).collect()
    };
    assert_eq!(
        claimants(&mirror, "net1", 2),
        [key("net1", "e1"), key("net1", "e2")]
    );
    assert_eq!(claimants(&mirror, "net2", 2), [key("net2", "e3")]);

    mirror.take_changes(vec![delete("endpoints/net1/e1")], SELF);
    assert_eq!(claimants(&mirror, "net1", 2), [key("net1", "e2")]);
    let scope = mirror.take_changes(puts(vec![endpoint_record("e2", "10.100.0.3", "c")]), SELF);
    assert_eq!(
        scope.addresses,
        BTreeSet::from([("net1".to_string(), ip(2)), ("net1".to_string(), ip(3))]),
        "the address left and the address taken are both judged again"
    );
    assert!(claimants(&mirror, "net1", 2).is_empty());
    assert_eq!(claimants(&mirror, "net1", 3), [key("net1", "e2")]);
    assert_eq!(claimants(&mirror, "net2", 2), [key("net2", "e3")]);

    mirror.take_changes(vec![delete("endpoints/net2/e3")], SELF);
    assert!(claimants(&mirror, "net2", 2).is_empty());
}
