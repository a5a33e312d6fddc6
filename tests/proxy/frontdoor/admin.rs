//! Operators' controls, end to end: the admin endpoint (its token, `GET /sessions`,
//! `POST /kick`) and the per-user and per-address connection limits, with clients going
//! through an in-process imapgate to a real private Dovecot.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use imapgate::config::{
    AdminConfig, Config, PolicyConfig, RoutingConfig, UpstreamConfig, UpstreamTls,
};
use serde_json::Value;

use crate::support::evidence::{http_request, poll, sample, scrape};
use crate::support::proxy::{IMAPS, PLAIN, Proxy, ProxyProcess, config_for, toml_path};
use crate::support::{Client, Dovecot, DovecotOptions, quote};

const TOKEN: &str = "adm1n-t0ken-for-tests";
const WAIT: Duration = Duration::from_secs(10);
const KICKED: &str = "* BYE [UNAVAILABLE] Disconnected by an administrator";

fn admin_config(dc: &Dovecot) -> Config {
    let mut config = config_for(dc, UpstreamTls::None);
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    config.admin = Some(AdminConfig::with_token(any, TOKEN));
    config.metrics = Some(imapgate::config::MetricsConfig { bind: any });
    config
}

async fn start(config: Config) -> (Proxy, SocketAddr) {
    let proxy = Proxy::start(config).await;
    let admin = proxy.admin_addr().expect("admin endpoint");
    (proxy, admin)
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// `GET /sessions` with the token: the JSON array.
async fn sessions(admin: SocketAddr) -> Vec<Value> {
    let (status, body) = http_request(admin, "GET", "/sessions", &[&bearer(TOKEN)]).await;
    assert_eq!(status, 200, "GET /sessions: {body}");
    match serde_json::from_str(&body) {
        Ok(Value::Array(list)) => list,
        other => panic!("GET /sessions: not a JSON array: {other:?} from {body:?}"),
    }
}

/// The sessions of `user` in a `GET /sessions` answer.
fn of_user<'a>(list: &'a [Value], user: &str) -> Vec<&'a Value> {
    list.iter().filter(|s| s["user"] == user).collect()
}

/// `POST /kick?user=...` with the token: how many sessions were kicked.
async fn kick(admin: SocketAddr, user: &str) -> u64 {
    let path = format!("/kick?user={user}");
    let (status, body) = http_request(admin, "POST", &path, &[&bearer(TOKEN)]).await;
    assert_eq!(status, 200, "POST {path}: {body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    v["kicked"].as_u64().expect("kicked count")
}

/// A client logged in as `user` through the plaintext listener, with its lines so far.
async fn logged_in(addr: SocketAddr, user: &str, pass: &str) -> (Client, usize) {
    let mut c = Client::connect(addr).await;
    c.read_greeting().await;
    let line = format!("l1 LOGIN {} {}", quote(user), quote(pass));
    c.ok(&line).await;
    (c, line.len() + 2)
}

#[tokio::test]
async fn every_request_needs_the_token() {
    let dc = Dovecot::shared();
    let (proxy, admin) = start(admin_config(dc)).await;
    let (user, pass) = dc.fresh_user();
    let (mut c, _) = logged_in(proxy.addr(PLAIN), &user, &pass).await;
    let wrong = bearer("adm1n-t0ken-for-test");
    let basic = format!("Authorization: Basic {TOKEN}");
    let kick_path = format!("/kick?user={user}");
    let cases: [&[&str]; 3] = [&[], &[&wrong], &[&basic]];
    for headers in cases {
        for (method, path) in [
            ("GET", "/sessions"),
            ("POST", kick_path.as_str()),
            ("GET", "/no-such-path"),
        ] {
            let (status, body) = http_request(admin, method, path, headers).await;
            assert_eq!(status, 401, "{method} {path} with {headers:?}: {body}");
            assert!(!body.contains(&user), "{body}");
        }
    }
    // The refused kick did nothing.
    c.ok("a2 NOOP").await;
    assert_eq!(of_user(&sessions(admin).await, &user).len(), 1);
    let (status, _) = http_request(admin, "GET", "/sessions", &[&bearer(TOKEN)]).await;
    assert_eq!(status, 200);
    let (status, _) = http_request(admin, "DELETE", "/sessions", &[&bearer(TOKEN)]).await;
    assert_eq!(status, 405);
    let (status, _) = http_request(admin, "GET", "/elsewhere", &[&bearer(TOKEN)]).await;
    assert_eq!(status, 404);
    c.logout().await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn sessions_lists_logged_in_users_with_their_real_peers_and_bytes() {
    let dc = Dovecot::shared();
    let (proxy, admin) = start(admin_config(dc)).await;
    let (alice, alice_pw) = dc.fresh_user();
    let (bob, bob_pw) = dc.fresh_user();

    let (mut a, mut a_sent) = logged_in(proxy.addr(PLAIN), &alice, &alice_pw).await;
    a.ok("a2 SELECT INBOX").await;
    a_sent += "a2 SELECT INBOX\r\n".len();
    let mut b = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    b.read_greeting().await;
    let login = format!("b1 LOGIN {} {}", quote(&bob), quote(&bob_pw));
    b.ok(&login).await;
    let b_sent = login.len() + 2;
    // Not logged in: listed without a user.
    let mut anonymous = Client::connect(proxy.addr(PLAIN)).await;
    anonymous.read_greeting().await;

    let list = sessions(admin).await;
    assert_eq!(list.len(), 3, "{list:#?}");
    let a_entry = of_user(&list, &alice);
    let b_entry = of_user(&list, &bob);
    assert_eq!((a_entry.len(), b_entry.len()), (1, 1), "{list:#?}");
    let (a_entry, b_entry) = (a_entry[0], b_entry[0]);
    assert_eq!(a_entry["peer"], a.local_addr().to_string());
    assert_eq!(b_entry["peer"], b.local_addr().to_string());
    assert_eq!(a_entry["listener"], PLAIN);
    assert_eq!(b_entry["listener"], IMAPS);
    assert_eq!(a_entry["upstream"], "default");
    // Bytes from the client are exactly what it sent (after TLS for bob); bytes from the
    // server are at least its answers.
    assert_eq!(a_entry["bytes_in"], a_sent as u64);
    assert_eq!(b_entry["bytes_in"], b_sent as u64);
    assert!(a_entry["bytes_out"].as_u64().unwrap() > b_entry["bytes_out"].as_u64().unwrap());
    assert!(b_entry["bytes_out"].as_u64().unwrap() > 0);
    let since = a_entry["since"].as_str().expect("since");
    assert!(since.len() == 24 && since.ends_with('Z'), "{since}");
    let ids: Vec<u64> = list.iter().map(|s| s["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let anon: Vec<_> = list.iter().filter(|s| s["user"].is_null()).collect();
    assert_eq!(anon.len(), 1);
    assert_eq!(anon[0]["peer"], anonymous.local_addr().to_string());

    // A session that ends leaves the list.
    a.logout().await;
    eventually("alice's session to leave the list", WAIT, || async {
        let list = sessions(admin).await;
        of_user(&list, &alice).is_empty().then_some(())
    })
    .await;
    b.logout().await;
    proxy.shutdown().await;
}

/// Like `support::evidence::poll`, for checks that are themselves async (an HTTP request, a
/// connection): every 10 ms until `Some`, up to `limit`; panics naming `what`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "waited {limit:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn kick_closes_exactly_that_users_sessions() {
    let dc = Dovecot::shared();
    let (proxy, admin) = start(admin_config(dc)).await;
    let (alice, alice_pw) = dc.fresh_user();
    let (bob, bob_pw) = dc.fresh_user();
    let addr = proxy.addr(PLAIN);
    let (mut a1, _) = logged_in(addr, &alice, &alice_pw).await;
    a1.ok("a2 SELECT INBOX").await;
    let mut a2 = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    a2.read_greeting().await;
    a2.login(&alice, &alice_pw).await;
    // One of them waits in IDLE: a kick reaches it too.
    a2.ok("i1 SELECT INBOX").await;
    a2.send_line("i2 IDLE").await;
    assert!(a2.read_response().await.starts_with('+'));
    let (mut b, _) = logged_in(addr, &bob, &bob_pw).await;

    // User names are compared case-insensitively.
    assert_eq!(kick(admin, &alice.to_uppercase()).await, 2);
    for c in [&mut a1, &mut a2] {
        let rest = String::from_utf8_lossy(&c.expect_closed().await).into_owned();
        assert!(rest.contains(&format!("{KICKED}\r\n")), "{rest:?}");
    }
    // Bob goes on.
    b.ok("b2 SELECT INBOX").await;
    b.ok("b3 NOOP").await;
    eventually("alice's sessions to leave", WAIT, || async {
        let list = sessions(admin).await;
        (of_user(&list, &alice).is_empty() && of_user(&list, &bob).len() == 1).then_some(())
    })
    .await;
    assert_eq!(kick(admin, &alice).await, 0);
    let scrape = scrape(proxy.metrics_addr().expect("metrics")).await;
    assert_eq!(sample(&scrape, "imapgate_sessions_kicked_total"), 2.0);
    // Alice may come back (routing elsewhere is the point of a kick).
    let (mut again, _) = logged_in(addr, &alice, &alice_pw).await;
    again.logout().await;
    b.logout().await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_address_limit_refuses_the_connection_over_it() {
    let dc = Dovecot::shared();
    let mut config = admin_config(dc);
    config.limits.max_connections_per_address = 2;
    let (proxy, _) = start(config).await;
    let addr = proxy.addr(PLAIN);
    let crowded: IpAddr = "127.0.0.2".parse().unwrap();
    let elsewhere: IpAddr = "127.0.0.3".parse().unwrap();

    let mut first = Client::connect_from(addr, crowded).await;
    assert!(first.read_greeting().await.starts_with("* OK"));
    let mut second = Client::connect_from(addr, crowded).await;
    assert!(second.read_greeting().await.starts_with("* OK"));
    let mut third = Client::connect_from(addr, crowded).await;
    let said = String::from_utf8_lossy(&third.expect_closed().await).into_owned();
    assert_eq!(
        said,
        "* BYE [UNAVAILABLE] Too many connections from your address\r\n"
    );
    // Another address is not affected, and the first two work.
    let mut other = Client::connect_from(addr, elsewhere).await;
    assert!(other.read_greeting().await.starts_with("* OK"));
    second.ok("s1 NOOP").await;
    let scrape = scrape(proxy.metrics_addr().expect("metrics")).await;
    assert_eq!(
        sample(
            &scrape,
            "imapgate_sessions_refused_total{limit=\"max_connections_per_address\"}"
        ),
        1.0
    );

    // A session that ends frees its place.
    first.logout().await;
    let mut next = eventually("a place for 127.0.0.2", WAIT, || async {
        let mut c = Client::connect_from(addr, crowded).await;
        c.read_greeting().await.starts_with("* OK").then_some(c)
    })
    .await;
    next.ok("n1 NOOP").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_user_limit_ends_the_session_over_it_after_login() {
    let dc = Dovecot::shared();
    let mut config = admin_config(dc);
    config.limits.max_connections_per_user = 2;
    let (proxy, admin) = start(config).await;
    let addr = proxy.addr(PLAIN);
    let (carol, carol_pw) = dc.fresh_user();
    let (dave, dave_pw) = dc.fresh_user();

    let (mut first, _) = logged_in(addr, &carol, &carol_pw).await;
    let (mut second, _) = logged_in(addr, &carol, &carol_pw).await;
    // The third login succeeds at the server, then the session ends.
    let mut third = Client::connect(addr).await;
    third.read_greeting().await;
    let answer = third
        .cmd(&format!("l1 LOGIN {} {}", quote(&carol), quote(&carol_pw)))
        .await;
    assert!(
        answer.last().is_some_and(|l| l.starts_with("l1 OK")),
        "{answer:?}"
    );
    let said = String::from_utf8_lossy(&third.expect_closed().await).into_owned();
    assert_eq!(
        said,
        "* BYE [UNAVAILABLE] Too many connections for this user\r\n"
    );
    // Someone else logs in as usual; carol's first two sessions work.
    let (mut d, _) = logged_in(addr, &dave, &dave_pw).await;
    first.ok("f1 NOOP").await;
    second.ok("s1 NOOP").await;
    let list = sessions(admin).await;
    assert_eq!(of_user(&list, &carol).len(), 2, "{list:#?}");
    let scrape = scrape(proxy.metrics_addr().expect("metrics")).await;
    assert_eq!(
        sample(
            &scrape,
            "imapgate_sessions_refused_total{limit=\"max_connections_per_user\"}"
        ),
        1.0
    );

    // A session that ends frees its place.
    first.logout().await;
    eventually("carol's first session to end", WAIT, || async {
        let list = sessions(admin).await;
        (of_user(&list, &carol).len() == 1).then_some(())
    })
    .await;
    let (mut again, _) = logged_in(addr, &carol, &carol_pw).await;
    again.ok("g1 NOOP").await;
    d.logout().await;
    proxy.shutdown().await;
}

/// The token file is re-read on SIGHUP, and the token never reaches the log, even at `trace`.
#[tokio::test]
async fn the_token_file_is_reread_on_sighup_and_never_logged() {
    let dc = Dovecot::shared();
    let dir = crate::support::temp_dir();
    let token_file = dir.path().join("admin.token");
    let old = "old-t0ken-7f3a9c";
    let new = "new-t0ken-2b8e41";
    std::fs::write(&token_file, format!("{old}\n")).expect("write token");
    let toml = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ntls = \"none\"\n\
         [upstream]\naddress = \"{}\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\ntoken_file = {}\n",
        dc.addr(),
        toml_path(&token_file)
    );
    let proxy = ProxyProcess::start(&toml, "trace");
    let admin = proxy.admin_addr();
    assert_eq!(
        http_request(admin, "GET", "/sessions", &[&bearer(old)])
            .await
            .0,
        200
    );
    assert_eq!(
        http_request(admin, "GET", "/sessions", &[&bearer(new)])
            .await
            .0,
        401
    );

    std::fs::write(&token_file, format!("{new}\n")).expect("write token");
    proxy.signal("HUP");
    let new_auth = bearer(new);
    eventually("the new token to be accepted", WAIT, || async {
        let (status, _) = http_request(admin, "GET", "/sessions", &[&new_auth]).await;
        (status == 200).then_some(())
    })
    .await;
    assert_eq!(
        http_request(admin, "GET", "/sessions", &[&bearer(old)])
            .await
            .0,
        401
    );

    // An unusable file keeps the current token.
    std::fs::write(&token_file, "\n").expect("write token");
    proxy.signal("HUP");
    poll("the refused reload in the log", WAIT, || {
        proxy
            .log()
            .contains("keeping the current admin token")
            .then_some(())
    })
    .await;
    assert_eq!(
        http_request(admin, "GET", "/sessions", &[&bearer(new)])
            .await
            .0,
        200
    );
    let log = proxy.log();
    assert!(!log.contains(old) && !log.contains(new), "{log}");
}

/// With routed logins, `GET /sessions` names the upstream each login went to (none before
/// login: imapgate stands in for the server), and a kick ends the routed session.
#[tokio::test]
async fn routed_sessions_show_their_upstream_and_can_be_kicked() {
    let mail1 = Dovecot::start(DovecotOptions::default());
    let mail2 = Dovecot::start(DovecotOptions::default());
    let dir = crate::support::temp_dir();
    let script = dir.path().join("route.lua");
    std::fs::write(
        &script,
        r#"return { name = "route",
  on_login = function(ctx, login)
    if login.user == "bob" then return imap.route{ upstream = "mail2" } end
  end }"#,
    )
    .expect("write policy");
    let mut config = admin_config(&mail1);
    let upstream = |dc: &Dovecot, name: &str| UpstreamConfig {
        name: name.to_owned(),
        address: dc.addr().to_string(),
        ..UpstreamConfig::default()
    };
    config.upstreams = vec![upstream(&mail1, "mail1"), upstream(&mail2, "mail2")];
    config.routing = Some(RoutingConfig::default());
    config.policies = vec![PolicyConfig {
        script,
        options: toml::Table::new(),
        on_error: Default::default(),
        on_state_error: None,
    }];
    let (proxy, admin) = start(config).await;
    let addr = proxy.addr(PLAIN);

    let mut waiting = Client::connect(addr).await;
    waiting.read_greeting().await;
    let (mut alice, _) = logged_in(addr, "alice", "alicepw").await;
    let (mut bob, _) = logged_in(addr, "bob", "bobpw").await;
    let list = sessions(admin).await;
    assert_eq!(of_user(&list, "alice")[0]["upstream"], "mail1", "{list:#?}");
    assert_eq!(of_user(&list, "bob")[0]["upstream"], "mail2", "{list:#?}");
    let before_login: Vec<_> = list.iter().filter(|s| s["user"].is_null()).collect();
    assert_eq!(before_login.len(), 1, "{list:#?}");
    assert!(before_login[0]["upstream"].is_null(), "{list:#?}");

    assert_eq!(kick(admin, "bob").await, 1);
    let rest = String::from_utf8_lossy(&bob.expect_closed().await).into_owned();
    assert!(rest.contains(&format!("{KICKED}\r\n")), "{rest:?}");
    alice.ok("a2 NOOP").await;
    waiting.ok("w1 NOOP").await;
    alice.logout().await;
    proxy.shutdown().await;
}
