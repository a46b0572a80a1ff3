//! Abuse limits that need shared state: how many connections each client address holds, and
//! the growing delay after failed logins (like Dovecot's auth penalty). Both are bounded in
//! memory whatever an attacker does.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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
}
