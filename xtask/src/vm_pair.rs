//! The two-guest scenario of `cargo xtask vm-test`: the data plane on a real NIC driver's
//! XDP path. Two qemu guests, each with one virtio-net-pci NIC, are joined by a socket
//! netdev whose two ends are the two ends of one `socketpair(AF_UNIX, SOCK_STREAM)` made
//! here (qemu gets its end as fd 3: no address, no port, nothing on the file system, and
//! the wire dies with the guests). Each guest boots the suite's initramfs with
//! `overlay.pair=N` on its command line, so its /init runs `overlay-vm-pair`
//! (tests/src/vm_pair.rs): the virtio NIC becomes its underlay (192.0.2.N/24), the data
//! plane is loaded and its XDP program attached to `virtio_net` in driver mode (generic
//! only if the kernel refuses; the reason is printed), one container, the other guest's
//! container as a remote endpoint.
//!
//! This side drives both over their serial consoles (a command per line on qemu's stdin,
//! one `VMPAIR-OK`/`VMPAIR-FAIL` answer per command on its stdout): ping both ways, a
//! 1 MiB TCP transfer each way (guest 2 serves while guest 1 sends, then the reverse)
//! whose byte counts and digests must match, then each container's `TcpInCsumErrors` and
//! `UdpInCsumErrors` must be zero and each data plane must have decapsulated the bulk in
//! XDP without drops. Every wait has a deadline; both qemus are killed however this ends.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::vm::{clean, Guest, Kernel, KERNEL_CMDLINE, QEMU};

/// The checks, in order; every run reports each one as passed or failed (not reached
/// counts as failed), so the totals do not depend on how far a run got.
pub const CHECKS: [&str; 10] = [
    "virtio_pair::guest1_xdp_on_virtio_net",
    "virtio_pair::guest2_xdp_on_virtio_net",
    "virtio_pair::ping_guest1_to_guest2",
    "virtio_pair::ping_guest2_to_guest1",
    "virtio_pair::tcp_1mib_guest1_to_guest2",
    "virtio_pair::tcp_1mib_guest2_to_guest1",
    "virtio_pair::no_csum_errors_guest1",
    "virtio_pair::no_csum_errors_guest2",
    "virtio_pair::xdp_decap_counters_guest1",
    "virtio_pair::xdp_decap_counters_guest2",
];
/// Bytes per direction: enough for hundreds of full-size frames through XDP, little
/// enough for TCG.
const TRANSFER_BYTES: u64 = 1 << 20;
const PORT: u16 = 5201;
/// Boot to `VMPAIR-READY` (TCG boot is 3-4 s; the data plane load and setup a few more).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// One command (the longest is a transfer: its own deadline in the guest is 120 s).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(200);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const GUEST_MEMORY_MB: &str = "768";
/// Lines of each guest's console shown when the scenario fails.
const TAIL_LINES: usize = 40;

/// What the scenario produced.
pub struct PairOutcome {
    /// `(check, Ok(details) | Err(why))`, one per [`CHECKS`] entry.
    pub checks: Vec<(&'static str, Result<String, String>)>,
    /// How each guest attached XDP (its READY line), or why setup failed.
    pub xdp: [Option<String>; 2],
    pub elapsed: Duration,
}

impl PairOutcome {
    pub fn passed(&self) -> u64 {
        self.checks.iter().filter(|(_, r)| r.is_ok()).count() as u64
    }

    pub fn failed(&self) -> u64 {
        self.checks.len() as u64 - self.passed()
    }

    /// One line on the XDP mode of both guests.
    pub fn xdp_line(&self) -> String {
        let mut parts = Vec::new();
        for (i, xdp) in self.xdp.iter().enumerate() {
            let what = match xdp {
                Some(x) if x.starts_with("native") => {
                    format!("native (driver) XDP on virtio_net accepted ({x})")
                }
                Some(x) => format!("native XDP on virtio_net NOT used: {x}"),
                None => "did not get as far as attaching XDP".into(),
            };
            parts.push(format!("guest {}: {what}", i + 1));
        }
        parts.join("; ")
    }
}

/// Whether `filter` (a libtest-style substring) selects any of the scenario's checks.
pub fn selected(filter: Option<&str>) -> bool {
    filter.is_none_or(|f| CHECKS.iter().any(|c| c.contains(f)))
}

/// Runs the scenario on `kernel` with the suite's `initrd`; logs go to
/// `work/pair-guest{1,2}.log`. Never fails as a whole: problems become failed checks.
pub fn run(kernel: &Kernel, initrd: &Path, work: &Path) -> PairOutcome {
    let started = Instant::now();
    let mut results: Vec<(&'static str, Result<String, String>)> = Vec::new();
    let mut xdp = [None, None];
    let aborted = match Pair::start(kernel, initrd, work) {
        Ok(mut pair) => {
            let result = scenario(&mut pair, &mut results, &mut xdp);
            if result.is_err() {
                pair.show_tails();
            }
            // A run that went wrong is not asked to shut down: its guests are killed.
            pair.stop(result.is_ok());
            result.err()
        }
        Err(e) => Some(e),
    };
    // Checks the run did not reach fail with the reason it stopped.
    let why = aborted
        .map(|e| format!("not reached: {e:#}"))
        .unwrap_or_else(|| "not reached".into());
    let checks = CHECKS
        .iter()
        .map(|name| match results.iter().position(|(n, _)| n == name) {
            Some(at) => results.swap_remove(at),
            None => (*name, Err(why.clone())),
        })
        .collect();
    PairOutcome {
        checks,
        xdp,
        elapsed: started.elapsed(),
    }
}

/// The scenario proper. `Err` is a failure of the run itself (a guest that died, hung or
/// could not set up); a failed check is recorded in `results` and the run goes on.
fn scenario(
    pair: &mut Pair,
    results: &mut Vec<(&'static str, Result<String, String>)>,
    xdp: &mut [Option<String>; 2],
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for g in 0..2 {
        let line = pair.wait_marker(g, deadline, |l| {
            l.contains("VMPAIR-READY ") || l.contains("VMPAIR-SETUP-FAILED")
        })?;
        if let Some(at) = line.find("VMPAIR-SETUP-FAILED") {
            bail!(
                "guest {} could not set up: {}",
                g + 1,
                &line[at + 19..].trim()
            );
        }
        let mode = line
            .split_once(" xdp=")
            .map(|(_, x)| x.trim().to_string())
            .unwrap_or_default();
        xdp[g] = Some(mode.clone());
        results.push((CHECKS[g], Ok(format!("XDP attached: {mode}"))));
    }

    for (g, check) in [(0, CHECKS[2]), (1, CHECKS[3])] {
        let peer = container_ip(2 - g);
        let reply = pair.command(g, &format!("ping {peer}"))?;
        results.push((check, reply));
    }

    for (sender, check) in [(0, CHECKS[4]), (1, CHECKS[5])] {
        let receiver = 1 - sender;
        // Different contents each way (the generator ignores a seed's lowest bit).
        let seed = 0x5eed_0000 + 0x100 * (sender as u64 + 1);
        let result = transfer(pair, sender, receiver, seed)?;
        results.push((check, result));
    }

    for g in 0..2 {
        let result = pair.command(g, "snmp")?.and_then(|snmp| {
            for key in ["TcpInCsumErrors", "UdpInCsumErrors"] {
                match field(&snmp, key) {
                    Some(0) => {}
                    Some(n) => return Err(format!("{key} is {n} in the container: {snmp}")),
                    None => return Err(format!("no {key} in the guest's answer: {snmp}")),
                }
            }
            Ok(snmp)
        });
        results.push((CHECKS[6 + g], result));
    }

    // Each guest received one bulk transfer: at least that many full frames went
    // through its XDP program (MSS <= 1410 with the overlay's 1450-byte MTU).
    let min_decap = TRANSFER_BYTES / 1410;
    for g in 0..2 {
        let result = pair.command(g, "counters")?.and_then(|counters| {
            let decap = field(&counters, "Decapsulated").unwrap_or(0);
            let encap = field(&counters, "Encapsulated").unwrap_or(0);
            if decap < min_decap {
                return Err(format!(
                    "XDP decapsulated {decap} packets, fewer than the {min_decap} frames of \
                     the 1 MiB received: {counters}"
                ));
            }
            // TC sees the sender's GSO packets (one count for up to 64 KB), so only
            // "some": the segments are counted by the other guest's XDP.
            if encap == 0 {
                return Err(format!("TC encapsulated nothing: {counters}"));
            }
            let drops: Vec<&str> = counters
                .split_whitespace()
                .filter(|kv| kv.starts_with("Drop"))
                .collect();
            if !drops.is_empty() {
                return Err(format!(
                    "the data plane dropped packets: {}",
                    drops.join(" ")
                ));
            }
            Ok(counters)
        });
        results.push((CHECKS[8 + g], result));
    }
    Ok(())
}

/// `sender`'s container sends [`TRANSFER_BYTES`] to `receiver`'s; both ends' counts and
/// digests must agree.
fn transfer(
    pair: &mut Pair,
    sender: usize,
    receiver: usize,
    seed: u64,
) -> Result<Result<String, String>> {
    let dst = container_ip(receiver + 1);
    if let Err(e) = pair.command(receiver, &format!("listen {PORT}"))? {
        return Ok(Err(format!("guest {} could not listen: {e}", receiver + 1)));
    }
    let sent = pair.command(
        sender,
        &format!("send {dst} {PORT} {TRANSFER_BYTES} {seed}"),
    )?;
    // Collect the receiver's side whatever the sender said (briefly if the sender
    // failed), so a listener never lingers.
    let wait = if sent.is_ok() { 150 } else { 5 };
    let received = pair.command(receiver, &format!("received {PORT} {wait}"))?;
    let (sent, received) = match (sent, received) {
        (Ok(s), Ok(r)) => (s, r),
        (s, r) => {
            return Ok(Err(format!(
                "sender: {}; receiver: {}",
                s.unwrap_or_else(|e| format!("FAILED {e}")),
                r.unwrap_or_else(|e| format!("FAILED {e}"))
            )))
        }
    };
    // "sent LEN DIGEST in ..." and "received LEN DIGEST".
    let words = |s: &str| -> Option<(u64, String)> {
        let mut w = s.split_whitespace().skip(1);
        Some((w.next()?.parse().ok()?, w.next()?.to_string()))
    };
    let (Some((sent_len, sent_digest)), Some((got_len, got_digest))) =
        (words(&sent), words(&received))
    else {
        return Ok(Err(format!(
            "unreadable answers: sender {sent:?}, receiver {received:?}"
        )));
    };
    if sent_len != TRANSFER_BYTES || got_len != TRANSFER_BYTES || sent_digest != got_digest {
        return Ok(Err(format!(
            "sent {sent_len} bytes with digest {sent_digest}, received {got_len} bytes with \
             digest {got_digest}"
        )));
    }
    Ok(Ok(format!(
        "{got_len} bytes, digest {got_digest} on both ends; {}",
        sent.split_once(" in ").map(|(_, t)| t).unwrap_or_default()
    )))
}

/// `KEY=N` in a guest's answer.
fn field(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Address of guest `role`'s container (as tests/src/vm_pair.rs assigns it).
fn container_ip(role: usize) -> String {
    format!("10.200.0.{}", 10 + role)
}

enum Event {
    Line(String),
    Closed,
}

/// The two running guests.
struct Pair {
    guests: Vec<Guest>,
    stdins: Vec<Option<ChildStdin>>,
    rx: mpsc::Receiver<(usize, Event)>,
    logs: Vec<fs::File>,
    log_paths: Vec<std::path::PathBuf>,
    lines: [Vec<String>; 2],
    booted: [bool; 2],
    /// Console streams (stdout, stderr) of each guest that reached EOF.
    eofs: [u8; 2],
    next_id: u64,
}

impl Pair {
    fn start(kernel: &Kernel, initrd: &Path, work: &Path) -> Result<Self> {
        let (end1, end2) = stream_socketpair()?;
        let (tx, rx) = mpsc::channel();
        let mut pair = Pair {
            guests: Vec::new(),
            stdins: Vec::new(),
            rx,
            logs: Vec::new(),
            log_paths: Vec::new(),
            lines: [Vec::new(), Vec::new()],
            booted: [false; 2],
            eofs: [0; 2],
            next_id: 1,
        };
        for (g, end) in [end1, end2].into_iter().enumerate() {
            let log_path = work.join(format!("pair-guest{}.log", g + 1));
            pair.logs.push(
                fs::File::create(&log_path)
                    .with_context(|| format!("cannot create {}", log_path.display()))?,
            );
            pair.log_paths.push(log_path);
            let mut child = spawn_guest(kernel, initrd, g + 1, end)?;
            pair.stdins.push(child.stdin.take());
            for stream in [
                Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
                Box::new(child.stderr.take().unwrap()),
            ] {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    let mut buf = Vec::new();
                    while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        if tx.send((g, Event::Line(line))).is_err() {
                            return;
                        }
                        buf.clear();
                    }
                    let _ = tx.send((g, Event::Closed));
                });
            }
            pair.guests.push(Guest(child));
            // Our copy of this guest's end closes here: the wire is between the qemus.
        }
        println!(
            "==> two guests ({}, -smp 1, {GUEST_MEMORY_MB} MiB each) joined by a \
             socketpair netdev; consoles in {} and {}",
            kernel.release,
            pair.log_paths[0].display(),
            pair.log_paths[1].display()
        );
        Ok(pair)
    }

    /// Takes every pending console line; returns when `deadline` passes or a line came.
    fn pump(&mut self, deadline: Instant) -> Result<()> {
        let now = Instant::now();
        if now >= deadline {
            bail!("deadline passed");
        }
        match self.rx.recv_timeout(deadline - now) {
            Ok((g, Event::Line(raw))) => {
                let _ = writeln!(self.logs[g], "{raw}");
                let line = clean(&raw);
                if line.contains("VMTEST-BOOTED") {
                    self.booted[g] = true;
                }
                if self.booted[g] || line.contains("Kernel panic") {
                    println!("  | g{} {line}", g + 1);
                }
                self.lines[g].push(line);
            }
            Ok((g, Event::Closed)) => {
                self.eofs[g] += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.eofs = [2; 2];
            }
        }
        Ok(())
    }

    /// Both of guest `g`'s console streams ended (qemu exited), every line read.
    fn closed(&self, g: usize) -> bool {
        self.eofs[g] >= 2
    }

    /// Waits for a line of guest `g` (0-based) matching `wanted`, consuming it.
    fn wait_marker(
        &mut self,
        g: usize,
        deadline: Instant,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let mut seen = 0;
        loop {
            if let Some(at) = self.lines[g][seen..].iter().position(|l| wanted(l)) {
                let line = self.lines[g].remove(seen + at);
                return Ok(line);
            }
            seen = self.lines[g].len();
            if let Some(panic) = self.lines[g][..]
                .iter()
                .find(|l| l.contains("Kernel panic"))
            {
                bail!("guest {} panicked: {panic}", g + 1);
            }
            if self.closed(g) {
                let status = self.guests[g].0.try_wait().ok().flatten();
                bail!(
                    "guest {} exited before answering (qemu {})",
                    g + 1,
                    status.map_or("still running".into(), |s| s.to_string())
                );
            }
            if Instant::now() >= deadline {
                bail!("guest {} did not answer in time; qemu killed", g + 1);
            }
            self.pump(deadline).ok();
        }
    }

    /// Sends `command` to guest `g` and waits for its answer: `Ok(Ok(details))` for
    /// `VMPAIR-OK`, `Ok(Err(reason))` for `VMPAIR-FAIL`.
    fn command(&mut self, g: usize, command: &str) -> Result<Result<String, String>> {
        let id = self.next_id;
        self.next_id += 1;
        println!("==> guest {}: {command}", g + 1);
        let stdin = self.stdins[g]
            .as_mut()
            .context("the guest's console is closed")?;
        stdin
            .write_all(format!("{id} {command}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| format!("cannot write to guest {}'s console", g + 1))?;
        let ok = format!("VMPAIR-OK {id} ");
        let fail = format!("VMPAIR-FAIL {id} ");
        let line = self.wait_marker(g, Instant::now() + COMMAND_TIMEOUT, |l| {
            l.contains(&ok) || l.contains(&fail)
        })?;
        if let Some(at) = line.find(&ok) {
            Ok(Ok(line[at + ok.len()..].trim().to_string()))
        } else {
            let at = line.find(&fail).unwrap_or(0);
            Ok(Err(line[at + fail.len()..].trim().to_string()))
        }
    }

    /// With `graceful`, asks both guests to quit and waits (briefly) for them to power
    /// off. Whatever still runs then is killed when the guests are dropped.
    fn stop(mut self, graceful: bool) {
        if graceful {
            for g in 0..2 {
                if let Some(stdin) = self.stdins[g].as_mut() {
                    let _ = writeln!(stdin, "{} quit", self.next_id);
                    let _ = stdin.flush();
                }
                self.next_id += 1;
            }
            self.stdins = vec![None, None];
            let deadline = Instant::now() + EXIT_TIMEOUT;
            while !(self.closed(0) && self.closed(1)) {
                if self.pump(deadline).is_err() {
                    println!("==> a guest did not power off within {EXIT_TIMEOUT:?}; killing it");
                    break;
                }
            }
        }
        // Dropping the guests kills (and reaps) any qemu still running.
    }

    fn show_tails(&self) {
        for g in 0..2 {
            let lines = &self.lines[g];
            let from = lines.len().saturating_sub(TAIL_LINES);
            println!(
                "guest {} console tail (all of it in {}):",
                g + 1,
                self.log_paths[g].display()
            );
            for line in &lines[from..] {
                println!("  | g{} {line}", g + 1);
            }
        }
    }
}

/// Two connected `AF_UNIX` stream sockets (close-on-exec).
fn stream_socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array on success.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("socketpair");
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The descriptor number qemu's socket netdev gets its end of the wire as.
const WIRE_FD: RawFd = 3;

fn spawn_guest(
    kernel: &Kernel,
    initrd: &Path,
    role: usize,
    wire: OwnedFd,
) -> Result<std::process::Child> {
    let parent = std::process::id();
    let mut command = Command::new(QEMU);
    command
        .args(["-machine", "q35,accel=tcg", "-cpu", "max"])
        .args(["-m", GUEST_MEMORY_MB, "-smp", "1"])
        .args(["-display", "none", "-vga", "none", "-monitor", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-nic", "none"])
        .args(["-netdev", &format!("socket,id=wire,fd={WIRE_FD}")])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=wire,mac=52:54:00:00:02:{role:02x}"),
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &format!("{KERNEL_CMDLINE} overlay.pair={role}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let raw = wire.as_raw_fd();
    // SAFETY: only async-signal-safe calls (prctl, getppid, dup2, fcntl) between fork
    // and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("xtask exited before qemu started"));
            }
            // The wire at fd 3, inherited (dup2 clears close-on-exec; if it already is
            // fd 3, clear the flag itself).
            if raw == WIRE_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, WIRE_FD) != WIRE_FD {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().with_context(|| {
        format!("cannot run {QEMU}: install qemu-system-x86 (cargo xtask setup)")
    })?;
    drop(wire);
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_of_answers() {
        let snmp = "TcpInCsumErrors=0 UdpInCsumErrors=3 TcpInSegs=812";
        assert_eq!(field(snmp, "TcpInCsumErrors"), Some(0));
        assert_eq!(field(snmp, "UdpInCsumErrors"), Some(3));
        assert_eq!(field(snmp, "InSegs"), None);
        assert_eq!(field(snmp, "Missing"), None);
    }

    #[test]
    fn counts_unreached_checks_as_failed() {
        let outcome = PairOutcome {
            checks: CHECKS
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        *c,
                        if i < 3 {
                            Ok(String::new())
                        } else {
                            Err("x".into())
                        },
                    )
                })
                .collect(),
            xdp: [
                Some("native; kernel reports xdp-attached=driver".into()),
                None,
            ],
            elapsed: Duration::ZERO,
        };
        assert_eq!((outcome.passed(), outcome.failed()), (3, 7));
        assert!(outcome.xdp_line().contains("guest 1: native (driver) XDP"));
        assert!(selected(None) && selected(Some("virtio_pair")) && !selected(Some("zzz")));
    }
}
