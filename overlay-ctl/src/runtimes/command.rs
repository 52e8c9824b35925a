//! The command of an `overlay-ctl run` container: started inside the container's
//! namespace only once this node's record names it ([`spawn_recorded`]), waited for with
//! the termination signals passed on ([`RunSignals`], [`wait_passing_signals`]), and
//! its exit status turned into the code a shell would report ([`exit_code`]).
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
    process::ExitStatus,
};

use tracing::debug;

use super::container::{ContainerError, Result};
use crate::agent::{dns::forward::SYSTEM_RESOLV_CONF, local_state::ProcessId};

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

/// A pipe whose ends are closed on exec (so no other child inherits them).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`, owned from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads exactly `buf.len()` bytes, retrying on EINTR; false on end of file or error.
/// Async-signal-safe (it runs between fork and exec too).
fn read_full(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: reads into the unfilled part of `buf`.
        let n = unsafe { libc::read(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done) };
        if n > 0 {
            done += n as usize;
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
    true
}

/// Starts `command` inside `netns` with the caller's stdin, stdout and stderr (a terminal
/// stays a terminal), once `record` has written its process id down.
///
/// The new process tells its pid through a pipe and waits, before it execs, for a byte
/// that is sent only after `record` succeeded. If this process dies first (a SIGKILL of
/// `run`), the pipe closes and the command never starts: no command runs that this
/// node's record does not name, so the agent never reaps a container whose command
/// lives, nor keeps one whose command is gone. Blocks the calling worker thread while
/// the command starts.
///
/// With `resolv_conf`, the command also gets a mount namespace of its own in which that
/// file is bind-mounted over `/etc/resolv.conf` (what `ip netns exec` does with
/// `/etc/netns/NETNS/resolv.conf`), so its resolver is the overlay's and the host's
/// file stays as it is.
pub fn spawn_recorded(
    netns: &Path,
    resolv_conf: Option<&Path>,
    command: &[String],
    record: impl FnOnce(ProcessId) -> Result<()>,
) -> Result<tokio::process::Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| io_err("no command")(io::ErrorKind::InvalidInput.into()))?;
    let resolv_mount = resolv_conf.map(ResolvConfMount::new).transpose()?;
    let ns_file =
        std::fs::File::open(netns).map_err(io_err(format!("open {}", netns.display())))?;
    let (pid_read, pid_write) = pipe().map_err(io_err("pipe"))?;
    let (go_read, go_write) = pipe().map_err(io_err("pipe"))?;
    let (ns_fd, pid_fd, go_read_fd, go_write_fd) = (
        ns_file.as_raw_fd(),
        pid_write.as_raw_fd(),
        go_read.as_raw_fd(),
        go_write.as_raw_fd(),
    );
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe calls (close, getpid, write, read, setns, unshare,
    // mount) run between fork and exec, on descriptors this function keeps open until then.
    unsafe {
        cmd.pre_exec(move || {
            libc::close(go_write_fd);
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(pid_fd, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
                return Err(io::Error::last_os_error());
            }
            let mut go = [0u8; 1];
            if !read_full(go_read_fd, &mut go) {
                return Err(io::Error::from_raw_os_error(libc::ECANCELED));
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            match &resolv_mount {
                Some(mount) => mount.apply(),
                None => Ok(()),
            }
        });
    }
    let runtime = tokio::runtime::Handle::current();
    let (spawned, recorded) = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let spawner = scope.spawn(move || {
                let _runtime = runtime.enter();
                let spawned = cmd.spawn();
                // Tells the reader below, if no child wrote a pid, that none will.
                drop(pid_write);
                spawned
            });
            let recorded = release_when_recorded(&pid_read, go_write, record);
            let spawned = spawner
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("spawning thread panicked")));
            (spawned, recorded)
        })
    });
    drop((ns_file, go_read));
    recorded?;
    spawned.map_err(io_err(format!("cannot start {program:?}")))
}

/// A container's own resolv.conf, bind-mounted over the host's in a new mount namespace.
/// The paths are turned into C strings before the fork: nothing is allocated after it.
struct ResolvConfMount {
    source: CString,
    target: CString,
}

impl ResolvConfMount {
    fn new(source: &Path) -> Result<Self> {
        let c_string = |path: &Path| {
            CString::new(path.as_os_str().as_bytes())
                .map_err(|e| io_err(format!("path {}", path.display()))(io::Error::other(e)))
        };
        Ok(Self {
            source: c_string(source)?,
            target: c_string(Path::new(SYSTEM_RESOLV_CONF))?,
        })
    }

    /// Runs in the child between fork and exec (async-signal-safe system calls only).
    fn apply(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on NUL-terminated strings that outlive them.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // The host's `/` is usually a shared mount: made a slave, the container's
            // copy receives the host's later mounts but sends none back, so the bind
            // below stays the container's.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                self.source.as_ptr(),
                self.target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))
        }
    }
}

/// The parent's side of [`spawn_recorded`]: reads the child's pid, records it, and lets
/// the child exec (by closing `go` after one byte) only if that worked.
fn release_when_recorded(
    pid_read: &OwnedFd,
    go: OwnedFd,
    record: impl FnOnce(ProcessId) -> Result<()>,
) -> Result<()> {
    let mut pid = [0u8; 4];
    if !read_full(pid_read.as_raw_fd(), &mut pid) {
        // No child (the fork failed): the spawn's own error tells why.
        return Ok(());
    }
    let pid = i32::from_ne_bytes(pid) as u32;
    let process = ProcessId::of(pid).map_err(io_err(format!("identify process {pid}")))?;
    record(process)?;
    // SAFETY: writes one byte from a live buffer.
    if unsafe { libc::write(go.as_raw_fd(), [1u8].as_ptr().cast(), 1) } != 1 {
        return Err(io_err("start the command")(io::Error::last_os_error()));
    }
    Ok(())
}

/// The signals `run` handles itself, installed before it changes anything so that a
/// SIGTERM during set-up still ends in an orderly clean-up.
pub struct RunSignals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl RunSignals {
    pub fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(io_err("signal handler"))?,
            hup: signal(SignalKind::hangup()).map_err(io_err("signal handler"))?,
            int: signal(SignalKind::interrupt()).map_err(io_err("signal handler"))?,
        })
    }

    /// The termination signal that arrived so far, if any (without waiting).
    pub fn pending(&mut self) -> Option<nix::sys::signal::Signal> {
        use futures_util::FutureExt as _;
        use nix::sys::signal::Signal;
        if self.term.recv().now_or_never().is_some() {
            Some(Signal::SIGTERM)
        } else if self.hup.recv().now_or_never().is_some() {
            Some(Signal::SIGHUP)
        } else if self.int.recv().now_or_never().is_some() {
            Some(Signal::SIGINT)
        } else {
            None
        }
    }
}

/// Waits for a command started by [`spawn_recorded`]. SIGTERM and SIGHUP are passed on to it;
/// SIGINT from a terminal reaches it directly, and is passed on when there is none.
pub async fn wait_passing_signals(
    mut child: tokio::process::Child,
    signals: &mut RunSignals,
) -> Result<ExitStatus> {
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let interactive = nix::unistd::isatty(0).unwrap_or(false);
    let forward = |sig: nix::sys::signal::Signal| {
        if let Some(pid) = pid {
            debug!(?sig, "passing the signal on to the container's command");
            let _ = nix::sys::signal::kill(pid, sig);
        }
    };
    loop {
        tokio::select! {
            status = child.wait() => return status.map_err(io_err("wait for the command")),
            _ = signals.term.recv() => forward(nix::sys::signal::Signal::SIGTERM),
            _ = signals.hup.recv() => forward(nix::sys::signal::Signal::SIGHUP),
            _ = signals.int.recv() => if !interactive { forward(nix::sys::signal::Signal::SIGINT) },
        }
    }
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
        _ => 1,
    }
}
