//! The guest program of the two-guest virtio-net test (`cargo xtask vm-test`): the guest's
//! /init runs it instead of the test list when the kernel command line names a pair role.
//! See [`overlay_tests::vm_pair`].
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(overlay_tests::vm_pair::main() as u8)
}
