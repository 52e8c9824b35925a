//! Builds the kernel programs (`overlay-ebpf`) and hands the object to `include_bytes!`.
//! The build always goes through the same code as `cargo xtask build-ebpf`, so the
//! embedded object can never be stale or empty: either it is rebuilt from the current
//! sources here, or this build fails saying what to install.
#[path = "ebpf_build.rs"]
mod ebpf_build;

use std::{env, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let workspace_root = manifest_dir.parent().unwrap().to_path_buf();
    for input in [
        "overlay-ebpf/src",
        "overlay-ebpf/Cargo.toml",
        "overlay-common/src",
        "overlay-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace_root.join(input).display()
        );
    }
    println!("cargo:rerun-if-changed=ebpf_build.rs");
    match ebpf_build::build_ebpf(&workspace_root) {
        Ok(object) => {
            let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("overlay.bpf.o");
            std::fs::copy(&object, &out).expect("copy eBPF object into OUT_DIR");
        }
        Err(message) => {
            eprintln!("error: {message}");
            std::process::exit(1);
        }
    }
}
