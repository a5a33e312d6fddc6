//! What a hook sees of a command or a response: decoded mailbox names and the few fields
//! policies may change. The session turns changes back into edits of the original bytes.

use crate::imap::command::MailboxRole;

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
        match self.role {
            MailboxRole::Mailbox => "mailbox",
            MailboxRole::Reference => "reference",
            MailboxRole::Pattern => "pattern",
        }
    }
}

/// `cmd` in `on_command`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandView {
    pub tag: String,
    /// The fixed label, e.g. `UID SEARCH`.
    pub name: &'static str,
    pub mailboxes: Vec<MailboxSlot>,
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
        }
    }

    pub fn delimiter_changed(&self) -> bool {
        self.delimiter != self.original_delimiter
    }

    pub fn namespace_changed(&self) -> bool {
        self.namespace != self.original_namespace
    }
}
