//! Nothing a client sends makes a hook slow, SIGTERM ends the process whatever a hook does,
//! and every policy fails closed: verdicts a hook cannot apply are errors, and policies cannot
//! change each other (findings 5 and 8).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{
    COURIER, Gate, JAIL, PATIENCE, assert_answer, direct, dovecot, local_policy, server_mailboxes,
    shipped,
};
use crate::support::Client;
use crate::support::evidence::{http_get_within, poll, scrape, sum_samples};
use crate::support::proxy::{ProxyProcess, toml_path};
use crate::support::tap::Tap;

/// The finding's LIST pattern: namespace.lua turns it into a backtracking Lua pattern.
const ATTACK: &str = "**************z";

/// The imapgate binary with namespace.lua (README options) and `extra` policies, a plaintext
/// listener `plain` and the metrics endpoint `metrics`, in front of `upstream`.
fn gate_process(upstream: std::net::SocketAddr, extra: &str) -> ProxyProcess {
    let namespace =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/namespace.lua");
    let options = COURIER.replace('\n', ", ");
    let toml = format!(
        r#"
[[listener]]
name = "plain"
bind = "127.0.0.1:0"
tls = "none"

[upstream]
address = "{upstream}"

[limits]
drain_timeout_s = {DRAIN_S}

[metrics]
bind = "127.0.0.1:0"

[[policy]]
script = {script}
options = {{ {options} }}
{extra}
"#,
        script = toml_path(&namespace),
    );
    ProxyProcess::start(&toml, "info")
}

const DRAIN_S: u64 = 2;

/// A user whose account holds a folder with a long name (the backtracking grows with it).
async fn user_with_a_long_folder() -> (String, String) {
    let (user, pass) = dovecot().fresh_user();
    let mut d = direct(&user, &pass).await;
    d.ok(&format!("d1 CREATE Archive/{}", "a".repeat(120)))
        .await;
    d.logout().await;
    (user, pass)
}

async fn plain_login(addr: std::net::SocketAddr, user: &str, pass: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.set_timeout(PATIENCE);
    c.read_greeting().await;
    c.login(user, pass).await;
    c
}

/// Finding 5: the LIST pattern attack. With a long folder name in the account, two sessions
/// send, over and over,
///
/// ```text
/// C: l1 LIST "" "**************z"
/// ```
///
/// while a third session's NOOPs must each answer within 100 ms (the bound the issue sets) and
/// `/healthz` keeps answering. No test that loads the cores runs beside it ([`crate::support::quiet`]), so
/// that only the attack loads the cores. Today each LIST runs one `string.find` that
/// backtracks for minutes in a single C call: the two attacks take both cores and every other
/// session and `/healthz` stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f05_list_pattern_attack_does_not_stall_other_sessions() {
    let _quiet = crate::support::quiet().await;
    let (user, pass) = user_with_a_long_folder().await;
    let tap = Tap::start(dovecot().addr()).await;
    let proxy = gate_process(tap.addr(), "");
    let plain = proxy.addr("plain");
    let metrics = proxy.metrics_addr();
    let mut victim = plain_login(plain, &user, &pass).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for _ in 0..2 {
        let (user, pass, stop) = (user.clone(), pass.clone(), stop.clone());
        let done = Arc::new(AtomicUsize::new(0));
        let counted = done.clone();
        let task = tokio::spawn(async move {
            // Never panics: once the test has failed, imapgate is killed under it.
            let mut c = Client::connect(plain).await;
            c.send_line(&format!("l0 LOGIN {user} {pass}")).await;
            c.collect_until("l0", PATIENCE).await;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && !c.is_closed() {
                n += 1;
                let tag = format!("l{n}");
                c.send_line(&format!("{tag} LIST \"\" \"{ATTACK}\"")).await;
                c.collect_until(&tag, Duration::from_secs(600)).await;
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        attackers.push((task, done));
    }
    // The attack is under way once the server has answered an attacking LIST: imapgate is
    // judging its entries now. (Today the second attack may not even get to the server: the
    // first one's hook can hold the worker thread its session is queued on.)
    poll(
        "the server's answer to an attack",
        Duration::from_secs(10),
        || {
            (0..tap.connections())
                .any(|i| String::from_utf8_lossy(&tap.to_client(i)).contains(" OK List completed"))
                .then_some(())
        },
    )
    .await;

    for i in 0..20 {
        let start = Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(2), victim.cmd(&format!("n{i} NOOP"))).await;
        let took = start.elapsed();
        assert!(
            answer.is_ok(),
            "NOOP {i} of another session got no answer within 2 s during the LIST attack"
        );
        assert!(
            took < Duration::from_millis(100),
            "NOOP {i} of another session took {took:?} during the LIST attack (limit 100 ms)"
        );
        let (status, body) = http_get_within(metrics, "/healthz", Duration::from_secs(1)).await;
        assert_eq!(status, 200, "/healthz during the attack: {body}");
    }
    stop.store(true, Ordering::SeqCst);
    for (task, done) in attackers {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the attacking LISTs end")
            .expect("attacker task");
        assert!(done.load(Ordering::SeqCst) >= 1);
    }
}

/// A slow hook stalls only its own session. Two sessions each run a hook that spins in Lua
/// for its whole time budget (1.5 s here) at once, one per core, while a third session's
/// NOOPs (no policy wants NOOP) must each answer within 100 ms:
///
/// ```text
/// (session 1) C: s1 STATUS INBOX (MESSAGES)     the policy spins 1.5 s, then NO [UNAVAILABLE]
/// (session 2) C: s1 STATUS INBOX (MESSAGES)     the same, at the same time
/// (session 3) C: n0 NOOP ... n9 NOOP            each answered within 100 ms
/// ```
///
/// A hook runs on the thread of the session that called it; without handing that worker's
/// other sessions to another thread, two such hooks hold both workers of a 2-core machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hook_stalls_only_its_own_session() {
    let _quiet = crate::support::quiet().await;
    let (user, pass) = dovecot().fresh_user();
    let dir = crate::support::temp_dir();
    let spin = local_policy(
        dir.path(),
        "spin",
        r#"local started = imap.metrics.counter("spins", "hooks that began to spin")
return { name = "spin", commands = { "STATUS" },
  on_command = function(ctx, cmd) started:inc() while true do end end }"#,
    );
    let extra = format!(
        "[[policy]]\nscript = {}\n\n[lua]\ntime_ms = 1500\ninstructions = 1000000000000\n",
        toml_path(&spin.script)
    );
    let proxy = gate_process(dovecot().addr(), &extra);
    let plain = proxy.addr("plain");
    let mut victim = plain_login(plain, &user, &pass).await;
    // Both spinners' STATUS go out together, then the victim's NOOPs.
    let mut writers = Vec::new();
    for _ in 0..2 {
        let mut c = plain_login(plain, &user, &pass).await;
        c.send_line("s1 STATUS INBOX (MESSAGES)").await;
        writers.push(c);
    }
    // The NOOPs go once both hooks spin (the metrics endpoint has a thread of its own).
    let metrics = proxy.metrics_addr();
    let mut spinning = 0.0;
    for _ in 0..500 {
        spinning = sum_samples(&scrape(metrics).await, "imapgate_policy_spins_total", &[]);
        if spinning >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spinning, 2.0, "the two hooks did not both start");
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let start = Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(5), victim.cmd(&format!("n{i} NOOP"))).await;
        assert!(answer.is_ok(), "NOOP {i} got no answer within 5 s");
        slowest = slowest.max(start.elapsed());
    }
    for mut c in writers {
        let r = c.collect_until("s1", Duration::from_secs(30)).await;
        assert_answer(&r, "s1", "NO [UNAVAILABLE]");
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a NOOP of another session took {slowest:?} while two hooks spun (limit 100 ms)"
    );
}

/// The CPU time (user + system) of process `pid` so far, in seconds (USER_HZ = 100).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the command name: state is field 0, utime field 11, stime field 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// Finding 5, the end of it: SIGTERM ends the real binary within `drain_timeout_s` plus a few
/// seconds while a hook is busy in a single C call. Two ways to get there:
///
/// ```text
/// (namespace.lua)   C: l1 LIST "" "**************z"      with a long folder name
/// (a policy's own)  C: n1 NOOP                            its on_command backtracks in string.find
/// then: SIGTERM     the process is gone within drain_timeout_s + 5 s
/// ```
///
/// Today the drain waits for the stuck session forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f05_sigterm_ends_the_process_while_a_hook_is_stuck() {
    let (user, pass) = user_with_a_long_folder().await;
    let dir = crate::support::temp_dir();
    let slow = local_policy(
        dir.path(),
        "slow",
        r#"-- One C call that backtracks for ages: nothing inside Lua can interrupt it.
return { name = "slow", commands = { "NOOP" },
  on_command = function(ctx, cmd)
    string.find(string.rep("a", 60), string.rep("a*", 30) .. "b")
  end }"#,
    );
    let rows = [
        (
            "namespace.lua on the attack LIST",
            String::new(),
            format!("l1 LIST \"\" \"{ATTACK}\""),
        ),
        (
            "a policy stuck in string.find",
            format!("[[policy]]\nscript = {}\n", toml_path(&slow.script)),
            "n1 NOOP".to_string(),
        ),
    ];
    for (what, extra, line) in rows {
        let mut proxy = gate_process(dovecot().addr(), &extra);
        let mut c = plain_login(proxy.addr("plain"), &user, &pass).await;
        let before = cpu_seconds(proxy.pid());
        c.send_line(&line).await;
        let tag = crate::support::client::tag_of(line.as_bytes());
        // The hook is at work once the process has burnt half a second of CPU since; a hook
        // that is not slow (namespace.lua once fixed) answers instead, and the SIGTERM then
        // meets an idle session.
        let mut answered = Vec::new();
        let end = Instant::now() + Duration::from_secs(30);
        while cpu_seconds(proxy.pid()) - before <= 0.5 && answered.is_empty() {
            assert!(Instant::now() < end, "{what}: neither busy nor answered");
            answered = c.collect_until(&tag, Duration::from_millis(50)).await;
        }
        proxy.signal("TERM");
        let limit = Duration::from_secs(DRAIN_S + 5);
        assert!(
            proxy.wait(limit).is_some(),
            "{what}: imapgate still running {limit:?} after SIGTERM (drain_timeout_s = {DRAIN_S})"
        );
    }
}

/// Runs one session through `gate`: a login, a CAPABILITY and a NOOP, tolerating refusals,
/// a BYE and even a missing greeting; returns everything the client got.
async fn session_through(gate: &Gate, user: &str, pass: &str) -> Vec<String> {
    let mut c = Client::connect_tls(
        gate.proxy.addr(crate::support::proxy::IMAPS),
        dovecot().ca_pem(),
    )
    .await;
    let mut got = Vec::new();
    for line in [
        format!("l1 LOGIN {user} {pass}"),
        "a1 CAPABILITY".to_string(),
        "a2 NOOP".to_string(),
    ] {
        if c.is_closed() {
            break;
        }
        let tag = crate::support::client::tag_of(line.as_bytes());
        c.send_line(&line).await;
        got.extend(c.collect_until(&tag, PATIENCE).await);
    }
    got
}

/// Finding 8, verdicts a hook cannot apply. A policy's hook returns a verdict that makes no
/// sense where it is returned; each must be a counted error (`imapgate_policy_errors_total`
/// for that hook), under `on_error = "closed"`:
///
/// ```text
/// on_command  returns imap.drop()      C: c CREATE Dropped   S: c NO [UNAVAILABLE] (not forwarded)
/// on_response returns imap.reject{..}  C: l LIST "" "*"      S: l NO [UNAVAILABLE] (no LIST data)
/// on_response returns imap.delay(10)   (likewise)
/// on_connect  returns imap.drop()
/// on_capability returns imap.reject{..}
/// on_complete returns imap.delay(10)
/// ```
///
/// Today each verdict is silently ignored: the CREATE is forwarded (and Dovecot creates the
/// folder), the LIST data relayed, the rest thrown away, and no error is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f08_verdicts_a_hook_cannot_apply_are_counted_errors() {
    let (user, pass) = dovecot().fresh_user();
    let dir = crate::support::temp_dir();

    // A command hook that drops: the command never reaches the server.
    let gate = Gate::start(vec![local_policy(
        dir.path(),
        "drops_commands",
        r#"return { name = "drops_commands", commands = { "CREATE" },
                    on_command = function(ctx, cmd) return imap.drop() end }"#,
    )])
    .await;
    let mut c = gate.logged_in(&user, &pass).await;
    let r = c.cmd("c CREATE Dropped").await;
    let mut d = direct(&user, &pass).await;
    let boxes = server_mailboxes(&mut d).await;
    assert!(
        !boxes.iter().any(|b| b == "Dropped"),
        "the dropped CREATE reached Dovecot: {boxes:?}"
    );
    assert!(!gate.server_received().contains("CREATE"));
    assert_answer(&r, "c", "NO [UNAVAILABLE]");
    assert_errors(&gate, "drops_commands", "on_command").await;
    drop(gate);

    // Response hooks that reject or delay: the LIST data is not relayed.
    for (name, verdict) in [
        (
            "rejects_responses",
            "imap.reject{ status = \"NO\", text = \"no\" }",
        ),
        ("delays_responses", "imap.delay(10)"),
    ] {
        let gate = Gate::start(vec![local_policy(
            dir.path(),
            name,
            &format!(
                "return {{ name = \"{name}\", responses = {{ \"LIST\" }},
                   on_response = function(ctx, resp) return {verdict} end }}"
            ),
        )])
        .await;
        let mut c = gate.logged_in(&user, &pass).await;
        let r = c.cmd("l LIST \"\" \"*\"").await;
        assert!(
            gate.tap.to_client_text().contains("* LIST"),
            "the server listed nothing"
        );
        assert!(!r.iter().any(|l| l.starts_with("* LIST")), "{name}: {r:?}");
        assert_answer(&r, "l", "NO [UNAVAILABLE]");
        assert_errors(&gate, name, "on_response").await;
    }

    // The other hooks: whatever they return is checked, not thrown away.
    for (hook, verdict, signature) in [
        ("on_connect", "imap.drop()", "ctx"),
        (
            "on_capability",
            "imap.reject{ status = \"NO\", text = \"no\" }",
            "ctx, caps",
        ),
        ("on_complete", "imap.delay(10)", "ctx, cmd, status"),
    ] {
        let name = format!("returns_from_{hook}");
        let gate = Gate::start(vec![local_policy(
            dir.path(),
            &name,
            &format!(
                "return {{ name = \"{name}\",
                   {hook} = function({signature}) return {verdict} end }}"
            ),
        )])
        .await;
        session_through(&gate, &user, &pass).await;
        assert_errors(&gate, &name, hook).await;
    }
}

/// Panics unless `imapgate_policy_errors_total{policy, hook}` counted at least one error.
async fn assert_errors(gate: &Gate, policy: &str, hook: &str) {
    let scrape = gate.scrape().await;
    let errors = sum_samples(
        &scrape,
        "imapgate_policy_errors_total",
        &[("policy", policy), ("hook", hook)],
    );
    assert!(
        errors >= 1.0,
        "{policy}: the verdict its {hook} returned was not counted as an error:\n{}",
        scrape
            .lines()
            .filter(|l| l.starts_with("imapgate_policy_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Finding 8, the sandbox: one policy cannot change what another runs. A policy loaded before
/// namespace.lua (jail) replaces `string.find` and, through `getmetatable(_ENV).__index`, the
/// shared `ipairs`; then, after a login:
///
/// ```text
/// C: a CREATE "INBOX.x/y"           S: a NO [CANNOT] ...  (holds the server's delimiter)
/// C: b CREATE Private/Planted       S: b NO [CANNOT] ...  (outside the jail)
/// C: c CREATE INBOX.Fine            S: c OK ...           (the server's Jail/Fine)
/// ```
///
/// Today the tampering reaches namespace.lua: its loop over the command's names runs with the
/// replaced `ipairs` and never translates, so Dovecot creates `INBOX.x/y` and
/// `Private/Planted` outside the jail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f08_a_policy_cannot_tamper_with_another() {
    let (user, pass) = dovecot().fresh_user();
    let dir = crate::support::temp_dir();
    let evil = local_policy(
        dir.path(),
        "evil",
        r#"-- Each attempt may fail in a sound sandbox: that is the point.
local function tamper()
  pcall(function() string.find = function() return nil end end)
  pcall(function()
    getmetatable(_ENV).__index.ipairs = function() return function() return nil end end
  end)
end
tamper()
return { name = "evil", on_connect = function(ctx) tamper() end }"#,
    );
    let gate = Gate::start(vec![evil, shipped("namespace.lua", JAIL)]).await;
    let mut c = gate.logged_in(&user, &pass).await;
    let a = c.cmd("a CREATE \"INBOX.x/y\"").await;
    let b = c.cmd("b CREATE Private/Planted").await;
    let cc = c.cmd("c CREATE INBOX.Fine").await;

    let mut d = direct(&user, &pass).await;
    let boxes = server_mailboxes(&mut d).await;
    assert_eq!(
        boxes,
        ["INBOX", "Jail", "Jail/Fine"],
        "what the server holds after the tampered namespace policy ran"
    );
    assert_answer(&a, "a", "NO [CANNOT]");
    assert_answer(&b, "b", "NO [CANNOT]");
    assert_answer(&cc, "c", "OK");
}
