//! The protocol core: IMAP on byte slices, in both directions.
//!
//! - [`framing`] finds message boundaries (lines and the literals they announce) and enforces limits.
//! - [`syntax`] turns a framed message into a lenient token tree (nom).
//! - [`command`] and [`response`] give typed views over that tree.
//! - [`encode`] writes changed messages back from values.
//! - [`mutf7`] is modified UTF-7 (RFC 3501 5.1.3), strict both ways.
//! - [`capability`] parses and filters capability lists.
//! - [`list_match`] matches mailbox names against LIST patterns in linear time.
//! - [`validity`] says which commands are valid in which connection state.
//! - [`sync_literals`] cuts a client message into the pieces sent one `+` at a time.

pub mod capability;
pub mod command;
pub mod encode;
pub mod framing;
pub mod list_match;
pub mod mutf7;
pub mod response;
pub mod sync_literals;
pub mod syntax;
pub mod validity;
