//! Loading the kernel programs: the object `build.rs` embeds, the maps pinned under
//! `<pin root>/maps` (reused across agent restarts), and the bpffs they live on.
use std::{collections::HashMap, io, path::Path};

use aya::{
    maps::MapInfo,
    programs::{SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};
use aya_obj::maps::PinningType;
use overlay_common::program_names;
use tracing::warn;

use super::{Datapath, DatapathError, Result};

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
        retire_incompatible_pins(&map_dir);
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
            slots: None,
        })
    }

    /// A reader of the programs' aya-log records (they go to the `log` facade, which the
    /// agent routes into its tracing output). Poll it when its fd is readable.
    pub fn kernel_logger(
        &mut self,
    ) -> std::result::Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
    }
}

pub(super) fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

pub(super) fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
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

/// The layout of a map: type, key and value size, capacity.
type MapLayout = (u32, u32, u32, u32);

/// Unpins every map under `map_dir` whose layout differs from the object's map of the
/// same name (an older agent's, e.g. before a value gained a field): aya would reuse
/// the pin as it is and the programs would then fail to load against it, or read its
/// entries with the wrong layout. The new map starts empty and the agent refills it
/// from the store; programs still attached keep the old map until they are replaced.
fn retire_incompatible_pins(map_dir: &Path) {
    let wanted = match object_map_layouts() {
        Ok(wanted) => wanted,
        Err(e) => {
            warn!(error = %e, "cannot read the map definitions of the embedded object");
            return;
        }
    };
    for (name, layout) in wanted {
        let pin = map_dir.join(&name);
        let Ok(info) = MapInfo::from_pin(&pin) else {
            continue; // no pin (a first start) or not a map: aya creates and pins one
        };
        let pinned: MapLayout = (
            info.map_type().map_or(u32::MAX, |t| t as u32),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        if pinned == layout {
            continue;
        }
        warn!(
            map = %name,
            pinned = ?pinned,
            wanted = ?layout,
            "the pinned map has another layout (an older agent's): replacing it; its entries come back from the store"
        );
        if let Err(e) = std::fs::remove_file(&pin) {
            warn!(map = %name, error = %e, "cannot remove the incompatible pinned map");
        }
    }
}

/// (type, key size, value size, max entries) of every map the object pins by name.
fn object_map_layouts() -> std::result::Result<Vec<(String, MapLayout)>, aya_obj::ParseError> {
    let object = aya_obj::Object::parse(EBPF_OBJECT)?;
    Ok(object
        .maps
        .iter()
        .filter(|(_, map)| map.pinning() == PinningType::ByName)
        .map(|(name, map)| {
            let layout = (
                map.map_type(),
                map.key_size(),
                map.value_size(),
                map.max_entries(),
            );
            (name.clone(), layout)
        })
        .collect())
}

/// Removes the pinned maps (and any pinned links) under `pin_root`. The next load starts
/// from empty maps.
pub fn remove_pins(pin_root: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(pin_root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
