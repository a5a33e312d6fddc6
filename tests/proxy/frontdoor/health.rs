//! Upstream health: every upstream is probed (connect and greeting) every `[health]
//! interval_s`; the state is on /metrics (`imapgate_upstream_up`), behind /healthz (503 `no
//! upstream` when none is up) and, for the sessions, in `Server::upstream_health()`.
//!
//! Against real private Dovecots: one stopped for good, one reached through a tap that can
//! refuse connections and accept them again (a stopped server cannot promise to come back on
//! its port), one frozen with SIGSTOP (it accepts TCP but never greets).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use imapgate::config::{Config, HealthConfig, MetricsConfig, UpstreamTls};

use crate::support::evidence::{http_get_within, sample, scrape};
use crate::support::proxy::{PLAIN, Proxy, config_for};
use crate::support::tap::Tap;
use crate::support::{Client, Dovecot, DovecotOptions};

const UP: &str = "imapgate_upstream_up{upstream=\"default\"}";
const PROBE_FAILURES: &str = "imapgate_upstream_probe_failures_total{upstream=\"default\"}";
/// Generous against a loaded machine: with a probe a second, any change shows in ~1 s.
const PATIENCE: Duration = Duration::from_secs(15);

/// imapgate in front of `dc` (or of `address` instead), probing every second, with metrics.
fn config(dc: &Dovecot, address: Option<SocketAddr>) -> Config {
    let mut config = config_for(dc, UpstreamTls::None);
    if let Some(address) = address {
        config.upstreams[0].address = address.to_string();
    }
    config.health = HealthConfig {
        interval_s: 1,
        timeout_s: 1,
    };
    config.metrics = Some(MetricsConfig {
        bind: "127.0.0.1:0".parse().expect("address"),
    });
    config
}

/// What a load balancer and Prometheus see: (`imapgate_upstream_up`, /healthz status, body).
async fn seen(metrics: SocketAddr) -> (f64, u16, String) {
    let up = sample(&scrape(metrics).await, UP);
    let (status, body) = http_get_within(metrics, "/healthz", Duration::from_secs(10)).await;
    (up, status, body)
}

/// Polls until /metrics and /healthz both show `expected`; panics with the last view.
async fn wait_seen(metrics: SocketAddr, expected: (f64, u16, &str)) {
    let end = Instant::now() + PATIENCE;
    loop {
        let (up, status, body) = seen(metrics).await;
        if (up, status, body.as_str()) == expected {
            return;
        }
        assert!(
            Instant::now() < end,
            "waited {PATIENCE:?} for {expected:?}; last seen ({up}, {status}, {body:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn login_works(proxy: &Proxy, dc: &Dovecot) {
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr(PLAIN)).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    c.ok("a1 NOOP").await;
    c.logout().await;
}

#[tokio::test]
async fn a_stopped_dovecot_goes_down_on_metrics_and_healthz() {
    let dc = Dovecot::start(DovecotOptions::default());
    let proxy = Proxy::start(config(&dc, None)).await;
    let metrics = proxy.metrics_addr().expect("metrics endpoint");

    // The first probe ran before imapgate accepted anyone: the state is known at once.
    assert_eq!(seen(metrics).await, (1.0, 200, "ok".to_string()));
    assert!(proxy.server().upstream_health().any_up());
    login_works(&proxy, &dc).await;

    // Dovecot stopped (its process group, by PID): connections are refused.
    drop(dc);
    wait_seen(metrics, (0.0, 503, "no upstream")).await;
    let scrape = scrape(metrics).await;
    assert!(sample(&scrape, PROBE_FAILURES) >= 1.0, "{scrape}");
    let status = &proxy.server().upstream_health().statuses()[0];
    assert_eq!((status.name.as_str(), status.up), ("default", false));
    let error = status.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("cannot connect"), "{error}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_refuses_then_accepts_goes_down_then_up() {
    let dc = Dovecot::shared();
    let tap = Tap::start(dc.addr()).await;
    let proxy = Proxy::start(config(dc, Some(tap.addr()))).await;
    let metrics = proxy.metrics_addr().expect("metrics endpoint");
    assert_eq!(seen(metrics).await, (1.0, 200, "ok".to_string()));

    tap.refuse(true);
    wait_seen(metrics, (0.0, 503, "no upstream")).await;
    let error = proxy.server().upstream_health().statuses()[0]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(error.contains("closed reading the greeting"), "{error}");

    tap.refuse(false);
    wait_seen(metrics, (1.0, 200, "ok")).await;
    // The probes left the server with a LOGOUT, and the sessions work again.
    assert!(tap.to_upstream_text().contains("imapgate-probe LOGOUT\r\n"));
    login_works(&proxy, dc).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_hung_upstream_delays_the_start_by_the_probe_timeout_at_most() {
    let dc = Dovecot::start(DovecotOptions::default());
    dc.freeze();
    let config = config(&dc, None);
    // Far longer than the probe's own bound: the probe must not wait for it.
    assert_eq!(config.upstreams[0].connect_timeout_s, 10);
    let started = Instant::now();
    let proxy = Proxy::start(config).await;
    let start_took = started.elapsed();
    let metrics = proxy.metrics_addr().expect("metrics endpoint");
    assert_eq!(seen(metrics).await, (0.0, 503, "no upstream".to_string()));
    let error = proxy.server().upstream_health().statuses()[0]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(error.contains("health.timeout_s"), "{error}");
    // timeout_s is 1 s; the margin is for a loaded machine, far below connect_timeout_s.
    assert!(start_took < Duration::from_secs(6), "{start_took:?}");

    dc.thaw();
    wait_seen(metrics, (1.0, 200, "ok")).await;
    login_works(&proxy, &dc).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_session_that_cannot_reach_the_upstream_marks_it_down_at_once() {
    let dc = Dovecot::shared();
    let tap = Tap::start(dc.addr()).await;
    let mut config = config(dc, Some(tap.addr()));
    // No probe after the first for the length of the test: what changes the state is the
    // session.
    config.health = HealthConfig {
        interval_s: 3600,
        timeout_s: 5,
    };
    let proxy = Proxy::start(config).await;
    let metrics = proxy.metrics_addr().expect("metrics endpoint");
    assert_eq!(seen(metrics).await, (1.0, 200, "ok".to_string()));

    tap.refuse(true);
    let mut c = Client::connect(proxy.addr(PLAIN)).await;
    assert_eq!(
        c.read_greeting().await,
        "* BYE [UNAVAILABLE] The mail server is unavailable, try again later"
    );
    c.expect_closed().await;
    wait_seen(metrics, (0.0, 503, "no upstream")).await;
    let scrape = scrape(metrics).await;
    assert_eq!(sample(&scrape, PROBE_FAILURES), 0.0, "{scrape}");
    assert_eq!(
        sample(&scrape, "imapgate_upstream_connect_failures_total"),
        1.0
    );
    proxy.shutdown().await;
}
