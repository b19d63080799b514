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

#[derive(Clone)]
struct Slot {
    /// The listener it serves (a reload finds its files by this name).
    listener: String,
    /// A listener whose profile a reload changes gets a new slot.
    profile: LocalTlsProfile,
    acceptor: Arc<RwLock<ServerTls>>,
}

/// The certificates a configuration names, read from their files, not yet
/// in use.
pub(super) struct Loaded(Vec<(String, LocalTlsProfile, ServerTls)>);

/// The next generation's certificates: a listener that keeps its name and
/// profile keeps its acceptor (sessions of the running generation share
/// it), which takes the re-read certificate at [`Staged::commit`]; any
/// other gets a new one.
pub(super) struct Staged {
    slots: Vec<Slot>,
    pending: Vec<(Arc<RwLock<ServerTls>>, ServerTls)>,
}

impl Certificates {
    /// Reads the certificate of every listener with local TLS; nothing is
    /// put in use, so a reload can still give up.
    pub fn load(config: &Config) -> Result<Loaded, TlsError> {
        let mut loaded = Vec::new();
        for l in config.listeners.iter().filter(|l| l.local_tls != LocalTlsMode::None) {
            // Validation makes sure a TLS listener has a certificate somewhere.
            let Some(files) = config.local_tls_files(l) else { continue };
            loaded.push((l.name.clone(), l.local_tls_profile, ServerTls::load(l.local_tls_profile, files)?));
        }
        Ok(Loaded(loaded))
    }

    /// The acceptors `loaded` goes into, beside the running ones.
    pub fn stage(&self, loaded: Loaded) -> Staged {
        let mut staged = Staged { slots: Vec::new(), pending: Vec::new() };
        for (listener, profile, tls) in loaded.0 {
            match self.slots.iter().find(|s| s.listener == listener && s.profile == profile) {
                Some(slot) => {
                    staged.pending.push((slot.acceptor.clone(), tls));
                    staged.slots.push(slot.clone());
                }
                None => staged.slots.push(Slot { listener, profile, acceptor: Arc::new(RwLock::new(tls)) }),
            }
        }
        staged
    }
}

impl Staged {
    /// The local TLS of listener `l`, if it has local TLS.
    pub fn for_listener(&self, l: &ListenerConfig) -> Option<LocalTls> {
        if l.local_tls == LocalTlsMode::None {
            return None;
        }
        let slot = self.slots.iter().find(|s| s.listener == l.name)?;
        Some(LocalTls { mode: l.local_tls, acceptor: slot.acceptor.clone() })
    }

    /// Puts the re-read certificates in use (handshakes already running
    /// finish with the old ones); cannot fail. The certificates now, and how
    /// many running acceptors took a re-read certificate.
    pub fn commit(self) -> (Certificates, usize) {
        let count = self.pending.len();
        for (acceptor, tls) in self.pending {
            *acceptor.write().unwrap_or_else(|e| e.into_inner()) = tls;
        }
        (Certificates { slots: self.slots }, count)
    }
}
