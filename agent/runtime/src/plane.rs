//! The planes of a governed agent behind one interface: each compiles its part of the
//! policy's plan (made for this host's capabilities) into kernel tables, installs them for
//! the agent, and turns its own kernel events into what the evaluator is told.
//!
//! Compiling is pure, installing goes through [`Kernel`] (the loader's programs in a run, a
//! recording fake in tests), and observing is pure too: [`deliver`] hands the observation
//! to the evaluator, which decides and writes the record.
use std::{net::IpAddr, sync::Mutex};

use agt_jail_common::FileRuleKind;
use agt_jail_ebpf_loader::{
    lsm::{self, ExecLsm, FileLsm, FileRule, GuardLsm},
    AgentPrograms, Event, LoaderError, NetLayer, NetTables, VerdictName,
};
use agt_jail_policy::{
    context::{FileEvent, NetEvent, NetFamily, NetProto},
    plan::{self, NetPlan, PathKind, Plan},
};
use agt_jail_supervisor::evaluator::{Evaluator, KernelCaller, KernelVerdict, NetObservation};

use crate::govern::lock;

/// What installing a plane's tables needs of the kernel side. [`AgentPrograms`] is the
/// real one; the calls are per agent (its cgroup id) and replace what was there.
pub trait Kernel {
    fn install_net_plan(&mut self, agent_id: u64, tables: &NetTables) -> Result<(), LoaderError>;
    fn install_file_rules(&mut self, agent_id: u64, rules: &[FileRule]) -> Result<(), LoaderError>;
    fn enable_exec_verdicts(&mut self, agent_id: u64) -> Result<(), LoaderError>;
    fn enable_guard(&mut self, agent_id: u64, flags: u32) -> Result<(), LoaderError>;
}

impl Kernel for AgentPrograms {
    fn install_net_plan(&mut self, agent_id: u64, tables: &NetTables) -> Result<(), LoaderError> {
        AgentPrograms::install_net_plan(self, agent_id, tables)
    }

    fn install_file_rules(&mut self, agent_id: u64, rules: &[FileRule]) -> Result<(), LoaderError> {
        FileLsm::install_file_rules(self, agent_id, rules)
    }

    fn enable_exec_verdicts(&mut self, agent_id: u64) -> Result<(), LoaderError> {
        ExecLsm::enable_exec_verdicts(self, agent_id)
    }

    fn enable_guard(&mut self, agent_id: u64, flags: u32) -> Result<(), LoaderError> {
        GuardLsm::enable(self, agent_id, flags)
    }
}

/// One plane: its tables, how they are made and installed, and which events are its own.
pub trait Plane {
    /// The plane's name, as `policy explain` and the records call it.
    const NAME: &'static str;
    /// What the kernel holds for this plane (nothing to install: `None`).
    type Tables;
    /// The plane's part of the plan as kernel tables. Pure.
    fn compile(&self, plan: &Plan) -> Option<Self::Tables>;
    /// Puts the tables in force for the agent.
    fn install(&self, kernel: &mut dyn Kernel, agent_id: u64, tables: &Self::Tables) -> Result<(), LoaderError>;
    /// The observation a decoded event is, when the event is this plane's.
    fn observe<'e>(&self, event: &'e Event) -> Option<Observation<'e>>;
}

/// What one kernel event tells the evaluator.
#[derive(Debug)]
pub enum Observation<'e> {
    /// A network call the cgroup programs decided: checked against the policy.
    Net { hook: NetEvent, pid: u32, net: NetParts<'e>, verdict: VerdictName },
    /// An open the kernel's file hook decided (Tier A): checked against the policy.
    File { pid: u32, event: FileEvent, path: &'e str, access: &'static str, kernel: KernelVerdict },
    /// A process exec'd: its facts change, and the event is recorded.
    Execd { pid: u32, exe: [u64; 3], filename: &'e str, event: &'e Event },
    /// A process exited: its facts are forgotten, and the event is recorded.
    Exited { pid: u32, event: &'e Event },
    /// Recorded as it is.
    Record(&'e Event),
}

/// The network plane: the cgroup connect, sendmsg and bind programs and their tables.
pub struct NetPlane;

impl Plane for NetPlane {
    const NAME: &'static str = "net";
    type Tables = NetTables;

    fn compile(&self, plan: &Plan) -> Option<NetTables> {
        plan.net.as_ref().map(net_tables)
    }

    fn install(&self, kernel: &mut dyn Kernel, agent_id: u64, tables: &NetTables) -> Result<(), LoaderError> {
        kernel.install_net_plan(agent_id, tables)
    }

    fn observe<'e>(&self, event: &'e Event) -> Option<Observation<'e>> {
        match event {
            Event::Connect { tgid, family, addr, port, protocol, verdict, layer, plan, caller, count, .. } => {
                let net = NetParts {
                    family: *family,
                    addr: *addr,
                    port: *port,
                    protocol,
                    layer: *layer,
                    plan: *plan,
                    caller,
                    count: *count,
                };
                Some(Observation::Net { hook: NetEvent::Connect, pid: *tgid, net, verdict: *verdict })
            }
            Event::Sendmsg { tgid, net, verdict, .. } => Some(Observation::Net {
                hook: NetEvent::Sendmsg,
                pid: *tgid,
                net: NetParts::of(net),
                verdict: *verdict,
            }),
            Event::Bind { tgid, net, verdict, .. } => {
                Some(Observation::Net { hook: NetEvent::Bind, pid: *tgid, net: NetParts::of(net), verdict: *verdict })
            }
            _ => None,
        }
    }
}

/// The exec plane's kernel part (Tier A): the exec hook takes the evaluator's answers.
/// Its rules are decided on the seccomp user-notification path, not from tables.
pub struct ExecPlane;

impl Plane for ExecPlane {
    const NAME: &'static str = "exec";
    type Tables = ();

    fn compile(&self, _plan: &Plan) -> Option<()> {
        Some(())
    }

    fn install(&self, kernel: &mut dyn Kernel, agent_id: u64, (): &()) -> Result<(), LoaderError> {
        kernel.enable_exec_verdicts(agent_id)
    }

    fn observe<'e>(&self, event: &'e Event) -> Option<Observation<'e>> {
        match event {
            Event::Exec { tgid, exe, filename, .. } => {
                Some(Observation::Execd { pid: *tgid, exe: *exe, filename, event })
            }
            Event::Exit { tgid, .. } => Some(Observation::Exited { pid: *tgid, event }),
            Event::ExecCheck { .. } | Event::Fork { .. } => Some(Observation::Record(event)),
            _ => None,
        }
    }
}

/// The file plane's kernel part (Tier A): the policy's path forms in the file hooks. What
/// the kernel cannot match stays with the fanotify plane.
pub struct FilePlane;

/// The file hooks' rules, and the path forms left to the fanotify plane.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileTables {
    pub rules: Vec<FileRule>,
    /// Name forms spanning components (".config/gcloud"): the kernel matches one component
    /// per name rule.
    pub spanning: Vec<String>,
}

impl Plane for FilePlane {
    const NAME: &'static str = "file";
    type Tables = FileTables;

    fn compile(&self, plan: &Plan) -> Option<FileTables> {
        let kernel_plan = plan.file.as_ref().filter(|f| !f.paths.is_empty())?;
        let mut tables = FileTables::default();
        for p in &kernel_plan.paths {
            let name_form = matches!(p.kind, PathKind::Component | PathKind::Basename | PathKind::BasenamePrefix);
            if name_form && p.text.contains('/') {
                tables.spanning.push(p.text.clone());
                continue;
            }
            tables.rules.push(FileRule {
                kind: match p.kind {
                    PathKind::Exact => FileRuleKind::Exact,
                    PathKind::Prefix => FileRuleKind::Prefix,
                    PathKind::Component => FileRuleKind::Component,
                    PathKind::Basename => FileRuleKind::Basename,
                    PathKind::BasenamePrefix => FileRuleKind::BasenamePrefix,
                },
                text: p.text.clone(),
                // mkdir is a kind of create for the kernel's access bits.
                access_mask: (p.access & 0x1f)
                    | if p.access & plan::ACCESS_MKDIR != 0 { plan::ACCESS_CREATE } else { 0 },
                rule_index: u32::from(p.rule),
            });
        }
        Some(tables)
    }

    fn install(&self, kernel: &mut dyn Kernel, agent_id: u64, tables: &FileTables) -> Result<(), LoaderError> {
        kernel.install_file_rules(agent_id, &tables.rules)
    }

    fn observe<'e>(&self, event: &'e Event) -> Option<Observation<'e>> {
        let Event::File { tgid, op, access, path, verdict, .. } = event else { return None };
        if op != "open" {
            return Some(Observation::Record(event));
        }
        let writes = access.iter().any(|a| a != "read");
        let (file_event, access) = match (writes, access.iter().any(|a| a == "read")) {
            (false, _) => (FileEvent::Open, "read"),
            (true, true) => (FileEvent::Write, "read_write"),
            (true, false) => (FileEvent::Write, "write"),
        };
        let kernel = if *verdict == VerdictName::Allow { KernelVerdict::Allow } else { KernelVerdict::Deny };
        Some(Observation::File { pid: *tgid, event: file_event, path, access, kernel })
    }
}

/// The guard hooks (Tier A): ptrace, foreign signals, mount, bpf, module loading and
/// foreign sockets closed for the agent. Turned on when the entry command's execve is held:
/// the jail's own set-up, in the agent's cgroup, mounts its view first.
pub struct GuardPlane;

impl GuardPlane {
    /// Everything the guard hooks close.
    pub const FLAGS: u32 = lsm::guard::DENY_PTRACE
        | lsm::guard::DENY_FOREIGN_SIGNALS
        | lsm::guard::DENY_MOUNT
        | lsm::guard::DENY_BPF
        | lsm::guard::DENY_KERNEL_LOAD
        | lsm::guard::DENY_FOREIGN_SOCKETS;
}

impl Plane for GuardPlane {
    const NAME: &'static str = "guard";
    type Tables = u32;

    fn compile(&self, _plan: &Plan) -> Option<u32> {
        Some(Self::FLAGS)
    }

    fn install(&self, kernel: &mut dyn Kernel, agent_id: u64, flags: &u32) -> Result<(), LoaderError> {
        kernel.enable_guard(agent_id, *flags)
    }

    fn observe<'e>(&self, event: &'e Event) -> Option<Observation<'e>> {
        matches!(event, Event::Guard { .. }).then_some(Observation::Record(event))
    }
}

/// The observation an event is: the first plane that owns it says; an event no plane owns
/// is recorded as it is.
pub fn observation(event: &Event) -> Observation<'_> {
    NetPlane
        .observe(event)
        .or_else(|| FilePlane.observe(event))
        .or_else(|| ExecPlane.observe(event))
        .or_else(|| GuardPlane.observe(event))
        .unwrap_or(Observation::Record(event))
}

/// Hands an observation to the evaluator, which decides (network and file observations
/// are checked against the policy) and writes the record. `domain`: the policy domain of
/// a network destination, when one is known.
pub fn deliver(evaluator: &Evaluator, observation: Observation<'_>, domain: &dyn Fn(IpAddr) -> Option<String>) {
    match observation {
        Observation::Net { hook, pid, net, verdict } => {
            let domain = domain(net.addr);
            evaluator.observe_net(&net_observation(hook, pid, &net, verdict, domain.as_deref()));
        }
        Observation::File { pid, event, path, access, kernel } => {
            evaluator.observe_file(pid, event, path, access, kernel)
        }
        Observation::Execd { pid, exe, filename, event } => {
            evaluator.process_execd(pid, exe, filename);
            record(evaluator, event);
        }
        Observation::Exited { pid, event } => {
            evaluator.forget_process(pid);
            record(evaluator, event);
        }
        Observation::Record(event) => record(evaluator, event),
    }
}

fn record(evaluator: &Evaluator, event: &Event) {
    if let Ok(value) = serde_json::to_value(event) {
        evaluator.observe_raw(&value);
    }
}

/// Hands one kernel event to the evaluator: network events carry the kernel's verdict
/// and are checked against the policy; the rest are recorded as observations.
/// `names`: the names the agent's resolver opened an address for (the proxy's answers
/// give `net.domain` before the plan's host-side resolution does).
pub fn observe(
    evaluator: &Evaluator,
    plan: &Mutex<Option<Plan>>,
    event: &Event,
    names: &dyn Fn(IpAddr) -> Option<String>,
) {
    deliver(evaluator, observation(event), &|addr| names(addr).or_else(|| domain_of(plan, addr)));
}

/// The policy domain an address was resolved from, as the plan in force knows it.
fn domain_of(plan: &Mutex<Option<Plan>>, addr: IpAddr) -> Option<String> {
    let plan = lock(plan);
    let class = plan.as_ref()?.net.as_ref()?.class_of(addr)?;
    class.domains.first().cloned()
}

/// A decoded network event's details, borrowed from the event (connect records carry them
/// in the event itself, sendmsg and bind in a [`agt_jail_ebpf_loader::NetDetail`]).
#[derive(Debug)]
pub struct NetParts<'a> {
    pub family: agt_jail_ebpf_loader::NetFamily,
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: &'a str,
    pub layer: NetLayer,
    pub plan: Option<agt_jail_ebpf_loader::NetPlanHit>,
    pub caller: &'a agt_jail_ebpf_loader::Caller,
    pub count: u64,
}

impl<'a> NetParts<'a> {
    pub fn of(net: &'a agt_jail_ebpf_loader::NetDetail) -> NetParts<'a> {
        NetParts {
            family: net.family,
            addr: net.addr,
            port: net.port,
            protocol: &net.protocol,
            layer: net.layer,
            plan: net.plan,
            caller: &net.caller,
            count: net.count,
        }
    }
}

/// The policy's protocol of a decoded event's protocol name (the loader names what the
/// kernel's IP protocol number is; anything but tcp and udp is `other`).
pub fn net_proto(name: &str) -> NetProto {
    NetProto::ALL.into_iter().find(|p| p.as_str() == name).unwrap_or(NetProto::Other)
}

/// The loader's protocol of the policy's (one match, checked by the compiler both ways).
fn kernel_proto(proto: NetProto) -> agt_jail_ebpf_loader::NetProto {
    match proto {
        NetProto::Tcp => agt_jail_ebpf_loader::NetProto::Tcp,
        NetProto::Udp => agt_jail_ebpf_loader::NetProto::Udp,
        NetProto::Other => agt_jail_ebpf_loader::NetProto::Other,
    }
}

/// The evaluator's view of a decoded network event.
pub fn net_observation<'a>(
    hook: NetEvent,
    tgid: u32,
    net: &NetParts<'a>,
    verdict: VerdictName,
    domain: Option<&'a str>,
) -> NetObservation<'a> {
    let family = match net.family {
        agt_jail_ebpf_loader::NetFamily::Inet => NetFamily::Inet,
        agt_jail_ebpf_loader::NetFamily::Inet6 => NetFamily::Inet6,
    };
    let kernel = match (verdict, net.layer) {
        (VerdictName::Allow, _) => KernelVerdict::Allow,
        (VerdictName::Kill, _) => KernelVerdict::Kill,
        (VerdictName::Deny, NetLayer::Plan) if net.plan.is_some_and(|hit| hit.rate_limited) => {
            KernelVerdict::RateLimited
        }
        (VerdictName::Deny, NetLayer::Plan) => KernelVerdict::Deny,
        (VerdictName::Deny, _) => KernelVerdict::Floor,
    };
    let caller = net.caller;
    NetObservation {
        pid: tgid,
        event: hook,
        family,
        protocol: net_proto(net.protocol),
        addr: net.addr,
        port: net.port,
        domain,
        kernel,
        caller: Some(KernelCaller { ppid: caller.ppid, uid: caller.uid, comm: &caller.comm, exe: caller.exe }),
        count: net.count,
    }
}

/// The kernel tables of a compiled network plan (the loader's shape of the same data).
pub fn net_tables(net: &NetPlan) -> NetTables {
    use agt_jail_ebpf_loader::{NetAction, NetHook, NetLimitRow, NetVerdictRow};
    let mut tables = NetTables::default();
    for class in &net.addr_classes {
        match class.addr {
            IpAddr::V4(v4) => tables.v4.push((v4, class.prefix_len, class.id)),
            IpAddr::V6(v6) => tables.v6.push((v6, class.prefix_len, class.id)),
        }
    }
    tables.ports = net.ports.iter().map(|(port, class)| (*port, *class)).collect();
    for row in &net.rows {
        let hook = match NetEvent::from_code(row.event) {
            Some(NetEvent::Sendmsg) => NetHook::Sendmsg,
            Some(NetEvent::Bind) => NetHook::Bind,
            _ => NetHook::Connect,
        };
        let action = match row.action {
            plan::ACTION_ALLOW => NetAction::Allow,
            plan::ACTION_KILL => NetAction::Kill,
            _ => NetAction::Deny,
        };
        tables.verdicts.push(NetVerdictRow {
            addr_class: row.addr_class,
            port_class: row.port_class,
            hook,
            proto: kernel_proto(NetProto::from_ip_proto(row.proto)),
            action,
            log: row.flags & plan::FLAG_LOG != 0,
            rule: row.rule,
            limit: row.limit,
        });
    }
    tables.limits = net.limits.iter().map(|l| NetLimitRow { id: l.id, max: l.max, period_ns: l.period_ns }).collect();
    tables
}

#[cfg(test)]
mod tests;
