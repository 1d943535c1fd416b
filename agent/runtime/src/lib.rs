//! One governed agent's life, shared by `agt-jail exec` and the host daemon: the BPF
//! programs of its cgroup, the policy's planes, the evaluator, the record writer, the
//! agent's resolver, kill and demotion, and the stop sequence that drains what the kernel
//! queued (docs/adr/0011-agent-runtime.md).
//!
//! The runtime takes plain options ([`RunOptions`]), not command-line flags: the CLI keeps
//! flag parsing, refusals with their exit codes and what it prints. It is synchronous
//! (threads, no async runtime): the pre-exec path stays small and a daemon drives it from
//! a blocking task.
use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use agt_jail_jail::{NetMode, Profile};

pub mod agent;
pub mod audit_run;
pub mod govern;
pub mod pinned_run;
pub mod plane;
pub mod resolver;

pub use agent::{Agent, JailAdditions};

/// What puts an agent under policy (`exec --policy` and the flags that need it).
#[derive(Debug, Clone, Default)]
pub struct PolicyOptions {
    /// The policy files; none: the run is not governed by a policy.
    pub policy: Vec<PathBuf>,
    /// The agent's name (default `agent-<pid>`).
    pub agent: Option<String>,
    /// Starting trust, 0..1000.
    pub trust: u32,
    /// Trust lost per denial (overrides the policy's `trust:` section).
    pub deny_penalty: Option<u32>,
    /// Trust below which the agent is killed (overrides the policy's `trust:` section).
    pub kill_below: Option<u32>,
    /// Seconds a held action waits for `approve`/`deny` before it is denied.
    pub approval_timeout: u64,
    /// A rule no plane can enforce before effect is an error instead of a warning.
    pub strict: bool,
    /// Lifetime of the agent's identity tokens, seconds.
    pub token_ttl: u64,
    /// The SPIFFE trust domain the agent's id is in.
    pub trust_domain: String,
    /// Seconds between re-resolutions of the policy's domains (None: the default).
    pub dns_refresh: Option<u64>,
}

impl PolicyOptions {
    /// Whether a policy governs the run.
    pub fn given(&self) -> bool {
        !self.policy.is_empty()
    }
}

/// The run's tamper-evident audit log (`exec --audit`).
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    /// The log's file; none: no audit log.
    pub file: Option<PathBuf>,
    /// The Ed25519 signing key (created when missing).
    pub key: PathBuf,
    /// When records reach the disk (`SyncPolicy` syntax).
    pub sync: String,
    pub checkpoint_every: u64,
    pub checkpoint_secs: u64,
    pub rotate: Option<u64>,
}

/// One governed run, as plain data: what `agt-jail exec` makes of its flags and what a
/// daemon makes of a launch request.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The entry command (checked against what the exec plane can read under a policy).
    pub command: Vec<OsString>,
    /// Where event records go (`-`: stdout).
    pub events: Option<PathBuf>,
    /// No denial lines, load warnings or agent name on stderr.
    pub quiet: bool,
    /// Destinations denied in the kernel: (address, port), port 0 for every port.
    pub deny_connect: Vec<(IpAddr, u16)>,
    /// The upstream of the agent's resolver (allowlist mode).
    pub dns_upstream: Option<SocketAddr>,
    pub policy: PolicyOptions,
    pub audit: AuditOptions,
}

impl RunOptions {
    /// Whether the run needs BPF programs: record mode (ring 0) exists to be observed;
    /// connect rules, allow-lists, events, audit logs and policies are enforced or
    /// recorded by them. Without them the jail alone enforces (docs/adr/0003).
    pub fn needs_bpf(&self, profile: &Profile) -> bool {
        !profile.confine
            || profile.net == NetMode::Allowlist
            || self.events.is_some()
            || self.audit.file.is_some()
            || !self.deny_connect.is_empty()
            || self.policy.given()
    }
}
