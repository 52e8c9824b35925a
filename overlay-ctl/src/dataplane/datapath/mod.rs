//! The data plane as user space sees it: everything that touches the BPF side goes
//! through [`Datapath`]; the agent, the CLI and the tests share it. Split by concern:
//! - [`loader`]: the kernel object, loading the programs with pinned maps, bpffs;
//! - [`attach`]: attaching programs to the underlay and to container veths, and the
//!   pinned links that keep them attached while no agent runs;
//! - [`maps`]: typed reads and updates of every map.
//!
//! Interface indexes and names are resolved in the calling thread's network namespace,
//! as are attachments: callers working in another namespace call from a thread that
//! entered it (see [`crate::dataplane::netns`]).
use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapError,
    programs::{tc, ProgramError},
    Ebpf,
};
use overlay_common::program_names;

mod attach;
mod counters;
mod loader;
mod maps;

use attach::Attachment;
pub use attach::{ifindex_of, tcx_supported, UnderlayHook, XdpAttachMode};
pub use loader::{ensure_bpffs, remove_pins, DEFAULT_PIN_ROOT, EBPF_OBJECT};

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
    #[error("cannot size per-CPU values: {0}")]
    Cpus(#[source] io::Error),
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

/// Loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_root: PathBuf,
    underlay: Option<(u32, UnderlayHook, Attachment)>,
    containers: HashMap<u32, Attachment>,
    /// The networks' counter slots (`None` until first needed).
    slots: Option<counters::SlotTable>,
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
    pub fn pin_root(&self) -> &Path {
        &self.pin_root
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
}
