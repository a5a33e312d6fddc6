//! A login imapgate read itself, routed: the `on_login` policies choose the upstream (or
//! refuse), imapgate connects to it (trying the route's fallbacks in order), tells it who the
//! client really is when configured to (`forward_id`), replays the client's credentials
//! unchanged (but for a routed user name) and hands the upstream's answer to the
//! conversation, which relays it as the answer to the client's own command.
//!
//! imapgate never checks a password: the upstream does. What it reads of the exchange it does
//! not pass to the conversation: its own ID command's answer and the upstream's `+` requests
//! during the replay.

use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::prelogin::{Credentials, Secret};
use super::relay::Shared;
use super::state::Conversation;
use crate::imap::capability::CapabilitySet;
use crate::imap::encode::{self, EncodeOptions, LiteralForm, ResponseValue, Value};
use crate::imap::framing::{Direction, Frame, Framer, Limits};
use crate::imap::response::{ResponseKind, Status, parse_response};
use crate::imap::sync_literals::synchronizing_segments;
use crate::imap::validity::is_proxy_id_field;
use crate::net::Stream;
pub use crate::net::upstream::ClientAddrs;
use crate::net::upstream::{Opened, Target};
use crate::policy::{Judgement, LoginView, Verdict};

/// How long the replayed login may take once connected (the upstream's password check,
/// slowed by its failure delay, included).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Our own tag for the ID imapgate sends: no client command is in flight on the new
/// connection, so it cannot clash.
const ID_TAG: &[u8] = b"imapgate1";

/// What became of a login.
pub enum Outcome {
    /// The upstream accepted: its connection, its name, and what it said (the tagged OK
    /// and anything before or after it), for the conversation to relay.
    LoggedIn {
        stream: Stream,
        upstream: String,
        answer: Vec<u8>,
    },
    /// The answer to relay (the upstream's NO, or imapgate's own refusal); the client may try
    /// again.
    Answered(Vec<u8>),
    /// End the session with `* BYE text`.
    Close(String),
}

/// Routes and replays `creds`.
pub async fn login(
    shared: &Shared,
    conv: &mut Conversation,
    addrs: ClientAddrs,
    session_id: u64,
    creds: Credentials,
    id_fields: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Outcome {
    let mut view = LoginView {
        user: creds.user.clone(),
        mechanism: match &creds.secret {
            Secret::Login { .. } => "LOGIN".into(),
            Secret::Sasl { mechanism, .. } => mechanism.clone(),
        },
        delayed_ms: 0,
    };
    let first_judged = std::time::Instant::now();
    let route = loop {
        view.delayed_ms = u64::try_from(first_judged.elapsed().as_millis()).unwrap_or(u64::MAX);
        let verdict = match conv.judge_login_waiting(&view) {
            Judgement::Ready(verdict, _) => verdict,
            Judgement::Waiting(waiting) => {
                let finished = waiting.await;
                conv.hook_decisions(finished.decisions);
                finished.verdict
            }
        };
        match verdict {
            Verdict::Pass => break None,
            Verdict::Route(route) => break Some(route),
            Verdict::Delay(wait) => tokio::time::sleep(wait).await,
            Verdict::Close { text } => return Outcome::Close(text),
            Verdict::Reject { status, code, text } => {
                conv.mark_login_refused(&creds.tag);
                return Outcome::Answered(tagged(&creds.tag, status, code.as_deref(), &text));
            }
            // The engine lets no other verdict through from on_login.
            Verdict::Drop => return unavailable(&creds.tag, "Login routing failed"),
        }
    };
    let names: Vec<&str> = match &route {
        Some(route) => route.upstreams.iter().map(String::as_str).collect(),
        None => shared
            .upstreams
            .first()
            .map(|t| vec![t.name()])
            .unwrap_or_default(),
    };
    let user_override = route.as_ref().and_then(|r| r.user.clone());
    for name in names {
        let Some(target) = shared.upstreams.iter().find(|t| t.name() == name) else {
            tracing::error!(
                upstream = name,
                "a route names an upstream that is not configured"
            );
            continue;
        };
        // A warm connection that fails (the server dropped it since the check) is no sign
        // that the upstream is down: the login gets a fresh connection to the same upstream.
        let mut warm_ok = true;
        while let Some(attempt) = attempt(shared, target, addrs, warm_ok).await {
            let warm = attempt.warm;
            let mut leg = Leg::new(attempt.up.stream);
            let caps = greeting_caps(&attempt.up.greeting);
            let replayed = async {
                // The client's ID goes on before its login, as it would directly; imapgate
                // adds where the client really is when the upstream trusts it to say so.
                let ours = target.config.forward_id.then_some((addrs, session_id));
                if ours.is_some() || !id_fields.is_empty() {
                    leg.send_id(ours, id_fields).await?;
                }
                leg.replay(&creds, user_override.as_deref(), &caps).await
            };
            match timeout(LOGIN_TIMEOUT, replayed).await {
                Ok(Ok((status, answer))) => {
                    tracing::debug!(
                        upstream = name,
                        status = status.as_str(),
                        warm,
                        "login replayed"
                    );
                    if status == Status::Ok {
                        return Outcome::LoggedIn {
                            stream: leg.stream,
                            upstream: name.to_owned(),
                            answer,
                        };
                    }
                    // The server's own refusal: the client may try again (anywhere).
                    return Outcome::Answered(answer);
                }
                Ok(Err(e)) => {
                    tracing::warn!(upstream = name, error = %e, warm, "login replay failed");
                }
                Err(_) => tracing::warn!(upstream = name, warm, "login replay timed out"),
            }
            if !warm {
                break;
            }
            warm_ok = false;
        }
    }
    unavailable(
        &creds.tag,
        "No mail server is available for this login, try again later",
    )
}

/// A connection to `target` for this login, or `None` (counted, logged, and the upstream
/// marked down) when it cannot be reached.
async fn attempt(
    shared: &Shared,
    target: &Target,
    addrs: ClientAddrs,
    warm_ok: bool,
) -> Option<Opened> {
    match target.open(Some(addrs), warm_ok).await {
        Ok(opened) => Some(opened),
        Err(e) => {
            shared.metrics.upstream_connect_failed();
            if let Some(i) = shared.health.index(target.name()) {
                shared.health.connect_failed(i, &e);
            }
            tracing::warn!(upstream = %target.name(), error = %e, "upstream unavailable, trying the next");
            None
        }
    }
}

fn unavailable(tag: &[u8], text: &str) -> Outcome {
    Outcome::Answered(tagged(tag, Status::No, Some("UNAVAILABLE"), text))
}

fn tagged(tag: &[u8], status: Status, code: Option<&str>, text: &str) -> Vec<u8> {
    let value = ResponseValue::Status {
        tag: Some(tag.to_vec()),
        status,
        code: code.map(|c| (c.as_bytes().to_vec(), Vec::new())),
        text: text.as_bytes().to_vec(),
    };
    encode::response(&value)
        .map(|e| e.bytes)
        .unwrap_or_default()
}

/// The capabilities in the greeting's code, if it has them.
fn greeting_caps(greeting: &[u8]) -> Option<CapabilitySet> {
    let response = parse_response(Bytes::copy_from_slice(greeting)).ok()?;
    CapabilitySet::from_response(&response)
}

#[derive(Debug, thiserror::Error)]
enum LegError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("unreadable response: {0}")]
    Unreadable(String),
    #[error("cannot encode the replay: {0}")]
    Encode(#[from] encode::EncodeError),
    #[error("the server asked for more than the exchange holds")]
    Unexpected,
}

/// One freshly connected upstream, during the login: responses are framed as they come, and
/// nothing read past the login's tagged answer is lost (it goes to the conversation).
struct Leg {
    stream: Stream,
    framer: Framer,
}

impl Leg {
    fn new(stream: Stream) -> Leg {
        let limits = Limits {
            max_line: 1024 * 1024,
            ..Limits::default()
        };
        Leg {
            stream,
            framer: Framer::new(Direction::Server, limits),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), LegError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next whole response (literals included), read as needed.
    async fn next(&mut self) -> Result<Bytes, LegError> {
        let mut message = BytesMut::new();
        loop {
            match self.framer.next_frame() {
                Ok(Some(Frame::Text { bytes, literal, .. })) => {
                    message.extend_from_slice(&bytes);
                    if literal.is_none() {
                        return Ok(message.freeze());
                    }
                }
                Ok(Some(Frame::Chunk { bytes, .. })) => message.extend_from_slice(&bytes),
                Ok(None) => {
                    let buf = self.framer.buffer_mut();
                    buf.reserve(4096);
                    if self.stream.read_buf(buf).await? == 0 {
                        return Err(LegError::Closed);
                    }
                }
                Err(e) => return Err(LegError::Unreadable(e.to_string())),
            }
        }
    }

    /// `ID` with the client's own fields and, with `ours`, where it really comes from; the
    /// answer is imapgate's to read, not the client's.
    async fn send_id(
        &mut self,
        ours: Option<(ClientAddrs, u64)>,
        client_fields: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), LegError> {
        let mut fields: Vec<Value> = Vec::new();
        for (key, value) in client_fields {
            // The conversation removed them already; the ID imapgate vouches for must not
            // depend on that alone.
            if is_proxy_id_field(key) {
                continue;
            }
            fields.push(Value::String(key.clone()));
            fields.push(value.clone().map_or(Value::Nil, Value::String));
        }
        if let Some((addrs, session_id)) = ours {
            for (key, value) in [
                ("x-originating-ip", addrs.source.ip().to_string()),
                ("x-originating-port", addrs.source.port().to_string()),
                ("x-connected-ip", addrs.destination.ip().to_string()),
                ("x-connected-port", addrs.destination.port().to_string()),
                ("x-session-id", format!("imapgate-{session_id}")),
            ] {
                fields.push(Value::String(key.as_bytes().to_vec()));
                fields.push(Value::String(value.into_bytes()));
            }
        }
        let command = encode::command(ID_TAG, b"ID", &[Value::List(fields)], self.options())?;
        self.send_segments(Bytes::from(command.bytes)).await?;
        loop {
            let response = self.next().await?;
            if response.starts_with(ID_TAG) && response.get(ID_TAG.len()) == Some(&b' ') {
                return Ok(());
            }
        }
    }

    /// Sends a command, each piece after the server's `+` for the literal before it.
    async fn send_segments(&mut self, bytes: Bytes) -> Result<(), LegError> {
        let segments = synchronizing_segments(bytes);
        self.send(&segments.first).await?;
        for segment in segments.rest {
            let response = self.next().await?;
            if !response.starts_with(b"+") {
                return Err(LegError::Unexpected);
            }
            self.send(&segment).await?;
        }
        Ok(())
    }

    fn options(&self) -> EncodeOptions {
        EncodeOptions {
            literal: LiteralForm::Sync,
            utf8: false,
        }
    }

    /// Replays the credentials; gives the status of the tagged answer and every response the
    /// conversation must see (all but the `+` requests the replay answered).
    async fn replay(
        &mut self,
        creds: &Credentials,
        user: Option<&str>,
        caps: &Option<CapabilitySet>,
    ) -> Result<(Status, Vec<u8>), LegError> {
        match &creds.secret {
            Secret::Login {
                user: given,
                password,
            } => {
                let user = user.map_or_else(|| given.clone(), |u| u.as_bytes().to_vec());
                let args = [Value::AString(user), Value::String(password.clone())];
                let command = encode::command(&creds.tag, b"LOGIN", &args, self.options())?;
                self.send_segments(Bytes::from(command.bytes)).await?;
                self.answer(&creds.tag, &mut std::iter::empty(), "*").await
            }
            Secret::Sasl {
                mechanism,
                responses,
            } => {
                let mut responses = responses.clone();
                if let (Some(user), Some(first)) = (user, responses.first_mut()) {
                    *first = with_user(mechanism, first, user);
                }
                let sasl_ir = caps.as_ref().is_some_and(|c| c.has("SASL-IR"));
                let mut command = creds.tag.clone();
                command.extend_from_slice(b" AUTHENTICATE ");
                command.extend_from_slice(mechanism.as_bytes());
                let mut rest = responses.into_iter();
                if sasl_ir && let Some(first) = rest.next() {
                    command.push(b' ');
                    command.extend_from_slice(if first.is_empty() { b"=" } else { &first });
                }
                command.extend_from_slice(b"\r\n");
                self.send(&command).await?;
                let finish = match mechanism.as_str() {
                    // The server reports an error in a challenge and waits for an answer
                    // before its NO: an empty one (XOAUTH2), a %x01 (RFC 7628).
                    "XOAUTH2" => "",
                    "OAUTHBEARER" => "AQ==",
                    _ => "*",
                };
                self.answer(&creds.tag, &mut rest, finish).await
            }
        }
    }

    /// Reads up to the tagged answer to `tag`, answering each `+` with the next response (or
    /// `finish` once there are none left).
    async fn answer(
        &mut self,
        tag: &[u8],
        responses: &mut (dyn Iterator<Item = Vec<u8>> + Send),
        finish: &str,
    ) -> Result<(Status, Vec<u8>), LegError> {
        let mut answer = Vec::new();
        loop {
            let raw = self.next().await?;
            let response =
                parse_response(raw.clone()).map_err(|e| LegError::Unreadable(e.to_string()))?;
            match &response.kind {
                ResponseKind::Continuation { .. } => {
                    let mut line = responses
                        .next()
                        .unwrap_or_else(|| finish.as_bytes().to_vec());
                    line.extend_from_slice(b"\r\n");
                    self.send(&line).await?;
                }
                ResponseKind::Status {
                    tag: Some(_),
                    status,
                    ..
                } if response.tag() == Some(tag) => {
                    let status = *status;
                    answer.extend_from_slice(&raw);
                    // Whatever the server sent after it belongs to the session.
                    answer.extend_from_slice(self.framer.buffer_mut());
                    return Ok((status, answer));
                }
                _ => answer.extend_from_slice(&raw),
            }
        }
    }
}

/// The first response of `mechanism` with another user: PLAIN's authcid, LOGIN's name. Other
/// mechanisms carry the user inside a token the client obtained: left as they are.
fn with_user(mechanism: &str, response: &[u8], user: &str) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    match mechanism {
        "PLAIN" => {
            let Ok(decoded) = b64.decode(response) else {
                return response.to_vec();
            };
            let mut fields: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
            if fields.len() != 3 {
                return response.to_vec();
            }
            fields[1] = user.as_bytes();
            b64.encode(fields.join(&0u8)).into_bytes()
        }
        "LOGIN" => b64.encode(user).into_bytes(),
        _ => response.to_vec(),
    }
}
