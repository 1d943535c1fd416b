//! The run of one jailed command, shared by both executables: resolve the command and
//! its profile, create the agent's cgroup with its limits, launch, forward signals,
//! wait, and remove the cgroup on every path.
//!
//! What governs the command beyond the jail (BPF programs, the policy's planes, the
//! events file) plugs in through [`Governor`]; the jail-only front uses [`Ungoverned`]
//! and links none of it, which is what keeps its start-up short (docs/adr/0004).
use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io::{self, Write},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd, RawFd},
        unix::{
            ffi::OsStrExt,
            fs::PermissionsExt,
            process::{CommandExt, ExitStatusExt},
        },
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

use agt_jail_jail::profile::{self, AllowEntry};
use agt_jail_jail::{
    cgroup,
    egress::{Egress, PendingEgress},
    host, launch, mounts,
    pty::{copy_window_size, Pty, RawMode},
    spawn_in_cgroup_notified, AgentCgroup, CgroupLayout, CgroupLimits, JailConfig, JailProcess, LaunchError, NetMode,
    Profile, SpawnError, WorkspaceMode,
};
use anyhow::{bail, Context, Result};
use signal_hook::{
    iterator::{exfiltrator::WithOrigin, Signals, SignalsInfo},
    low_level::siginfo::Cause,
};

use crate::{args::ExecArgs, EXIT_INTERNAL};

/// Why a run failed, each with the exit status a shell expects.
pub enum Failure {
    Spawn(SpawnError),
    Launch(LaunchError),
    /// The policy refused to run the command itself (exit 126, like a command that cannot run).
    PolicyDenied {
        program: String,
    },
    Internal(anyhow::Error),
}

/// Exit status when the policy refuses the command itself: the shell's "cannot execute".
pub const EXIT_POLICY_DENIED: u8 = 126;

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Internal(err)
    }
}

/// The exit status of `agt-jail exec`: the command's, or one line on stderr and 125
/// (126/127 when the command cannot be run or is not found).
pub fn exit_status(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(status) => ExitCode::from(status),
        Err(Failure::Spawn(err)) => {
            agt_jail_jail::stderr_line!("agt-jail: {err}");
            ExitCode::from(err.shell_status().unwrap_or(EXIT_INTERNAL))
        }
        Err(Failure::Launch(err)) => {
            agt_jail_jail::stderr_line!("agt-jail: {err}");
            ExitCode::from(err.shell_status().unwrap_or(EXIT_INTERNAL))
        }
        Err(Failure::PolicyDenied { program }) => {
            agt_jail_jail::stderr_line!(
                "agt-jail: {program}: denied by policy: the policy refused to run the command \
                 (its rule or default is in the denial line above, or in --events)"
            );
            ExitCode::from(EXIT_POLICY_DENIED)
        }
        Err(Failure::Internal(err)) => {
            agt_jail_jail::stderr_line!("agt-jail: {err:#}");
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

/// What governs a run beyond the jail. Every method but `finish` runs only as root, on a
/// run that has an agent cgroup.
pub trait Governor {
    /// Loads and attaches what governs the agent, once its cgroup exists with its
    /// limits and before the command starts.
    /// `egress` is the agent's routed path out of its own network namespace (allowlist
    /// mode), still being made: its host end (the gateway), which the agent must not reach
    /// unless listed, is waited for only when the rules are installed.
    fn attach(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        program: &Path,
        egress: Option<&mut PendingEgress>,
    ) -> Result<()>;
    /// The agent's end of the exec listener socket (the seccomp user-notification plane).
    fn exec_listener(&self) -> Option<RawFd>;
    /// What the agent's view gets besides its profile (known once attached).
    fn jail_additions(&self) -> JailAdditions {
        JailAdditions::default()
    }
    /// The command started and holds what it needs; agt-jail lets go of its copies.
    fn started(&mut self);
    /// The command ended: stop deciding, before its cgroup goes.
    fn ended(&mut self);
    /// The cgroup is gone (or the command never started): drain and report.
    fn finish(self) -> Result<()>;
    /// Whether the policy refused the entry command's own exec.
    fn entry_denied(&self) -> bool {
        false
    }
}

/// A run governed by the jail alone (namespaces, Landlock, seccomp, cgroup limits).
pub struct Ungoverned;

impl Governor for Ungoverned {
    fn attach(&mut self, _: &AgentCgroup, _: &Profile, _: &Path, _: Option<&mut PendingEgress>) -> Result<()> {
        Ok(())
    }

    fn exec_listener(&self) -> Option<RawFd> {
        None
    }

    fn started(&mut self) {}

    fn ended(&mut self) {}

    fn finish(self) -> Result<()> {
        Ok(())
    }
}

/// Host paths shown read-only inside the jail and variables set for the command, added by
/// what governs it (the identity socket).
#[derive(Debug, Default)]
pub struct JailAdditions {
    pub ro: Vec<PathBuf>,
    pub env: Vec<(OsString, OsString)>,
    /// The agent's resolv.conf (its resolver is served by agt-jail), see
    /// [`JailConfig::resolv_conf`].
    pub resolv_conf: Option<PathBuf>,
}

/// The command and the profile of a run, resolved before anything is created.
pub struct Prepared {
    pub program: PathBuf,
    pub profile: Profile,
}

impl Prepared {
    /// Resolves the command (as execvp would) and the profile with the flags on top, so
    /// "not found" and a bad flag are reported before anything exists.
    pub fn new(args: &ExecArgs) -> Result<Self, Failure> {
        let Some(program) = args.command.first() else {
            return Err(anyhow::anyhow!("no command given; usage: agt-jail exec [OPTIONS] -- CMD [ARGS]...").into());
        };
        let profile = resolve_profile(args)?;
        let program = resolve_program(program, &command_path(args, &profile)).map_err(Failure::Spawn)?;
        Ok(Self { program, profile })
    }

    /// See [`needs_bpf`].
    pub fn needs_bpf(&self, args: &ExecArgs) -> bool {
        needs_bpf(args, &self.profile)
    }
}

/// Whether a run needs BPF programs: record mode (ring 0) exists to be observed;
/// connect rules, allow-lists, --events and policies are enforced by them. A run without
/// them is enforced by namespaces, Landlock, seccomp and cgroups alone (docs/adr/0003).
pub fn needs_bpf(args: &ExecArgs, profile: &Profile) -> bool {
    !profile.confine
        || profile.net == NetMode::Allowlist
        || args.events.is_some()
        || args.audit.file.is_some()
        || !args.deny_connect.is_empty()
        || args.policy.given()
}

/// The search path a confined command gets unless `--env PATH=` gives another.
const JAIL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The PATH the command is looked up in: the one it runs with. A confined command gets
/// the jail's (or `--env PATH`), so `agt-jail exec --ring 2 -- python3` runs the python3
/// that `sh -c python3` inside would, not one found through a host PATH entry the jail
/// hides (a pyenv shim under /root: 127). Ring 0 keeps agt-jail's own environment.
fn command_path(args: &ExecArgs, profile: &Profile) -> OsString {
    let given = args.env.iter().rev().find(|(key, _)| key == "PATH").map(|(_, value)| value.clone());
    match given {
        Some(path) => path,
        None if profile.confine => JAIL_PATH.into(),
        None => std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
    }
}

/// Finds the program the way execvp(3) would with `path` as PATH, so "not found" and
/// "not executable" are reported before anything is set up.
pub fn resolve_program(program: &OsStr, path: &OsStr) -> std::result::Result<PathBuf, SpawnError> {
    // An empty name is no command (a PATH search would find its directories instead).
    if program.is_empty() {
        return Err(SpawnError::NotFound { program: "''".into() });
    }
    let candidates: Vec<PathBuf> = if program.as_bytes().contains(&b'/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::split_paths(path).map(|dir| dir.join(program)).collect()
    };
    let mut found_unexecutable = false;
    for candidate in candidates {
        let Ok(meta) = candidate.metadata() else { continue };
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            return Ok(candidate);
        }
        found_unexecutable = true;
    }
    let program = program.to_string_lossy().into_owned();
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
    narrow_network(args, &mut profile)?;
    if profile.ring == 3 && !args.rw.is_empty() {
        bail!("--rw cannot be honoured in ring 3: nothing is writable there but the scratch /workspace (use --ro, or ring 2)");
    }
    let checked = profile.clone();
    for (flag, paths, list) in [("--rw", &args.rw, &mut profile.rw), ("--ro", &args.ro, &mut profile.ro)] {
        for path in paths {
            let real = path.canonicalize().with_context(|| format!("{flag}: cannot use {}", path.display()))?;
            launch::check_extra_path(&checked, &real, flag == "--rw").map_err(|e| anyhow::anyhow!("{e}"))?;
            list.push(real);
        }
    }
    // An --allow-exec path that does not exist would allow nothing: refused, not skipped.
    for path in &args.allow_exec {
        path.canonicalize().with_context(|| format!("--allow-exec: cannot use {}", path.display()))?;
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

/// `--net` and `--allow-connect` on top of the profile: a flag only narrows the ring's
/// network (rings 1-2 take `--net host` under a policy, whose rules then decide every
/// connect); what the ring cannot honour is refused.
fn narrow_network(args: &ExecArgs, profile: &mut Profile) -> Result<()> {
    let ring = profile.ring;
    if let Some(mode) = &args.net {
        let mode =
            NetMode::parse(mode).with_context(|| format!("--net '{mode}' is not one of none, allowlist, host"))?;
        // Under a policy, rings 1-2 may use the host network: the policy's network rules
        // and default then decide every connect in the kernel (the policy is the allow-list).
        let policy_allow_list = mode == NetMode::Host && args.policy.given() && profile.net == NetMode::Allowlist;
        if mode > profile.net && !policy_allow_list {
            let narrower: Vec<NetMode> =
                [NetMode::Host, NetMode::Allowlist, NetMode::None].into_iter().filter(|m| m <= &profile.net).collect();
            let with_policy = if profile.net == NetMode::Allowlist { "; --net host needs --policy" } else { "" };
            bail!(
                "--net {} cannot be honoured in ring {ring}: its network is {} and flags can only narrow it \
                 (here: --net {}{with_policy})",
                mode.name(),
                profile.net.name(),
                profile::mode_names(&narrower)
            );
        }
        profile.net = mode;
    }
    for entry in &args.allow_connect {
        match entry {
            AllowEntry::Addr(dest) => profile.allow_connect.push(dest.clone()),
            AllowEntry::Name(name, port) => profile.allow_names.push((name.clone(), *port)),
        }
    }
    if !args.allow_connect.is_empty() && profile.net != NetMode::Allowlist {
        if NetMode::allowed_in(ring).contains(&NetMode::Allowlist) {
            bail!("--allow-connect needs network mode allowlist, but this run's is {}", profile.net.name());
        }
        bail!("--allow-connect cannot be honoured in ring {ring}: ring {ring} has no network");
    }
    // Only network mode allowlist serves the agent a resolver of agt-jail's to ask upstream.
    if args.dns_upstream.is_some() && !(profile.confine && profile.net == NetMode::Allowlist) {
        bail!(
            "--dns-upstream cannot be honoured: the agent's resolver is served in network mode allowlist (rings 1-2) \
             only, and this run's mode is {}",
            profile.net.name()
        );
    }
    // A profile's names under `--net host` (rings 1-2 with a policy): no resolver of
    // agt-jail's is in the agent's path there, so nothing could open their addresses.
    if let (Some((name, port)), false) = (profile.allow_names.first(), profile.net == NetMode::Allowlist) {
        bail!(
            "allow_connect {name}:{port} cannot be honoured with network mode {}: names are served by the agent's \
             resolver, which only network mode allowlist has (use addresses, or the policy's net.domain rules)",
            profile.net.name()
        );
    }
    Ok(())
}

/// The scrubbed environment of a jailed command (values as bytes: a non-UTF-8 `LANG`
/// or workspace path is passed on whole, not dropped or mangled).
fn jail_env(args: &ExecArgs, home: &OsStr) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![("PATH".into(), JAIL_PATH.into()), ("HOME".into(), home.to_owned())];
    for key in ["TERM", "LANG"] {
        if let Some(value) = std::env::var_os(key) {
            env.push((key.into(), value));
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

/// Runs the prepared command under `governor` (made once the flags and the profile are
/// known to be right, before anything is created) and returns its exit status.
pub fn execute<G: Governor>(
    args: &ExecArgs,
    prepared: Prepared,
    governor: impl FnOnce(&Profile) -> Result<G>,
) -> Result<u8, Failure> {
    let Prepared { program: program_path, mut profile } = prepared;
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
    if !root && (args.events.is_some() || args.audit.file.is_some() || !args.deny_connect.is_empty()) {
        return Err(anyhow::anyhow!("--events, --audit and --deny-connect need root (they use BPF programs)").into());
    }
    // A limit the operator asked for is refused, not dropped: without root there is no
    // cgroup to hold it (the ring's default limits only draw the warning below).
    let asked = [("--memory", &args.memory), ("--pids", &args.pids), ("--cpu", &args.cpu)]
        .into_iter()
        .find(|(_, value)| value.as_deref().is_some_and(|v| !v.trim().eq_ignore_ascii_case("max")));
    if let (false, Some((flag, _))) = (root, asked) {
        return Err(anyhow::anyhow!(
            "{flag} needs root: limits are held by cgroups, which need root (run it with sudo)"
        )
        .into());
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
    // The governor (a policy loads and fails with its located error) before anything is created.
    let mut governor = governor(&profile)?;
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
    if enforcement.as_ref().is_some_and(|e| e.entry_exec_plane) {
        entry_plane_fits(args, &profile).map_err(Failure::Launch)?;
    }
    for gap in enforcement.iter().flat_map(|e| &e.unenforced) {
        agt_jail_jail::stderr_line!("agt-jail: warning: {gap}");
    }

    // Root: the agent's cgroup (with limits) and what governs it, before it exists.
    let mut agent_cgroup = None;
    let mut cgroup_v1 = Vec::new();
    let mut stale_sweep = None;
    // Allowlist mode: the agent's own network namespace gets a routed path out, made on a
    // thread while the cgroup and the BPF programs are made, and joined before the jail
    // starts (the jail joins the namespace it makes). A host that cannot give one refuses
    // the run; the host network is never the fallback.
    let mut pending_egress = if root && profile.confine && profile.net == NetMode::Allowlist {
        Some(
            PendingEgress::start(Path::new("/proc"), Path::new("/sys/class/net"), true)
                .map_err(|e| Failure::Launch(e.into()))?,
        )
    } else {
        None
    };
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
        governor.attach(&cgroup, &profile, &program_path, pending_egress.as_mut())?;
        agent_cgroup = Some(cgroup);
        stale_sweep = Some((parent, layout));
    } else {
        agt_jail_jail::stderr_line!(
            "agt-jail: warning: not root: no cgroup and no BPF programs; memory, pids and cpu limits are not enforced"
        );
    }

    let egress = pending_egress.map(PendingEgress::finish).transpose().map_err(|e| Failure::Launch(e.into()))?;
    // Without Landlock, a ring that runs only its entry command is held by the entry-only
    // exec plane: the policy's, which then answers every exec after the entry's itself
    // (NotifierOptions::entry_only), or one of its own without a policy.
    let mut entry_plane = None;
    let exec_notify = if enforcement.as_ref().is_some_and(|e| e.entry_exec_plane) && governor.exec_listener().is_none()
    {
        let plane = EntryPlane::start()?;
        let fd = plane.theirs.as_ref().map(AsRawFd::as_raw_fd);
        entry_plane = Some(plane);
        fd
    } else {
        governor.exec_listener()
    };
    let additions = governor.jail_additions();
    profile.ro.extend(additions.ro.iter().cloned());
    let kill_file = agent_cgroup.as_ref().map(|c| c.path().join("cgroup.kill"));
    let mut forwarder = SignalForwarder::start(profile.confine, kill_file, Duration::from_secs(args.grace))?;
    let pty = if args.tty { Some(Pty::open().context("cannot open a pseudo-terminal")?) } else { None };
    let started = if profile.confine {
        let home = match (&workspace, profile.workspace) {
            (_, WorkspaceMode::Scratch) => OsStr::new(mounts::SCRATCH),
            (Some(ws), _) => ws.as_os_str(),
            (None, _) => OsStr::new("/tmp"),
        };
        // What governs the agent names its own variables (an --env of the same name loses).
        let mut env = jail_env(args, home);
        env.retain(|(key, _)| !additions.env.iter().any(|(k, _)| k == key));
        env.extend(additions.env.iter().cloned());
        let cfg = JailConfig {
            env,
            profile: profile.clone(),
            program: program_path.clone(),
            argv: args.command.clone(),
            workspace: workspace.clone(),
            allow_exec: args.allow_exec.clone(),
            cgroup_procs: agent_cgroup.as_ref().map(|c| c.procs_paths()).unwrap_or_default(),
            cgroup_dir: agent_cgroup.as_ref().map(|c| c.dir().as_raw_fd()),
            home: std::env::var_os("HOME").map(PathBuf::from),
            rootless: !root,
            tty: pty.as_ref().map(|p| p.slave.as_raw_fd()),
            tty_path: pty
                .as_ref()
                .and_then(|p| std::fs::read_link(format!("/proc/self/fd/{}", p.slave.as_raw_fd())).ok()),
            exec_notify,
            egress: egress.as_ref().map(Egress::plan),
            resolv_conf: additions.resolv_conf.clone(),
        };
        if let Some(pty) = &pty {
            pty.copy_size_from_stdin();
        }
        let enforcement = enforcement.unwrap_or_default();
        launch::launch_with_cgroups(&cfg, &enforcement, &cgroup_v1).map(Running::Jail).map_err(Failure::Launch)
    } else {
        let mut command = Command::new(&program_path);
        if let Some((program, program_args)) = args.command.split_first() {
            command.arg0(program).args(program_args);
        }
        for (key, value) in args.env.iter().chain(&additions.env) {
            command.env(key, value);
        }
        match agent_cgroup.as_ref() {
            Some(cgroup) => {
                spawn_in_cgroup_notified(command, cgroup, exec_notify).map(Running::Plain).map_err(Failure::Spawn)
            }
            None => Err(Failure::Internal(anyhow::anyhow!("ring 0 needs root"))),
        }
    };
    // The agent has sent its listener (or is gone): agt-jail keeps no copy of its end.
    if let Some(plane) = entry_plane.as_mut() {
        plane.theirs = None;
    }
    let running = match started {
        Ok(running) => running,
        Err(err) => {
            // EPERM from the exec plane reads as "not executable" to the kernel's caller;
            // the evaluator knows it was a denial.
            let not_executable = matches!(
                &err,
                Failure::Launch(LaunchError::NotExecutable { .. }) | Failure::Spawn(SpawnError::NotExecutable { .. })
            );
            let err = if not_executable && governor.entry_denied() {
                let program = args.command.first().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
                Failure::PolicyDenied { program }
            } else {
                err
            };
            forwarder.stop();
            let _ = governor.finish();
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
        let _ = governor.finish();
        return Err(err.into());
    }
    // Cgroups left by agt-jail processes that were killed: removed while the command
    // runs, off the start-up path (a live owner's cgroups are never touched).
    if let Some((parent, layout)) = stale_sweep {
        cgroup::sweep_stale(&parent, Path::new("/proc"));
        cgroup::sweep_stale_v1(&layout, Path::new("/proc"));
    }
    governor.started();
    let status = running.wait().context("cannot wait for the command")?;
    forwarder.stop();
    governor.ended();
    drop(entry_plane);
    // The agent is done with its network: the kernel deletes the pair with its namespace.
    drop(egress);
    if let Some((raw, output)) = relay {
        let _ = output.join();
        drop(raw);
    }

    // The command is done; anything it left running goes with the cgroup.
    let mut cleanup = Ok(());
    if let Some(cgroup) = agent_cgroup {
        let ooms = cgroup.oom_kills();
        if ooms > 0 {
            agt_jail_jail::stderr_line!(
                "agt-jail: the agent hit its memory limit: the OOM killer ended {ooms} process(es)"
            );
        }
        cleanup = cgroup.remove().context("cannot remove the agent's cgroup");
    }
    governor.finish()?;
    cleanup?;
    Ok(exit_code(status))
}

/// Without Landlock the entry-only exec plane lets the entry command alone run: what
/// would need more (a path check on later execs, which can be raced) is refused before
/// anything is created (125). A policy's exec plane takes the entry-only rule on instead.
fn entry_plane_fits(args: &ExecArgs, profile: &Profile) -> Result<(), LaunchError> {
    const WHY: &str = "this kernel does not enforce Landlock, and the entry-only exec plane that holds";
    if let Some(path) = args.allow_exec.first() {
        return Err(LaunchError::Landlock {
            ring: profile.ring,
            reason: format!(
                "{WHY} ring {} here lets only the entry command run: --allow-exec {} would need a path check on \
                 later execs, which can be raced",
                profile.ring,
                path.display()
            ),
        });
    }
    Ok(())
}

/// The entry-only exec plane of one run: its notifier and, until the launch returned,
/// the agent's end of the listener socket.
struct EntryPlane {
    _notifier: agt_jail_supervisor::exec_notify::Handle,
    theirs: Option<OwnedFd>,
}

impl EntryPlane {
    fn start() -> Result<Self, Failure> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .context("cannot create the exec listener socket")
            .map_err(Failure::Internal)?;
        let notifier = agt_jail_supervisor::exec_notify::ExecNotifier::start_entry_only(OwnedFd::from(ours), |_| {})
            .context("cannot start the entry-only exec plane (seccomp user notification)")
            .map_err(Failure::Internal)?;
        Ok(Self { _notifier: notifier, theirs: Some(OwnedFd::from(theirs)) })
    }
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
        Ok(Self { signals: Some(signals), jail, kill_file, grace, done: Arc::new(AtomicBool::new(false)) })
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
                    let stopped = finished.load(Ordering::SeqCst);
                    if stopped || (!jail && matches!(origin.cause, Cause::Kernel)) {
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
    /// already gone and never a process that reused its pid. The thread is not woken to
    /// end it: on the way out that costs agt-jail a CPU the jail's teardown is using, and
    /// the signals it takes from now on are dropped (agt-jail finishes its cleanup).
    fn stop(self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
    }

    fn exec_args(argv: &[&str]) -> ExecArgs {
        #[derive(clap::Parser)]
        struct Exec {
            #[command(flatten)]
            args: ExecArgs,
        }
        <Exec as clap::Parser>::try_parse_from(std::iter::once("exec").chain(argv.iter().copied())).unwrap().args
    }

    #[test]
    fn a_confined_command_is_looked_up_in_the_path_it_runs_with() {
        let path = |argv: &[&str]| {
            let args = exec_args(argv);
            command_path(&args, &resolve_profile(&args).unwrap())
        };
        assert_eq!(path(&["--ring", "2", "--", "python3"]), JAIL_PATH);
        assert_eq!(path(&["--ring", "3", "--env", "PATH=/a", "--env", "PATH=/opt/bin", "--", "x"]), "/opt/bin");
        assert_eq!(path(&["--", "python3"]), std::env::var_os("PATH").unwrap());
        assert_eq!(path(&["--env", "PATH=/opt/bin", "--", "python3"]), "/opt/bin");
    }

    #[test]
    fn resolves_programs_like_a_shell() {
        let path = OsStr::new(JAIL_PATH);
        assert!(resolve_program(OsStr::new("sh"), path).is_ok());
        assert!(matches!(resolve_program(OsStr::new(""), path), Err(SpawnError::NotFound { .. })));
        assert!(matches!(
            resolve_program(OsStr::new("/nonexistent/agt-jail-nope"), path),
            Err(SpawnError::NotFound { .. })
        ));
        assert!(matches!(
            resolve_program(OsStr::new("agt-jail-no-such-command-xyz"), path),
            Err(SpawnError::NotFound { .. })
        ));
        let plain = std::env::temp_dir().join(format!("agt-jail-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let result = resolve_program(plain.as_os_str(), path);
        let _ = std::fs::remove_file(&plain);
        assert!(matches!(result, Err(SpawnError::NotExecutable { .. })));
    }
}
