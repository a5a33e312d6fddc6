//! Observability: the /metrics text format, the HTTP endpoint, metrics defined by policies, the
//! audit log, the Grafana dashboard, and one scripted session through imapgate and a real
//! Dovecot whose counts must be exact. One module per subject.

mod support;

#[path = "metrics/audit.rs"]
mod audit;
#[path = "metrics/dashboard.rs"]
mod dashboard;
#[path = "metrics/format.rs"]
mod format;
#[path = "metrics/http.rs"]
mod http;
#[path = "metrics/policy.rs"]
mod policy;
#[path = "metrics/session.rs"]
mod session;
