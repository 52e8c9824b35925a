//! The DNS listeners, one hickory [`Server`] per network gateway address, and the request
//! handler that answers from the directory or forwards upstream.
//!
//! One server per address (rather than one for all) is how a query's network is known:
//! the handler of the server bound to net1's gateway answers from net1's names only.
//! Sockets are bound with `IP_FREEBIND`: the gateway address exists on a node only while a
//! container of that network runs there (it sits on the containers' host veths), and the
//! listener must not depend on that order.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hickory_proto::{
    op::{
        Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode,
        ResponseCode,
    },
    rr::{
        rdata::{A, PTR},
        DNSClass, Name, RData, Record, RecordType,
    },
};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
    Server,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::{forward::Upstreams, DnsDirectory, DnsError, Resolution, NAME_TTL_SECS};

pub const DNS_PORT: u16 = 53;
/// How long a TCP client may stay idle before its connection is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_RESPONSE_BUFFER: usize = 32;
const TCP_BACKLOG: i32 = 64;
/// The largest UDP answer we send (the DNS flag day 2020 value: no IP fragments).
const ANSWER_MAX_PAYLOAD: u16 = 1232;

/// How the responder listens and where it forwards.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// 53 in production; tests pick a free high port (0 lets the kernel pick on the
    /// first address).
    pub port: u16,
    pub upstreams: Upstreams,
}

impl DnsConfig {
    pub fn new(upstreams: Upstreams) -> Self {
        Self {
            port: DNS_PORT,
            upstreams,
        }
    }
}

/// What the responder did, for the metrics module.
#[derive(Debug, Default)]
pub struct DnsCounters {
    answered: AtomicU64,
    nxdomain: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// A copy of [`DnsCounters`]: `answered` counts overlay names answered (NOERROR),
/// `nxdomain` overlay-zone misses, `forwarded` queries answered by an upstream, `refused`
/// queries we do not serve (not a query, not class IN), `failed` SERVFAILs (no upstream
/// answered, or a response could not be sent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsCountersSnapshot {
    pub answered: u64,
    pub nxdomain: u64,
    pub forwarded: u64,
    pub refused: u64,
    pub failed: u64,
}

impl DnsCounters {
    pub fn snapshot(&self) -> DnsCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsCountersSnapshot {
            answered: get(&self.answered),
            nxdomain: get(&self.nxdomain),
            forwarded: get(&self.forwarded),
            refused: get(&self.refused),
            failed: get(&self.failed),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Listener {
    network: String,
    bound: SocketAddr,
    server: Server<NetworkHandler>,
}

/// The node's DNS responder: listeners come and go with the networks (see
/// [`Self::set_listeners`]); names come from the shared [`DnsDirectory`].
pub struct DnsServer {
    directory: DnsDirectory,
    upstreams: Arc<Upstreams>,
    port: u16,
    counters: Arc<DnsCounters>,
    listeners: Mutex<BTreeMap<Ipv4Addr, Listener>>,
}

impl DnsServer {
    pub fn new(directory: DnsDirectory, config: DnsConfig) -> Self {
        Self {
            directory,
            upstreams: Arc::new(config.upstreams),
            port: config.port,
            counters: Arc::default(),
            listeners: Mutex::default(),
        }
    }

    pub fn directory(&self) -> &DnsDirectory {
        &self.directory
    }

    pub fn counters(&self) -> DnsCountersSnapshot {
        self.counters.snapshot()
    }

    /// The addresses listened on, and the network each answers for.
    pub async fn listening(&self) -> BTreeMap<Ipv4Addr, String> {
        let listeners = self.listeners.lock().await;
        listeners
            .iter()
            .map(|(a, l)| (*a, l.network.clone()))
            .collect()
    }

    /// Listens on `address` (UDP and TCP, the configured port) for `network`'s containers
    /// and returns the UDP socket address. Listening again on an address for the same
    /// network changes nothing; for another network it rebinds.
    pub async fn listen(&self, network: &str, address: Ipv4Addr) -> Result<SocketAddr, DnsError> {
        let mut listeners = self.listeners.lock().await;
        if let Some(existing) = listeners.get(&address) {
            if existing.network == network {
                return Ok(existing.bound);
            }
        }
        if let Some(mut old) = listeners.remove(&address) {
            shut_down(address, &mut old).await;
        }
        let handler = NetworkHandler {
            network: network.to_owned(),
            directory: self.directory.clone(),
            upstreams: self.upstreams.clone(),
            counters: self.counters.clone(),
        };
        let (server, bound) = bind(handler, SocketAddr::from((address, self.port)))?;
        info!(%bound, network, "DNS responder listening");
        listeners.insert(
            address,
            Listener {
                network: network.to_owned(),
                bound,
                server,
            },
        );
        Ok(bound)
    }

    /// Stops listening on `address`; false when it was not listened on.
    pub async fn stop(&self, address: Ipv4Addr) -> bool {
        let removed = self.listeners.lock().await.remove(&address);
        match removed {
            Some(mut listener) => {
                shut_down(address, &mut listener).await;
                true
            }
            None => false,
        }
    }

    /// Makes the listeners exactly `wanted` (gateway address -> network): stops the others,
    /// starts the missing ones. Every address that could not be bound is in the errors;
    /// the rest are served regardless.
    pub async fn set_listeners(&self, wanted: &BTreeMap<Ipv4Addr, String>) -> Vec<DnsError> {
        let stale: Vec<Ipv4Addr> = self
            .listening()
            .await
            .into_iter()
            .filter(|(address, network)| wanted.get(address) != Some(network))
            .map(|(address, _)| address)
            .collect();
        for address in stale {
            self.stop(address).await;
        }
        let mut errors = Vec::new();
        for (address, network) in wanted {
            if let Err(e) = self.listen(network, *address).await {
                errors.push(e);
            }
        }
        errors
    }

    /// Stops every listener.
    pub async fn shutdown(&self) {
        let listeners = std::mem::take(&mut *self.listeners.lock().await);
        for (address, mut listener) in listeners {
            shut_down(address, &mut listener).await;
        }
    }
}

async fn shut_down(address: Ipv4Addr, listener: &mut Listener) {
    if let Err(e) = listener.server.shutdown_gracefully().await {
        warn!(%address, error = %e, "DNS listener ended with an error");
    }
    info!(%address, network = %listener.network, "DNS responder stopped listening");
}

/// Binds UDP then TCP on `address` (TCP on the port UDP got, when the port was 0).
fn bind(
    handler: NetworkHandler,
    address: SocketAddr,
) -> Result<(Server<NetworkHandler>, SocketAddr), DnsError> {
    let bind_error = |source| DnsError::Bind { address, source };
    let udp = freebind_socket(Type::DGRAM, Protocol::UDP).map_err(bind_error)?;
    udp.bind(&address.into()).map_err(bind_error)?;
    let udp = tokio::net::UdpSocket::from_std(udp.into()).map_err(bind_error)?;
    let bound = udp.local_addr().map_err(bind_error)?;

    let tcp_error = |source| DnsError::Bind {
        address: bound,
        source,
    };
    let tcp = freebind_socket(Type::STREAM, Protocol::TCP).map_err(tcp_error)?;
    tcp.set_reuse_address(true).map_err(tcp_error)?;
    tcp.bind(&bound.into()).map_err(tcp_error)?;
    tcp.listen(TCP_BACKLOG).map_err(tcp_error)?;
    let tcp = tokio::net::TcpListener::from_std(tcp.into()).map_err(tcp_error)?;

    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    Ok((server, bound))
}

fn freebind_socket(kind: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::IPV4, kind, Some(protocol))?;
    socket.set_freebind_v4(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Answers the queries that arrive on one network's gateway address.
struct NetworkHandler {
    network: String,
    directory: DnsDirectory,
    upstreams: Arc<Upstreams>,
    counters: Arc<DnsCounters>,
}

/// What to send back for one query.
enum Reply {
    Records(ResponseCode, Vec<Record>),
    Forwarded(Message),
    Error(ResponseCode),
}

#[async_trait::async_trait]
impl RequestHandler for NetworkHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let reply = self.decide(request).await;
        // Without an OPT record in the answer, hickory caps a UDP answer at 512 bytes: echo
        // the client's EDNS (its buffer size, bounded) so forwarded answers fit as upstream sent them.
        let answer_edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().clamp(512, ANSWER_MAX_PAYLOAD));
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &answer_edns {
            builder.edns(edns);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        let sent = match &reply {
            Reply::Records(code, answers) => {
                metadata.response_code = *code;
                metadata.authoritative = true;
                let message = builder.build(metadata, answers.iter(), [], [], []);
                response.send_response(message).await
            }
            Reply::Forwarded(upstream) => {
                metadata.response_code = upstream.metadata.response_code;
                metadata.recursion_available = upstream.metadata.recursion_available;
                let message = builder.build(
                    metadata,
                    upstream.answers.iter(),
                    upstream.authorities.iter(),
                    [],
                    upstream.additionals.iter(),
                );
                response.send_response(message).await
            }
            Reply::Error(code) => {
                let message = builder.error_msg(&request.metadata, *code);
                response.send_response(message).await
            }
        };
        match sent {
            Ok(info) => info,
            Err(e) => {
                DnsCounters::bump(&self.counters.failed);
                warn!(network = %self.network, client = %request.src(), error = %e, "sending a DNS response failed");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

impl NetworkHandler {
    async fn decide(&self, request: &Request) -> Reply {
        let counters = &self.counters;
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            DnsCounters::bump(&counters.refused);
            return Reply::Error(ResponseCode::NotImp);
        }
        let Ok(info) = request.request_info() else {
            DnsCounters::bump(&counters.refused);
            return Reply::Error(ResponseCode::FormErr);
        };
        let query = info.query;
        if query.query_class() != DNSClass::IN {
            DnsCounters::bump(&counters.refused);
            return Reply::Error(ResponseCode::Refused);
        }
        match self.resolve(query) {
            Resolution::Address(address) => {
                DnsCounters::bump(&counters.answered);
                let wants_address = matches!(query.query_type(), RecordType::A | RecordType::ANY);
                let answers = wants_address
                    .then(|| record(query, RData::A(A(address))))
                    .into_iter()
                    .collect();
                // Other types of a known name: NOERROR with no records (NODATA), so a
                // resolver asking A and AAAA together still uses the A answer.
                Reply::Records(ResponseCode::NoError, answers)
            }
            Resolution::Name(target) => match Name::from_str(&target) {
                Ok(target) if query.query_type() == RecordType::PTR => {
                    DnsCounters::bump(&counters.answered);
                    let answer = record(query, RData::PTR(PTR(target)));
                    Reply::Records(ResponseCode::NoError, vec![answer])
                }
                _ => {
                    DnsCounters::bump(&counters.answered);
                    Reply::Records(ResponseCode::NoError, Vec::new())
                }
            },
            Resolution::NotFound => {
                DnsCounters::bump(&counters.nxdomain);
                debug!(network = %self.network, name = %query.name(), "not an overlay name of this network");
                Reply::Records(ResponseCode::NXDomain, Vec::new())
            }
            Resolution::Outside => self.forward(query).await,
        }
    }

    fn resolve(&self, query: &LowerQuery) -> Resolution {
        let name: Name = query.name().into();
        if let Ok(net) = name.parse_arpa_name() {
            let is_host = net.prefix_len() == net.max_prefix_len();
            return if is_host {
                self.directory.resolve_reverse(&self.network, net.addr())
            } else {
                Resolution::Outside
            };
        }
        self.directory.resolve(&self.network, &name.to_ascii())
    }

    async fn forward(&self, query: &LowerQuery) -> Reply {
        match self.upstreams.forward(query.original()).await {
            Ok(answer) => {
                DnsCounters::bump(&self.counters.forwarded);
                Reply::Forwarded(answer)
            }
            Err(e) => {
                DnsCounters::bump(&self.counters.failed);
                warn!(network = %self.network, name = %query.name(), error = %e, "forwarding failed");
                Reply::Error(ResponseCode::ServFail)
            }
        }
    }
}

fn record(query: &LowerQuery, data: RData) -> Record {
    Record::from_rdata(query.name().into(), NAME_TTL_SECS, data)
}
