//! Typed views of client commands: the tag, the command name (with its `UID` prefix), the
//! argument tree, and which arguments are mailbox names.

use std::borrow::Cow;

use bytes::Bytes;

use super::syntax::{Cx, PError, PResult, Span, SyntaxError, SyntaxErrorKind, Token};

macro_rules! command_kinds {
    ($($variant:ident => $name:literal,)*) => {
        /// The commands imapgate knows by name. Anything else is [`CommandKind::Other`] and still
        /// relayed; the fixed set keeps metric label values bounded.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum CommandKind {
            $($variant,)*
            Other,
        }

        impl CommandKind {
            /// Every known kind, for tables and tests.
            pub const ALL: &'static [CommandKind] = &[$(CommandKind::$variant,)*];

            /// The upper-case name as written on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(CommandKind::$variant => $name,)*
                    CommandKind::Other => "OTHER",
                }
            }

            /// Looks a command name up, ignoring ASCII case.
            pub fn from_name(name: &[u8]) -> CommandKind {
                $(if name.eq_ignore_ascii_case($name.as_bytes()) {
                    return CommandKind::$variant;
                })*
                CommandKind::Other
            }
        }
    };
}

command_kinds! {
    Capability => "CAPABILITY",
    Noop => "NOOP",
    Logout => "LOGOUT",
    Starttls => "STARTTLS",
    Authenticate => "AUTHENTICATE",
    Login => "LOGIN",
    Enable => "ENABLE",
    Select => "SELECT",
    Examine => "EXAMINE",
    Create => "CREATE",
    Delete => "DELETE",
    Rename => "RENAME",
    Subscribe => "SUBSCRIBE",
    Unsubscribe => "UNSUBSCRIBE",
    List => "LIST",
    Lsub => "LSUB",
    Namespace => "NAMESPACE",
    Status => "STATUS",
    Append => "APPEND",
    Idle => "IDLE",
    Check => "CHECK",
    Close => "CLOSE",
    Unselect => "UNSELECT",
    Expunge => "EXPUNGE",
    Search => "SEARCH",
    Fetch => "FETCH",
    Store => "STORE",
    Copy => "COPY",
    Move => "MOVE",
    Sort => "SORT",
    Thread => "THREAD",
    Id => "ID",
    Compress => "COMPRESS",
    GetQuotaRoot => "GETQUOTAROOT",
    GetQuota => "GETQUOTA",
    SetQuota => "SETQUOTA",
    GetAcl => "GETACL",
    SetAcl => "SETACL",
    DeleteAcl => "DELETEACL",
    ListRights => "LISTRIGHTS",
    MyRights => "MYRIGHTS",
    GetMetadata => "GETMETADATA",
    SetMetadata => "SETMETADATA",
}

impl CommandKind {
    /// The commands that may follow `UID`.
    pub fn takes_uid(self) -> bool {
        matches!(
            self,
            CommandKind::Fetch
                | CommandKind::Search
                | CommandKind::Store
                | CommandKind::Copy
                | CommandKind::Move
                | CommandKind::Expunge
                | CommandKind::Sort
                | CommandKind::Thread
        )
    }
}

/// A command name with its `UID` prefix: the label used in logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CommandName {
    pub kind: CommandKind,
    pub uid: bool,
}

impl CommandName {
    /// `"UID FETCH"`, `"LIST"`, `"OTHER"`: always from a fixed set.
    pub fn label(self) -> &'static str {
        if !self.uid {
            return self.kind.as_str();
        }
        match self.kind {
            CommandKind::Fetch => "UID FETCH",
            CommandKind::Search => "UID SEARCH",
            CommandKind::Store => "UID STORE",
            CommandKind::Copy => "UID COPY",
            CommandKind::Move => "UID MOVE",
            CommandKind::Expunge => "UID EXPUNGE",
            CommandKind::Sort => "UID SORT",
            CommandKind::Thread => "UID THREAD",
            _ => "OTHER",
        }
    }
}

/// What a mailbox-bearing argument means to the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxRole {
    /// A mailbox name.
    Mailbox,
    /// The reference name of LIST or LSUB.
    Reference,
    /// A LIST or LSUB pattern (may hold `*` and `%`).
    Pattern,
    /// An IMAP URL (RFC 5092) naming a mailbox, e.g. in APPEND's CATENATE (RFC 4469): passed
    /// to policies as is, never decoded as a name.
    Url,
}

/// A mailbox-bearing argument: where it is and what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailboxArg<'t> {
    pub role: MailboxRole,
    pub token: &'t Token,
}

/// A parsed command. The tokens' spans index into `raw`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub raw: Bytes,
    pub tag: Span,
    pub name: CommandName,
    /// The command name as sent (without the `UID` prefix).
    pub name_span: Span,
    pub args: Vec<Token>,
}

/// A command that did not parse; the tag is kept when it was readable, so the proxy can answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct CommandError {
    pub tag: Option<Bytes>,
    pub error: SyntaxError,
}

impl Command {
    pub fn tag(&self) -> &[u8] {
        self.tag.of(&self.raw)
    }

    /// The name for display: the fixed label, or the upper-cased name of an unknown command.
    pub fn display_name(&self) -> Cow<'static, str> {
        if self.name.kind != CommandKind::Other {
            return Cow::Borrowed(self.name.label());
        }
        let name = String::from_utf8_lossy(self.name_span.of(&self.raw)).to_ascii_uppercase();
        Cow::Owned(if self.name.uid {
            format!("UID {name}")
        } else {
            name
        })
    }

    /// The string value of argument `i`, if it is one.
    pub fn arg_string(&self, i: usize) -> Option<Cow<'_, [u8]>> {
        self.args.get(i)?.string(&self.raw)
    }

    /// True when the command ends with a literal whose data is not in this message.
    pub fn is_cut(&self) -> bool {
        self.args.last().is_some_and(Token::is_cut)
    }

    /// The mailbox-bearing arguments, in order.
    pub fn mailbox_args(&self) -> Vec<MailboxArg<'_>> {
        let mut out = Vec::new();
        let string_like = |t: &Token| {
            matches!(
                t,
                Token::Atom(_) | Token::Quoted { .. } | Token::Literal { .. }
            )
        };
        let mut push = |role, index: usize| {
            if let Some(token) = self.args.get(index).filter(|t| string_like(t)) {
                out.push(MailboxArg { role, token });
            }
        };
        use CommandKind as K;
        match self.name.kind {
            K::Select
            | K::Examine
            | K::Create
            | K::Delete
            | K::Subscribe
            | K::Unsubscribe
            | K::Status
            | K::GetQuotaRoot
            | K::GetAcl
            | K::SetAcl
            | K::DeleteAcl
            | K::ListRights
            | K::MyRights
            | K::SetMetadata => push(MailboxRole::Mailbox, 0),
            K::Rename => {
                push(MailboxRole::Mailbox, 0);
                push(MailboxRole::Mailbox, 1);
            }
            K::Append => {
                push(MailboxRole::Mailbox, 0);
                // RFC 4469: APPEND mailbox [flags] [date] CATENATE (URL url / TEXT literal ...)
                let catenate = self.args.windows(2).filter_map(|pair| {
                    let is_catenate = matches!(pair[0], Token::Atom(_))
                        && pair[0].raw(&self.raw).eq_ignore_ascii_case(b"CATENATE");
                    is_catenate.then(|| pair[1].items()).flatten()
                });
                for parts in catenate {
                    for part in parts.chunks(2) {
                        let is_url = matches!(part[0], Token::Atom(_))
                            && part[0].raw(&self.raw).eq_ignore_ascii_case(b"URL");
                        if let (true, Some(url)) = (is_url, part.get(1).filter(|t| string_like(t)))
                        {
                            out.push(MailboxArg {
                                role: MailboxRole::Url,
                                token: url,
                            });
                        }
                    }
                }
            }
            K::Copy | K::Move => push(MailboxRole::Mailbox, 1),
            K::GetMetadata => {
                let options = self.args.len() >= 3 && self.args[0].items().is_some();
                push(MailboxRole::Mailbox, usize::from(options));
            }
            K::List | K::Lsub => {
                // RFC 5258: LIST [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]
                let first = usize::from(self.args.first().and_then(Token::items).is_some());
                push(MailboxRole::Reference, first);
                match self.args.get(first + 1) {
                    Some(Token::List { items, .. }) => {
                        out.extend(items.iter().filter(|t| string_like(t)).map(|token| {
                            MailboxArg {
                                role: MailboxRole::Pattern,
                                token,
                            }
                        }))
                    }
                    _ => push(MailboxRole::Pattern, first + 1),
                }
            }
            _ => {}
        }
        out
    }
}

/// ```abnf
/// command = tag SP (command-any / command-auth / command-nonauth / command-select) CRLF
/// uid     = "UID" SP (copy / move / fetch / search / store / uid-expunge)
/// ; the name is an atom followed by SP or CRLF (Dovecot reads the name up to SP, so
/// ; "SELECT(x)" is an unknown command there, never SELECT)
/// ```
/// Arguments are parsed as a token tree with the upstream's token boundaries (see
/// [`Cx::command`]); an unknown command name is not an error.
pub fn parse_command(raw: Bytes) -> Result<Command, CommandError> {
    let cx = Cx::command(&raw);
    let (rest, tag) = cx.tag(&raw).map_err(|e| CommandError {
        tag: None,
        error: cx.error(e),
    })?;
    if !matches!(rest.first(), Some(b' ' | b'\r')) {
        // The client's tag runs on to the SP (Dovecot reads it so): answering with the valid
        // part of it would answer a tag the client never sent.
        return Err(CommandError {
            tag: None,
            error: SyntaxError {
                kind: SyntaxErrorKind::Expected("tag"),
                offset: cx.pos(rest),
            },
        });
    }
    let fail = |e| CommandError {
        tag: Some(raw.slice(tag.start..tag.end)),
        error: cx.error(e),
    };
    let (rest, ()) = cx.sp(rest).map_err(fail)?;
    let (mut rest, mut name_span) = name(&cx, rest).map_err(fail)?;
    let mut uid = false;
    if name_span.of(&raw).eq_ignore_ascii_case(b"UID") && rest.first() == Some(&b' ') {
        let (r, span) = name(&cx, &rest[1..]).map_err(fail)?;
        rest = r;
        name_span = span;
        uid = true;
    }
    let kind = CommandKind::from_name(name_span.of(&raw));
    let appending = kind == CommandKind::Append && !uid;
    let cx = cx
        .with_fetch(kind == CommandKind::Fetch)
        .with_literal8(appending);
    let (rest, args) = cx.arguments(rest).map_err(fail)?;
    if !rest.is_empty() {
        return Err(CommandError {
            tag: Some(raw.slice(tag.start..tag.end)),
            error: SyntaxError {
                kind: SyntaxErrorKind::Expected("end of command"),
                offset: cx.pos(rest),
            },
        });
    }
    if let Some(offset) = appending.then(|| misplaced_literal8(&raw, &args)).flatten() {
        return Err(CommandError {
            tag: Some(raw.slice(tag.start..tag.end)),
            error: SyntaxError {
                kind: SyntaxErrorKind::Literal8NotAllowed,
                offset,
            },
        });
    }
    let mut kind = kind;
    if uid && !kind.takes_uid() {
        kind = CommandKind::Other;
    }
    Ok(Command {
        tag,
        name: CommandName { kind, uid },
        name_span,
        args,
        raw,
    })
}

/// ```abnf
/// append         = "APPEND" SP mailbox 1*append-message            ; RFC 3502
/// append-message = append-opts SP append-data
/// append-data    = literal / literal8 / append-data-ext             ; RFC 3516
/// catenate       = "CATENATE" SP "(" cat-part *(SP cat-part) ")"    ; RFC 4469
/// text-literal   = "TEXT" SP (literal / literal8)
/// ```
/// Where a literal8 stands outside append-data or a CATENATE part, its offset. Dovecot refuses
/// a literal8 as APPEND's mailbox ("literal8 not allowed here") and then reads its octets as a
/// command; anywhere else the RFC has none.
fn misplaced_literal8(raw: &[u8], args: &[Token]) -> Option<usize> {
    for (i, arg) in args.iter().enumerate() {
        match arg {
            Token::Literal { literal, span, .. } if literal.binary && i == 0 => {
                return Some(span.start);
            }
            Token::List { items, .. } => {
                let catenate = i > 0 && args[i - 1].is_atom(raw, "CATENATE");
                for (j, item) in items.iter().enumerate() {
                    let found = match item {
                        Token::Literal { literal, span, .. } if literal.binary => {
                            let part = catenate && j > 0 && items[j - 1].is_atom(raw, "TEXT");
                            (!part).then_some(span.start)
                        }
                        Token::List { items, .. } => nested_literal8(items),
                        _ => None,
                    };
                    if found.is_some() {
                        return found;
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// The offset of the first literal8 in `tokens`, at any depth.
fn nested_literal8(tokens: &[Token]) -> Option<usize> {
    tokens.iter().find_map(|t| match t {
        Token::Literal { literal, span, .. } if literal.binary => Some(span.start),
        Token::List { items, .. } => nested_literal8(items),
        _ => None,
    })
}

/// ```abnf
/// command-name = atom (SP / CRLF)
/// ```
fn name<'a>(cx: &Cx, i: &'a [u8]) -> PResult<'a, Span> {
    let (rest, span) = cx.word(i)?;
    match rest.first() {
        Some(b' ' | b'\r') => Ok((rest, span)),
        _ => Err(nom::Err::Error(PError {
            input: rest,
            kind: SyntaxErrorKind::Expected("SP"),
        })),
    }
}

/// A client line that is not a command: a SASL response during AUTHENTICATE, or IDLE's DONE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientLine {
    /// `base64 CRLF`; `cancel` for `"*" CRLF`. The payload is a secret and is never kept here.
    Sasl {
        cancel: bool,
    },
    Done,
}

/// ```abnf
/// authenticate-continuation = (base64 / "*") CRLF    ; RFC 9051 section 6.2.2
/// base64 = *(4base64-char) [base64-terminal]
/// ```
pub fn parse_sasl_line(raw: &[u8]) -> Result<ClientLine, SyntaxError> {
    let line = raw.strip_suffix(b"\r\n").unwrap_or(raw);
    if line == b"*" {
        return Ok(ClientLine::Sasl { cancel: true });
    }
    let is_b64 = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    match line.iter().position(|b| !is_b64(b)) {
        None => Ok(ClientLine::Sasl { cancel: false }),
        Some(offset) => Err(SyntaxError {
            kind: SyntaxErrorKind::Expected("base64"),
            offset,
        }),
    }
}

/// ```abnf
/// idle = "IDLE" CRLF "DONE"   ; RFC 2177; DONE is case-insensitive
/// ```
pub fn parse_done(raw: &[u8]) -> Result<ClientLine, SyntaxError> {
    let line = raw.strip_suffix(b"\r\n").unwrap_or(raw);
    if line.eq_ignore_ascii_case(b"DONE") {
        Ok(ClientLine::Done)
    } else {
        Err(SyntaxError {
            kind: SyntaxErrorKind::Expected("DONE"),
            offset: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(raw: &str) -> Command {
        parse_command(Bytes::copy_from_slice(raw.as_bytes())).expect("parses")
    }

    fn mailboxes(raw: &str) -> Vec<(MailboxRole, String)> {
        let c = cmd(raw);
        c.mailbox_args()
            .iter()
            .map(|m| {
                let s = m.token.string(&c.raw).expect("string");
                (m.role, String::from_utf8_lossy(&s).into_owned())
            })
            .collect()
    }

    use MailboxRole::{Mailbox as M, Pattern as P, Reference as R};

    fn m(role: MailboxRole, s: &str) -> (MailboxRole, String) {
        (role, s.to_string())
    }

    #[test]
    fn tag_name_and_uid_prefix() {
        let c = cmd("A001 uid fetch 1:* (FLAGS)\r\n");
        assert_eq!(c.tag(), b"A001");
        assert_eq!(c.name.label(), "UID FETCH");
        assert_eq!(c.args.len(), 2);
        let c = cmd("a2 XYZZY foo\r\n");
        assert_eq!(c.name.kind, CommandKind::Other);
        assert_eq!(c.display_name(), "XYZZY");
        assert_eq!(c.name.label(), "OTHER");
    }

    #[test]
    fn mailbox_arguments_of_every_mailbox_command() {
        let table: &[(&str, Vec<(MailboxRole, String)>)] = &[
            ("a SELECT INBOX\r\n", vec![m(M, "INBOX")]),
            ("a SELECT \"Sent\" (CONDSTORE)\r\n", vec![m(M, "Sent")]),
            ("a EXAMINE {4+}\r\nSent\r\n", vec![m(M, "Sent")]),
            ("a CREATE a/b\r\n", vec![m(M, "a/b")]),
            ("a DELETE a/b\r\n", vec![m(M, "a/b")]),
            (
                "a RENAME old \"new one\"\r\n",
                vec![m(M, "old"), m(M, "new one")],
            ),
            ("a SUBSCRIBE x\r\n", vec![m(M, "x")]),
            ("a UNSUBSCRIBE x\r\n", vec![m(M, "x")]),
            ("a LIST \"\" *\r\n", vec![m(R, ""), m(P, "*")]),
            ("a LSUB ref %\r\n", vec![m(R, "ref"), m(P, "%")]),
            (
                "a LIST (SUBSCRIBED) \"\" (\"a*\" b%) RETURN (CHILDREN)\r\n",
                vec![m(R, ""), m(P, "a*"), m(P, "b%")],
            ),
            (
                "a STATUS Drafts (MESSAGES UNSEEN)\r\n",
                vec![m(M, "Drafts")],
            ),
            (
                "a APPEND Drafts (\\Seen) {3+}\r\nabc\r\n",
                vec![m(M, "Drafts")],
            ),
            (
                "a APPEND Box CATENATE (URL \"/Private;UID=1\" TEXT {2+}\r\nhi)\r\n",
                vec![m(M, "Box"), m(MailboxRole::Url, "/Private;UID=1")],
            ),
            ("a COPY 1:3 Trash\r\n", vec![m(M, "Trash")]),
            ("a MOVE 1 Trash\r\n", vec![m(M, "Trash")]),
            ("a UID COPY 7 Trash\r\n", vec![m(M, "Trash")]),
            ("a UID MOVE 7 Trash\r\n", vec![m(M, "Trash")]),
            ("a GETQUOTAROOT INBOX\r\n", vec![m(M, "INBOX")]),
            ("a GETACL x\r\n", vec![m(M, "x")]),
            ("a SETACL x bob lrs\r\n", vec![m(M, "x")]),
            ("a DELETEACL x bob\r\n", vec![m(M, "x")]),
            ("a LISTRIGHTS x bob\r\n", vec![m(M, "x")]),
            ("a MYRIGHTS x\r\n", vec![m(M, "x")]),
            ("a GETMETADATA x /private/comment\r\n", vec![m(M, "x")]),
            (
                "a GETMETADATA (MAXSIZE 1024) x (/a /b)\r\n",
                vec![m(M, "x")],
            ),
            (
                "a SETMETADATA x (/private/comment \"hi\")\r\n",
                vec![m(M, "x")],
            ),
            ("a FETCH 1 (FLAGS)\r\n", vec![]),
            ("a GETQUOTA \"\"\r\n", vec![]),
        ];
        for (raw, want) in table {
            assert_eq!(&mailboxes(raw), want, "{raw}");
        }
    }

    #[test]
    fn cut_command_is_recognised() {
        let c = cmd("a APPEND INBOX {5000000}\r\n");
        assert!(c.is_cut());
        // A synchronizing literal of no octets still has the client wait for "+": the head the
        // session judges ends at its announcement, in a list too.
        assert!(cmd("a LOGIN {0}\r\n").is_cut());
        assert!(cmd("a ID (\"name\" {0}\r\n").is_cut());
        assert!(!cmd("a LOGIN {0}\r\n {0}\r\n\r\n").is_cut());
        assert_eq!(
            mailboxes("a APPEND INBOX {5000000}\r\n"),
            vec![m(M, "INBOX")]
        );
    }

    #[test]
    fn bad_commands_keep_their_tag() {
        let err = parse_command(Bytes::from_static(b"a7 LOGIN \"unterminated\r\n"))
            .expect_err("bad quoted");
        assert_eq!(err.tag.as_deref(), Some(&b"a7"[..]));
        let err = parse_command(Bytes::from_static(b"\r\n")).expect_err("empty");
        assert_eq!(err.tag, None);
        assert!(parse_command(Bytes::from_static(b"a8\r\n")).is_err());
        // A tag with an octet a tag may not hold is not answered as a shorter tag.
        let err = parse_command(Bytes::from_static(b"a9] NOOP\r\n")).expect_err("bad tag");
        assert_eq!((err.tag, err.error.offset), (None, 2));
    }

    fn args(raw: &str) -> Vec<String> {
        let c = cmd(raw);
        c.args
            .iter()
            .map(|t| String::from_utf8_lossy(t.raw(&c.raw)).into_owned())
            .collect()
    }

    fn refused(raw: &str) -> SyntaxErrorKind {
        parse_command(Bytes::copy_from_slice(raw.as_bytes()))
            .map(|c| panic!("{raw:?} parsed: {c:?}"))
            .unwrap_or_else(|e| e.error.kind)
    }

    #[test]
    fn brackets_are_atom_chars_outside_fetch() {
        // ATOM-CHAR includes "[" and ASTRING-CHAR "]": these are mailbox names, not sections.
        assert_eq!(mailboxes("a SELECT x[y]z\r\n"), vec![m(M, "x[y]z")]);
        assert_eq!(
            mailboxes("a LIST \"\" x[y%*\r\n"),
            vec![m(R, ""), m(P, "x[y%*")]
        );
        assert_eq!(mailboxes("a CREATE ]a[\r\n"), vec![m(M, "]a[")]);
        // A "[" does not swallow the spaces up to a "]": two atoms, as Dovecot reads them.
        assert_eq!(args("a RENAME x[y z] w\r\n"), ["x[y", "z]", "w"]);
        assert_eq!(args("a STATUS x[y (MESSAGES)\r\n"), ["x[y", "(MESSAGES)"]);
    }

    #[test]
    fn every_atom_char_is_accepted_in_an_astring() {
        let chars: String = (0x21u8..0x7f)
            .filter(|b| !b"(){\"".contains(b))
            .map(char::from)
            .collect();
        let raw = format!("a SELECT {chars}\r\n");
        assert_eq!(mailboxes(&raw), vec![m(M, &chars)]);
    }

    #[test]
    fn nil_is_a_mailbox_name_in_a_command() {
        // Dovecot's `CREATE NIL` creates a mailbox called NIL: a policy must see it.
        assert_eq!(mailboxes("a CREATE NIL\r\n"), vec![m(M, "NIL")]);
        assert_eq!(
            mailboxes("a RENAME nil \"NIL\"\r\n"),
            vec![m(M, "nil"), m(M, "NIL")]
        );
        assert!(matches!(cmd("a ID NIL\r\n").args[0], Token::Atom(_)));
    }

    #[test]
    fn fetch_items_are_read_as_dovecot_reads_them() {
        // A section without a header list is one atom, partial included.
        assert_eq!(
            args("a FETCH 1 (BINARY.PEEK[1.2]<0.5> BINARY.SIZE[1] BODY[] body[1.MIME])\r\n"),
            [
                "1",
                "(BINARY.PEEK[1.2]<0.5> BINARY.SIZE[1] BODY[] body[1.MIME])"
            ]
        );
        // A header list is a list token between two atoms; its strings and literals are tokens
        // of the tree like any other (a literal announced there is one a reader must see).
        let c = cmd(
            "a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (DATE \"FROM\" {2+}\r\nTO)]<0.20>)\r\n",
        );
        let items: Vec<String> = c.args[1]
            .items()
            .expect("a list")
            .iter()
            .map(|t| String::from_utf8_lossy(t.raw(&c.raw)).into_owned())
            .collect();
        assert_eq!(
            items,
            [
                "FLAGS",
                "BODY.PEEK[HEADER.FIELDS",
                "(DATE \"FROM\" {2+}\r\nTO)",
                "]<0.20>"
            ]
        );
        // Header names are astrings: "[" and "]" in them are atom octets.
        assert_eq!(
            args("a FETCH 1 BODY[HEADER.FIELDS (X[Y BODY[Z] a]b)]\r\n"),
            ["1", "BODY[HEADER.FIELDS", "(X[Y BODY[Z] a]b)", "]"]
        );
        // The head of a command cut at a literal in a header list parses (the session judges
        // it before the client sends the octets).
        assert!(cmd("a FETCH 1 (BODY[HEADER.FIELDS (DATE {4}\r\n").is_cut());
        // Only a fetch item's header list may run into "]", and only in FETCH.
        assert_eq!(
            refused("a SEARCH (ALL)]\r\n"),
            SyntaxErrorKind::Expected("SP")
        );
        // Dovecot reads "BODY[{1+}" as an atom with a "{" in it (an error) and the literal's
        // octets as the next command.
        for raw in ["a FETCH 1 BODY[{1+}\r\nx]\r\n", "a FETCH 1 BODY[(A)]\r\n"] {
            assert_eq!(refused(raw), SyntaxErrorKind::Expected("SP"), "{raw:?}");
        }
    }

    #[test]
    fn what_dovecot_reads_differently_is_refused() {
        for raw in [
            // An atom running into a literal, a string or a list: Dovecot refuses the atom
            // and then reads a non-synchronizing literal's octets as a command.
            "a SELECT x{1+}\r\na\r\n",
            "a SELECT x\"y\"\r\n",
            "a STATUS INBOX(MESSAGES)\r\n",
            "a FETCH 1 BODY[]<0.5>(FLAGS)\r\n",
            // Tokens without SP between them: not RFC syntax.
            "a LOGIN \"a\"\"b\"\r\n",
            "a STATUS \"INBOX\"(MESSAGES)\r\n",
            "a STATUS {5+}\r\nINBOX(MESSAGES)\r\n",
            "a STORE 1 +FLAGS (\\Seen)(x)\r\n",
            // The command name runs to SP or CRLF.
            "a SELECT(x)\r\n",
            "a SELECT\"INBOX\"\r\n",
            "a NOOP% x\r\n",
            "a UID FETCH(1)\r\n",
        ] {
            assert_eq!(refused(raw), SyntaxErrorKind::Expected("SP"), "{raw:?}");
        }
        // 8-bit octets and DEL are not CHAR: Dovecot says "8bit data in atom".
        assert_eq!(
            refused("a SELECT \u{e9}t\u{e9}\r\n"),
            SyntaxErrorKind::Expected("atom")
        );
        assert_eq!(
            refused("a SELECT x\u{e9}\r\n"),
            SyntaxErrorKind::Expected("SP")
        );
        assert_eq!(
            refused("a SELECT x\x7f\r\n"),
            SyntaxErrorKind::Expected("SP")
        );
        // RFC 3501 allows "]" in a tag, Dovecot does not (untagged BAD, the command unanswered).
        assert_eq!(refused("a] NOOP\r\n"), SyntaxErrorKind::Expected("tag"));
        assert_eq!(refused("] NOOP\r\n"), SyntaxErrorKind::Expected("tag"));
        // A ")" that closes nothing.
        assert_eq!(refused("a SELECT INBOX )\r\n"), SyntaxErrorKind::Unbalanced);
    }

    #[test]
    fn literal8_only_in_append() {
        let c = cmd("a APPEND INBOX ~{3+}\r\nabc\r\n");
        assert!(matches!(&c.args[1], Token::Literal { literal, .. } if literal.binary));
        cmd("a APPEND INBOX CATENATE (TEXT ~{1+}\r\nx URL \"/INBOX;UID=1\")\r\n");
        for raw in [
            "a NOOP ~{5+}\r\nb X\r\n\r\n",
            "a SELECT ~{5}\r\n",
            "a FETCH 1 (BODY[] ~{1+}\r\nx)\r\n",
            "a UID APPEND INBOX ~{1+}\r\nx\r\n",
        ] {
            assert_eq!(refused(raw), SyntaxErrorKind::Literal8NotAllowed, "{raw:?}");
        }
        // In APPEND only as the message (MULTIAPPEND: each of them) or a CATENATE part:
        // Dovecot refuses one as the mailbox ("literal8 not allowed here") and then reads its
        // octets as a command.
        cmd("a APPEND INBOX ~{1+}\r\nx (\\Seen) ~{1+}\r\ny\r\n");
        for (raw, offset) in [
            ("a APPEND ~{5+}\r\nINBOX {3+}\r\nabc\r\n", 9),
            ("a APPEND INBOX (~{1+}\r\nx) {3+}\r\nabc\r\n", 16),
            ("a APPEND INBOX CATENATE (URL ~{1+}\r\nx)\r\n", 29),
            ("a APPEND INBOX CATENATE ((TEXT ~{1+}\r\nx))\r\n", 31),
            ("a APPEND INBOX X (TEXT ~{1+}\r\nx)\r\n", 23),
        ] {
            let err = parse_command(Bytes::copy_from_slice(raw.as_bytes())).expect_err(raw);
            assert_eq!(
                (err.error.kind, err.error.offset),
                (SyntaxErrorKind::Literal8NotAllowed, offset),
                "{raw:?}"
            );
        }
        // "~" not followed by "{" is an ATOM-CHAR.
        assert_eq!(
            mailboxes("a SELECT ~x{\r\n".replace('{', "").as_str()),
            vec![m(M, "~x")]
        );
    }

    #[test]
    fn sasl_and_done_lines() {
        assert_eq!(
            parse_sasl_line(b"AGFsaWNlAHB3\r\n"),
            Ok(ClientLine::Sasl { cancel: false })
        );
        assert_eq!(
            parse_sasl_line(b"*\r\n"),
            Ok(ClientLine::Sasl { cancel: true })
        );
        assert!(parse_sasl_line(b"a1 NOOP\r\n").is_err());
        assert_eq!(parse_done(b"done\r\n"), Ok(ClientLine::Done));
        assert!(parse_done(b"a1 DONE\r\n").is_err());
    }
}
