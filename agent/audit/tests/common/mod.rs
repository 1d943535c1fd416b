//! What the audit crate's integration tests share: a fixed key and log options with a
//! fixed clock, so that two logs of the same records are the same bytes.
use std::time::Duration;

use agt_jail_audit::{
    writer::{LogOptions, SyncPolicy},
    SigningKey,
};

pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}

/// A checkpoint every `every` records (none by time), no fsync, rotation at `rotate` bytes.
pub fn options(every: u64, rotate: Option<u64>) -> LogOptions {
    LogOptions {
        checkpoint_every: every,
        checkpoint_interval: Duration::from_secs(3600),
        sync: SyncPolicy::None,
        rotate_bytes: rotate,
        clock: || 1_765_000_000_000,
    }
}
