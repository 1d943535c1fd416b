//! `agt-jail exec` end to end: the real binary, real cgroups, real BPF programs.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
};

use agt_jail_test_support::{assert_one_line_error, require, Need};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

fn agt_jail() -> Command {
    Command::new(BIN)
}

/// A listener on 127.0.0.1 that accepts (and closes) connections in the background.
fn listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

fn events_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agt-jail-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    dir
}

fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("bad event line {line:?}: {err}")))
        .collect()
}

/// bash opens /dev/tcp/HOST/PORT with connect(2); it is on every machine this runs on.
fn connect_script(port: u16) -> String {
    format!("exec 3<>/dev/tcp/127.0.0.1/{port}")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn connects(events: &[Value], port: u16) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["kind"] == "connect" && e["port"] == u64::from(port) && e["addr"] == "127.0.0.1")
        .collect()
}

#[test]
fn denied_connect_fails_with_eperm_and_is_reported() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let port = listener();
    let events = events_file("deny");
    let output = agt_jail()
        .args(["exec", "--events"])
        .arg(&events)
        .args(["--deny-connect", &format!("127.0.0.1:{port}"), "--", "bash", "-c", &connect_script(port)])
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_ne!(output.status.code(), Some(0), "connect should have failed: {err}");
    assert!(err.contains("Operation not permitted"), "expected EPERM, got: {err}");
    assert!(err.contains(&format!("agt-jail: denied tcp connect to 127.0.0.1:{port}")), "{err}");

    let events = read_events(&events);
    let denied = connects(&events, port);
    assert_eq!(denied.len(), 1, "{events:?}");
    assert_eq!(denied[0]["verdict"], "deny");
    assert_eq!(denied[0]["protocol"], "tcp");
    let cgroup_id = denied[0]["cgroup_id"].as_u64().unwrap();
    assert!(cgroup_id > 0);
    let execs: Vec<&Value> = events.iter().filter(|e| e["kind"] == "exec").collect();
    assert!(
        execs.iter().any(|e| e["filename"].as_str().unwrap().ends_with("/bash") && e["cgroup_id"] == cgroup_id),
        "the command's exec is missing: {execs:?}"
    );
}

#[test]
fn allowed_connect_succeeds_and_is_reported_as_allowed() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let port = listener();
    let other = listener();
    let events = events_file("allow");
    // A rule for another port must not affect this one.
    let output = agt_jail()
        .args(["exec", "--events"])
        .arg(&events)
        .args(["--deny-connect", &format!("127.0.0.1:{other}"), "--", "bash", "-c", &connect_script(port)])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let events = read_events(&events);
    let seen = connects(&events, port);
    assert_eq!(seen.len(), 1, "{events:?}");
    assert_eq!(seen[0]["verdict"], "allow");
}

#[test]
fn wildcard_port_denies_every_port() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let port = listener();
    let output = agt_jail()
        .args(["exec", "--deny-connect", "127.0.0.1:*", "--", "bash", "-c", &connect_script(port)])
        .output()
        .unwrap();
    assert_ne!(output.status.code(), Some(0));
    assert!(stderr(&output).contains("Operation not permitted"), "{}", stderr(&output));
}

#[test]
fn the_same_connect_from_outside_the_cgroup_still_works() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let port = listener();
    // The jailed command is denied, reports it, then waits on stdin; while it is
    // alive (programs attached, rule installed) this test connects from outside.
    let script = format!("{} 2>/dev/null || echo denied; read line", connect_script(port));
    let mut child = agt_jail()
        .args(["exec", "--quiet", "--deny-connect", &format!("127.0.0.1:{port}"), "--", "bash", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "denied");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("a host process outside the agent must still connect");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn exit_status_is_propagated() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let status = agt_jail().args(["exec", "--", "sh", "-c", "exit 42"]).status().unwrap();
    assert_eq!(status.code(), Some(42));
    let status = agt_jail().args(["exec", "--", "sh", "-c", "kill -TERM $$"]).status().unwrap();
    assert_eq!(status.code(), Some(128 + 15));
}

#[test]
fn cgroup_is_removed_even_when_the_command_is_killed_and_leaves_children() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    // The command starts a background sleeper and then kills itself with SIGKILL:
    // the sleeper must not survive and the cgroup must be gone.
    let child = agt_jail().args(["exec", "--", "sh", "-c", "sleep 300 & kill -KILL $$"]).spawn().unwrap();
    let owner = child.id();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(128 + 9));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let layout = agt_jail_jail::CgroupLayout::parse(&mountinfo).unwrap();
    let cgroup = layout.agents_parent().join(agt_jail_jail::cgroup::cgroup_name(owner, 0));
    assert!(!cgroup.exists(), "{} was left behind", cgroup.display());
}

// Bad input: one line on stderr, the documented exit status, never a panic.
// These need neither root nor BPF: they are refused before anything is set up.

#[test]
fn unparsable_deny_connect_is_one_line_and_125() {
    for bad in ["nonsense", "127.0.0.1", "127.0.0.1:70000", "localhost:80"] {
        let output = agt_jail().args(["exec", "--deny-connect", bad, "--", "true"]).output().unwrap();
        assert_one_line_error(&output, 125, "expected ADDR:PORT");
    }
}

#[test]
fn missing_command_is_one_line_and_125() {
    let output = agt_jail().args(["exec", "--deny-connect", "127.0.0.1:80"]).output().unwrap();
    assert_one_line_error(&output, 125, "CMD");
}

#[test]
fn command_not_found_is_127_and_not_executable_is_126() {
    let output = agt_jail().args(["exec", "--", "/nonexistent/agt-jail-no-such-binary"]).output().unwrap();
    assert_one_line_error(&output, 127, "command not found");
    let plain = events_file("not-executable");
    std::fs::write(&plain, "echo not a program").unwrap();
    let output = agt_jail().args(["exec", "--"]).arg(&plain).output().unwrap();
    let _ = std::fs::remove_file(&plain);
    assert_one_line_error(&output, 126, "not executable");
}

#[test]
fn help_explains_exec() {
    let output = agt_jail().args(["exec", "--help"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("--deny-connect"), "{text}");
    assert!(text.contains("Exit status"), "{text}");
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn the_command_dies_with_a_killed_agt_jail_and_its_cgroup_is_swept() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    // Its BPF links close with agt-jail: a command that outlived it would run ungoverned.
    let mut supervisor =
        agt_jail().args(["exec", "--", "sh", "-c", "echo $$; exec sleep 300"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(supervisor.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let command: u32 = line.trim().parse().unwrap();
    assert!(alive(command));
    supervisor.kill().unwrap();
    supervisor.wait().unwrap();
    // Bounded wait for the kernel to deliver the parent-death signal (not a timing assertion).
    for _ in 0..200 {
        if !alive(command) {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!alive(command), "the command {command} outlived the killed agt-jail");

    // The next start removes the cgroup the killed agt-jail could not.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let layout = agt_jail_jail::CgroupLayout::parse(&mountinfo).unwrap();
    let stale = layout.agents_parent().join(agt_jail_jail::cgroup::cgroup_name(supervisor.id(), 0));
    assert!(agt_jail().args(["exec", "--", "true"]).status().unwrap().success());
    assert!(!stale.exists(), "{} was not swept", stale.display());
}
