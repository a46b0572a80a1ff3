//! A bounded soak: POP3 clients of several users download, delete and reconnect through
//! popbridge while new mail is appended over IMAP and another IMAP client flags and expunges
//! mail. Checked against a ledger of everything appended: zero protocol errors, no message
//! lost, none shown under two UIDLs, none shown again after a committed DELE.
//! `SOAK_SECS` sets the length (default 40 s; run longer locally).

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const USERS: usize = 3;
const POP3_CLIENTS_PER_USER: usize = 2;

/// A minimal IMAP client over a raw socket (LITERAL+ appends), for load from outside popbridge.
struct Imap {
    r: BufReader<TcpStream>,
    w: TcpStream,
    tag: u32,
}

impl Imap {
    fn login(port: u16, user: &str, pw: &str) -> Imap {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Imap {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            tag: 0,
        };
        c.line();
        c.run(&format!("LOGIN {user} {pw}"), &[]);
        c.run("SELECT INBOX", &[]);
        c
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }
    /// Send a command (with an optional LITERAL+ payload) and return the untagged lines.
    fn run(&mut self, cmd: &str, literal: &[u8]) -> Vec<String> {
        self.tag += 1;
        let tag = format!("s{}", self.tag);
        let mut bytes = format!("{tag} {cmd}").into_bytes();
        if !literal.is_empty() {
            bytes.extend_from_slice(format!(" {{{}+}}\r\n", literal.len()).as_bytes());
            bytes.extend_from_slice(literal);
        }
        bytes.extend_from_slice(b"\r\n");
        self.w.write_all(&bytes).unwrap();
        let mut untagged = Vec::new();
        loop {
            let l = self.line();
            if l.starts_with(&format!("{tag} ")) {
                assert!(l.starts_with(&format!("{tag} OK")), "{cmd}: {l}");
                return untagged;
            }
            untagged.push(l);
        }
    }
}

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
    fn session(&mut self, port: u16, tally: &Tally, round: u64) {
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

#[test]
fn soak_with_concurrent_imap_changes_loses_and_duplicates_nothing() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let dc = Dovecot::start();
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
    // POP3 clients through popbridge.
    for u in &users {
        for _ in 0..POP3_CLIENTS_PER_USER {
            let (stop, tally, user) = (stop.clone(), tally.clone(), u.clone());
            threads.push(thread::spawn(move || {
                let mut client = PopClient {
                    user,
                    seen: HashMap::new(),
                };
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    client.session(pop3, &tally, round);
                    round += 1;
                    thread::sleep(Duration::from_millis(20));
                }
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

    let errors = tally.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "protocol errors: {errors:#?}");

    // Nothing lost: every appended message not expunged by the IMAP client is still upstream
    // (POP3 deletions only hide), and none of them was lost in transit.
    let appended = appended.lock().unwrap().clone();
    let expunged = expunged.lock().unwrap().clone();
    let mut upstream = HashSet::new();
    for u in &users {
        let mut c = Imap::login(imap, u, "pw");
        let lines = c.run("UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (X-LEDGER)])", &[]);
        for l in lines {
            if let Some(m) = marker(&l) {
                upstream.insert(format!("{u}/{m}"));
            }
        }
    }
    let lost: Vec<_> = appended
        .difference(&upstream)
        .filter(|m| !expunged.contains(*m))
        .collect();
    assert!(lost.is_empty(), "lost messages: {lost:?}");
    let retrieved = tally.retrieved.load(Ordering::Relaxed);
    eprintln!(
        "soak {:?}: appended {}, imap-expunged {}, pop3 sessions {}, retrieved {}, committed deletes {}, in-use refusals {}, gone {}, errors 0, lost 0, duplicated 0",
        started.elapsed(),
        appended.len(),
        expunged.len(),
        tally.sessions.load(Ordering::Relaxed),
        retrieved,
        tally.committed_deletes.load(Ordering::Relaxed),
        tally.in_use.load(Ordering::Relaxed),
        tally.gone.load(Ordering::Relaxed),
    );
    eprintln!("popbridge RSS after warm-up {rss_early} KiB, at the end {rss_late} KiB");
    assert!(
        rss_late < rss_early + 16 * 1024,
        "memory grew from {rss_early} to {rss_late} KiB"
    );
    assert!(retrieved > 50, "the soak did too little to prove anything");
    assert!(tally.committed_deletes.load(Ordering::Relaxed) > 0);
    assert!(pb.log().matches("panicked").count() == 0);
}
