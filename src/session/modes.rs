//! How the client's next bytes are read, and who says so: the upstream.
//!
//! Three things change how the bytes after a command are read: a literal's octets, IDLE (the
//! next line is `DONE`) and AUTHENTICATE (the next lines are SASL responses). Each begins only
//! on the upstream's `+`. Until that `+` (or the command's tagged answer) arrives, imapgate
//! reads nothing more from the client ([`Wait`]); an honest client waits for the `+` anyway, so
//! this costs nothing. When the upstream answers with a tagged NO or BAD instead, the mode
//! never began: the bytes held are read as commands, exactly as the upstream reads them.
//!
//! Commands that change the connection's state or how later commands are read (LOGIN,
//! AUTHENTICATE, ENABLE, SELECT, EXAMINE, CLOSE, UNSELECT, LOGOUT) wait the same way for their
//! tagged answer: what follows them is judged in the state they leave behind.

use std::collections::VecDeque;

use base64::Engine as _;
use bytes::Bytes;

use super::state::{Conversation, Event};
use crate::imap::command::{self, ClientLine, Command, CommandKind};
use crate::imap::framing::Direction;
use crate::imap::response::Response;

/// What the next client line is, when it starts a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMode {
    Commands,
    /// After the upstream's `+` to AUTHENTICATE: one SASL response.
    Sasl,
    /// After the upstream's `+` to IDLE: the line is `DONE`.
    Idle,
}

/// What the upstream's next `+` means once the segments are out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing more: no `+` is expected.
    Done,
    /// The octets of the literal announced last may follow; `client_waits` when the client
    /// sent `{n}` and waits for this `+` itself (otherwise imapgate made the literal
    /// synchronizing and keeps the `+`).
    LiteralData { client_waits: bool },
    /// IDLE: `+` means idling; the next client line is DONE.
    Idle,
    /// AUTHENTICATE: `+` asks for a SASL response.
    Sasl,
    /// No `+` is expected, and the client is read again only after the tagged answer.
    Completion,
}

/// What the conversation waits for from the upstream before it reads more client bytes.
#[derive(Clone, Debug)]
pub struct Wait {
    /// The command waited on.
    pub seq: u64,
    /// Pieces of its message still to send, one after each `+` (imapgate keeps those `+`).
    pub segments: VecDeque<Bytes>,
    pub then: Then,
}

impl Wait {
    pub fn new(seq: u64, segments: VecDeque<Bytes>, then: Then) -> Option<Wait> {
        (!segments.is_empty() || then != Then::Done).then_some(Wait {
            seq,
            segments,
            then,
        })
    }
}

/// The client message being forwarded piece by piece (cut at streamed literals).
#[derive(Clone, Debug)]
pub struct Current {
    pub seq: u64,
    /// What to wait for once its last piece is out.
    pub end: Then,
}

/// What to wait for after the last piece of a command.
pub fn then_at_end(kind: CommandKind) -> Then {
    match kind {
        CommandKind::Idle => Then::Idle,
        CommandKind::Authenticate => Then::Sasl,
        CommandKind::Login
        | CommandKind::Enable
        | CommandKind::Select
        | CommandKind::Examine
        | CommandKind::Close
        | CommandKind::Unselect
        | CommandKind::Logout => Then::Completion,
        _ => Then::Done,
    }
}

/// SASL mechanisms whose exchange names the user; the user is read, the secret is not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mechanism {
    /// RFC 4616: `[authzid] NUL authcid NUL passwd`.
    Plain,
    /// The de-facto LOGIN mechanism: the first response is the user name.
    Login,
    /// Google's XOAUTH2: `user=NAME ^A auth=Bearer TOKEN ^A ^A`.
    XOauth2,
    /// RFC 7628: a GS2 header `n,a=NAME,` then `^A`-separated fields.
    OauthBearer,
    Other,
}

impl Mechanism {
    fn from_name(name: &[u8]) -> Mechanism {
        [
            (&b"PLAIN"[..], Mechanism::Plain),
            (b"LOGIN", Mechanism::Login),
            (b"XOAUTH2", Mechanism::XOauth2),
            (b"OAUTHBEARER", Mechanism::OauthBearer),
        ]
        .into_iter()
        .find(|(n, _)| name.eq_ignore_ascii_case(n))
        .map_or(Mechanism::Other, |(_, m)| m)
    }

    /// The user named by one decoded client response.
    fn user_in(self, decoded: &[u8]) -> Option<String> {
        let user: &[u8] = match self {
            Mechanism::Plain => {
                let mut fields = decoded.split(|&b| b == 0);
                let _authzid = fields.next()?;
                fields.next()?
            }
            Mechanism::Login => decoded,
            Mechanism::XOauth2 => decoded
                .split(|&b| b == 1)
                .find_map(|f| f.strip_prefix(b"user="))?,
            Mechanism::OauthBearer => {
                let header = decoded.split(|&b| b == 1).next()?;
                let authzid = header
                    .split(|&b| b == b',')
                    .find_map(|f| f.strip_prefix(b"a="))?;
                // RFC 5801 saslname: "=2C" and "=3D" stand for "," and "=". An empty one
                // (`n,a=,`) names nobody, as an empty XOAUTH2 `user=` does: not a user "".
                return std::str::from_utf8(authzid)
                    .ok()
                    .map(|s| s.replace("=2C", ",").replace("=3D", "="))
                    .filter(|u| !u.is_empty());
            }
            Mechanism::Other => return None,
        };
        std::str::from_utf8(user)
            .ok()
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
    }
}

fn decode(b64: &[u8]) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// An AUTHENTICATE exchange in progress.
#[derive(Clone, Debug)]
pub struct Sasl {
    seq: u64,
    mechanism: Mechanism,
    /// The user is known (from the initial response or an earlier line).
    user_known: bool,
}

impl Sasl {
    pub fn new(seq: u64, command: &Command) -> Sasl {
        Sasl {
            seq,
            mechanism: command
                .arg_string(0)
                .map_or(Mechanism::Other, |m| Mechanism::from_name(&m)),
            user_known: sasl_initial_user(command).is_some(),
        }
    }
}

/// The user a decoded SASL response of `mechanism` names (the first response: PLAIN's
/// authcid, LOGIN's user name, XOAUTH2's `user=`, OAUTHBEARER's `a=`).
pub fn user_in_sasl(mechanism: &str, decoded: &[u8]) -> Option<String> {
    Mechanism::from_name(mechanism.as_bytes()).user_in(decoded)
}

/// The user named by AUTHENTICATE's initial response (SASL-IR, RFC 4959), if any.
pub fn sasl_initial_user(command: &Command) -> Option<String> {
    let mechanism = Mechanism::from_name(&command.arg_string(0)?);
    let ir = command.arg_string(1)?;
    if &*ir == b"=" {
        return None;
    }
    mechanism.user_in(&decode(&ir)?)
}

impl Conversation {
    /// The upstream sent `+`.
    pub(super) fn continuation(&mut self, response: Response) {
        let Some(wait) = self.wait.as_mut() else {
            return self.desync("a continuation request nobody asked for");
        };
        if let Some(next) = wait.segments.pop_front() {
            // The `+` for a literal imapgate made synchronizing: the client did not ask.
            if wait.segments.is_empty() && wait.then == Then::Done {
                self.wait = None;
            }
            self.to_upstream.push(next);
            return;
        }
        match wait.then {
            Then::LiteralData { client_waits } => {
                if client_waits {
                    self.to_client.push(response.raw);
                }
            }
            Then::Idle => {
                self.enter(ClientMode::Idle);
                self.to_client.push(response.raw);
            }
            Then::Sasl => {
                self.enter(ClientMode::Sasl);
                self.to_client.push(response.raw);
            }
            Then::Done | Then::Completion => {
                return self.desync("a continuation request nobody asked for");
            }
        }
        self.wait = None;
    }

    fn enter(&mut self, mode: ClientMode) {
        self.mode = mode;
        self.client_in.set_line_only(mode != ClientMode::Commands);
    }

    /// The tagged answer of `pending` arrived: whatever it was waiting for is over. A literal
    /// the upstream never asked for is not sent: if the client waits for a `+` it will not
    /// send the octets (its next bytes are commands), if it sent `{n+}` they are dropped.
    pub(super) fn end_modes_of(&mut self, pending: &super::pending::Pending) {
        if let Some(wait) = self.wait.take_if(|w| w.seq == pending.seq) {
            if let Then::LiteralData { client_waits } = wait.then {
                if client_waits {
                    self.client_in.refuse_literal();
                } else {
                    self.discard_client_message = true;
                }
            }
            self.current = None;
        }
        if self.current.as_ref().is_some_and(|c| c.seq == pending.seq) {
            self.current = None;
        }
        let ends_mode = match self.mode {
            ClientMode::Idle => pending.name.kind == CommandKind::Idle,
            ClientMode::Sasl => pending.name.kind == CommandKind::Authenticate,
            ClientMode::Commands => false,
        };
        if ends_mode {
            self.enter(ClientMode::Commands);
        }
        if self.sasl.as_ref().is_some_and(|s| s.seq == pending.seq) {
            self.sasl = None;
        }
    }

    /// One SASL response, after the upstream's `+`. It is relayed, never kept or logged;
    /// only the user it names is read. The next line waits for the next `+` again.
    pub(super) fn sasl_line(&mut self, bytes: Bytes) {
        let Some(sasl) = self.sasl.clone() else {
            return self.desync("a SASL response outside AUTHENTICATE");
        };
        match command::parse_sasl_line(&bytes) {
            Ok(ClientLine::Sasl { cancel: false }) if !sasl.user_known => {
                let line = bytes.strip_suffix(b"\r\n").unwrap_or(&bytes);
                let user = decode(line).and_then(|d| sasl.mechanism.user_in(&d));
                if let Some(user) = user {
                    if let Some(s) = self.sasl.as_mut() {
                        s.user_known = true;
                    }
                    if let Some(p) = self.pending.get_mut(sasl.seq) {
                        p.kind = super::pending::PendingKind::Authenticate { user: Some(user) };
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Relayed all the same: the upstream ends the exchange with its own BAD.
                self.events.push(Event::ParseError {
                    direction: Direction::Client,
                    error: format!("SASL response: {}", e.kind),
                });
            }
        }
        self.enter(ClientMode::Commands);
        self.to_upstream.push(bytes);
        self.wait = Wait::new(sasl.seq, VecDeque::new(), Then::Sasl);
    }

    /// The line that ends IDLE. Only `DONE` is relayed: anything else is answered here and
    /// replaced by a `DONE` of imapgate's own, so the upstream never reads it as a command.
    pub(super) fn idle_line(&mut self, bytes: Bytes) {
        self.enter(ClientMode::Commands);
        if command::parse_done(&bytes) == Ok(ClientLine::Done) {
            self.to_upstream.push(bytes);
            return;
        }
        self.events.push(Event::Violation {
            direction: Direction::Client,
            what: "a line other than DONE during IDLE".into(),
        });
        self.reply(
            None,
            crate::imap::response::Status::Bad,
            Some("CLIENTBUG"),
            "Expected DONE to end IDLE",
        );
        self.to_upstream.push(Bytes::from_static(b"DONE\r\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::user_in_sasl;

    #[test]
    fn oauth_responses_name_their_user() {
        // XOAUTH2: user=NAME ^A auth=Bearer TOKEN ^A ^A
        let xoauth2 = b"user=alice@example.org\x01auth=Bearer t0k3n\x01\x01";
        assert_eq!(
            user_in_sasl("XOAUTH2", xoauth2).as_deref(),
            Some("alice@example.org")
        );
        // OAUTHBEARER (RFC 7628 section 4.1): the GS2 header's authzid, host and port after.
        let bearer = b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01\
                       auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01";
        assert_eq!(
            user_in_sasl("oauthbearer", bearer).as_deref(),
            Some("user@example.com")
        );
        // RFC 5801 escapes in the authzid.
        assert_eq!(
            user_in_sasl("OAUTHBEARER", b"n,a=a=2Cb=3Dc,\x01auth=Bearer x\x01\x01").as_deref(),
            Some("a,b=c")
        );
    }

    #[test]
    fn oauth_responses_without_a_user_name_nobody() {
        // No authzid: the server takes the user from the token; imapgate cannot know it.
        assert_eq!(
            user_in_sasl("OAUTHBEARER", b"n,,\x01auth=Bearer x\x01\x01"),
            None
        );
        // An empty one is no user either (not a user "" that every such login would share).
        assert_eq!(
            user_in_sasl("OAUTHBEARER", b"n,a=,\x01auth=Bearer x\x01\x01"),
            None
        );
        assert_eq!(
            user_in_sasl("XOAUTH2", b"user=\x01auth=Bearer x\x01\x01"),
            None
        );
        // The answer to an error challenge (RFC 7628 section 3.2.3: %x01), and XOAUTH2's empty one.
        assert_eq!(user_in_sasl("OAUTHBEARER", b"\x01"), None);
        assert_eq!(user_in_sasl("XOAUTH2", b""), None);
    }
}
