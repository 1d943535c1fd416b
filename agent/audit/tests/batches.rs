//! Records given in whole batches (as `exec --audit` gives them: its events sink writes a
//! batch, then flushes) make the same log, byte for byte, as the same records appended one
//! by one, whichever thread made their canonical form; a bad record in a batch stops the
//! batch there, as it stops one-by-one appends.
#![allow(clippy::unwrap_used)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use agt_jail_audit::{
    pipeline::PIPELINE_MIN_BYTES,
    verify::walk,
    writer::{rotated_path, AuditLog, LineWriter, LogOptions},
    AuditError,
};

mod common;
use common::{key, options};

const DID: &str = "did:mesh:00112233445566778899aabbccddeeff";
const POLICY: &str = "sha256:abc";

/// Records of varied shapes and lengths: keys out of order, escapes, non-ASCII text,
/// numbers that canonicalise differently from how they are written, whitespace.
fn record(i: u64) -> String {
    let pad = "p".repeat((i as usize * 37) % 900);
    match i % 4 {
        0 => format!(r#"{{"seq":{i},"time":1765000000.{i:03},"z":1.0,"a":[1e21,"\u007fé\n"],"pad":"{pad}"}}"#),
        1 => format!(r#"{{"agent":"coder","decision":{{"allowed":false,"action":"deny"}},"seq":{i},"note":"{pad}"}}"#),
        2 => format!(r#"  {{ "b" : -0, "a" : "ü\"{i}", "n" : 12345678901234567890, "pad" : "{pad}" }}  "#),
        _ => format!(r#"{{"seq":{i},"unicode":"日本語 {pad}","nested":{{"y":[{{"b":2,"a":1}}],"x":null}}}}"#),
    }
}

fn files(path: &Path) -> Vec<PathBuf> {
    (0..).map(|i| rotated_path(path, i)).take_while(|p| p.exists()).collect()
}

fn bytes_of(path: &Path) -> Vec<Vec<u8>> {
    files(path).iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The log of records `1..=n` appended one by one.
fn one_by_one(path: &Path, n: u64, opts: LogOptions) {
    let mut log = AuditLog::create(path, key(), opts).unwrap();
    for i in 1..=n {
        log.append_line(DID, POLICY, record(i).as_bytes()).unwrap();
        if i % 5 == 0 {
            log.flush().unwrap();
        }
    }
    log.close().unwrap();
}

/// The same records through a `LineWriter` in batches of `batch` records, each batch
/// written in two parts split inside a line.
fn in_batches(path: &Path, n: u64, batch: u64, opts: LogOptions) {
    let log = Arc::new(Mutex::new(AuditLog::create(path, key(), opts).unwrap()));
    let mut w = LineWriter::new(Arc::clone(&log), DID.into(), POLICY.into());
    let mut i = 1;
    while i <= n {
        let mut text = Vec::new();
        for j in i..(i + batch).min(n + 1) {
            text.extend_from_slice(record(j).as_bytes());
            text.extend_from_slice(if j % 7 == 0 { b"\n\n" } else { b"\n" });
        }
        let (a, b) = text.split_at(text.len() - 10);
        w.write_all(a).unwrap();
        w.write_all(b).unwrap();
        w.flush().unwrap();
        i += batch;
    }
    log.lock().unwrap().close().unwrap();
}

#[test]
fn batches_make_the_same_log_as_records_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    for (n, batch, every, rotate) in
        [(600, 64, 1000, None), (600, 200, 7, None), (900, 300, 50, Some(64 << 10)), (40, 40, 3, None)]
    {
        let single = dir.path().join(format!("single-{n}-{batch}-{every}.jsonl"));
        let batched = dir.path().join(format!("batched-{n}-{batch}-{every}.jsonl"));
        one_by_one(&single, n, options(every, rotate));
        in_batches(&batched, n, batch, options(every, rotate));
        let (a, b) = (bytes_of(&single), bytes_of(&batched));
        assert!(a.len() > 1 || rotate.is_none());
        assert_eq!(a.len(), b.len(), "files of {n}/{batch}/{every}");
        for (x, y) in a.iter().zip(&b) {
            assert!(x == y, "the logs of {n} records in batches of {batch} differ");
        }
        let v = walk(&files(&batched), Some(&[key().verifying_key()]), |_| {}).unwrap();
        assert_eq!(v.records, n);
    }
    // The large batches were large enough to be shared with the second thread.
    assert!((1..=64).map(|i| record(i).len()).sum::<usize>() > PIPELINE_MIN_BYTES);
}

#[test]
fn a_bad_record_in_a_large_batch_stops_it_there_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut log = AuditLog::create(&path, key(), options(1000, None)).unwrap();
    let mut text = Vec::new();
    for i in 1..=300 {
        text.extend_from_slice(if i == 250 { b"{\"a\":".to_vec() } else { record(i).into_bytes() }.as_slice());
        text.push(b'\n');
    }
    assert!(text.len() > 4 * PIPELINE_MIN_BYTES);
    let err = log.append_lines(DID, POLICY, &text).unwrap_err();
    // Entry 0 is the open entry: record i is entry i.
    assert!(matches!(&err, AuditError::Record { seq: 250, .. }), "{err}");
    assert!(err.to_string().contains("not JSON"), "{err}");
    assert_eq!(log.len(), 250);
    // The log goes on after the bad record, and what it holds verifies.
    log.append_line(DID, POLICY, record(301).as_bytes()).unwrap();
    log.close().unwrap();
    let v = walk(&files(&path), Some(&[key().verifying_key()]), |_| {}).unwrap();
    assert_eq!(v.records, 250);
}
