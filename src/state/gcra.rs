//! The shared token bucket: GCRA (the generic cell rate algorithm, as the in-process limiter
//! `governor` implements it) evaluated by one server-side script, so that a decision is one
//! round trip and atomic however many instances ask at once.
//!
//! The clock is the server's (`TIME`), so instances whose clocks differ still share one
//! bucket correctly. The key holds the theoretical arrival time (TAT) in microseconds and
//! expires when the bucket would be full again, so idle users cost nothing.
//!
//! Same arithmetic as `governor`: emission interval `t = 1 / rate`, tolerance
//! `tau = t * (burst - 1)`; a request at `now` is allowed when `now >= tat - tau`, and then
//! `tat = max(tat, now) + t`. A refused request changes nothing and is told to wait
//! `tat - tau - now`.

use std::time::Duration;

use redis::Script;

use super::StateError;

/// KEYS[1]: the bucket. ARGV[1]: emission interval in µs, ARGV[2]: burst.
/// Returns `{1, 0}` (allowed) or `{0, wait_us}`.
///
/// Redis's Lua prints numbers with 14 significant digits, too few for microseconds since
/// 1970 (16 digits), hence `%.0f` wherever one is written back.
const SCRIPT: &str = r"
local t = tonumber(ARGV[1])
local tau = t * (tonumber(ARGV[2]) - 1)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local earliest = tat - tau
if now < earliest then
  return {0, string.format('%.0f', earliest - now)}
end
local next = tat + t
local ttl_ms = math.ceil((next - now) / 1000)
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', string.format('%.0f', ttl_ms))
return {1, '0'}
";

pub fn script() -> Script {
    Script::new(SCRIPT)
}

/// The script's arguments for a quota: the emission interval in whole microseconds (at least
/// one) and the burst. The same quotas the in-process limiter refuses are refused.
pub fn arguments(per_second: f64, burst: u32) -> Result<(u64, u32), StateError> {
    if !(per_second.is_finite() && per_second > 0.0) {
        return Err(StateError::Invalid("the rate must be a positive number"));
    }
    if burst == 0 {
        return Err(StateError::Invalid("the burst must be at least 1"));
    }
    let interval = (1_000_000.0 / per_second).round();
    // Rates slower than one a year make no sense for a mail session; the cap keeps the
    // arithmetic in the script well inside a double's exact integers.
    let interval = interval.clamp(1.0, 365.0 * 86_400.0 * 1e6) as u64;
    Ok((interval, burst))
}

/// The script's reply as a decision.
pub fn decision(reply: (i64, String)) -> Result<super::RateDecision, StateError> {
    let (allowed, wait) = reply;
    let wait_us: u64 = wait
        .parse()
        .map_err(|_| StateError::BadReply(format!("rate limit wait {wait:?}")))?;
    Ok(super::RateDecision {
        allowed: allowed == 1,
        wait: Duration::from_micros(wait_us),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_the_in_process_limiter_refuses_are_refused() {
        assert_eq!(arguments(2.0, 3).ok(), Some((500_000, 3)));
        assert_eq!(arguments(1e9, 1).ok(), Some((1, 1)));
        for (rate, burst) in [
            (0.0, 3),
            (-1.0, 3),
            (f64::NAN, 3),
            (f64::INFINITY, 3),
            (1.0, 0),
        ] {
            assert!(
                matches!(arguments(rate, burst), Err(StateError::Invalid(_))),
                "{rate} {burst}"
            );
        }
    }

    #[test]
    fn replies_become_decisions() {
        let d = decision((0, "250000".into())).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.wait, Duration::from_millis(250));
        assert!(decision((1, "0".into())).unwrap().allowed);
        assert!(matches!(
            decision((0, "x".into())),
            Err(StateError::BadReply(_))
        ));
    }
}
