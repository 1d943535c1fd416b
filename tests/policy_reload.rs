//! Policy hot reload end to end: an agent execs `/bin/true` in a loop; its policy file is
//! edited in place from A (allows it) to B (denies it) and reloaded while the stream runs.
//! Every decision record names hash(A) or hash(B), never anything else or none; A's
//! records allow, B's deny, and B's come after the one `policy_reloaded` record. A reload
//! of a broken file exits 1 with the located error and keeps B. Run standalone (the
//! agent's own control socket) and through a daemon, where SIGHUP reloads every agent.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use agt_jail_test_support::{daemon::TestDaemon, require, Need};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

const POLICY_A: &str = "apiVersion: governance.toolkit/v1
name: reloadable
agents: [\"*\"]
default_action: allow
rules:
  - name: no-false
    condition: \"event == 'exec' and exec.path endswith '/false'\"
    action: deny
    priority: 10
";

const POLICY_B: &str = "apiVersion: governance.toolkit/v1
name: reloadable
agents: [\"*\"]
default_action: allow
rules:
  - name: no-true
    condition: \"event == 'exec' and exec.path endswith '/true'\"
    action: deny
    priority: 10
";

/// B with a list on line 6 that is never closed: not a policy.
const BROKEN: &str = "apiVersion: governance.toolkit/v1
name: reloadable
agents: [\"*\"]
default_action: allow
rules:
  - name: [no-true
";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn records(events: &Path) -> Vec<Value> {
    std::fs::read_to_string(events).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The records of the agent's execs of `/bin/true`.
fn true_execs(records: &[Value]) -> impl Iterator<Item = &Value> {
    records
        .iter()
        .filter(|r| r["event"] == "exec" && r["context"]["exec"]["path"].as_str().is_some_and(|p| p.ends_with("/true")))
}

/// Waits until `count` records of `/bin/true` execs have `outcome`.
fn wait_for(events: &Path, outcome: &str, count: usize, agent: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = true_execs(&records(events)).filter(|r| r["outcome"] == outcome).count();
        if got >= count {
            return;
        }
        assert!(agent.try_wait().unwrap().is_none(), "the agent ended early");
        assert!(Instant::now() < deadline, "only {got} {outcome} records of /bin/true: {:?}", records(events));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// How the test talks to agt-jail: standalone (no daemon answers) or through one.
struct Cli {
    socket: PathBuf,
}

impl Cli {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env("AGT_JAIL_SOCKET", &self.socket);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// The policy hash the agent's `status` names (once its control socket answers).
    fn policy_hash(&self, name: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.run(&["status", "--agent", name]);
            if out.status.success() {
                let status: Value = serde_json::from_slice(&out.stdout).unwrap();
                if let Some(hash) = status["policy_hash"].as_str() {
                    return hash.to_string();
                }
            }
            assert!(Instant::now() < deadline, "status never answered: {}", text(&out.stderr));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A run of the scenario in `dir`: the agent under A streaming execs, then `reload` (which
/// must switch it to B), then a broken file; `exec` gets `extra` too. Returns hash(A), hash(B).
fn scenario(cli: &Cli, dir: &Path, tag: &str, extra: &[&Path], reload: &dyn Fn(&Cli, &str)) -> (String, String) {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY_A).unwrap();
    let events = dir.join("events.jsonl");
    let name = format!("reload-{tag}-{}", std::process::id());
    let mut agent = cli
        .cmd(&["exec", "--ring", "2", "--agent", &name, "--deny-penalty", "0", "--policy"])
        .arg(&policy)
        .arg("--events")
        .arg(&events)
        .args(extra)
        .args(["--", "/bin/sh", "-c", "while :; do /bin/true; sleep 0.02; done"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let hash_a = cli.policy_hash(&name);
    wait_for(&events, "allow", 5, &mut agent);

    // Edited in place, then reloaded while the stream goes on.
    std::fs::write(&policy, POLICY_B).unwrap();
    reload(cli, &name);
    let hash_b = cli.policy_hash(&name);
    assert_ne!(hash_a, hash_b);
    wait_for(&events, "deny", 5, &mut agent);

    // A broken file: refused with its located error, B stays in force.
    std::fs::write(&policy, BROKEN).unwrap();
    let out = cli.run(&["reload", "--agent", &name]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stdout {} stderr {stderr}", text(&out.stdout));
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert!(stderr.contains("policy.yaml:7:1: "), "the error is located: {stderr}");
    assert_eq!(cli.policy_hash(&name), hash_b, "the broken file left B in force");
    let denied = true_execs(&records(&events)).filter(|r| r["outcome"] == "deny").count();
    wait_for(&events, "deny", denied + 3, &mut agent);

    let out = cli.run(&["kill", "--agent", &name]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    assert!(wait_exit(&mut agent, Duration::from_secs(30)), "the killed agent never ended");

    let records = records(&events);
    let switches: Vec<(usize, &Value)> =
        records.iter().enumerate().filter(|(_, r)| r["event"] == "policy_reloaded").collect();
    assert_eq!(switches.len(), 1, "one switch (the broken file made none): {switches:?}");
    let (switch, record) = switches[0];
    assert_eq!((record["old_policy"].as_str(), record["policy"].as_str()), (Some(&*hash_a), Some(&*hash_b)));
    let mut late_a = 0;
    let (mut under_a, mut under_b) = (0, 0);
    for (i, r) in records.iter().enumerate().filter(|(_, r)| r.get("decision").is_some()) {
        let policy = r["policy"].as_str().unwrap_or_else(|| panic!("a decision record without its policy: {r}"));
        let is_true =
            r["event"] == "exec" && r["context"]["exec"]["path"].as_str().is_some_and(|p| p.ends_with("/true"));
        if policy == hash_a {
            under_a += 1;
            if is_true {
                assert_eq!(r["outcome"], "allow", "A allows /bin/true: {r}");
            }
            if i > switch {
                late_a += 1;
            }
        } else if policy == hash_b {
            under_b += 1;
            assert!(i > switch, "a record of B before the switch: {r}");
            if is_true {
                assert_eq!((r["outcome"].as_str(), r["matched_rule"].as_str()), (Some("deny"), Some("no-true")), "{r}");
            }
        } else {
            panic!("a record under neither policy ({hash_a}, {hash_b}): {r}");
        }
    }
    // One exec can be under way under A while the switch is written (its record follows).
    assert!(late_a <= 1, "{late_a} records of A after the switch");
    assert!(under_a >= 5 && under_b >= 8, "{under_a} records under A, {under_b} under B");
    (hash_a, hash_b)
}

#[test]
fn a_reload_under_a_stream_of_execs_switches_every_decision_at_once() {
    if !require("policy_reload::standalone", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    // No daemon answers there: the commands use the agent's own control socket.
    let cli = Cli { socket: PathBuf::from("/nonexistent/agt.sock") };
    let dir = tempfile::tempdir().unwrap();
    let (log, key) = (dir.path().join("run.audit"), dir.path().join("audit.key"));
    let audit = [Path::new("--audit"), &log, Path::new("--audit-key"), &key];
    let (hash_a, hash_b) = scenario(&cli, dir.path(), "own", &audit, &|cli, name| {
        let out = cli.run(&["reload", "--agent", name]);
        assert!(out.status.success(), "reload: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("in force (was "), "{}", text(&out.stdout));
    });

    // The audit log: every entry names A or B, and a decision's entry names the policy the
    // decision was made under (but for one under way at the switch); the chain verifies.
    let entries: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (mut a, mut b, mut mixed) = (0, 0, 0);
    for entry in entries.iter().filter(|e| e["kind"] == "record") {
        let policy = entry["policy"].as_str().unwrap();
        assert!(policy == hash_a || policy == hash_b, "an entry under neither policy: {entry}");
        if policy == hash_a {
            a += 1;
        } else {
            b += 1;
        }
        if let Some(decided) = entry["record"]["policy"].as_str() {
            if decided != policy {
                mixed += 1;
            }
        }
    }
    assert!(a > 0 && b > 0 && mixed <= 1, "{a} entries under A, {b} under B, {mixed} decided under the other");
    let public = cli.cmd(&["audit", "key", "--audit-key"]).arg(&key).output().unwrap();
    assert!(public.status.success(), "{}", text(&public.stderr));
    let public = text(&public.stdout);
    let verify = cli.cmd(&["audit", "verify"]).arg(&log).args(["--key", public.trim()]).output().unwrap();
    assert!(verify.status.success(), "audit verify: {} {}", text(&verify.stdout), text(&verify.stderr));
}

#[test]
fn sighup_to_the_daemon_reloads_its_agents() {
    if !require("policy_reload::daemon", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    let daemon = TestDaemon::start(BIN, "", &[]);
    let cli = Cli { socket: daemon.run_dir.join("agt.sock") };
    let pid = daemon.pid().unwrap() as i32;
    let dir = tempfile::tempdir().unwrap();
    scenario(&cli, dir.path(), "hup", &[], &|cli, name| {
        let before = cli.policy_hash(name);
        // SAFETY: SIGHUP to the daemon this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while cli.policy_hash(name) == before {
            assert!(Instant::now() < deadline, "SIGHUP did not reload {name}: {}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(daemon.log_text().contains(&format!("agent {name}: policy ")), "{}", daemon.log_text());
    });
}

/// The network tables follow a reload: a ring 0 agent connects to a listener in a loop; A
/// allows it, B denies its port in the kernel. After the reload the connects fail with
/// EPERM in the kernel and the listener gets no more of them; the records name B.
#[test]
fn a_reload_replaces_the_kernel_network_tables() {
    if !require("policy_reload::network", &[Need::Root, Need::CgroupV2, Need::Btf]) {
        return;
    }
    let cli = Cli { socket: PathBuf::from("/nonexistent/agt.sock") };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY_A).unwrap();
    let events = dir.path().join("events.jsonl");
    let name = format!("reload-net-{}", std::process::id());
    let script = format!("while :; do bash -c 'echo > /dev/tcp/127.0.0.1/{port}' 2>/dev/null; sleep 0.02; done");
    let mut agent = cli
        .cmd(&["exec", "--ring", "0", "--agent", &name, "--deny-penalty", "0", "--policy"])
        .arg(&policy)
        .arg("--events")
        .arg(&events)
        .args(["--", "/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let hash_a = cli.policy_hash(&name);
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < 5 {
        assert!(Instant::now() < deadline && agent.try_wait().unwrap().is_none(), "A's connects never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = POLICY_A.replace(
        "    condition: \"event == 'exec' and exec.path endswith '/false'\"",
        &format!("    condition: \"event == 'connect' and net.port == {port}\""),
    );
    std::fs::write(&policy, b).unwrap();
    let out = cli.run(&["reload", "--agent", &name]);
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    let hash_b = cli.policy_hash(&name);
    let connects = |outcome: &str, policy: &str| {
        records(&events)
            .iter()
            .filter(|r| r["event"] == "connect" && r["context"]["net"]["port"] == port)
            .filter(|r| r["outcome"] == outcome && r["policy"] == policy)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while connects("deny", &hash_b) < 5 {
        assert!(Instant::now() < deadline, "no denied connects under B: {:?}", records(&events));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Denied in the kernel: nothing more reaches the listener.
    let after = accepted.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), after, "a connect got through under B");
    let out = cli.run(&["kill", "--agent", &name]);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    assert!(wait_exit(&mut agent, Duration::from_secs(30)));
    assert!(connects("allow", &hash_a) >= 5, "A's connects are on record under A");
    for r in records(&events).iter().filter(|r| r["event"] == "connect") {
        assert!(r["policy"] == *hash_a || r["policy"] == *hash_b, "{r}");
    }
}
