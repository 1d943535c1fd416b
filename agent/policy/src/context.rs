//! Builders for the OS event context, the one JSON shape every decision point evaluates: the
//! kernel-plane compiler ([`crate::plan`]), the synchronous userspace paths (seccomp
//! user-notification, fanotify) and `agt-jail policy eval`. Building contexts only here keeps
//! their key names and value forms identical everywhere:
//!
//! ```text
//! event                                   exec | file_open | file_write | create | mkdir | unlink | rename
//!                                         | connect | sendmsg | bind | ptrace | signal | mount | ...
//! agent.{id, did, ring, trust, tier, session}
//! proc.{pid, ppid, uid, comm, exe}
//! exec.{path, argv, interpreter}          interpreter: null when the file is not a script
//! file.{path, access}                     access: "read" | "write" | "read_write" | "create" | ...
//! net.{family, addr, port, protocol, domain}
//!                                         family "inet" | "inet6"; addr in Rust's `IpAddr` display form
//!                                         (IPv4-mapped IPv6 stays `::ffff:a.b.c.d`, family inet6);
//!                                         protocol "tcp" | "udp" | "other"; domain null when unknown
//! ptrace.{target_pid}   signal.{target_pid, signal}   mount.{source, target, fstype}
//! ```

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// AGT's trust tiers, highest first: (lowest score of the tier, name).
pub const TIERS: [(u32, &str); 5] =
    [(900, "verified_partner"), (700, "trusted"), (500, "standard"), (300, "probationary"), (0, "untrusted")];

/// The tier of a trust score (0..=1000): verified_partner ≥ 900, trusted ≥ 700, standard ≥ 500,
/// probationary ≥ 300, untrusted below.
pub fn tier_of(trust: u32) -> &'static str {
    TIERS.iter().find(|(min, _)| trust >= *min).map_or("untrusted", |(_, name)| name)
}

/// Who is acting: constant for an agent between trust changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFacts {
    pub id: String,
    pub did: String,
    pub ring: u8,
    pub trust: u32,
    pub tier: String,
    pub session: String,
}

impl AgentFacts {
    /// Facts with the tier derived from `trust` (see [`tier_of`]).
    pub fn new(
        id: impl Into<String>,
        did: impl Into<String>,
        ring: u8,
        trust: u32,
        session: impl Into<String>,
    ) -> AgentFacts {
        AgentFacts {
            id: id.into(),
            did: did.into(),
            ring,
            trust,
            tier: tier_of(trust).to_string(),
            session: session.into(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "did": self.did,
            "ring": self.ring,
            "trust": self.trust,
            "tier": self.tier,
            "session": self.session,
        })
    }
}

/// The acting process, as the kernel reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcFacts {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    pub exe: String,
}

impl ProcFacts {
    fn to_json(&self) -> Value {
        json!({"pid": self.pid, "ppid": self.ppid, "uid": self.uid, "comm": self.comm, "exe": self.exe})
    }
}

/// File events, by the `event` value they produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileEvent {
    /// `file_open`
    Open,
    /// `file_write`
    Write,
    /// `unlink`
    Unlink,
    /// `rename`
    Rename,
    /// `create` (a new regular file)
    Create,
    /// `mkdir`
    Mkdir,
}

impl FileEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            FileEvent::Open => "file_open",
            FileEvent::Write => "file_write",
            FileEvent::Unlink => "unlink",
            FileEvent::Rename => "rename",
            FileEvent::Create => "create",
            FileEvent::Mkdir => "mkdir",
        }
    }
}

/// Network events; `code` is the value the kernel tables use (netplan: 1 connect, 2 sendmsg, 3 bind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetEvent {
    Connect,
    Sendmsg,
    Bind,
}

impl NetEvent {
    pub const ALL: [NetEvent; 3] = [NetEvent::Connect, NetEvent::Sendmsg, NetEvent::Bind];

    pub fn as_str(self) -> &'static str {
        match self {
            NetEvent::Connect => "connect",
            NetEvent::Sendmsg => "sendmsg",
            NetEvent::Bind => "bind",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            NetEvent::Connect => 1,
            NetEvent::Sendmsg => 2,
            NetEvent::Bind => 3,
        }
    }

    pub fn from_code(c: u8) -> Option<NetEvent> {
        NetEvent::ALL.into_iter().find(|e| e.code() == c)
    }
}

/// Socket address family of an IP event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetFamily {
    /// `inet` (AF_INET)
    Inet,
    /// `inet6` (AF_INET6, including IPv4-mapped destinations)
    Inet6,
}

impl NetFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            NetFamily::Inet => "inet",
            NetFamily::Inet6 => "inet6",
        }
    }

    /// The family an address of this form is sent on (a mapped IPv4 address is still inet6).
    pub fn of(addr: &IpAddr) -> NetFamily {
        match addr {
            IpAddr::V4(_) => NetFamily::Inet,
            IpAddr::V6(_) => NetFamily::Inet6,
        }
    }
}

/// Transport protocol; `code` is the IP protocol number the kernel tables use (0 = other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NetProto {
    Tcp,
    Udp,
    Other,
}

impl NetProto {
    pub const ALL: [NetProto; 3] = [NetProto::Tcp, NetProto::Udp, NetProto::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            NetProto::Tcp => "tcp",
            NetProto::Udp => "udp",
            NetProto::Other => "other",
        }
    }

    pub fn code(self) -> u8 {
        match self {
            NetProto::Tcp => 6,
            NetProto::Udp => 17,
            NetProto::Other => 0,
        }
    }

    /// IPPROTO_TCP → tcp, IPPROTO_UDP → udp, anything else → other.
    pub fn from_ip_proto(p: u8) -> NetProto {
        match p {
            6 => NetProto::Tcp,
            17 => NetProto::Udp,
            _ => NetProto::Other,
        }
    }
}

fn base(agent: &AgentFacts, proc: &ProcFacts, event: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("event".into(), Value::String(event.to_string()));
    m.insert("agent".into(), agent.to_json());
    m.insert("proc".into(), proc.to_json());
    m
}

/// `event` plus `agent` and `proc`, for events without their own section (bpf, module, keyring...).
pub fn event_context(agent: &AgentFacts, proc: &ProcFacts, event: &str) -> Value {
    Value::Object(base(agent, proc, event))
}

/// An `exec` event: the file the kernel runs, its argv, and the script interpreter if any.
pub fn exec_context<S: AsRef<str>>(
    agent: &AgentFacts,
    proc: &ProcFacts,
    path: &str,
    argv: &[S],
    interpreter: Option<&str>,
) -> Value {
    let mut m = base(agent, proc, "exec");
    let argv: Vec<Value> = argv.iter().map(|a| Value::String(a.as_ref().to_string())).collect();
    m.insert("exec".into(), json!({"path": path, "argv": argv, "interpreter": interpreter}));
    Value::Object(m)
}

/// A file event; `access` is "read", "write", "read_write", "create", "delete", ...
pub fn file_context(agent: &AgentFacts, proc: &ProcFacts, event: FileEvent, path: &str, access: &str) -> Value {
    let mut m = base(agent, proc, event.as_str());
    m.insert("file".into(), json!({"path": path, "access": access}));
    Value::Object(m)
}

/// An IP network event. `addr` is rendered with `IpAddr`'s display form, the only form a policy
/// ever sees (`10.0.0.1`, `2001:db8::1`, `::ffff:10.0.0.1`); `domain` is the name the address was
/// resolved from, when known.
// Every argument is one context field; a parameter struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn net_context(
    agent: &AgentFacts,
    proc: &ProcFacts,
    event: NetEvent,
    family: NetFamily,
    protocol: NetProto,
    addr: IpAddr,
    port: u16,
    domain: Option<&str>,
) -> Value {
    let mut m = base(agent, proc, event.as_str());
    m.insert(
        "net".into(),
        json!({
            "family": family.as_str(),
            "addr": addr.to_string(),
            "port": port,
            "protocol": protocol.as_str(),
            "domain": domain,
        }),
    );
    Value::Object(m)
}

/// A `ptrace` attempt on `target_pid`.
pub fn ptrace_context(agent: &AgentFacts, proc: &ProcFacts, target_pid: u32) -> Value {
    let mut m = base(agent, proc, "ptrace");
    m.insert("ptrace".into(), json!({"target_pid": target_pid}));
    Value::Object(m)
}

/// A `signal` sent to `target_pid`.
pub fn signal_context(agent: &AgentFacts, proc: &ProcFacts, target_pid: u32, signal: i32) -> Value {
    let mut m = base(agent, proc, "signal");
    m.insert("signal".into(), json!({"target_pid": target_pid, "signal": signal}));
    Value::Object(m)
}

/// A `mount` attempt.
pub fn mount_context(agent: &AgentFacts, proc: &ProcFacts, source: &str, target: &str, fstype: &str) -> Value {
    let mut m = base(agent, proc, "mount");
    m.insert("mount".into(), json!({"source": source, "target": target, "fstype": fstype}));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn agent() -> AgentFacts {
        AgentFacts::new("coder", "did:mesh:00112233445566778899aabbccddeeff", 2, 640, "s-1")
    }

    fn proc() -> ProcFacts {
        ProcFacts { pid: 42, ppid: 1, uid: 1000, comm: "python3".into(), exe: "/usr/bin/python3".into() }
    }

    #[test]
    fn tiers_follow_the_design_boundaries() {
        for (t, name) in [
            (1000, "verified_partner"),
            (900, "verified_partner"),
            (899, "trusted"),
            (700, "trusted"),
            (699, "standard"),
            (500, "standard"),
            (499, "probationary"),
            (300, "probationary"),
            (299, "untrusted"),
            (0, "untrusted"),
        ] {
            assert_eq!(tier_of(t), name, "{t}");
        }
        assert_eq!(agent().tier, "standard");
    }

    #[test]
    fn shapes() {
        let e = exec_context(&agent(), &proc(), "/usr/bin/git", &["git", "push"], None);
        assert_eq!(e["event"], "exec");
        assert_eq!(e["agent"]["ring"], 2);
        assert_eq!(e["agent"]["trust"], 640);
        assert_eq!(e["agent"]["tier"], "standard");
        assert_eq!(e["agent"]["session"], "s-1");
        assert_eq!(e["proc"], json!({"pid": 42, "ppid": 1, "uid": 1000, "comm": "python3", "exe": "/usr/bin/python3"}));
        assert_eq!(e["exec"], json!({"path": "/usr/bin/git", "argv": ["git", "push"], "interpreter": null}));
        let f = file_context(&agent(), &proc(), FileEvent::Write, "/w/x", "write");
        assert_eq!(f["event"], "file_write");
        assert_eq!(f["file"], json!({"path": "/w/x", "access": "write"}));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let n = net_context(&agent(), &proc(), NetEvent::Sendmsg, NetFamily::Inet6, NetProto::Udp, mapped, 53, None);
        assert_eq!(
            n["net"],
            json!({"family": "inet6", "addr": "::ffff:10.1.2.3", "port": 53, "protocol": "udp", "domain": null})
        );
        assert_eq!(n["event"], "sendmsg");
        assert_eq!(ptrace_context(&agent(), &proc(), 7)["ptrace"]["target_pid"], 7);
        assert_eq!(signal_context(&agent(), &proc(), 7, 9)["signal"]["signal"], 9);
        assert_eq!(mount_context(&agent(), &proc(), "none", "/mnt", "tmpfs")["event"], "mount");
        assert_eq!(event_context(&agent(), &proc(), "bpf")["event"], "bpf");
    }

    #[test]
    fn codes_match_the_kernel_tables() {
        assert_eq!(NetEvent::ALL.map(NetEvent::code), [1, 2, 3]);
        assert_eq!(NetProto::ALL.map(NetProto::code), [6, 17, 0]);
        assert_eq!(NetProto::from_ip_proto(132), NetProto::Other);
        assert_eq!(NetEvent::from_code(3), Some(NetEvent::Bind));
    }

    #[test]
    fn shipped_policies_decide_on_built_contexts() {
        use crate::{EvalOptions, PolicySet};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/coding-agent/policy.yaml");
        let set = PolicySet::load(&[dir]).unwrap();
        let o = EvalOptions::default();
        let rm = exec_context(&agent(), &proc(), "/bin/rm", &["rm", "-rf", "/"], None);
        assert_eq!(set.evaluate(&rm, &o).action, crate::Action::Kill);
        let key = file_context(&agent(), &proc(), FileEvent::Open, "/home/u/.ssh/id_rsa", "read");
        assert_eq!(set.evaluate(&key, &o).matched_rule.as_deref(), Some("block-credential-access"));
        let lo = net_context(
            &agent(),
            &proc(),
            NetEvent::Connect,
            NetFamily::Inet,
            NetProto::Tcp,
            "127.0.0.1".parse().unwrap(),
            8080,
            None,
        );
        assert_eq!(set.evaluate(&lo, &o).matched_rule.as_deref(), Some("allow-loopback"));
        let out = net_context(
            &agent(),
            &proc(),
            NetEvent::Connect,
            NetFamily::Inet,
            NetProto::Tcp,
            "203.0.113.9".parse().unwrap(),
            443,
            Some("exfil.example"),
        );
        assert_eq!(set.evaluate(&out, &o).matched_rule.as_deref(), Some("block-other-egress"));
    }
}
