//! The pure protocol layer: framing, the pre-authentication dialogue each
//! protocol has with local clients, and parsers for upstream responses.
//!
//! Nothing here does IO or knows about tokio. A session driver feeds client
//! bytes to a [`PreAuth`] machine, writes what it produces, and acts on the
//! [`Next`] step it returns; an upstream driver does the same with a
//! [`Dialogue`]. [`Spec`] ties each protocol's pieces together.

pub mod client;
pub mod imap;
pub mod line;
pub mod pop3;
pub mod preauth;
pub mod proxy;
pub mod reply;
pub mod smtp;

use crate::sasl::Credentials;
pub use client::Dialogue;
pub use preauth::{Dialect, PreAuth};
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
    /// Refused commands (syntax, unknown, too long, malformed SASL) after
    /// which the connection is closed.
    pub max_bad_commands: u32,
    /// STARTTLS is configured on this listener.
    pub starttls: bool,
    /// The connection is encrypted (implicit TLS, or after STARTTLS).
    pub tls_active: bool,
    /// Authentication before TLS is refused.
    pub require_tls: bool,
    /// Passwords may be sent over an unencrypted connection.
    pub plaintext_allowed: bool,
    /// SMTP: also advertise `AUTH=PLAIN LOGIN`, the pre-RFC 4954 form some
    /// old clients look for (Postfix's `broken_sasl_auth_clients`).
    pub auth_equals_line: bool,
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

/// Which of an account's names goes into XOAUTH2's `user=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xoauth2User {
    /// The mailbox (IMAP, POP3: a shared mailbox is opened as itself).
    Mailbox,
    /// The SMTP user (for a shared mailbox: the delegate with Send As,
    /// since SMTP AUTH cannot log in as a shared mailbox).
    SmtpUser,
}

/// Everything that differs between the three protocols, as types: the
/// client-side dialect, the upstream dialogue, and the XOAUTH2 user.
pub trait Spec: Send + Sync + 'static {
    const PROTOCOL: Protocol;
    const XOAUTH2_USER: Xoauth2User;
    type Dialect: Dialect<Success = <Self::Client as Dialogue>::Success> + Send;
    type Client: Dialogue;
}

pub struct Imap;
pub struct Pop3;
pub struct Smtp;

impl Spec for Imap {
    const PROTOCOL: Protocol = Protocol::Imap;
    const XOAUTH2_USER: Xoauth2User = Xoauth2User::Mailbox;
    type Dialect = imap::server::ImapDialect;
    type Client = imap::ImapClient;
}

impl Spec for Pop3 {
    const PROTOCOL: Protocol = Protocol::Pop3;
    const XOAUTH2_USER: Xoauth2User = Xoauth2User::Mailbox;
    type Dialect = pop3::server::Pop3Dialect;
    type Client = pop3::Pop3Client;
}

impl Spec for Smtp {
    const PROTOCOL: Protocol = Protocol::Smtp;
    const XOAUTH2_USER: Xoauth2User = Xoauth2User::SmtpUser;
    type Dialect = smtp::server::SmtpDialect;
    type Client = smtp::SmtpClient;
}

/// Something to do with a protocol known only at run time: the one place a
/// [`Protocol`] value becomes a [`Spec`] type.
pub trait WithSpec {
    type Output;
    fn call<P: Spec>(self) -> Self::Output;
}

impl Protocol {
    pub fn with<F: WithSpec>(self, f: F) -> F::Output {
        match self {
            Protocol::Smtp => f.call::<Smtp>(),
            Protocol::Imap => f.call::<Imap>(),
            Protocol::Pop3 => f.call::<Pop3>(),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Drives a [`PreAuth`] machine from a scripted client, chunk by chunk.

    use super::*;
    use bytes::BytesMut;

    #[derive(Debug, PartialEq)]
    pub enum Outcome {
        Read,
        Login { username: String, password: String, client_name: Option<String> },
        StartTls,
        Close,
    }

    /// Feeds `input` in chunks of `chunk` bytes; stops at the first step
    /// other than `Read`. Returns the output and that step.
    pub fn drive<D: Dialect>(
        machine: &mut PreAuth<D>,
        input: &mut BytesMut,
        chunk: usize,
        pending: &[u8],
    ) -> (String, Outcome) {
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

    /// Runs each transcript (client bytes, expected output, expected final
    /// step) through a fresh machine at every chunk size.
    pub fn transcripts<D: Dialect>(new: impl Fn() -> PreAuth<D>, cases: &[(&[u8], impl AsRef<str>, Outcome)]) {
        for (input, expected_out, expected_next) in cases {
            for chunk in 1..=input.len() {
                let mut m = new();
                let mut buf = BytesMut::new();
                let (out, next) = drive(&mut m, &mut buf, chunk, input);
                assert_eq!(
                    (&out[..], &next),
                    (expected_out.as_ref(), expected_next),
                    "{:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    pub fn plain_options() -> SessionOptions {
        SessionOptions {
            max_line: 1024,
            max_auth_failures: 3,
            max_bad_commands: 10,
            starttls: false,
            tls_active: false,
            require_tls: false,
            plaintext_allowed: true,
            auth_equals_line: false,
        }
    }
}
