//! The `/metrics` text format after every metric has been touched, with label values of every
//! awkward kind: checked by our own parser, and by `promtool check metrics` when it is installed
//! (Debian package `prometheus`).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use imapgate::metrics::{CommandResult, Direction, LoginResult, Metrics, ProxyRefusal};

/// Every built-in family, its type and its label names (sorted), as the issue specifies them.
const EXPECTED: &[(&str, &str, &[&str])] = &[
    ("imapgate_connections_total", "counter", &["listener"]),
    ("imapgate_connections_active", "gauge", &["listener"]),
    (
        "imapgate_tls_handshake_failures_total",
        "counter",
        &["listener"],
    ),
    (
        "imapgate_proxy_protocol_refused_total",
        "counter",
        &["listener", "reason"],
    ),
    ("imapgate_upstream_connect_failures_total", "counter", &[]),
    ("imapgate_commands_total", "counter", &["command", "result"]),
    (
        "imapgate_command_duration_seconds",
        "histogram",
        &["command"],
    ),
    ("imapgate_logins_total", "counter", &["result"]),
    (
        "imapgate_policy_decisions_total",
        "counter",
        &["action", "hook", "policy"],
    ),
    (
        "imapgate_policy_errors_total",
        "counter",
        &["hook", "policy"],
    ),
    (
        "imapgate_policy_duration_seconds",
        "histogram",
        &["hook", "policy"],
    ),
    ("imapgate_bytes_total", "counter", &["direction"]),
    ("imapgate_parse_errors_total", "counter", &["direction"]),
    ("imapgate_audit_dropped_total", "counter", &[]),
    (
        "imapgate_policy_metric_overflow_total",
        "counter",
        &["metric"],
    ),
    ("imapgate_upstream_up", "gauge", &["upstream"]),
    (
        "imapgate_upstream_probe_failures_total",
        "counter",
        &["upstream"],
    ),
];

/// Touches every metric, built-in and policy-defined, the way a busy session would.
pub fn busy_registry() -> Metrics {
    let m = Metrics::new();
    let guard = m.connection_opened("imaps");
    // Still open at the scrape.
    std::mem::forget(m.connection_opened("127.0.0.1:1143"));
    drop(guard);
    m.tls_handshake_failed("imaps");
    m.listener("lb")
        .proxy_protocol_refused(ProxyRefusal::Untrusted);
    m.upstream_connect_failed();
    let ms = Duration::from_millis;
    for (command, result, duration) in [
        ("LOGIN", CommandResult::Ok, Some(ms(3))),
        ("SELECT", CommandResult::Ok, Some(ms(12))),
        ("SELECT", CommandResult::No, Some(ms(2))),
        ("UID FETCH", CommandResult::Ok, Some(ms(250))),
        ("SEARCH", CommandResult::Rejected, None),
        ("LIST", CommandResult::Bad, Some(Duration::from_micros(300))),
        ("IDLE", CommandResult::Aborted, None),
        ("OTHER", CommandResult::Ok, Some(Duration::from_secs(90))),
    ] {
        m.command_completed(command, result, duration);
    }
    for r in LoginResult::ALL {
        m.login(r);
    }
    m.policy_decision("search_rate_limit", "on_command", "reject");
    m.policy_decision("rename\"quote\\back\nline", "on_command", "rewrite");
    m.policy_error("broken", "on_response");
    m.policy_duration("search_rate_limit", "on_command", Duration::from_micros(7));
    let hook = m.policy_hook("audit_only", "on_complete");
    hook.decision("pass");
    hook.error();
    hook.duration(Duration::from_millis(20));
    m.bytes(Direction::ClientToUpstream, 1234);
    m.bytes(Direction::UpstreamToClient, 1 << 40);
    m.parse_error(Direction::UpstreamToClient);
    m.audit_dropped_counter().inc();
    let mail1 = m.upstream("mail1");
    mail1.set_up(true);
    mail1.probe_failed();
    m.upstream("mail-2.example").set_up(false);

    let counter = m
        .policy_counter("searches", "SEARCH commands by user.", &["user", "kind"])
        .unwrap();
    for user in [
        "alice",
        "",
        "ünï✓code",
        "q\"uote",
        "back\\slash",
        "new\nline",
        &"x".repeat(500),
    ] {
        counter.inc(&[user, "plain"]).unwrap();
    }
    let gauge = m
        .policy_gauge("open_mailboxes", "Mailboxes selected now.", &[])
        .unwrap();
    gauge.set(&[], 3.0).unwrap();
    gauge.add(&[], -1.5).unwrap();
    let hist = m
        .policy_histogram(
            "mailbox_messages",
            "",
            &["listener"],
            Some(&[10.0, 100.0, 1000.0]),
        )
        .unwrap();
    hist.observe(&["imaps"], 42.0).unwrap();
    hist.observe(&["imaps"], 5000.0).unwrap();
    let capped = m.policy_counter("per_peer", "Capped.", &["peer"]).unwrap();
    for i in 0..150 {
        capped.inc(&[&format!("192.0.2.{i}")]).unwrap();
    }
    m
}

/// Label pairs in exposition order.
type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

#[derive(Debug, Default)]
struct Scrape {
    help: HashMap<String, String>,
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

/// A strict reader of the text format 0.0.4: any line it cannot read fails the test.
fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(
                scrape.help.insert(name.into(), help.into()).is_none(),
                "second HELP, {}",
                at()
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{}",
                at()
            );
            assert!(
                scrape.types.insert(name.into(), kind.into()).is_none(),
                "second TYPE, {}",
                at()
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{}", at());
        let sample = parse_sample(line).unwrap_or_else(|e| panic!("{e}, {}", at()));
        let family = family_of(&sample.name, &scrape.types);
        assert!(
            scrape.types.contains_key(family) && scrape.help.contains_key(family),
            "sample before its HELP and TYPE, {}",
            at()
        );
        scrape.samples.push(sample);
    }
    scrape
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or("no value after the metric name")?;
    let name = &line[..name_end];
    let valid_name = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if name.is_empty() || !valid_name {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            let (start, c) = chars.next().ok_or("unterminated label set")?;
            if c == '}' {
                rest = &body[start + 1..];
                break;
            }
            let eq = body[start..].find('=').ok_or("label without =")? + start;
            let label = &body[start..eq];
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {label:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        other => return Err(format!("unknown escape \\{other}")),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    c => value.push(c),
                }
            }
            labels.push((label.to_owned(), value));
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                _ => return Err("expected , or } after a label".into()),
            }
        }
    }
    let mut fields = rest
        .strip_prefix(' ')
        .ok_or("no space before the value")?
        .split(' ');
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|e| format!("timestamp: {e}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The family a sample belongs to: histogram series carry a suffix.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram")
        {
            return base;
        }
    }
    name
}

fn label<'a>(s: &'a Sample, name: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|(l, _)| l == name)
        .map(|(_, v)| v.as_str())
}

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(l, v)| label(s, l) == Some(*v))
        })
        .map(|s| s.value)
}

#[test]
fn a_busy_registry_renders_valid_text_format() {
    let text = busy_registry().render();
    let scrape = parse(&text);

    // Every family: HELP and TYPE, and counters end in `_total`.
    for (name, kind) in &scrape.types {
        assert!(
            !scrape.help[name].trim().is_empty(),
            "{name} has an empty HELP"
        );
        if kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} does not end in _total"
            );
        } else {
            assert!(!name.ends_with("_total"), "{kind} {name} ends in _total");
        }
    }

    // No series twice.
    let mut series = HashSet::new();
    for s in &scrape.samples {
        let mut labels = s.labels.clone();
        labels.sort();
        assert!(
            series.insert((s.name.clone(), labels)),
            "duplicate series {s:?}"
        );
    }

    // The built-in families, with exactly the specified labels.
    for (name, kind, labels) in EXPECTED {
        assert_eq!(
            scrape.types.get(*name).map(String::as_str),
            Some(*kind),
            "{name}"
        );
        let sample_name = if *kind == "histogram" {
            format!("{name}_count")
        } else {
            (*name).to_owned()
        };
        let found: Vec<&Sample> = scrape
            .samples
            .iter()
            .filter(|s| s.name == sample_name)
            .collect();
        assert!(!found.is_empty(), "{name} has no series");
        for s in found {
            let mut names: Vec<&str> = s.labels.iter().map(|(l, _)| l.as_str()).collect();
            names.sort();
            assert_eq!(&names, labels, "labels of {name}");
        }
    }

    // Process metrics (Linux).
    if cfg!(target_os = "linux") {
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(scrape.types.contains_key(name), "{name} missing");
        }
        assert!(value(&scrape, "process_open_fds", &[]).unwrap() > 0.0);
    }

    // Some values, to show the handles go where they should.
    assert_eq!(
        value(
            &scrape,
            "imapgate_connections_total",
            &[("listener", "imaps")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            "imapgate_connections_active",
            &[("listener", "imaps")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &scrape,
            "imapgate_connections_active",
            &[("listener", "127.0.0.1:1143")]
        ),
        Some(1.0)
    );
    let cmd = |c, r| {
        value(
            &scrape,
            "imapgate_commands_total",
            &[("command", c), ("result", r)],
        )
    };
    assert_eq!(cmd("SELECT", "ok"), Some(1.0));
    assert_eq!(cmd("SELECT", "no"), Some(1.0));
    assert_eq!(cmd("SELECT", "rejected"), Some(0.0));
    assert_eq!(cmd("UID FETCH", "ok"), Some(1.0));
    assert_eq!(cmd("SEARCH", "rejected"), Some(1.0));
    assert_eq!(cmd("IDLE", "aborted"), Some(1.0));
    let dur = |c, le| {
        value(
            &scrape,
            "imapgate_command_duration_seconds_bucket",
            &[("command", c), ("le", le)],
        )
    };
    assert_eq!(dur("SELECT", "0.001"), Some(0.0));
    assert_eq!(dur("SELECT", "0.0025"), Some(1.0));
    assert_eq!(dur("SELECT", "0.025"), Some(2.0));
    assert_eq!(dur("OTHER", "60"), Some(0.0));
    assert_eq!(dur("OTHER", "+Inf"), Some(1.0));
    // Rejected commands were never forwarded: counted, but not timed.
    assert_eq!(
        value(
            &scrape,
            "imapgate_command_duration_seconds_count",
            &[("command", "SEARCH")]
        ),
        Some(0.0)
    );
    for r in ["ok", "failed", "refused"] {
        assert_eq!(
            value(&scrape, "imapgate_logins_total", &[("result", r)]),
            Some(1.0)
        );
    }
    assert_eq!(
        value(
            &scrape,
            "imapgate_bytes_total",
            &[("direction", "upstream_to_client")]
        ),
        Some((1u64 << 40) as f64)
    );
    assert_eq!(
        value(
            &scrape,
            "imapgate_parse_errors_total",
            &[("direction", "client_to_upstream")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &scrape,
            "imapgate_policy_decisions_total",
            &[
                ("policy", "rename\"quote\\back\nline"),
                ("hook", "on_command"),
                ("action", "rewrite")
            ]
        ),
        Some(1.0),
        "label values with quotes, backslashes and newlines come back intact"
    );
    assert_eq!(
        value(
            &scrape,
            "imapgate_policy_duration_seconds_bucket",
            &[
                ("policy", "search_rate_limit"),
                ("hook", "on_command"),
                ("le", "0.00001")
            ]
        ),
        Some(1.0)
    );

    // Policy-defined metrics.
    assert_eq!(scrape.types["imapgate_policy_searches_total"], "counter");
    assert_eq!(scrape.types["imapgate_policy_open_mailboxes"], "gauge");
    assert_eq!(
        scrape.types["imapgate_policy_mailbox_messages"],
        "histogram"
    );
    assert_eq!(
        value(&scrape, "imapgate_policy_open_mailboxes", &[]),
        Some(1.5)
    );
    let searches = |u| {
        value(
            &scrape,
            "imapgate_policy_searches_total",
            &[("user", u), ("kind", "plain")],
        )
    };
    for user in [
        "alice",
        "",
        "ünï✓code",
        "q\"uote",
        "back\\slash",
        "new\nline",
    ] {
        assert_eq!(searches(user), Some(1.0), "{user:?}");
    }
    assert_eq!(
        searches(&"x".repeat(128)),
        Some(1.0),
        "long values are cut to 128 bytes"
    );
    let peers = scrape
        .samples
        .iter()
        .filter(|s| s.name == "imapgate_policy_per_peer_total")
        .count();
    assert_eq!(peers, 101, "100 series and the overflow one");
    assert_eq!(
        value(
            &scrape,
            "imapgate_policy_per_peer_total",
            &[("peer", "__overflow__")]
        ),
        Some(50.0)
    );
    assert_eq!(
        value(
            &scrape,
            "imapgate_policy_metric_overflow_total",
            &[("metric", "imapgate_policy_per_peer_total")]
        ),
        Some(50.0)
    );

    // Histograms: cumulative buckets ending in +Inf = _count.
    for (family, kind) in &scrape.types {
        if kind != "histogram" {
            continue;
        }
        let mut by_series: HashMap<Labels, Vec<(f64, f64)>> = HashMap::new();
        for s in scrape
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let le = label(s, "le").expect("bucket has le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            let rest: Vec<_> = s
                .labels
                .iter()
                .filter(|(l, _)| l != "le")
                .cloned()
                .collect();
            by_series.entry(rest).or_default().push((le, s.value));
        }
        for (labels, buckets) in by_series {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family}"
            );
            assert_eq!(buckets.last().unwrap().0, f64::INFINITY, "{family}");
            let refs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(l, v)| (l.as_str(), v.as_str()))
                .collect();
            let count = value(&scrape, &format!("{family}_count"), &refs).unwrap();
            assert_eq!(buckets.last().unwrap().1, count, "{family}");
        }
    }

    promtool_check(&text);
}

/// Runs `promtool check metrics` when it is installed; prints a notice otherwise, since the
/// parser above already checked the format.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "notice: promtool not on PATH (Debian package `prometheus`); \
                 only the built-in format checks ran"
            );
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {}\n{report}",
        out.status
    );
    eprintln!("promtool check metrics: clean");
}
