//! Appends records to an audit log the way `exec --audit` does (whole batches of lines
//! through a `LineWriter`, a flush per batch), for instruction counts under callgrind:
//!
//! `valgrind --tool=callgrind --separate-threads=yes target/release/examples/append 20000 64`
//!
//! Arguments: the number of records (default 20000) and the records per batch (default 64).
#![allow(clippy::unwrap_used)]

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use agt_jail_audit::{
    writer::{AuditLog, LineWriter, LogOptions, SyncPolicy},
    SigningKey,
};

const RECORD: &str = r#"{"agent":"coder","context":{"agent":{"did":"did:mesh:9c1f3e0a8b7d6c5e4f3a2b1c0d9e8f7a","id":"coder","ring":2,"session":"5f0e1d2c3b4a59687766554433221100","tier":"standard","trust":500},"event":"connect","net":{"addr":"10.1.2.3","domain":null,"family":"inet","port":443,"protocol":"tcp"},"proc":{"comm":"python3","exe":"/usr/bin/python3.11","pid":4359,"ppid":4340,"uid":1000}},"decision":{"action":"deny","allowed":false,"matched_rule":"coding-agent/block-egress","policy":"coding-agent","reason":"egress to unlisted hosts is denied"},"event":"connect","latency_us":3,"matched_rule":"coding-agent/block-egress","outcome":"deny","pid":4359,"plane":"kernel","seq":1234,"time":1765111234.567891}"#;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(20_000, |a| a.parse().unwrap());
    let batch: u64 = args.next().map_or(64, |a| a.parse().unwrap()).max(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let opts = LogOptions {
        checkpoint_every: 1000,
        checkpoint_interval: Duration::from_secs(10),
        sync: SyncPolicy::None,
        ..LogOptions::default()
    };
    let log = Arc::new(Mutex::new(AuditLog::create(&path, SigningKey::from_bytes(&[1; 32]), opts).unwrap()));
    let mut writer = LineWriter::new(
        Arc::clone(&log),
        "did:mesh:9c1f3e0a8b7d6c5e4f3a2b1c0d9e8f7a".into(),
        "sha256:5b41362bc82b7f3d56edc5a306db22105707d01ff4819e26faef9724a2d406c9".into(),
    );
    let mut lines = Vec::new();
    let mut left = n;
    while left > 0 {
        let now = left.min(batch);
        lines.clear();
        for _ in 0..now {
            lines.extend_from_slice(RECORD.as_bytes());
            lines.push(b'\n');
        }
        writer.write_all(&lines).unwrap();
        writer.flush().unwrap();
        left -= now;
    }
    log.lock().unwrap().close().unwrap();
    println!("{n} records in batches of {batch}: {} entries", log.lock().unwrap().len());
}
