//! Bounded line framing shared by the three protocols.
//!
//! A line longer than the limit is not an error the moment it overflows: the
//! framer keeps discarding until the line's own end, and only then reports
//! [`LineError::TooLong`]. The client's next command therefore starts on a
//! clean boundary and the answer lines up with the command that caused it.
//! A line that goes on past a few times the limit without ending is not a
//! line any more: [`LineError::Endless`], and the peer is not read further.

use bytes::{Buf, BytesMut};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    /// A line exceeded the limit; it has been consumed up to and including its LF.
    TooLong,
    /// A line ran past [`ENDLESS_FACTOR`] times the limit without ending.
    Endless,
}

/// How many times the limit an over-long line may run before it is no longer
/// waited out: enough for a client that merely overshoots, little enough that
/// a stream without line ends is cut within a few reads.
pub const ENDLESS_FACTOR: usize = 4;

#[derive(Debug)]
pub struct LineFramer {
    max: usize,
    discarding: bool,
    /// Bytes of the current over-long line thrown away so far.
    discarded: usize,
}

impl LineFramer {
    /// `max` counts the line's content, excluding the CRLF.
    pub fn new(max: usize) -> Self {
        LineFramer { max, discarding: false, discarded: 0 }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes the next complete line off the front of `buf`, without its line
    /// ending (CRLF, or a bare LF from lenient clients).
    ///
    /// `Ok(None)` means more bytes are needed; everything in `buf` is kept
    /// (or, while discarding an oversized line, thrown away).
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, LineError> {
        let newline = buf.iter().position(|&b| b == b'\n');
        if self.discarding {
            return match newline {
                Some(at) => {
                    buf.advance(at + 1);
                    self.discarding = false;
                    Err(LineError::TooLong)
                }
                None => {
                    self.discarded = self.discarded.saturating_add(buf.len());
                    buf.clear();
                    if self.discarded > ENDLESS_FACTOR.saturating_mul(self.max) {
                        self.discarding = false;
                        return Err(LineError::Endless);
                    }
                    Ok(None)
                }
            };
        }
        match newline {
            Some(at) => {
                let content = if at > 0 && buf[at - 1] == b'\r' { at - 1 } else { at };
                if content > self.max {
                    buf.advance(at + 1);
                    return Err(LineError::TooLong);
                }
                let mut line = buf.split_to(at + 1);
                line.truncate(content);
                Ok(Some(line))
            }
            // One byte of slack for a CR that may precede the LF still to come.
            None if buf.len() > self.max + 1 => {
                self.discarded = buf.len();
                buf.clear();
                if self.discarded > ENDLESS_FACTOR.saturating_mul(self.max) {
                    return Err(LineError::Endless);
                }
                self.discarding = true;
                Ok(None)
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes and collects every result.
    fn run(max: usize, input: &[u8], chunk: usize) -> Vec<Result<Vec<u8>, LineError>> {
        let mut framer = LineFramer::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match framer.next_line(&mut buf) {
                    Ok(Some(line)) => out.push(Ok(line.to_vec())),
                    Ok(None) => break,
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        out
    }

    #[test]
    fn lines_at_every_chunk_size() {
        type Case<'a> = (&'a [u8], Vec<Result<&'a [u8], LineError>>);
        let cases: &[Case] = &[
            (b"a\r\nbb\r\n", vec![Ok(b"a"), Ok(b"bb")]),
            (b"a\nbb\n", vec![Ok(b"a"), Ok(b"bb")]),
            (b"\r\n", vec![Ok(b"")]),
            (b"abc", vec![]),
            (b"0123456789\r\nok\r\n", vec![Ok(b"0123456789"), Ok(b"ok")]),
            (b"0123456789X\r\nok\r\n", vec![Err(LineError::TooLong), Ok(b"ok")]),
            (b"0123456789012345678901234567890\r\nok\r\n", vec![Err(LineError::TooLong), Ok(b"ok")]),
            // A CR inside the line is content, not a terminator.
            (b"a\rb\r\n", vec![Ok(b"a\rb")]),
        ];
        for (input, expected) in cases {
            let expected: Vec<Result<Vec<u8>, LineError>> = expected.iter().map(|r| r.map(|l| l.to_vec())).collect();
            for chunk in 1..=input.len().max(1) {
                assert_eq!(run(10, input, chunk), expected, "input {:?} chunk {chunk}", String::from_utf8_lossy(input));
            }
        }
    }

    #[test]
    fn oversized_line_does_not_grow_the_buffer() {
        let mut framer = LineFramer::new(64);
        let mut buf = BytesMut::new();
        for _ in 0..10 {
            buf.extend_from_slice(b"xxxxxxxxxxxxxxxx");
            assert_eq!(framer.next_line(&mut buf), Ok(None));
            assert!(buf.len() <= 80);
        }
        buf.extend_from_slice(b"\r\nNEXT\r\n");
        assert_eq!(framer.next_line(&mut buf), Err(LineError::TooLong));
        assert_eq!(framer.next_line(&mut buf).map(|l| l.map(|l| l.to_vec())), Ok(Some(b"NEXT".to_vec())));
    }

    #[test]
    fn a_line_that_never_ends_is_given_up_on() {
        for chunk in [1, 7, 64, 1000] {
            let mut framer = LineFramer::new(64);
            let mut buf = BytesMut::new();
            let mut fed = 0;
            let result = loop {
                buf.extend_from_slice(&vec![b'x'; chunk]);
                fed += chunk;
                match framer.next_line(&mut buf) {
                    Ok(None) => {}
                    other => break other,
                }
                assert!(fed < 10_000, "still waiting after {fed} bytes");
            };
            assert_eq!(result, Err(LineError::Endless), "chunk {chunk}");
            assert!(fed > ENDLESS_FACTOR * 64 && fed <= ENDLESS_FACTOR * 64 + 65 + chunk, "chunk {chunk}: {fed}");
        }
    }
}
