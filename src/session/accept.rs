//! Connection setup on the client leg, before any IMAP: who the client really is (the PROXY
//! protocol header a trusted load balancer sends, when configured) and TLS (implicit-TLS
//! listeners). What comes out is a stream ready for the IMAP greeting and what is known of
//! the connection.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::relay::{Listener, SessionError, Shared};
use crate::config::ListenerTls;
use crate::metrics::ProxyRefusal;
use crate::net::proxy_protocol::{self, HeaderError, Received};
use crate::net::tls;
use crate::net::{Stream, tune};

/// A client connection ready for IMAP.
pub struct Accepted {
    pub stream: Stream,
    /// The client's address: the TCP peer, or the one a trusted PROXY header gave.
    pub peer: SocketAddr,
    /// The TCP peer itself (the load balancer, behind one).
    pub connected_from: SocketAddr,
    /// The address the client connected to: imapgate's own, or the load balancer's that a
    /// PROXY header gave.
    pub local: SocketAddr,
}

/// The ends of a connection once any PROXY header is read.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Runs the setup of one accepted TCP connection, bounded as a whole by the pre-login
/// timeout.
pub async fn accept(
    mut tcp: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    shared: &Shared,
) -> Result<Accepted, SessionError> {
    tune(&tcp);
    let deadline = Instant::now() + shared.limits.preauth_timeout();
    let ends = match real_ends(&mut tcp, peer, listener, deadline).await {
        Ok(ends) => ends,
        Err(refusal) => {
            listener.metrics.proxy_protocol_refused(refusal.reason());
            return Err(refusal.into());
        }
    };
    let stream = match (&listener.acceptor, listener.tls) {
        (Some(acceptor), ListenerTls::Implicit) => {
            match timeout_at(deadline, tls::accept(acceptor, tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    listener.metrics.tls_handshake_failed();
                    return Err(SessionError::ClientTls(e));
                }
                Err(_) => {
                    listener.metrics.tls_handshake_failed();
                    return Err(SessionError::ClientTlsTimeout);
                }
            }
        }
        _ => Stream::Plain(tcp),
    };
    Ok(Accepted {
        stream,
        peer: ends.peer,
        connected_from: peer,
        local: ends.local,
    })
}

/// Why the PROXY stage refused a connection.
#[derive(Debug)]
pub enum Refusal {
    Untrusted(SocketAddr),
    Header(HeaderError),
    Timeout,
}

impl Refusal {
    pub fn reason(&self) -> ProxyRefusal {
        match self {
            Refusal::Untrusted(_) => ProxyRefusal::Untrusted,
            Refusal::Header(HeaderError::Missing) => ProxyRefusal::Missing,
            Refusal::Header(HeaderError::Invalid(_)) => ProxyRefusal::Invalid,
            Refusal::Header(HeaderError::Closed | HeaderError::Io(_)) => ProxyRefusal::Closed,
            Refusal::Timeout => ProxyRefusal::Timeout,
        }
    }
}

impl From<Refusal> for SessionError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Untrusted(peer) => SessionError::ProxyUntrusted(peer),
            Refusal::Header(e) => SessionError::ProxyHeader(e),
            Refusal::Timeout => SessionError::ProxyTimeout,
        }
    }
}

/// The client's real address and the address it connected to. On a `proxy_protocol`
/// listener, only a source in `proxy_from` may connect and its PROXY header must come first;
/// exactly the header's bytes are consumed, so TLS or IMAP follows on `tcp` untouched.
/// Elsewhere, the TCP connection's own ends.
pub async fn real_ends(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    deadline: Instant,
) -> Result<Ends, Refusal> {
    // An unknown local address only weakens what the PROXY header to an upstream says about
    // the destination; the session does not depend on it.
    let own = Ends {
        peer,
        local: tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
    };
    let Some(trusted) = &listener.proxy_from else {
        return Ok(own);
    };
    if !trusted.iter().any(|net| net.contains(peer.ip())) {
        return Err(Refusal::Untrusted(peer));
    }
    let received = timeout_at(deadline, proxy_protocol::read_header(tcp))
        .await
        .map_err(|_| Refusal::Timeout)?
        .map_err(Refusal::Header)?;
    let ends = match received {
        Received::Proxied(client) => Ends {
            peer: client.source,
            local: client.destination,
        },
        // A health check of the load balancer's own: it is the client.
        Received::Local => own,
    };
    tracing::Span::current().record("peer", tracing::field::display(ends.peer));
    Ok(ends)
}
