//! The host's upstream resolvers and forwarding a query to them.
//!
//! Which upstreams: the `nameserver` lines of `/etc/resolv.conf`, loopback ones left out
//! first. A loopback stub (systemd-resolved's 127.0.0.53, a local dnsmasq) is only reachable
//! in the network namespace it runs in, and the agent may run in another one; when
//! resolv.conf names only such a stub we take systemd-resolved's own upstream list
//! (`/run/systemd/resolve/resolv.conf`, as Docker does), and only when that gives nothing
//! either do we keep the loopback entries: the forwarded query is sent by the agent, not by
//! the container, so a stub in the agent's own namespace does answer it.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use hickory_proto::op::{Edns, Message, Query};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    time::timeout,
};
use tracing::debug;

use super::DnsError;

pub const SYSTEM_RESOLV_CONF: &str = "/etc/resolv.conf";
pub const SYSTEMD_RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";
/// The EDNS payload size we offer upstream (the DNS flag day 2020 value: no IP fragments).
const UPSTREAM_MAX_PAYLOAD: u16 = 1232;
const DNS_PORT: u16 = 53;

/// The resolvers queries outside the overlay zone are forwarded to, tried in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
    /// How long one upstream gets before the next is tried.
    pub timeout: Duration,
}

impl Upstreams {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// The host's resolvers, chosen as the module documentation says.
    pub fn from_system() -> Result<Self, DnsError> {
        Self::from_files(
            Path::new(SYSTEM_RESOLV_CONF),
            Path::new(SYSTEMD_RESOLVED_UPSTREAMS),
        )
    }

    /// [`Self::from_system`] with the two files given (tests, unusual hosts).
    pub fn from_files(resolv_conf: &Path, resolved_upstreams: &Path) -> Result<Self, DnsError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
                path: path.to_owned(),
                source,
            })
        };
        let listed = parse_nameservers(&read(resolv_conf)?);
        let (loopback, reachable): (Vec<IpAddr>, Vec<IpAddr>) =
            listed.into_iter().partition(|a| a.is_loopback());
        let chosen = if !reachable.is_empty() {
            reachable
        } else {
            let resolved = match read(resolved_upstreams) {
                Ok(text) => parse_nameservers(&text),
                Err(_) => Vec::new(),
            };
            let resolved: Vec<IpAddr> = resolved.into_iter().filter(|a| !a.is_loopback()).collect();
            if resolved.is_empty() {
                loopback
            } else {
                resolved
            }
        };
        Ok(Self::new(
            chosen
                .into_iter()
                .map(|a| SocketAddr::new(a, DNS_PORT))
                .collect(),
        ))
    }

    /// Asks each upstream in turn for `query` (recursion desired) until one answers.
    pub async fn forward(&self, query: &Query) -> Result<Message, DnsError> {
        let mut last = DnsError::NoUpstream;
        for upstream in &self.servers {
            match self.ask(*upstream, query).await {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    debug!(%upstream, error = %e, "upstream resolver failed, trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// One upstream: over UDP from a fresh socket (random source port and a random query
    /// ID, so a spoofed answer has to guess both), again over TCP when the answer is
    /// truncated.
    async fn ask(&self, upstream: SocketAddr, query: &Query) -> Result<Message, DnsError> {
        let mut request = Message::query();
        request.add_query(query.clone());
        request.metadata.recursion_desired = true;
        let mut edns = Edns::new();
        edns.set_max_payload(UPSTREAM_MAX_PAYLOAD);
        request.edns = Some(edns);
        let bytes = request.to_vec()?;
        let io_error = |source| DnsError::Upstream { upstream, source };
        let deadline = |_| DnsError::UpstreamTimeout {
            upstream,
            timeout_ms: self.timeout.as_millis(),
        };

        let local: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await.map_err(io_error)?;
        socket.connect(upstream).await.map_err(io_error)?;
        socket.send(&bytes).await.map_err(io_error)?;
        let mut buffer = vec![0u8; usize::from(u16::MAX)];
        let answer = timeout(self.timeout, async {
            loop {
                let len = socket.recv(&mut buffer).await?;
                // Anything that is not the answer to our ID is ignored, not trusted.
                if let Ok(message) = Message::from_vec(&buffer[..len]) {
                    if message.metadata.id == request.metadata.id {
                        return Ok::<_, std::io::Error>(message);
                    }
                }
            }
        })
        .await
        .map_err(deadline)?
        .map_err(io_error)?;
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        timeout(
            self.timeout,
            ask_over_tcp(upstream, &bytes, request.metadata.id),
        )
        .await
        .map_err(deadline)?
    }
}

async fn ask_over_tcp(upstream: SocketAddr, bytes: &[u8], id: u16) -> Result<Message, DnsError> {
    let io_error = |source| DnsError::Upstream { upstream, source };
    let length = u16::try_from(bytes.len()).map_err(|_| DnsError::UpstreamAnswer {
        upstream,
        reason: "query too long for TCP".into(),
    })?;
    let mut stream = TcpStream::connect(upstream).await.map_err(io_error)?;
    stream
        .write_all(&length.to_be_bytes())
        .await
        .map_err(io_error)?;
    stream.write_all(bytes).await.map_err(io_error)?;
    let answer_length = stream.read_u16().await.map_err(io_error)?;
    let mut buffer = vec![0u8; usize::from(answer_length)];
    stream.read_exact(&mut buffer).await.map_err(io_error)?;
    let message = Message::from_vec(&buffer).map_err(|e| DnsError::UpstreamAnswer {
        upstream,
        reason: e.to_string(),
    })?;
    if message.metadata.id != id {
        return Err(DnsError::UpstreamAnswer {
            upstream,
            reason: format!("answer ID {} for query ID {id}", message.metadata.id),
        });
    }
    Ok(message)
}

/// The addresses of the `nameserver` lines of a resolv.conf (resolv.conf(5)); other lines,
/// comments and unparsable addresses are skipped, as the C library skips them.
pub fn parse_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(address)) => {
                    // A scoped IPv6 address ("fe80::1%eth0") names its link after the '%'.
                    address.split('%').next()?.parse().ok()
                }
                _ => None,
            }
        })
        .collect()
}
