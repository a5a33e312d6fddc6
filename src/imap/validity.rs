//! Which commands are valid in which connection state (RFC 3501 sections 3 and 6, RFC 9051).
//!
//! A proxy that forwards a command the server is not in the state to accept lets the server
//! decide how to read what follows: Dovecot refuses a pre-login IDLE and then runs the next
//! line, which the proxy took for IDLE's `DONE`. So imapgate answers such commands itself and
//! never forwards them; before authentication only the not-authenticated commands reach the
//! server at all.

use super::command::{Command, CommandKind};
use super::syntax::Token;

/// The IMAP connection state (RFC 9051 section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapState {
    NotAuthenticated,
    Authenticated,
    Selected,
    Logout,
}

impl ImapState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImapState::NotAuthenticated => "not_authenticated",
            ImapState::Authenticated => "authenticated",
            ImapState::Selected => "selected",
            ImapState::Logout => "logout",
        }
    }
}

/// Why a command is not valid now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{0} is not valid before authentication")]
    NotAuthenticated(&'static str),
    #[error("{0} is only valid before authentication")]
    AlreadyAuthenticated(&'static str),
    #[error("{0} needs a selected mailbox")]
    NotSelected(&'static str),
    #[error("UID is not valid before {0}")]
    NotAUidCommand(String),
    #[error("Binary literals (~{{n}}) need the BINARY extension, which the server does not offer")]
    BinaryLiteral,
    #[error("The connection is logging out")]
    LoggingOut,
    #[error(
        "ID through this proxy takes quoted strings or non-synchronizing literals, not synchronizing literals"
    )]
    IdSyncLiteral,
}

/// What the session knows of the server that changes which commands are valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerOffers {
    /// BINARY (RFC 3516) is advertised: `~{n}` literals may be sent.
    pub binary: bool,
}

/// Whether `command` may be forwarded in `state`; `binary_literal` when the command (or the
/// literal the framer cut it at) uses `~{n}`.
pub fn check(
    state: ImapState,
    command: &Command,
    binary_literal: bool,
    offers: ServerOffers,
) -> Result<(), Invalid> {
    use CommandKind as K;
    let kind = command.name.kind;
    if command.name.uid && !kind.takes_uid() {
        return Err(Invalid::NotAUidCommand(command.display_name().into_owned()));
    }
    let label = command.name.label();
    if state == ImapState::Logout {
        return Err(Invalid::LoggingOut);
    }
    let any_state = matches!(kind, K::Capability | K::Noop | K::Logout | K::Id);
    let not_authenticated_only = matches!(kind, K::Starttls | K::Authenticate | K::Login);
    let selected_only = command.name.uid
        || matches!(
            kind,
            K::Check
                | K::Close
                | K::Unselect
                | K::Expunge
                | K::Search
                | K::Fetch
                | K::Store
                | K::Copy
                | K::Move
                | K::Sort
                | K::Thread
        );
    match state {
        ImapState::NotAuthenticated if !(any_state || not_authenticated_only) => {
            return Err(Invalid::NotAuthenticated(display(command, label)));
        }
        ImapState::Authenticated | ImapState::Selected if not_authenticated_only => {
            return Err(Invalid::AlreadyAuthenticated(label));
        }
        ImapState::Authenticated if selected_only => {
            return Err(Invalid::NotSelected(label));
        }
        _ => {}
    }
    if binary_literal && !offers.binary {
        return Err(Invalid::BinaryLiteral);
    }
    Ok(())
}

/// One ID field: its name and its value (`None` for NIL).
pub type IdField = (Vec<u8>, Option<Vec<u8>>);

/// The fields of an ID command, in order; items that are not a string field name are left
/// out (the server would refuse them).
///
/// ```text
/// id-params-list = "(" *(string SP nstring) ")" / nil      ; RFC 2971
/// ```
pub fn id_fields(command: &Command) -> Vec<IdField> {
    let Some(items) = command.args.first().and_then(|t| t.items()) else {
        return Vec::new();
    };
    items
        .chunks(2)
        .filter_map(|pair| {
            let key = pair.first()?.string(&command.raw)?.into_owned();
            // NIL reads as an atom in commands; in ID it is "no value".
            let value = pair
                .get(1)
                .filter(|v| !v.is_atom(&command.raw, "NIL"))
                .and_then(|v| v.string(&command.raw))
                .map(|v| v.into_owned());
            Some((key, value))
        })
        .collect()
}

/// ID fields a server believes only from a trusted proxy (Dovecot's
/// `login_trusted_networks`): the client's address and port, the session id, forwarded
/// fields. From a client through imapgate they would be believed as imapgate's own word.
const PROXY_ID_FIELDS: &[&str] = &[
    "x-originating-ip",
    "x-originating-port",
    "x-connected-ip",
    "x-connected-port",
    "x-proxy-ttl",
    "x-session-id",
    "x-session-ext-id",
    "x-client-transport",
    "x-forward-",
];

/// Whether `key` names an ID field only a proxy may send (any case).
pub fn is_proxy_id_field(key: &[u8]) -> bool {
    let key = String::from_utf8_lossy(key).to_ascii_lowercase();
    PROXY_ID_FIELDS
        .iter()
        .any(|f| key == *f || (f.ends_with('-') && key.starts_with(f)))
}

/// An ID command's fields without those only a proxy may send, or `None` when it has none
/// of them (the command goes on unchanged). The client's other fields stay: removing the
/// forged ones loses the client nothing it was entitled to, refusing the whole ID would.
pub fn id_without_proxy_fields(command: &Command) -> Option<Vec<IdField>> {
    let fields = id_fields(command);
    if !fields.iter().any(|(key, _)| is_proxy_id_field(key)) {
        return None;
    }
    Some(
        fields
            .into_iter()
            .filter(|(key, _)| !is_proxy_id_field(key))
            .collect(),
    )
}

/// The label, or "this command" for an unknown one (its name is the client's, not ours to
/// echo in a fixed-set field).
fn display(command: &Command, label: &'static str) -> &'static str {
    if command.name.kind == CommandKind::Other {
        "this command"
    } else {
        label
    }
}

/// Whether any literal in the tokens is a binary literal (`~{n}`).
pub fn has_binary_literal(tokens: &[Token]) -> bool {
    tokens.iter().any(|t| match t {
        Token::Literal { literal, .. } => literal.binary,
        Token::List { items, .. } => has_binary_literal(items),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::command::parse_command;
    use bytes::Bytes;

    fn check_line(state: ImapState, line: &str) -> Result<(), Invalid> {
        let command = parse_command(Bytes::copy_from_slice(line.as_bytes())).expect("parses");
        let binary = has_binary_literal(&command.args);
        check(state, &command, binary, ServerOffers::default())
    }

    use ImapState::*;

    #[test]
    fn before_login_only_the_not_authenticated_commands() {
        for ok in [
            "a CAPABILITY\r\n",
            "a NOOP\r\n",
            "a LOGOUT\r\n",
            "a ID NIL\r\n",
            "a STARTTLS\r\n",
            "a LOGIN u p\r\n",
            "a AUTHENTICATE PLAIN\r\n",
        ] {
            assert_eq!(check_line(NotAuthenticated, ok), Ok(()), "{ok}");
        }
        for bad in [
            "a IDLE\r\n",
            "a SELECT INBOX\r\n",
            "a ENABLE UTF8=ACCEPT\r\n",
            "a XCLIENT ADDR=1.2.3.4\r\n",
            "a UID LOGIN u p\r\n",
            "a UID AUTHENTICATE PLAIN\r\n",
            "LOGIN user pass\r\n",
        ] {
            assert!(check_line(NotAuthenticated, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn after_login() {
        assert_eq!(
            check_line(Authenticated, "a AUTHENTICATE PLAIN\r\n"),
            Err(Invalid::AlreadyAuthenticated("AUTHENTICATE"))
        );
        assert!(check_line(Selected, "a LOGIN u p\r\n").is_err());
        assert_eq!(
            check_line(Authenticated, "a FETCH 1 FLAGS\r\n"),
            Err(Invalid::NotSelected("FETCH"))
        );
        assert!(check_line(Authenticated, "a UID FETCH 1 FLAGS\r\n").is_err());
        assert_eq!(check_line(Selected, "a UID FETCH 1 FLAGS\r\n"), Ok(()));
        assert_eq!(check_line(Authenticated, "a IDLE\r\n"), Ok(()));
        assert_eq!(check_line(Authenticated, "a XYZZY\r\n"), Ok(()));
        assert!(matches!(
            check_line(Selected, "a UID XYZZY 1\r\n"),
            Err(Invalid::NotAUidCommand(_))
        ));
    }

    fn parsed(line: &str) -> Command {
        parse_command(Bytes::copy_from_slice(line.as_bytes())).unwrap()
    }

    #[test]
    fn proxy_id_fields_are_removed_and_the_rest_kept() {
        let id = parsed("a ID (\"name\" \"mutt\")\r\n");
        assert_eq!(
            check(NotAuthenticated, &id, false, ServerOffers::default()),
            Ok(())
        );
        assert_eq!(id_without_proxy_fields(&id), None);
        let field =
            |k: &str, v: Option<&str>| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()));
        for (line, kept) in [
            (
                "a ID (\"name\" \"x\" \"X-Originating-IP\" \"203.0.113.7\")\r\n",
                vec![field("name", Some("x"))],
            ),
            ("a ID (\"x-forward-user\" \"root\")\r\n", vec![]),
            (
                "a ID ({12+}\r\nx-session-id \"abc\" \"os\" NIL)\r\n",
                vec![field("os", None)],
            ),
        ] {
            assert_eq!(id_without_proxy_fields(&parsed(line)), Some(kept), "{line}");
        }
    }

    #[test]
    fn binary_literals_need_binary() {
        assert_eq!(
            check_line(Authenticated, "a APPEND INBOX ~{3+}\r\nabc\r\n"),
            Err(Invalid::BinaryLiteral)
        );
        let command =
            parse_command(Bytes::from_static(b"a APPEND INBOX ~{3+}\r\nabc\r\n")).expect("parses");
        let offers = ServerOffers { binary: true };
        assert_eq!(check(Authenticated, &command, true, offers), Ok(()));
        assert!(check(NotAuthenticated, &command, true, offers).is_err());
    }
}
