//! Loopback ports: picking free ones, waiting for a listener.
//!
//! Ports are picked outside the kernel's ephemeral range when that range leaves room: a port
//! bound to `:0` and released comes from that range, and so does the local port of every
//! outgoing connection, so with many tests running at once another test's connection could take
//! it between the pick and the server's bind ("Address already in use"). Outside the range only
//! another listener can take a port, and within this process a counter hands each port out once.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lowest port handed out from outside the ephemeral range.
const LOWEST: u32 = 10_000;

/// `n` distinct loopback ports that were free a moment ago, none handed out before by this
/// process (outside the ephemeral range; bound to port 0 and released when there is no room).
pub fn try_free_ports(n: usize) -> io::Result<Vec<u16>> {
    match quiet_range() {
        Some(range) => (0..n).map(|_| next_quiet_port(range)).collect(),
        None => ephemeral_ports(n),
    }
}

/// [`try_free_ports`], panicking if loopback cannot be bound.
pub fn free_ports(n: usize) -> Vec<u16> {
    try_free_ports(n).unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"))
}

/// The ports below the ephemeral range (`[LOWEST, low)`), or above it up to 65535, whichever
/// is larger; `None` if neither holds 2,000 ports.
fn quiet_range() -> Option<(u32, u32)> {
    static RANGE: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *RANGE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = text.split_whitespace().map(|w| w.parse::<u32>().ok());
        let (low, high) = (it.next()??, it.next()??);
        let below = (LOWEST, low.max(LOWEST));
        let above = (high.saturating_add(1).max(LOWEST), 65_536);
        let best = if below.1 - below.0 >= above.1 - above.0 {
            below
        } else {
            above
        };
        (best.1 - best.0 >= 2_000).then_some(best)
    })
}

/// The next port of `range` (start, end exclusive) that binds now. Each process starts at its
/// own place in the range (from its pid), so test binaries run one after another do not reuse
/// the same ports either.
fn next_quiet_port((start, end): (u32, u32)) -> io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = end - start;
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (start + (offset + step) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free loopback port in {start}..{end}"),
    ))
}

/// `n` distinct ports from the ephemeral range (bound to port 0, then released).
fn ephemeral_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<_>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// 127.0.0.1:`port` accepts a connection now (tried for up to 200 ms).
pub(crate) fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Waits until 127.0.0.1:`port` accepts a connection; false after `timeout`.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if accepts(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_outside_the_ephemeral_range() {
        let ports = free_ports(50);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 50, "{ports:?}");
        if let Some((start, end)) = quiet_range() {
            assert!(
                ports.iter().all(|&p| (start..end).contains(&u32::from(p))),
                "{ports:?} not in {start}..{end}"
            );
        }
        for p in ports {
            TcpListener::bind(("127.0.0.1", p)).expect("a handed-out port binds");
        }
    }
}
