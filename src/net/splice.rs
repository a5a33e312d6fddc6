//! Moving a streamed literal's octets from one plain TCP socket to another without copying
//! them through imapgate: splice(2) from the socket into a pipe, and from the pipe into the
//! other socket (the kernel moves page references, it copies no octet into user space).
//!
//! The session's driver owns the order: it fills the pipe only when everything before the
//! octets has been written and the pipe is empty, and empties it before writing anything else
//! to that peer.

use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{Poll, ready};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Asked of the kernel per pipe (it keeps the default, 64 KiB, when an unprivileged user is
/// over `/proc/sys/fs/pipe-user-pages-soft`): fewer, larger moves while a literal streams.
const PIPE_SIZE: usize = 256 * 1024;

/// One pipe, held by a session while it passes a literal on.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // A smaller pipe still works, with more moves.
        let _ = fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok(Pipe { read, write })
    }

    /// Moves up to `max` octets waiting on `from` into the pipe, which must be empty: then a
    /// move that would block can only mean the socket has nothing, never that the pipe is
    /// full (a full pipe taken for an empty socket would wait for input that already came).
    /// `Ok(0)`: the peer closed its side.
    pub async fn fill(&self, from: &TcpStream, max: usize) -> io::Result<usize> {
        let len = max.min(PIPE_SIZE);
        // Polled readiness rather than `readable()`: that future is larger than everything
        // else a session keeps while it waits.
        poll_fn(|cx| {
            loop {
                ready!(from.poll_read_ready(cx))?;
                match from.try_io(Interest::READABLE, || {
                    splice(from, None, &self.write, None, len, flags()).map_err(io::Error::from)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    moved => return Poll::Ready(moved),
                }
            }
        })
        .await
    }

    /// Moves up to `held` octets (what the pipe holds) into `to`.
    pub async fn drain(&self, to: &TcpStream, held: usize) -> io::Result<usize> {
        poll_fn(|cx| {
            loop {
                ready!(to.poll_write_ready(cx))?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(&self.read, None, to, None, held, flags()).map_err(io::Error::from)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    moved => return Poll::Ready(moved),
                }
            }
        })
        .await
    }
}

fn flags() -> SpliceFlags {
    SpliceFlags::MOVE | SpliceFlags::NONBLOCK
}
