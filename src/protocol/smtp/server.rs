//! The SMTP dialogue with a local client until it has authenticated.

use super::client::SmtpSuccess;
use super::preauth_capabilities;
use crate::protocol::line::{LineError, LineFramer};
use crate::protocol::reply::{self, Failure};
use crate::protocol::{
    sasl_challenge, sasl_failure, split_verb, FailureCount, LoginRequest, Next, PreAuth, SessionOptions,
};
use crate::sasl::{Credentials, Mechanism, ServerExchange, Step};
use bytes::BytesMut;
use std::sync::Arc;

/// The name the proxy gives in its greeting and EHLO reply.
const SERVER_NAME: &str = "xoauth2-proxy";

pub struct SmtpServer {
    framer: LineFramer,
    upstream_caps: Arc<[String]>,
    opts: SessionOptions,
    state: State,
    failures: FailureCount,
    /// The client's EHLO/HELO argument, reused for the upstream EHLO.
    client_name: Option<String>,
}

enum State {
    Commands,
    Sasl { exchange: ServerExchange },
    Authenticating,
    Done,
}

impl SmtpServer {
    /// `upstream_caps` are the upstream's EHLO keywords (after its STARTTLS).
    pub fn new(upstream_caps: Arc<[String]>, opts: SessionOptions) -> Self {
        SmtpServer {
            framer: LineFramer::new(opts.max_line),
            failures: FailureCount::new(opts.max_auth_failures),
            upstream_caps,
            opts,
            state: State::Commands,
            client_name: None,
        }
    }

    fn login(&mut self, credentials: Credentials) -> Next {
        self.state = State::Authenticating;
        Next::Authenticate(LoginRequest { credentials, client_name: self.client_name.clone() })
    }

    fn ehlo_reply(&self, out: &mut Vec<u8>) {
        let caps = preauth_capabilities(&self.upstream_caps, &self.opts);
        let lines = std::iter::once(SERVER_NAME.to_string()).chain(caps);
        let lines: Vec<String> = lines.collect();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
        }
    }

    fn command(&mut self, line: &[u8], input: &mut BytesMut, out: &mut Vec<u8>) -> Option<Next> {
        let (verb, args) = split_verb(line);
        match verb.as_slice() {
            b"EHLO" | b"HELO" => {
                let name = args.split(|&b| b == b' ').next().unwrap_or_default();
                let name = std::str::from_utf8(name).ok().filter(|n| valid_client_name(n));
                let Some(name) = name else {
                    out.extend_from_slice(b"501 5.5.4 Syntax: EHLO hostname\r\n");
                    return None;
                };
                self.client_name = Some(name.to_string());
                if verb == b"EHLO" {
                    self.ehlo_reply(out);
                } else {
                    out.extend_from_slice(format!("250 {SERVER_NAME}\r\n").as_bytes());
                }
            }
            b"AUTH" => {
                if let Some(refusal) = self.opts.auth_refusal() {
                    out.extend_from_slice(reply::smtp(refusal));
                    return None;
                }
                let (mechanism, initial) = match args.iter().position(|&b| b == b' ') {
                    Some(at) => (&args[..at], Some(&args[at + 1..])),
                    None => (args, None),
                };
                let Some(mechanism) = Mechanism::parse(mechanism) else {
                    out.extend_from_slice(reply::smtp(Failure::UnsupportedMechanism));
                    return None;
                };
                match ServerExchange::start(mechanism, initial) {
                    Ok((exchange, Step::Challenge(challenge))) => {
                        sasl_challenge(b"334 ", challenge, out);
                        self.state = State::Sasl { exchange };
                    }
                    Ok((_, Step::Done(credentials))) => return Some(self.login(credentials)),
                    Err(e) => out.extend_from_slice(reply::smtp(sasl_failure(e))),
                }
            }
            b"STARTTLS" => {
                if !self.opts.offer_starttls() {
                    out.extend_from_slice(reply::smtp(Failure::StartTlsUnavailable));
                } else if !input.is_empty() {
                    input.clear();
                    out.extend_from_slice(reply::smtp(Failure::StartTlsInjection));
                    self.state = State::Done;
                    return Some(Next::Close);
                } else {
                    out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                    return Some(Next::StartTls);
                }
            }
            b"NOOP" | b"RSET" => out.extend_from_slice(b"250 2.0.0 OK\r\n"),
            b"HELP" => out.extend_from_slice(b"214 2.0.0 Authenticate with AUTH PLAIN or AUTH LOGIN\r\n"),
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                self.state = State::Done;
                return Some(Next::Close);
            }
            b"MAIL" | b"RCPT" | b"DATA" | b"BDAT" | b"VRFY" | b"EXPN" | b"ETRN" => {
                out.extend_from_slice(reply::smtp(Failure::AuthFirst))
            }
            _ => out.extend_from_slice(reply::smtp(Failure::Syntax)),
        }
        None
    }
}

/// A domain or address literal: printable ASCII, no spaces. The name is
/// passed upstream in our EHLO, so it must not smuggle anything.
fn valid_client_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic())
}

impl PreAuth for SmtpServer {
    type Success = SmtpSuccess;

    fn greeting(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("220 {SERVER_NAME} ESMTP ready\r\n").as_bytes());
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
                    out.extend_from_slice(reply::smtp(Failure::LineTooLong));
                    self.state = State::Commands;
                    continue;
                }
            };
            match &mut self.state {
                State::Sasl { exchange } => match exchange.respond(&line) {
                    Ok(Step::Challenge(challenge)) => sasl_challenge(b"334 ", challenge, out),
                    Ok(Step::Done(credentials)) => return self.login(credentials),
                    Err(e) => {
                        out.extend_from_slice(reply::smtp(sasl_failure(e)));
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
        out.extend_from_slice(reply::smtp(failure));
        if failure.closes_session() {
            self.state = State::Done;
            return Next::Close;
        }
        if failure == Failure::AuthFailed && self.failures.exhausted_after_one_more() {
            out.extend_from_slice(reply::smtp(Failure::TooManyFailures));
            self.state = State::Done;
            return Next::Close;
        }
        Next::Read
    }

    fn auth_succeeded(&mut self, success: &SmtpSuccess, out: &mut Vec<u8>) {
        out.extend_from_slice(&success.reply.to_wire());
        self.state = State::Done;
    }

    fn tls_started(&mut self) {
        // RFC 3207: after the handshake the client starts over with EHLO.
        self.opts.tls_active = true;
        self.state = State::Commands;
        self.client_name = None;
        self.framer = LineFramer::new(self.opts.max_line);
    }

    fn abort(&mut self, failure: Failure, out: &mut Vec<u8>) {
        out.extend_from_slice(reply::smtp(failure));
        self.state = State::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::smtp::Reply;
    use crate::protocol::testing::{drive, plain_options, Outcome};

    fn server() -> SmtpServer {
        let caps: Vec<String> = ["SIZE 1000", "PIPELINING", "AUTH XOAUTH2", "STARTTLS"].map(String::from).to_vec();
        SmtpServer::new(caps.into(), plain_options())
    }

    fn login(user: &str, pass: &str, name: Option<&str>) -> Outcome {
        Outcome::Login { username: user.into(), password: pass.into(), client_name: name.map(String::from) }
    }

    const EHLO: &str = "250-xoauth2-proxy\r\n250-SIZE 1000\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n";

    #[test]
    fn transcripts_at_every_chunk_size() {
        let cases: Vec<(&[u8], String, Outcome)> = vec![
            (
                b"EHLO printer.lan\r\nAUTH PLAIN AHByaW50ZXIAczNjcmV0\r\n",
                EHLO.into(),
                login("printer", "s3cret", Some("printer.lan")),
            ),
            (
                b"ehlo x\r\nauth plain\r\nAHByaW50ZXIAczNjcmV0\r\n",
                format!("{EHLO}334 \r\n"),
                login("printer", "s3cret", Some("x")),
            ),
            (
                b"EHLO x\r\nAUTH LOGIN\r\ncHJpbnRlcg==\r\nczNjcmV0\r\n",
                format!("{EHLO}334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"),
                login("printer", "s3cret", Some("x")),
            ),
            (
                b"AUTH LOGIN cHJpbnRlcg==\r\nczNjcmV0\r\n",
                "334 UGFzc3dvcmQ6\r\n".into(),
                login("printer", "s3cret", None),
            ),
            (b"HELO old\r\n", "250 xoauth2-proxy\r\n".into(), Outcome::Read),
            (b"EHLO\r\n", "501 5.5.4 Syntax: EHLO hostname\r\n".into(), Outcome::Read),
            (b"MAIL FROM:<a@b>\r\n", "530 5.7.0 Authentication required\r\n".into(), Outcome::Read),
            (
                b"RCPT TO:<a@b>\r\nDATA\r\n",
                "530 5.7.0 Authentication required\r\n530 5.7.0 Authentication required\r\n".into(),
                Outcome::Read,
            ),
            (b"AUTH PLAIN\r\n*\r\n", "334 \r\n501 5.0.0 Authentication cancelled\r\n".into(), Outcome::Read),
            (b"AUTH PLAIN !!\r\n", "501 5.5.2 Cannot decode authentication response\r\n".into(), Outcome::Read),
            (b"AUTH CRAM-MD5\r\n", "504 5.5.4 Unrecognized authentication type\r\n".into(), Outcome::Read),
            (b"NOOP\r\nRSET\r\n", "250 2.0.0 OK\r\n250 2.0.0 OK\r\n".into(), Outcome::Read),
            (b"FOO\r\n", "500 5.5.2 Syntax error, command unrecognized\r\n".into(), Outcome::Read),
            (b"QUIT\r\n", "221 2.0.0 Bye\r\n".into(), Outcome::Close),
            (b"STARTTLS\r\n", "454 4.7.0 TLS not available\r\n".into(), Outcome::Read),
        ];
        for (input, expected_out, expected_next) in &cases {
            for chunk in 1..=input.len() {
                let mut m = server();
                let mut buf = BytesMut::new();
                let (out, next) = drive(&mut m, &mut buf, chunk, input);
                assert_eq!(
                    (&out, &next),
                    (expected_out, expected_next),
                    "{:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn success_and_pipelining() {
        let mut m = server();
        let mut buf = BytesMut::from(&b"EHLO x\r\nAUTH PLAIN AHUAcA==\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"[..]);
        let mut out = Vec::new();
        assert!(matches!(m.handle(&mut buf, &mut out), Next::Authenticate(_)));
        assert_eq!(&buf[..], b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        out.clear();
        let reply = Reply { code: 235, lines: vec![b"2.7.0 Authentication successful".to_vec()] };
        m.auth_succeeded(&SmtpSuccess { reply }, &mut out);
        assert_eq!(out, b"235 2.7.0 Authentication successful\r\n");
    }

    #[test]
    fn failure_rows() {
        for (failure, expected, closes) in [
            (Failure::AuthFailed, "535 5.7.8", false),
            (Failure::Temporary, "454 4.7.0", false),
            (Failure::Unavailable, "421 4.4.2", true),
        ] {
            let mut m = server();
            let mut out = Vec::new();
            m.handle(&mut BytesMut::from(&b"AUTH PLAIN AHUAcA==\r\n"[..]), &mut out);
            let next = m.auth_failed(failure, &mut out);
            assert!(String::from_utf8_lossy(&out).starts_with(expected));
            assert_eq!(matches!(next, Next::Close), closes);
        }
    }

    #[test]
    fn starttls_resets_the_dialogue() {
        let mut opts = plain_options();
        opts.starttls = true;
        opts.require_tls = true;
        let mut m = SmtpServer::new(vec!["SIZE 1".to_string()].into(), opts);
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&b"EHLO a\r\nAUTH PLAIN AHUAcA==\r\nSTARTTLS\r\n"[..]);
        assert!(matches!(m.handle(&mut buf, &mut out), Next::StartTls));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "250-xoauth2-proxy\r\n250-SIZE 1\r\n250 STARTTLS\r\n\
             538 5.7.11 Encryption required for requested authentication mechanism\r\n\
             220 2.0.0 Ready to start TLS\r\n"
        );
        m.tls_started();
        out.clear();
        let mut buf = BytesMut::from(&b"EHLO b\r\nAUTH PLAIN AHUAcA==\r\n"[..]);
        assert!(matches!(m.handle(&mut buf, &mut out), Next::Authenticate(r) if r.client_name.as_deref() == Some("b")));
        assert_eq!(String::from_utf8_lossy(&out), "250-xoauth2-proxy\r\n250-SIZE 1\r\n250 AUTH PLAIN LOGIN\r\n");

        let mut opts = plain_options();
        opts.starttls = true;
        let mut m = SmtpServer::new(vec![].into(), opts);
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n"[..]);
        assert!(matches!(m.handle(&mut buf, &mut out), Next::Close));
        assert!(buf.is_empty());
        assert!(String::from_utf8_lossy(&out).starts_with("421 4.7.0"));
    }
}
