//! The guest side of the two-guest virtio-net test of `cargo xtask vm-test`: one of two
//! qemu guests whose virtio-net NICs are joined by a socket netdev. The guest is one
//! overlay host: its virtio NIC is the underlay, the data plane is loaded with the
//! library and bound to the NIC by the agent's own code (`--decap auto`), which attaches
//! the XDP program to `virtio_net` in driver (native) mode and decapsulates at TC ingress
//! only if the driver refuses, with the refusal printed. One network,
//! one local container namespace, the other guest's container as a remote endpoint.
//!
//! The host (xtask/src/vm_pair.rs) drives both guests over their serial consoles: it
//! writes one command per line (`<id> <verb> <args>`) and reads the answer marker, one per
//! command: `VMPAIR-OK <id> <details>` or `VMPAIR-FAIL <id> <reason>`. Every command has
//! its own deadline in the guest too, so a guest never blocks forever.
use std::{
    collections::{BTreeMap, HashMap},
    io::{self, BufRead, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::TryStreamExt;
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
use overlay_common::{Counter, EndpointKey, EndpointValue, NetworkInfo, VtepInfo, VXLAN_OVERHEAD};
use overlay_ctl::{
    dataplane::datapath::{Datapath, XdpAttachMode},
    dataplane::endpoint::{self, EndpointSpec},
    dataplane::netlink::{self, LinkInfo},
    dataplane::underlay::DecapMode,
};

use crate::{
    harness::{block_on, PinGuard, TestNs},
    net,
};

/// The kernel command-line parameter that makes the guest's /init run this instead of
/// the test list: `overlay.pair=1` or `overlay.pair=2`.
pub const CMDLINE_PARAM: &str = "overlay.pair=";
pub const VNI: u32 = 4242;
pub const SUBNET: &str = "10.200.0.0/24";
pub const UNDERLAY_PREFIX: u8 = 24;

/// Underlay (VTEP) address of guest `role`.
pub fn underlay_ip(role: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, role)
}

/// Address of the container of guest `role`.
pub fn container_ip(role: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 10 + role)
}

/// The role (1 or 2) named on the kernel command line.
pub fn role_from_cmdline(cmdline: &str) -> Option<u8> {
    cmdline
        .split_whitespace()
        .find_map(|word| word.strip_prefix(CMDLINE_PARAM))
        .and_then(|role| role.parse().ok())
        .filter(|role| *role == 1 || *role == 2)
}

/// One guest: the data plane on its virtio NIC and its container. Field order is drop
/// order: the data plane (and its attachments) goes before its pins and the container.
pub struct PairNode {
    datapath: Datapath,
    _pins: PinGuard,
    container: TestNs,
    underlay: LinkInfo,
    role: u8,
    listeners: HashMap<u16, mpsc::Receiver<io::Result<(usize, u64)>>>,
    /// How XDP ended up attached, for the READY line.
    pub xdp_summary: String,
}

impl PairNode {
    pub fn setup(role: u8) -> Result<Self> {
        for key in [
            "ipv6.conf.all.disable_ipv6",
            "ipv6.conf.default.disable_ipv6",
        ] {
            overlay_ctl::dataplane::netns::write_net_sysctl(key, "1")?;
        }
        let underlay = block_on(async {
            let handle = netlink::connect()?;
            let links = netlink::list_links(&handle).await?;
            let nic = links
                .into_iter()
                .find(|l| l.name != "lo")
                .context("the guest has no network interface besides lo")?;
            netlink::add_address(&handle, nic.index, underlay_ip(role), UNDERLAY_PREFIX).await?;
            netlink::set_up(&handle, nic.index).await?;
            anyhow::Ok(netlink::link_by_index(&handle, nic.index).await?)
        })?;
        let driver = driver_of(&underlay.name);
        if driver != "virtio_net" {
            bail!(
                "the underlay {} is driven by {driver:?}, not virtio_net",
                underlay.name
            );
        }

        let pins = PinGuard::new();
        let mut datapath = Datapath::load(&pins.path).context("load the data plane")?;
        // Bound as the agent binds a node (`--decap auto`): native XDP on a NIC driver,
        // TC ingress if the driver refuses it (the summary then says why).
        overlay_ctl::dataplane::underlay::enable_forwarding()?;
        let setup = overlay_ctl::dataplane::underlay::attach(
            &mut datapath,
            &underlay,
            underlay_ip(role),
            DecapMode::Auto,
            XdpAttachMode::Native,
        )?;
        let xdp_summary = if setup.decap_hook == "xdp (native)" {
            "native".to_string()
        } else {
            format!(
                "native-refused, decap at {}: {}",
                setup.decap_hook, setup.reason
            )
        };
        let reported = block_on(xdp_attached(underlay.index))?;
        let xdp_summary = format!("{xdp_summary}; kernel reports {reported}");

        let peer = 3 - role;
        for (vtep, info) in [
            (underlay_ip(role), VtepInfo::local()),
            (underlay_ip(peer), VtepInfo::remote()),
        ] {
            datapath.upsert_vtep(vtep, &info)?;
        }
        let subnet: Ipv4Network = SUBNET.parse().unwrap();
        let gateway = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let mtu = underlay.mtu - VXLAN_OVERHEAD;
        datapath.upsert_network(
            VNI,
            &NetworkInfo::new(subnet.network(), subnet.mask(), gateway, mtu),
        )?;
        datapath.upsert_subnet(subnet, VNI)?;

        let container = TestNs::new("ctr");
        let spec = EndpointSpec {
            host_ifname: format!("ovpair{role}"),
            container_ifname: "eth0".into(),
            ip: container_ip(role),
            subnet,
            gateway,
            mac: endpoint::mac_for(container_ip(role)),
            mtu,
            keep_existing_default_route: false,
        };
        let plumbed = block_on(async {
            let handle = netlink::connect()?;
            anyhow::Ok(endpoint::plumb(&handle, container.ns(), &spec).await?)
        })
        .context("plumb the container")?;
        endpoint::attach(&mut datapath, VNI, &spec, &plumbed)
            .context("attach the container program")?;
        let peer_ip = container_ip(peer);
        datapath.upsert_endpoint(
            EndpointKey::new(VNI, peer_ip),
            &EndpointValue::remote(underlay_ip(peer), endpoint::mac_for(peer_ip)),
        )?;
        Ok(Self {
            datapath,
            _pins: pins,
            container,
            underlay,
            role,
            listeners: HashMap::new(),
            xdp_summary,
        })
    }

    /// The READY line's details (`xdp=` last: the host reads it to the end of the line).
    pub fn describe(&self) -> String {
        format!(
            "role={} underlay={} driver=virtio_net vtep={} container={} offloads: {} xdp={}",
            self.role,
            self.underlay.name,
            underlay_ip(self.role),
            container_ip(self.role),
            virtio_offloads(&self.underlay.name),
            self.xdp_summary
        )
    }

    /// Runs one command; `Ok` is the details of a `VMPAIR-OK` line.
    pub fn execute(&mut self, verb: &str, args: &[&str]) -> Result<String> {
        match (verb, args) {
            ("ping", [dst]) => self.ping(dst.parse()?),
            ("listen", [port]) => self.listen(port.parse()?),
            ("send", [dst, port, len, seed]) => {
                self.send(dst.parse()?, port.parse()?, len.parse()?, seed.parse()?)
            }
            ("received", [port, secs]) => {
                self.received(port.parse()?, Duration::from_secs(secs.parse()?))
            }
            ("snmp", []) => self.snmp(),
            ("counters", []) => self.counters(),
            _ => bail!("unknown command {verb} {args:?}"),
        }
    }

    /// One echo until the first reply (ARP on both sides), then five more that must
    /// all come back: three small, two of nearly the container MTU.
    fn ping(&self, dst: Ipv4Addr) -> Result<String> {
        let started = Instant::now();
        let first = self
            .container
            .ns()
            .run(|| net::ping_until_reply(dst, Duration::from_secs(30)))?;
        if !first {
            bail!("no echo reply from {dst} within 30s");
        }
        let first_after = started.elapsed();
        let big = (self.datapath_mtu()? as usize) - 20 - 8;
        let sizes = [56, 56, 56, big, big];
        let replies = self.container.ns().run(|| {
            sizes
                .iter()
                .enumerate()
                .filter(|(i, len)| net::ping(dst, 100 + *i as u16, **len, Duration::from_secs(5)))
                .count()
        })?;
        if replies != sizes.len() {
            bail!(
                "{replies} of {} echo replies from {dst} (payloads {sizes:?})",
                sizes.len()
            );
        }
        Ok(format!(
            "{}/{} replies from {dst} (payloads {sizes:?}), first after {:.1}s",
            replies,
            sizes.len(),
            first_after.as_secs_f32()
        ))
    }

    fn datapath_mtu(&self) -> Result<u32> {
        Ok(self.underlay.mtu - VXLAN_OVERHEAD)
    }

    /// Binds a TCP sink in the container and reads one connection to EOF on a thread.
    fn listen(&mut self, port: u16) -> Result<String> {
        let ip = container_ip(self.role);
        let listener = self
            .container
            .ns()
            .run(|| TcpListener::bind(SocketAddrV4::new(ip, port)))?
            .with_context(|| format!("bind {ip}:{port}"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(net::receive_stream(&listener, Duration::from_secs(120)));
        });
        self.listeners.insert(port, rx);
        Ok(format!("listening on {ip}:{port}"))
    }

    fn send(&self, dst: Ipv4Addr, port: u16, len: usize, seed: u64) -> Result<String> {
        let data = net::pattern(len, seed);
        let digest = net::digest(&data);
        let started = Instant::now();
        self.container
            .ns()
            .run(|| {
                let dst = SocketAddrV4::new(dst, port);
                let stream = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(30))?;
                net::send_stream(stream, &data, Duration::from_secs(120))
            })?
            .with_context(|| format!("send {len} bytes to {dst}:{port}"))?;
        let secs = started.elapsed().as_secs_f64();
        Ok(format!(
            "sent {len} {digest:016x} in {secs:.2}s ({:.1} Mbit/s)",
            len as f64 * 8.0 / secs / 1e6
        ))
    }

    /// Waits up to `wait` for the sink on `port` to have read its connection to EOF.
    fn received(&mut self, port: u16, wait: Duration) -> Result<String> {
        let rx = self
            .listeners
            .remove(&port)
            .with_context(|| format!("nothing listens on port {port}"))?;
        let (len, digest) = rx
            .recv_timeout(wait)
            .map_err(|e| anyhow!("the receiver on port {port} did not finish: {e}"))?
            .with_context(|| format!("receive on port {port}"))?;
        Ok(format!("received {len} {digest:016x}"))
    }

    /// The container namespace's checksum-error counters from /proc/net/snmp.
    fn snmp(&self) -> Result<String> {
        let text = self
            .container
            .ns()
            .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
        let table = net::parse_snmp(&text);
        let mut out = Vec::new();
        for (proto, field) in [
            ("Tcp", "InCsumErrors"),
            ("Udp", "InCsumErrors"),
            ("Tcp", "InSegs"),
            ("Tcp", "RetransSegs"),
            ("Tcp", "InErrs"),
            ("Ip", "InReceives"),
        ] {
            let value = table
                .get(&(proto.to_string(), field.to_string()))
                .with_context(|| format!("/proc/net/snmp has no {proto} {field}"))?;
            out.push(format!("{proto}{field}={value}"));
        }
        Ok(out.join(" "))
    }

    /// The data plane's packet counters summed over VNIs, the non-zero ones.
    fn counters(&self) -> Result<String> {
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for ((_, counter), value) in self.datapath.counters()? {
            *sums.entry(format!("{counter:?}")).or_default() += value.packets;
        }
        // The non-zero ones, and always the two that the host checks.
        let checked = [Counter::Encapsulated, Counter::Decapsulated].map(|c| format!("{c:?}"));
        for name in &checked {
            sums.entry(name.clone()).or_default();
        }
        Ok(sums
            .iter()
            .filter(|(name, v)| **v > 0 || checked.contains(name))
            .map(|(name, v)| format!("{name}={v}"))
            .collect::<Vec<_>>()
            .join(" "))
    }
}

/// The driver of network interface `name`, from sysfs.
fn driver_of(name: &str) -> String {
    std::fs::read_link(format!("/sys/class/net/{name}/device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "none".to_string())
}

/// The negotiated virtio-net offload features of `name` (sysfs `features`, one 0/1
/// character per feature bit). A socket netdev carries no virtio-net header, so qemu
/// offers none of them: the guest finishes every checksum before the wire.
fn virtio_offloads(name: &str) -> String {
    let bits = std::fs::read_to_string(format!("/sys/class/net/{name}/device/features"))
        .unwrap_or_default();
    let bit = |n: usize| bits.as_bytes().get(n).map_or('?', |b| *b as char);
    // VIRTIO_NET_F_CSUM 0, GUEST_CSUM 1, GUEST_TSO4 7, HOST_TSO4 11, MRG_RXBUF 15.
    format!(
        "csum={} guest_csum={} host_tso4={} guest_tso4={} mrg_rxbuf={}",
        bit(0),
        bit(1),
        bit(11),
        bit(7),
        bit(15)
    )
}

/// What the kernel reports about the XDP program on `ifindex` (IFLA_XDP_ATTACHED).
async fn xdp_attached(ifindex: u32) -> Result<String> {
    let handle = netlink::connect()?;
    let mut links = handle.link().get().match_index(ifindex).execute();
    let message = links
        .try_next()
        .await?
        .with_context(|| format!("no link #{ifindex}"))?;
    let mut attached = None;
    for attribute in &message.attributes {
        if let LinkAttribute::Xdp(xdp) = attribute {
            for x in xdp {
                if let LinkXdp::Attached(mode) = x {
                    attached = Some(match mode {
                        XdpAttached::Driver => "driver".to_string(),
                        XdpAttached::SocketBuffer => "generic".to_string(),
                        other => format!("{other:?}"),
                    });
                }
            }
        }
    }
    Ok(format!(
        "xdp-attached={}",
        attached.unwrap_or_else(|| "none".into())
    ))
}

/// An error chain on one line (markers are one line each), without repeating causes
/// that an outer message already quotes.
fn one_line(error: &anyhow::Error) -> String {
    let mut kept: Vec<String> = Vec::new();
    for cause in error.chain() {
        let message = cause.to_string().replace('\n', " ");
        if !kept.last().is_some_and(|outer| outer.contains(&message)) {
            kept.push(message);
        }
    }
    kept.join(": ")
}

/// The kernel's log buffer (`dmesg`).
fn kernel_log() -> String {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: klogctl writes at most `len` bytes into the live buffer.
    let n = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr().cast(),
            buf.len() as libc::c_int,
        )
    };
    buf.truncate(n.max(0) as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Turns the console's echo off, so the host's commands do not come back as output.
fn quiet_console() {
    // SAFETY: termios calls on fd 0 with a zeroed, then kernel-filled, struct.
    unsafe {
        let mut termios: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut termios) == 0 {
            termios.c_lflag &= !(libc::ECHO | libc::ECHONL);
            termios.c_lflag |= libc::ICANON;
            libc::tcsetattr(0, libc::TCSANOW, &termios);
        }
    }
}

/// The guest program: set up, print `VMPAIR-READY`, answer commands from stdin until
/// `quit` or EOF. Returns the process exit code.
pub fn main() -> i32 {
    quiet_console();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(role) = role_from_cmdline(&cmdline) else {
        println!("VMPAIR-SETUP-FAILED no {CMDLINE_PARAM}1|2 on the kernel command line");
        return 2;
    };
    let mut node = match PairNode::setup(role) {
        Ok(node) => node,
        Err(e) => {
            println!("VMPAIR-SETUP-FAILED {}", one_line(&e));
            return 1;
        }
    };
    // What the driver said about XDP (e.g. how it shares TX queues); the console is
    // `quiet`, so it would not show otherwise.
    for line in kernel_log()
        .lines()
        .filter(|l| l.contains("virtio_net") || l.to_ascii_lowercase().contains("xdp"))
    {
        println!("VMPAIR-KMSG {line}");
    }
    println!("VMPAIR-READY {}", node.describe());
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let [id, verb, args @ ..] = words.as_slice() else {
            continue;
        };
        if *verb == "quit" {
            drop(node);
            println!("VMPAIR-OK {id} bye");
            return 0;
        }
        match node.execute(verb, args) {
            Ok(details) => println!("VMPAIR-OK {id} {details}"),
            Err(e) => println!("VMPAIR-FAIL {id} {}", one_line(&e)),
        }
        let _ = io::stdout().flush();
    }
    println!("VMPAIR-EOF");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_role() {
        assert_eq!(
            role_from_cmdline("console=ttyS0 overlay.pair=2 quiet"),
            Some(2)
        );
        assert_eq!(role_from_cmdline("console=ttyS0 overlay.pair=3"), None);
        assert_eq!(role_from_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn error_lines_do_not_repeat_quoted_causes() {
        let inner = anyhow!("netlink error: MTU too large");
        let error = inner.context("program x: netlink error: MTU too large");
        assert_eq!(one_line(&error), "program x: netlink error: MTU too large");
        let error = anyhow!("os error 22").context("attach").context("set up");
        assert_eq!(one_line(&error), "set up: attach: os error 22");
    }
}
