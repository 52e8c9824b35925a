//! Project tasks: `cargo xtask <command>`. Run `cargo xtask --help` for the list.
mod bench;
#[path = "../../overlay-ctl/ebpf_build.rs"]
#[allow(dead_code)]
mod ebpf_build;
mod setup;
mod test;
mod vm;
mod vm_pair;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test the overlay network", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, bpf-linker). Needs root;
    /// a fast no-op when everything is present.
    Setup,
    /// Build the eBPF programs (overlay-ebpf) for bpfel-unknown-none.
    BuildEbpf,
    /// Build everything and run a node agent in the foreground on IFACE, with the Consul
    /// dev server (bootstrapping the cluster) unless CONSUL_HTTP_ADDR points at a Consul.
    /// Ctrl-C stops both and leaves nothing behind.
    Run {
        /// Underlay interface. Default: the interface of the IPv4 default route.
        #[arg(long)]
        iface: Option<String>,
        /// Extra arguments for `overlay-ctl agent`.
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// The SocketPlane walkthrough on three simulated hosts (network namespaces) with the
    /// Consul dev server, narrated; ends with a pass/fail line and leaves nothing behind.
    Demo,
    /// The one test command: setup if needed, fmt, clippy, the eBPF build, unit and
    /// integration tests (as root, in network namespaces), then the integration tests in
    /// a VM on Debian's 6.1 kernel. Ends with "N passed, M failed".
    Test {
        /// Only run tests whose name contains this filter (checks still run).
        filter: Option<String>,
        /// Run the VM suite on every supported kernel (6.1 and 6.12), not just 6.1.
        #[arg(long)]
        all_kernels: bool,
    },
    /// The data-plane integration tests inside qemu VMs booting Debian's LTS cloud
    /// kernels (TCG). Ends with one "vm-test <release>: N passed, M failed" line per kernel.
    VmTest {
        /// Which kernel(s) to boot.
        #[arg(long, value_enum, default_value = "all")]
        kernel: vm::KernelChoice,
        /// Seconds one guest may run before it is considered hung and killed.
        #[arg(long, default_value_t = vm::DEFAULT_TIMEOUT.as_secs())]
        timeout: u64,
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
    },
    /// Measure the data plane against no overlay and the Linux VXLAN device (as root).
    ///
    /// Builds three two-host topologies side by side, each an underlay bridge with two
    /// hosts and one container per host, all network namespaces on this machine:
    /// (a) no overlay (plain routed veths, the ceiling), (b) the Linux VXLAN device with a
    /// bridge and static FDB/neighbour entries (Docker's classic overlay, the incumbent),
    /// (c) this project's eBPF data plane. The hosts' underlay veths get the same settings
    /// in all three.
    ///
    /// Every round measures, with (a), (b), (c) interleaved within each measurement:
    /// TCP throughput with 1 and 4 streams (iperf3), 64-byte UDP datagrams delivered per
    /// second (a sendmmsg flood), request/response round trips p50/p99 (sockperf
    /// ping-pong, both ends on one CPU), machine CPU time per gigabit; then the encap and
    /// decap programs alone through BPF_PROG_TEST_RUN (ns/packet, minus an empty
    /// program). The control-plane rows (3 agents converging on 1,000 endpoints, agent
    /// memory) are in the table as "not measured yet" until their measurement is wired in.
    ///
    /// Output: bench/results/latest.md (the table: medians, ratios c/b and c/a, each
    /// target met or missed, why from bench/notes.json) and bench/results/latest.json
    /// (every sample). The defaults take about 7 minutes; a noisy machine wants more
    /// rounds, not longer ones. To see why a target is missed, run one measurement on
    /// one setup for a while, e.g. `cargo xtask bench --setups c --only udp --rounds 1
    /// --duration 20` (or `--only testrun --rounds 20`), and in another shell
    /// `perf record -a -g -- sleep 10; perf report --children --comm overlay-bench`;
    /// the programs show up as bpf_prog_<tag>_*. Partial runs write nothing.
    Bench(bench::BenchArgs),
    /// The control plane at scale (issue #16): 100 control-plane-only agents, 2,000 and
    /// 20,000 endpoints, on the Consul dev server and on etcd.
    ///
    /// Builds overlay-control-bench and overlay-ctl in release mode and runs
    /// `overlay-control-bench scale`, passing every argument after `--` (see `cargo
    /// xtask bench-control -- --help`: `--store consul|etcd|both`, `--agents`,
    /// `--endpoints 2000,20000`, `--churn-rate`, `--churn-seconds`). Reports convergence,
    /// the change delay p50/p99 under churn, store bytes and agent CPU time per change,
    /// and agent memory, against the targets; writes
    /// bench/results/control-scale.{md,json}. About 5 minutes with the defaults.
    BenchControl(bench::BenchControlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf().map(|object| println!("built {}", object.display())),
        Task::Run { iface, agent_args } => run(iface, agent_args),
        Task::Demo => demo(),
        Task::Test {
            filter,
            all_kernels,
        } => test::run(filter.as_deref(), all_kernels),
        Task::VmTest {
            kernel,
            timeout,
            filter,
        } => vm::command(
            kernel,
            std::time::Duration::from_secs(timeout),
            filter.as_deref(),
        ),
        Task::Bench(args) => bench::run(args),
        Task::BenchControl(args) => bench::run_control(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs `f` between a start line and an end line with the elapsed time.
pub fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("==> {what}");
    let started = Instant::now();
    let result = f();
    let secs = started.elapsed().as_secs_f32();
    match &result {
        Ok(_) => println!("==> {what}: ok ({secs:.1}s)"),
        Err(_) => println!("==> {what}: FAILED ({secs:.1}s)"),
    }
    result
}

pub fn setup_if_needed() -> Result<()> {
    if setup::needed()? {
        step("setup (missing tools found)", setup::run)?;
    }
    Ok(())
}

fn build_ebpf() -> Result<PathBuf> {
    setup_if_needed()?;
    step("build eBPF programs", || {
        ebpf_build::build_ebpf(&workspace_root()).map_err(anyhow::Error::msg)
    })
}

/// `cargo <args>` in the workspace root, inheriting output.
pub fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn run(iface: Option<String>, agent_args: Vec<String>) -> Result<()> {
    if !setup::is_root() {
        bail!("the agent loads eBPF programs and needs root: sudo -E cargo xtask run");
    }
    build_ebpf()?;
    let own_consul = std::env::var_os("CONSUL_HTTP_ADDR").is_none()
        && !agent_args.iter().any(|a| a.starts_with("--consul"));
    step(
        "build overlay-ctl (the agent and the Consul dev server)",
        || {
            cargo(&[
                "build",
                "--release",
                "-p",
                "overlay-ctl",
                "--bin",
                "overlay-ctl",
            ])
        },
    )?;
    let release = workspace_root().join("target/release");
    // Ctrl-C reaches the children (same process group); they stop cleanly, then we do.
    // SAFETY: setting a signal disposition before any thread is started.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let mut dev_consul = None;
    let mut command = Command::new(release.join("overlay-ctl"));
    if own_consul {
        println!("==> CONSUL_HTTP_ADDR is not set: starting the Consul dev server on {DEV_CONSUL_ADDR} (in memory; set CONSUL_HTTP_ADDR to use a real Consul)");
        use std::os::unix::process::CommandExt as _;
        // Its own process group: Ctrl-C stops the agent first, which still needs Consul
        // to leave the cluster; the server is stopped after it.
        let child = Command::new(release.join("overlay-ctl"))
            .args(["dev-server", "--listen", DEV_CONSUL_ADDR])
            .process_group(0)
            .spawn()
            .context("cannot start overlay-ctl dev-server")?;
        dev_consul = Some(child);
        command.args(["--consul", DEV_CONSUL_ADDR]);
    }
    command.args(["agent", "--ephemeral"]);
    if own_consul {
        command.arg("--bootstrap");
    }
    if let Some(iface) = iface {
        command.arg("--iface").arg(iface);
    }
    command.args(agent_args);
    println!("==> running the agent (Ctrl-C stops it; --ephemeral leaves nothing behind). In another shell:");
    let cli = release.join("overlay-ctl");
    println!("    {} status", cli.display());
    println!("    {} network create net1 10.100.0.0/24", cli.display());
    println!("    {} run -n net1 -- sh", cli.display());
    let status = command.status().context("cannot start overlay-ctl agent")?;
    if let Some(mut child) = dev_consul {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    Ok(())
}

fn demo() -> Result<()> {
    if !setup::is_root() {
        bail!(
            "the demo creates network namespaces and loads eBPF programs: sudo -E cargo xtask demo"
        );
    }
    build_ebpf()?;
    step(
        "build overlay-ctl (agents, CLI, Consul dev server) and the demo (xtask/demo)",
        || {
            cargo(&[
                "build",
                "--release",
                "-p",
                "overlay-ctl",
                "--bin",
                "overlay-ctl",
                "-p",
                "overlay-demo",
                "--bin",
                "overlay-demo",
            ])
        },
    )?;
    let status = Command::new(workspace_root().join("target/release/overlay-demo"))
        .status()
        .context("cannot start overlay-demo")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}

/// Where `cargo xtask run` starts the Consul dev server when no Consul is configured.
const DEV_CONSUL_ADDR: &str = "127.0.0.1:8500";
