//! The front door of a mail cluster (issue 10), end to end against real private Dovecots:
//! routing, the client's real address (PROXY protocol in and out, ID forwarding), health and
//! failover, certificates by SNI, operators' controls. One module per feature.

mod support;

mod admin;
mod health;
mod proxy_protocol;
mod routing;
mod sni;
