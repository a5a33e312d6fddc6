//! The load harness: imapgate against a direct connection to the same private Dovecot.
//!
//! ```text
//! cargo bench --bench load -- [--rounds 3] [--duration 3] [--scenarios fetch-large,small,...]
//!     [--client plain|tls|both] [--policies none|shipped|both|hooks|all] [--upstream plain|tls|both]
//!     [--tls-upstream] [--login-clients 4] [--routed none|on-login|both|off]
//!     [--routed-warm 4] [--idle-connections 1000] [--idle-cpu-seconds 10]
//!     [--idle-notify-sample 50] [--idle-hibernate 1] [--idle-keepalive 0]
//!     [--idle-instances 1] [--json]
//!     [--imapgate PATH] [--no-blind] [--blind-buffer-kib 64]
//! ```
//!
//! `--client plain` (or `both`, the default) adds the plaintext client leg: the client talks
//! plaintext to Dovecot's plain port (direct) and to imapgate's plain listener (proxied, over a
//! plain upstream, without the shipped policies since require_tls refuses such a LOGIN).
//! On that leg a third path runs in the same rounds for fetch-large, small, small-serial and
//! append: a *blind* relay that only copies bytes (this binary started again as
//! `load --blind-relay LISTEN UPSTREAM --ready-file F`, its CPU read by PID as imapgate's);
//! `--no-blind` leaves it out. Started by hand, the relay serves until its stdin closes (to
//! profile it alone).
//!
//! What the machine needs for `--idle-connections N` (the harness checks and says what is
//! missing, in a "this machine" note):
//!
//! - open files: 2 N + 4096 per process (imapgate holds two sockets per connection, plus a
//!   dozen of its own). The harness raises its soft limit to the hard one, and the hard one
//!   too when it may (root with CAP_SYS_RESOURCE); Dovecot and imapgate inherit it. A hard
//!   limit below 2 N + 64 stops the run at once, saying how many connections fit: raise it
//!   before starting (`ulimit -Hn`, or the service manager's `LimitNOFILE`). On the project's
//!   VM the hard limit is 20,000 and CAP_SYS_RESOURCE is not in the bounding set: at most
//!   9,968 connections fit there;
//! - `fs.inotify.max_user_instances` >= N + 256 when Dovecot hibernates the IDLE sessions
//!   (one inotify instance each, all of the mail user; with the default 128 the others stay
//!   one imap process each and see new mail only every 30 s): `sysctl -w
//!   fs.inotify.max_user_instances=...`;
//! - `net.ipv4.ip_local_port_range` wider than N + 1000 (each leg's connections go to one
//!   address and port);
//! - memory: 10,000 sessions take about 2 GiB in all (imapgate ~300 MiB, Dovecot ~1 GiB with
//!   the direct path's TLS in imap-login, the harness's clients), and disk for 10,000
//!   Maildirs (removing them at the end takes minutes on a busy disk).
//!
//! It starts a private Dovecot (tests/support), seeds the mailboxes, starts the imapgate binary
//! cargo built for this bench (the release build) with a config of its own, and runs each
//! scenario directly and through imapgate, alternating, for several rounds. Output: a table,
//! then one JSON object per scenario and variant (one a line). See the README's performance
//! section.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "load/mod.rs"]
mod load;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use load::env::Upstream;
use load::{ClientLeg, Options, Policies, Scenario};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Which {
    None,
    Shipped,
    Both,
    /// The shipped policies' hooks with nothing in them (what entering Lua costs).
    Hooks,
    /// none, hooks and shipped.
    All,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoutedArg {
    None,
    OnLogin,
    Both,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ClientArg {
    Plain,
    Tls,
    Both,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum UpstreamArg {
    Plain,
    Tls,
    Both,
}

/// imapgate against a direct connection to the same private Dovecot.
#[derive(Parser, Debug)]
#[command(name = "load")]
struct Cli {
    /// Rounds of each scenario (each round runs every path once, in rotating order).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each measured run (fetch-large, small, small-serial, append).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Comma-separated: fetch-large, small, small-serial, append, idle, imaplib-append, login,
    /// ratelimit.
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<String>>,
    /// The client leg: TLS (Dovecot's TLS port against imapgate's TLS listener), plaintext
    /// (Dovecot's plain port against imapgate's plain listener, plain upstream, no shipped
    /// policies), or both.
    #[arg(long, value_enum, default_value = "both")]
    client: ClientArg,
    /// Connections held open in IDLE (memory, CPU while idle, setup time, notifications).
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Seconds over which imapgate's CPU time is read with every connection idle.
    #[arg(long, default_value_t = 10.0)]
    idle_cpu_seconds: f64,
    /// Idle sessions spot-checked for their IDLE notification (a message appended straight
    /// on Dovecot must reach each as EXISTS); 0: none.
    #[arg(long, default_value_t = 50)]
    idle_notify_sample: usize,
    /// Dovecot's imap_hibernate_timeout in seconds: IDLE sessions move to its imap-hibernate
    /// process after this long; 0: no hibernation (one imap process per session).
    #[arg(long, default_value_t = 1)]
    idle_hibernate: u64,
    /// Dovecot's imap_idle_notify_interval in seconds: each session in IDLE gets
    /// `* OK Still here` this often (all sessions of one client address at the same moment),
    /// which imapgate relays. 0 (the default here; Dovecot's is 120): none, so that the CPU
    /// read while idle is imapgate's own.
    #[arg(long, default_value_t = 0)]
    idle_keepalive: u64,
    /// Rounds of the idle scenario (it is slow to set up).
    #[arg(long, default_value_t = 1)]
    idle_rounds: usize,
    /// imapgate processes sharing the idle scenario's listeners (`reuse_port`): for more
    /// sessions than one process may hold open files. Memory and CPU are their sums.
    #[arg(long, default_value_t = 1)]
    idle_instances: usize,
    /// Seconds to keep the idle connections open after the memory reading (to profile).
    #[arg(long, default_value_t = 0.0)]
    idle_hold: f64,
    /// Policy variants of imapgate: no policies, the three shipped ones, both, their hooks
    /// with nothing in them (`hooks`), or all three.
    #[arg(long, value_enum, default_value = "both")]
    policies: Which,
    /// A TOML file with [[policy]] tables (absolute script paths) instead of the shipped three.
    #[arg(long)]
    policy_config: Option<PathBuf>,
    /// How clients name Dovecot's "Archive" through imapgate with policies.
    #[arg(long, default_value = "INBOX.Archive")]
    policy_archive: String,
    /// imapgate's upstream leg: plain, TLS, or both (each its own imapgate).
    #[arg(long, value_enum, default_value = "both")]
    upstream: UpstreamArg,
    /// Shorthand for `--upstream tls`: TLS on both legs.
    #[arg(long)]
    tls_upstream: bool,
    /// Concurrent clients of fetch-large.
    #[arg(long, default_value_t = 4)]
    fetch_clients: usize,
    /// Size of each fetch-large message, in KiB.
    #[arg(long, default_value_t = 5120)]
    fetch_kib: usize,
    /// Connections of the small scenario.
    #[arg(long, default_value_t = 16)]
    small_connections: usize,
    /// Commands in flight per connection in the small scenario.
    #[arg(long, default_value_t = 4)]
    small_depth: usize,
    /// Concurrent clients of append (at most 24).
    #[arg(long, default_value_t = 2)]
    append_clients: usize,
    /// Size of each appended message, in KiB.
    #[arg(long, default_value_t = 1024)]
    append_kib: usize,
    /// APPENDs per imaplib run.
    #[arg(long, default_value_t = 20)]
    imaplib_appends: usize,
    /// Concurrent clients of the login scenario (each: connect, TLS, LOGIN, SELECT, LOGOUT).
    #[arg(long, default_value_t = 4)]
    login_clients: usize,
    /// Routed imapgate in the login scenario: without a policy, with a small on_login
    /// policy, both, or off (transparent only).
    #[arg(long, value_enum, default_value = "both")]
    routed: RoutedArg,
    /// Also measure each routed imapgate with this many warm upstream connections per
    /// upstream (`[[upstream]] warm`); 0: not.
    #[arg(long, default_value_t = 4)]
    routed_warm: usize,
    /// The imapgate binary (default: the one cargo built for this bench).
    #[arg(long)]
    imapgate: Option<PathBuf>,
    /// Skip the extra baseline on Dovecot's plaintext port.
    #[arg(long)]
    no_plain_baseline: bool,
    /// Leave out the blind relay (a process that only copies bytes) measured beside imapgate
    /// on the plaintext client leg.
    #[arg(long)]
    no_blind: bool,
    /// The blind relay's buffer per direction, in KiB (tokio's default would be 8).
    #[arg(long, default_value_t = 64)]
    blind_buffer_kib: usize,
    /// Run as the blind relay instead: listen on LISTEN (port 0: any), relay each connection
    /// to UPSTREAM, write the bound address to --ready-file, end when stdin closes.
    #[arg(long, hide = true, num_args = 2, value_names = ["LISTEN", "UPSTREAM"])]
    blind_relay: Option<Vec<SocketAddr>>,
    /// With --blind-relay: where to write the bound address.
    #[arg(long, hide = true, requires = "blind_relay")]
    ready_file: Option<PathBuf>,
    /// Only JSON lines on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Give up after this many minutes, whatever is left.
    #[arg(long, default_value_t = 60)]
    time_limit_min: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn options(cli: &Cli) -> Result<Options, String> {
    let mut o = Options {
        rounds: cli.rounds.max(1),
        duration: Duration::from_secs_f64(cli.duration.clamp(0.1, 600.0)),
        idle_connections: cli.idle_connections.max(1),
        idle_rounds: cli.idle_rounds.max(1),
        idle_instances: cli.idle_instances.clamp(1, 64),
        idle_hold: Duration::from_secs_f64(cli.idle_hold.clamp(0.0, 3600.0)),
        idle_cpu_window: Duration::from_secs_f64(cli.idle_cpu_seconds.clamp(0.1, 3600.0)),
        idle_notify_sample: cli.idle_notify_sample,
        idle_hibernation: (cli.idle_hibernate > 0)
            .then(|| Duration::from_secs(cli.idle_hibernate.min(3600))),
        idle_keepalive: (cli.idle_keepalive > 0)
            .then(|| Duration::from_secs(cli.idle_keepalive.min(86_400))),
        client_legs: match cli.client {
            ClientArg::Plain => vec![ClientLeg::Plain],
            ClientArg::Tls => vec![ClientLeg::Tls],
            ClientArg::Both => vec![ClientLeg::Tls, ClientLeg::Plain],
        },
        fetch_clients: cli.fetch_clients.max(1),
        fetch_size: cli.fetch_kib.max(1) * 1024,
        small_connections: cli.small_connections.max(1),
        small_depth: cli.small_depth.max(1),
        append_clients: cli.append_clients.clamp(1, load::env::APPEND_MAX_CLIENTS),
        append_size: cli.append_kib.max(1) * 1024,
        imaplib_appends: cli.imaplib_appends.max(1),
        login_clients: cli.login_clients.clamp(1, 256),
        routed_policies: match cli.routed {
            RoutedArg::None => vec![Policies::None],
            RoutedArg::OnLogin => vec![Policies::OnLogin],
            RoutedArg::Both => vec![Policies::None, Policies::OnLogin],
            RoutedArg::Off => Vec::new(),
        },
        routed_warm: cli.routed_warm.min(imapgate::config::MAX_WARM),
        imapgate: cli.imapgate.clone(),
        policy_config: cli.policy_config.clone(),
        policy_archive: cli.policy_archive.clone(),
        plain_baseline: !cli.no_plain_baseline,
        blind: if cli.no_blind {
            None
        } else {
            let exe = std::env::current_exe()
                .map_err(|e| format!("this binary's path (for the blind relay): {e}"))?;
            Some(load::blind::Launcher::Flag(exe))
        },
        blind_buffer: cli.blind_buffer_kib.clamp(1, 16 * 1024) * 1024,
        progress: !cli.quiet,
        ..Options::default()
    };
    if let Some(names) = &cli.scenarios {
        o.scenarios = names
            .iter()
            .filter(|n| !n.is_empty())
            .map(|n| Scenario::parse(n.trim()))
            .collect::<Result<_, _>>()?;
    }
    o.policies = match cli.policies {
        Which::None => vec![Policies::None],
        Which::Shipped => vec![Policies::Shipped],
        Which::Both => vec![Policies::None, Policies::Shipped],
        Which::Hooks => vec![Policies::Hooks],
        Which::All => vec![Policies::None, Policies::Hooks, Policies::Shipped],
    };
    o.upstreams = match (cli.tls_upstream, cli.upstream) {
        (true, _) | (false, UpstreamArg::Tls) => vec![Upstream::Tls],
        (false, UpstreamArg::Plain) => vec![Upstream::Plain],
        (false, UpstreamArg::Both) => vec![Upstream::Plain, Upstream::Tls],
    };
    Ok(o)
}

/// `--blind-relay`: this process is the relay, not the harness.
fn blind_relay(cli: &Cli, addrs: &[SocketAddr]) -> ExitCode {
    let (Some(&listen), Some(&upstream), Some(ready_file)) =
        (addrs.first(), addrs.get(1), cli.ready_file.clone())
    else {
        eprintln!("load: --blind-relay takes LISTEN UPSTREAM and --ready-file F");
        return ExitCode::FAILURE;
    };
    let spec = load::blind::Spec {
        listen,
        upstream,
        buffer: cli.blind_buffer_kib.clamp(1, 16 * 1024) * 1024,
        ready_file,
    };
    match load::blind::serve(&spec) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(addrs) = &cli.blind_relay {
        return blind_relay(&cli, addrs);
    }
    let opts = match options(&cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("load: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = Duration::from_secs(cli.time_limit_min.max(1) * 60);
    let result = runtime
        .block_on(async { tokio::time::timeout(limit, load::run_keeping_dovecot(&opts)).await });
    // Stopped after the figures (or the error) are out: with thousands of idle users, removing
    // their Maildirs takes a while.
    let stop_dovecot = |dovecot: Option<support::Dovecot>| {
        if let Some(dc) = dovecot {
            if !cli.quiet {
                eprintln!("load: stopping Dovecot and removing its files");
            }
            drop(dc);
        }
    };
    let (report, dovecot) = match result {
        Ok((Ok(r), dc)) => (r, dc),
        Ok((Err(e), dc)) => {
            eprintln!("load: {e}");
            stop_dovecot(dc);
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!(
                "load: gave up after {} minutes (--time-limit-min)",
                cli.time_limit_min
            );
            return ExitCode::FAILURE;
        }
    };
    // Connections of the load generator may still be closing: do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(2));
    let table = load::table(&report);
    let json = load::json_lines(&report);
    if cli.json {
        eprint!("{table}");
        print!("{json}");
    } else {
        print!("{table}");
        println!();
        print!("{json}");
    }
    stop_dovecot(dovecot);
    ExitCode::SUCCESS
}
