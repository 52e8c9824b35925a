//! The agent's side of container names ([`dns`](super::dns)): the responder it starts,
//! and what every reconcile run tells it (the name table and the gateway listeners).
//!
//! How a query reaches the responder: a container's packets to its gateway address are
//! answered at layer 2 by the data plane (the eBPF program replies to ARP for the gateway
//! with the host veth's MAC) and passed to the host stack at layer 3 (`dst == gateway`
//! is `pass_to_host` in the container program). The endpoint plumbing puts that gateway
//! address (/32) on every host veth of the network, so the node's kernel takes the
//! datagram as local and delivers it to the socket bound to `GATEWAY:53`; the answer goes
//! back from the gateway address over the /32 route to the container. Nothing new is
//! needed in the data plane. The sockets are bound with `IP_FREEBIND` because the address
//! only exists while a container of that network runs here, and a listener (re)bound in
//! the same run that plumbs the first container must not depend on that order.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
};

use tracing::{info, warn};

use super::{
    dns::{DnsConfig, DnsDirectory, DnsServer, Upstreams},
    reconcile::ClusterState,
};

/// What the agent is told about names (`agent --dns`, `--dns-upstream`).
#[derive(Clone, Debug, Default)]
pub struct NameOptions {
    /// Serve the containers' names on the gateway addresses.
    pub enabled: bool,
    /// Where names outside the overlay go; empty: the host's resolv.conf.
    pub upstreams: Vec<SocketAddr>,
}

/// The responder and how many gateways it listens on (for the metrics, read without
/// the responder's async lock).
pub(super) struct NameService {
    server: DnsServer,
    listeners: AtomicUsize,
}

impl NameService {
    /// The responder for `options` (`None` when names are off).
    pub(super) fn new(options: &NameOptions) -> Option<Self> {
        if !options.enabled {
            return None;
        }
        let upstreams = if options.upstreams.is_empty() {
            Upstreams::from_system().unwrap_or_else(|e| {
                warn!(error = %e, "no upstream resolvers: only overlay names will resolve (or pass --dns-upstream)");
                Upstreams::new(Vec::new())
            })
        } else {
            Upstreams::new(options.upstreams.clone())
        };
        info!(upstreams = ?upstreams.servers, "serving container names on the gateway addresses");
        Some(Self {
            server: DnsServer::new(DnsDirectory::new(), DnsConfig::new(upstreams)),
            listeners: AtomicUsize::new(0),
        })
    }

    /// Listens on the gateway of every network with an endpoint on `node` and makes the
    /// name table equal to `state` (the cluster's endpoints, as this run applies them)
    /// for those networks. A bind that fails is logged and tried again by the next run.
    pub(super) async fn refresh(&self, state: &ClusterState, node: &str) {
        let wanted = gateways_with_local_endpoints(state, node);
        let served: BTreeSet<&str> = wanted.values().map(String::as_str).collect();
        self.server
            .directory()
            .replace_served(&state.networks, &state.endpoints, |network| {
                served.contains(network)
            });
        for error in self.server.set_listeners(&wanted).await {
            warn!(%error, "cannot serve container names on a gateway; retried next reconcile");
        }
        let listening = self.server.listening().await.len();
        self.listeners.store(listening, Ordering::Relaxed);
    }

    pub(super) async fn shutdown(&self) {
        self.server.shutdown().await;
        self.listeners.store(0, Ordering::Relaxed);
    }

    /// The responder's counters in the Prometheus text format.
    pub(super) fn render_metrics(&self) -> String {
        let counters = self.server.counters();
        let mut out = String::new();
        let name = "overlay_dns_queries_total";
        let _ = writeln!(out, "# HELP {name} DNS queries the gateway responder handled, by result (answered: an overlay name; nxdomain: not a name of the asking network; forwarded: answered upstream; refused: not a query we serve; failed: SERVFAIL).");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (result, value) in [
            ("answered", counters.answered),
            ("nxdomain", counters.nxdomain),
            ("forwarded", counters.forwarded),
            ("refused", counters.refused),
            ("failed", counters.failed),
        ] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {value}");
        }
        let name = "overlay_dns_listeners";
        let _ = writeln!(
            out,
            "# HELP {name} Gateway addresses the DNS responder listens on."
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {}", self.listeners.load(Ordering::Relaxed));
        out
    }
}

/// Gateway address -> network, for the networks with an endpoint on `node`.
fn gateways_with_local_endpoints(state: &ClusterState, node: &str) -> BTreeMap<Ipv4Addr, String> {
    state
        .local_endpoints(node)
        .filter_map(|e| state.networks.iter().find(|n| n.name == e.network))
        .map(|n| (n.gateway, n.name.clone()))
        .collect()
}
