//! `agt-jail daemon --metrics-listen`: the Prometheus endpoint end to end. An agent under a
//! policy hits a deny a known number of times; the scrape parses and says so (decisions by
//! action, denied calls, the latency histogram's count, agents by ring and tier); after a
//! kill -9 of the daemon the next one counts its start and the re-adoption, and the
//! agent's counters, kept by its supervisor, are still there.
#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agt_jail_test_support::{daemon::TestDaemon, require, Need};
use prometheus_parse::{Sample, Scrape, Value};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

fn start_daemon() -> TestDaemon {
    TestDaemon::start(BIN, "", &["--metrics-listen", "127.0.0.1:0"])
}

/// The address the daemon's last start logged for its metrics.
fn metrics_addr(daemon: &TestDaemon) -> String {
    let log = daemon.log_text();
    let line = log.lines().rev().find(|l| l.starts_with("metrics on http://")).expect("no metrics line");
    line.trim_start_matches("metrics on http://").trim_end_matches("/metrics").to_string()
}

/// `GET /metrics` over plain HTTP/1.1; the body, parsed, and its text.
fn scrape(addr: &str) -> (Scrape, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    (parsed, body.to_string())
}

fn number(value: &Value) -> f64 {
    match value {
        Value::Counter(n) | Value::Gauge(n) | Value::Untyped(n) => *n,
        other => panic!("not a number: {other:?}"),
    }
}

/// The sum of the samples of `name` whose labels include `labels`.
fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    matching.iter().map(|s| number(&s.value)).sum()
}

/// The histogram of `agent`: (its count, from the +Inf bucket; the count sample).
fn histogram_counts(scrape: &Scrape, text: &str, agent: &str) -> (f64, f64) {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == "agt_jail_decision_latency_seconds" && s.labels.get("agent") == Some(agent))
        .unwrap_or_else(|| panic!("no histogram for {agent}:\n{text}"));
    let Value::Histogram(buckets) = &sample.value else { panic!("not a histogram: {sample:?}") };
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap().count;
    let prefix = format!("agt_jail_decision_latency_seconds_count{{agent=\"{agent}\"}} ");
    let count = text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap().parse().unwrap();
    (inf, count)
}

const DENIES: usize = 3;

#[test]
fn the_metrics_endpoint_counts_decisions_and_a_restart() {
    if !require("daemon metrics", &[Need::Root, Need::CgroupV2, Need::Landlock, Need::Btf]) {
        return;
    }
    let mut daemon = start_daemon();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: governance.toolkit/v1\nname: metrics-test\nagents: [\"*\"]\ndefault_action: allow\nrules:\n  - \
         name: no-id\n    condition: \"event == 'exec' and exec.path endswith '/id'\"\n    action: deny\n    \
         priority: 100\n",
    )
    .unwrap();
    let events = dir.path().join("events.jsonl");
    let name = format!("mtest-{}", std::process::id());
    let script = format!("for i in $(seq {DENIES}); do /usr/bin/id >/dev/null 2>&1; done; exec /bin/sleep 600");
    let mut client = daemon
        .cmd(&["exec", "--ring", "2", "--agent", &name, "--policy", policy.to_str().unwrap(), "--events"])
        .arg(&events)
        .args(["--", "/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Until the agent's last exec (sleep) was decided: the denies all come before it.
    let addr = metrics_addr(&daemon);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (first, text) = loop {
        let (parsed, text) = scrape(&addr);
        let sleeps = std::fs::read_to_string(&events).unwrap_or_default().contains("/bin/sleep");
        if sleeps && sum(&parsed, "agt_jail_denied_calls_total", &[("agent", &name)]) >= DENIES as f64 {
            break (parsed, text);
        }
        assert!(Instant::now() < deadline, "the denies were never counted:\n{text}\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    let me = [("agent", name.as_str())];
    assert_eq!(sum(&first, "agt_jail_denied_calls_total", &me), DENIES as f64, "{text}");
    let deny = [("agent", name.as_str()), ("action", "deny")];
    assert_eq!(sum(&first, "agt_jail_decisions_total", &deny), DENIES as f64, "{text}");
    let allow = [("agent", name.as_str()), ("action", "allow")];
    assert!(sum(&first, "agt_jail_decisions_total", &allow) >= 1.0, "the sleep exec was allowed:\n{text}");
    // Every decision is in the histogram, and every decision record in the events file is counted.
    let decisions = sum(&first, "agt_jail_decisions_total", &me);
    let (inf, count) = histogram_counts(&first, &text, &name);
    assert_eq!((inf, count), (decisions, decisions), "{text}");
    // Kernel observations reach the file once per batch: it may trail the counters a moment.
    let recorded = || {
        let records = std::fs::read_to_string(&events).unwrap();
        let n = records
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["outcome"].is_string() && r["decision"].is_object())
            .count();
        (n, records)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (recorded, records) = loop {
        let (n, records) = recorded();
        if n as f64 >= decisions || Instant::now() > deadline {
            break (n, records);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(recorded as f64, decisions, "{records}\n{text}");
    assert_eq!(sum(&first, "agt_jail_agents", &[]), 1.0, "{text}");
    assert_eq!(sum(&first, "agt_jail_agents", &[("ring", "2")]), 1.0, "{text}");
    assert_eq!(sum(&first, "agt_jail_launches_total", &[]), 1.0, "{text}");
    assert_eq!(sum(&first, "agt_jail_daemon_starts_total", &[]), 1.0, "{text}");
    assert_eq!(sum(&first, "agt_jail_readoptions_total", &[]), 0.0, "{text}");
    assert_eq!(sum(&first, "agt_jail_agent_scrape_errors_total", &[]), 0.0, "{text}");
    assert!(text.contains("# TYPE agt_jail_decision_latency_seconds histogram\n"), "{text}");

    // The control API's Metrics reply carries the same numbers.
    use agt_jail_daemon::proto::{request::Op, response::Body};
    let reply =
        agt_jail_daemon::client::call(&daemon.run_dir.join("agt.sock"), Op::Metrics(Default::default())).unwrap().body;
    let Some(Body::Metrics(m)) = reply else { panic!("not metrics: {reply:?}") };
    assert_eq!((m.agents_running, m.launched, m.daemon_starts, m.adopted), (1, 1, 1, 0), "{m:?}");
    let api = Scrape::parse(m.exposition.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(sum(&api, "agt_jail_decisions_total", &deny), DENIES as f64, "{}", m.exposition);
    assert_eq!(sum(&api, "agt_jail_decisions_total", &me), decisions, "{}", m.exposition);

    // Other paths and methods are refused.
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");

    // kill -9 and a new daemon: one start more, one re-adoption, the agent's counters kept.
    daemon.kill9();
    daemon.spawn();
    let (second, text) = scrape(&metrics_addr(&daemon));
    assert_eq!(sum(&second, "agt_jail_daemon_starts_total", &[]), 2.0, "{text}");
    assert_eq!(sum(&second, "agt_jail_readoptions_total", &[]), 1.0, "{text}");
    assert_eq!(sum(&second, "agt_jail_launches_total", &[]), 0.0, "{text}");
    assert_eq!(sum(&second, "agt_jail_agents", &[]), 1.0, "{text}");
    assert_eq!(sum(&second, "agt_jail_decisions_total", &deny), DENIES as f64, "{text}");
    assert_eq!(sum(&second, "agt_jail_agent_scrape_errors_total", &[]), 0.0, "{text}");

    daemon.kill_and_wait(&name, &mut client);
}

/// An agent whose supervisor does not answer is a scrape error, and the scrape still comes.
#[test]
fn a_silent_agent_is_a_scrape_error_not_a_hang() {
    if !require("daemon metrics", &[Need::Root, Need::CgroupV2, Need::Landlock, Need::Btf]) {
        return;
    }
    let daemon = start_daemon();
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/coding-agent/policy.yaml");
    let name = format!("msilent-{}", std::process::id());
    let mut client = daemon
        .cmd(&["exec", "--ring", "2", "--agent", &name, "--policy", policy, "--", "/bin/sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = metrics_addr(&daemon);
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = daemon.run_dir.join("agents").join(format!("{name}.json"));
    loop {
        let (parsed, text) = scrape(&addr);
        if sum(&parsed, "agt_jail_decisions_total", &[("agent", &name)]) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never answered:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&record).unwrap()).unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    // SAFETY: SIGSTOP to the supervisor this test launched; SIGCONT below.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // The stop takes effect a moment later, thread by thread.
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stopped() {
        assert!(Instant::now() < deadline, "the supervisor never stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (parsed, text) = scrape(&addr);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(sum(&parsed, "agt_jail_agent_scrape_errors_total", &[]), 1.0, "{text}");
    assert_eq!(sum(&parsed, "agt_jail_agents", &[("tier", "none")]), 1.0, "counted, without its tier:\n{text}");
    daemon.kill_and_wait(&name, &mut client);
}

#[test]
fn a_non_loopback_metrics_address_is_refused() {
    let out = Command::new(BIN)
        .args(["daemon", "--metrics-listen", "0.0.0.0:9464", "--run-dir", "/nonexistent/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--metrics-listen 0.0.0.0:9464: not a loopback address"), "{err}");
}
