//! Keyed identifiers for keys, for analytics records.
//!
//! Keys are looked up by their plain SHA-256, which is fine inside the gateway, but a plain
//! SHA-256 written to an analytics file lets whoever reads the file test guesses offline and
//! match records against the key store. Records therefore carry the key Secret's name and
//! `HMAC-SHA256(installation secret, SHA-256 of the key)`: stable per key and per
//! installation, useless without the secret. It is computed once per key, when a runtime is
//! built, never per request.
//!
//! The secret comes from `--key-id-secret-file` (the chart mounts a Secret generated once by
//! Helm), or else from `<state dir>/key-id-secret`, created with 32 random bytes on first
//! start and kept from then on.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Secrets shorter than this are refused: an HMAC key is only as good as its entropy.
const MIN_LEN: usize = 16;
const GENERATED_LEN: usize = 32;
/// The file under the state directory holding a generated secret.
pub const STATE_FILE: &str = "key-id-secret";

/// The installation's HMAC key, already keyed: each id clones the prepared state.
#[derive(Clone)]
pub struct KeyIdSecret {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for KeyIdSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyIdSecret(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyIdError {
    #[error("--key-id-secret-file {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("{path}: the key id secret holds {len} bytes; at least {MIN_LEN} are needed")]
    TooShort { path: PathBuf, len: usize },
    #[error("--state-dir {path}: cannot keep the generated key id secret there: {source}")]
    NotPersisted { path: PathBuf, source: std::io::Error },
    #[error("no randomness for a key id secret: {0}")]
    NoRandomness(getrandom::Error),
}

impl KeyIdSecret {
    pub fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        Self { mac }
    }

    /// The secret from `file` if given, else the one kept in `state_dir` (created once).
    pub fn load(file: Option<&Path>, state_dir: &Path) -> Result<Self, KeyIdError> {
        match file {
            Some(path) => Self::read(path),
            None => Self::persisted(state_dir),
        }
    }

    fn read(path: &Path) -> Result<Self, KeyIdError> {
        let bytes =
            std::fs::read(path).map_err(|source| KeyIdError::Unreadable { path: path.to_path_buf(), source })?;
        // A trailing newline from `echo` or an editor is not part of the secret.
        let secret = bytes.trim_ascii_end();
        if secret.len() < MIN_LEN {
            return Err(KeyIdError::TooShort { path: path.to_path_buf(), len: secret.len() });
        }
        Ok(Self::new(secret))
    }

    fn persisted(state_dir: &Path) -> Result<Self, KeyIdError> {
        let path = state_dir.join(STATE_FILE);
        let fail = |source| KeyIdError::NotPersisted { path: state_dir.to_path_buf(), source };
        if !path.exists() {
            let mut secret = [0u8; GENERATED_LEN];
            getrandom::fill(&mut secret).map_err(KeyIdError::NoRandomness)?;
            std::fs::create_dir_all(state_dir).map_err(fail)?;
            let tmp = state_dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
            let written = write_private(&tmp, hex::encode(secret).as_bytes())
                // A link fails if the file exists: when two processes race, both end up
                // reading the one secret that won.
                .and_then(|()| match std::fs::hard_link(&tmp, &path) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                    _ => Ok(()),
                });
            let _ = std::fs::remove_file(&tmp);
            written.map_err(fail)?;
            tracing::info!(file = %path.display(), "generated the key id secret for analytics");
        }
        Self::read(&path)
    }

    /// The keyed id of a key, from its SHA-256: lowercase hex.
    pub fn id(&self, key_sha256: &[u8; 32]) -> Arc<str> {
        let mut mac = self.mac.clone();
        mac.update(key_sha256);
        Arc::from(hex::encode(mac.finalize().into_bytes()))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    #[test]
    fn ids_are_keyed_stable_and_not_the_plain_hash() {
        let digest: [u8; 32] = Sha256::digest(b"the-token").into();
        let a = KeyIdSecret::new(b"0123456789abcdef0123456789abcdef");
        let b = KeyIdSecret::new(b"another installation's secret!!");
        assert_eq!(a.id(&digest), a.id(&digest));
        assert_ne!(a.id(&digest), b.id(&digest));
        assert_ne!(&*a.id(&digest), hex::encode(digest));
        assert_eq!(a.id(&digest).len(), 64);
    }

    #[test]
    fn a_generated_secret_is_kept_across_restarts_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let digest = [7u8; 32];
        let first = KeyIdSecret::load(None, &state).expect("generated").id(&digest);
        let again = KeyIdSecret::load(None, &state).expect("read back").id(&digest);
        assert_eq!(first, again);
        let mode = std::fs::metadata(state.join(STATE_FILE)).expect("kept").permissions().mode();
        assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
    }

    #[test]
    fn a_short_or_missing_secret_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").expect("write");
        let e = KeyIdSecret::load(Some(&short), dir.path()).expect_err("too short").to_string();
        assert!(e.contains("holds 3 bytes; at least 16"), "{e}");
        let e = KeyIdSecret::load(Some(&dir.path().join("nope")), dir.path()).expect_err("missing").to_string();
        assert!(e.starts_with("--key-id-secret-file "), "{e}");
    }
}
