//! `overlay-control-bench [ENDPOINTS] [ROUNDS]`: the control-plane half of `cargo xtask
//! bench`. Starts three agents against the Consul dev server, writes ENDPOINTS (1,000)
//! endpoints of a remote node, and measures how long until every agent has them in its
//! maps, and the agents' resident memory; ROUNDS (3) fresh clusters, one JSON line each.
use std::process::ExitCode;

use overlay_bench::control;
use overlay_tests::cluster::Bins;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let endpoints: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let bins = Bins::beside_current_exe();
    for round in 1..=rounds {
        eprintln!("control plane: round {round}/{rounds}: 3 agents, {endpoints} endpoints");
        match control::measure(&bins, 3, endpoints) {
            Ok(r) => println!(
                "{}",
                serde_json::json!({
                    "endpoints": r.endpoints,
                    "agents": r.agents,
                    "converge_ms": r.converge.as_secs_f64() * 1000.0,
                    "writes_ms": r.writes.as_secs_f64() * 1000.0,
                    "agent_rss_bytes": r.agent_rss,
                })
            ),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
