//! Step 4's I/O: a real XOAUTH2 login to one upstream, one harmless command
//! that needs the mailbox, and a logout.
//!
//! This is the only place that knows the upstream login API: the one driver
//! (`Upstream::login`) running the protocol's dialogue, and its typed
//! refusals (the upstream's reply and the decoded XOAUTH2 error challenge).
//!
//! Why a command after the login: Exchange accepts the token of an app it
//! cannot map to a mailbox and refuses only what follows ("User is
//! authenticated but not connected"), so a login alone proves too little.
//! The commands read nothing and change nothing: IMAP `LIST "" INBOX`, POP3
//! `STAT`, SMTP `MAIL FROM` then `RSET` (no message is sent).

use super::exchange::Answer;
use crate::config::ListenerConfig;
use crate::protocol::client::{Login, Refusal};
use crate::protocol::imap::client::{Response, ResponseReader, Status};
use crate::protocol::line::LineFramer;
use crate::protocol::pop3::client::{parse_reply, Reply};
use crate::protocol::smtp::client::ReplyReader;
use crate::protocol::{Protocol, Spec, WithSpec};
use crate::sasl::xoauth2;
use crate::text::printable;
use crate::token::BoxFuture;
use crate::upstream::{LoginError, Upstream, UpstreamStream};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_LINE: usize = 64 * 1024;

/// Logs in to `listener`'s upstream as `user`, then checks the mailbox
/// answers; `sender` is the envelope sender SMTP tries.
pub async fn login(
    listener: &ListenerConfig,
    tls: Arc<rustls::ClientConfig>,
    user: &str,
    sender: &str,
    token: &str,
) -> Answer {
    let upstream = match Upstream::new(listener, tls) {
        Ok(u) => u,
        Err(e) => return Answer::Unreachable { detail: e.to_string() },
    };
    let timeout = listener.limits.upstream_timeout;
    // No earlier probe: IMAP then sends the response after the server's `+`,
    // a form Exchange accepts whatever its capabilities.
    let login = Login {
        initial_response: xoauth2::initial_response(user, token),
        client_name: None,
        known_caps: Arc::from(Vec::new()),
    };
    let (stream, leftover) = match listener.protocol.with(Run(&upstream, login)).await {
        Ok(parts) => parts,
        Err(e) => return refusal(e),
    };
    let mut session = Session { stream, buf: leftover, timeout };
    let result = match listener.protocol {
        Protocol::Imap => imap_after(&mut session).await,
        Protocol::Pop3 => pop3_after(&mut session).await,
        Protocol::Smtp => smtp_after(&mut session, sender).await,
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), session.stream.shutdown()).await;
    result
}

/// The protocol's dialogue, run by the upstream driver to a login.
struct Run<'a>(&'a Upstream, Login);

impl<'a> WithSpec for Run<'a> {
    type Output = BoxFuture<'a, Result<(UpstreamStream, BytesMut), LoginError>>;

    fn call<P: Spec>(self) -> Self::Output {
        let Run(upstream, login) = self;
        Box::pin(async move { upstream.login::<P::Client>(login).await.map(|a| (a.stream, a.leftover)) })
    }
}

fn refusal(e: LoginError) -> Answer {
    match e {
        LoginError::Rejected(Refusal { reply, challenge }) => Answer::Refused { reply, challenge },
        LoginError::Temporary(Refusal { reply, challenge }) => Answer::Temporary { reply, challenge },
        LoginError::Unavailable(e) => Answer::Unreachable { detail: e.to_string() },
    }
}

/// The authenticated stream and what was read past the login's answer.
struct Session {
    stream: UpstreamStream,
    buf: BytesMut,
    timeout: Duration,
}

impl Session {
    async fn send(&mut self, line: &str) -> Result<(), String> {
        let write = async {
            self.stream.write_all(line.as_bytes()).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| "timed out sending a command after the login".to_string())?
            .map_err(|e| format!("network error after the login: {e}"))
    }

    async fn read<T, E: std::fmt::Display>(
        &mut self,
        mut parse: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
    ) -> Result<T, String> {
        loop {
            match parse(&mut self.buf) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => return Err(format!("unexpected answer after the login: {e}")),
            }
            self.buf.reserve(8192);
            let n = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| "timed out waiting for an answer after the login".to_string())?
                .map_err(|e| format!("network error after the login: {e}"))?;
            if n == 0 {
                return Err("the upstream closed the connection after the login".into());
            }
        }
    }
}

fn unreachable(detail: String) -> Answer {
    Answer::Unreachable { detail }
}

async fn imap_after(s: &mut Session) -> Answer {
    let command = "LIST \"\" INBOX";
    if let Err(e) = s.send(&format!("D1 {command}\r\n")).await {
        return unreachable(e);
    }
    let mut reader = ResponseReader::new(MAX_LINE);
    loop {
        match s.read(|b| reader.next(b)).await {
            Ok(Response::Tagged { tag, status, text }) if tag == b"D1" => {
                let text = printable(&text, 300);
                if status != Status::Ok {
                    let word = if status == Status::No { "NO" } else { "BAD" };
                    return Answer::AfterLogin { command: command.into(), reply: format!("{word} {text}") };
                }
                let _ = s.send("D2 LOGOUT\r\n").await;
                return Answer::Accepted { detail: format!("authenticated; {command}: OK; logged out") };
            }
            Ok(Response::Untagged(line)) if line.to_ascii_uppercase().starts_with(b"* BYE") => {
                return Answer::AfterLogin { command: command.into(), reply: printable(&line, 300) };
            }
            Ok(_) => {}
            Err(e) => return unreachable(e),
        }
    }
}

async fn pop3_after(s: &mut Session) -> Answer {
    if let Err(e) = s.send("STAT\r\n").await {
        return unreachable(e);
    }
    let mut framer = LineFramer::new(MAX_LINE);
    let line = match s.read(|b| framer.next_line(b).map_err(|_| "line too long")).await {
        Ok(line) => line,
        Err(e) => return unreachable(e),
    };
    match parse_reply(&line) {
        Ok(Reply::Ok(text)) => {
            let _ = s.send("QUIT\r\n").await;
            Answer::Accepted { detail: format!("authenticated; STAT: +OK {}; logged out", printable(&text, 100)) }
        }
        _ => Answer::AfterLogin { command: "STAT".into(), reply: printable(&line, 300) },
    }
}

async fn smtp_after(s: &mut Session, sender: &str) -> Answer {
    let command = format!("MAIL FROM:<{sender}>");
    if let Err(e) = s.send(&format!("{command}\r\n")).await {
        return unreachable(e);
    }
    let mut reader = ReplyReader::new(MAX_LINE);
    let reply = match s.read(|b| reader.next(b)).await {
        Ok(r) => r,
        Err(e) => return unreachable(e),
    };
    if reply.code != 250 {
        return Answer::AfterLogin { command, reply: reply.summary() };
    }
    // RSET abandons the transaction: nothing is ever sent.
    let _ = s.send("RSET\r\n").await;
    let _ = s.read(|b| reader.next(b)).await;
    let _ = s.send("QUIT\r\n").await;
    Answer::Accepted { detail: format!("authenticated; {command}: 250, then RSET; logged out") }
}
