//! The audit log: one JSON object per line, the fields the issue lists and no other, and
//! dropped (counted) records rather than a blocked session when the writer falls behind.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, mpsc};

use imapgate::audit::{Audit, AuditTarget, LoginRecord, VerdictRecord};
use imapgate::config::LogConfig;
use imapgate::metrics::{LoginResult, Metrics};
use serde_json::Value;

/// A writer the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn login(result: LoginResult, user: Option<&str>) -> LoginRecord {
    LoginRecord {
        result,
        user: user.map(str::to_owned),
        peer: "192.0.2.7:50122".into(),
        listener: "imaps".into(),
        tls: true,
        connection_id: 17,
    }
}

fn verdict() -> VerdictRecord {
    VerdictRecord {
        policy: "search_rate_limit".into(),
        hook: "on_command".into(),
        command: Some("SEARCH".into()),
        action: "reject".into(),
        code: Some("LIMIT".into()),
        user: Some("alice".into()),
        peer: "[2001:db8::1]:993".into(),
        connection_id: 18,
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

fn is_rfc3339_utc_millis(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[tokio::test]
async fn records_are_json_lines_with_exactly_the_documented_fields() {
    let out = Shared::default();
    let audit = Audit::with_writer(out.clone(), 64, &Metrics::new()).unwrap();
    assert!(audit.is_enabled());
    audit.login(login(LoginResult::Ok, Some("alice")));
    audit.login(login(LoginResult::Failed, Some("evil\"\n{\"x\":1}")));
    audit.login(login(LoginResult::Refused, None));
    audit.verdict(verdict());
    audit.flush().await.unwrap();

    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let values: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let login_keys = [
        "connection_id",
        "event",
        "listener",
        "peer",
        "result",
        "time",
        "tls",
        "user",
    ];
    for v in &values[..3] {
        assert_eq!(keys(v), login_keys);
        assert_eq!(v["event"], "login");
        assert!(is_rfc3339_utc_millis(v["time"].as_str().unwrap()), "{v}");
    }
    assert!(
        lines[0].starts_with("{\"time\":"),
        "time comes first: {}",
        lines[0]
    );
    assert_eq!(values[0]["result"], "ok");
    assert_eq!(values[0]["user"], "alice");
    assert_eq!(values[0]["peer"], "192.0.2.7:50122");
    assert_eq!(values[0]["listener"], "imaps");
    assert_eq!(values[0]["tls"], true);
    assert_eq!(values[0]["connection_id"], 17);
    // A hostile user name stays inside its string.
    assert_eq!(values[1]["result"], "failed");
    assert_eq!(values[1]["user"], "evil\"\n{\"x\":1}");
    assert_eq!(values[2]["result"], "refused");
    assert_eq!(values[2]["user"], Value::Null);

    let v = &values[3];
    assert_eq!(
        keys(v),
        [
            "action",
            "code",
            "command",
            "connection_id",
            "event",
            "hook",
            "peer",
            "policy",
            "time",
            "user"
        ]
    );
    assert_eq!(v["event"], "policy");
    assert_eq!(v["policy"], "search_rate_limit");
    assert_eq!(v["hook"], "on_command");
    assert_eq!(v["command"], "SEARCH");
    assert_eq!(v["action"], "reject");
    assert_eq!(v["code"], "LIMIT");
    assert_eq!(v["peer"], "[2001:db8::1]:993");
    assert_eq!(v["connection_id"], 18);
    for word in ["pass", "secret", "sasl", "auth"] {
        assert!(
            !text.to_ascii_lowercase().contains(word),
            "{word} in {text}"
        );
    }
}

#[tokio::test]
async fn user_names_are_cut() {
    let out = Shared::default();
    let audit = Audit::with_writer(out.clone(), 8, &Metrics::new()).unwrap();
    audit.login(login(LoginResult::Failed, Some(&"u".repeat(10_000))));
    audit.flush().await.unwrap();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let v: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(v["user"].as_str().unwrap().len(), 256);
}

#[tokio::test]
async fn a_file_target_is_appended_to_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
    let metrics = Metrics::new();
    let cfg = LogConfig {
        audit: Some(path.to_str().unwrap().to_owned()),
        ..LogConfig::default()
    };
    let audit = Audit::open(&cfg, &metrics).unwrap();
    audit.login(login(LoginResult::Ok, Some("alice")));
    audit.flush().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.starts_with("{\"earlier\":true}\n"));

    // logrotate moved the file away: after reopen, new lines go to a new file at the path.
    let rotated = dir.path().join("audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    audit.reopen();
    audit.verdict(verdict());
    audit.flush().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        2
    );
    let fresh = std::fs::read_to_string(&path).unwrap();
    assert_eq!(fresh.lines().count(), 1);
    assert!(fresh.contains("\"event\":\"policy\""));
}

#[test]
fn configuration() {
    let metrics = Metrics::new();
    assert!(
        !Audit::open(&LogConfig::default(), &metrics)
            .unwrap()
            .is_enabled()
    );
    let disabled = Audit::disabled();
    disabled.login(login(LoginResult::Ok, None));
    assert_eq!(AuditTarget::parse("-"), AuditTarget::Stdout);
    let bad = LogConfig {
        audit: Some("/nonexistent-dir/for/sure/audit.jsonl".into()),
        ..LogConfig::default()
    };
    let err = Audit::open(&bad, &metrics).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent-dir/for/sure"),
        "{err}"
    );
}

#[test]
fn config_file_key() {
    let text = "[[listener]]\nbind = \"127.0.0.1:1993\"\n[log]\naudit = \"-\"\n";
    let c = imapgate::config::Config::from_str_named(text, "/etc/imapgate/t.toml").unwrap();
    assert_eq!(c.log.audit.as_deref(), Some("-"));
}

/// A writer that blocks until the test lets it go: a disk that stalls.
struct Stalled {
    go: Mutex<mpsc::Receiver<()>>,
    inner: Shared,
}

impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.go.lock().unwrap().recv();
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_stalled_writer_drops_and_counts_instead_of_blocking() {
    let metrics = Metrics::new();
    let (go, wait) = mpsc::channel();
    let out = Shared::default();
    let writer = Stalled {
        go: Mutex::new(wait),
        inner: out.clone(),
    };
    let audit = Audit::with_writer(writer, 4, &metrics).unwrap();
    let started = std::time::Instant::now();
    for _ in 0..100 {
        audit.login(login(LoginResult::Ok, Some("alice")));
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "sending never waits for the writer"
    );
    let dropped = audit_dropped(&metrics);
    assert!(
        dropped >= 90,
        "at most the channel and one batch are kept: {dropped}"
    );
    // Let the disk go: whatever was kept is written, and kept + dropped = sent.
    for _ in 0..1000 {
        let _ = go.send(());
    }
    drop(go);
    audit.flush().await.unwrap();
    let written = String::from_utf8(out.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .count() as u64;
    assert_eq!(written + audit_dropped(&metrics), 100);
}

fn audit_dropped(m: &Metrics) -> u64 {
    let text = m.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("imapgate_audit_dropped_total "))
        .unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}
