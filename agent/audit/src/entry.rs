//! The entries of an audit file: one canonical JSON object (RFC 8785) per line.
//!
//! Every entry carries `seq` (0, 1, 2, ... across rotated files) and `prev`, the SHA-256
//! of the previous entry's whole line (without its newline); entry 0 is the `open` entry.
//! `record` entries carry the agent's DID, the hash of the policy in force and the record
//! the events file gets; `checkpoint` entries carry a tree head signed by the host key.
use std::io::Write as _;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{
    canon::{canonicalize, CanonError},
    key::{key_id, parse_hex32},
    merkle::{hex32, Hash},
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

/// Appends the canonical line of a record entry to `out`; `record` is the record's JSON
/// text. The keys are written in their canonical (sorted) order and each value
/// canonically, so the whole line is canonical.
pub fn write_record_line(
    out: &mut Vec<u8>,
    seq: u64,
    prev: &Hash,
    did: &str,
    policy: &str,
    record: &[u8],
) -> Result<(), CanonError> {
    write_record_after(out, &record_line_start(did, policy), seq, prev, record)
}

/// The bytes every record entry of one agent under one policy starts with (its `did`,
/// `kind` and `policy`, up to the opening quote of `prev`), for [`write_record_after`].
pub fn record_line_start(did: &str, policy: &str) -> Vec<u8> {
    let mut out = b"{\"did\":".to_vec();
    write_str(&mut out, did);
    out.extend_from_slice(b",\"kind\":\"record\",\"policy\":");
    write_str(&mut out, policy);
    out.extend_from_slice(b",\"prev\":\"");
    out
}

/// [`write_record_line`] with its start already written by [`record_line_start`].
pub fn write_record_after(
    out: &mut Vec<u8>,
    start: &[u8],
    seq: u64,
    prev: &Hash,
    record: &[u8],
) -> Result<(), CanonError> {
    write_record_head(out, start, prev);
    canonicalize(record, out)?;
    write_record_tail(out, seq);
    Ok(())
}

/// The bytes of a record entry before its record: `start` (from [`record_line_start`]),
/// `prev` and the `record` key.
pub fn write_record_head(out: &mut Vec<u8>, start: &[u8], prev: &Hash) {
    out.extend_from_slice(start);
    out.extend_from_slice(&hex32(prev));
    out.extend_from_slice(b"\",\"record\":");
}

/// The bytes of a record entry after its (canonical) record: `seq` and the closing brace.
pub fn write_record_tail(out: &mut Vec<u8>, seq: u64) {
    // Writing into a Vec does not fail.
    let _ = write!(out, ",\"seq\":{seq}}}");
}

/// A string as RFC 8785 writes it (serde_json escapes the same way; see `canon`).
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec does not fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `seq` and `prev` (its hex) of a record entry as the writer lays it out, read from the
/// line's fixed places without parsing it; `None` for anything else (other kinds, or a
/// line not in the writer's form), which the caller parses in full.
///
/// Reading fields this way is sound for verification because nothing read here is
/// trusted on its own: the line's bytes are hashed whole, and the hash must be the next
/// entry's `prev` and under the signed root.
pub fn record_head(line: &[u8]) -> Option<(u64, &[u8])> {
    let rest = line.strip_prefix(b"{\"did\":\"")?;
    let rest = skip_plain_string(rest)?;
    let rest = rest.strip_prefix(b",\"kind\":\"record\",\"policy\":\"")?;
    let rest = skip_plain_string(rest)?;
    let rest = rest.strip_prefix(b",\"prev\":\"")?;
    let (prev, rest) = (rest.get(..64)?, rest.get(64..)?);
    rest.strip_prefix(b"\",\"record\":{")?;
    let body = line.strip_suffix(b"}")?;
    let digits = body.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let (head, seq) = body.split_at(body.len() - digits);
    if !head.ends_with(b",\"seq\":") || digits == 0 || (digits > 1 && seq[0] == b'0') {
        return None;
    }
    Some((std::str::from_utf8(seq).ok()?.parse().ok()?, prev))
}

/// The bytes after a string's closing quote, for a string without escapes.
fn skip_plain_string(s: &[u8]) -> Option<&[u8]> {
    let end = s.iter().position(|c| *c == b'"' || *c == b'\\')?;
    (s[end] == b'"').then(|| &s[end + 1..])
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
    use serde_json::Value;

    use super::*;

    #[test]
    fn a_record_line_is_canonical_json() {
        let record = r#"{"z": 1.0, "a": [1e21, "\u007fé\n"], "m": {"b": null, "a": true}, "time": 1765000000.25}"#;
        let mut line = Vec::new();
        write_record_line(&mut line, 7, &[0xab; 32], "did:mesh:00", "sha256:x", record.as_bytes()).unwrap();
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(serde_json_canonicalizer::to_vec(&value).unwrap(), line);
        let text = String::from_utf8(line).unwrap();
        // RFC 8785: integral doubles without a fraction, exponents as ECMAScript prints them.
        assert!(text.contains(r#""record":{"a":[1e+21,"#), "{text}");
        assert!(text.contains(r#""z":1}"#), "{text}");
        assert!(text.ends_with(r#","seq":7}"#), "{text}");
    }

    #[test]
    fn the_fixed_places_of_a_record_line_are_read_and_other_lines_are_not() {
        let mut line = Vec::new();
        write_record_line(&mut line, 42, &[0xab; 32], "did:mesh:00", "sha256:x", br#"{"seq":7}"#).unwrap();
        let (seq, prev) = record_head(&line).unwrap();
        assert_eq!((seq, prev), (42, hex::encode([0xab; 32]).as_bytes()));
        let head: Head<'_> = serde_json::from_slice(&line).unwrap();
        assert_eq!((head.seq, head.prev.as_bytes()), (seq, prev));
        for other in [&br#"{"did":"a\"b","kind":"record"}"#[..], br#"{"kind":"open"}"#, b"", b"}"] {
            assert!(record_head(other).is_none());
        }
        let mut leading_zero = line.clone();
        leading_zero.splice(line.len() - 3..line.len() - 1, *b"042");
        assert!(record_head(&leading_zero).is_none());
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
