//! Name-based egress end to end (docs/dns-egress.md): a ring-2 agent resolves through
//! agt-jail's resolver on its gateway, which asks a test upstream on the host's loopback.
//! The allowed name's address is reached; the same address without a lookup, another
//! name and a query to another resolver are denied, and all of it is on record.
#![allow(clippy::unwrap_used)]

use std::{
    net::Ipv4Addr,
    process::{Command, Output},
};

use agt_jail_test_support::{require, Need, RemoteHost, TestResolver};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
const PYTHON: &str = "/usr/bin/python3";
const NAME: &str = "api.agt-test.example";

/// One test at a time: the remote fixture and the agents' slots are shared host state.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What the agent does, one line each: a connect to the test server's address before any
/// lookup; the lookup of the allowed name and a connect by that name; a raw query for
/// another name to the agent's resolver (its response code); a raw query to another
/// resolver; an ICMP datagram socket; the allowed name over TCP to the agent's resolver;
/// the agent's resolv.conf.
fn probe(port: u16) -> String {
    format!(
        r##"
import errno, socket, struct
port = {port}
def err(e):
    return errno.errorcode.get(e.errno, str(e))
def connect(host):
    try:
        s = socket.create_connection((host, port), timeout=5)
        data = s.recv(5)
        s.close()
        return "ok " + data.decode()
    except OSError as e:
        return err(e)
def query(name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
gateway = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
print("direct", connect("203.0.113.2"))
try:
    found = sorted({{a[4][0] for a in socket.getaddrinfo("{NAME}", port, socket.AF_INET, socket.SOCK_STREAM)}})
    print("lookup", ",".join(found))
except socket.gaierror as e:
    print("lookup failed", e)
print("named", connect("{NAME}"))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(query("other.agt-test.example"), (gateway, 53))
print("other rcode", s.recv(512)[3] & 0xf)
try:
    s.sendto(query("{NAME}"), ("203.0.113.3", 53))
    print("other resolver ok")
except OSError as e:
    print("other resolver", err(e))
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    print("icmp ok")
except OSError as e:
    print("icmp", err(e))
t = socket.create_connection((gateway, 53), timeout=5)
q = query("{NAME}")
t.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", t.recv(2))[0]
a = b""
while len(a) < n:
    a += t.recv(n - len(a))
print("tcp rcode", a[3] & 0xf, "answers", struct.unpack(">H", a[6:8])[0])
print("resolv.conf", " ".join(l.strip() for l in open("/etc/resolv.conf") if not l.startswith("#")))
"##
    )
}

fn events(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn an_allowed_name_is_reached_and_everything_else_is_denied_on_record() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let remote = RemoteHost::start("dns");
    let listed: Ipv4Addr = RemoteHost::LISTED.parse().unwrap();
    let upstream = TestResolver::start(&[(NAME, listed)]);
    let dir = tempfile::tempdir().unwrap();
    let events_file = dir.path().join("events.jsonl");
    let output = Command::new(BIN)
        .args(["exec", "--ring", "2", "--allow-connect"])
        .arg(format!("{NAME}:{}", remote.port))
        .arg("--dns-upstream")
        .arg(upstream.addr.to_string())
        .arg("--events")
        .arg(&events_file)
        .arg("--audit")
        .arg(dir.path().join("run.audit"))
        .args(["--allow-exec", PYTHON, "--", PYTHON, "-c", &probe(remote.port)])
        .output()
        .unwrap();
    let (out, err) = text(&output);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}\n{err}");
    assert_eq!(
        lines[..8],
        [
            "direct EPERM",
            "lookup 203.0.113.2",
            "named ok hello",
            "other rcode 5",
            "other resolver EPERM",
            "icmp EPERM",
            "tcp rcode 0 answers 1",
            lines[7],
        ],
        "{out}\n{err}"
    );
    assert!(lines[7].starts_with("resolv.conf nameserver 10.") && !lines[7].contains("127."), "{}", lines[7]);
    assert!(output.status.success(), "{out}\n{err}");
    assert!(err.contains("refused DNS query for other.agt-test.example"), "{err}");
    assert!(upstream.queries() >= 1, "the allowed name was asked upstream");

    let records = events(&events_file);
    let dns = |name: &str, outcome: &str| {
        records.iter().find(|r| r["event"] == "dns" && r["name"] == name && r["outcome"] == outcome).cloned()
    };
    let answered = dns(NAME, "answered").unwrap_or_else(|| panic!("no answered record: {records:#?}"));
    assert_eq!(answered["addresses"], serde_json::json!(["203.0.113.2"]));
    assert_eq!(answered["ports"], serde_json::json!([remote.port]));
    assert_eq!(answered["qtype"], "A");
    let refused = dns("other.agt-test.example", "refused").unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!((refused["rcode"].as_str(), refused["verdict"].as_str()), (Some("REFUSED"), Some("deny")));
    let connects: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "connect" && r["addr"] == "203.0.113.2" && r["port"] == u64::from(remote.port))
        .collect();
    assert_eq!(connects.len(), 2, "{connects:#?}");
    assert_eq!(connects[0]["verdict"], "deny", "before the lookup: {connects:#?}");
    assert!(connects[0].get("domain").is_none());
    assert_eq!((connects[1]["verdict"].as_str(), connects[1]["domain"].as_str()), (Some("allow"), Some(NAME)));
    let to_resolver = records
        .iter()
        .find(|r| r["kind"] == "sendmsg" && r["addr"] == "203.0.113.3" && r["port"] == 53)
        .unwrap_or_else(|| panic!("no record of the query to another resolver: {records:#?}"));
    assert_eq!(to_resolver["verdict"], "deny");
    // The audit log holds the same records (its entries wrap them).
    let audit = std::fs::read_to_string(dir.path().join("run.audit")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains(r#""event":"dns""#) && l.contains(r#""outcome":"refused""#)),
        "no refused name in the audit log"
    );
    assert!(audit.lines().any(|l| l.contains(r#""outcome":"answered""#) && l.contains(NAME)));
}

const NAMES_POLICY: &str = "apiVersion: governance.toolkit/v1
name: names
description: egress by name through the agent's resolver
agents: ['*']
default_action: allow
rules:
  - name: api-by-name
    condition: \"event == 'connect' and net.domain == 'api.agt-test.example'\"
    action: allow
    priority: 500
  - name: resolver
    condition: \"event in ['connect', 'sendmsg'] and net.port == 53\"
    action: allow
    priority: 450
  - name: no-other-egress
    condition: \"event in ['connect', 'sendmsg'] and net.family in ['inet', 'inet6']\"
    action: deny
    priority: 400
";

/// Under a policy, the names its `net.domain` rules compare with are answered by the
/// agent's resolver (no `--allow-connect` for them) and the plan learns their addresses
/// from those answers, before the agent sees them: the host's own resolver does not know
/// the test name, so only the resolver's answer can make the plan allow the connect.
#[test]
fn a_policy_domain_is_opened_by_the_agents_resolver_and_the_plan_learns_its_address() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let remote = RemoteHost::start("dnsp");
    let upstream = TestResolver::start(&[(NAME, RemoteHost::LISTED.parse().unwrap())]);
    let dir = tempfile::tempdir().unwrap();
    let (policy, events_file) = (dir.path().join("names.yaml"), dir.path().join("events.jsonl"));
    std::fs::write(&policy, NAMES_POLICY).unwrap();
    let script = format!(
        "import errno, socket\n\
         try:\n    socket.create_connection(('203.0.113.2', {port}), timeout=5)\n    print('direct ok')\n\
         except OSError as e:\n    print('direct', errno.errorcode.get(e.errno))\n\
         s = socket.create_connection(('{NAME}', {port}), timeout=5)\nprint('named', s.recv(5).decode())\n\
         try:\n    socket.getaddrinfo('other.agt-test.example', {port})\n    print('other resolved')\n\
         except socket.gaierror:\n    print('other not resolved')\n",
        port = remote.port
    );
    let output = Command::new(BIN)
        .args(["exec", "--ring", "2", "--agent", "named", "--policy"])
        .arg(&policy)
        .arg("--dns-upstream")
        .arg(upstream.addr.to_string())
        .arg("--events")
        .arg(&events_file)
        .args(["--allow-exec", PYTHON, "--", PYTHON, "-c", &script])
        .output()
        .unwrap();
    let (out, err) = text(&output);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["direct EPERM", "named hello", "other not resolved"], "{out}\n{err}");
    assert!(!err.contains("did not resolve"), "no host-side resolution warning: {err}");
    let records = events(&events_file);
    let answered = records
        .iter()
        .find(|r| r["event"] == "dns" && r["name"] == NAME && r["outcome"] == "answered")
        .unwrap_or_else(|| panic!("{records:#?}"));
    assert_eq!(answered["ports"], serde_json::json!([0]), "every port: the plan decides");
    let allowed: Vec<&Value> = records.iter().filter(|r| r["matched_rule"] == "api-by-name").collect();
    assert!(
        allowed.iter().any(|r| r["context"]["net"]["domain"] == NAME && r["context"]["net"]["addr"] == "203.0.113.2"),
        "{records:#?}"
    );
    assert!(records
        .iter()
        .any(|r| r["event"] == "dns" && r["name"] == "other.agt-test.example" && r["outcome"] == "refused"));
    // Host-side polling of the policy's domains has no place where the resolver feeds them.
    let refused = Command::new(BIN)
        .args(["exec", "--ring", "2", "--agent", "named", "--dns-refresh", "10", "--policy"])
        .arg(&policy)
        .arg("--dns-upstream")
        .arg(upstream.addr.to_string())
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    let (_, err) = text(&refused);
    assert_eq!(refused.status.code(), Some(125), "{err}");
    assert!(err.contains("--dns-refresh polls the host's resolver"), "{err}");
}

#[test]
fn names_are_refused_where_no_resolver_of_agt_jails_serves_the_agent() {
    for (args, needle) in [
        (&["--ring", "3"][..], "ring 3 has no network"),
        (&["--ring", "0"][..], "needs a confined ring"),
        (&["--ring", "2", "--net", "none"][..], "needs network mode allowlist"),
    ] {
        let output = Command::new(BIN)
            .arg("exec")
            .args(args)
            .args(["--allow-connect", "api.example.com:443", "--", "/bin/true"])
            .output()
            .unwrap();
        let (_, err) = text(&output);
        assert_eq!(output.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Nor is an upstream for a resolver the run does not have (ring 3 never hands over to
    // the governing binary, so this is refused before any plane is chosen).
    for args in [&["--ring", "3"][..], &["--ring", "0"][..], &["--ring", "2", "--net", "none"][..]] {
        let output = Command::new(BIN)
            .arg("exec")
            .args(args)
            .args(["--dns-upstream", "127.0.0.1", "--", "/bin/true"])
            .output()
            .unwrap();
        let (_, err) = text(&output);
        assert_eq!(output.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains("--dns-upstream cannot be honoured"), "{args:?}: {err}");
    }
    for bad in ["*:443", "api.example.com", "api.example.com:0", "a..b:443"] {
        let output = Command::new(BIN)
            .args(["exec", "--ring", "2", "--allow-connect", bad, "--", "/bin/true"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(125), "{bad}: {}", text(&output).1);
    }
}
