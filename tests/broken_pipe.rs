//! A closed stdout (`agt-jail ... | head -1`) ends every command but `exec` as it ends `cat`:
//! killed by SIGPIPE, without a panic message. `exec` outlives its own closed stdout and
//! stderr: it keeps supervising, reports the command's status and removes its cgroup.
#![allow(clippy::unwrap_used)]

use std::{
    ffi::OsString,
    fs,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use agt_jail_test_support::{require, Need};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/agt-jail-pipe-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// What a run with a closed stdout (and, if asked, a closed stderr) did.
struct Ended {
    pid: u32,
    status: ExitStatus,
    stderr: String,
}

/// Runs agt-jail with stdout a pipe whose reader is already gone, as after `| head -c1`
/// (every write fails with EPIPE, whatever the timing). A run that outlives two minutes
/// is killed and fails the test.
fn with_closed_stdout<I: Into<OsString>>(args: impl IntoIterator<Item = I>, close_stderr: bool) -> Ended {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let stderr = if close_stderr {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        Stdio::from(writer)
    } else {
        Stdio::piped()
    };
    let mut child = Command::new(BIN).args(&args).stdin(Stdio::null()).stdout(writer).stderr(stderr).spawn().unwrap();
    let pid = child.id();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agt-jail {args:?} still running after two minutes");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    Ended { pid, status: output.status, stderr: String::from_utf8_lossy(&output.stderr).into_owned() }
}

/// The command printed to its closed stdout and was ended by SIGPIPE, without a panic.
fn ends_by_sigpipe<I: Into<OsString>>(args: impl IntoIterator<Item = I>) {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let ended = with_closed_stdout(args.clone(), false);
    assert!(!ended.stderr.contains("panicked"), "agt-jail {args:?} panicked: {}", ended.stderr);
    assert_eq!(ended.status.signal(), Some(libc::SIGPIPE), "agt-jail {args:?}: {:?} {}", ended.status, ended.stderr);
}

#[test]
fn commands_that_print_end_quietly_when_their_reader_is_gone() {
    let dir = scratch("print");
    let policy = repo("policies/coding-agent/policy.yaml");
    let policy = policy.to_str().unwrap();
    let batch = dir.join("contexts.jsonl");
    fs::write(&batch, "{\"event\": \"exec\"}\n".repeat(1000)).unwrap();
    let batch = batch.to_str().unwrap();
    let key = dir.join("audit.key");
    let key = key.to_str().unwrap();
    for args in [
        &["policy", "explain", "--json", "--policy", policy][..],
        &["policy", "explain", "--policy", policy],
        &["policy", "lint", policy],
        &["policy", "eval", "--batch", "--policy", policy, "--input", batch],
        &["policy", "test", repo("policies/coding-agent").to_str().unwrap()],
        &["doctor"],
        &["doctor", "--json"],
        &["--help"],
        &["policy", "--help"],
        &["audit", "key", "--audit-key", key],
    ] {
        ends_by_sigpipe(args);
    }
    // `exec --help` is printed by a process that keeps SIGPIPE ignored: a clean exit.
    let help = with_closed_stdout(["exec", "--help"], false);
    assert!(!help.stderr.contains("panicked"), "{}", help.stderr);
    assert_eq!(help.status.code(), Some(0), "{}", help.stderr);
}

/// Waits (bounded) until `path` exists.
fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "{} never appeared", path.display());
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running `exec`, ended when dropped (so a failed assertion leaves no agent behind).
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn commands_about_a_running_agent_and_its_audit_log_end_quietly_too() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let dir = scratch("agent");
    let policy = dir.join("p.yaml");
    fs::write(&policy, "name: p\nagents: ['*']\ndefault_action: allow\n").unwrap();
    let (log, key, go) = (dir.join("audit.jsonl"), dir.join("audit.key"), dir.join("go"));
    let agent = format!("pipe-{}", std::process::id());
    let mut run = Agent(
        Command::new(BIN)
            .args(["exec", "--quiet", "--agent", &agent, "--policy"])
            .arg(&policy)
            .arg("--audit")
            .arg(&log)
            .arg("--audit-key")
            .arg(&key)
            .args(["--", "sh", "-c", &format!("while [ ! -e {} ]; do sleep 0.05; done", go.display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&Path::new("/run/agt-jail/agents").join(format!("{agent}.sock")));
    for args in [&["status", "--agent", &agent][..], &["identity", "key", "--agent", &agent], &["ps"]] {
        ends_by_sigpipe(args);
    }
    fs::write(&go, "").unwrap();
    assert!(run.0.wait().unwrap().success());
    let public = Command::new(BIN).args(["audit", "key", "--audit-key"]).arg(&key).output().unwrap();
    let public = String::from_utf8(public.stdout).unwrap().trim().to_string();
    let log = log.to_str().unwrap();
    for args in [
        &["audit", "verify", log, "--key", &public][..],
        &["audit", "show", log],
        &["audit", "prove", "--seq", "0", log],
    ] {
        ends_by_sigpipe(args);
    }
}

#[test]
fn exec_outlives_its_closed_stdout_and_stderr_and_removes_its_cgroup() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let dir = scratch("exec");
    // A policy with a load warning (a bare literal condition): exec prints it at start.
    let policy = dir.join("p.yaml");
    fs::write(
        &policy,
        "name: p\nagents: ['*']\ndefault_action: allow\nrules:\n  - {name: lit, condition: 'true', action: log}\n",
    )
    .unwrap();
    let policy = policy.to_str().unwrap();
    let command = WRITES_THEN_EXITS_7;

    // Closed stdout: the command's status, its warning printed, no panic.
    let ended = with_closed_stdout(["exec", "--policy", policy].into_iter().chain(command), false);
    assert_eq!(ended.status.code(), Some(7), "{:?} {}", ended.status, ended.stderr);
    assert!(!ended.stderr.contains("panicked"), "{}", ended.stderr);
    assert!(ended.stderr.contains("is a bare literal"), "{}", ended.stderr);
    assert!(!cgroup_of(ended.pid).exists(), "the agent's cgroup was left behind");

    // Closed stdout and stderr, events written to the closed stdout: the lost records are
    // an error (125), after the command ran and its cgroup went.
    let ended = with_closed_stdout(["exec", "--events", "-", "--policy", policy].into_iter().chain(command), true);
    assert_eq!(ended.status.code(), Some(125), "{:?}", ended.status);
    assert!(!cgroup_of(ended.pid).exists(), "the agent's cgroup was left behind");
}

/// The command's own writes fail (it ignores SIGPIPE); its status is its own.
const WRITES_THEN_EXITS_7: [&str; 4] =
    ["--", "sh", "-c", "trap '' PIPE; echo out; echo err >&2; sleep 0.3; echo again; exit 7"];

/// Where the agent cgroup of an `exec` run by `pid` lives.
fn cgroup_of(pid: u32) -> std::path::PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let layout = agt_jail_jail::CgroupLayout::parse(&mountinfo).unwrap();
    layout.agents_parent().join(agt_jail_jail::cgroup::cgroup_name(pid, 0))
}

#[test]
fn a_jailed_exec_outlives_its_closed_stdout_and_stderr_too() {
    // Ring 1 is a confined ring: what it needs of the kernel.
    require!(Need::Root, Need::CgroupV2, Need::Landlock);
    // Through the jail-only executable, both closed: the command's status.
    let ended = with_closed_stdout(["exec", "--ring", "1"].into_iter().chain(WRITES_THEN_EXITS_7), true);
    assert_eq!(ended.status.code(), Some(7), "{:?}", ended.status);
    assert!(!cgroup_of(ended.pid).exists(), "the agent's cgroup was left behind");
}
