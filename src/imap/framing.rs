//! Framing: where IMAP messages begin and end in a byte stream, found without parsing them.
//!
//! A message is a CRLF-terminated line, extended by every literal the line announces at its end
//! (`{n}`, `{n+}`, `~{n}`, `~{n+}`): the literal's octets and the line that follows them belong to
//! the same message. The framer is sans-IO: bytes go in with [`Framer::push`] or
//! [`Framer::buffer_mut`], [`Frame`]s come out of [`Framer::next_frame`]. Literal octets are counted,
//! never looked at, so a literal can carry anything, including what looks like a command.
//!
//! A message is yielded as one [`Frame::Text`] when it fits in memory. A literal that is too big to
//! hold, or a synchronizing literal in the client direction (the client sends its octets only after
//! a `+`, so waiting for them here would deadlock), ends the text piece: the piece is yielded with
//! the literal it announces, the literal's octets follow as [`Frame::Chunk`]s as they arrive, and
//! the rest of the message is a further [`Frame::Text`] with `start == false`. Memory is therefore
//! bounded by the line limit plus the inline-literal threshold, whatever the message's size.

use bytes::{Buf, Bytes, BytesMut};

/// Which peer writes the stream being framed; it decides how synchronizing literals are handled
/// and whether status lines may end in something that looks like a literal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server: commands (and SASL and DONE lines, announced by the caller).
    Client,
    /// Server to client: responses.
    Server,
}

/// A literal announced at the end of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Literal {
    /// Number of octets that follow the announcing line.
    pub len: u32,
    /// `{n}`: the client waits for a continuation request before sending the octets.
    pub sync: bool,
    /// `~{n}` (RFC 3516): the octets may contain NUL.
    pub binary: bool,
}

/// Framing limits. The session lowers `max_line` before authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, in octets without its CRLF (literal data not counted).
    pub max_line: usize,
    /// Longest line of a client message whose first line is an ID or AUTHENTICATE command
    /// (`tag ID ...`, its lines after literals included), where it is larger than `max_line`.
    /// Dovecot reads a pre-login ID up to its post-login line limit (imaptest sends one of
    /// 30 KiB before it logs in) and an AUTHENTICATE initial response up to 8 KiB (an OAuth
    /// token); every other pre-login line keeps the short limit. 0: no allowance.
    pub max_id_line: usize,
    /// Largest literal accepted at all.
    pub max_literal: u32,
    /// Literals up to this size are held in the message; larger ones are streamed as chunks.
    pub inline_literal: usize,
    /// Bound on non-synchronizing literals: `Some(4096)` when only LITERAL- (RFC 7888) is offered.
    pub nonsync_max: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 8192,
            max_id_line: 0,
            max_literal: 64 * 1024 * 1024,
            inline_literal: 64 * 1024,
            nonsync_max: None,
        }
    }
}

/// One piece of framed output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Message text: lines with the literals held in memory.
    ///
    /// `start` is true for the first piece of a message. When `literal` is `None` the piece ends
    /// its message; otherwise the piece ends with the literal's announcement (its CRLF included)
    /// and the literal's octets follow as chunks (none when its length is 0).
    Text {
        bytes: Bytes,
        start: bool,
        literal: Option<Literal>,
    },
    /// Octets of a streamed literal; `last` on the chunk that completes it.
    Chunk { bytes: Bytes, last: bool },
}

impl Frame {
    /// The frame's bytes, exactly as they were on the wire.
    pub fn bytes(&self) -> &Bytes {
        match self {
            Frame::Text { bytes, .. } | Frame::Chunk { bytes, .. } => bytes,
        }
    }
}

/// What was wrong with the stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameErrorKind {
    #[error("line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("literal of {len} octets is over the limit of {limit}")]
    LiteralTooBig { len: u32, limit: u32, sync: bool },
    #[error("literal length does not fit in 32 bits")]
    LiteralOverflow { sync: bool },
    #[error("non-synchronizing literal of {len} octets is over the LITERAL- bound of {limit}")]
    NonSyncTooBig { len: u32, limit: u32 },
    #[error("line ends in a bare LF, not CRLF")]
    BareLf,
    #[error("NUL octet in a line")]
    Nul,
}

/// A framing error, with where it happened and, when the line began a message, its tag so that the
/// caller can answer the command it broke.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} (at stream offset {offset})")]
pub struct FrameError {
    pub kind: FrameErrorKind,
    /// Offset in the stream of the line that failed.
    pub offset: u64,
    /// The tag of the message the line began, if it began one and had a plausible tag.
    pub tag: Option<Bytes>,
    /// True when the failing line was not the first piece of its message, so part of the
    /// message may already have been passed on.
    pub mid_message: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Looking for the end of the line that starts at `line_start`; `scan` is where the search
    /// for LF resumes, so that bytes arriving one at a time are not rescanned.
    Line { line_start: usize, scan: usize },
    /// Waiting until an inline literal's octets, which start at `data_start`, are all buffered.
    Inline { data_start: usize, len: usize },
    /// Passing on a streamed literal.
    Stream { remaining: u32 },
    /// Dropping input up to the next LF after an over-long line.
    Discard,
}

const LINE_START: State = State::Line {
    line_start: 0,
    scan: 0,
};

/// The streaming framer for one direction of one connection.
#[derive(Debug)]
pub struct Framer {
    direction: Direction,
    limits: Limits,
    buf: BytesMut,
    state: State,
    /// The next text piece begins a message.
    at_message_start: bool,
    /// Lines are plain lines with no literals (SASL responses, IDLE's DONE).
    line_only: bool,
    /// The message being yielded in pieces began with an ID command line.
    id_message: bool,
    /// Stream offset of `buf[0]`.
    offset: u64,
}

impl Framer {
    pub fn new(direction: Direction, limits: Limits) -> Self {
        Framer {
            direction,
            limits,
            buf: BytesMut::with_capacity(16 * 1024),
            state: LINE_START,
            at_message_start: true,
            line_only: false,
            id_message: false,
            offset: 0,
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the limits; takes effect from the next line.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// In the client direction, the lines of an AUTHENTICATE exchange and the DONE that ends IDLE
    /// are not commands and announce no literals; the session says when such a line is expected.
    pub fn set_line_only(&mut self, line_only: bool) {
        self.line_only = line_only;
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The receive buffer, for reading from a socket straight into it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet yielded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Stream offset of the first byte not yet yielded.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True between messages: nothing of a message has been yielded or buffered.
    pub fn is_between_messages(&self) -> bool {
        self.at_message_start && self.state == LINE_START && self.buf.is_empty()
    }

    /// True when a message has begun (some of it yielded) but not ended.
    pub fn is_mid_message(&self) -> bool {
        !self.at_message_start
    }

    /// How many more octets the current streamed literal needs, if one is being streamed.
    pub fn literal_remaining(&self) -> Option<u32> {
        match self.state {
            State::Stream { remaining } => Some(remaining),
            _ => None,
        }
    }

    /// How many octets of the streamed literal may bypass this framer (passed on by the caller
    /// from socket to socket): the rest of the literal, when one is being streamed and none of
    /// its octets are buffered here. `None` otherwise.
    pub fn passable(&self) -> Option<u32> {
        match self.state {
            State::Stream { remaining } if self.buf.is_empty() => Some(remaining),
            _ => None,
        }
    }

    /// Accounts for `n` octets of the streamed literal that the caller passed on without
    /// buffering them here (at most [`Framer::passable`]); the literal ends with its last octet.
    pub fn passed(&mut self, n: u32) {
        if let State::Stream { remaining } = self.state {
            let n = n.min(remaining);
            self.offset += u64::from(n);
            self.state = if remaining == n {
                LINE_START
            } else {
                State::Stream {
                    remaining: remaining - n,
                }
            };
        }
    }

    /// Forgets the literal whose head was just yielded: its command was refused before the
    /// client got a `+`, so the client will not send the octets (RFC 9051 section 7.5).
    /// Call it right after the [`Frame::Text`] that announced the literal.
    pub fn refuse_literal(&mut self) {
        self.state = LINE_START;
        self.at_message_start = true;
    }

    /// The next frame, `Ok(None)` when more input is needed.
    ///
    /// After an error the framer has skipped the offending line (or, for an over-long line, will
    /// skip input up to its end) and can go on with the next message; the caller decides whether
    /// the connection survives.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            match self.state {
                State::Stream { remaining } => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = self.buf.len().min(remaining as usize);
                    let bytes = self.take(n);
                    // n <= remaining, which is a u32.
                    let remaining = remaining - n as u32;
                    self.state = if remaining == 0 {
                        LINE_START
                    } else {
                        State::Stream { remaining }
                    };
                    return Ok(Some(Frame::Chunk {
                        bytes,
                        last: remaining == 0,
                    }));
                }
                State::Discard => match memchr::memchr(b'\n', &self.buf) {
                    None => {
                        let n = self.buf.len();
                        self.skip(n);
                        return Ok(None);
                    }
                    Some(lf) => {
                        self.skip(lf + 1);
                        self.state = LINE_START;
                        self.at_message_start = true;
                    }
                },
                State::Inline { data_start, len } => {
                    let end = data_start + len;
                    if self.buf.len() < end {
                        return Ok(None);
                    }
                    self.state = State::Line {
                        line_start: end,
                        scan: end,
                    };
                }
                State::Line { line_start, scan } => {
                    let Some(i) = memchr::memchr(b'\n', &self.buf[scan..]) else {
                        if self.buf.len() - line_start > self.limits.max_line + 2 {
                            let limit = self.line_limit();
                            if self.buf.len() - line_start > limit + 2 {
                                return Err(self.line_too_long(line_start, limit));
                            }
                        }
                        self.state = State::Line {
                            line_start,
                            scan: self.buf.len(),
                        };
                        return Ok(None);
                    };
                    let lf = scan + i;
                    if let Some(frame) = self.end_of_line(line_start, lf)? {
                        return Ok(Some(frame));
                    }
                }
            }
        }
    }

    /// Handles a complete line `buf[line_start..=lf]`: ends the message, holds an inline literal
    /// (returning `None` to keep going), or yields the piece before a streamed literal.
    fn end_of_line(&mut self, line_start: usize, lf: usize) -> Result<Option<Frame>, FrameError> {
        // Length first: an over-long line is refused as such before its end arrives, so it must
        // be refused as such when it arrives whole, whatever ends it.
        let mut limit = self.limits.max_line;
        if lf - line_start > limit + 1 {
            limit = self.line_limit();
            if lf - line_start > limit + 1 {
                return Err(self.reject_line(
                    line_start,
                    lf,
                    FrameErrorKind::LineTooLong { limit },
                ));
            }
        }
        if lf == line_start || self.buf[lf - 1] != b'\r' {
            return Err(self.reject_line(line_start, lf, FrameErrorKind::BareLf));
        }
        let line_end = lf - 1;
        let line = &self.buf[line_start..line_end];
        if memchr::memchr(0, line).is_some() {
            return Err(self.reject_line(line_start, lf, FrameErrorKind::Nul));
        }
        let first_line = self.at_message_start && line_start == 0;
        let announced = if self.line_only || (first_line && self.is_text_line(line)) {
            Ok(None)
        } else {
            literal_at_end(line)
        };
        let literal = match announced {
            Ok(None) => {
                let bytes = self.take(lf + 1);
                self.state = LINE_START;
                let start = std::mem::replace(&mut self.at_message_start, true);
                return Ok(Some(Frame::Text {
                    bytes,
                    start,
                    literal: None,
                }));
            }
            Ok(Some(literal)) => literal,
            Err(kind) => return Err(self.reject_line(line_start, lf, kind)),
        };
        if let Err(kind) = self.check_literal(literal) {
            return Err(self.reject_line(line_start, lf, kind));
        }
        let data_start = lf + 1;
        let len = literal.len as usize;
        let client_waits = self.direction == Direction::Client && literal.sync;
        let fits = len <= self.limits.inline_literal
            && data_start + len <= limit + self.limits.inline_literal;
        if fits && !client_waits {
            self.state = State::Inline { data_start, len };
            return Ok(None);
        }
        if self.at_message_start {
            // The first line leaves the buffer with this piece: remember what it was.
            self.id_message = self.id_allowance() && is_id_command(&self.buf);
        }
        let bytes = self.take(data_start);
        let start = std::mem::replace(&mut self.at_message_start, false);
        self.state = if literal.len == 0 {
            LINE_START
        } else {
            State::Stream {
                remaining: literal.len,
            }
        };
        Ok(Some(Frame::Text {
            bytes,
            start,
            literal: Some(literal),
        }))
    }

    fn check_literal(&self, literal: Literal) -> Result<(), FrameErrorKind> {
        if literal.len > self.limits.max_literal {
            return Err(FrameErrorKind::LiteralTooBig {
                len: literal.len,
                limit: self.limits.max_literal,
                sync: literal.sync,
            });
        }
        match self.limits.nonsync_max {
            Some(limit) if !literal.sync && literal.len > limit => {
                Err(FrameErrorKind::NonSyncTooBig {
                    len: literal.len,
                    limit,
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether ID messages may have longer lines than others.
    fn id_allowance(&self) -> bool {
        self.direction == Direction::Client
            && !self.line_only
            && self.limits.max_id_line > self.limits.max_line
    }

    /// The line limit of the line being framed: longer in a message that began with an ID
    /// command. Only asked once a line is over `max_line`, so ordinary lines pay nothing.
    fn line_limit(&self) -> usize {
        let id = self.id_allowance()
            && if self.at_message_start {
                // The message's first line is still at the start of the buffer.
                is_id_command(&self.buf)
            } else {
                self.id_message
            };
        if id {
            self.limits.max_id_line
        } else {
            self.limits.max_line
        }
    }

    /// Server status responses and continuation requests end in free text, which may end in
    /// something shaped like a literal announcement without being one.
    fn is_text_line(&self, line: &[u8]) -> bool {
        if self.direction != Direction::Server {
            return false;
        }
        if line.first() == Some(&b'+') {
            return true;
        }
        let mut words = line.splitn(3, |&b| b == b' ');
        let _tag = words.next();
        match words.next() {
            Some(word) => [&b"OK"[..], b"NO", b"BAD", b"BYE", b"PREAUTH"]
                .iter()
                .any(|status| word.eq_ignore_ascii_case(status)),
            None => false,
        }
    }

    /// Drops the message piece up to and including the failing line, and describes the failure.
    fn reject_line(&mut self, line_start: usize, lf: usize, kind: FrameErrorKind) -> FrameError {
        let error = self.error(line_start, kind);
        self.skip(lf + 1);
        self.state = LINE_START;
        self.at_message_start = true;
        error
    }

    /// An over-long line whose end has not arrived: drop what we have and skip to its end.
    fn line_too_long(&mut self, line_start: usize, limit: usize) -> FrameError {
        let error = self.error(line_start, FrameErrorKind::LineTooLong { limit });
        let n = self.buf.len();
        self.skip(n);
        self.state = State::Discard;
        error
    }

    fn error(&self, line_start: usize, kind: FrameErrorKind) -> FrameError {
        let mid_message = !self.at_message_start || line_start != 0;
        let tag = if mid_message {
            None
        } else {
            tag_of(&self.buf[..]).map(Bytes::copy_from_slice)
        };
        FrameError {
            kind,
            offset: self.offset + line_start as u64,
            tag,
            mid_message,
        }
    }

    fn take(&mut self, n: usize) -> Bytes {
        self.offset += n as u64;
        self.buf.split_to(n).freeze()
    }

    fn skip(&mut self, n: usize) {
        self.offset += n as u64;
        self.buf.advance(n);
    }
}

/// The tag at the start of a line, if it looks like one (`tag = 1*<any ASTRING-CHAR except "+">`),
/// or `*` / `+`. Bounded so that a hostile line cannot make an error message large.
pub fn tag_of(line: &[u8]) -> Option<&[u8]> {
    let end = line.iter().take(64).position(|&b| b == b' ')?;
    let tag = &line[..end];
    let plausible = !tag.is_empty()
        && (tag == b"*"
            || tag == b"+"
            || tag
                .iter()
                .all(|&b| crate::imap::syntax::is_astring_char(b) && b != b'+'));
    plausible.then_some(tag)
}

/// ```abnf
/// id           = "ID" SP id-params-list                              ; RFC 2971
/// authenticate = "AUTHENTICATE" SP auth-type [SP initial-resp]      ; RFC 4959
/// ```
/// True when the message starting at `line` is one of the commands allowed a longer line
/// before login (an ID, or an AUTHENTICATE with a long initial response), its name in any case.
fn is_id_command(line: &[u8]) -> bool {
    let Some(tag) = tag_of(line) else {
        return false;
    };
    let rest = &line[tag.len() + 1..];
    let named = |name: &[u8]| {
        rest.len() > name.len()
            && rest[..name.len()].eq_ignore_ascii_case(name)
            && matches!(rest[name.len()], b' ' | b'\r')
    };
    tag != b"*" && tag != b"+" && (named(b"ID") || named(b"AUTHENTICATE"))
}

/// The literal announced at the end of a line (without its CRLF), if any.
///
/// ```text
/// literal         = "{" number64 ["+"] "}" CRLF *CHAR8   ; RFC 9051, RFC 7888
/// literal8        = "~{" number64 ["+"] "}" CRLF *OCTET  ; RFC 3516
/// ```
pub(crate) fn literal_at_end(line: &[u8]) -> Result<Option<Literal>, FrameErrorKind> {
    let Some(body) = line.strip_suffix(b"}") else {
        return Ok(None);
    };
    let Some(open) = memchr::memrchr(b'{', body) else {
        return Ok(None);
    };
    let inner = &body[open + 1..];
    let (digits, sync) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, false),
        None => (inner, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Ok(None);
    }
    let mut len: u32 = 0;
    for &d in digits {
        len = len
            .checked_mul(10)
            .and_then(|l| l.checked_add(u32::from(d - b'0')))
            .ok_or(FrameErrorKind::LiteralOverflow { sync })?;
    }
    let binary = open > 0 && body[open - 1] == b'~';
    Ok(Some(Literal { len, sync, binary }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Framer {
        Framer::new(Direction::Client, Limits::default())
    }

    fn server() -> Framer {
        Framer::new(Direction::Server, Limits::default())
    }

    /// Frames everything, returning the frames and the first error.
    fn frame_all(framer: &mut Framer, input: &[u8]) -> (Vec<Frame>, Option<FrameError>) {
        framer.push(input);
        let mut frames = Vec::new();
        loop {
            match framer.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return (frames, None),
                Err(e) => return (frames, Some(e)),
            }
        }
    }

    fn text(bytes: &[u8], start: bool, literal: Option<Literal>) -> Frame {
        Frame::Text {
            bytes: Bytes::copy_from_slice(bytes),
            start,
            literal,
        }
    }

    #[test]
    fn a_streamed_literal_can_pass_around_the_framer_and_the_message_goes_on() {
        let mut f = server();
        let head = b"* 1 FETCH (BODY[] {100000}\r\n";
        let (frames, err) = frame_all(&mut f, &[&head[..], &[b'x'; 10][..]].concat());
        assert_eq!(err, None);
        assert_eq!(frames.len(), 2);
        assert!(matches!(&frames[1], Frame::Chunk { bytes, last: false } if bytes.len() == 10));
        // Nothing buffered: the rest may go from socket to socket.
        assert_eq!(f.passable(), Some(99_990));
        f.passed(99_985);
        assert_eq!(f.passable(), Some(5));
        assert_eq!(f.offset(), (head.len() + 99_995) as u64);
        let (frames, err) = frame_all(&mut f, b"yyyyy)\r\n* 2 EXISTS\r\n");
        assert_eq!(err, None);
        assert_eq!(
            frames,
            vec![
                Frame::Chunk {
                    bytes: Bytes::from_static(b"yyyyy"),
                    last: true
                },
                text(b")\r\n", false, None),
                text(b"* 2 EXISTS\r\n", true, None),
            ]
        );
        assert_eq!(f.passable(), None);
    }

    #[test]
    fn only_an_unbuffered_streamed_literal_is_passable() {
        let mut f = server();
        let (_, err) = frame_all(&mut f, b"* 1 FETCH (BODY[] {10}\r\n01234");
        assert_eq!(err, None);
        // An inline literal is held whole: nothing may bypass it.
        assert_eq!(f.passable(), None);
        let mut f = server();
        f.push(b"* 1 FETCH (BODY[] {100000}\r\nab");
        assert!(matches!(f.next_frame(), Ok(Some(Frame::Text { .. }))));
        // Two octets are buffered and must be yielded first.
        assert_eq!(f.passable(), None);
        assert!(
            matches!(f.next_frame(), Ok(Some(Frame::Chunk { bytes, .. })) if &bytes[..] == b"ab")
        );
        assert_eq!(f.passable(), Some(99_998));
        // Passing more than the literal holds ends it, no further.
        f.passed(200_000);
        assert_eq!(f.passable(), None);
    }

    #[test]
    fn pipelined_commands_are_separate_messages() {
        let (frames, err) = frame_all(&mut client(), b"a1 NOOP\r\na2 CAPABILITY\r\na3 LOG");
        assert_eq!(err, None);
        assert_eq!(
            frames,
            vec![
                text(b"a1 NOOP\r\n", true, None),
                text(b"a2 CAPABILITY\r\n", true, None)
            ]
        );
    }

    #[test]
    fn nonsync_literal_is_held_inside_its_message() {
        let input = b"a1 LOGIN {5+}\r\nalice {7+}\r\nsecret!\r\na2 NOOP\r\n";
        let (frames, err) = frame_all(&mut client(), input);
        assert_eq!(err, None);
        assert_eq!(
            frames[0],
            text(b"a1 LOGIN {5+}\r\nalice {7+}\r\nsecret!\r\n", true, None)
        );
        assert_eq!(frames[1], text(b"a2 NOOP\r\n", true, None));
    }

    #[test]
    fn literal_bytes_are_never_syntax() {
        // The literal holds a CRLF and something shaped like a command and a literal.
        let input = b"* 1 FETCH (BODY[] {23}\r\nx\r\na2 LOGOUT {99}\r\nyz!)\r\n";
        let (frames, err) = frame_all(&mut server(), input);
        assert_eq!(err, None);
        assert_eq!(frames, vec![text(input, true, None)]);
    }

    #[test]
    fn client_sync_literal_yields_the_head_at_once() {
        let mut framer = client();
        let (frames, _) = frame_all(&mut framer, b"a1 APPEND INBOX {5}\r\n");
        let lit = Literal {
            len: 5,
            sync: true,
            binary: false,
        };
        assert_eq!(
            frames,
            vec![text(b"a1 APPEND INBOX {5}\r\n", true, Some(lit))]
        );
        assert!(framer.is_mid_message());
        let (frames, _) = frame_all(&mut framer, b"hel");
        assert_eq!(
            frames,
            vec![Frame::Chunk {
                bytes: Bytes::from_static(b"hel"),
                last: false
            }]
        );
        let (frames, _) = frame_all(&mut framer, b"lo\r\na2 NOOP\r\n");
        assert_eq!(
            frames,
            vec![
                Frame::Chunk {
                    bytes: Bytes::from_static(b"lo"),
                    last: true
                },
                text(b"\r\n", false, None),
                text(b"a2 NOOP\r\n", true, None),
            ]
        );
        assert!(framer.is_between_messages());
    }

    #[test]
    fn large_server_literal_is_streamed_in_chunks() {
        let mut framer = server();
        let big = vec![b'x'; 200_000];
        let mut input = b"* 1 FETCH (BODY[] {200000}\r\n".to_vec();
        input.extend_from_slice(&big);
        input.extend_from_slice(b" UID 7)\r\n");
        let (frames, err) = frame_all(&mut framer, &input);
        assert_eq!(err, None);
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0],
            text(
                b"* 1 FETCH (BODY[] {200000}\r\n",
                true,
                Some(Literal {
                    len: 200_000,
                    sync: true,
                    binary: false
                })
            )
        );
        assert_eq!(frames[1].bytes().len(), 200_000);
        assert_eq!(frames[2], text(b" UID 7)\r\n", false, None));
    }

    #[test]
    fn binary_literal_is_recognised() {
        let (frames, err) = frame_all(&mut client(), b"a1 APPEND INBOX ~{3+}\r\n\0\x01\x02\r\n");
        assert_eq!(err, None);
        assert_eq!(frames.len(), 1);
        let (frames, _) = frame_all(&mut client(), b"a1 APPEND INBOX ~{3}\r\n");
        assert_eq!(
            frames[0],
            text(
                b"a1 APPEND INBOX ~{3}\r\n",
                true,
                Some(Literal {
                    len: 3,
                    sync: true,
                    binary: true
                })
            )
        );
    }

    #[test]
    fn server_status_text_ending_in_braces_is_not_a_literal() {
        let input = b"* OK see {5}\r\n+ send {3}\r\na1 NO no {2}\r\n";
        let (frames, err) = frame_all(&mut server(), input);
        assert_eq!(err, None);
        assert_eq!(frames.len(), 3);
    }

    #[test]
    fn sasl_lines_announce_no_literals() {
        let mut framer = client();
        framer.set_line_only(true);
        let (frames, err) = frame_all(&mut framer, b"AGFsaWNl{5}\r\n");
        assert_eq!(err, None);
        assert_eq!(frames, vec![text(b"AGFsaWNl{5}\r\n", true, None)]);
    }

    #[test]
    fn over_long_line_is_an_error_and_is_skipped() {
        let mut framer = Framer::new(
            Direction::Client,
            Limits {
                max_line: 16,
                ..Limits::default()
            },
        );
        let (_, err) = frame_all(&mut framer, b"a1 SEARCH TEXT aaaaaaaaaaaaaaaaaaaaaaa");
        let err = err.expect("line too long");
        assert_eq!(err.kind, FrameErrorKind::LineTooLong { limit: 16 });
        assert_eq!(err.tag.as_deref(), Some(&b"a1"[..]));
        assert_eq!(err.offset, 0);
        let (frames, err) = frame_all(&mut framer, b"aaaaaa\r\na2 NOOP\r\n");
        assert_eq!(err, None);
        assert_eq!(frames, vec![text(b"a2 NOOP\r\n", true, None)]);
    }

    #[test]
    fn over_long_complete_line_is_an_error() {
        let mut framer = Framer::new(
            Direction::Client,
            Limits {
                max_line: 8,
                ..Limits::default()
            },
        );
        let (frames, err) = frame_all(&mut framer, b"a1 NOOP123\r\na2 NOOP\r\n");
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::LineTooLong { limit: 8 })
        );
        assert!(frames.is_empty());
        let (frames, _) = frame_all(&mut framer, b"");
        assert_eq!(frames, vec![text(b"a2 NOOP\r\n", true, None)]);
    }

    #[test]
    fn literal_length_overflowing_u32_is_an_error_not_a_wrap() {
        let (_, err) = frame_all(&mut client(), b"a1 APPEND INBOX {4294967296}\r\n");
        let err = err.expect("overflow");
        assert_eq!(err.kind, FrameErrorKind::LiteralOverflow { sync: true });
        assert_eq!(err.tag.as_deref(), Some(&b"a1"[..]));
        let (_, err) = frame_all(&mut client(), b"a1 APPEND INBOX {99999999999}\r\n");
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::LiteralOverflow { sync: true })
        );
        let (_, err) = frame_all(&mut client(), b"a1 APPEND INBOX {4294967295+}\r\n");
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::LiteralTooBig {
                len: u32::MAX,
                limit: 64 * 1024 * 1024,
                sync: false
            })
        );
    }

    #[test]
    fn literal_minus_bounds_nonsync_literals() {
        let mut framer = Framer::new(
            Direction::Client,
            Limits {
                nonsync_max: Some(4096),
                ..Limits::default()
            },
        );
        let (_, err) = frame_all(&mut framer, b"a1 APPEND INBOX {4097+}\r\n");
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::NonSyncTooBig {
                len: 4097,
                limit: 4096
            })
        );
        let (frames, err) = frame_all(&mut framer, b"a2 APPEND INBOX {1+}\r\nx\r\n");
        assert_eq!(err, None);
        assert_eq!(frames.len(), 1);
    }

    #[test]
    fn literal_announced_and_never_sent_stays_incomplete() {
        let mut framer = server();
        let (frames, err) = frame_all(&mut framer, b"* 1 FETCH (BODY[] {10}\r\nabc");
        assert_eq!((frames.len(), err), (0, None));
        assert!(!framer.is_between_messages());
    }

    #[test]
    fn bare_lf_is_rejected_and_the_line_skipped() {
        let mut framer = client();
        let (frames, err) = frame_all(&mut framer, b"a1 NOOP\na2 NOOP\r\n");
        let err = err.expect("bare LF");
        assert_eq!(err.kind, FrameErrorKind::BareLf);
        assert_eq!(err.tag.as_deref(), Some(&b"a1"[..]));
        assert!(frames.is_empty());
        let (frames, _) = frame_all(&mut framer, b"");
        assert_eq!(frames, vec![text(b"a2 NOOP\r\n", true, None)]);
    }

    #[test]
    fn nul_in_a_line_is_rejected() {
        let (_, err) = frame_all(&mut client(), b"a1 LOGIN \"al\0ice\" pw\r\n");
        assert_eq!(err.map(|e| e.kind), Some(FrameErrorKind::Nul));
    }

    #[test]
    fn error_offsets_count_from_the_stream_start() {
        let (_, err) = frame_all(&mut client(), b"a1 NOOP\r\na2 NOOP\n");
        assert_eq!(err.map(|e| e.offset), Some(9));
    }

    /// Pre-login limits in small: lines of 64 octets, ID messages up to 1024.
    fn pre_login() -> Framer {
        Framer::new(
            Direction::Client,
            Limits {
                max_line: 64,
                max_id_line: 1024,
                ..Limits::default()
            },
        )
    }

    fn long(word: &str, n: usize) -> String {
        format!("{word}{}", "x".repeat(n))
    }

    #[test]
    fn a_long_initial_response_is_allowed_like_an_id() {
        // An OAuth token as AUTHENTICATE's initial response, longer than the pre-login line.
        let line = format!("a AUTHENTICATE XOAUTH2 {}\r\n", "y".repeat(500));
        let (frames, err) = frame_all(&mut pre_login(), line.as_bytes());
        assert_eq!(err, None);
        assert_eq!(frames.len(), 1);
        let line = format!("a AUTHENTICATEX {}\r\n", "y".repeat(500));
        let (_, err) = frame_all(&mut pre_login(), line.as_bytes());
        assert!(
            matches!(
                err.map(|e| e.kind),
                Some(FrameErrorKind::LineTooLong { .. })
            ),
            "only AUTHENTICATE itself"
        );
    }

    /// Frames `input` one octet at a time.
    fn frame_bytewise(framer: &mut Framer, input: &[u8]) -> (Vec<Frame>, Option<FrameError>) {
        let mut frames = Vec::new();
        for b in input {
            let (f, err) = frame_all(framer, &[*b]);
            frames.extend(f);
            if err.is_some() {
                return (frames, err);
            }
        }
        (frames, None)
    }

    #[test]
    fn a_pre_login_id_may_be_as_long_as_a_post_login_line() {
        let id = format!("a ID (\"name\" \"{}\")\r\n", long("n", 900));
        let lower = format!("b id (\"os\" {})\r\n", long("o", 900));
        let bare = format!("c ID {}\r\n", long("", 900));
        for input in [&id, &lower, &bare] {
            let (frames, err) = frame_all(&mut pre_login(), input.as_bytes());
            assert_eq!(
                (frames, err),
                (vec![text(input.as_bytes(), true, None)], None)
            );
            let (frames, err) = frame_bytewise(&mut pre_login(), input.as_bytes());
            assert_eq!((frames.len(), err), (1, None), "{input}");
        }
    }

    #[test]
    fn every_other_pre_login_line_keeps_the_short_limit() {
        for line in [
            format!("a NOOP {}\r\n", long("", 100)),
            format!("a IDLE {}\r\n", long("", 100)),
            format!("a LOGIN ID {}\r\n", long("", 100)),
            format!("ID a {}\r\n", long("", 100)),
            format!("* ID {}\r\n", long("", 100)),
        ] {
            let mut input = line.clone().into_bytes();
            input.extend_from_slice(b"a2 NOOP\r\n");
            let (frames, err) = frame_all(&mut pre_login(), &input);
            assert_eq!(
                err.map(|e| e.kind),
                Some(FrameErrorKind::LineTooLong { limit: 64 }),
                "{line}"
            );
            assert!(frames.is_empty());
            let (_, err) = frame_bytewise(&mut pre_login(), line.as_bytes());
            assert_eq!(
                err.map(|e| e.kind),
                Some(FrameErrorKind::LineTooLong { limit: 64 }),
                "{line}"
            );
        }
        // An ID is bounded by its own allowance.
        let input = format!("a ID ({})\r\n", long("", 1100));
        let (_, err) = frame_all(&mut pre_login(), input.as_bytes());
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::LineTooLong { limit: 1024 })
        );
        // The allowance ends with the ID's message: the next command is short again.
        let mut framer = pre_login();
        let input = format!("a ID ({})\r\nb NOOP {}\r\n", long("", 500), long("", 100));
        let (frames, err) = frame_all(&mut framer, input.as_bytes());
        assert_eq!(frames.len(), 1);
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::LineTooLong { limit: 64 })
        );
        // SASL lines are not ID commands, whatever they look like.
        let mut framer = pre_login();
        framer.set_line_only(true);
        let (_, err) = frame_all(
            &mut framer,
            format!("a ID {}\r\n", long("", 100)).as_bytes(),
        );
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::LineTooLong { limit: 64 })
        );
    }

    #[test]
    fn the_lines_after_an_id_literal_share_the_allowance() {
        // Held inline (a non-synchronizing literal) and streamed (a synchronizing one, whose
        // first line leaves the framer before the rest arrives).
        for sync in ["", "+"] {
            let input = format!(
                "a ID (\"name\" {{3{sync}}}\r\nabc \"version\" \"{}\")\r\n",
                long("v", 500)
            );
            for bytewise in [false, true] {
                let mut framer = pre_login();
                let (frames, err) = if bytewise {
                    frame_bytewise(&mut framer, input.as_bytes())
                } else {
                    frame_all(&mut framer, input.as_bytes())
                };
                assert_eq!(err, None, "{input}");
                let joined: Vec<u8> = frames.iter().flat_map(|f| f.bytes().to_vec()).collect();
                assert_eq!(joined, input.as_bytes());
                assert!(framer.is_between_messages());
            }
        }
        // Not after a literal of another command (its head and octets are yielded when the
        // literal is synchronizing).
        for (sync, yielded) in [("", 2), ("+", 0)] {
            let input = format!("a NOOP {{3{sync}}}\r\nabc {}\r\n", long("", 100));
            let mut framer = pre_login();
            let (frames, err) = frame_all(&mut framer, input.as_bytes());
            assert_eq!(frames.len(), yielded);
            assert_eq!(
                err.map(|e| e.kind),
                Some(FrameErrorKind::LineTooLong { limit: 64 })
            );
        }
    }

    #[test]
    fn without_an_allowance_an_id_is_an_ordinary_line() {
        let mut framer = Framer::new(
            Direction::Client,
            Limits {
                max_line: 64,
                ..Limits::default()
            },
        );
        let (_, err) = frame_all(
            &mut framer,
            format!("a ID {}\r\n", long("", 100)).as_bytes(),
        );
        assert_eq!(
            err.map(|e| e.kind),
            Some(FrameErrorKind::LineTooLong { limit: 64 })
        );
    }

    #[test]
    fn memory_stays_bounded_for_many_small_literals() {
        // Each literal is small, but together they exceed what is held: the framer streams.
        let limits = Limits {
            max_line: 64,
            inline_literal: 100,
            ..Limits::default()
        };
        let mut framer = Framer::new(Direction::Server, limits);
        let mut input = b"* 1 FETCH (".to_vec();
        for _ in 0..50 {
            input.extend_from_slice(b"X {90}\r\n");
            input.extend_from_slice(&[b'y'; 90]);
            input.push(b' ');
        }
        input.extend_from_slice(b")\r\n");
        let (frames, err) = frame_all(&mut framer, &input);
        assert_eq!(err, None);
        let total: usize = frames.iter().map(|f| f.bytes().len()).sum();
        assert_eq!(total, input.len());
        assert!(frames.iter().all(|f| f.bytes().len() <= 64 + 100 + 64));
    }
}
