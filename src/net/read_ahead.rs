//! The TCP socket under imapgate's TLS client (the upstream leg), read in large pieces while
//! data streams.
//!
//! rustls asks for at most 4 KiB per read (its receive buffer's step), so a 5 MiB FETCH over a
//! TLS upstream cost some 1,300 `recvfrom` calls. Once a read fills what rustls asked for,
//! more is likely waiting: the next reads take up to [`AHEAD`] at once into a buffer of
//! their own and hand it out in the pieces rustls asks for. The buffer is freed as soon as it
//! is drained after a read that did not fill it, so an idle connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read at once while data streams.
const AHEAD: usize = 64 * 1024;
/// A read ahead of at least this much says data still streams.
const STILL_STREAMING: usize = 16 * 1024;

#[derive(Debug)]
pub struct ReadAhead {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// `buf[pos..filled]` is read and not yet handed out.
    pos: usize,
    filled: usize,
    /// The last read filled what it was given: read ahead next time.
    streaming: bool,
}

impl ReadAhead {
    pub fn new(tcp: TcpStream) -> ReadAhead {
        ReadAhead {
            tcp,
            buf: Vec::new(),
            pos: 0,
            filled: 0,
            streaming: false,
        }
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Hands out buffered bytes; frees the buffer once drained unless data still streams.
    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.filled - self.pos);
        out.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.filled {
            self.pos = 0;
            self.filled = 0;
            if !self.streaming {
                self.buf = Vec::new();
            }
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.filled {
            this.hand_out(out);
            return Poll::Ready(Ok(()));
        }
        if !this.streaming {
            let before = out.filled().len();
            let polled = Pin::new(&mut this.tcp).poll_read(cx, out);
            if let Poll::Ready(Ok(())) = polled {
                this.streaming = out.filled().len() > before && out.remaining() == 0;
            }
            return polled;
        }
        if this.buf.len() < AHEAD {
            this.buf.resize(AHEAD, 0);
        }
        let mut ahead = ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.tcp).poll_read(cx, &mut ahead) {
            Poll::Ready(Ok(())) => {
                let n = ahead.filled().len();
                this.filled = n;
                // Kept while reads stay large: allocating and zeroing the buffer again for
                // every read that found a little less than it could hold cost more than the
                // read-ahead saved.
                this.streaming = n >= STILL_STREAMING;
                if n == 0 {
                    this.buf = Vec::new();
                    return Poll::Ready(Ok(()));
                }
                this.hand_out(out);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

forward_async_write_to_field!(ReadAhead: tcp);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (ReadAhead, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ReadAhead::new(client.unwrap()), server.unwrap().0)
    }

    #[tokio::test]
    async fn small_reads_of_a_stream_get_every_byte_in_order_and_the_buffer_goes_back() {
        let (mut r, mut w) = pair().await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w
        });
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        let mut read_ahead = false;
        while got.len() < data.len() {
            let n = r.read(&mut piece).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&piece[..n]);
            read_ahead |= r.buf.len() == AHEAD;
        }
        assert_eq!(got, data);
        assert!(read_ahead, "a streaming socket was read ahead");
        // A short message after the stream: handed out, and no buffer is kept idle.
        let mut w = writer.await.unwrap();
        w.write_all(b"* OK\r\n").await.unwrap();
        let mut line = Vec::new();
        while line.len() < 6 {
            let n = r.read(&mut piece).await.unwrap();
            line.extend_from_slice(&piece[..n]);
        }
        assert_eq!(line, b"* OK\r\n");
        assert_eq!(r.buf.capacity(), 0);
        drop(w);
        assert_eq!(r.read(&mut piece).await.unwrap(), 0);
    }
}
