//! The three shipped policies, end to end through imapgate and a real Dovecot.

use std::path::PathBuf;

use crate::support;
use imapgate::config::{Config, PolicyConfig, UpstreamTls};
use support::proxy::{IMAPS, PLAIN, Proxy, STARTTLS, config_for};
use support::{Client, Dovecot, DovecotOptions, assert_tagged, capabilities, list_names};

fn policy(file: &str, options: &str) -> PolicyConfig {
    let options: toml::Table = toml::from_str(options).expect("options");
    PolicyConfig {
        script: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("policies")
            .join(file),
        options,
        on_error: Default::default(),
        on_state_error: None,
    }
}

fn with_policies(mut config: Config, policies: Vec<PolicyConfig>) -> Config {
    config.policies = policies;
    config
}

// ----- require_tls -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_hides_login_before_starttls_and_allows_it_after() {
    let dc = Dovecot::shared();
    let config = with_policies(
        config_for(dc, UpstreamTls::None),
        vec![policy("require_tls.lua", "")],
    );
    let proxy = Proxy::start(config).await;
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr(STARTTLS)).await;
    let greeting = c.read_greeting().await;
    let caps = capabilities(std::slice::from_ref(&greeting));
    assert!(caps.contains(&"LOGINDISABLED".to_string()), "{greeting}");
    assert!(caps.contains(&"STARTTLS".to_string()), "{greeting}");
    assert!(!caps.iter().any(|c| c.starts_with("AUTH=")), "{greeting}");
    let caps = capabilities(&c.ok("a1 CAPABILITY").await);
    assert!(caps.contains(&"LOGINDISABLED".to_string()), "{caps:?}");

    let r = c.no(&format!("a2 LOGIN {user} {pass}")).await;
    assert!(r[0].starts_with("a2 NO [PRIVACYREQUIRED] "), "{r:?}");
    let r = c.no("a3 AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlcHc=").await;
    assert!(r[0].starts_with("a3 NO [PRIVACYREQUIRED] "), "{r:?}");
    // A LOGIN with a synchronizing literal is refused before the "+": the password is never sent.
    let r = c
        .cmd_with_literals(&[
            format!("a4 LOGIN {user} {{{}}}", pass.len()).as_bytes(),
            pass.as_bytes(),
            b"",
        ])
        .await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].starts_with("a4 NO [PRIVACYREQUIRED] "), "{r:?}");

    c.starttls("a5", dc.ca_pem()).await;
    let caps = capabilities(&c.ok("a6 CAPABILITY").await);
    assert!(!caps.contains(&"LOGINDISABLED".to_string()), "{caps:?}");
    assert!(caps.contains(&"AUTH=PLAIN".to_string()), "{caps:?}");
    c.login(&user, &pass).await;
    c.ok("a7 SELECT INBOX").await;

    // Implicit TLS is TLS from the start.
    let mut t = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    let greeting = t.read_greeting().await;
    assert!(!greeting.contains("LOGINDISABLED"), "{greeting}");
    t.login(&user, &pass).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_exempts_configured_listeners_and_networks() {
    let dc = Dovecot::shared();
    let (user, pass) = dc.fresh_user();
    for options in [
        "exempt_listeners = [\"plain\"]",
        "exempt_networks = [\"127.0.0.0/8\"]",
    ] {
        let config = with_policies(
            config_for(dc, UpstreamTls::None),
            vec![policy("require_tls.lua", options)],
        );
        let proxy = Proxy::start(config).await;
        let mut c = Client::connect(proxy.addr(PLAIN)).await;
        let greeting = c.read_greeting().await;
        assert!(!greeting.contains("LOGINDISABLED"), "{options}: {greeting}");
        c.login(&user, &pass).await;
        proxy.shutdown().await;
    }
}

// ----- namespace -----

const NAMESPACE_OPTIONS: &str = r#"client_prefix = "INBOX."
client_delimiter = "."
upstream_prefix = ""
upstream_delimiter = "/""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_translates_both_ways() {
    // LAYOUT=fs: Maildir++ would refuse the "." in an upstream name this test needs.
    let dc = Dovecot::start(DovecotOptions {
        separator: Some('/'),
        extra_config: "mail_location = maildir:~/Maildir:LAYOUT=fs\n".into(),
        ..DovecotOptions::default()
    });
    // The upstream's own view, set up directly.
    let mut direct = Client::connect(dc.addr()).await;
    direct.read_greeting().await;
    direct.login("alice", "alicepw").await;
    direct.ok("d0 CREATE Archive").await;
    direct.ok("d1 CREATE Archive/2024").await;
    direct.ok("d2 CREATE \"dotted.name\"").await;

    let config = with_policies(
        config_for(&dc, UpstreamTls::None),
        vec![policy("namespace.lua", NAMESPACE_OPTIONS)],
    );
    let proxy = Proxy::start(config).await;
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.login("alice", "alicepw").await;

    // LIST shows only client-form names, with the client's delimiter; the upstream name that
    // cannot be written in the client form is hidden.
    let list = c.ok("a1 LIST \"\" \"*\"").await;
    let mut names = list_names(&list);
    names.sort();
    assert_eq!(
        names,
        ["INBOX", "INBOX.Archive", "INBOX.Archive.2024"],
        "{list:?}"
    );
    assert!(
        list.iter()
            .filter(|l| l.starts_with("* LIST"))
            .all(|l| l.contains(" \".\" ")),
        "{list:?}"
    );
    let list = c.ok("a2 LIST \"INBOX.\" \"%\"").await;
    assert_eq!(list_names(&list), ["INBOX.Archive"], "{list:?}");
    let list = c
        .ok("a3 LIST (SUBSCRIBED) \"\" (\"INBOX.Archive.*\" \"nothing*\") RETURN (CHILDREN)")
        .await;
    assert_tagged(&list, "a3", "OK");

    // NAMESPACE answers with the client's prefix and delimiter.
    let ns = c.ok("a4 NAMESPACE").await;
    assert!(
        ns.iter()
            .any(|l| l.starts_with("* NAMESPACE ((\"INBOX.\" \".\"))")),
        "{ns:?}"
    );

    // Mailbox-bearing commands reach the upstream in its form.
    c.ok("a5 SELECT INBOX.Archive.2024").await;
    c.ok("a6 CREATE INBOX.New.Sub").await;
    c.ok("a7 RENAME INBOX.New.Sub INBOX.New.Renamed").await;
    let status = c.ok("a8 STATUS INBOX.Archive.2024 (MESSAGES)").await;
    assert!(
        status
            .iter()
            .any(|l| l.starts_with("* STATUS INBOX.Archive.2024 ")),
        "{status:?}"
    );
    c.append("a9", "INBOX.Archive", b"Subject: x\r\n\r\nbody\r\n")
        .await;
    c.ok("b1 SELECT INBOX.Archive").await;
    c.ok("b2 COPY 1 INBOX.New.Renamed").await;
    c.ok("b3 UID COPY 1:* INBOX.Archive.2024").await;
    c.ok("b4 MOVE 1 INBOX.Archive.2024").await;
    c.ok("b5 SUBSCRIBE INBOX.Archive").await;
    let lsub = c.ok("b6 LSUB \"\" \"*\"").await;
    assert_eq!(list_names(&lsub), ["INBOX.Archive"], "{lsub:?}");
    // Non-ASCII names round-trip, in modified UTF-7 on both sides.
    c.ok("b7 CREATE \"INBOX.Entw&APw-rfe\"").await;
    let list = c.ok("b8 LIST \"\" \"INBOX.Entw*\"").await;
    assert_eq!(list_names(&list), ["INBOX.Entw&APw-rfe"], "{list:?}");
    // INBOX stays INBOX.
    c.ok("b9 SELECT INBOX").await;
    // Outside the client namespace: refused.
    let r = c.no("c1 CREATE Elsewhere").await;
    assert!(r[0].starts_with("c1 NO [CANNOT] "), "{r:?}");
    let r = c.no("c2 SELECT \"INBOX.a/b\"").await;
    assert!(r[0].starts_with("c2 NO [CANNOT] "), "{r:?}");

    // The upstream's view, directly.
    let list = direct.ok("d3 LIST \"\" \"*\"").await;
    let mut names = list_names(&list);
    names.sort();
    assert_eq!(
        names,
        [
            "Archive",
            "Archive/2024",
            "Entw&APw-rfe",
            "INBOX",
            "New",
            "New/Renamed",
            "dotted.name"
        ],
        "{list:?}"
    );
    let status = direct.ok("d4 STATUS Archive/2024 (MESSAGES)").await;
    assert!(
        status.iter().any(|l| l.contains("MESSAGES 2")),
        "{status:?}"
    );
    proxy.shutdown().await;
}

// ----- search_rate_limit -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_rate_limit_refuses_over_the_burst_per_user() {
    let dc = Dovecot::shared();
    let config = with_policies(
        config_for(dc, UpstreamTls::None),
        vec![policy(
            "search_rate_limit.lua",
            "per_second = 0.001\nburst = 2",
        )],
    );
    let proxy = Proxy::start(config).await;
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    c.ok("a1 SELECT INBOX").await;
    c.ok("a2 SEARCH ALL").await;
    c.ok("a3 UID SEARCH ALL").await;
    let r = c.no("a4 SEARCH ALL").await;
    assert!(
        r[0].starts_with("a4 NO [LIMIT] Too many searches: try again in "),
        "{r:?}"
    );
    // Other commands are not counted.
    c.ok("a5 NOOP").await;
    // The same user on a second connection shares the bucket; another user does not.
    let mut c2 = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c2.read_greeting().await;
    c2.login(&user, &pass).await;
    c2.ok("b1 SELECT INBOX").await;
    c2.no("b2 SEARCH ALL").await;
    let (other, other_pass) = dc.fresh_user();
    let mut c3 = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c3.read_greeting().await;
    c3.login(&other, &other_pass).await;
    c3.ok("c1 SELECT INBOX").await;
    c3.ok("c2 SEARCH ALL").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_rate_limit_delay_mode_holds_then_runs() {
    let dc = Dovecot::shared();
    let config = with_policies(
        config_for(dc, UpstreamTls::None),
        vec![policy(
            "search_rate_limit.lua",
            "per_second = 20.0\nburst = 1\nmode = \"delay\"",
        )],
    );
    let proxy = Proxy::start(config).await;
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    c.ok("a1 SELECT INBOX").await;
    // Pipelined: the held search keeps its place, the NOOP after it answers after it.
    c.send(b"a2 SEARCH ALL\r\na3 SEARCH ALL\r\na4 NOOP\r\n")
        .await;
    let r = c.read_until_tagged("a4").await;
    let tagged: Vec<&String> = r.iter().filter(|l| !l.starts_with('*')).collect();
    assert_eq!(tagged.len(), 3, "{r:?}");
    assert!(tagged[0].starts_with("a2 OK"), "{r:?}");
    assert!(tagged[1].starts_with("a3 OK"), "{r:?}");
    assert!(tagged[2].starts_with("a4 OK"), "{r:?}");
    proxy.shutdown().await;
}
