//! The `overlay-ctl` CLI, built inside the test package: cargo gives integration tests
//! the paths of their own package's binaries only (`CARGO_BIN_EXE_<name>`), and the
//! cluster tests run agents, commands and the Consul dev server (`dev-server`) as
//! separate processes. Same code as
//! `overlay-ctl` (both call [`overlay_ctl::cli::main`]).
fn main() -> std::process::ExitCode {
    overlay_ctl::cli::main()
}
