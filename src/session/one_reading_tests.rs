//! One reading of the client's bytes: transcripts of the attacks of issue 9 at the level of
//! the conversation. imapgate must read every byte as the upstream will: a mode begins only on
//! the upstream's `+`, commands invalid in the current state never leave imapgate, every
//! literal sent upstream waits for `+`, and an answer to something imapgate never sent closes
//! the session. (End-to-end versions against a real Dovecot are in tests/security.rs.)

use super::tests::{c, client, conv, drain, logged_in, s, upstream};
use super::*;

fn events(conv: &mut Conversation) -> Vec<Event> {
    conv.events.drain(..).collect()
}

#[test]
fn idle_before_login_is_refused_and_the_next_line_is_a_command() {
    // C: a IDLE / b LOGIN alice pw   (one write, no STARTTLS)
    let mut conv = conv(ListenerTls::Starttls, false);
    drain(&mut conv);
    let (up, down) = c(&mut conv, "a IDLE\r\nb LOGIN alice pw\r\n");
    assert_eq!(
        down,
        "a BAD [CLIENTBUG] IDLE is not valid before authentication\r\n"
    );
    // The LOGIN is read as the command it is (and judged: see the policy tests).
    assert_eq!(up, "b LOGIN alice pw\r\n");
}

#[test]
fn binary_literal_before_login_is_refused_and_its_octets_are_data() {
    // C: a NOOP ~{18+} / b LOGIN alice pw (18 octets)
    let mut conv = conv(ListenerTls::Starttls, false);
    drain(&mut conv);
    let (up, down) = c(
        &mut conv,
        "a NOOP ~{18+}\r\nb LOGIN alice pw\r\n\r\nc NOOP\r\n",
    );
    assert_eq!(
        up, "c NOOP\r\n",
        "the literal's octets never reach the server"
    );
    assert!(down.starts_with("a BAD [CLIENTBUG] "), "{down}");
}

#[test]
fn binary_literals_need_binary_from_the_server() {
    let mut conv = logged_in();
    let (up, down) = c(&mut conv, "a APPEND INBOX ~{3+}\r\nabc\r\nb NOOP\r\n");
    assert_eq!(up, "b NOOP\r\n");
    assert_eq!(
        down,
        "a BAD [CLIENTBUG] Binary literals (~{n}) need the BINARY extension, which the server does not offer\r\n"
    );
}

#[test]
fn authenticate_after_login_is_refused_and_later_commands_are_judged() {
    let mut conv = logged_in();
    events(&mut conv);
    let (up, down) = c(
        &mut conv,
        "x AUTHENTICATE PLAIN\r\ny SELECT Private/Secret\r\n",
    );
    assert_eq!(
        down,
        "x BAD [CLIENTBUG] AUTHENTICATE is only valid before authentication\r\n"
    );
    assert_eq!(up, "y SELECT Private/Secret\r\n");
    let evs = events(&mut conv);
    assert!(
        !evs.iter().any(|e| matches!(e, Event::Login { .. })),
        "no login recorded for a refused AUTHENTICATE: {evs:?}"
    );
}

#[test]
fn uid_prefix_on_a_non_uid_command_is_refused() {
    let mut conv = conv(ListenerTls::Starttls, false);
    drain(&mut conv);
    for line in [
        "a UID LOGIN alice pw\r\n",
        "a UID AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n",
    ] {
        let (up, down) = c(&mut conv, line);
        assert_eq!(up, "", "{line}");
        assert!(down.starts_with("a BAD [CLIENTBUG] "), "{down}");
    }
    // No tag: `LOGIN` is the tag and `alice` an unknown command.
    let (up, down) = c(&mut conv, "LOGIN alice pw\r\n");
    assert_eq!(up, "");
    assert!(down.starts_with("LOGIN BAD "), "{down}");
}

#[test]
fn a_refused_sync_literal_leaves_its_octets_to_be_read_as_commands() {
    // C: a APPEND INBOX.Missing {26}   S: a NO [TRYCREATE]   C: b CREATE ...
    let mut conv = logged_in();
    assert_eq!(
        upstream(c(&mut conv, "a APPEND Missing {21}\r\n")),
        "a APPEND Missing {21}\r\n"
    );
    // A hostile client does not wait for the "+": its next bytes are held, not forwarded.
    assert_eq!(
        c(&mut conv, "b CREATE Outside/x\r\n"),
        (String::new(), String::new())
    );
    // The server refuses the literal: the held bytes are a command, read and judged as one.
    assert_eq!(
        s(&mut conv, "a NO [TRYCREATE] Mailbox doesn't exist\r\n"),
        (
            "b CREATE Outside/x\r\n".into(),
            "a NO [TRYCREATE] Mailbox doesn't exist\r\n".into()
        )
    );
}

#[test]
fn nonsync_literals_go_upstream_synchronizing() {
    let mut conv = logged_in();
    // The client uses LITERAL+; imapgate sends `{n}` and the octets after the server's "+".
    assert_eq!(
        upstream(c(&mut conv, "a CREATE {3+}\r\nabc\r\nb NOOP\r\n")),
        "a CREATE {3}\r\n"
    );
    assert_eq!(
        s(&mut conv, "+ OK\r\n"),
        ("abc\r\nb NOOP\r\n".into(), String::new()),
        "the + is imapgate's to keep: the client never asked"
    );
    client(s(&mut conv, "a OK Create completed\r\nb OK\r\n"));
}

#[test]
fn a_refused_nonsync_literal_is_dropped_with_its_command() {
    // Dovecot refuses an unknown command before reading its arguments and would read the
    // literal's octets as a command; imapgate never sends them.
    let mut conv = logged_in();
    assert_eq!(
        upstream(c(&mut conv, "x XYZZY {12+}\r\nb CREATE zz1\r\nc NOOP\r\n")),
        "x XYZZY {12}\r\n"
    );
    assert_eq!(
        s(
            &mut conv,
            "x BAD Error in IMAP command XYZZY: Unknown command\r\n"
        ),
        (
            "c NOOP\r\n".into(),
            "x BAD Error in IMAP command XYZZY: Unknown command\r\n".into()
        )
    );
}

#[test]
fn a_streamed_nonsync_literal_waits_for_the_upstream() {
    let mut conv = logged_in();
    let body = "x".repeat(100_000);
    let input = format!("a APPEND INBOX {{100000+}}\r\n{body}\r\nb NOOP\r\n");
    assert_eq!(
        upstream(c(&mut conv, &input)),
        "a APPEND INBOX {100000}\r\n"
    );
    let (up, down) = s(&mut conv, "+ OK\r\n");
    assert_eq!(down, "");
    assert_eq!(up, format!("{body}\r\nb NOOP\r\n"));
}

#[test]
fn idle_begins_only_on_the_upstreams_continuation() {
    let mut conv = logged_in();
    assert_eq!(upstream(c(&mut conv, "a IDLE\r\n")), "a IDLE\r\n");
    // Until the server says "+", the next line is not DONE: it is held.
    assert_eq!(
        c(&mut conv, "b DELETE x\r\n"),
        (String::new(), String::new())
    );
    // The server refuses IDLE: the held line is a command.
    assert_eq!(
        s(&mut conv, "a NO IDLE not now\r\n"),
        ("b DELETE x\r\n".into(), "a NO IDLE not now\r\n".into())
    );
    // Accepted: "+" relayed, then the next line is DONE.
    c(&mut conv, "c IDLE\r\n");
    assert_eq!(client(s(&mut conv, "+ idling\r\n")), "+ idling\r\n");
    assert_eq!(upstream(c(&mut conv, "DONE\r\n")), "DONE\r\n");
}

#[test]
fn a_line_other_than_done_never_reaches_the_upstream() {
    let mut conv = logged_in();
    c(&mut conv, "a IDLE\r\n");
    s(&mut conv, "+ idling\r\n");
    assert_eq!(
        c(&mut conv, "b DELETE x\r\n"),
        (
            "DONE\r\n".into(),
            "* BAD [CLIENTBUG] Expected DONE to end IDLE\r\n".into()
        )
    );
}

#[test]
fn sasl_lines_are_read_only_after_each_continuation() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    // PLAIN without SASL-IR: the user comes from the response after "+".
    assert_eq!(
        upstream(c(&mut conv, "a AUTHENTICATE PLAIN\r\nAGFsaWNlAHB3\r\n")),
        "a AUTHENTICATE PLAIN\r\n",
        "the response waits for the server's +"
    );
    assert_eq!(
        s(&mut conv, "+ \r\n"),
        ("AGFsaWNlAHB3\r\n".into(), "+ \r\n".into())
    );
    s(&mut conv, "a OK Logged in\r\n");
    assert_eq!(conv.user(), Some("alice"));
    let evs = events(&mut conv);
    assert!(
        evs.contains(&Event::Login {
            ok: true,
            user: Some("alice".into())
        }),
        "{evs:?}"
    );
}

#[test]
fn authenticate_login_names_its_user() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a AUTHENTICATE LOGIN\r\n");
    s(&mut conv, "+ VXNlcm5hbWU6\r\n");
    c(&mut conv, "Ym9i\r\n"); // "bob"
    s(&mut conv, "+ UGFzc3dvcmQ6\r\n");
    c(&mut conv, "c2VjcmV0\r\n");
    s(&mut conv, "a NO [AUTHENTICATIONFAILED] no\r\n");
    let evs = events(&mut conv);
    assert!(
        evs.contains(&Event::Login {
            ok: false,
            user: Some("bob".into())
        }),
        "{evs:?}"
    );
    assert_eq!(conv.state(), ImapState::NotAuthenticated);
}

#[test]
fn state_changing_commands_are_barriers() {
    let mut conv = logged_in();
    assert_eq!(
        upstream(c(&mut conv, "a SELECT INBOX\r\nb FETCH 1 FLAGS\r\n")),
        "a SELECT INBOX\r\n"
    );
    assert_eq!(
        s(&mut conv, "a OK selected\r\n"),
        ("b FETCH 1 FLAGS\r\n".into(), "a OK selected\r\n".into())
    );
    // ENABLE changes how mailbox names are read: what follows waits for its answer.
    assert_eq!(
        upstream(c(&mut conv, "e ENABLE UTF8=ACCEPT\r\nf SELECT \"Ü\"\r\n")),
        "e ENABLE UTF8=ACCEPT\r\n"
    );
    let (up, _) = s(&mut conv, "* ENABLED UTF8=ACCEPT\r\ne OK enabled\r\n");
    assert_eq!(up, "f SELECT \"Ü\"\r\n");
}

#[test]
fn a_tagged_answer_to_a_command_never_sent_closes_the_session() {
    let mut conv = logged_in();
    c(&mut conv, "a NOOP\r\n");
    let down = client(s(&mut conv, "zz OK Create completed\r\na OK\r\n"));
    assert_eq!(
        down,
        "* BYE [UNAVAILABLE] The mail server's answer does not match this session; closing it\r\n",
        "neither the unknown answer nor anything after it is relayed"
    );
    assert_eq!(conv.take_control(), Some(Control::Close { flush: true }));
    assert!(
        events(&mut conv)
            .iter()
            .any(|e| matches!(e, Event::Desync { .. }))
    );
}

#[test]
fn a_continuation_nobody_asked_for_closes_the_session() {
    let mut conv = logged_in();
    c(&mut conv, "a NOOP\r\n");
    let down = client(s(&mut conv, "+ go ahead\r\n"));
    assert!(down.starts_with("* BYE [UNAVAILABLE]"), "{down}");
    assert_eq!(conv.take_control(), Some(Control::Close { flush: true }));
}

#[test]
fn a_login_out_of_state_is_a_protocol_error_not_a_login() {
    let mut conv = logged_in();
    events(&mut conv);
    c(&mut conv, "a LOGIN mallory pw\r\n");
    let evs = events(&mut conv);
    assert!(
        matches!(evs.as_slice(), [Event::Invalid { .. }]),
        "no login record for it: {evs:?}"
    );
}
