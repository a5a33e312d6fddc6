//! OAuth logins through imapgate: `AUTHENTICATE XOAUTH2` and `OAUTHBEARER`, with an initial
//! response (SASL-IR) and without (the client waits for `+`), to real Dovecots whose `oauth2`
//! passdb asks a token checker of the test's own (RFC 7662 introspection) about each token.
//!
//! In both of imapgate's modes, transparent (one upstream, relayed as it comes) and routed
//! (imapgate reads the login, an `on_login` policy picks the upstream, the login is replayed):
//! a good token logs the user in (on the user's backend when routed) and imapgate knows who
//! it is; a bad token ends in Dovecot's `NO`, after which the client may try again on the
//! same connection; and no token ever reaches imapgate's log.
//!
//! Dovecot 2.3 reports a bad token in an error challenge and waits for the client's answer
//! before its NO:
//!
//! ```text
//! C: a AUTHENTICATE XOAUTH2 dXNlcj1hbGljZQFhdXRoPUJlYXJlciAuLi4BAQ==
//! S: + eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJtYWlsIn0=
//! C:                                   (XOAUTH2: an empty response; OAUTHBEARER: AQ==)
//! S: a NO [AUTHENTICATIONFAILED] Authentication failed.
//! ```
//!
//! A transparent imapgate relays that exchange as it is. A routed one answers the challenge
//! itself during the replay (the client's credentials are all it has), so the client gets
//! Dovecot's NO straight away, which is what a server may answer to any AUTHENTICATE.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use imapgate::config::{Config, PolicyConfig, RoutingConfig, UpstreamConfig, UpstreamTls};

use crate::support::evidence::{audit_records, dovecot_logins, poll};
use crate::support::proxy::{PLAIN, Proxy, ProxyProcess, config_for, toml_path};
use crate::support::{
    Client, Dovecot, DovecotOptions, TokenChecker, assert_tagged, list_names, temp_dir,
};

/// Tokens the checker knows, and one it does not (expired, revoked, made up).
const ALICE_TOKEN: &str = "ya29.A0-alice-token-4f1c9e";
const BOB_TOKEN: &str = "ya29.A0-bob-token-7d20ab";
const STALE_TOKEN: &str = "ya29.A0-revoked-token-0b3e55";

/// A token of 6000 characters, as identity providers that put many claims in a JWT issue
/// (the client's base64 response is 8 KB, just under the 8192 octets of a pre-login line).
fn long_token() -> String {
    format!("eyJ{}", "x".repeat(5997))
}

const FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mech {
    XOauth2,
    OauthBearer,
}

impl Mech {
    const ALL: [Mech; 2] = [Mech::XOauth2, Mech::OauthBearer];

    fn name(self) -> &'static str {
        match self {
            Mech::XOauth2 => "XOAUTH2",
            Mech::OauthBearer => "OAUTHBEARER",
        }
    }

    /// The client's one response, base64: Google's `user=NAME ^A auth=Bearer TOKEN ^A ^A`;
    /// RFC 7628's GS2 header `n,a=NAME,` then key-value pairs, as its example (section 4.1)
    /// and mail clients send them: `^A host=... ^A port=... ^A auth=Bearer TOKEN ^A ^A`.
    fn response(self, user: &str, token: &str) -> String {
        match self {
            Mech::XOauth2 => b64(&format!("user={user}\x01auth=Bearer {token}\x01\x01")),
            Mech::OauthBearer => b64(&format!(
                "n,a={user},\x01host=localhost\x01port=143\x01auth=Bearer {token}\x01\x01"
            )),
        }
    }

    /// Dovecot 2.3's error challenge for a token it refuses, decoded.
    fn error_challenge(self) -> &'static str {
        match self {
            Mech::XOauth2 => r#"{"status":"401","schemes":"bearer","scope":"mail"}"#,
            Mech::OauthBearer => r#"{"status":"invalid_token"}"#,
        }
    }

    /// The client's answer to an error challenge: XOAUTH2 an empty response, OAUTHBEARER
    /// the `%x01` of RFC 7628 section 3.2.3.
    fn after_error(self) -> &'static str {
        match self {
            Mech::XOauth2 => "",
            Mech::OauthBearer => "AQ==",
        }
    }
}

/// `tag AUTHENTICATE mech`, with the response as initial response (`ir`) or after the
/// server's empty `+`. The next thing the server says is the caller's to read.
async fn authenticate(c: &mut Client, tag: &str, mech: Mech, user: &str, token: &str, ir: bool) {
    let response = mech.response(user, token);
    if ir {
        c.send_line(&format!("{tag} AUTHENTICATE {} {response}", mech.name()))
            .await;
    } else {
        c.send_line(&format!("{tag} AUTHENTICATE {}", mech.name()))
            .await;
        assert_eq!(c.read_response().await.trim_end(), "+", "{mech:?}");
        c.send_line(&response).await;
    }
}

async fn client(addr: SocketAddr) -> Client {
    let mut c = Client::connect(addr).await;
    c.read_greeting().await;
    c
}

/// Who imapgate thinks the client is (see [`WHOAMI`]).
async fn whoami(c: &mut Client) -> String {
    let r = c.no("w NOOP").await;
    let last = r.last().cloned().unwrap_or_default();
    last.strip_prefix("w NO ").unwrap_or(&last).to_owned()
}

/// `NOOP` gets `NO you are <ctx.user>` (`nobody` before login), and, routed, the mechanism
/// `on_login` saw.
const WHOAMI: &str = r#"return {
  name = "whoami",
  commands = { "NOOP" },
  on_command = function(ctx, cmd)
    local text = "you are " .. (ctx.user or "nobody")
    if ctx.vars.mechanism then text = text .. " by " .. ctx.vars.mechanism end
    return imap.reject{ status = "NO", text = text }
  end,
}
"#;

/// [`WHOAMI`], routing by `login.user`: bob to mail2, everyone else to the default (mail1).
const ROUTE: &str = r#"return {
  name = "route",
  commands = { "NOOP" },
  on_login = function(ctx, login)
    ctx.vars.mechanism = login.mechanism
    if login.user == "bob" then return imap.route{ upstream = "mail2" } end
  end,
  on_command = function(ctx, cmd)
    local text = "you are " .. (ctx.user or "nobody")
    if ctx.vars.mechanism then text = text .. " by " .. ctx.vars.mechanism end
    return imap.reject{ status = "NO", text = text }
  end,
}
"#;

fn checker() -> TokenChecker {
    let long = long_token();
    TokenChecker::start(&[(ALICE_TOKEN, "alice"), (BOB_TOKEN, "bob"), (&long, "alice")])
}

fn oauth_dovecot(checker: &TokenChecker, extra_config: &str) -> Dovecot {
    Dovecot::start(DovecotOptions {
        oauth2: Some(checker.oauth2()),
        extra_config: extra_config.into(),
        ..DovecotOptions::default()
    })
}

/// Capabilities without SASL-IR: the greeting offers none, so a login is replayed to this
/// server as a server without RFC 4959 needs it, the response after its `+`.
const NO_SASL_IR: &str = "imap_capability = IMAP4rev1 LITERAL+ ID ENABLE IDLE\n";

fn policy(dir: &Path, source: &str) -> PolicyConfig {
    let script = dir.join("policy.lua");
    std::fs::write(&script, source).expect("write policy");
    PolicyConfig {
        script,
        options: toml::Table::new(),
        on_error: Default::default(),
        on_state_error: None,
    }
}

/// imapgate in front of Dovecot(s) checking tokens, with an audit log.
struct Gate {
    proxy: Proxy,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gate {
    /// Transparent: one upstream, relayed as it comes, [`WHOAMI`].
    async fn transparent(dc: &Dovecot) -> Gate {
        let dir = temp_dir();
        let mut config = config_for(dc, UpstreamTls::None);
        config.policies = vec![policy(dir.path(), WHOAMI)];
        Gate::start(config, dir).await
    }

    /// Routed between mail1 (the default) and mail2 by [`ROUTE`].
    async fn routed(mail1: &Dovecot, mail2: &Dovecot) -> Gate {
        let dir = temp_dir();
        let mut config = config_for(mail1, UpstreamTls::None);
        config.upstreams = vec![upstream(mail1, "mail1"), upstream(mail2, "mail2")];
        config.routing = Some(RoutingConfig::default());
        config.policies = vec![policy(dir.path(), ROUTE)];
        Gate::start(config, dir).await
    }

    async fn start(mut config: Config, dir: tempfile::TempDir) -> Gate {
        let audit = dir.path().join("audit.jsonl");
        config.log.audit = Some(audit.display().to_string());
        Gate {
            proxy: Proxy::start(config).await,
            audit,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr(PLAIN)
    }

    /// The users of the audit log's login records with `result`, in order, once there are
    /// `n` of them.
    async fn logins(&self, result: &str, n: usize) -> Vec<String> {
        poll("the logins' audit records", Duration::from_secs(5), || {
            let users: Vec<String> = audit_records(&self.audit)
                .into_iter()
                .filter(|r| r["event"] == "login" && r["result"] == result)
                .map(|r| r["user"].as_str().unwrap_or("?").to_owned())
                .collect();
            (users.len() >= n).then_some(users)
        })
        .await
    }
}

fn upstream(dc: &Dovecot, name: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: name.to_owned(),
        address: dc.addr().to_string(),
        ..UpstreamConfig::default()
    }
}

/// Two Dovecots checking tokens with one checker; each holds a folder naming it, made by
/// alice and bob with their passwords (which keep working). mail2 does not offer SASL-IR.
async fn backends(checker: &TokenChecker) -> (Dovecot, Dovecot) {
    let (mail1, mail2) = (
        oauth_dovecot(checker, ""),
        oauth_dovecot(checker, NO_SASL_IR),
    );
    let mut c = Client::connect(mail2.addr()).await;
    let greeting = c.read_greeting().await;
    assert!(!greeting.contains("SASL-IR"), "{greeting}");
    c.logout().await;
    for (dc, folder) in [(&mail1, "on-mail1"), (&mail2, "on-mail2")] {
        for user in ["alice", "bob"] {
            let mut c = client(dc.addr()).await;
            c.login(user, &format!("{user}pw")).await;
            c.ok(&format!("c CREATE {folder}")).await;
            c.logout().await;
        }
    }
    (mail1, mail2)
}

/// The folder naming the backend a logged-in client sees.
async fn backend_of(c: &mut Client) -> String {
    let list = c.ok("l LIST \"\" \"on-*\"").await;
    list_names(&list).join(",")
}

/// Dovecot's successful logins of `user` by `mech`.
fn dovecot_logins_by(dc: &Dovecot, user: &str, mech: Mech) -> usize {
    let method = format!("method={},", mech.name());
    dovecot_logins(dc, user)
        .iter()
        .filter(|l| l.contains(&method))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_good_tokens_log_in_with_and_without_an_initial_response() {
    // C: a AUTHENTICATE XOAUTH2 <user=alice ^A auth=Bearer ALICE_TOKEN ^A ^A>
    // S: a OK [CAPABILITY ...] Logged in          (Dovecot's, relayed)
    let checker = checker();
    let dc = oauth_dovecot(&checker, "");
    let gate = Gate::transparent(&dc).await;
    for mech in Mech::ALL {
        for ir in [true, false] {
            let mut c = client(gate.addr()).await;
            authenticate(&mut c, "a", mech, "alice", ALICE_TOKEN, ir).await;
            let r = c.read_until_tagged("a").await;
            assert_tagged(&r, "a", "OK");
            assert!(
                r[r.len() - 1].contains("Logged in"),
                "{mech:?} ir={ir}: {r:?}"
            );
            assert_eq!(whoami(&mut c).await, "you are alice", "{mech:?} ir={ir}");
            c.ok("s SELECT INBOX").await;
            c.logout().await;
        }
    }
    assert_eq!(gate.logins("ok", 4).await, ["alice"; 4]);
    assert_eq!(
        checker.asked(),
        [ALICE_TOKEN; 4],
        "each token as the client sent it"
    );
    for mech in Mech::ALL {
        assert_eq!(dovecot_logins_by(&dc, "alice", mech), 2, "{mech:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_bad_token_gets_the_servers_challenge_then_no_and_may_try_again() {
    // C: a AUTHENTICATE OAUTHBEARER <n,a=alice, ^A auth=Bearer STALE_TOKEN ^A ^A>
    // S: + eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=     {"status":"invalid_token"}
    // C: AQ==
    // S: a NO [AUTHENTICATIONFAILED] Authentication failed.
    // C: b AUTHENTICATE OAUTHBEARER <... ALICE_TOKEN ...>
    // S: b OK
    let checker = checker();
    let dc = oauth_dovecot(&checker, "");
    let gate = Gate::transparent(&dc).await;
    for mech in Mech::ALL {
        for ir in [true, false] {
            let mut c = client(gate.addr()).await;
            authenticate(&mut c, "a", mech, "alice", STALE_TOKEN, ir).await;
            let challenge = c.read_response().await;
            assert_eq!(
                challenge,
                format!("+ {}", b64(mech.error_challenge())),
                "{mech:?} ir={ir}"
            );
            c.send_line(mech.after_error()).await;
            assert_eq!(
                c.read_until_tagged("a").await,
                [format!("a {FAILED}")],
                "{mech:?} ir={ir}"
            );
            assert_eq!(whoami(&mut c).await, "you are nobody");
            c.bad("n SELECT INBOX").await;
            authenticate(&mut c, "b", mech, "alice", ALICE_TOKEN, ir).await;
            assert_tagged(&c.read_until_tagged("b").await, "b", "OK");
            assert_eq!(whoami(&mut c).await, "you are alice", "{mech:?} ir={ir}");
            c.logout().await;
        }
    }
    assert_eq!(gate.logins("failed", 4).await, ["alice"; 4]);
    assert_eq!(gate.logins("ok", 4).await, ["alice"; 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_good_tokens_land_on_the_users_backend() {
    // C: a AUTHENTICATE XOAUTH2 <user=bob ^A auth=Bearer BOB_TOKEN ^A ^A>
    //    (on_login: login.user == "bob", login.mechanism == "XOAUTH2": mail2)
    // S: a OK [CAPABILITY ...] Logged in          (mail2's)
    let checker = checker();
    let (mail1, mail2) = backends(&checker).await;
    let gate = Gate::routed(&mail1, &mail2).await;
    let mut c = client(gate.addr()).await;
    let caps = c.ok("c CAPABILITY").await;
    for offered in ["SASL-IR", "AUTH=XOAUTH2", "AUTH=OAUTHBEARER"] {
        assert!(
            caps[0].split(' ').any(|c| c == offered),
            "{offered}: {caps:?}"
        );
    }
    c.logout().await;
    for mech in Mech::ALL {
        for ir in [true, false] {
            for (user, token, backend) in [
                ("alice", ALICE_TOKEN, "on-mail1"),
                ("bob", BOB_TOKEN, "on-mail2"),
            ] {
                let mut c = client(gate.addr()).await;
                authenticate(&mut c, "a", mech, user, token, ir).await;
                let r = c.read_until_tagged("a").await;
                assert_tagged(&r, "a", "OK");
                assert!(
                    r[r.len() - 1].contains("[CAPABILITY "),
                    "the backend's own answer: {r:?}"
                );
                assert_eq!(backend_of(&mut c).await, backend, "{user} {mech:?} ir={ir}");
                assert_eq!(
                    whoami(&mut c).await,
                    format!("you are {user} by {}", mech.name())
                );
                c.logout().await;
            }
        }
    }
    assert_eq!(
        gate.logins("ok", 8).await,
        ["alice", "bob"].repeat(4),
        "the audit log knows every user"
    );
    for mech in Mech::ALL {
        assert_eq!(dovecot_logins_by(&mail1, "alice", mech), 2, "{mech:?}");
        assert_eq!(dovecot_logins_by(&mail2, "bob", mech), 2, "{mech:?}");
        assert_eq!(dovecot_logins_by(&mail1, "bob", mech), 0, "{mech:?}");
        assert_eq!(dovecot_logins_by(&mail2, "alice", mech), 0, "{mech:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_bad_token_gets_the_servers_no_and_may_try_again() {
    // C: a AUTHENTICATE XOAUTH2 <user=bob ^A auth=Bearer STALE_TOKEN ^A ^A>
    //    (replayed to mail2: imapgate answers its error challenge with an empty response)
    // S: a NO [AUTHENTICATIONFAILED] Authentication failed.     (mail2's)
    // C: b AUTHENTICATE XOAUTH2 <... BOB_TOKEN ...>
    // S: b OK                                                   (mail2, same connection)
    let checker = checker();
    let (mail1, mail2) = backends(&checker).await;
    let gate = Gate::routed(&mail1, &mail2).await;
    // alice's replay to mail1 carries the response as initial response, bob's to mail2 after
    // mail2's "+".
    for (user, good, backend) in [
        ("alice", ALICE_TOKEN, "on-mail1"),
        ("bob", BOB_TOKEN, "on-mail2"),
    ] {
        // A token nobody issued, and another user's token: Dovecot refuses both.
        let other = if user == "bob" {
            ALICE_TOKEN
        } else {
            BOB_TOKEN
        };
        for mech in Mech::ALL {
            for ir in [true, false] {
                for bad in [STALE_TOKEN, other] {
                    let mut c = client(gate.addr()).await;
                    authenticate(&mut c, "a", mech, user, bad, ir).await;
                    assert_eq!(
                        c.read_until_tagged("a").await,
                        [format!("a {FAILED}")],
                        "{user} {mech:?} ir={ir} {bad}"
                    );
                    assert_eq!(
                        whoami(&mut c).await,
                        format!("you are nobody by {}", mech.name())
                    );
                    c.bad("n SELECT INBOX").await;
                    authenticate(&mut c, "b", mech, user, good, ir).await;
                    assert_tagged(&c.read_until_tagged("b").await, "b", "OK");
                    assert_eq!(backend_of(&mut c).await, backend, "{user} {mech:?} ir={ir}");
                    c.logout().await;
                }
            }
        }
    }
    let failed = gate.logins("failed", 16).await;
    assert_eq!(failed, [["alice"; 8], ["bob"; 8]].concat());
    assert_eq!(gate.logins("ok", 16).await, failed);
    let asked = checker.asked();
    assert_eq!(
        asked.iter().filter(|t| *t == STALE_TOKEN).count(),
        8,
        "the bad token reached Dovecot unchanged: {asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_token_logs_in_transparent_and_routed() {
    let checker = checker();
    let (mail1, mail2) = backends(&checker).await;
    let transparent = Gate::transparent(&mail1).await;
    let routed = Gate::routed(&mail1, &mail2).await;
    let long = long_token();
    for gate in [&transparent, &routed] {
        for mech in Mech::ALL {
            for ir in [true, false] {
                let mut c = client(gate.addr()).await;
                authenticate(&mut c, "a", mech, "alice", &long, ir).await;
                assert_tagged(&c.read_until_tagged("a").await, "a", "OK");
                assert_eq!(backend_of(&mut c).await, "on-mail1", "{mech:?} ir={ir}");
                c.logout().await;
            }
        }
    }
    assert_eq!(checker.asked(), vec![long; 8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_imaplib_xoauth2_through_imapgate() {
    // imaplib sends AUTHENTICATE without an initial response and answers each "+" with what
    // its authobject returns: the XOAUTH2 response first, an empty one to an error challenge.
    let checker = checker();
    let (mail1, mail2) = backends(&checker).await;
    let transparent = Gate::transparent(&mail1).await;
    let routed = Gate::routed(&mail1, &mail2).await;
    let script = r#"
import imaplib, sys
port, user, bad, good = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def xoauth2(token):
    response = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return lambda challenge: b"" if challenge else response
m = imaplib.IMAP4("127.0.0.1", port)
try:
    m.authenticate("XOAUTH2", xoauth2(bad))
    print("bad token accepted")
except imaplib.IMAP4.error as e:
    print("refused:", e)
typ, _ = m.authenticate("XOAUTH2", xoauth2(good))
print(typ)
typ, data = m.list('""', '"on-*"')
print(typ, b" ".join(data).decode())
m.logout()
"#;
    for (gate, backend) in [(&transparent, "on-mail1"), (&routed, "on-mail2")] {
        let out = tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(gate.addr().port().to_string())
            .args(["bob", STALE_TOKEN, BOB_TOKEN])
            .output()
            .await
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "imaplib failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{stdout}");
        assert!(
            lines[0].starts_with("refused: ") && lines[0].contains("AUTHENTICATIONFAILED"),
            "{stdout}"
        );
        assert_eq!(lines[1], "OK");
        assert!(
            lines[2].starts_with("OK ") && lines[2].ends_with(backend),
            "{stdout}"
        );
    }
}

/// The imapgate binary in front of `mail1` (and, routed, `mail2`), logging at trace level.
fn binary(mail1: &Dovecot, mail2: Option<&Dovecot>, dir: &Path) -> ProxyProcess {
    let mut toml =
        String::from("[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ntls = \"none\"\n");
    let script = dir.join("policy.lua");
    let source = match mail2 {
        Some(mail2) => {
            for (name, dc) in [("mail1", mail1), ("mail2", mail2)] {
                toml.push_str(&format!(
                    "[[upstream]]\nname = \"{name}\"\naddress = \"{}\"\n",
                    dc.addr()
                ));
            }
            toml.push_str("[routing]\n");
            ROUTE
        }
        None => {
            toml.push_str(&format!("[upstream]\naddress = \"{}\"\n", mail1.addr()));
            WHOAMI
        }
    };
    std::fs::write(&script, source).expect("write policy");
    toml.push_str(&format!("[[policy]]\nscript = {}\n", toml_path(&script)));
    ProxyProcess::start(&toml, "trace")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_log() {
    let checker = checker();
    let (mail1, mail2) = backends(&checker).await;
    let dir = temp_dir();
    let transparent = binary(&mail1, None, dir.path());
    let routed_dir = temp_dir();
    let routed = binary(&mail1, Some(&mail2), routed_dir.path());
    for proxy in [&transparent, &routed] {
        let addr = proxy.addr("plain");
        for mech in Mech::ALL {
            for ir in [true, false] {
                let mut c = client(addr).await;
                authenticate(&mut c, "a", mech, "bob", STALE_TOKEN, ir).await;
                let mut r = c.read_response().await;
                if r.starts_with('+') {
                    // Transparent: Dovecot's error challenge, relayed.
                    c.send_line(mech.after_error()).await;
                    r = c.read_response().await;
                }
                assert_eq!(r, format!("a {FAILED}"));
                authenticate(&mut c, "b", mech, "bob", BOB_TOKEN, ir).await;
                assert_tagged(&c.read_until_tagged("b").await, "b", "OK");
                c.logout().await;
            }
        }
        // Passwords too, by LOGIN and by PLAIN.
        let mut c = client(addr).await;
        c.no("a LOGIN alice WrongSecret123").await;
        c.ok("b AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlcHc=").await; // \0alice\0alicepw
        c.logout().await;
    }
    let mut secrets: Vec<String> = vec![
        STALE_TOKEN.into(),
        BOB_TOKEN.into(),
        "WrongSecret123".into(),
        "alicepw".into(),
        "AGFsaWNlAGFsaWNlcHc=".into(),
    ];
    for mech in Mech::ALL {
        secrets.push(mech.response("bob", STALE_TOKEN));
        secrets.push(mech.response("bob", BOB_TOKEN));
    }
    for (mode, proxy) in [("transparent", &transparent), ("routed", &routed)] {
        let log = poll("the last login in the log", Duration::from_secs(5), || {
            let log = proxy.log();
            (log.matches("login succeeded").count() >= 5).then_some(log)
        })
        .await;
        assert!(log.contains("bob"), "{mode}: the user is logged");
        for secret in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "{mode}: {secret} leaked into the log"
            );
        }
    }
}
