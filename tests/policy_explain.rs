//! `agt-jail policy explain` on the shipped coding-agent policy and synthetic ones.
use std::path::PathBuf;
use std::process::Command;

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
