//! The search rate limit cannot be dodged, does not lose mail, and namespace.lua's per-command
//! state cannot be exhausted by pipelining (findings 7 and 12).

use std::time::Duration;

use super::{
    Gate, JAIL, PATIENCE, assert_answer, count_ci, direct, dovecot, example_policies, list_names,
    server_messages, shipped,
};
use crate::support::evidence::{dovecot_logins, poll};

/// A search limit of 2 per user that refuses (rather than delays) beyond it.
const TWO_SEARCHES: &str = "per_second = 0.001\nburst = 2\nmode = \"reject\"";

/// Finding 7, first form: the rate-limit key is the account, not the name as typed. Dovecot
/// folds user names to lower case, so `FRESHn`, `Freshn` and `freshn` are one account:
///
/// ```text
/// session 1:  C: l1 LOGIN FRESHn pass   C: s1 SEARCH ALL    S: s1 OK
/// session 2:  C: l1 LOGIN Freshn pass   C: s2 SEARCH ALL    S: s2 OK
/// session 3:  C: l1 LOGIN freshn pass   C: s3 SEARCH ALL    S: s3 NO [LIMIT]
/// ```
///
/// Today each spelling gets a bucket of its own: all three searches reach the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f07_rate_limit_key_is_case_folded() {
    let (user, pass) = dovecot().fresh_user();
    let gate = Gate::start(vec![shipped("search_rate_limit.lua", TWO_SEARCHES)]).await;
    let spellings = [user.to_ascii_uppercase(), capitalized(&user), user.clone()];
    let mut answers = Vec::new();
    for (i, name) in spellings.iter().enumerate() {
        let mut c = gate.logged_in(name, &pass).await;
        c.ok("s0 SELECT INBOX").await;
        answers.push(c.cmd(&format!("s{} SEARCH ALL", i + 1)).await);
        c.logout().await;
    }

    // The server: one account logged in three times...
    let lines = poll("three logins in Dovecot's log", PATIENCE, || {
        let l = dovecot_logins(dovecot(), &user);
        (l.len() >= 3).then_some(l)
    })
    .await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    // ...and searched only as often as its budget allows.
    let received = gate.server_received();
    assert_eq!(
        count_ci(&received, " SEARCH ALL"),
        2,
        "searches that reached Dovecot:\n{received}"
    );
    assert_answer(&answers[2], "s3", "NO [LIMIT]");
}

fn capitalized(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(first) = out.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    out
}

/// Finding 7, second form: every command that searches is limited by default, not only SEARCH.
/// With the budget of 2 spent on two SEARCHes:
///
/// ```text
/// C: t1 SORT (ARRIVAL) UTF-8 ALL                S: t1 NO [LIMIT] ...
/// C: t2 THREAD REFERENCES UTF-8 ALL             S: t2 NO [LIMIT] ...
/// C: t3 UID SORT (DATE) UTF-8 ALL               S: t3 NO [LIMIT] ...
/// C: t4 UID THREAD ORDEREDSUBJECT UTF-8 ALL     S: t4 NO [LIMIT] ...
/// C: t5 SEARCH RETURN (MIN) ALL                 S: t5 NO [LIMIT] ...
/// C: t6 UID SEARCH RETURN (COUNT) ALL           S: t6 NO [LIMIT] ...
/// ```
///
/// Today SORT and THREAD are not counted and reach the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f07_sort_and_thread_are_rate_limited_by_default() {
    let (user, pass) = dovecot().fresh_user();
    let gate = Gate::start(vec![shipped("search_rate_limit.lua", TWO_SEARCHES)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    c.ok("s0 SELECT INBOX").await;
    c.ok("s1 SEARCH ALL").await;
    c.ok("s2 SEARCH ALL").await;
    let attempts = [
        "t1 SORT (ARRIVAL) UTF-8 ALL",
        "t2 THREAD REFERENCES UTF-8 ALL",
        "t3 UID SORT (DATE) UTF-8 ALL",
        "t4 UID THREAD ORDEREDSUBJECT UTF-8 ALL",
        "t5 SEARCH RETURN (MIN) ALL",
        "t6 UID SEARCH RETURN (COUNT) ALL",
    ];
    let mut answers = Vec::new();
    for line in attempts {
        answers.push((line, c.cmd(line).await));
    }

    let received = gate.server_received();
    assert!(
        count_ci(&received, "SORT") == 0 && count_ci(&received, "THREAD") == 0,
        "reached Dovecot:\n{received}"
    );
    assert_eq!(count_ci(&received, "SEARCH"), 2, "{received}");
    for (line, r) in &answers {
        let tag = &line[..2];
        assert_answer(r, tag, "NO [LIMIT]");
    }
}

/// Finding 7, third form: 300 pipelined LISTs through namespace.lua (jail) each get their own
/// filtering, and the filtering stays right afterwards:
///
/// ```text
/// C: p1 LIST "" "INBOX.B*"  ...  p300 LIST "" "INBOX.B*"     (one write)
/// S: * LIST (...) "." INBOX.Box  /  pN OK ...                 (for each)
/// C: q LIST "" "INBOX.O*"
/// S: * LIST (...) "." INBOX.Other  /  q OK ...
/// ```
///
/// Today the queued patterns overflow `ctx.vars` (256 values): later LISTs get
/// `NO [UNAVAILABLE]` and the connection's LIST filtering stays wrong afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f07_pipelined_lists_cannot_exhaust_namespace_state() {
    let (user, pass) = dovecot().fresh_user();
    let mut d = direct(&user, &pass).await;
    d.ok("d1 CREATE Jail/Box").await;
    d.ok("d2 CREATE Jail/Other").await;
    d.logout().await;
    let gate = Gate::start(vec![shipped("namespace.lua", JAIL)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    c.set_timeout(Duration::from_secs(30));
    let mut pipeline = String::new();
    for i in 1..=300 {
        pipeline.push_str(&format!("p{i} LIST \"\" \"INBOX.B*\"\r\n"));
    }
    c.send(pipeline.as_bytes()).await;
    let r = c.read_until_tagged("p300").await;
    let after = c.cmd("q LIST \"\" \"INBOX.O*\"").await;

    // The server answered every LIST...
    let received = gate.server_received();
    assert_eq!(
        count_ci(&received, " LIST "),
        301,
        "LISTs that reached Dovecot"
    );
    // ...and each reached the client filtered by its own pattern.
    let mut since_last = Vec::new();
    let mut done = 0;
    for line in &r {
        if line.starts_with('*') {
            since_last.push(line.clone());
            continue;
        }
        done += 1;
        assert!(line.starts_with(&format!("p{done} OK")), "{line}");
        assert_eq!(list_names(&since_last), ["INBOX.Box"], "before {line}");
        since_last.clear();
    }
    assert_eq!(done, 300);
    assert_eq!(list_names(&after), ["INBOX.Other"], "{after:?}");
    assert_answer(&after, "q", "OK");
}

/// Finding 12: a real sync client through the shipped defaults (the policies and options of
/// examples/imapgate.toml, read as shipped) loses no mail. getmail fetches 8 folders with
/// `imap_search = ALL`: one SEARCH per folder, more than the example's burst of 5, and the
/// first folder holds more messages than the burst:
///
/// ```text
/// C: SELECT INBOX.Sync.M1 / SEARCH ALL / FETCH ...   (x 8 folders)
/// ```
///
/// Every message must arrive. Today the sixth SEARCH gets `NO [LIMIT]`, which getmail reads as
/// "no messages": three folders are skipped, and getmail exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f12_sync_client_through_shipped_defaults_loses_no_mail() {
    let (user, pass) = dovecot().fresh_user();
    let folders: Vec<(String, usize)> = (1..=8)
        .map(|i| (format!("Sync/M{i}"), if i == 1 { 12 } else { 3 }))
        .collect();
    let mut d = direct(&user, &pass).await;
    let mut total = 0;
    for (folder, count) in &folders {
        d.ok(&format!("c CREATE {folder}")).await;
        for n in 0..*count {
            let message = crate::support::message(300, (total + n) as u32);
            d.append("a", folder, &message).await;
        }
        total += count;
    }
    let gate = Gate::start(example_policies()).await;
    let dir = crate::support::temp_dir();
    let maildir = dir.path().join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).expect("Maildir");
    }
    // getmail refuses to deliver as root: as root, it delivers as Dovecot's mail user.
    let deliver_as = if is_root() {
        let (uid, gid) = dovecot().mail_owner();
        let status = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(&maildir)
            .status()
            .expect("chown");
        assert!(status.success());
        format!("user = {}\n", crate::support::dovecot::MAIL_USER)
    } else {
        String::new()
    };
    let mailboxes: Vec<String> = folders
        .iter()
        .map(|(f, _)| format!("\"INBOX.{}\"", f.replace('/', ".")))
        .collect();
    let rc = format!(
        "[retriever]\ntype = SimpleIMAPSSLRetriever\nserver = 127.0.0.1\nport = {port}\n\
         username = {user}\npassword = {pass}\nca_certs = {ca}\nmailboxes = ({boxes},)\n\
         imap_search = ALL\n\n[destination]\ntype = Maildir\npath = {maildir}/\n{deliver_as}\n\
         [options]\nread_all = true\ndelete = false\nverbose = 1\n",
        port = gate.proxy.addr(crate::support::proxy::IMAPS).port(),
        ca = dovecot().ca_pem_path().display(),
        boxes = mailboxes.join(", "),
        maildir = maildir.display(),
    );
    let rc_path = dir.path().join("getmailrc");
    std::fs::write(&rc_path, rc).expect("write getmailrc");
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new("getmail")
            .arg("--getmaildir")
            .arg(dir.path())
            .arg("--rcfile")
            .arg(&rc_path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("getmail finished within 180 s")
    .expect("run getmail (Debian package getmail6)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The server still holds every message (getmail does not delete)...
    let mut check = direct(&user, &pass).await;
    for (folder, count) in &folders {
        assert_eq!(
            server_messages(&mut check, folder).await,
            Some(*count as u32)
        );
    }
    let fetched = ["new", "cur"]
        .iter()
        .map(|sub| std::fs::read_dir(maildir.join(sub)).map_or(0, |d| d.count()))
        .sum::<usize>();
    assert_eq!(
        fetched,
        total,
        "getmail fetched {fetched} of {total} messages (exit {:?}):\n{said}",
        out.status.code()
    );
    assert!(out.status.success(), "{said}");
    // ...and every folder's SEARCH reached it (held back, not refused).
    let received = gate.server_received();
    assert_eq!(
        count_ci(&received, " SEARCH ALL"),
        folders.len(),
        "SEARCHes that reached Dovecot"
    );
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
