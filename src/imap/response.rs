//! Typed views of server responses: tagged and untagged status responses with their codes,
//! untagged data, and continuation requests.

use std::borrow::Cow;

use bytes::Bytes;

use super::command::MailboxRole;
use super::syntax::{Cx, PResult, Span, SyntaxError, SyntaxErrorKind, Token};

/// The five status conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    Preauth,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::No => "NO",
            Status::Bad => "BAD",
            Status::Bye => "BYE",
            Status::Preauth => "PREAUTH",
        }
    }

    fn from_word(word: &[u8]) -> Option<Status> {
        [
            Status::Ok,
            Status::No,
            Status::Bad,
            Status::Bye,
            Status::Preauth,
        ]
        .into_iter()
        .find(|s| word.eq_ignore_ascii_case(s.as_str().as_bytes()))
    }
}

/// A response code: `[NAME data]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Code {
    /// Everything between the brackets.
    pub span: Span,
    pub name: Span,
    /// The data after the name, as tokens; `None` when it is not tokenizable (some codes carry
    /// free text), in which case it is relayed as is.
    pub args: Option<Vec<Token>>,
}

macro_rules! data_kinds {
    ($($variant:ident => $name:literal,)*) => {
        /// The untagged data responses imapgate knows by name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum DataKind {
            $($variant,)*
            Other,
        }

        impl DataKind {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DataKind::$variant => $name,)*
                    DataKind::Other => "OTHER",
                }
            }

            pub fn from_name(name: &[u8]) -> DataKind {
                $(if name.eq_ignore_ascii_case($name.as_bytes()) {
                    return DataKind::$variant;
                })*
                DataKind::Other
            }
        }
    };
}

data_kinds! {
    Capability => "CAPABILITY",
    List => "LIST",
    Lsub => "LSUB",
    Status => "STATUS",
    Namespace => "NAMESPACE",
    Flags => "FLAGS",
    Exists => "EXISTS",
    Recent => "RECENT",
    Expunge => "EXPUNGE",
    Fetch => "FETCH",
    Search => "SEARCH",
    Esearch => "ESEARCH",
    Sort => "SORT",
    Thread => "THREAD",
    Enabled => "ENABLED",
    Id => "ID",
    Quota => "QUOTA",
    QuotaRoot => "QUOTAROOT",
    Acl => "ACL",
    MyRights => "MYRIGHTS",
    ListRights => "LISTRIGHTS",
    Metadata => "METADATA",
    Vanished => "VANISHED",
}

/// What kind of response a message is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// `+ text`: the server waits for more of the command.
    Continuation { text: Span },
    /// `tag OK/NO/BAD ...` or `* OK/NO/BAD/BYE/PREAUTH ...`.
    Status {
        tag: Option<Span>,
        status: Status,
        code: Option<Code>,
        text: Span,
    },
    /// `* [number SP] NAME [SP arguments]`.
    Data {
        number: Option<u64>,
        kind: DataKind,
        name: Span,
        args: Vec<Token>,
    },
}

/// A parsed response; spans index into `raw`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub raw: Bytes,
    pub kind: ResponseKind,
}

/// A mailbox name carried by a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseMailbox<'t> {
    pub role: MailboxRole,
    pub token: &'t Token,
}

impl Response {
    /// The tag of a tagged status response.
    pub fn tag(&self) -> Option<&[u8]> {
        match &self.kind {
            ResponseKind::Status { tag: Some(t), .. } => Some(t.of(&self.raw)),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<Status> {
        match &self.kind {
            ResponseKind::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&Code> {
        match &self.kind {
            ResponseKind::Status { code, .. } => code.as_ref(),
            _ => None,
        }
    }

    /// The code's name, upper case as sent (e.g. `CAPABILITY`, `TRYCREATE`).
    pub fn code_name(&self) -> Option<&[u8]> {
        self.code().map(|c| c.name.of(&self.raw))
    }

    pub fn data_kind(&self) -> Option<DataKind> {
        match &self.kind {
            ResponseKind::Data { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    pub fn args(&self) -> &[Token] {
        match &self.kind {
            ResponseKind::Data { args, .. } => args,
            _ => &[],
        }
    }

    /// The name for display: `OK`, `EXISTS`, `FETCH`, `+` for a continuation.
    pub fn display_name(&self) -> Cow<'_, str> {
        match &self.kind {
            ResponseKind::Continuation { .. } => Cow::Borrowed("+"),
            ResponseKind::Status { status, .. } => Cow::Borrowed(status.as_str()),
            ResponseKind::Data { kind, name, .. } => match kind {
                DataKind::Other => {
                    Cow::Owned(String::from_utf8_lossy(name.of(&self.raw)).to_ascii_uppercase())
                }
                k => Cow::Borrowed(k.as_str()),
            },
        }
    }

    /// The mailbox names the response carries: LIST/LSUB (including an OLDNAME extended item),
    /// STATUS, QUOTAROOT, ACL, MYRIGHTS, LISTRIGHTS and METADATA.
    pub fn mailboxes(&self) -> Vec<ResponseMailbox<'_>> {
        let args = self.args();
        let mailbox = |token| ResponseMailbox {
            role: MailboxRole::Mailbox,
            token,
        };
        match self.data_kind() {
            Some(DataKind::List | DataKind::Lsub) => {
                let mut out: Vec<_> = args.get(2).map(mailbox).into_iter().collect();
                if let Some(ext) = args.get(3).and_then(Token::items) {
                    for pair in ext.chunks(2) {
                        let is_oldname = pair[0]
                            .string(&self.raw)
                            .is_some_and(|s| s.eq_ignore_ascii_case(b"OLDNAME"));
                        if let (true, Some(values)) =
                            (is_oldname, pair.get(1).and_then(Token::items))
                        {
                            out.extend(values.first().map(mailbox));
                        }
                    }
                }
                out
            }
            Some(
                DataKind::Status
                | DataKind::QuotaRoot
                | DataKind::Acl
                | DataKind::MyRights
                | DataKind::ListRights
                | DataKind::Metadata,
            ) => args.first().map(mailbox).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// The hierarchy delimiter of a LIST or LSUB response (`None` for NIL).
    pub fn list_delimiter(&self) -> Option<Cow<'_, [u8]>> {
        match self.data_kind() {
            Some(DataKind::List | DataKind::Lsub) => self.args().get(1)?.string(&self.raw),
            _ => None,
        }
    }

    /// The capability atoms of `* CAPABILITY ...` or of a `[CAPABILITY ...]` code, with the span
    /// that covers them all (for rewriting).
    pub fn capabilities(&self) -> Option<(Span, &[Token])> {
        let tokens = match &self.kind {
            ResponseKind::Data {
                kind: DataKind::Capability,
                args,
                ..
            } => args.as_slice(),
            ResponseKind::Status { code: Some(c), .. }
                if c.name.of(&self.raw).eq_ignore_ascii_case(b"CAPABILITY") =>
            {
                c.args.as_deref()?
            }
            _ => return None,
        };
        let span = Span::new(tokens.first()?.span().start, tokens.last()?.span().end);
        Some((span, tokens))
    }
}

/// A response that did not parse.
pub type ResponseError = SyntaxError;

/// ```abnf
/// response          = *(continue-req / response-data) response-done
/// continue-req      = "+" [SP (resp-text / base64)] CRLF
/// response-tagged   = tag SP resp-cond-state CRLF
/// response-data     = "*" SP (resp-cond-state / resp-cond-bye / mailbox-data / message-data /
///                     capability-data / enable-data / id-response / ...) CRLF
/// resp-cond-state   = ("OK" / "NO" / "BAD") SP resp-text
/// resp-cond-bye     = "BYE" SP resp-text
/// resp-cond-auth    = ("OK" / "PREAUTH") SP resp-text
/// message-data      = nz-number SP ("EXPUNGE" / ("FETCH" SP msg-att))
/// ```
/// Data responses are parsed as `[number SP] name *(SP token)`, so unknown ones parse too.
pub fn parse_response(raw: Bytes) -> Result<Response, ResponseError> {
    let cx = Cx::new(&raw);
    let kind = response_kind(&cx, &raw).map_err(|e| cx.error(e))?;
    Ok(Response { raw, kind })
}

fn response_kind<'a>(
    cx: &Cx,
    raw: &'a [u8],
) -> Result<ResponseKind, nom::Err<super::syntax::PError<'a>>> {
    if let Some(rest) = raw.strip_prefix(b"+") {
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        let (_, text) = cx.text(rest)?;
        return Ok(ResponseKind::Continuation { text });
    }
    let (tag, rest) = match raw.strip_prefix(b"* ") {
        Some(rest) => (None, rest),
        None => {
            let (rest, tag) = cx.tag(raw)?;
            let (rest, ()) = cx.sp(rest)?;
            (Some(tag), rest)
        }
    };
    let (after_word, word) = cx.word(rest)?;
    let word_bytes = word.of(raw);
    if let Some(status) = Status::from_word(word_bytes) {
        let (_, (code, text)) = resp_text(cx, after_word)?;
        if tag.is_some() && matches!(status, Status::Bye | Status::Preauth) {
            return Err(nom::Err::Error(super::syntax::PError {
                input: rest,
                kind: SyntaxErrorKind::Expected("OK, NO or BAD"),
            }));
        }
        return Ok(ResponseKind::Status {
            tag,
            status,
            code,
            text,
        });
    }
    if tag.is_some() {
        return Err(nom::Err::Error(super::syntax::PError {
            input: rest,
            kind: SyntaxErrorKind::Expected("OK, NO or BAD"),
        }));
    }
    let (rest, number, name) = if word_bytes.iter().all(u8::is_ascii_digit) {
        let number = std::str::from_utf8(word_bytes)
            .ok()
            .and_then(|d| d.parse::<u64>().ok());
        let (rest, ()) = cx.sp(after_word)?;
        let (rest, name) = cx.word(rest)?;
        (rest, number, name)
    } else {
        (after_word, None, word)
    };
    let (rest, args) = cx.arguments(rest)?;
    if !rest.is_empty() {
        return Err(nom::Err::Error(super::syntax::PError {
            input: rest,
            kind: SyntaxErrorKind::Expected("end of response"),
        }));
    }
    Ok(ResponseKind::Data {
        number,
        kind: DataKind::from_name(name.of(raw)),
        name,
        args,
    })
}

/// ```abnf
/// resp-text      = ["[" resp-text-code "]" SP] [text]
/// resp-text-code = atom [SP 1*<any TEXT-CHAR except "]">]   ; tokenized when possible
/// ```
fn resp_text<'a>(cx: &Cx, i: &'a [u8]) -> PResult<'a, (Option<Code>, Span)> {
    // Servers send `* OK` with no text at all, and some omit the SP before an empty text.
    let i = i.strip_prefix(b" ").unwrap_or(i);
    let (rest, code) = if i.first() == Some(&b'[') {
        let (rest, code) = resp_text_code(cx, &i[1..])?;
        (rest.strip_prefix(b" ").unwrap_or(rest), Some(code))
    } else {
        (i, None)
    };
    let (rest, text) = cx.text(rest)?;
    Ok((rest, (code, text)))
}

fn resp_text_code<'a>(cx: &Cx, i: &'a [u8]) -> PResult<'a, Code> {
    let close = memchr::memchr3(b']', b'\r', b'\n', i);
    let name_end = i
        .iter()
        .position(|&b| b == b' ' || b == b']' || b == b'\r' || b == b'\n')
        .unwrap_or(i.len());
    if name_end == 0 {
        return Err(nom::Err::Error(super::syntax::PError {
            input: i,
            kind: SyntaxErrorKind::Expected("response code"),
        }));
    }
    let name = Span::new(cx.pos(i), cx.pos(&i[name_end..]));
    let after_name = &i[name_end..];
    if after_name.first() == Some(&b']') {
        let rest = &after_name[1..];
        let span = Span::new(cx.pos(i), cx.pos(after_name));
        return Ok((
            rest,
            Code {
                span,
                name,
                args: Some(Vec::new()),
            },
        ));
    }
    // Try the data as tokens; fall back to raw text up to the first "]".
    let mut rest = after_name;
    let mut args = Vec::new();
    let tokenized = loop {
        match rest.first() {
            Some(b' ') => rest = &rest[1..],
            Some(b']') => break Some(rest),
            None | Some(b'\r' | b'\n') => break None,
            Some(_) => match cx.token(rest, 0, true) {
                Ok((r, t)) => {
                    args.push(t);
                    rest = r;
                }
                Err(_) => break None,
            },
        }
    };
    let (end, args) = match tokenized {
        Some(end) => (end, Some(args)),
        None => match close.filter(|&c| i[c] == b']') {
            Some(c) => (&i[c..], None),
            None => {
                return Err(nom::Err::Error(super::syntax::PError {
                    input: i,
                    kind: SyntaxErrorKind::Unbalanced,
                }));
            }
        },
    };
    let span = Span::new(cx.pos(i), cx.pos(end));
    Ok((&end[1..], Code { span, name, args }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(raw: &str) -> Response {
        parse_response(Bytes::copy_from_slice(raw.as_bytes())).expect("parses")
    }

    #[test]
    fn tagged_status_with_code() {
        let r = resp("a1 OK [READ-WRITE] SELECT completed\r\n");
        assert_eq!(r.tag(), Some(&b"a1"[..]));
        assert_eq!(r.status(), Some(Status::Ok));
        assert_eq!(r.code_name(), Some(&b"READ-WRITE"[..]));
    }

    #[test]
    fn untagged_status_codes_with_data() {
        let r = resp("* OK [UIDVALIDITY 3857529045] UIDs valid\r\n");
        let code = r.code().expect("code");
        assert_eq!(code.args.as_ref().map(Vec::len), Some(1));
        let r = resp("* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n");
        assert_eq!(r.code_name(), Some(&b"PERMANENTFLAGS"[..]));
        let r = resp("a OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n");
        assert_eq!(
            r.code().and_then(|c| c.args.as_ref()).map(Vec::len),
            Some(3)
        );
        let r = resp("* NO [ALERT] System shutdown in 10 minutes\r\n");
        assert_eq!(r.code_name(), Some(&b"ALERT"[..]));
        let r = resp("* BYE\r\n");
        assert_eq!(r.status(), Some(Status::Bye));
        let r = resp("* OK [REFERRAL imap://user;AUTH=*@SERVER2/] Try there\r\n");
        assert_eq!(r.code_name(), Some(&b"REFERRAL"[..]));
    }

    #[test]
    fn capability_in_greeting_code_and_data() {
        let r = resp("* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n");
        let (_, caps) = r.capabilities().expect("caps");
        assert_eq!(caps.len(), 3);
        let r = resp("* CAPABILITY IMAP4rev1 LITERAL+ IDLE\r\n");
        assert_eq!(r.capabilities().map(|(_, c)| c.len()), Some(3));
    }

    #[test]
    fn numbered_data() {
        let r = resp("* 23 EXISTS\r\n");
        assert!(matches!(
            r.kind,
            ResponseKind::Data {
                number: Some(23),
                kind: DataKind::Exists,
                ..
            }
        ));
        let r = resp("* 12 FETCH (FLAGS (\\Seen) BODY[] {5}\r\nhello UID 4)\r\n");
        assert_eq!(r.display_name(), "FETCH");
        assert_eq!(r.args()[0].items().map(<[Token]>::len), Some(6));
    }

    #[test]
    fn list_with_delimiter_and_oldname() {
        let r = resp("* LIST (\\HasNoChildren) \"/\" \"a/b\" (\"OLDNAME\" (\"a/c\"))\r\n");
        let names: Vec<_> = r
            .mailboxes()
            .iter()
            .map(|m| m.token.string(&r.raw).map(|s| s.into_owned()))
            .collect();
        assert_eq!(names, vec![Some(b"a/b".to_vec()), Some(b"a/c".to_vec())]);
        assert_eq!(r.list_delimiter().as_deref(), Some(&b"/"[..]));
        let r = resp("* LIST (\\Noselect) NIL \"\"\r\n");
        assert_eq!(r.list_delimiter(), None);
    }

    #[test]
    fn mailbox_bearing_data() {
        for raw in [
            "* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292)\r\n",
            "* QUOTAROOT INBOX \"\"\r\n",
            "* ACL INBOX bob lrswipkxtecda\r\n",
            "* MYRIGHTS INBOX rwiptsldaex\r\n",
            "* LISTRIGHTS INBOX bob lr s w\r\n",
            "* METADATA INBOX (/private/comment \"x\")\r\n",
        ] {
            assert_eq!(resp(raw).mailboxes().len(), 1, "{raw}");
        }
        assert!(
            resp("* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n")
                .mailboxes()
                .is_empty()
        );
    }

    #[test]
    fn continuation_and_unknown_data() {
        assert!(matches!(
            resp("+ Ready for literal\r\n").kind,
            ResponseKind::Continuation { .. }
        ));
        assert!(matches!(
            resp("+\r\n").kind,
            ResponseKind::Continuation { .. }
        ));
        let r = resp("* XSOMETHING 1 (a b)\r\n");
        assert_eq!(r.display_name(), "XSOMETHING");
    }

    #[test]
    fn tagged_bye_is_not_a_response() {
        assert!(parse_response(Bytes::from_static(b"a1 BYE x\r\n")).is_err());
        assert!(parse_response(Bytes::from_static(b"a1 EXISTS\r\n")).is_err());
    }
}
