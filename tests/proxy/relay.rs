//! imapgate relaying a real Dovecot: every leg, every command family, the hard cases.

use std::time::Duration;

use crate::support;
use imapgate::config::UpstreamTls;
use support::evidence::{poll, sample};
use support::proxy::{IMAPS, PLAIN, Proxy, STARTTLS};
use support::{Client, Dovecot, DovecotOptions, assert_tagged, capabilities, message, quote};

/// The literal of a FETCH response line (`* n FETCH (... {len}\r\n<data>...)`).
fn literal_of(response: &[u8]) -> &[u8] {
    let open = response.iter().position(|&b| b == b'{').expect("literal");
    let close = open + response[open..].iter().position(|&b| b == b'}').expect("}");
    let len: usize = std::str::from_utf8(&response[open + 1..close])
        .expect("digits")
        .parse()
        .expect("length");
    &response[close + 3..close + 3 + len]
}

async fn login_tls(proxy: &Proxy, dc: &Dovecot) -> (Client, String) {
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    (c, user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_session_covers_the_common_commands() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    assert_eq!(c.alpn().as_deref(), Some(&b"imap"[..]));
    let greeting = c.read_greeting().await;
    let caps = capabilities(std::slice::from_ref(&greeting));
    assert!(caps.contains(&"IMAP4REV1".to_string()), "{greeting}");
    assert!(
        !caps.iter().any(|c| c == "STARTTLS" || c == "LOGINDISABLED"),
        "{greeting}"
    );

    c.login(&user, &pass).await;
    c.ok("a1 CREATE Archive").await;
    let list = c.ok("a2 LIST \"\" *").await;
    assert!(list.iter().any(|l| l.ends_with("Archive")), "{list:?}");

    // APPEND with a synchronizing literal: the upstream's "+" reaches the client.
    let m1 = message(2000, 1);
    let r = c.append("a3", "INBOX", &m1).await;
    assert!(r.iter().any(|l| l.starts_with('+')), "{r:?}");
    // APPEND with LITERAL+.
    let m2 = message(3000, 2);
    let head = format!("a4 APPEND INBOX (\\Flagged) {{{}+}}", m2.len());
    let r = c.cmd_with_literals(&[head.as_bytes(), &m2, b""]).await;
    assert_tagged(&r, "a4", "OK");
    assert!(!r.iter().any(|l| l.starts_with('+')), "{r:?}");

    c.ok("a5 SELECT INBOX").await;
    let search = c.ok("a6 SEARCH FLAGGED").await;
    assert!(search.iter().any(|l| l == "* SEARCH 2"), "{search:?}");
    let store = c.ok("a7 STORE 1 +FLAGS (\\Seen)").await;
    assert!(store.iter().any(|l| l.contains("\\Seen")), "{store:?}");
    c.ok("a8 COPY 1 Archive").await;
    c.ok("a9 MOVE 2 Archive").await;
    c.ok("b1 STORE 1 +FLAGS (\\Deleted)").await;
    let expunge = c.ok("b2 EXPUNGE").await;
    assert!(expunge.iter().any(|l| l == "* 1 EXPUNGE"), "{expunge:?}");
    let status = c.ok("b3 STATUS Archive (MESSAGES)").await;
    assert!(
        status.iter().any(|l| l.contains("MESSAGES 2")),
        "{status:?}"
    );
    c.ok("b4 SELECT Archive").await;
    let fetch = c.ok("b5 FETCH 1 BODY.PEEK[]").await;
    assert_eq!(literal_of(fetch[0].as_bytes()), &m1[..]);
    c.logout().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_mib_message_round_trips_byte_identical() {
    let _busy = crate::support::busy().await;
    let dc = Dovecot::shared();
    // Over a TLS upstream the upstream's records are read ahead in 64 KiB pieces
    // (net::read_ahead) and handed to rustls in the pieces it asks for.
    for upstream in [UpstreamTls::None, UpstreamTls::Implicit] {
        let proxy = Proxy::for_dovecot(dc, upstream).await;
        let (mut c, _) = login_tls(&proxy, dc).await;
        let big = message(5 * 1024 * 1024, 7);
        c.append("a1", "INBOX", &big).await;
        c.ok("a2 SELECT INBOX").await;
        c.send_line("a3 FETCH 1 BODY.PEEK[]").await;
        let response = c.read_response_bytes().await;
        assert!(
            literal_of(&response) == big,
            "{upstream:?}: the literal differs"
        );
        let done = c.read_until_tagged("a3").await;
        assert_tagged(&done, "a3", "OK");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_listener_upgrades_then_logs_in() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr(STARTTLS)).await;
    let greeting = c.read_greeting().await;
    assert!(capabilities(&[greeting]).contains(&"STARTTLS".to_string()));
    c.starttls("s1", dc.ca_pem()).await;
    let caps = capabilities(&c.ok("s2 CAPABILITY").await);
    assert!(!caps.contains(&"STARTTLS".to_string()), "{caps:?}");
    c.login(&user, &pass).await;
    c.ok("s3 SELECT INBOX").await;
    c.logout().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_pipelined_command_is_closed_without_handshake() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let mut c = Client::connect(proxy.addr(STARTTLS)).await;
    c.read_greeting().await;
    c.send(b"s1 STARTTLS\r\ns2 LOGIN alice alicepw\r\n").await;
    let rest = c.expect_closed().await;
    assert!(
        !String::from_utf8_lossy(&rest).contains("s1 OK"),
        "{rest:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_tls_mode_relays() {
    let dc = Dovecot::shared();
    for mode in [
        UpstreamTls::None,
        UpstreamTls::Implicit,
        UpstreamTls::Starttls,
    ] {
        let proxy = Proxy::for_dovecot(dc, mode).await;
        let (user, pass) = dc.fresh_user();
        let mut c = Client::connect(proxy.addr(PLAIN)).await;
        c.read_greeting().await;
        c.login(&user, &pass).await;
        c.ok("a1 SELECT INBOX").await;
        c.ok("a2 NOOP").await;
        c.logout().await;
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sees_an_append_from_another_connection() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let (user, pass) = dc.fresh_user();
    let mut idler = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    idler.read_greeting().await;
    idler.login(&user, &pass).await;
    idler.ok("i1 SELECT INBOX").await;
    idler.send_line("i2 IDLE").await;
    assert!(idler.read_response().await.starts_with('+'));

    let mut other = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    other.read_greeting().await;
    other.login(&user, &pass).await;
    other.append("o1", "INBOX", &message(500, 3)).await;

    let mut seen = false;
    for _ in 0..5 {
        let r = idler.read_response().await;
        if r == "* 1 EXISTS" {
            seen = true;
            break;
        }
    }
    assert!(seen, "no EXISTS during IDLE");
    idler.send_line("DONE").await;
    let done = idler.read_until_tagged("i2").await;
    assert_tagged(&done, "i2", "OK");
    idler.ok("i3 NOOP").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_plain_with_and_without_sasl_ir() {
    use base64::Engine as _;
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let (user, pass) = dc.fresh_user();
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));

    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.ok(&format!("a1 AUTHENTICATE PLAIN {b64}")).await;
    c.ok("a2 SELECT INBOX").await;

    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.send_line("b1 AUTHENTICATE PLAIN").await;
    assert!(c.read_response().await.starts_with('+'));
    c.send_line(&b64).await;
    assert_tagged(&c.read_until_tagged("b1").await, "b1", "OK");

    // A cancelled exchange ends with BAD and the session goes on.
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.send_line("c1 AUTHENTICATE PLAIN").await;
    assert!(c.read_response().await.starts_with('+'));
    c.send_line("*").await;
    assert_tagged(&c.read_until_tagged("c1").await, "c1", "BAD");
    c.login(&user, &pass).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_line_before_login_is_refused_and_closed() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.send_line(&format!("a1 LOGIN {} x", "u".repeat(10_000)))
        .await;
    let rest = String::from_utf8_lossy(&c.expect_closed().await).into_owned();
    assert!(rest.starts_with("a1 BAD [LIMIT] "), "{rest}");
    assert!(rest.contains("* BYE"), "{rest}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_literal_gets_toobig_before_any_continuation() {
    let dc = Dovecot::shared();
    let mut config = support::proxy::config_for(dc, UpstreamTls::None);
    config.limits.literal = 1024 * 1024;
    let proxy = Proxy::start(config).await;
    let (mut c, _) = login_tls(&proxy, dc).await;
    let r = c.cmd("a1 APPEND INBOX {2000000}").await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].starts_with("a1 NO [TOOBIG] "), "{r:?}");
    // The session is intact, and nothing of the refused APPEND reached the server.
    c.ok("a2 SELECT INBOX").await;
    let status = c.ok("a3 STATUS INBOX (MESSAGES)").await;
    assert!(
        status.iter().any(|l| l.contains("MESSAGES 0")),
        "{status:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compress_is_refused_by_the_proxy() {
    let dc = Dovecot::start(DovecotOptions {
        compress: true,
        ..DovecotOptions::default()
    });
    let proxy = Proxy::for_dovecot(&dc, UpstreamTls::None).await;
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    let login = c.login("alice", "alicepw").await;
    let mut caps = capabilities(&login);
    caps.extend(capabilities(&c.ok("a1 CAPABILITY").await));
    assert!(!caps.is_empty());
    assert!(!caps.iter().any(|c| c.starts_with("COMPRESS")), "{caps:?}");
    let r = c.no("a2 COMPRESS DEFLATE").await;
    assert!(r[0].starts_with("a2 NO [CANNOT]"), "{r:?}");
    c.ok("a3 NOOP").await;
    proxy.shutdown().await;
}

/// Plain TCP on both legs: a streamed literal goes from socket to socket through a pipe
/// (splice(2) on Linux) instead of through imapgate's memory. The client reads nothing until
/// part of the first literal is in flight, so the pipe fills and waits on the client; commands
/// pipelined behind the FETCH, and the responses after each literal, keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_legs_pass_large_literals_byte_identical_and_in_order() {
    let _busy = crate::support::busy().await;
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr(PLAIN)).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    let big = message(3 * 1024 * 1024, 11);
    let medium = message(300 * 1024, 12);
    c.append("a1", "INBOX", &big).await;
    c.append("a2", "INBOX", &medium).await;
    c.ok("a3 SELECT INBOX").await;
    let spliced = || {
        sample(
            &proxy.server().metrics().render(),
            "imapgate_spliced_bytes_total",
        )
    };
    let before = spliced();
    c.send(b"a4 FETCH 1:2 BODY.PEEK[]\r\na5 NOOP\r\na6 FETCH 2 BODY.PEEK[]\r\n")
        .await;
    if cfg!(target_os = "linux") {
        poll(
            "part of the literal to pass",
            Duration::from_secs(30),
            || (spliced() > before).then_some(()),
        )
        .await;
    }
    // Dovecot runs pipelined commands concurrently and may complete them in any order
    // (RFC 3501 section 5.5); the untagged data of each FETCH comes in order.
    let mut literals = Vec::new();
    let mut tagged = Vec::new();
    while tagged.len() < 3 {
        let response = c.read_response_bytes().await;
        if response.starts_with(b"* ") && response.windows(5).any(|w| w == b"FETCH") {
            literals.push(literal_of(&response).to_vec());
        } else if let Some(tag) = [&b"a4 OK"[..], b"a5 OK", b"a6 OK"]
            .into_iter()
            .find(|t| response.starts_with(t))
        {
            tagged.push(tag);
        } else {
            panic!("unexpected: {:?}", String::from_utf8_lossy(&response));
        }
    }
    assert_eq!(literals.len(), 3);
    assert!(literals[0] == big, "the 3 MiB literal differs");
    assert!(
        literals[1] == medium && literals[2] == medium,
        "a 300 KiB literal differs"
    );
    if cfg!(target_os = "linux") {
        // Nearly all of the three literals went around imapgate's memory (what arrived in
        // the same read as a literal's announcement went through it).
        let passed = spliced() - before;
        let total = (big.len() + 2 * medium.len()) as f64;
        assert!(passed > total / 2.0, "{passed} of {total} bytes spliced");
    }
    c.logout().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_fetch_closes_only_that_session() {
    upstream_killed_mid_fetch(false).await;
}

/// The same with plain legs: the upstream dies while its literal passes through the pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_splice_closes_only_that_session() {
    upstream_killed_mid_fetch(true).await;
}

async fn upstream_killed_mid_fetch(plain: bool) {
    let _busy = crate::support::busy().await;
    let dc = Dovecot::start(DovecotOptions {
        extra_config: "verbose_proctitle = yes\n".into(),
        ..DovecotOptions::default()
    });
    let proxy = Proxy::for_dovecot(&dc, UpstreamTls::None).await;
    let mut victim = if plain {
        Client::connect(proxy.addr(PLAIN)).await
    } else {
        Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await
    };
    victim.read_greeting().await;
    victim.login("alice", "alicepw").await;
    victim
        .append("v1", "INBOX", &message(40 * 1024 * 1024, 9))
        .await;
    victim.ok("v2 SELECT INBOX").await;
    let mut bystander = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    bystander.read_greeting().await;
    bystander.login("bob", "bobpw").await;

    // Ask for the big message but do not read it: the relay fills up and waits. The FETCH
    // is under way once a MiB of it has come from the server.
    let from_server = || {
        sample(
            &proxy.server().metrics().render(),
            "imapgate_bytes_total{direction=\"upstream_to_client\"}",
        )
    };
    let before = from_server();
    victim.send_line("v3 FETCH 1 BODY.PEEK[]").await;
    poll("the FETCH to stream", Duration::from_secs(30), || {
        (from_server() > before + 1024.0 * 1024.0).then_some(())
    })
    .await;
    let imap = dc.processes_matching("imap [alice");
    assert_eq!(
        imap.len(),
        1,
        "alice's imap process of this Dovecot: {imap:?}"
    );
    support::signal_pid(imap[0], "KILL");

    let received = victim.expect_closed().await;
    assert!(
        received.len() < 40 * 1024 * 1024,
        "the whole message arrived"
    );
    bystander.ok("b1 SELECT INBOX").await;
    bystander.logout().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_login_commands_are_all_relayed() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.ok("p1 CAPABILITY").await;
    c.ok("p2 NOOP").await;
    let id = c.ok("p3 ID (\"name\" \"imapgate-test\")").await;
    assert!(id.iter().any(|l| l.starts_with("* ID ")), "{id:?}");
    c.no(&format!("p4 LOGIN {} {}", quote("alice"), quote("wrong")))
        .await;
    c.logout().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_keep_their_order() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let (mut c, _) = login_tls(&proxy, dc).await;
    let mut burst = String::new();
    for i in 0..50 {
        burst.push_str(&format!("p{i} NOOP\r\n"));
    }
    c.send(burst.as_bytes()).await;
    for i in 0..50 {
        let r = c.read_until_tagged(&format!("p{i}")).await;
        assert_tagged(&r, &format!("p{i}"), "OK");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_client_still_gets_its_answers() {
    let dc = Dovecot::shared();
    let proxy = Proxy::for_dovecot(dc, UpstreamTls::None).await;
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(proxy.addr(PLAIN)).await;
    c.read_greeting().await;
    // Pipeline everything, then close the sending side at once.
    c.send(format!("h1 LOGIN {user} {pass}\r\nh2 SELECT INBOX\r\nh3 LOGOUT\r\n").as_bytes())
        .await;
    c.shutdown().await;
    let rest = String::from_utf8_lossy(&c.expect_closed().await).into_owned();
    assert!(rest.contains("h1 OK"), "{rest}");
    assert!(rest.contains("h2 OK"), "{rest}");
    assert!(rest.contains("* BYE"), "{rest}");
    assert!(rest.contains("h3 OK"), "{rest}");
    proxy.shutdown().await;
}
