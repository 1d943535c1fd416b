//! What both agt-jail executables share: the flags of `exec` and the run of a jailed
//! command. `agt-jail` runs jails that need no BPF programs itself and hands every other
//! command line to `agt-jail-full` beside it (docs/adr/0004).
pub mod args;
pub mod run;

/// Exit status for agt-jail's own failures (bad flags, bad policy, kernel refused), as `docker run` does.
pub const EXIT_INTERNAL: u8 = 125;
