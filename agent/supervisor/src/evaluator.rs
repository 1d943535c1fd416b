//! The evaluator: every held action and every kernel event of one agent becomes an OS
//! event context, a policy decision, an effect and a record.
//!
//! Held actions (exec, open) are answered here: allow, deny, hold for an approval (a
//! timeout denies), or kill the whole agent. Budgets and rate limits (`limit:` on the
//! matched rule) are charged before the answer, so the first action over budget is the
//! one denied. Denials lower the agent's trust; crossing a tier boundary demotes its ring
//! live, never the other way. The side effects on the host (the cgroup, the BPF maps)
//! belong to the caller, behind [`Actuator`].
use std::{
    collections::HashMap,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, RwLock},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agt_jail_policy::{
    context::{self, AgentFacts, FileEvent, NetContextBuf, NetEvent, NetFamily, NetProto, ProcFacts},
    Action, Decision, EvalOptions, Expr, Operand, PolicySet, RateLimiter,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{metrics::DecisionMetrics, trust, Answer, FileAccess, FileIdentity, Reply, Request, RequestKind};

/// Host-side effects the evaluator asks for. Implemented by the caller over the
/// agent's cgroup and BPF maps; a test double records the calls.
pub trait Actuator: Send + Sync {
    /// Ends every process of the agent at once (`cgroup.kill`).
    fn kill_agent(&self) -> io::Result<()>;
    /// Tier A: lets the kernel's exec hook accept the file `tid` is about to execute.
    fn approve_exec(&self, _tid: u32, _identity: FileIdentity) -> io::Result<()> {
        Ok(())
    }
    /// Tightens the kernel planes to `agent.ring` (already lowered by the evaluator).
    fn demote(&self, agent: &AgentFacts) -> io::Result<()>;
    /// Opens of this file need not be asked again (every access to it is allowed).
    fn allow_file_always(&self, _identity: FileIdentity) {}
    /// Forgets every cached file answer (the policy's view of the agent changed).
    fn forget_file_answers(&self) {}
}

pub use crate::trust::TrustRules;

/// The least restricted ring an agent of this trust may hold (a higher number is more
/// restricted): standard and above keep the ring they were started in, probationary
/// agents are held to ring 2 at most, untrusted ones are sandboxed (ring 3).
pub fn ring_floor(trust: u32) -> u8 {
    match trust {
        500.. => 0,
        300..=499 => 2,
        _ => 3,
    }
}

/// Everything the evaluator needs to know at start.
pub struct EvaluatorConfig {
    pub policies: Arc<PolicySet>,
    /// SHA-256 of the policy files `policies` was loaded from (every decision record names it).
    pub policy_hash: String,
    pub agent: AgentFacts,
    pub approval_timeout: Duration,
    pub trust: TrustRules,
    /// The command the agent was started with: the only exec a ring-3 agent may do.
    pub entry_program: PathBuf,
    /// Print one line per denial and per approval request on stderr.
    pub show_denials: bool,
    /// Where `/proc` is (passed in so tests can use a fake tree).
    pub proc_root: PathBuf,
}

/// One line of the events file: what happened, what was decided, by which plane.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    // The fields are declared in the order of their names: a record's line is then in the
    // key order of canonical JSON (RFC 8785), which the audit log writes
    // (`agt_jail_audit::canon` checks such a line instead of sorting it).
    pub agent: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<u64>,
    pub context: &'a Value,
    /// How many calls the record stands for, when more than one: a kernel deny summary
    /// (denies counted in the kernel when its priority ring was full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(serialize_with = "canonical_decision")]
    pub decision: &'a Decision,
    pub event: &'a str,
    /// Microseconds from the request reaching the evaluator to the answer.
    pub latency_us: u64,
    pub matched_rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'a str>,
    /// What was done: allow, deny, kill, held (waiting for approval), approved, timeout.
    pub outcome: &'a str,
    pub pid: u32,
    /// The mechanism that enforced the decision.
    pub plane: &'a str,
    /// The hash of the policy the decision was made under (one snapshot; see [`Evaluator::reload`]).
    pub policy: &'a str,
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
}

/// A decision with its keys in canonical order (a JSON tree's objects are sorted maps).
fn canonical_decision<S: serde::Serializer>(decision: &&Decision, s: S) -> Result<S::Ok, S::Error> {
    serde_json::to_value(decision).map_err(serde::ser::Error::custom)?.serialize(s)
}

/// Where records go. Writes are whole lines; a write failure is remembered and reported
/// once at the end (the decision itself never waits on the file).
pub struct RecordSink {
    out: Option<Box<dyn Write + Send>>,
    /// Whole lines not yet handed to `out`: one write per [`Self::flush`].
    pending: Vec<u8>,
    seq: u64,
    error: Option<io::Error>,
}

/// Buffered lines beyond which a record is pushed out at once (a reader that never gets
/// to flush must not grow the buffer without end).
const SINK_BUFFER_MAX: usize = 1 << 20;

impl RecordSink {
    pub fn new(out: Option<Box<dyn Write + Send>>) -> Self {
        RecordSink { out, pending: Vec::new(), seq: 0, error: None }
    }

    /// Buffers a record (kernel observations: pushed out once per batch by [`Self::flush`]).
    fn write_buffered(&mut self, mut record: Record<'_>) {
        self.seq += 1;
        record.seq = self.seq;
        self.buffer_line(&record);
    }

    /// Buffers a raw JSON value as one line (kernel observations without a decision).
    pub fn write_value(&mut self, value: &Value) {
        self.seq += 1;
        self.buffer_line(value);
    }

    fn buffer_line(&mut self, line: &impl Serialize) {
        if self.out.is_none() {
            return;
        }
        let mark = self.pending.len();
        match serde_json::to_writer(&mut self.pending, line) {
            Ok(()) => self.pending.push(b'\n'),
            Err(err) => {
                self.pending.truncate(mark);
                self.error.get_or_insert(io::Error::other(err));
            }
        }
        if self.pending.len() > SINK_BUFFER_MAX {
            self.flush();
        }
    }

    /// Buffers a kernel network record, written straight into the buffer: the line
    /// [`Record`] serialises to, keys in the same (canonical) order.
    fn write_kernel(&mut self, r: &KernelRecord<'_>) {
        use std::io::Write as _;
        self.seq += 1;
        if self.out.is_none() {
            return;
        }
        // Writing strings and numbers into a Vec does not fail.
        let line = &mut self.pending;
        line.extend_from_slice(b"{\"agent\":");
        let _ = serde_json::to_writer(&mut *line, r.ctx.agent().id.as_str());
        line.extend_from_slice(b",\"context\":");
        r.ctx.write_json(line);
        if let Some(count) = r.count {
            let _ = write!(line, ",\"count\":{count}");
        }
        line.extend_from_slice(b",\"decision\":");
        line.extend_from_slice(r.decision_json);
        let _ =
            write!(line, ",\"event\":\"{}\",\"latency_us\":{},\"matched_rule\":", r.ctx.event().as_str(), r.latency_us);
        let _ = serde_json::to_writer(&mut *line, &r.matched_rule);
        if let Some(note) = r.note {
            line.extend_from_slice(b",\"note\":");
            let _ = serde_json::to_writer(&mut *line, note);
        }
        line.extend_from_slice(b",\"outcome\":");
        let _ = serde_json::to_writer(&mut *line, r.outcome);
        let _ = write!(line, ",\"pid\":{},\"plane\":\"kernel\",\"policy\":", r.pid);
        let _ = serde_json::to_writer(&mut *line, r.policy);
        let _ = write!(line, ",\"seq\":{},\"time\":", self.seq);
        let _ = serde_json::to_writer(&mut *line, &now_secs());
        line.extend_from_slice(b"}\n");
        if self.pending.len() > SINK_BUFFER_MAX {
            self.flush();
        }
    }

    /// Pushes buffered records to the file: one write for all of them.
    pub fn flush(&mut self) {
        let Some(out) = self.out.as_mut() else { return };
        if !self.pending.is_empty() {
            if let Err(err) = out.write_all(&self.pending) {
                self.error.get_or_insert(err);
            }
            self.pending.clear();
        }
        if let Err(err) = out.flush() {
            self.error.get_or_insert(err);
        }
    }

    /// The first write error, if any.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }
}

struct Pending {
    reply: Reply,
    context: Value,
    decision: Decision,
    pid: u32,
    event: String,
    plane: &'static str,
    started: Instant,
    exec_approval: Option<(u32, FileIdentity)>,
    /// The policy the action was held under: its approval or timeout is recorded under it.
    policy: Arc<PolicySnapshot>,
}

/// The policy in force: the set, its hash and what follows from it, swapped as one by
/// [`Evaluator::reload`]. A decision takes one snapshot and uses only it, so no decision is
/// made by half of one policy and half of another, and its record names the snapshot's hash.
pub struct PolicySnapshot {
    pub set: Arc<PolicySet>,
    pub hash: String,
    /// File answers can be cached only when no rule reads per-process or per-time state.
    file_cacheable: bool,
}

impl PolicySnapshot {
    pub fn new(set: Arc<PolicySet>, hash: String) -> PolicySnapshot {
        let file_cacheable = !reads_varying_state(&set);
        PolicySnapshot { set, hash, file_cacheable }
    }
}

/// Process facts of recently seen processes, so a burst of kernel events does not read
/// `/proc` once per event. Dropped on exec and exit of the process (its facts change).
#[derive(Default)]
struct ProcCache {
    facts: HashMap<u32, ProcFacts>,
    /// The executable of processes whose other facts came with the kernel's record, for
    /// records without the kernel's executable key.
    exes: HashMap<u32, String>,
    /// The kernel's executable keys → paths, learnt from exec records and from
    /// `/proc/PID/exe` of a live process that runs the key's file. Records are read in
    /// batches, so the process of a record has often exited by then; its key still names it.
    named: HashMap<[u64; 3], String>,
}

/// Most processes remembered at once; the cache starts over when full.
const PROC_CACHE_MAX: usize = 4096;

/// The kernel's executable key for "unknown".
const NO_EXE: [u64; 3] = [0; 3];

fn remember_name(cache: &mut ProcCache, key: [u64; 3], name: String) {
    if cache.named.len() >= PROC_CACHE_MAX {
        cache.named.clear();
    }
    cache.named.insert(key, name);
}

struct State {
    agent: AgentFacts,
    /// Rewards never lift trust above this.
    reward_ceiling: u32,
    /// Decay has been charged up to here.
    decayed_to: Instant,
    limiter: RateLimiter,
    next_approval: u64,
    pending: HashMap<u64, Pending>,
    killed: bool,
}

/// The evaluator of one agent. Shared between the synchronous planes (as their
/// [`crate::Decider`]), the kernel event reader and the control socket.
pub struct Evaluator {
    policy: RwLock<Arc<PolicySnapshot>>,
    opts: EvalOptions,
    approval_timeout: Duration,
    trust_rules: TrustRules,
    entry_program: PathBuf,
    show_denials: bool,
    proc_root: PathBuf,
    state: Mutex<State>,
    procs: Mutex<ProcCache>,
    /// The kernel network events' reusable context and record parts.
    net: Mutex<NetPath>,
    sink: Mutex<RecordSink>,
    actuator: Arc<dyn Actuator>,
    metrics: DecisionMetrics,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the evaluator
/// must keep answering (a poisoned lock denying everything would also be closed, but
/// would lose the records).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

impl Evaluator {
    pub fn new(cfg: EvaluatorConfig, sink: RecordSink, actuator: Arc<dyn Actuator>) -> Arc<Self> {
        let opts = EvalOptions { agent: Some(cfg.agent.did.clone()), ..EvalOptions::default() };
        Arc::new(Evaluator {
            policy: RwLock::new(Arc::new(PolicySnapshot::new(cfg.policies, cfg.policy_hash))),
            opts,
            approval_timeout: cfg.approval_timeout,
            trust_rules: cfg.trust,
            entry_program: cfg.entry_program,
            show_denials: cfg.show_denials,
            proc_root: cfg.proc_root,
            state: Mutex::new(State {
                reward_ceiling: cfg.trust.reward_max.unwrap_or(cfg.agent.trust),
                decayed_to: Instant::now(),
                agent: cfg.agent,
                limiter: RateLimiter::default(),
                next_approval: 0,
                pending: HashMap::new(),
                killed: false,
            }),
            procs: Mutex::new(ProcCache::default()),
            net: Mutex::new(NetPath::default()),
            sink: Mutex::new(sink),
            actuator,
            metrics: DecisionMetrics::default(),
        })
    }

    /// The policy in force now (one snapshot: set and hash together).
    pub fn policy(&self) -> Arc<PolicySnapshot> {
        Arc::clone(&self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Puts `next` in force for every decision that starts from now on, and records the
    /// switch (`policy_reloaded`, old and new hash). Decisions already under way finish
    /// under the snapshot they took, and their records name it; held actions are answered
    /// under the policy they were held under. Trust, ring, budgets and held requests carry
    /// over (docs/adr/0014-policy-reload.md). `switched` runs at the switch, once the
    /// records made so far are written and before the `policy_reloaded` record is (the
    /// audit log's entries name the new policy from there on). Returns the hash that was
    /// in force.
    pub fn reload(&self, next: PolicySnapshot, switched: &dyn Fn(&str)) -> String {
        let next = Arc::new(next);
        let agent = self.agent();
        // The sink first: a decision under the new policy cannot write its record before
        // the switch is on record. (No path holds the policy's lock while it takes the sink's.)
        let mut sink = lock(&self.sink);
        let old = {
            let mut slot = self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *slot, Arc::clone(&next))
        };
        // File answers cached under the old policy are not the new policy's.
        self.actuator.forget_file_answers();
        sink.flush();
        switched(&next.hash);
        sink.write_value(&json!({
            "time": now_secs(), "agent": agent.id, "event": "policy_reloaded", "old_policy": old.hash,
            "policy": next.hash,
        }));
        sink.flush();
        old.hash.clone()
    }

    /// The agent as the policy sees it now (ring and trust change over its life).
    pub fn agent(&self) -> AgentFacts {
        lock(&self.state).agent.clone()
    }

    /// The decision counters (the control socket's `metrics`).
    pub fn metrics(&self) -> &DecisionMetrics {
        &self.metrics
    }

    /// The first error writing records, if any.
    pub fn take_record_error(&self) -> Option<io::Error> {
        lock(&self.sink).take_error()
    }

    /// Whether a write of the records failed (the error stays for [`Self::take_record_error`]).
    pub fn record_error_pending(&self) -> bool {
        lock(&self.sink).error.is_some()
    }

    fn proc_facts(&self, pid: u32) -> ProcFacts {
        proc_facts(&self.proc_root, pid)
    }

    /// [`proc_facts`] through the cache (kernel events: a process's facts only change
    /// when it execs, which drops its entry).
    fn cached_proc_facts(&self, pid: u32) -> ProcFacts {
        if let Some(facts) = lock(&self.procs).facts.get(&pid) {
            return facts.clone();
        }
        let facts = proc_facts(&self.proc_root, pid);
        let mut cache = lock(&self.procs);
        if cache.facts.len() >= PROC_CACHE_MAX {
            cache.facts.clear();
        }
        cache.facts.insert(pid, facts.clone());
        facts
    }

    /// Runs `f` on the executable of `pid`, looked up once per process (`/proc/PID/exe`) for
    /// events whose other process facts the kernel's record carries.
    fn with_exe<R>(&self, pid: u32, f: impl FnOnce(&str) -> R) -> R {
        if let Some(exe) = lock(&self.procs).exes.get(&pid) {
            return f(exe);
        }
        let exe = std::fs::read_link(self.proc_root.join(pid.to_string()).join("exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let answer = f(&exe);
        let mut cache = lock(&self.procs);
        if cache.exes.len() >= PROC_CACHE_MAX {
            cache.exes.clear();
        }
        cache.exes.insert(pid, exe);
        answer
    }

    /// Runs `f` on the path of the kernel's executable key `key` of a record of `pid`: as
    /// learnt before, else from `/proc/PID/exe` when that process still runs the key's file,
    /// else empty (unknown, never a guess).
    fn with_named_exe<R>(&self, pid: u32, key: [u64; 3], f: impl FnOnce(&str) -> R) -> R {
        if let Some(name) = lock(&self.procs).named.get(&key) {
            return f(name);
        }
        match self.exe_running(pid, key) {
            Some(name) => {
                let answer = f(&name);
                remember_name(&mut lock(&self.procs), key, name);
                answer
            }
            None => f(""),
        }
    }

    /// `/proc/PID/exe` when process `pid` runs the file of key `key` (the inode numbers
    /// agree; the rest of the key is kernel addresses).
    fn exe_running(&self, pid: u32, key: [u64; 3]) -> Option<String> {
        let link = self.proc_root.join(pid.to_string()).join("exe");
        let name = std::fs::read_link(&link).ok()?.display().to_string();
        let runs_key = std::fs::metadata(&link).is_ok_and(|meta| std::os::unix::fs::MetadataExt::ino(&meta) == key[2]);
        (runs_key && !name.is_empty()).then_some(name)
    }

    /// The kernel's record of an exec by `pid` of `filename`, now running the file of key
    /// `key`: what was known of the process is read again, and the key is named, from
    /// `/proc/PID/exe` (symbolic links resolved) while the process still runs it, else by
    /// `filename` when absolute (the path as the exec named it: the process has gone).
    pub fn process_execd(&self, pid: u32, key: [u64; 3], filename: &str) {
        self.forget_process(pid);
        if key == NO_EXE || lock(&self.procs).named.contains_key(&key) {
            return;
        }
        let name = self.exe_running(pid, key).or_else(|| filename.starts_with('/').then(|| filename.to_string()));
        if let Some(name) = name {
            remember_name(&mut lock(&self.procs), key, name);
        }
    }

    /// Forgets what is known of a process (it exec'd or exited).
    pub fn forget_process(&self, pid: u32) {
        let mut cache = lock(&self.procs);
        cache.facts.remove(&pid);
        cache.exes.remove(&pid);
    }

    /// Pushes buffered kernel observations to the events file.
    pub fn flush(&self) {
        lock(&self.sink).flush();
    }

    fn context_of(&self, agent: &AgentFacts, request: &Request) -> (Value, &'static str) {
        // The plane's own reading, made while the action was held, when it has one.
        let read;
        let proc = match &request.proc {
            Some(proc) => proc,
            None => {
                read = self.proc_facts(request.pid);
                &read
            }
        };
        match &request.kind {
            RequestKind::Exec { path, argv, interpreter, .. } => {
                (context::exec_context(agent, proc, path, argv, interpreter.as_deref()), "exec")
            }
            RequestKind::File { path, access, .. } => {
                let (event, name) =
                    if access.writes() { (FileEvent::Write, "file_write") } else { (FileEvent::Open, "file_open") };
                (context::file_context(agent, proc, event, path, access.as_str()), name)
            }
        }
    }

    /// Decides a held action. Answers at once, or later for approvals.
    pub fn handle(self: &Arc<Self>, request: Request, reply: Reply) {
        let started = Instant::now();
        // No lock is held while the context is built: it reads /proc and the file being
        // executed, and such a read can itself be held by the file plane, whose thread
        // needs the evaluator to answer it.
        let agent = self.agent();
        let (context, event) = self.context_of(&agent, &request);
        let policy = self.policy();
        let mut decision = policy.set.evaluate(&context, &self.opts);
        let mut state = lock(&self.state);
        let mut note = None;
        if let RequestKind::Exec { path, fileless, .. } = &request.kind {
            if *fileless {
                decision = Decision::new(
                    Action::Deny,
                    None,
                    None,
                    "fileless exec (execveat of a file descriptor) is never allowed for agents".into(),
                );
            } else if agent.ring >= 3 && decision.allowed && Path::new(path) != self.entry_program {
                decision = Decision::new(
                    Action::Deny,
                    None,
                    None,
                    format!("ring {}: only the entry command may be executed", agent.ring),
                );
                note = Some("ring floor");
            }
        }
        // Budgets: charged only for actions that would run, so a denied attempt
        // does not use up the budget of allowed ones.
        if decision.limit.is_some() && (decision.allowed || decision.action == Action::RequireApproval) {
            decision = state.limiter.apply(decision);
        }
        match decision.action {
            Action::RequireApproval if !state.killed => {
                state.next_approval += 1;
                let id = state.next_approval;
                let exec_approval = exec_identity(&request);
                if self.show_denials {
                    let what = describe(&request);
                    let rule = decision.matched_rule.as_deref().unwrap_or("?");
                    let line = format!(
                        "agt-jail: approval needed (request {id}): {what} by pid {} (rule {rule}); \
                         run `agt-jail approve --agent {} {id}` or `agt-jail deny --agent {} {id}` \
                         within {}s\n",
                        request.pid,
                        agent.id,
                        agent.id,
                        self.approval_timeout.as_secs()
                    );
                    let _ = io::stderr().lock().write_all(line.as_bytes());
                }
                self.record(
                    &agent,
                    &policy.hash,
                    request.pid,
                    event,
                    &context,
                    &decision,
                    request.plane,
                    "held",
                    started,
                    Some(id),
                    None,
                );
                state.pending.insert(
                    id,
                    Pending {
                        reply,
                        context,
                        decision,
                        pid: request.pid,
                        event: event.to_string(),
                        plane: request.plane,
                        started,
                        exec_approval,
                        policy: Arc::clone(&policy),
                    },
                );
                drop(state);
                self.arm_timeout(id);
            }
            _ => {
                let killed = decision.action == Action::Kill;
                let allowed = decision.allowed && !state.killed;
                let outcome = if killed {
                    "kill"
                } else if allowed {
                    "allow"
                } else {
                    "deny"
                };
                if allowed {
                    if let Some((tid, identity)) = exec_identity(&request) {
                        if let Err(err) = self.actuator.approve_exec(tid, identity) {
                            // Tier A without the approval: the kernel would refuse it anyway.
                            agt_jail_jail::stderr_line!("agt-jail: cannot pass the exec approval to the kernel: {err}");
                        }
                    }
                    if let RequestKind::File { identity: Some(identity), path, .. } = &request.kind {
                        if policy.file_cacheable && self.file_always_allowed(&policy.set, &agent, request.pid, path) {
                            self.actuator.allow_file_always(*identity);
                        }
                    }
                }
                let denial = (!allowed).then(|| describe(&request));
                if killed {
                    state.killed = true;
                }
                drop(state);
                if killed {
                    self.kill(&decision);
                }
                // The denial line goes out before the answer, so it is not spliced into
                // the error message the agent prints about it.
                if let Some(what) = &denial {
                    self.print_denial(what, request.pid, &decision);
                }
                // The record is in the file before the action takes effect (or fails), so
                // agt-jail being killed in between loses no decision that had an effect.
                self.record(
                    &agent,
                    &policy.hash,
                    request.pid,
                    event,
                    &context,
                    &decision,
                    request.plane,
                    outcome,
                    started,
                    None,
                    note,
                );
                // Trust moves before the answer: a denial that demotes or kills the agent
                // takes effect while the caller is still held, so it cannot act in between.
                if denial.is_some() {
                    self.lower_trust();
                    reply.answer(Answer::Deny);
                } else {
                    reply.answer(Answer::Allow);
                    self.reward();
                }
            }
        }
    }

    /// Whether every access to `path` is allowed without a budget, so the answer can be cached.
    fn file_always_allowed(&self, set: &PolicySet, agent: &AgentFacts, pid: u32, path: &str) -> bool {
        let proc = self.proc_facts(pid);
        [(FileEvent::Open, "read"), (FileEvent::Write, "write"), (FileEvent::Write, "read_write")].iter().all(
            |(event, access)| {
                let d = set.evaluate(&context::file_context(agent, &proc, *event, path, access), &self.opts);
                d.allowed && d.limit.is_none()
            },
        )
    }

    fn arm_timeout(self: &Arc<Self>, id: u64) {
        let me = Arc::clone(self);
        let timeout = self.approval_timeout;
        let spawned = thread::Builder::new().name("approval-timeout".into()).spawn(move || {
            thread::sleep(timeout);
            let _ = me.resolve(id, false, "timeout");
        });
        if spawned.is_err() {
            // No timer means no timeout: deny now rather than hold forever.
            let _ = self.resolve(id, false, "timeout");
        }
    }

    /// Approves a held action.
    pub fn approve(&self, id: u64) -> Result<(), String> {
        self.resolve(id, true, "approved")
    }

    /// Denies a held action.
    pub fn deny(&self, id: u64) -> Result<(), String> {
        self.resolve(id, false, "denied")
    }

    /// The held actions, for `status`.
    pub fn pending(&self) -> Vec<(u64, String, u32, Option<String>)> {
        let state = lock(&self.state);
        let mut out: Vec<_> = state
            .pending
            .iter()
            .map(|(id, p)| (*id, p.event.clone(), p.pid, p.decision.matched_rule.clone()))
            .collect();
        out.sort_by_key(|p| p.0);
        out
    }

    fn resolve(&self, id: u64, approve: bool, outcome: &str) -> Result<(), String> {
        let mut state = lock(&self.state);
        let Some(p) = state.pending.remove(&id) else {
            return Err(format!("no pending request {id} (already answered, timed out, or never asked)"));
        };
        let agent = state.agent.clone();
        let allowed = approve && !state.killed;
        drop(state);
        if allowed {
            if let Some((tid, identity)) = p.exec_approval {
                if let Err(err) = self.actuator.approve_exec(tid, identity) {
                    agt_jail_jail::stderr_line!("agt-jail: cannot pass the exec approval to the kernel: {err}");
                }
            }
        }
        let mut decision = p.decision.clone();
        decision.allowed = allowed;
        decision.reason = format!("{} ({outcome})", decision.reason);
        // Recorded before the answer, as in `handle`.
        self.record(
            &agent,
            &p.policy.hash,
            p.pid,
            &p.event,
            &p.context,
            &decision,
            p.plane,
            outcome,
            p.started,
            Some(id),
            None,
        );
        // As in `handle`: a denial's trust effects before the answer.
        if allowed {
            p.reply.answer(Answer::Allow);
            self.reward();
        } else {
            self.on_denied(&format!("held {} (request {id}, {outcome})", p.event), p.pid, &decision);
            p.reply.answer(Answer::Deny);
        }
        Ok(())
    }

    /// Ends the agent: every process of its cgroup, at once.
    pub fn kill(&self, decision: &Decision) {
        lock(&self.state).killed = true;
        let rule = decision.matched_rule.as_deref().unwrap_or("kill switch");
        if let Err(err) = self.actuator.kill_agent() {
            agt_jail_jail::stderr_line!("agt-jail: cannot kill the agent ({rule}): {err}");
        } else if self.show_denials {
            let _ = io::stderr().lock().write_all(format!("agt-jail: killed the agent ({rule})\n").as_bytes());
        }
        // Anything still held goes with it.
        let pending: Vec<u64> = lock(&self.state).pending.keys().copied().collect();
        for id in pending {
            let _ = self.resolve(id, false, "killed");
        }
    }

    /// Moves the agent to a more restricted ring. Refuses to move it the other way.
    pub fn demote(&self, ring: u8, why: &str) -> Result<(), String> {
        let mut state = lock(&self.state);
        if ring > 3 {
            return Err(format!("ring {ring} does not exist (rings are 0-3)"));
        }
        if ring < state.agent.ring {
            return Err(format!(
                "ring {ring} is less restricted than the agent's ring {}; agents are never promoted",
                state.agent.ring
            ));
        }
        if ring == state.agent.ring {
            return Ok(());
        }
        let from = state.agent.ring;
        state.agent.ring = ring;
        let agent = state.agent.clone();
        drop(state);
        self.actuator.forget_file_answers();
        self.actuator.demote(&agent).map_err(|e| format!("cannot tighten the kernel planes: {e}"))?;
        lock(&self.sink).write_value(&json!({
            "time": now_secs(), "agent": agent.id, "event": "demote", "from_ring": from, "to_ring": ring, "reason": why,
        }));
        if self.show_denials {
            let line = format!("agt-jail: agent {} demoted from ring {from} to ring {ring} ({why})\n", agent.id);
            let _ = io::stderr().lock().write_all(line.as_bytes());
        }
        Ok(())
    }

    /// A denied action is reported and lowers trust.
    fn on_denied(&self, what: &str, pid: u32, decision: &Decision) {
        self.print_denial(what, pid, decision);
        self.lower_trust();
    }

    fn print_denial(&self, what: &str, pid: u32, decision: &Decision) {
        if self.show_denials {
            let rule = decision.matched_rule.as_deref().map(|r| format!(" (rule {r})")).unwrap_or_default();
            let line = format!("agt-jail: denied {what} (pid {pid}){rule}: {}\n", decision.reason);
            let _ = io::stderr().lock().write_all(line.as_bytes());
        }
    }

    /// Lowers trust after a denial; a tier change demotes, a trust floor kills.
    fn lower_trust(&self) {
        self.lower_trust_by(1);
    }

    /// [`Self::lower_trust`] for `denials` denials at once (a kernel deny summary).
    fn lower_trust_by(&self, denials: u64) {
        let rules = self.trust_rules;
        let reason = if denials == 1 { "denied action".to_string() } else { format!("{denials} denied actions") };
        self.change_trust(|trust, _| trust::penalize(trust, &rules, denials), &reason);
    }

    /// An allowed action earns trust back, up to the ceiling.
    fn reward(&self) {
        let rules = self.trust_rules;
        if rules.reward > 0 {
            self.change_trust(|trust, state| trust::reward(trust, &rules, state.reward_ceiling), "allowed action");
        }
    }

    /// Charges the decay due by `now` (called periodically; `now` is passed in so tests
    /// can move the clock).
    pub fn decay_trust(&self, now: Instant) {
        let Some(decay) = self.trust_rules.decay else { return };
        self.change_trust(
            |trust, state| {
                let (after, used) = trust::decay(trust, &decay, now.saturating_duration_since(state.decayed_to));
                state.decayed_to += used;
                after
            },
            "decay",
        );
    }

    /// Moves trust by `step` (given the trust and the state); a change is recorded, and
    /// then a tier change demotes the ring (never the other way) and trust below the kill
    /// threshold ends the agent.
    fn change_trust(&self, step: impl FnOnce(u32, &mut State) -> u32, reason: &str) {
        let mut state = lock(&self.state);
        let before = state.agent.trust;
        let after = step(before, &mut state);
        if after == before || state.killed {
            return;
        }
        state.agent.trust = after;
        state.agent.tier = context::tier_of(after).to_string();
        let agent = state.agent.clone();
        drop(state);
        let kills = after < self.trust_rules.kill_below;
        let demotes = ring_floor(after) > agent.ring;
        {
            let mut sink = lock(&self.sink);
            sink.write_value(&json!({
                "time": now_secs(), "agent": agent.id, "did": agent.did, "event": "trust", "before": before,
                "after": after, "tier": agent.tier, "ring": agent.ring, "reason": reason,
            }));
            // Pushed out before its effects (a demotion, the kill switch); otherwise with
            // the next batch, as the observation that caused it.
            if kills || demotes {
                sink.flush();
            }
        }
        if kills {
            let d = Decision::new(
                Action::Kill,
                None,
                None,
                format!("trust {after} fell below {}", self.trust_rules.kill_below),
            );
            self.kill(&d);
            return;
        }
        if demotes {
            let why = format!("trust fell from {before} to {after} ({})", agent.tier);
            if let Err(err) = self.demote(ring_floor(after), &why) {
                agt_jail_jail::stderr_line!("agt-jail: {err}");
            }
        }
    }

    /// Records a network event that the kernel already decided: the context is filled in
    /// (process facts from the kernel's record when it carries them), the policy consulted
    /// for the matched rule, and a disagreement between kernel and policy reported loudly.
    ///
    /// This is the path of the kernel's event stream, so nothing in it is built per event that
    /// can be kept: the context is one [`NetContextBuf`] updated in place, its `agent` and
    /// `proc` sections are serialised when they change, and the decision's JSON when it
    /// differs from the last event's.
    pub fn observe_net(&self, obs: &NetObservation<'_>) {
        let started = Instant::now();
        let mut guard = lock(&self.net);
        let net = &mut *guard;
        net.ctx.set_agent(&lock(&self.state).agent);
        match &obs.caller {
            Some(caller) => {
                let set = |exe: &str| net.ctx.set_proc(obs.pid, caller.ppid, caller.uid, caller.comm, exe);
                if caller.exe == NO_EXE {
                    self.with_exe(obs.pid, set);
                } else {
                    self.with_named_exe(obs.pid, caller.exe, set);
                }
            }
            None => {
                let p = self.cached_proc_facts(obs.pid);
                net.ctx.set_proc(p.pid, p.ppid, p.uid, &p.comm, &p.exe);
            }
        }
        net.ctx.set_net(obs.event, obs.family, obs.protocol, obs.addr, obs.port, obs.domain);
        let what = || format!("{} to {}:{}", obs.event.as_str(), obs.addr, obs.port);
        let policy = self.policy();
        let (decision, outcome, note) = self.decide_kernel(&policy.set, net.ctx.value(), &what, obs.kernel);
        let decision_json = decision_json(&mut net.decision, &decision);
        let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics.decision(outcome, "kernel", obs.count, latency_us);
        lock(&self.sink).write_kernel(&KernelRecord {
            ctx: &net.ctx,
            count: (obs.count != 1).then_some(obs.count),
            decision_json,
            latency_us,
            matched_rule: decision.matched_rule.as_deref(),
            note,
            outcome,
            pid: obs.pid,
            policy: &policy.hash,
        });
        drop(guard);
        self.after_kernel_verdict(obs.kernel, obs.pid, &decision, &what, obs.count);
    }

    /// Records a file access the kernel decided (Tier A: the LSM file hooks).
    pub fn observe_file(&self, pid: u32, event: FileEvent, path: &str, access: &str, kernel: KernelVerdict) {
        let agent = self.agent();
        let proc = self.cached_proc_facts(pid);
        let ctx = context::file_context(&agent, &proc, event, path, access);
        let what = || format!("{} of {path}", event.as_str());
        let started = Instant::now();
        let policy = self.policy();
        let (decision, outcome, note) = self.decide_kernel(&policy.set, &ctx, &what, kernel);
        let event_name = ctx["event"].as_str().unwrap_or("?");
        let record = RecordArgs {
            agent: &agent,
            policy: &policy.hash,
            pid,
            event: event_name,
            context: &ctx,
            decision: &decision,
            plane: "kernel",
        };
        self.write_record(record, outcome, started, None, note);
        self.after_kernel_verdict(kernel, pid, &decision, &what, 1);
    }

    /// The policy's decision on an event the kernel decided, the outcome the kernel's verdict
    /// means, and a note when they differ.
    fn decide_kernel(
        &self,
        set: &PolicySet,
        ctx: &Value,
        what: &dyn Fn() -> String,
        kernel: KernelVerdict,
    ) -> (Decision, &'static str, Option<&'static str>) {
        let mut decision = set.evaluate(ctx, &self.opts);
        let mut note = None;
        let outcome = match kernel {
            KernelVerdict::Allow => "allow",
            KernelVerdict::Kill => "kill",
            KernelVerdict::Deny | KernelVerdict::RateLimited | KernelVerdict::Floor => "deny",
        };
        match kernel {
            KernelVerdict::RateLimited => {
                decision.allowed = false;
                decision.rate_limited = true;
                decision.reason = format!("Rate limited (kernel counter): {}", decision.reason);
            }
            KernelVerdict::Floor => note = Some("ring floor (profile allow-list or deny rule)"),
            _ => {
                let kernel_allowed = kernel == KernelVerdict::Allow;
                if kernel_allowed != decision.allowed && decision.action != Action::RequireApproval {
                    note = Some(DISAGREE);
                    agt_jail_jail::stderr_line!(
                        "agt-jail: warning: the kernel {} a {} that the policy {}s ({})",
                        if kernel_allowed { "allowed" } else { "denied" },
                        what(),
                        decision.action,
                        decision.matched_rule.as_deref().unwrap_or("default")
                    );
                }
            }
        }
        (decision, outcome, note)
    }

    /// What follows a kernel verdict: a kill ends the agent, a deny lowers trust (once per
    /// denied call a summary stands for).
    fn after_kernel_verdict(
        &self,
        kernel: KernelVerdict,
        pid: u32,
        decision: &Decision,
        what: &dyn Fn() -> String,
        count: u64,
    ) {
        if kernel == KernelVerdict::Kill {
            self.kill(decision);
        } else if kernel != KernelVerdict::Allow {
            if self.show_denials {
                self.print_denial(&what(), pid, decision);
            }
            self.lower_trust_by(count);
        }
    }

    /// Writes a kernel observation that carries no decision (exec done, fork, exit).
    pub fn observe_raw(&self, value: &Value) {
        lock(&self.sink).write_value(value);
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        agent: &AgentFacts,
        policy: &str,
        pid: u32,
        event: &str,
        context: &Value,
        decision: &Decision,
        plane: &str,
        outcome: &str,
        started: Instant,
        approval: Option<u64>,
        note: Option<&str>,
    ) {
        let record = RecordArgs { agent, policy, pid, event, context, decision, plane };
        self.write_record(record, outcome, started, approval, note);
    }

    fn write_record(
        &self,
        r: RecordArgs<'_>,
        outcome: &str,
        started: Instant,
        approval: Option<u64>,
        note: Option<&str>,
    ) {
        let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics.decision(outcome, r.plane, 1, latency_us);
        let mut sink = lock(&self.sink);
        sink.write_buffered(Record {
            seq: 0,
            time: now_secs(),
            agent: &r.agent.id,
            pid: r.pid,
            event: r.event,
            context: r.context,
            decision: r.decision,
            matched_rule: r.decision.matched_rule.as_deref(),
            plane: r.plane,
            policy: r.policy,
            outcome,
            latency_us,
            approval,
            note,
            // Only kernel deny summaries stand for more than one call; they are written
            // from their parts (`write_kernel`).
            count: None,
        });
        // Held actions are few and matter one by one; kernel observations come in bursts
        // and are flushed once per batch by the reader (`flush`).
        if r.plane != "kernel" {
            sink.flush();
        }
    }
}

/// The note of a record whose kernel verdict the policy would not have given.
const DISAGREE: &str = "kernel and policy disagree";

/// The network path's parts kept from one kernel event to the next (the event thread is
/// their one user; the lock only makes the evaluator shareable).
#[derive(Default)]
struct NetPath {
    ctx: NetContextBuf,
    /// The last decision and its JSON: a stream of events is mostly decided by a few rules.
    decision: Option<(Decision, Vec<u8>)>,
}

/// A kernel network record's parts, for [`RecordSink::write_kernel`].
struct KernelRecord<'a> {
    /// The event's context (agent, process, destination).
    ctx: &'a NetContextBuf,
    count: Option<u64>,
    /// The decision's JSON, keys in canonical order ([`decision_json`]).
    decision_json: &'a [u8],
    latency_us: u64,
    matched_rule: Option<&'a str>,
    note: Option<&'a str>,
    outcome: &'a str,
    pid: u32,
    policy: &'a str,
}

/// The JSON of `decision`, serialised again only when it differs from the `last` one.
fn decision_json<'a>(last: &'a mut Option<(Decision, Vec<u8>)>, decision: &Decision) -> &'a [u8] {
    let stale = !matches!(last, Some((seen, _)) if seen == decision);
    if stale {
        // Serialising plain strings and numbers into a Vec does not fail. Through a JSON
        // tree, whose objects are sorted maps: the keys come out in canonical order.
        let json = serde_json::to_value(decision).and_then(|v| serde_json::to_vec(&v)).unwrap_or_default();
        *last = Some((decision.clone(), json));
    }
    last.as_ref().map_or(&[], |(_, json)| json.as_slice())
}

/// What a record is about (the fields [`Record`] borrows).
struct RecordArgs<'a> {
    agent: &'a AgentFacts,
    policy: &'a str,
    pid: u32,
    event: &'a str,
    context: &'a Value,
    decision: &'a Decision,
    plane: &'a str,
}

/// A network event the kernel decided, as the evaluator records it.
#[derive(Debug, Clone)]
pub struct NetObservation<'a> {
    /// The calling process (tgid); 0 for a deny summary of unknown threads.
    pub pid: u32,
    pub event: NetEvent,
    pub family: NetFamily,
    pub protocol: NetProto,
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub domain: Option<&'a str>,
    pub kernel: KernelVerdict,
    /// Process facts the kernel's record carries; `None` reads them from /proc.
    pub caller: Option<KernelCaller<'a>>,
    /// Calls the event stands for (more than 1 for a kernel deny summary).
    pub count: u64,
}

/// The caller's facts as the kernel recorded them at the event.
#[derive(Debug, Clone, Copy)]
pub struct KernelCaller<'a> {
    pub ppid: u32,
    pub uid: u32,
    pub comm: &'a str,
    /// The executable the caller runs, as the kernel keys it (`agt_jail_common::ExeKey`);
    /// all zero when the kernel did not know.
    pub exe: [u64; 3],
}

/// What the kernel did with a network event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelVerdict {
    Allow,
    Deny,
    Kill,
    /// Denied because the rule's `limit` was used up (kernel counter).
    RateLimited,
    /// Denied by the ring's own floor (profile allow-list, --deny-connect), before the policy.
    Floor,
}

impl crate::Decider for Arc<Evaluator> {
    fn decide(&self, request: Request, reply: Reply) {
        self.handle(request, reply);
    }
}

fn exec_identity(request: &Request) -> Option<(u32, FileIdentity)> {
    match &request.kind {
        RequestKind::Exec { identity: Some(identity), fileless: false, .. } => Some((request.tid, *identity)),
        _ => None,
    }
}

fn describe(request: &Request) -> String {
    match &request.kind {
        RequestKind::Exec { path, argv, fileless: true, .. } => {
            format!("fileless exec ({path}, argv {})", argv.join(" "))
        }
        RequestKind::Exec { path, argv, .. } => format!("exec of {path} ({})", argv.join(" ")),
        RequestKind::File { path, access: FileAccess::Read, .. } => format!("read of {path}"),
        RequestKind::File { path, .. } => format!("write of {path}"),
    }
}

/// The process facts of `pid` from `/proc`; unreadable fields stay empty (the process
/// may be gone by now, and the decision must still be made).
pub fn proc_facts(proc_root: &Path, pid: u32) -> ProcFacts {
    let dir = proc_root.join(pid.to_string());
    let comm = std::fs::read_to_string(dir.join("comm")).map(|s| s.trim_end().to_string()).unwrap_or_default();
    let exe = std::fs::read_link(dir.join("exe")).map(|p| p.display().to_string()).unwrap_or_default();
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    let field = |name: &str| status_field(&status, name);
    ProcFacts { pid, ppid: field("PPid:").unwrap_or(0), uid: field("Uid:").unwrap_or(u32::MAX), comm, exe }
}

/// The first number after `name` (e.g. `"PPid:"`) in a `/proc/PID/status` text.
pub(crate) fn status_field(status: &str, name: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix(name)).and_then(|rest| rest.split_whitespace().next())?.parse().ok()
}

/// Whether a rule's decision can depend on more than the path and the agent: then a
/// file answer must not be cached.
fn reads_varying_state(set: &PolicySet) -> bool {
    fn reads(expr: &Expr) -> bool {
        let varies = |o: &Operand| matches!(o, Operand::Path(p) if p.first().is_some_and(|s| s == "proc"));
        match expr {
            Expr::Truthy(o) => varies(o),
            Expr::Cmp(_, a, b) => varies(a) || varies(b),
            Expr::Matches(o, _) | Expr::Glob(o, _) => varies(o),
            Expr::Not(e) => reads(e),
            Expr::And(es) | Expr::Or(es) => es.iter().any(reads),
        }
    }
    set.rules().iter().any(|r| match (r.condition, r.v4_condition) {
        (Some(expr), _) => reads(expr),
        (None, Some((field, _, _))) => field.starts_with("proc."),
        (None, None) => true,
    }) || set.has_rego()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Decider;
    use std::sync::{atomic::AtomicUsize, atomic::Ordering, mpsc};

    #[derive(Default)]
    struct Recorder {
        kills: AtomicUsize,
        demotions: Mutex<Vec<u8>>,
        approvals: Mutex<Vec<(u32, FileIdentity)>>,
    }

    impl Actuator for Recorder {
        fn kill_agent(&self) -> io::Result<()> {
            self.kills.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn approve_exec(&self, tid: u32, identity: FileIdentity) -> io::Result<()> {
            lock(&self.approvals).push((tid, identity));
            Ok(())
        }
        fn demote(&self, agent: &AgentFacts) -> io::Result<()> {
            lock(&self.demotions).push(agent.ring);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);
    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Lines {
        fn records(&self) -> Vec<Value> {
            String::from_utf8(lock(&self.0).clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    const POLICY: &str = r#"
apiVersion: governance.toolkit/v1
name: t
agents: ["*"]
default_action: allow
rules:
  - name: no-rm-rf
    condition: "event == 'exec' and exec.argv contains '-rf'"
    action: deny
    priority: 100
  - name: push-needs-approval
    condition: "event == 'exec' and exec.argv contains 'push'"
    action: require_approval
    priority: 90
  - name: wipe-kills
    condition: "event == 'exec' and exec.path endswith '/mkfs'"
    action: kill
    priority: 100
  - name: budget
    condition: "event == 'exec'"
    action: allow
    limit: "3/day"
    priority: 1
  - name: keys
    condition: "event in ['file_open', 'file_write'] and file.path endswith 'id_rsa'"
    action: deny
    priority: 100
  - name: no-api
    condition: "event == 'connect' and net.domain == 'api.example'"
    action: deny
    priority: 100
"#;

    fn evaluator(timeout: Duration) -> (Arc<Evaluator>, Arc<Recorder>, Lines) {
        evaluator_with(timeout, TrustRules { penalty: 0, kill_below: 0, reward: 0, ..TrustRules::default() })
    }

    fn evaluator_with(timeout: Duration, trust: TrustRules) -> (Arc<Evaluator>, Arc<Recorder>, Lines) {
        evaluator_at(timeout, trust, Path::new("/nonexistent-proc"))
    }

    fn evaluator_at(timeout: Duration, trust: TrustRules, proc_root: &Path) -> (Arc<Evaluator>, Arc<Recorder>, Lines) {
        let set = PolicySet::from_str("t.yaml", POLICY).unwrap();
        let actuator = Arc::new(Recorder::default());
        let lines = Lines::default();
        let agent = AgentFacts {
            id: "a1".into(),
            did: "did:mesh:00".into(),
            ring: 2,
            trust: 500,
            tier: "standard".into(),
            session: "s".into(),
        };
        let cfg = EvaluatorConfig {
            policies: Arc::new(set),
            policy_hash: "sha256:a".into(),
            agent,
            approval_timeout: timeout,
            trust,
            entry_program: PathBuf::from("/bin/entry"),
            show_denials: false,
            proc_root: proc_root.to_path_buf(),
        };
        let ev = Evaluator::new(cfg, RecordSink::new(Some(Box::new(lines.clone()))), actuator.clone());
        (ev, actuator, lines)
    }

    fn exec(argv: &[&str]) -> Request {
        Request {
            pid: 7,
            tid: 8,
            kind: RequestKind::Exec {
                path: format!("/usr/bin/{}", argv[0]),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                fileless: false,
                identity: Some(FileIdentity { dev: 1, ino: 2 }),
                interpreter: None,
            },
            plane: "seccomp_notify",
            proc: None,
        }
    }

    fn ask(ev: &Arc<Evaluator>, request: Request) -> mpsc::Receiver<Answer> {
        let (tx, rx) = mpsc::channel();
        ev.decide(request, Reply::new(move |a| tx.send(a).unwrap()));
        rx
    }

    #[test]
    fn denies_by_rule_and_records_it() {
        let (ev, actuator, lines) = evaluator(Duration::from_secs(60));
        assert_eq!(ask(&ev, exec(&["rm", "-rf", "/"])).recv().unwrap(), Answer::Deny);
        assert_eq!(ask(&ev, exec(&["ls"])).recv().unwrap(), Answer::Allow);
        let records = lines.records();
        assert_eq!(records[0]["matched_rule"], "no-rm-rf");
        assert_eq!(records[0]["outcome"], "deny");
        assert_eq!(records[0]["context"]["exec"]["argv"][1], "-rf");
        assert_eq!(records[1]["outcome"], "allow");
        // Only the allowed exec's file is handed to the kernel's exec hook.
        assert_eq!(lock(&actuator.approvals).len(), 1);
        // Each record is counted once, by its outcome and plane.
        let m = ev.metrics().snapshot();
        let plane = "seccomp_notify".to_string();
        assert_eq!(m.decisions, vec![("allow".into(), plane.clone(), 1), ("deny".into(), plane.clone(), 1)]);
        assert_eq!(m.denied_calls, vec![(plane, 1)]);
        assert_eq!(m.latency_buckets.last(), Some(&2));
    }

    #[test]
    fn a_session_budget_allows_n_and_denies_the_next() {
        let (ev, _, lines) = evaluator(Duration::from_secs(60));
        let answers: Vec<Answer> = (0..4).map(|_| ask(&ev, exec(&["cc"])).recv().unwrap()).collect();
        assert_eq!(answers, [Answer::Allow, Answer::Allow, Answer::Allow, Answer::Deny]);
        let last = lines.records().pop().unwrap();
        assert_eq!(last["decision"]["rate_limited"], true);
    }

    #[test]
    fn denied_attempts_do_not_use_the_budget() {
        let (ev, _, _) = evaluator(Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(ask(&ev, exec(&["rm", "-rf", "/"])).recv().unwrap(), Answer::Deny);
        }
        assert_eq!(ask(&ev, exec(&["cc"])).recv().unwrap(), Answer::Allow);
    }

    #[test]
    fn approval_holds_until_approved() {
        let (ev, _, lines) = evaluator(Duration::from_secs(600));
        let rx = ask(&ev, exec(&["git", "push"]));
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "held, not answered");
        let pending = ev.pending();
        assert_eq!(pending.len(), 1);
        ev.approve(pending[0].0).unwrap();
        assert_eq!(rx.recv().unwrap(), Answer::Allow);
        assert!(ev.approve(pending[0].0).is_err(), "answered once");
        let outcomes: Vec<String> =
            lines.records().iter().map(|r| r["outcome"].as_str().unwrap().to_string()).collect();
        assert_eq!(outcomes, ["held", "approved"]);
    }

    #[test]
    fn approval_can_be_denied_and_times_out() {
        let (ev, _, _) = evaluator(Duration::from_millis(30));
        let rx = ask(&ev, exec(&["git", "push"]));
        // Nobody answers: the timeout denies.
        assert_eq!(rx.recv().unwrap(), Answer::Deny);
        let (ev, _, _) = evaluator(Duration::from_secs(600));
        let rx = ask(&ev, exec(&["git", "push"]));
        ev.deny(ev.pending()[0].0).unwrap();
        assert_eq!(rx.recv().unwrap(), Answer::Deny);
    }

    #[test]
    fn kill_rule_kills_once_and_denies_everything_after() {
        let (ev, actuator, _) = evaluator(Duration::from_secs(600));
        let held = ask(&ev, exec(&["git", "push"]));
        let mut mkfs = exec(&["mkfs"]);
        if let RequestKind::Exec { path, .. } = &mut mkfs.kind {
            *path = "/sbin/mkfs".into();
        }
        assert_eq!(ask(&ev, mkfs).recv().unwrap(), Answer::Deny);
        assert_eq!(actuator.kills.load(Ordering::SeqCst), 1);
        assert_eq!(held.recv().unwrap(), Answer::Deny, "a held action dies with the agent");
        assert_eq!(ask(&ev, exec(&["ls"])).recv().unwrap(), Answer::Deny);
    }

    #[test]
    fn fileless_exec_is_denied() {
        let (ev, _, _) = evaluator(Duration::from_secs(60));
        let mut r = exec(&["x"]);
        if let RequestKind::Exec { fileless, .. } = &mut r.kind {
            *fileless = true;
        }
        assert_eq!(ask(&ev, r).recv().unwrap(), Answer::Deny);
    }

    #[test]
    fn file_rules_see_access() {
        let (ev, _, lines) = evaluator(Duration::from_secs(60));
        let file = |path: &str, access| Request {
            pid: 7,
            tid: 7,
            kind: RequestKind::File { path: path.into(), access, identity: None },
            plane: "fanotify",
            proc: None,
        };
        assert_eq!(ask(&ev, file("/root/.ssh/id_rsa", FileAccess::Read)).recv().unwrap(), Answer::Deny);
        assert_eq!(ask(&ev, file("/work/src.rs", FileAccess::Write)).recv().unwrap(), Answer::Allow);
        let records = lines.records();
        assert_eq!(records[0]["event"], "file_open");
        assert_eq!(records[1]["event"], "file_write");
    }

    #[test]
    fn demotion_only_tightens_and_ring3_execs_only_the_entry() {
        let (ev, actuator, _) = evaluator(Duration::from_secs(60));
        assert!(ev.demote(1, "test").is_err());
        ev.demote(3, "test").unwrap();
        assert_eq!(*lock(&actuator.demotions), [3]);
        assert_eq!(ask(&ev, exec(&["ls"])).recv().unwrap(), Answer::Deny);
        let mut entry = exec(&["entry"]);
        if let RequestKind::Exec { path, .. } = &mut entry.kind {
            *path = "/bin/entry".into();
        }
        assert_eq!(ask(&ev, entry).recv().unwrap(), Answer::Allow);
    }

    #[test]
    fn denials_lower_trust_and_a_tier_change_demotes() {
        // 500 - 250 = 250 is untrusted, whose floor is ring 3.
        let (ev, actuator, _) = evaluator_with(
            Duration::from_secs(1),
            TrustRules { penalty: 250, kill_below: 0, reward: 0, ..TrustRules::default() },
        );
        ask(&ev, exec(&["rm", "-rf", "/"])).recv().unwrap();
        assert_eq!(ev.agent().trust, 250);
        assert_eq!(ev.agent().ring, 3);
        assert_eq!(*lock(&actuator.demotions), [3]);
    }

    fn trust_records(lines: &Lines) -> Vec<(u64, u64, String, String)> {
        lines
            .records()
            .into_iter()
            .filter(|r| r["event"] == "trust")
            .map(|r| {
                let n = |k: &str| r[k].as_u64().unwrap();
                (n("before"), n("after"), r["tier"].as_str().unwrap().into(), r["reason"].as_str().unwrap().into())
            })
            .collect()
    }

    #[test]
    fn allowed_actions_win_back_trust_up_to_the_start_and_each_change_is_a_record() {
        let rules = TrustRules { penalty: 30, reward: 10, ..TrustRules::default() };
        let (ev, _, lines) = evaluator_with(Duration::from_secs(1), rules);
        ask(&ev, exec(&["rm", "-rf", "/"])).recv().unwrap();
        // Three allowed execs: the test policy's exec budget.
        for _ in 0..3 {
            assert_eq!(ask(&ev, exec(&["ls"])).recv().unwrap(), Answer::Allow);
        }
        ev.flush();
        assert_eq!(ev.agent().trust, 500, "the ceiling is the starting trust");
        let tier = |t: &str| t.to_string();
        assert_eq!(
            trust_records(&lines),
            [
                (500, 470, tier("probationary"), tier("denied action")),
                (470, 480, tier("probationary"), tier("allowed action")),
                (480, 490, tier("probationary"), tier("allowed action")),
                (490, 500, tier("standard"), tier("allowed action")),
            ],
            "no record once trust stops moving"
        );
        // A ceiling above the start lets rewards lift it further.
        let (ev, _, _) = evaluator_with(Duration::from_secs(1), TrustRules { reward_max: Some(520), ..rules });
        for _ in 0..3 {
            ask(&ev, exec(&["ls"])).recv().unwrap();
        }
        assert_eq!(ev.agent().trust, 520);
    }

    #[test]
    fn decay_on_a_moved_clock_lowers_trust_demotes_and_kills() {
        let decay = crate::trust::Decay { points: 100, every: Duration::from_secs(60), floor: 0 };
        let rules = TrustRules { reward: 0, kill_below: 150, decay: Some(decay), ..TrustRules::default() };
        let (ev, actuator, lines) = evaluator_with(Duration::from_secs(1), rules);
        let start = Instant::now();
        ev.decay_trust(start + Duration::from_secs(59));
        assert_eq!(ev.agent().trust, 500, "no whole step yet");
        ev.decay_trust(start + Duration::from_secs(121));
        assert_eq!(ev.agent().trust, 300);
        // The next step counts from the last whole one (120 s), not from the call.
        ev.decay_trust(start + Duration::from_secs(180));
        assert_eq!((ev.agent().trust, ev.agent().tier.as_str(), ev.agent().ring), (200, "untrusted", 3));
        assert_eq!(*lock(&actuator.demotions), [3]);
        assert_eq!(actuator.kills.load(Ordering::SeqCst), 0);
        ev.decay_trust(start + Duration::from_secs(240));
        assert_eq!(actuator.kills.load(Ordering::SeqCst), 1, "100 is below the kill threshold 150");
        ev.flush();
        let after: Vec<u64> = trust_records(&lines).iter().map(|r| r.1).collect();
        assert_eq!(after, [300, 200, 100]);
        assert!(trust_records(&lines).iter().all(|r| r.3 == "decay"));
    }

    fn connect(kernel: KernelVerdict, count: u64) -> NetObservation<'static> {
        NetObservation {
            pid: 7,
            event: NetEvent::Connect,
            family: NetFamily::Inet,
            protocol: NetProto::Tcp,
            addr: "127.0.0.2".parse().unwrap(),
            port: 80,
            domain: None,
            kernel,
            caller: Some(KernelCaller { ppid: 3, uid: 1000, comm: "curl", exe: NO_EXE }),
            count,
        }
    }

    #[test]
    fn records_are_written_as_canonical_json() {
        // The audit log takes these lines as they are when they are canonical already
        // (sorting an object costs it more than the rest of the record).
        let (ev, _, lines) = evaluator(Duration::from_secs(1));
        ev.observe_net(&connect(KernelVerdict::Floor, 1));
        ev.observe_net(&connect(KernelVerdict::Deny, 40));
        ev.observe_file(7, FileEvent::Write, "/etc/passwd", "write", KernelVerdict::Deny);
        ev.flush();
        let text = String::from_utf8(lock(&lines.0).clone()).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        for line in text.lines() {
            // `time` is last; a whole number of seconds would be written as `N.0`.
            let (body, time) = line.rsplit_once(",\"time\":").unwrap();
            assert!(time.trim_end_matches('}').parse::<f64>().is_ok(), "{line}");
            let record = format!("{body}}}");
            let mut canonical = Vec::new();
            agt_jail_audit::canon::canonicalize(record.as_bytes(), &mut canonical).unwrap();
            assert_eq!(String::from_utf8(canonical).unwrap(), record);
        }
    }

    #[test]
    fn kernel_records_carry_the_kernels_process_facts_and_counts() {
        let (ev, _, lines) = evaluator_with(
            Duration::from_secs(1),
            TrustRules { penalty: 10, kill_below: 0, reward: 0, ..TrustRules::default() },
        );
        ev.observe_net(&connect(KernelVerdict::Allow, 1));
        ev.observe_net(&connect(KernelVerdict::Floor, 4));
        // Buffered until the reader's flush.
        assert!(lines.records().is_empty());
        ev.flush();
        let (records, trust): (Vec<Value>, Vec<Value>) =
            lines.records().into_iter().partition(|r| r["event"] != "trust");
        assert_eq!(records.len(), 2);
        assert_eq!((trust[0]["before"].as_u64(), trust[0]["after"].as_u64()), (Some(500), Some(460)));
        let proc = &records[0]["context"]["proc"];
        assert_eq!((proc["pid"].as_u64(), proc["ppid"].as_u64()), (Some(7), Some(3)));
        assert_eq!((proc["uid"].as_u64(), proc["comm"].as_str()), (Some(1000), Some("curl")));
        assert!(records[0].get("count").is_none());
        assert_eq!((records[1]["outcome"].as_str(), records[1]["count"].as_u64()), (Some("deny"), Some(4)));
        // A summary of four denials costs what four denials cost.
        assert_eq!(ev.agent().trust, 460);
    }

    #[test]
    fn a_network_record_is_the_record_a_fresh_context_and_evaluation_write() {
        let (ev, _, lines) = evaluator_with(
            Duration::from_secs(1),
            TrustRules { penalty: 10, kill_below: 0, reward: 0, ..TrustRules::default() },
        );
        for _ in 0..3 {
            ev.observe_net(&connect(KernelVerdict::Floor, 1));
        }
        ev.flush();
        let strip = |mut record: Value| {
            for varying in ["seq", "time", "latency_us"] {
                assert!(record.as_object_mut().unwrap().remove(varying).is_some(), "{varying} in {record}");
            }
            record
        };
        let records: Vec<Value> = lines.records().into_iter().filter(|r| r["event"] != "trust").map(strip).collect();
        // Each denial lowers trust, and the context shows the agent as it was at the event.
        let trusts: Vec<u64> = records.iter().map(|r| r["context"]["agent"]["trust"].as_u64().unwrap()).collect();
        assert_eq!(trusts, [500, 490, 480]);
        // The same event with the same agent: two equal records.
        let (ev, _, lines) = evaluator(Duration::from_secs(1));
        for _ in 0..2 {
            ev.observe_net(&connect(KernelVerdict::Floor, 1));
        }
        ev.flush();
        let records: Vec<Value> = lines.records().into_iter().map(strip).collect();
        assert_eq!(records[0], records[1]);
        assert_eq!(records[0]["note"], "ring floor (profile allow-list or deny rule)");
        assert_eq!(records[0]["decision"]["allowed"], true, "the policy's own decision is recorded");
        // And it is the line `Record` itself serialises to, with the context built afresh.
        let exe = records[0]["context"]["proc"]["exe"].as_str().unwrap().to_string();
        let proc = ProcFacts { pid: 7, ppid: 3, uid: 1000, comm: "curl".into(), exe };
        let addr = "127.0.0.2".parse().unwrap();
        let ctx =
            context::net_context(&ev.agent(), &proc, NetEvent::Connect, NetFamily::Inet, NetProto::Tcp, addr, 80, None);
        assert_eq!(records[0]["context"], ctx);
        let decision = ev.policy().set.evaluate(&ctx, &ev.opts);
        let direct = serde_json::to_value(Record {
            seq: 0,
            time: 0.0,
            agent: "a1",
            pid: 7,
            event: "connect",
            context: &ctx,
            decision: &decision,
            matched_rule: decision.matched_rule.as_deref(),
            plane: "kernel",
            policy: "sha256:a",
            outcome: "deny",
            latency_us: 0,
            approval: None,
            note: Some("ring floor (profile allow-list or deny rule)"),
            count: None,
        })
        .unwrap();
        assert_eq!(strip(direct), records[0]);
    }

    #[test]
    fn every_network_record_carries_its_own_events_facts() {
        // Events that differ in process, destination, domain and verdict, in turn: the context
        // filled in place must never keep a field of the event before.
        let (ev, _, lines) = evaluator(Duration::from_secs(1));
        let mut expected = Vec::new();
        for i in 0..6u16 {
            let mut obs = connect(if i % 3 == 0 { KernelVerdict::Floor } else { KernelVerdict::Allow }, 1);
            let comm = if i % 2 == 0 { "curl" } else { "wget\"2" };
            obs.caller = Some(KernelCaller { ppid: u32::from(i), uid: 1000 + u32::from(i % 2), comm, exe: NO_EXE });
            obs.port = 80 + i;
            obs.domain = (i % 2 == 1).then_some("api.example");
            if i == 4 {
                obs.event = NetEvent::Sendmsg;
                obs.family = NetFamily::Inet6;
                obs.protocol = NetProto::Udp;
                obs.addr = "2001:db8::1".parse().unwrap();
            }
            ev.observe_net(&obs);
            let proc = ProcFacts {
                pid: 7,
                ppid: u32::from(i),
                uid: 1000 + u32::from(i % 2),
                comm: comm.into(),
                exe: String::new(),
            };
            expected.push((obs.event, obs.family, obs.protocol, obs.addr, obs.port, obs.domain, proc));
        }
        ev.flush();
        let records = lines.records();
        assert_eq!(records.len(), expected.len());
        for (record, (event, family, protocol, addr, port, domain, mut proc)) in records.iter().zip(expected) {
            proc.exe = record["context"]["proc"]["exe"].as_str().unwrap().to_string();
            let ctx = context::net_context(&ev.agent(), &proc, event, family, protocol, addr, port, domain);
            assert_eq!(record["context"], ctx);
            assert_eq!(record["event"], event.as_str());
            let decision = ev.policy().set.evaluate(&ctx, &ev.opts);
            assert_eq!(record["decision"], serde_json::to_value(&decision).unwrap());
            assert_eq!(record["matched_rule"], json!(decision.matched_rule));
            let disagree = record["outcome"] == "allow" && !decision.allowed;
            assert_eq!(record.get("note").is_some_and(|n| n == DISAGREE), disagree, "{record}");
        }
        let rules: Vec<&Value> = records.iter().map(|r| &r["matched_rule"]).collect();
        assert!(rules.contains(&&json!("no-api")) && rules.contains(&&Value::Null), "decisions differ: {rules:?}");
    }

    #[test]
    fn network_records_name_the_callers_executable_by_the_kernels_key() {
        // A fake /proc: process 20 is alive and runs `tool`; every other pid has exited.
        let root = tempfile::tempdir().unwrap();
        let tool = root.path().join("tool");
        std::fs::write(&tool, "").unwrap();
        let tool_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&tool).unwrap());
        let proc_root = root.path().join("proc");
        std::fs::create_dir_all(proc_root.join("20")).unwrap();
        std::os::unix::fs::symlink(&tool, proc_root.join("20/exe")).unwrap();
        let (ev, _, lines) = evaluator_at(
            Duration::from_secs(1),
            TrustRules { penalty: 0, kill_below: 0, reward: 0, ..TrustRules::default() },
            &proc_root,
        );
        let exe_in_record = |pid: u32, exe: [u64; 3]| {
            let mut obs = connect(KernelVerdict::Allow, 1);
            obs.pid = pid;
            obs.caller = Some(KernelCaller { ppid: 1, uid: 0, comm: "c", exe });
            ev.observe_net(&obs);
            ev.flush();
            let record = lines.records().pop().unwrap();
            assert_eq!(record["context"]["proc"]["pid"], pid);
            record["context"]["proc"]["exe"].as_str().unwrap().to_string()
        };
        let (curl, tools, other_file, relative) = ([1, 1, 11], [2, 2, tool_ino], [3, 3, tool_ino + 1], [4, 4, 44]);

        assert_eq!(exe_in_record(7, curl), "", "an unknown key of an exited process: unknown, not a guess");
        ev.process_execd(7, curl, "/usr/bin/curl");
        assert_eq!(exe_in_record(7, curl), "/usr/bin/curl", "the exec record names the key");
        assert_eq!(exe_in_record(9, curl), "/usr/bin/curl", "the key names the file, whichever process runs it");

        assert_eq!(exe_in_record(20, tools), tool.display().to_string(), "a live process running the key's file");
        ev.process_execd(21, tools, "/bin/alias");
        assert_eq!(exe_in_record(21, tools), tool.display().to_string(), "a key is named once");
        assert_eq!(exe_in_record(20, other_file), "", "/proc shows another file than the key's: not used");

        ev.process_execd(22, relative, "./relative");
        assert_eq!(exe_in_record(22, relative), "", "a relative exec path names nothing");
        assert_eq!(exe_in_record(20, NO_EXE), tool.display().to_string(), "no key: /proc by pid, as before");
    }

    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<usize>>);
    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            *lock(&self.0) += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_batch_of_kernel_records_is_one_write() {
        let writes = Writes::default();
        let mut sink = RecordSink::new(Some(Box::new(writes.clone())));
        for _ in 0..100 {
            sink.write_value(&json!({"event": "fork"}));
        }
        assert_eq!(*lock(&writes.0), 0);
        sink.flush();
        assert_eq!(*lock(&writes.0), 1);
        sink.flush();
        assert_eq!(*lock(&writes.0), 1, "nothing buffered, nothing written");
    }

    #[test]
    fn reads_proc_facts_from_a_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("42");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("comm"), "bash\n").unwrap();
        std::fs::write(p.join("status"), "Name:\tbash\nPPid:\t7\nUid:\t1000\t1000\t1000\t1000\n").unwrap();
        let f = proc_facts(dir.path(), 42);
        assert_eq!((f.pid, f.ppid, f.uid, f.comm.as_str()), (42, 7, 1000, "bash"));
        let missing = proc_facts(dir.path(), 43);
        assert_eq!(missing.comm, "");
    }

    #[test]
    fn a_reload_under_a_stream_of_decisions_switches_every_decision_at_once() {
        let (ev, _, lines) = evaluator(Duration::from_secs(60));
        // B denies `ls`, which A allows; the budget rule keeps its name (and its count).
        let b = POLICY.replace(
            "rules:\n",
            "rules:\n  - name: no-ls\n    condition: \"event == 'exec' and exec.argv contains 'ls'\"\n    action: deny\n    priority: 200\n",
        );
        let set_b = Arc::new(PolicySet::from_str("t.yaml", &b).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streams: Vec<_> = (0..4)
            .map(|_| {
                let (ev, stop) = (Arc::clone(&ev), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        ask(&ev, exec(&["ls", "-l"])).recv().unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        assert_eq!(ev.reload(PolicySnapshot::new(set_b, "sha256:b".into()), &|_| {}), "sha256:a");
        assert_eq!(ev.policy().hash, "sha256:b");
        thread::sleep(Duration::from_millis(50));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in streams {
            assert!(s.join().unwrap() > 0);
        }
        // After the reload has returned, every new decision is B's.
        assert_eq!(ask(&ev, exec(&["ls"])).recv().unwrap(), Answer::Deny);
        let records = lines.records();
        let switch = records.iter().position(|r| r["event"] == "policy_reloaded").unwrap();
        assert_eq!(
            (records[switch]["old_policy"].as_str(), records[switch]["policy"].as_str()),
            (Some("sha256:a"), Some("sha256:b"))
        );
        let (mut a, mut b) = (0, 0);
        for (i, r) in records.iter().enumerate().filter(|(i, _)| *i != switch) {
            match r["policy"].as_str() {
                Some("sha256:a") => {
                    a += 1;
                    assert_ne!(r["matched_rule"], "no-ls", "record {i} names A but was decided by B: {r}");
                    assert!(i < switch || r["outcome"] != "deny" || r["decision"]["rate_limited"] == true, "{r}");
                }
                Some("sha256:b") => {
                    b += 1;
                    assert!(i > switch, "a record of B before the switch: {r}");
                    assert_eq!(
                        (r["matched_rule"].as_str(), r["outcome"].as_str()),
                        (Some("no-ls"), Some("deny")),
                        "{r}"
                    );
                }
                _ => panic!("record {i} names no policy or another one: {r}"),
            }
        }
        assert!(a > 0 && b > 0, "both policies decided ({a} under A, {b} under B)");
    }

    #[test]
    fn a_held_action_is_answered_under_the_policy_it_was_held_under() {
        let (ev, _, lines) = evaluator(Duration::from_secs(600));
        let rx = ask(&ev, exec(&["git", "push"]));
        let other = Arc::new(PolicySet::from_str("t.yaml", "name: t\nagents: ['*']\ndefault_action: deny\n").unwrap());
        ev.reload(PolicySnapshot::new(other, "sha256:b".into()), &|_| {});
        ev.approve(ev.pending()[0].0).unwrap();
        assert_eq!(rx.recv().unwrap(), Answer::Allow);
        let policies: Vec<(String, String)> = lines
            .records()
            .iter()
            .map(|r| (r["event"].as_str().unwrap().to_string(), r["policy"].as_str().unwrap().to_string()))
            .collect();
        let expect = [("exec", "sha256:a"), ("policy_reloaded", "sha256:b"), ("exec", "sha256:a")];
        assert_eq!(policies, expect.map(|(e, p)| (e.to_string(), p.to_string())));
    }
}
