//! A recording TCP relay between imapgate and its upstream: what the server really received
//! and answered, so a test can assert on it and a failing test can show it.
//!
//! ```ignore
//! let tap = Tap::start(dc.addr()).await;             // 127.0.0.1, a port picked by the OS
//! config.upstream.address = tap.addr().to_string();
//! // ... a session through imapgate ...
//! assert!(!tap.to_upstream_text().contains("LOGIN")); // nothing of it reached Dovecot
//! tap.inject(0, b"zz NOOP\r\n");                      // a hostile network, for the tripwire
//! tap.wait_closed(0, Duration::from_secs(3)).await;
//! tap.refuse(true);                                   // the upstream "goes down": new
//!                                                     // connections are closed at once
//! let rec = tap.recording(0).expect("one upstream connection");
//! for e in &rec.events { /* e.dir, e.bytes, e.at */ }
//! ```
//!
//! Bytes are relayed unchanged in both directions, as they arrive (no delays, no splitting).
//! Each chunk is recorded before it is forwarded, so causality holds in the recording: an
//! answer of the upstream is always recorded before whatever imapgate sent because of it.
//! Bytes the test injects are not recorded, so "what imapgate sent" never includes them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

/// Which way a chunk went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the tap's client (imapgate) to the upstream.
    ToUpstream,
    /// From the upstream to the tap's client.
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
#[derive(Clone, Debug)]
pub struct Recording {
    /// The address of the tap's client (imapgate's upstream socket).
    pub client: SocketAddr,
    /// The tap's own address on the upstream connection: the upstream sees this port as the
    /// remote port (Dovecot's `%{rport}`).
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

/// One accepted connection: its recording, and the way to slip bytes to its upstream.
struct Conn {
    rec: Arc<Mutex<Recording>>,
    inject: mpsc::UnboundedSender<Vec<u8>>,
}

/// The relay; dropping it stops every connection it carries.
pub struct Tap {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
    /// Woken whenever a connection is accepted, records a chunk, or closes.
    changed: Arc<Notify>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    refusing: Arc<AtomicBool>,
}

impl Tap {
    /// Listens on 127.0.0.1 (a port picked by the OS) and relays each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the tap on 127.0.0.1:0");
        let addr = listener.local_addr().expect("tap address");
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let refusing = Arc::new(AtomicBool::new(false));
        let (list, notify, spawned) = (conns.clone(), changed.clone(), tasks.clone());
        let refuse = refusing.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, peer)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let rec = Arc::new(Mutex::new(Recording {
                    client: peer,
                    upstream_local: None,
                    events: Vec::new(),
                    closed: false,
                    connect_error: None,
                }));
                let (tx, rx) = mpsc::unbounded_channel();
                lock(&list).push(Conn {
                    rec: rec.clone(),
                    inject: tx,
                });
                notify.notify_waiters();
                let task = tokio::spawn(serve(client, upstream, rec, rx, notify.clone()));
                lock(&spawned).push(task);
            }
        });
        lock(&tasks).push(accept);
        Tap {
            addr,
            conns,
            changed,
            tasks,
            refusing,
        }
    }

    /// While `true`, new connections are closed as soon as they are accepted, without a
    /// byte and without being recorded: to the tap's client the upstream is down (on the same
    /// address, which a stopped server could not promise to come back on). Connections
    /// already relayed go on.
    pub fn refuse(&self, refuse: bool) {
        self.refusing.store(refuse, Ordering::SeqCst);
    }

    /// Where imapgate should connect instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far (in accept order, 0 = the first).
    pub fn connections(&self) -> usize {
        lock(&self.conns).len()
    }

    /// A snapshot of what connection `i` carried so far.
    pub fn recording(&self, i: usize) -> Option<Recording> {
        lock(&self.conns).get(i).map(|c| lock(&c.rec).clone())
    }

    /// What imapgate sent the server on connection `i`.
    pub fn to_upstream(&self, i: usize) -> Vec<u8> {
        self.bytes(i, Dir::ToUpstream)
    }

    /// What the server sent imapgate on connection `i`.
    pub fn to_client(&self, i: usize) -> Vec<u8> {
        self.bytes(i, Dir::ToClient)
    }

    /// Everything imapgate sent the server on all connections, as lossy text (connections
    /// separated by a line `--- connection N ---`).
    pub fn to_upstream_text(&self) -> String {
        self.text(Dir::ToUpstream)
    }

    /// Everything the server sent on all connections, as lossy text.
    pub fn to_client_text(&self) -> String {
        self.text(Dir::ToClient)
    }

    /// Sends `bytes` to the server on connection `i`, as if imapgate had sent them.
    pub fn inject(&self, i: usize, bytes: &[u8]) {
        let conns = lock(&self.conns);
        let conn = conns
            .get(i)
            .unwrap_or_else(|| panic!("no tap connection {i}"));
        conn.inject
            .send(bytes.to_vec())
            .expect("tap connection gone");
    }

    /// Waits (up to `limit`) until what the server sent on connection `i` satisfies `done`;
    /// panics, showing what it did send, if it never does.
    pub async fn wait_to_client(&self, i: usize, limit: Duration, done: impl Fn(&str) -> bool) {
        let seen = self
            .wait_for(i, limit, |r| {
                done(&String::from_utf8_lossy(&r.bytes(Dir::ToClient)))
            })
            .await;
        assert!(
            seen,
            "the server never sent what was awaited on tap connection {i}; it sent:\n{}",
            self.to_client_text()
        );
    }

    /// Waits (up to `limit`) until connection `i` exists and both its directions have ended.
    /// Returns whether it did.
    pub async fn wait_closed(&self, i: usize, limit: Duration) -> bool {
        self.wait_for(i, limit, |r| r.closed).await
    }

    /// Waits (up to `limit`) until connection `i` exists and its recording satisfies `done`,
    /// looking again whenever the recordings change. Returns whether it did.
    async fn wait_for(&self, i: usize, limit: Duration, done: impl Fn(&Recording) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Taken before looking, so a change between the look and the wait still wakes us.
            let changed = self.changed.notified();
            if lock(&self.conns)
                .get(i)
                .is_some_and(|c| done(&lock(&c.rec)))
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    fn bytes(&self, i: usize, dir: Dir) -> Vec<u8> {
        let conns = lock(&self.conns);
        let conn = conns
            .get(i)
            .unwrap_or_else(|| panic!("no tap connection {i}"));
        lock(&conn.rec).bytes(dir)
    }

    fn text(&self, dir: Dir) -> String {
        let conns = lock(&self.conns);
        let mut out = String::new();
        for (i, c) in conns.iter().enumerate() {
            out.push_str(&format!("--- connection {i} ---\n"));
            out.push_str(&String::from_utf8_lossy(&lock(&c.rec).bytes(dir)));
        }
        out
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

/// A test that panicked while holding a lock must not hide what was recorded.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    rec: Arc<Mutex<Recording>>,
    inject: mpsc::UnboundedReceiver<Vec<u8>>,
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
    let up = pump(
        client_read,
        server_write,
        Dir::ToUpstream,
        Some(inject),
        &rec,
        &notify,
    );
    let down = pump(
        server_read,
        client_write,
        Dir::ToClient,
        None,
        &rec,
        &notify,
    );
    tokio::join!(up, down);
    lock(&rec).closed = true;
    notify.notify_waiters();
}

/// Copies one direction, recording each chunk before writing it on, and writes what the test
/// injects in between. A reset on either side ends the direction like an EOF; the other
/// side's write half is then shut down (a half-close is passed on).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Dir,
    mut inject: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    rec: &Mutex<Recording>,
    notify: &Notify,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            Some(bytes) = injected(&mut inject) => {
                if to.write_all(&bytes).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let (n, error) = match read {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e.to_string())),
        };
        lock(rec).events.push(Chunk {
            at: Instant::now(),
            dir,
            bytes: buf[..n].to_vec(),
            eof: n == 0,
            error,
        });
        notify.notify_waiters();
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The next injected bytes; never, for a direction that takes none.
async fn injected(inject: &mut Option<mpsc::UnboundedReceiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match inject {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
