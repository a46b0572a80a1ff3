//! A fault-injecting TCP relay between popbridge and the upstream: it forwards bytes both ways
//! until a chosen fault: cut both connections, or stall (stop forwarding, keep them open),
//! when a byte count is reached or when the client side sends a given pattern; or delay the
//! upstream's answer to that pattern (to order two sessions' upstream commands deterministically);
//! or answer a command itself (`NO [THROTTLED]` and friends) without forwarding it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// When the fault strikes.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// Never: a transparent relay.
    Never,
    /// After this many bytes from the upstream (server to client), counted per connection.
    UpstreamBytes(u64),
    /// When the client side's bytes (per connection) contain this text; the matching chunk is
    /// not forwarded.
    ClientSends(String),
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close both connections.
    Cut,
    /// Stop forwarding in both directions but keep the connections open.
    Stall,
    /// Forward everything, but hold the upstream's next bytes after the trigger this long
    /// (with [`Trigger::ClientSends`]: the answer to that command arrives late).
    Delay(Duration),
    /// Forward everything, line by line, without the `[CAPABILITY ...]` response codes (the
    /// greeting's and LOGIN's): the client has to ask with CAPABILITY. Use with
    /// [`Trigger::Never`].
    HideCapabilityCodes,
    /// With [`Trigger::ClientSends`]: a client line (an IMAP command) containing the pattern
    /// is not forwarded; the relay answers it itself with its tag and this text (e.g.
    /// `NO [THROTTLED] Too many logins`). Every such line of every connection, while the rule
    /// holds; other lines pass through.
    Answer(&'static str),
}

/// `line` without any `[CAPABILITY ...] ` response code.
fn strip_capability_codes(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest
        .windows(12)
        .position(|w| w.eq_ignore_ascii_case(b"[CAPABILITY "))
    {
        out.extend_from_slice(&rest[..at]);
        let Some(end) = rest[at..].iter().position(|&b| b == b']') else {
            rest = &[];
            break;
        };
        rest = &rest[at + end + 1..];
        if rest.first() == Some(&b' ') {
            rest = &rest[1..];
        }
    }
    out.extend_from_slice(rest);
    out
}

pub struct Relay {
    port: u16,
    fired: Arc<AtomicU64>,
    /// Connections made to the upstream so far.
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    rule: Arc<Mutex<(Trigger, Fault)>>,
}

impl Relay {
    /// Relay 127.0.0.1:<new port> to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16, trigger: Trigger, fault: Fault) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fired = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let rule = Arc::new(Mutex::new((trigger, fault)));
        {
            let (fired, stop, rule) = (fired.clone(), stop.clone(), rule.clone());
            let connections = connections.clone();
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        continue;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let rule = rule.lock().unwrap().clone();
                    spawn_pair(client, server, rule, fired.clone());
                }
            });
        }
        Relay {
            port,
            fired,
            connections,
            stop,
            rule,
        }
    }

    /// How many connections were made to the upstream through the relay so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections the fault has struck so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    /// Change the rule for connections accepted from now on.
    pub fn set(&self, trigger: Trigger, fault: Fault) {
        *self.rule.lock().unwrap() = (trigger, fault);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn spawn_pair(client: TcpStream, server: TcpStream, rule: (Trigger, Fault), fired: Arc<AtomicU64>) {
    let (trigger, fault) = rule;
    let struck = Arc::new(AtomicBool::new(false));
    let strike = {
        let (c, s, struck, fired) = (
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            struck.clone(),
            fired.clone(),
        );
        move || {
            if !struck.swap(true, Ordering::SeqCst) {
                fired.fetch_add(1, Ordering::SeqCst);
                if fault == Fault::Cut {
                    let _ = c.shutdown(Shutdown::Both);
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    };
    let strike = Arc::new(strike);

    // A pending Fault::Delay, set when the client side sends the trigger.
    let delay: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
    // Upstream to client.
    {
        let (mut from, mut to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
        let (trigger, struck, strike) = (trigger.clone(), struck.clone(), strike.clone());
        let delay = delay.clone();
        thread::spawn(move || {
            let mut sent = 0u64;
            let mut buf = [0u8; 16 * 1024];
            let mut partial: Vec<u8> = Vec::new();
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if fault == Fault::HideCapabilityCodes {
                    partial.extend_from_slice(&buf[..n]);
                    let Some(last_lf) = partial.iter().rposition(|&b| b == b'\n') else {
                        continue;
                    };
                    let rest = partial.split_off(last_lf + 1);
                    let lines = std::mem::replace(&mut partial, rest);
                    let mut out = Vec::with_capacity(lines.len());
                    for line in lines.split_inclusive(|&b| b == b'\n') {
                        out.extend(strip_capability_codes(line));
                    }
                    if to.write_all(&out).is_err() {
                        break;
                    }
                    continue;
                }
                let pause = delay.lock().unwrap().take();
                if let Some(d) = pause {
                    thread::sleep(d);
                }
                if struck.load(Ordering::SeqCst) {
                    if fault == Fault::Stall {
                        continue;
                    }
                    break;
                }
                let mut chunk = &buf[..n];
                if let Trigger::UpstreamBytes(limit) = trigger {
                    let room = limit.saturating_sub(sent) as usize;
                    if chunk.len() >= room {
                        chunk = &chunk[..room];
                        let _ = to.write_all(chunk);
                        sent += chunk.len() as u64;
                        strike();
                        continue;
                    }
                }
                if to.write_all(chunk).is_err() {
                    break;
                }
                sent += chunk.len() as u64;
            }
            if fault == Fault::Cut || !struck.load(Ordering::SeqCst) {
                let _ = to.shutdown(Shutdown::Write);
            }
        });
    }
    if let (Fault::Answer(answer), Trigger::ClientSends(pattern)) = (fault, &trigger) {
        answer_matching_lines(client, server, pattern.clone(), answer, fired);
        return;
    }
    // Client to upstream.
    {
        let (mut from, mut to) = (client, server);
        thread::spawn(move || {
            let fired = fired;
            let mut seen = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if struck.load(Ordering::SeqCst) {
                    if fault == Fault::Stall {
                        continue;
                    }
                    break;
                }
                if let Trigger::ClientSends(pattern) = &trigger {
                    seen.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&seen).contains(pattern.as_str()) {
                        if let Fault::Delay(d) = fault {
                            // Set before forwarding, so the answer cannot overtake it.
                            fired.fetch_add(1, Ordering::SeqCst);
                            *delay.lock().unwrap() = Some(d);
                            seen.clear();
                        } else {
                            strike();
                            continue;
                        }
                    }
                    // Keep only a tail long enough to match across chunk boundaries.
                    let keep = pattern.len().max(1) * 4;
                    if seen.len() > keep {
                        seen.drain(..seen.len() - keep);
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            if fault == Fault::Cut || !struck.load(Ordering::SeqCst) {
                let _ = to.shutdown(Shutdown::Write);
            }
        });
    }
    // A stalled pair lives until the peers give up; nothing to join.
}

/// [`Fault::Answer`]'s client side: forwards line by line, answering the lines that contain
/// `pattern` itself (`<tag> <answer>`) instead of forwarding them.
fn answer_matching_lines(
    client: TcpStream,
    server: TcpStream,
    pattern: String,
    answer: &'static str,
    fired: Arc<AtomicU64>,
) {
    let (mut from, mut to) = (client.try_clone().unwrap(), server);
    let mut reply_to = client;
    thread::spawn(move || {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            let Some(last_lf) = pending.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let rest = pending.split_off(last_lf + 1);
            let lines = std::mem::replace(&mut pending, rest);
            for line in lines.split_inclusive(|&b| b == b'\n') {
                if String::from_utf8_lossy(line).contains(pattern.as_str()) {
                    fired.fetch_add(1, Ordering::SeqCst);
                    let tag = line.split(|&b| b == b' ').next().unwrap_or(b"*");
                    let mut out = tag.to_vec();
                    out.extend_from_slice(format!(" {answer}\r\n").as_bytes());
                    let _ = reply_to.write_all(&out);
                } else if to.write_all(line).is_err() {
                    return;
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
