//! imapgate: a transparent IMAP proxy that parses every command and response.
//!
//! The modules, in the order a message flows through them:
//!
//! - [`config`]: the TOML configuration, its defaults and validation.
//! - [`net`]: listeners, TLS (server and client side) and the upstream connection.
//! - [`imap`]: the protocol core. Framing, parsing and encoding of IMAP on byte slices; no sockets.
//! - [`session`]: one client connection: the state machine and the relay between both legs.
//! - [`admin`]: the operators' endpoint (sessions, kick) over the session registry.
//!
//! Layers call downward only: `session` uses `imap`, `net` and `config`; `imap` uses nothing of ours.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod dissect;
pub mod imap;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod replay;
pub mod server;
pub mod session;
pub mod state;
