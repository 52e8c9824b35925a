//! The responder for real: servers on loopback addresses (each a network's "gateway"),
//! queried over UDP and TCP with hickory's message codec; a second responder plays the
//! upstream resolver.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, Query, ResponseCode},
    rr::{rdata::A, Name, RData, RecordType},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};

use super::{
    container::{remove_netns_resolv_conf_under, write_netns_resolv_conf_under},
    forward::parse_nameservers,
    *,
};
use crate::store::{Endpoint, Network};

const NET1_GATEWAY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const NET2_GATEWAY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const UPSTREAM_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const DB: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 7);
const CORP_MAIL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 25);
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

fn names(subnet: &str, entries: &[(&str, Ipv4Addr)]) -> NetworkNames {
    let mut names = NetworkNames::new(subnet.parse().unwrap());
    for (name, address) in entries {
        names.insert(name, *address);
    }
    names
}

/// net1 (web) and net2 (db) on 127.0.0.2 and 127.0.0.3, forwarding to `upstreams`.
async fn two_networks(upstreams: Vec<SocketAddr>) -> (DnsServer, SocketAddr, SocketAddr) {
    let directory = DnsDirectory::new();
    directory.set_network("net1", names("10.1.0.0/24", &[("web", WEB)]));
    directory.set_network("net2", names("10.2.0.0/24", &[("db", DB)]));
    let config = DnsConfig {
        port: 0,
        upstreams: Upstreams::new(upstreams),
    };
    let server = DnsServer::new(directory, config);
    let net1 = server.listen("net1", NET1_GATEWAY).await.unwrap();
    let net2 = server.listen("net2", NET2_GATEWAY).await.unwrap();
    (server, net1, net2)
}

fn query(name: &str, record_type: RecordType) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    message.metadata.recursion_desired = true;
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    message.edns = Some(edns);
    message
}

async fn ask(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
    try_ask(server, name, record_type).await.unwrap()
}

async fn try_ask(
    server: SocketAddr,
    name: &str,
    record_type: RecordType,
) -> std::io::Result<Message> {
    let question = query(name, record_type);
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    socket.connect(server).await?;
    socket.send(&question.to_vec().unwrap()).await?;
    let mut buffer = vec![0u8; 4096];
    let len = timeout(ANSWER_DEADLINE, socket.recv(&mut buffer))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let answer = Message::from_vec(&buffer[..len]).unwrap();
    assert_eq!(answer.metadata.id, question.metadata.id);
    Ok(answer)
}

fn addresses(answer: &Message) -> Vec<Ipv4Addr> {
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(address)) => Some(*address),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn names_resolve_bare_and_with_the_network() {
    let (server, net1, _) = two_networks(Vec::new()).await;
    for name in ["web.", "web.net1.", "WEB.Net1."] {
        let answer = ask(net1, name, RecordType::A).await;
        assert_eq!(
            answer.edns.as_ref().map(Edns::max_payload),
            Some(1232),
            "EDNS echoed"
        );
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert_eq!(addresses(&answer), [WEB], "{name}");
        assert!(answer.metadata.authoritative);
    }
    // A known name without an address of the asked type: NODATA, not NXDOMAIN.
    let aaaa = ask(net1, "web.", RecordType::AAAA).await;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty());
    assert_eq!(server.counters().answered, 4);
    server.shutdown().await;
}

#[tokio::test]
async fn a_network_cannot_resolve_another_networks_names() {
    let (server, net1, net2) = two_networks(Vec::new()).await;
    for name in ["db.", "db.net2."] {
        let from_net1 = ask(net1, name, RecordType::A).await;
        assert_eq!(
            from_net1.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(from_net1.answers.is_empty());
    }
    assert_eq!(addresses(&ask(net2, "db.", RecordType::A).await), [DB]);
    let web_from_net2 = ask(net2, "web.net1.", RecordType::A).await;
    assert_eq!(web_from_net2.metadata.response_code, ResponseCode::NXDomain);
    // Reverse names of another network's addresses are not told either.
    let reverse = ask(net2, "5.0.1.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(reverse.metadata.response_code, ResponseCode::NXDomain);
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_names_are_nxdomain_and_counted() {
    let (server, net1, _) = two_networks(Vec::new()).await;
    for name in ["nosuch.", "nosuch.net1."] {
        let answer = ask(net1, name, RecordType::A).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
    }
    let counters = server.counters();
    assert_eq!(
        (counters.nxdomain, counters.answered, counters.forwarded),
        (2, 0, 0)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn ptr_gives_the_name_with_the_network() {
    let (server, net1, _) = two_networks(Vec::new()).await;
    let answer = ask(net1, "5.0.1.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    let targets: Vec<String> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(ptr) => Some(ptr.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(targets, ["web.net1."]);
    let free = ask(net1, "99.0.1.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(free.metadata.response_code, ResponseCode::NXDomain);
    server.shutdown().await;
}

#[tokio::test]
async fn a_removed_name_stops_resolving_at_once() {
    let (server, net1, _) = two_networks(Vec::new()).await;
    assert_eq!(addresses(&ask(net1, "web.", RecordType::A).await), [WEB]);
    server
        .directory()
        .set_network("net1", names("10.1.0.0/24", &[]));
    let gone = ask(net1, "web.", RecordType::A).await;
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
    server.shutdown().await;
}

#[tokio::test]
async fn other_names_are_forwarded_to_the_upstream() {
    // The upstream: another responder, serving a network "corp" on its own address.
    let upstream_directory = DnsDirectory::new();
    upstream_directory.set_network("corp", names("192.0.2.0/24", &[("mail", CORP_MAIL)]));
    let upstream = DnsServer::new(
        upstream_directory,
        DnsConfig {
            port: 0,
            upstreams: Upstreams::new(Vec::new()),
        },
    );
    let upstream_address = upstream.listen("corp", UPSTREAM_ADDRESS).await.unwrap();
    let (server, net1, _) = two_networks(vec![upstream_address]).await;

    let answer = ask(net1, "mail.corp.", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&answer), [CORP_MAIL]);
    let missing = ask(net1, "nosuch.corp.", RecordType::A).await;
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(server.counters().forwarded, 2);
    assert_eq!(upstream.counters().answered, 1);
    assert_eq!(upstream.counters().nxdomain, 1);

    upstream.shutdown().await;
    let failed = ask(net1, "mail.corp.", RecordType::A).await;
    assert_eq!(failed.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(server.counters().failed, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn answers_over_tcp() {
    let (server, net1, _) = two_networks(Vec::new()).await;
    let question = query("web.net1.", RecordType::A).to_vec().unwrap();
    let mut stream = TcpStream::connect(net1).await.unwrap();
    let length = u16::try_from(question.len()).unwrap();
    stream.write_all(&length.to_be_bytes()).await.unwrap();
    stream.write_all(&question).await.unwrap();
    let answer = timeout(ANSWER_DEADLINE, async {
        let length = stream.read_u16().await.unwrap();
        let mut buffer = vec![0u8; usize::from(length)];
        stream.read_exact(&mut buffer).await.unwrap();
        Message::from_vec(&buffer).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(addresses(&answer), [WEB]);
    server.shutdown().await;
}

#[tokio::test]
async fn listeners_follow_the_networks() {
    let (server, net1, net2) = two_networks(Vec::new()).await;
    let wanted = BTreeMap::from([(NET1_GATEWAY, "net1".to_owned())]);
    assert!(server.set_listeners(&wanted).await.is_empty());
    assert_eq!(server.listening().await, wanted);
    // net1 still answers on the same socket; net2's address no longer does.
    assert_eq!(addresses(&ask(net1, "web.", RecordType::A).await), [WEB]);
    assert!(try_ask(net2, "db.", RecordType::A).await.is_err());
    assert!(!server.stop(NET2_GATEWAY).await);
    server.shutdown().await;
    assert!(server.listening().await.is_empty());
}

#[test]
fn the_directory_follows_the_store_records() {
    let network = |name: &str, subnet: &str, gateway: &str| -> Network {
        serde_json::from_value(json!({
            "name": name, "subnet": subnet, "gateway": gateway, "vni": 1, "mtu": 1450,
        }))
        .unwrap()
    };
    let endpoint = |network: &str, ip: &str, id: &str| -> Endpoint {
        serde_json::from_value(json!({
            "id": id, "network": network, "ip": ip,
            "mac": "02:00:00:00:00:01", "node": "n1", "vtep": "192.168.0.1",
            "ifname": "eth0", "container": "sleep 100",
        }))
        .unwrap()
    };
    let directory = DnsDirectory::new();
    directory.replace_from_records(
        &[network("net1", "10.1.0.0/24", "10.1.0.1")],
        &[
            endpoint("net1", "10.1.0.5", "Web"),
            endpoint("net1", "10.1.0.6", "dotted.name"),
            endpoint("gone", "10.9.0.6", "orphan"),
        ],
    );
    assert_eq!(directory.networks(), ["net1"]);
    assert_eq!(directory.resolve("net1", "web"), Resolution::Address(WEB));
    // The record's `container` (a command) is a description, not a name.
    assert_eq!(directory.resolve("net1", "sleep"), Resolution::NotFound);
    assert_eq!(directory.resolve("net1", "orphan"), Resolution::NotFound);
    assert_eq!(
        directory.resolve("net1", "example.com."),
        Resolution::Outside
    );
    // A dotted ID is not served (it would read as NAME.NETWORK).
    assert_eq!(
        directory.resolve_reverse("net1", IpAddr::V4(Ipv4Addr::new(10, 1, 0, 6))),
        Resolution::NotFound
    );
    // Only the served networks' names are kept; the others still count as overlay names.
    let both = [
        network("net1", "10.1.0.0/24", "10.1.0.1"),
        network("net2", "10.2.0.0/24", "10.2.0.1"),
    ];
    let records = [
        endpoint("net1", "10.1.0.5", "web"),
        endpoint("net2", "10.2.0.5", "db"),
    ];
    directory.replace_served(&both, &records, |n| n == "net2");
    assert_eq!(directory.resolve("net1", "web"), Resolution::NotFound);
    assert_eq!(directory.resolve("net1", "web.net1"), Resolution::NotFound);
    assert_eq!(
        directory.resolve("net2", "db"),
        Resolution::Address(Ipv4Addr::new(10, 2, 0, 5))
    );
    assert_eq!(
        directory.resolve_reverse("net2", IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5))),
        Resolution::NotFound
    );
    directory.replace_from_records(&[], &[]);
    assert_eq!(directory.resolve("net1", "web.net1"), Resolution::Outside);
}

#[test]
fn upstreams_come_from_resolv_conf_without_loopback_stubs() {
    let text = "# comment\nnameserver 127.0.0.53\nsearch lan\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n";
    let parsed: Vec<String> = parse_nameservers(text)
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(parsed, ["127.0.0.53", "10.0.0.2", "fe80::1"]);

    let dir = scratch_dir("upstreams");
    let resolv = dir.join("resolv.conf");
    let resolved = dir.join("resolved.conf");
    std::fs::write(&resolv, text).unwrap();
    let chosen = Upstreams::from_files(&resolv, &resolved).unwrap();
    let expected: Vec<SocketAddr> = vec![
        "10.0.0.2:53".parse().unwrap(),
        "[fe80::1]:53".parse().unwrap(),
    ];
    assert_eq!(chosen.servers, expected);

    // Only a stub: systemd-resolved's upstreams, or the stub itself when there are none.
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let stub_only = Upstreams::from_files(&resolv, &resolved).unwrap();
    assert_eq!(
        stub_only.servers,
        ["127.0.0.53:53".parse::<SocketAddr>().unwrap()]
    );
    std::fs::write(&resolved, "nameserver 192.0.2.53\n").unwrap();
    let behind_stub = Upstreams::from_files(&resolv, &resolved).unwrap();
    assert_eq!(
        behind_stub.servers,
        ["192.0.2.53:53".parse::<SocketAddr>().unwrap()]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn container_resolv_conf_is_written_and_removed() {
    let root = scratch_dir("netns-etc");
    let dns = ContainerDns::new(Ipv4Addr::new(10, 1, 0, 1), "net1");
    let path = write_netns_resolv_conf_under(&root, "ctr1", &dns).unwrap();
    assert_eq!(path, root.join("ctr1/resolv.conf"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("nameserver 10.1.0.1\n"), "{text}");
    assert!(text.contains("search net1\n"), "{text}");
    remove_netns_resolv_conf_under(&root, "ctr1").unwrap();
    assert!(!root.join("ctr1").exists());
    remove_netns_resolv_conf_under(&root, "ctr1").unwrap();
    for bad in ["", "..", "a/b"] {
        assert!(
            write_netns_resolv_conf_under(&root, bad, &dns).is_err(),
            "{bad:?}"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();

    assert_eq!(
        cni_dns(&dns),
        json!({"nameservers": ["10.1.0.1"], "domain": "net1", "search": ["net1"]})
    );
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("overlay-dns-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
