//! Before login: no login over plaintext where require_tls is on, no credential forwarded
//! before TLS, and the audit log names the user of every login form (findings 1, 9, 11, 13).

use serde_json::Value;

use super::{
    Gate, PATIENCE, assert_answer, assert_refused_or_bye, b64, direct, dovecot, plain_b64, shipped,
};
use crate::support::Client;
use crate::support::evidence::{dovecot_logins, poll, sample};
use crate::support::proxy::STARTTLS;

/// After a hostile exchange with `user`: a direct login as `user`, awaited in Dovecot's log,
/// then the number of Dovecot login lines for `user` must be exactly that one. (The marker
/// login orders the check after anything the exchange could have caused.)
async fn assert_no_server_login(user: &str, pass: &str) {
    let mut marker = direct(user, pass).await;
    let lines = poll("the marker login in Dovecot's log", PATIENCE, || {
        let l = dovecot_logins(dovecot(), user);
        (!l.is_empty()).then_some(l)
    })
    .await;
    marker.logout().await;
    assert_eq!(
        lines.len(),
        1,
        "Dovecot logged {user} in besides the test's own direct login:\n{}",
        lines.join("\n")
    );
}

/// Ends a hostile exchange: LOGOUT, read until its answer or the end of the connection.
/// Whatever imapgate forwarded for the earlier commands has reached the tap by then.
async fn finish(c: &mut Client) -> Vec<String> {
    if c.is_closed() {
        return Vec::new();
    }
    c.send(b"zz LOGOUT\r\n").await;
    c.collect_until("zz", PATIENCE).await
}

/// Finding 1, first form. On a STARTTLS listener with require_tls, one write without STARTTLS:
///
/// ```text
/// C: a IDLE
/// C: b LOGIN user pass
/// S: a BAD ...                         (imapgate: IDLE is not valid before login)
/// S: b NO [PRIVACYREQUIRED] ...        (require_tls)
/// ```
///
/// Today imapgate forwards the pre-login IDLE and takes the LOGIN line for its DONE; Dovecot
/// refuses the IDLE and runs the LOGIN: the client is logged in over plaintext and neither the
/// audit log nor `imapgate_logins_total` sees a login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f01_idle_before_login_does_not_smuggle_a_plaintext_login() {
    let gate = Gate::start(vec![shipped("require_tls.lua", "")]).await;
    let (user, pass) = dovecot().fresh_user();
    let mut c = gate.client(STARTTLS).await;
    c.send(format!("a IDLE\r\nb LOGIN {user} {pass}\r\n").as_bytes())
        .await;
    let r = c.collect_until("b", PATIENCE).await;
    finish(&mut c).await;

    // The server: nobody logged in, and neither the IDLE nor the credential arrived.
    assert_no_server_login(&user, &pass).await;
    let received = gate.server_received();
    assert!(
        !received.contains("IDLE") && !received.contains(&pass),
        "reached Dovecot:\n{received}"
    );
    // The client: both refused by imapgate.
    assert_answer(&r, "a", "BAD");
    assert_answer(&r, "b", "NO [PRIVACYREQUIRED]");
    // imapgate saw the login attempt it refused.
    let scrape = gate.scrape().await;
    assert_eq!(
        sample(&scrape, "imapgate_logins_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(sample(&scrape, "imapgate_logins_total{result=\"ok\"}"), 0.0);
}

/// Finding 1, second form: a literal8 that the server refuses before login, whose N bytes are
/// a LOGIN line. One write:
///
/// ```text
/// C: a NOOP ~{N+}
/// C: b LOGIN user pass                 (the N bytes of the literal)
/// S: a BAD ...                         (imapgate: literal8 without BINARY, before login)
/// ```
///
/// Today imapgate forwards the literal; Dovecot rejects the literal8 and then reads its N
/// bytes as a command: a plaintext login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f01_refused_literal8_before_login_does_not_smuggle_a_plaintext_login() {
    let gate = Gate::start(vec![shipped("require_tls.lua", "")]).await;
    let (user, pass) = dovecot().fresh_user();
    let mut c = gate.client(STARTTLS).await;
    let login = format!("b LOGIN {user} {pass}\r\n");
    let mut bytes = format!("a NOOP ~{{{}+}}\r\n", login.len()).into_bytes();
    bytes.extend_from_slice(login.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    c.send(&bytes).await;
    let r = c.collect_until("a", PATIENCE).await;
    let rest = finish(&mut c).await;

    assert_no_server_login(&user, &pass).await;
    let received = gate.server_received();
    assert!(
        !received.contains(&pass) && !received.contains('~'),
        "reached Dovecot:\n{received}"
    );
    assert_refused_or_bye(&r, "a");
    assert!(
        !r.iter().chain(&rest).any(|l| l.starts_with("b OK")),
        "{r:?} {rest:?}"
    );
}

/// Finding 9: credentials in forms imapgate does not take for a login, before TLS. Each on a
/// fresh connection to a STARTTLS listener with require_tls:
///
/// ```text
/// C: a UID LOGIN user pass
/// S: a BAD ...                  (imapgate: LOGIN is not a UID command; nothing forwarded)
/// C: a UID AUTHENTICATE PLAIN <base64>
/// C: * LOGIN user pass          (untagged)
/// C: LOGIN user pass            (no tag: "user" is no command)
/// ```
///
/// Today all four are forwarded with the password in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f09_credentials_before_tls_are_never_forwarded() {
    let gate = Gate::start(vec![shipped("require_tls.lua", "")]).await;
    let (user, pass) = dovecot().fresh_user();
    let sasl = plain_b64(&user, &pass);
    let attacks = [
        ("a", format!("a UID LOGIN {user} {pass}")),
        ("a", format!("a UID AUTHENTICATE PLAIN {sasl}")),
        ("*", format!("* LOGIN {user} {pass}")),
        ("LOGIN", format!("LOGIN {user} {pass}")),
    ];
    for (tag, line) in &attacks {
        let mut c = gate.client(STARTTLS).await;
        c.send_line(line).await;
        let mut r = c.collect_until(tag, PATIENCE).await;
        r.extend(finish(&mut c).await);
        let received = gate.server_received();
        assert!(
            !received.contains(&pass) && !received.contains(&sasl),
            "{line:?} reached Dovecot:\n{received}"
        );
        assert!(
            !r.iter().any(|l| l.contains(" OK ") && l.starts_with(tag)),
            "{line:?}: {r:?}"
        );
    }
    assert_no_server_login(&user, &pass).await;
}

/// The login records of an audit log.
fn logins(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["event"] == "login").collect()
}

/// Finding 11: the audit record of a refused login names the user the client gave (the README
/// promises it). On a STARTTLS listener with require_tls, before STARTTLS:
///
/// ```text
/// C: a LOGIN user pass
/// S: a NO [PRIVACYREQUIRED] ...
/// C: b AUTHENTICATE PLAIN <base64 of \0user\0pass>
/// S: b NO [PRIVACYREQUIRED] ...
/// ```
///
/// Today both records say `"user": null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f11_refused_login_audit_record_names_the_user() {
    let gate = Gate::start(vec![shipped("require_tls.lua", "")]).await;
    let (user, pass) = dovecot().fresh_user();
    let mut c = gate.client(STARTTLS).await;
    c.no(&format!("a LOGIN {user} {pass}")).await;
    c.no(&format!("b AUTHENTICATE PLAIN {}", plain_b64(&user, &pass)))
        .await;
    c.logout().await;

    // The server never saw a credential.
    let received = gate.server_received();
    assert!(!received.contains(&pass), "{received}");
    let records = poll("two login records", PATIENCE, || {
        let all = gate.audit();
        (logins(&all).len() >= 2).then_some(all)
    })
    .await;
    for record in logins(&records) {
        assert_eq!(record["result"], "refused", "{record}");
        assert_eq!(record["tls"], false, "{record}");
        assert_eq!(record["user"], user.as_str(), "{record}");
    }
}

/// Finding 13: the user is known after every login form, not only LOGIN and SASL-IR. The same
/// user logs in three ways through a search rate limit of 2 per user:
///
/// ```text
/// session 1:  C: l1 LOGIN user pass                     S: l1 OK
///             C: s1 SEARCH ALL / s2 SEARCH ALL          S: OK, OK   (the user's 2 tokens)
/// session 2:  C: a AUTHENTICATE PLAIN                   S: +
///             C: <base64 of \0user\0pass>               S: a OK
///             C: s3 SEARCH ALL                          S: s3 NO [LIMIT]  (same user)
/// session 3:  C: a AUTHENTICATE LOGIN                   S: + VXNlcm5hbWU6
///             C: <base64 user>                          S: + UGFzc3dvcmQ6
///             C: <base64 pass>                          S: a OK
/// ```
///
/// Dovecot logs all three logins for the user; the audit log must name the user in each.
/// Today sessions 2 and 3 have `"user": null`, and session 2's SEARCH falls back to the
/// address's bucket and reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f13_user_known_after_authenticate_without_sasl_ir() {
    let gate = Gate::start(vec![shipped(
        "search_rate_limit.lua",
        "per_second = 0.001\nburst = 2\nmode = \"reject\"",
    )])
    .await;
    let (user, pass) = dovecot().fresh_user();
    let mut one = gate.logged_in(&user, &pass).await;
    one.ok("s0 SELECT INBOX").await;
    one.ok("s1 SEARCH ALL").await;
    one.ok("s2 SEARCH ALL").await;

    let mut two = gate.tls_client().await;
    two.send_line("a AUTHENTICATE PLAIN").await;
    let cont = two.read_response().await;
    assert!(cont.starts_with('+'), "{cont}");
    two.send_line(&plain_b64(&user, &pass)).await;
    let r = two.read_until_tagged("a").await;
    assert_answer(&r, "a", "OK");
    two.ok("s0 SELECT INBOX").await;
    let search = two.cmd("s3 SEARCH ALL").await;

    let mut three = gate.tls_client().await;
    three.send_line("a AUTHENTICATE LOGIN").await;
    assert!(three.read_response().await.starts_with('+'));
    three.send_line(&b64(&user)).await;
    assert!(three.read_response().await.starts_with('+'));
    three.send_line(&b64(&pass)).await;
    let r = three.read_until_tagged("a").await;
    assert_answer(&r, "a", "OK");
    three.logout().await;

    // The server: three logins of this user, by three mechanisms.
    let lines = poll("three logins in Dovecot's log", PATIENCE, || {
        let l = dovecot_logins(dovecot(), &user);
        (l.len() >= 3).then_some(l)
    })
    .await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    // Only the two searches within the user's budget reached it.
    let received = gate.server_received();
    assert_eq!(
        super::count_ci(&received, " SEARCH ALL"),
        2,
        "searches that reached Dovecot:\n{received}"
    );
    assert_answer(&search, "s3", "NO [LIMIT]");
    let records = poll("three login records", PATIENCE, || {
        let all = gate.audit();
        (logins(&all).len() >= 3).then_some(all)
    })
    .await;
    for record in logins(&records) {
        assert_eq!(record["result"], "ok", "{record}");
        assert_eq!(record["user"], user.as_str(), "{record}");
    }
}
