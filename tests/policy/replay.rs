//! `imapgate replay` on the transcripts in tests/replay/: the shipped policies must give
//! exactly the recorded outputs (`*.out`), which document what each policy does.

use std::path::Path;
use std::process::Command;

fn replay(transcript: &str, tls: bool) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/replay");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imapgate"));
    cmd.arg("replay")
        .arg("--config")
        .arg(dir.join("shipped.toml"));
    if tls {
        cmd.arg("--tls");
    }
    let out = cmd
        .arg(dir.join(transcript))
        .output()
        .expect("imapgate runs");
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalize(&String::from_utf8_lossy(&out.stdout))
}

/// Rate-limit waits depend on the clock; everything else must match exactly.
fn normalize(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        match line.find("try again in ") {
            Some(i) => {
                let rest = &line[i + "try again in ".len()..];
                let unit = rest.find(' ').map_or("", |j| &rest[j..]);
                out.push_str(&line[..i]);
                out.push_str("try again in N");
                out.push_str(unit);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn expected(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/replay")
        .join(name);
    normalize(&std::fs::read_to_string(path).expect("expected output"))
}

#[test]
fn require_tls_transcript() {
    assert_eq!(
        replay("require_tls.txt", false),
        expected("require_tls.out")
    );
}

#[test]
fn namespace_transcript() {
    assert_eq!(replay("namespace.txt", true), expected("namespace.out"));
}

#[test]
fn search_rate_limit_transcript() {
    assert_eq!(
        replay("search_rate_limit.txt", true),
        expected("search_rate_limit.out")
    );
}

#[test]
fn routing_transcript() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/replay");
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["replay", "--tls", "--config"])
        .arg(dir.join("routing.toml"))
        .arg(dir.join("routing.txt"))
        .output()
        .expect("imapgate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        normalize(&String::from_utf8_lossy(&out.stdout)),
        expected("routing.out")
    );
}

#[test]
fn replay_reports_a_bad_transcript_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let t = dir.path().join("bad.txt");
    std::fs::write(&t, "C: a1 NOOP\nX: what\n").expect("write");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/replay/shipped.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .args(["replay", "--config"])
        .arg(config)
        .arg(&t)
        .output()
        .expect("imapgate runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("transcript line 2"));
}
