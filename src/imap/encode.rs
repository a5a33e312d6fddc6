//! Writing messages back: changed tokens are encoded from typed values, never joined as strings.
//!
//! An unchanged message is relayed as its original bytes; this module is only used for what a
//! policy or the proxy changed. A string becomes an atom, a quoted string or a literal, whichever
//! is valid for its bytes, so CR, LF and NUL can never leak into an atom or quoted string, and a
//! mailbox name is written in modified UTF-7 unless UTF8=ACCEPT is in force.

use std::io::Write as _;

use super::mutf7;
use super::response::Status;
use super::syntax::{Span, is_astring_char};

/// A value to be written on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// An atom, written as is after validation (flags, keywords, numbers, sequence sets, fetch
    /// items without spaces such as `BODY[]`).
    Atom(Vec<u8>),
    /// A string: quoted when it can be, a literal otherwise.
    String(Vec<u8>),
    /// An astring (e.g. a mailbox name): a bare atom when it can be, else as [`Value::String`].
    AString(Vec<u8>),
    List(Vec<Value>),
    Nil,
    /// Always a literal, in the form the options allow (used to re-announce a literal that
    /// imapgate already took from the client).
    Literal(Vec<u8>),
}

impl Value {
    /// A mailbox name, encoded for the wire: modified UTF-7 unless UTF8=ACCEPT is in force,
    /// and INBOX in its canonical spelling.
    pub fn mailbox(name: &str, utf8: bool) -> Value {
        if name.eq_ignore_ascii_case("INBOX") {
            return Value::AString(b"INBOX".to_vec());
        }
        if utf8 {
            Value::AString(name.as_bytes().to_vec())
        } else {
            Value::AString(mutf7::encode(name).into_bytes())
        }
    }
}

/// How literals may be written in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiteralForm {
    /// Server to client: `{n}`, sent at once.
    Server,
    /// Client to server with LITERAL+: `{n+}`, sent at once.
    NonSync,
    /// Client to server without LITERAL+: `{n}`, after which the sender waits for `+`.
    Sync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    pub literal: LiteralForm,
    /// UTF8=ACCEPT (RFC 6855/9051) is in force: quoted strings may carry UTF-8.
    pub utf8: bool,
}

impl EncodeOptions {
    pub const SERVER: EncodeOptions = EncodeOptions {
        literal: LiteralForm::Server,
        utf8: false,
    };
}

/// Encoded bytes. (Where a client must wait for `+` is found by
/// [`super::sync_literals`], from the bytes, as for every message sent upstream.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("not a valid atom: {0:?}")]
    InvalidAtom(String),
    #[error("a string holds a NUL octet, which no IMAP string may carry")]
    Nul,
    #[error("text holds CR, LF or NUL, or starts with \"[\"")]
    InvalidText,
    #[error("edits overlap or are out of order")]
    OverlappingEdits,
    #[error("a response code holds a string that needs a literal; codes are one line of text")]
    LiteralInCode,
}

/// Strings longer than this are written as literals even when they could be quoted, to keep
/// lines short.
const MAX_QUOTED: usize = 1024;

/// True when `atom` can be written bare and reads back as the same atom (not NIL, no specials,
/// brackets balanced as in `BODY[]`).
pub fn is_valid_atom(atom: &[u8]) -> bool {
    if atom.is_empty() || atom.eq_ignore_ascii_case(b"NIL") {
        return false;
    }
    let mut depth = 0usize;
    for &b in atom {
        match b {
            b'[' => depth += 1,
            b']' if depth > 0 => depth -= 1,
            b']' => {}
            b'(' | b')' | b'{' | b'"' => return false,
            0x21..=0x7e => {}
            _ => return false,
        }
    }
    depth == 0
}

/// True when `s` can be written as a quoted string; otherwise it needs a literal.
fn quotable(s: &[u8], opts: EncodeOptions) -> bool {
    s.len() <= MAX_QUOTED
        && !s.iter().any(|&b| b == b'\r' || b == b'\n')
        && (s.is_ascii() || (opts.utf8 && std::str::from_utf8(s).is_ok()))
}

/// True when `value` is written without a literal, as the data of a response code must be
/// (`resp-text-code` is part of one line; a literal there would end the line for the framer).
fn fits_in_line(value: &Value, opts: EncodeOptions) -> bool {
    match value {
        Value::String(s) => quotable(s, opts),
        Value::AString(s) => s.iter().all(|&b| is_astring_char(b)) || quotable(s, opts),
        Value::List(items) => items.iter().all(|v| fits_in_line(v, opts)),
        Value::Literal(_) => false,
        Value::Atom(_) | Value::Nil => true,
    }
}

impl Encoded {
    pub fn new() -> Self {
        Encoded::default()
    }

    /// Writes one value.
    pub fn value(&mut self, value: &Value, opts: EncodeOptions) -> Result<(), EncodeError> {
        match value {
            Value::Atom(atom) => {
                if !is_valid_atom(atom) {
                    return Err(EncodeError::InvalidAtom(
                        String::from_utf8_lossy(atom).into_owned(),
                    ));
                }
                self.bytes.extend_from_slice(atom);
            }
            Value::AString(s) => {
                if !s.is_empty()
                    && s.iter().all(|&b| is_astring_char(b))
                    && !s.eq_ignore_ascii_case(b"NIL")
                {
                    self.bytes.extend_from_slice(s);
                } else {
                    self.string(s, opts)?;
                }
            }
            Value::String(s) => self.string(s, opts)?,
            Value::Literal(s) => self.literal(s, opts)?,
            Value::Nil => self.bytes.extend_from_slice(b"NIL"),
            Value::List(items) => {
                self.bytes.push(b'(');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.bytes.push(b' ');
                    }
                    self.value(item, opts)?;
                }
                self.bytes.push(b')');
            }
        }
        Ok(())
    }

    /// ```abnf
    /// string = quoted / literal
    /// ```
    pub fn string(&mut self, s: &[u8], opts: EncodeOptions) -> Result<(), EncodeError> {
        if s.contains(&0) {
            return Err(EncodeError::Nul);
        }
        if quotable(s, opts) {
            self.bytes.reserve(s.len() + 2);
            self.bytes.push(b'"');
            for &b in s {
                if b == b'"' || b == b'\\' {
                    self.bytes.push(b'\\');
                }
                self.bytes.push(b);
            }
            self.bytes.push(b'"');
            return Ok(());
        }
        self.literal(s, opts)
    }

    /// ```abnf
    /// literal = "{" number64 ["+"] "}" CRLF *CHAR8
    /// ```
    pub fn literal(&mut self, s: &[u8], opts: EncodeOptions) -> Result<(), EncodeError> {
        if s.contains(&0) {
            return Err(EncodeError::Nul);
        }
        let plus = if opts.literal == LiteralForm::NonSync {
            "+"
        } else {
            ""
        };
        // Writing to a Vec cannot fail.
        let _ = write!(self.bytes, "{{{}{plus}}}\r\n", s.len());
        self.bytes.extend_from_slice(s);
        Ok(())
    }

    /// Free text (`text = 1*TEXT-CHAR`), checked.
    pub fn text(&mut self, text: &[u8]) -> Result<(), EncodeError> {
        if text.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) || text.first() == Some(&b'[') {
            return Err(EncodeError::InvalidText);
        }
        self.bytes.extend_from_slice(text);
        Ok(())
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
}

/// A replacement of one token (by its span) with a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edit {
    pub span: Span,
    pub value: Value,
}

/// Copies `raw` with each edit's span replaced by its encoded value; bytes outside the edits are
/// kept exactly. Edits must be sorted and must not overlap.
pub fn splice(raw: &[u8], edits: &[Edit], opts: EncodeOptions) -> Result<Encoded, EncodeError> {
    let mut out = Encoded::new();
    out.bytes.reserve(raw.len() + 16);
    let mut at = 0;
    for edit in edits {
        if edit.span.start < at || edit.span.end > raw.len() || edit.span.start > edit.span.end {
            return Err(EncodeError::OverlappingEdits);
        }
        out.raw(&raw[at..edit.span.start]);
        out.value(&edit.value, opts)?;
        at = edit.span.end;
    }
    out.raw(&raw[at..]);
    Ok(out)
}

/// ```abnf
/// command = tag SP command-name *(SP argument) CRLF
/// ```
pub fn command(
    tag: &[u8],
    name: &[u8],
    args: &[Value],
    opts: EncodeOptions,
) -> Result<Encoded, EncodeError> {
    let mut out = Encoded::new();
    if tag.is_empty() || !tag.iter().all(|&b| is_astring_char(b) && b != b'+') {
        return Err(EncodeError::InvalidAtom(
            String::from_utf8_lossy(tag).into_owned(),
        ));
    }
    out.raw(tag);
    out.raw(b" ");
    out.value(&Value::Atom(name.to_vec()), opts)?;
    for arg in args {
        out.raw(b" ");
        out.value(arg, opts)?;
    }
    out.raw(b"\r\n");
    Ok(out)
}

/// A response built from values (for responses the proxy writes itself, and for tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseValue {
    Continuation {
        text: Vec<u8>,
    },
    Status {
        tag: Option<Vec<u8>>,
        status: Status,
        code: Option<(Vec<u8>, Vec<Value>)>,
        text: Vec<u8>,
    },
    Data {
        number: Option<u64>,
        name: Vec<u8>,
        args: Vec<Value>,
    },
}

/// ```abnf
/// response-tagged / response-data / continue-req, each ending in CRLF
/// ```
pub fn response(value: &ResponseValue) -> Result<Encoded, EncodeError> {
    let opts = EncodeOptions::SERVER;
    let mut out = Encoded::new();
    match value {
        ResponseValue::Continuation { text } => {
            // continue-req = "+" SP (resp-text / base64) CRLF: the SP even before nothing
            // (an empty SASL challenge).
            out.raw(b"+ ");
            if !text.is_empty() {
                out.text(text)?;
            }
        }
        ResponseValue::Status {
            tag,
            status,
            code,
            text,
        } => {
            match tag {
                Some(tag) => {
                    if tag.is_empty() || !tag.iter().all(|&b| is_astring_char(b) && b != b'+') {
                        return Err(EncodeError::InvalidAtom(
                            String::from_utf8_lossy(tag).into_owned(),
                        ));
                    }
                    out.raw(tag);
                }
                None => out.raw(b"*"),
            }
            out.raw(b" ");
            out.raw(status.as_str().as_bytes());
            if let Some((name, args)) = code {
                out.raw(b" [");
                out.value(&Value::Atom(name.clone()), opts)?;
                if name.contains(&b']') || name.contains(&b'[') {
                    return Err(EncodeError::InvalidAtom(
                        String::from_utf8_lossy(name).into_owned(),
                    ));
                }
                for arg in args {
                    if !fits_in_line(arg, opts) {
                        return Err(EncodeError::LiteralInCode);
                    }
                    out.raw(b" ");
                    out.value(arg, opts)?;
                }
                out.raw(b"]");
            }
            if !text.is_empty() {
                out.raw(b" ");
                out.text(text)?;
            }
        }
        ResponseValue::Data { number, name, args } => {
            out.raw(b"* ");
            if let Some(n) = number {
                let _ = write!(out.bytes, "{n} ");
            }
            out.value(&Value::Atom(name.clone()), opts)?;
            for arg in args {
                out.raw(b" ");
                out.value(arg, opts)?;
            }
        }
    }
    out.raw(b"\r\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &Value, opts: EncodeOptions) -> Vec<u8> {
        let mut out = Encoded::new();
        out.value(v, opts).expect("encodes");
        out.bytes
    }

    const NONSYNC: EncodeOptions = EncodeOptions {
        literal: LiteralForm::NonSync,
        utf8: false,
    };

    #[test]
    fn astring_picks_atom_quoted_or_literal() {
        assert_eq!(enc(&Value::AString(b"Sent".to_vec()), NONSYNC), b"Sent");
        assert_eq!(enc(&Value::AString(b"a b".to_vec()), NONSYNC), b"\"a b\"");
        assert_eq!(enc(&Value::AString(b"nil".to_vec()), NONSYNC), b"\"nil\"");
        assert_eq!(enc(&Value::AString(b"".to_vec()), NONSYNC), b"\"\"");
        assert_eq!(
            enc(&Value::AString(b"a\"\\".to_vec()), NONSYNC),
            b"\"a\\\"\\\\\""
        );
        assert_eq!(
            enc(&Value::AString(b"a\r\nb".to_vec()), NONSYNC),
            b"{4+}\r\na\r\nb"
        );
    }

    #[test]
    fn cr_lf_nul_never_reach_an_atom_or_quoted_string() {
        let mut out = Encoded::new();
        assert_eq!(
            out.value(&Value::Atom(b"a\r\nb".to_vec()), NONSYNC),
            Err(EncodeError::InvalidAtom("a\r\nb".into()))
        );
        assert_eq!(
            out.value(&Value::String(b"a\0b".to_vec()), NONSYNC),
            Err(EncodeError::Nul)
        );
        assert_eq!(out.text(b"x\r\na2 LOGOUT"), Err(EncodeError::InvalidText));
    }

    #[test]
    fn sync_literals_are_announced_without_plus() {
        let opts = EncodeOptions {
            literal: LiteralForm::Sync,
            utf8: false,
        };
        let out =
            command(b"a1", b"SELECT", &[Value::String(b"x\ny".to_vec())], opts).expect("encodes");
        assert_eq!(out.bytes, b"a1 SELECT {3}\r\nx\ny\r\n");
    }

    #[test]
    fn mailbox_names_are_modified_utf7_unless_utf8_accept() {
        assert_eq!(
            enc(&Value::mailbox("Entwürfe", false), NONSYNC),
            b"Entw&APw-rfe"
        );
        let utf8 = EncodeOptions {
            utf8: true,
            ..NONSYNC
        };
        assert_eq!(
            enc(&Value::mailbox("Entwürfe", true), utf8),
            "\"Entwürfe\"".as_bytes()
        );
        assert_eq!(enc(&Value::mailbox("inbox", false), NONSYNC), b"INBOX");
    }

    #[test]
    fn splice_keeps_every_other_byte() {
        let raw = b"a1  RENAME  \"old\"   new\r\n";
        let edits = [
            Edit {
                span: Span::new(12, 17),
                value: Value::AString(b"x y".to_vec()),
            },
            Edit {
                span: Span::new(20, 23),
                value: Value::AString(b"z".to_vec()),
            },
        ];
        let out = splice(raw, &edits, NONSYNC).expect("splices");
        assert_eq!(out.bytes, b"a1  RENAME  \"x y\"   z\r\n");
        let overlapping = [edits[1].clone(), edits[0].clone()];
        assert!(splice(raw, &overlapping, NONSYNC).is_err());
    }

    #[test]
    fn responses_from_values() {
        let r = ResponseValue::Status {
            tag: Some(b"a1".to_vec()),
            status: Status::No,
            code: Some((b"PRIVACYREQUIRED".to_vec(), vec![])),
            text: b"TLS first".to_vec(),
        };
        assert_eq!(
            response(&r).expect("encodes").bytes,
            b"a1 NO [PRIVACYREQUIRED] TLS first\r\n"
        );
    }
}
