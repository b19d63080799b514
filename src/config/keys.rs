//! The two secrets whose format the config can check without reading a
//! file: argon2 PHC strings and the token-store key.

use crate::secret::Secret;
use argon2::password_hash::phc::PasswordHash;
use base64::Engine;

/// Bytes in a token-store key (AES-256).
pub const STORE_KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not base64; generate one with `head -c 32 /dev/urandom | base64`")]
    NotBase64,
    #[error("{0} bytes after base64 decoding, 32 needed; generate one with `head -c 32 /dev/urandom | base64`")]
    WrongLength(usize),
}

/// Parses a token-store key: 32 bytes, base64-encoded.
pub fn parse_store_key(text: &str) -> Result<Secret<Vec<u8>>, KeyError> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map(Secret::new)
        .map_err(|_| KeyError::NotBase64)?;
    if key.expose().len() != STORE_KEY_LEN {
        return Err(KeyError::WrongLength(key.expose().len()));
    }
    Ok(key)
}

/// The largest argon2 memory cost (KiB) accepted: far above any sane
/// setting (the default is 19 MiB), low enough that a config cannot make the
/// verification workers exhaust the host.
pub const MAX_M_COST: u32 = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhcError {
    #[error("not a valid PHC hash string ({0}); generate one with `xoauth2-proxy hash-password`")]
    Invalid(String),
    #[error("unsupported hash algorithm {0:?}; use argon2id (`xoauth2-proxy hash-password`)")]
    Algorithm(String),
    #[error("memory cost m={0} KiB is above the {MAX_M_COST} KiB allowed; use `xoauth2-proxy hash-password`")]
    TooCostly(u32),
}

/// Checks that a `password_hash` is an argon2 PHC string of a usable cost.
pub fn check_phc(phc: &str) -> Result<(), PhcError> {
    let parsed = PasswordHash::new(phc).map_err(|e| PhcError::Invalid(e.to_string()))?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {}
        other => return Err(PhcError::Algorithm(other.to_string())),
    }
    let params = argon2::Params::try_from(&parsed).map_err(|e| PhcError::Invalid(e.to_string()))?;
    if params.m_cost() > MAX_M_COST {
        return Err(PhcError::TooCostly(params.m_cost()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_keys_are_explained() {
        assert!(parse_store_key("not base64!").unwrap_err().to_string().contains("head -c 32 /dev/urandom | base64"));
        assert!(parse_store_key("c2hvcnQ=").unwrap_err().to_string().contains("32 needed"));
        assert!(parse_store_key(&base64::engine::general_purpose::STANDARD.encode([0u8; 32])).is_ok());
    }

    #[test]
    fn phc_validation() {
        assert!(check_phc("plain").is_err());
        assert!(check_phc("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
        assert!(check_phc("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA").is_ok());
    }
}
