//! A recording TCP relay between imapgate and its upstream: what the server really received.
//!
//! ```ignore
//! let tap = Tap::start(dc.addr()).await;            // imapgate's upstream is tap.addr()
//! ...
//! assert!(!tap.to_server_text().contains("LOGIN"));  // nothing of it reached Dovecot
//! tap.inject(0, b"zz NOOP\r\n");                     // a hostile network, for the tripwire
//! ```
//!
//! Bytes are relayed unchanged in both directions, as they arrive; each upstream connection
//! (in accept order) keeps what imapgate sent, what the server answered, and what the test
//! injected (kept apart, so "what imapgate sent" never includes the test's own bytes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// One relayed connection.
#[derive(Clone)]
struct Conn {
    to_server: Arc<Mutex<Vec<u8>>>,
    to_client: Arc<Mutex<Vec<u8>>>,
    injected: Arc<Mutex<Vec<u8>>>,
    inject: mpsc::UnboundedSender<Vec<u8>>,
}

/// The relay; dropping it stops every connection it carries.
pub struct Tap {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Tap {
    /// Listens on 127.0.0.1 (a port picked by the OS) and relays each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let addr = listener.local_addr().expect("tap address");
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, t) = (conns.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (tx, rx) = mpsc::unbounded_channel();
                let conn = Conn {
                    to_server: Arc::default(),
                    to_client: Arc::default(),
                    injected: Arc::default(),
                    inject: tx,
                };
                c.lock().unwrap().push(conn.clone());
                let handles = relay(client, server, conn, rx);
                t.lock().unwrap().extend(handles);
            }
        });
        tasks.lock().unwrap().push(accept);
        Tap { addr, conns, tasks }
    }

    /// Where imapgate should connect instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Upstream connections opened so far.
    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// What imapgate sent the server on connection `i` (0 = the first).
    pub fn to_server(&self, i: usize) -> Vec<u8> {
        self.conn(i).to_server.lock().unwrap().clone()
    }

    /// What the server sent imapgate on connection `i`.
    pub fn to_client(&self, i: usize) -> Vec<u8> {
        self.conn(i).to_client.lock().unwrap().clone()
    }

    /// Everything imapgate sent the server on all connections, as lossy text (connections
    /// separated by a line `--- connection N ---`).
    pub fn to_server_text(&self) -> String {
        let conns = self.conns.lock().unwrap().clone();
        let mut out = String::new();
        for (i, c) in conns.iter().enumerate() {
            out.push_str(&format!("--- connection {i} ---\n"));
            out.push_str(&String::from_utf8_lossy(&c.to_server.lock().unwrap()));
        }
        out
    }

    /// Everything the server sent on all connections, as lossy text.
    pub fn to_client_text(&self) -> String {
        let conns = self.conns.lock().unwrap().clone();
        let mut out = String::new();
        for (i, c) in conns.iter().enumerate() {
            out.push_str(&format!("--- connection {i} ---\n"));
            out.push_str(&String::from_utf8_lossy(&c.to_client.lock().unwrap()));
        }
        out
    }

    /// Sends `bytes` to the server on connection `i`, as if imapgate had sent them.
    pub fn inject(&self, i: usize, bytes: &[u8]) {
        let conn = self.conn(i);
        conn.injected.lock().unwrap().extend_from_slice(bytes);
        conn.inject
            .send(bytes.to_vec())
            .expect("tap connection gone");
    }

    /// Waits (up to `limit`) until what the server sent on connection `i` satisfies `done`.
    pub async fn wait_to_client(&self, i: usize, limit: Duration, done: impl Fn(&str) -> bool) {
        let end = Instant::now() + limit;
        loop {
            if self.connections() > i && done(&String::from_utf8_lossy(&self.to_client(i))) {
                return;
            }
            assert!(
                Instant::now() < end,
                "the server never sent what was awaited on tap connection {i}; it sent:\n{}",
                self.to_client_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn conn(&self, i: usize) -> Conn {
        self.conns
            .lock()
            .unwrap()
            .get(i)
            .cloned()
            .unwrap_or_else(|| panic!("no tap connection {i}"))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Two copying tasks; a half-close is passed on, so the server sees the end imapgate sent.
fn relay(
    client: TcpStream,
    server: TcpStream,
    conn: Conn,
    mut inject: mpsc::UnboundedReceiver<Vec<u8>>,
) -> [JoinHandle<()>; 2] {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = conn.clone();
    let to_server = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                n = cr.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        up.to_server.lock().unwrap().extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                },
                Some(bytes) = inject.recv() => {
                    if sw.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sw.shutdown().await;
    });
    let to_client = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    conn.to_client.lock().unwrap().extend_from_slice(&buf[..n]);
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = cw.shutdown().await;
    });
    [to_server, to_client]
}
