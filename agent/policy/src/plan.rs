//! Compiles a [`PolicySet`] for one agent on one host into enforcement planes.
//!
//! * [`NetPlan`]: the kernel network tables (docs: "How rules are enforced"; contract in the
//!   netplan tables). Built by *enumeration*: every address constant and prefix, every port
//!   constant the relevant rules test splits addresses and ports into classes; the real
//!   [`PolicySet::evaluate`] decides one representative context per (address class, port class,
//!   event, protocol), and the kernel only looks the class up. A rule that reads anything the
//!   kernel cannot supply per event makes the plane uncompilable (never approximated).
//! * [`FileKernelPlan`]: Tier A path forms of deny-class file rules for the LSM file hooks.
//! * [`RulePlan`]: per rule, the plane that enforces it on this host (for `policy explain`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use serde_json::Value;

use crate::context::{net_context, AgentFacts, NetEvent, NetFamily, NetProto, ProcFacts};
use crate::expr::{CmpOp, Expr, Operand};
use crate::value::py_float_str;
use crate::{Action, Decision, EvalOptions, PolicySet, Strategy};

/// Most verdict rows one agent's plan may have.
pub const MAX_VERDICT_ROWS: usize = 65_536;
/// Most explicit port → class entries (ports outside every listed class are class 0).
pub const MAX_PORT_ENTRIES: usize = 4096;
/// Most address prefixes (both families together).
pub const MAX_ADDR_PREFIXES: usize = 65_536;
/// Rule index meaning "the policy default" (no rule matched).
pub const RULE_DEFAULT: u16 = 0xffff;

/// What the host offers (from `agt-jail doctor`'s detection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostCaps {
    /// BPF LSM programs load and attach (Tier A).
    pub bpf_lsm: bool,
    /// fanotify permission events are available.
    pub fanotify: bool,
    /// The agent runs confined (rings 1-3: its own mount namespace).
    pub confined: bool,
    pub ring: u8,
}

/// Domain → the addresses the caller resolved it to (the compiler does no I/O).
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Strict mode: rules that no plane of this host can enforce before effect.
    #[error("strict mode: {}", .0.join("; "))]
    Unenforceable(Vec<String>),
}

/// One row of the verdict table (netplan §3), with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VerdictRow {
    pub addr_class: u32,
    pub port_class: u16,
    /// 1 connect, 2 sendmsg, 3 bind.
    pub event: u8,
    /// 6 tcp, 17 udp, 0 other.
    pub proto: u8,
    /// 0 allow, 1 deny, 2 kill.
    pub action: u8,
    /// bit0: log.
    pub flags: u8,
    /// Index into [`NetPlan::rules`]; [`RULE_DEFAULT`] for the policy default.
    pub rule: u16,
    /// 0 = none, else an id in [`NetPlan::limits`].
    pub limit: u32,
}

pub const ACTION_ALLOW: u8 = 0;
pub const ACTION_DENY: u8 = 1;
pub const ACTION_KILL: u8 = 2;
pub const FLAG_LOG: u8 = 1;

/// An address class: one prefix of one trie (netplan §1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddrClass {
    pub id: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// The domains this address was resolved from (host prefixes only).
    pub domains: Vec<String>,
}

/// A rule of the userspace rule table the kernel rows point into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    pub policy: String,
    pub rule: String,
}

/// A rate limit (netplan §4); `period_ns == 0` is a per-session budget that never resets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitRow {
    pub id: u32,
    pub max: u64,
    pub period_ns: u64,
    pub policy: String,
    pub rule: String,
}

/// The kernel network tables of one agent.
#[derive(Debug, Clone, Serialize)]
pub struct NetPlan {
    /// Every address class; v4 ones go in the v4 trie, v6 ones in the v6 trie. `0.0.0.0/0` and
    /// `::/0` are always present.
    pub addr_classes: Vec<AddrClass>,
    /// port → port class; a port not listed is class 0.
    pub ports: BTreeMap<u16, u16>,
    pub port_classes: u16,
    pub rows: Vec<VerdictRow>,
    pub rules: Vec<RuleRef>,
    pub limits: Vec<LimitRow>,
    #[serde(skip)]
    index: HashMap<(u32, u16, u8, u8), usize>,
    #[serde(skip)]
    miss: VerdictRow,
}

impl NetPlan {
    /// The kernel's algorithm: longest prefix of the address's own trie, port class (or 0), row.
    /// A miss anywhere is the fail-closed deny row.
    pub fn lookup(&self, event: NetEvent, proto: NetProto, addr: IpAddr, port: u16) -> &VerdictRow {
        let mut best: Option<&AddrClass> = None;
        for c in &self.addr_classes {
            if prefix_contains(c.addr, c.prefix_len, addr) && best.is_none_or(|b| c.prefix_len > b.prefix_len) {
                best = Some(c);
            }
        }
        let Some(class) = best else {
            return &self.miss;
        };
        let pc = self.ports.get(&port).copied().unwrap_or(0);
        match self.index.get(&(class.id, pc, event.code(), proto.code())) {
            Some(&i) => self.rows.get(i).unwrap_or(&self.miss),
            None => &self.miss,
        }
    }

    /// The address class `addr` falls in, if any.
    pub fn class_of(&self, addr: IpAddr) -> Option<&AddrClass> {
        self.addr_classes.iter().filter(|c| prefix_contains(c.addr, c.prefix_len, addr)).max_by_key(|c| c.prefix_len)
    }
}

fn prefix_contains(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a).mask(len) == u32::from(n),
        (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a).mask(len) == u128::from(n),
        _ => false,
    }
}

/// The integer form of an address of either family, for the prefix arithmetic that is
/// the same for both.
trait AddrBits: Copy + Ord {
    /// `self` with all but the first `len` bits cleared.
    fn mask(self, len: u8) -> Self;
    /// The last address of the prefix `self/len`.
    fn end(self, len: u8) -> Self;
    fn next(self) -> Option<Self>;
}

macro_rules! addr_bits {
    ($($t:ty),*) => {$(
        impl AddrBits for $t {
            fn mask(self, len: u8) -> Self {
                if len == 0 {
                    0
                } else {
                    self & (<$t>::MAX << (<$t>::BITS - u32::from(len).min(<$t>::BITS)))
                }
            }
            fn end(self, len: u8) -> Self {
                self | <$t>::MAX.checked_shr(u32::from(len)).unwrap_or(0)
            }
            fn next(self) -> Option<Self> {
                self.checked_add(1)
            }
        }
    )*};
}
addr_bits!(u32, u128);

/// Tier A path forms (for `lsm/file_open` and `lsm/path_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// The whole path equals the text.
    Exact,
    /// The path starts with the text.
    Prefix,
    /// The path contains `/` + text followed by `/` or its end (text may span components).
    Component,
    /// The last component equals the text.
    Basename,
    /// The last component starts with the text.
    BasenamePrefix,
}

pub const ACCESS_OPEN: u32 = 1;
pub const ACCESS_WRITE: u32 = 2;
pub const ACCESS_UNLINK: u32 = 4;
pub const ACCESS_RENAME: u32 = 8;
pub const ACCESS_CREATE: u32 = 16;
pub const ACCESS_MKDIR: u32 = 32;
const FILE_EVENTS: [(&str, u32); 6] = [
    ("file_open", ACCESS_OPEN),
    ("file_write", ACCESS_WRITE),
    ("unlink", ACCESS_UNLINK),
    ("rename", ACCESS_RENAME),
    ("create", ACCESS_CREATE),
    ("mkdir", ACCESS_MKDIR),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathRule {
    pub kind: PathKind,
    pub text: String,
    /// ACCESS_* bits of the events the rule denies.
    pub access: u32,
    /// Index into [`FileKernelPlan::rules`].
    pub rule: u16,
    /// 1 deny, 2 kill.
    pub action: u8,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FileKernelPlan {
    pub paths: Vec<PathRule>,
    pub rules: Vec<RuleRef>,
}

impl FileKernelPlan {
    /// Whether a path form denies `path` for an event with `access` bits (the kernel's check).
    pub fn matches(&self, path: &str, access: u32) -> Option<&PathRule> {
        self.paths.iter().find(|r| r.access & access != 0 && path_form_matches(r.kind, &r.text, path))
    }
}

pub fn path_form_matches(kind: PathKind, text: &str, path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    match kind {
        PathKind::Exact => path == text,
        PathKind::Prefix => path.starts_with(text),
        PathKind::Basename => path.contains('/') && base == text,
        PathKind::BasenamePrefix => base.starts_with(text),
        PathKind::Component => {
            let needle = format!("/{text}");
            path.match_indices(&needle).any(|(i, _)| matches!(path.as_bytes().get(i + needle.len()), None | Some(b'/')))
        }
    }
}

/// One plane note for one event class of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlaneNote {
    /// network | exec | file | file_namespace | process | other
    pub class: String,
    /// The plane(s) that enforce the rule for this class, when there is one.
    pub plane: Option<String>,
    /// Why it cannot be enforced before effect here, when it cannot.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RulePlan {
    pub policy: String,
    pub rule: String,
    pub action: Action,
    /// Events the rule can apply to (from `event ==`/`event in` guards); `None` = every event.
    pub events: Option<Vec<String>>,
    pub planes: Vec<PlaneNote>,
}

/// Everything compiled for one agent on one host.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// `None` when the network plane is uncompilable (see `net_error`).
    pub net: Option<NetPlan>,
    pub net_error: Option<String>,
    /// Tier A only.
    pub file: Option<FileKernelPlan>,
    pub rules: Vec<RulePlan>,
    pub warnings: Vec<String>,
    /// The plan reads `agent.trust`/`agent.tier`/`agent.ring`: recompile when they change.
    pub depends_on_agent_state: bool,
}

// ------------------------------------------------------------------ rule views

/// A rule as the compiler needs it.
struct CRule<'a> {
    policy: &'a str,
    name: &'a str,
    action: Action,
    priority: i64,
    scope: i64,
    inherited: bool,
    /// Position in load order across the set (for ties).
    order: usize,
    events: Option<BTreeSet<String>>,
    cond: Cond<'a>,
    limit: Option<&'a crate::RateSpec>,
}

enum Cond<'a> {
    Toolkit(&'a Expr),
    V4 { field: &'a str, path: Vec<String>, op: &'a str, value: &'a Value },
}

fn toolkit_applies(p: &crate::toolkit::Policy, agent: &AgentFacts) -> bool {
    // evaluate() takes the acting agent from the context: agent.did (always present in built contexts).
    p.wildcard || p.applies_to(&agent.did)
}

fn collect_rules<'a>(set: &'a PolicySet, agent: &AgentFacts) -> Vec<CRule<'a>> {
    let stage = EvalOptions::default().stage;
    let mut out = Vec::new();
    let mut order = 0;
    for p in &set.toolkit {
        if !toolkit_applies(p, agent) {
            continue;
        }
        for r in &p.rules {
            order += 1;
            if !r.enabled || r.stage != stage {
                continue;
            }
            out.push(CRule {
                policy: &p.name,
                name: &r.name,
                action: r.action,
                priority: r.priority,
                scope: p.scope as i64,
                inherited: r.inherited,
                order,
                events: event_guard(&r.condition),
                cond: Cond::Toolkit(&r.condition),
                limit: r.limit.as_ref(),
            });
        }
    }
    for v in set.rules() {
        let Some((field, op, value)) = v.v4_condition else {
            continue;
        };
        order += 1;
        let events = if field == "event" {
            match op {
                "eq" => value.as_str().map(|s| BTreeSet::from([s.to_string()])),
                "in" => value.as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
                _ => None,
            }
        } else {
            None
        };
        out.push(CRule {
            policy: v.policy,
            name: v.name,
            action: v.action,
            priority: v.priority,
            scope: 0,
            inherited: false,
            order,
            events,
            cond: Cond::V4 { field, path: field.split('.').map(str::to_string).collect(), op, value },
            limit: None,
        });
    }
    out
}

fn guard_of(e: &Expr) -> Option<BTreeSet<String>> {
    let is_event = |o: &Operand| matches!(o, Operand::Path(p) if p.len() == 1 && p[0] == "event");
    match e {
        Expr::Cmp(CmpOp::Eq, l, Operand::Lit(Value::String(s))) if is_event(l) => Some(BTreeSet::from([s.clone()])),
        Expr::Cmp(CmpOp::Eq, Operand::Lit(Value::String(s)), r) if is_event(r) => Some(BTreeSet::from([s.clone()])),
        // Only string items can equal a string event; other items never match.
        Expr::Cmp(CmpOp::In, l, Operand::Lit(Value::Array(items))) if is_event(l) => {
            Some(items.iter().filter_map(Value::as_str).map(str::to_string).collect())
        }
        Expr::Or(es) => {
            let mut all = BTreeSet::new();
            for e in es {
                all.extend(guard_of(e)?);
            }
            Some(all)
        }
        Expr::And(es) => event_guard_and(es),
        _ => None,
    }
}

fn event_guard_and(es: &[Expr]) -> Option<BTreeSet<String>> {
    let mut acc: Option<BTreeSet<String>> = None;
    for e in es {
        if let Some(g) = guard_of(e) {
            acc = Some(match acc {
                None => g,
                Some(a) => a.intersection(&g).cloned().collect(),
            });
        }
    }
    acc
}

/// The events a condition can hold for, from its `event` guards; `None` = any event.
pub fn event_guard(e: &Expr) -> Option<BTreeSet<String>> {
    match e {
        Expr::And(es) => event_guard_and(es),
        other => guard_of(other),
    }
}

const NET_EVENTS: [&str; 3] = ["connect", "sendmsg", "bind"];

fn can_apply(events: &Option<BTreeSet<String>>, class: &[&str]) -> bool {
    events.as_ref().is_none_or(|s| class.iter().any(|e| s.contains(*e)))
}

// ------------------------------------------------------------------ enumeration

#[derive(Clone, Copy, PartialEq, Eq)]
enum PathClass {
    Event,
    Addr,
    Port,
    Domain,
    Family,
    Proto,
    NetWhole,
    Proc,
    /// Same value for every network event of this agent.
    Const,
}

fn classify(p: &[String]) -> PathClass {
    match p.first().map(String::as_str) {
        Some("event") if p.len() == 1 => PathClass::Event,
        Some("proc") => PathClass::Proc,
        Some("net") => match (p.get(1).map(String::as_str), p.len()) {
            (None, _) => PathClass::NetWhole,
            (Some("addr"), 2) => PathClass::Addr,
            (Some("port"), 2) => PathClass::Port,
            (Some("domain"), 2) => PathClass::Domain,
            (Some("family"), 2) => PathClass::Family,
            (Some("protocol"), 2) => PathClass::Proto,
            _ => PathClass::Const,
        },
        _ => PathClass::Const,
    }
}

/// What the relevant rules test, collected for partitioning.
#[derive(Default)]
struct Atoms {
    v4: BTreeSet<(u32, u8)>,
    v6: BTreeSet<(u128, u8)>,
    ports: Vec<f64>,
    domains: BTreeSet<String>,
    reads_agent_state: bool,
}

fn numeric_constants(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Bool(b) => out.push(if *b { 1.0 } else { 0.0 }),
        Value::Number(n) => out.extend(n.as_f64()),
        Value::String(s) => out.extend(py_float_str(s).filter(|f| f.is_finite())),
        Value::Array(items) => items.iter().for_each(|i| numeric_constants(i, out)),
        _ => {}
    }
}

fn add_ip(atoms: &mut Atoms, s: &str) {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            atoms.v4.insert((u32::from(a), 32));
        }
        Ok(IpAddr::V6(a)) => {
            atoms.v6.insert((u128::from(a), 128));
        }
        // Not an address: equal to no rendered address, so it splits nothing.
        Err(_) => {}
    }
}

fn strings_of(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Canonical decimal octet → value; `None` when no rendered address has it.
fn octet(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 3 || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|v| *v <= 255)
}

/// Octet values whose decimal rendering starts with `p`.
fn octets_starting(p: &str) -> Vec<u32> {
    (0..=255u32).filter(|v| v.to_string().starts_with(p)).collect()
}

/// Prefixes of `net.addr startswith s`, per family. `Err` when the form cannot be enumerated.
#[allow(clippy::type_complexity)]
fn startswith_prefixes(s: &str) -> Result<(Vec<(u32, u8)>, Vec<(u128, u8)>), String> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    if s.is_empty() {
        return Ok((v4, v6));
    }
    // IPv4 renderings are digits and dots.
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() <= 4 {
            let (last, full) = parts.split_last().unwrap_or((&"", &[]));
            let fixed: Option<Vec<u32>> = full.iter().map(|o| octet(o)).collect();
            if let Some(fixed) = fixed {
                let base = fixed.iter().fold(0u32, |a, o| (a << 8) | o);
                let k = fixed.len() as u32;
                if last.is_empty() {
                    v4.push((if k == 0 { 0 } else { base << (32 - 8 * k) }, (8 * k) as u8));
                } else {
                    for o in octets_starting(last) {
                        let a = ((base << 8) | o) << (32 - 8 * (k + 1));
                        v4.push((a, (8 * (k + 1)) as u8));
                    }
                }
            }
        }
    }
    // IPv6 renderings starting with a hex digit are lowercase hex groups and colons; `::ffff:a.b.c.d`
    // and every other rendering with a zero first group start with ':' or "0:".
    let q = crate::quoted(s);
    if s.starts_with(':') {
        return Err(format!("net.addr startswith {q}: prefixes starting with ':' are not compiled"));
    }
    let is_v6_chars = s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b':');
    if is_v6_chars {
        if s.contains("::") {
            return Err(format!("net.addr startswith {q}: compressed IPv6 prefixes are not compiled"));
        }
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() <= 8 {
            let (last, full) = parts.split_last().unwrap_or((&"", &[]));
            let mut fixed = Vec::new();
            let mut renderable = true;
            for g in full {
                if g == &"0" {
                    return Err(format!("net.addr startswith {q}: a zero IPv6 group may be compressed; not compiled"));
                }
                if g.is_empty() || g.len() > 4 || g.starts_with('0') {
                    renderable = false;
                    break;
                }
                fixed.push(u128::from(u16::from_str_radix(g, 16).map_err(|e| format!("{q}: {e}"))?));
            }
            if renderable {
                let k = fixed.len() as u32;
                let base = fixed.iter().fold(0u128, |a, g| (a << 16) | g);
                if last.is_empty() {
                    v6.push((if k == 0 { 0 } else { base << (128 - 16 * k) }, (16 * k) as u8));
                } else if last.starts_with('0') {
                    return Err(format!("net.addr startswith {q}: a group starting with 0 is not compiled"));
                } else if last.len() <= 4 && k < 8 {
                    let p = u128::from(u16::from_str_radix(last, 16).map_err(|e| format!("{q}: {e}"))?);
                    let l = last.len() as u32;
                    for n in l..=4 {
                        let shift = 4 * (n - l);
                        let group = p << shift;
                        let a = ((base << 16) | group) << (128 - 16 * (k + 1));
                        v6.push((a, (16 * k + 16 - shift) as u8));
                    }
                }
            }
        }
    }
    Ok((v4, v6))
}

fn uncompilable(r: &CRule<'_>, what: impl std::fmt::Display) -> String {
    format!("rule {}/{} {what}", r.policy, r.name)
}

/// Walks a toolkit condition; `Err` names why the network plane cannot represent it.
fn scan_expr(r: &CRule<'_>, e: &Expr, atoms: &mut Atoms) -> Result<(), String> {
    let pc = |o: &Operand| match o {
        Operand::Path(p) => Some((classify(p), p.join("."))),
        Operand::Lit(_) => None,
    };
    match e {
        Expr::Not(e) => scan_expr(r, e, atoms),
        Expr::And(es) | Expr::Or(es) => es.iter().try_for_each(|e| scan_expr(r, e, atoms)),
        Expr::Truthy(o) => {
            note_agent(o, atoms);
            match pc(o) {
                Some((PathClass::Proc, p)) => Err(uncompilable(r, format_args!("reads {p}, which varies per event"))),
                Some((PathClass::Port, _)) => {
                    atoms.ports.push(0.0);
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        Expr::Matches(o, _) | Expr::Glob(o, _) => {
            note_agent(o, atoms);
            match pc(o) {
                Some((PathClass::Proc, p)) => Err(uncompilable(r, format_args!("reads {p}, which varies per event"))),
                Some((PathClass::Addr | PathClass::Domain, p)) => {
                    Err(uncompilable(r, format_args!("uses a pattern on {p}, which cannot be enumerated")))
                }
                Some((PathClass::NetWhole, p)) => Err(uncompilable(r, format_args!("uses a pattern on {p}"))),
                // A pattern on a number never matches; event/family/protocol are enumerated.
                _ => Ok(()),
            }
        }
        Expr::Cmp(op, l, rr) => {
            note_agent(l, atoms);
            note_agent(rr, atoms);
            let (lc, rc) = (pc(l), pc(rr));
            let varying = |c: &Option<(PathClass, String)>| c.as_ref().is_some_and(|(k, _)| *k != PathClass::Const);
            if varying(&lc) && varying(&rc) {
                return Err(uncompilable(r, format_args!("compares two per-event fields with `{}`", op.as_str())));
            }
            // Orient: (varying path, its class, the other operand, path on the left?)
            let (cls, name, other, left) = match (&lc, &rc) {
                (Some((k, n)), _) if *k != PathClass::Const => (*k, n.clone(), rr, true),
                (_, Some((k, n))) if *k != PathClass::Const => (*k, n.clone(), l, false),
                _ => return Ok(()),
            };
            let lit = match other {
                Operand::Lit(v) => v.clone(),
                // A constant path (agent.*, absent sections): its value is fixed for this agent.
                Operand::Path(_) => return Err(uncompilable(r, format_args!("compares {name} with another field"))),
            };
            match cls {
                PathClass::Proc => Err(uncompilable(r, format_args!("reads {name}, which varies per event"))),
                PathClass::Event | PathClass::Family | PathClass::Proto => Ok(()),
                PathClass::Port => {
                    numeric_constants(&lit, &mut atoms.ports);
                    Ok(())
                }
                PathClass::NetWhole => Err(uncompilable(r, format_args!("compares the whole net object"))),
                PathClass::Domain => match (op, left, &lit) {
                    (CmpOp::Eq | CmpOp::Ne, _, _) => {
                        atoms.domains.extend(strings_of(&lit).into_iter().map(str::to_string));
                        Ok(())
                    }
                    (CmpOp::In | CmpOp::NotIn, true, Value::Array(_)) => {
                        atoms.domains.extend(strings_of(&lit).into_iter().map(str::to_string));
                        Ok(())
                    }
                    _ => Err(uncompilable(
                        r,
                        format_args!("uses net.domain with `{}`: the names to resolve cannot be listed", op.as_str()),
                    )),
                },
                PathClass::Addr => match (op, left, &lit) {
                    (CmpOp::Eq | CmpOp::Ne, _, Value::String(s)) => {
                        add_ip(atoms, s);
                        Ok(())
                    }
                    // A non-string never equals the rendered address.
                    (CmpOp::Eq | CmpOp::Ne, _, _) => Ok(()),
                    (CmpOp::In | CmpOp::NotIn, true, Value::Array(items)) => {
                        items.iter().filter_map(Value::as_str).for_each(|s| add_ip(atoms, s));
                        Ok(())
                    }
                    (CmpOp::StartsWith, true, Value::String(s)) => {
                        let (a, b) = startswith_prefixes(s).map_err(|m| uncompilable(r, m))?;
                        atoms.v4.extend(a);
                        atoms.v6.extend(b);
                        Ok(())
                    }
                    (CmpOp::StartsWith | CmpOp::EndsWith | CmpOp::Contains, true, v) if !v.is_string() => Ok(()),
                    _ => Err(uncompilable(
                        r,
                        format_args!("uses net.addr with `{}` in a form that cannot be enumerated", op.as_str()),
                    )),
                },
                PathClass::Const => Ok(()),
            }
        }
    }
}

fn note_agent(o: &Operand, atoms: &mut Atoms) {
    if let Operand::Path(p) = o {
        if p.first().is_some_and(|s| s == "agent") && p.len() <= 2 {
            let f = p.get(1).map(String::as_str);
            if matches!(f, None | Some("trust" | "tier" | "ring")) {
                atoms.reads_agent_state = true;
            }
        }
    }
}

fn scan_v4(
    r: &CRule<'_>,
    field: &str,
    path: &[String],
    op: &str,
    value: &Value,
    atoms: &mut Atoms,
) -> Result<(), String> {
    let cls = classify(path);
    if path.first().is_some_and(|s| s == "agent") {
        atoms.reads_agent_state = true;
    }
    match cls {
        PathClass::Proc => Err(uncompilable(r, format_args!("reads {field}, which varies per event"))),
        PathClass::Event | PathClass::Family | PathClass::Proto | PathClass::Const => Ok(()),
        PathClass::NetWhole => Err(uncompilable(r, "reads the whole net object")),
        PathClass::Port => match op {
            "matches" => Err(uncompilable(r, "matches a pattern against net.port")),
            _ => {
                numeric_constants(value, &mut atoms.ports);
                Ok(())
            }
        },
        PathClass::Domain => match (op, value) {
            ("eq" | "ne", _) | ("in" | "not_in", Value::Array(_)) => {
                atoms.domains.extend(strings_of(value).into_iter().map(str::to_string));
                Ok(())
            }
            _ => Err(uncompilable(r, format_args!("uses {field} with {op}: the names to resolve cannot be listed"))),
        },
        PathClass::Addr => match (op, value) {
            ("eq" | "ne", Value::String(s)) => {
                add_ip(atoms, s);
                Ok(())
            }
            ("eq" | "ne", _) => Ok(()),
            ("in" | "not_in", Value::Array(items)) => {
                items.iter().filter_map(Value::as_str).for_each(|s| add_ip(atoms, s));
                Ok(())
            }
            _ => Err(uncompilable(r, format_args!("uses {field} with {op} in a form that cannot be enumerated"))),
        },
    }
}

/// The domain names the policy compares `net.domain` with: what the caller should resolve.
pub fn domains(set: &PolicySet) -> Vec<String> {
    let mut atoms = Atoms::default();
    let everyone = |_: &crate::toolkit::Policy| true;
    for p in set.toolkit.iter().filter(|p| everyone(p)) {
        for r in &p.rules {
            let c = CRule {
                policy: &p.name,
                name: &r.name,
                action: r.action,
                priority: 0,
                scope: 0,
                inherited: false,
                order: 0,
                events: None,
                cond: Cond::Toolkit(&r.condition),
                limit: None,
            };
            let _ = scan_expr(&c, &r.condition, &mut atoms);
        }
    }
    for v in set.rules() {
        if let Some((field, _, value)) = v.v4_condition {
            let path: Vec<String> = field.split('.').map(str::to_string).collect();
            if classify(&path) == PathClass::Domain {
                atoms.domains.extend(strings_of(value).into_iter().map(str::to_string));
            }
        }
    }
    atoms.domains.into_iter().collect()
}

/// A region of one trie: a prefix minus its more specific children.
struct Region {
    addr: IpAddr,
    len: u8,
    /// An address inside the prefix and outside every child, if any.
    rep: Option<IpAddr>,
    domains: Vec<String>,
}

/// For each prefix of one family: an address inside it and outside all of its more
/// specific children (prefixes inside it with no other prefix in between), if any.
fn prefix_regions<A: AddrBits>(set: &BTreeSet<(A, u8)>) -> Vec<(A, u8, Option<A>)> {
    let list: Vec<(A, u8)> = set.iter().copied().collect();
    let mut out = Vec::new();
    for &(a, l) in &list {
        let inside: Vec<(A, u8)> = list.iter().copied().filter(|&(b, m)| m > l && b.mask(l) == a).collect();
        let mut kids: Vec<(A, u8)> =
            inside.iter().copied().filter(|&(b, m)| !inside.iter().any(|&(c, n)| n < m && b.mask(n) == c)).collect();
        kids.sort_unstable();
        let mut cursor = Some(a);
        for (b, m) in kids {
            match cursor {
                Some(c) if b > c => break,
                Some(_) => cursor = b.end(m).next().filter(|n| *n <= a.end(l)),
                None => break,
            }
        }
        out.push((a, l, cursor.filter(|c| *c <= a.end(l))));
    }
    out
}

fn verdict_of(d: &Decision) -> (u8, u8) {
    if d.error {
        return (ACTION_DENY, 0);
    }
    match d.action {
        Action::Allow => (ACTION_ALLOW, 0),
        Action::Warn | Action::Log | Action::Audit => (ACTION_ALLOW, FLAG_LOG),
        Action::Deny | Action::Block | Action::RequireApproval => (ACTION_DENY, 0),
        Action::Kill => (ACTION_KILL, 0),
    }
}

fn severity(action: u8) -> u8 {
    match action {
        ACTION_KILL => 2,
        ACTION_DENY => 1,
        _ => 0,
    }
}

struct NetBuild<'a> {
    set: &'a PolicySet,
    agent: &'a AgentFacts,
    rules: Vec<RuleRef>,
    rule_ix: HashMap<(String, String), u16>,
    limits: Vec<LimitRow>,
    limit_ix: HashMap<(String, String), u32>,
    warnings: BTreeSet<String>,
}

/// (action, flags, rule, limit)
type Cell = (u8, u8, u16, u32);

impl NetBuild<'_> {
    fn decide(&mut self, ev: NetEvent, proto: NetProto, region: &Region, port: u16) -> Result<Cell, String> {
        let Some(addr) = region.rep else {
            return Ok((ACTION_DENY, 0, RULE_DEFAULT, 0));
        };
        let family = NetFamily::of(&addr);
        let proc = ProcFacts::default();
        let opts = EvalOptions::default();
        let mut best: Option<(Cell, Option<&str>)> = None;
        let candidates: Vec<Option<&str>> = if region.domains.is_empty() {
            vec![None]
        } else {
            region.domains.iter().map(|d| Some(d.as_str())).collect()
        };
        for dom in candidates {
            let ctx = net_context(self.agent, &proc, ev, family, proto, addr, port, dom);
            let d = self.set.evaluate(&ctx, &opts);
            let cell = self.cell(&d)?;
            if d.action == Action::RequireApproval {
                self.warnings.insert(format!(
                    "rule {}/{}: require_approval on a network event cannot be held; the kernel denies it",
                    d.policy.as_deref().unwrap_or("?"),
                    d.matched_rule.as_deref().unwrap_or("?")
                ));
            }
            match &best {
                Some((b, bd)) if b != &cell => {
                    self.warnings.insert(format!(
                        "{addr} was resolved from {} and {}, which the policy decides differently; the kernel applies the stricter",
                        bd.unwrap_or("?"),
                        dom.unwrap_or("?")
                    ));
                    if severity(cell.0) > severity(b.0) {
                        best = Some((cell, dom));
                    }
                }
                Some(_) => {}
                None => best = Some((cell, dom)),
            }
        }
        Ok(best.map_or((ACTION_DENY, 0, RULE_DEFAULT, 0), |(c, _)| c))
    }

    fn cell(&mut self, d: &Decision) -> Result<Cell, String> {
        let (action, flags) = verdict_of(d);
        let rule = match (&d.policy, &d.matched_rule) {
            (Some(p), Some(r)) => {
                let key = (p.clone(), r.clone());
                match self.rule_ix.get(&key) {
                    Some(i) => *i,
                    None => {
                        let i = u16::try_from(self.rules.len())
                            .ok()
                            .filter(|i| *i < RULE_DEFAULT)
                            .ok_or_else(|| "more than 65534 distinct rules decide network events".to_string())?;
                        self.rules.push(RuleRef { policy: p.clone(), rule: r.clone() });
                        self.rule_ix.insert(key, i);
                        i
                    }
                }
            }
            _ => RULE_DEFAULT,
        };
        let limit = match (&d.limit, d.error) {
            (Some(l), false) => {
                let key = (l.policy.clone(), l.rule.clone());
                match self.limit_ix.get(&key) {
                    Some(i) => *i,
                    None => {
                        let id = self.limits.len() as u32 + 1;
                        self.limits.push(LimitRow {
                            id,
                            max: l.spec.max,
                            period_ns: l.spec.period_secs.saturating_mul(1_000_000_000),
                            policy: l.policy.clone(),
                            rule: l.rule.clone(),
                        });
                        self.limit_ix.insert(key, id);
                        id
                    }
                }
            }
            _ => 0,
        };
        Ok((action, flags, rule, limit))
    }
}

/// Compiles the network plane; `Err` is the reason it cannot be compiled.
fn compile_net(
    set: &PolicySet,
    agent: &AgentFacts,
    rules: &[CRule<'_>],
    resolved: &Resolved,
    warnings: &mut Vec<String>,
    agent_state: &mut bool,
) -> Result<NetPlan, String> {
    if let Some(r) = set.rego.first() {
        return Err(format!("Rego policy {} is opaque to the compiler", r.name));
    }
    let mut atoms = Atoms::default();
    for r in rules.iter().filter(|r| can_apply(&r.events, &NET_EVENTS)) {
        match &r.cond {
            Cond::Toolkit(e) => scan_expr(r, e, &mut atoms)?,
            Cond::V4 { field, path, op, value } => scan_v4(r, field, path, op, value, &mut atoms)?,
        }
        if r.limit.is_some() && r.events.as_ref().is_none_or(|s| s.iter().any(|e| !NET_EVENTS.contains(&e.as_str()))) {
            warnings.push(format!(
                "rule {}/{}: its limit is counted separately by the kernel for network events and by userspace for other events",
                r.policy, r.name
            ));
        }
    }
    *agent_state |= atoms.reads_agent_state;
    // Resolved addresses of the names the rules test become host prefixes carrying their domain.
    let mut dom4: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut dom6: BTreeMap<u128, Vec<String>> = BTreeMap::new();
    for d in &atoms.domains {
        for a in resolved.get(d).into_iter().flatten() {
            match a {
                IpAddr::V4(v) => {
                    dom4.entry(u32::from(*v)).or_default().push(d.clone());
                    // Dual-stack sockets reach the same host through its mapped form.
                    dom6.entry(u128::from(v.to_ipv6_mapped())).or_default().push(d.clone());
                }
                IpAddr::V6(v) => dom6.entry(u128::from(*v)).or_default().push(d.clone()),
            }
        }
    }
    atoms.v4.insert((0, 0));
    atoms.v6.insert((0, 0));
    atoms.v4.extend(dom4.keys().map(|a| (*a, 32)));
    atoms.v6.extend(dom6.keys().map(|a| (*a, 128)));
    if atoms.v4.len() + atoms.v6.len() > MAX_ADDR_PREFIXES {
        return Err(format!(
            "{} address prefixes exceed the {MAX_ADDR_PREFIXES} the kernel tables hold",
            atoms.v4.len() + atoms.v6.len()
        ));
    }
    let mut regions = Vec::new();
    for (a, l, rep) in prefix_regions(&atoms.v4) {
        let domains = if l == 32 { dom4.get(&a).cloned().unwrap_or_default() } else { Vec::new() };
        regions.push(Region {
            addr: IpAddr::V4(Ipv4Addr::from(a)),
            len: l,
            rep: rep.map(|r| IpAddr::V4(Ipv4Addr::from(r))),
            domains,
        });
    }
    for (a, l, rep) in prefix_regions(&atoms.v6) {
        let domains = if l == 128 { dom6.get(&a).cloned().unwrap_or_default() } else { Vec::new() };
        regions.push(Region {
            addr: IpAddr::V6(Ipv6Addr::from(a)),
            len: l,
            rep: rep.map(|r| IpAddr::V6(Ipv6Addr::from(r))),
            domains,
        });
    }
    // Port groups: ports ordered the same way against every constant decide the same way.
    let mut consts = atoms.ports.clone();
    consts.sort_by(f64::total_cmp);
    consts.dedup();
    let key = |p: u16| {
        let f = f64::from(p);
        (consts.partition_point(|c| *c < f), consts.binary_search_by(|c| c.total_cmp(&f)).is_ok())
    };
    let mut groups: BTreeMap<(usize, bool), Vec<u16>> = BTreeMap::new();
    for p in 0..=u16::MAX {
        groups.entry(key(p)).or_default().push(p);
    }
    let groups: Vec<Vec<u16>> = groups.into_values().collect();
    let evals = regions.len() * groups.len() * 9;
    if evals > MAX_VERDICT_ROWS * 4 {
        return Err(format!(
            "{} address classes × {} port classes × 9 exceed the {MAX_VERDICT_ROWS} verdict rows",
            regions.len(),
            groups.len()
        ));
    }
    let mut nb = NetBuild {
        set,
        agent,
        rules: Vec::new(),
        rule_ix: HashMap::new(),
        limits: Vec::new(),
        limit_ix: HashMap::new(),
        warnings: BTreeSet::new(),
    };
    // cells[group][region][event][proto]
    let mut cells: Vec<Vec<Cell>> = Vec::with_capacity(groups.len());
    for g in &groups {
        let port = g.first().copied().unwrap_or(0);
        let mut col = Vec::with_capacity(regions.len() * 9);
        for region in &regions {
            for ev in NetEvent::ALL {
                for proto in NetProto::ALL {
                    col.push(nb.decide(ev, proto, region, port)?);
                }
            }
        }
        cells.push(col);
    }
    // Merge port groups that decide identically everywhere; the largest becomes class 0.
    let mut merged: Vec<(Vec<Cell>, Vec<u16>)> = Vec::new();
    for (col, g) in cells.into_iter().zip(groups) {
        match merged.iter_mut().find(|(c, _)| *c == col) {
            Some((_, ports)) => ports.extend(g),
            None => merged.push((col, g)),
        }
    }
    merged.sort_by_key(|(_, ports)| std::cmp::Reverse(ports.len()));
    let explicit: usize = merged.iter().skip(1).map(|(_, p)| p.len()).sum();
    if explicit > MAX_PORT_ENTRIES {
        return Err(format!("the port tests need {explicit} explicit port entries, more than {MAX_PORT_ENTRIES}"));
    }
    let rows_needed = merged.len() * regions.len() * 9;
    if rows_needed > MAX_VERDICT_ROWS {
        return Err(format!("{rows_needed} verdict rows exceed the {MAX_VERDICT_ROWS} the kernel tables hold"));
    }
    let port_classes = u16::try_from(merged.len()).map_err(|_| "too many port classes".to_string())?;
    let mut ports = BTreeMap::new();
    for (pc, (_, ps)) in merged.iter().enumerate().skip(1) {
        for p in ps {
            ports.insert(*p, pc as u16);
        }
    }
    let mut addr_classes = Vec::new();
    let mut rows = Vec::with_capacity(rows_needed);
    for (ri, region) in regions.iter().enumerate() {
        let id = ri as u32;
        addr_classes.push(AddrClass { id, addr: region.addr, prefix_len: region.len, domains: region.domains.clone() });
        if region.rep.is_none() {
            continue; // covered entirely by more specific prefixes: never looked up
        }
        for (pc, (col, _)) in merged.iter().enumerate() {
            let mut k = ri * 9;
            for ev in NetEvent::ALL {
                for proto in NetProto::ALL {
                    let (action, flags, rule, limit) = col.get(k).copied().unwrap_or((ACTION_DENY, 0, RULE_DEFAULT, 0));
                    k += 1;
                    rows.push(VerdictRow {
                        addr_class: id,
                        port_class: pc as u16,
                        event: ev.code(),
                        proto: proto.code(),
                        action,
                        flags,
                        rule,
                        limit,
                    });
                }
            }
        }
    }
    for d in &atoms.domains {
        if resolved.get(d).is_none_or(Vec::is_empty) {
            warnings.push(format!("domain {d} did not resolve; rules testing it match no address in the kernel"));
        }
    }
    warnings.extend(nb.warnings);
    let index = rows.iter().enumerate().map(|(i, r)| ((r.addr_class, r.port_class, r.event, r.proto), i)).collect();
    Ok(NetPlan {
        addr_classes,
        ports,
        port_classes,
        rows,
        rules: nb.rules,
        limits: nb.limits,
        index,
        miss: VerdictRow {
            addr_class: u32::MAX,
            port_class: 0,
            event: 0,
            proto: 0,
            action: ACTION_DENY,
            flags: 0,
            rule: RULE_DEFAULT,
            limit: 0,
        },
    })
}

// ------------------------------------------------------------------ file path forms

/// Literal text of a regex fragment made only of literal characters and escapes.
fn regex_literal(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        match c {
            '\\' => {
                let e = it.next()?;
                if e.is_alphanumeric() {
                    return None; // \d, \w, ...
                }
                out.push(e);
            }
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// `A(x|y|z)B` with literal pieces → every alternative; plain literals → one.
fn regex_alternatives(s: &str) -> Option<Vec<String>> {
    if let (Some(open), Some(close)) = (s.find('('), s.rfind(')')) {
        if open < close && !s[..open].ends_with('\\') {
            let pre = regex_literal(&s[..open])?;
            let post = regex_literal(&s[close + 1..])?;
            let inner = &s[open + 1..close];
            let alts: Option<Vec<String>> =
                inner.split('|').map(|a| regex_literal(a).map(|a| format!("{pre}{a}{post}"))).collect();
            return alts;
        }
    }
    regex_literal(s).map(|l| vec![l])
}

fn path_forms(e: &Expr) -> Option<Vec<(PathKind, String)>> {
    let is_path = |o: &Operand| matches!(o, Operand::Path(p) if p.len() == 2 && p[0] == "file" && p[1] == "path");
    match e {
        Expr::Or(es) => {
            let mut out = Vec::new();
            for e in es {
                out.extend(path_forms(e)?);
            }
            Some(out)
        }
        Expr::Cmp(CmpOp::Eq, l, Operand::Lit(Value::String(s))) if is_path(l) => {
            Some(vec![(PathKind::Exact, s.clone())])
        }
        Expr::Cmp(CmpOp::Eq, Operand::Lit(Value::String(s)), r) if is_path(r) => {
            Some(vec![(PathKind::Exact, s.clone())])
        }
        Expr::Cmp(CmpOp::In, l, Operand::Lit(Value::Array(items))) if is_path(l) => {
            Some(items.iter().filter_map(Value::as_str).map(|s| (PathKind::Exact, s.to_string())).collect())
        }
        Expr::Cmp(CmpOp::StartsWith, l, Operand::Lit(Value::String(s))) if is_path(l) && !s.is_empty() => {
            Some(vec![(PathKind::Prefix, s.clone())])
        }
        Expr::Glob(l, p) if is_path(l) => {
            // `/dir/**` is every path under /dir/.
            let stem = p.source.strip_suffix("**")?;
            if stem.contains(['*', '?', '[']) || !stem.ends_with('/') {
                return None;
            }
            Some(vec![(PathKind::Prefix, stem.to_string())])
        }
        Expr::Matches(l, p) if is_path(l) => {
            let src = p.source.as_str();
            if let Some(mid) = src.strip_prefix('/').and_then(|s| s.strip_suffix("(/|$)")) {
                let alts = regex_alternatives(mid)?;
                return Some(alts.into_iter().map(|a| (PathKind::Component, a)).collect());
            }
            if let Some(mid) = src.strip_prefix("(^|/)").and_then(|s| s.strip_suffix("(\\.[^/]*)?$")) {
                let lit = regex_literal(mid).filter(|l| !l.contains('/') && !l.is_empty())?;
                return Some(vec![(PathKind::Basename, lit.clone()), (PathKind::BasenamePrefix, format!("{lit}."))]);
            }
            if let Some(mid) = src.strip_prefix('/').and_then(|s| s.strip_suffix('$')) {
                let lit = regex_literal(mid).filter(|l| !l.contains('/') && !l.is_empty())?;
                return Some(vec![(PathKind::Basename, lit)]);
            }
            None
        }
        _ => None,
    }
}

/// The path forms of a deny rule: event guards plus one disjunction of path forms.
fn rule_path_forms(e: &Expr) -> Option<Vec<(PathKind, String)>> {
    let parts: Vec<&Expr> = match e {
        Expr::And(es) => es.iter().collect(),
        other => vec![other],
    };
    let rest: Vec<&Expr> = parts.into_iter().filter(|p| guard_of(p).is_none()).collect();
    match rest.as_slice() {
        [one] => path_forms(one),
        _ => None,
    }
}

fn beats(blocker: &CRule<'_>, deny: &CRule<'_>, strategy: Strategy) -> bool {
    if blocker.action.is_deny_class() {
        return false;
    }
    // The extends floor: an inherited deny beats the child's permissive rules of the same policy.
    if deny.inherited && !blocker.inherited && blocker.policy == deny.policy && blocker.action.is_allowed() {
        return false;
    }
    let ahead = |a: (i64, i64), b: (i64, i64)| a > b || (a == b && blocker.order < deny.order);
    match strategy {
        Strategy::PriorityFirstMatch => ahead((blocker.priority, 0), (deny.priority, 0)),
        Strategy::DenyOverrides => false,
        Strategy::AllowOverrides => blocker.action == Action::Allow || ahead((blocker.priority, 0), (deny.priority, 0)),
        Strategy::MostSpecificWins => ahead((blocker.scope, blocker.priority), (deny.scope, deny.priority)),
    }
}

// ------------------------------------------------------------------ compile

const EXEC_EVENTS: [&str; 1] = ["exec"];
const FILE_OPEN_EVENTS: [&str; 3] = ["file_open", "file_write", "create"];
const FILE_NS_EVENTS: [&str; 3] = ["unlink", "rename", "mkdir"];
const PROCESS_EVENTS: [&str; 6] = ["ptrace", "signal", "mount", "bpf", "module", "keyring"];

fn known_event(e: &str) -> bool {
    NET_EVENTS.contains(&e)
        || EXEC_EVENTS.contains(&e)
        || FILE_OPEN_EVENTS.contains(&e)
        || FILE_NS_EVENTS.contains(&e)
        || PROCESS_EVENTS.contains(&e)
}

/// Compiles `set` for `agent` on a host with `caps`. `resolved` holds the addresses of
/// [`domains`]. In strict mode a rule no plane can enforce before effect is an error.
pub fn compile(
    set: &PolicySet,
    agent: &AgentFacts,
    caps: &HostCaps,
    resolved: &Resolved,
    strict: bool,
) -> Result<Plan, PlanError> {
    let rules = collect_rules(set, agent);
    let mut warnings = Vec::new();
    let mut agent_state = false;
    let (net, net_error) = match compile_net(set, agent, &rules, resolved, &mut warnings, &mut agent_state) {
        Ok(n) => (Some(n), None),
        Err(e) => (None, Some(e)),
    };
    if let Some(e) = &net_error {
        warnings.insert(0, format!("NETWORK PLANE NOT COMPILED: {e}; network rules are not enforced in the kernel"));
    }
    let strategy = set.strategy.unwrap_or_default();
    // Tier A file path forms.
    let mut file = caps.bpf_lsm.then(FileKernelPlan::default);
    let mut file_notes: HashMap<usize, String> = HashMap::new();
    let file_all: Vec<&str> = FILE_OPEN_EVENTS.iter().chain(FILE_NS_EVENTS.iter()).copied().collect();
    for (i, r) in rules.iter().enumerate() {
        if !r.action.is_deny_class() || !can_apply(&r.events, &file_all) {
            continue;
        }
        let forms = match &r.cond {
            Cond::Toolkit(e) => rule_path_forms(e),
            Cond::V4 { .. } => None,
        };
        let Some(forms) = forms.filter(|f| !f.is_empty()) else {
            file_notes.insert(i, "its condition is not a disjunction of path forms".into());
            continue;
        };
        let blocker = rules.iter().find(|b| {
            !std::ptr::eq(*b, r)
                && can_apply(&b.events, &file_all)
                && b.events.as_ref().is_none_or(|be| r.events.as_ref().is_none_or(|re| !be.is_disjoint(re)))
                && beats(b, r, strategy)
        });
        if let Some(b) = blocker {
            file_notes.insert(i, format!("rule {}/{} ({}) can take precedence over it", b.policy, b.name, b.action));
            continue;
        }
        let access = FILE_EVENTS
            .iter()
            .filter(|(e, _)| r.events.as_ref().is_none_or(|s| s.contains(*e)))
            .fold(0, |a, (_, bit)| a | bit);
        if let Some(fp) = file.as_mut() {
            let ix = fp.rules.len() as u16;
            fp.rules.push(RuleRef { policy: r.policy.to_string(), rule: r.name.to_string() });
            let action = if r.action == Action::Kill { ACTION_KILL } else { ACTION_DENY };
            for (kind, text) in forms {
                fp.paths.push(PathRule { kind, text, access, rule: ix, action });
            }
        }
    }
    let compiled_file =
        |r: &CRule<'_>| file.as_ref().is_some_and(|f| f.rules.iter().any(|x| x.policy == r.policy && x.rule == r.name));
    // Per rule, per event class.
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let mut planes = Vec::new();
        let blocking = !r.action.is_allowed();
        let note = |class: &str, plane: Option<String>, problem: Option<String>| PlaneNote {
            class: class.to_string(),
            plane,
            problem,
        };
        if !blocking {
            planes.push(note("any", Some("nothing to block".into()), None));
        } else {
            if can_apply(&r.events, &NET_EVENTS) {
                match &net_error {
                    None => {
                        let mut p = "kernel: cgroup connect/sendmsg/bind tables".to_string();
                        if r.action == Action::RequireApproval {
                            p.push_str(" (require_approval cannot be held: denied)");
                        }
                        planes.push(note("network", Some(p), None));
                    }
                    Some(e) => planes.push(note("network", None, Some(format!("network plane not compiled: {e}")))),
                }
            }
            if can_apply(&r.events, &EXEC_EVENTS) {
                let p = if caps.bpf_lsm {
                    "lsm bprm_check_security + verdict from the synchronous evaluator"
                } else {
                    "seccomp user-notification (synchronous, before exec)"
                };
                planes.push(note("exec", Some(p.into()), None));
            }
            if can_apply(&r.events, &FILE_OPEN_EVENTS) {
                let mut ps = Vec::new();
                if caps.confined && caps.fanotify {
                    ps.push("fanotify permission events (synchronous)".to_string());
                }
                if caps.bpf_lsm && compiled_file(r) {
                    ps.push("lsm file_open (kernel path forms)".to_string());
                }
                if ps.is_empty() {
                    let why = match file_notes.get(&i) {
                        Some(n) if caps.bpf_lsm => format!("not compiled to lsm path forms ({n}) and"),
                        _ => String::new(),
                    };
                    planes.push(note(
                        "file",
                        None,
                        Some(format!(
                            "{why} no synchronous file plane here (fanotify needs a confined ring{})",
                            if caps.fanotify { "" } else { " and kernel support" }
                        )),
                    ));
                } else {
                    let mut pl = ps.join(" + ");
                    if caps.bpf_lsm && !compiled_file(r) {
                        if let Some(n) = file_notes.get(&i) {
                            pl.push_str(&format!(" (not in lsm path forms: {n})"));
                        }
                    }
                    planes.push(note("file", Some(pl), None));
                }
            }
            if can_apply(&r.events, &FILE_NS_EVENTS) {
                if caps.bpf_lsm && compiled_file(r) {
                    planes.push(note("file_namespace", Some("lsm path_unlink/path_rename/path_mkdir".into()), None));
                } else {
                    let why = file_notes.get(&i).map(|n| format!(" ({n})")).unwrap_or_default();
                    planes.push(note(
                        "file_namespace",
                        None,
                        Some(format!("unlink/rename/mkdir are not enforceable before effect on this host{why}")),
                    ));
                }
            }
            if can_apply(&r.events, &PROCESS_EVENTS) {
                if caps.bpf_lsm {
                    planes.push(note("process", Some("lsm (ptrace/signal/mount/bpf/module hooks)".into()), None));
                } else if caps.confined {
                    planes.push(note("process", Some("ring floor: pid namespace + seccomp".into()), None));
                } else {
                    planes.push(note(
                        "process",
                        None,
                        Some("ptrace/signal/mount/bpf/module are not enforceable in ring 0 without BPF LSM".into()),
                    ));
                }
            }
            if let Some(evs) = &r.events {
                let other: Vec<&str> = evs.iter().map(String::as_str).filter(|e| !known_event(e)).collect();
                if !other.is_empty() {
                    planes.push(note(
                        "other",
                        Some(format!("no OS hook produces {}; decided where a caller evaluates it", other.join(", "))),
                        None,
                    ));
                }
            }
        }
        for p in &planes {
            if let Some(pr) = &p.problem {
                let line = format!("rule {}/{} ({}): {pr}", r.policy, r.name, r.action);
                if r.action.is_deny_class() {
                    problems.push(line.clone());
                }
                warnings.push(line);
            }
        }
        plans.push(RulePlan {
            policy: r.policy.to_string(),
            rule: r.name.to_string(),
            action: r.action,
            events: r.events.as_ref().map(|s| s.iter().cloned().collect()),
            planes,
        });
    }
    if strict {
        if let Some(e) = &net_error {
            problems.insert(0, format!("network plane: {e}"));
        }
        if !problems.is_empty() {
            return Err(PlanError::Unenforceable(problems));
        }
    }
    warnings.dedup();
    Ok(Plan { net, net_error, file, rules: plans, warnings, depends_on_agent_state: agent_state })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::PathBuf;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn agent() -> AgentFacts {
        AgentFacts::new("a1", "did:mesh:0123456789abcdef0123456789abcdef", 2, 500, "s1")
    }

    fn caps(bpf_lsm: bool) -> HostCaps {
        HostCaps { bpf_lsm, fanotify: true, confined: true, ring: 2 }
    }

    fn repo(p: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
    }

    fn resolved() -> Resolved {
        let mut r = Resolved::new();
        r.insert("svc.localhost".into(), vec!["127.0.0.5".parse().unwrap(), "::1".parse().unwrap()]);
        r.insert("db.localhost".into(), vec!["10.1.2.3".parse().unwrap(), "127.0.0.5".parse().unwrap()]);
        r.insert("index.crates.io".into(), vec!["151.101.0.1".parse().unwrap(), "2a04:4e42::1".parse().unwrap()]);
        r.insert("warehouse.internal.example".into(), vec!["10.0.0.5".parse().unwrap()]);
        r.insert("evil.localhost".into(), vec!["10.1.2.3".parse().unwrap()]);
        r
    }

    /// The addresses worth probing: class boundaries, representatives, constants, and random ones.
    fn probe_addrs(plan: &NetPlan, rng: &mut Rng) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for c in &plan.addr_classes {
            match c.addr {
                IpAddr::V4(a) => {
                    let a = u32::from(a);
                    let end = a | u32::MAX.checked_shr(u32::from(c.prefix_len)).unwrap_or(0);
                    for x in [a, end, a.wrapping_sub(1), end.wrapping_add(1), a.wrapping_add(1)] {
                        let v4 = Ipv4Addr::from(x);
                        out.push(IpAddr::V4(v4));
                        out.push(IpAddr::V6(v4.to_ipv6_mapped()));
                    }
                }
                IpAddr::V6(a) => {
                    let a = u128::from(a);
                    let end = a | u128::MAX.checked_shr(u32::from(c.prefix_len)).unwrap_or(0);
                    for x in [a, end, a.wrapping_sub(1), end.wrapping_add(1), a.wrapping_add(1)] {
                        out.push(IpAddr::V6(Ipv6Addr::from(x)));
                    }
                }
            }
        }
        for _ in 0..400 {
            let v4 = Ipv4Addr::from(rng.next() as u32);
            out.push(IpAddr::V4(v4));
            // Random addresses near interesting ones: same first octet or two.
            let near = Ipv4Addr::from(((rng.below(4) as u32 + 9) << 24) | (rng.next() as u32 & 0x00ff_ffff));
            out.push(IpAddr::V4(near));
            out.push(IpAddr::V6(near.to_ipv6_mapped()));
            let hi = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            out.push(IpAddr::V6(Ipv6Addr::from(hi)));
            // Random hosts under a random short prefix of a random class (nested structure).
            let shift = rng.below(112) as u32;
            out.push(IpAddr::V6(Ipv6Addr::from(hi >> (16 + shift))));
        }
        for s in ["127.0.0.1", "127.0.0.5", "::1", "10.1.2.3", "::ffff:10.9.9.9", "172.1.0.1", "172.2.0.1", "fe80::1"] {
            out.push(s.parse().unwrap());
        }
        out
    }

    fn probe_ports(rng: &mut Rng, plan: &NetPlan) -> Vec<u16> {
        let mut out: Vec<u16> = vec![0, 1, 21, 22, 23, 52, 53, 54, 79, 80, 81, 442, 443, 444, 999, 1000, 1023, 1024];
        out.extend([1099, 1100, 1101, 8080, 8443, 63_999, 64_000, 64_001, 65_535]);
        out.extend(plan.ports.keys().copied().take(64));
        for _ in 0..16 {
            out.push(rng.next() as u16);
        }
        out
    }

    /// The heart of "same decision": the kernel algorithm over the tables against the real evaluator.
    fn check_same(set: &PolicySet, resolved: &Resolved, seed: u64) -> NetPlan {
        let a = agent();
        let plan = compile(set, &a, &caps(false), resolved, false).unwrap();
        let net = plan.net.clone().unwrap_or_else(|| panic!("net plane: {:?}", plan.net_error));
        let mut rng = Rng(seed);
        let mut by_addr: HashMap<IpAddr, Vec<&str>> = HashMap::new();
        let wanted = domains(set);
        for (d, addrs) in resolved {
            if !wanted.contains(d) {
                continue;
            }
            for x in addrs {
                by_addr.entry(*x).or_default().push(d);
                if let IpAddr::V4(v) = x {
                    by_addr.entry(IpAddr::V6(v.to_ipv6_mapped())).or_default().push(d);
                }
            }
        }
        let mut addrs = probe_addrs(&net, &mut rng);
        addrs.extend(by_addr.keys().copied());
        let ports = probe_ports(&mut rng, &net);
        let opts = EvalOptions::default();
        let proc = ProcFacts::default();
        let mut checked = 0;
        for addr in &addrs {
            let doms: Vec<Option<&str>> = match by_addr.get(addr) {
                Some(ds) => ds.iter().map(|d| Some(*d)).collect(),
                None => vec![None],
            };
            // Each address with a few ports (all ports for the constants) to keep the run short.
            let some: Vec<u16> = if rng.below(32) == 0 || by_addr.contains_key(addr) {
                ports.clone()
            } else {
                (0..3).map(|_| ports[rng.below(ports.len() as u64) as usize]).collect()
            };
            for port in some {
                for ev in NetEvent::ALL {
                    for proto in NetProto::ALL {
                        let row = net.lookup(ev, proto, *addr, port);
                        let fam = NetFamily::of(addr);
                        let ds: Vec<Decision> = doms
                            .iter()
                            .map(|d| set.evaluate(&net_context(&a, &proc, ev, fam, proto, *addr, port, *d), &opts))
                            .collect();
                        let sev: Vec<u8> = ds.iter().map(|d| verdict_of(d).0).collect();
                        let strictest = *sev.iter().max_by_key(|s| severity(**s)).unwrap();
                        assert_eq!(
                            row.action, strictest,
                            "{ev:?} {proto:?} {addr} port {port} domains {doms:?}: kernel row {row:?}, evaluator {ds:?}"
                        );
                        if ds.len() == 1 {
                            let d = &ds[0];
                            assert_eq!(row.flags, verdict_of(d).1, "log flag for {addr}:{port} {d:?}");
                            let rule = match (&d.policy, &d.matched_rule) {
                                (Some(p), Some(r)) => net
                                    .rules
                                    .iter()
                                    .position(|x| &x.policy == p && &x.rule == r)
                                    .map_or(u16::MAX - 1, |i| i as u16),
                                _ => RULE_DEFAULT,
                            };
                            assert_eq!(row.rule, rule, "rule index for {addr}:{port} {ev:?} {proto:?}: {d:?}");
                            assert_eq!(row.limit != 0, d.limit.is_some(), "limit for {addr}:{port} {d:?}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 10_000, "only {checked} contexts checked");
        net
    }

    #[test]
    fn shipped_policies_compile_to_the_same_decisions() {
        for files in [vec!["policies/coding-agent/policy.yaml"], vec!["policies/data-analysis/policy.yaml"]] {
            let set = PolicySet::load(&files.iter().map(|f| repo(f)).collect::<Vec<_>>()).unwrap();
            let net = check_same(&set, &resolved(), 7);
            assert!(!net.rows.is_empty());
        }
        // The plugin's Rego policy is opaque: the plane is not compiled, loudly.
        let set = PolicySet::load_with(
            &[repo("policies/untrusted-plugin/plugin.yaml"), repo("policies/untrusted-plugin/plugin.rego")],
            Some("data.agtjail.plugin.verdict"),
        )
        .unwrap();
        let plan = compile(&set, &agent(), &caps(false), &resolved(), false).unwrap();
        assert!(plan.net.is_none());
        assert!(plan.warnings[0].contains("NETWORK PLANE NOT COMPILED") && plan.warnings[0].contains("Rego"));
        assert!(compile(&set, &agent(), &caps(false), &resolved(), true).is_err());
        // Without the Rego file the YAML (with its extends baseline) compiles.
        let set = PolicySet::load(&[repo("policies/untrusted-plugin/plugin.yaml")]).unwrap();
        check_same(&set, &resolved(), 8);
    }

    const SYNTHETIC: &str = r#"
name: syn
agents: ['*']
default_action: DEFAULT
conflict_strategy: STRATEGY
rules:
  - {name: kill-bad, condition: "event == 'connect' and net.addr == '10.1.2.3'", action: kill, priority: 50}
  - {name: allow-10, condition: "event in ['connect', 'sendmsg'] and net.addr startswith '10.' and net.port >= 1000 and net.port < 1100", action: allow, priority: 40}
  - {name: deny-10-1, condition: "net.addr startswith '10.1.' and net.protocol == 'udp'", action: deny, priority: 45}
  - {name: log-192, condition: "net.addr startswith '192.168.' or net.addr startswith '172.1'", action: log, priority: 30}
  - {name: allow-v6, condition: "net.family == 'inet6' and (net.addr startswith 'fd00:' or net.addr startswith '2001:db8:' or net.addr startswith 'fe8') and net.port in [53, 443, 8443]", action: allow, priority: 30}
  - {name: deny-mapped, condition: "net.addr == '::ffff:10.9.9.9' or net.addr in ['::1', '2001:db8::dead']", action: deny, priority: 60}
  - {name: allow-dom, condition: "net.domain in ['svc.localhost', 'db.localhost'] and net.port != 22", action: allow, priority: 20, limit: "5/session"}
  - {name: approve-bind, condition: "event == 'bind' and net.port < 1024", action: require_approval, priority: 70}
  - {name: warn-high, condition: "net.port > 64000 and not (net.addr in ['1.1.1.1', '8.8.8.8'])", action: warn, priority: 10}
  - {name: trust-gate, condition: "agent.trust < 600 and net.port == 80 and net.addr != '9.9.9.9'", action: deny, priority: 35}
  - {name: evil, condition: "net.domain == 'evil.localhost'", action: deny, priority: 25}
  - {name: deny-rest, condition: "event in ['connect', 'sendmsg'] and net.family in ['inet', 'inet6']", action: deny, priority: 5}
  - {name: exec-proc, condition: "event == 'exec' and proc.uid == 0", action: deny, priority: 100}
"#;

    #[test]
    fn synthetic_policies_compile_to_the_same_decisions_under_every_strategy() {
        for (i, strategy) in
            ["priority_first_match", "deny_overrides", "allow_overrides", "most_specific_wins"].iter().enumerate()
        {
            {
                let default = if i % 2 == 0 { "allow" } else { "deny" };
                let text = SYNTHETIC.replace("STRATEGY", strategy).replace("DEFAULT", default);
                let set = PolicySet::from_str("syn.yaml", &text).unwrap();
                let net = check_same(&set, &resolved(), 100 + i as u64);
                assert!(net.addr_classes.iter().any(|c| c.prefix_len == 16), "172.1x /16 classes");
                assert!(net.addr_classes.iter().any(|c| !c.domains.is_empty()));
                assert!(net.limits.iter().any(|l| l.period_ns == 0 && l.max == 5));
            }
        }
    }

    #[test]
    fn two_policies_scopes_and_agent_targeting() {
        let dir = std::env::temp_dir().join(format!("agt-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.yaml");
        let b = dir.join("b.yaml");
        std::fs::write(
            &a,
            "name: a\nscope: agent\nagents: ['*']\nconflict_strategy: most_specific_wins\ndefault_action: deny\nrules:\n  - {name: a-allow, condition: \"net.port in [80, 443] and net.addr startswith '10.'\", action: allow, priority: 1}\n",
        )
        .unwrap();
        std::fs::write(
            &b,
            "name: b\nagents: ['*']\ndefault_action: allow\nrules:\n  - {name: b-deny, condition: \"net.addr startswith '10.2' or net.port >= 440 and net.port <= 450\", action: deny, priority: 99}\n  - {name: b-other-agent, condition: \"proc.uid == 0\", action: deny}\n",
        )
        .unwrap();
        let other = dir.join("c.yaml");
        std::fs::write(
            &other,
            "name: c\nagent: did:mesh:someone-else\nrules:\n  - {name: c-proc, condition: \"proc.uid == 0\", action: deny}\n",
        )
        .unwrap();
        let set = PolicySet::load(&[a.clone(), other.clone()]).unwrap();
        check_same(&set, &resolved(), 11);
        // b reads proc.uid in a rule that can apply to network events: uncompilable.
        let set = PolicySet::load(&[a, b]).unwrap();
        let plan = compile(&set, &agent(), &caps(false), &resolved(), false).unwrap();
        assert!(plan.net_error.as_deref().unwrap().contains("b/b-other-agent"), "{:?}", plan.net_error);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn extends_floor_is_compiled_as_evaluated() {
        let dir = std::env::temp_dir().join(format!("agt-plan-ext-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("base.yaml"),
            "name: base\nagents: ['*']\nrules:\n  - {name: no-smtp, condition: \"net.port == 25 or net.addr startswith '203.0.113.'\", action: deny, priority: 1}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("child.yaml"),
            "name: child\nextends: base.yaml\nagents: ['*']\ndefault_action: deny\nrules:\n  - {name: open, condition: \"event == 'connect'\", action: allow, priority: 100}\n  - {name: no-smtp, condition: \"net.port == 25\", action: allow}\n",
        )
        .unwrap();
        let set = PolicySet::load(&[dir.join("child.yaml")]).unwrap();
        let net = check_same(&set, &resolved(), 12);
        let row = net.lookup(NetEvent::Connect, NetProto::Tcp, "1.2.3.4".parse().unwrap(), 25);
        assert_eq!(row.action, ACTION_DENY, "a child can never turn a parent's deny into an allow");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn agent_os_v4_policies_compile() {
        let text = r#"
version: "1.0"
name: v4
rules:
  - {name: high-ports, condition: {field: net.port, operator: gt, value: 1024}, action: block, priority: 10}
  - {name: dns, condition: {field: net.addr, operator: in, value: ['1.1.1.1', '2606:4700::1111']}, action: allow, priority: 5}
  - {name: audit-web, condition: {field: net.port, operator: in, value: [80, 443]}, action: audit, priority: 4}
defaults: {action: deny}
"#;
        let set = PolicySet::from_str("v4.yaml", text).unwrap();
        check_same(&set, &resolved(), 13);
        let bad = "name: v4\nrules:\n  - {name: m, condition: {field: net.addr, operator: matches, value: '^10\\.'}, action: block}\ndefaults: {action: allow}\n";
        let set = PolicySet::from_str("v4.yaml", bad).unwrap();
        let plan = compile(&set, &agent(), &caps(false), &resolved(), false).unwrap();
        assert!(plan.net.is_none());
    }

    #[test]
    fn uncompilable_forms_name_the_rule() {
        for (cond, what) in [
            ("net.addr matches '^10[.]'", "pattern on net.addr"),
            ("net.domain endswith '.example'", "names to resolve cannot be listed"),
            ("proc.comm == 'curl'", "reads proc.comm"),
            ("net.addr endswith '.1'", "cannot be enumerated"),
            ("net.addr in '10.0.0.1 10.0.0.2'", "cannot be enumerated"),
            ("net.port == net.addr", "two per-event fields"),
            ("net.addr startswith '::ffff:'", "starting with ':'"),
            ("net.port > 10 and net.port < 9000", "explicit port entries"),
        ] {
            let text = format!(
                "name: u\nagents: ['*']\ndefault_action: allow\nrules:\n  - {{name: r1, condition: \"{cond}\", action: deny}}\n"
            );
            let set = PolicySet::from_str("u.yaml", &text).unwrap();
            let plan = compile(&set, &agent(), &caps(false), &resolved(), false).unwrap();
            let err = plan.net_error.clone().unwrap_or_else(|| panic!("{cond} compiled"));
            assert!(err.contains(what), "{cond}: {err}");
            assert!(plan.net.is_none());
            assert!(plan.warnings.iter().any(|w| w.contains("NETWORK PLANE NOT COMPILED")));
            let e = compile(&set, &agent(), &caps(false), &resolved(), true).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        // The same forms guarded to non-network events do not matter.
        let set = PolicySet::from_str(
            "g.yaml",
            "name: g\nagents: ['*']\nrules:\n  - {name: r, condition: \"event == 'exec' and proc.uid == 0\", action: deny}\n",
        )
        .unwrap();
        assert!(compile(&set, &agent(), &caps(false), &resolved(), false).unwrap().net.is_some());
    }

    #[test]
    fn row_cap_is_enforced() {
        let mut text = String::from("name: big\nagents: ['*']\nrules:\n");
        for i in 0..1000u32 {
            text.push_str(&format!(
                "  - {{name: r{i}, condition: \"net.addr == '10.{}.{}.1' and net.port == {}\", action: allow}}\n",
                i / 256,
                i % 256,
                i + 1
            ));
        }
        let set = PolicySet::from_str("big.yaml", &text).unwrap();
        let plan = compile(&set, &agent(), &caps(false), &resolved(), false).unwrap();
        assert!(plan.net_error.unwrap().contains("verdict rows"));
    }

    #[test]
    fn startswith_prefix_forms() {
        let (v4, v6) = startswith_prefixes("10.").unwrap();
        assert_eq!(v4, vec![(10 << 24, 8)]);
        assert!(v6.is_empty());
        let (v4, _) = startswith_prefixes("192.168.").unwrap();
        assert_eq!(v4, vec![((192 << 24) | (168 << 16), 16)]);
        let (v4, v6) = startswith_prefixes("1").unwrap();
        assert_eq!(v4.len(), 111);
        assert_eq!(v6.len(), 4);
        let (v4, v6) = startswith_prefixes("010.").unwrap();
        assert!(v4.is_empty() && v6.is_empty());
        assert!(startswith_prefixes("fe80::").is_err());
        // Rust renders only IPv4-mapped addresses in dotted form.
        assert_eq!("::ffff:1.2.3.4".parse::<IpAddr>().unwrap().to_string(), "::ffff:1.2.3.4");
        assert_eq!("::1.2.3.4".parse::<IpAddr>().unwrap().to_string(), "::102:304");
    }

    #[test]
    fn file_path_forms_agree_with_the_evaluator() {
        let set = PolicySet::load(&[repo("policies/coding-agent/policy.yaml")]).unwrap();
        let plan = compile(&set, &agent(), &caps(true), &resolved(), false).unwrap();
        let fp = plan.file.clone().unwrap();
        assert_eq!(fp.rules.len(), 1, "{fp:?}");
        let kinds: BTreeSet<(PathKind, &str)> = fp.paths.iter().map(|p| (p.kind, p.text.as_str())).collect();
        for want in [
            (PathKind::Component, ".ssh"),
            (PathKind::Component, ".config/gcloud"),
            (PathKind::Basename, ".env"),
            (PathKind::BasenamePrefix, ".env."),
            (PathKind::Basename, ".netrc"),
            (PathKind::Exact, "/etc/shadow"),
        ] {
            assert!(kinds.contains(&want), "{want:?} in {kinds:?}");
        }
        let a = agent();
        let proc = ProcFacts::default();
        let opts = EvalOptions::default();
        let paths = [
            "/home/u/.ssh/id_rsa",
            "/home/u/.ssh",
            "/home/u/.sshx/k",
            "/x.ssh/y",
            "/w/.env",
            "/w/.env.local",
            "/w/.envrc",
            "/w/x.env",
            "/w/.env/inner",
            "/root/.netrc",
            "/root/.netrcx",
            "/etc/shadow",
            "/etc/shadow-",
            "/h/.config/gcloud/creds",
            "/h/.config/gcloudx",
            "/h/.aws",
            "/src/main.rs",
        ];
        for ev in [crate::context::FileEvent::Open, crate::context::FileEvent::Write, crate::context::FileEvent::Unlink]
        {
            let bit = FILE_EVENTS.iter().find(|(e, _)| *e == ev.as_str()).unwrap().1;
            for p in paths {
                let d = set.evaluate(&crate::context::file_context(&a, &proc, ev, p, "read"), &opts);
                let kernel = fp.matches(p, bit).is_some();
                assert_eq!(kernel, d.action.is_deny_class(), "{ev:?} {p}: {d:?}");
            }
        }
        // Tier B: no file kernel plan; unlink/rename cannot be enforced before effect (strict: error).
        let plan = compile(&set, &agent(), &caps(false), &resolved(), false).unwrap();
        assert!(plan.file.is_none());
        let r = plan.rules.iter().find(|r| r.rule == "block-credential-access").unwrap();
        assert!(r.planes.iter().any(|p| p.class == "file_namespace" && p.problem.is_some()));
        assert!(r.planes.iter().any(|p| p.plane.as_deref() == Some("fanotify permission events (synchronous)")));
        let e = compile(&set, &agent(), &caps(false), &resolved(), true).unwrap_err();
        assert!(e.to_string().contains("block-credential-access"), "{e}");
        // A higher-priority allow that can apply to file events keeps a deny out of the kernel forms.
        let text = "name: f\nagents: ['*']\nrules:\n  - {name: ok, condition: \"event == 'file_open' and file.access == 'read'\", action: allow, priority: 10}\n  - {name: nope, condition: \"event in ['file_open', 'unlink'] and file.path startswith '/secret/'\", action: deny, priority: 5}\n";
        let set = PolicySet::from_str("f.yaml", text).unwrap();
        let plan = compile(&set, &agent(), &caps(true), &resolved(), false).unwrap();
        assert!(plan.file.unwrap().paths.is_empty());
        let r = plan.rules.iter().find(|r| r.rule == "nope").unwrap();
        assert!(r.planes.iter().any(|p| p.plane.as_deref().is_some_and(|x| x.contains("f/ok"))), "{r:?}");
    }

    #[test]
    fn rule_planes_per_tier() {
        let set = PolicySet::load(&[repo("policies/coding-agent/policy.yaml")]).unwrap();
        let tier_b = compile(&set, &agent(), &caps(false), &resolved(), false).unwrap();
        let get = |p: &Plan, n: &str| p.rules.iter().find(|r| r.rule == n).unwrap().clone();
        let rm = get(&tier_b, "block-destructive-rm");
        assert_eq!(rm.events.as_deref(), Some(&["exec".to_string()][..]));
        assert_eq!(rm.planes[0].plane.as_deref(), Some("seccomp user-notification (synchronous, before exec)"));
        let egress = get(&tier_b, "block-other-egress");
        assert_eq!(egress.planes[0].plane.as_deref(), Some("kernel: cgroup connect/sendmsg/bind tables"));
        assert_eq!(get(&tier_b, "allow-loopback").planes[0].plane.as_deref(), Some("nothing to block"));
        assert_eq!(
            get(&tier_b, "block-ptrace").planes[0].plane.as_deref(),
            Some("ring floor: pid namespace + seccomp")
        );
        let tier_a = compile(&set, &agent(), &caps(true), &resolved(), true).unwrap();
        assert!(get(&tier_a, "block-destructive-rm").planes[0]
            .plane
            .as_deref()
            .unwrap()
            .contains("bprm_check_security"));
        let ring0 = HostCaps { bpf_lsm: false, fanotify: true, confined: false, ring: 0 };
        let p0 = compile(&set, &agent(), &ring0, &resolved(), false).unwrap();
        assert!(get(&p0, "block-ptrace").planes[0].problem.is_some());
        assert!(compile(&set, &agent(), &ring0, &resolved(), true).is_err());
        assert_eq!(domains(&set).len(), 9);
    }
}
