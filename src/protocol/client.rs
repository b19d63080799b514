//! The proxy as a client of the upstream: the shape every protocol's
//! upstream dialogue has.
//!
//! Each protocol's dialogue ([`super::imap::ImapClient`],
//! [`super::pop3::Pop3Client`], [`super::smtp::SmtpClient`]) is a pure
//! machine: bytes from the upstream go in, an [`Action`] comes out. One
//! driver (`crate::upstream`) runs any of them over a connection, with the
//! timeouts and the TLS handshake, so the machines can be tested and fuzzed
//! without a server.

use crate::secret::Secret;
use bytes::BytesMut;
use std::fmt;
use std::sync::Arc;

/// What a dialogue is for.
#[derive(Debug)]
pub enum Goal {
    /// Learn the capabilities a client should see before login.
    Probe,
    /// Authenticate with XOAUTH2.
    Login(Login),
}

/// What an XOAUTH2 login needs beyond the connection.
#[derive(Debug)]
pub struct Login {
    /// The base64 XOAUTH2 initial response (it embeds the token).
    pub initial_response: Secret<String>,
    /// The name the client gave for itself; SMTP greets the upstream with it.
    pub client_name: Option<String>,
    /// Capabilities learned by an earlier probe, for when the greeting has
    /// none (IMAP decides on SASL-IR with them).
    pub known_caps: Arc<[String]>,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Action<S> {
    /// Write these bytes, then call `step` again.
    Send(Vec<u8>),
    /// Write these bytes (they hold the token), then call `step` again.
    SendSecret(Secret<Vec<u8>>),
    /// Read more from the upstream, then call `step` again.
    Read,
    /// The upstream agreed to STARTTLS: nothing it sent may be left over
    /// (a man in the middle could have injected it); run the handshake,
    /// then call `tls_started` and `step`.
    StartTls,
    /// The dialogue is over. Bytes still in the input belong to the client.
    Done(Outcome<S>),
}

#[derive(Debug)]
pub enum Outcome<S> {
    /// The capabilities a client should see before login (probe).
    Capabilities(Vec<String>),
    /// The upstream accepted the token.
    LoggedIn(S),
}

/// The upstream's answer to a login it did not accept, for logs and for
/// `check --online`: printable, never raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The final reply, e.g. `535 5.7.3 Authentication unsuccessful`.
    pub reply: String,
    /// The decoded XOAUTH2 error challenge, if the upstream sent one.
    pub challenge: Option<String>,
}

impl Refusal {
    pub fn new(reply: String) -> Self {
        Refusal { reply, challenge: None }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.challenge {
            Some(c) => write!(f, "{} (challenge {c})", self.reply),
            None => f.write_str(&self.reply),
        }
    }
}

/// Why a dialogue ended without its goal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("unexpected answer {phase}: {detail}")]
    Protocol { phase: &'static str, detail: String },
    #[error("upstream refused the connection: {0}")]
    Refused(String),
    #[error("upstream is temporarily refusing connections: {0}")]
    Busy(String),
    #[error("upstream does not offer STARTTLS")]
    NoStartTls,
    #[error("upstream refused the token: {0}")]
    Rejected(Refusal),
    #[error("upstream answered with a temporary failure: {0}")]
    Temporary(Refusal),
}

/// One protocol's upstream dialogue.
pub trait Dialogue: Send + Sized {
    /// What the upstream said when it accepted the token.
    type Success: Send;

    /// What to send before hanging up after a probe.
    const GOODBYE: &'static [u8];

    /// `starttls`: the connection starts in the clear and must be upgraded
    /// before anything else; otherwise it is already TLS (implicit).
    fn new(starttls: bool, goal: Goal) -> Self;

    /// Consumes what it can of `input` and says what to do next.
    fn step(&mut self, input: &mut BytesMut) -> Result<Action<Self::Success>, ClientError>;

    /// The TLS handshake after [`Action::StartTls`] succeeded.
    fn tls_started(&mut self);

    /// What the dialogue is doing, for timeouts and errors ("reading the greeting").
    fn phase(&self) -> &'static str;
}

/// The SASL line that carries the initial response: `prefix`, the
/// response, CRLF, assembled inside a secret so no plain copy remains.
pub(crate) fn secret_line(prefix: &[u8], response: &Secret<String>) -> Secret<Vec<u8>> {
    let mut line = Secret::new(Vec::with_capacity(prefix.len() + response.expose().len() + 2));
    line.expose_mut().extend_from_slice(prefix);
    line.expose_mut().extend_from_slice(response.expose().as_bytes());
    line.expose_mut().extend_from_slice(b"\r\n");
    line
}

#[cfg(test)]
pub(crate) mod testing {
    //! Plays a scripted upstream against a dialogue, chunk by chunk.

    use super::*;

    /// What the dialogue did, in order, as text a test can compare.
    #[derive(Debug, Default)]
    pub struct Transcript {
        /// Everything sent, secrets included (the tests need to see them).
        pub sent: String,
        pub starttls: usize,
    }

    /// Feeds `script` to `dialogue`: the upstream's turns, each delivered
    /// `chunk` bytes at a time when the dialogue asks to read, a turn only
    /// after the previous one was delivered whole (a server answers what it
    /// was asked). Returns the transcript and the result; whatever the
    /// dialogue did not consume stays in `input`.
    pub fn play<D: Dialogue>(
        mut dialogue: D,
        script: &[&[u8]],
        chunk: usize,
        input: &mut BytesMut,
    ) -> (Transcript, Result<Outcome<D::Success>, ClientError>) {
        let mut transcript = Transcript::default();
        let (mut turn, mut offset) = (0, 0);
        loop {
            match dialogue.step(input) {
                Ok(Action::Send(bytes)) => transcript.sent.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(Action::SendSecret(bytes)) => transcript.sent.push_str(&String::from_utf8_lossy(bytes.expose())),
                Ok(Action::Read) => {
                    while turn < script.len() && offset >= script[turn].len() {
                        (turn, offset) = (turn + 1, 0);
                    }
                    let Some(current) = script.get(turn) else {
                        let detail = "the script ended".to_string();
                        return (transcript, Err(ClientError::Protocol { phase: "test", detail }));
                    };
                    let end = (offset + chunk).min(current.len());
                    input.extend_from_slice(&current[offset..end]);
                    offset = end;
                }
                Ok(Action::StartTls) => {
                    assert!(input.is_empty(), "bytes left at STARTTLS: {input:?}");
                    transcript.starttls += 1;
                    dialogue.tls_started();
                }
                Ok(Action::Done(outcome)) => {
                    if let Some(current) = script.get(turn) {
                        input.extend_from_slice(&current[offset.min(current.len())..]);
                    }
                    for rest in script.iter().skip(turn + 1) {
                        input.extend_from_slice(rest);
                    }
                    return (transcript, Ok(outcome));
                }
                Err(e) => return (transcript, Err(e)),
            }
        }
    }

    /// Plays `script` at every chunk size, checks that all runs agree, and
    /// returns what was sent, the outcome as text, and the leftover input.
    pub fn every_chunk<D: Dialogue>(
        new: impl Fn() -> D,
        script: &[&[u8]],
        describe: impl Fn(D::Success) -> String,
    ) -> (String, Result<String, ClientError>, Vec<u8>) {
        let total: usize = script.iter().map(|t| t.len()).sum();
        let mut first = None;
        for chunk in 1..=total.max(1) {
            let mut input = BytesMut::new();
            let (transcript, result) = play(new(), script, chunk, &mut input);
            let result = result.map(|o| match o {
                Outcome::Capabilities(caps) => format!("caps {}", caps.join(" ")),
                Outcome::LoggedIn(s) => describe(s),
            });
            let got = (transcript.sent, result, input.to_vec());
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(f, &got, "chunk {chunk}"),
            }
        }
        first.expect("at least one run")
    }

    pub fn login(caps: &[&str], client_name: Option<&str>) -> Goal {
        Goal::Login(Login {
            initial_response: Secret::new("SVI=".into()),
            client_name: client_name.map(String::from),
            known_caps: caps.iter().map(|c| c.to_string()).collect::<Vec<_>>().into(),
        })
    }
}
