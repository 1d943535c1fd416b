//! Inclusion and consistency proofs as JSON documents that verify with the public key
//! alone: a signed tree head and the RFC 9162 audit path.
use std::path::PathBuf;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::{
    entry::{Kind, SignedHead},
    key::parse_hex32,
    merkle::{self, leaf_hash, sha256, Hash},
    verify::{walk, VerifyError},
};

/// A proof as `audit prove` and `audit consistency` print it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "proof", rename_all = "snake_case", deny_unknown_fields)]
pub enum Proof {
    /// Entry `seq` (its exact line) is leaf `seq` of the tree `head` signs.
    Inclusion { seq: u64, entry: String, head: SignedHead, path: Vec<String> },
    /// The tree `new` signs extends the tree `old` signs.
    Consistency { old: SignedHead, new: SignedHead, path: Vec<String> },
}

/// Why a proof cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error(transparent)]
    Log(#[from] VerifyError),
    #[error("{0}")]
    Unprovable(String),
}

/// The log's leaves, its entries' lines where wanted, and its checkpoints.
struct Scan {
    leaves: Vec<Hash>,
    heads: Vec<SignedHead>,
    line: Option<String>,
}

fn scan(files: &[PathBuf], want_line: Option<u64>) -> Result<Scan, VerifyError> {
    let mut s = Scan { leaves: Vec::new(), heads: Vec::new(), line: None };
    walk(files, None, |e| {
        s.leaves.push(leaf_hash(&e.hash));
        if Some(e.seq) == want_line {
            s.line = Some(String::from_utf8_lossy(e.line).into_owned());
        }
        if e.kind == Kind::Checkpoint {
            if let Ok(entry) = serde_json::from_slice::<crate::entry::CheckpointEntry>(e.line) {
                s.heads.push(entry.head());
            }
        }
    })?;
    Ok(s)
}

fn hexes(path: &[Hash]) -> Vec<String> {
    path.iter().map(hex::encode).collect()
}

/// The inclusion proof of entry `seq` in the tree of the log's last checkpoint.
pub fn prove(files: &[PathBuf], seq: u64) -> Result<Proof, ProveError> {
    let s = scan(files, Some(seq))?;
    let entry = s.line.ok_or_else(|| ProveError::Unprovable(format!("the log has no record {seq}")))?;
    let head = s
        .heads
        .last()
        .filter(|h| h.checkpoint.tree_size > seq)
        .ok_or_else(|| {
            ProveError::Unprovable(format!("record {seq} comes after the last checkpoint: it is not signed yet"))
        })?
        .clone();
    let size = usize::try_from(head.checkpoint.tree_size).unwrap_or(usize::MAX);
    let index = usize::try_from(seq).unwrap_or(usize::MAX);
    let path = merkle::inclusion_proof(index, &s.leaves[..size.min(s.leaves.len())])
        .ok_or_else(|| ProveError::Unprovable(format!("record {seq} is not in the tree")))?;
    Ok(Proof::Inclusion { seq, entry, head, path: hexes(&path) })
}

/// The consistency proof between two tree heads, from the log's leaves. The proof is
/// the log's claim: a log whose history was rewritten yields one that does not verify.
pub fn consistency(files: &[PathBuf], old: SignedHead, new: SignedHead) -> Result<Proof, ProveError> {
    let s = scan(files, None)?;
    let (m, n) = (old.checkpoint.tree_size, new.checkpoint.tree_size);
    if m > n {
        return Err(ProveError::Unprovable(format!(
            "the old checkpoint ({m} entries) is larger than the new one ({n})"
        )));
    }
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if n > s.leaves.len() {
        return Err(ProveError::Unprovable(format!(
            "the new checkpoint covers {n} entries but the log has {}",
            s.leaves.len()
        )));
    }
    let path = merkle::consistency_proof(usize::try_from(m).unwrap_or(usize::MAX), &s.leaves[..n])
        .ok_or_else(|| ProveError::Unprovable("the old checkpoint is not in the log".into()))?;
    Ok(Proof::Consistency { old, new, path: hexes(&path) })
}

fn parse_path(path: &[String]) -> Result<Vec<Hash>, String> {
    path.iter()
        .enumerate()
        .map(|(i, h)| parse_hex32(h).ok_or_else(|| format!("path[{i}] is not a SHA-256 hex value")))
        .collect()
}

fn root_of(head: &SignedHead) -> Result<Hash, String> {
    head.checkpoint.root_hash().ok_or_else(|| "the checkpoint's root is not a SHA-256 hex value".to_string())
}

/// Checks a proof with the public keys alone; `Ok` says what it proved.
pub fn verify_proof(proof: &Proof, keys: &[VerifyingKey]) -> Result<String, String> {
    match proof {
        Proof::Inclusion { seq, entry, head, path } => {
            head.verify(keys).map_err(|e| format!("checkpoint: {e}"))?;
            let claimed: crate::entry::Head<'_> =
                serde_json::from_str(entry).map_err(|e| format!("the entry is not an audit entry: {e}"))?;
            if claimed.seq != *seq {
                return Err(format!("the entry is record {}, not record {seq}", claimed.seq));
            }
            let leaf = leaf_hash(&sha256(entry.as_bytes()));
            let size = head.checkpoint.tree_size;
            if !merkle::verify_inclusion(*seq, size, &leaf, &parse_path(path)?, &root_of(head)?) {
                return Err(format!("record {seq} is not in the tree of {size} entries that the checkpoint signs"));
            }
            Ok(format!("record {seq} is entry {seq} of the signed tree of {size} entries"))
        }
        Proof::Consistency { old, new, path } => {
            old.verify(keys).map_err(|e| format!("old checkpoint: {e}"))?;
            new.verify(keys).map_err(|e| format!("new checkpoint: {e}"))?;
            let (m, n) = (old.checkpoint.tree_size, new.checkpoint.tree_size);
            if !merkle::verify_consistency(m, n, &root_of(old)?, &root_of(new)?, &parse_path(path)?) {
                return Err(format!(
                    "the tree of {n} entries does not extend the tree of {m} entries: the log's history was rewritten"
                ));
            }
            Ok(format!("the signed tree of {n} entries extends the signed tree of {m} entries"))
        }
    }
}
