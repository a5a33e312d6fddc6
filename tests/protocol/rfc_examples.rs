//! Every C:/S: example of RFC 3501 and RFC 9051 replayed through the framer and the parsers, as
//! imap-codec's tests/trace.rs does: each side's lines become one byte stream (literal octets
//! inline, as the RFCs write them), the stream is framed, and every message must parse as what it
//! is: a command, a SASL response line or IDLE's DONE on the client side, a response on the server
//! side. The tag and name found must be those written in the example.

use crate::protocol_support;
use bytes::Bytes;
use imapgate::dissect::{self, Kind};
use imapgate::imap::command::{self, CommandKind};
use imapgate::imap::framing::{Direction, Limits};
use imapgate::imap::mutf7;
use imapgate::imap::response::{self, ResponseKind};
use protocol_support::{Example, LineKind, frame_stream, read_examples};

/// Where messages start, found independently of the framer: a message runs from a line start to
/// the end of a line that announces no literal; the octets of each announced literal are skipped.
/// (No example has a SASL line or a status text ending in something shaped like a literal.)
fn expected_starts(stream: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut p = 0;
    while p < stream.len() {
        starts.push(p);
        loop {
            let Some(lf) = stream[p..].iter().position(|&b| b == b'\n') else {
                return starts;
            };
            let line = &stream[p..p + lf - 1];
            p += lf + 1;
            match literal_len(line) {
                Some(n) if p + n < stream.len() => p += n,
                Some(_) => return starts,
                None => break,
            }
        }
    }
    starts
}

fn literal_len(line: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(line).ok()?;
    let body = s.strip_suffix('}')?;
    let open = body.rfind('{')?;
    let digits = body[open + 1..].trim_end_matches('+');
    digits.parse().ok()
}

/// The words an example line starts with: tag, then the command or response name.
fn expected_name(line: &str, client: bool) -> (String, Option<String>) {
    let mut words = line.split(' ');
    let tag = words.next().unwrap_or_default().to_string();
    let mut name = words.next().map(str::to_ascii_uppercase);
    if client && name.as_deref() == Some("UID") {
        name = words
            .next()
            .map(|w| format!("UID {}", w.to_ascii_uppercase()));
    }
    if !client
        && name
            .as_deref()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    {
        name = words.next().map(str::to_ascii_uppercase);
    }
    (tag, name)
}

#[derive(Default, Debug)]
struct Counts {
    commands: usize,
    sasl: usize,
    done: usize,
    responses: usize,
    with_literals: usize,
}

fn replay(file: &str, example: &Example, counts: &mut Counts) {
    let what = format!("{file}: {}", example.title);
    for client in [true, false] {
        let stream = example.stream(client);
        if stream.is_empty() {
            continue;
        }
        let direction = if client {
            Direction::Client
        } else {
            Direction::Server
        };
        // Framed at once and one byte at a time: the same messages.
        let framed = frame_stream(direction, Limits::default(), &stream, stream.len());
        let bytewise = frame_stream(direction, Limits::default(), &stream, 1);
        assert_eq!(framed.error, None, "{what}: framing error");
        assert_eq!(framed.messages, bytewise.messages, "{what}: split framing");
        if example.incomplete() && client {
            let inc = framed
                .incomplete
                .as_ref()
                .expect("the example ends incomplete");
            let cmd = command::parse_command(Bytes::copy_from_slice(&inc.bytes))
                .unwrap_or_else(|e| panic!("{what}: cut command: {e}"));
            assert!(cmd.is_cut(), "{what}");
        } else {
            assert_eq!(
                framed.incomplete, None,
                "{what}: stream ends inside a message"
            );
        }

        // Message boundaries as an independent reading of the example finds them.
        let starts: Vec<usize> = framed.messages.iter().map(|m| m.offset).collect();
        let mut want = expected_starts(&stream);
        if let Some(inc) = &framed.incomplete {
            assert_eq!(want.pop(), Some(inc.offset), "{what}");
        }
        assert_eq!(starts, want, "{what}: message boundaries");

        for (msg, kind) in framed.messages.iter().zip(&framed.kinds) {
            let text = String::from_utf8_lossy(&msg.bytes);
            let first_line = text.split("\r\n").next().unwrap_or_default();
            let raw = Bytes::copy_from_slice(&msg.bytes);
            if client {
                match kind {
                    Some(LineKind::Sasl) => {
                        command::parse_sasl_line(&raw)
                            .unwrap_or_else(|e| panic!("{what}: SASL line {text:?}: {e}"));
                        counts.sasl += 1;
                        continue;
                    }
                    Some(LineKind::Done) => {
                        command::parse_done(&raw)
                            .unwrap_or_else(|e| panic!("{what}: DONE line {text:?}: {e}"));
                        counts.done += 1;
                        continue;
                    }
                    _ => {}
                }
                let cmd = command::parse_command(raw)
                    .unwrap_or_else(|e| panic!("{what}: command {text:?}: {e}"));
                let (tag, name) = expected_name(first_line, true);
                assert_eq!(String::from_utf8_lossy(cmd.tag()), tag, "{what}: {text:?}");
                assert_eq!(
                    Some(cmd.display_name().into_owned()),
                    name,
                    "{what}: {text:?}"
                );
                let known = !matches!(name.as_deref(), Some("XPIG-LATIN" | "BLURDYBLOOP"));
                assert_eq!(
                    cmd.name.kind != CommandKind::Other,
                    known,
                    "{what}: {text:?}"
                );
                for m in cmd.mailbox_args() {
                    let s = m.token.string(&cmd.raw).expect("a string");
                    mutf7::decode(&s)
                        .unwrap_or_else(|e| panic!("{what}: mailbox of {text:?}: {e}"));
                }
                counts.commands += 1;
                counts.with_literals += usize::from(text.contains("}\r\n"));
            } else {
                let resp = response::parse_response(raw)
                    .unwrap_or_else(|e| panic!("{what}: response {text:?}: {e}"));
                let (tag, name) = expected_name(first_line, false);
                match &resp.kind {
                    ResponseKind::Continuation { .. } => assert_eq!(tag, "+", "{what}"),
                    ResponseKind::Status { tag: Some(_), .. } => {
                        assert_eq!(resp.tag().map(String::from_utf8_lossy), Some(tag.into()));
                        assert_eq!(Some(resp.display_name().into_owned()), name, "{what}");
                    }
                    ResponseKind::Status { tag: None, .. } | ResponseKind::Data { .. } => {
                        assert_eq!(tag, "*", "{what}: {text:?}");
                        assert_eq!(Some(resp.display_name().into_owned()), name, "{what}");
                    }
                }
                for m in resp.mailboxes() {
                    let s = m.token.string(&resp.raw).expect("a string");
                    mutf7::decode(&s)
                        .unwrap_or_else(|e| panic!("{what}: mailbox of {text:?}: {e}"));
                }
                counts.responses += 1;
                counts.with_literals += usize::from(text.contains("}\r\n"));
            }
        }

        // `imapgate dissect` sees the same messages and parses every one of them.
        let mut records = Vec::new();
        dissect::dissect_with(direction, &stream, 7, |r| records.push(r.clone()))
            .unwrap_or_else(|e| panic!("{what}: dissect: {e}"));
        let incomplete = usize::from(framed.incomplete.is_some());
        assert_eq!(records.len(), framed.messages.len() + incomplete, "{what}");
        for (r, msg) in records.iter().zip(&framed.messages) {
            assert_ne!(r.kind, Kind::Unparsed, "{what}: {r:?}");
            assert_eq!(r.bytes, msg.bytes.len() as u64, "{what}");
        }
    }
}

fn replay_file(file: &str) -> Counts {
    let examples = read_examples(file);
    let mut counts = Counts::default();
    for example in &examples {
        replay(file, example, &mut counts);
    }
    counts
}

#[test]
fn rfc3501_examples() {
    let counts = replay_file("rfc3501_examples.txt");
    // Guards against an empty or truncated data file: the numbers of the extracted examples.
    assert_eq!(counts.commands, 67, "{counts:?}");
    assert_eq!(counts.sasl, 3, "{counts:?}");
    assert_eq!(counts.done, 0, "{counts:?}");
    assert_eq!(counts.responses, 176, "{counts:?}");
    assert_eq!(counts.with_literals, 4, "{counts:?}");
}

#[test]
fn rfc9051_examples() {
    let counts = replay_file("rfc9051_examples.txt");
    assert_eq!(counts.commands, 195, "{counts:?}");
    assert_eq!(counts.done, 2, "{counts:?}");
    assert_eq!(counts.sasl, 6, "{counts:?}");
    assert_eq!(counts.responses, 503, "{counts:?}");
    assert_eq!(counts.with_literals, 7, "{counts:?}");
}

#[test]
fn example_files_are_well_formed() {
    for file in ["rfc3501_examples.txt", "rfc9051_examples.txt"] {
        let examples = read_examples(file);
        assert!(examples.len() > 40, "{file}: {} examples", examples.len());
        for e in &examples {
            for (_, line) in &e.lines {
                assert!(!line.ends_with(' '), "{file}: {}: trailing space", e.title);
                assert!(!line.contains('\r'), "{file}: {}", e.title);
            }
        }
    }
}
