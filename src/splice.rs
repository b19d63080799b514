//! After authentication: two byte streams joined, untouched.
//!
//! Bytes either side sent ahead of the switch are replayed first
//! ([`Prefixed`]); counting and idle tracking happen in an IO wrapper
//! ([`Sensor`]) rather than in the copy loop, which is tokio's
//! `copy_bidirectional` with half-close semantics.

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Copy buffer per direction: large enough that a 20 MiB message moves in
/// few system calls, small enough for thousands of sessions.
const BUFFER: usize = 64 * 1024;

/// Reads return `prefix` first, then the stream's own bytes.
pub struct Prefixed<T> {
    prefix: BytesMut,
    io: T,
}

impl<T> Prefixed<T> {
    pub fn new(io: T, prefix: BytesMut) -> Self {
        Prefixed { prefix, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Byte counts and the time of the last byte, shared with the idle watchdog.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_millis: AtomicU64,
    pub read: AtomicU64,
    pub written: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_millis: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_millis.load(Ordering::Relaxed))
    }
}

/// Counts bytes through a stream and notes when the last one passed.
pub struct Sensor<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Sensor<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.activity.read.fetch_add(n, Ordering::Relaxed);
            this.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sensor<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            this.activity.written.fetch_add(*n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        poll
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[derive(Debug)]
pub enum SpliceEnd {
    /// Both sides closed their halves.
    Closed,
    /// No byte in either direction for the idle timeout.
    IdleTimeout,
    /// The proxy's shutdown deadline passed.
    Shutdown,
    /// A network error on either side (a peer resetting the connection, a TLS
    /// peer closing without close_notify).
    Error(io::Error),
}

#[derive(Debug)]
pub struct SpliceStats {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub duration: Duration,
    pub end: SpliceEnd,
}

/// Joins `client` and `upstream` until both are done, the idle timeout
/// passes, or `cancel` fires. `*_ahead` are bytes each side already sent that
/// the other must receive first.
pub async fn splice<C, U>(
    client: C,
    client_ahead: BytesMut,
    upstream: U,
    upstream_ahead: BytesMut,
    idle: Duration,
    cancel: CancellationToken,
) -> SpliceStats
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    activity.touch();
    let mut client = Sensor { io: Prefixed::new(client, client_ahead), activity: activity.clone() };
    let mut upstream = Prefixed::new(upstream, upstream_ahead);
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER, BUFFER);
    tokio::pin!(copy);
    let end = loop {
        let deadline = activity.last() + idle;
        tokio::select! {
            result = &mut copy => break match result {
                Ok(_) => SpliceEnd::Closed,
                Err(e) => SpliceEnd::Error(e),
            },
            _ = tokio::time::sleep_until(deadline) => {
                if activity.last() + idle <= Instant::now() {
                    break SpliceEnd::IdleTimeout;
                }
            }
            _ = cancel.cancelled() => break SpliceEnd::Shutdown,
        }
    };
    SpliceStats {
        client_to_upstream: activity.read.load(Ordering::Relaxed),
        upstream_to_client: activity.written.load(Ordering::Relaxed),
        duration: activity.start.elapsed(),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefixes_come_first_and_half_close_propagates() {
        let (client, mut client_peer) = duplex(1024);
        let (upstream, mut upstream_peer) = duplex(1024);
        let task = tokio::spawn(splice(
            client,
            BytesMut::from(&b"early-from-client "[..]),
            upstream,
            BytesMut::from(&b"early-from-upstream "[..]),
            Duration::from_secs(60),
            CancellationToken::new(),
        ));
        client_peer.write_all(b"later").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early-from-client later");
        // The other direction still flows after the client's half-close.
        upstream_peer.write_all(b"reply").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"early-from-upstream reply");
        let stats = task.await.unwrap();
        assert!(matches!(stats.end, SpliceEnd::Closed));
        assert_eq!(stats.client_to_upstream, 23);
        assert_eq!(stats.upstream_to_client, 25);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_counts_traffic_in_either_direction() {
        let (client, mut client_peer) = duplex(1024);
        let (upstream, mut upstream_peer) = duplex(1024);
        let task = tokio::spawn(splice(
            client,
            BytesMut::new(),
            upstream,
            BytesMut::new(),
            Duration::from_secs(60),
            CancellationToken::new(),
        ));
        let mut buf = [0u8; 4];
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(45)).await;
            upstream_peer.write_all(b"ping").await.unwrap();
            client_peer.read_exact(&mut buf).await.unwrap();
        }
        assert!(!task.is_finished());
        tokio::time::sleep(Duration::from_secs(61)).await;
        let stats = task.await.unwrap();
        assert!(matches!(stats.end, SpliceEnd::IdleTimeout), "{stats:?}");
        assert_eq!(stats.upstream_to_client, 20);
    }

    #[tokio::test]
    async fn cancellation_ends_the_splice() {
        let (client, _client_peer) = duplex(1024);
        let (upstream, _upstream_peer) = duplex(1024);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(splice(
            client,
            BytesMut::new(),
            upstream,
            BytesMut::new(),
            Duration::from_secs(60),
            cancel.clone(),
        ));
        cancel.cancel();
        assert!(matches!(task.await.unwrap().end, SpliceEnd::Shutdown));
    }
}
