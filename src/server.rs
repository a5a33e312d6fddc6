//! The running proxy: listeners, the connection limit, logging, signals and draining.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::admin::{self, Admin, AdminError, TokenSlot};
use crate::audit::{Audit, AuditError};
use crate::config::{Config, ListenerTls, LogFormat, StateConfig, UpstreamTls};
use crate::metrics::{HealthState, Metrics, SessionLimit};
use crate::net::certs::{CertError, ClientCerts};
use crate::net::health::{self, Prober, UpstreamHealth};
use crate::net::http::{self, Reply};
use crate::net::tls::{self, TlsError};
use crate::net::upstream::Target;
use crate::net::warm::Warm;
use crate::net::{Stream, tune};
use crate::policy::api::HostShared;
use crate::policy::{Lookups, Policies, PolicyError};
use crate::session::relay::Routing;
use crate::session::{self, ConnectionLimits, Listener, Registry, SessionError, Settings, Shared};
use crate::state::{ClusterSessions, State};

/// After the drain timeout, how long sessions get to say BYE before the process exits anyway.
const BYE_GRACE: Duration = Duration::from_secs(2);
/// Beyond the drain timeout and the BYE grace, how long a SIGTERM waits for an orderly exit
/// before the process exits regardless (a session stuck in a policy's C call cannot be
/// waited for).
const EXIT_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener {name}: cannot bind {bind}: {source}")]
    Bind {
        name: String,
        bind: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {name}: {source}")]
    ListenerTls { name: String, source: TlsError },
    #[error("upstream {name}: TLS: {source}")]
    UpstreamTls { name: String, source: TlsError },
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("policy: {0}")]
    Policy(#[source] PolicyError),
    #[error("audit log: {0}")]
    Audit(#[source] AuditError),
    #[error("{name} endpoint: cannot bind {bind}: {source}")]
    Endpoint {
        name: &'static str,
        bind: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Admin(#[source] AdminError),
    #[error("{0}")]
    State(#[source] crate::state::StateError),
    #[error("ready file {}: {source}", path.display())]
    ReadyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A started proxy: its listeners accept until [`Server::shutdown`].
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    policies: Policies,
    certs: ClientCerts,
    metrics: Metrics,
    audit: Audit,
    health: HealthState,
    upstream_health: UpstreamHealth,
    prober: Prober,
    /// One task per upstream with `warm` connections.
    warmers: JoinSet<()>,
    /// The refresh of this instance's cluster session registrations, with `[state]`.
    state_tasks: JoinSet<()>,
    metrics_endpoint: Option<EndpointThread>,
    admin_endpoint: Option<(EndpointThread, TokenSlot)>,
    sessions: Registry,
    stop_accepting: watch::Sender<bool>,
    bye: watch::Sender<bool>,
    connections: Arc<Semaphore>,
    max_connections: u32,
    accept_loops: JoinSet<()>,
    drain: Duration,
}

/// What the config's TLS needs: one acceptor per listener (`None` for plaintext ones), the
/// certificate stores behind them, and the upstreams, each with the TLS client configuration
/// it needs.
pub struct TlsSetup {
    pub acceptors: Vec<Option<TlsAcceptor>>,
    pub certs: ClientCerts,
    pub upstreams: Vec<Target>,
}

/// The TLS configurations the config asks for; used by `check` too, so that unreadable
/// certificates are reported before the proxy runs.
pub fn tls_setup(config: &Config) -> Result<TlsSetup, ServerError> {
    // Listeners without a certificate share one generated self-signed certificate.
    let (certs, acceptors) = ClientCerts::load(config)?;
    let mut upstreams = Vec::new();
    for up in &config.upstreams {
        let tls = match up.tls {
            UpstreamTls::None => None,
            UpstreamTls::Implicit | UpstreamTls::Starttls => Some(
                tls::client_config(up.ca.as_deref(), up.verify).map_err(|source| {
                    ServerError::UpstreamTls {
                        name: up.name.clone(),
                        source,
                    }
                })?,
            ),
        };
        upstreams.push(Target::new(up.clone(), tls));
    }
    Ok(TlsSetup {
        acceptors,
        certs,
        upstreams,
    })
}

impl From<CertError> for ServerError {
    fn from(e: CertError) -> Self {
        ServerError::ListenerTls {
            name: e.listener,
            source: e.source,
        }
    }
}

impl Server {
    /// Binds every listener and starts accepting.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        let TlsSetup {
            acceptors,
            certs,
            upstreams,
        } = tls_setup(&config)?;
        let metrics = Metrics::new();
        let mut warmers = JoinSet::new();
        let upstreams: Arc<[Target]> = upstreams
            .into_iter()
            .map(|mut target| {
                let m = metrics.upstream(target.name());
                if target.config.warm > 0 {
                    let warm = Warm::new(
                        target.config.warm,
                        target.config.warm_max_age(),
                        Some(m.clone()),
                    );
                    target.warm = Some(warm.clone());
                    warmers.spawn(warm.keep(target.clone()));
                }
                target.metrics = Some(m);
                target
            })
            .collect();
        let audit = Audit::open(&config.log, &metrics).map_err(ServerError::Audit)?;
        let upstream_health =
            UpstreamHealth::new(upstreams.iter().map(Target::name), Some(&metrics));
        // Probing starts now, beside the rest of the setup; accepting waits for the first
        // round below.
        let prober = health::start(&upstreams, &upstream_health, &config.health);
        let health = HealthState::with_upstreams(upstream_health.clone());
        let metrics_endpoint = match &config.metrics {
            Some(m) => {
                let handler = crate::metrics::handler(metrics.clone(), health.clone());
                Some(EndpointThread::start("metrics", m.bind, handler).await?)
            }
            None => None,
        };
        let state = match &config.state {
            Some(cfg) => Some(start_state(cfg, &metrics).await?),
            None => None,
        };
        let mut state_tasks = JoinSet::new();
        // The cluster-wide registry only serves the per-user limit: without one, no session
        // costs a Redis round trip.
        let cluster = state
            .as_ref()
            .filter(|_| config.limits.max_connections_per_user > 0)
            .map(|s| {
                let cluster = ClusterSessions::new(s.clone());
                let refresher = cluster.clone();
                state_tasks.spawn(async move { refresher.refresh_forever().await });
                cluster
            });
        let sessions = Registry::with_cluster(
            ConnectionLimits {
                per_user: config.limits.max_connections_per_user,
                per_address: config.limits.max_connections_per_address,
            },
            cluster,
        );
        let lookups = Arc::new(Lookups::default());
        let admin_endpoint = match &config.admin {
            Some(a) => {
                let token = TokenSlot::new(admin::load_token(a).map_err(ServerError::Admin)?);
                let handler = Admin {
                    lookups: lookups.clone(),
                    sessions: sessions.clone(),
                    token: token.clone(),
                    metrics: metrics.clone(),
                }
                .handler();
                Some((
                    EndpointThread::start("admin", a.bind, handler).await?,
                    token,
                ))
            }
            None => None,
        };
        let host = HostShared {
            metrics: Some(metrics.clone()),
            health: Some(upstream_health.clone()),
            state,
            lookups,
            ..HostShared::default()
        };
        let policies = Policies::load_with_host(&config.policies, &config.lua, host)
            .map_err(ServerError::Policy)?;
        if !config.policies.is_empty() {
            tracing::info!(policies = ?policies.current().names(), "policies loaded");
        }
        let routing = routing_setup(&config, &policies, &upstreams).await;
        let limits = config.limits.clone();
        let settings = Settings {
            listener_tls: ListenerTls::None,
            preauth_line: limits.preauth_line,
            line: limits.line,
            literal: u32::try_from(limits.literal).unwrap_or(u32::MAX),
            ..Settings::default()
        };
        let max_connections = u32::try_from(limits.max_connections)
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        let connections = Arc::new(Semaphore::new(max_connections as usize));
        let (stop_accepting, _) = watch::channel(false);
        let (bye, _) = watch::channel(false);
        let ids = Arc::new(AtomicU64::new(1));
        // Sessions and routing start with every upstream's state known (within timeout_s).
        prober.first_round().await;
        let mut accept_loops = JoinSet::new();
        let mut addrs = Vec::new();
        for (l, acceptor) in config.listeners.iter().zip(acceptors) {
            let socket = crate::net::listen::bind(l.bind, l.reuse_port).map_err(|source| {
                ServerError::Bind {
                    name: l.name.clone(),
                    bind: l.bind,
                    source,
                }
            })?;
            let local = socket.local_addr().unwrap_or(l.bind);
            tracing::info!(listener = %l.name, addr = %local, tls = ?l.tls, "listening");
            addrs.push((l.name.clone(), local));
            let shared = Arc::new(Shared {
                policies: policies.clone(),
                metrics: metrics.clone(),
                audit: audit.clone(),
                upstreams: upstreams.clone(),
                routing: routing.clone(),
                health: upstream_health.clone(),
                settings: Settings {
                    listener_tls: l.tls,
                    ..settings.clone()
                },
                limits: limits.clone(),
                sessions: sessions.clone(),
            });
            let listener = Arc::new(Listener {
                metrics: metrics.listener(&l.name),
                name: l.name.clone(),
                tls: l.tls,
                acceptor,
                proxy_from: l.proxy_protocol.then(|| l.proxy_from.clone()),
            });
            accept_loops.spawn(accept_loop(AcceptLoop {
                socket,
                listener,
                shared,
                connections: connections.clone(),
                stop: stop_accepting.subscribe(),
                bye: bye.subscribe(),
                ids: ids.clone(),
            }));
        }
        Ok(Server {
            addrs,
            policies,
            certs,
            metrics,
            audit,
            health,
            upstream_health,
            prober,
            warmers,
            state_tasks,
            metrics_endpoint,
            admin_endpoint,
            sessions,
            stop_accepting,
            bye,
            connections,
            max_connections,
            accept_loops,
            drain: limits.drain_timeout(),
        })
    }

    /// The bound address of each listener, by name (useful with port 0).
    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    /// Loads the policies of `config` and, if they all load, makes them the live set for every
    /// connection; otherwise the old set stays and the error says why.
    pub fn reload_policies(&self, config: &Config) -> Result<Vec<String>, PolicyError> {
        self.policies.reload(&config.policies, &config.lua)?;
        Ok(self.policies.current().names())
    }

    /// Reads every TLS listener's certificates and keys again from the files `config` names
    /// and, if all of them load, makes them the ones new handshakes use; otherwise the old
    /// ones stay and the error says which listener and file failed. Sessions already
    /// established keep the certificate they were shown. Returns the listeners reloaded.
    pub fn reload_certificates(&self, config: &Config) -> Result<Vec<String>, ServerError> {
        Ok(self.certs.reload(config)?)
    }

    /// The bound address of the metrics endpoint, when one is configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_endpoint.as_ref().map(|e| e.addr)
    }

    /// The bound address of the admin endpoint, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_endpoint.as_ref().map(|(e, _)| e.addr)
    }

    /// Re-reads the admin token (its file, typically) from `config`; on failure the current
    /// token stays. The endpoint's bind is read at start only.
    pub fn reload_admin_token(&self, config: &Config) -> Result<(), AdminError> {
        let (Some((endpoint, slot)), Some(admin)) = (&self.admin_endpoint, &config.admin) else {
            if self.admin_endpoint.is_some() != config.admin.is_some() {
                tracing::warn!("SIGHUP: [admin] added or removed: takes effect at restart");
            }
            return Ok(());
        };
        if admin.bind != endpoint.bind {
            tracing::warn!(bind = %admin.bind, "SIGHUP: [admin] bind changed: takes effect at restart");
        }
        slot.replace(admin::load_token(admin)?);
        Ok(())
    }

    /// Every live session.
    pub fn sessions(&self) -> &Registry {
        &self.sessions
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The probed state of the configured upstreams (the same the sessions and policies see).
    pub fn upstream_health(&self) -> &UpstreamHealth {
        &self.upstream_health
    }

    /// Reopens the audit log file (after logrotate moved it).
    pub fn reopen_audit(&self) {
        self.audit.reopen();
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.max_connections as usize - self.connections.available_permits()
    }

    /// Stops accepting, lets sessions finish for the drain timeout, then says BYE to the rest.
    pub async fn shutdown(mut self) {
        self.health.set_draining();
        let _ = self.stop_accepting.send(true);
        while self.accept_loops.join_next().await.is_some() {}
        tracing::info!(active = self.active(), drain = ?self.drain, "draining");
        let all = self.max_connections;
        let drained = timeout(self.drain, self.connections.acquire_many(all)).await;
        if drained.is_err() {
            tracing::info!(
                active = self.active(),
                "drain timeout: closing the remaining sessions"
            );
            let _ = self.bye.send(true);
            let _ = timeout(BYE_GRACE, self.connections.acquire_many(all)).await;
        }
        self.prober.stop();
        self.warmers.abort_all();
        self.state_tasks.abort_all();
        if let Err(e) = self.audit.flush().await {
            tracing::warn!(error = %e, "audit log not flushed");
        }
        if let Some(endpoint) = self.metrics_endpoint.take() {
            endpoint.stop();
        }
        if let Some((endpoint, _)) = self.admin_endpoint.take() {
            endpoint.stop();
        }
        tracing::info!("stopped");
    }
}

/// Whether imapgate reads logins itself and routes them, and what it offers before login:
/// the configured capabilities, or the first upstream's (its greeting, read now; a built-in
/// list when it cannot be reached), keeping only the SASL mechanisms imapgate can replay.
async fn routing_setup(
    config: &Config,
    policies: &Policies,
    upstreams: &[Target],
) -> Option<Arc<Routing>> {
    let routed = config.routing.is_some()
        || upstreams.len() > 1
        || policies.current().has_hook(crate::policy::Hook::Login);
    if !routed {
        return None;
    }
    let configured = config.routing.as_ref().and_then(|r| r.capabilities.clone());
    let mut capabilities = match configured {
        Some(caps) => caps,
        None => learned_capabilities(upstreams.first()).await,
    };
    capabilities.retain(|c| {
        let upper = c.to_ascii_uppercase();
        match upper.strip_prefix("AUTH=") {
            Some(mechanism) => crate::session::prelogin::MECHANISMS.contains(&mechanism),
            None => !matches!(upper.as_str(), "STARTTLS" | "LOGINDISABLED"),
        }
    });
    tracing::info!(?capabilities, "imapgate reads logins and routes them");
    Some(Arc::new(Routing { capabilities }))
}

async fn learned_capabilities(first: Option<&Target>) -> Vec<String> {
    let fallback = || {
        [
            "IMAP4rev1",
            "SASL-IR",
            "LITERAL+",
            "ID",
            "ENABLE",
            "IDLE",
            "AUTH=PLAIN",
            "AUTH=LOGIN",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let Some(target) = first else {
        return fallback();
    };
    match target.connect(None).await {
        Ok(up) => crate::imap::response::parse_response(bytes::Bytes::from(up.greeting))
            .ok()
            .and_then(|r| crate::imap::capability::CapabilitySet::from_response(&r))
            .map(|caps| caps.names().to_vec())
            .unwrap_or_else(fallback),
        Err(e) => {
            tracing::warn!(upstream = target.name(), error = %e, "cannot learn the upstream's capabilities: using a built-in list");
            fallback()
        }
    }
}

/// An operator endpoint (metrics and health, admin), on a thread and runtime of its own:
/// `/healthz` must answer, and an operator must be able to kick a session, while every worker
/// of the sessions' runtime is busy; a load balancer must see the drain.
struct EndpointThread {
    /// As configured (port 0 stays 0), to tell a changed bind at SIGHUP.
    bind: SocketAddr,
    /// As bound.
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl EndpointThread {
    async fn start<H>(
        name: &'static str,
        bind: SocketAddr,
        handler: H,
    ) -> Result<EndpointThread, ServerError>
    where
        H: Fn(&hyper::Request<hyper::body::Incoming>) -> Reply + Send + Sync + 'static,
    {
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServerError::Runtime)?;
        std::thread::Builder::new()
            .name(format!("imapgate-{name}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // Bound here: the socket belongs to this thread's runtime.
                    let listener = match http::bind(bind, name).await {
                        Ok(listener) => listener,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = bound_tx.send(Ok(listener.local_addr()));
                    tokio::select! {
                        () = listener.serve(handler) => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .map_err(ServerError::Runtime)?;
        let addr = bound_rx
            .await
            .map_err(|_| {
                ServerError::Runtime(std::io::Error::other(format!("{name} thread ended")))
            })?
            .map_err(|source| ServerError::Endpoint { name, bind, source })?;
        Ok(EndpointThread { bind, addr, stop })
    }

    fn stop(self) {
        let _ = self.stop.send(());
    }
}

struct AcceptLoop {
    socket: TcpListener,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    bye: watch::Receiver<bool>,
    ids: Arc<AtomicU64>,
}

async fn accept_loop(mut a: AcceptLoop) {
    loop {
        let accepted = tokio::select! {
            r = a.socket.accept() => r,
            _ = a.stop.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %a.listener.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = a.ids.fetch_add(1, Ordering::Relaxed);
        // Behind a load balancer the TCP peer is only `via`; `peer`, the client, is known once
        // its PROXY header is read (session::accept records it).
        let span = tracing::info_span!(
            "conn",
            id,
            peer = tracing::field::Empty,
            via = tracing::field::Empty,
            listener = %a.listener.name,
            user = tracing::field::Empty
        );
        let tcp_peer_field = if a.listener.proxy_from.is_some() {
            "via"
        } else {
            "peer"
        };
        span.record(tcp_peer_field, tracing::field::display(peer));
        let Ok(permit) = a.connections.clone().try_acquire_owned() else {
            tracing::warn!(parent: &span, "connection limit reached: refusing");
            a.shared
                .metrics
                .session_refused(SessionLimit::MaxConnections);
            tokio::spawn(refuse(tcp, peer, a.listener.clone()).instrument(span));
            continue;
        };
        let listener = a.listener.clone();
        let shared = a.shared.clone();
        let bye = a.bye.clone();
        tokio::spawn(
            async move {
                tracing::debug!("accepted");
                match session::serve(id, tcp, peer, listener, shared, bye).await {
                    Ok(()) => tracing::debug!("closed"),
                    Err(e @ SessionError::Upstream(_)) => {
                        tracing::warn!(error = %e, "session failed")
                    }
                    Err(
                        e @ (SessionError::ProxyUntrusted(_)
                        | SessionError::ProxyHeader(_)
                        | SessionError::ProxyTimeout),
                    ) => tracing::warn!(error = %e, "connection refused"),
                    Err(e) => tracing::info!(error = %e, "session ended"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// `* BYE` for a connection over the limit (after the PROXY header and the handshake on
/// listeners that have them, so that the client can read it).
async fn refuse(mut tcp: TcpStream, peer: SocketAddr, listener: Arc<Listener>) {
    use tokio::io::AsyncWriteExt;
    tune(&tcp);
    const BYE: &[u8] = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n";
    let limit = Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + limit;
    if let Err(refusal) = session::accept::real_ends(&mut tcp, peer, &listener, deadline).await {
        listener.metrics.proxy_protocol_refused(refusal.reason());
        return;
    }
    let _ = tokio::time::timeout_at(deadline, async {
        let mut stream = match (&listener.acceptor, listener.tls) {
            (Some(acceptor), ListenerTls::Implicit) => tls::accept(acceptor, tcp).await.ok()?,
            _ => Stream::Plain(tcp),
        };
        stream.write_all(BYE).await.ok()?;
        stream.shutdown().await.ok()
    })
    .await;
}

/// Installs the log subscriber the config asks for; `RUST_LOG` overrides the level.
pub fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level.0))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The shared-state client of `[state]`, and one PING so that the log says at start whether
/// Redis answers. Redis being down does not stop the start: the client reconnects, and state
/// calls fail as documented until it is back.
async fn start_state(cfg: &StateConfig, metrics: &Metrics) -> Result<State, ServerError> {
    let state = State::new(cfg, Some(metrics)).map_err(ServerError::State)?;
    // Each connection may take the connect timeout and the command timeout.
    let connections = u32::try_from(cfg.connections).unwrap_or(u32::MAX);
    let first = timeout(
        (cfg.connect_timeout() + cfg.timeout()) * connections,
        state.ping(),
    )
    .await;
    match first {
        Ok(Ok(())) => tracing::info!(
            redis = state.url(),
            prefix = state.prefix(),
            "shared state: Redis answers"
        ),
        Ok(Err(error)) => {
            tracing::warn!(redis = state.url(), %error, "shared state: Redis does not answer yet; state calls fail until it does")
        }
        Err(_) => tracing::warn!(
            redis = state.url(),
            "shared state: Redis does not answer yet; state calls fail until it does"
        ),
    }
    Ok(state)
}

/// Runs the proxy until SIGTERM or SIGINT, then drains and returns. SIGHUP reloads the
/// policies from `config_path`.
///
/// Signals are taken by a thread of their own, not by the runtime: a SIGTERM must end the
/// process within the drain timeout (plus the BYE grace and a margin) whatever the sessions
/// are doing, even if every worker is stuck in a long call into a policy.
pub fn run(
    config: Config,
    config_path: std::path::PathBuf,
    ready_file: Option<&std::path::Path>,
) -> Result<(), ServerError> {
    use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
    init_logging(&config);
    if let Some(path) = ready_file {
        // A file left by an earlier run must not pass for this one's.
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ServerError::ReadyFile {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(ServerError::Signals)?;
    let (signal_tx, mut signal_rx) = tokio::sync::mpsc::unbounded_channel();
    let deadline = config.limits.drain_timeout() + BYE_GRACE + EXIT_MARGIN;
    std::thread::Builder::new()
        .name("imapgate-signals".into())
        .spawn(move || {
            let mut stopping = false;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    let _ = signal_tx.send(signal);
                    continue;
                }
                if stopping {
                    tracing::warn!("second SIGTERM/SIGINT: exiting now");
                    std::process::exit(1);
                }
                stopping = true;
                let _ = signal_tx.send(signal);
                std::thread::spawn(move || {
                    std::thread::sleep(deadline);
                    tracing::error!(
                        ?deadline,
                        "sessions did not end within the drain timeout and grace: exiting anyway"
                    );
                    std::process::exit(0);
                });
            }
        })
        .map_err(ServerError::Runtime)?;
    let result = runtime.block_on(async {
        let server = Server::start(config).await?;
        if let Some(path) = ready_file {
            write_ready_file(&server, path)?;
        }
        while let Some(signal) = signal_rx.recv().await {
            match signal {
                SIGHUP => reload(&server, &config_path),
                SIGTERM => {
                    tracing::info!("SIGTERM: shutting down");
                    break;
                }
                _ => {
                    tracing::info!("SIGINT: shutting down");
                    break;
                }
            }
        }
        server.shutdown().await;
        Ok(())
    });
    // Workers stuck in a policy call are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

/// What `imapgate run --ready-file` writes once every listener and endpoint is bound: the
/// addresses as bound, so that a supervisor (or a test) can configure port 0 and learn the
/// ports the system chose.
#[derive(serde::Serialize)]
struct Ready<'a> {
    pid: u32,
    listeners: Vec<ReadyListener<'a>>,
    metrics: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

#[derive(serde::Serialize)]
struct ReadyListener<'a> {
    name: &'a str,
    addr: SocketAddr,
}

/// Writes the [`Ready`] JSON beside its final name and renames it into place, so that a reader
/// that sees the file sees all of it.
fn write_ready_file(server: &Server, path: &std::path::Path) -> Result<(), ServerError> {
    let ready = Ready {
        pid: std::process::id(),
        listeners: server
            .addrs()
            .iter()
            .map(|(name, addr)| ReadyListener { name, addr: *addr })
            .collect(),
        metrics: server.metrics_addr(),
        admin: server.admin_addr(),
    };
    let error = |source| ServerError::ReadyFile {
        path: path.to_path_buf(),
        source,
    };
    let mut text = serde_json::to_string(&ready).map_err(|e| error(e.into()))?;
    text.push('\n');
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, text).map_err(error)?;
    std::fs::rename(&partial, path).map_err(error)?;
    tracing::info!(path = %path.display(), "ready file written");
    Ok(())
}

/// SIGHUP: re-reads the config file and swaps in its policies and certificates; each kind
/// is kept as it is when its new version does not load.
fn reload(server: &Server, path: &std::path::Path) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the config does not load; keeping the current policies and certificates");
            return;
        }
    };
    server.reopen_audit();
    match server.reload_admin_token(&config) {
        Ok(()) => {}
        Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the current admin token"),
    }
    match server.reload_policies(&config) {
        Ok(names) => tracing::info!(policies = ?names, "SIGHUP: policies reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: a policy does not load; keeping the current policies")
        }
    }
    match server.reload_certificates(&config) {
        Ok(listeners) => tracing::info!(?listeners, "SIGHUP: certificates reloaded"),
        Err(e) => tracing::error!(
            error = %e,
            "SIGHUP: a certificate does not load; keeping the current certificates"
        ),
    }
}
