//! After authentication: two byte streams joined, untouched.
//!
//! Bytes either side sent ahead of the switch are the first contents of that
//! direction's buffer; counting and idle tracking happen in an IO wrapper
//! ([`Sensor`]) rather than in the copy loop. The copy loop is our own
//! ([`Pump`]) rather than tokio's `copy_bidirectional`, because tokio's holds
//! two 64 KiB buffers for a session's whole life: here a direction holds a
//! buffer only while bytes flow, so an idle IMAP IDLE session keeps nothing
//! but its sockets and TLS state.

use bytes::BytesMut;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Copy buffer per direction while bytes flow: large enough that a 20 MiB
/// message moves in few system calls and TLS records are read whole.
const BUFFER: usize = 64 * 1024;

/// The largest TLS record's plaintext.
const RECORD: usize = 16 * 1024;

/// One direction of the splice: reads into a buffer, writes it all out,
/// repeats; on end of input, shuts the writer's half down.
#[derive(Debug, Default)]
struct Pump {
    /// Bytes read and not yet written are `buf[pos..]`.
    buf: BytesMut,
    pos: usize,
    /// Written since the last flush.
    unflushed: bool,
    eof: bool,
    done: bool,
}

impl Pump {
    /// A pump whose first bytes to write are `ahead`.
    fn new(ahead: BytesMut) -> Self {
        Pump { buf: ahead, ..Pump::default() }
    }

    /// Buffer memory this direction holds now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.pos < self.buf.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.unflushed = true;
            }
            if self.eof {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.buf.clear();
            self.pos = 0;
            // After `clear` this reuses the allocation; after an idle spell
            // (an empty BytesMut) it makes a new one.
            self.buf.reserve(BUFFER);
            match tokio_util::io::poll_read_buf(reader.as_mut(), cx, &mut self.buf) {
                Poll::Pending => {
                    // Nothing to write and nothing arriving: give the memory
                    // back until the peer speaks again.
                    self.buf = BytesMut::new();
                    if self.unflushed {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => self.fill(cx, reader.as_mut())?,
            }
        }
    }

    /// Reads on while more is ready and the buffer has room for a TLS
    /// record: a TLS stream hands out one record (16 KiB) per read, and one
    /// write of the lot costs a quarter of the system calls. Stops at the
    /// first `Pending` (its waker is registered, so nothing is missed) or at
    /// end of input.
    fn fill<R: AsyncRead + ?Sized>(&mut self, cx: &mut Context<'_>, mut reader: Pin<&mut R>) -> io::Result<()> {
        while self.buf.capacity() - self.buf.len() >= RECORD {
            match tokio_util::io::poll_read_buf(reader.as_mut(), cx, &mut self.buf) {
                Poll::Pending => break,
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    break;
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Copies both ways until both directions reached end of input (each
/// half-close passed on as it comes) or either side fails.
async fn copy_both<A, B>(a: &mut A, a_ahead: BytesMut, b: &mut B, b_ahead: BytesMut) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Pump::new(a_ahead), Pump::new(b_ahead));
    poll_fn(|cx| {
        let forth = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forth, back) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
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
    mut upstream: U,
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
    // Bytes the client sent ahead count as read from it.
    activity.read.fetch_add(client_ahead.len() as u64, Ordering::Relaxed);
    let mut client = Sensor { io: client, activity: activity.clone() };
    let copy = copy_both(&mut client, client_ahead, &mut upstream, upstream_ahead);
    tokio::pin!(copy);
    let end = loop {
        let deadline = activity.last() + idle;
        tokio::select! {
            result = &mut copy => break match result {
                Ok(()) => SpliceEnd::Closed,
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
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A splice with nothing sent ahead and a 60 s idle timeout.
    fn start(
        client: DuplexStream,
        upstream: DuplexStream,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<SpliceStats> {
        tokio::spawn(splice(client, BytesMut::new(), upstream, BytesMut::new(), Duration::from_secs(60), cancel))
    }

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
        let task = start(client, upstream, CancellationToken::new());
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

    /// Polls the pump once: whether it is waiting for more.
    async fn step(pump: &mut Pump, reader: &mut DuplexStream, writer: &mut DuplexStream) -> bool {
        poll_fn(|cx| Poll::Ready(pump.poll(cx, Pin::new(&mut *reader), Pin::new(&mut *writer)).is_pending())).await
    }

    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (mut reader_peer, mut reader) = duplex(1024);
        let (mut writer, mut writer_peer) = duplex(1 << 20);
        let mut pump = Pump::new(BytesMut::from(&b"ahead "[..]));
        reader_peer.write_all(b"hello").await.unwrap();
        assert!(step(&mut pump, &mut reader, &mut writer).await, "the pump ended early");
        let mut got = [0u8; 11];
        writer_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ahead hello");
        assert_eq!(pump.held(), 0, "an idle direction kept its buffer");
        // It takes a buffer again when the peer speaks, and gives it back.
        reader_peer.write_all(b" again").await.unwrap();
        assert!(step(&mut pump, &mut reader, &mut writer).await);
        let mut got = [0u8; 6];
        writer_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b" again");
        assert_eq!(pump.held(), 0);
    }

    /// Megabytes each way at once, through pipes far smaller than the
    /// copy buffer and in writes of odd sizes: every byte arrives, in order.
    #[tokio::test]
    async fn bulk_both_ways_arrives_whole() {
        let (client, client_peer) = duplex(997);
        let (upstream, upstream_peer) = duplex(4093);
        let task = start(client, upstream, CancellationToken::new());
        let data = |seed: u32| -> Vec<u8> { (0..3_000_000u32).map(|i| (i.wrapping_mul(seed) >> 7) as u8).collect() };
        let pump_through = |mut tx: DuplexStream, bytes: Vec<u8>| async move {
            let (mut rx, mut wx) = tokio::io::split(&mut tx);
            let send = async {
                let (mut at, mut n) = (0, 0usize);
                while at < bytes.len() {
                    let len = (1 + n * 7919 % 9973).min(bytes.len() - at);
                    wx.write_all(&bytes[at..at + len]).await.unwrap();
                    (at, n) = (at + len, n + 1);
                    if n % 97 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                wx.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let receive = rx.read_to_end(&mut got);
            let ((), received) = tokio::join!(send, receive);
            received.unwrap();
            got
        };
        let (up, down) = (data(2654435761), data(40503));
        // Each peer sends its data and returns what it received.
        let (at_client, at_upstream) =
            tokio::join!(pump_through(client_peer, up.clone()), pump_through(upstream_peer, down.clone()));
        assert!(at_upstream == up, "client to upstream: {} bytes of {}", at_upstream.len(), up.len());
        assert!(at_client == down, "upstream to client: {} bytes of {}", at_client.len(), down.len());
        let stats = task.await.unwrap();
        assert!(matches!(stats.end, SpliceEnd::Closed), "{stats:?}");
        assert_eq!((stats.client_to_upstream, stats.upstream_to_client), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn cancellation_ends_the_splice() {
        let (client, _client_peer) = duplex(1024);
        let (upstream, _upstream_peer) = duplex(1024);
        let cancel = CancellationToken::new();
        let task = start(client, upstream, cancel.clone());
        cancel.cancel();
        assert!(matches!(task.await.unwrap().end, SpliceEnd::Shutdown));
    }
}
