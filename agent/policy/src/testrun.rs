//! Policy test cases kept beside the policies (`*.test.yaml`), run by `agt-jail policy test`.
//!
//! ```yaml
//! policies: [policy.yaml]        # relative to this file
//! stage: pre_tool                # optional
//! agent: did:agt:coder           # optional
//! cases:
//!   - name: rm -rf / is blocked
//!     context: {event: exec, exec: {argv: [rm, -rf, /]}}
//!     repeat: 1                  # optional: evaluate N times through one rate limiter
//!     expect: {action: deny, matched_rule: block-destructive-rm}   # or just: deny
//! ```

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::limit::{ManualClock, RateLimiter};
use crate::toolkit::Ctx;
use crate::yaml::{self, Kind, Node};
use crate::{Action, Decision, EvalOptions, LoadError, PolicySet, Stage, Strategy};

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: String,
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub cases: Vec<CaseResult>,
    /// Test files that could not be loaded (each counts as a failure).
    pub errors: Vec<LoadError>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| !c.passed).count() + self.errors.len()
    }
}

/// Deepest directory recursion when looking for test files.
const MAX_DIR_DEPTH: usize = 16;

/// Finds `*.test.yaml` / `*.test.yml` under `dir` (or `dir` itself if it is a file). A directory
/// that cannot be read is an error, never a silently smaller set of tests.
pub fn find_test_files(dir: &Path) -> (Vec<PathBuf>, Vec<LoadError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    if dir.is_file() {
        out.push(dir.to_path_buf());
        return (out, errors);
    }
    let unreadable = |d: &Path, e: std::io::Error| {
        LoadError::new(d.display().to_string(), yaml::Pos::default(), format!("cannot read directory: {e}"))
    };
    let mut todo = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = todo.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => {
                errors.push(unreadable(&d, e));
                continue;
            }
        };
        for e in rd {
            let e = match e {
                Ok(e) => e,
                Err(err) => {
                    errors.push(unreadable(&d, err));
                    continue;
                }
            };
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && depth < MAX_DIR_DEPTH {
                todo.push((p, depth + 1));
            } else if is_test_file(&p) && !ft.is_dir() {
                // Not only regular files: a FIFO named like a test file is reported, not skipped.
                out.push(p);
            }
        }
    }
    out.sort();
    (out, errors)
}

pub fn run_dir(dir: &Path) -> Report {
    let mut report = Report::default();
    let (files, errors) = find_test_files(dir);
    let unreadable = !errors.is_empty();
    report.errors = errors;
    if files.is_empty() && !unreadable {
        report.errors.push(LoadError::new(
            dir.display().to_string(),
            yaml::Pos::default(),
            "no *.test.yaml files found",
        ));
    }
    for f in files {
        if let Err(e) = run_file(&f, &mut report, true) {
            report.errors.push(e);
        }
    }
    report
}

struct Expect {
    action: Option<Action>,
    allowed: Option<bool>,
    matched_rule: Option<Option<String>>,
}

/// True for names `policy test` treats as test files.
pub fn is_test_file(path: &Path) -> bool {
    let n = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    n.ends_with(".test.yaml") || n.ends_with(".test.yml")
}

/// Checks a test file (its structure and the policies it loads) without running its cases.
pub fn lint_file(path: &Path) -> Result<(), LoadError> {
    run_file(path, &mut Report::default(), false)
}

fn run_file(path: &Path, report: &mut Report, run: bool) -> Result<(), LoadError> {
    let file = path.display().to_string();
    let bytes = crate::read_limited(path)?;
    let text = yaml::check_bytes(&bytes).map_err(|e| LoadError::new(&file, e.pos, e.message))?;
    let node = yaml::parse(text).map_err(|e| LoadError::new(&file, e.pos, e.message))?;
    let cx = Ctx { file: &file, src: text };
    cx.check_keys(&node, &["policies", "stage", "agent", "strategy", "rego_query", "cases"], "test file")?;
    let base = path.parent().unwrap_or(Path::new("."));
    let pnode =
        node.get("policies").ok_or_else(|| cx.err(node.pos, "missing \"policies\" (the policy files under test)"))?;
    let policies: Vec<PathBuf> = cx.string_list(pnode, "policies")?.into_iter().map(|p| base.join(p)).collect();
    let rego_query = cx.opt_string(&node, "rego_query")?;
    let set = PolicySet::load_with(&policies, rego_query.as_deref())?;
    if let (Some(_), Some(n)) = (&rego_query, node.get("rego_query")) {
        if !set.has_rego() {
            return Err(cx.err(n.pos, "rego_query is set but none of the policies is a .rego file"));
        }
    }
    let mut opts = EvalOptions::default();
    toolkit_only(&cx, &node, &set)?;
    if let Some(s) = opt_stage(&cx, &node)? {
        opts.stage = s;
    }
    opts.agent = cx.opt_string(&node, "agent")?;
    if let Some(n) = node.get("strategy") {
        let s = cx.string(n, "strategy")?;
        opts.strategy = Some(Strategy::parse(&s).ok_or_else(|| cx.err(n.pos, format!("invalid strategy {}; expected priority_first_match, deny_overrides, allow_overrides or most_specific_wins", crate::quoted(&s))))?);
    }
    let cases = match node.get("cases").map(|c| &c.kind) {
        Some(Kind::Seq(items)) => items,
        _ => return Err(cx.err(node.pos, "missing \"cases\" list")),
    };
    for (i, case) in cases.iter().enumerate() {
        cx.check_keys(case, &["name", "context", "expect", "repeat", "stage", "agent"], "case")?;
        let name = cx.opt_string(case, "name")?.unwrap_or_else(|| format!("case {}", i + 1));
        let ctx_node = case
            .get("context")
            .ok_or_else(|| cx.err(case.pos, format!("case {} is missing \"context\"", crate::quoted(&name))))?;
        if !matches!(ctx_node.kind, Kind::Map(_)) {
            return Err(cx.err(
                ctx_node.pos,
                format!("case {}: context must be a mapping, found {}", crate::quoted(&name), ctx_node.type_name()),
            ));
        }
        let ctx = ctx_node.to_json();
        let expect = parse_expect(&cx, case, &name)?;
        let repeat = match case.get("repeat") {
            None => 1,
            Some(n) => match n.kind {
                Kind::Int(r) if (1..=100_000).contains(&r) => r as u64,
                _ => return Err(cx.err(n.pos, "repeat must be an integer from 1 to 100000")),
            },
        };
        let mut case_opts = opts.clone();
        toolkit_only(&cx, case, &set)?;
        if let Some(s) = opt_stage(&cx, case)? {
            case_opts.stage = s;
        }
        if let Some(a) = cx.opt_string(case, "agent")? {
            case_opts.agent = Some(a);
        }
        if !run {
            continue;
        }
        let mut limiter = RateLimiter::new(ManualClock::default());
        let mut last: Option<Decision> = None;
        for _ in 0..repeat {
            last = Some(limiter.apply(set.evaluate(&ctx, &case_opts)));
        }
        let Some(d) = last else { continue };
        let (passed, detail) = check(&expect, &d);
        report.cases.push(CaseResult { file: file.clone(), name, passed, detail });
    }
    Ok(())
}

/// `stage`, `agent` and `strategy` only mean something to governance.toolkit/v1 policies;
/// given for Agent-OS v4 or Rego policies they would be silently without effect.
fn toolkit_only(cx: &Ctx<'_>, node: &Node, set: &PolicySet) -> Result<(), LoadError> {
    if set.has_toolkit() {
        return Ok(());
    }
    match ["stage", "agent", "strategy"].iter().find_map(|k| node.get(k).map(|n| (k, n))) {
        Some((key, n)) => Err(cx.err(
            n.pos,
            format!("{key} applies to governance.toolkit/v1 policies and none is loaded (Agent-OS v4 and Rego policies have no strategy, stage or agent targeting)"),
        )),
        None => Ok(()),
    }
}

/// `stage:` of a test file or case, checked against AGT's stages (a typo would skip every rule).
fn opt_stage(cx: &Ctx<'_>, parent: &Node) -> Result<Option<Stage>, LoadError> {
    match parent.get("stage") {
        None => Ok(None),
        Some(n) => Stage::parse_or_explain(&cx.string(n, "stage")?).map(Some).map_err(|m| cx.err(n.pos, m)),
    }
}

fn parse_expect(cx: &Ctx<'_>, case: &Node, name: &str) -> Result<Expect, LoadError> {
    let n = case
        .get("expect")
        .ok_or_else(|| cx.err(case.pos, format!("case {} is missing \"expect\"", crate::quoted(name))))?;
    let action_of = |n: &Node| -> Result<Action, LoadError> {
        let s = cx.string(n, "expect.action")?;
        Action::parse(&s).ok_or_else(|| cx.err(n.pos, format!("unknown action {}", crate::quoted(&s))))
    };
    match &n.kind {
        Kind::Str(_) => Ok(Expect { action: Some(action_of(n)?), allowed: None, matched_rule: None }),
        Kind::Map(_) => {
            cx.check_keys(n, &["action", "allowed", "matched_rule"], "expect")?;
            let action = n.get("action").map(action_of).transpose()?;
            let allowed = match n.get("allowed").map(|a| (&a.kind, a.pos)) {
                None => None,
                Some((Kind::Bool(b), _)) => Some(*b),
                Some((_, pos)) => return Err(cx.err(pos, "expect.allowed must be a boolean")),
            };
            let matched_rule = match n.get("matched_rule") {
                None => None,
                Some(m) if m.kind == Kind::Null => Some(None),
                Some(m) => Some(Some(cx.string(m, "expect.matched_rule")?)),
            };
            Ok(Expect { action, allowed, matched_rule })
        }
        _ => Err(cx.err(n.pos, "expect must be an action or a mapping {action, allowed, matched_rule}")),
    }
}

fn check(e: &Expect, d: &Decision) -> (bool, String) {
    let mut problems = Vec::new();
    if let Some(a) = e.action {
        if a != d.action {
            problems.push(format!("action: expected {a}, got {}", d.action));
        }
    }
    if let Some(a) = e.allowed {
        if a != d.allowed {
            problems.push(format!("allowed: expected {a}, got {}", d.allowed));
        }
    }
    if let Some(m) = &e.matched_rule {
        if m != &d.matched_rule {
            problems.push(format!(
                "matched_rule: expected {}, got {}",
                rule_name(m.as_deref()),
                rule_name(d.matched_rule.as_deref())
            ));
        }
    }
    let got = serde_json::to_string(d).unwrap_or_default();
    if problems.is_empty() {
        (true, got)
    } else {
        (false, format!("{} (decision: {got})", problems.join("; ")))
    }
}

/// A matched rule for a message: its quoted name, or `none`.
fn rule_name(r: Option<&str>) -> String {
    r.map_or_else(|| "none".to_string(), crate::quoted)
}

/// Parses one JSON context for evaluation (shared with the CLI).
/// A context must be a JSON object (evaluating anything else could only fail closed).
pub fn parse_context(text: &str) -> Result<Value, String> {
    let v = serde_json::from_str::<Value>(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let found = match &v {
        Value::Object(_) => return Ok(v),
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    };
    Err(format!("the context must be a JSON object, found {found}"))
}
