//! Configuration: the TOML file, defaults and validation.
//!
//! Loading happens in three steps so that every mistake is reported with a place to fix it:
//! serde parses the shape (unknown keys are errors, since a misspelt key silently ignored is
//! a security setting silently lost), [`Config::resolve`] fills derived defaults and anchors
//! relative paths at the config file's directory, and [`Config::validate`] checks the
//! semantics. Errors name the file, the line and column, and the field.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod network;

pub use network::{Network, NetworkError};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[[listener]]` tables: where clients connect.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    /// `[upstream]` (one server, named `default`) or `[[upstream]]` (named servers, the first
    /// being the default route). Never empty after loading.
    #[serde(
        rename = "upstream",
        default = "default_upstreams",
        deserialize_with = "one_or_many_upstreams"
    )]
    pub upstreams: Vec<UpstreamConfig>,
    /// `[limits]`: sizes and timeouts that bound what one client can cost.
    #[serde(default)]
    pub limits: Limits,
    /// `[log]`.
    #[serde(default)]
    pub log: LogConfig,
    /// `[[policy]]` tables, in the order the policies run.
    #[serde(rename = "policy", default)]
    pub policies: Vec<PolicyConfig>,
    /// `[lua]`: sandbox limits for the policies.
    #[serde(default)]
    pub lua: LuaConfig,
    /// `[metrics]`: present means enabled.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// `[admin]`: present means enabled.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// `[routing]`: present means imapgate reads each login itself and routes it (also the
    /// case with several upstreams, or a policy with `on_login`).
    #[serde(default)]
    pub routing: Option<RoutingConfig>,
    /// `[health]`: how often and how patiently each upstream is probed.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[state]`: present means state shared by several imapgates lives in Redis.
    #[serde(default)]
    pub state: Option<StateConfig>,
}

/// Logins read by imapgate and routed.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// The capabilities offered before login. Default: those of the first upstream's
    /// greeting, read at start (filtered as every upstream's are).
    pub capabilities: Option<Vec<String>>,
}

/// One address imapgate accepts clients on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Used in logs and metrics. Empty in the file means "derive from `bind`", which
    /// [`Config::resolve`] does, so after loading it is never empty.
    #[serde(default)]
    pub name: String,
    /// An IP address and port; host names are refused because a listener that binds
    /// whatever a name resolves to today is a surprise waiting to happen.
    pub bind: SocketAddr,
    #[serde(default)]
    pub tls: ListenerTls,
    /// PEM certificate chain, leaf first.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from a load balancer,
    /// giving the client's real address; TLS and IMAP follow it.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The only sources allowed to connect when `proxy_protocol` is on (the load balancers):
    /// anyone else could claim any client address. Required then, and only then.
    #[serde(default)]
    pub proxy_from: Vec<Network>,
    /// Other imapgate processes may listen on the same address (`SO_REUSEPORT`; each must
    /// set it, and run as the same user): Linux spreads new connections over them.
    #[serde(default)]
    pub reuse_port: bool,
    /// `[[listener.certificate]]` tables: certificates chosen by the server name the client
    /// asks for (SNI). `cert`/`key` (or the generated certificate) serve every other client.
    #[serde(rename = "certificate", default)]
    pub certificates: Vec<NamedCertificate>,
}

/// A certificate a TLS listener shows to clients asking for one of `names`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedCertificate {
    /// DNS names, or `*.domain` for any one label in front of `domain`; matched without
    /// regard to case.
    pub names: Vec<String>,
    /// PEM certificate chain, leaf first; it must be valid for every name of `names`.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
}

impl ListenerConfig {
    /// A listener with defaults, for code and tests that build a config without a file.
    pub fn new(bind: SocketAddr, tls: ListenerTls) -> Self {
        ListenerConfig {
            name: String::new(),
            bind,
            tls,
            cert: None,
            key: None,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            reuse_port: false,
            certificates: Vec::new(),
        }
    }
}

/// How a client reaches TLS on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// TLS from the first byte (port 993). The default, being the safe one.
    #[default]
    Implicit,
    /// Plaintext until the client sends STARTTLS (port 143).
    Starttls,
    /// Plaintext only: for loopback tests and for a TLS terminator in front.
    None,
}

/// How imapgate reaches TLS with the upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plaintext: the usual case for a server on the same host or a private network.
    #[default]
    None,
    Implicit,
    Starttls,
}

fn default_upstreams() -> Vec<UpstreamConfig> {
    vec![UpstreamConfig::default()]
}

/// `[upstream]` is one table, `[[upstream]]` an array of them.
fn one_or_many_upstreams<'de, D>(d: D) -> Result<Vec<UpstreamConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(UpstreamConfig),
        Many(Vec<UpstreamConfig>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// What imapgate tells an upstream about the client, before anything else on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    None,
    /// The PROXY protocol's text header.
    V1,
    /// The PROXY protocol's binary header.
    V2,
}

/// Most warm connections one upstream may keep.
pub const MAX_WARM: usize = 256;

/// An upstream IMAP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// How routes, logs and metrics name it; `default` for a single `[upstream]`.
    pub name: String,
    /// `host:port`; the host may be a name, resolved at each connection.
    pub address: String,
    pub tls: UpstreamTls,
    /// The name sent as SNI and checked against the certificate. `None` in the file means
    /// the host part of `address`, which [`Config::resolve`] fills in.
    pub server_name: Option<String>,
    /// An extra trust anchor (PEM, may hold several certificates), added to the system roots.
    pub ca: Option<PathBuf>,
    /// `false` accepts any certificate: only for tests.
    pub verify: bool,
    /// Bounds the whole setup: TCP connect, TLS handshake, greeting and STARTTLS.
    pub connect_timeout_s: u64,
    /// A PROXY protocol header with the client's real address, sent first on every
    /// connection (the server must trust imapgate for it: Dovecot's
    /// `haproxy_trusted_networks`).
    pub send_proxy: SendProxy,
    /// Before the login is replayed, an `ID` with the client's real address and port and the
    /// session id (`x-originating-ip` ...), which Dovecot believes from its
    /// `login_trusted_networks`.
    pub forward_id: bool,
    /// How many connections to keep open, secured and greeted ahead of the sessions that
    /// will use them: a login then waits for no TCP or TLS handshake. 0 (the default): none.
    /// Not with `send_proxy` (its header names a client, so it cannot be written early).
    pub warm: usize,
    /// A warm connection older than this is closed unused, well before the server's own
    /// pre-login idle timeout (Dovecot: 60 s or more) could close it first.
    pub warm_max_age_s: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            name: "default".to_owned(),
            address: "127.0.0.1:143".to_owned(),
            tls: UpstreamTls::None,
            server_name: None,
            ca: None,
            verify: true,
            connect_timeout_s: 10,
            send_proxy: SendProxy::None,
            forward_id: false,
            warm: 0,
            warm_max_age_s: 20,
        }
    }
}

impl UpstreamConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_s)
    }

    pub fn warm_max_age(&self) -> Duration {
        Duration::from_secs(self.warm_max_age_s)
    }

    /// The name to verify: `server_name`, or the host part of `address` for configs built
    /// in code that never went through [`Config::resolve`].
    pub fn tls_server_name(&self) -> &str {
        match &self.server_name {
            Some(name) => name,
            None => split_host_port(&self.address)
                .map(|(host, _)| host)
                .unwrap_or(&self.address),
        }
    }
}

/// `[health]`: each upstream is probed (connect and greeting) every `interval_s`, each probe
/// given `timeout_s`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub interval_s: u64,
    /// Also how long the first probes may delay the start.
    pub timeout_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_s: 10,
            timeout_s: 5,
        }
    }
}

impl HealthConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_s)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }
}

/// Limits on what one connection may cost. Sizes are in bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    /// Sessions one user (case-insensitively) may have at once; 0: unlimited. Checked when a
    /// login succeeds.
    pub max_connections_per_user: usize,
    /// Sessions one client address may have at once; 0: unlimited. Checked at accept.
    pub max_connections_per_address: usize,
    /// Longest command line before authentication: small, since anyone can send it.
    pub preauth_line: usize,
    /// Longest line after authentication (a UID set of a large mailbox can be long).
    pub line: usize,
    /// Largest literal; IMAP literal lengths are 32-bit numbers.
    pub literal: u64,
    pub preauth_timeout_s: u64,
    pub idle_timeout_s: u64,
    /// How long sessions may go on after SIGTERM before they get `* BYE`.
    pub drain_timeout_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_user: 0,
            max_connections_per_address: 0,
            preauth_line: 8192,
            line: 65_536,
            literal: 64 * 1024 * 1024,
            preauth_timeout_s: 60,
            idle_timeout_s: 1800,
            drain_timeout_s: 30,
        }
    }
}

impl Limits {
    pub fn preauth_timeout(&self) -> Duration {
        Duration::from_secs(self.preauth_timeout_s)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_s)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A level (`info`) or a `tracing` directive list (`info,imapgate::net=debug`).
    pub level: LogLevel,
    /// The audit log (one JSON object per line for logins and policy verdicts): a file path,
    /// or `"-"`/`"stdout"` for standard output. Absent means no audit log. Kept apart from
    /// `level` because operators ship audit records to a different place than debug logs.
    pub audit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A newtype so that the default is `info` without a serde default function per field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct LogLevel(pub String);

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel("info".to_owned())
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One `[[policy]]` entry; interpreted by the policy layer, not here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub script: PathBuf,
    /// Given to the script as `imap.options`; any table. A top-level option whose name ends
    /// in `_file` is a path ([`Config::resolve`] anchors it like the others), the only files
    /// the script may read (`imap.read_map`, at load).
    #[serde(default)]
    pub options: toml::Table,
    /// What a command gets when this policy's hook fails (error, budget, memory): `closed`
    /// answers `NO [UNAVAILABLE]`, `open` lets the command through as if the hook passed.
    #[serde(default)]
    pub on_error: OnError,
    /// What a hook gets when a shared-state call (Redis) fails or times out: `closed`
    /// answers `NO [UNAVAILABLE]`, `open` carries on as if allowed. Default: `on_error`
    /// ([`PolicyConfig::state_error_mode`]).
    #[serde(default)]
    pub on_state_error: Option<OnError>,
}

impl PolicyConfig {
    /// `on_state_error`, or `on_error` when it is not given.
    pub fn state_error_mode(&self) -> OnError {
        self.on_state_error.unwrap_or(self.on_error)
    }
}

/// Fail closed or open when a policy hook fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Closed,
    Open,
}

/// `[lua]`: the sandbox every policy runs in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LuaConfig {
    /// Memory limit of each Lua VM, in MiB.
    pub memory_mb: usize,
    /// Lua VM instructions one hook call may run before it is stopped.
    pub instructions: u64,
    /// Wall-clock bound of one hook call, in milliseconds (a backstop for slow C functions).
    pub time_ms: u64,
    /// Number of VMs; connections are spread over them. 0: one per CPU.
    pub vms: usize,
}

impl Default for LuaConfig {
    fn default() -> Self {
        LuaConfig {
            memory_mb: 32,
            instructions: 1_000_000,
            time_ms: 100,
            vms: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub bind: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 9143)),
        }
    }
}

/// `[admin]`: the operators' endpoint (sessions, kick). Every request must carry the token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
    /// The bearer token itself; exactly one of `token` and `token_file`.
    #[serde(default)]
    pub token: Option<Secret>,
    /// A file holding the token (surrounding whitespace ignored), read at start and on SIGHUP.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

fn default_admin_bind() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9144))
}

impl AdminConfig {
    /// An endpoint on `bind` with an inline token, for code and tests that build a config
    /// without a file.
    pub fn with_token(bind: SocketAddr, token: &str) -> AdminConfig {
        AdminConfig {
            bind,
            token: Some(Secret(token.to_owned())),
            token_file: None,
        }
    }
}

/// `[state]`: where the state several imapgates share lives (a Redis or Valkey server).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `redis://host:port/db` or `rediss://` (TLS). A password in it works, but a file or
    /// an environment variable keeps it out of the config file.
    pub redis: RedisUrl,
    /// A file holding the password (surrounding whitespace ignored), read at start.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// `rediss://` only: the PEM CA certificate(s) to verify the server with, instead of the
    /// system roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Put in front of every key imapgate reads or writes.
    #[serde(default = "default_state_prefix")]
    pub prefix: String,
    #[serde(default = "default_state_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bound of each command, the wait for a connection included.
    #[serde(default = "default_state_timeout_ms")]
    pub timeout_ms: u64,
    /// Multiplexed connections, used in turn.
    #[serde(default = "default_state_connections")]
    pub connections: usize,
    /// How long a session registration (cluster-wide per-user limit) lives unless refreshed:
    /// the sessions of an instance that died stop counting within this time.
    #[serde(default = "default_session_ttl_s")]
    pub session_ttl_s: u64,
}

fn default_state_prefix() -> String {
    "imapgate:".to_owned()
}
fn default_state_connect_timeout_ms() -> u64 {
    1000
}
fn default_state_timeout_ms() -> u64 {
    100
}
fn default_state_connections() -> usize {
    2
}
fn default_session_ttl_s() -> u64 {
    30
}

impl StateConfig {
    /// A state table for `url` with the defaults, for code and tests that build a config
    /// without a file.
    pub fn new(url: &str) -> StateConfig {
        StateConfig {
            redis: RedisUrl(url.to_owned()),
            password_file: None,
            password_env: None,
            ca: None,
            prefix: default_state_prefix(),
            connect_timeout_ms: default_state_connect_timeout_ms(),
            timeout_ms: default_state_timeout_ms(),
            connections: default_state_connections(),
            session_ttl_s: default_session_ttl_s(),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_s)
    }
}

/// A Redis URL, which may carry a password: `Debug` and [`RedisUrl::redacted`] show it
/// without one.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> RedisUrl {
        RedisUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, for logs and messages.
    pub fn redacted(&self) -> String {
        match redis::parse_redis_url(&self.0) {
            Some(mut url) => {
                if url.password().is_some() {
                    // Fails only for URLs that cannot have a password, which this one has.
                    let _ = url.set_password(Some("***"));
                }
                url.to_string()
            }
            None => "(not a URL)".to_owned(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

/// A value that must never reach a log: its `Debug` says only that it is there.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Why a bearer token is not usable; never quotes the token.
pub fn check_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("the token is empty");
    }
    // RFC 6750's b64token is narrower; any visible ASCII is accepted, but nothing that an
    // Authorization header could not carry or that a shell or editor may have mangled.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be visible ASCII characters, without spaces");
    }
    Ok(())
}

/// A position in the config file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML, or does not have the expected shape or types.
    #[error("{}", describe(path, location, field.as_deref(), message))]
    Parse {
        path: PathBuf,
        location: Option<Location>,
        field: Option<String>,
        message: String,
    },
    /// Well-formed, but the values do not make sense together.
    #[error("{}", describe(path, location, Some(field), message))]
    Invalid {
        path: PathBuf,
        location: Option<Location>,
        /// Dotted path such as `listener[1].cert`.
        field: String,
        message: String,
    },
}

fn describe(
    path: &Path,
    location: &Option<Location>,
    field: Option<&str>,
    message: &str,
) -> String {
    let mut out = path.display().to_string();
    if let Some(loc) = location {
        out.push_str(&format!(":{}:{}", loc.line, loc.column));
    }
    if let Some(field) = field.filter(|f| !f.is_empty()) {
        out.push_str(&format!(": `{field}`"));
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

impl Config {
    /// Reads, parses, resolves and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_str_named(&text, path)
    }

    /// Like [`Config::load`] for text already in memory; `path` is used in messages and as
    /// the base for relative paths, and need not exist.
    pub fn from_str_named(text: &str, path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let mut config: Config = toml::from_str(text).map_err(|err| {
            let found = err.span().map(|span| locate::by_span(text, span));
            ConfigError::Parse {
                path: path.to_owned(),
                location: found.as_ref().map(|f| f.location),
                field: found.and_then(|f| f.field),
                message: err.message().trim_end().to_owned(),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        config.resolve(base);
        config.validate().map_err(|invalid| ConfigError::Invalid {
            path: path.to_owned(),
            location: locate::by_field(text, &invalid.field),
            field: locate::display_field(&invalid.field),
            message: invalid.message,
        })?;
        Ok(config)
    }

    /// Fills derived defaults (listener names, upstream `server_name`) and makes relative
    /// paths relative to `base`, the config file's directory, so that the proxy behaves the
    /// same whatever directory it is started from.
    pub fn resolve(&mut self, base: &Path) {
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() && !base.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        for listener in &mut self.listeners {
            if listener.name.is_empty() {
                listener.name = listener.bind.to_string();
            }
            listener.cert.as_mut().map(anchor);
            listener.key.as_mut().map(anchor);
            for named in &mut listener.certificates {
                anchor(&mut named.cert);
                anchor(&mut named.key);
            }
        }
        if self.upstreams.is_empty() {
            self.upstreams = default_upstreams();
        }
        for up in &mut self.upstreams {
            if up.server_name.is_none()
                && let Some((host, _)) = split_host_port(&up.address)
            {
                up.server_name = Some(host.to_owned());
            }
            up.ca.as_mut().map(anchor);
        }
        for policy in &mut self.policies {
            anchor(&mut policy.script);
            // Options ending in `_file` name files (a policy's map, read with imap.read_map):
            // relative to the config file like every other path.
            for (key, value) in policy.options.iter_mut() {
                if key.ends_with("_file")
                    && let toml::Value::String(path) = value
                {
                    let mut p = PathBuf::from(&*path);
                    anchor(&mut p);
                    *path = p.to_string_lossy().into_owned();
                }
            }
        }
        if let Some(admin) = &mut self.admin {
            admin.token_file.as_mut().map(anchor);
        }
        if let Some(state) = &mut self.state {
            state.password_file.as_mut().map(anchor);
            state.ca.as_mut().map(anchor);
        }
    }

    /// Checks what serde cannot: values that must agree with each other, and ranges.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.listeners.is_empty() {
            return Err(Invalid::new(
                vec![],
                "at least one [[listener]] is required",
            ));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |key: &str| vec![Seg::key("listener"), Seg::Index(i), Seg::key(key)];
            if l.cert.is_some() != l.key.is_some() {
                let missing = if l.cert.is_some() { "key" } else { "cert" };
                let given = if l.cert.is_some() { "cert" } else { "key" };
                return Err(Invalid::new(
                    at(given),
                    format!(
                        "`{given}` is set but `{missing}` is not: give both, or neither \
                         for a generated self-signed certificate"
                    ),
                ));
            }
            if l.proxy_protocol && l.proxy_from.is_empty() {
                return Err(Invalid::new(
                    at("proxy_from"),
                    "required with proxy_protocol = true: the networks of the load balancers \
                     allowed to send the PROXY header (a client elsewhere could claim any \
                     address)",
                ));
            }
            if !l.proxy_protocol && !l.proxy_from.is_empty() {
                return Err(Invalid::new(
                    at("proxy_from"),
                    "set, but proxy_protocol is not true: say proxy_protocol = true to read \
                     the PROXY header, or remove proxy_from",
                ));
            }
            Self::validate_named_certificates(i, l)?;
            for (j, other) in self.listeners[..i].iter().enumerate() {
                if same_bind(other.bind, l.bind) {
                    return Err(Invalid::new(
                        at("bind"),
                        format!("{} is also bound by listener[{j}]", l.bind),
                    ));
                }
                if !l.name.is_empty() && other.name == l.name {
                    return Err(Invalid::new(
                        at("name"),
                        format!("name {:?} is also used by listener[{j}]", l.name),
                    ));
                }
            }
        }
        self.validate_upstreams()?;
        self.validate_limits()?;
        self.validate_health()?;
        self.validate_admin()?;
        self.validate_state()?;
        self.validate_log()
    }

    fn validate_state(&self) -> Result<(), Invalid> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let at = |key: &str| vec![Seg::key("state"), Seg::key(key)];
        let url = redis::parse_redis_url(state.redis.expose()).ok_or_else(|| {
            Invalid::new(
                at("redis"),
                "not a redis:// or rediss:// (TLS) URL such as redis://127.0.0.1:6379/0",
            )
        })?;
        if !matches!(url.scheme(), "redis" | "rediss") {
            return Err(Invalid::new(
                at("redis"),
                format!(
                    "scheme {:?}: only redis:// and rediss:// (TLS) are supported",
                    url.scheme()
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Invalid::new(at("redis"), "the URL names no host"));
        }
        if state.ca.is_some() && url.scheme() != "rediss" {
            return Err(Invalid::new(
                at("ca"),
                "only for rediss:// (TLS): the `redis` URL is not",
            ));
        }
        // The path is the database number; anything else would be silently ignored.
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(Invalid::new(
                at("redis"),
                format!("{db:?} is not a database number"),
            ));
        }
        let in_url = url.password().is_some();
        let sources = [
            ("password_file", state.password_file.is_some()),
            ("password_env", state.password_env.is_some()),
        ];
        if sources.iter().all(|(_, given)| *given) {
            return Err(Invalid::new(
                at("password_env"),
                "give `password_file` or `password_env`, not both",
            ));
        }
        if let Some((key, _)) = sources.iter().find(|(_, given)| *given)
            && in_url
        {
            return Err(Invalid::new(
                at(key),
                "the `redis` URL has a password too: give it in one place",
            ));
        }
        if state.password_env.as_deref().is_some_and(str::is_empty) {
            return Err(Invalid::new(at("password_env"), "empty variable name"));
        }
        for (key, value) in [
            ("connect_timeout_ms", state.connect_timeout_ms),
            ("timeout_ms", state.timeout_ms),
        ] {
            if value == 0 {
                return Err(Invalid::new(at(key), "must be at least 1"));
            }
        }
        if !(1..=64).contains(&state.connections) {
            return Err(Invalid::new(at("connections"), "must be from 1 to 64"));
        }
        // Registrations are refreshed every third of the TTL, in whole seconds.
        if state.session_ttl_s < 3 {
            return Err(Invalid::new(at("session_ttl_s"), "must be at least 3"));
        }
        Ok(())
    }

    fn validate_admin(&self) -> Result<(), Invalid> {
        let Some(admin) = &self.admin else {
            return Ok(());
        };
        let at = |key: &str| vec![Seg::key("admin"), Seg::key(key)];
        match (&admin.token, &admin.token_file) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new(
                    at("token_file"),
                    "give `token` or `token_file`, not both",
                ));
            }
            (None, None) => {
                return Err(Invalid::new(
                    vec![Seg::key("admin")],
                    "`token` or `token_file` is required: every request must carry it",
                ));
            }
            (Some(token), None) => {
                check_token(token.expose()).map_err(|why| Invalid::new(at("token"), why))?;
            }
            (None, Some(_)) => {}
        }
        if let Some(m) = &self.metrics
            && same_bind(m.bind, admin.bind)
        {
            return Err(Invalid::new(
                at("bind"),
                format!("{} is also the metrics endpoint's bind", admin.bind),
            ));
        }
        if let Some(i) = self
            .listeners
            .iter()
            .position(|l| same_bind(l.bind, admin.bind))
        {
            return Err(Invalid::new(
                at("bind"),
                format!("{} is also bound by listener[{i}]", admin.bind),
            ));
        }
        Ok(())
    }

    /// SNI names: each a DNS name or `*.domain`, used once per listener, on a TLS listener.
    fn validate_named_certificates(i: usize, l: &ListenerConfig) -> Result<(), Invalid> {
        let at = |j: usize, rest: &[Seg]| {
            let mut field = vec![
                Seg::key("listener"),
                Seg::Index(i),
                Seg::key("certificate"),
                Seg::Index(j),
            ];
            field.extend_from_slice(rest);
            field
        };
        if l.tls == ListenerTls::None && !l.certificates.is_empty() {
            return Err(Invalid::new(
                at(0, &[]),
                "a listener with tls = \"none\" shows no certificate",
            ));
        }
        let mut seen: Vec<(String, usize)> = Vec::new();
        for (j, named) in l.certificates.iter().enumerate() {
            if named.names.is_empty() {
                return Err(Invalid::new(
                    at(j, &[Seg::key("names")]),
                    "give at least one server name (the listener's `cert` serves the others)",
                ));
            }
            for (k, name) in named.names.iter().enumerate() {
                let field = || at(j, &[Seg::key("names"), Seg::Index(k)]);
                check_sni_name(name).map_err(|why| Invalid::new(field(), why))?;
                let folded = name.to_ascii_lowercase();
                if let Some((_, other)) = seen.iter().find(|(n, _)| *n == folded) {
                    return Err(Invalid::new(
                        field(),
                        format!("{name:?} is also a name of certificate[{other}]"),
                    ));
                }
                seen.push((folded, j));
            }
        }
        Ok(())
    }

    fn validate_upstreams(&self) -> Result<(), Invalid> {
        let many = self.upstreams.len() > 1;
        for (i, up) in self.upstreams.iter().enumerate() {
            let at = |key: &str| {
                let mut field = vec![Seg::key("upstream")];
                if many {
                    field.push(Seg::Index(i));
                }
                field.push(Seg::key(key));
                field
            };
            let name_ok = !up.name.is_empty()
                && up
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok {
                return Err(Invalid::new(
                    at("name"),
                    format!(
                        "{:?} is not a name: letters, digits, '-', '_' and '.' only",
                        up.name
                    ),
                ));
            }
            if let Some(j) = self.upstreams[..i].iter().position(|o| o.name == up.name) {
                return Err(Invalid::new(
                    at("name"),
                    format!("name {:?} is also used by upstream[{j}]", up.name),
                ));
            }
            Self::validate_upstream(up, &at)?;
        }
        Ok(())
    }

    fn validate_upstream(
        up: &UpstreamConfig,
        at: &dyn Fn(&str) -> Vec<Seg>,
    ) -> Result<(), Invalid> {
        if split_host_port(&up.address).is_none() {
            return Err(Invalid::new(
                at("address"),
                format!(
                    "{:?} is not host:port (IPv6 addresses go in brackets: [::1]:143)",
                    up.address
                ),
            ));
        }
        if up.tls != UpstreamTls::None {
            let name = up.tls_server_name();
            if rustls_pki_types::ServerName::try_from(name).is_err() {
                return Err(Invalid::new(
                    at("server_name"),
                    format!("{name:?} is not a DNS name or IP address usable to verify TLS"),
                ));
            }
        }
        if up.connect_timeout_s == 0 {
            return Err(Invalid::new(at("connect_timeout_s"), "must be at least 1"));
        }
        if up.warm > MAX_WARM {
            return Err(Invalid::new(
                at("warm"),
                format!("at most {MAX_WARM} (each is an idle connection the server keeps)"),
            ));
        }
        if up.warm > 0 && up.send_proxy != SendProxy::None {
            return Err(Invalid::new(
                at("warm"),
                "cannot be used with send_proxy: the PROXY header names the client, so a \
                 connection cannot be opened before the client is known",
            ));
        }
        if up.warm > 0 && up.warm_max_age_s == 0 {
            return Err(Invalid::new(at("warm_max_age_s"), "must be at least 1"));
        }
        Ok(())
    }

    fn validate_health(&self) -> Result<(), Invalid> {
        let h = &self.health;
        let at = |key: &str| vec![Seg::key("health"), Seg::key(key)];
        for (key, value) in [("interval_s", h.interval_s), ("timeout_s", h.timeout_s)] {
            if value == 0 {
                return Err(Invalid::new(at(key), "must be at least 1"));
            }
        }
        // One probe at a time per upstream: a timeout past the interval would make the
        // interval a lie.
        if h.timeout_s > h.interval_s {
            return Err(Invalid::new(
                at("timeout_s"),
                format!(
                    "{} is longer than `interval_s` ({}): a probe must end before the next is due",
                    h.timeout_s, h.interval_s
                ),
            ));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), Invalid> {
        let lim = &self.limits;
        let at = |key: &str| vec![Seg::key("limits"), Seg::key(key)];
        if lim.max_connections == 0 {
            return Err(Invalid::new(at("max_connections"), "must be at least 1"));
        }
        for (key, value) in [
            ("max_connections_per_user", lim.max_connections_per_user),
            (
                "max_connections_per_address",
                lim.max_connections_per_address,
            ),
        ] {
            if value > lim.max_connections {
                return Err(Invalid::new(
                    at(key),
                    format!(
                        "{value} is larger than `max_connections` ({}): it would never apply \
                         (0 means unlimited)",
                        lim.max_connections
                    ),
                ));
            }
        }
        if lim.line < 1024 {
            return Err(Invalid::new(
                at("line"),
                format!("{} is too small: at least 1024", lim.line),
            ));
        }
        if lim.preauth_line < 1024 {
            return Err(Invalid::new(
                at("preauth_line"),
                format!("{} is too small: at least 1024", lim.preauth_line),
            ));
        }
        if lim.preauth_line > lim.line {
            return Err(Invalid::new(
                at("preauth_line"),
                format!(
                    "{} is larger than `line` ({}): the limit before login must not be looser",
                    lim.preauth_line, lim.line
                ),
            ));
        }
        if lim.literal > u64::from(u32::MAX) {
            return Err(Invalid::new(
                at("literal"),
                format!(
                    "{} is larger than {} (IMAP literal sizes are 32-bit)",
                    lim.literal,
                    u32::MAX
                ),
            ));
        }
        for (key, value) in [
            ("preauth_timeout_s", lim.preauth_timeout_s),
            ("idle_timeout_s", lim.idle_timeout_s),
            ("drain_timeout_s", lim.drain_timeout_s),
        ] {
            if value == 0 {
                return Err(Invalid::new(at(key), "must be at least 1"));
            }
        }
        Ok(())
    }

    fn validate_log(&self) -> Result<(), Invalid> {
        let level = self.log.level.0.trim();
        let plain = ["trace", "debug", "info", "warn", "error", "off"];
        // A bare word that is not a level would parse as a target directive and silently
        // log nothing useful, so only directive lists (with '=' or ',') go to EnvFilter.
        let ok = if plain.contains(&level.to_ascii_lowercase().as_str()) {
            true
        } else if level.contains('=') || level.contains(',') {
            tracing_subscriber::EnvFilter::builder()
                .parse(level)
                .is_ok()
        } else {
            false
        };
        if ok {
            Ok(())
        } else {
            Err(Invalid::new(
                vec![Seg::key("log"), Seg::key("level")],
                format!(
                    "{level:?} is not a level (trace, debug, info, warn, error, off) \
                     nor a directive list such as \"info,imapgate=debug\""
                ),
            ))
        }
    }
}

/// A semantic error before it is given a file name and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: Vec<Seg>,
    pub message: String,
}

impl Invalid {
    fn new(field: Vec<Seg>, message: impl Into<String>) -> Self {
        Invalid {
            field,
            message: message.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}`: {}",
            locate::display_field(&self.field),
            self.message
        )
    }
}

impl std::error::Error for Invalid {}

/// One step of a field path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    fn key(k: &str) -> Seg {
        Seg::Key(k.to_owned())
    }
}

/// A name a certificate is chosen by: a DNS name (`mail.example.org`) or a wildcard for one
/// label in front of a domain of at least two labels (`*.example.org`), like a certificate's
/// own wildcard. The error says what is wrong.
pub fn check_sni_name(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{name:?} is an IP address: clients never send one as SNI (RFC 6066), so \
             connections by address get the listener's `cert`"
        ));
    }
    let domain = name.strip_prefix("*.").unwrap_or(name);
    if domain.contains('*') {
        return Err(format!(
            "{name:?}: a wildcard is a whole first label, as in \"*.example.org\""
        ));
    }
    if name.ends_with('.') {
        return Err(format!("{name:?}: write the name without its final dot"));
    }
    if rustls_pki_types::DnsName::try_from(domain).is_err() {
        return Err(format!("{name:?} is not a DNS name"));
    }
    if domain.len() < name.len() && !domain.contains('.') {
        return Err(format!(
            "{name:?}: a wildcard needs a domain of at least two labels (\"*.example.org\")"
        ));
    }
    Ok(())
}

/// Splits `host:port`, `[v6]:port`; `None` when the port is missing or not a number.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        (host, rest.strip_prefix(':')?)
    } else {
        let (host, port) = address.rsplit_once(':')?;
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

/// Finds fields in the TOML text, for messages that point at the right line.
mod locate {
    use std::ops::Range;

    use toml::Spanned;
    use toml::de::{DeTable, DeValue};

    use super::{Location, Seg};

    pub struct Found {
        pub location: Location,
        pub field: Option<String>,
    }

    /// The location of a serde error and the field it is about: the entry with the
    /// smallest span around the error. Spans of tables cover only their `[header]`, so
    /// containment alone would not do.
    pub fn by_span(text: &str, span: Range<usize>) -> Found {
        let mut best = Best::default();
        if let Ok(root) = DeTable::parse(text) {
            walk_table(root.get_ref(), span.start, &mut Vec::new(), &mut best);
        }
        Found {
            location: location(text, span.start),
            field: best.path.map(|p| display_field(&p)),
        }
    }

    #[derive(Default)]
    struct Best {
        width: usize,
        path: Option<Vec<Seg>>,
    }

    impl Best {
        fn offer(&mut self, range: Range<usize>, at: usize, path: &[Seg]) {
            let width = range.len();
            // `<=` so that a deeper entry with the same span (a table and its header) wins.
            if range.contains(&at) && (self.path.is_none() || width <= self.width) {
                self.width = width;
                self.path = Some(path.to_vec());
            }
        }
    }

    fn walk_table(table: &DeTable<'_>, at: usize, path: &mut Vec<Seg>, best: &mut Best) {
        for (key, value) in table.iter() {
            path.push(Seg::Key(key.get_ref().to_string()));
            let (k, v) = (key.span(), value.span());
            best.offer(k.clone(), at, path);
            if k.start < v.start {
                best.offer(k.start..v.end, at, path);
            }
            walk_value(value, at, path, best);
            path.pop();
        }
    }

    fn walk_value(value: &Spanned<DeValue<'_>>, at: usize, path: &mut Vec<Seg>, best: &mut Best) {
        best.offer(value.span(), at, path);
        match value.get_ref() {
            DeValue::Table(t) => walk_table(t, at, path, best),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    walk_value(item, at, path, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The location of `field`'s value, or of the nearest enclosing table that exists.
    pub fn by_field(text: &str, field: &[Seg]) -> Option<Location> {
        let root = DeTable::parse(text).ok()?;
        let mut best: Option<usize> = None;
        let mut current: Option<&Spanned<DeValue<'_>>> = None;
        for seg in field {
            let next = match (seg, current.map(|c| c.get_ref())) {
                (Seg::Key(k), None) => root.get_ref().iter().find(|(key, _)| key.get_ref() == k),
                (Seg::Key(k), Some(DeValue::Table(t))) => {
                    t.iter().find(|(key, _)| key.get_ref() == k)
                }
                (Seg::Index(i), Some(DeValue::Array(items))) => {
                    current = items.get(*i);
                    if let Some(item) = current {
                        best = Some(item.span().start);
                    }
                    continue;
                }
                _ => None,
            };
            match next {
                Some((key, value)) => {
                    best = Some(match value.get_ref() {
                        DeValue::Table(_) | DeValue::Array(_) => key.span().start,
                        _ => value.span().start,
                    });
                    current = Some(value);
                }
                None => break,
            }
        }
        best.map(|offset| location(text, offset))
    }

    pub fn display_field(field: &[Seg]) -> String {
        let mut out = String::new();
        for seg in field {
            match seg {
                Seg::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    fn location(text: &str, offset: usize) -> Location {
        let before = &text[..floor_char_boundary(text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line,
            column: before[line_start..].chars().count() + 1,
        }
    }

    fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
        offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        offset
    }
}

/// Two binds that cannot both succeed. Port 0 asks the system for a free port, so any number
/// of them coexist (`imapgate run --ready-file` tells which ports they got).
fn same_bind(a: SocketAddr, b: SocketAddr) -> bool {
    a == b && a.port() != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/imapgate.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_named(text, "/etc/imapgate/test.toml")
    }

    const MINIMAL: &str = "[[listener]]\nbind = \"127.0.0.1:1993\"\n";

    #[test]
    fn example_file_parses_with_the_documented_values() {
        let c = Config::from_str_named(EXAMPLE, "examples/imapgate.toml").unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].bind, "127.0.0.1:1993".parse().unwrap());
        assert_eq!(c.listeners[0].tls, ListenerTls::Implicit);
        assert_eq!(c.listeners[1].bind, "127.0.0.1:1143".parse().unwrap());
        assert_eq!(c.listeners[1].tls, ListenerTls::Starttls);
        assert_eq!(c.upstreams[0].address, "127.0.0.1:10143");
        assert_eq!(c.upstreams[0].tls, UpstreamTls::None);
        let d = Limits::default();
        let l = &c.limits;
        assert_eq!(
            (l.max_connections, l.preauth_line, l.line, l.literal),
            (d.max_connections, d.preauth_line, d.line, d.literal)
        );
        assert_eq!(
            (l.preauth_timeout_s, l.idle_timeout_s, l.drain_timeout_s),
            (d.preauth_timeout_s, d.idle_timeout_s, d.drain_timeout_s)
        );
        assert_eq!(c.log.format, LogFormat::Text);
        let h = HealthConfig::default();
        assert_eq!(
            (c.health.interval_s, c.health.timeout_s),
            (h.interval_s, h.timeout_s)
        );
    }

    #[test]
    fn example_file_loads_from_disk() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/imapgate.toml");
        Config::load(&path).unwrap();
    }

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listeners[0].name, "127.0.0.1:1993");
        assert_eq!(c.listeners[0].tls, ListenerTls::Implicit);
        assert_eq!(c.upstreams[0].address, "127.0.0.1:143");
        assert_eq!(c.upstreams[0].server_name.as_deref(), Some("127.0.0.1"));
        assert!(c.upstreams[0].verify);
        assert_eq!(c.upstreams[0].connect_timeout(), Duration::from_secs(10));
        assert_eq!(c.limits.literal, 67_108_864);
        assert_eq!(c.log.level.0, "info");
        assert!(c.metrics.is_none());
        assert!(c.policies.is_empty());
    }

    #[test]
    fn one_upstream_table_or_named_upstreams() {
        let one = parse(&format!("{MINIMAL}[upstream]\naddress = \"mail:143\"\n")).unwrap();
        assert_eq!(one.upstreams.len(), 1);
        assert_eq!(one.upstreams[0].name, "default");
        let text = format!(
            "{MINIMAL}[[upstream]]\nname = \"mail1\"\naddress = \"m1:143\"\n\
             [[upstream]]\nname = \"mail2\"\naddress = \"m2:993\"\ntls = \"implicit\"\n\
             send_proxy = \"v2\"\nforward_id = true\n"
        );
        let many = parse(&text).unwrap();
        let names: Vec<_> = many.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["mail1", "mail2"]);
        assert_eq!(many.upstreams[1].server_name.as_deref(), Some("m2"));
        assert_eq!(many.upstreams[1].send_proxy, SendProxy::V2);
        assert!(many.upstreams[1].forward_id);
        let err = parse(&format!(
            "{MINIMAL}[[upstream]]\nname = \"a\"\naddress = \"m1:143\"\n\
             [[upstream]]\nname = \"a\"\naddress = \"m2:143\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("upstream[1].name") && err.contains("also used"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}[upstream]\nname = \"a b\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.name"), "{err}");
    }

    #[test]
    fn proxy_protocol_needs_its_trusted_sources() {
        let c = parse(&format!(
            "{MINIMAL}proxy_protocol = true\nproxy_from = [\"10.0.0.0/8\", \"127.0.0.1\"]\n"
        ))
        .unwrap();
        let l = &c.listeners[0];
        assert!(l.proxy_protocol);
        assert_eq!(l.proxy_from.len(), 2);
        assert!(l.proxy_from[1].contains("127.0.0.1".parse().unwrap()));

        let err = parse(&format!("{MINIMAL}proxy_protocol = true\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`listener[0].proxy_from`") && err.contains("required"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}proxy_protocol = true\nproxy_from = []\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains(":4:") && err.contains("required"), "{err}");
        let err = parse(&format!("{MINIMAL}proxy_from = [\"10.0.0.0/8\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`listener[0].proxy_from`") && err.contains("proxy_protocol is not true"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}proxy_protocol = true\nproxy_from = [\"10.0.0.0/8\", \"10.0.0.0/40\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(":4:") && err.contains("\"10.0.0.0/40\" is not a network"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}proxy_protocol = true\nproxy_from = [\"10.1.2.3/8\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("the network is 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn send_proxy_is_accepted_per_upstream() {
        for (value, expected) in [("v1", SendProxy::V1), ("v2", SendProxy::V2)] {
            let c = parse(&format!(
                "{MINIMAL}[upstream]\naddress = \"mail:143\"\nsend_proxy = \"{value}\"\n"
            ))
            .unwrap();
            assert_eq!(c.upstreams[0].send_proxy, expected);
        }
        let err = parse(&format!("{MINIMAL}[upstream]\nsend_proxy = \"v3\"\n"))
            .unwrap_err()
            .to_string();
        // The one-or-many `upstream` shape hides which field serde disliked.
        assert!(err.contains("`upstream`"), "{err}");
    }

    #[test]
    fn warm_connections_are_bounded_and_refused_with_send_proxy() {
        let c = parse(&format!(
            "{MINIMAL}[upstream]\naddress = \"mail:143\"\nwarm = 4\n"
        ))
        .unwrap();
        assert_eq!(
            (c.upstreams[0].warm, c.upstreams[0].warm_max_age_s),
            (4, 20)
        );
        assert_eq!(parse(MINIMAL).unwrap().upstreams[0].warm, 0);
        for (text, field) in [
            ("warm = 2\nsend_proxy = \"v2\"", "upstream.warm"),
            ("warm = 100000", "upstream.warm"),
            ("warm = 1\nwarm_max_age_s = 0", "upstream.warm_max_age_s"),
        ] {
            match parse(&format!(
                "{MINIMAL}[upstream]\naddress = \"mail:143\"\n{text}\n"
            )) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn health_defaults_and_validation() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!((c.health.interval_s, c.health.timeout_s), (10, 5));
        let c = parse(&format!(
            "{MINIMAL}[health]\ninterval_s = 1\ntimeout_s = 1\n"
        ))
        .unwrap();
        assert_eq!(c.health.interval(), Duration::from_secs(1));
        for (text, field) in [
            ("interval_s = 0", "health.interval_s"),
            ("timeout_s = 0", "health.timeout_s"),
            ("interval_s = 3\ntimeout_s = 4", "health.timeout_s"),
        ] {
            match parse(&format!("{MINIMAL}[health]\n{text}\n")) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let err = parse(&format!("{MINIMAL}[health]\nintervall_s = 3\n")).unwrap_err();
        assert!(err.to_string().contains("intervall_s"), "{err}");
    }

    #[test]
    fn a_config_built_in_code_validates_without_resolve() {
        let bind = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut config = Config {
            listeners: vec![
                ListenerConfig::new(bind(1993), ListenerTls::Implicit),
                ListenerConfig::new(bind(1143), ListenerTls::Starttls),
            ],
            ..Config::default()
        };
        config.validate().unwrap();
        config.listeners[1].bind = bind(1993);
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "`listener[1].bind`: 127.0.0.1:1993 is also bound by listener[0]"
        );
        // Port 0 is a free port each: no clash, however many.
        config.listeners[0].bind = bind(0);
        config.listeners[1].bind = bind(0);
        config.metrics = Some(MetricsConfig { bind: bind(0) });
        config.admin = Some(AdminConfig {
            bind: bind(0),
            token: Some(Secret::new("s3cret-Token_1")),
            token_file: None,
        });
        config.validate().unwrap();
    }

    #[test]
    fn admin_needs_exactly_one_usable_token() {
        let admin = |body: &str| parse(&format!("{MINIMAL}[admin]\n{body}"));
        let c = admin("token = \"s3cret-Token_1\"\n").unwrap();
        let a = c.admin.unwrap();
        assert_eq!(a.bind, "127.0.0.1:9144".parse().unwrap());
        assert_eq!(a.token.as_ref().map(Secret::expose), Some("s3cret-Token_1"));
        // Whatever prints the config never prints the token.
        assert!(!format!("{a:?}").contains("s3cret"), "{a:?}");
        let c = admin("bind = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n").unwrap();
        assert_eq!(
            c.admin.unwrap().token_file.unwrap(),
            Path::new("/etc/imapgate/admin.token")
        );
        for (body, field, message) in [
            ("", "`admin`", "is required"),
            (
                "token = \"a\"\ntoken_file = \"f\"\n",
                "`admin.token_file`",
                "not both",
            ),
            ("token = \"\"\n", "`admin.token`", "empty"),
            ("token = \"two words\"\n", "`admin.token`", "visible ASCII"),
            (
                "token = \"x\"\nbind = \"127.0.0.1:1993\"\n",
                "`admin.bind`",
                "listener[0]",
            ),
        ] {
            let err = admin(body).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains(message),
                "{body:?}: {err}"
            );
            assert!(!err.contains("two words"), "{err}");
        }
        let err = parse(&format!(
            "{MINIMAL}[metrics]\nbind = \"127.0.0.1:9144\"\n[admin]\ntoken = \"x\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("metrics endpoint"), "{err}");
        assert!(admin("token = \"x\"\nport = 1\n").is_err());
    }

    #[test]
    fn state_is_optional_and_has_defaults() {
        assert!(parse(MINIMAL).unwrap().state.is_none());
        let c = parse(&format!(
            "{MINIMAL}[state]\nredis = \"redis://127.0.0.1:6379/0\"\n"
        ))
        .unwrap();
        let s = c.state.unwrap();
        assert_eq!(s.redis.expose(), "redis://127.0.0.1:6379/0");
        assert_eq!(s.prefix, "imapgate:");
        assert_eq!(s.timeout(), Duration::from_millis(100));
        assert_eq!(s.connect_timeout(), Duration::from_millis(1000));
        assert_eq!(s.connections, 2);
        assert_eq!(s.session_ttl(), Duration::from_secs(30));
        assert_eq!((s.password_file, s.password_env), (None, None));
        let c = parse(&format!(
            "{MINIMAL}[state]\nredis = \"rediss://redis.example.org:6380/3\"\n\
             password_file = \"redis.pass\"\nprefix = \"mail:\"\ntimeout_ms = 20\n\
             ca = \"redis-ca.pem\"\n\
             connect_timeout_ms = 500\nconnections = 4\nsession_ttl_s = 9\n"
        ))
        .unwrap();
        let s = c.state.unwrap();
        assert_eq!(
            s.password_file.as_deref(),
            Some(Path::new("/etc/imapgate/redis.pass"))
        );
        assert_eq!(
            (s.prefix.as_str(), s.timeout_ms, s.connections),
            ("mail:", 20, 4)
        );
        assert_eq!(s.session_ttl_s, 9);
        assert_eq!(
            s.ca.as_deref(),
            Some(Path::new("/etc/imapgate/redis-ca.pem"))
        );
    }

    #[test]
    fn state_refuses_what_cannot_work() {
        let state = |body: &str| parse(&format!("{MINIMAL}[state]\n{body}"));
        for (body, field, message) in [
            ("", "`state`", "redis"),
            ("redis = \"127.0.0.1:6379\"\n", "`state.redis`", "redis://"),
            (
                "redis = \"http://127.0.0.1/\"\n",
                "`state.redis`",
                "rediss://",
            ),
            (
                "redis = \"redis://127.0.0.1/x\"\n",
                "`state.redis`",
                "database number",
            ),
            (
                "redis = \"redis://h\"\npassword_file = \"f\"\npassword_env = \"V\"\n",
                "`state.password_env`",
                "not both",
            ),
            (
                "redis = \"redis://:pw@h\"\npassword_env = \"V\"\n",
                "`state.password_env`",
                "one place",
            ),
            (
                "redis = \"redis://h\"\ntimeout_ms = 0\n",
                "`state.timeout_ms`",
                "at least 1",
            ),
            (
                "redis = \"redis://h\"\nconnections = 0\n",
                "`state.connections`",
                "1 to 64",
            ),
            (
                "redis = \"redis://h\"\nsession_ttl_s = 2\n",
                "`state.session_ttl_s`",
                "at least 3",
            ),
            ("redis = \"redis://h\"\nport = 1\n", "port", "unknown field"),
            (
                "redis = \"redis://h\"\nca = \"ca.pem\"\n",
                "`state.ca`",
                "rediss://",
            ),
        ] {
            let err = state(body).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains(message),
                "{body:?}: {err}"
            );
        }
        // A password in the URL is accepted, and never shown.
        let c = state("redis = \"redis://:s3cret@127.0.0.1:6379/0\"\n").unwrap();
        let shown = format!("{:?}", c.state.unwrap());
        assert!(
            !shown.contains("s3cret") && shown.contains("127.0.0.1:6379"),
            "{shown}"
        );
        let err = state("redis = \"redis://:s3cret@h/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn on_state_error_defaults_to_on_error() {
        let policy = |extra: &str| {
            parse(&format!("{MINIMAL}[[policy]]\nscript = \"p.lua\"\n{extra}"))
                .unwrap()
                .policies
                .remove(0)
        };
        assert_eq!(policy("").state_error_mode(), OnError::Closed);
        assert_eq!(
            policy("on_error = \"open\"\n").state_error_mode(),
            OnError::Open
        );
        let p = policy("on_error = \"open\"\non_state_error = \"closed\"\n");
        assert_eq!(p.state_error_mode(), OnError::Closed);
        assert_eq!(p.on_error, OnError::Open);
        assert_eq!(
            policy("on_state_error = \"open\"\n").state_error_mode(),
            OnError::Open
        );
    }

    #[test]
    fn per_user_and_per_address_limits() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.limits.max_connections_per_user, 0);
        assert_eq!(c.limits.max_connections_per_address, 0);
        let c = parse(&format!(
            "{MINIMAL}[limits]\nmax_connections_per_user = 5\nmax_connections_per_address = 50\n"
        ))
        .unwrap();
        assert_eq!(c.limits.max_connections_per_user, 5);
        assert_eq!(c.limits.max_connections_per_address, 50);
        let err = parse(&format!(
            "{MINIMAL}[limits]\nmax_connections = 10\nmax_connections_per_address = 11\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("limits.max_connections_per_address") && err.contains("never apply"),
            "{err}"
        );
        assert!(
            parse(&format!(
                "{MINIMAL}[limits]\nmax_connections_per_user = -1\n"
            ))
            .is_err()
        );
    }

    #[test]
    fn policy_file_options_are_relative_to_the_config() {
        let text = format!(
            "{MINIMAL}[[policy]]\nscript = \"policies/route.lua\"\n\
             options = {{ map_file = \"users.map\", other_file = \"/srv/x.map\", \
             pool = [\"mail1\"], profile = \"users.map\" }}\n"
        );
        let c = parse(&text).unwrap();
        let p = &c.policies[0];
        assert_eq!(p.script, Path::new("/etc/imapgate/policies/route.lua"));
        assert_eq!(
            p.options["map_file"].as_str(),
            Some("/etc/imapgate/users.map")
        );
        assert_eq!(p.options["other_file"].as_str(), Some("/srv/x.map"));
        // Only `*_file` options are paths.
        assert_eq!(p.options["profile"].as_str(), Some("users.map"));
    }

    #[test]
    fn certificates_by_server_name() {
        let text = format!(
            "{MINIMAL}cert = \"default.pem\"\nkey = \"default.key\"\n\
             [[listener.certificate]]\nnames = [\"mail.example.org\", \"*.Example.org\"]\n\
             cert = \"example.pem\"\nkey = \"/keys/example.key\"\n\
             [[listener.certificate]]\nnames = [\"imap.example.net\"]\n\
             cert = \"net.pem\"\nkey = \"net.key\"\n"
        );
        let c = parse(&text).unwrap();
        let named = &c.listeners[0].certificates;
        assert_eq!(named.len(), 2);
        assert_eq!(named[0].names, ["mail.example.org", "*.Example.org"]);
        assert_eq!(named[0].cert, Path::new("/etc/imapgate/example.pem"));
        assert_eq!(named[0].key, Path::new("/keys/example.key"));
        assert_eq!(named[1].key, Path::new("/etc/imapgate/net.key"));
        // Without a default certificate, the generated one serves the other names.
        let text = format!(
            "{MINIMAL}[[listener.certificate]]\nnames = [\"a.example\"]\n\
             cert = \"a.pem\"\nkey = \"a.key\"\n"
        );
        assert!(parse(&text).unwrap().listeners[0].cert.is_none());
    }

    #[test]
    fn certificate_names_are_checked() {
        let with = |names: &str| {
            format!(
                "{MINIMAL}[[listener.certificate]]\nnames = [\"ok.example\"]\n\
                 cert = \"a.pem\"\nkey = \"a.key\"\n\
                 [[listener.certificate]]\nnames = {names}\ncert = \"b.pem\"\nkey = \"b.key\"\n"
            )
        };
        for (names, field, why) in [
            ("[]", "listener[0].certificate[1].names", "at least one"),
            (
                "[\"x\", \"*\"]",
                "listener[0].certificate[1].names[1]",
                "wildcard",
            ),
            ("[\"a.*.example\"]", "names[0]", "whole first label"),
            ("[\"*a.example\"]", "names[0]", "whole first label"),
            ("[\"*.example\"]", "names[0]", "two labels"),
            ("[\"127.0.0.1\"]", "names[0]", "IP address"),
            ("[\"::1\"]", "names[0]", "IP address"),
            ("[\"mail.example.\"]", "names[0]", "final dot"),
            ("[\"bad name.example\"]", "names[0]", "not a DNS name"),
            ("[\"\"]", "names[0]", "not a DNS name"),
            (
                "[\"OK.example\"]",
                "names[0]",
                "also a name of certificate[0]",
            ),
            (
                "[\"b.example\", \"B.Example\"]",
                "names[1]",
                "certificate[1]",
            ),
        ] {
            let err = parse(&with(names)).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(why), "{names}: {err}");
        }
        parse(&with(
            "[\"*.ok.example\", \"b.example\", \"xn--bcher-kva.example\"]",
        ))
        .unwrap();
        let err = parse(&format!(
            "{MINIMAL}tls = \"none\"\n[[listener.certificate]]\nnames = [\"a.example\"]\n\
             cert = \"a.pem\"\nkey = \"a.key\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("listener[0].certificate[0]") && err.contains("none"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}[[listener.certificate]]\nnames = [\"a.example\"]\ncert = \"a.pem\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing field `key`"), "{err}");
    }

    #[test]
    fn split_host_port_cases() {
        assert_eq!(split_host_port("a:1"), Some(("a", 1)));
        assert_eq!(split_host_port("[::1]:143"), Some(("::1", 143)));
        assert_eq!(split_host_port("::1:143"), None);
        assert_eq!(split_host_port("a"), None);
        assert_eq!(split_host_port(":143"), None);
        assert_eq!(split_host_port("a:0"), None);
        assert_eq!(split_host_port("a:99999"), None);
    }
}
