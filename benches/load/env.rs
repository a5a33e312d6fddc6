//! What the runs stand on: the file descriptor limit, a private Dovecot sized for the load,
//! imapgate as a child process with a config written here, and /proc readings.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Dovecot, DovecotOptions, proc_status_kib};

/// Generated Dovecot users (`user0`/`pass0` ..) the scenarios take their mailboxes from.
pub const USERS: usize = 64;
pub const FETCH_USER: usize = 0;
pub const SMALL_USER: usize = 1;
pub const IMAPLIB_USER: usize = 2;
/// Append clients use `user{APPEND_FIRST_USER + i}`.
pub const APPEND_FIRST_USER: usize = 8;
pub const APPEND_MAX_CLIENTS: usize = 24;
/// Idle connection `i` logs in as `user{IDLE_FIRST_USER + i}`: one user (one INBOX) per
/// session, so that a message appended for one session wakes that session only, and so that
/// no user meets Dovecot's per-user-and-address connection limit.
pub const IDLE_FIRST_USER: usize = USERS;
/// The login scenario's users: `user{LOGIN_FIRST_USER}` .. `+ LOGIN_USERS` (it only reads).
pub const LOGIN_FIRST_USER: usize = 32;
pub const LOGIN_USERS: usize = 8;

// ---------------------------------------------------------------------------------------
// File descriptors
// ---------------------------------------------------------------------------------------

/// Raises this process's open-file limit (inherited by Dovecot and imapgate, which are
/// started afterwards) to at least `want`, raising the hard limit too when allowed (root).
/// Returns the soft limit in force.
#[cfg(target_os = "linux")]
pub fn raise_nofile(want: u64) -> Result<u64, String> {
    use rlimit::Resource;
    let (cur, max) = rlimit::getrlimit(Resource::NOFILE)
        .map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    if cur >= want {
        return Ok(cur);
    }
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(max);
    let hard = max.max(want.min(nr_open));
    for (soft, hard) in [(want.min(hard), hard), (want.min(max), max)] {
        if rlimit::setrlimit(Resource::NOFILE, soft, hard).is_ok() {
            return Ok(soft);
        }
    }
    Ok(cur)
}

#[cfg(not(target_os = "linux"))]
pub fn raise_nofile(_want: u64) -> Result<u64, String> {
    Err("raising RLIMIT_NOFILE is only done on Linux: use `ulimit -n`".into())
}

// ---------------------------------------------------------------------------------------
// Dovecot
// ---------------------------------------------------------------------------------------

/// A private Dovecot able to hold `connections` concurrent sessions, with `idle_users` users
/// for the idle scenario besides the [`USERS`], IDLE hibernation after `hibernation`, and
/// an IDLE keepalive (`* OK Still here`) every `keepalive` (`None`: none); `nofile` is the
/// open-file limit its processes inherit.
///
/// Without hibernation every session is an `imap` process (one per session, Dovecot's
/// default, as the test suite runs it); with it, a session in IDLE moves to the
/// `imap-hibernate` process after that long, so that 10,000 IDLE sessions are a few
/// processes rather than 10,000 (see [`machine_needs`] for what the kernel must allow).
pub fn start_dovecot(
    connections: usize,
    idle_users: usize,
    hibernation: Option<Duration>,
    keepalive: Option<Duration>,
    nofile: u64,
) -> Dovecot {
    let processes = (connections + 500).max(5000);
    let clients = (2 * connections + 1000).max(20_000);
    // imap-login (a TLS session of the direct path: the client's socket and the one to its
    // imap process) and imap-hibernate (a session's socket and its inotify instance) hold two
    // descriptors per client: more clients than the limit allows go to further processes.
    let per_process = usize::try_from(nofile.saturating_sub(512) / 2)
        .unwrap_or(usize::MAX)
        .clamp(1000, clients);
    // A TLS session of the direct path stays in imap-login (which relays it to the imap or
    // imap-hibernate process): thousands of them outgrow the default 1 GiB address space.
    // 0: no keepalive (both the imap and the imap-hibernate process skip it).
    let keepalive = keepalive.map_or(0, |k| k.as_secs().max(1));
    let extra_config = format!(
        "imap_idle_notify_interval = {keepalive} secs\n\
         default_process_limit = {processes}\n\
         default_client_limit = {clients}\n\
         default_vsz_limit = 2G\n\
         service imap {{\n  process_limit = {processes}\n}}\n\
         service imap-login {{\n  client_limit = {per_process}\n  vsz_limit = 8G\n}}\n\
         service imap-hibernate {{\n  client_limit = {per_process}\n}}\n\
         service auth {{\n  client_limit = {clients}\n}}\n\
         service anvil {{\n  client_limit = {clients}\n}}\n\
         protocol imap {{\n  mail_max_userip_connections = {clients}\n}}\n"
    );
    // "/" as delimiter: the shipped namespace policy's default upstream layout.
    Dovecot::start(DovecotOptions {
        separator: Some('/'),
        generated_users: IDLE_FIRST_USER + idle_users,
        extra_config,
        idle_hibernation: hibernation,
        ..DovecotOptions::default()
    })
}

/// What this machine lacks for `idle` connections in IDLE through imapgate (each one a
/// client socket in the harness, two sockets in imapgate, and in Dovecot a socket plus, when
/// hibernated, an inotify instance of the mail user): one line per shortfall, with the fix.
/// `nofile` is the open-file limit the harness got (its children inherit it).
pub fn machine_needs(idle: usize, instances: usize, nofile: u64, hibernation: bool) -> Vec<String> {
    let mut out = Vec::new();
    if idle == 0 {
        return out;
    }
    let read = |path: &str| -> Option<u64> {
        fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let fds = nofile_wanted(idle, instances);
    if nofile < fds {
        let nr_open = read("/proc/sys/fs/nr_open").unwrap_or(0);
        out.push(format!(
            "open files: the limit is {nofile}, {idle} idle connections want {fds} (imapgate \
             holds two sockets per connection; the harness raised its soft limit to the hard \
             one, and could not raise the hard one: that takes root with CAP_SYS_RESOURCE): \
             start it with `ulimit -Hn {fds}; ulimit -n {fds}` (or the service manager's \
             LimitNOFILE){}",
            if nr_open > 0 && nr_open < fds {
                format!(" and `sysctl -w fs.nr_open={fds}` (now {nr_open})")
            } else {
                String::new()
            }
        ));
    }
    if hibernation {
        // One instance per hibernated session (`mailbox_watch_extract_notify_fd`), all of
        // them the mail user's, plus those of sessions not yet hibernated.
        let want = idle as u64 + 256;
        if let Some(have) = read("/proc/sys/fs/inotify/max_user_instances")
            && have < want
        {
            out.push(format!(
                "inotify: fs.inotify.max_user_instances is {have}: Dovecot can hibernate at \
                 most that many IDLE sessions (one inotify instance each, all of the mail \
                 user); the others stay one imap process each and see new mail only every \
                 30 s (mailbox_idle_check_interval). Raise it: `sysctl -w \
                 fs.inotify.max_user_instances={want}`"
            ));
        }
        // A Maildir INBOX is watched through a few paths (new/, cur/, the index log).
        let want = 4 * idle as u64 + 8192;
        if let Some(have) = read("/proc/sys/fs/inotify/max_user_watches")
            && have < want
        {
            out.push(format!(
                "inotify: fs.inotify.max_user_watches is {have}, {want} wanted: \
                 `sysctl -w fs.inotify.max_user_watches={want}`"
            ));
        }
    } else if idle > 2000 {
        out.push(format!(
            "Dovecot without hibernation: {idle} idle sessions are {idle} imap processes \
             (several MiB each, and kernel.pid_max is {})",
            read("/proc/sys/kernel/pid_max").unwrap_or(0)
        ));
    }
    // Each leg's connections come from 127.0.0.1 to one address and port: one ephemeral
    // port each, per destination.
    if let Ok(range) = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
        let ports: Vec<u64> = range
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if let [lo, hi] = ports[..]
            && hi.saturating_sub(lo) < idle as u64 + 1000
        {
            out.push(format!(
                "ephemeral ports: net.ipv4.ip_local_port_range is {lo}-{hi}, {} wanted per \
                 destination: `sysctl -w net.ipv4.ip_local_port_range=\"1024 65000\"`",
                idle + 1000
            ));
        }
    }
    out
}

/// File descriptors a run with `idle` idle connections needs in each process (imapgate: two
/// sockets per connection; Dovecot's imap-login and imap-hibernate: two per connection too).
pub fn nofile_wanted(idle: usize, instances: usize) -> u64 {
    // The harness holds one socket per idle client; each imapgate two per session it got.
    gate_fds(idle, instances).max(idle as u64 + 64) + 4032
}

/// The open files each of `instances` imapgate processes sharing `idle` sessions needs: two
/// sockets per session and a few of its own, with room for the kernel's uneven spreading of
/// connections over processes sharing a port (by a hash of their addresses).
pub fn gate_fds(idle: usize, instances: usize) -> u64 {
    let instances = instances.max(1);
    let share = idle.div_ceil(instances) + if instances > 1 { idle / 20 } else { 0 };
    2 * share as u64 + 64
}

/// Dovecot's processes and their memory, at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct DovecotFootprint {
    /// Every process of the instance, the master included.
    pub processes: usize,
    /// `imap` processes (one per session that is not hibernated).
    pub imap_processes: usize,
    /// Resident memory of them all.
    pub rss_kib: u64,
}

/// The footprint of the Dovecot whose master is `master` (its children, by parent PID).
pub fn dovecot_footprint(master: u32) -> DovecotFootprint {
    let mut f = DovecotFootprint {
        processes: 1,
        imap_processes: 0,
        rss_kib: proc_status_kib(master, "VmRSS:"),
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return f;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": comm may hold anything, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let parent = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(master) {
            continue;
        }
        f.processes += 1;
        f.rss_kib += proc_status_kib(pid, "VmRSS:");
        if head.split_once('(').map(|(_, comm)| comm) == Some("imap") {
            f.imap_processes += 1;
        }
    }
    f
}

// ---------------------------------------------------------------------------------------
// imapgate
// ---------------------------------------------------------------------------------------

/// How imapgate reaches Dovecot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    Plain,
    Tls,
}

impl Upstream {
    pub fn label(self) -> &'static str {
        match self {
            Upstream::Plain => "plain",
            Upstream::Tls => "tls",
        }
    }
}

/// Who reads the login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One `[upstream]`, connected at accept; its greeting and answers relayed.
    Transparent,
    /// `[routing]` with two named upstreams (`mail1`, `mail2`, both this Dovecot): imapgate
    /// greets, reads the login, connects the routed upstream and replays it.
    Routed,
    /// [`Mode::Routed`] with `warm = N` on each upstream: connections opened and greeted
    /// ahead of the logins.
    RoutedWarm(usize),
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Transparent => "transparent",
            Mode::Routed => "routed",
            Mode::RoutedWarm(_) => "routed+warm",
        }
    }
}

/// The names of the routed upstreams, in config order (the first is the default route).
pub const ROUTED_UPSTREAMS: [&str; 2] = ["mail1", "mail2"];

/// The imapgate binary as a child process, with an implicit-TLS listener and a plaintext one;
/// or several such processes sharing both listeners (`reuse_port`).
pub struct Gate {
    /// Each process, with the watchdog that kills it if the harness dies.
    children: Vec<(Child, Option<(Child, ChildStdin)>)>,
    /// The implicit-TLS listener.
    pub addr: SocketAddr,
    /// The plaintext listener (`tls = "none"`).
    pub plain_addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gate {
    /// Writes a config (listener `imaps` with Dovecot's test certificate, listener `imap`
    /// without TLS, upstream `dc` over `upstream` as `mode` says, then `policies` verbatim)
    /// and starts `binary run --config` on it, in `instances` processes sharing the listeners.
    pub fn start(
        binary: &Path,
        dc: &Dovecot,
        upstream: Upstream,
        mode: Mode,
        policies: Option<&str>,
        max_connections: usize,
        instances: usize,
    ) -> Result<Gate, String> {
        let mut last = String::new();
        for _attempt in 0..3 {
            let started = Gate::try_start(
                binary,
                dc,
                (upstream, mode, policies),
                max_connections,
                instances.max(1),
            );
            match started {
                Ok(g) => return Ok(g),
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn try_start(
        binary: &Path,
        dc: &Dovecot,
        (upstream, mode, policies): (Upstream, Mode, Option<&str>),
        max_connections: usize,
        instances: usize,
    ) -> Result<Gate, String> {
        let dir = crate::support::temp_dir();
        let (port, plain_port) = free_ports()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let plain_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, plain_port));
        let (up_addr, up_tls) = match upstream {
            Upstream::Plain => (dc.addr(), "none"),
            Upstream::Tls => (dc.tls_addr(), "implicit"),
        };
        let pki = dc.pki();
        let upstream_keys = format!(
            "address = \"{up_addr}\"\ntls = \"{up_tls}\"\n\
             server_name = \"localhost\"\nca = {ca}\n\n",
            ca = toml_path(&pki.ca),
        );
        let upstreams = match mode {
            Mode::Transparent => format!("[upstream]\n{upstream_keys}"),
            Mode::Routed | Mode::RoutedWarm(_) => {
                let warm = match mode {
                    Mode::RoutedWarm(n) => format!("warm = {n}\n"),
                    _ => String::new(),
                };
                let mut t = String::new();
                for name in ROUTED_UPSTREAMS {
                    t.push_str(&format!(
                        "[[upstream]]\nname = \"{name}\"\n{warm}{upstream_keys}"
                    ));
                }
                t.push_str("[routing]\n\n");
                t
            }
        };
        let shared = if instances > 1 {
            "reuse_port = true\n"
        } else {
            ""
        };
        let mut config = format!(
            "[[listener]]\nname = \"imaps\"\nbind = \"{addr}\"\ntls = \"implicit\"\n\
             cert = {cert}\nkey = {key}\n{shared}\n\
             [[listener]]\nname = \"imap\"\nbind = \"{plain_addr}\"\ntls = \"none\"\n{shared}\n\
             {upstreams}\
             [limits]\nmax_connections = {max_connections}\n\n\
             [log]\nlevel = \"warn\"\n",
            cert = toml_path(&pki.cert),
            key = toml_path(&pki.key),
        );
        if let Some(p) = policies {
            config.push('\n');
            config.push_str(p);
            config.push('\n');
        }
        let config_path = dir.path().join("imapgate.toml");
        fs::write(&config_path, &config)
            .map_err(|e| format!("write {}: {e}", config_path.display()))?;
        // One log for all processes: each line is written whole (O_APPEND).
        let log = dir.path().join("imapgate.log");
        let mut gate = Gate {
            children: Vec::new(),
            addr,
            plain_addr,
            log,
            _dir: dir,
        };
        for i in 0..instances {
            let log_file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&gate.log)
                .map_err(|e| format!("open {}: {e}", gate.log.display()))?;
            let log_err = log_file
                .try_clone()
                .map_err(|e| format!("dup log fd: {e}"))?;
            let ready = gate._dir.path().join(format!("ready-{i}.json"));
            let child = Command::new(binary)
                .args(["run", "--config"])
                .arg(&config_path)
                .arg("--ready-file")
                .arg(&ready)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err)
                .spawn()
                .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
            let watchdog = spawn_watchdog(child.id()).ok();
            gate.children.push((child, watchdog));
            gate.wait_ready(i, &ready)?;
        }
        Ok(gate)
    }

    /// Waits for process `i` to write its ready file (it then listens on both addresses).
    fn wait_ready(&mut self, i: usize, ready: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.children.get_mut(i).map(|c| c.0.try_wait()) {
                return Err(format!(
                    "imapgate exited at start ({status}); its log:\n{}",
                    self.log_text()
                ));
            }
            if ready.is_file() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "imapgate did not listen on {} within 20 s; its log:\n{}",
            self.addr,
            self.log_text()
        ))
    }

    /// The first process's PID (the only one unless several share the listeners).
    pub fn pid(&self) -> u32 {
        self.children.first().map_or(0, |c| c.0.id())
    }

    /// Every process's PID.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.0.id()).collect()
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Lines of the log at WARN or ERROR level.
    pub fn warnings(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_owned)
            .collect()
    }

    /// Resident memory of all the processes.
    pub fn rss_kib(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(|pid| proc_status_kib(pid, "VmRSS:"))
            .sum()
    }

    /// The CPU time all the processes used so far (compare two with [`CpuStamp::since`]).
    pub fn cpu(&self) -> CpuStamp {
        CpuStamp::read_all(&self.pids())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        for (mut child, watchdog) in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
            if let Some((mut w, stdin)) = watchdog {
                let _ = w.kill();
                let _ = w.wait();
                drop(stdin);
            }
        }
    }
}

/// `sh` that kills `pid` when this process ends in any way (its stdin pipe closes), so that a
/// harness killed with SIGKILL leaves no imapgate behind.
fn spawn_watchdog(pid: u32) -> Result<(Child, ChildStdin), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(
            "trap '' INT HUP TERM QUIT; while read -r _; do :; done; kill -KILL \"$1\" 2>/dev/null",
        )
        .arg("imapgate-bench-watchdog")
        .arg(pid.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn watchdog: {e}"))?;
    let stdin = child.stdin.take().ok_or("watchdog stdin")?;
    Ok((child, stdin))
}

/// Two distinct free ports (both held until both are known). imapgate binds them a moment
/// later: a clash with another process is retried by [`Gate::start`].
fn free_ports() -> Result<(u16, u16), String> {
    let bind =
        || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("free port: {e}"));
    let (a, b) = (bind()?, bind()?);
    let port = |l: &TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(|e| format!("free port: {e}"))
    };
    Ok((port(&a)?, port(&b)?))
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

// ---------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------

/// A process's CPU time at one moment, read two ways: utime + stime (10 ms ticks, every
/// thread that ever ran included) and each live thread's run time to the nanosecond
/// (`/proc/PID/task/TID/schedstat`). The ticks alone make a figure like "CPU per APPEND" over
/// 20 APPENDs a multiple of 500 µs.
#[derive(Clone, Debug, Default)]
pub struct CpuStamp {
    ticks: Duration,
    /// stime alone, for the kernel's share.
    system_ticks: Duration,
    threads: BTreeMap<u32, u64>,
}

impl CpuStamp {
    /// The processes' CPU time together (thread IDs are unique across processes).
    pub fn read_all(pids: &[u32]) -> CpuStamp {
        let mut all = CpuStamp {
            ticks: Duration::ZERO,
            system_ticks: Duration::ZERO,
            threads: BTreeMap::new(),
        };
        for &pid in pids {
            let one = CpuStamp::read(pid);
            all.ticks += one.ticks;
            all.system_ticks += one.system_ticks;
            all.threads.extend(one.threads);
        }
        all
    }

    pub fn read(pid: u32) -> CpuStamp {
        let mut threads = BTreeMap::new();
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for tid in tasks.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
                let ns = fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
                if let Some(ns) = ns {
                    threads.insert(tid, ns);
                }
            }
        }
        let (user, system) = user_system_time(pid);
        CpuStamp {
            ticks: user + system,
            system_ticks: system,
            threads,
        }
    }

    /// The kernel's share (stime over utime + stime) of the CPU time used since `earlier`,
    /// from the ticks; `None` under 10 ticks, where one tick more or less is 10 %.
    pub fn system_share_since(&self, earlier: &CpuStamp) -> Option<f64> {
        let all = self.ticks.saturating_sub(earlier.ticks);
        let system = self.system_ticks.saturating_sub(earlier.system_ticks);
        (all >= Duration::from_millis(100)).then(|| system.as_secs_f64() / all.as_secs_f64())
    }

    /// The CPU time used since `earlier`: to the nanosecond when every thread of `earlier`
    /// is still there (a new thread counts from its start), else from the ticks, since a
    /// thread that ended took its run time with it.
    pub fn since(&self, earlier: &CpuStamp) -> Duration {
        let all_alive = !earlier.threads.is_empty()
            && earlier
                .threads
                .keys()
                .all(|tid| self.threads.contains_key(tid));
        if !all_alive {
            return self.ticks.saturating_sub(earlier.ticks);
        }
        let ns: u64 = self
            .threads
            .iter()
            .map(|(tid, now)| now.saturating_sub(earlier.threads.get(tid).copied().unwrap_or(0)))
            .sum();
        Duration::from_nanos(ns)
    }
}

/// utime + stime of a process (fields 14 and 15 of /proc/PID/stat, in USER_HZ = 100 ticks).
pub fn cpu_time(pid: u32) -> Duration {
    let (user, system) = user_system_time(pid);
    user + system
}

/// utime and stime of a process.
pub fn user_system_time(pid: u32) -> (Duration, Duration) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may contain spaces: count from the closing parenthesis.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ")": field 3 is state, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        Duration::from_millis(ticks(11) * 10),
        Duration::from_millis(ticks(12) * 10),
    )
}

/// The imapgate binary to measure: `explicit`, else `$IMAPGATE_BIN`, else the one cargo built
/// for this bench (the release build under `cargo bench`), else target/release/imapgate.
pub fn imapgate_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("IMAPGATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_imapgate") {
        return Ok(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/imapgate");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no imapgate binary: run `cargo build --release` or pass --imapgate PATH ({} missing)",
            p.display()
        ))
    }
}
