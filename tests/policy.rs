//! Lua policies: the engine on its own (sandbox, budgets, the hook contract, sans-IO
//! transcripts), `imapgate replay` on recorded transcripts, the shipped policies end to end
//! through imapgate and a real Dovecot, and SIGHUP reloads of the binary. One module per
//! subject.

mod support;

#[path = "policy/engine.rs"]
mod engine;
#[path = "policy/reload.rs"]
mod reload;
#[path = "policy/replay.rs"]
mod replay;
#[path = "policy/shipped.rs"]
mod shipped;
