//! One client connection: the IMAP conversation (sans-IO) and the I/O driver around it.

mod judge;
pub mod outbox;
pub mod relay;
pub mod state;
pub mod tags;

pub use relay::{Listener, SessionError, Shared, serve};
pub use state::{Control, Conversation, Event, ImapState, Settings};
