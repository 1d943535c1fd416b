//! Who is at the other end of a unix socket, as the kernel says: the peer's process (a
//! pidfd, so a recycled pid cannot stand in for it) and the cgroup it runs in.
//!
//! The agent's identity socket answers only processes of the agent's own cgroup (or a
//! cgroup below it); what the caller writes is never taken as who it is.
use std::{
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
};

/// SO_PEERPIDFD (Linux 6.5): a pidfd of the process that connected, taken at connect time.
const SO_PEERPIDFD: libc::c_int = 77;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot identify the peer: {0}")]
    Kernel(io::Error),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} has no cgroup v2 line")]
    NoCgroup { path: PathBuf },
    #[error("the peer process (pid {pid}) exited while it was being identified")]
    Gone { pid: u32 },
}

/// A process identified by the kernel.
#[derive(Debug)]
pub struct Peer {
    /// Its pid in agt-jail's pid namespace.
    pub pid: u32,
    /// Its cgroup v2 path, as in `/proc/PID/cgroup` (`/agt-jail/agt-123-0`).
    pub cgroup: String,
    /// Whether the pidfd came from the socket itself (SO_PEERPIDFD) rather than from the pid.
    pub pinned_at_connect: bool,
}

/// The cgroup v2 path of process `pid`, from `<proc_root>/<pid>/cgroup` (the `0::` line).
pub fn cgroup_of(proc_root: &Path, pid: u32) -> Result<String, PeerError> {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    let text = std::fs::read_to_string(&path).map_err(|source| PeerError::Read { path: path.clone(), source })?;
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_string).ok_or(PeerError::NoCgroup { path })
}

/// Whether cgroup `peer` (a `/proc/PID/cgroup` path) is the agent's cgroup `agent` or below it.
/// Compared by whole path components: `/a/b2` is not below `/a/b`.
pub fn within(peer: &str, agent: &str) -> bool {
    // A removed cgroup reads "/path (deleted)": never the agent's live one.
    !peer.ends_with(" (deleted)") && Path::new(peer).starts_with(agent)
}

/// The agent's cgroup as `/proc/PID/cgroup` names it: its directory under the cgroup2 mount.
pub fn cgroup_name(cgroup2_mount: &Path, agent_dir: &Path) -> Option<String> {
    let rel = agent_dir.strip_prefix(cgroup2_mount).ok()?;
    Some(format!("/{}", rel.display()))
}

/// Identifies the process at the other end of `stream`.
///
/// The pidfd is the anchor: SO_PEERPIDFD names the very process that connected; on
/// kernels without it (before 6.5), SO_PEERCRED's pid is opened with pidfd_open, and a
/// pid recycled between the connect and that open would be taken for the caller (the
/// window docs/identity.md describes). The cgroup is read from `/proc/PID/cgroup` and
/// then the pidfd is asked whether the process still exists: if it does, the pid was
/// not recycled in between, so the cgroup read was the peer's.
pub fn identify(stream: &UnixStream, proc_root: &Path) -> Result<Peer, PeerError> {
    let (pidfd, pinned_at_connect) = match peer_pidfd(stream) {
        Ok(fd) => (fd, true),
        Err(_) => (pidfd_open(peer_pid(stream)?)?, false),
    };
    let pid = pidfd_pid(proc_root, pidfd.as_fd())?;
    let cgroup = cgroup_of(proc_root, pid)?;
    if !alive(pidfd.as_fd()) {
        return Err(PeerError::Gone { pid });
    }
    Ok(Peer { pid, cgroup, pinned_at_connect })
}

fn peer_pidfd(stream: &UnixStream) -> Result<OwnedFd, PeerError> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for writes of the sizes passed; the socket is open
    // for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, (&raw mut fd).cast(), &raw mut len)
    };
    if rc < 0 || fd < 0 {
        return Err(PeerError::Kernel(io::Error::last_os_error()));
    }
    // SAFETY: SO_PEERPIDFD returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn peer_pid(stream: &UnixStream) -> Result<u32, PeerError> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as in `peer_pidfd`, for a struct ucred.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &raw mut len)
    };
    if rc < 0 {
        return Err(PeerError::Kernel(io::Error::last_os_error()));
    }
    // pid 0: the peer is in a pid namespace that cannot see agt-jail's (never an agent's).
    u32::try_from(cred.pid).ok().filter(|p| *p > 0).ok_or(PeerError::Kernel(io::Error::from_raw_os_error(libc::ESRCH)))
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, PeerError> {
    // SAFETY: pidfd_open takes two integers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(PeerError::Kernel(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The pid a pidfd refers to, from `/proc/self/fdinfo/FD` (`Pid:`; -1 once it exited).
fn pidfd_pid(proc_root: &Path, pidfd: BorrowedFd<'_>) -> Result<u32, PeerError> {
    let path = proc_root.join("self/fdinfo").join(pidfd.as_raw_fd().to_string());
    let text = std::fs::read_to_string(&path).map_err(|source| PeerError::Read { path: path.clone(), source })?;
    let pid = text.lines().find_map(|l| l.strip_prefix("Pid:")).map(str::trim).and_then(|p| p.parse::<i64>().ok());
    match pid {
        Some(p) if p > 0 => u32::try_from(p).map_err(|_| PeerError::Gone { pid: 0 }),
        _ => Err(PeerError::Gone { pid: 0 }),
    }
}

/// Whether the process of `pidfd` still exists (signal 0 through the pidfd).
fn alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks; null info and zero flags are valid.
    let rc = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fake_proc(entries: &[(u32, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (pid, text) in entries {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cgroup"), text).unwrap();
        }
        root
    }

    #[test]
    fn the_v2_line_names_the_cgroup_on_hybrid_and_pure_hosts() {
        let root = fake_proc(&[
            (10, "12:pids:/x\n4:memory:/process_api/abc\n0::/agt-jail/agt-5-0\n"),
            (11, "0::/agt-jail/agt-5-0/worker\n"),
            (12, "4:memory:/\n"),
        ]);
        assert_eq!(cgroup_of(root.path(), 10).unwrap(), "/agt-jail/agt-5-0");
        assert_eq!(cgroup_of(root.path(), 11).unwrap(), "/agt-jail/agt-5-0/worker");
        assert!(matches!(cgroup_of(root.path(), 12), Err(PeerError::NoCgroup { .. })));
        assert!(matches!(cgroup_of(root.path(), 13), Err(PeerError::Read { .. })));
    }

    #[test]
    fn only_the_agents_cgroup_and_those_below_it_are_within() {
        let agent = "/agt-jail/agt-5-0";
        assert!(within("/agt-jail/agt-5-0", agent));
        assert!(within("/agt-jail/agt-5-0/child", agent));
        for other in ["/agt-jail/agt-5-01", "/agt-jail/agt-6-0", "/agt-jail", "/", "/agt-jail/agt-5-0 (deleted)"] {
            assert!(!within(other, agent), "{other}");
        }
    }

    #[test]
    fn the_agents_name_is_its_directory_under_the_mount() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        let dir = Path::new("/sys/fs/cgroup/unified/agt-jail/agt-5-0");
        assert_eq!(cgroup_name(mount, dir).as_deref(), Some("/agt-jail/agt-5-0"));
        assert_eq!(cgroup_name(mount, Path::new("/elsewhere")), None);
    }

    #[test]
    fn a_connected_process_is_identified_with_its_own_cgroup() {
        // This process at both ends: the kernel's answer must be our own pid and cgroup.
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = identify(&a, Path::new("/proc")).unwrap();
        assert_eq!(peer.pid, std::process::id());
        assert_eq!(peer.cgroup, cgroup_of(Path::new("/proc"), std::process::id()).unwrap());
    }
}
