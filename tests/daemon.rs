//! `agt-jail daemon` end to end: launches through the socket, the list, the kill switch,
//! peer authorisation, a jail that cannot reach the socket, and agents that survive a
//! kill -9 of the daemon and are adopted by the next one.
//!
//! Each test runs its own daemon with a runtime directory under /run/agt-jail (so the
//! jails' view hides it as it hides the real one) and points the commands at it with
//! AGT_JAIL_SOCKET; other `agt-jail exec` runs on the machine are not affected.
#![allow(clippy::unwrap_used)]

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use agt_jail_test_support::{
    daemon::{TestDaemon, TEST_GID},
    require, Need,
};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

fn start_daemon(members: &str) -> TestDaemon {
    TestDaemon::start(BIN, members, &[])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_launch_through_the_socket_returns_the_agents_output_and_exit_status() {
    if !require("daemon launch", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    let daemon = start_daemon("");
    let out: Output = daemon
        .cmd(&["exec", "--ring", "2", "--", "/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-stdout\n");
    assert!(text(&out.stderr).contains("to-stderr"), "{}", text(&out.stderr));
    assert_eq!(daemon.log_text().matches("launched for uid 0").count(), 1, "{}", daemon.log_text());
    assert!(daemon.log_text().contains("ended with status 7"), "{}", daemon.log_text());

    // The supervisor's own refusals keep their exit status and their line.
    let out = daemon.cmd(&["exec", "--ring", "3", "--rw", "/tmp", "--", "/bin/true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--rw"), "{}", text(&out.stderr));

    // --standalone runs here: the daemon launches nothing more.
    let out = daemon.cmd(&["exec", "--standalone", "--", "/bin/sh", "-c", "exit 3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(daemon.log_text().matches("launched for uid 0").count(), 2, "{}", daemon.log_text());
}

#[test]
fn the_list_shows_a_running_agent_and_kill_ends_it() {
    if !require("daemon list and kill", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    let daemon = start_daemon("");
    let mut agent = daemon.cmd(&["exec", "--ring", "2", "--", "/bin/sleep", "3001"]).spawn().unwrap();
    let name = daemon.wait_listed("/bin/sleep 3001");
    assert!(name.starts_with("agent-"), "{name}");
    let record = daemon.run_dir.join(format!("agents/{name}.json"));
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!((saved["ring"].as_u64(), saved["command"][1].as_str()), (Some(2), Some("3001")), "{saved}");
    let out = daemon.cmd(&["kill", "--agent", &name]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("agt-jail: killed agent {name}"));
    let status = wait_exit(&mut agent, Duration::from_secs(30)).expect("the killed agent's exec never ended");
    assert_eq!(status.code(), Some(137));
    assert!(!daemon.ps().contains("/bin/sleep 3001"));
    assert!(!record.exists(), "the record outlived the agent");
    let out = daemon.cmd(&["kill", "--agent", &name]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains(&format!("no agent \"{name}\" is running")), "{}", text(&out.stderr));
}

#[test]
fn another_uid_is_refused_with_a_clear_message_and_a_member_is_served() {
    if !require("daemon peers", &[Need::Root]) {
        return;
    }
    // util-linux's setpriv runs the client as another uid (test guests may lack it).
    let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().find(|p| Path::new(p).exists()) else {
        agt_jail_test_support::program_missing("daemon peers", "no setpriv (util-linux) to run a client as uid 65534");
        return;
    };
    let daemon = start_daemon("");
    let meta = std::fs::metadata(daemon.socket()).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, TEST_GID, 0o660));
    // Open the file mode so that only SO_PEERCRED stands between uid 65534 and the API.
    std::fs::set_permissions(daemon.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(setpriv)
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", BIN, "ps"])
        .env("AGT_JAIL_SOCKET", daemon.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).trim(),
        "agt-jail: permission denied: uid 65534 may not use the agt-jail daemon (only root and members of the \
         group agt-jail may)"
    );
    assert!(daemon.log_text().contains("refused pid"), "{}", daemon.log_text());

    // The same uid as a member of the group (supplementary) is served.
    let out = Command::new(setpriv)
        .args(["--reuid", "65534", "--regid", "65534", "--groups", &TEST_GID.to_string(), BIN, "ps"])
        .env("AGT_JAIL_SOCKET", daemon.socket())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("AGENT"), "{}", text(&out.stdout));
    // A member may not launch: the agent would run with root's authority.
    let out = Command::new(setpriv)
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--groups",
            &TEST_GID.to_string(),
            BIN,
            "exec",
            "--",
            "/bin/true",
        ])
        .env("AGT_JAIL_SOCKET", daemon.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("agt-jail: permission denied: uid 65534 may not launch"),
        "{}",
        text(&out.stderr)
    );
    assert!(!daemon.log_text().contains("launched for uid 65534"), "{}", daemon.log_text());
}

#[test]
fn a_ring_2_jail_cannot_reach_the_socket() {
    if !require("daemon hidden from jails", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    let daemon = start_daemon("");
    let probe = format!(
        "if [ -S {0} ]; then echo visible; else echo hidden; fi; ls -A /run/agt-jail",
        daemon.socket().display()
    );
    // Ring 0 sees the host's /run: the probe finds the socket there.
    let out = daemon.cmd(&["exec", "--standalone", "--", "/bin/sh", "-c", &probe]).output().unwrap();
    assert!(text(&out.stdout).starts_with("visible\n"), "{}{}", text(&out.stdout), text(&out.stderr));
    // Ring 2 with /run shown, and with the daemon's directory itself asked for: hidden.
    for extra in [["--ro", "/run"], ["--ro", "/run/agt-jail"]] {
        let mut args = vec!["exec", "--standalone", "--ring", "2"];
        args.extend(extra);
        args.extend(["--", "/bin/sh", "-c", &probe]);
        let out = daemon.cmd(&args).output().unwrap();
        assert_eq!(text(&out.stdout), "hidden\n", "{extra:?}: {}", text(&out.stderr));
    }
    // Under a policy the agent's own identity socket is bound inside the directory: that
    // path alone is shown, the rest stays hidden.
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/coding-agent/policy.yaml");
    let out = daemon
        .cmd(&[
            "exec",
            "--standalone",
            "--ring",
            "2",
            "--ro",
            "/run",
            "--policy",
            policy,
            "--",
            "/bin/sh",
            "-c",
            &probe,
        ])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "hidden\nidentity\n", "{}", text(&out.stderr));
}

/// The agents' loop: a connect to the denied port every 200 ms, its outcome appended to FILE.
fn looping_agent(port: u16, file: &Path) -> String {
    format!(
        "while :; do if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>>{f}; then echo allowed >> {f}; fi; sleep 0.2; done",
        f = file.display()
    )
}

fn listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

#[test]
fn agents_outlive_a_kill_9_of_the_daemon_keep_enforcing_and_are_adopted() {
    if !require("daemon restart", &[Need::Root, Need::CgroupV2, Need::Btf]) {
        return;
    }
    const AGENTS: usize = 10;
    let mut daemon = start_daemon("");
    let port = listener();
    let dir = tempfile::tempdir().unwrap();
    let mut clients = Vec::new();
    let mut names = Vec::new();
    for i in 0..AGENTS {
        let file = dir.path().join(format!("agent-{i}.out"));
        let script = looping_agent(port, &file);
        let marker = format!("marker-{i}-{}", std::process::id());
        let events = dir.path().join(format!("agent-{i}.events"));
        let client = daemon
            .cmd(&["exec", "--deny-connect", &format!("127.0.0.1:{port}"), "--events"])
            .arg(&events)
            .arg("--")
            .args(["/bin/bash", "-c", &format!("{script} # {marker}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        clients.push((client, file));
        names.push(daemon.wait_listed(&format!("# marker-{i}-")));
    }
    // Each agent tried and was refused before the daemon goes.
    let denied_lines = |file: &Path| {
        let t = std::fs::read_to_string(file).unwrap_or_default();
        assert!(!t.contains("allowed"), "a denied connect went through: {t}");
        t.matches("Operation not permitted").count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while clients.iter().any(|(_, f)| denied_lines(f) == 0) {
        assert!(Instant::now() < deadline, "agents never tried to connect");
        std::thread::sleep(Duration::from_millis(100));
    }

    daemon.kill9();
    let before: Vec<usize> = clients.iter().map(|(_, f)| denied_lines(f)).collect();
    std::thread::sleep(Duration::from_secs(2));
    // While no daemon runs: every agent still runs, and its connects are still refused.
    for (i, (client, file)) in clients.iter_mut().enumerate() {
        assert!(client.try_wait().unwrap().is_none(), "agent {i}'s client ended with the daemon");
        assert!(denied_lines(file) > before[i], "agent {i} stopped trying (or stopped being refused)");
    }

    // A record whose supervisor is gone is dropped at start, with a line saying so.
    let mut gone = Command::new("/bin/true").spawn().unwrap();
    gone.wait().unwrap();
    let ghost = daemon.run_dir.join("agents/ghost.json");
    let record = serde_json::json!({"agent": "ghost", "pid": gone.id(), "start_ticks": 1, "started": 0, "ring": 0,
                                    "policy": false, "events": null, "command": ["x"]});
    std::fs::write(&ghost, record.to_string()).unwrap();
    daemon.spawn();
    let log = daemon.log_text();
    assert!(log.contains("agent ghost dropped: its supervisor"), "{log}");
    assert!(!ghost.exists());
    assert_eq!(log.matches(" adopted (supervisor pid").count(), AGENTS, "{log}");
    let ps = daemon.ps();
    for name in &names {
        assert!(ps.contains(name.as_str()), "{name} not listed after the restart:\n{ps}");
    }
    // The kill switch works through the new daemon, which is not the supervisors' parent.
    let out = daemon.cmd(&["kill", "--agent", &names[0]]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = wait_exit(&mut clients[0].0, Duration::from_secs(30)).expect("killed agent's client never ended");
    // The exit status went to the daemon that was killed: the client says so with 125.
    assert_eq!(status.code(), Some(125));
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.ps().contains(names[0].as_str()) {
        assert!(Instant::now() < deadline, "killed agent still listed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.log_text().contains(&format!("agent {} ended (adopted", names[0])), "{}", daemon.log_text());
    for name in &names[1..] {
        let out = daemon.cmd(&["kill", "--agent", name]).output().unwrap();
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
    for (client, _) in &mut clients[1..] {
        assert!(wait_exit(client, Duration::from_secs(30)).is_some(), "a killed agent's client never ended");
    }
    // None lost: every connect the kernel refused (each agent wrote one line per EPERM it
    // got, before and after the daemon's death) is a deny record of its supervisor's. The
    // kill can land between a refusal and its line, so a record may be one ahead.
    for (i, (_, file)) in clients.iter().enumerate() {
        // Each client ended after its supervisor did, so the file is whole.
        let text = std::fs::read_to_string(dir.path().join(format!("agent-{i}.events"))).unwrap_or_default();
        let records: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let denies =
            records.iter().filter(|r| r["kind"] == "connect" && r["verdict"] == "deny" && r["port"] == port).count();
        let drops: u64 = records
            .iter()
            .filter(|r| r["event"] == "kernel_drops")
            .filter_map(|r| Some(r["events_dropped"].as_u64()? + r["denies_dropped"].as_u64()?))
            .sum();
        // bash says each refusal twice ("connect: ..." and "/dev/tcp/...: ..."): count one.
        let refused =
            std::fs::read_to_string(file).unwrap_or_default().matches("connect: Operation not permitted").count();
        assert_eq!(drops, 0, "agent {i}: the kernel dropped records");
        assert!(
            denies == refused || denies == refused + 1,
            "agent {i}: {refused} connects refused, {denies} deny records of {} records",
            records.len()
        );
    }
}

#[test]
fn events_status_and_demote_go_through_the_daemon() {
    if !require("daemon events and control", &[Need::Root, Need::CgroupV2, Need::Landlock, Need::Btf]) {
        return;
    }
    let daemon = start_daemon("");
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/coding-agent/policy.yaml");
    let name = format!("dtest-{}", std::process::id());
    let mut agent = daemon
        .cmd(&["exec", "--ring", "2", "--agent", &name, "--policy", policy, "--events"])
        .arg(&events)
        .args(["--", "/bin/sh", "-c", "while :; do /bin/true; sleep 0.3; done"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(daemon.wait_listed(&name), name);

    // The supervisor's evaluator answers through the daemon (once its control socket is up:
    // until then the daemon answers from its record).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let out = daemon.cmd(&["status", "--agent", &name]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["ring"], 2, "{status}");
        if status["did"].is_string() {
            break status;
        }
        assert!(Instant::now() < deadline, "the supervisor's control socket never answered: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status["did"].as_str().unwrap().starts_with("did:mesh:"), "{status}");
    let out = daemon.cmd(&["demote", "--agent", &name, "--ring", "3"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("agt-jail: agent {name} is now in ring 3"));
    let out = daemon.cmd(&["demote", "--agent", &name, "--ring", "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a ring lower than its own is the agent's refusal");
    let out = daemon.cmd(&["approve", "--agent", &name, "99"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "no held request 99: {}", text(&out.stderr));

    // The records written so far, then following: new ones arrive, and the stream ends with the agent.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let out = daemon.cmd(&["events", "--agent", &name]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        if let Some(line) = text(&out.stdout).lines().next() {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no records");
        std::thread::sleep(Duration::from_millis(200));
    };
    let record: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert!(record.is_object(), "{first}");
    // Every agent's records when no agent is named.
    let out = daemon.cmd(&["events"]).output().unwrap();
    assert!(text(&out.stdout).lines().count() > 0, "{}", text(&out.stderr));
    let mut follow =
        daemon.cmd(&["events", "-f", "--agent", &name]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Read on a thread: a reader that stops reading would hold the stream (and the test) up.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let _ = tx.send(line.unwrap());
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("no record followed");
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(!record["agent_id"].is_null(), "{line}");
    let out = daemon.cmd(&["kill", "--agent", &name]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(wait_exit(&mut agent, Duration::from_secs(30)).is_some(), "killed agent never ended");
    let status = wait_exit(&mut follow, Duration::from_secs(30)).expect("events -f did not end with the agent");
    assert!(status.success());
}

#[test]
fn signals_to_the_client_reach_the_agent_and_metrics_count() {
    if !require("daemon signals", &[Need::Root, Need::CgroupV2, Need::Landlock]) {
        return;
    }
    use agt_jail_daemon::proto::{request::Op, response::Body};
    let daemon = start_daemon("");
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!("touch {}; while :; do sleep 0.1; done # sigtest", ready.display());
    let mut agent = daemon
        .cmd(&["exec", "--ring", "2", "--workspace", dir.path().to_str().unwrap(), "--", "/bin/sh", "-c", &script])
        .spawn()
        .unwrap();
    daemon.wait_listed("# sigtest");
    // The command runs (its supervisor forwards signals from before it starts it).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the agent never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The supervisor is in a session of its own: only the client's forwarding reaches it.
    let metrics =
        |daemon: &TestDaemon| match agt_jail_daemon::client::call(&daemon.socket(), Op::Metrics(Default::default()))
            .unwrap()
            .body
        {
            Some(Body::Metrics(m)) => m,
            other => panic!("not metrics: {other:?}"),
        };
    let before = metrics(&daemon);
    assert_eq!((before.agents_running, before.launched, before.exited), (1, 1, 0), "{before:?}");
    // SAFETY: SIGTERM to our own child, which has not been waited for.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut agent, Duration::from_secs(30)).expect("SIGTERM did not end the agent");
    // The client was not killed by the signal (its status would be the signal, not a
    // code): it forwarded it and exits with the agent's status, 128+15 as standalone.
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert!(daemon.log_text().contains("ended with status 143"), "{}", daemon.log_text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while metrics(&daemon).exited == 0 {
        assert!(Instant::now() < deadline, "the end was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = metrics(&daemon);
    assert_eq!(after.agents_running, 0, "{after:?}");
    assert!(after.requests > before.requests, "{after:?}");
}

#[test]
fn the_daemon_tells_systemd_ready_watchdog_and_stopping() {
    if !require("daemon sd_notify", &[Need::Root]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut daemon = TestDaemon::start_with(
        BIN,
        "",
        &[],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap()), ("WATCHDOG_USEC", "200000")],
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = listener.recv(&mut buf).expect("no notification");
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    };
    // READY=1 only once the socket listens (the helper waited for the log's "ready:").
    got.push(next());
    assert_eq!(got[0], "READY=1", "{got:?}");
    got.push(next());
    assert_eq!(got[1], "WATCHDOG=1", "{got:?}");
    let child = daemon.take_child().unwrap();
    // SAFETY: SIGTERM to our own child, which has not been waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopping = loop {
        let message = next();
        if message != "WATCHDOG=1" {
            break message;
        }
    };
    assert_eq!(stopping, "STOPPING=1");
    let mut child = child;
    let status = wait_exit(&mut child, Duration::from_secs(30)).expect("the daemon did not stop on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!daemon.socket().exists(), "the socket outlived the daemon");
}
