//! The userspace half of the event pipeline, per event: decoding a ring-buffer record
//! and the evaluator's observe path (context, policy, record), the ceiling on kernel
//! events per second that one event thread can take. `cargo xtask bench-enforce`
//! measures the whole pipeline with the kernel in it; docs/benchmarks.md has both.
//!
//! The records are byte images of the common crate's `#[repr(C)]` events, as the
//! kernel writes them. The observe step is the runtime's own (agent/runtime/src/plane.rs),
//! what a governed run does with each event: the kernel's verdict, the policy's decision,
//! one JSON line.
#![allow(clippy::unwrap_used)]

use std::{
    hint::black_box,
    io::{self, BufWriter, Write},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agt_jail_common::{
    EventHeader, EventKind, ExeKey, ExecTraceEvent, NetEvent as NetRecord, Verdict, AF_INET, EXEC_FILENAME_LEN,
    NET_LAYER_ALLOW_LIST, NET_LAYER_NONE, NET_RULE_DEFAULT, TASK_COMM_LEN,
};
use agt_jail_ebpf_loader::{decode, Event};
use agt_jail_policy::{context::AgentFacts, plan::Plan, PolicySet};
use agt_jail_runtime::plane::{self, Observation};
use agt_jail_supervisor::evaluator::{Actuator, Evaluator, EvaluatorConfig, RecordSink, TrustRules};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// How large the bench's events file may grow before it is emptied (between timed batches).
const FILE_KEPT_MAX: u64 = 256 << 20;

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
    connect_record_to(verdict, pid, 8080)
}

fn connect_record_to(verdict: Verdict, pid: u32, port: u16) -> Vec<u8> {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[127, 0, 0, 2]);
    // A deny of the ring's allow-list, as the connect program reports it.
    let layer = if verdict == Verdict::Allow { NET_LAYER_NONE } else { NET_LAYER_ALLOW_LIST };
    bytes_of(&NetRecord {
        header: header(EventKind::Connect, verdict, pid),
        family: AF_INET,
        port,
        protocol: 6,
        addr,
        addr_class: 0,
        limit: 0,
        port_class: 0,
        rule: NET_RULE_DEFAULT,
        layer,
        flags: 0,
        _pad: 0,
        uid: 0,
        ppid: 1,
        comm: *b"loops\0\0\0\0\0\0\0\0\0\0\0",
        exe: own_exe_key(),
    })
}

/// A kernel executable key for this process's executable: its inode number is the real one,
/// so the evaluator names the key from /proc once, as it does for an agent's process.
fn own_exe_key() -> ExeKey {
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata("/proc/self/exe").unwrap());
    ExeKey { mnt: 1, dentry: 2, ino }
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
        exe: own_exe_key(),
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
        policy_hash: "sha256:bench".into(),
        agent,
        approval_timeout: Duration::from_secs(60),
        // No trust movement: a million denials would otherwise demote and kill the agent.
        trust: TrustRules { penalty: 0, kill_below: 0, ..TrustRules::default() },
        entry_program: PathBuf::from("/bin/true"),
        show_denials: false,
        proc_root: PathBuf::from(proc_root),
    };
    Evaluator::new(cfg, RecordSink::new(Some(out)), Arc::new(NoEffects))
}

/// The runtime's own observe path (`agt_jail_runtime::plane::observe`, what a governed
/// run's event thread calls): this policy names no domain, so no destination has one.
/// `from_record`: process facts from the kernel's record (as a run does); otherwise from
/// /proc (through the per-process cache).
fn observe(evaluator: &Evaluator, plan: &Mutex<Option<Plan>>, event: &Event, from_record: bool) {
    if from_record {
        return plane::observe(evaluator, plan, event, &|_| None);
    }
    match plane::observation(event) {
        Observation::Net { hook, pid, net, verdict } => {
            let mut obs = plane::net_observation(hook, pid, &net, verdict, None);
            obs.caller = None;
            evaluator.observe_net(&obs);
        }
        other => plane::deliver(evaluator, other, &|_| None),
    }
}

/// Runs `batch` `iters` times and returns the time spent in it; between batches, empties
/// the events file (`kept`) once it has passed [`FILE_KEPT_MAX`].
fn timed_batches(kept: &std::fs::File, iters: u64, mut batch: impl FnMut()) -> Duration {
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        if kept.metadata().unwrap().len() > FILE_KEPT_MAX {
            kept.set_len(0).unwrap();
        }
        let start = Instant::now();
        batch();
        timed += start.elapsed();
    }
    timed
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

    // Records to nowhere: decode, context, policy, JSON. Process facts from the kernel's
    // record, the executable from /proc once per process (cached), as agt-jail runs it. The
    // same event over and over: after the first, the evaluator writes the remembered record.
    let to_sink = evaluator(Box::new(io::sink()), "/proc");
    // The plan in force, which names a destination's domain: this policy compiles none.
    let no_plan: Mutex<Option<Plan>> = Mutex::new(None);
    group.bench_function("decode_observe_connect_no_file", |b| {
        b.iter(|| observe(&to_sink, &no_plan, &decode(black_box(&allowed)).unwrap(), true))
    });
    group.bench_function("decode_observe_denied_connect_no_file", |b| {
        b.iter(|| observe(&to_sink, &no_plan, &decode(black_box(&denied)).unwrap(), true))
    });
    // Every event different (8,192 destinations in turn, more than the evaluator remembers):
    // each one is evaluated and serialised afresh.
    let distinct: Vec<Vec<u8>> = (0..8192u16).map(|i| connect_record_to(Verdict::Allow, pid, 10_000 + i)).collect();
    let mut next = 0;
    group.bench_function("decode_observe_distinct_connects_no_file", |b| {
        b.iter(|| {
            next = (next + 1) % distinct.len();
            observe(&to_sink, &no_plan, &decode(black_box(&distinct[next])).unwrap(), true)
        })
    });
    // Process facts from /proc through the per-process cache (events without them).
    group.bench_function("decode_observe_connect_no_file_proc_cache", |b| {
        b.iter(|| observe(&to_sink, &no_plan, &decode(black_box(&allowed)).unwrap(), false))
    });

    // As `agt-jail exec --policy --events FILE` runs it: records buffered and written to
    // the file once per ring-buffer drain (here: per 1,000 events). The file is opened for
    // appending and emptied, outside the timed batches, whenever it passes FILE_KEPT_MAX:
    // criterion's runs would otherwise write gigabytes, past the kernel's dirty-page limits,
    // and time the disk's write-back (~700 MB/s here) instead of the pipeline.
    let dir = std::env::temp_dir().join(format!("agt-jail-pipeline-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events.jsonl");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let kept = file.try_clone().unwrap();
    let to_file = evaluator(Box::new(BufWriter::new(file)), "/proc");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decode_observe_connect_to_file_per_1000", |b| {
        b.iter_custom(|iters| {
            timed_batches(&kept, iters, || {
                for _ in 0..1000 {
                    observe(&to_file, &no_plan, &decode(black_box(&allowed)).unwrap(), true);
                }
                to_file.flush();
            })
        })
    });
    // The same with every event different: the records of a flood of distinct events.
    group.bench_function("decode_observe_distinct_connects_to_file_per_1000", |b| {
        b.iter_custom(|iters| {
            timed_batches(&kept, iters, || {
                for _ in 0..1000 {
                    next = (next + 1) % distinct.len();
                    observe(&to_file, &no_plan, &decode(black_box(&distinct[next])).unwrap(), true);
                }
                to_file.flush();
            })
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_observe_exec_to_file", |b| {
        b.iter(|| observe(&to_file, &no_plan, &decode(black_box(&exec)).unwrap(), true))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
