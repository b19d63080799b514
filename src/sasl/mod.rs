//! SASL, independent of any protocol's framing.
//!
//! The server side (what local clients speak to us) supports PLAIN (RFC 4616)
//! and LOGIN; the client side (what we speak upstream) is XOAUTH2. Protocol
//! modules only wrap challenges in their own syntax (`+ `, `334 `).

pub mod login;
pub mod plain;
pub mod xoauth2;

use crate::secret::Secret;
use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
use base64::{alphabet, Engine};

/// A username and password as typed into the legacy client.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn parse(name: &[u8]) -> Option<Self> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("client cancelled the authentication exchange")]
    Cancelled,
    #[error("client response is not valid base64")]
    BadBase64,
    #[error("malformed SASL response: {0}")]
    Malformed(&'static str),
    /// PLAIN asked to act as another user: an authorization refusal, not a syntax error.
    #[error("the authorization identity differs from the username")]
    AuthzidMismatch,
}

/// Standard alphabet; padding optional because some clients omit it.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub fn encode_base64(data: &[u8]) -> String {
    B64.encode(data)
}

/// Decodes a client response. The result may hold a password, hence `Secret`.
pub fn decode_base64(data: &[u8]) -> Result<Secret<Vec<u8>>, SaslError> {
    B64.decode(data).map(Secret::new).map_err(|_| SaslError::BadBase64)
}

/// One step of a server-side exchange.
#[derive(Debug)]
pub enum Step {
    /// Send this challenge (raw bytes; the protocol base64-encodes it) and
    /// feed the client's next line to [`ServerExchange::respond`].
    Challenge(&'static [u8]),
    Done(Credentials),
}

/// The server side of PLAIN or LOGIN as a small state machine.
#[derive(Debug)]
pub struct ServerExchange {
    state: State,
}

#[derive(Debug)]
enum State {
    Plain,
    LoginUsername,
    LoginPassword { username: String },
    Finished,
}

impl ServerExchange {
    /// Starts an exchange. `initial` is the initial response exactly as it
    /// appeared on the command line: base64, or `=` for an empty response.
    pub fn start(mechanism: Mechanism, initial: Option<&[u8]>) -> Result<(Self, Step), SaslError> {
        let mut exchange = ServerExchange {
            state: match mechanism {
                Mechanism::Plain => State::Plain,
                Mechanism::Login => State::LoginUsername,
            },
        };
        let step = match initial {
            Some(line) => exchange.respond(line)?,
            None => match mechanism {
                Mechanism::Plain => Step::Challenge(b""),
                Mechanism::Login => Step::Challenge(login::USERNAME_PROMPT),
            },
        };
        Ok((exchange, step))
    }

    /// Feeds one client response line (base64, `=` for empty, `*` to cancel).
    pub fn respond(&mut self, line: &[u8]) -> Result<Step, SaslError> {
        if line == b"*" {
            self.state = State::Finished;
            return Err(SaslError::Cancelled);
        }
        let decoded = if line == b"=" { Secret::new(Vec::new()) } else { decode_base64(line)? };
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Plain => plain::decode(decoded.expose()).map(Step::Done),
            State::LoginUsername => {
                let username = login::username(decoded.expose())?;
                self.state = State::LoginPassword { username };
                Ok(Step::Challenge(login::PASSWORD_PROMPT))
            }
            State::LoginPassword { username } => {
                Ok(Step::Done(Credentials { username, password: login::password(decoded.expose())? }))
            }
            State::Finished => Err(SaslError::Malformed("exchange already finished")),
        }
    }
}

/// Usernames are compared as text; a byte sequence that is not UTF-8 cannot
/// match any configured account.
pub(crate) fn username_from_bytes(bytes: &[u8]) -> Result<String, SaslError> {
    if bytes.is_empty() {
        return Err(SaslError::Malformed("empty username"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| SaslError::Malformed("username is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(step: Step) -> Credentials {
        match step {
            Step::Done(c) => c,
            Step::Challenge(c) => panic!("unexpected challenge {c:?}"),
        }
    }

    #[test]
    fn plain_with_initial_response() {
        let ir = encode_base64(b"\0printer\0s3cret");
        let (_, step) = ServerExchange::start(Mechanism::Plain, Some(ir.as_bytes())).unwrap();
        let c = done(step);
        assert_eq!(c.username, "printer");
        assert_eq!(c.password.expose(), b"s3cret");
    }

    #[test]
    fn plain_with_continuation() {
        let (mut ex, step) = ServerExchange::start(Mechanism::Plain, None).unwrap();
        assert!(matches!(step, Step::Challenge(b"")));
        let c = done(ex.respond(encode_base64(b"printer\0printer\0pw").as_bytes()).unwrap());
        assert_eq!(c.username, "printer");
    }

    #[test]
    fn login_exchange_known_answer() {
        // The prompts every LOGIN client expects, base64 as sent on the wire.
        assert_eq!(encode_base64(login::USERNAME_PROMPT), "VXNlcm5hbWU6");
        assert_eq!(encode_base64(login::PASSWORD_PROMPT), "UGFzc3dvcmQ6");
        let (mut ex, step) = ServerExchange::start(Mechanism::Login, None).unwrap();
        assert!(matches!(step, Step::Challenge(p) if p == login::USERNAME_PROMPT));
        let step = ex.respond(b"cHJpbnRlcg==").unwrap(); // "printer"
        assert!(matches!(step, Step::Challenge(p) if p == login::PASSWORD_PROMPT));
        let c = done(ex.respond(b"czNjcmV0").unwrap()); // "s3cret"
        assert_eq!(c.username, "printer");
        assert_eq!(c.password.expose(), b"s3cret");
    }

    #[test]
    fn login_with_initial_username() {
        let (mut ex, step) = ServerExchange::start(Mechanism::Login, Some(b"cHJpbnRlcg")).unwrap();
        assert!(matches!(step, Step::Challenge(p) if p == login::PASSWORD_PROMPT));
        assert_eq!(done(ex.respond(b"czNjcmV0").unwrap()).password.expose(), b"s3cret");
    }

    #[test]
    fn cancel_and_garbage() {
        let (mut ex, _) = ServerExchange::start(Mechanism::Plain, None).unwrap();
        assert_eq!(ex.respond(b"*").unwrap_err(), SaslError::Cancelled);
        let (mut ex, _) = ServerExchange::start(Mechanism::Plain, None).unwrap();
        assert_eq!(ex.respond(b"!!!").unwrap_err(), SaslError::BadBase64);
        let err = ServerExchange::start(Mechanism::Plain, Some(b"=")).unwrap_err();
        assert!(matches!(err, SaslError::Malformed(_)));
    }

    #[test]
    fn mechanism_names_are_case_insensitive() {
        assert_eq!(Mechanism::parse(b"plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::parse(b"LoGiN"), Some(Mechanism::Login));
        assert_eq!(Mechanism::parse(b"XOAUTH2"), None);
        assert_eq!(Mechanism::parse(b"CRAM-MD5"), None);
    }
}
