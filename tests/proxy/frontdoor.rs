//! The front door of a mail cluster (issue 10), end to end against real private Dovecots:
//! routing, the client's real address (PROXY protocol in and out, ID forwarding), health and
//! failover, certificates by SNI, operators' controls. One module per feature.

#[path = "frontdoor/admin.rs"]
mod admin;
#[path = "frontdoor/health.rs"]
mod health;
#[path = "frontdoor/oauth.rs"]
mod oauth;
#[path = "frontdoor/policies.rs"]
mod policies;
#[path = "frontdoor/proxy_protocol.rs"]
mod proxy_protocol;
#[path = "frontdoor/routing.rs"]
mod routing;
#[path = "frontdoor/sni.rs"]
mod sni;
