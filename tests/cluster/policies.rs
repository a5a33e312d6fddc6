//! The shipped policies shared through Redis: two imapgate processes behind a real HAProxy
//! (round robin, PROXY protocol v2), one redis-server, real Dovecots. A user's searches are
//! one bucket, failed logins from one address count together, a route changed in Redis plus
//! a kick moves a user; with Redis paused, sessions that do not need it go on untouched and
//! those that do get their documented answer within the state timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::evidence::{http_request, scrape, sum_samples};
use crate::support::haproxy::Haproxy;
use crate::support::proxy::{ProxyProcess, toml_path};
use crate::support::redis::Redis;
use crate::support::{Client, Dovecot, DovecotOptions, list_names, quote};

const WAIT: Duration = Duration::from_secs(10);
/// The state timeout of these imapgates.
const STATE_TIMEOUT: Duration = Duration::from_millis(300);

/// One upstream (`dc`) and the shipped policy `script` configured by `toml` (`@SCRIPT@` is
/// its path).
fn one_upstream_with(dc: &Dovecot, toml: &str, script: &str) -> String {
    format!(
        "[upstream]\naddress = \"{}\"\n{}",
        dc.addr(),
        toml.replace("@SCRIPT@", &policy(script))
    )
}

fn policy(name: &str) -> String {
    toml_path(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("policies")
            .join(name),
    )
}

/// One imapgate behind the load balancer, with `[state]` on `redis` and `rest` (upstreams,
/// policies) added to its configuration.
fn gate(redis: &Redis, rest: &str) -> ProxyProcess {
    let toml = format!(
        r#"
[[listener]]
name = "imap"
bind = "127.0.0.1:0"
tls = "none"
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]

[metrics]
bind = "127.0.0.1:0"

[limits]
drain_timeout_s = 1

# A hook's time budget counts its waits: it must leave room for the state timeout.
[lua]
time_ms = 1000

[state]
redis = "{redis}"
timeout_ms = {timeout}

{rest}
"#,
        redis = redis.url(),
        timeout = STATE_TIMEOUT.as_millis(),
    );
    ProxyProcess::start(&toml, "info")
}

/// Two imapgates with the same configuration, and HAProxy in front, round robin.
struct Cluster {
    gates: [ProxyProcess; 2],
    lb: Haproxy,
}

impl Cluster {
    fn start(redis: &Redis, rest: &str) -> Cluster {
        let gates = [gate(redis, rest), gate(redis, rest)];
        let lb = Haproxy::start_balanced(
            &[gates[0].addr("imap"), gates[1].addr("imap")],
            "send-proxy-v2",
        );
        Cluster { gates, lb }
    }

    fn addr(&self) -> SocketAddr {
        self.lb.addr()
    }

    /// The sum of a counter over both instances' /metrics.
    async fn total(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut sum = 0.0;
        for g in &self.gates {
            sum += sum_samples(&scrape(g.metrics_addr()).await, name, labels);
        }
        sum
    }

    /// The value of a counter on each instance.
    async fn each(&self, name: &str, labels: &[(&str, &str)]) -> [f64; 2] {
        let mut out = [0.0; 2];
        for (o, g) in out.iter_mut().zip(&self.gates) {
            *o = sum_samples(&scrape(g.metrics_addr()).await, name, labels);
        }
        out
    }
}

async fn logged_in(addr: SocketAddr, user: &str, pass: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.read_greeting().await;
    c.login(user, pass).await;
    c
}

const SEARCH_LIMIT: &str = r#"
[[policy]]
script = @SCRIPT@
on_state_error = "closed"
[policy.options]
shared = true
mode = "reject"
per_second = 0.01
burst = 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_searches_over_both_instances_are_one_bucket() {
    // Four sessions of one user, two on each instance (round robin); eight SEARCHes in turn
    // over them. burst = 3 and a refill of one per 100 s: three are answered, whichever
    // instance they reached, and the five others get NO [LIMIT] (twice the burst would pass
    // with a bucket per instance).
    let dc = Dovecot::shared();
    let redis = Redis::start();
    let (user, pass) = dc.fresh_user();
    let rest = one_upstream_with(dc, SEARCH_LIMIT, "search_rate_limit.lua");
    let cluster = Cluster::start(&redis, &rest);
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let mut c = logged_in(cluster.addr(), &user, &pass).await;
        c.ok("s SELECT INBOX").await;
        sessions.push(c);
    }
    let mut answered = 0;
    let mut limited = 0;
    for i in 0..8 {
        let c = &mut sessions[i % 4];
        let answer = c.cmd(&format!("q{i} SEARCH ALL")).await;
        let last = answer.last().cloned().unwrap_or_default();
        if last.starts_with(&format!("q{i} OK")) {
            answered += 1;
        } else {
            assert!(
                last.starts_with(&format!("q{i} NO [LIMIT]")),
                "over the limit: {answer:?}"
            );
            limited += 1;
        }
    }
    assert_eq!((answered, limited), (3, 5), "one bucket for the cluster");
    let searches = cluster
        .each("imapgate_commands_total", &[("command", "SEARCH")])
        .await;
    assert!(
        searches.iter().all(|&n| n >= 1.0),
        "both instances judged searches: {searches:?}"
    );
    let state_ok = cluster
        .total(
            "imapgate_state_requests_total",
            &[("op", "rate_limit"), ("result", "ok")],
        )
        .await;
    assert_eq!(state_ok, 8.0, "one Redis round trip per limited command");
}

const THROTTLE: &str = r#"
[[policy]]
script = @SCRIPT@
[policy.options]
shared = true
delay_ms = 0
refuse_after = 4
per_user = false
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_address_count_on_every_instance() {
    // Four wrong passwords from 127.0.0.1, spread over both instances by the load balancer:
    // the address is in its cool-down everywhere, so the right password is refused too.
    let dc = Dovecot::shared();
    let redis = Redis::start();
    let (user, pass) = dc.fresh_user();
    let rest = one_upstream_with(dc, THROTTLE, "login_throttle.lua");
    let cluster = Cluster::start(&redis, &rest);
    for i in 0..4 {
        let mut c = Client::connect(cluster.addr()).await;
        c.read_greeting().await;
        let answer = c
            .cmd(&format!("l{i} LOGIN {} {}", quote(&user), quote("wrong")))
            .await;
        assert!(
            answer
                .last()
                .is_some_and(|l| l.starts_with(&format!("l{i} NO"))),
            "{answer:?}"
        );
    }
    let failures = cluster
        .each(
            "imapgate_policy_login_throttle_total",
            &[("action", "failure")],
        )
        .await;
    // Round robin spreads them (not always two and two): each instance saw fewer than
    // refuse_after, so only the shared count can start the cool-down.
    assert_eq!(failures.iter().sum::<f64>(), 4.0, "{failures:?}");
    assert!(
        failures.iter().all(|&n| (1.0..4.0).contains(&n)),
        "both instances counted failures: {failures:?}"
    );
    for i in 0..2 {
        let mut c = Client::connect(cluster.addr()).await;
        c.read_greeting().await;
        let answer = c
            .cmd(&format!("g{i} LOGIN {} {}", quote(&user), quote(&pass)))
            .await;
        assert_eq!(
            answer.last().map(String::as_str),
            Some(format!("g{i} NO [UNAVAILABLE] Too many failed logins, try again later").as_str()),
            "refused on either instance: {answer:?}"
        );
    }
    let keys: Vec<String> = redis.cmd(&["KEYS", "imapgate:count:login_throttle:*"]);
    assert!(
        keys.iter()
            .any(|k| k == "imapgate:count:login_throttle:cooldown a 127.0.0.1"),
        "{keys:?}"
    );
}

/// Two Dovecots, each holding a folder naming it, with `user` on both.
async fn two_backends(user: &str, pass: &str) -> (Dovecot, Dovecot) {
    let with_user = || DovecotOptions {
        users: vec![(user.to_string(), pass.to_string())],
        ..DovecotOptions::default()
    };
    let mail1 = Dovecot::start(with_user());
    let mail2 = Dovecot::start(with_user());
    for (dc, folder) in [(&mail1, "on-mail1"), (&mail2, "on-mail2")] {
        let mut c = logged_in(dc.addr(), user, pass).await;
        c.ok(&format!("c CREATE {folder}")).await;
        c.logout().await;
    }
    (mail1, mail2)
}

async fn backend_of(c: &mut Client) -> String {
    list_names(&c.ok("w LIST \"\" \"on-*\"").await).join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_changed_in_redis_and_a_kick_move_the_user() {
    // HSET imapgate:kv:routes carol mail1: carol lands on mail1 through either instance.
    // HSET ... mail2, then POST /kick?user=carol on both: her session ends, and her next one
    // (through either instance) is on mail2, although each instance cached the old answer
    // for redis_cache_s = 600.
    let redis = Redis::start();
    let (mail1, mail2) = two_backends("carol", "carolpw").await;
    let dir = crate::support::temp_dir();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "t0ken-cluster-kick\n").expect("write token");
    let rest = format!(
        r#"
[routing]

[[upstream]]
name = "mail1"
address = "{m1}"

[[upstream]]
name = "mail2"
address = "{m2}"

[admin]
bind = "127.0.0.1:0"
token_file = {token}

[[policy]]
script = {script}
[policy.options]
redis_hash = "routes"
redis_cache_s = 600
"#,
        m1 = mail1.addr(),
        m2 = mail2.addr(),
        token = toml_path(&token_file),
        script = policy("route.lua"),
    );
    redis.cmd::<i64>(&["HSET", "imapgate:kv:routes", "carol", "mail1"]);
    let gates = [admin_gate(&redis, &rest), admin_gate(&redis, &rest)];
    let lb = Haproxy::start_balanced(
        &[gates[0].addr("imap"), gates[1].addr("imap")],
        "send-proxy-v2",
    );
    let mut first = logged_in(lb.addr(), "carol", "carolpw").await;
    assert_eq!(backend_of(&mut first).await, "on-mail1");
    let mut second = logged_in(lb.addr(), "carol", "carolpw").await;
    assert_eq!(backend_of(&mut second).await, "on-mail1");

    redis.cmd::<i64>(&["HSET", "imapgate:kv:routes", "carol", "mail2"]);
    // Round robin usually put one session on each, but not always: kick both instances.
    let mut kicked = Vec::new();
    for g in &gates {
        let (status, body) = http_request(
            g.admin_addr(),
            "POST",
            "/kick?user=carol",
            &["Authorization: Bearer t0ken-cluster-kick"],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        kicked.push(body.trim().to_string());
    }
    kicked.sort();
    assert!(
        kicked == [r#"{"kicked":1}"#, r#"{"kicked":1}"#]
            || kicked == [r#"{"kicked":0}"#, r#"{"kicked":2}"#],
        "both sessions kicked: {kicked:?}"
    );
    for c in [&mut first, &mut second] {
        let bye = c.collect_until("* BYE", WAIT).await;
        assert!(
            bye.last().is_some_and(|l| l.contains("[UNAVAILABLE]")),
            "{bye:?}"
        );
    }
    for _ in 0..2 {
        let mut c = logged_in(lb.addr(), "carol", "carolpw").await;
        assert_eq!(backend_of(&mut c).await, "on-mail2", "moved");
        c.logout().await;
    }
}

fn admin_gate(redis: &Redis, rest: &str) -> ProxyProcess {
    let toml = format!(
        r#"
[[listener]]
name = "imap"
bind = "127.0.0.1:0"
tls = "none"
proxy_protocol = true
proxy_from = ["127.0.0.1/32"]

[limits]
drain_timeout_s = 1

[state]
redis = "{redis}"
timeout_ms = {timeout}

{rest}
"#,
        redis = redis.url(),
        timeout = STATE_TIMEOUT.as_millis(),
    );
    ProxyProcess::start(&toml, "info")
}

/// How long a round trip of `cmd` takes.
async fn timed(c: &mut Client, cmd: &str) -> (Duration, Vec<String>) {
    let started = Instant::now();
    let answer = c.cmd(cmd).await;
    (started.elapsed(), answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_paused_only_what_needs_it_waits_and_nothing_longer_than_the_timeout() {
    // One imapgate (both would behave alike), search_rate_limit shared with
    // on_state_error = "closed". Redis is SIGSTOPped: NOOPs and FETCHes of another session
    // answer as before (well within the state timeout), a SEARCH gets NO [UNAVAILABLE]
    // within a few timeouts, and the timeouts are counted. SIGCONT: SEARCH is answered again
    // (and limited again), without a restart.
    let dc = Dovecot::shared();
    let redis = Redis::start();
    let (user, pass) = dc.fresh_user();
    let generous = SEARCH_LIMIT
        .replace("per_second = 0.01", "per_second = 100.0")
        .replace("burst = 3", "burst = 100");
    let rest = one_upstream_with(dc, &generous, "search_rate_limit.lua");
    let g = gate(&redis, &rest);
    let direct = |g: &ProxyProcess| g.addr("imap");
    // The listener takes PROXY headers from 127.0.0.1 only: go through a load balancer.
    let lb = Haproxy::start_balanced(&[direct(&g)], "send-proxy-v2");
    let mut searcher = logged_in(lb.addr(), &user, &pass).await;
    searcher.ok("s SELECT INBOX").await;
    let mut other = logged_in(lb.addr(), &user, &pass).await;
    other.ok("s SELECT INBOX").await;
    searcher.ok("a SEARCH ALL").await;

    redis.freeze();
    let (took, answer) = timed(&mut searcher, "b SEARCH ALL").await;
    assert_eq!(
        answer.last().map(String::as_str),
        Some("b NO [UNAVAILABLE] Policy state unavailable, try again later"),
        "{answer:?}"
    );
    assert!(
        took < STATE_TIMEOUT * 5,
        "answered within the state timeout (give or take): {took:?}"
    );
    // The other session, and the searcher's own commands that no policy asks Redis about.
    for i in 0..20 {
        let (took, answer) = timed(&mut other, &format!("n{i} NOOP")).await;
        assert!(
            answer.last().is_some_and(|l| l.contains("OK")),
            "{answer:?}"
        );
        assert!(took < STATE_TIMEOUT, "a NOOP waited for Redis: {took:?}");
    }
    let (took, answer) = timed(&mut searcher, "f LIST \"\" \"*\"").await;
    assert!(
        answer.last().is_some_and(|l| l.starts_with("f OK")),
        "{answer:?}"
    );
    assert!(took < STATE_TIMEOUT, "{took:?}");
    // Meanwhile, a search of the other session waits too, and is refused the same way.
    let (_, answer) = timed(&mut other, "c SEARCH ALL").await;
    assert!(
        answer
            .last()
            .is_some_and(|l| l.starts_with("c NO [UNAVAILABLE]")),
        "{answer:?}"
    );
    let timeouts = sum_samples(
        &scrape(g.metrics_addr()).await,
        "imapgate_state_requests_total",
        &[("op", "rate_limit"), ("result", "timeout")],
    );
    assert!(timeouts >= 2.0, "timeouts counted: {timeouts}");

    redis.thaw();
    let mut ok = false;
    for i in 0..50 {
        let answer = searcher.cmd(&format!("r{i} SEARCH ALL")).await;
        if answer
            .last()
            .is_some_and(|l| l.starts_with(&format!("r{i} OK")))
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "SEARCH works again once Redis is back");
    let scraped = scrape(g.metrics_addr()).await;
    assert!(
        scraped.contains("imapgate_state_duration_seconds_bucket"),
        "the latency histogram is exported"
    );
}
