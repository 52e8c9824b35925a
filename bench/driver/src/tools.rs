//! The traffic and the clocks: iperf3 for TCP, a sendmmsg/recvmmsg flood for small UDP
//! packets, sockperf for request/response latency, `/proc/stat` for CPU time. Every run
//! is bounded: tools get a deadline and are killed past it.
use std::{
    io::Read,
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use overlay_tests::harness::TestNs;

pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
pub const FLOOD_PORT: u16 = 9000;
/// Payload of the small-packet and latency tests.
pub const SMALL_PAYLOAD: usize = 64;
/// How long past its own duration a tool may take before it is killed.
const GRACE: Duration = Duration::from_secs(15);

/// Set by SIGINT/SIGTERM: measurements stop at the next check and everything is cleaned up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// A background process (a server), killed and reaped on drop.
pub struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPUs for the two ends of a measurement: on a machine with at least two, the client
/// side (and, for ping-pong, both sides) on CPU 0 and the server side on CPU 1, so
/// results do not depend on where the scheduler happens to put them.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

/// Pins the calling thread (and what it forks later) to `cpu`, if the machine has it.
pub fn pin_thread(cpu: usize) {
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpu >= online {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it; sched_setaffinity
    // reads it for the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Starts `program args` inside `ns` on `cpu` (the child inherits the namespace and the
/// affinity of the thread that forks it), output discarded.
pub fn spawn_in(ns: &TestNs, cpu: usize, program: &str, args: &[String]) -> Result<ChildGuard> {
    let child = ns
        .run(|| {
            pin_thread(cpu);
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .with_context(|| format!("cannot start {program}"))?;
    Ok(ChildGuard(child))
}

/// Runs `program args` inside `ns` on `cpu`, killed after `timeout` or on interruption;
/// returns its stdout on success.
pub fn run_in(
    ns: &TestNs,
    cpu: usize,
    program: &str,
    args: &[String],
    timeout: Duration,
) -> Result<String> {
    let mut child = ns
        .run(|| {
            pin_thread(cpu);
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .with_context(|| format!("cannot start {program}"))?;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline || interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    match status {
        None if interrupted() => bail!("{program}: interrupted"),
        None => bail!("{program}: killed after {timeout:?}"),
        Some(s) if !s.success() => {
            let detail = if err.trim().is_empty() { &out } else { &err };
            bail!("{program} failed ({s}): {}", last_lines(detail, 3))
        }
        Some(_) => Ok(out),
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// Busy CPU time of the whole machine so far (user, nice, system, irq, softirq; not
/// idle, iowait or steal), from `/proc/stat`.
pub fn cpu_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(busy * 1_000_000_000 / hz)
}

/// A server of each tool in the server container of a setup.
pub struct Servers {
    _iperf: ChildGuard,
    _sockperf: ChildGuard,
}

impl Servers {
    pub fn start(server: &TestNs, ip: Ipv4Addr) -> Result<Self> {
        let iperf = spawn_in(
            server,
            SERVER_CPU,
            "iperf3",
            &strings(&["-s", "-B", &ip.to_string(), "-p", &IPERF_PORT.to_string()]),
        )?;
        // Ping-pong: both ends on one CPU (see `sockperf_rtt`).
        let sockperf = spawn_in(
            server,
            CLIENT_CPU,
            "sockperf",
            &strings(&[
                "sr",
                "-i",
                &ip.to_string(),
                "-p",
                &SOCKPERF_PORT.to_string(),
            ]),
        )?;
        // Both bind within milliseconds; the first client retries anyway.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self {
            _iperf: iperf,
            _sockperf: sockperf,
        })
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// One iperf3 TCP result.
#[derive(Clone, Copy, Debug)]
pub struct TcpResult {
    /// Received by the server.
    pub gbit_per_s: f64,
    /// Machine CPU time per gigabit received, in milliseconds.
    pub cpu_ms_per_gbit: f64,
}

/// `iperf3 -c SERVER -t SECS -P STREAMS` from the client container.
pub fn iperf_tcp(
    client: &TestNs,
    server_ip: Ipv4Addr,
    streams: u32,
    duration: Duration,
) -> Result<TcpResult> {
    let args = strings(&[
        "-c",
        &server_ip.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &duration.as_secs().max(1).to_string(),
        "-P",
        &streams.to_string(),
        "-i",
        "0",
        "-J",
    ]);
    // The server takes one test at a time and may still be closing the previous one.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let cpu_before = cpu_busy();
        match run_in(client, CLIENT_CPU, "iperf3", &args, duration + GRACE) {
            Ok(out) => {
                let cpu = cpu_busy().saturating_sub(cpu_before);
                let json: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
                if let Some(e) = json.get("error").and_then(Value::as_str) {
                    bail!("iperf3: {e}");
                }
                let sum = &json["end"]["sum_received"];
                let bps = sum["bits_per_second"]
                    .as_f64()
                    .context("iperf3: no end.sum_received.bits_per_second")?;
                let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
                let gbit = bytes * 8.0 / 1e9;
                return Ok(TcpResult {
                    gbit_per_s: bps / 1e9,
                    cpu_ms_per_gbit: if gbit > 0.0 {
                        cpu.as_secs_f64() * 1e3 / gbit
                    } else {
                        f64::NAN
                    },
                });
            }
            Err(_) if attempt < 3 && !interrupted() => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Request/response round trips of 64-byte UDP messages (sockperf ping-pong).
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Both ends run on the same CPU: a round trip is then the data path twice and two
/// context switches. Across CPUs, each direction would add a cross-CPU wake-up of an
/// idle virtual CPU (about 20 µs each on the reference machine, and bimodal), which
/// would bury the differences between the data paths.
pub fn sockperf_rtt(client: &TestNs, server_ip: Ipv4Addr, duration: Duration) -> Result<Latency> {
    let args = strings(&[
        "pp",
        "-i",
        &server_ip.to_string(),
        "-p",
        &SOCKPERF_PORT.to_string(),
        "-t",
        &duration.as_secs().max(1).to_string(),
        "-m",
        &SMALL_PAYLOAD.to_string(),
        "--full-rtt",
    ]);
    let out = run_in(client, CLIENT_CPU, "sockperf", &args, duration + GRACE)?;
    parse_sockperf(&out)
}

/// Reads `---> percentile 50.000 =   49.834` lines (microseconds).
pub fn parse_sockperf(out: &str) -> Result<Latency> {
    let percentile = |p: &str| -> Option<f64> {
        out.lines().find_map(|line| {
            let rest = line.split("percentile ").nth(1)?;
            let (which, value) = rest.split_once('=')?;
            (which.trim() == p).then(|| value.trim().parse().ok())?
        })
    };
    match (percentile("50.000"), percentile("99.000")) {
        (Some(p50_us), Some(p99_us)) => Ok(Latency { p50_us, p99_us }),
        _ => bail!("sockperf printed no percentiles: {}", last_lines(out, 3)),
    }
}

/// A small-packet flood's result.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
}

impl Flood {
    /// Thousands of datagrams delivered per second.
    pub fn delivered_kpps(&self) -> f64 {
        self.received as f64 / self.secs / 1e3
    }
}

const BATCH: usize = 64;

/// Sends 64-byte UDP datagrams from the client to the server as fast as one thread can
/// (sendmmsg, 64 per call, on [`CLIENT_CPU`]) for `duration`, and counts what a
/// busy-polling receiver on the server (recvmmsg, on [`SERVER_CPU`]) gets. The whole
/// data path runs in the sender's context (veths hand packets on within the same CPU's
/// softirq), so the rate is one CPU's worth of data path. Rate = received / sending time.
pub fn udp_flood(
    client: &TestNs,
    server: &TestNs,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    duration: Duration,
) -> Result<Flood> {
    let sink = server
        .run(|| UdpSocket::bind((dst, FLOOD_PORT)))
        .context("bind the flood receiver")?;
    set_int_opt(&sink, libc::SO_RCVBUFFORCE, 4 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pin_thread(SERVER_CPU);
            receive_count(&sink, &stop)
        })
    };
    let sent = client.run(|| -> Result<(u64, f64)> {
        pin_thread(CLIENT_CPU);
        let socket = UdpSocket::bind((src, 0))?;
        socket.connect((dst, FLOOD_PORT))?;
        let payload = [0x5au8; SMALL_PAYLOAD];
        let mut iov: Vec<libc::iovec> = (0..BATCH)
            .map(|_| libc::iovec {
                iov_base: payload.as_ptr() as *mut _,
                iov_len: payload.len(),
            })
            .collect();
        let mut msgs = one_message_per_iovec(&mut iov);
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < duration && !interrupted() {
            // SAFETY: `msgs` holds BATCH valid headers whose buffers outlive the call.
            let n =
                unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        Ok((sent, started.elapsed().as_secs_f64()))
    });
    // Let the last packets arrive, then stop the receiver.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let received = receiver.join().expect("flood receiver");
    let (sent, secs) = sent?;
    Ok(Flood {
        sent,
        received,
        secs,
    })
}

/// One sendmmsg/recvmmsg header per buffer of `iov`; the headers point into `iov`, so
/// it must outlive them.
fn one_message_per_iovec(iov: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iov.iter_mut()
        .map(|v| {
            // SAFETY: all-zero is a valid mmsghdr; the fields set point at live data.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect()
}

fn receive_count(sink: &UdpSocket, stop: &AtomicBool) -> u64 {
    let mut bufs = vec![[0u8; 256]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs = one_message_per_iovec(&mut iov);
    let mut received = 0u64;
    loop {
        // Busy-polling (MSG_DONTWAIT, never sleeping): a sleeping receiver would make the
        // sender wake it for nearly every datagram, and a cross-CPU wake-up of an idle
        // virtual CPU costs more than the whole data path, the same in every setup.
        // SAFETY: `msgs` holds BATCH valid headers over live buffers.
        let n = unsafe {
            libc::recvmmsg(
                sink.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received += n as u64;
        } else if stop.load(Ordering::Relaxed) {
            return received;
        } else {
            std::hint::spin_loop();
        }
    }
}

fn set_int_opt(socket: &UdpSocket, option: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt on a live socket with a correctly sized int.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
}

/// The version line of a tool (for the report), or "missing".
pub fn tool_version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "missing".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sockperf_percentiles() {
        let out = "sockperf: ---> percentile 99.990 =  902.710\n\
                   sockperf: ---> percentile 99.000 =   72.567\n\
                   sockperf: ---> percentile 50.000 =   49.834\n";
        let l = parse_sockperf(out).unwrap();
        assert_eq!((l.p50_us, l.p99_us), (49.834, 72.567));
        assert!(parse_sockperf("nothing").is_err());
    }
}
