//! Large reads from the socket under the upstream TLS session.
//!
//! rustls asks its transport for at most 4 KiB at a time, so a bulk FETCH
//! through a bare socket costs four or five `recv` calls per 16 KiB TLS
//! record. [`ReadAhead`] takes what the kernel has, up to 64 KiB, in one
//! call and serves rustls's small reads from it. Like the splice's, its
//! buffer exists only while bytes flow: an idle session holds none. (No kept
//! crate does this: tokio's `BufReader` holds its buffer for the stream's
//! life.)

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const CHUNK: usize = 64 * 1024;

#[derive(Debug)]
pub struct ReadAhead<T> {
    io: T,
    /// Read from `io`, not yet handed out.
    buf: BytesMut,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> Self {
        ReadAhead { io, buf: BytesMut::new() }
    }

    /// Buffer memory held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= CHUNK {
                // A large read gains nothing from a copy in between.
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf.clear();
            this.buf.reserve(CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(result) => {
                    result?;
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// Reads of every size from 1 byte to more than a chunk, over a stream
    /// written in odd pieces: the bytes come out whole and in order.
    #[tokio::test]
    async fn every_read_size_sees_the_same_bytes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        for read_size in [1, 7, 4096, 5000, CHUNK, CHUNK + 1] {
            let (mut tx, rx) = duplex(10_007);
            let mut r = ReadAhead::new(rx);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                for piece in sent.chunks(3331) {
                    tx.write_all(piece).await.unwrap();
                }
            });
            let mut got = Vec::new();
            let mut buf = vec![0u8; read_size];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            writer.await.unwrap();
            assert!(got == data, "read size {read_size}: {} bytes of {}", got.len(), data.len());
        }
    }

    #[tokio::test]
    async fn one_socket_read_serves_many_small_reads_and_idle_holds_nothing() {
        let (mut tx, rx) = duplex(CHUNK);
        let mut r = ReadAhead::new(rx);
        tx.write_all(&[7u8; 20_000]).await.unwrap();
        let mut small = [0u8; 4096];
        assert_eq!(r.read(&mut small).await.unwrap(), 4096);
        // The rest is already here, read in the same call.
        assert_eq!(r.buf.len(), 20_000 - 4096);
        let mut got = 4096;
        while got < 20_000 {
            got += r.read(&mut small).await.unwrap();
        }
        // Drained, then nothing arrives: the buffer is given back.
        let pending =
            poll_fn(|cx| Poll::Ready(Pin::new(&mut r).poll_read(cx, &mut ReadBuf::new(&mut small)).is_pending()));
        assert!(pending.await);
        assert_eq!(r.held(), 0);
    }
}
