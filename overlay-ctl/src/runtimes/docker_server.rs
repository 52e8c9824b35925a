//! The `overlay-net` driver served on Docker's plugin socket for as long as the agent
//! runs: an agent [`Companion`], so the agent starts it only once it is itself running
//! (a second agent that refuses to start never replaces the first one's socket) and
//! stops it with its own tasks.
use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{net::UnixListener, task::JoinSet};
use tracing::{info, warn};

use super::docker::{self, DockerPlugin};
use crate::agent::Companion;

/// Why the driver's socket could not be served.
#[derive(Debug, thiserror::Error)]
#[error("Docker plugin socket {path}: {source} (or `--docker-plugin off`)")]
pub struct DockerSocketError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// The driver on `socket`, answering with the local agent found in `state_dir`.
pub struct DockerDriverServer {
    socket: PathBuf,
    state_dir: PathBuf,
    started: bool,
}

impl DockerDriverServer {
    pub fn new(socket: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            socket,
            state_dir,
            started: false,
        }
    }
}

impl Companion for DockerDriverServer {
    fn start(
        &mut self,
        tasks: &mut JoinSet<()>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let listener = bind(&self.socket)?;
        self.started = true;
        let plugin = Arc::new(DockerPlugin::new(self.state_dir.clone()));
        info!(socket = %self.socket.display(), "serving Docker's network and IPAM driver");
        tasks.spawn(docker::serve(listener, plugin, std::future::pending()));
        Ok(())
    }

    fn stop(&mut self) {
        if !self.started {
            return;
        }
        match std::fs::remove_file(&self.socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                warn!(path = %self.socket.display(), error = %e, "cannot remove the Docker plugin socket")
            }
            _ => {}
        }
    }
}

/// Listens on Docker's plugin socket (mode 0600, set explicitly), replacing a stale one.
fn bind(path: &Path) -> Result<UnixListener, DockerSocketError> {
    let err = |source| DockerSocketError {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    crate::private::bind_socket(path).map_err(err)
}
