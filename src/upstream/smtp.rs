//! The SMTP dialogue with the upstream: greeting, EHLO, STARTTLS, EHLO again,
//! and `AUTH XOAUTH2` in the two-step form Exchange documents.

use super::{Authenticated, Conn, LoginError, Opened, Upstream, UpstreamError, UpstreamStream, MAX_LINE};
use crate::protocol::smtp::client::{Reply, ReplyReader, SmtpSuccess};
use crate::sasl::xoauth2;

/// EHLO name when the client gave none.
const DEFAULT_EHLO: &str = "xoauth2-proxy";

async fn reply<S>(conn: &mut Conn<S>, reader: &mut ReplyReader, phase: &'static str) -> Result<Reply, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.read(phase, |b| reader.next(b)).await
}

async fn ehlo<S>(conn: &mut Conn<S>, reader: &mut ReplyReader, name: &str) -> Result<Vec<String>, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let phase = "sending EHLO";
    conn.send(phase, format!("EHLO {name}\r\n").as_bytes()).await?;
    let r = reply(conn, reader, phase).await?;
    if r.code != 250 {
        return Err(UpstreamError::Protocol { phase, detail: r.summary() });
    }
    Ok(r.ehlo_keywords())
}

async fn greeting<S>(conn: &mut Conn<S>, reader: &mut ReplyReader) -> Result<(), UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let r = reply(conn, reader, "reading the greeting").await?;
    match r.code {
        220 => Ok(()),
        400..=499 => Err(UpstreamError::Busy(r.summary())),
        _ => Err(UpstreamError::Refused(r.summary())),
    }
}

/// A secured connection after its final EHLO, with the EHLO keywords.
async fn connect(
    upstream: &Upstream,
    name: &str,
) -> Result<(Conn<UpstreamStream>, ReplyReader, Vec<String>), UpstreamError> {
    let mut reader = ReplyReader::new(MAX_LINE);
    let mut conn = match upstream.open().await? {
        Opened::Tls(conn) => {
            let mut conn = *conn;
            greeting(&mut conn, &mut reader).await?;
            conn
        }
        Opened::Plain(mut plain) => {
            greeting(&mut plain, &mut reader).await?;
            let caps = ehlo(&mut plain, &mut reader, name).await?;
            if !caps.iter().any(|c| c.eq_ignore_ascii_case("STARTTLS")) {
                return Err(UpstreamError::NoStartTls);
            }
            plain.send("starting TLS", b"STARTTLS\r\n").await?;
            let r = reply(&mut plain, &mut reader, "starting TLS").await?;
            if r.code != 220 {
                return Err(UpstreamError::Protocol { phase: "starting TLS", detail: r.summary() });
            }
            reader = ReplyReader::new(MAX_LINE);
            upstream.starttls(plain).await?
        }
    };
    let caps = ehlo(&mut conn, &mut reader, name).await?;
    Ok((conn, reader, caps))
}

/// The EHLO keywords a client should see before AUTH.
pub async fn probe(upstream: &Upstream) -> Result<Vec<String>, UpstreamError> {
    let (conn, _, caps) = connect(upstream, DEFAULT_EHLO).await?;
    conn.close_politely(b"QUIT\r\n").await;
    Ok(caps)
}

/// Connects and authenticates as `user` with `token`, greeting the upstream
/// with the client's own EHLO name when it gave one.
pub async fn login(
    upstream: &Upstream,
    client_name: Option<&str>,
    user: &str,
    token: &str,
) -> Result<Authenticated<SmtpSuccess>, LoginError> {
    let phase = "authenticating";
    let (mut conn, mut reader, _) = connect(upstream, client_name.unwrap_or(DEFAULT_EHLO)).await?;
    conn.send(phase, b"AUTH XOAUTH2\r\n").await?;
    let r = reply(&mut conn, &mut reader, phase).await?;
    match r.code {
        334 => {}
        400..=499 => return Err(LoginError::Temporary(r.summary())),
        _ => return Err(LoginError::Rejected(format!("AUTH XOAUTH2 refused: {}", r.summary()))),
    }
    conn.send_secret_line(phase, b"", &xoauth2::initial_response(user, token)).await?;
    let mut r = reply(&mut conn, &mut reader, phase).await?;
    let mut challenge = None;
    if r.code == 334 {
        // The error challenge: answer with an empty line to get the final reply.
        let described = xoauth2::describe_error_challenge(r.lines.first().map_or(&[][..], Vec::as_slice));
        tracing::debug!(challenge = %described, "upstream sent an XOAUTH2 error challenge");
        challenge = Some(described);
        conn.send(phase, b"\r\n").await?;
        r = reply(&mut conn, &mut reader, phase).await?;
    }
    let reason = || match &challenge {
        Some(c) => format!("{} (challenge {c})", r.summary()),
        None => r.summary(),
    };
    match r.code {
        235 => {
            let (stream, leftover) = conn.into_parts();
            Ok(Authenticated { stream, leftover, success: SmtpSuccess { reply: r } })
        }
        400..=499 => Err(LoginError::Temporary(reason())),
        _ => Err(LoginError::Rejected(reason())),
    }
}
