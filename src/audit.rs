//! The audit log: one JSON object per line for every login and every non-pass policy verdict,
//! for the operator's log pipeline.
//!
//! Sessions never wait for the disk: they hand typed records to a bounded channel, and one
//! dedicated thread (a thread, not a tokio task, because file writes block) serializes and
//! writes them. When the channel is full the record is dropped and
//! `imapgate_audit_dropped_total` counts it: losing audit lines under overload is bad, but
//! stalling every session behind a slow disk would be worse, and the counter makes the loss
//! visible and alertable.
//!
//! Secrets cannot leak by construction: the records are structs with fixed fields, and none of
//! them can hold a password or a SASL payload.
//!
//! ```text
//! {"time":"2025-01-02T03:04:05.678Z","event":"login","result":"ok","user":"alice","peer":"192.0.2.7:50122","listener":"imaps","tls":true,"connection_id":17}
//! {"time":"2025-01-02T03:04:06.001Z","event":"policy","policy":"search_rate_limit","hook":"on_command","command":"SEARCH","action":"reject","code":"LIMIT","user":"alice","peer":"192.0.2.7:50122","connection_id":17}
//! ```

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::LogConfig;
use crate::metrics::{LoginResult, Metrics};

/// Records waiting for the writer. At a few hundred bytes each, a few MiB at most; enough to
/// ride out a disk hiccup of seconds at thousands of logins per second.
pub const CHANNEL_CAPACITY: usize = 8192;

/// User names are cut to this many bytes: the name comes from the client, and a failed LOGIN
/// with a kilobyte-long name should not cost a kilobyte of audit log each time.
pub const MAX_USER: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {}: cannot open: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("the audit writer has stopped")]
    Closed,
}

/// Where the audit log goes, from `[log] audit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    /// Appended to (created if missing), so that `logrotate`'s `copytruncate` works, and
    /// [`Audit::reopen`] serves the move-and-signal style.
    File(PathBuf),
}

impl AuditTarget {
    /// `"-"` and `"stdout"` mean standard output; anything else is a path.
    pub fn parse(value: &str) -> AuditTarget {
        match value {
            "-" | "stdout" => AuditTarget::Stdout,
            path => AuditTarget::File(PathBuf::from(path)),
        }
    }
}

/// A login attempt. `user` is what the client gave (cut to [`MAX_USER`] bytes), `None` when it
/// gave none that imapgate could read.
#[derive(Clone, Debug, Serialize)]
pub struct LoginRecord {
    pub result: LoginResult,
    pub user: Option<String>,
    /// The client's `ip:port` (as `policy::ConnInfo::peer` has it).
    pub peer: String,
    pub listener: Cow<'static, str>,
    /// Whether the client leg was TLS (implicit or after STARTTLS) at the time.
    pub tls: bool,
    pub connection_id: u64,
}

/// A policy verdict other than pass.
#[derive(Clone, Debug, Serialize)]
pub struct VerdictRecord {
    pub policy: Cow<'static, str>,
    pub hook: Cow<'static, str>,
    /// The command label (`UID FETCH`, `OTHER`), `None` for hooks without a command
    /// (`on_connect`).
    pub command: Option<Cow<'static, str>>,
    /// The policy engine's action name: `reject`, `close`, `delay`, `drop`, `error`.
    pub action: Cow<'static, str>,
    /// The response code of a refusal (`LIMIT`), if any.
    pub code: Option<Cow<'static, str>>,
    pub user: Option<String>,
    pub peer: String,
    pub connection_id: u64,
}

#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Record {
    Login(LoginRecord),
    Policy(VerdictRecord),
}

/// One output line: the time first, so that the lines sort and read well.
#[derive(Serialize)]
struct Line<'a> {
    time: &'a str,
    #[serde(flatten)]
    record: &'a Record,
}

enum Message {
    Record(SystemTime, Box<Record>),
    Flush(oneshot::Sender<()>),
    Reopen,
}

/// The audit log handle: cheap to clone, shared by every session. All methods return at once.
#[derive(Clone, Debug)]
pub struct Audit {
    inner: Option<Sender>,
}

#[derive(Clone, Debug)]
struct Sender {
    tx: mpsc::Sender<Message>,
    dropped: IntCounter,
}

impl Audit {
    /// An audit log that records nothing: `[log] audit` not set.
    pub fn disabled() -> Audit {
        Audit { inner: None }
    }

    /// Opens the configured target, or returns [`Audit::disabled`] when there is none. The file
    /// is opened here, so that a wrong path fails at startup rather than at the first login.
    pub fn open(cfg: &LogConfig, metrics: &Metrics) -> Result<Audit, AuditError> {
        match cfg.audit.as_deref() {
            None => Ok(Audit::disabled()),
            Some(value) => Audit::open_target(&AuditTarget::parse(value), metrics),
        }
    }

    pub fn open_target(target: &AuditTarget, metrics: &Metrics) -> Result<Audit, AuditError> {
        let sink = match target {
            AuditTarget::Stdout => Sink::Stdout,
            AuditTarget::File(path) => Sink::File {
                writer: BufWriter::new(open_file(path)?),
                path: path.clone(),
            },
        };
        start(sink, CHANNEL_CAPACITY, metrics.audit_dropped_counter())
    }

    /// Writes to any `writer` through a channel of `capacity` records: for tests, and for
    /// embedders with their own destination.
    pub fn with_writer(
        writer: impl Write + Send + 'static,
        capacity: usize,
        metrics: &Metrics,
    ) -> Result<Audit, AuditError> {
        start(
            Sink::Custom(Box::new(writer)),
            capacity.max(1),
            metrics.audit_dropped_counter(),
        )
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn login(&self, mut record: LoginRecord) {
        if let Some(user) = &mut record.user {
            cut(user, MAX_USER);
        }
        self.send(Record::Login(record));
    }

    pub fn verdict(&self, mut record: VerdictRecord) {
        if let Some(user) = &mut record.user {
            cut(user, MAX_USER);
        }
        self.send(Record::Policy(record));
    }

    fn send(&self, record: Record) {
        let Some(sender) = &self.inner else {
            return;
        };
        let message = Message::Record(SystemTime::now(), Box::new(record));
        if sender.tx.try_send(message).is_err() {
            // Full, or the writer is gone: either way the record is lost, and counted.
            sender.dropped.inc();
        }
    }

    /// Waits until every record sent before this call is written and flushed: for shutdown, and
    /// for tests that read the log.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let Some(sender) = &self.inner else {
            return Ok(());
        };
        let (ack, done) = oneshot::channel();
        sender
            .tx
            .send(Message::Flush(ack))
            .await
            .map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)
    }

    /// Reopens a file target (after logrotate moved it); the server can call it on SIGHUP.
    /// If the file cannot be reopened, writing goes on to the old one.
    pub fn reopen(&self) {
        if let Some(sender) = &self.inner {
            // A reopen lost because the queue is full is retried by the next SIGHUP.
            let _ = sender.tx.try_send(Message::Reopen);
        }
    }
}

fn start(sink: Sink, capacity: usize, dropped: IntCounter) -> Result<Audit, AuditError> {
    let (tx, rx) = mpsc::channel(capacity);
    let writer_dropped = dropped.clone();
    std::thread::Builder::new()
        .name("imapgate-audit".to_owned())
        .spawn(move || write_loop(rx, sink, writer_dropped))
        .map_err(AuditError::Spawn)?;
    Ok(Audit {
        inner: Some(Sender { tx, dropped }),
    })
}

fn open_file(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })
}

enum Sink {
    Stdout,
    File {
        path: PathBuf,
        writer: BufWriter<File>,
    },
    Custom(Box<dyn Write + Send>),
}

impl Sink {
    /// Writes whole lines. Standard output is shared with the tracing logs, so each batch is
    /// written under its lock and never buffered across calls, where a line could be split.
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(batch)?;
                out.flush()
            }
            Sink::File { writer, .. } => {
                writer.write_all(batch)?;
                writer.flush()
            }
            Sink::Custom(writer) => {
                writer.write_all(batch)?;
                writer.flush()
            }
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, writer } = self {
            match open_file(path) {
                Ok(file) => {
                    if let Err(error) = writer.flush() {
                        tracing::warn!(%error, "audit log: flushing before reopen");
                    }
                    *writer = BufWriter::new(file);
                    tracing::info!(path = %path.display(), "audit log reopened");
                }
                Err(error) => {
                    tracing::error!(%error, "audit log: reopen failed, still writing to the old file")
                }
            }
        }
    }
}

/// The writer thread: takes what is queued, writes it in one batch, and sleeps in
/// `blocking_recv` when there is nothing. Ends when every [`Audit`] is dropped.
fn write_loop(mut rx: mpsc::Receiver<Message>, mut sink: Sink, dropped: IntCounter) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut records = 0u64;
    let mut failing = false;
    let mut acks = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Record(time, record) => {
                    let time = rfc3339(time);
                    let line = Line {
                        time: &time,
                        record: &record,
                    };
                    match serde_json::to_writer(&mut batch, &line) {
                        Ok(()) => {
                            batch.push(b'\n');
                            records += 1;
                        }
                        // Only reachable through a serializer bug; count it like a lost line.
                        Err(error) => {
                            tracing::error!(%error, "audit record not serializable");
                            dropped.inc();
                        }
                    }
                }
                Message::Flush(ack) => acks.push(ack),
                Message::Reopen => {
                    write_out(&mut sink, &mut batch, &mut records, &mut failing, &dropped);
                    sink.reopen();
                }
            }
            // Bounded batches: a long queue is written in pieces, not gathered whole.
            next = if batch.len() < 1024 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        write_out(&mut sink, &mut batch, &mut records, &mut failing, &dropped);
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

fn write_out(
    sink: &mut Sink,
    batch: &mut Vec<u8>,
    records: &mut u64,
    failing: &mut bool,
    dropped: &IntCounter,
) {
    if batch.is_empty() {
        return;
    }
    match sink.write_batch(batch) {
        Ok(()) => {
            if *failing {
                tracing::info!("audit log writable again");
                *failing = false;
            }
        }
        Err(error) => {
            // Logged once per failing streak, not once per batch: a full disk would otherwise
            // flood the log that explains it.
            if !*failing {
                tracing::error!(%error, "audit log write failed; records are dropped and counted");
                *failing = true;
            }
            dropped.inc_by(*records);
        }
    }
    batch.clear();
    *records = 0;
}

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// `2025-01-02T03:04:05.678Z`: RFC 3339 in UTC with milliseconds, without a date crate for
/// one function.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`,
/// for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_known_answers() {
        let at = |secs: u64, ms: u64| {
            rfc3339(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(1_735_787_045, 678), "2025-01-02T03:04:05.678Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn targets() {
        assert_eq!(AuditTarget::parse("-"), AuditTarget::Stdout);
        assert_eq!(AuditTarget::parse("stdout"), AuditTarget::Stdout);
        assert_eq!(
            AuditTarget::parse("/var/log/x.jsonl"),
            AuditTarget::File("/var/log/x.jsonl".into())
        );
    }

    #[test]
    fn cut_keeps_char_boundaries() {
        let mut s = "éé".to_owned();
        cut(&mut s, 3);
        assert_eq!(s, "é");
    }
}
