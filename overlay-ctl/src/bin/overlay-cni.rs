//! `overlay-cni`: the overlay's CNI plugin (see [`overlay_ctl::runtimes::cni_plugin`]).
//! Install it into the runtime's plugin directory (e.g. /opt/cni/bin) and name it in a
//! conflist: `{"type": "overlay-cni", "network": "net1"}`.
fn main() -> std::process::ExitCode {
    overlay_ctl::runtimes::cni_plugin::main()
}
