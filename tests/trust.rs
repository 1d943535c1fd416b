//! Trust end to end: a policy's `trust:` section sets the penalty and the kill threshold;
//! denials lower trust, the tier change demotes the agent to ring 3 live, trust below the
//! threshold kills it, and every change is a `trust` record in the events file.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use agt_jail_test_support::{require, Need};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

const POLICY: &str = "apiVersion: governance.toolkit/v1
name: trusty
agents: [\"*\"]
default_action: allow
trust:
  penalty: 150
  kill_below: 100
rules:
  - name: no-true
    condition: \"event == 'exec' and exec.path endswith '/true'\"
    action: deny
    priority: 10
";

/// Runs `command` as a ring-2 agent under `policy` (text); its output and event records.
fn run_agent(name: &str, policy: &str, command: &[&str]) -> (std::process::Output, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let events = dir.path().join("events.jsonl");
    let out = Command::new(BIN)
        .args(["exec", "--ring", "2", "--agent", &format!("{name}-{}", std::process::id()), "--policy"])
        .arg(&path)
        .arg("--events")
        .arg(&events)
        .arg("--")
        .args(command)
        .output()
        .unwrap();
    let records = std::fs::read_to_string(&events).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (out, records)
}

#[test]
fn denials_lower_trust_demote_then_kill_and_each_change_is_recorded() {
    if !require("trust::denials", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    let (out, records) =
        run_agent("trust", POLICY, &["/bin/sh", "-c", "/bin/true; /bin/true; /bin/true; echo survived"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("survived"), "the agent outlived trust 50: {stdout}");
    assert_eq!(out.status.code(), Some(137), "{}", String::from_utf8_lossy(&out.stderr));
    let trust: Vec<(u64, u64, &str, u64)> = records
        .iter()
        .filter(|r| r["event"] == "trust")
        .map(|r| {
            (
                r["before"].as_u64().unwrap(),
                r["after"].as_u64().unwrap(),
                r["tier"].as_str().unwrap(),
                r["ring"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(trust, [(500, 350, "probationary", 2), (350, 200, "untrusted", 2), (200, 50, "untrusted", 3)]);
    let demote = records.iter().find(|r| r["event"] == "demote").unwrap();
    assert_eq!((demote["from_ring"].as_u64(), demote["to_ring"].as_u64()), (Some(2), Some(3)));
}

#[test]
fn a_bad_trust_section_is_refused_with_125_and_one_located_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("bad.yaml");
    std::fs::write(&policy, POLICY.replace("penalty: 150", "penalty: lots")).unwrap();
    let out =
        Command::new(BIN).args(["exec", "--ring", "2", "--policy"]).arg(&policy).args(["--", "true"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad.yaml: trust.penalty: expected a whole number 0-1000"), "{stderr}");
    // `policy lint` reads the section as `exec` does; the good policy passes.
    let lint = Command::new(BIN).args(["policy", "lint"]).arg(&policy).output().unwrap();
    assert_eq!(lint.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&lint.stderr).contains("bad.yaml: trust.penalty"));
    std::fs::write(&policy, POLICY).unwrap();
    let lint = Command::new(BIN).args(["policy", "lint"]).arg(&policy).output().unwrap();
    assert!(lint.status.success(), "{}", String::from_utf8_lossy(&lint.stderr));
}

#[test]
fn trust_decays_over_time_down_to_the_floor() {
    if !require("trust::decay", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    let policy = "apiVersion: governance.toolkit/v1\nname: decay\nagents: [\"*\"]\ndefault_action: allow\n\
                  trust:\n  decay: {points: 50, every: 1, floor: 400}\n";
    let (out, records) = run_agent("decay", policy, &["/bin/sleep", "3.5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let afters: Vec<u64> = records
        .iter()
        .filter(|r| r["event"] == "trust" && r["reason"] == "decay")
        .map(|r| r["after"].as_u64().unwrap())
        .collect();
    // Whole steps of 50 from 500, however the ticks fell, ending at the floor after 3 s.
    assert!(!afters.is_empty() && afters.windows(2).all(|w| w[0] > w[1]), "{afters:?}");
    assert!(afters.iter().all(|a| *a >= 400 && a % 50 == 0), "{afters:?}");
    assert_eq!(afters.last(), Some(&400), "{afters:?}");
}
