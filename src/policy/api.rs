//! The `imap` table every policy gets: verdicts, rate limits, shared counters, logging,
//! modified UTF-7, LIST wildcard matching, upstream health, a stable hash, map files and the
//! policy's options.
//!
//! Rate-limit buckets and shared counters are keyed per policy (by name): a policy cannot drain
//! another's buckets or change its counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mlua::{Lua, Table, Value};

use super::Verdict;
use super::ratelimit::{Limiters, SharedCounters};
use super::state_api;
use crate::imap::encode::is_valid_atom;
use crate::imap::list_match::ListPattern;
use crate::imap::mutf7;
use crate::imap::response::{DataKind, Status};
use crate::metrics::Metrics;
use crate::net::health::UpstreamHealth;

/// The untagged kinds a policy's `responses` filter may name.
/// CAPABILITY has its own hook (`on_capability`); ENABLED is the proxy's to track.
pub const RESPONSE_KINDS: &[DataKind] = &[
    DataKind::List,
    DataKind::Lsub,
    DataKind::Status,
    DataKind::Namespace,
    DataKind::Flags,
    DataKind::Exists,
    DataKind::Recent,
    DataKind::Expunge,
    DataKind::Fetch,
    DataKind::Search,
    DataKind::Esearch,
    DataKind::Sort,
    DataKind::Thread,
    DataKind::Id,
    DataKind::Quota,
    DataKind::QuotaRoot,
    DataKind::Acl,
    DataKind::MyRights,
    DataKind::ListRights,
    DataKind::Metadata,
    DataKind::Vanished,
];

/// Longest delay a policy may ask for.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// Longest text a policy may put in a response.
const MAX_TEXT: usize = 512;

/// Host state shared by every policy and connection.
#[derive(Debug, Default)]
pub struct HostShared {
    pub limiters: Limiters,
    pub counters: SharedCounters,
    /// Where `imap.metrics` registers; `None` in tools and tests without an endpoint.
    pub metrics: Option<Metrics>,
    /// What `imap.upstream_up` and `imap.upstreams` read: the probed state in the proxy, every
    /// configured upstream up in tools (`UpstreamHealth::unprobed`); `None`: no upstream is
    /// known.
    pub health: Option<UpstreamHealth>,
    /// The shared state in Redis (`[state]`: `imap.state`, `shared = true`); `None`:
    /// everything stays in process.
    pub state: Option<crate::state::State>,
    /// Cached `imap.state.hget` answers (`cache_s`).
    pub lookups: Arc<state_api::Lookups>,
}

impl HostShared {
    /// Whether hooks may wait for shared state (`[state]` is configured).
    pub fn waits(&self) -> bool {
        self.state.is_some()
    }

    /// A shared counter of one policy (`imap.shared.get(key)` in that policy).
    pub fn shared_value(&self, policy: &str, key: &str) -> Option<f64> {
        self.counters.get(&scoped(policy, key))
    }
}

/// `imap.rate_limit` in process: `allowed, wait_seconds`.
pub(super) fn local_rate_limit(
    host: &HostShared,
    owner: &PolicyName,
    key: &str,
    per_second: f64,
    burst: u32,
) -> mlua::Result<(bool, f64)> {
    let d = host
        .limiters
        .check(owner.scoped(key), per_second, burst)
        .ok_or_else(|| {
            mlua::Error::RuntimeError("rate_limit needs per_second > 0 and burst >= 1".into())
        })?;
    Ok((d.allowed, d.wait.as_secs_f64()))
}

/// The key of a policy's bucket or counter in the maps all policies share.
fn scoped(policy: &str, key: &str) -> String {
    let mut k = String::with_capacity(policy.len() + 1 + key.len());
    k.push_str(policy);
    k.push('\u{1f}');
    k.push_str(key);
    k
}

/// The policy's name as used in logs and keys: the file name until its table has been read
/// (its top level runs before), then the table's `name`.
#[derive(Clone, Debug)]
pub struct PolicyName(Arc<(Arc<str>, OnceLock<Arc<str>>)>);

impl PolicyName {
    pub fn new(name: &str) -> PolicyName {
        PolicyName(Arc::new((Arc::from(name), OnceLock::new())))
    }

    /// Settles the name (once).
    pub fn set(&self, name: &str) {
        let _ = self.0.1.set(Arc::from(name));
    }

    pub(super) fn get(&self) -> &str {
        self.0.1.get().unwrap_or(&self.0.0)
    }

    pub(super) fn scoped(&self, key: &str) -> String {
        scoped(self.get(), key)
    }
}

/// Builds the `imap` table for one policy in one VM.
pub(super) fn imap_table(
    lua: &Lua,
    options: &toml::Table,
    shared: Arc<HostShared>,
    name: PolicyName,
    budget: &Arc<super::budget::Budget>,
) -> mlua::Result<Table> {
    let imap = lua.create_table()?;
    imap.set(
        "reject",
        lua.create_function(|lua, t: Option<Table>| {
            let v = lua.create_table()?;
            v.set("verdict", "reject")?;
            if let Some(t) = t {
                v.set("status", t.get::<Value>("status")?)?;
                v.set("code", t.get::<Value>("code")?)?;
                v.set("text", t.get::<Value>("text")?)?;
            }
            Ok(v)
        })?,
    )?;
    imap.set(
        "close",
        lua.create_function(|lua, text: Option<String>| {
            let v = lua.create_table()?;
            v.set("verdict", "close")?;
            v.set("text", text)?;
            Ok(v)
        })?,
    )?;
    imap.set(
        "delay",
        lua.create_function(|lua, ms: f64| {
            let v = lua.create_table()?;
            v.set("verdict", "delay")?;
            v.set("ms", ms)?;
            Ok(v)
        })?,
    )?;
    imap.set(
        "route",
        lua.create_function(|lua, t: Table| {
            let v = lua.create_table()?;
            v.set("verdict", "route")?;
            v.set("upstream", t.get::<Value>("upstream")?)?;
            v.set("fallbacks", t.get::<Value>("fallbacks")?)?;
            v.set("user", t.get::<Value>("user")?)?;
            Ok(v)
        })?,
    )?;
    imap.set(
        "drop",
        lua.create_function(|lua, ()| {
            let v = lua.create_table()?;
            v.set("verdict", "drop")?;
            Ok(v)
        })?,
    )?;
    imap.set("pass", lua.create_function(|_, ()| Ok(Value::Nil))?)?;

    let log_name = name.clone();
    imap.set(
        "log",
        lua.create_function(move |_, (level, msg): (String, Option<String>)| {
            let policy = log_name.get();
            let (level, msg) = match msg {
                Some(m) => (level, m),
                None => ("info".to_string(), level),
            };
            match level.as_str() {
                "error" => tracing::error!(%policy, "{msg}"),
                "warn" => tracing::warn!(%policy, "{msg}"),
                "debug" => tracing::debug!(%policy, "{msg}"),
                "trace" => tracing::trace!(%policy, "{msg}"),
                _ => tracing::info!(%policy, "{msg}"),
            }
            Ok(())
        })?,
    )?;

    let limiter_host = shared.clone();
    let owner = name.clone();
    imap.set(
        "rate_limit",
        lua.create_function(move |_, (key, per_second, burst): (String, f64, u32)| {
            local_rate_limit(&limiter_host, &owner, &key, per_second, burst)
        })?,
    )?;

    let shared_table = lua.create_table()?;
    let host = shared.clone();
    let owner = name.clone();
    shared_table.set(
        "get",
        lua.create_function(move |_, key: String| Ok(host.counters.get(&owner.scoped(&key))))?,
    )?;
    let host = shared.clone();
    let owner = name.clone();
    shared_table.set(
        "set",
        lua.create_function(move |_, (key, value, ttl): (String, f64, Option<f64>)| {
            Ok(host.counters.set(&owner.scoped(&key), value, ttl_of(ttl)?))
        })?,
    )?;
    imap.set("metrics", metrics_table(lua, shared.metrics.clone())?)?;
    upstream_functions(lua, &imap, shared.health.clone())?;
    let host = shared.clone();
    let owner = name.clone();
    shared_table.set(
        "incr",
        lua.create_function(
            move |_, (key, by, ttl): (String, Option<f64>, Option<f64>)| {
                Ok(host
                    .counters
                    .incr(&owner.scoped(&key), by.unwrap_or(1.0), ttl_of(ttl)?))
            },
        )?,
    )?;
    if let Some(state) = shared.state.clone() {
        // With [state], these take `{ shared = true }`, which waits for Redis.
        imap.set(
            "rate_limit",
            state_api::rate_limit_fn(lua, shared.clone(), state.clone(), name.clone(), budget)?,
        )?;
        state_api::shared_counters(lua, &shared_table, shared.clone(), state, name, budget)?;
    }
    imap.set("shared", shared_table)?;
    imap.set(
        "state",
        state_api::state_table(lua, shared.state.clone(), shared.lookups.clone(), budget)?,
    )?;

    let m = lua.create_table()?;
    m.set(
        "encode",
        lua.create_function(|_, s: String| Ok(mutf7::encode(&s)))?,
    )?;
    m.set(
        "decode",
        lua.create_function(|_, s: mlua::LuaString| {
            Ok(match mutf7::decode(&s.as_bytes()) {
                Ok(d) => (Some(d), None),
                Err(e) => (None, Some(e.to_string())),
            })
        })?,
    )?;
    imap.set("mutf7", m)?;
    imap.set("list_match", list_match_fn(lua)?)?;
    imap.set(
        "ip_in",
        lua.create_function(|_, (ip, network): (String, String)| Ok(ip_in(&ip, &network)))?,
    )?;
    imap.set(
        "hash",
        lua.create_function(|_, s: mlua::LuaString| Ok(stable_hash(&s.as_bytes())))?,
    )?;
    imap.set(
        "options",
        toml_to_lua(lua, &toml::Value::Table(options.clone()))?,
    )?;
    Ok(imap)
}

/// `imap.upstream_up(name)`: true or false, nil for a name no upstream has; `imap.upstreams()`:
/// `{ { name = "mail1", up = true }, ... }` in configuration order. Each call reads the live
/// state (an atomic load per upstream), so a hook sees a probe's result at once.
fn upstream_functions(lua: &Lua, imap: &Table, health: Option<UpstreamHealth>) -> mlua::Result<()> {
    let h = health.clone();
    imap.set(
        "upstream_up",
        lua.create_function(move |_, name: String| Ok(h.as_ref().and_then(|h| h.up(&name))))?,
    )?;
    imap.set(
        "upstreams",
        lua.create_function(move |lua, ()| {
            let list = lua.create_table()?;
            if let Some(h) = &health {
                for (i, name) in h.names().enumerate() {
                    let entry = lua.create_table_with_capacity(0, 2)?;
                    entry.set("name", name)?;
                    entry.set("up", h.is_up(i))?;
                    list.raw_set(i + 1, entry)?;
                }
            }
            Ok(list)
        })?,
    )?;
    Ok(())
}

/// `imap.hash(s)`: FNV-1a (64-bit) over the bytes of `s`, then MurmurHash3's 64-bit
/// finalizer (`fmix64`) so that every input bit reaches every output bit, keeping the top 53
/// bits (an integer from 0 to 2^53 - 1, exact as a Lua float too).
///
/// It is part of the policy contract: routing by hash (`policies/route.lua`) places users
/// with it, so it must give the same value on every platform and in every version. Never
/// change it; the test `hash_is_stable` pins known values.
pub fn stable_hash(bytes: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    // 53 bits fit in an i64 (and in a double) whatever the sign handling.
    (h >> 11) as i64
}

/// Largest file `imap.read_map` reads.
const MAX_MAP_FILE: u64 = 64 * 1024 * 1024;

/// `imap.read_map(path)`: a map file as a table, `{ [key] = value }`, while the policy loads.
///
/// Only files the policy's own options name (a top-level option whose name ends in `_file`;
/// the configuration makes relative ones relative to its directory) and only at load time:
/// the script's top level runs again on every reload (SIGHUP), so the file is re-read then,
/// and no hook ever waits for a disk. The parsing is here, not in Lua, so that a map of many
/// thousand lines costs the load's instruction budget one call.
pub fn read_map_fn(
    lua: &Lua,
    options: &toml::Table,
    loading: Arc<AtomicBool>,
) -> mlua::Result<mlua::Function> {
    let named: Vec<String> = options
        .iter()
        .filter(|(k, _)| k.ends_with("_file"))
        .filter_map(|(_, v)| v.as_str().map(str::to_owned))
        .collect();
    lua.create_function(move |lua, path: String| {
        let err = |m: String| mlua::Error::RuntimeError(m);
        if !loading.load(Ordering::Relaxed) {
            return Err(err(
                "read_map works only while the policy loads (at its top level)".into(),
            ));
        }
        if !named.contains(&path) {
            return Err(err(format!(
                "read_map: {path:?} is not named by an option of this policy ending in `_file`"
            )));
        }
        let text = read_bounded(&path).map_err(|e| err(format!("{path}: {e}")))?;
        let map = parse_map(&text).map_err(|e| err(format!("{path}:{e}")))?;
        let t = lua.create_table_with_capacity(0, map.len())?;
        for (k, v) in map {
            t.raw_set(k, v)?;
        }
        Ok(t)
    })
}

fn read_bounded(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(MAX_MAP_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_MAP_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_MAP_FILE} bytes"
        )));
    }
    Ok(text)
}

/// `key value` per line, fields separated by blanks; blank lines, lines starting with `#` and
/// anything after a third field starting with `#` are comments. Errors name the line
/// (`line: message`).
fn parse_map(text: &str) -> Result<HashMap<&str, &str>, String> {
    let mut map = HashMap::new();
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let mut fields = line.split_ascii_whitespace();
        let Some(key) = fields.next() else { continue };
        if key.starts_with('#') {
            continue;
        }
        let value = fields
            .next()
            .filter(|v| !v.starts_with('#'))
            .ok_or_else(|| format!("{n}: expected `key value`, found only {key:?}"))?;
        if let Some(extra) = fields.next()
            && !extra.starts_with('#')
        {
            return Err(format!(
                "{n}: expected `key value` (and an optional # comment), found {extra:?} too"
            ));
        }
        if let Some(earlier) = first_seen.insert(key, n) {
            return Err(format!("{n}: {key:?} is mapped already on line {earlier}"));
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// `imap.list_match(pattern, name, delimiter)`: LIST wildcard matching in linear time
/// (`crate::imap::list_match`); `delimiter` is one character, or nil for a flat namespace. The
/// last compiled pattern is kept, since a policy typically matches many names against one.
fn list_match_fn(lua: &Lua) -> mlua::Result<mlua::Function> {
    let last: Mutex<Option<(String, Option<char>, ListPattern)>> = Mutex::new(None);
    lua.create_function(
        move |_, (pattern, name, delimiter): (String, String, Option<String>)| {
            let delimiter = match delimiter.as_deref().map(|d| {
                let mut chars = d.chars();
                (chars.next(), chars.next())
            }) {
                None => None,
                Some((Some(c), None)) => Some(c),
                Some(_) => {
                    return Err(mlua::Error::RuntimeError(
                        "list_match: the delimiter is one character or nil".into(),
                    ));
                }
            };
            let mut last = last
                .lock()
                .map_err(|_| mlua::Error::RuntimeError("list_match unavailable".into()))?;
            if let Some((p, d, compiled)) = last.as_ref()
                && *p == pattern
                && *d == delimiter
            {
                return Ok(compiled.matches(&name));
            }
            let compiled = ListPattern::new(&pattern, delimiter)
                .map_err(|e| mlua::Error::RuntimeError(e.to_string()))?;
            let matched = compiled.matches(&name);
            *last = Some((pattern, delimiter, compiled));
            Ok(matched)
        },
    )
}

/// Whether `ip` lies in `network` (`addr/len`, or a single address); `None` when `network`
/// is not a network.
pub fn ip_in(ip: &str, network: &str) -> Option<bool> {
    use std::net::IpAddr;
    let (base, len) = match network.split_once('/') {
        Some((b, l)) => (b.parse::<IpAddr>().ok()?, Some(l.parse::<u32>().ok()?)),
        None => (network.parse::<IpAddr>().ok()?, None),
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return Some(false);
    };
    let (a, b, bits) = match (ip, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(a.to_bits()), u128::from(b.to_bits()), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits(), b.to_bits(), 128),
        (IpAddr::V6(a), IpAddr::V4(b)) => match a.to_ipv4_mapped() {
            Some(a) => (u128::from(a.to_bits()), u128::from(b.to_bits()), 32),
            None => return Some(false),
        },
        (IpAddr::V4(_), IpAddr::V6(_)) => return Some(false),
    };
    let len = len.unwrap_or(bits);
    if len > bits {
        return None;
    }
    if len == 0 {
        return Some(true);
    }
    let shift = bits - len;
    Some(a >> shift == b >> shift)
}

/// `imap.metrics`: metrics a policy defines, exported under `imapgate_policy_` with a cap on
/// label values. Defining the same metric again (a reload) returns the same series.
fn metrics_table(lua: &Lua, metrics: Option<Metrics>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let m = metrics.clone();
    t.set(
        "counter",
        lua.create_function(
            move |_, (name, help, labels): (String, String, Option<Vec<String>>)| {
                let labels = labels.unwrap_or_default();
                let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                let c = m
                    .as_ref()
                    .map(|m| m.policy_counter(&name, &help, &refs))
                    .transpose()
                    .map_err(metrics_error)?;
                Ok(LuaMetric::Counter(c))
            },
        )?,
    )?;
    let m = metrics.clone();
    t.set(
        "gauge",
        lua.create_function(
            move |_, (name, help, labels): (String, String, Option<Vec<String>>)| {
                let labels = labels.unwrap_or_default();
                let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                let g = m
                    .as_ref()
                    .map(|m| m.policy_gauge(&name, &help, &refs))
                    .transpose()
                    .map_err(metrics_error)?;
                Ok(LuaMetric::Gauge(g))
            },
        )?,
    )?;
    let m = metrics;
    t.set(
        "histogram",
        lua.create_function(
            move |_,
                  (name, help, labels, buckets): (
                String,
                String,
                Option<Vec<String>>,
                Option<Vec<f64>>,
            )| {
                let labels = labels.unwrap_or_default();
                let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                let h = m
                    .as_ref()
                    .map(|m| m.policy_histogram(&name, &help, &refs, buckets.as_deref()))
                    .transpose()
                    .map_err(metrics_error)?;
                Ok(LuaMetric::Histogram(h))
            },
        )?,
    )?;
    Ok(t)
}

fn metrics_error(e: crate::metrics::MetricsError) -> mlua::Error {
    mlua::Error::RuntimeError(e.to_string())
}

/// A policy metric as Lua sees it: `c:inc(labels, by)`, `g:set(labels, v)`, `g:add(labels, d)`,
/// `h:observe(labels, v)`; `labels` is a list of values in the order the metric was defined
/// with (`{}` or nil for none). `None` inside: no metrics endpoint, updates go nowhere.
enum LuaMetric {
    Counter(Option<crate::metrics::PolicyCounter>),
    Gauge(Option<crate::metrics::PolicyGauge>),
    Histogram(Option<crate::metrics::PolicyHistogram>),
}

impl mlua::UserData for LuaMetric {
    fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method(
            "inc",
            |_, this, (labels, by): (Option<Vec<String>>, Option<f64>)| {
                let labels = labels.unwrap_or_default();
                let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                match this {
                    LuaMetric::Counter(Some(c)) => {
                        c.inc_by(&refs, by.unwrap_or(1.0)).map_err(metrics_error)
                    }
                    LuaMetric::Counter(None) => Ok(()),
                    _ => Err(mlua::Error::RuntimeError("inc is for counters".into())),
                }
            },
        );
        methods.add_method("set", |_, this, (labels, v): (Option<Vec<String>>, f64)| {
            let labels = labels.unwrap_or_default();
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            match this {
                LuaMetric::Gauge(Some(g)) => g.set(&refs, v).map_err(metrics_error),
                LuaMetric::Gauge(None) => Ok(()),
                _ => Err(mlua::Error::RuntimeError("set is for gauges".into())),
            }
        });
        methods.add_method("add", |_, this, (labels, d): (Option<Vec<String>>, f64)| {
            let labels = labels.unwrap_or_default();
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            match this {
                LuaMetric::Gauge(Some(g)) => g.add(&refs, d).map_err(metrics_error),
                LuaMetric::Gauge(None) => Ok(()),
                _ => Err(mlua::Error::RuntimeError("add is for gauges".into())),
            }
        });
        methods.add_method(
            "observe",
            |_, this, (labels, v): (Option<Vec<String>>, f64)| {
                let labels = labels.unwrap_or_default();
                let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                match this {
                    LuaMetric::Histogram(Some(h)) => h.observe(&refs, v).map_err(metrics_error),
                    LuaMetric::Histogram(None) => Ok(()),
                    _ => Err(mlua::Error::RuntimeError(
                        "observe is for histograms".into(),
                    )),
                }
            },
        );
    }
}

pub(super) fn ttl_of(ttl: Option<f64>) -> mlua::Result<Option<Duration>> {
    match ttl {
        None => Ok(None),
        Some(t) => Duration::try_from_secs_f64(t)
            .map(Some)
            .map_err(|_| mlua::Error::RuntimeError("ttl must be a number of seconds >= 0".into())),
    }
}

fn toml_to_lua(lua: &Lua, value: &toml::Value) -> mlua::Result<Value> {
    Ok(match value {
        toml::Value::String(s) => Value::String(lua.create_string(s)?),
        toml::Value::Integer(i) => Value::Integer(*i),
        toml::Value::Float(f) => Value::Number(*f),
        toml::Value::Boolean(b) => Value::Boolean(*b),
        toml::Value::Datetime(d) => Value::String(lua.create_string(d.to_string())?),
        toml::Value::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, toml_to_lua(lua, item)?)?;
            }
            Value::Table(t)
        }
        toml::Value::Table(map) => {
            let t = lua.create_table()?;
            for (k, v) in map {
                t.set(k.as_str(), toml_to_lua(lua, v)?)?;
            }
            Value::Table(t)
        }
    })
}

/// A verdict table from `imap.reject` and friends, checked: what goes on the wire must be
/// encodable (codes are atoms, texts have no CR, LF or NUL).
pub fn verdict_from_table(t: &Table) -> mlua::Result<Verdict> {
    let kind: Option<String> = t.get("verdict")?;
    let err = |m: String| mlua::Error::RuntimeError(m);
    match kind.as_deref() {
        Some("reject") => {
            let status = match t.get::<Option<String>>("status")?.as_deref() {
                None | Some("NO") | Some("no") => Status::No,
                Some("BAD") | Some("bad") => Status::Bad,
                Some(other) => {
                    return Err(err(format!(
                        "reject status must be NO or BAD, not {other:?}"
                    )));
                }
            };
            let code = t.get::<Option<String>>("code")?;
            if let Some(c) = &code
                && (!is_valid_atom(c.as_bytes()) || c.contains(['[', ']']))
            {
                return Err(err(format!("{c:?} is not a valid response code")));
            }
            let text = checked_text(t.get::<Option<String>>("text")?, "Refused by policy")?;
            Ok(Verdict::Reject { status, code, text })
        }
        Some("close") => Ok(Verdict::Close {
            text: checked_text(t.get::<Option<String>>("text")?, "Closing the connection")?,
        }),
        Some("delay") => {
            let ms: f64 = t.get("ms")?;
            let d = Duration::try_from_secs_f64(ms / 1000.0)
                .map_err(|_| err("delay must be a number of milliseconds >= 0".into()))?;
            Ok(Verdict::Delay(d.min(MAX_DELAY)))
        }
        Some("drop") => Ok(Verdict::Drop),
        Some("route") => {
            let name = |v: String| {
                let ok = !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                ok.then_some(v).ok_or_else(|| {
                    err("route: upstream names are letters, digits, '-', '_', '.'".into())
                })
            };
            let mut upstreams = vec![name(t.get::<String>("upstream")?)?];
            if let Some(fallbacks) = t.get::<Option<Table>>("fallbacks")? {
                for f in fallbacks.sequence_values::<String>() {
                    upstreams.push(name(f?)?);
                }
            }
            let user = t.get::<Option<String>>("user")?;
            if let Some(u) = &user
                && (u.is_empty() || u.len() > MAX_TEXT || u.contains(['\r', '\n', '\0']))
            {
                return Err(err(
                    "route: user must be 1 to 512 bytes without CR, LF or NUL".into(),
                ));
            }
            Ok(Verdict::Route(super::Route { upstreams, user }))
        }
        _ => Err(err(
            "a hook returns nothing or a verdict made by imap.reject/close/delay/drop/route".into(),
        )),
    }
}

fn checked_text(text: Option<String>, default: &str) -> mlua::Result<String> {
    let text = text.unwrap_or_else(|| default.to_string());
    if text.len() > MAX_TEXT || text.contains(['\r', '\n', '\0']) || text.starts_with('[') {
        return Err(mlua::Error::RuntimeError(
            "verdict text must be at most 512 bytes without CR, LF, NUL or a leading '['".into(),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::{ip_in, parse_map, stable_hash};

    #[test]
    fn hash_is_stable() {
        // Users are placed with these values: they must never change.
        // (Computed independently: a ten-line Python version of the doc comment.)
        assert_eq!(stable_hash(b""), 8_437_669_077_406_501);
        assert_eq!(
            stable_hash(b"alice@example.org:mail1"),
            4_191_030_146_214_018
        );
        assert_eq!(
            stable_hash(b"alice@example.org:mail2"),
            5_409_420_068_852_254
        );
        assert!((0..1 << 53).contains(&stable_hash(&[0xff; 300])));
    }

    #[test]
    fn map_files() {
        let map = parse_map(
            "# users moved by hand\n\nalice@example.org  mail2\n\t*@example.net mail3 # all of them\nBob mail1\n",
        )
        .expect("parses");
        assert_eq!(map.len(), 3);
        assert_eq!(map["alice@example.org"], "mail2");
        assert_eq!(map["*@example.net"], "mail3");
        assert_eq!(map["Bob"], "mail1");
        assert_eq!(
            parse_map("a b\nlonely\n").unwrap_err(),
            "2: expected `key value`, found only \"lonely\""
        );
        assert!(parse_map("a b c\n").unwrap_err().starts_with("1: expected"));
        assert!(parse_map("a #b\n").unwrap_err().starts_with("1: expected"));
        assert_eq!(
            parse_map("a b\na c\n").unwrap_err(),
            "2: \"a\" is mapped already on line 1"
        );
    }

    #[test]
    fn networks() {
        assert_eq!(ip_in("10.1.2.3", "10.0.0.0/8"), Some(true));
        assert_eq!(ip_in("11.1.2.3", "10.0.0.0/8"), Some(false));
        assert_eq!(ip_in("127.0.0.1", "127.0.0.1"), Some(true));
        assert_eq!(ip_in("::1", "::1/128"), Some(true));
        assert_eq!(ip_in("::ffff:10.0.0.1", "10.0.0.0/8"), Some(true));
        assert_eq!(ip_in("10.0.0.1", "0.0.0.0/0"), Some(true));
        assert_eq!(ip_in("10.0.0.1", "10.0.0.0/33"), None);
        assert_eq!(ip_in("10.0.0.1", "banana"), None);
    }
}
