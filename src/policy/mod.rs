//! Policies: Lua scripts that judge, rewrite, refuse, delay or count what passes through.
//!
//! The session asks [`PolicySet::hooks_command`] / [`PolicySet::hooks_response`] first, so a
//! message no policy asked for never enters Lua. Views handed to the hooks carry decoded
//! (UTF-8) mailbox names; the session encodes changes back with the protocol core. The whole
//! set is swapped atomically on reload ([`Policies::reload`]); live connections use the new set
//! from their next message on, and their `ctx.vars` (kept in Rust) survive.

pub mod api;
mod budget;
mod contract;
mod detach;
mod glue;
pub mod lua;
pub mod pattern;
pub mod ratelimit;
mod sandbox;
mod state_api;
mod userdata;
mod views;
mod waiting;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{Config, LuaConfig, PolicyConfig};
use crate::imap::response::Status;
use crate::metrics::Metrics;
use crate::net::health::UpstreamHealth;

pub use lua::PolicySet;
pub use state_api::Lookups;
pub use views::{
    CommandView, CompleteView, Completed, LoginView, MailboxSlot, Namespace, NamespaceEntry,
    ResponseView,
};
pub use waiting::{Finished, Judgement, Waiting};

/// What a hook decided. Each hook has its own set (see [`Hook::allows`]); a verdict a hook
/// cannot apply is a hook error, handled by the policy's `on_error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (with any rewrites the hook made to the view).
    Pass,
    /// `on_command`: answer the command with this status instead of relaying it.
    /// `on_response` (only from a failed hook under `on_error = "closed"`): do not relay the
    /// response, and complete the command it belongs to with this status and code.
    Reject {
        status: Status,
        code: Option<String>,
        text: String,
    },
    /// `* BYE text`, then close.
    Close { text: String },
    /// Hold the command this long, then judge it again (from its original form).
    Delay(Duration),
    /// Do not relay this response (e.g. a LIST entry outside the client's namespace).
    Drop,
    /// `on_login`: the upstream (and fallbacks) that serves this login.
    Route(Route),
}

/// Where a login goes: `imap.route{ upstream = "mail2", fallbacks = { "mail3" }, user = "x" }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Upstream names in the order to try: the route's upstream, then its fallbacks.
    pub upstreams: Vec<String>,
    /// The user name to log in as upstream instead of the client's (LOGIN and PLAIN only).
    pub user: Option<String>,
}

impl Verdict {
    pub fn action(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Reject { .. } => "reject",
            Verdict::Close { .. } => "close",
            Verdict::Delay(_) => "delay",
            Verdict::Drop => "drop",
            Verdict::Route(_) => "route",
        }
    }
}

/// The hooks of the policy contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Connect,
    Capability,
    Command,
    Response,
    Complete,
    Disconnect,
    /// The client gave its credentials (when imapgate owns the login).
    Login,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "on_connect",
            Hook::Capability => "on_capability",
            Hook::Command => "on_command",
            Hook::Response => "on_response",
            Hook::Complete => "on_complete",
            Hook::Disconnect => "on_disconnect",
            Hook::Login => "on_login",
        }
    }

    /// Whether this hook can apply the verdict.
    pub fn allows(self, verdict: &Verdict) -> bool {
        match verdict {
            Verdict::Pass => true,
            Verdict::Close { .. } => self != Hook::Disconnect,
            Verdict::Reject { .. } | Verdict::Delay(_) => {
                matches!(self, Hook::Command | Hook::Login)
            }
            Verdict::Drop => self == Hook::Response,
            Verdict::Route(_) => self == Hook::Login,
        }
    }

    /// What a policy's hook may return, for error messages.
    pub fn verdicts(self) -> &'static str {
        match self {
            Hook::Connect | Hook::Capability | Hook::Complete => "nothing or imap.close()",
            Hook::Command => "nothing, imap.reject{...}, imap.close() or imap.delay(ms)",
            Hook::Response => "nothing, imap.drop() or imap.close()",
            Hook::Disconnect => "nothing",
            Hook::Login => {
                "nothing, imap.route{...}, imap.reject{...}, imap.close() or imap.delay(ms)"
            }
        }
    }
}

/// A per-connection value kept for policies across messages and reloads.
#[derive(Clone, Debug, PartialEq)]
pub enum Var {
    Bool(bool),
    Int(i64),
    Number(f64),
    Str(String),
}

/// `ctx.vars`: kept per connection and per policy (by name, so they survive a reload), shared
/// between the connection and whichever VM runs its hooks. One policy never sees another's.
pub type Vars = Arc<Mutex<HashMap<Arc<str>, HashMap<String, Var>>>>;

/// What a policy knows about the connection (`ctx` in Lua).
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    pub id: u64,
    /// `ip:port` of the client.
    pub peer: String,
    pub listener: String,
    pub tls: bool,
    pub sni: Option<String>,
    /// After a successful login.
    pub user: Option<String>,
    /// `not_authenticated`, `authenticated`, `selected` or `logout`.
    pub state: &'static str,
    pub selected: Option<String>,
}

/// One policy decision, for metrics and the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub policy: Arc<str>,
    pub hook: Hook,
    /// `pass`, `reject`, `close`, `delay`, `drop`, or `error`.
    pub action: &'static str,
    pub code: Option<String>,
    pub command: Option<&'static str>,
    pub elapsed: Duration,
    pub error: Option<String>,
}

/// The connection's side of the policy contract: `ctx`, and the decisions made for it.
#[derive(Debug, Default)]
pub struct ConnCtx {
    pub info: ConnInfo,
    pub vars: Vars,
    pub decisions: Vec<Decision>,
    /// Bumped whenever `info` changes, so the Lua copy of ctx is refreshed only then.
    pub version: u64,
    /// The Lua table this connection's `ctx` is in its VM (built once, refreshed on change).
    pub(crate) lua: Option<lua::LuaCtx>,
}

impl ConnCtx {
    pub fn new(info: ConnInfo) -> ConnCtx {
        ConnCtx {
            info,
            ..ConnCtx::default()
        }
    }

    /// Call after changing `info`.
    pub fn changed(&mut self) {
        self.version = self.version.wrapping_add(1);
    }
}

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Load { path: String, message: String },
    #[error("{path}: {message}")]
    Contract { path: String, message: String },
    #[error("Lua: {0}")]
    Lua(String),
}

/// The live policy set, swapped atomically on reload.
#[derive(Clone)]
pub struct Policies {
    current: Arc<ArcSwap<PolicySet>>,
    shared: Arc<api::HostShared>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Policies")
            .field(&self.current.load().names())
            .finish()
    }
}

impl Policies {
    /// No policies at all: every hook check is false.
    pub fn none() -> Policies {
        Policies {
            current: Arc::new(ArcSwap::from_pointee(PolicySet::empty())),
            shared: Arc::new(api::HostShared::default()),
        }
    }

    /// Loads every configured policy, failing on the first that does not load.
    pub fn load(configs: &[PolicyConfig], lua: &LuaConfig) -> Result<Policies, PolicyError> {
        Policies::load_with_metrics(configs, lua, None)
    }

    /// Like [`Policies::load`]; `imap.metrics` registers into `metrics` (without it, policy
    /// metrics are accepted and go nowhere).
    pub fn load_with_metrics(
        configs: &[PolicyConfig],
        lua: &LuaConfig,
        metrics: Option<Metrics>,
    ) -> Result<Policies, PolicyError> {
        Policies::load_with_host(
            configs,
            lua,
            api::HostShared {
                metrics,
                ..api::HostShared::default()
            },
        )
    }

    /// Like [`Policies::load`], with the host state the policies share: where their metrics
    /// go, and the upstream health they read.
    pub fn load_with_host(
        configs: &[PolicyConfig],
        lua: &LuaConfig,
        host: api::HostShared,
    ) -> Result<Policies, PolicyError> {
        let shared = Arc::new(host);
        let set = PolicySet::load(configs, lua, shared.clone())?;
        Ok(Policies {
            current: Arc::new(ArcSwap::from_pointee(set)),
            shared,
        })
    }

    /// Replaces the set if the new one loads; otherwise keeps the old and says why.
    pub fn reload(&self, configs: &[PolicyConfig], lua: &LuaConfig) -> Result<(), PolicyError> {
        let set = PolicySet::load(configs, lua, self.shared.clone())?;
        self.current.store(Arc::new(set));
        Ok(())
    }

    /// The set to use for the next message.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// A cheap look at the live set (no reference count touched), for the per-message check
    /// whether any policy wants a message at all.
    pub fn peek(&self) -> arc_swap::Guard<Arc<PolicySet>> {
        self.current.load()
    }

    /// The host state shared by all policies (rate limiters, shared counters, metrics sink).
    pub fn host(&self) -> &Arc<api::HostShared> {
        &self.shared
    }
}

/// Checks that every policy of `config` loads, for `imapgate check` (every configured upstream
/// counting as up).
pub fn check(config: &Config) -> Result<Vec<String>, PolicyError> {
    // With [state], policies see `imap.state` as available (a policy may require it); the
    // client is built without connecting, on a runtime of its own since `check` has none.
    let runtime = match &config.state {
        Some(_) => Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| PolicyError::Lua(format!("cannot start a runtime: {e}")))?,
        ),
        None => None,
    };
    let _entered = runtime.as_ref().map(|r| r.enter());
    let state = match &config.state {
        Some(cfg) => Some(
            crate::state::State::new(cfg, None)
                .map_err(|e| PolicyError::Lua(format!("[state]: {e}")))?,
        ),
        None => None,
    };
    let host = api::HostShared {
        health: Some(UpstreamHealth::unprobed(
            config.upstreams.iter().map(|u| &u.name),
        )),
        state,
        ..api::HostShared::default()
    };
    let set = PolicySet::load(&config.policies, &config.lua, Arc::new(host))?;
    Ok(set.names())
}

/// The display form of a script path in messages.
pub(crate) fn path_name(path: &Path) -> String {
    path.display().to_string()
}
