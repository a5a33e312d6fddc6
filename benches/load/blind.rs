//! The blind relay: a proxy that copies bytes and does nothing else, as the floor under
//! imapgate's figures on the plaintext client leg. It runs in a process of its own, so that
//! its CPU is read exactly as imapgate's is (by PID, from /proc), on a tokio multi-thread
//! runtime with the default number of workers (as imapgate's), one task per connection with
//! `copy_bidirectional`, TCP_NODELAY on both legs, the upstream connected at accept (as a
//! transparent imapgate does).
//!
//! The bench binary is started again as the relay (`load --blind-relay LISTEN UPSTREAM
//! --ready-file F`); a libtest binary (the smoke test) cannot take such flags, so it runs one
//! of its tests with the addresses in [`ENV`] instead ([`Launcher`]). Either way the relay
//! writes the address it bound to the ready file and ends when its stdin closes, so that a
//! harness killed with SIGKILL leaves no relay behind.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::env::CpuStamp;

/// Buffer per direction. tokio's default is 8 KiB; imapgate's reads grow to 64 KiB while a
/// literal streams, and a floor that made four times the system calls per MiB would not be one.
pub const DEFAULT_BUFFER: usize = 64 * 1024;

/// The relay's parameters when it runs as a test of a libtest binary: `LISTEN UPSTREAM
/// BUFFER_BYTES READY_FILE`, separated by spaces (the file's path last: it may hold spaces).
pub const ENV: &str = "IMAPGATE_BLIND_RELAY";

/// How the harness starts a relay process.
#[derive(Clone, Debug)]
pub enum Launcher {
    /// This bench binary: `EXE --blind-relay LISTEN UPSTREAM --ready-file F
    /// --blind-buffer-kib N`.
    Flag(PathBuf),
    /// A libtest binary: `EXE --exact TEST`, the parameters in [`ENV`] (libtest owns the
    /// command line).
    Test { exe: PathBuf, test: String },
}

/// What one relay process does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    /// Bytes of buffer per direction.
    pub buffer: usize,
    pub ready_file: PathBuf,
}

impl Spec {
    pub fn to_env(&self) -> OsString {
        let mut v = OsString::from(format!(
            "{} {} {} ",
            self.listen, self.upstream, self.buffer
        ));
        v.push(self.ready_file.as_os_str());
        v
    }

    pub fn from_env_value(value: &str) -> Result<Spec, String> {
        let mut parts = value.splitn(4, ' ');
        let mut next = |what: &str| {
            parts
                .next()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format!("{ENV}: no {what} in {value:?}"))
        };
        let addr = |s: &str| {
            s.parse::<SocketAddr>()
                .map_err(|e| format!("{ENV}: {s:?}: {e}"))
        };
        let listen = addr(next("listen address")?)?;
        let upstream = addr(next("upstream address")?)?;
        let buffer = next("buffer size")?;
        let buffer = buffer
            .parse::<usize>()
            .map_err(|e| format!("{ENV}: buffer {buffer:?}: {e}"))?;
        let ready_file = PathBuf::from(next("ready file")?);
        Ok(Spec {
            listen,
            upstream,
            buffer: buffer.max(1),
            ready_file,
        })
    }

    /// The spec a libtest child was given, if it was started as a relay.
    pub fn from_env() -> Option<Result<Spec, String>> {
        let value = std::env::var(ENV).ok()?;
        Some(Spec::from_env_value(&value))
    }
}

// ---------------------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------------------

/// Runs the relay until its stdin closes (then the process exits) or it cannot listen.
pub fn serve(spec: &Spec) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("blind relay: runtime: {e}"))?;
    runtime.block_on(accept_loop(spec))
}

async fn accept_loop(spec: &Spec) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(spec.listen)
        .await
        .map_err(|e| format!("blind relay: bind {}: {e}", spec.listen))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("blind relay: local address: {e}"))?;
    write_ready_file(&spec.ready_file, bound)?;
    // The harness holds our stdin: when it ends, however it ends, so do we.
    std::thread::spawn(|| {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(relay(client, spec.upstream, spec.buffer));
            }
            Err(e) => {
                // Out of descriptors, most likely: let connections close before retrying.
                eprintln!("blind relay: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn relay(mut client: tokio::net::TcpStream, upstream: SocketAddr, buffer: usize) {
    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // Resets when a run ends its connections are expected: nothing to report.
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, buffer, buffer).await;
}

/// Written beside its final name, then renamed: the harness never reads half an address.
fn write_ready_file(path: &Path, bound: SocketAddr) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bound.to_string()).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// The harness's side
// ---------------------------------------------------------------------------------------

/// A running relay process.
pub struct Blind {
    child: Child,
    /// Closed on drop: the relay exits.
    stdin: Option<ChildStdin>,
    /// Where clients connect.
    pub addr: SocketAddr,
    pub buffer: usize,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Blind {
    /// Starts a relay to `upstream` with `buffer` bytes per direction and waits until it
    /// listens.
    pub fn start(
        launcher: &Launcher,
        upstream: SocketAddr,
        buffer: usize,
    ) -> Result<Blind, String> {
        let dir = crate::support::temp_dir();
        let spec = Spec {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            buffer: buffer.max(1),
            ready_file: dir.path().join("ready"),
        };
        let mut cmd = match launcher {
            Launcher::Flag(exe) => {
                let mut c = Command::new(exe);
                c.arg("--blind-relay")
                    .arg(spec.listen.to_string())
                    .arg(spec.upstream.to_string())
                    .arg("--ready-file")
                    .arg(&spec.ready_file)
                    .arg("--blind-buffer-kib")
                    .arg((spec.buffer / 1024).max(1).to_string());
                c
            }
            Launcher::Test { exe, test } => {
                let mut c = Command::new(exe);
                c.args(["--exact", test.as_str(), "--nocapture", "--test-threads=1"])
                    .env(ENV, spec.to_env());
                c
            }
        };
        let log = dir.path().join("relay.log");
        let log_file =
            fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| format!("dup log fd: {e}"))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawn the blind relay: {e}"))?;
        let stdin = child.stdin.take();
        let mut blind = Blind {
            child,
            stdin,
            addr: spec.listen,
            buffer: spec.buffer,
            log,
            _dir: dir,
        };
        blind.addr = blind.wait_ready(&spec.ready_file)?;
        Ok(blind)
    }

    fn wait_ready(&mut self, ready: &Path) -> Result<SocketAddr, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(text) = fs::read_to_string(ready)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                return Ok(addr);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the blind relay exited at start ({status}); its output:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!(
            "the blind relay did not listen within 20 s; its output:\n{}",
            self.log_text()
        ))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CPU time used so far, read as imapgate's is.
    pub fn cpu(&self) -> CpuStamp {
        CpuStamp::read(self.pid())
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Blind {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
