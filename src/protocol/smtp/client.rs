//! Parsing SMTP replies from the upstream, up to the end of authentication.

use super::super::line::{LineError, LineFramer};
use bytes::BytesMut;

/// A complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Each line's text after `NNN-` / `NNN `.
    pub lines: Vec<Vec<u8>>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The reply as a client would read it, for logs: code and first line.
    pub fn summary(&self) -> String {
        let first = self.lines.first().map(|l| crate::sasl::xoauth2::printable(l, 200)).unwrap_or_default();
        format!("{} {first}", self.code)
    }

    /// The reply re-serialised, byte for byte as the upstream formed it
    /// (modulo a bare LF, normalised to CRLF).
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i + 1 == self.lines.len() { b' ' } else { b'-' };
            out.extend_from_slice(format!("{:03}", self.code).as_bytes());
            out.push(sep);
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// EHLO keywords: every line but the first (the server's greeting).
    pub fn ehlo_keywords(&self) -> Vec<String> {
        self.lines
            .iter()
            .skip(1)
            .map(|l| String::from_utf8_lossy(l).trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line too long")]
    TooLong,
    #[error("reply has too many lines")]
    TooManyLines,
    #[error("malformed reply line")]
    Malformed,
}

/// Assembles multi-line replies (`250-...` continuation, `250 ...` last).
#[derive(Debug)]
pub struct ReplyReader {
    framer: LineFramer,
    code: Option<u16>,
    lines: Vec<Vec<u8>>,
}

const MAX_LINES: usize = 256;

impl ReplyReader {
    pub fn new(max_line: usize) -> Self {
        ReplyReader { framer: LineFramer::new(max_line), code: None, lines: Vec::new() }
    }

    pub fn next(&mut self, input: &mut BytesMut) -> Result<Option<Reply>, ReplyError> {
        loop {
            let line = match self.framer.next_line(input) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(None),
                Err(LineError::TooLong) => return Err(ReplyError::TooLong),
            };
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(ReplyError::Malformed);
            }
            let code = (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
            if !(200..600).contains(&code) || self.code.is_some_and(|c| c != code) {
                return Err(ReplyError::Malformed);
            }
            self.code = Some(code);
            let (last, text) = match line.get(3) {
                None => (true, &[][..]),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(ReplyError::Malformed),
            };
            self.lines.push(text.to_vec());
            if last {
                self.code = None;
                return Ok(Some(Reply { code, lines: std::mem::take(&mut self.lines) }));
            }
            if self.lines.len() >= MAX_LINES {
                return Err(ReplyError::TooManyLines);
            }
        }
    }
}

/// What the upstream said when it accepted the token.
#[derive(Debug)]
pub struct SmtpSuccess {
    pub reply: Reply,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], chunk: usize) -> Vec<Result<Reply, ReplyError>> {
        let mut rd = ReplyReader::new(64);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match rd.next(&mut buf) {
                    Ok(Some(r)) => out.push(Ok(r)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return out;
                    }
                }
            }
        }
        out
    }

    fn reply(code: u16, lines: &[&str]) -> Result<Reply, ReplyError> {
        Ok(Reply { code, lines: lines.iter().map(|l| l.as_bytes().to_vec()).collect() })
    }

    #[test]
    fn replies_at_every_chunk_size() {
        type Case<'a> = (&'a [u8], Vec<Result<Reply, ReplyError>>);
        let cases: Vec<Case> = vec![
            (b"220 mx ESMTP\r\n", vec![reply(220, &["mx ESMTP"])]),
            (
                b"250-mx Hello\r\n250-SIZE 1000\r\n250-AUTH LOGIN XOAUTH2\r\n250 CHUNKING\r\n",
                vec![reply(250, &["mx Hello", "SIZE 1000", "AUTH LOGIN XOAUTH2", "CHUNKING"])],
            ),
            (b"334 \r\n235 2.7.0 ok\r\n", vec![reply(334, &[""]), reply(235, &["2.7.0 ok"])]),
            (b"334\r\n", vec![reply(334, &[""])]),
            (b"250-a\r\n251 b\r\n", vec![Err(ReplyError::Malformed)]),
            (b"hello\r\n", vec![Err(ReplyError::Malformed)]),
            (b"999 x\r\n", vec![Err(ReplyError::Malformed)]),
            (b"250_x\r\n", vec![Err(ReplyError::Malformed)]),
        ];
        for (input, expected) in &cases {
            for chunk in 1..=input.len() {
                assert_eq!(&all(input, chunk), expected, "{:?} chunk {chunk}", String::from_utf8_lossy(input));
            }
        }
    }

    #[test]
    fn ehlo_keywords_and_wire_form() {
        let r = Reply { code: 250, lines: vec![b"mx Hello".to_vec(), b"SIZE 1000".to_vec(), b"8BITMIME".to_vec()] };
        assert_eq!(r.ehlo_keywords(), ["SIZE 1000", "8BITMIME"]);
        assert_eq!(r.to_wire(), b"250-mx Hello\r\n250-SIZE 1000\r\n250 8BITMIME\r\n");
        assert!(r.is_positive() && !r.is_transient());
    }

    #[test]
    fn endless_continuations_are_bounded() {
        let mut rd = ReplyReader::new(64);
        let mut buf = BytesMut::new();
        for _ in 0..MAX_LINES {
            buf.extend_from_slice(b"250-x\r\n");
        }
        assert_eq!(rd.next(&mut buf), Err(ReplyError::TooManyLines));
    }
}
