//! Plays one generated case against imapgate as a client: writes its steps (cut as the case
//! says), reads every response concurrently, does STARTTLS when the case asks for it, and
//! stops at the answer to the final LOGOUT, at the end of the connection, or at the deadline.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio_rustls::TlsConnector;

use super::generate::{Case, Listener, Step};
use super::wire::{self, Resp};
use crate::support::client::{Stream, tls_config};

/// Where the cases connect.
#[derive(Clone)]
pub struct Endpoints {
    pub starttls: SocketAddr,
    pub implicit: SocketAddr,
    pub ca_pem: String,
}

/// How a case ended on the client's side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The final LOGOUT was answered.
    LogoutAnswered,
    /// The server closed the connection (after a BYE, or not).
    Closed,
    /// Nothing more came before the deadline while the client waited for this.
    Hang(String),
    /// Bytes arrived after STARTTLS's OK, before the TLS handshake.
    PlaintextAfterStarttls(Vec<u8>),
    /// A TLS handshake (implicit, or after STARTTLS's OK) failed.
    TlsFailed(String),
    /// The connection could not be made.
    ConnectFailed(String),
}

/// What the client saw.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    pub responses: Vec<Resp>,
    /// Bytes received after the last whole response.
    pub trailing: Vec<u8>,
    /// What was written, in order, with whether TLS was on.
    pub sent: Vec<(bool, Vec<u8>)>,
    /// When the client's TLS began (at connect for implicit TLS, after STARTTLS otherwise).
    pub tls_at: Option<Instant>,
    /// The client's local port (imapgate's audit log names it as the peer).
    pub local_port: u16,
    pub elapsed: Duration,
}

#[derive(Default)]
struct Received {
    buf: Vec<u8>,
    responses: Vec<Resp>,
    eof: bool,
}

type Shared = Arc<(Mutex<Received>, Notify)>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Received> {
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

struct Conn {
    writer: WriteHalf<Stream>,
    reader: tokio::task::JoinHandle<ReadHalf<Stream>>,
    stop: oneshot::Sender<()>,
    shared: Shared,
}

impl Conn {
    fn new(stream: Stream, shared: Shared) -> Conn {
        let (read, writer) = tokio::io::split(stream);
        let (stop, stopped) = oneshot::channel();
        let reader = tokio::spawn(read_loop(read, shared.clone(), stopped));
        Conn {
            writer,
            reader,
            stop,
            shared,
        }
    }

    /// Stops the reader and gives the stream back whole.
    async fn into_stream(self) -> Option<Stream> {
        let _ = self.stop.send(());
        let read = self.reader.await.ok()?;
        Some(read.unsplit(self.writer))
    }
}

async fn read_loop(
    mut read: ReadHalf<Stream>,
    shared: Shared,
    mut stop: oneshot::Receiver<()>,
) -> ReadHalf<Stream> {
    let mut chunk = vec![0u8; 16 * 1024];
    let mut eof = false;
    loop {
        if eof {
            let _ = (&mut stop).await;
            return read;
        }
        tokio::select! {
            biased;
            _ = &mut stop => return read,
            r = read.read(&mut chunk) => {
                // A reset or a TLS connection closed without close_notify ends it like EOF.
                let n = r.unwrap_or(0);
                let mut rec = lock(&shared);
                if n == 0 {
                    rec.eof = true;
                    eof = true;
                } else {
                    rec.buf.extend_from_slice(&chunk[..n]);
                    let mut buf = std::mem::take(&mut rec.buf);
                    let new = wire::take_responses(&mut buf);
                    rec.buf = buf;
                    rec.responses.extend(new);
                }
                drop(rec);
                shared.1.notify_waiters();
            }
        }
    }
}

/// Waits until `done` holds for what was received, or the deadline; false at the deadline.
async fn wait_for(
    shared: &Shared,
    deadline: tokio::time::Instant,
    done: impl Fn(&Received) -> bool,
) -> bool {
    loop {
        let notified = shared.1.notified();
        if done(&lock(shared)) {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return done(&lock(shared));
        }
    }
}

fn tagged_index(r: &Received, tag: &str, from: usize) -> Option<usize> {
    r.responses
        .iter()
        .skip(from)
        .position(|x| x.is_tagged(tag))
        .map(|i| i + from)
}

async fn tls_handshake(tcp: TcpStream, ca_pem: &str) -> Result<Stream, String> {
    let name = ServerName::try_from("localhost".to_string()).map_err(|e| e.to_string())?;
    TlsConnector::from(tls_config(ca_pem))
        .connect(name, imapgate::net::read_ahead::ReadAhead::new(tcp))
        .await
        .map(|tls| Stream::ClientTls(Box::new(tls)))
        .map_err(|e| e.to_string())
}

/// Plays `case` with `limit` for the whole of it.
pub async fn run(case: &Case, ep: &Endpoints, limit: Duration) -> Outcome {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Outcome {
        end: End::Closed,
        responses: Vec::new(),
        trailing: Vec::new(),
        sent: Vec::new(),
        tls_at: None,
        local_port: 0,
        elapsed: Duration::ZERO,
    };
    let addr = match case.listener {
        Listener::Starttls => ep.starttls,
        Listener::Implicit => ep.implicit,
    };
    let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return finish(out, End::ConnectFailed(e.to_string()), started),
        Err(_) => return finish(out, End::ConnectFailed("timed out".into()), started),
    };
    let _ = tcp.set_nodelay(true);
    out.local_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
    let stream = match case.listener {
        Listener::Starttls => Stream::Plain(tcp),
        Listener::Implicit => {
            match tokio::time::timeout_at(deadline, tls_handshake(tcp, &ep.ca_pem)).await {
                Ok(Ok(s)) => {
                    out.tls_at = Some(Instant::now());
                    s
                }
                Ok(Err(e)) => return finish(out, End::TlsFailed(e), started),
                Err(_) => return finish(out, End::TlsFailed("timed out".into()), started),
            }
        }
    };
    let shared: Shared = Arc::default();
    let conn = Conn::new(stream, shared.clone());
    let (end, conn) = play(case, conn, ep, deadline, &mut out).await;
    if let Some(conn) = conn {
        // Dropping the whole stream closes the connection.
        drop(conn.into_stream().await);
    }
    let rec = lock(&shared);
    out.responses = rec.responses.clone();
    out.trailing = rec.buf.clone();
    drop(rec);
    finish(out, end, started)
}

fn finish(mut out: Outcome, end: End, started: Instant) -> Outcome {
    out.end = end;
    out.elapsed = started.elapsed();
    out
}

/// Runs the steps in order (an honest continuation's steps right after its `+`).
async fn play(
    case: &Case,
    mut conn: Conn,
    ep: &Endpoints,
    deadline: tokio::time::Instant,
    out: &mut Outcome,
) -> (End, Option<Conn>) {
    let mut todo: VecDeque<&Step> = case.steps.iter().collect();
    // How many responses had arrived when the last write began: a "+" before it cannot be
    // the answer to what that write sent.
    let mut mark = 0;
    while let Some(step) = todo.pop_front() {
        if lock(&conn.shared).eof {
            return (End::Closed, Some(conn));
        }
        match step {
            Step::Send { bytes, cuts } => {
                mark = lock(&conn.shared).responses.len();
                let tls = out.tls_at.is_some();
                match write_cut(&mut conn.writer, bytes, cuts, deadline).await {
                    Ok(()) => out.sent.push((tls, bytes.clone())),
                    Err(WriteError::Closed(n)) => {
                        out.sent.push((tls, bytes[..n].to_vec()));
                        return (End::Closed, Some(conn));
                    }
                    Err(WriteError::Timeout(n)) => {
                        out.sent.push((tls, bytes[..n].to_vec()));
                        return (
                            End::Hang("to write (the server stopped reading)".into()),
                            Some(conn),
                        );
                    }
                }
            }
            Step::AwaitTagged { tag } => {
                let ok = wait_for(&conn.shared, deadline, |r| {
                    r.eof || tagged_index(r, tag, 0).is_some()
                })
                .await;
                if !ok {
                    return (End::Hang(format!("the answer to {tag}")), Some(conn));
                }
            }
            Step::AwaitContinuation { tag, then } => {
                let from = mark;
                let ok = wait_for(&conn.shared, deadline, |r| {
                    r.eof
                        || r.responses
                            .iter()
                            .skip(from)
                            .any(|x| x.is_continuation() || x.is_tagged(tag))
                })
                .await;
                if !ok {
                    return (
                        End::Hang(format!("\"+\" or the answer to {tag}")),
                        Some(conn),
                    );
                }
                let first = lock(&conn.shared)
                    .responses
                    .iter()
                    .skip(from)
                    .find(|x| x.is_continuation() || x.is_tagged(tag))
                    .map(Resp::is_continuation);
                if first == Some(true) {
                    for s in then.iter().rev() {
                        todo.push_front(s);
                    }
                }
            }
            Step::StartTls { tag } => {
                mark = lock(&conn.shared).responses.len();
                let line = format!("{tag} STARTTLS\r\n").into_bytes();
                if write_cut(&mut conn.writer, &line, &[], deadline)
                    .await
                    .is_err()
                {
                    return (End::Closed, Some(conn));
                }
                out.sent.push((false, line));
                let ok = wait_for(&conn.shared, deadline, |r| {
                    r.eof || tagged_index(r, tag, mark).is_some()
                })
                .await;
                if !ok {
                    return (
                        End::Hang(format!("the answer to {tag} STARTTLS")),
                        Some(conn),
                    );
                }
                let accepted = {
                    let r = lock(&conn.shared);
                    tagged_index(&r, tag, mark)
                        .is_some_and(|i| r.responses[i].tagged().is_some_and(|(_, s)| s == "OK"))
                };
                if !accepted {
                    continue;
                }
                let shared = conn.shared.clone();
                let Some(stream) = conn.into_stream().await else {
                    return (End::Closed, None);
                };
                // With the reader stopped: whatever came after the OK is plaintext the server
                // sent before the handshake.
                let after: Vec<u8> = {
                    let r = lock(&shared);
                    let i = tagged_index(&r, tag, mark).unwrap_or(r.responses.len());
                    let mut a: Vec<u8> = r.responses[(i + 1).min(r.responses.len())..]
                        .iter()
                        .flat_map(|x| x.raw.iter().copied())
                        .collect();
                    a.extend_from_slice(&r.buf);
                    a
                };
                if !after.is_empty() {
                    return (
                        End::PlaintextAfterStarttls(after),
                        Some(Conn::new(stream, shared)),
                    );
                }
                let Stream::Plain(tcp) = stream else {
                    return (End::TlsFailed("STARTTLS on a TLS connection".into()), None);
                };
                match tokio::time::timeout_at(deadline, tls_handshake(tcp, &ep.ca_pem)).await {
                    Ok(Ok(tls)) => {
                        out.tls_at = Some(Instant::now());
                        conn = Conn::new(tls, shared);
                    }
                    Ok(Err(e)) => return (End::TlsFailed(e), None),
                    Err(_) => return (End::TlsFailed("timed out".into()), None),
                }
            }
            Step::AwaitEnd { tag } => {
                let from = mark;
                let ok = wait_for(&conn.shared, deadline, |r| {
                    r.eof || tagged_index(r, tag, from).is_some()
                })
                .await;
                if !ok {
                    return (
                        End::Hang(format!("the answer to the final {tag} LOGOUT")),
                        Some(conn),
                    );
                }
                let answered = tagged_index(&lock(&conn.shared), tag, from).is_some();
                let end = if answered {
                    End::LogoutAnswered
                } else {
                    End::Closed
                };
                return (end, Some(conn));
            }
        }
    }
    (End::Closed, Some(conn))
}

enum WriteError {
    /// The connection is gone; this many bytes were written.
    Closed(usize),
    /// The deadline passed while writing; this many bytes were written.
    Timeout(usize),
}

/// Writes `bytes` in pieces cut before each offset of `cuts`, each flushed on its own.
async fn write_cut(
    w: &mut WriteHalf<Stream>,
    bytes: &[u8],
    cuts: &[usize],
    deadline: tokio::time::Instant,
) -> Result<(), WriteError> {
    let mut start = 0;
    for end in cuts.iter().copied().chain([bytes.len()]) {
        if end <= start || end > bytes.len() {
            continue;
        }
        let piece = &bytes[start..end];
        let write = async {
            w.write_all(piece).await?;
            w.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(WriteError::Closed(start)),
            Err(_) => return Err(WriteError::Timeout(start)),
        }
        start = end;
        // Lets imapgate's tasks read this piece before the next one is written.
        tokio::task::yield_now().await;
    }
    Ok(())
}
