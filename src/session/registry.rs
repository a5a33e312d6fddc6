//! Every live session, for the operators: who is connected from where to which upstream, the
//! per-user and per-address connection limits, and the kick.
//!
//! A session registers when its client leg is set up ([`Registry::register`], which applies the
//! per-address limit) and holds a [`SessionHandle`] that unregisters it when dropped, however the
//! session ends. The handle learns the user at login ([`SessionHandle::logged_in`], which applies
//! the per-user limit) and the upstream once connected; it counts bytes with relaxed atomics (the
//! relay adds once per read, as it does for the metrics), and carries the kick signal the
//! session's driver waits on beside its sockets.
//!
//! With `[state]`, the per-user limit is cluster-wide: after the in-process check, a login is
//! registered in Redis ([`SessionHandle::confirm_login`], [`ClusterSessions`]), which counts
//! the user's sessions on every instance. Should Redis fail, the in-process count stands.
//!
//! One mutex guards the table and the per-user and per-address counts, so that a check and the
//! registration it allows are one step: two logins racing for a user's last slot cannot both
//! get it. It is held only for map updates and for copying a snapshot, never across I/O.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::watch;

use crate::metrics::SessionLimit;
use crate::state::{ClusterSessions, Registration};

/// `0` means unlimited for both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Sessions of one user (compared case-insensitively) at once.
    pub per_user: usize,
    /// Sessions from one client address (the real one, behind a trusted proxy) at once.
    pub per_address: usize,
}

/// A limit that refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("too many connections from {0}")]
    Address(IpAddr),
    #[error("too many connections for this user")]
    User,
}

impl LimitExceeded {
    /// The limit, as the metrics name it.
    pub fn limit(&self) -> SessionLimit {
        match self {
            LimitExceeded::Address(_) => SessionLimit::PerAddress,
            LimitExceeded::User => SessionLimit::PerUser,
        }
    }

    /// The text of the `* BYE [UNAVAILABLE]` the client gets.
    pub fn bye_text(&self) -> &'static str {
        match self {
            LimitExceeded::Address(_) => "Too many connections from your address",
            LimitExceeded::User => "Too many connections for this user",
        }
    }
}

/// What an operator sees of one session (`GET /sessions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: u64,
    /// As the client gave it at login; `None` before.
    pub user: Option<String>,
    /// The client's real address.
    pub peer: SocketAddr,
    pub listener: String,
    /// The upstream's configured name, once connected.
    pub upstream: Option<String>,
    pub since: SystemTime,
    /// Read from the client.
    pub bytes_in: u64,
    /// Read from the upstream, for the client.
    pub bytes_out: u64,
}

/// The table of live sessions. Cheap to clone: clones share it.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    limits: ConnectionLimits,
    table: Mutex<Table>,
    /// The cluster-wide registry, with `[state]` and a per-user limit.
    cluster: Option<ClusterSessions>,
}

#[derive(Default)]
struct Table {
    sessions: HashMap<u64, Slot>,
    per_address: HashMap<IpAddr, usize>,
    /// By case-folded user name.
    per_user: HashMap<String, usize>,
}

struct Slot {
    peer: SocketAddr,
    listener: String,
    since: SystemTime,
    /// The name as given, and its case-folded key.
    user: Option<(String, String)>,
    upstream: Option<String>,
    bytes: Arc<Bytes>,
    kick: watch::Sender<bool>,
    /// Logged in here, not yet checked against the cluster ([`SessionHandle::confirm_login`]).
    cluster_pending: bool,
}

#[derive(Default)]
struct Bytes {
    input: AtomicU64,
    output: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("limits", &self.inner.limits)
            .field("sessions", &self.len())
            .finish()
    }
}

/// The key user names are compared by.
fn user_key(user: &str) -> String {
    user.to_lowercase()
}

/// The key addresses are counted by: an IPv4 client seen through an IPv6 socket is the same
/// client.
fn address_key(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

fn count_up<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    *map.entry(key).or_insert(0) += 1;
}

fn count_down<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Registry {
    pub fn new(limits: ConnectionLimits) -> Registry {
        Registry::with_cluster(limits, None)
    }

    /// A registry whose per-user limit also counts the sessions of other instances.
    pub fn with_cluster(limits: ConnectionLimits, cluster: Option<ClusterSessions>) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                limits,
                table: Mutex::default(),
                cluster,
            }),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the maps consistent (every update is a single
        // insert or remove), so a poisoned lock is still usable.
        self.inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session whose client is `peer`, unless that address already has as many
    /// sessions as the per-address limit allows.
    pub fn register(
        &self,
        id: u64,
        peer: SocketAddr,
        listener: &str,
    ) -> Result<SessionHandle, LimitExceeded> {
        let limit = self.inner.limits.per_address;
        let address = address_key(peer);
        let (kick, kicked) = watch::channel(false);
        let bytes = Arc::new(Bytes::default());
        let mut table = self.table();
        let from_address = table.per_address.get(&address).copied().unwrap_or(0);
        if limit > 0 && from_address >= limit {
            return Err(LimitExceeded::Address(address));
        }
        count_up(&mut table.per_address, address);
        table.sessions.insert(
            id,
            Slot {
                peer,
                listener: listener.to_owned(),
                since: SystemTime::now(),
                user: None,
                upstream: None,
                bytes: bytes.clone(),
                kick,
                cluster_pending: false,
            },
        );
        drop(table);
        Ok(SessionHandle {
            registry: self.clone(),
            id,
            bytes,
            kicked,
        })
    }

    /// Every live session, by id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let table = self.table();
        let mut out: Vec<SessionInfo> = table
            .sessions
            .iter()
            .map(|(&id, slot)| SessionInfo {
                id,
                user: slot.user.as_ref().map(|(name, _)| name.clone()),
                peer: slot.peer,
                listener: slot.listener.clone(),
                upstream: slot.upstream.clone(),
                since: slot.since,
                bytes_in: slot.bytes.input.load(Ordering::Relaxed),
                bytes_out: slot.bytes.output.load(Ordering::Relaxed),
            })
            .collect();
        drop(table);
        out.sort_by_key(|s| s.id);
        out
    }

    /// Tells every session of `user` (case-insensitively) to say BYE and close; returns how
    /// many were told. A session already told is not counted again.
    pub fn kick_user(&self, user: &str) -> usize {
        let key = user_key(user);
        let table = self.table();
        let mut kicked = 0;
        for slot in table.sessions.values() {
            let theirs = slot.user.as_ref().is_some_and(|(_, k)| *k == key);
            if theirs && !slot.kick.send_replace(true) {
                kicked += 1;
            }
        }
        kicked
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.table().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions of `user` (case-insensitively) now.
    pub fn sessions_of(&self, user: &str) -> usize {
        self.table()
            .per_user
            .get(&user_key(user))
            .copied()
            .unwrap_or(0)
    }

    fn unregister(&self, id: u64) {
        let mut table = self.table();
        let Some(slot) = table.sessions.remove(&id) else {
            return;
        };
        count_down(&mut table.per_address, &address_key(slot.peer));
        if let Some((_, key)) = &slot.user {
            count_down(&mut table.per_user, key);
        }
        drop(table);
        if let Some(cluster) = &self.inner.cluster {
            cluster.unregister_later(id);
        }
    }
}

/// One session's place in the [`Registry`]; dropping it unregisters the session.
pub struct SessionHandle {
    registry: Registry,
    id: u64,
    bytes: Arc<Bytes>,
    kicked: watch::Receiver<bool>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SessionHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session logged in as `user`: refused when the user already has as many sessions as
    /// the per-user limit allows (the session is then not counted as the user's).
    pub fn logged_in(&self, user: &str) -> Result<(), LimitExceeded> {
        let limit = self.registry.inner.limits.per_user;
        let key = user_key(user);
        let mut table = self.registry.table();
        let table = &mut *table;
        let Some(slot) = table.sessions.get_mut(&self.id) else {
            return Ok(());
        };
        // The state machine allows one login per session; should another come, the session
        // moves from the old name to the new one rather than counting twice.
        if let Some((_, old)) = slot.user.take() {
            count_down(&mut table.per_user, &old);
        }
        let theirs = table.per_user.get(&key).copied().unwrap_or(0);
        if limit > 0 && theirs >= limit {
            return Err(LimitExceeded::User);
        }
        count_up(&mut table.per_user, key.clone());
        slot.user = Some((user.to_owned(), key));
        slot.cluster_pending = self.registry.inner.cluster.is_some() && limit > 0;
        Ok(())
    }

    /// After [`SessionHandle::logged_in`] allowed a login: with a cluster registry, the
    /// per-user limit across every instance. Refused: the session no longer counts as the
    /// user's, as when the in-process limit refuses. Redis failing or too slow: the
    /// in-process count stands, and that is logged and counted. Returns at once when there is
    /// nothing to check.
    pub async fn confirm_login(&self) -> Result<(), LimitExceeded> {
        let Some(cluster) = &self.registry.inner.cluster else {
            return Ok(());
        };
        let user_key = {
            let mut table = self.registry.table();
            let Some(slot) = table.sessions.get_mut(&self.id) else {
                return Ok(());
            };
            if !std::mem::take(&mut slot.cluster_pending) {
                return Ok(());
            }
            match &slot.user {
                Some((_, key)) => key.clone(),
                None => return Ok(()),
            }
        };
        let limit = self.registry.inner.limits.per_user;
        // Boxed: the Redis call's state is 1.7 KiB, which every session's task would carry
        // for its whole life although it is awaited once per login.
        match Box::pin(cluster.register(self.id, &user_key, limit)).await {
            Ok(Registration::Registered { .. }) => Ok(()),
            Ok(Registration::OverLimit { count }) => {
                tracing::debug!(
                    count,
                    "the user's sessions across the cluster are at the limit"
                );
                let mut table = self.registry.table();
                let table = &mut *table;
                if let Some(slot) = table.sessions.get_mut(&self.id)
                    && let Some((_, key)) = slot.user.take()
                {
                    count_down(&mut table.per_user, &key);
                }
                Err(LimitExceeded::User)
            }
            Err(error) => {
                // Counted in imapgate_state_requests_total{op="session"}.
                tracing::warn!(%error, "cluster session limit unavailable: the in-process count applies");
                Ok(())
            }
        }
    }

    /// The upstream the session is connected to, by its configured name.
    pub fn set_upstream(&self, name: &str) {
        if let Some(slot) = self.registry.table().sessions.get_mut(&self.id) {
            slot.upstream = Some(name.to_owned());
        }
    }

    /// `n` bytes read from the client.
    pub fn count_in(&self, n: usize) {
        self.bytes.input.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` bytes read from the upstream.
    pub fn count_out(&self, n: usize) {
        self.bytes.output.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Whether an operator kicked the session.
    pub fn is_kicked(&self) -> bool {
        *self.kicked.borrow()
    }

    /// Completes when an operator kicks the session (at once if that already happened).
    /// Cancel-safe: a `select!` branch may drop it and call again.
    /// The kick signal, for a driver that waits for it beside other things.
    pub fn kick_signal(&self) -> watch::Receiver<bool> {
        self.kicked.clone()
    }

    pub async fn kicked(&mut self) {
        // An error means the registry dropped the slot's sender: the session is no longer
        // registered, and nobody can kick it.
        if self.kicked.wait_for(|kicked| *kicked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.registry.unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn limits(per_user: usize, per_address: usize) -> Registry {
        Registry::new(ConnectionLimits {
            per_user,
            per_address,
        })
    }

    #[test]
    fn a_dropped_handle_unregisters() {
        let r = Registry::default();
        let a = r.register(1, addr("192.0.2.1:1000"), "imaps").unwrap();
        let b = r.register(2, addr("192.0.2.2:1000"), "imap").unwrap();
        b.logged_in("Alice").unwrap();
        b.set_upstream("mail1");
        b.count_in(10);
        b.count_out(300);
        b.count_out(5);
        let all = r.sessions();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].id, 1);
        assert_eq!(all[0].user, None);
        assert_eq!(all[1].user.as_deref(), Some("Alice"));
        assert_eq!(all[1].upstream.as_deref(), Some("mail1"));
        assert_eq!(all[1].listener, "imap");
        assert_eq!((all[1].bytes_in, all[1].bytes_out), (10, 305));
        assert_eq!(r.sessions_of("ALICE"), 1);
        drop(b);
        assert_eq!(r.sessions_of("alice"), 0);
        assert_eq!(r.len(), 1);
        drop(a);
        assert!(r.is_empty());
        assert!(r.table().per_address.is_empty());
    }

    #[test]
    fn the_address_limit_counts_the_ip_not_the_port() {
        let r = limits(0, 2);
        let a = r.register(1, addr("192.0.2.1:1000"), "l").unwrap();
        let _b = r.register(2, addr("192.0.2.1:1001"), "l").unwrap();
        let err = r.register(3, addr("192.0.2.1:1002"), "l").unwrap_err();
        assert_eq!(err, LimitExceeded::Address("192.0.2.1".parse().unwrap()));
        assert_eq!(err.bye_text(), "Too many connections from your address");
        // The same client through an IPv6 socket.
        assert!(r.register(3, addr("[::ffff:192.0.2.1]:1003"), "l").is_err());
        let _other = r.register(4, addr("192.0.2.2:1000"), "l").unwrap();
        drop(a);
        let _c = r.register(5, addr("192.0.2.1:1004"), "l").unwrap();
    }

    #[test]
    fn the_user_limit_ignores_case_and_frees_on_drop() {
        let r = limits(2, 0);
        let p = addr("192.0.2.1:1");
        let a = r.register(1, p, "l").unwrap();
        let b = r.register(2, p, "l").unwrap();
        let c = r.register(3, p, "l").unwrap();
        a.logged_in("bob").unwrap();
        b.logged_in("BOB").unwrap();
        assert_eq!(c.logged_in("Bob"), Err(LimitExceeded::User));
        // Refused: not counted, and not shown as Bob's.
        assert_eq!(r.sessions_of("bob"), 2);
        assert_eq!(r.sessions()[2].user, None);
        c.logged_in("carol").unwrap();
        drop(a);
        let d = r.register(4, p, "l").unwrap();
        d.logged_in("bob").unwrap();
    }

    #[test]
    fn no_limits_by_default() {
        let r = Registry::default();
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let h = r.register(i, addr("192.0.2.1:1"), "l").unwrap();
                h.logged_in("same").unwrap();
                h
            })
            .collect();
        assert_eq!(r.sessions_of("same"), 50);
        drop(handles);
        assert!(r.table().per_user.is_empty());
    }

    #[tokio::test]
    async fn kick_reaches_every_session_of_the_user_once() {
        let r = Registry::default();
        let p = addr("192.0.2.1:1");
        let mut a = r.register(1, p, "l").unwrap();
        let mut b = r.register(2, p, "l").unwrap();
        let other = r.register(3, p, "l").unwrap();
        let anonymous = r.register(4, p, "l").unwrap();
        a.logged_in("dave@example.org").unwrap();
        b.logged_in("Dave@Example.org").unwrap();
        other.logged_in("erin").unwrap();
        assert_eq!(r.kick_user("DAVE@example.org"), 2);
        // Told already: not counted twice.
        assert_eq!(r.kick_user("dave@example.org"), 0);
        assert_eq!(r.kick_user("nobody"), 0);
        let soon = Duration::from_secs(5);
        tokio::time::timeout(soon, a.kicked()).await.unwrap();
        tokio::time::timeout(soon, b.kicked()).await.unwrap();
        // Still kicked when asked again (the driver's select! may have dropped the future).
        tokio::time::timeout(soon, a.kicked()).await.unwrap();
        assert!(a.is_kicked() && b.is_kicked());
        assert!(!other.is_kicked() && !anonymous.is_kicked());
    }
}
