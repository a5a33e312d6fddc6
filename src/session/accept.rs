//! Connection setup on the client leg, before any IMAP: who the client really is (the PROXY
//! protocol header a trusted load balancer sends, when configured) and TLS (implicit-TLS
//! listeners). What comes out is a stream ready for the IMAP greeting and what is known of
//! the connection.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::timeout;

use super::relay::{Listener, SessionError, Shared};
use crate::config::ListenerTls;
use crate::net::tls;
use crate::net::{Stream, tune};

/// A client connection ready for IMAP.
pub struct Accepted {
    pub stream: Stream,
    /// The client's address: the TCP peer, or the one a trusted PROXY header gave.
    pub peer: SocketAddr,
    /// The TCP peer itself (the load balancer, behind one).
    pub connected_from: SocketAddr,
    /// The address the client connected to (this listener's).
    pub local: SocketAddr,
}

/// Runs the setup of one accepted TCP connection, bounded by the pre-login timeout.
pub async fn accept(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    shared: &Shared,
) -> Result<Accepted, SessionError> {
    tune(&tcp);
    let local = tcp.local_addr().map_err(SessionError::Client)?;
    let stream = match (&listener.acceptor, listener.tls) {
        (Some(acceptor), ListenerTls::Implicit) => {
            match timeout(shared.limits.preauth_timeout(), tls::accept(acceptor, tcp)).await {
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
        peer,
        connected_from: peer,
        local,
    })
}
