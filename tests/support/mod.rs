//! Shared support for integration tests: `mod support;` in a test file, then
//!
//! - [`pki`]: a test CA and leaf certificates (rcgen), as PEM strings and files;
//! - [`dovecot`]: a private real Dovecot per test (or one shared per test binary);
//! - [`client`]: a small async IMAP client whose tests read like transcripts.
//!
//! ```ignore
//! mod support;
//! use support::{Client, Dovecot};
//!
//! #[tokio::test]
//! async fn login() {
//!     let dc = Dovecot::shared();
//!     let (user, pass) = dc.fresh_user();
//!     let mut c = Client::connect(dc.addr()).await;
//!     c.read_greeting().await;
//!     c.login(&user, &pass).await;
//!     c.logout().await;
//! }
//! ```
//!
//! Not every test binary uses every helper.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod dovecot;
pub mod pki;
pub mod proxy;

pub use client::{Client, assert_tagged, capabilities, insecure_tls_config, quote, tls_config};
pub use dovecot::{Dovecot, DovecotOptions, generated_user};
pub use pki::Pki;

/// A folder for a test's files, removed when dropped (mode 0755 so that services running
/// as other users can read what a root test writes there).
pub fn temp_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("imapgate-test-")
        .tempdir()
        .expect("create temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    dir
}
