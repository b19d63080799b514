//! The SMTP upstream: parsing replies up to the end of authentication, and
//! the dialogue that gets there (greeting, EHLO, STARTTLS, EHLO again,
//! `AUTH XOAUTH2` in the two-step form Exchange documents).

use super::super::client::{secret_line, Action, ClientError, Dialogue, Goal, Outcome, Refusal};
use super::super::line::{LineError, LineFramer};
use crate::text::printable;
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
        let first = self.lines.first().map(|l| printable(l, 200)).unwrap_or_default();
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
                Err(LineError::TooLong | LineError::Endless) => return Err(ReplyError::TooLong),
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

/// Longest upstream line accepted before authentication.
pub const MAX_LINE: usize = 64 * 1024;

/// EHLO name when the client gave none.
const DEFAULT_EHLO: &str = "xoauth2-proxy";

enum State {
    Greeting,
    /// EHLO sent; `before_tls` when STARTTLS is still to come.
    Ehlo {
        before_tls: bool,
    },
    StartTls,
    /// Upgraded: EHLO again, since what was said before TLS is void.
    Ready,
    AuthStart,
    AuthResponse {
        challenge: Option<String>,
    },
    Finished,
}

/// The upstream SMTP dialogue.
pub struct SmtpClient {
    reader: ReplyReader,
    state: State,
    starttls: bool,
    goal: Goal,
}

impl SmtpClient {
    fn ehlo(&mut self, before_tls: bool) -> Action<SmtpSuccess> {
        let name = match &self.goal {
            Goal::Login(login) => login.client_name.as_deref().unwrap_or(DEFAULT_EHLO),
            Goal::Probe => DEFAULT_EHLO,
        };
        let line = format!("EHLO {name}\r\n").into_bytes();
        self.state = State::Ehlo { before_tls };
        Action::Send(line)
    }
}

impl Dialogue for SmtpClient {
    type Success = SmtpSuccess;
    const GOODBYE: &'static [u8] = b"QUIT\r\n";

    fn new(starttls: bool, goal: Goal) -> Self {
        SmtpClient { reader: ReplyReader::new(MAX_LINE), state: State::Greeting, starttls, goal }
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Action<SmtpSuccess>, ClientError> {
        match self.state {
            State::Ready => return Ok(self.ehlo(false)),
            State::Finished => {
                return Err(ClientError::Protocol { phase: self.phase(), detail: "the dialogue is over".into() })
            }
            _ => {}
        }
        let phase = self.phase();
        let reply = match self.reader.next(input) {
            Ok(Some(reply)) => reply,
            Ok(None) => return Ok(Action::Read),
            Err(e) => return Err(ClientError::Protocol { phase, detail: e.to_string() }),
        };
        match &mut self.state {
            State::Greeting => match reply.code {
                220 => Ok(self.ehlo(self.starttls)),
                400..=499 => Err(ClientError::Busy(reply.summary())),
                _ => Err(ClientError::Refused(reply.summary())),
            },
            State::Ehlo { before_tls } => {
                if reply.code != 250 {
                    return Err(ClientError::Protocol { phase, detail: reply.summary() });
                }
                let keywords = reply.ehlo_keywords();
                if *before_tls {
                    if !keywords.iter().any(|c| c.eq_ignore_ascii_case("STARTTLS")) {
                        return Err(ClientError::NoStartTls);
                    }
                    self.state = State::StartTls;
                    return Ok(Action::Send(b"STARTTLS\r\n".to_vec()));
                }
                match &self.goal {
                    Goal::Probe => {
                        self.state = State::Finished;
                        Ok(Action::Done(Outcome::Capabilities(keywords)))
                    }
                    Goal::Login(_) => {
                        self.state = State::AuthStart;
                        Ok(Action::Send(b"AUTH XOAUTH2\r\n".to_vec()))
                    }
                }
            }
            State::StartTls => match reply.code {
                220 => Ok(Action::StartTls),
                _ => Err(ClientError::Protocol { phase, detail: reply.summary() }),
            },
            State::AuthStart => match (reply.code, &self.goal) {
                (334, Goal::Login(login)) => {
                    let line = secret_line(b"", &login.initial_response);
                    self.state = State::AuthResponse { challenge: None };
                    Ok(Action::SendSecret(line))
                }
                (400..=499, _) => Err(ClientError::Temporary(Refusal::new(reply.summary()))),
                _ => Err(ClientError::Rejected(Refusal::new(format!("AUTH XOAUTH2 refused: {}", reply.summary())))),
            },
            State::AuthResponse { challenge } => {
                if reply.code == 334 && challenge.is_none() {
                    // The error challenge: an empty line gets the final reply.
                    let text = reply.lines.first().map_or(&[][..], Vec::as_slice);
                    *challenge = Some(crate::sasl::xoauth2::describe_error_challenge(text));
                    return Ok(Action::Send(b"\r\n".to_vec()));
                }
                let refusal = Refusal { reply: reply.summary(), challenge: challenge.take() };
                self.state = State::Finished;
                match reply.code {
                    235 => Ok(Action::Done(Outcome::LoggedIn(SmtpSuccess { reply }))),
                    400..=499 => Err(ClientError::Temporary(refusal)),
                    _ => Err(ClientError::Rejected(refusal)),
                }
            }
            State::Ready | State::Finished => Err(ClientError::Protocol { phase, detail: reply.summary() }),
        }
    }

    fn tls_started(&mut self) {
        self.reader = ReplyReader::new(MAX_LINE);
        self.state = State::Ready;
    }

    fn phase(&self) -> &'static str {
        match self.state {
            State::Greeting => "reading the greeting",
            State::Ehlo { .. } | State::Ready => "sending EHLO",
            State::StartTls => "starting TLS",
            State::AuthStart | State::AuthResponse { .. } | State::Finished => "authenticating",
        }
    }
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

    mod dialogue {
        use super::super::*;
        use crate::protocol::client::testing::{every_chunk, login};
        use crate::protocol::client::{ClientError, Dialogue, Goal, Refusal};

        const GREETING: &[u8] = b"220 mx.example Microsoft ESMTP MAIL Service ready\r\n";
        const EHLO_PLAIN: &[u8] = b"250-mx.example Hello\r\n250-SIZE 157286400\r\n250-STARTTLS\r\n250 8BITMIME\r\n";
        const EHLO_TLS: &[u8] =
            b"250-mx.example Hello\r\n250-SIZE 157286400\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME\r\n";

        fn run(goal: impl Fn() -> Goal, script: &[&[u8]]) -> (String, Result<String, ClientError>, Vec<u8>) {
            every_chunk(|| SmtpClient::new(true, goal()), script, |s| format!("logged in: {}", s.reply.summary()))
        }

        #[test]
        fn starttls_twice_ehlo_then_two_step_xoauth2() {
            let (sent, result, leftover) = run(
                || login(&[], Some("printer.lan")),
                &[
                    GREETING,
                    EHLO_PLAIN,
                    b"220 2.0.0 SMTP server ready\r\n",
                    EHLO_TLS,
                    b"334 \r\n",
                    b"235 2.7.0 Authentication successful\r\n",
                ],
            );
            assert_eq!(sent, "EHLO printer.lan\r\nSTARTTLS\r\nEHLO printer.lan\r\nAUTH XOAUTH2\r\nSVI=\r\n");
            assert_eq!(result.unwrap(), "logged in: 235 2.7.0 Authentication successful");
            assert!(leftover.is_empty());
        }

        #[test]
        fn probe_returns_the_keywords_after_tls() {
            let (sent, result, _) = run(|| Goal::Probe, &[GREETING, EHLO_PLAIN, b"220 go\r\n", EHLO_TLS]);
            assert_eq!(sent, "EHLO xoauth2-proxy\r\nSTARTTLS\r\nEHLO xoauth2-proxy\r\n");
            assert_eq!(result.unwrap(), "caps SIZE 157286400 AUTH LOGIN XOAUTH2 8BITMIME");
        }

        #[test]
        fn exchange_refusals() {
            let challenge = crate::sasl::encode_base64(br#"{"status":"535"}"#);
            let line = format!("334 {challenge}\r\n");
            let script: &[&[u8]] = &[
                GREETING,
                EHLO_PLAIN,
                b"220 go\r\n",
                EHLO_TLS,
                b"334 \r\n",
                line.as_bytes(),
                b"535 5.7.3 Authentication unsuccessful [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]\r\n",
            ];
            let (sent, result, _) = run(|| login(&[], None), script);
            assert!(sent.ends_with("AUTH XOAUTH2\r\nSVI=\r\n\r\n"), "{sent}");
            assert_eq!(
                result.unwrap_err(),
                ClientError::Rejected(Refusal {
                    reply: "535 5.7.3 Authentication unsuccessful [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]"
                        .into(),
                    challenge: Some(r#"{"status":"535"}"#.into()),
                })
            );
            let busy: &[&[u8]] = &[
                GREETING,
                EHLO_PLAIN,
                b"220 go\r\n",
                EHLO_TLS,
                b"334 \r\n",
                b"432 4.3.2 Concurrent connections limit exceeded.\r\n",
            ];
            let (_, result, _) = run(|| login(&[], None), busy);
            assert_eq!(
                result.unwrap_err(),
                ClientError::Temporary(Refusal::new("432 4.3.2 Concurrent connections limit exceeded.".into()))
            );
            let no_auth: &[&[u8]] =
                &[GREETING, EHLO_PLAIN, b"220 go\r\n", EHLO_TLS, b"504 5.7.4 Unrecognized authentication type\r\n"];
            let (_, result, _) = run(|| login(&[], None), no_auth);
            assert_eq!(
                result.unwrap_err(),
                ClientError::Rejected(Refusal::new(
                    "AUTH XOAUTH2 refused: 504 5.7.4 Unrecognized authentication type".into()
                ))
            );
        }

        #[test]
        fn greeting_and_starttls_failures() {
            let (_, result, _) = run(|| Goal::Probe, &[b"421 4.3.2 Service not available\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::Busy("421 4.3.2 Service not available".into()));
            let (_, result, _) = run(|| Goal::Probe, &[b"554 5.7.1 go away\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::Refused("554 5.7.1 go away".into()));
            let (_, result, _) = run(|| Goal::Probe, &[GREETING, b"250 mx hello\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::NoStartTls);
            let (_, result, _) = run(|| Goal::Probe, &[GREETING, EHLO_PLAIN, b"454 4.7.0 TLS not available\r\n"]);
            assert_eq!(result.unwrap_err().to_string(), "unexpected answer starting TLS: 454 4.7.0 TLS not available");
            let (_, result, _) = run(|| Goal::Probe, &[GREETING, b"500 what\r\n"]);
            assert_eq!(result.unwrap_err().to_string(), "unexpected answer sending EHLO: 500 what");
        }
    }
}
