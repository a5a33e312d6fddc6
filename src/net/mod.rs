//! Networking: listeners, TLS and the upstream connection.
