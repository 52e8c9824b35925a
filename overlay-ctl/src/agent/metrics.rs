//! Prometheus metrics of the agent: the text exposition format (0.0.4) on `GET /metrics`.
//!
//! Data-plane counters are read from the per-CPU map and summed on every scrape. Labels
//! come from closed sets only (the counter enum, the map names) plus the networks the
//! maps know, so cardinality stays bounded: no per-CPU and no per-endpoint series.
//!
//! | family | labels |
//! | --- | --- |
//! | `overlay_packets_total`, `overlay_bytes_total` | `network`, `vni`, `direction` (encapsulated, decapsulated, switched_local, arp_reply, passed_to_host, frag_needed_sent, underlay_vxlan, underlay_other) |
//! | `overlay_dropped_packets_total`, `overlay_dropped_bytes_total` | `network`, `vni`, `reason` (spoofed, unknown_vtep, unknown_vni, no_endpoint, cross_network, mtu_exceeded, malformed, internal) |
//! | `overlay_map_entries`, `overlay_map_capacity` | `map` |
//! | `overlay_reconcile_runs_total`, `overlay_reconcile_failures_total`, `overlay_reconcile_duration_seconds` (last run) | |
//! | `overlay_consul_request_errors_total`, `overlay_consul_up` | |
//! | `overlay_endpoints` | `location` (local, remote) |
//! | `overlay_members` | |
//! | `overlay_store_records_rejected` (now), `overlay_store_rejections_total` (each record once per reason) | `kind` (network, node, endpoint, ipam), `reason` (see [`crate::store::records::RejectReason`]) |
//! | `overlay_map_missing_entries` (last reconcile) | `map` |
//! | `overlay_map_update_failures_total` | |
//! | `overlay_store_state` | `state` (unknown, trusted, missing, foreign, healing): 1 for the current one |
//! | `overlay_gc_collected_total` | `kind` (local_endpoint, address, endpoint, vni, subnet) |
//! | `overlay_gc_runs_total` | |
//! | `overlay_underlay_mtu`, `overlay_networks_mtu_exceeding_underlay` | |
//! | `overlay_network_mtu_shortfall_bytes` (only networks too large for this underlay) | `network`, `vni` |
//! | `overlay_egress_dropped_packets_total`, `overlay_egress_dropped_bytes_total` | `network` (egress-none networks) |
//! | `overlay_egress_in_step` | |
//!
//! Events seen on the underlay before a packet's network is known are counted under
//! VNI 0, exported as `network="underlay"`.
//!
//! Gauges about the control plane (Consul up, members, endpoints, rejected records) are
//! read from the agent's one [`LiveStatus`]; only counters are kept here.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use overlay_common::{Counter, CounterValue};
use tokio::net::TcpListener;

use crate::{
    agent::status::LiveStatus,
    agent::{apply::ApplyReport, lock},
    store::records::{RecordKind, RejectReason},
};

type RejectionCounts = BTreeMap<(RecordKind, RejectReason), u64>;

/// Where the agent serves metrics unless told otherwise: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9465";
/// The label value for VNI 0 (underlay-scope events).
pub const UNDERLAY_NETWORK: &str = "underlay";
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Control-plane counters the agent updates (and the last run's duration and missing
/// entries, which belong to the counters' runs).
#[derive(Debug, Default)]
pub struct ControlPlaneMetrics {
    reconcile_runs: AtomicU64,
    reconcile_failures: AtomicU64,
    reconcile_duration_ns: AtomicU64,
    consul_errors: AtomicU64,
    /// Left-overs collected, by kind ([`crate::agent::gc::Kind`]).
    gc_collected: Mutex<BTreeMap<&'static str, u64>>,
    gc_runs: AtomicU64,
    /// Rejections reported (each record once per reason while it lasts).
    rejections_total: Mutex<RejectionCounts>,
    /// Wanted entries missing from each map after the last reconcile.
    map_missing: Mutex<BTreeMap<String, u64>>,
    map_update_failures: AtomicU64,
}

impl ControlPlaneMetrics {
    pub fn record_reconcile(&self, ok: bool, duration: Duration) {
        self.reconcile_runs.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.reconcile_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.reconcile_duration_ns
            .store(duration.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn record_consul_error(&self) {
        self.consul_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Rejections reported for the first time in the latest read of the store.
    pub fn record_rejections_reported(
        &self,
        fresh: impl IntoIterator<Item = (RecordKind, RejectReason)>,
    ) {
        let mut total = lock(&self.rejections_total);
        for key in fresh {
            *total.entry(key).or_default() += 1;
        }
    }

    /// What an apply could not write.
    pub fn record_apply_failures(&self, report: &ApplyReport) {
        self.map_update_failures
            .fetch_add(report.failed as u64, Ordering::Relaxed);
        *lock(&self.map_missing) = report
            .missing
            .iter()
            .map(|(k, v)| (k.clone(), *v as u64))
            .collect();
    }

    pub fn record_gc_run(&self) {
        self.gc_runs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_collected(&self, kind: &'static str) {
        *lock(&self.gc_collected).entry(kind).or_default() += 1;
    }
}

/// Everything one scrape renders.
pub struct Scrape<'a> {
    pub counters: &'a BTreeMap<(u32, Counter), CounterValue>,
    /// Network names by VNI (VNIs without a name are exported by number).
    pub networks: &'a BTreeMap<u32, String>,
    /// (map name, entries, capacity).
    pub occupancy: &'a [(&'static str, usize, u32)],
    pub control: &'a ControlPlaneMetrics,
    /// The control plane's gauges.
    pub status: &'a LiveStatus,
    /// The store's trust state ([`crate::store::identity::Trust::name`]).
    pub store_state: &'static str,
    /// The egress table and its drops ([`crate::agent::egress`]).
    pub egress: &'a crate::agent::egress::EgressStatus,
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One metric family: HELP and TYPE once, then its samples.
pub(super) struct Family<'o> {
    out: &'o mut String,
}

impl<'o> Family<'o> {
    pub(super) fn new(out: &'o mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out }
    }

    pub(super) fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let rendered: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", rendered.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn network_label(vni: u32, networks: &BTreeMap<u32, String>) -> String {
    if vni == 0 {
        return UNDERLAY_NETWORK.to_string();
    }
    networks
        .get(&vni)
        .cloned()
        .unwrap_or_else(|| format!("vni-{vni}"))
}

/// Renders a scrape in the Prometheus text format.
pub fn render(scrape: &Scrape) -> String {
    let mut out = String::new();
    render_traffic(&mut out, scrape);
    render_maps(&mut out, scrape);
    render_reconcile(&mut out, scrape.control);
    render_cluster(&mut out, scrape.status);
    render_store(&mut out, scrape);
    render_gc(&mut out, scrape.control);
    super::mtu::render_metrics(&mut out, &scrape.status.mtu);
    crate::agent::egress::render_metrics(&mut out, scrape.egress);
    out
}

/// A family of one sample without labels.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    Family::new(out, name, kind, help).sample(name, &[], value);
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Packets and bytes, forwarded and dropped, by network.
fn render_traffic(out: &mut String, scrape: &Scrape) {
    let (drops, traffic): (Vec<_>, Vec<_>) =
        scrape.counters.iter().partition(|((_, c), _)| c.is_drop());
    type Pick = fn(&CounterValue) -> u64;
    let packets: Pick = |v| v.packets;
    let bytes: Pick = |v| v.bytes;
    for (name, help, rows, label, pick) in [
        (
            "overlay_packets_total",
            "Packets handled by the data plane, by network and direction.",
            &traffic,
            "direction",
            packets,
        ),
        (
            "overlay_bytes_total",
            "Bytes handled by the data plane, by network and direction.",
            &traffic,
            "direction",
            bytes,
        ),
        (
            "overlay_dropped_packets_total",
            "Packets dropped by the data plane, by network and reason.",
            &drops,
            "reason",
            packets,
        ),
        (
            "overlay_dropped_bytes_total",
            "Bytes dropped by the data plane, by network and reason.",
            &drops,
            "reason",
            bytes,
        ),
    ] {
        let mut family = Family::new(out, name, "counter", help);
        for ((vni, counter), value) in rows.iter() {
            let network = network_label(*vni, scrape.networks);
            let vni = vni.to_string();
            let labels = [
                ("network", network.as_str()),
                ("vni", &vni),
                (label, counter.name()),
            ];
            family.sample(name, &labels, pick(value));
        }
    }
}

/// Occupancy and capacity of every map, and what the last reconcile could not write.
fn render_maps(out: &mut String, scrape: &Scrape) {
    let mut family = Family::new(
        out,
        "overlay_map_entries",
        "gauge",
        "Entries in each data-plane map.",
    );
    for (map, entries, _) in scrape.occupancy {
        family.sample("overlay_map_entries", &[("map", map)], entries);
    }
    let mut family = Family::new(
        out,
        "overlay_map_capacity",
        "gauge",
        "Capacity (max entries) of each data-plane map.",
    );
    for (map, _, capacity) in scrape.occupancy {
        family.sample("overlay_map_capacity", &[("map", map)], capacity);
    }
}

fn render_reconcile(out: &mut String, c: &ControlPlaneMetrics) {
    single(
        out,
        "overlay_reconcile_runs_total",
        "counter",
        "Reconcile runs (cluster state applied to the maps).",
        load(&c.reconcile_runs),
    );
    single(
        out,
        "overlay_reconcile_failures_total",
        "counter",
        "Reconcile runs that failed.",
        load(&c.reconcile_failures),
    );
    single(
        out,
        "overlay_reconcile_duration_seconds",
        "gauge",
        "Duration of the last reconcile run.",
        format!("{:.9}", load(&c.reconcile_duration_ns) as f64 / 1e9),
    );
    single(
        out,
        "overlay_consul_request_errors_total",
        "counter",
        "Consul requests that failed (after retries).",
        load(&c.consul_errors),
    );
}

/// The gauges read from the agent's status.
fn render_cluster(out: &mut String, status: &LiveStatus) {
    single(
        out,
        "overlay_consul_up",
        "gauge",
        "Whether the last Consul request succeeded.",
        u8::from(status.consul_reachable),
    );
    let forwarding = &status.forwarding;
    let mut family = Family::new(
        out,
        "overlay_endpoints",
        "gauge",
        "Endpoints in this node's maps, by location.",
    );
    let name = "overlay_endpoints";
    family.sample(name, &[("location", "local")], forwarding.local_endpoints);
    family.sample(name, &[("location", "remote")], forwarding.remote_endpoints);
    single(
        out,
        "overlay_members",
        "gauge",
        "Live nodes of the cluster.",
        forwarding.members,
    );
}

/// Rejected store records, missing map entries, map update failures, the store's trust.
fn render_store(out: &mut String, scrape: &Scrape) {
    let c = scrape.control;
    for (name, kind, help, counts) in [
        (
            "overlay_store_records_rejected",
            "gauge",
            "Store records ignored as invalid or conflicting in the last read, by kind and reason.",
            scrape.status.rejected_by_reason.clone(),
        ),
        (
            "overlay_store_rejections_total",
            "counter",
            "Invalid or conflicting store records reported (each record once per reason while it lasts).",
            lock(&c.rejections_total).clone(),
        ),
    ] {
        let mut family = Family::new(out, name, kind, help);
        for ((record, reason), n) in counts {
            let labels = [("kind", record.as_str()), ("reason", reason.as_str())];
            family.sample(name, &labels, n);
        }
    }
    let mut family = Family::new(
        out,
        "overlay_map_missing_entries",
        "gauge",
        "Wanted entries the last reconcile could not write, by map (0 when all fit).",
    );
    let missing = lock(&c.map_missing).clone();
    for (map, _, _) in scrape.occupancy {
        let n = missing.get(*map).copied().unwrap_or(0);
        family.sample("overlay_map_missing_entries", &[("map", map)], n);
    }
    single(
        out,
        "overlay_map_update_failures_total",
        "counter",
        "Map updates (and attachments) that failed.",
        load(&c.map_update_failures),
    );
    let mut family = Family::new(
        out,
        "overlay_store_state",
        "gauge",
        "Whether the store is this cluster's (1 for the current state; missing and foreign: the data plane keeps its last state).",
    );
    for trust in crate::store::identity::Trust::ALL {
        let state = trust.name();
        let current = u8::from(state == scrape.store_state);
        family.sample("overlay_store_state", &[("state", state)], current);
    }
}

fn render_gc(out: &mut String, c: &ControlPlaneMetrics) {
    single(
        out,
        "overlay_gc_runs_total",
        "counter",
        "Garbage-collection passes completed.",
        load(&c.gc_runs),
    );
    let collected = lock(&c.gc_collected).clone();
    let mut family = Family::new(
        out,
        "overlay_gc_collected_total",
        "counter",
        "Left-overs of crashed commands and outages collected, by kind.",
    );
    for kind in crate::agent::gc::Kind::ALL {
        let n = collected.get(kind.name()).copied().unwrap_or(0);
        family.sample("overlay_gc_collected_total", &[("kind", kind.name())], n);
    }
}

/// Binds the metrics listener (a clear error naming the address when it cannot).
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// What a scrape calls to render the page.
pub type RenderFn = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves `GET /metrics` (404 elsewhere) until `shutdown` completes.
pub async fn serve(listener: TcpListener, render: RenderFn, shutdown: impl Future<Output = ()>) {
    let handler = move |req: Request<Incoming>| {
        let response = respond(&req, &render);
        async move { response }
    };
    crate::http::serve(listener, handler, shutdown).await;
}

fn respond(req: &Request<Incoming>, render: &RenderFn) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "see /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
    }
    match render() {
        Ok(body) => reply(StatusCode::OK, body),
        Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape_with(counters: BTreeMap<(u32, Counter), CounterValue>) -> String {
        let networks = BTreeMap::from([(7, "net1".to_string())]);
        let control = ControlPlaneMetrics::default();
        control.record_reconcile(true, Duration::from_millis(2));
        control.record_reconcile(false, Duration::from_millis(3));
        let status = LiveStatus {
            forwarding: crate::agent::status::Forwarding {
                members: 3,
                local_endpoints: 1,
                remote_endpoints: 4,
                attached: Vec::new(),
            },
            ..Default::default()
        };
        let occupancy = [("ENDPOINTS", 5, 65_536)];
        render(&Scrape {
            counters: &counters,
            networks: &networks,
            occupancy: &occupancy,
            control: &control,
            status: &status,
            store_state: "trusted",
            egress: &Default::default(),
        })
    }

    #[test]
    fn counters_become_labelled_series() {
        let text = scrape_with(BTreeMap::from([
            (
                (7, Counter::Encapsulated),
                CounterValue {
                    packets: 10,
                    bytes: 1000,
                },
            ),
            (
                (7, Counter::DropCrossNetwork),
                CounterValue {
                    packets: 2,
                    bytes: 84,
                },
            ),
            (
                (0, Counter::UnderlayOther),
                CounterValue {
                    packets: 1,
                    bytes: 60,
                },
            ),
            (
                (9, Counter::Decapsulated),
                CounterValue {
                    packets: 3,
                    bytes: 300,
                },
            ),
        ]));
        for line in [
            r#"overlay_packets_total{network="net1",vni="7",direction="encapsulated"} 10"#,
            r#"overlay_bytes_total{network="net1",vni="7",direction="encapsulated"} 1000"#,
            r#"overlay_dropped_packets_total{network="net1",vni="7",reason="cross_network"} 2"#,
            r#"overlay_dropped_bytes_total{network="net1",vni="7",reason="cross_network"} 84"#,
            r#"overlay_packets_total{network="underlay",vni="0",direction="underlay_other"} 1"#,
            r#"overlay_packets_total{network="vni-9",vni="9",direction="decapsulated"} 3"#,
            r#"overlay_map_entries{map="ENDPOINTS"} 5"#,
            r#"overlay_map_capacity{map="ENDPOINTS"} 65536"#,
            "overlay_reconcile_runs_total 2",
            "overlay_reconcile_failures_total 1",
            "overlay_reconcile_duration_seconds 0.003000000",
            r#"overlay_endpoints{location="remote"} 4"#,
            "overlay_members 3",
            r#"overlay_store_state{state="trusted"} 1"#,
            r#"overlay_store_state{state="unknown"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("cpu"), "no per-CPU series");
    }

    #[test]
    fn every_family_has_help_and_type_once() {
        let text = scrape_with(BTreeMap::from([(
            (7, Counter::Encapsulated),
            CounterValue {
                packets: 1,
                bytes: 1,
            },
        )]));
        let mut types = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap().to_string();
            assert!(types.insert(name.clone()), "{name} typed twice");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(types.contains(name), "{name} has no TYPE");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }
}
