//! imapgate in front of a private Dovecot, for end-to-end tests: in-process (`Proxy`) or as the
//! real binary (`ProxyProcess`), on ports picked by the OS.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imapgate::config::{Config, ListenerConfig, ListenerTls, UpstreamConfig, UpstreamTls};
use imapgate::server::Server;

use super::dovecot::Dovecot;
use super::proc_status_kib;

/// The listeners every test proxy has, by name.
pub const IMAPS: &str = "imaps";
pub const STARTTLS: &str = "imap";
pub const PLAIN: &str = "plain";

/// A config with three listeners on 127.0.0.1 (implicit TLS, STARTTLS, plaintext), all with
/// the Dovecot's test PKI certificate, relaying to `dc` over `upstream_tls`.
pub fn config_for(dc: &Dovecot, upstream_tls: UpstreamTls) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let listener = |name: &str, tls| {
        let mut l = ListenerConfig::new(any, tls);
        l.name = name.to_string();
        l.cert = Some(dc.pki().cert.clone());
        l.key = Some(dc.pki().key.clone());
        l
    };
    let address = match upstream_tls {
        UpstreamTls::Implicit => dc.tls_addr(),
        UpstreamTls::None | UpstreamTls::Starttls => dc.addr(),
    };
    Config {
        listeners: vec![
            listener(IMAPS, ListenerTls::Implicit),
            listener(STARTTLS, ListenerTls::Starttls),
            listener(PLAIN, ListenerTls::None),
        ],
        upstreams: vec![UpstreamConfig {
            address: address.to_string(),
            tls: upstream_tls,
            server_name: Some("localhost".into()),
            ca: Some(dc.pki().ca.clone()),
            ..UpstreamConfig::default()
        }],
        // Tests end with clients still connected: do not wait long for them at shutdown.
        limits: imapgate::config::Limits {
            drain_timeout_s: 1,
            ..imapgate::config::Limits::default()
        },
        ..Config::default()
    }
}

/// imapgate running inside the test process.
pub struct Proxy {
    server: Option<Server>,
}

impl Proxy {
    pub async fn start(config: Config) -> Proxy {
        let server = Server::start(config).await.expect("imapgate starts");
        Proxy {
            server: Some(server),
        }
    }

    /// imapgate in front of `dc` with the default test config.
    pub async fn for_dovecot(dc: &Dovecot, upstream_tls: UpstreamTls) -> Proxy {
        Proxy::start(config_for(dc, upstream_tls)).await
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.server
            .as_ref()
            .and_then(|s| s.addr(listener))
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    /// The running server, for what a test does to it directly (reloads, health).
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("imapgate runs until shutdown")
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().and_then(Server::metrics_addr)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().and_then(Server::admin_addr)
    }

    pub fn active(&self) -> usize {
        self.server.as_ref().map_or(0, Server::active)
    }

    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// The imapgate binary as a child process, with its stderr (the log) collected.
pub struct ProxyProcess {
    child: Child,
    pub addrs: Vec<(String, SocketAddr)>,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Writes `toml` (with `@PORT_name@` placeholders replaced by free ports) to a file and
    /// runs `imapgate run --config` on it with `RUST_LOG=rust_log`.
    pub fn start(toml: &str, listeners: &[&str], rust_log: &str) -> ProxyProcess {
        let dir = super::temp_dir();
        let mut text = toml.to_string();
        let mut addrs = Vec::new();
        for name in listeners {
            let port = free_port();
            text = text.replace(&format!("@PORT_{name}@"), &port.to_string());
            addrs.push((name.to_string(), SocketAddr::from(([127, 0, 0, 1], port))));
        }
        let path = dir.path().join("imapgate.toml");
        std::fs::write(&path, text).expect("write config");
        let mut child = Command::new(binary())
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn imapgate");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let p = ProxyProcess {
            child,
            addrs,
            log,
            _dir: dir,
        };
        for (_, addr) in &p.addrs {
            wait_listening(*addr);
        }
        p
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`; returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Resident set size now, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// Peak resident set size, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The imapgate binary cargo built for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_imapgate"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_listening(addr: SocketAddr) {
    for _ in 0..500 {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("imapgate did not listen on {addr}");
}

/// A TOML string for a path (quoted, escaped).
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}
