//! This node's own record of the containers it plumbed: one file per endpoint under
//! `<state-dir>/endpoints/`, written by `run`/`attach` on this node *before* they create
//! anything (namespace, address, veth, endpoint entry) and removed by whoever finishes the
//! clean-up, last.
//!
//! The store is shared input that anyone with write access to the key prefix can change;
//! this directory is root's alone (0700, files 0600). So the agent acts on local
//! interfaces and namespaces only through these records: the host veth and the `run`
//! namespace names are *generated* from the record's validated network and endpoint
//! names ([`LocalEndpoint::host_ifname`], [`LocalEndpoint::netns_name`]), never taken
//! from a store record.
//!
//! A record names its owner (the `run` or `attach` process, by pid *and* start time, so a
//! reused pid is not mistaken for it) and, for `run`, the container's command. While one
//! of them lives, the clean-up is theirs; once none does (a SIGKILL at any point), the
//! agent collects everything the record covers (see [`crate::agent::gc`]). An `attach`ed
//! endpoint outlives its CLI: `attach` drops the owner when it succeeds ("committed"), and
//! the endpoint lives until `detach` or until its veth disappears with its container.
use std::{
    fs, io,
    net::Ipv4Addr,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

pub use crate::private::write_file as write_private_file;
use crate::store::Endpoint;

/// The sub-directory of the state directory holding the records.
pub const ENDPOINTS_DIR: &str = "endpoints";
/// Mode of the state directory and its sub-directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every state file.
pub const FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum LocalStateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("endpoint {network}/{id} is already being set up or cleaned up on this node")]
    Exists { network: String, id: String },
    #[error("invalid local endpoint name {0:?}")]
    BadName(String),
    #[error("unreadable local record {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

type Result<T, E = LocalStateError> = std::result::Result<T, E>;

/// Creates `dir` (and missing parents) and sets it to mode 0700 explicitly (not through
/// the umask), also when it already existed.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

/// A process identified by pid and start time (clock ticks after boot, field 22 of
/// `/proc/PID/stat`): a pid reused by another process does not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

/// The state letter and start time from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything; fields follow it.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl ProcessId {
    /// The calling process.
    pub fn current() -> io::Result<Self> {
        Self::of(std::process::id())
    }

    /// Process `pid` as it is now.
    pub fn of(pid: u32) -> io::Result<Self> {
        let (_, start_time) = proc_stat(pid)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}")))?;
        Ok(Self { pid, start_time })
    }

    /// Whether this very process still runs (not gone, not a zombie, pid not reused).
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }
}

/// Who created the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `overlay-ctl run`: a namespace of its own, removed with the container.
    Run,
    /// `overlay-ctl attach`: a veth into someone else's namespace.
    Attach,
}

/// One endpoint this node created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub network: String,
    pub id: String,
    pub kind: Kind,
    /// The `run`/`attach` process while it sets up or (for `run`) runs the container;
    /// `None` once an `attach` completed.
    pub owner: Option<ProcessId>,
    /// The container's command (`run`).
    #[serde(default)]
    pub command: Option<ProcessId>,
    /// The address, once allocated.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// The endpoint entry as this node wrote it to the store, once written.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    pub created_unix_ms: u64,
}

impl LocalEndpoint {
    /// A record owned by the calling process.
    pub fn new(network: &str, id: &str, kind: Kind) -> Result<Self> {
        for name in [network, id] {
            crate::store::ipam::validate_name(name)
                .map_err(|_| LocalStateError::BadName(name.to_string()))?;
        }
        let owner = ProcessId::current().map_err(|source| LocalStateError::Io {
            what: "identify",
            path: PathBuf::from("/proc/self/stat"),
            source,
        })?;
        Ok(Self {
            network: network.to_string(),
            id: id.to_string(),
            kind,
            owner: Some(owner),
            command: None,
            ip: None,
            endpoint: None,
            created_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        })
    }

    /// The host-side veth name, generated from the names (never read from the store).
    pub fn host_ifname(&self) -> String {
        crate::store::ipam::host_ifname(&self.network, &self.id)
    }

    /// The `/run/netns` name of a `run` container's namespace.
    pub fn netns_name(&self) -> Option<String> {
        (self.kind == Kind::Run).then(|| run_netns_name(&self.network, &self.id))
    }

    /// Whether a process that is responsible for this endpoint still runs: its owner, or
    /// a `run` container's command (the container lives on after a killed `run`).
    pub fn has_live_process(&self) -> bool {
        self.owner.is_some_and(|p| p.alive()) || self.command.is_some_and(|p| p.alive())
    }

    /// An `attach` that completed: lives until `detach` or until its veth is gone.
    pub fn committed(&self) -> bool {
        self.kind == Kind::Attach && self.owner.is_none()
    }

    /// Whether the endpoint is in use: the agent forwards for it and leaves it alone.
    /// Otherwise it is left over and the agent collects it.
    pub fn in_use(&self) -> bool {
        self.committed() || self.has_live_process()
    }

    fn file_name(&self) -> String {
        file_name(&self.network, &self.id)
    }
}

/// The namespace name `run` gives a container.
pub fn run_netns_name(network: &str, id: &str) -> String {
    format!("ovl-{network}-{id}")
}

/// `+` is not allowed in network or endpoint names, so the file name is unambiguous.
fn file_name(network: &str, id: &str) -> String {
    format!("{network}+{id}.json")
}

/// The records of one state directory.
#[derive(Clone, Debug)]
pub struct LocalState {
    dir: PathBuf,
}

impl LocalState {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join(ENDPOINTS_DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LocalStateError {
        let path = path.to_path_buf();
        move |source| LocalStateError::Io { what, path, source }
    }

    fn ensure_dir(&self) -> Result<()> {
        if let Some(parent) = self.dir.parent() {
            ensure_private_dir(parent).map_err(Self::io("create", parent))?;
        }
        ensure_private_dir(&self.dir).map_err(Self::io("create", &self.dir))
    }

    /// Records a new endpoint; refused when a record for the same name exists (another
    /// `run`/`attach` of it, or one not yet collected).
    pub fn create(&self, record: &LocalEndpoint) -> Result<()> {
        self.ensure_dir()?;
        let path = self.dir.join(record.file_name());
        let data = serde_json::to_vec_pretty(record).unwrap_or_default();
        // Written whole under a name of its own, then linked into place: the link is
        // create-only, and no reader ever sees the record empty or half written.
        let staged = path.with_extension(format!("new{}", std::process::id()));
        write_private_file(&staged, &data).map_err(Self::io("write", &staged))?;
        let linked = fs::hard_link(&staged, &path);
        let _ = fs::remove_file(&staged);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(LocalStateError::Exists {
                network: record.network.clone(),
                id: record.id.clone(),
            }),
            Err(e) => Err(Self::io("create", &path)(e)),
        }
    }

    /// Replaces an existing record.
    pub fn update(&self, record: &LocalEndpoint) -> Result<()> {
        self.ensure_dir()?;
        let path = self.dir.join(record.file_name());
        let data = serde_json::to_vec_pretty(record).unwrap_or_default();
        write_private_file(&path, &data).map_err(Self::io("write", &path))
    }

    /// Removes a record (removing a missing one is not an error).
    pub fn remove(&self, network: &str, id: &str) -> Result<()> {
        let path = self.dir.join(file_name(network, id));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Self::io("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// One record, if it exists and is valid.
    pub fn get(&self, network: &str, id: &str) -> Option<LocalEndpoint> {
        self.read(&self.dir.join(file_name(network, id))).ok()
    }

    fn read(&self, path: &Path) -> Result<LocalEndpoint> {
        let corrupt = |message: String| LocalStateError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        let data = fs::read(path).map_err(Self::io("read", path))?;
        let record: LocalEndpoint =
            serde_json::from_slice(&data).map_err(|e| corrupt(e.to_string()))?;
        for name in [&record.network, &record.id] {
            if crate::store::ipam::validate_name(name).is_err() {
                return Err(corrupt(format!("invalid name {name:?}")));
            }
        }
        // The content must be the endpoint the file is named after.
        if path.file_name().and_then(|n| n.to_str()) != Some(record.file_name().as_str()) {
            return Err(corrupt("file name does not match its content".into()));
        }
        Ok(record)
    }

    /// Every valid record, and the files that could not be read (partly written by a
    /// killed process, or not ours) with the reason.
    pub fn load_all(&self) -> (Vec<LocalEndpoint>, Vec<LocalStateError>) {
        let mut records = Vec::new();
        let mut errors = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (records, errors),
            Err(e) => {
                errors.push(Self::io("read", &self.dir)(e));
                return (records, errors);
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match self.read(&path) {
                Ok(record) => records.push(record),
                Err(e) => errors.push(e),
            }
        }
        records.sort_by(|a, b| (&a.network, &a.id).cmp(&(&b.network, &b.id)));
        (records, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("overlay-local-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn records_round_trip_with_private_modes() {
        let dir = temp_dir("modes");
        let state = LocalState::new(&dir);
        let mut record = LocalEndpoint::new("net1", "web", Kind::Run).unwrap();
        state.create(&record).unwrap();
        assert!(matches!(
            state.create(&record),
            Err(LocalStateError::Exists { .. })
        ));
        // Nothing staged is left beside the record, created or refused.
        let files: Vec<_> = fs::read_dir(state.dir()).unwrap().flatten().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        record.ip = Some(Ipv4Addr::new(10, 0, 0, 2));
        state.update(&record).unwrap();
        assert_eq!(state.get("net1", "web"), Some(record.clone()));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(state.dir()), 0o700);
        assert_eq!(mode(&state.dir().join("net1+web.json")), 0o600);
        let (all, errors) = state.load_all();
        assert_eq!(all, vec![record]);
        assert!(errors.is_empty());
        state.remove("net1", "web").unwrap();
        state.remove("net1", "web").unwrap();
        assert!(state.load_all().0.is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_must_match_its_file_name() {
        let dir = temp_dir("names");
        let state = LocalState::new(&dir);
        let record = LocalEndpoint::new("net1", "web", Kind::Run).unwrap();
        state.create(&record).unwrap();
        fs::rename(
            state.dir().join("net1+web.json"),
            state.dir().join("net1+other.json"),
        )
        .unwrap();
        fs::write(state.dir().join("net1+bad.json"), b"{").unwrap();
        let (all, errors) = state.load_all();
        assert!(all.is_empty());
        assert_eq!(errors.len(), 2);
        assert!(LocalEndpoint::new("../x", "web", Kind::Run).is_err());
        assert!(LocalEndpoint::new("net1", "a+b", Kind::Run).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn processes_are_told_apart_by_start_time() {
        let me = ProcessId::current().unwrap();
        assert!(me.alive());
        let reused = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!id.alive());
    }

    #[test]
    fn generated_names_come_from_the_record() {
        let record = LocalEndpoint::new("net1", "web", Kind::Run).unwrap();
        assert_eq!(
            record.host_ifname(),
            crate::store::ipam::host_ifname("net1", "web")
        );
        assert_eq!(record.netns_name().as_deref(), Some("ovl-net1-web"));
        let attach = LocalEndpoint::new("net1", "web", Kind::Attach).unwrap();
        assert_eq!(attach.netns_name(), None);
        assert!(!attach.committed());
        assert!(attach.in_use());
    }
}
