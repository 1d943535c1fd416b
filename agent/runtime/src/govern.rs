//! The policy governs the running agent: the evaluator, its effects and the kernel planes.
//!
//! What the policy says is compiled into the planes this host has (see `policy
//! explain`): network rules into the cgroup BPF tables, exec rules onto the seccomp
//! user-notification path, file rules onto fanotify permission events in a confined
//! ring; the evaluator answers what is held and records every decision.
use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
};

use agt_jail_ebpf_loader::{
    lsm::{self, ExecIdentity, ExecLsm, FileLsm, GuardLsm},
    AgentPrograms,
};
use agt_jail_policy::{
    context::AgentFacts,
    plan::{self, HostCaps, Plan, Resolved},
    PolicySet,
};
use agt_jail_supervisor::{
    control::{self, ControlServer, IdentityView},
    evaluator::{Actuator, Evaluator, EvaluatorConfig, PolicySnapshot, RecordSink, TrustRules},
    fanotify::{FanotifyError, FileGuard, FileGuardHandle, FileGuardOptions},
    identity::{self, AgentIdentity},
    identity_socket::{IdentityFacts, IdentitySocket, IDENTITY_DIR},
    trust::TrustSection,
    Answer, Decider, FileIdentity, Reply, Request,
};
use anyhow::{anyhow, bail, Context, Result};

use crate::{
    audit_run,
    plane::{ExecPlane, FilePlane, GuardPlane, NetPlane, Plane},
    PolicyOptions,
};

/// Locks shared state, recovering it from a panicked holder (cleanup must still run).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 16 random bytes as hex (session ids).
fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A fresh DID for an agent.
pub fn new_did() -> Result<String> {
    Ok(format!("did:mesh:{}", random_hex()?))
}

/// A loaded policy and the agent it governs.
pub struct Loaded {
    pub set: Arc<PolicySet>,
    pub agent: AgentFacts,
    /// The agent's key pair (its DID is derived from it).
    pub identity: Arc<AgentIdentity>,
    /// SHA-256 of the policy files.
    pub policy_hash: String,
    /// How trust moves: the policy's `trust:` section under the command-line flags.
    pub trust: TrustRules,
}

/// Loads the policies, makes the agent's key pair and names the agent by it. Errors are
/// the policy's own located errors.
pub fn load(args: &PolicyOptions, ring: u8) -> Result<Loaded> {
    let set = PolicySet::load(&args.policy).map_err(|e| anyhow!("{e}"))?;
    let policy_hash = identity::policy_hash(&args.policy)?;
    let name = args.agent.clone().unwrap_or_else(|| format!("agent-{}", std::process::id()));
    control::check_name(&name).map_err(|e| anyhow!("--agent: {e}"))?;
    let ttl = std::time::Duration::from_secs(args.token_ttl);
    let identity = AgentIdentity::generate(&name, &args.trust_domain, ttl).map_err(|e| anyhow!("{e}"))?;
    let agent = AgentFacts::new(name, identity.did(), ring, args.trust, random_hex()?);
    let trust = trust_rules(args, &set)?;
    Ok(Loaded { set: Arc::new(set), agent, identity: Arc::new(identity), policy_hash, trust })
}

/// A warning found while loading a policy, located as `policy lint` prints it.
pub fn load_warning(warning: &agt_jail_policy::LoadError) -> String {
    format!("{}:{}:{}: warning: {}", warning.file, warning.line, warning.col, warning.message)
}

/// The trust rules: defaults, then the policy's `trust:` section (one policy may have
/// one), then `--deny-penalty` and `--kill-below`.
pub fn trust_rules(args: &PolicyOptions, set: &PolicySet) -> Result<TrustRules> {
    let mut rules = TrustRules::default();
    let mut sections = set.trust_sections();
    if let Some((file, section)) = sections.next() {
        if let Some((other, _)) = sections.next() {
            bail!("{other}: trust: a trust section is already given in {file}; give it in one policy only");
        }
        rules = TrustSection::parse(file, section)?.apply(rules);
    }
    rules.penalty = args.deny_penalty.unwrap_or(rules.penalty);
    rules.kill_below = args.kill_below.unwrap_or(rules.kill_below);
    Ok(rules)
}

/// Charges trust decay once a second until dropped.
pub struct DecayTicker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DecayTicker {
    fn start(evaluator: Arc<Evaluator>) -> io::Result<DecayTicker> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("trust-decay".into()).spawn(move || {
            let step = std::time::Duration::from_millis(100);
            let mut waited = std::time::Duration::ZERO;
            while !stopping.load(Ordering::SeqCst) {
                std::thread::sleep(step);
                waited += step;
                if waited >= std::time::Duration::from_secs(1) {
                    waited = std::time::Duration::ZERO;
                    evaluator.decay_trust(std::time::Instant::now());
                }
            }
        })?;
        Ok(DecayTicker { stop, thread: Some(thread) })
    }
}

impl Drop for DecayTicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Tightens the kernel planes to a lower ring.
pub type Tighten = Box<dyn FnMut(&AgentFacts) -> io::Result<()> + Send>;
/// Compiles a reloaded policy for the agent as it is now and installs its kernel tables;
/// on error nothing in the kernel changed.
pub type Replan = Box<dyn FnMut(&AgentFacts, &Arc<PolicySet>) -> io::Result<()> + Send>;
/// Work done once, when the entry command's execve is held (after the jail's set-up,
/// before any agent code).
pub type ArmHook = Box<dyn FnOnce() -> io::Result<()> + Send>;
/// Hands an approved exec to the kernel's exec hook (Tier A).
pub type ApproveExec = Box<dyn FnMut(u32, FileIdentity) -> io::Result<()> + Send>;

/// The host side of the evaluator's effects for `agt-jail exec`.
pub struct HostActuator {
    /// `cgroup.kill` of the agent's cgroup.
    pub kill_file: Option<PathBuf>,
    /// Re-plans the kernel planes for the agent as it is now: on demotion and when the
    /// policy's domains resolve differently (set once the BPF programs exist).
    pub on_demote: Mutex<Option<Tighten>>,
    /// Installs a reloaded policy's kernel tables (set once the BPF programs exist).
    pub on_reload: Mutex<Option<Replan>>,
    /// The file plane's cache (set once the fanotify guard runs).
    pub file_cache: Mutex<Option<Box<dyn FileCache>>>,
    /// Tier A: the exec hook's approval map.
    pub exec_approvals: Mutex<Option<ApproveExec>>,
    /// Tier A: the guard hooks, turned on when the entry command's execve is held.
    pub on_first_exec: Mutex<Option<ArmHook>>,
}

impl HostActuator {
    /// Effects with nothing wired yet but the kill switch (`kill_file`: the agent's
    /// `cgroup.kill`); the planes set theirs once they exist.
    pub fn new(kill_file: Option<PathBuf>) -> HostActuator {
        HostActuator {
            kill_file,
            on_demote: Mutex::new(None),
            on_reload: Mutex::new(None),
            file_cache: Mutex::new(None),
            exec_approvals: Mutex::new(None),
            on_first_exec: Mutex::new(None),
        }
    }
}

/// What the evaluator needs of the file plane's cache.
pub trait FileCache: Send + Sync {
    fn allow_always(&self, identity: FileIdentity);
    fn forget(&self);
}

impl Actuator for HostActuator {
    fn kill_agent(&self) -> io::Result<()> {
        match &self.kill_file {
            Some(path) => std::fs::write(path, "1"),
            None => Err(io::Error::other("the agent has no cgroup (not root)")),
        }
    }

    fn approve_exec(&self, tid: u32, identity: FileIdentity) -> io::Result<()> {
        match lock(&self.exec_approvals).as_mut() {
            Some(approve) => approve(tid, identity),
            None => Ok(()),
        }
    }

    fn demote(&self, agent: &AgentFacts) -> io::Result<()> {
        match lock(&self.on_demote).as_mut() {
            Some(tighten) => tighten(agent),
            None => Ok(()),
        }
    }

    fn allow_file_always(&self, identity: FileIdentity) {
        if let Some(cache) = lock(&self.file_cache).as_ref() {
            cache.allow_always(identity);
        }
    }

    fn forget_file_answers(&self) {
        if let Some(cache) = lock(&self.file_cache).as_ref() {
            cache.forget();
        }
    }
}

/// Opens the events file (or stdout for `-`) for decision records; the audit log, when
/// there is one, gets every line too.
pub fn record_sink(path: Option<&Path>, audit: Option<crate::audit_run::AuditLines>) -> Result<RecordSink> {
    Ok(RecordSink::new(records_out(path, audit)?))
}

/// Where a run's records go, with or without a policy: the events file (appended to; `-`
/// is stdout) and the audit log, as one writer that gets every line. Buffered: the writers
/// of records hand it whole batches and flush at the end of each.
pub fn records_out(
    path: Option<&Path>,
    audit: Option<crate::audit_run::AuditLines>,
) -> Result<Option<Box<dyn Write + Send>>> {
    let out: Option<Box<dyn Write + Send>> = match path {
        None => None,
        Some(p) if p == Path::new("-") => Some(Box::new(BufWriter::new(io::stdout()))),
        Some(p) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open events file {}", p.display()))?;
            Some(Box::new(BufWriter::new(file)))
        }
    };
    Ok(audit_run::tee(out, audit))
}

/// The evaluator and the control socket of one governed run.
pub struct Governance {
    pub evaluator: Arc<Evaluator>,
    pub actuator: Arc<HostActuator>,
    /// The compiled planes in force (replaced on demotion and when domains move).
    pub plan: Arc<Mutex<Option<Plan>>>,
    /// The agent's identity socket (shown inside its jail).
    pub identity_socket: IdentitySocket,
    /// Charges trust decay while the agent runs (when the policy asks for decay).
    _decay: Option<DecayTicker>,
    /// Removes the control socket when the run ends.
    _control: ControlServer,
}

/// The agent's cgroup as the kernel names it: its id and its `/proc/PID/cgroup` path.
pub struct CgroupName {
    pub id: u64,
    pub path: String,
}

impl Governance {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        args: &PolicyOptions,
        loaded: Loaded,
        cgroup: CgroupName,
        entry_program: PathBuf,
        kill_file: Option<PathBuf>,
        plan: Option<Plan>,
        events: Option<&Path>,
        audit: Option<crate::audit_run::AuditLines>,
        show_denials: bool,
    ) -> Result<Governance> {
        let actuator = Arc::new(HostActuator::new(kill_file));
        let Loaded { set: policies, agent, identity, policy_hash, trust } = loaded;
        let name = agent.id.clone();
        let cfg = EvaluatorConfig {
            policies,
            policy_hash: policy_hash.clone(),
            agent,
            approval_timeout: std::time::Duration::from_secs(args.approval_timeout),
            trust,
            entry_program,
            show_denials,
            proc_root: PathBuf::from("/proc"),
        };
        let audit_policy = audit.as_ref().map(audit_run::AuditLines::policy_in_force);
        let evaluator = Evaluator::new(cfg, record_sink(events, audit)?, actuator.clone());
        let view = IdentityView {
            spiffe_id: identity.spiffe_id().to_string(),
            cgroup_id: cgroup.id,
            jwks: identity.jwks(),
            socket: Path::new(IDENTITY_DIR).join(&name).join("identity.sock"),
        };
        // The identity bound to the cgroup, on file before the agent exists: whoever reads the
        // records (or the audit log) has the key that verifies the agent's tokens.
        evaluator.observe_raw(&serde_json::json!({
            "time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "agent": name, "event": "identity", "did": identity.did(), "spiffe_id": identity.spiffe_id(),
            "cgroup_id": cgroup.id, "cgroup": cgroup.path, "jwks": view.jwks, "policy_hash": policy_hash,
        }));
        evaluator.flush();
        let facts =
            IdentityFacts { identity, cgroup: cgroup.path, cgroup_id: cgroup.id, proc_root: PathBuf::from("/proc") };
        let decay = match trust.decay {
            Some(_) => Some(DecayTicker::start(Arc::clone(&evaluator)).context("cannot start the trust decay thread")?),
            None => None,
        };
        // The control socket first: it refuses a name already running, whose identity
        // socket must then be left alone.
        let reload = reloader(args.policy.clone(), Arc::clone(&evaluator), Arc::clone(&actuator), audit_policy);
        let control = ControlServer::start(
            Path::new(control::RUNTIME_DIR),
            &name,
            Arc::clone(&evaluator),
            Some(view),
            Some(reload),
        )
        .map_err(|e| anyhow!("{e}"))?;
        let identity_socket = IdentitySocket::start(Path::new(IDENTITY_DIR), &name, facts, Arc::clone(&evaluator))
            .context("cannot start the identity socket")?;
        Ok(Governance {
            evaluator,
            actuator,
            plan: Arc::new(Mutex::new(plan)),
            identity_socket,
            _decay: decay,
            _control: control,
        })
    }
}

/// `agt-jail reload`: the policy files the agent was started with, read again. The new
/// policy is loaded and hashed (a file that changes while it is read is refused), compiled
/// for the agent as it is now, its kernel tables installed (one generation switch in the
/// kernel), and only then put in force in the evaluator as one snapshot
/// (docs/adr/0014-policy-reload.md). On any error the old policy stays in force everywhere.
pub fn reloader(
    paths: Vec<PathBuf>,
    evaluator: Arc<Evaluator>,
    actuator: Arc<HostActuator>,
    audit_policy: Option<Arc<Mutex<String>>>,
) -> control::Reloader {
    // One reload at a time: two would race between the kernel and the evaluator.
    let serial = Mutex::new(());
    Arc::new(move || {
        let _one = lock(&serial);
        let hash = |paths: &[PathBuf]| identity::policy_hash(paths).map_err(|e| format!("cannot read the policy: {e}"));
        let before = hash(&paths)?;
        let set = PolicySet::load(&paths).map_err(|e| e.to_string())?;
        if hash(&paths)? != before {
            return Err("the policy files changed while they were read; reload again".to_string());
        }
        let old = evaluator.policy();
        if old.hash == before {
            return Ok((old.hash.clone(), before));
        }
        let set = Arc::new(set);
        // The kernel's tables first, then the evaluator: see the ADR for why this order.
        match lock(&actuator.on_reload).as_mut() {
            Some(replan) => {
                replan(&evaluator.agent(), &set).map_err(|e| format!("the policy was not reloaded: {e}"))?
            }
            // Nothing could install its kernel tables: it is not put in force.
            None => return Err("the policy was not reloaded: the agent's kernel planes are not set up".to_string()),
        }
        // The audit log's entries name the new policy from the switch on.
        let switched = |hash: &str| {
            if let Some(cell) = &audit_policy {
                *lock(cell) = hash.to_string();
            }
        };
        let old = evaluator.reload(PolicySnapshot::new(set, before.clone()), &switched);
        Ok((old, before))
    })
}

/// How a policy's domains get their addresses: the host's resolver (ring 0, `--net host`),
/// or, where agt-jail serves the agent's resolver, the addresses its answers opened (what
/// the agent itself was told).
pub type DomainResolver = Arc<dyn Fn(&[String]) -> Resolved + Send + Sync>;

/// The host's resolver as a [`DomainResolver`].
pub fn host_resolver() -> DomainResolver {
    Arc::new(|domains| resolve_domains(domains).0)
}

/// Resolves every domain a policy names, with the system resolver. Names that do not
/// resolve are returned apart (they match no address until they do).
pub fn resolve_domains(domains: &[String]) -> (Resolved, Vec<String>) {
    use std::net::ToSocketAddrs;
    let mut resolved = Resolved::new();
    let mut failed = Vec::new();
    for domain in domains {
        match (domain.as_str(), 0).to_socket_addrs() {
            Ok(addrs) => {
                let mut ips: Vec<std::net::IpAddr> = addrs.map(|a| a.ip()).collect();
                ips.sort();
                ips.dedup();
                if ips.is_empty() {
                    failed.push(domain.clone());
                }
                resolved.insert(domain.clone(), ips);
            }
            Err(_) => failed.push(domain.clone()),
        }
    }
    (resolved, failed)
}

/// What this host offers the compiler. fanotify counts only when this process really
/// gets permission events (a kernel can have fanotify without them).
pub fn host_caps(ring: u8, confined: bool, bpf_lsm: bool) -> HostCaps {
    HostCaps { bpf_lsm, fanotify: agt_jail_supervisor::fanotify::probe().is_ok(), confined, ring }
}

/// Compiles the policy for this agent on this host and prints what cannot be enforced
/// before effect (an error instead with `--strict`). `fed`: the domains' addresses come
/// from the agent's resolver, so none has one yet and none is warned about.
pub fn compile_plan(
    set: &PolicySet,
    agent: &AgentFacts,
    ring: u8,
    confined: bool,
    bpf_lsm: bool,
    strict: bool,
    (resolve, fed): (&DomainResolver, bool),
) -> Result<(Plan, Resolved)> {
    let caps = host_caps(ring, confined, bpf_lsm);
    // Names that do not resolve are reported by the compiler, one warning each; where the
    // agent's resolver feeds them, none has an address before the agent asks for it.
    let resolved = resolve(&plan::domains(set));
    let compiled = plan::compile(set, agent, &caps, &resolved, strict)
        .map_err(|e| anyhow!("the policy cannot be enforced on this host: {e}"))?;
    for warning in &compiled.warnings {
        if fed && warning.starts_with("domain ") && warning.contains(" did not resolve;") {
            continue;
        }
        agt_jail_jail::stderr_line!("agt-jail: warning: {warning}");
    }
    Ok((compiled, resolved))
}

impl FileCache for FileGuardHandle {
    fn allow_always(&self, identity: FileIdentity) {
        // A failed cache mark only means the file is asked again.
        let _ = self.allow_always_identity(identity);
    }

    fn forget(&self) {
        if let Err(err) = self.forget_allowed() {
            agt_jail_jail::stderr_line!("agt-jail: warning: cannot drop cached file answers: {err}");
        }
    }
}

/// Whether the plan puts any rule on the file plane.
pub fn needs_file_plane(plan: Option<&Plan>) -> bool {
    plan.is_some_and(|p| p.rules.iter().any(|r| r.planes.iter().any(|n| n.class == "file")))
}

/// The decider the synchronous planes call. The first held action is the entry
/// command's own `execve`, made after the jail's mounts are complete and before any
/// agent code runs: that is when the file plane's marks go on the jail's mounts.
pub struct ArmingDecider {
    evaluator: Arc<Evaluator>,
    actuator: Arc<HostActuator>,
    /// Set when file rules need the fanotify plane and it is not started yet.
    pending_file_plane: Mutex<bool>,
    pub file_guard: Mutex<Option<FileGuard>>,
    /// The evaluator's answer to the first exec held, the entry command's own (see [`Entry`]).
    entry: Arc<AtomicU8>,
}

/// What the evaluator answered to the entry command's execve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Entry {
    NotAsked = 0,
    Held = 1,
    Allowed = 2,
    Denied = 3,
}

impl ArmingDecider {
    pub fn new(governance: &Governance, file_plane: bool) -> Arc<ArmingDecider> {
        ArmingDecider::with(Arc::clone(&governance.evaluator), Arc::clone(&governance.actuator), file_plane)
    }

    /// The decider of an evaluator and the effects it acts through.
    pub fn with(evaluator: Arc<Evaluator>, actuator: Arc<HostActuator>, file_plane: bool) -> Arc<ArmingDecider> {
        Arc::new(ArmingDecider {
            evaluator,
            actuator,
            pending_file_plane: Mutex::new(file_plane),
            file_guard: Mutex::new(None),
            entry: Arc::new(AtomicU8::new(Entry::NotAsked as u8)),
        })
    }

    /// Whether the policy refused the entry command itself (its exec failed with EPERM
    /// because the evaluator said so, not because the file cannot be run).
    pub fn entry_denied(&self) -> bool {
        self.entry.load(Ordering::SeqCst) == Entry::Denied as u8
    }

    /// The first exec held is the entry command's (the listener is installed right
    /// before it): its answer is remembered on the way to the kernel.
    fn watch_entry(&self, reply: Reply) -> Reply {
        let first = self
            .entry
            .compare_exchange(Entry::NotAsked as u8, Entry::Held as u8, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if !first {
            return reply;
        }
        let entry = Arc::clone(&self.entry);
        Reply::new(move |answer| {
            let state = if answer == Answer::Allow { Entry::Allowed } else { Entry::Denied };
            entry.store(state as u8, Ordering::SeqCst);
            reply.answer(answer);
        })
    }

    fn arm(&self, jail_pid: u32) -> Result<(), String> {
        let hook = lock(&self.actuator.on_first_exec).take();
        if let Some(hook) = hook {
            hook().map_err(|e| format!("cannot turn on the guard hooks: {e}"))?;
        }
        self.arm_file_plane(jail_pid).map_err(|e| format!("cannot start the file plane (fanotify): {e}"))
    }

    fn arm_file_plane(&self, jail_pid: u32) -> Result<(), FanotifyError> {
        let mut pending = lock(&self.pending_file_plane);
        if !*pending {
            return Ok(());
        }
        let decider: Arc<dyn Decider> = Arc::new(Arc::clone(&self.evaluator));
        let guard = FileGuard::start(jail_pid, decider, FileGuardOptions::default())?;
        *lock(&self.actuator.file_cache) = Some(Box::new(guard.handle()));
        *lock(&self.file_guard) = Some(guard);
        *pending = false;
        Ok(())
    }

    /// Stops the file plane (held opens are denied).
    pub fn stop(&self) {
        let guard = lock(&self.file_guard).take();
        if let Some(guard) = guard {
            if let Err(err) = guard.stop() {
                agt_jail_jail::stderr_line!("agt-jail: warning: stopping the file plane: {err}");
            }
        }
    }
}

impl Decider for ArmingDecider {
    fn decide(&self, request: Request, reply: Reply) {
        if let Err(err) = self.arm(request.pid) {
            // File rules cannot be enforced: nothing of the agent may run.
            agt_jail_jail::stderr_line!("agt-jail: {err}; refusing to run the agent");
            reply.answer(Answer::Deny);
            return;
        }
        let reply = self.watch_entry(reply);
        self.evaluator.handle(request, reply);
    }
}
/// Installs the plan's network tables for the agent (or, when the plan could not be
/// compiled, leaves the ring's floor as the only network rule).
pub fn install_plan(programs: &mut AgentPrograms, agent_id: u64, plan: &Plan) -> Result<()> {
    if let Some(tables) = NetPlane.compile(plan) {
        NetPlane.install(programs, agent_id, &tables).context("cannot install the network tables")?;
    }
    Ok(())
}

/// The Tier A programs of a governed agent (kept alive for the run).
pub struct TierA {
    _exec: ExecLsm,
    _file: Option<FileLsm>,
    _guard: GuardLsm,
}

/// Tier A: the exec hook accepts only what the evaluator approved, path-form file rules
/// are denied in the kernel, and the guard hooks close ptrace, foreign signals, mount,
/// bpf, module loading and foreign sockets for the agent.
pub fn arm_tier_a(programs: &mut AgentPrograms, agent_id: u64, mut exec: ExecLsm, plan: &Plan) -> Result<TierA> {
    exec.attach(programs).context("cannot attach the exec hook")?;
    ExecPlane.install(programs, agent_id, &()).context("cannot turn on exec verdicts")?;
    let file = match FilePlane.compile(plan) {
        Some(tables) => {
            let mut lsm = FileLsm::load(programs).context("cannot load the file hooks")?;
            for (hook, why) in lsm.unavailable() {
                agt_jail_jail::stderr_line!("agt-jail: warning: the kernel refused the {hook} hook ({why}); its rules stay on the fanotify plane");
            }
            lsm.attach(programs).context("cannot attach the file hooks")?;
            for text in &tables.spanning {
                agt_jail_jail::stderr_line!(
                    "agt-jail: note: the path form {} spans components; the kernel's file hook leaves it to the fanotify plane",
                    agt_jail_policy::quoted(text)
                );
            }
            FilePlane.install(programs, agent_id, &tables).context("cannot install the file rules")?;
            Some(lsm)
        }
        None => None,
    };
    // The guard hooks are attached now but turned on for the agent only when its entry
    // command's execve is held (see `ArmingDecider`): the jail's own set-up, which runs in
    // the agent's cgroup, mounts its view first.
    let mut guard = GuardLsm::load(programs).context("cannot load the guard hooks")?;
    guard.attach(programs).context("cannot attach the guard hooks")?;
    Ok(TierA { _exec: exec, _file: file, _guard: guard })
}

/// Turns the Tier A guard hooks on for the agent (ptrace, foreign signals, mount, bpf,
/// module loading and foreign sockets).
pub fn guard_enabler(programs: Arc<Mutex<AgentPrograms>>, agent_id: u64) -> ArmHook {
    Box::new(move || {
        let mut programs = lock(&programs);
        GuardPlane.install(&mut *programs, agent_id, &GuardPlane::FLAGS).map_err(io::Error::other)
    })
}

/// Hands the evaluator's exec approvals to the kernel's exec hook.
pub fn exec_approver(programs: Arc<Mutex<AgentPrograms>>) -> ApproveExec {
    Box::new(move |tid, identity| {
        let mut programs = lock(&programs);
        let file = ExecIdentity { dev: lsm::kernel_dev(identity.dev), ino: identity.ino };
        ExecLsm::approve_exec(&mut programs, tid, file).map_err(io::Error::other)
    })
}

/// Tightens the kernel planes when the agent is demoted: the network tables are
/// recompiled for the new ring (policies may read `agent.ring`/`agent.trust`), and ring 3
/// loses the network entirely, as a ring-3 launch would have.
pub fn demoter(
    programs: Arc<Mutex<AgentPrograms>>,
    agent_id: u64,
    policy: Arc<Mutex<Arc<PolicySet>>>,
    current: Arc<Mutex<Option<Plan>>>,
    confined: bool,
    bpf_lsm: bool,
    resolve: DomainResolver,
) -> Tighten {
    Box::new(move |agent: &AgentFacts| {
        // The programs' lock first, then the policy: a reload (which holds the programs'
        // lock while it installs) and a demotion never interleave.
        let mut programs = lock(&programs);
        let set = Arc::clone(&lock(&policy));
        if agent.ring >= 3 {
            programs.deny_all_net(agent_id).map_err(io::Error::other)?;
        }
        // Not strict: the agent is running; a plan that no longer compiles keeps the old tables.
        let compiled = compile_for(&set, agent, confined, bpf_lsm, &resolve, false).map_err(io::Error::other)?;
        install_plan(&mut programs, agent_id, &compiled).map_err(io::Error::other)?;
        *lock(&current) = Some(compiled);
        Ok(())
    })
}

/// `set` compiled for the agent as it is now (its ring, on this host), with its domains
/// resolved: what a demotion and a reload both install.
fn compile_for(
    set: &PolicySet,
    agent: &AgentFacts,
    confined: bool,
    bpf_lsm: bool,
    resolve: &DomainResolver,
    strict: bool,
) -> Result<Plan, plan::PlanError> {
    let caps = host_caps(agent.ring, confined, bpf_lsm);
    plan::compile(set, agent, &caps, &resolve(&plan::domains(set)), strict)
}

/// The kernel side of a reload: the new policy compiled for the agent as it is now
/// (`strict` as at start), its network tables installed, and the policy the demoter
/// compiles from replaced, all under the programs' lock. A plan that does not compile
/// changes nothing.
#[allow(clippy::too_many_arguments)]
pub fn replanner(
    programs: Arc<Mutex<AgentPrograms>>,
    agent_id: u64,
    policy: Arc<Mutex<Arc<PolicySet>>>,
    current: Arc<Mutex<Option<Plan>>>,
    confined: bool,
    bpf_lsm: bool,
    strict: bool,
    resolve: DomainResolver,
) -> Replan {
    Box::new(move |agent: &AgentFacts, next: &Arc<PolicySet>| {
        let mut programs = lock(&programs);
        let compiled = compile_for(next, agent, confined, bpf_lsm, &resolve, strict)
            .map_err(|e| io::Error::other(format!("the policy cannot be enforced on this host: {e}")))?;
        if bpf_lsm && FilePlane.compile(&compiled) != lock(&current).as_ref().and_then(|p| FilePlane.compile(p)) {
            // The kernel's file hooks keep the tables they were started with.
            return Err(io::Error::other(
                "its file rules differ from those in the kernel's file hooks, which are installed at start only; \
                 restart the agent to change them",
            ));
        }
        if confined && needs_file_plane(Some(&compiled)) && !needs_file_plane(lock(&current).as_ref()) {
            // The fanotify plane is started with the agent only when its policy has file rules.
            return Err(io::Error::other(
                "it has file rules and the agent was started without the file plane; restart the agent to add them",
            ));
        }
        install_plan(&mut programs, agent_id, &compiled).map_err(|e| io::Error::other(format!("{e:#}")))?;
        *lock(&current) = Some(compiled);
        *lock(&policy) = Arc::clone(next);
        Ok(())
    })
}

/// Follows DNS for the policy's domains: every `every`, the names are resolved again and
/// when any answer changed, `replan` re-installs the network tables (the compiler maps
/// each address to its domain). Ends when `stop` is set.
pub fn follow_domains(
    domains: Vec<String>,
    every: std::time::Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
    resolve: impl Fn(&[String]) -> Resolved + Send + 'static,
    mut replan: impl FnMut() -> io::Result<()> + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new().name("dns".into()).spawn(move || {
        let mut last = resolve(&domains);
        let step = std::time::Duration::from_millis(50).min(every);
        let mut waited = std::time::Duration::ZERO;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(step);
            waited += step;
            if waited < every {
                continue;
            }
            waited = std::time::Duration::ZERO;
            let now = resolve(&domains);
            if now != last {
                match replan() {
                    Ok(()) => {
                        agt_jail_jail::stderr_line!(
                            "agt-jail: policy domains resolve differently now; network tables re-installed"
                        );
                        last = now;
                    }
                    Err(err) => {
                        agt_jail_jail::stderr_line!("agt-jail: warning: cannot re-install the network tables: {err}")
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const ALLOW: &str = "name: p\nagents: ['*']\ndefault_action: allow\n";
    const DENY: &str = "name: p\nagents: ['*']\ndefault_action: deny\n";

    fn governed(dir: &Path) -> (PathBuf, Arc<Evaluator>, Arc<HostActuator>) {
        let path = dir.join("p.yaml");
        std::fs::write(&path, ALLOW).unwrap();
        let hash = identity::policy_hash(std::slice::from_ref(&path)).unwrap();
        let actuator = Arc::new(HostActuator::new(None));
        let cfg = EvaluatorConfig {
            policies: Arc::new(PolicySet::load(std::slice::from_ref(&path)).unwrap()),
            policy_hash: hash,
            agent: AgentFacts::new("r", "did:mesh:00", 2, 500, "s"),
            approval_timeout: std::time::Duration::from_secs(5),
            trust: TrustRules::default(),
            entry_program: PathBuf::from("/bin/true"),
            show_denials: false,
            proc_root: PathBuf::from("/proc"),
        };
        let evaluator = Evaluator::new(cfg, RecordSink::new(None), actuator.clone());
        (path, evaluator, actuator)
    }

    #[test]
    fn a_reload_installs_the_kernel_tables_before_the_evaluator_sees_the_new_policy() {
        let dir = tempfile::tempdir().unwrap();
        let (path, evaluator, actuator) = governed(dir.path());
        let old = evaluator.policy().hash.clone();
        let audit = Arc::new(Mutex::new(old.clone()));
        let reload = reloader(vec![path.clone()], Arc::clone(&evaluator), Arc::clone(&actuator), Some(audit.clone()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ev, s) = (Arc::clone(&evaluator), Arc::clone(&seen));
        *lock(&actuator.on_reload) = Some(Box::new(move |_: &AgentFacts, next: &Arc<PolicySet>| {
            // The kernel side runs while the evaluator still decides by the old policy.
            lock(&s).push((ev.policy().hash.clone(), next.rules().len()));
            Ok(())
        }));
        assert_eq!(reload().unwrap(), (old.clone(), old.clone()), "unchanged files: nothing to do");
        assert!(lock(&seen).is_empty());

        std::fs::write(&path, DENY).unwrap();
        let (was, now) = reload().unwrap();
        assert_eq!(was, old);
        assert_ne!(now, old);
        assert_eq!(*lock(&seen), vec![(old.clone(), 0)], "the tables were installed under the old snapshot");
        assert_eq!(evaluator.policy().hash, now);
        assert_eq!(*lock(&audit), now, "the audit log's entries name the new policy");

        // A broken file: its located error, nothing changes anywhere.
        std::fs::write(&path, "name: p\nrules: [\n").unwrap();
        let err = reload().unwrap_err();
        assert!(err.starts_with(&format!("{}:", path.display())), "{err}");
        assert_eq!((evaluator.policy().hash.clone(), lock(&seen).len()), (now.clone(), 1));

        // The kernel refuses the tables: the evaluator keeps the old policy too.
        std::fs::write(&path, ALLOW).unwrap();
        *lock(&actuator.on_reload) =
            Some(Box::new(|_: &AgentFacts, _: &Arc<PolicySet>| Err(io::Error::other("no room"))));
        let err = reload().unwrap_err();
        assert_eq!(err, "the policy was not reloaded: no room");
        assert_eq!(evaluator.policy().hash, now);

        // Without kernel planes nothing is put in force.
        *lock(&actuator.on_reload) = None;
        assert!(reload().unwrap_err().contains("kernel planes are not set up"));
        assert_eq!(evaluator.policy().hash, now);
    }

    #[test]
    fn domain_changes_re_install_the_tables_and_nothing_else_does() {
        let answers = Arc::new(Mutex::new(vec!["10.0.0.1".parse::<IpAddr>().unwrap()]));
        let replans = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r) = (Arc::clone(&answers), Arc::clone(&replans));
        let handle = follow_domains(
            vec!["registry.example".into()],
            std::time::Duration::from_millis(10),
            Arc::clone(&stop),
            move |names| names.iter().map(|n| (n.clone(), a.lock().unwrap().clone())).collect(),
            move || {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(replans.load(Ordering::SeqCst), 0, "same answers: nothing to do");
        answers.lock().unwrap().push("10.0.0.2".parse().unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while replans.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the change was never followed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(replans.load(Ordering::SeqCst), 1, "one change, one re-install");
        stop.store(true, Ordering::SeqCst);
        handle.join().unwrap();
    }
}
