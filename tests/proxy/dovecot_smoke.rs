//! Proves the test harness: a private real Dovecot, the test PKI and the test client,
//! talking to Dovecot directly (no proxy in between).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support;
use support::{Client, Dovecot, DovecotOptions, capabilities, generated_user};

const MESSAGE: &[u8] = b"From: alice@example.test\r\n\
To: bob@example.test\r\n\
Subject: harness roundtrip\r\n\
\r\n\
Hello from the imapgate test harness.\r\n";

#[tokio::test]
async fn login_over_plain_port() {
    let dc = Dovecot::shared();
    let mut c = Client::connect(dc.addr()).await;
    let greeting = c.read_greeting().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let r = c.ok("a1 LOGIN alice alicepw").await;
    assert!(r.last().unwrap().starts_with("a1 OK"), "{r:?}");
    c.logout().await;
    c.expect_closed().await;
}

#[tokio::test]
async fn wrong_password_is_refused_without_growing_delay() {
    let dc = Dovecot::shared();
    let (user, _) = dc.fresh_user();
    let started = Instant::now();
    for i in 0..4 {
        let mut c = Client::connect(dc.addr()).await;
        c.read_greeting().await;
        c.no(&format!("a{i} LOGIN {user} wrong-password")).await;
    }
    // Dovecot answers a failure on its next 0.5 s tick; its per-IP penalty (4 s and more
    // from the second failure on) must be off, or tests of refused logins crawl.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "4 failed logins took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn starttls_is_offered_on_the_plain_port_and_works() {
    let dc = Dovecot::shared();
    let mut c = Client::connect(dc.addr()).await;
    let greeting = c.read_greeting().await;
    assert!(
        capabilities(std::slice::from_ref(&greeting)).contains(&"STARTTLS".to_string()),
        "{greeting}"
    );
    let caps = capabilities(&c.ok("a1 CAPABILITY").await);
    assert!(caps.contains(&"STARTTLS".to_string()), "{caps:?}");

    c.starttls("a2", dc.ca_pem()).await;
    assert!(c.is_tls());
    let caps = capabilities(&c.ok("a3 CAPABILITY").await);
    assert!(!caps.contains(&"STARTTLS".to_string()), "{caps:?}");
    c.login("bob", "bobpw").await;
    c.logout().await;
}

#[tokio::test]
async fn login_over_tls_port_with_the_test_ca() {
    let dc = Dovecot::shared();
    let mut c = Client::connect_tls(dc.tls_addr(), dc.ca_pem()).await;
    assert!(c.is_tls());
    let greeting = c.read_greeting().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.login("alice", "alicepw").await;
    c.logout().await;
}

#[tokio::test]
async fn tls_with_an_unknown_ca_fails() {
    let dc = Dovecot::shared();
    let other = support::Pki::generate(&support::temp_dir().path().join("pki"));
    let tcp = tokio::net::TcpStream::connect(dc.tls_addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let result = tokio_rustls::TlsConnector::from(support::tls_config(&other.ca_pem))
        .connect(name, tcp)
        .await;
    assert!(result.is_err(), "handshake with a foreign CA succeeded");
}

#[tokio::test]
async fn create_append_fetch_roundtrip() {
    let dc = Dovecot::shared();
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(dc.addr()).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;

    c.ok("a1 CREATE Harness").await;
    // A synchronizing literal: the client waits for Dovecot's "+".
    let r = c
        .cmd_with_literals(&[
            format!("a2 APPEND Harness (\\Seen) {{{}}}", MESSAGE.len()).as_bytes(),
            MESSAGE,
            b"",
        ])
        .await;
    assert!(
        r.iter().any(|l| l.starts_with('+')),
        "no continuation: {r:?}"
    );
    support::assert_tagged(&r, "a2", "OK");
    // A non-synchronizing literal (LITERAL+).
    let r = c
        .cmd_with_literals(&[
            format!("a3 APPEND Harness {{{}+}}", MESSAGE.len()).as_bytes(),
            MESSAGE,
            b"",
        ])
        .await;
    assert!(!r.iter().any(|l| l.starts_with('+')), "{r:?}");
    support::assert_tagged(&r, "a3", "OK");

    let r = c.ok("a4 SELECT Harness").await;
    assert!(r.iter().any(|l| l == "* 2 EXISTS"), "{r:?}");
    let r = c.ok("a5 FETCH 1 (FLAGS BODY.PEEK[])").await;
    let fetch = &r[0];
    assert!(fetch.starts_with("* 1 FETCH ("), "{r:?}");
    assert!(fetch.contains("\\Seen"), "{fetch}");
    let literal = format!("{{{}}}\r\n", MESSAGE.len());
    assert!(
        fetch.contains(&(literal + std::str::from_utf8(MESSAGE).unwrap())),
        "message not returned as a literal: {fetch:?}"
    );

    // The message is a file in the user's Maildir.
    let cur = dc.maildir_of(&user).join(".Harness").join("cur");
    let new = dc.maildir_of(&user).join(".Harness").join("new");
    let files = std::fs::read_dir(&cur)
        .into_iter()
        .chain(std::fs::read_dir(&new))
        .flatten()
        .count();
    assert_eq!(files, 2, "messages in {}", cur.display());
    c.logout().await;
}

#[tokio::test]
async fn fresh_users_do_not_share_mailboxes() {
    let dc = Dovecot::shared();
    let (u1, p1) = dc.fresh_user();
    let (u2, p2) = dc.fresh_user();
    assert_ne!(u1, u2);
    let mut c1 = Client::connect(dc.addr()).await;
    c1.read_greeting().await;
    c1.login(&u1, &p1).await;
    c1.ok("a1 CREATE OnlyMine").await;
    let mut c2 = Client::connect(dc.addr()).await;
    c2.read_greeting().await;
    c2.login(&u2, &p2).await;
    let r = c2.ok("b1 LIST \"\" \"*\"").await;
    assert!(!r.iter().any(|l| l.contains("OnlyMine")), "{r:?}");
}

#[tokio::test]
async fn two_private_dovecots_at_once() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Dovecot::start(DovecotOptions::default()));
        let b = s.spawn(|| Dovecot::start(DovecotOptions::default()));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.addr(), b.addr());
    assert_ne!(a.dir(), b.dir());

    let mut ca = Client::connect(a.addr()).await;
    ca.read_greeting().await;
    ca.login("alice", "alicepw").await;
    ca.append("a1", "INBOX", MESSAGE).await;

    let mut cb = Client::connect(b.addr()).await;
    cb.read_greeting().await;
    cb.login("alice", "alicepw").await;
    let r = cb.ok("b1 SELECT INBOX").await;
    assert!(r.iter().any(|l| l == "* 0 EXISTS"), "{r:?}");
    let r = ca.ok("a2 SELECT INBOX").await;
    assert!(r.iter().any(|l| l == "* 1 EXISTS"), "{r:?}");
}

#[tokio::test]
async fn separator_option_gives_slash_delimiter() {
    let dc = Dovecot::start(DovecotOptions {
        separator: Some('/'),
        ..Default::default()
    });
    let mut c = Client::connect(dc.addr()).await;
    c.read_greeting().await;
    c.login("alice", "alicepw").await;
    let r = c.ok("a1 LIST \"\" \"\"").await;
    assert!(
        r[0].starts_with("* LIST (") && r[0].contains(") \"/\" "),
        "{r:?}"
    );
    c.ok("a2 CREATE Work/Projects").await;
    let r = c.ok("a3 LIST \"\" \"Work/*\"").await;
    assert!(
        r.iter().any(|l| l.ends_with("\"/\" Work/Projects")),
        "{r:?}"
    );
}

#[tokio::test]
async fn default_delimiter_is_dot_and_prefix_option_applies() {
    let dc = Dovecot::shared();
    let (user, pass) = dc.fresh_user();
    let mut c = Client::connect(dc.addr()).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    let r = c.ok("a1 LIST \"\" \"\"").await;
    assert!(r[0].contains(") \".\" "), "{r:?}");

    let dc = Dovecot::start(DovecotOptions {
        separator: Some('.'),
        prefix: Some("INBOX.".into()),
        ..Default::default()
    });
    let mut c = Client::connect(dc.addr()).await;
    c.read_greeting().await;
    c.login("bob", "bobpw").await;
    let r = c.ok("a1 NAMESPACE").await;
    assert!(
        r[0].starts_with("* NAMESPACE ((\"INBOX.\" \".\"))"),
        "{r:?}"
    );
    c.ok("a2 CREATE INBOX.Sent").await;
    let r = c.ok("a3 LIST \"\" \"*\"").await;
    assert!(r.iter().any(|l| l.ends_with(" INBOX.Sent")), "{r:?}");
}

#[tokio::test]
async fn compress_option_advertises_deflate_after_login() {
    let plain = Dovecot::shared();
    let mut c = Client::connect(plain.addr()).await;
    c.read_greeting().await;
    let caps = capabilities(&c.login("alice", "alicepw").await);
    assert!(!caps.iter().any(|c| c.starts_with("COMPRESS")), "{caps:?}");

    let dc = Dovecot::start(DovecotOptions {
        compress: true,
        ..Default::default()
    });
    let mut c = Client::connect(dc.addr()).await;
    let greeting = c.read_greeting().await;
    assert!(!greeting.contains("COMPRESS"), "{greeting}");
    c.login("alice", "alicepw").await;
    let caps = capabilities(&c.ok("a1 CAPABILITY").await);
    assert!(caps.contains(&"COMPRESS=DEFLATE".to_string()), "{caps:?}");
}

#[tokio::test]
async fn generated_and_added_users_can_log_in() {
    let dc = Dovecot::start(DovecotOptions {
        generated_users: 3,
        users: vec![("carol".into(), "carolpw".into())],
        ..Default::default()
    });
    let (user, pass) = generated_user(2);
    let mut c = Client::connect(dc.addr()).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    c.logout().await;

    for (user, pass) in [("carol", "carolpw"), ("dave", "davepw")] {
        if user == "dave" {
            dc.add_user("dave", "davepw");
        }
        let mut c = Client::connect(dc.addr()).await;
        c.read_greeting().await;
        c.login(user, pass).await;
        c.logout().await;
    }
}

async fn concurrent_sessions(dc: &Dovecot, sessions: usize) {
    let (user, pass) = dc.fresh_user();
    let mut tasks = Vec::new();
    for i in 0..sessions {
        let (addr, user, pass) = (dc.addr(), user.clone(), pass.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.read_greeting().await;
            c.login(&user, &pass).await;
            c.ok(&format!("s{i} STATUS INBOX (MESSAGES)")).await;
            c
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    for c in &mut clients {
        c.logout().await;
    }
}

#[tokio::test]
async fn many_concurrent_sessions() {
    let _busy = crate::support::busy().await;
    concurrent_sessions(Dovecot::shared(), 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_sessions_in_shared_imap_processes() {
    let _busy = crate::support::busy().await;
    let dc = Dovecot::start(DovecotOptions {
        shared_imap_processes: true,
        ..Default::default()
    });
    concurrent_sessions(&dc, 200).await;
    let log = dc.log();
    assert!(!log.contains("Error") && !log.contains("Fatal"), "{log}");
}

#[tokio::test]
async fn dropping_a_dovecot_stops_it() {
    let dc = Dovecot::start(DovecotOptions::default());
    let (addr, pid, dir) = (dc.addr(), dc.pid(), dc.dir().to_path_buf());
    assert!(dc.log().contains("starting up"), "{}", dc.log());
    // A session in progress ends with Dovecot's BYE, at once.
    let mut c = Client::connect(addr).await;
    c.read_greeting().await;
    c.login("alice", "alicepw").await;
    let started = Instant::now();
    drop(dc);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stopping took {:?}",
        started.elapsed()
    );
    let rest = String::from_utf8_lossy(&c.expect_closed().await).into_owned();
    assert!(rest.starts_with("* BYE"), "{rest:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "dovecot master {pid} still running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
}

#[test]
#[should_panic(expected = "Unknown setting: no_such_setting")]
fn a_broken_config_fails_fast_with_the_dovecot_log() {
    Dovecot::start(DovecotOptions {
        extra_config: "no_such_setting = 1".into(),
        ..Default::default()
    });
}
