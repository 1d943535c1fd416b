//! The synchronous launcher: everything between "run this agent" and its first
//! instruction. No async runtime here: the pre-exec path must stay small, ordered
//! and auditable. All raw syscalls go through [`sys`] (private).

pub mod cgroup;
pub mod egress;
pub mod exec_size;
pub mod landlock;
pub mod launch;
pub mod mounts;
mod netlink;
pub mod profile;
pub mod pty;
pub mod seccomp;
pub mod spawn;
mod sys;
pub mod yaml;

pub use cgroup::{AgentCgroup, CgroupError, CgroupLayout, CgroupLimits};
pub use launch::{JailConfig, JailProcess, LaunchError};
pub use profile::{NetMode, Profile, ProfileError, WorkspaceMode};
pub use spawn::{notify_execs, spawn_in_cgroup, spawn_in_cgroup_notified, SpawnError};

/// `eprintln!` that cannot panic: one line on stderr, a failed write ignored. A supervising
/// `agt-jail exec` must keep enforcing and clean up when its stderr is a pipe whose reader
/// went away (`eprintln!` panics on EPIPE); everything the run prints goes through this.
#[macro_export]
macro_rules! stderr_line {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        // One write per line: the command shares the descriptor, and a line written in
        // pieces gets its output spliced into the middle.
        let line = ::std::format!("{}\n", ::std::format_args!($($arg)*));
        let _ = ::std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

/// Facts about the running kernel, for `agt-jail doctor` and start-up checks.
pub mod host {
    use crate::sys;

    /// The Landlock ABI version, or None when Landlock is not enforced.
    pub fn landlock_abi() -> Option<u32> {
        sys::landlock_abi().ok().filter(|v| *v > 0)
    }

    /// Whether seccomp filters can be installed.
    pub fn seccomp_available() -> bool {
        sys::seccomp_available()
    }

    /// Every address on an interface of this process's network namespace.
    pub fn interface_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
        sys::interface_addresses()
    }

    /// `uname -r`.
    pub fn kernel_release() -> String {
        sys::kernel_release()
    }

    /// The effective uid of this process.
    pub fn euid() -> u32 {
        sys::geteuid()
    }

    /// Children of this thread start with normal scheduling, whatever this thread runs
    /// with: an agent never inherits a real-time policy or a negative nice value from
    /// the operator's shell (see [`sys::reset_scheduling_on_fork`]).
    pub fn reset_scheduling_on_fork() -> std::io::Result<()> {
        sys::reset_scheduling_on_fork()
    }

    /// A pidfd for `pid` (see [`sys::pidfd_open`]).
    pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
        sys::pidfd_open(pid)
    }

    /// Sends `signal` through a pidfd (ESRCH is not an error).
    pub fn pidfd_send_signal(pidfd: std::os::fd::BorrowedFd<'_>, signal: i32) -> std::io::Result<()> {
        sys::pidfd_send_signal(pidfd, signal)
    }

    /// Sends `signal` to `pid` (ESRCH is not an error).
    pub fn kill(pid: i32, signal: i32) -> std::io::Result<()> {
        sys::kill(pid, signal)
    }
}
