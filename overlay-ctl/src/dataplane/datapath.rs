//! The data plane as user space sees it: loading the kernel programs, attaching them,
//! pinning, and typed updates of every map. Everything that touches the BPF side goes
//! through [`Datapath`]; the agent, the CLI and the tests share it.
//!
//! Interface indexes and names are resolved in the calling thread's network namespace,
//! as are attachments: callers working in another namespace call from a thread that
//! entered it (see [`crate::dataplane::netns`]).
use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        ProgramError, SchedClassifier, Xdp, XdpMode,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader, Pod,
};
use overlay_common::{
    ipv4_to_map, map_names, program_names, Counter, CounterKey, CounterValue, EndpointKey,
    EndpointValue, LocalIface, NetworkInfo, SubnetValue, UnderlayConfig, VtepInfo,
};

/// The kernel object, built from `overlay-ebpf` by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay.bpf.o"));

/// Where the agent pins its maps and links unless told otherwise: maps under `maps/`,
/// attachments under `links/` (`xdp-<ifindex>`, `tc-<ifindex>`), so the programs stay
/// attached and forwarding while no agent runs (a restart or an upgrade).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/overlay";
const BPFFS_ROOT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// aya-log's debug level (`aya_log_common::Level::Debug`).
const KERNEL_LOG_DEBUG: u8 = 4;
/// TCX (multi-program TC links) replaced netlink attachment in Linux 6.6.
const TCX_KERNEL: (u8, u8, u16) = (6, 6, 0);

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot load the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("network interface {0:?} not found")]
    UnknownInterface(String),
    #[error("TC on {iface}: {source}")]
    Tc {
        iface: String,
        #[source]
        source: tc::TcError,
    },
    #[error("pinned link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// How the underlay XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum XdpAttachMode {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    #[default]
    Auto,
    /// Native mode only (veth, most NICs); fails where unsupported.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Skb,
}

impl XdpAttachMode {
    fn to_aya(self) -> XdpMode {
        match self {
            XdpAttachMode::Auto => XdpMode::default(),
            XdpAttachMode::Native => XdpMode::Driver,
            XdpAttachMode::Skb => XdpMode::Skb,
        }
    }
}

/// The hook the underlay's decapsulation program runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnderlayHook {
    /// The XDP program, attached in this mode.
    Xdp(XdpAttachMode),
    /// The TC program at ingress (a TCX link, or a clsact filter before Linux 6.6).
    TcIngress,
}

impl std::fmt::Display for UnderlayHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnderlayHook::Xdp(XdpAttachMode::Auto) => f.write_str("xdp"),
            UnderlayHook::Xdp(XdpAttachMode::Native) => f.write_str("xdp (native)"),
            UnderlayHook::Xdp(XdpAttachMode::Skb) => f.write_str("xdp (generic)"),
            UnderlayHook::TcIngress => f.write_str("tc ingress"),
        }
    }
}

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug)]
pub struct TestRunOutcome {
    /// The program's return value (an XDP action or a TC action).
    pub verdict: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean time per run as measured by the kernel.
    pub duration: std::time::Duration,
}

/// How a program is attached to one interface (the underlay, or a host-side veth).
enum Attachment {
    /// An XDP or TCX link pinned under `links/`: survives the agent.
    Pinned(PinnedLink),
    /// A netlink filter on a clsact qdisc (TC before Linux 6.6): not a pinnable object,
    /// but it outlives the process unless detached.
    Netlink(SchedClassifierLink),
}

impl Attachment {
    /// Detaches: unpinning a link (which detaches it unless someone else holds it), or
    /// removing a netlink filter. A filter whose interface is gone went with it.
    fn detach(self, ifindex: u32, name: &'static str) -> Result<()> {
        match self {
            Attachment::Pinned(link) => {
                let _ = link.unpin();
                Ok(())
            }
            Attachment::Netlink(link) => {
                use aya::programs::Link as _;
                match link.detach() {
                    Err(source) if interface_exists(ifindex) => {
                        Err(DatapathError::Program { name, source })
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_root: PathBuf,
    underlay: Option<(u32, UnderlayHook, Attachment)>,
    containers: HashMap<u32, Attachment>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_root", &self.pin_root)
            .field(
                "underlay",
                &self.underlay.as_ref().map(|(i, h, _)| (*i, *h)),
            )
            .field("containers", &self.containers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Datapath {
    /// Loads the programs, reusing the maps pinned under `pin_root/maps` if an earlier
    /// agent left them (so a restart keeps all forwarding state), pinning new ones there.
    /// Kernel-side logging is off (compiled out by the verifier).
    pub fn load(pin_root: &Path) -> Result<Self> {
        Self::load_with_kernel_log(pin_root, false)
    }

    /// [`Datapath::load`], with the programs' aya-log debug messages (drops and their
    /// reasons) on or off; read them with [`Datapath::kernel_logger`].
    pub fn load_with_kernel_log(pin_root: &Path, kernel_log: bool) -> Result<Self> {
        ensure_bpffs(pin_root)?;
        let map_dir = pin_root.join("maps");
        std::fs::create_dir_all(&map_dir).map_err(|source| DatapathError::Bpffs {
            path: map_dir.clone(),
            source,
        })?;
        // aya-log's level global: 0 disables every log statement at load time.
        let log_level: u8 = if kernel_log { KERNEL_LOG_DEBUG } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .override_global("AYA_LOG_LEVEL", &log_level, true)
            .load(EBPF_OBJECT)?;
        for name in [program_names::UNDERLAY_XDP, program_names::XDP_PASS] {
            xdp_program(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        for name in [program_names::CONTAINER_TC, program_names::UNDERLAY_TC] {
            tc_program(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            pin_root: pin_root.to_path_buf(),
            underlay: None,
            containers: HashMap::new(),
        })
    }

    /// A reader of the programs' aya-log records (they go to the `log` facade, which the
    /// agent routes into its tracing output). Poll it when its fd is readable.
    pub fn kernel_logger(
        &mut self,
    ) -> std::result::Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }

    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    fn links_dir(&self) -> Result<PathBuf> {
        let dir = self.pin_root.join("links");
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::Bpffs {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Attaches the underlay program to `ifindex` at `hook` and pins the link. A link an
    /// earlier agent pinned there for the same hook is taken over with an atomic program
    /// replacement (no packet sees an interface without a program); attachments for
    /// other interfaces or the other hook (an earlier underlay or decap mode) are removed
    /// once the new one is in place.
    pub fn attach_underlay(&mut self, ifindex: u32, hook: UnderlayHook) -> Result<()> {
        if self
            .underlay
            .as_ref()
            .is_some_and(|(i, h, _)| *i == ifindex && *h == hook)
        {
            return Ok(());
        }
        let dir = self.links_dir()?;
        let attachment = match hook {
            UnderlayHook::Xdp(mode) => self.attach_underlay_xdp(&dir, ifindex, mode)?,
            UnderlayHook::TcIngress => self.attach_underlay_tc(&dir, ifindex)?,
        };
        if let Some((old_ifindex, old_hook, old)) = self.underlay.take() {
            // A netlink filter on the interface we just attached to was replaced already.
            let same_filter = old_ifindex == ifindex && old_hook == hook;
            if !same_filter {
                detach_underlay(old, old_ifindex, old_hook);
            }
        }
        self.underlay = Some((ifindex, hook, attachment));
        let (keep_xdp, keep_tc): (&[u32], &[u32]) = match hook {
            UnderlayHook::Xdp(_) => (&[ifindex], &[]),
            UnderlayHook::TcIngress => (&[], &[ifindex]),
        };
        remove_other_pins(&dir, XDP_LINK_PREFIX, keep_xdp);
        remove_other_pins(&dir, UNDERLAY_TC_LINK_PREFIX, keep_tc);
        Ok(())
    }

    fn attach_underlay_xdp(
        &mut self,
        dir: &Path,
        ifindex: u32,
        mode: XdpAttachMode,
    ) -> Result<Attachment> {
        let pin = dir.join(format!("{XDP_LINK_PREFIX}{ifindex}"));
        let name = program_names::UNDERLAY_XDP;
        let program = xdp_program(&mut self.ebpf, name)?;
        let taken_over = match pinned_fd_link(&pin) {
            Some(fd_link) => match XdpLink::try_from(fd_link) {
                Ok(link) => program.attach_to_link(link).ok(),
                Err(_) => None,
            },
            None => None,
        };
        let link_id = match taken_over {
            Some(id) => id,
            None => {
                let _ = std::fs::remove_file(&pin);
                program
                    .attach_to_if_index(ifindex, mode.to_aya())
                    .map_err(|source| DatapathError::Program { name, source })?
            }
        };
        let link = program
            .take_link(link_id)
            .map_err(|source| DatapathError::Program { name, source })?;
        let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Pin {
            path: pin.clone(),
            message: format!("XDP attached without a BPF link: {e}"),
        })?;
        Ok(Attachment::Pinned(repin(fd_link, &pin)?))
    }

    fn attach_underlay_tc(&mut self, dir: &Path, ifindex: u32) -> Result<Attachment> {
        let iface =
            name_of(ifindex).ok_or(DatapathError::UnknownInterface(format!("#{ifindex}")))?;
        let name = program_names::UNDERLAY_TC;
        let pin = dir.join(format!("{UNDERLAY_TC_LINK_PREFIX}{ifindex}"));
        attach_tc_ingress(tc_program(&mut self.ebpf, name)?, name, &iface, &pin)
    }

    pub fn underlay_ifindex(&self) -> Option<u32> {
        self.underlay.as_ref().map(|(ifindex, _, _)| *ifindex)
    }

    /// The hook the underlay program is attached at, if attached.
    pub fn underlay_hook(&self) -> Option<UnderlayHook> {
        self.underlay.as_ref().map(|(_, hook, _)| *hook)
    }

    /// Detaches the underlay program (and removes its pin).
    pub fn detach_underlay(&mut self) -> Result<()> {
        if let Some((ifindex, hook, attachment)) = self.underlay.take() {
            detach_underlay(attachment, ifindex, hook);
        }
        if let Ok(dir) = self.links_dir() {
            remove_other_pins(&dir, XDP_LINK_PREFIX, &[]);
            remove_other_pins(&dir, UNDERLAY_TC_LINK_PREFIX, &[]);
        }
        Ok(())
    }

    /// Attaches the container program to TC ingress of a host-side veth: a pinned TCX
    /// link on kernels that have it (taking over a link an earlier agent pinned with an
    /// atomic replacement), a clsact qdisc and netlink filter on older ones.
    pub fn attach_container(&mut self, host_veth: &str) -> Result<u32> {
        let ifindex = ifindex_of(host_veth)?;
        if self.containers.contains_key(&ifindex) {
            return Ok(ifindex);
        }
        let name = program_names::CONTAINER_TC;
        let pin = self.links_dir()?.join(format!("{TC_LINK_PREFIX}{ifindex}"));
        let attachment =
            attach_tc_ingress(tc_program(&mut self.ebpf, name)?, name, host_veth, &pin)?;
        self.containers.insert(ifindex, attachment);
        Ok(ifindex)
    }

    /// Detaches from a host-side veth (removing its pin). A veth that is already gone
    /// took its attachment with it, which is not an error.
    pub fn detach_container(&mut self, ifindex: u32) -> Result<()> {
        match self.containers.remove(&ifindex) {
            Some(attachment) => attachment.detach(ifindex, program_names::CONTAINER_TC)?,
            None => {
                let _ = std::fs::remove_file(
                    self.pin_root
                        .join("links")
                        .join(format!("{TC_LINK_PREFIX}{ifindex}")),
                );
            }
        }
        Ok(())
    }

    /// Interfaces with a container-program link pinned by this or an earlier agent.
    pub fn pinned_container_links(&self) -> Vec<u32> {
        pinned_ifindexes(&self.pin_root.join("links"), TC_LINK_PREFIX)
    }

    /// Gives up this handle without detaching anything: the pinned links keep the
    /// programs attached, and netlink filters (kernels before 6.6) stay in place, so
    /// traffic flows on while no agent runs.
    pub fn release(mut self) {
        for (_, attachment) in self.containers.drain() {
            if let Attachment::Netlink(link) = attachment {
                std::mem::forget(link);
            }
        }
        if let Some((_, _, Attachment::Netlink(link))) = self.underlay.take() {
            std::mem::forget(link);
        }
    }

    /// Interfaces this handle attached the container program to.
    pub fn attached_containers(&self) -> impl Iterator<Item = u32> + '_ {
        self.containers.keys().copied()
    }

    /// Kernel ids of the loaded programs, by name.
    pub fn program_ids(&self) -> BTreeMap<&'static str, u32> {
        let mut ids = BTreeMap::new();
        for name in [
            program_names::UNDERLAY_XDP,
            program_names::UNDERLAY_TC,
            program_names::CONTAINER_TC,
            program_names::XDP_PASS,
        ] {
            if let Some(Ok(info)) = self.ebpf.program(name).map(|p| p.info()) {
                ids.insert(name, info.id());
            }
        }
        ids
    }

    /// Runs a program once per `repeat` on `frame` with `BPF_PROG_TEST_RUN` (no device
    /// involved) and returns its verdict, output frame and mean run time. For the TC
    /// program the kernel presents the frame as received on loopback (ifindex 1).
    pub fn test_run(
        &self,
        name: &'static str,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        use aya::programs::{Program, TestRun, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..Default::default()
        };
        let program = self.ebpf.program(name).ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?;
        let result = match program {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => {
                return Err(DatapathError::Missing {
                    kind: "testable program",
                    name,
                })
            }
        }
        .map_err(|source| DatapathError::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutcome {
            verdict: result.return_value,
            frame: out,
            duration: result.duration,
        })
    }

    // ---- typed map updates -------------------------------------------------------------

    pub fn set_underlay(&mut self, config: &UnderlayConfig) -> Result<()> {
        let name = map_names::UNDERLAY;
        let mut array: Array<&mut MapData, UnderlayConfig> = self.typed_map(name)?;
        array
            .set(0, config, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    pub fn underlay_config(&mut self) -> Result<UnderlayConfig> {
        let name = map_names::UNDERLAY;
        let array: Array<&mut MapData, UnderlayConfig> = self.typed_map(name)?;
        array
            .get(&0, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    pub fn upsert_network(&mut self, vni: u32, network: &NetworkInfo) -> Result<()> {
        self.hash_insert(map_names::NETWORKS, vni, *network)
    }

    pub fn remove_network(&mut self, vni: u32) -> Result<()> {
        self.hash_remove::<u32, NetworkInfo>(map_names::NETWORKS, &vni)
    }

    pub fn networks(&mut self) -> Result<BTreeMap<u32, NetworkInfo>> {
        self.hash_entries(map_names::NETWORKS)
    }

    pub fn upsert_endpoint(&mut self, key: EndpointKey, value: &EndpointValue) -> Result<()> {
        self.hash_insert(map_names::ENDPOINTS, key, *value)
    }

    pub fn remove_endpoint(&mut self, key: EndpointKey) -> Result<()> {
        self.hash_remove::<EndpointKey, EndpointValue>(map_names::ENDPOINTS, &key)
    }

    pub fn endpoints(&mut self) -> Result<BTreeMap<EndpointKey, EndpointValue>> {
        self.hash_entries(map_names::ENDPOINTS)
    }

    pub fn upsert_local_iface(&mut self, ifindex: u32, iface: &LocalIface) -> Result<()> {
        self.hash_insert(map_names::LOCAL_IFACES, ifindex, *iface)
    }

    pub fn remove_local_iface(&mut self, ifindex: u32) -> Result<()> {
        self.hash_remove::<u32, LocalIface>(map_names::LOCAL_IFACES, &ifindex)
    }

    pub fn local_ifaces(&mut self) -> Result<BTreeMap<u32, LocalIface>> {
        self.hash_entries(map_names::LOCAL_IFACES)
    }

    pub fn upsert_vtep(&mut self, vtep: Ipv4Addr, info: &VtepInfo) -> Result<()> {
        self.hash_insert(map_names::VTEPS, ipv4_to_map(vtep.octets()), *info)
    }

    pub fn remove_vtep(&mut self, vtep: Ipv4Addr) -> Result<()> {
        self.hash_remove::<u32, VtepInfo>(map_names::VTEPS, &ipv4_to_map(vtep.octets()))
    }

    pub fn vteps(&mut self) -> Result<BTreeMap<Ipv4Addr, VtepInfo>> {
        Ok(self
            .hash_entries::<u32, VtepInfo>(map_names::VTEPS)?
            .into_iter()
            .map(|(k, v)| (Ipv4Addr::from(overlay_common::ipv4_from_map(k)), v))
            .collect())
    }

    pub fn upsert_subnet(&mut self, subnet: ipnetwork::Ipv4Network, vni: u32) -> Result<()> {
        let name = map_names::SUBNETS;
        let mut trie: LpmTrie<&mut MapData, u32, SubnetValue> = self.typed_map(name)?;
        let key = LpmKey::new(
            subnet.prefix() as u32,
            ipv4_to_map(subnet.network().octets()),
        );
        trie.insert(&key, SubnetValue { vni }, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    pub fn remove_subnet(&mut self, subnet: ipnetwork::Ipv4Network) -> Result<()> {
        let name = map_names::SUBNETS;
        let mut trie: LpmTrie<&mut MapData, u32, SubnetValue> = self.typed_map(name)?;
        let key = LpmKey::new(
            subnet.prefix() as u32,
            ipv4_to_map(subnet.network().octets()),
        );
        ignore_missing(trie.remove(&key)).map_err(|source| DatapathError::Map { name, source })
    }

    pub fn subnets(&mut self) -> Result<BTreeMap<ipnetwork::Ipv4Network, u32>> {
        let name = map_names::SUBNETS;
        let trie: LpmTrie<&mut MapData, u32, SubnetValue> = self.typed_map(name)?;
        let mut out = BTreeMap::new();
        for entry in trie.iter() {
            let (key, value) = entry.map_err(|source| DatapathError::Map { name, source })?;
            let addr = Ipv4Addr::from(overlay_common::ipv4_from_map(key.data()));
            if let Ok(net) = ipnetwork::Ipv4Network::new(addr, key.prefix_len() as u8) {
                out.insert(net, value.vni);
            }
        }
        Ok(out)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<(u32, Counter), CounterValue>> {
        let name = map_names::COUNTERS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let counters: PerCpuHashMap<&MapData, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let mut out = BTreeMap::new();
        for entry in counters.iter() {
            let (key, per_cpu) = entry.map_err(|source| DatapathError::Map { name, source })?;
            let Some(counter) = Counter::from_u32(key.counter) else {
                continue;
            };
            let sum = per_cpu
                .iter()
                .fold(CounterValue::default(), |acc, v| CounterValue {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                });
            out.insert((key.vni, counter), sum);
        }
        Ok(out)
    }

    /// Entries and capacity of every map, for status and metrics.
    pub fn map_occupancy(&mut self) -> Result<Vec<(&'static str, usize, u32)>> {
        use overlay_common::capacity;
        Ok(vec![
            (
                map_names::ENDPOINTS,
                self.endpoints()?.len(),
                capacity::ENDPOINTS,
            ),
            (
                map_names::LOCAL_IFACES,
                self.local_ifaces()?.len(),
                capacity::LOCAL_IFACES,
            ),
            (
                map_names::NETWORKS,
                self.networks()?.len(),
                capacity::NETWORKS,
            ),
            (map_names::SUBNETS, self.subnets()?.len(), capacity::SUBNETS),
            (map_names::VTEPS, self.vteps()?.len(), capacity::VTEPS),
            (
                map_names::COUNTERS,
                self.counters()?.len(),
                capacity::COUNTERS,
            ),
        ])
    }

    fn typed_map<'a, M>(&'a mut self, name: &'static str) -> Result<M>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        M::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }

    fn hash_insert<K: Pod, V: Pod>(&mut self, name: &'static str, key: K, value: V) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, K, V> = self.typed_map(name)?;
        map.insert(key, value, 0)
            .map_err(|source| DatapathError::Map { name, source })
    }

    fn hash_remove<K: Pod, V: Pod>(&mut self, name: &'static str, key: &K) -> Result<()> {
        let mut map: BpfHashMap<&mut MapData, K, V> = self.typed_map(name)?;
        ignore_missing(map.remove(key)).map_err(|source| DatapathError::Map { name, source })
    }

    fn hash_entries<K: Pod + Ord, V: Pod>(&mut self, name: &'static str) -> Result<BTreeMap<K, V>> {
        let map: BpfHashMap<&mut MapData, K, V> = self.typed_map(name)?;
        map.iter()
            .collect::<std::result::Result<BTreeMap<K, V>, MapError>>()
            .map_err(|source| DatapathError::Map { name, source })
    }
}

const XDP_LINK_PREFIX: &str = "xdp-";
const TC_LINK_PREFIX: &str = "tc-";
/// The underlay's TC decap link (`tcu-` does not match the containers' `tc-` prefix).
const UNDERLAY_TC_LINK_PREFIX: &str = "tcu-";

/// Attaches `program` to `iface`'s TC ingress: a TCX link pinned at `pin` (taking over
/// the link an earlier agent pinned there with an atomic program replacement), or before
/// Linux 6.6 a clsact qdisc and netlink filter, replacing a filter an earlier agent left.
fn attach_tc_ingress(
    program: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    pin: &Path,
) -> Result<Attachment> {
    let program_error = |source| DatapathError::Program { name, source };
    if !tcx_supported() {
        add_clsact(iface)?;
        let _ = tc::qdisc_detach_program(iface, TcAttachType::Ingress, name);
        let link_id = program
            .attach(iface, TcAttachType::Ingress)
            .map_err(program_error)?;
        return Ok(Attachment::Netlink(
            program.take_link(link_id).map_err(program_error)?,
        ));
    }
    let taken_over = match pinned_fd_link(pin) {
        Some(fd_link) => match SchedClassifierLink::try_from(fd_link) {
            Ok(link) => program.attach_to_link(link).ok(),
            Err(_) => None,
        },
        None => None,
    };
    let link_id = match taken_over {
        Some(id) => id,
        None => {
            let _ = std::fs::remove_file(pin);
            program
                .attach(iface, TcAttachType::Ingress)
                .map_err(program_error)?
        }
    };
    let link = program.take_link(link_id).map_err(program_error)?;
    let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Pin {
        path: pin.to_path_buf(),
        message: format!("TC attached without a BPF link: {e}"),
    })?;
    Ok(Attachment::Pinned(repin(fd_link, pin)?))
}

/// Adds a clsact qdisc to `iface` unless it has one (TC before Linux 6.6).
fn add_clsact(iface: &str) -> Result<()> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) | Err(tc::TcError::AlreadyAttached) => Ok(()),
        Err(source) => Err(DatapathError::Tc {
            iface: iface.to_string(),
            source,
        }),
    }
}

/// Detaches the underlay program; a failure only costs a warning (the new attachment is
/// in place, or the agent is going away).
fn detach_underlay(attachment: Attachment, ifindex: u32, hook: UnderlayHook) {
    let name = match hook {
        UnderlayHook::Xdp(_) => program_names::UNDERLAY_XDP,
        UnderlayHook::TcIngress => program_names::UNDERLAY_TC,
    };
    if let Err(e) = attachment.detach(ifindex, name) {
        tracing::warn!(ifindex, error = %e, "cannot detach the underlay program");
    }
}

/// The link pinned at `pin`, if there is a usable one.
fn pinned_fd_link(pin: &Path) -> Option<FdLink> {
    if !pin.exists() {
        return None;
    }
    PinnedLink::from_pin(pin).ok().map(FdLink::from)
}

/// Pins `link` at `pin`, replacing an older pin there (the open fd keeps the link alive
/// in between).
fn repin(link: FdLink, pin: &Path) -> Result<PinnedLink> {
    let _ = std::fs::remove_file(pin);
    link.pin(pin).map_err(|e| DatapathError::Pin {
        path: pin.to_path_buf(),
        message: e.to_string(),
    })
}

fn pinned_ifindexes(dir: &Path, prefix: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

/// Removes the pins with `prefix` except those for `keep` (which detaches them unless
/// someone else holds the link).
fn remove_other_pins(dir: &Path, prefix: &str, keep: &[u32]) {
    for ifindex in pinned_ifindexes(dir, prefix) {
        if !keep.contains(&ifindex) {
            let _ = std::fs::remove_file(dir.join(format!("{prefix}{ifindex}")));
        }
    }
}

/// Removing what is not there is what an idempotent reconcile asks for.
fn ignore_missing(result: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn tc_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Whether TC programs attach through TCX links (else through a clsact qdisc).
pub fn tcx_supported() -> bool {
    let (major, minor, patch) = TCX_KERNEL;
    KernelVersion::current()
        .map(|v| v >= KernelVersion::new(major, minor, patch))
        .unwrap_or(false)
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex_of(name: &str) -> Result<u32> {
    let c_name =
        CString::new(name).map_err(|_| DatapathError::UnknownInterface(name.to_string()))?;
    // SAFETY: `c_name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(DatapathError::UnknownInterface(name.to_string()));
    }
    Ok(index)
}

fn interface_exists(ifindex: u32) -> bool {
    name_of(ifindex).is_some()
}

/// The name of interface `ifindex` in the calling thread's network namespace.
fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes as the call requires.
    if unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) }.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (fresh machines and
/// minimal VMs), then checks that `pin_root` lies on a bpffs.
pub fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    if pin_root.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|source| DatapathError::Bpffs {
            path: root.to_path_buf(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|errno| DatapathError::Bpffs {
            path: root.to_path_buf(),
            source: io::Error::from(errno),
        })?;
    }
    std::fs::create_dir_all(pin_root).map_err(|source| DatapathError::Bpffs {
        path: pin_root.to_path_buf(),
        source,
    })?;
    if !is_bpffs(pin_root) {
        return Err(DatapathError::Bpffs {
            path: pin_root.to_path_buf(),
            source: io::Error::other("not on a bpf filesystem (mount -t bpf bpf <dir>)"),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Removes the pinned maps (and any pinned links) under `pin_root`. The next load starts
/// from empty maps.
pub fn remove_pins(pin_root: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(pin_root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
