//! The protocol core on its own, without a network: the framer and the parsers against known
//! answers, RFC examples, hostile inputs, properties and imap-codec as an oracle, and
//! `imapgate dissect` as a program. One module per subject; `protocol_support` frames whole
//! streams and reads the RFC example files for them.

#[path = "protocol/support/mod.rs"]
mod protocol_support;

#[path = "protocol/differential.rs"]
mod differential;
#[path = "protocol/dissect.rs"]
mod dissect;
#[path = "protocol/hostile.rs"]
mod hostile;
#[path = "protocol/known_answers.rs"]
mod known_answers;
#[path = "protocol/properties.rs"]
mod properties;
#[path = "protocol/rfc_examples.rs"]
mod rfc_examples;
