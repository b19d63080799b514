//! The POP3 dialect of the pre-auth dialogue: USER/PASS, CAPA, STLS.

use super::client::Pop3Success;
use super::preauth_capabilities;
use crate::protocol::preauth::{auth_arguments, split_verb, LineBased, LineCommands, PreAuth, Request};
use crate::protocol::reply::{self, Failure};
use crate::protocol::SessionOptions;
use crate::sasl::Credentials;
use crate::secret::Secret;
use std::sync::Arc;

/// The POP3 pre-auth dialogue.
pub type Pop3Server = PreAuth<Pop3Dialect>;

/// The POP3 dialect: line framing plus [`Pop3Commands`].
pub type Pop3Dialect = LineBased<Pop3Commands>;

pub struct Pop3Commands {
    upstream_caps: Arc<[String]>,
    /// The name given by USER, waiting for PASS.
    user: Option<String>,
}

impl Pop3Commands {
    fn dispatch(&mut self, line: &[u8], opts: &SessionOptions, out: &mut Vec<u8>) -> Request {
        let (verb, args) = split_verb(line);
        match verb.as_slice() {
            b"CAPA" => {
                out.extend_from_slice(b"+OK Capability list follows\r\n");
                for cap in preauth_capabilities(&self.upstream_caps, opts) {
                    out.extend_from_slice(cap.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b".\r\n");
                Request::Answered
            }
            b"USER" => {
                if let Some(refusal) = opts.auth_refusal() {
                    return Request::Refused(refusal);
                }
                match String::from_utf8(args.to_vec()) {
                    Ok(user) if !user.is_empty() => {
                        self.user = Some(user);
                        out.extend_from_slice(b"+OK Send PASS\r\n");
                        Request::Answered
                    }
                    _ => Request::Refused(Failure::Syntax),
                }
            }
            b"PASS" => {
                if let Some(refusal) = opts.auth_refusal() {
                    return Request::Refused(refusal);
                }
                match (self.user.take(), args.is_empty()) {
                    // The whole rest of the line: passwords may contain spaces.
                    (Some(username), false) => {
                        Request::Login(Credentials { username, password: Secret::new(args.to_vec()) })
                    }
                    _ => {
                        out.extend_from_slice(b"-ERR Send USER first, then PASS with a password\r\n");
                        Request::Answered
                    }
                }
            }
            b"AUTH" if args.is_empty() => {
                out.extend_from_slice(b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n");
                Request::Answered
            }
            b"AUTH" => auth_arguments(args),
            b"STLS" => Request::StartTls,
            b"QUIT" => {
                out.extend_from_slice(b"+OK Bye\r\n");
                Request::Close
            }
            b"APOP" => Request::Refused(Failure::UnsupportedMechanism),
            b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"NOOP" | b"RSET" | b"TOP" | b"UIDL" | b"LAST" => {
                Request::Refused(Failure::AuthFirst)
            }
            _ => Request::Refused(Failure::Syntax),
        }
    }
}

impl LineCommands for Pop3Commands {
    type Success = Pop3Success;
    const CHALLENGE: &'static [u8] = b"+ ";

    fn new(upstream_caps: Arc<[String]>) -> Self {
        Pop3Commands { upstream_caps, user: None }
    }

    fn greeting(&self, _opts: &SessionOptions, out: &mut Vec<u8>) {
        out.extend_from_slice(b"+OK xoauth2-proxy ready\r\n");
    }

    fn command(&mut self, line: &[u8], opts: &SessionOptions, out: &mut Vec<u8>) -> Request {
        self.dispatch(line, opts, out)
    }

    fn failure(failure: Failure, out: &mut Vec<u8>) {
        out.extend_from_slice(reply::pop3(failure));
    }

    fn starttls_go_ahead(out: &mut Vec<u8>) {
        out.extend_from_slice(b"+OK Begin TLS negotiation\r\n");
    }

    fn succeeded(&self, success: &Pop3Success, out: &mut Vec<u8>) {
        out.extend_from_slice(&success.line);
        out.extend_from_slice(b"\r\n");
    }

    fn reset(&mut self) {
        self.user = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::{plain_options, transcripts, Outcome};
    use crate::protocol::Next;
    use bytes::BytesMut;

    fn server() -> Pop3Server {
        let caps: Vec<String> = ["TOP", "UIDL", "SASL XOAUTH2"].map(String::from).to_vec();
        Pop3Server::new(caps.into(), plain_options())
    }

    fn login(user: &str, pass: &str) -> Outcome {
        Outcome::Login { username: user.into(), password: pass.into(), client_name: None }
    }

    #[test]
    fn transcripts_at_every_chunk_size() {
        let quirky = "~t \"q\" b\\s  \u{fc}\u{20ac}";
        let user_pass = format!("uSeR printer\r\npAsS {quirky}\r\n");
        let cases: Vec<(&[u8], &str, Outcome)> = vec![
            (user_pass.as_bytes(), "+OK Send PASS\r\n", login("printer", quirky)),
            (b"AuTh pLaIn AHByaW50ZXIAfnQgInEiIGJccyAgw7zigqw=\r\n", "", login("printer", quirky)),
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
        transcripts(server, &cases);
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
