//! The client's real address: PROXY protocol headers (v1 and v2) accepted only from a
//! listener's `proxy_from`, hand-made and from a real HAProxy (`send-proxy-v2`), and passed on
//! to Dovecot with `send_proxy` (its log shows the address).
//!
//! The hand-made headers carry documentation addresses (RFC 5737): the client 203.0.113.7,
//! the address it connected to 198.51.100.1. A policy answers `NOOP` with `ctx.peer`, so the
//! transcripts show what imapgate believes.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use imapgate::config::{Config, MetricsConfig, PolicyConfig, SendProxy, UpstreamTls};

use crate::support::evidence::{audit_records, poll, sample, scrape};
use crate::support::haproxy::Haproxy;
use crate::support::proxy::{IMAPS, PLAIN, Proxy, config_for};
use crate::support::{Client, Dovecot, DovecotOptions, temp_dir, tls_config};

/// The client a load balancer speaks for.
const CLIENT: &str = "203.0.113.7:4242";
/// The address that client connected to (the load balancer's).
const FRONT: &str = "198.51.100.1:143";

/// Tells a client who imapgate thinks it is: `NOOP` gets `NO you are <ctx.peer>`.
const WHOIS: &str = r#"return {
  name = "whois",
  commands = { "NOOP" },
  on_command = function(ctx, cmd)
    return imap.reject{ status = "NO", text = "you are " .. ctx.peer }
  end,
}
"#;

/// `PROXY TCP4 source destination sport dport`, as the specification writes it.
fn v1(source: &str, destination: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (source.parse().unwrap(), destination.parse().unwrap());
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

/// The v2 signature, then version 2 and `command` (0 LOCAL, 1 PROXY).
fn v2_start(command: u8) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h
}

/// A v2 PROXY header for TCP over IPv4, byte by byte.
fn v2(source: &str, destination: &str) -> Vec<u8> {
    let (s, d): (SocketAddrV4, SocketAddrV4) =
        (source.parse().unwrap(), destination.parse().unwrap());
    let mut h = v2_start(1);
    h.push(0x11); // AF_INET, STREAM
    h.extend(12u16.to_be_bytes());
    h.extend(s.ip().octets());
    h.extend(d.ip().octets());
    h.extend(s.port().to_be_bytes());
    h.extend(d.port().to_be_bytes());
    h
}

/// A v2 LOCAL header, as a load balancer's health check sends.
fn v2_local() -> Vec<u8> {
    let mut h = v2_start(0);
    h.extend([0x00, 0x00, 0x00]);
    h
}

/// imapgate whose listeners all expect a PROXY header from `proxy_from`, with the WHOIS
/// policy, an audit log and a metrics endpoint.
struct Gate {
    proxy: Proxy,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gate {
    async fn start(dc: &Dovecot, proxy_from: &[&str]) -> Gate {
        Gate::start_with(dc, proxy_from, |_| {}).await
    }

    async fn start_with(
        dc: &Dovecot,
        proxy_from: &[&str],
        tweak: impl FnOnce(&mut Config),
    ) -> Gate {
        let dir = temp_dir();
        let script = dir.path().join("whois.lua");
        std::fs::write(&script, WHOIS).unwrap();
        let audit = dir.path().join("audit.jsonl");
        let mut config = config_for(dc, UpstreamTls::None);
        for l in &mut config.listeners {
            l.proxy_protocol = true;
            l.proxy_from = proxy_from.iter().map(|n| n.parse().unwrap()).collect();
        }
        config.policies = vec![PolicyConfig {
            script,
            options: Default::default(),
            on_error: Default::default(),
            on_state_error: None,
        }];
        config.log.audit = Some(audit.display().to_string());
        config.metrics = Some(MetricsConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
        });
        tweak(&mut config);
        Gate {
            proxy: Proxy::start(config).await,
            audit,
            _dir: dir,
        }
    }

    fn addr(&self, listener: &str) -> SocketAddr {
        self.proxy.addr(listener)
    }

    /// `imapgate_proxy_protocol_refused_total` of the plaintext listener for `reason`.
    async fn refused(&self, reason: &str) -> f64 {
        let metrics = self.proxy.metrics_addr().expect("metrics endpoint");
        let series = format!(
            "imapgate_proxy_protocol_refused_total{{listener=\"{PLAIN}\",reason=\"{reason}\"}}"
        );
        sample(&scrape(metrics).await, &series)
    }

    /// The `peer` of `user`'s successful login in the audit log.
    async fn login_peer(&self, user: &str) -> String {
        let record = poll("the login's audit record", Duration::from_secs(5), || {
            audit_records(&self.audit)
                .into_iter()
                .find(|r| r["event"] == "login" && r["result"] == "ok" && r["user"] == user)
        })
        .await;
        record["peer"].as_str().unwrap_or_default().to_owned()
    }
}

/// Asserts that `NOOP` reveals `peer` as the client's address.
async fn assert_seen_as(c: &mut Client, peer: &str) {
    let r = c.no("w NOOP").await;
    let tagged = r.last().expect("tagged answer");
    assert_eq!(tagged, &format!("w NO you are {peer}"), "{r:?}");
}

#[tokio::test]
async fn a_v1_header_gives_the_real_client_address() {
    let dc = Dovecot::shared();
    let gate = Gate::start(dc, &["127.0.0.0/8"]).await;
    let (user, pass) = dc.fresh_user();

    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(&v1(CLIENT, FRONT)).await;
    c.read_greeting().await;
    assert_seen_as(&mut c, CLIENT).await;
    c.login(&user, &pass).await;
    c.logout().await;

    assert_eq!(gate.login_peer(&user).await, CLIENT);
}

#[tokio::test]
async fn a_v2_header_then_tls_on_the_same_stream() {
    let dc = Dovecot::shared();
    let gate = Gate::start(dc, &["127.0.0.1"]).await;
    let (user, pass) = dc.fresh_user();

    let mut c = Client::connect(gate.addr(IMAPS)).await;
    c.send(&v2(CLIENT, FRONT)).await;
    c.upgrade_tls("localhost", tls_config(dc.ca_pem())).await;
    c.read_greeting().await;
    assert_seen_as(&mut c, CLIENT).await;
    c.login(&user, &pass).await;
    c.logout().await;

    assert_eq!(gate.login_peer(&user).await, CLIENT);
}

#[tokio::test]
async fn exactly_the_header_is_consumed_when_a_command_follows_in_the_same_segment() {
    let dc = Dovecot::shared();
    let gate = Gate::start(dc, &["127.0.0.0/8"]).await;

    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(&[v2(CLIENT, FRONT), b"w NOOP\r\n".to_vec()].concat())
        .await;
    c.read_greeting().await;
    let r = c.read_until_tagged("w").await;
    assert_eq!(r.last().unwrap(), &format!("w NO you are {CLIENT}"));
    c.ok("a CAPABILITY").await;
}

#[tokio::test]
async fn a_v2_local_header_keeps_the_tcp_peer() {
    let dc = Dovecot::shared();
    let gate = Gate::start(dc, &["127.0.0.0/8"]).await;

    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(&v2_local()).await;
    c.read_greeting().await;
    let me = c.local_addr().to_string();
    assert_seen_as(&mut c, &me).await;
}

#[tokio::test]
async fn a_source_outside_proxy_from_is_refused_before_a_word() {
    let dc = Dovecot::shared();
    let gate = Gate::start(dc, &["192.0.2.0/24", "10.0.0.0/8"]).await;

    // A perfectly good header, from 127.0.0.1, which may not send one.
    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(&v1(CLIENT, FRONT)).await;
    assert_eq!(c.expect_closed().await, b"");
    assert_eq!(gate.refused("untrusted").await, 1.0);
}

#[tokio::test]
async fn a_missing_or_malformed_header_closes_the_connection() {
    let dc = Dovecot::shared();
    let gate = Gate::start_with(dc, &["127.0.0.0/8"], |c| c.limits.preauth_timeout_s = 1).await;

    let cases: [(&str, &[u8]); 4] = [
        ("missing", b"a CAPABILITY\r\n"),
        ("missing", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"),
        ("invalid", b"PROXY TCP4 203.0.113.7 nonsense\r\n"),
        ("invalid", b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 143\n"),
    ];
    for (i, (_, bytes)) in cases.iter().enumerate() {
        let mut c = Client::connect(gate.addr(PLAIN)).await;
        c.send(bytes).await;
        let said = c.expect_closed().await;
        assert!(
            said.is_empty(),
            "case {i}: {:?}",
            String::from_utf8_lossy(&said)
        );
    }
    assert_eq!(gate.refused("missing").await, 2.0);
    assert_eq!(gate.refused("invalid").await, 2.0);

    // An IMAP client that waits for the greeting, as they all do: no header comes.
    let mut c = Client::connect(gate.addr(PLAIN)).await;
    assert_eq!(c.expect_closed().await, b"");
    assert_eq!(gate.refused("timeout").await, 1.0);

    // Half a header, then the end of the stream.
    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(&v2(CLIENT, FRONT)[..20]).await;
    c.shutdown().await;
    assert_eq!(c.expect_closed().await, b"");
    assert_eq!(gate.refused("closed").await, 1.0);
}

#[tokio::test]
async fn behind_a_real_haproxy_with_send_proxy_v2() {
    let dc = Dovecot::shared();
    let gate = Gate::start(dc, &["127.0.0.1/32"]).await;
    let (user, pass) = dc.fresh_user();
    let lb = Haproxy::start(gate.addr(IMAPS), "send-proxy-v2");

    // On loopback every address is 127.0.0.1: the client's own port tells it apart from
    // HAProxy's connection to imapgate.
    let mut c = Client::connect(lb.addr()).await;
    c.upgrade_tls("localhost", tls_config(dc.ca_pem())).await;
    c.read_greeting().await;
    let me = c.local_addr().to_string();
    assert_seen_as(&mut c, &me).await;
    c.login(&user, &pass).await;
    c.ok("s SELECT INBOX").await;
    c.logout().await;

    assert_eq!(gate.login_peer(&user).await, me);
    assert_eq!(gate.refused("untrusted").await, 0.0, "{}", lb.log());
}

#[tokio::test]
async fn send_proxy_tells_dovecot_the_real_client() {
    let dc = Dovecot::start(DovecotOptions {
        haproxy_listener: true,
        extra_config: "haproxy_trusted_networks = 127.0.0.1/32\nhaproxy_timeout = 3 secs\n".into(),
        ..Default::default()
    });
    let upstream = dc.haproxy_addr().expect("haproxy listener").to_string();
    for (version, header) in [
        (SendProxy::V2, v1(CLIENT, FRONT)),
        (SendProxy::V1, v2(CLIENT, FRONT)),
    ] {
        let upstream = upstream.clone();
        let gate = Gate::start_with(&dc, &["127.0.0.0/8"], move |c| {
            c.upstreams[0].address = upstream;
            c.upstreams[0].send_proxy = version;
        })
        .await;
        let (user, pass) = dc.fresh_user();

        let mut c = Client::connect(gate.addr(PLAIN)).await;
        c.send(&header).await;
        c.read_greeting().await;
        c.login(&user, &pass).await;
        c.logout().await;

        let login = poll("Dovecot's login line", Duration::from_secs(5), || {
            crate::support::evidence::dovecot_logins(&dc, &user).pop()
        })
        .await;
        assert!(
            login.contains("rip=203.0.113.7,") && login.contains("lip=198.51.100.1,"),
            "{version:?}: {login}"
        );
    }
}
