//! The glue, unprivileged: kernel records as the kernel writes them, decoded, observed
//! through the planes, decided by the real evaluator and written to an in-memory sink; the
//! planes' tables installed into a recording kernel.
#![allow(clippy::unwrap_used)]

use std::{
    io::{self, Write},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use agt_jail_common::{
    EventHeader, EventKind, ExeKey, NetEvent as NetRecord, Verdict, AF_INET, NET_LAYER_ALLOW_LIST, NET_LAYER_NONE,
    NET_RULE_DEFAULT,
};
use agt_jail_ebpf_loader::{decode, lsm::FileRule, LoaderError, NetTables};
use agt_jail_policy::{
    context::{AgentFacts, NetProto},
    plan::{self, HostCaps, Resolved},
    PolicySet,
};
use agt_jail_supervisor::{
    evaluator::{Evaluator, EvaluatorConfig, RecordSink, TrustRules},
    Answer, Decider, Reply, Request, RequestKind,
};
use serde_json::Value;

use super::*;
use crate::govern::{ArmingDecider, HostActuator};

/// The sink's lines, kept in memory.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn records(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

const POLICY: &str = r#"
apiVersion: governance.toolkit/v1
name: glue
agents: ["*"]
default_action: allow
rules:
  - name: no-metadata
    condition: "event == 'connect' and net.addr == '169.254.169.254'"
    action: deny
    priority: 900
  - name: no-rm
    condition: "event == 'exec' and exec.path endswith '/rm'"
    action: deny
    priority: 900
"#;

fn agent() -> AgentFacts {
    AgentFacts::new("glue", format!("did:mesh:{}", "0".repeat(32)), 2, 500, "s")
}

fn evaluator(set: PolicySet, lines: &Lines, actuator: Arc<HostActuator>) -> Arc<Evaluator> {
    let cfg = EvaluatorConfig {
        policies: Arc::new(set),
        policy_hash: "sha256:a".into(),
        agent: agent(),
        approval_timeout: Duration::from_secs(5),
        trust: TrustRules { penalty: 0, kill_below: 0, ..TrustRules::default() },
        entry_program: PathBuf::from("/bin/true"),
        show_denials: false,
        proc_root: PathBuf::from("/proc"),
    };
    Evaluator::new(cfg, RecordSink::new(Some(Box::new(lines.clone()))), actuator)
}

fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is one of the common crate's #[repr(C)] event structs, size-asserted there
    // to have no implicit padding, so every byte of it is initialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

/// A connect record as the cgroup program writes it, from this process.
fn connect_record(addr: [u8; 4], port: u16, verdict: Verdict) -> Vec<u8> {
    let pid = std::process::id();
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&addr);
    bytes_of(&NetRecord {
        header: EventHeader {
            kind: EventKind::Connect as u32,
            verdict: verdict as u32,
            pid,
            tgid: pid,
            cgroup_id: 7,
            agent_id: 7,
            ktime_ns: 1,
        },
        family: AF_INET,
        port,
        protocol: 6,
        addr: raw,
        addr_class: 0,
        limit: 0,
        port_class: 0,
        rule: NET_RULE_DEFAULT,
        layer: if verdict == Verdict::Allow { NET_LAYER_NONE } else { NET_LAYER_ALLOW_LIST },
        flags: 0,
        _pad: 0,
        uid: 0,
        ppid: 1,
        comm: *b"glue\0\0\0\0\0\0\0\0\0\0\0\0",
        exe: ExeKey { mnt: 0, dentry: 0, ino: 0 },
    })
}

fn observe_record(evaluator: &Evaluator, bytes: &[u8]) {
    let event = decode(bytes).unwrap();
    observe(evaluator, &Mutex::new(None), &event, &|_| None);
    evaluator.flush();
}

fn exec_request(path: &str) -> Request {
    Request {
        pid: std::process::id(),
        tid: std::process::id(),
        kind: RequestKind::Exec {
            path: path.into(),
            argv: vec![path.into()],
            fileless: false,
            identity: None,
            interpreter: None,
        },
        plane: "seccomp_notify",
        proc: None,
    }
}

/// Asks `decider` and returns its answer.
fn ask(decider: &dyn Decider, request: Request) -> Answer {
    let (tx, rx) = std::sync::mpsc::channel();
    decider.decide(request, Reply::new(move |answer| tx.send(answer).unwrap()));
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

#[test]
fn a_kernel_record_becomes_a_typed_event_a_decision_and_a_record() {
    let lines = Lines::default();
    let ev = evaluator(PolicySet::from_str("glue", POLICY).unwrap(), &lines, Arc::new(HostActuator::new(None)));
    observe_record(&ev, &connect_record([169, 254, 169, 254], 80, Verdict::Deny));
    observe_record(&ev, &connect_record([10, 0, 0, 1], 443, Verdict::Allow));
    let records = lines.records();
    assert_eq!(records.len(), 2, "{records:?}");
    let (denied, allowed) = (&records[0], &records[1]);
    assert_eq!(denied["event"], "connect");
    assert_eq!(denied["outcome"], "deny", "{denied}");
    assert_eq!(denied["matched_rule"], "no-metadata", "{denied}");
    assert_eq!(denied["context"]["net"]["addr"], "169.254.169.254");
    assert_eq!(denied["context"]["net"]["port"], 80);
    assert_eq!(denied["context"]["net"]["protocol"], "tcp");
    assert_eq!(denied["context"]["proc"]["comm"], "glue", "the caller's facts come from the kernel's record");
    assert_eq!(allowed["outcome"], "allow", "{allowed}");
    assert_eq!(allowed["decision"]["allowed"], true, "{allowed}");
    assert!(denied["seq"].as_u64().unwrap() < allowed["seq"].as_u64().unwrap());
}

#[test]
fn the_resolver_names_a_destination_before_the_plan_does() {
    let lines = Lines::default();
    let ev = evaluator(PolicySet::from_str("glue", POLICY).unwrap(), &lines, Arc::new(HostActuator::new(None)));
    let event = decode(&connect_record([10, 0, 0, 9], 443, Verdict::Allow)).unwrap();
    observe(&ev, &Mutex::new(None), &event, &|addr| (addr.to_string() == "10.0.0.9").then(|| "pypi.org".into()));
    ev.flush();
    assert_eq!(lines.records()[0]["context"]["net"]["domain"], "pypi.org");
}

#[test]
fn events_no_policy_reads_are_recorded_as_they_are() {
    let lines = Lines::default();
    let ev = evaluator(PolicySet::from_str("glue", POLICY).unwrap(), &lines, Arc::new(HostActuator::new(None)));
    let pid = std::process::id();
    let exit = agt_jail_common::ExitEvent {
        header: EventHeader {
            kind: EventKind::Exit as u32,
            verdict: Verdict::Allow as u32,
            pid,
            tgid: pid,
            cgroup_id: 7,
            agent_id: 7,
            ktime_ns: 2,
        },
        exit_code: 0,
        _pad: 0,
        comm: *b"glue\0\0\0\0\0\0\0\0\0\0\0\0",
    };
    observe_record(&ev, &bytes_of(&exit));
    let records = lines.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["kind"], "exit", "{records:?}");
    assert!(records[0].get("decision").is_none(), "an observation, not a decision: {records:?}");
}

#[test]
fn held_execs_are_decided_and_recorded_allowed_and_denied() {
    let lines = Lines::default();
    let actuator = Arc::new(HostActuator::new(None));
    let ev = evaluator(PolicySet::from_str("glue", POLICY).unwrap(), &lines, Arc::clone(&actuator));
    let decider = ArmingDecider::with(Arc::clone(&ev), actuator, false);
    assert_eq!(ask(&*decider, exec_request("/bin/true")), Answer::Allow);
    assert!(!decider.entry_denied(), "the entry command was allowed");
    assert_eq!(ask(&*decider, exec_request("/usr/bin/rm")), Answer::Deny);
    ev.flush();
    let records = lines.records();
    let execs: Vec<&Value> = records.iter().filter(|r| r["event"] == "exec").collect();
    assert_eq!(execs.len(), 2, "{records:?}");
    assert_eq!((execs[0]["outcome"].as_str(), execs[0]["plane"].as_str()), (Some("allow"), Some("seccomp_notify")));
    assert_eq!(execs[1]["outcome"], "deny");
    assert_eq!(execs[1]["matched_rule"], "no-rm");
}

#[test]
fn an_entry_command_the_policy_refuses_is_known_as_such() {
    let lines = Lines::default();
    let actuator = Arc::new(HostActuator::new(None));
    let ev = evaluator(PolicySet::from_str("glue", POLICY).unwrap(), &lines, Arc::clone(&actuator));
    let decider = ArmingDecider::with(ev, actuator, false);
    assert_eq!(ask(&*decider, exec_request("/bin/rm")), Answer::Deny);
    assert!(decider.entry_denied());
}

#[test]
fn an_evaluation_error_denies_the_held_action_and_is_on_record() {
    let lines = Lines::default();
    let actuator = Arc::new(HostActuator::new(None));
    // A verdict that is neither a boolean nor {decision, reason}: the evaluation fails.
    let set = PolicySet::from_rego_str("broken.rego", "package x\nallow := \"perhaps\"\n", None).unwrap();
    let ev = evaluator(set, &lines, Arc::clone(&actuator));
    let decider = ArmingDecider::with(Arc::clone(&ev), actuator, false);
    assert_eq!(ask(&*decider, exec_request("/bin/true")), Answer::Deny);
    ev.flush();
    let records = lines.records();
    let exec = records.iter().find(|r| r["event"] == "exec").unwrap();
    assert_eq!(exec["outcome"], "deny", "{exec}");
    assert_eq!(exec["decision"]["allowed"], false, "{exec}");
    assert!(exec["decision"]["reason"].as_str().unwrap().contains("fail"), "{exec}");
}

#[test]
fn a_plane_that_cannot_be_armed_denies_before_the_evaluator_is_asked() {
    let lines = Lines::default();
    let actuator = Arc::new(HostActuator::new(None));
    *crate::govern::lock(&actuator.on_first_exec) = Some(Box::new(|| Err(io::Error::other("the guard map is gone"))));
    let ev = evaluator(PolicySet::from_str("glue", POLICY).unwrap(), &lines, Arc::clone(&actuator));
    let decider = ArmingDecider::with(Arc::clone(&ev), actuator, false);
    assert_eq!(ask(&*decider, exec_request("/bin/true")), Answer::Deny);
    ev.flush();
    assert!(lines.records().iter().all(|r| r["event"] != "exec"), "the evaluator was not asked");
}

/// A kernel that records what was installed.
#[derive(Default)]
struct FakeKernel {
    net: Vec<(u64, NetTables)>,
    file: Vec<(u64, Vec<FileRule>)>,
    exec: Vec<u64>,
    guard: Vec<(u64, u32)>,
}

impl Kernel for FakeKernel {
    fn install_net_plan(&mut self, agent_id: u64, tables: &NetTables) -> Result<(), LoaderError> {
        self.net.push((agent_id, tables.clone()));
        Ok(())
    }
    fn install_file_rules(&mut self, agent_id: u64, rules: &[FileRule]) -> Result<(), LoaderError> {
        self.file.push((agent_id, rules.to_vec()));
        Ok(())
    }
    fn enable_exec_verdicts(&mut self, agent_id: u64) -> Result<(), LoaderError> {
        self.exec.push(agent_id);
        Ok(())
    }
    fn enable_guard(&mut self, agent_id: u64, flags: u32) -> Result<(), LoaderError> {
        self.guard.push((agent_id, flags));
        Ok(())
    }
}

#[test]
fn each_plane_compiles_the_plan_and_installs_its_tables() {
    let policy = r#"
apiVersion: governance.toolkit/v1
name: planes
agents: ["*"]
default_action: allow
rules:
  - name: no-metadata
    condition: "event == 'connect' and net.addr == '169.254.169.254' and net.port == 80"
    action: deny
    priority: 900
  - name: keys
    condition: "event == 'file_open' and file.path startswith '/root/.ssh/'"
    action: deny
    priority: 800
"#;
    let set = PolicySet::from_str("planes", policy).unwrap();
    let caps = HostCaps { bpf_lsm: true, fanotify: true, confined: true, ring: 2 };
    let compiled = plan::compile(&set, &agent(), &caps, &Resolved::new(), false).unwrap();
    let mut kernel = FakeKernel::default();
    let net = NetPlane.compile(&compiled).unwrap();
    NetPlane.install(&mut kernel, 7, &net).unwrap();
    assert_eq!(kernel.net.len(), 1);
    let (agent_id, tables) = &kernel.net[0];
    assert_eq!(*agent_id, 7);
    assert!(tables.v4.iter().any(|(addr, prefix, _)| addr.octets() == [169, 254, 169, 254] && *prefix == 32));
    assert!(tables.ports.iter().any(|(port, _)| *port == 80));
    assert!(
        tables.verdicts.iter().any(|row| row.action == agt_jail_ebpf_loader::NetAction::Deny
            && row.proto != agt_jail_ebpf_loader::NetProto::Udp),
        "{:?}",
        tables.verdicts
    );
    if let Some(file) = FilePlane.compile(&compiled) {
        FilePlane.install(&mut kernel, 7, &file).unwrap();
        assert!(kernel.file[0].1.iter().any(|r| r.text.starts_with("/root/.ssh")), "{:?}", kernel.file);
    }
    ExecPlane.install(&mut kernel, 7, &ExecPlane.compile(&compiled).unwrap()).unwrap();
    GuardPlane.install(&mut kernel, 7, &GuardPlane.compile(&compiled).unwrap()).unwrap();
    assert_eq!(kernel.exec, vec![7]);
    assert_eq!(kernel.guard, vec![(7, GuardPlane::FLAGS)]);
}

#[test]
fn protocol_names_and_codes_convert_one_way_each() {
    for proto in NetProto::ALL {
        assert_eq!(net_proto(proto.as_str()), proto);
        assert_eq!(NetProto::from_ip_proto(proto.code()), proto);
    }
    assert_eq!(net_proto("sctp"), NetProto::Other);
    assert_eq!(kernel_proto(NetProto::Udp), agt_jail_ebpf_loader::NetProto::Udp);
}

fn file_event(op: &str, access: &[&str], verdict: VerdictName) -> Event {
    Event::File {
        pid: 9,
        tgid: 9,
        cgroup_id: 7,
        agent_id: 7,
        ktime_ns: 3,
        op: op.into(),
        access: access.iter().map(|a| a.to_string()).collect(),
        path: "/root/.ssh/id_ed25519".into(),
        rule_index: Some(1),
        rule_kind: "prefix".into(),
        verdict,
    }
}

#[test]
fn each_event_is_its_own_planes_and_an_open_is_decided_by_what_it_asked_for() {
    let denied_rw = file_event("open", &["read", "write"], VerdictName::Deny);
    match observation(&denied_rw) {
        Observation::File { pid, event, path, access, kernel } => {
            assert_eq!((pid, event, access, kernel), (9, FileEvent::Write, "read_write", KernelVerdict::Deny));
            assert_eq!(path, "/root/.ssh/id_ed25519");
        }
        other => panic!("{other:?}"),
    }
    let read = file_event("open", &["read"], VerdictName::Allow);
    assert!(matches!(
        observation(&read),
        Observation::File { event: FileEvent::Open, access: "read", kernel: KernelVerdict::Allow, .. }
    ));
    let create = file_event("open", &["create"], VerdictName::Deny);
    assert!(matches!(observation(&create), Observation::File { event: FileEvent::Write, access: "write", .. }));
    // Other file operations are the kernel's own decisions, recorded as they are.
    let unlink = file_event("unlink", &["unlink"], VerdictName::Deny);
    assert!(matches!(observation(&unlink), Observation::Record(_)));
    let connect = decode(&connect_record([10, 0, 0, 1], 443, Verdict::Allow)).unwrap();
    assert!(matches!(observation(&connect), Observation::Net { hook: NetEvent::Connect, .. }));
    assert!(NetPlane.observe(&unlink).is_none() && FilePlane.observe(&connect).is_none());
    assert!(ExecPlane.observe(&connect).is_none() && GuardPlane.observe(&connect).is_none());
}

#[test]
fn a_kernel_file_decision_reaches_the_record_with_the_policys_rule() {
    let policy = r#"
apiVersion: governance.toolkit/v1
name: files
agents: ["*"]
default_action: allow
rules:
  - name: keys
    condition: "event in ['file_open', 'file_write'] and file.path startswith '/root/.ssh/'"
    action: deny
    priority: 900
"#;
    let lines = Lines::default();
    let ev = evaluator(PolicySet::from_str("files", policy).unwrap(), &lines, Arc::new(HostActuator::new(None)));
    let mut event = file_event("open", &["read"], VerdictName::Deny);
    if let Event::File { tgid, pid, .. } = &mut event {
        (*tgid, *pid) = (std::process::id(), std::process::id());
    }
    observe(&ev, &Mutex::new(None), &event, &|_| None);
    ev.flush();
    let records = lines.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["event"], "file_open");
    assert_eq!(records[0]["outcome"], "deny");
    assert_eq!(records[0]["matched_rule"], "keys");
    assert_eq!(records[0]["plane"], "kernel");
}
