//! `agt-jail exec --policy` end to end on this host's tier: the real binary, real
//! policies, and the kernel stopping what the policy denies before it happens.
//!
//! Each test asserts the denial and, beside it, that the allowed counterpart still works,
//! and that every decision is in the events file and agrees with `agt-jail policy eval`.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use agt_jail_test_support::{require, Need};
use serde_json::Value;

/// How long a test waits for a started agent to reach a point: generous, because the
/// guests of the VM tests are emulated and may share the host with a build.
const STARTUP_DEADLINE: Duration = Duration::from_secs(120);

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn guard_policy() -> PathBuf {
    repo().join("tests/policies/guard.yaml")
}

fn coding_policy() -> PathBuf {
    repo().join("policies/coding-agent/policy.yaml")
}

/// A workspace with small stand-ins for real tools: each leaves a marker when it runs,
/// so a test can tell "denied before it ran" from "ran and failed".
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::Builder::new().prefix("agt-jail-enforce-").tempdir_in("/tmp").unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for tool in ["rm", "git", "tick", "mkfs", "ok"] {
            let script = format!("#!/bin/sh\necho \"$@\" >> {}/{tool}.ran\n", dir.path().display());
            let path = bin.join(tool);
            std::fs::write(&path, script).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        std::fs::create_dir(dir.path().join(".ssh")).unwrap();
        std::fs::write(dir.path().join(".ssh/id_rsa"), "PRIVATE KEY").unwrap();
        std::fs::write(dir.path().join("README"), "hello").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "notes").unwrap();
        Workspace { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn tool(&self, name: &str) -> String {
        self.path().join("bin").join(name).display().to_string()
    }

    fn ran(&self, tool: &str) -> Vec<String> {
        std::fs::read_to_string(self.path().join(format!("{tool}.ran")))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn events(&self) -> PathBuf {
        self.path().with_extension("events.jsonl")
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.events())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l:?}: {e}")))
            .collect()
    }

    /// `agt-jail exec --ring 2 --policy P --events E` with the workspace, whose tools ring 2
    /// runs (they are the agent's workspace files, not system binaries).
    fn exec(&self, policy: &Path, agent: &str, extra: &[&str], script: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["exec", "--ring", "2", "--agent", agent, "--policy"])
            .arg(policy)
            .arg("--events")
            .arg(self.events())
            .arg("--workspace")
            .arg(self.path())
            .args(extra)
            .args(["--", "/bin/sh", "-c", script]);
        cmd
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.events());
    }
}

fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn decisions<'a>(records: &'a [Value], rule: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["matched_rule"] == rule).collect()
}

/// Every decision record must equal what `agt-jail policy eval` says for its context
/// (budget and approval outcomes are state around the evaluator, compared by action).
fn assert_same_as_policy_eval(policy: &Path, records: &[Value]) {
    let decided: Vec<&Value> = records.iter().filter(|r| r.get("decision").is_some()).collect();
    assert!(!decided.is_empty(), "no decision records");
    let batch: String = decided.iter().map(|r| format!("{}\n", r["context"])).collect();
    let mut child = Command::new(BIN)
        .args(["policy", "eval", "--batch", "--input", "-", "--policy"])
        .arg(policy)
        .args(["--agent", decided[0]["context"]["agent"]["did"].as_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || std::io::Write::write_all(&mut stdin, batch.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let answers: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), decided.len());
    for (record, answer) in decided.iter().zip(&answers) {
        let d = &record["decision"];
        assert_eq!(d["matched_rule"], answer["matched_rule"], "record {record}\npolicy eval {answer}");
        assert_eq!(d["action"], answer["action"], "record {record}\npolicy eval {answer}");
        let stateful = d["rate_limited"] == true || answer["action"] == "require_approval";
        if !stateful {
            assert_eq!(d["allowed"], answer["allowed"], "record {record}\npolicy eval {answer}");
        }
    }
}

#[test]
fn a_denied_exec_fails_with_eperm_before_it_runs() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    let script = format!("{rm} -rf /; echo \"rm: $?\"; {rm} -f one-file; echo \"rm-f: $?\"", rm = ws.tool("rm"));
    let out = ws.exec(&guard_policy(), "deny-rm", &[], &script).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("rm: 126") || stdout.contains("Operation not permitted"), "{stdout} {stderr}");
    assert!(stderr.contains("Operation not permitted"), "the shell reports EPERM: {stderr}");
    assert_eq!(ws.ran("rm"), ["-f one-file"], "only the allowed rm ran");
    let records = ws.records();
    let denied = decisions(&records, "no-recursive-rm");
    assert_eq!(denied.len(), 1, "{records:?}");
    assert_eq!(denied[0]["outcome"], "deny");
    assert_eq!(denied[0]["plane"], "seccomp_notify");
    assert_eq!(denied[0]["context"]["exec"]["argv"], serde_json::json!([ws.tool("rm"), "-rf", "/"]));
    assert!(stderr.contains("agt-jail: denied exec of"), "{stderr}");
    assert_same_as_policy_eval(&guard_policy(), &records);
}

/// A tool the agent writes into its workspace and runs is still decided by the exec
/// plane: the deny rule stops it before it runs, the allowed call runs, and both records
/// name the path as the agent sees it.
#[test]
fn a_tool_the_agent_built_in_its_workspace_is_still_under_the_exec_rules() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    let built = ws.path().join("build/rm");
    let script = format!(
        "mkdir -p build && printf '#!/bin/sh\\necho \"$@\" >> {ran}\\n' > build/rm && chmod +x build/rm; \
         ./build/rm -rf /; echo \"rm: $?\"; ./build/rm -f one-file; echo \"rm-f: $?\"",
        ran = ws.path().join("built.ran").display()
    );
    let out = ws.exec(&guard_policy(), "built-rm", &[], &script).current_dir(ws.path()).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("rm: 126") && stdout.contains("rm-f: 0"), "{stdout} {stderr}");
    assert_eq!(
        std::fs::read_to_string(ws.path().join("built.ran")).unwrap(),
        "-f one-file\n",
        "only the allowed call ran"
    );
    let records = ws.records();
    let denied = decisions(&records, "no-recursive-rm");
    assert_eq!(denied.len(), 1, "{records:?}");
    assert_eq!(denied[0]["outcome"], "deny");
    assert_eq!(denied[0]["plane"], "seccomp_notify");
    let exec = &denied[0]["context"]["exec"];
    assert_eq!(exec["path"], built.display().to_string(), "the path as the agent sees it: {exec}");
    assert_eq!(exec["argv"], serde_json::json!(["./build/rm", "-rf", "/"]));
    assert_eq!(exec["interpreter"], "/bin/sh");
    let allowed: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["event"] == "exec"
                && r["outcome"] == "allow"
                && r["context"]["exec"]["path"] == built.display().to_string()
        })
        .collect();
    assert_eq!(allowed.len(), 1, "{records:?}");
    assert_eq!(allowed[0]["context"]["exec"]["argv"], serde_json::json!(["./build/rm", "-f", "one-file"]));
    assert_same_as_policy_eval(&guard_policy(), &records);
}

/// Whether any process on the host runs with exactly this argv.
fn running(argv: &[&str]) -> bool {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .any(|cmdline| cmdline == wanted)
}

#[test]
fn a_kill_rule_ends_the_whole_process_tree() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    // A background child that would outlive its parent, then the shipped coding-agent
    // policy's destructive-rm rule (action kill).
    let script = format!(
        "(sleep 4242; touch {ws}/survivor) & {rm} -rf /; touch {ws}/after",
        ws = ws.path().display(),
        rm = ws.tool("rm")
    );
    let out = ws.exec(&coding_policy(), "kill-tree", &[], &script).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(137), "killed by SIGKILL: {stderr}");
    assert!(!running(&["sleep", "4242"]), "the background sleep was killed too");
    assert!(ws.ran("rm").is_empty(), "rm never ran");
    assert!(!ws.path().join("after").exists() && !ws.path().join("survivor").exists());
    let records = ws.records();
    let killed = decisions(&records, "block-destructive-rm");
    assert_eq!(killed.len(), 1, "{records:?}");
    assert_eq!(killed[0]["outcome"], "kill");
    assert!(stderr.contains("killed the agent"), "{stderr}");
}

#[test]
fn an_exec_budget_allows_n_and_denies_the_next() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    let script = format!("for i in 1 2 3 4 5; do {tick} $i; done; true", tick = ws.tool("tick"));
    let out = ws.exec(&guard_policy(), "budget", &[], &script).output().unwrap();
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(ws.ran("tick"), ["1", "2", "3"], "three allowed, the fourth and fifth denied");
    let records = ws.records();
    let ticks = decisions(&records, "tick-budget");
    let outcomes: Vec<&str> = ticks.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["allow", "allow", "allow", "deny", "deny"]);
    assert_eq!(ticks[3]["decision"]["rate_limited"], true);
    assert_same_as_policy_eval(&guard_policy(), &records);
}

/// Starts a governed run whose script waits at a `git push`, then answers it.
fn approval_run(ws: &Workspace, agent: &str, timeout: &str) -> std::process::Child {
    let script = format!("{git} push origin main; echo \"push: $?\"", git = ws.tool("git"));
    ws.exec(&guard_policy(), agent, &["--approval-timeout", timeout], &script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_held(ws: &Workspace) -> u64 {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Some(r) = ws.records().iter().find(|r| r["outcome"] == "held") {
            return r["approval"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no held request appeared");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn require_approval_holds_the_exec_until_approved() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    let agent = format!("approve-{}", std::process::id());
    let child = approval_run(&ws, &agent, "120");
    let id = wait_for_held(&ws);
    thread::sleep(Duration::from_millis(200));
    assert!(ws.ran("git").is_empty(), "held: git has not run yet");
    let approve = Command::new(BIN).args(["approve", "--agent", &agent, &id.to_string()]).output().unwrap();
    assert!(approve.status.success(), "{:?}", text(&approve));
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("push: 0"), "{stdout} {stderr}");
    assert_eq!(ws.ran("git"), ["push origin main"]);
    assert!(stderr.contains("approval needed (request"), "{stderr}");
    let outcomes: Vec<String> = decisions(&ws.records(), "push-needs-approval")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["held", "approved"]);
    // Answered once: a second approval is refused.
    let again = Command::new(BIN).args(["approve", "--agent", &agent, &id.to_string()]).output().unwrap();
    assert!(!again.status.success());
}

#[test]
fn require_approval_is_denied_by_the_timeout() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    let agent = format!("timeout-{}", std::process::id());
    let out = approval_run(&ws, &agent, "1").wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("push: 126"), "the exec failed (EPERM): {stdout} {stderr}");
    assert!(ws.ran("git").is_empty());
    let outcomes: Vec<String> = decisions(&ws.records(), "push-needs-approval")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(outcomes, ["held", "timeout"]);
}

#[test]
fn a_credentials_rule_stops_reads_of_ssh_keys() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    let script = format!(
        "cat {ws}/.ssh/id_rsa; echo \"key: $?\"; cat {ws}/README; echo; echo \"readme: $?\"; \
         cat {ws}/notes.txt >/dev/null; echo \"notes-read: $?\"; echo x >> {ws}/notes.txt; echo \"notes-write: $?\"",
        ws = ws.path().display()
    );
    let out = ws.exec(&guard_policy(), "keys", &[], &script).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(!stdout.contains("PRIVATE KEY"), "{stdout}");
    assert!(stdout.contains("key: 1"), "{stdout} {stderr}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    assert!(stdout.contains("hello") && stdout.contains("readme: 0"), "{stdout}");
    assert!(stdout.contains("notes-read: 0") && !stdout.contains("notes-write: 0"), "{stdout} {stderr}");
    assert_eq!(std::fs::read_to_string(ws.path().join("notes.txt")).unwrap(), "notes");
    let records = ws.records();
    let keys = decisions(&records, "keys");
    // Tier B: held by the fanotify plane; Tier A: denied by the kernel's file hook, and
    // the record says which rule that was.
    assert!(
        keys.iter().all(|r| r["outcome"] == "deny" && (r["plane"] == "fanotify" || r["plane"] == "kernel")),
        "{keys:?}"
    );
    assert!(!keys.is_empty());
    assert_eq!(decisions(&records, "read-only-notes").len(), 1);
    assert_same_as_policy_eval(&guard_policy(), &records);
}

/// A listener on every IPv4 address that accepts and closes connections.
fn listener() -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

#[test]
fn an_egress_allow_list_lets_the_listed_host_through_and_denies_the_rest() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let ws = Workspace::new();
    let port = listener();
    // 127.0.0.1 is `localhost` (allowed by name); 127.0.0.2 reaches the same listener
    // but has no allowed name, so only the policy can be what refuses it.
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; echo \"listed: $?\"; exec 3>&-; \
         (exec 4<>/dev/tcp/127.0.0.2/{port}); echo \"other: $?\""
    );
    let out = ws.exec(&guard_policy(), "egress", &["--net", "host"], &format!("bash -c '{script}'")).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("listed: 0"), "{stdout} {stderr}");
    assert!(stdout.contains("other: 1"), "{stdout} {stderr}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    let records = ws.records();
    let allowed = decisions(&records, "localhost-only");
    let denied = decisions(&records, "no-other-egress");
    assert_eq!(allowed.len(), 1, "{records:?}");
    assert_eq!(allowed[0]["context"]["net"]["domain"], "localhost");
    assert!(denied.iter().any(|r| r["context"]["net"]["addr"] == "127.0.0.2" && r["outcome"] == "deny"), "{denied:?}");
    assert!(denied.iter().all(|r| r["plane"] == "kernel"));
    // The connects come from bash and a forked subshell, both gone by the time agt-jail
    // reads a batch of records: the executable comes from their exec and fork records.
    for record in records.iter().filter(|r| r["event"] == "connect") {
        let exe = record["context"]["proc"]["exe"].as_str().unwrap_or_default();
        assert!(exe.starts_with('/') && exe.ends_with("/bash"), "{record}");
    }
    assert_same_as_policy_eval(&guard_policy(), &records);
}

#[test]
fn a_bad_policy_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: governance.toolkit/v1\nname: x\nrules:\n  - name: r\n    condition: \"event ==\"\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["exec", "--policy"]).arg(&bad).args(["--", "/bin/true"]).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("bad.yaml:5:"), "located error: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The caller's name and executable in an exec decision are the ones it has at that exec:
/// a process that renamed itself (and a child it forked afterwards) is judged by the new
/// name, one that exec'd since by its new program.
#[test]
fn exec_rules_see_the_callers_name_as_it_is_now() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let ws = Workspace::new();
    let policy = repo().join("tests/policies/caller.yaml");
    // Ring 0: the agent may write its own /proc/self/comm (a confined ring's view refuses it).
    let script = format!(
        "{tick} before; printf renamed > /proc/self/comm; {tick} after; echo \"after: $?\"; /bin/sh -c '{tick} child'",
        tick = ws.tool("tick")
    );
    let out = Command::new(BIN)
        .args(["exec", "--agent", "caller", "--policy"])
        .arg(&policy)
        .arg("--events")
        .arg(ws.events())
        .args(["--", "/bin/sh", "-c", &script])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout} {stderr}");
    assert!(stdout.contains("after: 126"), "the renamed shell's exec is denied: {stdout} {stderr}");
    assert_eq!(ws.ran("tick"), ["before", "child"], "{stderr}");
    let records = ws.records();
    let denied = decisions(&records, "renamed-caller");
    assert_eq!(denied.len(), 1, "{records:?}");
    let caller = &denied[0]["context"]["proc"];
    assert_eq!(caller["comm"], "renamed");
    let shell = std::fs::canonicalize("/bin/sh").unwrap().display().to_string();
    assert_eq!(caller["exe"], shell.as_str(), "{caller}");
    let child = records
        .iter()
        .find(|r| r["context"]["exec"]["argv"] == serde_json::json!([ws.tool("tick"), "child"]))
        .expect("the child's exec is recorded");
    assert_eq!(child["context"]["proc"]["comm"], "sh", "{child}");
    assert_same_as_policy_eval(&policy, &records);
}

#[test]
fn a_fileless_exec_is_denied() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let ws = Workspace::new();
    // Ring 0 has no seccomp deny filter: the exec plane itself must refuse the memfd.
    let script = "import os\n\
        fd = os.memfd_create('payload')\n\
        os.write(fd, open('/bin/true', 'rb').read())\n\
        try:\n    os.execve(fd, ['payload'], {})\n\
        except OSError as e:\n    print('fileless', e.errno)\n";
    let out = Command::new(BIN)
        .args(["exec", "--agent", "fileless", "--policy"])
        .arg(guard_policy())
        .arg("--events")
        .arg(ws.events())
        .args(["--", "python3", "-c", script])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("fileless 1"), "EPERM: {stdout} {stderr}");
    let records = ws.records();
    assert!(
        records.iter().any(|r| r["outcome"] == "deny"
            && r["decision"]["reason"].as_str().is_some_and(|s| s.contains("fileless"))),
        "{records:?}"
    );
}

#[test]
fn a_running_agent_is_demoted_live_and_never_promoted() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    let ws = Workspace::new();
    let port = listener();
    let agent = format!("demote-{}", std::process::id());
    let go = ws.path().join("go");
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; echo \"before: $?\"; exec 3>&-; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         (exec 4<>/dev/tcp/127.0.0.1/{port}); echo \"after: $?\"; {ok}; echo \"exec-after: $?\"",
        go = go.display(),
        ok = ws.tool("ok")
    );
    let mut child = ws
        .exec(&guard_policy(), &agent, &["--net", "host"], &format!("bash -c '{script}'"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Demote only once the agent has made its first connect in ring 2 (its first line).
    let mut stdout_lines = BufReader::new(child.stdout.take().unwrap());
    let mut before = String::new();
    stdout_lines.read_line(&mut before).unwrap();
    let status = Command::new(BIN).args(["status", "--agent", &agent]).output().unwrap();
    assert!(status.status.success(), "the agent answers while it runs: {:?}", text(&status));
    let up = Command::new(BIN).args(["demote", "--agent", &agent, "--ring", "1"]).output().unwrap();
    assert!(!up.status.success(), "ring 1 is less restricted than ring 2: refused");
    let down = Command::new(BIN).args(["demote", "--agent", &agent, "--ring", "3"]).output().unwrap();
    assert!(down.status.success(), "{:?}", text(&down));
    std::fs::write(&go, "").unwrap();
    let mut rest = String::new();
    stdout_lines.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let (_, stderr) = text(&out);
    let stdout = before + &rest;
    assert!(stdout.contains("before: 0"), "{stdout} {stderr}");
    assert!(stdout.contains("after: 1"), "network gone after demotion: {stdout} {stderr}");
    assert!(!stdout.contains("exec-after: 0") && ws.ran("ok").is_empty(), "ring 3 runs only the entry: {stdout}");
    assert!(stderr.contains("demoted from ring 2 to ring 3"), "{stderr}");
    let records = ws.records();
    assert!(records.iter().any(|r| r["event"] == "demote" && r["to_ring"] == 3), "{records:?}");
}
