//! The host's audit signing key: an Ed25519 seed in a root-only file, created on first use.
use std::{
    fs::{self, OpenOptions},
    io::{Read, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::{merkle::sha256, AuditError};

/// Where `agt-jail exec --audit` keeps the host key unless `--audit-key` says otherwise.
pub const DEFAULT_KEY_PATH: &str = "/var/lib/agt-jail/audit.key";

/// Longest key file read (a hex seed and a newline; anything longer is not a key file).
const KEY_FILE_MAX: u64 = 4096;

fn key_err(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Key { path: path.to_path_buf(), reason: reason.into() }
}

/// Loads the signing key at `path`, creating it (mode 0600, directory 0700) when absent.
/// An existing key file readable by group or others is refused.
pub fn load_or_create(path: &Path) -> Result<SigningKey, AuditError> {
    match fs::metadata(path) {
        Ok(_) => load(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(e) => Err(key_err(path, e.to_string())),
    }
}

fn create(path: &Path) -> Result<SigningKey, AuditError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| key_err(path, format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| AuditError::io(Path::new("/dev/urandom"), e))?;
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| AuditError::io(path, e))?;
    file.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| AuditError::io(path, e))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn load(path: &Path) -> Result<SigningKey, AuditError> {
    let file = fs::File::open(path).map_err(|e| key_err(path, e.to_string()))?;
    let meta = file.metadata().map_err(|e| key_err(path, e.to_string()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(key_err(
            path,
            format!("mode {:o} lets others read it; chmod 600", meta.permissions().mode() & 0o777),
        ));
    }
    let mut text = String::new();
    file.take(KEY_FILE_MAX).read_to_string(&mut text).map_err(|e| AuditError::io(path, e))?;
    let seed = parse_hex32(text.trim()).ok_or_else(|| key_err(path, "not a key file (64 hex digits expected)"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A public key from `text`: 64 hex digits, or a file holding them (as `audit key` prints).
pub fn parse_public(text: &str) -> Result<VerifyingKey, AuditError> {
    let path = Path::new(text);
    let hex_text = match parse_hex32(text.trim()) {
        Some(_) => text.trim().to_string(),
        None => {
            let mut s = String::new();
            fs::File::open(path)
                .and_then(|f| f.take(KEY_FILE_MAX).read_to_string(&mut s))
                .map_err(|e| AuditError::io(path, e))?;
            s.trim().to_string()
        }
    };
    let bytes = parse_hex32(&hex_text).ok_or_else(|| key_err(path, "not a public key (64 hex digits expected)"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| key_err(path, format!("not an Ed25519 public key: {e}")))
}

/// The id a checkpoint names its key by: the first 8 bytes of SHA-256(public key), as hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&sha256(key.as_bytes())[..8])
}

pub(crate) fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_key_is_created_root_only_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.key");
        let key = load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(load_or_create(&path).unwrap().to_bytes(), key.to_bytes());
        let public = hex::encode(key.verifying_key().as_bytes());
        assert_eq!(parse_public(&public).unwrap(), key.verifying_key());
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
