//! The pieces of a ledger-checked load test (tests/crash.rs, tests/fleet.rs): a seeded random
//! generator, messages that carry their own ledger marker, and the upstream mailbox read by UID
//! with each message's marker and hide flag.

use std::collections::BTreeMap;

use crate::imap_raw::Imap;

/// xorshift64*: a whole run follows from one printed seed (thread timing aside).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A seed from the clock, unless the environment variable `var` gives one (to replay a run).
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        })
}

/// Message `n` of `user`, carrying the header `X-Ledger: <user>/m<n>`.
pub fn ledger_message(user: &str, n: usize) -> Vec<u8> {
    format!(
        "From: ledger@example.test\r\nSubject: {user} #{n}\r\nX-Ledger: {user}/m{n}\r\n\r\n{}",
        "some body text\r\n".repeat(n % 7 + 1)
    )
    .into_bytes()
}

/// One message as the upstream holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamMessage {
    /// Its `X-Ledger` marker.
    pub marker: String,
    /// It carries the hide keyword (`$POP3Deleted`).
    pub hidden: bool,
}

/// UIDVALIDITY and every message of `user`'s `mailbox` by UID, read with a raw IMAP client
/// (EXAMINE: nothing changes).
pub fn upstream_view(
    imap_port: u16,
    user: &str,
    password: &str,
    mailbox: &str,
) -> (u32, BTreeMap<u32, UpstreamMessage>) {
    let mut c = Imap::connect(imap_port);
    c.run(&format!("LOGIN {user} {password}"), &[]);
    let selected = c.run(&format!("EXAMINE {mailbox}"), &[]);
    let uidvalidity = selected
        .iter()
        .find_map(|l| l.split("[UIDVALIDITY ").nth(1))
        .and_then(|v| v.split(']').next())
        .and_then(|v| v.parse().ok())
        .expect("EXAMINE gives UIDVALIDITY");
    let exists = selected
        .iter()
        .any(|l| l.starts_with("* ") && !l.starts_with("* 0 EXISTS") && l.contains(" EXISTS"));
    let lines = if exists {
        c.run(
            "UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (X-LEDGER)])",
            &[],
        )
    } else {
        Vec::new()
    };
    let _ = c.try_run("LOGOUT", &[]);
    let mut out = BTreeMap::new();
    let mut current: Option<(u32, bool)> = None;
    for l in lines {
        if l.starts_with("* ") && l.contains(" FETCH (") {
            let uid = l
                .split("UID ")
                .nth(1)
                .and_then(|v| v.split([' ', ')']).next())
                .and_then(|v| v.parse().ok())
                .expect("FETCH with UID");
            current = Some((uid, l.contains("$POP3Deleted")));
        } else if let Some(m) = l.strip_prefix("X-Ledger: ") {
            let (uid, hidden) = current.take().expect("X-Ledger outside a FETCH");
            let marker = m.trim().to_string();
            out.insert(uid, UpstreamMessage { marker, hidden });
        }
    }
    (uidvalidity, out)
}
