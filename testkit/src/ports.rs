//! Loopback ports: picking free ones, waiting for a listener.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// `n` distinct loopback ports that were free a moment ago (bound to port 0, then released).
pub fn try_free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<_>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// [`try_free_ports`], panicking if loopback cannot be bound.
pub fn free_ports(n: usize) -> Vec<u16> {
    try_free_ports(n).unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"))
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
