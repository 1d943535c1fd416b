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

/// A network event context filled in place, for the stream of kernel network events: the
/// [`Value`] the policy kernel reads is updated field by field (no tree is built and dropped per
/// event), and [`Self::write_json`] writes it from the `agent` and `proc` sections serialised
/// when they change. Value and bytes are those of [`net_context`] and `serde_json::to_writer`
/// of it for the same facts.
#[derive(Debug, Clone)]
pub struct NetContextBuf {
    value: Value,
    agent: AgentFacts,
    agent_json: Vec<u8>,
    proc: ProcFacts,
    proc_json: Vec<u8>,
    event: NetEvent,
}

impl Default for NetContextBuf {
    fn default() -> Self {
        NetContextBuf::new()
    }
}

impl NetContextBuf {
    /// A context for default agent and process facts and a connect to `0.0.0.0:0`.
    pub fn new() -> NetContextBuf {
        let agent = AgentFacts::default();
        let proc = ProcFacts::default();
        let unspecified = IpAddr::from([0, 0, 0, 0]);
        let value = net_context(&agent, &proc, NetEvent::Connect, NetFamily::Inet, NetProto::Tcp, unspecified, 0, None);
        let agent_json = section_json(&value, "agent");
        let proc_json = section_json(&value, "proc");
        NetContextBuf { value, agent, agent_json, proc, proc_json, event: NetEvent::Connect }
    }

    /// Sets the `agent` section (nothing is done when it is unchanged).
    pub fn set_agent(&mut self, agent: &AgentFacts) {
        if self.agent == *agent {
            return;
        }
        self.agent.clone_from(agent);
        if let Some(section) = self.value.get_mut("agent") {
            *section = agent.to_json();
        }
        self.agent_json = section_json(&self.value, "agent");
    }

    /// Sets the `proc` section (nothing is done when it is unchanged).
    pub fn set_proc(&mut self, pid: u32, ppid: u32, uid: u32, comm: &str, exe: &str) {
        let p = &self.proc;
        if p.pid == pid && p.ppid == ppid && p.uid == uid && p.comm == comm && p.exe == exe {
            return;
        }
        let p = &mut self.proc;
        (p.pid, p.ppid, p.uid) = (pid, ppid, uid);
        replace_str(&mut p.comm, comm);
        replace_str(&mut p.exe, exe);
        if let Some(Value::Object(section)) = self.value.get_mut("proc") {
            put_u64(section, "pid", u64::from(pid));
            put_u64(section, "ppid", u64::from(ppid));
            put_u64(section, "uid", u64::from(uid));
            put_str(section, "comm", comm);
            put_str(section, "exe", exe);
        }
        self.proc_json = section_json(&self.value, "proc");
    }

    /// Sets `event` and the `net` section.
    pub fn set_net(
        &mut self,
        event: NetEvent,
        family: NetFamily,
        protocol: NetProto,
        addr: IpAddr,
        port: u16,
        domain: Option<&str>,
    ) {
        use std::fmt::Write as _;
        self.event = event;
        let Value::Object(ctx) = &mut self.value else { return };
        put_str(ctx, "event", event.as_str());
        let Some(Value::Object(net)) = ctx.get_mut("net") else { return };
        put_str(net, "family", family.as_str());
        put_str(net, "protocol", protocol.as_str());
        put_u64(net, "port", u64::from(port));
        if let Some(Value::String(text)) = net.get_mut("addr") {
            text.clear();
            // Writing into a String does not fail.
            let _ = write!(text, "{addr}");
        }
        match (net.get_mut("domain"), domain) {
            (Some(Value::String(text)), Some(name)) => replace_str(text, name),
            (Some(slot), name) => *slot = name.map_or(Value::Null, |n| Value::String(n.to_string())),
            (None, _) => {}
        }
    }

    /// The context as the policy kernel reads it.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The agent last set.
    pub fn agent(&self) -> &AgentFacts {
        &self.agent
    }

    /// The event last set.
    pub fn event(&self) -> NetEvent {
        self.event
    }

    /// Appends the context's JSON: the bytes `serde_json::to_writer` writes for [`Self::value`].
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let Value::Object(ctx) = &self.value else { return };
        out.push(b'{');
        for (i, (key, section)) in ctx.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Serialising strings and JSON trees into a Vec does not fail.
            let _ = serde_json::to_writer(&mut *out, key);
            out.push(b':');
            match key.as_str() {
                "agent" => out.extend_from_slice(&self.agent_json),
                "proc" => out.extend_from_slice(&self.proc_json),
                _ => {
                    let _ = serde_json::to_writer(&mut *out, section);
                }
            }
        }
        out.push(b'}');
    }
}

fn section_json(ctx: &Value, key: &str) -> Vec<u8> {
    // Serialising a JSON tree into a Vec does not fail.
    serde_json::to_vec(&ctx[key]).unwrap_or_default()
}

fn replace_str(slot: &mut String, text: &str) {
    if slot != text {
        slot.clear();
        slot.push_str(text);
    }
}

/// Sets `key` to the string `text`, reusing the string already there.
fn put_str(map: &mut Map<String, Value>, key: &str, text: &str) {
    match map.get_mut(key) {
        Some(Value::String(slot)) => replace_str(slot, text),
        Some(slot) => *slot = Value::String(text.to_string()),
        None => {
            map.insert(key.to_string(), Value::String(text.to_string()));
        }
    }
}

fn put_u64(map: &mut Map<String, Value>, key: &str, n: u64) {
    match map.get_mut(key) {
        Some(slot) => *slot = Value::from(n),
        None => {
            map.insert(key.to_string(), Value::from(n));
        }
    }
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
    fn a_context_filled_in_place_is_the_built_one_value_and_bytes() {
        let mut buf = NetContextBuf::new();
        let other = AgentFacts::new("other", "did:mesh:ff", 3, 120, "s-2");
        let procs = [proc(), ProcFacts { pid: 7, ppid: 42, uid: 0, comm: "c\"url\n".into(), exe: "/usr/bin/é".into() }];
        type Case<'a> = (NetEvent, NetFamily, NetProto, &'a str, u16, Option<&'a str>);
        let cases: [Case<'_>; 4] = [
            (NetEvent::Connect, NetFamily::Inet, NetProto::Tcp, "10.0.0.1", 443, Some("api.example")),
            (NetEvent::Sendmsg, NetFamily::Inet6, NetProto::Udp, "::ffff:10.1.2.3", 53, None),
            (NetEvent::Bind, NetFamily::Inet6, NetProto::Other, "2001:db8::1", 0, Some("x\"y")),
            (NetEvent::Connect, NetFamily::Inet, NetProto::Tcp, "255.255.255.255", 65535, Some("other.example")),
        ];
        // Every order of changes: agent, process and destination each change or stay.
        for (round, (event, family, protocol, addr, port, domain)) in cases.iter().cycle().take(12).enumerate() {
            let agent = if round % 3 == 0 { other.clone() } else { agent() };
            let proc = &procs[round % 2];
            let addr: IpAddr = addr.parse().unwrap();
            buf.set_agent(&agent);
            buf.set_proc(proc.pid, proc.ppid, proc.uid, &proc.comm, &proc.exe);
            buf.set_net(*event, *family, *protocol, addr, *port, *domain);
            let built = net_context(&agent, proc, *event, *family, *protocol, addr, *port, *domain);
            assert_eq!(buf.value(), &built, "round {round}");
            let mut bytes = Vec::new();
            buf.write_json(&mut bytes);
            assert_eq!(String::from_utf8(bytes).unwrap(), serde_json::to_string(&built).unwrap(), "round {round}");
            assert_eq!(buf.event(), *event);
        }
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
