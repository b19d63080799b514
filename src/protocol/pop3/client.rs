//! Parsing what an upstream POP3 server says, up to the end of authentication.

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK text`
    Ok(Vec<u8>),
    /// `-ERR text`
    Err(Vec<u8>),
    /// `+ text` (a SASL challenge, base64), possibly empty.
    Continuation(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed POP3 reply")]
pub struct Malformed;

/// What the upstream said when it accepted the token.
#[derive(Debug)]
pub struct Pop3Success {
    /// The whole `+OK ...` line, without CRLF.
    pub line: Vec<u8>,
}

pub fn parse_reply(line: &[u8]) -> Result<Reply, Malformed> {
    let rest_after = |prefix: &[u8]| -> Option<Vec<u8>> {
        let head = line.get(..prefix.len())?;
        if !head.eq_ignore_ascii_case(prefix) {
            return None;
        }
        let rest = &line[prefix.len()..];
        match rest.first() {
            None => Some(Vec::new()),
            Some(b' ') => Some(rest[1..].to_vec()),
            Some(_) => None,
        }
    };
    if let Some(text) = rest_after(b"+OK") {
        Ok(Reply::Ok(text))
    } else if let Some(text) = rest_after(b"-ERR") {
        Ok(Reply::Err(text))
    } else if let Some(text) = rest_after(b"+") {
        Ok(Reply::Continuation(text))
    } else {
        Err(Malformed)
    }
}

/// One line of a multi-line response: `None` at the terminating `.`,
/// otherwise the line with its dot-stuffing removed.
pub fn multiline_item(line: &[u8]) -> Option<&[u8]> {
    if line == b"." {
        None
    } else {
        Some(line.strip_prefix(b".").unwrap_or(line))
    }
}

/// Whether `-ERR` means "try again later" (RFC 2449 / RFC 3206 codes).
pub fn is_temporary(text: &[u8]) -> bool {
    let upper = text.to_ascii_uppercase();
    upper.starts_with(b"[SYS/TEMP]") || upper.starts_with(b"[IN-USE]") || upper.starts_with(b"[LOGIN-DELAY]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(parse_reply(b"+OK Dovecot ready."), Ok(Reply::Ok(b"Dovecot ready.".to_vec())));
        assert_eq!(parse_reply(b"+OK"), Ok(Reply::Ok(Vec::new())));
        assert_eq!(parse_reply(b"+ok hi"), Ok(Reply::Ok(b"hi".to_vec())));
        assert_eq!(parse_reply(b"-ERR [AUTH] no"), Ok(Reply::Err(b"[AUTH] no".to_vec())));
        assert_eq!(parse_reply(b"+ "), Ok(Reply::Continuation(Vec::new())));
        assert_eq!(parse_reply(b"+"), Ok(Reply::Continuation(Vec::new())));
        assert_eq!(parse_reply(b"+ eyJ9"), Ok(Reply::Continuation(b"eyJ9".to_vec())));
        assert_eq!(parse_reply(b"+OKAY"), Err(Malformed));
        assert_eq!(parse_reply(b"hello"), Err(Malformed));
        assert_eq!(parse_reply(b""), Err(Malformed));
    }

    #[test]
    fn multiline_and_temporary() {
        assert_eq!(multiline_item(b"."), None);
        assert_eq!(multiline_item(b"..hidden"), Some(&b".hidden"[..]));
        assert_eq!(multiline_item(b"TOP"), Some(&b"TOP"[..]));
        assert!(is_temporary(b"[SYS/TEMP] try later"));
        assert!(is_temporary(b"[in-use] mailbox locked"));
        assert!(!is_temporary(b"[AUTH] Authentication failed."));
        assert!(!is_temporary(b"Authentication failure: unknown user name or bad password."));
    }
}
