//! A scripted session through imapgate and a real Dovecot, then a scrape of /metrics and a look
//! at the audit log: the counts must be exactly what the session did.

use std::path::PathBuf;
use std::time::Duration;

use crate::support;
use imapgate::config::{MetricsConfig, PolicyConfig, UpstreamTls};
use support::evidence::{http_get_within, poll, sample};
use support::proxy::{IMAPS, PLAIN, Proxy, config_for};
use support::{Client, Dovecot};

fn policy(file: &str, options: &str) -> PolicyConfig {
    PolicyConfig {
        script: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("policies")
            .join(file),
        options: toml::from_str(options).expect("options"),
        on_error: Default::default(),
        on_state_error: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_session_gives_exact_counts_and_audit_lines() {
    let dc = Dovecot::shared();
    let dir = support::temp_dir();
    let audit = dir.path().join("audit.jsonl");
    let mut config = config_for(dc, UpstreamTls::None);
    config.policies = vec![
        policy("require_tls.lua", ""),
        policy("search_rate_limit.lua", "per_second = 0.001\nburst = 2"),
    ];
    config.metrics = Some(MetricsConfig {
        bind: "127.0.0.1:0".parse().expect("addr"),
    });
    config.log.audit = Some(audit.display().to_string());
    let proxy = Proxy::start(config).await;
    let metrics = proxy.metrics_addr().expect("metrics endpoint");
    let (user, pass) = dc.fresh_user();

    // A rejected LOGIN on the plaintext listener.
    let mut plain = Client::connect(proxy.addr(PLAIN)).await;
    plain.read_greeting().await;
    plain.no(&format!("p1 LOGIN {user} {pass}")).await;
    plain.logout().await;

    // A login, two SELECTs, three SEARCHes of which the last is rate-limited.
    let mut c = Client::connect_tls(proxy.addr(IMAPS), dc.ca_pem()).await;
    c.read_greeting().await;
    c.login(&user, &pass).await;
    c.ok("a1 SELECT INBOX").await;
    c.ok("a2 SELECT INBOX").await;
    c.ok("a3 SEARCH ALL").await;
    c.ok("a4 SEARCH ALL").await;
    c.no("a5 SEARCH ALL").await;
    c.logout().await;
    // A session's counts are all in once it has ended.
    poll("both sessions to end", Duration::from_secs(10), || {
        (proxy.active() == 0).then_some(())
    })
    .await;

    let (status, scrape) = http_get_within(metrics, "/metrics", Duration::from_secs(10)).await;
    assert_eq!(status, 200);
    for (series, want) in [
        ("imapgate_logins_total{result=\"ok\"}", 1.0),
        ("imapgate_logins_total{result=\"refused\"}", 1.0),
        ("imapgate_logins_total{result=\"failed\"}", 0.0),
        (
            "imapgate_commands_total{command=\"LOGIN\",result=\"ok\"}",
            1.0,
        ),
        (
            "imapgate_commands_total{command=\"LOGIN\",result=\"rejected\"}",
            1.0,
        ),
        (
            "imapgate_commands_total{command=\"SELECT\",result=\"ok\"}",
            2.0,
        ),
        (
            "imapgate_commands_total{command=\"SEARCH\",result=\"ok\"}",
            2.0,
        ),
        (
            "imapgate_commands_total{command=\"SEARCH\",result=\"rejected\"}",
            1.0,
        ),
        (
            "imapgate_commands_total{command=\"LOGOUT\",result=\"ok\"}",
            2.0,
        ),
        (
            "imapgate_command_duration_seconds_count{command=\"SELECT\"}",
            2.0,
        ),
        (
            "imapgate_policy_decisions_total{action=\"reject\",hook=\"on_command\",policy=\"require_tls\"}",
            1.0,
        ),
        (
            "imapgate_policy_decisions_total{action=\"pass\",hook=\"on_command\",policy=\"require_tls\"}",
            1.0,
        ),
        (
            "imapgate_policy_decisions_total{action=\"pass\",hook=\"on_command\",policy=\"search_rate_limit\"}",
            2.0,
        ),
        (
            "imapgate_policy_decisions_total{action=\"reject\",hook=\"on_command\",policy=\"search_rate_limit\"}",
            1.0,
        ),
        ("imapgate_connections_total{listener=\"imaps\"}", 1.0),
        ("imapgate_connections_active{listener=\"imaps\"}", 0.0),
        ("imapgate_connections_total{listener=\"plain\"}", 1.0),
        ("imapgate_upstream_connect_failures_total", 0.0),
    ] {
        assert_eq!(sample(&scrape, series), want, "{series}\n{scrape}");
    }
    assert!(
        sample(
            &scrape,
            "imapgate_bytes_total{direction=\"client_to_upstream\"}"
        ) > 0.0
    );
    assert!(
        sample(
            &scrape,
            "imapgate_bytes_total{direction=\"upstream_to_client\"}"
        ) > 0.0
    );
    assert!(
        scrape.contains("process_resident_memory_bytes"),
        "no process metrics"
    );

    // promtool, where installed (CI installs it), finds nothing to complain about.
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(scrape.as_bytes())?;
            child.wait_with_output()
        })
    {
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool not installed: format checked by tests/metrics/format.rs only");
    }

    let (status, body) = http_get_within(metrics, "/healthz", Duration::from_secs(10)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    proxy.shutdown().await;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let logins: Vec<_> = lines.iter().filter(|l| l["event"] == "login").collect();
    assert_eq!(logins.len(), 2, "{lines:?}");
    assert_eq!(logins[0]["result"], "refused");
    assert_eq!(logins[0]["listener"], "plain");
    assert_eq!(logins[0]["tls"], false);
    assert_eq!(logins[1]["result"], "ok");
    assert_eq!(logins[1]["user"], user.as_str());
    assert_eq!(logins[1]["tls"], true);
    let verdicts: Vec<_> = lines.iter().filter(|l| l["event"] == "policy").collect();
    assert_eq!(verdicts.len(), 2, "{lines:?}");
    assert_eq!(verdicts[0]["policy"], "require_tls");
    assert_eq!(verdicts[0]["code"], "PRIVACYREQUIRED");
    assert_eq!(verdicts[0]["command"], "LOGIN");
    assert_eq!(verdicts[1]["policy"], "search_rate_limit");
    assert_eq!(verdicts[1]["action"], "reject");
    assert_eq!(verdicts[1]["code"], "LIMIT");
    assert_eq!(verdicts[1]["user"], user.as_str());
    let text = std::fs::read_to_string(&audit).expect("audit log");
    assert!(!text.contains(&pass), "a password reached the audit log");
}
