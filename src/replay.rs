//! `imapgate replay`: runs the configured policies over a recorded session, without any server,
//! and prints what each message became.
//!
//! The transcript format: one line per line on the wire, prefixed `C: ` (client) or `S: `
//! (server); the CRLF is implied. A literal's octets are the lines that follow its announcement,
//! with their CRLFs counted, as in the RFC examples. Lines starting with `#` and blank lines are
//! ignored. If the first message is not from the server, a greeting is made up. The session
//! runs through the same conversation code as the proxy, so what is printed is what the proxy
//! would do.

use std::io::Write;

use bytes::Bytes;

use crate::config::{Config, ListenerTls};
use crate::imap::command::{CommandKind, parse_command};
use crate::net::health::UpstreamHealth;
use crate::policy::api::HostShared;
use crate::policy::{ConnInfo, Judgement, LoginView, Policies, PolicyError, Verdict};
use crate::session::state::{Control, Conversation, Event, Settings};

const DEFAULT_GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE NAMESPACE AUTH=PLAIN] replay\r\n";

/// How the replayed connection looks to the policies.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub tls: bool,
    pub listener: String,
    pub peer: String,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            tls: false,
            listener: "replay".into(),
            peer: "127.0.0.1:1".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("transcript line {line}: expected \"C: \" or \"S: \"")]
    Syntax { line: usize },
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
    #[error("[state]: {0}")]
    State(String),
}

enum Side {
    Client,
    Server,
}

fn parse(transcript: &str) -> Result<Vec<(Side, String)>, ReplayError> {
    let mut lines = Vec::new();
    for (i, line) in transcript.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (side, rest) = if let Some(rest) = line.strip_prefix("C:") {
            (Side::Client, rest)
        } else if let Some(rest) = line.strip_prefix("S:") {
            (Side::Server, rest)
        } else {
            return Err(ReplayError::Syntax { line: i + 1 });
        };
        lines.push((side, rest.strip_prefix(' ').unwrap_or(rest).to_string()));
    }
    Ok(lines)
}

/// Replays `transcript` through the policies of `config`, writing a report to `out`.
pub fn replay(
    config: &Config,
    transcript: &str,
    opts: &ReplayOptions,
    out: &mut impl Write,
) -> Result<(), ReplayError> {
    // With [state], the policies ask the configured Redis, as the proxy would (what they
    // write there is real: a replayed SEARCH takes a token of a shared bucket). Hooks that
    // wait for it are driven on a runtime of the replay's own.
    let runtime = match &config.state {
        Some(_) => Some(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ReplayError::State(format!("cannot start a runtime: {e}")))?,
        ),
        None => None,
    };
    let _entered = runtime.as_ref().map(|r| r.enter());
    let state = match &config.state {
        Some(cfg) => Some(
            crate::state::State::new(cfg, None).map_err(|e| ReplayError::State(e.to_string()))?,
        ),
        None => None,
    };
    // No server is probed: every configured upstream counts as up.
    let host = HostShared {
        health: Some(UpstreamHealth::unprobed(
            config.upstreams.iter().map(|u| &u.name),
        )),
        state,
        ..HostShared::default()
    };
    let policies = Policies::load_with_host(&config.policies, &config.lua, host)?;
    let mut lines = parse(transcript)?.into_iter().peekable();
    let greeting = match lines.peek() {
        Some((Side::Server, g)) => {
            let g = format!("{g}\r\n");
            lines.next();
            g
        }
        _ => DEFAULT_GREETING.to_string(),
    };
    let settings = Settings {
        listener_tls: if opts.tls {
            ListenerTls::Implicit
        } else {
            ListenerTls::Starttls
        },
        preauth_line: config.limits.preauth_line,
        line: config.limits.line,
        literal: u32::try_from(config.limits.literal).unwrap_or(u32::MAX),
        ..Settings::default()
    };
    let info = ConnInfo {
        id: 1,
        peer: opts.peer.clone(),
        listener: opts.listener.clone(),
        tls: opts.tls,
        ..ConnInfo::default()
    };
    writeln!(out, "S: {}", greeting.trim_end())?;
    let mut conv = Conversation::new(
        settings,
        opts.tls,
        Bytes::from(greeting.clone()),
        policies,
        info,
    );
    report(&mut conv, out, None, Some(&greeting))?;
    // Where imapgate would route the logins (routing as the proxy decides it).
    let routed = config.routing.is_some() || config.upstreams.len() > 1 || conv.has_login_hook();
    for (side, line) in lines {
        let wire = format!("{line}\r\n");
        match side {
            Side::Client => {
                writeln!(out, "C: {line}")?;
                conv.client_buffer().extend_from_slice(wire.as_bytes());
                conv.client_input();
                settle_hooks(&mut conv, runtime.as_ref());
                let login = routed
                    .then(|| login_of(&conv.to_upstream.peek_vec()))
                    .flatten();
                report(&mut conv, out, Some(&wire), None)?;
                if let Some(login) = login {
                    let verdict = match conv.judge_login_waiting(&login) {
                        Judgement::Ready(verdict, _) => verdict,
                        Judgement::Waiting(waiting) => match runtime.as_ref() {
                            Some(rt) => {
                                let done = rt.block_on(waiting);
                                conv.hook_decisions(done.decisions);
                                done.verdict
                            }
                            None => Verdict::Close {
                                text: "a hook waits without [state]".into(),
                            },
                        },
                    };
                    report(&mut conv, out, None, None)?;
                    writeln!(out, "   routed: {}", describe(&verdict))?;
                }
            }
            Side::Server => {
                writeln!(out, "S: {line}")?;
                conv.upstream_buffer().extend_from_slice(wire.as_bytes());
                conv.upstream_input();
                settle_hooks(&mut conv, runtime.as_ref());
                report(&mut conv, out, None, Some(&wire))?;
            }
        }
        if let Some(Control::Close { .. }) = handle_controls(&mut conv, out)? {
            writeln!(out, "   (connection closed)")?;
            break;
        }
    }
    conv.disconnect();
    report(&mut conv, out, None, None)?;
    Ok(())
}

/// Runs the hooks that wait for Redis to their end, one after another, as the proxy's driver
/// would (it reads nothing more of the session meanwhile).
fn settle_hooks(conv: &mut Conversation, runtime: Option<&tokio::runtime::Runtime>) {
    let Some(rt) = runtime else {
        return;
    };
    while let Some(hook) = conv.take_hook() {
        let done = rt.block_on(hook);
        conv.hook_done(done);
    }
}

fn handle_controls(
    conv: &mut Conversation,
    out: &mut impl Write,
) -> Result<Option<Control>, ReplayError> {
    while let Some(control) = conv.take_control() {
        match control {
            Control::StartTls => {
                writeln!(out, "   (TLS handshake)")?;
                conv.client_tls_established();
            }
            Control::ShutdownUpstreamWrite => {}
            close @ Control::Close { .. } => return Ok(Some(close)),
        }
    }
    Ok(None)
}

/// Prints what the last input produced: decisions, and what each side was sent when it differs
/// from what came in.
fn report(
    conv: &mut Conversation,
    out: &mut impl Write,
    client_in: Option<&str>,
    server_in: Option<&str>,
) -> Result<(), ReplayError> {
    if let Some(deadline) = conv.hold_deadline() {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        writeln!(out, "   (held for {} ms)", wait.as_millis())?;
        conv.release_held();
    }
    for event in conv.events.drain(..) {
        if let Event::Policy(d) = event {
            let code = d
                .code
                .as_deref()
                .map(|c| format!(" [{c}]"))
                .unwrap_or_default();
            let error = d
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            writeln!(
                out,
                "   policy {} {}: {}{code}{error}",
                d.policy,
                d.hook.as_str(),
                d.action
            )?;
        }
    }
    let upstream = String::from_utf8_lossy(&conv.to_upstream.drain_to_vec()).into_owned();
    let client = String::from_utf8_lossy(&conv.to_client.drain_to_vec()).into_owned();
    if let Some(input) = client_in {
        if upstream.is_empty() {
            writeln!(out, "   (not relayed)")?;
        } else if upstream != input {
            print_lines(out, "   -> upstream: ", &upstream)?;
        }
        if !client.is_empty() {
            print_lines(out, "   <- imapgate: ", &client)?;
        }
    } else if let Some(input) = server_in {
        if client.is_empty() {
            writeln!(out, "   (not relayed)")?;
        } else if client != input {
            print_lines(out, "   -> client: ", &client)?;
        }
        if !upstream.is_empty() {
            print_lines(out, "   -> upstream: ", &upstream)?;
        }
    } else if !client.is_empty() {
        print_lines(out, "   -> client: ", &client)?;
    }
    Ok(())
}

fn print_lines(out: &mut impl Write, prefix: &str, text: &str) -> std::io::Result<()> {
    for line in text.split_terminator("\r\n") {
        writeln!(out, "{prefix}{line}")?;
    }
    Ok(())
}

/// The login a forwarded command is, for `on_login`: LOGIN's user, or AUTHENTICATE's
/// mechanism and the user its initial response names.
fn login_of(forwarded: &[u8]) -> Option<LoginView> {
    let command = parse_command(Bytes::copy_from_slice(forwarded)).ok()?;
    match command.name.kind {
        CommandKind::Login => Some(LoginView {
            user: command
                .arg_string(0)
                .map(|u| String::from_utf8_lossy(&u).into_owned()),
            mechanism: "LOGIN".into(),
            delayed_ms: 0,
        }),
        CommandKind::Authenticate => Some(LoginView {
            user: crate::session::sasl_initial_user(&command),
            mechanism: command
                .arg_string(0)
                .map(|m| String::from_utf8_lossy(&m).to_ascii_uppercase())
                .unwrap_or_default(),
            delayed_ms: 0,
        }),
        _ => None,
    }
}

fn describe(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Pass => "the default upstream".into(),
        Verdict::Route(route) => {
            let mut text = route.upstreams.join(", then ");
            if let Some(user) = &route.user {
                text.push_str(&format!(" (as user {user})"));
            }
            text
        }
        Verdict::Reject { status, code, text } => format!(
            "refused: {} {}{text}",
            status.as_str(),
            code.as_deref()
                .map(|c| format!("[{c}] "))
                .unwrap_or_default()
        ),
        Verdict::Close { text } => format!("closed: {text}"),
        Verdict::Delay(d) => format!("delayed {} ms", d.as_millis()),
        Verdict::Drop => "dropped".into(),
    }
}
