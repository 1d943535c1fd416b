//! What the audit log costs: records per second appended to an events file alone, and
//! through the chain with checkpoints (canonical JSON, SHA-256 chain and Merkle tree,
//! an Ed25519 signature per checkpoint); and records per second `audit verify` checks.
//! The record is a kernel connect record as the evaluator writes it.
#![allow(clippy::unwrap_used)]

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agt_jail_audit::{
    verify::walk,
    writer::{AuditLog, LogOptions, SyncPolicy},
    SigningKey,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const RECORD: &str = r#"{"seq":1234,"time":1765111234.567891,"agent":"coder","pid":4359,"event":"connect","context":{"agent":{"did":"did:mesh:9c1f3e0a8b7d6c5e4f3a2b1c0d9e8f7a","id":"coder","ring":2,"session":"5f0e1d2c3b4a59687766554433221100","tier":"standard","trust":500},"event":"connect","net":{"addr":"10.1.2.3","domain":null,"family":"inet","port":443,"protocol":"tcp"},"proc":{"comm":"python3","exe":"/usr/bin/python3.11","pid":4359,"ppid":4340,"uid":1000}},"decision":{"action":"deny","allowed":false,"matched_rule":"coding-agent/block-egress","reason":"egress to unlisted hosts is denied","policy":"coding-agent"},"matched_rule":"coding-agent/block-egress","plane":"kernel","outcome":"deny","latency_us":3}"#;

const DID: &str = "did:mesh:9c1f3e0a8b7d6c5e4f3a2b1c0d9e8f7a";
const POLICY: &str = "sha256:5b41362bc82b7f3d56edc5a306db22105707d01ff4819e26faef9724a2d406c9";

/// Records between flushes (the event thread flushes once per batch it reads).
const BATCH: u64 = 64;

fn dir() -> PathBuf {
    std::env::temp_dir().join(format!("agt-jail-audit-bench-{}", std::process::id()))
}

fn options(sync: SyncPolicy) -> LogOptions {
    LogOptions { checkpoint_every: 1000, checkpoint_interval: Duration::from_secs(10), sync, ..LogOptions::default() }
}

/// `n` records through a fresh log; the time of the appends and flushes (and the close).
fn chained(path: &Path, n: u64, sync: SyncPolicy) -> Duration {
    let _ = std::fs::remove_file(path);
    let mut log = AuditLog::create(path, SigningKey::from_bytes(&[1; 32]), options(sync)).unwrap();
    let start = Instant::now();
    for i in 0..n {
        log.append_line(DID, POLICY, RECORD.as_bytes()).unwrap();
        if i % BATCH == BATCH - 1 {
            log.flush().unwrap();
        }
    }
    log.close().unwrap();
    start.elapsed()
}

/// The same records as plain lines in an events file.
fn plain(path: &Path, n: u64) -> Duration {
    let mut out = BufWriter::new(File::create(path).unwrap());
    let start = Instant::now();
    for i in 0..n {
        out.write_all(RECORD.as_bytes()).unwrap();
        out.write_all(b"\n").unwrap();
        if i % BATCH == BATCH - 1 {
            out.flush().unwrap();
        }
    }
    out.flush().unwrap();
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let dir = dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("audit.jsonl");
    let mut group = c.benchmark_group("audit_append");
    group.throughput(Throughput::Elements(1));
    group.bench_function("events file only (no chain)", |b| b.iter_custom(|n| plain(&path, n)));
    group.bench_function("chained, checkpoint every 1000, sync none", |b| {
        b.iter_custom(|n| chained(&path, n, SyncPolicy::None))
    });
    group.bench_function("chained, checkpoint every 1000, sync batch", |b| {
        b.iter_custom(|n| chained(&path, n, SyncPolicy::Batch))
    });
    group.finish();

    // A log of 200k records, verified whole per iteration.
    const RECORDS: u64 = 200_000;
    chained(&path, RECORDS, SyncPolicy::None);
    let files = vec![path.clone()];
    let key = SigningKey::from_bytes(&[1; 32]).verifying_key();
    let mut group = c.benchmark_group("audit_verify");
    group.throughput(Throughput::Elements(RECORDS));
    group.sample_size(10);
    group.bench_function("verify 200k records", |b| {
        b.iter(|| {
            let v = walk(&files, Some(std::slice::from_ref(&key)), |_| {}).unwrap();
            assert_eq!(v.records, RECORDS);
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn config() -> Criterion {
    // Short: the build machines are shared.
    Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = bench }
criterion_main!(benches);
