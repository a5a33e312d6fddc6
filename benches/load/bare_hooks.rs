//! The `hooks` policy variant: the shipped policies' hooks, with the same filters, doing only
//! what the load needs to get the same bytes on the wire (the Archive rename of the namespace
//! policy). Measured beside `shipped`, it splits what the shipped policies cost into entering
//! Lua for each hooked message and the policies' own work.

use std::fmt::Write as _;
use std::path::Path;

/// `require_tls`'s hooks: the capability list and LOGIN/AUTHENTICATE.
const TLS: &str = r#"return { name = "bare_require_tls", commands = { "LOGIN", "AUTHENTICATE" },
  on_capability = function(ctx, caps) end,
  on_command = function(ctx, cmd) end }
"#;

/// `namespace`'s hooks: every mailbox-bearing command and response; only the Archive the
/// load names is translated, by a fixed rename.
const NAMESPACE: &str = r#"return { name = "bare_namespace",
  commands = { "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
    "LIST", "LSUB", "STATUS", "APPEND", "COPY", "MOVE", "UID COPY", "UID MOVE",
    "GETQUOTAROOT", "GETACL", "SETACL", "DELETEACL", "LISTRIGHTS", "MYRIGHTS",
    "GETMETADATA", "SETMETADATA", "OTHER" },
  responses = { "LIST", "LSUB", "STATUS", "NAMESPACE", "ACL", "MYRIGHTS", "LISTRIGHTS",
    "QUOTAROOT", "METADATA" },
  completes = { "LIST", "LSUB" },
  on_command = function(ctx, cmd)
    if cmd.mailboxes[1] == "INBOX.Archive" then cmd.mailboxes[1] = "Archive" end
  end,
  on_response = function(ctx, resp)
    if resp.mailboxes[1] == "Archive" then resp.mailboxes[1] = "INBOX.Archive" end
  end,
  on_complete = function(ctx, cmd, status) end }
"#;

/// `search_rate_limit`'s hook: SEARCH, SORT, THREAD and their UID forms.
const SEARCH: &str = r#"return { name = "bare_search_rate_limit",
  commands = { "SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD", "UID THREAD" },
  on_command = function(ctx, cmd) end }
"#;

/// Writes the three scripts into `dir`; their `[[policy]]` tables.
pub fn policy_toml(dir: &Path) -> Result<String, String> {
    let mut toml = String::new();
    for (file, source) in [
        ("bare_require_tls.lua", TLS),
        ("bare_namespace.lua", NAMESPACE),
        ("bare_search_rate_limit.lua", SEARCH),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, source).map_err(|e| format!("write {}: {e}", path.display()))?;
        let _ = writeln!(
            toml,
            "[[policy]]\nscript = {:?}\n",
            path.display().to_string()
        );
    }
    Ok(toml)
}
