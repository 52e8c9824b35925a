//! `overlay-control-bench`: the control plane measured with real agents.
//!
//! - `overlay-control-bench [ENDPOINTS] [ROUNDS]`: the control-plane half of `cargo
//!   xtask bench`. Starts three agents against the Consul dev server, writes ENDPOINTS
//!   (1,000) endpoints of a remote node, and measures how long until every agent has them
//!   in its maps, and the agents' resident memory; ROUNDS (3) fresh clusters, one JSON
//!   line each.
//! - `overlay-control-bench scale`: many control-plane-only agents on Consul and etcd
//!   (issue #16; `cargo xtask bench-control`), see `overlay_bench::scale`.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use overlay_bench::{
    control,
    scale::{self, report, servers::Backend, ScaleOptions},
};
use overlay_tests::cluster::Bins;

/// The control plane measured with real agents (`overlay-ctl agent` processes).
///
/// Without a subcommand: three agents with a data plane converge on ENDPOINTS endpoints
/// (the control-plane rows of `cargo xtask bench`), ROUNDS times, one JSON line per round
/// (needs root). `scale`: the cluster-scale benchmark of issue #16.
#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Endpoints the three agents converge on.
    #[arg(default_value_t = 1_000)]
    endpoints: usize,
    /// Fresh clusters to measure.
    #[arg(default_value_t = 3)]
    rounds: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Many control-plane-only agents on one store: convergence, change delay under
    /// churn, store bytes and CPU per change, memory; against the targets.
    ///
    /// For each store and each size (a fresh store and fleet each): the IPAM keys are
    /// written, AGENTS `overlay-ctl agent --dataplane none` processes start (own node
    /// name, VTEP in 198.18.0.0/15, state dir), then the endpoints are written (spread
    /// over the agents' nodes, WRITERS in flight) and timed until every agent
    /// acknowledged (`applied/<node>`) an index at or after the last write, and each
    /// agent's status is checked to hold them all. Then CHURN_RATE endpoint changes per
    /// second (a create, then a delete, each with its IPAM key, as `run` does) for
    /// CHURN_SECONDS: per change, the delay from its endpoint write until every agent
    /// acknowledged its index (p50/p99); per agent, the store bytes read (its
    /// `store_bytes_read`) and CPU time (/proc) divided by the changes; then every
    /// agent's VmRSS. Last, AGENTS more agents start on the loaded store beside the first
    /// ones (nodes rebooting or joining) and are timed until every one acknowledged the
    /// store's state, then checked to hold every endpoint. Targets (#16): convergence
    /// < 5 s (both ways: while the endpoints are written, and of agents started on
    /// them), p99 < 250 ms, bytes per change at the largest size within 2x of the
    /// smallest, RSS < 30 MB at the largest.
    ///
    /// Writes OUT_DIR/NAME.md and OUT_DIR/NAME.json and prints the table. Exits 0 when
    /// every target was met, 1 when one was missed or a run failed, 2 on bad usage.
    /// Every process and temporary directory it starts is gone when it exits.
    Scale(ScaleArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreChoice {
    Consul,
    Etcd,
    Both,
}

#[derive(clap::Args)]
// A later --note or --out-dir (e.g. after `cargo xtask bench-control --`) wins.
#[command(args_override_self = true)]
struct ScaleArgs {
    /// Which store: the Consul dev server (`overlay-ctl dev-server`), one etcd 3.4
    /// member (/usr/bin/etcd, Debian's etcd-server), or both in turn.
    #[arg(long, value_enum, default_value = "both")]
    store: StoreChoice,
    /// Simulated nodes, one agent process each.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Cluster sizes in endpoints, comma-separated; bytes per change are compared
    /// between the smallest and the largest.
    #[arg(long, value_delimiter = ',', default_value = "2000,20000")]
    endpoints: Vec<usize>,
    /// Endpoint changes per second during the churn.
    #[arg(long, default_value_t = 50.0)]
    churn_rate: f64,
    /// Endpoint writes in flight while the cluster is loaded (as a busy cluster's many
    /// `run`s would send them).
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Run etcd with `--unsafe-no-fsync` (its writes then skip the disk's flush: not a
    /// deployment setting; to tell the disk's latency from the rest).
    #[arg(long)]
    etcd_unsafe_no_fsync: bool,
    /// How long the churn runs, in seconds.
    #[arg(long, default_value_t = 20.0)]
    churn_seconds: f64,
    /// How long the agents may take to start, or to converge (writes included), before
    /// a run fails.
    #[arg(long, default_value_t = 180)]
    timeout_seconds: u64,
    /// The `overlay-ctl` to run (agents and dev server) [default: the one beside this
    /// program, as `cargo build --release` puts it].
    #[arg(long)]
    overlay_ctl: Option<PathBuf>,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// The report's file name, without extension.
    #[arg(long, default_value = "control-scale")]
    name: String,
    /// A line about what was measured, for the report (the commit, the machine).
    #[arg(long, default_value = "")]
    note: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Scale(args)) => run_scale(args),
        None => run_legacy(cli.endpoints, cli.rounds),
    }
}

fn run_legacy(endpoints: usize, rounds: usize) -> ExitCode {
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

fn scale_options(args: &ScaleArgs) -> Result<ScaleOptions, String> {
    let overlay_ctl = args
        .overlay_ctl
        .clone()
        .unwrap_or_else(|| PathBuf::from(Bins::beside_current_exe().cli));
    if !overlay_ctl.exists() {
        return Err(format!(
            "{} is missing (build it: cargo build --release -p overlay-ctl, or pass --overlay-ctl)",
            overlay_ctl.display()
        ));
    }
    let mut sizes = args.endpoints.clone();
    sizes.sort_unstable();
    if args.agents == 0 || args.writers == 0 || sizes.is_empty() || sizes[0] == 0 {
        return Err("--agents, --writers and --endpoints must be positive".into());
    }
    if !(args.churn_rate > 0.0 && args.churn_seconds > 0.0) {
        return Err("--churn-rate and --churn-seconds must be positive".into());
    }
    let backends = match args.store {
        StoreChoice::Consul => vec![Backend::Consul],
        StoreChoice::Etcd => vec![Backend::Etcd],
        StoreChoice::Both => vec![Backend::Consul, Backend::Etcd],
    };
    if backends.contains(&Backend::Etcd)
        && !std::path::Path::new(scale::servers::ETCD_BINARY).exists()
    {
        return Err(format!(
            "{} is missing: install Debian's etcd-server (`cargo xtask setup` does), or pass --store consul",
            scale::servers::ETCD_BINARY
        ));
    }
    Ok(ScaleOptions {
        overlay_ctl,
        backends,
        agents: args.agents,
        sizes,
        churn_rate: args.churn_rate,
        churn_duration: Duration::from_secs_f64(args.churn_seconds),
        writers: args.writers,
        etcd_no_fsync: args.etcd_unsafe_no_fsync,
        timeout: Duration::from_secs(args.timeout_seconds),
    })
}

fn run_scale(args: ScaleArgs) -> ExitCode {
    let options = match scale_options(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The report is rewritten after every run, so an interrupted or failing run keeps
    // what it measured. Ctrl-C ends the run through the same drops as an error: every
    // agent, store and temporary directory goes.
    let write_report = |results: &scale::Results| {
        let markdown = report::markdown(&options, results, &args.note);
        let json = report::json(&options, results, &args.note);
        match report::write(&args.out_dir, &args.name, &markdown, &json) {
            Ok(()) => Some(markdown),
            Err(e) => {
                eprintln!("error: {e:#}");
                None
            }
        }
    };
    let results = runtime.block_on(async {
        tokio::select! {
            results = scale::run(&options, |r| { write_report(r); }) => Some(results),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    let Some(results) = results else {
        eprintln!(
            "interrupted: stopped every agent and store; {}/{}.md holds the runs that finished",
            args.out_dir.display(),
            args.name
        );
        return ExitCode::from(130);
    };
    let Some(markdown) = write_report(&results) else {
        return ExitCode::FAILURE;
    };
    println!("{markdown}");
    eprintln!(
        "scale: wrote {}/{}.md and .json",
        args.out_dir.display(),
        args.name
    );
    if report::all_met(&results) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
