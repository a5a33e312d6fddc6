//! Prometheus metrics and the `/metrics` + `/healthz` HTTP endpoint.
//!
//! One [`Metrics`] per process, with its own [`prometheus::Registry`] (never the crate's global
//! default one, so tests and embedders can run several side by side). It is an `Arc` inside:
//! clone it into every task that counts something.
//!
//! - [`labels`]: the closed label-value sets (command result, login result, direction).
//! - [`builtin`](self::builtin): names, help texts and buckets of the built-in metrics.
//! - `commands`: the per-command handle cache behind [`Metrics::command_completed`].
//! - [`policy_defined`](self::policy_defined): metrics that Lua policies define, with their
//!   cardinality cap.
//! - `http`: the endpoint ([`bind`], [`serve`], [`HealthState`]).
//! - `process`: the `process_*` metrics (Linux).

pub mod builtin;
mod commands;
mod http;
pub mod labels;
mod names;
pub mod policy_defined;
mod process;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, Registry, TextEncoder};

pub use self::builtin::{
    ConnectionGuard, ListenerMetrics, PolicyHookMetrics, StateMetrics, UpstreamMetrics,
};
pub use self::http::{HealthState, MetricsServer, bind, handler, serve};
pub use self::labels::{
    CommandResult, Direction, LoginResult, ProxyRefusal, SessionLimit, StateOp, StateResult,
};
pub use self::names::POLICY_PREFIX;
pub use self::policy_defined::{PolicyCounter, PolicyGauge, PolicyHistogram};

use self::builtin::Builtin;
use self::commands::CommandCache;
use self::policy_defined::PolicyDefined;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint: cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what} name {name:?} is not valid: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("metric {name} is already defined as {existing}")]
    Conflict { name: String, existing: String },
    #[error("policies may define at most {max} metrics")]
    TooManyMetrics { max: usize },
    #[error("metric {name}: at most {max} labels")]
    TooManyLabels { name: String, max: usize },
    #[error("metric {name}: {got} label values given, the metric has {expected} labels")]
    LabelCount {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("metric {name}: {value} refused: {reason}")]
    InvalidValue {
        name: String,
        value: f64,
        reason: &'static str,
    },
    #[error("metric {name}: invalid buckets: {reason}")]
    InvalidBuckets { name: String, reason: &'static str },
    /// The prometheus crate refused a definition or a label set.
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// The process's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    builtin: Builtin,
    commands: CommandCache,
    policy: PolicyDefined,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every built-in metric and, on Linux, the process metrics.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Registration fails only for a malformed or duplicate definition. The definitions are
        // constants, and every test that builds a `Metrics` would catch a bad one at once.
        let builtin = Builtin::register(&registry).expect("built-in metric definitions are valid");
        if let Err(error) = process::register(&registry) {
            // Process metrics are a convenience: a platform quirk must not stop the proxy.
            tracing::warn!(%error, "process metrics unavailable");
        }
        let commands = CommandCache::new(
            builtin.commands_total.clone(),
            builtin.command_duration.clone(),
        );
        let policy = PolicyDefined::new(registry.clone(), builtin.series_overflow.clone());
        Metrics {
            inner: Arc::new(Inner {
                registry,
                builtin,
                commands,
                policy,
            }),
        }
    }

    /// The registry, for collectors of other modules.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The handles of one listener, resolved once (the accept loop can keep them).
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        self.inner.builtin.listener(name)
    }

    /// Counts an accepted connection; it is active until the guard is dropped.
    pub fn connection_opened(&self, listener: &str) -> ConnectionGuard {
        self.listener(listener).connection_opened()
    }

    pub fn tls_handshake_failed(&self, listener: &str) {
        self.inner
            .builtin
            .tls_handshake_failures
            .with_label_values(&[listener])
            .inc();
    }

    pub fn upstream_connect_failed(&self) {
        self.inner.builtin.upstream_connect_failures.inc();
    }

    /// The health handles of one configured upstream (`upstream` label), resolved once.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        self.inner.builtin.upstream(name)
    }

    /// A command's outcome. `command` is [`crate::imap::command::CommandName::label`], a fixed
    /// set; `duration` is from forwarding to the tagged response, `None` for a command that was
    /// never forwarded (rejected) or never answered (aborted).
    pub fn command_completed(
        &self,
        command: &'static str,
        result: CommandResult,
        duration: Option<Duration>,
    ) {
        self.inner.commands.record(command, result, duration);
    }

    pub fn login(&self, result: LoginResult) {
        self.inner.builtin.logins[result as usize].inc();
    }

    /// The handles of one (policy, hook) pair, resolved once.
    pub fn policy_hook(&self, policy: &str, hook: &str) -> PolicyHookMetrics {
        self.inner.builtin.policy_hook(policy, hook)
    }

    /// `action` comes from the policy engine's fixed set (`pass`, `reject`, `close`, `delay`,
    /// `drop`, `error`); `policy` is a configured policy's name and `hook` a hook name, so all three
    /// are bounded.
    pub fn policy_decision(&self, policy: &str, hook: &str, action: &str) {
        self.inner
            .builtin
            .policy_decisions
            .with_label_values(&[policy, hook, action])
            .inc();
    }

    pub fn policy_error(&self, policy: &str, hook: &str) {
        self.inner
            .builtin
            .policy_errors
            .with_label_values(&[policy, hook])
            .inc();
    }

    pub fn policy_duration(&self, policy: &str, hook: &str, elapsed: Duration) {
        self.inner
            .builtin
            .policy_duration
            .with_label_values(&[policy, hook])
            .observe(elapsed.as_secs_f64());
    }

    /// Bytes relayed; called per read, so a pre-resolved atomic add.
    pub fn bytes(&self, direction: Direction, n: u64) {
        self.inner.builtin.bytes[direction as usize].inc_by(n);
    }

    /// A connection limit refused a session (or ended it, at login).
    pub fn session_refused(&self, limit: SessionLimit) {
        self.inner.builtin.sessions_refused[limit as usize].inc();
    }

    /// The shared-state (Redis) handles, resolved at start.
    pub fn state(&self) -> StateMetrics {
        self.inner.builtin.state.clone()
    }

    /// Sessions an administrator kicked.
    pub fn sessions_kicked(&self, n: usize) {
        self.inner.builtin.sessions_kicked.inc_by(n as u64);
    }

    /// Bytes passed socket to socket with splice(2) (also counted by [`Metrics::bytes`]).
    pub fn spliced(&self, n: u64) {
        self.inner.builtin.spliced_bytes.inc_by(n);
    }

    pub fn desync(&self) {
        self.inner.builtin.desync.inc();
    }

    pub fn response_hidden(&self) {
        self.inner.builtin.responses_hidden.inc();
    }

    pub fn parse_error(&self, direction: Direction) {
        self.inner.builtin.parse_errors[direction as usize].inc();
    }

    /// The counter the audit writer bumps for each record it had to drop.
    pub fn audit_dropped_counter(&self) -> IntCounter {
        self.inner.builtin.audit_dropped.clone()
    }

    /// Defines (or finds again, after a reload) a policy counter `imapgate_policy_<name>_total`.
    /// See [`policy_defined`] for the rules.
    pub fn policy_counter(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
    ) -> Result<PolicyCounter, MetricsError> {
        self.inner.policy.counter(name, help, label_names)
    }

    /// Defines (or finds again) a policy gauge `imapgate_policy_<name>`.
    pub fn policy_gauge(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
    ) -> Result<PolicyGauge, MetricsError> {
        self.inner.policy.gauge(name, help, label_names)
    }

    /// Defines (or finds again) a policy histogram `imapgate_policy_<name>`; `buckets` `None`
    /// means Prometheus's default buckets (5 ms to 10 s).
    pub fn policy_histogram(
        &self,
        name: &str,
        help: &str,
        label_names: &[&str],
        buckets: Option<&[f64]>,
    ) -> Result<PolicyHistogram, MetricsError> {
        self.inner
            .policy
            .histogram(name, help, label_names, buckets)
    }

    /// The Prometheus text format (version 0.0.4) of every metric.
    ///
    /// Each family is encoded on its own, so that one the encoder refuses (which would be a bug)
    /// costs that family, not the whole scrape.
    pub fn render(&self) -> String {
        let encoder = TextEncoder::new();
        let mut out = String::with_capacity(16 * 1024);
        let mut buf = String::new();
        for family in self.inner.registry.gather() {
            buf.clear();
            match encoder.encode_utf8(std::slice::from_ref(&family), &mut buf) {
                Ok(()) => out.push_str(&buf),
                Err(error) => {
                    tracing::error!(family = family.name(), %error, "cannot encode a metric family");
                }
            }
        }
        out
    }
}
