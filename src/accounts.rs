//! Local accounts: what a legacy client types, and where it maps to.
//!
//! Passwords are argon2id PHC strings (or, with a warning, plain text).
//! Verification runs on the blocking pool because argon2 is deliberately slow,
//! and an unknown username costs the same as a wrong password so that timing
//! does not reveal which usernames exist.
//!
//! Hashing on every login would cap logins per second (a printer that opens a
//! session per page), so recent successful verifications are remembered: a
//! bounded set of HMAC-SHA256 tags of username and password under a key made
//! at random when the accounts are loaded. The set dies with the `Accounts`
//! (a config reload makes a new one), and holds no password or hash of one
//! that could be attacked offline without the in-memory key.

use crate::config::{AccountConfig, Config, PasswordConfig};
use crate::sasl::Credentials;
use crate::secret::Secret;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

#[derive(Debug)]
pub struct Account {
    pub username: String,
    pub mailbox: String,
    pub smtp_user: String,
    pub identity: String,
    password: Password,
}

#[derive(Debug)]
enum Password {
    Hash(String),
    Plain(Secret<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown username")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
}

pub struct Accounts {
    by_username: HashMap<String, Arc<Account>>,
    /// Verified against when the username is unknown, to spend the same time.
    decoy_hash: String,
    verified: VerifiedCache,
}

/// How many recent verifications are remembered, and for how long.
const VERIFIED_CAPACITY: usize = 1024;
const VERIFIED_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Tags with the time they were verified, and their insertion order for eviction.
type Entries = (HashMap<Vec<u8>, tokio::time::Instant>, std::collections::VecDeque<Vec<u8>>);

struct VerifiedCache {
    key: ring::hmac::Key,
    entries: std::sync::Mutex<Entries>,
}

impl VerifiedCache {
    fn new() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>()));
        VerifiedCache { key, entries: std::sync::Mutex::new((HashMap::new(), std::collections::VecDeque::new())) }
    }

    fn tag(&self, username: &str, password: &[u8]) -> Vec<u8> {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(username.to_lowercase().as_bytes());
        ctx.update(b"\0");
        ctx.update(password);
        ctx.sign().as_ref().to_vec()
    }

    fn contains(&self, tag: &[u8]) -> bool {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.0.get(tag).is_some_and(|at| at.elapsed() < VERIFIED_TTL)
    }

    fn insert(&self, tag: Vec<u8>) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *entries;
        if map.insert(tag.clone(), tokio::time::Instant::now()).is_none() {
            order.push_back(tag);
        }
        while order.len() > VERIFIED_CAPACITY {
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
            }
        }
    }
}

impl Accounts {
    pub fn from_config(config: &Config) -> Self {
        Accounts::new(&config.accounts)
    }

    pub fn new(accounts: &[AccountConfig]) -> Self {
        let by_username = accounts
            .iter()
            .map(|a| {
                let password = match &a.password {
                    PasswordConfig::Hash(h) => Password::Hash(h.clone()),
                    PasswordConfig::Plain(p) => Password::Plain(p.clone()),
                };
                let account = Account {
                    username: a.username.clone(),
                    mailbox: a.mailbox.clone(),
                    smtp_user: a.smtp_user.clone(),
                    identity: a.identity.clone(),
                    password,
                };
                (a.username.to_lowercase(), Arc::new(account))
            })
            .collect();
        // Hash cost matches the default cost that `hash-password` uses.
        let decoy_hash = hash_password(b"decoy password for unknown usernames").unwrap_or_default();
        Accounts { by_username, decoy_hash, verified: VerifiedCache::new() }
    }

    pub fn lookup(&self, username: &str) -> Option<&Arc<Account>> {
        self.by_username.get(&username.to_lowercase())
    }

    pub fn len(&self) -> usize {
        self.by_username.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_username.is_empty()
    }

    /// Checks a username and password. Usernames match without regard to case.
    pub async fn verify(&self, credentials: &Credentials) -> Result<Arc<Account>, AuthError> {
        let Some(account) = self.lookup(&credentials.username).cloned() else {
            // Spend the time a real check would take, then refuse.
            let (decoy, password) = (self.decoy_hash.clone(), credentials.password.clone());
            let _ = tokio::task::spawn_blocking(move || verify_hash(&decoy, password.expose())).await;
            return Err(AuthError::UnknownUser);
        };
        let matches = match &account.password {
            Password::Plain(expected) => constant_time_eq(credentials.password.expose(), expected.expose().as_bytes()),
            Password::Hash(hash) => {
                let tag = self.verified.tag(&credentials.username, credentials.password.expose());
                if self.verified.contains(&tag) {
                    true
                } else {
                    let (hash, password) = (hash.clone(), credentials.password.clone());
                    let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, password.expose()))
                        .await
                        .unwrap_or(false);
                    if ok {
                        self.verified.insert(tag);
                    }
                    ok
                }
            }
        };
        if matches {
            Ok(account)
        } else {
            Err(AuthError::WrongPassword)
        }
    }
}

/// Compares digests so that neither content nor length leaks through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    da.as_ref().ct_eq(db.as_ref()).into()
}

fn verify_hash(phc: &str, password: &[u8]) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A new argon2id PHC string with a random salt and the crate's default cost.
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    Argon2::default().hash_password(password).map(|h| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, pass: &str) -> Credentials {
        Credentials { username: user.into(), password: Secret::new(pass.as_bytes().to_vec()) }
    }

    fn account(username: &str, password: PasswordConfig) -> AccountConfig {
        AccountConfig {
            username: username.into(),
            password,
            mailbox: format!("{username}@example.com"),
            smtp_user: format!("{username}@example.com"),
            identity: "id".into(),
        }
    }

    #[tokio::test]
    async fn verify_hashed_plain_and_unknown() {
        let hash = hash_password(b"s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        crate::config::keys::check_phc(&hash).unwrap();
        let accounts = Accounts::new(&[
            account("Printer", PasswordConfig::Hash(hash)),
            account("app", PasswordConfig::Plain(Secret::new("pw".into()))),
        ]);
        assert_eq!(accounts.verify(&creds("printer", "s3cret")).await.unwrap().username, "Printer");
        assert_eq!(accounts.verify(&creds("PRINTER", "s3cret")).await.unwrap().mailbox, "Printer@example.com");
        assert_eq!(accounts.verify(&creds("printer", "s3cre")).await.unwrap_err(), AuthError::WrongPassword);
        assert_eq!(accounts.verify(&creds("app", "pw")).await.unwrap().username, "app");
        assert_eq!(accounts.verify(&creds("app", "pw ")).await.unwrap_err(), AuthError::WrongPassword);
        assert_eq!(accounts.verify(&creds("nobody", "pw")).await.unwrap_err(), AuthError::UnknownUser);
    }

    #[tokio::test]
    async fn successful_verifications_are_remembered_per_password() {
        let accounts = Accounts::new(&[account("printer", PasswordConfig::Hash(hash_password(b"right").unwrap()))]);
        let started = std::time::Instant::now();
        assert!(accounts.verify(&creds("printer", "right")).await.is_ok());
        let first = started.elapsed();
        let started = std::time::Instant::now();
        for _ in 0..20 {
            assert!(accounts.verify(&creds("Printer", "right")).await.is_ok());
        }
        assert!(started.elapsed() < first, "20 cached verifications took longer than one argon2 run");
        // A wrong password is never served from the cache.
        assert_eq!(accounts.verify(&creds("printer", "wrong")).await.unwrap_err(), AuthError::WrongPassword);
        // A reloaded account set starts empty.
        let reloaded = Accounts::new(&[account("printer", PasswordConfig::Hash(hash_password(b"new").unwrap()))]);
        assert_eq!(reloaded.verify(&creds("printer", "right")).await.unwrap_err(), AuthError::WrongPassword);
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = VerifiedCache::new();
        for i in 0..(VERIFIED_CAPACITY + 10) {
            cache.insert(cache.tag(&format!("user{i}"), b"pw"));
        }
        assert!(!cache.contains(&cache.tag("user0", b"pw")));
        assert!(cache.contains(&cache.tag(&format!("user{}", VERIFIED_CAPACITY + 9), b"pw")));
        assert_eq!(cache.entries.lock().unwrap().0.len(), VERIFIED_CAPACITY);
    }
}
