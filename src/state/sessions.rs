//! The cluster-wide session registry behind `max_connections_per_user` when `[state]` is set.
//!
//! Each user has one sorted set; a member is one session (`instance id:session id`) and its
//! score the time, by the Redis server's clock in milliseconds, at which the registration
//! lapses. An instance refreshes the scores of its own sessions every third of the TTL and
//! removes a session when it ends, so a crashed instance's sessions stop counting within the
//! TTL. Admission is one script: prune the lapsed, count, add when under the limit, so two
//! instances racing for a user's last slot cannot both get it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;

use super::{State, StateError, keys};
use crate::metrics::StateOp;

/// KEYS[1]: the user's set. ARGV[1]: member, ARGV[2]: TTL in ms, ARGV[3]: limit (0: none).
/// Returns `{1, count with it}` when registered, `{0, count}` when the user is at the limit.
/// A member already registered (a retry) is refreshed, never counted against itself.
const REGISTER: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local n = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  n = n - 1
elseif limit > 0 and n >= limit then
  return {0, n}
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, n + 1}
";

/// KEYS[1]: the user's set. Lapsed members are pruned first, so the count is of live ones.
const COUNT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
return redis.call('ZCARD', KEYS[1])
";

/// The outcome of [`ClusterSessions::register`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Counted; `count` sessions of the user are live in the cluster, this one included.
    Registered { count: usize },
    /// The user already has `count` live sessions, at or above the limit: not registered.
    OverLimit { count: usize },
}

/// This instance's sessions in the cluster-wide registry. Cheap to clone.
#[derive(Clone)]
pub struct ClusterSessions {
    inner: Arc<Inner>,
}

struct Inner {
    state: State,
    instance: String,
    ttl: Duration,
    /// Session id -> the user's set, for the refresh and the removal.
    live: Mutex<HashMap<u64, String>>,
    register: Script,
    count: Script,
}

impl std::fmt::Debug for ClusterSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSessions")
            .field("instance", &self.inner.instance)
            .finish_non_exhaustive()
    }
}

/// An id for this process, different at every start (a restarted instance must not refresh
/// the registrations of its previous life): the start time and a random number from the
/// standard library's randomly seeded hasher.
fn instance_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let random = RandomState::new().hash_one((std::process::id(), nanos));
    format!("{:x}-{random:016x}", std::process::id())
}

impl ClusterSessions {
    /// The registry of this process, with a fresh instance id; `state.session_ttl()` long
    /// registrations.
    pub fn new(state: State) -> ClusterSessions {
        ClusterSessions {
            inner: Arc::new(Inner {
                ttl: state.session_ttl(),
                state,
                instance: instance_id(),
                live: Mutex::default(),
                register: Script::new(REGISTER),
                count: Script::new(COUNT),
            }),
        }
    }

    /// This process's id, the first part of its members.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    fn member(&self, session: u64) -> String {
        format!("{}:{session}", self.inner.instance)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, String>> {
        // Every update is one insert or remove: a poisoned map is still consistent.
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `session` as one of `user_key`'s (the case-folded name), unless the user
    /// already has `limit` live sessions in the cluster (0: no limit).
    pub async fn register(
        &self,
        session: u64,
        user_key: &str,
        limit: usize,
    ) -> Result<Registration, StateError> {
        let state = &self.inner.state;
        let key = keys::sessions(state.prefix(), user_key);
        // Known before the answer: a session that ends while the script runs is removed
        // after it, rather than left to lapse.
        self.live().insert(session, key.clone());
        let mut con = state.connection();
        let script = &self.inner.register;
        let member = self.member(session);
        let ttl = super::millis(self.inner.ttl);
        let result: Result<(i64, i64), _> = state
            .run(StateOp::Session, async {
                script
                    .key(&key)
                    .arg(&member)
                    .arg(ttl)
                    .arg(limit)
                    .invoke_async(&mut con)
                    .await
            })
            .await;
        let registered = matches!(result, Ok((1, _)));
        if !registered {
            self.live().remove(&session);
        }
        let (_, count) = result?;
        let count = usize::try_from(count).unwrap_or(0);
        Ok(if registered {
            Registration::Registered { count }
        } else {
            Registration::OverLimit { count }
        })
    }

    /// Live sessions of `user_key` in the cluster.
    pub async fn count(&self, user_key: &str) -> Result<usize, StateError> {
        let state = &self.inner.state;
        let key = keys::sessions(state.prefix(), user_key);
        let mut con = state.connection();
        let script = &self.inner.count;
        let n: i64 = state
            .run(StateOp::Session, async {
                script.key(&key).invoke_async(&mut con).await
            })
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The session ended: it stops being refreshed at once and its registration is removed.
    pub async fn unregister(&self, session: u64) -> Result<(), StateError> {
        let Some(key) = self.live().remove(&session) else {
            return Ok(());
        };
        let state = &self.inner.state;
        let mut con = state.connection();
        let member = self.member(session);
        state
            .run(StateOp::Session, async {
                redis::cmd("ZREM")
                    .arg(&key)
                    .arg(&member)
                    .query_async::<i64>(&mut con)
                    .await
            })
            .await?;
        Ok(())
    }

    /// [`ClusterSessions::unregister`] from code that cannot wait (a `Drop`): the removal
    /// runs as its own task; should it fail, the registration lapses within the TTL.
    pub fn unregister_later(&self, session: u64) {
        if !self.live().contains_key(&session) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.live().remove(&session);
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            if let Err(error) = this.unregister(session).await {
                tracing::debug!(%error, "cluster session removal failed; it lapses");
            }
        });
    }

    /// Pushes the expiry of every session of this instance one TTL ahead: the server's time,
    /// then one pipeline of all of them.
    pub async fn refresh(&self) -> Result<(), StateError> {
        let sessions: Vec<(u64, String)> = self
            .live()
            .iter()
            .map(|(id, key)| (*id, key.clone()))
            .collect();
        if sessions.is_empty() {
            return Ok(());
        }
        let state = &self.inner.state;
        let ttl = super::millis(self.inner.ttl);
        let mut con = state.connection();
        let (secs, micros): (u64, u64) = state
            .run(StateOp::Session, async {
                redis::cmd("TIME").query_async(&mut con).await
            })
            .await?;
        let until = secs * 1000 + micros / 1000 + ttl;
        let mut pipe = redis::pipe();
        let mut keys_seen = std::collections::HashSet::new();
        for (id, key) in &sessions {
            // Plain ZADD, not XX: after Redis lost its data (a restart), live sessions count
            // again from the next refresh.
            pipe.cmd("ZADD")
                .arg(key)
                .arg(until)
                .arg(self.member(*id))
                .ignore();
            if keys_seen.insert(key) {
                pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
            }
        }
        state
            .run(StateOp::Session, async { pipe.exec_async(&mut con).await })
            .await
    }

    /// Refreshes this instance's registrations every third of the TTL, for as long as the
    /// process runs (the server runs it as a task of its own).
    pub async fn refresh_forever(self) {
        let period = (self.inner.ttl / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.refresh().await {
                tracing::warn!(%error, "cannot refresh this instance's cluster sessions");
            }
        }
    }
}
