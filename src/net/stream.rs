//! One type for every socket a session holds, plain or TLS, client or server side.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

use super::read_ahead::ReadAhead;

/// A connection on either leg. The TLS variants are boxed because a rustls connection is
/// about a kilobyte and would otherwise make every plain stream as large.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// We are the TLS server: the client leg.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// We are the TLS client: the upstream leg.
    ClientTls(Box<tokio_rustls::client::TlsStream<ReadAhead>>),
}

/// Disables Nagle's algorithm. IMAP clients write a literal and its closing CRLF in separate
/// writes; with Nagle on one side and delayed ACK on the other each such command would
/// stall about 40 ms at the proxy.
pub fn tune(tcp: &TcpStream) {
    if let Err(err) = tcp.set_nodelay(true) {
        // Only a socket already dead fails here; the next read or write reports it.
        tracing::debug!(%err, "cannot set TCP_NODELAY");
    }
}

/// Asks the kernel to acknowledge what was just read at once instead of delaying the ACK.
/// Linux clears the flag by itself, so it is set again after every read. A client that writes
/// a literal and its CRLF in two writes without TCP_NODELAY (python's imaplib) holds the CRLF
/// until its literal is acknowledged: with a delayed ACK, ~40 ms per APPEND. Dovecot answers such
/// clients at once; so must a proxy in front of it.
pub fn quickack(tcp: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // A failure only means the ACK is delayed as before.
        let _ = socket2::SockRef::from(tcp).set_tcp_quickack(true);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = tcp;
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The server name the client asked for (client leg only); policies may route or
    /// refuse on it.
    pub fn sni(&self) -> Option<&str> {
        match self {
            Stream::ServerTls(tls) => tls.get_ref().1.server_name(),
            _ => None,
        }
    }

    /// The negotiated ALPN protocol, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Stream::Plain(_) => None,
            Stream::ServerTls(tls) => tls.get_ref().1.alpn_protocol(),
            Stream::ClientTls(tls) => tls.get_ref().1.alpn_protocol(),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::ServerTls(tls) => tls.get_ref().0,
            Stream::ClientTls(tls) => tls.get_ref().0.get_ref(),
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    /// The TCP socket of a plain stream, for a STARTTLS upgrade; a TLS stream is given back
    /// unchanged since upgrading twice is a protocol error the caller must answer.
    pub fn into_plain(self) -> Result<TcpStream, Stream> {
        match self {
            Stream::Plain(tcp) => Ok(tcp),
            other => Err(other),
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Self {
        Stream::Plain(tcp)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

forward_async_write_to_variants!(Stream: Stream::Plain, Stream::ServerTls, Stream::ClientTls);
