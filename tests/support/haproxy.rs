//! A private, real HAProxy (Debian package `haproxy`) in TCP mode in front of one server, for
//! tests of the PROXY protocol behind a real load balancer.
//!
//! `haproxy -db -f FILE` runs under a small `sh` that holds its PID and reads a pipe from the
//! test process: dropping the [`Haproxy`], or the test process ending in any way, closes the
//! pipe and the shell stops HAProxy by that PID. The config, log and nothing else live in a
//! temp folder.
//!
//! ```ignore
//! let lb = Haproxy::start(imapgate_addr, "send-proxy-v2");
//! let mut c = Client::connect(lb.addr()).await;
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running HAProxy; dropping it stops it.
pub struct Haproxy {
    addr: SocketAddr,
    shell: Child,
    pipe: Option<ChildStdin>,
    dir: tempfile::TempDir,
}

impl Haproxy {
    /// HAProxy on a free port of 127.0.0.1 relaying every connection to `backend`, with
    /// `server_options` on its `server` line (`send-proxy-v2`, `send-proxy`). Panics with
    /// HAProxy's log if it does not come up.
    pub fn start(backend: SocketAddr, server_options: &str) -> Haproxy {
        Haproxy::start_balanced(&[backend], server_options)
    }

    /// HAProxy relaying connections to `backends` in turn (`balance roundrobin`), each
    /// `server` line with `server_options`. A connection a backend refuses (one that died) is
    /// sent to the next (`option redispatch`).
    pub fn start_balanced(backends: &[SocketAddr], server_options: &str) -> Haproxy {
        let mut last = String::new();
        // HAProxy cannot bind port 0 and tell which port it got: a free port is found by
        // binding port 0 and releasing it, another process may take it in between, so a
        // clash is retried on another.
        for _ in 0..3 {
            let mut lb = Haproxy::spawn(backends, server_options);
            match lb.wait_ready() {
                Ok(()) => return lb,
                Err(e) => {
                    last = format!("{e}\n--- haproxy log ---\n{}", lb.log());
                    if !lb.log().contains("cannot bind") {
                        break;
                    }
                }
            }
        }
        panic!("HAProxy did not start: {last}");
    }

    fn spawn(backends: &[SocketAddr], server_options: &str) -> Haproxy {
        let dir = super::temp_dir();
        let port = super::proxy::free_port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("    server imapgate{i} {b} {server_options}\n"))
            .collect();
        let config = format!(
            "global\n    maxconn 200\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    \
             timeout server 60s\n    retries 2\n    option redispatch 1\n\n\
             frontend imap\n    bind {addr}\n    default_backend imapgate\n\n\
             backend imapgate\n    balance roundrobin\n{servers}"
        );
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(&conf, config).expect("write haproxy.cfg");
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("haproxy.log");
        // `kill` by the PID `$!`, once stdin ends (EOF when the test process drops the pipe or
        // dies). Signals a terminal sends the test's process group are left to the pipe.
        const SCRIPT: &str = r#"
            "$1" -db -f "$2" </dev/null &
            pid=$!
            trap '' INT HUP TERM QUIT
            while read -r _; do :; done
            kill -TERM "$pid" 2>/dev/null
            wait "$pid"
        "#;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("imapgate-test-haproxy")
            .arg(haproxy_binary())
            .arg(&conf)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn sh for haproxy");
        let pipe = shell.stdin.take();
        Haproxy {
            addr,
            shell,
            pipe,
            dir,
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // HAProxy logs its own alerts (a port taken) and exits; the shell stays.
            if self.log().contains("[ALERT]") {
                return Err("HAProxy reported an alert".into());
            }
            if let Ok(Some(status)) = self.shell.try_wait() {
                return Err(format!("the HAProxy shell exited ({status})"));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not listening on {} after {START_TIMEOUT:?}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HAProxy's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        drop(self.pipe.take());
        super::reap(&mut self.shell, "HAProxy");
    }
}

/// `haproxy` from PATH, else from the usual sbin folders.
pub fn haproxy_binary() -> PathBuf {
    super::find_binary(
        "haproxy",
        &["/usr/sbin", "/usr/local/sbin", "/sbin"],
        "haproxy",
    )
}
