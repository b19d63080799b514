//! The LOGIN mechanism: two base64 prompts, username then password.
//! Not standardised, but it is what printers and Outlook-era clients speak.

use super::{username_from_bytes, SaslError};
use crate::secret::Secret;

pub const USERNAME_PROMPT: &[u8] = b"Username:";
pub const PASSWORD_PROMPT: &[u8] = b"Password:";

pub(super) fn username(decoded: &[u8]) -> Result<String, SaslError> {
    username_from_bytes(decoded)
}

pub(super) fn password(decoded: &[u8]) -> Result<Secret<Vec<u8>>, SaslError> {
    if decoded.is_empty() {
        return Err(SaslError::Malformed("empty password"));
    }
    Ok(Secret::new(decoded.to_vec()))
}
