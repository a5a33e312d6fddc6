//! Where the conversation meets the policies: showing a command or a response to the hooks,
//! applying their verdict in one place, and encoding their rewrites back into the message.
//!
//! Only messages some policy asked for come here. A rewritten message keeps every byte the
//! policies did not change; changed mailbox names are encoded from values (modified UTF-7,
//! atom/quoted/literal chosen by the encoder). Whatever a policy could not judge is not
//! relayed: a failing hook fails closed as its `on_error` says.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::pending::ListFilter;
use super::state::{Control, Conversation, Event, Held, login_user};
use super::waits::{Awaiting, HookWait, Judging};
use crate::imap::command::{Command, CommandKind, MailboxRole, parse_command};
use crate::imap::encode::{self, Edit, EncodeError, EncodeOptions, LiteralForm, Value};
use crate::imap::framing::{Frame, Literal};
use crate::imap::response::{DataKind, Response, Status};
use crate::imap::syntax::{Span, Token};
use crate::policy::{
    CommandView, Judgement, MailboxSlot, Namespace, NamespaceEntry, PolicySet, ResponseView,
    Verdict,
};

impl Conversation {
    /// Shows a hooked command to the policies and acts on their verdict. `literal` is the
    /// literal the command was cut at (its octets still to come); `first_judged` is when the
    /// command was first shown (a delayed command is judged again when its delay ends).
    pub(super) fn judge_command(
        &mut self,
        set: &Arc<PolicySet>,
        command: Command,
        literal: Option<Literal>,
        first_judged: Instant,
    ) {
        if let Some(l) = literal
            && cut_at_mailbox(&command)
        {
            return self.start_collecting(command, l);
        }
        let Some((view, spans)) = self.command_view(&command, first_judged) else {
            return self.refuse_command(
                &command,
                Status::Bad,
                Some("CLIENTBUG"),
                "Mailbox name is not valid modified UTF-7",
                literal,
            );
        };
        self.sync_ctx();
        match set.judge_command(&mut self.ctx, view) {
            Judgement::Ready(verdict, view) => {
                self.take_decisions();
                let judging = Judging {
                    command,
                    literal,
                    first_judged,
                    spans,
                };
                self.command_judged(judging, &view, verdict);
            }
            Judgement::Waiting(waiting) => self.wait_for_hook(
                Awaiting::Command(Judging {
                    command,
                    literal,
                    first_judged,
                    spans,
                }),
                HookWait::Command(waiting),
            ),
        }
    }

    /// Applies the policies' verdict on a command (at once, or when their hook stopped
    /// waiting).
    pub(super) fn command_judged(
        &mut self,
        judging: Judging,
        view: &CommandView,
        verdict: Verdict,
    ) {
        let Judging {
            command,
            literal,
            first_judged,
            spans,
        } = judging;
        match verdict {
            Verdict::Pass => match self.outgoing(&command, view, &spans) {
                Ok(out) => {
                    let seq = self.forward(&command, out, literal);
                    if let Some(filter) = list_filter(&command, view)
                        && let Some(p) = self.pending.get_mut(seq)
                    {
                        p.list_filter = Some(Box::new(filter));
                    }
                }
                Err(e) => self.unencodable(&command, &e, literal),
            },
            Verdict::Delay(wait) => {
                self.held = Some(Held {
                    until: Instant::now() + wait,
                    command,
                    literal,
                    first_judged,
                });
            }
            Verdict::Reject { status, code, text } => {
                self.refuse_command(&command, status, code.as_deref(), &text, literal);
            }
            Verdict::Close { text } => {
                self.events.push(Event::Rejected {
                    name: command.name,
                    user: None,
                });
                self.reply_untagged_bye(&text);
                self.push_control(Control::Close { flush: true });
            }
            // Not verdicts for commands (the engine never lets them through): never a
            // silent pass.
            Verdict::Drop | Verdict::Route(_) => self.refuse_command(
                &command,
                Status::No,
                Some("UNAVAILABLE"),
                "Policy check failed, try again later",
                literal,
            ),
        }
    }

    fn unencodable(&mut self, command: &Command, e: &EncodeError, literal: Option<Literal>) {
        tracing::warn!(error = %e, "a policy rewrite cannot be encoded");
        self.refuse_command(
            command,
            Status::No,
            Some("CANNOT"),
            "The rewritten command cannot be encoded",
            literal,
        );
    }

    /// Most octets of one command imapgate holds to show it to a policy whole.
    fn collect_limit(&self) -> usize {
        self.client_line_limit()
    }

    /// The command's mailbox argument is a literal not received yet: take it from the client
    /// (answering `+` ourselves), so the policy sees the name.
    fn start_collecting(&mut self, command: Command, literal: Literal) {
        if command.raw.len() + literal.len as usize > self.collect_limit() {
            return self.refuse_command(
                &command,
                Status::No,
                Some("TOOBIG"),
                "Mailbox name too long",
                Some(literal),
            );
        }
        if literal.sync {
            self.reply_continuation("Ready for literal data");
        }
        self.collecting = Some(BytesMut::from(&command.raw[..]));
    }

    /// The next piece of a command being collected.
    pub(super) fn collect(&mut self, frame: Frame) {
        let Some(buf) = self.collecting.as_mut() else {
            return;
        };
        let literal = match frame {
            Frame::Chunk { bytes, .. } => {
                buf.extend_from_slice(&bytes);
                return;
            }
            Frame::Text { bytes, literal, .. } => {
                buf.extend_from_slice(&bytes);
                literal
            }
        };
        let raw = self.collecting.take().unwrap_or_default().freeze();
        match parse_command(raw) {
            Ok(command) => {
                let set = self.policies.current();
                self.judge_command(&set, command, literal, Instant::now());
            }
            Err(e) => {
                let text = format!("Syntax error: {}", e.error.kind);
                let tag = e.tag.map(|t| t.to_vec()).unwrap_or_default();
                self.refuse(Some(&tag), Status::Bad, Some("CLIENTBUG"), &text, literal);
            }
        }
    }

    /// The policy view of a command: its mailbox arguments decoded, and where each lies.
    fn command_view(
        &self,
        command: &Command,
        first_judged: Instant,
    ) -> Option<(CommandView, Vec<Span>)> {
        let mut slots = Vec::new();
        let mut spans = Vec::new();
        for arg in command.mailbox_args() {
            // A literal not received yet (the message to APPEND) is no mailbox name.
            let Some(raw) = arg.token.string(&command.raw) else {
                continue;
            };
            slots.push(MailboxSlot::new(arg.role, self.decode_mailbox(&raw)?));
            spans.push(arg.token.span());
        }
        let view = CommandView {
            tag: String::from_utf8_lossy(command.tag()).into_owned(),
            name: command.name.label(),
            mailboxes: slots,
            delayed_ms: u64::try_from(first_judged.elapsed().as_millis()).unwrap_or(u64::MAX),
            user: login_user(command),
        };
        Some((view, spans))
    }

    /// The bytes to send upstream: the original when nothing changed, else the original with
    /// the changed names re-encoded (a name that needs a literal gets a synchronizing one; the
    /// conversation sends its octets after the upstream's `+`).
    fn outgoing(
        &self,
        command: &Command,
        view: &CommandView,
        spans: &[Span],
    ) -> Result<Bytes, EncodeError> {
        let mut edits: Vec<Edit> = view
            .mailboxes
            .iter()
            .zip(spans)
            .filter(|(slot, _)| slot.changed())
            .map(|(slot, span)| Edit {
                span: *span,
                value: Value::mailbox(&slot.name, self.utf8()),
            })
            .collect();
        if edits.is_empty() {
            return Ok(command.raw.clone());
        }
        edits.sort_by_key(|e| e.span.start);
        let opts = EncodeOptions {
            literal: LiteralForm::Sync,
            utf8: self.utf8(),
        };
        let encoded = encode::splice(&command.raw, &edits, opts)?;
        Ok(Bytes::from(encoded.bytes))
    }

    /// An untagged response some policy wants. INBOX's LIST/LSUB entry waits for the end of
    /// its command, so that a policy judging it has seen the others (e.g. to say whether
    /// INBOX has children).
    pub(super) fn untagged_for_policies(&mut self, set: &PolicySet, response: Response) {
        let kind = response.data_kind().unwrap_or(DataKind::Other);
        if matches!(kind, DataKind::List | DataKind::Lsub)
            && names_inbox(&response)
            && let Some(owner) = self.pending.oldest_list_mut()
            && owner.held_inbox.is_none()
        {
            owner.held_inbox = Some(Box::new(response));
            return;
        }
        let list = matches!(kind, DataKind::List | DataKind::Lsub);
        let mut filter = if list {
            self.pending
                .oldest_list_mut()
                .and_then(|p| p.list_filter.take())
        } else {
            None
        };
        if self.judge_untagged(set, response, filter.as_deref_mut()) == Judged::Failed {
            self.fail_owner(list);
        }
        if let Some(filter) = filter
            && let Some(owner) = self.pending.oldest_list_mut()
        {
            owner.list_filter = Some(filter);
        }
    }

    /// Shows an untagged response to the policies and relays what they leave of it; a LIST
    /// entry that no longer matches the client's own patterns (`filter`) is not relayed.
    /// [`Judged::Failed`] when a policy could not judge it: the caller fails the command it
    /// belongs to.
    #[must_use]
    pub(super) fn judge_untagged(
        &mut self,
        set: &PolicySet,
        response: Response,
        filter: Option<&mut ListFilter>,
    ) -> Judged {
        let kind = response.data_kind().unwrap_or(DataKind::Other);
        let mut slots = Vec::new();
        let mut spans = Vec::new();
        for m in response.mailboxes() {
            let decoded = m
                .token
                .string(&response.raw)
                .and_then(|raw| self.decode_mailbox(&raw));
            let Some(name) = decoded else {
                // A name the upstream encoded wrongly cannot be judged, so is not shown.
                self.events.push(Event::Hidden);
                return Judged::Failed;
            };
            slots.push(MailboxSlot::new(m.role, name));
            spans.push(m.token.span());
        }
        let delimiter = response
            .list_delimiter()
            .map(|d| String::from_utf8_lossy(&d).into_owned());
        let namespace = (kind == DataKind::Namespace)
            .then(|| namespace_of(&response))
            .flatten();
        let mut view = ResponseView::new(kind.as_str(), slots, delimiter, namespace);
        if matches!(kind, DataKind::List | DataKind::Lsub) {
            view = view.with_flags(list_flags(&response));
        }
        self.sync_ctx();
        let verdict = set.on_response(&mut self.ctx, &mut view);
        self.take_decisions();
        match verdict {
            Verdict::Pass => {}
            Verdict::Drop => {
                self.events.push(Event::Hidden);
                return Judged::Done;
            }
            Verdict::Close { text } => {
                self.reply_untagged_bye(&text);
                self.push_control(Control::Close { flush: true });
                return Judged::Done;
            }
            // A hook that failed (or answered what a response cannot): fail closed.
            Verdict::Reject { .. } | Verdict::Delay(_) | Verdict::Route(_) => {
                self.events.push(Event::Hidden);
                return Judged::Failed;
            }
        }
        if let Some(filter) = filter
            && let Some(name) = view.mailboxes.first()
            && !name.name.is_empty()
        {
            let delimiter = view.delimiter.as_ref().and_then(|d| d.chars().next());
            if !filter.matches(&name.name, delimiter) {
                self.events.push(Event::Hidden);
                return Judged::Done;
            }
        }
        match self.encode_response(&response, &view) {
            Ok(Some(bytes)) => self.to_client.push(bytes),
            Ok(None) => self.to_client.push(response.raw),
            Err(e) => {
                tracing::warn!(error = %e, "a policy rewrite of a response cannot be encoded");
                self.events.push(Event::Hidden);
                return Judged::Failed;
            }
        }
        Judged::Done
    }

    /// The response with the view's changes written in, `None` when nothing changed.
    fn encode_response(
        &self,
        response: &Response,
        view: &ResponseView,
    ) -> Result<Option<Bytes>, EncodeError> {
        let utf8 = self.utf8();
        let spans: Vec<Span> = response
            .mailboxes()
            .iter()
            .map(|m| m.token.span())
            .collect();
        let mut edits: Vec<Edit> = view
            .mailboxes
            .iter()
            .zip(&spans)
            .filter(|(slot, _)| slot.changed())
            .map(|(slot, span)| Edit {
                span: *span,
                value: Value::mailbox(&slot.name, utf8),
            })
            .collect();
        let args = response.args();
        if view.delimiter_changed()
            && let Some(token) = args.get(1)
        {
            edits.push(Edit {
                span: token.span(),
                value: view
                    .delimiter
                    .as_ref()
                    .map_or(Value::Nil, |d| Value::String(d.as_bytes().to_vec())),
            });
        }
        if view.flags_changed()
            && let Some(token) = args.first()
        {
            edits.push(Edit {
                span: token.span(),
                value: Value::List(
                    view.flags
                        .iter()
                        .map(|f| Value::Atom(f.as_bytes().to_vec()))
                        .collect(),
                ),
            });
        }
        if view.namespace_changed()
            && let Some(ns) = &view.namespace
        {
            for (token, entries) in args.iter().zip([&ns.personal, &ns.other, &ns.shared]) {
                edits.push(Edit {
                    span: token.span(),
                    value: namespace_value(entries, utf8),
                });
            }
        }
        if edits.is_empty() {
            return Ok(None);
        }
        edits.sort_by_key(|e| e.span.start);
        let opts = EncodeOptions {
            utf8,
            ..EncodeOptions::SERVER
        };
        encode::splice(&response.raw, &edits, opts).map(|e| Some(Bytes::from(e.bytes)))
    }
}

/// Whether an untagged response could be judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Judged {
    Done,
    /// A policy failed on it (or it could not be read or encoded): not relayed, and the
    /// command it belongs to must complete `NO [UNAVAILABLE]`.
    Failed,
}

/// The client's own patterns of a LIST/LSUB a policy judged: the answers must match what the
/// client asked for, whatever the policy sent upstream. (A pattern sent unchanged may still
/// mean something else upstream: the client's `%` stops at the client's delimiter.)
fn list_filter(command: &Command, view: &CommandView) -> Option<ListFilter> {
    if !matches!(command.name.kind, CommandKind::List | CommandKind::Lsub) {
        return None;
    }
    let reference = view
        .mailboxes
        .iter()
        .find(|m| m.role == MailboxRole::Reference)
        .map_or("", |m| m.original());
    let patterns = view
        .mailboxes
        .iter()
        .filter(|m| m.role == MailboxRole::Pattern)
        .map(|m| format!("{reference}{}", m.original()))
        .collect();
    Some(ListFilter::new(patterns))
}

/// The mailbox attributes of a LIST/LSUB entry (`\HasChildren`, `\Noselect`, ...).
fn list_flags(response: &Response) -> Vec<String> {
    response
        .args()
        .first()
        .and_then(Token::items)
        .map(|items| {
            items
                .iter()
                .map(|t| String::from_utf8_lossy(t.raw(&response.raw)).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a LIST/LSUB entry names INBOX.
fn names_inbox(response: &Response) -> bool {
    response
        .args()
        .get(2)
        .and_then(|t| t.string(&response.raw))
        .is_some_and(|n| n.eq_ignore_ascii_case(b"INBOX"))
}

/// True when the command was cut at a literal that is one of its mailbox arguments.
fn cut_at_mailbox(command: &Command) -> bool {
    command
        .mailbox_args()
        .iter()
        .any(|m| matches!(m.token, Token::Literal { data: None, .. }))
}

/// ```abnf
/// namespace-response = "NAMESPACE" SP namespace SP namespace SP namespace
/// namespace          = nil / "(" 1*namespace-descr ")"
/// namespace-descr    = "(" string SP (DQUOTE QUOTED-CHAR DQUOTE / nil) [namespace-response-extensions] ")"
/// ```
fn namespace_of(response: &Response) -> Option<Namespace> {
    let args = response.args();
    let class = |token: &Token| -> Option<Vec<NamespaceEntry>> {
        match token {
            Token::Nil(_) => Some(Vec::new()),
            Token::List { items, .. } => items
                .iter()
                .map(|descr| {
                    let parts = descr.items()?;
                    let prefix = parts.first()?.string(&response.raw)?;
                    let delimiter = parts.get(1)?.string(&response.raw);
                    Some(NamespaceEntry {
                        prefix: String::from_utf8_lossy(&prefix).into_owned(),
                        delimiter: delimiter.map(|d| String::from_utf8_lossy(&d).into_owned()),
                    })
                })
                .collect(),
            _ => None,
        }
    };
    Some(Namespace {
        personal: class(args.first()?)?,
        other: class(args.get(1)?)?,
        shared: class(args.get(2)?)?,
    })
}

fn namespace_value(entries: &[NamespaceEntry], utf8: bool) -> Value {
    if entries.is_empty() {
        return Value::Nil;
    }
    Value::List(
        entries
            .iter()
            .map(|e| {
                let prefix = if utf8 {
                    e.prefix.clone().into_bytes()
                } else {
                    crate::imap::mutf7::encode(&e.prefix).into_bytes()
                };
                Value::List(vec![
                    Value::String(prefix),
                    e.delimiter
                        .as_ref()
                        .map_or(Value::Nil, |d| Value::String(d.as_bytes().to_vec())),
                ])
            })
            .collect(),
    )
}
