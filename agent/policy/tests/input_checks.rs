//! What a user with real AGT policy files and typos meets: every answer is AGT's or a located
//! error, never a silent wrong decision, a hang or an abort.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use agt_jail_policy::testrun;
use agt_jail_policy::{Action, EvalOptions, PolicySet, Stage};
use serde_json::{json, Value};

mod common;
use common::write;

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("input", name)
}

/// Writes a test file and returns the error `policy lint` reports for it.
fn test_file_error(dir: &Path, name: &str, text: &str) -> agt_jail_policy::LoadError {
    testrun::lint_file(&write(dir, name, text)).unwrap_err()
}

fn eval(set: &PolicySet, ctx: Value) -> agt_jail_policy::Decision {
    set.evaluate(&ctx, &EvalOptions::default())
}

fn load_err(yaml: &str) -> agt_jail_policy::LoadError {
    PolicySet::from_str("t.yaml", yaml).unwrap_err()
}

fn literal_policy(cond: &str) -> String {
    format!(
        "name: p\nagents: ['*']\ndefault_action: deny\nrules:\n  - name: r\n    condition: {cond}\n    action: allow\n"
    )
}

#[test]
fn a_bare_literal_condition_is_a_context_key_as_in_agt() {
    // AGT's tutorial pairs such a rule with default deny: the default must apply.
    for cond in [r#""true""#, r#""True""#, r#""1""#, r#""false""#] {
        let set = PolicySet::from_str("t.yaml", &literal_policy(cond)).unwrap();
        let d = eval(&set, json!({"event": "exec"}));
        assert_eq!((d.action, d.matched_rule.as_deref()), (Action::Deny, None), "{cond}");
        assert_eq!(set.warnings().len(), 1, "{cond}");
        assert!(set.warnings()[0].message.contains("bare literal"), "{}", set.warnings()[0].message);
        assert_eq!((set.warnings()[0].line, set.warnings()[0].col), (6, 17), "{cond}");
        // ...and, like AGT's `_get_nested`, a context carrying that key makes it match.
        let key = cond.trim_matches('"');
        let d = eval(&set, json!({ key: 1 }));
        assert_eq!(d.matched_rule.as_deref(), Some("r"), "{cond}");
    }
    // A word with dots is a nested path, exactly as AGT splits it.
    let set = PolicySet::from_str("t.yaml", &literal_policy(r#""1.5""#)).unwrap();
    assert_eq!(eval(&set, json!({"1": {"5": true}})).action, Action::Allow);
    // Anything that is not a word never matches, whatever the context.
    for cond in [r#""'x'""#, r#""-1""#, r#""[1]""#, r#""true and 'x'""#] {
        let set = PolicySet::from_str("t.yaml", &literal_policy(cond)).unwrap();
        let d = eval(&set, json!({"x": true, "true": true, "-1": true}));
        assert_eq!(d.action, Action::Deny, "{cond}");
        assert!(set.warnings().iter().any(|w| w.message.contains("never matches")), "{cond}");
    }
}

#[test]
fn a_policy_naming_no_agent_loads_with_a_warning() {
    let set = PolicySet::from_str("t.yaml", "name: p\ndefault_action: allow\nrules: []\n").unwrap();
    let w = set.warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].message.contains("names no agent"), "{}", w[0].message);
    assert_eq!((w[0].line, w[0].col), (1, 7));
    // As in AGT it applies to nobody: no policy applies, deny.
    assert_eq!(eval(&set, json!({"event": "exec"})).action, Action::Deny);
    for named in ["agent: did:x", "agents: [did:x]", "agents: ['*']"] {
        let set = PolicySet::from_str("t.yaml", &format!("name: p\n{named}\n")).unwrap();
        assert!(set.warnings().is_empty(), "{named}");
    }
}

#[test]
fn stages_are_checked_against_agts_vocabulary() {
    assert_eq!(Stage::parse("post_tool"), Some(Stage::PostTool));
    let e = Stage::parse_or_explain("pre-tool").unwrap_err();
    assert!(e.contains("pre_input, pre_tool, post_tool, pre_output"), "{e}");
    let dir = tmpdir("stage");
    write(&dir, "p.yaml", "name: p\nagents: ['*']\ndefault_action: allow\n");
    let e = test_file_error(
        &dir,
        "s.test.yaml",
        "policies: [p.yaml]\ncases:\n  - name: c\n    stage: pre-tool\n    context: {}\n    expect: allow\n",
    );
    assert_eq!((e.line, e.col), (4, 12), "{e}");
    assert!(e.message.contains("invalid stage \"pre-tool\"; expected one of pre_input"), "{e}");
    let e = test_file_error(&dir, "top.test.yaml", "policies: [p.yaml]\nstage: tool\ncases: []\n");
    assert!(e.message.contains("invalid stage"), "{e}");
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

#[test]
fn non_regular_files_are_refused_without_blocking() {
    let dir = tmpdir("fifo");
    let fifo = dir.join("p.yaml");
    mkfifo(&fifo);
    // Nobody ever writes to the FIFO: a blocking open would hang this test.
    let e = PolicySet::load(std::slice::from_ref(&fifo)).unwrap_err();
    assert!(e.message.contains("FIFO"), "{e}");
    let e = PolicySet::load(&[PathBuf::from("/dev/zero")]).unwrap_err();
    assert!(e.message.contains("device"), "{e}");
    let e = PolicySet::load(std::slice::from_ref(&dir)).unwrap_err();
    assert!(e.message.contains("directory"), "{e}");
    // An extends target and a test file are read the same way.
    mkfifo(&dir.join("base.yaml"));
    let child = write(&dir, "child.yaml", "name: c\nagents: ['*']\nextends: base.yaml\n");
    let e = PolicySet::load(&[child]).unwrap_err();
    assert!(e.message.contains("FIFO") && e.file.ends_with("base.yaml"), "{e}");
    let t = dir.join("x.test.yaml");
    mkfifo(&t);
    assert!(testrun::lint_file(&t).unwrap_err().message.contains("FIFO"));
}

#[test]
fn errors_in_multi_line_conditions_point_into_the_file() {
    // Double-quoted, folded over two lines, with escaped quotes before the error.
    let e = load_err(
        "name: p\nagents: ['*']\nrules:\n  - name: r\n    condition: \"event == 'a' and\n      x == \\\"b\\\" and ??\"\n",
    );
    assert_eq!((e.line, e.col), (6, 22), "{e}");
    // Single-quoted with doubled quotes and a backslash kept as written.
    let e = load_err(
        "name: p\nagents: ['*']\nrules:\n  - name: r\n    condition: 'x == \"a\\\\b\" and y == ''it'' and ??'\n",
    );
    assert_eq!((e.line, e.col), (5, 49), "{e}");
    // Folded block scalar.
    let e =
        load_err("name: p\nagents: ['*']\nrules:\n  - name: r\n    condition: >-\n      event == 'a'\n      and ??\n");
    assert_eq!((e.line, e.col), (7, 11), "{e}");
    // Literal block scalar keeps its line breaks.
    let e =
        load_err("name: p\nagents: ['*']\nrules:\n  - name: r\n    condition: |\n      event == 'a'\n        and ?\n");
    assert_eq!((e.line, e.col), (7, 13), "{e}");
    // Plain scalar continued on the next line.
    let e = load_err("name: p\nagents: ['*']\nrules:\n  - name: r\n    condition: event == 'a'\n      and ?\n");
    assert_eq!((e.line, e.col), (6, 11), "{e}");
}

const V4_RULES: &str = "rules:\n  - {name: r, condition: {field: x, operator: eq, value: 1}, action: deny}\n";

#[test]
fn fields_agt_type_checks_are_type_checked() {
    let docs: [(&str, (usize, usize)); 9] = [
        ("name: p\nagents: ['*']\ncreated_at: '2024-13-01'\n", (3, 13)),
        ("name: p\nagents: ['*']\nupdated_at: nope\n", (3, 13)),
        ("name: p\nagents: ['*']\ndescription: [1, 2]\n", (3, 14)),
        ("name: p\nagents: ['*']\nversion: [1, 2]\n", (3, 10)),
        ("name: p\nagents: ['*']\nversion: 1.0\n", (3, 10)),
        ("name: p\nagents: ['*']\ncreated_at: {a: 1}\n", (3, 13)),
        (&format!("version: '1.0'\nname: p\ndefaults: {{action: allow, max_tokens: [1]}}\n{V4_RULES}"), (3, 39)),
        (&format!("version: '1.0'\nname: p\ndescription: null\n{V4_RULES}"), (3, 14)),
        (&format!("version: '1.0'\nname: p\ndefaults: {{network_default: maybe}}\n{V4_RULES}"), (3, 29)),
    ];
    for (doc, at) in docs {
        let e = load_err(doc);
        assert_eq!((e.line, e.col), at, "{doc}: {e}");
        assert!(e.message.starts_with("expected") || e.message.contains("invalid"), "{e}");
    }
    for ok in ["2024-01-01", "2024-01-01 10:00:00+02:00", "'2024-01-01T10:00:00.123Z'", "1700000000", "'20240101'"] {
        assert!(PolicySet::from_str("t.yaml", &format!("name: p\nagents: ['*']\ncreated_at: {ok}\n")).is_ok(), "{ok}");
    }
    let e = load_err("name: p\nagents: ['*']\ndescription: \"a\0b\"\n");
    assert_eq!((e.line, e.col), (3, 16), "{e}");
    assert!(e.message.contains("U+0000"), "{e}");
    // A byte order mark is accepted, as PyYAML accepts it; positions stay those of the text.
    let set = PolicySet::from_str("t.yaml", "\u{feff}name: p\nagents: ['*']\ndefault_action: allow\n").unwrap();
    assert_eq!(eval(&set, json!({})).action, Action::Allow);
    let dir = tmpdir("bom");
    let p = write(
        &dir,
        "p.yaml",
        "\u{feff}name: p\nagents: ['*']\nrules:\n  - {name: r, condition: 'x ==', action: deny}\n",
    );
    let e = PolicySet::load(&[p]).unwrap_err();
    assert_eq!((e.line, e.col), (4, 31), "{e}");
}

#[test]
fn regex_size_is_bounded_and_said_so() {
    // Python's re accepts this; so do we.
    let set = PolicySet::from_str(
        "t.yaml",
        "name: p\nagents: ['*']\nrules:\n  - {name: r, condition: \"x matches '\\\\w{100,}'\", action: deny}\n",
    )
    .unwrap();
    assert_eq!(eval(&set, json!({"x": "a".repeat(120)})).action, Action::Deny);
    let e = load_err(
        "name: p\nagents: ['*']\nrules:\n  - {name: r, condition: \"x matches '\\\\w{5000}'\", action: deny}\n",
    );
    assert!(e.message.contains("compiled-size limit"), "{e}");
    assert!(e.message.contains(r#""\w{5000}""#), "the pattern as written, not debug-escaped: {e}");
    let e = load_err("version: '1.0'\nname: p\nrules:\n  - {name: r, condition: {field: x, operator: matches, value: '\\w{5000}'}, action: deny}\n");
    assert!(e.message.contains("compiled-size limit"), "{e}");
}

#[test]
fn messages_read_as_written() {
    let e =
        load_err("name: p\nagents: ['*']\nrules:\n  - {name: r, condition: \"x matches '\\\\d('\", action: deny}\n");
    assert!(e.message.contains(r#"invalid pattern "\d(""#), "{e}");
    let e = load_err("name: 'p' x\n");
    assert!(!e.message.contains("double-quoted") && e.message.contains("quoted scalar"), "{e}");
    let e = load_err("name: p\nagents: ['*']\nrules:\n  - {name: r, condition: x, priority: 99999999999999999999}\n");
    assert!(e.message.contains("out of range") && !e.message.contains("found string"), "{e}");
}

#[test]
fn a_context_must_be_an_object() {
    assert!(testrun::parse_context("{\"a\": 1}").is_ok());
    for bad in ["[1]", "1", "\"x\"", "null", "true"] {
        let e = testrun::parse_context(bad).unwrap_err();
        assert!(e.contains("must be a JSON object"), "{bad}: {e}");
    }
}

/// A fail-closed deny by the builtin's own bound, or by the evaluation's time limit when
/// the machine is slow enough for it to fire first (emulated test guests): never an abort.
fn assert_bounded(d: &agt_jail_policy::Decision, builtin: &str) {
    assert_eq!(d.action, Action::Deny, "{}", d.reason);
    let by_bound = d.reason.contains(builtin) && d.reason.contains("limit");
    assert!(d.error && (by_bound || d.reason.contains("exceeded time limit")), "{}", d.reason);
}

#[test]
fn an_exploding_rego_builtin_is_a_deny_not_an_abort() {
    let rego = "package x\nallow if {\n  count(numbers.range(1, 400000000000)) > 0\n}\n";
    let d = eval(&PolicySet::from_rego_str("x.rego", rego, None).unwrap(), json!({}));
    assert_bounded(&d, "numbers.range");
    let doubling = "package x\na := numbers.range(1, 600000)\nallow if { count(array.concat(a, a)) > 0 }\n";
    let d = eval(&PolicySet::from_rego_str("x.rego", doubling, None).unwrap(), json!({}));
    assert_bounded(&d, "array.concat");
    let step = "package x\nallow if {\n  count(numbers.range_step(0, 9000000000, 2)) > 0\n}\n";
    let d = eval(&PolicySet::from_rego_str("x.rego", step, None).unwrap(), json!({}));
    assert_bounded(&d, "numbers.range_step");
    // Ranges within the bound keep OPA's meaning (both ends included, either direction).
    let ok = "package x\nallow if {\n  array.concat([1], [2, 3]) == [1, 2, 3]\n  numbers.range(3, 1) == [3, 2, 1]\n  numbers.range_step(1, 10, 3) == [1, 4, 7, 10]\n  count(numbers.range(1, 1000)) == 1000\n}\n";
    assert_eq!(eval(&PolicySet::from_rego_str("x.rego", ok, None).unwrap(), json!({})).action, Action::Allow);
}

#[test]
fn a_broken_rego_query_is_a_load_error() {
    let rego = "package x\nallow := true\n";
    for q in ["data.x.[", "data.x.allow ==", "data.x.nofn(1)"] {
        let e = PolicySet::from_rego_str("x.rego", rego, Some(q)).unwrap_err();
        assert!(e.message.contains("rego query") && e.message.contains(q), "{e}");
        assert!(!e.message.trim_end().ends_with(':'), "a reason is given: {e}");
    }
    assert!(PolicySet::from_rego_str("x.rego", rego, Some("data.x.allow")).is_ok());
    // A query that is valid but fails on some inputs still loads (and denies on them).
    let div = "package x\nallow if { 1 / input.n > 0 }\n";
    assert!(PolicySet::from_rego_str("x.rego", div, None).is_ok());
}

#[test]
fn a_second_rego_policy_is_reported_as_never_consulted() {
    let dir = tmpdir("rego2");
    let a = write(&dir, "a.rego", "package a\nallow := true\n");
    let b = write(&dir, "b.rego", "package b\nallow := false\n");
    let set = PolicySet::load(&[a, b]).unwrap();
    assert_eq!(eval(&set, json!({})).action, Action::Allow);
    let w = set.warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].file.ends_with("b.rego") && w[0].message.contains("never consulted"), "{}", w[0]);
}

#[test]
fn test_runs_report_what_they_cannot_read() {
    let report = testrun::run_dir(Path::new("/nonexistent-agt-tests"));
    assert_eq!(report.errors.len(), 1);
    assert!(report.errors[0].message.contains("cannot read directory"), "{}", report.errors[0]);
    let dir = tmpdir("testfifo");
    mkfifo(&dir.join("f.test.yaml"));
    let report = testrun::run_dir(&dir);
    assert!(report.errors.iter().any(|e| e.message.contains("FIFO")), "{:?}", report.errors);
    // rego_query with no Rego policy would be ignored: refused, at the key.
    write(&dir, "p.yaml", "name: p\nagents: ['*']\n");
    let e = test_file_error(&dir, "q.test.yaml", "policies: [p.yaml]\nrego_query: data.x.allow\ncases: []\n");
    assert_eq!((e.line, e.message.contains("rego_query")), (2, true), "{e}");
    // stage/agent/strategy would be without effect on v4 policies: refused, at the key.
    write(
        &dir,
        "v4.yaml",
        "version: '1.0'\nname: v\nrules:\n  - {name: r, condition: {field: x, operator: eq, value: 1}, action: deny}\n",
    );
    let e = test_file_error(
        &dir,
        "v.test.yaml",
        "policies: [v4.yaml]\ncases:\n  - {name: c, agent: did:x, context: {}, expect: allow}\n",
    );
    assert_eq!((e.line, e.col), (3, 22), "{e}");
    assert!(e.message.contains("agent applies to governance.toolkit/v1"), "{e}");
}

#[test]
fn a_panicking_rego_builtin_is_a_deny_not_a_crash() {
    // regorus panics on these widths (an overflowing multiplication in debug builds, a
    // non-ASCII digit in any build).
    for fmt in ["%09999999999d", "%\u{0663}d"] {
        let rego = format!("package x\nallow if {{ count(sprintf(\"{fmt}\", [1])) > 0 }}\n");
        let set = PolicySet::from_rego_str("x.rego", &rego, None).unwrap();
        let d = eval(&set, json!({}));
        assert!(d.error && d.action == Action::Deny, "{fmt}: {}", d.reason);
        assert!(d.reason.contains("the Rego evaluator failed"), "{fmt}: {}", d.reason);
        // The same policy set keeps evaluating.
        assert!(eval(&set, json!({})).error);
    }
}

#[test]
fn string_builtins_that_multiply_are_bounded() {
    // A 1 MiB string, built within the bounds.
    let big = format!(
        "package x\nb32 := \"{}\"\nkb := replace(b32, \"a\", b32)\nbig := replace(kb, \"a\", kb)\n",
        "a".repeat(32)
    );
    let eighty = vec!["\"x\""; 80].join(", ");
    for (rule, builtin) in [
        ("allow if { count(replace(big, \"a\", big)) > 0 }".to_string(), "replace"),
        ("allow if { count(strings.replace_n({\"a\": big}, big)) > 0 }".to_string(), "strings.replace_n"),
        (format!("allow if {{ count(concat(big, [{eighty}])) > 0 }}"), "concat"),
    ] {
        let set = PolicySet::from_rego_str("x.rego", &format!("{big}{rule}\n"), None).unwrap();
        let d = eval(&set, json!({}));
        assert!(d.error && d.reason.contains(builtin) && d.reason.contains("limit"), "{builtin}: {}", d.reason);
    }
    // Within the bound they keep regorus's (Go's) meaning.
    let ok = r#"package x
allow if {
  concat(", ", ["a", "b"]) == "a, b"
  concat("-", {"b", "a"}) == "a-b"
  replace("abab", "b", "xy") == "axyaxy"
  replace("ab", "", "-") == "-a-b-"
  strings.replace_n({"a": "b", "b": "c"}, "ab") == "cc"
}
"#;
    assert_eq!(eval(&PolicySet::from_rego_str("x.rego", ok, None).unwrap(), json!({})).action, Action::Allow);
}
