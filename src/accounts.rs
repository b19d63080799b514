//! Local accounts: what a legacy client types, and where it maps to.
//!
//! Passwords are argon2id PHC strings (or, with a warning, plain text),
//! checked by the [`Verifier`] pool; an unknown username is checked against
//! a decoy there, so it costs what a wrong password costs and timing does
//! not reveal which usernames exist.

use crate::config::{AccountConfig, Config, PasswordConfig};
use crate::sasl::Credentials;
use crate::secret::Secret;
use crate::verifier::{Hash, Verdict, Verifier};
use argon2::password_hash::PasswordHasher;
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
    Hash(Arc<Hash>),
    Plain(Secret<String>),
    /// A hash the config check accepted but this build cannot use: nobody
    /// logs in with it (never reached with a validated config).
    Unusable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown username")]
    UnknownUser,
    #[error("wrong password")]
    WrongPassword,
    #[error("password verification overloaded")]
    Overloaded,
}

pub struct Accounts {
    by_username: HashMap<String, Arc<Account>>,
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
                    PasswordConfig::Hash(h) => {
                        Hash::parse(h).map_or(Password::Unusable, |h| Password::Hash(Arc::new(h)))
                    }
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
        Accounts { by_username }
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
    pub async fn verify(&self, credentials: &Credentials, verifier: &Verifier) -> Result<Arc<Account>, AuthError> {
        let password = &credentials.password;
        let Some(account) = self.lookup(&credentials.username).cloned() else {
            // Spend the time a real check would take, then refuse.
            return match verifier.verify(&credentials.username, None, password).await {
                Verdict::Overloaded => Err(AuthError::Overloaded),
                Verdict::Match | Verdict::Mismatch => Err(AuthError::UnknownUser),
            };
        };
        let verdict = match &account.password {
            Password::Plain(expected) => {
                if constant_time_eq(password.expose(), expected.expose().as_bytes()) {
                    Verdict::Match
                } else {
                    Verdict::Mismatch
                }
            }
            Password::Hash(hash) => verifier.verify(&credentials.username, Some(hash), password).await,
            Password::Unusable => Verdict::Mismatch,
        };
        match verdict {
            Verdict::Match => Ok(account),
            Verdict::Mismatch => Err(AuthError::WrongPassword),
            Verdict::Overloaded => Err(AuthError::Overloaded),
        }
    }
}

/// Compares digests so that neither content nor length leaks through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let da = ring::digest::digest(&ring::digest::SHA256, a);
    let db = ring::digest::digest(&ring::digest::SHA256, b);
    da.as_ref().ct_eq(db.as_ref()).into()
}

/// A new argon2id PHC string with a random salt and the crate's default cost.
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    Argon2::default().hash_password(password).map(|h| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifier::PoolConfig;

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
        let v = Verifier::start(&PoolConfig::default());
        assert_eq!(accounts.verify(&creds("printer", "s3cret"), &v).await.unwrap().username, "Printer");
        assert_eq!(accounts.verify(&creds("PRINTER", "s3cret"), &v).await.unwrap().mailbox, "Printer@example.com");
        assert_eq!(accounts.verify(&creds("printer", "s3cre"), &v).await.unwrap_err(), AuthError::WrongPassword);
        assert_eq!(accounts.verify(&creds("app", "pw"), &v).await.unwrap().username, "app");
        assert_eq!(accounts.verify(&creds("app", "pw "), &v).await.unwrap_err(), AuthError::WrongPassword);
        assert_eq!(accounts.verify(&creds("nobody", "pw"), &v).await.unwrap_err(), AuthError::UnknownUser);
    }
}
