//! State policies share across connections: keyed token buckets (governor) and counters with
//! expiry. Both are bounded, because their keys come from clients.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Keys kept per limiter before stale ones are swept.
const SWEEP_AT: usize = 100_000;
/// Most shared counters kept at once; beyond it, expired ones are swept and then new keys fail.
const MAX_COUNTERS: usize = 100_000;

/// A quota as a map key: the rate's bits and the burst.
type QuotaKey = (u64, u32);

/// One limiter per distinct (rate, burst), each keyed by the policy's key (user, address...).
#[derive(Default)]
pub struct Limiters {
    by_quota: Mutex<HashMap<QuotaKey, Arc<DefaultKeyedRateLimiter<String>>>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiters").finish_non_exhaustive()
    }
}

/// The answer of a limiter: allowed, or how long until it would be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateDecision {
    pub allowed: bool,
    pub wait: Duration,
}

impl Limiters {
    /// Takes one token for `key` from the bucket of `per_second` tokens a second holding at
    /// most `burst`. Returns `None` for a rate or burst that makes no bucket.
    pub fn check(&self, key: String, per_second: f64, burst: u32) -> Option<RateDecision> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return None;
        }
        let burst = NonZeroU32::new(burst)?;
        let period = Duration::try_from_secs_f64(1.0 / per_second).ok()?;
        let quota = Quota::with_period(period)?.allow_burst(burst);
        let limiter = {
            let mut map = self.by_quota.lock().ok()?;
            map.entry((per_second.to_bits(), burst.get()))
                .or_insert_with(|| Arc::new(DefaultKeyedRateLimiter::keyed(quota)))
                .clone()
        };
        if limiter.len() > SWEEP_AT {
            limiter.retain_recent();
        }
        Some(match limiter.check_key(&key) {
            Ok(()) => RateDecision {
                allowed: true,
                wait: Duration::ZERO,
            },
            Err(not_until) => RateDecision {
                allowed: false,
                wait: not_until.wait_time_from(self.clock.now()),
            },
        })
    }
}

/// Counters shared by all connections, each with an expiry (`imap.shared` in Lua).
#[derive(Debug, Default)]
pub struct SharedCounters {
    map: Mutex<HashMap<String, (f64, Option<Instant>)>>,
}

impl SharedCounters {
    pub fn get(&self, key: &str) -> Option<f64> {
        let map = self.map.lock().ok()?;
        match map.get(key) {
            Some((v, expiry)) if expiry.is_none_or(|e| e > Instant::now()) => Some(*v),
            _ => None,
        }
    }

    /// Sets a value; `ttl` of `None` keeps it until the process ends. False when full.
    pub fn set(&self, key: &str, value: f64, ttl: Option<Duration>) -> bool {
        let Ok(mut map) = self.map.lock() else {
            return false;
        };
        if !make_room(&mut map, key) {
            return false;
        }
        map.insert(key.to_string(), (value, ttl.map(|t| Instant::now() + t)));
        true
    }

    /// Adds `by` (an expired or missing counter starts at 0) and returns the new value. A new
    /// or expired counter gets the expiry `ttl`; a live one keeps its own.
    pub fn incr(&self, key: &str, by: f64, ttl: Option<Duration>) -> Option<f64> {
        let mut map = self.map.lock().ok()?;
        let now = Instant::now();
        if let Some((v, expiry)) = map.get_mut(key)
            && expiry.is_none_or(|e| e > now)
        {
            *v += by;
            return Some(*v);
        }
        if !make_room(&mut map, key) {
            return None;
        }
        map.insert(key.to_string(), (by, ttl.map(|t| now + t)));
        Some(by)
    }
}

fn make_room(map: &mut HashMap<String, (f64, Option<Instant>)>, key: &str) -> bool {
    if map.len() < MAX_COUNTERS || map.contains_key(key) {
        return true;
    }
    let now = Instant::now();
    map.retain(|_, (_, expiry)| expiry.is_none_or(|e| e > now));
    map.len() < MAX_COUNTERS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses_with_a_wait() {
        let l = Limiters::default();
        for _ in 0..3 {
            assert!(l.check("alice".into(), 1.0, 3).is_some_and(|d| d.allowed));
        }
        let d = l.check("alice".into(), 1.0, 3).expect("valid quota");
        assert!(!d.allowed);
        assert!(d.wait > Duration::ZERO && d.wait <= Duration::from_secs(1));
        // Keys are independent.
        assert!(l.check("bob".into(), 1.0, 3).is_some_and(|d| d.allowed));
        assert!(l.check("x".into(), 0.0, 3).is_none());
        assert!(l.check("x".into(), 1.0, 0).is_none());
    }

    #[test]
    fn counters_expire() {
        let c = SharedCounters::default();
        assert_eq!(c.incr("k", 1.0, Some(Duration::from_millis(30))), Some(1.0));
        assert_eq!(c.incr("k", 2.0, None), Some(3.0));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.get("k"), None);
        assert_eq!(c.incr("k", 5.0, None), Some(5.0));
        assert!(c.set("j", 7.0, None));
        assert_eq!(c.get("j"), Some(7.0));
    }
}
