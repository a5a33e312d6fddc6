//! A minimal IMAP client tuned for load: one buffer per connection, literals skipped without
//! copying unless asked for, every read and write bounded by a timeout.
//!
//! It understands just enough of the grammar to find message boundaries: a response is a line
//! ending in CRLF, unless the line ends with a literal announcement `{n}` (or `{n+}`), in which
//! case `n` bytes and the rest of the response follow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long any single read, write or connect may take before the run is abandoned.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest response line (literals excluded) the client accepts.
const MAX_LINE: usize = 64 * 1024 * 1024;

pub type TlsConn = Conn<TlsStream<TcpStream>>;
pub type PlainConn = Conn<TcpStream>;
/// Either, behind one type (the cost of the indirection is nothing next to a syscall).
pub type AnyConn = Conn<Box<dyn Io>>;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects with implicit TLS when `tls` is given, in plaintext otherwise.
pub async fn connect(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    buf_size: usize,
) -> Result<AnyConn, String> {
    Ok(match tls {
        Some(tls) => {
            let c = connect_tls(addr, tls, buf_size).await?;
            Conn::new(Box::new(c.stream) as Box<dyn Io>, addr, buf_size)
        }
        None => {
            let tcp = tcp_connect(addr).await?;
            Conn::new(Box::new(tcp) as Box<dyn Io>, addr, buf_size)
        }
    })
}

/// One response: its text with literal contents left out (the `{n}` announcements and CRLFs
/// stay), the total size of its literals, and their contents when asked for.
#[derive(Debug, Default)]
pub struct Response {
    pub text: Vec<u8>,
    pub literal_bytes: usize,
    pub literals: Vec<Vec<u8>>,
}

impl Response {
    /// `Some(status)` when this is the tagged completion of `tag`.
    pub fn tagged<'a>(&'a self, tag: &[u8]) -> Option<&'a [u8]> {
        let rest = self.text.strip_prefix(tag)?.strip_prefix(b" ")?;
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        Some(&rest[..end])
    }

    pub fn is_continuation(&self) -> bool {
        self.text.starts_with(b"+")
    }

    pub fn lossy(&self) -> String {
        let shown = &self.text[..self.text.len().min(300)];
        String::from_utf8_lossy(shown).into_owned()
    }
}

/// An IMAP connection over any byte stream.
pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    pub peer: SocketAddr,
}

pub async fn connect_plain(addr: SocketAddr, buf_size: usize) -> Result<PlainConn, String> {
    let tcp = tcp_connect(addr).await?;
    Ok(Conn::new(tcp, addr, buf_size))
}

/// Connects with implicit TLS (SNI `localhost`).
pub async fn connect_tls(
    addr: SocketAddr,
    tls: &Arc<ClientConfig>,
    buf_size: usize,
) -> Result<TlsConn, String> {
    let tcp = tcp_connect(addr).await?;
    let name = ServerName::try_from("localhost").map_err(|e| format!("server name: {e}"))?;
    let stream = timeout(
        IO_TIMEOUT,
        TlsConnector::from(tls.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| format!("TLS handshake with {addr}: timed out"))?
    .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    Ok(Conn::new(stream, addr, buf_size))
}

async fn tcp_connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let tcp = timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY on {addr}: {e}"))?;
    Ok(tcp)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, peer: SocketAddr, buf_size: usize) -> Self {
        Conn {
            stream,
            buf: vec![0; buf_size.max(1024)],
            pos: 0,
            end: 0,
            peer,
        }
    }

    /// Writes all of `bytes` and flushes (a TLS stream may hold a partial record otherwise).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        let peer = self.peer;
        timeout(IO_TIMEOUT, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| format!("write to {peer}: timed out"))?
        .map_err(|e| format!("write to {peer}: {e}"))
    }

    /// Reads more bytes into the buffer, making room first. EOF is an error.
    async fn fill(&mut self) -> Result<(), String> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            } else {
                // A line longer than the buffer: grow, within reason.
                if self.buf.len() >= MAX_LINE {
                    return Err(format!(
                        "{}: a line longer than {MAX_LINE} bytes",
                        self.peer
                    ));
                }
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
        }
        let peer = self.peer;
        let n = timeout(IO_TIMEOUT, self.stream.read(&mut self.buf[self.end..]))
            .await
            .map_err(|_| format!("read from {peer}: timed out"))?
            .map_err(|e| format!("read from {peer}: {e}"))?;
        if n == 0 {
            return Err(format!("{peer} closed the connection"));
        }
        self.end += n;
        Ok(())
    }

    /// Appends the next line (without CRLF) to `out`.
    async fn read_line_into(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        // Bytes after `pos` already searched (a CR at the very end is searched again).
        let mut searched = 0;
        loop {
            let from = self.pos + searched;
            if let Some(i) = memchr::memmem::find(&self.buf[from..self.end], b"\r\n") {
                let stop = from + i;
                out.extend_from_slice(&self.buf[self.pos..stop]);
                self.pos = stop + 2;
                return Ok(());
            }
            searched = (self.end - self.pos).saturating_sub(1);
            self.fill().await?;
        }
    }

    /// Consumes `n` literal bytes, keeping them only when `keep` is set.
    async fn read_literal(
        &mut self,
        mut n: usize,
        keep: Option<&mut Vec<u8>>,
    ) -> Result<(), String> {
        let mut keep = keep;
        if let Some(k) = keep.as_deref_mut() {
            k.reserve(n);
        }
        while n > 0 {
            if self.pos == self.end {
                self.fill().await?;
            }
            let take = n.min(self.end - self.pos);
            if let Some(k) = keep.as_deref_mut() {
                k.extend_from_slice(&self.buf[self.pos..self.pos + take]);
            }
            self.pos += take;
            n -= take;
        }
        Ok(())
    }

    /// Reads one whole response (line plus literals).
    pub async fn read_response(&mut self, keep_literals: bool) -> Result<Response, String> {
        let mut r = Response::default();
        loop {
            let start = r.text.len();
            self.read_line_into(&mut r.text).await?;
            match literal_announcement(&r.text[start..]) {
                Some(n) => {
                    r.text.extend_from_slice(b"\r\n");
                    r.literal_bytes += n;
                    if keep_literals {
                        let mut lit = Vec::new();
                        self.read_literal(n, Some(&mut lit)).await?;
                        r.literals.push(lit);
                    } else {
                        self.read_literal(n, None).await?;
                    }
                }
                None => return Ok(r),
            }
        }
    }

    /// Reads responses up to the tagged one for `tag`; returns them all (tagged last).
    pub async fn until_tagged(
        &mut self,
        tag: &str,
        keep_literals: bool,
    ) -> Result<Vec<Response>, String> {
        let mut out = Vec::new();
        for _ in 0..10_000_000 {
            let r = self.read_response(keep_literals).await?;
            let done = r.tagged(tag.as_bytes()).is_some();
            out.push(r);
            if done {
                return Ok(out);
            }
        }
        Err(format!("no tagged response for {tag}"))
    }

    /// Sends `tag command` and expects `tag OK`; returns every response.
    pub async fn ok(&mut self, tag: &str, command: &str) -> Result<Vec<Response>, String> {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        let rs = self.until_tagged(tag, false).await?;
        expect_ok(&rs, tag, command)?;
        Ok(rs)
    }

    /// Reads the greeting; expects `* OK`.
    pub async fn greeting(&mut self) -> Result<(), String> {
        let r = self.read_response(false).await?;
        if r.text.starts_with(b"* OK") {
            Ok(())
        } else {
            Err(format!("greeting from {}: {}", self.peer, r.lossy()))
        }
    }

    /// Greeting, then LOGIN.
    pub async fn login(&mut self, user: &str, pass: &str) -> Result<(), String> {
        self.greeting().await?;
        self.ok("l", &format!("LOGIN {user} {pass}"))
            .await
            .map(drop)
    }

    /// APPEND with a synchronizing literal: waits for the server's `+`, then sends the
    /// message. Returns the tagged response's text.
    pub async fn append(
        &mut self,
        tag: &str,
        mailbox: &str,
        msg: &[u8],
    ) -> Result<Vec<u8>, String> {
        self.send(format!("{tag} APPEND {mailbox} {{{}}}\r\n", msg.len()).as_bytes())
            .await?;
        let r = self.read_response(false).await?;
        if !r.is_continuation() {
            return Err(format!("APPEND: expected +, got {}", r.lossy()));
        }
        self.send_parts(&[msg, b"\r\n"]).await?;
        let rs = self.until_tagged(tag, false).await?;
        expect_ok(&rs, tag, "APPEND")?;
        Ok(rs.last().map(|r| r.text.clone()).unwrap_or_default())
    }

    /// Writes several slices then one flush (one TLS flush for a literal and its CRLF).
    pub async fn send_parts(&mut self, parts: &[&[u8]]) -> Result<(), String> {
        let peer = self.peer;
        timeout(IO_TIMEOUT, async {
            for p in parts {
                self.stream.write_all(p).await?;
            }
            self.stream.flush().await
        })
        .await
        .map_err(|_| format!("write to {peer}: timed out"))?
        .map_err(|e| format!("write to {peer}: {e}"))
    }

    /// Closes the connection (TLS close_notify first), without waiting for the server.
    pub async fn close(mut self) {
        let _ = timeout(Duration::from_secs(5), self.stream.shutdown()).await;
    }

    /// LOGOUT, tolerating a connection that closes first.
    pub async fn logout(mut self) {
        if self.send(b"z LOGOUT\r\n").await.is_ok() {
            let _ = timeout(Duration::from_secs(5), self.until_tagged("z", false)).await;
        }
        let _ = timeout(Duration::from_secs(5), self.stream.shutdown()).await;
    }
}

/// Checks that the last response is `tag OK`.
pub fn expect_ok(rs: &[Response], tag: &str, what: &str) -> Result<(), String> {
    match rs.last().and_then(|r| r.tagged(tag.as_bytes())) {
        Some(b"OK") => Ok(()),
        _ => Err(format!(
            "{what}: expected {tag} OK, got {}",
            rs.last().map(Response::lossy).unwrap_or_default()
        )),
    }
}

/// `Some(n)` if `line` ends with a literal announcement `{n}`, `{n+}` or `~{n}`.
pub fn literal_announcement(line: &[u8]) -> Option<usize> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The UID from an `APPENDUID uidvalidity uid` response code.
pub fn appenduid(tagged_text: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(tagged_text).ok()?;
    let at = text.find("[APPENDUID ")?;
    let rest = &text[at + "[APPENDUID ".len()..];
    let uid = rest.split([' ', ']']).nth(1)?;
    uid.parse().ok()
}
