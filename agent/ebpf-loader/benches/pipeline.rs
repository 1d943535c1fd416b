//! The userspace half of the event pipeline, per event: decoding a ring-buffer record
//! and the evaluator's observe path (context, policy, record), the ceiling on kernel
//! events per second that one event thread can take. `cargo xtask bench-enforce`
//! measures the whole pipeline with the kernel in it; docs/benchmarks.md has both.
//!
//! The records are byte images of the common crate's `#[repr(C)]` events, as the
//! kernel writes them. The observe step is what `agt-jail exec --policy` does with a
//! connect event (agent/cli/src/govern.rs): the kernel's verdict, the policy's decision,
//! one JSON line.
#![allow(clippy::unwrap_used)]

use std::{
    hint::black_box,
    io::{self, BufWriter, Write},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use agt_jail_common::{
    EventHeader, EventKind, ExecTraceEvent, NetEvent as NetRecord, Verdict, AF_INET, EXEC_FILENAME_LEN,
    NET_LAYER_ALLOW_LIST, NET_LAYER_NONE, NET_RULE_DEFAULT, TASK_COMM_LEN,
};
use agt_jail_ebpf_loader::{decode, Event, NetLayer, VerdictName};
use agt_jail_policy::{
    context::{AgentFacts, NetEvent, NetFamily, NetProto},
    PolicySet,
};
use agt_jail_supervisor::evaluator::{Actuator, Evaluator, EvaluatorConfig, KernelVerdict, RecordSink, TrustRules};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is one of the common crate's #[repr(C)] event structs, size-asserted there
    // to have no implicit padding, so every byte of it is initialised.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
}

fn header(kind: EventKind, verdict: Verdict, pid: u32) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        verdict: verdict as u32,
        pid,
        tgid: pid,
        cgroup_id: 4242,
        agent_id: 4242,
        ktime_ns: 1_000_000,
    }
}

fn connect_record(verdict: Verdict, pid: u32) -> Vec<u8> {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[127, 0, 0, 2]);
    // A deny of the ring's allow-list, as the connect program reports it.
    let layer = if verdict == Verdict::Allow { NET_LAYER_NONE } else { NET_LAYER_ALLOW_LIST };
    bytes_of(&NetRecord {
        header: header(EventKind::Connect, verdict, pid),
        family: AF_INET,
        port: 8080,
        protocol: 6,
        addr,
        addr_class: 0,
        limit: 0,
        port_class: 0,
        rule: NET_RULE_DEFAULT,
        layer,
        flags: 0,
        _pad: 0,
    })
}

fn exec_record(pid: u32) -> Vec<u8> {
    let mut filename = [0u8; EXEC_FILENAME_LEN];
    filename[..10].copy_from_slice(b"/bin/true\0");
    let mut comm = [0u8; TASK_COMM_LEN];
    comm[..4].copy_from_slice(b"true");
    bytes_of(&ExecTraceEvent {
        header: header(EventKind::Exec, Verdict::Allow, pid),
        ppid: 1,
        filename_len: 10,
        comm,
        filename,
    })
}

struct NoEffects;

impl Actuator for NoEffects {
    fn kill_agent(&self) -> io::Result<()> {
        Ok(())
    }
    fn demote(&self, _agent: &AgentFacts) -> io::Result<()> {
        Ok(())
    }
}

fn evaluator(out: Box<dyn Write + Send>, proc_root: &str) -> Arc<Evaluator> {
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/loops/governed.yaml");
    let set = PolicySet::load(&[policy]).unwrap();
    let agent = AgentFacts::new("bench", format!("did:mesh:{}", "0".repeat(32)), 2, 500, "s");
    let cfg = EvaluatorConfig {
        policies: Arc::new(set),
        agent,
        approval_timeout: Duration::from_secs(60),
        // No trust movement: a million denials would otherwise demote and kill the agent.
        trust: TrustRules { penalty: 0, kill_below: 0 },
        entry_program: PathBuf::from("/bin/true"),
        show_denials: false,
        proc_root: PathBuf::from(proc_root),
    };
    Evaluator::new(cfg, RecordSink::new(Some(out)), Arc::new(NoEffects))
}

/// What `agt_jail::govern::observe` does with one decoded event (connects to addresses
/// the policy names by domain would also carry the domain; this policy names none).
fn observe(evaluator: &Evaluator, event: &Event) {
    match event {
        Event::Connect { tgid, addr, port, protocol, verdict, layer, .. } => {
            let proto = if protocol == "tcp" { NetProto::Tcp } else { NetProto::Other };
            let kernel = match (verdict, layer) {
                (VerdictName::Allow, _) => KernelVerdict::Allow,
                (VerdictName::Kill, _) => KernelVerdict::Kill,
                (VerdictName::Deny, NetLayer::Plan) => KernelVerdict::Deny,
                (VerdictName::Deny, _) => KernelVerdict::Floor,
            };
            evaluator.observe_net(*tgid, NetEvent::Connect, NetFamily::Inet, proto, *addr, *port, None, kernel);
        }
        other => evaluator.observe_raw(&serde_json::to_value(other).unwrap()),
    }
}

fn pipeline(c: &mut Criterion) {
    // A live pid, so the /proc reads of the observe path find a process as they do for agents.
    let pid = std::process::id();
    let allowed = connect_record(Verdict::Allow, pid);
    let denied = connect_record(Verdict::Deny, pid);
    let exec = exec_record(pid);

    let mut group = c.benchmark_group("event_pipeline");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_connect", |b| b.iter(|| decode(black_box(&denied)).unwrap()));
    group.bench_function("decode_exec", |b| b.iter(|| decode(black_box(&exec)).unwrap()));

    // Records to nowhere: decode, context (with its /proc reads), policy, JSON.
    let to_sink = evaluator(Box::new(io::sink()), "/proc");
    group.bench_function("decode_observe_connect_no_file", |b| {
        b.iter(|| observe(&to_sink, &decode(black_box(&allowed)).unwrap()))
    });
    group.bench_function("decode_observe_denied_connect_no_file", |b| {
        b.iter(|| observe(&to_sink, &decode(black_box(&denied)).unwrap()))
    });

    // The same without the per-event /proc reads (a proc root that does not exist: each
    // read fails at once and the facts stay empty): what is left when process facts come
    // from a cache or from the kernel's record instead.
    let no_proc = evaluator(Box::new(io::sink()), "/nonexistent-agt-jail-proc");
    group.bench_function("decode_observe_connect_no_file_no_proc_reads", |b| {
        b.iter(|| observe(&no_proc, &decode(black_box(&allowed)).unwrap()))
    });

    // As `agt-jail exec --policy --events FILE` runs it: a buffered file flushed per record.
    let dir = std::env::temp_dir().join(format!("agt-jail-pipeline-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::create(dir.join("events.jsonl")).unwrap();
    let to_file = evaluator(Box::new(BufWriter::new(file)), "/proc");
    group.bench_function("decode_observe_connect_to_file", |b| {
        b.iter(|| observe(&to_file, &decode(black_box(&allowed)).unwrap()))
    });
    group.bench_function("decode_observe_exec_to_file", |b| {
        b.iter(|| observe(&to_file, &decode(black_box(&exec)).unwrap()))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
