//! A message held while the policies' hook on it waits for shared state (Redis).
//!
//! The conversation stays sans-IO: it keeps the message and what it needs to apply the verdict
//! ([`Awaiting`]), and hands the waiting hook to the driver ([`Conversation::take_hook`]),
//! which polls it beside the connection's I/O and gives back its outcome
//! ([`Conversation::hook_done`]). Until then nothing more is read from either side of this
//! connection (order is kept: a later command is not judged before an earlier one, and a
//! response is not relayed ahead of the completion being judged); what is already queued is
//! still written. Other connections never wait for this one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use super::pending::Pending;
use super::state::Conversation;
use crate::imap::command::Command;
use crate::imap::framing::Literal;
use crate::imap::response::Response;
use crate::imap::syntax::Span;
use crate::policy::{CommandView, Completed, Finished, Waiting};

/// A command being judged: what applying its verdict needs besides the view.
#[derive(Debug)]
pub(super) struct Judging {
    pub(super) command: Command,
    pub(super) literal: Option<Literal>,
    pub(super) first_judged: Instant,
    pub(super) spans: Vec<Span>,
}

/// What the conversation holds while a hook waits.
#[derive(Debug)]
pub(super) enum Awaiting {
    Command(Judging),
    /// A tagged response whose completion hook waits (the command is already completed in
    /// the conversation's state; the response is not yet relayed).
    Complete {
        pending: Box<Pending>,
        response: Response,
    },
}

/// The hook that waits, by kind.
#[derive(Debug)]
pub(super) enum HookWait {
    Command(Waiting<CommandView>),
    Complete(Waiting<Completed>),
}

/// A waiting hook for the driver to poll; its output goes back to
/// [`Conversation::hook_done`].
#[derive(Debug)]
pub struct PendingHook(HookWait);

/// A waiting hook's outcome.
#[derive(Debug)]
pub enum HookDone {
    Command(Finished<CommandView>),
    Complete(Finished<Completed>),
}

impl Future for PendingHook {
    type Output = HookDone;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HookDone> {
        match &mut self.get_mut().0 {
            HookWait::Command(w) => Pin::new(w).poll(cx).map(HookDone::Command),
            HookWait::Complete(w) => Pin::new(w).poll(cx).map(HookDone::Complete),
        }
    }
}

impl Conversation {
    pub(super) fn wait_for_hook(&mut self, awaiting: Awaiting, hook: HookWait) {
        self.awaiting = Some(awaiting);
        self.hook = Some(PendingHook(hook));
    }

    /// A hook that waits, for the driver to poll (once: it is taken).
    pub fn take_hook(&mut self) -> Option<PendingHook> {
        self.hook.take()
    }

    /// Whether a message is held for a hook that waits.
    pub fn is_waiting(&self) -> bool {
        self.awaiting.is_some()
    }

    /// The waiting hook finished: its verdict is applied, and reading both sides resumes.
    pub fn hook_done(&mut self, done: HookDone) {
        match (self.awaiting.take(), done) {
            (Some(Awaiting::Command(judging)), HookDone::Command(f)) => {
                self.events
                    .extend(f.decisions.into_iter().map(super::state::Event::Policy));
                self.command_judged(judging, &f.view, f.verdict);
            }
            (Some(Awaiting::Complete { pending, response }), HookDone::Complete(f)) => {
                self.events
                    .extend(f.decisions.into_iter().map(super::state::Event::Policy));
                self.completion_judged(&pending, response, f.verdict);
            }
            (awaiting, _) => {
                // Not what was held: a bug, never a silent pass.
                tracing::error!(
                    ?awaiting,
                    "a waiting hook's outcome does not match what was held"
                );
                self.bye_unavailable("Internal error");
                return;
            }
        }
        self.upstream_input();
    }
}
