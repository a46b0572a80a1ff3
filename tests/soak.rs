//! A bounded soak: POP3 clients of several users download, delete and reconnect through
//! popbridge while new mail is appended over IMAP and another IMAP client flags and expunges
//! mail. Checked against a ledger of everything appended: zero protocol errors, no message
//! lost, none shown under two UIDLs, none shown again after a committed DELE.
//! Some POP3 sessions drop the connection after DELE without QUIT (a client-side fault): those
//! marks must never apply. At the end every client downloads what is left, and every appended
//! message must have reached every client unless it was deleted by a committed QUIT or expunged
//! over IMAP. `SOAK_SECS` sets the length (default 120 s, what CI runs; run longer locally);
//! a shorter run against Cyrus goes beside it (`SOAK_CYRUS_SECS`, default a quarter of that).

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::imap_raw::Imap;
use support::*;

const USERS: usize = 4;
const POP3_CLIENTS_PER_USER: usize = 3;

/// A POP3 client that keeps the UIDLs it has downloaded, like Outlook with "leave on server".
struct PopClient {
    user: String,
    seen: HashMap<String, String>,
}

#[derive(Default)]
struct Tally {
    sessions: AtomicU64,
    retrieved: AtomicU64,
    committed_deletes: AtomicU64,
    in_use: AtomicU64,
    gone: AtomicU64,
    /// Sessions that dropped the connection after DELE, without QUIT (injected faults).
    dropped: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// marker -> UIDL it was served under (per user): a second UIDL is a duplicate download.
    uidl_of: Mutex<HashMap<String, String>>,
    /// markers whose DELE was committed by QUIT +OK
    deleted: Mutex<HashSet<String>>,
}

fn marker(body: &str) -> Option<String> {
    body.lines()
        .find_map(|l| l.strip_prefix("X-Ledger: "))
        .map(|m| m.trim().to_string())
}

impl PopClient {
    /// One session; with `drop_it` it marks what it would delete, then drops the connection
    /// without QUIT.
    fn session(&mut self, port: u16, tally: &Tally, round: u64, drop_it: bool) {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let line = |r: &mut BufReader<TcpStream>| {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            l
        };
        let err = |msg: String| tally.errors.lock().unwrap().push(msg);
        line(&mut r);
        w.write_all(format!("USER {}\r\nPASS pw\r\n", self.user).as_bytes())
            .unwrap();
        line(&mut r);
        let pass = line(&mut r);
        if pass.starts_with("-ERR [IN-USE]") {
            tally.in_use.fetch_add(1, Ordering::Relaxed);
            let _ = w.write_all(b"QUIT\r\n");
            return;
        }
        if !pass.starts_with("+OK") {
            return err(format!("PASS: {pass}"));
        }
        tally.sessions.fetch_add(1, Ordering::Relaxed);
        w.write_all(b"UIDL\r\n").unwrap();
        if !line(&mut r).starts_with("+OK") {
            return err("UIDL refused".into());
        }
        let mut listing = Vec::new();
        loop {
            let l = line(&mut r);
            if l == ".\r\n" {
                break;
            }
            let mut parts = l.split_whitespace();
            let (n, uidl) = (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            );
            listing.push((n, uidl));
        }
        let mut to_delete = Vec::new();
        for (i, (n, uidl)) in listing.iter().enumerate() {
            if self.seen.contains_key(uidl) {
                // Already downloaded: delete some of those now and then.
                if (i as u64 + round) % 3 == 0 {
                    to_delete.push((n.clone(), self.seen[uidl].clone()));
                }
                continue;
            }
            w.write_all(format!("RETR {n}\r\n").as_bytes()).unwrap();
            let status = line(&mut r);
            if status.starts_with("-ERR") {
                // Expunged by the other IMAP client since this session's snapshot.
                tally.gone.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut body = String::new();
            loop {
                let l = line(&mut r);
                if l == ".\r\n" {
                    break;
                }
                body.push_str(&l);
            }
            tally.retrieved.fetch_add(1, Ordering::Relaxed);
            let Some(m) = marker(&body) else {
                return err(format!("message without ledger marker: {body:.80}"));
            };
            let key = format!("{}/{m}", self.user);
            let mut uidl_of = tally.uidl_of.lock().unwrap();
            if let Some(previous) = uidl_of.insert(key.clone(), uidl.clone()) {
                if previous != *uidl {
                    err(format!(
                        "{key} served under two UIDLs: {previous} and {uidl}"
                    ));
                }
            }
            if tally.deleted.lock().unwrap().contains(&key) {
                err(format!("{key} shown again after a committed DELE"));
            }
            self.seen.insert(uidl.clone(), key);
        }
        for (n, _) in &to_delete {
            w.write_all(format!("DELE {n}\r\n").as_bytes()).unwrap();
            let l = line(&mut r);
            if !l.starts_with("+OK") {
                err(format!("DELE {n}: {l}"));
            }
        }
        if drop_it {
            tally.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        w.write_all(b"QUIT\r\n").unwrap();
        let q = line(&mut r);
        if q.starts_with("+OK") {
            let mut deleted = tally.deleted.lock().unwrap();
            for (_, key) in to_delete {
                deleted.insert(key);
                tally.committed_deletes.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            err(format!("QUIT: {q}"));
        }
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn secs(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn soak_with_concurrent_imap_changes_loses_and_duplicates_nothing() {
    soak(Dovecot::start(), secs("SOAK_SECS", 120));
}

/// The same soak against Cyrus, shorter (it runs beside the Dovecot one).
#[test]
fn soak_against_cyrus_loses_and_duplicates_nothing() {
    soak(
        support::cyrus::Cyrus::start(),
        secs("SOAK_CYRUS_SECS", secs("SOAK_SECS", 120) / 4),
    );
}

fn soak<S: MailServer>(dc: S, secs: u64) {
    let users: Vec<String> = (0..USERS).map(|i| format!("soak{i}")).collect();
    for u in &users {
        dc.add_user(u, "pw");
    }
    let pb = Popbridge::start(
        &dc,
        "[pop3]\nmark_seen = true\n[limits]\nmax_connections_per_ip = 100",
    );
    let pop3 = pb.pop3_port();
    let imap = dc.imap_port();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let appended = Arc::new(Mutex::new(HashSet::<String>::new()));
    let expunged = Arc::new(Mutex::new(HashSet::<String>::new()));
    let started = Instant::now();
    let mut threads = Vec::new();

    // New mail, appended over IMAP, each with a ledger marker.
    {
        let (stop, appended, users) = (stop.clone(), appended.clone(), users.clone());
        threads.push(thread::spawn(move || {
            let mut conns: Vec<Imap> = users.iter().map(|u| Imap::login(imap, u, "pw")).collect();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let i = (n as usize) % conns.len();
                let m = format!("m{n}");
                let body = format!(
                    "From: soak@example.test\r\nSubject: soak {n}\r\nX-Ledger: {m}\r\n\r\n{}\r\n",
                    "line of text\r\n".repeat((n % 50) as usize)
                );
                conns[i].run("APPEND INBOX", body.as_bytes());
                appended.lock().unwrap().insert(format!("{}/{m}", users[i]));
                n += 1;
                thread::sleep(Duration::from_millis(15));
            }
        }));
    }
    // Another IMAP client: flags some mail, expunges some (it tells the ledger which).
    {
        let (stop, expunged, users) = (stop.clone(), expunged.clone(), users.clone());
        threads.push(thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let u = &users[(round as usize) % users.len()];
                let mut c = Imap::login(imap, u, "pw");
                let found = c.run("UID SEARCH ALL", &[]);
                let uids: Vec<u32> = found
                    .iter()
                    .filter_map(|l| l.strip_prefix("* SEARCH"))
                    .flat_map(|l| l.split_whitespace().filter_map(|x| x.parse().ok()))
                    .collect();
                if let Some(&uid) = uids.get((round as usize * 7) % uids.len().max(1)) {
                    c.run(&format!("UID STORE {uid} +FLAGS (\\Flagged)"), &[]);
                }
                if round % 4 == 0 && uids.len() > 5 {
                    let uid = uids[(round as usize * 13) % uids.len()];
                    let fetched = c.run(
                        &format!("UID FETCH {uid} (BODY.PEEK[HEADER.FIELDS (X-LEDGER)])"),
                        &[],
                    );
                    let mut m = None;
                    for l in fetched.iter() {
                        if let Some(x) = marker(l) {
                            m = Some(x);
                        }
                    }
                    // Dovecot sends the header inside a literal: gather the following lines.
                    let joined = fetched.join("");
                    let m = m.or_else(|| marker(&joined));
                    if let Some(m) = m {
                        expunged.lock().unwrap().insert(format!("{u}/{m}"));
                        c.run(&format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"), &[]);
                        c.run(&format!("UID EXPUNGE {uid}"), &[]);
                    }
                }
                c.run("LOGOUT", &[]);
                round += 1;
                thread::sleep(Duration::from_millis(100));
            }
        }));
    }
    // POP3 clients through popbridge; each thread hands its client back at the end.
    let mut pop_threads = Vec::new();
    for (ui, u) in users.iter().enumerate() {
        for ci in 0..POP3_CLIENTS_PER_USER {
            let (stop, tally, user) = (stop.clone(), tally.clone(), u.clone());
            pop_threads.push(thread::spawn(move || {
                let mut client = PopClient {
                    user,
                    seen: HashMap::new(),
                };
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Every 8th session (staggered per client) drops after DELE, no QUIT.
                    let drop_it = (round + (ui * POP3_CLIENTS_PER_USER + ci) as u64) % 8 == 7;
                    client.session(pop3, &tally, round, drop_it);
                    round += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                client
            }));
        }
    }
    // Memory must stay flat: compare the resident size after the warm-up with the end.
    thread::sleep(Duration::from_secs(secs / 4));
    let rss_early = rss_kib(pb.pid());
    thread::sleep(Duration::from_secs(secs - secs / 4));
    let rss_late = rss_kib(pb.pid());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a soak thread panicked");
    }
    let mut clients: Vec<PopClient> = pop_threads
        .into_iter()
        .map(|t| t.join().expect("a POP3 client thread panicked"))
        .collect();
    // Mail has stopped changing: one last session per client downloads whatever it lacks.
    for (i, c) in clients.iter_mut().enumerate() {
        c.session(pop3, &tally, 1_000_000 + i as u64, false);
    }

    let errors = tally.errors.lock().unwrap().clone();
    let duplicated = errors.iter().filter(|e| e.contains("two UIDLs")).count();
    assert!(errors.is_empty(), "protocol errors: {errors:#?}");

    let appended = appended.lock().unwrap().clone();
    let expunged = expunged.lock().unwrap().clone();
    let deleted = tally.deleted.lock().unwrap().clone();
    // Upstream: every appended message not expunged by the IMAP client is still there (POP3
    // deletions only hide), and only messages with a committed DELE are hidden.
    let mut upstream = HashSet::new();
    let mut hidden = HashSet::new();
    for u in &users {
        let mut c = Imap::login(imap, u, "pw");
        let lines = c.run(
            "UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (X-LEDGER)])",
            &[],
        );
        let mut is_hidden = false;
        for l in lines {
            if l.starts_with("* ") && l.contains(" FETCH (") {
                is_hidden = l.contains("$POP3Deleted");
            } else if let Some(m) = marker(&l) {
                let key = format!("{u}/{m}");
                if is_hidden {
                    hidden.insert(key.clone());
                }
                upstream.insert(key);
            }
        }
    }
    let lost_upstream: Vec<_> = appended
        .difference(&upstream)
        .filter(|m| !expunged.contains(*m))
        .collect();
    assert!(lost_upstream.is_empty(), "lost upstream: {lost_upstream:?}");
    let hidden_without_quit: Vec<_> = hidden.difference(&deleted).collect();
    assert!(
        hidden_without_quit.is_empty(),
        "hidden without a committed QUIT: {hidden_without_quit:?}"
    );
    // Through POP3: every client got every message of its user, unless it was deleted by a
    // committed QUIT or expunged over IMAP before the client came to it.
    let mut lost_pop3 = Vec::new();
    for c in &clients {
        let got: HashSet<&String> = c.seen.values().collect();
        for key in appended
            .iter()
            .filter(|k| k.starts_with(&format!("{}/", c.user)))
        {
            if !got.contains(key) && !deleted.contains(key) && !expunged.contains(key) {
                lost_pop3.push(key.clone());
            }
        }
    }
    assert!(
        lost_pop3.is_empty(),
        "never delivered over POP3: {lost_pop3:?}"
    );

    let retrieved = tally.retrieved.load(Ordering::Relaxed);
    let sessions = tally.sessions.load(Ordering::Relaxed);
    let dropped = tally.dropped.load(Ordering::Relaxed);
    let gone = tally.gone.load(Ordering::Relaxed);
    report(&format!(
        "soak ({}) {:.0?} with {USERS} users x {POP3_CLIENTS_PER_USER} POP3 clients: pop3 sessions {sessions}, \
         appended {}, retrieved {retrieved}, deleted (committed) {}, imap-expunged {}, \
         faults {} (dropped without QUIT {dropped}, expunged under a session {gone}), \
         in-use refusals {}, protocol errors 0, lost {}, duplicated {duplicated}, \
         RSS early {rss_early} KiB, late {rss_late} KiB",
        dc.name(),
        started.elapsed(),
        appended.len(),
        deleted.len(),
        expunged.len(),
        dropped + gone,
        tally.in_use.load(Ordering::Relaxed),
        lost_upstream.len() + lost_pop3.len(),
    ));
    assert!(
        rss_late < rss_early + 16 * 1024,
        "memory grew from {rss_early} to {rss_late} KiB"
    );
    assert!(retrieved > 50, "the soak did too little to prove anything");
    assert!(!deleted.is_empty() && dropped > 0 && !expunged.is_empty());
    assert!(pb.log().matches("panicked").count() == 0);
}
