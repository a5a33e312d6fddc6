//! The admin endpoint: the live sessions, and the kick.
//!
//! - `GET /sessions`: every session as JSON (id, user, the client's real address, listener,
//!   upstream, since, bytes each way);
//! - `POST /kick?user=NAME`: every session of that user (case-insensitively) says
//!   `* BYE [UNAVAILABLE]` and closes; the answer counts them.
//!
//! Every request, whatever its path, needs `Authorization: Bearer <token>`; without it the
//! answer is 401 and nothing else (not even whether the path exists). The token is compared in
//! constant time, is never logged, and is re-read from its file on SIGHUP. Served by
//! [`crate::net::http`] on a thread and runtime of its own, like the metrics endpoint: an
//! operator must be able to kick a session while the sessions' workers are busy.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use hyper::{HeaderMap, Method, Request, StatusCode};
use serde::Serialize;

use crate::audit::rfc3339;
use crate::config::{AdminConfig, Secret, check_token};
use crate::metrics::Metrics;
use crate::net::http::{Reply, json, plain};
use crate::policy::Lookups;
use crate::session::{Registry, SessionInfo};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin token file {}: {source}", path.display())]
    TokenFile { path: PathBuf, source: io::Error },
    /// The reason never quotes the token.
    #[error("admin token file {}: {why}", path.display())]
    UnusableToken { path: PathBuf, why: &'static str },
    #[error("admin token: {0}")]
    Token(&'static str),
}

/// Reads the token the config names: the inline one, or the file's content without the
/// whitespace around it (a trailing newline, typically).
pub fn load_token(config: &AdminConfig) -> Result<Secret, AdminError> {
    let token = match (&config.token, &config.token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
                path: path.clone(),
                source,
            })?;
            let token = Secret::new(text.trim());
            check_token(token.expose()).map_err(|why| AdminError::UnusableToken {
                path: path.clone(),
                why,
            })?;
            return Ok(token);
        }
        (None, None) => return Err(AdminError::Token("neither `token` nor `token_file` is set")),
    };
    check_token(token.expose()).map_err(AdminError::Token)?;
    Ok(token)
}

/// The current token, swapped on SIGHUP while requests are checked against it.
#[derive(Clone)]
pub struct TokenSlot(Arc<ArcSwap<Secret>>);

impl TokenSlot {
    pub fn new(token: Secret) -> TokenSlot {
        TokenSlot(Arc::new(ArcSwap::from_pointee(token)))
    }

    pub fn replace(&self, token: Secret) {
        self.0.store(Arc::new(token));
    }

    /// Whether `headers` carry `Authorization: Bearer <the token>`.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
        else {
            return false;
        };
        constant_time_eq(presented, self.0.load().expose().as_bytes())
    }
}

impl std::fmt::Debug for TokenSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSlot(..)")
    }
}

/// The credentials of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 11.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.starts_with(b" ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares without stopping at the first difference, so that the time taken does not tell
/// how much of a guess was right. (The length is not hidden; a token of enough random
/// characters does not need it to be.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// What the endpoint works with.
#[derive(Clone, Debug)]
pub struct Admin {
    pub sessions: Registry,
    pub token: TokenSlot,
    pub metrics: Metrics,
    /// Cached route lookups (`imap.state.hget` with `cache_s`): a kicked user's are
    /// forgotten, so that their next login reads where they live now.
    pub lookups: Arc<Lookups>,
}

/// One session as `GET /sessions` shows it.
#[derive(Serialize)]
struct SessionJson {
    id: u64,
    user: Option<String>,
    peer: String,
    listener: String,
    upstream: Option<String>,
    since: String,
    bytes_in: u64,
    bytes_out: u64,
}

impl From<SessionInfo> for SessionJson {
    fn from(s: SessionInfo) -> Self {
        SessionJson {
            id: s.id,
            user: s.user,
            peer: s.peer.to_string(),
            listener: s.listener,
            upstream: s.upstream,
            since: rfc3339(s.since),
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
        }
    }
}

#[derive(Serialize)]
struct Kicked {
    kicked: usize,
}

impl Admin {
    /// The endpoint's answers, for [`crate::net::http::HttpListener::serve`].
    pub fn handler(self) -> impl Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static {
        move |req| self.respond(req.method(), req.uri(), req.headers())
    }

    /// The whole routing table.
    pub fn respond(&self, method: &Method, uri: &hyper::Uri, headers: &HeaderMap) -> Reply {
        if !self.token.admits(headers) {
            tracing::info!(
                path = uri.path(),
                "admin endpoint: request without the token"
            );
            let mut reply = plain(StatusCode::UNAUTHORIZED, "unauthorized\n");
            reply
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return reply;
        }
        match (uri.path(), method) {
            ("/sessions", &Method::GET | &Method::HEAD) => self.sessions(),
            ("/sessions", _) => not_allowed("GET, HEAD"),
            ("/kick", &Method::POST) => self.kick(uri.query().unwrap_or("")),
            ("/kick", _) => not_allowed("POST"),
            _ => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn sessions(&self) -> Reply {
        let list: Vec<SessionJson> = self
            .sessions
            .sessions()
            .into_iter()
            .map(SessionJson::from)
            .collect();
        to_json(&list)
    }

    fn kick(&self, query: &str) -> Reply {
        let user = match query_value(query, "user") {
            Ok(Some(user)) if !user.is_empty() => user,
            Ok(_) => return plain(StatusCode::BAD_REQUEST, "?user=NAME is required\n"),
            Err(why) => return plain(StatusCode::BAD_REQUEST, why),
        };
        self.lookups.forget_field(&user);
        let kicked = self.sessions.kick_user(&user);
        self.metrics.sessions_kicked(kicked);
        tracing::info!(user = user.as_str(), kicked, "admin endpoint: kick");
        to_json(&Kicked { kicked })
    }
}

fn to_json<T: Serialize>(value: &T) -> Reply {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            json(StatusCode::OK, body)
        }
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"),
    }
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut reply = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    reply
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    reply
}

/// The value of `key` in a query string (`a=1&user=x%40y`), percent-decoded; `+` is a plus,
/// as in RFC 3986 (user names may contain one). More than one `key` is an error: which one
/// was meant?
fn query_value(query: &str, key: &str) -> Result<Option<String>, &'static str> {
    let mut found = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != key {
            continue;
        }
        if found.is_some() {
            return Err("the query names more than one user\n");
        }
        found = Some(percent_decode(v).ok_or("the query is not valid percent-encoded UTF-8\n")?);
    }
    Ok(found)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(token: &str) -> Admin {
        Admin {
            lookups: Arc::default(),
            sessions: Registry::default(),
            token: TokenSlot::new(Secret::new(token)),
            metrics: Metrics::new(),
        }
    }

    fn ask(admin: &Admin, method: Method, uri: &str, auth: Option<&str>) -> (u16, String) {
        let mut headers = HeaderMap::new();
        if let Some(auth) = auth {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        }
        let reply = admin.respond(&method, &uri.parse().unwrap(), &headers);
        let status = reply.status().as_u16();
        let body = body_text(reply);
        (status, body)
    }

    fn body_text(reply: Reply) -> String {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt.block_on(reply.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn every_request_needs_the_token() {
        let a = admin("t0ken");
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer t0ke"),
            Some("Bearer t0ken2"),
            Some("Basic t0ken"),
            Some("Bearert0ken"),
            Some("Bearer "),
            Some("t0ken"),
        ] {
            for (method, path) in [
                (Method::GET, "/sessions"),
                (Method::POST, "/kick?user=x"),
                (Method::GET, "/nowhere"),
            ] {
                assert_eq!(ask(&a, method, path, auth).0, 401, "{auth:?} {path}");
            }
        }
        assert_eq!(
            ask(&a, Method::GET, "/sessions", Some("Bearer t0ken")).0,
            200
        );
        assert_eq!(
            ask(&a, Method::GET, "/sessions", Some("bearer  t0ken")).0,
            200
        );
    }

    #[test]
    fn routes_and_methods() {
        let a = admin("t");
        let auth = Some("Bearer t");
        assert_eq!(
            ask(&a, Method::GET, "/sessions", auth),
            (200, "[]\n".into())
        );
        assert_eq!(ask(&a, Method::POST, "/sessions", auth).0, 405);
        assert_eq!(ask(&a, Method::GET, "/kick?user=x", auth).0, 405);
        assert_eq!(ask(&a, Method::GET, "/", auth).0, 404);
        assert_eq!(ask(&a, Method::GET, "/sessions/", auth).0, 404);
        assert_eq!(ask(&a, Method::POST, "/kick", auth).0, 400);
        assert_eq!(ask(&a, Method::POST, "/kick?user=", auth).0, 400);
        assert_eq!(ask(&a, Method::POST, "/kick?user=a&user=b", auth).0, 400);
        assert_eq!(ask(&a, Method::POST, "/kick?user=%zz", auth).0, 400);
        assert_eq!(
            ask(&a, Method::POST, "/kick?user=nobody", auth),
            (200, "{\"kicked\":0}\n".into())
        );
    }

    #[test]
    fn sessions_and_kick() {
        let a = admin("t");
        let auth = Some("Bearer t");
        let s = a
            .sessions
            .register(7, "192.0.2.7:50122".parse().unwrap(), "imaps")
            .unwrap();
        s.logged_in("Ann+x@example.org").unwrap();
        s.set_upstream("mail1");
        s.count_in(12);
        let (status, body) = ask(&a, Method::GET, "/sessions", auth);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let one = &v[0];
        assert_eq!(one["id"], 7);
        assert_eq!(one["user"], "Ann+x@example.org");
        assert_eq!(one["peer"], "192.0.2.7:50122");
        assert_eq!(one["listener"], "imaps");
        assert_eq!(one["upstream"], "mail1");
        assert_eq!(one["bytes_in"], 12);
        assert_eq!(one["bytes_out"], 0);
        assert!(one["since"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            ask(&a, Method::POST, "/kick?user=ann%2bX%40EXAMPLE.org", auth),
            (200, "{\"kicked\":1}\n".into())
        );
        assert!(s.is_kicked());
    }

    #[test]
    fn a_token_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let config = AdminConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            token: None,
            token_file: Some(path.clone()),
        };
        assert!(matches!(
            load_token(&config),
            Err(AdminError::TokenFile { .. })
        ));
        std::fs::write(&path, "abc123\n").unwrap();
        assert_eq!(load_token(&config).unwrap().expose(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        let err = load_token(&config).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::write(&path, "sec ret\n").unwrap();
        let err = load_token(&config).unwrap_err().to_string();
        assert!(!err.contains("sec ret"), "{err}");
    }

    #[test]
    fn bearer_and_compare() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(
            query_value("a=1&user=x%40y", "user"),
            Ok(Some("x@y".into()))
        );
        assert_eq!(query_value("a=1", "user"), Ok(None));
        assert_eq!(query_value("user=a+b", "user"), Ok(Some("a+b".into())));
        assert!(query_value("user=%ff", "user").is_err());
    }
}
