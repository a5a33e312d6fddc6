//! The load harness (benches/load) run for a few seconds with tiny sizes: it must produce a
//! figure for every scenario and variant. No timing is asserted: figures from a debug build on
//! a shared machine mean nothing; this only proves that `cargo bench --bench load` works.

use std::path::PathBuf;
use std::time::Duration;

use crate::load;
use load::blind::{Launcher, Spec};
use load::env::Upstream;
use load::{ClientLeg, Options, Policies, Scenario};

fn tiny() -> Options {
    Options {
        rounds: 1,
        duration: Duration::from_millis(300),
        // With Dovecot's hibernation (the harness's default): every session moves to
        // imap-hibernate, and a sample must still see the message appended for it.
        idle_connections: 20,
        idle_rounds: 1,
        idle_cpu_window: Duration::from_millis(300),
        idle_notify_sample: 5,
        idle_hibernation: Some(Duration::from_secs(1)),
        fetch_clients: 2,
        fetch_size: 64 * 1024,
        fetch_messages: 2,
        small_connections: 2,
        small_depth: 2,
        append_clients: 2,
        append_size: 16 * 1024,
        imaplib_appends: 2,
        login_clients: 2,
        // Routed with the on_login policy only: routing and the policy in one variant.
        routed_policies: vec![Policies::OnLogin],
        routed_warm: 2,
        imapgate: Some(PathBuf::from(env!("CARGO_BIN_EXE_imapgate"))),
        // This test binary, running `blind_relay_child` below, is the blind relay.
        blind: Some(Launcher::Test {
            exe: std::env::current_exe().expect("the test binary's path"),
            test: "bench_smoke::blind_relay_child".into(),
        }),
        progress: false,
        ..Options::default()
    }
}

#[test]
fn load_harness_produces_figures_for_every_scenario() {
    let _busy = crate::support::busy_blocking();
    let opts = Options {
        upstreams: vec![Upstream::Plain, Upstream::Tls],
        policies: vec![Policies::None, Policies::Shipped],
        client_legs: vec![ClientLeg::Tls, ClientLeg::Plain],
        // The ratelimit scenario has imapgates of its own: its own test below.
        scenarios: Scenario::ALL
            .into_iter()
            .filter(|&s| s != Scenario::RateLimit)
            .collect(),
        ..tiny()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(300), load::run(&opts)).await })
        .expect("the harness finishes within 5 minutes")
        .unwrap_or_else(|e| panic!("the harness failed: {e}"));
    runtime.shutdown_timeout(Duration::from_secs(2));

    let table = load::table(&report);
    let shipped = opts.policy_dir.join("require_tls.lua").is_file();
    let variants = if shipped { 4 } else { 2 };
    let python = load::scenarios::python3().is_some();
    for &scenario in &opts.scenarios {
        if scenario == Scenario::Imaplib && !python {
            continue;
        }
        let rows: Vec<_> = report
            .rows
            .iter()
            .filter(|r| r.scenario == scenario.name())
            .collect();
        // The login scenario also measures imapgate routing: per upstream and routed policy,
        // without and with warm upstream connections. The plaintext client leg: through the
        // imapgates with a plain upstream and without the shipped policies.
        let routed_modes = 1 + usize::from(opts.routed_warm > 0);
        let routed = opts.routed_policies.len() * routed_modes;
        let expected_tls = match scenario {
            Scenario::Login => variants + opts.upstreams.len() * routed,
            _ => variants,
        };
        let expected_plain = match scenario {
            Scenario::Login => 1 + routed,
            _ => 1,
        };
        let count = |leg: &str| rows.iter().filter(|r| r.client_leg == leg).count();
        assert_eq!(count("tls"), expected_tls, "{scenario:?}\n{table}");
        assert_eq!(count("plain"), expected_plain, "{scenario:?}\n{table}");
        for r in rows.iter().filter(|r| r.client_leg == "plain") {
            assert_eq!((r.upstream, r.direct_plain), ("plain", None), "{r:?}");
            assert_ne!(r.policies, "shipped", "{r:?}");
        }
        // The blind relay ran beside imapgate on the plaintext leg of the relaying scenarios
        // (the routed login rows aside), and only there.
        let blind_scenario = matches!(
            scenario,
            Scenario::FetchLarge | Scenario::Small | Scenario::SmallSerial | Scenario::Append
        );
        for r in &rows {
            let expect_blind = blind_scenario && r.client_leg == "plain";
            assert_eq!(r.blind.is_some(), expect_blind, "{r:?}\n{table}");
            if expect_blind {
                assert!(r.blind.unwrap_or(0.0) > 0.0, "{r:?}");
                assert_eq!(r.blind_rounds.len(), opts.rounds, "{r:?}");
                assert!(
                    r.blind_ratio.is_some()
                        && r.proxied_vs_blind.is_some()
                        && r.blind_cpu_us_per_unit.is_some()
                        && r.gate_minus_blind_cpu_us_per_unit.is_some(),
                    "{r:?}"
                );
                if matches!(scenario, Scenario::Small | Scenario::SmallSerial) {
                    assert!(r.blind_p50_us.is_some(), "{r:?}");
                }
            }
        }
        for r in rows {
            // imapgate's CPU per unit of work, for every scenario.
            assert!(
                r.imapgate_cpu_us_per_unit.is_some() && r.cpu_unit.is_some(),
                "{r:?}"
            );
            let (d, p) = (r.direct.unwrap_or(0.0), r.proxied.unwrap_or(0.0));
            assert!(
                d > 0.0 && p > 0.0,
                "{scenario:?} has no figure: {r:?}\n{table}"
            );
            assert!(r.ratio.is_some(), "{r:?}");
            match scenario {
                Scenario::Small | Scenario::SmallSerial => {
                    assert!(
                        r.p50_us_proxied.is_some() && r.p99_us_direct.is_some(),
                        "{r:?}"
                    );
                    assert!(r.client_leg == "plain" || r.direct_plain.is_some(), "{r:?}");
                    assert_eq!(r.not_ok, Some(0), "a command was refused: {r:?}");
                }
                Scenario::Append => {
                    assert!(r.verified_messages.unwrap_or(0) > 0, "{r:?}")
                }
                Scenario::Idle => {
                    assert!(r.kib_per_idle_conn.is_some(), "{r:?}");
                    assert!(r.rss_idle_kib.unwrap_or(0) > 0, "{r:?}");
                    assert!(
                        r.idle_setup_s_direct.is_some() && r.idle_setup_s_proxied.is_some(),
                        "{r:?}"
                    );
                    assert!(r.dovecot_imap_processes_idle.is_some(), "{r:?}");
                    // Every sampled session saw its message, on both paths.
                    for check in [&r.idle_notify_direct, &r.idle_notify_proxied] {
                        let check = check.as_ref().expect("a notification check");
                        assert_eq!(check.sampled, opts.idle_notify_sample, "{r:?}");
                        assert_eq!(check.notified, check.sampled, "{r:?}\n{table}");
                    }
                }
                Scenario::Login => {
                    assert!(
                        r.added_p50_us.is_some() && r.p99_us_proxied.is_some(),
                        "{r:?}"
                    );
                    assert!(r.imapgate_cpu_us_per_unit.is_some(), "{r:?}");
                    let phases = r.p50_us_by_kind_proxied.as_ref();
                    assert!(phases.is_some_and(|p| p.contains_key("LOGIN")), "{r:?}");
                }
                _ => {}
            }
        }
    }
    // One JSON object per row, each parseable on its own.
    let json = load::json_lines(&report);
    assert_eq!(json.lines().count(), report.rows.len());
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert!(v["scenario"].is_string() && v["unit"].is_string(), "{line}");
    }
    assert!(
        table.contains("fetch-large") && table.contains("direct"),
        "{table}"
    );
    assert!(table.contains("blind relay"), "{table}");
    let modes: Vec<_> = report
        .rows
        .iter()
        .filter(|r| r.scenario == "login")
        .map(|r| (r.mode, r.policies))
        .collect();
    assert!(modes.contains(&("routed", "on_login")), "{modes:?}");
    assert!(modes.contains(&("routed+warm", "on_login")), "{modes:?}");
    assert!(modes.contains(&("transparent", "none")), "{modes:?}");
}

#[test]
fn ratelimit_scenario_compares_local_and_shared_buckets() {
    let _busy = crate::support::busy_blocking();
    let opts = Options {
        scenarios: vec![Scenario::RateLimit],
        upstreams: vec![Upstream::Plain],
        ..tiny()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(120), load::run(&opts)).await })
        .expect("the harness finishes within 2 minutes")
        .unwrap_or_else(|e| panic!("the harness failed: {e}"));
    runtime.shutdown_timeout(Duration::from_secs(2));

    let table = load::table(&report);
    let policies: Vec<_> = report.rows.iter().map(|r| r.policies).collect();
    assert_eq!(
        policies,
        [
            "ratelimit-local",
            "ratelimit-local+state",
            "ratelimit-shared"
        ],
        "{table}"
    );
    for r in &report.rows {
        assert_eq!(r.scenario, "ratelimit");
        assert!(
            r.direct.unwrap_or(0.0) > 0.0 && r.proxied.unwrap_or(0.0) > 0.0,
            "{r:?}"
        );
        // Never limited, and Redis answered every shared decision.
        assert_eq!(r.not_ok, Some(0), "a command was refused: {r:?}\n{table}");
        for by_kind in [&r.p50_us_by_kind_proxied, &r.p99_us_by_kind_direct] {
            let kinds = by_kind
                .as_ref()
                .map(|m| m.keys().copied().collect::<Vec<_>>());
            assert_eq!(kinds, Some(vec!["NOOP", "SEARCH"]), "{r:?}");
        }
        assert!(r.imapgate_cpu_us_per_unit.is_some(), "{r:?}");
        let compared = r.added_p50_us_vs_local_by_kind.is_some();
        assert_eq!(compared, r.policies != "ratelimit-local", "{r:?}");
    }
    assert!(
        table.contains("ratelimit-shared over ratelimit-local"),
        "{table}"
    );
}

/// Not a test of its own: the blind relay process of the smoke run, started by the harness as
/// `proxy --exact bench_smoke::blind_relay_child` with its parameters in the environment; it
/// serves until the harness closes its stdin. Run with the rest, it returns at once.
#[test]
fn blind_relay_child() {
    let Some(spec) = Spec::from_env() else {
        return;
    };
    let spec = spec.unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = load::blind::serve(&spec) {
        panic!("{e}");
    }
}

#[test]
fn blind_relay_parameters_survive_the_environment() {
    let spec = Spec {
        listen: "127.0.0.1:0".parse().expect("an address"),
        upstream: "127.0.0.1:10143".parse().expect("an address"),
        buffer: 65536,
        ready_file: PathBuf::from("/tmp/a dir/ready"),
    };
    let value = spec.to_env().into_string().expect("UTF-8");
    assert_eq!(Spec::from_env_value(&value), Ok(spec));
    assert!(Spec::from_env_value("127.0.0.1:0 127.0.0.1:1").is_err());
}

#[test]
fn literal_announcements_are_found() {
    use load::client::{appenduid, literal_announcement};
    assert_eq!(literal_announcement(b"* 1 FETCH (BODY[] {5}"), Some(5));
    assert_eq!(literal_announcement(b"a APPEND INBOX {12+}"), Some(12));
    assert_eq!(literal_announcement(b"* OK {x}"), None);
    assert_eq!(literal_announcement(b"* OK done"), None);
    assert_eq!(
        appenduid(b"a OK [APPENDUID 17 42] Append completed."),
        Some(42)
    );
}
