//! The lenient token tree every command and response is parsed into (nom).
//!
//! IMAP's grammar is large and keeps growing with extensions, but nearly all of it is built from a
//! handful of shapes: atoms, numbers, quoted strings, literals, parenthesized lists and NIL. The
//! proxy parses every message into a tree of those shapes, recording where each token lies in the
//! raw bytes, so that typed views ([`crate::imap::command`], [`crate::imap::response`]) can pick
//! out what they need and the encoder can replace one token while every other byte stays as sent.
//! Unknown extensions therefore parse too, and pass through untouched.
//!
//! Commands and responses are read in two dialects ([`Cx::command`], [`Cx::new`]). Responses are
//! read leniently, so that a server's slightly wrong response still relays. Commands are read
//! with the token boundaries the upstream finds (Dovecot's parser: an atom runs to SP, CRLF or a
//! list's `)`, and `(`, `{`, `"`, CTL and 8-bit octets inside it are errors), or refused: a
//! command that imapgate read one way and the upstream another would let a policy judge one
//! command while another runs. Where the RFC allows what Dovecot refuses, the command is refused.
//! So in a command `[` and `]` are atom octets like any other, and a fetch item with a header
//! list is three tokens, as Dovecot reads it: `BODY[HEADER.FIELDS`, `(DATE FROM)`, `]<0.10>`;
//! a literal among the header names is then a token of the tree like any other.

use std::borrow::Cow;

use nom::IResult;
use nom::bytes::complete::{tag, take_while1};
use nom::error::{ErrorKind, ParseError as NomParseError};

use super::framing::Literal;

/// Deepest nesting of parentheses and brackets accepted (BODYSTRUCTURE of a deeply nested
/// multipart stays far below it; hostile input does not).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// A byte range in a message's raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }

    pub fn of<'a>(&self, raw: &'a [u8]) -> &'a [u8] {
        &raw[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// One node of the token tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    /// An atom, number, sequence set, flag, or a fetch item with its `[section]<partial>` (in a
    /// command, up to a header list's SP):
    /// everything that is not a string, a list or NIL.
    Atom(Span),
    /// A quoted string; the span includes the quotes. `escaped` when it holds `\\` or `\"`.
    Quoted { span: Span, escaped: bool },
    /// A literal; the span runs from the announcement to the end of the data. `data` is `None`
    /// when the message was cut before the data (a streamed literal).
    Literal {
        span: Span,
        data: Option<Span>,
        literal: Literal,
    },
    /// A parenthesized list; the span includes the parentheses.
    List { span: Span, items: Vec<Token> },
    /// NIL, in a response. In a command `NIL` is an [`Token::Atom`]: in an astring position
    /// it names a mailbox (Dovecot's `CREATE NIL` creates one), and a policy must see it.
    Nil(Span),
}

impl Token {
    pub fn span(&self) -> Span {
        match self {
            Token::Atom(span) | Token::Nil(span) => *span,
            Token::Quoted { span, .. } | Token::Literal { span, .. } | Token::List { span, .. } => {
                *span
            }
        }
    }

    /// The raw bytes of the token as sent.
    pub fn raw<'a>(&self, raw: &'a [u8]) -> &'a [u8] {
        self.span().of(raw)
    }

    /// The string value of an atom, quoted string or literal (`astring`, `string`), unescaped.
    /// `None` for NIL, lists and streamed literals.
    pub fn string<'a>(&self, raw: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        match self {
            Token::Atom(span) => Some(Cow::Borrowed(span.of(raw))),
            Token::Quoted { span, escaped } => {
                let inner = &raw[span.start + 1..span.end - 1];
                if *escaped {
                    Some(Cow::Owned(unescape(inner)))
                } else {
                    Some(Cow::Borrowed(inner))
                }
            }
            Token::Literal {
                data: Some(data), ..
            } => Some(Cow::Borrowed(data.of(raw))),
            _ => None,
        }
    }

    /// An atom's bytes, when the token is an atom.
    pub fn atom<'a>(&self, raw: &'a [u8]) -> Option<&'a [u8]> {
        match self {
            Token::Atom(span) => Some(span.of(raw)),
            _ => None,
        }
    }

    /// True for an atom equal to `word`, ignoring ASCII case.
    pub fn is_atom(&self, raw: &[u8], word: &str) -> bool {
        self.atom(raw)
            .is_some_and(|a| a.eq_ignore_ascii_case(word.as_bytes()))
    }

    /// A number (`number = 1*DIGIT`, up to 64 bits).
    pub fn number(&self, raw: &[u8]) -> Option<u64> {
        let digits = self.atom(raw)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    }

    /// True for a literal whose data is not in the message (a streamed literal the message was
    /// cut at), or a list left open by one.
    pub fn is_cut(&self) -> bool {
        match self {
            Token::Literal { data: None, .. } => true,
            Token::List { items, .. } => items.last().is_some_and(Token::is_cut),
            _ => false,
        }
    }

    pub fn items(&self) -> Option<&[Token]> {
        match self {
            Token::List { items, .. } => Some(items),
            _ => None,
        }
    }
}

fn unescape(inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            if let Some(&next) = bytes.next() {
                out.push(next);
            }
        } else {
            out.push(b);
        }
    }
    out
}

/// What an atom in a command may hold: every CHAR but `( ) { "`, SP and CTL, as Dovecot reads
/// atoms (its atom-specials on input). That covers ATOM-CHAR (with `[`), ASTRING-CHAR (`]`),
/// list-char (`%`, `*`), flags (`\`), sequence sets and fetch items. 8-bit octets are not CHAR.
const COMMAND_ATOM: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        table[b] = !matches!(b as u8, b'(' | b')' | b'{' | b'"');
        b += 1;
    }
    table
};

/// `ATOM-CHAR = <any CHAR except atom-specials>`
pub fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
}

/// `ASTRING-CHAR = ATOM-CHAR / resp-specials`
pub fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

/// What the lenient atom rule accepts: ATOM-CHAR plus list-wildcards, `\` (flags), `]` where it
/// does not close a response code, and 8-bit octets (UTF-8 from clients that ignore the rules).
fn is_lenient_atom_char(b: u8, in_code: bool) -> bool {
    match b {
        b'(' | b')' | b'{' | b'"' | b'[' => false,
        b']' => !in_code,
        0x21..=0x7e | 0x80..=0xff => true,
        _ => false,
    }
}

/// Why a message did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxErrorKind {
    #[error("nesting deeper than {0} levels")]
    TooDeep(usize),
    #[error("invalid quoted string")]
    BadQuoted,
    #[error("invalid literal")]
    BadLiteral,
    #[error("unbalanced parenthesis or bracket")]
    Unbalanced,
    #[error("expected {0}")]
    Expected(&'static str),
    #[error("unexpected octet")]
    Unexpected,
    #[error("literal8 is only valid in APPEND")]
    Literal8NotAllowed,
}

/// A parse failure and where it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} at offset {offset}")]
pub struct SyntaxError {
    pub kind: SyntaxErrorKind,
    pub offset: usize,
}

/// The nom error type of this module: the remaining input and what went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PError<'a> {
    pub input: &'a [u8],
    pub kind: SyntaxErrorKind,
}

impl<'a> NomParseError<&'a [u8]> for PError<'a> {
    fn from_error_kind(input: &'a [u8], _kind: ErrorKind) -> Self {
        PError {
            input,
            kind: SyntaxErrorKind::Unexpected,
        }
    }

    fn append(_input: &'a [u8], _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

pub type PResult<'a, T> = IResult<&'a [u8], T, PError<'a>>;

fn fail<T>(input: &[u8], kind: SyntaxErrorKind) -> PResult<'_, T> {
    Err(nom::Err::Error(PError { input, kind }))
}

/// Which peer wrote the message being parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    /// A server response: lenient.
    Response,
    /// A client command: Dovecot's token boundaries, RFC syntax, or an error.
    Command {
        /// A list may be followed by `]` (a fetch item's header list: `(DATE FROM)]<0.10>`).
        fetch: bool,
        /// `~{n}` may announce a literal8 (RFC 3516 allows it only in APPEND's data).
        literal8: bool,
    },
}

/// The parsing context of one message: its length (spans are computed from what is left), the
/// nesting bound and the dialect.
#[derive(Clone, Copy, Debug)]
pub struct Cx {
    len: usize,
    max_depth: usize,
    dialect: Dialect,
}

impl Cx {
    /// The context of a response (the lenient dialect).
    pub fn new(raw: &[u8]) -> Self {
        Cx {
            len: raw.len(),
            max_depth: DEFAULT_MAX_DEPTH,
            dialect: Dialect::Response,
        }
    }

    /// The context of a command: no fetch items and no literal8 until allowed.
    pub fn command(raw: &[u8]) -> Self {
        Cx {
            dialect: Dialect::Command {
                fetch: false,
                literal8: false,
            },
            ..Cx::new(raw)
        }
    }

    /// Lets a header list end a fetch item's section (FETCH and UID FETCH).
    pub fn with_fetch(mut self, allowed: bool) -> Self {
        if let Dialect::Command { fetch, .. } = &mut self.dialect {
            *fetch = allowed;
        }
        self
    }

    /// Lets `~{n}` announce a literal8 (APPEND).
    pub fn with_literal8(mut self, allowed: bool) -> Self {
        if let Dialect::Command { literal8, .. } = &mut self.dialect {
            *literal8 = allowed;
        }
        self
    }

    pub fn with_max_depth(mut self, max_depth: usize) -> Self {
        self.max_depth = max_depth;
        self
    }

    fn is_command(&self) -> bool {
        matches!(self.dialect, Dialect::Command { .. })
    }

    /// In a command, a token is followed by SP, the `closer` of what encloses it, or the end of
    /// the line (an error, unless at the top level) or of the message (cut at a streamed
    /// literal): the caller's loop tells those apart. In FETCH a list may also be followed by
    /// the `]` that closes its section. Dovecot also reads `"a""b"` or `"a"(b)` as two tokens,
    /// the RFC does not; and `x{5}` or `x"y"` it refuses, so they must never be read as an atom
    /// followed by a literal or a string.
    fn separated<'a>(&self, rest: &'a [u8], closer: u8, token: &Token) -> PResult<'a, ()> {
        let Dialect::Command { fetch, .. } = self.dialect else {
            return Ok((rest, ()));
        };
        match rest.first() {
            None | Some(b' ' | b'\r') => Ok((rest, ())),
            Some(&b) if b == closer => Ok((rest, ())),
            Some(b']') if fetch && matches!(token, Token::List { .. }) => Ok((rest, ())),
            Some(_) => fail(rest, SyntaxErrorKind::Expected("SP")),
        }
    }

    /// Offset in the message of the remaining input `rest`.
    pub fn pos(&self, rest: &[u8]) -> usize {
        self.len - rest.len()
    }

    fn span(&self, before: &[u8], after: &[u8]) -> Span {
        Span::new(self.pos(before), self.pos(after))
    }

    /// Turns a nom failure into a [`SyntaxError`] with an offset.
    pub fn error(&self, e: nom::Err<PError<'_>>) -> SyntaxError {
        match e {
            nom::Err::Error(e) | nom::Err::Failure(e) => SyntaxError {
                kind: e.kind,
                offset: self.pos(e.input),
            },
            nom::Err::Incomplete(_) => SyntaxError {
                kind: SyntaxErrorKind::Unexpected,
                offset: self.len,
            },
        }
    }

    /// ```abnf
    /// token = atom / number / sequence-set / flag / fetch-att / string / list / "NIL"
    /// ; the union of IMAP's argument shapes, parsed leniently
    /// ```
    pub fn token<'a>(&self, i: &'a [u8], depth: usize, in_code: bool) -> PResult<'a, Token> {
        match i.first() {
            Some(b'(') => self.list(i, depth, in_code),
            Some(b'"') => self.quoted(i),
            Some(b'{') => self.literal(i),
            Some(b'~') if i.get(1) == Some(&b'{') => self.literal(i),
            _ => {
                let (rest, ()) = self.atom(i, depth, in_code)?;
                let span = self.span(i, rest);
                let nil = span.len() == 3 && i[..3].eq_ignore_ascii_case(b"NIL");
                if nil && !self.is_command() {
                    Ok((rest, Token::Nil(span)))
                } else {
                    Ok((rest, Token::Atom(span)))
                }
            }
        }
    }

    /// ```abnf
    /// atom      = 1*ATOM-CHAR
    /// list-char = ATOM-CHAR / list-wildcards / resp-specials
    /// flag      = "\" atom / atom
    /// fetch-att = ... / "BODY" [".PEEK"] section ["<" number "." nz-number ">"] /
    ///             "BINARY" [".PEEK"] section-binary [partial] / "BINARY.SIZE" section-binary
    /// ; one token for all of them. In a command: every CHAR but ( ) { " SP CTL, brackets
    /// ; included (a section's header list is a token of its own). In a response: also 8-bit
    /// ; octets, and a bracketed section, SP and lists included.
    /// ; `in_code`: in a response, a "]" closes what encloses the atom (a section or a code).
    /// ```
    pub fn atom<'a>(&self, i: &'a [u8], depth: usize, in_code: bool) -> PResult<'a, ()> {
        let mut rest = i;
        match self.dialect {
            Dialect::Response => loop {
                let n = rest
                    .iter()
                    .position(|&b| !is_lenient_atom_char(b, in_code))
                    .unwrap_or(rest.len());
                rest = &rest[n..];
                if rest.first() == Some(&b'[') {
                    rest = self.section(rest, depth)?.0;
                } else {
                    break;
                }
            },
            Dialect::Command { .. } => {
                let n = rest
                    .iter()
                    .position(|&b| !COMMAND_ATOM[usize::from(b)])
                    .unwrap_or(rest.len());
                rest = &rest[n..];
            }
        }
        if rest.len() == i.len() {
            return fail(i, SyntaxErrorKind::Expected("atom"));
        }
        Ok((rest, ()))
    }

    /// ```abnf
    /// section        = "[" [section-spec] "]"
    /// section-spec   = section-msgtext / (section-part ["." section-text])
    /// section-binary = "[" [section-part] "]"
    /// ; in a response, leniently: any tokens separated by SP
    /// ```
    fn section<'a>(&self, i: &'a [u8], depth: usize) -> PResult<'a, ()> {
        if depth >= self.max_depth {
            return fail(i, SyntaxErrorKind::TooDeep(self.max_depth));
        }
        let (mut rest, _) = tag::<_, _, PError<'a>>(&b"["[..])(i)?;
        loop {
            match rest.first() {
                Some(b']') => return Ok((&rest[1..], ())),
                Some(b' ') => rest = &rest[1..],
                Some(b'\r' | b'\n') | None => return fail(rest, SyntaxErrorKind::Unbalanced),
                Some(_) => rest = self.token(rest, depth + 1, true)?.0,
            }
        }
    }

    /// ```abnf
    /// quoted       = DQUOTE *QUOTED-CHAR DQUOTE
    /// QUOTED-CHAR  = <any TEXT-CHAR except quoted-specials> / "\" quoted-specials / UTF8-2 / UTF8-3 / UTF8-4
    /// ```
    pub fn quoted<'a>(&self, i: &'a [u8]) -> PResult<'a, Token> {
        let mut escaped = false;
        let mut k = 1;
        while let Some(&b) = i.get(k) {
            match b {
                b'"' => {
                    let rest = &i[k + 1..];
                    let span = self.span(i, rest);
                    return Ok((rest, Token::Quoted { span, escaped }));
                }
                b'\\' => match i.get(k + 1) {
                    Some(b'\\' | b'"') => {
                        escaped = true;
                        k += 2;
                    }
                    _ => return fail(&i[k..], SyntaxErrorKind::BadQuoted),
                },
                b'\r' | b'\n' | 0 => return fail(&i[k..], SyntaxErrorKind::BadQuoted),
                _ => k += 1,
            }
        }
        fail(&i[k..], SyntaxErrorKind::BadQuoted)
    }

    /// ```abnf
    /// literal  = "{" number64 ["+"] "}" CRLF *CHAR8
    /// literal8 = "~{" number64 ["+"] "}" CRLF *OCTET
    /// ; a message cut after the CRLF (a streamed literal) yields a literal without data;
    /// ; in a command a literal8 only where allowed (APPEND)
    /// ```
    pub fn literal<'a>(&self, i: &'a [u8]) -> PResult<'a, Token> {
        let (rest, binary) = match i.strip_prefix(b"~") {
            Some(rest) => (rest, true),
            None => (i, false),
        };
        if binary
            && matches!(
                self.dialect,
                Dialect::Command {
                    literal8: false,
                    ..
                }
            )
        {
            return fail(i, SyntaxErrorKind::Literal8NotAllowed);
        }
        let (rest, _) = tag::<_, _, PError<'a>>(&b"{"[..])(rest)?;
        let (rest, digits) = take_while1::<_, _, PError<'a>>(|b: u8| b.is_ascii_digit())(rest)
            .map_err(|_| bad_literal(rest))?;
        let (rest, sync) = match rest.strip_prefix(b"+") {
            Some(rest) => (rest, false),
            None => (rest, true),
        };
        let rest = rest
            .strip_prefix(b"}\r\n")
            .ok_or_else(|| bad_literal(rest))?;
        let len = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<u32>().ok())
            .ok_or_else(|| bad_literal(digits))?;
        let literal = Literal { len, sync, binary };
        let n = len as usize;
        // A message never ends right after an announcement (a CRLF follows the data, even
        // none): here it was cut there, at a synchronizing literal, `{0}` included.
        if rest.is_empty() {
            let span = self.span(i, rest);
            return Ok((
                rest,
                Token::Literal {
                    span,
                    data: None,
                    literal,
                },
            ));
        }
        if rest.len() < n {
            return fail(rest, SyntaxErrorKind::BadLiteral);
        }
        let data = self.span(rest, &rest[n..]);
        let rest = &rest[n..];
        let span = self.span(i, rest);
        Ok((
            rest,
            Token::Literal {
                span,
                data: Some(data),
                literal,
            },
        ))
    }

    /// ```abnf
    /// list = "(" [token *(SP token)] ")"
    /// ; lenient about repeated spaces
    /// ```
    pub fn list<'a>(&self, i: &'a [u8], depth: usize, in_code: bool) -> PResult<'a, Token> {
        if depth >= self.max_depth {
            return fail(i, SyntaxErrorKind::TooDeep(self.max_depth));
        }
        let mut rest = &i[1..];
        let mut items = Vec::new();
        loop {
            match rest.first() {
                Some(b')') => {
                    let rest = &rest[1..];
                    let span = self.span(i, rest);
                    return Ok((rest, Token::List { span, items }));
                }
                Some(b' ') => rest = &rest[1..],
                // A message cut at a streamed literal inside a list ends with the list open.
                None if items.last().is_some_and(Token::is_cut) => {
                    let span = self.span(i, rest);
                    return Ok((rest, Token::List { span, items }));
                }
                Some(b'\r' | b'\n') | None => return fail(rest, SyntaxErrorKind::Unbalanced),
                Some(_) => {
                    let (r, token) = self.token(rest, depth + 1, in_code)?;
                    rest = self.separated(r, b')', &token)?.0;
                    items.push(token);
                }
            }
        }
    }

    /// ```abnf
    /// arguments = *(SP token) CRLF
    /// ; lenient about repeated and trailing spaces
    /// ```
    pub fn arguments<'a>(&self, i: &'a [u8]) -> PResult<'a, Vec<Token>> {
        let mut rest = i;
        let mut items = Vec::new();
        loop {
            match rest.first() {
                Some(b' ') => rest = &rest[1..],
                Some(b'\r') if rest == b"\r\n" => return Ok((&rest[2..], items)),
                // A message cut at a streamed literal ends right after the literal's CRLF.
                None if items.last().is_some_and(Token::is_cut) => {
                    return Ok((rest, items));
                }
                None | Some(b'\r' | b'\n') => return fail(rest, SyntaxErrorKind::Expected("CRLF")),
                Some(b')') => return fail(rest, SyntaxErrorKind::Unbalanced),
                Some(_) => {
                    let (r, token) = self.token(rest, 0, false)?;
                    rest = self.separated(r, b'\r', &token)?.0;
                    items.push(token);
                }
            }
        }
    }

    /// ```abnf
    /// tag = 1*<any ASTRING-CHAR except "+">
    /// ; in a command also not "]": Dovecot refuses such a tag (untagged BAD), so the command
    /// ; would never be answered
    /// ```
    pub fn tag<'a>(&self, i: &'a [u8]) -> PResult<'a, Span> {
        let command = self.is_command();
        let (rest, _) = take_while1::<_, _, PError<'a>>(|b| {
            is_astring_char(b) && b != b'+' && !(command && b == b']')
        })(i)
        .map_err(|_| nom::Err::Error(expected(i, "tag")))?;
        Ok((rest, self.span(i, rest)))
    }

    /// The next space-delimited word (an atom in the strict sense, e.g. a command name).
    pub fn word<'a>(&self, i: &'a [u8]) -> PResult<'a, Span> {
        let (rest, _) = take_while1::<_, _, PError<'a>>(is_atom_char)(i)
            .map_err(|_| nom::Err::Error(expected(i, "atom")))?;
        Ok((rest, self.span(i, rest)))
    }

    /// A single SP.
    pub fn sp<'a>(&self, i: &'a [u8]) -> PResult<'a, ()> {
        match i.first() {
            Some(b' ') => Ok((&i[1..], ())),
            _ => fail(i, SyntaxErrorKind::Expected("SP")),
        }
    }

    /// ```abnf
    /// text = 1*TEXT-CHAR   ; up to, not including, CRLF
    /// ```
    pub fn text<'a>(&self, i: &'a [u8]) -> PResult<'a, Span> {
        let n = memchr::memchr2(b'\r', b'\n', i).unwrap_or(i.len());
        let rest = &i[n..];
        if rest != b"\r\n" {
            return fail(rest, SyntaxErrorKind::Expected("CRLF"));
        }
        Ok((&rest[2..], self.span(i, rest)))
    }
}

fn bad_literal(input: &[u8]) -> nom::Err<PError<'_>> {
    nom::Err::Error(PError {
        input,
        kind: SyntaxErrorKind::BadLiteral,
    })
}

fn expected<'a>(input: &'a [u8], what: &'static str) -> PError<'a> {
    PError {
        input,
        kind: SyntaxErrorKind::Expected(what),
    }
}

/// Parses a whole argument list, for tests and tools.
pub fn parse_arguments(raw: &[u8]) -> Result<Vec<Token>, SyntaxError> {
    let cx = Cx::new(raw);
    cx.arguments(raw).map(|(_, t)| t).map_err(|e| cx.error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(raw: &[u8]) -> Vec<Token> {
        parse_arguments(raw).expect("parses")
    }

    fn strings(raw: &[u8]) -> Vec<Option<Vec<u8>>> {
        args(raw)
            .iter()
            .map(|t| t.string(raw).map(|c| c.into_owned()))
            .collect()
    }

    #[test]
    fn atoms_quoted_literals_and_nil() {
        let raw = b" INBOX \"a \\\"b\\\\\" {3}\r\nxyz NIL\r\n";
        assert_eq!(
            strings(raw),
            vec![
                Some(b"INBOX".to_vec()),
                Some(b"a \"b\\".to_vec()),
                Some(b"xyz".to_vec()),
                None
            ]
        );
        assert!(matches!(args(raw)[3], Token::Nil(_)));
    }

    #[test]
    fn fetch_items_with_sections_are_one_token() {
        let raw = b" 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (DATE \"FROM\")]<0.2048>)\r\n";
        let tokens = args(raw);
        assert_eq!(tokens.len(), 2);
        let items = tokens[1].items().expect("list");
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[1].raw(raw),
            b"BODY.PEEK[HEADER.FIELDS (DATE \"FROM\")]<0.2048>"
        );
    }

    #[test]
    fn flags_and_wildcards_are_atoms() {
        let raw = b" (\\Seen \\*) % * INBOX.*\r\n";
        assert_eq!(args(raw).len(), 4);
    }

    #[test]
    fn streamed_literal_ends_the_message() {
        let raw = b" INBOX (\\Seen) {5000000}\r\n";
        let tokens = args(raw);
        assert!(matches!(tokens[2], Token::Literal { data: None, .. }));
    }

    #[test]
    fn streamed_literal_inside_a_list_ends_the_message() {
        // A FETCH response cut at its BODY[] literal: the lists stay open.
        let raw = b" (UID 7 BODY[] {5000000}\r\n";
        let tokens = args(raw);
        assert_eq!(tokens.len(), 1);
        assert!(tokens[0].is_cut());
        assert!(matches!(
            tokens[0].items().and_then(<[Token]>::last),
            Some(Token::Literal { data: None, .. })
        ));
        assert!(parse_arguments(b" ((a {5}\r\n").is_ok_and(|t| t[0].is_cut()));
        // Without a cut literal an open list is still an error.
        assert!(parse_arguments(b" (a {5}\r\nhello").is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut raw = b" ".to_vec();
        raw.extend(std::iter::repeat_n(b'(', 10_000));
        raw.extend(std::iter::repeat_n(b')', 10_000));
        raw.extend_from_slice(b"\r\n");
        let err = parse_arguments(&raw).expect_err("too deep");
        assert_eq!(err.kind, SyntaxErrorKind::TooDeep(DEFAULT_MAX_DEPTH));
    }

    #[test]
    fn nul_and_newline_cannot_hide_in_quoted_strings() {
        assert_eq!(
            parse_arguments(b" \"a\0b\"\r\n").map_err(|e| e.kind),
            Err(SyntaxErrorKind::BadQuoted)
        );
        assert!(parse_arguments(b" \"a\rb\"\r\n").is_err());
        assert!(parse_arguments(b" \"a\\nb\"\r\n").is_err());
    }

    #[test]
    fn unbalanced_lists_fail() {
        assert!(parse_arguments(b" (a (b)\r\n").is_err());
        assert!(parse_arguments(b" a)\r\n").is_err());
        assert!(parse_arguments(b" BODY[HEADER\r\n").is_err());
    }

    #[test]
    fn literal_shorter_than_announced_fails() {
        assert_eq!(
            parse_arguments(b" {5}\r\nab\r\n").map_err(|e| e.kind),
            Err(SyntaxErrorKind::BadLiteral)
        );
    }

    #[test]
    fn numbers() {
        let raw = b" 42 18446744073709551615 18446744073709551616 4a\r\n";
        let n: Vec<_> = args(raw).iter().map(|t| t.number(raw)).collect();
        assert_eq!(n, vec![Some(42), Some(u64::MAX), None, None]);
    }
}
