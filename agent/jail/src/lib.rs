//! The synchronous launcher: everything between "run this agent" and its first
//! instruction. No async runtime here: the pre-exec path must stay small, ordered
//! and auditable. All raw syscalls go through [`sys`].

pub mod cgroup;
pub mod spawn;
mod sys;

pub use cgroup::{AgentCgroup, CgroupError, CgroupLayout};
pub use spawn::{spawn_in_cgroup, SpawnError};
