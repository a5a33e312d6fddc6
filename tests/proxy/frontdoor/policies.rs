//! The shipped front-door policies against real private Dovecots: `route.lua` placing users on
//! two backends (its map, a wildcard domain from its map file, rendezvous hashing for the
//! rest, the file re-read on reload) and `login_throttle.lua` slowing, then refusing, wrong
//! passwords from one client address (its real one, from a PROXY header) while another address
//! logs in, both in the transparent mode and when imapgate routes the login.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imapgate::config::{
    Config, MetricsConfig, PolicyConfig, RoutingConfig, UpstreamConfig, UpstreamTls,
};
use imapgate::policy::api::stable_hash;

use crate::support::evidence::{dovecot_logins, poll, sample, scrape};
use crate::support::proxy::{PLAIN, Proxy, config_for};
use crate::support::{Client, Dovecot, DovecotOptions, assert_tagged, generated_user};

/// The attacker and a bystander, as a load balancer reports them (RFC 5737 addresses).
const ATTACKER: &str = "203.0.113.7";
const BYSTANDER: &str = "198.51.100.9";

fn shipped(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(file)
}

fn policy(file: &str, options: &str) -> PolicyConfig {
    PolicyConfig {
        script: shipped(file),
        options: toml::from_str(options).expect("options"),
        on_error: Default::default(),
        on_state_error: None,
    }
}

fn upstream(dc: &Dovecot, name: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: name.to_owned(),
        address: dc.addr().to_string(),
        ..UpstreamConfig::default()
    }
}

/// Two Dovecots knowing the same users.
fn two_backends(users: &[(&str, &str)]) -> (Dovecot, Dovecot) {
    let opts = DovecotOptions {
        extra_config: "auth_verbose = yes\n".into(),
        users: users
            .iter()
            .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
            .collect(),
        generated_users: 12,
        ..DovecotOptions::default()
    };
    (Dovecot::start(opts.clone()), Dovecot::start(opts))
}

/// imapgate routing between mail1 (the first upstream) and mail2, with `policies`.
fn routed_config(mail1: &Dovecot, mail2: &Dovecot, policies: Vec<PolicyConfig>) -> Config {
    let mut config = config_for(mail1, UpstreamTls::None);
    config.upstreams = vec![upstream(mail1, "mail1"), upstream(mail2, "mail2")];
    config.routing = Some(RoutingConfig::default());
    config.policies = policies;
    config
}

/// Logs `user` in through imapgate and out again.
async fn log_in(addr: SocketAddr, user: &str, password: &str) {
    let mut c = Client::connect(addr).await;
    c.read_greeting().await;
    c.login(user, password).await;
    c.logout().await;
}

/// Which backend's log shows `user`'s login ("mail1", "mail2"), waiting for the log line.
async fn landed_on(mail1: &Dovecot, mail2: &Dovecot, user: &str) -> &'static str {
    poll(
        &format!("{user}'s login in a Dovecot log"),
        Duration::from_secs(5),
        || match (
            dovecot_logins(mail1, user).len(),
            dovecot_logins(mail2, user).len(),
        ) {
            (0, 0) => None,
            (1, 0) => Some("mail1"),
            (0, 1) => Some("mail2"),
            other => panic!("{user} logged in {other:?} times"),
        },
    )
    .await
}

/// Where route.lua's rendezvous hashing puts `user` when both are up: computed here from the
/// documented hash, not by the policy.
fn by_hash(user: &str, pool: &[&'static str]) -> &'static str {
    pool.iter()
        .copied()
        .max_by_key(|name| stable_hash(format!("{}:{name}", user.to_lowercase()).as_bytes()))
        .expect("a pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_places_users_by_map_domain_and_hash() {
    let users = [
        ("carol@example.org", "carolpw"),
        ("dave@example.org", "davepw"),
    ];
    let (mail1, mail2) = two_backends(&users);
    let dir = crate::support::temp_dir();
    let map = dir.path().join("users.map");
    std::fs::write(&map, "# moved by hand\n*@example.org mail2\nbob mail1\n").expect("map");
    let options = format!(
        "users = {{ alice = \"mail2\" }}\nmap_file = {:?}\npool = [\"mail1\", \"mail2\"]",
        map.display().to_string()
    );
    let config = routed_config(&mail1, &mail2, vec![policy("route.lua", &options)]);
    let gate = Proxy::start(config.clone()).await;
    let addr = gate.addr(PLAIN);

    // C: l1 LOGIN alice alicepw        -> mail2 (users option)
    // C: l1 LOGIN carol@example.org .. -> mail2 (*@example.org in the map file)
    // C: l1 LOGIN bob bobpw            -> mail1 (map file)
    for (user, password, expected) in [
        ("alice", "alicepw", "mail2"),
        ("carol@example.org", "carolpw", "mail2"),
        ("bob", "bobpw", "mail1"),
    ] {
        log_in(addr, user, password).await;
        assert_eq!(landed_on(&mail1, &mail2, user).await, expected, "{user}");
    }
    // Everyone else where the hash says; with 12 users, both backends get some.
    let mut seen = std::collections::HashSet::new();
    for i in 0..12 {
        let (user, password) = generated_user(i);
        log_in(addr, &user, &password).await;
        let expected = by_hash(&user, &["mail1", "mail2"]);
        assert_eq!(landed_on(&mail1, &mail2, &user).await, expected, "{user}");
        seen.insert(expected);
    }
    assert_eq!(seen.len(), 2, "every user hashed to one backend: {seen:?}");

    // The map file changes; a reload (what SIGHUP does) re-reads it: dave moves to mail1.
    std::fs::write(&map, "*@example.org mail2\ndave@example.org mail1\n").expect("map");
    gate.server().reload_policies(&config).expect("reloads");
    log_in(addr, "dave@example.org", "davepw").await;
    assert_eq!(landed_on(&mail1, &mail2, "dave@example.org").await, "mail1");
}

/// A PROXY v1 header for a client at `ip` (port 4242) that connected to 198.51.100.1:143.
fn proxy_v1(ip: &str) -> Vec<u8> {
    format!("PROXY TCP4 {ip} 198.51.100.1 4242 143\r\n").into_bytes()
}

/// A client imapgate sees as coming from `ip`.
async fn client_from(addr: SocketAddr, ip: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.send(&proxy_v1(ip)).await;
    c.read_greeting().await;
    c
}

/// Options that keep the test short: 2 failures before delays (of 200 ms), 3 before refusals.
const THROTTLE: &str =
    "window_s = 60\ndelay_after = 2\ndelay_ms = 200\nrefuse_after = 3\ncooldown_s = 60";

/// Listeners taking PROXY headers from the test (so clients have documentation addresses),
/// and a metrics endpoint.
fn behind_a_load_balancer(config: &mut Config) {
    for l in &mut config.listeners {
        l.proxy_protocol = true;
        l.proxy_from = vec!["127.0.0.1/32".parse().expect("network")];
    }
    config.metrics = Some(MetricsConfig {
        bind: "127.0.0.1:0".parse().expect("address"),
    });
}

/// `imapgate_policy_login_throttle_total` for each action.
async fn throttle_counts(gate: &Proxy) -> [f64; 4] {
    let text = scrape(gate.metrics_addr().expect("metrics")).await;
    ["failure", "delay", "refuse", "cooldown"].map(|action| {
        sample(
            &text,
            &format!("imapgate_policy_login_throttle_total{{action=\"{action}\"}}"),
        )
    })
}

/// The last line of a refusal by the throttle.
fn assert_throttled(responses: &[String]) {
    let last = responses.last().map(String::as_str).unwrap_or_default();
    assert!(
        last.contains("NO [UNAVAILABLE] Too many failed logins, try again later"),
        "{responses:?}"
    );
}

/// A Dovecot that logs every password it refuses (`auth_verbose`).
fn verbose_auth() -> DovecotOptions {
    DovecotOptions {
        extra_config: "auth_verbose = yes\n".into(),
        ..DovecotOptions::default()
    }
}

/// The passwords Dovecot refused for `user` (`passwd-file(user,...): Password mismatch`).
fn dovecot_password_mismatches(dc: &Dovecot, user: &str) -> usize {
    let needle = format!("passwd-file({user},");
    dc.log()
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("Password mismatch"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_throttle_delays_then_refuses_one_address() {
    let dc = Dovecot::start(verbose_auth());
    let mut config = config_for(&dc, UpstreamTls::None);
    behind_a_load_balancer(&mut config);
    config.policies = vec![policy("login_throttle.lua", THROTTLE)];
    let gate = Proxy::start(config).await;
    let addr = gate.addr(PLAIN);

    // The attacker guesses bob's password, one connection (the transparent relay: Dovecot
    // answers the guesses).
    let mut attacker = client_from(addr, ATTACKER).await;
    for tag in ["g1", "g2"] {
        let r = attacker.no(&format!("{tag} LOGIN bob guess")).await;
        assert!(
            r.last().is_some_and(|l| l.contains("AUTHENTICATIONFAILED")),
            "{r:?}"
        );
    }
    assert_eq!(throttle_counts(&gate).await, [2.0, 0.0, 0.0, 0.0]);
    // The third guess is held first (then Dovecot refuses it): the count reached delay_after.
    attacker.no("g3 LOGIN bob guess").await;
    assert_eq!(throttle_counts(&gate).await, [3.0, 1.0, 0.0, 2.0]);
    // refuse_after reached: the address and bob cool down; even the right password is refused
    // by imapgate, without reaching Dovecot.
    assert_throttled(&attacker.no("g4 LOGIN alice alicepw").await);
    let mut again = client_from(addr, ATTACKER).await;
    assert_throttled(&again.no("g5 LOGIN alice alicepw").await);
    again.logout().await;
    // From another address: bob is cooling down too (counted per user), alice is not.
    let mut bystander = client_from(addr, BYSTANDER).await;
    assert_throttled(&bystander.no("b1 LOGIN bob bobpw").await);
    bystander.ok("b2 LOGIN alice alicepw").await;
    bystander.logout().await;
    assert_eq!(throttle_counts(&gate).await, [3.0, 1.0, 3.0, 2.0]);

    let alice_logins = poll(
        "alice's login in Dovecot's log",
        Duration::from_secs(5),
        || {
            let logins = dovecot_logins(&dc, "alice");
            (!logins.is_empty()).then_some(logins)
        },
    )
    .await;
    assert_eq!(
        alice_logins.len(),
        1,
        "only the bystander's: {alice_logins:?}"
    );
    let mismatches = poll("bob's 3 refused passwords", Duration::from_secs(5), || {
        (dovecot_password_mismatches(&dc, "bob") >= 3).then_some(())
    });
    mismatches.await;
    assert_eq!(dovecot_password_mismatches(&dc, "bob"), 3, "{}", dc.log());
    attacker.logout().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_throttle_works_when_imapgate_routes_logins() {
    let (mail1, mail2) = two_backends(&[]);
    let mut config = routed_config(
        &mail1,
        &mail2,
        vec![
            // First: its refusals and delays win before route.lua places the login.
            policy("login_throttle.lua", THROTTLE),
            policy("route.lua", "users = { bob = \"mail2\" }"),
        ],
    );
    behind_a_load_balancer(&mut config);
    let gate = Proxy::start(config).await;
    let addr = gate.addr(PLAIN);

    // AUTHENTICATE PLAIN without an initial response: the user is in the SASL line that
    // imapgate reads for routing (on_login), not in the command (on_command).
    // "\0bob\0guess" and "\0bob\0bobpw":
    const BOB_GUESS: &str = "AGJvYgBndWVzcw==";
    const BOB_RIGHT: &str = "AGJvYgBib2Jwdw==";
    async fn authenticate(c: &mut Client, tag: &str, response: &str) -> Vec<String> {
        c.send_line(&format!("{tag} AUTHENTICATE PLAIN")).await;
        assert_eq!(c.read_response().await.trim_end(), "+");
        c.send_line(response).await;
        c.read_until_tagged(tag).await
    }
    // Each guess from a new address: only bob's count adds up.
    for (i, tag) in ["g1", "g2", "g3"].into_iter().enumerate() {
        let mut c = client_from(addr, &format!("192.0.2.{}", i + 1)).await;
        let r = authenticate(&mut c, tag, BOB_GUESS).await;
        assert_tagged(&r, tag, "NO");
        assert!(
            r.last().is_some_and(|l| l.contains("AUTHENTICATIONFAILED")),
            "{r:?}"
        );
        c.logout().await;
    }
    assert_eq!(throttle_counts(&gate).await, [3.0, 1.0, 0.0, 1.0]);
    poll(
        "bob's 3 refused passwords on mail2",
        Duration::from_secs(5),
        || (dovecot_password_mismatches(&mail2, "bob") >= 3).then_some(()),
    )
    .await;
    assert_eq!(dovecot_password_mismatches(&mail1, "bob"), 0);
    // bob cools down, whoever asks and however right the password.
    let mut c = client_from(addr, BYSTANDER).await;
    assert_throttled(&authenticate(&mut c, "b1", BOB_RIGHT).await);
    // The same connection logs in as someone else (a refused login leaves it unauthenticated).
    c.ok("b2 LOGIN alice alicepw").await;
    c.logout().await;
    assert_eq!(throttle_counts(&gate).await, [3.0, 1.0, 1.0, 1.0]);
    let alice = poll(
        "alice's login in mail1's log",
        Duration::from_secs(5),
        || {
            let logins = dovecot_logins(&mail1, "alice");
            (!logins.is_empty()).then_some(logins)
        },
    )
    .await;
    assert_eq!(alice.len(), 1, "{alice:?}");
    assert!(dovecot_logins(&mail2, "bob").is_empty());
}
