//! The added cost of policies per command: one connection's conversation (sans-IO) with the
//! three shipped policies, timing a hooked command against an unhooked one.
//!
//! `cargo bench --bench policy`
//!
//! A second group runs the namespace policy's hooks in a bare VM, with and without the
//! instruction-count hook of the time budget (`-- namespace_hooks_in_bare_lua`).

use std::path::PathBuf;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use imapgate::config::{LuaConfig, PolicyConfig};
use imapgate::policy::{ConnInfo, Policies};
use imapgate::session::state::{Conversation, Settings};

fn shipped() -> Policies {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policy = |file: &str, options: &str| PolicyConfig {
        script: dir.join(file),
        options: toml::from_str(options).expect("options"),
        on_error: Default::default(),
        on_state_error: None,
    };
    let configs = [
        policy("require_tls.lua", ""),
        policy(
            "namespace.lua",
            "client_prefix = \"INBOX.\"\nclient_delimiter = \".\"\nupstream_prefix = \"\"\nupstream_delimiter = \"/\"",
        ),
        policy("search_rate_limit.lua", "per_second = 1e9\nburst = 1000000"),
    ];
    let lua = LuaConfig {
        vms: 1,
        ..LuaConfig::default()
    };
    Policies::load(&configs, &lua).expect("shipped policies load")
}

fn conversation(policies: Policies) -> Conversation {
    let info = ConnInfo {
        id: 1,
        peer: "127.0.0.1:1".into(),
        listener: "bench".into(),
        tls: true,
        ..ConnInfo::default()
    };
    let mut conv = Conversation::new(
        Settings::default(),
        true,
        Bytes::from_static(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n"),
        policies,
        info,
    );
    // Logged in with a mailbox selected: SEARCH is only valid then.
    for (command, answer) in [
        (&b"a LOGIN alice secret\r\n"[..], &b"a OK done\r\n"[..]),
        (b"b SELECT INBOX\r\n", b"b OK [READ-WRITE] done\r\n"),
    ] {
        conv.client_buffer().extend_from_slice(command);
        conv.client_input();
        conv.upstream_buffer().extend_from_slice(answer);
        conv.upstream_input();
    }
    conv.to_upstream.drain_to_vec();
    conv.to_client.drain_to_vec();
    conv.events.clear();
    conv
}

/// One command and its tagged completion, so that nothing piles up between iterations.
fn one(conv: &mut Conversation, line: &[u8]) {
    one_answered(conv, line, b"")
}

/// One command, the untagged data `answer` and its tagged completion.
fn one_answered(conv: &mut Conversation, line: &[u8], answer: &[u8]) {
    conv.client_buffer().extend_from_slice(line);
    conv.client_input();
    conv.upstream_buffer().extend_from_slice(answer);
    conv.upstream_buffer().extend_from_slice(b"t OK done\r\n");
    conv.upstream_input();
    conv.to_upstream.drain_to_vec();
    conv.to_client.drain_to_vec();
    conv.events.clear();
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("command_through_conversation");
    let mut none = conversation(Policies::none());
    g.bench_function("NOOP, no policies", |b| {
        b.iter(|| one(&mut none, b"t NOOP\r\n"))
    });
    let mut shipped_conv = conversation(shipped());
    g.bench_function("NOOP, shipped policies (not hooked)", |b| {
        b.iter(|| one(&mut shipped_conv, b"t NOOP\r\n"))
    });
    g.bench_function("SEARCH, shipped policies (hooked: rate limit)", |b| {
        b.iter(|| one(&mut shipped_conv, b"t SEARCH ALL\r\n"))
    });
    g.bench_function(
        "SELECT, shipped policies (hooked: namespace rewrite)",
        |b| b.iter(|| one(&mut shipped_conv, b"t SELECT INBOX.Archive.2024\r\n")),
    );
    g.bench_function(
        "STATUS, shipped policies (hooked: namespace command and response)",
        |b| {
            b.iter(|| {
                one_answered(
                    &mut shipped_conv,
                    b"t STATUS INBOX.Archive (MESSAGES UNSEEN UIDNEXT)\r\n",
                    b"* STATUS Archive (MESSAGES 3 UNSEEN 0 UIDNEXT 4)\r\n",
                )
            })
        },
    );
    g.finish();
}

/// The namespace policy's two hooks for one STATUS (the command's name to the upstream form,
/// the response's back), called in a bare Lua 5.4 VM: what the policy's own code costs, and
/// what the instruction-count hook that enforces the time budget adds to it.
fn namespace_in_bare_lua(c: &mut Criterion) {
    use mlua::{Function, HookTriggers, Lua, Table, VmState};
    let mut g = c.benchmark_group("namespace_hooks_in_bare_lua");
    let lua = Lua::new();
    lua.load(
        "imap = { options = {}, list_match = function() return false end,
                  reject = function(v) return v end, drop = function() return {} end }",
    )
    .exec()
    .expect("imap stub");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies/namespace.lua");
    let source = std::fs::read_to_string(path).expect("namespace.lua");
    let policy: Table = lua.load(&source).eval().expect("namespace.lua loads");
    let on_command: Function = policy.get("on_command").expect("on_command");
    let on_response: Function = policy.get("on_response").expect("on_response");
    let ctx = lua.create_table().expect("ctx");
    let status = |hooks: bool| -> Function {
        let run = if hooks {
            "on_command(ctx, cmd) on_response(ctx, resp)"
        } else {
            ""
        };
        lua.load(format!(
            "return function(on_command, on_response, ctx)
               local cmd = {{ tag = 't', name = 'STATUS', mailboxes = {{ 'INBOX.Archive' }}, roles = {{ 'mailbox' }} }}
               local resp = {{ kind = 'STATUS', mailboxes = {{ 'Archive' }}, roles = {{ 'mailbox' }} }}
               {run}
               return cmd.mailboxes[1], resp.mailboxes[1]
             end"
        ))
        .eval()
        .expect("driver")
    };
    let (both, tables) = (status(true), status(false));
    let names: (String, String) = both
        .call((&on_command, &on_response, &ctx))
        .expect("hooks run");
    assert_eq!(names, ("Archive".into(), "INBOX.Archive".into()));
    let args = (&on_command, &on_response, &ctx);
    g.bench_function("cmd and resp tables only", |b| {
        b.iter(|| tables.call::<()>(args).expect("runs"))
    });
    g.bench_function("both hooks, no count hook", |b| {
        b.iter(|| both.call::<()>(args).expect("runs"))
    });
    lua.set_hook(HookTriggers::new().every_nth_instruction(1000), |_, _| {
        Ok(VmState::Continue)
    })
    .expect("count hook");
    g.bench_function("both hooks, count hook as imapgate sets it", |b| {
        b.iter(|| both.call::<()>(args).expect("runs"))
    });
    g.finish();
}

criterion_group!(benches, bench, namespace_in_bare_lua);
criterion_main!(benches);
