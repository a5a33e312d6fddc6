//! The `/metrics` and `/healthz` endpoint over real HTTP on a loopback port.

use std::net::SocketAddr;
use std::time::Duration;

use imapgate::metrics::{self, HealthState, LoginResult, Metrics, MetricsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// One HTTP/1.1 request with `Connection: close`, read to the end: no client library needed.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the endpoint answers within 10 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Reply {
        status: status_line.split(' ').nth(1).unwrap().parse().unwrap(),
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

async fn start(metrics: Metrics, health: HealthState) -> SocketAddr {
    let server = metrics::bind("127.0.0.1:0".parse().unwrap(), metrics, health)
        .await
        .unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    tokio::spawn(server.run());
    addr
}

#[tokio::test]
async fn metrics_and_health() {
    let m = Metrics::new();
    m.login(LoginResult::Ok);
    let health = HealthState::new();
    let addr = start(m.clone(), health.clone()).await;

    let r = request(addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.headers
    );
    assert!(
        r.body.contains("imapgate_logins_total{result=\"ok\"} 1\n"),
        "{}",
        r.body
    );

    // The scrape is live, not a snapshot from startup.
    m.login(LoginResult::Ok);
    let r = request(addr, "GET", "/metrics").await;
    assert!(r.body.contains("imapgate_logins_total{result=\"ok\"} 2\n"));

    let r = request(addr, "HEAD", "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());

    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    health.set_draining();
    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "draining"));
    assert!(r.headers.contains("cache-control: no-store"));
    health.set_accepting();
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);

    for path in ["/", "/metrics/", "/metricsx", "/health", "/../metrics"] {
        assert_eq!(request(addr, "GET", path).await.status, 404, "{path}");
    }
    let r = request(addr, "POST", "/metrics").await;
    assert_eq!(r.status, 405);
    assert!(r.headers.contains("allow: get, head"));
}

#[tokio::test]
async fn healthz_needs_an_upstream_up_and_draining_wins() {
    use imapgate::net::health::UpstreamHealth;

    let m = Metrics::new();
    let upstreams = UpstreamHealth::new(["mail1", "mail2"], Some(&m));
    let health = HealthState::with_upstreams(upstreams.clone());
    let addr = start(m, health.clone()).await;

    // Not probed yet: a load balancer must not send clients.
    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "no upstream"));
    assert!(r.headers.contains("cache-control: no-store"));
    let r = request(addr, "GET", "/metrics").await;
    assert!(
        r.body
            .contains("imapgate_upstream_up{upstream=\"mail2\"} 0\n"),
        "{}",
        r.body
    );

    upstreams.probe_succeeded(1);
    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let r = request(addr, "GET", "/metrics").await;
    assert!(
        r.body
            .contains("imapgate_upstream_up{upstream=\"mail2\"} 1\n"),
        "{}",
        r.body
    );

    health.set_draining();
    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "draining"));
    upstreams.probe_failed(1, &"refused");
    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "draining"));
    health.set_accepting();
    let r = request(addr, "GET", "/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "no upstream"));
}

#[tokio::test]
async fn keep_alive_serves_several_requests() {
    let addr = start(Metrics::new(), HealthState::new()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..3 {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nok"), "{reply}");
    }
}

#[tokio::test]
async fn a_taken_port_is_a_bind_error() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = metrics::serve(addr, Metrics::new(), HealthState::new())
        .await
        .unwrap_err();
    assert!(matches!(err, MetricsError::Bind { addr: a, .. } if a == addr));
    assert!(err.to_string().contains(&addr.to_string()));
}

#[tokio::test]
async fn garbage_does_not_stop_the_endpoint() {
    let addr = start(Metrics::new(), HealthState::new()).await;
    for junk in [&b"\x00\x01\x02 not http\r\n\r\n"[..], b"GET", b""] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(junk).await.unwrap();
        drop(s);
    }
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
}
