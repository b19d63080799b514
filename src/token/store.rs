//! The refresh-token store: one encrypted file per account.
//!
//! A file holds the account's refresh token and its latest access token, as
//! JSON sealed with AES-256-GCM under the store key (random 96-bit nonce per
//! write; the identity and account are authenticated data, so a file copied
//! over another account's does not decrypt). Writes are atomic: a temporary
//! file is written, fsynced and renamed over the old one. A separate lock
//! file serialises refreshes between processes (the proxy and `token`).
//!
//! Nothing here ever deletes a token file: a wrong key or a damaged file is
//! reported, and the file is left for the admin.

use crate::config::keys::{parse_store_key, KeyError, STORE_KEY_LEN};
use crate::config::{TokenStoreConfig, TokenStoreKey};
use crate::secret::Secret;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 6] = b"X2PTS1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: cannot decrypt: the token_store key is not the one this file was written with, or the file is damaged (the file was left untouched)")]
    Undecryptable { path: PathBuf },
    #[error("{path}: not a token file ({reason}); the file was left untouched")]
    Corrupt { path: PathBuf, reason: String },
    #[error("token_store key: {0}")]
    BadKey(#[from] KeyError),
    #[error("{path}: {source}")]
    BadKeyFile { path: PathBuf, source: KeyError },
    #[error("token store: {0}")]
    Crypto(&'static str),
    #[error("{path}: still locked by another process after {waited:?}")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error(transparent)]
    Write(#[from] crate::fsutil::FileError),
}

/// What is stored for one account.
#[derive(Serialize, Deserialize, Clone)]
pub struct StoredTokens {
    pub identity: String,
    pub account: String,
    pub refresh_token: String,
    #[serde(default)]
    pub access_token: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub access_expires_at: Option<u64>,
    /// Unix seconds of the last write.
    pub updated_at: u64,
    /// Unix milliseconds of the last write: which of two copies (the file,
    /// the shared state) is newer. Files written before it existed have 0.
    #[serde(default)]
    pub version: u64,
}

impl std::fmt::Debug for StoredTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredTokens")
            .field("identity", &self.identity)
            .field("account", &self.account)
            .field("access_expires_at", &self.access_expires_at)
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

impl Drop for StoredTokens {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.refresh_token.zeroize();
        if let Some(t) = &mut self.access_token {
            t.zeroize();
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Unix milliseconds: record versions.
pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl StoredTokens {
    /// Orders copies of one account's record: newest write wins.
    pub fn order(&self) -> u64 {
        if self.version == 0 {
            self.updated_at.saturating_mul(1000)
        } else {
            self.version
        }
    }

    /// The stored access token if it has more than `min_left` to live.
    pub fn access_token_with(&self, min_left: Duration) -> Option<(Secret<String>, Duration)> {
        let token = self.access_token.as_ref()?;
        let left = Duration::from_secs(self.access_expires_at?.saturating_sub(unix_now()));
        (left > min_left).then(|| (Secret::new(token.clone()), left))
    }
}

pub struct TokenStore {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

impl TokenStore {
    /// Opens the store, creating its directory (0700) and, for a key file
    /// that does not exist yet, a new random key (0600).
    pub fn open(config: &TokenStoreConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.path).map_err(io(&config.path))?;
        let _ = std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o700));
        let rng = SystemRandom::new();
        let key = match &config.key {
            TokenStoreKey::Inline(text) => parse_store_key(text.expose())?,
            TokenStoreKey::File(path) => load_or_create_key(path, &rng)?,
        };
        let unbound = UnboundKey::new(&AES_256_GCM, key.expose()).map_err(|_| StoreError::Crypto("unusable key"))?;
        Ok(TokenStore { dir: config.path.clone(), key: LessSafeKey::new(unbound), rng })
    }

    /// `<dir>/<identity>--<account>.token`, with anything unusual in a file
    /// name percent-encoded.
    pub fn path_for(&self, identity: &str, account: &str) -> PathBuf {
        self.dir.join(format!("{}--{}.token", file_safe(identity), file_safe(account)))
    }

    fn aad(identity: &str, account: &str) -> Vec<u8> {
        format!("xoauth2-proxy token {identity}\0{account}").into_bytes()
    }

    /// The stored tokens, or `None` if the account has never logged in.
    pub fn load(&self, identity: &str, account: &str) -> Result<Option<StoredTokens>, StoreError> {
        let path = self.path_for(identity, account);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        self.unseal(identity, account, data, &path).map(Some)
    }

    /// Opens a sealed record (a file's content, or the same bytes kept in
    /// the shared state); `origin` names where it came from in errors.
    pub fn unseal(
        &self,
        identity: &str,
        account: &str,
        mut data: Vec<u8>,
        origin: &Path,
    ) -> Result<StoredTokens, StoreError> {
        let path = origin;
        let corrupt = |reason: &str| StoreError::Corrupt { path: path.to_path_buf(), reason: reason.into() };
        let plain = self.open_sealed(&Self::aad(identity, account), &mut data).map_err(|e| match e {
            Unsealed::Format(reason) => corrupt(reason),
            Unsealed::Key => StoreError::Undecryptable { path: path.to_path_buf() },
        })?;
        let tokens: StoredTokens =
            serde_json::from_slice(plain).map_err(|_| corrupt("decrypted content is not a token record"))?;
        use zeroize::Zeroize;
        data.zeroize();
        Ok(tokens)
    }

    /// `MAGIC | nonce | AES-256-GCM(plain, aad)`: what a token file holds.
    pub fn seal_bytes(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut sealed = Secret::new(plain.to_vec());
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Crypto("no randomness available"))?;
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), sealed.expose_mut())
            .map_err(|_| StoreError::Crypto("encryption failed"))?;
        let mut data = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.expose().len());
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&nonce);
        data.extend_from_slice(sealed.expose());
        Ok(data)
    }

    /// The plain text of [`seal_bytes`](Self::seal_bytes)' output, decrypted in place.
    fn open_sealed<'d>(&self, aad: &[u8], data: &'d mut [u8]) -> Result<&'d mut [u8], Unsealed> {
        if data.len() < MAGIC.len() + NONCE_LEN + AES_256_GCM.tag_len() || &data[..MAGIC.len()] != MAGIC {
            return Err(Unsealed::Format("unknown format"));
        }
        let nonce = Nonce::try_assume_unique_for_key(&data[MAGIC.len()..MAGIC.len() + NONCE_LEN])
            .map_err(|_| Unsealed::Format("bad nonce"))?;
        let sealed = &mut data[MAGIC.len() + NONCE_LEN..];
        self.key.open_in_place(nonce, Aad::from(aad), sealed).map_err(|_| Unsealed::Key)
    }

    /// Decrypts bytes sealed with [`seal_bytes`](Self::seal_bytes) under the same `aad`.
    pub fn open_bytes(&self, aad: &[u8], mut data: Vec<u8>) -> Option<Secret<Vec<u8>>> {
        let plain = self.open_sealed(aad, &mut data).ok()?.to_vec();
        use zeroize::Zeroize;
        data.zeroize();
        Some(Secret::new(plain))
    }

    /// The sealed bytes of `tokens`, as [`save`](Self::save) writes them.
    pub fn seal(&self, tokens: &StoredTokens) -> Result<Vec<u8>, StoreError> {
        let plain = Secret::new(serde_json::to_vec(tokens).map_err(|e| StoreError::Corrupt {
            path: self.path_for(&tokens.identity, &tokens.account),
            reason: e.to_string(),
        })?);
        self.seal_bytes(&Self::aad(&tokens.identity, &tokens.account), plain.expose())
    }

    /// Replaces the account's file atomically: temp file (0600), fsync, rename, fsync dir.
    pub fn save(&self, tokens: &StoredTokens) -> Result<(), StoreError> {
        let path = self.path_for(&tokens.identity, &tokens.account);
        let data = self.seal(tokens)?;
        Ok(crate::fsutil::write_atomically(&path, &data)?)
    }

    /// Locks the account against concurrent refreshes by other processes,
    /// waiting up to `timeout`.
    pub async fn lock(&self, identity: &str, account: &str, timeout: Duration) -> Result<StoreLock, StoreError> {
        let mut path = self.path_for(identity, account).into_os_string();
        path.push(".lock");
        let path = PathBuf::from(path);
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path).map_err(io(&path))?;
        let started = tokio::time::Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(StoreLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {
                    if started.elapsed() >= timeout {
                        return Err(StoreError::LockTimeout { path, waited: timeout });
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        }
    }
}

enum Unsealed {
    Format(&'static str),
    Key,
}

/// Held while refreshing; the lock is released when the file is closed.
pub struct StoreLock {
    _file: File,
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@._-+".contains(c) {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32)
            }
        })
        .collect::<String>()
        .replace("..", "%2E%2E")
}

fn load_or_create_key(path: &Path, rng: &SystemRandom) -> Result<Secret<Vec<u8>>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = Secret::new(text);
            parse_store_key(text.expose()).map_err(|source| StoreError::BadKeyFile { path: path.to_path_buf(), source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = Secret::new(vec![0u8; STORE_KEY_LEN]);
            rng.fill(key.expose_mut()).map_err(|_| StoreError::Crypto("no randomness available"))?;
            let text = Secret::new(format!("{}\n", base64::engine::general_purpose::STANDARD.encode(key.expose())));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            // create_new: if another process created it meanwhile, use theirs.
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(mut file) => {
                    file.write_all(text.expose().as_bytes()).map_err(io(path))?;
                    file.sync_all().map_err(io(path))?;
                    tracing::info!(path = %path.display(), "created a new token store key");
                    Ok(key)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path, rng),
                Err(e) => Err(io(path)(e)),
            }
        }
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, key: TokenStoreKey) -> TokenStore {
        TokenStore::open(&TokenStoreConfig { path: dir.join("store"), key }).unwrap()
    }

    fn record(account: &str, rt: &str) -> StoredTokens {
        StoredTokens {
            identity: "contoso".into(),
            account: account.into(),
            refresh_token: rt.into(),
            access_token: Some("at".into()),
            access_expires_at: Some(unix_now() + 3600),
            updated_at: unix_now(),
            version: unix_millis(),
        }
    }

    #[test]
    fn round_trip_and_key_file_created_0600() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("secrets/key");
        let s = store(dir.path(), TokenStoreKey::File(key_path.clone()));
        assert_eq!(std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(s.load("contoso", "printer").unwrap().is_none());
        s.save(&record("printer", "rt-1")).unwrap();
        let path = s.path_for("contoso", "printer");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(4).any(|w| w == b"rt-1"), "the refresh token is stored in the clear");
        let loaded = s.load("contoso", "printer").unwrap().unwrap();
        assert_eq!(loaded.refresh_token, "rt-1");
        assert!(loaded.access_token_with(Duration::from_secs(600)).is_some());
        assert!(loaded.access_token_with(Duration::from_secs(4000)).is_none());
        // Reopening with the same key file reads the same data.
        let again = store(dir.path(), TokenStoreKey::File(key_path));
        assert_eq!(again.load("contoso", "printer").unwrap().unwrap().refresh_token, "rt-1");
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("store"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["contoso--printer.token"]);
    }

    #[test]
    fn wrong_key_and_corruption_are_errors_that_keep_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key_a = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let key_b = base64::engine::general_purpose::STANDARD.encode([2u8; 32]);
        let a = store(dir.path(), TokenStoreKey::Inline(Secret::new(key_a)));
        a.save(&record("printer", "rt")).unwrap();
        let path = a.path_for("contoso", "printer");
        let b = store(dir.path(), TokenStoreKey::Inline(Secret::new(key_b)));
        let err = b.load("contoso", "printer").unwrap_err();
        assert!(matches!(err, StoreError::Undecryptable { .. }), "{err}");
        assert!(err.to_string().contains("left untouched"));
        assert!(path.exists());
        // A file moved to another account's name does not decrypt.
        std::fs::copy(&path, a.path_for("contoso", "other")).unwrap();
        assert!(matches!(a.load("contoso", "other"), Err(StoreError::Undecryptable { .. })));
        // A flipped bit is detected.
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert!(matches!(a.load("contoso", "printer"), Err(StoreError::Undecryptable { .. })));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(a.load("contoso", "printer"), Err(StoreError::Corrupt { .. })));
        assert!(path.exists());
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_safe("scanner@contoso.com"), "scanner@contoso.com");
        assert_eq!(file_safe("../etc/passwd"), "%2E%2E%2Fetc%2Fpasswd");
        assert_eq!(file_safe("a b"), "a%20b");
    }

    #[tokio::test]
    async fn the_lock_excludes_a_second_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), TokenStoreKey::File(dir.path().join("key")));
        let held = s.lock("contoso", "printer", Duration::from_secs(1)).await.unwrap();
        let err = s.lock("contoso", "printer", Duration::from_millis(100)).await.err().unwrap();
        assert!(matches!(err, StoreError::LockTimeout { .. }));
        drop(held);
        s.lock("contoso", "printer", Duration::from_millis(100)).await.unwrap();
    }
}
