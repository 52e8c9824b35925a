//! `overlay-ctl`: the overlay node agent and operator CLI (see [`overlay_ctl::cli`]).
fn main() -> std::process::ExitCode {
    overlay_ctl::cli::main()
}
