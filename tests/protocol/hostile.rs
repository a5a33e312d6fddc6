//! Hostile inputs, one test each, with the exact error they must produce. After each error the
//! framer must be usable again (the next, well-formed message frames), so that the caller can
//! answer the broken command and go on, or close the connection, as it decides.

use bytes::Bytes;
use imapgate::dissect;
use imapgate::imap::command::parse_command;
use imapgate::imap::framing::{Direction, Frame, FrameError, FrameErrorKind, Framer, Limits};
use imapgate::imap::mutf7::{self, Mutf7Error};
use imapgate::imap::response::parse_response;
use imapgate::imap::syntax::{DEFAULT_MAX_DEPTH, SyntaxErrorKind};

fn frames(framer: &mut Framer, input: &[u8]) -> (Vec<Frame>, Option<FrameError>) {
    framer.push(input);
    let mut out = Vec::new();
    loop {
        match framer.next_frame() {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn texts(frames: &[Frame]) -> Vec<&[u8]> {
    frames.iter().map(|f| &f.bytes()[..]).collect()
}

#[test]
fn a_line_over_the_limit() {
    let limits = Limits::default();
    assert_eq!(limits.max_line, 8192);
    let mut framer = Framer::new(Direction::Client, limits);
    // Complete: 8193 octets before CRLF.
    let mut line = b"a1 LOGIN ".to_vec();
    line.resize(8193, b'x');
    line.extend_from_slice(b"\r\na2 NOOP\r\n");
    let (got, err) = frames(&mut framer, &line);
    assert!(got.is_empty());
    let err = err.expect("an error");
    assert_eq!(err.kind, FrameErrorKind::LineTooLong { limit: 8192 });
    assert_eq!((err.offset, err.tag.as_deref()), (0, Some(&b"a1"[..])));
    let (got, err) = frames(&mut framer, b"");
    assert_eq!((texts(&got), err), (vec![&b"a2 NOOP\r\n"[..]], None));

    // Exactly at the limit is fine.
    let mut framer = Framer::new(Direction::Client, limits);
    let mut line = b"a1 LOGIN ".to_vec();
    line.resize(8192, b'x');
    line.extend_from_slice(b"\r\n");
    let (got, err) = frames(&mut framer, &line);
    assert_eq!((got.len(), err), (1, None));

    // Incomplete and growing without end: refused before it is all buffered, then skipped.
    let mut framer = Framer::new(Direction::Client, limits);
    let (_, err) = frames(&mut framer, b"a7 SEARCH TEXT ");
    assert_eq!(err, None);
    let mut err = None;
    for _ in 0..100 {
        let (_, e) = frames(&mut framer, &[b'y'; 1000]);
        if e.is_some() {
            err = e;
            break;
        }
    }
    let err = err.expect("refused while still incomplete");
    assert_eq!(err.kind, FrameErrorKind::LineTooLong { limit: 8192 });
    assert_eq!(err.tag.as_deref(), Some(&b"a7"[..]));
    assert!(framer.buffered() <= 8192 + 1000);
    let (got, err) = frames(&mut framer, b"yyy\r\na8 NOOP\r\n");
    assert_eq!((texts(&got), err), (vec![&b"a8 NOOP\r\n"[..]], None));
}

#[test]
fn literal_length_of_2_to_the_32() {
    let mut framer = Framer::new(Direction::Client, Limits::default());
    let (got, err) = frames(&mut framer, b"a1 NOOP\r\na2 APPEND INBOX {4294967296}\r\n");
    assert_eq!(texts(&got), vec![&b"a1 NOOP\r\n"[..]]);
    let err = err.expect("an error");
    assert_eq!(err.kind, FrameErrorKind::LiteralOverflow { sync: true });
    assert_eq!((err.offset, err.tag.as_deref()), (9, Some(&b"a2"[..])));
    assert!(!err.mid_message);
    // Non-synchronizing: the same, and the caller learns no octets follow a "+" it never sent.
    let (_, err) = frames(&mut framer, b"a3 APPEND INBOX {4294967296+}\r\n");
    assert_eq!(
        err.map(|e| e.kind),
        Some(FrameErrorKind::LiteralOverflow { sync: false })
    );
    // One below is a u32 and is refused by the size limit instead.
    let (_, err) = frames(&mut framer, b"a4 APPEND INBOX {4294967295}\r\n");
    assert_eq!(
        err.map(|e| e.kind),
        Some(FrameErrorKind::LiteralTooBig {
            len: u32::MAX,
            limit: 64 * 1024 * 1024,
            sync: true
        })
    );
}

#[test]
fn literal_length_of_eleven_nines() {
    let mut framer = Framer::new(Direction::Server, Limits::default());
    let (got, err) = frames(&mut framer, b"* 1 FETCH (BODY[] {99999999999}\r\n");
    assert!(got.is_empty());
    let err = err.expect("an error");
    assert_eq!(err.kind, FrameErrorKind::LiteralOverflow { sync: true });
    assert_eq!(err.offset, 0);
    // The framer goes on with the next message.
    let (got, err) = frames(&mut framer, b"* 2 EXISTS\r\n");
    assert_eq!((texts(&got), err), (vec![&b"* 2 EXISTS\r\n"[..]], None));
    // The parser, given such a line directly, refuses it too rather than wrapping.
    let err = parse_response(Bytes::from_static(b"* 1 FETCH (BODY[] {99999999999}\r\n"))
        .expect_err("no wrap");
    assert_eq!(err.kind, SyntaxErrorKind::BadLiteral);
}

#[test]
fn literal_announced_and_never_sent() {
    // Client, synchronizing: the head is yielded at once (the client waits for "+"), then the
    // framer waits for the octets, however long.
    let mut framer = Framer::new(Direction::Client, Limits::default());
    let (got, err) = frames(&mut framer, b"a1 APPEND INBOX {1000}\r\nabc");
    assert_eq!(err, None);
    assert_eq!(got.len(), 2);
    assert_eq!(&got[0].bytes()[..], b"a1 APPEND INBOX {1000}\r\n");
    assert_eq!(
        got[1],
        Frame::Chunk {
            bytes: Bytes::from_static(b"abc"),
            last: false
        }
    );
    assert_eq!(framer.literal_remaining(), Some(997));
    assert!(framer.is_mid_message());
    assert_eq!(framer.next_frame(), Ok(None));
    // The command's head parses as a command cut at its literal.
    let cmd = parse_command(got[0].bytes().clone()).expect("the head parses");
    assert!(cmd.is_cut());

    // Server, small literal: held inline, so nothing is yielded until all of it is there.
    let mut framer = Framer::new(Direction::Server, Limits::default());
    let (got, err) = frames(&mut framer, b"* 1 FETCH (BODY[] {10}\r\nabc");
    assert_eq!((got.len(), err), (0, None));
    assert!(!framer.is_between_messages());
    assert_eq!(framer.buffered(), 27);

    // dissect reports the rest as an incomplete message and still accounts for every byte.
    let input = b"* 2 EXISTS\r\n* 1 FETCH (BODY[] {10}\r\nabc";
    let mut records = Vec::new();
    dissect::dissect_with(Direction::Server, input, 5, |r| records.push(r.clone()))
        .expect("no framing error");
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].kind, dissect::Kind::Incomplete);
    assert_eq!(records[1].bytes, input.len() as u64 - 12);
}

#[test]
fn ten_thousand_nested_parentheses() {
    let mut line = b"a1 FETCH 1 ".to_vec();
    line.extend(std::iter::repeat_n(b'(', 10_000));
    line.extend(std::iter::repeat_n(b')', 10_000));
    line.extend_from_slice(b"\r\n");
    // It frames (a line of 20 kB is within the authenticated limit)...
    let limits = Limits {
        max_line: 64 * 1024,
        ..Limits::default()
    };
    let mut framer = Framer::new(Direction::Client, limits);
    let (got, err) = frames(&mut framer, &line);
    assert_eq!((got.len(), err), (1, None));
    // ...and the parser refuses it at the depth bound, without recursing 10,000 times.
    let err = parse_command(got[0].bytes().clone()).expect_err("too deep");
    assert_eq!(err.error.kind, SyntaxErrorKind::TooDeep(DEFAULT_MAX_DEPTH));
    assert_eq!(err.tag.as_deref(), Some(&b"a1"[..]));
    assert_eq!(err.error.offset, 11 + DEFAULT_MAX_DEPTH);

    // The same in a response, in its data and in a response code.
    let mut resp = b"* 1 FETCH ".to_vec();
    resp.extend(std::iter::repeat_n(b'(', 10_000));
    resp.extend(std::iter::repeat_n(b')', 10_000));
    resp.extend_from_slice(b"\r\n");
    let err = parse_response(Bytes::from(resp)).expect_err("too deep");
    assert_eq!(err.kind, SyntaxErrorKind::TooDeep(DEFAULT_MAX_DEPTH));
    let mut resp = b"* OK [BADCHARSET ".to_vec();
    resp.extend(std::iter::repeat_n(b'(', 10_000));
    resp.extend_from_slice(b"] x\r\n");
    // The code's data is not tokenizable: it is kept as raw text up to the "]".
    let r = parse_response(Bytes::from(resp)).expect("a status with an opaque code");
    assert_eq!(r.code().map(|c| c.args.is_none()), Some(true));
    // Brackets (fetch sections) in a response are bounded the same way.
    let mut resp = b"* 1 FETCH (BODY".to_vec();
    resp.extend(std::iter::repeat_n(b'[', 10_000));
    resp.extend_from_slice(b"\r\n");
    let err = parse_response(Bytes::from(resp)).expect_err("too deep");
    assert_eq!(err.kind, SyntaxErrorKind::TooDeep(DEFAULT_MAX_DEPTH));
    // In a command brackets are atom octets (Dovecot's reading): no nesting, one atom.
    let mut cmd = b"a1 FETCH 1 BODY".to_vec();
    cmd.extend(std::iter::repeat_n(b'[', 10_000));
    cmd.extend_from_slice(b"\r\n");
    let cmd = parse_command(Bytes::from(cmd)).expect("one atom");
    assert_eq!(cmd.args[1].raw(&cmd.raw).len(), 4 + 10_000);
}

#[test]
fn nul_inside_a_quoted_string() {
    // The framer refuses a NUL anywhere in a line (literal octets are not looked at).
    let mut framer = Framer::new(Direction::Client, Limits::default());
    let (got, err) = frames(&mut framer, b"a1 LOGIN \"al\0ice\" \"pw\"\r\na2 NOOP\r\n");
    assert!(got.is_empty());
    let err = err.expect("an error");
    assert_eq!(err.kind, FrameErrorKind::Nul);
    assert_eq!((err.offset, err.tag.as_deref()), (0, Some(&b"a1"[..])));
    let (got, _) = frames(&mut framer, b"");
    assert_eq!(texts(&got), vec![&b"a2 NOOP\r\n"[..]]);
    // The parser, given such a line directly, refuses the quoted string at the NUL.
    let err = parse_command(Bytes::from_static(b"a1 LOGIN \"al\0ice\" \"pw\"\r\n"))
        .expect_err("NUL in a quoted string");
    assert_eq!(err.error.kind, SyntaxErrorKind::BadQuoted);
    assert_eq!(err.error.offset, 12);
    // A binary literal may carry NUL: that is what it is for.
    let mut framer = Framer::new(Direction::Client, Limits::default());
    let (got, err) = frames(&mut framer, b"a1 APPEND INBOX ~{3+}\r\na\0b\r\n");
    assert_eq!((got.len(), err), (1, None));
}

#[test]
fn invalid_modified_utf7_in_a_mailbox_name() {
    let cmd = parse_command(Bytes::from_static(b"a1 SELECT &Jjo!\r\n")).expect("parses");
    let args = cmd.mailbox_args();
    let name = args[0].token.string(&cmd.raw).expect("a string");
    assert_eq!(&name[..], b"&Jjo!");
    assert_eq!(
        mutf7::decode(&name),
        Err(Mutf7Error::InvalidBase64 {
            offset: 4,
            byte: b'!'
        })
    );
    // Non-canonical spellings are refused too: a shift holding printable ASCII ("a").
    assert!(matches!(
        mutf7::decode(b"&AGE-"),
        Err(Mutf7Error::EncodedPrintable { unit: 0x61, .. })
    ));
    // Raw 8-bit (UTF-8 sent without UTF8=ACCEPT) is not modified UTF-7.
    assert_eq!(
        mutf7::decode("Entwürfe".as_bytes()),
        Err(Mutf7Error::NonPrintable {
            offset: 4,
            byte: 0xc3
        })
    );
    // dissect reports the name as invalid instead of guessing.
    let mut records = Vec::new();
    dissect::dissect_with(Direction::Client, b"a1 SELECT &Jjo!\r\n", 64, |r| {
        records.push(r.clone())
    })
    .expect("frames");
    assert!(records[0].mailboxes.is_empty());
    assert_eq!(records[0].invalid_mailboxes.len(), 1);
    assert!(records[0].invalid_mailboxes[0].starts_with("&Jjo!: "));
}

#[test]
fn a_bare_lf() {
    for direction in [Direction::Client, Direction::Server] {
        let mut framer = Framer::new(direction, Limits::default());
        let (got, err) = frames(&mut framer, b"a1 NOOP\r\na2 NOOP\na3 NOOP\r\n");
        assert_eq!(texts(&got), vec![&b"a1 NOOP\r\n"[..]]);
        let err = err.expect("an error");
        assert_eq!(err.kind, FrameErrorKind::BareLf);
        assert_eq!((err.offset, err.tag.as_deref()), (9, Some(&b"a2"[..])));
        let (got, err) = frames(&mut framer, b"");
        assert_eq!((texts(&got), err), (vec![&b"a3 NOOP\r\n"[..]], None));
    }
    // An empty line made of a bare LF.
    let mut framer = Framer::new(Direction::Client, Limits::default());
    let (_, err) = frames(&mut framer, b"\n");
    assert_eq!(
        err.map(|e| (e.kind, e.offset)),
        Some((FrameErrorKind::BareLf, 0))
    );
}

#[test]
fn an_over_long_line_is_too_long_whatever_ends_it_and_however_it_arrives() {
    // 20 octets and a bare LF, with a limit of 8: at once the whole line is seen, one octet at a
    // time its length is refused before its end arrives. Both must report the same error.
    let limits = Limits {
        max_line: 8,
        ..Limits::default()
    };
    for input in [
        &b"a1 NOOP1234567890123\na2 NOOP\r\n"[..],
        b"a1 NOOP12345678\0\r\n",
    ] {
        let mut at_once = Framer::new(Direction::Client, limits);
        let (_, whole) = frames(&mut at_once, input);
        let mut bytewise = Framer::new(Direction::Client, limits);
        let mut split = None;
        for b in input {
            let (_, e) = frames(&mut bytewise, &[*b]);
            split = split.or(e);
        }
        let whole = whole.expect("an error");
        assert_eq!(whole.kind, FrameErrorKind::LineTooLong { limit: 8 });
        assert_eq!(Some(whole), split);
    }
}

#[test]
fn commands_the_upstream_would_tokenize_differently() {
    use SyntaxErrorKind::{Expected, Literal8NotAllowed};
    // Dovecot refuses each of these lines at the octet marked, skips to the end of the line and
    // reads what follows (here a non-synchronizing literal's octets, "b NOOP") as a command of
    // its own. imapgate frames the literal as the client announced it and refuses the command,
    // so nothing reaches the upstream to be read either way.
    let cases: &[(&[u8], SyntaxErrorKind, usize)] = &[
        // An atom running into a literal, a string or a list.
        (b"a1 SELECT x{6+}\r\nb NOOP\r\n", Expected("SP"), 11),
        (b"a1 SELECT x\"y\" {6+}\r\nb NOOP\r\n", Expected("SP"), 11),
        (
            b"a1 STATUS x(MESSAGES) {6+}\r\nb NOOP\r\n",
            Expected("SP"),
            11,
        ),
        // 8-bit octets in an atom ("8bit data in atom").
        (b"a1 SELECT x\xe9 {6+}\r\nb NOOP\r\n", Expected("SP"), 11),
        (b"a1 SELECT \xe9 {6+}\r\nb NOOP\r\n", Expected("atom"), 10),
        // A fetch section opening with a literal.
        (b"a1 FETCH 1 BODY[{6+}\r\nb NOOP]\r\n", Expected("SP"), 16),
        // literal8 outside APPEND's data ("literal8 not allowed here").
        (b"a1 NOOP ~{6+}\r\nb NOOP\r\n", Literal8NotAllowed, 8),
        (
            b"a1 APPEND ~{6+}\r\nb NOOP {1+}\r\nx\r\n",
            Literal8NotAllowed,
            10,
        ),
        // A command name running into something else ("Invalid command name").
        (b"a1 SELECT(x {6+}\r\nb NOOP)\r\n", Expected("SP"), 9),
    ];
    for (input, kind, offset) in cases {
        let text = String::from_utf8_lossy(input);
        let mut stream = input.to_vec();
        stream.extend_from_slice(b"a2 NOOP\r\n");
        let mut framer = Framer::new(Direction::Client, Limits::default());
        let (got, err) = frames(&mut framer, &stream);
        assert_eq!(err, None, "{text}");
        assert_eq!(texts(&got), vec![*input, b"a2 NOOP\r\n"], "{text}");
        let err = parse_command(got[0].bytes().clone()).expect_err(&text);
        assert_eq!(
            (err.error.kind, err.error.offset),
            (*kind, *offset),
            "{text}"
        );
        assert_eq!(err.tag.as_deref(), Some(&b"a1"[..]), "{text}");
    }
    // A tag Dovecot refuses ("]" is an ASTRING-CHAR, but "Invalid tag" there, and the
    // command would never get a tagged answer): refused, and not answered as tag "a1".
    let err = parse_command(Bytes::from_static(b"a1] NOOP\r\n")).expect_err("tag");
    assert_eq!((err.error.kind, err.error.offset), (Expected("tag"), 2));
    assert_eq!(err.tag, None);
}
