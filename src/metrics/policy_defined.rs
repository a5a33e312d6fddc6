//! Metrics that policies define at load time (`imap.metrics.counter/gauge/histogram` in Lua),
//! exported beside the built-in ones.
//!
//! Three guards keep a policy, and through it a client, from hurting the scrape:
//!
//! - Names get the `imapgate_policy_` prefix and must not clash with any other family, built-in
//!   or policy-defined, including a histogram's `_bucket`/`_sum`/`_count` names. Names and
//!   label names are lower-case snake_case (see `names`); counters get `_total` appended when
//!   they lack it, gauges and histograms may not end in `_total`, `_bucket`, `_sum` or
//!   `_count`, and `le` and `quantile` are no label names: what promtool's lint would flag is
//!   refused at definition, so a policy cannot make the scrape fail `promtool check metrics`
//!   (except for unit words such as `_ms`, which promtool advises against: use base units).
//! - A definition is idempotent: the same name with the same type and labels (and buckets)
//!   returns a handle to the same family, so a policy reload re-registers without error and
//!   keeps the counts. The help text of the first definition stays; a changed help text is not
//!   a conflict, as refusing it would make a typo fix in a comment break a live reload.
//! - Each metric keeps at most [`MAX_SERIES_PER_METRIC`] distinct label-value combinations.
//!   Beyond that, updates go to one series whose every label is [`OVERFLOW_LABEL`] (so totals
//!   stay right), and `imapgate_policy_metric_overflow_total{metric}` counts them. Label values
//!   are cut to [`MAX_LABEL_VALUE`] bytes, so a client-chosen string cannot make a huge scrape.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, Opts, Registry,
};

use super::MetricsError;
use super::builtin::BUILTIN_NAMES;
use super::names::{POLICY_PREFIX, check_name, exposed_names};

/// Distinct label-value combinations one policy-defined metric may have.
pub const MAX_SERIES_PER_METRIC: usize = 100;
/// Policy-defined metric families, all policies together.
pub const MAX_POLICY_METRICS: usize = 256;
/// Labels one policy-defined metric may have.
pub const MAX_LABELS: usize = 8;
/// Longest label value kept, in bytes; longer values are cut at a character boundary.
pub const MAX_LABEL_VALUE: usize = 128;
/// Longest help text kept, in bytes.
const MAX_HELP: usize = 300;
/// Most buckets a policy histogram may have.
const MAX_BUCKETS: usize = 40;
/// The label value of the series that takes updates beyond the cap.
pub const OVERFLOW_LABEL: &str = "__overflow__";

/// What was defined, to tell a re-definition from a conflicting one.
#[derive(Clone, Debug, PartialEq)]
enum Shape {
    Counter,
    Gauge,
    Histogram(Vec<f64>),
}

impl Shape {
    fn describe(&self) -> &'static str {
        match self {
            Shape::Counter => "counter",
            Shape::Gauge => "gauge",
            Shape::Histogram(_) => "histogram",
        }
    }
}

#[derive(Clone)]
enum Handle {
    Counter(PolicyCounter),
    Gauge(PolicyGauge),
    Histogram(PolicyHistogram),
}

struct Definition {
    shape: Shape,
    labels: Vec<String>,
    handle: Handle,
}

/// The policy-defined families of one [`super::Metrics`].
pub(crate) struct PolicyDefined {
    registry: Registry,
    overflow: IntCounterVec,
    defs: Mutex<HashMap<String, Definition>>,
}

impl PolicyDefined {
    pub fn new(registry: Registry, overflow: IntCounterVec) -> PolicyDefined {
        PolicyDefined {
            registry,
            overflow,
            defs: Mutex::new(HashMap::new()),
        }
    }

    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<PolicyCounter, MetricsError> {
        check_name(name, "metric")?;
        // Counters end in `_total` (Prometheus convention, and promtool checks it): added when
        // the policy did not write it, so `counter("searches")` is `..._searches_total`.
        let full = if name.ends_with("_total") {
            format!("{POLICY_PREFIX}{name}")
        } else {
            format!("{POLICY_PREFIX}{name}_total")
        };
        let handle = self.define(&full, help, labels, Shape::Counter, |opts, labels| {
            let vec = CounterVec::new(opts, labels)?;
            Ok((
                Box::new(vec.clone()),
                Handle::Counter(PolicyCounter(Series::new(&full, vec, labels.len(), self))),
            ))
        })?;
        match handle {
            Handle::Counter(c) => {
                touch_unlabelled(&c.0)?;
                Ok(c)
            }
            _ => Err(self.conflict_unreachable(&full)),
        }
    }

    pub fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<PolicyGauge, MetricsError> {
        check_name(name, "metric")?;
        refuse_reserved_suffix(name)?;
        let full = format!("{POLICY_PREFIX}{name}");
        let handle = self.define(&full, help, labels, Shape::Gauge, |opts, labels| {
            let vec = GaugeVec::new(opts, labels)?;
            Ok((
                Box::new(vec.clone()),
                Handle::Gauge(PolicyGauge(Series::new(&full, vec, labels.len(), self))),
            ))
        })?;
        match handle {
            Handle::Gauge(g) => {
                touch_unlabelled(&g.0)?;
                Ok(g)
            }
            _ => Err(self.conflict_unreachable(&full)),
        }
    }

    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Option<&[f64]>,
    ) -> Result<PolicyHistogram, MetricsError> {
        check_name(name, "metric")?;
        refuse_reserved_suffix(name)?;
        let full = format!("{POLICY_PREFIX}{name}");
        let buckets = match buckets {
            Some(b) => check_buckets(&full, b)?,
            None => prometheus::DEFAULT_BUCKETS.to_vec(),
        };
        let shape = Shape::Histogram(buckets.clone());
        let handle = self.define(&full, help, labels, shape, |opts, labels| {
            let vec = HistogramVec::new(HistogramOpts::from(opts).buckets(buckets), labels)?;
            Ok((
                Box::new(vec.clone()),
                Handle::Histogram(PolicyHistogram(Series::new(&full, vec, labels.len(), self))),
            ))
        })?;
        match handle {
            Handle::Histogram(h) => {
                touch_unlabelled(&h.0)?;
                Ok(h)
            }
            _ => Err(self.conflict_unreachable(&full)),
        }
    }

    /// Returns the existing handle for an identical definition, or registers a new family.
    fn define(
        &self,
        full: &str,
        help: &str,
        labels: &[&str],
        shape: Shape,
        build: impl FnOnce(Opts, &[&str]) -> prometheus::Result<(Box<dyn Collector>, Handle)>,
    ) -> Result<Handle, MetricsError> {
        check_labels(full, labels)?;
        let mut defs = self.defs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = defs.get(full) {
            if existing.shape == shape && existing.labels == labels {
                return Ok(existing.handle.clone());
            }
            return Err(MetricsError::Conflict {
                name: full.to_owned(),
                existing: format!(
                    "a {} with labels [{}]",
                    existing.shape.describe(),
                    existing.labels.join(", ")
                ),
            });
        }
        if defs.len() >= MAX_POLICY_METRICS {
            return Err(MetricsError::TooManyMetrics {
                max: MAX_POLICY_METRICS,
            });
        }
        let wanted = exposed_names(full, matches!(shape, Shape::Histogram(_)));
        let taken = BUILTIN_NAMES
            .iter()
            .flat_map(|(n, h)| exposed_names(n, *h))
            .chain(
                defs.iter()
                    .flat_map(|(n, d)| exposed_names(n, matches!(d.shape, Shape::Histogram(_)))),
            );
        for name in taken {
            if wanted.contains(&name) {
                return Err(MetricsError::Conflict {
                    name: full.to_owned(),
                    existing: format!("the metric family that exposes `{name}`"),
                });
            }
        }
        let (collector, handle) = build(Opts::new(full, help_text(help)), labels)?;
        self.registry.register(collector)?;
        defs.insert(
            full.to_owned(),
            Definition {
                shape,
                labels: labels.iter().map(|l| (*l).to_owned()).collect(),
                handle: handle.clone(),
            },
        );
        Ok(handle)
    }

    /// `define` returns the handle kind of the shape it checked, so this cannot happen; an
    /// error rather than a panic all the same.
    fn conflict_unreachable(&self, full: &str) -> MetricsError {
        MetricsError::Conflict {
            name: full.to_owned(),
            existing: "a metric of another type".to_owned(),
        }
    }
}

/// Creates the one series of a metric without labels, so that it is in the scrape (at 0) from
/// its definition on, not from its first update: `rate()` needs the zero.
fn touch_unlabelled<V: Family>(series: &Series<V>) -> Result<(), MetricsError> {
    if series.labels == 0 {
        series.series(&[])?;
    }
    Ok(())
}

/// Gauges and histograms must not take the suffixes that mean something else in the text
/// format: `_total` is for counters, `_bucket`, `_sum` and `_count` for histogram series.
fn refuse_reserved_suffix(name: &str) -> Result<(), MetricsError> {
    for (suffix, reason) in [
        ("_total", "only counters end in `_total`"),
        ("_bucket", "`_bucket` is reserved for histogram series"),
        ("_sum", "`_sum` is reserved for histogram series"),
        ("_count", "`_count` is reserved for histogram series"),
    ] {
        if name.ends_with(suffix) {
            return Err(MetricsError::InvalidName {
                what: "metric",
                name: name.to_owned(),
                reason,
            });
        }
    }
    Ok(())
}

fn check_labels(full: &str, labels: &[&str]) -> Result<(), MetricsError> {
    if labels.len() > MAX_LABELS {
        return Err(MetricsError::TooManyLabels {
            name: full.to_owned(),
            max: MAX_LABELS,
        });
    }
    let mut seen = HashSet::new();
    for label in labels {
        check_name(label, "label")?;
        // Reserved for every type, not only histograms and summaries, as promtool's lint has it.
        if matches!(*label, "le" | "quantile") {
            return Err(MetricsError::InvalidName {
                what: "label",
                name: (*label).to_owned(),
                reason: "`le` and `quantile` are reserved for histogram and summary series",
            });
        }
        if !seen.insert(*label) {
            return Err(MetricsError::InvalidName {
                what: "label",
                name: (*label).to_owned(),
                reason: "it is given twice",
            });
        }
    }
    Ok(())
}

fn check_buckets(full: &str, buckets: &[f64]) -> Result<Vec<f64>, MetricsError> {
    let invalid = |reason: &'static str| MetricsError::InvalidBuckets {
        name: full.to_owned(),
        reason,
    };
    if buckets.is_empty() {
        return Err(invalid("no bucket given"));
    }
    if buckets.len() > MAX_BUCKETS {
        return Err(invalid("more than 40 buckets"));
    }
    if buckets.iter().any(|b| !b.is_finite()) {
        return Err(invalid(
            "bucket bounds must be finite (+Inf is always added)",
        ));
    }
    if buckets.windows(2).any(|w| w[0] >= w[1]) {
        return Err(invalid("bucket bounds must increase strictly"));
    }
    Ok(buckets.to_vec())
}

fn help_text(help: &str) -> String {
    let help = help.trim();
    if help.is_empty() {
        // Prometheus requires a help text; a policy may not care to give one.
        return "Defined by a policy.".to_owned();
    }
    truncate(help, MAX_HELP).to_owned()
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The label-value combinations a metric has used, up to the cap.
#[derive(Debug)]
struct SeriesSet {
    seen: Mutex<HashSet<Vec<String>>>,
    overflow: IntCounter,
}

impl SeriesSet {
    /// The label values to record under: the given ones (cut to length) while the metric has
    /// room for them, the overflow series once it has not.
    fn admit(&self, values: &[&str]) -> Vec<String> {
        let key: Vec<String> = values
            .iter()
            .map(|v| truncate(v, MAX_LABEL_VALUE).to_owned())
            .collect();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&key) {
            return key;
        }
        if seen.len() < MAX_SERIES_PER_METRIC {
            seen.insert(key.clone());
            return key;
        }
        drop(seen);
        self.overflow.inc();
        vec![OVERFLOW_LABEL.to_owned(); values.len()]
    }
}

/// A labelled family: the one thing [`Series`] needs from prometheus's vector types, whose
/// builder type parameters the crate does not export.
trait Family: Clone {
    type Metric;
    fn series(&self, values: &[&str]) -> prometheus::Result<Self::Metric>;
}

impl Family for CounterVec {
    type Metric = Counter;
    fn series(&self, values: &[&str]) -> prometheus::Result<Counter> {
        self.get_metric_with_label_values(values)
    }
}

impl Family for GaugeVec {
    type Metric = Gauge;
    fn series(&self, values: &[&str]) -> prometheus::Result<Gauge> {
        self.get_metric_with_label_values(values)
    }
}

impl Family for HistogramVec {
    type Metric = Histogram;
    fn series(&self, values: &[&str]) -> prometheus::Result<Histogram> {
        self.get_metric_with_label_values(values)
    }
}

/// A policy-defined family with its cap.
#[derive(Clone)]
struct Series<V: Family> {
    name: Arc<str>,
    vec: V,
    labels: usize,
    set: Arc<SeriesSet>,
}

impl<V: Family> Series<V> {
    fn new(name: &str, vec: V, labels: usize, owner: &PolicyDefined) -> Series<V> {
        Series {
            name: name.into(),
            vec,
            labels,
            set: Arc::new(SeriesSet {
                seen: Mutex::new(HashSet::new()),
                overflow: owner.overflow.with_label_values(&[name]),
            }),
        }
    }

    fn series(&self, values: &[&str]) -> Result<V::Metric, MetricsError> {
        if values.len() != self.labels {
            return Err(MetricsError::LabelCount {
                name: self.name.to_string(),
                expected: self.labels,
                got: values.len(),
            });
        }
        let admitted = self.set.admit(values);
        let refs: Vec<&str> = admitted.iter().map(String::as_str).collect();
        Ok(self.vec.series(&refs)?)
    }

    fn invalid_value(&self, value: f64, reason: &'static str) -> MetricsError {
        MetricsError::InvalidValue {
            name: self.name.to_string(),
            value,
            reason,
        }
    }
}

impl<V: Family> std::fmt::Debug for Series<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Series")
            .field("name", &self.name)
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

/// A counter a policy defined. Label values are given in the order of the label names at
/// definition.
#[derive(Clone, Debug)]
pub struct PolicyCounter(Series<CounterVec>);

impl PolicyCounter {
    /// The full exported name, `imapgate_policy_..._total`.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn inc(&self, label_values: &[&str]) -> Result<(), MetricsError> {
        self.inc_by(label_values, 1.0)
    }

    /// Counters only go up: a negative, NaN or infinite `by` is refused.
    pub fn inc_by(&self, label_values: &[&str], by: f64) -> Result<(), MetricsError> {
        if !by.is_finite() || by < 0.0 {
            return Err(self
                .0
                .invalid_value(by, "a counter only grows by a finite number ≥ 0"));
        }
        self.0.series(label_values)?.inc_by(by);
        Ok(())
    }
}

/// A gauge a policy defined.
#[derive(Clone, Debug)]
pub struct PolicyGauge(Series<GaugeVec>);

impl PolicyGauge {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn set(&self, label_values: &[&str], value: f64) -> Result<(), MetricsError> {
        if !value.is_finite() {
            return Err(self.0.invalid_value(value, "a gauge holds a finite number"));
        }
        self.0.series(label_values)?.set(value);
        Ok(())
    }

    /// Adds `delta`, which may be negative.
    pub fn add(&self, label_values: &[&str], delta: f64) -> Result<(), MetricsError> {
        if !delta.is_finite() {
            return Err(self.0.invalid_value(delta, "a gauge holds a finite number"));
        }
        self.0.series(label_values)?.add(delta);
        Ok(())
    }
}

/// A histogram a policy defined.
#[derive(Clone, Debug)]
pub struct PolicyHistogram(Series<HistogramVec>);

impl PolicyHistogram {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn observe(&self, label_values: &[&str], value: f64) -> Result<(), MetricsError> {
        if !value.is_finite() {
            return Err(self
                .0
                .invalid_value(value, "an observation is a finite number"));
        }
        self.0.series(label_values)?.observe(value);
        Ok(())
    }
}
