//! Helpers shared by the protocol tests (tests/protocol/): framing a whole stream into logical
//! messages, and reading the RFC example files.
#![allow(dead_code)]

pub mod grammar;

use bytes::Bytes;
use imapgate::imap::framing::{Direction, Frame, FrameError, Framer, Limits};

/// One logical message: its bytes (all pieces joined) and where it starts in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub offset: usize,
    pub bytes: Vec<u8>,
}

/// What a client line is framed as, decided by the client state a server keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    Command,
    Sasl,
    Done,
}

/// The result of framing a whole stream.
#[derive(Debug, Default)]
pub struct Framed {
    pub messages: Vec<Message>,
    /// For the client direction, what each message was framed as.
    pub kinds: Vec<Option<LineKind>>,
    /// Bytes of a message the stream ends inside, if any.
    pub incomplete: Option<Message>,
    pub error: Option<FrameError>,
}

/// Frames `stream`, fed `piece` octets at a time, into logical messages (the pieces of a message
/// split by streamed literals joined again). In the client direction the SASL lines after
/// AUTHENTICATE and the DONE after IDLE are framed line-only, as a server would.
pub fn frame_stream(direction: Direction, limits: Limits, stream: &[u8], piece: usize) -> Framed {
    frame_pieces(direction, limits, stream, &[piece])
}

/// As [`frame_stream`], with the input fed in pieces of the given sizes, in turn (cycled).
pub fn frame_pieces(
    direction: Direction,
    limits: Limits,
    stream: &[u8],
    pieces: &[usize],
) -> Framed {
    let mut pieces = pieces.iter().copied().cycle();
    let mut framer = Framer::new(direction, limits);
    let mut out = Framed::default();
    let mut fed = 0;
    let mut current: Option<Message> = None;
    let mut current_kind = None;
    let mut state = LineKind::Command;
    loop {
        if current.is_none() && direction == Direction::Client {
            let at = framer.offset() as usize;
            let rest = &stream[at.min(stream.len())..];
            let line = rest.split(|&b| b == b'\n').next().unwrap_or(rest);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let kind = match state {
                LineKind::Sasl if !line.contains(&b' ') => LineKind::Sasl,
                LineKind::Done if line.eq_ignore_ascii_case(b"DONE") => LineKind::Done,
                _ => LineKind::Command,
            };
            framer.set_line_only(kind != LineKind::Command);
            current_kind = Some(kind);
        }
        match framer.next_frame() {
            Err(e) => {
                out.error = Some(e);
                return out;
            }
            Ok(Some(frame)) => {
                let offset = framer.offset() as usize - frame.bytes().len();
                let msg = current.get_or_insert_with(|| Message {
                    offset,
                    bytes: Vec::new(),
                });
                msg.bytes.extend_from_slice(frame.bytes());
                if let Frame::Text { literal: None, .. } = frame {
                    let msg = current.take().expect("a message");
                    if direction == Direction::Client {
                        state = next_state(current_kind, state, &msg.bytes);
                    }
                    out.messages.push(msg);
                    out.kinds.push(current_kind);
                }
            }
            Ok(None) if fed < stream.len() => {
                let piece = pieces.next().unwrap_or(1).max(1);
                let end = stream.len().min(fed + piece);
                framer.push(&stream[fed..end]);
                fed = end;
            }
            Ok(None) => break,
        }
    }
    let unframed = framer.buffered();
    if current.is_some() || unframed > 0 {
        let start = stream.len() - unframed;
        let mut msg = current.unwrap_or(Message {
            offset: start,
            bytes: Vec::new(),
        });
        msg.bytes.extend_from_slice(&stream[start..]);
        out.incomplete = Some(msg);
    }
    out
}

fn next_state(kind: Option<LineKind>, state: LineKind, bytes: &[u8]) -> LineKind {
    match kind {
        Some(LineKind::Command) => {
            let mut words = bytes.split(|&b| b == b' ' || b == b'\r');
            let _tag = words.next();
            match words.next() {
                Some(w) if w.eq_ignore_ascii_case(b"AUTHENTICATE") => LineKind::Sasl,
                Some(w) if w.eq_ignore_ascii_case(b"IDLE") => LineKind::Done,
                _ => LineKind::Command,
            }
        }
        Some(LineKind::Sasl) if bytes == b"*\r\n" => LineKind::Command,
        Some(LineKind::Sasl) => state,
        _ => LineKind::Command,
    }
}

/// Frames `stream` at once and returns the logical messages, panicking on a framing error or an
/// incomplete end.
pub fn messages(direction: Direction, stream: &[u8]) -> Vec<Bytes> {
    let framed = frame_stream(direction, Limits::default(), stream, stream.len().max(1));
    assert_eq!(framed.error, None, "framing error");
    assert_eq!(framed.incomplete, None, "stream ends inside a message");
    framed
        .messages
        .into_iter()
        .map(|m| Bytes::from(m.bytes))
        .collect()
}

/// A C:/S: example of an RFC.
#[derive(Clone, Debug, Default)]
pub struct Example {
    pub title: String,
    /// `(is_client, line)`, line without CRLF.
    pub lines: Vec<(bool, String)>,
}

impl Example {
    /// The stream one side sends: its lines, each ending in CRLF.
    pub fn stream(&self, client: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (c, line) in &self.lines {
            if *c == client {
                out.extend_from_slice(line.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    pub fn incomplete(&self) -> bool {
        self.title.contains("[incomplete")
    }
}

/// Reads an example file of `tests/data` (format described at its top).
pub fn read_examples(name: &str) -> Vec<Example> {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut examples: Vec<Example> = Vec::new();
    let mut current: Option<Example> = None;
    for (n, line) in text.lines().enumerate() {
        if let Some(title) = line.strip_prefix("# ") {
            if current.as_ref().is_some_and(|c| !c.lines.is_empty()) {
                examples.extend(current.take());
            }
            current = Some(Example {
                title: title.to_string(),
                lines: Vec::new(),
            });
            continue;
        }
        if line.is_empty() || line == "#" {
            continue;
        }
        let (client, rest) = match (line.strip_prefix("C:"), line.strip_prefix("S:")) {
            (Some(rest), _) => (true, rest),
            (_, Some(rest)) => (false, rest),
            _ => panic!("{name}:{}: not a C:/S: line: {line}", n + 1),
        };
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        let example = current
            .as_mut()
            .unwrap_or_else(|| panic!("{name}:{}: a line before any example title", n + 1));
        example.lines.push((client, rest.to_string()));
    }
    examples.extend(current.filter(|c| !c.lines.is_empty()));
    examples
}
