//! Starting the agent's first process inside its cgroup.
//!
//! The child moves itself into the cgroup between fork and exec, so its exec
//! (and everything after it) is already attributed to the agent and governed by
//! the cgroup's BPF programs. Only a write(2) to an fd opened beforehand happens
//! in the child: nothing that allocates or takes locks.
use std::{
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::process::CommandExt,
    },
    process::{Child, Command},
};

use crate::{
    cgroup::AgentCgroup,
    seccomp::{self, Arch},
    sys, CgroupError,
};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{program}: command not found")]
    NotFound { program: String },
    #[error("{program}: permission denied (not executable)")]
    NotExecutable { program: String },
    #[error("cannot start {program}: {source}")]
    Start { program: String, source: io::Error },
    #[error("the exec listener is built for x86_64 and aarch64 only")]
    UnsupportedArch,
}

impl SpawnError {
    /// Exit status a shell would give: 127 not found, 126 not executable, else None.
    pub fn shell_status(&self) -> Option<u8> {
        match self {
            SpawnError::NotFound { .. } => Some(127),
            SpawnError::NotExecutable { .. } => Some(126),
            _ => None,
        }
    }
}

/// Spawns `cmd` so that it joins `cgroup` before it execs.
pub fn spawn_in_cgroup(cmd: Command, cgroup: &AgentCgroup) -> Result<Child, SpawnError> {
    spawn_in_cgroup_notified(cmd, cgroup, None)
}

/// [`spawn_in_cgroup`], and with `exec_notify` (the child end of a unix socketpair) the
/// child installs the exec listener last and sends its fd over the socket (see
/// [`notify_execs`]). The receiver must already be running: `spawn` returns only once the
/// command's own execve has been answered.
pub fn spawn_in_cgroup_notified(
    mut cmd: Command,
    cgroup: &AgentCgroup,
    exec_notify: Option<RawFd>,
) -> Result<Child, SpawnError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    // Every hierarchy that holds a limit (v1 ones on hybrid hosts), not only v2: a
    // limit the command's cgroup does not carry is a limit silently not enforced.
    let procs = cgroup.procs_for_join()?;
    let procs_fds: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let supervisor = std::process::id();
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // (write(2) on fds that `procs` keeps open in the parent, and so in the child's copy
    // of the fd table, until spawn returns; prctl(2); getppid(2)): all async-signal-safe;
    // iterating the fd list built above does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &procs_fds {
                sys::write_all_raw(*fd, b"0")?;
            }
            // The BPF links live as long as agt-jail: an agent that outlived it would run
            // ungoverned, so it dies with it (its descendants go with the cgroup sweep).
            sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0)?;
            if sys::parent_pid() != supervisor {
                return Err(io::Error::other("agt-jail exited before the command started"));
            }
            Ok(())
        });
    }
    if let Some(socket) = exec_notify {
        notify_execs(&mut cmd, socket)?;
    }
    let child = cmd.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => SpawnError::NotFound { program: program.clone() },
        io::ErrorKind::PermissionDenied => SpawnError::NotExecutable { program: program.clone() },
        _ => SpawnError::Start { program: program.clone(), source },
    })?;
    drop(procs);
    Ok(child)
}

/// Makes the child of `cmd` install the exec listener ([`seccomp::exec_listener`], with
/// SECCOMP_FILTER_FLAG_NEW_LISTENER) as its last step before exec, send the listener fd
/// over the unix socket `socket` (SCM_RIGHTS) and close both, so the command runs without
/// either. Register it after every other `pre_exec` step: closures run in order, and every
/// execve after this one (including the command's own) waits for the supervisor.
///
/// No no_new_privs here: this path is ring 0, run by root, and CAP_SYS_ADMIN allows the
/// filter without it (setuid programs keep working). Without that capability the install
/// fails with EACCES and the command does not start.
pub fn notify_execs(cmd: &mut Command, socket: RawFd) -> Result<(), SpawnError> {
    let filter = seccomp::exec_listener(Arch::native().ok_or(SpawnError::UnsupportedArch)?);
    // SAFETY: the closure runs in the forked child before exec. It makes system calls only
    // (seccomp(2) on the filter built above, which the child's copy of the address space
    // holds; sendmsg(2) with a stack buffer; close(2)): async-signal-safe, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let listener = sys::seccomp_set_filter_listener(&filter)?;
            let sent = sys::send_fd(socket, listener);
            sys::close(listener);
            sys::close(socket);
            sent
        });
    }
    Ok(())
}
