//! The benchmark driver behind `cargo xtask bench` (binaries `overlay-bench` and
//! `overlay-control-bench`; results in `bench/results/`, beside this crate): this
//! project's data plane measured side by side with no overlay and with the Linux VXLAN
//! device, on the same two-host topology, and its control plane with real agents. The
//! lab (namespaces, underlay, agents) is the integration tests' harness, `overlay_tests`.
//!
//! - [`setups`] builds the three topologies: (a) plain routed veths, (b) a Linux `vxlan`
//!   device with a bridge and static FDB/neighbour entries (Docker's classic overlay),
//!   (c) this project's eBPF data plane.
//! - [`tools`] runs the traffic: iperf3 (TCP), a sendmmsg/recvmmsg flood (64-byte UDP),
//!   sockperf (request/response latency), and reads the machine's CPU time.
//! - [`testrun`] times the encap and decap programs alone with `BPF_PROG_TEST_RUN`.
//! - [`report`] holds the results as rows ([`report::BenchRow`]) and writes the Markdown
//!   table and the JSON file.
//!
//! The control-plane rows (convergence, agent memory) come from [`control_plane_rows`],
//! which runs real agents ([`control`]).
pub mod control;
pub mod report;
pub mod scale;
pub mod setups;
pub mod testrun;
pub mod tools;

use report::{BenchRow, Better, Target};

/// Row ids of the control plane (kept stable: notes and history refer to them).
pub const CONVERGENCE_ROW: &str = "control_convergence_1000";
pub const AGENT_RSS_ROW: &str = "control_agent_rss";

/// Fresh clusters measured per bench run (each takes a few seconds).
pub const CONTROL_PLANE_ROUNDS: usize = 3;
const CONTROL_PLANE_ENDPOINTS: usize = 1_000;

/// The control-plane rows: time for 3 agents to converge on 1,000 endpoints, and the
/// agents' resident memory then ([`control`]: real agent processes against
/// the Consul dev server, one fresh cluster per round). `bins` names `overlay-ctl` (the
/// agents and `overlay-ctl dev-server`), built in release mode beside `overlay-bench`.
pub fn control_plane_rows(bins: &overlay_tests::cluster::Bins, rounds: usize) -> Vec<BenchRow> {
    use report::{Measured, Samples};
    let mut converge = Samples::default();
    let mut rss = Samples::default();
    for round in 1..=rounds {
        eprintln!(
            "control plane: round {round}/{rounds}: 3 agents, {CONTROL_PLANE_ENDPOINTS} endpoints"
        );
        match control::measure(bins, 3, CONTROL_PLANE_ENDPOINTS) {
            Ok(result) => {
                converge.push(round, result.converge.as_secs_f64());
                let largest = result.agent_rss.iter().copied().max().unwrap_or(0);
                rss.push(round, largest as f64 / 1e6);
            }
            Err(e) => {
                converge.fail(round, e.clone());
                rss.fail(round, e);
            }
        }
    }
    vec![
        BenchRow {
            id: CONVERGENCE_ROW.into(),
            name: "Control plane: 3 agents converge on 1,000 endpoints".into(),
            unit: "s".into(),
            better: Better::Lower,
            measured: Measured::Own(converge),
            targets: vec![Target::value_below(2.0)],
            method: "three agent processes (overlay-ctl agent, release build) in host \
                     namespaces against the Consul dev server; 1,000 endpoints of a live \
                     remote node written to the KV store, 32 writes in flight; from the first \
                     write until every agent has recorded (overlay/applied/<node>) an index at \
                     or after the last one, then each agent's ENDPOINTS map is checked to hold \
                     all 1,000; a fresh cluster per round"
                .into(),
        },
        BenchRow {
            id: AGENT_RSS_ROW.into(),
            name: "Control plane: agent resident memory".into(),
            unit: "MB".into(),
            better: Better::Lower,
            measured: Measured::Own(rss),
            targets: vec![Target::value_below(30.0)],
            method: "VmRSS of the largest of the three agents right after they converged on \
                     1,000 endpoints"
                .into(),
        },
    ]
}
