//! The small HTTP/1.1 server behind imapgate's operator endpoints (metrics and health, admin).
//!
//! Deliberately small: HTTP/1.1 only, no TLS (bind it to loopback or a management network),
//! a cap on concurrent connections, a header read timeout and a lifetime per connection, so
//! that a stuck or hostile client cannot pile up sockets in the proxy's process. Each
//! endpoint gives a synchronous handler from request head to response: none of them needs a
//! request body or waits for anything.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What a handler answers.
pub type Reply = Response<Full<Bytes>>;

/// Concurrent HTTP connections served; more are closed at once. Prometheus uses one per scrape
/// target and an operator's script one at a time, so a handful is plenty.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, kept alive or not.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// After a failed `accept` (e.g. out of file descriptors), wait before trying again rather than
/// spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound, not yet serving, endpoint: [`HttpListener::local_addr`] tells the port when the
/// bind asked for port 0.
#[derive(Debug)]
pub struct HttpListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// For the logs: `metrics`, `admin`.
    name: &'static str,
}

/// Binds an endpoint's socket, so that a bind failure is reported at startup, before the proxy
/// accepts clients.
pub async fn bind(addr: SocketAddr, name: &'static str) -> io::Result<HttpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    Ok(HttpListener {
        listener,
        local_addr,
        name,
    })
}

impl HttpListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `handler` until the task is dropped or aborted. Failed accepts are logged and
    /// retried, never fatal: losing an operator endpoint must not take the proxy down, nor
    /// should a burst of connections end it.
    pub async fn serve<H>(self, handler: H)
    where
        H: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
    {
        let name = self.name;
        let handler = Arc::new(handler);
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024);
        tracing::info!(endpoint = name, addr = %self.local_addr, "endpoint listening");
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(endpoint = name, %error, "endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(endpoint = name, %peer, "endpoint: too many connections, closing");
                continue;
            };
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |req| {
                let response = handler(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await
                {
                    tracing::debug!(endpoint = name, %peer, %error, "endpoint: connection");
                }
                drop(permit);
            });
        }
    }
}

/// A text answer that no cache in between may keep: every answer of these endpoints is about
/// now.
pub fn plain(status: StatusCode, body: &'static str) -> Reply {
    with_type(
        status,
        Bytes::from_static(body.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

/// A JSON answer, not to be cached either.
pub fn json(status: StatusCode, body: Vec<u8>) -> Reply {
    with_type(status, Bytes::from(body), "application/json")
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Reply {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
