//! The HTTP endpoint: `GET /metrics` for Prometheus, `GET /healthz` for load balancers and
//! orchestrators.
//!
//! Deliberately small: HTTP/1.1 only, no TLS (bind it to loopback or a management network),
//! a cap on concurrent connections and a header read timeout so that a stuck or hostile client
//! cannot pile up sockets in the proxy's process.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{Metrics, MetricsError};
use crate::net::health::UpstreamHealth;

/// Concurrent HTTP connections served; more are closed at once. Prometheus uses one per scrape
/// target, so a handful is plenty.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, kept alive or not.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// After a failed `accept` (e.g. out of file descriptors), wait before trying again rather than
/// spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Whether the proxy can serve new clients: `/healthz` answers 200 while it does, 503 once it
/// drains (so that a load balancer stops sending clients before the sessions are closed) and
/// 503 while no upstream is up (a client sent here would only get `BYE`).
///
/// Cheap shared state: clones see the same.
#[derive(Clone, Debug, Default)]
pub struct HealthState {
    draining: Arc<AtomicBool>,
    /// `None`: upstreams are not watched, and do not count.
    upstreams: Option<UpstreamHealth>,
}

impl HealthState {
    /// Accepting.
    pub fn new() -> HealthState {
        HealthState::default()
    }

    /// Accepting, and healthy only while one of `upstreams` is up.
    pub fn with_upstreams(upstreams: UpstreamHealth) -> HealthState {
        HealthState {
            upstreams: Some(upstreams),
            ..HealthState::default()
        }
    }

    /// Called when the server stops accepting (SIGTERM).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn set_accepting(&self) {
        self.draining.store(false, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether no watched upstream is up.
    pub fn no_upstream(&self) -> bool {
        self.upstreams.as_ref().is_some_and(|u| !u.any_up())
    }
}

/// A bound, not yet serving, metrics endpoint: [`MetricsServer::local_addr`] tells the port
/// when `bind` asked for port 0.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Metrics,
    health: HealthState,
}

/// Binds the endpoint's socket, so that a bind failure is reported at startup, before the proxy
/// accepts clients.
pub async fn bind(
    addr: SocketAddr,
    metrics: Metrics,
    health: HealthState,
) -> Result<MetricsServer, MetricsError> {
    let bind_error = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    Ok(MetricsServer {
        listener,
        local_addr,
        metrics,
        health,
    })
}

/// Binds and serves until the task is dropped or aborted.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: HealthState,
) -> Result<(), MetricsError> {
    bind(addr, metrics, health).await?.run().await
}

impl MetricsServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until the task is dropped or aborted. Failed accepts are logged and retried, never
    /// fatal: losing the metrics endpoint must not take the proxy down, nor should a burst of
    /// connections end it. (The `Result` leaves room for fatal errors later.)
    pub async fn run(self) -> Result<(), MetricsError> {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024);
        tracing::info!(addr = %self.local_addr, "metrics endpoint listening");
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "metrics endpoint: too many connections, closing");
                continue;
            };
            let metrics = self.metrics.clone();
            let health = self.health.clone();
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::spawn(async move {
                if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await
                {
                    tracing::debug!(%peer, %error, "metrics endpoint: connection");
                }
                drop(permit);
            });
        }
    }
}

/// The whole routing table.
fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    health: &HealthState,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz") {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(prometheus::TEXT_FORMAT),
            );
            response
        }
        _ if health.is_draining() => plain(StatusCode::SERVICE_UNAVAILABLE, "draining"),
        _ if health.no_upstream() => plain(StatusCode::SERVICE_UNAVAILABLE, "no upstream"),
        _ => plain(StatusCode::OK, "ok"),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // A health answer is about now; a proxy cache in between must not replay it.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
