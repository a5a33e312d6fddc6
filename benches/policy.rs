//! The added cost of policies per command: one connection's conversation (sans-IO) with the
//! three shipped policies, timing a hooked command against an unhooked one.
//!
//! `cargo bench --bench policy`

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
    conv.client_buffer().extend_from_slice(line);
    conv.client_input();
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
