//! Parsing what an upstream IMAP server says, up to the end of authentication.

use super::super::line::{LineError, LineFramer};
use bytes::BytesMut;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// `* ...`, the whole line (literals included) without the final CRLF.
    Untagged(Vec<u8>),
    /// `+ text`: the text (base64 for SASL), possibly empty.
    Continuation(Vec<u8>),
    Tagged {
        tag: Vec<u8>,
        status: Status,
        text: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response line too long")]
    TooLong,
    #[error("malformed response")]
    Malformed,
}

/// What the upstream said when it accepted the token.
#[derive(Debug, Default)]
pub struct ImapSuccess {
    /// Untagged lines that came with the result (typically `* CAPABILITY`).
    pub untagged: Vec<Vec<u8>>,
    /// The tagged OK's text, e.g. `[CAPABILITY IMAP4rev1 ...] Logged in`.
    pub text: Vec<u8>,
}

/// Splits upstream bytes into responses, following literals in untagged data.
#[derive(Debug)]
pub struct ResponseReader {
    framer: LineFramer,
    pending: Vec<u8>,
    literal_remaining: usize,
}

impl ResponseReader {
    pub fn new(max: usize) -> Self {
        ResponseReader { framer: LineFramer::new(max), pending: Vec::new(), literal_remaining: 0 }
    }

    pub fn next(&mut self, input: &mut BytesMut) -> Result<Option<Response>, ResponseError> {
        loop {
            if self.literal_remaining > 0 {
                let take = self.literal_remaining.min(input.len());
                if take == 0 {
                    return Ok(None);
                }
                self.pending.extend_from_slice(&input.split_to(take));
                self.literal_remaining -= take;
                continue;
            }
            let line = match self.framer.next_line(input) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(None),
                Err(LineError::TooLong) => return Err(ResponseError::TooLong),
            };
            self.pending.extend_from_slice(&line);
            if let Some(size) = trailing_literal(&line) {
                if self.pending.len() + size > self.framer.max() {
                    return Err(ResponseError::TooLong);
                }
                self.pending.extend_from_slice(b"\r\n");
                self.literal_remaining = size;
                continue;
            }
            let whole = std::mem::take(&mut self.pending);
            return classify(whole).map(Some);
        }
    }
}

fn trailing_literal(line: &[u8]) -> Option<usize> {
    let body = line.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 9 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn classify(line: Vec<u8>) -> Result<Response, ResponseError> {
    if line.starts_with(b"* ") {
        return Ok(Response::Untagged(line));
    }
    if line == b"+" {
        return Ok(Response::Continuation(Vec::new()));
    }
    if let Some(rest) = line.strip_prefix(b"+ ") {
        return Ok(Response::Continuation(rest.to_vec()));
    }
    let sp = line.iter().position(|&b| b == b' ').ok_or(ResponseError::Malformed)?;
    let (tag, rest) = (&line[..sp], &line[sp + 1..]);
    let (word, text) = match rest.iter().position(|&b| b == b' ') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let status = match word.to_ascii_uppercase().as_slice() {
        b"OK" => Status::Ok,
        b"NO" => Status::No,
        b"BAD" => Status::Bad,
        _ => return Err(ResponseError::Malformed),
    };
    Ok(Response::Tagged { tag: tag.to_vec(), status, text: text.to_vec() })
}

/// The capability list in `* CAPABILITY a b c` or in an `[CAPABILITY a b c]` code.
pub fn capabilities(line: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(line).ok()?;
    let list = if let Some(rest) = strip_prefix_ci(text, "* CAPABILITY ") {
        rest
    } else {
        let code = text.strip_prefix("* OK ").or(text.strip_prefix("* PREAUTH ")).unwrap_or(text);
        let inner = strip_prefix_ci(code, "[CAPABILITY ")?;
        &inner[..inner.find(']')?]
    };
    Some(list.split(' ').filter(|c| !c.is_empty()).map(str::to_string).collect())
}

/// The response code at the start of a response text: `[UNAVAILABLE] ...`.
pub fn response_code(text: &[u8]) -> Option<String> {
    let rest = text.strip_prefix(b"[")?;
    let end = rest.iter().position(|&b| b == b']' || b == b' ')?;
    String::from_utf8(rest[..end].to_ascii_uppercase()).ok()
}

/// Whether a NO means "try again later" rather than "this token is refused".
pub fn is_temporary(text: &[u8]) -> bool {
    matches!(response_code(text).as_deref(), Some("UNAVAILABLE" | "INUSE" | "LIMIT" | "SERVERBUG" | "EXPUNGEISSUED"))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], chunk: usize) -> Vec<Response> {
        let mut rd = ResponseReader::new(4096);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(r) = rd.next(&mut buf).unwrap() {
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn responses_at_every_chunk_size() {
        let input = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n\
            + eyJzdGF0dXMiOiI0MDEifQ==\r\n\
            +\r\n\
            * ID (\"name\" {5}\r\nDove\n)\r\n\
            A1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n\
            A2 no [UNAVAILABLE] try later\r\n";
        let expected = vec![
            Response::Untagged(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready".to_vec()),
            Response::Continuation(b"eyJzdGF0dXMiOiI0MDEifQ==".to_vec()),
            Response::Continuation(Vec::new()),
            Response::Untagged(b"* ID (\"name\" {5}\r\nDove\n)".to_vec()),
            Response::Tagged {
                tag: b"A1".to_vec(),
                status: Status::Ok,
                text: b"[CAPABILITY IMAP4rev1 IDLE] Logged in".to_vec(),
            },
            Response::Tagged { tag: b"A2".to_vec(), status: Status::No, text: b"[UNAVAILABLE] try later".to_vec() },
        ];
        for chunk in 1..=input.len() {
            assert_eq!(all(input, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn malformed_and_oversized() {
        let mut rd = ResponseReader::new(16);
        let mut buf = BytesMut::from(&b"garbage\r\n"[..]);
        assert_eq!(rd.next(&mut buf), Err(ResponseError::Malformed));
        let mut buf = BytesMut::from(&b"A1 MAYBE yes\r\n"[..]);
        assert_eq!(rd.next(&mut buf), Err(ResponseError::Malformed));
        let mut buf = BytesMut::from(&b"* 0123456789012345678901234\r\n"[..]);
        assert_eq!(rd.next(&mut buf), Err(ResponseError::TooLong));
        let mut rd = ResponseReader::new(16);
        let mut buf = BytesMut::from(&b"* X {100}\r\n"[..]);
        assert_eq!(rd.next(&mut buf), Err(ResponseError::TooLong));
    }

    #[test]
    fn capability_extraction() {
        assert_eq!(
            capabilities(b"* CAPABILITY IMAP4rev1 IDLE  SASL-IR"),
            Some(vec!["IMAP4rev1".into(), "IDLE".into(), "SASL-IR".into()])
        );
        assert_eq!(
            capabilities(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] Dovecot ready."),
            Some(vec!["IMAP4rev1".into(), "LITERAL+".into()])
        );
        assert_eq!(capabilities(b"[CAPABILITY IMAP4rev1] Logged in"), Some(vec!["IMAP4rev1".into()]));
        assert_eq!(capabilities(b"* OK The Microsoft Exchange IMAP4 service is ready."), None);
        assert_eq!(capabilities(b"* OK [CAPABILITY IMAP4rev1"), None);
    }

    #[test]
    fn failure_classification() {
        assert!(is_temporary(b"[UNAVAILABLE] Server busy"));
        assert!(is_temporary(b"[inuse] locked"));
        assert!(!is_temporary(b"[AUTHENTICATIONFAILED] Authentication failed."));
        assert!(!is_temporary(b"AUTHENTICATE failed."));
        assert_eq!(response_code(b"[ALERT] hi"), Some("ALERT".into()));
        assert_eq!(response_code(b"[BADCHARSET (UTF-8)] x"), Some("BADCHARSET".into()));
    }
}
