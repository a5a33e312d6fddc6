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
        on_state_error: None,
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
    assert_eq!(policies.host().shared_value("count", "calls"), None);
    assert_eq!(send(&mut conv, "s1 SEARCH ALL\r\n").0, "s1 SEARCH ALL\r\n");
    assert_eq!(
        policy_events(&mut conv),
        [("on_command".into(), "pass".into())]
    );
    assert_eq!(policies.host().shared_value("count", "calls"), Some(1.0));
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
    let (_s, mut conv) = scripted(
        "sneaky.lua",
        r#"return { commands = { 'SELECT' }, on_command = function()
             while true do
               pcall(function() while true do end end)
               xpcall(function() while true do end end, function() while true do end end)
             end
           end }"#,
    );
    let (up, down) = send(&mut conv, "a1 SELECT INBOX\r\n");
    assert_eq!(up, "");
    assert!(down.starts_with("a1 NO [UNAVAILABLE]"), "{down}");
}

#[test]
fn memory_bomb_is_stopped() {
    let (_s, mut conv) = scripted(
        "bomb.lua",
        r#"return { commands = { 'SELECT' }, on_command = function()
             local t = {}
             for i = 1, 1e9 do t[i] = string.rep("x", 1024 * 1024) .. i end
           end }"#,
    );
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
    let (_s, mut conv) = scripted(
        "smuggle.lua",
        r#"return { commands = { 'SELECT' }, on_command = function()
             return imap.reject{ code = "X", text = "no\r\n* OK injected" }
           end }"#,
    );
    let (_, down) = send(&mut conv, "a1 SELECT INBOX\r\n");
    assert_eq!(
        down,
        "a1 NO [UNAVAILABLE] Policy check failed, try again later\r\n"
    );
}

#[test]
fn mailbox_rewrites_are_encoded_by_rust() {
    let (_s, mut conv) = scripted(
        "rename.lua",
        r#"return { commands = { 'SELECT', 'RENAME' }, on_command = function(ctx, cmd)
             for i, name in ipairs(cmd.mailboxes) do cmd.mailboxes[i] = "Entwürfe \"" .. name .. "\"" end
           end }"#,
    );
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
fn a_mailbox_name_a_hook_takes_away_fails_closed() {
    // Only a string is a name: false, nil, a number or a table in its place is a failed
    // hook (answered as one), never "left as it was".
    for replacement in ["false", "nil", "42", "{}"] {
        let (_s, mut conv) = scripted(
            "unname.lua",
            &format!(
                "return {{ commands = {{ 'SELECT', 'RENAME' }}, on_command = function(ctx, cmd)
                   cmd.mailboxes[#cmd.mailboxes] = {replacement}
                 end }}"
            ),
        );
        for (line, tag) in [("a1 SELECT x\r\n", "a1"), ("a2 RENAME a b\r\n", "a2")] {
            let (up, down) = send(&mut conv, line);
            assert_eq!(up, "", "{replacement}: {line}");
            assert_eq!(
                down,
                format!("{tag} NO [UNAVAILABLE] Policy check failed, try again later\r\n"),
                "{replacement}: {line}"
            );
        }
    }
}

#[test]
fn a_listed_name_a_response_hook_takes_away_fails_closed() {
    let script = r#"return { responses = { "LIST" }, on_response = function(ctx, resp)
      resp.mailboxes[1] = false
    end }"#;
    let (_s, closed) = engine(&[("p.lua", script)], OnError::Closed);
    let mut ctx = alice();
    let mut entry = list_entry("Private/Secret", &[]);
    assert_eq!(
        closed.current().on_response(&mut ctx, &mut entry),
        unavailable()
    );
    let seen = decisions(&mut ctx);
    assert_eq!((seen[0].0, seen[0].1), ("on_response", "error"));
    assert!(
        seen[0]
            .2
            .as_deref()
            .is_some_and(|e| e.contains("mailboxes[1] must stay a string, not boolean")),
        "{seen:?}"
    );
}

#[test]
fn a_hook_may_replace_the_list_of_names() {
    let (_s, mut conv) = scripted(
        "replace.lua",
        r#"return { commands = { 'SELECT', 'RENAME' }, on_command = function(ctx, cmd)
             local names = {}
             for i, name in ipairs(cmd.mailboxes) do names[i] = "Jail/" .. name end
             cmd.mailboxes = names
           end }"#,
    );
    assert_eq!(send(&mut conv, "a1 SELECT x\r\n").0, "a1 SELECT Jail/x\r\n");
    answer(&mut conv, "a1 OK selected\r\n");
    assert_eq!(
        send(&mut conv, "a2 RENAME a b\r\n").0,
        "a2 RENAME Jail/a Jail/b\r\n"
    );
}

#[test]
fn names_a_hook_leaves_alone_keep_their_bytes() {
    let (_s, mut conv) = scripted(
        "second.lua",
        r#"return { commands = { 'RENAME' }, on_command = function(ctx, cmd)
             cmd.mailboxes[1] = "" .. cmd.mailboxes[1] -- the same name, a new string
             cmd.mailboxes[2] = "New/" .. cmd.mailboxes[2]
           end }"#,
    );
    assert_eq!(
        send(&mut conv, "a1 RENAME \"Old\" b\r\n").0,
        "a1 RENAME \"Old\" New/b\r\n"
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

// ----- the engine's API on its own (no session) -----

use imapgate::imap::capability::CapabilitySet;
use imapgate::imap::command::MailboxRole;
use imapgate::imap::response::Status;
use imapgate::policy::{CommandView, ConnCtx, ConnInfo, MailboxSlot, ResponseView, Verdict};

/// Loads `(file name, source)` scripts in order, each with `on_error`.
fn engine(scripts: &[(&str, &str)], on_error: OnError) -> (Scripts, Policies) {
    let s = Scripts::new();
    let configs: Vec<PolicyConfig> = scripts
        .iter()
        .map(|(name, source)| PolicyConfig {
            on_error,
            ..config(&s.write(name, source))
        })
        .collect();
    let policies = load(&configs).expect("policies load");
    (s, policies)
}

/// A conversation with one policy, written from `source` (keep the Scripts while it runs).
fn scripted(name: &str, source: &str) -> (Scripts, Conversation) {
    let s = Scripts::new();
    let path = s.write(name, source);
    let conv = conversation(load(&[config(&path)]).expect("loads"));
    (s, conv)
}

fn alice() -> ConnCtx {
    ConnCtx::new(ConnInfo {
        id: 1,
        peer: "192.0.2.1:5555".into(),
        listener: "imaps".into(),
        tls: true,
        user: Some("alice".into()),
        state: "authenticated",
        ..Default::default()
    })
}

fn command(name: &'static str, mailboxes: &[(MailboxRole, &str)]) -> CommandView {
    CommandView {
        tag: "a1".into(),
        name,
        mailboxes: mailboxes
            .iter()
            .map(|(role, name)| MailboxSlot::new(*role, (*name).to_string()))
            .collect(),
        delayed_ms: 0,
        user: None,
    }
}

fn list_entry(name: &str, flags: &[&str]) -> ResponseView {
    ResponseView::new(
        "LIST",
        vec![MailboxSlot::new(MailboxRole::Mailbox, name.to_string())],
        Some("/".into()),
        None,
    )
    .with_flags(flags.iter().map(|f| (*f).to_string()).collect())
}

/// (hook, action, error) of the decisions made so far.
fn decisions(ctx: &mut ConnCtx) -> Vec<(&'static str, &'static str, Option<String>)> {
    ctx.decisions
        .drain(..)
        .map(|d| (d.hook.as_str(), d.action, d.error))
        .collect()
}

fn reject_text(v: &Verdict) -> &str {
    match v {
        Verdict::Reject { text, .. } => text,
        other => panic!("expected a reject, got {other:?}"),
    }
}

fn unavailable() -> Verdict {
    Verdict::Reject {
        status: Status::No,
        code: Some("UNAVAILABLE".into()),
        text: "Policy check failed, try again later".into(),
    }
}

fn policy_failed() -> Verdict {
    Verdict::Close {
        text: "Policy check failed".into(),
    }
}

const EVIL: &str = r#"
-- Tries, at load and in every hook, to change anything another policy could be using.
local function attack(ctx)
  string.find = function() return 99 end
  string.x = "leaked"
  table.insert = function() error("hijacked") end
  math.randomseed(1)
  for _ = 1, 10 do math.random() end
  pcall(function() getmetatable("").__index.upper = function() return "pwned" end end)
  pcall(function() getmetatable("").__index.x = "leaked" end)
  pcall(function() getmetatable(_ENV).__index.string.find = function() return 99 end end)
  pcall(function() getmetatable(_ENV).__index.tostring = function() return "pwned" end end)
  pcall(function() setmetatable(_ENV, { __index = function() return "pwned" end }) end)
  if ctx then
    pcall(rawset, ctx, "user", "root")
    pcall(function() getmetatable(ctx).__index.user = "root" end)
    ctx.vars.seen = 99
    pcall(function() getmetatable(ctx.vars).__index = function() return 99 end end)
    pcall(function() getmetatable(ctx.vars).__newindex = function() end end)
    pcall(setmetatable, ctx.vars, {})
  end
  pcall(function()
    local _, e = pcall(imap.list_match, "*", "x", "ab")
    getmetatable(e).__tostring = function() return "pwned" end
  end)
  for _ = 1, 5 do imap.rate_limit("k", 0.001, 1) end
  imap.shared.set("n", 99)
end
attack(nil)
return {
  name = "evil",
  on_capability = function(ctx, caps)
    attack(ctx)
    pcall(function() getmetatable(caps).__index = function() return function() end end end)
    pcall(function() getmetatable(caps).add = function() end end)
  end,
  on_command = function(ctx, cmd) attack(ctx) end,
}
"#;

const VICTIM: &str = r#"
math.randomseed(7)
local expected = math.random(1000000)
math.randomseed(7)
local function report(ctx)
  local t = {}
  table.insert(t, tostring(string.find("abc", "b", 1, true)))
  table.insert(t, ("abc"):upper())
  table.insert(t, tostring(("abc"):find("c")))
  table.insert(t, tostring(string.x) .. "/" .. tostring(("").x))
  table.insert(t, tostring(getmetatable("")))
  table.insert(t, tostring(getmetatable(ctx)))
  table.insert(t, tostring(getmetatable(ctx.vars)))
  local _, e = pcall(imap.list_match, "*", "x", "ab")
  table.insert(t, type(e) .. ":" .. tostring(getmetatable(e)))
  table.insert(t, tostring(ctx.user))
  table.insert(t, tostring(ctx.vars.seen))
  table.insert(t, tostring(imap.shared.get("n")))
  return table.concat(t, " ")
end
return {
  name = "victim",
  on_capability = function(ctx, caps)
    caps:add("XVICTIM")
    ctx.vars.caps = report(ctx) .. " " .. tostring(getmetatable(caps))
  end,
  on_command = function(ctx, cmd)
    local random = math.random(1000000) == expected and "same-random" or "other-random"
    local limited = imap.rate_limit("k", 0.001, 1) and "bucket-full" or "bucket-drained"
    return imap.reject{ code = "CHECK", text = ctx.vars.caps .. " | " .. report(ctx) .. " " .. random .. " " .. limited }
  end,
}
"#;

#[test]
fn one_policy_cannot_change_what_another_runs() {
    let (_s, policies) = engine(
        &[("evil.lua", EVIL), ("victim.lua", VICTIM)],
        OnError::Closed,
    );
    let set = policies.current();
    let mut ctx = alice();
    let mut caps = CapabilitySet::from_names(["IMAP4rev1", "IDLE"]);
    assert_eq!(set.on_capability(&mut ctx, &mut caps), Verdict::Pass);
    assert!(caps.has("XVICTIM"), "{caps:?}");
    let v = set.on_command(&mut ctx, &mut command("SELECT", &[]));
    let normal = "2 ABC 3 nil/nil false false false userdata:false alice nil nil";
    assert_eq!(
        reject_text(&v),
        format!("{normal} false | {normal} same-random bucket-full")
    );
    assert!(
        decisions(&mut ctx)
            .iter()
            .all(|(_, action, _)| *action != "error"),
        "the attacks run inside pcall and fail quietly"
    );
}

#[test]
fn finalizers_are_refused() {
    let e = load_error("setmetatable({}, { __gc = function() while true do end end })\nreturn {}");
    assert!(e.contains("__gc"), "{e}");
}

#[test]
fn policy_names_are_unique() {
    let s = Scripts::new();
    let a = s.write("a.lua", "return { name = 'same' }");
    let b = s.write("b.lua", "return { name = 'same' }");
    let e = load(&[config(&a), config(&b)]).expect_err("two policies named alike");
    assert!(e.to_string().contains("already named `same`"), "{e}");
}

#[test]
fn verdicts_a_hook_cannot_apply_are_errors() {
    let script = r#"return {
      on_connect = function() return imap.reject{ text = "no" } end,
      on_capability = function() return imap.drop() end,
      on_command = function(ctx, cmd)
        if cmd.name == "SELECT" then return imap.drop() end
        return 42
      end,
      on_response = function(ctx, resp)
        if resp.kind == "LIST" then return imap.reject{ code = "CANNOT" } end
        return imap.delay(10)
      end,
      on_complete = function() return imap.delay(10) end,
      on_disconnect = function() return imap.close("bye") end,
    }"#;
    let (_s, closed) = engine(&[("p.lua", script)], OnError::Closed);
    let set = closed.current();
    let mut ctx = alice();
    assert_eq!(set.on_connect(&mut ctx), policy_failed());
    let mut caps = CapabilitySet::from_names(["IMAP4rev1"]);
    assert_eq!(set.on_capability(&mut ctx, &mut caps), policy_failed());
    assert_eq!(
        set.on_command(&mut ctx, &mut command("SELECT", &[])),
        unavailable()
    );
    assert_eq!(
        set.on_command(&mut ctx, &mut command("NOOP", &[])),
        unavailable()
    );
    assert_eq!(
        set.on_response(&mut ctx, &mut list_entry("x", &[])),
        unavailable()
    );
    let mut status = ResponseView::new("STATUS", Vec::new(), None, None);
    assert_eq!(set.on_response(&mut ctx, &mut status), unavailable());
    assert_eq!(
        set.on_complete(&mut ctx, "a1", "SELECT", Status::Ok),
        policy_failed()
    );
    set.on_disconnect(&mut ctx);
    let seen = decisions(&mut ctx);
    let expected_errors = [
        ("on_connect", "on_connect cannot apply a reject verdict"),
        ("on_capability", "on_capability cannot apply a drop verdict"),
        ("on_command", "on_command cannot apply a drop verdict"),
        (
            "on_command",
            "a hook returns nothing or an imap.* verdict, not integer",
        ),
        ("on_response", "on_response cannot apply a reject verdict"),
        ("on_response", "on_response cannot apply a delay verdict"),
        ("on_complete", "on_complete cannot apply a delay verdict"),
        (
            "on_disconnect",
            "on_disconnect cannot apply a close verdict",
        ),
    ];
    assert_eq!(seen.len(), expected_errors.len(), "{seen:?}");
    for ((hook, action, error), (want_hook, want_error)) in seen.iter().zip(expected_errors) {
        assert_eq!((*hook, *action), (want_hook, "error"));
        let error = error.as_deref().unwrap_or_default();
        assert!(error.contains(want_error), "{hook}: {error}");
    }

    // Fail open: every one of them passes, and is still counted as an error.
    let (_s, open) = engine(&[("p.lua", script)], OnError::Open);
    let set = open.current();
    let mut ctx = alice();
    assert_eq!(set.on_connect(&mut ctx), Verdict::Pass);
    assert_eq!(set.on_capability(&mut ctx, &mut caps), Verdict::Pass);
    assert_eq!(
        set.on_command(&mut ctx, &mut command("SELECT", &[])),
        Verdict::Pass
    );
    assert_eq!(
        set.on_response(&mut ctx, &mut list_entry("x", &[])),
        Verdict::Pass
    );
    assert_eq!(
        set.on_complete(&mut ctx, "a1", "SELECT", Status::Ok),
        Verdict::Pass
    );
    assert!(
        decisions(&mut ctx)
            .iter()
            .all(|(_, action, _)| *action == "error")
    );
}

#[test]
fn verdicts_each_hook_can_apply() {
    let script = r#"return {
      on_connect = function(ctx) if ctx.peer_ip == "192.0.2.9" then return imap.close("go away") end end,
      on_capability = function() end,
      on_command = function(ctx, cmd)
        if cmd.name == "SEARCH" then return imap.delay(250) end
        if cmd.name == "LOGOUT" then return imap.close("bye") end
        return imap.reject{ status = "BAD", code = "CLIENTBUG", text = "no " .. cmd.name }
      end,
      on_response = function(ctx, resp)
        if resp.mailboxes[1] == "hidden" then return imap.drop() end
        if resp.mailboxes[1] == "bye" then return imap.close("enough") end
      end,
      on_complete = function(ctx, cmd, status) if status == "BAD" then return imap.close("confused") end end,
    }"#;
    let (_s, policies) = engine(&[("p.lua", script)], OnError::Closed);
    let set = policies.current();
    let mut ctx = alice();
    assert_eq!(set.on_connect(&mut ctx), Verdict::Pass);
    let mut other = alice();
    other.info.peer = "192.0.2.9:1".into();
    assert_eq!(
        set.on_connect(&mut other),
        Verdict::Close {
            text: "go away".into()
        }
    );
    assert_eq!(
        set.on_command(&mut ctx, &mut command("SEARCH", &[])),
        Verdict::Delay(std::time::Duration::from_millis(250))
    );
    assert_eq!(
        set.on_command(&mut ctx, &mut command("LOGOUT", &[])),
        Verdict::Close { text: "bye".into() }
    );
    assert_eq!(
        set.on_command(&mut ctx, &mut command("NOOP", &[])),
        Verdict::Reject {
            status: Status::Bad,
            code: Some("CLIENTBUG".into()),
            text: "no NOOP".into()
        }
    );
    assert_eq!(
        set.on_response(&mut ctx, &mut list_entry("shown", &[])),
        Verdict::Pass
    );
    assert_eq!(
        set.on_response(&mut ctx, &mut list_entry("hidden", &[])),
        Verdict::Drop
    );
    assert_eq!(
        set.on_response(&mut ctx, &mut list_entry("bye", &[])),
        Verdict::Close {
            text: "enough".into()
        }
    );
    assert_eq!(
        set.on_complete(&mut ctx, "a1", "NOOP", Status::Ok),
        Verdict::Pass
    );
    assert_eq!(
        set.on_complete(&mut ctx, "a1", "NOOP", Status::Bad),
        Verdict::Close {
            text: "confused".into()
        }
    );
    assert!(
        decisions(&mut ctx)
            .iter()
            .all(|(_, action, _)| *action != "error")
    );
}

#[test]
fn a_failing_response_hook_fails_closed() {
    let script = r#"return { responses = { "LIST" }, on_response = function(ctx, resp)
      resp.mailboxes[1] = "translated"
      error("cannot translate")
    end }"#;
    let (_s, closed) = engine(&[("p.lua", script)], OnError::Closed);
    let mut ctx = alice();
    assert_eq!(
        closed
            .current()
            .on_response(&mut ctx, &mut list_entry("Private/Secret", &[])),
        unavailable()
    );
    let seen = decisions(&mut ctx);
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].0, seen[0].1), ("on_response", "error"));
    assert!(
        seen[0]
            .2
            .as_deref()
            .is_some_and(|e| e.contains("cannot translate"))
    );
    let (_s, open) = engine(&[("p.lua", script)], OnError::Open);
    assert_eq!(
        open.current()
            .on_response(&mut alice(), &mut list_entry("Private/Secret", &[])),
        Verdict::Pass
    );
}

#[test]
fn backtracking_patterns_on_client_input_fail_fast() {
    let script = r#"return { commands = { "SELECT" }, on_command = function(ctx, cmd)
      local s = cmd.mailboxes[1]
      local bomb = ("x*"):rep(20) .. "y"
      local out = {}
      for _, call in ipairs({
        function() return string.find(s, bomb) end,
        function() return s:find(bomb) end,
        function() return s:match(bomb) end,
        function() return s:gsub(bomb, "") end,
        function() for _ in s:gmatch(bomb) do end end,
      }) do
        local ok, err = pcall(call)
        out[#out + 1] = tostring(ok) .. ":" .. tostring(err):gsub("^.-:%d+: ", "")
      end
      -- Plain searches and cheap patterns still work on the same subject.
      out[#out + 1] = tostring(string.find(s, bomb, 1, true))
      out[#out + 1] = tostring(select(2, s:gsub("x", "")))
      return imap.reject{ text = table.concat(out, ";") }
    end }"#;
    let (_s, policies) = engine(&[("p.lua", script)], OnError::Closed);
    let long = "x".repeat(3000);
    let mut ctx = alice();
    let v = policies.current().on_command(
        &mut ctx,
        &mut command("SELECT", &[(MailboxRole::Mailbox, &long)]),
    );
    let refused = "false:pattern too complex for a subject of 3000 bytes";
    assert_eq!(
        reject_text(&v),
        format!("{refused};{refused};{refused};{refused};{refused};nil;3000")
    );

    // Uncaught, the refusal is a hook error like any other.
    let script = r#"return { commands = { "SELECT" }, on_command = function(ctx, cmd)
      string.find(cmd.mailboxes[1], ("x*"):rep(20) .. "y")
    end }"#;
    let (_s, policies) = engine(&[("p.lua", script)], OnError::Closed);
    let mut ctx = alice();
    let v = policies.current().on_command(
        &mut ctx,
        &mut command("SELECT", &[(MailboxRole::Mailbox, &long)]),
    );
    assert_eq!(v, unavailable());
    let seen = decisions(&mut ctx);
    assert!(
        seen[0]
            .2
            .as_deref()
            .is_some_and(|e| e.contains("p.lua:2: pattern too complex for a subject of 3000 bytes")),
        "{seen:?}"
    );
}

#[test]
fn list_match_is_the_linear_matcher() {
    let script = r#"return { commands = { "LIST" }, on_command = function(ctx, cmd)
      local m = imap.list_match
      local out = {
        m("INBOX.%", "INBOX.a", "."), m("INBOX.%", "INBOX.a.b", "."), m("inbox*", "INBOX.a.b", "."),
        m("%", "a.b", nil), m("*z", cmd.mailboxes[1], "/"), m(("*"):rep(300) .. "z", cmd.mailboxes[1], "/"),
        (pcall(m, "*", "x", "ab")),
      }
      for i, v in ipairs(out) do out[i] = tostring(v) end
      return imap.reject{ text = table.concat(out, " ") }
    end }"#;
    let (_s, policies) = engine(&[("p.lua", script)], OnError::Closed);
    let long = "a".repeat(5000);
    let mut ctx = alice();
    let v = policies.current().on_command(
        &mut ctx,
        &mut command("LIST", &[(MailboxRole::Pattern, &long)]),
    );
    assert_eq!(
        reject_text(&v),
        "true false true true false false false",
        "{:?}",
        decisions(&mut ctx)
    );
}

#[test]
fn views_carry_delay_and_list_flags() {
    let script = r#"return {
      commands = { "SEARCH" },
      on_command = function(ctx, cmd) return imap.reject{ text = "held " .. cmd.delayed_ms } end,
      on_response = function(ctx, resp)
        if resp.kind ~= "LIST" then resp.flags = {} return end
        if resp.mailboxes[1] == "bad" then resp.flags = { "\\Has Children" } return end
        if resp.mailboxes[1] == "same" then return end
        local out = {}
        for _, f in ipairs(resp.flags) do
          if f:upper() ~= "\\HASNOCHILDREN" then out[#out + 1] = f end
        end
        out[#out + 1] = "\\HasChildren"
        resp.flags = out
      end,
    }"#;
    let (_s, policies) = engine(&[("p.lua", script)], OnError::Closed);
    let set = policies.current();
    let mut ctx = alice();
    let mut search = command("SEARCH", &[]);
    search.delayed_ms = 1500;
    assert_eq!(
        reject_text(&set.on_command(&mut ctx, &mut search)),
        "held 1500"
    );

    let mut entry = list_entry("INBOX", &["\\Marked", "\\HasNoChildren"]);
    assert_eq!(set.on_response(&mut ctx, &mut entry), Verdict::Pass);
    assert_eq!(entry.flags, ["\\Marked", "\\HasChildren"]);
    assert!(entry.flags_changed());
    let mut same = list_entry("same", &["\\HasNoChildren"]);
    assert_eq!(set.on_response(&mut ctx, &mut same), Verdict::Pass);
    assert!(!same.flags_changed());
    let mut bad = list_entry("bad", &[]);
    assert_eq!(set.on_response(&mut ctx, &mut bad), unavailable());
    let mut status = ResponseView::new("STATUS", Vec::new(), None, None);
    assert_eq!(set.on_response(&mut ctx, &mut status), unavailable());
    let errors: Vec<String> = decisions(&mut ctx)
        .into_iter()
        .filter_map(|(_, _, e)| e)
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("is not a mailbox attribute"),
        "{errors:?}"
    );
    assert!(errors[1].contains("only on LIST and LSUB"), "{errors:?}");
}

#[test]
fn vars_rate_limits_and_counters_are_per_policy() {
    let writer = r#"return { name = "writer", commands = { "NOOP" }, on_command = function(ctx)
      ctx.vars.x = "mine"
      imap.shared.incr("calls")
    end }"#;
    let reader = r#"return { name = "reader", commands = { "NOOP" }, on_command = function(ctx)
      return imap.reject{ text = tostring(ctx.vars.x) .. " " .. tostring(imap.shared.get("calls")) }
    end }"#;
    let (_s, policies) = engine(&[("w.lua", writer), ("r.lua", reader)], OnError::Closed);
    let v = policies
        .current()
        .on_command(&mut alice(), &mut command("NOOP", &[]));
    assert_eq!(reject_text(&v), "nil nil");
    assert_eq!(policies.host().shared_value("writer", "calls"), Some(1.0));
    assert_eq!(policies.host().shared_value("reader", "calls"), None);
}

const UPSTREAMS_SCRIPT: &str = r#"return { commands = { "NOOP" }, on_command = function(ctx)
  local out = {}
  for _, name in ipairs({ "mail1", "mail2", "nope" }) do
    out[#out + 1] = tostring(imap.upstream_up(name))
  end
  for _, u in ipairs(imap.upstreams()) do out[#out + 1] = u.name .. "=" .. tostring(u.up) end
  return imap.reject{ text = table.concat(out, " ") }
end }"#;

/// What `UPSTREAMS_SCRIPT` says now.
fn upstreams_seen(policies: &Policies) -> String {
    let v = policies
        .current()
        .on_command(&mut alice(), &mut command("NOOP", &[]));
    reject_text(&v).to_owned()
}

#[test]
fn upstream_health_is_read_live() {
    use imapgate::net::health::UpstreamHealth;
    use imapgate::policy::api::HostShared;

    let s = Scripts::new();
    let health = UpstreamHealth::new(["mail1", "mail2"], None);
    let host = HostShared {
        health: Some(health.clone()),
        ..HostShared::default()
    };
    let script = config(&s.write("p.lua", UPSTREAMS_SCRIPT));
    let policies = Policies::load_with_host(&[script], &small_lua(), host).expect("loads");
    // Down until probed; an unknown name is nil, not false.
    assert_eq!(
        upstreams_seen(&policies),
        "false false nil mail1=false mail2=false"
    );
    health.probe_succeeded(1);
    assert_eq!(
        upstreams_seen(&policies),
        "false true nil mail1=false mail2=true"
    );
    health.probe_succeeded(0);
    health.connect_failed(1, &"connection refused");
    assert_eq!(
        upstreams_seen(&policies),
        "true false nil mail1=true mail2=false"
    );

    // No health at all (an embedding that knows no upstream): every name is unknown.
    let (_s, bare) = engine(&[("p.lua", UPSTREAMS_SCRIPT)], OnError::Closed);
    assert_eq!(upstreams_seen(&bare), "nil nil nil");
}

#[test]
fn replay_counts_every_configured_upstream_as_up() {
    use imapgate::config::{Config, ListenerConfig, ListenerTls, UpstreamConfig};
    use imapgate::replay::{ReplayOptions, replay};

    let s = Scripts::new();
    let config = Config {
        listeners: vec![ListenerConfig::new(
            "127.0.0.1:1143".parse().expect("address"),
            ListenerTls::Starttls,
        )],
        upstreams: ["mail1", "mail2"]
            .map(|name| UpstreamConfig {
                name: name.into(),
                ..UpstreamConfig::default()
            })
            .to_vec(),
        policies: vec![config(&s.write("p.lua", UPSTREAMS_SCRIPT))],
        lua: small_lua(),
        ..Config::default()
    };
    let mut out = Vec::new();
    let transcript = "C: a0 LOGIN alice pw\nS: a0 OK done\nC: a1 NOOP\n";
    replay(&config, transcript, &ReplayOptions::default(), &mut out).expect("replays");
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("<- imapgate: a1 NO true true nil mail1=true mail2=true"),
        "{out}"
    );
}

// ----- the shipped policies, hook by hook -----

fn shipped(file: &str, options: &str) -> Policies {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(file);
    let cfg = PolicyConfig {
        options: toml::from_str(options).expect("options"),
        ..config(&script)
    };
    load(&[cfg]).expect("shipped policy loads")
}

const COURIER: &str = r#"client_prefix = "INBOX."
client_delimiter = "."
upstream_prefix = ""
upstream_delimiter = "/""#;

const JAIL: &str = r#"client_prefix = "INBOX."
client_delimiter = "."
upstream_prefix = "Jail/"
upstream_delimiter = "/""#;

/// The names a command goes upstream with, or its refusal's code.
fn translated(
    set: &PolicySet,
    ctx: &mut ConnCtx,
    mut cmd: CommandView,
) -> Result<Vec<String>, String> {
    match set.on_command(ctx, &mut cmd) {
        Verdict::Pass => Ok(cmd.mailboxes.into_iter().map(|m| m.name).collect()),
        Verdict::Reject { code, .. } => Err(code.unwrap_or_default()),
        other => panic!("unexpected {other:?}"),
    }
}

fn mailbox(set: &PolicySet, ctx: &mut ConnCtx, name: &str) -> Result<String, String> {
    translated(set, ctx, command("SELECT", &[(MailboxRole::Mailbox, name)])).map(|n| n[0].clone())
}

fn list(set: &PolicySet, ctx: &mut ConnCtx, reference: &str, pattern: &str) -> Vec<String> {
    translated(
        set,
        ctx,
        command(
            "LIST",
            &[
                (MailboxRole::Reference, reference),
                (MailboxRole::Pattern, pattern),
            ],
        ),
    )
    .expect("LIST is never refused")
}

/// The client's view of one upstream LIST entry: (name, delimiter, flags), or None if hidden.
fn entry(
    set: &PolicySet,
    ctx: &mut ConnCtx,
    name: &str,
    flags: &[&str],
) -> Option<(String, String, Vec<String>)> {
    let mut view = list_entry(name, flags);
    match set.on_response(ctx, &mut view) {
        Verdict::Pass => Some((
            view.mailboxes[0].name.clone(),
            view.delimiter.clone().unwrap_or_default(),
            view.flags.clone(),
        )),
        Verdict::Drop => None,
        other => panic!("unexpected {other:?}"),
    }
}

use imapgate::policy::PolicySet;

#[test]
fn namespace_translates_names_one_to_one() {
    let policies = shipped("namespace.lua", COURIER);
    let set = policies.current();
    let ctx = &mut alice();
    for (client, upstream) in [
        ("INBOX", "INBOX"),
        ("inbox", "INBOX"),
        ("INBOX.Archive.2024", "Archive/2024"),
        ("inbox.Archive", "Archive"),
        ("INBOX.Entwürfe", "Entwürfe"),
        ("INBOX.INBOXES", "INBOXES"),
    ] {
        assert_eq!(
            mailbox(&set, ctx, client).as_deref(),
            Ok(upstream),
            "{client}"
        );
    }
    for refused in [
        "Foo",
        "INBOX.",
        "INBOX.INBOX",
        "inbox.Inbox",
        "INBOX.inbox.x",
        "INBOX..x",
        "INBOX.a..b",
        "INBOX.a.",
        "INBOX.a/b",
        "INBOXES",
    ] {
        assert_eq!(
            mailbox(&set, ctx, refused),
            Err("CANNOT".to_string()),
            "{refused}"
        );
    }
    assert_eq!(
        translated(
            &set,
            ctx,
            command(
                "RENAME",
                &[
                    (MailboxRole::Mailbox, "INBOX.a"),
                    (MailboxRole::Mailbox, "INBOX.b.c")
                ]
            )
        ),
        Ok(vec!["a".to_string(), "b/c".to_string()])
    );
    // Upstream names without exactly one client form are hidden.
    for (upstream, client) in [
        ("INBOX", Some("INBOX")),
        ("Archive/2024", Some("INBOX.Archive.2024")),
        ("Entwürfe", Some("INBOX.Entwürfe")),
        ("a.b", None),
        ("Archive//x", None),
        ("Archive/", None),
        ("INBOX/x", None),
        ("inbox", Some("INBOX")),
    ] {
        assert_eq!(
            entry(&set, ctx, upstream, &[]).map(|e| e.0),
            client.map(str::to_string),
            "{upstream}"
        );
    }
}

#[test]
fn namespace_jail_is_a_boundary() {
    let policies = shipped("namespace.lua", JAIL);
    let set = policies.current();
    let ctx = &mut alice();
    assert_eq!(mailbox(&set, ctx, "INBOX.Box").as_deref(), Ok("Jail/Box"));
    assert_eq!(mailbox(&set, ctx, "INBOX").as_deref(), Ok("INBOX"));
    assert_eq!(mailbox(&set, ctx, "Private/Secret"), Err("CANNOT".into()));
    assert_eq!(mailbox(&set, ctx, "INBOX.INBOX"), Err("CANNOT".into()));
    // Commands it cannot translate (NOTIFY, ESEARCH IN, URLAUTH...) parse as OTHER.
    assert_eq!(
        translated(&set, ctx, command("OTHER", &[])),
        Err("CANNOT".into())
    );
    assert_eq!(entry(&set, ctx, "Private/Secret", &[]), None);
    assert_eq!(entry(&set, ctx, "Jail", &["\\HasChildren"]), None);
    assert_eq!(
        entry(&set, ctx, "Jail/Box", &[]).map(|e| e.0).as_deref(),
        Some("INBOX.Box")
    );
    // NAMESPACE shows the client's namespace only.
    let personal = imapgate::policy::NamespaceEntry {
        prefix: String::new(),
        delimiter: Some("/".into()),
    };
    let mut ns = ResponseView::new(
        "NAMESPACE",
        Vec::new(),
        None,
        Some(imapgate::policy::Namespace {
            personal: vec![personal.clone()],
            other: vec![imapgate::policy::NamespaceEntry {
                prefix: "Other/".into(),
                ..personal.clone()
            }],
            shared: vec![imapgate::policy::NamespaceEntry {
                prefix: "Shared/".into(),
                ..personal
            }],
        }),
    );
    assert_eq!(set.on_response(ctx, &mut ns), Verdict::Pass);
    let ns = ns.namespace.expect("namespace");
    assert_eq!(ns.personal[0].prefix, "INBOX.");
    assert_eq!(ns.personal[0].delimiter.as_deref(), Some("."));
    assert!(ns.other.is_empty() && ns.shared.is_empty(), "{ns:?}");

    // Without the boundary, unknown commands pass untouched.
    let open = shipped("namespace.lua", &format!("{JAIL}\nboundary = false"));
    assert_eq!(
        translated(&open.current(), ctx, command("OTHER", &[])),
        Ok(vec![])
    );
}

#[test]
fn namespace_list_patterns() {
    let policies = shipped("namespace.lua", COURIER);
    let set = policies.current();
    let ctx = &mut alice();
    for (reference, pattern, upstream) in [
        ("", "*", "*"),
        ("", "%", "%"),
        ("", "INBOX", "%"),
        ("", "inbox", "%"),
        ("", "INBOX*", "*"),
        ("INBOX.", "%", "%"),
        ("", "INBOX.%", "%"),
        ("", "INBOX.Archive*", "Archive*"),
        ("INBOX.Archive.", "%", "Archive/%"),
        ("", "Foo*", "*"),
        ("", "", ""),
    ] {
        assert_eq!(
            list(&set, ctx, reference, pattern),
            ["", upstream],
            "{reference:?} {pattern:?}"
        );
    }
    let jail = shipped("namespace.lua", JAIL);
    let set = jail.current();
    for (pattern, upstream) in [
        ("*", "*"),
        ("INBOX", "*"),
        ("INBOX.%", "Jail/%"),
        ("INBOX.Box.*", "Jail/Box/*"),
        ("%.x", "Jail/*"),
    ] {
        assert_eq!(list(&set, ctx, "", pattern), ["", upstream], "{pattern:?}");
    }
}

#[test]
fn namespace_list_patterns_are_matched_in_linear_time() {
    let policies = shipped("namespace.lua", COURIER);
    let set = policies.current();
    let ctx = &mut alice();
    let stars = format!("{}z", "*".repeat(300));
    assert_eq!(list(&set, ctx, "", &stars), ["", "*"]);
    let inbox_stars = format!("INBOX.{stars}");
    assert_eq!(list(&set, ctx, "", &inbox_stars), ["", stars.as_str()]);
    let inbox_stars = format!("{}INBOX", "%*".repeat(300));
    assert_eq!(list(&set, ctx, "", &inbox_stars), ["", "*"]);
    let long = "x".repeat(4000);
    let mut view = list_entry(&long, &["\\HasNoChildren"]);
    assert_eq!(set.on_response(ctx, &mut view), Verdict::Pass);
    assert_eq!(view.mailboxes[0].name, format!("INBOX.{long}"));
}

#[test]
fn namespace_inbox_children_reflect_client_folders() {
    let policies = shipped("namespace.lua", COURIER);
    let set = policies.current();
    let ctx = &mut alice();
    // LIST "" INBOX went upstream as "%": the top level arrives, INBOX's entry last.
    assert_eq!(list(&set, ctx, "", "INBOX"), ["", "%"]);
    assert!(entry(&set, ctx, "Archive", &["\\HasChildren"]).is_some());
    assert_eq!(
        entry(&set, ctx, "INBOX", &["\\HasNoChildren"]).map(|e| e.2),
        Some(vec!["\\HasChildren".to_string()])
    );
    assert_eq!(
        set.on_complete(ctx, "a1", "LIST", Status::Ok),
        Verdict::Pass
    );
    // An account with INBOX alone (and a folder without a client form).
    assert_eq!(entry(&set, ctx, "a.b", &["\\HasNoChildren"]), None);
    assert_eq!(
        entry(&set, ctx, "INBOX", &["\\Marked", "\\HasChildren"]).map(|e| e.2),
        Some(vec!["\\Marked".to_string(), "\\HasNoChildren".to_string()])
    );
    assert_eq!(
        set.on_complete(ctx, "a2", "LSUB", Status::Ok),
        Verdict::Pass
    );
    // Without child information, none is added.
    assert_eq!(entry(&set, ctx, "Sent", &[]).map(|e| e.2), Some(vec![]));
    assert_eq!(
        entry(&set, ctx, "INBOX", &["\\Marked"]).map(|e| e.2),
        Some(vec!["\\Marked".to_string()])
    );
}

#[test]
fn namespace_state_cannot_be_exhausted_by_pipelining() {
    let policies = shipped("namespace.lua", COURIER);
    let set = policies.current();
    let ctx = &mut alice();
    for i in 0..1000 {
        assert_eq!(
            list(&set, ctx, "", &format!("INBOX.{i}*")),
            ["", &format!("{i}*")]
        );
    }
    for i in 0..1000 {
        assert!(entry(&set, ctx, &format!("{i}"), &[]).is_some());
    }
    assert!(
        decisions(ctx)
            .iter()
            .all(|(_, action, _)| *action == "pass")
    );
    let vars = ctx.vars.lock().expect("vars");
    assert_eq!(vars.values().map(|v| v.len()).sum::<usize>(), 1, "{vars:?}");
}

#[test]
fn search_rate_limit_delays_then_refuses() {
    let policies = shipped("search_rate_limit.lua", "per_second = 1.0\nburst = 2");
    let set = policies.current();
    let ctx = &mut alice();
    ctx.info.user = Some("USER1".into());
    for name in ["SEARCH", "UID SORT"] {
        assert_eq!(set.on_command(ctx, &mut command(name, &[])), Verdict::Pass);
    }
    // Same account, other spelling: same bucket.
    let other = &mut alice();
    other.info.user = Some("user1".into());
    for name in ["THREAD", "UID THREAD", "SORT", "UID SEARCH"] {
        match set.on_command(other, &mut command(name, &[])) {
            Verdict::Delay(d) => {
                assert!(
                    d > std::time::Duration::ZERO && d <= std::time::Duration::from_secs(1),
                    "{d:?}"
                )
            }
            v => panic!("{name}: {v:?}"),
        }
    }
    // Held long enough already: refused.
    let mut held = command("SEARCH", &[]);
    held.delayed_ms = 29_500;
    match set.on_command(other, &mut held) {
        Verdict::Reject { code, .. } => assert_eq!(code.as_deref(), Some("LIMIT")),
        v => panic!("{v:?}"),
    }
    // FETCH is not a search.
    assert_eq!(
        set.on_command(other, &mut command("FETCH", &[])),
        Verdict::Pass
    );

    let reject = shipped(
        "search_rate_limit.lua",
        "per_second = 0.001\nburst = 1\nmode = \"reject\"",
    );
    let set = reject.current();
    assert_eq!(
        set.on_command(ctx, &mut command("SEARCH", &[])),
        Verdict::Pass
    );
    match set.on_command(ctx, &mut command("SEARCH", &[])) {
        Verdict::Reject { code, text, .. } => {
            assert_eq!(code.as_deref(), Some("LIMIT"));
            assert!(
                text.starts_with("Too many searches: try again in"),
                "{text}"
            );
        }
        v => panic!("{v:?}"),
    }
}

// ----- route.lua and login_throttle.lua: on_login, on_command, on_complete -----

use imapgate::net::health::UpstreamHealth;
use imapgate::policy::api::HostShared;
use imapgate::policy::{CompleteView, LoginView, Route};

/// A shipped policy loaded with upstream health (what `imap.upstream_up` reads).
fn shipped_with_health(file: &str, options: &str, health: UpstreamHealth) -> Policies {
    try_shipped_with_health(file, options, health).expect("shipped policy loads")
}

fn try_shipped_with_health(
    file: &str,
    options: &str,
    health: UpstreamHealth,
) -> Result<Policies, PolicyError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies")
        .join(file);
    let cfg = PolicyConfig {
        options: toml::from_str(options).expect("options"),
        ..config(&script)
    };
    let host = HostShared {
        health: Some(health),
        ..HostShared::default()
    };
    Policies::load_with_host(&[cfg], &small_lua(), host)
}

/// Every upstream named, all up (as under `imapgate check`).
fn all_up(names: &[&str]) -> UpstreamHealth {
    UpstreamHealth::unprobed(names.iter().copied())
}

/// A client at `peer` before login.
fn client_at(id: u64, peer: &str) -> ConnCtx {
    ConnCtx::new(ConnInfo {
        id,
        peer: peer.into(),
        listener: "imap".into(),
        state: "not_authenticated",
        ..Default::default()
    })
}

fn login_as(user: &str) -> LoginView {
    LoginView {
        user: Some(user.into()),
        mechanism: "LOGIN".into(),
        delayed_ms: 0,
    }
}

/// Where `on_login` sends `user`: the upstreams in order, or "default" for no route.
fn routed(set: &PolicySet, user: &str) -> Vec<String> {
    match set.on_login(&mut client_at(1, "192.0.2.1:5555"), &login_as(user)) {
        Verdict::Route(Route {
            upstreams,
            user: None,
        }) => upstreams,
        Verdict::Pass => vec!["default".into()],
        other => panic!("{user}: {other:?}"),
    }
}

const FIVE: [&str; 5] = ["mail1", "mail2", "mail3", "mail4", "moved"];

#[test]
fn route_map_wildcards_and_case() {
    let s = Scripts::new();
    let map = s.write(
        "users.map",
        "# moved by hand\n\
         carol@example.org   moved   # since the migration\n\
         \n\
         *@Example.NET mail4\n",
    );
    let options = format!(
        "users = {{ \"Alice@Example.org\" = \"mail2\", \"*@example.com\" = \"mail3\" }}\n\
         map_file = {:?}\n\
         pool = [\"mail1\"]\n",
        map.display().to_string()
    );
    let policies = shipped_with_health("route.lua", &options, all_up(&FIVE));
    let set = policies.current();
    for (user, upstream) in [
        ("alice@example.org", "mail2"),
        ("ALICE@EXAMPLE.ORG", "mail2"),
        ("carol@example.org", "moved"),
        ("Carol@Example.Org", "moved"),
        ("anyone@example.com", "mail3"),
        ("Someone@EXAMPLE.com", "mail3"),
        ("x@example.net", "mail4"),
        // A domain entry is that domain only; the last @ starts the domain.
        ("x@sub.example.com", "mail1"),
        ("\"a@example.com\"@example.org", "mail1"),
        ("odd@example.com@example.net", "mail4"),
        ("bob@example.org", "mail1"),
    ] {
        assert_eq!(routed(&set, user), [upstream], "{user}");
    }
    // No pool: everyone unmapped takes the first upstream.
    let policies = shipped_with_health(
        "route.lua",
        "users = { \"alice\" = \"mail2\" }",
        all_up(&FIVE),
    );
    assert_eq!(routed(&policies.current(), "ALICE"), ["mail2"]);
    assert_eq!(routed(&policies.current(), "bob"), ["default"]);
}

#[test]
fn route_map_file_is_reread_on_reload() {
    let s = Scripts::new();
    let map = s.write("users.map", "alice mail2\n");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/route.lua");
    let cfg = PolicyConfig {
        options: toml::from_str(&format!("map_file = {:?}", map.display().to_string()))
            .expect("options"),
        ..config(&script)
    };
    let host = HostShared {
        health: Some(all_up(&FIVE)),
        ..HostShared::default()
    };
    let policies =
        Policies::load_with_host(std::slice::from_ref(&cfg), &small_lua(), host).expect("loads");
    assert_eq!(routed(&policies.current(), "alice"), ["mail2"]);
    std::fs::write(&map, "alice mail3\n").expect("rewrite map");
    policies
        .reload(std::slice::from_ref(&cfg), &small_lua())
        .expect("reloads");
    assert_eq!(routed(&policies.current(), "alice"), ["mail3"]);
    // A map that does not load keeps the policies that did.
    std::fs::write(&map, "alice nowhere\n").expect("rewrite map");
    let e = policies
        .reload(std::slice::from_ref(&cfg), &small_lua())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("\"nowhere\", which is not configured"),
        "{e}"
    );
    assert_eq!(routed(&policies.current(), "alice"), ["mail3"]);
}

#[test]
fn route_options_are_checked_at_load() {
    let s = Scripts::new();
    let bad_line = s.write("bad.map", "alice mail2\nbob\n");
    let bad_line = format!("map_file = {:?}", bad_line.display().to_string());
    for (options, error) in [
        (
            "users = { alice = \"mail9\" }",
            "names upstream \"mail9\", which is not configured",
        ),
        (
            "pool = [\"mail1\", \"nope\"]",
            "pool[2] names upstream \"nope\"",
        ),
        (
            "pool = [\"mail1\", \"mail1\"]",
            "pool names \"mail1\" twice",
        ),
        (
            "users = { \"a*@example.org\" = \"mail1\" }",
            "the only wildcard is a whole domain",
        ),
        (
            "users = { \"*@\" = \"mail1\" }",
            "the only wildcard is a whole domain",
        ),
        (
            "users = { \"*@*.org\" = \"mail1\" }",
            "the only wildcard is a whole domain",
        ),
        (
            "users = { Alice = \"mail1\", alice = \"mail2\" }",
            "is mapped twice",
        ),
        ("pools = [\"mail1\"]", "unknown option \"pools\""),
        (
            "map_file = \"/nonexistent/users.map\"",
            "/nonexistent/users.map: No such file",
        ),
        (
            bad_line.as_str(),
            "bad.map:2: expected `key value`, found only \"bob\"",
        ),
    ] {
        let e = try_shipped_with_health("route.lua", options, all_up(&FIVE))
            .err()
            .unwrap_or_else(|| panic!("{options} loaded"));
        assert!(e.to_string().contains(error), "{options}: {e}");
    }
    // Without configured upstreams (an embedding that knows none) names cannot be checked.
    let unchecked = shipped("route.lua", "users = { alice = \"mail9\" }");
    assert_eq!(routed(&unchecked.current(), "alice"), ["mail9"]);
}

#[test]
fn read_map_reads_only_named_files_and_only_at_load() {
    let s = Scripts::new();
    let map = s.write("users.map", "alice mail2\n");
    let other = s.write("other.map", "x y\n");
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    let with_map = |source: &str| PolicyConfig {
        options: toml::from_str(&format!("map_file = {}", quoted(&map))).expect("options"),
        ..config(&s.write("p.lua", source))
    };
    // A file the options do not name.
    let source = format!("local m = imap.read_map({})\nreturn {{}}", quoted(&other));
    let e = load(&[with_map(&source)]).expect_err("refused");
    assert!(
        e.to_string()
            .contains("is not named by an option of this policy ending in `_file`"),
        "{e}"
    );
    // The named one, from a hook: no disk reads while serving.
    let source = format!(
        "return {{ commands = {{ \"NOOP\" }}, on_command = function() imap.read_map({}) end }}",
        quoted(&map)
    );
    let policies = load(&[with_map(&source)]).expect("loads");
    let mut ctx = alice();
    assert_eq!(
        policies
            .current()
            .on_command(&mut ctx, &mut command("NOOP", &[])),
        unavailable()
    );
    let errors: Vec<String> = decisions(&mut ctx)
        .into_iter()
        .filter_map(|d| d.2)
        .collect();
    assert!(
        errors[0].contains("read_map works only while the policy loads"),
        "{errors:?}"
    );
    // At load, it is a table.
    let source = format!(
        "local m = imap.read_map({})\nassert(m.alice == \"mail2\")\nreturn {{}}",
        quoted(&map)
    );
    load(&[with_map(&source)]).expect("loads");
}

/// `n` made-up users, some in upper case.
fn users(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 3 == 0 {
                format!("User{i}@Example.ORG")
            } else {
                format!("user{i}@example.org")
            }
        })
        .collect()
}

#[test]
fn rendezvous_moves_only_the_new_upstreams_share() {
    let three = shipped_with_health(
        "route.lua",
        "pool = [\"mail1\", \"mail2\", \"mail3\"]",
        all_up(&FIVE),
    );
    let four = shipped_with_health(
        "route.lua",
        "pool = [\"mail1\", \"mail2\", \"mail3\", \"mail4\"]",
        all_up(&FIVE),
    );
    let (three, four) = (three.current(), four.current());
    let mut per_upstream = std::collections::HashMap::new();
    let mut moved = 0;
    for user in users(1000) {
        let before = routed(&three, &user);
        let after = routed(&four, &user);
        // The same user in any case lands in the same place.
        assert_eq!(routed(&three, &user.to_lowercase()), before, "{user}");
        // The fallbacks are the rest of the pool.
        let mut sorted = before.clone();
        sorted.sort();
        assert_eq!(sorted, ["mail1", "mail2", "mail3"], "{user}");
        *per_upstream.entry(before[0].clone()).or_insert(0) += 1;
        if before[0] != after[0] {
            moved += 1;
            assert_eq!(after[0], "mail4", "{user} moved between two old upstreams");
        }
        // Whoever stays keeps the old order among the old upstreams.
        let old_order: Vec<&String> = after.iter().filter(|u| *u != "mail4").collect();
        assert_eq!(old_order, before.iter().collect::<Vec<_>>(), "{user}");
    }
    // About a quarter move (binomial, n = 1000, p = 1/4: sd 14).
    assert!((180..=320).contains(&moved), "{moved} of 1000 moved");
    // And the three share the users about evenly.
    for (upstream, n) in &per_upstream {
        assert!((250..=420).contains(n), "{upstream}: {n} {per_upstream:?}");
    }
}

#[test]
fn rendezvous_skips_a_down_upstream() {
    let health = UpstreamHealth::new(["mail1", "mail2", "mail3"], None);
    for i in 0..3 {
        health.probe_succeeded(i);
    }
    let policies = shipped_with_health(
        "route.lua",
        "pool = [\"mail1\", \"mail2\", \"mail3\"]",
        health.clone(),
    );
    let set = policies.current();
    let everyone = users(200);
    let before: Vec<Vec<String>> = everyone.iter().map(|u| routed(&set, u)).collect();
    health.connect_failed(1, &"connection refused");
    for (user, before) in everyone.iter().zip(&before) {
        let after = routed(&set, user);
        if before[0] == "mail2" {
            // Its users go to their next choice; mail2 stays last, for when it comes back.
            assert_eq!(after, [&*before[1], &*before[2], &*before[0]], "{user}");
        } else {
            // Everyone else stays; mail2 moves behind the upstreams that are up.
            assert_eq!(after[0], before[0], "{user}");
            assert_eq!(after.last().map(String::as_str), Some("mail2"), "{user}");
        }
    }
    // Back up: everyone back where they were.
    health.probe_succeeded(1);
    for (user, before) in everyone.iter().zip(&before) {
        assert_eq!(&routed(&set, user), before, "{user}");
    }
    // All down: the hash's own order (a probe may be stale; connecting decides).
    for i in 0..3 {
        health.connect_failed(i, &"connection refused");
    }
    for (user, before) in everyone.iter().zip(&before) {
        assert_eq!(&routed(&set, user), before, "{user}");
    }
}

// ----- login_throttle.lua -----

const THROTTLE: &str =
    "window_s = 60\ndelay_after = 2\ndelay_ms = 50\nrefuse_after = 4\ncooldown_s = 60";

fn login_command(tag: &str, user: Option<&str>, delayed_ms: u64) -> CommandView {
    CommandView {
        tag: tag.into(),
        name: "LOGIN",
        mailboxes: Vec::new(),
        delayed_ms,
        user: user.map(str::to_owned),
    }
}

fn completed(set: &PolicySet, ctx: &mut ConnCtx, tag: &str, status: Status, code: Option<&str>) {
    let done = CompleteView {
        tag,
        name: "LOGIN",
        status,
        code,
    };
    assert_eq!(set.on_completed(ctx, &done), Verdict::Pass);
}

/// What the throttle makes of a LOGIN: "pass", "delay" or "refuse".
fn throttled(set: &PolicySet, ctx: &mut ConnCtx, tag: &str, user: Option<&str>) -> &'static str {
    match set.on_command(ctx, &mut login_command(tag, user, 0)) {
        Verdict::Pass => "pass",
        Verdict::Delay(d) => {
            assert_eq!(d, std::time::Duration::from_millis(50));
            // Held once: judged again when the delay ends, it goes on (or is refused).
            match set.on_command(ctx, &mut login_command(tag, user, 50)) {
                Verdict::Pass => "delay",
                other => panic!("after the delay: {other:?}"),
            }
        }
        Verdict::Reject { status, code, text } => {
            assert_eq!(status, Status::No);
            assert_eq!(code.as_deref(), Some("UNAVAILABLE"));
            assert_eq!(text, "Too many failed logins, try again later");
            "refuse"
        }
        other => panic!("{other:?}"),
    }
}

/// A LOGIN judged and, if it went on, answered `status [code]`.
fn attempt(
    set: &PolicySet,
    ctx: &mut ConnCtx,
    user: Option<&str>,
    status: Status,
    code: Option<&str>,
) -> &'static str {
    let outcome = throttled(set, ctx, "l", user);
    if outcome != "refuse" {
        completed(set, ctx, "l", status, code);
    }
    outcome
}

#[test]
fn login_throttle_delays_then_refuses_per_address() {
    let policies = shipped("login_throttle.lua", THROTTLE);
    let set = policies.current();
    let attacker = &mut client_at(1, "203.0.113.7:4242");
    let mut seen = Vec::new();
    for i in 0..6 {
        // A different user each time: the address alone adds up.
        let user = format!("victim{i}");
        seen.push(attempt(
            &set,
            attacker,
            Some(&user),
            Status::No,
            Some("AUTHENTICATIONFAILED"),
        ));
    }
    assert_eq!(seen, ["pass", "pass", "delay", "delay", "refuse", "refuse"]);
    // Another connection from the same address: refused too.
    assert_eq!(
        throttled(&set, &mut client_at(2, "203.0.113.7:5000"), "a", None),
        "refuse"
    );
    // Another address, and the users it tried, are not affected (one failure each).
    let other = &mut client_at(3, "198.51.100.9:4242");
    assert_eq!(throttled(&set, other, "a", Some("victim0")), "pass");
    let host = policies.host();
    assert_eq!(
        host.shared_value("login_throttle", "cooldown a 203.0.113.7"),
        Some(1.0)
    );
    assert_eq!(
        host.shared_value("login_throttle", "failures a 198.51.100.9"),
        None
    );
}

#[test]
fn login_throttle_counts_per_user_across_addresses() {
    let policies = shipped("login_throttle.lua", THROTTLE);
    let set = policies.current();
    let mut seen = Vec::new();
    for i in 0..5 {
        // Every guess from another address, the user's name spelt differently.
        let ctx = &mut client_at(i, &format!("192.0.2.{}:1000", i + 1));
        let user = if i % 2 == 0 { "Alice" } else { "alice" };
        seen.push(attempt(&set, ctx, Some(user), Status::No, None));
    }
    assert_eq!(seen, ["pass", "pass", "delay", "delay", "refuse"]);
    // Bob, from one of those addresses, is fine.
    assert_eq!(
        throttled(&set, &mut client_at(9, "192.0.2.1:2000"), "b", Some("bob")),
        "pass"
    );

    // per_user = false: only addresses count.
    let policies = shipped(
        "login_throttle.lua",
        &format!("{THROTTLE}\nper_user = false"),
    );
    let set = policies.current();
    for i in 0..5 {
        let ctx = &mut client_at(i, &format!("192.0.2.{}:1000", i + 1));
        assert_eq!(attempt(&set, ctx, Some("alice"), Status::No, None), "pass");
    }
}

#[test]
fn login_throttle_counts_only_wrong_credentials() {
    let policies = shipped("login_throttle.lua", THROTTLE);
    let set = policies.current();
    let ctx = &mut client_at(1, "203.0.113.7:4242");
    // The server or a limit failed, not the password: nothing counted.
    for code in [
        "UNAVAILABLE",
        "SERVERBUG",
        "LIMIT",
        "PRIVACYREQUIRED",
        "EXPIRED",
    ] {
        assert_eq!(
            attempt(&set, ctx, Some("alice"), Status::No, Some(code)),
            "pass"
        );
    }
    // BAD is a syntax error, not a guess.
    assert_eq!(attempt(&set, ctx, Some("alice"), Status::Bad, None), "pass");
    assert_eq!(
        policies
            .host()
            .shared_value("login_throttle", "failures u alice"),
        None
    );
    // An answer to another tag than the login's is not the login's.
    assert_eq!(throttled(&set, ctx, "l1", Some("alice")), "pass");
    completed(&set, ctx, "other", Status::No, None);
    assert_eq!(
        policies
            .host()
            .shared_value("login_throttle", "failures u alice"),
        None
    );
}

#[test]
fn login_throttle_success_clears_the_users_count_only() {
    let policies = shipped("login_throttle.lua", THROTTLE);
    let set = policies.current();
    let host = policies.host();
    let ctx = &mut client_at(1, "203.0.113.7:4242");
    for _ in 0..2 {
        attempt(&set, ctx, Some("alice"), Status::No, None);
    }
    assert_eq!(
        host.shared_value("login_throttle", "failures u alice"),
        Some(2.0)
    );
    // Delayed (the count is at delay_after), then right.
    assert_eq!(attempt(&set, ctx, Some("Alice"), Status::Ok, None), "delay");
    assert_eq!(
        host.shared_value("login_throttle", "failures u alice"),
        Some(0.0)
    );
    assert_eq!(
        host.shared_value("login_throttle", "failures a 203.0.113.7"),
        Some(2.0)
    );
    // alice from elsewhere is no longer slowed down; this address still is.
    assert_eq!(
        throttled(&set, &mut client_at(2, "192.0.2.1:1"), "a", Some("alice")),
        "pass"
    );
    assert_eq!(
        throttled(&set, &mut client_at(3, "203.0.113.7:2"), "a", Some("bob")),
        "delay"
    );

    let keep = shipped(
        "login_throttle.lua",
        &format!("{THROTTLE}\nreset_on_success = false"),
    );
    let set = keep.current();
    for _ in 0..2 {
        attempt(&set, ctx, Some("alice"), Status::No, None);
    }
    attempt(&set, ctx, Some("alice"), Status::Ok, None);
    assert_eq!(
        keep.host()
            .shared_value("login_throttle", "failures u alice"),
        Some(2.0)
    );
}

#[test]
fn login_throttle_judges_a_routed_sasl_user_in_on_login() {
    let policies = shipped("login_throttle.lua", THROTTLE);
    let set = policies.current();
    let sasl_login = |delayed_ms| LoginView {
        user: Some("carol".into()),
        mechanism: "PLAIN".into(),
        delayed_ms,
    };
    // AUTHENTICATE PLAIN without an initial response, from ever new addresses: on_command
    // knows no user; on_login (imapgate owns the login) reads it from the SASL response.
    let mut seen = Vec::new();
    for i in 0..5 {
        let ctx = &mut client_at(i, &format!("192.0.2.{}:1000", i + 1));
        let mut cmd = login_command("s", None, 0);
        cmd.name = "AUTHENTICATE";
        assert_eq!(set.on_command(ctx, &mut cmd), Verdict::Pass);
        let outcome = match set.on_login(ctx, &sasl_login(0)) {
            Verdict::Pass => "pass",
            Verdict::Delay(_) => {
                assert_eq!(set.on_login(ctx, &sasl_login(50)), Verdict::Pass);
                "delay"
            }
            Verdict::Reject { code, .. } => {
                assert_eq!(code.as_deref(), Some("UNAVAILABLE"));
                // imapgate's own refusal comes back through on_complete: not a failure.
                completed(&set, ctx, "s", Status::No, Some("UNAVAILABLE"));
                seen.push("refuse");
                continue;
            }
            other => panic!("{other:?}"),
        };
        completed(&set, ctx, "s", Status::No, Some("AUTHENTICATIONFAILED"));
        seen.push(outcome);
    }
    assert_eq!(seen, ["pass", "pass", "delay", "delay", "refuse"]);
    // A LOGIN named the user in on_command already: on_login does not judge (or delay) again.
    let ctx = &mut client_at(7, "192.0.2.99:1");
    assert_eq!(throttled(&set, ctx, "l", Some("dave")), "pass");
    assert_eq!(set.on_login(ctx, &login_as("dave")), Verdict::Pass);
}

#[test]
fn login_throttle_exempt_networks_and_options() {
    let policies = shipped(
        "login_throttle.lua",
        &format!("{THROTTLE}\nexempt_networks = [\"10.0.0.0/8\"]"),
    );
    let set = policies.current();
    let webmail = &mut client_at(1, "10.1.2.3:4000");
    for i in 0..6 {
        let user = format!("user{i}");
        assert_eq!(
            attempt(&set, webmail, Some(&user), Status::No, None),
            "pass"
        );
    }
    for (options, error) in [
        (
            "delay_ms = 60001",
            "delay_ms must be a number from 0 to 60000",
        ),
        (
            "refuse_after = 0",
            "refuse_after must be a number from 1 up",
        ),
        ("per_user = \"yes\"", "per_user is true or false"),
        (
            "exempt_networks = [\"10.0.0.0/33\"]",
            "\"10.0.0.0/33\" is not a network",
        ),
        ("delay = 5", "unknown option \"delay\""),
    ] {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/login_throttle.lua");
        let cfg = PolicyConfig {
            options: toml::from_str(options).expect("options"),
            ..config(&script)
        };
        let e = load(&[cfg])
            .err()
            .unwrap_or_else(|| panic!("{options} loaded"));
        assert!(e.to_string().contains(error), "{options}: {e}");
    }
}

#[test]
fn a_client_that_half_closes_still_gets_its_delayed_command_answered() {
    // C: a SEARCH ALL          (delayed by the policy)
    // C: b NOOP                (pipelined behind it)
    // C: <shuts its write side>
    // ... the delay ends: both go upstream, and only then is the upstream's write side shut.
    let scripts = Scripts::new();
    let script = scripts.write(
        "hold.lua",
        r#"return { commands = { "SEARCH" }, on_command = function(ctx, cmd)
             if not ctx.vars.held then ctx.vars.held = true; return imap.delay(50) end
           end }"#,
    );
    let mut conv = conversation(load(&[config(&script)]).unwrap());
    let (up, _) = send(&mut conv, "s SELECT INBOX\r\n");
    assert_eq!(up, "s SELECT INBOX\r\n");
    answer(&mut conv, "s OK selected\r\n");
    let (up, down) = send(&mut conv, "a SEARCH ALL\r\nb NOOP\r\n");
    assert_eq!((up.as_str(), down.as_str()), ("", ""));
    conv.client_eof();
    assert_eq!(
        conv.take_control(),
        None,
        "nothing ends while a command is held"
    );
    // The driver calls this at the hold's deadline.
    conv.release_held();
    conv.client_input();
    assert_eq!(
        String::from_utf8_lossy(&conv.to_upstream.drain_to_vec()),
        "a SEARCH ALL\r\nb NOOP\r\n"
    );
    assert_eq!(
        conv.take_control(),
        Some(imapgate::session::state::Control::ShutdownUpstreamWrite)
    );
}
