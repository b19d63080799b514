//! Local accounts: what a legacy client types, and where it maps to.
//!
//! Passwords are argon2id PHC strings (or, with a warning, plain text).
//! Verification runs on the blocking pool because argon2 is deliberately slow,
//! and an unknown username costs the same as a wrong password so that timing
//! does not reveal which usernames exist.

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
        Accounts { by_username, decoy_hash }
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
        let account = self.lookup(&credentials.username).cloned();
        let password = credentials.password.clone();
        let (hash, plain) = match account.as_deref().map(|a| &a.password) {
            Some(Password::Hash(h)) => (Some(h.clone()), None),
            Some(Password::Plain(p)) => (None, Some(p.clone())),
            None => (Some(self.decoy_hash.clone()), None),
        };
        let matches = match (hash, plain) {
            (_, Some(expected)) => constant_time_eq(password.expose(), expected.expose().as_bytes()),
            (Some(hash), None) => {
                tokio::task::spawn_blocking(move || verify_hash(&hash, password.expose())).await.unwrap_or(false)
            }
            (None, None) => false,
        };
        match (account, matches) {
            (None, _) => Err(AuthError::UnknownUser),
            (Some(_), false) => Err(AuthError::WrongPassword),
            (Some(account), true) => Ok(account),
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
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    Argon2::default().hash_password(password).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Validates a PHC string for the config checker.
pub fn check_phc(phc: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(phc)
        .map_err(|e| format!("not a valid PHC hash string ({e}); generate one with `xoauth2-proxy hash-password`"))?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(format!("unsupported hash algorithm {other:?}; use argon2id (`xoauth2-proxy hash-password`)")),
    }
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
        check_phc(&hash).unwrap();
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

    #[test]
    fn phc_validation() {
        assert!(check_phc("plain").is_err());
        assert!(check_phc("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
    }
}
