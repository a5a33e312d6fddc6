//! Commands relayed upstream and not yet completed, found again by their tag: the record of
//! what imapgate judged, and so the desync tripwire.
//!
//! Every tagged response from the upstream must answer a command imapgate framed, judged and
//! forwarded. One that does not ([`PendingTags::take`] finds nothing) means the upstream read
//! the client's bytes differently from imapgate; the session then closes instead of relaying.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::imap::command::{CommandKind, CommandName};
use crate::imap::list_match::ListPattern;
use crate::imap::response::Response;

/// Most commands in flight on one connection; beyond, the client is not read until some
/// complete (back-pressure, not refusal: pipelining clients just wait).
pub const MAX_PENDING: usize = 512;

/// What the session must do when a command completes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingKind {
    Other,
    /// LOGIN or AUTHENTICATE; `user` when it could be read without keeping any secret.
    Login {
        user: Option<String>,
    },
    Authenticate {
        user: Option<String>,
    },
    /// SELECT or EXAMINE of this mailbox (decoded).
    Select {
        mailbox: String,
    },
    /// CLOSE or UNSELECT.
    Unselect,
    Idle,
    Logout,
    /// ENABLE: what it enabled is read from the untagged ENABLED response.
    Enable,
}

/// The client's own patterns of a LIST or LSUB whose patterns a policy rewrote: the answers
/// are relayed only when they match one of them.
#[derive(Clone, Debug)]
pub struct ListFilter {
    /// Reference and pattern joined, decoded.
    pub patterns: Vec<String>,
    /// Compiled for the delimiter last seen in an answer.
    compiled: Option<(Option<char>, Vec<ListPattern>)>,
}

impl ListFilter {
    pub fn new(patterns: Vec<String>) -> ListFilter {
        ListFilter {
            patterns,
            compiled: None,
        }
    }

    /// Whether a (client-form) name matches one of the client's patterns; a pattern too
    /// complex to match matches nothing (the entry is hidden, never shown by mistake).
    pub fn matches(&mut self, name: &str, delimiter: Option<char>) -> bool {
        let stale = self.compiled.as_ref().is_none_or(|(d, _)| *d != delimiter);
        if stale {
            let compiled = self
                .patterns
                .iter()
                .filter_map(|p| ListPattern::new(p, delimiter).ok())
                .collect();
            self.compiled = Some((delimiter, compiled));
        }
        self.compiled
            .as_ref()
            .is_some_and(|(_, ps)| ps.iter().any(|p| p.matches(name)))
    }
}

#[derive(Clone, Debug)]
pub struct Pending {
    /// Unique per connection (tags may repeat).
    pub seq: u64,
    pub tag: Bytes,
    pub name: CommandName,
    pub kind: PendingKind,
    pub started: Instant,
    pub list_filter: Option<Box<ListFilter>>,
    /// INBOX's LIST/LSUB entry, relayed after the command's other entries (so that a policy
    /// judging it has seen them).
    pub held_inbox: Option<Box<Response>>,
    /// A policy failed on one of this command's untagged responses (fail closed): the
    /// command completes `NO [UNAVAILABLE]` whatever the upstream said.
    pub failed: bool,
    /// A login a policy refused before any upstream saw it (imapgate answers it).
    pub refused: bool,
}

impl Pending {
    pub fn new(seq: u64, tag: Bytes, name: CommandName, kind: PendingKind) -> Pending {
        Pending {
            seq,
            tag,
            name,
            kind,
            started: Instant::now(),
            list_filter: None,
            held_inbox: None,
            failed: false,
            refused: false,
        }
    }

    fn is_list(&self) -> bool {
        matches!(self.name.kind, CommandKind::List | CommandKind::Lsub)
    }
}

/// Pending commands in the order they were sent. Clients may reuse tags; the oldest command with
/// a tag is the one a tagged response completes.
#[derive(Debug, Default)]
pub struct PendingTags {
    items: VecDeque<Pending>,
}

impl PendingTags {
    pub fn push(&mut self, pending: Pending) {
        self.items.push_back(pending);
    }

    pub fn take(&mut self, tag: &[u8]) -> Option<Pending> {
        let i = self.items.iter().position(|p| p.tag == tag)?;
        self.items.remove(i)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_full(&self) -> bool {
        self.items.len() >= MAX_PENDING
    }

    /// The oldest command in flight with this tag.
    pub fn by_tag_mut(&mut self, tag: &[u8]) -> Option<&mut Pending> {
        self.items.iter_mut().find(|p| p.tag == tag)
    }

    pub fn get_mut(&mut self, seq: u64) -> Option<&mut Pending> {
        self.items.iter_mut().find(|p| p.seq == seq)
    }

    /// The command untagged data belongs to: the oldest in flight (servers answer in order).
    pub fn oldest_mut(&mut self) -> Option<&mut Pending> {
        self.items.front_mut()
    }

    /// The LIST or LSUB a LIST/LSUB entry answers: the oldest in flight.
    pub fn oldest_list_mut(&mut self) -> Option<&mut Pending> {
        self.items.iter_mut().find(|p| p.is_list())
    }

    /// The commands left when the connection ends: they will never complete.
    pub fn drain(&mut self) -> impl Iterator<Item = Pending> + '_ {
        self.items.drain(..)
    }
}
