//! Known-answer tables: for each command and response, what the parser must find. The token tree
//! is written as a compact "shape": `a:ATOM`, `q:quoted`, `{n}:data` (a literal and its octets),
//! `{n}:cut` (a literal whose octets are not in the message), `NIL`, and `( ... )` for lists.

use bytes::Bytes;
use imapgate::imap::command::{CommandKind, MailboxRole, parse_command};
use imapgate::imap::mutf7;
use imapgate::imap::response::{DataKind, ResponseKind, Status, parse_response};
use imapgate::imap::syntax::Token;

fn shape(tokens: &[Token], raw: &[u8]) -> String {
    tokens
        .iter()
        .map(|t| match t {
            Token::Atom(span) => format!("a:{}", String::from_utf8_lossy(span.of(raw))),
            Token::Quoted { .. } => {
                let s = t.string(raw).expect("quoted");
                format!("q:{}", String::from_utf8_lossy(&s))
            }
            Token::Literal {
                data: Some(data),
                literal,
                ..
            } => format!(
                "{}{{{}{}}}:{}",
                if literal.binary { "~" } else { "" },
                literal.len,
                if literal.sync { "" } else { "+" },
                String::from_utf8_lossy(data.of(raw))
            ),
            Token::Literal {
                data: None,
                literal,
                ..
            } => format!("{{{}}}:cut", literal.len),
            Token::List { items, .. } => format!("({})", shape(items, raw)),
            Token::Nil(_) => "NIL".to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

struct Cmd {
    raw: &'static str,
    label: &'static str,
    kind: CommandKind,
    uid: bool,
    args: &'static str,
    /// Decoded mailbox arguments with their roles: M mailbox, R reference, P pattern.
    mailboxes: &'static [(&'static str, &'static str)],
}

const fn cmd(
    raw: &'static str,
    label: &'static str,
    kind: CommandKind,
    args: &'static str,
    mailboxes: &'static [(&'static str, &'static str)],
) -> Cmd {
    Cmd {
        raw,
        label,
        kind,
        uid: false,
        args,
        mailboxes,
    }
}

const fn uid(raw: &'static str, label: &'static str, kind: CommandKind, args: &'static str) -> Cmd {
    Cmd {
        raw,
        label,
        kind,
        uid: true,
        args,
        mailboxes: &[],
    }
}

use CommandKind as K;

const COMMANDS: &[Cmd] = &[
    // RFC 3501 / RFC 9051, any state
    cmd("a CAPABILITY\r\n", "CAPABILITY", K::Capability, "", &[]),
    cmd("a NOOP\r\n", "NOOP", K::Noop, "", &[]),
    cmd("a LOGOUT\r\n", "LOGOUT", K::Logout, "", &[]),
    // not authenticated
    cmd("a STARTTLS\r\n", "STARTTLS", K::Starttls, "", &[]),
    cmd(
        "a AUTHENTICATE GSSAPI\r\n",
        "AUTHENTICATE",
        K::Authenticate,
        "a:GSSAPI",
        &[],
    ),
    cmd(
        "a AUTHENTICATE PLAIN dGVzdAB0ZXN0AHRlc3Q=\r\n",
        "AUTHENTICATE",
        K::Authenticate,
        "a:PLAIN a:dGVzdAB0ZXN0AHRlc3Q=",
        &[],
    ),
    cmd(
        "a AUTHENTICATE EXTERNAL =\r\n",
        "AUTHENTICATE",
        K::Authenticate,
        "a:EXTERNAL a:=",
        &[],
    ),
    cmd(
        "a LOGIN SMITH SESAME\r\n",
        "LOGIN",
        K::Login,
        "a:SMITH a:SESAME",
        &[],
    ),
    cmd(
        "a LOGIN {5+}\r\nalice \"p w\\\"\"\r\n",
        "LOGIN",
        K::Login,
        "{5+}:alice q:p w\"",
        &[],
    ),
    // authenticated
    cmd(
        "a ENABLE CONDSTORE UTF8=ACCEPT\r\n",
        "ENABLE",
        K::Enable,
        "a:CONDSTORE a:UTF8=ACCEPT",
        &[],
    ),
    cmd(
        "a SELECT INBOX\r\n",
        "SELECT",
        K::Select,
        "a:INBOX",
        &[("M", "INBOX")],
    ),
    cmd(
        "a SELECT \"Entw&APw-rfe\" (CONDSTORE)\r\n",
        "SELECT",
        K::Select,
        "q:Entw&APw-rfe (a:CONDSTORE)",
        &[("M", "Entwürfe")],
    ),
    cmd(
        "a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))\r\n",
        "SELECT",
        K::Select,
        "a:INBOX (a:QRESYNC (a:67890007 a:20050715194045000 a:41,43:211,214:541))",
        &[("M", "INBOX")],
    ),
    // "[" is an ATOM-CHAR and "]" an ASTRING-CHAR: outside FETCH they are mailbox octets,
    // never a section, so "x[y z]" is two atoms, as Dovecot reads it (its RENAME of
    // "x[y z] w" renames x[y to z] and ignores w).
    cmd(
        "a SELECT x[y]z\r\n",
        "SELECT",
        K::Select,
        "a:x[y]z",
        &[("M", "x[y]z")],
    ),
    cmd(
        "a RENAME x[y z] w\r\n",
        "RENAME",
        K::Rename,
        "a:x[y a:z] a:w",
        &[("M", "x[y"), ("M", "z]")],
    ),
    // NIL in an astring position is a mailbox called NIL (Dovecot creates it).
    cmd(
        "a CREATE NIL\r\n",
        "CREATE",
        K::Create,
        "a:NIL",
        &[("M", "NIL")],
    ),
    cmd(
        "a EXAMINE blurdybloop\r\n",
        "EXAMINE",
        K::Examine,
        "a:blurdybloop",
        &[("M", "blurdybloop")],
    ),
    cmd("a NAMESPACE\r\n", "NAMESPACE", K::Namespace, "", &[]),
    cmd(
        "a CREATE owatagusiam/\r\n",
        "CREATE",
        K::Create,
        "a:owatagusiam/",
        &[("M", "owatagusiam/")],
    ),
    cmd(
        "a CREATE \"Sent\" (USE (\\Sent))\r\n",
        "CREATE",
        K::Create,
        "q:Sent (a:USE (a:\\Sent))",
        &[("M", "Sent")],
    ),
    cmd(
        "a DELETE foo/bar\r\n",
        "DELETE",
        K::Delete,
        "a:foo/bar",
        &[("M", "foo/bar")],
    ),
    cmd(
        "a RENAME \"&ZeVnLIqe-\" {8}\r\n&U,BTFw-\r\n",
        "RENAME",
        K::Rename,
        "q:&ZeVnLIqe- {8}:&U,BTFw-",
        &[("M", "日本語"), ("M", "台北")],
    ),
    cmd(
        "a SUBSCRIBE #news.comp.mail.mime\r\n",
        "SUBSCRIBE",
        K::Subscribe,
        "a:#news.comp.mail.mime",
        &[("M", "#news.comp.mail.mime")],
    ),
    cmd(
        "a UNSUBSCRIBE x\r\n",
        "UNSUBSCRIBE",
        K::Unsubscribe,
        "a:x",
        &[("M", "x")],
    ),
    cmd(
        "a LIST \"\" *\r\n",
        "LIST",
        K::List,
        "q: a:*",
        &[("R", ""), ("P", "*")],
    ),
    cmd(
        "a LIST ~/Mail/ %\r\n",
        "LIST",
        K::List,
        "a:~/Mail/ a:%",
        &[("R", "~/Mail/"), ("P", "%")],
    ),
    cmd(
        "a LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (\"a*\" %) RETURN (CHILDREN STATUS (MESSAGES))\r\n",
        "LIST",
        K::List,
        "(a:SUBSCRIBED a:RECURSIVEMATCH) q: (q:a* a:%) a:RETURN (a:CHILDREN a:STATUS (a:MESSAGES))",
        &[("R", ""), ("P", "a*"), ("P", "%")],
    ),
    cmd(
        "a LIST \"\" x[y%*\r\n",
        "LIST",
        K::List,
        "q: a:x[y%*",
        &[("R", ""), ("P", "x[y%*")],
    ),
    cmd(
        "a LSUB \"#news.\" \"comp.mail.*\"\r\n",
        "LSUB",
        K::Lsub,
        "q:#news. q:comp.mail.*",
        &[("R", "#news."), ("P", "comp.mail.*")],
    ),
    cmd(
        "a STATUS blurdybloop (UIDNEXT MESSAGES SIZE)\r\n",
        "STATUS",
        K::Status,
        "a:blurdybloop (a:UIDNEXT a:MESSAGES a:SIZE)",
        &[("M", "blurdybloop")],
    ),
    cmd(
        "a APPEND saved (\\Seen) \" 7-Feb-1994 21:52:25 -0800\" {5+}\r\nhello\r\n",
        "APPEND",
        K::Append,
        "a:saved (a:\\Seen) q: 7-Feb-1994 21:52:25 -0800 {5+}:hello",
        &[("M", "saved")],
    ),
    cmd(
        "a APPEND INBOX ~{3+}\r\nab\0\r\n",
        "APPEND",
        K::Append,
        "a:INBOX ~{3+}:ab\0",
        &[("M", "INBOX")],
    ),
    cmd(
        "a APPEND INBOX CATENATE (TEXT ~{1+}\r\nx URL \"/INBOX;UID=1\")\r\n",
        "APPEND",
        K::Append,
        "a:INBOX a:CATENATE (a:TEXT ~{1+}:x a:URL q:/INBOX;UID=1)",
        // The URL names a mailbox: policies see it (and the namespace refuses it).
        &[("M", "INBOX"), ("U", "/INBOX;UID=1")],
    ),
    cmd(
        "a APPEND INBOX {5000000}\r\n",
        "APPEND",
        K::Append,
        "a:INBOX {5000000}:cut",
        &[("M", "INBOX")],
    ),
    cmd("a IDLE\r\n", "IDLE", K::Idle, "", &[]),
    // selected
    cmd("a CHECK\r\n", "CHECK", K::Check, "", &[]),
    cmd("a CLOSE\r\n", "CLOSE", K::Close, "", &[]),
    cmd("a UNSELECT\r\n", "UNSELECT", K::Unselect, "", &[]),
    cmd("a EXPUNGE\r\n", "EXPUNGE", K::Expunge, "", &[]),
    cmd(
        "a SEARCH RETURN (MIN COUNT) CHARSET UTF-8 OR (FLAGGED SINCE 1-Feb-1994) NOT FROM \"Smith\"\r\n",
        "SEARCH",
        K::Search,
        "a:RETURN (a:MIN a:COUNT) a:CHARSET a:UTF-8 a:OR (a:FLAGGED a:SINCE a:1-Feb-1994) a:NOT a:FROM q:Smith",
        &[],
    ),
    cmd(
        "a FETCH 2:4 (FLAGS BODY.PEEK[HEADER.FIELDS (DATE FROM)]<0.2048> BINARY[1.2])\r\n",
        "FETCH",
        K::Fetch,
        // As Dovecot reads it: the header list is a token of its own between two atoms.
        "a:2:4 (a:FLAGS a:BODY.PEEK[HEADER.FIELDS (a:DATE a:FROM) a:]<0.2048> a:BINARY[1.2])",
        &[],
    ),
    cmd("a FETCH $ ALL\r\n", "FETCH", K::Fetch, "a:$ a:ALL", &[]),
    cmd(
        "a STORE 2:4 +FLAGS.SILENT (\\Deleted $Junk)\r\n",
        "STORE",
        K::Store,
        "a:2:4 a:+FLAGS.SILENT (a:\\Deleted a:$Junk)",
        &[],
    ),
    cmd(
        "a COPY 2:4 MEETING\r\n",
        "COPY",
        K::Copy,
        "a:2:4 a:MEETING",
        &[("M", "MEETING")],
    ),
    cmd(
        "a MOVE 1:* \"Other Messages\"\r\n",
        "MOVE",
        K::Move,
        "a:1:* q:Other Messages",
        &[("M", "Other Messages")],
    ),
    uid(
        "a UID FETCH 4827313:* FLAGS\r\n",
        "UID FETCH",
        K::Fetch,
        "a:4827313:* a:FLAGS",
    ),
    uid(
        "a UID SEARCH UID $ SMALLER 4096\r\n",
        "UID SEARCH",
        K::Search,
        "a:UID a:$ a:SMALLER a:4096",
    ),
    uid(
        "a UID STORE 1 -FLAGS (\\Seen)\r\n",
        "UID STORE",
        K::Store,
        "a:1 a:-FLAGS (a:\\Seen)",
    ),
    uid(
        "a UID EXPUNGE 3000:3002\r\n",
        "UID EXPUNGE",
        K::Expunge,
        "a:3000:3002",
    ),
    // Extensions
    cmd(
        "a SORT (REVERSE DATE) UTF-8 ALL\r\n",
        "SORT",
        K::Sort,
        "(a:REVERSE a:DATE) a:UTF-8 a:ALL",
        &[],
    ),
    uid(
        "a UID THREAD REFERENCES UTF-8 ALL\r\n",
        "UID THREAD",
        K::Thread,
        "a:REFERENCES a:UTF-8 a:ALL",
    ),
    cmd(
        "a ID (\"name\" \"sodr\" \"version\" \"19.34\")\r\n",
        "ID",
        K::Id,
        "(q:name q:sodr q:version q:19.34)",
        &[],
    ),
    // In a command NIL is an atom: in an astring position it is a mailbox name (Dovecot's
    // `CREATE NIL` creates one); where the command means nil, its reader knows.
    cmd("a ID NIL\r\n", "ID", K::Id, "a:NIL", &[]),
    cmd(
        "a COMPRESS DEFLATE\r\n",
        "COMPRESS",
        K::Compress,
        "a:DEFLATE",
        &[],
    ),
    cmd(
        "a GETQUOTAROOT INBOX\r\n",
        "GETQUOTAROOT",
        K::GetQuotaRoot,
        "a:INBOX",
        &[("M", "INBOX")],
    ),
    cmd("a GETQUOTA \"\"\r\n", "GETQUOTA", K::GetQuota, "q:", &[]),
    cmd(
        "a SETQUOTA \"\" (STORAGE 512 MESSAGE 1000)\r\n",
        "SETQUOTA",
        K::SetQuota,
        "q: (a:STORAGE a:512 a:MESSAGE a:1000)",
        &[],
    ),
    cmd(
        "a GETACL INBOX\r\n",
        "GETACL",
        K::GetAcl,
        "a:INBOX",
        &[("M", "INBOX")],
    ),
    cmd(
        "a SETACL INBOX/Drafts Chris +cda\r\n",
        "SETACL",
        K::SetAcl,
        "a:INBOX/Drafts a:Chris a:+cda",
        &[("M", "INBOX/Drafts")],
    ),
    cmd(
        "a DELETEACL INBOX/Drafts Chris\r\n",
        "DELETEACL",
        K::DeleteAcl,
        "a:INBOX/Drafts a:Chris",
        &[("M", "INBOX/Drafts")],
    ),
    cmd(
        "a LISTRIGHTS ~/Mail/saved smith\r\n",
        "LISTRIGHTS",
        K::ListRights,
        "a:~/Mail/saved a:smith",
        &[("M", "~/Mail/saved")],
    ),
    cmd(
        "a MYRIGHTS INBOX\r\n",
        "MYRIGHTS",
        K::MyRights,
        "a:INBOX",
        &[("M", "INBOX")],
    ),
    cmd(
        "a GETMETADATA (MAXSIZE 1024 DEPTH 1) \"\" (/shared/comment /private/comment)\r\n",
        "GETMETADATA",
        K::GetMetadata,
        "(a:MAXSIZE a:1024 a:DEPTH a:1) q: (a:/shared/comment a:/private/comment)",
        &[("M", "")],
    ),
    cmd(
        "a GETMETADATA INBOX /private/comment\r\n",
        "GETMETADATA",
        K::GetMetadata,
        "a:INBOX a:/private/comment",
        &[("M", "INBOX")],
    ),
    cmd(
        "a SETMETADATA INBOX (/private/comment {6+}\r\nMy 2¢ /shared/x NIL)\r\n",
        "SETMETADATA",
        K::SetMetadata,
        "a:INBOX (a:/private/comment {6+}:My 2¢ a:/shared/x a:NIL)",
        &[("M", "INBOX")],
    ),
];

#[test]
fn every_command_parses_with_its_name_arguments_and_mailboxes() {
    for c in COMMANDS {
        let parsed = parse_command(Bytes::from_static(c.raw.as_bytes()))
            .unwrap_or_else(|e| panic!("{:?}: {e}", c.raw));
        assert_eq!(parsed.tag(), b"a", "{:?}", c.raw);
        assert_eq!(parsed.name.kind, c.kind, "{:?}", c.raw);
        assert_eq!(parsed.name.uid, c.uid, "{:?}", c.raw);
        assert_eq!(parsed.name.label(), c.label, "{:?}", c.raw);
        assert_eq!(parsed.display_name(), c.label, "{:?}", c.raw);
        assert_eq!(shape(&parsed.args, &parsed.raw), c.args, "{:?}", c.raw);
        let mailboxes: Vec<(&str, String)> = parsed
            .mailbox_args()
            .iter()
            .map(|m| {
                let role = match m.role {
                    MailboxRole::Mailbox => "M",
                    MailboxRole::Reference => "R",
                    MailboxRole::Pattern => "P",
                    MailboxRole::Url => "U",
                };
                let s = m.token.string(&parsed.raw).expect("a string");
                (role, mutf7::decode(&s).expect("modified UTF-7"))
            })
            .collect();
        let want: Vec<(&str, String)> = c
            .mailboxes
            .iter()
            .map(|(r, m)| (*r, m.to_string()))
            .collect();
        assert_eq!(mailboxes, want, "{:?}", c.raw);
    }
}

#[test]
fn the_table_covers_every_known_command() {
    for kind in CommandKind::ALL {
        assert!(
            COMMANDS.iter().any(|c| c.kind == *kind),
            "no known answer for {kind:?}"
        );
    }
}

#[test]
fn uid_copy_and_uid_move_carry_their_mailbox() {
    for (raw, label) in [
        ("a UID COPY 305:310 meeting\r\n", "UID COPY"),
        ("a uid move 42:69 \"foo bar\"\r\n", "UID MOVE"),
    ] {
        let c = parse_command(Bytes::from_static(raw.as_bytes())).expect("parses");
        assert_eq!(c.name.label(), label);
        assert_eq!(c.mailbox_args().len(), 1);
        assert_eq!(c.mailbox_args()[0].role, MailboxRole::Mailbox);
    }
}

#[test]
fn names_are_case_insensitive_and_unknown_commands_are_generic() {
    let c = parse_command(Bytes::from_static(b"x1 sElEcT inbox\r\n")).expect("parses");
    assert_eq!(c.name.kind, K::Select);
    assert_eq!(c.display_name(), "SELECT");
    let c = parse_command(Bytes::from_static(
        b"x2 XAPPLEPUSHSERVICE aps-version 2\r\n",
    ))
    .expect("parses");
    assert_eq!(c.name.kind, K::Other);
    assert_eq!(c.display_name(), "XAPPLEPUSHSERVICE");
    assert_eq!(shape(&c.args, &c.raw), "a:aps-version a:2");
    // UID with a command that takes no UID form is not a known command.
    let c = parse_command(Bytes::from_static(b"x3 UID SELECT INBOX\r\n")).expect("parses");
    assert_eq!(c.name.kind, K::Other);
    assert_eq!(c.display_name(), "UID SELECT");
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

struct Data {
    raw: &'static str,
    number: Option<u64>,
    kind: DataKind,
    name: &'static str,
    args: &'static str,
    mailboxes: &'static [&'static str],
}

const fn data(
    raw: &'static str,
    kind: DataKind,
    name: &'static str,
    args: &'static str,
    mailboxes: &'static [&'static str],
) -> Data {
    Data {
        raw,
        number: None,
        kind,
        name,
        args,
        mailboxes,
    }
}

const fn numbered(
    raw: &'static str,
    n: u64,
    kind: DataKind,
    name: &'static str,
    args: &'static str,
) -> Data {
    Data {
        raw,
        number: Some(n),
        kind,
        name,
        args,
        mailboxes: &[],
    }
}

use DataKind as D;

const DATA: &[Data] = &[
    data(
        "* CAPABILITY IMAP4rev2 STARTTLS AUTH=GSSAPI LOGINDISABLED\r\n",
        D::Capability,
        "CAPABILITY",
        "a:IMAP4rev2 a:STARTTLS a:AUTH=GSSAPI a:LOGINDISABLED",
        &[],
    ),
    data(
        "* LIST (\\Noselect) \"/\" ~/Mail/foo\r\n",
        D::List,
        "LIST",
        "(a:\\Noselect) q:/ a:~/Mail/foo",
        &["~/Mail/foo"],
    ),
    data(
        "* LIST () NIL \"\"\r\n",
        D::List,
        "LIST",
        "() NIL q:",
        &[""],
    ),
    data(
        "* LIST () \"/\" \"Foo\" (\"CHILDINFO\" (\"SUBSCRIBED\"))\r\n",
        D::List,
        "LIST",
        "() q:/ q:Foo (q:CHILDINFO (q:SUBSCRIBED))",
        &["Foo"],
    ),
    data(
        "* LIST () \"/\" \"Normalized\" (\"OLDNAME\" (\"Entw&APw-rfe\"))\r\n",
        D::List,
        "LIST",
        "() q:/ q:Normalized (q:OLDNAME (q:Entw&APw-rfe))",
        &["Normalized", "Entwürfe"],
    ),
    data(
        "* LSUB (\\NoSelect) \".\" #news.comp.mail\r\n",
        D::Lsub,
        "LSUB",
        "(a:\\NoSelect) q:. a:#news.comp.mail",
        &["#news.comp.mail"],
    ),
    data(
        "* STATUS \"Entw&APw-rfe\" (MESSAGES 231 UIDNEXT 44292 SIZE 12345678)\r\n",
        D::Status,
        "STATUS",
        "q:Entw&APw-rfe (a:MESSAGES a:231 a:UIDNEXT a:44292 a:SIZE a:12345678)",
        &["Entwürfe"],
    ),
    data(
        "* NAMESPACE ((\"\" \"/\")(\"#mh/\" \"/\" \"X-PARAM\" (\"FLAG1\" \"FLAG2\"))) NIL ((\"#shared/\" \"/\"))\r\n",
        D::Namespace,
        "NAMESPACE",
        "((q: q:/) (q:#mh/ q:/ q:X-PARAM (q:FLAG1 q:FLAG2))) NIL ((q:#shared/ q:/))",
        &[],
    ),
    data(
        "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded)\r\n",
        D::Flags,
        "FLAGS",
        "(a:\\Answered a:\\Flagged a:\\Deleted a:\\Seen a:\\Draft a:$Forwarded)",
        &[],
    ),
    numbered("* 23 EXISTS\r\n", 23, D::Exists, "EXISTS", ""),
    numbered("* 5 RECENT\r\n", 5, D::Recent, "RECENT", ""),
    numbered("* 44 EXPUNGE\r\n", 44, D::Expunge, "EXPUNGE", ""),
    numbered(
        "* 23 FETCH (FLAGS (\\Seen) RFC822.SIZE 44827 UID 447)\r\n",
        23,
        D::Fetch,
        "FETCH",
        "(a:FLAGS (a:\\Seen) a:RFC822.SIZE a:44827 a:UID a:447)",
    ),
    // Literal boundaries: the octets are exactly the announced count, whatever they hold.
    numbered(
        "* 12 FETCH (BODY[HEADER] {15}\r\nSubject: a)\r\n\r\n UID 4 BINARY[1] ~{3}\r\n\0\r\n)\r\n",
        12,
        D::Fetch,
        "FETCH",
        "(a:BODY[HEADER] {15}:Subject: a)\r\n\r\n a:UID a:4 a:BINARY[1] ~{3}:\0\r\n)",
    ),
    numbered(
        "* 12 FETCH (UID 7 BODY[] {0}\r\n)\r\n",
        12,
        D::Fetch,
        "FETCH",
        "(a:UID a:7 a:BODY[] {0}:)",
    ),
    // A FETCH cut at a streamed literal (the framer yields the octets separately).
    numbered(
        "* 3 FETCH (UID 9 BODY[] {83357}\r\n",
        3,
        D::Fetch,
        "FETCH",
        "(a:UID a:9 a:BODY[] {83357}:cut)",
    ),
    data(
        "* SEARCH 2 84 882\r\n",
        D::Search,
        "SEARCH",
        "a:2 a:84 a:882",
        &[],
    ),
    data("* SEARCH\r\n", D::Search, "SEARCH", "", &[]),
    data(
        "* ESEARCH (TAG \"A285\") UID MIN 7 MAX 3800\r\n",
        D::Esearch,
        "ESEARCH",
        "(a:TAG q:A285) a:UID a:MIN a:7 a:MAX a:3800",
        &[],
    ),
    data(
        "* ESEARCH COUNT 18 ALL 1:17,21\r\n",
        D::Esearch,
        "ESEARCH",
        "a:COUNT a:18 a:ALL a:1:17,21",
        &[],
    ),
    data(
        "* ENABLED CONDSTORE QRESYNC\r\n",
        D::Enabled,
        "ENABLED",
        "a:CONDSTORE a:QRESYNC",
        &[],
    ),
    data("* ENABLED\r\n", D::Enabled, "ENABLED", "", &[]),
    data(
        "* ID (\"name\" \"Cyrus\" \"version\" \"1.5\" \"os\" NIL)\r\n",
        D::Id,
        "ID",
        "(q:name q:Cyrus q:version q:1.5 q:os NIL)",
        &[],
    ),
    data("* ID NIL\r\n", D::Id, "ID", "NIL", &[]),
    data(
        "* QUOTA \"\" (STORAGE 10 512 MESSAGE 2 1000)\r\n",
        D::Quota,
        "QUOTA",
        "q: (a:STORAGE a:10 a:512 a:MESSAGE a:2 a:1000)",
        &[],
    ),
    data(
        "* QUOTAROOT INBOX \"\" \"#user/x\"\r\n",
        D::QuotaRoot,
        "QUOTAROOT",
        "a:INBOX q: q:#user/x",
        &["INBOX"],
    ),
    data(
        "* QUOTAROOT \"Entw&APw-rfe\"\r\n",
        D::QuotaRoot,
        "QUOTAROOT",
        "q:Entw&APw-rfe",
        &["Entwürfe"],
    ),
    data(
        "* ACL INBOX Fred rwipslxetad \"Chris Pat\" lrs\r\n",
        D::Acl,
        "ACL",
        "a:INBOX a:Fred a:rwipslxetad q:Chris Pat a:lrs",
        &["INBOX"],
    ),
    data(
        "* MYRIGHTS \"&ZeVnLIqe-\" rwiptsldaex\r\n",
        D::MyRights,
        "MYRIGHTS",
        "q:&ZeVnLIqe- a:rwiptsldaex",
        &["日本語"],
    ),
    data(
        "* LISTRIGHTS ~/Mail/saved smith la r swicdkxte\r\n",
        D::ListRights,
        "LISTRIGHTS",
        "a:~/Mail/saved a:smith a:la a:r a:swicdkxte",
        &["~/Mail/saved"],
    ),
    data(
        "* METADATA \"\" (/shared/comment \"Shared comment\" /private/x {3}\r\nabc)\r\n",
        D::Metadata,
        "METADATA",
        "q: (a:/shared/comment q:Shared comment a:/private/x {3}:abc)",
        &[""],
    ),
    data(
        "* METADATA INBOX /shared/comment /private/comment\r\n",
        D::Metadata,
        "METADATA",
        "a:INBOX a:/shared/comment a:/private/comment",
        &["INBOX"],
    ),
    data("* SORT 2 3 6\r\n", D::Sort, "SORT", "a:2 a:3 a:6", &[]),
    data(
        "* THREAD (2)(3 6 (4 23)(44 7 96))\r\n",
        D::Thread,
        "THREAD",
        "(a:2) (a:3 a:6 (a:4 a:23) (a:44 a:7 a:96))",
        &[],
    ),
    data(
        "* VANISHED (EARLIER) 300:310,405,411\r\n",
        D::Vanished,
        "VANISHED",
        "(a:EARLIER) a:300:310,405,411",
        &[],
    ),
    data(
        "* XPIG-LATIN ow-nay eaking-spay\r\n",
        D::Other,
        "XPIG-LATIN",
        "a:ow-nay a:eaking-spay",
        &[],
    ),
];

#[test]
fn every_data_response_parses_with_its_kind_arguments_and_mailboxes() {
    for d in DATA {
        let r = parse_response(Bytes::from_static(d.raw.as_bytes()))
            .unwrap_or_else(|e| panic!("{:?}: {e}", d.raw));
        let ResponseKind::Data {
            number, kind, args, ..
        } = &r.kind
        else {
            panic!("{:?}: not data: {:?}", d.raw, r.kind);
        };
        assert_eq!(*number, d.number, "{:?}", d.raw);
        assert_eq!(*kind, d.kind, "{:?}", d.raw);
        assert_eq!(r.display_name(), d.name, "{:?}", d.raw);
        assert_eq!(r.tag(), None);
        assert_eq!(shape(args, &r.raw), d.args, "{:?}", d.raw);
        let names: Vec<String> = r
            .mailboxes()
            .iter()
            .filter_map(|m| m.token.string(&r.raw))
            .map(|s| mutf7::decode(&s).unwrap_or_else(|e| panic!("{:?}: {e}", d.raw)))
            .collect();
        let want: Vec<String> = d.mailboxes.iter().map(|s| s.to_string()).collect();
        assert_eq!(names, want, "{:?}", d.raw);
    }
}

#[test]
fn a_list_mailbox_in_a_literal_and_its_delimiter() {
    let r = parse_response(Bytes::from_static(
        b"* LIST (\\HasNoChildren) \".\" {16}\r\nINBOX.&ZeVnLIqe-\r\n",
    ))
    .expect("parses");
    let names: Vec<String> = r
        .mailboxes()
        .iter()
        .map(|m| mutf7::decode(&m.token.string(&r.raw).expect("string")).expect("mUTF-7"))
        .collect();
    assert_eq!(names, vec!["INBOX.日本語".to_string()]);
    assert_eq!(r.list_delimiter().as_deref(), Some(&b"."[..]));
}

#[test]
fn fetch_literal_spans_are_exact() {
    let raw = b"* 12 FETCH (BODY[] {12}\r\n{5}\r\na1 NOOP UID 4)\r\n";
    let r = parse_response(Bytes::from_static(raw)).expect("parses");
    let items = r.args()[0].items().expect("a list");
    let Token::Literal { span, data, .. } = &items[1] else {
        panic!("not a literal: {:?}", items[1]);
    };
    let data = data.expect("data");
    assert_eq!(span.of(raw), b"{12}\r\n{5}\r\na1 NOOP");
    assert_eq!(data.of(raw), b"{5}\r\na1 NOOP");
    assert_eq!((data.start, data.end), (25, 37));
    assert_eq!(items[2].raw(raw), b"UID");
}

struct StatusCase {
    raw: &'static str,
    tag: Option<&'static str>,
    status: Status,
    code: Option<&'static str>,
    code_args: Option<&'static str>,
    text: &'static str,
}

const fn st(
    raw: &'static str,
    tag: Option<&'static str>,
    status: Status,
    code: Option<&'static str>,
    code_args: Option<&'static str>,
    text: &'static str,
) -> StatusCase {
    StatusCase {
        raw,
        tag,
        status,
        code,
        code_args,
        text,
    }
}

const STATUS: &[StatusCase] = &[
    st(
        "* OK IMAP4rev2 server ready\r\n",
        None,
        Status::Ok,
        None,
        None,
        "IMAP4rev2 server ready",
    ),
    st(
        "* PREAUTH IMAP4rev2 server logged in as Smith\r\n",
        None,
        Status::Preauth,
        None,
        None,
        "IMAP4rev2 server logged in as Smith",
    ),
    st(
        "* BYE Autologout; idle for too long\r\n",
        None,
        Status::Bye,
        None,
        None,
        "Autologout; idle for too long",
    ),
    st(
        "* OK [ALERT] System shutdown in 10 minutes\r\n",
        None,
        Status::Ok,
        Some("ALERT"),
        Some(""),
        "System shutdown in 10 minutes",
    ),
    st(
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n",
        None,
        Status::Ok,
        Some("CAPABILITY"),
        Some("a:IMAP4rev1 a:SASL-IR a:LITERAL+ a:AUTH=PLAIN"),
        "Dovecot ready.",
    ),
    st(
        "* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n",
        None,
        Status::Ok,
        Some("PERMANENTFLAGS"),
        Some("(a:\\Deleted a:\\Seen a:\\*)"),
        "Limited",
    ),
    st(
        "* OK [UIDVALIDITY 3857529045] UIDs valid\r\n",
        None,
        Status::Ok,
        Some("UIDVALIDITY"),
        Some("a:3857529045"),
        "UIDs valid",
    ),
    st(
        "* OK [UIDNEXT 4392] Predicted next UID\r\n",
        None,
        Status::Ok,
        Some("UIDNEXT"),
        Some("a:4392"),
        "Predicted next UID",
    ),
    st(
        "* OK [UNSEEN 12] Message 12 is first unseen\r\n",
        None,
        Status::Ok,
        Some("UNSEEN"),
        Some("a:12"),
        "Message 12 is first unseen",
    ),
    st(
        "* OK [UIDVALIDITY 1]\r\n",
        None,
        Status::Ok,
        Some("UIDVALIDITY"),
        Some("a:1"),
        "",
    ),
    st(
        "a1 OK [READ-WRITE] SELECT completed\r\n",
        Some("a1"),
        Status::Ok,
        Some("READ-WRITE"),
        Some(""),
        "SELECT completed",
    ),
    st(
        "a1 OK [APPENDUID 38505 3955] APPEND completed\r\n",
        Some("a1"),
        Status::Ok,
        Some("APPENDUID"),
        Some("a:38505 a:3955"),
        "APPEND completed",
    ),
    st(
        "a1 OK [APPENDUID 38505 3955:3957,3960] Done\r\n",
        Some("a1"),
        Status::Ok,
        Some("APPENDUID"),
        Some("a:38505 a:3955:3957,3960"),
        "Done",
    ),
    st(
        "a2 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n",
        Some("a2"),
        Status::Ok,
        Some("COPYUID"),
        Some("a:38505 a:304,319:320 a:3956:3958"),
        "Done",
    ),
    st(
        "* OK [COPYUID 432432 42:69 1202:1229]\r\n",
        None,
        Status::Ok,
        Some("COPYUID"),
        Some("a:432432 a:42:69 a:1202:1229"),
        "",
    ),
    st(
        "a3 NO [TRYCREATE] Mailbox doesn't exist: x\r\n",
        Some("a3"),
        Status::No,
        Some("TRYCREATE"),
        Some(""),
        "Mailbox doesn't exist: x",
    ),
    st(
        "a4 NO [BADCHARSET (UTF-8 US-ASCII)] KOI8-R unsupported\r\n",
        Some("a4"),
        Status::No,
        Some("BADCHARSET"),
        Some("(a:UTF-8 a:US-ASCII)"),
        "KOI8-R unsupported",
    ),
    st(
        "* NO [UIDNOTSTICKY] Non-persistent UIDs\r\n",
        None,
        Status::No,
        Some("UIDNOTSTICKY"),
        Some(""),
        "Non-persistent UIDs",
    ),
    st(
        "* OK [CLOSED] Previous mailbox is now closed\r\n",
        None,
        Status::Ok,
        Some("CLOSED"),
        Some(""),
        "Previous mailbox is now closed",
    ),
    st(
        "* OK [REFERRAL imap://user;AUTH=*@SERVER2/] Try there\r\n",
        None,
        Status::Ok,
        Some("REFERRAL"),
        Some("a:imap://user;AUTH=*@SERVER2/"),
        "Try there",
    ),
    st(
        "a5 BAD [CLIENTBUG] Done\r\n",
        Some("a5"),
        Status::Bad,
        Some("CLIENTBUG"),
        Some(""),
        "Done",
    ),
    // RFC 5530 codes
    st(
        "a NO [UNAVAILABLE] User's backend down for maintenance\r\n",
        Some("a"),
        Status::No,
        Some("UNAVAILABLE"),
        Some(""),
        "User's backend down for maintenance",
    ),
    st(
        "b NO [AUTHENTICATIONFAILED] Authentication failed\r\n",
        Some("b"),
        Status::No,
        Some("AUTHENTICATIONFAILED"),
        Some(""),
        "Authentication failed",
    ),
    st(
        "c1 NO [AUTHORIZATIONFAILED] No such authorization-ID\r\n",
        Some("c1"),
        Status::No,
        Some("AUTHORIZATIONFAILED"),
        Some(""),
        "No such authorization-ID",
    ),
    st(
        "d NO [EXPIRED] That password isn't valid any more\r\n",
        Some("d"),
        Status::No,
        Some("EXPIRED"),
        Some(""),
        "That password isn't valid any more",
    ),
    st(
        "d NO [PRIVACYREQUIRED] Connection offers no privacy\r\n",
        Some("d"),
        Status::No,
        Some("PRIVACYREQUIRED"),
        Some(""),
        "Connection offers no privacy",
    ),
    st(
        "e NO [CONTACTADMIN]\r\n",
        Some("e"),
        Status::No,
        Some("CONTACTADMIN"),
        Some(""),
        "",
    ),
    st(
        "f NO [NOPERM] Access denied\r\n",
        Some("f"),
        Status::No,
        Some("NOPERM"),
        Some(""),
        "Access denied",
    ),
    st(
        "g NO [INUSE] Mailbox in use\r\n",
        Some("g"),
        Status::No,
        Some("INUSE"),
        Some(""),
        "Mailbox in use",
    ),
    st(
        "h OK [EXPUNGEISSUED] Search completed\r\n",
        Some("h"),
        Status::Ok,
        Some("EXPUNGEISSUED"),
        Some(""),
        "Search completed",
    ),
    st(
        "i NO [CORRUPTION] Cannot open mailbox\r\n",
        Some("i"),
        Status::No,
        Some("CORRUPTION"),
        Some(""),
        "Cannot open mailbox",
    ),
    st(
        "j NO [SERVERBUG] This should not happen\r\n",
        Some("j"),
        Status::No,
        Some("SERVERBUG"),
        Some(""),
        "This should not happen",
    ),
    st(
        "k2 OK [CLIENTBUG] Done\r\n",
        Some("k2"),
        Status::Ok,
        Some("CLIENTBUG"),
        Some(""),
        "Done",
    ),
    st(
        "l NO [CANNOT] Adjacent slashes are not supported\r\n",
        Some("l"),
        Status::No,
        Some("CANNOT"),
        Some(""),
        "Adjacent slashes are not supported",
    ),
    st(
        "m NO [LIMIT] At most 32 flags in one mailbox supported\r\n",
        Some("m"),
        Status::No,
        Some("LIMIT"),
        Some(""),
        "At most 32 flags in one mailbox supported",
    ),
    st(
        "n1 NO [OVERQUOTA] Sorry\r\n",
        Some("n1"),
        Status::No,
        Some("OVERQUOTA"),
        Some(""),
        "Sorry",
    ),
    st(
        "o356 NO [ALREADYEXISTS] Mailbox \"that\" already exists\r\n",
        Some("o356"),
        Status::No,
        Some("ALREADYEXISTS"),
        Some(""),
        "Mailbox \"that\" already exists",
    ),
    st(
        "p NO [NONEXISTENT] No such mailbox\r\n",
        Some("p"),
        Status::No,
        Some("NONEXISTENT"),
        Some(""),
        "No such mailbox",
    ),
    // A code name the proxy does not know still parses with its data.
    st(
        "q OK [X-UNKNOWN-CODE 1 (a b)] hm\r\n",
        Some("q"),
        Status::Ok,
        Some("X-UNKNOWN-CODE"),
        Some("a:1 (a:a a:b)"),
        "hm",
    ),
];

#[test]
fn every_status_response_parses_with_its_code_and_text() {
    for s in STATUS {
        let r = parse_response(Bytes::from_static(s.raw.as_bytes()))
            .unwrap_or_else(|e| panic!("{:?}: {e}", s.raw));
        let ResponseKind::Status { code, text, .. } = &r.kind else {
            panic!("{:?}: not a status: {:?}", s.raw, r.kind);
        };
        assert_eq!(r.tag(), s.tag.map(str::as_bytes), "{:?}", s.raw);
        assert_eq!(r.status(), Some(s.status), "{:?}", s.raw);
        assert_eq!(r.display_name(), s.status.as_str(), "{:?}", s.raw);
        assert_eq!(
            r.code_name()
                .map(|n| String::from_utf8_lossy(n).into_owned()),
            s.code.map(str::to_string),
            "{:?}",
            s.raw
        );
        let args = code
            .as_ref()
            .and_then(|c| c.args.as_ref())
            .map(|a| shape(a, &r.raw));
        assert_eq!(args.as_deref(), s.code_args, "{:?}", s.raw);
        assert_eq!(text.of(&r.raw), s.text.as_bytes(), "{:?}", s.raw);
    }
}

#[test]
fn continuation_requests() {
    for (raw, text) in [
        (
            &b"+ Ready for literal data\r\n"[..],
            &b"Ready for literal data"[..],
        ),
        (b"+ \r\n", b""),
        (b"+\r\n", b""),
        (
            b"+ YGgGCSqGSIb3EgECAgIAb1kwV6ADAgEFoQMCAQ+iSzBJoAMC\r\n",
            b"YGgGCSqGSIb3EgECAgIAb1kwV6ADAgEFoQMCAQ+iSzBJoAMC",
        ),
        (b"+ idling {5}\r\n", b"idling {5}"),
    ] {
        let r = parse_response(Bytes::copy_from_slice(raw)).expect("parses");
        let ResponseKind::Continuation { text: span } = r.kind else {
            panic!("{raw:?}: not a continuation");
        };
        assert_eq!(span.of(raw), text);
        assert_eq!(r.tag(), None);
    }
}
