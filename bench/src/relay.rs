//! A latency relay: a TCP forwarder on loopback that delays every chunk by a fixed one-way
//! delay in each direction (so a round trip costs twice the delay), as a distant server would.
//!
//! Bounded: per connection and direction at most [`QUEUE_CHUNKS`] chunks of at most
//! [`CHUNK`] bytes (16 MiB) wait in the relay; beyond that it stops reading and TCP flow
//! control pushes back on the sender. At 25 ms one way that allows ~670 MB/s, above what the
//! servers here deliver, so the relay adds latency, not a bandwidth limit.
//!
//! It counts, per connection, what crossed it: **round trips** (a client->server burst that
//! follows server->client data: the client spoke after hearing something; with pipelining this
//! is an upper bound on the round trips the session waited for), client->server lines (one
//! per command for POP3 and for popbridge's IMAP commands, which use no literals).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Result;

/// Largest chunk read at once.
pub const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction and connection.
pub const QUEUE_CHUNKS: usize = 256;

/// What crossed the relay since it started (or since the last [`Relay::take`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub connections: u64,
    pub round_trips: u64,
    pub client_lines: u64,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    round_trips: AtomicU64,
    client_lines: AtomicU64,
}

pub struct Relay {
    addr: SocketAddr,
    stats: Arc<Stats>,
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr, one_way: Duration) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let delay_us = Arc::new(AtomicU64::new(one_way.as_micros() as u64));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, d, st) = (stats.clone(), delay_us.clone(), stop.clone());
        std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    s.connections.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let last = Arc::new(Mutex::new(Last::None));
                    pipe(&client, &server, true, &s, &d, &last);
                    pipe(&server, &client, false, &s, &d, &last);
                }
            })?;
        Ok(Relay {
            addr,
            stats,
            delay_us,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Changes the one-way delay for data read from now on.
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_us
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }

    /// The counts so far, and resets them.
    pub fn take(&self) -> Counts {
        let t = |a: &AtomicU64| a.swap(0, Ordering::SeqCst);
        Counts {
            connections: t(&self.stats.connections),
            round_trips: t(&self.stats.round_trips),
            client_lines: t(&self.stats.client_lines),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Which direction last carried data on a connection.
#[derive(Clone, Copy, PartialEq)]
enum Last {
    None,
    ClientToServer,
    ServerToClient,
}

/// Starts one direction: a reader thread that stamps chunks and a writer thread that sends
/// each one when its delay has passed.
fn pipe(
    from: &TcpStream,
    to: &TcpStream,
    client_to_server: bool,
    stats: &Arc<Stats>,
    delay_us: &Arc<AtomicU64>,
    last: &Arc<Mutex<Last>>,
) {
    let (Ok(mut from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (tx, rx): (SyncSender<(Instant, Vec<u8>)>, Receiver<_>) = sync_channel(QUEUE_CHUNKS);
    let (stats, delay_us, last) = (stats.clone(), delay_us.clone(), last.clone());
    let reader = move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let due = Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
            if n == 0 {
                let _ = tx.send((due, Vec::new()));
                return;
            }
            let data = &buf[..n];
            {
                let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                if client_to_server {
                    if *l == Last::ServerToClient {
                        stats.round_trips.fetch_add(1, Ordering::Relaxed);
                    }
                    *l = Last::ClientToServer;
                    let lines = memchr_count(data);
                    stats.client_lines.fetch_add(lines, Ordering::Relaxed);
                } else {
                    *l = Last::ServerToClient;
                }
            }
            if tx.send((due, data.to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = move || {
        let mut to = to;
        for (due, data) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if data.is_empty() {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            if to.write_all(&data).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    };
    let _ = std::thread::Builder::new()
        .name("relay-read".into())
        .stack_size(256 * 1024)
        .spawn(reader);
    let _ = std::thread::Builder::new()
        .name("relay-write".into())
        .stack_size(256 * 1024)
        .spawn(writer);
}

fn memchr_count(data: &[u8]) -> u64 {
    data.iter().filter(|&&b| b == b'\n').count() as u64
}
