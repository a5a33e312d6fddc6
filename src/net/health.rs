//! Upstream health: which configured upstreams answer, kept fresh by one probe task each.
//!
//! [`UpstreamHealth`] is the state, shared by the probes, the sessions (a session that
//! cannot reach an upstream says so at once), the policies (`imap.upstream_up`), `/healthz`
//! and `/metrics`. Reading it is an atomic load: routing may look at it for every login.
//! [`start`] spawns the probes: connect and greeting (TLS and STARTTLS included, exactly as a
//! session connects), then a LOGOUT, every `[health] interval_s`, each bounded by `timeout_s`.
//! One answer brings an upstream up, one failure takes it down: a flapping upstream flaps in
//! the metrics too, rather than being hidden behind thresholds nobody configured.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, timeout, timeout_at};

use super::Stream;
use super::upstream::{Target, UpstreamError};
use crate::config::HealthConfig;
use crate::metrics::{Metrics, UpstreamMetrics};

/// The probe's goodbye. Its answer is not awaited: the probe's verdict is the greeting.
const LOGOUT: &[u8] = b"imapgate-probe LOGOUT\r\n";

/// Beyond `timeout_s`, how long the start waits for first probes that should have ended.
const FIRST_ROUND_GRACE: Duration = Duration::from_millis(500);

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Connect(#[source] UpstreamError),
    #[error("no greeting within {0:?} (health.timeout_s)")]
    Timeout(Duration),
}

/// The health of every configured upstream, in configuration order (the index of an upstream
/// here is its index in `config.upstreams`). Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct UpstreamHealth {
    upstreams: Arc<[Entry]>,
}

struct Entry {
    name: Box<str>,
    up: AtomicBool,
    /// Changed only with `detail` held, so that transitions are logged once and in order.
    detail: Mutex<Detail>,
    metrics: Option<UpstreamMetrics>,
}

struct Detail {
    since: SystemTime,
    last_error: Option<String>,
    /// Whether anything (a probe, a session) has said how the upstream is.
    known: bool,
}

/// One upstream's state, as a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamStatus {
    pub name: String,
    pub up: bool,
    /// When `up` last changed (or when the state was created).
    pub since: SystemTime,
    /// The most recent failure, kept after the upstream came back.
    pub last_error: Option<String>,
}

impl UpstreamHealth {
    /// The state before any probe: every upstream down until its first probe answers (a load
    /// balancer asking `/healthz` before then must not send clients yet). `metrics`, when
    /// given, gets `imapgate_upstream_up` and `imapgate_upstream_probe_failures_total` for
    /// each upstream at once.
    pub fn new<S: AsRef<str>>(
        names: impl IntoIterator<Item = S>,
        metrics: Option<&Metrics>,
    ) -> UpstreamHealth {
        UpstreamHealth::build(names, false, metrics)
    }

    /// For tools that run policies without probing (`imapgate replay`, `check`): every
    /// upstream counts as up, and nothing changes that unless told.
    pub fn unprobed<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> UpstreamHealth {
        UpstreamHealth::build(names, true, None)
    }

    fn build<S: AsRef<str>>(
        names: impl IntoIterator<Item = S>,
        up: bool,
        metrics: Option<&Metrics>,
    ) -> UpstreamHealth {
        let now = SystemTime::now();
        let upstreams = names
            .into_iter()
            .map(|name| {
                let name = name.as_ref();
                let metrics = metrics.map(|m| m.upstream(name));
                if let Some(m) = &metrics {
                    m.set_up(up);
                }
                Entry {
                    name: name.into(),
                    up: AtomicBool::new(up),
                    detail: Mutex::new(Detail {
                        since: now,
                        last_error: None,
                        known: up,
                    }),
                    metrics,
                }
            })
            .collect();
        UpstreamHealth { upstreams }
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The names, in configuration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.upstreams.iter().map(|e| &*e.name)
    }

    /// The index of the upstream called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.upstreams.iter().position(|e| &*e.name == name)
    }

    /// Whether upstream `i` is up; false for an index out of range.
    pub fn is_up(&self, i: usize) -> bool {
        self.upstreams
            .get(i)
            .is_some_and(|e| e.up.load(Ordering::Acquire))
    }

    /// Whether the upstream called `name` is up; `None` when there is none of that name.
    pub fn up(&self, name: &str) -> Option<bool> {
        self.index(name).map(|i| self.is_up(i))
    }

    /// Whether at least one upstream is up (`/healthz`).
    pub fn any_up(&self) -> bool {
        self.upstreams.iter().any(|e| e.up.load(Ordering::Acquire))
    }

    pub fn status(&self, i: usize) -> Option<UpstreamStatus> {
        let e = self.upstreams.get(i)?;
        let detail = lock(&e.detail);
        Some(UpstreamStatus {
            name: e.name.to_string(),
            up: e.up.load(Ordering::Acquire),
            since: detail.since,
            last_error: detail.last_error.clone(),
        })
    }

    /// Every upstream's state, in configuration order.
    pub fn statuses(&self) -> Vec<UpstreamStatus> {
        (0..self.len()).filter_map(|i| self.status(i)).collect()
    }

    /// A probe of upstream `i` got its greeting.
    pub fn probe_succeeded(&self, i: usize) {
        self.set(i, true, None);
    }

    /// A probe of upstream `i` failed: down, and counted in
    /// `imapgate_upstream_probe_failures_total`.
    pub fn probe_failed(&self, i: usize, error: &dyn fmt::Display) {
        if let Some(m) = self.upstreams.get(i).and_then(|e| e.metrics.as_ref()) {
            m.probe_failed();
        }
        self.set(i, false, Some(error.to_string()));
    }

    /// A session could not reach upstream `i` (connect, TLS, greeting): down now, without
    /// waiting for the next probe, which brings it back up when it answers again.
    pub fn connect_failed(&self, i: usize, error: &dyn fmt::Display) {
        self.set(i, false, Some(error.to_string()));
    }

    fn set(&self, i: usize, up: bool, error: Option<String>) {
        let Some(e) = self.upstreams.get(i) else {
            return;
        };
        let mut detail = lock(&e.detail);
        let was = e.up.load(Ordering::Acquire);
        let changed = was != up || !detail.known;
        if was != up {
            detail.since = SystemTime::now();
        }
        detail.known = true;
        if error.is_some() {
            detail.last_error = error;
        }
        e.up.store(up, Ordering::Release);
        if let Some(m) = &e.metrics {
            m.set_up(up);
        }
        if changed {
            match (&detail.last_error, up) {
                (_, true) => tracing::info!(upstream = %e.name, "upstream up"),
                (Some(error), false) => {
                    tracing::warn!(upstream = %e.name, %error, "upstream down")
                }
                (None, false) => tracing::warn!(upstream = %e.name, "upstream down"),
            }
        }
    }
}

impl fmt::Debug for UpstreamHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.upstreams
                    .iter()
                    .map(|e| (&*e.name, e.up.load(Ordering::Relaxed))),
            )
            .finish()
    }
}

/// A panicked holder cannot leave the detail half-written in a way that matters: take it.
fn lock(m: &Mutex<Detail>) -> MutexGuard<'_, Detail> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running probes; dropping it stops them.
pub struct Prober {
    tasks: JoinSet<()>,
    /// One permit per upstream whose first probe has ended.
    first_round: Arc<Semaphore>,
    upstreams: u32,
    timeout: Duration,
}

/// Spawns one probe task per upstream of `targets` (the same order as `health`). Each probes
/// at once, then every `config.interval_s`.
pub fn start(targets: &[Target], health: &UpstreamHealth, config: &HealthConfig) -> Prober {
    let first_round = Arc::new(Semaphore::new(0));
    let mut tasks = JoinSet::new();
    for (i, target) in targets.iter().enumerate() {
        tasks.spawn(probe_loop(Probe {
            index: i,
            target: target.clone(),
            health: health.clone(),
            interval: config.interval(),
            timeout: config.timeout(),
            first_round: first_round.clone(),
        }));
    }
    Prober {
        tasks,
        first_round,
        upstreams: u32::try_from(targets.len()).unwrap_or(u32::MAX),
        timeout: config.timeout(),
    }
}

impl Prober {
    /// Waits until every upstream has had its first probe: about `timeout_s` at most, since
    /// each probe is bounded by it (the grace only covers a probe task that died).
    pub async fn first_round(&self) {
        let all = self.first_round.acquire_many(self.upstreams);
        if timeout(self.timeout + FIRST_ROUND_GRACE, all)
            .await
            .is_err()
        {
            tracing::warn!("first health probes did not all end; starting anyway");
        }
    }

    /// Stops every probe.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }
}

struct Probe {
    index: usize,
    target: Target,
    health: UpstreamHealth,
    interval: Duration,
    timeout: Duration,
    first_round: Arc<Semaphore>,
}

async fn probe_loop(p: Probe) {
    let mut ticks = tokio::time::interval(p.interval);
    // A late probe (a stalled runtime) is followed by a full interval, not a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        ticks.tick().await;
        match probe(&p.target, p.timeout).await {
            Ok(()) => p.health.probe_succeeded(p.index),
            Err(e) => {
                tracing::debug!(upstream = %p.target.name(), error = %e, "health probe failed");
                p.health.probe_failed(p.index, &e);
            }
        }
        if first {
            first = false;
            p.first_round.add_permits(1);
        }
    }
}

/// Connects as a session would and reads the greeting, within `limit`.
pub async fn probe(target: &Target, limit: Duration) -> Result<(), ProbeError> {
    let deadline = Instant::now() + limit;
    let upstream = timeout_at(deadline, target.connect(None))
        .await
        .map_err(|_| ProbeError::Timeout(limit))?
        .map_err(ProbeError::Connect)?;
    // The server answered: that is the verdict. Saying goodbye is courtesy, so that the
    // server logs a logout rather than a lost connection; its failure changes nothing.
    let _ = timeout_at(deadline, goodbye(upstream.stream)).await;
    Ok(())
}

async fn goodbye(mut stream: Stream) -> std::io::Result<()> {
    stream.write_all(LOGOUT).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape_line(metrics: &Metrics, series: &str) -> Option<String> {
        metrics
            .render()
            .lines()
            .find(|l| l.starts_with(series))
            .map(str::to_owned)
    }

    #[test]
    fn down_until_probed_then_follows_probes_and_sessions() {
        let metrics = Metrics::new();
        let h = UpstreamHealth::new(["mail1", "mail2"], Some(&metrics));
        assert_eq!(h.len(), 2);
        assert_eq!(h.names().collect::<Vec<_>>(), ["mail1", "mail2"]);
        assert!(!h.any_up());
        assert_eq!(h.up("mail1"), Some(false));
        assert_eq!(h.up("mail3"), None);
        assert!(!h.is_up(7));
        assert_eq!(
            scrape_line(&metrics, "imapgate_upstream_up{upstream=\"mail2\"}").as_deref(),
            Some("imapgate_upstream_up{upstream=\"mail2\"} 0")
        );
        assert_eq!(
            scrape_line(
                &metrics,
                "imapgate_upstream_probe_failures_total{upstream=\"mail1\"}"
            )
            .as_deref(),
            Some("imapgate_upstream_probe_failures_total{upstream=\"mail1\"} 0")
        );

        h.probe_succeeded(1);
        assert!(h.any_up());
        assert_eq!((h.up("mail1"), h.up("mail2")), (Some(false), Some(true)));
        assert_eq!(
            scrape_line(&metrics, "imapgate_upstream_up{upstream=\"mail2\"}").as_deref(),
            Some("imapgate_upstream_up{upstream=\"mail2\"} 1")
        );
        let up_since = h.status(1).map(|s| s.since);

        // A session's failure is not a probe failure, but takes the upstream down at once.
        h.connect_failed(1, &"connection refused");
        let s = h.status(1).expect("mail2");
        assert!(!s.up);
        assert_eq!(s.last_error.as_deref(), Some("connection refused"));
        assert!(Some(s.since) >= up_since);
        assert!(!h.any_up());
        assert_eq!(
            scrape_line(
                &metrics,
                "imapgate_upstream_probe_failures_total{upstream=\"mail2\"}"
            )
            .as_deref(),
            Some("imapgate_upstream_probe_failures_total{upstream=\"mail2\"} 0")
        );

        h.probe_failed(0, &"timed out");
        h.probe_failed(0, &"refused");
        assert_eq!(
            scrape_line(
                &metrics,
                "imapgate_upstream_probe_failures_total{upstream=\"mail1\"}"
            )
            .as_deref(),
            Some("imapgate_upstream_probe_failures_total{upstream=\"mail1\"} 2")
        );
        assert_eq!(
            h.status(0).and_then(|s| s.last_error).as_deref(),
            Some("refused")
        );

        // Back up; the last error stays for whoever wants to know what happened.
        h.probe_succeeded(0);
        let statuses = h.statuses();
        assert_eq!(statuses.len(), 2);
        assert!(statuses[0].up && !statuses[1].up);
        assert_eq!(statuses[0].last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn clones_share_the_state_and_unprobed_counts_as_up() {
        let h = UpstreamHealth::unprobed(["default"]);
        let seen_by_a_session = h.clone();
        assert!(seen_by_a_session.any_up());
        h.connect_failed(0, &"gone");
        assert_eq!(seen_by_a_session.up("default"), Some(false));
        assert!(!UpstreamHealth::unprobed(Vec::<String>::new()).any_up());
        assert_eq!(format!("{h:?}"), "{\"default\": false}");
    }
}
