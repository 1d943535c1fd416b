//! One governed agent: what needs BPF programs (record mode, connect rules, allow-lists,
//! event records, audit logs and policies), set up around the jail's launch and taken down
//! after it.
//!
//! Order matters and is the point of this module: the cgroup exists and the BPF
//! programs are attached to it and know it *before* the command's first
//! instruction, so nothing it does escapes them. Cleanup runs on every path.
use std::{
    ffi::OsString,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use agt_jail_ebpf_loader::{AgentPrograms, AllowRule, ConnectRule, Event, EventReader, TaskFactsMap};
use agt_jail_jail::{cgroup::CgroupLayout, egress::PendingEgress, profile::Dest, AgentCgroup, NetMode, Profile};
use agt_jail_policy::plan::{Plan, Resolved};
use agt_jail_supervisor::{
    evaluator::Evaluator,
    exec_notify::{self, ExecNotifier, KernelTask, NotifierOptions, TaskSource},
};
use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    audit_run::AuditRun,
    govern::{self, lock},
    pinned_run::{self, PinnedRun, RunMeta},
    resolver::{self, Names, Resolver, ResolverSetup},
    RunOptions,
};

/// Host paths shown read-only inside the jail and variables set for the command, added by
/// what governs it (the identity socket), and the agent's resolv.conf when agt-jail serves
/// its resolver.
#[derive(Debug, Default)]
pub struct JailAdditions {
    pub ro: Vec<PathBuf>,
    pub env: Vec<(OsString, OsString)>,
    pub resolv_conf: Option<PathBuf>,
}

/// Everything that governs one run beyond the jail, in the order it was set up. The
/// launcher calls [`Agent::attach`] once the agent's cgroup exists and before the command
/// starts, [`Agent::started`] once it runs, [`Agent::ended`] when it has ended and
/// [`Agent::finish`] once its cgroup is gone.
pub struct Agent {
    opts: RunOptions,
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
    /// The rings and counters of an audited run, pinned until its log holds what they hold.
    pinned: Option<PinnedRun>,
    /// Where the event pump writes (without a policy; the evaluator writes otherwise):
    /// shared with the resolver, whose records are written before its answers leave.
    sink: Option<Arc<Mutex<EventSink>>>,
    /// The agent's resolver (allowlist mode with egress).
    resolver: Option<Resolver>,
    /// Under a policy where the resolver is served: the policy's domains and the addresses
    /// the resolver opened for them, which the plan's `net.domain` classes are made of.
    learned: Option<(Vec<String>, Arc<Mutex<Resolved>>)>,
    /// The host's addresses as the allow-list's denies were made from them (allowlist
    /// mode): the resolver never opens them either.
    host_addrs: Vec<IpAddr>,
}

impl Agent {
    /// The policy loads (and fails with its located error) before anything is created.
    pub fn new(opts: RunOptions, profile: &Profile) -> Result<Self> {
        let args = &opts;
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
        if audit.is_some() && !args.quiet {
            // Runs killed before they could close their logs are recovered on request only.
            if let Some(warning) = pinned_run::orphaned().ok().as_deref().and_then(pinned_run::orphan_warning) {
                agt_jail_jail::stderr_line!("agt-jail: warning: {warning}");
            }
        }
        Ok(Self {
            opts,
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
            pinned: None,
            sink: None,
            resolver: None,
            learned: None,
            host_addrs: Vec::new(),
        })
    }

    /// The BPF programs for the agent's cgroup, with the policy's tables, connect rules
    /// and allow-list installed, attached before the agent exists.
    fn load_programs(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        egress: Option<&mut PendingEgress>,
        dns: bool,
    ) -> Result<Option<Plan>> {
        let args = &self.opts;
        // Loading the BPF object costs ~90 ms per run: only for the runs that need it.
        let allowlist = profile.confine && profile.net == NetMode::Allowlist;
        if !args.needs_bpf(profile) {
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
                (&self.domain_resolver(), self.learned.is_some()),
            )?;
            govern::install_plan(&mut programs, agent_id, &compiled)?;
            if let Some(exec_lsm) = exec_lsm {
                self.tier_a = Some(govern::arm_tier_a(&mut programs, agent_id, exec_lsm, &compiled)?);
            }
            plan = Some(compiled);
        }
        let mut rules: Vec<ConnectRule> =
            args.deny_connect.iter().map(|&(addr, port)| ConnectRule::new(addr, port)).collect();
        let mut gateway = None;
        if profile.confine && profile.net == NetMode::Allowlist {
            // The agent's network is made meanwhile (it exists before the agent does; a
            // failed setup fails the run when it is joined, so no gateway is fine here).
            gateway = egress.and_then(PendingEgress::gateway).map(IpAddr::V4);
            self.host_addrs = agt_jail_jail::host::interface_addresses().context("cannot list the host's addresses")?;
            let served = if dns { gateway } else { None };
            rules.extend(allowlist_denies(profile, gateway.iter().chain(&self.host_addrs).copied(), served));
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
            // The agent's resolver: UDP and TCP to gateway:53, its only way to DNS.
            if let (true, Some(gateway)) = (dns, gateway) {
                let rule = AllowRule::host(gateway, resolver::DNS_PORT);
                programs.allow_connect(agent_id, rule).context("cannot allow the agent's resolver")?;
            }
            programs.enable_connect_allowlist(agent_id).context("cannot enable the connect allow-list")?;
        }
        if let Some(audit) = self.audit.as_ref() {
            self.pinned = Some(self.pin_run(&mut programs, audit, cgroup)?);
        }
        programs.attach_cgroup(cgroup.dir()).context("cannot govern the agent's cgroup")?;
        self.task_facts = programs.take_task_facts().map(|map| Arc::new(KernelTasks(map)));
        self.programs = Some(Arc::new(Mutex::new(programs)));
        Ok(plan)
    }

    /// An audited run's rings and counters, pinned before the agent exists: what the
    /// kernel queued outlives a kill -9 of this process, for `agt-jail audit recover`.
    fn pin_run(&self, programs: &mut AgentPrograms, audit: &AuditRun, cgroup: &AgentCgroup) -> Result<PinnedRun> {
        let args = &self.opts;
        let log = args.audit.file.as_deref().context("an audit run without a file")?;
        let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let pid = std::process::id();
        let meta = RunMeta {
            id: format!("exec-{pid}-{}", cgroup.id()),
            audit: absolute(log),
            audit_key: absolute(&args.audit.key),
            agent: self.policy.as_ref().map(|loaded| loaded.agent.id.clone()),
            did: audit.did().to_string(),
            policy: audit.policy().to_string(),
            cgroup: cgroup.path().to_path_buf(),
            cgroup_id: cgroup.id(),
            pid,
            pid_start: pinned_run::start_time(pid).context("cannot read this process's start time")?,
            governed: self.policy.is_some(),
            created_ms: agt_jail_audit::writer::now_ms(),
        };
        PinnedRun::create(programs, meta)
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
        let args = &self.opts;
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
            // The policy the kernel tables are compiled from: a reload replaces it.
            let policy = Arc::new(Mutex::new(set));
            *lock(&governance.actuator.on_demote) = Some(govern::demoter(
                Arc::clone(programs),
                cgroup.id(),
                Arc::clone(&policy),
                Arc::clone(&governance.plan),
                profile.confine,
                self.tier_a.is_some(),
                self.domain_resolver(),
            ));
            *lock(&governance.actuator.on_reload) = Some(govern::replanner(
                Arc::clone(programs),
                cgroup.id(),
                policy,
                Arc::clone(&governance.plan),
                profile.confine,
                self.tier_a.is_some(),
                args.policy.strict,
                self.domain_resolver(),
            ));
        }
        if !args.quiet {
            agt_jail_jail::stderr_line!("agt-jail: agent {name} is under policy (agt-jail status --agent {name})");
        }
        let domains = agt_jail_policy::plan::domains(&domain_set);
        // Where the agent's resolver is served, its answers feed the plan's domains instead.
        let polled = self.learned.is_none();
        if !polled && args.policy.dns_refresh.is_some() {
            bail!(
                "--dns-refresh polls the host's resolver (ring 0 and --net host); in network mode allowlist the \
                 agent's own resolver feeds the policy's domains from its answers (docs/dns-egress.md)"
            );
        }
        let refresh = args.policy.dns_refresh.unwrap_or(DNS_REFRESH_SECS);
        if polled && refresh > 0 && !domains.is_empty() && lock(&governance.actuator.on_demote).is_some() {
            let (actuator, evaluator) = (Arc::clone(&governance.actuator), Arc::clone(&governance.evaluator));
            self.dns_thread = Some(
                govern::follow_domains(
                    domains,
                    Duration::from_secs(refresh),
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
                self.opts.events.as_deref(),
                !self.opts.quiet,
                self.audit.as_ref().map(AuditRun::writer),
            )?,
        };
        let sink = Arc::new(Mutex::new(sink));
        self.sink = Some(Arc::clone(&sink));
        let reader = lock(programs).take_events().context("event reader already taken")?;
        let stop = Arc::clone(&self.pump_stop);
        let drops = DropWatch { programs: Arc::clone(programs), seen: (0, 0) };
        self.pump = Some(
            thread::Builder::new()
                .name("events".into())
                .spawn(move || pump_events(reader, &sink, evaluator.as_ref().map(|(e, p)| (e, &**p)), drops, &stop))
                .context("cannot start the event thread")?,
        );
        Ok(())
    }

    /// Where the plan's domains get their addresses: the resolver's answers when it
    /// feeds them, the host's resolver otherwise.
    fn domain_resolver(&self) -> govern::DomainResolver {
        let Some((_, learned)) = self.learned.as_ref() else { return govern::host_resolver() };
        let learned = Arc::clone(learned);
        Arc::new(move |domains: &[String]| {
            let learned = lock(&learned);
            domains.iter().map(|d| (d.clone(), learned.get(d).cloned().unwrap_or_default())).collect()
        })
    }

    /// Whether the agent gets agt-jail's resolver, and its upstream: in allowlist mode
    /// with a routed path out. Without an upstream (no `--dns-upstream`, no nameserver in
    /// the host's resolv.conf) a run that allows names is refused; one that allows none
    /// keeps the agent without DNS.
    fn dns_upstream(&self, profile: &Profile, egress: bool) -> Result<Option<SocketAddr>> {
        let served = egress && profile.confine && profile.net == NetMode::Allowlist;
        if !served {
            if self.opts.dns_upstream.is_some() {
                bail!(
                    "--dns-upstream cannot be honoured: the agent's resolver is served in network mode allowlist \
                     (rings 1-2, as root) only, and this run's mode is {}",
                    profile.net.name()
                );
            }
            return Ok(None);
        }
        // Without names nothing was promised: a host where the resolver has no upstream or
        // cannot be named in the jail's /etc keeps the agent without DNS, as before.
        if let Err(reason) = agt_jail_jail::launch::resolv_conf_placeable(profile) {
            if profile.allow_names.is_empty() {
                return Ok(None);
            }
            bail!("names in the allow-list cannot be honoured: {reason}");
        }
        match resolver::upstream(self.opts.dns_upstream) {
            Ok(upstream) => Ok(Some(upstream)),
            Err(_) if profile.allow_names.is_empty() => Ok(None),
            Err(err) => Err(err.context("the agent's resolver has no upstream for the names it allows")),
        }
    }

    /// The agent's resolver on its gateway, recording into the events file (or through
    /// the evaluator) and the audit log.
    fn start_resolver(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        gateway: Ipv4Addr,
        upstream: SocketAddr,
    ) -> Result<()> {
        let Some(programs) = self.programs.as_ref() else { return Ok(()) };
        let record: resolver::RecordFn = match (self.governance.as_ref(), self.sink.as_ref()) {
            (Some(governance), _) => {
                let evaluator = Arc::clone(&governance.evaluator);
                Arc::new(move |value| {
                    evaluator.observe_raw(value);
                    evaluator.flush();
                })
            }
            (None, Some(sink)) => {
                let sink = Arc::clone(sink);
                Arc::new(move |value| {
                    let mut sink = lock(&sink);
                    let written = sink.record_value(value).and_then(|()| sink.flush());
                    if let Err(err) = written {
                        sink.error.get_or_insert(err);
                    }
                })
            }
            (None, None) => Arc::new(|_| {}),
        };
        let pinned: Vec<AllowRule> = profile
            .allow_connect
            .iter()
            .map(|dest| AllowRule { addr: dest.addr, prefix: dest.prefix, port: dest.port })
            .collect();
        let mut never: Vec<IpAddr> =
            allowlist_denies(profile, self.host_addrs.iter().copied(), None).iter().map(|r| r.addr).collect();
        never.push(IpAddr::V4(gateway));
        let feed = match (self.learned.as_ref(), self.governance.as_ref()) {
            (Some((domains, learned)), Some(governance)) => {
                let (actuator, evaluator) = (Arc::clone(&governance.actuator), Arc::clone(&governance.evaluator));
                let replan: Arc<dyn Fn() -> io::Result<()> + Send + Sync> =
                    Arc::new(move || match lock(&actuator.on_demote).as_mut() {
                        Some(replan) => replan(&evaluator.agent()),
                        None => Ok(()),
                    });
                Some(resolver::Feed::new(domains, Arc::clone(learned), replan))
            }
            _ => None,
        };
        let policy_domains = self.learned.as_ref().map(|(domains, _)| domains.clone()).unwrap_or_default();
        let began = std::time::Instant::now();
        let started = Resolver::start(ResolverSetup {
            programs: Arc::clone(programs),
            agent_id: cgroup.id(),
            agent: self
                .governance
                .as_ref()
                .map(|g| g.evaluator.agent().id.clone())
                .unwrap_or_else(|| cgroup.id().to_string()),
            gateway,
            upstream,
            allow: resolver::allow_set(&profile.allow_names, &policy_domains),
            pinned: &pinned,
            never,
            record,
            show_denials: !self.opts.quiet,
            feed,
        })?;
        if std::env::var_os("AGT_JAIL_DEBUG").is_some() {
            agt_jail_jail::stderr_line!(
                "agt-jail: debug: the agent's resolver on {}:53 started in {} µs",
                gateway,
                began.elapsed().as_micros()
            );
        }
        if let Some(sink) = self.sink.as_ref() {
            lock(sink).names = Some(Arc::clone(started.names()));
        }
        self.resolver = Some(started);
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
        // Where no Landlock holds a ring to its entry command, this plane holds it too
        // (the same check the launch makes; the jail gets this plane's listener then).
        let entry_only =
            profile.confine && agt_jail_jail::launch::check_enforcement(profile).is_ok_and(|e| e.entry_exec_plane);
        let options = NotifierOptions {
            tasks: self.task_facts.clone().map(|tasks| tasks as Arc<dyn TaskSource>),
            fixed_root: profile.confine,
            entry_only,
        };
        let notifier = ExecNotifier::start_with_options(OwnedFd::from(ours), decider.clone(), options, |err| {
            if matches!(err, exec_notify::NotifyError::AfterEntry { .. }) {
                agt_jail_jail::stderr_line!("agt-jail: denied the {err}");
            } else {
                agt_jail_jail::stderr_line!("agt-jail: denied an exec that could not be decided: {err}");
            }
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

impl Agent {
    /// Loads and attaches what governs the agent, once its cgroup exists with its limits
    /// and before the command starts. `egress`: the agent's routed path out (allowlist
    /// mode), still being made; its gateway is waited for only when the rules go in.
    pub fn attach(
        &mut self,
        cgroup: &AgentCgroup,
        profile: &Profile,
        program: &Path,
        mut egress: Option<&mut PendingEgress>,
    ) -> Result<()> {
        let upstream = self.dns_upstream(profile, egress.is_some())?;
        if let (Some(_), Some(loaded)) = (upstream, self.policy.as_ref()) {
            let domains = agt_jail_policy::plan::domains(&loaded.set);
            let learned = Arc::new(Mutex::new(resolver::initial(&domains)));
            self.learned = Some((domains, learned));
        }
        let plan = self.load_programs(cgroup, profile, egress.as_deref_mut(), upstream.is_some())?;
        self.start_governance(cgroup, profile, program, plan)?;
        self.start_pump()?;
        // The network's setup has been joined by now (the connect rules needed its gateway);
        // when it failed there is no resolver to serve, and the launch fails on that error.
        if let (Some(upstream), Some(gateway)) = (upstream, egress.and_then(PendingEgress::gateway)) {
            self.start_resolver(cgroup, profile, gateway, upstream)?;
        }
        self.start_exec_plane(profile)
    }

    /// The agent's end of the exec listener socket (the seccomp user-notification plane).
    pub fn exec_listener(&self) -> Option<RawFd> {
        self.listener_socket.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The agent's identity socket: its directory shown read-only in the jail, its path announced.
    pub fn jail_additions(&self) -> JailAdditions {
        let resolv_conf = self.resolver.as_ref().map(|r| r.resolv_conf().to_path_buf());
        let Some(governance) = self.governance.as_ref() else {
            return JailAdditions { resolv_conf, ..Default::default() };
        };
        let socket = &governance.identity_socket;
        JailAdditions {
            ro: vec![socket.dir().to_path_buf()],
            env: vec![(agt_jail_supervisor::identity_socket::SOCKET_ENV.into(), socket.path().as_os_str().to_owned())],
            resolv_conf,
        }
    }

    /// Whether the policy refused the entry command's own exec.
    pub fn entry_denied(&self) -> bool {
        self.exec_plane.as_ref().is_some_and(|(_, decider)| decider.entry_denied())
    }

    /// The command started and holds what it needs; agt-jail lets go of its copies.
    pub fn started(&mut self) {
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

    /// The command ended: stop deciding, before its cgroup goes.
    pub fn ended(&mut self) {
        // The resolver's last records reach the sink before the pump drains it.
        // Stopped here, while the agent's namespace (and so the gateway the resolver's
        // threads are woken through) still exists: the run drops it after `ended`.
        if let Some(mut resolver) = self.resolver.take() {
            let began = std::time::Instant::now();
            resolver.stop();
            if std::env::var_os("AGT_JAIL_DEBUG").is_some() {
                agt_jail_jail::stderr_line!(
                    "agt-jail: debug: the agent's resolver's stop took {} µs on the run's path",
                    began.elapsed().as_micros()
                );
            }
        }
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
    pub fn finish(mut self) -> Result<()> {
        self.ended();
        let (mut drops, mut deny_drops) = (0, 0);
        if let Some(programs) = self.programs.as_ref() {
            let programs = lock(programs);
            drops = programs.dropped_events().unwrap_or(0);
            deny_drops = programs.dropped_denies().unwrap_or(0);
        }
        drop(self.tier_a.take());
        self.pump_stop.store(true, Ordering::SeqCst);
        // Until the log holds what the rings held and is closed, the pins stay (a failure
        // here leaves them for `agt-jail audit recover`).
        let mut pinned = self.pinned.take();
        let result = self.write_out();
        if result.is_err() {
            if let Some(pinned) = pinned.as_mut() {
                pinned.keep();
                if let Some(audit) = self.audit.as_mut() {
                    audit.abandon();
                }
            }
        }
        drop(pinned);
        result?;
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

impl Agent {
    /// The end of the pump and of the log: everything read is written, the log closed.
    fn write_out(&mut self) -> Result<()> {
        if let Some(pump) = self.pump.take() {
            pump.join().map_err(|_| anyhow::anyhow!("event thread panicked"))?.context("cannot write events")?;
        }
        // The evaluator's records never wait on the file; a failed write is reported here.
        if let Some(err) = self.governance.as_ref().and_then(|g| g.evaluator.take_record_error()) {
            bail!("cannot write records (events file or audit log): {err}");
        }
        if let Some(audit) = self.audit.as_mut() {
            audit.close()?;
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
///
/// `resolver`: the gateway when it serves the agent's resolver on port 53. A deny of
/// every port would win over that one allowed port (the deny list is decided first), so
/// the gateway is then denied on each port a listed network could open it to instead:
/// allow-list entries always name a port, and names never open the gateway (the
/// resolver's sink refuses it), so no other port of it can be allowed.
fn allowlist_denies(
    profile: &Profile,
    host: impl Iterator<Item = IpAddr>,
    resolver: Option<IpAddr>,
) -> Vec<ConnectRule> {
    let listed = |addr: IpAddr| {
        let host_prefix = if addr.is_ipv4() { 32 } else { 128 };
        profile.allow_connect.iter().any(|d| d.addr == addr && d.prefix == host_prefix)
    };
    let fixed = ["169.254.169.254", "fd00:ec2::254", "0.0.0.0", "::"].iter().filter_map(|a| a.parse::<IpAddr>().ok());
    let mut denied: Vec<IpAddr> = Vec::new();
    for addr in fixed.chain(host.filter(|a| !a.is_loopback())) {
        if !listed(addr) && !denied.contains(&addr) && Some(addr) != resolver {
            denied.push(addr);
        }
    }
    let mut rules: Vec<ConnectRule> = denied.into_iter().map(|a| ConnectRule::new(a, 0)).collect();
    if let Some(gateway) = resolver.filter(|gw| !listed(*gw)) {
        let mut ports: Vec<u16> = profile
            .allow_connect
            .iter()
            .filter(|dest| covers(dest, gateway) && dest.port != resolver::DNS_PORT)
            .map(|dest| dest.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        rules.extend(ports.into_iter().map(|port| ConnectRule::new(gateway, port)));
    }
    rules
}

/// Whether the allow-list entry `dest` contains `addr` (an IPv4 address also as its
/// IPv4-mapped IPv6 form).
fn covers(dest: &Dest, addr: IpAddr) -> bool {
    let bits = |ip: IpAddr| -> (u128, u8) {
        match ip {
            IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 96),
            IpAddr::V6(v6) => (u128::from(v6), 0),
        }
    };
    let ((net, offset), (host, _)) = (bits(dest.addr), bits(addr));
    let prefix = u32::from(dest.prefix + offset);
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix.min(128)) };
    net & mask == host & mask
}

/// Where events go: a JSON-lines file (or stdout) and the audit log, and, for denials, a
/// line on stderr.
struct EventSink {
    out: Option<Box<dyn Write + Send>>,
    show_denials: bool,
    error: Option<io::Error>,
    /// The resolver's names: records of network events to their addresses carry them.
    names: Option<Names>,
}

impl EventSink {
    fn open(path: Option<&Path>, show_denials: bool, audit: Option<crate::audit_run::AuditLines>) -> Result<Self> {
        Ok(Self { out: govern::records_out(path, audit)?, show_denials, error: None, names: None })
    }

    /// Hands one decoded event to the evaluator, or records it here.
    fn handle(
        &mut self,
        decoded: std::result::Result<Event, agt_jail_ebpf_loader::DecodeError>,
        evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>,
    ) {
        match decoded {
            Ok(event) => match evaluator {
                Some((evaluator, plan)) => {
                    let names = self.names.as_ref();
                    crate::plane::observe(evaluator, plan, &event, &|addr| {
                        names.and_then(|n| resolver::names_of(n, addr))
                    })
                }
                None => {
                    if let Err(err) = self.record(&event) {
                        self.error.get_or_insert(err);
                    }
                }
            },
            Err(err) => agt_jail_jail::stderr_line!("agt-jail: warning: undecodable event: {err}"),
        }
    }

    /// The end of a batch: its records reach the events file and the audit log (write(2)).
    /// Returns whether every record so far was written.
    fn end_batch(&mut self, evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>) -> bool {
        match evaluator {
            Some((evaluator, _)) => {
                evaluator.flush();
                !evaluator.record_error_pending()
            }
            None => {
                if let Err(err) = self.flush() {
                    self.error.get_or_insert(err);
                }
                self.error.is_none()
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
        let addr = match event {
            Event::Connect { addr, .. } => Some(*addr),
            Event::Sendmsg { net, .. } => Some(net.addr),
            _ => None,
        };
        let name = addr.zip(self.names.as_ref()).and_then(|(addr, names)| resolver::names_of(names, addr));
        match (name, serde_json::to_value(event)) {
            (Some(name), Ok(Value::Object(mut map))) => {
                map.insert("domain".into(), Value::String(name));
                self.record_value(&Value::Object(map))
            }
            _ => self.record_value(event),
        }
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

/// Ring records read per batch at most: a batch's records are written (one write) before
/// the kernel gets their space back, and must fit the record sink's buffer, which writes
/// early when it grows beyond 1 MiB (an evaluator record is well under 2 KiB). Records
/// written before a kill -9 and not yet given back are read again by `audit recover`.
const BATCH_RECORDS: usize = 512;

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
        if let Some((evaluator, _)) = evaluator {
            evaluator.metrics().kernel_drops(now.0, now.1);
        }
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

/// `--dns-refresh` when not given.
const DNS_REFRESH_SECS: u64 = 30;

/// Moves events from the ring buffer to the sink until told to stop, then drains
/// what is left, so nothing the command caused is lost. Each batch is flushed as it
/// ends: a record read from the kernel is in the file before the next batch is read,
/// and only then does the kernel get its space back (`commit`): a kill -9 of this
/// process leaves what was not written in the (pinned) rings. After a failed write
/// nothing more is committed.
fn pump_events(
    mut reader: EventReader,
    sink: &Mutex<EventSink>,
    evaluator: Option<(&Arc<Evaluator>, &Mutex<Option<Plan>>)>,
    mut drops: DropWatch,
    stop: &AtomicBool,
) -> Result<()> {
    reader.commit_manually();
    reader.set_batch_max(BATCH_RECORDS);
    // Once a commit fails nothing more is given back (the pinned rings keep it).
    let mut commit_failed = false;
    let commit = |reader: &mut EventReader| match reader.commit() {
        Ok(()) => false,
        Err(err) => {
            agt_jail_jail::stderr_line!("agt-jail: {err}");
            true
        }
    };
    // The sink is locked per event and per batch end, never while waiting for the kernel:
    // the resolver writes its records there too, before each answer.
    while !stop.load(Ordering::SeqCst) {
        reader
            .poll_denies(OBSERVATION_PERIOD, &mut |decoded| lock(sink).handle(decoded, evaluator))
            .context("cannot poll the event ring buffer")?;
        let mut sink = lock(sink);
        drops.record(&mut sink, evaluator);
        if sink.end_batch(evaluator) && !commit_failed {
            commit_failed = commit(&mut reader);
        }
    }
    // What is left, a batch at a time.
    loop {
        let read = reader.drain(&mut |decoded| lock(sink).handle(decoded, evaluator));
        let mut sink = lock(sink);
        drops.record(&mut sink, evaluator);
        if sink.end_batch(evaluator) && !commit_failed {
            commit_failed = commit(&mut reader);
        }
        if read < BATCH_RECORDS {
            break;
        }
    }
    if commit_failed {
        bail!("cannot keep the count of deny summary records written; the rest stays in the kernel's rings");
    }
    if let Some(err) = lock(sink).error.take() {
        bail!(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use agt_jail_jail::profile::Dest;

    use super::*;

    fn policy_file(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("policy.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const ALLOW_ALL: &str = "apiVersion: governance.toolkit/v1\nname: p\nagents: ['*']\ndefault_action: allow\n";

    fn governed(dir: &Path, policy: &str) -> RunOptions {
        RunOptions {
            command: vec!["/bin/true".into()],
            quiet: true,
            policy: crate::PolicyOptions {
                policy: vec![policy_file(dir, policy)],
                trust: 500,
                approval_timeout: 5,
                token_ttl: 300,
                trust_domain: "agt-jail.local".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_policy_that_does_not_load_fails_the_run_with_its_located_error() {
        let dir = tempfile::tempdir().unwrap();
        let opts = governed(dir.path(), "apiVersion: governance.toolkit/v1\nname: p\nrules: [\n");
        let err = Agent::new(opts, &Profile::builtin(2).unwrap()).err().unwrap().to_string();
        assert!(err.contains("policy.yaml:"), "{err}");
    }

    #[test]
    fn a_command_line_the_exec_plane_cannot_read_is_refused_under_a_policy_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = governed(dir.path(), ALLOW_ALL);
        opts.command = (0..exec_notify::MAX_ARGS + 1).map(|_| "x".into()).collect();
        assert!(Agent::new(opts.clone(), &Profile::builtin(2).unwrap()).is_err());
        opts.policy.policy.clear();
        assert!(Agent::new(opts, &Profile::builtin(2).unwrap()).is_ok());
    }

    #[test]
    fn an_agent_that_never_attached_finishes_and_closes_its_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = governed(dir.path(), ALLOW_ALL);
        opts.audit = crate::AuditOptions {
            file: Some(dir.path().join("run.audit")),
            key: dir.path().join("key"),
            sync: "batch".into(),
            checkpoint_every: 1000,
            checkpoint_secs: 60,
            rotate: None,
        };
        let profile = Profile::builtin(3).unwrap();
        assert!(opts.needs_bpf(&profile), "an audit log is written from the kernel's events");
        let agent = Agent::new(opts, &profile).unwrap();
        assert!(agent.exec_listener().is_none() && !agent.entry_denied());
        assert!(agent.jail_additions().ro.is_empty(), "no identity socket before attach");
        agent.finish().unwrap();
        let log = std::fs::read_to_string(dir.path().join("run.audit")).unwrap();
        let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
        assert_eq!(last["checkpoint"]["reason"], "close", "the closing checkpoint is written: {log}");
    }

    #[test]
    fn runs_need_bpf_programs_for_what_only_they_enforce_or_record() {
        let ring3 = Profile::builtin(3).unwrap();
        let plain = RunOptions::default();
        assert!(!plain.needs_bpf(&ring3), "the jail alone enforces ring 3");
        assert!(plain.needs_bpf(&Profile::builtin(0).unwrap()), "record mode is observed");
        let events = RunOptions { events: Some("-".into()), ..RunOptions::default() };
        assert!(events.needs_bpf(&ring3));
        let deny = RunOptions { deny_connect: vec![("10.0.0.1".parse().unwrap(), 0)], ..RunOptions::default() };
        assert!(deny.needs_bpf(&ring3));
    }

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
    fn a_gateway_serving_the_resolver_is_denied_on_every_port_a_network_could_open_but_53() {
        let mut profile = Profile::builtin(2).unwrap();
        for entry in ["0.0.0.0/0:443", "10.213.0.0/16:8080", "10.0.0.0/8:53", "192.0.2.0/24:22", "0.0.0.0/0:443"] {
            profile.allow_connect.push(Dest::parse(entry).unwrap());
        }
        let gateway: IpAddr = "10.213.0.1".parse().unwrap();
        let host = [gateway, "192.0.2.2".parse().unwrap()];
        let rules = allowlist_denies(&profile, host.iter().copied(), Some(gateway));
        let on_gateway: Vec<u16> = rules.iter().filter(|r| r.addr == gateway).map(|r| r.port).collect();
        assert_eq!(on_gateway, vec![443, 8080], "no deny of every port, none of 53, none for 22 (not covered)");
        assert!(rules.iter().any(|r| r.addr == "192.0.2.2".parse::<IpAddr>().unwrap() && r.port == 0));
        // Without the resolver the gateway is denied on every port, as before.
        let rules = allowlist_denies(&profile, host.iter().copied(), None);
        let on_gateway: Vec<u16> = rules.iter().filter(|r| r.addr == gateway).map(|r| r.port).collect();
        assert_eq!(on_gateway, vec![0]);
    }

    #[test]
    fn allowlist_denies_the_host_gateway_and_metadata_unless_listed() {
        let mut profile = Profile::builtin(2).unwrap();
        let host: Vec<IpAddr> =
            ["10.213.0.1", "192.0.2.2", "127.0.0.1", "::1", "192.0.2.2"].iter().map(|a| a.parse().unwrap()).collect();
        let denied = |profile: &Profile| -> Vec<IpAddr> {
            allowlist_denies(profile, host.iter().copied(), None).iter().map(|r| r.addr).collect()
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
        assert!(covers(&Dest::parse("0.0.0.0/0:443").unwrap(), "10.213.0.1".parse().unwrap()));
        assert!(covers(&Dest::parse("[::ffff:10.213.0.0/112]:443").unwrap(), "10.213.0.1".parse().unwrap()));
        assert!(!covers(&Dest::parse("10.213.1.0/24:443").unwrap(), "10.213.0.1".parse().unwrap()));
        assert!(own.contains(&("127.0.0.0".parse().unwrap(), 8)) && own.contains(&("::1".parse().unwrap(), 128)));
    }
}
