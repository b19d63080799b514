//! The IMAP dialogue with the upstream: greeting, STARTTLS if configured,
//! CAPABILITY, and `AUTHENTICATE XOAUTH2`.

use super::{Authenticated, Conn, LoginError, Opened, Upstream, UpstreamError, UpstreamStream, MAX_LINE};
use crate::protocol::imap::client::{self, ImapSuccess, Response, ResponseReader, Status};
use crate::sasl::xoauth2;

/// Reads the greeting; returns the capabilities it carries, if any.
async fn greeting<S>(conn: &mut Conn<S>, reader: &mut ResponseReader) -> Result<Option<Vec<String>>, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let phase = "reading the greeting";
    match conn.read(phase, |b| reader.next(b)).await? {
        Response::Untagged(line) if line.to_ascii_uppercase().starts_with(b"* OK") => Ok(client::capabilities(&line)),
        Response::Untagged(line) if line.to_ascii_uppercase().starts_with(b"* BYE") => {
            Err(UpstreamError::Busy(xoauth2::printable(&line, 200)))
        }
        other => Err(UpstreamError::Protocol { phase, detail: format!("{other:?}") }),
    }
}

/// Sends a simple command and waits for its tagged result, collecting untagged lines.
async fn command<S>(
    conn: &mut Conn<S>,
    reader: &mut ResponseReader,
    phase: &'static str,
    tag: &[u8],
    line: &[u8],
) -> Result<(Status, Vec<u8>, Vec<Vec<u8>>), UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.send(phase, line).await?;
    let mut untagged = Vec::new();
    loop {
        match conn.read(phase, |b| reader.next(b)).await? {
            Response::Tagged { tag: t, status, text } if t == tag => return Ok((status, text, untagged)),
            Response::Untagged(line) => untagged.push(line),
            other => return Err(UpstreamError::Protocol { phase, detail: format!("{other:?}") }),
        }
    }
}

/// A secured connection, with the capabilities learned so far (if any).
async fn connect(
    upstream: &Upstream,
) -> Result<(Conn<UpstreamStream>, ResponseReader, Option<Vec<String>>), UpstreamError> {
    let mut reader = ResponseReader::new(MAX_LINE);
    match upstream.open().await? {
        Opened::Tls(conn) => {
            let mut conn = *conn;
            let caps = greeting(&mut conn, &mut reader).await?;
            Ok((conn, reader, caps))
        }
        Opened::Plain(mut plain) => {
            greeting(&mut plain, &mut reader).await?;
            let (status, _, _) = command(&mut plain, &mut reader, "starting TLS", b"S1", b"S1 STARTTLS\r\n").await?;
            if status != Status::Ok {
                return Err(UpstreamError::NoStartTls);
            }
            // Capabilities seen before TLS are not to be trusted after it.
            Ok((upstream.starttls(plain).await?, ResponseReader::new(MAX_LINE), None))
        }
    }
}

async fn capabilities(
    conn: &mut Conn<UpstreamStream>,
    reader: &mut ResponseReader,
) -> Result<Vec<String>, UpstreamError> {
    let phase = "asking for capabilities";
    let (status, text, untagged) = command(conn, reader, phase, b"P1", b"P1 CAPABILITY\r\n").await?;
    if status != Status::Ok {
        return Err(UpstreamError::Protocol { phase, detail: xoauth2::printable(&text, 200) });
    }
    Ok(untagged.iter().filter_map(|l| client::capabilities(l)).next().unwrap_or_default())
}

/// The capabilities a client should see before login.
pub async fn probe(upstream: &Upstream) -> Result<Vec<String>, UpstreamError> {
    let (mut conn, mut reader, caps) = connect(upstream).await?;
    let caps = match caps {
        Some(caps) => caps,
        None => capabilities(&mut conn, &mut reader).await?,
    };
    conn.close_politely(b"P2 LOGOUT\r\n").await;
    Ok(caps)
}

/// Connects and authenticates as `user` with `token`.
pub async fn login(
    upstream: &Upstream,
    known_caps: &[String],
    user: &str,
    token: &str,
) -> Result<Authenticated<ImapSuccess>, LoginError> {
    let phase = "authenticating";
    let (mut conn, mut reader, caps) = connect(upstream).await?;
    let sasl_ir = caps.as_deref().unwrap_or(known_caps).iter().any(|c| c.eq_ignore_ascii_case("SASL-IR"));
    let response = xoauth2::initial_response(user, token);
    if sasl_ir {
        conn.send_secret_line(phase, b"A1 AUTHENTICATE XOAUTH2 ", &response).await?;
    } else {
        conn.send(phase, b"A1 AUTHENTICATE XOAUTH2\r\n").await?;
    }
    let mut response_sent = sasl_ir;
    let mut challenge = None;
    let mut untagged = Vec::new();
    loop {
        match conn.read(phase, |b| reader.next(b)).await? {
            Response::Continuation(_) if !response_sent => {
                conn.send_secret_line(phase, b"", &response).await?;
                response_sent = true;
            }
            Response::Continuation(text) => {
                // The error challenge: answer with an empty line to get the final NO.
                let described = xoauth2::describe_error_challenge(&text);
                tracing::debug!(challenge = %described, "upstream sent an XOAUTH2 error challenge");
                challenge = Some(described);
                conn.send(phase, b"\r\n").await?;
            }
            Response::Untagged(line) => {
                if line.to_ascii_uppercase().starts_with(b"* BYE") {
                    return Err(LoginError::Temporary(xoauth2::printable(&line, 200)));
                }
                untagged.push(line);
            }
            Response::Tagged { tag, status, text } if tag == b"A1" => {
                let reason = match &challenge {
                    Some(c) => format!("{} (challenge {c})", xoauth2::printable(&text, 200)),
                    None => xoauth2::printable(&text, 200),
                };
                return match status {
                    Status::Ok => {
                        let (stream, leftover) = conn.into_parts();
                        Ok(Authenticated { stream, leftover, success: ImapSuccess { untagged, text } })
                    }
                    Status::No if client::is_temporary(&text) => Err(LoginError::Temporary(reason)),
                    Status::No | Status::Bad => Err(LoginError::Rejected(reason)),
                };
            }
            other => return Err(UpstreamError::Protocol { phase, detail: format!("{other:?}") }.into()),
        }
    }
}
