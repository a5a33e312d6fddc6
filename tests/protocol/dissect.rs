//! `imapgate dissect` run as a program on a recorded session: both directions of a real Dovecot
//! 2.3 session (tests/data/session_*.imap: SASL PLAIN, CREATE and STATUS of a modified UTF-7
//! name, a synchronizing APPEND literal of 83 kB and a non-synchronizing one holding text shaped
//! like commands and literals, LIST, SELECT, UID FETCH of both messages, pipelined UID STORE /
//! UID SEARCH / NOOP, IDLE with DONE, UID COPY, UID MOVE, NAMESPACE, LOGOUT).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapgate"))
        .arg("dissect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs imapgate");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default())
        .expect("writes stdin");
    drop(input);
    child.wait_with_output().expect("imapgate exits")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn bytes_sum(records: &[Value]) -> u64 {
    records
        .iter()
        .map(|r| r["bytes"].as_u64().expect("bytes"))
        .sum()
}

fn summary(r: &Value) -> (String, String, String) {
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
    (s("kind"), s("tag"), s("name"))
}

#[test]
fn client_side_of_a_recorded_session() {
    let path = data("session_client.imap");
    let out = run(&["--direction", "client", &path], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = lines(&out);
    let size = std::fs::metadata(&path).expect("capture").len();
    assert_eq!(bytes_sum(&records), size);

    let want = [
        ("command", "a1", "CAPABILITY"),
        ("command", "a2", "AUTHENTICATE"),
        ("sasl", "-", "-"),
        ("command", "a3", "ID"),
        ("command", "a4", "CREATE"),
        ("command", "a5", "CREATE"),
        ("command", "a6", "LIST"),
        ("command", "a7", "STATUS"),
        ("command", "a8", "APPEND"),
        ("command", "a9", "APPEND"),
        ("command", "a10", "SELECT"),
        ("command", "a11", "UID FETCH"),
        ("command", "a12", "UID FETCH"),
        ("command", "a13", "UID STORE"),
        ("command", "a14", "UID SEARCH"),
        ("command", "a15", "NOOP"),
        ("command", "a16", "IDLE"),
        ("done", "-", "-"),
        ("command", "a17", "UID COPY"),
        ("command", "a18", "UID MOVE"),
        ("command", "a19", "NAMESPACE"),
        ("command", "a20", "LOGOUT"),
    ];
    let got: Vec<_> = records.iter().map(summary).collect();
    let want: Vec<_> = want
        .iter()
        .map(|(k, t, n)| (k.to_string(), t.to_string(), n.to_string()))
        .collect();
    assert_eq!(got, want);

    // Mailbox names come decoded from modified UTF-7.
    assert_eq!(records[4]["mailboxes"], json!(["Entwürfe"]));
    assert_eq!(records[6]["mailboxes"], json!(["", "*"]));
    assert_eq!(records[7]["mailboxes"], json!(["Entwürfe"]));
    assert_eq!(records[18]["mailboxes"], json!(["Archive/2024"]));
    assert_eq!(records[19]["mailboxes"], json!(["Entwürfe"]));
    // Messages without mailboxes or literals carry neither key.
    assert_eq!(records[0].get("mailboxes"), None);
    assert_eq!(records[0].get("literals"), None);
    // The synchronizing literal (streamed by the framer in this direction) and the
    // non-synchronizing one whose octets look like a literal announcement and a LOGOUT.
    assert_eq!(records[8]["literals"], json!({"count": 1, "octets": 83357}));
    assert_eq!(records[8]["bytes"], json!(83392));
    assert_eq!(records[9]["literals"], json!({"count": 1, "octets": 73}));
    assert!(records.iter().all(|r| r["kind"] != "unparsed"));
}

#[test]
fn server_side_of_a_recorded_session() {
    let path = data("session_server.imap");
    let out = run(&["--direction", "server", &path], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = lines(&out);
    let size = std::fs::metadata(&path).expect("capture").len();
    assert_eq!(bytes_sum(&records), size);
    assert_eq!(records.len(), 50);

    let count = |kind: &str, name: &str| {
        records
            .iter()
            .filter(|r| r["kind"] == kind && (name.is_empty() || r["name"] == name))
            .count()
    };
    assert_eq!(count("tagged", "OK"), 20);
    assert_eq!(count("continuation", ""), 3);
    assert_eq!(count("untagged", "LIST"), 4);
    assert_eq!(count("untagged", "FETCH"), 5);
    assert_eq!(count("unparsed", ""), 0);

    assert_eq!(
        summary(&records[0]),
        ("untagged".into(), "-".into(), "OK".into())
    );
    let list: Vec<&Value> = records.iter().filter(|r| r["name"] == "LIST").collect();
    let names: Vec<&Value> = list.iter().map(|r| &r["mailboxes"][0]).collect();
    assert_eq!(
        names,
        [
            &json!("Archive"),
            &json!("Archive/2024"),
            &json!("Entwürfe"),
            &json!("INBOX")
        ]
    );
    let status = records
        .iter()
        .find(|r| r["name"] == "STATUS")
        .expect("STATUS");
    assert_eq!(status["mailboxes"], json!(["Entwürfe"]));

    // The FETCH of the 83 kB message: its literal is above the inline threshold, so the framer
    // streams it; the record still covers the whole message.
    let big = records
        .iter()
        .find(|r| r["literals"]["octets"] == 83357)
        .expect("the large FETCH");
    assert_eq!(
        summary(big),
        ("untagged".into(), "-".into(), "FETCH".into())
    );
    assert_eq!(big["bytes"], json!(83393));
    let small = records
        .iter()
        .find(|r| r["literals"]["octets"] == 73)
        .expect("the small FETCH");
    assert_eq!(small["bytes"], json!(106));
    let a20 = records.last().expect("records");
    assert_eq!(summary(a20), ("tagged".into(), "a20".into(), "OK".into()));
}

#[test]
fn reads_standard_input_by_default_in_the_client_direction() {
    let input = b"a1 LOGIN {5+}\r\nalice {2+}\r\npw\r\na2 LIST \"\" \"&ZeVnLIqe-/*\"\r\n";
    let out = run(&[], Some(input));
    assert!(out.status.success());
    let records = lines(&out);
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[0],
        json!({"kind": "command", "tag": "a1", "name": "LOGIN", "bytes": 31,
               "literals": {"count": 2, "octets": 7}})
    );
    assert_eq!(records[1]["mailboxes"], json!(["", "日本語/*"]));
    assert_eq!(bytes_sum(&records), input.len() as u64);
}

#[test]
fn framing_error_prints_the_offset_and_exits_1() {
    // The second command ends in a bare LF: the first is printed, then the error.
    let input = b"a1 NOOP\r\na2 NOOP\na3 NOOP\r\n";
    let out = run(&["--direction", "client"], Some(input));
    assert_eq!(out.status.code(), Some(1));
    let records = lines(&out);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["tag"], "a1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("framing error at byte offset 9: line ends in a bare LF"),
        "{stderr}"
    );

    // A literal length that does not fit in 32 bits.
    let input = b"* OK hi\r\n* 1 FETCH (BODY[] {4294967296}\r\n";
    let out = run(&["--direction", "server"], Some(input));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("byte offset 9: literal length does not fit in 32 bits"),
        "{stderr}"
    );
}

#[test]
fn unparsable_and_incomplete_messages_are_reported_not_fatal() {
    let input = b"* OK [unbalanced\r\n* 2 EXISTS\r\n* 3 FETCH (BODY[] {10}\r\nabc";
    let out = run(&["--direction", "server"], Some(input));
    assert!(out.status.success());
    let records = lines(&out);
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["kind"], "unparsed");
    assert!(records[0]["error"].is_string());
    assert_eq!(
        summary(&records[1]),
        ("untagged".into(), "-".into(), "EXISTS".into())
    );
    assert_eq!(records[2]["kind"], "incomplete");
    assert_eq!(records[2]["name"], "FETCH");
    assert_eq!(bytes_sum(&records), input.len() as u64);
}
