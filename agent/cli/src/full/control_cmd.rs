//! `agt-jail approve|deny|kill|demote|status|reload`: talk to a running agent through its
//! control socket (see `agt_jail_supervisor::control`), or through the host daemon when
//! it answers (docs/control-api.md).
use std::{path::PathBuf, process::ExitCode};

use agt_jail_daemon::proto::{request::Op, response::Body, AgentRef, AgentReload, Decide, Demote, Reload, Response};
use agt_jail_supervisor::control;
use clap::Args;

use crate::{daemon_cmd, EXIT_INTERNAL};

#[derive(Args, Debug)]
pub struct AgentArg {
    /// The agent's name (`agt-jail exec --agent NAME`; agt-jail prints it at start).
    #[arg(long, value_name = "NAME", value_parser = agt_jail_cli::args::parse_agent_name)]
    pub agent: String,

    /// Directory of the agents' control sockets.
    #[arg(long, value_name = "DIR", default_value = control::RUNTIME_DIR, hide = true)]
    pub runtime_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct RequestArgs {
    #[command(flatten)]
    target: AgentArg,

    /// The held request's number (1 or more), as printed in the "approval needed (request N)" line.
    #[arg(value_name = "REQUEST", value_parser = parse_request)]
    request: u64,
}

#[derive(Args, Debug)]
pub struct DemoteArgs {
    #[command(flatten)]
    target: AgentArg,

    /// The ring to move the agent to: 1, 2 or 3, and higher than the agent's ring now
    /// (demotion only restricts; an agent is never moved to a lower-numbered ring, and
    /// ring 0 is never a demotion's target).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=3))]
    ring: u8,
}

/// Parses a held request's number: a whole number from 1.
fn parse_request(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("'{text}' is not a request number (1 or more, as in \"approval needed (request N)\")"))
}

/// Sends `line` to the agent and prints the outcome; exit 0 on success, 1 when the
/// agent refused, 125 when it could not be reached. When the host daemon answers, the
/// request goes through it (`op`): it knows agents run without --policy too.
fn send(target: &AgentArg, line: &str, done: &str, op: Op) -> ExitCode {
    if let Some(answer) = daemon_cmd::through_daemon(op) {
        return match answer {
            Ok(Response { body: Some(Body::Agent(info)) }) => {
                let status: serde_json::Value = serde_json::from_str(&info.status).unwrap_or_else(|_| {
                    serde_json::json!({"agent": info.agent, "pid": info.pid, "ring": info.ring,
                                       "policy": info.policy, "command": info.command, "adopted": info.adopted})
                });
                println!("{}", serde_json::to_string_pretty(&status).unwrap_or_else(|_| status.to_string()));
                ExitCode::SUCCESS
            }
            Ok(Response { body: Some(Body::Done(d)) }) => {
                println!("agt-jail: {}", d.message);
                ExitCode::SUCCESS
            }
            Ok(_) => {
                eprintln!("agt-jail: unexpected answer from the daemon");
                ExitCode::from(EXIT_INTERNAL)
            }
            Err(code) => code,
        };
    }
    match control::request(&target.runtime_dir, &target.agent, line) {
        Ok(answer) => {
            if line == "status" {
                println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_else(|_| answer.to_string()));
            } else {
                println!("agt-jail: {done}");
            }
            ExitCode::SUCCESS
        }
        Err(err @ control::ControlError::Refused { .. }) => {
            eprintln!("agt-jail: {err}");
            ExitCode::from(1)
        }
        Err(err) => {
            eprintln!("agt-jail: {err}");
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

pub fn approve(args: RequestArgs) -> ExitCode {
    let op = Op::Approve(Decide { agent: args.target.agent.clone(), request: args.request });
    send(&args.target, &format!("approve {}", args.request), &format!("approved request {}", args.request), op)
}

pub fn deny(args: RequestArgs) -> ExitCode {
    let op = Op::Deny(Decide { agent: args.target.agent.clone(), request: args.request });
    send(&args.target, &format!("deny {}", args.request), &format!("denied request {}", args.request), op)
}

pub fn kill(args: AgentArg) -> ExitCode {
    let done = format!("killed agent {}", args.agent);
    let op = Op::Kill(AgentRef { agent: args.agent.clone() });
    send(&args, "kill", &done, op)
}

pub fn demote(args: DemoteArgs) -> ExitCode {
    let done = format!("agent {} is now in ring {}", args.target.agent, args.ring);
    let op = Op::Demote(Demote { agent: args.target.agent.clone(), ring: u32::from(args.ring) });
    send(&args.target, &format!("demote {}", args.ring), &done, op)
}

pub fn status(args: AgentArg) -> ExitCode {
    let op = Op::Inspect(AgentRef { agent: args.agent.clone() });
    send(&args, "status", "", op)
}

#[derive(Args, Debug)]
pub struct ReloadArgs {
    /// The agent whose policy is reloaded (`agt-jail exec --agent NAME`); every running
    /// agent under --policy when not given.
    #[arg(long, value_name = "NAME", value_parser = agt_jail_cli::args::parse_agent_name)]
    agent: Option<String>,

    /// Directory of the agents' control sockets.
    #[arg(long, value_name = "DIR", default_value = control::RUNTIME_DIR, hide = true)]
    runtime_dir: PathBuf,
}

/// One line per agent reached; exit 0 when every policy is in force, 1 when an agent
/// refused its policy (the error line is printed, its old policy stays in force), 125 when
/// an agent could not be reached.
pub fn reload(args: ReloadArgs) -> ExitCode {
    let op = Op::Reload(Reload { agent: args.agent.clone().unwrap_or_default() });
    let results: Vec<(AgentReload, u8)> = match daemon_cmd::through_daemon(op) {
        Some(Ok(Response { body: Some(Body::Reloaded(r)) })) => r
            .agents
            .into_iter()
            .map(|a| {
                let code = if a.error.is_empty() { 0 } else { 1 };
                (a, code)
            })
            .collect(),
        Some(Ok(_)) => {
            eprintln!("agt-jail: unexpected answer from the daemon");
            return ExitCode::from(EXIT_INTERNAL);
        }
        Some(Err(code)) => return code,
        None => {
            let names = match &args.agent {
                Some(name) => vec![name.clone()],
                None => match socket_names(&args.runtime_dir) {
                    Ok(names) => names,
                    Err(code) => return code,
                },
            };
            names.into_iter().map(|name| reload_one(&args.runtime_dir, name)).collect()
        }
    };
    if results.is_empty() {
        println!("agt-jail: no running agent under --policy");
    }
    let mut code = 0;
    for (a, c) in results {
        if a.error.is_empty() && a.old_policy == a.policy {
            println!("agt-jail: agent {}: policy {} unchanged", a.agent, a.policy);
        } else if a.error.is_empty() {
            println!("agt-jail: agent {}: policy {} in force (was {})", a.agent, a.policy, a.old_policy);
        } else {
            // The agent's errors name it already ("agent A: …", "no running agent A: …").
            if a.error.contains(&a.agent) {
                eprintln!("agt-jail: {}", a.error);
            } else {
                eprintln!("agt-jail: agent {}: {}", a.agent, a.error);
            }
        }
        code = code.max(c);
    }
    ExitCode::from(code)
}

/// `reload` on one agent's own control socket: its entry and the exit code it stands for.
fn reload_one(dir: &std::path::Path, name: String) -> (AgentReload, u8) {
    match control::request(dir, &name, "reload") {
        Ok(answer) => {
            let field = |k: &str| answer[k].as_str().unwrap_or_default().to_string();
            (
                AgentReload {
                    old_policy: field("old_policy"),
                    policy: field("policy"),
                    agent: name,
                    error: String::new(),
                },
                0,
            )
        }
        Err(err @ control::ControlError::Refused { .. }) => {
            (AgentReload { agent: name, error: err.to_string(), ..Default::default() }, 1)
        }
        Err(err) => (AgentReload { agent: name, error: err.to_string(), ..Default::default() }, EXIT_INTERNAL),
    }
}

/// The agents with a control socket in `dir` (none when it does not exist).
fn socket_names(dir: &std::path::Path) -> Result<Vec<String>, ExitCode> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => {
            entries.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".sock").map(str::to_string)).collect()
        }
        // No directory: no agent has run since boot.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => {
            eprintln!("agt-jail: cannot list {}: {err}", dir.display());
            return Err(ExitCode::from(EXIT_INTERNAL));
        }
    };
    names.sort();
    Ok(names)
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Directory of the agents' control sockets.
    #[arg(long, value_name = "DIR", default_value = control::RUNTIME_DIR, hide = true)]
    runtime_dir: PathBuf,
}

/// One line per running agent: name, ring, trust, tier, DID, cgroup id, held requests
/// (with the supervisor's pid and the command when the host daemon answers: its agents).
pub fn ps(args: PsArgs) -> ExitCode {
    if let Some(code) = daemon_cmd::ps() {
        return code;
    }
    let names = match socket_names(&args.runtime_dir) {
        Ok(names) => names,
        Err(code) => return code,
    };
    println!("{:<24} {:>4} {:>5} {:<16} {:<41} {:>8} {:>4}", "AGENT", "RING", "TRUST", "TIER", "DID", "CGROUP", "HELD");
    for name in names {
        match control::request(&args.runtime_dir, &name, "status") {
            Ok(s) => println!(
                "{:<24} {:>4} {:>5} {:<16} {:<41} {:>8} {:>4}",
                name,
                s["ring"].to_string(),
                s["trust"].to_string(),
                s["tier"].as_str().unwrap_or("?"),
                s["did"].as_str().unwrap_or("?"),
                s["cgroup_id"].to_string(),
                s["pending"].as_array().map_or(0, Vec::len)
            ),
            // A socket left by a killed agt-jail answers nobody.
            Err(_) => println!("{name:<24} (not answering)"),
        }
    }
    ExitCode::SUCCESS
}
