//! Many imapgates, one policy (issue 11), end to end against real parts: a private
//! redis-server, HAProxy, Dovecot and imapgate processes. One module per feature.

mod support;

#[path = "cluster/connection_limit.rs"]
mod connection_limit;
#[path = "cluster/examples.rs"]
mod examples;
#[path = "cluster/hooks.rs"]
mod hooks;
#[path = "cluster/policies.rs"]
mod policies;
#[path = "cluster/state.rs"]
mod state;
