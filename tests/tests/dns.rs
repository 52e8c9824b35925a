//! The DNS responder where it will run: inside a node's namespace on port 53 of a
//! network's gateway address, that address on the container's host veth as the agent's
//! endpoint plumbing puts it, asked by the C library of a container that got its
//! resolv.conf the `ip netns` way.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    sync::mpsc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query, ResponseCode},
    rr::{rdata::A, Name, RData, RecordType},
};
use overlay_ctl::{
    agent::dns::{
        remove_netns_resolv_conf, write_netns_resolv_conf, ContainerDns, DnsConfig, DnsDirectory,
        DnsServer, NetworkNames, Upstreams,
    },
    dataplane::netlink,
};
use overlay_tests::harness::{require_root, unique_name, TestNs};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 5);
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// The responder on a runtime of its own, on a thread inside `node`; stopped on drop.
struct Responder {
    directory: DnsDirectory,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Responder {
    fn start(node: &TestNs, directory: DnsDirectory) -> Self {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = directory.clone();
        let thread = node
            .ns()
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let server = DnsServer::new(shared, DnsConfig::new(Upstreams::new(Vec::new())));
                    ready_tx
                        .send(
                            server
                                .listen("net1", GATEWAY)
                                .await
                                .map_err(|e| e.to_string()),
                        )
                        .unwrap();
                    let _ = stopped.await;
                    server.shutdown().await;
                })
            })
            .expect("responder thread in the node namespace");
        let bound = ready_rx
            .recv()
            .unwrap()
            .expect("listen on the gateway address");
        assert_eq!(bound, SocketAddr::from((GATEWAY, 53)));
        Self {
            directory,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn configure_container(container: &TestNs, peer_name: String) {
    container.block_on(|| async move {
        let handle = netlink::connect().unwrap();
        let peer = netlink::link_by_name(&handle, &peer_name).await.unwrap();
        netlink::add_address(&handle, peer.index, WEB, 24)
            .await
            .unwrap();
        netlink::set_up(&handle, peer.index).await.unwrap();
    });
}

fn ask(container: &TestNs, name: &str) -> Message {
    let name = name.to_owned();
    container.run(move || {
        let mut question = Message::query();
        question.add_query(Query::query(
            Name::from_ascii(&name).unwrap(),
            RecordType::A,
        ));
        question.metadata.recursion_desired = true;
        let socket = UdpSocket::bind((WEB, 0)).unwrap();
        socket.set_read_timeout(Some(ANSWER_DEADLINE)).unwrap();
        socket
            .send_to(&question.to_vec().unwrap(), (GATEWAY, 53))
            .unwrap();
        let mut buffer = [0u8; 1500];
        let len = socket
            .recv(&mut buffer)
            .expect("an answer from the gateway");
        Message::from_vec(&buffer[..len]).unwrap()
    })
}

/// `ip netns exec NETNS getent hosts NAME`: the container's C library with the
/// resolv.conf `ip netns exec` bind-mounts from /etc/netns/NETNS.
fn getent_hosts(netns: &str, name: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "getent", "hosts", name])
        .output()
        .expect("run ip netns exec");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_container_resolves_its_networks_names_through_the_gateway() {
    require_root();
    let node = TestNs::new("dnsn");
    let container = TestNs::new("dnsc");
    let directory = DnsDirectory::new();
    let mut names = NetworkNames::new("10.1.0.0/24".parse().unwrap());
    names.insert("web", WEB);
    directory.set_network("net1", names);
    // Listening before the gateway address exists on the node (IP_FREEBIND).
    let responder = Responder::start(&node, directory);
    plug_container(&node, &container);

    let answer = ask(&container, "web.net1.");
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    let addresses: Vec<Ipv4Addr> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(address)) => Some(*address),
            _ => None,
        })
        .collect();
    assert_eq!(addresses, [WEB]);

    let dns = ContainerDns::new(GATEWAY, "net1");
    let path = write_netns_resolv_conf(container.name(), &dns).unwrap();
    let _cleanup = ResolvConfGuard(container.name().to_owned());
    assert!(path.exists());
    let found = getent_hosts(container.name(), "web").expect("web resolves in the container");
    assert!(found.starts_with("10.1.0.5 "), "{found}");
    assert_eq!(getent_hosts(container.name(), "nosuch"), None);

    let mut emptied = NetworkNames::new("10.1.0.0/24".parse().unwrap());
    emptied.names.clear();
    responder.directory.set_network("net1", emptied);
    assert_eq!(
        getent_hosts(container.name(), "web"),
        None,
        "a removed name still resolves"
    );
    assert_eq!(
        ask(&container, "web.").metadata.response_code,
        ResponseCode::NXDomain
    );
}

struct ResolvConfGuard(String);

impl Drop for ResolvConfGuard {
    fn drop(&mut self) {
        let _ = remove_netns_resolv_conf(&self.0);
    }
}

/// The container's veth: the gateway /32 and a /32 route on the node's end, as the
/// agent's endpoint plumbing does; the container's address on the other end.
fn plug_container(node: &TestNs, container: &TestNs) {
    let host_name = unique_name("dnsh");
    let peer_name = unique_name("dnsp");
    let ctr_file = container.ns().file().try_clone().unwrap();
    let peer = peer_name.clone();
    node.block_on(|| async move {
        let handle = netlink::connect().unwrap();
        let (host, peer) = netlink::create_veth(&handle, &host_name, &peer)
            .await
            .unwrap();
        netlink::move_to_netns(&handle, peer.index, &ctr_file)
            .await
            .unwrap();
        netlink::add_address(&handle, host.index, GATEWAY, 32)
            .await
            .unwrap();
        netlink::set_up(&handle, host.index).await.unwrap();
        netlink::replace_link_route(&handle, WEB, 32, host.index, Some(GATEWAY))
            .await
            .unwrap();
    });
    configure_container(container, peer_name);
}
