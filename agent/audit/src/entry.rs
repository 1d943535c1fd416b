//! The entries of an audit file: one canonical JSON object (RFC 8785) per line.
//!
//! Every entry carries `seq` (0, 1, 2, ... across rotated files) and `prev`, the SHA-256
//! of the previous entry's whole line (without its newline); entry 0 is the `open` entry.
//! `record` entries carry the agent's DID, the hash of the policy in force and the record
//! the events file gets; `checkpoint` entries carry a tree head signed by the host key.
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    key::{key_id, parse_hex32},
    merkle::Hash,
};

/// The format name every `open` entry and tree head carries.
pub const FORMAT: &str = "agt-jail-audit/1";

/// `prev` of entry 0.
pub const GENESIS: Hash = [0; 32];

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Open,
    Record,
    Checkpoint,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "open" => Some(Kind::Open),
            "record" => Some(Kind::Record),
            "checkpoint" => Some(Kind::Checkpoint),
            _ => None,
        }
    }
}

/// Why a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `--audit-checkpoint-every` records since the last one.
    Count,
    /// `--audit-checkpoint-secs` since the last one.
    Time,
    /// The log was closed: nothing follows.
    Close,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Count => "count",
            Reason::Time => "time",
            Reason::Close => "close",
        }
    }
}

/// A tree head: the RFC 9162 root over the hashes of entries `0..tree_size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeHead {
    pub key_id: String,
    pub log: String,
    pub reason: String,
    pub root: String,
    pub time_ms: u64,
    pub tree_size: u64,
}

impl TreeHead {
    /// The bytes the signature covers: the head's canonical JSON.
    pub fn message(&self) -> Vec<u8> {
        // A struct of strings and integers always serialises.
        serde_json_canonicalizer::to_vec(self).unwrap_or_default()
    }

    pub fn root_hash(&self) -> Option<Hash> {
        parse_hex32(&self.root)
    }
}

/// A tree head with its Ed25519 signature: what a witness keeps and a proof carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    pub checkpoint: TreeHead,
    pub signature: String,
}

impl SignedHead {
    pub fn sign(head: TreeHead, key: &SigningKey) -> SignedHead {
        let signature = key.sign(&head.message());
        SignedHead { checkpoint: head, signature: hex::encode(signature.to_bytes()) }
    }

    /// Checks the signature with the key the head names; the error says why not.
    pub fn verify(&self, keys: &[VerifyingKey]) -> Result<(), String> {
        let head = &self.checkpoint;
        if head.log != FORMAT {
            return Err(format!("unknown log format {:?}", head.log));
        }
        let Some(key) = keys.iter().find(|k| key_id(k) == head.key_id) else {
            return Err(format!(
                "signed by key {} which is not among the given keys (forged or another host's)",
                head.key_id
            ));
        };
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig).map_err(|_| "the signature is not 64 hex bytes".to_string())?;
        key.verify(&head.message(), &Signature::from_bytes(&sig))
            .map_err(|_| format!("the signature does not verify with key {} (forged or edited)", head.key_id))
    }
}

/// A checkpoint entry as it is written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointEntry {
    pub checkpoint: TreeHead,
    pub kind: String,
    pub prev: String,
    pub seq: u64,
    pub signature: String,
}

impl CheckpointEntry {
    pub fn head(self) -> SignedHead {
        SignedHead { checkpoint: self.checkpoint, signature: self.signature }
    }
}

/// The settings an `open` entry records, so a reader knows the log's cadence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenFields {
    pub checkpoint_every: u64,
    pub checkpoint_secs: u64,
    pub format: String,
    pub key_id: String,
    pub sync: String,
    pub time_ms: u64,
}

#[derive(Serialize)]
struct OpenEntry<'a> {
    kind: &'static str,
    open: &'a OpenFields,
    prev: String,
    seq: u64,
}

/// The canonical line (without newline) of the `open` entry.
pub fn open_line(fields: &OpenFields) -> Vec<u8> {
    let entry = OpenEntry { kind: "open", open: fields, prev: hex::encode(GENESIS), seq: 0 };
    serde_json_canonicalizer::to_vec(&entry).unwrap_or_default()
}

/// The canonical line of a checkpoint entry.
pub fn checkpoint_line(seq: u64, prev: &Hash, head: SignedHead) -> Vec<u8> {
    let entry = CheckpointEntry {
        checkpoint: head.checkpoint,
        kind: "checkpoint".into(),
        prev: hex::encode(prev),
        seq,
        signature: head.signature,
    };
    serde_json_canonicalizer::to_vec(&entry).unwrap_or_default()
}

/// Appends the canonical line of a record entry to `out`. The keys are written in their
/// canonical (sorted) order and each value canonically, so the whole line is canonical.
pub fn write_record_line(
    out: &mut Vec<u8>,
    seq: u64,
    prev: &Hash,
    did: &str,
    policy: &str,
    record: &Value,
) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"did\":");
    serde_json_canonicalizer::to_writer(&did, out)?;
    out.extend_from_slice(b",\"kind\":\"record\",\"policy\":");
    serde_json_canonicalizer::to_writer(&policy, out)?;
    out.extend_from_slice(b",\"prev\":\"");
    let mut hex_buf = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(prev, &mut hex_buf);
    out.extend_from_slice(&hex_buf);
    out.extend_from_slice(b"\",\"record\":");
    serde_json_canonicalizer::to_writer(record, out)?;
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.push(b'}');
    Ok(())
}

/// The fields every entry has, read without building the rest.
#[derive(Debug, Deserialize)]
pub struct Head<'a> {
    #[serde(borrow)]
    pub kind: &'a str,
    #[serde(borrow)]
    pub prev: &'a str,
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn a_record_line_is_canonical_json() {
        let record = json!({"z": 1.0, "a": [1e21, "\u{7f}é\n"], "m": {"b": null, "a": true}, "time": 1765000000.25});
        let mut line = Vec::new();
        write_record_line(&mut line, 7, &[0xab; 32], "did:mesh:00", "sha256:x", &record).unwrap();
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(serde_json_canonicalizer::to_vec(&value).unwrap(), line);
        let text = String::from_utf8(line).unwrap();
        // RFC 8785: integral doubles without a fraction, exponents as ECMAScript prints them.
        assert!(text.contains(r#""record":{"a":[1e+21,"#), "{text}");
        assert!(text.contains(r#""z":1}"#), "{text}");
        assert!(text.ends_with(r#","seq":7}"#), "{text}");
    }

    #[test]
    fn a_signed_head_verifies_only_with_its_key_and_untouched() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let head = TreeHead {
            key_id: key_id(&key.verifying_key()),
            log: FORMAT.into(),
            reason: "count".into(),
            root: hex::encode([1u8; 32]),
            time_ms: 5,
            tree_size: 3,
        };
        let signed = SignedHead::sign(head, &key);
        assert!(signed.verify(&[other.verifying_key(), key.verifying_key()]).is_ok());
        assert!(signed.verify(&[other.verifying_key()]).unwrap_err().contains("not among the given keys"));
        let mut edited = signed.clone();
        edited.checkpoint.tree_size = 4;
        assert!(edited.verify(&[key.verifying_key()]).unwrap_err().contains("does not verify"));
    }
}
