//! Cutting a client message into the segments imapgate sends upstream one `+` at a time.
//!
//! Every literal imapgate sends upstream is synchronizing: a non-synchronizing announcement
//! (`{n+}`, `~{n+}`) is re-announced as `{n}` / `~{n}`, and the octets after an announcement
//! are sent only once the upstream has answered `+`. A server may refuse a command before it
//! reads the command's arguments (an unknown command, a parse error, a mailbox that does not
//! exist); with a non-synchronizing literal it then reads the literal's octets as commands
//! (Dovecot does: `x XYZZY {13+}` followed by `b CREATE zz1` creates `zz1`), octets imapgate
//! framed as data and no policy judged. Waiting for `+` makes the upstream say, for every
//! literal, whether it reads the octets as data.
//!
//! The cut is made on the message as the client framer framed it, with the same rule for where
//! a literal is announced ([`super::framing`]), so both readings agree by construction.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::framing::literal_at_end;

/// A piece of a client message, cut after each literal announcement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segments {
    /// Sent at once.
    pub first: Bytes,
    /// Each sent after the upstream's `+` for the literal announced at the end of the part
    /// before (empty, without an allocation, for the usual message without literals).
    pub rest: VecDeque<Bytes>,
    /// The piece ends with the announcement of a literal whose octets are not in it (they
    /// stream from the client); one more `+` is needed before they may follow.
    pub ends_with_literal: bool,
}

/// Cuts `piece` (one [`super::framing::Frame::Text`] of the client direction, lines and the
/// literals held with them) after every literal announcement and makes every announcement
/// synchronizing. A piece without literals comes back whole, without a copy.
pub fn synchronizing_segments(piece: Bytes) -> Segments {
    let mut cuts: Vec<(usize, Option<usize>)> = Vec::new();
    let mut ends_with_literal = false;
    let mut pos = 0;
    while pos < piece.len() {
        let Some(lf) = memchr::memchr(b'\n', &piece[pos..]).map(|i| pos + i) else {
            break;
        };
        let line = piece[pos..lf]
            .strip_suffix(b"\r")
            .unwrap_or(&piece[pos..lf]);
        let literal = match literal_at_end(line) {
            Ok(Some(literal)) => literal,
            _ => {
                pos = lf + 1;
                continue;
            }
        };
        // `{n+}`: the `+` is the octet before the closing brace.
        let plus = (!literal.sync).then(|| pos + line.len() - 2);
        let data_start = lf + 1;
        cuts.push((data_start, plus));
        if data_start >= piece.len() {
            // A streamed literal: its octets follow the piece.
            ends_with_literal = true;
            break;
        }
        pos = data_start.saturating_add(literal.len as usize);
    }
    if cuts.is_empty() {
        return Segments {
            first: piece,
            rest: VecDeque::new(),
            ends_with_literal: false,
        };
    }
    let mut parts = VecDeque::with_capacity(cuts.len() + 1);
    let needs_copy = cuts.iter().any(|(_, plus)| plus.is_some());
    let mut at = 0;
    for &(cut, plus) in &cuts {
        parts.push_back(match (needs_copy, plus) {
            (true, Some(plus)) => {
                let mut b = BytesMut::with_capacity(cut - at - 1);
                b.extend_from_slice(&piece[at..plus]);
                b.extend_from_slice(&piece[plus + 1..cut]);
                b.freeze()
            }
            _ => piece.slice(at..cut),
        });
        at = cut;
    }
    if at < piece.len() {
        parts.push_back(piece.slice(at..));
    }
    Segments {
        first: parts.pop_front().unwrap_or_default(),
        rest: parts,
        ends_with_literal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> (Vec<String>, bool) {
        let out = synchronizing_segments(Bytes::copy_from_slice(s.as_bytes()));
        (
            std::iter::once(&out.first)
                .chain(&out.rest)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect(),
            out.ends_with_literal,
        )
    }

    #[test]
    fn a_message_without_literals_is_one_segment() {
        assert_eq!(seg("a NOOP\r\n"), (vec!["a NOOP\r\n".into()], false));
        assert_eq!(
            seg("a SELECT \"{5}x\"\r\n"),
            (vec!["a SELECT \"{5}x\"\r\n".into()], false)
        );
    }

    #[test]
    fn nonsync_literals_become_sync_and_cut_the_message() {
        assert_eq!(
            seg("a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n"),
            (
                vec![
                    "a LOGIN {5}\r\n".into(),
                    "alice {6}\r\n".into(),
                    "secret\r\n".into()
                ],
                false
            )
        );
        assert_eq!(
            seg("a APPEND INBOX ~{3+}\r\n\0\x01\x02\r\n"),
            (
                vec!["a APPEND INBOX ~{3}\r\n".into(), "\0\x01\x02\r\n".into()],
                false
            )
        );
    }

    #[test]
    fn literal_octets_are_never_scanned() {
        // The literal's octets hold a line ending in what looks like an announcement.
        assert_eq!(
            seg("a X {8}\r\nb {99+}\r\n\r\n"),
            (vec!["a X {8}\r\n".into(), "b {99+}\r\n\r\n".into()], false)
        );
    }

    #[test]
    fn a_piece_ending_in_a_streamed_literal_says_so() {
        assert_eq!(
            seg("a APPEND INBOX {3+}\r\nabc {100000+}\r\n"),
            (
                vec!["a APPEND INBOX {3}\r\n".into(), "abc {100000}\r\n".into()],
                true
            )
        );
        assert_eq!(
            seg("a APPEND INBOX {5}\r\n"),
            (vec!["a APPEND INBOX {5}\r\n".into()], true)
        );
    }

    #[test]
    fn zero_length_literals_still_wait() {
        assert_eq!(
            seg("a LOGIN {0+}\r\n {0}\r\n\r\n"),
            (
                vec!["a LOGIN {0}\r\n".into(), " {0}\r\n".into(), "\r\n".into()],
                false
            )
        );
    }

    mod framed {
        use super::super::*;
        use crate::imap::framing::{Direction, Frame, Framer, Limits};
        use proptest::prelude::*;

        /// One argument: an atom, or a literal (`{n}`/`{n+}`) whose octets may hold anything,
        /// announcements and CRLFs included.
        fn argument() -> impl Strategy<Value = (bool, Vec<u8>)> {
            prop_oneof![
                "[a-z]{1,5}".prop_map(|a| (false, a.into_bytes())),
                (
                    any::<bool>(),
                    proptest::collection::vec(
                        prop_oneof![
                            Just(b'x'),
                            Just(b'\r'),
                            Just(b'\n'),
                            Just(b'{'),
                            Just(b'}'),
                            Just(b'+'),
                            Just(b'5')
                        ],
                        0..12
                    )
                )
                    .prop_map(|(nonsync, data)| (true, {
                        let mut l =
                            format!("{{{}{}}}\r\n", data.len(), if nonsync { "+" } else { "" })
                                .into_bytes();
                        l.extend_from_slice(&data);
                        l
                    })),
            ]
        }

        proptest! {
            /// Whatever the literals hold, the cut agrees with the framer: pieces joined give
            /// the message with every `{n+}` made `{n}`, each cut right after an announcement.
            #[test]
            fn cuts_agree_with_the_framer(args in proptest::collection::vec(argument(), 0..6)) {
                let mut message = b"a X".to_vec();
                let mut expected = b"a X".to_vec();
                let mut cuts = 0;
                for (literal, bytes) in &args {
                    message.push(b' ');
                    expected.push(b' ');
                    message.extend_from_slice(bytes);
                    if *literal {
                        cuts += 1;
                        let text = String::from_utf8_lossy(bytes);
                        let head_end = bytes.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
                        let head = text[..head_end].replace("+}", "}");
                        expected.extend_from_slice(head.as_bytes());
                        expected.extend_from_slice(&bytes[head_end..]);
                    } else {
                        expected.extend_from_slice(bytes);
                    }
                }
                message.extend_from_slice(b"\r\n");
                expected.extend_from_slice(b"\r\n");
                // Everything held whole (as after imapgate collected it): one piece. The server
                // direction's framer holds synchronizing literals too.
                let mut framer = Framer::new(Direction::Server, Limits::default());
                framer.push(&message);
                let piece = match framer.next_frame() {
                    Ok(Some(Frame::Text { bytes, literal: None, .. })) => bytes,
                    other => return Err(TestCaseError::fail(format!("framed as {other:?}"))),
                };
                prop_assert_eq!(&piece[..], &message[..]);
                let out = synchronizing_segments(piece);
                let parts: Vec<Bytes> = std::iter::once(out.first).chain(out.rest).collect();
                prop_assert_eq!(parts.len(), cuts + 1);
                prop_assert!(!out.ends_with_literal);
                prop_assert_eq!(parts.concat(), expected);
                for part in &parts[..cuts] {
                    let announced = part.ends_with(b"}\r\n");
                    prop_assert!(announced, "cut elsewhere: {:?}", part);
                }
            }
        }
    }
}
