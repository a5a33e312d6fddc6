//! State shared by several imapgates, kept in Redis (or Valkey): policies' keys and counters,
//! token buckets ([`gcra`]), and the cluster-wide session registry ([`sessions`]).
//!
//! [`State`] is the one client. It is built from `[state]` without touching the network:
//! connections are opened in the background and reopened after a failure, and each operation
//! fails (never hangs) while Redis is unreachable: every one is bounded by the configured
//! command timeout, the wait for a connection included.
//!
//! Pooling: a [`ConnectionManager`] is one multiplexed connection that pipelines every
//! request in flight over one socket and reconnects by itself; a pool of exclusive
//! connections would only add round trips of checkout. `connections` managers (default 2)
//! are used in turn, so one slow reply or one reconnect does not stall every request.
//!
//! Keys and values are always sent as command arguments, never spliced into a command or a
//! script, and every key gets the configured prefix ([`keys`]).

pub mod gcra;
pub mod keys;
pub mod sessions;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisError, Script};

use crate::config::StateConfig;
use crate::metrics::{Metrics, StateMetrics, StateOp, StateResult};

pub use self::sessions::{ClusterSessions, Registration};

/// Why a state operation failed. Which side failed matters to operators (a timeout is a slow
/// or paused server, a connect error a down one) but a policy treats them all alike, by its
/// `on_state_error`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// `[state]` cannot be used (bad URL, unreadable password file, missing variable).
    #[error("[state]: {0}")]
    Config(String),
    /// No connection to Redis (refused, reset, TLS, authentication).
    #[error("cannot reach Redis: {0}")]
    Connect(RedisError),
    /// No answer within the command timeout.
    #[error("Redis did not answer within the state timeout")]
    Timeout,
    /// Redis answered with an error (wrong type, script error, out of memory...).
    #[error("Redis refused the command: {0}")]
    Server(RedisError),
    /// An answer that is not what the command returns.
    #[error("unexpected answer from Redis: {0}")]
    BadReply(String),
    /// The caller's arguments make no request (a rate of 0, a NaN increment).
    #[error("{0}")]
    Invalid(&'static str),
}

impl StateError {
    fn from_redis(e: RedisError) -> StateError {
        use redis::ErrorKind;
        if e.is_timeout() {
            return StateError::Timeout;
        }
        match e.kind() {
            ErrorKind::Io | ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig => {
                StateError::Connect(e)
            }
            ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
                StateError::BadReply(e.to_string())
            }
            _ if e.is_connection_dropped() || e.is_connection_refusal() => StateError::Connect(e),
            _ => StateError::Server(e),
        }
    }

    fn result(&self) -> StateResult {
        match self {
            StateError::Timeout => StateResult::Timeout,
            _ => StateResult::Error,
        }
    }
}

/// The answer of a token bucket: allowed, or how long until one more would be.
pub use crate::policy::ratelimit::RateDecision;

/// The shared-state client. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct State {
    inner: Arc<Inner>,
}

struct Inner {
    managers: Vec<ConnectionManager>,
    next: AtomicUsize,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    session_ttl: Duration,
    /// The URL without its password, for logs.
    shown_url: String,
    metrics: Option<StateMetrics>,
    incr: Script,
    gcra: Script,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("redis", &self.inner.shown_url)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// INCRBYFLOAT, then the expiry for a key that has none (it did not exist, or was set
/// without one): a fixed window, as the in-process counters. ARGV[2] is the TTL in ms, or
/// empty for none.
const INCR_SCRIPT: &str = r"
local v = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
";

/// Longest TTL sent: ten years. Redis refuses an expiry past its 64-bit millisecond clock
/// with an error, which a policy's huge TTL must not turn into a failed call.
const MAX_TTL_MS: u64 = 10 * 365 * 86_400 * 1000;

/// A TTL as Redis milliseconds: at least 1, since 0 is an error there and "expire now" is
/// never what a caller means; at most [`MAX_TTL_MS`].
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MS)
}

impl State {
    /// Config errors only (bad URL, unreadable password file). Never fails because Redis is
    /// down: connects in the background and reconnects; ops fail until it is up.
    ///
    /// Must be called inside a Tokio runtime (the connections' tasks are spawned on it).
    pub fn new(cfg: &StateConfig, metrics: Option<&Metrics>) -> Result<State, StateError> {
        let info = connection_info(cfg)?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StateError::Config(
                "the state client needs a Tokio runtime".into(),
            ));
        }
        let client = match &cfg.ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    StateError::Config(format!("cannot read ca {}: {e}", path.display()))
                })?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(info, certificates)
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| StateError::Config(format!("cannot use [state]: {}", e.category())))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout()))
            .set_response_timeout(Some(cfg.timeout()))
            // A few quick attempts per reconnect; a failed one is started again by the next
            // request, so a server that comes back is found without a restart.
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let managers = (0..cfg.connections.max(1))
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                    .map_err(|e| StateError::Config(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(State {
            inner: Arc::new(Inner {
                managers,
                next: AtomicUsize::new(0),
                prefix: cfg.prefix.clone(),
                timeout: cfg.timeout(),
                connect_timeout: cfg.connect_timeout(),
                session_ttl: cfg.session_ttl(),
                shown_url: cfg.redis.redacted(),
                metrics: metrics.map(Metrics::state),
                incr: Script::new(INCR_SCRIPT),
                gcra: gcra::script(),
            }),
        })
    }

    /// The configured command timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The configured key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis URL without any password, for logs.
    pub fn url(&self) -> &str {
        &self.inner.shown_url
    }

    /// How long a cluster session registration lives unless refreshed (`session_ttl_s`).
    pub fn session_ttl(&self) -> Duration {
        self.inner.session_ttl
    }

    fn connection(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.managers.len();
        self.inner.managers[i].clone()
    }

    /// Runs one request under the command timeout and counts it.
    async fn run<T, F>(&self, op: StateOp, request: F) -> Result<T, StateError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        self.run_within(self.inner.timeout, op, request).await
    }

    async fn run_within<T, F>(
        &self,
        limit: Duration,
        op: StateOp,
        request: F,
    ) -> Result<T, StateError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        let started = Instant::now();
        let result = match tokio::time::timeout(limit, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StateError::from_redis(e)),
            Err(_) => Err(StateError::Timeout),
        };
        if let Some(m) = &self.inner.metrics {
            let outcome = match &result {
                Ok(_) => StateResult::Ok,
                Err(e) => e.result(),
            };
            m.record(op, outcome, started.elapsed());
        }
        result
    }

    /// Whether Redis answers a PING now, on every connection (which opens those not open
    /// yet, so that the first requests do not pay for it). Each may take the connect timeout
    /// and the command timeout.
    pub async fn ping(&self) -> Result<(), StateError> {
        let limit = self.inner.connect_timeout + self.inner.timeout;
        for manager in &self.inner.managers {
            let mut con = manager.clone();
            let pong: String = self
                .run_within(limit, StateOp::Ping, async move {
                    redis::cmd("PING").query_async(&mut con).await
                })
                .await?;
            if pong != "PONG" {
                return Err(StateError::BadReply(format!("PING answered {pong:?}")));
            }
        }
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        let key = keys::plain(&self.inner.prefix, key);
        let mut con = self.connection();
        self.run(StateOp::Get, async move {
            redis::cmd("GET").arg(&key).query_async(&mut con).await
        })
        .await
    }

    /// ttl None: no expiry.
    pub async fn set(
        &self,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        let key = keys::plain(&self.inner.prefix, key);
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        let mut con = self.connection();
        self.run(StateOp::Set, async move { cmd.query_async(&mut con).await })
            .await
    }

    /// INCRBYFLOAT; a key that did not exist (or had no expiry) gets `ttl`, a live one keeps
    /// its own (fixed window, as the in-process `imap.shared.incr`). One round trip (script).
    pub async fn incr(&self, key: &str, by: f64, ttl: Option<Duration>) -> Result<f64, StateError> {
        if !by.is_finite() {
            return Err(StateError::Invalid("the increment must be a finite number"));
        }
        let key = keys::plain(&self.inner.prefix, key);
        let ttl = ttl.map(|t| millis(t).to_string()).unwrap_or_default();
        let mut con = self.connection();
        let script = &self.inner.incr;
        let value: String = self
            .run(StateOp::Incr, async move {
                script
                    .key(&key)
                    .arg(by)
                    .arg(ttl)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        value
            .parse()
            .map_err(|_| StateError::BadReply(format!("INCRBYFLOAT answered {value:?}")))
    }

    pub async fn hget(&self, key: &str, field: &str) -> Result<Option<String>, StateError> {
        let key = keys::plain(&self.inner.prefix, key);
        let mut con = self.connection();
        self.run(StateOp::Hget, async move {
            redis::cmd("HGET")
                .arg(&key)
                .arg(field)
                .query_async(&mut con)
                .await
        })
        .await
    }

    /// GCRA token bucket, evaluated atomically by one server-side script using the server's
    /// clock (`redis.call('TIME')`), Redis 7 and Valkey compatible; one round trip.
    /// `allowed`, and when not: how long until one more is allowed.
    ///
    /// A bucket is one per (key, rate, burst), as in process.
    pub async fn rate_limit(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<RateDecision, StateError> {
        let (interval_us, burst) = gcra::arguments(per_second, burst)?;
        let key = keys::bucket(&self.inner.prefix, key, per_second, burst);
        let mut con = self.connection();
        let script = &self.inner.gcra;
        let reply: (i64, String) = self
            .run(StateOp::RateLimit, async move {
                script
                    .key(&key)
                    .arg(interval_us)
                    .arg(burst)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        gcra::decision(reply)
    }
}

/// For `imapgate check`, outside any runtime: whether Redis answers a PING now, within the
/// connect and command timeouts. A [`StateError::Config`] is a config error; any other, a
/// server that is not there (yet).
pub fn probe(cfg: &StateConfig) -> Result<(), StateError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StateError::Config(format!("cannot start a runtime: {e}")))?;
    runtime.block_on(async {
        let state = State::new(cfg, None)?;
        state.ping().await
    })
}

/// The connection settings: the URL, with the password from a file or the environment.
fn connection_info(cfg: &StateConfig) -> Result<redis::ConnectionInfo, StateError> {
    let info = cfg
        .redis
        .expose()
        .into_connection_info()
        // The crate's message can quote the URL, password included: say only what is wrong.
        .map_err(|e| {
            StateError::Config(format!(
                "`redis` {}: not a usable Redis URL ({})",
                cfg.redis.redacted(),
                e.category()
            ))
        })?;
    let password = match (&cfg.password_file, &cfg.password_env) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                StateError::Config(format!("cannot read password_file {}: {e}", path.display()))
            })?;
            Some(text.trim().to_owned())
        }
        (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
            StateError::Config(format!("password_env: ${var} is not set or not UTF-8"))
        })?),
        (None, None) => None,
    };
    Ok(match password {
        Some(p) if p.is_empty() => {
            return Err(StateError::Config("the Redis password is empty".into()));
        }
        Some(p) => {
            let redis = info.redis_settings().clone().set_password(p);
            info.set_redis_settings(redis)
        }
        None => info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_whole_milliseconds_redis_accepts() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(60)), 60_000);
        assert_eq!(millis(Duration::MAX), MAX_TTL_MS);
    }
}
