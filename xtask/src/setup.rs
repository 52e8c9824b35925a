//! `cargo xtask setup`: installs what building and testing need, from Debian's packages
//! and crates.io only. Idempotent, and a fast no-op when everything is present.
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{ebpf_build, step};

/// Debian packages, each with why it is needed.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "rustc 1.96 with a prebuilt core for bpfel-unknown-none",
    ),
    ("cargo-web", "the cargo matching that rustc"),
    (
        "libstd-rust-web-dev-bpf",
        "core/alloc for bpfel-unknown-none",
    ),
    ("llvm-22-dev", "LLVM 22 for building bpf-linker"),
    ("libpolly-22-dev", "needed by llvm-22-dev's link"),
    ("libzstd-dev", "bpf-linker build"),
    ("zlib1g-dev", "bpf-linker build"),
    ("libxml2-dev", "bpf-linker build"),
    ("iproute2", "ip, bridge, tc for inspecting the data plane"),
    ("iputils-ping", "ping across the overlay"),
    (
        "nftables",
        "nft: the agent's egress NAT (dataplane/egress/) is applied through it",
    ),
    ("iperf3", "TCP/UDP throughput (tests, benchmarks)"),
    (
        "sockperf",
        "request/response latency in `cargo xtask bench` (ping-pong p50/p99)",
    ),
    (
        "linux-perf",
        "profiling what misses a `cargo xtask bench` target (`perf record`)",
    ),
    ("bpftool", "inspecting programs and maps"),
    (
        "qemu-system-x86",
        "kernel CI: boots Debian kernels under TCG",
    ),
    ("busybox-static", "kernel CI: the guest's userland"),
    (
        "prometheus",
        "metrics test scrapes the agent with a real Prometheus",
    ),
    (
        "containerd",
        "CNI test: containerd 1.6 and `ctr run --cni` start real containers on the plugin",
    ),
    (
        "containernetworking-plugins",
        "CNI test: Debian's portmap (and bandwidth, tuning) chained after overlay-cni",
    ),
    (
        "docker.io",
        "Docker test: dockerd 20.10 runs real containers on the agent's overlay-net driver",
    ),
    (
        "etcd-server",
        "etcd 3.4: the tests start their own 3-member clusters from its `etcd` binary",
    ),
    (
        "etcd-client",
        "etcdctl, for inspecting the etcd store by hand",
    ),
    (
        "protobuf-compiler",
        "protoc: the etcd-client crate compiles etcd's gRPC .proto files at build time",
    ),
    (
        "libprotobuf-dev",
        "the well-known .proto files (google/protobuf/*.proto) etcd's protos import",
    ),
];

/// The service Debian's etcd-server package installs (and may start).
const DISTRO_ETCD_SERVICE: &str = "etcd";

pub const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn missing_apt_packages() -> Result<Vec<&'static str>> {
    let names: Vec<&str> = APT_PACKAGES.iter().map(|(n, _)| *n).collect();
    let output = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\\n"])
        .args(&names)
        .output()
        .context("cannot run dpkg-query: this needs a Debian machine")?;
    let listed = String::from_utf8_lossy(&output.stdout);
    Ok(names
        .into_iter()
        .filter(|name| {
            !listed
                .lines()
                .any(|line| line.split_whitespace().collect::<Vec<_>>() == [*name, "ii"])
        })
        .collect())
}

fn bpf_linker_ok() -> bool {
    ebpf_build::find_bpf_linker()
        .and_then(|path| Command::new(path).arg("--version").output().ok())
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

/// Whether `setup` has anything to do.
pub fn needed() -> Result<bool> {
    Ok(!missing_apt_packages()?.is_empty() || !bpf_linker_ok())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn run() -> Result<()> {
    let missing = missing_apt_packages()?;
    let linker = bpf_linker_ok();
    if missing.is_empty() && linker {
        println!("setup: everything is installed");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "setup needs root to install {}; rerun as root (sudo -E cargo xtask setup)",
            describe_missing(&missing, linker)
        );
    }
    if !missing.is_empty() {
        for name in &missing {
            let why = APT_PACKAGES
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, w)| *w)
                .unwrap_or("");
            println!("setup: will install {name} ({why})");
        }
        step("apt-get update", || {
            apt(&["update", "-q"])
                .context("apt-get update failed: is Debian's package registry reachable?")
        })?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(missing.iter().copied());
        step(
            &format!("apt-get install {} packages", missing.len()),
            || {
                apt(&args)
                    .context("apt-get install failed: is Debian's package registry reachable?")
            },
        )?;
        if missing.contains(&"etcd-server") {
            step("stop and disable the distribution's etcd service", || {
                keep_distro_etcd_stopped();
                Ok(())
            })?;
        }
    }
    if !linker {
        println!("setup: will install bpf-linker {BPF_LINKER_VERSION} (links the eBPF programs; built against LLVM 22, takes a minute or two)");
        step("cargo install bpf-linker", install_bpf_linker)?;
    }
    let still = missing_apt_packages()?;
    if !still.is_empty() || !bpf_linker_ok() {
        bail!(
            "setup finished but {} still missing",
            describe_missing(&still, bpf_linker_ok())
        );
    }
    println!("setup: done");
    Ok(())
}

fn describe_missing(missing: &[&str], linker: bool) -> String {
    let mut parts: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
    if !linker {
        parts.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    parts.join(", ")
}

/// Debian's etcd-server enables (and on a booted system starts) an `etcd` service on
/// the default ports with its data in /var/lib/etcd. The tests run their own clusters
/// and nothing here should leave a machine-wide daemon behind: stop and disable the one
/// the install just started, through systemd when it runs, else through the SysV
/// scripts. Best effort: on a container without an init neither exists, and
/// policy-rc.d already kept the service from starting.
fn keep_distro_etcd_stopped() {
    let systemd_runs = std::path::Path::new("/run/systemd/system").exists();
    let attempts: &[&[&str]] = if systemd_runs {
        &[&["systemctl", "disable", "--now", DISTRO_ETCD_SERVICE]]
    } else {
        &[
            // Offline: removes the unit's enablement links even without a running systemd.
            &["systemctl", "disable", DISTRO_ETCD_SERVICE],
            &["invoke-rc.d", DISTRO_ETCD_SERVICE, "stop"],
            &["update-rc.d", DISTRO_ETCD_SERVICE, "disable"],
        ]
    };
    for args in attempts {
        match Command::new(args[0]).args(&args[1..]).output() {
            Ok(out) if out.status.success() => println!("setup: {}", args.join(" ")),
            Ok(out) => println!(
                "setup: {} failed ({}), ignored: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(_) => println!("setup: no {} here, skipped", args[0]),
        }
    }
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!(
            "apt-get {} exited with {status}",
            args.first().unwrap_or(&"")
        );
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let llvm = "/usr/lib/llvm-22";
    let path = format!(
        "{llvm}/bin:{}",
        ebpf_build::path_with_cargo_bin().to_string_lossy()
    );
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        // Without it the build finds Debian's default llvm-config (LLVM 14) and fails.
        .env("LLVM_PREFIX", llvm)
        .env("PATH", path)
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status}): is crates.io reachable?");
    }
    Ok(())
}
