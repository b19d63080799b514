//! The POP3 dialogue with a local client until it has logged in.

use super::client::Pop3Success;
use super::preauth_capabilities;
use crate::protocol::line::{LineError, LineFramer};
use crate::protocol::reply::{self, Failure};
use crate::protocol::{
    sasl_challenge, sasl_failure, split_verb, FailureCount, LoginRequest, Next, PreAuth, SessionOptions,
};
use crate::sasl::{Credentials, Mechanism, ServerExchange, Step};
use crate::secret::Secret;
use bytes::BytesMut;
use std::sync::Arc;

pub struct Pop3Server {
    framer: LineFramer,
    upstream_caps: Arc<[String]>,
    opts: SessionOptions,
    state: State,
    failures: FailureCount,
    /// The name given by USER, waiting for PASS.
    user: Option<String>,
}

enum State {
    Commands,
    Sasl { exchange: ServerExchange },
    Authenticating,
    Done,
}

impl Pop3Server {
    pub fn new(upstream_caps: Arc<[String]>, opts: SessionOptions) -> Self {
        Pop3Server {
            framer: LineFramer::new(opts.max_line),
            failures: FailureCount::new(opts.max_auth_failures),
            upstream_caps,
            opts,
            state: State::Commands,
            user: None,
        }
    }

    fn login(&mut self, credentials: Credentials) -> Next {
        self.state = State::Authenticating;
        Next::Authenticate(LoginRequest { credentials, client_name: None })
    }

    fn command(&mut self, line: &[u8], input: &mut BytesMut, out: &mut Vec<u8>) -> Option<Next> {
        let (verb, args) = split_verb(line);
        match verb.as_slice() {
            b"CAPA" => {
                out.extend_from_slice(b"+OK Capability list follows\r\n");
                for cap in preauth_capabilities(&self.upstream_caps, &self.opts) {
                    out.extend_from_slice(cap.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b".\r\n");
            }
            b"USER" => {
                if let Some(refusal) = self.opts.auth_refusal() {
                    out.extend_from_slice(reply::pop3(refusal));
                } else if args.is_empty() {
                    out.extend_from_slice(reply::pop3(Failure::Syntax));
                } else {
                    match String::from_utf8(args.to_vec()) {
                        Ok(user) => {
                            self.user = Some(user);
                            out.extend_from_slice(b"+OK Send PASS\r\n");
                        }
                        Err(_) => out.extend_from_slice(reply::pop3(Failure::Syntax)),
                    }
                }
            }
            b"PASS" => {
                if let Some(refusal) = self.opts.auth_refusal() {
                    out.extend_from_slice(reply::pop3(refusal));
                } else {
                    match (self.user.take(), args.is_empty()) {
                        (Some(username), false) => {
                            // The whole rest of the line: passwords may contain spaces.
                            let password = Secret::new(args.to_vec());
                            return Some(self.login(Credentials { username, password }));
                        }
                        _ => out.extend_from_slice(b"-ERR Send USER first, then PASS with a password\r\n"),
                    }
                }
            }
            b"AUTH" if args.is_empty() => out.extend_from_slice(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
            b"AUTH" => {
                if let Some(refusal) = self.opts.auth_refusal() {
                    out.extend_from_slice(reply::pop3(refusal));
                    return None;
                }
                let (mechanism, initial) = match args.iter().position(|&b| b == b' ') {
                    Some(at) => (&args[..at], Some(&args[at + 1..])),
                    None => (args, None),
                };
                let Some(mechanism) = Mechanism::parse(mechanism) else {
                    out.extend_from_slice(reply::pop3(Failure::UnsupportedMechanism));
                    return None;
                };
                match ServerExchange::start(mechanism, initial) {
                    Ok((exchange, Step::Challenge(challenge))) => {
                        sasl_challenge(b"+ ", challenge, out);
                        self.state = State::Sasl { exchange };
                    }
                    Ok((_, Step::Done(credentials))) => return Some(self.login(credentials)),
                    Err(e) => out.extend_from_slice(reply::pop3(sasl_failure(e))),
                }
            }
            b"STLS" => {
                if !self.opts.offer_starttls() {
                    out.extend_from_slice(reply::pop3(Failure::StartTlsUnavailable));
                } else if !input.is_empty() {
                    input.clear();
                    out.extend_from_slice(reply::pop3(Failure::StartTlsInjection));
                    self.state = State::Done;
                    return Some(Next::Close);
                } else {
                    out.extend_from_slice(b"+OK Begin TLS negotiation\r\n");
                    return Some(Next::StartTls);
                }
            }
            b"QUIT" => {
                out.extend_from_slice(b"+OK Bye\r\n");
                self.state = State::Done;
                return Some(Next::Close);
            }
            b"APOP" => out.extend_from_slice(reply::pop3(Failure::UnsupportedMechanism)),
            b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"NOOP" | b"RSET" | b"TOP" | b"UIDL" | b"LAST" => {
                out.extend_from_slice(reply::pop3(Failure::AuthFirst))
            }
            _ => out.extend_from_slice(reply::pop3(Failure::Syntax)),
        }
        None
    }
}

impl PreAuth for Pop3Server {
    type Success = Pop3Success;

    fn greeting(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"+OK xoauth2-proxy ready\r\n");
    }

    fn handle(&mut self, input: &mut BytesMut, out: &mut Vec<u8>) -> Next {
        loop {
            if matches!(self.state, State::Authenticating | State::Done) {
                return Next::Read;
            }
            let line = match self.framer.next_line(input) {
                Ok(Some(line)) => line,
                Ok(None) => return Next::Read,
                Err(LineError::TooLong) => {
                    out.extend_from_slice(reply::pop3(Failure::LineTooLong));
                    self.state = State::Commands;
                    continue;
                }
            };
            match &mut self.state {
                State::Sasl { exchange } => match exchange.respond(&line) {
                    Ok(Step::Challenge(challenge)) => sasl_challenge(b"+ ", challenge, out),
                    Ok(Step::Done(credentials)) => return self.login(credentials),
                    Err(e) => {
                        out.extend_from_slice(reply::pop3(sasl_failure(e)));
                        self.state = State::Commands;
                    }
                },
                _ => {
                    if let Some(next) = self.command(&line, input, out) {
                        return next;
                    }
                }
            }
        }
    }

    fn auth_failed(&mut self, failure: Failure, out: &mut Vec<u8>) -> Next {
        self.state = State::Commands;
        out.extend_from_slice(reply::pop3(failure));
        if failure.closes_session() {
            self.state = State::Done;
            return Next::Close;
        }
        if failure == Failure::AuthFailed && self.failures.exhausted_after_one_more() {
            out.extend_from_slice(reply::pop3(Failure::TooManyFailures));
            self.state = State::Done;
            return Next::Close;
        }
        Next::Read
    }

    fn auth_succeeded(&mut self, success: &Pop3Success, out: &mut Vec<u8>) {
        out.extend_from_slice(&success.line);
        out.extend_from_slice(b"\r\n");
        self.state = State::Done;
    }

    fn tls_started(&mut self) {
        self.opts.tls_active = true;
        self.state = State::Commands;
        self.user = None;
        self.framer = LineFramer::new(self.opts.max_line);
    }

    fn abort(&mut self, failure: Failure, out: &mut Vec<u8>) {
        out.extend_from_slice(reply::pop3(failure));
        self.state = State::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::{drive, plain_options, Outcome};

    fn server() -> Pop3Server {
        let caps: Vec<String> = ["TOP", "UIDL", "SASL XOAUTH2"].map(String::from).to_vec();
        Pop3Server::new(caps.into(), plain_options())
    }

    fn login(user: &str, pass: &str) -> Outcome {
        Outcome::Login { username: user.into(), password: pass.into(), client_name: None }
    }

    #[test]
    fn transcripts_at_every_chunk_size() {
        let cases: Vec<(&[u8], &str, Outcome)> = vec![
            (b"USER printer\r\nPASS s3 cret\r\n", "+OK Send PASS\r\n", login("printer", "s3 cret")),
            (b"user printer\npass pw\n", "+OK Send PASS\r\n", login("printer", "pw")),
            (b"PASS pw\r\n", "-ERR Send USER first, then PASS with a password\r\n", Outcome::Read),
            (b"AUTH PLAIN AHByaW50ZXIAczNjcmV0\r\n", "", login("printer", "s3cret")),
            (b"AUTH PLAIN\r\nAHByaW50ZXIAczNjcmV0\r\n", "+ \r\n", login("printer", "s3cret")),
            (
                b"AUTH LOGIN\r\ncHJpbnRlcg==\r\nczNjcmV0\r\n",
                "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n",
                login("printer", "s3cret"),
            ),
            (b"AUTH LOGIN cHJpbnRlcg==\r\nczNjcmV0\r\n", "+ UGFzc3dvcmQ6\r\n", login("printer", "s3cret")),
            (b"AUTH PLAIN\r\n*\r\n", "+ \r\n-ERR Authentication cancelled\r\n", Outcome::Read),
            (b"AUTH CRAM-MD5\r\n", "-ERR Unsupported authentication mechanism\r\n", Outcome::Read),
            (b"AUTH\r\n", "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n", Outcome::Read),
            (
                b"CAPA\r\n",
                "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n",
                Outcome::Read,
            ),
            (b"STAT\r\n", "-ERR Authenticate first\r\n", Outcome::Read),
            (b"RETR 1\r\n", "-ERR Authenticate first\r\n", Outcome::Read),
            (b"FROB\r\n", "-ERR Unknown command\r\n", Outcome::Read),
            (b"QUIT\r\n", "+OK Bye\r\n", Outcome::Close),
            (b"STLS\r\n", "-ERR STLS not available\r\n", Outcome::Read),
        ];
        for (input, expected_out, expected_next) in &cases {
            for chunk in 1..=input.len() {
                let mut m = server();
                let mut buf = BytesMut::new();
                let (out, next) = drive(&mut m, &mut buf, chunk, input);
                assert_eq!(
                    (&out[..], &next),
                    (*expected_out, expected_next),
                    "{:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn long_line_is_drained_then_answered() {
        let mut m = Pop3Server::new(Vec::<String>::new().into(), SessionOptions { max_line: 16, ..plain_options() });
        let mut buf = BytesMut::from(&b"USER aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\nSTAT\r\n"[..]);
        let mut out = Vec::new();
        assert!(matches!(m.handle(&mut buf, &mut out), Next::Read));
        assert_eq!(String::from_utf8(out).unwrap(), "-ERR Line too long\r\n-ERR Authenticate first\r\n");
    }

    #[test]
    fn success_forwards_the_upstream_line_and_keeps_pipelined_bytes() {
        let mut m = server();
        let mut buf = BytesMut::from(&b"USER u\r\nPASS p\r\nSTAT\r\nLIST\r\n"[..]);
        let mut out = Vec::new();
        assert!(matches!(m.handle(&mut buf, &mut out), Next::Authenticate(_)));
        assert_eq!(&buf[..], b"STAT\r\nLIST\r\n");
        m.auth_succeeded(&Pop3Success { line: b"+OK Logged in.".to_vec() }, &mut out);
        assert!(out.ends_with(b"+OK Logged in.\r\n"));
    }
}
