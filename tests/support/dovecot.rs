//! A private, real Dovecot for end-to-end tests.
//!
//! Each [`Dovecot`] runs `dovecot -F -c FILE` as a child process with its own folder under
//! `/tmp/igd-XXXXXX` (config, passwd file, Maildirs, state, sockets, log), its own instance
//! name and two free ports on 127.0.0.1: plain IMAP (with STARTTLS) and implicit TLS, both
//! with a certificate from a private CA ([`Pki`]). The config is `examples/dovecot.conf`,
//! the template shared with `examples/quickstart.sh`.
//!
//! ```ignore
//! let dc = Dovecot::shared();                          // one per test binary, started once
//! let (user, pass) = dc.fresh_user();                  // a user no other test touches
//! let dc = Dovecot::start(DovecotOptions { separator: Some('/'), ..Default::default() });
//! ```
//!
//! Users: `alice`/`alicepw`, `bob`/`bobpw`, `user0`/`pass0` .. (see
//! [`DovecotOptions::generated_users`]), the pool behind [`Dovecot::fresh_user`], and
//! [`DovecotOptions::users`]. With [`DovecotOptions::oauth2`] they may also log in with
//! `AUTHENTICATE XOAUTH2` / `OAUTHBEARER` and a token a checker of the test's own knows
//! ([`super::oauth::TokenChecker`]).
//!
//! Cleanup: Dovecot runs in a process group of its own, and dropping a `Dovecot` sends
//! SIGTERM to that whole group and waits (~0.1 s) until every process is gone, then removes
//! the folder. Independently of that, every instance has a watchdog (`sh` reading a pipe
//! from the test process): when the test process ends in any way (normal exit with the
//! leaked shared instance, panic, Ctrl-C, SIGKILL), the pipe closes and the watchdog stops
//! the group and removes the folder. No Dovecot outlives `cargo test`.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::pki::Pki;

/// The Dovecot config template (also used by `examples/quickstart.sh`).
pub const CONFIG_TEMPLATE: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/dovecot.conf"
));

/// The unprivileged system user owning the Maildirs when the tests run as root.
pub const MAIL_USER: &str = "imapgate-test";

/// How many users `fresh_user()` can hand out without reloading the passwd file.
const FRESH_POOL: usize = 256;
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_millis(500);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a private Dovecot looks like. `Default` gives the common setup: `.` delimiter,
/// no namespace prefix, no COMPRESS, users alice/bob plus the fresh-user pool.
#[derive(Clone, Debug, Default)]
pub struct DovecotOptions {
    /// Hierarchy delimiter of the inbox namespace (`None`: Maildir++'s `.`).
    pub separator: Option<char>,
    /// Namespace prefix, e.g. `Some("INBOX.".into())` to mimic Courier.
    pub prefix: Option<String>,
    /// Load `zlib imap_zlib`, so `COMPRESS=DEFLATE` is advertised after login.
    pub compress: bool,
    /// Extra users (name, password) besides alice/bob.
    pub users: Vec<(String, String)>,
    /// Also create `user0`/`pass0` .. `user{n-1}`/`pass{n-1}` (see [`generated_user`]).
    pub generated_users: usize,
    /// Let IMAP sessions share long-lived processes (up to 20 each) instead of one fresh
    /// process per session: 1200 logins take ~0.8 s instead of ~9 s on 2 cores. For load
    /// tests and benchmarks; a test that kills one session's process needs the default.
    pub shared_imap_processes: bool,
    /// Raw settings appended to the config (they override the template's).
    pub extra_config: String,
    /// A third listener, plain IMAP expecting a PROXY protocol header first
    /// (`haproxy = yes`; see [`Dovecot::haproxy_addr`]). Dovecot believes the header only
    /// from `haproxy_trusted_networks`, which the test sets in `extra_config`.
    pub haproxy_listener: bool,
    /// Also accept `AUTHENTICATE XOAUTH2` and `OAUTHBEARER`, checking tokens with an
    /// `oauth2` passdb (see [`Oauth2Options`]); passwords keep working for PLAIN and LOGIN.
    pub oauth2: Option<Oauth2Options>,
    /// IDLE hibernation (`imap_hibernate_timeout`): a session that has been in IDLE this long
    /// leaves its `imap` process for the one `imap-hibernate` process, which holds every such
    /// session and wakes it (in a new `imap` process) when the client sends something or the
    /// mailbox changes. Thousands of idle sessions then cost Dovecot a few KiB each instead of
    /// a process each. Each hibernated session keeps one inotify instance, counted against the
    /// mail user: beyond `fs.inotify.max_user_instances` (128 by default) sessions stay in
    /// their processes. For load tests; `None` (the default) keeps one process per session.
    pub idle_hibernation: Option<Duration>,
}

/// Dovecot 2.3's `oauth2` passdb, asking a token introspection endpoint (RFC 7662, e.g.
/// [`super::oauth::TokenChecker`]) about each token: `introspection_mode = post`, the user in
/// the answer's `username`, a token counting only while `"active": true`. Dovecot refuses a
/// token whose user is not the one the SASL payload names.
#[derive(Clone, Debug)]
pub struct Oauth2Options {
    /// Where tokens are checked, `http://127.0.0.1:PORT/introspect`.
    pub introspection_url: String,
}

impl Oauth2Options {
    /// The passdb's settings file (`dovecot-oauth2.conf.ext`).
    fn settings(&self) -> String {
        format!(
            "introspection_mode = post\n\
             introspection_url = {}\n\
             username_attribute = username\n\
             active_attribute = active\n\
             active_value = true\n",
            self.introspection_url
        )
    }

    /// What the instance's config gains: the mechanisms, and a passdb for them after the
    /// password one (`settings` is the path of [`Oauth2Options::settings`]).
    fn config(settings: &Path) -> String {
        format!(
            "auth_mechanisms = plain login xoauth2 oauthbearer\n\
             passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  \
             args = {}\n}}\n",
            settings.display()
        )
    }
}

/// The template's password passdb; with OAuth it serves only the password mechanisms, so that
/// a token is never checked as a password (nor a password sent to the token checker).
const PASSWD_PASSDB: &str = "  driver = passwd-file\n";

/// Settings behind [`DovecotOptions::shared_imap_processes`] (all users share one uid, which
/// is what lets one imap process serve several of them).
pub const SHARED_IMAP_PROCESSES: &str = "service imap {
  client_limit = 20
  service_count = 0
  process_min_avail = 2
}
";

/// What [`DovecotOptions::idle_hibernation`] adds: the timeout, and the two sockets the
/// sessions travel through. `imap-hibernate` runs as the internal user and hands a session
/// back through `imap-master`, which must therefore be that user's; the `imap` processes
/// (the mail user, with the internal group as an extra group, Dovecot's default since 2.3.1)
/// reach `imap-hibernate` through its group.
fn hibernation_config(after: Duration) -> String {
    format!(
        "imap_hibernate_timeout = {} secs\n\
         service imap {{\n  unix_listener imap-master {{\n    \
         user = $default_internal_user\n  }}\n}}\n\
         service imap-hibernate {{\n  unix_listener imap-hibernate {{\n    \
         mode = 0660\n    group = $default_internal_group\n  }}\n}}\n",
        after.as_secs().max(1)
    )
}

/// The name and password of generated user `i` (see [`DovecotOptions::generated_users`]).
pub fn generated_user(i: usize) -> (String, String) {
    (format!("user{i}"), format!("pass{i}"))
}

/// A running private Dovecot. Dropping it stops it.
pub struct Dovecot {
    dir: tempfile::TempDir,
    conf: PathBuf,
    addr: SocketAddr,
    tls_addr: SocketAddr,
    haproxy_addr: Option<SocketAddr>,
    pki: Pki,
    mail_owner: (u32, u32),
    child: Child,
    watchdog: Option<(Child, ChildStdin)>,
    passwd_lock: Mutex<()>,
    fresh_next: AtomicUsize,
}

impl Dovecot {
    /// A process-wide instance with default options, started on first use. Tests in one
    /// binary share it (they run on parallel threads): use [`Dovecot::fresh_user`] to get a
    /// mailbox no other test touches. It is never dropped; the watchdog stops it when the
    /// test process exits.
    /// If it fails to start, every test that asks for it fails at once with the same message.
    pub fn shared() -> &'static Dovecot {
        static SHARED: OnceLock<Result<Dovecot, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            std::panic::catch_unwind(|| Dovecot::start(DovecotOptions::default())).map_err(
                |panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".into())
                },
            )
        });
        match started {
            Ok(dc) => dc,
            Err(message) => panic!("the shared Dovecot did not start: {message}"),
        }
    }

    /// Starts a private Dovecot and waits until it greets on its plain port and accepts
    /// connections on its TLS port. Panics (with the Dovecot log) if it does not come up.
    pub fn start(opts: DovecotOptions) -> Dovecot {
        let mut last_error = String::new();
        // Dovecot cannot bind port 0 and tell which ports it got: free ports are picked by
        // binding port 0 and releasing it, another process may grab one in between, so a
        // clash is retried with new ports.
        for _attempt in 0..3 {
            let mut dc = Dovecot::spawn(&opts);
            match dc.wait_ready() {
                Ok(()) => return dc,
                Err(e) => {
                    let log = dc.log();
                    drop(dc);
                    if log.contains("Address already in use") {
                        last_error = format!("{e}\n--- dovecot log ---\n{log}");
                        continue;
                    }
                    panic!("private Dovecot did not start: {e}\n--- dovecot log ---\n{log}");
                }
            }
        }
        panic!("private Dovecot did not start (port clashes): {last_error}");
    }

    fn spawn(opts: &DovecotOptions) -> Dovecot {
        let binary = dovecot_binary();
        let root_run = is_root();
        let mail_owner = if root_run {
            mail_user_ids()
        } else {
            (current_id("-u"), current_id("-g"))
        };

        // A short folder: UNIX socket paths under base_dir must stay below ~100 bytes.
        let dir = tempfile::Builder::new()
            .prefix("igd-")
            .tempdir_in("/tmp")
            .expect("create /tmp/igd-XXXXXX");
        let root = dir.path().to_path_buf();
        // Mail and auth processes run as other users: the folder must be traversable.
        set_mode(&root, 0o755);
        for sub in ["state", "mail"] {
            fs::create_dir(root.join(sub)).expect("create instance subfolder");
            set_mode(&root.join(sub), 0o755);
        }
        if root_run {
            std::os::unix::fs::chown(root.join("mail"), Some(mail_owner.0), Some(mail_owner.1))
                .expect("chown mail folder to the mail user");
        }
        let pki = Pki::generate(&root.join("pki"));
        set_mode(&root.join("pki"), 0o755);

        let mut users: Vec<(String, String)> = vec![
            ("alice".into(), "alicepw".into()),
            ("bob".into(), "bobpw".into()),
        ];
        users.extend((0..opts.generated_users).map(generated_user));
        users.extend((0..FRESH_POOL).map(fresh_user_name));
        users.extend(opts.users.iter().cloned());
        write_passwd(&root.join("passwd"), &users);

        let (imap_port, imaps_port, haproxy_port) = free_ports();
        let (login_user, internal_user, internal_group) = if root_run {
            ("dovenull".into(), "dovecot".into(), "dovecot".into())
        } else {
            let me = current_name("-un");
            (me.clone(), me, current_name("-gn"))
        };
        let mut plugins = String::new();
        if opts.compress {
            plugins.push_str("zlib imap_zlib");
        }
        let instance = format!(
            "igd-{}",
            root.file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("igd-")
        );
        let ssl_files = format!(
            "ssl_cert = <{}\nssl_key = <{}",
            pki.cert.display(),
            pki.key.display()
        );
        let mut config = render(
            CONFIG_TEMPLATE,
            &[
                ("ROOT", root.display().to_string()),
                ("BASE_DIR", root.join("run").display().to_string()),
                ("INSTANCE_NAME", instance),
                ("IMAP_PORT", imap_port.to_string()),
                ("IMAPS_PORT", imaps_port.to_string()),
                ("SSL", "yes".into()),
                ("SSL_FILES", ssl_files),
                ("LOGIN_USER", login_user),
                ("INTERNAL_USER", internal_user),
                ("INTERNAL_GROUP", internal_group),
                ("MAIL_UID", mail_owner.0.to_string()),
                ("MAIL_GID", mail_owner.1.to_string()),
                (
                    "SEPARATOR",
                    opts.separator.map(String::from).unwrap_or_default(),
                ),
                ("PREFIX", opts.prefix.clone().unwrap_or_default()),
                ("IMAP_PLUGINS", plugins),
            ],
        );
        if opts.shared_imap_processes {
            config.push_str("\n# --- shared_imap_processes ---\n");
            config.push_str(SHARED_IMAP_PROCESSES);
        }
        if opts.haproxy_listener {
            config.push_str("\n# --- haproxy_listener ---\n");
            config.push_str(&format!(
                "service imap-login {{\n  inet_listener imap_haproxy {{\n    \
                 port = {haproxy_port}\n    haproxy = yes\n  }}\n}}\n"
            ));
        }
        if let Some(oauth2) = &opts.oauth2 {
            assert!(
                config.contains(PASSWD_PASSDB),
                "the dovecot template lost its passwd-file passdb"
            );
            config = config.replacen(
                PASSWD_PASSDB,
                &format!("{PASSWD_PASSDB}  mechanisms = plain login\n"),
                1,
            );
            let settings = root.join("dovecot-oauth2.conf.ext");
            fs::write(&settings, oauth2.settings()).expect("write dovecot-oauth2.conf.ext");
            set_mode(&settings, 0o644);
            config.push_str("\n# --- oauth2 ---\n");
            config.push_str(&Oauth2Options::config(&settings));
        }
        if let Some(after) = opts.idle_hibernation {
            config.push_str("\n# --- idle_hibernation ---\n");
            config.push_str(&hibernation_config(after));
        }
        if !opts.extra_config.is_empty() {
            config.push_str("\n# --- extra_config ---\n");
            config.push_str(&opts.extra_config);
            config.push('\n');
        }
        let conf = root.join("dovecot.conf");
        fs::write(&conf, config).expect("write dovecot.conf");

        let log_path = root.join("dovecot.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open dovecot.log");
        set_mode(&log_path, 0o644);
        let child = Command::new(&binary)
            .process_group(0)
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let watchdog = spawn_watchdog(child.id(), &root);

        Dovecot {
            dir,
            conf,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, imap_port)),
            tls_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, imaps_port)),
            haproxy_addr: opts
                .haproxy_listener
                .then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, haproxy_port))),
            pki,
            mail_owner,
            child,
            watchdog: Some(watchdog),
            passwd_lock: Mutex::new(()),
            fresh_next: AtomicUsize::new(0),
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("dovecot exited during startup ({status})"));
            }
            let last = match probe_greeting(self.addr)
                .and_then(|()| probe_connect(self.tls_addr))
                .and_then(|()| self.haproxy_addr.map_or(Ok(()), probe_connect))
            {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready after {START_TIMEOUT:?} (plain {}, tls {}): {last}",
                    self.addr, self.tls_addr
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The plain IMAP listener (STARTTLS offered), on 127.0.0.1.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The implicit-TLS listener, on 127.0.0.1. Its certificate is for `localhost` and
    /// `127.0.0.1`, signed by the CA at [`Dovecot::ca_pem_path`].
    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr
    }

    /// The listener that expects a PROXY protocol header first (with
    /// [`DovecotOptions::haproxy_listener`]).
    pub fn haproxy_addr(&self) -> Option<SocketAddr> {
        self.haproxy_addr
    }

    /// The CA certificate (PEM file) that signed Dovecot's certificate.
    pub fn ca_pem_path(&self) -> &Path {
        &self.pki.ca
    }

    /// The CA certificate as a PEM string.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// All of this instance's certificates (CA, Dovecot's leaf; issue more from it).
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The instance folder (`/tmp/igd-XXXXXX`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The rendered config file.
    pub fn config_path(&self) -> &Path {
        &self.conf
    }

    /// The Maildir of `user` (it exists once the user has logged in).
    pub fn maildir_of(&self, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(user).join("Maildir")
    }

    /// Uid and gid owning the Maildirs.
    pub fn mail_owner(&self) -> (u32, u32) {
        self.mail_owner
    }

    /// The PID of the Dovecot master process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The PIDs of this instance's own processes (children of its master) whose command line
    /// contains `needle`, e.g. `imap [alice` with `verbose_proctitle = yes`: never another
    /// instance's, whatever their names.
    pub fn processes_matching(&self, needle: &str) -> Vec<u32> {
        let master = self.pid();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // After the command name in parentheses: state, then the parent's PID.
                let parent = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                parent == Some(master)
                    && String::from_utf8_lossy(&cmdline)
                        .replace('\0', " ")
                        .contains(needle)
            })
            .collect()
    }

    /// Kills (SIGKILL) this instance's own processes whose command line contains `needle`, as
    /// a crash would; the master carries on. How many there were.
    pub fn kill_matching(&self, needle: &str) -> usize {
        let pids = self.processes_matching(needle);
        for &pid in &pids {
            super::signal_pid(pid, "KILL");
        }
        pids.len()
    }

    /// Freezes every process of this instance (SIGSTOP to its process group): the kernel still
    /// accepts TCP connections on its ports, but nothing answers, as with a hung server.
    pub fn freeze(&self) {
        signal_group(self.child.id(), Signal::STOP);
    }

    /// Undoes [`Dovecot::freeze`].
    pub fn thaw(&self) {
        signal_group(self.child.id(), Signal::CONT);
    }

    /// Dovecot's log so far (its log_path and its stdout/stderr share one file).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// A user (name, password) that no other caller of `fresh_user` on this instance gets:
    /// an empty mailbox of its own, even on the shared instance.
    pub fn fresh_user(&self) -> (String, String) {
        let i = self.fresh_next.fetch_add(1, Ordering::SeqCst);
        if i < FRESH_POOL {
            return fresh_user_name(i);
        }
        let user = fresh_user_name(i);
        self.add_user(&user.0, &user.1);
        user
    }

    /// Adds a user to the running instance. Dovecot re-reads its passwd file when the file
    /// changes, but checks at most once a second: this polls with logins (up to 5 s) until
    /// the user can log in.
    pub fn add_user(&self, name: &str, password: &str) {
        assert!(
            !name.contains([':', '\n', '\r', '/']) && !password.contains([':', '\n', '\r']),
            "unusable test user {name:?}"
        );
        let _guard = self.passwd_lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.path().join("passwd");
        let mut text = fs::read_to_string(&path).expect("read passwd");
        text.push_str(&format!("{name}:{password}\n"));
        let tmp = self.dir.path().join("passwd.tmp");
        fs::write(&tmp, text).expect("write passwd.tmp");
        set_mode(&tmp, 0o644);
        fs::rename(&tmp, &path).expect("replace passwd");
        // Dovecot compares mtime (whole seconds) and size, at most once per second; a refused
        // login answers on the auth process's next 0.5 s tick, which paces the polling.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = probe_login(self.addr, name, password);
            if answer.as_deref().is_ok_and(|a| a.starts_with("a OK")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} cannot log in 5 s after being added: {answer:?}"
            );
        }
    }

    fn stop(&mut self) {
        // The watchdog first, so that it never signals a process group that is gone.
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
            drop(stdin);
        }
        // Dovecot runs in a process group of its own. Its master, asked alone to stop, sends
        // SIGQUIT around and sleeps a second, and running IMAP sessions only notice its end
        // ~10 s later; signalling the whole group ends every process at once (sessions
        // say "* BYE Server shutting down.").
        let pgid = self.child.id();
        signal_group(pgid, Signal::TERM);
        // A frozen instance (a test that failed before thawing it) must see the SIGTERM.
        signal_group(pgid, Signal::CONT);
        // Usually all is gone within ~0.1 s; under load the master may wait a second more
        // for a child: nothing worth keeping is left after the grace, so SIGKILL the rest.
        if !self.wait_group_gone(pgid, STOP_GRACE) {
            signal_group(pgid, Signal::KILL);
            if !self.wait_group_gone(pgid, STOP_TIMEOUT) {
                eprintln!("dovecot process group {pgid} survived SIGKILL for {STOP_TIMEOUT:?}");
            }
        }
    }

    /// Reaps the master and waits until no process of group `pgid` is left.
    fn wait_group_gone(&mut self, pgid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let reaped = matches!(self.child.try_wait(), Ok(Some(_)));
            if reaped && !group_alive(pgid) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Dovecot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dovecot")
            .field("dir", &self.dir.path())
            .field("addr", &self.addr)
            .field("tls_addr", &self.tls_addr)
            .field("pid", &self.child.id())
            .finish()
    }
}

fn fresh_user_name(i: usize) -> (String, String) {
    (format!("fresh{i}"), format!("freshpw{i}"))
}

/// Replaces every `@NAME@` of the template; panics if one is left unfilled.
pub fn render(template: &str, values: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (name, value) in values {
        out = out.replace(&format!("@{name}@"), value);
    }
    if let Some(line) = out.lines().find(|l| {
        let l = l.trim_start();
        !l.starts_with('#') && l.matches('@').count() >= 2
    }) {
        panic!("unfilled placeholder in dovecot config: {line}");
    }
    out
}

fn write_passwd(path: &Path, users: &[(String, String)]) {
    let mut text = String::new();
    for (name, password) in users {
        text.push_str(&format!("{name}:{password}\n"));
    }
    fs::write(path, text).expect("write passwd");
    set_mode(path, 0o644);
}

/// Three distinct free ports on 127.0.0.1 (all held until all are known).
fn free_ports() -> (u16, u16, u16) {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    let (a, b, c) = (bind(), bind(), bind());
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    (port(&a), port(&b), port(&c))
}

fn probe_connect(addr: SocketAddr) -> Result<(), String> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map(drop)
        .map_err(|e| format!("connect {addr}: {e}"))
}

/// Connects and reads the greeting line: Dovecot is ready when it says `* OK`.
fn probe_greeting(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("greeting from {addr}: {e}")),
        }
    }
    let _ = s.write_all(b"z LOGOUT\r\n");
    if got.starts_with(b"* OK") {
        Ok(())
    } else {
        Err(format!(
            "greeting from {addr}: {:?}",
            String::from_utf8_lossy(&got)
        ))
    }
}

/// `a LOGIN name password` on a fresh plain connection: the tagged answer line.
fn probe_login(addr: SocketAddr, name: &str, password: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let login = format!(
        "a LOGIN {} {}\r\nb LOGOUT\r\n",
        super::quote(name),
        super::quote(password)
    );
    s.write_all(login.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(line) = text.lines().find(|l| l.starts_with("a ")) {
            return Ok(line.to_string());
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("closed after {text:?}")),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{e} after {text:?}")),
        }
    }
}

/// `sh` that waits for EOF on a pipe from this process (it comes when the process ends,
/// however it ends), then stops Dovecot's process group `pgid` and removes the instance
/// folder `dir` (a leaked instance's TempDir is never dropped). It ignores the signals a
/// terminal sends to the test's process group (Ctrl-C): the pipe tells it when to act.
fn spawn_watchdog(pgid: u32, dir: &Path) -> (Child, ChildStdin) {
    const SCRIPT: &str = r#"
        trap '' INT HUP TERM QUIT
        while read -r _; do :; done
        gone() {
            n=0
            while kill -0 -"$1" 2>/dev/null; do
                [ "$n" -ge "$2" ] && return 1
                sleep 0.1
                n=$((n + 1))
            done
        }
        kill -TERM -"$1" 2>/dev/null
        gone "$1" 10 || { kill -KILL -"$1" 2>/dev/null; gone "$1" 50; }
        case "$2" in /tmp/igd-*) rm -rf "$2" ;; esac
    "#;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("imapgate-dovecot-watchdog")
        .arg(pgid.to_string())
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the dovecot watchdog (sh)");
    let stdin = child.stdin.take().expect("watchdog stdin");
    (child, stdin)
}

/// `dovecot` from PATH, else from the usual sbin folders (PATH may lack them for users).
pub fn dovecot_binary() -> PathBuf {
    super::find_binary(
        "dovecot",
        &["/usr/sbin", "/usr/local/sbin", "/sbin"],
        "dovecot-imapd",
    )
}

fn is_root() -> bool {
    current_id("-u") == 0
}

fn current_id(flag: &str) -> u32 {
    let out = Command::new("id").arg(flag).output().expect("run id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {flag}: {:?}", String::from_utf8_lossy(&out.stdout)))
}

fn current_name(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("run id");
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!name.is_empty(), "id {flag} gave no name");
    name
}

/// The uid/gid of [`MAIL_USER`], creating the user once if missing (root only).
fn mail_user_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let lookup = || -> Option<(u32, u32)> {
            let uid = Command::new("id").args(["-u", MAIL_USER]).output().ok()?;
            let gid = Command::new("id").args(["-g", MAIL_USER]).output().ok()?;
            if !uid.status.success() || !gid.status.success() {
                return None;
            }
            let parse = |b: &[u8]| String::from_utf8_lossy(b).trim().parse::<u32>().ok();
            Some((parse(&uid.stdout)?, parse(&gid.stdout)?))
        };
        if let Some(ids) = lookup() {
            return ids;
        }
        // Another test binary may be creating it at the same moment: whatever useradd
        // says, look the user up again.
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                MAIL_USER,
            ])
            .output();
        lookup().unwrap_or_else(|| panic!("cannot create system user {MAIL_USER}: {out:?}"))
    })
}

/// The process group `pgid` (a Dovecot master's own, see [`Dovecot::spawn`]), never 0 or 1,
/// which would mean this process's group or every process.
fn group(pgid: u32) -> Pid {
    i32::try_from(pgid)
        .ok()
        .filter(|&p| p > 1)
        .and_then(Pid::from_raw)
        .unwrap_or_else(|| panic!("refusing to signal process group {pgid}"))
}

/// Sends `sig` to every process of the process group `pgid`.
fn signal_group(pgid: u32, sig: Signal) {
    let _ = rustix::process::kill_process_group(group(pgid), sig);
}

/// True while a live (non-zombie) process is left in the process group `pgid`. Zombies do
/// not count: once Dovecot's master is gone its exited children belong to init, which may
/// take its time to reap them.
fn group_alive(pgid: u32) -> bool {
    if rustix::process::test_kill_process_group(group(pgid)).is_err() {
        return false;
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may contain anything, so split after ')'.
        let mut fields = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or("")
            .split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let pgrp = fields.nth(1).and_then(|f| f.parse::<u32>().ok());
        pgrp == Some(pgid) && state != "Z" && state != "X"
    })
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}
