//! The DNS responder where it runs: inside a node's namespace on port 53 of a network's
//! gateway address, that address on the container's host veth as the agent's endpoint
//! plumbing puts it, asked by the C library of a container that got its resolv.conf the
//! `ip netns` way; then end to end, agents in a cluster serving `run` containers' names
//! across hosts and forwarding the rest to a resolver in an outside namespace.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{
        rdata::{A, PTR},
        Name, RData, Record, RecordType,
    },
};
use overlay_ctl::{
    agent::dns::{
        remove_netns_resolv_conf, write_netns_resolv_conf, ContainerDns, DnsConfig, DnsDirectory,
        DnsServer, NetworkNames, Upstreams,
    },
    dataplane::netlink,
};
use overlay_tests::{
    bins,
    cluster::{start_cluster, Background, Bins, Node},
    harness::{require_root, unique_name, wait_until, TestNs},
    topology::Underlay,
};

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
    container.run(move || exchange(WEB, GATEWAY, &name, RecordType::A))
}

/// One query for `name` (`kind`) from `source` to `server`:53, in the calling thread's
/// namespace, and its answer.
fn exchange(source: Ipv4Addr, server: Ipv4Addr, name: &str, kind: RecordType) -> Message {
    let mut question = Message::query();
    question.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    question.metadata.recursion_desired = true;
    let socket = UdpSocket::bind((source, 0)).unwrap();
    socket.set_read_timeout(Some(ANSWER_DEADLINE)).unwrap();
    socket
        .send_to(&question.to_vec().unwrap(), (server, 53))
        .unwrap();
    let mut buffer = [0u8; 1500];
    let len = socket
        .recv(&mut buffer)
        .expect("an answer from the gateway");
    Message::from_vec(&buffer[..len]).unwrap()
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

// ---- End to end: agents serving names in a cluster -------------------------------------

const BINS: Bins = bins!();
/// A removed container's name must stop resolving within this long.
const FORGET_DEADLINE: Duration = Duration::from_secs(1);
/// The outside resolver's host number on the underlay (nodes are 1 and 2).
const OUTSIDE_HOST: u8 = 9;
/// The only name the outside resolver knows, and its address.
const OUTSIDE_NAME: &str = "www.example.test.";
const OUTSIDE_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const NET1_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const NET2_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// A fixed-answer resolver on port 53 of an outside namespace (not a node): A for
/// [`OUTSIDE_NAME`], NXDOMAIN for everything else. Stopped on drop.
struct OutsideResolver {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    asked: Arc<AtomicU64>,
}

impl OutsideResolver {
    fn start(host: &TestNs, address: Ipv4Addr) -> Self {
        let socket = host
            .run(|| UdpSocket::bind((address, 53)))
            .expect("bind the outside resolver");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicU64::new(0));
        let (stopping, counting) = (stop.clone(), asked.clone());
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 1500];
            while !stopping.load(Ordering::Relaxed) {
                let Ok((len, client)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                let Ok(question) = Message::from_vec(&buffer[..len]) else {
                    continue;
                };
                counting.fetch_add(1, Ordering::Relaxed);
                let answer = fixed_answer(&question);
                let _ = socket.send_to(&answer.to_vec().unwrap(), client);
            }
        });
        Self {
            stop,
            thread: Some(thread),
            asked,
        }
    }
}

fn fixed_answer(question: &Message) -> Message {
    let mut answer = Message::query();
    answer.metadata.id = question.metadata.id;
    answer.metadata.message_type = MessageType::Response;
    answer.metadata.recursion_available = true;
    for query in &question.queries {
        answer.add_query(query.clone());
        if query.name().to_ascii() == OUTSIDE_NAME && query.query_type() == RecordType::A {
            let data = RData::A(A(OUTSIDE_ADDRESS));
            answer.add_answer(Record::from_rdata(query.name().clone(), 60, data));
        } else {
            answer.metadata.response_code = ResponseCode::NXDomain;
        }
    }
    answer
}

impl Drop for OutsideResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Asks `server` for `name` (`kind`) from inside a `run` container's namespace.
fn ask_from(container: &Background, server: Ipv4Addr, name: &str, kind: RecordType) -> Message {
    wait_until(
        &format!("container namespace {}", container.netns),
        Duration::from_secs(15),
        || container.open_netns().is_some(),
    );
    let name = name.to_owned();
    container
        .open_netns()
        .unwrap()
        .run(move || exchange(Ipv4Addr::UNSPECIFIED, server, &name, kind))
        .unwrap()
}

fn a_records(answer: &Message) -> Vec<Ipv4Addr> {
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(address)) => Some(*address),
            _ => None,
        })
        .collect()
}

fn ptr_records(answer: &Message) -> Vec<String> {
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(PTR(name)) => Some(name.to_ascii()),
            _ => None,
        })
        .collect()
}

/// The reverse name of an IPv4 address (`5.0.100.10.in-addr.arpa.`).
fn reverse_name(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
}

fn metric(node: &Node, series: &str) -> Option<u64> {
    node.metrics()?
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// `client` (net1) gets web's A records for `NAME` and `NAME.NETWORK`, its PTR, and
/// NXDOMAIN for an unknown name; `stranger` (net2) gets NXDOMAIN for both of web's names.
fn assert_names_of_the_asking_network(
    client: &Background,
    stranger: &Background,
    web_name: &str,
    web_ip: Ipv4Addr,
) {
    let short = ask_from(client, NET1_GATEWAY, &format!("{web_name}."), RecordType::A);
    assert_eq!(a_records(&short), [web_ip], "{short:?}");
    let qualified = ask_from(
        client,
        NET1_GATEWAY,
        &format!("{web_name}.net1."),
        RecordType::A,
    );
    assert_eq!(a_records(&qualified), [web_ip], "{qualified:?}");
    let reverse = ask_from(client, NET1_GATEWAY, &reverse_name(web_ip), RecordType::PTR);
    assert_eq!(ptr_records(&reverse), [format!("{web_name}.net1.")]);

    let unknown = ask_from(client, NET1_GATEWAY, "nosuch.", RecordType::A);
    assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);

    // net2's container asks its own gateway: net1's names are not its own.
    for name in [format!("{web_name}."), format!("{web_name}.net1.")] {
        let answer = ask_from(stranger, NET2_GATEWAY, &name, RecordType::A);
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(a_records(&answer).is_empty(), "{name}: {answer:?}");
    }
}

/// `attach --netns /run/netns/NAME` gives the namespace the overlay's resolver the `ip netns`
/// way (`ip netns exec NAME` resolves `web`), and `detach` takes it back.
fn assert_attached_namespace_resolves(node: &Node, web_name: &str, web_ip: Ipv4Addr) {
    let attached = TestNs::new("dnsa");
    let path = attached.ns().path().display().to_string();
    let name = unique_name("att");
    node.cli(&["attach", "-n", "net1", "--netns", &path, "--name", &name])
        .ok();
    let resolv_dir = Path::new("/etc/netns").join(attached.name());
    let _cleanup = ResolvConfGuard(attached.name().to_owned());
    assert!(
        resolv_dir.join("resolv.conf").exists(),
        "attach wrote no resolv.conf"
    );
    let found = getent_hosts(attached.name(), web_name).expect("web resolves after attach");
    assert!(found.starts_with(&format!("{web_ip} ")), "{found}");
    node.cli(&["detach", "-n", "net1", &name]).ok();
    assert!(
        !resolv_dir.exists(),
        "detach left {} behind",
        resolv_dir.display()
    );
}

/// Stops `web` and checks its name stops resolving for `client` within
/// [`FORGET_DEADLINE`], and that its resolv.conf went with it.
fn assert_forgotten_when_stopped(web: Background, web_name: &str, client: &Background) {
    let web_netns = web.netns.clone();
    web.stop();
    let stopped = Instant::now();
    wait_until(
        &format!("{web_name} to stop resolving"),
        FORGET_DEADLINE,
        || {
            let answer = ask_from(client, NET1_GATEWAY, &format!("{web_name}."), RecordType::A);
            answer.metadata.response_code == ResponseCode::NXDomain
        },
    );
    eprintln!(
        "{web_name} stopped resolving {:?} after its run ended",
        stopped.elapsed()
    );
    assert!(
        !Path::new("/etc/netns").join(&web_netns).exists(),
        "run left /etc/netns/{web_netns} behind"
    );
}

#[test]
fn run_containers_resolve_names_across_hosts_within_their_network() {
    require_root();
    let underlay = Underlay::new();
    let (outside, _) = underlay.plug("dnsup", OUTSIDE_HOST);
    let upstream_address = Underlay::host_address(OUTSIDE_HOST);
    let upstream = OutsideResolver::start(&outside, upstream_address);
    let upstream_arg = upstream_address.to_string();
    let (_consul, nodes) = start_cluster(
        &BINS,
        &underlay,
        2,
        None,
        &["--dns-upstream", &upstream_arg],
    );
    nodes[0]
        .cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    nodes[0]
        .cli(&["network", "create", "net2", "10.200.0.0/24"])
        .ok();

    let web_name = unique_name("web");
    let web = nodes[1].spawn_run("net1", &web_name, &["sleep", "600"]);
    let web_ip = nodes[1].wait_endpoint("net1", &web_name);
    nodes[0].wait_endpoint("net1", &web_name);

    // The C library of a `run` container on the other node, through the resolv.conf
    // `run` binds over /etc/resolv.conf in the container's own mount namespace.
    let pinged = nodes[0].cli(&["run", "-n", "net1", "--", "ping", "-c1", "-W5", &web_name]);
    assert_eq!(pinged.code, 0, "ping {web_name} across hosts: {pinged:#?}");
    assert!(pinged.stdout.contains(&web_ip.to_string()), "{pinged:#?}");
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(
        !host_resolv.contains("Written by overlay-ctl"),
        "the host's resolv.conf was changed"
    );

    let client = nodes[0].spawn_run("net1", &unique_name("cli"), &["sleep", "600"]);
    let stranger = nodes[0].spawn_run("net2", &unique_name("str"), &["sleep", "600"]);
    let net1_dir = Path::new("/etc/netns").join(&client.netns);
    wait_until("the client's resolv.conf", Duration::from_secs(15), || {
        net1_dir.join("resolv.conf").exists()
    });

    assert_names_of_the_asking_network(&client, &stranger, &web_name, web_ip);
    assert_attached_namespace_resolves(&nodes[0], &web_name, web_ip);

    // Outside the overlay: forwarded to the resolver given with --dns-upstream.
    let forwarded = ask_from(&client, NET1_GATEWAY, OUTSIDE_NAME, RecordType::A);
    assert_eq!(a_records(&forwarded), [OUTSIDE_ADDRESS], "{forwarded:?}");
    assert!(upstream.asked.load(Ordering::Relaxed) >= 1);
    assert!(metric(&nodes[0], "overlay_dns_queries_total{result=\"forwarded\"}") >= Some(1));
    assert!(metric(&nodes[0], "overlay_dns_queries_total{result=\"nxdomain\"}") >= Some(1));

    // A removed container's name goes within a second of its `run` ending.
    assert_forgotten_when_stopped(web, &web_name, &client);
    drop(client);
    wait_until(
        "the client's resolv.conf removed",
        Duration::from_secs(15),
        || !net1_dir.exists(),
    );
}
