//! What a hook sees of a command or a response: decoded mailbox names and the few fields
//! policies may change. The session turns changes back into edits of the original bytes.

use crate::imap::command::MailboxRole;
use crate::imap::response::Status;

/// One mailbox-bearing argument, decoded to UTF-8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxSlot {
    pub role: MailboxRole,
    pub name: String,
    original: String,
}

impl MailboxSlot {
    pub fn new(role: MailboxRole, name: String) -> MailboxSlot {
        MailboxSlot {
            role,
            original: name.clone(),
            name,
        }
    }

    pub fn changed(&self) -> bool {
        self.name != self.original
    }

    /// The name as the message carried it, before any policy changed it.
    pub fn original(&self) -> &str {
        &self.original
    }

    pub fn role_str(&self) -> &'static str {
        role_name(self.role)
    }
}

/// `cmd.roles[i]`: what the mailbox argument is to its command.
pub(crate) fn role_name(role: MailboxRole) -> &'static str {
    match role {
        MailboxRole::Mailbox => "mailbox",
        MailboxRole::Reference => "reference",
        MailboxRole::Pattern => "pattern",
        MailboxRole::Url => "url",
    }
}

/// Every role [`role_name`] names.
pub(crate) const ROLES: [MailboxRole; 4] = [
    MailboxRole::Mailbox,
    MailboxRole::Reference,
    MailboxRole::Pattern,
    MailboxRole::Url,
];

/// `cmd` in `on_command`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandView {
    pub tag: String,
    /// The fixed label, e.g. `UID SEARCH`.
    pub name: &'static str,
    pub mailboxes: Vec<MailboxSlot>,
    /// How long delay verdicts have held the command so far (0 when first judged): a delayed
    /// command is judged again, from its original form, when its delay ends.
    pub delayed_ms: u64,
    /// LOGIN and AUTHENTICATE: the user name the client gave (AUTHENTICATE: read from a SASL
    /// initial response that names one), for throttling; never the secret. `None` otherwise.
    pub user: Option<String>,
}

/// One namespace descriptor: `("prefix" "delimiter")`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceEntry {
    pub prefix: String,
    /// `None` for NIL (a flat namespace).
    pub delimiter: Option<String>,
}

/// The three namespace classes of RFC 2342; an empty list is NIL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub personal: Vec<NamespaceEntry>,
    pub other: Vec<NamespaceEntry>,
    pub shared: Vec<NamespaceEntry>,
}

/// `resp` in `on_response`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseView {
    /// The untagged kind, e.g. `LIST`.
    pub kind: &'static str,
    pub mailboxes: Vec<MailboxSlot>,
    /// LIST/LSUB hierarchy delimiter (`None` for NIL).
    pub delimiter: Option<String>,
    original_delimiter: Option<String>,
    /// NAMESPACE data.
    pub namespace: Option<Namespace>,
    original_namespace: Option<Namespace>,
    /// LIST/LSUB mailbox attributes as written (`\HasNoChildren`); empty for other kinds.
    pub flags: Vec<String>,
    original_flags: Vec<String>,
}

impl ResponseView {
    pub fn new(
        kind: &'static str,
        mailboxes: Vec<MailboxSlot>,
        delimiter: Option<String>,
        namespace: Option<Namespace>,
    ) -> ResponseView {
        ResponseView {
            kind,
            mailboxes,
            original_delimiter: delimiter.clone(),
            delimiter,
            original_namespace: namespace.clone(),
            namespace,
            flags: Vec::new(),
            original_flags: Vec::new(),
        }
    }

    /// The LIST/LSUB mailbox attributes of the response.
    pub fn with_flags(mut self, flags: Vec<String>) -> ResponseView {
        self.original_flags.clone_from(&flags);
        self.flags = flags;
        self
    }

    /// Whether a policy changed the attributes (each then is `\atom` or an atom).
    pub fn flags_changed(&self) -> bool {
        self.flags != self.original_flags
    }

    pub fn delimiter_changed(&self) -> bool {
        self.delimiter != self.original_delimiter
    }

    pub fn namespace_changed(&self) -> bool {
        self.namespace != self.original_namespace
    }
}

/// A mailbox attribute a policy may write: `\` atom, or an atom (RFC 3501 `flag-extension`,
/// `flag-keyword`); ATOM-CHAR excludes `(){ %*"\]`, space and controls.
pub(crate) fn is_list_flag(flag: &str) -> bool {
    let atom = flag.strip_prefix('\\').unwrap_or(flag);
    // A bare NIL would read as nil, not as an atom.
    !atom.is_empty()
        && !flag.eq_ignore_ascii_case("NIL")
        && atom.bytes().all(|b| {
            (0x21..0x7f).contains(&b)
                && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
        })
}

#[cfg(test)]
mod tests {
    use super::is_list_flag;

    #[test]
    fn list_flags() {
        for ok in ["\\HasChildren", "\\Noselect", "$Junk", "x"] {
            assert!(is_list_flag(ok), "{ok}");
        }
        for bad in [
            "", "\\", "\\\\x", "a b", "a]", "a)", "\\x\r\n", "*", "\\Has\"C", "nil",
        ] {
            assert!(!is_list_flag(bad), "{bad:?}");
        }
    }
}

/// What `on_complete` sees: `cmd.tag`, `cmd.name`, the status, and `cmd.code`, the tagged
/// response's code (`AUTHENTICATIONFAILED`, `UNAVAILABLE`...; upper case), if it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompleteView<'a> {
    pub tag: &'a str,
    pub name: &'static str,
    pub status: Status,
    pub code: Option<&'a str>,
}

/// What `on_login` sees: `login.user` (the name the client gave), `login.mechanism`
/// (`LOGIN`, or the SASL mechanism) and `login.delayed_ms`. Never the secret.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginView {
    pub user: Option<String>,
    pub mechanism: String,
    /// How long delay verdicts have held this login so far (0 when first judged): a delayed
    /// login is judged again when its delay ends, as a delayed command is.
    pub delayed_ms: u64,
}

/// `on_complete`'s view, owned (a completion's hook may wait).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    pub tag: String,
    pub name: &'static str,
    pub status: Status,
    pub code: Option<String>,
}

impl From<&CompleteView<'_>> for Completed {
    fn from(v: &CompleteView<'_>) -> Completed {
        Completed {
            tag: v.tag.to_string(),
            name: v.name,
            status: v.status,
            code: v.code.map(str::to_string),
        }
    }
}
