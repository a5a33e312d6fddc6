//! Metrics defined by policies: naming, idempotent re-definition across reloads, conflicts, and
//! the cap on label values that keeps a client from blowing up the scrape.

use imapgate::metrics::policy_defined::{MAX_SERIES_PER_METRIC, OVERFLOW_LABEL};
use imapgate::metrics::{Metrics, MetricsError};

fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

#[test]
fn names_get_the_prefix_and_counters_get_total() {
    let m = Metrics::new();
    let c = m.policy_counter("searches", "h", &[]).unwrap();
    assert_eq!(c.name(), "imapgate_policy_searches_total");
    let c2 = m.policy_counter("rejections_total", "h", &[]).unwrap();
    assert_eq!(c2.name(), "imapgate_policy_rejections_total");
    let g = m.policy_gauge("sessions", "h", &[]).unwrap();
    assert_eq!(g.name(), "imapgate_policy_sessions");
    let h = m.policy_histogram("size_bytes", "h", &[], None).unwrap();
    assert_eq!(h.name(), "imapgate_policy_size_bytes");
    c.inc(&[]).unwrap();
    let text = m.render();
    assert!(text.contains("# TYPE imapgate_policy_searches_total counter"));
    assert!(text.contains("\nimapgate_policy_searches_total 1\n"));
    assert!(text.contains("# TYPE imapgate_policy_size_bytes histogram"));
}

#[test]
fn redefinition_is_idempotent_and_keeps_counts() {
    let m = Metrics::new();
    let before = m.policy_counter("hits", "Hits.", &["user"]).unwrap();
    before.inc(&["alice"]).unwrap();
    // A reload runs the definition again, maybe with an edited help text.
    let after = m
        .policy_counter("hits", "Hits, reworded.", &["user"])
        .unwrap();
    after.inc(&["alice"]).unwrap();
    let text = m.render();
    assert_eq!(
        lines_of(&text, "imapgate_policy_hits_total"),
        ["imapgate_policy_hits_total{user=\"alice\"} 2"]
    );
    assert!(text.contains("# HELP imapgate_policy_hits_total Hits.\n"));

    let h1 = m
        .policy_histogram("lat", "h", &[], Some(&[0.1, 1.0]))
        .unwrap();
    let h2 = m
        .policy_histogram("lat", "h", &[], Some(&[0.1, 1.0]))
        .unwrap();
    h1.observe(&[], 0.5).unwrap();
    h2.observe(&[], 0.5).unwrap();
    assert!(m.render().contains("imapgate_policy_lat_count 2"));
}

#[test]
fn conflicting_definitions_are_refused() {
    let m = Metrics::new();
    m.policy_counter("hits", "h", &["user"]).unwrap();
    let conflict = |r: Result<(), MetricsError>| {
        assert!(
            matches!(r, Err(MetricsError::Conflict { .. })),
            "expected a conflict, got {r:?}"
        )
    };
    // Other labels, other type under the same full name.
    conflict(m.policy_counter("hits", "h", &["peer"]).map(drop));
    conflict(m.policy_counter("hits", "h", &[]).map(drop));
    // A gauge cannot take the counter's name (it may not end in `_total` at all).
    assert!(m.policy_gauge("hits_total", "h", &[]).is_err());
    m.policy_histogram("lat", "h", &[], Some(&[1.0])).unwrap();
    conflict(m.policy_histogram("lat", "h", &[], Some(&[2.0])).map(drop));
    conflict(m.policy_gauge("lat", "h", &[]).map(drop));
    // Built-in names under the prefix: imapgate_policy_decisions_total, ..._duration_seconds.
    conflict(m.policy_counter("decisions", "h", &[]).map(drop));
    conflict(m.policy_counter("errors_total", "h", &[]).map(drop));
    conflict(m.policy_gauge("duration_seconds", "h", &[]).map(drop));
    conflict(m.policy_counter("metric_overflow", "h", &[]).map(drop));
}

#[test]
fn bad_names_labels_values_and_buckets_are_refused() {
    let m = Metrics::new();
    for name in [
        "",
        "9lives",
        "camelCase",
        "with-dash",
        "with:colon",
        "__reserved",
        "sp ace",
    ] {
        assert!(
            matches!(
                m.policy_counter(name, "h", &[]),
                Err(MetricsError::InvalidName { .. })
            ),
            "{name:?}"
        );
    }
    for name in ["g_total", "g_count", "g_sum", "g_bucket"] {
        assert!(m.policy_gauge(name, "h", &[]).is_err(), "{name}");
        assert!(m.policy_histogram(name, "h", &[], None).is_err(), "{name}");
    }
    for labels in [&["le"][..], &["quantile"], &["a", "a"], &["Bad"], &["__x"]] {
        assert!(m.policy_counter("l", "h", labels).is_err(), "{labels:?}");
    }
    let nine = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    assert!(matches!(
        m.policy_counter("many", "h", &nine),
        Err(MetricsError::TooManyLabels { .. })
    ));
    for buckets in [
        &[][..],
        &[1.0, 1.0],
        &[2.0, 1.0],
        &[f64::INFINITY],
        &[f64::NAN],
    ] {
        assert!(
            matches!(
                m.policy_histogram("b", "h", &[], Some(buckets)),
                Err(MetricsError::InvalidBuckets { .. })
            ),
            "{buckets:?}"
        );
    }

    let c = m.policy_counter("c", "h", &["user"]).unwrap();
    assert!(matches!(
        c.inc(&[]),
        Err(MetricsError::LabelCount {
            expected: 1,
            got: 0,
            ..
        })
    ));
    assert!(c.inc(&["a", "b"]).is_err());
    for v in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(c.inc_by(&["a"], v), Err(MetricsError::InvalidValue { .. })),
            "{v}"
        );
    }
    let g = m.policy_gauge("g", "h", &[]).unwrap();
    assert!(g.set(&[], f64::NAN).is_err());
    g.add(&[], -3.0).unwrap();
    let h = m.policy_histogram("h", "h", &[], None).unwrap();
    assert!(h.observe(&[], f64::NEG_INFINITY).is_err());
    // Refusals leave no trace in the scrape.
    let text = m.render();
    assert!(!text.contains("imapgate_policy_c_total{"));
    assert!(text.contains("\nimapgate_policy_g -3\n"));
}

#[test]
fn label_values_are_capped_per_metric() {
    let m = Metrics::new();
    let c = m.policy_counter("by_user", "h", &["user", "cmd"]).unwrap();
    let g = m.policy_gauge("by_peer", "h", &["peer"]).unwrap();
    for i in 0..MAX_SERIES_PER_METRIC + 25 {
        c.inc(&[&format!("user{i}"), "SEARCH"]).unwrap();
        g.set(&[&format!("peer{i}")], 1.0).unwrap();
    }
    // Values already seen still get their own series after the cap is reached.
    c.inc(&["user0", "SEARCH"]).unwrap();
    let text = m.render();
    let series = lines_of(&text, "imapgate_policy_by_user_total");
    assert_eq!(series.len(), MAX_SERIES_PER_METRIC + 1);
    assert!(series.contains(&"imapgate_policy_by_user_total{cmd=\"SEARCH\",user=\"user0\"} 2"));
    let overflow = format!(
        "imapgate_policy_by_user_total{{cmd=\"{OVERFLOW_LABEL}\",user=\"{OVERFLOW_LABEL}\"}} 25"
    );
    assert!(series.contains(&overflow.as_str()), "{series:?}");
    assert!(text.contains(
        "imapgate_policy_metric_overflow_total{metric=\"imapgate_policy_by_user_total\"} 25"
    ));
    assert_eq!(
        lines_of(&text, "imapgate_policy_by_peer").len(),
        MAX_SERIES_PER_METRIC + 1
    );

    // The cap survives a reload: the same definition shares the same set.
    let again = m.policy_counter("by_user", "h", &["user", "cmd"]).unwrap();
    again.inc(&["someone new", "SEARCH"]).unwrap();
    assert!(m.render().contains(
        "imapgate_policy_metric_overflow_total{metric=\"imapgate_policy_by_user_total\"} 26"
    ));
}

#[test]
fn long_label_values_are_cut() {
    let m = Metrics::new();
    let c = m.policy_counter("long", "h", &["v"]).unwrap();
    c.inc(&[&"é".repeat(100)]).unwrap();
    c.inc(&[&format!("{}tail", "é".repeat(64))]).unwrap();
    let text = m.render();
    // 128 bytes = 64 two-byte characters; both values share that prefix, so one series.
    let expected = format!("imapgate_policy_long_total{{v=\"{}\"}} 2", "é".repeat(64));
    assert_eq!(
        lines_of(&text, "imapgate_policy_long_total"),
        [expected.as_str()]
    );
}

#[test]
fn handles_work_across_threads() {
    let m = Metrics::new();
    let c = m.policy_counter("threads", "h", &["t"]).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let c = c.clone();
            s.spawn(move || {
                for _ in 0..1000 {
                    c.inc(&[&t.to_string()]).unwrap();
                }
            });
        }
    });
    let text = m.render();
    assert_eq!(lines_of(&text, "imapgate_policy_threads_total").len(), 4);
    assert!(text.contains("imapgate_policy_threads_total{t=\"3\"} 1000"));
}
