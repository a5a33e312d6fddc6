//! Issue 9, "No bypass", attacked end to end: one test per numbered finding (one per attack
//! where a finding lists several, or a table), each sending the finding's hostile bytes through
//! imapgate to a real private Dovecot with the shipped policies configured as the finding
//! describes, then checking what the SERVER did: the bytes it received (a recording relay,
//! [`support::tap::Tap`], sits between imapgate and Dovecot), its log (logins name the user),
//! its mailboxes (a direct session afterwards), and imapgate's audit log and /metrics.
//!
//! These tests were written against the code before the fix and fail there (each says why);
//! they are the acceptance suite of the session core rewrite. Test names start with the
//! finding they cover (`f01_` .. `f15_`); `tripwire_` covers the desync tripwire of the
//! issue's "Must show", and `imaptest_` Dovecot's compliance suite (finding 10).
//!
//! The modules, by what the attacks aim at:
//! - `prelogin`: logging in without TLS, credentials before TLS, who the audit log names
//!   (findings 1, 9, 11, 13);
//! - `modes`: bytes read in a mode the server never entered, and the tripwire (2, 3);
//! - `namespace`: escaping the namespace jail, failing open, INBOX's children, audit noise
//!   (4, 6, 14, 15);
//! - `hooks`: stalling the proxy from a hook, the policy contract and sandbox (5, 8);
//! - `ratelimit`: dodging the search limit, and mail lost to it (7, 12);
//! - `fidelity`: valid commands refused, and imaptest through imapgate (10).

#[path = "security/fidelity.rs"]
mod fidelity;
#[path = "security/hooks.rs"]
mod hooks;
#[path = "security/modes.rs"]
mod modes;
#[path = "security/namespace.rs"]
mod namespace;
#[path = "security/prelogin.rs"]
mod prelogin;
#[path = "security/ratelimit.rs"]
mod ratelimit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::support;
use imapgate::config::{Config, MetricsConfig, OnError, PolicyConfig, UpstreamTls};
use serde_json::Value;
use support::evidence::{audit_records, scrape};
pub use support::list_names;
use support::proxy::{Proxy, config_for};
use support::tap::Tap;
use support::{Client, Dovecot, DovecotOptions, quote};

/// The namespace as a boundary: the client sees `INBOX.` with `.`, and everything it names
/// lives under the server's `Jail/`. Outside the jail (e.g. `Private/Secret`) is off limits.
pub const JAIL: &str = r#"client_prefix = "INBOX."
client_delimiter = "."
upstream_prefix = "Jail/"
upstream_delimiter = "/""#;

/// The README's (and examples/imapgate.toml's) namespace options: Courier's layout in front
/// of a server with `/`.
pub const COURIER: &str = r#"client_prefix = "INBOX."
client_delimiter = "."
upstream_prefix = ""
upstream_delimiter = "/""#;

/// How long a hostile exchange may take before the test looks at what happened anyway.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// The Dovecot behind every test of this module: `/` as hierarchy delimiter (the namespace
/// policy's upstream form) and LAYOUT=fs, so that a server name may hold the client's `.`.
/// Tests share it; each uses users of its own ([`Dovecot::fresh_user`]).
pub fn dovecot() -> &'static Dovecot {
    static DC: OnceLock<Dovecot> = OnceLock::new();
    DC.get_or_init(|| {
        Dovecot::start(DovecotOptions {
            separator: Some('/'),
            extra_config: "mail_location = maildir:~/Maildir:LAYOUT=fs\n".into(),
            ..DovecotOptions::default()
        })
    })
}

/// A shipped policy from policies/ with `options` (TOML), failing closed.
pub fn shipped(file: &str, options: &str) -> PolicyConfig {
    PolicyConfig {
        script: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("policies")
            .join(file),
        options: toml::from_str(options).expect("policy options"),
        on_error: OnError::Closed,
        on_state_error: None,
    }
}

/// A policy written for one test into `dir`, failing closed.
pub fn local_policy(dir: &Path, name: &str, source: &str) -> PolicyConfig {
    let script = dir.join(format!("{name}.lua"));
    std::fs::write(&script, source).expect("write policy");
    PolicyConfig {
        script,
        options: toml::Table::new(),
        on_error: OnError::Closed,
        on_state_error: None,
    }
}

/// The `[[policy]]` list of examples/imapgate.toml, read now: whatever it ships is what the
/// test runs.
pub fn example_policies() -> Vec<PolicyConfig> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/imapgate.toml");
    Config::load(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .policies
}

/// imapgate in-process in front of the tap in front of [`dovecot`], with an audit log and a
/// metrics endpoint.
pub struct Gate {
    pub proxy: Proxy,
    pub tap: Tap,
    pub audit: PathBuf,
    pub metrics: SocketAddr,
    _dir: tempfile::TempDir,
    _busy: support::Busy,
}

impl Gate {
    pub async fn start(policies: Vec<PolicyConfig>) -> Gate {
        let busy = support::busy().await;
        let dc = dovecot();
        let tap = Tap::start(dc.addr()).await;
        let dir = support::temp_dir();
        let audit = dir.path().join("audit.jsonl");
        let mut config = config_for(dc, UpstreamTls::None);
        config.upstreams[0].address = tap.addr().to_string();
        // Health probes go through the tap too: one at start, before any client, and none
        // during the run, so that every later tap connection is a session's.
        config.health.interval_s = 86_400;
        config.policies = policies;
        config.metrics = Some(MetricsConfig {
            bind: "127.0.0.1:0".parse().expect("address"),
        });
        config.log.audit = Some(audit.display().to_string());
        let proxy = Proxy::start(config).await;
        let metrics = proxy.metrics_addr().expect("metrics endpoint");
        Gate {
            proxy,
            tap,
            audit,
            metrics,
            _dir: dir,
            _busy: busy,
        }
    }

    /// A plain-TCP client on `listener` (`imap` for STARTTLS, `plain`), greeting read, with
    /// the hostile-test timeout. For the implicit-TLS listener see [`Gate::tls_client`].
    pub async fn client(&self, listener: &str) -> Client {
        let mut c = Client::connect(self.proxy.addr(listener)).await;
        c.set_timeout(PATIENCE);
        c.read_greeting().await;
        c
    }

    /// A client on the implicit-TLS listener, greeting read.
    pub async fn tls_client(&self) -> Client {
        let mut c =
            Client::connect_tls(self.proxy.addr(support::proxy::IMAPS), dovecot().ca_pem()).await;
        c.set_timeout(PATIENCE);
        c.read_greeting().await;
        c
    }

    /// A logged-in client on the implicit-TLS listener.
    pub async fn logged_in(&self, user: &str, pass: &str) -> Client {
        let mut c = self.tls_client().await;
        c.login(user, pass).await;
        c
    }

    pub async fn scrape(&self) -> String {
        scrape(self.metrics).await
    }

    pub fn audit(&self) -> Vec<Value> {
        audit_records(&self.audit)
    }

    /// Everything imapgate sent the server so far (all connections).
    pub fn server_received(&self) -> String {
        self.tap.to_upstream_text()
    }
}

/// A session straight to Dovecot, logged in: how the tests look at the server's side.
pub async fn direct(user: &str, pass: &str) -> Client {
    let mut c = Client::connect(dovecot().addr()).await;
    c.read_greeting().await;
    c.login(user, pass).await;
    c
}

/// The mailbox names the server lists for the session `c` (`LIST "" "*"`), sorted.
pub async fn server_mailboxes(c: &mut Client) -> Vec<String> {
    let r = c.ok("d0 LIST \"\" \"*\"").await;
    let mut names = list_names(&r);
    names.sort();
    names
}

/// The number of messages in `mailbox` on the server (STATUS), None if it does not exist.
pub async fn server_messages(c: &mut Client, mailbox: &str) -> Option<u32> {
    let r = c
        .cmd(&format!("d1 STATUS {} (MESSAGES)", quote(mailbox)))
        .await;
    let line = r.iter().find(|l| l.starts_with("* STATUS "))?;
    let after = line.split("MESSAGES ").nth(1)?;
    after
        .trim_end_matches(')')
        .split([' ', ')'])
        .next()?
        .parse()
        .ok()
}

/// The tagged response for `tag` among `responses`, if any.
pub fn tagged<'a>(responses: &'a [String], tag: &str) -> Option<&'a str> {
    responses
        .iter()
        .map(String::as_str)
        .find(|l| l.len() > tag.len() && l.starts_with(tag) && l.as_bytes()[tag.len()] == b' ')
}

/// Panics unless `responses` hold `{tag} {want}...` (e.g. `NO [CANNOT]`).
pub fn assert_answer(responses: &[String], tag: &str, want: &str) {
    let line = tagged(responses, tag).unwrap_or("");
    let expected = format!("{tag} {want}");
    assert!(
        line.to_ascii_uppercase()
            .starts_with(&expected.to_ascii_uppercase()),
        "expected {expected:?}, got:\n{}",
        responses.join("\n")
    );
}

/// Panics unless `tag` was refused (`BAD` or `NO`), or the connection was closed with
/// `* BYE` before an answer: both keep a hostile command away from the server.
pub fn assert_refused_or_bye(responses: &[String], tag: &str) {
    let refused = tagged(responses, tag).is_some_and(|l| {
        let status = l[tag.len() + 1..].to_ascii_uppercase();
        status.starts_with("BAD") || status.starts_with("NO")
    });
    let bye = tagged(responses, tag).is_none() && responses.iter().any(|l| l.starts_with("* BYE"));
    assert!(
        refused || bye,
        "{tag} was neither refused nor ended with BYE:\n{}",
        responses.join("\n")
    );
}

/// How many times `needle` occurs in `haystack`, ASCII case-insensitively.
pub fn count_ci(haystack: &str, needle: &str) -> usize {
    haystack
        .to_ascii_uppercase()
        .matches(&needle.to_ascii_uppercase())
        .count()
}

/// PLAIN SASL credentials, base64.
pub fn plain_b64(user: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}
