//! One client connection: the IMAP conversation (sans-IO) and the I/O driver around it.
//!
//! - [`accept`]: connection setup before any IMAP (PROXY header, TLS).
//! - [`state`]: the conversation: framing, parsing, state, what goes where.
//! - `modes`: how the client's next bytes are read, and the upstream's `+` that says so.
//! - [`pending`]: commands in flight; the desync tripwire.
//! - [`prelogin`]: imapgate's stand-in for the upstream before login, when it routes logins.
//! - `judge`: policies applied to commands and responses, in one place.
//! - [`waits`]: a message held while its policy hook waits for shared state.
//! - [`relay`]: the I/O driver.
//! - [`registry`]: every live session, for the operators (connection limits, kick).

pub mod accept;
mod judge;
mod modes;
pub mod outbox;
mod passthrough;
pub mod pending;
pub mod prelogin;
pub mod registry;
pub mod relay;
pub mod route;
pub mod state;
pub mod waits;

pub use modes::sasl_initial_user;
pub use registry::{ConnectionLimits, LimitExceeded, Registry, SessionHandle, SessionInfo};
pub use relay::{Listener, SessionError, Shared, serve};
pub use state::{Control, Conversation, Event, ImapState, Settings};
