//! Connections to the upstream mail server: TCP with timeouts, TLS (implicit
//! or after STARTTLS), and the one driver that runs a protocol's
//! [`Dialogue`] over them and hands the authenticated stream, with any bytes
//! read past the final reply, to the splice.

use crate::config::{ListenerConfig, UpstreamAddr, UpstreamTls};
use crate::protocol::client::{Action, ClientError, Goal, Login, Outcome, Refusal};
use crate::protocol::Dialogue;
use bytes::BytesMut;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

mod readahead;

pub use readahead::ReadAhead;

/// The upstream's TLS session over a socket read in large chunks.
pub type UpstreamStream = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("timed out {phase}")]
    Timeout { phase: &'static str },
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("connection closed by the upstream {phase}")]
    Closed { phase: &'static str },
    #[error("network error {phase}: {source}")]
    Io { phase: &'static str, source: std::io::Error },
    #[error("upstream sent data after STARTTLS before the TLS handshake (possible injection)")]
    StartTlsInjection,
    #[error(transparent)]
    Dialogue(#[from] ClientError),
}

impl UpstreamError {
    /// The proxy itself is out of descriptors or memory: the upstream is
    /// not to blame, and the admin must raise a limit.
    pub fn is_local_exhaustion(&self) -> bool {
        match self {
            UpstreamError::Connect { source, .. } | UpstreamError::Io { source, .. } => is_exhaustion(source),
            UpstreamError::Tls(source) => is_exhaustion(source),
            _ => false,
        }
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Why an upstream login did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The upstream refused the token.
    #[error("upstream refused the token: {0}")]
    Rejected(Refusal),
    /// The upstream asked us to come back later (throttling, busy).
    #[error("upstream answered with a temporary failure: {0}")]
    Temporary(Refusal),
    #[error(transparent)]
    Unavailable(UpstreamError),
}

impl From<UpstreamError> for LoginError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Dialogue(ClientError::Rejected(r)) => LoginError::Rejected(r),
            UpstreamError::Dialogue(ClientError::Temporary(r)) => LoginError::Temporary(r),
            UpstreamError::Dialogue(ClientError::Busy(reply)) => LoginError::Temporary(Refusal::new(reply)),
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

#[derive(Debug, thiserror::Error)]
#[error("{host} is not a valid TLS server name: {source}")]
pub struct BadServerName {
    host: String,
    source: rustls_pki_types::InvalidDnsNameError,
}

impl Upstream {
    pub fn new(listener: &ListenerConfig, tls: Arc<rustls::ClientConfig>) -> Result<Self, BadServerName> {
        let host = listener.upstream.host.clone();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|source| BadServerName { host: host.clone(), source })?;
        Ok(Upstream {
            addr: listener.upstream.clone(),
            tls_mode: listener.upstream_tls,
            timeout: listener.limits.upstream_timeout,
            connector: TlsConnector::from(tls),
            server_name,
        })
    }

    /// The capabilities a client should see before login.
    pub async fn probe<D: Dialogue>(&self) -> Result<Vec<String>, UpstreamError> {
        let (outcome, stream, _) = self.converse(D::new(self.starttls(), Goal::Probe)).await?;
        close_politely(stream, D::GOODBYE).await;
        match outcome {
            Outcome::Capabilities(caps) => Ok(caps),
            Outcome::LoggedIn(_) => Err(ClientError::Protocol {
                phase: "asking for capabilities",
                detail: "the dialogue logged in instead".into(),
            }
            .into()),
        }
    }

    /// Connects and authenticates with XOAUTH2.
    pub async fn login<D: Dialogue>(&self, login: Login) -> Result<Authenticated<D::Success>, LoginError> {
        let (outcome, stream, leftover) = self.converse(D::new(self.starttls(), Goal::Login(login))).await?;
        match outcome {
            Outcome::LoggedIn(success) => Ok(Authenticated { stream, leftover, success }),
            Outcome::Capabilities(_) => Err(LoginError::Unavailable(
                ClientError::Protocol { phase: "authenticating", detail: "the dialogue did not log in".into() }.into(),
            )),
        }
    }

    fn starttls(&self) -> bool {
        self.tls_mode == UpstreamTls::Starttls
    }

    /// Runs `dialogue` over a new connection until it is done. The result is
    /// always a TLS stream: a dialogue that finished in the clear is an error.
    async fn converse<D: Dialogue>(
        &self,
        mut dialogue: D,
    ) -> Result<(Outcome<D::Success>, UpstreamStream, BytesMut), UpstreamError> {
        let tcp = self.tcp().await?;
        let mut link = match self.tls_mode {
            UpstreamTls::Implicit => Link::Tls(Box::new(self.handshake(tcp).await?)),
            UpstreamTls::Starttls => Link::Plain(tcp),
        };
        let mut buf = BytesMut::with_capacity(8192);
        loop {
            let phase = dialogue.phase();
            match dialogue.step(&mut buf)? {
                Action::Send(bytes) => link.send(phase, &bytes, self.timeout).await?,
                Action::SendSecret(line) => link.send(phase, line.expose(), self.timeout).await?,
                Action::Read => link.read(phase, &mut buf, self.timeout).await?,
                Action::StartTls => {
                    // Anything the server sent after its "go ahead" and before
                    // the handshake could come from a man in the middle.
                    if !buf.is_empty() {
                        return Err(UpstreamError::StartTlsInjection);
                    }
                    let Link::Plain(tcp) = link else {
                        return Err(ClientError::Protocol { phase, detail: "STARTTLS inside TLS".into() }.into());
                    };
                    link = Link::Tls(Box::new(self.handshake(tcp).await?));
                    dialogue.tls_started();
                }
                Action::Done(outcome) => {
                    let Link::Tls(stream) = link else {
                        return Err(
                            ClientError::Protocol { phase, detail: "the dialogue ended without TLS".into() }.into()
                        );
                    };
                    return Ok((outcome, *stream, buf));
                }
            }
        }
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
        tokio::time::timeout(self.timeout, self.connector.connect(self.server_name.clone(), ReadAhead::new(tcp)))
            .await
            .map_err(|_| UpstreamError::Timeout { phase: "in the TLS handshake" })?
            .map_err(UpstreamError::Tls)
    }
}

/// The connection while the dialogue runs: in the clear until STARTTLS.
enum Link {
    Plain(TcpStream),
    Tls(Box<UpstreamStream>),
}

impl Link {
    async fn send(&mut self, phase: &'static str, bytes: &[u8], timeout: Duration) -> Result<(), UpstreamError> {
        match self {
            Link::Plain(s) => send(s, phase, bytes, timeout).await,
            Link::Tls(s) => send(s.as_mut(), phase, bytes, timeout).await,
        }
    }

    async fn read(&mut self, phase: &'static str, buf: &mut BytesMut, timeout: Duration) -> Result<(), UpstreamError> {
        match self {
            Link::Plain(s) => read(s, phase, buf, timeout).await,
            Link::Tls(s) => read(s.as_mut(), phase, buf, timeout).await,
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    phase: &'static str,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), UpstreamError> {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    tokio::time::timeout(timeout, write)
        .await
        .map_err(|_| UpstreamError::Timeout { phase })?
        .map_err(|source| UpstreamError::Io { phase, source })
}

async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    phase: &'static str,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<(), UpstreamError> {
    buf.reserve(8192);
    let n = tokio::time::timeout(timeout, stream.read_buf(buf))
        .await
        .map_err(|_| UpstreamError::Timeout { phase })?
        .map_err(|source| UpstreamError::Io { phase, source })?;
    if n == 0 {
        return Err(UpstreamError::Closed { phase });
    }
    Ok(())
}

/// Best effort: say goodbye without waiting long for the answer.
async fn close_politely(mut stream: UpstreamStream, goodbye: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(goodbye).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
