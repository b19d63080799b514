//! XOAUTH2, the client side we speak upstream.
//!
//! `base64("user=" + user + "\x01auth=Bearer " + token + "\x01\x01")`. A server
//! that refuses the token may first send a base64 JSON error as a challenge;
//! the client answers with an empty line and then gets the final failure.

use super::encode_base64;
use crate::secret::Secret;
use crate::text::printable;

/// The base64 initial response. It embeds the token, so it is a secret too.
pub fn initial_response(user: &str, token: &str) -> Secret<String> {
    let mut raw = Secret::new(Vec::with_capacity(user.len() + token.len() + 24));
    // Build inside the secret so no unredacted copy outlives this function.
    let buf = raw.expose_mut();
    buf.extend_from_slice(b"user=");
    buf.extend_from_slice(user.as_bytes());
    buf.extend_from_slice(b"\x01auth=Bearer ");
    buf.extend_from_slice(token.as_bytes());
    buf.extend_from_slice(b"\x01\x01");
    Secret::new(encode_base64(raw.expose()))
}

/// Decodes an error challenge into text fit for a log line. The JSON Exchange
/// and Dovecot send (`status`, `schemes`, `scope`) holds no secret; control
/// bytes are escaped and the length is capped so a hostile upstream cannot
/// forge log lines.
pub fn describe_error_challenge(challenge: &[u8]) -> String {
    let challenge = trim_ascii(challenge);
    if challenge.is_empty() {
        return String::from("(empty challenge)");
    }
    match super::decode_base64(challenge) {
        Ok(json) => printable(json.expose(), 512),
        Err(_) => format!("(undecodable challenge) {}", printable(challenge, 128)),
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example in Microsoft's XOAUTH2 documentation
    /// (../shared/seeds/001_*.txt), line breaks removed.
    #[test]
    fn microsoft_known_answer() {
        let ir = initial_response("test@contoso.onmicrosoft.com", "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA");
        assert_eq!(
            ir.expose(),
            "dXNlcj10ZXN0QGNvbnRvc28ub25taWNyb3NvZnQuY29tAWF1dGg9QmVhcmVy\
             IEV3QkFBbDNCQUFVRkZwVUFvN0ozVmUwYmpMQldaV0NjbFJDM0VvQUEBAQ=="
        );
    }

    /// Google's published example for the same format.
    #[test]
    fn google_known_answer() {
        let ir = initial_response("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg");
        assert_eq!(
            ir.expose(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn long_tokens_round_trip() {
        let token = "x".repeat(2600);
        let ir = initial_response("a@b.c", &token);
        let raw = crate::sasl::decode_base64(ir.expose().as_bytes()).unwrap();
        assert!(raw.expose().starts_with(b"user=a@b.c\x01auth=Bearer xxx"));
        assert!(raw.expose().ends_with(b"x\x01\x01"));
        assert_eq!(raw.expose().len(), 5 + 5 + 13 + 2600 + 2);
    }

    #[test]
    fn error_challenge_is_decoded_and_sanitised() {
        let json = br#"{"status":"401","schemes":"bearer","scope":"https://outlook.office365.com/"}"#;
        let b64 = crate::sasl::encode_base64(json);
        assert_eq!(describe_error_challenge(b64.as_bytes()), String::from_utf8_lossy(json));
        let evil = crate::sasl::encode_base64(b"{\"status\":\"401\"}\r\nFAKE LOG LINE");
        assert_eq!(describe_error_challenge(evil.as_bytes()), "{\"status\":\"401\"}\\x0d\\x0aFAKE LOG LINE");
        assert_eq!(describe_error_challenge(b""), "(empty challenge)");
        assert!(describe_error_challenge(b"%%%").starts_with("(undecodable challenge)"));
    }
}
