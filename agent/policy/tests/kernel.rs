//! Behaviour of the policy kernel through its public API: strategies, extends, limits,
//! error locations, v4, Rego, and adversarial inputs (none may panic or hang).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use agt_jail_policy::{Action, EvalOptions, ManualClock, PolicySet, RateLimiter, Strategy};
use serde_json::{json, Value};

fn eval(yaml: &str, ctx: Value) -> agt_jail_policy::Decision {
    PolicySet::from_str("t.yaml", yaml).unwrap().evaluate(&ctx, &EvalOptions::default())
}

mod common;
use common::write;

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("policy", name)
}

const CONFLICT: &str = r#"
apiVersion: governance.toolkit/v1
name: c
agents: ["*"]
rules:
  - {name: low-deny, condition: "event == 'exec'", action: deny, priority: 1}
  - {name: high-warn, condition: "event == 'exec'", action: warn, priority: 5}
  - {name: mid-allow, condition: "event == 'exec'", action: allow, priority: 3}
  - {name: tie-allow, condition: "event == 'exec'", action: allow, priority: 3}
"#;

#[test]
fn conflict_strategies() {
    let set = PolicySet::from_str("c.yaml", CONFLICT).unwrap();
    let ctx = json!({"event": "exec"});
    let with = |s| set.evaluate(&ctx, &EvalOptions { strategy: Some(s), ..Default::default() });
    let d = with(Strategy::PriorityFirstMatch);
    assert_eq!((d.action, d.matched_rule.as_deref()), (Action::Warn, Some("high-warn")));
    assert!(d.allowed, "warn is allowed");
    let d = with(Strategy::DenyOverrides);
    assert_eq!(d.matched_rule.as_deref(), Some("low-deny"));
    // Among equal priorities the first loaded wins, like Python's stable sort.
    let d = with(Strategy::AllowOverrides);
    assert_eq!(d.matched_rule.as_deref(), Some("mid-allow"));
}

#[test]
fn most_specific_wins_uses_scope_then_priority() {
    let dir = tmpdir("scope");
    let g = write(
        &dir,
        "g.yaml",
        "name: g\nagents: ['*']\nscope: global\nrules:\n  - {name: g-deny, condition: \"event\", action: deny, priority: 100}\n",
    );
    let a = write(
        &dir,
        "a.yaml",
        "name: a\nagents: ['*']\nscope: agent\nrules:\n  - {name: a-allow, condition: \"event\", action: allow, priority: 1}\n",
    );
    let set = PolicySet::load(&[g, a]).unwrap();
    let opts = EvalOptions { strategy: Some(Strategy::MostSpecificWins), ..Default::default() };
    let d = set.evaluate(&json!({"event": "x"}), &opts);
    assert_eq!(d.matched_rule.as_deref(), Some("a-allow"));
    assert_eq!(d.policy.as_deref(), Some("a"));
}

#[test]
fn defaults_agents_and_stages() {
    let d = eval("name: p\nagents: ['*']\n", json!({}));
    assert_eq!(d.action, Action::Deny, "default_action is deny when absent");
    let d = eval("name: p\nagent: did:x\ndefault_action: allow\n", json!({"agent": {"did": "did:y"}}));
    assert_eq!(d.reason, "No policies loaded (deny by default)");
    let d = eval("name: p\nagent: did:x\ndefault_action: allow\n", json!({"agent": {"did": "did:x"}}));
    assert_eq!(d.action, Action::Allow);
    let yaml = "name: p\nagents: ['*']\ndefault_action: allow\nrules:\n  - {name: r, stage: post_tool, condition: 'event', action: deny}\n";
    assert_eq!(eval(yaml, json!({"event": "x"})).action, Action::Allow);
    let set = PolicySet::from_str("p", yaml).unwrap();
    let opts = EvalOptions { stage: agt_jail_policy::Stage::PostTool, ..Default::default() };
    assert_eq!(set.evaluate(&json!({"event": "x"}), &opts).action, Action::Deny);
}

#[test]
fn disabled_rules_and_kill() {
    let yaml = "name: p\nagents: ['*']\ndefault_action: allow\nrules:\n  - {name: disabled, condition: 'event', action: deny, enabled: false}\n  - {name: k, condition: \"event == 'ptrace'\", action: kill}\n";
    assert_eq!(eval(yaml, json!({"event": "exec"})).action, Action::Allow);
    let d = eval(yaml, json!({"event": "ptrace"}));
    assert_eq!(d.action, Action::Kill);
    assert!(!d.allowed);
}

#[test]
fn extends_is_additive_and_confined() {
    let dir = tmpdir("extends");
    write(
        &dir,
        "base.yaml",
        "name: base\nagents: ['*']\nrules:\n  - {name: no-ssh, condition: \"file.path contains '.ssh'\", action: deny, priority: 1}\n",
    );
    let child = write(
        &dir,
        "child.yaml",
        "name: child\nextends: base.yaml\nagents: ['*']\ndefault_action: allow\nrules:\n  - {name: no-ssh, condition: 'file.path', action: allow, priority: 100}\n  - {name: open-all, condition: 'file.path', action: allow, priority: 100}\n",
    );
    let set = PolicySet::load(&[child]).unwrap();
    let d = set.evaluate(&json!({"file": {"path": "/h/.ssh/k"}}), &EvalOptions::default());
    assert_eq!((d.action, d.matched_rule.as_deref()), (Action::Deny, Some("no-ssh")));
    let d = set.evaluate(&json!({"file": {"path": "/h/x"}}), &EvalOptions::default());
    assert_eq!(d.matched_rule.as_deref(), Some("open-all"));

    // Cycles are rejected.
    let a = write(&dir, "a.yaml", "name: a\nextends: b.yaml\n");
    write(&dir, "b.yaml", "name: b\nextends: [a.yaml]\n");
    let e = PolicySet::load(&[a]).unwrap_err();
    assert!(e.message.contains("circular extends"), "{e}");

    // Parents must stay inside the policy's directory.
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let out = write(&sub, "out.yaml", "name: out\nextends: ../base.yaml\n");
    let e = PolicySet::load(&[out]).unwrap_err();
    assert!(e.message.contains("outside the policy directory"), "{e}");
    assert_eq!((e.line, e.col), (2, 10));
}

#[test]
fn rate_limit_applies_to_the_matched_rule() {
    let yaml = "name: p\nagents: ['*']\nrules:\n  - {name: execs, condition: \"event == 'exec'\", action: allow, limit: 2/minute}\n";
    let set = PolicySet::from_str("p", yaml).unwrap();
    let clock = ManualClock::default();
    let mut rl = RateLimiter::new(clock.clone());
    let ctx = json!({"event": "exec", "agent": {"did": "did:a"}});
    let d = set.evaluate(&ctx, &EvalOptions::default());
    let l = d.limit.clone().unwrap();
    assert_eq!((l.agent.as_str(), l.rule.as_str(), l.spec.max), ("did:a", "execs", 2));
    assert!(rl.apply(d.clone()).allowed);
    assert!(rl.apply(d.clone()).allowed);
    assert!(rl.apply(d.clone()).rate_limited);
    clock.advance(std::time::Duration::from_secs(61));
    assert!(rl.apply(d).allowed);
}

fn load_err(yaml: &str) -> agt_jail_policy::LoadError {
    PolicySet::from_str("bad.yaml", yaml).unwrap_err()
}

#[test]
fn load_errors_are_located() {
    let e = load_err("name: p\nrules:\n  - name: r\n    condition: \"a == 'x' b\"\n");
    assert_eq!(
        e.to_string(),
        "bad.yaml:4:26: rule \"r\": condition: expected `and`, `or` or end of condition, found path `b`"
    );
    let e = load_err("name: p\nrules:\n  - name: r\n    condition: x\n    action: nuke\n");
    assert_eq!((e.line, e.col), (5, 13));
    assert!(e.message.contains("invalid action \"nuke\""));
    let e = load_err("name: p\nrules:\n  - name: r\n    condition: x\n    limit: 10/fortnight\n");
    assert_eq!((e.line, e.col), (5, 12));
    let e = load_err("name: p\ndefualt_action: allow\n");
    assert_eq!((e.line, e.col), (2, 1));
    assert!(e.message.contains("unknown policy field"));
    let e = load_err("name: p\nrules: [\n");
    assert_eq!(e.file, "bad.yaml");
    let e = load_err("apiVersion: governance.toolkit/v2\nname: p\n");
    assert!(e.message.contains("unsupported apiVersion"));
    let e = load_err("rules: []\n");
    assert!(e.message.contains("missing required field \"name\""));
}

#[test]
fn agent_os_v4_documents() {
    let yaml = r#"
version: "1.0"
name: v4
rules:
  - name: low
    condition: {field: tool_name, operator: eq, value: shell}
    action: allow
    priority: 1
  - name: high
    condition: {field: tool_name, operator: in, value: [shell, curl]}
    action: block
    priority: 10
    message: no shells
  - name: count
    condition: {field: count, operator: gt, value: 5}
    action: audit
defaults: {action: allow}
"#;
    let d = eval(yaml, json!({"tool_name": "shell"}));
    assert_eq!((d.action, d.matched_rule.as_deref(), d.reason.as_str()), (Action::Block, Some("high"), "no shells"));
    let d = eval(yaml, json!({"count": 9}));
    assert_eq!(d.action, Action::Audit);
    assert!(d.allowed);
    let d = eval(yaml, json!({"tool_name": "ls"}));
    assert_eq!((d.action, d.matched_rule), (Action::Allow, None));
    // Python raises TypeError for "a" > 5: the evaluation fails closed.
    let d = eval(yaml, json!({"count": "a"}));
    assert_eq!(d.action, Action::Deny);
    assert!(d.error);
    // Dotted fields reach into nested OS contexts.
    let d = eval(
        "name: v\nrules:\n  - {name: r, condition: {field: file.path, operator: matches, value: '\\.ssh/'}, action: deny}\ndefaults: {action: allow}\n",
        json!({"file": {"path": "/h/.ssh/id"}}),
    );
    assert_eq!(d.matched_rule.as_deref(), Some("r"));
}

#[test]
fn rego_boolean_and_verdicts() {
    let set = PolicySet::from_rego_str(
        "p.rego",
        "package t\nimport rego.v1\ndefault allow := false\nallow if input.event == \"exec\"\n",
        None,
    )
    .unwrap();
    assert_eq!(set.evaluate(&json!({"event": "exec"}), &EvalOptions::default()).action, Action::Allow);
    assert_eq!(set.evaluate(&json!({"event": "open"}), &EvalOptions::default()).action, Action::Deny);

    let set = PolicySet::from_rego_str(
        "v.rego",
        "package t\nimport rego.v1\nverdict := {\"decision\": \"kill\", \"reason\": \"ptrace\"} if input.event == \"ptrace\"\n",
        Some("data.t.verdict"),
    )
    .unwrap();
    let d = set.evaluate(&json!({"event": "ptrace"}), &EvalOptions::default());
    assert_eq!((d.action, d.reason.as_str()), (Action::Kill, "ptrace"));
    let d = set.evaluate(&json!({"event": "open"}), &EvalOptions::default());
    assert_eq!(d.action, Action::Deny, "undefined is a deny");

    // Runtime errors (here: conflicting complete-rule values) fail closed.
    let set = PolicySet::from_rego_str(
        "e.rego",
        "package t\nimport rego.v1\nallow := true if input.a\nallow := false if input.b\n",
        None,
    )
    .unwrap();
    let d = set.evaluate(&json!({"a": true, "b": true}), &EvalOptions::default());
    assert_eq!(d.action, Action::Deny);
    assert!(d.error, "{d:?}");

    let e = PolicySet::from_rego_str("bad.rego", "package t\nallow if {\n", None).unwrap_err();
    assert_eq!((e.file.as_str(), e.line), ("bad.rego", 3));
}

#[test]
fn rules_are_enumerable() {
    let set = PolicySet::from_str("c.yaml", CONFLICT).unwrap();
    let rules = set.rules();
    assert_eq!(rules.len(), 4);
    assert_eq!(rules[0].name, "low-deny");
    assert!(matches!(rules[0].condition, Some(agt_jail_policy::Expr::Cmp(agt_jail_policy::CmpOp::Eq, _, _))));
}

// ------------------------------------------------------------------ adversarial inputs

#[test]
fn billion_laughs() {
    let mut doc = String::from("name: p\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let p = i - 1;
        doc.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
    }
    let e = load_err(&doc);
    assert!(e.message.contains("nodes"), "{e}");
}

#[test]
fn deep_nesting() {
    let e = load_err(&format!("name: p\nx: {}{}\n", "[".repeat(10_000), "]".repeat(10_000)));
    assert!(e.line == 2, "{e}");
    let e = load_err(&format!("name: p\nx: {}1{}\n", "{a: ".repeat(10_000), "}".repeat(10_000)));
    assert!(e.line == 2, "{e}");
    let cond = format!("{}event{}", "(".repeat(5_000), ")".repeat(5_000));
    let e = load_err(&format!("name: p\nrules:\n  - name: r\n    condition: \"{cond}\"\n"));
    assert!(e.message.contains("nested deeper"), "{e}");
}

#[test]
fn huge_file_is_refused_before_parsing() {
    let dir = tmpdir("huge");
    let p = dir.join("huge.yaml");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
        f.write_all(b"name: p\nrules:\n").unwrap();
        let line = b"  - {name: r, condition: \"event == 'exec'\", action: deny}\n";
        let mut written = 0;
        while written < 50 * 1024 * 1024 {
            f.write_all(line).unwrap();
            written += line.len();
        }
    }
    let e = PolicySet::load(std::slice::from_ref(&p)).unwrap_err();
    assert!(e.message.contains("byte limit"), "{e}");
    let _ = std::fs::remove_file(p);
}

#[test]
fn many_rules_within_limits_load() {
    let mut doc = String::from("name: p\nagents: ['*']\nrules:\n");
    for i in 0..5_000 {
        doc.push_str(&format!("  - {{name: r{i}, condition: \"proc.uid == {i}\", action: deny}}\n"));
    }
    let set = PolicySet::from_str("p", &doc).unwrap();
    let d = set.evaluate(&json!({"proc": {"uid": 4999}}), &EvalOptions::default());
    assert_eq!(d.matched_rule.as_deref(), Some("r4999"));
}

#[test]
fn invalid_utf8() {
    let dir = tmpdir("utf8");
    let p = write(&dir, "x.yaml", "");
    std::fs::write(&p, b"name: p\nrules:\n  - name: \xc3\x28\n").unwrap();
    let e = PolicySet::load(&[p]).unwrap_err();
    assert_eq!((e.line, e.col), (3, 11));
    assert!(e.message.contains("UTF-8"));
}

#[test]
fn garbage_never_panics() {
    // A deterministic spray of malformed inputs through the whole loader.
    let pieces = [
        "name: p\n",
        "rules:\n",
        "  - ",
        "{",
        "}",
        "[",
        "]",
        "&a ",
        "*a ",
        "!!binary ",
        "? ",
        ": ",
        "condition: ",
        "\"a == \\\"",
        "'x'",
        "action: deny\n",
        "\t",
        "- - -",
        "%YAML 1.2\n",
        "---\n",
        "...\n",
        "|\n",
        ">-\n",
        "not not (",
        "matches '('",
        "glob '[",
        "\u{feff}",
        "\0",
        "0x",
        "1e",
        "~",
        "agents: '*'\n",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..3_000 {
        let mut doc = String::new();
        for _ in 0..12 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            doc.push_str(pieces[(seed % pieces.len() as u64) as usize]);
        }
        if let Ok(set) = PolicySet::from_str("g.yaml", &doc) {
            let _ = set.evaluate(&json!({"event": "exec"}), &EvalOptions::default());
        }
        let _ = agt_jail_policy::Expr::parse(&doc);
    }
}
