//! A bound on the work of one Lua pattern function (`string.find`, `match`, `gmatch`, `gsub`),
//! checked before the call.
//!
//! Lua's matcher backtracks: `("x*"):rep(20) .. "y"` on a few hundred bytes runs for longer than
//! the universe, inside one C call that the instruction budget (a count hook between VM
//! instructions) cannot interrupt. The policy-facing pattern functions therefore refuse, with an
//! error, any call whose worst case exceeds [`MAX_STEPS`].
//!
//! The bound follows lstrlib.c. Call a *level* every item at which the matcher may try more than
//! one subject position or scan the subject: a single-character class with `*`, `+`, `-` or `?`,
//! a `%bxy`, and a back-reference `%1`-`%9`. Every recursive `match` call is fixed by the subject
//! positions chosen at the levels above it, and those positions never decrease; with `n` the
//! subject length, `q` the levels and `s0` the start position, the calls are at most the
//! non-decreasing tuples `s0 <= s1 <= ... <= sj` over `n + 1` positions, summed over the depths
//! `j`: `C(n + q + 2, q + 1) - 1` (hockey-stick identity), or `C(n + q + 1, q)` when a leading
//! `^` fixes `s0`. One call walks at most the `m` pattern bytes and, when it ends at a level (so
//! only the calls above the deepest level), one scan of at most `n + 1` subject bytes. `gsub` and `gmatch` start each new match where the last
//! ended, so all their attempts together are within the same tuples. Patterns without magic
//! characters have no levels: `(n + 1) * (m + 1)`.

/// Largest worst-case step count a pattern call may have: tens of milliseconds on a slow core,
/// well inside the default `time_ms` of 100.
pub const MAX_STEPS: u128 = 20_000_000;

/// The refusal, as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("pattern too complex for a subject of {subject} bytes")]
pub struct TooComplex {
    pub subject: usize,
}

/// Refuses a call whose worst case exceeds [`MAX_STEPS`]. `anchor`: the function treats a
/// leading `^` as an anchor (`find`, `match`, `gsub`; not `gmatch`).
pub fn check(subject: usize, pattern: &[u8], anchor: bool) -> Result<(), TooComplex> {
    if steps(subject, pattern, anchor) > MAX_STEPS {
        Err(TooComplex { subject })
    } else {
        Ok(())
    }
}

/// The worst-case steps of matching `pattern` against a subject of `subject` bytes, saturated
/// just above [`MAX_STEPS`].
pub fn steps(subject: usize, pattern: &[u8], anchor: bool) -> u128 {
    let Levels {
        anchored,
        levels,
        trailing,
    } = levels(pattern, anchor);
    let n = subject as u128;
    let m = pattern.len() as u128;
    let q = u128::from(levels);
    // Calls at every depth, and at the depths above the last level (the ones that scan).
    let (calls, scanning) = if anchored {
        let above = if q == 0 { 0 } else { binomial(n + q, q - 1) };
        (binomial(n + q + 1, q), above)
    } else {
        (
            binomial(n + q + 2, q + 1).saturating_sub(1),
            binomial(n + q + 1, q).saturating_sub(1),
        )
    };
    calls
        .saturating_mul(m + 1)
        .saturating_add(scanning.saturating_mul(n + 1))
        .saturating_add(if trailing { n + 1 } else { 0 })
        .min(MAX_STEPS + 1)
}

/// What [`steps`] needs to know of a pattern.
#[derive(Debug, PartialEq, Eq)]
struct Levels {
    anchored: bool,
    levels: u32,
    /// The pattern ends with a quantified item (then only `)`): reaching it means the match
    /// succeeds with its first choice, so it never backtracks; its scans end where the match
    /// ends, where `gmatch`/`gsub` go on, so they add up to one pass over the subject.
    trailing: bool,
}

/// Whether the pattern is anchored, and its levels. A malformed pattern is counted up to the
/// malformation: the matcher raises its error on reaching it, so nothing after it can branch.
fn levels(p: &[u8], anchor: bool) -> Levels {
    let anchored = anchor && p.first() == Some(&b'^');
    let mut i = usize::from(anchored);
    let mut q: u32 = 0;
    let mut trailing = false;
    while i < p.len() {
        let end = match p[i] {
            b'(' | b')' => {
                i += 1;
                continue;
            }
            b'$' if i + 1 == p.len() => break,
            b'%' => match p.get(i + 1) {
                None => break,
                Some(b'b') => {
                    q = q.saturating_add(1);
                    i += 4;
                    continue;
                }
                Some(b'f') => {
                    if p.get(i + 2) != Some(&b'[') {
                        break;
                    }
                    match set_end(p, i + 2) {
                        Some(e) => {
                            i = e;
                            continue;
                        }
                        None => break,
                    }
                }
                Some(d) if d.is_ascii_digit() => {
                    q = q.saturating_add(1);
                    i += 2;
                    continue;
                }
                Some(_) => i + 2,
            },
            b'[' => match set_end(p, i) {
                Some(e) => e,
                None => break,
            },
            _ => i + 1,
        };
        if matches!(p.get(end), Some(b'*' | b'+' | b'-' | b'?')) {
            if p[end + 1..].iter().all(|&b| b == b')') {
                trailing = true;
                break;
            }
            q = q.saturating_add(1);
            i = end + 1;
        } else {
            i = end;
        }
    }
    Levels {
        anchored,
        levels: q,
        trailing,
    }
}

/// The index after the `]` closing the set that opens at `open` (lstrlib.c `classEnd`).
fn set_end(p: &[u8], open: usize) -> Option<usize> {
    let mut i = open + 1;
    if p.get(i) == Some(&b'^') {
        i += 1;
    }
    loop {
        let c = *p.get(i)?;
        i += 1;
        if c == b'%' {
            p.get(i)?;
            i += 1;
        }
        if p.get(i) == Some(&b']') {
            return Some(i + 1);
        }
    }
}

/// `C(n, k)`, saturated just above [`MAX_STEPS`]. The partial products `C(n - k + i, i)` grow
/// with `i`, so stopping at the cap is exact about being over it.
fn binomial(n: u128, k: u128) -> u128 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 1..=k {
        c = c * (n - k + i) / i;
        if c > MAX_STEPS {
            return MAX_STEPS + 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_lstrlib() {
        let l = |p: &[u8], anchor| {
            let l = levels(p, anchor);
            (l.anchored, l.levels, l.trailing)
        };
        assert_eq!(l(b"abc", true), (false, 0, false));
        assert_eq!(l(b"^a.*b$", true), (true, 1, false));
        assert_eq!(l(b"^a.*b$", false), (false, 1, false));
        assert_eq!(l(b"%a+%d-x?", true), (false, 2, true));
        assert_eq!(l(b"%a+%d-x?$", true), (false, 3, false));
        assert_eq!(l(b"[%]*]*x", true), (false, 1, false));
        assert_eq!(l(b"[^]]+x", true), (false, 1, false));
        assert_eq!(l(b"%b()%1", true), (false, 2, false));
        assert_eq!(l(b"%f[%w]%w+", true), (false, 0, true));
        assert_eq!(l(b"%*%+%-%?", true), (false, 0, false));
        assert_eq!(l(b"()a*()", true), (false, 1, false));
        assert_eq!(l(b"(a*)", true), (false, 0, true));
        // utf8.charpattern
        assert_eq!(l(b"[\0-\x7F\xC2-\xFD][\x80-\xBF]*", true), (false, 0, true));
        // Malformed: counted up to the malformation.
        assert_eq!(l(b"x*[abc", true), (false, 1, false));
        assert_eq!(l(b"x*%", true), (false, 1, false));
        assert_eq!(l(b"x*%f", true), (false, 1, false));
    }

    #[test]
    fn binomials() {
        assert_eq!(binomial(5, 2), 10);
        assert_eq!(binomial(5, 0), 1);
        assert_eq!(binomial(2, 5), 0);
        assert_eq!(binomial(1000, 500), MAX_STEPS + 1);
    }

    #[test]
    fn ordinary_uses_pass() {
        // Plain and single-class searches are linear, even on a megabyte.
        assert!(check(1 << 20, b"%.", true).is_ok());
        assert!(check(1 << 20, b"INBOX", true).is_ok());
        // Anchored splits of names and addresses.
        assert!(check(200, b"^([^@]+)@(.+)$", true).is_ok());
        assert!(check(1000, b"^INBOX%.(.*)$", true).is_ok());
        assert!(check(100, b"(.-)%.(.*)", true).is_ok());
        // Iterating over UTF-8 characters is linear.
        assert!(check(1 << 20, b"[\0-\x7F\xC2-\xFD][\x80-\xBF]*", false).is_ok());
    }

    #[test]
    fn backtracking_bombs_are_refused() {
        let bomb = [b"x*".repeat(20), b"y".to_vec()].concat();
        assert_eq!(
            check(10_000, &bomb, true),
            Err(TooComplex { subject: 10_000 })
        );
        assert!(check(100, &bomb, true).is_err());
        assert!(check(5000, b"a.*b", true).is_err());
        assert_eq!(
            TooComplex { subject: 7 }.to_string(),
            "pattern too complex for a subject of 7 bytes"
        );
    }
}
