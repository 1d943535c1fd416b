//! Agent-OS v4 `PolicyDocument`s (AGT's `agent_os.policies.PolicyEvaluator`):
//! all rules sorted by priority (descending, stable), first match wins, then the first
//! document's `defaults.action`. Operators use Python semantics; a `TypeError` in Python is an
//! evaluation error here too, and the whole evaluation becomes a deny (as in AGT).

use std::cmp::Ordering;

use regex::Regex;
use serde_json::Value;

use crate::toolkit::{Ctx, FieldType};
use crate::value::{py_cmp, py_eq, py_in, py_str};
use crate::yaml::{Kind, Node};
use crate::{quoted, Action, Decision, LoadError, RuleView};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Gt,
    Lt,
    Gte,
    Lte,
    In,
    NotIn,
    Matches,
    Contains,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "gt" => Op::Gt,
            "lt" => Op::Lt,
            "gte" => Op::Gte,
            "lte" => Op::Lte,
            "in" => Op::In,
            "not_in" => Op::NotIn,
            "matches" => Op::Matches,
            "contains" => Op::Contains,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Ne => "ne",
            Op::Gt => "gt",
            Op::Lt => "lt",
            Op::Gte => "gte",
            Op::Lte => "lte",
            Op::In => "in",
            Op::NotIn => "not_in",
            Op::Matches => "matches",
            Op::Contains => "contains",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct V4Rule {
    pub name: String,
    pub field: String,
    /// `field` split on dots, used only when the context has no top-level key `field`.
    pub field_path: Vec<String>,
    pub op: Op,
    pub value: Value,
    pub regex: Option<Regex>,
    pub action: Action,
    pub priority: i64,
    pub message: String,
}

#[derive(Debug, Clone)]
pub(crate) struct V4Policy {
    pub name: String,
    pub rules: Vec<V4Rule>,
    pub default_action: Action,
}

#[derive(Debug, Default)]
pub(crate) struct V4Set {
    policies: Vec<V4Policy>,
    /// (policy index, rule index), sorted by priority descending; ties keep load order.
    order: Vec<(usize, usize)>,
}

/// A document is v4 when it has no apiVersion and either `defaults` or a mapping condition.
pub(crate) fn looks_like_v4(node: &Node) -> bool {
    if node.get("apiVersion").is_some() {
        return false;
    }
    if node.get("defaults").is_some() {
        return true;
    }
    match node.get("rules").map(|r| &r.kind) {
        Some(Kind::Seq(items)) => {
            items.iter().any(|r| matches!(r.get("condition").map(|c| &c.kind), Some(Kind::Map(_))))
        }
        _ => false,
    }
}

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "description",
    "rules",
    "defaults",
    "inherit",
    "scope",
    "network_allowlist",
    "tool_allowlist",
    "sandbox_mounts",
];
const RULE_KEYS: &[&str] = &["name", "condition", "action", "priority", "message", "override", "dynamic_condition"];
const DEFAULT_KEYS: &[&str] = &[
    "action",
    "max_tokens",
    "max_tool_calls",
    "confidence_threshold",
    "max_cpu",
    "max_memory_mb",
    "timeout_seconds",
    "network_default",
];

/// Top-level fields of AGT's `PolicyDocument` that agt-jail does not use, type-checked as AGT does.
fn check_v4_fields(cx: &Ctx<'_>, node: &Node) -> Result<(), LoadError> {
    cx.check_field(node, "version", FieldType::Str)?;
    cx.check_field(node, "description", FieldType::Str)?;
    cx.check_field(node, "inherit", FieldType::Bool)?;
    cx.check_field(node, "scope", FieldType::OptStr)?;
    cx.check_field(node, "network_allowlist", FieldType::StrList)?;
    cx.check_field(node, "tool_allowlist", FieldType::StrList)?;
    if let Some(m) = node.get("sandbox_mounts") {
        if !matches!(m.kind, Kind::Map(_)) {
            return Err(cx.err(m.pos, format!("expected a mapping for sandbox_mounts, found {}", m.type_name())));
        }
        cx.check_keys(m, &["input_dir", "output_dir"], "sandbox_mounts")?;
        cx.check_field(m, "input_dir", FieldType::OptStr)?;
        cx.check_field(m, "output_dir", FieldType::OptStr)?;
    }
    Ok(())
}

fn parse_action(cx: &Ctx<'_>, n: &Node) -> Result<Action, LoadError> {
    let s = cx.string(n, "action")?;
    match s.as_str() {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        "audit" => Ok(Action::Audit),
        "block" => Ok(Action::Block),
        _ => Err(cx.err(n.pos, format!("invalid action {}; expected allow, deny, audit or block", quoted(&s)))),
    }
}

pub(crate) fn parse(node: &Node, cx: &Ctx<'_>) -> Result<V4Policy, LoadError> {
    cx.check_keys(node, TOP_KEYS, "policy")?;
    let name = cx.opt_string(node, "name")?.unwrap_or_else(|| "unnamed".to_string());
    check_v4_fields(cx, node)?;
    let default_action = match node.get("defaults") {
        None => Action::Deny,
        Some(d) => {
            if !matches!(d.kind, Kind::Map(_)) {
                return Err(cx.err(d.pos, format!("expected a mapping for defaults, found {}", d.type_name())));
            }
            cx.check_keys(d, DEFAULT_KEYS, "defaults")?;
            for (key, ty) in [
                ("max_tokens", FieldType::Int),
                ("max_tool_calls", FieldType::Int),
                ("confidence_threshold", FieldType::Number),
                ("max_cpu", FieldType::OptNumber),
                ("max_memory_mb", FieldType::OptInt),
                ("timeout_seconds", FieldType::OptInt),
            ] {
                cx.check_field(d, key, ty)?;
            }
            if let Some(n) = d.get("network_default") {
                let s = cx.string(n, "network_default")?;
                if s != "allow" && s != "deny" {
                    return Err(
                        cx.err(n.pos, format!("invalid network_default {}; expected allow or deny", quoted(&s)))
                    );
                }
            }
            match d.get("action") {
                None => Action::Deny,
                Some(a) => parse_action(cx, a)?,
            }
        }
    };
    let mut rules = Vec::new();
    if let Some(rs) = node.get("rules") {
        let items = match &rs.kind {
            Kind::Seq(items) => items,
            Kind::Null => &Vec::new(),
            _ => return Err(cx.err(rs.pos, format!("expected a list for rules, found {}", rs.type_name()))),
        };
        for r in items {
            if !matches!(r.kind, Kind::Map(_)) {
                return Err(cx.err(r.pos, format!("expected a rule mapping, found {}", r.type_name())));
            }
            cx.check_keys(r, RULE_KEYS, "rule")?;
            let rname = cx.string(
                r.get("name").ok_or_else(|| cx.err(r.pos, "rule is missing required field \"name\""))?,
                "rule name",
            )?;
            if let Some(dc) = r.get("dynamic_condition") {
                if dc.kind != Kind::Null {
                    return Err(cx.err(dc.pos, "dynamic_condition is not supported by agt-jail (time and budget windows live outside the pure evaluator)"));
                }
            }
            let c = r.get("condition").ok_or_else(|| {
                cx.err(r.pos, format!("rule {} is missing required field \"condition\"", quoted(&rname)))
            })?;
            if !matches!(c.kind, Kind::Map(_)) {
                return Err(cx.err(c.pos, "expected a condition mapping {field, operator, value}"));
            }
            cx.check_keys(c, &["field", "operator", "value"], "condition")?;
            let field =
                cx.string(c.get("field").ok_or_else(|| cx.err(c.pos, "condition is missing \"field\""))?, "field")?;
            let op_node = c.get("operator").ok_or_else(|| cx.err(c.pos, "condition is missing \"operator\""))?;
            let op_s = cx.string(op_node, "operator")?;
            let op = Op::parse(&op_s).ok_or_else(|| {
                cx.err(
                    op_node.pos,
                    format!(
                        "invalid operator {}; expected eq, ne, gt, lt, gte, lte, in, not_in, matches or contains",
                        quoted(&op_s)
                    ),
                )
            })?;
            let value_node = c.get("value").ok_or_else(|| cx.err(c.pos, "condition is missing \"value\""))?;
            let value = value_node.to_json();
            let regex = if op == Op::Matches {
                let pat = py_str(&value);
                Some(crate::expr::compile_regex(&pat, &pat).map_err(|m| cx.err(value_node.pos, m))?)
            } else {
                None
            };
            let action = parse_action(
                cx,
                r.get("action").ok_or_else(|| {
                    cx.err(r.pos, format!("rule {} is missing required field \"action\"", quoted(&rname)))
                })?,
            )?;
            let priority = match r.get("priority") {
                None => 0,
                Some(p) => cx.int(p, "priority")?,
            };
            let message = cx.opt_string(r, "message")?.unwrap_or_default();
            cx.check_field(r, "override", FieldType::Bool)?;
            rules.push(V4Rule {
                name: rname,
                field_path: field.split('.').map(str::to_string).collect(),
                field,
                op,
                value,
                regex,
                action,
                priority,
                message,
            });
        }
    }
    Ok(V4Policy { name, rules, default_action })
}

impl V4Set {
    pub fn push(&mut self, p: V4Policy) {
        self.policies.push(p);
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn finish(&mut self) {
        let mut order = Vec::new();
        for (pi, p) in self.policies.iter().enumerate() {
            for ri in 0..p.rules.len() {
                order.push((pi, ri));
            }
        }
        // sort_by is stable, like Python's sorted().
        order.sort_by(|a, b| {
            let pa = self.policies[a.0].rules[a.1].priority;
            let pb = self.policies[b.0].rules[b.1].priority;
            pb.cmp(&pa)
        });
        self.order = order;
    }

    /// First matching rule's decision; `None` when no rule matched.
    pub fn evaluate(&self, ctx: &Value) -> Option<Decision> {
        for &(pi, ri) in &self.order {
            let p = &self.policies[pi];
            let r = &p.rules[ri];
            match matches(r, ctx) {
                Ok(false) => {}
                Ok(true) => {
                    let reason =
                        if r.message.is_empty() { format!("Matched rule '{}'", r.name) } else { r.message.clone() };
                    return Some(Decision::new(r.action, Some(r.name.clone()), Some(p.name.clone()), reason));
                }
                Err(e) => {
                    let mut d = Decision::error(format!(
                        "Policy evaluation error — access denied (fail closed): rule {}: {}",
                        quoted(&r.name),
                        e
                    ));
                    d.policy = Some(p.name.clone());
                    return Some(d);
                }
            }
        }
        None
    }

    pub fn default_decision(&self) -> Decision {
        let (action, policy) = match self.policies.first() {
            Some(p) => (p.default_action, Some(p.name.clone())),
            None => (Action::Deny, None),
        };
        Decision::new(action, None, policy, "No rules matched; default action applied".to_string())
    }

    pub fn rules(&self) -> Vec<RuleView<'_>> {
        let mut out = Vec::new();
        for p in &self.policies {
            for r in &p.rules {
                out.push(RuleView {
                    policy: &p.name,
                    name: &r.name,
                    description: (!r.message.is_empty()).then_some(r.message.as_str()),
                    action: r.action,
                    priority: r.priority,
                    stage: None,
                    condition: None,
                    condition_text: None,
                    v4_condition: Some((&r.field, r.op.as_str(), &r.value)),
                    limit: None,
                });
            }
        }
        out
    }
}

/// AGT's `_match_condition`, with Python semantics. `Err` is Python's TypeError.
fn matches(r: &V4Rule, ctx: &Value) -> Result<bool, String> {
    // AGT reads a top-level key; agt-jail also follows dotted paths into nested OS contexts
    // when no such top-level key exists.
    let v = match ctx.get(&r.field) {
        Some(v) => v,
        None if r.field_path.len() > 1 => crate::expr::lookup(ctx, &r.field_path),
        None => &Value::Null,
    };
    if v.is_null() {
        return Ok(false);
    }
    let t = &r.value;
    let ord =
        |want: fn(Ordering) -> bool| -> Result<bool, String> { Ok(py_cmp(v, t).map_err(|e| e.0)?.is_some_and(want)) };
    match r.op {
        Op::Eq => Ok(py_eq(v, t)),
        Op::Ne => Ok(!py_eq(v, t)),
        Op::Gt => ord(|o| o == Ordering::Greater),
        Op::Lt => ord(|o| o == Ordering::Less),
        Op::Gte => ord(|o| o != Ordering::Less),
        Op::Lte => ord(|o| o != Ordering::Greater),
        Op::In => py_in(v, t).map_err(|e| e.0),
        Op::NotIn => py_in(v, t).map(|b| !b).map_err(|e| e.0),
        Op::Contains => py_in(t, v).map_err(|e| e.0),
        Op::Matches => Ok(r.regex.as_ref().is_some_and(|re| re.is_match(&py_str(v)))),
    }
}
