//! (filled in by the proxy_protocol work of issue 10)
