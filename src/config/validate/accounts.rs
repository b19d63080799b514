//! `accounts[]`: what legacy clients type, and the mailbox and identity it maps to.

use super::{list_or_none, Ctx};
use crate::config::raw::RawAccount;
use crate::config::{AccountConfig, IdentityConfig, PasswordConfig};
use crate::secret::Secret;
use std::collections::{BTreeMap, HashSet};

pub(super) fn validate(
    raw: Vec<RawAccount>,
    identities: &BTreeMap<String, IdentityConfig>,
    cx: &mut Ctx,
) -> Vec<AccountConfig> {
    let mut usernames = HashSet::new();
    let mut accounts = Vec::new();
    for (i, a) in raw.into_iter().enumerate() {
        let at = |key: &str| format!("accounts[{i}].{key}");
        if a.username.is_empty() {
            cx.add(at("username"), "must not be empty");
        } else if !usernames.insert(a.username.to_lowercase()) {
            cx.add(
                at("username"),
                format!("duplicate username {:?} (usernames are compared without case)", a.username),
            );
        }
        let password = match (a.password_hash, a.password) {
            (Some(_), Some(_)) => {
                cx.add(at("password"), "set either password_hash or password, not both");
                None
            }
            (None, None) => {
                cx.add(
                    at("password_hash"),
                    "missing: set password_hash (see `xoauth2-proxy hash-password`) or password",
                );
                None
            }
            (Some(hash), None) => {
                if let Err(e) = crate::config::keys::check_phc(&hash) {
                    cx.add(at("password_hash"), e.to_string());
                }
                Some(PasswordConfig::Hash(hash))
            }
            (None, Some(plain)) => {
                if plain.is_empty() {
                    cx.add(at("password"), "must not be empty");
                }
                cx.warnings.push(format!(
                    "account {:?} has a plain-text password in the config; prefer password_hash (xoauth2-proxy hash-password)",
                    a.username
                ));
                Some(PasswordConfig::Plain(Secret::new(plain)))
            }
        };
        if let Err(e) = check_mail_user(&a.mailbox) {
            cx.add(at("mailbox"), e);
        }
        let smtp_user = a.smtp_user.unwrap_or_else(|| a.mailbox.clone());
        if let Err(e) = check_mail_user(&smtp_user) {
            cx.add(at("smtp_user"), e);
        }
        if !identities.contains_key(&a.identity) {
            let known: Vec<&str> = identities.keys().map(String::as_str).collect();
            cx.add(at("identity"), format!("no identity named {:?} (defined: {})", a.identity, list_or_none(&known)));
        }
        if let Some(password) = password {
            accounts.push(AccountConfig {
                username: a.username,
                password,
                mailbox: a.mailbox,
                smtp_user,
                identity: a.identity,
            });
        }
    }
    accounts
}

/// A mailbox or SMTP user goes verbatim into `user=` of XOAUTH2, where a
/// control byte would corrupt the message.
fn check_mail_user(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{s:?} contains spaces or control characters"));
    }
    Ok(())
}
