//! `agt-jail exec` with what needs BPF programs: record mode (ring 0), connect rules,
//! allow-lists, --events and policies.
//!
//! Order matters and is the point of this module: the cgroup exists and the BPF
//! programs are attached to it and know it *before* the command's first
//! instruction, so nothing it does escapes them. Cleanup runs on every path.
use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::Path,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use agt_jail_cli::{
    args::ExecArgs,
    run::{self, Governor, Prepared},
};
use agt_jail_ebpf_loader::{AgentPrograms, AllowRule, ConnectRule, Event, EventReader, TaskFactsMap};
use agt_jail_jail::{cgroup::CgroupLayout, egress::PendingEgress, profile::Dest, AgentCgroup, NetMode, Profile};
use agt_jail_policy::plan::Plan;
use agt_jail_supervisor::{
    evaluator::Evaluator,
    exec_notify::{self, ExecNotifier, KernelTask, NotifierOptions, TaskSource},
};
use anyhow::{bail, Context, Result};

use crate::{
    audit_run::{self, AuditRun},
    govern::{self, lock},
};
use agt_jail_audit::LineWriter;

pub fn run(args: ExecArgs) -> ExitCode {
    let result = Prepared::new(&args)
        .and_then(|prepared| run::execute(&args, prepared, |profile| Governed::new(&args, profile)));
    run::exit_status(result)
}

/// Everything that governs one run beyond the jail, in the order it was set up.
struct Governed<'a> {
    args: &'a ExecArgs,
    policy: Option<govern::Loaded>,
    programs: Option<Arc<Mutex<AgentPrograms>>>,
    /// The kernel's per-thread `comm` and executable, for the exec plane.
    task_facts: Option<Arc<KernelTasks>>,
    tier_a: Option<govern::TierA>,
    governance: Option<govern::Governance>,
    dns_stop: Arc<AtomicBool>,
    dns_thread: Option<thread::JoinHandle<()>>,
    pump_stop: Arc<AtomicBool>,
    pump: Option<thread::JoinHandle<Result<()>>>,
    exec_plane: Option<(exec_notify::Handle, Arc<govern::ArmingDecider>)>,
    listener_socket: Option<OwnedFd>,
    audit: Option<AuditRun>,
}

impl<'a> Governed<'a> {
    /// The policy loads (and fails with its located error) before anything is created.
    fn new(args: &'a ExecArgs, profile: &Profile) -> Result<Self> {
        let policy = if args.policy.given() { Some(govern::load(&args.policy, profile.ring)?) } else { None };
        // What `policy lint` warns of, said once before the run (a policy that names no
        // agent denies everything; a bare literal condition never matches).
        if let (Some(loaded), false) = (&policy, args.quiet) {
            for warning in loaded.set.warnings() {
                agt_jail_jail::stderr_line!("agt-jail: {}", govern::load_warning(warning));
            }
        }
        if policy.is_some() {
            decidable(&args.command)?;
        }
        let (did, policy_hash) = match &policy {
            Some(loaded) => (loaded.agent.did.clone(), loaded.policy_hash.clone()),
            None => (govern::new_did()?, agt_jail_supervisor::identity::policy_hash(&[])?),
        };
        let audit = AuditRun::open(&args.audit, &did, &policy_hash)?;
        Ok(Self {
            args,
            policy,
            programs: None,
            task_facts: None,
            tier_a: None,
            governance: None,
            dns_stop: Arc::new(AtomicBool::new(false)),
            dns_thread: None,
            pump_stop: Arc::new(AtomicBool::new(false)),
            pump: None,
            exec_plane: None,
            listener_socket: None,
            audit,
        })
    }

    /// The BPF programs for the agent's cgroup, with the policy's tables, connect rules
    /// and allow-list installed, attached before the agent exists.
    fn load_programs(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        egress: Option<&mut PendingEgress>,
    ) -> Result<Option<Plan>> {
        let args = self.args;
        // Loading the BPF object costs ~90 ms per run: only for the runs that need it.
        let allowlist = profile.confine && profile.net == NetMode::Allowlist;
        if !run::needs_bpf(args, profile) {
            return Ok(None);
        }
        let agent_id = cgroup.id();
        let mut programs = AgentPrograms::load().context("cannot load agt-jail's BPF programs")?;
        programs.register_agent(cgroup.id(), agent_id).context("cannot register the agent")?;
        let mut plan = None;
        if let Some(govern::Loaded { set, agent, .. }) = self.policy.as_ref() {
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
                self.tier_a = Some(govern::arm_tier_a(&mut programs, agent_id, exec_lsm, &compiled)?);
            }
            plan = Some(compiled);
        }
        let mut rules: Vec<ConnectRule> =
            args.deny_connect.iter().map(|dest| ConnectRule::new(dest.addr, dest.port)).collect();
        if profile.confine && profile.net == NetMode::Allowlist {
            // The agent's network is made meanwhile (it exists before the agent does; a
            // failed setup fails the run when it is joined, so no gateway is fine here).
            let gateway = egress.and_then(PendingEgress::gateway).map(IpAddr::V4);
            let host = agt_jail_jail::host::interface_addresses().context("cannot list the host's addresses")?;
            rules.extend(allowlist_denies(profile, gateway.iter().chain(&host).copied()));
        }
        for rule in rules {
            programs.deny_connect(agent_id, rule).context("cannot install a connect rule")?;
        }
        if allowlist {
            // The allow-list (CIDR + port), decided in the kernel per connect. Loopback
            // in the agent's own namespace is its own: always allowed.
            for dest in own_loopback().iter().chain(&profile.allow_connect) {
                let rule = AllowRule { addr: dest.addr, prefix: dest.prefix, port: dest.port };
                programs.allow_connect(agent_id, rule).context("cannot install an allow-list entry")?;
            }
            programs.enable_connect_allowlist(agent_id).context("cannot enable the connect allow-list")?;
        }
        programs.attach_cgroup(cgroup.dir()).context("cannot govern the agent's cgroup")?;
        self.task_facts = programs.take_task_facts().map(|map| Arc::new(KernelTasks(map)));
        self.programs = Some(Arc::new(Mutex::new(programs)));
        Ok(plan)
    }

    /// Under a policy: the evaluator (it writes the events file and the denial lines),
    /// its control socket, and the DNS thread that follows the policy's domains.
    fn start_governance(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        program: &Path,
        plan: Option<Plan>,
    ) -> Result<()> {
        let Some(loaded) = self.policy.take() else { return Ok(()) };
        let args = self.args;
        let set = Arc::clone(&loaded.set);
        let domain_set = Arc::clone(&set);
        let name = loaded.agent.id.clone();
        let layout = CgroupLayout::detect(Path::new("/proc/self/mountinfo")).context("cannot find cgroup v2")?;
        let cgroup_path = agt_jail_supervisor::peer::cgroup_name(&layout.v2, cgroup.path()).with_context(|| {
            format!("the agent's cgroup {} is not under {}", cgroup.path().display(), layout.v2.display())
        })?;
        let governance = govern::Governance::start(
            &args.policy,
            loaded,
            govern::CgroupName { id: cgroup.id(), path: cgroup_path },
            program.to_path_buf(),
            Some(cgroup.path().join("cgroup.kill")),
            plan,
            args.events.as_deref(),
            self.audit.as_ref().map(AuditRun::writer),
            !args.quiet,
        )?;
        if let Some(programs) = self.programs.as_ref() {
            if self.tier_a.is_some() {
                *lock(&governance.actuator.exec_approvals) = Some(govern::exec_approver(Arc::clone(programs)));
                *lock(&governance.actuator.on_first_exec) =
                    Some(govern::guard_enabler(Arc::clone(programs), cgroup.id()));
            }
            *lock(&governance.actuator.on_demote) = Some(govern::demoter(
                Arc::clone(programs),
                cgroup.id(),
                set,
                Arc::clone(&governance.plan),
                profile.confine,
                self.tier_a.is_some(),
            ));
        }
        if !args.quiet {
            agt_jail_jail::stderr_line!("agt-jail: agent {name} is under policy (agt-jail status --agent {name})");
        }
        let domains = agt_jail_policy::plan::domains(&domain_set);
        if args.policy.dns_refresh > 0 && !domains.is_empty() && lock(&governance.actuator.on_demote).is_some() {
            let (actuator, evaluator) = (Arc::clone(&governance.actuator), Arc::clone(&governance.evaluator));
            self.dns_thread = Some(
                govern::follow_domains(
                    domains,
                    Duration::from_secs(args.policy.dns_refresh),
                    Arc::clone(&self.dns_stop),
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
        self.governance = Some(governance);
        Ok(())
    }

    /// The thread that moves kernel events to the evaluator (or the events file).
    fn start_pump(&mut self) -> Result<()> {
        let Some(programs) = self.programs.as_ref() else { return Ok(()) };
        let evaluator = self.governance.as_ref().map(|g| (Arc::clone(&g.evaluator), Arc::clone(&g.plan)));
        let sink = match evaluator {
            Some(_) => EventSink::open(None, false, None)?,
            None => EventSink::open(
                self.args.events.as_deref(),
                !self.args.quiet,
                self.audit.as_ref().map(AuditRun::writer),
            )?,
        };
        let reader = lock(programs).take_events().context("event reader already taken")?;
        let stop = Arc::clone(&self.pump_stop);
        let drops = DropWatch { programs: Arc::clone(programs), seen: (0, 0) };
        self.pump = Some(
            thread::Builder::new()
                .name("events".into())
                .spawn(move || pump_events(reader, sink, evaluator.as_ref().map(|(e, p)| (e, &**p)), drops, &stop))
                .context("cannot start the event thread")?,
        );
        Ok(())
    }

    /// The exec plane: the command's own execve is the first action held for the evaluator.
    fn start_exec_plane(&mut self, profile: &Profile) -> Result<()> {
        let Some(governance) = self.governance.as_ref() else { return Ok(()) };
        let file_plane = profile.confine && govern::needs_file_plane(lock(&governance.plan).as_ref());
        let decider = govern::ArmingDecider::new(governance, file_plane);
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().context("cannot create the exec listener socket")?;
        // A confined agent cannot change its root (no capabilities, no new namespaces).
        let options = NotifierOptions {
            tasks: self.task_facts.clone().map(|tasks| tasks as Arc<dyn TaskSource>),
            fixed_root: profile.confine,
        };
        let notifier = ExecNotifier::start_with_options(OwnedFd::from(ours), decider.clone(), options, |err| {
            agt_jail_jail::stderr_line!("agt-jail: denied an exec that could not be decided: {err}");
        })
        .context("cannot start the exec plane")?;
        self.exec_plane = Some((notifier, decider));
        self.listener_socket = Some(OwnedFd::from(theirs));
        Ok(())
    }
}

/// Under a policy the entry command's exec is decided by the exec plane, which reads at
/// most [`exec_notify::MAX_ARGS`] arguments of at most [`exec_notify::MAX_ARGV_BYTES`]
/// and denies what it cannot read: such a command line is refused before anything starts
/// (125), not run into a denial that reads as "not executable".
fn decidable(command: &[std::ffi::OsString]) -> Result<()> {
    let bytes: usize = command.iter().map(|arg| arg.len() + 1).sum();
    if command.len() > exec_notify::MAX_ARGS || bytes > exec_notify::MAX_ARGV_BYTES {
        bail!(
            "under --policy a command line is decided by the exec plane, which reads at most {} arguments \
             and {} bytes of them; this one has {} arguments and {bytes} bytes",
            exec_notify::MAX_ARGS,
            exec_notify::MAX_ARGV_BYTES,
            command.len()
        );
    }
    Ok(())
}

/// The loader's map of the kernel's per-thread records, as the exec plane reads them.
struct KernelTasks(TaskFactsMap);

impl TaskSource for KernelTasks {
    fn task(&self, tid: u32) -> Option<KernelTask> {
        self.0.get(tid).map(|facts| KernelTask {
            comm: agt_jail_ebpf_loader::comm_string(&facts.comm),
            exe: agt_jail_ebpf_loader::exe_key(facts.exe),
        })
    }
}

impl Governor for Governed<'_> {
    fn attach(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        program: &Path,
        egress: Option<&mut PendingEgress>,
    ) -> Result<()> {
        let plan = self.load_programs(cgroup, profile, egress)?;
        self.start_governance(cgroup, profile, program, plan)?;
        self.start_pump()?;
        self.start_exec_plane(profile)
    }

    fn exec_listener(&self) -> Option<RawFd> {
        self.listener_socket.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The agent's identity socket: its directory shown read-only in the jail, its path announced.
    fn jail_additions(&self) -> run::JailAdditions {
        let Some(governance) = self.governance.as_ref() else { return run::JailAdditions::default() };
        let socket = &governance.identity_socket;
        run::JailAdditions {
            ro: vec![socket.dir().to_path_buf()],
            env: vec![(agt_jail_supervisor::identity_socket::SOCKET_ENV.into(), socket.path().as_os_str().to_owned())],
        }
    }

    fn entry_denied(&self) -> bool {
        self.exec_plane.as_ref().is_some_and(|(_, decider)| decider.entry_denied())
    }

    fn started(&mut self) {
        // The agent has sent its listener (or is gone): agt-jail keeps no copy of its end.
        self.listener_socket = None;
        if std::env::var_os("AGT_JAIL_DEBUG").is_some() {
            if let Some(sync) = self.exec_plane.as_ref().and_then(|(notifier, _)| notifier.sync_wake_up()) {
                agt_jail_jail::stderr_line!(
                    "agt-jail: debug: exec plane: {}",
                    if sync {
                        "synchronous seccomp wake-ups (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)"
                    } else {
                        "ordinary seccomp wake-ups (this kernel lacks SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6)"
                    }
                );
            }
        }
    }

    fn ended(&mut self) {
        self.dns_stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.dns_thread.take() {
            let _ = thread.join();
        }
        if let Some((notifier, decider)) = self.exec_plane.take() {
            if let Err(err) = notifier.stop() {
                agt_jail_jail::stderr_line!("agt-jail: warning: the exec plane ended with an error: {err}");
            }
            decider.stop();
        }
    }

    /// The events the command caused are already in the ring buffer: drain them before leaving.
    fn finish(mut self) -> Result<()> {
        self.ended();
        let (mut drops, mut deny_drops) = (0, 0);
        if let Some(programs) = self.programs.as_ref() {
            let programs = lock(programs);
            drops = programs.dropped_events().unwrap_or(0);
            deny_drops = programs.dropped_denies().unwrap_or(0);
        }
        drop(self.tier_a.take());
        self.pump_stop.store(true, Ordering::SeqCst);
        if let Some(pump) = self.pump.take() {
            pump.join().map_err(|_| anyhow::anyhow!("event thread panicked"))?.context("cannot write events")?;
        }
        if let Some(audit) = self.audit.as_mut() {
            audit.close()?;
        }
        // The evaluator's records never wait on the file; a failed write is reported here.
        if let Some(err) = self.governance.as_ref().and_then(|g| g.evaluator.take_record_error()) {
            bail!("cannot write records (events file or audit log): {err}");
        }
        if drops > 0 {
            agt_jail_jail::stderr_line!(
                "agt-jail: warning: the kernel dropped {drops} event(s) because the ring buffer was full"
            );
        }
        if deny_drops > 0 {
            agt_jail_jail::stderr_line!(
                "agt-jail: warning: the kernel dropped {deny_drops} deny record(s): the priority ring buffer and the deny \
                 summary map were both full"
            );
        }
        Ok(())
    }
}

/// Loopback of the agent's own network namespace (allowlist mode): its servers, not the host's.
fn own_loopback() -> [Dest; 3] {
    let dest = |addr: IpAddr, prefix| Dest { addr, prefix, port: 0 };
    [
        dest(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)), 8),
        dest(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 128),
        dest(IpAddr::V6(std::net::Ipv4Addr::new(127, 0, 0, 0).to_ipv6_mapped()), 104),
    ]
}

/// Destinations an allowlist-mode agent never reaches unless explicitly listed (even
/// inside a listed range): the host's own addresses (`host`: the veth gateway and every
/// other address of the host, whose services the gateway would route to), the
/// unspecified addresses and the cloud metadata service.
fn allowlist_denies(profile: &Profile, host: impl Iterator<Item = IpAddr>) -> Vec<ConnectRule> {
    let listed = |addr: IpAddr| {
        let host_prefix = if addr.is_ipv4() { 32 } else { 128 };
        profile.allow_connect.iter().any(|d| d.addr == addr && d.prefix == host_prefix)
    };
    let fixed = ["169.254.169.254", "fd00:ec2::254", "0.0.0.0", "::"].iter().filter_map(|a| a.parse::<IpAddr>().ok());
    let mut denied: Vec<IpAddr> = Vec::new();
    for addr in fixed.chain(host.filter(|a| !a.is_loopback())) {
        if !listed(addr) && !denied.contains(&addr) {
            denied.push(addr);
        }
    }
    denied.into_iter().map(|a| ConnectRule::new(a, 0)).collect()
}

/// Where events go: a JSON-lines file (or stdout) and the audit log, and, for denials, a
/// line on stderr.
struct EventSink {
    out: Option<Box<dyn Write + Send>>,
    show_denials: bool,
    error: Option<io::Error>,
}

impl EventSink {
    fn open(path: Option<&Path>, show_denials: bool, audit: Option<LineWriter>) -> Result<Self> {
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
        Ok(Self { out: audit_run::tee(out, audit), show_denials, error: None })
    }

    /// Hands one decoded event to the evaluator, or records it here.
    fn handle(
        &mut self,
        decoded: std::result::Result<Event, agt_jail_ebpf_loader::DecodeError>,
        evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>,
    ) {
        match decoded {
            Ok(event) => match evaluator {
                Some((evaluator, plan)) => govern::observe(evaluator, plan, &event),
                None => {
                    if let Err(err) = self.record(&event) {
                        self.error.get_or_insert(err);
                    }
                }
            },
            Err(err) => agt_jail_jail::stderr_line!("agt-jail: warning: undecodable event: {err}"),
        }
    }

    /// The end of a batch: its records reach the events file and the audit log.
    fn end_batch(&mut self, evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>) {
        match evaluator {
            Some((evaluator, _)) => evaluator.flush(),
            None => {
                if let Err(err) = self.flush() {
                    self.error.get_or_insert(err);
                }
            }
        }
    }

    fn record(&mut self, event: &Event) -> io::Result<()> {
        if self.show_denials && event.is_deny() {
            // One write per line: the command's own stderr shares the descriptor, and a
            // line split over several writes gets its output spliced into the middle.
            let line = format!("agt-jail: {}\n", describe_denial(event));
            let _ = io::stderr().lock().write_all(line.as_bytes());
        }
        self.record_value(event)
    }

    fn record_value(&mut self, value: &impl serde::Serialize) -> io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            // One write per line: the audit log takes whole lines.
            let mut line = serde_json::to_vec(value)?;
            line.push(b'\n');
            out.write_all(&line)?;
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

/// How often observations (fork, exec, exit, allowed network events) are read: at most
/// this late in the events file, and read in batches rather than one wake-up each, which on
/// an agent that forks and execs in a loop took as much CPU time as its own work. Deny and
/// kill records wake the reader at once.
const OBSERVATION_PERIOD: Duration = Duration::from_millis(10);

/// The kernel's drop counters, recorded when they move so that a gap in the records is
/// itself on record.
struct DropWatch {
    programs: Arc<Mutex<AgentPrograms>>,
    /// Events and denies dropped, as last recorded.
    seen: (u64, u64),
}

impl DropWatch {
    fn record(&mut self, sink: &mut EventSink, evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>) {
        let now = {
            let programs = lock(&self.programs);
            (programs.dropped_events().unwrap_or(self.seen.0), programs.dropped_denies().unwrap_or(self.seen.1))
        };
        if now == self.seen {
            return;
        }
        self.seen = now;
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let value = serde_json::json!({
            "event": "kernel_drops", "time": time.as_secs_f64(), "events_dropped": now.0, "denies_dropped": now.1,
        });
        match evaluator {
            Some((evaluator, _)) => evaluator.observe_raw(&value),
            None => {
                if let Err(err) = sink.record_value(&value) {
                    sink.error.get_or_insert(err);
                }
            }
        }
    }
}

/// Moves events from the ring buffer to the sink until told to stop, then drains
/// what is left, so nothing the command caused is lost. Each batch is flushed as it
/// ends: a record read from the kernel is in the file before the next batch is read.
fn pump_events(
    mut reader: EventReader,
    mut sink: EventSink,
    evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>,
    mut drops: DropWatch,
    stop: &AtomicBool,
) -> Result<()> {
    while !stop.load(Ordering::SeqCst) {
        reader
            .poll_denies(OBSERVATION_PERIOD, &mut |decoded| sink.handle(decoded, evaluator))
            .context("cannot poll the event ring buffer")?;
        drops.record(&mut sink, evaluator);
        sink.end_batch(evaluator);
    }
    reader.drain(&mut |decoded| sink.handle(decoded, evaluator));
    drops.record(&mut sink, evaluator);
    sink.end_batch(evaluator);
    if let Some(err) = sink.error.take() {
        bail!(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use agt_jail_jail::profile::Dest;

    use super::*;

    #[test]
    fn command_lines_the_exec_plane_cannot_read_are_refused() {
        let args =
            |n: usize, len: usize| -> Vec<std::ffi::OsString> { (0..n).map(|_| "x".repeat(len).into()).collect() };
        assert!(decidable(&args(exec_notify::MAX_ARGS, 1)).is_ok());
        let err = decidable(&args(exec_notify::MAX_ARGS + 1, 1)).unwrap_err().to_string();
        assert!(err.contains("this one has 4097 arguments"), "{err}");
        assert!(decidable(&args(2, exec_notify::MAX_ARGV_BYTES / 2 - 1)).is_ok());
        assert!(decidable(&args(2, exec_notify::MAX_ARGV_BYTES / 2)).is_err());
    }

    #[test]
    fn allowlist_denies_the_host_gateway_and_metadata_unless_listed() {
        let mut profile = Profile::builtin(2).unwrap();
        let host: Vec<IpAddr> =
            ["10.213.0.1", "192.0.2.2", "127.0.0.1", "::1", "192.0.2.2"].iter().map(|a| a.parse().unwrap()).collect();
        let denied = |profile: &Profile| -> Vec<IpAddr> {
            allowlist_denies(profile, host.iter().copied()).iter().map(|r| r.addr).collect()
        };
        let all = denied(&profile);
        for addr in ["10.213.0.1", "192.0.2.2", "169.254.169.254", "0.0.0.0", "::"] {
            assert!(all.contains(&addr.parse().unwrap()), "{addr}");
        }
        // The agent's loopback is its own (allowed below), and each address is one rule.
        assert!(!all.iter().any(IpAddr::is_loopback), "{all:?}");
        assert_eq!(all.len(), 6, "{all:?}");
        profile.allow_connect.push(Dest::parse("192.0.2.2:8080").unwrap());
        let listed = denied(&profile);
        assert!(!listed.contains(&"192.0.2.2".parse().unwrap()));
        assert!(listed.contains(&"10.213.0.1".parse().unwrap()));
        let own: Vec<(IpAddr, u8)> = own_loopback().iter().map(|d| (d.addr, d.prefix)).collect();
        assert!(own.contains(&("127.0.0.0".parse().unwrap(), 8)) && own.contains(&("::1".parse().unwrap(), 128)));
    }
}
