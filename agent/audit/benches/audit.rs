//! What the audit log costs: records per second appended to an events file alone, and
//! through the chain without and with checkpoints (canonical JSON, SHA-256 chain and Merkle
//! tree, an Ed25519 signature per checkpoint); and records per second `audit verify` checks.
//! The record is a kernel connect record as the evaluator writes it (keys in canonical order).
//! The chained rows give the log batches of 64 lines through a `LineWriter`, a flush after
//! each, as `exec --audit` does (a batch this large has its records' canonical form made on
//! a second thread, `pipeline`); the "one thread" row appends the records one by one.
//!
//! Each is measured twice: in wall-clock time, and in the bench thread's on-CPU time
//! (`/proc/thread-self/schedstat`, which counts its system calls but not the time it
//! waits for a core), so other builds on a shared machine do not inflate the second.
#![allow(clippy::unwrap_used)]

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agt_jail_audit::{
    verify::walk_with,
    writer::{AuditLog, LineWriter, LogOptions, SyncPolicy},
    SigningKey,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const RECORD: &str = r#"{"agent":"coder","context":{"agent":{"did":"did:mesh:9c1f3e0a8b7d6c5e4f3a2b1c0d9e8f7a","id":"coder","ring":2,"session":"5f0e1d2c3b4a59687766554433221100","tier":"standard","trust":500},"event":"connect","net":{"addr":"10.1.2.3","domain":null,"family":"inet","port":443,"protocol":"tcp"},"proc":{"comm":"python3","exe":"/usr/bin/python3.11","pid":4359,"ppid":4340,"uid":1000}},"decision":{"action":"deny","allowed":false,"matched_rule":"coding-agent/block-egress","policy":"coding-agent","reason":"egress to unlisted hosts is denied"},"event":"connect","latency_us":3,"matched_rule":"coding-agent/block-egress","outcome":"deny","pid":4359,"plane":"kernel","seq":1234,"time":1765111234.567891}"#;

const DID: &str = "did:mesh:9c1f3e0a8b7d6c5e4f3a2b1c0d9e8f7a";
const POLICY: &str = "sha256:5b41362bc82b7f3d56edc5a306db22105707d01ff4819e26faef9724a2d406c9";

/// Records between flushes (the event thread flushes once per batch it reads).
const BATCH: u64 = 64;

fn dir() -> PathBuf {
    std::env::temp_dir().join(format!("agt-jail-audit-bench-{}", std::process::id()))
}

/// How the records reach the log.
#[derive(Clone, Copy)]
enum Mode {
    /// Batches of [`BATCH`] lines through a `LineWriter` (two threads for batches this large).
    Batches,
    /// `append_line` per record, a flush every [`BATCH`] (the calling thread alone).
    OneByOne,
}

/// `every`: records between checkpoints (`None`: only the closing one).
fn options(sync: SyncPolicy, every: Option<u64>) -> LogOptions {
    LogOptions {
        checkpoint_every: every.unwrap_or(1 << 40),
        checkpoint_interval: Duration::from_secs(if every.is_some() { 10 } else { 1 << 30 }),
        sync,
        ..LogOptions::default()
    }
}

/// Which time a measurement takes.
#[derive(Clone, Copy)]
enum Clock {
    Wall,
    /// The calling thread's time on a CPU.
    Cpu,
}

/// A point in time on `clock`'s scale.
fn now(clock: Clock, wall: Instant) -> Duration {
    match clock {
        Clock::Wall => wall.elapsed(),
        Clock::Cpu => {
            let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
            Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
        }
    }
}

/// `n` records through a fresh log; the time of the appends and flushes (and the close).
fn chained(path: &Path, n: u64, sync: SyncPolicy, every: Option<u64>, mode: Mode, clock: Clock) -> Duration {
    let _ = std::fs::remove_file(path);
    let log = AuditLog::create(path, SigningKey::from_bytes(&[1; 32]), options(sync, every)).unwrap();
    let log = Arc::new(Mutex::new(log));
    let mut writer = LineWriter::new(Arc::clone(&log), DID.into(), POLICY.into());
    let batch: Vec<u8> = (0..BATCH).flat_map(|_| RECORD.bytes().chain([b'\n'])).collect();
    let origin = Instant::now();
    let start = now(clock, origin);
    match mode {
        Mode::Batches => {
            let mut left = n;
            while left > 0 {
                let records = left.min(BATCH);
                writer.write_all(&batch[..records as usize * (RECORD.len() + 1)]).unwrap();
                writer.flush().unwrap();
                left -= records;
            }
        }
        Mode::OneByOne => {
            let mut log = log.lock().unwrap();
            for i in 0..n {
                log.append_line(DID, POLICY, RECORD.as_bytes()).unwrap();
                if i % BATCH == BATCH - 1 {
                    log.flush().unwrap();
                }
            }
        }
    }
    log.lock().unwrap().close().unwrap();
    now(clock, origin) - start
}

/// The same records as plain lines in an events file.
fn plain(path: &Path, n: u64, clock: Clock) -> Duration {
    let mut out = BufWriter::new(File::create(path).unwrap());
    let origin = Instant::now();
    let start = now(clock, origin);
    for i in 0..n {
        out.write_all(RECORD.as_bytes()).unwrap();
        out.write_all(b"\n").unwrap();
        if i % BATCH == BATCH - 1 {
            out.flush().unwrap();
        }
    }
    out.flush().unwrap();
    now(clock, origin) - start
}

fn bench(c: &mut Criterion) {
    let dir = dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    for (group_name, clock) in [("audit_append", Clock::Wall), ("audit_append_cpu", Clock::Cpu)] {
        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Elements(1));
        group.bench_function("events file only (no chain)", |b| b.iter_custom(|n| plain(&path, n, clock)));
        for (name, sync, every, mode) in [
            ("chained, no checkpoint, sync none", SyncPolicy::None, None, Mode::Batches),
            ("chained, checkpoint every 1000, sync none", SyncPolicy::None, Some(1000), Mode::Batches),
            ("chained, checkpoint every 1000, sync batch", SyncPolicy::Batch, Some(1000), Mode::Batches),
            ("chained, checkpoint every 1000, sync none, one thread", SyncPolicy::None, Some(1000), Mode::OneByOne),
        ] {
            group.bench_function(name, |b| b.iter_custom(|n| chained(&path, n, sync, every, mode, clock)));
        }
        group.finish();
    }

    // A log of 200k records, verified whole per iteration.
    const RECORDS: u64 = 200_000;
    chained(&path, RECORDS, SyncPolicy::None, Some(1000), Mode::Batches, Clock::Wall);
    let files = vec![path.clone()];
    let key = SigningKey::from_bytes(&[1; 32]).verifying_key();
    let verify = |threads: usize, clock: Clock, iters: u64| {
        let origin = Instant::now();
        let start = now(clock, origin);
        for _ in 0..iters {
            let v = walk_with(&files, Some(std::slice::from_ref(&key)), threads, |_| {}).unwrap();
            assert_eq!(v.records, RECORDS);
        }
        now(clock, origin) - start
    };
    let mut group = c.benchmark_group("audit_verify");
    group.throughput(Throughput::Elements(RECORDS));
    group.sample_size(10);
    group.bench_function("verify 200k records, 1 thread", |b| b.iter_custom(|n| verify(1, Clock::Wall, n)));
    group.bench_function("verify 200k records, 2 threads", |b| b.iter_custom(|n| verify(2, Clock::Wall, n)));
    // On-CPU time of the walking thread: meaningful with one thread only.
    group.bench_function("verify 200k records, 1 thread, cpu time", |b| b.iter_custom(|n| verify(1, Clock::Cpu, n)));
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn config() -> Criterion {
    // Short: the build machines are shared.
    Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = bench }
criterion_main!(benches);
