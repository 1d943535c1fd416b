//! `agt-jail exec`: run one command as an agent, governed in the kernel.
//!
//! Order matters and is the point of this module: the cgroup exists and the BPF
//! programs are attached to it and know it *before* the command's first
//! instruction, so nothing it does escapes them. Cleanup runs on every path.
use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::{IpAddr, SocketAddr},
    os::unix::{
        fs::PermissionsExt,
        process::{CommandExt, ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use agt_jail_ebpf_loader::{AgentPrograms, ConnectRule, Event, EventReader};
use agt_jail_jail::{cgroup, spawn_in_cgroup, AgentCgroup, CgroupLayout, SpawnError};
use anyhow::{bail, Context, Result};
use clap::Args;
use signal_hook::{
    iterator::{exfiltrator::WithOrigin, SignalsInfo},
    low_level::siginfo::Cause,
};

use crate::EXIT_INTERNAL;

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  agt-jail exec --deny-connect 169.254.169.254:80 -- python3 agent.py
  agt-jail exec --deny-connect '[::1]:8080' --events events.jsonl -- curl http://localhost:8080/

Exit status: the command's own; 128+N when it was killed by signal N; 125 when \
agt-jail itself fails; 126/127 when the command cannot be run or is not found.")]
pub struct ExecArgs {
    /// Deny connect(2) to this destination with EPERM inside the command. ADDR is an
    /// IPv4 address or a bracketed IPv6 address; PORT is a number or `*` for every port.
    /// Repeatable.
    #[arg(long = "deny-connect", value_name = "ADDR:PORT", value_parser = parse_connect_rule)]
    deny_connect: Vec<ConnectRule>,

    /// Append every kernel event of the command (exec, connect, with verdicts) to FILE as
    /// JSON lines; `-` writes them to stdout.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,

    /// Do not print denials on stderr.
    #[arg(long, short)]
    quiet: bool,

    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Parses `ADDR:PORT`, `[V6]:PORT`, with `*` as "any port".
pub fn parse_connect_rule(text: &str) -> std::result::Result<ConnectRule, String> {
    let expected = "expected ADDR:PORT, e.g. 127.0.0.1:8080, [::1]:443 or 10.0.0.1:*";
    if let Some(any) = text.strip_suffix(":*") {
        let host = any.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(any);
        let addr: IpAddr = host.parse().map_err(|_| format!("'{host}' is not an IP address; {expected}"))?;
        return Ok(ConnectRule::new(addr, 0));
    }
    let addr: SocketAddr = text.parse().map_err(|_| expected.to_string())?;
    if addr.port() == 0 {
        return Err(format!("port 0 is not a destination; use '*' for every port ({expected})"));
    }
    Ok(ConnectRule::from(addr))
}

pub fn run(args: ExecArgs) -> ExitCode {
    match execute(&args) {
        Ok(status) => ExitCode::from(status),
        Err(Failure::Spawn(err)) => {
            eprintln!("agt-jail: {err}");
            ExitCode::from(err.shell_status().unwrap_or(EXIT_INTERNAL))
        }
        Err(Failure::Internal(err)) => {
            eprintln!("agt-jail: {err:#}");
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

enum Failure {
    Spawn(SpawnError),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Internal(err)
    }
}

/// Finds the program the way execvp(3) would, so "not found" and "not executable"
/// are reported before anything is set up.
fn resolve_program(program: &str) -> std::result::Result<PathBuf, SpawnError> {
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path).map(|dir| dir.join(program)).collect()
    };
    let mut found_unexecutable = false;
    for candidate in candidates {
        let Ok(meta) = candidate.metadata() else { continue };
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            return Ok(candidate);
        }
        found_unexecutable = true;
    }
    let program = program.to_string();
    Err(if found_unexecutable { SpawnError::NotExecutable { program } } else { SpawnError::NotFound { program } })
}

fn execute(args: &ExecArgs) -> std::result::Result<u8, Failure> {
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(anyhow::anyhow!("no command given; usage: agt-jail exec [OPTIONS] -- CMD [ARGS]...").into());
    };
    let program_path = resolve_program(program).map_err(Failure::Spawn)?;
    // SAFETY: geteuid cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            anyhow::anyhow!("exec needs root: it creates cgroups and loads BPF programs (run it with sudo)").into()
        );
    }

    let layout = CgroupLayout::detect(Path::new("/proc/self/mountinfo")).context("cannot find cgroup v2")?;
    let parent = layout.agents_parent();
    cgroup::sweep_stale(&parent, Path::new("/proc"));
    let cgroup = AgentCgroup::create(&parent, &cgroup::cgroup_name(std::process::id(), 0))
        .context("cannot create the agent's cgroup")?;
    let agent_id = cgroup.id();

    let mut programs = AgentPrograms::load().context("cannot load agt-jail's BPF programs")?;
    programs.register_agent(cgroup.id(), agent_id).context("cannot register the agent")?;
    for rule in &args.deny_connect {
        programs.deny_connect(agent_id, *rule).context("cannot install a connect rule")?;
    }
    programs.attach_cgroup(cgroup.dir()).context("cannot govern the agent's cgroup")?;

    let sink = EventSink::open(args.events.as_deref(), !args.quiet)?;
    let reader = programs.take_events().context("event reader already taken")?;
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("events".into())
            .spawn(move || pump_events(reader, sink, &stop))
            .context("cannot start the event thread")?
    };

    let mut command = Command::new(&program_path);
    command.arg0(program).args(program_args);
    let child = match spawn_in_cgroup(command, &cgroup) {
        Ok(child) => child,
        Err(err) => {
            stop.store(true, Ordering::SeqCst);
            let _ = pump.join();
            return Err(Failure::Spawn(err));
        }
    };
    let child_pid = child.id();
    let forwarder = SignalForwarder::start(child_pid)?;
    let status = wait_child(child).context("cannot wait for the command")?;
    forwarder.stop();

    // The command is done; anything it left running goes with the cgroup, and the
    // events it caused are already in the ring buffer: drain them before leaving.
    let cleanup = cgroup.remove().context("cannot remove the agent's cgroup");
    stop.store(true, Ordering::SeqCst);
    let pumped = pump.join().map_err(|_| anyhow::anyhow!("event thread panicked"))?;
    let drops = programs.dropped_events().unwrap_or(0);
    pumped.context("cannot write events")?;
    if drops > 0 {
        eprintln!("agt-jail: warning: the kernel dropped {drops} event(s) because the ring buffer was full");
    }
    cleanup?;
    Ok(exit_code(status))
}

fn wait_child(mut child: std::process::Child) -> io::Result<ExitStatus> {
    loop {
        match child.wait() {
            Ok(status) => return Ok(status),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
}

/// The command's status as a shell reports it: its exit code, or 128+N for signal N.
fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(EXIT_INTERNAL);
    }
    match status.signal() {
        Some(signal) => u8::try_from(128 + signal).unwrap_or(EXIT_INTERNAL),
        None => EXIT_INTERNAL,
    }
}

/// Where events go: a JSON-lines file (or stdout) and, for denials, a line on stderr.
struct EventSink {
    out: Option<Box<dyn Write + Send>>,
    show_denials: bool,
}

impl EventSink {
    fn open(path: Option<&Path>, show_denials: bool) -> Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match path {
            None => None,
            Some(path) if path == Path::new("-") => Some(Box::new(BufWriter::new(io::stdout()))),
            Some(path) => {
                let file: File = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open events file {}", path.display()))?;
                Some(Box::new(BufWriter::new(file)))
            }
        };
        Ok(Self { out, show_denials })
    }

    fn record(&mut self, event: &Event) -> io::Result<()> {
        if self.show_denials && event.is_deny() {
            eprintln!("agt-jail: {}", describe_denial(event));
        }
        if let Some(out) = self.out.as_mut() {
            serde_json::to_writer(&mut *out, event)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

fn describe_denial(event: &Event) -> String {
    match event {
        Event::Connect { addr, port, protocol, tgid, .. } => {
            let dest = SocketAddr::new(*addr, *port);
            format!("denied {protocol} connect to {dest} (pid {tgid})")
        }
        Event::Exec { filename, tgid, .. } | Event::ExecCheck { filename, tgid, .. } => {
            format!("denied exec of {filename} (pid {tgid})")
        }
    }
}

/// Moves events from the ring buffer to the sink until told to stop, then drains
/// what is left, so nothing the command caused is lost.
fn pump_events(mut reader: EventReader, mut sink: EventSink, stop: &AtomicBool) -> Result<()> {
    let mut write_error: Option<io::Error> = None;
    let mut handle = |decoded: std::result::Result<Event, agt_jail_ebpf_loader::DecodeError>| match decoded {
        Ok(event) => {
            if let Err(err) = sink.record(&event) {
                write_error.get_or_insert(err);
            }
        }
        Err(err) => eprintln!("agt-jail: warning: undecodable event: {err}"),
    };
    while !stop.load(Ordering::SeqCst) {
        reader.poll(Duration::from_millis(50), &mut handle).context("cannot poll the event ring buffer")?;
    }
    reader.drain(&mut handle);
    if let Some(err) = write_error {
        bail!(err);
    }
    sink.flush().context("cannot flush events")
}

/// Forwards termination signals sent to agt-jail to the command. Signals the terminal
/// sends (Ctrl-C) already reach the command's process group, so those are not sent twice.
struct SignalForwarder {
    handle: signal_hook::iterator::Handle,
    thread: thread::JoinHandle<()>,
}

const FORWARDED: [libc::c_int; 5] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1];

impl SignalForwarder {
    fn start(child: u32) -> Result<Self> {
        let mut signals = SignalsInfo::<WithOrigin>::new(FORWARDED).context("cannot install signal handlers")?;
        let handle = signals.handle();
        let pid = libc::pid_t::try_from(child).context("child pid out of range")?;
        let thread = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for origin in signals.forever() {
                    if matches!(origin.cause, Cause::Kernel) {
                        continue;
                    }
                    // SAFETY: kill(2) with plain integers; a vanished child gives ESRCH.
                    unsafe { libc::kill(pid, origin.signal) };
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Self { handle, thread })
    }

    fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_connect_rules() {
        assert_eq!(parse_connect_rule("127.0.0.1:8080").unwrap(), ConnectRule::new("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!(parse_connect_rule("[::1]:443").unwrap(), ConnectRule::new("::1".parse().unwrap(), 443));
        assert_eq!(parse_connect_rule("10.0.0.1:*").unwrap(), ConnectRule::new("10.0.0.1".parse().unwrap(), 0));
        assert_eq!(parse_connect_rule("[fe80::1]:*").unwrap(), ConnectRule::new("fe80::1".parse().unwrap(), 0));
    }

    #[test]
    fn rejects_bad_connect_rules_with_a_reason() {
        for bad in ["", "127.0.0.1", "localhost:80", "127.0.0.1:99999", "127.0.0.1:0", "::1:80", "x:*", "1.2.3.4:-1"] {
            let err = parse_connect_rule(bad).unwrap_err();
            assert!(err.contains("expected ADDR:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
    }

    #[test]
    fn resolves_programs_like_a_shell() {
        assert!(resolve_program("sh").is_ok());
        assert!(matches!(resolve_program("/nonexistent/agt-jail-nope"), Err(SpawnError::NotFound { .. })));
        assert!(matches!(resolve_program("agt-jail-no-such-command-xyz"), Err(SpawnError::NotFound { .. })));
        let plain = std::env::temp_dir().join(format!("agt-jail-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let result = resolve_program(plain.to_str().unwrap());
        let _ = std::fs::remove_file(&plain);
        assert!(matches!(result, Err(SpawnError::NotExecutable { .. })));
    }
}
