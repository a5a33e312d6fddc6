//! A token checker for a private Dovecot's `oauth2` passdb: an OAuth 2.0 token introspection
//! endpoint (RFC 7662) on 127.0.0.1, served by hyper on a thread of its own.
//!
//! Dovecot 2.3 with `introspection_mode = post` sends `POST /introspect` with the form body
//! `token=TOKEN&client_id=&client_secret=`; the checker answers `{"active":true,
//! "username":"alice"}` for a token it knows, `{"active":false}` (as RFC 7662 says) for any
//! other. Dovecot then compares that user name with the one the SASL payload names.
//!
//! ```ignore
//! let checker = TokenChecker::start(&[("t0k3n-alice", "alice")]);
//! let dc = Dovecot::start(DovecotOptions { oauth2: Some(checker.oauth2()), ..Default::default() });
//! // ... AUTHENTICATE XOAUTH2 through imapgate ...
//! assert_eq!(checker.asked(), ["t0k3n-alice"]);      // the token Dovecot had checked
//! ```
//!
//! Dropping the checker stops its server and joins its thread.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::dovecot::Oauth2Options;

/// What Dovecot's introspection requests found, shared with the server thread.
#[derive(Default)]
struct State {
    tokens: HashMap<String, String>,
    asked: Vec<String>,
}

/// A running token introspection endpoint.
pub struct TokenChecker {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TokenChecker {
    /// Serves on a free port of 127.0.0.1; `tokens` are (token, user) pairs.
    pub fn start(tokens: &[(&str, &str)]) -> TokenChecker {
        let state = Arc::new(Mutex::new(State {
            tokens: tokens
                .iter()
                .map(|(t, u)| (t.to_string(), u.to_string()))
                .collect(),
            asked: Vec::new(),
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("token checker runtime");
            runtime.block_on(serve(listener, shared, stopped));
        });
        TokenChecker {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The introspection endpoint's URL.
    pub fn url(&self) -> String {
        format!("http://{}/introspect", self.addr)
    }

    /// Dovecot settings that check tokens here.
    pub fn oauth2(&self) -> Oauth2Options {
        Oauth2Options {
            introspection_url: self.url(),
        }
    }

    /// The tokens Dovecot asked about, in order.
    pub fn asked(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.asked.clone())
            .unwrap_or_default()
    }
}

impl Drop for TokenChecker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(introspect(req, &state).await) }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `POST /introspect` with `token=...` (RFC 7662 section 2.1).
async fn introspect(req: Request<Incoming>, state: &Mutex<State>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::POST || req.uri().path() != "/introspect" {
        return json(StatusCode::NOT_FOUND, serde_json::json!({}));
    }
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return json(StatusCode::BAD_REQUEST, serde_json::json!({})),
    };
    let token = form_value(&body, "token").unwrap_or_default();
    let Ok(mut state) = state.lock() else {
        return json(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({}));
    };
    state.asked.push(token.clone());
    let answer = match state.tokens.get(&token) {
        Some(user) => serde_json::json!({ "active": true, "username": user }),
        None => serde_json::json!({ "active": false }),
    };
    json(StatusCode::OK, answer)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap_or_default()
}

/// The value of `key` in an `application/x-www-form-urlencoded` body, decoded.
fn form_value(body: &[u8], key: &str) -> Option<String> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        (k == key.as_bytes()).then(|| percent_decode(v))
    })
}

fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let escaped = v
            .get(i + 1..i + 3)
            .filter(|_| v[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, v[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
