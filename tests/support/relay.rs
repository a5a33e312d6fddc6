//! A recording TCP relay for tests: it sits between imapgate and its upstream (point
//! imapgate's `upstream.address` at [`Relay::addr`]) and keeps every byte of both directions
//! of every connection, in the order it saw them, so a failing test can show exactly what
//! imapgate sent upstream and what the upstream answered.
//!
//! ```ignore
//! let relay = Relay::start(dc.addr()).await;           // 127.0.0.1, a port picked by the OS
//! config.upstream.address = relay.addr().to_string();
//! // ... a session through imapgate ...
//! let rec = relay.connection(0).expect("one upstream connection");
//! relay.wait_closed(0, Duration::from_secs(3)).await;
//! for e in rec.lock().unwrap().events.iter() { /* e.dir, e.bytes, e.at */ }
//! ```
//!
//! Each chunk is recorded before it is forwarded, so causality holds in the recording: an
//! answer of the upstream is always recorded before whatever imapgate sent because of it.
//! The relay does nothing else to the bytes (no delays, no splitting).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Which way a chunk went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the relay's client (imapgate) to the upstream.
    ToUpstream,
    /// From the upstream to the relay's client.
    ToClient,
}

/// One chunk as read from one side (or the end of that side: empty `bytes`, `eof` set).
#[derive(Clone, Debug)]
pub struct Chunk {
    pub at: Instant,
    pub dir: Dir,
    pub bytes: Vec<u8>,
    pub eof: bool,
    /// Why the side ended, when it was not a clean EOF (a reset, for example).
    pub error: Option<String>,
}

/// Everything one relayed connection carried.
#[derive(Debug)]
pub struct Recording {
    /// The address of the relay's client (imapgate's upstream socket).
    pub client: SocketAddr,
    /// The relay's own address on the upstream connection: the upstream sees this port as
    /// the remote port (Dovecot's `%{rport}`).
    pub upstream_local: Option<SocketAddr>,
    pub events: Vec<Chunk>,
    /// Both directions have ended.
    pub closed: bool,
    /// Connecting to the upstream failed (the client connection was closed at once).
    pub connect_error: Option<String>,
}

impl Recording {
    /// All bytes of one direction, concatenated.
    pub fn bytes(&self, dir: Dir) -> Vec<u8> {
        self.events
            .iter()
            .filter(|e| e.dir == dir)
            .flat_map(|e| e.bytes.iter().copied())
            .collect()
    }
}

/// The relay: an accept loop on 127.0.0.1 and two pumps per connection.
pub struct Relay {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<Arc<Mutex<Recording>>>>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on 127.0.0.1 (port 0) and relays every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay on 127.0.0.1:0");
        let addr = listener.local_addr().expect("relay address");
        let connections: Arc<Mutex<Vec<Arc<Mutex<Recording>>>>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let list = connections.clone();
        let notify = changed.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, peer)) = listener.accept().await {
                let rec = Arc::new(Mutex::new(Recording {
                    client: peer,
                    upstream_local: None,
                    events: Vec::new(),
                    closed: false,
                    connect_error: None,
                }));
                lock(&list).push(rec.clone());
                notify.notify_waiters();
                tokio::spawn(serve(client, upstream, rec, notify.clone()));
            }
        });
        Relay {
            addr,
            connections,
            changed,
            task,
        }
    }

    /// Where imapgate should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections were accepted so far.
    pub fn count(&self) -> usize {
        lock(&self.connections).len()
    }

    /// The recording of the `i`-th accepted connection.
    pub fn connection(&self, i: usize) -> Option<Arc<Mutex<Recording>>> {
        lock(&self.connections).get(i).cloned()
    }

    /// Waits until connection `i` exists and both its directions have ended, up to `limit`.
    /// Returns whether it did.
    pub async fn wait_closed(&self, i: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if let Some(rec) = self.connection(i)
                && lock(&rec).closed
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    rec: Arc<Mutex<Recording>>,
    notify: Arc<Notify>,
) {
    let server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(e) => {
            let mut r = lock(&rec);
            r.connect_error = Some(e.to_string());
            r.closed = true;
            drop(r);
            notify.notify_waiters();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    lock(&rec).upstream_local = server.local_addr().ok();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, Dir::ToUpstream, rec.clone());
    let down = pump(server_read, client_write, Dir::ToClient, rec.clone());
    tokio::join!(up, down);
    lock(&rec).closed = true;
    notify.notify_waiters();
}

/// Copies one direction, recording each chunk before writing it on. A reset on either side
/// ends the direction like an EOF; the other side's write half is then shut down.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dir: Dir,
    rec: Arc<Mutex<Recording>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, error) = match from.read(&mut buf).await {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e.to_string())),
        };
        lock(&rec).events.push(Chunk {
            at: Instant::now(),
            dir,
            bytes: buf[..n].to_vec(),
            eof: n == 0,
            error,
        });
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
