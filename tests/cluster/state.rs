//! The shared-state client against a private redis-server: keys, expiry, token buckets, and
//! a server that stops answering.

use std::time::{Duration, Instant};

use imapgate::config::StateConfig;
use imapgate::metrics::Metrics;
use imapgate::state::{State, StateError};

use crate::support::redis::Redis;

fn config(redis: &Redis, prefix: &str) -> StateConfig {
    StateConfig {
        prefix: prefix.to_owned(),
        ..StateConfig::new(&redis.url())
    }
}

/// One state operation, its answer dropped.
type Op<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), StateError>> + 'a>>;

/// Polls `check` every 10 ms until it holds or `limit` passes; true when it held.
async fn eventually<F: AsyncFnMut() -> bool>(limit: Duration, mut check: F) -> bool {
    let end = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn keys_get_the_prefix_and_values_round_trip() {
    let redis = Redis::start();
    let state = State::new(&config(&redis, "t1:"), None).expect("state");
    assert_eq!(state.get("greeting").await.expect("get"), None);
    state
        .set("greeting", "hello world", None)
        .await
        .expect("set");
    assert_eq!(
        state.get("greeting").await.expect("get").as_deref(),
        Some("hello world")
    );
    // Stored under the prefix, with the value byte for byte and no expiry.
    let raw: Option<String> = redis.cmd(&["GET", "t1:greeting"]);
    assert_eq!(raw.as_deref(), Some("hello world"));
    let ttl: i64 = redis.cmd(&["PTTL", "t1:greeting"]);
    assert_eq!(ttl, -1);
    assert!(redis.cmd::<Option<String>>(&["GET", "greeting"]).is_none());

    // Keys and values are arguments: what looks like a command inside them is data.
    let odd = "x\r\n*1\r\n$8\r\nFLUSHALL\r\n' \" {}";
    state.set(odd, odd, None).await.expect("set odd");
    assert_eq!(state.get(odd).await.expect("get odd").as_deref(), Some(odd));
    assert_eq!(
        state.get("greeting").await.expect("still there").as_deref(),
        Some("hello world")
    );

    // HGET: a hash an operator maintains (route maps).
    let _: i64 = redis.cmd(&["HSET", "t1:routes", "alice", "mail2"]);
    assert_eq!(
        state
            .hget("routes", "alice")
            .await
            .expect("hget")
            .as_deref(),
        Some("mail2")
    );
    assert_eq!(state.hget("routes", "bob").await.expect("hget"), None);
    assert_eq!(state.hget("nothing", "bob").await.expect("hget"), None);
    // A key of the wrong type is the server's refusal, not a missing value.
    assert!(matches!(
        state.hget("greeting", "x").await,
        Err(StateError::Server(_))
    ));
}

#[tokio::test]
async fn set_with_ttl_expires_and_incr_keeps_a_fixed_window() {
    let redis = Redis::start();
    let state = State::new(&config(&redis, "t2:"), None).expect("state");

    state
        .set("short", "1", Some(Duration::from_millis(300)))
        .await
        .expect("set");
    let ttl: i64 = redis.cmd(&["PTTL", "t2:short"]);
    assert!(ttl > 0 && ttl <= 300, "{ttl}");
    assert!(
        eventually(Duration::from_secs(5), async || state
            .get("short")
            .await
            .expect("get")
            .is_none())
        .await
    );

    // A new counter gets the TTL; adding to a live one keeps its expiry (a fixed window).
    let window = Some(Duration::from_secs(60));
    assert_eq!(state.incr("fails", 1.0, window).await.expect("incr"), 1.0);
    let first: i64 = redis.cmd(&["PTTL", "t2:fails"]);
    assert!(first > 59_000 && first <= 60_000, "{first}");
    assert_eq!(
        state
            .incr("fails", 2.5, Some(Duration::from_secs(3600)))
            .await
            .expect("incr"),
        3.5
    );
    let second: i64 = redis.cmd(&["PTTL", "t2:fails"]);
    assert!(second <= first, "the window moved: {first} -> {second}");
    assert_eq!(state.incr("fails", -0.5, None).await.expect("incr"), 3.0);

    // Expired: the next increment starts from zero with a new window.
    let _: i64 = redis.cmd(&["PEXPIRE", "t2:fails", "1"]);
    assert!(
        eventually(Duration::from_secs(5), async || {
            redis.cmd::<i64>(&["EXISTS", "t2:fails"]) == 0
        })
        .await
    );
    assert_eq!(state.incr("fails", 1.0, window).await.expect("incr"), 1.0);

    // No TTL: no expiry. A key that had none gets the TTL of the first increment with one.
    assert_eq!(state.incr("forever", 1.0, None).await.expect("incr"), 1.0);
    assert_eq!(redis.cmd::<i64>(&["PTTL", "t2:forever"]), -1);
    assert_eq!(state.incr("forever", 1.0, window).await.expect("incr"), 2.0);
    assert!(redis.cmd::<i64>(&["PTTL", "t2:forever"]) > 0);

    // Not a number: refused by the server, refused before sending for NaN.
    state.set("word", "abc", None).await.expect("set");
    assert!(matches!(
        state.incr("word", 1.0, None).await,
        Err(StateError::Server(_))
    ));
    assert!(matches!(
        state.incr("x", f64::NAN, None).await,
        Err(StateError::Invalid(_))
    ));
}

#[tokio::test]
async fn rate_limit_allows_the_burst_then_waits_then_refills() {
    let redis = Redis::start();
    let metrics = Metrics::new();
    let state = State::new(&config(&redis, "t3:"), Some(&metrics)).expect("state");
    // 4 a second, burst 3: three at once, then one every 250 ms.
    for i in 0..3 {
        let d = state.rate_limit("alice", 4.0, 3).await.expect("decision");
        assert!(d.allowed, "request {i} of the burst refused");
    }
    let refused = state.rate_limit("alice", 4.0, 3).await.expect("decision");
    assert!(!refused.allowed, "the burst is 3");
    assert!(
        refused.wait > Duration::ZERO && refused.wait <= Duration::from_millis(250),
        "{:?}",
        refused.wait
    );
    // Other keys and other quotas are other buckets, as in process.
    assert!(state.rate_limit("bob", 4.0, 3).await.expect("d").allowed);
    assert!(state.rate_limit("alice", 4.0, 4).await.expect("d").allowed);

    // Refused requests take nothing: after the announced wait, one more is allowed. (The
    // bucket refills with time: waiting the announced time is the behaviour under test.)
    tokio::time::sleep(refused.wait).await;
    assert!(
        eventually(Duration::from_secs(2), async || state
            .rate_limit("alice", 4.0, 3)
            .await
            .expect("d")
            .allowed)
        .await,
        "no refill"
    );
    let again = state.rate_limit("alice", 4.0, 3).await.expect("d");
    assert!(!again.allowed, "only one came back");

    // The bucket lives in Redis under the prefix and expires once full again.
    let ttl: i64 = redis.cmd(&["PTTL", "t3:rate:3:4:alice"]);
    assert!(ttl > 0 && ttl <= 1000, "{ttl}");

    assert!(matches!(
        state.rate_limit("alice", 0.0, 3).await,
        Err(StateError::Invalid(_))
    ));
    let text = metrics.render();
    assert!(
        text.contains("imapgate_state_requests_total{op=\"rate_limit\",result=\"ok\"}"),
        "{text}"
    );
    assert!(text.contains("imapgate_state_duration_seconds_bucket{op=\"rate_limit\""));
}

#[tokio::test]
async fn two_clients_share_one_bucket() {
    let redis = Redis::start();
    let a = State::new(&config(&redis, "t4:"), None).expect("state");
    let b = State::new(&config(&redis, "t4:"), None).expect("state");
    let mut allowed = 0;
    for i in 0..10 {
        let s = if i % 2 == 0 { &a } else { &b };
        if s.rate_limit("carol", 0.5, 4).await.expect("d").allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 4, "one bucket of 4 across both clients");
}

#[tokio::test]
async fn a_frozen_server_times_out_and_a_thawed_one_answers_again() {
    let redis = Redis::start();
    let metrics = Metrics::new();
    let cfg = StateConfig {
        timeout_ms: 200,
        connect_timeout_ms: 200,
        ..config(&redis, "t5:")
    };
    let state = State::new(&cfg, Some(&metrics)).expect("state");
    state.set("k", "1", None).await.expect("set while up");

    redis.freeze();
    // The one timing bound of these tests: an operation against a hung server ends within a
    // few command timeouts, whatever the connection is doing.
    let bound = state.timeout() * 5;
    for round in 0..2 {
        let ops: [(&str, Op<'_>); 5] = [
            ("get", Box::pin(async { state.get("k").await.map(drop) })),
            ("set", Box::pin(async { state.set("k", "2", None).await })),
            (
                "incr",
                Box::pin(async { state.incr("n", 1.0, None).await.map(drop) }),
            ),
            (
                "hget",
                Box::pin(async { state.hget("h", "f").await.map(drop) }),
            ),
            (
                "rate_limit",
                Box::pin(async { state.rate_limit("u", 1.0, 1).await.map(drop) }),
            ),
        ];
        for (name, op) in ops {
            let started = Instant::now();
            let result = op.await;
            let took = started.elapsed();
            assert!(
                matches!(result, Err(StateError::Timeout)),
                "{name} (round {round}): {result:?}"
            );
            assert!(took < bound, "{name} (round {round}) took {took:?}");
        }
    }
    let text = metrics.render();
    assert!(
        text.contains("imapgate_state_requests_total{op=\"get\",result=\"timeout\"} 2"),
        "{text}"
    );

    redis.thaw();
    // The same client recovers: no new State.
    assert!(
        eventually(Duration::from_secs(10), async || state
            .get("k")
            .await
            .is_ok())
        .await,
        "no answer after the thaw"
    );
    state.set("k", "3", None).await.expect("set after thaw");
    assert_eq!(state.get("k").await.expect("get").as_deref(), Some("3"));
    assert!(state.rate_limit("u2", 1.0, 1).await.expect("d").allowed);
}

#[tokio::test]
async fn a_server_that_is_not_there_makes_ops_fail_not_hang_until_it_comes() {
    // State::new does not need the server. The port must be known before redis-server exists,
    // so it is probed free: should another process take it meanwhile (unlikely), the server
    // does not start and the test fails with its log.
    let port = crate::support::proxy::free_port();
    let cfg = StateConfig::new(&format!("redis://127.0.0.1:{port}/0"));
    let state = State::new(&cfg, None).expect("state without a server");
    let started = Instant::now();
    let result = state.get("k").await;
    assert!(started.elapsed() < state.timeout() * 5);
    assert!(
        matches!(result, Err(StateError::Connect(_) | StateError::Timeout)),
        "{result:?}"
    );
    assert!(state.ping().await.is_err());

    // The server comes: the same client finds it, without a restart.
    let redis = Redis::start_at(port);
    assert!(
        eventually(Duration::from_secs(10), async || state
            .set("k", "v", None)
            .await
            .is_ok())
        .await,
        "the client did not find the server that came"
    );
    assert_eq!(
        redis
            .cmd::<Option<String>>(&["GET", "imapgate:k"])
            .as_deref(),
        Some("v")
    );
}

#[tokio::test]
async fn the_password_comes_from_a_file_or_the_environment() {
    let redis = Redis::with_password("s3cret pass");
    let dir = crate::support::temp_dir();
    let file = dir.path().join("redis.pass");
    std::fs::write(&file, "s3cret pass\n").expect("write");
    let from_file = StateConfig {
        password_file: Some(file),
        ..config(&redis, "t6:")
    };
    let state = State::new(&from_file, None).expect("state");
    state.set("k", "v", None).await.expect("authenticated");
    state.ping().await.expect("ping");

    // SAFETY (of the test): no other test of this binary reads this variable.
    unsafe { std::env::set_var("IMAPGATE_TEST_REDIS_PASSWORD", "s3cret pass") };
    let from_env = StateConfig {
        password_env: Some("IMAPGATE_TEST_REDIS_PASSWORD".into()),
        ..config(&redis, "t6:")
    };
    let state = State::new(&from_env, None).expect("state");
    assert_eq!(state.get("k").await.expect("get").as_deref(), Some("v"));

    // A wrong password is a connection failure, and never quoted.
    let wrong = StateConfig {
        redis: imapgate::config::RedisUrl::new(format!("redis://:wrong-pass@{}/0", redis.addr())),
        ..config(&redis, "t6:")
    };
    let state = State::new(&wrong, None).expect("state");
    let err = state.get("k").await.expect_err("wrong password");
    assert!(
        matches!(err, StateError::Connect(_) | StateError::Timeout),
        "{err:?}"
    );
    assert!(!format!("{state:?}").contains("wrong-pass"));
    assert!(!err.to_string().contains("wrong-pass"), "{err}");

    let missing = StateConfig {
        password_file: Some(dir.path().join("absent")),
        ..config(&redis, "t6:")
    };
    assert!(matches!(
        State::new(&missing, None),
        Err(StateError::Config(_))
    ));
}

#[tokio::test]
async fn check_says_whether_redis_answers_without_failing_when_it_does_not() {
    let redis = Redis::start();
    let dir = crate::support::temp_dir();
    let check = |url: &str| {
        let path = dir.path().join("imapgate.toml");
        std::fs::write(
            &path,
            format!(
                "[[listener]]\nbind = \"127.0.0.1:1143\"\ntls = \"none\"\n\
                 [state]\nredis = \"{url}\"\ntimeout_ms = 200\nconnect_timeout_ms = 200\n"
            ),
        )
        .expect("write config");
        let out = std::process::Command::new(crate::support::proxy::binary())
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run imapgate check");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, _) = check(&redis.url());
    assert!(ok, "{stdout}");
    assert!(
        stdout.contains("Redis at") && stdout.contains("answers"),
        "{stdout}"
    );

    let dead = crate::support::proxy::DeadPort::new();
    let (ok, stdout, stderr) = check(&format!("redis://:hidden-pw@{}/0", dead.addr()));
    assert!(
        ok,
        "a Redis that does not answer only warns: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("warning") && stderr.contains("does not answer"),
        "{stderr}"
    );
    assert!(!format!("{stdout}{stderr}").contains("hidden-pw"));
}

#[tokio::test]
async fn rediss_verifies_the_server_with_the_configured_ca() {
    let dir = crate::support::temp_dir();
    let pki = crate::support::Pki::generate(dir.path());
    let redis = Redis::with_tls(&pki);
    assert!(redis.url().starts_with("rediss://127.0.0.1:"));
    let trusted = StateConfig {
        ca: Some(pki.ca.clone()),
        // A TLS handshake on a loaded machine with a debug build is slower than loopback.
        timeout_ms: 2000,
        ..config(&redis, "t7:")
    };
    let state = State::new(&trusted, None).expect("state");
    state.ping().await.expect("ping over TLS");
    state.set("k", "v", None).await.expect("set over TLS");
    assert_eq!(
        redis.cmd::<Option<String>>(&["GET", "t7:k"]).as_deref(),
        Some("v")
    );

    // Without the CA, the system roots do not know the test CA: no connection.
    let untrusted = StateConfig {
        timeout_ms: 2000,
        ..config(&redis, "t7:")
    };
    let state = State::new(&untrusted, None).expect("state");
    let err = state.get("k").await.expect_err("an unknown CA");
    assert!(
        matches!(err, StateError::Connect(_) | StateError::Timeout),
        "{err:?}"
    );
}
