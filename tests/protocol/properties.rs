//! Property tests of the protocol core.
//!
//! (a) Framing does not depend on how the input is split: a stream of valid messages (lines with
//!     synchronizing, non-synchronizing and binary literals, small and above the inline threshold,
//!     pipelined) fed in random pieces, or one octet at a time, gives the same logical messages,
//!     with the same boundaries, as fed at once.
//! (b) Round trip: parse(encode(x)) == x for generated commands and responses, and the encoded
//!     message frames as exactly one message.
//! (c) The framer never panics and never yields more than it was given, whatever the input.
//! (d) Every command the RFC 3501 / RFC 9051 ABNF accepts is accepted: generated instances of
//!     each client-side rule the parser uses (tag, atom over all ATOM-CHARs, astring, quoted
//!     strings, literals and literal8, list-mailbox, sequence-set, search keys, fetch items,
//!     flags, date-time), alone in a command and in whole commands, frame as exactly their bytes
//!     (fed whole, one octet at a time and in random pieces, alone and pipelined), and parse
//!     with the tag, name, argument tokens and mailbox arguments generated. The generators are
//!     in `protocol_support::grammar`, for other tests to use.
//! (e) The relay is byte-identical: every generated command, sent by a client that waits for
//!     `+` where it must, through a conversation (logged in, a mailbox selected, no policies)
//!     to a server that answers `+` wherever imapgate waits for one, reaches the server as
//!     exactly its bytes, its literals announced synchronizing (`{n+}` as `{n}`, see
//!     `imap::sync_literals`). Only the commands not valid in that state (LOGIN, AUTHENTICATE,
//!     STARTTLS) and COMPRESS are answered by imapgate instead.

use crate::protocol_support;
use bytes::Bytes;
use imapgate::imap::command::{CommandKind, MailboxRole, parse_command};
use imapgate::imap::encode::{self, EncodeOptions, LiteralForm, ResponseValue, Value};
use imapgate::imap::framing::{Direction, Frame, Framer, Limits};
use imapgate::imap::response::{ResponseKind, Status, parse_response};
use imapgate::imap::syntax::Token;
use proptest::collection::vec;
use proptest::prelude::*;
use protocol_support::grammar::{self, Arg, GenCommand, carrier};
use protocol_support::{Framed, frame_pieces};

// ---------------------------------------------------------------------------------------------
// (a) framing is independent of how the input is split
// ---------------------------------------------------------------------------------------------

/// Small limits, so that generated literals are often above the inline threshold and long lines
/// are near the limit, without generating megabytes.
fn small_limits() -> Limits {
    Limits {
        max_line: 200,
        max_id_line: 0,
        max_literal: 100_000,
        inline_literal: 48,
        nonsync_max: None,
    }
}

#[derive(Clone, Debug)]
struct LiteralPart {
    data: Vec<u8>,
    sync: bool,
    binary: bool,
}

#[derive(Clone, Debug)]
struct GenMessage {
    /// Line text before each literal (and after the last one), without CRLF.
    texts: Vec<String>,
    literals: Vec<LiteralPart>,
}

impl GenMessage {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, text) in self.texts.iter().enumerate() {
            out.extend_from_slice(text.as_bytes());
            if let Some(lit) = self.literals.get(i) {
                let tilde = if lit.binary { "~" } else { "" };
                let plus = if lit.sync { "" } else { "+" };
                out.extend_from_slice(
                    format!(" {tilde}{{{}{plus}}}\r\n", lit.data.len()).as_bytes(),
                );
                out.extend_from_slice(&lit.data);
            } else {
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }
}

/// Literal octets: anything, including CRLF, NUL and text shaped like commands and literals.
fn literal_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..40),
        2 => vec(any::<u8>(), 40..300),
        1 => Just(b"\r\na2 LOGOUT {5}\r\n".to_vec()),
        1 => Just(b"}\r\n".to_vec()),
    ]
}

fn literal_part() -> impl Strategy<Value = LiteralPart> {
    (literal_data(), any::<bool>(), any::<bool>()).prop_map(|(data, sync, binary)| LiteralPart {
        data,
        sync,
        binary,
    })
}

/// Text inside a line: printable ASCII without "{" so that it never announces a literal itself.
fn line_text() -> impl Strategy<Value = String> {
    "[ -z|~]{0,30}"
}

fn gen_message(direction: Direction) -> impl Strategy<Value = GenMessage> {
    let head = match direction {
        Direction::Client => "[a-z][a-z0-9]{0,5} (APPEND|FETCH|X-CMD|LOGIN|SEARCH)",
        Direction::Server => "\\* (LIST|STATUS|[0-9]{1,4} FETCH|XDATA)",
    };
    (head, line_text(), vec((literal_part(), line_text()), 0..4)).prop_map(
        |(head, first, parts)| {
            let mut texts = vec![format!("{head} {first}").trim_end().to_string()];
            let mut literals = Vec::new();
            for (lit, text) in parts {
                literals.push(lit);
                texts.push(text);
            }
            // A text after a literal that is empty would join the next line's announcement
            // to the literal; keep the shape "<literal> <text>" or "<literal>" CRLF.
            GenMessage { texts, literals }
        },
    )
}

fn stream(direction: Direction) -> impl Strategy<Value = (Vec<GenMessage>, Vec<usize>)> {
    (vec(gen_message(direction), 1..6), vec(1usize..70, 1..20))
}

fn logical(framed: &Framed) -> Vec<(usize, Vec<u8>)> {
    framed
        .messages
        .iter()
        .map(|m| (m.offset, m.bytes.clone()))
        .collect()
}

fn check_split_independence(direction: Direction, messages: &[GenMessage], pieces: &[usize]) {
    let mut input = Vec::new();
    let mut want = Vec::new();
    for m in messages {
        let bytes = m.bytes();
        want.push((input.len(), bytes.clone()));
        input.extend_from_slice(&bytes);
    }
    let limits = small_limits();
    let at_once = frame_pieces(direction, limits, &input, &[input.len()]);
    let random = frame_pieces(direction, limits, &input, pieces);
    let bytewise = frame_pieces(direction, limits, &input, &[1]);
    assert_eq!(at_once.error, None);
    assert_eq!(at_once.incomplete, None);
    // The generated messages are exactly the framed ones, whatever the split.
    assert_eq!(logical(&at_once), want);
    assert_eq!(logical(&random), want);
    assert_eq!(logical(&bytewise), want);
    assert_eq!(random.error, None);
    assert_eq!(bytewise.error, None);
}

/// Frame-level invariants: the frames are the input, in order; chunks only carry literal octets;
/// nothing held is larger than the line limit plus the inline threshold.
fn check_frames(direction: Direction, input: &[u8], pieces: &[usize]) {
    let limits = small_limits();
    let mut framer = Framer::new(direction, limits);
    let mut out = Vec::new();
    let mut fed = 0;
    let mut pieces = pieces.iter().copied().cycle();
    let mut streamed_remaining: u64 = 0;
    loop {
        match framer.next_frame().expect("valid input") {
            Some(frame) => {
                match &frame {
                    Frame::Text { bytes, literal, .. } => {
                        assert_eq!(streamed_remaining, 0);
                        assert!(bytes.len() <= limits.max_line + limits.inline_literal + 2);
                        streamed_remaining = literal.map_or(0, |l| u64::from(l.len));
                    }
                    Frame::Chunk { bytes, last } => {
                        streamed_remaining -= bytes.len() as u64;
                        assert_eq!(*last, streamed_remaining == 0);
                    }
                }
                out.extend_from_slice(frame.bytes());
            }
            None if fed < input.len() => {
                let end = input.len().min(fed + pieces.next().unwrap_or(1));
                framer.push(&input[fed..end]);
                fed = end;
            }
            None => break,
        }
    }
    assert_eq!(out, input);
    assert!(framer.is_between_messages());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn client_framing_is_independent_of_the_split((messages, pieces) in stream(Direction::Client)) {
        check_split_independence(Direction::Client, &messages, &pieces);
        let input: Vec<u8> = messages.iter().flat_map(GenMessage::bytes).collect();
        check_frames(Direction::Client, &input, &pieces);
    }

    #[test]
    fn server_framing_is_independent_of_the_split((messages, pieces) in stream(Direction::Server)) {
        check_split_independence(Direction::Server, &messages, &pieces);
        let input: Vec<u8> = messages.iter().flat_map(GenMessage::bytes).collect();
        check_frames(Direction::Server, &input, &pieces);
    }
}

// ---------------------------------------------------------------------------------------------
// (b) round trip
// ---------------------------------------------------------------------------------------------

/// An atom the encoder accepts and the parser reads back as one atom: ATOM-CHARs (and the
/// lenient extras) without brackets, never NIL.
fn atom() -> impl Strategy<Value = Vec<u8>> {
    "[!#-'*-Z\\\\^-z|}~]{1,12}"
        .prop_filter("NIL is not an atom", |s| !s.eq_ignore_ascii_case("NIL"))
        .prop_map(String::into_bytes)
}

/// String contents: any octet but NUL (CR, LF, quotes, backslashes and 8-bit included).
fn string_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(1u8..=255, 0..24),
        1 => "[ -~]{0,40}".prop_map(String::into_bytes),
        1 => vec(1u8..=255, 1000..1100),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        3 => atom().prop_map(Value::Atom),
        3 => string_bytes().prop_map(Value::String),
        1 => Just(Value::Nil),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| vec(inner, 0..6).prop_map(Value::List))
}

/// The parsed token tree read back as values: quoted strings and literals are both strings.
fn to_values(tokens: &[Token], raw: &[u8]) -> Vec<Value> {
    tokens
        .iter()
        .map(|t| match t {
            Token::Atom(span) => Value::Atom(span.of(raw).to_vec()),
            Token::Quoted { .. } | Token::Literal { .. } => {
                Value::String(t.string(raw).expect("a complete string").into_owned())
            }
            Token::List { items, .. } => Value::List(to_values(items, raw)),
            Token::Nil(_) => Value::Nil,
        })
        .collect()
}

fn count_literals(tokens: &[Token]) -> usize {
    tokens
        .iter()
        .map(|t| match t {
            Token::Literal { .. } => 1,
            Token::List { items, .. } => count_literals(items),
            _ => 0,
        })
        .sum()
}

/// A command's tag: ASTRING-CHAR except "+", and except "]", which Dovecot refuses in a tag
/// (imapgate too).
fn tag() -> impl Strategy<Value = Vec<u8>> {
    "[!#$&',-\\[^-z|}~]{1,8}".prop_map(String::into_bytes)
}

/// A response's tag: ASTRING-CHAR except "+"; "]" is allowed.
fn response_tag() -> impl Strategy<Value = Vec<u8>> {
    "[!#$&',-\\[\\]-z|}~]{1,8}".prop_map(String::into_bytes)
}

/// In a command NIL reads back as the atom it is in an astring position.
fn nil_as_atom(values: Vec<Value>) -> Vec<Value> {
    values
        .into_iter()
        .map(|v| match v {
            Value::Nil => Value::Atom(b"NIL".to_vec()),
            Value::List(items) => Value::List(nil_as_atom(items)),
            other => other,
        })
        .collect()
}

fn command_name() -> impl Strategy<Value = Vec<u8>> {
    "[A-Za-z][A-Za-z0-9.-]{0,11}"
        .prop_filter("UID takes a command after it", |s| {
            !s.eq_ignore_ascii_case("UID")
        })
        .prop_map(String::into_bytes)
}

fn literal_form() -> impl Strategy<Value = LiteralForm> {
    prop_oneof![
        Just(LiteralForm::Sync),
        Just(LiteralForm::NonSync),
        Just(LiteralForm::Server)
    ]
}

/// The message frames as exactly one logical message, its bytes unchanged.
fn frames_as_one(direction: Direction, bytes: &[u8]) {
    let limits = Limits {
        max_line: 64 * 1024,
        ..Limits::default()
    };
    let framed = frame_pieces(direction, limits, bytes, &[bytes.len()]);
    assert_eq!(framed.error, None, "{:?}", String::from_utf8_lossy(bytes));
    assert_eq!(
        framed.incomplete,
        None,
        "{:?}",
        String::from_utf8_lossy(bytes)
    );
    assert_eq!(
        framed.messages.len(),
        1,
        "{:?}",
        String::from_utf8_lossy(bytes)
    );
    assert_eq!(framed.messages[0].bytes, bytes);
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Ok),
        Just(Status::No),
        Just(Status::Bad),
        Just(Status::Bye),
        Just(Status::Preauth)
    ]
}

/// Free text: TEXT-CHARs (and 8-bit), not starting with "[".
fn text() -> impl Strategy<Value = Vec<u8>> {
    vec(prop_oneof![0x20u8..=0x7e, 0x80u8..=0xff], 0..30)
        .prop_filter("a text starting with [ reads as a code", |t| {
            t.first() != Some(&b'[')
        })
}

/// Values valid inside a response code: no literal can be used there (resp-text-code is one
/// line of TEXT-CHARs), so strings are quotable ones.
fn code_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        atom()
            .prop_filter("] ends a code", |a| !a.contains(&b']'))
            .prop_map(Value::Atom),
        "[ -~]{0,20}".prop_map(|s| Value::String(s.into_bytes())),
        Just(Value::Nil),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| vec(inner, 0..4).prop_map(Value::List))
}

fn response_value() -> impl Strategy<Value = ResponseValue> {
    let status_response = (
        prop::option::of(response_tag()),
        status(),
        prop::option::of((
            "[A-Z][A-Z0-9-]{0,12}".prop_map(String::into_bytes),
            vec(code_value(), 0..4),
        )),
        text(),
    )
        .prop_filter("PREAUTH and BYE are never tagged", |(tag, status, _, _)| {
            tag.is_none() || matches!(status, Status::Ok | Status::No | Status::Bad)
        })
        .prop_map(|(tag, status, code, text)| ResponseValue::Status {
            tag,
            status,
            code,
            text,
        });
    let data = (
        prop::option::of(0u64..=u64::from(u32::MAX)),
        "[A-Z][A-Z0-9.-]{0,12}",
        vec(value(), 0..5),
    )
        .prop_filter("a status word is not a data name", |(_, name, _)| {
            !["OK", "NO", "BAD", "BYE", "PREAUTH"].contains(&name.as_str())
        })
        .prop_map(|(number, name, args)| ResponseValue::Data {
            number,
            name: name.into_bytes(),
            args,
        });
    let continuation = text().prop_map(|text| ResponseValue::Continuation { text });
    prop_oneof![3 => status_response, 3 => data, 1 => continuation]
}

/// The parsed response read back as a value.
fn response_to_value(raw: &Bytes) -> ResponseValue {
    let r = parse_response(raw.clone()).expect("parses");
    match &r.kind {
        ResponseKind::Continuation { text } => ResponseValue::Continuation {
            text: text.of(raw).to_vec(),
        },
        ResponseKind::Status {
            tag,
            status,
            code,
            text,
        } => ResponseValue::Status {
            tag: tag.map(|t| t.of(raw).to_vec()),
            status: *status,
            code: code.as_ref().map(|c| {
                let args = c.args.as_deref().expect("tokenized code data");
                (c.name.of(raw).to_vec(), to_values(args, raw))
            }),
            text: text.of(raw).to_vec(),
        },
        ResponseKind::Data {
            number, name, args, ..
        } => ResponseValue::Data {
            number: *number,
            name: name.of(raw).to_vec(),
            args: to_values(args, raw),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn commands_round_trip(
        tag in tag(),
        name in command_name(),
        args in vec(value(), 0..6),
        literal in literal_form(),
        utf8 in any::<bool>(),
    ) {
        let opts = EncodeOptions { literal, utf8 };
        let encoded = encode::command(&tag, &name, &args, opts).expect("encodes");
        let raw = Bytes::from(encoded.bytes.clone());
        let cmd = parse_command(raw.clone()).expect("parses");
        prop_assert_eq!(cmd.tag(), &tag[..]);
        prop_assert_eq!(cmd.name_span.of(&raw), &name[..]);
        prop_assert_eq!(to_values(&cmd.args, &raw), nil_as_atom(args));
        // Sent upstream, it is cut after each literal's announcement, whatever its form.
        let literals = count_literals(&cmd.args);
        let cut = imapgate::imap::sync_literals::synchronizing_segments(raw.clone());
        prop_assert_eq!(cut.rest.len(), literals);
        frames_as_one(Direction::Client, &encoded.bytes);
    }

    #[test]
    fn responses_round_trip(value in response_value()) {
        let encoded = encode::response(&value).expect("encodes");
        let raw = Bytes::from(encoded.bytes.clone());
        prop_assert_eq!(response_to_value(&raw), value);
        frames_as_one(Direction::Server, &encoded.bytes);
    }
}

#[test]
fn a_string_that_needs_a_literal_is_refused_in_a_response_code() {
    // A literal cannot stand in a response code: the line would be framed as ending at the
    // announcement's CRLF, and the literal's octets read as the next response.
    for s in [&b"a\r\nb"[..], "Entwürfe".as_bytes(), &[b'x'; 2000][..]] {
        let value = ResponseValue::Status {
            tag: Some(b"a1".to_vec()),
            status: Status::No,
            code: Some((b"X".to_vec(), vec![Value::String(s.to_vec())])),
            text: b"t".to_vec(),
        };
        assert!(encode::response(&value).is_err(), "{s:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// (c) the framer on arbitrary input
// ---------------------------------------------------------------------------------------------

/// Octets that make the framer's decisions interesting, mixed with anything.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let special = prop_oneof![
        Just(b'{'),
        Just(b'}'),
        Just(b'+'),
        Just(b'~'),
        Just(b'\r'),
        Just(b'\n'),
        Just(b' '),
        Just(b'*'),
        Just(0u8),
        b'0'..=b'9',
        any::<u8>(),
    ];
    let chunk = prop_oneof![
        4 => vec(special, 0..20),
        1 => Just(b"a1 APPEND x {5}\r\n".to_vec()),
        1 => Just(b"* OK {3}\r\n".to_vec()),
        1 => Just(b"{99999999999}\r\n".to_vec()),
        1 => Just(b"~{4+}\r\n".to_vec()),
        1 => vec(b'x'..=b'z', 100..400),
    ];
    vec(chunk, 0..30).prop_map(|chunks| chunks.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn the_framer_never_panics_nor_yields_more_than_it_got(
        input in hostile_bytes(),
        pieces in vec(1usize..64, 1..10),
        server in any::<bool>(),
        line_only in any::<bool>(),
    ) {
        let direction = if server { Direction::Server } else { Direction::Client };
        let mut framer = Framer::new(direction, small_limits());
        framer.set_line_only(line_only);
        let mut pushed = 0usize;
        let mut yielded = 0usize;
        let mut pieces = pieces.iter().copied().cycle();
        let mut steps = 0;
        loop {
            steps += 1;
            prop_assert!(steps < 100_000, "no progress");
            match framer.next_frame() {
                Ok(Some(frame)) => {
                    let text = matches!(frame, Frame::Text { .. });
                    prop_assert!(text || !frame.bytes().is_empty(), "an empty chunk");
                    yielded += frame.bytes().len();
                }
                Ok(None) if pushed < input.len() => {
                    let end = input.len().min(pushed + pieces.next().unwrap_or(1));
                    framer.push(&input[pushed..end]);
                    pushed = end;
                }
                Ok(None) => break,
                Err(e) => {
                    // Errors point inside what was given.
                    prop_assert!(e.offset <= pushed as u64);
                }
            }
            prop_assert!(yielded <= pushed);
            // Everything given is either yielded, skipped after an error, or still buffered.
            prop_assert_eq!(framer.offset() as usize + framer.buffered(), pushed);
        }
        // Memory stays bounded: a message held whole is at most the line limit plus the inline
        // threshold up to the end of its last inline literal, plus the line that follows it.
        let limits = small_limits();
        prop_assert!(framer.buffered() <= 2 * (limits.max_line + 2) + limits.inline_literal);
    }
}

// ---------------------------------------------------------------------------------------------
// (d) every valid command is framed as sent and read as generated
// ---------------------------------------------------------------------------------------------

/// The limits of an authenticated session: generated commands fit, and synchronizing literals
/// are streamed (the framer yields the head at once, as for a real client).
fn post_login() -> Limits {
    Limits {
        max_line: 64 * 1024,
        ..Limits::default()
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The commands, pipelined: the framer yields exactly their bytes, split exactly between them,
/// whether fed whole, one octet at a time or in `pieces`; each parses as generated, and so does
/// each head a synchronizing literal cuts it at (what the session judges before its `+`).
fn accepted(commands: &[GenCommand], pieces: &[usize]) -> Result<(), TestCaseError> {
    let mut stream = Vec::new();
    let mut want = Vec::new();
    for c in commands {
        let bytes = c.bytes();
        want.push((stream.len(), bytes.clone()));
        stream.extend_from_slice(&bytes);
    }
    for split in [&[stream.len()][..], &[1], pieces] {
        let framed = frame_pieces(Direction::Client, post_login(), &stream, split);
        prop_assert_eq!(&framed.error, &None, "{:?}", lossy(&stream));
        prop_assert_eq!(&framed.incomplete, &None, "{:?}", lossy(&stream));
        prop_assert_eq!(logical(&framed), want.clone());
    }
    for (c, (_, bytes)) in commands.iter().zip(&want) {
        let cmd = parse_command(Bytes::from(bytes.clone()))
            .map_err(|e| TestCaseError::fail(format!("{:?} refused: {e}", lossy(bytes))))?;
        grammar::check_command(c, &cmd)
            .map_err(|e| TestCaseError::fail(format!("{:?}: {e}", lossy(bytes))))?;
        let segments = c.segments();
        let mut head = Vec::new();
        for segment in &segments[..segments.len() - 1] {
            head.extend_from_slice(segment);
            let cmd = parse_command(Bytes::from(head.clone()))
                .map_err(|e| TestCaseError::fail(format!("head {:?}: {e}", lossy(&head))))?;
            prop_assert!(cmd.is_cut(), "{:?}", lossy(&head));
        }
    }
    Ok(())
}

fn pieces() -> impl Strategy<Value = Vec<usize>> {
    vec(1usize..64, 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_tag_is_accepted(tag in grammar::tag(), pieces in pieces()) {
        let c = GenCommand { tag, ..carrier(CommandKind::Noop, "NOOP", vec![]) };
        accepted(&[c], &pieces)?;
    }

    #[test]
    fn every_atom_is_accepted(atoms in vec(grammar::atom(), 1..4), pieces in pieces()) {
        let args = atoms.into_iter().map(Arg::Atom).collect();
        accepted(&[carrier(CommandKind::Enable, "ENABLE", args)], &pieces)?;
    }

    #[test]
    fn every_astring_is_a_mailbox(
        (mailbox, value) in grammar::mailbox(),
        pieces in pieces(),
    ) {
        let c = GenCommand {
            mailboxes: vec![(MailboxRole::Mailbox, value)],
            ..carrier(CommandKind::Select, "SELECT", vec![mailbox])
        };
        accepted(&[c], &pieces)?;
    }

    #[test]
    fn every_string_and_literal_is_accepted(
        strings in vec(grammar::string(), 2..3),
        pieces in pieces(),
    ) {
        let args = strings.into_iter().map(|(s, _)| s).collect();
        accepted(&[carrier(CommandKind::Login, "LOGIN", args)], &pieces)?;
    }

    #[test]
    fn every_literal8_is_accepted_in_append(
        data in grammar::literal8(),
        flags in grammar::flag_list(),
        date in grammar::date_time(),
        pieces in pieces(),
    ) {
        let c = GenCommand {
            mailboxes: vec![(MailboxRole::Mailbox, b"INBOX".to_vec())],
            ..carrier(CommandKind::Append, "APPEND", vec![Arg::Atom(b"INBOX".to_vec()), flags, date, data])
        };
        accepted(&[c], &pieces)?;
    }

    #[test]
    fn every_list_mailbox_is_a_pattern(
        (reference, rv) in grammar::mailbox(),
        (pattern, pv) in grammar::list_mailbox(),
        pieces in pieces(),
    ) {
        let c = GenCommand {
            mailboxes: vec![(MailboxRole::Reference, rv), (MailboxRole::Pattern, pv)],
            ..carrier(CommandKind::List, "LIST", vec![reference, pattern])
        };
        accepted(&[c], &pieces)?;
    }

    #[test]
    fn every_sequence_set_and_flag_is_accepted(
        set in grammar::sequence_set(),
        flags in grammar::flag_list(),
        pieces in pieces(),
    ) {
        let args = vec![Arg::Atom(set), Arg::Atom(b"+FLAGS.SILENT".to_vec()), flags];
        accepted(&[carrier(CommandKind::Store, "STORE", args)], &pieces)?;
    }

    #[test]
    fn every_search_key_is_accepted(keys in vec(grammar::search_key(), 1..4), pieces in pieces()) {
        let args = keys.concat();
        accepted(&[carrier(CommandKind::Search, "SEARCH", args)], &pieces)?;
    }

    #[test]
    fn every_fetch_item_is_accepted(items in vec(grammar::fetch_att(), 1..5), pieces in pieces()) {
        let args = vec![Arg::Atom(b"1:*".to_vec()), Arg::List(items)];
        accepted(&[carrier(CommandKind::Fetch, "FETCH", args)], &pieces)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn every_command_is_accepted(c in grammar::command(), pieces in pieces()) {
        accepted(&[c], &pieces)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn pipelined_commands_are_accepted(
        commands in vec(grammar::command(), 2..8),
        pieces in pieces(),
    ) {
        accepted(&commands, &pieces)?;
    }
}

// ---------------------------------------------------------------------------------------------
// (e) the relay is byte-identical
// ---------------------------------------------------------------------------------------------

use imapgate::policy::{ConnInfo, Policies};
use imapgate::session::{Conversation, Settings};

/// Logged in, INBOX selected, the server offering LITERAL+ and BINARY.
fn selected_conversation() -> Conversation {
    let caps = "IMAP4rev1 LITERAL+ BINARY ID ENABLE IDLE";
    let greeting = format!("* OK [CAPABILITY {caps}] ready\r\n");
    let mut conv = Conversation::new(
        Settings::default(),
        true,
        Bytes::from(greeting),
        Policies::none(),
        ConnInfo::default(),
    );
    for (command, answer) in [
        (
            "l1 LOGIN u p\r\n".to_string(),
            format!("l1 OK [CAPABILITY {caps}] in\r\n"),
        ),
        (
            "l2 SELECT INBOX\r\n".to_string(),
            "l2 OK [READ-WRITE] done\r\n".to_string(),
        ),
    ] {
        conv.client_buffer().extend_from_slice(command.as_bytes());
        conv.client_input();
        conv.upstream_buffer().extend_from_slice(answer.as_bytes());
        conv.upstream_input();
    }
    conv.to_upstream.drain_to_vec();
    conv.to_client.drain_to_vec();
    conv
}

/// The arguments with every literal synchronizing: what imapgate sends upstream.
/// Whether any literal in `args` is synchronizing (`{n}`, the client waits for `+`).
fn has_sync_literal(args: &[Arg]) -> bool {
    args.iter().any(|a| match a {
        Arg::Literal { sync, .. } => *sync,
        Arg::List(items) => has_sync_literal(items),
        Arg::Section { headers, .. } => headers.as_deref().is_some_and(has_sync_literal),
        _ => false,
    })
}

fn synchronizing(args: &[Arg]) -> Vec<Arg> {
    args.iter()
        .map(|a| match a {
            Arg::Literal { data, binary, .. } => Arg::Literal {
                data: data.clone(),
                sync: true,
                binary: *binary,
            },
            Arg::List(items) => Arg::List(synchronizing(items)),
            Arg::Section {
                name,
                spec,
                headers,
                partial,
            } => Arg::Section {
                name: name.clone(),
                spec: spec.clone(),
                headers: headers.as_deref().map(synchronizing),
                partial: *partial,
            },
            other => other.clone(),
        })
        .collect()
}

enum Relayed {
    /// What the server received.
    Sent(Vec<u8>),
    /// imapgate's own answer.
    Answered(String),
}

/// Plays the client (waiting for `+` where it must) and the server (answering `+` whenever
/// imapgate waits for one) around one command.
fn relay(command: &GenCommand) -> Result<Relayed, String> {
    let mut conv = selected_conversation();
    let expected_len = GenCommand {
        args: synchronizing(&command.args),
        ..command.clone()
    }
    .bytes()
    .len();
    let mut pieces = command.segments().into_iter();
    let mut server = Vec::new();
    let feed = |conv: &mut Conversation, piece: Option<Vec<u8>>| {
        if let Some(piece) = piece {
            conv.client_buffer().extend_from_slice(&piece);
            conv.client_input();
        }
    };
    feed(&mut conv, pieces.next());
    for _ in 0..10_000 {
        server.extend(conv.to_upstream.drain_to_vec());
        let client = String::from_utf8_lossy(&conv.to_client.drain_to_vec()).into_owned();
        let tag = String::from_utf8_lossy(&command.tag).into_owned();
        if client.starts_with(&format!("{tag} ")) {
            return Ok(Relayed::Answered(client));
        }
        if !client.is_empty() && !client.starts_with('+') {
            return Err(format!("imapgate said {client:?}"));
        }
        if server.len() >= expected_len {
            return Ok(Relayed::Sent(server));
        }
        if client.starts_with('+') {
            // The relayed "+" for the client's synchronizing literal: it sends the rest.
            feed(&mut conv, pieces.next());
        } else if !conv.wants_client_input() {
            // imapgate waits for the server: it says go on.
            conv.upstream_buffer().extend_from_slice(b"+ OK\r\n");
            conv.upstream_input();
        } else {
            return Err(format!(
                "stuck: the server has {:?} of {expected_len} octets",
                String::from_utf8_lossy(&server)
            ));
        }
    }
    Err("no end".into())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn every_command_is_relayed_byte_identical(c in grammar::command()) {
        let expected = GenCommand { args: synchronizing(&c.args), ..c.clone() }.bytes();
        match relay(&c).map_err(TestCaseError::fail)? {
            Relayed::Sent(server) => {
                prop_assert_eq!(
                    String::from_utf8_lossy(&server),
                    String::from_utf8_lossy(&expected)
                );
            }
            Relayed::Answered(answer) => {
                // An ID's field name in a synchronizing literal would reach the server before
                // imapgate could judge it (proxy-only fields): refused by design.
                let own = matches!(
                    c.kind,
                    CommandKind::Login
                        | CommandKind::Authenticate
                        | CommandKind::Starttls
                        | CommandKind::Compress
                ) || (c.kind == CommandKind::Id && has_sync_literal(&c.args));
                prop_assert!(own, "imapgate answered {:?}: {}", c.kind, answer);
            }
        }
    }
}
