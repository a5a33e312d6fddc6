//! Hooks that wait for Redis, on their own and inside the sans-IO conversation: a waiting
//! command is held (nothing after it is read), its verdict applied when the hook resumes;
//! the budget still holds inside the coroutine; a state failure goes to `on_state_error`
//! unless the script catches it; while one call waits, the VM serves other calls.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use imapgate::config::{LuaConfig, OnError, PolicyConfig, StateConfig};
use imapgate::policy::api::HostShared;
use imapgate::policy::{CommandView, ConnCtx, ConnInfo, Judgement, Policies, Verdict};
use imapgate::session::state::{Conversation, Settings};
use imapgate::state::State;

use crate::support::redis::Redis;

const GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready\r\n";
/// The state timeout here; the hooks' time budget is ten times that.
const TIMEOUT: Duration = Duration::from_millis(200);

fn script(dir: &Path, name: &str, source: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, source).expect("write script");
    path
}

fn policy(path: PathBuf, on_state_error: Option<OnError>) -> PolicyConfig {
    PolicyConfig {
        script: path,
        options: toml::Table::new(),
        on_error: OnError::Closed,
        on_state_error,
    }
}

fn load(redis: &Redis, configs: &[PolicyConfig]) -> Policies {
    let cfg = StateConfig {
        timeout_ms: TIMEOUT.as_millis() as u64,
        ..StateConfig::new(&redis.url())
    };
    let host = HostShared {
        state: Some(State::new(&cfg, None).expect("state")),
        ..HostShared::default()
    };
    let lua = LuaConfig {
        memory_mb: 8,
        instructions: 200_000,
        time_ms: 2000,
        vms: 1,
    };
    Policies::load_with_host(configs, &lua, host).expect("policies load")
}

fn search(tag: &str) -> CommandView {
    CommandView {
        tag: tag.into(),
        name: "SEARCH",
        mailboxes: Vec::new(),
        delayed_ms: 0,
        user: None,
    }
}

fn ctx(id: u64) -> ConnCtx {
    ConnCtx::new(ConnInfo {
        id,
        peer: "203.0.113.7:4711".into(),
        state: "selected",
        user: Some("alice".into()),
        ..ConnInfo::default()
    })
}

/// A sans-IO conversation in which `user` has logged in (what was relayed is drained).
fn logged_in(policies: Policies, user: &str) -> Conversation {
    let mut conv = Conversation::new(
        Settings::default(),
        true,
        Bytes::from_static(GREETING),
        policies,
        ConnInfo::default(),
    );
    conv.client_buffer()
        .extend_from_slice(format!("l LOGIN {user} pw\r\n").as_bytes());
    conv.client_input();
    conv.upstream_buffer().extend_from_slice(b"l OK hi\r\n");
    conv.upstream_input();
    conv.to_client.drain_to_vec();
    conv.to_upstream.drain_to_vec();
    conv
}

/// The verdict on a SEARCH, waiting for it if the hook waits.
async fn verdict(policies: &Policies, id: u64) -> Verdict {
    let set = policies.current();
    match set.judge_command(&mut ctx(id), search("a")) {
        Judgement::Ready(v, _) => v,
        Judgement::Waiting(w) => w.await.verdict,
    }
}

fn rejected_with(v: &Verdict, text: &str) -> bool {
    matches!(v, Verdict::Reject { text: t, .. } if t == text)
}

const COUNT_SEARCHES: &str = r#"
return { name = "count", commands = { "SEARCH" },
  on_command = function(ctx, cmd)
    local n = imap.state.incr("searches:" .. ctx.user, 1, 60)
    if n > 2 then
      return imap.reject { status = "NO", code = "LIMIT", text = "enough " .. n }
    end
  end }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_hook_resumes_with_redis_answer() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("dir");
    let policies = load(
        &redis,
        &[policy(
            script(dir.path(), "count.lua", COUNT_SEARCHES),
            None,
        )],
    );
    let set = policies.current();
    // Redis is paused while the hook is called, so that it cannot be answered at once: the
    // hook waits, and resumes with Redis's answer once Redis is back.
    redis.freeze();
    let mut c = ctx(1);
    let w = match set.judge_command(&mut c, search("a")) {
        Judgement::Waiting(w) => w,
        Judgement::Ready(v, _) => panic!("a hook that calls Redis waits: {v:?}"),
    };
    redis.thaw();
    let done = w.await;
    assert_eq!(done.verdict, Verdict::Pass);
    assert_eq!(done.decisions.len(), 1, "{:?}", done.decisions);
    assert_eq!(verdict(&policies, 2).await, Verdict::Pass);
    let third = verdict(&policies, 3).await;
    assert!(rejected_with(&third, "enough 3"), "{third:?}");
    let stored: String = redis.cmd(&["GET", "imapgate:kv:searches:alice"]);
    assert_eq!(stored, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_inside_a_waiting_hook() {
    // After its Redis call the hook loops forever, each loop caught by pcall: the budget's
    // count hook reaches the coroutine too, and the call fails (on_error = closed).
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("dir");
    let looping = script(
        dir.path(),
        "loop.lua",
        r#"assert(coroutine == nil, "policies have no coroutine library")
           return { name = "loop", on_command = function(ctx, cmd)
             imap.state.get("anything")
             while true do pcall(function() while true do end end) end
           end }"#,
    );
    let policies = load(&redis, &[policy(looping, None)]);
    let started = Instant::now();
    let v = verdict(&policies, 1).await;
    assert!(
        rejected_with(&v, "Policy check failed, try again later"),
        "{v:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_failure_is_judged_by_on_state_error_unless_the_script_catches_it() {
    // Redis frozen: every call times out. "open" passes, "closed" refuses with
    // NO [UNAVAILABLE], and a script that catches the error with pcall decides itself.
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("dir");
    let reads = r#"return { name = "@NAME@", on_command = function(ctx, cmd)
        imap.state.get("k")
        return imap.reject { text = "read it" }
      end }"#;
    let open = load(
        &redis,
        &[policy(
            script(dir.path(), "open.lua", &reads.replace("@NAME@", "open")),
            Some(OnError::Open),
        )],
    );
    let closed = load(
        &redis,
        &[policy(
            script(dir.path(), "closed.lua", &reads.replace("@NAME@", "closed")),
            None,
        )],
    );
    let caught = load(
        &redis,
        &[policy(
            script(
                dir.path(),
                "caught.lua",
                r#"return { name = "caught", on_command = function(ctx, cmd)
                     if not pcall(imap.state.get, "k") then
                       return imap.reject { code = "LIMIT", text = "no state, no search" }
                     end
                   end }"#,
            ),
            None,
        )],
    );
    redis.freeze();
    let started = Instant::now();
    assert_eq!(verdict(&open, 1).await, Verdict::Pass);
    let v = verdict(&closed, 1).await;
    assert!(
        matches!(&v, Verdict::Reject { code: Some(c), text, .. }
            if c == "UNAVAILABLE" && text == "Policy state unavailable, try again later"),
        "{v:?}"
    );
    let v = verdict(&caught, 1).await;
    assert!(rejected_with(&v, "no state, no search"), "{v:?}");
    assert!(
        started.elapsed() < TIMEOUT * 3 * 5,
        "three waits, each bounded by the timeout: {:?}",
        started.elapsed()
    );
    redis.thaw();
    let v = verdict(&closed, 2).await;
    assert!(
        rejected_with(&v, "read it"),
        "back without a restart: {v:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_one_call_waits_the_vm_serves_others() {
    // One VM. Connection 1's hook waits on a frozen Redis; connection 2's SEARCH is judged
    // meanwhile (its hook needs no Redis), at once.
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("dir");
    let policies = load(
        &redis,
        &[policy(
            script(
                dir.path(),
                "some.lua",
                r#"return { name = "some", on_command = function(ctx, cmd)
                     if ctx.id == 1 then imap.state.get("k") end
                     if ctx.id == 2 then return imap.reject { text = "judged" } end
                   end }"#,
            ),
            None,
        )],
    );
    redis.freeze();
    let set = policies.current();
    let Judgement::Waiting(first) = set.judge_command(&mut ctx(1), search("a")) else {
        panic!("connection 1 waits");
    };
    let waiting = tokio::spawn(first);
    let started = Instant::now();
    let Judgement::Ready(v, _) = set.judge_command(&mut ctx(2), search("b")) else {
        panic!("connection 2 needs no Redis");
    };
    assert!(rejected_with(&v, "judged"), "{v:?}");
    assert!(
        started.elapsed() < TIMEOUT,
        "not behind the waiting call: {:?}",
        started.elapsed()
    );
    let first = waiting.await.expect("join");
    assert!(matches!(first.verdict, Verdict::Reject { .. }), "{first:?}");
    redis.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_state_is_refused_where_a_hook_cannot_wait() {
    // on_response runs inside the relay of a response and cannot wait: a state call there is
    // a hook error, not a hang.
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("dir");
    let policies = load(
        &redis,
        &[policy(
            script(
                dir.path(),
                "resp.lua",
                r#"return { name = "resp", responses = { "LIST" }, on_response = function(ctx, resp)
                     imap.state.get("k")
                   end }"#,
            ),
            Some(OnError::Open),
        )],
    );
    let mut conv = logged_in(policies, "alice");
    conv.client_buffer().extend_from_slice(b"a LIST \"\" *\r\n");
    conv.client_input();
    conv.upstream_buffer()
        .extend_from_slice(b"* LIST () \"/\" INBOX\r\na OK done\r\n");
    conv.upstream_input();
    let errors: Vec<String> = conv
        .events
        .iter()
        .filter_map(|e| match e {
            imapgate::session::state::Event::Policy(d) => d.error.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        ["shared state is only available in on_command, on_login and on_complete"],
        "{:?}",
        conv.events
    );
    // A hook error (on_error = closed), not a state failure (on_state_error = open).
    let out = String::from_utf8_lossy(&conv.to_client.drain_to_vec()).into_owned();
    assert!(
        out.ends_with("a NO [UNAVAILABLE] Policy check failed, try again later\r\n"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conversation_holds_a_command_while_its_hook_waits() {
    // C: a SEARCH ALL      (the hook waits for Redis)
    // C: b NOOP            (sent at once, but not read until a's verdict)
    // ... Redis answers: a goes upstream, then b.
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("dir");
    let policies = load(
        &redis,
        &[policy(
            script(dir.path(), "count.lua", COUNT_SEARCHES),
            None,
        )],
    );
    let mut conv = logged_in(policies, "bob");
    conv.client_buffer()
        .extend_from_slice(b"s SELECT INBOX\r\n");
    conv.client_input();
    conv.upstream_buffer()
        .extend_from_slice(b"s OK [READ-WRITE] selected\r\n");
    conv.upstream_input();
    conv.to_upstream.drain_to_vec();
    conv.to_client.drain_to_vec();

    redis.freeze();
    conv.client_buffer()
        .extend_from_slice(b"a SEARCH ALL\r\nb NOOP\r\n");
    conv.client_input();
    redis.thaw();
    assert!(conv.is_waiting());
    assert!(!conv.wants_client_input() && !conv.wants_upstream_input());
    assert_eq!(conv.to_upstream.drain_to_vec(), b"");
    let hook = conv.take_hook().expect("the waiting hook, for the driver");
    let done = hook.await;
    conv.hook_done(done);
    assert!(!conv.is_waiting());
    assert_eq!(
        String::from_utf8_lossy(&conv.to_upstream.drain_to_vec()),
        "a SEARCH ALL\r\nb NOOP\r\n"
    );
    let counted: String = redis.cmd(&["GET", "imapgate:kv:searches:bob"]);
    assert_eq!(counted, "1");
}
