//! `cargo xtask bench`: this project's data plane measured side by side with no overlay
//! and with the Linux VXLAN device, on the same two-host topology.
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
//! The control-plane rows (convergence, agent memory) come from [`control_plane_rows`];
//! until the agent exists they say "not measured yet".
#[path = "bench_report.rs"]
pub mod report;
#[path = "bench_setups.rs"]
pub mod setups;
#[path = "bench_testrun.rs"]
pub mod testrun;
#[path = "bench_tools.rs"]
pub mod tools;

use report::{BenchRow, Better, Target};

/// Row ids of the control plane (kept stable: notes and history refer to them).
pub const CONVERGENCE_ROW: &str = "control_convergence_1000";
pub const AGENT_RSS_ROW: &str = "control_agent_rss";

/// The control-plane rows: time for 3 agents to converge on 1,000 endpoints, and the
/// agent's resident memory. Not measured here yet. Replace the body with a measurement
/// (e.g. running `overlay-control-bench` and reading its JSON lines) that returns the
/// same rows with [`report::Measured::Own`] samples, one per round
/// ([`report::Samples::push`]); the table, the targets and the JSON follow.
pub fn control_plane_rows() -> Vec<BenchRow> {
    const WHY: &str = "not measured yet by this command: the control-plane measurement \
                       (overlay-control-bench, tests/src/control_bench.rs) is not wired into \
                       this table yet";
    vec![
        BenchRow::not_measured(
            CONVERGENCE_ROW,
            "Control plane: 3 agents converge on 1,000 endpoints",
            "s",
            Better::Lower,
            vec![Target::value_below(2.0)],
            WHY,
        ),
        BenchRow::not_measured(
            AGENT_RSS_ROW,
            "Control plane: agent resident memory",
            "MB",
            Better::Lower,
            vec![Target::value_below(30.0)],
            WHY,
        ),
    ]
}
