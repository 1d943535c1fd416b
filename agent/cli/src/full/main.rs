//! `agt-jail-full`: every command of agt-jail. `agt-jail` hands it each command line
//! that is not a jail without BPF programs (docs/adr/0004). Errors become one line on
//! stderr and an exit code; every library below returns typed errors.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod audit_cmd;
mod audit_recover;
mod control_cmd;
mod daemon_cmd;
mod doctor_cmd;
mod exec_cmd;
mod govern;
mod identity_cmd;
mod pinned_run;
mod policy_cmd;

pub use agt_jail_cli::EXIT_INTERNAL;

#[derive(Parser)]
#[command(
    name = "agt-jail",
    version,
    about = "Enforce AI-agent policy below the application: jails, eBPF, policy kernel",
    long_about = "agt-jail runs AI agents in a jail and enforces policy in the kernel, below the \
                  agent's own process, so a prompt-injected or compromised agent cannot skip the check."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The exit status of the commands that talk to a running agent.
const CONTROL_EXIT: &str = "Exit status: 0 done; 1 the agent refused (no such held request, a ring \
lower than its own); 125 bad flags or no running agent of that name (only `exec --policy` \
creates the control socket).";

const RELOAD_EXIT: &str = "Exit status: 0 every agent reached has the policy in its files in force; 1 an \
agent refused its policy (the located error is printed; its old policy stays in force); 125 bad flags or \
an agent that could not be reached.";

#[derive(Subcommand)]
enum Command {
    /// Run one command in a fresh agent cgroup with kernel-enforced rules (needs root).
    Exec(Box<agt_jail_cli::args::ExecArgs>),
    /// Report what this kernel offers and what each ring enforces on this host.
    Doctor(doctor_cmd::DoctorArgs),
    /// Lint, evaluate and test policies (AGT governance.toolkit/v1, Agent-OS v4, Rego).
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Let a held action of a running agent proceed (a `require_approval` rule held it).
    #[command(after_help = CONTROL_EXIT)]
    Approve(control_cmd::RequestArgs),
    /// Refuse a held action of a running agent (it fails with EPERM).
    #[command(after_help = CONTROL_EXIT)]
    Deny(control_cmd::RequestArgs),
    /// Kill switch: end every process of a running agent at once.
    #[command(after_help = CONTROL_EXIT)]
    Kill(control_cmd::AgentArg),
    /// Move a running agent to a more restricted ring, live (never the other way).
    #[command(after_help = CONTROL_EXIT)]
    Demote(control_cmd::DemoteArgs),
    /// Show a running agent's DID, cgroup, ring, trust, tier and held requests.
    #[command(after_help = CONTROL_EXIT)]
    Status(control_cmd::AgentArg),
    /// Re-read the policy files of a running agent (every agent without --agent) and put
    /// them in force atomically; a policy with an error is refused and the old one stays.
    #[command(after_help = RELOAD_EXIT)]
    Reload(control_cmd::ReloadArgs),
    /// List the running agents: ring, trust, tier, DID, cgroup id and held requests.
    Ps(control_cmd::PsArgs),
    /// An agent's identity: its public key (`key`), a token for it (`token`, from inside).
    #[command(subcommand)]
    Identity(identity_cmd::IdentityCommand),
    /// Verify a tamper-evident audit log (`exec --audit`), prove records and checkpoints.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// The host daemon (foreground; systemd Type=notify): launches and governs agents for
    /// `exec` and serves the control API on /run/agt-jail/agt.sock (docs/control-api.md).
    Daemon(daemon_cmd::DaemonArgs),
    /// The --events records of the agents the daemon runs (`-f` follows new ones).
    Events(daemon_cmd::EventsArgs),
}

/// Names the first argument that is not UTF-8 (clap only says there is one): its
/// position and the flag before it. Flags take UTF-8; the command after `--` may be any bytes.
fn not_utf8(argv: &[std::ffi::OsString]) -> String {
    let Some(index) = argv.iter().position(|arg| arg.to_str().is_none()) else {
        return "invalid UTF-8 was detected in one or more arguments".into();
    };
    let shown = argv[index].to_string_lossy();
    let after = match index.checked_sub(1).and_then(|i| argv.get(i)).and_then(|a| a.to_str()) {
        Some(flag) if flag.starts_with('-') => format!(" (the value of {flag})"),
        _ => String::new(),
    };
    format!("argument {index} '{shown}'{after} is not UTF-8 text; flags and names take UTF-8")
}

/// Gives SIGPIPE back its default action (Rust ignores it, so a print to a closed pipe
/// panics): `agt-jail policy explain | head -1` then ends as `cat` does, killed by SIGPIPE
/// (status 141 in a shell) without a word. Not for `exec`: a supervising agt-jail must
/// outlive its own closed stdout or stderr to keep enforcing and remove the agent's cgroup;
/// it ignores SIGPIPE and never panics on a failed write (`stderr_line!`, records that
/// report their write error), and the command it runs starts with the default action.
fn sigpipe_ends_the_process(command: Option<&std::ffi::OsStr>) {
    // The daemon ignores SIGPIPE itself: a client that hangs up must not end it.
    if command.is_some_and(|word| word == "exec" || word == "daemon") {
        return;
    }
    // SAFETY: SIG_DFL for a valid signal, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> ExitCode {
    sigpipe_ends_the_process(std::env::args_os().nth(1).as_deref());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not failures and print in full.
            if !err.use_stderr() {
                let _ = err.print();
                return ExitCode::SUCCESS;
            }
            // Usage errors: one line, the one that says what is wrong.
            // clap's first paragraph says what is wrong (it may wrap onto indented lines).
            let rendered = err.render().to_string();
            let reason: Vec<&str> = rendered
                .lines()
                .skip_while(|line| line.trim().is_empty())
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            let mut reason = reason.join(" ");
            if err.kind() == clap::error::ErrorKind::InvalidUtf8 {
                reason = not_utf8(&std::env::args_os().collect::<Vec<_>>());
            }
            let reason = reason.trim_start_matches("error: ");
            // clap names the missing flag, not the one that needs it.
            let why = if err.kind() == clap::error::ErrorKind::MissingRequiredArgument && reason.contains("--policy") {
                "; --agent, --trust, --deny-penalty, --kill-below, --approval-timeout, --strict and --dns-refresh \
                 govern an agent under a policy and need --policy"
            } else {
                ""
            };
            eprintln!("agt-jail: {reason}{why} (see --help)");
            // `audit` documents its own exit statuses (2: usage).
            if std::env::args_os().nth(1).is_some_and(|word| word == "audit") {
                return ExitCode::from(audit_cmd::USAGE);
            }
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    match cli.command {
        Command::Exec(args) => daemon_cmd::exec(&args).unwrap_or_else(|| exec_cmd::run(*args)),
        Command::Doctor(args) => doctor_cmd::run(args),
        Command::Policy(cmd) => policy_cmd::run(cmd),
        Command::Approve(args) => control_cmd::approve(args),
        Command::Deny(args) => control_cmd::deny(args),
        Command::Kill(args) => control_cmd::kill(args),
        Command::Demote(args) => control_cmd::demote(args),
        Command::Status(args) => control_cmd::status(args),
        Command::Reload(args) => control_cmd::reload(args),
        Command::Ps(args) => control_cmd::ps(args),
        Command::Identity(cmd) => identity_cmd::run(cmd),
        Command::Audit(cmd) => audit_cmd::run(cmd),
        Command::Daemon(args) => daemon_cmd::daemon(args),
        Command::Events(args) => daemon_cmd::events(args),
    }
}
