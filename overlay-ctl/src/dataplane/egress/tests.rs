//! The table as built from the store's networks, and read back from `nft`'s JSON.
use super::*;

fn rule(network: &str, subnet: &str, mode: EgressMode) -> EgressRule {
    EgressRule {
        network: network.into(),
        vni: 7,
        subnet: subnet.parse().unwrap(),
        mode,
    }
}

#[test]
fn one_rule_per_network_in_the_chain_its_mode_needs_sorted_by_name() {
    let overlay = ["10.1.0.0/16".parse().unwrap()];
    let desired = DesiredTable::new(
        &[
            rule("web", "10.2.0.0/24", EgressMode::None),
            rule("db", "10.3.0.0/24", EgressMode::Masquerade),
        ],
        &overlay,
    )
    .unwrap();
    let chains: Vec<_> = desired.rules.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(chains, [NAT_CHAIN, FILTER_CHAIN]);
    assert!(desired.rules[0]
        .1
        .starts_with("masquerade db 10.3.0.0/24 vni 7 overlay "));
    assert!(desired.rules[1]
        .1
        .starts_with("none web 10.2.0.0/24 vni 7 overlay "));
    assert_eq!(comment_network(&desired.rules[1].1), Some("web"));
}

#[test]
fn the_fingerprint_follows_the_overlay_subnets_and_not_their_order() {
    let a: Ipv4Network = "10.1.0.0/16".parse().unwrap();
    let b: Ipv4Network = "10.2.0.0/24".parse().unwrap();
    let c: Ipv4Network = "10.2.0.0/25".parse().unwrap();
    let one = DesiredTable::new(&[rule("n", "10.1.0.0/16", EgressMode::None)], &[a, b]);
    let same = DesiredTable::new(&[rule("n", "10.1.0.0/16", EgressMode::None)], &[b, a]);
    let other = DesiredTable::new(&[rule("n", "10.1.0.0/16", EgressMode::None)], &[a, c]);
    let comment = |d: Result<DesiredTable>| d.unwrap().rules[0].1.clone();
    let one = comment(one);
    assert_eq!(one, comment(same));
    assert_ne!(one, comment(other));
}

#[test]
fn nested_subnets_leave_only_the_outer_one_in_the_set() {
    let nets: Vec<Ipv4Network> = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "11.0.0.0/24"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let desired = DesiredTable::new(&[rule("n", "10.1.2.0/24", EgressMode::None)], &nets).unwrap();
    assert_eq!(desired.excluded, [nets[0], nets[3]]);
}

#[test]
fn a_network_name_that_would_break_the_comment_is_refused() {
    let error =
        DesiredTable::new(&[rule("a b", "10.1.0.0/24", EgressMode::None)], &[]).unwrap_err();
    assert!(matches!(error, EgressError::BadNetworkName { .. }));
}

#[test]
fn a_missing_nft_is_an_error_that_names_the_package() {
    let nat = EgressNat::with_program("/nonexistent/nft");
    let error = nat.drops().unwrap_err();
    assert!(matches!(error, EgressError::NftMissing(_)), "{error:?}");
    assert!(error.to_string().contains("nftables package"));
}

#[test]
fn drop_counters_are_read_back_from_nft_json() {
    let listing: Nftables = serde_json::from_str(
        r#"{"nftables":[
          {"metainfo":{"version":"1.0.6","release_name":"x","json_schema_version":1}},
          {"table":{"family":"ip","name":"overlay_egress","handle":1}},
          {"chain":{"family":"ip","table":"overlay_egress","name":"forward","handle":2,
            "type":"filter","hook":"forward","prio":0,"policy":"accept"}},
          {"rule":{"family":"ip","table":"overlay_egress","chain":"forward","handle":4,
            "comment":"none web 10.2.0.0/24 vni 7 overlay 0000000000000001",
            "expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},
              "right":{"prefix":{"addr":"10.2.0.0","len":24}}}},
              {"counter":{"packets":3,"bytes":252}},{"drop":null}]}}]}"#,
    )
    .unwrap();
    let current = CurrentTable::parse(&listing);
    assert_eq!(current.chains, ["forward"]);
    assert_eq!(
        current.drops.get("web"),
        Some(&DropCount {
            packets: 3,
            bytes: 252
        })
    );
}
