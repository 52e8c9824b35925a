//! Attaching the programs: XDP or TC decapsulation on the underlay, the container
//! program at TC ingress of each host-side veth. Attachments are BPF links pinned under
//! `<pin root>/links` (`xdp-<ifindex>`, `tcu-<ifindex>`, `tc-<ifindex>`), taken over with
//! an atomic program replacement by the next agent; before Linux 6.6, TC attachments are
//! netlink filters on a clsact qdisc.
use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        SchedClassifier, XdpMode,
    },
    util::KernelVersion,
};
use overlay_common::program_names;

use super::{
    loader::{tc_program, xdp_program},
    Datapath, DatapathError, Result,
};

/// TCX (multi-program TC links) replaced netlink attachment in Linux 6.6.
const TCX_KERNEL: (u8, u8, u16) = (6, 6, 0);

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

/// How a program is attached to one interface (the underlay, or a host-side veth).
pub(super) enum Attachment {
    /// An XDP or TCX link pinned under `links/`: survives the agent.
    Pinned(PinnedLink),
    /// A netlink filter on a clsact qdisc (TC before Linux 6.6): not a pinnable object,
    /// but it outlives the process unless detached.
    Netlink(SchedClassifierLink),
}

impl Attachment {
    /// Detaches: unpinning a link (which detaches it unless someone else holds it), or
    /// removing a netlink filter. A filter whose interface is gone went with it.
    pub(super) fn detach(self, ifindex: u32, name: &'static str) -> Result<()> {
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

impl Datapath {
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
        // What aya 0.14 reports for a qdisc that is there already: the kernel's EEXIST
        // ("Exclusivity flag on, cannot modify"). A detached container program leaves
        // its veth's clsact behind, so attaching to that veth again meets it.
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
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
