//! Protocol core benchmarks over a realistic session built in memory.
//!
//! - client stream: LOGIN, SELECT, then pipelined UID FETCH / UID STORE / UID SEARCH / NOOP and
//!   APPENDs with non-synchronizing literals;
//! - server stream: greeting, LIST and STATUS replies for 200 mailboxes (some with modified
//!   UTF-7 names), the FETCH of four multi-megabyte messages, tagged OKs.
//!
//! Measured: framing throughput of the server stream (bytes, read in 64 KiB pieces as from a
//! socket), framing of the client stream, parsing of command lines (commands per second), and
//! parsing of responses (responses per second).
//!
//! Run: `cargo bench --bench protocol` (or `-- --measurement-time 3` to change the time).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use imapgate::imap::command::parse_command;
use imapgate::imap::framing::{Direction, Frame, Framer, Limits};
use imapgate::imap::response::parse_response;

/// What a socket read hands over at a time.
const READ: usize = 64 * 1024;

fn client_stream() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"a0001 LOGIN alice \"correct horse battery staple\"\r\n");
    out.extend_from_slice(b"a0002 SELECT INBOX (CONDSTORE)\r\n");
    let message = {
        let mut m = b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\n\
Subject: benchmark\r\nMessage-Id: <x@example.org>\r\n\r\n"
            .to_vec();
        while m.len() < 2000 {
            m.extend_from_slice(b"Some body text of a short message, line after line.\r\n");
        }
        m
    };
    let mut tag = 3;
    for i in 0..2500u32 {
        let lines = [
            format!(
                "a{tag:04} UID FETCH {}:{} (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS (DATE FROM TO SUBJECT MESSAGE-ID)])\r\n",
                i * 50 + 1,
                i * 50 + 50
            ),
            format!(
                "a{:04} UID STORE {} +FLAGS.SILENT (\\Seen $Forwarded)\r\n",
                tag + 1,
                i + 1
            ),
            format!(
                "a{:04} UID SEARCH UNSEEN SINCE 1-Feb-2024 FROM \"alice@example.org\"\r\n",
                tag + 2
            ),
            format!("a{:04} NOOP\r\n", tag + 3),
        ];
        for line in &lines {
            out.extend_from_slice(line.as_bytes());
        }
        tag += 4;
        if i % 50 == 0 {
            out.extend_from_slice(
                format!(
                    "a{tag:04} APPEND \"Sent Items\" (\\Seen) \"07-Feb-2024 21:52:25 +0100\" {{{}+}}\r\n",
                    message.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(&message);
            out.extend_from_slice(b"\r\n");
            tag += 1;
        }
    }
    out.extend_from_slice(format!("a{tag:04} LOGOUT\r\n").as_bytes());
    out
}

fn server_stream() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] ready.\r\n",
    );
    out.extend_from_slice(b"a0001 OK [CAPABILITY IMAP4rev1 IDLE MOVE UIDPLUS] Logged in\r\n");
    let names: Vec<String> = (0..200)
        .map(|i| match i % 4 {
            0 => format!("Projects/{i:03}"),
            1 => format!("\"Entw&APw-rfe/{i:03}\""),
            2 => format!("\"Archive/2024/Sub folder {i:03}\""),
            _ => format!("\"&ZeVnLIqe-/{i:03}\""),
        })
        .collect();
    for name in &names {
        out.extend_from_slice(format!("* LIST (\\HasNoChildren) \"/\" {name}\r\n").as_bytes());
    }
    out.extend_from_slice(b"a0002 OK List completed (0.001 + 0.000 secs).\r\n");
    for (i, name) in names.iter().enumerate() {
        out.extend_from_slice(
            format!(
                "* STATUS {name} (MESSAGES {} UIDNEXT {} UNSEEN {} UIDVALIDITY 1795670073)\r\n",
                i * 13,
                i * 17 + 1,
                i % 7
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"a0003 OK Status completed.\r\n");
    out.extend_from_slice(
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* 4000 EXISTS\r\n\
* OK [UIDVALIDITY 1795670073] UIDs valid\r\n* OK [UIDNEXT 4001] Predicted next UID\r\n\
a0004 OK [READ-WRITE] Select completed.\r\n",
    );
    // Several multi-megabyte messages.
    for (i, size) in [3 << 20, 5 << 20, 8 << 20, 4 << 20].iter().enumerate() {
        out.extend_from_slice(
            format!(
                "* {} FETCH (UID {} FLAGS (\\Seen) BODY[] {{{size}}}\r\n",
                i + 1,
                i + 101
            )
            .as_bytes(),
        );
        let start = out.len();
        let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n";
        while out.len() - start < *size {
            let n = line.len().min(size - (out.len() - start));
            out.extend_from_slice(&line[..n]);
        }
        out.extend_from_slice(b")\r\n");
    }
    out.extend_from_slice(b"a0005 OK Fetch completed.\r\n");
    for i in 0..500 {
        out.extend_from_slice(
            format!(
                "* {} FETCH (UID {} FLAGS (\\Seen \\Flagged))\r\n",
                i + 1,
                i + 101
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(
        b"a0006 OK Store completed.\r\n* BYE Logging out\r\na0007 OK Logout completed.\r\n",
    );
    out
}

/// Frames `input` read by read and returns the number of frames (so nothing is optimized away).
fn frame(direction: Direction, limits: Limits, input: &[u8]) -> usize {
    let mut framer = Framer::new(direction, limits);
    let mut frames = 0;
    for read in input.chunks(READ) {
        framer.push(read);
        while let Ok(Some(frame)) = framer.next_frame() {
            black_box(&frame);
            frames += 1;
        }
    }
    frames
}

/// The complete messages of a stream, and the first piece of each streamed one.
fn messages(direction: Direction, input: &[u8]) -> Vec<Bytes> {
    let mut framer = Framer::new(direction, authenticated());
    framer.push(input);
    let mut out = Vec::new();
    while let Ok(Some(frame)) = framer.next_frame() {
        if let Frame::Text {
            bytes, start: true, ..
        } = frame
        {
            out.push(bytes);
        }
    }
    out
}

fn authenticated() -> Limits {
    Limits {
        max_line: 64 * 1024,
        ..Limits::default()
    }
}

fn benches(c: &mut Criterion) {
    let client = client_stream();
    let server = server_stream();
    let limits = authenticated();

    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(server.len() as u64));
    g.bench_function("server stream (literal-heavy)", |b| {
        b.iter(|| frame(Direction::Server, limits, black_box(&server)))
    });
    g.throughput(Throughput::Bytes(client.len() as u64));
    g.bench_function("client stream (pipelined commands)", |b| {
        b.iter(|| frame(Direction::Client, limits, black_box(&client)))
    });
    g.finish();

    let commands = messages(Direction::Client, &client);
    let mut g = c.benchmark_group("parsing");
    g.throughput(Throughput::Elements(commands.len() as u64));
    g.bench_function("command lines", |b| {
        b.iter(|| {
            for cmd in &commands {
                let _ = black_box(parse_command(cmd.clone()));
            }
        })
    });
    let responses = messages(Direction::Server, &server);
    g.throughput(Throughput::Elements(responses.len() as u64));
    g.bench_function("responses", |b| {
        b.iter(|| {
            for resp in &responses {
                let _ = black_box(parse_response(resp.clone()));
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = protocol;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = benches
}
criterion_main!(protocol);
