//! `agt-jail policy explain` on the shipped coding-agent policy and synthetic ones, and the exit
//! codes and messages of `policy lint/eval/test` on wrong input.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agt-jail"))
}

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
}

#[test]
fn coding_agent_network_rules_compile() {
    let out = bin()
        .args(["policy", "explain", "--ring", "2", "--json", "--policy"])
        .arg(repo("policies/coding-agent/policy.yaml"))
        .output()
        .expect("run agt-jail");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let net = &v["plan"]["net"];
    assert!(net["rows"].as_array().is_some_and(|r| !r.is_empty()), "{v}");
    assert_eq!(v["domains"].as_array().map(Vec::len), Some(9));
    let rules = v["plan"]["rules"].as_array().expect("rules");
    let egress = rules.iter().find(|r| r["rule"] == "block-other-egress").expect("rule");
    assert_eq!(egress["planes"][0]["plane"], "kernel: cgroup connect/sendmsg/bind tables");
    let rm = rules.iter().find(|r| r["rule"] == "block-destructive-rm").expect("rule");
    assert!(rm["planes"][0]["plane"]
        .as_str()
        .is_some_and(|p| p.contains("bprm_check_security") || p.contains("seccomp")));

    let text = bin()
        .args(["policy", "explain", "--policy"])
        .arg(repo("policies/coding-agent/policy.yaml"))
        .output()
        .expect("run agt-jail");
    assert!(text.status.success());
    let s = String::from_utf8_lossy(&text.stdout);
    assert!(s.contains("network plan:") && s.contains("verdict rows"), "{s}");
    assert!(s.contains("coding-agent/block-credential-access [deny]"), "{s}");
}

#[test]
fn strict_mode_fails_on_an_uncompilable_network_rule_and_passes_otherwise() {
    let dir = std::env::temp_dir().join(format!("agt-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\nagents: ['*']\ndefault_action: allow\nrules:\n  - {name: by-process, condition: \"event == 'connect' and proc.comm == 'curl'\", action: deny}\n",
    )
    .expect("write");
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "name: good\nagents: ['*']\ndefault_action: deny\nrules:\n  - {name: local, condition: \"event == 'connect' and (net.domain == 'localhost' or net.addr startswith '10.') and net.port in [80, 443]\", action: allow}\n  - {name: no-udp, condition: \"event in ['connect', 'sendmsg', 'bind'] and net.protocol == 'udp'\", action: deny, priority: 5}\n",
    )
    .expect("write");
    let out = bin().args(["policy", "explain", "--strict", "--policy"]).arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad/by-process") && err.contains("proc.comm"), "{err}");
    // Not strict: a loud warning, exit 0.
    let out = bin().args(["policy", "explain", "--policy"]).arg(&bad).output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("NETWORK PLANE NOT COMPILED"));
    // The allowed counterpart: a compilable policy passes strict mode (network events only).
    let out = bin().args(["policy", "explain", "--strict", "--json", "--policy"]).arg(&good).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(v["plan"]["net"]["rows"].as_array().is_some_and(|r| !r.is_empty()));
    std::fs::remove_dir_all(&dir).ok();
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("agt-policy-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

/// Writes a scratch file and returns its path as a string, ready to be an argument.
fn put(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_string_lossy().into_owned()
}

/// Runs agt-jail; a run that outlives two minutes is killed and fails the test (some of the
/// bugs below were hangs).
fn run_bounded(args: &[&str]) -> Output {
    let limit = Duration::from_secs(120);
    let mut child = bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run agt-jail");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agt-jail {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Runs agt-jail and checks its exit status and that stderr says `needle`.
fn expect_exit(args: &[&str], code: i32, needle: &str) -> Output {
    let o = run_bounded(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "agt-jail {args:?}: {err}");
    assert!(err.contains(needle), "agt-jail {args:?}: expected {needle:?} in: {err}");
    o
}

const ALLOW_ALL: &str = "name: p\nagents: ['*']\ndefault_action: allow\n";

#[test]
fn eval_refuses_an_unknown_stage_listing_the_valid_ones() {
    let dir = scratch("stage");
    let (p, c) = (put(&dir, "p.yaml", ALLOW_ALL), put(&dir, "c.json", "{}"));
    let args = ["policy", "eval", "--policy", &p, "--input", &c, "--stage", "pre-tool"];
    expect_exit(&args, 125, "pre_input, pre_tool, post_tool, pre_output");
}

#[test]
fn eval_batch_stops_at_an_endless_line() {
    let p = put(&scratch("batch"), "p.yaml", ALLOW_ALL);
    expect_exit(
        &["policy", "eval", "--batch", "--policy", &p, "--input", "/dev/zero"],
        2,
        "/dev/zero:1: line longer than",
    );
}

#[test]
fn eval_exits_2_for_a_context_that_is_not_an_object() {
    let dir = scratch("ctx");
    let (p, c) = (put(&dir, "p.yaml", ALLOW_ALL), put(&dir, "c.json", "[1, 2]"));
    expect_exit(&["policy", "eval", "--policy", &p, "--input", &c], 2, "must be a JSON object, found an array");
    let lines = put(&dir, "l.jsonl", "{}\n7\n{}\n");
    let o = expect_exit(
        &["policy", "eval", "--batch", "--policy", &p, "--input", &lines],
        2,
        ":2: the context must be a JSON object, found a number",
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 3, "every line still gets a decision");
}

#[test]
fn eval_refuses_a_broken_rego_query_and_survives_an_exploding_builtin() {
    let dir = scratch("rego");
    let r = put(&dir, "x.rego", "package x\nallow if {\n  count(numbers.range(1, 400000000000)) > 0\n}\n");
    let c = put(&dir, "c.json", "{}");
    expect_exit(
        &["policy", "eval", "--policy", &r, "--input", &c, "--rego-query", "data.x.["],
        2,
        "rego query \"data.x.[\" is invalid",
    );
    let o = expect_exit(&["policy", "eval", "--policy", &r, "--input", &c], 0, "");
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!((&d["action"], &d["error"]), (&serde_json::json!("deny"), &serde_json::json!(true)), "{d}");
    assert!(d["reason"].as_str().is_some_and(|s| s.contains("numbers.range")), "{d}");
}

#[test]
fn lint_refuses_a_fifo_without_hanging_and_warns_about_silent_policies() {
    let dir = scratch("lint");
    let fifo = dir.join("f.yaml");
    assert!(Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let fifo = fifo.to_string_lossy();
    expect_exit(&["policy", "lint", &fifo], 1, "FIFO");
    expect_exit(&["policy", "eval", "--policy", &fifo, "--input", "-"], 2, "FIFO");

    let quiet =
        put(&dir, "q.yaml", "name: q\ndefault_action: deny\nrules:\n  - {name: r, condition: 'true', action: log}\n");
    let o = expect_exit(&["policy", "lint", &quiet], 0, "q.yaml:1:7: warning: policy \"q\" names no agent");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("q.yaml:4:27: warning: rule \"r\": condition: `true` is a bare literal"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 file(s) ok, 2 warning(s)"));
}

#[test]
fn explain_refuses_a_trust_score_over_1000() {
    let p = put(&scratch("trust"), "p.yaml", ALLOW_ALL);
    expect_exit(&["policy", "explain", "--trust", "2000", "--policy", &p], 125, "0..=1000");
}

#[test]
fn help_documents_exit_codes_and_stages() {
    for sub in ["lint", "eval", "test"] {
        let o = expect_exit(&["policy", sub, "--help"], 0, "");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("Exit status: 0"), "{sub}: {text}");
    }
    let o = expect_exit(&["policy", "eval", "--help"], 0, "");
    let text = String::from_utf8_lossy(&o.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains("pre_input, pre_tool (the default), post_tool, pre_output"), "{text}");
}

#[test]
fn eval_refuses_flags_that_would_have_no_effect() {
    let dir = scratch("noeffect");
    let p = put(&dir, "p.yaml", ALLOW_ALL);
    let v4 = put(
        &dir,
        "v4.yaml",
        "version: '1.0'\nname: v\nrules:\n  - {name: r, condition: {field: x, operator: eq, value: 1}, action: deny}\n",
    );
    let c = put(&dir, "c.json", "{}");
    expect_exit(
        &["policy", "eval", "--policy", &p, "--input", &c, "--rego-query", "data.x.allow"],
        2,
        "--rego-query is given but none of the --policy files is a .rego file",
    );
    for (flag, value) in [("--strategy", "deny_overrides"), ("--stage", "post_tool"), ("--agent", "did:x")] {
        let needle = format!("{flag} applies to governance.toolkit/v1");
        expect_exit(&["policy", "eval", "--policy", &v4, "--input", &c, flag, value], 2, &needle);
    }
    expect_exit(&["policy", "eval", "--policy", &p, "--input", &c, "--stage", "post_tool", "--agent", "did:x"], 0, "");
}
