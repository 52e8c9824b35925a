//! The per-packet cost of the encap (TC) and decap (XDP) programs alone, timed by the
//! kernel with `BPF_PROG_TEST_RUN`, in a namespace whose maps and routes make the frames
//! take the full path: the encap frame is encapsulated and redirected to the underlay
//! through the next hop cached for its VTEP, as the agent caches it (`TC_ACT_REDIRECT`), the decap frame is validated,
//! decapsulated and redirected to a local endpoint (`XDP_REDIRECT`).
//!
//! Why one run per call and not one call with a large `repeat`: the kernel runs the
//! repeats on the same buffer and does not restore it in between, and both programs
//! rewrite the frame (decap moves the head past the outer headers, encap grows the skb by
//! 50 bytes), so from the second repeat on they would be timing a different path (decap
//! sees the inner frame and passes it; encap sees a VXLAN frame from the wrong MAC and
//! drops it as spoofed). So each call runs the program once on the pristine frame, the
//! kernel times that run, and the same is done for an empty program of the same type
//! (`r0 = verdict; exit`): the difference is the program's own cost, without the
//! timer and the test-run bookkeeping. Calls alternate between the four programs in
//! chunks so they share the machine's noise; trimmed means over the calls.
use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::{bail, Context, Result};
use overlay_common::{
    program_names, proto::*, EndpointKey, EndpointValue, LocalIface, MacAddr, NetworkInfo,
    UnderlayConfig, VtepInfo,
};
use overlay_ctl::dataplane::{datapath::Datapath, netlink, nexthops};

use overlay_tests::{
    frames,
    harness::{PinGuard, TestNs},
    topology::UNDERLAY_MTU,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const LOCAL_VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PEER_VTEP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const VNI: u32 = 100;
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);
const HOST_MAC: [u8; 6] = [0xee, 0xee, 0, 0, 0, 1];
/// `BPF_PROG_TEST_RUN` presents TC frames as received on the namespace's loopback.
const LOOPBACK_IFINDEX: u32 = 1;
/// Calls per program between switches to the next program.
const CHUNK: usize = 1000;

/// One measurement, in nanoseconds per packet.
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// Encap program minus the empty TC program.
    pub encap_ns: f64,
    /// Decap program minus the empty XDP program.
    pub decap_ns: f64,
    pub encap_gross_ns: f64,
    pub decap_gross_ns: f64,
    pub tc_empty_ns: f64,
    pub xdp_empty_ns: f64,
}

/// A namespace with a loaded data plane (not attached anywhere) and the frames.
pub struct Fixture {
    // Drop order: file descriptors and the data plane before its pins and namespace.
    encap: OwnedFd,
    decap: OwnedFd,
    tc_empty: OwnedFd,
    xdp_empty: OwnedFd,
    _datapath: Datapath,
    _pins: PinGuard,
    ns: TestNs,
    encap_frame: Vec<u8>,
    decap_frame: Vec<u8>,
}

impl Fixture {
    pub fn new() -> Result<Self> {
        let ns = TestNs::new("btr");
        // The underlay: `eth0` with this node's VTEP, the peer VTEP resolved for good, so
        // the encap program's FIB lookup succeeds.
        let eth0 = ns
            .block_on(|| async {
                let handle = netlink::connect()?;
                let (eth0, wire) = netlink::create_veth(&handle, "eth0", "wire0").await?;
                netlink::set_up(&handle, wire.index).await?;
                netlink::set_up(&handle, eth0.index).await?;
                netlink::add_address(&handle, eth0.index, LOCAL_VTEP, 24).await?;
                netlink::add_permanent_neighbour(&handle, eth0.index, PEER_VTEP, PEER_MAC.into())
                    .await?;
                anyhow::Ok(netlink::link_by_name(&handle, "eth0").await?)
            })
            .context("test-run namespace")?;
        // bpf_fib_lookup answers only for interfaces that forward: the agent's own setting.
        ns.run(overlay_ctl::dataplane::underlay::enable_forwarding)?;
        let pins = PinGuard::new();
        let mut dp = Datapath::load(&pins.path).context("load the data plane")?;
        dp.set_underlay(&UnderlayConfig::new(
            eth0.index,
            LOCAL_VTEP,
            UNDERLAY_MTU,
            eth0.mac,
        ))?;
        dp.upsert_vtep(PEER_VTEP, &VtepInfo::remote())?;
        // The next hop towards the peer, cached as the agent's next-hop task does.
        let next_hops = ns
            .block_on(|| async {
                let handle = netlink::connect()?;
                anyhow::Ok(nexthops::resolve_all(&handle, [PEER_VTEP]).await?)
            })
            .context("resolve the next hop towards the peer VTEP")?;
        if !next_hops.contains_key(&PEER_VTEP) {
            bail!("no next hop resolved towards {PEER_VTEP}");
        }
        nexthops::apply(&mut dp, &next_hops)?;
        dp.upsert_vtep(LOCAL_VTEP, &VtepInfo::local())?;
        let subnet: ipnetwork::Ipv4Network = "10.100.0.0/24".parse().unwrap();
        dp.upsert_network(
            VNI,
            &NetworkInfo::new(
                subnet.network(),
                subnet.mask(),
                Ipv4Addr::new(10, 100, 0, 1),
                UNDERLAY_MTU - overlay_common::VXLAN_OVERHEAD,
            ),
        )?;
        dp.upsert_subnet(subnet, VNI)?;
        let local_mac = overlay_ctl::dataplane::endpoint::mac_for(LOCAL_IP);
        let remote_mac = overlay_ctl::dataplane::endpoint::mac_for(REMOTE_IP);
        // The sender of the encap frame sits behind "loopback" (the test-run device)...
        dp.upsert_local_iface(
            LOOPBACK_IFINDEX,
            &LocalIface::new(VNI, LOCAL_IP, local_mac, HOST_MAC.into()),
        )?;
        dp.upsert_endpoint(
            EndpointKey::new(VNI, LOCAL_IP),
            &EndpointValue::local(LOOPBACK_IFINDEX, local_mac),
        )?;
        // ...and sends to a container on the peer node.
        dp.upsert_endpoint(
            EndpointKey::new(VNI, REMOTE_IP),
            &EndpointValue::remote(PEER_VTEP, remote_mac),
        )?;

        let payload = [0x5au8; crate::tools::SMALL_PAYLOAD];
        let encap_frame =
            frames::inner_udp_frame(HOST_MAC, local_mac, LOCAL_IP, REMOTE_IP, &payload);
        let inner = frames::inner_udp_frame(local_mac, remote_mac, REMOTE_IP, LOCAL_IP, &payload);
        let vxlan = frames::vxlan_payload(VXLAN_FLAG_I, VNI, &inner);
        let decap_frame = frames::udp_frame(
            eth0.mac, PEER_MAC, PEER_VTEP, LOCAL_VTEP, 50_000, VXLAN_PORT, &vxlan,
        );

        let ids = dp.program_ids();
        let fd_of = |name: &'static str| -> Result<OwnedFd> {
            let id = *ids
                .get(name)
                .with_context(|| format!("no program {name}"))?;
            prog_fd_by_id(id).with_context(|| format!("fd of {name}"))
        };
        let fixture = Self {
            encap: fd_of(program_names::CONTAINER_TC)?,
            decap: fd_of(program_names::UNDERLAY_XDP)?,
            tc_empty: load_empty(BPF_PROG_TYPE_SCHED_CLS, TC_ACT_OK)?,
            xdp_empty: load_empty(BPF_PROG_TYPE_XDP, XDP_PASS)?,
            _datapath: dp,
            _pins: pins,
            ns,
            encap_frame,
            decap_frame,
        };
        fixture.check(&inner, eth0.mac)?;
        Ok(fixture)
    }

    /// The frames take the full path: verdicts and output frames as on the wire.
    fn check(&self, inner: &[u8], eth0_mac: MacAddr) -> Result<()> {
        let (encap, decap) = (self.encap.as_raw_fd(), self.decap.as_raw_fd());
        let (encap_frame, decap_frame) = (&self.encap_frame, &self.decap_frame);
        let (e, d) = self.ns.run(|| {
            (
                test_run(encap, encap_frame, 1),
                test_run(decap, decap_frame, 1),
            )
        });
        let (e, d) = (e?, d?);
        let counters = || {
            self._datapath
                .counters()
                .map(|c| {
                    c.iter()
                        .map(|((vni, c), v)| format!("{vni}/{}={}", c.name(), v.packets))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        if e.verdict != TC_ACT_REDIRECT {
            bail!(
                "encap test run: verdict {} (want TC_ACT_REDIRECT); counters: {}",
                e.verdict,
                counters()
            );
        }
        let grown = encap_frame.len() + overlay_common::VXLAN_OVERHEAD as usize;
        if e.frame.len() != grown
            || e.frame[0..6] != PEER_MAC
            || e.frame[6..12] != eth0_mac.octets()
            || e.frame[ETH_HLEN + 16..ETH_HLEN + 20] != PEER_VTEP.octets()
        {
            bail!("encap test run: unexpected output frame {:02x?}", e.frame);
        }
        if d.verdict != XDP_REDIRECT {
            bail!(
                "decap test run: verdict {} (want XDP_REDIRECT); counters: {}",
                d.verdict,
                counters()
            );
        }
        if d.frame != inner {
            bail!("decap test run: output is not the inner frame");
        }
        Ok(())
    }

    /// `calls` kernel-timed single runs of each of the four programs.
    pub fn measure(&self, calls: usize) -> Result<Costs> {
        let programs = [
            (self.encap.as_raw_fd(), &self.encap_frame, TC_ACT_REDIRECT),
            (self.tc_empty.as_raw_fd(), &self.encap_frame, TC_ACT_OK),
            (self.decap.as_raw_fd(), &self.decap_frame, XDP_REDIRECT),
            (self.xdp_empty.as_raw_fd(), &self.decap_frame, XDP_PASS),
        ];
        let durations = self.ns.run(|| -> Result<Vec<Vec<u32>>> {
            let mut all = vec![Vec::with_capacity(calls); programs.len()];
            let mut done = 0;
            while done < calls {
                let n = CHUNK.min(calls - done);
                for (i, (fd, frame, verdict)) in programs.iter().enumerate() {
                    for _ in 0..n {
                        let out = test_run(*fd, frame, 1)?;
                        if out.verdict != *verdict {
                            bail!("test run verdict {} instead of {verdict}", out.verdict);
                        }
                        all[i].push(out.duration_ns);
                    }
                }
                done += n;
                if super::tools::interrupted() {
                    bail!("interrupted");
                }
            }
            Ok(all)
        })?;
        let [encap, tc_empty, decap, xdp_empty] = [
            trimmed_mean(&durations[0]),
            trimmed_mean(&durations[1]),
            trimmed_mean(&durations[2]),
            trimmed_mean(&durations[3]),
        ];
        Ok(Costs {
            encap_ns: encap - tc_empty,
            decap_ns: decap - xdp_empty,
            encap_gross_ns: encap,
            decap_gross_ns: decap,
            tc_empty_ns: tc_empty,
            xdp_empty_ns: xdp_empty,
        })
    }

    /// What a single call with `repeat` runs leaves behind: (verdict of the last run,
    /// output length). Shows why large repeat counts do not time these programs.
    pub fn repeat_probe(&self, repeat: u32) -> Result<[(u32, usize); 2]> {
        let (encap, decap) = (self.encap.as_raw_fd(), self.decap.as_raw_fd());
        let (ef, df) = (&self.encap_frame, &self.decap_frame);
        self.ns.run(|| {
            let e = test_run(encap, ef, repeat)?;
            let d = test_run(decap, df, repeat)?;
            Ok([(e.verdict, e.frame.len()), (d.verdict, d.frame.len())])
        })
    }
}

/// Mean of the middle 98% of the durations. The kernel's clock here ticks in steps of
/// about 10 ns, so a median would be quantised; the mean of many runs is not, and
/// trimming drops the runs an interrupt landed in.
fn trimmed_mean(durations: &[u32]) -> f64 {
    let mut v = durations.to_vec();
    v.sort_unstable();
    let cut = v.len() / 100;
    let middle = &v[cut..v.len() - cut];
    if middle.is_empty() {
        return f64::NAN;
    }
    middle.iter().map(|&d| d as f64).sum::<f64>() / middle.len() as f64
}

// ---- the bpf(2) commands used here, without a BPF library -------------------------------

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly laid out `union bpf_attr` prefix for `cmd`; the
    // kernel reads/writes at most `size_of::<T>()` bytes of it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new file descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

fn prog_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    bpf(
        BPF_PROG_GET_FD_BY_ID,
        &mut Attr {
            id,
            next_id: 0,
            open_flags: 0,
        },
    )
    .map(owned)
}

/// `r0 = verdict; exit`: the empty program whose cost is subtracted.
fn load_empty(prog_type: u32, verdict: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    // BPF_ALU64 | BPF_MOV | BPF_K to r0, then BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0xb7 | (verdict as u64) << 32, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"bench_empty");
    let fd = bpf(
        BPF_PROG_LOAD,
        &mut Attr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: 0,
        },
    )
    .context("load an empty program")?;
    Ok(owned(fd))
}

struct Outcome {
    verdict: u32,
    frame: Vec<u8>,
    duration_ns: u32,
}

fn test_run(fd: RawFd, frame: &[u8], repeat: u32) -> Result<Outcome> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = Attr {
        prog_fd: fd as u32,
        retval: 0,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        duration: 0,
        ctx_size_in: 0,
        ctx_size_out: 0,
        ctx_in: 0,
        ctx_out: 0,
        flags: 0,
        cpu: 0,
        batch_size: 0,
        _pad: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    out.truncate(attr.data_size_out as usize);
    Ok(Outcome {
        verdict: attr.retval,
        frame: out,
        duration_ns: attr.duration,
    })
}
