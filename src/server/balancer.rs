//! Reading the PROXY protocol header a load balancer sends first (the
//! parser is the pure [`crate::protocol::proxy`]). Runs right after accept,
//! before the per-address admission, TLS and the greeting, so the real
//! client address drives all of them.

use crate::config::cidr::Cidr;
use crate::protocol::proxy::{self, Header, Progress, ProxyError};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A balancer sends its header at once, with the connection: a listed
/// address that sends nothing for this long is not speaking the protocol.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{0}")]
    Invalid(#[from] ProxyError),
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before a complete PROXY protocol header")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(std::io::Error),
}

/// Whether `peer` may send a header on this listener.
pub fn trusted(from: &[Cidr], peer: SocketAddr) -> bool {
    from.iter().any(|range| range.contains(peer.ip()))
}

/// Reads exactly the header, nothing after it, and returns the client's
/// address: the header's source, or `peer` itself for a LOCAL or UNKNOWN
/// header (the balancer's own connection, e.g. a health check).
pub async fn client_addr(tcp: &mut TcpStream, peer: SocketAddr, timeout: Duration) -> Result<SocketAddr, HeaderError> {
    let mut buf = Vec::with_capacity(64);
    let read = async {
        loop {
            match proxy::parse(&buf)? {
                Progress::Need(n) => {
                    let start = buf.len();
                    buf.resize(start + n, 0);
                    match tcp.read_exact(&mut buf[start..]).await {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(HeaderError::Closed),
                        Err(e) => return Err(HeaderError::Io(e)),
                    }
                }
                Progress::Done { header: Header::Proxied { source, .. }, .. } => return Ok(source),
                Progress::Done { header: Header::Local, .. } => return Ok(peer),
            }
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| HeaderError::Timeout(timeout))?
}
