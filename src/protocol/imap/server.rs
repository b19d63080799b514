//! The IMAP dialect of the pre-auth dialogue: tags, literals, CAPABILITY, ID.

use super::client::{self, ImapSuccess};
use super::command::{Command, Received, Receiver};
use super::{postauth_capabilities, preauth_capabilities};
use crate::protocol::line::LineError;
use crate::protocol::preauth::{Dialect, PreAuth, Request, Tagged};
use crate::protocol::reply::{self, Failure};
use crate::protocol::SessionOptions;
use crate::sasl::Credentials;
use bytes::BytesMut;
use std::sync::Arc;

/// The IMAP pre-auth dialogue.
pub type ImapServer = PreAuth<ImapDialect>;

pub struct ImapDialect {
    rx: Receiver,
    upstream_caps: Arc<[String]>,
    max_line: usize,
}

impl ImapDialect {
    fn capabilities(&self, opts: &SessionOptions) -> String {
        preauth_capabilities(&self.upstream_caps, opts)
    }

    /// Answers one command, or hands it to the shared machine.
    fn command(&self, command: Command, opts: &SessionOptions, out: &mut Vec<u8>) -> Tagged {
        let tagged = |out: &mut Vec<u8>, tag: &str, text: &str| {
            out.extend_from_slice(format!("{tag} {text}\r\n").as_bytes());
        };
        let (tag, request) = match command {
            Command::Capability { tag } => {
                out.extend_from_slice(format!("* CAPABILITY {}\r\n", self.capabilities(opts)).as_bytes());
                tagged(out, &tag, "OK CAPABILITY completed");
                (tag, Request::Answered)
            }
            Command::Noop { tag } => {
                tagged(out, &tag, "OK NOOP completed");
                (tag, Request::Answered)
            }
            Command::Id { tag } => {
                out.extend_from_slice(b"* ID (\"name\" \"xoauth2-proxy\")\r\n");
                tagged(out, &tag, "OK ID completed");
                (tag, Request::Answered)
            }
            Command::Logout { tag } => {
                out.extend_from_slice(b"* BYE Logging out\r\n");
                tagged(out, &tag, "OK LOGOUT completed");
                (tag, Request::Close)
            }
            Command::StartTls { tag } => (tag, Request::StartTls),
            Command::NeedsAuth { tag } => (tag, Request::Refused(Failure::AuthFirst)),
            Command::Login { tag, username, password } => (tag, Request::Login(Credentials { username, password })),
            Command::Authenticate { tag, mechanism, initial } => (tag, Request::Authenticate { mechanism, initial }),
        };
        Tagged { tag: Some(tag), request }
    }
}

impl Dialect for ImapDialect {
    type Success = ImapSuccess;
    const CHALLENGE: &'static [u8] = b"+ ";

    fn new(upstream_caps: Arc<[String]>, opts: &SessionOptions) -> Self {
        ImapDialect { rx: Receiver::new(opts.max_line), upstream_caps, max_line: opts.max_line }
    }

    fn greeting(&self, opts: &SessionOptions, out: &mut Vec<u8>) {
        // Exchange's greeting carries no capabilities; many clients skip the
        // CAPABILITY round trip when the greeting has them.
        out.extend_from_slice(
            format!("* OK [CAPABILITY {}] xoauth2-proxy ready\r\n", self.capabilities(opts)).as_bytes(),
        );
    }

    fn next(&mut self, input: &mut BytesMut, opts: &SessionOptions, out: &mut Vec<u8>) -> Option<Tagged> {
        loop {
            return match self.rx.poll(input)? {
                Received::NeedContinuation => {
                    out.extend_from_slice(b"+ Ready for literal data\r\n");
                    continue;
                }
                Received::Rejected { tag, failure, close } => Some(Tagged {
                    tag,
                    request: if close { Request::Fatal(failure) } else { Request::Refused(failure) },
                }),
                Received::Command(command) => Some(self.command(command, opts, out)),
            };
        }
    }

    fn line(&mut self, input: &mut BytesMut) -> Result<Option<BytesMut>, LineError> {
        self.rx.next_line(input)
    }

    fn failure(failure: Failure, tag: Option<&str>, out: &mut Vec<u8>) {
        reply::imap(failure, tag, out);
    }

    fn starttls_go_ahead(tag: Option<&str>, out: &mut Vec<u8>) {
        out.extend_from_slice(format!("{} OK Begin TLS negotiation now\r\n", tag.unwrap_or("*")).as_bytes());
    }

    fn succeeded(&self, success: &ImapSuccess, tag: Option<&str>, out: &mut Vec<u8>) {
        for line in &success.untagged {
            match client::capabilities(line) {
                Some(caps) if line.len() > 2 && line[2..].to_ascii_uppercase().starts_with(b"CAPABILITY") => {
                    out.extend_from_slice(
                        format!("* CAPABILITY {}\r\n", postauth_capabilities(&caps.join(" "))).as_bytes(),
                    );
                }
                _ => {
                    out.extend_from_slice(line);
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        out.extend_from_slice(tag.unwrap_or("*").as_bytes());
        out.extend_from_slice(b" OK ");
        out.extend_from_slice(&rewrite_ok_text(&success.text));
        out.extend_from_slice(b"\r\n");
    }

    fn reset(&mut self, _opts: &SessionOptions) {
        self.rx = Receiver::new(self.max_line);
    }
}

/// `[CAPABILITY ...] text` with the capability list rewritten; any other text as is.
fn rewrite_ok_text(text: &[u8]) -> Vec<u8> {
    let Some(caps) = client::capabilities(text) else {
        return text.to_vec();
    };
    let Some(end) = text.iter().position(|&b| b == b']') else {
        return text.to_vec();
    };
    let mut out = format!("[CAPABILITY {}]", postauth_capabilities(&caps.join(" "))).into_bytes();
    out.extend_from_slice(&text[end + 1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testing::{plain_options, transcripts, Outcome};
    use crate::protocol::Next;

    fn server() -> ImapServer {
        let caps: Vec<String> = "IMAP4rev1 IDLE LITERAL+ AUTH=XOAUTH2".split(' ').map(String::from).collect();
        ImapServer::new(caps.into(), plain_options())
    }

    fn login(user: &str, pass: &str) -> Outcome {
        Outcome::Login { username: user.into(), password: pass.into(), client_name: None }
    }

    /// Each transcript: client bytes, expected output, expected final step.
    #[test]
    fn transcripts_at_every_chunk_size() {
        // The new Outlook sends both LOGIN arguments as {n+} literals in one
        // write; any case; a password with quotes, backslashes, spaces and
        // non-ASCII letters.
        let quirky = "~t \"q\" b\\s  \u{fc}\u{20ac}";
        let literals = format!("a LoGiN {{7+}}\r\nprinter {{17+}}\r\n{quirky}\r\n");
        let cases: Vec<(&[u8], &str, Outcome)> = vec![
            (literals.as_bytes(), "", login("printer", quirky)),
            ("a login printer \"~t \\\"q\\\" b\\\\s  \u{fc}\u{20ac}\"\r\n".as_bytes(), "", login("printer", quirky)),
            (b"a aUtHeNtIcAtE pLaIn AHByaW50ZXIAfnQgInEiIGJccyAgw7zigqw=\r\n", "", login("printer", quirky)),
            (b"a LOGIN printer s3cret\r\n", "", login("printer", "s3cret")),
            (
                b"a LOGIN {7}\r\nprinter {6}\r\ns3cret\r\n",
                "+ Ready for literal data\r\n+ Ready for literal data\r\n",
                login("printer", "s3cret"),
            ),
            (b"a LOGIN {7+}\r\nprinter \"s3\\\"cret\"\r\n", "", login("printer", "s3\"cret")),
            (b"a AUTHENTICATE PLAIN AHByaW50ZXIAczNjcmV0\r\n", "", login("printer", "s3cret")),
            (b"a AUTHENTICATE PLAIN\r\nAHByaW50ZXIAczNjcmV0\r\n", "+ \r\n", login("printer", "s3cret")),
            (
                b"a AUTHENTICATE LOGIN\r\ncHJpbnRlcg==\r\nczNjcmV0\r\n",
                "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n",
                login("printer", "s3cret"),
            ),
            (b"a AUTHENTICATE PLAIN\r\n*\r\n", "+ \r\na BAD Authentication cancelled\r\n", Outcome::Read),
            (
                b"a AUTHENTICATE PLAIN\r\n%%%\r\n",
                "+ \r\na BAD Cannot decode authentication response\r\n",
                Outcome::Read,
            ),
            (
                b"a AUTHENTICATE XOAUTH2 abc\r\n",
                "a NO [CANNOT] Unsupported authentication mechanism\r\n",
                Outcome::Read,
            ),
            // "bob" asking to act as "alice": refused as an authentication, not as syntax.
            (
                b"a AUTHENTICATE PLAIN YWxpY2UAYm9iAHB3\r\n",
                "a NO [AUTHENTICATIONFAILED] Authentication failed\r\n",
                Outcome::Read,
            ),
            (
                b"c CAPABILITY\r\n",
                "* CAPABILITY IMAP4rev1 IDLE LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN\r\nc OK CAPABILITY completed\r\n",
                Outcome::Read,
            ),
            (b"n NOOP\r\n", "n OK NOOP completed\r\n", Outcome::Read),
            (b"i ID (\"name\" \"x\")\r\n", "* ID (\"name\" \"xoauth2-proxy\")\r\ni OK ID completed\r\n", Outcome::Read),
            (b"s SELECT INBOX\r\n", "s BAD Command not allowed before authentication, log in first\r\n", Outcome::Read),
            (b"l LOGOUT\r\n", "* BYE Logging out\r\nl OK LOGOUT completed\r\n", Outcome::Close),
            (b"s STARTTLS\r\n", "s BAD STARTTLS not available\r\n", Outcome::Read),
            (b"garbage\r\n", "garbage BAD Syntax error or unknown command\r\n", Outcome::Read),
        ];
        transcripts(server, &cases);
    }

    #[test]
    fn greeting_carries_rewritten_capabilities() {
        let mut out = Vec::new();
        server().greeting(&mut out);
        assert_eq!(
            out,
            b"* OK [CAPABILITY IMAP4rev1 IDLE LITERAL+ SASL-IR AUTH=PLAIN AUTH=LOGIN] xoauth2-proxy ready\r\n"
        );
    }

    #[test]
    fn pipelined_bytes_after_login_stay_for_the_upstream() {
        let mut m = server();
        let mut buf = BytesMut::from(&b"a LOGIN u p\r\nb SELECT INBOX\r\nc FETCH 1 BODY[]\r\n"[..]);
        let mut out = Vec::new();
        assert!(matches!(m.handle(&mut buf, &mut out), Next::Authenticate(_)));
        assert_eq!(&buf[..], b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n");
        let success = ImapSuccess {
            untagged: vec![b"* CAPABILITY IMAP4rev1 IDLE AUTH=XOAUTH2".to_vec(), b"* OK hello".to_vec()],
            text: b"[CAPABILITY IMAP4rev1 IDLE MOVE AUTH=XOAUTH2] Logged in".to_vec(),
        };
        m.auth_succeeded(&success, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "* CAPABILITY IMAP4rev1 IDLE\r\n* OK hello\r\na OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
        );
    }

    #[test]
    fn failures_answer_the_tag_and_close_after_the_limit() {
        let mut m = server();
        for attempt in 1..=3 {
            let mut buf = BytesMut::from(&b"t1 LOGIN u wrong\r\n"[..]);
            let mut out = Vec::new();
            assert!(matches!(m.handle(&mut buf, &mut out), Next::Authenticate(_)));
            let next = m.auth_failed(Failure::AuthFailed, &mut out);
            let out = String::from_utf8(out).unwrap();
            assert!(out.starts_with("t1 NO [AUTHENTICATIONFAILED]"), "{out}");
            if attempt < 3 {
                assert!(matches!(next, Next::Read));
            } else {
                assert!(matches!(next, Next::Close));
                assert!(out.contains("* BYE Too many authentication failures"));
            }
        }
        let mut m = server();
        let mut buf = BytesMut::from(&b"t2 LOGIN u p\r\n"[..]);
        let mut out = Vec::new();
        m.handle(&mut buf, &mut out);
        assert!(matches!(m.auth_failed(Failure::Temporary, &mut out), Next::Read));
        assert!(matches!(m.handle(&mut BytesMut::from(&b"t3 LOGIN u p\r\n"[..]), &mut out), Next::Authenticate(_)));
        assert!(matches!(m.auth_failed(Failure::Unavailable, &mut out), Next::Close));
        assert!(String::from_utf8(out).unwrap().ends_with("* BYE [UNAVAILABLE] Upstream mail server unavailable\r\n"));
    }

    #[test]
    fn starttls_and_tls_policy() {
        let caps: Vec<String> = vec!["IMAP4rev1".into()];
        let mut opts = plain_options();
        opts.starttls = true;
        opts.require_tls = true;
        let mut m = ImapServer::new(caps.into(), opts);
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&b"a LOGIN u p\r\nb STARTTLS\r\n"[..]);
        assert!(matches!(m.handle(&mut buf, &mut out), Next::StartTls));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "a NO [PRIVACYREQUIRED] Authentication requires TLS, use STARTTLS first\r\nb OK Begin TLS negotiation now\r\n"
        );
        m.tls_started();
        let mut out = Vec::new();
        assert!(matches!(m.handle(&mut BytesMut::from(&b"a LOGIN u p\r\n"[..]), &mut out), Next::Authenticate(_)));

        // Commands pipelined behind STARTTLS would run inside the TLS session
        // if kept: they are refused and the connection closed.
        let mut m = ImapServer::new(vec!["IMAP4rev1".to_string()].into(), {
            let mut o = plain_options();
            o.starttls = true;
            o
        });
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&b"b STARTTLS\r\nc LOGIN evil x\r\n"[..]);
        assert!(matches!(m.handle(&mut buf, &mut out), Next::Close));
        assert!(buf.is_empty());
        assert!(String::from_utf8_lossy(&out).starts_with("* BYE"));
    }
}
