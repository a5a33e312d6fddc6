//! The per-case assertions, each a [`Failure`] with a class (for the summary) and a detail.
//!
//! (a) no canary had an effect on the server: no mailbox outside the jail (asked of Dovecot
//!     directly), no login of the victim and no login on a session before its TLS (Dovecot's
//!     log, matched to the case by the relay's port), and the audit log and
//!     `imapgate_logins_total` count the logins Dovecot logged;
//! (b) imapgate's desync tripwire never fired (`imapgate_desync_total` unchanged; a missing
//!     metric counts as 0), and the relay recording reads consistently (see [`super::oracle`]);
//! (c) every tagged response the client got carries a tag it sent at a command position, or a
//!     canary's tag with NO or BAD (imapgate judged and refused it, or the server refused a
//!     mode switch so the canary fell at a command position), never a canary's OK; and the
//!     case ended by the final LOGOUT's answer or BYE/close within its time.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::generate::{Accounts, Case};
use super::run::{End, Outcome};
use super::wire;
use crate::support::Client;
use crate::support::tap::{Dir, Recording};

#[derive(Clone, Debug)]
pub struct Failure {
    pub class: String,
    pub detail: String,
}

pub fn failure(class: impl Into<String>, detail: impl Into<String>) -> Failure {
    Failure {
        class: class.into(),
        detail: detail.into(),
    }
}

// ----- (c) what the client saw -----

pub fn client(case: &Case, out: &Outcome) -> Vec<Failure> {
    let mut f = Vec::new();
    for r in &out.responses {
        let Some((tag, status)) = r.tagged() else {
            continue;
        };
        if case.is_canary(tag) {
            if status.eq_ignore_ascii_case("OK") {
                f.push(failure(
                    "(c) the client got OK for a canary",
                    format!("{} (the canary ran)", wire::escape_short(&r.raw, 160)),
                ));
            }
        } else if !case.command_tags.contains(tag) {
            f.push(failure(
                "(c) the client got a tag it never sent at a command position",
                wire::escape_short(&r.raw, 160),
            ));
        }
    }
    match &out.end {
        End::LogoutAnswered | End::Closed => {}
        End::Hang(what) => f.push(failure(
            "(c) hang",
            format!(
                "nothing ended the case within {} ms: the client waited for {what}",
                out.elapsed.as_millis()
            ),
        )),
        End::PlaintextAfterStarttls(bytes) => f.push(failure(
            "(c) plaintext after STARTTLS's OK",
            wire::escape_short(bytes, 160),
        )),
        End::TlsFailed(e) => f.push(failure("(c) TLS handshake failed", e.clone())),
        End::ConnectFailed(e) => f.push(failure("(c) connect failed", e.clone())),
    }
    f
}

// ----- Dovecot's log -----

/// The lines Dovecot's login process wrote about the session whose remote port was `rport`
/// (the relay's side of the upstream connection), appended after `offset`.
pub fn dovecot_lines(log: &str, offset: usize, rport: u16) -> Vec<String> {
    let needle = format!("rport={rport}");
    log.get(offset..)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("imap-login:")
                && l.match_indices(&needle).any(|(i, m)| {
                    !l.as_bytes()
                        .get(i + m.len())
                        .is_some_and(u8::is_ascii_digit)
                })
        })
        .map(str::to_owned)
        .collect()
}

/// Users Dovecot logged in on those lines.
pub fn logged_in_users(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains(": Login: "))
        .filter_map(|l| {
            let start = l.find("user=<")? + "user=<".len();
            let end = l[start..].find('>')? + start;
            Some(l[start..end].to_string())
        })
        .collect()
}

/// When the upstream first said "Logged in" on this connection, if it did.
pub fn upstream_logged_in_at(rec: &Recording) -> Option<Instant> {
    rec.events
        .iter()
        .filter(|e| e.dir == Dir::ToClient)
        .find(|e| {
            e.bytes
                .windows(10)
                .any(|w| w == b"] Logged i" || w == b" Logged in")
        })
        .map(|e| e.at)
}

/// (a) from Dovecot's side: logins of the victim, logins without (or before) TLS.
pub fn dovecot_logins(
    acc: &Accounts,
    users: &[String],
    tls_at: Option<Instant>,
    logged_in_at: Option<Instant>,
) -> Vec<Failure> {
    let mut f = Vec::new();
    for u in users {
        if *u == acc.victim {
            f.push(failure(
                "(a) a canary ran: Dovecot logged the victim in",
                format!("Dovecot's log: Login: user=<{u}>"),
            ));
        }
        match (tls_at, logged_in_at) {
            (None, _) => f.push(failure(
                "(a) Dovecot logged a user in on a session that never did TLS",
                format!("user=<{u}>"),
            )),
            (Some(tls), Some(at)) if at < tls => f.push(failure(
                "(a) Dovecot logged a user in before the client's TLS",
                format!(
                    "user=<{u}>, {} ms before the handshake",
                    tls.duration_since(at).as_millis()
                ),
            )),
            _ => {}
        }
    }
    f
}

// ----- mailboxes, asked of Dovecot directly -----

/// A direct connection to Dovecot as one user, kept across cases.
pub struct Direct {
    pub user: String,
    client: Client,
    next: u32,
}

impl Direct {
    pub async fn connect(addr: SocketAddr, user: &str, pass: &str) -> Direct {
        let mut client = Client::connect(addr).await;
        client.read_greeting().await;
        client.login(user, pass).await;
        Direct {
            user: user.to_string(),
            client,
            next: 0,
        }
    }

    fn tag(&mut self) -> String {
        self.next += 1;
        format!("d{}", self.next)
    }

    /// Every mailbox of the user.
    pub async fn mailboxes(&mut self) -> Vec<String> {
        let tag = self.tag();
        let r = self.client.ok(&format!("{tag} LIST \"\" \"*\"")).await;
        r.iter()
            .filter_map(|l| l.strip_prefix("* LIST "))
            .filter_map(|l| {
                let after_flags = l.split_once(") ")?.1;
                let name = after_flags.split_once(' ')?.1;
                Some(name.trim_matches('"').to_string())
            })
            .collect()
    }

    /// (a) mailboxes outside the jail, then deletes every mailbox but INBOX (so the next case
    /// starts from the same place), and keeps exactly one message in INBOX.
    pub async fn escapes_and_reset(&mut self) -> Vec<String> {
        let names = self.mailboxes().await;
        let escapes: Vec<String> = names
            .iter()
            .filter(|n| !n.eq_ignore_ascii_case("INBOX") && *n != "Jail" && !n.starts_with("Jail/"))
            .cloned()
            .collect();
        let mut doomed: Vec<&String> = names
            .iter()
            .filter(|n| !n.eq_ignore_ascii_case("INBOX"))
            .collect();
        // Children before their parents.
        doomed.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for name in doomed {
            let tag = self.tag();
            self.client
                .cmd(&format!("{tag} DELETE {}", crate::support::quote(name)))
                .await;
        }
        let tag = self.tag();
        let status = self
            .client
            .ok(&format!("{tag} STATUS INBOX (MESSAGES)"))
            .await;
        if !status.iter().any(|l| l.contains("(MESSAGES 1)")) {
            self.reset_inbox().await;
        }
        escapes
    }

    pub async fn reset_inbox(&mut self) {
        let t = self.tag();
        self.client.ok(&format!("{t} SELECT INBOX")).await;
        let t = self.tag();
        // An empty INBOX has no message set to store into: BAD, and nothing to do.
        self.client
            .cmd(&format!("{t} STORE 1:* +FLAGS.SILENT (\\Deleted)"))
            .await;
        let t = self.tag();
        self.client.ok(&format!("{t} CLOSE")).await;
        let t = self.tag();
        self.client
            .append(&t, "INBOX", b"Subject: one\r\n\r\nthe one message\r\n")
            .await;
    }
}

// ----- metrics -----

/// A scrape of imapgate's /metrics.
pub async fn scrape(addr: SocketAddr) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if s.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The sum of every series of metric `name` whose labels contain `label` (`""`: all), and
/// whether the metric exists at all.
pub fn sample(scrape: &str, name: &str, label: &str) -> (f64, bool) {
    let mut sum = 0.0;
    let mut present = false;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        present = true;
        let (labels, value) = rest.rsplit_once(' ').unwrap_or(("", "0"));
        if labels.contains(label) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    (sum, present)
}

/// What one scrape says, for before/after deltas.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub desync: f64,
    pub desync_present: bool,
    pub logins_ok: f64,
}

pub async fn counts(addr: SocketAddr) -> Counts {
    let text = scrape(addr).await;
    let (desync, desync_present) = sample(&text, "imapgate_desync_total", "");
    let (logins_ok, _) = sample(&text, "imapgate_logins_total", "result=\"ok\"");
    Counts {
        desync,
        desync_present,
        logins_ok,
    }
}

// ----- the audit log -----

/// Login records of the audit log: (connection_id, peer port, result, user, tls).
pub fn audit_logins(path: &Path) -> Vec<(u64, u16, String, Option<String>, bool)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "login")
        .map(|v| {
            let port = v["peer"]
                .as_str()
                .and_then(|p| p.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(0);
            (
                v["connection_id"].as_u64().unwrap_or(0),
                port,
                v["result"].as_str().unwrap_or("").to_string(),
                v["user"].as_str().map(str::to_owned),
                v["tls"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}
