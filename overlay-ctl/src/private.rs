//! Files and sockets only root or the agent's own user may use: the control socket, the
//! Docker plugin socket, the session and cluster-id files. Shared by the agent, the store
//! and the HTTP server loop, so it sits below all of them.
use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use tokio::net::{UnixListener, UnixStream};

/// The mode of a private socket: whoever can connect to the control socket can put any
/// namespace on any network.
pub const SOCKET_MODE: u32 = 0o600;
/// The mode of a private file.
pub const FILE_MODE: u32 = 0o600;

/// Listens on `path` with mode [`SOCKET_MODE`] whatever the umask: the socket is bound
/// under a temporary name, given its mode, then renamed into place, so it is never
/// reachable with a wider mode.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}.new", std::process::id()));
    let temp = PathBuf::from(temp);
    let _ = fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp)?;
    let placed = fs::set_permissions(&temp, fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

/// Whether the process at the other end of an accepted connection runs as root or as
/// the agent's own user (a second check behind the socket's mode, should someone widen
/// it; an agent run with capabilities instead of as root serves its own user).
pub fn peer_is_trusted(stream: &UnixStream) -> bool {
    let own = nix::unistd::geteuid().as_raw();
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == 0 || cred.uid() == own)
}

/// Writes `data` to `path` atomically (a temporary file renamed over it) with mode
/// [`FILE_MODE`].
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        // The mode given to open(2) is filtered by the umask; set it explicitly.
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
