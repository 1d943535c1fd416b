//! `agt-jail exec`: run one command as an agent, governed in the kernel.
//!
//! Order matters and is the point of this module: the cgroup exists and the BPF
//! programs are attached to it and know it *before* the command's first
//! instruction, so nothing it does escapes them. Cleanup runs on every path.
use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::{
            fs::PermissionsExt,
            process::{CommandExt, ExitStatusExt},
        },
    },
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use agt_jail_ebpf_loader::{AgentPrograms, AllowRule, ConnectRule, Event, EventReader};
use agt_jail_jail::{
    cgroup, host, launch, mounts,
    profile::{self, Dest},
    pty::{copy_window_size, Pty, RawMode},
    spawn_in_cgroup_notified, AgentCgroup, CgroupLayout, CgroupLimits, JailConfig, JailProcess, LaunchError, NetMode,
    Profile, SpawnError, WorkspaceMode,
};
use agt_jail_policy::plan::Plan;
use agt_jail_supervisor::{evaluator::Evaluator, exec_notify::ExecNotifier};
use anyhow::{bail, Context, Result};
use clap::Args;
use signal_hook::{
    iterator::{exfiltrator::WithOrigin, Signals, SignalsInfo},
    low_level::siginfo::Cause,
};

use crate::{govern, EXIT_INTERNAL};

#[derive(Args, Debug)]
#[command(after_help = "\
Rings (profiles/ring0..3.yaml, built in; --profile FILE loads another):
  0  record mode (the default without --ring): own cgroup, observed, killable; not confined
  1  privileged: system ro, workspace rw, broad TCP egress (ports 80/443/22/9418)
  2  standard: system ro, workspace rw, secrets hidden, TCP egress only to --allow-connect
  3  sandbox: no network, scratch /workspace, only the entry command may be executed
Rings 1-3 run in new pid, mount, ipc, uts and cgroup namespaces (plus net with --net none),
without capabilities, under Landlock and seccomp; the environment is scrubbed to PATH, HOME,
TERM, LANG and what --env adds.

Examples:
  agt-jail exec --deny-connect 169.254.169.254:80 -- python3 agent.py
  agt-jail exec --ring 2 --workspace ./proj --allow-connect 140.82.112.3:443 -- git pull
  agt-jail exec --ring 3 --memory 256M --pids 32 -- /usr/bin/python3 -c 'print(1)'
  agt-jail exec --ring 2 --agent coder --policy policies/coding-agent/policy.yaml \\
      --events decisions.jsonl -- python3 agent.py
      (held actions: agt-jail approve|deny --agent coder N; agt-jail demote|kill --agent coder)

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

    /// Ring 0-3 (built-in profile). Without --ring and --profile: ring 0 (record mode).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=3))]
    ring: Option<u8>,

    /// Profile file to use instead of the built-in one (its `ring` must match --ring if both are given).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,

    /// Workspace directory, mounted at the same path (rw in rings 1-2, ro beside the scratch /workspace in ring 3). Default: the current directory (rings 1-2).
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,

    /// Extra path visible and writable inside. Repeatable.
    #[arg(long = "rw", value_name = "PATH")]
    rw: Vec<PathBuf>,

    /// Extra path visible read-only inside. Repeatable.
    #[arg(long = "ro", value_name = "PATH")]
    ro: Vec<PathBuf>,

    /// Allow exec of this file (or everything under this directory). Repeatable.
    #[arg(long = "allow-exec", value_name = "PATH")]
    allow_exec: Vec<PathBuf>,

    /// Allow TCP connect to ADDR:PORT or CIDR:PORT (allowlist mode: address and port, in the kernel). Repeatable.
    #[arg(long = "allow-connect", value_name = "DEST", value_parser = Dest::parse)]
    allow_connect: Vec<Dest>,

    /// Network: none (own namespace, loopback only), allowlist (TCP egress to --allow-connect only) or host.
    #[arg(long, value_name = "MODE", value_parser = ["none", "allowlist", "host"])]
    net: Option<String>,

    /// Memory limit (e.g. 512M, 2G, max).
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,

    /// Process/thread limit.
    #[arg(long, value_name = "N")]
    pids: Option<String>,

    /// CPU limit in cores (e.g. 0.5, 2).
    #[arg(long, value_name = "CORES")]
    cpu: Option<String>,

    /// Set KEY=VAL in the command's environment. Repeatable.
    #[arg(long = "env", value_name = "KEY=VAL", value_parser = parse_env)]
    env: Vec<(String, String)>,

    /// Run the command on a new pseudo-terminal (rings 1-3).
    #[arg(long)]
    tty: bool,

    /// Seconds between forwarding SIGTERM/SIGINT/SIGHUP and killing everything with SIGKILL.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    grace: u64,

    #[command(flatten)]
    policy: govern::PolicyArgs,

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

/// Parses `KEY=VAL` for --env.
fn parse_env(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && !key.contains('\0') && !value.contains('\0') => {
            Ok((key.to_string(), value.to_string()))
        }
        _ => Err(format!("'{text}' is not KEY=VAL")),
    }
}

pub fn run(args: ExecArgs) -> ExitCode {
    match execute(&args) {
        Ok(status) => ExitCode::from(status),
        Err(Failure::Spawn(err)) => {
            eprintln!("agt-jail: {err}");
            ExitCode::from(err.shell_status().unwrap_or(EXIT_INTERNAL))
        }
        Err(Failure::Launch(err)) => {
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
    Launch(LaunchError),
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

/// The profile for this run: built-in ring or --profile, then the flags on top.
fn resolve_profile(args: &ExecArgs) -> Result<Profile> {
    let mut profile = match &args.profile {
        Some(path) => {
            let profile = Profile::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(ring) = args.ring.filter(|r| *r != profile.ring) {
                bail!("--ring {ring} does not match ring {} of profile {}", profile.ring, path.display());
            }
            profile
        }
        None => Profile::builtin(args.ring.unwrap_or(0)).map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    if !profile.confine {
        let jail_only = [
            ("--workspace", args.workspace.is_some()),
            ("--rw", !args.rw.is_empty()),
            ("--ro", !args.ro.is_empty()),
            ("--allow-exec", !args.allow_exec.is_empty()),
            ("--allow-connect", !args.allow_connect.is_empty()),
            ("--net", args.net.as_deref().is_some_and(|n| n != "host")),
            ("--tty", args.tty),
        ];
        if let Some((flag, _)) = jail_only.iter().find(|(_, given)| *given) {
            bail!("{flag} needs a confined ring (--ring 1, 2 or 3); ring 0 is record mode");
        }
    }
    if let Some(mode) = &args.net {
        profile.net = NetMode::parse(mode).context("bad --net")?;
    }
    profile.allow_connect.extend(args.allow_connect.iter().cloned());
    if !args.allow_connect.is_empty() && profile.net != NetMode::Allowlist {
        bail!("--allow-connect needs network mode allowlist; add --net allowlist");
    }
    for (paths, list) in [(&args.rw, &mut profile.rw), (&args.ro, &mut profile.ro)] {
        for path in paths {
            let real = path.canonicalize().with_context(|| format!("cannot use {}", path.display()))?;
            list.push(real.display().to_string());
        }
    }
    if let Some(memory) = &args.memory {
        profile.limits.memory = profile::parse_size(memory).map_err(|m| anyhow::anyhow!("--memory: {m}"))?;
    }
    if let Some(pids) = &args.pids {
        profile.limits.pids = profile::parse_pids(pids).map_err(|m| anyhow::anyhow!("--pids: {m}"))?;
    }
    if let Some(cpu) = &args.cpu {
        profile.limits.cpu_millis = profile::parse_cpu(cpu).map_err(|m| anyhow::anyhow!("--cpu: {m}"))?;
    }
    Ok(profile)
}

/// The scrubbed environment of a jailed command.
fn jail_env(args: &ExecArgs, home: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ("HOME".to_string(), home.to_string()),
    ];
    for key in ["TERM", "LANG"] {
        if let Ok(value) = std::env::var(key) {
            env.push((key.to_string(), value));
        }
    }
    if args.tty && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm".into()));
    }
    for (key, value) in &args.env {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

/// Destinations an allowlist-mode agent never reaches unless explicitly listed: host
/// loopback (services of the host) and the cloud metadata service.
fn allowlist_denies(profile: &Profile) -> Vec<ConnectRule> {
    let listed = |addr: IpAddr| {
        let host_prefix = if addr.is_ipv4() { 32 } else { 128 };
        profile.allow_connect.iter().any(|d| d.addr == addr && d.prefix == host_prefix)
    };
    ["127.0.0.1", "::1", "169.254.169.254", "fd00:ec2::254", "0.0.0.0", "::"]
        .iter()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|a| !listed(*a))
        .map(|a| ConnectRule::new(a, 0))
        .collect()
}

/// A started command: a plain child (ring 0) or a jail's init.
enum Running {
    Plain(std::process::Child),
    Jail(JailProcess),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Plain(child) => child.id(),
            Running::Jail(jail) => jail.pid.unsigned_abs(),
        }
    }

    fn wait(self) -> io::Result<ExitStatus> {
        match self {
            Running::Plain(child) => wait_child(child),
            Running::Jail(jail) => jail.wait().map(ExitStatus::from_raw),
        }
    }
}

fn execute(args: &ExecArgs) -> std::result::Result<u8, Failure> {
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(anyhow::anyhow!("no command given; usage: agt-jail exec [OPTIONS] -- CMD [ARGS]...").into());
    };
    let program_path = resolve_program(program).map_err(Failure::Spawn)?;
    let profile = resolve_profile(args)?;
    let root = host::euid() == 0;
    if !root && !profile.confine {
        return Err(
            anyhow::anyhow!("exec needs root: it creates cgroups and loads BPF programs (run it with sudo)").into()
        );
    }
    if !root && profile.net != NetMode::None {
        return Err(anyhow::anyhow!(
            "without root only --net none is possible (allowlist and host egress rules need BPF programs, which need root)"
        )
        .into());
    }
    if !root && (args.events.is_some() || !args.deny_connect.is_empty()) {
        return Err(anyhow::anyhow!("--events and --deny-connect need root (they use BPF programs)").into());
    }
    if !root && args.policy.given() {
        return Err(anyhow::anyhow!(
            "--policy needs root (its planes are BPF programs, seccomp user-notification and fanotify)"
        )
        .into());
    }
    // An agent never inherits the operator's real-time policy or negative nice value:
    // it could starve the host, and a real-time task cannot join a v1 cpu cgroup.
    host::reset_scheduling_on_fork().context("cannot reset the scheduling priority the agent would inherit")?;
    // The policy loads (and fails with its located error) before anything is created.
    let policy = if args.policy.given() { Some(govern::load(&args.policy, profile.ring)?) } else { None };
    let workspace = match (&args.workspace, profile.workspace) {
        (Some(dir), _) => Some(dir.canonicalize().with_context(|| format!("cannot use workspace {}", dir.display()))?),
        (None, WorkspaceMode::Scratch) => None,
        (None, _) if profile.confine => Some(std::env::current_dir().context("cannot read the current directory")?),
        (None, _) => None,
    };
    if let Some(ws) = &workspace {
        if !ws.is_dir() {
            return Err(anyhow::anyhow!("workspace {} is not a directory", ws.display()).into());
        }
        launch::check_workspace(&profile, ws).map_err(Failure::Launch)?;
    }
    // What this kernel can enforce for the ring: refused before anything is created
    // (after the flags are known to be right, so a flag error reads the same everywhere).
    let enforcement =
        if profile.confine { Some(launch::check_enforcement(&profile).map_err(Failure::Launch)?) } else { None };
    for gap in enforcement.iter().flat_map(|e| &e.unenforced) {
        eprintln!("agt-jail: warning: {gap}");
    }

    // Root: the agent's cgroup (with limits) and its BPF programs, before it exists.
    let mut governed = None;
    let mut plan = None;
    let mut tier_a = None;
    let mut cgroup_v1 = Vec::new();
    let mut stale_sweep = None;
    if root {
        let layout = CgroupLayout::detect(Path::new("/proc/self/mountinfo")).context("cannot find cgroup v2")?;
        let limited =
            profile.limits.memory.is_some() || profile.limits.pids.is_some() || profile.limits.cpu_millis.is_some();
        if layout.hybrid && limited && profile.confine {
            cgroup::warm_migration_lock(&layout);
        }
        let parent = layout.agents_parent();
        let mut cgroup = AgentCgroup::create(&parent, &cgroup::cgroup_name(std::process::id(), 0))
            .context("cannot create the agent's cgroup")?;
        let limits = CgroupLimits {
            memory: profile.limits.memory,
            pids: profile.limits.pids,
            cpu_millis: profile.limits.cpu_millis,
        };
        // A jail creates and joins its v1 cgroups (hybrid hosts) while it builds its
        // root; ring 0 joins them at spawn, so they must exist now.
        if profile.confine {
            cgroup_v1 = cgroup.apply_limits_deferred(&layout, &limits).context("cannot set the agent's limits")?;
        } else {
            cgroup.apply_limits(&layout, &limits).context("cannot set the agent's limits")?;
        }
        let mut rules = args.deny_connect.clone();
        if profile.confine && profile.net == NetMode::Allowlist {
            rules.extend(allowlist_denies(&profile));
        }
        // Loading the BPF object costs ~90 ms per run. Ring 0 exists to be observed,
        // and connect rules and --events need the programs; a confined ring without
        // them is enforced by namespaces, Landlock and seccomp alone (docs/adr/0003).
        let allowlist = profile.confine && profile.net == NetMode::Allowlist;
        let need_bpf = !profile.confine || args.events.is_some() || !rules.is_empty() || allowlist || policy.is_some();
        let programs = if need_bpf {
            let agent_id = cgroup.id();
            let mut programs = AgentPrograms::load().context("cannot load agt-jail's BPF programs")?;
            programs.register_agent(cgroup.id(), agent_id).context("cannot register the agent")?;
            if let Some((set, agent)) = policy.as_ref() {
                // Tier A is what the kernel accepts, not what it advertises.
                let exec_lsm = agt_jail_ebpf_loader::lsm::ExecLsm::load(&mut programs).ok();
                let (compiled, _) = govern::compile_plan(
                    set,
                    agent,
                    profile.ring,
                    profile.confine,
                    exec_lsm.is_some(),
                    args.policy.strict,
                )?;
                govern::install_plan(&mut programs, agent_id, &compiled)?;
                if let Some(exec_lsm) = exec_lsm {
                    tier_a = Some(govern::arm_tier_a(&mut programs, agent_id, exec_lsm, &compiled)?);
                }
                plan = Some(compiled);
            }
            for rule in rules {
                programs.deny_connect(agent_id, rule).context("cannot install a connect rule")?;
            }
            if allowlist {
                // Landlock narrows TCP connects to the listed ports; this narrows them to
                // the listed addresses (CIDR + port), decided in the kernel per connect.
                for dest in &profile.allow_connect {
                    let rule = AllowRule { addr: dest.addr, prefix: dest.prefix, port: dest.port };
                    programs.allow_connect(agent_id, rule).context("cannot install an allow-list entry")?;
                }
                programs.enable_connect_allowlist(agent_id).context("cannot enable the connect allow-list")?;
            }
            programs.attach_cgroup(cgroup.dir()).context("cannot govern the agent's cgroup")?;
            Some(Arc::new(Mutex::new(programs)))
        } else {
            None
        };
        governed = Some((cgroup, programs));
        stale_sweep = Some((parent, layout));
    } else {
        eprintln!(
            "agt-jail: warning: not root: no cgroup and no BPF programs; memory, pids and cpu limits are not enforced"
        );
    }

    // Under a policy the evaluator writes the events file (decisions) and the denial lines.
    let dns_stop = Arc::new(AtomicBool::new(false));
    let mut dns_thread = None;
    let governance = match policy {
        Some((set, agent)) => {
            let policy_set = Arc::clone(&set);
            let domain_set = Arc::clone(&set);
            let kill_file = governed.as_ref().map(|(c, _)| c.path().join("cgroup.kill"));
            let name = agent.id.clone();
            let governance = govern::Governance::start(
                &args.policy,
                set,
                agent,
                program_path.clone(),
                kill_file,
                plan.take(),
                args.events.as_deref(),
                !args.quiet,
            )?;
            if let Some((cgroup, Some(programs))) = governed.as_ref() {
                if tier_a.is_some() {
                    *lock(&governance.actuator.exec_approvals) = Some(govern::exec_approver(Arc::clone(programs)));
                    *lock(&governance.actuator.on_first_exec) =
                        Some(govern::guard_enabler(Arc::clone(programs), cgroup.id()));
                }
                *lock(&governance.actuator.on_demote) = Some(govern::demoter(
                    Arc::clone(programs),
                    cgroup.id(),
                    policy_set,
                    Arc::clone(&governance.plan),
                    profile.confine,
                    tier_a.is_some(),
                ));
            }
            if !args.quiet {
                eprintln!("agt-jail: agent {name} is under policy (agt-jail status --agent {name})");
            }
            let domains = agt_jail_policy::plan::domains(&domain_set);
            if args.policy.dns_refresh > 0 && !domains.is_empty() && lock(&governance.actuator.on_demote).is_some() {
                let (actuator, evaluator) = (Arc::clone(&governance.actuator), Arc::clone(&governance.evaluator));
                dns_thread = Some(
                    govern::follow_domains(
                        domains,
                        Duration::from_secs(args.policy.dns_refresh),
                        Arc::clone(&dns_stop),
                        |names| govern::resolve_domains(names).0,
                        move || match lock(&actuator.on_demote).as_mut() {
                            // The same re-plan as a demotion, for the agent as it is now.
                            Some(replan) => replan(&evaluator.agent()),
                            None => Ok(()),
                        },
                    )
                    .context("cannot start the DNS thread")?,
                );
            }
            Some(governance)
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut pump = None;
    if let Some((_, Some(programs))) = governed.as_mut() {
        let evaluator = governance.as_ref().map(|g| (Arc::clone(&g.evaluator), Arc::clone(&g.plan)));
        let sink = match evaluator {
            Some(_) => EventSink::open(None, false)?,
            None => EventSink::open(args.events.as_deref(), !args.quiet)?,
        };
        let reader = lock(programs).take_events().context("event reader already taken")?;
        let stop = Arc::clone(&stop);
        pump = Some(
            thread::Builder::new()
                .name("events".into())
                .spawn(move || pump_events(reader, sink, evaluator.as_ref().map(|(e, p)| (e, &**p)), &stop))
                .context("cannot start the event thread")?,
        );
    }
    let stop_pump = |pump: Option<thread::JoinHandle<Result<()>>>| {
        stop.store(true, Ordering::SeqCst);
        pump.map(|p| p.join())
    };

    // The exec plane: the command's own execve is the first action held for the evaluator.
    let mut exec_plane = None;
    let mut listener_socket = None;
    if let Some(governance) = governance.as_ref() {
        let file_plane = profile.confine && govern::needs_file_plane(lock(&governance.plan).as_ref());
        let decider = govern::ArmingDecider::new(governance, file_plane);
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().context("cannot create the exec listener socket")?;
        let notifier = ExecNotifier::start_with(OwnedFd::from(ours), decider.clone(), |err| {
            eprintln!("agt-jail: denied an exec that could not be decided: {err}");
        })
        .context("cannot start the exec plane")?;
        exec_plane = Some((notifier, decider));
        listener_socket = Some(OwnedFd::from(theirs));
    }
    let exec_notify = listener_socket.as_ref().map(AsRawFd::as_raw_fd);
    let kill_file = governed.as_ref().map(|(c, _)| c.path().join("cgroup.kill"));
    let mut forwarder = SignalForwarder::start(profile.confine, kill_file, Duration::from_secs(args.grace))?;
    let pty = if args.tty { Some(Pty::open().context("cannot open a pseudo-terminal")?) } else { None };
    let started = if profile.confine {
        let home = match (&workspace, profile.workspace) {
            (_, WorkspaceMode::Scratch) => mounts::SCRATCH.to_string(),
            (Some(ws), _) => ws.display().to_string(),
            (None, _) => "/tmp".to_string(),
        };
        let cfg = JailConfig {
            env: jail_env(args, &home),
            profile: profile.clone(),
            program: program_path.clone(),
            argv: args.command.clone(),
            workspace: workspace.clone(),
            allow_exec: args.allow_exec.clone(),
            cgroup_procs: governed.as_ref().map(|(c, _)| c.procs_paths()).unwrap_or_default(),
            cgroup_dir: governed.as_ref().map(|(c, _)| c.dir().as_raw_fd()),
            home: std::env::var_os("HOME").map(PathBuf::from),
            rootless: !root,
            tty: pty.as_ref().map(|p| p.slave.as_raw_fd()),
            tty_path: pty
                .as_ref()
                .and_then(|p| std::fs::read_link(format!("/proc/self/fd/{}", p.slave.as_raw_fd())).ok()),
            exec_notify,
        };
        if let Some(pty) = &pty {
            pty.copy_size_from_stdin();
        }
        let enforcement = enforcement.unwrap_or_default();
        launch::launch_with_cgroups(&cfg, &enforcement, &cgroup_v1).map(Running::Jail).map_err(Failure::Launch)
    } else {
        let mut command = Command::new(&program_path);
        command.arg0(program).args(program_args);
        for (key, value) in &args.env {
            command.env(key, value);
        }
        match governed.as_ref() {
            Some((cgroup, _)) => {
                spawn_in_cgroup_notified(command, cgroup, exec_notify).map(Running::Plain).map_err(Failure::Spawn)
            }
            None => Err(Failure::Internal(anyhow::anyhow!("ring 0 needs root"))),
        }
    };
    let running = match started {
        Ok(running) => running,
        Err(err) => {
            forwarder.stop();
            let _ = stop_pump(pump);
            return Err(err);
        }
    };
    // The agent holds the slave now; agt-jail keeps only the master.
    let relay = pty.map(|pty| {
        drop(pty.slave);
        relay_pty(pty.master)
    });
    if let Err(err) = forwarder.set_child(running.pid()) {
        // The command runs; without forwarding, a SIGTERM to agt-jail would orphan it.
        if let Ok(pid) = i32::try_from(running.pid()) {
            let _ = host::kill(pid, libc::SIGKILL);
        }
        let _ = running.wait();
        forwarder.stop();
        let _ = stop_pump(pump);
        return Err(err.into());
    }
    // Cgroups left by agt-jail processes that were killed: removed while the command
    // runs, off the start-up path (a live owner's cgroups are never touched).
    if let Some((parent, layout)) = stale_sweep {
        cgroup::sweep_stale(&parent, Path::new("/proc"));
        cgroup::sweep_stale_v1(&layout, Path::new("/proc"));
    }
    // The agent has sent its listener (or is gone): agt-jail keeps no copy of its end.
    drop(listener_socket);
    if std::env::var_os("AGT_JAIL_DEBUG").is_some() {
        if let Some(sync) = exec_plane.as_ref().and_then(|(notifier, _)| notifier.sync_wake_up()) {
            eprintln!(
                "agt-jail: debug: exec plane: {}",
                if sync {
                    "synchronous seccomp wake-ups (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)"
                } else {
                    "ordinary seccomp wake-ups (this kernel lacks SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6)"
                }
            );
        }
    }
    let status = running.wait().context("cannot wait for the command")?;
    forwarder.stop();
    dns_stop.store(true, Ordering::SeqCst);
    if let Some(thread) = dns_thread {
        let _ = thread.join();
    }
    if let Some((notifier, decider)) = exec_plane {
        if let Err(err) = notifier.stop() {
            eprintln!("agt-jail: warning: the exec plane ended with an error: {err}");
        }
        decider.stop();
    }
    if let Some((raw, output)) = relay {
        let _ = output.join();
        drop(raw);
    }

    // The command is done; anything it left running goes with the cgroup, and the
    // events it caused are already in the ring buffer: drain them before leaving.
    let mut cleanup = Ok(());
    let (mut drops, mut deny_drops) = (0, 0);
    if let Some((cgroup, programs)) = governed {
        let ooms = cgroup.oom_kills();
        if ooms > 0 {
            eprintln!("agt-jail: the agent hit its memory limit: the OOM killer ended {ooms} process(es)");
        }
        cleanup = cgroup.remove().context("cannot remove the agent's cgroup");
        if let Some(programs) = programs {
            let programs = lock(&programs);
            drops = programs.dropped_events().unwrap_or(0);
            deny_drops = programs.dropped_denies().unwrap_or(0);
        }
        drop(tier_a);
    }
    if let Some(pumped) = stop_pump(pump) {
        pumped.map_err(|_| anyhow::anyhow!("event thread panicked"))?.context("cannot write events")?;
    }
    if drops > 0 {
        eprintln!("agt-jail: warning: the kernel dropped {drops} event(s) because the ring buffer was full");
    }
    if deny_drops > 0 {
        eprintln!(
            "agt-jail: warning: the kernel dropped {deny_drops} deny record(s): the deny ring buffer and the deny \
             summary map were both full"
        );
    }
    cleanup?;
    Ok(exit_code(status))
}

/// Locks shared state, recovering it from a panicked holder (cleanup must still run).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Relays agt-jail's stdin to the pty and the pty to stdout (raw mode when stdin is a
/// terminal). Returns the raw-mode guard and the output thread (done when the jail is).
fn relay_pty(master: OwnedFd) -> (RawMode, thread::JoinHandle<()>) {
    let raw = RawMode::enter();
    let mut reader = File::from(master);
    // Terminal resizes follow the agent's pty (the thread ends with agt-jail).
    if let (Ok(master), Ok(mut winch)) = (reader.try_clone(), Signals::new([libc::SIGWINCH])) {
        let _ = thread::Builder::new().name("tty-winch".into()).spawn(move || {
            for _ in winch.forever() {
                copy_window_size(master.as_fd());
            }
        });
    }
    if let Ok(mut writer) = reader.try_clone() {
        let _ = thread::Builder::new().name("tty-in".into()).spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 4096];
            loop {
                match io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) | Err(_) => {
                        // End of input: an end-of-file character for the agent.
                        let _ = writer.write_all(&[4]);
                        break;
                    }
                    Ok(n) => {
                        if writer.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    let output = thread::spawn(move || {
        let mut stdout = io::stdout();
        let mut buf = [0u8; 4096];
        // EIO once every slave fd is closed (the jail is gone).
        while let Ok(n) = io::Read::read(&mut reader, &mut buf) {
            if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = stdout.flush();
        }
    });
    (raw, output)
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
            // One write per line: the command's own stderr shares the descriptor, and a
            // line split over several writes gets its output spliced into the middle.
            let line = format!("agt-jail: {}\n", describe_denial(event));
            let _ = io::stderr().lock().write_all(line.as_bytes());
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
        Event::Sendmsg { net, tgid, .. } => {
            let dest = SocketAddr::new(net.addr, net.port);
            format!("denied {} send to {dest} (pid {tgid})", net.protocol)
        }
        Event::Bind { net, tgid, .. } => {
            let local = SocketAddr::new(net.addr, net.port);
            format!("denied {} bind to {local} (pid {tgid})", net.protocol)
        }
        Event::Exec { filename, tgid, .. } => format!("denied exec of {filename} (pid {tgid})"),
        Event::ExecCheck { filename, tgid, reason, .. } => format!("denied exec of {filename} ({reason}, pid {tgid})"),
        Event::File { op, path, rule_kind, tgid, .. } => {
            format!("denied {op} of {path} ({rule_kind} rule, pid {tgid})")
        }
        Event::Guard { hook, detail, target_pid, tgid, .. } => {
            format!("denied {hook} (detail {detail}, target pid {target_pid}, pid {tgid})")
        }
        Event::Fork { tgid, .. } | Event::Exit { tgid, .. } => format!("process event (pid {tgid})"),
    }
}

/// Moves events from the ring buffer to the sink until told to stop, then drains
/// what is left, so nothing the command caused is lost.
fn pump_events(
    mut reader: EventReader,
    mut sink: EventSink,
    evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut write_error: Option<io::Error> = None;
    let mut handle = |decoded: std::result::Result<Event, agt_jail_ebpf_loader::DecodeError>| match decoded {
        Ok(event) => {
            if let Some((evaluator, plan)) = evaluator {
                govern::observe(evaluator, plan, &event);
            } else if let Err(err) = sink.record(&event) {
                write_error.get_or_insert(err);
            }
        }
        Err(err) => eprintln!("agt-jail: warning: undecodable event: {err}"),
    };
    while !stop.load(Ordering::SeqCst) {
        reader.poll(Duration::from_millis(50), &mut handle).context("cannot poll the event ring buffer")?;
        if let Some((evaluator, _)) = evaluator {
            evaluator.flush();
        }
    }
    reader.drain(&mut handle);
    if let Some((evaluator, _)) = evaluator {
        evaluator.flush();
    }
    if let Some(err) = write_error {
        bail!(err);
    }
    sink.flush().context("cannot flush events")
}

/// Forwards termination signals sent to agt-jail to the command, then, after a grace
/// period, kills everything it started. In ring 0 the command shares agt-jail's process
/// group, so signals the terminal sends (Ctrl-C) already reached it and are not sent
/// twice; a jail has its own session, so every signal is forwarded.
///
/// The handlers are installed before the command starts; signals that arrive while it
/// starts wait in the handlers' queue for the forwarding thread, which starts once the
/// command exists (off the start-up path). The command is named by a pidfd, so a signal
/// that races with its exit can never reach a later process that reuses its pid; that is
/// also why [`Self::stop`] need not wait for the thread (agt-jail's exit ends it).
struct SignalForwarder {
    signals: Option<SignalsInfo<WithOrigin>>,
    handle: signal_hook::iterator::Handle,
    jail: bool,
    kill_file: Option<PathBuf>,
    grace: Duration,
    done: Arc<AtomicBool>,
}

/// Whom forwarded signals go to.
enum Target {
    /// The started command.
    Pidfd(OwnedFd),
    /// The started command on a kernel without pidfds (before Linux 5.3).
    Pid(i32),
}

impl Target {
    fn of(pid: u32) -> Option<Self> {
        let pid = i32::try_from(pid).ok()?;
        Some(host::pidfd_open(pid).map(Target::Pidfd).unwrap_or(Target::Pid(pid)))
    }

    fn signal(&self, signal: libc::c_int) {
        let _ = match self {
            Target::Pidfd(fd) => host::pidfd_send_signal(fd.as_fd(), signal),
            Target::Pid(pid) => host::kill(*pid, signal),
        };
    }
}

const FORWARDED: [libc::c_int; 5] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1];

impl SignalForwarder {
    /// Installs the handlers before the command starts.
    fn start(jail: bool, kill_file: Option<PathBuf>, grace: Duration) -> Result<Self> {
        let signals = SignalsInfo::<WithOrigin>::new(FORWARDED).context("cannot install signal handlers")?;
        let handle = signals.handle();
        Ok(Self { signals: Some(signals), handle, jail, kill_file, grace, done: Arc::new(AtomicBool::new(false)) })
    }

    /// Names the started command (before it is waited for, so its pid is still its own)
    /// and starts forwarding, the signals that arrived meanwhile first.
    fn set_child(&mut self, pid: u32) -> Result<()> {
        let (Some(mut signals), Some(command)) = (self.signals.take(), Target::of(pid)) else { return Ok(()) };
        let command = Arc::new(command);
        let (jail, kill_file, grace, finished) =
            (self.jail, self.kill_file.clone(), self.grace, Arc::clone(&self.done));
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut armed = false;
                for origin in signals.forever() {
                    if !jail && matches!(origin.cause, Cause::Kernel) {
                        continue;
                    }
                    command.signal(origin.signal);
                    if origin.signal == libc::SIGUSR1 || armed {
                        continue;
                    }
                    armed = true;
                    let finished = Arc::clone(&finished);
                    let kill_file = kill_file.clone();
                    let command = Arc::clone(&command);
                    let _ = thread::Builder::new().name("grace".into()).spawn(move || {
                        thread::sleep(grace);
                        if finished.load(Ordering::SeqCst) {
                            return;
                        }
                        // The whole cgroup (every process the agent started), else the
                        // jail's init (its death ends the pid namespace).
                        let killed = kill_file.as_ref().is_some_and(|f| f.exists() && std::fs::write(f, "1").is_ok());
                        if !killed {
                            command.signal(libc::SIGKILL);
                        }
                    });
                }
            })
            .context("cannot start the signal thread")?;
        Ok(())
    }

    /// Forwards nothing more. A signal the thread already took may still be delivered
    /// after this returns; through the pidfd it reaches, at worst, the command that is
    /// already gone and never a process that reused its pid.
    fn stop(self) {
        self.done.store(true, Ordering::SeqCst);
        self.handle.close();
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
    fn allowlist_denies_loopback_and_metadata_unless_listed() {
        let mut profile = Profile::builtin(2).unwrap();
        let denied: Vec<IpAddr> = allowlist_denies(&profile).iter().map(|r| r.addr).collect();
        for addr in ["127.0.0.1", "::1", "169.254.169.254", "0.0.0.0"] {
            assert!(denied.contains(&addr.parse().unwrap()), "{addr}");
        }
        profile.allow_connect.push(Dest::parse("127.0.0.1:8080").unwrap());
        let denied: Vec<IpAddr> = allowlist_denies(&profile).iter().map(|r| r.addr).collect();
        assert!(!denied.contains(&"127.0.0.1".parse().unwrap()));
        assert!(denied.contains(&"169.254.169.254".parse().unwrap()));
    }

    #[test]
    fn env_flags_parse() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".to_string(), "b=c".to_string()));
        assert!(parse_env("=x").is_err() && parse_env("novalue").is_err());
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
