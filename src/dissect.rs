//! `imapgate dissect`: one JSON object per message of a raw one-direction capture.
//!
//! The capture is framed with the same [`Framer`] the proxy uses, and each message is parsed with
//! the same parsers, so what `dissect` prints is what the proxy would see. In the client direction
//! the dissector keeps the little state a server keeps: after `AUTHENTICATE`, lines without a space
//! are SASL responses (base64 or `*`), and after `IDLE` a `DONE` line ends the idle; both are
//! framed as plain lines that announce no literal.
//!
//! A message whose literal is streamed by the framer (a large literal, or any synchronizing
//! literal in the client direction) is reassembled for parsing while it stays small; past that the
//! parse sees the message cut right after the literal's announcement, and the rest is only counted.
//! Memory therefore stays bounded by the framing limits whatever the capture holds.

use bytes::{Bytes, BytesMut};
use serde::Serialize;

use crate::imap::command::{self, ClientLine, CommandKind};
use crate::imap::framing::{Direction, Frame, FrameError, Framer, Limits};
use crate::imap::mutf7;
use crate::imap::response::{self, ResponseKind};
use crate::imap::syntax::Token;

#[derive(Debug, thiserror::Error)]
pub enum DissectError {
    #[error("framing: {0}")]
    Frame(FrameError),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A client command.
    Command,
    /// A client's SASL response line during AUTHENTICATE (base64 or `*`).
    Sasl,
    /// The `DONE` that ends IDLE.
    Done,
    /// A tagged status response.
    Tagged,
    /// An untagged status or data response.
    Untagged,
    /// A continuation request (`+ ...`).
    Continuation,
    /// Framed correctly but not parsed; `error` says why.
    Unparsed,
    /// The input ended inside this message.
    Incomplete,
}

/// Literal statistics of one message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LiteralStats {
    pub count: u64,
    pub octets: u64,
}

/// One message, as printed (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    pub kind: Kind,
    /// The tag of a command or tagged response (also of an unparsed message when readable).
    pub tag: Option<String>,
    /// `UID FETCH`, `LIST`, `EXISTS`, `OK`...; upper case.
    pub name: Option<String>,
    /// The message's length on the wire, literals included.
    pub bytes: u64,
    /// The mailbox names the message carries, decoded from modified UTF-7.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mailboxes: Vec<String>,
    /// Mailbox arguments that are not valid modified UTF-7, as sent (lossy), with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid_mailboxes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub literals: Option<LiteralStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The limits `dissect` frames with: the proxy's defaults, with the line limit of an
/// authenticated session (a capture usually spans the login).
pub fn limits() -> Limits {
    Limits {
        max_line: 64 * 1024,
        ..Limits::default()
    }
}

/// How much of the input is handed to the framer at a time, like reads from a socket.
const FEED: usize = 64 * 1024;

/// Frames and parses `input`, writing one JSON line per message to `out`.
pub fn dissect(
    direction: Direction,
    input: &[u8],
    out: &mut impl std::io::Write,
) -> Result<(), DissectError> {
    let mut io_error = None;
    let result = dissect_with(direction, input, FEED, |record| {
        if io_error.is_some() {
            return;
        }
        let written = serde_json::to_writer(&mut *out, record)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        if let Err(e) = written {
            io_error = Some(e);
        }
    });
    if let Some(e) = io_error {
        return Err(DissectError::Io(e));
    }
    result.map_err(DissectError::Frame)
}

/// Frames and parses `input`, handing each message's record to `emit`; the input is given to the
/// framer `feed` octets at a time (at least one). Stops at the first framing error.
///
/// Without an error, the records' `bytes` add up to `input.len()`: a message the input ends
/// inside is reported as [`Kind::Incomplete`].
pub fn dissect_with(
    direction: Direction,
    input: &[u8],
    feed: usize,
    emit: impl FnMut(&Record),
) -> Result<(), FrameError> {
    dissect_with_limits(direction, limits(), input, feed, emit)
}

/// As [`dissect_with`], with other framing limits.
pub fn dissect_with_limits(
    direction: Direction,
    limits: Limits,
    input: &[u8],
    feed: usize,
    mut emit: impl FnMut(&Record),
) -> Result<(), FrameError> {
    let feed = feed.max(1);
    let mut d = Dissector::new(direction, limits);
    let mut fed = 0;
    loop {
        if d.current.is_none() {
            d.prepare_next(&input[usize::try_from(d.framer.offset()).unwrap_or(input.len())..]);
        }
        match d.framer.next_frame()? {
            Some(frame) => {
                if let Some(record) = d.frame(frame) {
                    emit(&record);
                }
            }
            None if fed < input.len() => {
                let end = input.len().min(fed + feed);
                d.framer.push(&input[fed..end]);
                fed = end;
            }
            None => break,
        }
    }
    let rest = &input[usize::try_from(d.framer.offset()).unwrap_or(input.len())..];
    if let Some(record) = d.finish(rest) {
        emit(&record);
    }
    Ok(())
}

/// Checks two invariants of [`dissect_with_limits`] on one input, for fuzzing and tests: the
/// records and the error do not depend on how the input is fed to the framer (at once, in pieces
/// whose size the first octet of `data` chooses, one octet at a time), and without an error the
/// records account for every octet. The second octet chooses the limits: `dissect`'s own, or
/// small ones (lines of 64 to 191 octets, a low inline-literal threshold) that short inputs
/// reach.
/// `data[2..]` is the stream. Returns what went wrong, if anything.
pub fn self_check(direction: Direction, data: &[u8]) -> Result<(), String> {
    let [first, second, input @ ..] = data else {
        return Ok(());
    };
    let limits = if second & 1 == 0 {
        limits()
    } else {
        // Not below 64: the tag a framing error reports is read from at most 64 octets, and an
        // over-long line is refused once more than the limit is buffered; with a smaller limit
        // the tag could depend on how much had arrived.
        Limits {
            max_line: 64 + usize::from(second >> 1),
            max_id_line: 0,
            max_literal: 4096,
            inline_literal: usize::from(second >> 3),
            nonsync_max: (second & 2 == 0).then_some(64),
        }
    };
    let run = |feed: usize| {
        let mut records = Vec::new();
        let result =
            dissect_with_limits(direction, limits, input, feed, |r| records.push(r.clone()));
        (records, result)
    };
    let whole = run(input.len());
    let mut feeds = vec![usize::from(*first) + 1];
    if input.len() <= 1 << 16 {
        feeds.push(1);
    }
    for feed in feeds {
        let split = run(feed);
        if split != whole {
            return Err(format!(
                "fed {feed} octets at a time: {split:?}\nfed at once: {whole:?}"
            ));
        }
    }
    if whole.1.is_ok() {
        let total: u64 = whole.0.iter().map(|r| r.bytes).sum();
        if total != input.len() as u64 {
            return Err(format!(
                "records account for {total} octets of {}: {:?}",
                input.len(),
                whole.0
            ));
        }
    }
    Ok(())
}

/// How the next client line is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientMode {
    Command,
    /// After AUTHENTICATE: lines without a space are SASL responses.
    Sasl,
    /// After IDLE: a `DONE` line ends the idle.
    Idle,
}

/// The message being assembled.
struct Current {
    /// What the message was framed as (command, sasl or done in the client direction).
    mode: ClientMode,
    /// The bytes the parser will see: the whole message, or its beginning up to a literal
    /// announcement when it grew too big to hold.
    parse: BytesMut,
    /// The rest is only counted.
    cut: bool,
    bytes: u64,
    /// Literals after the cut (those before it are counted from the parse tree).
    later_literals: LiteralStats,
    /// Length of `parse` at the end of its last text piece.
    text_end: usize,
}

struct Dissector {
    direction: Direction,
    framer: Framer,
    mode: ClientMode,
    current: Option<Current>,
    /// The message in `current` is line-only (SASL or DONE).
    line_mode: ClientMode,
    /// Largest message held whole for parsing.
    hold: usize,
}

impl Dissector {
    fn new(direction: Direction, limits: Limits) -> Self {
        Dissector {
            direction,
            framer: Framer::new(direction, limits),
            mode: ClientMode::Command,
            current: None,
            line_mode: ClientMode::Command,
            hold: limits.max_line + limits.inline_literal,
        }
    }

    /// Between messages: decides how the next client line is framed by looking at it (the whole
    /// input is at hand, so no need to wait until the framer has it).
    fn prepare_next(&mut self, rest: &[u8]) {
        if self.direction != Direction::Client {
            return;
        }
        // A line longer than the limit is refused by the framer anyway: look no further.
        let window = &rest[..rest.len().min(self.framer.limits().max_line + 2)];
        let line = match memchr::memchr(b'\n', window) {
            Some(lf) => &window[..lf],
            None => window,
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        self.line_mode = match self.mode {
            ClientMode::Sasl if !line.contains(&b' ') => ClientMode::Sasl,
            ClientMode::Idle if line.eq_ignore_ascii_case(b"DONE") => ClientMode::Idle,
            _ => ClientMode::Command,
        };
        self.framer
            .set_line_only(self.line_mode != ClientMode::Command);
    }

    /// Takes one frame; returns the record of the message it completes.
    fn frame(&mut self, frame: Frame) -> Option<Record> {
        match frame {
            Frame::Text {
                bytes,
                start,
                literal,
            } => {
                let line_mode = self.line_mode;
                let hold = self.hold;
                let cur = self.current.get_or_insert_with(|| Current {
                    mode: line_mode,
                    parse: BytesMut::new(),
                    cut: false,
                    bytes: 0,
                    later_literals: LiteralStats::default(),
                    text_end: 0,
                });
                debug_assert_eq!(start, cur.bytes == 0);
                cur.bytes += bytes.len() as u64;
                if cur.cut {
                    let inline = inline_literals(&bytes, literal.is_some());
                    cur.later_literals.count += inline.count;
                    cur.later_literals.octets += inline.octets;
                    if let Some(lit) = literal {
                        cur.later_literals.count += 1;
                        cur.later_literals.octets += u64::from(lit.len);
                    }
                } else {
                    cur.parse.extend_from_slice(&bytes);
                    cur.text_end = cur.parse.len();
                    if let Some(lit) = literal {
                        // Keep the literal's octets only if the whole stays small.
                        cur.cut = cur.parse.len() + lit.len as usize > hold;
                    }
                }
                if literal.is_some() {
                    return None;
                }
                let cur = self.current.take()?;
                Some(self.complete(cur))
            }
            Frame::Chunk { bytes, .. } => {
                if let Some(cur) = self.current.as_mut() {
                    cur.bytes += bytes.len() as u64;
                    if !cur.cut {
                        cur.parse.extend_from_slice(&bytes);
                    }
                }
                None
            }
        }
    }

    /// The input is over: what is left is an incomplete message, if anything.
    fn finish(&mut self, rest: &[u8]) -> Option<Record> {
        let unframed = self.framer.buffered() as u64;
        let mut record = match self.current.take() {
            Some(mut cur) => {
                // Parse what was framed, up to the last literal announcement.
                cur.parse.truncate(cur.text_end);
                let bytes = cur.bytes + unframed;
                let mut record = self.parse(cur.mode, cur.parse.freeze(), cur.later_literals);
                record.bytes = bytes;
                record
            }
            None if unframed > 0 => {
                // Nothing of it was framed (an inline literal not all there, or a line without
                // its end): parse what ends in a line end, for its tag and name.
                let mut record = match memchr::memrchr(b'\n', rest) {
                    Some(lf) => {
                        let head = Bytes::copy_from_slice(&rest[..lf + 1]);
                        self.parse(self.line_mode, head, LiteralStats::default())
                    }
                    None => Record::new(Kind::Incomplete),
                };
                if record.tag.is_none() {
                    record.tag = plausible_tag(rest);
                }
                record.bytes = unframed;
                record
            }
            None => return None,
        };
        record.kind = Kind::Incomplete;
        record.error = Some("input ends inside this message".to_string());
        Some(record)
    }

    fn complete(&mut self, cur: Current) -> Record {
        let bytes = cur.bytes;
        let mut record = self.parse(cur.mode, cur.parse.freeze(), cur.later_literals);
        record.bytes = bytes;
        record
    }

    /// Parses one message (or its beginning) and updates the client state.
    fn parse(&mut self, mode: ClientMode, raw: Bytes, later: LiteralStats) -> Record {
        let mut record = match (self.direction, mode) {
            (Direction::Client, ClientMode::Sasl) => {
                let r = line_record(Kind::Sasl, command::parse_sasl_line(&raw));
                if matches!(r.kind, Kind::Sasl) && raw.strip_suffix(b"\r\n") == Some(b"*") {
                    // A cancel ends the exchange.
                    self.mode = ClientMode::Command;
                }
                r
            }
            (Direction::Client, ClientMode::Idle) => {
                self.mode = ClientMode::Command;
                line_record(Kind::Done, command::parse_done(&raw))
            }
            (Direction::Client, ClientMode::Command) => self.command(raw),
            (Direction::Server, _) => response_record(raw),
        };
        if later.count > 0 {
            let lits = record.literals.get_or_insert_with(LiteralStats::default);
            lits.count += later.count;
            lits.octets += later.octets;
        }
        record
    }

    fn command(&mut self, raw: Bytes) -> Record {
        // Whatever exchange was going on, a command ends it.
        self.mode = ClientMode::Command;
        match command::parse_command(raw) {
            Ok(cmd) => {
                match cmd.name.kind {
                    CommandKind::Authenticate if !cmd.name.uid => self.mode = ClientMode::Sasl,
                    CommandKind::Idle if !cmd.name.uid => self.mode = ClientMode::Idle,
                    _ => {}
                }
                let mut record = Record::new(Kind::Command);
                record.tag = Some(lossy(cmd.tag()));
                record.name = Some(cmd.display_name().into_owned());
                let names = cmd
                    .mailbox_args()
                    .iter()
                    .filter_map(|m| m.token.string(&cmd.raw))
                    .map(|s| s.into_owned())
                    .collect::<Vec<_>>();
                record.add_mailboxes(names);
                record.literals = literal_stats(&cmd.args);
                record
            }
            Err(e) => {
                let mut record = Record::new(Kind::Unparsed);
                record.tag = e.tag.as_deref().map(lossy);
                record.error = Some(e.error.to_string());
                record
            }
        }
    }
}

impl Record {
    fn new(kind: Kind) -> Self {
        Record {
            kind,
            tag: None,
            name: None,
            bytes: 0,
            mailboxes: Vec::new(),
            invalid_mailboxes: Vec::new(),
            literals: None,
            error: None,
        }
    }

    fn add_mailboxes(&mut self, names: Vec<Vec<u8>>) {
        for name in names {
            match mutf7::decode(&name) {
                Ok(decoded) => self.mailboxes.push(decoded),
                Err(e) => self
                    .invalid_mailboxes
                    .push(format!("{}: {e}", lossy(&name))),
            }
        }
    }
}

fn response_record(raw: Bytes) -> Record {
    match response::parse_response(raw.clone()) {
        Ok(resp) => {
            let kind = match &resp.kind {
                ResponseKind::Continuation { .. } => Kind::Continuation,
                ResponseKind::Status { tag: Some(_), .. } => Kind::Tagged,
                ResponseKind::Status { tag: None, .. } | ResponseKind::Data { .. } => {
                    Kind::Untagged
                }
            };
            let mut record = Record::new(kind);
            record.tag = resp.tag().map(lossy);
            if kind != Kind::Continuation {
                record.name = Some(resp.display_name().into_owned());
            }
            let names = resp
                .mailboxes()
                .iter()
                .filter_map(|m| m.token.string(&resp.raw))
                .map(|s| s.into_owned())
                .collect::<Vec<_>>();
            record.add_mailboxes(names);
            record.literals = match &resp.kind {
                ResponseKind::Data { args, .. } => literal_stats(args),
                ResponseKind::Status {
                    code: Some(code), ..
                } => code.args.as_deref().and_then(literal_stats),
                _ => None,
            };
            record
        }
        Err(e) => {
            let mut record = Record::new(Kind::Unparsed);
            record.tag = plausible_tag(&raw);
            record.error = Some(e.to_string());
            record
        }
    }
}

fn line_record(kind: Kind, parsed: Result<ClientLine, crate::imap::syntax::SyntaxError>) -> Record {
    match parsed {
        Ok(_) => Record::new(kind),
        Err(e) => {
            let mut record = Record::new(Kind::Unparsed);
            record.error = Some(e.to_string());
            record
        }
    }
}

/// The tag a message line starts with, if it has one (not `*` or `+`).
fn plausible_tag(line: &[u8]) -> Option<String> {
    crate::imap::framing::tag_of(line)
        .filter(|t| *t != b"*" && *t != b"+")
        .map(lossy)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Counts the literals of a token tree.
fn literal_stats(tokens: &[Token]) -> Option<LiteralStats> {
    fn walk(tokens: &[Token], stats: &mut LiteralStats) {
        for token in tokens {
            match token {
                Token::Literal { literal, .. } => {
                    stats.count += 1;
                    stats.octets += u64::from(literal.len);
                }
                Token::List { items, .. } => walk(items, stats),
                _ => {}
            }
        }
    }
    let mut stats = LiteralStats::default();
    walk(tokens, &mut stats);
    (stats.count > 0).then_some(stats)
}

/// The inline literals of a text piece that continues a message: each line but the piece's last
/// (which announces the streamed literal when `streamed` is set) may end in a literal
/// announcement whose octets follow in the piece. Continuation pieces never begin with a status
/// line, so every `{n}` at a line's end is a literal (the framer framed it as one).
fn inline_literals(piece: &[u8], streamed: bool) -> LiteralStats {
    let mut stats = LiteralStats::default();
    let mut at = 0;
    while let Some(lf) = memchr::memchr(b'\n', &piece[at..]) {
        let line_end = at + lf + 1;
        let line = &piece[at..line_end];
        at = line_end;
        if streamed && at == piece.len() {
            break;
        }
        if let Some(len) = announced_len(line) {
            stats.count += 1;
            stats.octets += len;
            at = at.saturating_add(len as usize).min(piece.len());
        }
    }
    stats
}

/// The length of a literal announced at the end of `line` (CRLF included).
fn announced_len(line: &[u8]) -> Option<u64> {
    let body = line.strip_suffix(b"}\r\n")?;
    let open = memchr::memrchr(b'{', body)?;
    let inner = &body[open + 1..];
    let digits = inner.strip_suffix(b"+").unwrap_or(inner);
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(direction: Direction, input: &[u8], feed: usize) -> Vec<Record> {
        let mut out = Vec::new();
        dissect_with(direction, input, feed, |r| out.push(r.clone())).expect("frames");
        let total: u64 = out.iter().map(|r| r.bytes).sum();
        assert_eq!(total, input.len() as u64);
        out
    }

    fn kinds(records: &[Record]) -> Vec<Kind> {
        records.iter().map(|r| r.kind).collect()
    }

    #[test]
    fn authenticate_lines_are_sasl_until_a_command() {
        let input = b"a1 AUTHENTICATE PLAIN\r\nAGFsaWNlAHB3\r\na2 SELECT {5}\r\nINBOX\r\n";
        let r = records(Direction::Client, input, 3);
        assert_eq!(kinds(&r), vec![Kind::Command, Kind::Sasl, Kind::Command]);
        assert_eq!(r[2].mailboxes, vec!["INBOX".to_string()]);
        assert_eq!(
            r[2].literals,
            Some(LiteralStats {
                count: 1,
                octets: 5
            })
        );
    }

    #[test]
    fn idle_done() {
        let input = b"a1 IDLE\r\nDONE\r\na2 NOOP\r\n";
        let r = records(Direction::Client, input, 1);
        assert_eq!(kinds(&r), vec![Kind::Command, Kind::Done, Kind::Command]);
    }

    #[test]
    fn large_literal_is_cut_and_counted() {
        let mut input = b"* 1 FETCH (BODY[1] {200000}\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 200_000));
        input.extend_from_slice(b" BODY[2] {3}\r\nabc BODY[3] {300000}\r\n");
        input.extend(std::iter::repeat_n(b'y', 300_000));
        input.extend_from_slice(b")\r\n");
        let r = records(Direction::Server, &input, 7000);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name.as_deref(), Some("FETCH"));
        assert_eq!(
            r[0].literals,
            Some(LiteralStats {
                count: 3,
                octets: 500_003
            })
        );
    }

    #[test]
    fn self_check_holds_on_the_recorded_session() {
        let client = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/session_client.imap"
        ));
        let server = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/session_server.imap"
        ));
        for (direction, capture) in [
            (Direction::Client, &client[..]),
            (Direction::Server, server),
        ] {
            for control in [[200u8, 0], [0, 1], [7, 0xff]] {
                let mut data = control.to_vec();
                data.extend_from_slice(capture);
                assert_eq!(self_check(direction, &data), Ok(()));
            }
        }
    }

    #[test]
    fn truncated_input_is_an_incomplete_record() {
        let r = records(Direction::Client, b"a1 APPEND INBOX {10}\r\nabc", 100);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, Kind::Incomplete);
        assert_eq!(r[0].tag.as_deref(), Some("a1"));
        assert_eq!(r[0].name.as_deref(), Some("APPEND"));
    }
}
