//! The Lua policy engine on its own: sandbox, budgets, contract errors, reload, filters. The
//! session runs sans-IO here (client and upstream bytes in, bytes out), like a transcript.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use imapgate::config::{LuaConfig, OnError, PolicyConfig};
use imapgate::policy::{Policies, PolicyError};
use imapgate::session::state::{Conversation, Event, Settings};

const GREETING: &[u8] = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN] ready\r\n";

struct Scripts {
    dir: tempfile::TempDir,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn write(&self, name: &str, source: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, source).expect("write script");
        path
    }
}

fn config(script: &Path) -> PolicyConfig {
    PolicyConfig {
        script: script.to_path_buf(),
        options: toml::Table::new(),
        on_error: OnError::Closed,
    }
}

fn small_lua() -> LuaConfig {
    LuaConfig {
        memory_mb: 8,
        instructions: 200_000,
        time_ms: 2000,
        vms: 1,
    }
}

fn load(configs: &[PolicyConfig]) -> Result<Policies, PolicyError> {
    Policies::load(configs, &small_lua())
}

fn conversation(policies: Policies) -> Conversation {
    let mut conv = Conversation::new(
        Settings::default(),
        true,
        Bytes::from_static(GREETING),
        policies,
        Default::default(),
    );
    conv.to_client.drain_to_vec();
    // Logged in: most commands are not valid before.
    conv.client_buffer()
        .extend_from_slice(b"l0 LOGIN alice pw\r\n");
    conv.client_input();
    conv.upstream_buffer()
        .extend_from_slice(b"l0 OK Logged in\r\n");
    conv.upstream_input();
    conv.to_client.drain_to_vec();
    conv.to_upstream.drain_to_vec();
    conv.events.clear();
    conv
}

/// The client sends `line`; returns (bytes relayed upstream, bytes answered to the client).
fn send(conv: &mut Conversation, line: &str) -> (String, String) {
    conv.client_buffer().extend_from_slice(line.as_bytes());
    conv.client_input();
    (
        String::from_utf8_lossy(&conv.to_upstream.drain_to_vec()).into_owned(),
        String::from_utf8_lossy(&conv.to_client.drain_to_vec()).into_owned(),
    )
}

/// The upstream answers `line`; returns (bytes then relayed upstream, bytes for the client).
fn answer(conv: &mut Conversation, line: &str) -> (String, String) {
    conv.upstream_buffer().extend_from_slice(line.as_bytes());
    conv.upstream_input();
    (
        String::from_utf8_lossy(&conv.to_upstream.drain_to_vec()).into_owned(),
        String::from_utf8_lossy(&conv.to_client.drain_to_vec()).into_owned(),
    )
}

fn policy_events(conv: &mut Conversation) -> Vec<(String, String)> {
    conv.events
        .drain(..)
        .filter_map(|e| match e {
            Event::Policy(d) => Some((d.hook.as_str().to_string(), d.action.to_string())),
            _ => None,
        })
        .collect()
}

fn load_error(source: &str) -> String {
    let s = Scripts::new();
    let path = s.write("bad.lua", source);
    match load(&[config(&path)]) {
        Ok(_) => panic!("{source:?} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sandbox_has_no_io_os_load_or_require() {
    for (source, what) in [
        ("local f = io.open('/etc/passwd')\nreturn {}", "io"),
        ("os.execute('true')\nreturn {}", "os"),
        ("load('return 1')()\nreturn {}", "load"),
        ("loadstring('return 1')\nreturn {}", "loadstring"),
        ("dofile('/etc/passwd')\nreturn {}", "dofile"),
        ("loadfile('/etc/passwd')\nreturn {}", "loadfile"),
        ("require('os')\nreturn {}", "require"),
        ("package.loaded.os.exit()\nreturn {}", "package"),
        ("debug.getinfo(1)\nreturn {}", "debug"),
        ("return { x = string.dump(function() end) }", "dump"),
        ("return { x = ('').dump(function() end) }", "dump"),
    ] {
        let e = load_error(source);
        assert!(e.contains("bad.lua:"), "{what}: no file and line in {e:?}");
        assert!(e.contains("nil"), "{what}: {e:?}");
    }
}

#[test]
fn syntax_errors_name_file_and_line() {
    let e = load_error("return {\n  on_command = function(ctx, cmd)\n    if then\n  end,\n}\n");
    assert!(e.contains("bad.lua:3:"), "{e}");
}

#[test]
fn contract_errors_are_reported() {
    assert!(load_error("return 42").contains("must return a table"));
    assert!(
        load_error("return { on_comand = function() end }").contains("unknown field `on_comand`")
    );
    assert!(load_error("return { commands = { 'SERCH' } }").contains("not a known name"));
    assert!(load_error("return { on_command = 1 }").contains("must be a function"));
}

#[test]
fn bytecode_chunks_are_refused() {
    let s = Scripts::new();
    let path = s.dir.path().join("binary.lua");
    std::fs::write(&path, b"\x1bLua\x54\x00garbage").expect("write");
    let e = match load(&[config(&path)]) {
        Ok(_) => panic!("a binary chunk loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("binary"), "{e}");
}

#[test]
fn unhooked_commands_never_enter_lua() {
    let s = Scripts::new();
    let path = s.write(
        "count.lua",
        "return { commands = { 'SEARCH' }, on_command = function(ctx, cmd) imap.shared.incr('calls') end }",
    );
    let policies = load(&[config(&path)]).expect("loads");
    let mut conv = conversation(policies.clone());
    send(&mut conv, "x1 SELECT INBOX\r\n");
    answer(&mut conv, "x1 OK selected\r\n");
    for i in 0..100 {
        assert_eq!(
            send(&mut conv, &format!("n{i} NOOP\r\n")).0,
            format!("n{i} NOOP\r\n")
        );
    }
    assert!(policy_events(&mut conv).is_empty());
    assert_eq!(policies.host().counters.get("calls"), None);
    assert_eq!(send(&mut conv, "s1 SEARCH ALL\r\n").0, "s1 SEARCH ALL\r\n");
    assert_eq!(
        policy_events(&mut conv),
        [("on_command".into(), "pass".into())]
    );
    assert_eq!(policies.host().counters.get("calls"), Some(1.0));
}

#[test]
fn infinite_loop_is_stopped_and_the_command_fails_closed() {
    let s = Scripts::new();
    let path = s.write(
        "loop.lua",
        "return { commands = { 'SELECT' }, on_command = function() while true do end end }",
    );
    let mut conv = conversation(load(&[config(&path)]).expect("loads"));
    let (up, down) = send(&mut conv, "a1 SELECT INBOX\r\n");
    assert_eq!(up, "");
    assert_eq!(
        down,
        "a1 NO [UNAVAILABLE] Policy check failed, try again later\r\n"
    );
    assert_eq!(
        policy_events(&mut conv),
        [("on_command".into(), "error".into())]
    );
    // The VM is still usable, and unhooked commands flow.
    assert_eq!(send(&mut conv, "a2 NOOP\r\n").0, "a2 NOOP\r\n");
    let (_, down) = send(&mut conv, "a3 SELECT INBOX\r\n");
    assert!(down.starts_with("a3 NO [UNAVAILABLE]"), "{down}");
}

#[test]
fn pcall_cannot_swallow_the_budget() {
    let s = Scripts::new();
    let path = s.write(
        "sneaky.lua",
        r#"return { commands = { 'SELECT' }, on_command = function()
             while true do
               pcall(function() while true do end end)
               xpcall(function() while true do end end, function() while true do end end)
             end
           end }"#,
    );
    let mut conv = conversation(load(&[config(&path)]).expect("loads"));
    let (up, down) = send(&mut conv, "a1 SELECT INBOX\r\n");
    assert_eq!(up, "");
    assert!(down.starts_with("a1 NO [UNAVAILABLE]"), "{down}");
}

#[test]
fn memory_bomb_is_stopped() {
    let s = Scripts::new();
    let path = s.write(
        "bomb.lua",
        r#"return { commands = { 'SELECT' }, on_command = function()
             local t = {}
             for i = 1, 1e9 do t[i] = string.rep("x", 1024 * 1024) .. i end
           end }"#,
    );
    let mut conv = conversation(load(&[config(&path)]).expect("loads"));
    let (up, down) = send(&mut conv, "a1 SELECT INBOX\r\n");
    assert_eq!(up, "");
    assert!(down.starts_with("a1 NO [UNAVAILABLE]"), "{down}");
    assert_eq!(send(&mut conv, "a2 NOOP\r\n").0, "a2 NOOP\r\n");
}

#[test]
fn fail_open_lets_the_command_through() {
    let s = Scripts::new();
    let path = s.write(
        "broken.lua",
        "return { commands = { 'SELECT' }, on_command = function() error('oops') end }",
    );
    let mut cfg = config(&path);
    cfg.on_error = OnError::Open;
    let mut conv = conversation(load(&[cfg]).expect("loads"));
    assert_eq!(
        send(&mut conv, "a1 SELECT INBOX\r\n"),
        ("a1 SELECT INBOX\r\n".into(), String::new())
    );
    assert_eq!(
        policy_events(&mut conv),
        [("on_command".into(), "error".into())]
    );
}

#[test]
fn verdict_text_cannot_smuggle_a_line() {
    let s = Scripts::new();
    let path = s.write(
        "smuggle.lua",
        r#"return { commands = { 'SELECT' }, on_command = function()
             return imap.reject{ code = "X", text = "no\r\n* OK injected" }
           end }"#,
    );
    let mut conv = conversation(load(&[config(&path)]).expect("loads"));
    let (_, down) = send(&mut conv, "a1 SELECT INBOX\r\n");
    assert_eq!(
        down,
        "a1 NO [UNAVAILABLE] Policy check failed, try again later\r\n"
    );
}

#[test]
fn mailbox_rewrites_are_encoded_by_rust() {
    let s = Scripts::new();
    let path = s.write(
        "rename.lua",
        r#"return { commands = { 'SELECT', 'RENAME' }, on_command = function(ctx, cmd)
             for i, name in ipairs(cmd.mailboxes) do cmd.mailboxes[i] = "Entwürfe \"" .. name .. "\"" end
           end }"#,
    );
    let mut conv = conversation(load(&[config(&path)]).expect("loads"));
    assert_eq!(
        send(&mut conv, "a1 SELECT  x\r\n").0,
        "a1 SELECT  \"Entw&APw-rfe \\\"x\\\"\"\r\n"
    );
    answer(&mut conv, "a1 OK selected\r\n");
    // A mailbox sent as a synchronizing literal is collected (imapgate answers "+"), then
    // relayed with the changed names (encoded as quoted strings).
    let (up, down) = send(&mut conv, "a2 RENAME {1}\r\n");
    assert_eq!(
        (up.as_str(), down.as_str()),
        ("", "+ Ready for literal data\r\n")
    );
    let (up, down) = send(&mut conv, "a b\r\n");
    assert_eq!(down, "");
    assert_eq!(
        up,
        "a2 RENAME \"Entw&APw-rfe \\\"a\\\"\" \"Entw&APw-rfe \\\"b\\\"\"\r\n"
    );
}

#[test]
fn reload_swaps_policies_for_live_connections_and_keeps_vars() {
    let s = Scripts::new();
    let path = s.write(
        "p.lua",
        r#"return { commands = { 'SELECT' }, on_command = function(ctx, cmd)
             ctx.vars.seen = (ctx.vars.seen or 0) + 1
           end }"#,
    );
    let policies = load(&[config(&path)]).expect("loads");
    let mut conv = conversation(policies.clone());
    assert_eq!(
        send(&mut conv, "a1 SELECT INBOX\r\n").0,
        "a1 SELECT INBOX\r\n"
    );
    answer(&mut conv, "a1 OK selected\r\n");
    s.write(
        "p.lua",
        r#"return { commands = { 'SELECT' }, on_command = function(ctx, cmd)
             return imap.reject{ code = "LIMIT", text = "seen " .. tostring(ctx.vars.seen) }
           end }"#,
    );
    policies
        .reload(&[config(&path)], &small_lua())
        .expect("reloads");
    assert_eq!(
        send(&mut conv, "a2 SELECT INBOX\r\n").1,
        "a2 NO [LIMIT] seen 1\r\n"
    );
    // A reload that fails keeps the live set.
    s.write("p.lua", "return {");
    assert!(policies.reload(&[config(&path)], &small_lua()).is_err());
    assert_eq!(
        send(&mut conv, "a3 SELECT INBOX\r\n").1,
        "a3 NO [LIMIT] seen 1\r\n"
    );
}

#[test]
fn ctx_carries_the_connection() {
    let s = Scripts::new();
    let path = s.write(
        "ctx.lua",
        r#"return { commands = { 'NOOP' }, on_command = function(ctx, cmd)
             return imap.reject{ text = string.format("%s %s %s %s %s %s", ctx.id, ctx.peer_ip,
               ctx.listener, tostring(ctx.tls), ctx.state, tostring(ctx.user)) }
           end }"#,
    );
    let policies = load(&[config(&path)]).expect("loads");
    let info = imapgate::policy::ConnInfo {
        id: 7,
        peer: "192.0.2.1:5555".into(),
        listener: "imaps".into(),
        ..Default::default()
    };
    let mut conv = Conversation::new(
        Settings::default(),
        true,
        Bytes::from_static(GREETING),
        policies,
        info,
    );
    conv.to_client.drain_to_vec();
    assert_eq!(
        send(&mut conv, "a1 NOOP\r\n").1,
        "a1 NO 7 192.0.2.1 imaps true not_authenticated nil\r\n"
    );
}
