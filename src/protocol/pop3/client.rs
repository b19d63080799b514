//! The POP3 upstream: parsing what the server says up to the end of
//! authentication, and the dialogue that gets there (greeting, STLS, CAPA,
//! `AUTH XOAUTH2` in the two-step form Exchange documents).

use super::super::client::{secret_line, Action, ClientError, Dialogue, Goal, Outcome, Refusal};
use super::super::line::LineFramer;
use crate::text::printable;
use bytes::BytesMut;

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

/// Longest upstream line accepted before authentication.
pub const MAX_LINE: usize = 64 * 1024;

/// More CAPA lines than any server sends: the list is not ending.
const MAX_CAPA_LINES: usize = 256;

enum State {
    Greeting,
    StartTls,
    Ready,
    CapaStatus,
    CapaList(Vec<String>),
    AuthStart,
    AuthResponse { challenge: Option<String> },
    Finished,
}

/// The upstream POP3 dialogue.
pub struct Pop3Client {
    framer: LineFramer,
    state: State,
    starttls: bool,
    goal: Goal,
}

impl Dialogue for Pop3Client {
    type Success = Pop3Success;
    const GOODBYE: &'static [u8] = b"QUIT\r\n";

    fn new(starttls: bool, goal: Goal) -> Self {
        Pop3Client { framer: LineFramer::new(MAX_LINE), state: State::Greeting, starttls, goal }
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Action<Pop3Success>, ClientError> {
        loop {
            match (&self.state, &self.goal) {
                (State::Ready, Goal::Probe) => {
                    self.state = State::CapaStatus;
                    return Ok(Action::Send(b"CAPA\r\n".to_vec()));
                }
                (State::Ready, Goal::Login(_)) => {
                    self.state = State::AuthStart;
                    return Ok(Action::Send(b"AUTH XOAUTH2\r\n".to_vec()));
                }
                (State::Finished, _) => {
                    return Err(ClientError::Protocol { phase: self.phase(), detail: "the dialogue is over".into() })
                }
                _ => {}
            }
            let phase = self.phase();
            let line = match self.framer.next_line(input) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(Action::Read),
                Err(_) => return Err(ClientError::Protocol { phase, detail: "line too long".into() }),
            };
            if let State::CapaList(caps) = &mut self.state {
                match multiline_item(&line) {
                    Some(item) => {
                        caps.push(String::from_utf8_lossy(item).trim().to_string());
                        if caps.len() > MAX_CAPA_LINES {
                            return Err(ClientError::Protocol { phase, detail: "endless CAPA list".into() });
                        }
                    }
                    None => {
                        let caps = std::mem::take(caps);
                        self.state = State::Finished;
                        return Ok(Action::Done(Outcome::Capabilities(caps)));
                    }
                }
                continue;
            }
            let reply = parse_reply(&line)
                .map_err(|e| ClientError::Protocol { phase, detail: format!("{e}: {}", printable(&line, 200)) })?;
            match (&mut self.state, reply) {
                (State::Greeting, Reply::Ok(_)) => {
                    if self.starttls {
                        self.state = State::StartTls;
                        return Ok(Action::Send(b"STLS\r\n".to_vec()));
                    }
                    self.state = State::Ready;
                }
                (State::Greeting, Reply::Err(text)) if is_temporary(&text) => {
                    return Err(ClientError::Busy(printable(&text, 200)))
                }
                (State::Greeting, _) => return Err(ClientError::Refused(printable(&line, 200))),
                (State::StartTls, Reply::Ok(_)) => return Ok(Action::StartTls),
                (State::StartTls, _) => return Err(ClientError::NoStartTls),
                // A server without CAPA: nothing to rewrite.
                (State::CapaStatus, Reply::Ok(_)) => self.state = State::CapaList(Vec::new()),
                (State::CapaStatus, _) => {
                    self.state = State::Finished;
                    return Ok(Action::Done(Outcome::Capabilities(Vec::new())));
                }
                (State::AuthStart, Reply::Continuation(_)) => {
                    let Goal::Login(login) = &self.goal else {
                        return Err(ClientError::Protocol { phase, detail: printable(&line, 200) });
                    };
                    self.state = State::AuthResponse { challenge: None };
                    return Ok(Action::SendSecret(secret_line(b"", &login.initial_response)));
                }
                (State::AuthStart, Reply::Err(text)) if is_temporary(&text) => {
                    return Err(ClientError::Temporary(Refusal::new(printable(&text, 200))))
                }
                (State::AuthStart, _) => {
                    let reply = format!("AUTH XOAUTH2 refused: {}", printable(&line, 200));
                    return Err(ClientError::Rejected(Refusal::new(reply)));
                }
                (State::AuthResponse { .. }, Reply::Ok(_)) => {
                    self.state = State::Finished;
                    return Ok(Action::Done(Outcome::LoggedIn(Pop3Success { line: line.to_vec() })));
                }
                (State::AuthResponse { challenge }, Reply::Continuation(text)) if challenge.is_none() => {
                    // The error challenge: an empty line gets the final -ERR.
                    *challenge = Some(crate::sasl::xoauth2::describe_error_challenge(&text));
                    return Ok(Action::Send(b"\r\n".to_vec()));
                }
                (State::AuthResponse { challenge }, Reply::Err(text)) => {
                    let refusal = Refusal { reply: printable(&text, 200), challenge: challenge.take() };
                    self.state = State::Finished;
                    return Err(if is_temporary(&text) {
                        ClientError::Temporary(refusal)
                    } else {
                        ClientError::Rejected(refusal)
                    });
                }
                _ => return Err(ClientError::Protocol { phase, detail: printable(&line, 200) }),
            }
        }
    }

    fn tls_started(&mut self) {
        self.framer = LineFramer::new(MAX_LINE);
        self.state = State::Ready;
    }

    fn phase(&self) -> &'static str {
        match self.state {
            State::Greeting => "reading the greeting",
            State::StartTls => "starting TLS",
            State::Ready | State::CapaStatus | State::CapaList(_) => "asking for capabilities",
            State::AuthStart | State::AuthResponse { .. } | State::Finished => "authenticating",
        }
    }
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

    mod dialogue {
        use super::super::*;
        use crate::protocol::client::testing::{every_chunk, login};
        use crate::protocol::client::{ClientError, Dialogue, Goal, Refusal};

        const GREETING: &[u8] = b"+OK The Microsoft Exchange POP3 service is ready.\r\n";

        fn run(
            starttls: bool,
            goal: impl Fn() -> Goal,
            script: &[&[u8]],
        ) -> (String, Result<String, ClientError>, Vec<u8>) {
            every_chunk(
                || Pop3Client::new(starttls, goal()),
                script,
                |s| format!("logged in: {}", String::from_utf8_lossy(&s.line)),
            )
        }

        #[test]
        fn two_step_login_as_exchange_documents_it() {
            let (sent, result, leftover) =
                run(false, || login(&[], None), &[GREETING, b"+ \r\n", b"+OK User successfully authenticated.\r\n"]);
            assert_eq!(sent, "AUTH XOAUTH2\r\nSVI=\r\n");
            assert_eq!(result.unwrap(), "logged in: +OK User successfully authenticated.");
            assert!(leftover.is_empty());
        }

        #[test]
        fn error_challenge_then_refusal() {
            let challenge = crate::sasl::encode_base64(br#"{"status":"401"}"#);
            let line = format!("+ {challenge}\r\n");
            let (sent, result, _) = run(
                false,
                || login(&[], None),
                &[
                    GREETING,
                    b"+ \r\n",
                    line.as_bytes(),
                    b"-ERR Authentication failure: unknown user name or bad password.\r\n",
                ],
            );
            assert_eq!(sent, "AUTH XOAUTH2\r\nSVI=\r\n\r\n");
            assert_eq!(
                result.unwrap_err(),
                ClientError::Rejected(Refusal {
                    reply: "Authentication failure: unknown user name or bad password.".into(),
                    challenge: Some(r#"{"status":"401"}"#.into()),
                })
            );
        }

        #[test]
        fn temporary_and_refused_answers() {
            let (_, result, _) = run(false, || login(&[], None), &[GREETING, b"-ERR [SYS/TEMP] busy\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::Temporary(Refusal::new("[SYS/TEMP] busy".into())));
            let (_, result, _) = run(false, || login(&[], None), &[GREETING, b"-ERR no XOAUTH2 here\r\n"]);
            assert_eq!(
                result.unwrap_err(),
                ClientError::Rejected(Refusal::new("AUTH XOAUTH2 refused: -ERR no XOAUTH2 here".into()))
            );
            let (_, result, _) = run(false, || Goal::Probe, &[b"-ERR [IN-USE] later\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::Busy("[IN-USE] later".into()));
            let (_, result, _) = run(false, || Goal::Probe, &[b"-ERR go away\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::Refused("-ERR go away".into()));
            let (_, result, _) = run(false, || Goal::Probe, &[b"HELLO\r\n"]);
            assert_eq!(
                result.unwrap_err().to_string(),
                "unexpected answer reading the greeting: malformed POP3 reply: HELLO"
            );
        }

        #[test]
        fn probe_after_stls() {
            let (sent, result, _) = run(
                true,
                || Goal::Probe,
                &[GREETING, b"+OK Begin TLS\r\n", b"+OK\r\nTOP\r\nUIDL\r\nSASL XOAUTH2\r\n..hidden\r\n.\r\n"],
            );
            assert_eq!(sent, "STLS\r\nCAPA\r\n");
            assert_eq!(result.unwrap(), "caps TOP UIDL SASL XOAUTH2 .hidden");
            let (_, result, _) = run(true, || Goal::Probe, &[GREETING, b"-ERR no\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::NoStartTls);
            let (_, result, _) = run(false, || Goal::Probe, &[GREETING, b"-ERR unknown command\r\n"]);
            assert_eq!(result.unwrap(), "caps ", "a server without CAPA has nothing to rewrite");
        }

        #[test]
        fn an_endless_capa_list_is_an_error() {
            let mut list = b"+OK\r\n".to_vec();
            for _ in 0..300 {
                list.extend_from_slice(b"X\r\n");
            }
            let mut input = bytes::BytesMut::new();
            let (_, result) = crate::protocol::client::testing::play(
                Pop3Client::new(false, Goal::Probe),
                &[GREETING, &list],
                4096,
                &mut input,
            );
            assert_eq!(result.unwrap_err().to_string(), "unexpected answer asking for capabilities: endless CAPA list");
        }
    }
}
