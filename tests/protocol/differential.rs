//! Differential test against imap-codec 1.0 (a strict, independent IMAP parser) as an oracle:
//! on a corpus of valid commands and responses (the RFC 3501 and RFC 9051 examples, a recorded
//! Dovecot session, and a list of tricky mailbox spellings), both parsers must find the same tag,
//! the same command or response name, and the same mailbox arguments (as string values, escapes
//! and literals resolved).
//!
//! imap-codec 1.0 with its default features does not parse every extension imapgate knows (it
//! is strict where imapgate is lenient). A message it refuses is only accepted when its command
//! or response is on the list of what imap-codec lacks, with the reason; anything else it
//! refuses fails the test, so the corpus stays valid.

use crate::protocol_support;
use bytes::Bytes;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::response::{Data, Response, Status};
use imap_codec::{CommandCodec, ResponseCodec};
use imapgate::imap::command::parse_command;
use imapgate::imap::framing::Direction;
use imapgate::imap::response::{ResponseKind, parse_response};
use protocol_support::{LineKind, frame_stream, read_examples};

/// What both parsers are asked for.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    tag: Option<String>,
    name: String,
    mailboxes: Vec<Vec<u8>>,
}

fn mbox(m: &Mailbox<'_>) -> Vec<u8> {
    match m {
        Mailbox::Inbox => b"INBOX".to_vec(),
        Mailbox::Other(other) => other.as_ref().to_vec(),
    }
}

fn list_mailbox(m: &ListMailbox<'_>) -> Vec<u8> {
    match m {
        ListMailbox::Token(t) => t.as_ref().to_vec(),
        ListMailbox::String(s) => s.as_ref().to_vec(),
    }
}

/// INBOX is case-insensitive; imap-codec folds it, so fold ours the same way.
fn fold_inbox(m: Vec<u8>) -> Vec<u8> {
    if m.eq_ignore_ascii_case(b"INBOX") {
        b"INBOX".to_vec()
    } else {
        m
    }
}

fn codec_command(raw: &[u8]) -> Option<Seen> {
    let (rest, cmd) = CommandCodec::default().decode(raw).ok()?;
    assert!(rest.is_empty(), "imap-codec left {rest:?} of {raw:?}");
    let uid = matches!(
        cmd.body,
        CommandBody::Fetch { uid: true, .. }
            | CommandBody::Search { uid: true, .. }
            | CommandBody::Store { uid: true, .. }
            | CommandBody::Copy { uid: true, .. }
            | CommandBody::Move { uid: true, .. }
    );
    let name = if uid {
        format!("UID {}", cmd.body.name())
    } else {
        cmd.body.name().to_string()
    };
    let mailboxes = match &cmd.body {
        CommandBody::Select { mailbox, .. }
        | CommandBody::Examine { mailbox, .. }
        | CommandBody::Create { mailbox, .. }
        | CommandBody::Delete { mailbox, .. }
        | CommandBody::Subscribe { mailbox, .. }
        | CommandBody::Unsubscribe { mailbox, .. }
        | CommandBody::Status { mailbox, .. }
        | CommandBody::Append { mailbox, .. }
        | CommandBody::Copy { mailbox, .. }
        | CommandBody::Move { mailbox, .. }
        | CommandBody::GetQuotaRoot { mailbox, .. } => vec![mbox(mailbox)],
        CommandBody::Rename { from, to } => vec![mbox(from), mbox(to)],
        CommandBody::List {
            reference,
            mailbox_wildcard,
        }
        | CommandBody::Lsub {
            reference,
            mailbox_wildcard,
        } => vec![mbox(reference), list_mailbox(mailbox_wildcard)],
        _ => Vec::new(),
    };
    Some(Seen {
        tag: Some(cmd.tag.inner().to_string()),
        name,
        mailboxes,
    })
}

fn our_command(raw: &[u8]) -> Seen {
    let cmd = parse_command(Bytes::copy_from_slice(raw))
        .unwrap_or_else(|e| panic!("imapgate refuses {:?}: {e}", String::from_utf8_lossy(raw)));
    let is_list = matches!(cmd.display_name().as_ref(), "LIST" | "LSUB");
    let mailboxes = cmd
        .mailbox_args()
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let s = m.token.string(&cmd.raw).expect("a string").into_owned();
            // imap-codec folds INBOX in mailbox names, not in LIST patterns.
            if is_list && i == 1 { s } else { fold_inbox(s) }
        })
        .collect();
    Seen {
        tag: Some(String::from_utf8_lossy(cmd.tag()).into_owned()),
        name: cmd.display_name().into_owned(),
        mailboxes,
    }
}

fn codec_response(raw: &[u8]) -> Option<Seen> {
    let (rest, resp) = ResponseCodec::default().decode(raw).ok()?;
    assert!(rest.is_empty(), "imap-codec left {rest:?} of {raw:?}");
    let seen = |tag: Option<String>, name: &str, mailboxes: Vec<Vec<u8>>| Seen {
        tag,
        name: name.to_string(),
        mailboxes,
    };
    Some(match &resp {
        Response::CommandContinuationRequest(_) => seen(None, "+", vec![]),
        Response::Status(status) => {
            let tag = status.tag().map(|t| t.inner().to_string());
            let name = match status {
                Status::Ok { .. } => "OK",
                Status::No { .. } => "NO",
                Status::Bad { .. } => "BAD",
                Status::Bye { .. } => "BYE",
            };
            seen(tag, name, vec![])
        }
        Response::Data(data) => match data {
            Data::Capability(_) => seen(None, "CAPABILITY", vec![]),
            Data::List { mailbox: m, .. } => seen(None, "LIST", vec![mbox(m)]),
            Data::Lsub { mailbox: m, .. } => seen(None, "LSUB", vec![mbox(m)]),
            Data::Status { mailbox: m, .. } => seen(None, "STATUS", vec![mbox(m)]),
            Data::Search(_) => seen(None, "SEARCH", vec![]),
            Data::Flags(_) => seen(None, "FLAGS", vec![]),
            Data::Exists(_) => seen(None, "EXISTS", vec![]),
            Data::Recent(_) => seen(None, "RECENT", vec![]),
            Data::Expunge(_) => seen(None, "EXPUNGE", vec![]),
            Data::Fetch { .. } => seen(None, "FETCH", vec![]),
            Data::Enabled { .. } => seen(None, "ENABLED", vec![]),
            Data::Quota { .. } => seen(None, "QUOTA", vec![]),
            Data::QuotaRoot { mailbox: m, .. } => seen(None, "QUOTAROOT", vec![mbox(m)]),
        },
    })
}

fn our_response(raw: &[u8]) -> Seen {
    let r = parse_response(Bytes::copy_from_slice(raw))
        .unwrap_or_else(|e| panic!("imapgate refuses {:?}: {e}", String::from_utf8_lossy(raw)));
    let mailboxes = r
        .mailboxes()
        .iter()
        .take(1) // imap-codec 1.0 does not read LIST extended data (OLDNAME)
        .map(|m| fold_inbox(m.token.string(&r.raw).expect("a string").into_owned()))
        .collect();
    let name = match &r.kind {
        ResponseKind::Continuation { .. } => "+".to_string(),
        _ => r.display_name().into_owned(),
    };
    Seen {
        tag: r.tag().map(|t| String::from_utf8_lossy(t).into_owned()),
        name,
        mailboxes,
    }
}

/// Commands imap-codec 1.0 (default features) has no parser for, and why.
const CODEC_LACKS_COMMANDS: &[(&str, &str)] = &[
    ("STARTTLS", "behind its `starttls` feature"),
    ("NAMESPACE", "RFC 2342, not implemented"),
    ("ID", "RFC 2971, not implemented"),
    ("UID EXPUNGE", "RFC 4315 UIDPLUS form, not implemented"),
    ("XPIG-LATIN", "a fictitious command of the RFCs"),
];

/// Forms of known commands imap-codec 1.0 refuses: (name, what in the line shows it, why).
const CODEC_LACKS_FORMS: &[(&str, &str, &str)] = &[
    (
        "LIST",
        "(",
        "RFC 5258 LIST-EXTENDED selection options and pattern lists",
    ),
    ("SEARCH", "RETURN", "RFC 4731 ESEARCH result options"),
    ("UID SEARCH", "RETURN", "RFC 4731 ESEARCH result options"),
    ("SEARCH", "$", "RFC 5182 SEARCHRES ($)"),
    ("UID SEARCH", "$", "RFC 5182 SEARCHRES ($)"),
    ("FETCH", "$", "RFC 5182 SEARCHRES ($)"),
    ("COPY", "$", "RFC 5182 SEARCHRES ($)"),
    ("STORE", "$", "RFC 5182 SEARCHRES ($)"),
    ("AUTHENTICATE", "[...]", "an RFC placeholder, not base64"),
];

/// Responses imap-codec 1.0 has no parser for: (what the line starts with, what it contains,
/// why).
const CODEC_LACKS_RESPONSES: &[(&str, &str, &str)] = &[
    (
        "* PREAUTH",
        "",
        "only read as a greeting, by its GreetingCodec",
    ),
    ("* ESEARCH", "", "RFC 4731, not implemented"),
    ("* NAMESPACE", "", "RFC 2342, not implemented"),
    ("* ID", "", "RFC 2971, not implemented"),
    ("* XPIG-LATIN", "", "a fictitious response of the RFCs"),
    ("* LIST", "(\"OLDNAME\"", "RFC 5258 extended data items"),
    ("* LIST", "CHILDINFO", "RFC 5258 extended data items"),
    ("* LIST", "(tablecloth", "RFC 5258 extended data items"),
    (
        "* LIST",
        "\"  \"",
        "two spaces (a typo of RFC 9051 6.3.9.8 example 11)",
    ),
    ("* 2 FETCH ....", "", "an RFC placeholder"),
    ("* 3 FETCH ....", "", "an RFC placeholder"),
    ("* 4 FETCH ....", "", "an RFC placeholder"),
    ("* 4 FETCH (...)", "", "an RFC placeholder"),
    ("* 3 FETCH (...)", "", "an RFC placeholder"),
    (
        "+\r\n",
        "",
        "a continuation request without text (RFC 9051 allows it)",
    ),
    (
        "* 12 FETCH (FLAGS (\\Seen) INTERNALDATE",
        "",
        "the RFCs' sample BODY structure",
    ),
];

/// Extra commands: mailbox spellings that exercise quoting, escapes, literals and INBOX.
const EXTRA_COMMANDS: &[&str] = &[
    "a1 SELECT inbox\r\n",
    "a2 SELECT \"INBOX\"\r\n",
    "a3 SELECT {5}\r\nInBoX\r\n",
    "a4 EXAMINE \"a \\\"quoted\\\" \\\\ name\"\r\n",
    "a5 CREATE \"Entw&APw-rfe\"\r\n",
    "a6 RENAME {3}\r\nold \"new name\"\r\n",
    "a7 DELETE \"\"\r\n",
    "a8 STATUS \"&ZeVnLIqe-/&U,BTFw-\" (MESSAGES UNSEEN)\r\n",
    "a9 LIST \"\" \"%\"\r\n",
    "b1 LIST {4}\r\nref/ {3}\r\na*b\r\n",
    "b2 LIST INBOX. *\r\n",
    "b3 LSUB \"\" %/%\r\n",
    "b4 APPEND \"Sent Items\" (\\Seen \\Draft) \"07-Feb-1994 21:52:25 -0800\" {5}\r\nhello\r\n",
    "b5 APPEND Drafts {0}\r\n\r\n",
    "b6 COPY 1:3,5 \"Trash\"\r\n",
    "b7 UID COPY 1:* {5}\r\nTrash\r\n",
    "b8 MOVE 2 Archive/2024\r\n",
    "b9 UID MOVE 42:69 \"foo bar\"\r\n",
    "c1 SUBSCRIBE \"a]b\"\r\n",
    "c2 UNSUBSCRIBE a]b\r\n",
    "c3 GETQUOTAROOT \"INBOX\"\r\n",
    "c4 GETQUOTA \"\"\r\n",
    "c5 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (DATE FROM)])\r\n",
    "c6 UID STORE 1 +FLAGS.SILENT (\\Deleted)\r\n",
    "c7 UID SEARCH CHARSET UTF-8 SUBJECT {3}\r\nté\r\n",
    "c8 IDLE\r\n",
    "c9 COMPRESS DEFLATE\r\n",
    "d1 ENABLE CONDSTORE\r\n",
    "d2 LOGIN \"user name\" {8}\r\npa\"ss\\wd\r\n",
];

fn commands() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for file in ["rfc3501_examples.txt", "rfc9051_examples.txt"] {
        for example in read_examples(file) {
            let stream = example.stream(true);
            let framed = frame_stream(Direction::Client, Default::default(), &stream, 1 << 20);
            for (msg, kind) in framed.messages.into_iter().zip(framed.kinds) {
                if kind == Some(LineKind::Command) {
                    out.push(msg.bytes);
                }
            }
        }
    }
    let session = std::fs::read(format!(
        "{}/tests/data/session_client.imap",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("capture");
    let framed = frame_stream(Direction::Client, Default::default(), &session, 1 << 20);
    for (msg, kind) in framed.messages.into_iter().zip(framed.kinds) {
        if kind == Some(LineKind::Command) {
            out.push(msg.bytes);
        }
    }
    out.extend(EXTRA_COMMANDS.iter().map(|c| c.as_bytes().to_vec()));
    out
}

fn responses() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for file in ["rfc3501_examples.txt", "rfc9051_examples.txt"] {
        for example in read_examples(file) {
            let stream = example.stream(false);
            let framed = frame_stream(Direction::Server, Default::default(), &stream, 1 << 20);
            out.extend(framed.messages.into_iter().map(|m| m.bytes));
        }
    }
    let session = std::fs::read(format!(
        "{}/tests/data/session_server.imap",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("capture");
    let framed = frame_stream(Direction::Server, Default::default(), &session, 1 << 20);
    out.extend(framed.messages.into_iter().map(|m| m.bytes));
    out
}

#[test]
fn commands_agree_with_imap_codec() {
    let mut compared = 0;
    let mut refused = Vec::new();
    let mut used = std::collections::HashSet::new();
    for raw in commands() {
        let ours = our_command(&raw);
        let text = String::from_utf8_lossy(&raw);
        match codec_command(&raw) {
            Some(theirs) => {
                assert_eq!(ours, theirs, "{text:?}");
                compared += 1;
            }
            None => {
                let by_name = CODEC_LACKS_COMMANDS
                    .iter()
                    .position(|(n, _)| *n == ours.name);
                let by_form = CODEC_LACKS_FORMS
                    .iter()
                    .position(|(n, mark, _)| *n == ours.name && text.contains(mark));
                assert!(
                    by_name.is_some() || by_form.is_some(),
                    "imap-codec refuses {text:?}, unexplained"
                );
                used.extend(by_name.map(|i| CODEC_LACKS_COMMANDS[i].0.to_string()));
                used.extend(
                    by_form
                        .map(|i| format!("{} {}", CODEC_LACKS_FORMS[i].0, CODEC_LACKS_FORMS[i].1)),
                );
                refused.push(ours.name);
            }
        }
    }
    // Most of the corpus is compared, not excused.
    assert!(
        compared >= 200,
        "only {compared} compared; refused: {refused:?}"
    );
    assert!(refused.len() < compared / 2, "refused: {refused:?}");
    // Every excuse is needed: the lists say exactly what imap-codec lacks on this corpus.
    for (name, _) in CODEC_LACKS_COMMANDS {
        assert!(used.contains(*name), "unused excuse {name}");
    }
    for (name, mark, _) in CODEC_LACKS_FORMS {
        assert!(
            used.contains(&format!("{name} {mark}")),
            "unused excuse {name} {mark}"
        );
    }
}

#[test]
fn responses_agree_with_imap_codec() {
    let mut compared = 0;
    let mut refused = 0;
    let mut used = std::collections::HashSet::new();
    for raw in responses() {
        let ours = our_response(&raw);
        let text = String::from_utf8_lossy(&raw);
        match codec_response(&raw) {
            Some(theirs) => {
                assert_eq!(ours, theirs, "{text:?}");
                compared += 1;
            }
            None => {
                let excuse = CODEC_LACKS_RESPONSES
                    .iter()
                    .position(|(start, mark, _)| text.starts_with(start) && text.contains(mark));
                assert!(excuse.is_some(), "imap-codec refuses {text:?}, unexplained");
                used.extend(excuse);
                refused += 1;
            }
        }
    }
    assert!(
        compared >= 500,
        "only {compared} compared, {refused} refused"
    );
    assert!(refused < compared / 4, "{refused} refused");
    for (i, (start, mark, _)) in CODEC_LACKS_RESPONSES.iter().enumerate() {
        assert!(used.contains(&i), "unused excuse {start:?} {mark:?}");
    }
}
