//! agt-jail's policy kernel: one OS event context in, one decision out, deterministically.
//!
//! Reads the policies people already write for AGT (Microsoft's Agent Governance Toolkit):
//! `apiVersion: governance.toolkit/v1` documents, Agent-OS v4 `PolicyDocument`s, and Rego
//! (in process, through regorus). Evaluation does no I/O and never panics; every evaluation
//! error is a deny carrying the error as its reason (fail closed). Rate/budget state lives
//! around the evaluator in [`RateLimiter`].
#![forbid(unsafe_code)]

pub mod context;
pub mod expr;
pub mod limit;
pub mod plan;
mod rego;
pub mod testrun;
mod toolkit;
mod v4;
pub mod value;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

pub use expr::{CmpOp, Expr, Operand};
pub use limit::{Clock, LimitRef, ManualClock, MonotonicClock, RateLimiter, RateSpec};
pub use toolkit::Scope;

/// What a rule (or a default) prescribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
    Warn,
    RequireApproval,
    Log,
    Audit,
    Block,
    /// agt-jail's own action: deny and kill the acting process.
    Kill,
}

impl Action {
    /// allow, warn, log and audit let the action proceed; the others stop it.
    pub fn is_allowed(self) -> bool {
        matches!(self, Action::Allow | Action::Warn | Action::Log | Action::Audit)
    }

    /// Actions that stop the event outright (used by deny_overrides and the extends floor).
    pub fn is_deny_class(self) -> bool {
        matches!(self, Action::Deny | Action::Block | Action::Kill)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Warn => "warn",
            Action::RequireApproval => "require_approval",
            Action::Log => "log",
            Action::Audit => "audit",
            Action::Block => "block",
            Action::Kill => "kill",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            "warn" => Action::Warn,
            "require_approval" => Action::RequireApproval,
            "log" => Action::Log,
            "audit" => Action::Audit,
            "block" => Action::Block,
            "kill" => Action::Kill,
            _ => return None,
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How competing matches across governance.toolkit/v1 rules are resolved (AGT's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    PriorityFirstMatch,
    DenyOverrides,
    AllowOverrides,
    MostSpecificWins,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "priority_first_match" => Strategy::PriorityFirstMatch,
            "deny_overrides" => Strategy::DenyOverrides,
            "allow_overrides" => Strategy::AllowOverrides,
            "most_specific_wins" => Strategy::MostSpecificWins,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::PriorityFirstMatch => "priority_first_match",
            Strategy::DenyOverrides => "deny_overrides",
            Strategy::AllowOverrides => "allow_overrides",
            Strategy::MostSpecificWins => "most_specific_wins",
        }
    }
}

/// The outcome of one evaluation. Serializes as
/// `{"allowed", "action", "matched_rule", "policy", "reason"}` plus optional extras.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub action: Action,
    pub matched_rule: Option<String>,
    pub policy: Option<String>,
    pub reason: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    /// The matched rule's `limit`, for the caller's [`RateLimiter`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitRef>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub rate_limited: bool,
    /// True when the decision is a fail-closed deny caused by an evaluation error.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub error: bool,
}

impl Decision {
    pub fn new(action: Action, matched_rule: Option<String>, policy: Option<String>, reason: String) -> Self {
        Decision {
            allowed: action.is_allowed(),
            action,
            matched_rule,
            policy,
            reason,
            approvers: Vec::new(),
            limit: None,
            rate_limited: false,
            error: false,
        }
    }

    /// A fail-closed deny carrying an evaluation error.
    pub fn error(reason: impl Into<String>) -> Self {
        let mut d = Decision::new(Action::Deny, None, None, reason.into());
        d.error = true;
        d
    }
}

/// AGT's lifecycle stages (`PolicyRule.stage`); a rule is only considered at its own stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stage {
    PreInput,
    #[default]
    PreTool,
    PostTool,
    PreOutput,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::PreInput, Stage::PreTool, Stage::PostTool, Stage::PreOutput];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::PreInput => "pre_input",
            Stage::PreTool => "pre_tool",
            Stage::PostTool => "post_tool",
            Stage::PreOutput => "pre_output",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The valid values, for error messages and help.
    pub fn valid_values() -> String {
        Stage::ALL.map(Stage::as_str).join(", ")
    }

    /// Parses a stage or explains which values are valid.
    pub fn parse_or_explain(s: &str) -> Result<Stage, String> {
        Stage::parse(s).ok_or_else(|| format!("invalid stage {}; expected one of {}", quoted(s), Stage::valid_values()))
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user-supplied string quoted for a message: control characters are escaped, backslashes are
/// kept as written (so `\w{3}` reads as the user typed it, not doubled as Rust's `{:?}` would).
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            c if c.is_control() || c == '\u{feff}' => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Per-evaluation options.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Lifecycle stage; only governance.toolkit/v1 rules of this stage are considered.
    pub stage: Stage,
    /// Acting agent's DID; when absent, `agent.did` (then `agent.id`) of the context is used.
    pub agent: Option<String>,
    /// Overrides the conflict strategy the policies declare.
    pub strategy: Option<Strategy>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { stage: Stage::PreTool, agent: None, strategy: None }
    }
}

/// A load failure, displayed as `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct LoadError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl LoadError {
    pub fn new(file: impl Into<String>, pos: yaml::Pos, message: impl Into<String>) -> Self {
        LoadError { file: file.into(), line: pos.line.max(1), col: pos.col.max(1), message: message.into() }
    }
}

/// A rule as later stages see it (e.g. to compile rules into kernel planes).
#[derive(Debug, Clone, Copy)]
pub struct RuleView<'a> {
    pub policy: &'a str,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub action: Action,
    pub priority: i64,
    pub stage: Option<&'a str>,
    /// governance.toolkit/v1 condition AST; `None` for v4 rules (see `v4_condition`).
    pub condition: Option<&'a Expr>,
    /// The condition as written.
    pub condition_text: Option<&'a str>,
    /// Agent-OS v4 condition as (field, operator, value).
    pub v4_condition: Option<(&'a str, &'a str, &'a Value)>,
    pub limit: Option<&'a RateSpec>,
}

/// A loaded, validated set of policies.
#[derive(Debug, Default)]
pub struct PolicySet {
    toolkit: Vec<toolkit::Policy>,
    v4: v4::V4Set,
    rego: Vec<rego::RegoPolicy>,
    strategy: Option<Strategy>,
    warnings: Vec<LoadError>,
}

impl PolicySet {
    /// Loads policy files: `.rego` as Rego, everything else as YAML/JSON.
    pub fn load(paths: &[PathBuf]) -> Result<PolicySet, LoadError> {
        Self::load_with(paths, None)
    }

    /// Like [`PolicySet::load`], with the query used for Rego files (default `data.<package>.allow`).
    pub fn load_with(paths: &[PathBuf], rego_query: Option<&str>) -> Result<PolicySet, LoadError> {
        let mut set = PolicySet::default();
        for path in paths {
            let file = path.display().to_string();
            if path.extension().is_some_and(|e| e == "rego") {
                let bytes = read_limited(path)?;
                let text = yaml::check_bytes(&bytes).map_err(|e| LoadError::new(&file, e.pos, e.message))?;
                if let Some(first) = set.rego.first() {
                    set.warnings.push(LoadError::new(
                        &file,
                        yaml::Pos::default(),
                        format!(
                            "only the first Rego policy ({}) decides, as in AGT (which tries the next only when one fails; agt-jail denies on a failure): this file is never consulted",
                            first.name
                        ),
                    ));
                }
                set.rego.push(rego::RegoPolicy::new(&file, text, rego_query)?);
            } else {
                let doc = load_document(path)?;
                set.add_document(doc, &file)?;
            }
        }
        set.finish()?;
        Ok(set)
    }

    /// Loads one YAML (or JSON) policy from text; `name` stands in for the file name in errors.
    /// `extends` is not available here (there is no directory to resolve it in).
    pub fn from_str(name: &str, text: &str) -> Result<PolicySet, LoadError> {
        let mut set = PolicySet::default();
        let node = yaml::parse(text).map_err(|e| LoadError::new(name, e.pos, e.message))?;
        let doc = parse_document(&node, name, text, None, &mut Vec::new())?;
        set.add_document(doc, name)?;
        set.finish()?;
        Ok(set)
    }

    /// Loads one Rego policy from text.
    pub fn from_rego_str(name: &str, text: &str, query: Option<&str>) -> Result<PolicySet, LoadError> {
        let mut set = PolicySet::default();
        set.rego.push(rego::RegoPolicy::new(name, text, query)?);
        set.finish()?;
        Ok(set)
    }

    fn add_document(&mut self, doc: Document, file: &str) -> Result<(), LoadError> {
        match doc {
            Document::Toolkit(mut p) => {
                if let Some(s) = p.strategy {
                    match self.strategy {
                        Some(prev) if prev != s => {
                            return Err(LoadError::new(
                                file,
                                p.strategy_pos,
                                format!(
                                    "conflict_strategy {} differs from {} declared by an earlier policy",
                                    s.as_str(),
                                    prev.as_str()
                                ),
                            ))
                        }
                        _ => self.strategy = Some(s),
                    }
                }
                if p.agent.as_deref().is_none_or(str::is_empty) && p.agents.is_empty() {
                    self.warnings.push(LoadError::new(
                        file,
                        p.name_pos,
                        format!(
                            "policy {} names no agent (`agent` or `agents`): like AGT it applies to no agent, so its rules never run; use `agents: [\"*\"]` for every agent",
                            quoted(&p.name)
                        ),
                    ));
                }
                self.warnings.append(&mut p.warnings);
                if let Some(prev) = self.toolkit.iter().find(|q| q.name == p.name) {
                    return Err(LoadError::new(
                        file,
                        p.name_pos,
                        format!("duplicate policy name {} (also in {})", quoted(&p.name), prev.file),
                    ));
                }
                self.toolkit.push(*p);
            }
            Document::V4(p) => self.v4.push(*p),
        }
        if !self.toolkit.is_empty() && !self.v4.is_empty() {
            return Err(LoadError::new(
                file,
                yaml::Pos { line: 1, col: 1 },
                "cannot mix governance.toolkit/v1 and Agent-OS v4 policies in one evaluation (their semantics differ)",
            ));
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), LoadError> {
        self.v4.finish();
        Ok(())
    }

    /// The `trust:` sections of the loaded policies, with their files.
    pub fn trust_sections(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.toolkit.iter().filter_map(|p| p.trust.as_ref().map(|t| (p.file.as_str(), t)))
    }

    /// Evaluates one event context. Pure: same set, context and options give the same decision.
    pub fn evaluate(&self, ctx: &Value, opts: &EvalOptions) -> Decision {
        if !ctx.is_object() {
            return Decision::error("evaluation error: the context must be a JSON object (fail closed)");
        }
        if !self.v4.is_empty() {
            return match self.v4.evaluate(ctx) {
                Some(d) => d,
                None => self.rego_decision(ctx).unwrap_or_else(|| self.v4.default_decision()),
            };
        }
        // The agent is only looked up when a policy or a limit needs it.
        let agent = || -> &str {
            opts.agent
                .as_deref()
                .or_else(|| ctx.pointer("/agent/did").and_then(Value::as_str))
                .or_else(|| ctx.pointer("/agent/id").and_then(Value::as_str))
                .unwrap_or_default()
        };
        let strategy = opts.strategy.or(self.strategy).unwrap_or_default();
        let applies = |p: &&toolkit::Policy| p.wildcard || p.applies_to(agent());
        if let Some(mut d) = toolkit::evaluate(self.toolkit.iter().filter(applies), ctx, opts.stage, strategy) {
            if let Some(l) = d.limit.as_mut() {
                l.agent = agent().to_string();
            }
            return d;
        }
        if let Some(d) = self.rego_decision(ctx) {
            return d;
        }
        match self.toolkit.iter().find(applies) {
            Some(p) => Decision::new(
                p.default_action,
                None,
                Some(p.name.clone()),
                "No matching rules, using default".to_string(),
            ),
            None => Decision::new(Action::Deny, None, None, "No policies loaded (deny by default)".to_string()),
        }
    }

    fn rego_decision(&self, ctx: &Value) -> Option<Decision> {
        self.rego.first().map(|r| r.evaluate(ctx))
    }

    /// Every rule, in load order, for compilation into kernel planes.
    pub fn rules(&self) -> Vec<RuleView<'_>> {
        let mut out = Vec::new();
        for p in &self.toolkit {
            for r in &p.rules {
                out.push(RuleView {
                    policy: &p.name,
                    name: &r.name,
                    description: r.description.as_deref(),
                    action: r.action,
                    priority: r.priority,
                    stage: Some(r.stage.as_str()),
                    condition: Some(&r.condition),
                    condition_text: Some(&r.condition_src),
                    v4_condition: None,
                    limit: r.limit.as_ref(),
                });
            }
        }
        out.extend(self.v4.rules());
        out
    }

    /// Valid but suspicious constructs found while loading (`policy lint` prints them).
    pub fn warnings(&self) -> &[LoadError] {
        &self.warnings
    }

    /// Whether a governance.toolkit/v1 policy is loaded (the only kind a conflict strategy, a
    /// stage or an acting agent applies to).
    pub fn has_toolkit(&self) -> bool {
        !self.toolkit.is_empty()
    }

    /// Whether a Rego policy is loaded (its conditions are opaque to plane compilation).
    pub fn has_rego(&self) -> bool {
        !self.rego.is_empty()
    }

    /// Number of policy documents loaded (YAML and Rego).
    pub fn len(&self) -> usize {
        self.toolkit.len() + self.v4.len() + self.rego.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(crate) enum Document {
    Toolkit(Box<toolkit::Policy>),
    V4(Box<v4::V4Policy>),
}

/// Reads a policy or test file, refusing anything over the size limit without reading it whole,
/// and anything that is not a regular file (a FIFO, device, socket or directory would block or
/// never end). The file is opened without blocking and its type is checked on the open
/// descriptor, so a file swapped after a check cannot slip through.
pub fn read_limited(path: &Path) -> Result<Vec<u8>, LoadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = path.display().to_string();
    let fail = |message: String| LoadError::new(&file, yaml::Pos::default(), message);
    let io = |e: std::io::Error| fail(format!("cannot read file: {e}"));
    // stat first: opening a socket fails with a confusing error, so name the type instead.
    check_regular(&std::fs::metadata(path).map_err(io)?).map_err(fail)?;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io)?;
    check_regular(&f.metadata().map_err(io)?).map_err(fail)?;
    let mut bytes = Vec::new();
    f.take(yaml::limits::MAX_FILE_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() > yaml::limits::MAX_FILE_BYTES {
        return Err(fail(format!(
            "file is larger than the {} byte limit for policy files",
            yaml::limits::MAX_FILE_BYTES
        )));
    }
    Ok(bytes)
}

fn check_regular(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(format!("refusing to read {kind}: policy and test files must be regular files"))
}

fn load_document(path: &Path) -> Result<Document, LoadError> {
    let mut stack = Vec::new();
    load_document_inner(path, &mut stack)
}

/// Maximum depth of `extends` chains.
pub const MAX_EXTENDS_DEPTH: usize = 16;

pub(crate) fn load_document_inner(path: &Path, stack: &mut Vec<PathBuf>) -> Result<Document, LoadError> {
    let file = path.display().to_string();
    let bytes = read_limited(path)?;
    let text = yaml::check_bytes(&bytes).map_err(|e| LoadError::new(&file, e.pos, e.message))?;
    let node = yaml::parse(text).map_err(|e| LoadError::new(&file, e.pos, e.message))?;
    parse_document(&node, &file, text, Some(path), stack)
}

fn parse_document(
    node: &yaml::Node,
    file: &str,
    src: &str,
    path: Option<&Path>,
    stack: &mut Vec<PathBuf>,
) -> Result<Document, LoadError> {
    let cx = toolkit::Ctx { file, src: src.strip_prefix('\u{feff}').unwrap_or(src) };
    if !matches!(node.kind, yaml::Kind::Map(_)) {
        return Err(LoadError::new(file, node.pos, format!("expected a policy mapping, found {}", node.type_name())));
    }
    if v4::looks_like_v4(node) {
        return v4::parse(node, &cx).map(|p| Document::V4(Box::new(p)));
    }
    toolkit::parse(node, &cx, path, stack).map(|p| Document::Toolkit(Box::new(p)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn decision_json_shape() {
        let d = Decision::new(Action::RequireApproval, Some("r".into()), Some("p".into()), "x".into());
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(
            v,
            json!({"allowed": false, "action": "require_approval", "matched_rule": "r", "policy": "p", "reason": "x"})
        );
    }

    #[test]
    fn policy_sets_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<PolicySet>();
    }

    #[test]
    fn non_object_context_fails_closed() {
        let set = PolicySet::from_str("p", "name: p\nagents: ['*']\ndefault_action: allow\n").unwrap();
        let d = set.evaluate(&json!([1]), &EvalOptions::default());
        assert_eq!(d.action, Action::Deny);
        assert!(d.error);
    }
}
