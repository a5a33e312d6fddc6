//! A private, real `redis-server` (Debian package `redis-server`) per test, on a free port of
//! 127.0.0.1, without persistence, in a temp folder; never the system service's port 6379.
//!
//! It runs under a small `sh` that writes its PID to a file and reads a pipe from the test
//! process: dropping the [`Redis`], or the test process ending in any way, closes the pipe
//! and the shell resumes (SIGCONT) and stops (SIGTERM) the server by that PID.
//! [`Redis::freeze`] and [`Redis::thaw`] send SIGSTOP and SIGCONT by the same PID: a frozen
//! server keeps its socket open and answers nothing, which is what a hung Redis looks like.
//!
//! ```ignore
//! let redis = Redis::start();
//! let state = State::new(&StateConfig::new(&redis.url()), None)?;
//! let n: i64 = redis.cmd(&["ZCARD", "imapgate:sessions:alice"]);
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running redis-server; dropping it stops it.
pub struct Redis {
    addr: SocketAddr,
    pid: u32,
    password: Option<String>,
    /// With TLS only (`rediss://`): the CA that issued the server's certificate.
    tls_ca: Option<Vec<u8>>,
    shell: Child,
    pipe: Option<ChildStdin>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// A server without a password.
    pub fn start() -> Redis {
        Redis::start_with(None, None, None)
    }

    /// A server on `port` (one a test chose before the server existed).
    pub fn start_at(port: u16) -> Redis {
        Redis::start_with(None, None, Some(port))
    }

    /// A server that requires `password` (`requirepass`).
    pub fn with_password(password: &str) -> Redis {
        Redis::start_with(Some(password), None, None)
    }

    /// A server that speaks only TLS, with `pki`'s certificate for localhost and 127.0.0.1.
    pub fn with_tls(pki: &super::Pki) -> Redis {
        Redis::start_with(None, Some(pki), None)
    }

    fn start_with(password: Option<&str>, tls: Option<&super::Pki>, port: Option<u16>) -> Redis {
        let mut last = String::new();
        // redis-server cannot bind port 0 and tell which port it got: a free port is found by
        // binding port 0 and releasing it, another process may take it in between, so a
        // failed start is retried on another.
        for _ in 0..3 {
            let mut r = Redis::spawn(password, tls, port);
            match r.wait_ready() {
                Ok(()) => return r,
                Err(e) => last = format!("{e}\n--- redis log ---\n{}", r.log()),
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(password: Option<&str>, tls: Option<&super::Pki>, port: Option<u16>) -> Redis {
        let dir = super::temp_dir();
        let port = port.unwrap_or_else(super::proxy::free_port);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut config = format!(
            "bind 127.0.0.1\ndaemonize no\nsave \"\"\nappendonly no\n\
             dir {}\nlogfile \"\"\ndatabases 4\n",
            dir.path().display()
        );
        match tls {
            None => config.push_str(&format!("port {port}\n")),
            Some(pki) => config.push_str(&format!(
                "port 0\ntls-port {port}\ntls-cert-file {:?}\ntls-key-file {:?}\n\
                 tls-ca-cert-file {:?}\ntls-auth-clients no\n",
                pki.cert.display().to_string(),
                pki.key.display().to_string(),
                pki.ca.display().to_string(),
            )),
        }
        if let Some(p) = password {
            config.push_str(&format!("requirepass {p:?}\n"));
        }
        let conf = dir.path().join("redis.conf");
        std::fs::write(&conf, config).expect("write redis.conf");
        let pid_file = dir.path().join("redis.pid");
        let log = std::fs::File::create(dir.path().join("redis.log")).expect("redis.log");
        // Resumed before the TERM: a frozen server would not act on it.
        const SCRIPT: &str = r#"
            "$1" "$2" </dev/null &
            pid=$!
            echo "$pid" > "$3"
            trap '' INT HUP TERM QUIT
            while read -r _; do :; done
            kill -CONT "$pid" 2>/dev/null
            kill -TERM "$pid" 2>/dev/null
            wait "$pid"
        "#;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("imapgate-test-redis")
            .arg(redis_binary())
            .arg(&conf)
            .arg(&pid_file)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn sh for redis-server");
        let pipe = shell.stdin.take();
        let deadline = Instant::now() + START_TIMEOUT;
        let pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "redis-server: no PID");
            std::thread::sleep(Duration::from_millis(10));
        };
        Redis {
            addr,
            pid,
            password: password.map(str::to_owned),
            tls_ca: tls.map(|pki| pki.ca_pem.clone().into_bytes()),
            shell,
            pipe,
            dir,
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.shell.try_wait() {
                return Err(format!("the redis shell exited ({status})"));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
                && self.try_cmd::<String>(&["PING"]).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not answering on {} after {START_TIMEOUT:?}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` with TLS), without the password.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}/0", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs one command on a fresh connection (password given when there is one), for
    /// assertions. Panics on an error.
    pub fn cmd<T: ::redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    pub fn try_cmd<T: ::redis::FromRedisValue>(&self, args: &[&str]) -> ::redis::RedisResult<T> {
        use ::redis::IntoConnectionInfo;
        let mut info = self.url().into_connection_info()?;
        if let Some(p) = &self.password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        let client = match &self.tls_ca {
            Some(ca) => ::redis::Client::build_with_tls(
                info,
                ::redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )?,
            None => ::redis::Client::open(info)?,
        };
        let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        con.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut cmd = ::redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut con)
    }

    /// SIGSTOP: the server keeps its socket and answers nothing until [`Redis::thaw`].
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        super::signal_pid(self.pid, signal);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        drop(self.pipe.take());
        super::reap(&mut self.shell, "redis");
    }
}

/// `redis-server` from PATH, else from /usr/bin.
pub fn redis_binary() -> PathBuf {
    super::find_binary(
        "redis-server",
        &["/usr/bin", "/usr/local/bin", "/usr/sbin"],
        "redis-server",
    )
}
