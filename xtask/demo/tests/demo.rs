//! The demo passes, run as `cargo xtask demo` runs it: the `overlay-demo` binary with
//! `overlay-ctl` beside it in the same target directory.
use std::{path::Path, process::Command};

use overlay_tests::harness::require_root;

/// Builds `overlay-ctl` into the directory cargo built the demo into (cargo gives an
/// integration test the paths of its own package's binaries only); a no-op when it is
/// up to date.
fn build_overlay_ctl_beside(demo: &Path) {
    let profile_dir = demo.parent().expect("the demo binary has a directory");
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory is in a target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("unexpected target layout: {}", demo.display()),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "overlay-ctl",
            "--bin",
            "overlay-ctl",
        ])
        .args(["--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(
        status.success(),
        "cargo build -p overlay-ctl failed: {status}"
    );
}

#[test]
fn the_demo_passes() {
    require_root();
    let demo = Path::new(env!("CARGO_BIN_EXE_overlay-demo"));
    build_overlay_ctl_beside(demo);
    let out = Command::new(demo).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("demo: PASS"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
