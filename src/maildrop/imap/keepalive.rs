//! Upstream connections kept after a POP3 session for the same user's next one
//! (`imap.keep_alive_secs`): a polling client's next session then skips the connect, the
//! greeting and the login, and the server the start of a new IMAP process and the
//! authentication.
//!
//! What stays correct: a kept connection is only an authenticated IMAP session. The next
//! session runs its usual SELECT (which, on a folder still selected, closes it without
//! expunging, RFC 3501 6.3.1), UID SEARCH and GETMETADATA on it, so its listing is as fresh as
//! after a login; nothing of the earlier session's listing is kept. A connection is parked
//! only after a clean end (its owed `\Seen` STOREs answered OK, nothing unread, not broken);
//! it is removed when taken, so two sessions never share one.
//!
//! The key is a SHA-256, salted with a random per-process salt, of everything that decides
//! what the login opens: endpoint, login form, user, password, master identity, folder and
//! view. The password is never kept; a wrong password never matches a key, so it goes to the
//! server's login as before. Bounded: at most `keep_alive_max` connections per backend (the
//! oldest logged out to make room), each at most `keep_alive_secs` (a sweeper logs them out),
//! every LOGOUT with a short deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use imap_next::imap_types::command::CommandBody;
use ring::digest;

use crate::metrics::metrics;
use crate::upstream::imap::session::{Capabilities, Session};
use crate::upstream::imap::ImapConnection;
use crate::upstream::SetupError;

/// A kept connection answers its first command (NOOP) within this, or a fresh login is made.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Which login a kept connection is for (see the module docs): never the password itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParkKey([u8; 32]);

struct Entry {
    seq: u64,
    at: Instant,
    conn: ImapConnection,
    capabilities: Capabilities,
}

#[derive(Default)]
struct Parked {
    by_key: HashMap<ParkKey, Entry>,
    /// Parking order, oldest first: what makes room, and what expires first.
    order: BTreeMap<u64, ParkKey>,
    next_seq: u64,
    sweeping: bool,
}

impl Parked {
    fn remove(&mut self, key: &ParkKey) -> Option<Entry> {
        let e = self.by_key.remove(key)?;
        self.order.remove(&e.seq);
        metrics().upstream_keepalive_parked.dec();
        Some(e)
    }

    fn pop_oldest(&mut self) -> Option<Entry> {
        let (_, key) = self.order.pop_first()?;
        let e = self.by_key.remove(&key)?;
        metrics().upstream_keepalive_parked.dec();
        Some(e)
    }
}

/// The kept connections of one IMAP backend.
pub struct KeepAlive {
    hold: Duration,
    max: usize,
    salt: [u8; 32],
    parked: Mutex<Parked>,
}

fn count(outcome: &str) {
    metrics()
        .upstream_keepalive
        .with_label_values(&[outcome])
        .inc();
}

/// LOGOUT in the background (bounded by the LOGOUT's own short deadline), or a plain drop
/// outside a runtime.
fn log_out(conn: ImapConnection) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(conn.logout());
    }
}

impl KeepAlive {
    /// `None` when `hold_secs` is 0 (keep-alive off); `Err` when the system's random source
    /// gives no salt.
    pub fn new(hold_secs: u64, max: u32) -> Result<Option<Arc<KeepAlive>>, SetupError> {
        if hold_secs == 0 {
            return Ok(None);
        }
        let mut salt = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| SetupError::Random)?;
        Ok(Some(Arc::new(KeepAlive {
            hold: Duration::from_secs(hold_secs),
            max: max.max(1) as usize,
            salt,
            parked: Mutex::new(Parked::default()),
        })))
    }

    /// The key of a login made of `parts` (each length-prefixed, so no two lists collide).
    pub fn key(&self, parts: &[&[u8]]) -> ParkKey {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&self.salt);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        ParkKey(out)
    }

    /// The connection kept for `key`, if any, removed from the pool and checked: still open,
    /// kept and logged in less than `keep_alive_secs` ago, and answering a NOOP. `None`: log
    /// in afresh.
    pub async fn take(&self, key: &ParkKey) -> Option<Session> {
        let entry = self.lock().remove(key)?;
        if entry.at.elapsed() >= self.hold || self.login_too_old(&entry.conn) {
            count("expired");
            log_out(entry.conn);
            return None;
        }
        let mut conn = entry.conn;
        let alive = conn.is_quiet()
            && matches!(
                tokio::time::timeout(CHECK_TIMEOUT, conn.execute(CommandBody::Noop, |_| {})).await,
                Ok(Ok(done)) if done.is_ok()
            );
        if !alive {
            tracing::debug!("kept upstream connection is gone: logging in afresh");
            count("stale");
            return None;
        }
        tracing::debug!("upstream connection kept from the user's previous session: no login");
        count("reused");
        Some(Session {
            conn,
            capabilities: entry.capabilities,
        })
    }

    /// Keep `conn` for `key` after a session's clean end: the owed STOREs are sent first and
    /// must all succeed; a connection that is not quiet afterwards is logged out instead.
    pub async fn park(
        self: &Arc<Self>,
        key: ParkKey,
        mut conn: ImapConnection,
        capabilities: Capabilities,
        owed: Vec<CommandBody<'static>>,
    ) {
        // Also reads what is left of a streamed or prefetched FETCH (bounded, as at LOGOUT).
        let owes = !owed.is_empty();
        match conn.execute_all(owed, |_| {}).await {
            Ok(done) => {
                let failed: Vec<_> = done.into_iter().filter(|d| !d.is_ok()).collect();
                if !failed.is_empty() {
                    for d in failed {
                        tracing::warn!(text = %d.text, "could not flag retrieved messages \\Seen");
                    }
                    conn.logout().await;
                    return;
                }
            }
            Err(e) if owes => {
                tracing::warn!(error = %e, "could not flag retrieved messages \\Seen");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "upstream connection not kept: it failed at the end of the session");
                return;
            }
        }
        if !conn.is_quiet() {
            conn.logout().await;
            return;
        }
        // Kept at most `keep_alive_secs` after its login, however often it is taken up: a
        // password changed or an account disabled on the server takes effect within that.
        if self.login_too_old(&conn) {
            count("expired");
            conn.logout().await;
            return;
        }
        conn.reset_for_reuse();
        let (evicted, start_sweeper) = {
            let mut p = self.lock();
            let mut evicted = p.remove(&key).into_iter().collect::<Vec<_>>();
            while p.by_key.len() >= self.max {
                match p.pop_oldest() {
                    Some(e) => evicted.push(e),
                    None => break,
                }
            }
            let seq = p.next_seq;
            p.next_seq += 1;
            p.order.insert(seq, key);
            p.by_key.insert(
                key,
                Entry {
                    seq,
                    at: Instant::now(),
                    conn,
                    capabilities,
                },
            );
            metrics().upstream_keepalive_parked.inc();
            let start = !p.sweeping;
            p.sweeping = true;
            (evicted, start)
        };
        count("parked");
        for e in evicted {
            count("evicted");
            log_out(e.conn);
        }
        if start_sweeper {
            tokio::spawn(sweep(Arc::downgrade(self), self.sweep_every()));
        }
    }

    /// Logs every kept connection out, concurrently, waiting at most `bound` (a stopping
    /// server); what has not answered by then is dropped.
    pub async fn log_out_all(&self, bound: Duration) {
        let mut all = Vec::new();
        {
            let mut p = self.lock();
            while let Some(e) = p.pop_oldest() {
                all.push(e.conn);
            }
        }
        if all.is_empty() {
            return;
        }
        let mut set = tokio::task::JoinSet::new();
        for conn in all {
            set.spawn(conn.logout());
        }
        let _ =
            tokio::time::timeout(bound, async { while set.join_next().await.is_some() {} }).await;
    }

    /// Whether `conn`'s login is `keep_alive_secs` old or older (or unknown).
    fn login_too_old(&self, conn: &ImapConnection) -> bool {
        conn.login_age().is_none_or(|age| age >= self.hold)
    }

    fn sweep_every(&self) -> Duration {
        (self.hold / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Removes the connections kept `keep_alive_secs` or longer.
    fn expired(&self) -> Vec<ImapConnection> {
        let mut p = self.lock();
        let mut out = Vec::new();
        while let Some((_, key)) = p.order.first_key_value() {
            let key = *key;
            if p.by_key
                .get(&key)
                .is_some_and(|e| e.at.elapsed() < self.hold)
            {
                break;
            }
            if let Some(e) = p.remove(&key) {
                out.push(e.conn);
            } else {
                p.order.pop_first();
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many connections are kept (for tests and logs).
    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Logs out expired connections until the pool is gone.
async fn sweep(pool: Weak<KeepAlive>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        let expired = pool.expired();
        drop(pool);
        for conn in expired {
            count("expired");
            log_out(conn);
        }
    }
}

impl Drop for KeepAlive {
    /// A reloaded configuration's old pool, or a stopping server: LOGOUT each, bounded.
    fn drop(&mut self) {
        let p = self.parked.get_mut().unwrap_or_else(|e| e.into_inner());
        while let Some(e) = p.pop_oldest() {
            log_out(e.conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_salted_and_unambiguous() {
        let a = KeepAlive::new(60, 4).unwrap().unwrap();
        let b = KeepAlive::new(60, 4).unwrap().unwrap();
        let k = |pool: &KeepAlive, parts: &[&[u8]]| pool.key(parts);
        assert_eq!(
            k(&a, &[b"h:143", b"alice", b"pw"]),
            k(&a, &[b"h:143", b"alice", b"pw"])
        );
        // Another process (salt) gives another key for the same login.
        assert_ne!(
            k(&a, &[b"h:143", b"alice", b"pw"]),
            k(&b, &[b"h:143", b"alice", b"pw"])
        );
        // A wrong password, and parts that concatenate alike, never match.
        assert_ne!(
            k(&a, &[b"h:143", b"alice", b"pw"]),
            k(&a, &[b"h:143", b"alice", b"pW"])
        );
        assert_ne!(
            k(&a, &[b"h:143", b"alice", b"pw"]),
            k(&a, &[b"h:143", b"alicep", b"w"])
        );
        assert!(KeepAlive::new(0, 4).unwrap().is_none());
        assert!(a.is_empty());
    }
}
