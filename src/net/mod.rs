//! Networking: listeners, TLS and the upstream connection.
//!
//! [`stream::Stream`] hides whether a socket is plain or TLS so that the session code is
//! written once, and [`legs`] splits one into the halves a session polls together; `splice`
//! moves a streamed literal from one plain socket to the other without copying it (Linux);
//! [`read_ahead`] reads a TLS upstream in large pieces; [`tls`] builds the rustls
//! configurations from the config file, and [`certs`] chooses the client leg's certificate by
//! SNI and swaps certificates on reload; [`upstream`] opens the connection to the IMAP server,
//! TLS and STARTTLS included; [`health`] probes every upstream and keeps the state routing,
//! policies and `/healthz` read; [`proxy_protocol`] reads and writes the PROXY protocol header
//! that carries a client's real address through load balancers; [`warm`] keeps connections to
//! an upstream open and greeted ahead of the logins that take them; [`http`] serves the
//! operators' endpoints (metrics and health, admin); [`listen`] binds a client listener,
//! shared with other imapgate processes when asked.

#[macro_use]
mod forward;

pub mod certs;
pub mod health;
pub mod http;
pub mod legs;
pub mod listen;
pub mod proxy_protocol;
pub mod read_ahead;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod warm;

pub use stream::{Stream, quickack, tune};
