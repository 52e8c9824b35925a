//! Named network namespaces, compatible with `ip netns` (a bind mount under
//! `/run/netns`), and running code inside one.
//!
//! Namespace membership is per thread, so work "inside" a namespace runs on a dedicated
//! thread that entered it; the caller's threads never change namespace.
use std::{
    fs::File,
    future::Future,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace. Dropping it does not delete it; [`NetNs::delete`] does.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// Creates `/run/netns/NAME` holding a new, empty network namespace.
    pub fn create(name: &str) -> io::Result<Self> {
        let dir = Path::new(NETNS_RUN_DIR);
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let target = path.clone();
        let made = std::thread::spawn(move || -> io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(io::Error::from)
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Self::open_path(name, path)
    }

    /// Opens an existing named namespace.
    pub fn open(name: &str) -> io::Result<Self> {
        Self::open_path(name, Path::new(NETNS_RUN_DIR).join(name))
    }

    /// Opens a namespace by path (`/run/netns/X`, `/proc/PID/ns/net`). A file that is
    /// not a namespace is `NotFound`: `/run/netns/X` is an empty file until the bind
    /// mount of its namespace is in place (another process may be creating it right
    /// now), and entering it would fail with a bare EINVAL.
    pub fn open_path(name: &str, path: PathBuf) -> io::Result<Self> {
        let file = File::open(&path)?;
        let is_namespace = nix::sys::statfs::fstatfs(&file)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
        if !is_namespace {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a network namespace (yet)", path.display()),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            path,
            file,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Unmounts and removes the name. The namespace itself goes away with its last user.
    pub fn delete(self) -> io::Result<()> {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = &self.file;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter(file)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("namespace thread panicked"))?
        })
    }

    /// Runs a future on a single-threaded runtime on a thread inside this namespace
    /// (netlink sockets it opens act in this namespace).
    pub fn block_on<F, Fut, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        self.run(|| -> io::Result<R> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(runtime.block_on(f()))
        })?
    }

    /// Spawns a long-lived thread inside this namespace.
    pub fn spawn<F, R>(&self, f: F) -> io::Result<std::thread::JoinHandle<io::Result<R>>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.file.try_clone()?;
        Ok(std::thread::spawn(move || {
            enter(&file)?;
            Ok(f())
        }))
    }
}

/// Moves the calling thread into the namespace behind `file`.
pub fn enter(file: &File) -> io::Result<()> {
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Writes a sysctl under /proc/sys/net for the calling thread's namespace.
/// Reads a `net.` sysctl of the calling thread's namespace (`key` like `ipv4.ip_forward`).
pub fn read_net_sysctl(key: &str) -> io::Result<String> {
    let path = Path::new("/proc/sys/net").join(key.replace('.', "/"));
    std::fs::read_to_string(&path)
        .map(|v| v.trim().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

pub fn write_net_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = Path::new("/proc/sys/net").join(key.replace('.', "/"));
    std::fs::write(&path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}
