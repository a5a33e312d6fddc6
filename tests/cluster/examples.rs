//! The cluster example (examples/cluster/) as shipped: HAProxy accepts its config, imapgate
//! checks its own (policies loaded with `imap.state` available, a warning when Redis does not
//! answer), and `imapgate replay` with `[state]` routes as the proxy would, from Redis.

use std::path::{Path, PathBuf};
use std::process::Command;

use imapgate::config::Config;
use imapgate::replay::{ReplayOptions, replay};

use crate::support::haproxy::haproxy_binary;
use crate::support::proxy::binary;
use crate::support::redis::Redis;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/cluster")
        .join(name)
}

#[test]
fn haproxy_accepts_the_example_config() {
    let out = Command::new(haproxy_binary())
        .args(["-c", "-f"])
        .arg(example("haproxy.cfg"))
        .output()
        .expect("run haproxy -c");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Configuration file is valid"), "{text}");
}

#[test]
fn imapgate_checks_the_example_config() {
    // No Redis on the example's address here: a warning, not a failure.
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(example("imapgate.toml"))
        .output()
        .expect("run imapgate check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("ok (3 policies: route, login_throttle, search_rate_limit)"),
        "{stdout}"
    );
}

#[test]
fn replay_routes_from_redis_as_the_proxy_would() {
    // The example's policies, with [state] pointed at a private redis-server holding a route.
    let redis = Redis::start();
    redis.cmd::<i64>(&["HSET", "imapgate:kv:routes", "dave@example.org", "mail2"]);
    let text = std::fs::read_to_string(example("imapgate.toml"))
        .expect("read example")
        .replace("redis://127.0.0.1:6379/0", &redis.url());
    let config = Config::from_str_named(&text, example("imapgate.toml").display().to_string())
        .expect("example parses");
    let run = |transcript: &str| {
        let mut out = Vec::new();
        replay(&config, transcript, &ReplayOptions::default(), &mut out).expect("replay");
        String::from_utf8_lossy(&out).into_owned()
    };
    let out = run("C: a LOGIN dave@example.org secret\n");
    assert!(out.contains("routed: mail2"), "{out}");
    // erin has no entry: the first upstream (route.lua returns nothing).
    let out = run("C: a LOGIN erin@example.org secret\n");
    assert!(out.contains("routed: the default upstream"), "{out}");
}
