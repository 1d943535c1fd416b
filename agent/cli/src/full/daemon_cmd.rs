//! `agt-jail daemon`, `agt-jail events`, and the choice of `exec`, `ps` and the control
//! commands between the daemon (when its socket answers) and running standalone.
use std::{ffi::OsString, io::Write, path::PathBuf, process::ExitCode};

use agt_jail_cli::args::ExecArgs;
use agt_jail_daemon::{
    client,
    proto::{request::Op, response::Body, AgentInfo, Response},
    server::{self, Describe},
};
use clap::{Args, Parser};

use crate::EXIT_INTERNAL;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Runtime directory: the socket (agt.sock) and the agents' records (agents/).
    #[arg(long, value_name = "DIR", default_value = agt_jail_daemon::RUN_DIR)]
    run_dir: PathBuf,

    /// Directory of the supervisors' control sockets.
    #[arg(long, value_name = "DIR", default_value = agt_jail_supervisor::control::RUNTIME_DIR, hide = true)]
    control_dir: PathBuf,

    #[arg(long, value_name = "DIR", default_value = "/proc", hide = true)]
    proc_root: PathBuf,

    #[arg(long, value_name = "FILE", default_value = "/etc/group", hide = true)]
    group_file: PathBuf,

    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (loopback addresses only; port 0
    /// picks a free one, logged at start). Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// `exec`'s flags alone, to read a launch's options in the daemon.
#[derive(Parser)]
#[command(name = "exec")]
struct ExecOnly {
    #[command(flatten)]
    args: ExecArgs,
}

fn describe(args: &[OsString]) -> Result<Describe, String> {
    let parsed = ExecOnly::try_parse_from(std::iter::once(OsString::from("exec")).chain(args.iter().cloned()))
        .map_err(|e| format!("bad launch options: {}", e.to_string().lines().next().unwrap_or("").trim()))?
        .args;
    Ok(Describe {
        agent: parsed.policy.agent.clone(),
        ring: parsed.ring.map_or(0, u32::from),
        policy: parsed.policy.given(),
        events: parsed.events.clone(),
        command: parsed.command.clone(),
    })
}

/// The supervisor each launch starts: `agt-jail` beside this executable (it runs jails
/// without BPF programs itself and hands the rest to `agt-jail-full`), else this one.
fn supervisor() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let front = exe.with_file_name("agt-jail");
    Ok(if front.is_file() { front } else { exe })
}

pub fn daemon(args: DaemonArgs) -> ExitCode {
    // A client that hangs up must cost the daemon one failed write, not its life.
    // SAFETY: SIG_IGN for a valid signal, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if let Some(addr) = args.metrics_listen {
        // Refused before anything starts: the listener has no authentication.
        if let Err(err) = agt_jail_daemon::metrics::check_listen(addr) {
            eprintln!("agt-jail: {err}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    }
    let supervisor = match supervisor() {
        Ok(path) => path,
        Err(err) => {
            eprintln!("agt-jail: cannot find the agt-jail executable: {err}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let config = server::Config {
        run_dir: args.run_dir,
        control_dir: args.control_dir,
        proc_root: args.proc_root,
        group_file: args.group_file,
        supervisor,
        describe,
        metrics_listen: args.metrics_listen,
    };
    match server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agt-jail: daemon: {err}");
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

/// Runs `exec` through the daemon when its socket answers and `--standalone` is not
/// given; `None`: run standalone.
pub fn exec(args: &ExecArgs) -> Option<ExitCode> {
    if args.standalone {
        return None;
    }
    let path = agt_jail_daemon::socket_path();
    let stream = client::connect(&path).ok()?;
    if args.tty {
        // The supervisor is not in the terminal's session: it would miss window-size
        // changes and job control, so a terminal is relayed by a standalone exec.
        if !args.quiet {
            eprintln!("agt-jail: --tty runs standalone, not through the daemon (it does not relay terminals)");
        }
        return None;
    }
    let argv: Vec<OsString> = std::env::args_os().collect();
    let after = argv.iter().position(|a| a == "exec").map_or(argv.len(), |i| i + 1);
    Some(ExitCode::from(client::launch(&path, stream, &argv[after..])))
}

/// The daemon's answer to `op`, if a daemon answers; an error is printed and becomes the exit code.
pub fn through_daemon(op: Op) -> Option<Result<Response, ExitCode>> {
    let path = agt_jail_daemon::socket_path();
    if client::connect(&path).is_err() {
        return None;
    }
    Some(match client::call(&path, op) {
        Ok(Response { body: Some(Body::Error(e)) }) => {
            eprintln!("agt-jail: {}", e.message);
            Err(ExitCode::from(u8::try_from(e.exit_code).unwrap_or(EXIT_INTERNAL)))
        }
        Ok(reply) => Ok(reply),
        Err(err) => {
            eprintln!("agt-jail: {err}");
            Err(ExitCode::from(EXIT_INTERNAL))
        }
    })
}

/// `agt-jail ps` through the daemon: the agents it supervises.
pub fn ps() -> Option<ExitCode> {
    let reply = match through_daemon(Op::List(Default::default()))? {
        Ok(reply) => reply,
        Err(code) => return Some(code),
    };
    let Some(Body::Agents(list)) = reply.body else {
        eprintln!("agt-jail: unexpected answer from the daemon");
        return Some(ExitCode::from(EXIT_INTERNAL));
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<24} {:>4} {:>5} {:<16} {:<41} {:>8} {:>4} {:>8}  COMMAND",
        "AGENT", "RING", "TRUST", "TIER", "DID", "CGROUP", "HELD", "PID"
    );
    for agent in &list.agents {
        let _ = writeln!(out, "{}", ps_line(agent));
    }
    Some(ExitCode::SUCCESS)
}

fn ps_line(agent: &AgentInfo) -> String {
    let status: serde_json::Value = serde_json::from_str(&agent.status).unwrap_or_default();
    let field = |key: &str| match &status[key] {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let ring = if status["ring"].is_null() { agent.ring.to_string() } else { field("ring") };
    let held = status["pending"].as_array().map_or("-".to_string(), |p| p.len().to_string());
    format!(
        "{:<24} {:>4} {:>5} {:<16} {:<41} {:>8} {:>4} {:>8}  {}",
        agent.agent,
        ring,
        field("trust"),
        field("tier"),
        field("did"),
        field("cgroup_id"),
        held,
        agent.pid,
        agent.command.join(" ")
    )
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Follow: print every record written from now on until interrupted (or, with
    /// --agent, until the agent ends). Without it: the records written so far.
    #[arg(long, short)]
    follow: bool,

    /// Only this agent's records.
    #[arg(long, value_name = "NAME", value_parser = agt_jail_cli::args::parse_agent_name)]
    agent: Option<String>,
}

/// `agt-jail events [-f] [--agent A]`: the --events records of the daemon's agents, one
/// JSON object a line, each with the agent's name added as "agent_id" when absent.
pub fn events(args: EventsArgs) -> ExitCode {
    let path = agt_jail_daemon::socket_path();
    let op = Op::Events(agt_jail_daemon::proto::Events { agent: args.agent.unwrap_or_default(), follow: args.follow });
    let mut stream = match client::open(&path, op) {
        Ok(stream) => stream,
        Err(err) => {
            eprintln!(
                "agt-jail: {err} (`agt-jail events` reads the agents the daemon runs; a standalone exec writes its \
                 --events file directly)"
            );
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let mut out = std::io::stdout().lock();
    loop {
        match client::next(&mut stream) {
            Ok(Response { body: Some(Body::Event(event)) }) => {
                let line = match serde_json::from_str::<serde_json::Value>(&event.record) {
                    Ok(serde_json::Value::Object(mut map)) => {
                        map.entry("agent_id").or_insert(serde_json::Value::String(event.agent));
                        serde_json::Value::Object(map).to_string()
                    }
                    _ => event.record,
                };
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return ExitCode::SUCCESS;
                }
            }
            Ok(Response { body: Some(Body::Done(_)) }) => return ExitCode::SUCCESS,
            Ok(Response { body: Some(Body::Error(e)) }) => {
                eprintln!("agt-jail: {}", e.message);
                return ExitCode::from(u8::try_from(e.exit_code).unwrap_or(EXIT_INTERNAL));
            }
            Ok(_) => {
                eprintln!("agt-jail: unexpected answer from the daemon");
                return ExitCode::from(EXIT_INTERNAL);
            }
            Err(err) => {
                eprintln!("agt-jail: the daemon at {} closed the stream: {err}", path.display());
                return ExitCode::from(EXIT_INTERNAL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn launches_are_described_from_execs_own_flags() {
        let args: Vec<OsString> = [
            "--ring", "2", "--policy", "p.yaml", "--agent", "coder", "--events", "e.jsonl", "--", "python3", "-c", "1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let d = describe(&args).unwrap();
        assert_eq!(d.agent.as_deref(), Some("coder"));
        assert_eq!((d.ring, d.policy), (2, true));
        assert_eq!(d.events, Some(PathBuf::from("e.jsonl")));
        assert_eq!(d.command, vec![OsString::from("python3"), "-c".into(), "1".into()]);
        let err = describe(&[OsString::from("--ring"), "9".into(), "true".into()]).unwrap_err();
        assert!(err.starts_with("bad launch options:"), "{err}");
    }

    #[test]
    fn ps_lines_fill_what_an_agent_without_policy_lacks() {
        let agent = AgentInfo {
            agent: "agent-7".into(),
            pid: 7,
            ring: 3,
            command: vec!["sleep".into(), "9".into()],
            ..Default::default()
        };
        let line = ps_line(&agent);
        assert!(line.starts_with("agent-7") && line.ends_with("sleep 9"), "{line}");
        assert!(line.contains("   3     -"), "{line}");
    }
}
