//! LIST/LSUB wildcard matching (RFC 3501 section 6.3.8): `*` matches anything, `%` anything
//! but the hierarchy delimiter.
//!
//! Patterns come from clients, so matching must take time linear in the name whatever the
//! pattern: a backtracking matcher (a Lua pattern, a naive recursive glob) is exponential in the
//! number of wildcards, and one call cannot be interrupted. The pattern is translated into a
//! `regex` (finite automata, no backtracking) with bounded compiled size; a pattern too big to
//! compile within the bound is an error, which callers treat as "refuse", never as "match".

use regex::{Regex, RegexBuilder};

/// Largest compiled form of one pattern: a client pattern is at most one command line long, so
/// this only refuses absurd ones.
const SIZE_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListMatchError {
    #[error("LIST pattern too complex to match")]
    TooComplex,
}

/// A compiled client pattern.
#[derive(Clone, Debug)]
pub struct ListPattern {
    regex: Regex,
    delimiter: Option<char>,
}

impl ListPattern {
    /// ```abnf
    /// list-mailbox = 1*list-char / string
    /// list-char    = ATOM-CHAR / list-wildcards / resp-specials
    /// list-wildcards = "%" / "*"
    /// ```
    /// `pattern` is the decoded pattern (reference already prepended); `delimiter` the
    /// hierarchy delimiter `%` stops at (`None`: a flat namespace, `%` is `*`).
    pub fn new(pattern: &str, delimiter: Option<char>) -> Result<ListPattern, ListMatchError> {
        let pattern = inbox_folded(pattern, delimiter, true);
        let mut re = String::with_capacity(pattern.len() * 2 + 8);
        re.push_str("\\A");
        let mut last_star = false;
        for c in pattern.chars() {
            match c {
                // Runs of wildcards with a `*` among them are one `*`: keeps the automaton small.
                '*' => {
                    if !last_star {
                        re.push_str("(?s:.*)");
                        last_star = true;
                    }
                }
                '%' if last_star => {}
                '%' => match delimiter {
                    Some(d) => {
                        re.push_str("[^");
                        re.push_str(&regex::escape(d.encode_utf8(&mut [0; 4])));
                        re.push_str("]*");
                    }
                    None => {
                        re.push_str("(?s:.*)");
                        last_star = true;
                    }
                },
                c => {
                    last_star = false;
                    re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4])));
                }
            }
        }
        re.push_str("\\z");
        let regex = RegexBuilder::new(&re)
            .size_limit(SIZE_LIMIT)
            .dfa_size_limit(SIZE_LIMIT)
            .build()
            .map_err(|_| ListMatchError::TooComplex)?;
        Ok(ListPattern { regex, delimiter })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.regex
            .is_match(&inbox_folded(name, self.delimiter, false))
    }
}

/// Whether `name` matches `pattern` (see [`ListPattern::new`]).
pub fn list_match(
    pattern: &str,
    name: &str,
    delimiter: Option<char>,
) -> Result<bool, ListMatchError> {
    Ok(ListPattern::new(pattern, delimiter)?.matches(name))
}

/// INBOX is case-insensitive (RFC 3501 section 5.1): a leading `INBOX` component is written
/// in upper case, in names and in patterns alike. In a pattern the component may also be
/// followed by a wildcard (`inbox*` means `INBOX*`).
fn inbox_folded(s: &str, delimiter: Option<char>, pattern: bool) -> std::borrow::Cow<'_, str> {
    let Some(head) = s.get(..5) else {
        return s.into();
    };
    if !head.eq_ignore_ascii_case("INBOX") || head == "INBOX" {
        return s.into();
    }
    let rest = &s[5..];
    let next = rest.chars().next();
    let ends_component = match next {
        None => true,
        Some(c) => Some(c) == delimiter || (pattern && (c == '*' || c == '%')),
    };
    if ends_component {
        format!("INBOX{rest}").into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        list_match(pattern, name, Some('.')).expect("compiles")
    }

    #[test]
    fn wildcards() {
        assert!(m("*", "INBOX.a.b"));
        assert!(m("%", "INBOX"));
        assert!(!m("%", "INBOX.a"));
        assert!(m("INBOX.%", "INBOX.a"));
        assert!(!m("INBOX.%", "INBOX.a.b"));
        assert!(m("INBOX.*", "INBOX.a.b"));
        assert!(m("*b", "INBOX.a.b"));
        assert!(m("I%X", "INBOX"));
        assert!(!m("INBOX.x", "INBOX.y"));
        assert!(m("a[b]c", "a[b]c"), "regex metacharacters are literal");
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "axb"), "the delimiter is not a regex dot");
        assert!(m("", "") && !m("", "x"));
    }

    #[test]
    fn inbox_is_case_insensitive() {
        assert!(m("inbox", "INBOX"));
        assert!(m("INBOX", "inbox"));
        assert!(m("Inbox.%", "INBOX.a"));
        assert!(m("inbox*", "INBOX.a"));
        assert!(!m("inboxes", "INBOXES"), "only the INBOX component");
    }

    #[test]
    fn flat_namespace_percent_is_star() {
        assert!(list_match("%", "a.b", None).expect("compiles"));
    }

    #[test]
    fn pathological_patterns_stay_linear() {
        // Exponential for a backtracking matcher; here one pass over the name.
        let pattern = format!("{}z", "*".repeat(300));
        let name = "a".repeat(100_000);
        assert!(!m(&pattern, &name));
        let pattern = format!("{}z", "%*".repeat(300));
        assert!(!m(&pattern, &name));
        let pattern = format!("{}z", "a%".repeat(2000));
        assert!(!list_match(&pattern, &name, Some('.')).unwrap_or(false));
    }
}
