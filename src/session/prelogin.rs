//! imapgate's own answers before login, when it owns the login (routing): a small IMAP server
//! that stands in for the upstream until imapgate knows which upstream serves the user.
//!
//! The client talks to the usual [`super::state::Conversation`], with every rule and policy of
//! a relayed session (state validity, STARTTLS, literals and SASL lines read only after a
//! `+`, require_tls); what the conversation sends "upstream" comes here instead. This
//! responder answers CAPABILITY, NOOP, ID and LOGOUT itself, asks for literals and SASL
//! responses as a server would, and when the client has given its credentials (LOGIN, or
//! AUTHENTICATE PLAIN / LOGIN / XOAUTH2 / OAUTHBEARER with or without an initial response)
//! hands them over as [`Credentials`] without answering: the answer is the chosen upstream's.
//! The credentials are kept only until replayed; nothing of them is logged.

use bytes::{Bytes, BytesMut};

use crate::imap::command::{CommandKind, parse_command};
use crate::imap::encode::{self, ResponseValue, Value};
use crate::imap::framing::{Direction, Frame, Framer, Limits};
use crate::imap::response::Status;

/// The credentials a client gave, to be replayed to the upstream it is routed to.
pub struct Credentials {
    /// The client's tag: the upstream's answer to the replay is the client's answer.
    pub tag: Vec<u8>,
    /// The user they name, for routing (never the secret).
    pub user: Option<String>,
    pub secret: Secret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tag", &String::from_utf8_lossy(&self.tag))
            .field("user", &self.user)
            .field("secret", &"(not shown)")
            .finish()
    }
}

/// What is replayed.
pub enum Secret {
    Login {
        user: Vec<u8>,
        password: Vec<u8>,
    },
    Sasl {
        /// The mechanism's name, upper case.
        mechanism: String,
        /// The client's responses in order (base64 text, `=`-less empty for an empty one),
        /// the first being the initial response when the client sent one.
        responses: Vec<Vec<u8>>,
    },
}

/// The SASL mechanisms imapgate can read the user from and replay.
pub const MECHANISMS: &[&str] = &["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"];

/// An AUTHENTICATE exchange being collected.
struct Collecting {
    tag: Vec<u8>,
    mechanism: String,
    responses: Vec<Vec<u8>>,
}

impl Collecting {
    /// How many responses the mechanism takes from the client.
    fn needed(&self) -> usize {
        if self.mechanism == "LOGIN" { 2 } else { 1 }
    }

    /// The challenge before response `n` (0-based), base64 text.
    fn challenge(&self, n: usize) -> &'static [u8] {
        match (self.mechanism.as_str(), n) {
            ("LOGIN", 0) => b"VXNlcm5hbWU6",
            ("LOGIN", _) => b"UGFzc3dvcmQ6",
            _ => b"",
        }
    }
}

/// The stand-in server.
pub struct Responder {
    framer: Framer,
    out: Vec<u8>,
    capabilities: Vec<String>,
    /// A command whose literals are being received.
    collecting: Option<BytesMut>,
    sasl: Option<Collecting>,
    credentials: Option<Credentials>,
    id: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    logged_out: bool,
}

impl Responder {
    /// `capabilities`: what imapgate offers before login (the conversation filters them for
    /// the client as it does an upstream's); `max_line` bounds one command or SASL line.
    pub fn new(capabilities: Vec<String>, max_line: usize) -> Responder {
        let limits = Limits {
            max_line,
            max_id_line: max_line,
            ..Limits::default()
        };
        Responder {
            framer: Framer::new(Direction::Client, limits),
            out: Vec::new(),
            capabilities,
            collecting: None,
            sasl: None,
            credentials: None,
            id: Vec::new(),
            logged_out: false,
        }
    }

    /// The greeting, with the capabilities.
    pub fn greeting(&self) -> Bytes {
        let code = (
            b"CAPABILITY".to_vec(),
            self.capabilities
                .iter()
                .map(|c| Value::Atom(c.as_bytes().to_vec()))
                .collect(),
        );
        encoded(&ResponseValue::Status {
            tag: None,
            status: Status::Ok,
            code: Some(code),
            text: b"imapgate ready".to_vec(),
        })
        .into()
    }

    /// What the conversation sent towards the upstream.
    pub fn input(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
        loop {
            match self.framer.next_frame() {
                Ok(Some(frame)) => self.frame(frame),
                Ok(None) => return,
                // The conversation framed these bytes already: a framing error here means
                // the two disagree, which the stand-in must not paper over.
                Err(_) => {
                    self.bye("Internal error: unreadable command");
                    return;
                }
            }
        }
    }

    /// The responses for the conversation, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The credentials, once the client has given them (the answer to them comes from the
    /// upstream).
    pub fn take_credentials(&mut self) -> Option<Credentials> {
        self.credentials.take()
    }

    /// The client ended the session (LOGOUT answered).
    pub fn logged_out(&self) -> bool {
        self.logged_out
    }

    /// The fields of the client's last ID command, to pass on to the upstream.
    pub fn id_fields(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.id
    }

    fn frame(&mut self, frame: Frame) {
        if self.sasl.is_some() {
            if let Frame::Text { bytes, .. } = frame {
                self.sasl_line(&bytes);
            }
            return;
        }
        match frame {
            Frame::Text {
                bytes,
                start,
                literal,
            } => {
                let buf = self.collecting.get_or_insert_with(BytesMut::new);
                if start {
                    buf.clear();
                }
                buf.extend_from_slice(&bytes);
                match literal {
                    // As a server: the octets may come.
                    Some(l) if l.sync => self.reply(&ResponseValue::Continuation {
                        text: b"Ready for literal data".to_vec(),
                    }),
                    Some(_) => {}
                    None => {
                        let whole = self.collecting.take().unwrap_or_default().freeze();
                        self.command(whole);
                    }
                }
            }
            Frame::Chunk { bytes, .. } => {
                self.collecting
                    .get_or_insert_with(BytesMut::new)
                    .extend_from_slice(&bytes);
            }
        }
    }

    fn command(&mut self, raw: Bytes) {
        let Ok(command) = parse_command(raw) else {
            // The conversation parsed it before sending it here.
            return self.bye("Internal error: unparsable command");
        };
        let tag = command.tag().to_vec();
        match command.name.kind {
            CommandKind::Capability => {
                let caps = self
                    .capabilities
                    .iter()
                    .map(|c| Value::Atom(c.as_bytes().to_vec()))
                    .collect();
                self.reply(&ResponseValue::Data {
                    number: None,
                    name: b"CAPABILITY".to_vec(),
                    args: caps,
                });
                self.ok(&tag, "Capabilities listed");
            }
            CommandKind::Noop => self.ok(&tag, "NOOP completed"),
            CommandKind::Logout => {
                self.reply(&ResponseValue::Status {
                    tag: None,
                    status: Status::Bye,
                    code: None,
                    text: b"Logging out".to_vec(),
                });
                self.ok(&tag, "Logout completed");
                self.logged_out = true;
            }
            CommandKind::Id => {
                self.id = crate::imap::validity::id_fields(&command);
                self.reply(&ResponseValue::Data {
                    number: None,
                    name: b"ID".to_vec(),
                    args: vec![Value::List(vec![
                        Value::String(b"name".to_vec()),
                        Value::String(b"imapgate".to_vec()),
                    ])],
                });
                self.ok(&tag, "ID completed");
            }
            CommandKind::Login => {
                let (Some(user), Some(password)) = (command.arg_string(0), command.arg_string(1))
                else {
                    return self.tagged(
                        &tag,
                        Status::Bad,
                        None,
                        "LOGIN needs a user and a password",
                    );
                };
                self.credentials = Some(Credentials {
                    tag,
                    user: std::str::from_utf8(&user).ok().map(str::to_owned),
                    secret: Secret::Login {
                        user: user.into_owned(),
                        password: password.into_owned(),
                    },
                });
            }
            CommandKind::Authenticate => {
                let mechanism = command
                    .arg_string(0)
                    .map(|m| String::from_utf8_lossy(&m).to_ascii_uppercase())
                    .unwrap_or_default();
                if !MECHANISMS.contains(&mechanism.as_str()) {
                    return self.tagged(
                        &tag,
                        Status::No,
                        Some("CANNOT"),
                        "Unsupported authentication mechanism",
                    );
                }
                let mut sasl = Collecting {
                    tag,
                    mechanism,
                    responses: Vec::new(),
                };
                if let Some(ir) = command.arg_string(1) {
                    // RFC 4959: "=" is an empty initial response.
                    let ir = if &*ir == b"=" {
                        Vec::new()
                    } else {
                        ir.into_owned()
                    };
                    sasl.responses.push(ir);
                }
                self.sasl = Some(sasl);
                self.framer.set_line_only(true);
                self.next_sasl_step();
            }
            // The conversation forwards nothing else before login.
            _ => self.tagged(
                &tag,
                Status::Bad,
                Some("CLIENTBUG"),
                "Not valid before login",
            ),
        }
    }

    fn sasl_line(&mut self, bytes: &[u8]) {
        let line = bytes.strip_suffix(b"\r\n").unwrap_or(bytes);
        if line == b"*" {
            let tag = self.sasl.take().map(|s| s.tag).unwrap_or_default();
            self.framer.set_line_only(false);
            return self.tagged(&tag, Status::Bad, None, "Authentication cancelled");
        }
        if let Some(sasl) = self.sasl.as_mut() {
            sasl.responses.push(line.to_vec());
        }
        self.next_sasl_step();
    }

    /// Another challenge, or, with every response in, the credentials.
    fn next_sasl_step(&mut self) {
        let Some(sasl) = self.sasl.as_ref() else {
            return;
        };
        if sasl.responses.len() < sasl.needed() {
            let challenge = sasl.challenge(sasl.responses.len()).to_vec();
            return self.reply(&ResponseValue::Continuation { text: challenge });
        }
        let Some(sasl) = self.sasl.take() else {
            return;
        };
        self.framer.set_line_only(false);
        let user = sasl_user(&sasl.mechanism, &sasl.responses);
        self.credentials = Some(Credentials {
            tag: sasl.tag,
            user,
            secret: Secret::Sasl {
                mechanism: sasl.mechanism,
                responses: sasl.responses,
            },
        });
    }

    fn ok(&mut self, tag: &[u8], text: &str) {
        self.tagged(tag, Status::Ok, None, text);
    }

    fn tagged(&mut self, tag: &[u8], status: Status, code: Option<&str>, text: &str) {
        self.reply(&ResponseValue::Status {
            tag: Some(tag.to_vec()),
            status,
            code: code.map(|c| (c.as_bytes().to_vec(), Vec::new())),
            text: text.as_bytes().to_vec(),
        });
    }

    fn bye(&mut self, text: &str) {
        self.reply(&ResponseValue::Status {
            tag: None,
            status: Status::Bye,
            code: Some((b"UNAVAILABLE".to_vec(), Vec::new())),
            text: text.as_bytes().to_vec(),
        });
        self.logged_out = true;
    }

    fn reply(&mut self, value: &ResponseValue) {
        self.out.extend_from_slice(&encoded(value));
    }
}

fn encoded(value: &ResponseValue) -> Vec<u8> {
    // Every value here is imapgate's own (tags already validated by the conversation).
    encode::response(value).map(|e| e.bytes).unwrap_or_default()
}

/// The user a SASL exchange names (responses base64), for routing.
fn sasl_user(mechanism: &str, responses: &[Vec<u8>]) -> Option<String> {
    use base64::Engine as _;
    let first = responses.first()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(first)
        .ok()?;
    super::modes::user_in_sasl(mechanism, &decoded)
}

/// `id-params-list = "(" *(string SP nstring) ")" / nil`
#[cfg(test)]
mod tests {
    use super::*;

    fn responder() -> Responder {
        Responder::new(
            vec!["IMAP4rev1".into(), "SASL-IR".into(), "AUTH=PLAIN".into()],
            8192,
        )
    }

    fn say(r: &mut Responder, c: &str) -> String {
        r.input(c.as_bytes());
        String::from_utf8_lossy(&r.take_output()).into_owned()
    }

    #[test]
    fn greeting_and_capability() {
        let mut r = responder();
        assert_eq!(
            &r.greeting()[..],
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] imapgate ready\r\n"
        );
        assert_eq!(
            say(&mut r, "a CAPABILITY\r\n"),
            "* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN\r\na OK Capabilities listed\r\n"
        );
        assert_eq!(say(&mut r, "b NOOP\r\n"), "b OK NOOP completed\r\n");
    }

    #[test]
    fn login_with_literals_gives_credentials_and_no_answer() {
        let mut r = responder();
        assert_eq!(
            say(&mut r, "a LOGIN {5}\r\n"),
            "+ Ready for literal data\r\n"
        );
        assert_eq!(say(&mut r, "alice {7}\r\n"), "+ Ready for literal data\r\n");
        assert_eq!(say(&mut r, "hunter2\r\n"), "");
        let c = r.take_credentials().expect("credentials");
        assert_eq!(c.tag, b"a");
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert!(matches!(c.secret, Secret::Login { ref password, .. } if password == b"hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"), "never shown: {c:?}");
    }

    #[test]
    fn authenticate_plain_with_and_without_initial_response() {
        let mut r = responder();
        // "\0alice\0pw"
        assert_eq!(say(&mut r, "a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n"), "");
        let c = r.take_credentials().expect("credentials");
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(say(&mut r, "b AUTHENTICATE plain\r\n"), "+ \r\n");
        assert_eq!(say(&mut r, "AGJvYgBwdw==\r\n"), "");
        let c = r.take_credentials().expect("credentials");
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert!(
            matches!(c.secret, Secret::Sasl { ref mechanism, ref responses } if mechanism == "PLAIN" && responses.len() == 1)
        );
    }

    #[test]
    fn authenticate_login_takes_two_responses() {
        let mut r = responder();
        assert_eq!(
            say(&mut r, "a AUTHENTICATE LOGIN\r\n"),
            "+ VXNlcm5hbWU6\r\n"
        );
        assert_eq!(say(&mut r, "Ym9i\r\n"), "+ UGFzc3dvcmQ6\r\n");
        assert_eq!(say(&mut r, "cHc=\r\n"), "");
        assert_eq!(
            r.take_credentials().and_then(|c| c.user).as_deref(),
            Some("bob")
        );
    }

    #[test]
    fn oauth_mechanisms_take_one_response_and_name_the_user() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let xoauth2 = b64("user=alice\x01auth=Bearer t0k3n\x01\x01");
        let bearer = b64("n,a=bob,\x01host=localhost\x01port=143\x01auth=Bearer t0k3n\x01\x01");
        let mut r = responder();
        assert_eq!(
            say(&mut r, &format!("a AUTHENTICATE XOAUTH2 {xoauth2}\r\n")),
            ""
        );
        let c = r.take_credentials().expect("credentials");
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(say(&mut r, "b AUTHENTICATE OAUTHBEARER\r\n"), "+ \r\n");
        assert_eq!(say(&mut r, &format!("{bearer}\r\n")), "");
        let c = r.take_credentials().expect("credentials");
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert!(
            matches!(c.secret, Secret::Sasl { ref mechanism, ref responses } if mechanism == "OAUTHBEARER" && responses == &[bearer.as_bytes()]),
        );
        assert!(!format!("{c:?}").contains("t0k3n"), "never shown: {c:?}");
    }

    #[test]
    fn cancel_and_unknown_mechanisms() {
        let mut r = responder();
        say(&mut r, "a AUTHENTICATE PLAIN\r\n");
        assert_eq!(say(&mut r, "*\r\n"), "a BAD Authentication cancelled\r\n");
        assert_eq!(
            say(&mut r, "b AUTHENTICATE SCRAM-SHA-256\r\n"),
            "b NO [CANNOT] Unsupported authentication mechanism\r\n"
        );
        assert!(r.take_credentials().is_none());
    }

    #[test]
    fn id_fields_are_kept_and_logout_ends() {
        let mut r = responder();
        let out = say(&mut r, "a ID (\"name\" \"mutt\" \"version\" NIL)\r\n");
        assert!(out.ends_with("a OK ID completed\r\n"), "{out}");
        assert_eq!(
            r.id_fields(),
            [
                (b"name".to_vec(), Some(b"mutt".to_vec())),
                (b"version".to_vec(), None)
            ]
        );
        assert_eq!(
            say(&mut r, "z LOGOUT\r\n"),
            "* BYE Logging out\r\nz OK Logout completed\r\n"
        );
        assert!(r.logged_out());
    }
}
