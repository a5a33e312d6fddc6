//! Shared support for integration tests: `mod support;` in an area's root file
//! (tests/proxy.rs, ...), then
//!
//! - [`pki`]: a test CA and leaf certificates (rcgen), as PEM strings and files;
//! - [`dovecot`]: a private real Dovecot per test (or one shared per test binary);
//! - [`client`]: a small async IMAP client whose tests read like transcripts;
//! - [`tap`]: a recording TCP relay between imapgate and Dovecot (what the server received
//!   and answered, chunk by chunk with timings), which can also inject bytes of its own;
//! - [`evidence`]: /metrics, /healthz, the audit log and Dovecot's log, read after the fact;
//! - [`haproxy`]: a private real HAProxy in TCP mode in front of one server;
//! - [`redis`]: a private real redis-server (freeze/thaw for a hung server);
//! - [`oauth`]: a token introspection endpoint for a Dovecot that checks OAuth tokens.
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
//! Not every test binary uses every helper. One binary runs many modules' tests in parallel:
//! a test that asserts a latency holds [`quiet`], and a test that loads the cores [`busy`].
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod dovecot;
pub mod evidence;
pub mod haproxy;
pub mod oauth;
pub mod pki;
pub mod proxy;
pub mod redis;
pub mod tap;

pub use client::{
    Client, assert_tagged, capabilities, insecure_tls_config, list_names, quote, tls_config,
};
pub use dovecot::{Dovecot, DovecotOptions, Oauth2Options, generated_user};
pub use oauth::TokenChecker;
pub use pki::Pki;

/// `name` from PATH, else from `dirs`; panics saying which Debian package has it.
pub fn find_binary(name: &str, dirs: &[&str], package: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(dirs.iter().map(std::path::PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found: install it with `apt-get install {package}` (.ci/run does this)"
            )
        })
}

/// Sends `signal` (`TERM`, `HUP`, `KILL`, `STOP`, `CONT`) to the process `pid`, and only to
/// it; panics if it cannot (the process is gone).
pub fn signal_pid(pid: u32, signal: &str) {
    let target = i32::try_from(pid)
        .ok()
        .filter(|&p| p > 1)
        .and_then(rustix::process::Pid::from_raw)
        .unwrap_or_else(|| panic!("refusing to signal pid {pid}"));
    rustix::process::kill_process(target, signal_named(signal))
        .unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

/// The signal called `name` (without `SIG`).
pub fn signal_named(name: &str) -> rustix::process::Signal {
    use rustix::process::Signal;
    match name {
        "TERM" => Signal::TERM,
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "KILL" => Signal::KILL,
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        "QUIT" => Signal::QUIT,
        other => panic!("no signal {other} in the test support"),
    }
}

/// Held exclusively by a test that bounds a latency ([`quiet`]), shared by each test that loads
/// the cores ([`busy`]): one test binary holds many areas' tests, run two at a time, and a
/// latency bound must not measure a neighbour's load.
static LOAD: std::sync::LazyLock<std::sync::Arc<tokio::sync::RwLock<()>>> =
    std::sync::LazyLock::new(Default::default);

/// Keeps every [`busy`] test from running while held.
pub type Quiet = tokio::sync::OwnedRwLockWriteGuard<()>;
/// Keeps any [`quiet`] test from running while held.
pub type Busy = tokio::sync::OwnedRwLockReadGuard<()>;

/// For a test that asserts a latency: waits until no [`busy`] test runs, and keeps new ones
/// from starting until dropped.
pub async fn quiet() -> Quiet {
    LOAD.clone().write_owned().await
}

/// For a test that loads the cores (many sessions, big literals, external clients, the
/// differential or load harness): waits while a [`quiet`] test runs.
pub async fn busy() -> Busy {
    LOAD.clone().read_owned().await
}

/// [`busy`] for a test without an async runtime.
pub fn busy_blocking() -> Busy {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime to wait on")
        .block_on(busy())
}

/// Waits (up to 5 s) for the shell that runs a test server to end, once told to (its stdin
/// closed); says so when it does not.
pub fn reap(shell: &mut std::process::Child, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = shell.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!("the {what} shell (pid {}) did not stop", shell.id());
}

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

/// A test message of `size` octets: a few headers, then printable lines with CRLF ends, varied
/// by `seed` (so that a mix-up between two messages shows).
pub fn message(size: usize, seed: u32) -> Vec<u8> {
    let mut m = format!("From: test@example.org\r\nSubject: test {seed}\r\n\r\n").into_bytes();
    let mut x = seed.wrapping_add(1);
    while m.len() < size {
        if m.len() % 78 == 76 {
            m.extend_from_slice(b"\r\n");
            continue;
        }
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        m.push(b' ' + ((x >> 16) % 94) as u8);
    }
    m.truncate(size.saturating_sub(2));
    m.extend_from_slice(b"\r\n");
    m
}

/// A field of /proc/PID/status in KiB (`VmRSS:`, `VmHWM:`), 0 when unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
