//! Opening the connection to the upstream IMAP server, up to and including its greeting.
//!
//! Everything here happens before a client command is relayed, so the code reads exactly
//! what it needs and no more: a byte read too far would be lost to the session, and on the
//! STARTTLS path it could be an injected response (CVE-2011-0411 and its many IMAP cousins).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsConnector;

use super::proxy_protocol;
pub use super::proxy_protocol::ClientAddrs;
use super::stream::{Stream, tune};
use super::tls::{self, TlsError};
use super::warm::{Refill, Warm};
use crate::config::{UpstreamConfig, UpstreamTls};
use crate::metrics::UpstreamMetrics;

/// Longest greeting or STARTTLS response line accepted: far above what servers send, low
/// enough that a hostile upstream cannot make us buffer much.
pub const MAX_LINE: usize = 8192;

/// How many untagged lines may come before the STARTTLS completion.
const MAX_STARTTLS_LINES: usize = 32;

/// Our own tag: the session has not started yet, so it cannot clash with a client's.
const STARTTLS_TAG: &[u8] = b"imapgate0";

/// One configured upstream with the TLS client configuration it needs.
#[derive(Debug, Clone)]
pub struct Target {
    pub config: UpstreamConfig,
    pub tls: Option<Arc<ClientConfig>>,
    /// Connections opened ahead (`warm`), when configured and started.
    pub warm: Option<Arc<Warm>>,
    /// Counts which connections sessions got; `None` in tools and tests.
    pub metrics: Option<UpstreamMetrics>,
}

/// A connection for a session, and whether it was opened ahead of it.
#[derive(Debug)]
pub struct Opened {
    pub up: Upstream,
    pub warm: bool,
    /// For a warm connection: drop it once the login it serves has its answer, and the
    /// connection is replaced.
    pub refill: Option<Refill>,
}

impl Target {
    pub fn new(config: UpstreamConfig, tls: Option<Arc<ClientConfig>>) -> Target {
        Target {
            config,
            tls,
            warm: None,
            metrics: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// A connection for a session on behalf of `client`: a warm one when one is ready and
    /// `warm_ok`, else a fresh one ([`Target::connect`]).
    pub async fn open(
        &self,
        client: Option<ClientAddrs>,
        warm_ok: bool,
    ) -> Result<Opened, UpstreamError> {
        let taken = match &self.warm {
            Some(warm) if warm_ok => warm.take(),
            _ => None,
        };
        let opened = match taken {
            Some((up, refill)) => Opened {
                up,
                warm: true,
                refill: Some(refill),
            },
            None => Opened {
                up: self.connect(client).await?,
                warm: false,
                refill: None,
            },
        };
        if let Some(m) = &self.metrics {
            m.session_connected(opened.warm);
        }
        Ok(opened)
    }

    /// Connects, sends the PROXY header if configured (`client`'s addresses; without a
    /// client, a header saying so), reads the greeting and, for STARTTLS, upgrades.
    pub async fn connect(&self, client: Option<ClientAddrs>) -> Result<Upstream, UpstreamError> {
        connect_for(&self.config, self.tls.clone(), client).await
    }
}

/// A ready upstream connection.
#[derive(Debug)]
pub struct Upstream {
    pub stream: Stream,
    /// The greeting line exactly as the server sent it, CRLF included; for STARTTLS the
    /// plaintext greeting before the upgrade. It may be `* PREAUTH`: the session decides.
    pub greeting: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {address}: cannot connect: {source}")]
    Connect { address: String, source: io::Error },
    #[error("upstream {address}: timed out {phase} (upstream.connect_timeout_s)")]
    Timeout {
        address: String,
        phase: &'static str,
    },
    #[error("upstream {address}: tls = \"{mode}\" but no TLS client configuration was given")]
    NoTlsConfig { address: String, mode: &'static str },
    #[error("upstream {address}: {source}")]
    Tls { address: String, source: TlsError },
    #[error("upstream {address}: I/O error {phase}: {source}")]
    Io {
        address: String,
        phase: &'static str,
        source: io::Error,
    },
    #[error("upstream {address}: connection closed {phase}")]
    Closed {
        address: String,
        phase: &'static str,
    },
    #[error("upstream {address}: line longer than {limit} bytes {phase}")]
    LineTooLong {
        address: String,
        phase: &'static str,
        limit: usize,
    },
    #[error("upstream {address}: not an IMAP greeting: {line:?}")]
    Greeting { address: String, line: String },
    #[error("upstream {address}: refused the connection: {line:?}")]
    Bye { address: String, line: String },
    #[error(
        "upstream {address}: greeted with PREAUTH although tls = \"starttls\": STARTTLS is \
         impossible after PREAUTH and continuing in plaintext is not allowed"
    )]
    PreauthWithoutTls { address: String },
    #[error("upstream {address}: STARTTLS refused: {line:?}")]
    StarttlsRefused { address: String, line: String },
    #[error(
        "upstream {address}: unexpected line while waiting for the STARTTLS response: {line:?}"
    )]
    StarttlsUnexpected { address: String, line: String },
    #[error(
        "upstream {address}: data follows the STARTTLS response before the TLS handshake \
         (possible response injection); closing"
    )]
    StarttlsInjection { address: String },
}

/// Connects, negotiates TLS as configured and reads the greeting, all within
/// `cfg.connect_timeout_s`. `tls` must be given when `cfg.tls` is not `none`; it is built
/// once by the caller because loading the system roots per connection would be slow.
pub async fn connect(
    cfg: &UpstreamConfig,
    tls: Option<Arc<ClientConfig>>,
) -> Result<Upstream, UpstreamError> {
    connect_for(cfg, tls, None).await
}

/// [`connect`] on behalf of `client`, whose addresses go in the PROXY header when
/// `cfg.send_proxy` asks for one: written first, before TLS and the greeting.
pub async fn connect_for(
    cfg: &UpstreamConfig,
    tls: Option<Arc<ClientConfig>>,
    client: Option<ClientAddrs>,
) -> Result<Upstream, UpstreamError> {
    let conn = Conn {
        address: &cfg.address,
        deadline: Instant::now() + cfg.connect_timeout(),
    };
    let connector = match (cfg.tls, tls) {
        (UpstreamTls::None, _) => None,
        (_, Some(config)) => Some(TlsConnector::from(config)),
        (mode, None) => {
            return Err(UpstreamError::NoTlsConfig {
                address: cfg.address.clone(),
                mode: match mode {
                    UpstreamTls::Implicit => "implicit",
                    _ => "starttls",
                },
            });
        }
    };
    let mut tcp = conn.tcp().await?;
    let header = proxy_protocol::encode(cfg.send_proxy, client)
        .map_err(|e| conn.io("encoding the PROXY header", e))?;
    if let Some(header) = header {
        conn.send_proxy_header(&mut tcp, &header).await?;
    }
    let server_name = cfg.tls_server_name();
    match (cfg.tls, connector) {
        (UpstreamTls::Implicit, Some(connector)) => {
            let mut stream = conn.handshake(&connector, server_name, tcp).await?;
            let greeting = conn.read_line(&mut stream, "reading the greeting").await?;
            conn.check_greeting(&greeting)?;
            Ok(Upstream { stream, greeting })
        }
        (UpstreamTls::Starttls, Some(connector)) => {
            let mut stream = Stream::Plain(tcp);
            let greeting = conn.read_line(&mut stream, "reading the greeting").await?;
            if conn.check_greeting(&greeting)? == Greeting::Preauth {
                return Err(UpstreamError::PreauthWithoutTls {
                    address: conn.address.to_owned(),
                });
            }
            let tcp = conn.starttls(stream).await?;
            let stream = conn.handshake(&connector, server_name, tcp).await?;
            Ok(Upstream { stream, greeting })
        }
        _ => {
            let mut stream = Stream::Plain(tcp);
            let greeting = conn.read_line(&mut stream, "reading the greeting").await?;
            conn.check_greeting(&greeting)?;
            Ok(Upstream { stream, greeting })
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Greeting {
    Ok,
    Preauth,
}

/// One connection attempt: the address for messages and the deadline for every step.
struct Conn<'a> {
    address: &'a str,
    deadline: Instant,
}

impl Conn<'_> {
    fn timeout(&self, phase: &'static str) -> UpstreamError {
        UpstreamError::Timeout {
            address: self.address.to_owned(),
            phase,
        }
    }

    fn io(&self, phase: &'static str, source: io::Error) -> UpstreamError {
        UpstreamError::Io {
            address: self.address.to_owned(),
            phase,
            source,
        }
    }

    async fn tcp(&self) -> Result<TcpStream, UpstreamError> {
        let tcp = timeout_at(self.deadline, TcpStream::connect(self.address))
            .await
            .map_err(|_| self.timeout("connecting"))?
            .map_err(|source| UpstreamError::Connect {
                address: self.address.to_owned(),
                source,
            })?;
        tune(&tcp);
        Ok(tcp)
    }

    async fn send_proxy_header(
        &self,
        tcp: &mut TcpStream,
        header: &[u8],
    ) -> Result<(), UpstreamError> {
        const PHASE: &str = "sending the PROXY header";
        timeout_at(self.deadline, tcp.write_all(header))
            .await
            .map_err(|_| self.timeout(PHASE))?
            .map_err(|e| self.io(PHASE, e))
    }

    async fn handshake(
        &self,
        connector: &TlsConnector,
        server_name: &str,
        tcp: TcpStream,
    ) -> Result<Stream, UpstreamError> {
        timeout_at(self.deadline, tls::connect(connector, server_name, tcp))
            .await
            .map_err(|_| self.timeout("during the TLS handshake"))?
            .map_err(|source| UpstreamError::Tls {
                address: self.address.to_owned(),
                source,
            })
    }

    fn check_greeting(&self, line: &[u8]) -> Result<Greeting, UpstreamError> {
        let status = untagged_status(line);
        if status.eq_ignore_ascii_case(b"OK") {
            Ok(Greeting::Ok)
        } else if status.eq_ignore_ascii_case(b"PREAUTH") {
            Ok(Greeting::Preauth)
        } else if status.eq_ignore_ascii_case(b"BYE") {
            Err(UpstreamError::Bye {
                address: self.address.to_owned(),
                line: printable(line),
            })
        } else {
            Err(UpstreamError::Greeting {
                address: self.address.to_owned(),
                line: printable(line),
            })
        }
    }

    /// Sends STARTTLS and waits for its tagged OK; gives back the socket, checked to hold
    /// nothing more, ready for the handshake.
    async fn starttls(&self, mut stream: Stream) -> Result<TcpStream, UpstreamError> {
        const PHASE: &str = "waiting for the STARTTLS response";
        let mut command = STARTTLS_TAG.to_vec();
        command.extend_from_slice(b" STARTTLS\r\n");
        timeout_at(self.deadline, stream.write_all(&command))
            .await
            .map_err(|_| self.timeout("sending STARTTLS"))?
            .map_err(|e| self.io("sending STARTTLS", e))?;
        for _ in 0..MAX_STARTTLS_LINES {
            let line = self.read_line(&mut stream, PHASE).await?;
            let unexpected = || UpstreamError::StarttlsUnexpected {
                address: self.address.to_owned(),
                line: printable(&line),
            };
            if let Some(rest) = line
                .strip_prefix(STARTTLS_TAG)
                .and_then(|r| r.strip_prefix(b" "))
            {
                let status = first_word(rest);
                if status.eq_ignore_ascii_case(b"OK") {
                    return self.plain_and_drained(stream).await;
                }
                if status.eq_ignore_ascii_case(b"NO") || status.eq_ignore_ascii_case(b"BAD") {
                    return Err(UpstreamError::StarttlsRefused {
                        address: self.address.to_owned(),
                        line: printable(&line),
                    });
                }
                return Err(unexpected());
            }
            if untagged_status(&line).eq_ignore_ascii_case(b"BYE") {
                return Err(UpstreamError::Bye {
                    address: self.address.to_owned(),
                    line: printable(&line),
                });
            }
            if !line.starts_with(b"* ") {
                return Err(unexpected());
            }
        }
        Err(UpstreamError::StarttlsUnexpected {
            address: self.address.to_owned(),
            line: format!("more than {MAX_STARTTLS_LINES} untagged lines"),
        })
    }

    /// Refuses to go on if anything already follows the tagged OK. Bytes arriving later are
    /// harmless: the TLS handshake reads them as a broken record and fails.
    async fn plain_and_drained(&self, stream: Stream) -> Result<TcpStream, UpstreamError> {
        let Ok(tcp) = stream.into_plain() else {
            return Err(UpstreamError::StarttlsUnexpected {
                address: self.address.to_owned(),
                line: "STARTTLS on a TLS stream".to_owned(),
            });
        };
        let mut probe = [0u8; 1];
        match timeout(Duration::ZERO, tcp.peek(&mut probe)).await {
            Err(_) => Ok(tcp),
            Ok(Ok(0)) => Err(UpstreamError::Closed {
                address: self.address.to_owned(),
                phase: "after the STARTTLS response",
            }),
            Ok(Ok(_)) => Err(UpstreamError::StarttlsInjection {
                address: self.address.to_owned(),
            }),
            Ok(Err(e)) => Err(self.io("after the STARTTLS response", e)),
        }
    }

    /// Reads one line, LF included, without consuming anything after it.
    async fn read_line(
        &self,
        stream: &mut Stream,
        phase: &'static str,
    ) -> Result<Vec<u8>, UpstreamError> {
        let read = async {
            match stream {
                Stream::Plain(tcp) => read_line_plain(tcp).await,
                other => read_line_bytewise(other).await,
            }
        };
        match timeout_at(self.deadline, read).await {
            Err(_) => Err(self.timeout(phase)),
            Ok(Ok(line)) => Ok(line),
            Ok(Err(LineError::Io(e))) => Err(self.io(phase, e)),
            Ok(Err(LineError::Closed)) => Err(UpstreamError::Closed {
                address: self.address.to_owned(),
                phase,
            }),
            Ok(Err(LineError::TooLong)) => Err(UpstreamError::LineTooLong {
                address: self.address.to_owned(),
                phase,
                limit: MAX_LINE,
            }),
        }
    }
}

enum LineError {
    Io(io::Error),
    Closed,
    TooLong,
}

/// Peeks to find the line end, then reads exactly that far: a few system calls per line
/// instead of one per byte, and nothing after the line leaves the kernel's buffer.
async fn read_line_plain(tcp: &mut TcpStream) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::new();
    let mut buf = vec![0u8; MAX_LINE];
    loop {
        let room = MAX_LINE - line.len();
        if room == 0 {
            return Err(LineError::TooLong);
        }
        let n = tcp.peek(&mut buf[..room]).await.map_err(LineError::Io)?;
        if n == 0 {
            return Err(LineError::Closed);
        }
        // Bytes before a line end are ours whatever comes next, so taking them all when
        // there is no LF yet is safe, and it makes the next peek wait for new data.
        let take = memchr::memchr(b'\n', &buf[..n]).map_or(n, |i| i + 1);
        tcp.read_exact(&mut buf[..take])
            .await
            .map_err(LineError::Io)?;
        line.extend_from_slice(&buf[..take]);
        if line.last() == Some(&b'\n') {
            return Ok(line);
        }
    }
}

/// TLS streams cannot be peeked; reading a byte at a time only copies from rustls's
/// already-decrypted buffer, and whatever follows the line stays there for the session.
async fn read_line_bytewise(stream: &mut Stream) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_LINE {
        if stream.read(&mut byte).await.map_err(LineError::Io)? == 0 {
            return Err(LineError::Closed);
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(line);
        }
    }
    Err(LineError::TooLong)
}

/// The word after `* ` (`OK`, `BYE`, ...), or empty when the line is not untagged.
fn untagged_status(line: &[u8]) -> &[u8] {
    line.strip_prefix(b"* ").map_or(&[], first_word)
}

fn first_word(text: &[u8]) -> &[u8] {
    let end = text
        .iter()
        .position(|b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(text.len());
    &text[..end]
}

/// A server line made safe for a log or an error message: no line ends, no control
/// characters, bounded length.
fn printable(line: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::net::SocketAddr;

    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::config::SendProxy;
    use crate::net::tls::test_pki::TestPki;

    /// Plays a server for one connection.
    async fn serve<F, Fut>(script: F) -> (SocketAddr, JoinHandle<()>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            script(tcp).await;
        });
        (addr, task)
    }

    fn cfg(addr: SocketAddr, tls: UpstreamTls) -> UpstreamConfig {
        UpstreamConfig {
            address: addr.to_string(),
            tls,
            server_name: Some("localhost".to_owned()),
            connect_timeout_s: 5,
            ..UpstreamConfig::default()
        }
    }

    async fn read_exactly(stream: &mut (impl AsyncReadExt + Unpin), n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn plain_greeting_is_returned_and_nothing_after_it_is_consumed() {
        let (addr, server) = serve(|mut tcp| async move {
            tcp.write_all(b"* OK [CAPABILITY IMAP4rev1] ready\r\n* 1 EXISTS\r\n")
                .await
                .unwrap();
            assert_eq!(read_exactly(&mut tcp, 8).await, b"a NOOP\r\n");
        })
        .await;
        let mut up = connect(&cfg(addr, UpstreamTls::None), None).await.unwrap();
        assert_eq!(up.greeting, b"* OK [CAPABILITY IMAP4rev1] ready\r\n");
        assert!(!up.stream.is_tls());
        assert!(up.stream.tcp().nodelay().unwrap());
        assert_eq!(read_exactly(&mut up.stream, 12).await, b"* 1 EXISTS\r\n");
        up.stream.write_all(b"a NOOP\r\n").await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn greeting_split_over_several_segments() {
        let (addr, _server) = serve(|mut tcp| async move {
            tcp.write_all(b"* OK hel").await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            tcp.write_all(b"lo\r").await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            tcp.write_all(b"\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        })
        .await;
        let up = connect(&cfg(addr, UpstreamTls::None), None).await.unwrap();
        assert_eq!(up.greeting, b"* OK hello\r\n");
    }

    #[tokio::test]
    async fn preauth_greeting_is_returned_as_is() {
        let (addr, _server) = serve(|mut tcp| async move {
            tcp.write_all(b"* preauth welcome\r\n").await.unwrap();
        })
        .await;
        let up = connect(&cfg(addr, UpstreamTls::None), None).await.unwrap();
        assert_eq!(up.greeting, b"* preauth welcome\r\n");
    }

    #[tokio::test]
    async fn bye_greeting_is_an_error_with_its_text() {
        let (addr, _server) = serve(|mut tcp| async move {
            tcp.write_all(b"* BYE too many connections\r\n")
                .await
                .unwrap();
        })
        .await;
        let err = connect(&cfg(addr, UpstreamTls::None), None)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Bye { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains("too many connections"), "{msg}");
    }

    #[tokio::test]
    async fn garbage_greeting_is_an_error() {
        let (addr, _server) = serve(|mut tcp| async move {
            tcp.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        })
        .await;
        let err = connect(&cfg(addr, UpstreamTls::None), None)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Greeting { .. }), "{err}");
    }

    #[tokio::test]
    async fn overlong_greeting_is_an_error() {
        let (addr, _server) = serve(|mut tcp| async move {
            let _ = tcp.write_all(&vec![b'x'; MAX_LINE + 10]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        })
        .await;
        let err = connect(&cfg(addr, UpstreamTls::None), None)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::LineTooLong { .. }), "{err}");
    }

    #[tokio::test]
    async fn closed_before_greeting() {
        let (addr, _server) = serve(|tcp| async move { drop(tcp) }).await;
        let err = connect(&cfg(addr, UpstreamTls::None), None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::Closed { .. } | UpstreamError::Io { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn refused_connection_names_the_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = connect(&cfg(addr, UpstreamTls::None), None)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let (addr, _server) = serve(|tcp| async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(tcp);
        })
        .await;
        let mut config = cfg(addr, UpstreamTls::None);
        config.connect_timeout_s = 1;
        let started = Instant::now();
        let err = connect(&config, None).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("greeting"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn tls_mode_without_tls_config_is_an_error() {
        let config = cfg("127.0.0.1:1".parse().unwrap(), UpstreamTls::Implicit);
        let err = connect(&config, None).await.unwrap_err();
        assert!(matches!(err, UpstreamError::NoTlsConfig { .. }), "{err}");
    }

    /// Plays an IMAP server with implicit TLS.
    async fn implicit_server(pki: &TestPki) -> SocketAddr {
        let acceptor =
            TlsAcceptor::from(tls::server_config(Some(&pki.cert), Some(&pki.key)).unwrap());
        let (addr, _server) = serve(move |tcp| async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            tls.write_all(b"* OK tls ready\r\n* 2 EXISTS\r\n")
                .await
                .unwrap();
            tls.flush().await.unwrap();
            let _ = read_exactly(&mut tls, 1).await;
        })
        .await;
        addr
    }

    #[tokio::test]
    async fn implicit_tls_reads_the_greeting_and_keeps_what_follows() {
        let pki = TestPki::new();
        let addr = implicit_server(&pki).await;
        let client = tls::client_config(Some(&pki.ca), true).unwrap();
        let mut up = connect(&cfg(addr, UpstreamTls::Implicit), Some(client))
            .await
            .unwrap();
        assert_eq!(up.greeting, b"* OK tls ready\r\n");
        assert_eq!(up.stream.alpn(), Some(tls::ALPN_IMAP));
        assert_eq!(read_exactly(&mut up.stream, 12).await, b"* 2 EXISTS\r\n");
    }

    #[tokio::test]
    async fn implicit_tls_with_untrusted_certificate_fails() {
        let pki = TestPki::new();
        let other = TestPki::new();
        let addr = implicit_server(&pki).await;
        let client = tls::client_config(Some(&other.ca), true).unwrap();
        let err = connect(&cfg(addr, UpstreamTls::Implicit), Some(client))
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Tls { .. }), "{err}");
    }

    /// Plays a STARTTLS server that answers STARTTLS with `answer`, then, if `tls`, does the
    /// handshake and greets over TLS.
    async fn starttls_server(
        pki: &TestPki,
        greeting: &'static [u8],
        answer: &'static [u8],
    ) -> SocketAddr {
        let acceptor =
            TlsAcceptor::from(tls::server_config(Some(&pki.cert), Some(&pki.key)).unwrap());
        let (addr, _server) = serve(move |mut tcp| async move {
            tcp.write_all(greeting).await.unwrap();
            let mut command = vec![0u8; 20];
            if tcp.read_exact(&mut command).await.is_err() {
                return;
            }
            assert_eq!(command, b"imapgate0 STARTTLS\r\n");
            tcp.write_all(answer).await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            tls.write_all(b"after\r\n").await.unwrap();
            tls.flush().await.unwrap();
            let _ = read_exactly(&mut tls, 1).await;
        })
        .await;
        addr
    }

    #[tokio::test]
    async fn starttls_upgrades_and_returns_the_plaintext_greeting() {
        let pki = TestPki::new();
        let addr = starttls_server(
            &pki,
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n",
            b"* OK still plaintext\r\nimapgate0 OK Begin TLS now\r\n",
        )
        .await;
        let client = tls::client_config(Some(&pki.ca), true).unwrap();
        let mut up = connect(&cfg(addr, UpstreamTls::Starttls), Some(client))
            .await
            .unwrap();
        assert_eq!(up.greeting, b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n");
        assert!(up.stream.is_tls());
        assert_eq!(read_exactly(&mut up.stream, 7).await, b"after\r\n");
    }

    #[tokio::test]
    async fn starttls_refusal_is_an_error() {
        let pki = TestPki::new();
        let addr =
            starttls_server(&pki, b"* OK hi\r\n", b"imapgate0 NO [UNAVAILABLE] nope\r\n").await;
        let client = tls::client_config(Some(&pki.ca), true).unwrap();
        let err = connect(&cfg(addr, UpstreamTls::Starttls), Some(client))
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::StarttlsRefused { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn bytes_after_the_starttls_ok_are_an_injection() {
        let pki = TestPki::new();
        let addr = starttls_server(
            &pki,
            b"* OK hi\r\n",
            b"imapgate0 OK go\r\n* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n",
        )
        .await;
        let client = tls::client_config(Some(&pki.ca), true).unwrap();
        let err = connect(&cfg(addr, UpstreamTls::Starttls), Some(client))
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::StarttlsInjection { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn preauth_before_starttls_is_refused() {
        let pki = TestPki::new();
        let addr = starttls_server(&pki, b"* PREAUTH hi\r\n", b"").await;
        let client = tls::client_config(Some(&pki.ca), true).unwrap();
        let err = connect(&cfg(addr, UpstreamTls::Starttls), Some(client))
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::PreauthWithoutTls { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn continuation_instead_of_starttls_answer_is_unexpected() {
        let pki = TestPki::new();
        let addr = starttls_server(&pki, b"* OK hi\r\n", b"+ go ahead\r\n").await;
        let client = tls::client_config(Some(&pki.ca), true).unwrap();
        let err = connect(&cfg(addr, UpstreamTls::Starttls), Some(client))
            .await
            .unwrap_err();
        assert!(
            matches!(err, UpstreamError::StarttlsUnexpected { .. }),
            "{err}"
        );
    }

    fn documentation_client() -> ClientAddrs {
        ClientAddrs {
            source: "203.0.113.7:4242".parse().unwrap(),
            destination: "192.0.2.1:993".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn the_proxy_header_comes_before_anything_else() {
        const HEADER: &[u8] = b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 993\r\n";
        let (addr, server) = serve(|mut tcp| async move {
            assert_eq!(read_exactly(&mut tcp, HEADER.len()).await, HEADER);
            tcp.write_all(b"* OK hi\r\n").await.unwrap();
            assert_eq!(read_exactly(&mut tcp, 8).await, b"a NOOP\r\n");
        })
        .await;
        let mut config = cfg(addr, UpstreamTls::None);
        config.send_proxy = SendProxy::V1;
        let mut up = connect_for(&config, None, Some(documentation_client()))
            .await
            .unwrap();
        assert_eq!(up.greeting, b"* OK hi\r\n");
        up.stream.write_all(b"a NOOP\r\n").await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_proxy_header_precedes_the_tls_handshake() {
        let pki = TestPki::new();
        let acceptor =
            TlsAcceptor::from(tls::server_config(Some(&pki.cert), Some(&pki.key)).unwrap());
        let (addr, server) = serve(move |mut tcp| async move {
            let header = read_exactly(&mut tcp, 28).await;
            assert_eq!(
                header,
                proxy_protocol::encode(SendProxy::V2, Some(documentation_client()))
                    .unwrap()
                    .unwrap()
            );
            let mut tls = acceptor.accept(tcp).await.unwrap();
            tls.write_all(b"* OK tls\r\n").await.unwrap();
            tls.flush().await.unwrap();
            let _ = read_exactly(&mut tls, 1).await;
        })
        .await;
        let mut config = cfg(addr, UpstreamTls::Implicit);
        config.send_proxy = SendProxy::V2;
        let client = tls::client_config(Some(&pki.ca), true).unwrap();
        let mut up = connect_for(&config, Some(client), Some(documentation_client()))
            .await
            .unwrap();
        assert_eq!(up.greeting, b"* OK tls\r\n");
        up.stream.write_all(b"x").await.unwrap();
        up.stream.flush().await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn without_a_client_the_header_says_local() {
        let (addr, server) = serve(|mut tcp| async move {
            assert_eq!(read_exactly(&mut tcp, 15).await, b"PROXY UNKNOWN\r\n");
            tcp.write_all(b"* OK hi\r\n").await.unwrap();
        })
        .await;
        let mut config = cfg(addr, UpstreamTls::None);
        config.send_proxy = SendProxy::V1;
        let up = connect(&config, None).await.unwrap();
        assert_eq!(up.greeting, b"* OK hi\r\n");
        server.await.unwrap();
    }

    #[test]
    fn printable_strips_controls_and_bounds_length() {
        assert_eq!(printable(b"* BYE a\x1bb\r\n"), "* BYE a\u{fffd}b");
        assert_eq!(printable(&[b'x'; 300]).chars().count(), 201);
    }
}
