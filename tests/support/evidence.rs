//! What a test looks at after the conversation, besides what the client saw: imapgate's
//! /metrics and /healthz, its audit log, and Dovecot's log.
//!
//! ```ignore
//! let scrape = scrape(metrics_addr).await;
//! assert_eq!(sample(&scrape, "imapgate_logins_total{result=\"ok\"}"), 1.0);
//! let login = poll("the audit record", Duration::from_secs(5), || {
//!     audit_records(&path).into_iter().find(|r| r["event"] == "login")
//! }).await;
//! assert!(dovecot_logins(dc, &user).is_empty());
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dovecot::Dovecot;

/// `GET path` over HTTP/1.1; (status, body). Panics when no answer comes within `limit`.
pub async fn http_get_within(addr: SocketAddr, path: &str, limit: Duration) -> (u16, String) {
    http_exchange(addr, "GET", path, &[], limit).await
}

/// `method path` over HTTP/1.1 with extra header lines (`"Authorization: Bearer x"`);
/// (status, body). Panics when no answer comes within 10 s.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String) {
    http_exchange(addr, method, path, headers, Duration::from_secs(10)).await
}

async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    limit: Duration,
) -> (u16, String) {
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        for h in headers {
            request.push_str(h);
            request.push_str("\r\n");
        }
        if method != "GET" {
            request.push_str("Content-Length: 0\r\n");
        }
        request.push_str("\r\n");
        s.write_all(request.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    };
    let out = tokio::time::timeout(limit, ask)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} to {addr}: no answer within {limit:?}"))
        .unwrap_or_else(|| panic!("{method} {path} to {addr}: connection failed"));
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The /metrics text of the endpoint at `addr` (panics unless 200 within 10 s).
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get_within(addr, "/metrics", Duration::from_secs(10)).await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The value of one series of a scrape, written as the prometheus crate writes it (labels in
/// sorted order): `imapgate_logins_total{result="ok"}`. 0 when absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("number"))
        .unwrap_or(0.0)
}

/// The sum of every series of metric `name` whose labels contain all of `labels`
/// (`[("hook", "on_command")]`).
pub fn sum_samples(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            if all { value.parse::<f64>().ok() } else { None }
        })
        .sum()
}

/// Every record of the audit log at `path` so far (a missing file is no records).
pub fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// Calls `check` every 10 ms until it returns `Some`, up to `limit`; panics naming `what`.
pub async fn poll<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < end, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Dovecot's `Login: user=<user>, ...` lines for `user` (the line names the mechanism and,
/// when the session was TLS, says `TLS`).
pub fn dovecot_logins(dc: &Dovecot, user: &str) -> Vec<String> {
    let needle = format!("Login: user=<{user}>");
    dc.log()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}
