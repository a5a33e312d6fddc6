//! The seeded generator of adversarial client pipelines.
//!
//! A case is `(seed, index)` → one client connection: a listener (the plaintext STARTTLS one or
//! the implicit-TLS one), an honest setup that reaches a known state (optionally STARTTLS, a
//! login, a SELECT, each awaited), then an attack section of 1 to 4 items, then `LOGOUT`.
//! The attack section is written without waiting except where an item is "honest" (it waits
//! for the `+` or the tagged answer like a well-behaved client), so the blind items are one
//! pipeline: written all at once, split at random byte positions, or one byte at a time.
//!
//! Items: mode-switching commands (IDLE, AUTHENTICATE with and without SASL-IR, STARTTLS,
//! LOGIN, SELECT, ENABLE, COMPRESS, and their `UID` forms) followed blind by hidden lines or
//! honestly by their continuation; commands carrying literals of every kind (`{n}` `{n+}`
//! `~{n}` `~{n+}`, zero-length, in the middle or at the end, in known, unknown and
//! wrong-state commands, APPEND to a missing mailbox that Dovecot refuses with TRYCREATE before
//! its `+`), sent blind or honestly; `UID` prefixes on non-UID commands; junk lines, long and
//! over-long lines, bare LF, NUL, and DONE / `*` / `+` / base64 lines outside their mode; and
//! plain commands valid or not in the state.
//!
//! Every place the client's bytes must not be read as a command (every literal body, every
//! line after a mode switch, every SASL and DONE position, the rest of a bare-LF line) carries
//! a canary: a command that imapgate refuses whenever it judges it as a command, so it must
//! never have an effect on the server: `cN LOGIN victimW ...` (or AUTHENTICATE PLAIN of the
//! victim) before TLS, `cN CREATE Outside/canary-...` (outside the namespace jail) otherwise.

use std::collections::BTreeSet;

/// splitmix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// An index into `weights`, chosen with probability proportional to its weight.
    pub fn weighted(&mut self, weights: &[usize]) -> usize {
        let total: usize = weights.iter().sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// The seed of case `index` in a run with `seed`: every case can be generated (and replayed)
/// on its own.
pub fn case_seed(seed: u64, index: u64) -> u64 {
    let mut r = Rng::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next_u64()
}

/// The accounts a worker's cases use.
#[derive(Clone, Debug)]
pub struct Accounts {
    /// The case's own user: legitimate logins (over TLS only).
    pub user: String,
    pub pass: String,
    /// Only ever named by canaries: a login of this user is a canary that ran.
    pub victim: String,
    pub victim_pass: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Plaintext, STARTTLS offered (`imap` in the test config).
    Starttls,
    /// TLS from the first byte (`imaps`).
    Implicit,
}

/// How the client's bytes are cut into writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    /// Each run of bytes sent without waiting is one write.
    Whole,
    /// Split at random byte positions.
    Random,
    /// One byte per write (the first 2 KiB of each run; then 4 KiB writes).
    OneByte,
}

/// The IMAP state the honest setup reached, where the attack section starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    PlainPreAuth,
    TlsPreAuth,
    Authenticated,
    Selected,
}

/// What the client does, in order.
#[derive(Clone, Debug)]
pub enum Step {
    /// Writes `bytes`, cut before each offset in `cuts`.
    Send { bytes: Vec<u8>, cuts: Vec<usize> },
    /// Waits for the tagged answer of `tag` (honest setup).
    AwaitTagged { tag: String },
    /// `tag STARTTLS`, its answer, and the TLS handshake if it is OK.
    StartTls { tag: String },
    /// Waits for a `+` that arrives after the last write began, or for the tagged answer of
    /// `tag`: with a `+`, goes on with `then`; otherwise skips it (an honest client does not
    /// send a literal, a SASL response or DONE that nobody asked for).
    AwaitContinuation { tag: String, then: Vec<Step> },
    /// Waits for the tagged answer of the final LOGOUT or for the end of the connection.
    AwaitEnd { tag: String },
}

/// A command hidden where it must never be executed.
#[derive(Clone, Debug)]
pub struct Canary {
    pub tag: String,
    pub line: Vec<u8>,
    /// Where it is hidden, for the report.
    pub position: String,
}

/// One generated client connection.
#[derive(Clone, Debug)]
pub struct Case {
    pub index: u64,
    pub seed: u64,
    pub listener: Listener,
    pub frag: Frag,
    pub phase: Phase,
    /// The honest setup, described.
    pub setup: Vec<String>,
    /// The attack items, described (`kind: detail`).
    pub items: Vec<String>,
    /// The item kinds, for the summary.
    pub kinds: Vec<&'static str>,
    pub steps: Vec<Step>,
    /// Tags the client sent at a command position.
    pub command_tags: BTreeSet<String>,
    pub canaries: Vec<Canary>,
    /// Strings that must not reach the upstream before the client did TLS (passwords and
    /// SASL PLAIN blobs), with a name for the report.
    pub secrets: Vec<(String, Vec<u8>)>,
}

impl Case {
    pub fn is_canary(&self, tag: &str) -> bool {
        self.canaries.iter().any(|c| c.tag == tag)
    }

    /// Every byte the client meant to send (honest continuations included), for the report.
    pub fn script(&self) -> Vec<(String, Vec<u8>)> {
        fn walk(steps: &[Step], depth: usize, out: &mut Vec<(String, Vec<u8>)>) {
            let pad = "  ".repeat(depth);
            for s in steps {
                match s {
                    Step::Send { bytes, .. } => out.push((format!("{pad}send"), bytes.clone())),
                    Step::AwaitTagged { tag } => {
                        out.push((format!("{pad}wait for the answer to {tag}"), Vec::new()))
                    }
                    Step::StartTls { tag } => out.push((
                        format!("{pad}STARTTLS ({tag}), wait, TLS handshake"),
                        Vec::new(),
                    )),
                    Step::AwaitContinuation { tag, then } => {
                        out.push((
                            format!("{pad}wait for \"+\" (or the answer to {tag}); on \"+\":"),
                            Vec::new(),
                        ));
                        walk(then, depth + 1, out);
                    }
                    Step::AwaitEnd { tag } => out.push((
                        format!("{pad}wait for the answer to {tag} or the end"),
                        Vec::new(),
                    )),
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.steps, 0, &mut out);
        out
    }
}

/// Builds case `index` of the run with `seed`.
pub fn case(seed: u64, index: u64, acc: &Accounts) -> Case {
    let mut g = Gen::new(seed, index, acc);
    g.build();
    g.finish()
}

struct Gen<'a> {
    rng: Rng,
    acc: &'a Accounts,
    index: u64,
    seed: u64,
    listener: Listener,
    frag: Frag,
    tls: bool,
    phase: Phase,
    next_tag: u32,
    next_canary: u32,
    next_name: u32,
    /// Blind bytes not yet turned into a [`Step::Send`].
    pending: Vec<u8>,
    /// Tags of commands sent blind since the client last waited for every answer.
    unanswered: Vec<String>,
    steps: Vec<Step>,
    setup: Vec<String>,
    items: Vec<String>,
    kinds: Vec<&'static str>,
    command_tags: BTreeSet<String>,
    canaries: Vec<Canary>,
    secrets: Vec<(String, Vec<u8>)>,
}

const MODE_SWITCHES: &[&str] = &[
    "IDLE",
    "UID IDLE",
    "AUTHENTICATE PLAIN",
    "AUTHENTICATE LOGIN",
    "AUTHENTICATE PLAIN =",
    "AUTHENTICATE PLAIN @IR@",
    "AUTHENTICATE XUNKNOWN",
    "UID AUTHENTICATE PLAIN",
    "UID AUTHENTICATE PLAIN @VIR@",
    "STARTTLS",
    "UID STARTTLS",
    "COMPRESS DEFLATE",
    "UID COMPRESS DEFLATE",
    "ENABLE CONDSTORE",
    "ENABLE UTF8=ACCEPT",
    "ENABLE QRESYNC",
    "SELECT INBOX",
    "EXAMINE INBOX",
    "SELECT @MISSING@",
    "UNSELECT",
    "CLOSE",
    "LOGIN @USER@ @PASS@",
    "IDLE extra",
];

impl<'a> Gen<'a> {
    fn new(seed: u64, index: u64, acc: &'a Accounts) -> Gen<'a> {
        let cs = case_seed(seed, index);
        let mut rng = Rng::new(cs);
        let listener = if rng.chance(55) {
            Listener::Starttls
        } else {
            Listener::Implicit
        };
        let frag = match rng.weighted(&[35, 45, 20]) {
            0 => Frag::Whole,
            1 => Frag::Random,
            _ => Frag::OneByte,
        };
        let tls = listener == Listener::Implicit;
        let mut g = Gen {
            rng,
            acc,
            index,
            seed: cs,
            listener,
            frag,
            tls,
            phase: if tls {
                Phase::TlsPreAuth
            } else {
                Phase::PlainPreAuth
            },
            next_tag: 0,
            next_canary: 0,
            next_name: 0,
            pending: Vec::new(),
            unanswered: Vec::new(),
            steps: Vec::new(),
            setup: Vec::new(),
            items: Vec::new(),
            kinds: Vec::new(),
            command_tags: BTreeSet::new(),
            canaries: Vec::new(),
            secrets: Vec::new(),
        };
        for (name, secret) in [
            (format!("{}'s password", acc.user), acc.pass.clone()),
            (
                format!("{}'s password", acc.victim),
                acc.victim_pass.clone(),
            ),
        ] {
            g.secrets.push((name, secret.into_bytes()));
        }
        g
    }

    fn finish(self) -> Case {
        Case {
            index: self.index,
            seed: self.seed,
            listener: self.listener,
            frag: self.frag,
            phase: self.phase,
            setup: self.setup,
            items: self.items,
            kinds: self.kinds,
            steps: self.steps,
            command_tags: self.command_tags,
            canaries: self.canaries,
            secrets: self.secrets,
        }
    }

    // ----- building blocks -----

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        let t = format!("a{}", self.next_tag);
        self.command_tags.insert(t.clone());
        t
    }

    /// `bytes` go out blind; a command among them tagged `tag` awaits an answer.
    fn blind_command(&mut self, tag: &str, bytes: &[u8]) {
        if super::wire::first_word(bytes) == tag.as_bytes() {
            self.unanswered.push(tag.to_string());
        }
        self.blind(bytes);
    }

    /// An honest client does not start a mode switch while earlier commands may still claim a
    /// `+`: it sends what it has and waits for every answer first.
    fn quiesce(&mut self) {
        self.flush();
        for tag in std::mem::take(&mut self.unanswered) {
            self.steps.push(Step::AwaitTagged { tag });
        }
    }

    /// A unique mailbox name component for this case.
    fn name(&mut self, stem: &str) -> String {
        self.next_name += 1;
        format!("{stem}-{}-{}", self.index, self.next_name)
    }

    fn missing_mailbox(&mut self) -> String {
        let n = self.name("Missing");
        format!("INBOX.{n}")
    }

    /// `\0user\0pass` in base64, remembered as a secret.
    fn plain_blob(&mut self, user: &str, pass: &str) -> String {
        let blob = base64(format!("\0{user}\0{pass}").as_bytes());
        if !self.secrets.iter().any(|(_, s)| *s == blob.as_bytes()) {
            self.secrets
                .push((format!("SASL PLAIN of {user}"), blob.clone().into_bytes()));
        }
        blob
    }

    /// A canary line (CRLF included) for `position`: before TLS a login of the victim
    /// (refused by require_tls when judged), otherwise a CREATE outside the jail (refused by
    /// the namespace policy when judged, and not valid before login anyway).
    fn canary(&mut self, position: &str) -> Vec<u8> {
        self.next_canary += 1;
        let tag = format!("c{}", self.next_canary);
        let line = if self.tls {
            let name = if self.rng.chance(70) {
                format!("Outside/canary-{}-{}", self.index, self.next_canary)
            } else {
                format!("canary-{}-{}", self.index, self.next_canary)
            };
            format!("{tag} CREATE {name}\r\n")
        } else {
            let (victim, pass) = (self.acc.victim.clone(), self.acc.victim_pass.clone());
            match self.rng.weighted(&[45, 20, 15, 20]) {
                0 => format!("{tag} LOGIN {victim} {pass}\r\n"),
                1 => format!("{tag} LOGIN \"{victim}\" \"{pass}\"\r\n"),
                2 => {
                    let blob = self.plain_blob(&victim, &pass);
                    format!("{tag} AUTHENTICATE PLAIN {blob}\r\n")
                }
                _ => format!(
                    "{tag} CREATE Outside/canary-{}-{}\r\n",
                    self.index, self.next_canary
                ),
            }
        };
        let line = line.into_bytes();
        self.canaries.push(Canary {
            tag,
            line: line.clone(),
            position: position.to_string(),
        });
        line
    }

    fn blind(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// Turns the blind bytes so far into one [`Step::Send`] (cut as the case says).
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.pending);
        let step = self.send(bytes);
        self.steps.push(step);
    }

    fn send(&mut self, bytes: Vec<u8>) -> Step {
        let cuts = match self.frag {
            Frag::Whole => Vec::new(),
            Frag::OneByte => {
                let mut cuts: Vec<usize> = (1..bytes.len().min(2048)).collect();
                let mut at = 2048;
                while at < bytes.len() {
                    cuts.push(at);
                    at += 4096;
                }
                cuts
            }
            Frag::Random => {
                let n = bytes.len();
                if n < 2 {
                    Vec::new()
                } else {
                    let k = self.rng.range(1, (n - 1).min(12));
                    let mut cuts: Vec<usize> = (0..k).map(|_| self.rng.range(1, n - 1)).collect();
                    cuts.sort_unstable();
                    cuts.dedup();
                    cuts
                }
            }
        };
        Step::Send { bytes, cuts }
    }

    /// Steps that are sent only after a `+` (kept out of the blind run).
    fn sub_send(&mut self, bytes: Vec<u8>) -> Vec<Step> {
        vec![self.send(bytes)]
    }

    fn item(&mut self, kind: &'static str, detail: String) {
        self.kinds.push(kind);
        self.items.push(format!("{kind}: {detail}"));
    }

    // ----- the case -----

    fn build(&mut self) {
        self.honest_setup();
        self.unanswered.clear();
        let n = self.rng.range(1, 4);
        for _ in 0..n {
            match self.rng.weighted(&[24, 10, 30, 8, 16, 12]) {
                0 => self.mode_switch_blind(),
                1 => self.mode_switch_honest(),
                2 => self.literal_item(),
                3 => self.uid_prefix(),
                4 => self.junk(),
                _ => self.plain_command(),
            }
        }
        let tag = "z1".to_string();
        self.command_tags.insert(tag.clone());
        self.blind(format!("{tag} LOGOUT\r\n").as_bytes());
        self.flush();
        self.steps.push(Step::AwaitEnd { tag });
    }

    fn honest_setup(&mut self) {
        if self.listener == Listener::Starttls && self.rng.chance(45) {
            let tag = self.tag();
            self.steps.push(Step::StartTls { tag });
            self.setup.push("STARTTLS".into());
            self.tls = true;
            self.phase = Phase::TlsPreAuth;
        }
        if !self.tls || !self.rng.chance(65) {
            return;
        }
        let (user, pass) = (self.acc.user.clone(), self.acc.pass.clone());
        let tag = self.tag();
        match self.rng.below(4) {
            0 => {
                let line = format!("{tag} LOGIN {user} {pass}\r\n");
                let step = self.send(line.into_bytes());
                self.steps.push(step);
                self.setup.push("LOGIN".into());
            }
            1 => {
                let blob = self.plain_blob(&user, &pass);
                let line = format!("{tag} AUTHENTICATE PLAIN {blob}\r\n");
                let step = self.send(line.into_bytes());
                self.steps.push(step);
                self.setup.push("AUTHENTICATE PLAIN (SASL-IR)".into());
            }
            2 => {
                let head = format!("{tag} AUTHENTICATE PLAIN\r\n");
                let step = self.send(head.into_bytes());
                self.steps.push(step);
                let blob = self.plain_blob(&user, &pass);
                let then = self.sub_send(format!("{blob}\r\n").into_bytes());
                self.steps.push(Step::AwaitContinuation {
                    tag: tag.clone(),
                    then,
                });
                self.setup
                    .push("AUTHENTICATE PLAIN, then the response".into());
            }
            _ => {
                let head = format!("{tag} LOGIN {{{}}}\r\n", user.len());
                let step = self.send(head.into_bytes());
                self.steps.push(step);
                let then = self.sub_send(format!("{user} {pass}\r\n").into_bytes());
                self.steps.push(Step::AwaitContinuation {
                    tag: tag.clone(),
                    then,
                });
                self.setup.push("LOGIN {n} (user name as a literal)".into());
            }
        }
        self.steps.push(Step::AwaitTagged { tag });
        self.phase = Phase::Authenticated;
        if self.rng.chance(50) {
            let tag = self.tag();
            let step = self.send(format!("{tag} SELECT INBOX\r\n").into_bytes());
            self.steps.push(step);
            self.steps.push(Step::AwaitTagged { tag });
            self.setup.push("SELECT INBOX".into());
            self.phase = Phase::Selected;
        }
    }

    /// Fills the placeholders of a mode-switch template.
    fn fill(&mut self, template: &str) -> String {
        let mut s = template.to_string();
        if s.contains("@IR@") {
            let (u, p) = (self.acc.user.clone(), self.acc.pass.clone());
            let blob = self.plain_blob(&u, &p);
            s = s.replace("@IR@", &blob);
        }
        if s.contains("@VIR@") {
            let (u, p) = (self.acc.victim.clone(), self.acc.victim_pass.clone());
            let blob = self.plain_blob(&u, &p);
            s = s.replace("@VIR@", &blob);
        }
        if s.contains("@MISSING@") {
            let m = self.missing_mailbox();
            s = s.replace("@MISSING@", &m);
        }
        s.replace("@USER@", &self.acc.user.clone())
            .replace("@PASS@", &self.acc.pass.clone())
    }

    /// A mode-switching command, then (without waiting) one or two hidden canary lines, and
    /// sometimes the line that would end the mode.
    fn mode_switch_blind(&mut self) {
        let template = *self.rng.pick(MODE_SWITCHES);
        let command = self.fill(template);
        let tag = self.tag();
        self.blind_command(&tag, format!("{tag} {command}\r\n").as_bytes());
        let hidden = self.rng.range(1, 2);
        for _ in 0..hidden {
            let verb = template.split(" @").next().unwrap_or(template);
            let position = format!("line after {tag} {verb} (sent without waiting)");
            let line = self.canary(&position);
            self.blind(&line);
        }
        let shown = template
            .replace("@IR@", "<SASL-IR of the user>")
            .replace("@VIR@", "<SASL-IR of the victim>")
            .replace("@MISSING@", "<a missing mailbox>")
            .replace("@USER@ @PASS@", "<the user's credentials>");
        let mut detail = format!("{shown}, {hidden} hidden line(s)");
        if self.rng.chance(35) {
            let end: &[u8] = match self.rng.below(3) {
                0 => b"DONE\r\n",
                1 => b"*\r\n",
                _ => b"+\r\n",
            };
            self.command_tags
                .insert(String::from_utf8_lossy(wire_first_word(end)).into_owned());
            self.blind(end);
            detail.push_str(&format!(
                ", then {}",
                String::from_utf8_lossy(&end[..end.len() - 2])
            ));
        }
        self.item("mode switch, blind", detail);
    }

    /// A mode-switching command with its continuation sent only after the `+`, as an honest
    /// client does.
    fn mode_switch_honest(&mut self) {
        self.quiesce();
        let tag = self.tag();
        let (cred_user, cred_pass) = if self.tls {
            (self.acc.user.clone(), self.acc.pass.clone())
        } else {
            (self.acc.victim.clone(), self.acc.victim_pass.clone())
        };
        let (command, then, detail): (String, Vec<Step>, &str) = match self.rng.below(6) {
            0 => (
                "IDLE".into(),
                self.sub_send(b"DONE\r\n".to_vec()),
                "IDLE, DONE after \"+\"",
            ),
            1 => (
                "UID IDLE".into(),
                self.sub_send(b"DONE\r\n".to_vec()),
                "UID IDLE, DONE after \"+\"",
            ),
            2 => {
                let blob = self.plain_blob(&cred_user, &cred_pass);
                (
                    "AUTHENTICATE PLAIN".into(),
                    self.sub_send(format!("{blob}\r\n").into_bytes()),
                    "AUTHENTICATE PLAIN, credentials after \"+\"",
                )
            }
            3 => (
                "AUTHENTICATE PLAIN".into(),
                self.sub_send(b"*\r\n".to_vec()),
                "AUTHENTICATE PLAIN, \"*\" (cancel) after \"+\"",
            ),
            4 => {
                let u = base64(cred_user.as_bytes());
                let p = base64(cred_pass.as_bytes());
                self.secrets.push((
                    format!("base64 password of {cred_user}"),
                    p.clone().into_bytes(),
                ));
                let mut then = self.sub_send(format!("{u}\r\n").into_bytes());
                let second = self.sub_send(format!("{p}\r\n").into_bytes());
                then.push(Step::AwaitContinuation {
                    tag: tag.clone(),
                    then: second,
                });
                (
                    "AUTHENTICATE LOGIN".into(),
                    then,
                    "AUTHENTICATE LOGIN, user and password after each \"+\"",
                )
            }
            _ => (
                "AUTHENTICATE PLAIN =".into(),
                self.sub_send(b"*\r\n".to_vec()),
                "AUTHENTICATE PLAIN = (empty SASL-IR), \"*\" after \"+\"",
            ),
        };
        let step = self.send(format!("{tag} {command}\r\n").into_bytes());
        self.steps.push(step);
        let sasl = command.contains("AUTHENTICATE");
        self.steps.push(Step::AwaitContinuation {
            tag: tag.clone(),
            then,
        });
        if sasl {
            // AUTHENTICATE reads lines until its tagged answer: an honest client waits for it.
            self.steps.push(Step::AwaitTagged { tag });
        } else {
            self.unanswered.push(tag);
        }
        self.item("mode switch, honest", detail.to_string());
    }

    /// A command with a literal of some kind, in the middle or at the end, whose body is a
    /// canary (or empty, with the canary right after it).
    fn literal_item(&mut self) {
        let tag = self.tag();
        // (label, text before the literal, text after it when in the middle)
        let missing = self.missing_mailbox();
        let commands: Vec<(String, String, String)> = vec![
            (
                "APPEND to a missing mailbox".into(),
                format!("APPEND {missing}"),
                String::new(),
            ),
            (
                "APPEND to a missing mailbox (\\Seen)".into(),
                format!("APPEND {missing} (\\Seen)"),
                String::new(),
            ),
            ("APPEND INBOX".into(), "APPEND INBOX".into(), String::new()),
            (
                "APPEND INBOX (\\Seen)".into(),
                "APPEND INBOX (\\Seen)".into(),
                String::new(),
            ),
            ("LOGIN user name".into(), "LOGIN".into(), " pw".into()),
            ("NOOP".into(), "NOOP".into(), " x".into()),
            ("unknown XFOO".into(), "XFOO".into(), " x".into()),
            ("UID XFOO".into(), "UID XFOO".into(), String::new()),
            ("SELECT".into(), "SELECT".into(), String::new()),
            ("CREATE".into(), "CREATE".into(), String::new()),
            ("STATUS".into(), "STATUS".into(), " (MESSAGES)".into()),
            ("LIST pattern".into(), "LIST \"\"".into(), String::new()),
            ("ID".into(), "ID (\"name\"".into(), ")".into()),
            ("SEARCH TEXT".into(), "SEARCH TEXT".into(), " ALL".into()),
            (
                "UID SEARCH TEXT".into(),
                "UID SEARCH TEXT".into(),
                String::new(),
            ),
            (
                "UID APPEND to a missing mailbox".into(),
                format!("UID APPEND {missing}"),
                String::new(),
            ),
            ("junk".into(), ")(".into(), " x".into()),
        ];
        let (label, before, middle) = self.rng.pick(&commands).clone();
        let (open, sync, kind) = match self.rng.weighted(&[40, 25, 15, 20]) {
            0 => ("{", true, "{n}"),
            1 => ("{", false, "{n+}"),
            2 => ("~{", true, "~{n}"),
            _ => ("~{", false, "~{n+}"),
        };
        let zero = self.rng.chance(15);
        let at_end = middle.is_empty() || self.rng.chance(50);
        let honest = sync && self.rng.chance(45);
        let position = format!("literal data of {tag} {label} {kind}");
        let body = if zero {
            Vec::new()
        } else {
            self.canary(&position)
        };
        let plus = if sync { "" } else { "+" };
        let head = format!("{tag} {before} {open}{}{plus}}}\r\n", body.len());
        // After the literal: the end of the command, or more arguments. After a zero-length
        // literal the canary comes right after it (the rest of the command line).
        let mut rest = Vec::new();
        if zero {
            rest.extend_from_slice(b" ");
            let line = self.canary(&format!("rest of {tag} {label} after a zero-length {kind}"));
            rest.extend_from_slice(&line);
        } else if at_end {
            rest.extend_from_slice(b"\r\n");
        } else {
            rest.extend_from_slice(middle.as_bytes());
            rest.extend_from_slice(b"\r\n");
        }
        let mut data = body;
        data.extend_from_slice(&rest);
        let place = if zero {
            "zero-length"
        } else if at_end {
            "at the end"
        } else {
            "in the middle"
        };
        if honest {
            self.quiesce();
            self.blind(head.as_bytes());
            self.flush();
            let then = self.sub_send(data);
            self.steps.push(Step::AwaitContinuation {
                tag: tag.clone(),
                then,
            });
            self.unanswered.push(tag);
        } else {
            self.blind_command(&tag, head.as_bytes());
            self.blind(&data);
        }
        let how = if honest { "honest" } else { "blind" };
        self.item("literal", format!("{kind} {place} of {label} ({how})"));
    }

    /// `UID` before a command that has no UID form (and a few that have).
    fn uid_prefix(&mut self) {
        let tag = self.tag();
        let (victim, vpass) = (self.acc.victim.clone(), self.acc.victim_pass.clone());
        let choice = self.rng.below(10);
        let command = match choice {
            0 => format!("UID LOGIN {victim} {vpass}"),
            1 => {
                let blob = self.plain_blob(&victim, &vpass);
                format!("UID AUTHENTICATE PLAIN {blob}")
            }
            2 => "UID SELECT INBOX".into(),
            3 => "UID NOOP".into(),
            4 => "UID CAPABILITY".into(),
            5 => "UID XFOO".into(),
            6 => "UID FETCH 1:* (FLAGS)".into(),
            7 => "UID SEARCH ALL".into(),
            8 => "UID EXPUNGE 1:*".into(),
            _ => "UID LIST \"\" \"*\"".into(),
        };
        self.blind_command(&tag, format!("{tag} {command}\r\n").as_bytes());
        let mut detail = match choice {
            0 => "UID LOGIN of the victim".to_string(),
            1 => "UID AUTHENTICATE PLAIN of the victim (SASL-IR)".to_string(),
            _ => command.clone(),
        };
        if self.rng.chance(40) {
            let line = self.canary(&format!("line after {tag} UID ... (sent without waiting)"));
            self.blind(&line);
            detail.push_str(", then a hidden line");
        }
        self.item("UID prefix", detail);
    }

    /// Lines that are not commands, or are, oddly.
    fn junk(&mut self) {
        let tag = self.tag();
        let (victim, vpass) = (self.acc.victim.clone(), self.acc.victim_pass.clone());
        let choice = self.rng.below(19);
        let (bytes, detail): (Vec<u8>, String) = match choice {
            0 => (b")(*&^%\r\n".to_vec(), "garbage".into()),
            1 => (b"\r\n".to_vec(), "empty line".into()),
            2 => (b"   \r\n".to_vec(), "spaces".into()),
            3 => (b"*\r\n".to_vec(), "\"*\" outside AUTHENTICATE".into()),
            4 => (b"* OK hello\r\n".to_vec(), "an untagged response".into()),
            5 => (b"+\r\n".to_vec(), "\"+\"".into()),
            6 => (b"+ go ahead\r\n".to_vec(), "a continuation".into()),
            7 => (b"DONE\r\n".to_vec(), "DONE outside IDLE".into()),
            8 => (b"done\r\n".to_vec(), "done outside IDLE".into()),
            9 => {
                let blob = self.plain_blob(&victim, &vpass);
                (
                    format!("{blob}\r\n").into_bytes(),
                    "a base64 line outside AUTHENTICATE (victim credentials)".into(),
                )
            }
            10 => (format!("{tag}\r\n").into_bytes(), "a tag alone".into()),
            11 => (format!("{tag} UID\r\n").into_bytes(), "UID alone".into()),
            12 => (
                format!("LOGIN {victim} {vpass}\r\n").into_bytes(),
                "an untagged LOGIN (victim credentials)".into(),
            ),
            13 => (
                format!("{tag} NOOP \0\r\n").into_bytes(),
                "NUL in a line".into(),
            ),
            14 => (
                format!("{tag}  NOOP\r\n").into_bytes(),
                "two spaces after the tag".into(),
            ),
            15 | 16 => {
                let canary = self.canary(&format!("after a bare LF in the line of {tag}"));
                let mut b = format!("{tag} NOOP\n").into_bytes();
                b.extend_from_slice(&canary);
                (b, "bare LF, then a hidden line".into())
            }
            17 => {
                let canary = self.canary(&format!("after a bare CR in the line of {tag}"));
                let mut b = format!("{tag} NOOP\r").into_bytes();
                b.extend_from_slice(&canary);
                (b, "bare CR, then a hidden line".into())
            }
            _ => self.long_line(&tag),
        };
        // Whatever a server reads as the tag of a line at a command position is a tag the
        // client sent there.
        let first = wire_first_word(&bytes);
        if !first.is_empty() {
            self.command_tags
                .insert(String::from_utf8_lossy(first).into_owned());
        }
        self.blind_command(&tag, &bytes);
        self.item("junk", detail);
    }

    /// A long line just under a limit, or an over-long one (sometimes ending with a literal
    /// whose body is a canary).
    fn long_line(&mut self, tag: &str) -> (Vec<u8>, String) {
        let pre = matches!(self.phase, Phase::PlainPreAuth | Phase::TlsPreAuth);
        let limit = if pre { 8192 } else { 65536 };
        let (len, what) = match self.rng.below(3) {
            0 => (
                self.rng.range(4000, limit - 64),
                "long line under imapgate's limit",
            ),
            _ => (limit + self.rng.range(1, 300), "over-long line"),
        };
        let mut b = format!("{tag} NOOP ").into_bytes();
        b.resize(len, b'a');
        if self.rng.chance(40) {
            let canary = self.canary(&format!("literal data at the end of the long line {tag}"));
            b.extend_from_slice(format!(" {{{}}}\r\n", canary.len()).as_bytes());
            b.extend_from_slice(&canary);
            b.extend_from_slice(b"\r\n");
            (b, format!("{what} ({len} bytes) ending with a literal"))
        } else {
            b.extend_from_slice(b"\r\n");
            (b, format!("{what} ({len} bytes)"))
        }
    }

    /// An ordinary command, valid in the state or not; sometimes a canary command itself.
    fn plain_command(&mut self) {
        let made = self.name("made");
        let commands = [
            "NOOP".to_string(),
            "CAPABILITY".into(),
            "ID NIL".into(),
            "NAMESPACE".into(),
            "LIST \"\" \"*\"".into(),
            "LSUB \"\" \"*\"".into(),
            format!("CREATE INBOX.{made}"),
            "STATUS INBOX (MESSAGES)".into(),
            "SELECT INBOX".into(),
            "EXAMINE INBOX".into(),
            "FETCH 1:* (FLAGS)".into(),
            "SEARCH ALL".into(),
            "STORE 1:* +FLAGS (\\Seen)".into(),
            "EXPUNGE".into(),
            "CHECK".into(),
            "ENABLE CONDSTORE".into(),
            "UNSELECT".into(),
            "GETQUOTAROOT INBOX".into(),
        ];
        if self.rng.chance(15) {
            let line = self.canary("a command position (a command the policies refuse)");
            self.blind(&line);
            self.item("plain", "a canary at a command position".into());
            return;
        }
        let tag = self.tag();
        let command = self.rng.pick(&commands).clone();
        self.blind_command(&tag, format!("{tag} {command}\r\n").as_bytes());
        self.item("plain", command);
    }
}

fn wire_first_word(line: &[u8]) -> &[u8] {
    super::wire::first_word(line)
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc() -> Accounts {
        Accounts {
            user: "u".into(),
            pass: "upw".into(),
            victim: "v".into(),
            victim_pass: "vpw".into(),
        }
    }

    fn bytes(steps: &[Step]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in steps {
            match s {
                Step::Send { bytes, .. } => out.extend_from_slice(bytes),
                Step::AwaitContinuation { then, .. } => out.extend(super::tests::bytes(then)),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn a_case_depends_on_its_seed_and_index_only() {
        for i in 0..200 {
            let a = case(7, i, &acc());
            let b = case(7, i, &acc());
            assert_eq!(bytes(&a.steps), bytes(&b.steps), "case {i}");
            assert_eq!(a.items, b.items);
        }
        assert_ne!(
            bytes(&case(7, 1, &acc()).steps),
            bytes(&case(8, 1, &acc()).steps)
        );
    }

    #[test]
    fn cases_end_with_logout_and_keep_canaries_apart() {
        for i in 0..500 {
            let c = case(1, i, &acc());
            assert!(
                matches!(c.steps.last(), Some(Step::AwaitEnd { tag }) if tag == "z1"),
                "case {i}"
            );
            assert!(bytes(&c.steps).ends_with(b"z1 LOGOUT\r\n"), "case {i}");
            for k in &c.canaries {
                assert!(!c.command_tags.contains(&k.tag), "case {i}: {}", k.tag);
                assert!(k.line.starts_with(format!("{} ", k.tag).as_bytes()));
                assert!(k.line.ends_with(b"\r\n"));
            }
            // Cuts are inside the bytes they cut.
            for s in &c.steps {
                if let Step::Send { bytes, cuts } = s {
                    assert!(cuts.iter().all(|&x| x > 0 && x < bytes.len()), "case {i}");
                }
            }
        }
    }
}
