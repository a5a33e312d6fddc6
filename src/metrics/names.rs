//! Name rules for metrics that policies define.
//!
//! Stricter than the Prometheus grammar on purpose: lower-case snake_case only (promtool's lint
//! rejects camelCase, and the issue asks for a scrape promtool has nothing to say about), no
//! colons (reserved for recording rules), no leading `__` (reserved by Prometheus).

use super::MetricsError;

/// The prefix every policy-defined metric gets, so that a policy can never shadow or imitate a
/// built-in metric outside its namespace.
pub const POLICY_PREFIX: &str = "imapgate_policy_";

/// Longest name a policy may give (before the prefix), and longest label name.
const MAX_NAME: usize = 100;

/// Checks a metric or label name: `[a-z_][a-z0-9_]*`, not starting with `__`, at most 100
/// characters.
pub fn check_name(name: &str, what: &'static str) -> Result<(), MetricsError> {
    let invalid = |reason: &'static str| MetricsError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid("it is empty")),
        Some(c) if c.is_ascii_digit() => return Err(invalid("it starts with a digit")),
        _ => {}
    }
    if name.len() > MAX_NAME {
        return Err(invalid("it is longer than 100 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            "only lower-case ASCII letters, digits and `_` are allowed (snake_case)",
        ));
    }
    if name.starts_with("__") {
        return Err(invalid(
            "names starting with `__` are reserved by Prometheus",
        ));
    }
    Ok(())
}

/// Every name a family takes in the text format: a histogram also owns `_bucket`, `_sum` and
/// `_count`, so a gauge `x_count` beside a histogram `x` would make an ambiguous scrape.
pub fn exposed_names(name: &str, histogram: bool) -> Vec<String> {
    let mut names = vec![name.to_owned()];
    if histogram {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.push(format!("{name}{suffix}"));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "_a", "search_hits", "x9", "a__b"] {
            check_name(ok, "metric").unwrap();
        }
        for bad in ["", "9a", "A", "camelCase", "a-b", "a:b", "a b", "é", "__x"] {
            assert!(check_name(bad, "metric").is_err(), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(101), "metric").is_err());
    }

    #[test]
    fn histogram_names() {
        assert_eq!(exposed_names("x", false), ["x"]);
        assert_eq!(
            exposed_names("x", true),
            ["x", "x_bucket", "x_sum", "x_count"]
        );
    }
}
