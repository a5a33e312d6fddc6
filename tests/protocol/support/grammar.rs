//! Generators of valid client syntax, for property tests: the rules of the RFC 3501 / RFC 9051
//! ABNF (and of the extensions imapgate names) that the command parser uses, drawn over their
//! whole alphabets, and whole commands built from them. A generated command knows its bytes,
//! where its client must wait for a continuation request, and what a reader must find in it:
//! the tag, the name, every argument token and the mailbox arguments.
//!
//! "Valid" is the RFCs' grammar, narrowed only where Dovecot refuses what the RFCs allow (and
//! imapgate with it, see `imapgate::imap::syntax`): no "]" in a tag. Everything else is drawn,
//! "[" and "]" in astrings, NIL as a mailbox name, CTLs, DEL and UTF-8 in quoted strings, every
//! octet but NUL in literals and every octet in literal8 included.
//!
//! ```ignore
//! proptest!(|(cmd in grammar::command())| {
//!     let bytes = cmd.bytes();         // the whole command, literals inline
//!     let pieces = cmd.segments();     // cut where the client waits for "+"
//! });
//! ```

use imapgate::imap::command::{Command, CommandKind, MailboxRole};
use imapgate::imap::syntax::Token;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::Union;

// ---------------------------------------------------------------------------------------------
// What is generated
// ---------------------------------------------------------------------------------------------

/// One argument token as generated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    /// An atom written as is: atoms, astrings' atoms, numbers, sequence sets, flags, dates.
    Atom(Vec<u8>),
    /// A quoted string, by its value (written with `\` and `"` escaped).
    Quoted(Vec<u8>),
    /// A literal (`{n}`, `{n+}`, `~{n}`, `~{n+}`) and its octets.
    Literal {
        data: Vec<u8>,
        sync: bool,
        binary: bool,
    },
    /// A parenthesized list.
    List(Vec<Arg>),
    /// A fetch item with a section: `name[spec]`, or `name[spec (headers)]` for HEADER.FIELDS,
    /// then an optional `<partial>`. One atom token, or, with a header list, three tokens as
    /// Dovecot reads them: `name[spec`, the list, `]<partial>` (see [`tokens`]).
    Section {
        name: Vec<u8>,
        spec: Vec<u8>,
        headers: Option<Vec<Arg>>,
        partial: Option<(u32, u32)>,
    },
}

impl Arg {
    /// Writes the argument; `waits` gets the offset after each synchronizing literal's
    /// announcement.
    fn write(&self, out: &mut Vec<u8>, waits: &mut Vec<usize>) {
        match self {
            Arg::Atom(atom) => out.extend_from_slice(atom),
            Arg::Quoted(value) => {
                out.push(b'"');
                for &b in value {
                    if b == b'"' || b == b'\\' {
                        out.push(b'\\');
                    }
                    out.push(b);
                }
                out.push(b'"');
            }
            Arg::Literal { data, sync, binary } => {
                if *binary {
                    out.push(b'~');
                }
                let plus = if *sync { "" } else { "+" };
                out.extend_from_slice(format!("{{{}{plus}}}\r\n", data.len()).as_bytes());
                if *sync {
                    waits.push(out.len());
                }
                out.extend_from_slice(data);
            }
            Arg::List(items) => {
                out.push(b'(');
                write_joined(items, out, waits);
                out.push(b')');
            }
            Arg::Section {
                name,
                spec,
                headers,
                partial,
            } => {
                out.extend_from_slice(name);
                out.push(b'[');
                out.extend_from_slice(spec);
                if let Some(headers) = headers {
                    out.push(b' ');
                    Arg::List(headers.clone()).write(out, waits);
                }
                out.push(b']');
                if let Some((offset, len)) = partial {
                    out.extend_from_slice(format!("<{offset}.{len}>").as_bytes());
                }
            }
        }
    }

    /// The argument's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out, &mut Vec::new());
        out
    }
}

fn write_joined(items: &[Arg], out: &mut Vec<u8>, waits: &mut Vec<usize>) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        item.write(out, waits);
    }
}

/// A generated command.
#[derive(Clone, Debug)]
pub struct GenCommand {
    pub tag: Vec<u8>,
    /// The `UID` prefix as written (any case), for the UID forms.
    pub uid: Option<Vec<u8>>,
    /// The name as written (any case).
    pub name: Vec<u8>,
    pub kind: CommandKind,
    pub args: Vec<Arg>,
    /// The mailbox arguments a reader must find, with their roles and string values.
    pub mailboxes: Vec<(MailboxRole, Vec<u8>)>,
}

impl GenCommand {
    fn render(&self) -> (Vec<u8>, Vec<usize>) {
        let mut out = self.tag.clone();
        let mut waits = Vec::new();
        out.push(b' ');
        if let Some(uid) = &self.uid {
            out.extend_from_slice(uid);
            out.push(b' ');
        }
        out.extend_from_slice(&self.name);
        for arg in &self.args {
            out.push(b' ');
            arg.write(&mut out, &mut waits);
        }
        out.extend_from_slice(b"\r\n");
        (out, waits)
    }

    /// The whole command, literal octets inline.
    pub fn bytes(&self) -> Vec<u8> {
        self.render().0
    }

    /// The command cut after each synchronizing literal's announcement: a client sends each
    /// piece after the first only once it has a continuation request.
    pub fn segments(&self) -> Vec<Vec<u8>> {
        let (bytes, waits) = self.render();
        let mut out = Vec::new();
        let mut start = 0;
        for end in waits.into_iter().chain([bytes.len()]) {
            out.push(bytes[start..end].to_vec());
            start = end;
        }
        out
    }
}

/// The tokens a command's reader finds for `args`: a fetch item with a header list is three.
pub fn tokens(args: &[Arg]) -> Vec<Arg> {
    let mut out = Vec::new();
    for arg in args {
        match arg {
            Arg::Section {
                name,
                spec,
                headers: Some(headers),
                partial,
            } => {
                out.push(Arg::Atom([&name[..], b"[", spec].concat()));
                out.push(Arg::List(tokens(headers)));
                let mut close = b"]".to_vec();
                if let Some((offset, len)) = partial {
                    close.extend_from_slice(format!("<{offset}.{len}>").as_bytes());
                }
                out.push(Arg::Atom(close));
            }
            Arg::Section { .. } => out.push(Arg::Atom(arg.bytes())),
            Arg::List(items) => out.push(Arg::List(tokens(items))),
            other => out.push(other.clone()),
        }
    }
    out
}

/// Whether `token` (in the message `raw`) is what `arg` generated; what differs otherwise.
/// `arg` is one of [`tokens`].
pub fn check_arg(arg: &Arg, token: &Token, raw: &[u8]) -> Result<(), String> {
    let differs = || {
        Err(format!(
            "generated {:?}, read {:?} = {:?}",
            String::from_utf8_lossy(&arg.bytes()),
            token,
            String::from_utf8_lossy(token.raw(raw))
        ))
    };
    match (arg, token) {
        (Arg::Atom(atom), Token::Atom(span)) if span.of(raw) == &atom[..] => Ok(()),
        (Arg::Quoted(value), Token::Quoted { .. })
            if token.string(raw).as_deref() == Some(&value[..]) =>
        {
            Ok(())
        }
        (
            Arg::Literal { data, sync, binary },
            Token::Literal {
                data: Some(span),
                literal,
                ..
            },
        ) if span.of(raw) == &data[..] && literal.sync == *sync && literal.binary == *binary => {
            Ok(())
        }
        (Arg::List(items), Token::List { items: tokens, .. }) if items.len() == tokens.len() => {
            items
                .iter()
                .zip(tokens)
                .try_for_each(|(a, t)| check_arg(a, t, raw))
        }
        _ => differs(),
    }
}

/// Whether the parsed `cmd` is what `generated` generated; what differs otherwise.
pub fn check_command(generated: &GenCommand, cmd: &Command) -> Result<(), String> {
    let raw = &cmd.raw[..];
    if cmd.tag() != &generated.tag[..] {
        return Err(format!("tag {:?}", String::from_utf8_lossy(cmd.tag())));
    }
    if cmd.name_span.of(raw) != &generated.name[..]
        || cmd.name.kind != generated.kind
        || cmd.name.uid != generated.uid.is_some()
    {
        return Err(format!("name {:?}", cmd.name));
    }
    let expected = tokens(&generated.args);
    if cmd.args.len() != expected.len() {
        return Err(format!("{} arguments: {:?}", cmd.args.len(), cmd.args));
    }
    for (arg, token) in expected.iter().zip(&cmd.args) {
        check_arg(arg, token, raw)?;
    }
    let mailboxes: Vec<(MailboxRole, Vec<u8>)> = cmd
        .mailbox_args()
        .iter()
        .map(|m| {
            let value = m.token.string(raw).map(|s| s.into_owned());
            (m.role, value.unwrap_or_default())
        })
        .collect();
    if mailboxes != generated.mailboxes {
        return Err(format!("mailboxes {mailboxes:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Alphabets
// ---------------------------------------------------------------------------------------------

fn octets(from: u8, to: u8, except: &[u8]) -> Vec<u8> {
    (from..=to).filter(|b| !except.contains(b)).collect()
}

/// `ATOM-CHAR = <any CHAR except atom-specials>`;
/// `atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards / quoted-specials / resp-specials`
pub fn atom_chars() -> Vec<u8> {
    octets(0x21, 0x7e, b"(){%*\"\\]")
}

/// `ASTRING-CHAR = ATOM-CHAR / resp-specials`
pub fn astring_chars() -> Vec<u8> {
    octets(0x21, 0x7e, b"(){%*\"\\")
}

/// `list-char = ATOM-CHAR / list-wildcards / resp-specials`
pub fn list_chars() -> Vec<u8> {
    octets(0x21, 0x7e, b"(){\"\\")
}

/// `tag = 1*<any ASTRING-CHAR except "+">`, and not "]" (Dovecot: "Invalid tag").
pub fn tag_chars() -> Vec<u8> {
    octets(0x21, 0x7e, b"(){%*\"\\+]")
}

fn word(chars: Vec<u8>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(select(chars), 1..=max)
}

/// A keyword in any case: the RFCs' keywords are case-insensitive.
fn any_case(keyword: &'static str) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<bool>(), keyword.len()).prop_map(move |upper| {
        keyword
            .bytes()
            .zip(upper)
            .map(|(b, u)| {
                if u {
                    b.to_ascii_uppercase()
                } else {
                    b.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

fn keyword(words: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    select(words).prop_flat_map(any_case)
}

fn atom_arg(s: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Arg> {
    s.prop_map(Arg::Atom)
}

fn text(s: &str) -> Arg {
    Arg::Atom(s.as_bytes().to_vec())
}

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// `tag = 1*<any ASTRING-CHAR except "+">` (and not "]").
pub fn tag() -> impl Strategy<Value = Vec<u8>> {
    word(tag_chars(), 10)
}

/// `atom = 1*ATOM-CHAR`
pub fn atom() -> impl Strategy<Value = Vec<u8>> {
    word(atom_chars(), 16)
}

/// `QUOTED-CHAR = <any TEXT-CHAR except quoted-specials> / "\" quoted-specials / UTF8-2 / UTF8-3
/// / UTF8-4`: a quoted string's value (TEXT-CHAR is CHAR but CR and LF; CHAR has no NUL).
pub fn quoted_value() -> BoxedStrategy<Vec<u8>> {
    let ctl: Vec<u8> = octets(0x01, 0x1f, b"\r\n")
        .into_iter()
        .chain([0x7f])
        .collect();
    let unit = prop_oneof![
        8 => (0x20u8..=0x7e).prop_map(|b| vec![b]),
        2 => select(vec![b'"', b'\\']).prop_map(|b| vec![b]),
        1 => select(ctl).prop_map(|b| vec![b]),
        2 => any::<char>()
            .prop_filter("UTF8-2 / UTF8-3 / UTF8-4", |c| !c.is_ascii())
            .prop_map(|c| c.to_string().into_bytes()),
    ];
    vec(unit, 0..16).prop_map(|units| units.concat()).boxed()
}

/// `literal = "{" number64 ["+"] "}" CRLF *CHAR8` (`{n+}`: RFC 7888), its octets: any but NUL.
pub fn literal() -> BoxedStrategy<Arg> {
    let data = prop_oneof![
        4 => vec(1u8..=255, 0..24),
        1 => Just(b"\r\na2 LOGOUT {5}\r\n".to_vec()),
        1 => vec(1u8..=255, 24..200),
    ];
    (data, any::<bool>())
        .prop_map(|(data, sync)| Arg::Literal {
            data,
            sync,
            binary: false,
        })
        .boxed()
}

/// `literal8 = "~{" number64 ["+"] "}" CRLF *OCTET` (RFC 3516): any octet, NUL included.
pub fn literal8() -> BoxedStrategy<Arg> {
    (vec(any::<u8>(), 0..40), any::<bool>())
        .prop_map(|(data, sync)| Arg::Literal {
            data,
            sync,
            binary: true,
        })
        .boxed()
}

/// `string = quoted / literal`, with its value.
pub fn string() -> BoxedStrategy<(Arg, Vec<u8>)> {
    prop_oneof![
        3 => quoted_value().prop_map(|v| (Arg::Quoted(v.clone()), v)),
        1 => literal().prop_map(|arg| {
            let Arg::Literal { data, .. } = &arg else { unreachable!() };
            let value = data.clone();
            (arg, value)
        }),
    ]
    .boxed()
}

/// `astring = 1*ASTRING-CHAR / string`, with its value.
pub fn astring() -> BoxedStrategy<(Arg, Vec<u8>)> {
    prop_oneof![
        3 => word(astring_chars(), 16).prop_map(|a| (Arg::Atom(a.clone()), a)),
        2 => string(),
    ]
    .boxed()
}

/// `mailbox = "INBOX" / astring`: astrings, INBOX in any case, and names a reader could take
/// for something else (NIL, brackets, wildcard-free ASTRING-CHARs).
pub fn mailbox() -> BoxedStrategy<(Arg, Vec<u8>)> {
    let special = prop_oneof![
        any_case("INBOX"),
        any_case("NIL"),
        Just(b"x[y]z".to_vec()),
        Just(b"]".to_vec()),
        Just(b"[".to_vec()),
        Just(b"INBOX.Sent[1]".to_vec()),
    ];
    prop_oneof![
        4 => astring(),
        1 => special.prop_map(|a| (Arg::Atom(a.clone()), a)),
    ]
    .boxed()
}

/// `list-mailbox = 1*list-char / string`, with its value.
pub fn list_mailbox() -> BoxedStrategy<(Arg, Vec<u8>)> {
    prop_oneof![
        3 => word(list_chars(), 16).prop_map(|a| (Arg::Atom(a.clone()), a)),
        1 => string(),
    ]
    .boxed()
}

/// `seq-number = nz-number / "*"`
fn seq_number() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u32..1000).prop_map(|n| n.to_string()),
        1 => (1u32..=u32::MAX).prop_map(|n| n.to_string()),
        1 => Just("*".to_string()),
    ]
}

/// ```abnf
/// sequence-set = (seq-number / seq-range) ["," sequence-set]
/// seq-range    = seq-number ":" seq-number
/// sequence-set =/ seq-last-command   ; "$", RFC 5182
/// ```
pub fn sequence_set() -> BoxedStrategy<Vec<u8>> {
    let part = prop_oneof![
        seq_number(),
        (seq_number(), seq_number()).prop_map(|(a, b)| format!("{a}:{b}")),
    ];
    prop_oneof![
        8 => vec(part, 1..5).prop_map(|parts| parts.join(",").into_bytes()),
        1 => Just(b"$".to_vec()),
    ]
    .boxed()
}

const MONTHS: &[&str] = &[
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `date = date-text / DQUOTE date-text DQUOTE`;
/// `date-text = date-day "-" date-month "-" date-year`
pub fn date() -> impl Strategy<Value = Arg> {
    (
        1u8..=31,
        any::<bool>(),
        select(MONTHS),
        1900u16..2100,
        any::<bool>(),
    )
        .prop_map(|(day, zero, month, year, quoted)| {
            let day = if zero {
                format!("{day:02}")
            } else {
                day.to_string()
            };
            let text = format!("{day}-{month}-{year}").into_bytes();
            if quoted {
                Arg::Quoted(text)
            } else {
                Arg::Atom(text)
            }
        })
}

/// ```abnf
/// date-time = DQUOTE date-day-fixed "-" date-month "-" date-year SP time SP zone DQUOTE
/// date-day-fixed = (SP DIGIT) / 2DIGIT
/// ```
pub fn date_time() -> BoxedStrategy<Arg> {
    (
        1u8..=31,
        any::<bool>(),
        select(MONTHS),
        1900u16..2100,
        (0u8..24, 0u8..60, 0u8..60),
        (any::<bool>(), 0u8..15, select(vec![0u8, 30, 45])),
    )
        .prop_map(|(day, zero, month, year, (h, m, s), (east, zh, zm))| {
            let day = if zero || day > 9 {
                format!("{day:02}")
            } else {
                format!(" {day}")
            };
            let sign = if east { '+' } else { '-' };
            Arg::Quoted(
                format!("{day}-{month}-{year} {h:02}:{m:02}:{s:02} {sign}{zh:02}{zm:02}")
                    .into_bytes(),
            )
        })
        .boxed()
}

/// ```abnf
/// flag = "\Answered" / "\Flagged" / "\Deleted" / "\Seen" / "\Draft" / flag-keyword /
///        flag-extension
/// flag-keyword   = "$MDNSent" / "$Forwarded" / "$Junk" / "$NotJunk" / "$Phishing" / atom
/// flag-extension = "\" atom
/// ```
pub fn flag() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => keyword(&["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]),
        1 => select(&["$MDNSent", "$Forwarded", "$Junk", "$NotJunk", "$Phishing"][..])
            .prop_map(|k| k.as_bytes().to_vec()),
        2 => atom(),
        1 => atom().prop_map(|a| [&b"\\"[..], &a].concat()),
    ]
}

/// `flag-list = "(" [flag *(SP flag)] ")"`
pub fn flag_list() -> BoxedStrategy<Arg> {
    vec(flag().prop_map(Arg::Atom), 0..4)
        .prop_map(Arg::List)
        .boxed()
}

/// `header-list = "(" header-fld-name *(SP header-fld-name) ")"`; `header-fld-name = astring`
fn header_list() -> BoxedStrategy<Vec<Arg>> {
    let name = prop_oneof![
        3 => keyword(&["DATE", "From", "subject", "Message-ID", "X-Spam"]).prop_map(Arg::Atom),
        2 => astring().prop_map(|(arg, _)| arg),
    ];
    vec(name, 1..4).boxed()
}

/// ```abnf
/// section-spec    = section-msgtext / (section-part ["." section-text])
/// section-msgtext = "HEADER" / "HEADER.FIELDS" [".NOT"] SP header-list / "TEXT"
/// section-part    = nz-number *("." nz-number)
/// section-text    = section-msgtext / "MIME"
/// ```
/// The spec's text and, for HEADER.FIELDS, its header list.
fn section_spec() -> BoxedStrategy<(Vec<u8>, Option<Vec<Arg>>)> {
    prop_oneof![
        1 => Just((Vec::new(), None)),
        2 => section_msgtext(),
        1 => section_part(1).prop_map(|p| (p, None)),
        1 => (section_part(1), keyword(&["MIME", "HEADER", "TEXT"]))
            .prop_map(|(p, k)| ([&p[..], b".", &k].concat(), None)),
        1 => (section_part(1), section_msgtext())
            .prop_map(|(p, (k, h))| ([&p[..], b".", &k].concat(), h)),
    ]
    .boxed()
}

/// `section-msgtext = "HEADER" / "HEADER.FIELDS" [".NOT"] SP header-list / "TEXT"`
fn section_msgtext() -> impl Strategy<Value = (Vec<u8>, Option<Vec<Arg>>)> {
    prop_oneof![
        keyword(&["HEADER", "TEXT"]).prop_map(|k| (k, None)),
        (
            keyword(&["HEADER.FIELDS", "HEADER.FIELDS.NOT"]),
            header_list()
        )
            .prop_map(|(k, h)| (k, Some(h))),
    ]
}

/// `section-part = nz-number *("." nz-number)`, at least `min` numbers.
fn section_part(min: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(1u32..30, min..4).prop_map(|p| {
        p.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(".")
            .into_bytes()
    })
}

/// `partial = "<" number "." nz-number ">"`
fn partial() -> impl Strategy<Value = Option<(u32, u32)>> {
    prop::option::of((0u32..100_000, 1u32..=u32::MAX))
}

/// ```abnf
/// fetch-att = "ENVELOPE" / "FLAGS" / "INTERNALDATE" / "RFC822" [".HEADER" / ".SIZE" / ".TEXT"] /
///             "BODY" ["STRUCTURE"] / "UID" / "BODY" section [partial] /
///             "BODY.PEEK" section [partial] / "MODSEQ"                         ; RFC 7162
/// fetch-att =/ "BINARY" [".PEEK"] section-binary [partial] / "BINARY.SIZE" section-binary
/// section-binary = "[" [section-part] "]"                                         ; RFC 3516
/// ```
pub fn fetch_att() -> BoxedStrategy<Arg> {
    let simple = keyword(&[
        "ENVELOPE",
        "FLAGS",
        "INTERNALDATE",
        "RFC822",
        "RFC822.HEADER",
        "RFC822.SIZE",
        "RFC822.TEXT",
        "BODY",
        "BODYSTRUCTURE",
        "UID",
        "MODSEQ",
    ])
    .prop_map(Arg::Atom);
    let body = (keyword(&["BODY", "BODY.PEEK"]), section_spec(), partial()).prop_map(
        |(name, (spec, headers), partial)| Arg::Section {
            name,
            spec,
            headers,
            partial,
        },
    );
    let binary = (
        keyword(&["BINARY", "BINARY.PEEK"]),
        section_part(0),
        partial(),
    )
        .prop_map(|(name, spec, partial)| Arg::Section {
            name,
            spec,
            headers: None,
            partial,
        });
    let size = (any_case("BINARY.SIZE"), section_part(0)).prop_map(|(name, spec)| Arg::Section {
        name,
        spec,
        headers: None,
        partial: None,
    });
    prop_oneof![3 => simple, 3 => body, 1 => binary, 1 => size].boxed()
}

/// The search keys of RFC 9051 (and RFC 3501's RECENT, NEW, OLD, RFC 5032's OLDER/YOUNGER,
/// RFC 7162's MODSEQ), each as the argument tokens it is made of.
///
/// ```abnf
/// search-key = "ALL" / "ANSWERED" / "BCC" SP astring / "BEFORE" SP date / "BODY" SP astring /
///              "CC" SP astring / "DELETED" / "FLAGGED" / "FROM" SP astring /
///              "KEYWORD" SP flag-keyword / "ON" SP date / "SEEN" / "SINCE" SP date /
///              "SUBJECT" SP astring / "TEXT" SP astring / "TO" SP astring / "UNANSWERED" /
///              "UNDELETED" / "UNFLAGGED" / "UNKEYWORD" SP flag-keyword / "UNSEEN" / "DRAFT" /
///              "HEADER" SP header-fld-name SP astring / "LARGER" SP number64 /
///              "NOT" SP search-key / "OR" SP search-key SP search-key /
///              "SENTBEFORE" SP date / "SENTON" SP date / "SENTSINCE" SP date /
///              "SMALLER" SP number64 / "UID" SP sequence-set / "UNDRAFT" / sequence-set /
///              "(" search-key *(SP search-key) ")"
/// ```
pub fn search_key() -> BoxedStrategy<Vec<Arg>> {
    let simple = keyword(&[
        "ALL",
        "ANSWERED",
        "DELETED",
        "FLAGGED",
        "SEEN",
        "UNANSWERED",
        "UNDELETED",
        "UNFLAGGED",
        "UNSEEN",
        "DRAFT",
        "UNDRAFT",
        "RECENT",
        "NEW",
        "OLD",
    ])
    .prop_map(|k| vec![Arg::Atom(k)]);
    let with_astring = (
        keyword(&["BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"]),
        astring(),
    )
        .prop_map(|(k, (a, _))| vec![Arg::Atom(k), a]);
    let with_date = (
        keyword(&["BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"]),
        date(),
    )
        .prop_map(|(k, d)| vec![Arg::Atom(k), d]);
    let with_keyword = (keyword(&["KEYWORD", "UNKEYWORD"]), atom())
        .prop_map(|(k, a)| vec![Arg::Atom(k), Arg::Atom(a)]);
    let header = (astring(), astring())
        .prop_map(|((name, _), (value, _))| vec![text("HEADER"), name, value]);
    let with_number = (
        keyword(&["LARGER", "SMALLER", "OLDER", "YOUNGER"]),
        0u64..=u64::from(u32::MAX) * 4,
    )
        .prop_map(|(k, n)| vec![Arg::Atom(k), text(&n.to_string())]);
    let uid = sequence_set().prop_map(|s| vec![text("UID"), Arg::Atom(s)]);
    let set = sequence_set().prop_map(|s| vec![Arg::Atom(s)]);
    let modseq = (
        prop::option::of((
            select(&["\\Seen", "\\Draft", "$Junk"][..]),
            select(&["priv", "shared", "all"][..]),
        )),
        0u64..=u64::MAX >> 1,
    )
        .prop_map(|(entry, n)| {
            let mut key = vec![text("MODSEQ")];
            if let Some((flag, kind)) = entry {
                key.push(Arg::Quoted(format!("/flags/{flag}").into_bytes()));
                key.push(text(kind));
            }
            key.push(text(&n.to_string()));
            key
        });
    let leaf = Union::new(vec![
        simple.boxed(),
        with_astring.boxed(),
        with_date.boxed(),
        with_keyword.boxed(),
        header.boxed(),
        with_number.boxed(),
        uid.boxed(),
        set.boxed(),
        modseq.boxed(),
    ]);
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|k| [vec![text("NOT")], k].concat()),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| [vec![text("OR")], a, b].concat()),
            vec(inner, 1..4).prop_map(|keys| vec![Arg::List(keys.concat())]),
        ]
    })
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// A command without its tag: kind, name, arguments, expected mailboxes.
#[derive(Clone, Debug)]
struct Body {
    kind: CommandKind,
    uid: bool,
    name: &'static str,
    args: Vec<Arg>,
    mailboxes: Vec<(MailboxRole, Vec<u8>)>,
}

fn body(kind: CommandKind, name: &'static str, args: Vec<Arg>) -> Body {
    Body {
        kind,
        uid: false,
        name,
        args,
        mailboxes: Vec::new(),
    }
}

fn with_mailboxes(mut b: Body, mailboxes: Vec<(MailboxRole, Vec<u8>)>) -> Body {
    b.mailboxes = mailboxes;
    b
}

use CommandKind as K;
use MailboxRole::{Mailbox as M, Pattern as P, Reference as R};

fn bare() -> impl Strategy<Value = Body> {
    select(
        &[
            (K::Capability, "CAPABILITY"),
            (K::Noop, "NOOP"),
            (K::Logout, "LOGOUT"),
            (K::Starttls, "STARTTLS"),
            (K::Namespace, "NAMESPACE"),
            (K::Idle, "IDLE"),
            (K::Check, "CHECK"),
            (K::Close, "CLOSE"),
            (K::Unselect, "UNSELECT"),
            (K::Expunge, "EXPUNGE"),
        ][..],
    )
    .prop_map(|(kind, name)| body(kind, name, Vec::new()))
}

/// `login = "LOGIN" SP userid SP password`; `authenticate = "AUTHENTICATE" SP auth-type
/// [SP initial-resp]`; `initial-resp = (base64 / "=")` (RFC 4959)
fn not_authenticated() -> impl Strategy<Value = Body> {
    let login =
        (astring(), astring()).prop_map(|((u, _), (p, _))| body(K::Login, "LOGIN", vec![u, p]));
    let base64 = prop_oneof![
        "([A-Za-z0-9+/]{4}){1,8}([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?",
        Just("=".to_string()),
    ];
    let authenticate = (
        select(&["PLAIN", "LOGIN", "XOAUTH2", "SCRAM-SHA-256"][..]),
        prop::option::of(base64),
    )
        .prop_map(|(mechanism, ir)| {
            let mut args = vec![text(mechanism)];
            args.extend(ir.map(|ir| Arg::Atom(ir.into_bytes())));
            body(K::Authenticate, "AUTHENTICATE", args)
        });
    prop_oneof![login, authenticate]
}

/// The commands that name one mailbox as their first argument, and RENAME, STATUS, APPEND,
/// LIST and LSUB.
fn mailbox_commands() -> impl Strategy<Value = Body> {
    let one = (
        select(
            &[
                (K::Select, "SELECT"),
                (K::Examine, "EXAMINE"),
                (K::Create, "CREATE"),
                (K::Delete, "DELETE"),
                (K::Subscribe, "SUBSCRIBE"),
                (K::Unsubscribe, "UNSUBSCRIBE"),
                (K::GetQuotaRoot, "GETQUOTAROOT"),
                (K::GetAcl, "GETACL"),
                (K::MyRights, "MYRIGHTS"),
            ][..],
        ),
        mailbox(),
        any::<bool>(),
    )
        .prop_map(|((kind, name), (m, value), condstore)| {
            let mut args = vec![m];
            if condstore && matches!(kind, K::Select | K::Examine) {
                args.push(Arg::List(vec![text("CONDSTORE")]));
            }
            with_mailboxes(body(kind, name, args), vec![(M, value)])
        });
    let rename = (mailbox(), mailbox()).prop_map(|((a, av), (b, bv))| {
        with_mailboxes(
            body(K::Rename, "RENAME", vec![a, b]),
            vec![(M, av), (M, bv)],
        )
    });
    let status = (
        mailbox(),
        vec(
            keyword(&[
                "MESSAGES",
                "UIDNEXT",
                "UIDVALIDITY",
                "UNSEEN",
                "DELETED",
                "SIZE",
                "RECENT",
                "HIGHESTMODSEQ",
            ]),
            1..4,
        ),
    )
        .prop_map(|((m, value), atts)| {
            let atts = Arg::List(atts.into_iter().map(Arg::Atom).collect());
            with_mailboxes(body(K::Status, "STATUS", vec![m, atts]), vec![(M, value)])
        });
    // append = "APPEND" SP mailbox [SP flag-list] [SP date-time] SP literal  (or literal8)
    // append-data = literal / literal8 / append-data-ext (RFC 3502 MULTIAPPEND: 1 or more)
    // catenate = "CATENATE" SP "(" cat-part *(SP cat-part) ")"; cat-part = text-literal / url
    // A URL part names a mailbox (RFC 5092): a reader finds it with the role `Url`.
    let part = prop_oneof![
        2 => prop_oneof![literal(), literal8()].prop_map(|l| (vec![text("TEXT"), l], None)),
        1 => astring().prop_map(|(url, value)| (vec![text("URL"), url], Some(value))),
    ];
    let data = prop_oneof![
        3 => literal().prop_map(|l| (vec![l], Vec::new())),
        1 => literal8().prop_map(|l| (vec![l], Vec::new())),
        1 => vec(part, 1..4).prop_map(|parts| {
            let (args, urls): (Vec<Vec<Arg>>, Vec<Option<Vec<u8>>>) = parts.into_iter().unzip();
            let urls = urls.into_iter().flatten().collect();
            (vec![text("CATENATE"), Arg::List(args.concat())], urls)
        }),
    ];
    let message = (
        prop::option::of(flag_list()),
        prop::option::of(date_time()),
        data,
    )
        .prop_map(|(flags, date, (data, urls))| {
            let mut args: Vec<Arg> = flags.into_iter().chain(date).collect();
            args.extend(data);
            (args, urls)
        });
    let append = (mailbox(), vec(message, 1..3)).prop_map(|((m, value), messages)| {
        let mut args = vec![m];
        let mut mailboxes = vec![(M, value)];
        for (message, urls) in messages {
            args.extend(message);
            mailboxes.extend(urls.into_iter().map(|u| (MailboxRole::Url, u)));
        }
        with_mailboxes(body(K::Append, "APPEND", args), mailboxes)
    });
    // list = "LIST" [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]
    let patterns = prop_oneof![
        3 => list_mailbox().prop_map(|(p, v)| (p, vec![v])),
        1 => vec(list_mailbox(), 1..3).prop_map(|ps| {
            let values = ps.iter().map(|(_, v)| v.clone()).collect();
            (Arg::List(ps.into_iter().map(|(p, _)| p).collect()), values)
        }),
    ];
    let list = (
        prop::option::of(vec(
            keyword(&["SUBSCRIBED", "REMOTE", "RECURSIVEMATCH"]),
            0..3,
        )),
        mailbox(),
        patterns,
        prop::option::of(vec(keyword(&["CHILDREN", "SUBSCRIBED"]), 0..3)),
    )
        .prop_map(|(select, (reference, rv), (pattern, pvs), ret)| {
            let mut args = Vec::new();
            args.extend(select.map(|s| Arg::List(s.into_iter().map(Arg::Atom).collect())));
            args.push(reference);
            args.push(pattern);
            if let Some(ret) = ret {
                args.push(text("RETURN"));
                args.push(Arg::List(ret.into_iter().map(Arg::Atom).collect()));
            }
            let mut mailboxes = vec![(R, rv)];
            mailboxes.extend(pvs.into_iter().map(|v| (P, v)));
            with_mailboxes(body(K::List, "LIST", args), mailboxes)
        });
    let lsub = (mailbox(), list_mailbox()).prop_map(|((r, rv), (p, pv))| {
        with_mailboxes(body(K::Lsub, "LSUB", vec![r, p]), vec![(R, rv), (P, pv)])
    });
    prop_oneof![
        4 => one.boxed(),
        1 => rename.boxed(),
        1 => status.boxed(),
        2 => append.boxed(),
        2 => list.boxed(),
        1 => lsub.boxed(),
    ]
}

/// ENABLE and ID.
fn session_commands() -> impl Strategy<Value = Body> {
    let enable = vec(
        prop_oneof![
            keyword(&["CONDSTORE", "QRESYNC", "UTF8=ACCEPT", "IMAP4rev2"]),
            atom()
        ],
        1..4,
    )
    .prop_map(|caps| {
        body(
            K::Enable,
            "ENABLE",
            caps.into_iter().map(Arg::Atom).collect(),
        )
    });
    // id = "ID" SP id-params-list; id-params-list = "(" *(string SP nstring) ")" / nil
    let nstring = prop_oneof![
        3 => string().prop_map(|(s, _)| s),
        1 => any_case("NIL").prop_map(Arg::Atom),
    ];
    let id = prop_oneof![
        1 => any_case("NIL").prop_map(|nil| vec![Arg::Atom(nil)]),
        3 => vec((string(), nstring), 0..4).prop_map(|pairs| {
            vec![Arg::List(pairs.into_iter().flat_map(|((k, _), v)| [k, v]).collect())]
        }),
    ]
    .prop_map(|args| body(K::Id, "ID", args));
    prop_oneof![enable.boxed(), id.boxed()]
}

/// FETCH, SEARCH, STORE, COPY, MOVE and their UID forms, and UID EXPUNGE.
fn selected_commands() -> impl Strategy<Value = Body> {
    // fetch = "FETCH" SP sequence-set SP ("ALL" / "FULL" / "FAST" / fetch-att /
    //         "(" fetch-att *(SP fetch-att) ")") [SP "(" "CHANGEDSINCE" SP mod-sequence ")"]
    let items = prop_oneof![
        1 => keyword(&["ALL", "FULL", "FAST"]).prop_map(Arg::Atom),
        2 => fetch_att(),
        3 => vec(fetch_att(), 1..5).prop_map(Arg::List),
    ];
    let fetch = (
        sequence_set(),
        items,
        prop::option::of(1u64..=u64::MAX >> 1),
    )
        .prop_map(|(set, items, changed)| {
            let mut args = vec![Arg::Atom(set), items];
            if let Some(n) = changed {
                args.push(Arg::List(vec![text("CHANGEDSINCE"), text(&n.to_string())]));
            }
            body(K::Fetch, "FETCH", args)
        });
    // search = "SEARCH" [search-return-opts] [SP "CHARSET" SP charset] 1*(SP search-key)
    let search = (
        prop::option::of(vec(keyword(&["MIN", "MAX", "ALL", "COUNT", "SAVE"]), 0..3)),
        prop::option::of(prop_oneof![
            keyword(&["UTF-8", "US-ASCII"]).prop_map(Arg::Atom),
            Just(Arg::Quoted(b"UTF-8".to_vec())),
        ]),
        vec(search_key(), 1..4),
    )
        .prop_map(|(ret, charset, keys)| {
            let mut args = Vec::new();
            if let Some(ret) = ret {
                args.push(text("RETURN"));
                args.push(Arg::List(ret.into_iter().map(Arg::Atom).collect()));
            }
            if let Some(charset) = charset {
                args.push(text("CHARSET"));
                args.push(charset);
            }
            args.extend(keys.concat());
            body(K::Search, "SEARCH", args)
        });
    // store = "STORE" SP sequence-set [SP store-modifiers] SP store-att-flags
    // store-att-flags = (["+" / "-"] "FLAGS" [".SILENT"]) SP (flag-list / (flag *(SP flag)))
    let store = (
        sequence_set(),
        prop::option::of(0u64..=u64::MAX >> 1),
        select(&["", "+", "-"][..]),
        keyword(&["FLAGS", "FLAGS.SILENT"]),
        prop_oneof![
            flag_list().prop_map(|l| vec![l]),
            vec(flag().prop_map(Arg::Atom), 1..4)
        ],
    )
        .prop_map(|(set, unchanged, sign, item, flags)| {
            let mut args = vec![Arg::Atom(set)];
            if let Some(n) = unchanged {
                args.push(Arg::List(vec![
                    text("UNCHANGEDSINCE"),
                    text(&n.to_string()),
                ]));
            }
            args.push(Arg::Atom([sign.as_bytes(), &item].concat()));
            args.extend(flags);
            body(K::Store, "STORE", args)
        });
    // copy = "COPY" SP sequence-set SP mailbox; move = "MOVE" SP sequence-set SP mailbox
    let copy = (
        select(&[(K::Copy, "COPY"), (K::Move, "MOVE")][..]),
        sequence_set(),
        mailbox(),
    )
        .prop_map(|((kind, name), set, (m, value))| {
            with_mailboxes(body(kind, name, vec![Arg::Atom(set), m]), vec![(M, value)])
        });
    let expunge = sequence_set().prop_map(|set| Body {
        uid: true,
        ..body(K::Expunge, "EXPUNGE", vec![Arg::Atom(set)])
    });
    // uid = "UID" SP (copy / move / fetch / search / store / uid-expunge)
    let plain = prop_oneof![
        2 => fetch.boxed(),
        2 => search.boxed(),
        1 => store.boxed(),
        1 => copy.boxed(),
    ]
    .boxed();
    prop_oneof![
        4 => plain.clone(),
        3 => plain.prop_map(|b| Body { uid: true, ..b }).boxed(),
        1 => expunge.boxed(),
    ]
}

/// Any command of the grammar, from any state, with its expectations.
pub fn command() -> impl Strategy<Value = GenCommand> {
    let body = prop_oneof![
        1 => bare().boxed(),
        1 => not_authenticated().boxed(),
        4 => mailbox_commands().boxed(),
        1 => session_commands().boxed(),
        4 => selected_commands().boxed(),
    ];
    (tag(), body, any::<u64>()).prop_map(|(tag, body, case)| {
        // The name's case from the bits of `case`: names are case-insensitive.
        let mut bits = case;
        let mut cased = |word: &str| -> Vec<u8> {
            word.bytes()
                .map(|b| {
                    bits = bits.rotate_right(1);
                    if bits & 1 == 0 {
                        b.to_ascii_lowercase()
                    } else {
                        b
                    }
                })
                .collect()
        };
        GenCommand {
            tag,
            uid: body.uid.then(|| cased("UID")),
            name: cased(body.name),
            kind: body.kind,
            args: body.args,
            mailboxes: body.mailboxes,
        }
    })
}

/// A carrier command for one rule's instance: `tag NAME args`, with no mailboxes unless given.
pub fn carrier(kind: CommandKind, name: &str, args: Vec<Arg>) -> GenCommand {
    GenCommand {
        tag: b"a1".to_vec(),
        uid: None,
        name: name.as_bytes().to_vec(),
        kind,
        args,
        mailboxes: Vec::new(),
    }
}
