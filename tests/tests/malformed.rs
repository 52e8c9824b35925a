//! Malformed and hostile input fed straight to the programs with `BPF_PROG_TEST_RUN`:
//! every header cut short, bad IHL, IP options, fragments, wrong VXLAN flags, random
//! bytes. Verdicts and counters are asserted; nothing may crash or go uncounted.
use std::{collections::BTreeMap, net::Ipv4Addr};

use overlay_common::{
    program_names, proto::*, Counter, EndpointKey, EndpointValue, LocalIface, MacAddr, NetworkInfo,
    UnderlayConfig, VtepInfo,
};
use overlay_ctl::dataplane::datapath::Datapath;
use overlay_tests::{frames, harness::*};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL_VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PEER_VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const VNI: u32 = 100;
const SENDER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
const RECEIVER: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 4);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const SENDER_MAC: MacAddr = MacAddr::new([2, 0x42, 10, 100, 0, 2]);
const RECEIVER_MAC: MacAddr = MacAddr::new([2, 0x42, 10, 100, 0, 4]);
const HOST_MAC: MacAddr = MacAddr::new([0xee, 0xee, 0, 0, 0, 1]);
/// `BPF_PROG_TEST_RUN` presents TC frames as received on loopback.
const LOOPBACK_IFINDEX: u32 = 1;

fn datapath(pins: &PinGuard) -> Datapath {
    require_root();
    let mut dp = Datapath::load(&pins.path).expect("load data plane");
    dp.set_underlay(&UnderlayConfig::new(
        LOOPBACK_IFINDEX,
        LOCAL_VTEP,
        1500,
        MacAddr::new([0xaa; 6]),
    ))
    .unwrap();
    dp.upsert_vtep(PEER_VTEP, &VtepInfo::remote()).unwrap();
    dp.upsert_network(
        VNI,
        &NetworkInfo::new(
            Ipv4Addr::new(10, 100, 0, 0),
            Ipv4Addr::new(255, 255, 255, 0),
            GATEWAY,
            1450,
        ),
    )
    .unwrap();
    dp.upsert_subnet("10.100.0.0/24".parse().unwrap(), VNI)
        .unwrap();
    dp.upsert_subnet("10.200.0.0/24".parse().unwrap(), 200)
        .unwrap();
    dp.upsert_endpoint(
        EndpointKey::new(VNI, RECEIVER),
        &EndpointValue::local(LOOPBACK_IFINDEX, RECEIVER_MAC),
    )
    .unwrap();
    dp.upsert_local_iface(
        LOOPBACK_IFINDEX,
        &LocalIface::new(VNI, SENDER, SENDER_MAC, HOST_MAC),
    )
    .unwrap();
    dp
}

fn inner_frame() -> Vec<u8> {
    frames::inner_udp_frame([0; 6], SENDER_MAC, SENDER, RECEIVER, b"payload")
}

/// A valid VXLAN frame from the peer VTEP; `ip_options` extra option bytes (multiple of 4).
fn vxlan_frame_with(flags: u8, vni: u32, inner: &[u8], ip_options: usize, frag: u16) -> Vec<u8> {
    let payload = frames::vxlan_payload(flags, vni, inner);
    let mut f = frames::ethernet([0xaa; 6], [0xbb; 6], ETH_P_IP);
    let mut ip = frames::ipv4_header(
        PEER_VTEP,
        LOCAL_VTEP,
        IPPROTO_UDP,
        UDP_HLEN + payload.len() + ip_options,
        frag,
    );
    if ip_options > 0 {
        ip[0] = IPV4_VERSION << 4 | (IPV4_IHL_MIN + (ip_options / 4) as u8);
        ip.extend(std::iter::repeat_n(1u8, ip_options)); // NOP options
        ip[10] = 0;
        ip[11] = 0;
        let c = frames::checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    f.extend(ip);
    f.extend(frames::udp_header(50000, VXLAN_PORT, payload.len()));
    f.extend(payload);
    f
}

fn valid_vxlan() -> Vec<u8> {
    vxlan_frame_with(VXLAN_FLAG_I, VNI, &inner_frame(), 0, IPV4_FLAG_DF)
}

/// Offset of the inner Ethernet header in `valid_vxlan()`.
const INNER: usize = ETH_HLEN + IPV4_HLEN_MIN + UDP_HLEN + VXLAN_HLEN;

struct Expect {
    counters: BTreeMap<(u32, Counter), u64>,
}

impl Expect {
    fn new() -> Self {
        Self {
            counters: BTreeMap::new(),
        }
    }
    fn add(&mut self, vni: u32, c: Counter) {
        *self.counters.entry((vni, c)).or_default() += 1;
    }
    fn check(&self, dp: &Datapath) {
        let actual: BTreeMap<(u32, Counter), u64> = dp
            .counters()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.packets))
            .collect();
        assert_eq!(actual, self.counters);
    }
}

#[test]
fn underlay_program_survives_malformed_frames() {
    let pins = PinGuard::new();
    let dp = datapath(&pins);
    let run = |frame: &[u8]| {
        dp.test_run(program_names::UNDERLAY_XDP, frame, 1)
            .expect("test run")
    };
    let mut expect = Expect::new();
    let underlay = 0;

    // The valid frame: decapsulated, delivered to the endpoint's MAC.
    let out = run(&valid_vxlan());
    assert_eq!(out.verdict, XDP_REDIRECT);
    let mut inner = inner_frame();
    inner[..6].copy_from_slice(&RECEIVER_MAC.octets());
    assert_eq!(out.frame, inner, "output is exactly the inner frame");
    expect.add(underlay, Counter::UnderlayVxlan);
    expect.add(VNI, Counter::Decapsulated);

    // IP options are legal: parsed past, still decapsulated.
    assert_eq!(
        run(&vxlan_frame_with(
            VXLAN_FLAG_I,
            VNI,
            &inner_frame(),
            8,
            IPV4_FLAG_DF
        ))
        .verdict,
        XDP_REDIRECT
    );
    expect.add(underlay, Counter::UnderlayVxlan);
    expect.add(VNI, Counter::Decapsulated);

    let valid = valid_vxlan();
    // Every header cut short: Ethernet-only IPv4, IPv4, UDP, VXLAN, inner Ethernet, inner IPv4.
    for (cut, vxlan_seen) in [
        (ETH_HLEN, false),
        (ETH_HLEN + 12, false),
        (ETH_HLEN + IPV4_HLEN_MIN + 4, false),
        (ETH_HLEN + IPV4_HLEN_MIN + UDP_HLEN + 4, false),
        (INNER + 6, true),
        (INNER + ETH_HLEN + 10, true),
    ] {
        assert_eq!(run(&valid[..cut]).verdict, XDP_DROP, "cut at {cut}");
        if vxlan_seen {
            expect.add(underlay, Counter::UnderlayVxlan);
            expect.add(VNI, Counter::DropMalformed);
        } else {
            expect.add(underlay, Counter::DropMalformed);
        }
    }

    // Bad IHL, and an IPv6 version nibble under the IPv4 ethertype.
    for first_byte in [0x44u8, 0x65] {
        let mut f = valid.clone();
        f[ETH_HLEN] = first_byte;
        assert_eq!(run(&f).verdict, XDP_DROP);
        expect.add(underlay, Counter::DropMalformed);
    }

    // Fragments are not VXLAN we can parse: left to the host.
    let frag = vxlan_frame_with(VXLAN_FLAG_I, VNI, &inner_frame(), 0, IPV4_FLAG_MF);
    assert_eq!(run(&frag).verdict, XDP_PASS);
    expect.add(underlay, Counter::UnderlayOther);

    // Wrong VXLAN flags, unknown VNI, inner frame not IPv4.
    assert_eq!(
        run(&vxlan_frame_with(
            0x00,
            VNI,
            &inner_frame(),
            0,
            IPV4_FLAG_DF
        ))
        .verdict,
        XDP_DROP
    );
    expect.add(underlay, Counter::UnderlayVxlan);
    expect.add(underlay, Counter::DropMalformed);
    assert_eq!(
        run(&vxlan_frame_with(
            VXLAN_FLAG_I,
            4242,
            &inner_frame(),
            0,
            IPV4_FLAG_DF
        ))
        .verdict,
        XDP_DROP
    );
    expect.add(underlay, Counter::UnderlayVxlan);
    expect.add(underlay, Counter::DropUnknownVni);
    let mut arp_inner = inner_frame();
    arp_inner[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    assert_eq!(
        run(&vxlan_frame_with(
            VXLAN_FLAG_I,
            VNI,
            &arp_inner,
            0,
            IPV4_FLAG_DF
        ))
        .verdict,
        XDP_DROP
    );
    expect.add(underlay, Counter::UnderlayVxlan);
    expect.add(VNI, Counter::DropMalformed);

    // Not for this node, and not IPv4 at all: the host's business.
    let mut elsewhere = valid.clone();
    elsewhere[ETH_HLEN + 19] = 3; // destination 192.0.2.3
    assert_eq!(run(&elsewhere).verdict, XDP_PASS);
    expect.add(underlay, Counter::UnderlayOther);
    let mut arp = valid.clone();
    arp[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    assert_eq!(run(&arp).verdict, XDP_PASS);
    expect.add(underlay, Counter::UnderlayOther);

    expect.check(&dp);

    // Random bytes and random corruptions of the valid frame: any verdict but a crash,
    // and every frame lands in exactly one verdict counter.
    let verdicts_before = verdict_total(&dp);
    let mut rng = frames::Xorshift::new(0x9e3779b97f4a7c15u64);
    let mut next = move || rng.next_u64();
    const RANDOM: u64 = 2000;
    for i in 0..RANDOM {
        let frame: Vec<u8> = if i % 2 == 0 {
            let len = 14 + (next() % 300) as usize;
            (0..len).map(|_| next() as u8).collect()
        } else {
            let mut f = valid.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % f.len();
                f[at] = next() as u8;
            }
            f.truncate(14 + (next() as usize) % (f.len() - 13));
            f
        };
        let verdict = run(&frame).verdict;
        assert!(
            [XDP_DROP, XDP_PASS, XDP_REDIRECT].contains(&verdict),
            "verdict {verdict}"
        );
    }
    assert_eq!(verdict_total(&dp) - verdicts_before, RANDOM);
}

/// Packets in every counter that is a final verdict (all but the VXLAN classification).
fn verdict_total(dp: &Datapath) -> u64 {
    dp.counters()
        .unwrap()
        .into_iter()
        .filter(|((_, c), _)| *c != Counter::UnderlayVxlan)
        .map(|(_, v)| v.packets)
        .sum()
}

fn container_udp(dst: Ipv4Addr) -> Vec<u8> {
    frames::inner_udp_frame(RECEIVER_MAC, SENDER_MAC, SENDER, dst, b"hello")
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut f = frames::ethernet([0xff; 6], SENDER_MAC, ETH_P_ARP);
    f.extend_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    f.extend_from_slice(&SENDER_MAC.octets());
    f.extend_from_slice(&SENDER.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

#[test]
fn container_program_survives_malformed_frames() {
    let pins = PinGuard::new();
    let dp = datapath(&pins);
    // The kernel's skb test-run refuses (EINVAL) IPv4 frames shorter than an IPv4
    // header before the program runs; `None` marks such a refusal. Truncated IPv4 is
    // covered by the XDP test, which has no such pre-check.
    let try_run = |frame: &[u8]| match dp.test_run(program_names::CONTAINER_TC, frame, 1) {
        Ok(outcome) => Some(outcome),
        Err(e) if format!("{e:?}").contains("code: 22") => None,
        Err(e) => panic!("test run of {} bytes {:02x?}: {e}", frame.len(), frame),
    };
    let run = |frame: &[u8]| try_run(frame).expect("the kernel ran the program");
    let mut expect = Expect::new();

    // Valid: to a local endpoint (switched), the world (host), another network (dropped).
    assert_eq!(run(&container_udp(RECEIVER)).verdict, TC_ACT_REDIRECT);
    expect.add(VNI, Counter::SwitchedLocal);
    assert_eq!(
        run(&container_udp(Ipv4Addr::new(198, 51, 100, 7))).verdict,
        TC_ACT_OK
    );
    expect.add(VNI, Counter::PassedToHost);
    assert_eq!(
        run(&container_udp(Ipv4Addr::new(10, 200, 0, 9))).verdict,
        TC_ACT_SHOT
    );
    expect.add(VNI, Counter::DropCrossNetwork);
    assert_eq!(
        run(&container_udp(Ipv4Addr::new(10, 100, 0, 77))).verdict,
        TC_ACT_SHOT
    );
    expect.add(VNI, Counter::DropNoEndpoint);

    // ARP for the gateway: answered in place with the host-side MAC.
    let out = run(&arp_request(GATEWAY));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    expect.add(VNI, Counter::ArpReply);
    assert_eq!(
        &out.frame[0..6],
        &SENDER_MAC.octets(),
        "reply goes back to the asker"
    );
    assert_eq!(&out.frame[6..12], &HOST_MAC.octets());
    assert_eq!(
        u16::from_be_bytes([out.frame[20], out.frame[21]]),
        ARP_OP_REPLY
    );
    assert_eq!(
        &out.frame[22..28],
        &HOST_MAC.octets(),
        "sender hardware address is the answer"
    );
    assert_eq!(&out.frame[28..32], &GATEWAY.octets());

    // Spoofed Ethernet source, spoofed IPv4 source.
    let mut f = container_udp(RECEIVER);
    f[6] ^= 0xff;
    assert_eq!(run(&f).verdict, TC_ACT_SHOT);
    expect.add(VNI, Counter::DropSpoofed);
    let mut f = container_udp(RECEIVER);
    f[ETH_HLEN + 15] = 99;
    assert_eq!(run(&f).verdict, TC_ACT_SHOT);
    expect.add(VNI, Counter::DropSpoofed);

    // Cut short and corrupt: IPv4 header, bad IHL, ARP body.
    let valid = container_udp(RECEIVER);
    assert!(
        try_run(&valid[..ETH_HLEN + 10]).is_none(),
        "the kernel pre-checks IPv4 length"
    );
    let mut bad_ihl = valid.clone();
    bad_ihl[ETH_HLEN] = 0x43;
    assert_eq!(run(&bad_ihl).verdict, TC_ACT_SHOT);
    expect.add(VNI, Counter::DropMalformed);
    assert_eq!(
        run(&arp_request(GATEWAY)[..ETH_HLEN + 20]).verdict,
        TC_ACT_SHOT
    );
    expect.add(VNI, Counter::DropMalformed);

    expect.check(&dp);

    let mut rng = frames::Xorshift::new(0x2545f4914f6cdd1du64);
    let mut next = move || rng.next_u64();
    let (mut ran, mut refused) = (0u64, 0u64);
    for i in 0..1000 {
        let frame: Vec<u8> = if i % 2 == 0 {
            let mut f = SENDER_MAC.octets().to_vec();
            f.splice(0..0, [0u8; 6]);
            f.extend((0..(next() % 200)).map(|_| next() as u8));
            f
        } else {
            let mut f = if i % 4 == 1 {
                valid.clone()
            } else {
                arp_request(GATEWAY)
            };
            let at = 12 + (next() as usize) % (f.len() - 12);
            f[at] = next() as u8;
            f.truncate(14 + (next() as usize) % (f.len() - 13));
            f
        };
        match try_run(&frame) {
            Some(out) => {
                ran += 1;
                assert!(
                    [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&out.verdict),
                    "verdict {}",
                    out.verdict
                );
            }
            None => refused += 1,
        }
    }
    assert!(
        ran > refused,
        "most random frames must reach the program ({ran} ran, {refused} refused)"
    );
    let counted: u64 = dp.counters().unwrap().values().map(|v| v.packets).sum();
    let before: u64 = expect.counters.values().sum();
    assert_eq!(
        counted - before,
        ran,
        "every frame the program saw is counted once"
    );
}
