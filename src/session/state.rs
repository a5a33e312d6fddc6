//! The conversation between one client and the upstream, as imapgate sees it: sans-IO.
//!
//! Bytes from each peer go into its framer ([`Conversation::client_buffer`],
//! [`Conversation::upstream_buffer`]); [`Conversation::client_input`] and
//! [`Conversation::upstream_input`] frame and parse every message, keep the IMAP state, and queue
//! what each peer must receive in [`Conversation::to_upstream`] and [`Conversation::to_client`].
//! What needs the sockets themselves (a TLS handshake, closing) is asked for with a
//! [`Control`]. The I/O driver ([`super::relay`]) does nothing but move bytes and obey; so the
//! whole protocol behaviour is testable on byte slices, and the tests read like transcripts.
//!
//! One rule holds the two readings of the client's bytes together (imapgate's and the
//! upstream's): a mode that changes how later bytes are read begins only when the upstream
//! says so, and until then nothing later is read ([`super::modes`]); commands not valid in the
//! current state are answered here and never forwarded ([`crate::imap::validity`]); and every
//! tagged answer must belong to a command imapgate forwarded ([`super::pending`]).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::modes::{ClientMode, Current, Sasl, Then, Wait};
use super::outbox::Outbox;
use super::pending::{Pending, PendingKind, PendingTags};
use super::waits::{Awaiting, HookWait, PendingHook};
use crate::config::ListenerTls;
use crate::imap::capability::{self, CapabilitySet};
use crate::imap::command::{Command, CommandKind, CommandName, MailboxRole, parse_command};
use crate::imap::encode::{self, EncodeOptions, LiteralForm, ResponseValue, Value};
use crate::imap::framing::{self, Direction, Frame, FrameError, FrameErrorKind, Framer, Literal};
use crate::imap::mutf7;
use crate::imap::response::{DataKind, Response, ResponseKind, Status, parse_response};
use crate::imap::sync_literals::synchronizing_segments;
use crate::imap::validity::{self, ServerOffers};
use crate::policy::{Completed, ConnCtx, ConnInfo, Decision, Hook, Judgement, Policies, Verdict};

pub use crate::imap::validity::ImapState;

/// Longest response line accepted from the upstream. Far above the client limits, because a
/// SEARCH result for a big mailbox is one long line; an upstream is trusted more than a client.
const UPSTREAM_MAX_LINE: usize = 16 * 1024 * 1024;

/// Session-wide settings taken from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listener_tls: ListenerTls,
    pub preauth_line: usize,
    pub line: usize,
    pub literal: u32,
    /// Literals up to this size are held whole; larger ones stream.
    pub inline_literal: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listener_tls: ListenerTls::None,
            preauth_line: 8192,
            line: 65536,
            literal: 64 * 1024 * 1024,
            inline_literal: 64 * 1024,
        }
    }
}

/// Where the client leg is on its way to TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StartTls {
    No,
    /// STARTTLS received; the OK is sent once earlier commands have completed, and the client
    /// is not read meanwhile.
    Waiting(Bytes),
    /// OK sent; the driver runs the handshake.
    Handshake,
}

/// Something only the I/O driver can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Flush `to_client`, then run the TLS handshake on the client socket and call
    /// [`Conversation::client_tls_established`].
    StartTls,
    /// Flush `to_upstream`, then shut down the upstream's write side (the client half-closed).
    ShutdownUpstreamWrite,
    /// Flush `to_client` (when `flush`), then close both connections.
    Close { flush: bool },
}

/// What happened, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A command relayed upstream completed.
    Completed {
        name: CommandName,
        status: Status,
        elapsed: Duration,
    },
    Login {
        ok: bool,
        user: Option<String>,
    },
    ParseError {
        direction: Direction,
        error: String,
    },
    /// A limit or protocol violation by one side, and what was done about it.
    Violation {
        direction: Direction,
        what: String,
    },
    /// A command answered by imapgate (a policy or the proxy itself) instead of the upstream;
    /// `user` is the name a refused LOGIN or AUTHENTICATE gave (never its secret).
    Rejected {
        name: CommandName,
        user: Option<String>,
    },
    /// A command not valid in the current state, answered `BAD` by imapgate.
    Invalid {
        name: CommandName,
    },
    /// A policy hook ran.
    Policy(Decision),
    /// An untagged response was not relayed: a policy dropped it, or it did not match the
    /// client's own LIST pattern.
    Hidden,
    /// The upstream answered something imapgate never sent or asked for: the two read the
    /// client's bytes differently. The session is closed.
    Desync {
        what: &'static str,
    },
}

/// A command a policy asked to delay; when due it is judged again from its original form.
#[derive(Debug)]
pub(super) struct Held {
    pub until: Instant,
    pub command: Command,
    pub literal: Option<Literal>,
    /// When the command was first judged (for `cmd.delayed_ms`).
    pub first_judged: Instant,
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct Conversation {
    settings: Settings,
    pub(super) client_in: Framer,
    upstream_in: Framer,
    pub to_client: Outbox,
    pub to_upstream: Outbox,
    state: ImapState,
    pub(super) mode: ClientMode,
    /// What the upstream must say before more client bytes are read.
    pub(super) wait: Option<Wait>,
    /// The client message whose pieces are being forwarded (it was cut at a streamed literal).
    pub(super) current: Option<Current>,
    pub(super) sasl: Option<Sasl>,
    tls: bool,
    pub(super) pending: PendingTags,
    /// Sequence number of the next command forwarded (tags may repeat, these do not).
    next_seq: u64,
    /// The rest of the current client message is dropped (its command was refused).
    pub(super) discard_client_message: bool,
    starttls: StartTls,
    /// The upstream advertised BINARY (RFC 3516): decides whether `~{n}` literals are valid.
    /// A flag rather than the list: the list was a kilobyte per idle connection.
    upstream_binary: bool,
    user: Option<String>,
    selected: Option<String>,
    utf8: bool,
    upstream_said_bye: bool,
    controls: Vec<Control>,
    pub events: Vec<Event>,
    pub(super) policies: Policies,
    pub(super) ctx: ConnCtx,
    /// A hooked command whose mailbox argument is a literal, being collected whole.
    pub(super) collecting: Option<BytesMut>,
    pub(super) held: Option<Held>,
    /// A message held while a policy hook on it waits for shared state.
    pub(super) awaiting: Option<Awaiting>,
    /// That hook, until the driver takes it to poll.
    pub(super) hook: Option<PendingHook>,
    /// The client closed its side while a command was held: see [`Conversation::client_eof`].
    client_ended: bool,
}

impl Conversation {
    /// Starts a conversation with the upstream's greeting, which is relayed (rewritten) at once.
    pub fn new(
        settings: Settings,
        tls: bool,
        greeting: Bytes,
        policies: Policies,
        info: ConnInfo,
    ) -> Conversation {
        let client_limits = framing::Limits {
            max_line: settings.preauth_line,
            max_id_line: settings.line,
            max_literal: settings.literal,
            inline_literal: settings.inline_literal,
            nonsync_max: None,
        };
        let upstream_limits = framing::Limits {
            max_line: UPSTREAM_MAX_LINE,
            max_id_line: 0,
            max_literal: u32::MAX,
            inline_literal: settings.inline_literal,
            nonsync_max: None,
        };
        let mut conv = Conversation {
            client_in: Framer::new(Direction::Client, client_limits),
            upstream_in: Framer::new(Direction::Server, upstream_limits),
            settings,
            to_client: Outbox::default(),
            to_upstream: Outbox::default(),
            state: ImapState::NotAuthenticated,
            mode: ClientMode::Commands,
            wait: None,
            current: None,
            sasl: None,
            tls,
            pending: PendingTags::default(),
            next_seq: 0,
            discard_client_message: false,
            starttls: StartTls::No,
            upstream_binary: false,
            user: None,
            selected: None,
            utf8: false,
            upstream_said_bye: false,
            controls: Vec::new(),
            events: Vec::new(),
            policies,
            ctx: ConnCtx {
                info,
                ..ConnCtx::default()
            },
            collecting: None,
            held: None,
            awaiting: None,
            hook: None,
            client_ended: false,
        };
        conv.sync_ctx();
        let set = conv.policies.current();
        if set.has_hook(Hook::Connect) {
            let verdict = set.on_connect(&mut conv.ctx);
            conv.take_decisions();
            if let Verdict::Close { text } = verdict {
                // Instead of the greeting: the client never saw the server.
                conv.close_with(None, &text);
                return conv;
            }
        }
        conv.greeting(greeting);
        conv
    }

    /// Brings `ctx` (what policies see) up to date.
    pub(super) fn sync_ctx(&mut self) {
        let state = self.state.as_str();
        let info = &mut self.ctx.info;
        if info.tls == self.tls
            && info.state == state
            && info.user == self.user
            && info.selected == self.selected
        {
            return;
        }
        info.tls = self.tls;
        info.state = state;
        info.user.clone_from(&self.user);
        info.selected.clone_from(&self.selected);
        self.ctx.changed();
    }

    /// Moves what policies decided into the event stream.
    pub(super) fn take_decisions(&mut self) {
        self.events
            .extend(self.ctx.decisions.drain(..).map(Event::Policy));
    }

    /// The connection ends: policies hear of it.
    pub fn disconnect(&mut self) {
        let set = self.policies.current();
        if set.has_hook(Hook::Disconnect) {
            self.sync_ctx();
            set.on_disconnect(&mut self.ctx);
            self.take_decisions();
        }
    }

    /// When a delayed command is due, if one is held.
    pub fn hold_deadline(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.until)
    }

    /// The delayed command is due: it is judged again (the driver calls this at its deadline).
    pub fn release_held(&mut self) {
        if let Some(held) = self.held.take() {
            let set = self.policies.current();
            self.judge_command(&set, held.command, held.literal, held.first_judged);
        }
    }

    pub fn state(&self) -> ImapState {
        self.state
    }

    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn selected(&self) -> Option<&str> {
        self.selected.as_deref()
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn client_buffer(&mut self) -> &mut BytesMut {
        self.client_in.buffer_mut()
    }

    pub fn upstream_buffer(&mut self) -> &mut BytesMut {
        self.upstream_in.buffer_mut()
    }

    /// The receive buffers and the outboxes at once, for the driver's select loop.
    pub fn io_parts(&mut self) -> (&mut BytesMut, &mut BytesMut, &Outbox, &Outbox) {
        (
            self.client_in.buffer_mut(),
            self.upstream_in.buffer_mut(),
            &self.to_client,
            &self.to_upstream,
        )
    }

    /// The next thing only the driver can do, in order.
    pub fn take_control(&mut self) -> Option<Control> {
        if self.controls.is_empty() {
            None
        } else {
            Some(self.controls.remove(0))
        }
    }

    fn closing(&self) -> bool {
        self.controls
            .iter()
            .any(|c| matches!(c, Control::Close { .. }))
    }

    /// Whether the driver should read from the client now: not while the upstream has yet to
    /// confirm how the next bytes are to be read, not while a STARTTLS waits for earlier
    /// commands, a delayed command is held or too many are in flight, not once closing, and
    /// not while the upstream's queue is full.
    pub fn wants_client_input(&self) -> bool {
        self.wait.is_none()
            && self.starttls == StartTls::No
            && self.held.is_none()
            && self.awaiting.is_none()
            && !self.pending.is_full()
            && !self.closing()
            && !self.to_upstream.is_full()
    }

    pub fn wants_upstream_input(&self) -> bool {
        !self.closing() && !self.to_client.is_full() && self.awaiting.is_none()
    }

    /// Octets of a response literal that may go from the upstream's socket straight to the
    /// client's (splice(2)) instead of through this conversation: the upstream is streaming a
    /// literal (imapgate never looks inside streamed literal octets; see
    /// [`Conversation::upstream_input`]), none of it is buffered here, everything before it has
    /// been written to the client, and the upstream may be read now.
    pub fn upstream_passthrough(&self) -> Option<u32> {
        if !self.wants_upstream_input() || !self.to_client.is_empty() {
            return None;
        }
        self.upstream_in.passable()
    }

    /// `n` octets of the streamed response literal went from socket to socket (at most
    /// [`Conversation::upstream_passthrough`]).
    pub fn upstream_passed(&mut self, n: u32) {
        self.upstream_in.passed(n);
    }

    /// Whether the client is in the middle of a message (a line or a literal not yet whole):
    /// the driver acknowledges its bytes at once then (see `net::legs::Ack`).
    pub fn client_mid_message(&self) -> bool {
        self.client_in.is_mid_message() || self.client_in.buffered() > 0
    }

    /// True when no message is half-relayed to the client: a BYE written now is read as a
    /// response by the client.
    pub fn client_at_boundary(&self) -> bool {
        !self.upstream_in.is_mid_message()
    }

    /// Ends the session with `* BYE text` (timeouts, shutdown); if a response is half-relayed the
    /// BYE cannot be placed and the connection is just closed.
    pub fn bye(&mut self, text: &str) {
        self.close_with(None, text);
    }

    /// `* BYE [UNAVAILABLE] text` (when the client can read it), then close: imapgate ends a
    /// session that did nothing wrong (an operator's kick, a connection limit).
    pub fn bye_unavailable(&mut self, text: &str) {
        self.close_with(Some("UNAVAILABLE"), text);
    }

    fn close_with(&mut self, code: Option<&str>, text: &str) {
        if self.closing() {
            return;
        }
        let flush = self.client_at_boundary();
        if flush {
            self.reply(None, Status::Bye, code, text);
        }
        self.controls.push(Control::Close { flush });
    }

    /// The upstream answered what imapgate never sent or asked for. Nothing more of it is
    /// relayed: what it answers was not judged.
    pub(super) fn desync(&mut self, what: &'static str) {
        tracing::warn!(what, "desync between imapgate and the mail server; closing");
        self.events.push(Event::Desync { what });
        self.close_with(
            Some("UNAVAILABLE"),
            "The mail server's answer does not match this session; closing it",
        );
    }

    // ----- greeting -----

    fn greeting(&mut self, greeting: Bytes) {
        let response = match parse_response(greeting.clone()) {
            Ok(r) => r,
            Err(e) => {
                self.events.push(Event::ParseError {
                    direction: Direction::Server,
                    error: e.to_string(),
                });
                self.to_client.push(greeting);
                return;
            }
        };
        if response.status() == Some(Status::Preauth) {
            if self.settings.listener_tls == ListenerTls::Starttls && !self.tls {
                // The client could never reach STARTTLS after PREAUTH.
                self.reply(
                    None,
                    Status::Bye,
                    Some("UNAVAILABLE"),
                    "The mail server pre-authenticated this connection, which this listener cannot relay before TLS",
                );
                self.controls.push(Control::Close { flush: true });
                return;
            }
            self.state = ImapState::Authenticated;
            self.authenticated();
        }
        let out = self.rewrite_capabilities(&response).unwrap_or(greeting);
        self.to_client.push(out);
    }

    // ----- client direction -----

    /// Frames and handles everything buffered from the client.
    pub fn client_input(&mut self) {
        while self.wants_client_input() {
            match self.client_in.next_frame() {
                Ok(Some(frame)) => self.client_frame(frame),
                Ok(None) => break,
                Err(e) => self.client_frame_error(e),
            }
        }
        if self.client_ended && self.held.is_none() && self.awaiting.is_none() {
            self.client_ended = false;
            self.end_of_client();
        }
    }

    fn client_frame(&mut self, frame: Frame) {
        if self.collecting.is_some() {
            return self.collect(frame);
        }
        match frame {
            Frame::Chunk { bytes, last: _ } => {
                if !self.discard_client_message {
                    self.to_upstream.push(bytes);
                }
            }
            Frame::Text {
                bytes,
                start: false,
                literal,
            } => {
                if self.discard_client_message {
                    match literal {
                        None => self.discard_client_message = false,
                        // Nobody will ask for this literal: the command is over.
                        Some(l) if l.sync => {
                            self.client_in.refuse_literal();
                            self.discard_client_message = false;
                        }
                        Some(_) => {}
                    }
                    return;
                }
                self.continue_message(bytes, literal);
            }
            Frame::Text {
                bytes,
                start: true,
                literal,
            } => match self.mode {
                ClientMode::Sasl => self.sasl_line(bytes),
                ClientMode::Idle => self.idle_line(bytes),
                ClientMode::Commands => self.command(bytes, literal),
            },
        }
    }

    fn command(&mut self, bytes: Bytes, literal: Option<Literal>) {
        let command = match parse_command(bytes) {
            Ok(c) => c,
            Err(e) => {
                self.events.push(Event::ParseError {
                    direction: Direction::Client,
                    error: e.to_string(),
                });
                let text = format!("Syntax error: {}", e.error.kind);
                self.refuse(
                    e.tag.as_deref(),
                    Status::Bad,
                    Some("CLIENTBUG"),
                    &text,
                    literal,
                );
                return;
            }
        };
        let binary =
            literal.is_some_and(|l| l.binary) || validity::has_binary_literal(&command.args);
        if let Err(why) = validity::check(self.state, &command, binary, self.offers()) {
            // Not a login attempt, whatever its name: a protocol error, answered here.
            self.events.push(Event::Invalid { name: command.name });
            let tag = command.tag().to_vec();
            let text = why.to_string();
            return self.refuse(Some(&tag), Status::Bad, Some("CLIENTBUG"), &text, literal);
        }
        let command = match command.name.kind {
            CommandKind::Id => match self.screen_id(command, literal) {
                Some(command) => command,
                None => return,
            },
            _ => command,
        };
        match command.name.kind {
            CommandKind::Starttls => return self.starttls(&command),
            CommandKind::Compress => {
                return self.refuse_command(
                    &command,
                    Status::No,
                    Some("CANNOT"),
                    "COMPRESS is not available through this proxy",
                    literal,
                );
            }
            _ => {}
        }
        if self.policies.peek().hooks_command(command.name) {
            let set = self.policies.current();
            return self.judge_command(&set, command, literal, Instant::now());
        }
        let raw = command.raw.clone();
        self.forward(&command, raw, literal);
    }

    /// An ID as the upstream may see it: without the fields a server believes only from a
    /// proxy (`x-originating-ip` and kin), which a client must not be able to claim in
    /// imapgate's name. A field name in a synchronizing literal would reach the server before
    /// imapgate could read it, so such an ID is refused. `None`: answered here.
    fn screen_id(&mut self, command: Command, literal: Option<Literal>) -> Option<Command> {
        if literal.is_some() {
            self.events.push(Event::Invalid { name: command.name });
            let tag = command.tag().to_vec();
            let text = validity::Invalid::IdSyncLiteral.to_string();
            self.refuse(Some(&tag), Status::Bad, Some("CLIENTBUG"), &text, literal);
            return None;
        }
        let Some(fields) = validity::id_without_proxy_fields(&command) else {
            return Some(command);
        };
        self.events.push(Event::Violation {
            direction: Direction::Client,
            what: "ID fields reserved for proxies removed".into(),
        });
        let list = if fields.is_empty() {
            Value::Nil
        } else {
            Value::List(
                fields
                    .into_iter()
                    .flat_map(|(key, value)| {
                        [Value::String(key), value.map_or(Value::Nil, Value::String)]
                    })
                    .collect(),
            )
        };
        let opts = EncodeOptions {
            literal: LiteralForm::Sync,
            utf8: false,
        };
        let rewritten = encode::command(command.tag(), b"ID", &[list], opts)
            .ok()
            .and_then(|e| parse_command(Bytes::from(e.bytes)).ok());
        if rewritten.is_none() {
            // Fail closed: what cannot be re-encoded is not forwarded.
            let tag = command.tag().to_vec();
            self.refuse(
                Some(&tag),
                Status::Bad,
                Some("CLIENTBUG"),
                "Unusable ID",
                None,
            );
        }
        rewritten
    }

    /// What the upstream offers that decides whether a command is valid.
    fn offers(&self) -> ServerOffers {
        ServerOffers {
            binary: self.upstream_binary,
        }
    }

    /// Relays a command (as `out`, which may differ from `command` when a policy rewrote it),
    /// after noting what its completion will mean. `literal` is the literal `out` ends with
    /// when the command was cut at one (its octets still to come from the client).
    pub(super) fn forward(
        &mut self,
        command: &Command,
        out: Bytes,
        literal: Option<Literal>,
    ) -> u64 {
        let kind = match command.name.kind {
            CommandKind::Login => PendingKind::Login {
                user: command.arg_string(0).map(|u| lossy(&u)),
            },
            CommandKind::Authenticate => PendingKind::Authenticate {
                user: super::modes::sasl_initial_user(command),
            },
            CommandKind::Idle => PendingKind::Idle,
            CommandKind::Select | CommandKind::Examine => PendingKind::Select {
                mailbox: self.first_mailbox(command).unwrap_or_default(),
            },
            CommandKind::Close | CommandKind::Unselect => PendingKind::Unselect,
            CommandKind::Logout => PendingKind::Logout,
            CommandKind::Enable => PendingKind::Enable,
            _ => PendingKind::Other,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        // A copy, not a slice: a slice would keep the whole read buffer the command came in
        // alive for as long as the command is pending (an IDLE: hours).
        let tag = Bytes::copy_from_slice(command.tag());
        let end = super::modes::then_at_end(command.name.kind);
        if command.name.kind == CommandKind::Authenticate {
            self.sasl = Some(Sasl::new(seq, command));
        }
        self.pending
            .push(Pending::new(seq, tag, command.name, kind));
        self.send_piece(Current { seq, end }, out, literal);
        seq
    }

    /// A later piece of the message being forwarded (after a streamed literal's octets).
    fn continue_message(&mut self, bytes: Bytes, literal: Option<Literal>) {
        match self.current.clone() {
            Some(current) => self.send_piece(current, bytes, literal),
            None => {
                // Only a message imapgate began forwarding has later pieces.
                self.events.push(Event::Violation {
                    direction: Direction::Client,
                    what: "a message piece outside any command".into(),
                });
                self.close_with(None, "Internal error");
            }
        }
    }

    /// Sends one piece of a client message upstream, cut so that every literal's octets go
    /// only after the upstream's `+`, and notes what to wait for.
    fn send_piece(&mut self, current: Current, piece: Bytes, literal: Option<Literal>) {
        let segments = synchronizing_segments(piece);
        self.to_upstream.push(segments.first);
        let then = match literal {
            Some(l) => Then::LiteralData {
                client_waits: l.sync,
            },
            None => current.end,
        };
        self.current = literal.is_some().then(|| current.clone());
        self.wait = Wait::new(current.seq, segments.rest, then);
    }

    fn first_mailbox(&self, command: &Command) -> Option<String> {
        let arg = command
            .mailbox_args()
            .into_iter()
            .find(|m| m.role == MailboxRole::Mailbox)?;
        let raw = arg.token.string(&command.raw)?;
        self.decode_mailbox(&raw)
    }

    pub(super) fn decode_mailbox(&self, raw: &[u8]) -> Option<String> {
        if self.utf8 {
            std::str::from_utf8(raw).ok().map(str::to_owned)
        } else {
            mutf7::decode(raw).ok()
        }
    }

    /// STARTTLS on the client leg is imapgate's own: never relayed.
    fn starttls(&mut self, command: &Command) {
        let tag = Bytes::copy_from_slice(command.tag());
        if self.settings.listener_tls != ListenerTls::Starttls || self.tls {
            let text = if self.tls {
                "TLS is already active"
            } else {
                "STARTTLS is not offered on this listener"
            };
            self.reply(Some(&tag), Status::Bad, Some("CLIENTBUG"), text);
            return;
        }
        if self.client_in.buffered() > 0 {
            // Anything pipelined behind STARTTLS would be read as if it came over TLS.
            self.events.push(Event::Violation {
                direction: Direction::Client,
                what: "bytes after STARTTLS before the TLS handshake".into(),
            });
            self.controls.push(Control::Close { flush: false });
            return;
        }
        self.starttls = StartTls::Waiting(tag);
        self.maybe_start_tls();
    }

    fn maybe_start_tls(&mut self) {
        if !self.pending.is_empty() {
            return;
        }
        if let StartTls::Waiting(tag) = &self.starttls {
            let tag = tag.clone();
            self.reply(Some(&tag), Status::Ok, None, "Begin TLS negotiation now");
            self.controls.push(Control::StartTls);
            self.starttls = StartTls::Handshake;
        }
    }

    /// The TLS handshake on the client leg succeeded: nothing of the plaintext session is kept
    /// (RFC 9051 section 11.1: the client must discard cached capabilities, and so do we).
    pub fn client_tls_established(&mut self) {
        self.tls = true;
        self.starttls = StartTls::No;
        self.client_in = Framer::new(Direction::Client, self.client_in.limits());
        self.mode = ClientMode::Commands;
        self.discard_client_message = false;
        self.user = None;
    }

    /// The server name the client asked for in its STARTTLS handshake: `ctx.sni` from now on
    /// (an implicit-TLS connection has it from the start).
    pub fn client_sni(&mut self, sni: Option<&str>) {
        if self.ctx.info.sni.as_deref() != sni {
            self.ctx.info.sni = sni.map(str::to_owned);
            self.ctx.changed();
        }
    }

    /// Refuses a parsed command with a tagged answer of imapgate's own.
    pub(super) fn refuse_command(
        &mut self,
        command: &Command,
        status: Status,
        code: Option<&str>,
        text: &str,
        literal: Option<Literal>,
    ) {
        self.events.push(Event::Rejected {
            name: command.name,
            user: login_user(command),
        });
        let tag = command.tag().to_vec();
        self.refuse(Some(&tag), status, code, text, literal);
    }

    pub(super) fn reply_untagged_bye(&mut self, text: &str) {
        self.reply(None, Status::Bye, None, text);
    }

    /// `+ text`: imapgate itself asks the client for a literal it collects.
    pub(super) fn reply_continuation(&mut self, text: &str) {
        let value = ResponseValue::Continuation {
            text: text.as_bytes().to_vec(),
        };
        if let Ok(encoded) = encode::response(&value) {
            self.to_client.push(Bytes::from(encoded.bytes));
        }
    }

    pub(super) fn push_control(&mut self, control: Control) {
        self.controls.push(control);
    }

    pub(super) fn client_line_limit(&self) -> usize {
        self.client_in.limits().max_line
    }

    pub(super) fn utf8(&self) -> bool {
        self.utf8
    }

    /// Refuses a command with a tagged answer of imapgate's own. If the command announced a
    /// literal, its octets are dropped: a synchronizing one is never sent (no `+` came), a
    /// non-synchronizing one is skipped as it arrives.
    pub(super) fn refuse(
        &mut self,
        tag: Option<&[u8]>,
        status: Status,
        code: Option<&str>,
        text: &str,
        literal: Option<Literal>,
    ) {
        let tag = tag.filter(|t| !t.is_empty());
        self.reply(tag, status, code, text);
        match literal {
            Some(l) if l.sync => self.client_in.refuse_literal(),
            Some(_) => self.discard_client_message = true,
            None => {}
        }
    }

    fn client_frame_error(&mut self, e: FrameError) {
        let tag = e.tag.clone();
        let tag = tag.as_deref();
        self.events.push(Event::Violation {
            direction: Direction::Client,
            what: e.to_string(),
        });
        let mut close = e.mid_message;
        match e.kind {
            FrameErrorKind::LineTooLong { limit } => {
                let text = format!("Command line longer than {limit} octets");
                self.reply(tag, Status::Bad, Some("LIMIT"), &text);
                close |= self.state == ImapState::NotAuthenticated;
            }
            FrameErrorKind::LiteralTooBig { limit, sync, .. } => {
                let text = format!("Literal larger than the limit of {limit} octets");
                self.reply(tag, Status::No, Some("TOOBIG"), &text);
                close |= !sync;
            }
            FrameErrorKind::LiteralOverflow { sync } => {
                self.reply(
                    tag,
                    Status::No,
                    Some("TOOBIG"),
                    "Literal length out of range",
                );
                close |= !sync;
            }
            FrameErrorKind::NonSyncTooBig { limit, .. } => {
                let text = format!("Non-synchronizing literal larger than {limit} octets");
                self.reply(tag, Status::No, Some("TOOBIG"), &text);
                close = true;
            }
            FrameErrorKind::BareLf | FrameErrorKind::Nul => {
                let text = format!("Invalid command line: {}", e.kind);
                self.reply(tag, Status::Bad, Some("CLIENTBUG"), &text);
            }
        }
        if close {
            self.reply(
                None,
                Status::Bye,
                None,
                "Closing the connection after a protocol error",
            );
            self.controls.push(Control::Close { flush: true });
        }
    }

    /// The client closed its sending side.
    pub fn client_eof(&mut self) {
        if self.held.is_some() || self.awaiting.is_some() {
            // A command held for its policies (and what the client sent after it) is still
            // owed its answer: a client that half-closed its side reads on. The end is
            // decided once nothing is held any more.
            self.client_ended = true;
            return;
        }
        self.end_of_client();
    }

    fn end_of_client(&mut self) {
        if self.client_in.is_mid_message() || self.client_in.buffered() > 0 {
            // Half a command reached (or would reach) the upstream: end both legs.
            self.controls.push(Control::Close { flush: false });
        } else {
            self.controls.push(Control::ShutdownUpstreamWrite);
        }
    }

    // ----- upstream direction -----

    /// Frames and handles everything buffered from the upstream.
    pub fn upstream_input(&mut self) {
        while self.wants_upstream_input() {
            match self.upstream_in.next_frame() {
                Ok(Some(frame)) => self.upstream_frame(frame),
                Ok(None) => break,
                Err(e) => {
                    self.events.push(Event::Violation {
                        direction: Direction::Server,
                        what: e.to_string(),
                    });
                    let flush = !e.mid_message;
                    if flush {
                        self.reply(
                            None,
                            Status::Bye,
                            Some("UNAVAILABLE"),
                            "The mail server sent an invalid response",
                        );
                    }
                    self.controls.push(Control::Close { flush });
                }
            }
        }
        // A response may have ended a wait: frame what the client sent meanwhile.
        self.client_input();
    }

    fn upstream_frame(&mut self, frame: Frame) {
        let bytes = match frame {
            Frame::Text {
                bytes, start: true, ..
            } => bytes,
            Frame::Text { bytes, .. } | Frame::Chunk { bytes, .. } => {
                self.to_client.push(bytes);
                return;
            }
        };
        let response = match parse_response(bytes.clone()) {
            Ok(r) => r,
            Err(e) => return self.unparsable_response(bytes, e.to_string()),
        };
        match &response.kind {
            ResponseKind::Continuation { .. } => self.continuation(response),
            ResponseKind::Status { tag: Some(_), .. } => self.tagged(response),
            ResponseKind::Status {
                tag: None,
                status: Status::Bye,
                ..
            } => {
                self.upstream_said_bye = true;
                self.to_client.push(bytes);
            }
            ResponseKind::Data { kind, .. } if self.policies.peek().hooks_response(*kind) => {
                let set = self.policies.current();
                self.untagged_for_policies(&set, response);
            }
            ResponseKind::Data {
                kind: DataKind::Enabled,
                args,
                ..
            } => {
                if args.iter().any(|a| a.is_atom(&response.raw, "UTF8=ACCEPT")) {
                    self.utf8 = true;
                }
                self.to_client.push(bytes);
            }
            _ => {
                let out = self.rewrite_capabilities(&response).unwrap_or(bytes);
                self.to_client.push(out);
            }
        }
    }

    /// A response that does not parse. Its tag, if it has one, must still answer a command
    /// imapgate sent; untagged, it is relayed raw (lenient in), unless a policy judges
    /// responses: then what it could not see is not shown (fail closed).
    fn unparsable_response(&mut self, bytes: Bytes, error: String) {
        self.events.push(Event::ParseError {
            direction: Direction::Server,
            error,
        });
        let tag = framing::tag_of(&bytes).filter(|t| *t != b"*" && *t != b"+");
        if tag.is_some() || bytes.starts_with(b"+") {
            // A tagged answer or a continuation that cannot be read: no way to know which
            // command it ends or what it asks for.
            return self.desync("an unreadable tagged response or continuation request");
        }
        if self.policies.peek().has_hook(Hook::Response) {
            self.fail_owner(false);
            self.events.push(Event::Hidden);
            return;
        }
        self.to_client.push(bytes);
    }

    /// A policy could not judge an untagged response: the command it belongs to (the oldest
    /// LIST/LSUB in flight for a LIST entry, else the oldest command) completes
    /// `NO [UNAVAILABLE]`.
    pub(super) fn fail_owner(&mut self, list_entry: bool) {
        let owner = if list_entry {
            self.pending.oldest_list_mut()
        } else {
            self.pending.oldest_mut()
        };
        if let Some(owner) = owner {
            owner.failed = true;
        }
    }

    fn tagged(&mut self, response: Response) {
        let status = response.status().unwrap_or(Status::Bad);
        let tag = response.tag().unwrap_or_default();
        let Some(mut pending) = self.pending.take(tag) else {
            return self.desync("a tagged response to a command imapgate never forwarded");
        };
        self.end_modes_of(&pending);
        if let Some(inbox) = pending.held_inbox.take() {
            let set = self.policies.current();
            let mut filter = pending.list_filter.take();
            if self.judge_untagged(&set, *inbox, filter.as_deref_mut())
                == super::judge::Judged::Failed
            {
                pending.failed = true;
            }
        }
        self.complete(&pending, status);
        if !self.policies.peek().hooks_complete(pending.name.label()) {
            return self.completion_judged(&pending, response, Verdict::Pass);
        }
        let set = self.policies.current();
        self.sync_ctx();
        let done = Completed {
            tag: String::from_utf8_lossy(tag).into_owned(),
            name: pending.name.label(),
            status,
            code: response
                .code_name()
                .map(|c| String::from_utf8_lossy(c).to_ascii_uppercase()),
        };
        match set.judge_complete(&mut self.ctx, done) {
            Judgement::Ready(verdict, _) => {
                self.take_decisions();
                self.completion_judged(&pending, response, verdict);
            }
            Judgement::Waiting(waiting) => self.wait_for_hook(
                Awaiting::Complete {
                    pending: Box::new(pending),
                    response,
                },
                HookWait::Complete(waiting),
            ),
        }
    }

    /// Relays a tagged response once the policies judged its completion: imapgate's
    /// `NO [UNAVAILABLE]` instead when a policy could not judge a response of its command.
    pub(super) fn completion_judged(
        &mut self,
        pending: &Pending,
        response: Response,
        verdict: Verdict,
    ) {
        if pending.failed {
            self.reply(
                Some(&pending.tag),
                Status::No,
                Some("UNAVAILABLE"),
                "Policy check failed, try again later",
            );
        } else {
            let out = self
                .rewrite_capabilities(&response)
                .unwrap_or_else(|| response.raw.clone());
            self.to_client.push(out);
        }
        if let Verdict::Close { text } = verdict {
            return self.close_with(None, &text);
        }
        self.maybe_start_tls();
    }

    fn complete(&mut self, pending: &Pending, status: Status) {
        let ok = status == Status::Ok;
        match &pending.kind {
            PendingKind::Login { user } | PendingKind::Authenticate { user } if pending.refused => {
                // A policy refused it (imapgate's answer): a refused login, not a command.
                self.events.push(Event::Rejected {
                    name: pending.name,
                    user: user.clone(),
                });
                return;
            }
            PendingKind::Login { user } | PendingKind::Authenticate { user } => {
                if ok {
                    self.state = ImapState::Authenticated;
                    self.user.clone_from(user);
                    self.authenticated();
                }
                self.events.push(Event::Login {
                    ok,
                    user: user.clone(),
                });
            }
            PendingKind::Select { mailbox } => {
                if ok {
                    self.state = ImapState::Selected;
                    self.selected = Some(mailbox.clone());
                } else if self.state == ImapState::Selected {
                    // A failed SELECT leaves no mailbox selected (RFC 9051 6.3.2).
                    self.state = ImapState::Authenticated;
                    self.selected = None;
                }
            }
            PendingKind::Unselect if ok => {
                self.state = ImapState::Authenticated;
                self.selected = None;
            }
            PendingKind::Logout => self.state = ImapState::Logout,
            _ => {}
        }
        self.events.push(Event::Completed {
            name: pending.name,
            status,
            elapsed: pending.started.elapsed(),
        });
    }

    /// The `on_login` verdict of the policies for a login imapgate reads itself (routing;
    /// also `imapgate replay`).
    pub fn judge_login(&mut self, login: &crate::policy::LoginView) -> Verdict {
        let set = self.policies.current();
        self.sync_ctx();
        let verdict = set.on_login(&mut self.ctx, login);
        self.take_decisions();
        verdict
    }

    /// Like [`Conversation::judge_login`], for the proxy: the hook may wait for shared state
    /// (the caller awaits it, then hands its decisions to [`Conversation::hook_decisions`]).
    pub fn judge_login_waiting(
        &mut self,
        login: &crate::policy::LoginView,
    ) -> Judgement<crate::policy::LoginView> {
        let set = self.policies.current();
        self.sync_ctx();
        let judged = set.judge_login(&mut self.ctx, login.clone());
        self.take_decisions();
        judged
    }

    /// What the policies decided in a hook that waited outside the conversation.
    pub fn hook_decisions(&mut self, decisions: Vec<Decision>) {
        self.events.extend(decisions.into_iter().map(Event::Policy));
    }

    /// Whether a policy decides where logins go.
    pub fn has_login_hook(&self) -> bool {
        self.policies.peek().has_hook(Hook::Login)
    }

    /// The login in flight with this tag was refused by a policy (routing): its answer is
    /// imapgate's, and it counts as refused, not failed.
    pub(super) fn mark_login_refused(&mut self, tag: &[u8]) {
        if let Some(p) = self.pending.by_tag_mut(tag) {
            p.refused = true;
        }
    }

    /// After authentication the longer line limit applies.
    fn authenticated(&mut self) {
        let mut limits = self.client_in.limits();
        limits.max_line = self.settings.line;
        self.client_in.set_limits(limits);
    }

    /// The upstream closed its side.
    pub fn upstream_eof(&mut self) {
        if self.upstream_said_bye || self.state == ImapState::Logout {
            self.controls.push(Control::Close { flush: true });
            return;
        }
        let flush = !self.upstream_in.is_mid_message();
        if flush {
            self.reply(
                None,
                Status::Bye,
                Some("UNAVAILABLE"),
                "The connection to the mail server was lost",
            );
        }
        self.controls.push(Control::Close { flush });
    }

    /// The commands that will never complete because the connection ends.
    pub fn abandon_pending(&mut self) -> Vec<Pending> {
        self.pending.drain().collect()
    }

    // ----- capabilities -----

    /// The response with its capability list filtered, if it has one.
    fn rewrite_capabilities(&mut self, response: &Response) -> Option<Bytes> {
        let mut caps = CapabilitySet::from_response(response)?;
        // What the upstream itself offers, read before the list is filtered for the client.
        let literal_minus_only = caps.has("LITERAL-") && !caps.has("LITERAL+");
        let binary = caps.has("BINARY");
        caps.strip_unrelayable();
        if self.settings.listener_tls == ListenerTls::Starttls && !self.tls {
            caps.add("STARTTLS");
        }
        let set = self.policies.current();
        if set.has_hook(Hook::Capability) {
            self.sync_ctx();
            let verdict = set.on_capability(&mut self.ctx, &mut caps);
            self.take_decisions();
            if let Verdict::Close { text } = verdict {
                // The response is not relayed: the capabilities it lists were not judged.
                self.close_with(None, &text);
                return Some(Bytes::new());
            }
        }
        let mut limits = self.client_in.limits();
        limits.nonsync_max = literal_minus_only.then_some(4096);
        self.client_in.set_limits(limits);
        self.upstream_binary = binary;
        capability::rewrite(response, &caps)?.ok().map(Bytes::from)
    }

    // ----- replies of imapgate's own -----

    /// Queues a status response of imapgate's own for the client, encoded from values.
    pub(super) fn reply(
        &mut self,
        tag: Option<&[u8]>,
        status: Status,
        code: Option<&str>,
        text: &str,
    ) {
        let tag = tag.filter(|t| *t != b"*" && *t != b"+");
        let value = ResponseValue::Status {
            tag: tag.map(<[u8]>::to_vec),
            status,
            code: code.map(|c| (c.as_bytes().to_vec(), Vec::new())),
            text: text.as_bytes().to_vec(),
        };
        match encode::response(&value) {
            Ok(encoded) => self.to_client.push(Bytes::from(encoded.bytes)),
            Err(_) => {
                // Only a tag could be invalid here (text and codes are ours): answer untagged.
                let untagged = ResponseValue::Status {
                    tag: None,
                    status,
                    code: None,
                    text: text.as_bytes().to_vec(),
                };
                if let Ok(encoded) = encode::response(&untagged) {
                    self.to_client.push(Bytes::from(encoded.bytes));
                }
            }
        }
    }
}

/// A name the client gave, for logs and policies; never a secret.
pub(super) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The user a LOGIN or AUTHENTICATE names (AUTHENTICATE: in a SASL initial response), for
/// logs and policies; never the secret.
pub(super) fn login_user(command: &Command) -> Option<String> {
    match command.name.kind {
        CommandKind::Login => command.arg_string(0).map(|u| lossy(&u)),
        CommandKind::Authenticate => super::modes::sasl_initial_user(command),
        _ => None,
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "one_reading_tests.rs"]
mod one_reading_tests;
