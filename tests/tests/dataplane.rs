//! The eBPF VXLAN data plane across simulated hosts: an underlay bridge, hosts as
//! namespaces each running the programs, containers as namespaces plumbed to them.
use std::time::Duration;

use overlay_common::{
    proto::{ETH_HLEN, LINUX_VXLAN_PORT, VXLAN_PORT},
    Counter,
};
use overlay_ctl::dataplane::{endpoint, underlay::DecapMode};
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
    scenario_with(DecapMode::Auto)
}

fn scenario_with(decap: DecapMode) -> Scenario {
    require_root();
    let underlay = Underlay::new();
    let mut hosts = cluster_with(&underlay, 3, decap);
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
    ping_everywhere(scenario());
}

/// The XDP decap hook (what `--decap auto` picks on NICs) on the same veth topology:
/// ping's checksums are finished in software, so it crosses a veth's XDP path intact.
#[test]
fn ping_with_xdp_decapsulation() {
    let s = scenario_with(DecapMode::Xdp);
    assert!(s.hosts[1].setup.decap_hook.starts_with("xdp"));
    ping_everywhere(s);
}

#[test]
fn auto_decap_on_a_veth_underlay_is_tc_ingress() {
    let s = scenario();
    for host in &s.hosts {
        assert_eq!(host.setup.decap_hook, "tc ingress", "{:?}", host.setup);
        assert!(host.setup.reason.contains("veth"), "{:?}", host.setup);
    }
}

/// A container detached from the data plane and attached again (an endpoint that left
/// the agent's desired state and came back) is reached again. Before Linux 6.6 its
/// veth keeps the clsact qdisc of the first attachment in between, which the second
/// must take as it is.
#[test]
fn a_container_detached_and_attached_again_is_reached_again() {
    let mut s = scenario();
    assert!(
        s.b1.ns.run(|| net::ping_until_reply(s.a1.ip, REPLY)),
        "cross-host ping b1 -> a1 before"
    );
    s.hosts[0].reattach(&s.a1);
    assert!(
        s.b1.ns.run(|| net::ping_until_reply(s.a1.ip, REPLY)),
        "cross-host ping b1 -> a1 after the container was attached again"
    );
    assert!(
        s.a1.ns.run(|| net::ping_until_reply(s.a2.ip, REPLY)),
        "same-host ping a1 -> a2 after"
    );
}

fn ping_everywhere(s: Scenario) {
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

/// How far below a full frame the decapsulated frames of a bulk transfer may average.
const MEAN_FRAME_SLACK: u64 = 16;

const QUIET: Duration = Duration::from_millis(800);

/// Sends `data` over TCP from `from` to `to` and returns what arrived (length, digest).
fn tcp_transfer(from: &Container, to: &Container, port: u16, data: &[u8]) -> (usize, u64) {
    let listener = to.ns.run(|| net::tcp_listen(to.ip, port));
    let receiver = to
        .ns
        .ns()
        .spawn(move || net::tcp_receive_all(&listener, Duration::from_secs(60)))
        .unwrap();
    from.ns
        .run(|| net::tcp_send_all(to.ip, port, data, Duration::from_secs(60)));
    receiver.join().unwrap().unwrap()
}

/// With the host's offloads as they come (a veth peer hands over skbs with checksums
/// still to be done and 64 KB GSO frames), TCP crosses hosts intact both ways and no
/// receiver drops a segment for a bad checksum.
#[test]
fn tcp_50_mb_across_hosts_arrives_intact() {
    let s = scenario();
    let data = net::pattern(50 * 1024 * 1024, 7);
    let expected = (data.len(), net::digest(&data));
    assert_eq!(
        tcp_transfer(&s.a1, &s.b1, 5001, &data),
        expected,
        "50 MB a1 -> b1 arrived with the same length and digest"
    );
    let back = net::pattern(4 * 1024 * 1024, 8);
    assert_eq!(
        tcp_transfer(&s.b1, &s.a1, 5002, &back),
        (back.len(), net::digest(&back)),
        "4 MB b1 -> a1 arrived with the same length and digest"
    );
    for c in [&s.a1, &s.b1] {
        assert_eq!(
            c.ns.run(net::checksum_errors),
            (0, 0),
            "TcpInCsumErrors/UdpInCsumErrors at {}",
            c.ip
        );
    }
    assert!(s.hosts[0].packets(100, Counter::Encapsulated) > 0);
    assert!(s.hosts[1].packets(100, Counter::Decapsulated) > 0);
}

/// The decapsulated 64 KB GSO skbs reach the receiving socket with nothing but headers
/// in their heads, so its TCP merges each into the one before it, as it does without
/// the overlay. Payload pulled into the head would make every skb an entry of its own in
/// the receive queue (`skb_try_coalesce` refuses a locked head holding data).
#[test]
fn decapsulated_tcp_is_coalesced_by_the_receiver() {
    /// At least one received segment in this many is coalesced.
    const MIN_COALESCED_SHARE: u64 = 10;
    let s = scenario();
    let counters = || {
        s.b1.ns
            .run(|| (net::tcp_receive_coalesced(), net::tcp_in_segments()))
    };
    let (coalesced_before, received_before) = counters();
    let data = net::pattern(50 * 1024 * 1024, 9);
    assert_eq!(
        tcp_transfer(&s.a1, &s.b1, 5003, &data),
        (data.len(), net::digest(&data)),
        "50 MB a1 -> b1 arrived with the same length and digest"
    );
    let (coalesced_after, received_after) = counters();
    let (coalesced, received) = (
        coalesced_after - coalesced_before,
        received_after - received_before,
    );
    // Typically three in four here; with payload in the heads only the odd small skb
    // copied into a tail's free room.
    assert!(
        coalesced * MIN_COALESCED_SHARE >= received,
        "the receiver coalesced {coalesced} of {received} segments"
    );
}

/// When the kernel cuts an encapsulated GSO packet into wire frames, each frame is as
/// large as the network's MTU allows: the inner TCP segment size is the container's,
/// fixed when the outer headers are added. Left to shrink by the headers' length, every
/// frame would carry 50 bytes less than the underlay takes.
///
/// Both hosts' underlays are made NICs without checksum (so without segmentation)
/// offload: the kernel segments and finishes checksums in software, as it does for such
/// a NIC, and the receiver decapsulates wire frames at XDP, as on a NIC.
#[test]
fn tunnel_frames_of_bulk_tcp_fill_the_network_mtu() {
    let s = scenario_with(DecapMode::Xdp);
    for host in &s.hosts[..2] {
        host.ns
            .run(|| endpoint::set_tx_checksum(&host.underlay.name, false))
            .expect("turn TX checksum offload off on a host's underlay");
    }
    let vni = s.a1.network.vni;
    let before = s.hosts[1].counter(vni, Counter::Decapsulated);
    let data = net::pattern(20 * 1024 * 1024, 10);
    assert_eq!(
        tcp_transfer(&s.a1, &s.b1, 5004, &data),
        (data.len(), net::digest(&data)),
        "20 MB a1 -> b1 arrived with the same length and digest"
    );
    let after = s.hosts[1].counter(vni, Counter::Decapsulated);
    let (packets, bytes) = (after.packets - before.packets, after.bytes - before.bytes);
    // Decapsulated bytes are inner Ethernet frames: at most the network MTU plus the
    // Ethernet header. Payload only, 20 MB is at least this many full frames.
    let full_frame = u64::from(s.a1.network.info().mtu) + ETH_HLEN as u64;
    assert!(
        packets * full_frame >= bytes && packets as usize >= data.len() / full_frame as usize,
        "{packets} frames, {bytes} bytes"
    );
    // A few frames end a GSO packet short, and a few carry only handshake or FIN.
    let mean = bytes / packets;
    assert!(
        mean + MEAN_FRAME_SLACK >= full_frame,
        "decapsulated frames average {mean} bytes ({packets} frames), the network \
         MTU allows {full_frame}"
    );
}

/// UDP from sockets (checksum left to "hardware" on the veth) arrives with valid
/// checksums across hosts.
#[test]
fn udp_across_hosts_arrives_with_valid_checksums() {
    let s = scenario();
    const PORT: u16 = 5003;
    const COUNT: usize = 50;
    let payload = net::pattern(1200, 9);
    let socket =
        s.b1.ns
            .run(|| std::net::UdpSocket::bind((s.b1.ip, PORT)).unwrap());
    let expected = payload.clone();
    let receiver =
        s.b1.ns
            .ns()
            .spawn(move || {
                net::udp_receive_matching(&socket, &expected, COUNT, Duration::from_secs(10))
            })
            .unwrap();
    // The first datagrams may wait for ARP; send until the receiver has all it needs.
    let dst = std::net::SocketAddrV4::new(s.b1.ip, PORT);
    s.a1.ns
        .run(|| net::udp_send_payload(s.a1.ip, dst, &payload, COUNT * 2));
    let received = receiver.join().unwrap().unwrap();
    assert!(
        received >= COUNT,
        "{received} of {COUNT} datagrams arrived intact"
    );
    assert_eq!(s.b1.ns.run(net::checksum_errors), (0, 0));
}

#[test]
fn other_networks_are_unreachable() {
    let s = scenario();
    assert!(
        !s.a1.ns.run(|| net::ping(s.other.ip, 1, 56, QUIET)),
        "net1 must not reach net2"
    );
    assert!(
        !s.other.ns.run(|| net::ping(s.a1.ip, 1, 56, QUIET)),
        "net2 must not reach net1"
    );
    assert!(s.hosts[0].packets(100, Counter::DropCrossNetwork) >= 1);
    assert!(s.hosts[2].packets(200, Counter::DropCrossNetwork) >= 1);
    // Nothing of net1 ever reached net2's host as a delivery.
    assert_eq!(s.hosts[2].packets(200, Counter::Decapsulated), 0);
}

#[test]
fn spoofed_source_is_dropped() {
    let s = scenario();
    // Resolve b1 first, so the spoofed datagram leaves with a valid destination MAC.
    assert!(s.a1.ns.run(|| net::ping_until_reply(s.b1.ip, REPLY)));
    let sink =
        s.b1.ns
            .run(|| std::net::UdpSocket::bind((s.b1.ip, 6000)).unwrap());
    sink.set_read_timeout(Some(QUIET)).unwrap();
    let spoofed = s.a1.network.address(99);
    s.a1.ns
        .run(|| net::raw_udp_send(spoofed, s.b1.ip, 6000, b"spoofed"));
    let mut buf = [0u8; 64];
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "a spoofed datagram arrived"
    );
    assert_eq!(s.hosts[0].packets(100, Counter::DropSpoofed), 1);
    // The real address still works.
    s.a1.ns
        .run(|| net::raw_udp_send(s.a1.ip, s.b1.ip, 6000, b"genuine"));
    let (n, _) = sink
        .recv_from(&mut buf)
        .expect("the genuine datagram arrives");
    assert_eq!(&buf[..n], b"genuine");
}

#[test]
fn vxlan_from_unknown_vtep_or_with_unknown_vni_is_dropped() {
    let s = scenario();
    let host2 = &s.hosts[1];
    let inner = overlay_tests::frames::inner_udp_frame(s.b1.mac, s.a1.mac, s.a1.ip, s.b1.ip, b"x");
    let flag_i = overlay_common::proto::VXLAN_FLAG_I;
    let to_host2 = std::net::SocketAddrV4::new(host2.vtep, overlay_common::proto::VXLAN_PORT);

    // An intruder on the underlay that is not a cluster member.
    let (intruder, _) = s._underlay.plug("intr", 9);
    let payload = overlay_tests::frames::vxlan_payload(flag_i, 100, &inner);
    intruder.run(|| net::udp_send_payload(Underlay::host_address(9), to_host2, &payload, 5));
    // A cluster member, but a VNI nobody created.
    let unknown = overlay_tests::frames::vxlan_payload(flag_i, 999, &inner);
    s.hosts[0]
        .ns
        .run(|| net::udp_send_payload(s.hosts[0].vtep, to_host2, &unknown, 3));
    // A cluster member, a known VNI, but the I flag unset.
    let no_flag = overlay_tests::frames::vxlan_payload(0, 100, &inner);
    s.hosts[0]
        .ns
        .run(|| net::udp_send_payload(s.hosts[0].vtep, to_host2, &no_flag, 2));

    wait_until("the drops to be counted", REPLY, || {
        host2.packets(0, Counter::DropUnknownVtep) >= 5
            && host2.packets(0, Counter::DropUnknownVni) >= 3
            && host2.packets(0, Counter::DropMalformed) >= 2
    });
    assert_eq!(host2.packets(0, Counter::DropUnknownVtep), 5);
    assert_eq!(host2.packets(0, Counter::DropUnknownVni), 3);
    assert_eq!(host2.packets(0, Counter::DropMalformed), 2);
    assert_eq!(host2.packets(100, Counter::Decapsulated), 0);
}

#[test]
fn counters_equal_the_traffic_sent() {
    let s = scenario();
    assert!(s.a1.ns.run(|| net::ping_until_reply(s.b1.ip, REPLY)));
    let (host1, host2) = (&s.hosts[0], &s.hosts[1]);
    let encap_before = host1.packets(100, Counter::Encapsulated);
    let decap_before = host2.packets(100, Counter::Decapsulated);
    const SENT: usize = 200;
    let sink =
        s.b1.ns
            .run(|| std::net::UdpSocket::bind((s.b1.ip, 6001)).unwrap());
    sink.set_read_timeout(Some(REPLY)).unwrap();
    // Bursts of ten, each received before the next: the point is exact accounting, not
    // how deep the queues are.
    const BURST: usize = 10;
    let mut buf = [0u8; 256];
    for burst in 0..SENT / BURST {
        s.a1.ns.run(|| {
            net::udp_send(
                s.a1.ip,
                std::net::SocketAddrV4::new(s.b1.ip, 6001),
                BURST,
                100,
            )
        });
        for i in 0..BURST {
            sink.recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {} of {SENT} lost: {e}", burst * BURST + i));
        }
    }
    assert_eq!(
        host1.packets(100, Counter::Encapsulated) - encap_before,
        SENT as u64
    );
    assert_eq!(
        host2.packets(100, Counter::Decapsulated) - decap_before,
        SENT as u64
    );
    for c in Counter::ALL.iter().filter(|c| c.is_drop()) {
        assert_eq!(
            host1.packets(100, *c) + host2.packets(100, *c),
            0,
            "unexpected {}",
            c.name()
        );
    }
}

#[test]
fn path_mtu_discovery_through_icmp_frag_needed() {
    let mut s = scenario();
    let net1 = s.a1.network;
    // Containers whose MTU ignores the VXLAN overhead (e.g. attached by hand): their
    // full-size DF packets cannot fit the underlay once encapsulated.
    let big_a = s.hosts[0].add_container_with_mtu(&net1, net1.address(20), UNDERLAY_MTU);
    let big_b = s.hosts[1].add_container_with_mtu(&net1, net1.address(21), UNDERLAY_MTU);
    let (v1, v2) = (s.hosts[0].vtep, s.hosts[1].vtep);
    s.hosts[1].add_remote(&big_a, v1);
    s.hosts[0].add_remote(&big_b, v2);

    // A DF ping that fits the container MTU but not the tunnel gets no echo reply...
    assert!(
        big_a.ns.run(|| net::ping_until_reply(big_b.ip, REPLY)),
        "small pings pass"
    );
    assert!(!big_a.ns.run(|| net::ping(big_b.ip, 900, 1472 - 8, QUIET)));
    assert!(
        s.hosts[0].packets(100, Counter::FragNeededSent) >= 1,
        "ICMP frag-needed was sent"
    );

    // ...and TCP still completes, after the stack learnt the path MTU from the ICMP.
    const PORT: u16 = 5002;
    let data = net::pattern(4 * 1024 * 1024, 11);
    let expected = (data.len(), net::digest(&data));
    let listener = big_b.ns.run(|| net::tcp_listen(big_b.ip, PORT));
    let receiver = big_b
        .ns
        .ns()
        .spawn(move || net::tcp_receive_all(&listener, Duration::from_secs(60)))
        .unwrap();
    big_a
        .ns
        .run(|| net::tcp_send_all(big_b.ip, PORT, &data, Duration::from_secs(60)));
    assert_eq!(receiver.join().unwrap().unwrap(), expected);
    assert_eq!(
        s.hosts[0].packets(100, Counter::DropMtuExceeded),
        0,
        "DF packets are never silently dropped"
    );
}

/// A Linux vxlan device on the default port (4789, the programs' default: no host's
/// port is set).
#[test]
fn frag_needed_carries_the_network_mtu_when_the_underlay_is_larger() {
    require_root();
    const JUMBO: u32 = 9000;
    let underlay = Underlay::new();
    let mut hosts: Vec<Host> = (1..=2)
        .map(|n| Host::with_underlay_mtu(&underlay, n, DecapMode::Auto, JUMBO))
        .collect();
    let vteps: Vec<_> = hosts.iter().map(|h| h.vtep).collect();
    let net1 = Network::new(100, "10.100.0.0/24");
    for host in &mut hosts {
        host.add_vteps(&vteps);
        host.add_network(&net1);
    }
    let network_mtu = net1.info().mtu;
    // Containers attached by hand with the underlay's MTU, not the network's: the
    // underlay could carry their large packets, the network (every receiver) not.
    let a = hosts[0].add_container_with_mtu(&net1, net1.address(2), JUMBO);
    let b = hosts[1].add_container_with_mtu(&net1, net1.address(3), JUMBO);
    hosts[0].add_remote(&b, vteps[1]);
    hosts[1].add_remote(&a, vteps[0]);
    assert!(a.ns.run(|| net::ping_until_reply(b.ip, REPLY)));

    // A DF packet one byte over the network's MTU is answered with frag-needed...
    let payload = (network_mtu + 1 - 28) as usize;
    assert!(!a.ns.run(|| net::ping(b.ip, 900, payload, QUIET)));
    assert!(hosts[0].packets(100, Counter::FragNeededSent) >= 1);
    // ...carrying the network's MTU: the stack's path MTU to b, hence its MSS, is it.
    const PORT: u16 = 5003;
    let listener = b.ns.run(|| net::tcp_listen(b.ip, PORT));
    let data = net::pattern(1024 * 1024, 5);
    let expected = (data.len(), net::digest(&data));
    let receiver = (b.ns.ns())
        .spawn(move || net::tcp_receive_all(&listener, Duration::from_secs(60)))
        .unwrap();
    let mss = a.ns.run(|| {
        let stream = std::net::TcpStream::connect((b.ip, PORT)).unwrap();
        let mss = net::tcp_mss(&stream);
        net::send_stream(stream, &data, Duration::from_secs(60)).unwrap();
        mss
    });
    assert!(
        mss <= network_mtu - 40,
        "MSS {mss} over a {network_mtu}-byte network"
    );
    assert_eq!(receiver.join().unwrap().unwrap(), expected);
    assert_eq!(hosts[0].packets(100, Counter::DropMtuExceeded), 0);
}

#[test]
fn interoperates_with_a_linux_vxlan_device() {
    interoperates_with_a_linux_vxlan_device_on(None);
}

/// The cluster on Linux's own default port, 8472, as flannel and Cilium use it: the
/// Linux device only sends to and listens on 8472, so every packet both ways went there.
#[test]
fn interoperates_with_a_linux_vxlan_device_on_8472() {
    interoperates_with_a_linux_vxlan_device_on(Some(LINUX_VXLAN_PORT));
}

/// Pings both ways and a TCP stream between a container and a host with a plain Linux
/// vxlan device, the cluster's port set to `port` (`None`: left at the default).
fn interoperates_with_a_linux_vxlan_device_on(port: Option<u16>) {
    let mut s = scenario();
    if let Some(port) = port {
        for host in &mut s.hosts {
            host.set_vxlan_port(port);
        }
    }
    let net1 = s.a1.network;
    // Host 4 runs no eBPF: a plain Linux vxlan device for VNI 100 with static entries.
    let (linux_host, linux_underlay) = s._underlay.plug("lnx", 4);
    let linux_vtep = Underlay::host_address(4);
    let linux_ip = net1.address(50);
    let (a1_ip, a1_mac, host1_vtep) = (s.a1.ip, s.a1.mac, s.hosts[0].vtep);
    let linux_port = port.unwrap_or(VXLAN_PORT);
    let vxlan = linux_host.block_on(|| async move {
        use overlay_ctl::dataplane::netlink;
        let handle = netlink::connect().unwrap();
        let vx = netlink::create_vxlan(
            &handle,
            "vx100",
            100,
            linux_vtep,
            linux_underlay.index,
            linux_port,
        )
        .await
        .unwrap();
        netlink::set_mtu(&handle, vx.index, 1450).await.unwrap();
        netlink::add_address(&handle, vx.index, linux_ip, 24)
            .await
            .unwrap();
        netlink::set_up(&handle, vx.index).await.unwrap();
        netlink::add_permanent_neighbour(&handle, vx.index, a1_ip, a1_mac)
            .await
            .unwrap();
        netlink::add_vxlan_fdb(&handle, vx.index, a1_mac, host1_vtep)
            .await
            .unwrap();
        netlink::link_by_name(&handle, "vx100").await.unwrap()
    });
    s.hosts[0].add_vteps(&[linux_vtep]);
    s.hosts[0].add_remote_endpoint(100, linux_ip, vxlan.mac, linux_vtep);

    assert!(
        s.a1.ns.run(|| net::ping_until_reply(linux_ip, REPLY)),
        "eBPF -> Linux vxlan"
    );
    assert!(
        linux_host.run(|| net::ping_until_reply(a1_ip, REPLY)),
        "Linux vxlan -> eBPF"
    );
    // And a stream, both ways over one connection.
    const PORT: u16 = 5003;
    let data = net::pattern(2 * 1024 * 1024, 5);
    let expected = (data.len(), net::digest(&data));
    let listener = linux_host.run(|| net::tcp_listen(linux_ip, PORT));
    let receiver = linux_host
        .ns()
        .spawn(move || net::tcp_receive_all(&listener, Duration::from_secs(60)))
        .unwrap();
    s.a1.ns
        .run(|| net::tcp_send_all(linux_ip, PORT, &data, Duration::from_secs(60)));
    assert_eq!(receiver.join().unwrap().unwrap(), expected);
    assert!(s.hosts[0].packets(100, Counter::Decapsulated) > 0);
    assert!(s.hosts[0].packets(100, Counter::Encapsulated) > 0);
}

/// The cluster's port changes on every host (the map write an agent's reconcile makes):
/// traffic goes on over the new port without a reload, and VXLAN sent to the old port
/// is the host's business like any UDP (counted as not VXLAN, never decapsulated).
#[test]
fn after_a_port_change_only_the_new_port_is_vxlan() {
    only_the_new_port_is_vxlan(DecapMode::Auto);
}

/// [`after_a_port_change_only_the_new_port_is_vxlan`] with the XDP decap hook.
#[test]
fn after_a_port_change_only_the_new_port_is_vxlan_at_xdp() {
    only_the_new_port_is_vxlan(DecapMode::Xdp);
}

fn only_the_new_port_is_vxlan(decap: DecapMode) {
    let mut s = scenario_with(decap);
    assert!(
        s.a1.ns.run(|| net::ping_until_reply(s.b1.ip, REPLY)),
        "cross-host ping on the default port"
    );
    for host in &mut s.hosts {
        host.set_vxlan_port(LINUX_VXLAN_PORT);
    }
    let (host1, host2) = (&s.hosts[0], &s.hosts[1]);
    let decap_before = host2.packets(100, Counter::Decapsulated);
    assert!(
        s.a1.ns.run(|| net::ping_until_reply(s.b1.ip, REPLY)),
        "cross-host ping after the change"
    );
    assert!(
        s.b1.ns.run(|| net::ping_until_reply(s.a1.ip, REPLY)),
        "and back"
    );
    assert!(host2.packets(100, Counter::Decapsulated) > decap_before);

    // Valid VXLAN from a cluster VTEP for b1: first to the old port, then to the new.
    const INNER_PORT: u16 = 7;
    const OLD_SENT: usize = 5;
    let sink =
        s.b1.ns
            .run(|| std::net::UdpSocket::bind((s.b1.ip, INNER_PORT)).unwrap());
    sink.set_read_timeout(Some(REPLY)).unwrap();
    let vxlan_for_b1 = |payload: &[u8]| {
        let inner =
            overlay_tests::frames::inner_udp_frame(s.b1.mac, s.a1.mac, s.a1.ip, s.b1.ip, payload);
        overlay_tests::frames::vxlan_payload(overlay_common::proto::VXLAN_FLAG_I, 100, &inner)
    };
    let to_host2 = |port| std::net::SocketAddrV4::new(host2.vtep, port);
    let other_before = host2.packets(0, Counter::UnderlayOther);
    let decap_before = host2.packets(100, Counter::Decapsulated);
    host1.ns.run(|| {
        net::udp_send_payload(
            host1.vtep,
            to_host2(VXLAN_PORT),
            &vxlan_for_b1(b"old"),
            OLD_SENT,
        );
        net::udp_send_payload(
            host1.vtep,
            to_host2(LINUX_VXLAN_PORT),
            &vxlan_for_b1(b"new"),
            1,
        );
    });
    // Same path, in order: had the old port been decapsulated, "old" would come first.
    let mut buf = [0u8; 64];
    let (n, _) = sink
        .recv_from(&mut buf)
        .expect("VXLAN to the new port reaches the container");
    assert_eq!(
        &buf[..n],
        b"new",
        "VXLAN to the old port reached the container"
    );
    sink.set_nonblocking(true).unwrap();
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "a second datagram arrived"
    );
    assert_eq!(host2.packets(100, Counter::Decapsulated) - decap_before, 1);
    assert!(
        host2.packets(0, Counter::UnderlayOther) - other_before >= OLD_SENT as u64,
        "VXLAN to the old port is counted as not VXLAN"
    );
    assert_eq!(host2.packets(0, Counter::DropMalformed), 0);
}
