//! The POP3 dialogue with the upstream: greeting, STLS if configured, CAPA,
//! and `AUTH XOAUTH2` in the two-step form Exchange documents.

use super::{Authenticated, Conn, LoginError, Opened, Upstream, UpstreamError, UpstreamStream, MAX_LINE};
use crate::protocol::line::LineFramer;
use crate::protocol::pop3::client::{self, Pop3Success, Reply};
use crate::sasl::xoauth2;

async fn reply<S>(
    conn: &mut Conn<S>,
    framer: &mut LineFramer,
    phase: &'static str,
) -> Result<(Reply, Vec<u8>), UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let line = conn.read(phase, |b| framer.next_line(b).map_err(|_| "line too long")).await?;
    let parsed = client::parse_reply(&line)
        .map_err(|e| UpstreamError::Protocol { phase, detail: format!("{e}: {}", xoauth2::printable(&line, 200)) })?;
    Ok((parsed, line.to_vec()))
}

async fn greeting<S>(conn: &mut Conn<S>, framer: &mut LineFramer) -> Result<(), UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match reply(conn, framer, "reading the greeting").await? {
        (Reply::Ok(_), _) => Ok(()),
        (Reply::Err(text), _) if client::is_temporary(&text) => {
            Err(UpstreamError::Busy(xoauth2::printable(&text, 200)))
        }
        (_, line) => Err(UpstreamError::Refused(xoauth2::printable(&line, 200))),
    }
}

async fn connect(upstream: &Upstream) -> Result<(Conn<UpstreamStream>, LineFramer), UpstreamError> {
    let mut framer = LineFramer::new(MAX_LINE);
    match upstream.open().await? {
        Opened::Tls(conn) => {
            let mut conn = *conn;
            greeting(&mut conn, &mut framer).await?;
            Ok((conn, framer))
        }
        Opened::Plain(mut plain) => {
            greeting(&mut plain, &mut framer).await?;
            plain.send("starting TLS", b"STLS\r\n").await?;
            match reply(&mut plain, &mut framer, "starting TLS").await? {
                (Reply::Ok(_), _) => Ok((upstream.starttls(plain).await?, LineFramer::new(MAX_LINE))),
                _ => Err(UpstreamError::NoStartTls),
            }
        }
    }
}

/// The CAPA lines a client should see before login.
pub async fn probe(upstream: &Upstream) -> Result<Vec<String>, UpstreamError> {
    let phase = "asking for capabilities";
    let (mut conn, mut framer) = connect(upstream).await?;
    conn.send(phase, b"CAPA\r\n").await?;
    let mut caps = Vec::new();
    if let (Reply::Ok(_), _) = reply(&mut conn, &mut framer, phase).await? {
        loop {
            let line = conn.read(phase, |b| framer.next_line(b).map_err(|_| "line too long")).await?;
            match client::multiline_item(&line) {
                Some(item) => caps.push(String::from_utf8_lossy(item).trim().to_string()),
                None => break,
            }
            if caps.len() > 256 {
                return Err(UpstreamError::Protocol { phase, detail: "endless CAPA list".into() });
            }
        }
    }
    conn.close_politely(b"QUIT\r\n").await;
    Ok(caps)
}

/// Connects and authenticates as `user` with `token`.
pub async fn login(upstream: &Upstream, user: &str, token: &str) -> Result<Authenticated<Pop3Success>, LoginError> {
    let phase = "authenticating";
    let (mut conn, mut framer) = connect(upstream).await?;
    conn.send(phase, b"AUTH XOAUTH2\r\n").await?;
    match reply(&mut conn, &mut framer, phase).await? {
        (Reply::Continuation(_), _) => {}
        (Reply::Err(text), _) if client::is_temporary(&text) => {
            return Err(LoginError::Temporary(xoauth2::printable(&text, 200)))
        }
        (_, line) => {
            return Err(LoginError::Rejected(format!("AUTH XOAUTH2 refused: {}", xoauth2::printable(&line, 200))))
        }
    }
    conn.send_secret_line(phase, b"", &xoauth2::initial_response(user, token)).await?;
    let mut challenge = None;
    loop {
        match reply(&mut conn, &mut framer, phase).await? {
            (Reply::Ok(_), line) => {
                let (stream, leftover) = conn.into_parts();
                return Ok(Authenticated { stream, leftover, success: Pop3Success { line } });
            }
            (Reply::Continuation(text), _) if challenge.is_none() => {
                let described = xoauth2::describe_error_challenge(&text);
                tracing::debug!(challenge = %described, "upstream sent an XOAUTH2 error challenge");
                challenge = Some(described);
                conn.send(phase, b"\r\n").await?;
            }
            (Reply::Err(text), _) => {
                let mut reason = xoauth2::printable(&text, 200);
                if let Some(c) = challenge {
                    reason = format!("{reason} (challenge {c})");
                }
                return Err(if client::is_temporary(&text) {
                    LoginError::Temporary(reason)
                } else {
                    LoginError::Rejected(reason)
                });
            }
            (Reply::Continuation(_), line) => {
                return Err(UpstreamError::Protocol { phase, detail: xoauth2::printable(&line, 200) }.into());
            }
        }
    }
}
