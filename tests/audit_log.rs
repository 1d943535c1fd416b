//! `agt-jail exec --audit` and `agt-jail audit`, end to end with the real binary: a log
//! cut short by kill -9 in the middle of a flood of kernel denies still verifies, and
//! `audit recover` writes what the kernel still held into it, so that it holds every deny
//! the agent was refused, once; the `audit` commands report tampering by record number
//! with their documented exit statuses.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use agt_jail_audit::{
    writer::{AuditLog, LogOptions, SyncPolicy},
    SigningKey,
};
use agt_jail_test_support::{assert_one_line_error, require, Need};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

/// Generous: the build machines are shared and the guests of the VM tests are emulated.
const DEADLINE: Duration = Duration::from_secs(120);

fn agt_jail() -> Command {
    Command::new(BIN)
}

fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The denied connects the agent saw (it writes its running count), 0 before the first.
fn counted(path: &Path) -> u64 {
    std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// The agent's cgroup, frozen and then killed and removed when the test ends (agt-jail
/// was killed and cannot clean up).
struct AgentCgroup(PathBuf);

impl AgentCgroup {
    fn of(owner: u32) -> AgentCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let layout = agt_jail_jail::CgroupLayout::parse(&mountinfo).unwrap();
        AgentCgroup(layout.agents_parent().join(agt_jail_jail::cgroup::cgroup_name(owner, 0)))
    }

    /// Stops the flood (if the agent still runs: it may have been ended with agt-jail).
    fn freeze(&self) {
        if std::fs::write(self.0.join("cgroup.freeze"), "1").is_err() {
            return;
        }
        wait_for("the agent to freeze", || {
            let events = std::fs::read_to_string(self.0.join("cgroup.events")).unwrap_or_default();
            events.is_empty() || events.contains("frozen 1") || events.contains("populated 0")
        });
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        let _ = std::fs::write(self.0.join("cgroup.freeze"), "0");
        let start = Instant::now();
        while self.0.exists() && std::fs::remove_dir(&self.0).is_err() && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What the log holds of the kernel's denies: connect denies on record (a deny summary
/// record stands for `count`), of which summary counts and recovered ones, the kernel's
/// last recorded count of denies it could not record at all, and the recovery's record.
#[derive(Debug, Default)]
struct OnRecord {
    denies: u64,
    summary: u64,
    recovered: u64,
    dropped: u64,
    recovery: Option<Value>,
    /// The largest count of one summary record the writer (not the recovery) wrote.
    largest_written_summary: u64,
}

fn on_record(log: &Path) -> OnRecord {
    let mut out = OnRecord::default();
    for line in std::fs::read_to_string(log).unwrap().lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
        let record = &entry["record"];
        // The kernel's record (no policy, or recovered), or the evaluator's (under a policy).
        let kernel_deny = record["kind"] == "connect" && record["verdict"] == "deny";
        let evaluator_deny = record["event"] == "connect" && record["outcome"] == "deny";
        if kernel_deny || evaluator_deny {
            let count = record["count"].as_u64().unwrap_or(1);
            out.denies += count;
            if record["pid"] == 0 {
                out.summary += count;
            }
            if record["recovered"] == true {
                out.recovered += count;
            } else if count > 1 {
                out.largest_written_summary = out.largest_written_summary.max(count);
            }
        }
        if record["event"] == "kernel_drops" {
            out.dropped = record["denies_dropped"].as_u64().unwrap();
        }
        if record["event"] == "audit_recovered" {
            out.recovery = Some(record.clone());
        }
    }
    out
}

/// The pinned run of the agt-jail with process id `pid`.
fn pinned_run_of(pid: u32) -> Option<String> {
    let prefix = format!("exec-{pid}-");
    std::fs::read_dir("/run/agt-jail/runs").ok()?.find_map(|entry| {
        let name = entry.ok()?.file_name().into_string().ok()?;
        name.starts_with(&prefix).then(|| name.trim_end_matches(".json").to_string())
    })
}

fn verify(log: &Path, public: &str) -> (Option<i32>, String, String) {
    let output = agt_jail().args(["audit", "verify"]).arg(log).args(["--key", public]).output().unwrap();
    let (stdout, stderr) = text(&output);
    (output.status.code(), stdout, stderr)
}

/// Ring records the event thread reads per batch (`BATCH_RECORDS` in exec_cmd.rs).
const BATCH_RECORDS: u64 = 512;

/// One round: the flood, kill -9 of agt-jail in the middle of it, what is on disk, the
/// recovery, what is on disk then. `policy`: the denies are a policy's, recorded by the
/// evaluator.
fn kill_9_in_a_flood_then_recover(round: u64, policy: bool) {
    let dir = tempfile::Builder::new().prefix("agt-jail-audit-").tempdir_in("/tmp").unwrap();
    let (log, key, count) = (dir.path().join("audit.jsonl"), dir.path().join("audit.key"), dir.path().join("count"));
    let public = agt_jail().args(["audit", "key", "--audit-key"]).arg(&key).output().unwrap();
    assert!(public.status.success(), "{:?}", text(&public));
    let public = String::from_utf8(public.stdout).unwrap().trim().to_string();
    // A flood of connects to a denied port; each refusal is counted by the agent itself.
    let port = 9;
    let script = format!(
        "import os, socket\n\
         fd = os.open({count:?}, os.O_WRONLY | os.O_CREAT, 0o644)\n\
         n = 0\n\
         while True:\n\
         \x20   s = socket.socket()\n\
         \x20   try:\n\
         \x20       s.connect(('127.0.0.1', {port}))\n\
         \x20   except PermissionError:\n\
         \x20       n += 1\n\
         \x20       os.pwrite(fd, b'%20d' % n, 0)\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         \x20   s.close()\n",
        count = count.display().to_string()
    );
    let mut exec = agt_jail();
    exec.args(["exec", "--quiet", "--audit"]).arg(&log).arg("--audit-key").arg(&key);
    exec.args(["--audit-checkpoint-every", "700", "--audit-checkpoint-secs", "3600"]);
    if policy {
        let file = dir.path().join("policy.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: governance.toolkit/v1\nname: no-discard\nagents: [\"*\"]\ndefault_action: allow\n\
                 rules:\n  - name: no-port-{port}\n    condition: \"event == 'connect' and net.port == {port}\"\n\
                 \x20   action: deny\n    priority: 100\n"
            ),
        )
        .unwrap();
        exec.args(["--ring", "0", "--policy"]).arg(&file);
    } else {
        exec.args(["--deny-connect", &format!("127.0.0.1:{port}")]);
    }
    let mut child = exec.args(["--", "/usr/bin/python3", "-c", &script]).stdin(Stdio::null()).spawn().unwrap();
    let cgroup = AgentCgroup::of(child.id());
    // The kill lands at a different point of the flood each round.
    wait_for("a flood of denies", || counted(&count) >= 5000 + 3000 * round);
    let run = pinned_run_of(child.id()).expect("an audited run pins its kernel records");
    // kill -9 while the agent is refused as fast as it asks; no freeze before.
    child.kill().unwrap();
    child.wait().unwrap();
    // Then the flood stops (agt-jail's programs went with it; the agent may be gone too).
    cgroup.freeze();

    // What is on disk after the kill: intact, with the tail after the last checkpoint unsigned.
    let (code, stdout, stderr) = verify(&log, &public);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("audit log intact"), "{stdout}");
    assert!(stderr.contains("no closing checkpoint"), "{stderr}");
    let before = on_record(&log);
    assert!(before.recovery.is_none());

    let listed = agt_jail().args(["audit", "recover", "--list"]).output().unwrap();
    assert!(text(&listed).0.contains(&format!("{run} orphaned {}", log.display())), "{:?}", text(&listed));
    // --list recovers nothing, so it takes no runs (nor a key) it would leave untouched.
    let both = agt_jail().args(["audit", "recover", "--list", &run]).output().unwrap();
    assert_eq!(both.status.code(), Some(2), "{:?}", text(&both));
    let recovered = agt_jail().args(["audit", "recover", &run]).output().unwrap();
    assert_eq!(recovered.status.code(), Some(0), "{:?}", text(&recovered));
    // The agent is gone now (recovery ends what is left of it): its count is final.
    let refused = counted(&count);
    assert!(!Path::new("/sys/fs/bpf/agt-jail").join(&run).exists(), "the run is unpinned");
    assert!(!Path::new("/run/agt-jail/runs").join(format!("{run}.json")).exists());

    // After the recovery: closed by a signed checkpoint, nothing unsigned, no warning.
    let (code, stdout, stderr) = verify(&log, &public);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stderr, "", "a recovered log is closed");
    let after = on_record(&log);
    let recovery = after.recovery.as_ref().expect("the recovery's record");
    // Every deny the agent was refused is on disk (the last may have been refused and not
    // yet counted by the agent when it was killed).
    assert!(after.denies + after.dropped >= refused, "round {round}: {after:?} on record, {refused} refused");
    if policy {
        // The evaluator's records do not carry the kernel's identity of a record: a batch
        // written just before the kill and not yet given back is written again
        // (docs/audit.md, "Nothing twice"). Never more than that one batch: its ring records
        // and the summary count it wrote.
        assert!(
            after.denies + after.dropped <= refused + 1 + BATCH_RECORDS + after.largest_written_summary,
            "round {round}: {after:?} on record, only {refused} refused"
        );
    } else {
        // None twice, and what the kernel counted in its deny summary is on disk, once.
        assert!(
            after.denies + after.dropped <= refused + 1,
            "round {round}: {after:?} on record, only {refused} refused"
        );
        assert_eq!(recovery["deny_summary_total"].as_u64(), Some(after.summary), "{recovery}");
    }
    eprintln!(
        "round {round} (policy: {policy}): {refused} refused; on disk at the kill {} (+{} dropped), recovered {} ({} already written); \
         deny summary {}",
        before.denies, before.dropped, after.recovered, recovery["ring_records_already_written"], after.summary
    );
    drop(cgroup);
}

#[test]
fn a_log_cut_by_kill_9_in_a_flood_of_denies_verifies_and_recovery_writes_every_deny() {
    if !require(
        "a_log_cut_by_kill_9_in_a_flood_of_denies_verifies_and_recovery_writes_every_deny",
        &[Need::Root, Need::CgroupV2, Need::Btf],
    ) {
        return;
    }
    for round in 0..5 {
        kill_9_in_a_flood_then_recover(round, false);
    }
}

#[test]
fn under_a_policy_kill_9_in_a_flood_loses_no_deny_after_recovery() {
    if !require(
        "under_a_policy_kill_9_in_a_flood_loses_no_deny_after_recovery",
        &[Need::Root, Need::CgroupV2, Need::Btf],
    ) {
        return;
    }
    for round in 0..3 {
        kill_9_in_a_flood_then_recover(round, true);
    }
}

/// A closed log of `n` records written by the library (no root needed), at a fixed clock
/// so that two logs of the same records are the same bytes.
fn small_log(dir: &Path, n: u64, rewrite: bool) -> (PathBuf, String) {
    let path = dir.join("audit.jsonl");
    let key = SigningKey::from_bytes(&[5; 32]);
    let public = agt_jail_audit::to_hex(key.verifying_key().as_bytes());
    let opts = LogOptions {
        checkpoint_every: 4,
        sync: SyncPolicy::None,
        clock: || 1_765_000_000_000,
        ..LogOptions::default()
    };
    let mut log = AuditLog::create(&path, key, opts).unwrap();
    for i in 0..n {
        // The key holder's rewrite of the history: record n=1 allowed instead of denied.
        let outcome = if i == 1 && rewrite { "allow" } else { "deny" };
        let record =
            format!(r#"{{"agent":"a1","event":"exec","outcome":"{outcome}","decision":{{"allowed":false}},"n":{i}}}"#);
        log.append_line("did:mesh:0123456789abcdef0123456789abcdef", "none", record.as_bytes()).unwrap();
    }
    log.close().unwrap();
    (path, public)
}

#[test]
fn audit_verify_names_the_tampered_record_with_its_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = small_log(dir.path(), 10, false);
    let ok = agt_jail().args(["audit", "verify"]).arg(&path).args(["--key", &public]).output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{:?}", text(&ok));
    let show = agt_jail().args(["audit", "show"]).arg(&path).output().unwrap();
    assert!(text(&show)
        .0
        .contains("a1 (did:mesh:0123456789abcdef0123456789abcdef): 10 records, 10 decisions, 10 denies"));

    let original = std::fs::read_to_string(&path).unwrap();
    let edited = original.replacen(r#""n":4,"#, r#""n":5,"#, 1);
    assert_ne!(edited, original);
    std::fs::write(&path, edited).unwrap();
    let bad = agt_jail().args(["audit", "verify"]).arg(&path).args(["--key", &public]).output().unwrap();
    // Record 6 holds n=4: entry 0 is the open entry, records n=0..3 are 1..4, a checkpoint is 5.
    assert_one_line_error(&bad, 1, "audit.jsonl:7: record 6: it does not hash");

    let missing = agt_jail().args(["audit", "verify", "/nonexistent/audit.jsonl", "--key", &public]).output().unwrap();
    assert_one_line_error(&missing, 2, "/nonexistent/audit.jsonl");
    let no_key = agt_jail().args(["audit", "verify"]).arg(&path).output().unwrap();
    assert_one_line_error(&no_key, 2, "--key");
    let bad_key = agt_jail().args(["audit", "verify"]).arg(&path).args(["--key", "abc"]).output().unwrap();
    assert_one_line_error(&bad_key, 2, "abc");
}

#[test]
fn a_witness_detects_a_rewritten_history_with_the_public_key_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (path, public) = small_log(dir.path(), 10, false);
    let kept = dir.path().join("kept.json");
    let head = agt_jail().args(["audit", "checkpoint"]).arg(&path).args(["--key", &public]).output().unwrap();
    assert!(head.status.success(), "{:?}", text(&head));
    std::fs::write(&kept, &head.stdout).unwrap();
    let proof_of = |args: &[&str], log: &Path| {
        let out = agt_jail().arg("audit").args(args).arg(log).output().unwrap();
        assert!(out.status.success(), "{:?}", text(&out));
        let file = dir.path().join("proof.json");
        std::fs::write(&file, &out.stdout).unwrap();
        agt_jail().args(["audit", "verify-proof", "--key", &public]).arg(&file).output().unwrap()
    };
    let inclusion = proof_of(&["prove", "--seq", "3"], &path);
    assert_eq!(inclusion.status.code(), Some(0), "{:?}", text(&inclusion));
    let kept_str = kept.display().to_string();
    let same = proof_of(&["consistency", &kept_str, &kept_str], &path);
    assert_eq!(same.status.code(), Some(0), "{:?}", text(&same));

    // The same log grown by more records extends the kept checkpoint; a rewrite of record 2
    // by the key's holder, re-signed throughout, does not.
    for (name, rewrite, code) in [("grown", false, 0), ("rewritten", true, 1)] {
        let log_dir = dir.path().join(name);
        std::fs::create_dir(&log_dir).unwrap();
        let (log, _) = small_log(&log_dir, 14, rewrite);
        let head = agt_jail().args(["audit", "checkpoint"]).arg(&log).args(["--key", &public]).output().unwrap();
        assert!(head.status.success(), "{name} verifies on its own: {:?}", text(&head));
        let new = log_dir.join("new.json");
        std::fs::write(&new, &head.stdout).unwrap();
        let checked = proof_of(&["consistency", &kept_str, &new.display().to_string()], &log);
        if code == 0 {
            assert_eq!(checked.status.code(), Some(0), "{:?}", text(&checked));
        } else {
            assert_one_line_error(&checked, 1, "history was rewritten");
        }
    }
}

#[test]
fn under_a_policy_the_log_holds_every_record_of_the_events_file() {
    if !require(
        "under_a_policy_the_log_holds_every_record_of_the_events_file",
        &[Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock],
    ) {
        return;
    }
    let dir = tempfile::Builder::new().prefix("agt-jail-audit-").tempdir_in("/tmp").unwrap();
    let (log, key, events) =
        (dir.path().join("audit.jsonl"), dir.path().join("audit.key"), dir.path().join("ev.jsonl"));
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/policies/guard.yaml");
    let out = agt_jail()
        .args(["exec", "--ring", "2", "--agent", "audited", "--policy"])
        .arg(&policy)
        .arg("--workspace")
        .arg(dir.path())
        .arg("--events")
        .arg(&events)
        .arg("--audit")
        .arg(&log)
        .arg("--audit-key")
        .arg(&key)
        .args(["--", "/bin/sh", "-c", "/bin/rm -rf /nonexistent-agt-jail; /bin/true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    let public = agt_jail().args(["audit", "key", "--audit-key"]).arg(&key).output().unwrap();
    let public = String::from_utf8(public.stdout).unwrap().trim().to_string();
    let verified = agt_jail().args(["audit", "verify"]).arg(&log).args(["--key", &public]).output().unwrap();
    assert_eq!(verified.status.code(), Some(0), "{:?}", text(&verified));
    // A closed log: no warning.
    assert_eq!(text(&verified).1, "");
    // Every record of the events file, in order, is a record entry of the log.
    let in_events: Vec<Value> =
        std::fs::read_to_string(&events).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let entries: Vec<Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let records: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "record").collect();
    assert_eq!(records.len(), in_events.len());
    let hash = agt_jail_audit::to_hex(&agt_jail_audit::merkle::sha256(&std::fs::read(&policy).unwrap()));
    for (entry, record) in records.iter().zip(&in_events) {
        assert_eq!(&entry["record"], record);
        assert_eq!(entry["policy"], format!("sha256:{hash}"));
        assert!(entry["did"].as_str().unwrap().starts_with("did:mesh:"), "{entry}");
    }
    let denied: Vec<&&Value> = records.iter().filter(|e| e["record"]["matched_rule"] == "no-recursive-rm").collect();
    assert_eq!(denied.len(), 1, "{records:?}");
    assert_eq!(denied[0]["record"]["outcome"], "deny");
    let show = agt_jail().args(["audit", "show"]).arg(&log).output().unwrap();
    assert!(text(&show).0.contains("audited (did:mesh:"), "{:?}", text(&show));
}
