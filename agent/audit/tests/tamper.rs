//! Every kind of tampering is found, at the right record; an untouched log verifies; the
//! proofs verify for an honest log and fail for a rewritten history.
#![allow(clippy::unwrap_used)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use agt_jail_audit::{
    entry::{self, CheckpointEntry, SignedHead, TreeHead},
    key::key_id,
    merkle::sha256,
    proof::{self, verify_proof, Proof},
    verify::{walk, walk_with, Tamper, Verified, VerifyError},
    writer::{rotated_path, AuditLog, LineWriter, SyncPolicy},
};
use ed25519_dalek::{SigningKey, VerifyingKey};

mod common;
use common::{key, options};

fn record(i: u64, tag: &str) -> String {
    let outcome = if i.is_multiple_of(3) { "deny" } else { "allow" };
    format!(
        r#"{{"seq":{i},"time":1765000000.{i:03},"agent":"coder","pid":{},"event":"connect","decision":{{"action":"{outcome}","allowed":{}}},"outcome":"{outcome}","note":"{tag}"}}"#,
        1000 + i,
        outcome == "allow"
    )
}

/// A closed log of `n` records, as its files in order.
fn write_log(path: &Path, n: u64, every: u64, rotate: Option<u64>, tag: &str, close: bool) -> Vec<PathBuf> {
    let mut log = AuditLog::create(path, key(), options(every, rotate)).unwrap();
    for i in 1..=n {
        log.append_line("did:mesh:00112233445566778899aabbccddeeff", "sha256:abc", record(i, tag).as_bytes()).unwrap();
    }
    if close {
        log.close().unwrap();
    } else {
        log.flush().unwrap();
    }
    (0..).map(|i| rotated_path(path, i)).take_while(|p| p.exists()).collect()
}

fn keys() -> Vec<VerifyingKey> {
    vec![key().verifying_key()]
}

fn verify(files: &[PathBuf]) -> Result<Verified, VerifyError> {
    walk(files, Some(&keys()), |_| {})
}

fn tampered(files: &[PathBuf]) -> Tamper {
    match verify(files) {
        Err(VerifyError::Tampered(t)) => t,
        other => panic!("not detected: {other:?}"),
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

fn put(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"].as_u64().unwrap()
}

fn index_of(lines: &[String], seq: u64) -> usize {
    lines.iter().position(|l| seq_of(l) == seq).unwrap()
}

fn kind_of(line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["kind"].as_str().unwrap().to_string()
}

fn one_log(n: u64, every: u64) -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_log(&path, n, every, None, "", true);
    let l = lines(&path);
    (dir, path, l)
}

#[test]
fn an_untouched_log_verifies() {
    let (_dir, path, l) = one_log(40, 5);
    let v = verify(&[path]).unwrap();
    assert_eq!(v.entries, l.len() as u64);
    assert_eq!(v.records, 40);
    assert_eq!(v.checkpoints, 9, "every 5 records and at close");
    assert_eq!(v.unsigned, 0);
    assert!(v.closed && v.warnings().is_empty(), "{:?}", v.warnings());
}

#[test]
fn an_edited_byte_of_a_decision_is_found_at_its_record() {
    let (_dir, path, mut l) = one_log(40, 5);
    let i = index_of(&l, 10);
    assert_eq!(kind_of(&l[i]), "record");
    assert!(l[i].contains(r#""action":"deny""#), "{}", l[i]);
    l[i] = l[i].replacen(r#""action":"deny""#, r#""action":"dena""#, 1);
    put(&path, &l);
    let t = tampered(&[path]);
    assert_eq!(t.seq, 10, "{t}");
    assert!(t.why.contains("edited"), "{t}");
}

#[test]
fn a_deleted_record_is_found() {
    let (_dir, path, mut l) = one_log(40, 5);
    let i = index_of(&l, 8);
    l.remove(i);
    put(&path, &l);
    let t = tampered(&[path]);
    assert_eq!((t.seq, t.line), (8, i as u64 + 1), "{t}");
    assert!(t.why.contains("missing"), "{t}");
}

#[test]
fn an_inserted_forged_record_is_found_whether_or_not_it_links() {
    let (_dir, path, l) = one_log(40, 5);
    let i = index_of(&l, 9);
    for link in [true, false] {
        let mut forged_lines = l.clone();
        let mut forged = Vec::new();
        let prev = if link { sha256(l[i - 1].as_bytes()) } else { [9; 32] };
        let value = record(9, "forged");
        entry::write_record_line(
            &mut forged,
            9,
            &prev,
            "did:mesh:00112233445566778899aabbccddeeff",
            "sha256:abc",
            value.as_bytes(),
        )
        .unwrap();
        forged_lines.insert(i, String::from_utf8(forged).unwrap());
        put(&path, &forged_lines);
        let t = tampered(std::slice::from_ref(&path));
        assert_eq!(t.seq, 9, "link {link}: {t}");
        assert!(t.why.contains("inserted"), "{t}");
    }
}

#[test]
fn two_swapped_records_are_found() {
    let (_dir, path, mut l) = one_log(40, 5);
    let i = index_of(&l, 12);
    l.swap(i, i + 1);
    put(&path, &l);
    let t = tampered(&[path]);
    assert_eq!(t.seq, 12, "{t}");
    assert!(t.why.contains("reordered"), "{t}");
}

#[test]
fn a_dropped_checkpoint_is_found() {
    let (_dir, path, mut l) = one_log(40, 5);
    let i = l.iter().position(|x| kind_of(x) == "checkpoint").unwrap();
    let seq = seq_of(&l[i]);
    l.remove(i);
    put(&path, &l);
    let t = tampered(&[path]);
    assert_eq!(t.seq, seq, "{t}");
}

#[test]
fn a_checkpoint_forged_with_another_key_is_found() {
    let (_dir, path, l) = one_log(40, 5);
    let i = l.iter().rposition(|x| kind_of(x) == "checkpoint" && !x.contains("close")).unwrap();
    let seq = seq_of(&l[i]);
    let entry: CheckpointEntry = serde_json::from_str(&l[i]).unwrap();
    let other = SigningKey::from_bytes(&[4; 32]);
    for named_as_ours in [false, true] {
        let mut head: TreeHead = entry.checkpoint.clone();
        if !named_as_ours {
            head.key_id = key_id(&other.verifying_key());
        }
        let forged = SignedHead::sign(head, &other);
        let mut prev_hash = [0u8; 32];
        hex::decode_to_slice(&entry.prev, &mut prev_hash).unwrap();
        let mut forged_lines = l.clone();
        forged_lines[i] = String::from_utf8(entry::checkpoint_line(seq, &prev_hash, forged)).unwrap();
        put(&path, &forged_lines);
        let t = tampered(std::slice::from_ref(&path));
        assert_eq!(t.seq, seq, "{t}");
        let want = if named_as_ours { "does not verify" } else { "not among the given keys" };
        assert!(t.why.contains(want), "{t}");
    }
}

#[test]
fn rotated_files_verify_in_order_and_not_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let files = write_log(&path, 60, 7, Some(3000), "", true);
    assert!(files.len() >= 3, "{files:?}");
    let v = verify(&files).unwrap();
    assert_eq!(v.records, 60);
    // The chain runs on: each file starts with the entry after the last one of the file before.
    let first_of_second = seq_of(&lines(&files[1])[0]);
    assert_eq!(first_of_second, seq_of(lines(&files[0]).last().unwrap()) + 1);
    let mut swapped = files.clone();
    swapped.swap(1, 2);
    let t = tampered(&swapped);
    assert_eq!(t.seq, first_of_second, "{t}");
    assert!(t.why.contains("out of order"), "{t}");
    assert_eq!(t.file, files[2]);
    // The files after the first alone do not pass as a log.
    let t = tampered(&files[1..]);
    assert!(t.why.contains("from the first"), "{t}");
}

#[test]
fn a_truncated_tail_is_a_warning_not_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    // 23 records, a checkpoint every 10: three records and no closing checkpoint follow the last one.
    write_log(&path, 23, 10, None, "", false);
    let v = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!(v.unsigned, 3);
    assert!(!v.closed);
    let warnings = v.warnings().join("\n");
    assert!(warnings.contains("3 records after the last checkpoint are unsigned"), "{warnings}");
    // A write cut short by a kill leaves a partial last line: left out and said so.
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(br#"{"did":"did:mesh:00","kind":"rec"#).unwrap();
    let v = verify(&[path]).unwrap();
    assert_eq!(v.unsigned, 3);
    assert!(v.partial_tail.is_some());
}

#[test]
fn an_entry_appended_after_close_is_found() {
    let (_dir, path, mut l) = one_log(10, 5);
    let last = l.last().unwrap().clone();
    let seq = seq_of(&last) + 1;
    let mut extra = Vec::new();
    let value = record(99, "late");
    entry::write_record_line(&mut extra, seq, &sha256(last.as_bytes()), "did:mesh:00", "sha256:abc", value.as_bytes())
        .unwrap();
    l.push(String::from_utf8(extra).unwrap());
    put(&path, &l);
    assert_eq!(tampered(&[path]).seq, seq);
}

#[test]
fn the_line_writer_takes_records_in_any_split_and_checkpoints_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut opts = options(1000, None);
    opts.checkpoint_interval = Duration::ZERO;
    let log = std::sync::Arc::new(std::sync::Mutex::new(AuditLog::create(&path, key(), opts).unwrap()));
    let mut w = LineWriter::new(log.clone(), "did:mesh:aa".into(), "none".into());
    let text = format!("{}\n{}\n", record(1, ""), record(2, ""));
    let (a, b) = text.as_bytes().split_at(17);
    w.write_all(a).unwrap();
    w.write_all(b).unwrap();
    // The flush is the group commit; the elapsed interval adds a time checkpoint.
    w.flush().unwrap();
    let v = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((v.records, v.checkpoints, v.unsigned), (2, 1, 0));
    assert!(w.write_all(b"not json\n").is_err());
}

#[test]
fn proofs_verify_for_an_honest_log_and_fail_for_a_rewritten_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let files = write_log(&path, 50, 6, None, "", true);
    let l = lines(&path);
    // A witness kept the second checkpoint.
    let kept_line = l.iter().filter(|x| kind_of(x) == "checkpoint").nth(1).unwrap().clone();
    let kept = serde_json::from_str::<CheckpointEntry>(&kept_line).unwrap().head();
    let last = verify(&files).unwrap().last_head.unwrap();

    let p = proof::consistency(&files, kept.clone(), last.clone()).unwrap();
    assert!(verify_proof(&p, &keys()).is_ok(), "{:?}", verify_proof(&p, &keys()));
    for seq in [0, 1, 7, 30, 49] {
        let p = proof::prove(&files, seq).unwrap();
        assert!(verify_proof(&p, &keys()).is_ok(), "{seq}: {:?}", verify_proof(&p, &keys()));
    }
    // A proof for one record does not pass for another entry.
    let Proof::Inclusion { seq, head, path: audit_path, .. } = proof::prove(&files, 7).unwrap() else { panic!() };
    let wrong = Proof::Inclusion { seq, entry: l[8].clone(), head, path: audit_path };
    assert!(verify_proof(&wrong, &keys()).is_err());

    // The same log grown by more records is an honest extension of the kept checkpoint.
    let grown_path = dir.path().join("grown.jsonl");
    let grown = write_log(&grown_path, 70, 6, None, "", true);
    let grown_head = verify(&grown).unwrap().last_head.unwrap();
    let p = proof::consistency(&grown, kept.clone(), grown_head).unwrap();
    assert!(verify_proof(&p, &keys()).is_ok(), "{:?}", verify_proof(&p, &keys()));

    // The host's key holder rewrites record 3 (before the kept checkpoint) and re-signs
    // everything: the new log verifies on its own, but not against the witness's checkpoint.
    let rewritten_path = dir.path().join("rewritten.jsonl");
    let mut log = AuditLog::create(&rewritten_path, key(), options(6, None)).unwrap();
    for i in 1..=70 {
        let tag = if i == 3 { "rewritten" } else { "" };
        log.append_line("did:mesh:00112233445566778899aabbccddeeff", "sha256:abc", record(i, tag).as_bytes()).unwrap();
    }
    log.close().unwrap();
    let rewritten = vec![rewritten_path];
    let new = verify(&rewritten).unwrap().last_head.unwrap();
    // Only record 3 differs from the honest log.
    let differing: Vec<usize> =
        (0..lines(&grown[0]).len()).filter(|i| lines(&grown[0])[*i] != lines(&rewritten[0])[*i]).collect();
    assert_eq!(differing.first(), Some(&3));
    let p = proof::consistency(&rewritten, kept.clone(), new).unwrap();
    let err = verify_proof(&p, &keys()).unwrap_err();
    assert!(err.contains("rewritten"), "{err}");
}

#[test]
fn the_timer_signs_records_left_waiting_and_sync_policies_parse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut opts = options(1000, None);
    opts.checkpoint_interval = Duration::from_millis(20);
    let log = std::sync::Arc::new(std::sync::Mutex::new(AuditLog::create(&path, key(), opts).unwrap()));
    let ticker = agt_jail_audit::Ticker::start(log.clone(), Duration::from_millis(20)).unwrap();
    let mut w = LineWriter::new(log.clone(), "did:mesh:aa".into(), "none".into());
    w.write_all(format!("{}\n", record(1, "")).as_bytes()).unwrap();
    // Flushed before the interval is up: the record is written, not yet signed.
    w.flush().unwrap();
    let start = std::time::Instant::now();
    while verify(std::slice::from_ref(&path)).unwrap().unsigned > 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "no time checkpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(ticker);
    let v = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((v.records, v.checkpoints), (1, 1));
    assert_eq!(v.last_head.unwrap().checkpoint.reason, "time");
    for (text, policy) in [("always", SyncPolicy::Always), ("batch", SyncPolicy::Batch), ("none", SyncPolicy::None)] {
        assert_eq!(text.parse::<SyncPolicy>().unwrap(), policy);
        assert_eq!(policy.as_str(), text);
    }
    assert!("sometimes".parse::<SyncPolicy>().is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever a file holds, the verifier answers (intact or the first bad record), never panics.
    #[test]
    fn any_edit_of_a_log_is_answered_never_a_panic(at in 0usize..4000, byte in proptest::prelude::any::<u8>(), cut in 0usize..4000) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 12, 5, None, "", true);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = at % bytes.len();
        let changed = bytes[at] != byte;
        bytes[at] = byte;
        bytes.truncate(bytes.len() - cut % bytes.len() / 4);
        std::fs::write(&path, &bytes).unwrap();
        let result = verify(std::slice::from_ref(&path));
        // A changed byte inside the signed part is never accepted as intact and fully signed.
        if changed && cut % bytes.len() / 4 == 0 {
            if let Ok(v) = &result {
                proptest::prop_assert!(v.unsigned > 0 || !v.closed || v.partial_tail.is_some(), "{v:?}");
            }
        }
    }
}

#[test]
fn a_log_larger_than_a_read_block_verifies_and_a_deep_deletion_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    // ~21k entries of ~300 bytes: the 4 MiB read blocks end inside lines.
    write_log(&path, 20_000, 500, None, "", true);
    assert!(std::fs::metadata(&path).unwrap().len() > 5 << 20, "{}", std::fs::metadata(&path).unwrap().len());
    let v = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((v.records, v.unsigned), (20_000, 0));
    let mut l = lines(&path);
    let i = index_of(&l, 18_000);
    l.remove(i);
    put(&path, &l);
    let t = tampered(std::slice::from_ref(&path));
    assert_eq!((t.seq, t.line), (18_000, i as u64 + 1), "{t}");
}

#[test]
fn the_verdict_is_the_same_whatever_the_number_of_hashing_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    // More than one batch of lines (4 MiB), so batches hashed on several threads follow each other.
    write_log(&path, 20_000, 500, None, "", false);
    let with = |threads: usize| walk_with(std::slice::from_ref(&path), Some(&keys()), threads, |_| {});
    let one = with(1).unwrap();
    for threads in [2, 3, 7] {
        let many = with(threads).unwrap();
        assert_eq!(
            (many.entries, many.records, many.checkpoints, many.unsigned),
            (one.entries, one.records, one.checkpoints, one.unsigned)
        );
        assert_eq!(many.last_head, one.last_head);
    }
    let mut l = lines(&path);
    let i = index_of(&l, 12_345);
    l[i] = l[i].replacen(r#""outcome":"deny""#, r#""outcome":"dena""#, 1);
    put(&path, &l);
    let tamper_with = |threads: usize| match with(threads) {
        Err(VerifyError::Tampered(t)) => t,
        other => panic!("not detected with {threads} threads: {other:?}"),
    };
    let found = tamper_with(1);
    assert_eq!(found.seq, 12_345, "{found}");
    for threads in [2, 3, 7] {
        assert_eq!(tamper_with(threads), found);
    }
}
