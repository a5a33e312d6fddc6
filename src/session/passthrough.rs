//! A response literal passed from the upstream's socket to the client's with splice(2): the
//! pipe a session holds while it does, and how many octets are in it.
//!
//! Only between two plain TCP legs (TLS must decrypt and encrypt every octet), only on Linux,
//! and only for the octets of a streamed literal, which imapgate never looks into: the
//! conversation says when ([`Conversation::upstream_passthrough`]) and is told what passed.
//!
//! [`Conversation::upstream_passthrough`]: super::state::Conversation::upstream_passthrough

use std::io;

use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use crate::net::splice::Pipe;

/// What to do with the upstream's input next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamInput {
    /// Read it into the conversation.
    Read,
    /// Move up to this many octets into the (empty) pipe.
    Splice(usize),
    /// Nothing until the pipe is empty: the literal goes on, and the pipe may be filled only
    /// when empty.
    Wait,
}

#[derive(Debug, Default)]
pub struct Passthrough {
    #[cfg(target_os = "linux")]
    pipe: Option<Pipe>,
    /// Octets in the pipe, not yet written to the client; nothing else may be written to the
    /// client before them.
    held: usize,
    /// A pipe could not be had (out of descriptors): this session reads as before.
    unavailable: bool,
}

impl Passthrough {
    pub fn held(&self) -> usize {
        self.held
    }

    /// Decides how the upstream is read next, given what the conversation allows to pass
    /// (`passable`) and whether both legs are plain sockets. Opens the pipe when a literal
    /// starts passing and closes it once it is done with, so that an idle session holds no
    /// descriptors for it.
    pub fn next_input(&mut self, passable: Option<u32>, both_plain: bool) -> UpstreamInput {
        let passable = passable.filter(|&n| n > 0 && both_plain && !self.unavailable);
        match passable {
            Some(_) if self.held > 0 => UpstreamInput::Wait,
            Some(n) => {
                if self.open() {
                    UpstreamInput::Splice(n as usize)
                } else {
                    UpstreamInput::Read
                }
            }
            None => {
                if self.held == 0 {
                    self.close();
                }
                UpstreamInput::Read
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn open(&mut self) -> bool {
        if self.pipe.is_none() {
            match Pipe::new() {
                Ok(pipe) => self.pipe = Some(pipe),
                Err(err) => {
                    tracing::debug!(%err, "no pipe for splice: relaying literals through memory");
                    self.unavailable = true;
                }
            }
        }
        self.pipe.is_some()
    }

    #[cfg(not(target_os = "linux"))]
    fn open(&mut self) -> bool {
        false
    }

    fn close(&mut self) {
        #[cfg(target_os = "linux")]
        {
            self.pipe = None;
        }
    }

    /// Moves up to `max` octets from the upstream's socket into the pipe; `Ok(0)`: the
    /// upstream closed.
    pub async fn fill(&self, from: &TcpStream, max: usize) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        if let Some(pipe) = &self.pipe {
            return pipe.fill(from, max).await;
        }
        let _ = (from, max);
        Err(io::Error::other("no pipe"))
    }

    /// Moves octets from the pipe into the client's socket.
    pub async fn drain(&self, to: &TcpStream) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        if let Some(pipe) = &self.pipe {
            return pipe.drain(to, self.held).await;
        }
        let _ = to;
        Err(io::Error::other("no pipe"))
    }

    pub fn filled(&mut self, n: usize) {
        self.held += n;
    }

    pub fn drained(&mut self, n: usize) {
        self.held = self.held.saturating_sub(n);
    }
}
