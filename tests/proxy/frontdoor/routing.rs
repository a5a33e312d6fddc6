//! Logins read by imapgate and routed: two private Dovecots holding different mail, users
//! landing on theirs, the login replayed unchanged (LOGIN, AUTHENTICATE PLAIN with and without
//! an initial response, AUTHENTICATE LOGIN), a failed login followed by a good one, fallbacks
//! and an upstream nobody can reach.

use std::net::SocketAddr;

use imapgate::config::{Config, PolicyConfig, RoutingConfig, UpstreamConfig, UpstreamTls};

use crate::support::proxy::{PLAIN, Proxy, config_for};
use crate::support::{Client, Dovecot, DovecotOptions, assert_tagged, list_names};

/// Two Dovecots with alice and bob on both; each holds a folder naming it.
struct Backends {
    mail1: Dovecot,
    mail2: Dovecot,
}

impl Backends {
    async fn start() -> Backends {
        let mail1 = Dovecot::start(DovecotOptions::default());
        let mail2 = Dovecot::start(DovecotOptions::default());
        for (dc, folder) in [(&mail1, "on-mail1"), (&mail2, "on-mail2")] {
            for user in ["alice", "bob"] {
                let mut c = Client::connect(dc.addr()).await;
                c.read_greeting().await;
                c.login(user, &format!("{user}pw")).await;
                c.ok(&format!("c CREATE {folder}")).await;
                c.logout().await;
            }
        }
        Backends { mail1, mail2 }
    }

    fn upstream(dc: &Dovecot, name: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_owned(),
            address: dc.addr().to_string(),
            ..UpstreamConfig::default()
        }
    }

    /// imapgate routing between mail1 (the default) and mail2, with `policy`.
    async fn gate(&self, policy: Option<&str>, dir: &std::path::Path) -> Proxy {
        let mut config: Config = config_for(&self.mail1, UpstreamTls::None);
        config.upstreams = vec![
            Self::upstream(&self.mail1, "mail1"),
            Self::upstream(&self.mail2, "mail2"),
        ];
        config.routing = Some(RoutingConfig::default());
        if let Some(source) = policy {
            with_route_policy(&mut config, dir, source);
        }
        Proxy::start(config).await
    }
}

/// `config` runs `source` as its one policy, written to `dir/route.lua`.
fn with_route_policy(config: &mut Config, dir: &std::path::Path, source: &str) {
    let script = dir.join("route.lua");
    std::fs::write(&script, source).expect("write policy");
    config.policies = vec![PolicyConfig {
        script,
        options: toml::Table::new(),
        on_error: Default::default(),
        on_state_error: None,
    }];
}

async fn client(addr: SocketAddr) -> (Client, String) {
    let mut c = Client::connect(addr).await;
    let greeting = c.read_greeting().await;
    (c, greeting)
}

/// The folder naming the backend a logged-in client sees.
async fn backend_of(c: &mut Client) -> String {
    let list = c.ok("w LIST \"\" \"on-*\"").await;
    list_names(&list).join(",")
}

const BOB_TO_MAIL2: &str = r#"return { name = "route",
  on_login = function(ctx, login)
    if login.user == "bob" then return imap.route{ upstream = "mail2" } end
  end }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_land_on_their_backend() {
    // C: a LOGIN alice alicepw   -> mail1 (no route: the default upstream)
    // C: a LOGIN bob bobpw       -> mail2 (imap.route{ upstream = "mail2" })
    let b = Backends::start().await;
    let (before1, before2) = (b.mail1.log().len(), b.mail2.log().len());
    let dir = crate::support::temp_dir();
    let gate = b.gate(Some(BOB_TO_MAIL2), dir.path()).await;
    let (mut c, greeting) = client(gate.addr(PLAIN)).await;
    assert!(greeting.contains("imapgate ready"), "{greeting}");
    let caps = c.ok("c CAPABILITY").await;
    assert!(caps[0].contains("AUTH=PLAIN"), "{caps:?}");
    c.login("alice", "alicepw").await;
    assert_eq!(backend_of(&mut c).await, "on-mail1");
    c.logout().await;
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    let answer = c.login("bob", "bobpw").await;
    assert!(
        answer.last().is_some_and(|l| l.contains("[CAPABILITY")),
        "the upstream's own answer, with its capabilities: {answer:?}"
    );
    assert_eq!(backend_of(&mut c).await, "on-mail2");
    c.ok("s SELECT INBOX").await;
    c.logout().await;
    // Dovecot's logs agree (since the setup's own logins).
    let (log1, log2) = (b.mail1.log(), b.mail2.log());
    let (log1, log2) = (&log1[before1..], &log2[before2..]);
    assert!(log2.contains("Login: user=<bob>"), "{log2}");
    assert!(log1.contains("Login: user=<alice>"), "{log1}");
    assert!(!log1.contains("Login: user=<bob>"), "{log1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sasl_form_is_replayed() {
    let b = Backends::start().await;
    let dir = crate::support::temp_dir();
    let gate = b.gate(Some(BOB_TO_MAIL2), dir.path()).await;
    // PLAIN with an initial response: "\0bob\0bobpw".
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    c.ok("a AUTHENTICATE PLAIN AGJvYgBib2Jwdw==").await;
    assert_eq!(backend_of(&mut c).await, "on-mail2");
    c.logout().await;
    // PLAIN without: the response after imapgate's own "+".
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    c.send_line("a AUTHENTICATE PLAIN").await;
    assert_eq!(c.read_response().await.trim_end(), "+");
    c.send_line("AGJvYgBib2Jwdw==").await;
    assert_tagged(&c.read_until_tagged("a").await, "a", "OK");
    assert_eq!(backend_of(&mut c).await, "on-mail2");
    c.logout().await;
    // LOGIN: user, then password.
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    c.send_line("a AUTHENTICATE LOGIN").await;
    assert!(c.read_response().await.starts_with("+ VXNlcm5hbWU6"));
    c.send_line("Ym9i").await; // bob
    assert!(c.read_response().await.starts_with("+ UGFzc3dvcmQ6"));
    c.send_line("Ym9icHc=").await; // bobpw
    assert_tagged(&c.read_until_tagged("a").await, "a", "OK");
    assert_eq!(backend_of(&mut c).await, "on-mail2");
    c.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_login_can_be_tried_again() {
    // C: a LOGIN bob wrong    S: a NO [AUTHENTICATIONFAILED] (from mail2)
    // C: b LOGIN alice alicepw  S: b OK (mail1), still one connection
    let b = Backends::start().await;
    let dir = crate::support::temp_dir();
    let gate = b.gate(Some(BOB_TO_MAIL2), dir.path()).await;
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    let r = c.no("a LOGIN bob wrong").await;
    assert!(
        r.last().is_some_and(|l| l.contains("AUTHENTICATIONFAILED")),
        "{r:?}"
    );
    c.bad("b SELECT INBOX").await;
    c.ok("c LOGIN alice alicepw").await;
    assert_eq!(backend_of(&mut c).await, "on-mail1");
    c.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_are_tried_in_order_and_none_left_is_unavailable() {
    let b = Backends::start().await;
    let dir = crate::support::temp_dir();
    // A port nothing listens on (and nothing can take while the test runs).
    let dead_port = crate::support::proxy::DeadPort::new();
    let dead = dead_port.addr();
    let mut config: Config = config_for(&b.mail1, UpstreamTls::None);
    config.upstreams = vec![
        Backends::upstream(&b.mail1, "mail1"),
        Backends::upstream(&b.mail2, "mail2"),
        UpstreamConfig {
            name: "dead".into(),
            address: dead.to_string(),
            connect_timeout_s: 2,
            ..UpstreamConfig::default()
        },
    ];
    config.routing = Some(RoutingConfig::default());
    with_route_policy(
        &mut config,
        dir.path(),
        r#"return { name = "route", on_login = function(ctx, login)
             if login.user == "bob" then return imap.route{ upstream = "dead", fallbacks = { "mail2" } } end
             return imap.route{ upstream = "dead" }
           end }"#,
    );
    let gate = Proxy::start(config).await;
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    c.login("bob", "bobpw").await;
    assert_eq!(backend_of(&mut c).await, "on-mail2");
    c.logout().await;
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    let r = c.no("a LOGIN alice alicepw").await;
    assert!(
        r.last().is_some_and(|l| l.contains("[UNAVAILABLE]")),
        "{r:?}"
    );
    // Not a hang, not a dropped connection: the session goes on.
    c.ok("n NOOP").await;
    c.logout().await;
}

/// The client's real address reaches the upstream in imapgate's own ID (`forward_id`), which
/// Dovecot believes from its `login_trusted_networks`: behind a load balancer (a hand-made
/// PROXY header for 203.0.113.7), Dovecot's log names 203.0.113.7 for the login, and the
/// client's own ID fields go along.
///
/// ```text
/// (PROXY TCP4 203.0.113.7 198.51.100.1 4242 143)
/// C: i ID ("name" "mutt")          S: (imapgate's) * ID ... / i OK
/// C: a LOGIN bob bobpw             imapgate -> mail2: imapgate1 ID ("name" "mutt"
///                                  "x-originating-ip" "203.0.113.7" ...), then a LOGIN ...
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_client_address_goes_upstream_in_id() {
    let trusted = "login_trusted_networks = 127.0.0.0/8\nimap_id_log = *\n";
    let mail = Dovecot::start(DovecotOptions {
        extra_config: trusted.into(),
        ..DovecotOptions::default()
    });
    let mut config: Config = config_for(&mail, UpstreamTls::None);
    config.upstreams = vec![UpstreamConfig {
        forward_id: true,
        ..Backends::upstream(&mail, "mail")
    }];
    config.routing = Some(RoutingConfig::default());
    for l in &mut config.listeners {
        l.proxy_protocol = true;
        l.proxy_from = vec!["127.0.0.1".parse().expect("network")];
    }
    let gate = Proxy::start(config).await;
    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 143\r\n")
        .await;
    c.read_greeting().await;
    c.ok("i ID (\"name\" \"mutt\")").await;
    c.login("bob", "bobpw").await;
    c.logout().await;
    let log = crate::support::evidence::poll(
        "Dovecot logs the login",
        std::time::Duration::from_secs(10),
        || {
            let log = mail.log();
            log.contains("Login: user=<bob>").then_some(log)
        },
    )
    .await;
    let login = log
        .lines()
        .find(|l| l.contains("Login: user=<bob>"))
        .unwrap_or_default();
    assert!(login.contains("rip=203.0.113.7"), "{login}");
    assert!(login.contains("lip=198.51.100.1"), "{login}");
    assert!(
        log.lines()
            .any(|l| l.contains("ID sent") && l.contains("name=mutt")),
        "the client's own ID fields went along: {log}"
    );
}

/// A client cannot claim an address in imapgate's name: with Dovecot trusting imapgate's
/// network (`login_trusted_networks`), the client's own `x-originating-ip` is removed from its
/// ID (the rest goes on), and one hidden in a synchronizing literal is refused before the
/// client may send it; bytes sent anyway are read as a command, never as the literal. Both
/// transparent and routed; Dovecot's log shows the real address.
///
/// ```text
/// C: a ID ("name" "evil" "x-originating-ip" "203.0.113.66")   upstream sees: a ID ("name" "evil")
/// C: b ID ({16}                                                S: b BAD [CLIENTBUG] ...
/// C: x-originating-ip "203.0.113.66")                          S: x-originating-ip BAD ...
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_claim_an_address_in_id() {
    let trusted = "login_trusted_networks = 127.0.0.0/8\nimap_id_log = *\n";
    let mail = Dovecot::start(DovecotOptions {
        extra_config: trusted.into(),
        ..DovecotOptions::default()
    });
    for (routed, user) in [(false, "alice"), (true, "bob")] {
        let mut config: Config = config_for(&mail, UpstreamTls::None);
        if routed {
            config.upstreams = vec![Backends::upstream(&mail, "mail")];
            config.routing = Some(RoutingConfig::default());
        }
        let gate = Proxy::start(config).await;
        let mut c = Client::connect(gate.addr(PLAIN)).await;
        c.read_greeting().await;
        c.ok("a ID (\"name\" \"evil\" \"x-originating-ip\" \"203.0.113.66\")")
            .await;
        let r = c.bad("b ID ({16}").await;
        assert!(r.last().is_some_and(|l| l.contains("[CLIENTBUG]")), "{r:?}");
        c.bad("x-originating-ip \"203.0.113.66\")").await;
        c.login(user, &format!("{user}pw")).await;
        c.logout().await;
        let login = crate::support::evidence::poll(
            "Dovecot logs the login",
            std::time::Duration::from_secs(10),
            || {
                let log = mail.log();
                let needle = format!("Login: user=<{user}>");
                log.lines().find(|l| l.contains(&needle)).map(str::to_owned)
            },
        )
        .await;
        assert!(login.contains("rip=127.0.0.1"), "routed={routed}: {login}");
        assert!(!mail.log().contains("203.0.113.66"), "{}", mail.log());
        assert!(
            mail.log()
                .lines()
                .any(|l| l.contains("ID sent") && l.contains("name=evil")),
            "the client's other fields went on: {}",
            mail.log()
        );
    }
}

/// Warm connections (`warm = 2`): opened and greeted before any client, handed to logins,
/// replaced; the client's real address still reaches Dovecot (forward_id's ID goes on the
/// warm connection before the login). Then Dovecot's login processes holding the warm
/// connections die: the next login still lands on the same upstream, which stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_connections_serve_logins_and_survive_their_server_side_dying() {
    let trusted = "login_trusted_networks = 127.0.0.0/8\n";
    let mail = Dovecot::start(DovecotOptions {
        extra_config: trusted.into(),
        ..DovecotOptions::default()
    });
    let mut config: Config = config_for(&mail, UpstreamTls::None);
    config.upstreams = vec![UpstreamConfig {
        forward_id: true,
        warm: 2,
        ..Backends::upstream(&mail, "mail")
    }];
    config.routing = Some(RoutingConfig::default());
    for l in &mut config.listeners {
        l.proxy_protocol = true;
        l.proxy_from = vec!["127.0.0.1".parse().expect("network")];
    }
    let gate = Proxy::start(config).await;
    let series = |name: &str| {
        let scrape = gate.server().metrics().render();
        crate::support::evidence::sample(&scrape, name)
    };
    let ready = "imapgate_upstream_warm_connections{upstream=\"mail\"}";
    let warm_used = "imapgate_upstream_sessions_total{connection=\"warm\",upstream=\"mail\"}";
    let wait = std::time::Duration::from_secs(10);
    crate::support::evidence::poll("two warm connections", wait, || {
        (series(ready) == 2.0).then_some(())
    })
    .await;

    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 143\r\n")
        .await;
    c.read_greeting().await;
    c.login("bob", "bobpw").await;
    c.logout().await;
    assert_eq!(series(warm_used), 1.0);
    let log = crate::support::evidence::poll("Dovecot logs the login", wait, || {
        let log = mail.log();
        log.contains("Login: user=<bob>").then_some(log)
    })
    .await;
    let login = log
        .lines()
        .find(|l| l.contains("Login: user=<bob>"))
        .unwrap_or_default();
    assert!(login.contains("rip=203.0.113.7"), "{login}");
    crate::support::evidence::poll("the pool refilled", wait, || {
        (series(ready) == 2.0).then_some(())
    })
    .await;

    // The server side of every warm connection dies (bob's own session ended above).
    assert!(mail.kill_matching("imap-login") >= 2);
    let mut c = Client::connect(gate.addr(PLAIN)).await;
    c.send(b"PROXY TCP4 203.0.113.8 198.51.100.1 4243 143\r\n")
        .await;
    c.read_greeting().await;
    c.login("alice", "alicepw").await;
    c.ok("s SELECT INBOX").await;
    c.logout().await;
    assert_eq!(gate.server().upstream_health().up("mail"), Some(true));
}

/// Transparent mode takes warm connections too: the client's greeting is the warm
/// connection's, read before the client came, and the session is the usual relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_connections_serve_transparent_sessions() {
    let mail = Dovecot::shared();
    let mut config: Config = config_for(mail, UpstreamTls::None);
    config.upstreams[0].warm = 1;
    let gate = Proxy::start(config).await;
    let series = |name: &str| {
        let scrape = gate.server().metrics().render();
        crate::support::evidence::sample(&scrape, name)
    };
    let ready = "imapgate_upstream_warm_connections{upstream=\"default\"}";
    let wait = std::time::Duration::from_secs(10);
    crate::support::evidence::poll("a warm connection", wait, || {
        (series(ready) == 1.0).then_some(())
    })
    .await;
    let (mut c, greeting) = client(gate.addr(PLAIN)).await;
    // Dovecot's greeting, not imapgate's stand-in.
    assert!(greeting.contains("Dovecot"), "{greeting}");
    let (user, pass) = mail.fresh_user();
    c.login(&user, &pass).await;
    c.ok("s SELECT INBOX").await;
    c.logout().await;
    assert_eq!(
        series("imapgate_upstream_sessions_total{connection=\"warm\",upstream=\"default\"}"),
        1.0
    );
}

/// What `on_login` decides, applied: a refusal is imapgate's answer (the upstream never sees
/// the credentials) and a refused login naming its user in the audit log; a verdict the hook
/// cannot apply, or a route to an upstream that is not configured, fails closed; `close`
/// ends the session.
///
/// ```text
/// C: a LOGIN mallory pw    S: a NO [CONTACTADMIN] Not here       (imap.reject)
/// C: b LOGIN drop pw       S: b NO [UNAVAILABLE] ...              (imap.drop(): an error)
/// C: c LOGIN nowhere pw    S: c NO [UNAVAILABLE] ...              (no such upstream)
/// C: d LOGIN bye pw        S: * BYE Go away                       (imap.close)
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_verdicts_are_applied_and_fail_closed() {
    let b = Backends::start().await;
    let before = (b.mail1.log().len(), b.mail2.log().len());
    let dir = crate::support::temp_dir();
    let audit = dir.path().join("audit.jsonl");
    let mut config: Config = config_for(&b.mail1, UpstreamTls::None);
    config.upstreams = vec![
        Backends::upstream(&b.mail1, "mail1"),
        Backends::upstream(&b.mail2, "mail2"),
    ];
    config.log.audit = Some(audit.display().to_string());
    with_route_policy(
        &mut config,
        dir.path(),
        r#"return { name = "route", on_login = function(ctx, login)
             if login.user == "mallory" then
               return imap.reject{ code = "CONTACTADMIN", text = "Not here" }
             elseif login.user == "drop" then return imap.drop()
             elseif login.user == "nowhere" then return imap.route{ upstream = "mail9" }
             elseif login.user == "bye" then return imap.close("Go away")
             end
           end }"#,
    );
    let gate = Proxy::start(config).await;
    let (mut c, _) = client(gate.addr(PLAIN)).await;
    let r = c.no("a LOGIN mallory pw").await;
    assert_eq!(
        r.last().map(String::as_str),
        Some("a NO [CONTACTADMIN] Not here")
    );
    let r = c.no("b LOGIN drop pw").await;
    assert!(
        r.last()
            .is_some_and(|l| l.starts_with("b NO [UNAVAILABLE]")),
        "{r:?}"
    );
    let r = c.no("c LOGIN nowhere pw").await;
    assert!(
        r.last()
            .is_some_and(|l| l.starts_with("c NO [UNAVAILABLE]")),
        "{r:?}"
    );
    c.send_line("d LOGIN bye pw").await;
    let r = c
        .collect_until("d", std::time::Duration::from_secs(10))
        .await;
    assert!(r.iter().any(|l| l == "* BYE Go away"), "{r:?}");
    c.expect_closed().await;
    // None of it reached a server.
    let (log1, log2) = (b.mail1.log(), b.mail2.log());
    for user in ["mallory", "drop", "nowhere", "bye"] {
        let needle = format!("user=<{user}>");
        assert!(!log1[before.0..].contains(&needle) && !log2[before.1..].contains(&needle));
    }
    let records =
        crate::support::evidence::poll("the audit log", std::time::Duration::from_secs(10), || {
            let r = crate::support::evidence::audit_records(&audit);
            r.iter()
                .any(|r| r["event"] == "login" && r["user"] == "mallory")
                .then_some(r)
        })
        .await;
    let mallory = records
        .iter()
        .find(|r| r["event"] == "login" && r["user"] == "mallory")
        .expect("mallory's record");
    assert_eq!(mallory["result"], "refused");
}

/// Failover mid-run: bob's route is mail2, then mail1. With mail2 running his sessions land
/// there; once mail2 is stopped, his next login lands on mail1 (and the failed connect marks
/// mail2 down); with both gone, `NO [UNAVAILABLE]`, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_backend_mid_run_fails_over() {
    let Backends { mail1, mail2 } = Backends::start().await;
    let dir = crate::support::temp_dir();
    let mut config: Config = config_for(&mail1, UpstreamTls::None);
    config.upstreams = vec![
        Backends::upstream(&mail1, "mail1"),
        UpstreamConfig {
            connect_timeout_s: 2,
            ..Backends::upstream(&mail2, "mail2")
        },
    ];
    with_route_policy(
        &mut config,
        dir.path(),
        r#"return { name = "route", on_login = function(ctx, login)
             return imap.route{ upstream = "mail2", fallbacks = { "mail1" } }
           end }"#,
    );
    let gate = Proxy::start(config).await;
    let (mut before, _) = client(gate.addr(PLAIN)).await;
    before.login("bob", "bobpw").await;
    assert_eq!(backend_of(&mut before).await, "on-mail2");
    drop(mail2);
    // The session on mail2 ends with it ...
    before.expect_closed().await;
    // ... and the next login fails over.
    let (mut after, _) = client(gate.addr(PLAIN)).await;
    after.login("bob", "bobpw").await;
    assert_eq!(backend_of(&mut after).await, "on-mail1");
    after.logout().await;
    let up = gate.server().upstream_health().up("mail2");
    assert_eq!(up, Some(false), "the failed connect marked mail2 down");
    drop(mail1);
    let (mut last, _) = client(gate.addr(PLAIN)).await;
    let r = last.no("a LOGIN bob bobpw").await;
    assert!(
        r.last().is_some_and(|l| l.contains("[UNAVAILABLE]")),
        "{r:?}"
    );
}
