//! The pure protocol layer: framing, the pre-authentication dialogue each
//! protocol has with local clients, and parsers for upstream responses.
//!
//! Nothing here does IO or knows about tokio. A session driver feeds client
//! bytes to a [`PreAuth`] machine, writes what it produces, and acts on the
//! [`Next`] step it returns.

pub mod imap;
pub mod line;
pub mod pop3;
pub mod reply;
pub mod smtp;

use crate::sasl::Credentials;
use bytes::BytesMut;
pub use reply::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Imap,
    Pop3,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What shapes the dialogue on one client connection.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Longest command line accepted before authentication.
    pub max_line: usize,
    /// Failed authentications after which the connection is closed.
    pub max_auth_failures: u32,
    /// STARTTLS is configured on this listener.
    pub starttls: bool,
    /// The connection is encrypted (implicit TLS, or after STARTTLS).
    pub tls_active: bool,
    /// Authentication before TLS is refused.
    pub require_tls: bool,
    /// Passwords may be sent over an unencrypted connection.
    pub plaintext_allowed: bool,
}

impl SessionOptions {
    /// Why authentication must be refused on this connection right now, if it must.
    pub fn auth_refusal(&self) -> Option<Failure> {
        if self.tls_active {
            None
        } else if self.require_tls {
            Some(Failure::TlsRequired)
        } else if !self.plaintext_allowed {
            Some(Failure::PlaintextDisabled)
        } else {
            None
        }
    }

    pub fn offer_starttls(&self) -> bool {
        self.starttls && !self.tls_active
    }
}

/// A complete login from the client, to be verified and carried upstream.
#[derive(Debug)]
pub struct LoginRequest {
    pub credentials: Credentials,
    /// The name the client gave in EHLO/HELO, reused upstream.
    pub client_name: Option<String>,
}

/// What the session driver must do after feeding input to a [`PreAuth`] machine.
#[derive(Debug)]
pub enum Next {
    /// Write the output, then read more from the client.
    Read,
    /// Write the output, verify the login, get a token, authenticate upstream,
    /// then call [`PreAuth::auth_succeeded`] or [`PreAuth::auth_failed`].
    Authenticate(LoginRequest),
    /// Write the output, then run the TLS handshake on the client connection
    /// and call [`PreAuth::tls_started`].
    StartTls,
    /// Write the output, then close the connection.
    Close,
}

/// The pre-authentication dialogue of one protocol, as a state machine.
pub trait PreAuth {
    /// What the upstream said when it accepted the token.
    type Success;

    fn greeting(&mut self, out: &mut Vec<u8>);

    /// Consumes as much of `input` as makes progress. Bytes after a complete
    /// login stay in `input`: they belong to the upstream.
    fn handle(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> Next;

    /// The pending login failed; answers the client. Returns [`Next::Close`]
    /// when the failure ends the session.
    fn auth_failed(&mut self, failure: Failure, out: &mut Vec<u8>) -> Next;

    /// The pending login succeeded upstream; answers the client. From here
    /// the session is a splice.
    fn auth_succeeded(&mut self, success: &Self::Success, out: &mut Vec<u8>);

    /// The client connection is now TLS: the dialogue starts over.
    fn tls_started(&mut self);

    /// Ends the session for a reason outside the dialogue (timeout, shutdown).
    fn abort(&mut self, failure: Failure, out: &mut Vec<u8>);
}

/// Counts failed logins on one connection.
#[derive(Debug)]
pub(crate) struct FailureCount {
    count: u32,
    max: u32,
}

impl FailureCount {
    pub(crate) fn new(max: u32) -> Self {
        FailureCount { count: 0, max: max.max(1) }
    }

    /// Records a failure; true when the connection must now be closed.
    pub(crate) fn exhausted_after_one_more(&mut self) -> bool {
        self.count += 1;
        self.count >= self.max
    }
}

/// A SASL challenge line: `prefix` (`+ ` or `334 `), then the base64 challenge.
pub(crate) fn sasl_challenge(prefix: &[u8], challenge: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(prefix);
    out.extend_from_slice(crate::sasl::encode_base64(challenge).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The reply for a SASL exchange that went wrong.
pub(crate) fn sasl_failure(e: crate::sasl::SaslError) -> Failure {
    use crate::sasl::SaslError;
    match e {
        SaslError::Cancelled => Failure::SaslCancelled,
        SaslError::BadBase64 | SaslError::Malformed(_) => Failure::SaslMalformed,
        SaslError::AuthzidMismatch => Failure::AuthFailed,
    }
}

/// Splits `VERB rest` at the first space; the verb is upper-cased.
pub(crate) fn split_verb(line: &[u8]) -> (Vec<u8>, &[u8]) {
    match line.iter().position(|&b| b == b' ') {
        Some(at) => (line[..at].to_ascii_uppercase(), &line[at + 1..]),
        None => (line.to_ascii_uppercase(), &[]),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Drives a [`PreAuth`] machine from a scripted client, chunk by chunk.

    use super::*;

    #[derive(Debug, PartialEq)]
    pub enum Outcome {
        Read,
        Login { username: String, password: String, client_name: Option<String> },
        StartTls,
        Close,
    }

    /// Feeds `input` in chunks of `chunk` bytes; stops at the first step
    /// other than `Read`. Returns the output and that step.
    pub fn drive<M: PreAuth>(machine: &mut M, input: &mut BytesMut, chunk: usize, pending: &[u8]) -> (String, Outcome) {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            match machine.handle(input, &mut out) {
                Next::Read => {
                    if offset >= pending.len() {
                        return (String::from_utf8_lossy(&out).into_owned(), Outcome::Read);
                    }
                    let end = (offset + chunk).min(pending.len());
                    input.extend_from_slice(&pending[offset..end]);
                    offset = end;
                }
                Next::Authenticate(req) => {
                    input.extend_from_slice(&pending[offset..]);
                    return (
                        String::from_utf8_lossy(&out).into_owned(),
                        Outcome::Login {
                            username: req.credentials.username,
                            password: String::from_utf8_lossy(req.credentials.password.expose()).into_owned(),
                            client_name: req.client_name,
                        },
                    );
                }
                Next::StartTls => {
                    input.extend_from_slice(&pending[offset..]);
                    return (String::from_utf8_lossy(&out).into_owned(), Outcome::StartTls);
                }
                Next::Close => {
                    input.extend_from_slice(&pending[offset..]);
                    return (String::from_utf8_lossy(&out).into_owned(), Outcome::Close);
                }
            }
        }
    }

    pub fn plain_options() -> SessionOptions {
        SessionOptions {
            max_line: 1024,
            max_auth_failures: 3,
            starttls: false,
            tls_active: false,
            require_tls: false,
            plaintext_allowed: true,
        }
    }
}
