//! Continuing a log whose writer died (kill -9, a crash): the log is verified with the
//! key's public half first, a partial last line (the writer stopped inside a write) is
//! cut off and handed back, and new records continue the chain and the tree; closing
//! signs a final checkpoint. A closed or tampered log is not continued.
use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use ed25519_dalek::SigningKey;

use crate::{
    entry::{self, Reason, SignedHead, TreeHead, FORMAT},
    key::key_id,
    merkle::{leaf_hash, sha256, CompactTree, Hash},
    verify::{walk, EntryRef, Verified, VerifyError},
    writer::{rotated_path, MAX_LINE},
    AuditError,
};

/// Why a log cannot be continued.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Io(#[from] AuditError),
    #[error("{}: the log was opened with key {key_id}, not with this key ({ours})", path.display())]
    OtherKey { path: PathBuf, key_id: String, ours: String },
    #[error("{}: the log is closed (its closing checkpoint is written); nothing may follow it", .0.display())]
    Closed(PathBuf),
}

/// The files of the log that starts at `base`: `base`, `base.1`, ... as long as they exist.
pub fn log_files(base: &Path) -> Vec<PathBuf> {
    let mut files = vec![base.to_path_buf()];
    for index in 1.. {
        let next = rotated_path(base, index);
        if !next.exists() {
            break;
        }
        files.push(next);
    }
    files
}

/// A log being continued.
pub struct Resumed {
    path: PathBuf,
    file: File,
    key: SigningKey,
    key_id: String,
    seq: u64,
    prev: Hash,
    tree: CompactTree,
    pending: Vec<u8>,
    /// What the log held before it was continued.
    pub verified: Verified,
    /// The bytes of a partial last line that were cut off (the writer died inside a write).
    pub torn: Option<Vec<u8>>,
}

impl Resumed {
    /// Verifies the log at `base` (every file of it) with `key`'s public half and opens
    /// its last file for appending; `visit` sees every entry. A partial last line is cut
    /// off (see [`Resumed::torn`]).
    pub fn open(base: &Path, key: SigningKey, mut visit: impl FnMut(&EntryRef<'_>)) -> Result<Resumed, ResumeError> {
        let files = log_files(base);
        let public = [key.verifying_key()];
        let mut tree = CompactTree::default();
        let mut prev = entry::GENESIS;
        let mut opened_by = None;
        let verified = walk(&files, Some(&public), |e| {
            if e.kind == entry::Kind::Open {
                opened_by = serde_json::from_slice::<serde_json::Value>(e.line)
                    .ok()
                    .and_then(|v| v["open"]["key_id"].as_str().map(str::to_string));
            }
            tree.push(leaf_hash(&e.hash));
            prev = e.hash;
            visit(e);
        })?;
        let path = files.last().cloned().unwrap_or_else(|| base.to_path_buf());
        if verified.closed {
            return Err(ResumeError::Closed(path));
        }
        let ours = key_id(&key.verifying_key());
        if opened_by.as_deref() != Some(ours.as_str()) {
            return Err(ResumeError::OtherKey {
                path: base.to_path_buf(),
                key_id: opened_by.unwrap_or_default(),
                ours,
            });
        }
        let mut file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| AuditError::io(&path, e))?;
        let torn = match &verified.partial_tail {
            Some(_) => Some(cut_partial_line(&mut file).map_err(|e| AuditError::io(&path, e))?),
            None => None,
        };
        file.seek(SeekFrom::End(0)).map_err(|e| AuditError::io(&path, e))?;
        Ok(Resumed {
            path,
            file,
            key_id: ours,
            key,
            seq: verified.entries,
            prev,
            tree,
            pending: Vec::new(),
            verified,
            torn,
        })
    }

    /// The file the entries go to (the log's last).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record of the agent `did` under the policy `policy` (buffered until
    /// [`Resumed::close`]).
    pub fn append(&mut self, did: &str, policy: &str, record: &[u8]) -> Result<(), AuditError> {
        let mut line = Vec::new();
        entry::write_record_line(&mut line, self.seq, &self.prev, did, policy, record)
            .map_err(|e| AuditError::Record { seq: self.seq, reason: format!("not JSON: {e}") })?;
        self.push(&line);
        Ok(())
    }

    fn push(&mut self, line: &[u8]) {
        let hash = sha256(line);
        self.pending.extend_from_slice(line);
        self.pending.push(b'\n');
        self.prev = hash;
        self.tree.push(leaf_hash(&hash));
        self.seq += 1;
    }

    /// Signs and appends the closing checkpoint, writes everything and syncs the file.
    pub fn close(mut self, time_ms: u64) -> Result<SignedHead, AuditError> {
        let head = TreeHead {
            key_id: self.key_id.clone(),
            log: FORMAT.into(),
            reason: Reason::Close.as_str().into(),
            root: hex::encode(self.tree.root()),
            time_ms,
            tree_size: self.tree.size(),
        };
        let signed = SignedHead::sign(head, &self.key);
        let line = entry::checkpoint_line(self.seq, &self.prev, signed.clone());
        self.push(&line);
        self.file.write_all(&self.pending).map_err(|e| AuditError::io(&self.path, e))?;
        self.file.sync_data().map_err(|e| AuditError::io(&self.path, e))?;
        Ok(signed)
    }
}

/// Cuts the file after its last newline and returns what followed it.
fn cut_partial_line(file: &mut File) -> std::io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    let window = len.min(MAX_LINE as u64 + 1);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(window as usize);
    file.take(window).read_to_end(&mut tail)?;
    let keep = tail.iter().rposition(|b| *b == b'\n').map_or(0, |at| at + 1);
    let torn = tail.split_off(keep);
    file.set_len(len - torn.len() as u64)?;
    file.sync_data()?;
    Ok(torn)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::writer::{AuditLog, LogOptions, SyncPolicy};

    fn log(dir: &Path, records: u64) -> (PathBuf, SigningKey) {
        let path = dir.join("audit.jsonl");
        let key = SigningKey::from_bytes(&[9; 32]);
        let opts = LogOptions { checkpoint_every: 3, sync: SyncPolicy::None, ..LogOptions::default() };
        let mut log = AuditLog::create(&path, key.clone(), opts).unwrap();
        for n in 0..records {
            log.append_line("did:mesh:00", "none", format!(r#"{{"n":{n}}}"#).as_bytes()).unwrap();
        }
        log.flush().unwrap();
        // Dropped without close: as a killed writer leaves it.
        (path, key)
    }

    trait Mkdir {
        fn tap_mkdir(self) -> Self;
    }

    impl Mkdir for PathBuf {
        fn tap_mkdir(self) -> Self {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }

    fn verify(path: &Path, key: &SigningKey) -> Verified {
        walk(&log_files(path), Some(&[key.verifying_key()]), |_| {}).unwrap()
    }

    #[test]
    fn a_killed_writers_log_is_continued_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = log(dir.path(), 7);
        let before = verify(&path, &key);
        assert!(!before.closed && before.unsigned > 0);
        let mut seen = 0;
        let mut resumed = Resumed::open(&path, key.clone(), |_| seen += 1).unwrap();
        assert_eq!(seen, before.entries);
        assert!(resumed.torn.is_none());
        resumed.append("did:mesh:00", "none", br#"{"recovered":true}"#).unwrap();
        resumed.close(1).unwrap();
        let after = verify(&path, &key);
        assert!(after.closed, "{after:?}");
        assert_eq!((after.records, after.unsigned), (before.records + 1, 0));
        // Closed: not continued again.
        assert!(matches!(Resumed::open(&path, key, |_| {}), Err(ResumeError::Closed(_))));
    }

    #[test]
    fn a_torn_last_line_is_cut_and_handed_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = log(dir.path(), 4);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"did":"did:mesh:00","kind":"rec"#).unwrap();
        drop(file);
        assert!(verify(&path, &key).partial_tail.is_some());
        let resumed = Resumed::open(&path, key.clone(), |_| {}).unwrap();
        assert_eq!(resumed.torn.as_deref(), Some(&br#"{"did":"did:mesh:00","kind":"rec"#[..]));
        resumed.close(1).unwrap();
        let after = verify(&path, &key);
        assert!(after.closed && after.partial_tail.is_none(), "{after:?}");
    }

    #[test]
    fn a_tampered_log_or_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = log(dir.path(), 5);
        let other = SigningKey::from_bytes(&[1; 32]);
        assert!(matches!(Resumed::open(&path, other.clone(), |_| {}), Err(ResumeError::Verify(_))));
        let (short, _) = log(&dir.path().join("short").tap_mkdir(), 1);
        assert!(matches!(Resumed::open(&short, other, |_| {}), Err(ResumeError::OtherKey { .. })));
        let text = std::fs::read_to_string(&path).unwrap().replacen(r#""n":2"#, r#""n":3"#, 1);
        std::fs::write(&path, text).unwrap();
        assert!(matches!(Resumed::open(&path, key, |_| {}), Err(ResumeError::Verify(VerifyError::Tampered(_)))));
    }
}
