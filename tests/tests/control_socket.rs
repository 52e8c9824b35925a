//! The agent's control socket is root-only whatever the umask: whoever can reach it can
//! put any namespace on any network (issue #14). The agent runs here with umask 000, so
//! a socket left to the umask would be world-writable; an unprivileged user (`nobody`)
//! is refused by the socket itself (its state directory is opened up to make sure) and
//! the CNI plugin run as that user changes nothing.
//!
//! Its own test binary: the umask is process-wide.
use std::{
    os::{
        fd::AsRawFd,
        unix::{
            fs::{MetadataExt, PermissionsExt},
            process::CommandExt,
        },
    },
    path::Path,
    process::{Command, Stdio},
};

use overlay_tests::{
    bins,
    cluster::{start_cluster, Bins, Node},
    cni::{self, call, overlay_conf, CniOut, Footprint},
    harness::{require_root, wait_until, TestNs},
    topology::Underlay,
};

const BINS: Bins = bins!();
const PLUGIN: &str = env!("CARGO_BIN_EXE_overlay-cni-test");
const NOBODY: u32 = 65534;

/// Makes `command` start in `node`'s network namespace as uid/gid `nobody`, without
/// groups; the returned namespace file must live until it is spawned.
fn as_nobody(node: &Node, command: &mut Command) -> std::fs::File {
    let ns = std::fs::File::open(node.ns.ns().path()).unwrap();
    let fd = ns.as_raw_fd();
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    ns
}

#[test]
fn control_socket_refuses_unprivileged_users() {
    require_root();
    // SAFETY: umask(2) cannot fail; this binary runs this one test.
    unsafe { libc::umask(0) };
    let underlay = Underlay::new();
    let (consul, mut nodes) = start_cluster(&BINS, &underlay, 1, None, &[]);
    let node = nodes.remove(0);
    node.cli(&["network", "create", "net1", "10.100.0.0/24"])
        .ok();
    wait_until(
        "the agent to apply net1",
        std::time::Duration::from_secs(10),
        || cni::map_entries(&node).get("NETWORKS") == Some(&2),
    );
    // Only the socket's own mode stands between other users and the agent.
    std::fs::set_permissions(&node.state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = node.state_dir.join("agent.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o600,
        "control socket mode {:o}",
        meta.mode() & 0o7777
    );
    assert_eq!(meta.uid(), 0);

    let container = TestNs::new("cnic");
    let netns = container.ns().path();
    let before = Footprint::of(&consul, &node);

    // The CLI as nobody.
    let mut status = Command::new(BINS.cli);
    status
        .arg("--state-dir")
        .arg(&node.state_dir)
        .args(["status", "--json"])
        .stdin(Stdio::null());
    let ns = as_nobody(&node, &mut status);
    let out = status.output().unwrap();
    drop(ns);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // The CNI plugin as nobody: refused before it changes anything.
    let conf = overlay_conf(&node, "net1", "1.0.0").to_string();
    let mut plugin = Command::new(PLUGIN);
    plugin
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_as_nobody_with_stdin(&node, &mut plugin, &conf);
    out.error(11);
    assert_eq!(cni::interface_address(netns, "eth0"), None);
    assert_eq!(Footprint::of(&consul, &node), before);

    // Root gets through the same socket.
    call(
        PLUGIN,
        &node,
        "ADD",
        "c1",
        Some(netns),
        "eth0",
        &overlay_conf(&node, "net1", "1.0.0"),
    )
    .ok();
    call(
        PLUGIN,
        &node,
        "DEL",
        "c1",
        Some(netns),
        "eth0",
        &overlay_conf(&node, "net1", "1.0.0"),
    )
    .ok();
    assert!(socket_is(Path::new(&socket)));
}

fn socket_is(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn run_as_nobody_with_stdin(node: &Node, command: &mut Command, stdin: &str) -> CniOut {
    use std::io::Write;
    let ns = as_nobody(node, command);
    let mut child = command.spawn().unwrap();
    drop(ns);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let out = CniOut {
        code: output.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout).unwrap_or_default(),
        stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        out.json["details"]
            .as_str()
            .is_some_and(|d| d.contains("Permission denied")),
        "{out:#?}"
    );
    out
}
