//! The I/O driver of one session: moves bytes between the sockets and the [`Conversation`].
//!
//! One task owns both legs. Reads and writes of both legs are polled together in one `select!`,
//! with bytes queued in outboxes, so neither leg can block the other: a proxy that writes one
//! leg while not reading the other deadlocks as soon as both peers write big messages at once
//! (a large APPEND meeting a large FETCH). Reading a leg pauses while the queue it feeds is full,
//! which bounds memory per session.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;

use super::outbox::Outbox;
use super::passthrough::{Passthrough, UpstreamInput};
use super::prelogin::Responder;
use super::registry::{Registry, SessionHandle};
use super::route;
use super::state::{Control, Conversation, Event, ImapState, Settings};
use super::waits::{HookDone, PendingHook};
use crate::audit::{Audit, LoginRecord, VerdictRecord};
use crate::config::{Limits, ListenerTls, Network};
use crate::imap::command::CommandKind;
use crate::imap::encode::{self, ResponseValue};
use crate::imap::response::Status;
use crate::metrics::{
    CommandResult, ConnectionGuard, Direction as MetricsDirection, ListenerMetrics, LoginResult,
    Metrics,
};
use crate::net::Stream;
use crate::net::health::UpstreamHealth;
use crate::net::legs::{self, LegReader, LegWriter};
use crate::net::proxy_protocol::HeaderError;
use crate::net::tls::{self, TlsError};
use crate::net::upstream::{ClientAddrs, Opened, Target, UpstreamError};
use crate::policy::{ConnInfo, Decision, Hook, Policies};
use std::borrow::Cow;

/// Bytes read from a socket at a time while data streams (reads fill the buffer).
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read at a time otherwise: most IMAP traffic is short lines, and an idle connection
/// holds one such buffer per leg for as long as it idles (4 KiB each was a quarter of an idle
/// TLS connection's memory). Reads that fill it grow it x4 at once, so a stream reaches
/// [`READ_CHUNK`] after four reads.
const READ_MIN: usize = 512;

/// How much the next read on one leg asks for: grows while reads fill the buffer, falls back
/// when they do not.
#[derive(Clone, Copy, Debug)]
struct ReadSize(usize);

impl Default for ReadSize {
    fn default() -> Self {
        ReadSize(READ_MIN)
    }
}

impl ReadSize {
    fn update(&mut self, n: usize) {
        self.0 = if n >= self.0 {
            (self.0 * 4).min(READ_CHUNK)
        } else if n < self.0 / 4 {
            READ_MIN
        } else {
            self.0
        };
    }
}
/// Chunks written per vectored write.
const WRITE_SLICES: usize = 32;
/// How long a closing session may spend flushing its last words to the client.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// A listener as the sessions it accepts see it.
pub struct Listener {
    pub name: String,
    pub tls: ListenerTls,
    pub acceptor: Option<TlsAcceptor>,
    pub metrics: ListenerMetrics,
    /// With `proxy_protocol = true`: the sources allowed to connect, each of which must send
    /// a PROXY header first. `None`: the TCP peer is the client.
    pub proxy_from: Option<Vec<Network>>,
}

/// What every session shares.
pub struct Shared {
    pub policies: Policies,
    pub metrics: Metrics,
    pub audit: Audit,
    /// The configured upstreams; the first is the default route (the only one when
    /// imapgate does not own the login).
    pub upstreams: Arc<[Target]>,
    /// Present when imapgate reads logins itself and routes them.
    pub routing: Option<Arc<Routing>>,
    /// Whether each of `upstreams` (same order) answers; a failed connect may mark one down
    /// at once ([`UpstreamHealth::connect_failed`]).
    pub health: UpstreamHealth,
    pub settings: Settings,
    pub limits: Limits,
    /// Every live session: the admin endpoint's view, the per-user and per-address limits.
    pub sessions: Registry,
}

/// How imapgate stands in for the upstream before login, when it routes logins.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Offered before login (the conversation filters them as an upstream's).
    pub capabilities: Vec<String>,
}

/// The upstream leg of a session: a connected server, or, before a routed login, imapgate's
/// stand-in for one.
enum Leg {
    Socket(Stream),
    Standin(Box<Responder>),
}

/// Why a session ended early; the variant says which side failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client TLS: {0}")]
    ClientTls(#[source] TlsError),
    #[error("client: TLS handshake timed out")]
    ClientTlsTimeout,
    #[error("PROXY protocol: {0} is outside the listener's proxy_from: connection refused")]
    ProxyUntrusted(SocketAddr),
    #[error("PROXY protocol: {0}")]
    ProxyHeader(#[source] HeaderError),
    #[error("PROXY protocol: no complete header within the pre-login timeout")]
    ProxyTimeout,
    #[error("{0}")]
    Upstream(#[source] UpstreamError),
    #[error("client I/O: {0}")]
    Client(#[source] io::Error),
    #[error("upstream I/O: {0}")]
    UpstreamIo(#[source] io::Error),
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// Serves one accepted client connection to its end.
pub async fn serve(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    // The setup is boxed, and its locals with it: an async fn keeps room for every local
    // alive across an await, moved-from ones included, for as long as the session lives.
    let Some((driver, client, leg)) =
        Box::pin(set_up(id, tcp, peer, listener, shared, shutdown)).await?
    else {
        return Ok(());
    };
    driver.run(client, leg).await
}

/// Everything before the relay: the accept pipeline, the session's registration, and the
/// upstream connection (or the stand-in, when imapgate routes logins). `None`: refused, and
/// already told so.
async fn set_up(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<Option<(Box<Driver>, Stream, Leg)>, SessionError> {
    let open = listener.metrics.connection_opened();
    let started = Instant::now();
    // The setup phases are boxed: their state (a TLS handshake, an upstream connect) is freed
    // when they end, instead of staying part of every session's task for its whole life.
    let accepted = Box::pin(super::accept::accept(tcp, peer, &listener, &shared)).await?;
    let (mut client, peer) = (accepted.stream, accepted.peer);
    let session = match shared.sessions.register(id, peer, &listener.name) {
        Ok(session) => session,
        Err(refused) => {
            tracing::info!(%peer, "{refused}: refusing");
            shared.metrics.session_refused(refused.limit());
            close_with_bye(&mut client, refused.bye_text()).await;
            return Ok(None);
        }
    };
    let addrs = ClientAddrs {
        source: peer,
        destination: accepted.local,
    };
    let info = ConnInfo {
        id,
        peer: peer.to_string(),
        listener: listener.name.clone(),
        tls: client.is_tls(),
        sni: client.sni().map(str::to_owned),
        ..ConnInfo::default()
    };
    let (greeting, leg) = match &shared.routing {
        Some(routing) => {
            let standin = Responder::new(routing.capabilities.clone(), shared.limits.line);
            (standin.greeting(), Leg::Standin(Box::new(standin)))
        }
        None => {
            let Some(target) = shared.upstreams.first() else {
                return Err(SessionError::Internal("no upstream configured"));
            };
            match Box::pin(target.open(Some(addrs), true)).await {
                Ok(Opened { up, .. }) => {
                    session.set_upstream(&target.config.name);
                    (Bytes::from(up.greeting), Leg::Socket(up.stream))
                }
                Err(e) => {
                    shared.metrics.upstream_connect_failed();
                    shared.health.connect_failed(0, &e);
                    let bye = bye_line("The mail server is unavailable, try again later");
                    let _ = timeout(CLOSE_FLUSH, async {
                        client.write_all(&bye).await?;
                        client.shutdown().await
                    })
                    .await;
                    return Err(SessionError::Upstream(e));
                }
            }
        }
    };
    tracing::debug!(%peer, tls = client.is_tls(), routed = shared.routing.is_some(), "session starts");
    let conv = Conversation::new(
        shared.settings.clone(),
        client.is_tls(),
        greeting,
        shared.policies.clone(),
        info,
    );
    let driver = Driver {
        _open: open,
        id,
        peer: peer.to_string(),
        addrs,
        conv,
        listener,
        shared,
        shutdown,
        started,
        last_client_activity: Instant::now(),
        logged_user: None,
        upstream_name: None,
        session,
    };
    // Boxed: an async fn's state holds its `self` argument twice (as passed and as moved into
    // the body), 1.5 KiB each for every session for its whole life.
    Ok(Some((Box::new(driver), client, leg)))
}

/// Says `* BYE [UNAVAILABLE] text` to a client before any conversation, and closes.
async fn close_with_bye(client: &mut Stream, text: &str) {
    let bye = bye_line(text);
    let _ = timeout(CLOSE_FLUSH, async {
        client.write_all(&bye).await?;
        client.shutdown().await
    })
    .await;
}

/// The `* BYE` line of imapgate's own, encoded from values.
fn bye_line(text: &str) -> Vec<u8> {
    let value = ResponseValue::Status {
        tag: None,
        status: Status::Bye,
        code: Some((b"UNAVAILABLE".to_vec(), Vec::new())),
        text: text.as_bytes().to_vec(),
    };
    encode::response(&value)
        .map(|e| e.bytes)
        .unwrap_or_else(|_| b"* BYE\r\n".to_vec())
}

struct Driver {
    /// Counts the connection as active while the session lives.
    _open: ConnectionGuard,
    id: u64,
    peer: String,
    addrs: ClientAddrs,
    conv: Conversation,
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    started: Instant,
    last_client_activity: Instant,
    logged_user: Option<String>,
    /// The upstream a routed login went to.
    upstream_name: Option<String>,
    /// Unregisters the session when the driver is dropped.
    session: SessionHandle,
}

/// What one round of the select loop produced.
enum Io {
    ClientRead(io::Result<usize>),
    UpstreamRead(io::Result<usize>),
    ClientWrote(io::Result<usize>),
    UpstreamWrote(io::Result<usize>),
    ClientFlushed(io::Result<()>),
    UpstreamFlushed(io::Result<()>),
    /// Octets of a response literal moved from the upstream's socket into the pipe.
    UpstreamSpliced(io::Result<usize>),
    /// Octets moved from the pipe into the client's socket.
    ClientSpliced(io::Result<usize>),
    Timeout,
    Shutdown,
    HoldDue,
    Kicked,
    /// A policy hook that waited for shared state finished.
    HookDone(HookDone),
}

impl Driver {
    async fn run(mut self: Box<Self>, client: Stream, leg: Leg) -> Result<(), SessionError> {
        let mut mid_message = Arc::new(AtomicBool::new(true));
        let (mut cr, mut cw) = legs::split(client, Some(mid_message.clone()));
        let (mut ur, mut uw, mut standin) = match leg {
            Leg::Socket(stream) => {
                let (r, w) = legs::split(stream, None);
                (Some(r), Some(w), None)
            }
            Leg::Standin(responder) => (None, None, Some(responder)),
        };
        let mut client_read = ReadSize::default();
        let mut upstream_read = ReadSize::default();
        let mut client_open = true;
        let mut upstream_open = true;
        let mut client_needs_flush = false;
        let mut upstream_needs_flush = false;
        let mut shutdown_seen = *self.shutdown.borrow();
        let mut kicked = false;
        let mut hook: Option<PendingHook> = None;
        let mut passthrough = Passthrough::default();
        // Registered once, not on every round of the loop: activity only moves the deadline
        // later, so the timer is checked (and moved) when it fires.
        let idle = tokio::time::sleep_until(self.deadline());
        tokio::pin!(idle);
        let mut interrupts = Box::pin(interrupt(
            (!shutdown_seen).then(|| self.shutdown.clone()),
            Some(self.session.kick_signal()),
        ));
        if shutdown_seen {
            self.conv.bye("Server shutting down");
        }
        loop {
            if let Some(responder) = standin.as_mut()
                // Boxed: the login's state (an upstream connect, a TLS handshake) is freed once
                // it is done instead of sizing every session's task for its whole life.
                && let Some(stream) = Box::pin(self.stand_in(responder)).await
            {
                let (r, w) = legs::split(stream, None);
                (ur, uw, standin) = (Some(r), Some(w), None);
            }
            self.report_events();
            // The cluster-wide per-user limit (with [state]): a Redis round trip after the
            // login was counted in process by report_events.
            if let Err(refused) = self.session.confirm_login().await {
                tracing::info!("{refused} across the cluster: closing");
                self.shared.metrics.session_refused(refused.limit());
                self.conv.bye_unavailable(refused.bye_text());
            }
            while let Some(control) = self.conv.take_control() {
                match control {
                    Control::StartTls => {
                        flush_client(&mut cw, &mut self.conv.to_client, &mut passthrough)
                            .await
                            .map_err(SessionError::Client)?;
                        let stream = legs::unsplit(cr, cw).map_err(SessionError::Client)?;
                        let stream = Box::pin(self.start_tls(stream)).await?;
                        self.conv.client_sni(stream.sni());
                        mid_message = Arc::new(AtomicBool::new(true));
                        (cr, cw) = legs::split(stream, Some(mid_message.clone()));
                        self.conv.client_tls_established();
                    }
                    Control::ShutdownUpstreamWrite => {
                        client_open = false;
                        let Some(uw) = uw.as_mut() else {
                            // Gone before logging in: nothing upstream to tell.
                            self.finish();
                            return Ok(());
                        };
                        flush_all(uw, &mut self.conv.to_upstream)
                            .await
                            .map_err(SessionError::UpstreamIo)?;
                        let _ = uw.shutdown().await;
                    }
                    Control::Close { flush } => {
                        if flush {
                            let _ = timeout(
                                CLOSE_FLUSH,
                                flush_client(&mut cw, &mut self.conv.to_client, &mut passthrough),
                            )
                            .await;
                        }
                        let _ = timeout(CLOSE_FLUSH, cw.shutdown()).await;
                        if let Some(uw) = uw.as_mut() {
                            let _ = timeout(CLOSE_FLUSH, uw.shutdown()).await;
                        }
                        self.finish();
                        return Ok(());
                    }
                }
            }
            if !client_open && !upstream_open {
                self.finish();
                return Ok(());
            }
            mid_message.store(self.conv.client_mid_message(), Ordering::Relaxed);
            let hold = self.conv.hold_deadline().map(Instant::from_std);
            if hook.is_none() {
                hook = self.conv.take_hook();
            }
            let want_client = client_open && self.conv.wants_client_input();
            let want_upstream = upstream_open && ur.is_some() && self.conv.wants_upstream_input();
            let both_plain = cw.tcp().is_some() && ur.as_ref().is_some_and(|r| r.tcp().is_some());
            let upstream_input =
                passthrough.next_input(self.conv.upstream_passthrough(), both_plain);
            let held = passthrough.held();
            let io = {
                let conv = &mut self.conv;
                let parts = conv_parts(conv);
                let client_pending = !parts.to_client.is_empty();
                let upstream_pending = uw.is_some() && !parts.to_upstream.is_empty();
                tokio::select! {
                    r = read_into(&mut cr, parts.client_buf, client_read.0), if want_client => Io::ClientRead(r),
                    r = upstream_in(&mut ur, parts.upstream_buf, upstream_read.0, &passthrough, upstream_input),
                        if want_upstream && upstream_input != UpstreamInput::Wait => r,
                    r = client_out(&mut cw, parts.to_client, &passthrough), if held > 0 || client_pending || client_needs_flush => match r {
                        Written::Wrote(r) => Io::ClientWrote(r),
                        Written::Flushed(r) => Io::ClientFlushed(r),
                        Written::Spliced(r) => Io::ClientSpliced(r),
                    },
                    r = write_leg(&mut uw, parts.to_upstream), if upstream_pending || upstream_needs_flush => match r {
                        Written::Wrote(r) | Written::Spliced(r) => Io::UpstreamWrote(r),
                        Written::Flushed(r) => Io::UpstreamFlushed(r),
                    },
                    () = &mut idle => Io::Timeout,
                    () = hold_due(hold), if hold.is_some() => Io::HoldDue,
                    io = &mut interrupts, if !(shutdown_seen && kicked) => io,
                    done = hook_outcome(&mut hook), if hook.is_some() => Io::HookDone(done),
                }
            };
            match io {
                Io::ClientRead(Ok(0)) | Io::ClientRead(Err(_)) => {
                    client_open = false;
                    self.conv.client_eof();
                }
                Io::ClientRead(Ok(n)) => {
                    client_read.update(n);
                    self.session.count_in(n);
                    self.shared
                        .metrics
                        .bytes(MetricsDirection::ClientToUpstream, n as u64);
                    self.last_client_activity = Instant::now();
                    self.conv.client_input();
                }
                Io::UpstreamSpliced(Ok(n)) if n > 0 => {
                    passthrough.filled(n);
                    // n <= the literal's remaining length, a u32.
                    self.conv
                        .upstream_passed(u32::try_from(n).unwrap_or(u32::MAX));
                    self.session.count_out(n);
                    self.shared
                        .metrics
                        .bytes(MetricsDirection::UpstreamToClient, n as u64);
                    self.shared.metrics.spliced(n as u64);
                }
                Io::ClientSpliced(Ok(n)) => passthrough.drained(n),
                Io::UpstreamRead(Ok(0))
                | Io::UpstreamRead(Err(_))
                | Io::UpstreamSpliced(Ok(_))
                | Io::UpstreamSpliced(Err(_)) => {
                    upstream_open = false;
                    self.conv.upstream_eof();
                }
                Io::UpstreamRead(Ok(n)) => {
                    upstream_read.update(n);
                    self.session.count_out(n);
                    self.shared
                        .metrics
                        .bytes(MetricsDirection::UpstreamToClient, n as u64);
                    self.conv.upstream_input();
                }
                Io::ClientWrote(Ok(n)) => {
                    self.conv.to_client.consume(n);
                    client_needs_flush = true;
                    // A full queue paused the upstream's input: frame what is buffered.
                    self.conv.upstream_input();
                }
                Io::UpstreamWrote(Ok(n)) => {
                    self.conv.to_upstream.consume(n);
                    upstream_needs_flush = true;
                    self.conv.client_input();
                }
                Io::ClientFlushed(Ok(())) => client_needs_flush = false,
                Io::UpstreamFlushed(Ok(())) => upstream_needs_flush = false,
                Io::ClientWrote(Err(e)) | Io::ClientFlushed(Err(e)) | Io::ClientSpliced(Err(e)) => {
                    tracing::debug!(error = %e, "client write failed");
                    self.finish();
                    return Ok(());
                }
                Io::UpstreamWrote(Err(e)) | Io::UpstreamFlushed(Err(e)) => {
                    tracing::warn!(error = %e, "upstream write failed");
                    upstream_open = false;
                    self.conv.upstream_eof();
                }
                Io::Timeout if Instant::now() < self.deadline() => {
                    // Activity since the timer was set: it waits for the new deadline.
                    idle.as_mut().reset(self.deadline());
                }
                Io::Timeout => {
                    // Fired once: no other timeout follows the BYE.
                    idle.as_mut().reset(far_future());
                    let text = if self.conv.state() == ImapState::NotAuthenticated {
                        "Login timeout"
                    } else {
                        "Autologout; idle for too long"
                    };
                    tracing::info!(reason = text, "closing idle session");
                    self.conv.bye(text);
                }
                Io::HoldDue => {
                    self.conv.release_held();
                    self.conv.client_input();
                }
                Io::Shutdown => {
                    shutdown_seen = true;
                    self.conv.bye("Server shutting down");
                    interrupts = Box::pin(interrupt(
                        None,
                        (!kicked).then(|| self.session.kick_signal()),
                    ));
                }
                Io::HookDone(done) => {
                    hook = None;
                    self.conv.hook_done(done);
                }
                Io::Kicked => {
                    kicked = true;
                    interrupts = Box::pin(interrupt(
                        (!shutdown_seen).then(|| self.shutdown.clone()),
                        None,
                    ));
                    tracing::info!("disconnected by an administrator");
                    self.conv
                        .bye_unavailable("Disconnected by an administrator");
                }
            }
        }
    }

    /// Before a routed login: what the conversation sent "upstream" goes to the stand-in,
    /// its answers come back, and credentials are routed and replayed. Gives the upstream
    /// connection once a login succeeded.
    async fn stand_in(&mut self, responder: &mut Responder) -> Option<Stream> {
        loop {
            let sent = self.conv.to_upstream.drain_to_vec();
            if sent.is_empty() {
                return None;
            }
            responder.input(&sent);
            self.answer_from_standin(responder.take_output());
            if responder.logged_out() {
                self.conv.upstream_eof();
                return None;
            }
            let Some(creds) = responder.take_credentials() else {
                continue;
            };
            self.report_events();
            let id_fields = responder.id_fields().to_vec();
            let outcome = route::login(
                &self.shared,
                &mut self.conv,
                self.addrs,
                self.id,
                creds,
                &id_fields,
            )
            .await;
            match outcome {
                route::Outcome::LoggedIn {
                    stream,
                    upstream,
                    answer,
                } => {
                    tracing::Span::current().record("upstream", upstream.as_str());
                    self.session.set_upstream(&upstream);
                    self.upstream_name = Some(upstream);
                    self.answer_from_standin(answer);
                    return Some(stream);
                }
                route::Outcome::Answered(answer) => self.answer_from_standin(answer),
                route::Outcome::Close(text) => {
                    self.conv.bye(&text);
                    return None;
                }
            }
        }
    }

    fn answer_from_standin(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.conv.upstream_buffer().extend_from_slice(&bytes);
            self.conv.upstream_input();
        }
    }

    fn deadline(&self) -> Instant {
        let idle = self.last_client_activity + self.shared.limits.idle_timeout();
        if self.conv.state() == ImapState::NotAuthenticated {
            idle.min(self.started + self.shared.limits.preauth_timeout())
        } else {
            idle
        }
    }

    async fn start_tls(&self, stream: Stream) -> Result<Stream, SessionError> {
        let Some(acceptor) = &self.listener.acceptor else {
            return Err(SessionError::Internal("STARTTLS without a TLS acceptor"));
        };
        let tcp = stream
            .into_plain()
            .map_err(|_| SessionError::Internal("STARTTLS on a TLS stream"))?;
        match timeout(
            self.shared.limits.preauth_timeout(),
            tls::accept(acceptor, tcp),
        )
        .await
        {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                self.listener.metrics.tls_handshake_failed();
                Err(SessionError::ClientTls(e))
            }
            Err(_) => {
                self.listener.metrics.tls_handshake_failed();
                Err(SessionError::ClientTlsTimeout)
            }
        }
    }

    /// Logs what the conversation reports; never a password or SASL payload, which it never
    /// reports.
    fn report_events(&mut self) {
        // Taken, not drained: an idle session keeps no events vector (a kilobyte each).
        let events: Vec<Event> = std::mem::take(&mut self.conv.events);
        for event in events {
            match event {
                Event::Login { ok, user } => {
                    if ok {
                        tracing::info!(user = user.as_deref().unwrap_or("?"), "login succeeded");
                        // The upstream has accepted the login by now; the limit ends the
                        // session rather than the login.
                        if let Some(u) = &user
                            && let Err(refused) = self.session.logged_in(u)
                        {
                            tracing::info!(user = u.as_str(), "{refused}: closing");
                            self.shared.metrics.session_refused(refused.limit());
                            self.conv.bye_unavailable(refused.bye_text());
                        }
                    } else {
                        tracing::info!(user = user.as_deref().unwrap_or("?"), "login failed");
                    }
                    let result = if ok {
                        LoginResult::Ok
                    } else {
                        LoginResult::Failed
                    };
                    self.login(result, user);
                }
                Event::ParseError { direction, error } => {
                    self.shared.metrics.parse_error(direction.into());
                    tracing::debug!(?direction, %error, "message did not parse");
                }
                Event::Violation { direction, what } => {
                    tracing::warn!(?direction, %what, "protocol violation");
                }
                Event::Completed {
                    name,
                    status,
                    elapsed,
                } => {
                    self.shared.metrics.command_completed(
                        name.label(),
                        CommandResult::from(status),
                        Some(elapsed),
                    );
                    tracing::trace!(
                        command = name.label(),
                        status = status.as_str(),
                        ?elapsed,
                        "command completed"
                    );
                }
                Event::Rejected { name, user } => {
                    self.shared.metrics.command_completed(
                        name.label(),
                        CommandResult::Rejected,
                        None,
                    );
                    if matches!(name.kind, CommandKind::Login | CommandKind::Authenticate) {
                        self.login(LoginResult::Refused, user);
                    }
                    tracing::debug!(command = name.label(), "command answered by imapgate");
                }
                Event::Invalid { name } => {
                    self.shared.metrics.command_completed(
                        name.label(),
                        CommandResult::Rejected,
                        None,
                    );
                    tracing::debug!(command = name.label(), "command not valid in this state");
                }
                Event::Hidden => self.shared.metrics.response_hidden(),
                Event::Desync { what } => {
                    self.shared.metrics.desync();
                    tracing::warn!(
                        what,
                        "the mail server answered what imapgate never sent; session closed"
                    );
                }
                Event::Policy(d) => self.policy_decision(d),
            }
        }
        let user = self.conv.user().map(str::to_owned);
        if user != self.logged_user {
            if let Some(u) = &user {
                tracing::Span::current().record("user", u.as_str());
            }
            self.logged_user = user;
        }
    }

    fn login(&self, result: LoginResult, user: Option<String>) {
        self.shared.metrics.login(result);
        self.shared.audit.login(LoginRecord {
            result,
            user,
            peer: self.peer.clone(),
            listener: Cow::Owned(self.listener.name.clone()),
            tls: self.conv.is_tls(),
            connection_id: self.id,
        });
    }

    fn policy_decision(&self, d: Decision) {
        let metrics = &self.shared.metrics;
        let hook = d.hook.as_str();
        metrics.policy_decision(&d.policy, hook, d.action);
        metrics.policy_duration(&d.policy, hook, d.elapsed);
        if d.action == "error" {
            metrics.policy_error(&d.policy, hook);
        }
        // Passes are not decisions worth a record; a response a policy hid is counted
        // (imapgate_responses_hidden_total), not audited: a LIST can hide hundreds.
        if d.action == "pass" || (d.hook == Hook::Response && d.action == "drop") {
            return;
        }
        tracing::info!(policy = %d.policy, hook, action = d.action, code = d.code.as_deref().unwrap_or(""), "policy verdict");
        self.shared.audit.verdict(VerdictRecord {
            policy: Cow::Owned(d.policy.to_string()),
            hook: Cow::Borrowed(hook),
            command: d.command.map(Cow::Borrowed),
            action: Cow::Borrowed(d.action),
            code: d.code.map(Cow::Owned),
            user: self.conv.user().map(str::to_owned),
            peer: self.peer.clone(),
            connection_id: self.id,
        });
    }

    fn finish(&mut self) {
        self.conv.disconnect();
        self.report_events();
        let abandoned = self.conv.abandon_pending();
        for pending in &abandoned {
            self.shared.metrics.command_completed(
                pending.name.label(),
                CommandResult::Aborted,
                None,
            );
        }
        if !abandoned.is_empty() {
            tracing::debug!(count = abandoned.len(), "commands abandoned at disconnect");
        }
    }
}

/// Disjoint borrows of what the select loop touches.
struct Parts<'a> {
    client_buf: &'a mut bytes::BytesMut,
    upstream_buf: &'a mut bytes::BytesMut,
    to_client: &'a Outbox,
    to_upstream: &'a Outbox,
}

fn conv_parts(conv: &mut Conversation) -> Parts<'_> {
    let (client_buf, upstream_buf, to_client, to_upstream) = conv.io_parts();
    Parts {
        client_buf,
        upstream_buf,
        to_client,
        to_upstream,
    }
}

/// The next of the session's interrupts still to come (`None`: already seen): the server
/// shutting down, an operator's kick. Never ready without any.
async fn interrupt(
    shutdown: Option<watch::Receiver<bool>>,
    kick: Option<watch::Receiver<bool>>,
) -> Io {
    // An error of either: its sender is gone (the server stopped without saying so, the
    // registry dropped the slot), so it will never come.
    let shutting_down = async {
        if let Some(mut rx) = shutdown
            && rx.wait_for(|stop| *stop).await.is_ok()
        {
            return;
        }
        std::future::pending().await
    };
    let kicked = async {
        if let Some(mut rx) = kick
            && rx.wait_for(|kicked| *kicked).await.is_ok()
        {
            return;
        }
        std::future::pending().await
    };
    tokio::select! {
        () = shutting_down => Io::Shutdown,
        () = kicked => Io::Kicked,
    }
}

/// When a delayed command is due (only polled while one is held).
async fn hold_due(hold: Option<Instant>) {
    match hold {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A deadline that never comes, for a timer with nothing left to time.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// The outcome of the policy hook that waits (never ready without one).
async fn hook_outcome(hook: &mut Option<PendingHook>) -> HookDone {
    match hook {
        Some(hook) => hook.await,
        None => std::future::pending().await,
    }
}

async fn read_into(r: &mut LegReader, buf: &mut bytes::BytesMut, size: usize) -> io::Result<usize> {
    if buf.is_empty() {
        // Everything read so far was framed and handed on: drop a big allocation rather than
        // keep it (frames still queued keep their part of it alive until written).
        if buf.capacity() > size {
            *buf = bytes::BytesMut::new();
        }
        // A plain socket is waited for before the buffer is reserved: an idle session then
        // holds no read buffer at all on that leg.
        if let Some(tcp) = r.tcp() {
            // Polled, not `readable()`, whose future would be the largest part of the session.
            std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
        }
    }
    buf.reserve(size);
    r.read_buf(buf).await
}

/// Reads the upstream leg, or passes its streamed literal into the pipe; never ready while
/// there is no upstream (before a routed login).
async fn upstream_in(
    r: &mut Option<LegReader>,
    buf: &mut bytes::BytesMut,
    size: usize,
    passthrough: &Passthrough,
    input: UpstreamInput,
) -> Io {
    let Some(r) = r else {
        return std::future::pending().await;
    };
    match (input, r.tcp()) {
        (UpstreamInput::Splice(max), Some(tcp)) => {
            Io::UpstreamSpliced(passthrough.fill(tcp, max).await)
        }
        _ => Io::UpstreamRead(read_into(r, buf, size).await),
    }
}

/// Writes to the client leg: first what the pipe holds, then the queue.
async fn client_out(w: &mut LegWriter, outbox: &Outbox, passthrough: &Passthrough) -> Written {
    if passthrough.held() > 0 {
        return Written::Spliced(drain_pipe(w, passthrough).await);
    }
    write_or_flush(w, outbox).await
}

/// Writes to the upstream leg; never ready while there is none.
async fn write_leg(w: &mut Option<LegWriter>, outbox: &Outbox) -> Written {
    match w {
        Some(w) => write_or_flush(w, outbox).await,
        None => std::future::pending().await,
    }
}

async fn write_some(w: &mut LegWriter, outbox: &Outbox) -> io::Result<usize> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(WRITE_SLICES);
    outbox.chunks(&mut slices, WRITE_SLICES);
    let n = w.write_vectored(&slices).await?;
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(n)
}

enum Written {
    Wrote(io::Result<usize>),
    Flushed(io::Result<()>),
    Spliced(io::Result<usize>),
}

/// Writes queued bytes, or flushes (TLS keeps a partial record buffered) once the queue is empty.
async fn write_or_flush(w: &mut LegWriter, outbox: &Outbox) -> Written {
    if outbox.is_empty() {
        Written::Flushed(w.flush().await)
    } else {
        Written::Wrote(write_some(w, outbox).await)
    }
}

/// Moves what the pipe holds into the client's socket (some of it).
async fn drain_pipe(w: &LegWriter, passthrough: &Passthrough) -> io::Result<usize> {
    match w.tcp() {
        Some(tcp) => passthrough.drain(tcp).await,
        None => Err(io::Error::other("a pipe to a TLS leg")),
    }
}

/// Writes everything to the client: what the pipe holds first, then the queue.
async fn flush_client(
    w: &mut LegWriter,
    outbox: &mut Outbox,
    passthrough: &mut Passthrough,
) -> io::Result<()> {
    while passthrough.held() > 0 {
        let n = drain_pipe(w, passthrough).await?;
        passthrough.drained(n);
    }
    flush_all(w, outbox).await
}

/// Writes everything queued.
async fn flush_all(w: &mut LegWriter, outbox: &mut Outbox) -> io::Result<()> {
    while !outbox.is_empty() {
        let n = write_some(w, outbox).await?;
        outbox.consume(n);
    }
    w.flush().await
}
