//! The `overlay-cni` plugin, built inside the test package (cargo gives integration tests
//! the paths of their own package's binaries only). Same code as overlay-ctl's
//! `overlay-cni` binary (both call [`overlay_ctl::runtimes::cni_plugin::main`]).
fn main() -> std::process::ExitCode {
    overlay_ctl::runtimes::cni_plugin::main()
}
