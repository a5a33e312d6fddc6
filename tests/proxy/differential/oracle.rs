//! An independent reading of what imapgate sent upstream, driven by the upstream's answers:
//! the relay's recording replayed in order through a model of an RFC 3501 server's reader.
//!
//! The model frames imapgate's upstream-bound bytes as a server does: lines (a bare LF ends a
//! line, as it does in Dovecot), the literals they announce (`{n}` `{n+}` `~{n}` `~{n+}`),
//! and the modes a server enters only when it says so with a `+`: a synchronizing literal's
//! data, IDLE's DONE line, AUTHENTICATE's SASL responses. A tagged NO/BAD instead of the `+`
//! ends the command, and the bytes after it are read as commands. Dovecot's responses are
//! framed and classified with imap-codec (see [`super::wire`]); each whole command the model
//! frames is also decoded with imap-codec where it can, and the two must agree on the tag.
//!
//! Findings:
//! - the upstream answered a tag that, in this reading, imapgate never sent as a command (the
//!   two read the bytes differently: exactly what imapgate's desync tripwire is for);
//! - the upstream sent a `+` that nothing was waiting for;
//! - imapgate sent bytes after a mode-switching line (a synchronizing literal, IDLE,
//!   AUTHENTICATE) before the upstream's `+` or tagged answer (the upstream may read them
//!   either way: imapgate must hold them);
//! - a canary reached the upstream as a command (imapgate judges every command, and every
//!   canary is refused when judged);
//! - a password or a SASL PLAIN blob reached the upstream before the client did TLS, in a
//!   login command of any spelling (`UID LOGIN`, an untagged `LOGIN`), a SASL response, or a
//!   base64 line of its own;
//! - STARTTLS or COMPRESS reached the upstream (imapgate answers both itself);
//! - the upstream answered a command while its non-synchronizing literal was still being
//!   read: Dovecot refuses some commands (literal8 before login, unknown commands, `UID` before
//!   a command without a UID form) without reading the literal they announce, and reads its
//!   bytes as commands. The model then does the same, so later answers still line up.

use std::time::Instant;

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;

use super::generate::Case;
use super::wire::{self, Kind, Resp};
use crate::support::tap::{Dir, Recording};

/// Something the recording shows that must not happen.
#[derive(Clone, Debug)]
pub struct Finding {
    /// A short class name, for the summary.
    pub class: &'static str,
    pub detail: String,
}

/// What the model read from the recording.
#[derive(Debug, Default)]
pub struct Reading {
    pub findings: Vec<Finding>,
    /// Successful LOGIN/AUTHENTICATE answers of the upstream: when, tag, command name.
    pub logins: Vec<(Instant, String, String)>,
}

pub const UNKNOWN_TAG: &str = "upstream answered a tag imapgate never sent as a command";
pub const UNASKED_PLUS: &str = "upstream sent a \"+\" nothing waited for";
pub const SENT_BEFORE_PLUS: &str = "imapgate sent bytes before the upstream's \"+\"";
pub const CANARY_UPSTREAM: &str = "a canary reached the upstream as a command";
pub const SECRET_BEFORE_TLS: &str = "a credential reached the upstream before TLS";
pub const FORWARDED: &str = "STARTTLS or COMPRESS reached the upstream";
pub const CODEC: &str = "imap-codec and the model disagree";
pub const LITERAL_UNREAD: &str =
    "upstream ended a command without reading its non-synchronizing literal";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Why {
    Literal(u64),
    Idle,
    Sasl,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    Line,
    Literal {
        left: u64,
        /// Whose literal, as the report names it (`a2's {5}`).
        owner: String,
        start: bool,
    },
    /// A `+` or the tagged answer of `tag` decides how the next bytes are read.
    Await {
        tag: String,
        why: Why,
        reported: bool,
    },
    DoneLine {
        tag: String,
    },
    SaslLine {
        tag: String,
    },
    /// COMPRESS was accepted upstream: the rest cannot be read.
    Opaque,
}

struct Model<'c> {
    case: &'c Case,
    buf: Vec<u8>,
    /// Position of `buf[0]` in the whole upstream-bound stream.
    offset: usize,
    /// How much of the upstream-bound stream was sent before the client's TLS began.
    before_tls: usize,
    mode: Mode,
    cur: Vec<u8>,
    /// Stream position where `cur` began.
    cur_start: usize,
    /// Where in `cur` the last non-synchronizing literal's data began: an upstream that ends
    /// the command there reads what follows as commands.
    cur_literal: Option<usize>,
    pending: Vec<(String, String)>,
    /// First words of lines imapgate sent that were not commands in this reading, and what
    /// they were, to explain an unknown tag.
    elsewhere: Vec<(String, String)>,
    /// Tags already reported for bytes sent before their `+` (one finding per command), with
    /// the index of that finding, so the upstream's eventual answer can be added to it.
    reported_early: Vec<(String, usize)>,
    /// Commands the upstream answered before their line end arrived (Dovecot acts on a CR).
    answered_early: Vec<String>,
    out: Reading,
}

/// Reads `rec` (one upstream connection) for `case`; `tls_at` is when the client's TLS began.
pub fn read(rec: &Recording, case: &Case, tls_at: Option<Instant>) -> Reading {
    let before_tls = rec
        .events
        .iter()
        .filter(|e| e.dir == Dir::ToUpstream && tls_at.is_none_or(|t| e.at < t))
        .map(|e| e.bytes.len())
        .sum();
    let mut m = Model {
        case,
        buf: Vec::new(),
        offset: 0,
        before_tls,
        mode: Mode::Line,
        cur: Vec::new(),
        cur_start: 0,
        cur_literal: None,
        pending: Vec::new(),
        elsewhere: Vec::new(),
        reported_early: Vec::new(),
        answered_early: Vec::new(),
        out: Reading::default(),
    };
    let mut from_server = Vec::new();
    for ev in &rec.events {
        match ev.dir {
            Dir::ToUpstream => {
                m.buf.extend_from_slice(&ev.bytes);
                m.advance();
            }
            Dir::ToClient => {
                from_server.extend_from_slice(&ev.bytes);
                for resp in wire::take_responses(&mut from_server) {
                    m.response(&resp, ev.at);
                }
            }
        }
    }
    m.out
}

impl Model<'_> {
    fn find(&mut self, class: &'static str, detail: String) {
        self.out.findings.push(Finding { class, detail });
    }

    fn advance(&mut self) {
        loop {
            match &mut self.mode {
                Mode::Opaque => {
                    self.buf.clear();
                    return;
                }
                Mode::Await { tag, why, reported } => {
                    if !self.buf.is_empty()
                        && !*reported
                        && !self.reported_early.iter().any(|(t, _)| t == tag)
                    {
                        *reported = true;
                        let index = self.out.findings.len();
                        self.reported_early.push((tag.clone(), index));
                        let what = match why {
                            Why::Literal(n) => format!("{tag}'s synchronizing literal {{{n}}}"),
                            Why::Idle => format!("{tag} IDLE"),
                            Why::Sasl => format!("{tag} AUTHENTICATE"),
                        };
                        let detail = format!(
                            "after {what}, before any \"+\" or tagged answer: {}",
                            wire::escape_short(&self.buf, 160)
                        );
                        self.find(SENT_BEFORE_PLUS, detail);
                    }
                    return;
                }
                Mode::Literal { left, owner, start } => {
                    if *left == 0 {
                        self.mode = Mode::Line;
                        continue;
                    }
                    if self.buf.is_empty() {
                        return;
                    }
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(self.buf.len());
                    let data: Vec<u8> = self.buf.drain(..n).collect();
                    self.offset += n;
                    if *start {
                        *start = false;
                        let word = String::from_utf8_lossy(wire::first_word(&data)).into_owned();
                        let what = format!("literal data of {owner}");
                        self.elsewhere.push((word, what));
                    }
                    *left -= n as u64;
                    self.cur.extend_from_slice(&data);
                }
                Mode::Line | Mode::DoneLine { .. } | Mode::SaslLine { .. } => {
                    let Some(lf) = self.buf.iter().position(|&b| b == b'\n') else {
                        return;
                    };
                    let line_start = self.offset;
                    let line: Vec<u8> = self.buf.drain(..=lf).collect();
                    self.offset += line.len();
                    let word = String::from_utf8_lossy(wire::first_word(&line)).into_owned();
                    match std::mem::replace(&mut self.mode, Mode::Line) {
                        Mode::DoneLine { tag } => {
                            // IDLE stays pending until its tagged answer.
                            self.elsewhere
                                .push((word, format!("the DONE line of {tag} IDLE")));
                        }
                        Mode::SaslLine { tag } => {
                            self.credentials(&line, line_start, "a SASL response");
                            self.elsewhere
                                .push((word, format!("a SASL response of {tag} AUTHENTICATE")));
                            self.mode = Mode::Await {
                                tag,
                                why: Why::Sasl,
                                reported: false,
                            };
                        }
                        _ => {
                            if self.cur.is_empty() {
                                self.cur_start = line_start;
                            }
                            self.cur.extend_from_slice(&line);
                            if let Some(lit) = wire::announced(wire::strip_eol(&line)) {
                                let tag = String::from_utf8_lossy(wire::first_word(&self.cur))
                                    .into_owned();
                                self.mode = if lit.sync {
                                    Mode::Await {
                                        tag,
                                        why: Why::Literal(lit.len),
                                        reported: false,
                                    }
                                } else {
                                    if self.cur_literal.is_none() {
                                        self.cur_literal = Some(self.cur.len());
                                    }
                                    let tilde = if lit.binary { "~" } else { "" };
                                    Mode::Literal {
                                        left: lit.len,
                                        owner: format!(
                                            "{tag} (non-synchronizing {tilde}{{{}+}})",
                                            lit.len
                                        ),
                                        start: true,
                                    }
                                };
                                continue;
                            }
                            let command = std::mem::take(&mut self.cur);
                            self.cur_literal = None;
                            let start = self.cur_start;
                            self.command(&command, start);
                        }
                    }
                }
            }
        }
    }

    /// A whole command as the model framed it.
    fn command(&mut self, bytes: &[u8], start: usize) {
        let first_line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
        let first_line = wire::strip_eol(first_line);
        let mut words = first_line.split(|&b| b == b' ');
        let tag = String::from_utf8_lossy(words.next().unwrap_or_default()).into_owned();
        let mut name = String::from_utf8_lossy(words.next().unwrap_or_default()).to_uppercase();
        if name == "UID" {
            let sub = String::from_utf8_lossy(words.next().unwrap_or_default()).to_uppercase();
            name = format!("UID {sub}");
        }
        let login = |w: &str| {
            let w = w.to_uppercase();
            w.contains("LOGIN") || w.contains("AUTHENTICATE")
        };
        if login(&tag) || login(&name) {
            self.credentials(bytes, start, "a login command");
        } else if self
            .case
            .secrets
            .iter()
            .any(|(_, s)| s.as_slice() == tag.as_bytes())
        {
            self.credentials(bytes, start, "a line of its own");
        }
        if tag.is_empty() {
            return;
        }
        let decoded = std::panic::catch_unwind(|| {
            CommandCodec::default()
                .decode(bytes)
                .ok()
                .filter(|(rest, _)| rest.is_empty())
                .map(|(_, c)| c.tag.as_ref().to_string())
        });
        if let Ok(Some(codec_tag)) = decoded
            && codec_tag != tag
        {
            self.find(
                CODEC,
                format!(
                    "imap-codec reads tag {codec_tag:?}, the model {tag:?}, in {}",
                    wire::escape_short(bytes, 160)
                ),
            );
        }
        if self.case.is_canary(&tag) {
            self.find(
                CANARY_UPSTREAM,
                format!(
                    "canary {tag} sent upstream: {}",
                    wire::escape_short(bytes, 160)
                ),
            );
        }
        match name.as_str() {
            "IDLE" => {
                self.mode = Mode::Await {
                    tag: tag.clone(),
                    why: Why::Idle,
                    reported: false,
                }
            }
            "AUTHENTICATE" => {
                self.mode = Mode::Await {
                    tag: tag.clone(),
                    why: Why::Sasl,
                    reported: false,
                }
            }
            "STARTTLS" | "COMPRESS" => self.find(
                FORWARDED,
                format!(
                    "{tag} {name} sent upstream: {}",
                    wire::escape_short(bytes, 120)
                ),
            ),
            _ => {}
        }
        if let Some(i) = self.answered_early.iter().position(|t| *t == tag) {
            self.answered_early.remove(i);
            return;
        }
        self.pending.push((tag, name));
    }

    /// Whether the command being read (its line end not yet here) has `tag` and a CR: after
    /// login Dovecot ends a command at a CR (and skips the rest of the line up to the LF), so
    /// its answer may come before the LF.
    fn reading_with_cr(&self, tag: &str) -> bool {
        if !matches!(self.mode, Mode::Line) {
            return false;
        }
        let mut partial = self.cur.clone();
        partial.extend_from_slice(&self.buf);
        wire::first_word(&partial) == tag.as_bytes() && partial.contains(&b'\r')
    }

    fn response(&mut self, resp: &Resp, at: Instant) {
        if let Some(d) = &resp.disagreement {
            self.find(
                CODEC,
                format!("{d}: {}", wire::escape_short(&resp.raw, 160)),
            );
        }
        match &resp.kind {
            Kind::Untagged => {}
            Kind::Continuation => match std::mem::replace(&mut self.mode, Mode::Line) {
                Mode::Await { tag, why, .. } => {
                    self.resolve_early(
                        &tag,
                        "then the upstream sent \"+\": it read them as what the mode expects",
                    );
                    self.mode = match why {
                        Why::Literal(n) => Mode::Literal {
                            left: n,
                            owner: tag,
                            start: true,
                        },
                        Why::Idle => Mode::DoneLine { tag },
                        Why::Sasl => Mode::SaslLine { tag },
                    }
                }
                other => {
                    let state = describe(&other);
                    self.mode = other;
                    self.find(
                        UNASKED_PLUS,
                        format!(
                            "{} while the model {state}",
                            wire::escape_short(&resp.raw, 80)
                        ),
                    );
                }
            },
            Kind::Tagged { tag, status } => {
                if let Some(i) = self.pending.iter().position(|(t, _)| t == tag) {
                    let (_, name) = self.pending.remove(i);
                    if status == "OK" && (name == "LOGIN" || name == "AUTHENTICATE") {
                        self.out.logins.push((at, tag.clone(), name.clone()));
                    }
                    if matches!(&self.mode, Mode::Await { tag: t, .. } if t == tag) {
                        let how = format!(
                            "then the upstream answered {} instead of \"+\": it read the \
                             bytes after it as commands",
                            wire::escape_short(&resp.raw, 100)
                        );
                        self.resolve_early(tag, &how);
                    }
                    let ends_mode = match &self.mode {
                        Mode::Await { tag: t, .. }
                        | Mode::DoneLine { tag: t }
                        | Mode::SaslLine { tag: t } => t == tag,
                        _ => false,
                    };
                    if status == "OK" && name == "COMPRESS" {
                        self.mode = Mode::Opaque;
                    } else if ends_mode {
                        self.mode = Mode::Line;
                    }
                } else if let Some(at) = self
                    .cur_literal
                    .filter(|_| wire::first_word(&self.cur) == tag.as_bytes())
                {
                    // Ended before its literal was read: what followed the announcement is
                    // read again, as commands.
                    let rest = self.cur.split_off(at);
                    let announced =
                        String::from_utf8_lossy(wire::strip_eol(&self.cur)).into_owned();
                    self.find(
                        LITERAL_UNREAD,
                        format!(
                            "{} answered {}: the bytes after it are read as commands",
                            wire::escape_short(announced.as_bytes(), 100),
                            wire::escape_short(&resp.raw, 100)
                        ),
                    );
                    self.offset -= rest.len();
                    let mut buf = rest;
                    buf.extend_from_slice(&self.buf);
                    self.buf = buf;
                    self.cur.clear();
                    self.cur_literal = None;
                    self.mode = Mode::Line;
                } else if self.reading_with_cr(tag) {
                    self.answered_early.push(tag.clone());
                } else if matches!(&self.mode, Mode::Await { tag: t, why: Why::Literal(_), .. } if t == tag)
                {
                    // Refused before its "+": the command ends; later bytes are commands.
                    let how = format!(
                        "then the upstream answered {} instead of \"+\": it read the literal's \
                         bytes as commands",
                        wire::escape_short(&resp.raw, 100)
                    );
                    self.resolve_early(tag, &how);
                    self.cur.clear();
                    self.cur_literal = None;
                    self.mode = Mode::Line;
                } else {
                    let sent_as: Vec<&str> = self
                        .elsewhere
                        .iter()
                        .filter(|(w, _)| w == tag)
                        .map(|(_, what)| what.as_str())
                        .collect();
                    let how = if sent_as.is_empty() {
                        "no line imapgate sent starts with it".to_string()
                    } else {
                        format!("imapgate sent it as {}", sent_as.join(", then as "))
                    };
                    self.find(
                        UNKNOWN_TAG,
                        format!("{} ({how})", wire::escape_short(&resp.raw, 160)),
                    );
                }
            }
        }
        self.advance();
    }

    /// Adds how the upstream settled a mode to the finding about bytes sent before it did.
    fn resolve_early(&mut self, tag: &str, how: &str) {
        if let Some(&(_, i)) = self.reported_early.iter().find(|(t, _)| t == tag)
            && let Some(f) = self.out.findings.get_mut(i)
            && !f.detail.contains("; then the upstream")
        {
            f.detail.push_str("; ");
            f.detail.push_str(how);
        }
    }

    /// A credential-bearing message (a login command in any spelling, a SASL response, a
    /// bare base64 line) that began before the client's TLS must not carry a secret.
    fn credentials(&mut self, bytes: &[u8], start: usize, what: &str) {
        if start >= self.before_tls {
            return;
        }
        let found: Vec<String> = self
            .case
            .secrets
            .iter()
            .filter(|(_, secret)| bytes.windows(secret.len()).any(|w| w == secret.as_slice()))
            .map(|(name, _)| name.clone())
            .collect();
        if !found.is_empty() {
            let detail = format!(
                "{} in {what} sent upstream before the client's TLS: {}",
                found.join(", "),
                wire::escape_short(bytes, 160)
            );
            self.find(SECRET_BEFORE_TLS, detail);
        }
    }
}

fn describe(mode: &Mode) -> String {
    match mode {
        Mode::Line => "waited for nothing (reading commands)".into(),
        Mode::Literal { owner, .. } => format!("was reading literal data of {owner}"),
        Mode::Await { tag, .. } => format!("waited for {tag}'s \"+\""),
        Mode::DoneLine { tag } => format!("expected {tag}'s DONE line"),
        Mode::SaslLine { tag } => format!("expected a SASL response for {tag}"),
        Mode::Opaque => "had stopped reading (COMPRESS)".into(),
    }
}

/// The recording as a transcript: `C:` what imapgate sent upstream, `S:` what the upstream
/// answered, line by line, with milliseconds since the connection began.
pub fn transcript(rec: &Recording, indent: &str, max_line: usize) -> String {
    let Some(t0) = rec.events.first().map(|e| e.at) else {
        return format!("{indent}(nothing recorded)\n");
    };
    let mut out = String::new();
    let mut i = 0;
    while i < rec.events.len() {
        let dir = rec.events[i].dir;
        let at = rec.events[i].at;
        let mut bytes = Vec::new();
        let mut eof = None;
        while i < rec.events.len() && rec.events[i].dir == dir {
            bytes.extend_from_slice(&rec.events[i].bytes);
            if rec.events[i].eof {
                eof = Some(rec.events[i].error.clone());
            }
            i += 1;
        }
        let who = match dir {
            Dir::ToUpstream => "C",
            Dir::ToClient => "S",
        };
        let ms = at.duration_since(t0).as_millis();
        let prefix = format!("{indent}{ms:>5}ms {who}: ");
        let mut first = true;
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            if first {
                out.push_str(&prefix);
                first = false;
            } else {
                out.push_str(&format!("{indent}          "));
            }
            out.push_str(&wire::escape_short(line, max_line));
            out.push('\n');
        }
        match eof {
            Some(None) => out.push_str(&format!("{prefix}(end)\n")),
            Some(Some(e)) => out.push_str(&format!("{prefix}(ended: {e})\n")),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};

    use super::super::generate::{Canary, Frag, Listener, Phase};
    use super::*;
    use crate::support::tap::Chunk;

    fn case(canaries: &[&str], secrets: &[&str]) -> Case {
        Case {
            index: 0,
            seed: 0,
            listener: Listener::Starttls,
            frag: Frag::Whole,
            phase: Phase::PlainPreAuth,
            setup: Vec::new(),
            items: Vec::new(),
            kinds: Vec::new(),
            steps: Vec::new(),
            command_tags: BTreeSet::new(),
            canaries: canaries
                .iter()
                .map(|t| Canary {
                    tag: t.to_string(),
                    line: Vec::new(),
                    position: String::new(),
                })
                .collect(),
            secrets: secrets
                .iter()
                .map(|s| (format!("secret {s}"), s.as_bytes().to_vec()))
                .collect(),
        }
    }

    /// A recording from `C:` (imapgate to the upstream) and `S:` lines, 1 ms apart.
    fn recording(lines: &[&str]) -> (Recording, Instant) {
        let t0 = Instant::now();
        let events = lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (dir, text) = match l.split_at(3) {
                    ("C: ", t) => (Dir::ToUpstream, t),
                    ("S: ", t) => (Dir::ToClient, t),
                    _ => panic!("C: or S: expected: {l}"),
                };
                Chunk {
                    at: t0 + Duration::from_millis(i as u64),
                    dir,
                    bytes: text.as_bytes().to_vec(),
                    eof: false,
                    error: None,
                }
            })
            .collect();
        let rec = Recording {
            client: "127.0.0.1:1".parse().unwrap(),
            upstream_local: None,
            events,
            closed: true,
            connect_error: None,
        };
        (rec, t0)
    }

    fn classes(r: &Reading) -> Vec<&'static str> {
        r.findings.iter().map(|f| f.class).collect()
    }

    #[test]
    fn honest_literal_and_idle_read_cleanly() {
        let (rec, _) = recording(&[
            "S: * OK ready\r\n",
            "C: a APPEND INBOX {3}\r\n",
            "S: + OK\r\n",
            "C: abc\r\n",
            "S: a OK done\r\n",
            "C: b IDLE\r\n",
            "S: + idling\r\n",
            "C: DONE\r\n",
            "S: b OK idle done\r\n",
        ]);
        let r = read(&rec, &case(&[], &[]), None);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
    }

    #[test]
    fn a_refused_literal_sent_anyway_is_read_as_commands() {
        // Finding 3: the data went upstream before the "+", and after the NO the upstream
        // ran it as a command.
        let (rec, _) = recording(&[
            "S: * OK ready\r\n",
            "C: a APPEND Jail/Missing {28}\r\nc1 CREATE Outside/canary-1\r\n\r\n",
            "S: a NO [TRYCREATE] no such mailbox\r\n",
            "S: c1 OK Create completed\r\n",
        ]);
        let r = read(&rec, &case(&["c1"], &[]), None);
        assert_eq!(classes(&r), [SENT_BEFORE_PLUS, CANARY_UPSTREAM], "{r:?}");
    }

    #[test]
    fn an_answer_to_literal_data_is_an_unknown_tag() {
        // Finding 1's literal8 form: Dovecot refuses ~{n+} before login and reads the data.
        let (rec, _) = recording(&[
            "S: * OK ready\r\n",
            "C: a NOOP ~{24+}\r\nc1 CREATE canary-154-1\r\n x\r\n",
            "S: a BAD literal8 not allowed here\r\n",
            "S: c1 BAD Error in IMAP command received by server.\r\n",
        ]);
        let r = read(&rec, &case(&["c1"], &[]), None);
        assert_eq!(classes(&r), [UNKNOWN_TAG], "{r:?}");
        assert!(r.findings[0].detail.contains("literal data of a"), "{r:?}");
    }

    #[test]
    fn a_line_taken_as_done_is_not_a_command() {
        let (rec, _) = recording(&[
            "S: * OK ready\r\n",
            "C: a IDLE\r\n",
            "S: + idling\r\n",
            "C: c1 LOGIN victim pw\r\n",
            "S: a BAD Expected DONE.\r\n",
            "S: c1 OK Logged in\r\n",
        ]);
        let r = read(&rec, &case(&["c1"], &["pw"]), None);
        assert_eq!(classes(&r), [UNKNOWN_TAG], "{r:?}");
        assert!(
            r.findings[0].detail.contains("DONE line of a IDLE"),
            "{r:?}"
        );
    }

    #[test]
    fn an_answer_at_the_cr_before_the_lf_is_not_unknown() {
        let (rec, _) = recording(&[
            "S: * OK ready\r\n",
            "C: z1 LOGOUT\r",
            "S: * BYE Logging out\r\nz1 OK Logout completed.\r\n",
            "C: \n",
        ]);
        let r = read(&rec, &case(&[], &[]), None);
        assert!(r.findings.is_empty(), "{r:?}");
    }

    #[test]
    fn a_command_refused_before_its_nonsync_literal_is_read_again() {
        // Dovecot refuses UID SEARCH with a literal8 at once; what imapgate sent after the
        // announcement is read as commands.
        let (rec, _) = recording(&[
            "S: * OK ready\r\n",
            "C: a5 UID SEARCH TEXT ~{32+}\r\n",
            "S: a5 BAD literal8 not allowed here\r\n",
            "C: a6 IDLE\r\n",
            "S: + idling\r\n",
            "C: DONE\r\n",
            "S: a6 OK Idle completed\r\n",
        ]);
        let r = read(&rec, &case(&[], &[]), None);
        assert_eq!(classes(&r), [LITERAL_UNREAD], "{r:?}");
    }

    #[test]
    fn an_unasked_continuation_is_found() {
        let (rec, _) = recording(&["S: * OK ready\r\n", "C: a NOOP\r\n", "S: + OK\r\n"]);
        let r = read(&rec, &case(&[], &[]), None);
        assert_eq!(classes(&r), [UNASKED_PLUS], "{r:?}");
    }

    #[test]
    fn credentials_count_only_before_tls_and_in_login_commands() {
        let lines = [
            "S: * OK ready\r\n",
            "C: a ID (\"x\" \"pw\")\r\n",
            "C: b UID LOGIN victim pw\r\n",
            "S: a OK\r\n",
            "S: b BAD\r\n",
        ];
        let (rec, t0) = recording(&lines);
        let r = read(&rec, &case(&[], &["pw"]), None);
        assert_eq!(classes(&r), [SECRET_BEFORE_TLS], "{r:?}");
        assert!(r.findings[0].detail.contains("UID LOGIN"), "{r:?}");
        let r = read(&rec, &case(&[], &["pw"]), Some(t0));
        assert!(r.findings.is_empty(), "{r:?}");
    }

    #[test]
    fn logins_are_noted_with_their_time() {
        let (rec, t0) = recording(&[
            "S: * OK ready\r\n",
            "C: a LOGIN u p\r\n",
            "S: a OK [CAPABILITY IMAP4rev1] Logged in\r\n",
        ]);
        let r = read(&rec, &case(&[], &[]), None);
        assert_eq!(r.logins.len(), 1);
        assert_eq!(r.logins[0].0, t0 + Duration::from_millis(2));
    }
}
