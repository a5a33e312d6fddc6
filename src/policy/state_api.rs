//! The Lua side of shared state: `imap.state.*`, and `shared = true` for `imap.rate_limit`
//! and `imap.shared.*`.
//!
//! Every call that reaches Redis is a Rust future the hook's coroutine waits on (see
//! [`super::waiting`]); it is bounded by the state timeout and by what is left of the hook's
//! time budget. A failed call raises a Lua error *and* marks the hook call as failed on shared
//! state, so the policy's `on_state_error` decides, whatever the script does with the error.
//!
//! Keys in Redis (after the `[state]` prefix):
//! - `kv:<key>`: `imap.state.*`, one namespace for every policy and the operator (a route map
//!   an operator fills with `HSET`), by design;
//! - `count:<policy>:<key>`: a policy's `imap.shared` counters with `shared = true`;
//! - `rate:<burst>:<per_second>:<policy>:<key>`: a policy's shared token buckets.
//!
//! Without `[state]`, `shared = true` keeps the counter or bucket in process (as documented:
//! one imapgate is its own cluster), and `imap.state` is there with `available = false`; its
//! functions fail.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlua::{Lua, Table, Value};

use super::api::{HostShared, PolicyName};
use super::budget::Budget;
use crate::state::{State, StateError};

/// Longest key a policy may use (keys are often built from what clients send).
const MAX_KEY: usize = 1024;
/// Longest value `imap.state.set` stores.
const MAX_VALUE: usize = 64 * 1024;

/// One state operation as the hook sees it: bounded by the hook's remaining time, a failure
/// recorded on the call. Runs only where a hook may wait.
fn bounded<T, F>(
    budget: &Arc<Budget>,
    op: F,
) -> mlua::Result<impl Future<Output = mlua::Result<T>> + Send + 'static + use<T, F>>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StateError>> + Send + 'static,
{
    bounded_or(budget, op, None)
}

/// [`bounded`], with an answer to give instead of failing (a stale cached one).
fn bounded_or<T, F>(
    budget: &Arc<Budget>,
    op: F,
    fallback: Option<T>,
) -> mlua::Result<impl Future<Output = mlua::Result<T>> + Send + 'static + use<T, F>>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StateError>> + Send + 'static,
{
    if !budget.may_wait() {
        return Err(mlua::Error::RuntimeError(
            "shared state is only available in on_command, on_login and on_complete".into(),
        ));
    }
    let left = budget.time_left();
    let budget = budget.clone();
    // On the heap: held inline, the Redis operation's future (copied again at each async
    // layer around it) made the future mlua boxes for *every* call of these functions, in
    // process or not, 70 KiB: copied and page-faulted on each hooked command (+15..+72 µs
    // p50 on a SEARCH judged by an in-process bucket, in the load harness's ratelimit
    // scenario). Now ~4 KiB.
    let op = Box::pin(op);
    Ok(async move {
        let failure = match tokio::time::timeout(left, op).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the hook's time budget ran out waiting for shared state".to_string(),
        };
        if let Some(value) = fallback {
            tracing::warn!(error = %failure, "shared state failed; a cached answer is used");
            return Ok(value);
        }
        budget.state_failed(failure.clone());
        Err(mlua::Error::RuntimeError(format!(
            "shared state: {failure}"
        )))
    })
}

fn checked_key(key: &str) -> mlua::Result<()> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(mlua::Error::RuntimeError(format!(
            "a shared key is 1 to {MAX_KEY} bytes"
        )));
    }
    Ok(())
}

/// A TTL for Redis: seconds > 0 (Redis has no expiry of 0).
fn shared_ttl(ttl: Option<f64>) -> mlua::Result<Option<Duration>> {
    match ttl {
        None => Ok(None),
        Some(t) if t > 0.0 => Duration::try_from_secs_f64(t)
            .map(Some)
            .map_err(|_| mlua::Error::RuntimeError("ttl must be a number of seconds > 0".into())),
        Some(_) => Err(mlua::Error::RuntimeError(
            "ttl must be a number of seconds > 0".into(),
        )),
    }
}

/// `{ cache_s = N }` of `imap.state.hget`: how long an answer is used again without asking.
fn cache_time(opts: &Option<Table>) -> mlua::Result<Option<Duration>> {
    let Some(t) = opts else {
        return Ok(None);
    };
    match t.get::<Value>("cache_s")? {
        Value::Nil => Ok(None),
        Value::Integer(n) if n > 0 => Ok(Some(Duration::from_secs(n.unsigned_abs()))),
        Value::Number(n) if n > 0.0 => Duration::try_from_secs_f64(n)
            .map(Some)
            .map_err(|_| mlua::Error::RuntimeError("cache_s is a number of seconds > 0".into())),
        _ => Err(mlua::Error::RuntimeError(
            "cache_s is a number of seconds > 0".into(),
        )),
    }
}

/// Answers of `imap.state.hget` with `cache_s`, per instance (shared by every VM and kept
/// across reloads): a route map read once per user per `cache_s`, not per login. When Redis
/// fails, a stale answer is used rather than none. Bounded: past [`Lookups::MAX`] entries the
/// expired ones go, and a new answer is not kept while it is still full.
#[derive(Debug, Default)]
pub struct Lookups {
    map: Mutex<HashMap<(String, String), Entry>>,
}

/// An answer (`None`: the field is not in the hash), and when it was read.
type Entry = (Option<String>, Instant);

enum Cached {
    Fresh(Option<String>),
    Stale(Option<String>),
    Missing,
}

impl Lookups {
    const MAX: usize = 100_000;

    fn get(&self, key: &str, field: &str, ttl: Duration) -> Cached {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // One lookup per call: the owned key is built only to find the entry.
        match map.get(&(key.to_string(), field.to_string())) {
            Some((value, at)) if at.elapsed() < ttl => Cached::Fresh(value.clone()),
            Some((value, _)) => Cached::Stale(value.clone()),
            None => Cached::Missing,
        }
    }

    fn put(&self, key: String, field: String, value: Option<String>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::MAX {
            // Nothing is cached longer than an hour's worth of use; keep it simple.
            map.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(3600));
            if map.len() >= Self::MAX {
                return;
            }
        }
        map.insert((key, field), (value, Instant::now()));
    }

    /// Forgets every cached answer for `field` (a user being moved: the admin kick).
    pub fn forget_field(&self, field: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(_, f), _| !f.eq_ignore_ascii_case(field));
    }
}

/// Whether an options table asks for the shared version.
fn wants_shared(opts: &Option<Table>) -> mlua::Result<bool> {
    match opts {
        None => Ok(false),
        Some(t) => match t.get::<Value>("shared")? {
            Value::Nil => Ok(false),
            Value::Boolean(b) => Ok(b),
            other => Err(mlua::Error::RuntimeError(format!(
                "shared is true or false, not {}",
                other.type_name()
            ))),
        },
    }
}

/// A count as Lua shows it: an integer when it is one (`3`, not `3.0`).
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Value::Integer(n as i64)
    } else {
        Value::Number(n)
    }
}

/// The key of a policy's own counter or bucket in Redis.
fn policy_key(owner: &PolicyName, key: &str) -> String {
    format!("{}:{key}", owner.get())
}

/// An answer now (in process), or a state operation to wait for.
enum Answer<T, F> {
    Now(T),
    Later(F),
}

impl<T, F: Future<Output = mlua::Result<T>>> Answer<T, F> {
    async fn get(self) -> mlua::Result<T> {
        match self {
            Answer::Now(value) => Ok(value),
            Answer::Later(op) => op.await,
        }
    }
}

/// `imap.state`: get, set, incr, hget, and `available`.
pub(super) fn state_table(
    lua: &Lua,
    state: Option<State>,
    lookups: Arc<Lookups>,
    budget: &Arc<Budget>,
) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("available", state.is_some())?;
    let Some(state) = state else {
        let missing = lua.create_function(|_, ()| -> mlua::Result<()> {
            Err(mlua::Error::RuntimeError(
                "imap.state needs a [state] table in the configuration".into(),
            ))
        })?;
        for name in ["get", "set", "incr", "hget"] {
            t.set(name, missing.clone())?;
        }
        return Ok(t);
    };

    let (s, b) = (state.clone(), budget.clone());
    t.set(
        "get",
        lua.create_async_function(move |_, key: String| {
            let s = s.clone();
            let op = checked_key(&key)
                .and_then(|()| bounded(&b, async move { s.get(&format!("kv:{key}")).await }));
            async move { op?.await }
        })?,
    )?;

    let (s, b) = (state.clone(), budget.clone());
    t.set(
        "set",
        lua.create_async_function(
            move |_, (key, value, ttl): (String, mlua::LuaString, Option<f64>)| {
                let s = s.clone();
                let op = checked_key(&key).and_then(|()| {
                    let value = value.to_str()?.to_string();
                    if value.len() > MAX_VALUE {
                        return Err(mlua::Error::RuntimeError(format!(
                            "a shared value is at most {MAX_VALUE} bytes"
                        )));
                    }
                    let ttl = shared_ttl(ttl)?;
                    bounded(
                        &b,
                        async move { s.set(&format!("kv:{key}"), &value, ttl).await },
                    )
                });
                async move { op?.await.map(|()| true) }
            },
        )?,
    )?;

    let (s, b) = (state.clone(), budget.clone());
    t.set(
        "incr",
        lua.create_async_function(
            move |_, (key, by, ttl): (String, Option<f64>, Option<f64>)| {
                let s = s.clone();
                let op = checked_key(&key).and_then(|()| {
                    let ttl = shared_ttl(ttl)?;
                    bounded(&b, async move {
                        s.incr(&format!("kv:{key}"), by.unwrap_or(1.0), ttl).await
                    })
                });
                async move { op?.await.map(number) }
            },
        )?,
    )?;

    let (s, b) = (state, budget.clone());
    t.set(
        "hget",
        lua.create_async_function(
            move |_, (key, field, opts): (String, String, Option<Table>)| {
                let s = s.clone();
                let answer = (|| -> mlua::Result<_> {
                    checked_key(&key)?;
                    let cache_for = cache_time(&opts)?;
                    let key = format!("kv:{key}");
                    let cached = match cache_for {
                        Some(ttl) => match lookups.get(&key, &field, ttl) {
                            Cached::Fresh(value) => return Ok(Answer::Now(value)),
                            Cached::Stale(value) => Some(value),
                            Cached::Missing => None,
                        },
                        None => None,
                    };
                    let cache = lookups.clone();
                    let op = bounded_or(
                        &b,
                        async move {
                            let value = s.hget(&key, &field).await?;
                            if cache_for.is_some() {
                                cache.put(key, field, value.clone());
                            }
                            Ok(value)
                        },
                        cached,
                    )?;
                    Ok(Answer::Later(op))
                })();
                async move { answer?.get().await }
            },
        )?,
    )?;
    Ok(t)
}

/// `imap.rate_limit(key, per_second, burst [, { shared = true }])` when `[state]` is
/// configured: the shared bucket in Redis, or the in-process one.
pub(super) fn rate_limit_fn(
    lua: &Lua,
    host: Arc<HostShared>,
    state: State,
    owner: PolicyName,
    budget: &Arc<Budget>,
) -> mlua::Result<mlua::Function> {
    let budget = budget.clone();
    lua.create_async_function(
        move |_, (key, per_second, burst, opts): (String, f64, u32, Option<Table>)| {
            let answer = (|| -> mlua::Result<_> {
                if !wants_shared(&opts)? {
                    return super::api::local_rate_limit(&host, &owner, &key, per_second, burst)
                        .map(Answer::Now);
                }
                checked_key(&key)?;
                let s = state.clone();
                let k = policy_key(&owner, &key);
                let op = bounded(
                    &budget,
                    async move { s.rate_limit(&k, per_second, burst).await },
                )?;
                Ok(Answer::Later(async move {
                    op.await.map(|d| (d.allowed, d.wait.as_secs_f64()))
                }))
            })();
            async move { answer?.get().await }
        },
    )
}

/// `imap.shared.get/set/incr` when `[state]` is configured: with `{ shared = true }` as the
/// last argument the counter lives in Redis, else in process.
pub(super) fn shared_counters(
    lua: &Lua,
    t: &Table,
    host: Arc<HostShared>,
    state: State,
    owner: PolicyName,
    budget: &Arc<Budget>,
) -> mlua::Result<()> {
    let (h, s, o, b) = (host.clone(), state.clone(), owner.clone(), budget.clone());
    t.set(
        "get",
        lua.create_async_function(move |_, (key, opts): (String, Option<Table>)| {
            let answer = (|| -> mlua::Result<_> {
                if !wants_shared(&opts)? {
                    return Ok(Answer::Now(h.counters.get(&o.scoped(&key))));
                }
                checked_key(&key)?;
                let (s, k) = (s.clone(), format!("count:{}", policy_key(&o, &key)));
                let op = bounded(&b, async move { s.get(&k).await })?;
                Ok(Answer::Later(async move {
                    // A counter holds a number; anything else there is nobody's counter.
                    op.await
                        .map(|v| v.and_then(|v| v.trim().parse::<f64>().ok()))
                }))
            })();
            async move { answer?.get().await }
        })?,
    )?;
    let (h, s, o, b) = (host.clone(), state.clone(), owner.clone(), budget.clone());
    t.set(
        "set",
        lua.create_async_function(
            move |_, (key, value, ttl, opts): (String, f64, Option<f64>, Option<Table>)| {
                let answer = (|| -> mlua::Result<_> {
                    if !wants_shared(&opts)? {
                        let ttl = super::api::ttl_of(ttl)?;
                        return Ok(Answer::Now(h.counters.set(&o.scoped(&key), value, ttl)));
                    }
                    checked_key(&key)?;
                    let ttl = shared_ttl(ttl)?;
                    let (s, k) = (s.clone(), format!("count:{}", policy_key(&o, &key)));
                    let op = bounded(&b, async move { s.set(&k, &value.to_string(), ttl).await })?;
                    Ok(Answer::Later(async move { op.await.map(|()| true) }))
                })();
                async move { answer?.get().await }
            },
        )?,
    )?;
    let (h, s, o, b) = (host, state, owner, budget.clone());
    t.set(
        "incr",
        lua.create_async_function(
            move |_, (key, by, ttl, opts): (String, Option<f64>, Option<f64>, Option<Table>)| {
                let by = by.unwrap_or(1.0);
                let answer = (|| -> mlua::Result<_> {
                    if !wants_shared(&opts)? {
                        let ttl = super::api::ttl_of(ttl)?;
                        return Ok(Answer::Now(h.counters.incr(&o.scoped(&key), by, ttl)));
                    }
                    checked_key(&key)?;
                    let ttl = shared_ttl(ttl)?;
                    let (s, k) = (s.clone(), format!("count:{}", policy_key(&o, &key)));
                    let op = bounded(&b, async move { s.incr(&k, by, ttl).await })?;
                    Ok(Answer::Later(async move { op.await.map(Some) }))
                })();
                async move { answer?.get().await }
            },
        )?,
    )?;
    Ok(())
}
