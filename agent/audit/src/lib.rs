//! agt-jail's tamper-evident audit log (docs/audit.md).
//!
//! Every record of an agent becomes an entry: canonical JSON (RFC 8785), numbered,
//! chained to the previous entry by its SHA-256, and covered by Ed25519-signed tree heads
//! (RFC 9162 Merkle trees) written every N records, every T seconds and at close. The
//! verifier finds the first entry that is edited, missing, inserted or out of place; the
//! proofs let one record be shown to be in the log, and a later tree head to extend an
//! earlier one, with the public key alone.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

pub mod canon;
pub mod entry;
pub mod key;
pub mod merkle;
pub mod pipeline;
pub mod proof;
pub mod resume;
pub mod show;
pub mod verify;
pub mod writer;

pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use entry::{Reason, SignedHead, TreeHead};
pub use writer::{AuditLog, LineWriter, LogOptions, SharedLog, SyncPolicy, Ticker};

/// What can go wrong writing or reading a log (a tampered log is [`verify::Tamper`]).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{}: already exists and is not empty (an audit log starts in a new file)", .0.display())]
    Exists(PathBuf),
    #[error("audit record {seq}: {reason}")]
    Record { seq: u64, reason: String },
    #[error("{}: the audit log is closed", .0.display())]
    Closed(PathBuf),
}

/// Lowercase hex of `bytes` (hashes and keys as the log and its tools print them).
pub fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

impl AuditError {
    pub fn io(path: &Path, source: std::io::Error) -> AuditError {
        AuditError::Io { path: path.to_path_buf(), source }
    }
}
