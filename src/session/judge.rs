//! Where the conversation meets the policies: showing a command or a response to the hooks,
//! applying their verdict, and encoding their rewrites back into the message.
//!
//! Only messages some policy asked for come here. A rewritten message keeps every byte the
//! policies did not change; changed mailbox names are encoded from values (modified UTF-7,
//! atom/quoted/literal chosen by the encoder).

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::state::{Control, Conversation, Event, Held, Outgoing};
use crate::imap::command::{Command, parse_command};
use crate::imap::encode::{self, Edit, EncodeError, EncodeOptions, LiteralForm, Value};
use crate::imap::framing::{Frame, Literal};
use crate::imap::response::{DataKind, Response, Status};
use crate::imap::syntax::{Span, Token};
use crate::policy::{
    CommandView, MailboxSlot, Namespace, NamespaceEntry, PolicySet, ResponseView, Verdict,
};

impl Conversation {
    /// Shows a hooked command to the policies and acts on their verdict. `literal` is the
    /// literal the command was cut at (its octets still to come), `collected` whether imapgate
    /// answered `+` for literals inside it.
    pub(super) fn judge_command(
        &mut self,
        set: &PolicySet,
        command: Command,
        literal: Option<Literal>,
        collected: bool,
    ) {
        if let Some(l) = literal
            && cut_at_mailbox(&command)
        {
            return self.start_collecting(command, l);
        }
        let Some((mut view, spans)) = self.command_view(&command) else {
            self.events.push(Event::Rejected { name: command.name });
            return self.refuse_with(
                &command,
                Status::Bad,
                Some("CLIENTBUG"),
                "Mailbox name is not valid modified UTF-7",
                literal,
            );
        };
        self.sync_ctx();
        let verdict = set.on_command(&mut self.ctx, &mut view);
        self.take_decisions();
        match verdict {
            Verdict::Pass | Verdict::Drop => {
                match self.outgoing(&command, &view, &spans, collected) {
                    Ok(out) => self.forward(&command, out),
                    Err(e) => self.unencodable(&command, &e, literal),
                }
            }
            Verdict::Delay(wait) => match self.outgoing(&command, &view, &spans, collected) {
                Ok(out) => {
                    self.held = Some(Held {
                        until: Instant::now() + wait,
                        command,
                        out,
                    });
                }
                Err(e) => self.unencodable(&command, &e, literal),
            },
            Verdict::Reject { status, code, text } => {
                self.events.push(Event::Rejected { name: command.name });
                self.refuse_with(&command, status, code.as_deref(), &text, literal);
            }
            Verdict::Close { text } => {
                self.events.push(Event::Rejected { name: command.name });
                self.reply_untagged_bye(&text);
                self.push_control(Control::Close { flush: true });
            }
        }
    }

    fn unencodable(&mut self, command: &Command, e: &EncodeError, literal: Option<Literal>) {
        tracing::warn!(error = %e, "a policy rewrite cannot be encoded");
        self.events.push(Event::Rejected { name: command.name });
        self.refuse_with(
            command,
            Status::No,
            Some("CANNOT"),
            "The rewritten command cannot be encoded",
            literal,
        );
    }

    fn refuse_with(
        &mut self,
        command: &Command,
        status: Status,
        code: Option<&str>,
        text: &str,
        literal: Option<Literal>,
    ) {
        let tag = command.tag().to_vec();
        self.refuse_command(&tag, status, code, text, literal);
    }

    /// Most octets of one command imapgate holds to show it to a policy whole.
    fn collect_limit(&self) -> usize {
        self.client_line_limit()
    }

    /// The command's mailbox argument is a literal not received yet: take it from the client
    /// (answering `+` ourselves), so the policy sees the name.
    fn start_collecting(&mut self, command: Command, literal: Literal) {
        if command.raw.len() + literal.len as usize > self.collect_limit() {
            self.events.push(Event::Rejected { name: command.name });
            return self.refuse_with(
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
                self.judge_command(&set, command, literal, true);
            }
            Err(e) => {
                let text = format!("Syntax error: {}", e.error.kind);
                let tag = e.tag.map(|t| t.to_vec()).unwrap_or_default();
                self.refuse_command(&tag, Status::Bad, Some("CLIENTBUG"), &text, literal);
            }
        }
    }

    /// The policy view of a command: its mailbox arguments decoded, and where each lies.
    fn command_view(&self, command: &Command) -> Option<(CommandView, Vec<Span>)> {
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
            delayed_ms: 0,
        };
        Some((view, spans))
    }

    /// The bytes to send upstream: the original when nothing changed, else the original with
    /// the changed names re-encoded and, for a collected command, the literals imapgate
    /// answered re-announced in a form the upstream accepts.
    fn outgoing(
        &self,
        command: &Command,
        view: &CommandView,
        spans: &[Span],
        collected: bool,
    ) -> Result<Outgoing, EncodeError> {
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
        if collected {
            let mut literals = Vec::new();
            answered_literals(&command.args, &mut literals);
            for (span, data) in literals {
                if !edits
                    .iter()
                    .any(|e| e.span.start <= span.start && span.end <= e.span.end)
                {
                    edits.push(Edit {
                        span,
                        value: Value::Literal(data.of(&command.raw).to_vec()),
                    });
                }
            }
        }
        if edits.is_empty() {
            return Ok(Outgoing::whole(command.raw.clone()));
        }
        edits.sort_by_key(|e| e.span.start);
        let opts = EncodeOptions {
            literal: if self.upstream_literal_plus() {
                LiteralForm::NonSync
            } else {
                LiteralForm::Sync
            },
            utf8: self.utf8(),
        };
        let encoded = encode::splice(&command.raw, &edits, opts)?;
        let bytes = Bytes::from(encoded.bytes);
        let mut segments = Vec::new();
        let mut at = 0;
        for point in encoded.sync_points {
            segments.push(bytes.slice(at..point));
            at = point;
        }
        segments.push(bytes.slice(at..));
        Ok(Outgoing { segments })
    }

    /// Shows a hooked untagged response to the policies and relays what they leave of it.
    pub(super) fn judge_response(&mut self, set: &PolicySet, response: Response) {
        let kind = response.data_kind().unwrap_or(DataKind::Other);
        let mut slots = Vec::new();
        let mut spans = Vec::new();
        for m in response.mailboxes() {
            let decoded = m
                .token
                .string(&response.raw)
                .and_then(|raw| self.decode_mailbox(&raw));
            let Some(name) = decoded else {
                // A name the upstream encoded wrongly is relayed untouched, not judged.
                self.to_client.push(response.raw);
                return;
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
        self.sync_ctx();
        let verdict = set.on_response(&mut self.ctx, &mut view);
        self.take_decisions();
        match verdict {
            // Reject: a failed hook under on_error = "closed"; never relay the untranslated
            // response (completing its command NO [UNAVAILABLE] is the session's to wire).
            Verdict::Drop | Verdict::Reject { .. } => return,
            Verdict::Close { text } => {
                self.reply_untagged_bye(&text);
                self.push_control(Control::Close { flush: true });
                return;
            }
            _ => {}
        }
        let utf8 = self.utf8();
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
            self.to_client.push(response.raw);
            return;
        }
        edits.sort_by_key(|e| e.span.start);
        let opts = EncodeOptions {
            utf8,
            ..EncodeOptions::SERVER
        };
        match encode::splice(&response.raw, &edits, opts) {
            Ok(encoded) => self.to_client.push(Bytes::from(encoded.bytes)),
            Err(e) => {
                tracing::warn!(error = %e, "a policy rewrite of a response cannot be encoded");
                self.to_client.push(response.raw);
            }
        }
    }
}

/// True when the command was cut at a literal that is one of its mailbox arguments.
fn cut_at_mailbox(command: &Command) -> bool {
    command
        .mailbox_args()
        .iter()
        .any(|m| matches!(m.token, Token::Literal { data: None, .. }))
}

/// Synchronizing literals whose octets are in the message (imapgate answered their `+`).
fn answered_literals(tokens: &[Token], out: &mut Vec<(Span, Span)>) {
    for t in tokens {
        match t {
            Token::Literal {
                span,
                data: Some(data),
                literal,
            } if literal.sync => out.push((*span, *data)),
            Token::List { items, .. } => answered_literals(items, out),
            _ => {}
        }
    }
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
