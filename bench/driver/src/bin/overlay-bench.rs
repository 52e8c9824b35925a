//! `overlay-bench`: the data-plane benchmark behind `cargo xtask bench` (run that; it
//! builds this in release mode and runs it as root).
//!
//! Builds three two-host topologies side by side — (a) no overlay, (b) the Linux VXLAN
//! device with a bridge and static entries, (c) this project's data plane — and measures,
//! round after round with the setups interleaved (a, b, c within every measurement):
//! single- and 4-stream TCP throughput (iperf3), the rate of 64-byte UDP datagrams
//! delivered, request/response latency (sockperf ping-pong, p50 and p99), machine CPU time
//! per gigabit; then the encap and decap programs alone with `BPF_PROG_TEST_RUN`. Writes
//! `latest.json` and `latest.md` (medians, ratios c/b and c/a, each target met or missed)
//! and prints the table.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use overlay_bench::{
    control_plane_rows,
    report::{fmt_value, BenchRow, Better, Machine, Measured, Report, Samples, SetupKind, Target},
    setups::{self, Setup},
    testrun::Fixture,
    tools::{self, Servers, INTERRUPTED},
};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Data-plane benchmark: no overlay vs Linux VXLAN vs this data plane")]
struct Args {
    /// Rounds; each round measures everything once on every setup.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Seconds per traffic measurement (iperf3 -t, the UDP flood, sockperf -t).
    #[arg(long, default_value_t = 3)]
    duration: u64,
    /// Kernel-timed BPF_PROG_TEST_RUN calls per program per round.
    #[arg(long, default_value_t = 100_000)]
    testrun_calls: usize,
    /// Stop starting new rounds once this many minutes have passed (at least one runs).
    #[arg(long, default_value_t = 10.0)]
    budget_minutes: f64,
    /// Where latest.json and latest.md go.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// Hand-written analysis of missed targets, by row id (JSON object).
    #[arg(long, default_value = "bench/notes.json")]
    notes: PathBuf,
    /// One line describing the machine beyond what is detected (shared? noisy?).
    #[arg(
        long,
        default_value = "virtual machine, shared with other workloads (noisy)"
    )]
    machine_note: String,
    /// Only these measurements (comma-separated): tcp1, tcp4, udp, rtt, testrun. For
    /// profiling (e.g. `perf record -a -g` meanwhile); a partial run writes nothing.
    #[arg(long, value_delimiter = ',', value_parser = ["tcp1", "tcp4", "udp", "rtt", "testrun"])]
    only: Vec<String>,
    /// Only these setups (letters, e.g. "c" or "bc"); a partial run writes nothing.
    #[arg(long, default_value = "abc")]
    setups: String,
    /// Revision of the measured tree, for the report.
    #[arg(long, default_value = "unknown")]
    revision: String,
}

/// The measurements of the traffic rows, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    Tcp1,
    Tcp4,
    Udp64,
    RttP50,
    RttP99,
    CpuPerGbit,
}

impl Metric {
    fn row(self, samples: [Samples; 3], duration: u64) -> BenchRow {
        // Issue #18's bar: ahead of Linux's vxlan in the median and in most rounds.
        let tcp_targets = vec![
            Target::ratio_cb_at_least(1.05),
            Target::ratio_ca_at_least(0.95),
            Target::rounds_cb_at_least(1.0, 0.75),
        ];
        let (id, name, unit, better, targets, method) = match self {
            Metric::Tcp1 => (
                "tcp_1_stream",
                "TCP throughput, 1 stream",
                "Gbit/s",
                Better::Higher,
                tcp_targets,
                format!("iperf3 -t {duration} -P 1, client container -> server container, received rate"),
            ),
            Metric::Tcp4 => (
                "tcp_4_streams",
                "TCP throughput, 4 streams",
                "Gbit/s",
                Better::Higher,
                tcp_targets,
                format!("iperf3 -t {duration} -P 4 (one iperf3 process), received rate"),
            ),
            Metric::Udp64 => (
                "udp_64b_rate",
                "UDP 64-byte datagrams delivered",
                "kpps",
                Better::Higher,
                vec![Target::ratio_cb_at_least(1.3)],
                format!(
                    "one sender thread, sendmmsg of 64 datagrams (64-byte payloads) as fast as it \
                     can for {duration} s; datagrams received by a recvmmsg receiver / sending time"
                ),
            ),
            Metric::RttP50 => (
                "rtt_p50",
                "Request/response round trip p50",
                "µs",
                Better::Lower,
                vec![Target::ratio_cb_at_most(0.9)],
                format!("sockperf ping-pong, UDP, 64-byte messages, --full-rtt, {duration} s"),
            ),
            Metric::RttP99 => (
                "rtt_p99",
                "Request/response round trip p99",
                "µs",
                Better::Lower,
                vec![],
                "same runs as p50".to_string(),
            ),
            Metric::CpuPerGbit => (
                "cpu_per_gbit",
                "CPU time per Gbit (1-stream TCP)",
                "ms",
                Better::Lower,
                vec![Target::ratio_cb_at_most(0.9)],
                "busy CPU time of the whole machine (/proc/stat: user+nice+system+irq+softirq) \
                 during the 1-stream iperf3 run / gigabits received; includes both iperf3 \
                 ends and whatever else ran on the machine meanwhile"
                    .to_string(),
            ),
        };
        BenchRow {
            id: id.into(),
            name: name.into(),
            unit: unit.into(),
            better,
            measured: Measured::Compared(samples),
            targets,
            method,
        }
    }
}

/// One measurement of one setup: the values (in the order of the metrics it feeds) and
/// the progress line's text.
type Measurement<'a> = dyn Fn(&Setup) -> Result<(Vec<f64>, String)> + 'a;

#[derive(Default)]
struct Collected {
    traffic: BTreeMap<Metric, [Samples; 3]>,
    encap: Samples,
    decap: Samples,
    testrun_detail: Vec<serde_json::Value>,
}

impl Collected {
    fn slot(&mut self, metric: Metric, kind: SetupKind) -> &mut Samples {
        &mut self.traffic.entry(metric).or_default()[kind.index()]
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overlay-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    preflight(args)?;
    let started = SystemTime::now();
    let clock = Instant::now();
    let traffic = ["tcp1", "tcp4", "udp", "rtt"]
        .iter()
        .any(|m| wanted(args, m));
    let kinds: Vec<SetupKind> = SetupKind::ALL
        .into_iter()
        .filter(|k| traffic && args.setups.contains(k.letter()))
        .collect();
    let complete = args.only.is_empty() && kinds.len() == SetupKind::ALL.len();
    let setups = start_setups(&kinds)?;
    let fixture = if wanted(args, "testrun") {
        Some(start_fixture()?)
    } else {
        None
    };
    // Warm-up, not counted: caches, ARP, TCP metrics, page pools.
    for (setup, _) in &setups {
        check_interrupted()?;
        let _ = tools::iperf_tcp(&setup.client, setup.server_ip, 1, Duration::from_secs(1));
        let _ = tools::sockperf_rtt(&setup.client, setup.server_ip, Duration::from_secs(1));
    }
    let mut data = Collected::default();
    let (rounds_done, remarks) = run_rounds(args, &setups, fixture.as_ref(), &mut data, clock)?;
    let testrun_detail = std::mem::take(&mut data.testrun_detail);
    let mut rows: Vec<BenchRow> = data
        .traffic
        .into_iter()
        .map(|(metric, samples)| metric.row(samples, args.duration))
        .collect();
    if fixture.is_some() {
        rows.extend(testrun_rows(data.decap, data.encap, args.testrun_calls));
    }
    if complete {
        rows.extend(control_plane_rows(
            &overlay_tests::cluster::Bins::beside_current_exe(),
            overlay_bench::CONTROL_PLANE_ROUNDS,
        ));
    }
    let report = Report {
        started,
        elapsed: clock.elapsed(),
        machine: Machine::detect(&args.machine_note),
        revision: args.revision.clone(),
        options: json!({
            "rounds": args.rounds,
            "duration_secs": args.duration,
            "testrun_calls": args.testrun_calls,
            "budget_minutes": args.budget_minutes,
            "setups": args.setups,
            "only": args.only,
            "testrun_rounds": testrun_detail,
        }),
        rounds_done,
        setups: setups
            .iter()
            .map(|(s, _)| (s.kind, s.description.clone()))
            .collect(),
        common: common_description(),
        rows,
        analysis: load_analysis(&args.notes)?,
        remarks,
    };
    drop(fixture);
    drop(setups);
    publish(&report, complete, &args.out_dir)
}

/// Whether the run includes measurement `what` (all do without --only).
fn wanted(args: &Args, what: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|o| o == what)
}

/// Refuses to start without root, the tools or sensible options; installs the handler
/// that lets Ctrl-C stop the run between measurements (and clean up).
fn preflight(args: &Args) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (network namespaces, BPF): run `cargo xtask bench` as root");
    }
    for (tool, arg) in [("iperf3", "--version"), ("sockperf", "--version")] {
        if tools::tool_version(tool, arg) == "missing" {
            bail!("{tool} is not installed: run `cargo xtask setup`");
        }
    }
    if args.rounds == 0 || args.duration == 0 {
        bail!("--rounds and --duration must be at least 1");
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    Ok(())
}

/// Builds each setup and starts its servers.
fn start_setups(kinds: &[SetupKind]) -> Result<Vec<(Setup, Servers)>> {
    let mut setups = Vec::new();
    for &kind in kinds {
        let setup = Setup::build(kind)
            .with_context(|| format!("build setup ({}) {}", kind.letter(), kind.title()))?;
        let servers = Servers::start(&setup.server, setup.server_ip)?;
        println!(
            "bench: ({}) {} ready: {} -> {}",
            kind.letter(),
            kind.title(),
            setup.client_ip,
            setup.server_ip
        );
        setups.push((setup, servers));
    }
    Ok(setups)
}

fn start_fixture() -> Result<Fixture> {
    let fixture = Fixture::new().context("BPF_PROG_TEST_RUN fixture")?;
    let probe = fixture.repeat_probe(1000)?;
    println!(
        "bench: test-run fixture ready; one call with repeat=1000 ends with encap verdict \
         {} ({} bytes) and decap verdict {} ({} bytes), not the full path: the repeats \
         run on the frame the first run rewrote, so each call runs the program once",
        probe[0].0, probe[0].1, probe[1].0, probe[1].1
    );
    Ok(fixture)
}

/// Runs rounds until `--rounds` or the budget; returns how many ran and why it stopped
/// early, if it did.
fn run_rounds(
    args: &Args,
    setups: &[(Setup, Servers)],
    fixture: Option<&Fixture>,
    data: &mut Collected,
    clock: Instant,
) -> Result<(usize, Vec<String>)> {
    let budget = Duration::from_secs_f64(args.budget_minutes * 60.0);
    for round in 1..=args.rounds {
        let round_started = Instant::now();
        let tag = format!("round {round}/{}", args.rounds);
        measure_traffic(args, setups, data, round, &tag)?;
        check_interrupted()?;
        if let Some(fixture) = fixture {
            measure_testrun(fixture, args.testrun_calls, data, round, &tag);
        }
        let per_round = round_started.elapsed();
        if round < args.rounds && clock.elapsed() + per_round > budget {
            let remark = format!(
                "stopped after {round} of {} rounds: another round ({:.0} s) would pass the \
                 {} min budget",
                args.rounds,
                per_round.as_secs_f64(),
                args.budget_minutes
            );
            println!("bench: {remark}");
            return Ok((round, vec![remark]));
        }
    }
    Ok((args.rounds, Vec::new()))
}

/// One round of the traffic measurements wanted, each on every setup back to back.
fn measure_traffic(
    args: &Args,
    setups: &[(Setup, Servers)],
    data: &mut Collected,
    round: usize,
    tag: &str,
) -> Result<()> {
    let duration = Duration::from_secs(args.duration);
    let mut measure = |what: &str, metrics: &[Metric], run: &Measurement<'_>| {
        measure_setups(
            setups,
            data,
            round,
            &format!("{tag} {{}} {what:<14}"),
            metrics,
            run,
        )
    };
    if wanted(args, "tcp1") {
        let tcp1 = |s: &Setup| {
            let r = tools::iperf_tcp(&s.client, s.server_ip, 1, duration)?;
            let shown = format!(
                "{:>6} Gbit/s  cpu {} ms/Gbit",
                fmt_value(r.gbit_per_s),
                fmt_value(r.cpu_ms_per_gbit)
            );
            Ok((vec![r.gbit_per_s, r.cpu_ms_per_gbit], shown))
        };
        measure("tcp 1 stream", &[Metric::Tcp1, Metric::CpuPerGbit], &tcp1)?;
    }
    if wanted(args, "tcp4") {
        let tcp4 = |s: &Setup| {
            let r = tools::iperf_tcp(&s.client, s.server_ip, 4, duration)?;
            Ok((
                vec![r.gbit_per_s],
                format!("{:>6} Gbit/s", fmt_value(r.gbit_per_s)),
            ))
        };
        measure("tcp 4 streams", &[Metric::Tcp4], &tcp4)?;
    }
    if wanted(args, "udp") {
        let udp = |s: &Setup| {
            let f = tools::udp_flood(&s.client, &s.server, s.client_ip, s.server_ip, duration)?;
            let shown = format!(
                "{:>6} kpps delivered (sent {})",
                fmt_value(f.delivered_kpps()),
                fmt_value(f.sent as f64 / f.secs / 1e3)
            );
            Ok((vec![f.delivered_kpps()], shown))
        };
        measure("udp 64 B", &[Metric::Udp64], &udp)?;
    }
    if wanted(args, "rtt") {
        let rtt = |s: &Setup| {
            let l = tools::sockperf_rtt(&s.client, s.server_ip, duration)?;
            let shown = format!(
                "p50 {} µs  p99 {} µs",
                fmt_value(l.p50_us),
                fmt_value(l.p99_us)
            );
            Ok((vec![l.p50_us, l.p99_us], shown))
        };
        measure("rtt 64 B", &[Metric::RttP50, Metric::RttP99], &rtt)?;
    }
    Ok(())
}

/// Runs one measurement on every setup and files its values (or the failure) under
/// `metrics`; `label` has a `{}` where the setup goes.
fn measure_setups(
    setups: &[(Setup, Servers)],
    data: &mut Collected,
    round: usize,
    label: &str,
    metrics: &[Metric],
    run: &Measurement<'_>,
) -> Result<()> {
    for (setup, _) in setups {
        check_interrupted()?;
        let kind = setup.kind;
        let label = label.replace("{}", &format!("({}) {:<15}", kind.letter(), kind.title()));
        match run(setup) {
            Ok((values, shown)) => {
                println!("bench: {label} {shown}");
                for (metric, value) in metrics.iter().zip(values) {
                    data.slot(*metric, kind).push(round, value);
                }
            }
            Err(e) => {
                println!("bench: {label} FAILED: {e:#}");
                for metric in metrics {
                    data.slot(*metric, kind).fail(round, format!("{e:#}"));
                }
            }
        }
    }
    Ok(())
}

/// One round of the encap and decap programs alone.
fn measure_testrun(fixture: &Fixture, calls: usize, data: &mut Collected, round: usize, tag: &str) {
    match fixture.measure(calls) {
        Ok(c) => {
            println!(
                "bench: {tag} test-run encap {} ns/packet ({} - empty TC {}), \
                 decap {} ns/packet ({} - empty XDP {})",
                fmt_value(c.encap_ns),
                fmt_value(c.encap_gross_ns),
                fmt_value(c.tc_empty_ns),
                fmt_value(c.decap_ns),
                fmt_value(c.decap_gross_ns),
                fmt_value(c.xdp_empty_ns)
            );
            data.encap.push(round, c.encap_ns);
            data.decap.push(round, c.decap_ns);
            data.testrun_detail.push(json!({
                "round": round,
                "encap_ns": c.encap_ns, "encap_gross_ns": c.encap_gross_ns,
                "tc_empty_ns": c.tc_empty_ns,
                "decap_ns": c.decap_ns, "decap_gross_ns": c.decap_gross_ns,
                "xdp_empty_ns": c.xdp_empty_ns,
            }));
        }
        Err(e) => {
            println!("bench: {tag} test-run FAILED: {e:#}");
            data.encap.fail(round, format!("{e:#}"));
            data.decap.fail(round, format!("{e:#}"));
        }
    }
}

/// The rows of the programs alone (BPF_PROG_TEST_RUN).
fn testrun_rows(decap: Samples, encap: Samples, calls: usize) -> Vec<BenchRow> {
    let method = |path: &str| {
        format!(
            "BPF_PROG_TEST_RUN in a namespace whose maps and routes give the full path \
             (verdict checked on every call: {path}); per round {calls} kernel-timed runs, one \
             per call, averaged (middle 98%), minus the same for an empty program of the same \
             type (the timer and test-run overhead, about 60-70 ns here). One run per call \
             because with a repeat count the kernel re-runs the program on the frame it \
             already rewrote"
        )
    };
    vec![
        BenchRow {
            id: "decap_ns".into(),
            name: "XDP decap program alone (test-run)".into(),
            unit: "ns/packet".into(),
            better: Better::Lower,
            measured: Measured::Own(decap),
            targets: vec![Target::value_at_most(60.0)],
            method: method("VXLAN 64-byte UDP from a known VTEP -> decapsulated, XDP_REDIRECT"),
        },
        BenchRow {
            id: "encap_ns".into(),
            name: "TC encap program alone (test-run)".into(),
            unit: "ns/packet".into(),
            better: Better::Lower,
            measured: Measured::Own(encap),
            targets: vec![Target::value_at_most(100.0)],
            method: method(
                "64-byte UDP to a remote container -> encapsulated, next hop from the cache the agent keeps, TC_ACT_REDIRECT",
            ),
        },
    ]
}

/// What every setup shares, with the tools' versions.
fn common_description() -> Vec<String> {
    let mut common = setups::common_description();
    common.push(format!(
        "tools: {}; {}",
        tools::tool_version("iperf3", "--version"),
        tools::tool_version("sockperf", "--version")
    ));
    common
}

/// The hand-written analysis of missed targets (none when the file is absent).
fn load_analysis(notes: &Path) -> Result<BTreeMap<String, String>> {
    match std::fs::read_to_string(notes) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON object of strings", notes.display())),
        Err(_) => Ok(BTreeMap::new()),
    }
}

/// Prints the table and the notes on missed targets; a complete run also writes
/// latest.json and latest.md.
fn publish(report: &Report, complete: bool, out_dir: &Path) -> Result<()> {
    println!();
    print!("{}", report.table());
    let notes = report.missed_notes();
    if !notes.is_empty() {
        println!("\n{notes}");
    }
    if complete {
        report
            .write(out_dir)
            .with_context(|| format!("write results to {}", out_dir.display()))?;
        println!(
            "\nbench: wrote {} and {}",
            out_dir.join("latest.json").display(),
            out_dir.join("latest.md").display()
        );
    } else {
        println!("\nbench: partial run (--only/--setups): nothing written");
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if tools::interrupted() {
        bail!("interrupted; everything built was removed, no results written");
    }
    Ok(())
}
