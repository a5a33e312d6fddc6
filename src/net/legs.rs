//! The two halves of one leg of a session, read and written by the session's task at once.
//!
//! A plain TCP socket is split into tokio's owned halves: they need no lock (reading and
//! writing a socket are independent), and each still reaches the socket itself, which the
//! driver needs to wait for readiness and to move a literal's octets with splice(2). A TLS
//! stream has one rustls state for both directions, so its halves share it through tokio's
//! `split`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::stream::{Stream, quickack};

/// When to acknowledge what was read at once (see [`quickack`]): on the client leg, while the
/// client may be holding bytes back, which the driver says through the shared switch: when the
/// bytes read stop inside a line, or when the conversation was inside a message (a literal
/// whose closing CRLF a Nagle-bound client writes separately). Between whole pipelined commands
/// the system call is spared (it was a third of all of imapgate's system calls in the
/// small-command benchmark, one per read of either leg). `None`: never (the upstream leg).
pub type Ack = Option<Arc<AtomicBool>>;

/// Splits a leg into the halves the driver polls together.
pub fn split(stream: Stream, ack: Ack) -> (LegReader, LegWriter) {
    match stream {
        Stream::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            (LegReader::Tcp { half: r, ack }, LegWriter::Tcp(w))
        }
        tls => {
            let (r, w) = tokio::io::split(TlsLeg { stream: tls, ack });
            (LegReader::Tls(r), LegWriter::Tls(w))
        }
    }
}

/// Puts a leg back together (for a STARTTLS upgrade).
pub fn unsplit(r: LegReader, w: LegWriter) -> io::Result<Stream> {
    match (r, w) {
        (LegReader::Tcp { half, .. }, LegWriter::Tcp(w)) => half
            .reunite(w)
            .map(Stream::Plain)
            .map_err(|_| io::Error::other("halves of two different sockets")),
        (LegReader::Tls(r), LegWriter::Tls(w)) if r.is_pair_of(&w) => Ok(r.unsplit(w).stream),
        _ => Err(io::Error::other("halves of two different legs")),
    }
}

fn acks(ack: &Ack, read: &[u8]) -> bool {
    ack.as_ref()
        .is_some_and(|mid| mid.load(Ordering::Relaxed) || read.last() != Some(&b'\n'))
}

/// The reading half of a leg.
#[derive(Debug)]
pub enum LegReader {
    Tcp { half: OwnedReadHalf, ack: Ack },
    Tls(tokio::io::ReadHalf<TlsLeg>),
}

impl LegReader {
    /// The plain socket, if the leg is one.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            LegReader::Tcp { half, .. } => Some(half.as_ref()),
            LegReader::Tls(_) => None,
        }
    }
}

impl AsyncRead for LegReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LegReader::Tcp { half, ack } => {
                let before = buf.filled().len();
                let polled = Pin::new(&mut *half).poll_read(cx, buf);
                if matches!(polled, Poll::Ready(Ok(())))
                    && buf.filled().len() > before
                    && acks(ack, buf.filled())
                {
                    quickack(half.as_ref());
                }
                polled
            }
            LegReader::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// The writing half of a leg.
#[derive(Debug)]
pub enum LegWriter {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsLeg>),
}

impl LegWriter {
    /// The plain socket, if the leg is one.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            LegWriter::Tcp(w) => Some(w.as_ref()),
            LegWriter::Tls(_) => None,
        }
    }
}

forward_async_write_to_variants!(LegWriter: LegWriter::Tcp, LegWriter::Tls);

/// A TLS leg with its acknowledgement switch: reading goes through rustls, so the switch is
/// applied below tokio's split, where the TCP socket is still in reach.
#[derive(Debug)]
pub struct TlsLeg {
    stream: Stream,
    ack: Ack,
}

impl AsyncRead for TlsLeg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && acks(&this.ack, buf.filled())
        {
            quickack(this.stream.tcp());
        }
        polled
    }
}

forward_async_write_to_field!(TlsLeg: stream);
