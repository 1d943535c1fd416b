//! `agt-jail exec` with what needs BPF programs: record mode (ring 0), connect rules,
//! allow-lists, --events and policies. The governed agent's life is the runtime's
//! ([`agt_jail_runtime::Agent`]); this module turns the flags into its options and its
//! errors into the exit status.
use std::{os::fd::RawFd, path::Path, process::ExitCode};

use agt_jail_cli::{
    args::{AuditArgs, ExecArgs, PolicyArgs},
    run::{self, Governor, JailAdditions, Prepared},
};
use agt_jail_jail::{egress::PendingEgress, AgentCgroup, Profile};
use agt_jail_runtime::{Agent, AuditOptions, PolicyOptions, RunOptions};
use anyhow::Result;

pub fn run(args: ExecArgs) -> ExitCode {
    let result = Prepared::new(&args)
        .and_then(|prepared| run::execute(&args, prepared, |profile| Governed::new(&args, profile)));
    run::exit_status(result)
}

/// The runtime's agent as the launcher drives it.
struct Governed(Agent);

impl Governed {
    fn new(args: &ExecArgs, profile: &Profile) -> Result<Self> {
        Agent::new(options(args), profile).map(Governed)
    }
}

/// The runtime's options from the flags.
fn options(args: &ExecArgs) -> RunOptions {
    RunOptions {
        command: args.command.clone(),
        events: args.events.clone(),
        quiet: args.quiet,
        deny_connect: args.deny_connect.iter().map(|dest| (dest.addr, dest.port)).collect(),
        dns_upstream: args.dns_upstream,
        policy: policy_options(&args.policy),
        audit: audit_options(&args.audit),
    }
}

fn policy_options(args: &PolicyArgs) -> PolicyOptions {
    PolicyOptions {
        policy: args.policy.clone(),
        agent: args.agent.clone(),
        trust: args.trust,
        deny_penalty: args.deny_penalty,
        kill_below: args.kill_below,
        approval_timeout: args.approval_timeout,
        strict: args.strict,
        token_ttl: args.token_ttl,
        trust_domain: args.trust_domain.clone(),
        dns_refresh: args.dns_refresh,
    }
}

fn audit_options(args: &AuditArgs) -> AuditOptions {
    AuditOptions {
        file: args.file.clone(),
        key: args.key.clone(),
        sync: args.sync.clone(),
        checkpoint_every: args.checkpoint_every,
        checkpoint_secs: args.checkpoint_secs,
        rotate: args.rotate,
    }
}

impl Governor for Governed {
    fn attach(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        program: &Path,
        egress: Option<&mut PendingEgress>,
    ) -> Result<()> {
        self.0.attach(cgroup, profile, program, egress)
    }

    fn exec_listener(&self) -> Option<RawFd> {
        self.0.exec_listener()
    }

    fn jail_additions(&self) -> JailAdditions {
        let additions = self.0.jail_additions();
        JailAdditions { ro: additions.ro, env: additions.env, resolv_conf: additions.resolv_conf }
    }

    fn entry_denied(&self) -> bool {
        self.0.entry_denied()
    }

    fn started(&mut self) {
        self.0.started();
    }

    fn ended(&mut self) {
        self.0.ended();
    }

    fn finish(self) -> Result<()> {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        exec: ExecArgs,
    }

    #[test]
    fn every_flag_the_runtime_reads_reaches_its_options() {
        let cli = Cli::try_parse_from([
            "exec",
            "--deny-connect",
            "10.0.0.1:*",
            "--events",
            "-",
            "-q",
            "--policy",
            "p.yaml",
            "--agent",
            "a1",
            "--trust",
            "700",
            "--audit",
            "log.jsonl",
            "--",
            "/bin/true",
            "x",
        ])
        .unwrap();
        let opts = options(&cli.exec);
        assert_eq!(opts.deny_connect, vec![("10.0.0.1".parse().unwrap(), 0)]);
        assert_eq!(opts.events.as_deref(), Some(Path::new("-")));
        assert!(opts.quiet && opts.policy.given());
        assert_eq!((opts.policy.agent.as_deref(), opts.policy.trust), (Some("a1"), 700));
        assert_eq!(opts.audit.file.as_deref(), Some(Path::new("log.jsonl")));
        assert_eq!(opts.command, vec![std::ffi::OsString::from("/bin/true"), "x".into()]);
        assert_eq!(opts.audit.sync, cli.exec.audit.sync);
    }
}
