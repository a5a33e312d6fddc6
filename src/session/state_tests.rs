//! Transcript tests of the conversation: `C:` is what the client sends, `S:` what the upstream
//! sends; each step checks what imapgate passes on to the other side.

use super::*;

pub(super) const GREETING: &str = "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ STARTTLS AUTH=PLAIN AUTH=SCRAM-SHA-256-PLUS COMPRESS=DEFLATE] Dovecot ready.\r\n";

pub(super) fn conv(listener_tls: ListenerTls, tls: bool) -> Conversation {
    let settings = Settings {
        listener_tls,
        ..Settings::default()
    };
    Conversation::new(
        settings,
        tls,
        Bytes::from_static(GREETING.as_bytes()),
        Policies::none(),
        ConnInfo::default(),
    )
}

/// The client sends `c`; returns (what reached the upstream, what the client got back).
pub(super) fn c(conv: &mut Conversation, c: &str) -> (String, String) {
    conv.client_buffer().extend_from_slice(c.as_bytes());
    conv.client_input();
    drain(conv)
}

/// The upstream sends `s`; returns (what reached the upstream, what the client got).
pub(super) fn s(conv: &mut Conversation, s: &str) -> (String, String) {
    conv.upstream_buffer().extend_from_slice(s.as_bytes());
    conv.upstream_input();
    drain(conv)
}

/// A connection over TLS where `alice` has logged in.
pub(super) fn logged_in() -> Conversation {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    assert_eq!(
        upstream(c(&mut conv, "l1 LOGIN alice pw\r\n")),
        "l1 LOGIN alice pw\r\n"
    );
    client(s(&mut conv, "l1 OK Logged in\r\n"));
    assert_eq!(conv.state(), ImapState::Authenticated);
    conv
}

pub(super) fn drain(conv: &mut Conversation) -> (String, String) {
    (
        String::from_utf8_lossy(&conv.to_upstream.drain_to_vec()).into_owned(),
        String::from_utf8_lossy(&conv.to_client.drain_to_vec()).into_owned(),
    )
}

pub(super) fn upstream(out: (String, String)) -> String {
    assert_eq!(out.1, "", "nothing for the client expected");
    out.0
}

pub(super) fn client(out: (String, String)) -> String {
    assert_eq!(out.0, "", "nothing for the upstream expected");
    out.1
}

#[test]
fn greeting_capabilities_are_rewritten() {
    let mut conv = conv(ListenerTls::Starttls, false);
    assert_eq!(
        client(drain(&mut conv)),
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN STARTTLS] Dovecot ready.\r\n"
    );
    let mut conv = self::conv(ListenerTls::Implicit, true);
    assert_eq!(
        client(drain(&mut conv)),
        "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n"
    );
}

#[test]
fn untouched_messages_pass_byte_identical_and_pipelined() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    // LOGIN is a barrier: what follows it is read once its answer says which state we are in.
    let cmds = "a1 NOOP\r\na2 LOGIN alice pw\r\na3 SELECT  INBOX\r\na4 NOOP\r\n";
    assert_eq!(
        upstream(c(&mut conv, cmds)),
        "a1 NOOP\r\na2 LOGIN alice pw\r\n"
    );
    let resp = "a1 OK NOOP done\r\na2 OK Logged in\r\n";
    assert_eq!(
        s(&mut conv, resp),
        ("a3 SELECT  INBOX\r\n".into(), resp.into())
    );
    let resp = "* 3 EXISTS\r\n* FLAGS (\\Seen)\r\na3 OK [READ-WRITE] Selected\r\n";
    assert_eq!(s(&mut conv, resp), ("a4 NOOP\r\n".into(), resp.into()));
    assert_eq!(conv.state(), ImapState::Selected);
    assert_eq!(conv.user(), Some("alice"));
    assert_eq!(conv.selected(), Some("INBOX"));
    let cmds = "a5 NOOP\r\na6 UID FETCH 1:* (FLAGS)\r\na7 CHECK\r\n";
    assert_eq!(upstream(c(&mut conv, cmds)), cmds);
}

#[test]
fn sync_literal_continuation_comes_from_the_upstream() {
    let mut conv = logged_in();
    assert_eq!(
        upstream(c(&mut conv, "a1 APPEND INBOX {5}\r\n")),
        "a1 APPEND INBOX {5}\r\n"
    );
    assert_eq!(
        client(s(&mut conv, "+ Ready for literal data\r\n")),
        "+ Ready for literal data\r\n"
    );
    assert_eq!(upstream(c(&mut conv, "hello\r\n")), "hello\r\n");
    assert_eq!(
        client(s(&mut conv, "a1 OK [APPENDUID 1 2] Append completed.\r\n")),
        "a1 OK [APPENDUID 1 2] Append completed.\r\n"
    );
}

#[test]
fn capability_data_and_login_codes_are_rewritten() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 LOGIN alice pw\r\n");
    assert_eq!(
        client(s(
            &mut conv,
            "a1 OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE] Logged in\r\n"
        )),
        "a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    );
    c(&mut conv, "a2 CAPABILITY\r\n");
    assert_eq!(
        client(s(
            &mut conv,
            "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED IDLE\r\na2 OK done\r\n"
        )),
        "* CAPABILITY IMAP4rev1 IDLE\r\na2 OK done\r\n"
    );
}

#[test]
fn compress_is_refused_and_never_relayed() {
    let mut conv = logged_in();
    assert_eq!(
        client(c(&mut conv, "a1 COMPRESS DEFLATE\r\n")),
        "a1 NO [CANNOT] COMPRESS is not available through this proxy\r\n"
    );
}

#[test]
fn starttls_is_handled_by_imapgate() {
    let mut conv = conv(ListenerTls::Starttls, false);
    drain(&mut conv);
    assert_eq!(
        client(c(&mut conv, "a1 STARTTLS\r\n")),
        "a1 OK Begin TLS negotiation now\r\n"
    );
    assert_eq!(conv.take_control(), Some(Control::StartTls));
    assert!(!conv.wants_client_input());
    conv.client_tls_established();
    assert!(conv.wants_client_input());
    assert!(conv.is_tls());
    c(&mut conv, "a2 CAPABILITY\r\n");
    assert_eq!(
        client(s(
            &mut conv,
            "* CAPABILITY IMAP4rev1 STARTTLS\r\na2 OK done\r\n"
        )),
        "* CAPABILITY IMAP4rev1\r\na2 OK done\r\n"
    );
}

#[test]
fn starttls_waits_for_earlier_commands() {
    let mut conv = conv(ListenerTls::Starttls, false);
    drain(&mut conv);
    assert_eq!(upstream(c(&mut conv, "a1 NOOP\r\n")), "a1 NOOP\r\n");
    assert_eq!(
        c(&mut conv, "a2 STARTTLS\r\n"),
        (String::new(), String::new())
    );
    assert_eq!(conv.take_control(), None);
    assert_eq!(
        client(s(&mut conv, "a1 OK done\r\n")),
        "a1 OK done\r\na2 OK Begin TLS negotiation now\r\n"
    );
    assert_eq!(conv.take_control(), Some(Control::StartTls));
}

#[test]
fn bytes_after_starttls_close_the_connection() {
    let mut conv = conv(ListenerTls::Starttls, false);
    drain(&mut conv);
    assert_eq!(
        c(&mut conv, "a1 STARTTLS\r\na2 LOGIN alice pw\r\n"),
        (String::new(), String::new())
    );
    assert_eq!(conv.take_control(), Some(Control::Close { flush: false }));
}

#[test]
fn preauth_on_a_starttls_listener_is_refused() {
    let settings = Settings {
        listener_tls: ListenerTls::Starttls,
        ..Settings::default()
    };
    let mut conv = Conversation::new(
        settings,
        false,
        Bytes::from_static(b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as alice\r\n"),
        Policies::none(),
        ConnInfo::default(),
    );
    let out = client(drain(&mut conv));
    assert!(out.starts_with("* BYE [UNAVAILABLE] "), "{out}");
    assert_eq!(conv.take_control(), Some(Control::Close { flush: true }));
}

#[test]
fn authenticate_with_and_without_sasl_ir() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    // AUTHENTICATE PLAIN with SASL-IR: "\0alice\0alicepw".
    let ir = "a1 AUTHENTICATE PLAIN AGFsaWNlAGFsaWNlcHc=\r\n";
    assert_eq!(upstream(c(&mut conv, ir)), ir);
    s(&mut conv, "a1 OK Logged in\r\n");
    assert_eq!(conv.user(), Some("alice"));
    assert_eq!(conv.state(), ImapState::Authenticated);

    let mut conv = self::conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 AUTHENTICATE PLAIN\r\n");
    assert_eq!(client(s(&mut conv, "+ \r\n")), "+ \r\n");
    // A SASL line that looks like a literal announcement is not one.
    assert_eq!(
        upstream(c(&mut conv, "AGJvYgBib2Jwdw{5}\r\n")),
        "AGJvYgBib2Jwdw{5}\r\n"
    );
    s(
        &mut conv,
        "a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
    );
    assert_eq!(conv.state(), ImapState::NotAuthenticated);
    // Commands again after the exchange.
    assert_eq!(
        upstream(c(&mut conv, "a2 LOGIN {3}\r\n")),
        "a2 LOGIN {3}\r\n"
    );
}

#[test]
fn sasl_cancel_is_relayed() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 AUTHENTICATE PLAIN\r\n");
    s(&mut conv, "+ \r\n");
    assert_eq!(upstream(c(&mut conv, "*\r\n")), "*\r\n");
    s(&mut conv, "a1 BAD Authentication aborted\r\n");
    assert_eq!(upstream(c(&mut conv, "a2 NOOP\r\n")), "a2 NOOP\r\n");
}

#[test]
fn idle_and_done() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 LOGIN alice pw\r\n");
    s(&mut conv, "a1 OK Logged in\r\n");
    assert_eq!(upstream(c(&mut conv, "a2 IDLE\r\n")), "a2 IDLE\r\n");
    assert_eq!(
        client(s(&mut conv, "+ idling\r\n* 4 EXISTS\r\n")),
        "+ idling\r\n* 4 EXISTS\r\n"
    );
    assert_eq!(
        upstream(c(&mut conv, "DONE\r\na3 NOOP\r\n")),
        "DONE\r\na3 NOOP\r\n"
    );
    assert_eq!(
        client(s(&mut conv, "a2 OK Idle completed\r\na3 OK done\r\n")),
        "a2 OK Idle completed\r\na3 OK done\r\n"
    );
}

#[test]
fn over_long_line_before_login_gets_bad_and_bye() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    let long = format!("a1 LOGIN {} pw\r\n", "x".repeat(9000));
    let out = client(c(&mut conv, &long));
    assert!(
        out.starts_with("a1 BAD [LIMIT] Command line longer than 8192 octets\r\n* BYE "),
        "{out}"
    );
    assert_eq!(conv.take_control(), Some(Control::Close { flush: true }));
}

#[test]
fn over_long_line_after_login_gets_bad_and_the_session_goes_on() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 LOGIN alice pw\r\n");
    s(&mut conv, "a1 OK Logged in\r\n");
    let long = format!("a2 SEARCH TEXT {}\r\na3 NOOP\r\n", "x".repeat(70000));
    let out = c(&mut conv, &long);
    assert_eq!(out.0, "a3 NOOP\r\n");
    assert_eq!(
        out.1,
        "a2 BAD [LIMIT] Command line longer than 65536 octets\r\n"
    );
    assert_eq!(conv.take_control(), None);
}

#[test]
fn oversized_sync_literal_is_refused_before_the_continuation() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    let out = client(c(&mut conv, "a1 APPEND INBOX {4294967295}\r\n"));
    assert_eq!(
        out,
        "a1 NO [TOOBIG] Literal larger than the limit of 67108864 octets\r\n"
    );
    assert_eq!(conv.take_control(), None);
    assert_eq!(upstream(c(&mut conv, "a2 NOOP\r\n")), "a2 NOOP\r\n");
    let out = client(c(&mut conv, "a3 APPEND INBOX {99999999999}\r\n"));
    assert_eq!(out, "a3 NO [TOOBIG] Literal length out of range\r\n");
}

#[test]
fn oversized_nonsync_literal_closes() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    let out = client(c(&mut conv, "a1 APPEND INBOX {99999999+}\r\n"));
    assert!(out.starts_with("a1 NO [TOOBIG] "), "{out}");
    assert!(out.contains("* BYE "), "{out}");
    assert_eq!(conv.take_control(), Some(Control::Close { flush: true }));
}

#[test]
fn unparsable_command_gets_bad_and_is_not_relayed() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    let out = client(c(&mut conv, "a1 LOGIN \"alice pw\r\n"));
    assert!(out.starts_with("a1 BAD [CLIENTBUG] Syntax error"), "{out}");
    let (up, out) = c(&mut conv, "a2 NOOP\na3 NOOP\r\n");
    assert!(out.starts_with("a2 BAD [CLIENTBUG] "), "{out}");
    assert_eq!(up, "a3 NOOP\r\n");
}

#[test]
fn refused_command_with_sync_literal_does_not_eat_the_next_command() {
    let mut conv = logged_in();
    let out = client(c(&mut conv, "a1 COMPRESS {7}\r\n"));
    assert!(out.starts_with("a1 NO [CANNOT]"), "{out}");
    assert_eq!(upstream(c(&mut conv, "a2 NOOP\r\n")), "a2 NOOP\r\n");
}

#[test]
fn upstream_bye_then_eof_closes_after_flush() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 LOGOUT\r\n");
    assert_eq!(
        client(s(
            &mut conv,
            "* BYE Logging out\r\na1 OK Logout completed.\r\n"
        )),
        "* BYE Logging out\r\na1 OK Logout completed.\r\n"
    );
    conv.upstream_eof();
    assert_eq!(conv.take_control(), Some(Control::Close { flush: true }));
    assert_eq!(client(drain(&mut conv)), "");
}

#[test]
fn upstream_lost_between_responses_gets_bye() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 NOOP\r\n");
    conv.upstream_eof();
    assert_eq!(
        client(drain(&mut conv)),
        "* BYE [UNAVAILABLE] The connection to the mail server was lost\r\n"
    );
}

#[test]
fn upstream_lost_mid_literal_just_closes() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    let big = format!("* 1 FETCH (BODY[] {{200000}}\r\n{}", "x".repeat(1000));
    s(&mut conv, &big);
    conv.upstream_eof();
    assert_eq!(conv.take_control(), Some(Control::Close { flush: false }));
}

#[test]
fn large_literals_stream_without_being_held() {
    let mut conv = logged_in();
    c(&mut conv, "s1 SELECT INBOX\r\n");
    s(&mut conv, "s1 OK selected\r\n");
    c(&mut conv, "a1 FETCH 1 BODY[]\r\n");
    let head = "* 1 FETCH (BODY[] {1000000}\r\n";
    assert_eq!(client(s(&mut conv, head)), head);
    let chunk = "y".repeat(100_000);
    for _ in 0..10 {
        assert_eq!(client(s(&mut conv, &chunk)).len(), 100_000);
    }
    assert_eq!(
        client(s(&mut conv, ")\r\na1 OK Fetch completed.\r\n")),
        ")\r\na1 OK Fetch completed.\r\n"
    );
}

#[test]
fn client_half_close_between_commands_shuts_the_upstream_write_side() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 LOGOUT\r\n");
    conv.client_eof();
    assert_eq!(conv.take_control(), Some(Control::ShutdownUpstreamWrite));
}

#[test]
fn client_gone_mid_command_closes_both_legs() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    c(&mut conv, "a1 APPEND INBOX {100}\r\nabc");
    conv.client_eof();
    assert_eq!(conv.take_control(), Some(Control::Close { flush: false }));
}

#[test]
fn timeout_bye() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    conv.bye("Autologout; idle for too long");
    assert_eq!(
        client(drain(&mut conv)),
        "* BYE Autologout; idle for too long\r\n"
    );
    assert_eq!(conv.take_control(), Some(Control::Close { flush: true }));
}

#[test]
fn id_fields_reserved_for_proxies_are_removed_and_sync_literals_refused() {
    let mut conv = conv(ListenerTls::Implicit, true);
    drain(&mut conv);
    // C: a ID ("name" "mutt" "X-Originating-IP" "203.0.113.66")
    // S (upstream sees): a ID ("name" "mutt")
    assert_eq!(
        upstream(c(
            &mut conv,
            "a ID (\"name\" \"mutt\" \"X-Originating-IP\" \"203.0.113.66\")\r\n"
        )),
        "a ID (\"name\" \"mutt\")\r\n"
    );
    client(s(&mut conv, "* ID NIL\r\na OK ID completed\r\n"));
    // Nothing left: NIL, as RFC 2971 has no empty list.
    assert_eq!(
        upstream(c(&mut conv, "b ID (\"x-forward-user\" \"root\")\r\n")),
        "b ID NIL\r\n"
    );
    client(s(&mut conv, "b OK ID completed\r\n"));
    // A field name in a synchronizing literal would reach the server unread: refused before
    // the `+`, so the client never sends it.
    let out = client(c(&mut conv, "c ID ({16}\r\n"));
    assert!(out.starts_with("c BAD [CLIENTBUG] "), "{out}");
    // The session goes on.
    assert_eq!(upstream(c(&mut conv, "d NOOP\r\n")), "d NOOP\r\n");
    // A non-synchronizing literal arrives whole and is judged like a quoted string.
    assert_eq!(
        upstream(c(
            &mut conv,
            "e ID ({16+}\r\nx-originating-ip \"203.0.113.66\" \"os\" \"linux\")\r\n"
        )),
        "e ID (\"os\" \"linux\")\r\n"
    );
}
