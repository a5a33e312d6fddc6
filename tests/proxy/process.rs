//! The imapgate binary as operators run it: limits, timeouts, signals, logs, memory, and a real
//! third-party client.

use std::time::Duration;

use crate::support;
use support::evidence::{http_get_within, poll};
use support::proxy::{ProxyProcess, toml_path};
use support::{Client, Dovecot, assert_tagged};

/// A config for the binary: an implicit-TLS and a plaintext listener in front of `dc`.
fn config(dc: &Dovecot, limits: &str) -> String {
    format!(
        r#"
[[listener]]
name = "imaps"
bind = "127.0.0.1:0"
tls = "implicit"
cert = {cert}
key = {key}

[[listener]]
name = "plain"
bind = "127.0.0.1:0"
tls = "none"

[upstream]
address = "{upstream}"

[limits]
{limits}
"#,
        cert = toml_path(&dc.pki().cert),
        key = toml_path(&dc.pki().key),
        upstream = dc.addr(),
    )
}

fn start(dc: &Dovecot, limits: &str) -> ProxyProcess {
    ProxyProcess::start(&config(dc, limits), "info")
}

#[tokio::test]
async fn connections_over_the_limit_get_bye_at_accept() {
    let dc = Dovecot::shared();
    let proxy = start(dc, "max_connections = 2");
    // The ready file, not a probe connection, says imapgate listens: these are the first two.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(proxy.addr("plain")).await;
        let greeting = c.read_greeting().await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        held.push(c);
    }
    let mut third = Client::connect(proxy.addr("plain")).await;
    let greeting = third.read_greeting().await;
    assert!(greeting.starts_with("* BYE [UNAVAILABLE] "), "{greeting}");
    third.expect_closed().await;
    // On the TLS listener the BYE comes after the handshake, so the client can read it.
    let mut tls = Client::connect_tls(proxy.addr("imaps"), dc.ca_pem()).await;
    assert!(tls.read_greeting().await.starts_with("* BYE"));
    held[0].ok("a1 NOOP").await;
}

#[tokio::test]
async fn preauth_timeout_says_bye() {
    let dc = Dovecot::shared();
    let proxy = start(dc, "preauth_timeout_s = 1");
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.read_greeting().await;
    let rest = String::from_utf8_lossy(&c.expect_closed().await).into_owned();
    assert_eq!(rest, "* BYE Login timeout\r\n");
}

#[tokio::test]
async fn idle_timeout_says_bye_after_login() {
    let dc = Dovecot::shared();
    let proxy = start(dc, "idle_timeout_s = 1");
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    let rest = String::from_utf8_lossy(&c.expect_closed().await).into_owned();
    assert_eq!(rest, "* BYE Autologout; idle for too long\r\n");
}

#[tokio::test]
async fn unreachable_upstream_gets_a_clear_bye_and_a_log_line() {
    let dead = support::proxy::DeadPort::new();
    let toml = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ntls = \"none\"\n\
         [upstream]\naddress = \"{}\"\nconnect_timeout_s = 2\n",
        dead.addr()
    );
    let proxy = ProxyProcess::start(&toml, "info");
    let mut c = Client::connect(proxy.addr("plain")).await;
    let greeting = c.read_greeting().await;
    assert_eq!(
        greeting,
        "* BYE [UNAVAILABLE] The mail server is unavailable, try again later"
    );
    c.expect_closed().await;
    proxy.wait_for_log("cannot connect", 1).await;
}

#[tokio::test]
async fn sigterm_drains_then_says_bye_and_exits_zero() {
    let dc = Dovecot::shared();
    let mut proxy = start(dc, "drain_timeout_s = 2");
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    proxy.signal("TERM");
    // No longer accepting (soon after the signal)...
    poll("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(proxy.addr("plain"))
            .is_err()
            .then_some(())
    })
    .await;
    // ...but the live session goes on during the drain,
    c.ok("a1 SELECT INBOX").await;
    // and gets a BYE when the drain time is over.
    let rest = String::from_utf8_lossy(&c.expect_closed().await).into_owned();
    assert_eq!(rest, "* BYE Server shutting down\r\n");
    assert_eq!(proxy.wait(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn passwords_and_sasl_payloads_never_reach_the_log() {
    use base64::Engine as _;
    let dc = Dovecot::shared();
    let (user, pass) = dc.fresh_user();
    let proxy = ProxyProcess::start(&config(dc, ""), "trace");
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.read_greeting().await;
    c.no(&format!("a1 LOGIN {user} WrongSecret123")).await;
    c.login(&user, &pass).await;
    let payload = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
    let mut c2 = Client::connect(proxy.addr("plain")).await;
    c2.read_greeting().await;
    c2.send_line("b1 AUTHENTICATE PLAIN").await;
    assert!(c2.read_response().await.starts_with('+'));
    c2.send_line(&payload).await;
    assert_tagged(&c2.read_until_tagged("b1").await, "b1", "OK");
    c.logout().await;
    c2.logout().await;
    // Both sessions' whole logs: each ends with "closed" (debug).
    proxy.wait_for_log("imapgate::server: closed", 2).await;
    let log = proxy.log();
    assert!(
        log.contains("login succeeded"),
        "the log is not at trace level: {log}"
    );
    assert!(log.contains(&user), "the user should be logged");
    for secret in [pass.as_str(), "WrongSecret123", payload.as_str()] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
}

#[tokio::test]
async fn fifty_mib_literals_stream_without_growing_memory() {
    let _busy = crate::support::busy().await;
    let dc = Dovecot::shared();
    let proxy = start(dc, "");
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr("plain")).await;
    c.set_timeout(Duration::from_secs(120));
    c.read_greeting().await;
    c.login(&user, &pass).await;
    let before = proxy.peak_rss_kib();
    let size = 50 * 1024 * 1024;
    let mut big = vec![b'x'; size];
    for (i, line_end) in big.chunks_mut(1000).enumerate() {
        let n = line_end.len();
        line_end[n - 2..].copy_from_slice(b"\r\n");
        line_end[0] = b'a' + (i % 26) as u8;
    }
    c.append("a1", "INBOX", &big).await;
    c.ok("a2 SELECT INBOX").await;
    c.send_line("a3 FETCH 1 BODY.PEEK[]").await;
    let response = c.read_response_bytes().await;
    assert!(response.len() > size);
    assert_tagged(&c.read_until_tagged("a3").await, "a3", "OK");
    let after = proxy.peak_rss_kib();
    eprintln!("imapgate peak RSS: {before} KiB before, {after} KiB after 50 MiB APPEND+FETCH");
    assert!(before > 0, "cannot read the proxy's memory");
    assert!(
        after - before < 16 * 1024,
        "peak RSS grew by {} KiB relaying a 50 MiB literal",
        after - before
    );
}

#[test]
fn python_imaplib_works_through_imapgate() {
    let _busy = crate::support::busy_blocking();
    let dc = Dovecot::shared();
    let proxy = start(dc, "");
    let (user, pass) = dc.fresh_user();
    let script = r#"
import imaplib, ssl, sys
port, cafile, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
m = imaplib.IMAP4_SSL("localhost", port, ssl_context=ctx)
m.login(user, password)
m.create("Py")
msg = b"From: py@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
typ, _ = m.append("Py", None, None, msg)
assert typ == "OK", typ
m.select("Py")
typ, data = m.fetch("1", "(BODY.PEEK[])")
assert data[0][1] == msg, data
typ, data = m.search(None, "SUBJECT", "hello")
print("search", data[0].decode())
m.logout()
print("ok")
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(proxy.addr("imaps").port().to_string())
        .arg(&dc.pki().ca)
        .arg(&user)
        .arg(&pass)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "imaplib failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "search 1\nok\n");
}

/// `imapgate run --ready-file`: once listening, the file names every listener (in config
/// order), the metrics and admin endpoints, all bound from port 0, and imapgate's PID.
#[tokio::test]
async fn the_ready_file_names_every_address_bound_from_port_0() {
    let dc = Dovecot::shared();
    let dir = support::temp_dir();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "ready-file-token\n").expect("write token");
    let toml = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ntls = \"none\"\n\
         [[listener]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\ntls = \"none\"\n\
         [upstream]\naddress = \"{}\"\n\
         [metrics]\nbind = \"127.0.0.1:0\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\ntoken_file = {}\n",
        dc.addr(),
        toml_path(&token)
    );
    // ProxyProcess reads the file (and checks its PID) before it returns.
    let proxy = ProxyProcess::start(&toml, "info");
    let ports: std::collections::BTreeSet<u16> = [
        proxy.addr("plain"),
        proxy.addr("second"),
        proxy.metrics_addr(),
        proxy.admin_addr(),
    ]
    .iter()
    .map(|a| a.port())
    .collect();
    assert_eq!(ports.len(), 4, "{ports:?}");
    assert!(!ports.contains(&0));
    for listener in ["plain", "second"] {
        let mut c = Client::connect(proxy.addr(listener)).await;
        assert!(c.read_greeting().await.starts_with("* OK"), "{listener}");
    }
    let (status, body) =
        http_get_within(proxy.metrics_addr(), "/healthz", Duration::from_secs(10)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, _) =
        http_get_within(proxy.admin_addr(), "/sessions", Duration::from_secs(10)).await;
    assert_eq!(status, 401, "the admin endpoint wants its token");
}

/// A ready file left by an earlier run is removed at start and never read as this run's.
#[test]
fn a_stale_ready_file_is_replaced() {
    let dc = Dovecot::shared();
    let dir = support::temp_dir();
    let config = dir.path().join("imapgate.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ntls = \"none\"\n\
             [upstream]\naddress = \"{}\"\n",
            dc.addr()
        ),
    )
    .expect("write config");
    let ready = dir.path().join("ready.json");
    let stale = r#"{"pid":1,"listeners":[{"name":"plain","addr":"127.0.0.1:1"}]}"#;
    std::fs::write(&ready, stale).expect("write stale file");
    let mut child = std::process::Command::new(support::proxy::binary())
        .args(["run", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn imapgate");
    let pid = child.id();
    let end = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&ready).unwrap_or_default();
        let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        if json.is_some_and(|j| j["pid"] == pid) {
            break text;
        }
        if std::time::Instant::now() > end || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no ready file of pid {pid}; last seen: {text:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(!text.contains("127.0.0.1:1\""), "{text}");
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (0 when absent).
fn sample(exposition: &str, name_and_labels: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn two_processes_share_one_port_with_reuse_port() {
    let dc = Dovecot::shared();
    let gate = |bind: &str| {
        format!(
            "[[listener]]\nname = \"plain\"\nbind = \"{bind}\"\ntls = \"none\"\nreuse_port = true\n\
             [upstream]\naddress = \"{}\"\n\
             [metrics]\nbind = \"127.0.0.1:0\"\n",
            dc.addr()
        )
    };
    let first = ProxyProcess::start(&gate("127.0.0.1:0"), "info");
    let port = first.addr("plain");
    let second = ProxyProcess::start(&gate(&port.to_string()), "info");
    assert_eq!(second.addr("plain"), port);
    // The kernel spreads connections by their addresses: of 40, each process gets some
    // (all 40 on one would happen about once in 2^39).
    let (user, pass) = dc.fresh_user();
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut c = Client::connect(port).await;
        assert!(c.read_greeting().await.starts_with("* OK"));
        c.login(&user, &pass).await;
        clients.push(c);
    }
    let mut served = Vec::new();
    for gate in [&first, &second] {
        let (status, body) =
            http_get_within(gate.metrics_addr(), "/metrics", Duration::from_secs(10)).await;
        assert_eq!(status, 200);
        served.push(sample(
            &body,
            "imapgate_connections_active{listener=\"plain\"}",
        ));
    }
    assert_eq!(served.iter().sum::<f64>(), 40.0, "{served:?}");
    assert!(served.iter().all(|&n| n > 0.0), "{served:?}");
    for (i, c) in clients.iter_mut().enumerate() {
        c.ok(&format!("a{i} NOOP")).await;
    }
}
