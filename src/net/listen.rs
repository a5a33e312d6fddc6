//! Binding a client listener, shared with other imapgate processes when asked.
//!
//! With `reuse_port`, several imapgate processes listen on one address at once
//! (`SO_REUSEPORT`) and the kernel spreads new connections over them: more sessions than one
//! process may hold open files (two per session), and a restart without a moment where the
//! port refuses connections. Every process sharing the port must ask for it.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// The kernel's default queue of connections not yet accepted is small for a burst of logins.
const BACKLOG: i32 = 1024;

/// A listening socket on `addr`; shared with other processes when `reuse_port` is set.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's own bind does: a restarted imapgate rebinds at once.
    socket.set_reuse_address(true)?;
    if reuse_port {
        set_reuse_port(&socket)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

#[cfg(unix)]
fn set_reuse_port(socket: &Socket) -> io::Result<()> {
    socket.set_reuse_port(true)
}

#[cfg(not(unix))]
fn set_reuse_port(_: &Socket) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reuse_port needs SO_REUSEPORT (Unix)",
    ))
}

#[cfg(test)]
mod tests {
    use super::bind;

    #[tokio::test]
    async fn a_shared_port_takes_a_second_listener_and_a_private_one_does_not() {
        let first = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).expect("a second reuse_port listener binds");
        assert_eq!(second.local_addr().unwrap(), addr);
        let err = bind(addr, false).expect_err("a listener without reuse_port is refused");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

        let private = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = private.local_addr().unwrap();
        assert!(bind(addr, true).is_err());
    }
}
