//! The built-in metrics: their names, help texts and buckets, and the handles the session
//! updates.
//!
//! Handles are resolved once (per listener, per direction, per command) so that the hot path is
//! an atomic add, not a label lookup: `imapgate_bytes_total` is incremented on every read.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::labels::{Direction, LoginResult, ProxyRefusal, SessionLimit, StateOp, StateResult};

pub const CONNECTIONS_TOTAL: &str = "imapgate_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "imapgate_connections_active";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "imapgate_tls_handshake_failures_total";
pub const PROXY_PROTOCOL_REFUSED_TOTAL: &str = "imapgate_proxy_protocol_refused_total";
pub const UPSTREAM_CONNECT_FAILURES_TOTAL: &str = "imapgate_upstream_connect_failures_total";
pub const COMMANDS_TOTAL: &str = "imapgate_commands_total";
pub const COMMAND_DURATION_SECONDS: &str = "imapgate_command_duration_seconds";
pub const LOGINS_TOTAL: &str = "imapgate_logins_total";
pub const POLICY_DECISIONS_TOTAL: &str = "imapgate_policy_decisions_total";
pub const POLICY_ERRORS_TOTAL: &str = "imapgate_policy_errors_total";
pub const POLICY_DURATION_SECONDS: &str = "imapgate_policy_duration_seconds";
pub const BYTES_TOTAL: &str = "imapgate_bytes_total";
pub const SPLICED_BYTES_TOTAL: &str = "imapgate_spliced_bytes_total";
pub const PARSE_ERRORS_TOTAL: &str = "imapgate_parse_errors_total";
pub const AUDIT_DROPPED_TOTAL: &str = "imapgate_audit_dropped_total";
pub const SERIES_OVERFLOW_TOTAL: &str = "imapgate_policy_metric_overflow_total";
pub const DESYNC_TOTAL: &str = "imapgate_desync_total";
pub const RESPONSES_HIDDEN_TOTAL: &str = "imapgate_responses_hidden_total";
pub const UPSTREAM_UP: &str = "imapgate_upstream_up";
pub const UPSTREAM_PROBE_FAILURES_TOTAL: &str = "imapgate_upstream_probe_failures_total";
pub const UPSTREAM_WARM_CONNECTIONS: &str = "imapgate_upstream_warm_connections";
pub const UPSTREAM_SESSIONS_TOTAL: &str = "imapgate_upstream_sessions_total";
pub const SESSIONS_REFUSED_TOTAL: &str = "imapgate_sessions_refused_total";
pub const SESSIONS_KICKED_TOTAL: &str = "imapgate_sessions_kicked_total";
pub const STATE_REQUESTS_TOTAL: &str = "imapgate_state_requests_total";
pub const STATE_DURATION_SECONDS: &str = "imapgate_state_duration_seconds";

/// Every built-in family name and whether it is a histogram (whose `_bucket`, `_sum` and
/// `_count` series also take names), for the clash check of policy-defined metrics.
pub const BUILTIN_NAMES: &[(&str, bool)] = &[
    (CONNECTIONS_TOTAL, false),
    (CONNECTIONS_ACTIVE, false),
    (TLS_HANDSHAKE_FAILURES_TOTAL, false),
    (PROXY_PROTOCOL_REFUSED_TOTAL, false),
    (UPSTREAM_CONNECT_FAILURES_TOTAL, false),
    (COMMANDS_TOTAL, false),
    (COMMAND_DURATION_SECONDS, true),
    (LOGINS_TOTAL, false),
    (POLICY_DECISIONS_TOTAL, false),
    (POLICY_ERRORS_TOTAL, false),
    (POLICY_DURATION_SECONDS, true),
    (BYTES_TOTAL, false),
    (SPLICED_BYTES_TOTAL, false),
    (PARSE_ERRORS_TOTAL, false),
    (AUDIT_DROPPED_TOTAL, false),
    (SERIES_OVERFLOW_TOTAL, false),
    (DESYNC_TOTAL, false),
    (RESPONSES_HIDDEN_TOTAL, false),
    (UPSTREAM_UP, false),
    (UPSTREAM_PROBE_FAILURES_TOTAL, false),
    (UPSTREAM_WARM_CONNECTIONS, false),
    (UPSTREAM_SESSIONS_TOTAL, false),
    (SESSIONS_REFUSED_TOTAL, false),
    (SESSIONS_KICKED_TOTAL, false),
    (STATE_REQUESTS_TOTAL, false),
    (STATE_DURATION_SECONDS, true),
];

/// From forwarding a command to its tagged response. A NOOP answers in about a millisecond on a
/// local server; a SEARCH over a large mailbox or a big APPEND can take tens of seconds. Anything
/// above 60 s lands in `+Inf`.
pub const COMMAND_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One Lua hook call: a few microseconds when it returns at once, milliseconds at worst (the
/// instruction budget stops it well before a second).
pub const POLICY_BUCKETS: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
];

/// One shared-state request (Redis): about 50 µs to 200 µs over loopback, milliseconds across
/// a network; the command timeout (default 100 ms) ends the slow ones.
pub const STATE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// The metric families, registered in a [`Registry`].
pub(crate) struct Builtin {
    pub connections_total: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub tls_handshake_failures: IntCounterVec,
    pub proxy_protocol_refused: IntCounterVec,
    pub upstream_connect_failures: IntCounter,
    pub commands_total: IntCounterVec,
    pub command_duration: HistogramVec,
    pub logins: [IntCounter; 3],
    pub policy_decisions: IntCounterVec,
    pub policy_errors: IntCounterVec,
    pub policy_duration: HistogramVec,
    pub bytes: [IntCounter; 2],
    pub spliced_bytes: IntCounter,
    pub parse_errors: [IntCounter; 2],
    pub audit_dropped: IntCounter,
    pub series_overflow: IntCounterVec,
    pub desync: IntCounter,
    pub responses_hidden: IntCounter,
    pub upstream_up: IntGaugeVec,
    pub upstream_probe_failures: IntCounterVec,
    pub upstream_warm: IntGaugeVec,
    pub upstream_sessions: IntCounterVec,
    pub sessions_refused: [IntCounter; 3],
    pub sessions_kicked: IntCounter,
    pub state: StateMetrics,
}

impl Builtin {
    pub fn register(registry: &Registry) -> prometheus::Result<Builtin> {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let vec = HistogramVec::new(opts, labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };

        let connections_total = counter_vec(
            CONNECTIONS_TOTAL,
            "Client connections accepted, by listener.",
            &["listener"],
        )?;
        let connections_active = IntGaugeVec::new(
            Opts::new(
                CONNECTIONS_ACTIVE,
                "Client connections open now, by listener.",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(connections_active.clone()))?;
        let tls_handshake_failures = counter_vec(
            TLS_HANDSHAKE_FAILURES_TOTAL,
            "Client TLS handshakes (implicit or STARTTLS) that failed or timed out, by listener.",
            &["listener"],
        )?;
        let proxy_protocol_refused = counter_vec(
            PROXY_PROTOCOL_REFUSED_TOTAL,
            "Connections on a proxy_protocol listener closed before TLS or IMAP, by listener and \
             reason (untrusted source, missing, invalid or late header, closed inside it).",
            &["listener", "reason"],
        )?;
        let upstream_connect_failures = IntCounter::new(
            UPSTREAM_CONNECT_FAILURES_TOTAL,
            "Sessions that could not reach the upstream server (connect, TLS, greeting).",
        )?;
        registry.register(Box::new(upstream_connect_failures.clone()))?;
        let commands_total = counter_vec(
            COMMANDS_TOTAL,
            "Client commands by name and outcome (ok, no, bad, rejected by a policy, aborted).",
            &["command", "result"],
        )?;
        let command_duration = histogram_vec(
            COMMAND_DURATION_SECONDS,
            "Time from forwarding a command to the upstream to its tagged response.",
            &["command"],
            COMMAND_BUCKETS,
        )?;
        let logins_vec = counter_vec(
            LOGINS_TOTAL,
            "LOGIN and AUTHENTICATE attempts by outcome (ok, failed upstream, refused by imapgate).",
            &["result"],
        )?;
        let policy_decisions = counter_vec(
            POLICY_DECISIONS_TOTAL,
            "Verdicts returned by policy hooks, by policy, hook and action.",
            &["policy", "hook", "action"],
        )?;
        let policy_errors = counter_vec(
            POLICY_ERRORS_TOTAL,
            "Policy hook calls that failed (Lua error, budget or memory exceeded).",
            &["policy", "hook"],
        )?;
        let policy_duration = histogram_vec(
            POLICY_DURATION_SECONDS,
            "Time spent in one policy hook call.",
            &["policy", "hook"],
            POLICY_BUCKETS,
        )?;
        let bytes_vec = counter_vec(BYTES_TOTAL, "Bytes relayed, by direction.", &["direction"])?;
        let parse_errors_vec = counter_vec(
            PARSE_ERRORS_TOTAL,
            "Messages that did not parse and were relayed raw, by direction.",
            &["direction"],
        )?;
        let audit_dropped = IntCounter::new(
            AUDIT_DROPPED_TOTAL,
            "Audit records dropped because the audit writer fell behind or could not write.",
        )?;
        registry.register(Box::new(audit_dropped.clone()))?;
        let series_overflow = counter_vec(
            SERIES_OVERFLOW_TOTAL,
            "Updates of a policy-defined metric that went to its __overflow__ series because \
             it had reached its cap of distinct label values.",
            &["metric"],
        )?;

        let spliced_bytes = IntCounter::new(
            SPLICED_BYTES_TOTAL,
            "Bytes of response literals passed from the upstream's socket to the client's with \
             splice(2), never copied through imapgate (both legs plain TCP, Linux); part of \
             imapgate_bytes_total{direction=\"upstream_to_client\"}.",
        )?;
        registry.register(Box::new(spliced_bytes.clone()))?;
        let desync = IntCounter::new(
            DESYNC_TOTAL,
            "Sessions closed because the upstream answered a command imapgate never forwarded \
             or asked for data nobody announced: imapgate and the server read the client's \
             bytes differently.",
        )?;
        registry.register(Box::new(desync.clone()))?;
        let responses_hidden = IntCounter::new(
            RESPONSES_HIDDEN_TOTAL,
            "Untagged responses not relayed: dropped by a policy, outside the client's own LIST \
             pattern, or not judged because a policy failed on them.",
        )?;
        registry.register(Box::new(responses_hidden.clone()))?;
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                UPSTREAM_UP,
                "Whether the upstream answered its last health probe (connect and greeting) \
                 and no session has failed to reach it since: 1 up, 0 down.",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_up.clone()))?;
        let upstream_probe_failures = counter_vec(
            UPSTREAM_PROBE_FAILURES_TOTAL,
            "Health probes of the upstream that failed (connect, TLS, greeting or timeout).",
            &["upstream"],
        )?;
        let upstream_warm = IntGaugeVec::new(
            Opts::new(
                UPSTREAM_WARM_CONNECTIONS,
                "Connections to the upstream opened, secured and greeted ahead of use \
                 (upstream.warm), ready now.",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_warm.clone()))?;
        let upstream_sessions = counter_vec(
            UPSTREAM_SESSIONS_TOTAL,
            "Connections to the upstream handed to a session, by connection: warm (opened \
             ahead) or fresh (opened for it; upstream.warm too small, or 0).",
            &["upstream", "connection"],
        )?;
        let sessions_refused_vec = counter_vec(
            SESSIONS_REFUSED_TOTAL,
            "Sessions refused or ended by a connection limit, by limit (max_connections and \
             max_connections_per_address at accept, max_connections_per_user at login).",
            &["limit"],
        )?;
        let sessions_kicked = IntCounter::new(
            SESSIONS_KICKED_TOTAL,
            "Sessions an administrator ended through the admin endpoint.",
        )?;
        registry.register(Box::new(sessions_kicked.clone()))?;
        let state_requests = counter_vec(
            STATE_REQUESTS_TOTAL,
            "Shared-state (Redis) requests by operation and result (ok, error, timeout).",
            &["op", "result"],
        )?;
        let state_duration = histogram_vec(
            STATE_DURATION_SECONDS,
            "Time of one shared-state (Redis) request, answered or not, by operation.",
            &["op"],
            STATE_BUCKETS,
        )?;
        let state = StateMetrics {
            requests: StateOp::ALL.map(|op| {
                StateResult::ALL
                    .map(|r| state_requests.with_label_values(&[op.as_str(), r.as_str()]))
            }),
            duration: StateOp::ALL.map(|op| state_duration.with_label_values(&[op.as_str()])),
        };

        // Resolved now, so that these series exist (at 0) from the first scrape: `rate()` over
        // a series that appears at its first increment misses that increment.
        let logins = LoginResult::ALL.map(|r| logins_vec.with_label_values(&[r.as_str()]));
        let bytes = Direction::ALL.map(|d| bytes_vec.with_label_values(&[d.as_str()]));
        let parse_errors =
            Direction::ALL.map(|d| parse_errors_vec.with_label_values(&[d.as_str()]));
        let sessions_refused =
            SessionLimit::ALL.map(|l| sessions_refused_vec.with_label_values(&[l.as_str()]));

        Ok(Builtin {
            connections_total,
            connections_active,
            tls_handshake_failures,
            proxy_protocol_refused,
            upstream_connect_failures,
            commands_total,
            command_duration,
            logins,
            policy_decisions,
            policy_errors,
            policy_duration,
            bytes,
            parse_errors,
            audit_dropped,
            series_overflow,
            desync,
            spliced_bytes,
            responses_hidden,
            upstream_up,
            upstream_probe_failures,
            upstream_warm,
            upstream_sessions,
            sessions_refused,
            sessions_kicked,
            state,
        })
    }

    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            up: self.upstream_up.with_label_values(&[name]),
            probe_failures: self.upstream_probe_failures.with_label_values(&[name]),
            warm: self.upstream_warm.with_label_values(&[name]),
            sessions: [
                self.upstream_sessions.with_label_values(&[name, "warm"]),
                self.upstream_sessions.with_label_values(&[name, "fresh"]),
            ],
        }
    }

    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            connections_total: self.connections_total.with_label_values(&[name]),
            connections_active: self.connections_active.with_label_values(&[name]),
            tls_handshake_failures: self.tls_handshake_failures.with_label_values(&[name]),
            proxy_protocol_refused: self.proxy_protocol_refused.clone(),
            name: name.into(),
        }
    }

    pub fn policy_hook(&self, policy: &str, hook: &str) -> PolicyHookMetrics {
        PolicyHookMetrics {
            policy: policy.into(),
            hook: hook.into(),
            decisions: self.policy_decisions.clone(),
            errors: self.policy_errors.with_label_values(&[policy, hook]),
            duration: self.policy_duration.with_label_values(&[policy, hook]),
        }
    }
}

/// The metrics of one listener, resolved once. The accept loop can hold one and skip the label
/// lookup per connection.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    connections_total: IntCounter,
    connections_active: IntGauge,
    tls_handshake_failures: IntCounter,
    // Resolved at the first refusal: only listeners that read PROXY headers get series.
    proxy_protocol_refused: IntCounterVec,
    name: Box<str>,
}

impl ListenerMetrics {
    /// Counts an accepted connection; it stays in `imapgate_connections_active` until the guard
    /// is dropped, so that no exit path of a session can forget the decrement.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.connections_total.inc();
        self.connections_active.inc();
        ConnectionGuard {
            active: self.connections_active.clone(),
        }
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    pub fn proxy_protocol_refused(&self, reason: ProxyRefusal) {
        self.proxy_protocol_refused
            .with_label_values(&[&*self.name, reason.as_str()])
            .inc();
    }
}

/// The health metrics of one upstream, resolved once (so both series exist from the start).
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    up: IntGauge,
    probe_failures: IntCounter,
    warm: IntGauge,
    /// Warm, fresh.
    sessions: [IntCounter; 2],
}

impl UpstreamMetrics {
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub fn probe_failed(&self) {
        self.probe_failures.inc();
    }

    pub fn set_warm(&self, ready: usize) {
        self.warm.set(i64::try_from(ready).unwrap_or(i64::MAX));
    }

    /// A session got a connection to this upstream, `warm` (opened ahead) or fresh.
    pub fn session_connected(&self, warm: bool) {
        self.sessions[usize::from(!warm)].inc();
    }
}

/// The shared-state handles, every (op, result) series resolved at start.
#[derive(Clone, Debug)]
pub struct StateMetrics {
    requests: [[IntCounter; 3]; 7],
    duration: [Histogram; 7],
}

impl StateMetrics {
    pub fn record(&self, op: StateOp, result: StateResult, elapsed: std::time::Duration) {
        self.requests[op as usize][result as usize].inc();
        self.duration[op as usize].observe(elapsed.as_secs_f64());
    }
}

/// Keeps one connection counted in `imapgate_connections_active{listener}` while it lives.
#[derive(Debug)]
#[must_use = "the connection stops being counted as active when the guard is dropped"]
pub struct ConnectionGuard {
    active: IntGauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// The metrics of one (policy, hook) pair, resolved once; the policy engine can keep one per
/// loaded hook.
#[derive(Clone, Debug)]
pub struct PolicyHookMetrics {
    policy: Box<str>,
    hook: Box<str>,
    decisions: IntCounterVec,
    errors: IntCounter,
    duration: Histogram,
}

impl PolicyHookMetrics {
    /// `action` is one of a fixed set chosen by the policy engine (`pass`, `reject`, `close`,
    /// `delay`, `drop`, `error`), never a value taken from a client or a script.
    pub fn decision(&self, action: &str) {
        self.decisions
            .with_label_values(&[&*self.policy, &*self.hook, action])
            .inc();
    }

    pub fn error(&self) {
        self.errors.inc();
    }

    pub fn duration(&self, elapsed: std::time::Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }
}
