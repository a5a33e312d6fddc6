//! The HTTP endpoint: `GET /metrics` for Prometheus, `GET /healthz` for load balancers and
//! orchestrators.
//!
//! Served by [`crate::net::http`] (HTTP/1.1 only, no TLS, bounded connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::{Metrics, MetricsError};
use crate::net::health::UpstreamHealth;
use crate::net::http::{self, HttpListener, Reply, plain};

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
    http: HttpListener,
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
    let http = http::bind(addr, "metrics")
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(MetricsServer {
        http,
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
        self.http.local_addr()
    }

    /// Serves until the task is dropped or aborted (the `Result` leaves room for fatal errors
    /// later).
    pub async fn run(self) -> Result<(), MetricsError> {
        let MetricsServer {
            http,
            metrics,
            health,
        } = self;
        http.serve(handler(metrics, health)).await;
        Ok(())
    }
}

/// The endpoint's answers, for [`HttpListener::serve`].
pub fn handler(
    metrics: Metrics,
    health: HealthState,
) -> impl Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static {
    move |req| respond(req, &metrics, &health)
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
