//! `examples/grafana-dashboard.json` is importable and only queries metrics imapgate exports.
//!
//! Every metric name in every PromQL expression (panels and variables) must be a family of a
//! rendered registry in which every metric has been touched; a histogram's `_bucket`, `_sum`
//! and `_count` count as the histogram. When promtool is installed, every expression is also
//! parsed by Prometheus itself (as a recording rule), with Grafana's variables filled in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use imapgate::metrics::{CommandResult, Direction, LoginResult, Metrics};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../../examples/grafana-dashboard.json");

/// Touches every built-in metric so that each family has a series and so appears in the
/// scrape.
fn scrape() -> String {
    let m = Metrics::new();
    std::mem::forget(m.connection_opened("imaps"));
    m.tls_handshake_failed("imaps");
    m.upstream_connect_failed();
    for r in CommandResult::ALL {
        m.command_completed("SELECT", r, Some(Duration::from_millis(5)));
    }
    for r in LoginResult::ALL {
        m.login(r);
    }
    m.policy_decision("p", "on_command", "reject");
    m.policy_error("p", "on_command");
    m.policy_duration("p", "on_command", Duration::from_micros(5));
    for d in Direction::ALL {
        m.bytes(d, 10);
        m.parse_error(d);
    }
    m.audit_dropped_counter().inc();
    m.render()
}

/// Family name → type, from the `# TYPE` lines.
fn families(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

/// Every PromQL expression: panel targets and query variables.
fn expressions(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        ("definition", Value::String(e)) if e.starts_with("label_values(") => {
                            out.push(e.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The metric names an expression uses: identifiers with imapgate's or the process prefix
/// (label names and functions never have them).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\b(?:imapgate|process)_[a-zA-Z0-9_:]*").unwrap();
    re.find_iter(expr).map(|m| m.as_str().to_owned()).collect()
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("the dashboard is valid JSON")
}

#[test]
fn every_queried_metric_exists() {
    let families = families(&scrape());
    let exprs = expressions(&dashboard());
    assert!(exprs.len() >= 10, "found only {} expressions", exprs.len());
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr:?}");
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| families.get(*b).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(&name)
                .to_owned();
            assert!(
                families.contains_key(&base),
                "{name} (in {expr:?}) is not exported"
            );
            used.insert(base);
        }
    }
    // The panels the issue asks for.
    for needed in [
        "imapgate_connections_active",
        "imapgate_commands_total",
        "imapgate_command_duration_seconds",
        "imapgate_policy_decisions_total",
        "imapgate_logins_total",
        "imapgate_bytes_total",
    ] {
        assert!(used.contains(needed), "no panel queries {needed}");
    }
    let all = exprs.join("\n");
    assert!(all.contains("histogram_quantile(0.5,") && all.contains("histogram_quantile(0.99,"));
}

#[test]
fn the_dashboard_is_importable() {
    let d = dashboard();
    assert!(d["id"].is_null(), "an exported dashboard has no fixed id");
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(d["schemaVersion"].as_u64().is_some());

    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());

    let mut ids = HashSet::new();
    let panels = d["panels"].as_array().unwrap();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].as_u64().is_some(), "gridPos.{k}");
        }
        assert!(p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"],
            ds_ref.as_str(),
            "panel {}",
            p["title"]
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty());
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"],
                ds_ref.as_str(),
                "panel {}",
                p["title"]
            );
            assert!(t["refId"].as_str().is_some());
        }
    }
    // Every variable the queries use is defined (or is one of Grafana's own).
    let defined: HashSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    let re = regex::Regex::new(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)").unwrap();
    for expr in expressions(&d) {
        for cap in re.captures_iter(&expr) {
            let name = &cap[1];
            assert!(
                defined.contains(name) || name.starts_with("__"),
                "${name} in {expr:?} is not defined"
            );
        }
    }
}

#[test]
fn promtool_parses_every_expression() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("notice: promtool not on PATH (Debian package `prometheus`); PromQL not parsed");
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in expressions(&dashboard()).iter().enumerate() {
        if expr.starts_with("label_values(") {
            continue; // Grafana's function, not PromQL.
        }
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let mut file = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    file.write_all(rules.as_bytes()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
