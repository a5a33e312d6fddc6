//! Commands relayed upstream and not yet completed, found again by their tag.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::imap::command::CommandName;

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
}

#[derive(Clone, Debug)]
pub struct Pending {
    pub tag: Bytes,
    pub name: CommandName,
    pub kind: PendingKind,
    pub started: Instant,
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

    /// The commands left when the connection ends: they will never complete.
    pub fn drain(&mut self) -> impl Iterator<Item = Pending> + '_ {
        self.items.drain(..)
    }
}
