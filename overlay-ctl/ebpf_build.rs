// The one way the kernel object is built, shared by `overlay-ctl/build.rs` (which embeds
// the object) and `cargo xtask build-ebpf` (which builds it on request). Std only.
//
// It follows ../shared/TOOLCHAIN.md: Debian's rustc 1.96 (whose sysroot ships a prebuilt
// `core` for bpfel-unknown-none), Debian's matching cargo, and bpf-linker 0.13 on PATH.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

pub const EBPF_TARGET: &str = "bpfel-unknown-none";
pub const EBPF_PACKAGE: &str = "overlay-ebpf";
pub const EBPF_BINARY: &str = "overlay";
pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";
pub const BPF_SYSROOT: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
pub const SETUP_HINT: &str = "run `cargo xtask setup` (as root) to install it";

/// Where the kernel object lands for a given target directory.
pub fn ebpf_object_path(ebpf_target_dir: &Path) -> PathBuf {
    ebpf_target_dir
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_BINARY)
}

/// The target directory of eBPF builds: separate from the host one because another
/// compiler builds it (sharing would make each toolchain rebuild the other's artifacts).
pub fn ebpf_target_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join("target").join("ebpf")
}

fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// PATH with the cargo bin directory (where `cargo install bpf-linker` puts it) first.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = cargo_bin_dir().into_iter().collect();
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap_or_default()
}

pub fn find_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&path_with_cargo_bin())
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// What is missing to build the kernel object, one line each.
pub fn missing_ebpf_tools() -> Vec<String> {
    let mut missing = Vec::new();
    if !Path::new(DEBIAN_RUSTC).is_file() {
        missing.push(format!("{DEBIAN_RUSTC} (Debian package rustc-web)"));
    }
    if !Path::new(DEBIAN_CARGO).is_file() {
        missing.push(format!("{DEBIAN_CARGO} (Debian package cargo-web)"));
    }
    if !Path::new(BPF_SYSROOT).is_dir() {
        missing.push(format!(
            "{BPF_SYSROOT} (Debian package libstd-rust-web-dev-bpf)"
        ));
    }
    if find_bpf_linker().is_none() {
        missing.push("bpf-linker 0.13 (cargo install bpf-linker)".to_string());
    }
    missing
}

/// Builds the kernel object and returns its path. Errors are one readable paragraph.
pub fn build_ebpf(workspace_root: &Path) -> Result<PathBuf, String> {
    let missing = missing_ebpf_tools();
    if !missing.is_empty() {
        return Err(format!(
            "cannot build the eBPF programs, missing: {}; {SETUP_HINT}",
            missing.join(", ")
        ));
    }
    let target_dir = ebpf_target_dir(workspace_root);
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(workspace_root)
        .args([
            "build",
            "--release",
            "--target",
            EBPF_TARGET,
            "-p",
            EBPF_PACKAGE,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", path_with_cargo_bin())
        .env("RUSTC", DEBIAN_RUSTC)
        // aya-ebpf uses one nightly feature; Debian's stable rustc allows it with this.
        .env("RUSTC_BOOTSTRAP", "1");
    // Whatever the outer build set for the host compiler must not leak into this one
    // (clippy's wrapper, static-linking flags of a VM-test build, rustup's toolchain).
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MAKEFLAGS",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {DEBIAN_CARGO}: {e}; {SETUP_HINT}"))?;
    if !status.success() {
        return Err(format!(
            "the eBPF build failed ({status}); rerun `cargo xtask build-ebpf` to see why"
        ));
    }
    let object = ebpf_object_path(&target_dir);
    check_object(&object)?;
    Ok(object)
}

/// Refuses an empty or non-ELF object, so nothing stale or empty is ever embedded.
pub fn check_object(object: &Path) -> Result<(), String> {
    let bytes =
        std::fs::read(object).map_err(|e| format!("cannot read {}: {e}", object.display()))?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(format!("{} is not an eBPF ELF object", object.display()));
    }
    Ok(())
}
