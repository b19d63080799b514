//! The IMAP upstream: parsing what the server says up to the end of
//! authentication, and the dialogue that gets there (greeting, STARTTLS,
//! CAPABILITY, `AUTHENTICATE XOAUTH2`).

use super::super::client::{secret_line, Action, ClientError, Dialogue, Goal, Outcome, Refusal};
use super::super::line::{LineError, LineFramer};
use crate::text::printable;
use bytes::BytesMut;
use std::fmt;

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
                Err(LineError::TooLong | LineError::Endless) => return Err(ResponseError::TooLong),
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

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Untagged(line) => f.write_str(&printable(line, 200)),
            Response::Continuation(text) => write!(f, "+ {}", printable(text, 200)),
            Response::Tagged { tag, status, text } => {
                let status = match status {
                    Status::Ok => "OK",
                    Status::No => "NO",
                    Status::Bad => "BAD",
                };
                write!(f, "{} {status} {}", printable(tag, 40), printable(text, 200))
            }
        }
    }
}

/// Longest upstream line accepted before authentication (capability lists
/// and SASL challenges are far shorter).
pub const MAX_LINE: usize = 64 * 1024;

/// More untagged responses before a tagged one than any server sends while
/// logging in: the upstream is not going to finish.
const MAX_UNTAGGED: usize = 256;

const PROBE_TAG: &[u8] = b"P1";
const STARTTLS_TAG: &[u8] = b"S1";
const AUTH_TAG: &[u8] = b"A1";

enum State {
    Greeting,
    StartTls,
    /// Secured: the next step starts the goal.
    Ready,
    Capabilities,
    Authenticating {
        response_sent: bool,
        challenge: Option<String>,
    },
    Finished,
}

/// The upstream IMAP dialogue.
pub struct ImapClient {
    reader: ResponseReader,
    state: State,
    starttls: bool,
    goal: Goal,
    /// Capabilities seen so far over a trusted channel.
    caps: Option<Vec<String>>,
    untagged: Vec<Vec<u8>>,
}

impl ImapClient {
    fn unexpected(&self, response: &Response) -> ClientError {
        ClientError::Protocol { phase: self.phase(), detail: response.to_string() }
    }

    /// The first step once the connection is secured.
    fn begin(&mut self) -> Action<ImapSuccess> {
        match &self.goal {
            Goal::Probe => match self.caps.take() {
                Some(caps) => {
                    self.state = State::Finished;
                    Action::Done(Outcome::Capabilities(caps))
                }
                None => {
                    self.state = State::Capabilities;
                    Action::Send(b"P1 CAPABILITY\r\n".to_vec())
                }
            },
            Goal::Login(login) => {
                let caps = self.caps.as_deref().unwrap_or(&login.known_caps);
                let sasl_ir = caps.iter().any(|c| c.eq_ignore_ascii_case("SASL-IR"));
                self.state = State::Authenticating { response_sent: sasl_ir, challenge: None };
                if sasl_ir {
                    Action::SendSecret(secret_line(b"A1 AUTHENTICATE XOAUTH2 ", &login.initial_response))
                } else {
                    Action::Send(b"A1 AUTHENTICATE XOAUTH2\r\n".to_vec())
                }
            }
        }
    }
}

impl Dialogue for ImapClient {
    type Success = ImapSuccess;
    const GOODBYE: &'static [u8] = b"P2 LOGOUT\r\n";

    fn new(starttls: bool, goal: Goal) -> Self {
        ImapClient {
            reader: ResponseReader::new(MAX_LINE),
            state: State::Greeting,
            starttls,
            goal,
            caps: None,
            untagged: Vec::new(),
        }
    }

    fn step(&mut self, input: &mut BytesMut) -> Result<Action<ImapSuccess>, ClientError> {
        loop {
            if let State::Ready = self.state {
                return Ok(self.begin());
            }
            if let State::Finished = self.state {
                return Err(ClientError::Protocol { phase: self.phase(), detail: "the dialogue is over".into() });
            }
            let response = match self.reader.next(input) {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(Action::Read),
                Err(e) => return Err(ClientError::Protocol { phase: self.phase(), detail: e.to_string() }),
            };
            match (&mut self.state, response) {
                (State::Greeting, Response::Untagged(line)) if starts_with_ci(&line, b"* OK") => {
                    if self.starttls {
                        self.state = State::StartTls;
                        return Ok(Action::Send(b"S1 STARTTLS\r\n".to_vec()));
                    }
                    self.caps = capabilities(&line);
                    self.state = State::Ready;
                }
                (State::Greeting, Response::Untagged(line)) if starts_with_ci(&line, b"* BYE") => {
                    return Err(ClientError::Busy(printable(&line, 200)));
                }
                (State::StartTls | State::Capabilities | State::Authenticating { .. }, Response::Untagged(line)) => {
                    if let State::Authenticating { .. } = self.state {
                        if starts_with_ci(&line, b"* BYE") {
                            return Err(ClientError::Temporary(Refusal::new(printable(&line, 200))));
                        }
                    }
                    self.untagged.push(line);
                    if self.untagged.len() > MAX_UNTAGGED {
                        return Err(ClientError::Protocol {
                            phase: self.phase(),
                            detail: "endless untagged responses".into(),
                        });
                    }
                }
                (State::StartTls, Response::Tagged { tag, status, .. }) if tag == STARTTLS_TAG => {
                    if status != Status::Ok {
                        return Err(ClientError::NoStartTls);
                    }
                    // Capabilities seen before TLS are not to be trusted after it.
                    self.untagged.clear();
                    return Ok(Action::StartTls);
                }
                (State::Capabilities, Response::Tagged { tag, status, text }) if tag == PROBE_TAG => {
                    if status != Status::Ok {
                        return Err(ClientError::Protocol { phase: self.phase(), detail: printable(&text, 200) });
                    }
                    let caps = self.untagged.iter().find_map(|l| capabilities(l)).unwrap_or_default();
                    self.state = State::Finished;
                    return Ok(Action::Done(Outcome::Capabilities(caps)));
                }
                // One error challenge gets one empty answer; a server that
                // kept challenging would keep the login going for ever.
                (State::Authenticating { response_sent, challenge }, Response::Continuation(text))
                    if challenge.is_none() =>
                {
                    let Goal::Login(login) = &self.goal else {
                        return Err(ClientError::Protocol { phase: "authenticating", detail: "no login".into() });
                    };
                    if !*response_sent {
                        *response_sent = true;
                        return Ok(Action::SendSecret(secret_line(b"", &login.initial_response)));
                    }
                    // The error challenge: an empty line gets the final NO.
                    *challenge = Some(crate::sasl::xoauth2::describe_error_challenge(&text));
                    return Ok(Action::Send(b"\r\n".to_vec()));
                }
                (State::Authenticating { challenge, .. }, Response::Tagged { tag, status, text })
                    if tag == AUTH_TAG =>
                {
                    let refusal = Refusal { reply: printable(&text, 200), challenge: challenge.take() };
                    self.state = State::Finished;
                    return match status {
                        Status::Ok => Ok(Action::Done(Outcome::LoggedIn(ImapSuccess {
                            untagged: std::mem::take(&mut self.untagged),
                            text,
                        }))),
                        Status::No if is_temporary(&text) => Err(ClientError::Temporary(refusal)),
                        Status::No | Status::Bad => Err(ClientError::Rejected(refusal)),
                    };
                }
                (_, other) => return Err(self.unexpected(&other)),
            }
        }
    }

    fn tls_started(&mut self) {
        self.reader = ResponseReader::new(MAX_LINE);
        self.caps = None;
        self.state = State::Ready;
    }

    fn phase(&self) -> &'static str {
        match self.state {
            State::Greeting => "reading the greeting",
            State::StartTls => "starting TLS",
            State::Ready | State::Capabilities => "asking for capabilities",
            State::Authenticating { .. } | State::Finished => "authenticating",
        }
    }
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix))
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

    mod dialogue {
        use super::super::*;
        use crate::protocol::client::testing::{every_chunk, login};
        use crate::protocol::client::{ClientError, Dialogue, Goal, Refusal};

        const EXCHANGE_GREETING: &[u8] = b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n";

        fn run(
            starttls: bool,
            goal: impl Fn() -> Goal,
            script: &[&[u8]],
        ) -> (String, Result<String, ClientError>, Vec<u8>) {
            every_chunk(
                || ImapClient::new(starttls, goal()),
                script,
                |s| {
                    let untagged: Vec<String> =
                        s.untagged.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
                    format!("logged in: {} / {}", untagged.join(" | "), String::from_utf8_lossy(&s.text))
                },
            )
        }

        #[test]
        fn sasl_ir_from_the_probe_when_the_greeting_has_no_capabilities() {
            let (sent, result, leftover) = run(
                false,
                || login(&["IMAP4rev1", "SASL-IR"], None),
                &[EXCHANGE_GREETING, b"A1 OK AUTHENTICATE completed.\r\n* 3 EXISTS\r\n"],
            );
            assert_eq!(sent, "A1 AUTHENTICATE XOAUTH2 SVI=\r\n");
            assert_eq!(result.unwrap(), "logged in:  / AUTHENTICATE completed.");
            assert_eq!(leftover, b"* 3 EXISTS\r\n", "bytes after the OK belong to the client");
        }

        #[test]
        fn greeting_capabilities_win_over_the_probe() {
            let (sent, result, _) = run(
                false,
                || login(&["IMAP4rev1", "SASL-IR"], None),
                &[b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] Dovecot ready.\r\n", b"+ \r\n", b"A1 OK done\r\n"],
            );
            assert_eq!(sent, "A1 AUTHENTICATE XOAUTH2\r\nSVI=\r\n", "no SASL-IR: the two-step form");
            assert!(result.unwrap().starts_with("logged in"));
        }

        #[test]
        fn the_error_challenge_is_answered_and_decoded() {
            let challenge = crate::sasl::encode_base64(br#"{"status":"401","schemes":"bearer"}"#);
            let challenge_line = format!("+ {challenge}\r\n");
            let (sent, result, _) = run(
                false,
                || login(&["SASL-IR"], None),
                &[EXCHANGE_GREETING, challenge_line.as_bytes(), b"A1 NO AUTHENTICATE failed.\r\n"],
            );
            assert_eq!(sent, "A1 AUTHENTICATE XOAUTH2 SVI=\r\n\r\n");
            assert_eq!(
                result.unwrap_err(),
                ClientError::Rejected(Refusal {
                    reply: "AUTHENTICATE failed.".into(),
                    challenge: Some(r#"{"status":"401","schemes":"bearer"}"#.into())
                })
            );
        }

        #[test]
        fn a_second_error_challenge_is_an_error() {
            let (sent, result, _) = run(
                false,
                || login(&["SASL-IR"], None),
                &[EXCHANGE_GREETING, b"+ e30=\r\n", b"+ e30=\r\n", b"A1 NO AUTHENTICATE failed.\r\n"],
            );
            assert_eq!(sent, "A1 AUTHENTICATE XOAUTH2 SVI=\r\n\r\n", "one challenge, one answer");
            assert_eq!(result.unwrap_err().to_string(), "unexpected answer authenticating: + e30=");
        }

        #[test]
        fn endless_untagged_responses_are_an_error() {
            let endless = b"* OK still here\r\n".repeat(MAX_UNTAGGED + 1);
            for (starttls, goal) in [(true, Goal::Probe), (false, Goal::Probe), (false, login(&[], None))] {
                let mut input = BytesMut::new();
                let (_, result) = crate::protocol::client::testing::play(
                    ImapClient::new(starttls, goal),
                    &[EXCHANGE_GREETING, &endless],
                    4096,
                    &mut input,
                );
                assert!(result.unwrap_err().to_string().ends_with("endless untagged responses"));
            }
        }

        #[test]
        fn temporary_failures_and_goodbyes() {
            let (_, result, _) =
                run(false, || login(&["SASL-IR"], None), &[EXCHANGE_GREETING, b"A1 NO [UNAVAILABLE] busy\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::Temporary(Refusal::new("[UNAVAILABLE] busy".into())));
            let (_, result, _) = run(
                false,
                || login(&["SASL-IR"], None),
                &[EXCHANGE_GREETING, b"* BYE Session invalidated - AccessTokenExpired\r\n"],
            );
            assert!(matches!(result.unwrap_err(), ClientError::Temporary(r) if r.reply.contains("AccessTokenExpired")));
            let (_, result, _) = run(false, || Goal::Probe, &[b"* BYE too many connections\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::Busy("* BYE too many connections".into()));
            let (_, result, _) = run(false, || login(&[], None), &[EXCHANGE_GREETING, b"A1 BAD syntax\r\n"]);
            assert!(matches!(result.unwrap_err(), ClientError::Rejected(_)));
        }

        #[test]
        fn starttls_then_capabilities_are_asked_again() {
            let (sent, result, _) = run(
                true,
                || Goal::Probe,
                &[
                    b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n",
                    b"S1 OK Begin TLS negotiation now.\r\n",
                    b"* CAPABILITY IMAP4rev1 IDLE SASL-IR\r\nP1 OK done\r\n",
                ],
            );
            assert_eq!(sent, "S1 STARTTLS\r\nP1 CAPABILITY\r\n");
            assert_eq!(result.unwrap(), "caps IMAP4rev1 IDLE SASL-IR");
            let (_, result, _) = run(true, || Goal::Probe, &[EXCHANGE_GREETING, b"S1 NO not here\r\n"]);
            assert_eq!(result.unwrap_err(), ClientError::NoStartTls);
        }

        #[test]
        fn probe_uses_greeting_capabilities_without_a_round_trip() {
            let (sent, result, _) = run(false, || Goal::Probe, &[b"* OK [CAPABILITY IMAP4rev1 IDLE] hi\r\n"]);
            assert_eq!(sent, "");
            assert_eq!(result.unwrap(), "caps IMAP4rev1 IDLE");
        }

        #[test]
        fn protocol_errors_read_as_text() {
            let (_, result, _) = run(false, || Goal::Probe, &[b"+ \x01\x02 what\r\n"]);
            assert_eq!(result.unwrap_err().to_string(), "unexpected answer reading the greeting: + \\x01\\x02 what");
            let (_, result, _) = run(false, || login(&["SASL-IR"], None), &[EXCHANGE_GREETING, b"ZZ OK other tag\r\n"]);
            assert_eq!(result.unwrap_err().to_string(), "unexpected answer authenticating: ZZ OK other tag");
        }
    }
}
