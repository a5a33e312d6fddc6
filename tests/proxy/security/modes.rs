//! Modes that change how the next client bytes are read (SASL lines, literal data) begin only
//! when the server says `+`; and a response nobody judged trips the session (findings 2, 3;
//! the desync tripwire of "Must show").

use std::time::Duration;

use super::{
    Gate, JAIL, PATIENCE, assert_answer, assert_refused_or_bye, direct, dovecot, server_mailboxes,
    shipped, tagged,
};
use crate::support::evidence::sample;

/// A user whose account holds `Private/Secret` (one message, outside the jail) and `Jail/Box`.
async fn user_with_a_secret() -> (String, String) {
    let (user, pass) = dovecot().fresh_user();
    let mut d = direct(&user, &pass).await;
    d.ok("d1 CREATE Private/Secret").await;
    d.append("d2", "Private/Secret", b"Subject: secret\r\n\r\nsecret\r\n")
        .await;
    d.ok("d3 CREATE Jail/Box").await;
    d.logout().await;
    (user, pass)
}

/// Finding 2: AUTHENTICATE after login. One write, after a login, through the namespace jail
/// and a search rate limit:
///
/// ```text
/// C: x AUTHENTICATE PLAIN
/// C: y SELECT Private/Secret
/// C: z STORE 1 +FLAGS (\Flagged)
/// C: w CREATE Private/Planted
/// S: x BAD ...                 (imapgate: AUTHENTICATE is not valid after login)
/// S: y NO [CANNOT] ...         (namespace: outside the jail)
/// S: z BAD ...                 (no mailbox selected)
/// S: w NO [CANNOT] ...
/// ```
///
/// Today imapgate enters SASL mode on the AUTHENTICATE line although the server refuses it,
/// and relays the next lines unparsed: Dovecot selects Private/Secret, flags its message and
/// creates Private/Planted, every policy bypassed; the audit log records a failed login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f02_authenticate_after_login_does_not_open_a_raw_channel() {
    let (user, pass) = user_with_a_secret().await;
    let gate = Gate::start(vec![
        shipped("namespace.lua", JAIL),
        shipped("search_rate_limit.lua", ""),
    ])
    .await;
    let mut c = gate.logged_in(&user, &pass).await;
    c.send(
        b"x AUTHENTICATE PLAIN\r\ny SELECT Private/Secret\r\n\
          z STORE 1 +FLAGS (\\Flagged)\r\nw CREATE Private/Planted\r\n",
    )
    .await;
    let r = c.collect_until("w", PATIENCE).await;

    // The server: the secret message untouched, nothing planted outside the jail.
    let mut d = direct(&user, &pass).await;
    d.ok("d1 EXAMINE Private/Secret").await;
    let flags = d.ok("d2 FETCH 1 FLAGS").await;
    assert!(
        !flags.iter().any(|l| l.contains("\\Flagged")),
        "Dovecot flagged the message outside the jail: {flags:?}"
    );
    let boxes = server_mailboxes(&mut d).await;
    assert!(
        !boxes.iter().any(|b| b == "Private/Planted"),
        "Dovecot created a mailbox outside the jail: {boxes:?}"
    );
    let received = gate.server_received();
    assert!(
        !received.contains("AUTHENTICATE") && !received.contains("Private/"),
        "reached Dovecot:\n{received}"
    );
    // The client: each line refused by imapgate.
    assert_answer(&r, "x", "BAD");
    assert_answer(&r, "y", "NO [CANNOT]");
    assert_refused_or_bye(&r, "z");
    assert_answer(&r, "w", "NO [CANNOT]");
    // No bogus failed login in the audit log.
    c.ok("n1 NOOP").await;
    let audit = gate.audit();
    assert!(
        !audit
            .iter()
            .any(|r| r["event"] == "login" && r["result"] != "ok"),
        "{audit:?}"
    );
}

/// Finding 3: a synchronizing literal the server refuses. One write, after a login through the
/// namespace jail (INBOX.Missing is the server's Jail/Missing, which does not exist):
///
/// ```text
/// C: a APPEND INBOX.Missing {26}
/// C: b CREATE Private/Planted          (26 bytes, sent without waiting for "+")
/// S: a NO [TRYCREATE] ...               (the server's answer instead of "+")
/// S: b NO [CANNOT] ...                  (imapgate read the held bytes as a command)
/// ```
///
/// Today imapgate takes the 26 bytes as literal data although the server never said `+`, and
/// sends them on unparsed: Dovecot creates Private/Planted outside the jail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f03_refused_literal_data_is_read_as_commands() {
    let (user, pass) = user_with_a_secret().await;
    let gate = Gate::start(vec![shipped("namespace.lua", JAIL)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    let hidden = "b CREATE Private/Planted\r\n";
    c.send(format!("a APPEND INBOX.Missing {{{}}}\r\n{hidden}", hidden.len()).as_bytes())
        .await;
    let r = c.collect_until("b", PATIENCE).await;

    let mut d = direct(&user, &pass).await;
    let boxes = server_mailboxes(&mut d).await;
    assert!(
        !boxes
            .iter()
            .any(|b| b.starts_with("Private/") && b != "Private/Secret"),
        "Dovecot created a mailbox outside the jail: {boxes:?}"
    );
    let received = gate.server_received();
    assert!(
        !received.contains("Private/"),
        "reached Dovecot:\n{received}"
    );
    assert_answer(&r, "a", "NO [TRYCREATE]");
    assert_answer(&r, "b", "NO [CANNOT]");
}

/// Finding 3, an honest client: python's imaplib APPENDs to a missing folder, gets
/// `NO [TRYCREATE]` instead of `+` (so it never sends the literal), CREATEs the folder and
/// APPENDs again, through the namespace jail.
///
/// Today imapgate takes the CREATE line for the APPEND's literal data: the folder is never
/// created in the jail (and the untranslated CREATE makes `INBOX.Missing` outside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f03_imaplib_append_trycreate_create_append() {
    let (user, pass) = dovecot().fresh_user();
    let gate = Gate::start(vec![shipped("namespace.lua", JAIL)]).await;
    let addr = gate.proxy.addr(crate::support::proxy::PLAIN);
    let script = r#"
import imaplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
m = imaplib.IMAP4(host, port, timeout=10)
m.login(user, password)
msg = b"Subject: trycreate\r\n\r\n" + b"x" * 200 + b"\r\n"
typ, data = m.append("INBOX.Missing", None, None, msg)
print("append1", typ, data)
if typ == "NO" and b"TRYCREATE" in data[0]:
    print("create", m.create("INBOX.Missing"))
    typ, data = m.append("INBOX.Missing", None, None, msg)
    print("append2", typ, data)
m.logout()
sys.exit(0 if typ == "OK" else 1)
"#;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(&user)
            .arg(&pass)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("imaplib finished within 60 s")
    .expect("run python3");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut d = direct(&user, &pass).await;
    let boxes = server_mailboxes(&mut d).await;
    assert!(
        boxes
            .iter()
            .all(|b| b == "INBOX" || b == "Jail" || b.starts_with("Jail/")),
        "Dovecot has a mailbox outside the jail: {boxes:?}\nimaplib: {said}"
    );
    assert_eq!(
        super::server_messages(&mut d, "Jail/Missing").await,
        Some(1),
        "the message is not in the jail's folder; mailboxes {boxes:?}\nimaplib: {said}"
    );
    assert!(out.status.success(), "imaplib: {said}");
}

/// The desync tripwire: every tagged response must answer a command imapgate judged, and a
/// `+` must answer a command waiting for one. The tap plays a hostile network that slips a
/// command of its own to Dovecot, which answers it:
///
/// ```text
/// (to Dovecot, not from imapgate)  zz NOOP
/// S: zz OK NOOP completed.          (a tag imapgate never sent)
/// (to the client)                   * BYE ...   and the connection closes
/// ```
///
/// and likewise `zz APPEND INBOX {5}`, whose `+` nobody asked for. Each counts in
/// `imapgate_desync_total`. Today imapgate relays the stray response and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tripwire_unjudged_tagged_response_or_continuation_ends_the_session() {
    let (user, pass) = dovecot().fresh_user();
    let gate = Gate::start(Vec::new()).await;
    let strays: [(&[u8], &str); 2] = [
        (b"zz NOOP\r\n", "zz OK"),
        (b"zz APPEND INBOX {5}\r\n", "+ "),
    ];
    for (i, (stray, server_says)) in strays.iter().enumerate() {
        let mut c = gate.logged_in(&user, &pass).await;
        c.ok("a1 SELECT INBOX").await;
        let conn = gate.tap.connections() - 1;
        gate.tap.inject(conn, stray);
        gate.tap
            .wait_to_client(conn, PATIENCE, |t| t.contains(server_says))
            .await;
        let r = c.collect_until("never", PATIENCE).await;
        assert!(
            r.iter().any(|l| l.starts_with("* BYE")) && c.is_closed(),
            "after the server's unasked {server_says:?} the session went on: {r:?}"
        );
        assert!(tagged(&r, "zz").is_none(), "relayed: {r:?}");
        let scrape = gate.scrape().await;
        assert_eq!(
            sample(&scrape, "imapgate_desync_total"),
            (i + 1) as f64,
            "{scrape}"
        );
    }
}
