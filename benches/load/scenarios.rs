//! The scenarios. Each one is run against one address (Dovecot's TLS port, or imapgate's TLS
//! listener) and returns its figures; connection setup is outside the measured window.
//! Every loop is bounded by a deadline and by a count.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::task::JoinSet;

use crate::load::client::{self, AnyConn, PlainConn};
use crate::load::env::{self, Gate};
use crate::support::message;

/// Upper bound on operations of one connection in one run, whatever the duration.
const MAX_OPS: u64 = 10_000_000;

fn user(i: usize) -> (String, String) {
    crate::support::generated_user(i)
}

/// Connects (TLS when `tls` is given), reads the greeting and logs in as generated user
/// `user_index`.
async fn login(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    user_index: usize,
    buf: usize,
) -> Result<AnyConn, String> {
    let mut c = client::connect(addr, tls, buf).await?;
    let (u, p) = user(user_index);
    c.login(&u, &p).await?;
    Ok(c)
}

async fn login_plain(addr: SocketAddr, user_index: usize) -> Result<PlainConn, String> {
    let mut c = client::connect_plain(addr, 256 * 1024).await?;
    let (u, p) = user(user_index);
    c.login(&u, &p).await?;
    Ok(c)
}

/// Collects the results of tasks, failing on the first error or panic.
async fn join_all<T: 'static>(mut set: JoinSet<Result<T, String>>) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                set.abort_all();
                return Err(e);
            }
            Err(e) => {
                set.abort_all();
                return Err(format!("task failed: {e}"));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Seeding (plain, straight to Dovecot)
// ---------------------------------------------------------------------------------------

pub struct Seed {
    pub fetch_size: usize,
    pub fetch_messages: usize,
}

pub const SMALL_MESSAGES: usize = 100;

/// Fills the mailboxes the scenarios read: the fetch user's INBOX with big messages, the small
/// user's INBOX (half of it \Seen) and Archive. Empties the append users' INBOXes.
pub async fn seed(dc_plain: SocketAddr, s: &Seed, append_clients: usize) -> Result<(), String> {
    let mut c = login_plain(dc_plain, env::FETCH_USER).await?;
    for i in 0..s.fetch_messages {
        c.append("s", "INBOX", &message(s.fetch_size, i as u32))
            .await?;
    }
    c.logout().await;

    let mut c = login_plain(dc_plain, env::SMALL_USER).await?;
    c.ok("c", "CREATE Archive").await?;
    for i in 0..SMALL_MESSAGES {
        let flags = if i % 2 == 0 { "(\\Seen) " } else { "" };
        let m = message(2000, 1000 + i as u32);
        c.send(format!("s APPEND INBOX {flags}{{{}+}}\r\n", m.len()).as_bytes())
            .await?;
        c.send_parts(&[&m, b"\r\n"]).await?;
        let rs = c.until_tagged("s", false).await?;
        client::expect_ok(&rs, "s", "APPEND")?;
    }
    for i in 0..10 {
        c.append("a", "Archive", &message(1500, 2000 + i)).await?;
    }
    c.logout().await;

    for i in 0..append_clients {
        clear_mailbox(dc_plain, env::APPEND_FIRST_USER + i).await?;
    }
    Ok(())
}

async fn clear_mailbox(dc_plain: SocketAddr, user_index: usize) -> Result<(), String> {
    let mut c = login_plain(dc_plain, user_index).await?;
    let rs = c.ok("s", "SELECT INBOX").await?;
    if exists(&rs) > 0 {
        c.ok("d", "STORE 1:* +FLAGS.SILENT (\\Deleted)").await?;
        c.ok("e", "EXPUNGE").await?;
    }
    c.logout().await;
    Ok(())
}

fn exists(rs: &[client::Response]) -> usize {
    rs.iter()
        .filter_map(|r| exists_in(&r.text))
        .next_back()
        .unwrap_or(0)
}

/// `n` of an untagged `* n EXISTS`.
fn exists_in(text: &[u8]) -> Option<usize> {
    let t = std::str::from_utf8(text).ok()?;
    let n = t.strip_prefix("* ")?.strip_suffix(" EXISTS")?;
    n.parse().ok()
}

// ---------------------------------------------------------------------------------------
// fetch-large
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct FetchResult {
    pub mib_s: f64,
    pub fetches: u64,
}

/// `clients` connections, each fetching BODY.PEEK[] of the big messages in turn until
/// `duration` has passed. Before the window, message 1 is fetched once and compared with what
/// was seeded.
pub async fn fetch_large(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    clients: usize,
    seed: &Seed,
    duration: Duration,
) -> Result<FetchResult, String> {
    let mut conns = Vec::new();
    for i in 0..clients {
        let mut c = login(addr, tls, env::FETCH_USER, 256 * 1024).await?;
        c.ok("e", "EXAMINE INBOX").await?;
        if i == 0 {
            c.send(b"v FETCH 1 BODY.PEEK[]\r\n").await?;
            let rs = c.until_tagged("v", true).await?;
            client::expect_ok(&rs, "v", "FETCH")?;
            let got = rs.iter().flat_map(|r| r.literals.iter()).next();
            if got.map(Vec::as_slice) != Some(&message(seed.fetch_size, 0)[..]) {
                return Err(format!(
                    "fetch-large via {addr}: message 1 differs from what was seeded"
                ));
            }
        }
        conns.push(c);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let messages = seed.fetch_messages as u64;
        let size = seed.fetch_size;
        set.spawn(async move {
            let mut bytes = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline && n < MAX_OPS {
                let tag = format!("f{n}");
                let k = (i as u64 + n) % messages + 1;
                c.send(format!("{tag} FETCH {k} BODY.PEEK[]\r\n").as_bytes())
                    .await?;
                let rs = c.until_tagged(&tag, false).await?;
                client::expect_ok(&rs, &tag, "FETCH")?;
                let got: usize = rs.iter().map(|r| r.literal_bytes).sum();
                if got != size {
                    return Err(format!("FETCH {k}: {got} literal bytes, expected {size}"));
                }
                bytes += got as u64;
                n += 1;
            }
            let end = Instant::now();
            c.logout().await;
            Ok((bytes, n, end))
        });
    }
    let results = join_all(set).await?;
    let bytes: u64 = results.iter().map(|r| r.0).sum();
    let fetches: u64 = results.iter().map(|r| r.1).sum();
    let end = results.iter().map(|r| r.2).max().unwrap_or(start);
    let secs = (end - start).as_secs_f64().max(1e-6);
    Ok(FetchResult {
        mib_s: bytes as f64 / (1024.0 * 1024.0) / secs,
        fetches,
    })
}

// ---------------------------------------------------------------------------------------
// small
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct SmallResult {
    pub cmds_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub completed: u64,
    /// Completions other than OK (a policy's refusal shows up here).
    pub not_ok: u64,
    /// p50 latency per command kind, in [`SMALL_KINDS`] order.
    pub p50_us_by_kind: [f64; 4],
}

/// The command kinds of the small scenario, in the order they are sent.
pub const SMALL_KINDS: [&str; 4] = ["FETCH FLAGS", "NOOP", "STATUS", "UID SEARCH"];

fn small_command(i: u64, archive: &str) -> String {
    match i % 4 {
        0 => format!("FETCH {} FLAGS", i / 4 % SMALL_MESSAGES as u64 + 1),
        1 => "NOOP".to_string(),
        2 => format!("STATUS {archive} (MESSAGES UNSEEN UIDNEXT)"),
        _ => "UID SEARCH UNSEEN".to_string(),
    }
}

/// `conns` connections keeping `depth` small commands in flight each (a new one is sent as
/// each completes) until `duration` has passed; latency is from sending a command to reading
/// its tagged completion. `archive` is how this path names the Archive mailbox (the shipped
/// namespace policy shows it as `INBOX.Archive`).
pub async fn small(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    conns: usize,
    depth: usize,
    duration: Duration,
    archive: &str,
) -> Result<SmallResult, String> {
    let mut cs = Vec::new();
    for _ in 0..conns {
        let mut c = login(addr, tls, env::SMALL_USER, 16 * 1024).await?;
        c.ok("e", "EXAMINE INBOX").await?;
        cs.push(c);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for (ci, mut c) in cs.into_iter().enumerate() {
        let depth = depth.max(1);
        let archive = archive.to_string();
        set.spawn(async move {
            let mut inflight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(depth);
            let mut latencies: [Vec<u32>; 4] = Default::default();
            let mut next = ci as u64 * 7;
            let first = next;
            let mut not_ok = 0u64;
            let mut batch = String::new();
            for _ in 0..depth {
                batch.push_str(&format!("s{next} {}\r\n", small_command(next, &archive)));
                inflight.push_back((next, Instant::now()));
                next += 1;
            }
            c.send(batch.as_bytes()).await?;
            while !inflight.is_empty() {
                let r = c.read_response(false).await?;
                let Some(num) = tag_number(&r.text) else {
                    continue;
                };
                let now = Instant::now();
                let Some(at) = inflight.iter().position(|(n, _)| *n == num) else {
                    return Err(format!("unexpected tag s{num}: {}", r.lossy()));
                };
                let (_, sent) = inflight.remove(at).unwrap_or((num, now));
                let tag = format!("s{num}");
                if r.tagged(tag.as_bytes()) != Some(b"OK") {
                    not_ok += 1;
                }
                if now <= deadline {
                    let us = u32::try_from((now - sent).as_micros()).unwrap_or(u32::MAX);
                    latencies[(num % 4) as usize].push(us);
                    if next - first < MAX_OPS {
                        let cmd = format!("s{next} {}\r\n", small_command(next, &archive));
                        inflight.push_back((next, Instant::now()));
                        next += 1;
                        c.send(cmd.as_bytes()).await?;
                    }
                }
            }
            c.logout().await;
            Ok((latencies, not_ok))
        });
    }
    let results = join_all(set).await?;
    let mut all: Vec<u32> = Vec::new();
    let mut by_kind: [Vec<u32>; 4] = Default::default();
    let mut not_ok = 0;
    for (l, n) in results {
        for (k, v) in l.into_iter().enumerate() {
            all.extend_from_slice(&v);
            by_kind[k].extend(v);
        }
        not_ok += n;
    }
    all.sort_unstable();
    let p50_us_by_kind = by_kind.map(|mut v| {
        v.sort_unstable();
        percentile(&v, 0.5)
    });
    Ok(SmallResult {
        cmds_per_s: all.len() as f64 / duration.as_secs_f64(),
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
        completed: all.len() as u64,
        not_ok,
        p50_us_by_kind,
    })
}

/// The number of a tagged response `s<n> ...`.
fn tag_number(text: &[u8]) -> Option<u64> {
    let rest = text.strip_prefix(b"s")?;
    let end = rest.iter().position(|&b| b == b' ')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

// ---------------------------------------------------------------------------------------
// ratelimit
// ---------------------------------------------------------------------------------------

/// The commands of the ratelimit scenario, in the order they alternate: one the shipped
/// search_rate_limit judges, one that no policy hooks.
pub const RATELIMIT_KINDS: [&str; 2] = ["SEARCH", "NOOP"];

const RATELIMIT_COMMANDS: [&str; 2] = ["SEARCH UNSEEN", "NOOP"];

/// Pairs of commands sent before the measured window: Dovecot's first SEARCH builds its
/// cache, and the first shared decision loads the GCRA script into Redis.
const RATELIMIT_WARMUP: u64 = 20;

#[derive(Debug, Clone)]
pub struct RateLimitResult {
    pub cmds_per_s: f64,
    pub completed: u64,
    /// Completions other than OK (a refusal by the policy, or `NO [UNAVAILABLE]` when its
    /// shared state failed).
    pub not_ok: u64,
    /// In [`RATELIMIT_KINDS`] order.
    pub p50_us_by_kind: [f64; 2],
    pub p99_us_by_kind: [f64; 2],
}

/// One connection (the small user's INBOX, examined) sending SEARCH and NOOP in turn until
/// `duration` has passed, each only once the previous one's completion is read: latency
/// without queueing, from sending a command to reading its tagged completion.
pub async fn ratelimit(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    duration: Duration,
) -> Result<RateLimitResult, String> {
    let mut c = login(addr, tls, env::SMALL_USER, 16 * 1024).await?;
    c.ok("e", "EXAMINE INBOX").await?;
    for n in 0..2 * RATELIMIT_WARMUP {
        c.ok(&format!("w{n}"), RATELIMIT_COMMANDS[(n % 2) as usize])
            .await?;
    }
    let mut latencies: [Vec<u32>; 2] = Default::default();
    let mut not_ok = 0u64;
    let start = Instant::now();
    let deadline = start + duration;
    let mut n = 0u64;
    while Instant::now() < deadline && n < MAX_OPS {
        let k = (n % 2) as usize;
        let tag = format!("r{n}");
        let line = format!("{tag} {}\r\n", RATELIMIT_COMMANDS[k]);
        let sent = Instant::now();
        c.send(line.as_bytes()).await?;
        let rs = c.until_tagged(&tag, false).await?;
        let us = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
        if rs.last().and_then(|r| r.tagged(tag.as_bytes())) != Some(b"OK") {
            not_ok += 1;
        }
        latencies[k].push(us);
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    c.logout().await;
    let sorted = latencies.map(|mut v| {
        v.sort_unstable();
        v
    });
    Ok(RateLimitResult {
        cmds_per_s: n as f64 / secs,
        completed: n,
        not_ok,
        p50_us_by_kind: [percentile(&sorted[0], 0.5), percentile(&sorted[1], 0.5)],
        p99_us_by_kind: [percentile(&sorted[0], 0.99), percentile(&sorted[1], 0.99)],
    })
}

// ---------------------------------------------------------------------------------------
// login
// ---------------------------------------------------------------------------------------

/// The phases of one login cycle, in order, then the whole cycle: the login latency is the
/// first two together (from the TCP connect to LOGIN's OK).
pub const LOGIN_PHASES: [&str; 5] = ["connect+TLS+greeting", "LOGIN", "SELECT", "LOGOUT", "cycle"];

#[derive(Debug, Clone)]
pub struct LoginResult {
    pub logins_per_s: f64,
    /// From the TCP connect to the tagged OK of LOGIN.
    pub p50_us: f64,
    pub p99_us: f64,
    pub completed: u64,
    /// p50 of each of [`LOGIN_PHASES`].
    pub p50_us_by_phase: [f64; 5],
}

/// Selects each login user's INBOX once, straight on Dovecot, so that no measured SELECT is
/// the first (which builds the mailbox's index).
pub async fn seed_logins(dc_plain: SocketAddr) -> Result<(), String> {
    for i in 0..env::LOGIN_USERS {
        login_cycle(dc_plain, None, env::LOGIN_FIRST_USER + i).await?;
    }
    Ok(())
}

/// One cycle: connect (TLS when `tls` is given), greeting, LOGIN, SELECT INBOX, LOGOUT (its
/// tagged OK read), close. Gives the time each phase took, in [`LOGIN_PHASES`] order.
async fn login_cycle(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    user_index: usize,
) -> Result<[u32; 5], String> {
    let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let t0 = Instant::now();
    let mut c = client::connect(addr, tls, 4096).await?;
    c.greeting().await?;
    let t1 = Instant::now();
    let (u, p) = user(user_index);
    c.ok("l", &format!("LOGIN {u} {p}")).await?;
    let t2 = Instant::now();
    c.ok("s", "SELECT INBOX").await?;
    let t3 = Instant::now();
    c.ok("z", "LOGOUT").await?;
    c.close().await;
    let t4 = Instant::now();
    Ok([
        us(t1 - t0),
        us(t2 - t1),
        us(t3 - t2),
        us(t4 - t3),
        us(t4 - t0),
    ])
}

/// `clients` clients, each logging in, selecting INBOX and logging out on a new connection
/// again and again until `duration` has passed (a cycle under way then is finished, not
/// counted). Users rotate over the login users.
pub async fn logins(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    clients: usize,
    duration: Duration,
) -> Result<LoginResult, String> {
    // One cycle outside the window (the mailbox indexes were built by [`seed_logins`]).
    login_cycle(addr, tls, env::LOGIN_FIRST_USER).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for ci in 0..clients.max(1) {
        let tls = tls.cloned();
        set.spawn(async move {
            let mut phases: [Vec<u32>; 5] = Default::default();
            let mut n = 0u64;
            while Instant::now() < deadline && n < MAX_OPS {
                let user = env::LOGIN_FIRST_USER + (ci + n as usize) % env::LOGIN_USERS;
                let took = login_cycle(addr, tls.as_ref(), user).await?;
                if Instant::now() <= deadline {
                    for (v, t) in phases.iter_mut().zip(took) {
                        v.push(t);
                    }
                }
                n += 1;
            }
            Ok(phases)
        });
    }
    let results = join_all(set).await?;
    let mut phases: [Vec<u32>; 5] = Default::default();
    for r in results {
        for (all, v) in phases.iter_mut().zip(r) {
            all.extend(v);
        }
    }
    let mut logged_in: Vec<u32> = phases[0]
        .iter()
        .zip(&phases[1])
        .map(|(a, b)| a.saturating_add(*b))
        .collect();
    logged_in.sort_unstable();
    let completed = logged_in.len() as u64;
    let p50_us_by_phase = phases.map(|mut v| {
        v.sort_unstable();
        percentile(&v, 0.5)
    });
    Ok(LoginResult {
        logins_per_s: completed as f64 / duration.as_secs_f64(),
        p50_us: percentile(&logged_in, 0.50),
        p99_us: percentile(&logged_in, 0.99),
        completed,
        p50_us_by_phase,
    })
}

// ---------------------------------------------------------------------------------------
// append
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct AppendResult {
    pub mib_s: f64,
    pub appended: u64,
    /// Every appended message was read back straight from Dovecot and compared.
    pub verified: u64,
}

/// `clients` connections (one user each), each APPENDing its own message (synchronizing
/// literal) until `duration` has passed. Afterwards every appended message is read back from
/// Dovecot's plain port, compared byte for byte, and expunged.
pub async fn append(
    addr: SocketAddr,
    dc_plain: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    clients: usize,
    size: usize,
    seed: u32,
    duration: Duration,
) -> Result<AppendResult, String> {
    let clients = clients.min(env::APPEND_MAX_CLIENTS);
    let mut conns = Vec::new();
    for i in 0..clients {
        conns.push(login(addr, tls, env::APPEND_FIRST_USER + i, 16 * 1024).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut set = JoinSet::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let msg = message(size, seed.wrapping_mul(31).wrapping_add(i as u32));
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline && n < MAX_OPS {
                c.append(&format!("a{n}"), "INBOX", &msg).await?;
                n += 1;
            }
            let end = Instant::now();
            c.logout().await;
            Ok((i, n, end))
        });
    }
    let results = join_all(set).await?;
    let appended: u64 = results.iter().map(|r| r.1).sum();
    let end = results.iter().map(|r| r.2).max().unwrap_or(start);
    let secs = (end - start).as_secs_f64().max(1e-6);
    let mut verified = 0;
    for (i, n, _) in &results {
        let msg = message(size, seed.wrapping_mul(31).wrapping_add(*i as u32));
        verified += verify_and_clear(dc_plain, env::APPEND_FIRST_USER + i, &msg, *n).await?;
    }
    Ok(AppendResult {
        mib_s: appended as f64 * size as f64 / (1024.0 * 1024.0) / secs,
        appended,
        verified,
    })
}

/// Reads every message of the user's INBOX straight from Dovecot, checks that there are
/// `count` and that each equals `msg`, then expunges them all.
async fn verify_and_clear(
    dc_plain: SocketAddr,
    user_index: usize,
    msg: &[u8],
    count: u64,
) -> Result<u64, String> {
    let mut c = login_plain(dc_plain, user_index).await?;
    let rs = c.ok("s", "SELECT INBOX").await?;
    let n = exists(&rs) as u64;
    if n != count {
        return Err(format!(
            "append: user{user_index} has {n} messages upstream, {count} were appended"
        ));
    }
    for k in 1..=n.min(MAX_OPS) {
        c.send(format!("v FETCH {k} BODY.PEEK[]\r\n").as_bytes())
            .await?;
        let rs = c.until_tagged("v", true).await?;
        client::expect_ok(&rs, "v", "FETCH")?;
        let got = rs.iter().flat_map(|r| r.literals.iter()).next();
        if got.map(Vec::as_slice) != Some(msg) {
            return Err(format!(
                "append: user{user_index} message {k} differs upstream from what was sent \
                 ({} bytes, sent {})",
                got.map_or(0, Vec::len),
                msg.len()
            ));
        }
    }
    if n > 0 {
        c.ok("d", "STORE 1:* +FLAGS.SILENT (\\Deleted)").await?;
        c.ok("x", "EXPUNGE").await?;
    }
    c.logout().await;
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------------------

/// Logs every idle user in once (straight on Dovecot, plain) and selects its INBOX, so that
/// no measured path pays for creating the Maildirs and their indexes.
pub async fn seed_idle(dc_plain: SocketAddr, n: usize) -> Result<(), String> {
    let mut set: JoinSet<Result<(), String>> = JoinSet::new();
    let mut next = 0;
    loop {
        while next < n && set.len() < IDLE_SETUP_CONCURRENCY {
            let user = env::IDLE_FIRST_USER + next;
            set.spawn(async move {
                let mut c = login_plain(dc_plain, user).await?;
                c.ok("s", "SELECT INBOX").await?;
                c.logout().await;
                Ok(())
            });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => {
                set.abort_all();
                return Err(format!("creating the idle users' mailboxes: {e}"));
            }
            Some(Err(e)) => return Err(format!("idle seed task: {e}")),
            None => return Ok(()),
        }
    }
}

/// What the idle scenario is told.
#[derive(Clone, Debug)]
pub struct IdleParams {
    /// Sessions held in IDLE.
    pub n: usize,
    /// How long to keep them after the readings (for an external profiler).
    pub hold: Duration,
    /// How long imapgate's CPU time is read with every session idle.
    pub cpu_window: Duration,
    /// Sessions spot-checked for their IDLE notification (at most `n`).
    pub notify_sample: usize,
    /// Dovecot's plain port: where the spot-check appends.
    pub dc_plain: SocketAddr,
    /// Dovecot's master process, for its footprint while the sessions are idle.
    pub dc_pid: u32,
    /// Whether Dovecot hibernates IDLE sessions (then the readings wait until it has).
    pub hibernation: bool,
    /// Varies the sample from run to run.
    pub run: u32,
}

#[derive(Debug, Clone)]
pub struct IdleResult {
    /// Connections per second to get from TCP connect to IDLE (TLS, LOGIN, SELECT, IDLE).
    pub setup_per_s: f64,
    /// From the first connect until all `n` sessions were in IDLE.
    pub setup: Duration,
    /// imapgate's CPU time during the setup.
    pub setup_cpu: Option<Duration>,
    pub rss_before_kib: u64,
    pub rss_idle_kib: u64,
    pub rss_after_kib: u64,
    pub kib_per_conn: f64,
    /// imapgate's CPU time over `idle_window`, every session idle.
    pub idle_cpu: Option<Duration>,
    pub idle_window: Duration,
    pub notify: Option<crate::load::NotifyCheck>,
    /// Dovecot with every session idle (and hibernated, when it hibernates them).
    pub dovecot: env::DovecotFootprint,
}

/// Concurrent connection setups during the idle scenario.
const IDLE_SETUP_CONCURRENCY: usize = 32;

/// How long a sampled session may take to show the message appended for it: past
/// Dovecot's `mailbox_idle_check_interval` (30 s), the polling a session falls back to when
/// it cannot watch its mailbox (no inotify instance left).
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(45);

/// One session in IDLE: its connection, its user, and the message count SELECT reported.
struct IdleConn {
    conn: AnyConn,
    user: usize,
    exists: usize,
}

async fn idle_one(
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    i: usize,
) -> Result<IdleConn, String> {
    let user = env::IDLE_FIRST_USER + i;
    let mut c = login(addr, tls.as_ref(), user, 2048).await?;
    let rs = c.ok("s", "SELECT INBOX").await?;
    let exists = exists(&rs);
    c.send(b"i IDLE\r\n").await?;
    for _ in 0..100 {
        let r = c.read_response(false).await?;
        if r.is_continuation() {
            return Ok(IdleConn {
                conn: c,
                user,
                exists,
            });
        }
        if r.tagged(b"i").is_some() {
            return Err(format!("IDLE refused: {}", r.lossy()));
        }
    }
    Err("no continuation after IDLE".into())
}

/// Ends IDLE (checks the tagged OK) and logs out.
async fn idle_done(mut c: AnyConn) -> Result<(), String> {
    c.send(b"DONE\r\n").await?;
    let rs = c.until_tagged("i", false).await?;
    client::expect_ok(&rs, "i", "IDLE")?;
    c.logout().await;
    Ok(())
}

/// Opens `p.n` connections (TLS when `tls` is given) that log in, select their INBOX and sit
/// in IDLE. With `gate`, reads imapgate's RSS before (after one warm-up connection) and with
/// all of them idle, its CPU time during the setup and over `p.cpu_window` of idleness.
/// Then appends a message for a sample of the sessions, straight on Dovecot, and waits for
/// each of them to show it; then ends every IDLE and logs out.
pub async fn idle(
    addr: SocketAddr,
    tls: Option<&Arc<ClientConfig>>,
    gate: Option<&Gate>,
    p: &IdleParams,
) -> Result<IdleResult, String> {
    let n = p.n.max(1);
    let warm = idle_one(addr, tls.cloned(), 0).await?;
    idle_done(warm.conn).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before_kib = gate.map_or(0, Gate::rss_kib);

    let cpu0 = gate.map(Gate::cpu);
    let start = Instant::now();
    let mut conns: Vec<IdleConn> = Vec::with_capacity(n);
    let mut set: JoinSet<Result<IdleConn, String>> = JoinSet::new();
    let mut launched = 0;
    while conns.len() < n {
        while launched < n && set.len() < IDLE_SETUP_CONCURRENCY {
            let tls = tls.cloned();
            let i = launched;
            set.spawn(async move { idle_one(addr, tls, i).await });
            launched += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(c))) => conns.push(c),
            Some(Ok(Err(e))) => {
                set.abort_all();
                return Err(format!("idle connection {}: {e}", conns.len()));
            }
            Some(Err(e)) => return Err(format!("idle task: {e}")),
            None => break,
        }
    }
    let setup = start.elapsed();
    let setup_cpu = gate.zip(cpu0).map(|(g, c0)| g.cpu().since(&c0));

    // Dovecot moves each session to imap-hibernate a moment after its IDLE: wait until its
    // imap processes stop going away, so that every later reading sees the steady state.
    let dovecot = if p.hibernation {
        settle_dovecot(p.dc_pid).await
    } else {
        env::dovecot_footprint(p.dc_pid)
    };
    // Let imapgate's buffers settle; take the highest of a few readings.
    let mut rss_idle_kib = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        rss_idle_kib = rss_idle_kib.max(gate.map_or(0, Gate::rss_kib));
    }
    let cpu0 = gate.map(Gate::cpu);
    let t0 = Instant::now();
    tokio::time::sleep(p.cpu_window).await;
    let idle_window = t0.elapsed();
    let idle_cpu = gate.zip(cpu0).map(|(g, c0)| g.cpu().since(&c0));
    if gate.is_some() && !p.hold.is_zero() {
        eprintln!(
            "load: idle: {n} connections in IDLE now (RSS read: {rss_idle_kib} KiB); holding {:?}",
            p.hold
        );
        tokio::time::sleep(p.hold.min(Duration::from_secs(3600))).await;
    }

    let notify = if p.notify_sample > 0 {
        let (back, check) = notify_check(conns, p).await?;
        conns = back;
        Some(check)
    } else {
        None
    };

    let mut set: JoinSet<Result<(), String>> = JoinSet::new();
    let mut done = 0;
    let mut pending = conns.into_iter();
    loop {
        while set.len() < IDLE_SETUP_CONCURRENCY * 4 {
            let Some(c) = pending.next() else { break };
            set.spawn(idle_done(c.conn));
        }
        match set.join_next().await {
            Some(Ok(Ok(()))) => done += 1,
            Some(Ok(Err(e))) => return Err(format!("ending IDLE: {e}")),
            Some(Err(e)) => return Err(format!("idle task: {e}")),
            None => break,
        }
    }
    if done != n {
        return Err(format!("only {done} of {n} idle connections ended cleanly"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after_kib = gate.map_or(0, Gate::rss_kib);
    Ok(IdleResult {
        setup_per_s: n as f64 / setup.as_secs_f64().max(1e-6),
        setup,
        setup_cpu,
        rss_before_kib,
        rss_idle_kib,
        rss_after_kib,
        kib_per_conn: rss_idle_kib.saturating_sub(rss_before_kib) as f64 / n as f64,
        idle_cpu,
        idle_window,
        notify,
        dovecot,
    })
}

/// Dovecot's footprint once its `imap` processes have stopped going away (every session
/// hibernated, or as many as it could: three equal readings in a row), within 60 s.
async fn settle_dovecot(dc_pid: u32) -> env::DovecotFootprint {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = env::dovecot_footprint(dc_pid);
    let mut same = 0;
    while last.imap_processes > 0 && same < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = env::dovecot_footprint(dc_pid);
        same = if now.imap_processes == last.imap_processes {
            same + 1
        } else {
            0
        };
        last = now;
    }
    last
}

/// Picks `p.notify_sample` sessions (a different spread each run), appends a message to each
/// one's INBOX straight on Dovecot's plain port, and reads each session until it shows
/// `* n EXISTS` beyond what its SELECT reported, within [`NOTIFY_TIMEOUT`]. Every session
/// comes back, still in IDLE.
async fn notify_check(
    conns: Vec<IdleConn>,
    p: &IdleParams,
) -> Result<(Vec<IdleConn>, crate::load::NotifyCheck), String> {
    let n = conns.len();
    let sample = sample_indices(n, p.notify_sample.min(n), u64::from(p.run));
    let mut slots: Vec<Option<IdleConn>> = conns.into_iter().map(Some).collect();
    let mut queue: VecDeque<(usize, IdleConn)> = sample
        .iter()
        .filter_map(|&i| Some((i, slots[i].take()?)))
        .collect();
    let mut latencies: Vec<f64> = Vec::new();
    let mut set: JoinSet<Result<Checked, String>> = JoinSet::new();
    loop {
        while set.len() < NOTIFY_CONCURRENCY {
            let Some((i, s)) = queue.pop_front() else {
                break;
            };
            let (dc_plain, run) = (p.dc_plain, p.run);
            set.spawn(async move {
                let (s, took) = notify_one(s, dc_plain, run).await?;
                Ok((i, s, took))
            });
        }
        match set.join_next().await {
            Some(Ok(Ok((i, s, took)))) => {
                if let Some(t) = took {
                    latencies.push(t.as_secs_f64() * 1000.0);
                }
                slots[i] = Some(s);
            }
            Some(Ok(Err(e))) => {
                set.abort_all();
                return Err(format!("IDLE notification check: {e}"));
            }
            Some(Err(e)) => return Err(format!("IDLE notification task: {e}")),
            None => break,
        }
    }
    latencies.sort_by(f64::total_cmp);
    let check = crate::load::NotifyCheck {
        sampled: sample.len(),
        notified: latencies.len(),
        p50_ms: median(&latencies),
        max_ms: latencies.last().copied().unwrap_or(0.0),
    };
    Ok((slots.into_iter().flatten().collect(), check))
}

/// A sampled session's index, the session, and how long its notification took (`None`: it
/// did not come).
type Checked = (usize, IdleConn, Option<Duration>);

/// Sessions checked at once by [`notify_check`].
const NOTIFY_CONCURRENCY: usize = 16;

/// Appends one message for session `s`'s user, straight on Dovecot, then reads the session
/// until it shows more messages than its SELECT did. The time from sending the APPEND to
/// reading that EXISTS, or `None` when it did not come within [`NOTIFY_TIMEOUT`].
async fn notify_one(
    mut s: IdleConn,
    dc_plain: SocketAddr,
    run: u32,
) -> Result<(IdleConn, Option<Duration>), String> {
    let mut c = login_plain(dc_plain, s.user).await?;
    let sent = Instant::now();
    c.append("n", "INBOX", &message(600, 3000 + run)).await?;
    c.logout().await;
    let seen = tokio::time::timeout_at((sent + NOTIFY_TIMEOUT).into(), async {
        loop {
            let r = s.conn.read_response(false).await?;
            if exists_in(&r.text).is_some_and(|k| k > s.exists) {
                return Ok::<_, String>(());
            }
        }
    })
    .await;
    match seen {
        Ok(Ok(())) => {
            let took = sent.elapsed();
            s.exists += 1;
            Ok((s, Some(took)))
        }
        Ok(Err(e)) => Err(format!("the session of user{}: {e}", s.user)),
        Err(_) => Ok((s, None)),
    }
}

/// `k` distinct indices below `n`, spread by `seed` (a partial Fisher-Yates shuffle driven
/// by splitmix64: no dependency, and the same sample for the same seed).
fn sample_indices(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut all: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    for i in 0..k {
        let j = i + (next() % (n - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

// ---------------------------------------------------------------------------------------
// python3 imaplib APPEND latency
// ---------------------------------------------------------------------------------------

/// imaplib sends an APPEND's literal and its final CRLF in two writes: without TCP_NODELAY
/// on the proxy, each APPEND waits for the delayed ACK (~40 ms).
const IMAPLIB_SCRIPT: &str = r#"
import imaplib, json, ssl, sys, time
host, port, ca, user, pw, count, size = sys.argv[1:8]
if ca == "-":
    m = imaplib.IMAP4(host, int(port), timeout=30)
else:
    ctx = ssl.create_default_context(cafile=ca)
    m = imaplib.IMAP4_SSL(host, int(port), ssl_context=ctx, timeout=30)
m.login(user, pw)
body = b"x" * int(size)
msg = b"From: imaplib@example.org\r\nSubject: imaplib\r\n\r\n" + body + b"\r\n"
lat = []
for i in range(int(count)):
    t = time.perf_counter()
    typ, data = m.append("INBOX", None, None, msg)
    lat.append((time.perf_counter() - t) * 1000.0)
    if typ != "OK":
        sys.exit("APPEND: %r %r" % (typ, data))
m.select("INBOX")
m.store("1:*", "+FLAGS.SILENT", "\\Deleted")
m.expunge()
m.logout()
print(json.dumps(lat))
"#;

#[derive(Debug, Clone)]
pub struct ImaplibResult {
    pub median_ms: f64,
    pub max_ms: f64,
}

pub fn python3() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
}

/// `count` APPENDs of a small message by python3's imaplib to `addr`: over TLS checked with
/// the CA at `ca`, or in plaintext when `ca` is `None`.
pub async fn imaplib_append(
    python: &std::path::Path,
    addr: SocketAddr,
    ca: Option<&std::path::Path>,
    count: usize,
) -> Result<ImaplibResult, String> {
    let (u, p) = user(env::IMAPLIB_USER);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python)
            .arg("-c")
            .arg(IMAPLIB_SCRIPT)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(ca.map_or(std::ffi::OsStr::new("-"), |p| p.as_os_str()))
            .arg(&u)
            .arg(&p)
            .arg(count.to_string())
            .arg("2000")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "imaplib: timed out after 120 s".to_string())?
    .map_err(|e| format!("imaplib: cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "imaplib via {addr} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut lat: Vec<f64> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("imaplib output: {e}"))?;
    lat.sort_by(f64::total_cmp);
    Ok(ImaplibResult {
        median_ms: median(&lat),
        max_ms: lat.last().copied().unwrap_or(0.0),
    })
}

pub fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
