//! The names of the keys imapgate keeps in Redis. Every one starts with the configured
//! prefix; the part a policy chooses comes last, so that whatever it contains (colons
//! included) cannot make two kinds of key collide.

/// A policy's own key (`imap.state.*`, shared counters).
pub fn plain(prefix: &str, key: &str) -> String {
    format!("{prefix}{key}")
}

/// A token bucket. The quota is part of the name because the in-process limiter keeps one
/// bucket per (rate, burst, key): the same key under two quotas is two buckets there too.
pub fn bucket(prefix: &str, key: &str, per_second: f64, burst: u32) -> String {
    // `{}` of an f64 is the shortest text that reads back as the same number, so every
    // instance names the same quota the same way.
    format!("{prefix}rate:{burst}:{per_second}:{key}")
}

/// The sorted set of one user's sessions across the cluster, by case-folded name (the
/// in-process limit compares names the same way).
pub fn sessions(prefix: &str, user_key: &str) -> String {
    format!("{prefix}sessions:{user_key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_the_prefix_and_kinds_do_not_collide() {
        assert_eq!(plain("ig:", "a:b"), "ig:a:b");
        assert_eq!(bucket("ig:", "alice", 0.5, 3), "ig:rate:3:0.5:alice");
        assert_eq!(bucket("ig:", "alice", 2.0, 3), "ig:rate:3:2:alice");
        assert_ne!(bucket("ig:", "x", 1.0, 2), bucket("ig:", "x", 1.0, 3));
        assert_eq!(sessions("ig:", "bob"), "ig:sessions:bob");
    }
}
