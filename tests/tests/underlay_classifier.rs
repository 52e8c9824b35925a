//! The underlay programs (XDP and TC ingress) classify VXLAN and other traffic and count
//! both, exactly.
//!
//! Two hosts (namespaces) joined by a veth; the program on host B's end; host A sends a
//! known number of VXLAN and non-VXLAN datagrams from ordinary UDP sockets; the per-CPU
//! counters, read through the agent's own `Datapath`, must equal what was sent.
use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use overlay_common::{Counter, UnderlayConfig};
use overlay_ctl::{
    dataplane::datapath::{Datapath, UnderlayHook, XdpAttachMode},
    dataplane::netlink,
};
use overlay_tests::{frames, harness::*};

const HOST_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const VXLAN_SENT: u64 = 37;
const OTHER_SENT: u64 = 23;

#[test]
fn xdp_counts_vxlan_and_other_traffic_exactly() {
    counts_vxlan_and_other_traffic_exactly(UnderlayHook::Xdp(XdpAttachMode::Native));
}

#[test]
fn tc_counts_vxlan_and_other_traffic_exactly() {
    counts_vxlan_and_other_traffic_exactly(UnderlayHook::TcIngress);
}

fn counts_vxlan_and_other_traffic_exactly(hook: UnderlayHook) {
    require_root();
    let host_a = TestNs::new("ula");
    let host_b = TestNs::new("ulb");
    let (a_name, b_name) = (unique_name("va"), unique_name("vb"));

    // The veth is born in the test's namespace and each end moves to its host.
    block_on(async {
        let handle = netlink::connect().unwrap();
        let (a, b) = netlink::create_veth(&handle, &a_name, &b_name)
            .await
            .unwrap();
        netlink::move_to_netns(&handle, a.index, host_a.ns().file())
            .await
            .unwrap();
        netlink::move_to_netns(&handle, b.index, host_b.ns().file())
            .await
            .unwrap();
    });
    let b_link = host_b.block_on(|| async {
        let handle = netlink::connect().unwrap();
        let link = netlink::link_by_name(&handle, &b_name).await.unwrap();
        netlink::add_address(&handle, link.index, HOST_B, 24)
            .await
            .unwrap();
        netlink::set_up(&handle, link.index).await.unwrap();
        link
    });
    let a_link = host_a.block_on(|| async {
        let handle = netlink::connect().unwrap();
        let link = netlink::link_by_name(&handle, &a_name).await.unwrap();
        netlink::add_address(&handle, link.index, HOST_A, 24)
            .await
            .unwrap();
        netlink::set_up(&handle, link.index).await.unwrap();
        // Static neighbours both ways: no ARP on the wire (B answers the non-VXLAN
        // datagrams with ICMP port unreachable), so the counts are exactly ours.
        netlink::add_permanent_neighbour(&handle, link.index, HOST_B, b_link.mac)
            .await
            .unwrap();
        link
    });
    host_b.block_on(|| async {
        let handle = netlink::connect().unwrap();
        netlink::add_permanent_neighbour(&handle, b_link.index, HOST_A, a_link.mac)
            .await
            .unwrap();
    });

    let pins = PinGuard::new();
    let mut datapath = Datapath::load(&pins.path).expect("load data plane");
    datapath
        .set_underlay(&UnderlayConfig::new(
            b_link.index,
            HOST_B,
            b_link.mtu,
            b_link.mac,
        ))
        .unwrap();
    host_b
        .run(|| datapath.attach_underlay(b_link.index, hook))
        .expect("attach the underlay program on the veth");

    let inner = frames::inner_udp_frame(
        [2; 6],
        [4; 6],
        Ipv4Addr::new(10, 9, 0, 2),
        Ipv4Addr::new(10, 9, 0, 3),
        b"hi",
    );
    let vxlan = frames::vxlan_payload(overlay_common::proto::VXLAN_FLAG_I, 42, &inner);
    host_a.run(|| {
        let socket = UdpSocket::bind((HOST_A, 0)).unwrap();
        for _ in 0..VXLAN_SENT {
            socket
                .send_to(&vxlan, (HOST_B, overlay_common::proto::VXLAN_PORT))
                .unwrap();
        }
        for _ in 0..OTHER_SENT {
            socket.send_to(b"not vxlan", (HOST_B, 5000)).unwrap();
        }
    });

    let count = |c: Counter| {
        datapath
            .counters()
            .unwrap()
            .get(&(0, c))
            .map(|v| v.packets)
            .unwrap_or(0)
    };
    wait_until(
        "every datagram to be counted",
        Duration::from_secs(10),
        || {
            count(Counter::UnderlayVxlan) >= VXLAN_SENT
                && count(Counter::UnderlayOther) >= OTHER_SENT
        },
    );
    let counters = datapath.counters().unwrap();
    let packets = |c: Counter| counters.get(&(0, c)).map(|v| v.packets).unwrap_or(0);
    assert_eq!(packets(Counter::UnderlayVxlan), VXLAN_SENT);
    assert_eq!(packets(Counter::UnderlayOther), OTHER_SENT);
    // No cluster VTEP is configured, so every VXLAN datagram is from an unknown VTEP.
    assert_eq!(packets(Counter::DropUnknownVtep), VXLAN_SENT);
    let frame_len = (14 + 20 + 8 + vxlan.len()) as u64;
    assert_eq!(
        counters[&(0, Counter::UnderlayVxlan)].bytes,
        VXLAN_SENT * frame_len
    );
    assert_eq!(counters.len(), 3, "unexpected counters: {counters:?}");

    host_b.run(|| datapath.detach_underlay()).unwrap();
}
