//! Starting the agent's first process inside its cgroup.
//!
//! The child moves itself into the cgroup between fork and exec, so its exec
//! (and everything after it) is already attributed to the agent and governed by
//! the cgroup's BPF programs. Only a write(2) to an fd opened beforehand happens
//! in the child: nothing that allocates or takes locks.
use std::{
    io,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::{Child, Command},
};

use crate::{cgroup::AgentCgroup, sys, CgroupError};

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
pub fn spawn_in_cgroup(mut cmd: Command, cgroup: &AgentCgroup) -> Result<Child, SpawnError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let procs = cgroup.procs_for_join()?;
    let procs_fd = procs.as_raw_fd();
    let supervisor = std::process::id();
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // (write(2) on an fd that `procs` keeps open in the parent, and so in the child's copy
    // of the fd table, until spawn returns; prctl(2); getppid(2)): all async-signal-safe,
    // none allocates.
    unsafe {
        cmd.pre_exec(move || {
            sys::write_all_raw(procs_fd, b"0")?;
            // The BPF links live as long as agt-jail: an agent that outlived it would run
            // ungoverned, so it dies with it (its descendants go with the cgroup sweep).
            sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0)?;
            if sys::parent_pid() != supervisor {
                return Err(io::Error::other("agt-jail exited before the command started"));
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => SpawnError::NotFound { program: program.clone() },
        io::ErrorKind::PermissionDenied => SpawnError::NotExecutable { program: program.clone() },
        _ => SpawnError::Start { program: program.clone(), source },
    })?;
    drop(procs);
    Ok(child)
}
