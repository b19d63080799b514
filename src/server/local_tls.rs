//! Local TLS, the server side: each listener's certificate and profile
//! (rustls, or OpenSSL for `local_tls_profile: legacy`), replaceable on
//! reload, and the handshake that turns a plain [`ClientStream`] into a TLS
//! one. A session calls [`LocalTls::accept`] for implicit TLS and STARTTLS
//! alike and never learns which library answered.

use super::stream::ClientStream;
use crate::config::{Config, ListenerConfig, LocalTls as LocalTlsMode, LocalTlsProfile};
use crate::tls::{ServerTls, TlsError};
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// One listener's local TLS.
pub struct LocalTls {
    /// Implicit, STARTTLS or auto (never none: then there is no `LocalTls`).
    pub(super) mode: LocalTlsMode,
    acceptor: Arc<RwLock<ServerTls>>,
}

impl LocalTls {
    /// The handshake on a plain stream, bounded by `timeout` (the session's
    /// pre-auth patience), with the certificate current at this moment.
    pub(super) async fn accept(&self, stream: ClientStream, timeout: Duration) -> io::Result<ClientStream> {
        let ClientStream::Plain(tcp) = stream else {
            return Err(io::Error::other("TLS is already active"));
        };
        let acceptor = self.acceptor.read().unwrap_or_else(|e| e.into_inner()).clone();
        let handshake = async move {
            match acceptor {
                ServerTls::Modern(config) => {
                    let tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
                    Ok(ClientStream::Tls(Box::new(tls)))
                }
                #[cfg(feature = "legacy-tls")]
                ServerTls::Legacy(context) => legacy_accept(&context, tcp).await,
            }
        };
        match tokio::time::timeout(timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
        }
    }
}

#[cfg(feature = "legacy-tls")]
async fn legacy_accept(context: &openssl::ssl::SslContext, tcp: tokio::net::TcpStream) -> io::Result<ClientStream> {
    let ssl = openssl::ssl::Ssl::new(context).map_err(io::Error::other)?;
    let mut tls = Box::new(tokio_openssl::SslStream::new(ssl, tcp).map_err(io::Error::other)?);
    std::pin::Pin::new(tls.as_mut()).accept().await.map_err(|e| {
        // An I/O error is the peer's doing (reset, EOF); anything else is
        // the handshake's verdict (no shared version or suite, bad record).
        e.into_io_error().unwrap_or_else(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    })?;
    Ok(ClientStream::Legacy(tls))
}

/// Every listener's TLS acceptor, so that a reload re-reads them all.
#[derive(Default)]
pub(super) struct Certificates {
    slots: Vec<Slot>,
}

struct Slot {
    /// The listener it serves (a reload finds its files by this name).
    listener: String,
    /// Fixed at start, like the listener itself.
    profile: LocalTlsProfile,
    acceptor: Arc<RwLock<ServerTls>>,
}

/// Acceptors read for a reload, not yet in use.
pub(super) struct Fresh<'a>(Vec<(&'a Slot, ServerTls)>);

impl Certificates {
    /// Loads the certificate a listener serves, if it has local TLS.
    pub fn for_listener(&mut self, config: &Config, l: &ListenerConfig) -> Result<Option<LocalTls>, TlsError> {
        if l.local_tls == LocalTlsMode::None {
            return Ok(None);
        }
        // Validation makes sure a TLS listener has a certificate somewhere.
        let Some(files) = config.local_tls_files(l) else { return Ok(None) };
        let acceptor = Arc::new(RwLock::new(ServerTls::load(l.local_tls_profile, files)?));
        self.slots.push(Slot { listener: l.name.clone(), profile: l.local_tls_profile, acceptor: acceptor.clone() });
        Ok(Some(LocalTls { mode: l.local_tls, acceptor }))
    }

    /// Reads every certificate again, from the files the re-read `config`
    /// names for each listener (a listener it no longer has, or no longer
    /// with TLS, keeps its certificate until the next start). Nothing
    /// changes unless every one loads.
    pub fn prepare(&self, config: &Config) -> Result<Fresh<'_>, TlsError> {
        let mut fresh = Vec::new();
        for slot in &self.slots {
            let files =
                config.listeners.iter().find(|l| l.name == slot.listener).and_then(|l| config.local_tls_files(l));
            if let Some(files) = files {
                fresh.push((slot, ServerTls::load(slot.profile, files)?));
            }
        }
        Ok(Fresh(fresh))
    }
}

impl Fresh<'_> {
    /// Puts the re-read certificates in use; handshakes already running
    /// finish with the old ones. How many were replaced.
    pub fn apply(self) -> usize {
        let count = self.0.len();
        for (slot, acceptor) in self.0 {
            *slot.acceptor.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
        }
        count
    }
}
