//! The next-hop cache (`NEXTHOPS`) the agent keeps for the encap program: it follows the
//! kernel's neighbour table within a second, and a VTEP without an entry still gets its
//! traffic through the FIB.
use std::{net::Ipv4Addr, time::Duration};

use futures_util::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use overlay_common::{MacAddr, NextHop};
use overlay_ctl::dataplane::netlink;
use overlay_tests::{
    bins,
    cluster::{start_cluster, Background, Bins, Node},
    harness::{require_root, unique_name, wait_until},
    net, pinned,
    topology::{Underlay, UNDERLAY_IFNAME},
};

const BINS: Bins = bins!();
/// What the agent promises: a neighbour change reaches the map within a second.
const FOLLOW: Duration = Duration::from_secs(1);
const PING: Duration = Duration::from_secs(10);
const NEW_MAC: [u8; 6] = [0x02, 0x5e, 0x00, 0x00, 0x00, 0x42];

fn pings(container: &Background, dst: Ipv4Addr) -> bool {
    wait_until(
        &format!("container namespace {}", container.netns),
        Duration::from_secs(15),
        || container.open_netns().is_some(),
    );
    container
        .open_netns()
        .unwrap()
        .run(move || net::ping_until_reply(dst, PING))
        .unwrap()
}

fn cached(node: &Node, vtep: Ipv4Addr) -> Option<NextHop> {
    pinned::next_hops(&node.pins.path).get(&vtep).copied()
}

fn underlay_link(node: &Node) -> netlink::LinkInfo {
    node.ns.block_on(|| async {
        let handle = netlink::connect().unwrap();
        netlink::link_by_name(&handle, UNDERLAY_IFNAME)
            .await
            .unwrap()
    })
}

/// Deletes `node`'s neighbour entry for `ip` on the underlay, as `ip neigh del` would.
fn delete_neighbour(node: &Node, ip: Ipv4Addr) {
    node.ns.block_on(|| async {
        let handle = netlink::connect().unwrap();
        let mut dump = handle.neighbours().get().execute();
        while let Some(entry) = dump.try_next().await.unwrap() {
            let is_it = entry
                .attributes
                .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
            if is_it {
                handle.neighbours().del(entry).execute().await.unwrap();
            }
        }
    })
}

#[test]
fn the_next_hop_cache_follows_the_neighbour_table_within_a_second() {
    require_root();
    let underlay = Underlay::new();
    let (_consul, nodes) = start_cluster(&BINS, &underlay, 2, None, &[]);
    let (sender, receiver) = (&nodes[0], &nodes[1]);
    sender
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    let a = sender.spawn_run("net1", &unique_name("a"), &["sleep", "600"]);
    let b = receiver.spawn_run("net1", &unique_name("b"), &["sleep", "600"]);
    sender.wait_endpoint("net1", &a.netns["ovl-net1-".len()..]);
    let b_ip = receiver.wait_endpoint("net1", &b.netns["ovl-net1-".len()..]);

    // The first packets resolve the receiver's VTEP through the FIB (nothing cached
    // yet); the agent then caches what the kernel learnt.
    assert!(pings(&a, b_ip), "ping {b_ip} across hosts");
    let sender_link = underlay_link(sender);
    let expect = |mac: MacAddr| NextHop::new(sender_link.index, mac, sender_link.mac);
    let learnt = expect(underlay_link(receiver).mac);
    wait_until("the receiver's next hop to be cached", FOLLOW, || {
        cached(sender, receiver.vtep) == Some(learnt)
    });

    // The receiver's underlay MAC changes, and the sender's neighbour entry with it (as
    // a gratuitous ARP would do it): the cache follows, and traffic flows on.
    receiver.ns.block_on(|| async {
        let handle = netlink::connect().unwrap();
        let link = netlink::link_by_name(&handle, UNDERLAY_IFNAME)
            .await
            .unwrap();
        netlink::set_mac(&handle, link.index, NEW_MAC.into())
            .await
            .unwrap();
    });
    sender.ns.block_on(|| async {
        let handle = netlink::connect().unwrap();
        netlink::add_permanent_neighbour(&handle, sender_link.index, receiver.vtep, NEW_MAC.into())
            .await
            .unwrap();
    });
    wait_until("the cache to follow the new MAC", FOLLOW, || {
        cached(sender, receiver.vtep) == Some(expect(NEW_MAC.into()))
    });
    assert!(pings(&a, b_ip), "ping {b_ip} after the MAC change");

    // Without a neighbour entry there is nothing to cache: the entry goes, the FIB
    // fallback resolves the VTEP again, and the cache picks the answer up.
    delete_neighbour(sender, receiver.vtep);
    wait_until("the deleted neighbour to leave the cache", FOLLOW, || {
        cached(sender, receiver.vtep).is_none()
    });
    assert!(pings(&a, b_ip), "ping {b_ip} through the FIB fallback");
    wait_until("the re-resolved next hop to be cached", FOLLOW, || {
        cached(sender, receiver.vtep) == Some(expect(NEW_MAC.into()))
    });
}
