//! Warm upstream connections: opened, secured and greeted before the sessions that take them.
//!
//! A routed login otherwise waits, after its credentials arrive, for a TCP connect, perhaps a
//! full TLS handshake and the server's greeting before it can replay them; with
//! `[[upstream]] warm = N` that work is done ahead, by one keeper task per upstream.
//!
//! Why a warm connection is as good as a fresh one: it has seen nothing of any client. No PROXY
//! header (the configuration refuses `warm` with `send_proxy`), no command; the session sends
//! its ID (`forward_id`) and replays the login on it exactly as on a fresh connection. Before
//! a command the server has nothing to say, so a connection with anything to read (EOF, a
//! BYE, a TLS alert) when it is taken was closed by the server and is thrown away; one older
//! than `warm_max_age_s` is closed unused, before the server's pre-login idle timeout could
//! close it under a session.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::Stream;
use super::upstream::{Target, Upstream};
use crate::metrics::UpstreamMetrics;

/// First wait after a failed connect; doubled on each failure in a row, up to
/// [`MAX_BACKOFF`]. Health probes say whether the upstream is down; this only keeps a dead
/// upstream from being hammered.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long a closing warm connection's LOGOUT may take.
const GOODBYE: Duration = Duration::from_secs(1);

/// The goodbye of a connection closed unused, so the server logs a logout, not a lost
/// connection. Our own tag: no session ever used the connection.
const LOGOUT: &[u8] = b"imapgate-warm LOGOUT\r\n";

/// The warm connections of one upstream.
pub struct Warm {
    ready: Mutex<VecDeque<Ready>>,
    want: usize,
    max_age: Duration,
    /// Wakes the keeper when a connection was taken.
    taken: Notify,
    metrics: Option<UpstreamMetrics>,
}

struct Ready {
    since: Instant,
    up: Upstream,
}

/// Wakes the keeper when dropped: the connection taken with it may be replaced now.
#[derive(Debug)]
pub struct Refill(Arc<Warm>);

impl Drop for Refill {
    fn drop(&mut self) {
        self.0.taken.notify_one();
    }
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm")
            .field("want", &self.want)
            .field("ready", &self.lock().len())
            .finish()
    }
}

impl Warm {
    pub fn new(want: usize, max_age: Duration, metrics: Option<UpstreamMetrics>) -> Arc<Warm> {
        Arc::new(Warm {
            ready: Mutex::new(VecDeque::with_capacity(want)),
            want,
            max_age,
            taken: Notify::new(),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Ready>> {
        // A panic while holding the lock leaves a plain queue behind: still usable.
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, ready: usize) {
        if let Some(m) = &self.metrics {
            m.set_warm(ready);
        }
    }

    /// The oldest live connection that has not expired, if any; never waits. It is replaced
    /// in the background once the [`Refill`] that comes with it is dropped: after the login
    /// it serves, whose answer would otherwise wait behind the replacement's handshake on the
    /// same server (Dovecot's login processes serve many connections each).
    pub fn take(self: &Arc<Self>) -> Option<(Upstream, Refill)> {
        let found = loop {
            let next = self.lock().pop_front();
            let Some(mut ready) = next else { break None };
            if ready.since.elapsed() < self.max_age && untouched(&mut ready.up.stream) {
                break Some(ready.up);
            }
        };
        self.publish(self.lock().len());
        match found {
            Some(up) => Some((up, Refill(self.clone()))),
            None => {
                // Nothing ready: the keeper should hurry.
                self.taken.notify_one();
                None
            }
        }
    }

    /// Keeps `want` connections to `target` ready, until the task is aborted.
    pub async fn keep(self: Arc<Self>, target: Target) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let (expired, missing, oldest) = self.prune();
            for ready in expired {
                goodbye(ready.up.stream).await;
            }
            if missing > 0 {
                match target.connect(None).await {
                    Ok(up) => {
                        backoff = MIN_BACKOFF;
                        let mut ready = self.lock();
                        ready.push_back(Ready {
                            since: Instant::now(),
                            up,
                        });
                        let n = ready.len();
                        drop(ready);
                        self.publish(n);
                    }
                    Err(e) => {
                        tracing::debug!(upstream = %target.name(), error = %e, "warm connection failed");
                        sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            }
            let notified = self.taken.notified();
            match oldest {
                Some(since) => {
                    tokio::select! {
                        () = notified => {}
                        () = sleep_until(since + self.max_age) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Removes the expired connections; says how many are missing and when the oldest
    /// remaining one was opened.
    fn prune(&self) -> (Vec<Ready>, usize, Option<Instant>) {
        let mut ready = self.lock();
        let mut expired = Vec::new();
        while ready
            .front()
            .is_some_and(|r| r.since.elapsed() >= self.max_age)
        {
            expired.extend(ready.pop_front());
        }
        let missing = self.want.saturating_sub(ready.len());
        let oldest = ready.front().map(|r| r.since);
        let n = ready.len();
        drop(ready);
        self.publish(n);
        (expired, missing, oldest)
    }
}

/// Whether nothing has arrived on `stream` since its greeting. The server speaks first only
/// to greet; anything more (EOF, a BYE for idling, a TLS close) means it has given up on the
/// connection. One non-blocking read: the bytes it might consume belong to a connection that
/// is thrown away.
fn untouched(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

async fn goodbye(mut stream: Stream) {
    let _ = timeout(GOODBYE, async {
        stream.write_all(LOGOUT).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;
    use tokio::net::TcpListener;

    /// A server that greets every connection and then keeps it open until told, or closes it
    /// at once when `close_after_greeting`.
    async fn greeter(close_after_greeting: bool) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(b"* OK ready\r\n").await.unwrap();
                if close_after_greeting {
                    drop(s);
                } else {
                    held.push(s);
                }
            }
        });
        (addr, task)
    }

    fn target(address: &str) -> Target {
        let config = UpstreamConfig {
            address: address.to_owned(),
            ..UpstreamConfig::default()
        };
        Target::new(config, None)
    }

    async fn wait_ready(warm: &Warm, n: usize) {
        for _ in 0..500 {
            if warm.lock().len() == n {
                return;
            }
            sleep(Duration::from_millis(10)).await;
        }
        panic!("never {n} warm connections");
    }

    #[tokio::test]
    async fn keeps_the_pool_full_and_hands_out_greeted_connections() {
        let (addr, _server) = greeter(false).await;
        let warm = Warm::new(2, Duration::from_secs(60), None);
        let keeper = tokio::spawn(warm.clone().keep(target(&addr)));
        wait_ready(&warm, 2).await;
        let (mut up, refill) = warm.take().expect("a warm connection");
        assert_eq!(up.greeting, b"* OK ready\r\n");
        // Usable: the greeting was read, nothing else.
        up.stream.write_all(b"a NOOP\r\n").await.unwrap();
        // Replaced in the background once the session says so.
        wait_ready(&warm, 1).await;
        drop(refill);
        wait_ready(&warm, 2).await;
        keeper.abort();
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_never_handed_out() {
        let (addr, _server) = greeter(true).await;
        let warm = Warm::new(1, Duration::from_secs(60), None);
        let mut up = target(&addr).connect(None).await.unwrap();
        // The server closes right after its greeting: poll until the close has reached us.
        let mut closed = false;
        for _ in 0..500 {
            if !untouched(&mut up.stream) {
                closed = true;
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the server's close never arrived");
        warm.lock().push_back(Ready {
            since: Instant::now(),
            up,
        });
        assert!(warm.take().is_none());
    }

    #[tokio::test]
    async fn expired_connections_are_not_handed_out() {
        let (addr, _server) = greeter(false).await;
        let warm = Warm::new(1, Duration::from_millis(1), None);
        let up = target(&addr).connect(None).await.unwrap();
        warm.lock().push_back(Ready {
            since: Instant::now() - Duration::from_millis(5),
            up,
        });
        assert!(warm.take().is_none());
        assert_eq!(warm.lock().len(), 0);
    }
}
