//! Guards for kernel state (removed on drop, also when a test fails) and deadline waits.
use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use overlay_ctl::{dataplane::datapath, dataplane::netlink, dataplane::netns::NetNs};

/// Fails (never skips) when the test cannot do what it is about: these tests need root
/// for namespaces and BPF.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, BPF); run `cargo xtask test` as root"
    );
}

/// A short name unique to this process and call (interface names allow 15 bytes).
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Waits until `condition` holds, polling; panics naming `what` at the deadline.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if condition() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A network namespace standing for a host or a container. Deleted on drop, which also
/// destroys every link inside it (and so both ends of veths that have one end inside).
pub struct TestNs {
    ns: Option<NetNs>,
}

impl TestNs {
    /// A new namespace with loopback up and IPv6 off (the overlay is IPv4; IPv6
    /// autoconfiguration chatter would make packet counts inexact).
    pub fn new(prefix: &str) -> Self {
        let ns = NetNs::create(&unique_name(prefix)).expect("create network namespace");
        let this = Self { ns: Some(ns) };
        this.block_on(|| async {
            let handle = netlink::connect().unwrap();
            let lo = netlink::link_by_name(&handle, "lo").await.unwrap();
            netlink::set_up(&handle, lo.index).await.unwrap();
        });
        this.run(|| {
            for key in [
                "ipv6.conf.all.disable_ipv6",
                "ipv6.conf.default.disable_ipv6",
            ] {
                overlay_ctl::dataplane::netns::write_net_sysctl(key, "1").unwrap();
            }
        });
        this
    }

    pub fn ns(&self) -> &NetNs {
        self.ns.as_ref().unwrap()
    }

    pub fn name(&self) -> &str {
        self.ns().name()
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.ns().run(f).expect("enter namespace")
    }

    /// Runs an async block (netlink work) inside the namespace.
    pub fn block_on<R: Send, Fut: std::future::Future<Output = R>>(
        &self,
        f: impl FnOnce() -> Fut + Send,
    ) -> R {
        self.ns().block_on(f).expect("enter namespace")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if let Some(ns) = self.ns.take() {
            let _ = ns.delete();
        }
    }
}

/// A link in the test process's own namespace, deleted on drop.
pub struct LinkGuard {
    pub name: String,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let handle = netlink::connect().unwrap();
                if let Ok(link) = netlink::link_by_name(&handle, &name).await {
                    let _ = netlink::delete_link(&handle, link.index).await;
                }
            })
        })
        .join();
    }
}

/// A pin directory on bpffs for one test's maps, removed on drop (after the data plane
/// that uses it, declared before it, is gone).
pub struct PinGuard {
    pub path: PathBuf,
}

impl PinGuard {
    pub fn new() -> Self {
        let path = Path::new("/sys/fs/bpf").join(unique_name("overlay-test-"));
        datapath::ensure_bpffs(&path).expect("bpffs");
        Self { path }
    }
}

impl Default for PinGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = datapath::remove_pins(&self.path);
    }
}

/// Runs an async block on a fresh current-thread runtime in the caller's namespace.
pub fn block_on<R>(f: impl std::future::Future<Output = R>) -> R {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// SIGKILLs every process whose command line names `dir` (unique to one test) or a
/// path under it. A bare substring match is not enough: unique names share prefixes
/// (`…x2` is the start of `…x27`), and one test's clean-up killed another test's etcd
/// member that way (seen as a leader turned zombie, with nothing in its log).
pub fn kill_processes_naming(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if names_path(&String::from_utf8_lossy(&cmdline), &needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether `cmdline` (arguments NUL-separated) names `dir` itself or a path under it.
fn names_path(cmdline: &str, dir: &str) -> bool {
    cmdline.match_indices(dir).any(|(at, _)| {
        matches!(
            cmdline[at + dir.len()..].chars().next(),
            None | Some('/' | '\0')
        )
    })
}

/// Asserts that a command exited 0, showing its output otherwise.
pub fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::names_path;

    #[test]
    fn a_directory_is_named_whole_not_as_the_prefix_of_another() {
        let cmdline = "etcd\0--data-dir\0/tmp/overlay-etcd-1x27/m0.data\0";
        assert!(names_path(cmdline, "/tmp/overlay-etcd-1x27"));
        assert!(!names_path(cmdline, "/tmp/overlay-etcd-1x2"));
        assert!(names_path("dockerd\0--root\0/tmp/d-1x2", "/tmp/d-1x2"));
        assert!(names_path("x\0/tmp/d-1x2\0y", "/tmp/d-1x2"));
    }
}
