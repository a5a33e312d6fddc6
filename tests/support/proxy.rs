//! imapgate in front of a private Dovecot, for end-to-end tests: in-process (`Proxy`) or as the
//! real binary (`ProxyProcess`), on ports picked by the OS (port 0) and read back from the
//! server (`Server::addr`) or from the binary's ready file.

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
    ready: Ready,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// What `imapgate run --ready-file` writes once it listens (README, "Command line").
#[derive(Debug, serde::Deserialize)]
struct Ready {
    pid: u32,
    listeners: Vec<ReadyListener>,
    metrics: Option<SocketAddr>,
    admin: Option<SocketAddr>,
}

#[derive(Debug, serde::Deserialize)]
struct ReadyListener {
    name: String,
    addr: SocketAddr,
}

/// How long imapgate may take to start (policies load, upstreams get a first probe).
const START_TIMEOUT: Duration = Duration::from_secs(30);

impl ProxyProcess {
    /// Writes `toml` to a file and runs `imapgate run --config` on it with
    /// `RUST_LOG=rust_log`; returns once imapgate has written its ready file. Binds in `toml`
    /// should be `127.0.0.1:0`: the addresses imapgate bound are read from that file, so no
    /// port is guessed and no probe connection reaches imapgate before the test's own.
    pub fn start(toml: &str, rust_log: &str) -> ProxyProcess {
        let dir = super::temp_dir();
        let path = dir.path().join("imapgate.toml");
        std::fs::write(&path, toml).expect("write config");
        let ready_file = dir.path().join("ready.json");
        let mut child = Command::new(binary())
            .args(["run", "--config"])
            .arg(&path)
            .arg("--ready-file")
            .arg(&ready_file)
            .env("RUST_LOG", rust_log)
            // Plain text, no colour codes between a line's fields: tests search it.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn imapgate");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let ready = wait_ready(&mut child, &ready_file, &log, reader);
        ProxyProcess {
            child,
            ready,
            log,
            _dir: dir,
        }
    }

    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.ready
            .listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.addr)
            .unwrap_or_else(|| panic!("no listener {name}: {:?}", self.ready))
    }

    /// The bound address of the metrics endpoint (panics without `[metrics]`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ready.metrics.expect("no [metrics] endpoint")
    }

    /// The bound address of the admin endpoint (panics without `[admin]`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.ready.admin.expect("no [admin] endpoint")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Polls the log until `needle` occurs `count` times (up to 10 s); panics with the log.
    pub async fn wait_for_log(&self, needle: &str, count: usize) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while self.log().matches(needle).count() < count {
            assert!(
                std::time::Instant::now() < end,
                "the log never said {needle:?} {count} times:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `signal` (`TERM`, `HUP`, `KILL`, ...) to this process, by its PID.
    pub fn signal(&self, signal: &str) {
        super::signal_pid(self.child.id(), signal);
    }

    /// Waits for the process to exit, up to `limit`; returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
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
        // By its PID (SIGKILL), and reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls for imapgate's ready file; if imapgate exits first, takes too long or writes
/// something else, stops it (by its PID) and panics with its log.
fn wait_ready(
    child: &mut Child,
    path: &Path,
    log: &Mutex<String>,
    reader: std::thread::JoinHandle<()>,
) -> Ready {
    let end = std::time::Instant::now() + START_TIMEOUT;
    let failure = loop {
        // Written under another name and renamed: what exists is complete.
        if let Ok(text) = std::fs::read_to_string(path) {
            match serde_json::from_str::<Ready>(&text) {
                Ok(ready) if ready.pid == child.id() => return ready,
                Ok(_) => break format!("a ready file of another process: {text}"),
                Err(e) => break format!("ready file {text:?}: {e}"),
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            break format!("imapgate exited at start ({status})");
        }
        if std::time::Instant::now() >= end {
            break format!("imapgate wrote no ready file within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = child.kill();
    let _ = child.wait();
    // Its stderr is closed: the reader ends once it has every line.
    let _ = reader.join();
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    panic!("{failure}; its log:\n{log}");
}

/// The imapgate binary cargo built for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_imapgate"))
}

/// A port of 127.0.0.1 free now, for an EXTERNAL server that cannot bind port 0 and report it
/// (redis-server started on a port chosen in advance). Another process may take it before
/// the server binds: the server's helper retries on a clash. Never for imapgate, which binds
/// port 0 and says what it got.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A port of 127.0.0.1 that refuses connections for as long as the value lives: bound, never
/// listening, so that nothing else can take it meanwhile (an upstream that is down).
pub struct DeadPort {
    addr: SocketAddr,
    _socket: socket2::Socket,
}

impl DeadPort {
    pub fn new() -> DeadPort {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("TCP socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        socket.bind(&any.into()).expect("bind 127.0.0.1:0");
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("bound address");
        DeadPort {
            addr,
            _socket: socket,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A TOML string for a path (quoted, escaped).
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}
