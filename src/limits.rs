//! Abuse limits that need shared state: how many connections each client address holds, the
//! growing delay after failed logins (like Dovecot's auth penalty), and the [`LoginGate`]
//! (RFC 2449 LOGIN-DELAY and the backoff after upstream pressure). All are bounded in memory
//! whatever an attacker does.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::maildrop::Signal;

/// Most tracked keys in one penalty table; beyond it, stale entries go, then all of them.
const MAX_TRACKED: usize = 100_000;

/// Counts open connections, in total and per client address.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Total,
    PerIp,
}

/// Held for the life of a connection; frees its slot on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(ConnectionLimiter {
            max_total,
            max_per_ip,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Rejected> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.0 >= self.max_total {
            return Err(Rejected::Total);
        }
        let per_ip = open.1.entry(ip).or_insert(0);
        if *per_ip >= self.max_per_ip {
            return Err(Rejected::PerIp);
        }
        *per_ip += 1;
        open.0 += 1;
        Ok(ConnectionSlot {
            limiter: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .limiter
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

/// Failed logins per client address and per user name, turned into a delay before the
/// failure is answered: nothing for the first failure, then `base`, doubling up to `max`.
/// A correct password is never delayed and clears both counters.
#[derive(Debug)]
pub struct AuthPenalty {
    base: Duration,
    max: Duration,
    /// Failures older than this are forgotten.
    window: Duration,
    by_ip: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    by_user: Mutex<HashMap<String, (u32, Instant)>>,
}

impl AuthPenalty {
    pub fn new(base: Duration, max: Duration, window: Duration) -> Arc<Self> {
        Arc::new(AuthPenalty {
            base,
            max,
            window,
            by_ip: Mutex::new(HashMap::new()),
            by_user: Mutex::new(HashMap::new()),
        })
    }

    /// Record a failed login; the delay to wait before answering it, and the failure count.
    pub fn failed(&self, ip: Option<IpAddr>, user: &str) -> (Duration, u32) {
        let now = Instant::now();
        let ip_count = ip.map_or(0, |ip| self.bump(&self.by_ip, ip, now));
        let user_count = self.bump(&self.by_user, user.to_lowercase(), now);
        let count = ip_count.max(user_count);
        (self.delay_for(count), count)
    }

    /// A correct password: forget this address's and this user's failures.
    pub fn succeeded(&self, ip: Option<IpAddr>, user: &str) {
        if let Some(ip) = ip {
            self.by_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&ip);
        }
        self.by_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&user.to_lowercase());
    }

    /// The delay after the `count`-th failure in a row.
    pub fn delay_for(&self, count: u32) -> Duration {
        if count <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(count - 2).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    fn bump<K: Hash + Eq>(
        &self,
        table: &Mutex<HashMap<K, (u32, Instant)>>,
        key: K,
        now: Instant,
    ) -> u32 {
        let mut t = table.lock().unwrap_or_else(PoisonError::into_inner);
        if t.len() >= MAX_TRACKED {
            t.retain(|_, (_, last)| now.duration_since(*last) < self.window);
            if t.len() >= MAX_TRACKED {
                t.clear();
            }
        }
        let entry = t.entry(key).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        entry.0
    }
}

/// Logins answered at once, before any upstream is contacted: RFC 2449 LOGIN-DELAY (a user
/// who logged in less than the delay ago) and the backoff after an upstream said it is under
/// pressure (a user, or a whole backend). One per process, shared by all listeners and kept
/// across reloads. Keys are chosen by the caller: a backend name, or a backend and user.
///
/// LOGIN-DELAY answers only a login that brings the credentials of the last successful one
/// (compared by a keyed hash, see [`LoginGate::fingerprint`]): anyone else goes upstream and
/// gets the store's answer, so the delay tells no one without the password whether a user
/// exists or logged in recently.
pub struct LoginGate {
    base: Duration,
    max: Duration,
    /// Random per process: fingerprints mean nothing outside it.
    key: ring::hmac::Key,
    /// Key → the earliest next login allowed, and the fingerprint of the login that set it.
    next_login: Mutex<HashMap<String, (Instant, Fingerprint)>>,
    /// Key → (backoffs in a row, until when, the signal that started it).
    backoff: Mutex<HashMap<String, (u32, Instant, Signal)>>,
}

/// Why [`LoginGate::check`] answered a login at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// RFC 2449 LOGIN-DELAY: the user logged in too recently.
    LoginDelay { wait: Duration },
    /// A backoff is running for the backend or the user, after `signal`.
    Backoff { signal: Signal, wait: Duration },
}

/// A keyed hash (HMAC-SHA-256, key random per process) of a user and the secret they logged
/// in with: never the secret itself.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprint(<redacted>)")
    }
}

impl std::fmt::Debug for LoginGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginGate")
            .field("base", &self.base)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl LoginGate {
    /// A backoff lasts `base` the first time, doubling each time pressure is reported again
    /// within `max` of the previous backoff's end, never longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Arc<Self> {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .expect("the system random number generator works");
        Arc::new(LoginGate {
            base,
            max: max.max(base),
            key,
            next_login: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
        })
    }

    /// The fingerprint of `user` logging in with `secret` (a password or a token).
    pub fn fingerprint(&self, user: &str, secret: &[u8]) -> Fingerprint {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(user.as_bytes());
        ctx.update(b"\0");
        ctx.update(secret);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        Fingerprint(out)
    }

    /// Whether a login of `user` with credentials `fp` may go upstream: the backend's
    /// backoff, the user's, then the LOGIN-DELAY under `delay_key` (the user's, or a view's
    /// of it) for the same credentials only.
    pub fn check(
        &self,
        backend: &str,
        user: &str,
        delay_key: &str,
        fp: &Fingerprint,
        now: Instant,
    ) -> Result<(), Refusal> {
        {
            let b = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
            for key in [backend, user] {
                if let Some(&(_, until, signal)) = b.get(key) {
                    if now < until {
                        return Err(Refusal::Backoff {
                            signal,
                            wait: until - now,
                        });
                    }
                }
            }
        }
        let n = self
            .next_login
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match n.get(delay_key) {
            Some(&(next, last)) if now < next && last == *fp => {
                Err(Refusal::LoginDelay { wait: next - now })
            }
            _ => Ok(()),
        }
    }

    /// A login of `user` with credentials `fp` succeeded: the next may come `delay` later
    /// (nothing is kept for a zero delay).
    pub fn logged_in(&self, user: &str, fp: Fingerprint, delay: Duration, now: Instant) {
        if delay.is_zero() {
            return;
        }
        let mut n = self
            .next_login
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if n.len() >= MAX_TRACKED && !n.contains_key(user) {
            n.retain(|_, (next, _)| now < *next);
            if n.len() >= MAX_TRACKED {
                // Only under a flood of distinct users: some may log in early, nothing worse.
                n.clear();
            }
        }
        n.insert(user.to_owned(), (now + delay, fp));
    }

    /// The upstream sent `signal` for `key` (a backend's, or a user's): start or extend its
    /// backoff. Returns how long it lasts.
    pub fn pressure(&self, key: &str, signal: Signal, now: Instant) -> Duration {
        let mut b = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
        if b.len() >= MAX_TRACKED && !b.contains_key(key) {
            b.retain(|_, (_, until, _)| now < *until + self.max);
            if b.len() >= MAX_TRACKED {
                b.clear();
            }
        }
        let entry = b.entry(key.to_owned()).or_insert((0, now, signal));
        // Pressure again soon after the last backoff ended (or while it runs): longer.
        let strikes = if now < entry.1 + self.max {
            entry.0.saturating_add(1)
        } else {
            1
        };
        let factor = 1u32.checked_shl(strikes - 1).unwrap_or(u32::MAX);
        let wait = self.base.saturating_mul(factor).min(self.max);
        *entry = (strikes, now + wait, signal);
        wait
    }

    /// Entries held (both tables), for tests of the bound.
    pub fn tracked(&self) -> usize {
        self.next_login
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            + self
                .backoff
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn connection_limits_total_and_per_ip_and_release() {
        let l = ConnectionLimiter::new(3, 2);
        let a1 = l.try_acquire(A).unwrap();
        let _a2 = l.try_acquire(A).unwrap();
        assert_eq!(l.try_acquire(A).unwrap_err(), Rejected::PerIp);
        let _b1 = l.try_acquire(B).unwrap();
        assert_eq!(l.try_acquire(B).unwrap_err(), Rejected::Total);
        drop(a1);
        assert!(l.try_acquire(A).is_ok(), "a freed slot is reusable");
    }

    #[test]
    fn penalty_grows_caps_and_resets_on_success() {
        let p = AuthPenalty::new(
            Duration::from_millis(100),
            Duration::from_millis(450),
            Duration::from_secs(60),
        );
        let delays: Vec<u128> = (0..5)
            .map(|_| p.failed(Some(A), "bob").0.as_millis())
            .collect();
        assert_eq!(delays, vec![0, 100, 200, 400, 450]);
        // The same user from another address is still penalised (per user) ...
        assert_eq!(p.failed(Some(B), "Bob").0.as_millis(), 450);
        // ... and another user from the first address too (per address).
        assert_eq!(p.failed(Some(A), "carol").0.as_millis(), 450);
        p.succeeded(Some(A), "bob");
        p.succeeded(Some(B), "carol");
        assert_eq!(p.failed(Some(A), "bob").0, Duration::ZERO);
    }

    #[test]
    fn old_failures_are_forgotten() {
        let p = AuthPenalty::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::ZERO,
        );
        for _ in 0..5 {
            assert_eq!(p.failed(None, "dave").0, Duration::ZERO);
        }
    }

    #[test]
    fn login_delay_refuses_the_same_credentials_until_it_has_passed_and_only_that_user() {
        let g = LoginGate::new(Duration::from_secs(1), Duration::from_secs(8));
        let t = Instant::now();
        let right = g.fingerprint("b\0bob", b"pw");
        assert_eq!(g.check("b", "b\0bob", "b\0bob", &right, t), Ok(()));
        g.logged_in("b\0bob", right, Duration::from_secs(60), t);
        let later = t + Duration::from_secs(20);
        assert_eq!(
            g.check("b", "b\0bob", "b\0bob", &right, later),
            Err(Refusal::LoginDelay {
                wait: Duration::from_secs(40)
            })
        );
        // Other credentials go upstream (which judges them): the delay reveals nothing.
        let wrong = g.fingerprint("b\0bob", b"guess");
        assert_ne!(wrong, right);
        assert_eq!(g.check("b", "b\0bob", "b\0bob", &wrong, later), Ok(()));
        let amy = g.fingerprint("b\0amy", b"pw");
        assert_eq!(g.check("b", "b\0amy", "b\0amy", &amy, later), Ok(()));
        assert_eq!(
            g.check("b", "b\0bob", "b\0bob", &right, t + Duration::from_secs(60)),
            Ok(())
        );
        // The same account through its per-device view has its own delay.
        let view = g.fingerprint("b\0recent:bob", b"pw");
        assert_eq!(
            g.check("b", "b\0bob", "b\0recent:bob", &view, later),
            Ok(())
        );
        g.logged_in("b\0amy", amy, Duration::ZERO, t);
        assert_eq!(g.tracked(), 1, "a zero delay keeps nothing");
        // Another gate (another process) fingerprints differently.
        let other = LoginGate::new(Duration::from_secs(1), Duration::from_secs(8));
        assert_ne!(other.fingerprint("b\0bob", b"pw"), right);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_after_a_quiet_spell() {
        let g = LoginGate::new(Duration::from_secs(1), Duration::from_secs(5));
        let t = Instant::now();
        let waits: Vec<u64> = (0..5)
            .map(|_| g.pressure("b", Signal::Unavailable, t).as_secs())
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 5, 5]);
        assert_eq!(
            g.check(
                "b",
                "b\0bob",
                "b\0bob",
                &g.fingerprint("b\0bob", b"pw"),
                t + Duration::from_secs(1)
            ),
            Err(Refusal::Backoff {
                signal: Signal::Unavailable,
                wait: Duration::from_secs(4)
            })
        );
        // A backend's backoff holds every user of it; a user's only that user.
        let fp = g.fingerprint("x", b"y");
        g.pressure("c\0amy", Signal::Throttled, t);
        assert!(g.check("c", "c\0amy", "c\0amy", &fp, t).is_err());
        assert_eq!(g.check("c", "c\0bob", "c\0bob", &fp, t), Ok(()));
        assert_eq!(
            g.check("b", "b\0bob", "b\0bob", &fp, t + Duration::from_secs(5)),
            Ok(())
        );
        // Quiet for longer than the cap after the end: back to the base.
        assert_eq!(
            g.pressure("b", Signal::Unavailable, t + Duration::from_secs(11))
                .as_secs(),
            1
        );
    }

    #[test]
    fn gate_tables_stay_bounded() {
        let g = LoginGate::new(Duration::from_secs(1), Duration::from_secs(2));
        let t = Instant::now();
        for i in 0..MAX_TRACKED + 10 {
            let fp = g.fingerprint("u", b"p");
            g.logged_in(&format!("u{i}"), fp, Duration::from_secs(60), t);
            g.pressure(&format!("u{i}"), Signal::Limit, t);
        }
        assert!(g.tracked() <= 2 * MAX_TRACKED);
    }
}
