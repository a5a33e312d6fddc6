//! The load harness: imapgate against a direct connection to the same private Dovecot, in one
//! run. `benches/load.rs` is the command line; `tests/bench_smoke.rs` runs it with tiny sizes.
//!
//! The client leg is TLS or plaintext ([`ClientLeg`]), the same on both paths: over TLS,
//! "direct" connects to Dovecot's implicit-TLS port and "proxied" to imapgate's implicit-TLS
//! listener; in plaintext, to Dovecot's plain port and imapgate's plain listener. imapgate
//! relays to Dovecot's plain port (or to its TLS port with `Upstream::Tls`). Each round runs
//! every path once, in an order that rotates from round to round; figures are medians over
//! the rounds.
//!
//! imapgate runs in transparent mode (one `[upstream]`) for every scenario; the login scenario
//! also measures it routing (`[routing]`, two named upstreams that are both the same Dovecot,
//! so that the backend's work is the direct path's). The ratelimit scenario has imapgates of
//! its own: the shipped search_rate_limit alone, without `[state]`, with `[state]` on a private
//! redis-server but its bucket in process, and with its bucket shared in that Redis.
//!
//! On the plaintext client leg a third path runs in the same rounds: a blind relay
//! ([`blind`]) that only copies bytes between the client and Dovecot's plain port, in a
//! process of its own whose CPU is read as imapgate's is: what any proxy costs on this machine
//! before it parses anything.
#![allow(dead_code)]

pub mod bare_hooks;
pub mod blind;
pub mod client;
pub mod env;
pub mod scenarios;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde::Serialize;

use env::{Gate, Mode, Upstream};
use scenarios::Seed;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    FetchLarge,
    Small,
    /// `small` with one connection and one command in flight: latency without queueing.
    SmallSerial,
    Append,
    Idle,
    Imaplib,
    /// Connect + TLS + LOGIN + SELECT INBOX + LOGOUT, again and again, by several clients.
    Login,
    /// SEARCH (rate-limited by the shipped policy) and NOOP (not hooked) in turn, one at a
    /// time, through imapgates whose bucket is in process or in Redis.
    RateLimit,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::FetchLarge,
        Scenario::Small,
        Scenario::SmallSerial,
        Scenario::Append,
        Scenario::Idle,
        Scenario::Imaplib,
        Scenario::Login,
        Scenario::RateLimit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::FetchLarge => "fetch-large",
            Scenario::Small => "small",
            Scenario::SmallSerial => "small-serial",
            Scenario::Append => "append",
            Scenario::Idle => "idle",
            Scenario::Imaplib => "imaplib-append",
            Scenario::Login => "login",
            Scenario::RateLimit => "ratelimit",
        }
    }

    pub fn parse(s: &str) -> Result<Scenario, String> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Scenario::ALL.iter().map(|x| x.name()).collect();
                format!("unknown scenario {s:?} (known: {})", names.join(", "))
            })
    }
}

/// What the load generator speaks to the server it connects to (Dovecot directly, or
/// imapgate), the same on both paths of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientLeg {
    /// Implicit TLS: Dovecot's TLS port (Dovecot's imap-login terminates it and relays to the
    /// imap process), imapgate's TLS listener.
    Tls,
    /// No TLS anywhere when imapgate's upstream is plain too: Dovecot's plain port, imapgate's
    /// plain listener.
    Plain,
}

impl ClientLeg {
    pub fn label(self) -> &'static str {
        match self {
            ClientLeg::Tls => "tls",
            ClientLeg::Plain => "plain",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policies {
    None,
    Shipped,
    /// The shipped policies' hooks with nothing in them ([`bare_hooks`]).
    Hooks,
    /// A small `on_login` policy splitting the users over the two routed upstreams (routed
    /// imapgate only).
    OnLogin,
    /// The shipped search_rate_limit alone, bucket in process, no `[state]` (ratelimit
    /// scenario only, as are the next two).
    RateLimitLocal,
    /// The same with `[state]` configured: every hooked command now runs as a coroutine that
    /// could wait, but the bucket stays in process (`shared = false`).
    RateLimitLocalState,
    /// `[state]` and `shared = true`: one GCRA script round trip to Redis per SEARCH.
    RateLimitShared,
}

impl Policies {
    pub fn label(self) -> &'static str {
        match self {
            Policies::None => "none",
            Policies::Shipped => "shipped",
            Policies::Hooks => "hooks",
            Policies::OnLogin => "on_login",
            Policies::RateLimitLocal => "ratelimit-local",
            Policies::RateLimitLocalState => "ratelimit-local+state",
            Policies::RateLimitShared => "ratelimit-shared",
        }
    }

    /// One of the ratelimit scenario's own variants.
    pub fn is_ratelimit(self) -> bool {
        matches!(
            self,
            Policies::RateLimitLocal | Policies::RateLimitLocalState | Policies::RateLimitShared
        )
    }
}

/// The `on_login` policy of the routed variant: odd-numbered users to `mail2` (falling back to
/// `mail1`), the others to `mail1`, as a static route map would.
pub const ON_LOGIN_POLICY: &str = r#"return { name = "bench_route",
  on_login = function(ctx, login)
    local n = tonumber(string.match(login.user or "", "%d+$") or "0") or 0
    if n % 2 == 1 then
      return imap.route{ upstream = "mail2", fallbacks = { "mail1" } }
    end
    return imap.route{ upstream = "mail1" }
  end }
"#;

/// Everything a run can be told.
#[derive(Clone, Debug)]
pub struct Options {
    pub rounds: usize,
    /// Measured window of each run of fetch-large, small and append.
    pub duration: Duration,
    pub scenarios: Vec<Scenario>,
    pub policies: Vec<Policies>,
    pub upstreams: Vec<Upstream>,
    /// The client legs to measure. The plaintext one is measured through the imapgates with a
    /// plain upstream and no shipped policies (require_tls refuses a LOGIN without TLS).
    pub client_legs: Vec<ClientLeg>,
    pub idle_connections: usize,
    pub idle_rounds: usize,
    /// imapgate processes sharing the idle scenario's listeners (`reuse_port`).
    pub idle_instances: usize,
    /// How long the idle connections stay open after the memory reading (for an external
    /// profiler to take its own snapshot).
    pub idle_hold: Duration,
    /// How long imapgate's CPU time is read with every connection idle.
    pub idle_cpu_window: Duration,
    /// Idle sessions spot-checked for their IDLE notification: a message is appended to each
    /// one's INBOX straight on Dovecot, and the session must see `* n EXISTS`. 0: none.
    pub idle_notify_sample: usize,
    /// Dovecot's IDLE hibernation (`imap_hibernate_timeout`) in the harness's Dovecot.
    pub idle_hibernation: Option<Duration>,
    /// How often Dovecot tells a client in IDLE `* OK Still here`
    /// (`imap_idle_notify_interval`); `None`: never, so that the CPU read "while idle" is
    /// imapgate's own, with no traffic at all. Dovecot's default is 2 minutes, and it sends
    /// the keepalives of every session from one client address at the same moment (its phase
    /// is a hash of the address): through imapgate, all N at once, so a window shorter than
    /// the interval sees a burst of N or nothing.
    pub idle_keepalive: Option<Duration>,
    pub fetch_clients: usize,
    pub fetch_size: usize,
    pub fetch_messages: usize,
    pub small_connections: usize,
    pub small_depth: usize,
    pub append_clients: usize,
    pub append_size: usize,
    pub imaplib_appends: usize,
    /// Concurrent clients of the login scenario.
    pub login_clients: usize,
    /// Policy variants of the routed imapgate (login scenario only): `None` and `OnLogin`;
    /// empty: the login scenario measures only the transparent imapgate.
    pub routed_policies: Vec<Policies>,
    /// Also measure each routed variant with `warm = N` connections per upstream; 0: not.
    pub routed_warm: usize,
    /// The imapgate binary (default: see [`env::imapgate_binary`]).
    pub imapgate: Option<PathBuf>,
    /// Folder of the shipped policies.
    pub policy_dir: PathBuf,
    /// A TOML fragment with `[[policy]]` tables to use instead of the shipped three.
    pub policy_config: Option<PathBuf>,
    /// The Archive mailbox as clients name it through imapgate with policies (the shipped
    /// namespace policy maps `INBOX.Archive` to Dovecot's `Archive`).
    pub policy_archive: String,
    /// Also measure Dovecot's plaintext port (no TLS anywhere) as a second baseline.
    pub plain_baseline: bool,
    /// How to start the blind relay measured beside imapgate on the plaintext client leg
    /// (fetch-large, small, small-serial, append); `None`: not measured.
    pub blind: Option<blind::Launcher>,
    /// The blind relay's buffer per direction, in bytes.
    pub blind_buffer: usize,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 3,
            duration: Duration::from_secs(3),
            scenarios: Scenario::ALL.to_vec(),
            policies: vec![Policies::None, Policies::Shipped],
            upstreams: vec![Upstream::Plain, Upstream::Tls],
            client_legs: vec![ClientLeg::Tls, ClientLeg::Plain],
            idle_connections: 1000,
            idle_rounds: 1,
            idle_instances: 1,
            idle_hold: Duration::ZERO,
            idle_cpu_window: Duration::from_secs(10),
            idle_notify_sample: 50,
            idle_hibernation: Some(Duration::from_secs(1)),
            idle_keepalive: None,
            fetch_clients: 4,
            fetch_size: 5 * 1024 * 1024,
            fetch_messages: 4,
            small_connections: 16,
            small_depth: 4,
            append_clients: 2,
            append_size: 1024 * 1024,
            imaplib_appends: 20,
            login_clients: 4,
            routed_policies: vec![Policies::None, Policies::OnLogin],
            routed_warm: 4,
            imapgate: None,
            policy_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
            policy_config: None,
            policy_archive: "INBOX.Archive".into(),
            plain_baseline: true,
            blind: None,
            blind_buffer: blind::DEFAULT_BUFFER,
            progress: true,
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// The three policies imapgate ships, in the order they run.
pub const SHIPPED_POLICIES: [&str; 3] =
    ["require_tls.lua", "namespace.lua", "search_rate_limit.lua"];

/// One line of the result: a scenario with one imapgate variant, against direct.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    /// imapgate transparent (one upstream, connected at accept) or routed (it reads the
    /// login, then connects and replays it).
    pub mode: &'static str,
    pub policies: &'static str,
    pub upstream: &'static str,
    pub client_leg: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub rounds: usize,
    pub direct: Option<f64>,
    pub proxied: Option<f64>,
    /// proxied / direct (medians).
    pub ratio: Option<f64>,
    pub direct_rounds: Vec<f64>,
    pub proxied_rounds: Vec<f64>,
    /// Dovecot's plaintext port: no TLS on any leg (a baseline below both paths).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_plain: Option<f64>,
    /// proxied / direct_plain (medians).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_vs_plain: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub direct_plain_rounds: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us_direct_plain: Option<f64>,
    /// p50 latency per command kind (small scenarios) or per phase (login).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us_by_kind_direct: Option<BTreeMap<&'static str, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us_by_kind_proxied: Option<BTreeMap<&'static str, f64>>,
    /// p99 latency per command kind (ratelimit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us_by_kind_direct: Option<BTreeMap<&'static str, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us_by_kind_proxied: Option<BTreeMap<&'static str, f64>>,
    /// ratelimit, `[state]` variants: p50 per command kind minus that of the variant without
    /// `[state]` (same upstream), paired round by round, median over the rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_p50_us_vs_local_by_kind: Option<BTreeMap<&'static str, f64>>,
    /// ratelimit, `[state]` variants: imapgate CPU per command minus that of the variant
    /// without `[state]`, paired the same way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_cpu_us_vs_local: Option<f64>,
    /// ratelimit: redis-server's CPU time per command (SEARCH and NOOP together) during the
    /// proxied runs, in µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_cpu_us_per_unit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us_direct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us_proxied: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us_direct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us_proxied: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added_p99_us: Option<f64>,
    /// imapgate's CPU time per measured second (median over rounds): 1.0 = one core busy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imapgate_cpu_per_s: Option<f64>,
    /// imapgate's CPU time per unit of work, in µs: per MiB (fetch-large, append) or per
    /// command (small). Less sensitive to a busy machine than the rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imapgate_cpu_us_per_unit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_unit: Option<&'static str>,
    /// The kernel's share of imapgate's CPU time (stime / (utime + stime), median over rounds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imapgate_system_share: Option<f64>,
    /// The blind relay (plaintext client leg): the same work through a process that only
    /// copies bytes, in the same rounds; median, in `unit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind: Option<f64>,
    /// blind / direct (medians).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind_ratio: Option<f64>,
    /// proxied / blind (medians): imapgate against the floor of any proxy here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxied_vs_blind: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blind_rounds: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind_p99_us: Option<f64>,
    /// The relay's CPU seconds per measured second, as `imapgate_cpu_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind_cpu_per_s: Option<f64>,
    /// The relay's CPU per unit of work, in µs (`cpu_unit`), as `imapgate_cpu_us_per_unit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind_cpu_us_per_unit: Option<f64>,
    /// The kernel's share of the relay's CPU time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind_system_share: Option<f64>,
    /// imapgate's CPU per unit minus the relay's, paired round by round, median: what
    /// imapgate spends beyond copying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_minus_blind_cpu_us_per_unit: Option<f64>,
    /// The relay's buffer per direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blind_buffer_kib: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_clients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_idle_kib: Option<u64>,
    /// (RSS with N idle - RSS before) / N, median over rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kib_per_idle_conn: Option<f64>,
    /// idle: seconds from the first connect until all N sessions were in IDLE (median).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_setup_s_direct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_setup_s_proxied: Option<f64>,
    /// idle: imapgate's CPU time per session set up (handshake, greeting, LOGIN, SELECT and
    /// IDLE relayed), in µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_setup_cpu_us_per_conn: Option<f64>,
    /// idle: how long imapgate's CPU time was read with every session idle (the cpu columns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_cpu_window_s: Option<f64>,
    /// idle: Dovecot's IDLE keepalive interval (none: off), and the keepalives imapgate
    /// relays per second on average (N / interval; they come in bursts of N).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_keepalive_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_keepalives_per_s: Option<f64>,
    /// idle: the IDLE notification spot-check, over all rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_notify_direct: Option<NotifyCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_notify_proxied: Option<NotifyCheck>,
    /// idle: Dovecot's `imap` processes and resident memory (all its processes) while the
    /// proxied path's sessions were idle: with hibernation, a handful of processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dovecot_imap_processes_idle: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dovecot_rss_idle_kib: Option<u64>,
    /// Completions other than OK over all rounds (a policy refusing shows here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ok: Option<u64>,
    /// Messages read back from Dovecot and found identical, over all rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_met: Option<bool>,
    /// The issue's target for imapgate's CPU per unit, where it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_target_met: Option<bool>,
}

/// Sessions in IDLE spot-checked for their notification: a message appended to each one's
/// INBOX straight on Dovecot must reach it as `* n EXISTS`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NotifyCheck {
    pub sampled: usize,
    pub notified: usize,
    /// From sending the APPEND to reading the EXISTS, in ms (notified sessions only).
    pub p50_ms: f64,
    pub max_ms: f64,
}

impl NotifyCheck {
    /// Several runs' checks as one (latencies: the median of the medians, the worst max).
    fn merge(checks: &[&NotifyCheck]) -> Option<NotifyCheck> {
        if checks.is_empty() {
            return None;
        }
        Some(NotifyCheck {
            sampled: checks.iter().map(|c| c.sampled).sum(),
            notified: checks.iter().map(|c| c.notified).sum(),
            p50_ms: med(checks.iter().map(|c| c.p50_ms)).unwrap_or(0.0),
            max_ms: checks.iter().map(|c| c.max_ms).fold(0.0, f64::max),
        })
    }

    fn all_notified(&self) -> bool {
        self.notified == self.sampled
    }
}

/// The whole result.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    pub imapgate: PathBuf,
    pub elapsed: Duration,
}

/// One measurement of one path.
#[derive(Clone, Debug, Default)]
struct Sample {
    value: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    cpu_per_s: Option<f64>,
    cpu_us_per_unit: Option<f64>,
    /// The kernel's share of that CPU time (stime / (utime + stime)).
    system_share: Option<f64>,
    /// Work done in the run (MiB or commands), for the CPU cost per unit.
    units: Option<f64>,
    not_ok: Option<u64>,
    verified: Option<u64>,
    rss: Option<(u64, u64)>,
    kib_per_conn: Option<f64>,
    /// idle: seconds to set up every session, imapgate's CPU per session set up, the
    /// notification check, Dovecot while idle.
    setup_s: Option<f64>,
    setup_cpu_us_per_conn: Option<f64>,
    notify: Option<NotifyCheck>,
    dovecot: Option<env::DovecotFootprint>,
    /// In the order of [`kinds`] for the scenario.
    p50_us_by_kind: Option<Vec<f64>>,
    p99_us_by_kind: Option<Vec<f64>>,
    /// redis-server's CPU time per unit during the run (ratelimit).
    redis_cpu_us_per_unit: Option<f64>,
}

/// The names of [`Sample::p50_us_by_kind`]'s entries.
fn kinds(scenario: Scenario) -> &'static [&'static str] {
    match scenario {
        Scenario::Small | Scenario::SmallSerial => &scenarios::SMALL_KINDS,
        Scenario::Login => &scenarios::LOGIN_PHASES,
        Scenario::RateLimit => &scenarios::RATELIMIT_KINDS,
        _ => &[],
    }
}

/// imapgate set up one way.
struct Variant {
    upstream: Upstream,
    mode: Mode,
    policies: Policies,
    /// The policy tables added to the config (None: no policies).
    policy_toml: Option<String>,
    gate: Option<Gate>,
}

impl Variant {
    fn label(&self) -> String {
        format!(
            "imapgate({}, upstream {}, policies {})",
            self.mode.label(),
            self.upstream.label(),
            self.policies.label()
        )
    }

    /// Routed imapgates are measured by the login scenario only: after the login, a routed
    /// session is the same relay as a transparent one.
    fn measures(&self, scenario: Scenario) -> bool {
        if self.policies.is_ratelimit() {
            return scenario == Scenario::RateLimit;
        }
        scenario != Scenario::RateLimit
            && (self.mode == Mode::Transparent || scenario == Scenario::Login)
    }

    /// Whether this imapgate is measured with `leg` on the client side. The plaintext leg is
    /// the "no TLS anywhere" comparison: plain upstream only, and not with the shipped
    /// policies, whose require_tls refuses a LOGIN without TLS.
    fn measures_leg(&self, scenario: Scenario, leg: ClientLeg) -> bool {
        self.measures(scenario)
            && match leg {
                ClientLeg::Tls => true,
                ClientLeg::Plain => {
                    plain_client_capable(scenario)
                        && self.upstream == Upstream::Plain
                        && matches!(self.policies, Policies::None | Policies::OnLogin)
                }
            }
    }
}

/// Scenarios that can run with a plaintext client leg (ratelimit compares imapgates of its
/// own over TLS only).
fn plain_client_capable(scenario: Scenario) -> bool {
    scenario != Scenario::RateLimit
}

struct Ctx<'a> {
    opts: &'a Options,
    binary: PathBuf,
    dc: &'a crate::support::Dovecot,
    tls: Arc<ClientConfig>,
    /// The login scenario's: no TLS session resumption, so that every login pays a full
    /// handshake on both paths (a resumed one would depend on which server issued the last
    /// ticket, both being "localhost").
    login_tls: Arc<ClientConfig>,
    seed: Seed,
    /// The ratelimit scenario's private redis-server.
    redis: Option<crate::support::redis::Redis>,
    /// The blind relay to Dovecot's plain port, when measured.
    blind: Option<blind::Blind>,
    notes: Vec<String>,
    runs: u32,
}

impl Ctx<'_> {
    fn progress(&self, line: &str) {
        if self.opts.progress {
            eprintln!("load: {line}");
        }
    }
}

/// The `[[policy]]` tables for the shipped policies, or why they cannot be used.
pub fn shipped_policy_toml(opts: &Options) -> Result<String, String> {
    if let Some(path) = &opts.policy_config {
        return std::fs::read_to_string(path)
            .map_err(|e| format!("--policy-config {}: {e}", path.display()));
    }
    let mut toml = String::new();
    for name in SHIPPED_POLICIES {
        let path = opts.policy_dir.join(name);
        if !path.is_file() {
            return Err(format!(
                "{} does not exist yet (the policy engine has not shipped it)",
                path.display()
            ));
        }
        let _ = writeln!(
            toml,
            "[[policy]]\nscript = {:?}",
            path.display().to_string()
        );
        if name == "search_rate_limit.lua" {
            // Measure what the policy costs, not its refusals: a limit the load never reaches.
            toml.push_str("options = { per_second = 1000000, burst = 1000000 }\n");
        }
        toml.push('\n');
    }
    Ok(toml)
}

/// The config of a ratelimit variant: `[state]` on `redis_url` when the variant has it, and
/// the shipped search_rate_limit alone, with a limit the load never reaches (so that the
/// figures are the cost of the decision, not of limiting), shared or not.
pub fn ratelimit_policy_toml(
    opts: &Options,
    policies: Policies,
    redis_url: &str,
) -> Result<String, String> {
    let path = opts.policy_dir.join("search_rate_limit.lua");
    if !path.is_file() {
        return Err(format!("{} does not exist", path.display()));
    }
    let (state, shared) = match policies {
        Policies::RateLimitLocal => (false, false),
        Policies::RateLimitLocalState => (true, false),
        Policies::RateLimitShared => (true, true),
        other => return Err(format!("{} is not a ratelimit variant", other.label())),
    };
    let mut toml = String::new();
    if state {
        let _ = writeln!(toml, "[state]\nredis = {redis_url:?}\n");
    }
    let _ = writeln!(
        toml,
        "[[policy]]\nscript = {:?}\n\
         options = {{ per_second = 1000000, burst = 1000000, shared = {shared} }}",
        path.display().to_string()
    );
    Ok(toml)
}

/// Whether a `redis-server` binary is installed (where tests/support looks for it).
fn redis_server_installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/local/bin", "/usr/sbin"].map(PathBuf::from))
        .any(|d| d.join("redis-server").is_file())
}

/// Runs everything `opts` asks for.
pub async fn run(opts: &Options) -> Result<Report, String> {
    run_keeping_dovecot(opts).await.0
}

/// [`run`], handing back its Dovecot (once started) instead of stopping it: with thousands
/// of idle users, removing their Maildirs takes minutes on a busy disk, and the caller can
/// print the figures (or the error) first.
pub async fn run_keeping_dovecot(
    opts: &Options,
) -> (Result<Report, String>, Option<crate::support::Dovecot>) {
    let started = Instant::now();
    let idle_n = if opts.scenarios.contains(&Scenario::Idle) {
        opts.idle_connections
    } else {
        0
    };
    let mut notes = Vec::new();
    let want_fds = env::nofile_wanted(idle_n, opts.idle_instances);
    let nofile = match env::raise_nofile(want_fds) {
        Ok(n) => n,
        Err(e) => {
            notes.push(e);
            0
        }
    };
    for need in env::machine_needs(
        idle_n,
        opts.idle_instances,
        nofile,
        opts.idle_hibernation.is_some(),
    ) {
        if opts.progress {
            eprintln!("load: this machine: {need}");
        }
        notes.push(format!("this machine: {need}"));
    }
    // imapgate holds two sockets per session and a few of its own: rather than fail at the
    // last few hundred connections (it answers "* BYE [UNAVAILABLE]" when it cannot open the
    // upstream one), say at once what fits.
    let gate_fds = env::gate_fds(idle_n, opts.idle_instances);
    if nofile > 0 && nofile < gate_fds {
        return (
            Err(format!(
                "{idle_n} idle connections need {gate_fds} open files in each of {} imapgate \
                 process(es), and the limit here is {nofile} (a hard limit this process cannot \
                 raise: it lacks CAP_SYS_RESOURCE, or is not root). At most {} connections fit \
                 per process; for {idle_n}, start the harness with a hard limit of at least \
                 {want_fds} (`ulimit -Hn {want_fds}` as root, or the service manager's \
                 LimitNOFILE), or spread them over more processes (`--idle-instances`).",
                opts.idle_instances,
                (nofile - 64) / 2
            )),
            None,
        );
    }
    let dc = env::start_dovecot(
        2 * idle_n,
        idle_n,
        opts.idle_hibernation,
        opts.idle_keepalive,
        nofile,
    );
    let mut result = run_on(opts, &dc, idle_n, notes, started).await;
    let complaints = dovecot_complaints(&dc.log());
    match &mut result {
        Ok(report) => report.notes.extend(complaints),
        Err(e) => {
            for c in complaints {
                e.push_str("\n  ");
                e.push_str(&c);
            }
        }
    }
    (result, Some(dc))
}

async fn run_on(
    opts: &Options,
    dc: &crate::support::Dovecot,
    idle_n: usize,
    mut notes: Vec<String>,
    started: Instant,
) -> Result<Report, String> {
    let binary = env::imapgate_binary(opts.imapgate.as_deref())?;
    if !binary.is_file() {
        return Err(format!(
            "imapgate binary {} does not exist",
            binary.display()
        ));
    }
    if opts.imapgate.is_none() && !binary.components().any(|c| c.as_os_str() == "release") {
        notes.push(format!(
            "imapgate binary {} is not a release build: figures are not representative",
            binary.display()
        ));
    }
    let tls = crate::support::tls_config(dc.ca_pem());
    let login_tls = {
        let mut c = (*tls).clone();
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    };
    // Files imapgate's configs name (the on_login policy).
    let scratch = crate::support::temp_dir();
    let seed = Seed {
        fetch_size: opts.fetch_size,
        fetch_messages: opts.fetch_messages.max(1),
    };
    let mut ctx = Ctx {
        opts,
        binary,
        dc,
        tls,
        login_tls,
        seed,
        redis: None,
        blind: None,
        notes,
        runs: 0,
    };
    if idle_n > 0 && opts.idle_instances > 1 {
        ctx.notes.push(format!(
            "idle: {} imapgate processes share each listener (reuse_port); its memory and CPU \
             figures are their sums",
            opts.idle_instances
        ));
    }
    let needs_seed = opts.scenarios.iter().any(|s| {
        matches!(
            s,
            Scenario::FetchLarge
                | Scenario::Small
                | Scenario::SmallSerial
                | Scenario::Append
                | Scenario::RateLimit
        )
    });
    if needs_seed {
        ctx.progress("seeding mailboxes");
        scenarios::seed(ctx.dc.addr(), &ctx.seed, opts.append_clients).await?;
    }
    if opts.scenarios.contains(&Scenario::Login) {
        scenarios::seed_logins(ctx.dc.addr()).await?;
    }
    if idle_n > 0 {
        ctx.progress(&format!("creating the {idle_n} idle users' mailboxes"));
        let t = Instant::now();
        scenarios::seed_idle(ctx.dc.addr(), idle_n).await?;
        ctx.progress(&format!("  done in {:.1} s", t.elapsed().as_secs_f64()));
    }

    // The imapgate variants: each upstream mode, each policy set.
    let mut variants = Vec::new();
    for &upstream in &opts.upstreams {
        for &policies in &opts.policies {
            let policy_toml = match policies {
                Policies::None => None,
                // A policy with on_login makes imapgate own the login: that is routed.
                Policies::OnLogin => continue,
                // The ratelimit scenario adds its own.
                Policies::RateLimitLocal
                | Policies::RateLimitLocalState
                | Policies::RateLimitShared => continue,
                Policies::Hooks => Some(bare_hooks::policy_toml(scratch.path())?),
                Policies::Shipped => match shipped_policy_toml(opts) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let note = format!("skipping the 'shipped policies' variant: {e}");
                        if !ctx.notes.contains(&note) {
                            ctx.progress(&note);
                            ctx.notes.push(note);
                        }
                        continue;
                    }
                },
            };
            variants.push(Variant {
                upstream,
                mode: Mode::Transparent,
                policies,
                policy_toml,
                gate: None,
            });
        }
    }
    if opts.scenarios.contains(&Scenario::Login) {
        for &upstream in &opts.upstreams {
            for &policies in &opts.routed_policies {
                let policy_toml = match policies {
                    Policies::OnLogin => {
                        let script = scratch.path().join("bench_route.lua");
                        std::fs::write(&script, ON_LOGIN_POLICY)
                            .map_err(|e| format!("write {}: {e}", script.display()))?;
                        Some(format!(
                            "[[policy]]\nscript = {:?}\n",
                            script.display().to_string()
                        ))
                    }
                    Policies::Shipped => Some(shipped_policy_toml(opts)?),
                    Policies::Hooks => Some(bare_hooks::policy_toml(scratch.path())?),
                    Policies::None => None,
                    Policies::RateLimitLocal
                    | Policies::RateLimitLocalState
                    | Policies::RateLimitShared => continue,
                };
                let mut modes = vec![Mode::Routed];
                if opts.routed_warm > 0 {
                    modes.push(Mode::RoutedWarm(opts.routed_warm));
                }
                for mode in modes {
                    variants.push(Variant {
                        upstream,
                        mode,
                        policies,
                        policy_toml: policy_toml.clone(),
                        gate: None,
                    });
                }
            }
        }
    }
    if opts.scenarios.contains(&Scenario::RateLimit) {
        if redis_server_installed() {
            ctx.progress("starting a private redis-server");
            let redis = crate::support::redis::Redis::start();
            for &upstream in &opts.upstreams {
                for policies in [
                    Policies::RateLimitLocal,
                    Policies::RateLimitLocalState,
                    Policies::RateLimitShared,
                ] {
                    variants.push(Variant {
                        upstream,
                        mode: Mode::Transparent,
                        policies,
                        policy_toml: Some(ratelimit_policy_toml(opts, policies, &redis.url())?),
                        gate: None,
                    });
                }
            }
            ctx.redis = Some(redis);
        } else {
            let note = "ratelimit skipped: redis-server not found (apt-get install redis-server)";
            ctx.progress(note);
            ctx.notes.push(note.into());
        }
    }
    // Only the imapgates some asked-for scenario measures.
    variants.retain(|v| opts.scenarios.iter().any(|&s| v.measures(s)));
    if variants.is_empty() {
        return Err(format!(
            "no imapgate variant to measure{}",
            ctx.notes
                .iter()
                .map(|n| format!("; {n}"))
                .collect::<String>()
        ));
    }
    let max_conns = (2 * idle_n + 1000).max(10_000);
    let mut usable = Vec::new();
    for mut v in variants {
        match Gate::start(
            &ctx.binary,
            ctx.dc,
            v.upstream,
            v.mode,
            v.policy_toml.as_deref(),
            max_conns,
            1,
        ) {
            Ok(g) => {
                v.gate = Some(g);
                usable.push(v);
            }
            Err(e) if v.policies == Policies::Shipped => {
                let note = format!(
                    "skipping {}: imapgate does not start with the shipped policies: {e}",
                    v.label()
                );
                ctx.progress(&note);
                ctx.notes.push(note);
            }
            Err(e) => return Err(e),
        }
    }
    let mut variants = usable;
    if let Some(launcher) = &opts.blind
        && opts.client_legs.contains(&ClientLeg::Plain)
        && opts.scenarios.iter().any(|&s| blind_measures(s))
    {
        let relay = blind::Blind::start(launcher, ctx.dc.addr(), opts.blind_buffer)?;
        ctx.progress(&format!(
            "blind relay on {} (pid {}, {} KiB buffers)",
            relay.addr,
            relay.pid(),
            relay.buffer / 1024
        ));
        ctx.blind = Some(relay);
    }

    let mut rows = Vec::new();
    for &scenario in &opts.scenarios {
        let rs = run_scenario(&mut ctx, scenario, &mut variants).await?;
        if opts.progress {
            for r in &rs {
                eprintln!("load: {}", summary(r));
            }
        }
        rows.extend(rs);
    }
    for v in &variants {
        if let Some(g) = &v.gate {
            let w = g.warnings();
            if !w.is_empty() {
                ctx.notes.push(format!(
                    "{} logged {} warnings; first: {}",
                    v.label(),
                    w.len(),
                    w[0]
                ));
            }
        }
    }
    drop(scratch);
    Ok(Report {
        rows,
        notes: ctx.notes,
        imapgate: ctx.binary,
        elapsed: started.elapsed(),
    })
}

/// Dovecot's warnings and errors, each distinct message once with how often it came (the
/// timestamp, process and session prefix left out): a limit it hit shows here.
fn dovecot_complaints(log: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find("Warning: ").or_else(|| line.find("Error: ")) else {
            continue;
        };
        let text = &line[at..];
        // Per-session details (user, addresses, pids) would make every line distinct.
        let key: String = text.chars().take(160).collect();
        *seen.entry(key).or_default() += 1;
    }
    seen.into_iter()
        .take(8)
        .map(|(text, n)| format!("dovecot logged {n}x: {text}"))
        .collect()
}

/// Which path a run takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path_ {
    /// Dovecot: its implicit-TLS port, or its plain port.
    Direct(ClientLeg),
    /// imapgate variant `i`: its TLS listener, or its plain one.
    Proxied(usize, ClientLeg),
    /// The blind relay (plaintext client leg, Dovecot's plain port behind it).
    Blind,
}

/// Scenarios the blind relay runs: those whose figure is a rate of relayed work.
fn blind_measures(scenario: Scenario) -> bool {
    matches!(
        scenario,
        Scenario::FetchLarge | Scenario::Small | Scenario::SmallSerial | Scenario::Append
    )
}

fn leg_index(leg: ClientLeg) -> usize {
    match leg {
        ClientLeg::Tls => 0,
        ClientLeg::Plain => 1,
    }
}

async fn run_scenario(
    ctx: &mut Ctx<'_>,
    scenario: Scenario,
    variants: &mut [Variant],
) -> Result<Vec<Row>, String> {
    let opts = ctx.opts;
    let python = if scenario == Scenario::Imaplib {
        match scenarios::python3() {
            Some(p) => Some(p),
            None => {
                ctx.notes
                    .push("imaplib-append skipped: python3 not found".into());
                return Ok(Vec::new());
            }
        }
    } else {
        None
    };
    let rounds = match scenario {
        Scenario::Idle => opts.idle_rounds.max(1),
        _ => opts.rounds.max(1),
    };
    let mut legs: Vec<ClientLeg> = opts
        .client_legs
        .iter()
        .copied()
        .filter(|&l| l == ClientLeg::Tls || plain_client_capable(scenario))
        .collect();
    if legs.is_empty() {
        // ratelimit asked for with a plaintext client leg only: it runs over TLS.
        legs.push(ClientLeg::Tls);
    }
    let mut paths = Vec::new();
    if legs.contains(&ClientLeg::Tls) {
        paths.push(Path_::Direct(ClientLeg::Tls));
    }
    let plain_baseline = opts.plain_baseline
        && matches!(
            scenario,
            Scenario::FetchLarge
                | Scenario::Small
                | Scenario::SmallSerial
                | Scenario::Append
                | Scenario::Login
        );
    if legs.contains(&ClientLeg::Plain) || plain_baseline {
        paths.push(Path_::Direct(ClientLeg::Plain));
    }
    for &leg in &legs {
        paths.extend(
            (0..variants.len())
                .filter(|&i| variants[i].measures_leg(scenario, leg))
                .map(|i| Path_::Proxied(i, leg)),
        );
    }
    if ctx.blind.is_some() && legs.contains(&ClientLeg::Plain) && blind_measures(scenario) {
        paths.push(Path_::Blind);
    }
    let mut direct: [Vec<Sample>; 2] = Default::default();
    let mut blind_samples: Vec<Sample> = Vec::new();
    let mut proxied: Vec<[Vec<Sample>; 2]> = vec![Default::default(); variants.len()];
    for round in 0..rounds {
        let mut order = paths.clone();
        order.rotate_left(round % paths.len());
        if round % 2 == 1 {
            order.reverse();
        }
        for path in order {
            ctx.runs += 1;
            let leg = match path {
                Path_::Direct(leg) | Path_::Proxied(_, leg) => leg,
                Path_::Blind => ClientLeg::Plain,
            };
            let (addr, label) = match path {
                Path_::Direct(ClientLeg::Tls) => {
                    (ctx.dc.tls_addr(), "dovecot TLS (direct)".to_string())
                }
                Path_::Direct(ClientLeg::Plain) => {
                    (ctx.dc.addr(), "dovecot plain (direct)".to_string())
                }
                Path_::Proxied(i, leg) => {
                    if scenario == Scenario::Idle {
                        // A fresh process, so that the baseline is not inflated by the heap
                        // left over from earlier scenarios.
                        let v = &mut variants[i];
                        v.gate = None;
                        v.gate = Some(Gate::start(
                            &ctx.binary,
                            ctx.dc,
                            v.upstream,
                            v.mode,
                            v.policy_toml.as_deref(),
                            (2 * opts.idle_connections + 1000).max(10_000),
                            opts.idle_instances,
                        )?);
                    }
                    let g = variants[i].gate.as_ref().ok_or("imapgate not running")?;
                    match leg {
                        ClientLeg::Tls => (g.addr, variants[i].label()),
                        ClientLeg::Plain => (
                            g.plain_addr,
                            format!("{}, client leg plain", variants[i].label()),
                        ),
                    }
                }
                Path_::Blind => {
                    let b = ctx.blind.as_ref().ok_or("blind relay not running")?;
                    (b.addr, "blind relay, client leg plain".to_string())
                }
            };
            let gate = match path {
                Path_::Direct(_) | Path_::Blind => None,
                Path_::Proxied(i, _) => variants[i].gate.as_ref(),
            };
            // Whose CPU the run is charged to: imapgate's, or the relay's.
            let cpu_pid = match path {
                Path_::Direct(_) => None,
                Path_::Proxied(..) => gate.map(Gate::pid),
                Path_::Blind => ctx.blind.as_ref().map(blind::Blind::pid),
            };
            let tls = if scenario == Scenario::Login {
                ctx.login_tls.clone()
            } else {
                ctx.tls.clone()
            };
            let tls = (leg == ClientLeg::Tls).then_some(&tls);
            let cpu0 = cpu_pid.map(env::CpuStamp::read);
            let redis_pid = match (&ctx.redis, gate) {
                (Some(r), Some(_)) if scenario == Scenario::RateLimit => Some(r.pid()),
                _ => None,
            };
            let redis_cpu0 = redis_pid.map(env::CpuStamp::read);
            let t0 = Instant::now();
            let archive = match path {
                Path_::Proxied(i, _)
                    if matches!(variants[i].policies, Policies::Shipped | Policies::Hooks) =>
                {
                    opts.policy_archive.as_str()
                }
                _ => "Archive",
            };
            let mut s = measure(ctx, scenario, addr, tls, gate, python.as_deref(), archive).await?;
            let secs = t0.elapsed().as_secs_f64();
            // The idle scenario reads imapgate's CPU itself, over the window where every
            // session is idle.
            if let (Some(pid), Some(c0)) = (cpu_pid, &cpu0)
                && scenario != Scenario::Idle
            {
                let now = env::CpuStamp::read(pid);
                s.system_share = now.system_share_since(c0);
                let cpu = now.since(c0).as_secs_f64();
                s.cpu_per_s = Some(cpu / secs.max(1e-6));
                s.cpu_us_per_unit = s.units.filter(|&u| u > 0.0).map(|u| cpu * 1e6 / u);
            }
            if let (Some(pid), Some(c0)) = (redis_pid, redis_cpu0) {
                let cpu = env::CpuStamp::read(pid).since(&c0).as_secs_f64();
                s.redis_cpu_us_per_unit = s.units.filter(|&u| u > 0.0).map(|u| cpu * 1e6 / u);
            }
            ctx.progress(&format!(
                "round {}/{rounds} {} via {label}: {:.1}{}",
                round + 1,
                scenario.name(),
                s.value,
                s.p50_us
                    .map(|p| format!(" (p50 {p:.0} µs, p99 {:.0} µs)", s.p99_us.unwrap_or(0.0)))
                    .unwrap_or_default()
            ));
            match path {
                Path_::Direct(leg) => direct[leg_index(leg)].push(s),
                Path_::Proxied(i, leg) => proxied[i][leg_index(leg)].push(s),
                Path_::Blind => blind_samples.push(s),
            }
        }
    }
    let mut rows = Vec::new();
    let [direct_tls, direct_plain] = &direct;
    for &leg in &legs {
        for (i, v) in variants.iter().enumerate() {
            if !v.measures_leg(scenario, leg) {
                continue;
            }
            // Over TLS, Dovecot's plain port is a second baseline; in plaintext it is the one.
            let (d, dp): (&[Sample], &[Sample]) = match leg {
                ClientLeg::Tls => (direct_tls, direct_plain),
                ClientLeg::Plain => (direct_plain, &[]),
            };
            let mut row = make_row(scenario, v, leg, d, dp, &proxied[i][leg_index(leg)], opts);
            if leg == ClientLeg::Plain && !blind_samples.is_empty() {
                add_blind(
                    &mut row,
                    &blind_samples,
                    &proxied[i][leg_index(leg)],
                    opts.blind_buffer,
                );
            }
            if scenario == Scenario::RateLimit && v.policies != Policies::RateLimitLocal {
                let local = variants.iter().position(|w| {
                    w.policies == Policies::RateLimitLocal && w.upstream == v.upstream
                });
                if let Some(j) = local {
                    compare_with_local(
                        &mut row,
                        &proxied[i][leg_index(leg)],
                        &proxied[j][leg_index(leg)],
                    );
                }
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The blind relay's figures beside imapgate's on a plaintext-client row. Each round ran both,
/// so imapgate's CPU beyond the relay's is taken round by round (the machine's drift cancels).
fn add_blind(row: &mut Row, blind: &[Sample], proxied: &[Sample], buffer: usize) {
    let b = med(blind.iter().map(|s| s.value));
    let ratio = |num: Option<f64>, den: Option<f64>| match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    };
    row.blind = b;
    row.blind_ratio = ratio(b, row.direct);
    row.proxied_vs_blind = ratio(row.proxied, b);
    row.blind_rounds = blind.iter().map(|s| round2(s.value)).collect();
    row.blind_p50_us = med(blind.iter().filter_map(|s| s.p50_us));
    row.blind_p99_us = med(blind.iter().filter_map(|s| s.p99_us));
    row.blind_cpu_per_s = med(blind.iter().filter_map(|s| s.cpu_per_s));
    row.blind_cpu_us_per_unit = med(blind.iter().filter_map(|s| s.cpu_us_per_unit));
    row.blind_system_share = med(blind.iter().filter_map(|s| s.system_share));
    row.gate_minus_blind_cpu_us_per_unit = med(proxied
        .iter()
        .zip(blind)
        .filter_map(|(p, b)| Some(p.cpu_us_per_unit? - b.cpu_us_per_unit?)));
    row.blind_buffer_kib = Some(buffer / 1024);
    if let Some(n) = blind.iter().filter_map(|s| s.not_ok).reduce(|a, b| a + b) {
        row.not_ok = Some(row.not_ok.unwrap_or(0) + n);
    }
    if let Some(n) = blind.iter().filter_map(|s| s.verified).reduce(|a, b| a + b) {
        row.verified_messages = Some(row.verified_messages.unwrap_or(0) + n);
    }
}

/// The ratelimit figures that matter: what `[state]` (and sharing the bucket) adds over the
/// same imapgate without it. Each round ran both one after the other, so the differences are
/// taken round by round (the machine's drift cancels) and their median kept.
fn compare_with_local(row: &mut Row, with_state: &[Sample], local: &[Sample]) {
    let paired = |f: &dyn Fn(&Sample) -> Option<f64>| {
        med(with_state
            .iter()
            .zip(local)
            .filter_map(|(a, b)| Some(f(a)? - f(b)?)))
    };
    let added: BTreeMap<&'static str, f64> = scenarios::RATELIMIT_KINDS
        .iter()
        .enumerate()
        .filter_map(|(k, name)| {
            let p50 = |s: &Sample| s.p50_us_by_kind.as_ref()?.get(k).copied();
            Some((*name, paired(&p50)?))
        })
        .collect();
    row.added_cpu_us_vs_local = paired(&|s: &Sample| s.cpu_us_per_unit);
    let search = added.get("SEARCH").copied();
    let noop = added.get("NOOP").copied();
    if row.policies == Policies::RateLimitShared.label() {
        row.target = Some(format!(
            "SEARCH p50 shared - local <= {RATELIMIT_TARGET_US} µs"
        ));
        row.target_met = search.map(|a| a <= RATELIMIT_TARGET_US);
    } else {
        row.target = Some(format!(
            "NOOP p50 with [state] - without <= {RATELIMIT_NOISE_US} µs"
        ));
        row.target_met = noop.map(|a| a <= RATELIMIT_NOISE_US);
    }
    row.added_p50_us_vs_local_by_kind = Some(added);
}

/// The issue's target for a shared decision: one loopback round trip.
const RATELIMIT_TARGET_US: f64 = 200.0;
/// "Nothing added" to an unhooked command, read as: within the round-to-round noise of a
/// serial command's p50 on this machine (small-serial's added p50 moved by ~10 µs between
/// runs of the same build).
const RATELIMIT_NOISE_US: f64 = 10.0;

async fn measure(
    ctx: &mut Ctx<'_>,
    scenario: Scenario,
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    gate: Option<&Gate>,
    python: Option<&Path>,
    archive: &str,
) -> Result<Sample, String> {
    let opts = ctx.opts;
    Ok(match scenario {
        Scenario::FetchLarge => {
            let r = scenarios::fetch_large(addr, tls, opts.fetch_clients, &ctx.seed, opts.duration)
                .await?;
            Sample {
                value: r.mib_s,
                units: Some(r.fetches as f64 * opts.fetch_size as f64 / MIB),
                ..Sample::default()
            }
        }
        Scenario::Small | Scenario::SmallSerial => {
            let (conns, depth) = if scenario == Scenario::Small {
                (opts.small_connections, opts.small_depth)
            } else {
                (1, 1)
            };
            let r = scenarios::small(addr, tls, conns, depth, opts.duration, archive).await?;
            Sample {
                value: r.cmds_per_s,
                units: Some(r.completed as f64),
                p50_us: Some(r.p50_us),
                p99_us: Some(r.p99_us),
                not_ok: Some(r.not_ok),
                p50_us_by_kind: Some(r.p50_us_by_kind.to_vec()),
                ..Sample::default()
            }
        }
        Scenario::RateLimit => {
            let r = scenarios::ratelimit(addr, tls, opts.duration).await?;
            Sample {
                value: r.cmds_per_s,
                units: Some(r.completed as f64),
                // The headline is the limited command's.
                p50_us: Some(r.p50_us_by_kind[0]),
                p99_us: Some(r.p99_us_by_kind[0]),
                not_ok: Some(r.not_ok),
                p50_us_by_kind: Some(r.p50_us_by_kind.to_vec()),
                p99_us_by_kind: Some(r.p99_us_by_kind.to_vec()),
                ..Sample::default()
            }
        }
        Scenario::Login => {
            let r = scenarios::logins(addr, tls, opts.login_clients, opts.duration).await?;
            Sample {
                value: r.logins_per_s,
                units: Some(r.completed as f64),
                p50_us: Some(r.p50_us),
                p99_us: Some(r.p99_us),
                p50_us_by_kind: Some(r.p50_us_by_phase.to_vec()),
                ..Sample::default()
            }
        }
        Scenario::Append => {
            let r = scenarios::append(
                addr,
                ctx.dc.addr(),
                tls,
                opts.append_clients,
                opts.append_size,
                ctx.runs,
                opts.duration,
            )
            .await?;
            Sample {
                value: r.mib_s,
                units: Some(r.appended as f64 * opts.append_size as f64 / MIB),
                verified: Some(r.verified),
                ..Sample::default()
            }
        }
        Scenario::Idle => {
            if gate.is_some() && !opts.idle_hold.is_zero() {
                ctx.progress(&format!(
                    "idle: holding the connections {:?} after the reading (imapgate pid {:?})",
                    opts.idle_hold,
                    gate.map(Gate::pids).unwrap_or_default()
                ));
            }
            let params = scenarios::IdleParams {
                n: opts.idle_connections,
                hold: opts.idle_hold,
                cpu_window: opts.idle_cpu_window,
                notify_sample: opts.idle_notify_sample,
                dc_plain: ctx.dc.addr(),
                dc_pid: ctx.dc.pid(),
                hibernation: opts.idle_hibernation.is_some(),
                run: ctx.runs,
            };
            let r = scenarios::idle(addr, tls, gate, &params).await?;
            let n = opts.idle_connections.max(1) as f64;
            let window_min = r.idle_window.as_secs_f64().max(1e-6) / 60.0;
            Sample {
                value: r.setup_per_s,
                rss: gate.map(|_| (r.rss_before_kib, r.rss_idle_kib)),
                kib_per_conn: gate.map(|_| r.kib_per_conn),
                setup_s: Some(r.setup.as_secs_f64()),
                setup_cpu_us_per_conn: r.setup_cpu.map(|c| c.as_secs_f64() * 1e6 / n),
                cpu_per_s: r
                    .idle_cpu
                    .map(|c| c.as_secs_f64() / r.idle_window.as_secs_f64().max(1e-6)),
                cpu_us_per_unit: r.idle_cpu.map(|c| c.as_secs_f64() * 1e6 / n / window_min),
                notify: r.notify,
                dovecot: Some(r.dovecot),
                ..Sample::default()
            }
        }
        Scenario::Imaplib => {
            let python = python.ok_or("python3 not found")?;
            let r = scenarios::imaplib_append(
                python,
                addr,
                tls.map(|_| ctx.dc.ca_pem_path()),
                opts.imaplib_appends,
            )
            .await?;
            Sample {
                value: r.median_ms,
                // The whole python run: its login and the final expunge included.
                units: Some(opts.imaplib_appends as f64),
                ..Sample::default()
            }
        }
    })
}

fn med(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = xs.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(scenarios::median(&v))
}

fn make_row(
    scenario: Scenario,
    v: &Variant,
    leg: ClientLeg,
    direct: &[Sample],
    direct_plain: &[Sample],
    proxied: &[Sample],
    opts: &Options,
) -> Row {
    let d = med(direct.iter().map(|s| s.value));
    let dp = med(direct_plain.iter().map(|s| s.value));
    let p = med(proxied.iter().map(|s| s.value));
    let ratio_of = |d: Option<f64>| match (d, p) {
        (Some(d), Some(p)) if d > 0.0 => Some(p / d),
        _ => None,
    };
    let ratio = ratio_of(d);
    let by_kind_of = |samples: &[Sample],
                      pick: fn(&Sample) -> Option<&Vec<f64>>|
     -> Option<BTreeMap<&'static str, f64>> {
        let rows: Vec<&Vec<f64>> = samples.iter().filter_map(pick).collect();
        if rows.is_empty() {
            return None;
        }
        Some(
            kinds(scenario)
                .iter()
                .enumerate()
                .filter_map(|(k, name)| {
                    Some((*name, med(rows.iter().filter_map(|r| r.get(k).copied()))?))
                })
                .collect(),
        )
    };
    let by_kind = |samples: &[Sample]| by_kind_of(samples, |s| s.p50_us_by_kind.as_ref());
    let mut row = Row {
        scenario: scenario.name(),
        mode: v.mode.label(),
        policies: v.policies.label(),
        upstream: v.upstream.label(),
        client_leg: leg.label(),
        unit: "",
        higher_is_better: true,
        rounds: proxied.len(),
        direct: d,
        proxied: p,
        ratio,
        direct_rounds: direct.iter().map(|s| round2(s.value)).collect(),
        proxied_rounds: proxied.iter().map(|s| round2(s.value)).collect(),
        direct_plain: dp,
        ratio_vs_plain: ratio_of(dp),
        direct_plain_rounds: direct_plain.iter().map(|s| round2(s.value)).collect(),
        p50_us_direct_plain: med(direct_plain.iter().filter_map(|s| s.p50_us)),
        p50_us_by_kind_direct: by_kind(direct),
        p50_us_by_kind_proxied: by_kind(proxied),
        p99_us_by_kind_direct: by_kind_of(direct, |s| s.p99_us_by_kind.as_ref()),
        p99_us_by_kind_proxied: by_kind_of(proxied, |s| s.p99_us_by_kind.as_ref()),
        added_p50_us_vs_local_by_kind: None,
        added_cpu_us_vs_local: None,
        redis_cpu_us_per_unit: med(proxied.iter().filter_map(|s| s.redis_cpu_us_per_unit)),
        p50_us_direct: None,
        p50_us_proxied: None,
        p99_us_direct: None,
        p99_us_proxied: None,
        added_p50_us: None,
        added_p99_us: None,
        imapgate_cpu_per_s: med(proxied.iter().filter_map(|s| s.cpu_per_s)),
        imapgate_cpu_us_per_unit: med(proxied.iter().filter_map(|s| s.cpu_us_per_unit)),
        cpu_unit: match scenario {
            Scenario::FetchLarge | Scenario::Append => Some("µs/MiB"),
            Scenario::Small | Scenario::SmallSerial | Scenario::RateLimit => Some("µs/cmd"),
            Scenario::Login => Some("µs/login"),
            Scenario::Idle => Some("µs/conn/min"),
            Scenario::Imaplib => Some("µs/APPEND"),
        },
        imapgate_system_share: med(proxied.iter().filter_map(|s| s.system_share)),
        blind: None,
        blind_ratio: None,
        proxied_vs_blind: None,
        blind_rounds: Vec::new(),
        blind_p50_us: None,
        blind_p99_us: None,
        blind_cpu_per_s: None,
        blind_cpu_us_per_unit: None,
        blind_system_share: None,
        gate_minus_blind_cpu_us_per_unit: None,
        blind_buffer_kib: None,
        idle_connections: None,
        login_clients: None,
        rss_before_kib: None,
        rss_idle_kib: None,
        kib_per_idle_conn: None,
        idle_setup_s_direct: None,
        idle_setup_s_proxied: None,
        idle_setup_cpu_us_per_conn: None,
        idle_cpu_window_s: None,
        idle_keepalive_s: None,
        idle_keepalives_per_s: None,
        idle_notify_direct: None,
        idle_notify_proxied: None,
        dovecot_imap_processes_idle: None,
        dovecot_rss_idle_kib: None,
        not_ok: None,
        verified_messages: None,
        target: None,
        target_met: None,
        cpu_target: None,
        cpu_target_met: None,
    };
    let plain_upstream = v.upstream == Upstream::Plain;
    match scenario {
        Scenario::FetchLarge => {
            row.unit = "MiB/s";
            // The issue's targets: plaintext on both legs >= 0.90, TLS on both >= 1.00; with
            // a TLS client leg and a plain upstream, the README's >= 0.95.
            let min = match (leg, plain_upstream) {
                (ClientLeg::Plain, _) => 0.90,
                (ClientLeg::Tls, false) => 1.00,
                (ClientLeg::Tls, true) => 0.95,
            };
            row.target = Some(format!("ratio >= {min:.2}"));
            row.target_met = ratio.map(|r| r >= min);
        }
        Scenario::Small | Scenario::SmallSerial => {
            row.unit = "cmd/s";
            row.p50_us_direct = med(direct.iter().filter_map(|s| s.p50_us));
            row.p50_us_proxied = med(proxied.iter().filter_map(|s| s.p50_us));
            row.p99_us_direct = med(direct.iter().filter_map(|s| s.p99_us));
            row.p99_us_proxied = med(proxied.iter().filter_map(|s| s.p99_us));
            row.added_p50_us = diff(row.p50_us_proxied, row.p50_us_direct);
            row.added_p99_us = diff(row.p99_us_proxied, row.p99_us_direct);
            row.not_ok = Some(direct.iter().chain(proxied).filter_map(|s| s.not_ok).sum());
            if scenario == Scenario::Small {
                // Latency under saturation is mostly queueing behind the CPU the three
                // processes share: the added-latency target is judged on small-serial. The
                // issue's targets: >= 0.95 with a plain upstream (either client leg, with or
                // without the shipped policies), and at most 5 µs of imapgate CPU per command.
                let min = if plain_upstream { 0.95 } else { 0.90 };
                row.target = Some(format!("ratio >= {min:.2}"));
                row.target_met = ratio.map(|r| r >= min);
                if plain_upstream && v.policies == Policies::None {
                    row.cpu_target = Some("<= 5 µs per command".into());
                    row.cpu_target_met = row.imapgate_cpu_us_per_unit.map(|c| c <= 5.0);
                }
            } else {
                row.target = Some("added p50 <= 30 µs".into());
                row.target_met = row.added_p50_us.map(|a| a <= 30.0);
            }
        }
        Scenario::Append => {
            row.unit = "MiB/s";
            row.verified_messages = Some(
                direct
                    .iter()
                    .chain(proxied)
                    .filter_map(|s| s.verified)
                    .sum(),
            );
        }
        Scenario::Idle => {
            // The headline is imapgate's memory per idle connection; the direct/proxied pair is
            // the setup rate (TLS + LOGIN + SELECT + IDLE), for information.
            row.unit = "conn/s setup";
            row.idle_connections = Some(opts.idle_connections);
            let kib = med(proxied.iter().filter_map(|s| s.kib_per_conn));
            row.rss_before_kib = proxied.iter().filter_map(|s| s.rss).map(|r| r.0).min();
            row.rss_idle_kib = proxied.iter().filter_map(|s| s.rss).map(|r| r.1).max();
            row.kib_per_idle_conn = kib;
            row.idle_setup_s_direct = med(direct.iter().filter_map(|s| s.setup_s));
            row.idle_setup_s_proxied = med(proxied.iter().filter_map(|s| s.setup_s));
            row.idle_setup_cpu_us_per_conn =
                med(proxied.iter().filter_map(|s| s.setup_cpu_us_per_conn));
            row.idle_cpu_window_s = Some(opts.idle_cpu_window.as_secs_f64());
            if let Some(k) = opts.idle_keepalive {
                let k = k.as_secs_f64().max(1.0);
                row.idle_keepalive_s = Some(k);
                row.idle_keepalives_per_s = Some(opts.idle_connections as f64 / k);
            }
            let checks = |samples: &[Sample]| {
                NotifyCheck::merge(
                    &samples
                        .iter()
                        .filter_map(|s| s.notify.as_ref())
                        .collect::<Vec<_>>(),
                )
            };
            row.idle_notify_direct = checks(direct);
            row.idle_notify_proxied = checks(proxied);
            let idle_dovecot = proxied.iter().filter_map(|s| s.dovecot).next_back();
            row.dovecot_imap_processes_idle = idle_dovecot.map(|d| d.imap_processes);
            row.dovecot_rss_idle_kib = idle_dovecot.map(|d| d.rss_kib);
            // The issue's targets, per idle TLS connection: 16 KiB with a plain upstream, 24
            // with a TLS one; and every sampled session still gets its notification.
            let max_kib = match (leg, plain_upstream) {
                (ClientLeg::Tls, true) => Some(16.0),
                (ClientLeg::Tls, false) => Some(24.0),
                (ClientLeg::Plain, _) => None,
            };
            let notified = row
                .idle_notify_proxied
                .as_ref()
                .map(NotifyCheck::all_notified);
            let measured = kib.map_or("?".into(), |k| format!("{k:.1}"));
            match (max_kib, notified) {
                (Some(max), Some(all)) => {
                    row.target = Some(format!(
                        "<= {max:.0} KiB per idle TLS connection (measured {measured} KiB), \
                         every sampled session notified"
                    ));
                    row.target_met = kib.map(|k| k <= max && all);
                }
                (Some(max), None) => {
                    row.target = Some(format!(
                        "<= {max:.0} KiB per idle TLS connection (measured {measured} KiB)"
                    ));
                    row.target_met = kib.map(|k| k <= max);
                }
                (None, Some(all)) => {
                    row.target = Some(format!(
                        "every sampled session notified ({measured} KiB per connection)"
                    ));
                    row.target_met = Some(all);
                }
                (None, None) => {}
            }
            // "CPU while idle: ≈ 0", read as: under 1 % of one core for all N together.
            row.cpu_target = Some("idle: <= 0.01 core".into());
            row.cpu_target_met = row.imapgate_cpu_per_s.map(|c| c <= 0.01);
        }
        Scenario::Login => {
            // Latency = from the TCP connect to LOGIN's tagged OK (TLS and greeting included:
            // a routed imapgate greets at once but connects upstream after the LOGIN).
            row.unit = "login/s";
            row.login_clients = Some(opts.login_clients);
            row.p50_us_direct = med(direct.iter().filter_map(|s| s.p50_us));
            row.p50_us_proxied = med(proxied.iter().filter_map(|s| s.p50_us));
            row.p99_us_direct = med(direct.iter().filter_map(|s| s.p99_us));
            row.p99_us_proxied = med(proxied.iter().filter_map(|s| s.p99_us));
            row.added_p50_us = diff(row.p50_us_proxied, row.p50_us_direct);
            row.added_p99_us = diff(row.p99_us_proxied, row.p99_us_direct);
            row.target = Some("added login p50 <= 1 ms".into());
            row.target_met = row.added_p50_us.map(|a| a <= 1000.0);
        }
        Scenario::RateLimit => {
            // p50/p99 are SEARCH's (the limited command); the targets compare variants and
            // are set by `compare_with_local`.
            row.unit = "cmd/s";
            row.p50_us_direct = med(direct.iter().filter_map(|s| s.p50_us));
            row.p50_us_proxied = med(proxied.iter().filter_map(|s| s.p50_us));
            row.p99_us_direct = med(direct.iter().filter_map(|s| s.p99_us));
            row.p99_us_proxied = med(proxied.iter().filter_map(|s| s.p99_us));
            row.added_p50_us = diff(row.p50_us_proxied, row.p50_us_direct);
            row.added_p99_us = diff(row.p99_us_proxied, row.p99_us_direct);
            row.not_ok = Some(direct.iter().chain(proxied).filter_map(|s| s.not_ok).sum());
        }
        Scenario::Imaplib => {
            row.unit = "ms/APPEND";
            row.higher_is_better = false;
            row.target = Some("no ~40 ms Nagle stall: added median < 10 ms".into());
            row.target_met = diff(p, d).map(|a| a < 10.0);
        }
    }
    row
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn fmt_opt(x: Option<f64>, prec: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.prec$}"))
}

/// `scenario [mode, policies P, upstream U, client C]`: which row a line of the report is about.
fn row_label(r: &Row) -> String {
    format!(
        "{} [{}, policies {}, upstream {}, client {}]",
        r.scenario, r.mode, r.policies, r.upstream, r.client_leg
    )
}

/// One line per row, for progress output.
pub fn summary(r: &Row) -> String {
    format!(
        "{}: direct {} / proxied {} {} (ratio {}){}",
        row_label(r),
        fmt_opt(r.direct, 1),
        fmt_opt(r.proxied, 1),
        r.unit,
        fmt_opt(r.ratio, 3),
        match (r.imapgate_cpu_us_per_unit, r.cpu_unit) {
            (Some(c), Some(u)) => format!(", imapgate CPU {c:.1} {u}"),
            _ => String::new(),
        }
    ) + &match r.blind {
        Some(b) => format!(
            "; blind relay {b:.1} (ratio {}), CPU {}",
            fmt_opt(r.blind_ratio, 3),
            fmt_cpu(r.blind_cpu_us_per_unit, r.cpu_unit)
        ),
        None => String::new(),
    }
}

fn fmt_share(x: Option<f64>) -> String {
    x.map_or("?".into(), |v| format!("{:.0} %", v * 100.0))
}

/// A CPU-per-unit figure with its unit (idle figures are fractions of a µs).
fn fmt_cpu(v: Option<f64>, unit: Option<&str>) -> String {
    match (v, unit) {
        (Some(v), Some(u)) if v < 10.0 => format!("{v:.2} {u}"),
        (Some(v), Some(u)) => format!("{v:.0} {u}"),
        _ => "-".into(),
    }
}

/// The human-readable table.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "imapgate load comparison, imapgate binary {}",
        report.imapgate.display()
    );
    let _ = writeln!(
        out,
        "client = the client leg, the same on both paths: tls = direct to Dovecot's \
         implicit-TLS port, proxied through imapgate's implicit-TLS listener; plain = Dovecot's \
         plaintext port against imapgate's plaintext listener. 'plain' column (tls rows) = \
         Dovecot's plaintext port, no TLS at all."
    );
    let header = [
        "scenario",
        "mode",
        "policies",
        "upstream",
        "client",
        "unit",
        "direct",
        "proxied",
        "ratio",
        "plain",
        "p/plain",
        "p50 d/p µs",
        "p99 d/p µs",
        "+p50 µs",
        "+p99 µs",
        "gate cpu",
        "cpu/unit",
        "blind",
        "b/direct",
        "blind cpu/unit",
        "target",
    ];
    // Columns 6..=19 hold numbers: right-aligned.
    let numeric = 6..20;
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for r in &report.rows {
        let pair = |a: Option<f64>, b: Option<f64>| {
            if a.is_none() && b.is_none() {
                "-".to_string()
            } else {
                format!("{}/{}", fmt_opt(a, 0), fmt_opt(b, 0))
            }
        };
        let judged = |met: Option<bool>, t: &Option<String>| match (met, t) {
            (Some(true), Some(t)) => format!("ok ({t})"),
            (Some(false), Some(t)) => format!("MISSED ({t})"),
            (None, Some(t)) => format!("? ({t})"),
            _ => String::new(),
        };
        let mut target = judged(r.target_met, &r.target);
        if r.cpu_target.is_some() {
            let _ = write!(target, "; cpu {}", judged(r.cpu_target_met, &r.cpu_target));
        }
        let mut extra = String::new();
        if let Some(n) = r.not_ok.filter(|&n| n > 0) {
            let _ = write!(extra, " [{n} not OK]");
        }
        if let Some(n) = r.verified_messages {
            let _ = write!(extra, " [{n} verified]");
        }
        lines.push(vec![
            r.scenario.to_string(),
            r.mode.to_string(),
            r.policies.to_string(),
            r.upstream.to_string(),
            r.client_leg.to_string(),
            r.unit.to_string(),
            fmt_opt(r.direct, 1),
            fmt_opt(r.proxied, 1),
            fmt_opt(r.ratio, 3),
            fmt_opt(r.direct_plain, 1),
            fmt_opt(r.ratio_vs_plain, 3),
            pair(r.p50_us_direct, r.p50_us_proxied),
            pair(r.p99_us_direct, r.p99_us_proxied),
            fmt_opt(r.added_p50_us, 0),
            fmt_opt(r.added_p99_us, 0),
            fmt_opt(r.imapgate_cpu_per_s, 2),
            fmt_cpu(r.imapgate_cpu_us_per_unit, r.cpu_unit),
            fmt_opt(r.blind, 1),
            fmt_opt(r.blind_ratio, 3),
            match r.blind {
                Some(_) => fmt_cpu(r.blind_cpu_us_per_unit, r.cpu_unit),
                None => "-".into(),
            },
            format!("{target}{extra}").trim().to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (k, l) in lines.iter().enumerate() {
        let mut line = String::new();
        for (i, cell) in l.iter().enumerate() {
            let pad = " ".repeat(widths[i] - cell.chars().count());
            if i + 1 == l.len() {
                line.push_str(cell);
            } else if numeric.contains(&i) {
                let _ = write!(line, "{pad}{cell}  ");
            } else {
                let _ = write!(line, "{cell}{pad}  ");
            }
        }
        let line = line.trim_end();
        let _ = writeln!(out, "{line}");
        if k == 0 {
            let _ = writeln!(out, "{}", "-".repeat(line.chars().count()));
        }
    }
    for r in &report.rows {
        if let Some(b) = r.blind {
            let unit = r.cpu_unit.unwrap_or("");
            let _ = writeln!(
                out,
                "{}: blind relay {b:.1} {} = {} of \
                 direct (imapgate {} of the relay); CPU: relay {}, imapgate {}, imapgate beyond \
                 the relay {} µs{} (paired by round); kernel's share: relay {}, imapgate {}{}",
                row_label(r),
                r.unit,
                fmt_opt(r.blind_ratio, 3),
                fmt_opt(r.proxied_vs_blind, 3),
                fmt_cpu(r.blind_cpu_us_per_unit, r.cpu_unit),
                fmt_cpu(r.imapgate_cpu_us_per_unit, r.cpu_unit),
                r.gate_minus_blind_cpu_us_per_unit
                    .map_or("?".into(), |c| format!("{c:+.1}")),
                unit.strip_prefix("µs").unwrap_or(unit),
                fmt_share(r.blind_system_share),
                fmt_share(r.imapgate_system_share),
                match (r.blind_p50_us, r.p50_us_proxied, r.p50_us_direct) {
                    (Some(b), Some(p), Some(d)) =>
                        format!("; p50 direct/imapgate/relay {d:.0}/{p:.0}/{b:.0} µs"),
                    _ => String::new(),
                }
            );
        }
        if let Some(k) = r.kib_per_idle_conn {
            let notify = |c: &Option<NotifyCheck>| {
                c.as_ref().map_or("-".into(), |c| {
                    format!(
                        "{}/{} (p50 {:.0} ms, max {:.0} ms)",
                        c.notified, c.sampled, c.p50_ms, c.max_ms
                    )
                })
            };
            let _ = writeln!(
                out,
                "idle [policies {}, upstream {}, client {}]: {} connections in IDLE: imapgate RSS \
                 {} -> {} KiB = {k:.1} KiB per connection; set up in {} s direct / {} s proxied \
                 (imapgate CPU {} µs per session); imapgate CPU with all idle: {} cores over {} s \
                 = {} µs per connection per minute ({}); notified direct {}, proxied {}; \
                 Dovecot meanwhile: {} imap processes, {} MiB resident",
                r.policies,
                r.upstream,
                r.client_leg,
                r.idle_connections.unwrap_or(0),
                r.rss_before_kib.unwrap_or(0),
                r.rss_idle_kib.unwrap_or(0),
                fmt_opt(r.idle_setup_s_direct, 1),
                fmt_opt(r.idle_setup_s_proxied, 1),
                fmt_opt(r.idle_setup_cpu_us_per_conn, 0),
                fmt_opt(r.imapgate_cpu_per_s, 4),
                fmt_opt(r.idle_cpu_window_s, 0),
                fmt_opt(r.imapgate_cpu_us_per_unit, 2),
                match (r.idle_keepalive_s, r.idle_keepalives_per_s) {
                    (Some(k), Some(rate)) => format!(
                        "Dovecot's IDLE keepalive every {k:.0} s, all sessions at once: \
                         {rate:.1} a second on average"
                    ),
                    _ => "no traffic: Dovecot's IDLE keepalive off".into(),
                },
                notify(&r.idle_notify_direct),
                notify(&r.idle_notify_proxied),
                r.dovecot_imap_processes_idle
                    .map_or("?".into(), |n| n.to_string()),
                r.dovecot_rss_idle_kib
                    .map_or("?".into(), |k| format!("{:.0}", k as f64 / 1024.0)),
            );
        }
        if let (Some(d), Some(p)) = (&r.p50_us_by_kind_direct, &r.p50_us_by_kind_proxied) {
            let kinds: Vec<String> = d
                .iter()
                .map(|(k, dv)| format!("{k} {dv:.0}/{}", fmt_opt(p.get(k).copied(), 0)))
                .collect();
            let _ = writeln!(
                out,
                "{}: p50 µs direct/proxied by {}: {}",
                row_label(r),
                if r.scenario == Scenario::Login.name() {
                    "phase"
                } else {
                    "command"
                },
                kinds.join(", ")
            );
        }
        if let (Some(d), Some(p)) = (&r.p99_us_by_kind_direct, &r.p99_us_by_kind_proxied) {
            let kinds: Vec<String> = d
                .iter()
                .map(|(k, dv)| format!("{k} {dv:.0}/{}", fmt_opt(p.get(k).copied(), 0)))
                .collect();
            let _ = writeln!(
                out,
                "{}: p99 µs direct/proxied by command: {}",
                row_label(r),
                kinds.join(", ")
            );
        }
    }
    for r in &report.rows {
        let Some(added) = &r.added_p50_us_vs_local_by_kind else {
            continue;
        };
        let kinds: Vec<String> = added.iter().map(|(k, a)| format!("{k} {a:+.0}")).collect();
        let _ = writeln!(
            out,
            "ratelimit [upstream {}]: {} over ratelimit-local (paired by round): p50 µs {}; \
             imapgate CPU {} µs per command; redis-server CPU {} µs per command",
            r.upstream,
            r.policies,
            kinds.join(", "),
            r.added_cpu_us_vs_local
                .map_or("?".into(), |c| format!("{c:+.1}")),
            fmt_opt(r.redis_cpu_us_per_unit, 1),
        );
    }
    let _ = writeln!(
        out,
        "gate cpu = imapgate CPU seconds per wall second during the proxied runs (2 = both cores); \
         cpu/unit = imapgate CPU time (utime + stime from /proc) per MiB, per command, per \
         login, per APPEND (imaplib: its login included) or, for idle, per connection per minute \
         with every connection idle (gate cpu there: over that window only)."
    );
    if let Some(kib) = report.rows.iter().find_map(|r| r.blind_buffer_kib) {
        let _ = writeln!(
            out,
            "blind = a relay that only copies bytes (client leg plain, to Dovecot's plain port), \
             in a process of its own measured as imapgate is: tokio multi-thread runtime with \
             the default workers, copy_bidirectional with {kib} KiB buffers per direction, \
             TCP_NODELAY on both legs; b/direct = blind / direct; run in the same rounds as \
             direct and imapgate."
        );
    }
    if report.rows.iter().any(|r| r.scenario == "ratelimit") {
        let _ = writeln!(
            out,
            "ratelimit: one connection, SEARCH UNSEEN and NOOP in turn, one at a time; p50/p99 \
             columns are SEARCH's; cpu/unit per command of either kind. The shipped \
             search_rate_limit alone (per_second = burst = 1e6: never limits): local = no \
             [state]; local+state = [state] on a private redis-server, shared = false; shared \
             = shared = true."
        );
    }
    if let Some(n) = report.rows.iter().find_map(|r| r.login_clients) {
        let _ = writeln!(
            out,
            "login: {n} clients, each connecting, logging in, selecting INBOX and logging out \
             in a loop, full TLS handshakes; p50/p99 from the TCP connect to LOGIN's OK; \
             routed = [routing] with upstreams mail1 and mail2, both this Dovecot."
        );
    }
    for n in &report.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(out, "total time: {:.0} s", report.elapsed.as_secs_f64());
    out
}

/// One JSON object per row, one per line.
pub fn json_lines(report: &Report) -> String {
    let mut out = String::new();
    for r in &report.rows {
        match serde_json::to_string(r) {
            Ok(s) => {
                out.push_str(&s);
                out.push('\n');
            }
            Err(e) => {
                let _ = writeln!(out, "{{\"error\":{:?}}}", e.to_string());
            }
        }
    }
    out
}
