//! The SMTP dialect of the pre-auth dialogue: EHLO/HELO and the EHLO rewrite.

use super::client::SmtpSuccess;
use super::preauth_capabilities;
use crate::protocol::preauth::{auth_arguments, split_verb, LineBased, LineCommands, PreAuth, Request};
use crate::protocol::reply::{self, Failure};
use crate::protocol::SessionOptions;
use std::sync::Arc;

/// The name the proxy gives in its greeting and EHLO reply.
const SERVER_NAME: &str = "xoauth2-proxy";

/// The SMTP pre-auth dialogue.
pub type SmtpServer = PreAuth<SmtpDialect>;

/// The SMTP dialect: line framing plus [`SmtpCommands`].
pub type SmtpDialect = LineBased<SmtpCommands>;

pub struct SmtpCommands {
    upstream_caps: Arc<[String]>,
    /// The client's EHLO/HELO argument, reused for the upstream EHLO.
    client_name: Option<String>,
}

impl SmtpCommands {
    fn ehlo_reply(&self, opts: &SessionOptions, out: &mut Vec<u8>) {
        let caps = preauth_capabilities(&self.upstream_caps, opts);
        let lines = std::iter::once(SERVER_NAME.to_string()).chain(caps);
        let lines: Vec<String> = lines.collect();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
        }
    }

    fn dispatch(&mut self, line: &[u8], opts: &SessionOptions, out: &mut Vec<u8>) -> Request {
        let (verb, args) = split_verb(line);
        match verb.as_slice() {
            b"EHLO" | b"HELO" => {
                let name = args.split(|&b| b == b' ').next().unwrap_or_default();
                let name = std::str::from_utf8(name).ok().filter(|n| valid_client_name(n));
                let Some(name) = name else {
                    out.extend_from_slice(b"501 5.5.4 Syntax: EHLO hostname\r\n");
                    return Request::Answered;
                };
                self.client_name = Some(name.to_string());
                if verb == b"EHLO" {
                    self.ehlo_reply(opts, out);
                } else {
                    out.extend_from_slice(format!("250 {SERVER_NAME}\r\n").as_bytes());
                }
                Request::Answered
            }
            b"AUTH" => auth_arguments(args),
            b"STARTTLS" => Request::StartTls,
            b"NOOP" | b"RSET" => {
                out.extend_from_slice(b"250 2.0.0 OK\r\n");
                Request::Answered
            }
            b"HELP" => {
                out.extend_from_slice(b"214 2.0.0 Authenticate with AUTH PLAIN or AUTH LOGIN\r\n");
                Request::Answered
            }
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                Request::Close
            }
            b"MAIL" | b"RCPT" | b"DATA" | b"BDAT" | b"VRFY" | b"EXPN" | b"ETRN" => Request::Refused(Failure::AuthFirst),
            _ => Request::Refused(Failure::Syntax),
        }
    }
}

/// A domain or address literal: printable ASCII, no spaces. The name is
/// passed upstream in our EHLO, so it must not smuggle anything.
fn valid_client_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic())
}

impl LineCommands for SmtpCommands {
    type Success = SmtpSuccess;
    const CHALLENGE: &'static [u8] = b"334 ";

    fn new(upstream_caps: Arc<[String]>) -> Self {
        SmtpCommands { upstream_caps, client_name: None }
    }

    fn greeting(&self, _opts: &SessionOptions, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("220 {SERVER_NAME} ESMTP ready\r\n").as_bytes());
    }

    fn command(&mut self, line: &[u8], opts: &SessionOptions, out: &mut Vec<u8>) -> Request {
        self.dispatch(line, opts, out)
    }

    fn failure(failure: Failure, out: &mut Vec<u8>) {
        out.extend_from_slice(reply::smtp(failure));
    }

    fn starttls_go_ahead(out: &mut Vec<u8>) {
        out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
    }

    fn succeeded(&self, success: &SmtpSuccess, out: &mut Vec<u8>) {
        out.extend_from_slice(&success.reply.to_wire());
    }

    fn client_name(&self) -> Option<String> {
        self.client_name.clone()
    }

    fn reset(&mut self) {
        // RFC 3207: after the handshake the client starts over with EHLO.
        self.client_name = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::smtp::Reply;
    use crate::protocol::testing::{plain_options, transcripts, Outcome};
    use crate::protocol::Next;
    use bytes::BytesMut;

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
        // Printers and copiers: HELO, not EHLO; any case; a password with
        // quotes, backslashes, spaces and non-ASCII letters.
        let quirky = "~t \"q\" b\\s  \u{fc}\u{20ac}";
        let cases: Vec<(&[u8], String, Outcome)> = vec![
            (
                b"HELO printer\r\nAUTH LOGIN\r\ncHJpbnRlcg==\r\nfnQgInEiIGJccyAgw7zigqw=\r\n",
                "250 xoauth2-proxy\r\n334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n".into(),
                login("printer", quirky, Some("printer")),
            ),
            (
                b"helo x\r\nAuth Plain AHByaW50ZXIAfnQgInEiIGJccyAgw7zigqw=\r\n",
                "250 xoauth2-proxy\r\n".into(),
                login("printer", quirky, Some("x")),
            ),
            (
                b"eHlO x\r\naUtH lOgIn cHJpbnRlcg==\r\nfnQgInEiIGJccyAgw7zigqw=\r\n",
                format!("{EHLO}334 UGFzc3dvcmQ6\r\n"),
                login("printer", quirky, Some("x")),
            ),
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
        transcripts(server, &cases);
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
