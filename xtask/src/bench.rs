//! `cargo xtask bench`: builds `overlay-bench` (the driver in bench/driver/) and
//! `overlay-ctl` in release mode and runs the driver as root; it prints a progress line per measurement and writes
//! `bench/results/latest.{json,md}`.
use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{bail, Context, Result};

use crate::{cargo, setup, setup_if_needed, step, workspace_root};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Rounds. Each round runs every measurement once on (a), (b) and (c), interleaved.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Seconds per traffic measurement (iperf3 -t, the UDP flood, sockperf -t). A round
    /// takes about 12 x this plus 12 s.
    #[arg(long, default_value_t = 3)]
    duration: u64,
    /// BPF_PROG_TEST_RUN calls per program per round (encap, decap, two empty programs).
    #[arg(long, default_value_t = 100_000)]
    testrun_calls: usize,
    /// No new round starts once this many minutes have passed.
    #[arg(long, default_value_t = 10.0)]
    budget_minutes: f64,
    /// Only these measurements, comma-separated: tcp1, tcp4, udp, rtt, testrun (e.g. to
    /// profile one with `perf record -a -g` meanwhile). A partial run writes nothing.
    #[arg(long, value_delimiter = ',', value_parser = ["tcp1", "tcp4", "udp", "rtt", "testrun"])]
    only: Vec<String>,
    /// Only these setups, by letter: "c", "bc"... A partial run writes nothing.
    #[arg(long, default_value = "abc")]
    setups: String,
    /// Describes the machine in the report, beyond the CPU, memory and kernel it detects.
    #[arg(
        long,
        default_value = "virtual machine, shared with other workloads (noisy)"
    )]
    machine_note: String,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if !setup::is_root() {
        bail!("the benchmark builds network namespaces and loads eBPF: sudo -E cargo xtask bench");
    }
    setup_if_needed()?;
    let binary = build_release("overlay-bench")?;
    let root = workspace_root();
    let mut command = Command::new(&binary);
    command
        .current_dir(&root)
        .arg("--rounds")
        .arg(args.rounds.to_string())
        .arg("--duration")
        .arg(args.duration.to_string())
        .arg("--testrun-calls")
        .arg(args.testrun_calls.to_string())
        .arg("--budget-minutes")
        .arg(args.budget_minutes.to_string())
        .arg("--out-dir")
        .arg(root.join("bench/results"))
        .arg("--notes")
        .arg(root.join("bench/notes.json"))
        .arg("--machine-note")
        .arg(&args.machine_note)
        .arg("--revision")
        .arg(revision());
    if !args.only.is_empty() {
        command.arg("--only").arg(args.only.join(","));
    }
    command.arg("--setups").arg(&args.setups);
    println!(
        "==> running {} ({} rounds of {} s measurements; Ctrl-C stops it and removes everything it built)",
        binary.display(),
        args.rounds,
        args.duration
    );
    // Replace this process so Ctrl-C reaches the benchmark, which cleans up after itself.
    Err(command.exec()).context("cannot start overlay-bench")
}

#[derive(clap::Args, Debug)]
pub struct BenchControlArgs {
    /// Arguments of `overlay-control-bench scale` (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// `cargo xtask bench-control`: the scale benchmark of the control plane.
pub fn run_control(args: BenchControlArgs) -> Result<()> {
    let binary = build_release("overlay-control-bench")?;
    let root = workspace_root();
    let mut command = Command::new(&binary);
    command
        .current_dir(&root)
        .arg("scale")
        .arg("--out-dir")
        .arg(root.join("bench/results"))
        .arg("--note")
        .arg(format!(
            "Commit {}; a shared 2-vCPU virtual machine (noisy).",
            revision()
        ))
        .args(&args.args);
    println!(
        "==> running {} scale (Ctrl-C stops it and removes everything it started)",
        binary.display()
    );
    // Replace this process so Ctrl-C reaches the benchmark, which cleans up after itself.
    Err(command.exec()).context("cannot start overlay-control-bench")
}

/// The commit measured, with "+changes" when the working tree differs from it.
fn revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .map(|s| !s.is_empty())
                .unwrap_or(false);
            if dirty {
                format!("{commit}+changes")
            } else {
                commit
            }
        }
        None => "unknown".into(),
    }
}

/// Builds a benchmark driver of `overlay-bench` and the `overlay-ctl` it runs (agents,
/// dev server) in release mode; returns the driver's path.
fn build_release(bin: &str) -> Result<std::path::PathBuf> {
    step(
        &format!("build {bin} and overlay-ctl (agents, dev server) (release)"),
        || {
            cargo(&[
                "build",
                "--release",
                "-p",
                "overlay-bench",
                "--bin",
                bin,
                "-p",
                "overlay-ctl",
                "--bin",
                "overlay-ctl",
            ])
        },
    )?;
    Ok(workspace_root().join("target/release").join(bin))
}
