//! The closed sets of label values the built-in metrics use.
//!
//! Each is an enum rather than a string so that no caller, and so no client, can invent a new
//! label value: Prometheus keeps one time series per distinct label set, forever.

use crate::imap::framing;
use crate::imap::response::Status;

/// How a command ended, for `imapgate_commands_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommandResult {
    /// Tagged `OK` from the upstream.
    Ok,
    /// Tagged `NO` from the upstream.
    No,
    /// Tagged `BAD` (from the upstream, or from imapgate for a command it could not parse).
    Bad,
    /// Refused by a policy: never reached the upstream.
    Rejected,
    /// The connection ended before the command had its tagged response.
    Aborted,
}

impl CommandResult {
    pub const ALL: [CommandResult; 5] = [
        CommandResult::Ok,
        CommandResult::No,
        CommandResult::Bad,
        CommandResult::Rejected,
        CommandResult::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandResult::Ok => "ok",
            CommandResult::No => "no",
            CommandResult::Bad => "bad",
            CommandResult::Rejected => "rejected",
            CommandResult::Aborted => "aborted",
        }
    }

    /// Index into per-command handle arrays, in [`CommandResult::ALL`] order.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl From<Status> for CommandResult {
    /// A tagged status is only ever OK, NO or BAD. `BYE` (never tagged in a valid stream) counts
    /// as aborted, since the command did not complete; `PREAUTH` (never tagged either) as ok.
    fn from(status: Status) -> Self {
        match status {
            Status::Ok | Status::Preauth => CommandResult::Ok,
            Status::No => CommandResult::No,
            Status::Bad => CommandResult::Bad,
            Status::Bye => CommandResult::Aborted,
        }
    }
}

/// How a login attempt ended, for `imapgate_logins_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoginResult {
    /// The upstream accepted the credentials.
    Ok,
    /// The upstream refused the credentials.
    Failed,
    /// imapgate refused the attempt itself (a policy, or LOGIN on plaintext) before the upstream
    /// saw any credential.
    Refused,
}

impl LoginResult {
    pub const ALL: [LoginResult; 3] = [LoginResult::Ok, LoginResult::Failed, LoginResult::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            LoginResult::Ok => "ok",
            LoginResult::Failed => "failed",
            LoginResult::Refused => "refused",
        }
    }
}

/// Why a connection on a `proxy_protocol` listener was closed before TLS or IMAP, for
/// `imapgate_proxy_protocol_refused_total{listener,reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyRefusal {
    /// The TCP peer is outside the listener's `proxy_from`.
    Untrusted,
    /// The connection did not start with a PROXY header.
    Missing,
    /// The header was malformed.
    Invalid,
    /// No complete header within the pre-login timeout.
    Timeout,
    /// The peer closed the connection (or it failed) inside the header.
    Closed,
}

impl ProxyRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyRefusal::Untrusted => "untrusted",
            ProxyRefusal::Missing => "missing",
            ProxyRefusal::Invalid => "invalid",
            ProxyRefusal::Timeout => "timeout",
            ProxyRefusal::Closed => "closed",
        }
    }
}

/// Which connection limit refused a session, for `imapgate_sessions_refused_total{limit}`;
/// named after the `[limits]` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionLimit {
    MaxConnections,
    PerAddress,
    PerUser,
}

impl SessionLimit {
    pub const ALL: [SessionLimit; 3] = [
        SessionLimit::MaxConnections,
        SessionLimit::PerAddress,
        SessionLimit::PerUser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionLimit::MaxConnections => "max_connections",
            SessionLimit::PerAddress => "max_connections_per_address",
            SessionLimit::PerUser => "max_connections_per_user",
        }
    }
}

/// A shared-state operation, for `imapgate_state_requests_total{op}` and
/// `imapgate_state_duration_seconds{op}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateOp {
    Get,
    Set,
    Incr,
    Hget,
    RateLimit,
    /// Cluster session registry: register, refresh, remove, count.
    Session,
    /// A PING (start, `imapgate check`).
    Ping,
}

impl StateOp {
    pub const ALL: [StateOp; 7] = [
        StateOp::Get,
        StateOp::Set,
        StateOp::Incr,
        StateOp::Hget,
        StateOp::RateLimit,
        StateOp::Session,
        StateOp::Ping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StateOp::Get => "get",
            StateOp::Set => "set",
            StateOp::Incr => "incr",
            StateOp::Hget => "hget",
            StateOp::RateLimit => "rate_limit",
            StateOp::Session => "session",
            StateOp::Ping => "ping",
        }
    }
}

/// How a shared-state operation ended, for `imapgate_state_requests_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateResult {
    Ok,
    /// Connection, server or reply error.
    Error,
    /// No answer within the command timeout.
    Timeout,
}

impl StateResult {
    pub const ALL: [StateResult; 3] = [StateResult::Ok, StateResult::Error, StateResult::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            StateResult::Ok => "ok",
            StateResult::Error => "error",
            StateResult::Timeout => "timeout",
        }
    }
}

/// Which way bytes or messages went, for `imapgate_bytes_total{direction}` and
/// `imapgate_parse_errors_total{direction}`.
///
/// Named after both ends rather than "in/out", which would be ambiguous for a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::ClientToUpstream, Direction::UpstreamToClient];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }
}

impl From<framing::Direction> for Direction {
    /// The framer names the writer of a stream: the client writes towards the upstream.
    fn from(d: framing::Direction) -> Self {
        match d {
            framing::Direction::Client => Direction::ClientToUpstream,
            framing::Direction::Server => Direction::UpstreamToClient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Metrics` indexes its pre-resolved handle arrays with `as usize`: the `ALL` arrays must
    /// list the variants in declaration order.
    #[test]
    fn all_arrays_are_in_discriminant_order() {
        for (i, r) in CommandResult::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in LoginResult::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, d) in Direction::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
        for (i, l) in SessionLimit::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i);
        }
    }

    #[test]
    fn conversions() {
        assert_eq!(CommandResult::from(Status::No), CommandResult::No);
        assert_eq!(
            Direction::from(framing::Direction::Server),
            Direction::UpstreamToClient
        );
    }
}
