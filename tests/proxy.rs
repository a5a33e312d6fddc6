//! imapgate relaying to real private Dovecots, in process and as the binary: the relay, the
//! process (limits, timeouts, signals, the log), the configuration's errors, the front door of
//! a cluster (`frontdoor`, issue 10), the attacks of the security model (`security`, issue 9),
//! the differential test of pipelines (`differential`), the test harness's own Dovecot
//! (`dovecot_smoke`) and a smoke run of the load harness (`bench_smoke`). One module per
//! subject.

mod support;

// The load harness (benches/load) names itself `crate::load`.
#[path = "../benches/load/mod.rs"]
mod load;

#[path = "proxy/bench_smoke.rs"]
mod bench_smoke;
#[path = "proxy/config_examples.rs"]
mod config_examples;
#[path = "proxy/differential.rs"]
mod differential;
#[path = "proxy/dovecot_smoke.rs"]
mod dovecot_smoke;
#[path = "proxy/frontdoor.rs"]
mod frontdoor;
#[path = "proxy/process.rs"]
mod process;
#[path = "proxy/relay.rs"]
mod relay;
#[path = "proxy/security.rs"]
mod security;
