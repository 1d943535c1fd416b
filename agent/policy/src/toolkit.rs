//! `apiVersion: governance.toolkit/v1` documents (AGT's `agentmesh.governance.PolicyEngine`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::expr::{Expr, PathTable, Prog};
use crate::limit::{LimitRef, RateSpec};
use crate::yaml::{Kind, Node, Pos};
use crate::{quoted, Action, Decision, Document, LoadError, Stage, Strategy, MAX_EXTENDS_DEPTH};

/// Policy scope, for most_specific_wins (agent > organization > tenant > global).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Global = 0,
    Tenant = 1,
    Organization = 2,
    Agent = 3,
}

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub name: String,
    pub description: Option<String>,
    pub stage: Stage,
    pub condition_src: String,
    pub condition: Expr,
    /// `condition` lowered against the owning policy's path table.
    pub prog: Prog,
    /// Decision reason: the description, or AGT's "Rule NAME matched".
    pub reason: String,
    pub action: Action,
    pub priority: i64,
    pub enabled: bool,
    pub limit: Option<RateSpec>,
    pub approvers: Vec<String>,
    /// Came from an `extends` parent; a child can never override such a deny.
    pub inherited: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub file: String,
    pub name: String,
    pub name_pos: Pos,
    pub agent: Option<String>,
    pub agents: Vec<String>,
    pub scope: Scope,
    pub rules: Vec<Rule>,
    pub paths: PathTable,
    /// Rules bucketed by their most selective string-equality guard (built after extends).
    pub index: Option<RuleIndex>,
    /// `*` in `agents`: applies to every agent without looking the agent up.
    pub wildcard: bool,
    pub default_action: Action,
    pub strategy: Option<Strategy>,
    pub strategy_pos: Pos,
    /// The `trust:` section as written (agt-jail's; AGT ignores it), read by the supervisor.
    pub trust: Option<serde_json::Value>,
    /// Valid but suspicious constructs, for `policy lint` (this file and its `extends` parents).
    pub warnings: Vec<LoadError>,
}

impl Policy {
    /// AGT's `Policy.applies_to`: exact `agent`, listed in `agents`, or `*` in `agents`.
    pub fn applies_to(&self, agent: &str) -> bool {
        // An empty `agent` is falsy in AGT's check and matches nobody.
        self.agent.as_deref().is_some_and(|a| !a.is_empty() && a == agent)
            || self.agents.iter().any(|a| a == agent || a == "*")
    }
}

const TOP_KEYS: &[&str] = &[
    "apiVersion",
    "version",
    "name",
    "description",
    "extends",
    "agent",
    "agents",
    "scope",
    "rules",
    "default_action",
    "created_at",
    "updated_at",
    "conflict_strategy",
    "trust",
];
const RULE_KEYS: &[&str] =
    &["name", "description", "stage", "condition", "action", "limit", "approvers", "priority", "enabled"];

pub(crate) struct Ctx<'a> {
    pub file: &'a str,
    /// The file's text, to locate errors inside scalars (empty when not available).
    pub src: &'a str,
}

impl Ctx<'_> {
    pub fn err(&self, pos: Pos, msg: impl Into<String>) -> LoadError {
        LoadError::new(self.file, pos, msg)
    }

    pub fn check_keys(&self, node: &Node, allowed: &[&str], what: &str) -> Result<(), LoadError> {
        if let Kind::Map(entries) = &node.kind {
            for (k, _) in entries {
                match &k.kind {
                    Kind::Str(s) if allowed.contains(&s.as_str()) => {}
                    Kind::Str(s) => {
                        return Err(self.err(
                            k.pos,
                            format!("unknown {what} field {}; expected one of: {}", quoted(s), allowed.join(", ")),
                        ))
                    }
                    _ => return Err(self.err(k.pos, format!("{what} keys must be strings"))),
                }
            }
        }
        Ok(())
    }

    pub fn string(&self, node: &Node, what: &str) -> Result<String, LoadError> {
        match &node.kind {
            Kind::Str(s) => Ok(s.clone()),
            _ => Err(self.err(node.pos, format!("expected a string for {what}, found {}", node.type_name()))),
        }
    }

    pub fn opt_string(&self, parent: &Node, key: &str) -> Result<Option<String>, LoadError> {
        match parent.get(key) {
            None => Ok(None),
            Some(n) if n.kind == Kind::Null => Ok(None),
            Some(n) => self.string(n, key).map(Some),
        }
    }

    pub fn string_list(&self, node: &Node, what: &str) -> Result<Vec<String>, LoadError> {
        match &node.kind {
            Kind::Null => Ok(Vec::new()),
            Kind::Seq(items) => items.iter().map(|i| self.string(i, what)).collect(),
            _ => Err(self.err(node.pos, format!("expected a list of strings for {what}, found {}", node.type_name()))),
        }
    }

    /// Type-checks an optional field AGT's pydantic model declares, whose value agt-jail does not
    /// use: a wrong type is a load error in AGT, so it is one here too.
    pub fn check_field(&self, parent: &Node, key: &str, ty: FieldType) -> Result<(), LoadError> {
        let Some(n) = parent.get(key) else { return Ok(()) };
        let ok = match ty {
            FieldType::Str => matches!(n.kind, Kind::Str(_)),
            FieldType::OptStr => matches!(n.kind, Kind::Str(_) | Kind::Null),
            FieldType::Int => matches!(n.kind, Kind::Int(_)),
            FieldType::OptInt => matches!(n.kind, Kind::Int(_) | Kind::Null),
            FieldType::Number => matches!(n.kind, Kind::Int(_) | Kind::Float(_)),
            FieldType::OptNumber => matches!(n.kind, Kind::Int(_) | Kind::Float(_) | Kind::Null),
            FieldType::Bool => matches!(n.kind, Kind::Bool(_)),
            FieldType::StrList => match &n.kind {
                Kind::Seq(items) => items.iter().all(|i| matches!(i.kind, Kind::Str(_))),
                _ => false,
            },
            FieldType::DateTime => match &n.kind {
                Kind::Str(s) => is_datetime(s),
                Kind::Int(_) | Kind::Float(_) => true,
                _ => false,
            },
        };
        if ok {
            Ok(())
        } else {
            Err(self.err(n.pos, format!("expected {} for {key}, found {}", ty.describe(), n.type_name())))
        }
    }

    pub fn int(&self, node: &Node, what: &str) -> Result<i64, LoadError> {
        match &node.kind {
            Kind::Int(i) => Ok(*i),
            _ => Err(self.err(node.pos, format!("expected an integer for {what}, found {}", node.type_name()))),
        }
    }
}

/// What pydantic accepts for a `datetime` given as a string: an ISO 8601 date or date-time with
/// in-range fields, or a number (Unix time).
fn is_datetime(s: &str) -> bool {
    if s.parse::<f64>().is_ok_and(f64::is_finite) {
        return true;
    }
    let Ok(re) = regex::Regex::new(
        r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])([T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?)?$",
    ) else {
        return false;
    };
    re.is_match(s)
}

/// Field types of AGT's pydantic models, for [`Ctx::check_field`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum FieldType {
    Str,
    OptStr,
    Int,
    OptInt,
    Number,
    OptNumber,
    Bool,
    StrList,
    DateTime,
}

impl FieldType {
    fn describe(self) -> &'static str {
        match self {
            FieldType::Str => "a string",
            FieldType::OptStr => "a string or null",
            FieldType::Int => "an integer",
            FieldType::OptInt => "an integer or null",
            FieldType::Number => "a number",
            FieldType::OptNumber => "a number or null",
            FieldType::Bool => "a boolean",
            FieldType::StrList => "a list of strings",
            FieldType::DateTime => "an ISO 8601 date-time (or a Unix time)",
        }
    }
}

/// Where a condition's character `offset` lands in the file.
fn condition_pos(cx: &Ctx<'_>, node: &Node, cond: &str, offset: usize) -> Pos {
    crate::yaml::scalar_char_pos(cx.src, node.pos, cond, offset).unwrap_or(node.pos)
}

pub(crate) fn parse(
    node: &Node,
    cx: &Ctx<'_>,
    path: Option<&Path>,
    stack: &mut Vec<PathBuf>,
) -> Result<Policy, LoadError> {
    let file = cx.file;
    cx.check_keys(node, TOP_KEYS, "policy")?;
    if let Some(v) = node.get("apiVersion") {
        let s = cx.string(v, "apiVersion")?;
        if s != "governance.toolkit/v1" && s != "1.0" {
            return Err(
                cx.err(v.pos, format!("unsupported apiVersion {}; expected \"governance.toolkit/v1\"", quoted(&s)))
            );
        }
    }
    cx.check_field(node, "version", FieldType::Str)?;
    cx.check_field(node, "description", FieldType::OptStr)?;
    cx.check_field(node, "created_at", FieldType::DateTime)?;
    cx.check_field(node, "updated_at", FieldType::DateTime)?;
    let name_node = node.get("name").ok_or_else(|| cx.err(node.pos, "missing required field \"name\""))?;
    let name = cx.string(name_node, "name")?;
    let default_action = match node.get("default_action") {
        None => Action::Deny,
        Some(n) => match cx.string(n, "default_action")?.as_str() {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            other => {
                return Err(cx.err(n.pos, format!("invalid default_action {}; expected allow or deny", quoted(other))))
            }
        },
    };
    let agent = cx.opt_string(node, "agent")?;
    let agents = match node.get("agents") {
        Some(n) => cx.string_list(n, "agents")?,
        None => Vec::new(),
    };
    let scope = match cx.opt_string(node, "scope")?.as_deref() {
        None | Some("global") => Scope::Global,
        Some("tenant") => Scope::Tenant,
        Some("organization") => Scope::Organization,
        Some("agent") => Scope::Agent,
        // AGT maps unknown scopes to global; so do we, for identical decisions.
        Some(_) => Scope::Global,
    };
    let (strategy, strategy_pos) = match node.get("conflict_strategy") {
        None => (None, Pos::default()),
        Some(n) => {
            let s = cx.string(n, "conflict_strategy")?;
            let st = Strategy::parse(&s).ok_or_else(|| {
                cx.err(
                    n.pos,
                    format!("invalid conflict_strategy {}; expected priority_first_match, deny_overrides, allow_overrides or most_specific_wins", quoted(&s)),
                )
            })?;
            (Some(st), n.pos)
        }
    };
    let mut rules = Vec::new();
    let mut warnings = Vec::new();
    let mut paths = PathTable::default();
    match node.get("rules") {
        None => {}
        Some(n) => match &n.kind {
            Kind::Null => {}
            Kind::Seq(items) => {
                for item in items {
                    rules.push(parse_rule(cx, item, &mut paths, &mut warnings)?);
                }
            }
            _ => return Err(cx.err(n.pos, format!("expected a list for rules, found {}", n.type_name()))),
        },
    }
    let mut policy = Policy {
        file: file.to_string(),
        name,
        name_pos: name_node.pos,
        agent,
        wildcard: agents.iter().any(|a| a == "*"),
        agents,
        scope,
        rules,
        paths,
        index: None,
        default_action,
        strategy,
        strategy_pos,
        trust: node.get("trust").map(Node::to_json),
        warnings,
    };
    if let Some(ext) = node.get("extends") {
        let refs: Vec<(String, Pos)> = match &ext.kind {
            Kind::Null => Vec::new(),
            Kind::Str(s) => vec![(s.clone(), ext.pos)],
            Kind::Seq(items) => {
                items.iter().map(|i| cx.string(i, "extends").map(|s| (s, i.pos))).collect::<Result<_, _>>()?
            }
            _ => return Err(cx.err(ext.pos, "expected a path or list of paths for extends")),
        };
        if !refs.is_empty() {
            let Some(path) = path else {
                return Err(cx.err(ext.pos, "extends needs the policy to be loaded from a file"));
            };
            resolve_extends(cx, &mut policy, path, &refs, stack)?;
        }
    }
    policy.index = RuleIndex::build(&policy.rules, &mut policy.paths);
    Ok(policy)
}

fn resolve_extends(
    cx: &Ctx<'_>,
    policy: &mut Policy,
    path: &Path,
    refs: &[(String, Pos)],
    stack: &mut Vec<PathBuf>,
) -> Result<(), LoadError> {
    let io = |pos: Pos, what: &str, e: std::io::Error| cx.err(pos, format!("{what}: {e}"));
    let me = std::fs::canonicalize(path).map_err(|e| io(Pos::default(), "cannot resolve policy path", e))?;
    let base = me.parent().map(Path::to_path_buf).unwrap_or_default();
    if stack.len() >= MAX_EXTENDS_DEPTH {
        return Err(cx.err(refs[0].1, format!("extends chain deeper than {MAX_EXTENDS_DEPTH} files")));
    }
    stack.push(me.clone());
    let mut parent_rules: Vec<Rule> = Vec::new();
    for (r, pos) in refs {
        let candidate = base.join(r);
        let real = std::fs::canonicalize(&candidate)
            .map_err(|e| io(*pos, &format!("extends {} cannot be read at {}", quoted(r), candidate.display()), e))?;
        if !real.starts_with(&base) {
            stack.pop();
            return Err(cx.err(
                *pos,
                format!(
                    "extends {} resolves to {} which is outside the policy directory {}",
                    quoted(r),
                    real.display(),
                    base.display()
                ),
            ));
        }
        if stack.contains(&real) {
            let chain: Vec<String> =
                stack.iter().chain(std::iter::once(&real)).map(|p| p.display().to_string()).collect();
            return Err(cx.err(*pos, format!("circular extends: {}", chain.join(" -> "))));
        }
        let parent = match crate::load_document_inner(&real, stack)? {
            Document::Toolkit(p) => p,
            Document::V4(_) => {
                return Err(cx
                    .err(*pos, format!("extends {} is an Agent-OS v4 document, not governance.toolkit/v1", quoted(r))))
            }
        };
        policy.warnings.extend(parent.warnings);
        // Diamonds: the first parent to define a rule name wins, as in AGT.
        for mut rule in parent.rules {
            if !parent_rules.iter().any(|p| p.name == rule.name) {
                rule.inherited = true;
                parent_rules.push(rule);
            }
        }
    }
    stack.pop();
    // Additive only: a child rule that reuses a parent deny's name with a permissive action is
    // dropped (AGT drops allow/log; warn is also permissive here).
    let own = std::mem::take(&mut policy.rules);
    let denied: Vec<&str> = parent_rules.iter().filter(|r| r.action.is_deny_class()).map(|r| r.name.as_str()).collect();
    let kept: Vec<Rule> =
        own.into_iter().filter(|r| !(denied.contains(&r.name.as_str()) && r.action.is_allowed())).collect();
    // Inherited rules were lowered against the parent's path table; lower them against ours.
    for r in &mut parent_rules {
        r.prog = Prog::compile(&r.condition, &mut policy.paths);
    }
    policy.rules = parent_rules;
    policy.rules.extend(kept);
    Ok(())
}

fn parse_rule(
    cx: &Ctx<'_>,
    node: &Node,
    paths: &mut PathTable,
    warnings: &mut Vec<LoadError>,
) -> Result<Rule, LoadError> {
    if !matches!(node.kind, Kind::Map(_)) {
        return Err(cx.err(node.pos, format!("expected a rule mapping, found {}", node.type_name())));
    }
    cx.check_keys(node, RULE_KEYS, "rule")?;
    let name = cx.string(
        node.get("name").ok_or_else(|| cx.err(node.pos, "rule is missing required field \"name\""))?,
        "rule name",
    )?;
    let cond_node = node
        .get("condition")
        .ok_or_else(|| cx.err(node.pos, format!("rule {} is missing required field \"condition\"", quoted(&name))))?;
    let condition_src = cx.string(cond_node, "condition")?;
    let located = |e: crate::expr::ExprError| {
        cx.err(
            condition_pos(cx, cond_node, &condition_src, e.offset),
            format!("rule {}: condition: {}", quoted(&name), e.message),
        )
    };
    let (condition, notes) = Expr::parse_noted(&condition_src).map_err(located)?;
    warnings.extend(notes.into_iter().map(located));
    let action = match node.get("action") {
        None => Action::Deny,
        Some(n) => {
            let s = cx.string(n, "action")?;
            match Action::parse(&s) {
                Some(
                    a @ (Action::Allow
                    | Action::Deny
                    | Action::Warn
                    | Action::RequireApproval
                    | Action::Log
                    | Action::Kill),
                ) => a,
                _ => {
                    return Err(cx.err(
                        n.pos,
                        format!(
                            "invalid action {}; expected allow, deny, warn, require_approval, log or kill",
                            quoted(&s)
                        ),
                    ))
                }
            }
        }
    };
    let stage = match node.get("stage") {
        None => Stage::PreTool,
        Some(n) => Stage::parse_or_explain(&cx.string(n, "stage")?).map_err(|m| cx.err(n.pos, m))?,
    };
    let priority = match node.get("priority") {
        None => 0,
        Some(n) => cx.int(n, "priority")?,
    };
    let enabled = match node.get("enabled") {
        None => true,
        Some(n) => match n.kind {
            Kind::Bool(b) => b,
            _ => return Err(cx.err(n.pos, format!("expected a boolean for enabled, found {}", n.type_name()))),
        },
    };
    let limit = match node.get("limit") {
        None => None,
        Some(n) if n.kind == Kind::Null => None,
        Some(n) => {
            let s = cx.string(n, "limit")?;
            Some(RateSpec::parse(&s).map_err(|m| cx.err(n.pos, m))?)
        }
    };
    let approvers = match node.get("approvers") {
        None => Vec::new(),
        Some(n) => cx.string_list(n, "approvers")?,
    };
    let description = cx.opt_string(node, "description")?;
    Ok(Rule {
        reason: description.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| format!("Rule {name} matched")),
        prog: Prog::compile(&condition, paths),
        name,
        description,
        stage,
        condition_src,
        condition,
        action,
        priority,
        enabled,
        limit,
        approvers,
        inherited: false,
    })
}

#[derive(Clone, Copy)]
struct Candidate<'a> {
    policy: &'a Policy,
    rule: &'a Rule,
}

/// Collects matching rules across the applicable policies and resolves them with `strategy`.
/// `None` when nothing matched (the caller then consults Rego, then the default).
pub(crate) fn evaluate<'a>(
    applicable: impl Iterator<Item = &'a Policy>,
    ctx: &'a Value,
    stage: Stage,
    strategy: Strategy,
) -> Option<Decision> {
    let mut cands: Vec<Candidate<'a>> = Vec::new();
    for p in applicable {
        let mut slots = p.paths.slots(ctx);
        let mut consider = |r: &'a Rule, slots: &mut crate::expr::Slots<'a>| {
            if r.enabled && r.stage == stage && r.prog.eval(slots) {
                cands.push(Candidate { policy: p, rule: r });
            }
        };
        match &p.index {
            None => p.rules.iter().for_each(|r| consider(r, &mut slots)),
            Some(ix) => {
                // Only rules whose guard can hold, in load order (ties must resolve as in AGT).
                let bucket: &[u32] = match slots.get(ix.slot) {
                    Value::String(v) => ix.by_value.get(v.as_str()).map_or(&[], Vec::as_slice),
                    _ => &[],
                };
                let (mut a, mut b) = (bucket.iter().peekable(), ix.unguarded.iter().peekable());
                loop {
                    let next = match (a.peek(), b.peek()) {
                        (Some(x), Some(y)) if x < y => a.next(),
                        (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                        (Some(_), None) => a.next(),
                        (None, None) => break,
                    };
                    if let Some(r) = next.and_then(|i| p.rules.get(*i as usize)) {
                        consider(r, &mut slots);
                    }
                }
            }
        }
    }
    if cands.is_empty() {
        return None;
    }
    // AGT sorts stably by priority, descending; ties keep load order, so the first maximum wins.
    fn best<'a>(
        it: impl Iterator<Item = Candidate<'a>>,
        key: impl Fn(&Candidate<'a>) -> (i64, i64),
    ) -> Option<Candidate<'a>> {
        let mut out: Option<Candidate<'a>> = None;
        for c in it {
            if out.as_ref().is_none_or(|o| key(&c) > key(o)) {
                out = Some(c);
            }
        }
        out
    }
    let prio = |c: &Candidate<'_>| (c.rule.priority, 0);
    let all = || cands.iter().copied();
    let winner = match strategy {
        Strategy::PriorityFirstMatch => best(all(), prio),
        Strategy::DenyOverrides => {
            best(all().filter(|c| c.rule.action.is_deny_class()), prio).or_else(|| best(all(), prio))
        }
        Strategy::AllowOverrides => {
            best(all().filter(|c| c.rule.action == Action::Allow), prio).or_else(|| best(all(), prio))
        }
        Strategy::MostSpecificWins => best(all(), |c| (c.policy.scope as i64, c.rule.priority)),
    }?;
    // Extends floor: a child's permissive rule never beats a matching deny inherited from a parent.
    let winner = if winner.rule.action.is_allowed() && !winner.rule.inherited {
        best(
            all()
                .filter(|c| std::ptr::eq(c.policy, winner.policy) && c.rule.inherited && c.rule.action.is_deny_class()),
            prio,
        )
        .unwrap_or(winner)
    } else {
        winner
    };
    let r = winner.rule;
    let mut d = Decision::new(r.action, Some(r.name.clone()), Some(winner.policy.name.clone()), r.reason.clone());
    d.approvers = r.approvers.clone();
    d.limit = r.limit.as_ref().map(|spec| LimitRef {
        agent: String::new(),
        policy: winner.policy.name.clone(),
        rule: r.name.clone(),
        spec: spec.clone(),
    });
    Some(d)
}

/// Rules bucketed by the value of one context path that most of them test for string equality
/// (`path == 'x'` or `path in ['x', 'y']` as a top-level conjunct). A rule whose guard value
/// differs from the context's cannot match, so it is skipped without being evaluated.
#[derive(Debug, Clone)]
pub(crate) struct RuleIndex {
    slot: u32,
    by_value: std::collections::HashMap<String, Vec<u32>>,
    unguarded: Vec<u32>,
}

/// Below this many rules a linear scan is as fast as the index.
const INDEX_MIN_RULES: usize = 8;

type Guard<'a> = (&'a [String], Vec<&'a str>);

fn guard(e: &Expr) -> Option<Guard<'_>> {
    use crate::expr::{CmpOp, Operand};
    {
        match e {
            Expr::Cmp(CmpOp::Eq, Operand::Path(p), Operand::Lit(Value::String(s)))
            | Expr::Cmp(CmpOp::Eq, Operand::Lit(Value::String(s)), Operand::Path(p)) => {
                Some((p.as_slice(), vec![s.as_str()]))
            }
            Expr::Cmp(CmpOp::In, Operand::Path(p), Operand::Lit(Value::Array(items))) => {
                let strs: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                strs.map(|v| (p.as_slice(), v))
            }
            _ => None,
        }
    }
}

fn guards(e: &Expr) -> Vec<Guard<'_>> {
    match e {
        Expr::And(es) => es.iter().filter_map(guard).collect(),
        other => guard(other).into_iter().collect(),
    }
}

impl RuleIndex {
    fn build(rules: &[Rule], paths: &mut PathTable) -> Option<RuleIndex> {
        if rules.len() < INDEX_MIN_RULES {
            return None;
        }
        let all: Vec<Vec<Guard<'_>>> = rules.iter().map(|r| guards(&r.condition)).collect();
        // Pick the path with the fewest expected rule evaluations per event.
        let mut best: Option<(&[String], f64)> = None;
        let mut seen: Vec<&[String]> = Vec::new();
        for g in all.iter().flatten() {
            if seen.contains(&g.0) {
                continue;
            }
            seen.push(g.0);
            let mut guarded = 0usize;
            let mut values: std::collections::HashSet<&str> = Default::default();
            for rg in &all {
                if let Some((_, vs)) = rg.iter().find(|(p, _)| *p == g.0) {
                    guarded += 1;
                    values.extend(vs.iter().copied());
                }
            }
            let cost = (rules.len() - guarded) as f64 + guarded as f64 / values.len().max(1) as f64;
            if best.is_none_or(|(_, c)| cost < c) {
                best = Some((g.0, cost));
            }
        }
        let (path, cost) = best?;
        if cost > rules.len() as f64 * 0.75 {
            return None;
        }
        let mut ix = RuleIndex { slot: paths.slot_of(path), by_value: Default::default(), unguarded: Vec::new() };
        for (i, rg) in all.iter().enumerate() {
            match rg.iter().find(|(p, _)| *p == path) {
                Some((_, vs)) => {
                    let mut vs = vs.clone();
                    vs.sort_unstable();
                    vs.dedup();
                    for v in vs {
                        ix.by_value.entry(v.to_string()).or_default().push(i as u32);
                    }
                }
                None => ix.unguarded.push(i as u32),
            }
        }
        Some(ix)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn policy(yaml: &str) -> Policy {
        let node = crate::yaml::parse(yaml).unwrap();
        parse(&node, &Ctx { file: "t.yaml", src: yaml }, None, &mut Vec::new()).unwrap()
    }

    #[test]
    fn index_gives_the_same_decisions_as_a_scan() {
        let mut doc = String::from("name: p\nagents: ['*']\nrules:\n");
        let events = ["exec", "file_open", "connect"];
        for i in 0..24 {
            let cond = match i % 4 {
                0 => format!("event == '{}' and proc.uid > {}", events[i % 3], i),
                1 => format!("event in ['{}', 'unlink'] and file.path", events[i % 3]),
                2 => format!("proc.uid == {i}"),
                _ => format!("'{}' == event or net.port > {i}", events[i % 3]),
            };
            doc.push_str(&format!("  - {{name: r{i}, condition: \"{cond}\", action: deny, priority: {}}}\n", i % 3));
        }
        let indexed = policy(&doc);
        assert!(indexed.index.is_some());
        let mut scan = indexed.clone();
        scan.index = None;
        for ev in ["exec", "file_open", "connect", "unlink", "other"] {
            for uid in [0, 5, 13, 30] {
                for ctx in [
                    json!({"event": ev, "proc": {"uid": uid}, "file": {"path": "/x"}, "net": {"port": uid}}),
                    json!({"event": uid, "proc": {"uid": uid}}),
                    json!({"proc": {"uid": uid}}),
                ] {
                    for st in [Strategy::PriorityFirstMatch, Strategy::DenyOverrides] {
                        let a = evaluate([&indexed].into_iter(), &ctx, Stage::PreTool, st);
                        let b = evaluate([&scan].into_iter(), &ctx, Stage::PreTool, st);
                        assert_eq!(a, b, "{ctx}");
                    }
                }
            }
        }
    }

    #[test]
    fn many_paths_and_atoms_agree_with_the_ast() {
        // More than 16 paths and 64 atoms: exercises the spilled slots and unmemoized atoms.
        let mut doc = String::from("name: p\nagents: ['*']\nrules:\n");
        for i in 0..120 {
            doc.push_str(&format!(
                "  - {{name: r{i}, condition: \"k{}.x == 'v{}' and k{}.x != 'w' or n{} > {i}\", action: deny, priority: {i}}}\n",
                i % 40,
                i % 7,
                i % 40,
                i % 30
            ));
        }
        let p = policy(&doc);
        for j in 0..60 {
            let mut ctx = serde_json::Map::new();
            for k in 0..40 {
                ctx.insert(format!("k{k}"), json!({"x": format!("v{}", (j + k) % 7)}));
            }
            for n in 0..30 {
                ctx.insert(format!("n{n}"), json!((j * 7 + n) % 130));
            }
            let ctx = Value::Object(ctx);
            let mut slots = p.paths.slots(&ctx);
            for r in &p.rules {
                assert_eq!(r.prog.eval(&mut slots), r.condition.eval(&ctx), "{} on {ctx}", r.condition_src);
            }
        }
    }
}
