//! Connections to the upstream mail server: TCP with timeouts, TLS (implicit
//! or after STARTTLS), and a buffered reader that hands its read-ahead bytes
//! to the splice. The per-protocol dialogues live in the submodules.

pub mod imap;
pub mod pop3;
pub mod smtp;

use crate::config::{ListenerConfig, UpstreamAddr, UpstreamTls};
use crate::secret::Secret;
use bytes::BytesMut;
use rustls_pki_types::ServerName;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub type UpstreamStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Longest upstream line accepted before authentication (capability lists
/// and SASL challenges are far shorter).
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("timed out {phase}")]
    Timeout { phase: &'static str },
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("connection closed by the upstream {phase}")]
    Closed { phase: &'static str },
    #[error("network error {phase}: {source}")]
    Io { phase: &'static str, source: std::io::Error },
    #[error("unexpected answer {phase}: {detail}")]
    Protocol { phase: &'static str, detail: String },
    #[error("upstream refused the connection: {0}")]
    Refused(String),
    #[error("upstream is temporarily refusing connections: {0}")]
    Busy(String),
    #[error("upstream sent data after STARTTLS before the TLS handshake (possible injection)")]
    StartTlsInjection,
    #[error("upstream does not offer STARTTLS")]
    NoStartTls,
}

/// Why an upstream login did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The upstream refused the token.
    #[error("upstream refused the token: {0}")]
    Rejected(String),
    /// The upstream asked us to come back later (throttling, busy).
    #[error("upstream answered with a temporary failure: {0}")]
    Temporary(String),
    #[error(transparent)]
    Unavailable(UpstreamError),
}

impl From<UpstreamError> for LoginError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Busy(reason) => LoginError::Temporary(reason),
            other => LoginError::Unavailable(other),
        }
    }
}

/// A successfully authenticated upstream connection.
pub struct Authenticated<S> {
    pub stream: UpstreamStream,
    /// Bytes the upstream sent after its success reply, owed to the client.
    pub leftover: BytesMut,
    pub success: S,
}

/// Everything needed to open connections to one listener's upstream.
pub struct Upstream {
    pub addr: UpstreamAddr,
    pub tls_mode: UpstreamTls,
    pub timeout: Duration,
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Upstream {
    pub fn new(listener: &ListenerConfig, tls: Arc<rustls::ClientConfig>) -> Result<Self, String> {
        let server_name = ServerName::try_from(listener.upstream.host.clone())
            .map_err(|e| format!("{} is not a valid server name: {e}", listener.upstream.host))?;
        Ok(Upstream {
            addr: listener.upstream.clone(),
            tls_mode: listener.upstream_tls,
            timeout: listener.limits.upstream_timeout,
            connector: TlsConnector::from(tls),
            server_name,
        })
    }

    async fn tcp(&self) -> Result<TcpStream, UpstreamError> {
        let addr = self.addr.to_string();
        let connect = TcpStream::connect((self.addr.host.as_str(), self.addr.port));
        let stream = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| UpstreamError::Timeout { phase: "connecting" })?
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        // Pre-auth dialogues are small request/response exchanges.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<UpstreamStream, UpstreamError> {
        tokio::time::timeout(self.timeout, self.connector.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| UpstreamError::Timeout { phase: "in the TLS handshake" })?
            .map_err(UpstreamError::Tls)
    }

    /// A TLS connection for implicit TLS, or `None` and the plain TCP stream
    /// for STARTTLS, to be upgraded by [`Upstream::starttls`].
    async fn open(&self) -> Result<Opened, UpstreamError> {
        let tcp = self.tcp().await?;
        match self.tls_mode {
            UpstreamTls::Implicit => Ok(Opened::Tls(Box::new(Conn::new(self.handshake(tcp).await?, self.timeout)))),
            UpstreamTls::Starttls => Ok(Opened::Plain(Conn::new(tcp, self.timeout))),
        }
    }

    /// Upgrades after the server accepted STARTTLS. Anything the server sent
    /// after its "go ahead" and before the handshake could be injected by a
    /// man in the middle, so it is an error, never carried into the TLS session.
    async fn starttls(&self, plain: Conn<TcpStream>) -> Result<Conn<UpstreamStream>, UpstreamError> {
        let (tcp, leftover) = plain.into_parts();
        if !leftover.is_empty() {
            return Err(UpstreamError::StartTlsInjection);
        }
        Ok(Conn::new(self.handshake(tcp).await?, self.timeout))
    }
}

enum Opened {
    Tls(Box<Conn<UpstreamStream>>),
    Plain(Conn<TcpStream>),
}

/// A stream plus the bytes read from it but not yet consumed.
pub struct Conn<S> {
    stream: S,
    buf: BytesMut,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        Conn { stream, buf: BytesMut::with_capacity(8192), timeout }
    }

    /// Reads until `parse` produces a value; every read has the timeout.
    async fn read<T, E: Display>(
        &mut self,
        phase: &'static str,
        mut parse: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
    ) -> Result<T, UpstreamError> {
        loop {
            match parse(&mut self.buf) {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => {}
                Err(e) => return Err(UpstreamError::Protocol { phase, detail: e.to_string() }),
            }
            self.buf.reserve(8192);
            let n = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| UpstreamError::Timeout { phase })?
                .map_err(|source| UpstreamError::Io { phase, source })?;
            if n == 0 {
                return Err(UpstreamError::Closed { phase });
            }
        }
    }

    async fn send(&mut self, phase: &'static str, bytes: &[u8]) -> Result<(), UpstreamError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| UpstreamError::Timeout { phase })?
            .map_err(|source| UpstreamError::Io { phase, source })
    }

    /// Sends a line that carries a token; the buffer is wiped afterwards.
    async fn send_secret_line(
        &mut self,
        phase: &'static str,
        prefix: &[u8],
        secret: &Secret<String>,
    ) -> Result<(), UpstreamError> {
        let mut line = Secret::new(Vec::with_capacity(prefix.len() + secret.expose().len() + 2));
        line.expose_mut().extend_from_slice(prefix);
        line.expose_mut().extend_from_slice(secret.expose().as_bytes());
        line.expose_mut().extend_from_slice(b"\r\n");
        self.send(phase, line.expose()).await
    }

    fn into_parts(self) -> (S, BytesMut) {
        (self.stream, self.buf)
    }

    /// Best effort: say goodbye without waiting long for the answer.
    async fn close_politely(mut self, goodbye: &[u8]) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.stream.write_all(goodbye).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}
