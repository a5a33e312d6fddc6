//! The namespace policy as a boundary: nothing outside the jail touched, nothing of the server's
//! form relayed when a hook fails, INBOX's children shown, and hidden entries kept out of the
//! audit log (findings 4, 6, 14, 15).

use super::{
    COURIER, Gate, JAIL, PATIENCE, assert_answer, direct, dovecot, list_names, local_policy,
    server_mailboxes, server_messages, shipped,
};
use crate::support::evidence::{poll, sum_samples};
use crate::support::proxy::PLAIN;

/// A user whose account holds `Private/Secret` (one message, outside the jail) and `Jail/Box`
/// (empty); returns the name, password and Private/Secret's UIDVALIDITY.
async fn user_with_a_secret() -> (String, String, u32) {
    let (user, pass) = dovecot().fresh_user();
    let mut d = direct(&user, &pass).await;
    d.ok("d1 CREATE Private/Secret").await;
    d.append("d2", "Private/Secret", b"Subject: secret\r\n\r\nsecret\r\n")
        .await;
    d.ok("d3 CREATE Jail/Box").await;
    let status = d.ok("d4 STATUS Private/Secret (UIDVALIDITY)").await;
    let uidvalidity = status
        .iter()
        .find_map(|l| l.split("UIDVALIDITY ").nth(1))
        .and_then(|v| v.trim_end_matches(')').parse().ok())
        .expect("UIDVALIDITY");
    d.logout().await;
    (user, pass, uidvalidity)
}

/// Finding 4: forms the namespace policy cannot translate are refused while the namespace is a
/// boundary (`upstream_prefix = "Jail/"`), never forwarded. After a login, one at a time:
///
/// ```text
/// C: a1 APPEND INBOX.Box CATENATE (URL "/Private/Secret;UIDVALIDITY=n/;UID=1")
/// S: a1 NO [CANNOT] ...
/// C: a2 ESEARCH IN (mailboxes "Private/Secret") ALL
/// C: a3 GENURLAUTH "imap://user@127.0.0.1/Private/Secret;...;urlauth=user+user" INTERNAL
/// C: a4 URLFETCH "imap://user@127.0.0.1/Private/Secret;UIDVALIDITY=n/;UID=1"
/// C: a5 XFROB Private/Secret
/// C: a6 NOTIFY SET (mailboxes Private/Secret (MessageNew))
/// (each: NO [CANNOT])
/// ```
///
/// Today every one is forwarded untranslated: the CATENATE copies the secret message into the
/// jail, and the NOTIFY makes Dovecot watch Private/Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f04_untranslatable_forms_are_refused_at_the_jail() {
    let (user, pass, v) = user_with_a_secret().await;
    let gate = Gate::start(vec![shipped("namespace.lua", JAIL)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    let url = format!("/Private/Secret;UIDVALIDITY={v}/;UID=1");
    let imap_url = format!("imap://{user}@127.0.0.1{url}");
    let attacks = [
        format!("a1 APPEND INBOX.Box CATENATE (URL \"{url}\")"),
        "a2 ESEARCH IN (mailboxes \"Private/Secret\") ALL".to_string(),
        format!("a3 GENURLAUTH \"{imap_url};urlauth=user+{user}\" INTERNAL"),
        format!("a4 URLFETCH \"{imap_url}\""),
        "a5 XFROB Private/Secret".to_string(),
        "a6 NOTIFY SET (mailboxes Private/Secret (MessageNew))".to_string(),
    ];
    let mut answers = Vec::new();
    for line in &attacks {
        let tag = crate::support::client::tag_of(line.as_bytes());
        c.send_line(line).await;
        answers.push((tag.clone(), c.collect_until(&tag, PATIENCE).await));
    }

    // The server: nothing copied into the jail, no command naming the outside.
    let mut d = direct(&user, &pass).await;
    assert_eq!(
        server_messages(&mut d, "Jail/Box").await,
        Some(0),
        "Dovecot copied the message from outside the jail into it"
    );
    let received = gate.server_received();
    assert!(
        !received.contains("Private/"),
        "reached Dovecot:\n{received}"
    );
    for (tag, r) in &answers {
        assert_answer(r, tag, "NO [CANNOT]");
    }
}

/// Finding 6, first form: an `on_response` hook that fails (namespace.lua's pattern matcher on
/// a 300-wildcard LIST: "pattern too complex") must not let the server's own names through:
///
/// ```text
/// C: a LIST "" "%%%...%%%"           (300 of them)
/// S: a OK ... or a NO [UNAVAILABLE] ...   and never a name in the server's form
/// ```
///
/// Today the failing hook's response is relayed unchanged: `"/" Jail/Box` reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f06_failing_namespace_hook_never_leaks_server_names() {
    let (user, pass, _) = user_with_a_secret().await;
    let gate = Gate::start(vec![shipped("namespace.lua", JAIL)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    let r = c.cmd(&format!("a LIST \"\" \"{}\"", "%".repeat(300))).await;
    // The server answered with its names (the tap saw them)...
    assert!(
        gate.tap.to_client_text().contains("Jail/Box"),
        "{}",
        gate.tap.to_client_text()
    );
    // ...which never reach the client in that form.
    assert_client_form(&r);
    let last = r.last().map(String::as_str).unwrap_or("");
    assert!(
        last.starts_with("a OK") || last.starts_with("a NO [UNAVAILABLE]"),
        "{r:?}"
    );
}

/// Panics if a response line shows a server-form name or delimiter.
fn assert_client_form(responses: &[String]) {
    for line in responses {
        assert!(
            !line.contains("Jail") && !line.contains("Private") && !line.contains("\"/\""),
            "server-form name relayed: {line:?}\nall: {responses:?}"
        );
    }
}

/// Finding 6, second form: a policy after namespace.lua whose `on_response` always fails, with
/// `on_error = "closed"`:
///
/// ```text
/// C: a LIST "" "*"
/// S: a NO [UNAVAILABLE] ...            (no LIST data at all)
/// ```
///
/// Today the failing hook's response is relayed as the server sent it: `"/" Jail/Box`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f06_failing_response_hook_fails_closed() {
    let (user, pass, _) = user_with_a_secret().await;
    let dir = crate::support::temp_dir();
    let gate = Gate::start(vec![
        shipped("namespace.lua", JAIL),
        local_policy(
            dir.path(),
            "fails",
            r#"return { name = "fails", responses = { "LIST" },
                        on_response = function(ctx, resp) error("broken on purpose") end }"#,
        ),
    ])
    .await;
    let mut c = gate.logged_in(&user, &pass).await;
    let r = c.cmd("a LIST \"\" \"*\"").await;
    assert!(
        gate.tap.to_client_text().contains("Jail/Box"),
        "{}",
        gate.tap.to_client_text()
    );
    assert_client_form(&r);
    assert!(
        !r.iter().any(|l| l.starts_with("* LIST")),
        "LIST data relayed although its hook failed: {r:?}"
    );
    assert_answer(&r, "a", "NO [UNAVAILABLE]");
}

/// Finding 6, third form: a server response that does not parse is not relayed raw while a
/// policy that rewrites responses is loaded. A folder in the jail whose name is an atom with
/// `[` (valid, but today's parser refuses it; see finding 10):
///
/// ```text
/// C: a LIST "" "*"
/// S: * LIST (\HasNoChildren) "." INBOX.Box ...     (and never "/" Jail/x[y)
/// ```
///
/// Today the LIST entry that does not parse is relayed raw, in the server's form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f06_unparsable_server_response_is_not_relayed_raw() {
    let (user, pass, _) = user_with_a_secret().await;
    let mut d = direct(&user, &pass).await;
    d.ok("d5 CREATE \"Jail/x[y\"").await;
    d.logout().await;
    let gate = Gate::start(vec![shipped("namespace.lua", JAIL)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    let r = c.cmd("a LIST \"\" \"*\"").await;
    assert!(
        gate.tap.to_client_text().contains("\"/\" Jail/x[y"),
        "{}",
        gate.tap.to_client_text()
    );
    assert_client_form(&r);
}

/// Finding 6, fourth form: a FETCH response nested deeper than imapgate's parser goes (a
/// message of 70 nested multiparts; Dovecot nests BODYSTRUCTURE up to 100) while namespace.lua
/// rewrites responses. Either imapgate parses it, or it does not relay it raw:
///
/// ```text
/// C: f FETCH 1 BODYSTRUCTURE
/// S: * 1 FETCH (BODYSTRUCTURE ((((...)))))   only if it parsed
/// ```
///
/// Today it counts a parse error and relays the response raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f06_deeply_nested_response_is_parsed_or_not_relayed() {
    let (user, pass, _) = user_with_a_secret().await;
    let mut d = direct(&user, &pass).await;
    d.append("d5", "Jail/Box", &nested_multipart(70)).await;
    d.logout().await;
    let gate = Gate::start(vec![shipped("namespace.lua", JAIL)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    c.ok("s SELECT INBOX.Box").await;
    let r = c.cmd("f FETCH 1 BODYSTRUCTURE").await;
    assert!(
        gate.tap.to_client_text().contains("BODYSTRUCTURE ((((("),
        "Dovecot did not nest: {}",
        gate.tap.to_client_text()
    );
    let scrape = gate.scrape().await;
    let unparsed = sum_samples(
        &scrape,
        "imapgate_parse_errors_total",
        &[("direction", "upstream_to_client")],
    );
    let relayed = r.iter().any(|l| l.starts_with("* 1 FETCH"));
    let shown: Vec<String> = r.iter().map(|l| l.chars().take(120).collect()).collect();
    assert!(
        !(relayed && unparsed > 0.0),
        "a response imapgate could not parse ({unparsed} parse errors) was relayed raw: {shown:?}"
    );
}

/// A message of `depth` multiparts, each holding the next, the innermost one text part.
fn nested_multipart(depth: usize) -> Vec<u8> {
    let mut m = String::from("Subject: deep\r\nMIME-Version: 1.0\r\n");
    for i in 0..depth {
        m.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    m.push_str("Content-Type: text/plain\r\n\r\ninnermost\r\n");
    for i in (0..depth).rev() {
        m.push_str(&format!("--b{i}--\r\n"));
    }
    m.into_bytes()
}

/// Finding 14, first part: under the README's namespace options every client folder sits under
/// `INBOX.`, so INBOX has children whenever the account has any folder:
///
/// ```text
/// C: a LIST "" "*"                         S: * LIST (\HasChildren) "." INBOX
/// C: b LIST "" "%" RETURN (CHILDREN)       S: * LIST (\HasChildren) "." INBOX
/// C: c LSUB "" "*"                         S: * LSUB (...) "." INBOX   (never \HasNoChildren)
/// ```
///
/// Today Dovecot's `\HasNoChildren` on INBOX is relayed: mutt cannot open INBOX's subfolders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f14_inbox_has_children_under_the_namespace_policy() {
    let (user, pass) = dovecot().fresh_user();
    let mut d = direct(&user, &pass).await;
    d.ok("d1 CREATE Archive").await;
    d.ok("d2 SUBSCRIBE INBOX").await;
    d.ok("d3 SUBSCRIBE Archive").await;
    // The server's own view: INBOX childless, Archive beside it.
    let list = d.ok("d4 LIST \"\" \"*\"").await;
    assert!(
        list.iter()
            .any(|l| l.contains("\\HasNoChildren") && l.ends_with(" INBOX")),
        "{list:?}"
    );
    d.logout().await;
    let gate = Gate::start(vec![shipped("namespace.lua", COURIER)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    // (tag, command, whether INBOX.Archive matches its pattern)
    for (tag, command, archive) in [
        ("a", "LIST \"\" \"*\"", true),
        ("b", "LIST \"\" \"%\" RETURN (CHILDREN)", false),
        ("c", "LSUB \"\" \"*\"", true),
    ] {
        let r = c.ok(&format!("{tag} {command}")).await;
        let inbox = r
            .iter()
            .find(|l| l.ends_with(" INBOX") && (l.starts_with("* LIST") || l.starts_with("* LSUB")))
            .unwrap_or_else(|| panic!("{command}: no INBOX in {r:?}"));
        assert_eq!(
            list_names(&r).iter().any(|n| n == "INBOX.Archive"),
            archive,
            "{command}: {r:?}"
        );
        assert!(!inbox.contains("\\HasNoChildren"), "{command}: {inbox}");
        if tag != "c" {
            assert!(inbox.contains("\\HasChildren"), "{command}: {inbox}");
        }
    }
}

/// Finding 14, second part: `INBOX.INBOX` is not a second name for INBOX, and empty components
/// or a trailing delimiter are not mapped to other names (README namespace options):
///
/// ```text
/// C: a SELECT INBOX.INBOX                 S: a NO [CANNOT] ...
/// C: b APPEND INBOX.INBOX {n}             S: b NO [CANNOT] ...   (before the "+")
/// C: c CREATE INBOX.Empty..Component      S: c NO [CANNOT] ...
/// C: d CREATE INBOX.Trailing.             S: d NO [CANNOT] ...
/// ```
///
/// Today each is translated to a server name (INBOX, Empty//Component, Trailing/), so
/// `SELECT INBOX.INBOX` opens INBOX and the CREATE makes `Trailing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f14_inbox_inbox_and_odd_names_are_refused() {
    let (user, pass) = dovecot().fresh_user();
    let gate = Gate::start(vec![shipped("namespace.lua", COURIER)]).await;
    let mut c = gate.client(PLAIN).await;
    c.login(&user, &pass).await;
    let a = c.cmd("a SELECT INBOX.INBOX").await;
    let b = c
        .cmd_with_literals(&[b"b APPEND INBOX.INBOX {14}", b"Subject: x\r\n\r\n", b""])
        .await;
    let cc = c.cmd("c CREATE INBOX.Empty..Component").await;
    let dd = c.cmd("d CREATE INBOX.Trailing.").await;

    let mut d = direct(&user, &pass).await;
    assert_eq!(server_mailboxes(&mut d).await, ["INBOX"]);
    assert_eq!(server_messages(&mut d, "INBOX").await, Some(0));
    let received = gate.server_received();
    assert!(
        !received.contains("SELECT")
            && !received.contains("APPEND")
            && !received.contains("CREATE"),
        "reached Dovecot:\n{received}"
    );
    assert_answer(&a, "a", "NO [CANNOT]");
    assert_answer(&b, "b", "NO [CANNOT]");
    assert_answer(&cc, "c", "NO [CANNOT]");
    assert_answer(&dd, "d", "NO [CANNOT]");
}

/// Finding 15: LIST entries the namespace policy hides are not audit records. With 30 server
/// folders that have no client form (their names hold the client's delimiter `.`):
///
/// ```text
/// C: a LIST "" "*"            S: * LIST ... INBOX / a OK     (30 entries hidden)
/// C: b CREATE Elsewhere       S: b NO [CANNOT] ...            (one audit record)
/// ```
///
/// The audit log holds the login and the refused CREATE, not 30 records with
/// `"command": null`. Today every hidden entry is an audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f15_hidden_list_entries_are_not_audit_records() {
    let (user, pass) = dovecot().fresh_user();
    let mut d = direct(&user, &pass).await;
    for i in 0..30 {
        d.ok(&format!("d{i} CREATE \"dotted.{i}\"")).await;
    }
    d.logout().await;
    let gate = Gate::start(vec![shipped("namespace.lua", COURIER)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    let r = c.ok("a LIST \"\" \"*\"").await;
    assert_eq!(list_names(&r), ["INBOX"], "{r:?}");
    assert_eq!(
        super::count_ci(&gate.tap.to_client_text(), "* LIST "),
        31,
        "the server listed the 30 folders and INBOX"
    );
    c.no("b CREATE Elsewhere").await;
    let records = poll("the audit record of the refused CREATE", PATIENCE, || {
        let all = gate.audit();
        all.iter().any(|r| r["command"] == "CREATE").then_some(all)
    })
    .await;
    let policy_records: Vec<_> = records.iter().filter(|r| r["event"] == "policy").collect();
    assert_eq!(
        policy_records.len(),
        1,
        "audit records besides the refused CREATE:\n{policy_records:#?}"
    );
}
