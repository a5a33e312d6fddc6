//! Bytes on the wire, read independently of imapgate's own code: response framing and
//! classification (imap-codec first, a token reading where it gives up), literal announcements
//! at the end of a line, and escaping for failure reports.

use imap_codec::ResponseCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::response::{Response, Status};

/// What kind of response a server message is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Tagged { tag: String, status: String },
    Untagged,
    Continuation,
}

/// One whole response (literals included, final CRLF included).
#[derive(Clone, Debug)]
pub struct Resp {
    pub raw: Vec<u8>,
    pub kind: Kind,
    /// imap-codec and the token reading disagree about this response's tag or kind.
    pub disagreement: Option<String>,
}

impl Resp {
    pub fn tagged(&self) -> Option<(&str, &str)> {
        match &self.kind {
            Kind::Tagged { tag, status } => Some((tag, status)),
            _ => None,
        }
    }

    pub fn is_tagged(&self, want: &str) -> bool {
        self.tagged().is_some_and(|(t, _)| t == want)
    }

    pub fn is_continuation(&self) -> bool {
        self.kind == Kind::Continuation
    }
}

/// A literal announced at the end of a line: `{n}`, `{n+}`, `~{n}` or `~{n+}` (RFC 3501
/// `literal`, RFC 7888 `literal` with "+", RFC 3516 `literal8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announced {
    pub len: u64,
    pub sync: bool,
    pub binary: bool,
}

/// The literal `line` (without its line end) announces, if it ends with one.
pub fn announced(line: &[u8]) -> Option<Announced> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let sync = !digits.ends_with(b"+");
    if !sync {
        digits = &digits[..digits.len() - 1];
    }
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let binary = open > 0 && inner[open - 1] == b'~';
    Some(Announced { len, sync, binary })
}

/// `line` without its line end (CRLF or a bare LF).
pub fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The length of the first whole response in `buf` (CRLF-terminated lines, each `{n}` at a
/// line end followed by n octets), if `buf` holds one.
pub fn response_len(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let lf = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let end = lf + 2;
        match announced(&buf[at..lf]) {
            Some(lit) => {
                let after = end.checked_add(usize::try_from(lit.len).ok()?)?;
                if buf.len() < after {
                    return None;
                }
                at = after;
            }
            None => return Some(end),
        }
    }
}

/// Splits whole responses off the front of `buf`.
pub fn take_responses(buf: &mut Vec<u8>) -> Vec<Resp> {
    let mut out = Vec::new();
    while let Some(n) = response_len(buf) {
        let raw: Vec<u8> = buf.drain(..n).collect();
        out.push(classify(raw));
    }
    out
}

/// Classifies a response with imap-codec; where imap-codec does not know it (extensions),
/// by its first two tokens. Both readings are compared where both exist.
pub fn classify(raw: Vec<u8>) -> Resp {
    let by_tokens = kind_by_tokens(&raw);
    let by_codec = match ResponseCodec::default().decode(&raw) {
        Ok((b"", response)) => Some(kind_of(&response)),
        _ => None,
    };
    let disagreement = match &by_codec {
        Some(k) if *k != by_tokens => Some(format!(
            "imap-codec reads {k:?}, the token reading {by_tokens:?}"
        )),
        _ => None,
    };
    Resp {
        kind: by_codec.unwrap_or(by_tokens),
        raw,
        disagreement,
    }
}

fn kind_of(response: &Response<'_>) -> Kind {
    let tagged = |tag: &Option<imap_codec::imap_types::core::Tag<'_>>, status: &str| match tag {
        Some(t) => Kind::Tagged {
            tag: t.as_ref().to_string(),
            status: status.to_string(),
        },
        None => Kind::Untagged,
    };
    match response {
        Response::CommandContinuationRequest(_) => Kind::Continuation,
        Response::Data(_) => Kind::Untagged,
        Response::Status(Status::Ok { tag, .. }) => tagged(tag, "OK"),
        Response::Status(Status::No { tag, .. }) => tagged(tag, "NO"),
        Response::Status(Status::Bad { tag, .. }) => tagged(tag, "BAD"),
        Response::Status(_) => Kind::Untagged,
    }
}

fn kind_by_tokens(raw: &[u8]) -> Kind {
    let mut words = raw.split(|&b| b == b' ' || b == b'\r');
    let first = words.next().unwrap_or_default();
    match first {
        b"*" => Kind::Untagged,
        b"+" => Kind::Continuation,
        _ if raw.starts_with(b"+") => Kind::Continuation,
        tag => Kind::Tagged {
            tag: String::from_utf8_lossy(tag).into_owned(),
            status: String::from_utf8_lossy(words.next().unwrap_or_default()).to_uppercase(),
        },
    }
}

/// The first word of a command line (up to SP, CR or LF).
pub fn first_word(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(line.len());
    &line[..end]
}

/// Bytes as a double-quoted Rust-style string: printable ASCII as is, the rest escaped.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s.push('"');
    s
}

/// [`escape`], with long runs shortened (`...N bytes...`) so a report stays readable.
pub fn escape_short(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return escape(bytes);
    }
    let head = &bytes[..max / 2];
    let tail = &bytes[bytes.len() - max / 4..];
    format!(
        "{} ...{} bytes... {}",
        escape(head),
        bytes.len() - head.len() - tail.len(),
        escape(tail)
    )
}

/// Escaped bytes, one output line per line of input (split after each LF).
pub fn escape_lines(bytes: &[u8], indent: &str, max_line: usize) -> String {
    let mut out = String::new();
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        out.push_str(indent);
        out.push_str(&escape_short(line, max_line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_announcements() {
        let a = |s: &[u8]| announced(s);
        assert_eq!(
            a(b"a APPEND x {5}"),
            Some(Announced {
                len: 5,
                sync: true,
                binary: false
            })
        );
        assert_eq!(
            a(b"a APPEND x ~{0+}"),
            Some(Announced {
                len: 0,
                sync: false,
                binary: true
            })
        );
        assert_eq!(a(b"a NOOP {x}"), None);
        assert_eq!(a(b"a NOOP {}"), None);
        assert_eq!(a(b"a NOOP"), None);
    }

    #[test]
    fn responses_are_framed_with_their_literals() {
        let mut buf = b"* 1 FETCH (BODY[] {3}\r\nA\r\n)\r\na OK done\r\n+ go".to_vec();
        let r = take_responses(&mut buf);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].kind, Kind::Untagged);
        assert!(r[1].is_tagged("a"));
        assert_eq!(buf, b"+ go");
        buf.extend_from_slice(b"\r\n");
        assert!(take_responses(&mut buf)[0].is_continuation());
    }
}
