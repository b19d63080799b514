//! PLAIN (RFC 4616): `authzid NUL authcid NUL passwd`.

use super::{username_from_bytes, Credentials, SaslError};
use crate::secret::Secret;

/// Decodes a PLAIN message. An authorization identity is accepted only when
/// it is empty or names the same user: acting as someone else is not a thing
/// a local account can do here.
pub fn decode(message: &[u8]) -> Result<Credentials, SaslError> {
    let mut fields = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (fields.next(), fields.next(), fields.next()) else {
        return Err(SaslError::Malformed("PLAIN message needs three NUL-separated fields"));
    };
    if password.contains(&0) {
        return Err(SaslError::Malformed("PLAIN message has more than three fields"));
    }
    if password.is_empty() {
        return Err(SaslError::Malformed("empty password"));
    }
    let username = username_from_bytes(authcid)?;
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(Credentials { username, password: Secret::new(password.to_vec()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok: &[(&[u8], &str, &[u8])] = &[
            (b"\0tim\0tanstaaftanstaaf", "tim", b"tanstaaftanstaaf"),
            (b"tim\0tim\0pw", "tim", b"pw"),
            (b"\0user@example.com\0p w\x01", "user@example.com", b"p w\x01"),
            (b"\0j\xc3\xbcrgen\0pw", "j\u{fc}rgen", b"pw"),
        ];
        for (input, user, pass) in ok {
            let c = decode(input).unwrap();
            assert_eq!(c.username, *user);
            assert_eq!(c.password.expose(), pass);
        }
        let bad: &[&[u8]] =
            &[b"", b"\0", b"\0\0", b"\0tim\0", b"\0\0pw", b"tim", b"\0tim\0pw\0extra", b"\0\xff\xfe\0pw"];
        for input in bad {
            assert!(matches!(decode(input), Err(SaslError::Malformed(_))), "{input:?} must be rejected");
        }
        assert_eq!(decode(b"other\0tim\0pw").unwrap_err(), SaslError::AuthzidMismatch);
    }
}
