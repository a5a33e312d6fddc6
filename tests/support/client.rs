//! A tiny IMAP client for tests that read like transcripts.
//!
//! ```ignore
//! let mut c = Client::connect(dc.addr()).await;
//! assert!(c.read_greeting().await.starts_with("* OK"));
//! c.ok("a1 LOGIN alice alicepw").await;
//! let r = c.ok("a2 SELECT INBOX").await;            // every response line, tagged one last
//! assert!(r.iter().any(|l| l.ends_with(" EXISTS")));
//! c.cmd_with_literals(&[b"a3 APPEND INBOX {5}", b"hello", b""]).await;
//! ```
//!
//! Each response is returned whole as one `String` (lossy UTF-8), without its final CRLF;
//! a literal in it (`{n}\r\n` + n bytes) is included verbatim. Every read has a timeout
//! (10 s by default, [`Client::set_timeout`]) and panics with what was received, so a test
//! never hangs.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client TLS config trusting the CA(s) in `ca_pem`, offering ALPN `imap`.
pub fn tls_config(ca_pem: &str) -> Arc<ClientConfig> {
    tls_config_alpn(ca_pem, &[b"imap"])
}

/// A client TLS config trusting the CA(s) in `ca_pem`, offering the given ALPN protocols.
pub fn tls_config_alpn(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("CA PEM"))
            .expect("add CA to root store");
    }
    assert!(!roots.is_empty(), "no certificate in the CA PEM");
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A client TLS config that accepts any server certificate (for a proxy's self-signed one),
/// offering ALPN `imap`: imapgate's own `verify = false` upstream config, signatures still
/// checked.
pub fn insecure_tls_config() -> Arc<ClientConfig> {
    imapgate::net::tls::client_config(None, false).expect("insecure TLS client config")
}

/// Plain TCP or TLS over TCP: imapgate's own stream type.
pub use imapgate::net::Stream;
use imapgate::net::read_ahead::ReadAhead;

/// A test IMAP client (see the module docs).
pub struct Client {
    stream: Option<Stream>,
    buf: Vec<u8>,
    eof: bool,
    timeout: Duration,
    peer: SocketAddr,
}

impl Client {
    /// Connects over plain TCP.
    pub async fn connect(addr: SocketAddr) -> Client {
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {addr}: timed out"))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        Client {
            stream: Some(Stream::Plain(tcp)),
            buf: Vec::new(),
            eof: false,
            timeout: DEFAULT_TIMEOUT,
            peer: addr,
        }
    }

    /// Connects over plain TCP from a chosen local address (any of 127.0.0.0/8 on loopback),
    /// so that a test can play several client addresses.
    pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> Client {
        let connect = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(from, 0))?;
            socket.connect(addr).await
        };
        let tcp = tokio::time::timeout(DEFAULT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| panic!("connect {addr} from {from}: timed out"))
            .unwrap_or_else(|e| panic!("connect {addr} from {from}: {e}"));
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        Client {
            stream: Some(Stream::Plain(tcp)),
            buf: Vec::new(),
            eof: false,
            timeout: DEFAULT_TIMEOUT,
            peer: addr,
        }
    }

    /// Connects with implicit TLS, trusting `ca_pem`, SNI `localhost`, ALPN `imap`.
    pub async fn connect_tls(addr: SocketAddr, ca_pem: &str) -> Client {
        Client::connect_tls_with(addr, "localhost", tls_config(ca_pem)).await
    }

    /// Connects with implicit TLS using `config` and `server_name` (SNI and verification).
    pub async fn connect_tls_with(
        addr: SocketAddr,
        server_name: &str,
        config: Arc<ClientConfig>,
    ) -> Client {
        let mut c = Client::connect(addr).await;
        c.upgrade_tls(server_name, config).await;
        c
    }

    /// Sends `{tag} STARTTLS`, expects `{tag} OK`, then does the TLS handshake
    /// (SNI `localhost`, trusting `ca_pem`). Returns the responses to STARTTLS.
    pub async fn starttls(&mut self, tag: &str, ca_pem: &str) -> Vec<String> {
        let r = self.ok(&format!("{tag} STARTTLS")).await;
        self.upgrade_tls("localhost", tls_config(ca_pem)).await;
        r
    }

    /// The TLS handshake on the current plain connection (after a STARTTLS OK).
    /// Panics if bytes were already received after the OK (they would be plaintext
    /// injected before the handshake).
    pub async fn upgrade_tls(&mut self, server_name: &str, config: Arc<ClientConfig>) {
        assert!(
            self.buf.is_empty(),
            "plaintext bytes after STARTTLS OK: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let tcp = match self.stream.take() {
            Some(Stream::Plain(tcp)) => tcp,
            Some(_) => panic!("already TLS"),
            None => panic!("connection gone"),
        };
        let name = ServerName::try_from(server_name.to_string()).expect("server name");
        let tls = tokio::time::timeout(
            self.timeout,
            TlsConnector::from(config).connect(name, ReadAhead::new(tcp)),
        )
        .await
        .unwrap_or_else(|_| panic!("TLS handshake with {}: timed out", self.peer))
        .unwrap_or_else(|e| panic!("TLS handshake with {}: {e}", self.peer));
        self.stream = Some(Stream::ClientTls(Box::new(tls)));
    }

    /// True once the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.as_ref().is_some_and(Stream::is_tls)
    }

    /// The ALPN protocol the server chose, if any.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match &self.stream {
            Some(s) => s.alpn().map(<[u8]>::to_vec),
            _ => None,
        }
    }

    /// The leaf certificate the server showed, on a TLS connection.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        match &self.stream {
            Some(Stream::ClientTls(tls)) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| leaf.clone().into_owned()),
            _ => None,
        }
    }

    /// The address connected to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// This end's address (what the server sees as its peer, without a proxy between).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream
            .as_ref()
            .expect("connection gone")
            .tcp()
            .local_addr()
            .expect("local address")
    }

    /// Changes the timeout of every later read.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Reads the greeting (`* OK ...`, `* PREAUTH ...` or `* BYE ...`); panics on anything else.
    pub async fn read_greeting(&mut self) -> String {
        let g = self.read_response().await;
        assert!(
            g.starts_with("* OK") || g.starts_with("* PREAUTH") || g.starts_with("* BYE"),
            "not a greeting: {g:?}"
        );
        g
    }

    /// Writes raw bytes as they are (nothing appended) and flushes.
    pub async fn send(&mut self, bytes: &[u8]) {
        let timeout = self.timeout;
        let peer = self.peer;
        let s = self.stream_mut();
        let write = async {
            s.write_all(bytes).await?;
            s.flush().await
        };
        tokio::time::timeout(timeout, write)
            .await
            .unwrap_or_else(|_| panic!("write to {peer}: timed out"))
            .unwrap_or_else(|e| panic!("write to {peer}: {e}"));
    }

    /// Writes `line` and CRLF, and says whether that worked rather than panicking: for a
    /// connection the server may be closing.
    pub async fn try_send_line(&mut self, line: &str) -> std::io::Result<()> {
        let timeout = self.timeout;
        let bytes = format!("{line}\r\n");
        let s = self.stream_mut();
        let write = async {
            s.write_all(bytes.as_bytes()).await?;
            s.flush().await
        };
        tokio::time::timeout(timeout, write)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }

    /// Writes `line` followed by CRLF.
    pub async fn send_line(&mut self, line: &str) {
        let mut bytes = line.as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes).await;
    }

    /// Sends a command line (CRLF appended) and returns every response up to and including
    /// the tagged one for the line's tag (its first word).
    pub async fn cmd(&mut self, line: &str) -> Vec<String> {
        let tag = tag_of(line.as_bytes());
        self.send_line(line).await;
        self.read_until_tagged(&tag).await
    }

    /// Like [`Client::cmd`], and panics unless the tagged response is `OK`.
    pub async fn ok(&mut self, line: &str) -> Vec<String> {
        let r = self.cmd(line).await;
        assert_tagged(&r, &tag_of(line.as_bytes()), "OK");
        r
    }

    /// Like [`Client::cmd`], and panics unless the tagged response is `NO`.
    pub async fn no(&mut self, line: &str) -> Vec<String> {
        let r = self.cmd(line).await;
        assert_tagged(&r, &tag_of(line.as_bytes()), "NO");
        r
    }

    /// Like [`Client::cmd`], and panics unless the tagged response is `BAD`.
    pub async fn bad(&mut self, line: &str) -> Vec<String> {
        let r = self.cmd(line).await;
        assert_tagged(&r, &tag_of(line.as_bytes()), "BAD");
        r
    }

    /// `LOGIN` with quoted user and password; panics unless OK.
    pub async fn login(&mut self, user: &str, password: &str) -> Vec<String> {
        self.ok(&format!("l1 LOGIN {} {}", quote(user), quote(password)))
            .await
    }

    /// A command with literals. `parts` alternate between text and literal contents:
    /// `[text0, literal0, text1, literal1, ..., text_last]`; each text before a literal
    /// must end with its `{n}` (or `{n+}` / `~{n}`). For a synchronizing literal the client
    /// waits for the server's `+` before sending the literal; if a tagged response comes
    /// instead (the command was refused), the responses so far are returned at once.
    ///
    /// `cmd_with_literals(&[b"a1 APPEND INBOX {5}", b"hello", b""])`
    pub async fn cmd_with_literals(&mut self, parts: &[&[u8]]) -> Vec<String> {
        assert!(
            parts.len() % 2 == 1,
            "parts must be text, literal, text, ..., text"
        );
        let tag = tag_of(parts[0]);
        let mut responses = Vec::new();
        for pair in parts[..parts.len() - 1].chunks(2) {
            let (text, literal) = (pair[0], pair[1]);
            let announced = announced_literal(text)
                .unwrap_or_else(|| panic!("text before a literal must end with {{n}}: {text:?}"));
            assert_eq!(
                announced.0,
                literal.len(),
                "announced literal size does not match its contents"
            );
            self.send(&[text, b"\r\n"].concat()).await;
            if !announced.1 {
                loop {
                    let r = self.read_response().await;
                    let done = r.starts_with('+');
                    let tagged = is_tagged(&r, &tag);
                    responses.push(r);
                    if done {
                        break;
                    }
                    if tagged {
                        return responses;
                    }
                }
            }
            self.send(literal).await;
        }
        self.send(&[parts[parts.len() - 1], b"\r\n"].concat()).await;
        responses.extend(self.read_until_tagged(&tag).await);
        responses
    }

    /// `APPEND mailbox {n}` + `message`; panics unless OK. Returns the responses.
    pub async fn append(&mut self, tag: &str, mailbox: &str, message: &[u8]) -> Vec<String> {
        let head = format!("{tag} APPEND {} {{{}}}", quote(mailbox), message.len());
        let r = self
            .cmd_with_literals(&[head.as_bytes(), message, b""])
            .await;
        assert_tagged(&r, tag, "OK");
        r
    }

    /// Reads responses until the tagged one with `tag` (included, last).
    pub async fn read_until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let r = self.read_response().await;
            let done = is_tagged(&r, tag);
            out.push(r);
            if done {
                return out;
            }
        }
    }

    /// Reads responses until the tagged one for `tag`, the end of the connection, or `limit`,
    /// whichever comes first, and never panics: for hostile exchanges, where the test wants
    /// to look at what the server did whatever the client got. Bytes of an unfinished
    /// response are returned as a last element. Check [`Client::is_closed`] for the end.
    pub async fn collect_until(&mut self, tag: &str, limit: Duration) -> Vec<String> {
        let end = tokio::time::Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            while let Some(r) = self.buffered_response() {
                let r = String::from_utf8_lossy(&r).into_owned();
                let done = is_tagged(&r, tag);
                out.push(r);
                if done {
                    return out;
                }
            }
            let more = if self.eof {
                None
            } else {
                tokio::time::timeout_at(end, self.read_some()).await.ok()
            };
            if !matches!(more, Some(n) if n > 0) {
                if !self.buf.is_empty() {
                    out.push(String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned());
                }
                return out;
            }
        }
    }

    /// One whole response taken from the buffer, if one is there (no read).
    fn buffered_response(&mut self) -> Option<Vec<u8>> {
        let mut scanned = 0;
        loop {
            let line_end = scanned + find_crlf(&self.buf[scanned..])?;
            match announced_literal(&self.buf[..line_end]) {
                Some((n, _)) => {
                    let needed = line_end + 2 + n;
                    if self.buf.len() < needed {
                        return None;
                    }
                    scanned = needed;
                }
                None => {
                    let mut response: Vec<u8> = self.buf.drain(..line_end + 2).collect();
                    response.truncate(line_end);
                    return Some(response);
                }
            }
        }
    }

    /// Reads one whole response (literals included), without its final CRLF.
    pub async fn read_response(&mut self) -> String {
        String::from_utf8_lossy(&self.read_response_bytes().await).into_owned()
    }

    /// Reads one whole response as bytes (literals included), without its final CRLF.
    pub async fn read_response_bytes(&mut self) -> Vec<u8> {
        let mut scanned = 0;
        loop {
            // Find the end of the current physical line.
            match find_crlf(&self.buf[scanned..]) {
                Some(i) => {
                    let line_end = scanned + i;
                    match announced_literal(&self.buf[..line_end]) {
                        Some((n, _)) => {
                            let needed = line_end + 2 + n;
                            while self.buf.len() < needed {
                                self.fill("the rest of a literal").await;
                            }
                            scanned = needed;
                        }
                        None => {
                            let mut response: Vec<u8> = self.buf.drain(..line_end + 2).collect();
                            response.truncate(line_end);
                            return response;
                        }
                    }
                }
                None => {
                    scanned = self.buf.len().saturating_sub(1).max(scanned);
                    self.fill("a response").await;
                }
            }
        }
    }

    /// Whatever arrives until nothing more comes for `quiet` (or the connection ends),
    /// buffered bytes included.
    pub async fn read_raw(&mut self, quiet: Duration) -> Vec<u8> {
        loop {
            if self.eof {
                break;
            }
            match tokio::time::timeout(quiet, self.read_some()).await {
                Ok(0) => break,
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        std::mem::take(&mut self.buf)
    }

    /// Panics if any byte arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let got = self.read_raw(wait).await;
        assert!(
            got.is_empty(),
            "expected silence, got {:?}",
            String::from_utf8_lossy(&got)
        );
    }

    /// Reads until the server closes the connection (within the timeout) and returns what
    /// came before the end (e.g. a `* BYE`). A TLS connection closed without close_notify,
    /// or reset, counts as closed.
    pub async fn expect_closed(&mut self) -> Vec<u8> {
        while !self.eof {
            self.fill("the end of the connection").await;
        }
        std::mem::take(&mut self.buf)
    }

    /// True once the server has closed the connection (as seen by a read).
    pub fn is_closed(&self) -> bool {
        self.eof
    }

    /// Sends `LOGOUT` and expects `* BYE` and the tagged OK.
    pub async fn logout(&mut self) {
        let r = self.ok("zz LOGOUT").await;
        assert!(
            r.iter().any(|l| l.starts_with("* BYE")),
            "no BYE on LOGOUT: {r:?}"
        );
    }

    /// Half-closes or closes the connection (TLS: sends close_notify).
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.stream.as_mut() {
            let _ = tokio::time::timeout(self.timeout, s.shutdown()).await;
        }
    }

    /// Takes the underlying stream (for tests that need raw control), with any bytes
    /// already read but not consumed.
    pub fn into_inner(mut self) -> (Stream, Vec<u8>) {
        let s = self.stream.take().expect("connection gone");
        (s, std::mem::take(&mut self.buf))
    }

    fn stream_mut(&mut self) -> &mut Stream {
        self.stream.as_mut().expect("connection gone")
    }

    /// One read into the buffer; 0 at the end of the stream.
    async fn read_some(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let peer = self.peer;
        let n = match self.stream_mut().read(&mut chunk).await {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                0
            }
            Err(e) => panic!("read from {peer}: {e}"),
        };
        if n == 0 {
            self.eof = true;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads more bytes or panics (timeout, or end of stream while `what` was expected).
    async fn fill(&mut self, what: &str) {
        if self.eof {
            panic!(
                "connection to {} closed while waiting for {what}; unread: {:?}",
                self.peer,
                String::from_utf8_lossy(&self.buf)
            );
        }
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.read_some()).await {
            Ok(n) if n > 0 => {}
            Ok(_) if what == "the end of the connection" => {}
            Ok(_) => panic!(
                "connection to {} closed while waiting for {what}; unread: {:?}",
                self.peer,
                String::from_utf8_lossy(&self.buf)
            ),
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what} from {}; unread: {:?}",
                self.peer,
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }
}

/// The first word of a command line.
pub fn tag_of(line: &[u8]) -> String {
    let end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(line.len());
    String::from_utf8_lossy(&line[..end]).into_owned()
}

/// True if `response` is the tagged response for `tag`.
pub fn is_tagged(response: &str, tag: &str) -> bool {
    response.len() > tag.len()
        && response.starts_with(tag)
        && response.as_bytes()[tag.len()] == b' '
}

/// Panics unless the last response is `{tag} {status} ...`.
pub fn assert_tagged(responses: &[String], tag: &str, status: &str) {
    let last = responses.last().map(String::as_str).unwrap_or("");
    let want = format!("{tag} {status}");
    assert!(
        last.len() >= want.len()
            && last[..want.len()].eq_ignore_ascii_case(&want)
            && matches!(last.as_bytes().get(want.len()), None | Some(b' ')),
        "expected {want:?}, got:\n{}",
        responses.join("\n")
    );
}

/// An IMAP quoted string (panics on CR/LF, which need a literal).
pub fn quote(s: &str) -> String {
    assert!(!s.contains(['\r', '\n']), "cannot quote CR/LF: {s:?}");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The capabilities listed in responses (from `* CAPABILITY ...` or `[CAPABILITY ...]`),
/// upper-cased.
pub fn capabilities(responses: &[String]) -> Vec<String> {
    let mut caps = Vec::new();
    for r in responses {
        let list = if let Some(rest) = r.strip_prefix("* CAPABILITY ") {
            rest
        } else if let Some(start) = r.find("[CAPABILITY ") {
            let rest = &r[start + "[CAPABILITY ".len()..];
            &rest[..rest.find(']').unwrap_or(rest.len())]
        } else {
            continue;
        };
        caps.extend(list.split_whitespace().map(|c| c.to_ascii_uppercase()));
    }
    caps
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

/// `(n, non_synchronizing)` if `line` (without CRLF) ends with `{n}` or `{n+}`.
fn announced_literal(line: &[u8]) -> Option<(usize, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let non_sync = digits.ends_with(b"+");
    if non_sync {
        digits = &digits[..digits.len() - 1];
    }
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((std::str::from_utf8(digits).ok()?.parse().ok()?, non_sync))
}

/// The mailbox names of `* LIST` / `* LSUB` responses (quotes removed).
pub fn list_names(responses: &[String]) -> Vec<String> {
    responses
        .iter()
        .filter(|l| l.starts_with("* LIST ") || l.starts_with("* LSUB "))
        .map(|l| {
            let after_flags = l.split_once(") ").map_or("", |x| x.1);
            let name = after_flags.split_once(' ').map_or("", |x| x.1);
            name.trim_matches('"').to_string()
        })
        .collect()
}
